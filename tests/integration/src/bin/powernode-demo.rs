//! `make demo`: the development platform on host loopback and the suite booted under systemd in
//! a Debian container, a node enrolling and heartbeating — shown live until Ctrl-C (or for
//! `DEMO_SECONDS` seconds).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use powernode_integration_tests::container::{BootOptions, Container, Image};
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::units;

fn main() -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt
                && rt.block_on(tokio::signal::ctrl_c()).is_ok()
            {
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let limit = std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);

    let platform = DevPlatform::start(&["--next-poll-seconds", "5"])?;
    println!(
        "== development platform at {} (CA {})",
        platform.url,
        platform.ca_path.display()
    );
    let token = platform.token(None)?;
    println!(
        "== bootstrap token minted for instance {}",
        token.instance_uuid
    );

    let tree = tempfile::Builder::new().prefix("pn-demo-").tempdir()?;
    units::install_tree(tree.path())?;
    let ca = tree.path().join("etc/powernode/trust/platform-ca.pem");
    std::fs::create_dir_all(ca.parent().context("parent")?)?;
    std::fs::write(&ca, &platform.ca_pem)?;
    let cfg = tree.path().join("etc/identity.cfg");
    std::fs::write(
        &cfg,
        format!(
            "ID={}\nKEY={}\nSERVER={}\nCA_PEM_FILE=/etc/powernode/trust/platform-ca.pem\n",
            token.instance_uuid, token.token, platform.url
        ),
    )?;
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600))?;

    println!("== booting Debian bookworm with the suite installed (systemd-nspawn)");
    let c = Container::boot(
        &Image::bookworm()?,
        &BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            enable: vec!["powernode-agent.service".into()],
            ..BootOptions::default()
        },
    )?;
    println!("== container is {}", c.wait_running()?);
    println!(
        "== following: platform records (outside) and the agent's journal (inside); Ctrl-C stops\n"
    );

    let start = Instant::now();
    let mut seen_lines = 0usize;
    let mut last_count = 0u64;
    while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| start.elapsed() < l) {
        let journal = c.journal("powernode-agent.service").unwrap_or_default();
        for line in journal.lines().skip(seen_lines) {
            println!("  [node] {line}");
        }
        seen_lines = journal.lines().count();
        if let Some(rec) = platform.instance(&token.instance_uuid)? {
            let n = rec["heartbeat_count"].as_u64().unwrap_or(0);
            if n != last_count {
                last_count = n;
                println!(
                    "  [platform] {} status={} heartbeats={} last={} boot_id={} load={} mem_free_kb={} cert={}",
                    token.instance_uuid,
                    rec["status"].as_str().unwrap_or("?"),
                    n,
                    rec["last_heartbeat_at"].as_str().unwrap_or("-"),
                    rec["boot_id"].as_str().unwrap_or("-"),
                    rec["load_average"].as_str().unwrap_or("-"),
                    rec["memory_free_kb"],
                    rec["certificates_issued"][0]["serial"]
                        .as_str()
                        .unwrap_or("-"),
                );
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("\n== busctl inside the node:");
    for name in [
        "com.powernode.Agent1",
        "com.powernode.Enroll1",
        "com.powernode.Identity1",
    ] {
        let path = format!("/{}", name.replace('.', "/"));
        let out = c.exec_ok(&["busctl", "introspect", "--no-pager", name, &path, name])?;
        println!("{out}");
    }
    c.poweroff()?;
    println!("== stopped");
    Ok(())
}
