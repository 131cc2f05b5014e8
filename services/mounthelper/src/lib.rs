//! powernode-mount-helper: the root side of module composition, on
//! `com.powernode.MountHelper1`.
//!
//! mountd (user powernode-mount) talks to the platform and the registry and holds no grant that
//! reaches root; it asks this helper for each mount of a composition plan. The helper runs as
//! root with CAP_SYS_ADMIN (systemd creates mount units for such a caller without polkit) and
//! CAP_DAC_READ_SEARCH only, without network, and does what
//! `powernode::mounthelper::check_mount` accepts: EROFS lowers of stored images whose content it
//! has checked, upper tmpfs, overlays of mounted lowers, the /persist/var bind — at the places
//! the node's own configuration names. Callers other than root and powernode-mount are refused
//! here as well as by the D-Bus policy. D-Bus activated; exits when idle.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use powernode::bus::BusError;
use powernode::config::Config;
use powernode::mount::Layout;
use powernode::mounthelper::{self, BUS_NAME, CALLER_USER, OBJECT_PATH, Policy};
use powernode::paths::Paths;
use powernode::sandbox::Profile;
use powernode::systemd::{self, IdleTracker, TransientMount};

#[derive(Debug, Parser)]
#[command(
    name = "powernode-mount-helper",
    version,
    about = "Mounts module compositions for powernode-mountd (com.powernode.MountHelper1)"
)]
pub struct Args {
    /// Node root: the store, the mount places and the configuration are taken under it.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// The composed root mountd links (its `--target`): overlays go to `<target>.gen/<n>`.
    #[arg(long, default_value = powernode::mount::DEFAULT_TARGET)]
    pub target: PathBuf,
}

struct Helper {
    paths: Paths,
    layout: Layout,
    /// uid of powernode-mount, when that user exists.
    mountd_uid: Option<u32>,
    idle: IdleTracker,
}

impl Helper {
    /// The caller's uid and primary gid; refused unless root or mountd's user.
    async fn caller(
        &self,
        conn: &zbus::Connection,
        header: &zbus::message::Header<'_>,
    ) -> Result<(u32, u32), BusError> {
        let refuse = |why: String| BusError::Refused(why);
        let sender = header
            .sender()
            .ok_or_else(|| refuse("a call without a sender".into()))?;
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| BusError::Bus(e.to_string()))?;
        let name = zbus::names::BusName::from(sender.to_owned());
        let creds = dbus
            .get_connection_credentials(name)
            .await
            .map_err(|e| BusError::Bus(e.to_string()))?;
        let uid = creds
            .unix_user_id()
            .ok_or_else(|| refuse("caller credentials without a uid".into()))?;
        if uid != 0 && Some(uid) != self.mountd_uid {
            return Err(refuse(format!(
                "uid {uid} may not compose modules (only root and {CALLER_USER})"
            )));
        }
        let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or(uid, |u| u.gid.as_raw());
        Ok((uid, gid))
    }

    fn policy(&self, caller: (u32, u32)) -> Policy {
        Policy {
            layout: self.layout.clone(),
            store: self.paths.under(powernode::oci::STORE_DIR),
            caller,
        }
    }
}

#[zbus::interface(name = "com.powernode.MountHelper1")]
impl Helper {
    #[allow(clippy::too_many_arguments)]
    async fn start_mount(
        &self,
        what: String,
        r#where: String,
        fstype: String,
        options: String,
        description: String,
        lazy_unmount: bool,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(String, bool), BusError> {
        self.idle.touch();
        let caller = self.caller(conn, &header).await?;
        let m = TransientMount {
            what,
            r#where,
            fstype,
            options,
            description,
            lazy_unmount,
        };
        let policy = self.policy(caller);
        // A lower's check reads the whole image: not on the bus task.
        let checked = {
            let m = m.clone();
            tokio::task::spawn_blocking(move || mounthelper::check_mount(&policy, &m))
                .await
                .map_err(|e| BusError::Bus(e.to_string()))?
        };
        let checked = match checked {
            Ok(c) => c,
            Err(refusal) => {
                tracing::warn!(caller = caller.0, r#where = %m.r#where, reason = %refusal, "mount refused");
                return Err(BusError::Refused(refusal.to_string()));
            }
        };
        tracing::info!(caller = caller.0, r#where = %m.r#where, checked = ?checked, "mounting");
        let r = systemd::start_mount(conn, &m, systemd::JOB_TIMEOUT)
            .await
            .map_err(BusError::from);
        self.idle.touch();
        r
    }

    async fn stop_unit(
        &self,
        unit: String,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), BusError> {
        self.idle.touch();
        let caller = self.caller(conn, &header).await?;
        if let Err(refusal) = mounthelper::check_stop(&self.policy(caller), &unit) {
            tracing::warn!(caller = caller.0, unit = %unit, reason = %refusal, "stop refused");
            return Err(BusError::Refused(refusal.to_string()));
        }
        let r = systemd::stop_unit(conn, &unit, systemd::JOB_TIMEOUT)
            .await
            .map_err(BusError::from);
        self.idle.touch();
        r
    }
}

pub async fn run(paths: Paths, cfg: Config, target: PathBuf) -> anyhow::Result<()> {
    let idle = IdleTracker::new(cfg.daemon.idle_exit_secs);
    let mountd_uid = nix::unistd::User::from_name(CALLER_USER)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    if mountd_uid.is_none() {
        tracing::warn!(user = CALLER_USER, "no such user: only root may call");
    }
    let layout = Layout::new(&paths, Some(&target));
    let helper = Helper {
        paths,
        layout,
        mountd_uid,
        idle: idle.clone(),
    };
    let _conn = zbus::connection::Builder::system()
        .name(BUS_NAME)
        .serve_at(OBJECT_PATH, helper)
        .build()
        .await
        .with_context(|| format!("owning {BUS_NAME} on the system bus"))?;
    powernode::daemon::serve_until_idle(&idle, "serving com.powernode.MountHelper1").await?;
    Ok(())
}

/// The whole process: arguments, logging, sandbox, runtime. Shared by `main.rs` and the
/// `powernode-agent` multicall binary.
pub fn entry(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(argv);
    powernode::daemon::main(
        "powernode-mount-helper",
        args.root.as_deref(),
        |paths| -> anyhow::Result<ExitCode> {
            let cfg = Config::load(&paths)?;
            let rt = powernode::daemon::start(Profile::MountHelper, &paths)?;
            rt.block_on(run(paths, cfg, args.target))?;
            Ok(ExitCode::SUCCESS)
        },
    )
}
