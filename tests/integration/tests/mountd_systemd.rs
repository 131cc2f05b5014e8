//! powernode-mountd under a real systemd: the suite installed in the nspawn container (with
//! polkitd and loop devices), two modules published by the development platform to Debian's
//! docker-registry on the host, a node whose PKI was enrolled with the CLI. mountd is activated
//! over the real system bus, runs as user powernode, and systemd (PID 1) creates the transient
//! mount units after asking polkit. Checked inside with busctl, systemctl and the files, and
//! outside with the platform's events and the host's loop devices.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::container::{BootOptions, Container, Image};
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::registry::Registry;
use powernode_integration_tests::{require_tool, units};
use serde_json::Value;

const NAME: &str = "com.powernode.Mount1";
const PATH: &str = "/com/powernode/Mount1";
/// Loop nodes bound into the container: mount(8) takes the lowest free one host-wide, and
/// other tests on the machine may hold a few.
const LOOP_DEVICES: u32 = 32;

fn mount_call(c: &Container, method: &str, arg: &str) -> Result<String> {
    let mut argv = vec!["busctl", "--timeout=120", "call", NAME, PATH, NAME, method];
    if !arg.is_empty() {
        argv.extend(["s", arg]);
    }
    let out = c.exec(&argv)?;
    if !out.status.success() {
        bail!(
            "{method}({arg}) failed: {}\nmountd journal:\n{}\nlast of the journal:\n{}",
            powernode_integration_tests::describe(&out),
            c.journal("powernode-mountd.service").unwrap_or_default(),
            c.exec_ok(&[
                "journalctl",
                "--no-pager",
                "-n",
                "60",
                "-o",
                "short-monotonic"
            ])
            .unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn prop(c: &Container, p: &str) -> Result<String> {
    Ok(c.exec_ok(&["busctl", "get-property", NAME, PATH, NAME, p])?
        .trim()
        .to_string())
}

/// The powernode mount units systemd has loaded and active, sorted.
/// `busctl call <call…>` in the container as `user`:`group` with no supplementary groups.
fn busctl_as(
    c: &Container,
    user: &str,
    group: &str,
    call: &[&str],
) -> Result<std::process::Output> {
    let (uid, gid) = (format!("--reuid={user}"), format!("--regid={group}"));
    let mut argv = vec!["setpriv", &uid, &gid, "--clear-groups", "busctl", "call"];
    argv.extend_from_slice(call);
    c.exec(&argv)
}

fn mount_units(c: &Container) -> Result<Vec<String>> {
    let out = c.exec_ok(&[
        "systemctl",
        "list-units",
        "--type=mount",
        "--state=active",
        "--no-legend",
        "--plain",
        "--no-pager",
        "run-powernode-*",
    ])?;
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    v.sort();
    Ok(v)
}

/// Host loop devices whose backing file is one of the images (they name the store path).
fn loops_backing(hexes: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(dir) = fs::read_dir("/sys/block") {
        for e in dir.flatten() {
            let f = e.path().join("loop/backing_file");
            if let Ok(b) = fs::read_to_string(&f)
                && hexes.iter().any(|h| b.contains(h))
            {
                found.push(format!("{}: {}", e.file_name().to_string_lossy(), b.trim()));
            }
        }
    }
    found
}

#[test]
fn modules_are_composed_by_systemd_refreshed_atomically_and_detached() -> Result<()> {
    for tool in ["mkfs.erofs", "fsverity"] {
        require_tool(tool)?;
    }
    let registry = Registry::start()?;
    let platform = DevPlatform::start(&[])?;
    let (node_root, instance) = platform.enrolled_node("pn-mountd-e2e-")?;

    // Two modules: both ship /etc/motd.d/shared (top must win), each a file of its own.
    let work = tempfile::Builder::new()
        .prefix("pn-mountd-e2e-work-")
        .tempdir()?;
    for (name, shared) in [("base", "from base\n"), ("top", "from top\n")] {
        let dir = work.path().join(name);
        fs::create_dir_all(dir.join("etc/motd.d"))?;
        fs::write(dir.join("etc/motd.d/shared"), shared)?;
        fs::write(dir.join(format!("{name}-only")), name)?;
    }
    let base = platform.publish(
        &registry.addr,
        "base",
        "1.0.0",
        &work.path().join("base"),
        &[],
    )?;
    let top = platform.publish(
        &registry.addr,
        "top",
        "1.0.0",
        &work.path().join("top"),
        &[],
    )?;
    // Assignment order gives the priorities: base 1, top 2.
    for name in ["base", "top"] {
        platform.assign(&instance, name, &[])?;
    }
    let hex = |m: &Value| -> Result<String> {
        Ok(m["artifact"]["image_digest"]
            .as_str()
            .context("image_digest")?
            .trim_start_matches("sha256:")
            .to_string())
    };
    let (base_hex, top_hex) = (hex(&base)?, hex(&top)?);

    // The installed suite + the node's PKI and pinned trust root.
    let tree = tempfile::Builder::new()
        .prefix("pn-mountd-tree-")
        .tempdir()?;
    units::install_tree(tree.path())?;
    units::copy_tree(
        &node_root.path().join("persist/var/lib/powernode"),
        &tree.path().join("persist/var/lib/powernode"),
    )?;
    platform.pin_trusted_root(tree.path())?;

    let image = Image::bookworm()?;
    let started = Instant::now();
    let c = Container::boot(
        &image,
        &BootOptions {
            overlay_tree: Some(tree.path().to_path_buf()),
            loop_devices: LOOP_DEVICES,
            ..BootOptions::default()
        },
    )?;
    let state = c.wait_running()?;
    println!("container {state} after {:.1?}", started.elapsed());
    // The copied PKI belongs to enrolld's user and group powernode, as enrolld would have
    // left it; mountd reads it through the group.
    c.exec_ok(&[
        "chown",
        "-R",
        "powernode-enroll:powernode",
        "/persist/var/lib/powernode/pki",
    ])?;

    // Attach base, then top: generations 1 and 2.
    let t = Instant::now();
    let d = mount_call(&c, "Attach", "base")?;
    ensure!(d.contains(&base_hex), "{d}");
    println!(
        "Attach(base) (activation, pull, verify, mount) took {:.1?}",
        t.elapsed()
    );
    let t = Instant::now();
    mount_call(&c, "Attach", "top")?;
    println!("Attach(top) took {:.1?}", t.elapsed());
    ensure!(prop(&c, "UnionMounted")? == "b true");
    ensure!(prop(&c, "Generation")? == "t 2");
    ensure!(
        prop(&c, "Modules")?.starts_with("as 2 \""),
        "{}",
        prop(&c, "Modules")?
    );
    let link = c.exec_ok(&["readlink", "/run/powernode/root"])?;
    ensure!(link.trim() == "/run/powernode/root.gen/2", "{link}");
    let shared = c.exec_ok(&["cat", "/run/powernode/root/etc/motd.d/shared"])?;
    ensure!(
        shared == "from top\n",
        "the higher priority wins: {shared:?}"
    );
    for f in ["base-only", "top-only"] {
        c.exec_ok(&["test", "-f", &format!("/run/powernode/root/{f}")])?;
    }
    let want = {
        let mut v = vec![
            format!("run-powernode-mounts-lower-{base_hex}.mount"),
            format!("run-powernode-mounts-lower-{top_hex}.mount"),
            "run-powernode-mounts-upper-2.mount".to_string(),
            "run-powernode-root.gen-2.mount".to_string(),
        ];
        v.sort();
        v
    };
    ensure!(mount_units(&c)? == want, "units: {:?}", mount_units(&c)?);
    let show = c.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "Transient,What,Type",
        "run-powernode-root.gen-2.mount",
    ])?;
    ensure!(
        show.contains("Transient=yes") && show.contains("Type=overlay"),
        "{show}"
    );
    let lower = c.exec_ok(&[
        "findmnt",
        "-no",
        "SOURCE,FSTYPE,OPTIONS",
        &format!("/run/powernode/mounts/lower/{base_hex}"),
    ])?;
    ensure!(
        lower.contains("/dev/loop") && lower.contains("erofs") && lower.contains("ro,"),
        "{lower}"
    );
    ensure!(
        lower.contains("nosuid") && lower.contains("nodev"),
        "{lower}"
    );

    // One loop device per image, seen from the host (the positive control for the check
    // after detaching).
    let loops = loops_backing(&[&base_hex, &top_hex]);
    ensure!(loops.len() == 2, "loop devices: {loops:?}");

    // The module objects.
    let tree_out = c.exec_ok(&["busctl", "tree", "--list", NAME])?;
    ensure!(
        tree_out.matches("/com/powernode/Mount1/module/").count() == 2,
        "{tree_out}"
    );

    // A write lands in the tmpfs upper, not in a lower.
    c.exec_ok(&["sh", "-c", "echo written > /run/powernode/root/new-file"])?;
    let up = c.exec_ok(&["cat", "/run/powernode/mounts/upper/2/upper/new-file"])?;
    ensure!(up == "written\n", "{up:?}");
    let upfs = c.exec_ok(&["findmnt", "-no", "FSTYPE", "/run/powernode/mounts/upper/2"])?;
    ensure!(upfs.trim() == "tmpfs", "{upfs}");

    // state.json as the heartbeat reads it.
    let sj: Value =
        serde_json::from_str(&c.exec_ok(&["cat", "/persist/var/lib/powernode/state.json"])?)?;
    ensure!(sj["union_mounted"] == true && sj["generation"] == 2, "{sj}");
    ensure!(
        sj["modules"].as_object().map(|m| m.len()) == Some(2),
        "{sj}"
    );
    // ... and the agent reports it: every heartbeat carries the composed digests.
    c.exec_ok(&["systemctl", "start", "powernode-agent.service"])?;
    let rec = platform
        .wait_heartbeats(&instance, 1, Duration::from_secs(60))
        .with_context(|| c.journal("powernode-agent.service").unwrap_or_default())?;
    ensure!(rec["mount_state"] == "mounted", "{rec}");
    let digests = rec["module_digests"]
        .as_object()
        .context("module_digests")?;
    ensure!(digests.len() == 2, "{rec}");
    for (id, m) in sj["modules"].as_object().context("modules")? {
        ensure!(digests.get(id) == Some(&m["digest"]), "{id}: {rec}");
    }

    // The daemon holds nothing: no capabilities, NoNewPrivs, seccomp.
    let pid = c.exec_ok(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "powernode-mountd.service",
    ])?;
    let status = c.exec_ok(&["cat", &format!("/proc/{}/status", pid.trim())])?;
    for want in ["CapEff:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2"] {
        ensure!(status.contains(want), "mountd lacks {want:?}:\n{status}");
    }
    let user = c
        .exec_ok(&["ps", "-o", "user=", "-p", pid.trim()])
        .unwrap_or_default();
    println!("mountd runs as {user:?}");

    // Atomic refresh: a reader loops over the shared file while base is detached (a new
    // generation with top alone) and attached again; it must never miss the file.
    c.exec_ok(&[
        "systemd-run", "--unit=pn-reader", "--service-type=exec", "sh", "-c",
        "n=0; while [ ! -e /tmp/stop ]; do if cat /run/powernode/root/etc/motd.d/shared >/dev/null 2>&1; then n=$((n+1)); else echo MISS >>/tmp/reader.log; fi; done; echo reads=$n >>/tmp/reader.log",
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    mount_call(&c, "Detach", "base")?;
    println!(
        "Detach(base) (refresh to generation 3) took {:.1?}",
        t.elapsed()
    );
    ensure!(prop(&c, "Generation")? == "t 3");
    mount_call(&c, "Attach", "base")?;
    ensure!(prop(&c, "Generation")? == "t 4");
    // Sync with the same assignments: nothing to do, same generation.
    let g = mount_call(&c, "Sync", "")?;
    ensure!(g == "t 4", "{g}");
    c.exec_ok(&["touch", "/tmp/stop"])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let reader = loop {
        let log = c.exec_ok(&["cat", "/tmp/reader.log"]).unwrap_or_default();
        if log.contains("reads=") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        !reader.contains("MISS"),
        "the target was unreadable during a refresh:\n{reader}"
    );
    let reads: u64 = reader
        .lines()
        .find_map(|l| l.strip_prefix("reads="))
        .context("reader summary")?
        .parse()?;
    println!("reader: {reads} reads across two refreshes, none missed");
    ensure!(reads > 0);
    ensure!(c.exec_ok(&["cat", "/run/powernode/root/etc/motd.d/shared"])? == "from top\n");
    let units_now = mount_units(&c)?;
    ensure!(
        units_now
            .iter()
            .any(|u| u == "run-powernode-root.gen-4.mount")
            && !units_now.iter().any(|u| u.contains("gen-2")
                || u.contains("gen-3")
                || u.contains("upper-2")
                || u.contains("upper-3")),
        "old generations must be stopped: {units_now:?}"
    );

    // A persistent module: the platform flags `top`; Sync composes a new generation with
    // /persist/var bound onto its /var. A write under /var lands on /persist and survives the
    // next refresh; a write elsewhere in the root lives in that generation's tmpfs upper only.
    platform.assign(&instance, "top", &["--persistent"])?;
    let g = mount_call(&c, "Sync", "")?;
    ensure!(g == "t 5", "a changed persistence is a new generation: {g}");
    let sj: Value =
        serde_json::from_str(&c.exec_ok(&["cat", "/persist/var/lib/powernode/state.json"])?)?;
    ensure!(
        sj["modules"][top["id"].as_str().context("top id")?]["persistent"] == true
            && sj["modules"][base["id"].as_str().context("base id")?]["persistent"] == false,
        "{sj}"
    );
    ensure!(
        mount_units(&c)?
            .iter()
            .any(|u| u == "run-powernode-root.gen-5-var.mount"),
        "units: {:?}",
        mount_units(&c)?
    );
    c.exec_ok(&["sh", "-c", "echo kept > /run/powernode/root/var/pn-kept"])?;
    c.exec_ok(&[
        "sh",
        "-c",
        "echo gone > /run/powernode/root/etc/pn-ephemeral",
    ])?;
    ensure!(c.exec_ok(&["cat", "/persist/var/pn-kept"])? == "kept\n");
    mount_call(&c, "Detach", "base")?;
    ensure!(prop(&c, "Generation")? == "t 6");
    ensure!(c.exec_ok(&["cat", "/run/powernode/root/var/pn-kept"])? == "kept\n");
    let eph = c.exec(&["test", "-e", "/run/powernode/root/etc/pn-ephemeral"])?;
    ensure!(
        !eph.status.success(),
        "a write outside /var outlived its generation"
    );
    mount_call(&c, "Attach", "base")?;
    ensure!(prop(&c, "Generation")? == "t 7");

    // A new version of top: the Sync that composes it removes the old image from the store
    // (the old generation's loop device keeps it readable until that generation stops).
    fs::write(work.path().join("top/top-only"), "top v2")?;
    let top2 = platform.publish(
        &registry.addr,
        "top",
        "2.0.0",
        &work.path().join("top"),
        &[],
    )?;
    let old_top_hex = top_hex;
    let top_hex = hex(&top2)?;
    ensure!(top_hex != old_top_hex, "a changed tree gives a new image");
    let g = mount_call(&c, "Sync", "")?;
    ensure!(g == "t 8", "{g}");
    ensure!(c.exec_ok(&["cat", "/run/powernode/root/top-only"])? == "top v2");
    for keep in [&base_hex, &top_hex] {
        c.exec_ok(&["test", "-f", &format!("/persist/cache/modules/{keep}")])?;
    }
    let old = c.exec(&[
        "test",
        "-e",
        &format!("/persist/cache/modules/{old_top_hex}"),
    ])?;
    ensure!(
        !old.status.success(),
        "the replaced image is still stored: {}",
        c.exec_ok(&["ls", "/persist/cache/modules"])?
    );

    // polkit: powernode may start/stop/restart units (the agent's tasks need that), but no
    // other verb; any other user may do nothing.
    for (user, method, sig, args) in [
        (
            "powernode",
            "KillUnit",
            "ssi",
            vec!["dbus.service", "all", "15"],
        ),
        ("nobody", "StopUnit", "ss", vec!["dbus.service", "replace"]),
        (
            "nobody",
            "StartUnit",
            "ss",
            vec!["systemd-journald.service", "replace"],
        ),
    ] {
        let group = if user == "nobody" { "nogroup" } else { user };
        let mut call = vec![
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            method,
            sig,
        ];
        call.extend(args.iter().copied());
        let out = busctl_as(&c, user, group, &call)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            // Our rule's NO is "Access denied"; polkit's default for everyone else is
            // auth_admin, which without an agent is "Interactive authentication required".
            !out.status.success()
                && (err.contains("Access denied")
                    || err.contains("Interactive authentication required")),
            "{user} may {method}: {}",
            powernode_integration_tests::describe(&out)
        );
    }

    // The root helper mounts only what a plan produces: from mountd's own uid, an arbitrary
    // What= or a place outside the composition is refused with the reason, and nothing is
    // mounted; another uid cannot even call it.
    let helper_call = |user: &str, group: &str, args: &[&str]| -> Result<std::process::Output> {
        let mut call = vec![
            "com.powernode.MountHelper1",
            "/com/powernode/MountHelper1",
            "com.powernode.MountHelper1",
        ];
        call.extend_from_slice(args);
        busctl_as(&c, user, group, &call)
    };
    let lower = format!("/run/powernode/mounts/lower/{}", "f".repeat(64));
    for (what, r#where, fstype, options, why) in [
        (
            "/dev/loop0",
            lower.as_str(),
            "erofs",
            "nosuid,nodev,ro",
            "is not where",
        ),
        ("tmpfs", "/etc", "tmpfs", "nosuid,nodev", "is not where"),
        ("proc", "/run/powernode/x", "proc", "", "never mounted"),
        (
            "/persist/var",
            "/run/powernode/root.gen/99/var",
            "none",
            "bind",
            "is not a mounted overlay",
        ),
    ] {
        let out = helper_call(
            "powernode-mount",
            "powernode",
            &[
                "StartMount",
                "sssssb",
                what,
                r#where,
                fstype,
                options,
                "probe",
                "false",
            ],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains(why),
            "helper accepted {what} at {where}: {}",
            powernode_integration_tests::describe(&out)
        );
    }
    let out = helper_call(
        "powernode-mount",
        "powernode",
        &["StopUnit", "s", "dbus.service"],
    )?;
    ensure!(!out.status.success(), "helper stopped dbus.service");
    let out = helper_call("nobody", "nogroup", &["StopUnit", "s", "dbus.service"])?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Access denied"),
        "{}",
        powernode_integration_tests::describe(&out)
    );
    let units = c.exec_ok(&[
        "systemctl",
        "list-units",
        "--type=mount",
        "--all",
        "--no-legend",
    ])?;
    ensure!(
        !units.contains("run-powernode-x") && !units.contains(&"f".repeat(64)),
        "a refused mount exists: {units}"
    );

    // Detach everything: units stopped in reverse order, target gone, loops released.
    // The CLI goes through mountd: `detach` composes without `top`; a module that is not
    // composed is NotFound (exit 1), not a mount failure.
    let out = c.exec(&["powernode-agent", "detach", "top", "--json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| powernode_integration_tests::describe(&out))?;
    ensure!(out.status.success() && v["union_mounted"] == true, "{v}");
    ensure!(v["generation"].as_u64().is_some(), "{v}");
    let out = c.exec(&["powernode-agent", "detach", "top", "--json"])?;
    ensure!(
        out.status.code() == Some(1),
        "{}",
        powernode_integration_tests::describe(&out)
    );
    mount_call(&c, "Detach", "base")?;
    ensure!(prop(&c, "UnionMounted")? == "b false");
    ensure!(mount_units(&c)?.is_empty(), "left: {:?}", mount_units(&c)?);
    let gone = c.exec(&["test", "-e", "/run/powernode/root"])?;
    ensure!(!gone.status.success(), "target still there");
    let sj: Value =
        serde_json::from_str(&c.exec_ok(&["cat", "/persist/var/lib/powernode/state.json"])?)?;
    ensure!(
        sj["union_mounted"] == false && sj["modules"] == serde_json::json!({}),
        "{sj}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = loops_backing(&[&base_hex, &top_hex]);
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "loop devices still attached: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The events reached the platform (fleeteventd, D-Bus activated inside, uploads them).
    for kind in ["module.attached", "module.detached"] {
        platform
            .wait_event(&instance, kind, Duration::from_secs(60))
            .with_context(|| {
                format!(
                    "fleeteventd journal:\n{}",
                    c.journal("powernode-fleeteventd.service")
                        .unwrap_or_default()
                )
            })?;
    }
    let journal = c.journal("powernode-mountd.service")?;
    ensure!(journal.contains("sandbox applied"), "{journal}");

    let off = c.poweroff()?;
    println!(
        "poweroff took {off:.1?}; whole test {:.1?}",
        started.elapsed()
    );
    ensure!(
        loops_backing(&[&base_hex, &top_hex]).is_empty(),
        "loops after poweroff"
    );
    Ok(())
}
