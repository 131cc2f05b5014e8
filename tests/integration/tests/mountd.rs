//! powernode-mountd on the host, on a private system bus with the real policy file: the paths
//! that end before anything would be mounted, so no systemd is needed. Real parts throughout —
//! Debian's docker-registry, the development platform publishing a signed module, a node
//! enrolled with the CLI, fleeteventd uploading the events to the platform.
//!
//! The mounting paths (systemd transient units, overlay, refresh, detach) are in
//! `mountd_systemd.rs`, under a real systemd in the nspawn container.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is the failure report

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use powernode_integration_tests::bus::{Caller, PrivateBus, busctl, is_access_denied};
use powernode_integration_tests::devplatform::DevPlatform;
use powernode_integration_tests::registry::Registry;
use powernode_integration_tests::{bin, describe, require_tool};
use serde_json::Value;

const NAME: &str = "com.powernode.Mount1";
const PATH: &str = "/com/powernode/Mount1";

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

struct Node {
    registry: Registry,
    platform: DevPlatform,
    bus: PrivateBus,
    instance: String,
    root: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Node {
    fn start() -> Result<Node> {
        for tool in ["mkfs.erofs", "fsverity", "busctl"] {
            require_tool(tool)?;
        }
        let registry = Registry::start()?;
        let platform = DevPlatform::start(&[])?;
        let bus = PrivateBus::start()?;
        let (root, instance) = platform.enrolled_node("pn-mountd-node-")?;
        let r = root.path();
        fs::create_dir_all(r.join("etc/powernode/trust"))?;
        fs::write(
            r.join("etc/powernode/agent.toml"),
            "[daemon]\nidle_exit_secs = 0\n",
        )?;
        let work = tempfile::Builder::new()
            .prefix("pn-mountd-work-")
            .tempdir()?;
        let rootfs = work.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc/hello"))?;
        fs::write(rootfs.join("etc/hello/hello.conf"), "greeting = hi\n")?;
        Ok(Node {
            registry,
            platform,
            bus,
            instance,
            root,
            work,
        })
    }

    fn publish_and_assign(&self, name: &str) -> Result<Value> {
        let rootfs = self.work.path().join("rootfs");
        let m = self
            .platform
            .publish(&self.registry.addr, name, "1.0.0", &rootfs, &[])?;
        self.platform.assign(&self.instance, name, &[])?;
        self.platform.pin_trusted_root(self.root.path())?;
        Ok(m)
    }

    fn spawn(&self, program: &str) -> Result<Daemon> {
        let log = self.root.path().join(format!("{program}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(bin(program)?)
            .arg("--root")
            .arg(self.root.path())
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        Ok(Daemon { child, log })
    }

    /// Waits until `name` is owned on the private bus.
    fn wait_name(&self, name: &str, daemon: &Daemon) -> Result<()> {
        let start = Instant::now();
        loop {
            let out = busctl(self.bus.address(), &Caller::root(), &["status", name])?;
            if out.status.success() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("{name} never appeared:\n{}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn state_json(&self) -> PathBuf {
        self.root
            .path()
            .join("persist/var/lib/powernode/state.json")
    }

    fn store_entries(&self) -> Vec<String> {
        fs::read_dir(self.root.path().join("persist/cache/modules"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Calls a Mount1 method as root; returns `Err((error name, message))` on a D-Bus error.
fn call(
    rt: &tokio::runtime::Runtime,
    address: &str,
    method: &str,
    arg: Option<&str>,
) -> Result<Result<String, (String, String)>> {
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(address).build().await?;
        let reply = match arg {
            Some(a) => {
                conn.call_method(Some(NAME), PATH, Some(NAME), method, &(a,))
                    .await
            }
            None => {
                conn.call_method(Some(NAME), PATH, Some(NAME), method, &())
                    .await
            }
        };
        Ok(match reply {
            Ok(m) => Ok(format!("{:?}", m.body().signature())),
            Err(zbus::Error::MethodError(name, msg, _)) => {
                Err((name.to_string(), msg.unwrap_or_default()))
            }
            Err(e) => return Err(anyhow::Error::from(e)),
        })
    })
}

fn property(node: &Node, prop: &str) -> Result<String> {
    let out = busctl(
        node.bus.address(),
        &Caller::root(),
        &["get-property", NAME, PATH, NAME, prop],
    )?;
    ensure!(
        out.status.success(),
        "get-property {prop}: {}",
        describe(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn tampered_module_is_refused_with_an_event_and_nothing_recorded() -> Result<()> {
    let node = Node::start()?;
    let m = node.publish_and_assign("hello")?;
    let digest = m["artifact"]["image_digest"].as_str().context("digest")?;
    let blob = node.registry.blob_path(digest)?;
    let mut bytes = fs::read(&blob)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&blob, &bytes)?;

    let events = node.spawn("powernode-fleeteventd")?;
    node.wait_name("com.powernode.FleetEvent1", &events)?;
    let mountd = node.spawn("powernode-mountd")?;
    node.wait_name(NAME, &mountd)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let started = Instant::now();
    let reply = call(&rt, node.bus.address(), "Attach", Some("hello"))?;
    println!("Attach(tampered) answered in {:.1?}", started.elapsed());
    let (name, msg) = match reply {
        Ok(r) => bail!("a tampered module was attached: {r}\n{}", mountd.log()),
        Err(e) => e,
    };
    ensure!(name == "com.powernode.Error.Crypto", "{name}: {msg}");
    ensure!(
        msg.contains("verification failed") && msg.to_lowercase().contains("digest"),
        "{msg}"
    );
    ensure!(
        !node.state_json().exists(),
        "state.json written after a refusal"
    );
    ensure!(
        node.store_entries().is_empty(),
        "store: {:?}",
        node.store_entries()
    );
    ensure!(property(&node, "UnionMounted")? == "b false");
    ensure!(property(&node, "Generation")? == "t 0");
    let last = property(&node, "LastError")?;
    ensure!(last.contains("verification failed"), "{last}");
    ensure!(property(&node, "Modules")? == "as 0");

    // The refusal reached the platform as a fleet event (through fleeteventd).
    let ev = node
        .platform
        .wait_event(&node.instance, "module.refused", Duration::from_secs(30))
        .with_context(|| format!("mountd:\n{}\nfleeteventd:\n{}", mountd.log(), events.log()))?;
    ensure!(ev["payload"]["name"] == "hello", "{ev}");
    ensure!(ev["severity"] == "error", "{ev}");

    // Sync fails closed the same way: one refused module, nothing changes.
    let reply = call(&rt, node.bus.address(), "Sync", None)?;
    ensure!(
        matches!(&reply, Err((n, _)) if n == "com.powernode.Error.Crypto"),
        "{reply:?}"
    );
    ensure!(!node.state_json().exists());

    // A module that is not assigned: NotFound, no event needed.
    let reply = call(&rt, node.bus.address(), "Attach", Some("nope"))?;
    ensure!(
        matches!(&reply, Err((n, _)) if n == "com.powernode.Error.NotFound"),
        "{reply:?}"
    );
    let reply = call(&rt, node.bus.address(), "Detach", Some("hello"))?;
    ensure!(
        matches!(&reply, Err((n, _)) if n == "com.powernode.Error.NotFound"),
        "detach of a module never attached: {reply:?}"
    );

    // Policy: a caller outside root/powernode may not call methods.
    let out = busctl(
        node.bus.address(),
        &Caller::nobody(),
        &["call", NAME, PATH, NAME, "Attach", "s", "hello"],
    )?;
    ensure!(is_access_denied(&out), "nobody: {}", describe(&out));
    Ok(())
}

#[test]
fn garbage_state_json_makes_mountd_refuse_changes() -> Result<()> {
    let node = Node::start()?;
    let state = node.state_json();
    fs::create_dir_all(state.parent().context("parent")?)?;
    let garbage = b"{\"schema_version\":1,\"modules\":{\"a\":{\"dig";
    fs::write(&state, garbage)?;
    let mountd = node.spawn("powernode-mountd")?;
    node.wait_name(NAME, &mountd)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for (method, arg) in [("Attach", Some("x")), ("Detach", Some("x")), ("Sync", None)] {
        let reply = call(&rt, node.bus.address(), method, arg)?;
        match reply {
            Err((name, msg)) => {
                ensure!(name == "com.powernode.Error.Malformed", "{method}: {name}");
                ensure!(msg.contains("state.json"), "{method}: {msg}");
            }
            Ok(r) => bail!("{method} succeeded with a torn state.json: {r}"),
        }
    }
    ensure!(property(&node, "LastError")?.contains("state.json"));
    ensure!(fs::read(&state)? == garbage, "the torn file was rewritten");
    Ok(())
}

/// What state.json records for module `m` (a `module publish` result), as mountd writes it.
fn record(m: &Value, name: &str) -> Result<Value> {
    Ok(serde_json::json!({
        "name": name,
        "digest": m["artifact"]["image_digest"].as_str().context("digest")?,
        "fsverity": m["artifact"]["fsverity_root_hash"].as_str().context("fsverity")?,
        "priority": 0,
        "mounted_at": "2026-01-01T00:00:00Z",
    }))
}

/// After a reboot state.json lists two modules, fetched and verified earlier, and nothing is
/// mounted. Before mountd mounts the remaining one for a Detach, it checks that image again
/// from the store: a store image rewritten while the node was down, or a state.json record
/// pointing at another image, is refused with a `module.refused` event and never mounted
/// (without systemd here, a mount attempt would be a bus error, not `Crypto`).
#[test]
fn rewritten_store_image_or_state_json_is_refused_before_any_mount() -> Result<()> {
    let node = Node::start()?;
    let hello = node.publish_and_assign("hello")?;
    fs::write(
        node.work.path().join("rootfs/etc/hello/world"),
        "another image\n",
    )?;
    let world = node.publish_and_assign("world")?;
    // Both images fetched, verified and kept in the store with their bundles.
    let out = powernode_integration_tests::run(
        Command::new(bin("powernode-agent")?)
            .args(["update", "--json", "--root"])
            .arg(node.root.path()),
    )?;
    ensure!(out.status.success(), "update: {}", describe(&out));
    let (hello_id, world_id) = (
        hello["id"].as_str().context("id")?,
        world["id"].as_str().context("id")?,
    );
    let write_state = |world_rec: Value| -> Result<()> {
        let state = serde_json::json!({
            "schema_version": 1,
            "modules": {hello_id: record(&hello, "hello")?, world_id: world_rec},
            "union_mounted": true,
            "generation": 1,
        });
        fs::create_dir_all(node.state_json().parent().context("parent")?)?;
        fs::write(node.state_json(), serde_json::to_vec_pretty(&state)?)?;
        Ok(())
    };
    let world_digest = world["artifact"]["image_digest"]
        .as_str()
        .context("digest")?;
    let world_image = node
        .root
        .path()
        .join("persist/cache/modules")
        .join(world_digest.trim_start_matches("sha256:"));
    let good = fs::read(&world_image)?;
    let mut bad = good.clone();
    bad[0] ^= 0xff;

    let events = node.spawn("powernode-fleeteventd")?;
    node.wait_name("com.powernode.FleetEvent1", &events)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // 1. The store image rewritten while the node was down.
    write_state(record(&world, "world")?)?;
    fs::write(&world_image, &bad)?;
    let state_before = fs::read(node.state_json())?;
    {
        let mountd = node.spawn("powernode-mountd")?;
        node.wait_name(NAME, &mountd)?;
        let reply = call(&rt, node.bus.address(), "Detach", Some("hello"))?;
        let (name, msg) = match reply {
            Ok(r) => bail!("detached over a rewritten image: {r}\n{}", mountd.log()),
            Err(e) => e,
        };
        ensure!(
            name == "com.powernode.Error.Crypto",
            "{name}: {msg}\n{}",
            mountd.log()
        );
        ensure!(
            msg.contains("module world") && msg.contains("rewritten"),
            "{msg}"
        );
        ensure!(
            fs::read(node.state_json())? == state_before,
            "state.json changed"
        );
        let ev = node
            .platform
            .wait_event(&node.instance, "module.refused", Duration::from_secs(30))
            .with_context(|| {
                format!("mountd:\n{}\nfleeteventd:\n{}", mountd.log(), events.log())
            })?;
        ensure!(
            ev["payload"]["name"] == "world" && ev["payload"]["stored"] == true,
            "{ev}"
        );
    }

    // 2. The image intact, but state.json's record for world names hello's image (which is in
    //    the store, signed, but never for module world).
    fs::write(&world_image, &good)?;
    let mut forged = record(&world, "world")?;
    forged["digest"] = hello["artifact"]["image_digest"].clone();
    forged["fsverity"] = hello["artifact"]["fsverity_root_hash"].clone();
    write_state(forged)?;
    let mountd = node.spawn("powernode-mountd")?;
    node.wait_name(NAME, &mountd)?;
    let reply = call(&rt, node.bus.address(), "Detach", Some("hello"))?;
    let (name, msg) = match reply {
        Ok(r) => bail!("detached over a forged state.json: {r}\n{}", mountd.log()),
        Err(e) => e,
    };
    ensure!(name == "com.powernode.Error.Crypto", "{name}: {msg}");
    ensure!(msg.contains("no signature bundle stored"), "{msg}");
    Ok(())
}

/// mountd must not exit idle in the middle of a call: with `idle_exit_secs = 2` and a platform
/// that accepts the connection and never answers, a `Sync` keeps the daemon up (on the bus,
/// the call still running) well past the idle limit, and it fails with the platform's reason
/// instead of "recipient disconnected without replying".
#[test]
fn a_slow_call_keeps_mountd_from_exiting_idle() -> Result<()> {
    let mut node = Node::start()?;
    fs::write(
        node.root.path().join("etc/powernode/agent.toml"),
        "[daemon]\nidle_exit_secs = 2\n",
    )?;
    // The platform goes quiet: its port now accepts and never says a word.
    let addr = node
        .platform
        .url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .context("platform address")?
        .to_string();
    node.platform.stop()?;
    let silent = std::net::TcpListener::bind(&addr)?;
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            keep.lock().map(|mut v| v.push(s)).ok();
        }
    });
    let mut mountd = node.spawn("powernode-mountd")?;
    node.wait_name(NAME, &mountd)?;
    let address = node.bus.address().to_string();
    let call = std::thread::spawn(move || {
        busctl(
            &address,
            &Caller::root(),
            &["--timeout=120", "call", NAME, PATH, NAME, "Sync"],
        )
    });
    std::thread::sleep(Duration::from_secs(6));
    ensure!(
        mountd.child.try_wait()?.is_none(),
        "mountd exited in the middle of Sync:\n{}",
        mountd.log()
    );
    ensure!(!call.is_finished(), "Sync ended early:\n{}", mountd.log());
    drop(held);
    Ok(())
}
