//! The in-process sandbox every daemon applies at start, before its runtime spawns threads (so
//! every thread inherits it): capabilities trimmed to the profile's, a Landlock ruleset limiting
//! the filesystem to the profile's paths, and a seccomp filter refusing syscalls no daemon of the
//! suite has business making. It complements the unit's own sandbox (systemd's directives) and
//! protects `--root` runs and the initramfs, where no unit applies.
//!
//! Landlock is applied best-effort (older kernels enforce a subset; the report says which ABI
//! was effective); seccomp is enforced everywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, path_beneath_rules,
};
use nix::libc;

use crate::paths::Paths;
use crate::{Error, Result};

/// One profile per daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Identity,
    Enroll,
    Cert,
    Agent,
    Events,
    Mount,
    /// powernode-mount-helper: root, no network, reads the store and asks systemd to mount.
    MountHelper,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Identity => "identity",
            Profile::Enroll => "enroll",
            Profile::Cert => "cert",
            Profile::Agent => "agent",
            Profile::Events => "events",
            Profile::Mount => "mount",
            Profile::MountHelper => "mount-helper",
        }
    }

    /// Capabilities the daemon keeps (its unit grants no more).
    pub fn keep_caps(self) -> Vec<caps::Capability> {
        match self {
            // fw-cfg and DMI files are root-only 0400.
            Profile::Identity => vec![caps::Capability::CAP_DAC_READ_SEARCH],
            // systemd lets a caller with CAP_SYS_ADMIN create mount units without asking polkit;
            // CAP_DAC_READ_SEARCH reads the store's 0600 images to check their digests. The
            // helper never mounts by itself (seccomp refuses it).
            Profile::MountHelper => vec![
                caps::Capability::CAP_SYS_ADMIN,
                caps::Capability::CAP_DAC_READ_SEARCH,
            ],
            // mountd asks the helper to mount; it keeps no capability at all.
            Profile::Enroll | Profile::Cert | Profile::Agent | Profile::Events | Profile::Mount => {
                Vec::new()
            }
        }
    }
}

/// Syscalls refused (EPERM) in every profile: mounting, namespaces, tracing, kernel modules and
/// images, raw kernel interfaces, clock and swap changes.
pub const DENIED_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_personality, "personality"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_mknod, "mknod"),
    (libc::SYS_mknodat, "mknodat"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
];

/// The filesystem view of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct FsRules {
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
    /// Directories holding sockets the daemon connects to (D-Bus, journald, sd_notify).
    pub sockets: Vec<PathBuf>,
}

impl FsRules {
    pub fn for_profile(profile: Profile, paths: &Paths) -> FsRules {
        // Shared: libraries and NSS modules, /etc for resolver and TLS settings, kernel facts.
        let mut read: Vec<PathBuf> = [
            "/usr",
            "/lib",
            "/lib64",
            "/etc",
            "/proc",
            "/sys",
            "/dev/urandom",
            "/dev/null",
        ]
        .into_iter()
        .map(PathBuf::from)
        .collect();
        for d in paths.config_dirs() {
            read.push(d);
        }
        let mut write = Vec::new();
        match profile {
            Profile::Identity => {
                // The node's kernel interfaces under its root (the same /proc and /sys in
                // production): cmdline, fw-cfg, DMI, network addresses, hostname.
                read.push(paths.under("/proc"));
                read.push(paths.under("/sys"));
                read.push(paths.under("/boot"));
                read.push(paths.under("/etc"));
                read.push(paths.state_dir());
                read.push(paths.run_dir());
                write.push(paths.identity_run_dir());
            }
            Profile::Enroll | Profile::Cert => {
                read.push(paths.run_dir());
                write.push(paths.state_dir());
            }
            Profile::Agent => {
                read.push(paths.run_dir());
                write.push(paths.state_dir());
                write.push(paths.under(crate::systemd1::TASKS_RUN_DIR));
            }
            // Reads the PKI (under the state dir) for uploads; writes only its queue.
            Profile::Events => {
                read.push(paths.state_dir());
                write.push(paths.state_dir().join("events"));
            }
            // state.json (state dir), the module store it pulls into (and its fs-verity
            // bindings), and /run/powernode where it links the target and creates the
            // overlay's upper/work directories.
            // Reads images (digests) and checks mount points; writes nothing.
            Profile::MountHelper => {
                read.push(paths.under(crate::oci::STORE_DIR));
                read.push(paths.run_dir());
            }
            Profile::Mount => {
                write.push(paths.state_dir());
                write.push(paths.under(crate::oci::STORE_DIR));
                write.push(paths.under(crate::oci::VERITY_BINDINGS_DIR));
                write.push(paths.run_dir());
            }
        }
        read.sort();
        read.dedup();
        FsRules {
            read,
            write,
            sockets: vec!["/run/dbus".into(), "/run/systemd".into()],
        }
    }
}

