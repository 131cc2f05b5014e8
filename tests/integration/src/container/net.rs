//! The container's network: a network namespace of its own, made before nspawn starts and
//! joined with `--network-namespace-path`, so nothing the suite does inside can reach past it.
//!
//! - `lo` carries 127.0.0.1 and the link-local metadata address 169.254.169.254, where a
//!   test-owned listener answers every request 404 and records it
//!   ([`NetworkGuard::metadata_requests`]): identityd's cloud probes stay in the namespace.
//! - The loopback ports this test process and its children listen on when the container boots
//!   (the devplatform, the registry) are forwarded: a listener on the same 127.0.0.1 port inside
//!   relays each connection to the host's 127.0.0.1. Servers started after the boot are not.
//! - Default routes (IPv4 and IPv6) point at `lo`, so a connection to any other address is routed
//!   and meets the nft table `inet powernode_guard`: its destination is recorded in a set, the
//!   packet counted and rejected. Nothing leaves the namespace, and [`NetworkGuard::leaks`] says
//!   what was attempted; `Container::poweroff` fails if anything was.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::CloneFlags;

use crate::{describe, require_tool, run, run_ok};

/// The nft table that records and rejects traffic leaving the namespace.
const GUARD_TABLE: &str = "powernode_guard";
/// Its two sets of attempted destinations.
const LEAK_SETS: [&str; 2] = ["leaked4", "leaked6"];
/// The cloud metadata address, served inside the namespace by the recorder.
pub const METADATA_ADDR: &str = "169.254.169.254";
/// How often the accept loops look at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// A metadata request head larger than this is cut (the recorder wants the request line).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Loopback and the recorder's address pass; TCP and UDP to anything else are recorded, counted
/// and rejected (a reject, not a drop: a client fails at once instead of waiting for timeouts).
fn guard_ruleset() -> String {
    format!(
        "table inet {GUARD_TABLE} {{
    set leaked4 {{ type ipv4_addr; flags dynamic; }}
    set leaked6 {{ type ipv6_addr; flags dynamic; }}
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr {{ 127.0.0.0/8, {METADATA_ADDR} }} accept
        ip6 daddr ::1 accept
        meta l4proto {{ tcp, udp }} meta nfproto ipv4 add @leaked4 {{ ip daddr }} counter reject
        meta l4proto {{ tcp, udp }} meta nfproto ipv6 add @leaked6 {{ ip6 daddr }} counter reject
    }}
}}
"
    )
}

/// A container's network namespace with its guard, recorder and forwarders; removed on drop.
#[derive(Debug)]
pub struct NetworkGuard {
    name: String,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    metadata: Arc<Mutex<Vec<String>>>,
    forwarded: Vec<u16>,
}

impl NetworkGuard {
    /// Creates the namespace `powernode-test-<container>` with its routes, guard, metadata
    /// recorder and the forwarders for the loopback ports listened on now.
    pub fn create(container: &str) -> Result<NetworkGuard> {
        for tool in ["ip", "nft", "nsenter"] {
            require_tool(tool)?;
        }
        let name = format!("powernode-test-{container}");
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let mut guard = NetworkGuard {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            stop: Arc::default(),
            threads: Vec::new(),
            metadata: Arc::default(),
            forwarded: Vec::new(),
        };
        guard.configure()?;
        Ok(guard)
    }

    fn configure(&mut self) -> Result<()> {
        let n = self.name.clone();
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{METADATA_ADDR}/32"), "dev", "lo"],
            vec!["route", "add", "default", "dev", "lo"],
            vec!["-6", "route", "add", "default", "dev", "lo"],
        ] {
            run_ok(Command::new("ip").args(["-n", &n]).args(&args))?;
        }
        let mut nft = Command::new("nsenter");
        nft.arg(format!("--net={}", self.path.display()))
            .args(["nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = nft.spawn().context("spawning nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(guard_ruleset().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("loading the guard ruleset:\n{}", describe(&out));
        }

        let metadata = self.bind(format!("{METADATA_ADDR}:80").parse()?)?;
        let (stop, log) = (self.stop.clone(), self.metadata.clone());
        self.threads.push(std::thread::spawn(move || {
            accept_loop(metadata, &stop, |s| record_metadata(s, &log))
        }));
        for port in loopback_ports_of_this_test()? {
            let inside = self.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
            let stop = self.stop.clone();
            self.threads.push(std::thread::spawn(move || {
                accept_loop(inside, &stop, |s| {
                    std::thread::spawn(move || relay(s, port));
                })
            }));
            self.forwarded.push(port);
        }
        Ok(())
    }

    /// A listener bound inside the namespace: a short-lived thread joins the namespace (only
    /// that thread moves) and binds; the socket stays in the namespace it was made in.
    fn bind(&self, addr: SocketAddr) -> Result<TcpListener> {
        let ns = File::open(&self.path).with_context(|| format!("{}", self.path.display()))?;
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
            TcpListener::bind(addr).with_context(|| format!("binding {addr} in the netns"))
        })
        .join()
        .map_err(|_| anyhow!("the netns bind thread panicked"))??;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// The namespace file to give nspawn (`--network-namespace-path=`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loopback ports relayed to the host.
    pub fn forwarded_ports(&self) -> &[u16] {
        &self.forwarded
    }

