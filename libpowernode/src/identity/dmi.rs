//! SMBIOS/DMI: `/sys/class/dmi/id/product_uuid` as the instance UUID.
//!
//! Upstream treats DMI only as a hint (`dmi_uuid` in claim and enroll requests). Here it is a
//! source, but a weak one: it carries no bootstrap token and no CA, and it names no platform, so
//! it matches only when `[platform] url` is configured (otherwise every bare-metal machine and VM
//! would "match" DMI and the identity.cfg files after it could never win). Placeholder UUIDs
//! that firmware ships unset (all zeros, all ones, the well-known `03000200-…` value) never match.
//!
//! DMI also decides which clouds are asked at all: [`firmware`] reads the vendor strings and
//! [`Firmware::names`] tells whether they name a given cloud (see `CLOUD_MARKS`), so a node on
//! a LAN or a laptop never sends a packet to the link-local metadata address.

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

/// Where the kernel exposes the SMBIOS strings; its absence means the node has no DMI at all.
pub(super) const DMI_DIR: &str = "/sys/class/dmi/id";

/// The SMBIOS strings a cloud's firmware names itself in. All are world-readable (unlike
/// `product_uuid`), so reading them needs no privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DmiField {
    SysVendor,
    ProductName,
    ChassisAssetTag,
    BoardVendor,
    BiosVendor,
    BiosVersion,
}

impl DmiField {
    const ALL: [DmiField; 6] = [
        DmiField::SysVendor,
        DmiField::ProductName,
        DmiField::ChassisAssetTag,
        DmiField::BoardVendor,
        DmiField::BiosVendor,
        DmiField::BiosVersion,
    ];

    /// The file under [`DMI_DIR`].
    pub(super) fn file(self) -> &'static str {
        match self {
            DmiField::SysVendor => "sys_vendor",
            DmiField::ProductName => "product_name",
            DmiField::ChassisAssetTag => "chassis_asset_tag",
            DmiField::BoardVendor => "board_vendor",
            DmiField::BiosVendor => "bios_vendor",
            DmiField::BiosVersion => "bios_version",
        }
    }
}

/// How a DMI string must read for a mark to hold.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// The whole value (trimmed), as firmware writes it.
    Is(&'static str),
    /// A substring, ASCII case-insensitive.
    Contains(&'static str),
}

/// How each cloud's firmware says which cloud it is: the facts cloud-init's ds-identify relies
/// on. A cloud is probed only when one of its marks holds (or the node has no DMI at all).
///
/// | cloud        | DMI field           | value                                   |
/// |--------------|---------------------|-----------------------------------------|
/// | AWS (Nitro)  | `sys_vendor`        | `Amazon EC2`                            |
/// | AWS (Nitro)  | `bios_vendor`       | `Amazon EC2`                            |
/// | AWS (Xen)    | `bios_version`      | contains `amazon` (e.g. `4.11.amazon`)  |
/// | GCP          | `product_name`      | `Google Compute Engine`                 |
/// | GCP          | `board_vendor`      | `Google`                                |
/// | Azure        | `chassis_asset_tag` | `7783-7084-3265-9085-8269-3286-77`      |
/// | DigitalOcean | `sys_vendor`        | `DigitalOcean`                          |
/// | Hetzner      | `sys_vendor`        | `Hetzner`                               |
const CLOUD_MARKS: [(Source, DmiField, Pattern); 8] = [
    (Source::Aws, DmiField::SysVendor, Pattern::Is("Amazon EC2")),
    (Source::Aws, DmiField::BiosVendor, Pattern::Is("Amazon EC2")),
    (
        Source::Aws,
        DmiField::BiosVersion,
        Pattern::Contains("amazon"),
    ),
    (
        Source::Gcp,
        DmiField::ProductName,
        Pattern::Is("Google Compute Engine"),
    ),
    (Source::Gcp, DmiField::BoardVendor, Pattern::Is("Google")),
    // Azure's Hyper-V hosts stamp this asset tag into every VM's chassis.
    (
        Source::Azure,
        DmiField::ChassisAssetTag,
        Pattern::Is("7783-7084-3265-9085-8269-3286-77"),
    ),
    (
        Source::Digitalocean,
        DmiField::SysVendor,
        Pattern::Is("DigitalOcean"),
    ),
    (Source::Hetzner, DmiField::SysVendor, Pattern::Is("Hetzner")),
];

/// The SMBIOS strings of a node that has DMI; a missing file is an empty string.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Firmware {
    values: Vec<(DmiField, String)>,
}

impl Firmware {
    fn value(&self, field: DmiField) -> &str {
        self.values
            .iter()
            .find(|(f, _)| *f == field)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Does the firmware name `source` as the cloud this node runs on?
    pub(super) fn names(&self, source: Source) -> bool {
        CLOUD_MARKS
            .iter()
            .filter(|(s, _, _)| *s == source)
            .any(|(_, field, pattern)| {
                let v = self.value(*field);
                match pattern {
                    Pattern::Is(want) => v == *want,
                    Pattern::Contains(part) => {
                        v.to_ascii_lowercase().contains(&part.to_ascii_lowercase())
                    }
                }
            })
    }

    /// The non-empty strings, for the trail: `sys_vendor="QEMU", product_name="…"`.
    pub(super) fn describe(&self) -> String {
        let set: Vec<String> = self
            .values
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(f, v)| format!("{}={v:?}", f.file()))
            .collect();
        if set.is_empty() {
            "no vendor strings".into()
        } else {
            set.join(", ")
        }
    }
}

/// The node's SMBIOS strings, or `None` when it has no DMI at all (no [`DMI_DIR`]).
pub(super) fn firmware(ctx: &Ctx) -> Result<Option<Firmware>> {
    let dir = ctx.paths.under(DMI_DIR);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Identity(format!(
                "dmi: {} is not a directory",
                dir.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Identity(format!("dmi: {}: {e}", dir.display())));
        }
    }
    let mut values = Vec::with_capacity(DmiField::ALL.len());
    for field in DmiField::ALL {
        let raw = read_optional(&dir.join(field.file()), MAX_DMI)?.unwrap_or_default();
        values.push((field, String::from_utf8_lossy(&raw).trim().to_string()));
    }
    Ok(Some(Firmware { values }))
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
