//! SMBIOS/DMI: `/sys/class/dmi/id/product_uuid` as the instance UUID.
//!
//! Upstream treats DMI only as a hint (`dmi_uuid` in claim and enroll requests). Here it is a
//! source, but a weak one: it carries no bootstrap token and no CA, and it names no platform, so
//! it matches only when `[platform] url` is configured (otherwise every bare-metal machine and VM
//! would "match" DMI and the identity.cfg files after it could never win). Placeholder UUIDs
//! that firmware ships unset (all zeros, all ones, the well-known `03000200-…` value) never match.

use super::{Ctx, Fields, Identity, Probe, Source, Strategy};
use crate::fsutil::read_optional;
use crate::{Error, Result};

const MAX_DMI: u64 = 4096;
/// Values firmware vendors leave in unprogrammed boards.
const PLACEHOLDERS: [&str; 3] = [
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
];

pub struct Dmi;

/// `8-4-4-4-12` hex digits, lowercased.
pub(super) fn normalize_uuid(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let groups: Vec<&str> = s.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then_some(s)
}

/// The DMI product UUID if the file exists and holds a real one (also the claim's `dmi_uuid`).
pub(super) fn product_uuid(ctx: &Ctx) -> Result<Option<String>> {
    let p = ctx.paths.dmi_product_uuid();
    let Some(b) = read_optional(&p, MAX_DMI)? else {
        return Ok(None);
    };
    let raw = String::from_utf8_lossy(&b);
    let uuid = normalize_uuid(&raw).ok_or_else(|| {
        Error::Identity(format!(
            "dmi: {} holds {:?}, not a UUID",
            p.display(),
            raw.trim()
        ))
    })?;
    Ok((!PLACEHOLDERS.contains(&uuid.as_str())).then_some(uuid))
}

impl Strategy for Dmi {
    fn source(&self) -> Source {
        Source::Dmi
    }

    fn probe_local(&self, ctx: &Ctx) -> Result<Probe> {
        let p = ctx.paths.dmi_product_uuid();
        let Some(uuid) = product_uuid(ctx)? else {
            return Ok(Probe::Absent(format!(
                "dmi: {} missing or a placeholder",
                p.display()
            )));
        };
        let Some(url) = ctx.settings.platform.url.clone() else {
            return Ok(Probe::Absent(format!(
                "dmi: product_uuid {uuid} present, but no [platform] url is configured (DMI names no platform)"
            )));
        };
        let fields = Fields {
            instance_uuid: Some(uuid),
            platform_url: Some(url),
            ..Fields::default()
        };
        Identity::from_fields(
            fields,
            Source::Dmi,
            format!(
                "product_uuid in {} (platform URL from [platform] url)",
                p.display()
            ),
        )
        .map(Probe::Found)
    }
}
