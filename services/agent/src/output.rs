//! Command results in the upstream shape: `--json` prints one object
//! `{command, status, exit_code, error?, ...details}`; otherwise `key: value` lines.

use serde_json::{Map, Value};

/// Exit codes (upstream table).
pub const EXIT_OK: u8 = 0;
pub const EXIT_GENERIC: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 5;

pub struct Report {
    pub command: &'static str,
    pub exit_code: u8,
    pub error: Option<String>,
    pub details: Map<String, Value>,
}

impl Report {
    pub fn ok(command: &'static str, details: Map<String, Value>) -> Self {
        Report {
            command,
            exit_code: EXIT_OK,
            error: None,
            details,
        }
    }

    pub fn failed(command: &'static str, exit_code: u8, error: String) -> Self {
        Report {
            command,
            exit_code,
            error: Some(error),
            details: Map::new(),
        }
    }

    pub fn print(&self, json: bool) {
        if json {
            let mut o = Map::new();
            o.insert("command".into(), self.command.into());
            o.insert(
                "status".into(),
                if self.exit_code == 0 { "ok" } else { "error" }.into(),
            );
            o.insert("exit_code".into(), self.exit_code.into());
            if let Some(e) = &self.error {
                o.insert("error".into(), e.clone().into());
            }
            for (k, v) in &self.details {
                o.insert(k.clone(), v.clone());
            }
            println!("{}", Value::Object(o));
            return;
        }
        print_lines("", &Value::Object(self.details.clone()));
        if let Some(e) = &self.error {
            eprintln!("powernode-agent {}: {e}", self.command);
        }
    }
}

fn print_lines(prefix: &str, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_lines(&p, v);
            }
        }
        Value::Null => println!("{prefix}: -"),
        Value::String(s) => println!("{prefix}: {s}"),
        other => println!("{prefix}: {other}"),
    }
}

/// Exit code for a library error: 5 when the platform was unreachable or refused.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<powernode::Error>() {
        Some(pe) => pe.kind().exit_code() as u8,
        None => EXIT_GENERIC,
    }
}