/// What was enforced, for the start-up log line.
#[derive(Debug, Clone)]
pub struct Report {
    pub profile: &'static str,
    pub landlock: String,
    pub seccomp_denied: usize,
}

/// Apply `profile`: capabilities, then Landlock, then seccomp. Call before spawning threads.
pub fn apply(profile: Profile, paths: &Paths) -> Result<Report> {
    // No core dump and no same-uid ptrace or /proc/<pid>/mem: the process holds the node key,
    // the JWT or a token.
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Sandbox(format!("PR_SET_DUMPABLE: {e}")))?;
    drop_caps(&profile.keep_caps())?;
    let landlock = apply_landlock(&FsRules::for_profile(profile, paths))?;
    apply_seccomp()?;
    Ok(Report {
        profile: profile.name(),
        landlock,
        seccomp_denied: DENIED_SYSCALLS.len(),
    })
}

fn drop_caps(keep: &[caps::Capability]) -> Result<()> {
    use caps::CapSet;
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    let err = |e: caps::errors::CapsError| Error::Sandbox(format!("capabilities: {e}"));
    let permitted = caps::read(None, CapSet::Permitted).map_err(err)?;
    let kept: caps::CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::set(None, CapSet::Inheritable, &caps::CapsHashSet::new()).map_err(err)?;
    caps::set(None, CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err)?;
    Ok(())
}

fn existing(paths: &[PathBuf]) -> Vec<PathBuf> {
    // A rule needs an open fd; absent paths simply stay inaccessible.
    paths.iter().filter(|p| p.exists()).cloned().collect()
}

fn apply_landlock(rules: &FsRules) -> Result<String> {
    let abi = ABI::V10;
    let err = |e: landlock::RulesetError| Error::Sandbox(format!("landlock: {e}"));
    let read = AccessFs::from_read(abi);
    let write = AccessFs::from_all(abi);
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.read), read))
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.write), write))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(&rules.sockets),
            read | AccessFs::ResolveUnix,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".to_string(),
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel ABI)".to_string(),
        RulesetStatus::NotEnforced => "not enforced (kernel without Landlock)".to_string(),
    })
}

