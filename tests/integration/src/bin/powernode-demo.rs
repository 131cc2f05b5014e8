//! `make demo`: one node's life, on this machine. A docker-registry and the development platform
//! run on host loopback; the platform publishes signed modules (a `system-base` Debian with the
//! suite installed, and the upstream fixture modules that ship files); QEMU (TCG) boots Debian's
//! kernel with our dracut initramfs, which enrolls, pulls, verifies and stacks the modules and
//! switches into them; systemd there starts the suite and the agent heartbeats. Shown live: the
//! boot stages from the serial console, then the fleet view (node, modules, heartbeats, tasks,
//! events) on every heartbeat, until Ctrl-C (or `DEMO_SECONDS` seconds).

#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use powernode_integration_tests::vm::{Vm, WAITING_FOR_ASSIGNMENT, boot_lines, system_tree};
use powernode_integration_tests::workspace_root;
use serde_json::{Value, json};

/// system-base (a Debian tree) plus the fixtures, stored once and downloaded once.
const PERSIST_SIZE: &str = "2G";
/// What the demo asks the node to do once it heartbeats (a `custom` task: a transient,
/// sandboxed systemd unit; its output comes back with the result).
const DEMO_TASK: &str = "echo \"root: $(findmnt -no FSTYPE /)\"; \
    echo \"layers from the fixtures:\"; ls /etc/redis/conf.d /etc/vector /etc/systemd/system/node_exporter.service; \
    echo \"system: $(systemctl is-system-running)\"";

