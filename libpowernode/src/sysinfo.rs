//! Facts about the running node read from the kernel: boot id, uptime, load, available memory.
//! Parsers take `&str` so they are tested on fixed inputs; the readers go through [`Paths`].

use crate::fsutil::read_capped;
use crate::paths::Paths;
use crate::{Error, Result};

const MAX_PROC: u64 = 64 * 1024;

fn read_proc(paths: &Paths, name: &str) -> Result<String> {
    let p = paths.proc_file(name);
    String::from_utf8(read_capped(&p, MAX_PROC)?)
        .map_err(|_| Error::malformed("proc file", format!("{} is not UTF-8", p.display())))
}

/// The kernel's boot id: changes exactly when the node reboots.
pub fn boot_id(paths: &Paths) -> Result<String> {
    parse_boot_id(&read_proc(paths, "sys/kernel/random/boot_id")?)
}

pub fn parse_boot_id(s: &str) -> Result<String> {
    let id = s.trim();
    if id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        Ok(id.to_string())
    } else {
        Err(Error::malformed("boot_id", format!("{id:?}")))
    }
}

pub fn uptime_seconds(paths: &Paths) -> Result<u64> {
    parse_uptime(&read_proc(paths, "uptime")?)
}

pub fn parse_uptime(s: &str) -> Result<u64> {
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v as u64)
        .ok_or_else(|| Error::malformed("/proc/uptime", format!("{s:?}")))
}

/// "1m 5m 15m" load averages, as the platform stores them (a string).
pub fn load_average(paths: &Paths) -> Result<String> {
    parse_loadavg(&read_proc(paths, "loadavg")?)
}

pub fn parse_loadavg(s: &str) -> Result<String> {
    let v: Vec<&str> = s.split_whitespace().take(3).collect();
    if v.len() == 3 && v.iter().all(|x| x.parse::<f64>().is_ok()) {
        Ok(v.join(" "))
    } else {
        Err(Error::malformed("/proc/loadavg", format!("{s:?}")))
    }
}

/// Memory available for new work in KiB: `MemAvailable` (what an operator means by "free";
/// `MemFree` ignores reclaimable cache), falling back to `MemFree` on kernels without it.
pub fn memory_free_kb(paths: &Paths) -> Result<u64> {
    parse_meminfo(&read_proc(paths, "meminfo")?)
}

pub fn parse_meminfo(s: &str) -> Result<u64> {
    let field = |name: &str| {
        s.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    field("MemAvailable")
        .or_else(|| field("MemFree"))
        .ok_or_else(|| Error::malformed("/proc/meminfo", "no MemAvailable or MemFree"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(
            parse_boot_id("3c5b6e0a-1f2d-4c8e-9a7b-0d1e2f3a4b5c\n").unwrap(),
            "3c5b6e0a-1f2d-4c8e-9a7b-0d1e2f3a4b5c"
        );
        assert!(parse_boot_id("boot-1234").is_err());
        assert_eq!(parse_uptime("12345.67 2345.10\n").unwrap(), 12345);
        assert!(parse_uptime("-1 0").is_err());
        assert!(parse_uptime("").is_err());
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 1/254 4242\n").unwrap(),
            "0.52 0.58 0.59"
        );
        assert!(parse_loadavg("0.52 x 0.59").is_err());
        let mi =
            "MemTotal:       24584220 kB\nMemFree:          100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(mi).unwrap(), 20_000_000);
        assert_eq!(parse_meminfo("MemFree: 77 kB\n").unwrap(), 77);
        assert!(parse_meminfo("Cached: 1 kB").is_err());
    }

    #[test]
    fn reads_the_real_kernel_through_root_slash() {
        let p = Paths::default();
        assert_eq!(boot_id(&p).unwrap().len(), 36);
        assert!(uptime_seconds(&p).is_ok());
        assert!(memory_free_kb(&p).unwrap() > 0);
        assert!(load_average(&p).is_ok());
    }
}
