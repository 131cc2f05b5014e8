//! Static gates on the shipped units: hardening score, `systemd-analyze verify`, and the D-Bus
//! policy file loading into a real dbus-daemon.

use anyhow::{Result, ensure};
use powernode_integration_tests::{bus::PrivateBus, describe, require_tool, units};

/// Exposure budget for every shipped service (systemd-analyze's scale, 0 = best, 10 = worst).
const MAX_EXPOSURE: f64 = 2.0;
/// The same budget as systemd-analyze's `--threshold=` takes it (exposure x 10).
const THRESHOLD: u32 = 20;

#[test]
fn every_service_is_within_the_exposure_budget() -> Result<()> {
    require_tool("systemd-analyze")?;
    let mut over = Vec::new();
    for unit in units::service_files()? {
        let exposure = units::offline_security(&unit, THRESHOLD)?;
        println!("exposure {}: {:.1}", exposure.unit, exposure.score);
        if exposure.score > MAX_EXPOSURE || !exposure.within_threshold {
            over.push(format!(
                "{} scored {:.1}:\n{}",
                exposure.unit, exposure.score, exposure.report
            ));
        }
    }
    ensure!(
        over.is_empty(),
        "over the {MAX_EXPOSURE} budget:\n{}",
        over.join("\n")
    );
    Ok(())
}

#[test]
fn verify_is_silent_on_the_installed_tree() -> Result<()> {
    require_tool("systemd-analyze")?;
    let root = tempfile::tempdir()?;
    units::install_tree(root.path())?;
    // powernode-task@.service runs the task's command with the node's /bin/sh.
    std::fs::create_dir_all(root.path().join("bin"))?;
    std::fs::copy("/bin/sh", root.path().join("bin/sh"))?;
    // dbus.socket, sysinit.target, … are implicit dependencies verify must resolve.
    units::add_host_systemd_units(root.path())?;
    let names: Vec<String> = units::unit_files()?
        .iter()
        .map(|p| units::unit_name(p))
        .collect();
    let out = units::verify(root.path(), &names)?;
    println!("verified: {}", names.join(" "));
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify is not clean ({}):\n{}",
        out.status,
        describe(&out)
    );
    Ok(())
}

#[test]
fn dbus_policy_file_loads_into_a_system_bus() -> Result<()> {
    // start() fails if dbus-daemon rejects the generated config or the included policy.
    let bus = PrivateBus::start()?;
    println!(
        "private bus at {} with {}",
        bus.address(),
        bus.config_path().display()
    );
    Ok(())
}