/// Upstream fixture modules that ship files (`rootfs/`), each with its own `manifest.yaml`.
fn fixture_trees(w: &Path) -> Result<Vec<(String, PathBuf)>> {
    let src = workspace_root().join("tests/fixtures/upstream-modules/modules");
    let mut out = Vec::new();
    let mut names: Vec<_> = fs::read_dir(&src)
        .with_context(|| format!("reading {}", src.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        let rootfs = src.join(&name).join("rootfs");
        if !rootfs.is_dir() {
            continue;
        }
        let tree = w.join(format!("tree-{name}"));
        powernode_integration_tests::units::copy_tree(&rootfs, &tree)?;
        fs::copy(
            src.join(&name).join("manifest.yaml"),
            tree.join("manifest.yaml"),
        )?;
        out.push((name, tree));
    }
    if out.is_empty() {
        bail!("no fixture modules with a rootfs under {}", src.display());
    }
    Ok(out)
}

fn short(d: &str) -> &str {
    let d = d.strip_prefix("sha256:").unwrap_or(d);
    &d[..d.len().min(12)]
}

/// One line per heartbeat; the module and task lines when they changed since `last`; new
/// events.
fn fleet_view(
    vm: &Vm,
    id: &str,
    rec: &Value,
    last: &mut String,
    seen_events: &mut BTreeSet<String>,
) -> Result<()> {
    println!(
        "  node {}: {} · heartbeats {} · last {} · load {} · free {} kB · boot {}",
        short(id),
        rec["status"].as_str().unwrap_or("?"),
        rec["heartbeat_count"],
        rec["last_heartbeat_at"].as_str().unwrap_or("-"),
        rec["load_average"].as_str().unwrap_or("-"),
        rec["memory_free_kb"],
        rec["boot_id"].as_str().map_or("-", short),
    );
    let mods: Vec<String> = rec["module_digests"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}@{}", short(v.as_str().unwrap_or("?"))))
                .collect()
        })
        .unwrap_or_default();
    let mut detail = format!(
        "    modules ({}): {}\n",
        rec["mount_state"].as_str().unwrap_or("?"),
        mods.join(", ")
    );
    for t in vm.platform.tasks(id)? {
        detail.push_str(&format!(
            "    task {} {}: {}\n",
            t["command"].as_str().unwrap_or("?"),
            t["id"].as_str().map_or("?", short),
            t["status"].as_str().unwrap_or("?")
        ));
    }
    if detail != *last {
        print!("{detail}");
        *last = detail;
    }
    for e in vm.platform.events(id)? {
        let key = e["correlation_id"].as_str().unwrap_or_default().to_string();
        if seen_events.insert(key) {
            println!(
                "    event {} [{}] {}",
                e["kind"].as_str().unwrap_or("?"),
                e["severity"].as_str().unwrap_or("?"),
                e["payload"]
            );
        }
    }
    Ok(())
}

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

    println!("== building the module trees and publishing them (registry + platform on loopback)");
    let mut names = Vec::new();
    let mut vm = Vm::setup_with(PERSIST_SIZE, &["--next-poll-seconds", "5"], |w| {
        let mut trees = system_tree(w)?;
        let fixtures = fixture_trees(w)?;
        names.extend(fixtures.iter().map(|(n, _)| n.clone()));
        trees.extend(fixtures);
        Ok(trees)
    })?;
    vm.timeout_secs = 7 * 24 * 3600;
    let id = vm.token.instance_uuid.clone();
    println!(
        "== platform {} · registry {} · modules: system-base, {}",
        vm.platform.url,
        vm.registry.addr,
        names.join(", ")
    );
    println!("== booting instance {id} under QEMU (TCG: a minute or two); Ctrl-C stops\n");

    let mut running = vm.spawn("demo")?;
    let start = Instant::now();
    let mut shown = 0usize;
    let mut assigned = false;
    let mut task_sent = false;
    let mut last_beats = 0u64;
    let mut seen_events = BTreeSet::new();
    let mut reported = BTreeSet::new();
    let mut last_detail = String::new();
    while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| start.elapsed() < l) {
        let console = running.console()?;
        let lines = boot_lines(&console);
        for l in lines.iter().skip(shown) {
            println!("  {:>6.1}s {l}", start.elapsed().as_secs_f64());
        }
        shown = lines.len();
        if !assigned && console.contains(WAITING_FOR_ASSIGNMENT) {
            // The operator's turn: the platform accepts assignments once the node enrolled.
            vm.assign("system-base")?;
            for n in &names {
                vm.assign(n)?;
            }
            println!(
                "  {:>6.1}s == operator: assigned system-base + {} fixture modules",
                start.elapsed().as_secs_f64(),
                names.len()
            );
            assigned = true;
        }
        if let Some(st) = running.exited()? {
            bail!(
                "the VM stopped ({st}); last boot lines:\n{}",
                boot_lines(&console).join("\n")
            );
        }
        if let Some(rec) = vm.platform.instance(&id)? {
            let beats = rec["heartbeat_count"].as_u64().unwrap_or(0);
            if beats != last_beats {
                last_beats = beats;
                if last_detail.is_empty() {
                    println!("\n  == fleet view (a line per heartbeat; details when they change)");
                }
                print!("  {:>6.1}s", start.elapsed().as_secs_f64());
                fleet_view(&vm, &id, &rec, &mut last_detail, &mut seen_events)?;
                if !task_sent {
                    let t =
                        vm.platform
                            .enqueue_task(&id, "custom", &json!({"command": DEMO_TASK}))?;
                    println!(
                        "    == operator: queued task {} (custom: what does the node see?)",
                        t["id"].as_str().unwrap_or("?")
                    );
                    task_sent = true;
                }
                for t in vm.platform.tasks(&id)? {
                    let tid = t["id"].as_str().unwrap_or_default().to_string();
                    if (t["status"] == "complete" || t["status"] == "failed")
                        && reported.insert(tid)
                    {
                        let out = t["result"]["output"]
                            .as_str()
                            .or(t["error_message"].as_str())
                            .unwrap_or_default();
                        for l in out.lines() {
                            println!("      | {l}");
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    running.stop()?;
    println!("\n== stopped after {:.0?}", start.elapsed());
    Ok(())
}
