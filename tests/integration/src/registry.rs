//! Debian's `docker-registry` (distribution 2.8) on 127.0.0.1:<free port>, storage in a private
//! temporary directory (shared/harness.md §5). Fails loudly when the binary is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        let bin = crate::require_tool("docker-registry")
            .context("docker-registry is required (apt package docker-registry)")?;
        let dir = tempfile::Builder::new().prefix("pn-registry-").tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {addr}}}\nhealth: {{storagedriver: {{enabled: false}}}}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        let mut reg = Registry {
            child: Some(child),
            dir,
            addr,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("docker-registry exited ({st}):\n{}", self.log());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "docker-registry not listening on {} after 10 s:\n{}",
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The file holding blob `sha256:<hex>` in the registry's filesystem storage.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("not a sha256 digest: {digest}"))?;
        let p = self
            .data_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        if !p.is_file() {
            bail!(
                "blob {digest} not in the registry storage ({})",
                p.display()
            );
        }
        Ok(p)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// A TCP forwarder in front of a registry that cuts every connection after `cut` bytes from the
/// registry: a download larger than that is interrupted (again and again), which is what an
/// unreliable network does to a big blob. Runs until dropped with the test process.
pub struct CuttingProxy {
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// Connections cut so far.
    pub cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    pub fn start(target: &str, cut: usize) -> Result<CuttingProxy> {
        use std::io::{Read as _, Write as _};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (target, counter) = (target.to_string(), cuts.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                // client → registry: unlimited.
                std::thread::spawn(move || std::io::copy(&mut c_in, &mut s_out));
                let counter = counter.clone();
                let (mut s_in, mut c_out) = (server, client);
                // registry → client: at most `cut` bytes, then both sides are shut.
                std::thread::spawn(move || {
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = n.min(cut - sent);
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                        if sent >= cut {
                            counter.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                    for s in [&c_out, &s_in] {
                        if let Err(e) = s.shutdown(std::net::Shutdown::Both) {
                            eprintln!("cutting proxy: shutdown: {e}");
                        }
                    }
                });
            }
        });
        Ok(CuttingProxy { addr, cuts })
    }
}