fn apply_seccomp() -> Result<()> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .map(|(nr, _)| (*nr, Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| Error::Sandbox(format!("seccomp: {e}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| Error::Sandbox(format!("seccomp: {e}")))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Sandbox(format!("seccomp: {e}")))?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Sandbox(format!("seccomp: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::ErrorKind;

    /// Apply a profile in a fresh thread (Landlock and seccomp here are per-thread) and run probes.
    fn in_sandbox<T: Send + 'static>(
        profile: Profile,
        paths: Paths,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            apply(profile, &paths).expect("apply sandbox");
            f()
        })
        .join()
        .expect("sandboxed thread panicked")
    }

    fn node() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path());
        for dir in [
            p.run_dir(),
            p.identity_run_dir(),
            p.pki_dir(),
            p.under("/secret"),
            p.under(crate::oci::STORE_DIR),
        ] {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(p.under("/secret/file"), "x").unwrap();
        (d, p)
    }

    fn errno_of(r: nix::Result<()>) -> Option<nix::errno::Errno> {
        r.err()
    }

    fn mount_probe() -> Option<nix::errno::Errno> {
        errno_of(nix::mount::mount(
            Some("none"),
            "/tmp",
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ))
    }

    #[test]
    fn identity_profile_denies_pki_writes_and_mount() {
        let (_d, p) = node();
        let pki = p.pki_dir();
        let run = p.run_dir();
        let id_json = p.identity_json();
        let (write_pki, write_run, write_shared, mnt, ptrace) =
            in_sandbox(Profile::Identity, p, move || {
                (
                    fs::write(pki.join("node.key"), "x").map_err(|e| e.kind()),
                    fs::write(&id_json, "{}").map_err(|e| e.kind()),
                    fs::write(run.join("agent.toml"), "").map_err(|e| e.kind()),
                    mount_probe(),
                    errno_of(nix::sys::ptrace::attach(nix::unistd::Pid::from_raw(1))),
                )
            });
        assert_eq!(
            write_shared,
            Err(ErrorKind::PermissionDenied),
            "identityd writes only its own runtime directory"
        );
        assert_eq!(
            write_pki,
            Err(ErrorKind::PermissionDenied),
            "identityd must not write the PKI dir"
        );
        assert_eq!(write_run, Ok(()), "identityd writes its cache");
        assert_eq!(mnt, Some(nix::errno::Errno::EPERM));
        assert_eq!(ptrace, Some(nix::errno::Errno::EPERM));
    }

    #[test]
    fn enroll_profile_writes_pki_only() {
        let (_d, p) = node();
        let pki = p.pki_dir();
        let run = p.run_dir();
        let secret = p.under("/secret/file");
        let (w_pki, w_run, r_secret, unshare) = in_sandbox(Profile::Enroll, p, move || {
            (
                fs::write(pki.join("node.key"), "x").map_err(|e| e.kind()),
                fs::write(run.join("identity/identity.json"), "{}").map_err(|e| e.kind()),
                fs::read(&secret).map_err(|e| e.kind()),
                errno_of(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)),
            )
        });
        assert_eq!(w_pki, Ok(()));
        assert_eq!(
            w_run,
            Err(ErrorKind::PermissionDenied),
            "enrolld only reads /run/powernode"
        );
        assert_eq!(r_secret.unwrap_err(), ErrorKind::PermissionDenied);
        assert_eq!(unshare, Some(nix::errno::Errno::EPERM));
    }

    #[test]
    fn agent_profile_reads_proc_but_not_other_trees() {
        let (_d, p) = node();
        let secret = p.under("/secret/file");
        let (r_proc, r_secret, w_tmp, kexec) = in_sandbox(Profile::Agent, p, move || {
            (
                fs::read_to_string("/proc/loadavg")
                    .map(|_| ())
                    .map_err(|e| e.kind()),
                fs::read(&secret).map(|_| ()).map_err(|e| e.kind()),
                fs::write("/tmp/powernode-sandbox-probe", "x").map_err(|e| e.kind()),
                errno_of(nix::sys::reboot::set_cad_enabled(false)),
            )
        });
        assert_eq!(r_proc, Ok(()));
        assert_eq!(r_secret, Err(ErrorKind::PermissionDenied));
        assert_eq!(w_tmp, Err(ErrorKind::PermissionDenied));
        assert_eq!(
            kexec,
            Some(nix::errno::Errno::EPERM),
            "reboot(2) is refused"
        );
    }

    #[test]
    fn mount_profile_writes_state_store_and_run_but_cannot_mount() {
        let (_d, p) = node();
        let state = p.state_dir().join("state.json");
        let store = p.under(crate::oci::STORE_DIR).join("blob");
        let run = p.run_dir().join("root");
        let secret = p.under("/secret/file");
        let (w_state, w_store, w_run, r_secret, w_etc, mnt) =
            in_sandbox(Profile::Mount, p, move || {
                (
                    fs::write(&state, "{}").map_err(|e| e.kind()),
                    fs::write(&store, "x").map_err(|e| e.kind()),
                    std::os::unix::fs::symlink("root.gen/1", &run).map_err(|e| e.kind()),
                    fs::read(&secret).map(|_| ()).map_err(|e| e.kind()),
                    fs::write("/tmp/powernode-sandbox-probe-mount", "x").map_err(|e| e.kind()),
                    mount_probe(),
                )
            });
        assert_eq!(w_state, Ok(()), "state.json");
        assert_eq!(w_store, Ok(()), "the module store");
        assert_eq!(w_run, Ok(()), "the target link under /run/powernode");
        assert_eq!(r_secret, Err(ErrorKind::PermissionDenied));
        assert_eq!(w_etc, Err(ErrorKind::PermissionDenied));
        assert_eq!(
            mnt,
            Some(nix::errno::Errno::EPERM),
            "mountd never mounts itself: systemd does"
        );
    }
}