    /// What reached the metadata recorder: `"METHOD /path"` per request.
    pub fn metadata_requests(&self) -> Vec<String> {
        self.metadata
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Destinations outside the namespace that something inside tried to reach.
    pub fn leaks(&self) -> Result<Vec<String>> {
        let out = run_ok(
            Command::new("nsenter")
                .arg(format!("--net={}", self.path.display()))
                .args(["nft", "-j", "list", "table", "inet", GUARD_TABLE]),
        )?;
        let doc: serde_json::Value =
            serde_json::from_str(&out).context("parsing `nft -j list table`")?;
        let mut leaks = Vec::new();
        for item in doc["nftables"].as_array().into_iter().flatten() {
            let set = &item["set"];
            if !LEAK_SETS.contains(&set["name"].as_str().unwrap_or_default()) {
                continue;
            }
            for e in set["elem"].as_array().into_iter().flatten() {
                // A plain address, or `{"elem": {"val": …}}` when the kernel adds details.
                let v = e.as_str().or_else(|| e["elem"]["val"].as_str());
                leaks.push(v.map_or_else(|| e.to_string(), str::to_string));
            }
        }
        Ok(leaks)
    }

    /// Fails, naming the destinations, if anything inside tried to leave the namespace.
    pub fn ensure_no_leaks(&self) -> Result<()> {
        let leaks = self.leaks()?;
        if !leaks.is_empty() {
            bail!(
                "the container tried to reach addresses outside its network namespace: {}",
                leaks.join(", ")
            );
        }
        Ok(())
    }

    /// Forgets the recorded destinations (after a test provoked one on purpose).
    pub fn clear_leaks(&self) -> Result<()> {
        for set in LEAK_SETS {
            run_ok(
                Command::new("nsenter")
                    .arg(format!("--net={}", self.path.display()))
                    .args(["nft", "flush", "set", "inet", GUARD_TABLE, set]),
            )?;
        }
        Ok(())
    }
}

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("netns {}: an accept thread panicked", self.name);
            }
        }
        match run(Command::new("ip").args(["netns", "del", &self.name])) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("ip netns del {}:\n{}", self.name, describe(&out)),
            Err(e) => eprintln!("ip netns del {}: {e:#}", self.name),
        }
    }
}

/// Accepts until `stop`; each connection goes to `each` (blocking mode restored).
fn accept_loop(listener: TcpListener, stop: &AtomicBool, mut each: impl FnMut(TcpStream)) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => match s.set_nonblocking(false) {
                Ok(()) => each(s),
                Err(e) => eprintln!("netns accept: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                eprintln!("netns accept: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Reads one request head, records its request line, answers 404 and closes.
fn record_metadata(mut s: TcpStream, log: &Mutex<Vec<String>>) {
    if let Err(e) = s.set_read_timeout(Some(Duration::from_secs(2))) {
        eprintln!("metadata recorder: {e}");
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line: Vec<&str> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .take(2)
        .collect();
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(line.join(" "));
    if let Err(e) =
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    {
        eprintln!("metadata recorder: {e}");
    }
}

/// Copies both ways between a connection made inside and the host's 127.0.0.1:`port`.
fn relay(inside: TcpStream, port: u16) {
    let outside = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("netns forwarder: 127.0.0.1:{port}: {e}");
            return;
        }
    };
    let (mut in_r, mut out_w) = match (inside.try_clone(), outside.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            eprintln!("netns forwarder: {:?} {:?}", a.err(), b.err());
            return;
        }
    };
    let up = std::thread::spawn(move || pipe(&mut in_r, &mut out_w, port));
    let (mut out_r, mut in_w) = (outside, inside);
    pipe(&mut out_r, &mut in_w, port);
    if up.join().is_err() {
        eprintln!("netns forwarder: copy thread panicked");
    }
}

/// One direction of a relay; the end of the copy half-closes the other side.
fn pipe(from: &mut TcpStream, to: &mut TcpStream, port: u16) {
    // A reset when the container goes down ends the copy like an orderly close.
    if let Err(e) = std::io::copy(from, to)
        && e.kind() != std::io::ErrorKind::ConnectionReset
    {
        eprintln!("netns forwarder {port}: {e}");
    }
    if let Err(e) = to.shutdown(Shutdown::Write)
        && e.kind() != std::io::ErrorKind::NotConnected
    {
        eprintln!("netns forwarder {port}: shutdown: {e}");
    }
}

/// The 127.0.0.1 (or any-address) TCP ports that this process or one of its descendants
/// listens on: the servers a container test started for the node inside to reach.
fn loopback_ports_of_this_test() -> Result<Vec<u16>> {
    let mut inodes = std::collections::HashSet::new();
    let mut pids = vec![std::process::id()];
    while let Some(pid) = pids.pop() {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path())
                    && let Some(inode) = target
                        .to_str()
                        .and_then(|t| t.strip_prefix("socket:["))
                        .and_then(|t| t.strip_suffix(']'))
                {
                    inodes.insert(inode.to_string());
                }
            }
        }
        // A process may exit while we look; what is gone listens on nothing.
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").context("/proc/net/tcp")?;
    let mut ports = Vec::new();
    // `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …`
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
            continue;
        };
        const LISTEN: &str = "0A";
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        // Little-endian hex: 0100007F is 127.0.0.1, 00000000 the any-address.
        if *state == LISTEN
            && (addr == "0100007F" || addr == "00000000")
            && inodes.contains(*inode)
            && let Ok(p) = u16::from_str_radix(port, 16)
            && !ports.contains(&p)
        {
            ports.push(p);
        }
    }
    ports.sort_unstable();
    Ok(ports)
}
