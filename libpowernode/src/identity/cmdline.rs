//! Strategy 1: the kernel command line (`powernode.instance_uuid=…`, alias `powernode.id=…`).

use super::{Ctx, Fields, Identity, Probe, Source, Strategy};
use crate::fsutil::read_optional;
use crate::{Error, Result};

/// /proc/cmdline is at most a few KiB (COMMAND_LINE_SIZE is 2048–4096 on x86).
const MAX_CMDLINE: u64 = 64 * 1024;

pub struct KernelCmdline;

impl Strategy for KernelCmdline {
    fn source(&self) -> Source {
        Source::KernelCmdline
    }

    fn probe_local(&self, ctx: &Ctx) -> Result<Probe> {
        let paths = &ctx.paths;
        let p = paths.proc_cmdline();
        let Some(bytes) = read_optional(&p, MAX_CMDLINE)? else {
            return Ok(Probe::Absent(format!(
                "kernel-cmdline: {} missing",
                p.display()
            )));
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Identity(format!("{} is not UTF-8", p.display())))?;
        let (fields, key) = parse_cmdline(&text);
        if fields.instance_uuid.is_none() {
            return Ok(Probe::Absent(
                "kernel-cmdline: no powernode.instance_uuid".into(),
            ));
        }
        let evidence = format!(
            "{} in {}",
            key.unwrap_or("powernode.instance_uuid"),
            p.display()
        );
        Identity::from_fields(fields, Source::KernelCmdline, evidence).map(Probe::Found)
    }
}

/// Split a command line into words, honouring single and double quotes.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Parse the `powernode.*` keys. Returns the fields and which key named the instance.
/// Inline PEM may carry literal `\n` sequences, which become newlines.
pub fn parse_cmdline(s: &str) -> (Fields, Option<&'static str>) {
    let mut f = Fields::default();
    let mut key_used = None;
    for w in words(s) {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let v = v.to_string();
        match k {
            "powernode.instance_uuid" => {
                f.instance_uuid = Some(v);
                key_used = Some("powernode.instance_uuid");
            }
            // The alias never overrides the canonical key, whatever the order.
            "powernode.id" if key_used != Some("powernode.instance_uuid") => {
                f.instance_uuid = Some(v);
                key_used = Some("powernode.id");
            }
            "powernode.bootstrap_token" => f.bootstrap_token = Some(v),
            "powernode.platform_url" => f.platform_url = Some(v),
            "powernode.ca_pem" => f.ca_pem = Some(v.replace("\\n", "\n")),
            _ => {}
        }
    }
    f.instance_uuid = f.instance_uuid.filter(|s| !s.is_empty());
    (f, key_used)
}
