//! The in-process sandbox every daemon applies at start, before its runtime spawns threads (so
//! every thread inherits it): core dumps and same-uid ptrace off (`PR_SET_DUMPABLE` 0, so a crash
//! or a same-uid process cannot read the node key, JWT or token from memory), capabilities
//! trimmed to the profile's, a Landlock ruleset limiting the filesystem to the profile's paths,
//! and a seccomp allow-list. It complements the unit's own sandbox (systemd's directives) and
//! protects `--root` runs and the initramfs, where no unit applies.
//!
//! Landlock is asked for the best ABI the running kernel has (no right it lacks is requested, so
//! "fully enforced" means every filesystem right of that kernel is governed); a kernel without
//! Landlock gets none, and the report says which ABI was enforced. Seccomp is enforced
//! everywhere: a per-profile allow-list ([`allowed_syscalls`]), everything else EPERM — which
//! also refuses every x32 syscall (their numbers carry bit 30 and are never listed) — with
//! `clone` allowed only without namespace-creating flags and `clone3`, whose flags sit in memory
//! a filter cannot read, failing ENOSYS so libc falls back to `clone`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, path_beneath_rules,
};
use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
        }
    }

    /// Capabilities the daemon keeps (its unit grants no more).
    pub fn keep_caps(self) -> Vec<caps::Capability> {
        match self {
            // fw-cfg and DMI files are root-only 0400.
            Profile::Identity => vec![caps::Capability::CAP_DAC_READ_SEARCH],
            // mountd asks systemd to mount; it keeps no capability at all.
            Profile::Enroll | Profile::Cert | Profile::Agent | Profile::Events | Profile::Mount => {
                Vec::new()
            }
        }
    }
}

/// Syscalls every profile needs: the Rust runtime and tokio (threads, epoll, eventfd, signals),
/// files under the Landlock view, sockets (D-Bus, journald, sd_notify, TCP with TLS), the
/// glibc resolver, time and randomness. Derived by running each daemon's tests with a logging
/// default action and adding what they used (docs/ARCHITECTURE.md, "Sandbox").
const BASE_SYSCALLS: &[i64] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_membarrier,
    // Threads and synchronisation (`clone` is checked separately).
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_getcpu,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Signals (tokio's SIGTERM handler, fault injection's raise).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    // Event loop.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_pipe2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    // Files (what is reachable is Landlock's business).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_flock,
    libc::SYS_utimensat,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_fcntl,
    // FIONBIO, TCGETS, the fs-verity ioctls of the module store.
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_memfd_create,
    libc::SYS_umask,
    libc::SYS_getcwd,
    // Sockets.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    // Process facts, time, randomness.
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_capget,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    // PR_SET_NAME for runtime threads, PR_GET_DUMPABLE.
    libc::SYS_prctl,
];

/// x86-64's older file and event syscalls, which glibc and std still use there (aarch64 has
/// only the `*at` forms).
#[cfg(target_arch = "x86_64")]
const BASE_SYSCALLS_X86_64: &[i64] = &[
    libc::SYS_arch_prctl,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_symlink,
    libc::SYS_link,
    libc::SYS_chmod,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_epoll_wait,
    libc::SYS_pipe,
    libc::SYS_dup2,
    libc::SYS_accept,
    libc::SYS_getrlimit,
    libc::SYS_time,
];
#[cfg(not(target_arch = "x86_64"))]
const BASE_SYSCALLS_X86_64: &[i64] = &[];

/// Starting and reaping a helper program (identityd's `vmware-rpctool`): the helper runs under
/// the same filter, so only profiles that need one get `execve`.
const SPAWN_SYSCALLS: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_setpgid,
    libc::SYS_getpgid,
    libc::SYS_setsid,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_chdir,
];

/// `clone` flags that create namespaces: never allowed.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// The syscalls `profile` may make (besides `clone` without namespace flags, and `clone3`,
/// which fails ENOSYS).
pub fn allowed_syscalls(profile: Profile) -> Vec<i64> {
    let mut v: Vec<i64> = BASE_SYSCALLS
        .iter()
        .chain(BASE_SYSCALLS_X86_64)
        .copied()
        .collect();
    match profile {
        // The vSphere probe runs the guest RPC tool.
        Profile::Identity => v.extend_from_slice(SPAWN_SYSCALLS),
        Profile::Enroll | Profile::Cert | Profile::Agent | Profile::Events | Profile::Mount => {}
    }
    v.sort_unstable();
    v.dedup();
    v
}

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
                write.push(paths.run_dir());
            }
            Profile::Enroll | Profile::Cert => {
                read.push(paths.run_dir());
                write.push(paths.state_dir());
            }
            Profile::Agent => {
                read.push(paths.run_dir());
                write.push(paths.state_dir());
            }
            // Reads the PKI (under the state dir) for uploads; writes only its queue.
            Profile::Events => {
                read.push(paths.state_dir());
                write.push(paths.state_dir().join("events"));
            }
            // state.json (state dir), the module store it pulls into (and its fs-verity
            // bindings), and /run/powernode where it links the target and creates the
            // overlay's upper/work directories.
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

/// What was enforced: logged at start, and readable later through [`applied`] (a daemon's
/// properties, `introspect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub profile: &'static str,
    /// The Landlock ABI enforced (0: the kernel has no Landlock).
    pub landlock_abi: u32,
    pub landlock: String,
    /// How many syscalls the allow-list admits.
    pub seccomp_allowed: usize,
}

static APPLIED: std::sync::OnceLock<Report> = std::sync::OnceLock::new();

/// The report of the sandbox this process applied, if it did.
pub fn applied() -> Option<&'static Report> {
    APPLIED.get()
}

/// Apply `profile`: no core dumps, capabilities, then Landlock, then seccomp. Call before
/// spawning threads.
pub fn apply(profile: Profile, paths: &Paths) -> Result<Report> {
    // First: whatever fails below, the process holds no secret yet that a dump could leak.
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Sandbox(format!("PR_SET_DUMPABLE: {e}")))?;
    drop_caps(&profile.keep_caps())?;
    let (landlock_abi, landlock) = apply_landlock(&FsRules::for_profile(profile, paths))?;
    let allowed = allowed_syscalls(profile);
    apply_seccomp(&allowed)?;
    let report = Report {
        profile: profile.name(),
        landlock_abi,
        landlock,
        seccomp_allowed: allowed.len() + 2,
    };
    // A second apply (tests run several sandboxed threads) keeps the first report.
    let _ = APPLIED.set(report.clone());
    Ok(report)
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

/// Every Landlock ABI the crate knows, newest first.
const ABIS: [ABI; 10] = [
    ABI::V10,
    ABI::V9,
    ABI::V8,
    ABI::V7,
    ABI::V6,
    ABI::V5,
    ABI::V4,
    ABI::V3,
    ABI::V2,
    ABI::V1,
];

/// The newest Landlock ABI whose filesystem rights the running kernel enforces in full
/// (`Unsupported` without Landlock). The crate keeps the kernel's version private; asking for a
/// ruleset as a hard requirement, newest first, finds it without any unsafe code.
pub fn kernel_landlock_abi() -> ABI {
    ABIS.into_iter()
        .find(|abi| {
            Ruleset::default()
                .set_compatibility(CompatLevel::HardRequirement)
                .handle_access(AccessFs::from_all(*abi))
                .and_then(|r| r.create())
                .is_ok()
        })
        .unwrap_or(ABI::Unsupported)
}

fn apply_landlock(rules: &FsRules) -> Result<(u32, String)> {
    let abi = kernel_landlock_abi();
    if abi == ABI::Unsupported {
        return Ok((0, "not enforced (kernel without Landlock)".to_string()));
    }
    let err = |e: landlock::RulesetError| Error::Sandbox(format!("landlock: {e}"));
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    // Connecting to a socket by path is a right of its own from ABI 9 on; before, it is not
    // governed at all.
    let sockets = read | (all & AccessFs::ResolveUnix);
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(all)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.read), read))
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.write), all))
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(&rules.sockets), sockets))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    let level = abi as u32;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => (level, format!("fully enforced (ABI {level})")),
        RulesetStatus::PartiallyEnforced => (level, format!("partially enforced (ABI {level})")),
        RulesetStatus::NotEnforced => (0, "not enforced".to_string()),
    })
}

fn seccomp_err(e: impl std::fmt::Display) -> Error {
    Error::Sandbox(format!("seccomp: {e}"))
}

/// The allow-list filter (everything else EPERM), and under it a filter answering `clone3` with
/// ENOSYS. The kernel runs every filter and keeps the first-seen action of the highest
/// precedence; both answers are errno actions, so for `clone3` the older filter's ENOSYS is the
/// one seen first only if the newer one (the allow-list) allows it — which it does.
fn apply_seccomp(allowed: &[i64]) -> Result<()> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp_err)?;
    let compile = |rules: BTreeMap<i64, Vec<SeccompRule>>,
                   mismatch: SeccompAction,
                   matched: SeccompAction|
     -> Result<BpfProgram> {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .map_err(seccomp_err)?
            .try_into()
            .map_err(|e: seccompiler::BackendError| seccomp_err(e))
    };
    let clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(libc::SYS_clone3, Vec::new());
    rules.insert(
        libc::SYS_clone,
        vec![
            SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS),
                    0,
                )
                .map_err(seccomp_err)?,
            ])
            .map_err(seccomp_err)?,
        ],
    );
    let allow_list = compile(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;
    seccompiler::apply_filter(&clone3).map_err(seccomp_err)?;
    seccompiler::apply_filter(&allow_list).map_err(seccomp_err)
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
        in_sandbox_with(profile, paths, |_| f())
    }

    /// [`in_sandbox`], `f` also given what `apply` reported (tests share a process, so
    /// [`applied`] holds whichever test applied first).
    fn in_sandbox_with<T: Send + 'static>(
        profile: Profile,
        paths: Paths,
        f: impl FnOnce(Report) -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            let report = apply(profile, &paths).expect("apply sandbox");
            assert!(applied().is_some());
            f(report)
        })
        .join()
        .expect("sandboxed thread panicked")
    }

    fn node() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path());
        for dir in [
            p.run_dir(),
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
        let (write_pki, write_run, mnt, ptrace) = in_sandbox(Profile::Identity, p, move || {
            (
                fs::write(pki.join("node.key"), "x").map_err(|e| e.kind()),
                fs::write(run.join("identity.json"), "{}").map_err(|e| e.kind()),
                mount_probe(),
                errno_of(nix::sys::ptrace::attach(nix::unistd::Pid::from_raw(1))),
            )
        });
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
                fs::write(run.join("identity.json"), "{}").map_err(|e| e.kind()),
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

    /// A self-signed server identity for `localhost` and a client trusting only it.
    fn tls_pair() -> (rustls::ServerConfig, rustls::ClientConfig) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, client)
    }

    /// A TLS server on loopback, outside any sandbox, answering each connection with `hello`.
    fn tls_server(config: rustls::ServerConfig) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use tokio::io::AsyncWriteExt as _;
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
                while let Ok((tcp, _)) = listener.accept().await {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                }
            });
        });
        addr
    }

    /// Raw syscalls through perl's syscall(), run as a child of the sandboxed thread (a child
    /// inherits the calling thread's filter): each probe prints `ok` or `errno=N`.
    const PERL_PROBES: &str = r#"
        use POSIX ();
        sub probe {
            my $r = syscall(@_);
            POSIX::_exit(0) if $r == 0 && $_[0] == 56;
            return $r < 0 ? "errno=" . ($! + 0) : "ok";
        }
        print join(",",
            probe(0x40000000 + 39),                 # x32 getpid
            probe(56, 0x10000000 | 17, 0, 0, 0, 0), # clone(CLONE_NEWUSER | SIGCHLD)
            probe(435, 0, 0),                       # clone3
            probe(39)                               # getpid, native: allowed
        ), "\n";
    "#;

    #[test]
    fn forbidden_syscalls_fail_while_normal_work_goes_on() {
        use nix::errno::Errno;
        let (_d, p) = node();
        let run = p.run_dir();
        let (server_cfg, client_cfg) = tls_pair();
        let addr = tls_server(server_cfg);
        let (report, dumpable, probes, unshare, mnt, ptrace, file, thread, tls) =
            in_sandbox_with(Profile::Identity, p, move |report| {
                let dumpable = nix::sys::prctl::get_dumpable();
                let probes = std::process::Command::new("perl")
                    .args(["-e", PERL_PROBES])
                    .output()
                    .map(|o| {
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(&o.stdout).trim(),
                            String::from_utf8_lossy(&o.stderr).trim()
                        )
                    })
                    .map_err(|e| e.to_string());
                let unshare = errno_of(nix::sched::unshare(
                    nix::sched::CloneFlags::CLONE_NEWUSER,
                ));
                let mnt = mount_probe();
                let ptrace = errno_of(nix::sys::ptrace::attach(nix::unistd::Pid::from_raw(1)));
                let f = run.join("identity.json");
                let file = fs::write(&f, "{}")
                    .and_then(|()| fs::read_to_string(&f))
                    .map_err(|e| e.kind());
                let thread = std::thread::spawn(|| 6 * 7).join().map_err(|_| "panicked");
                let tls = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| {
                        rt.block_on(async move {
                            use tokio::io::AsyncReadExt as _;
                            let tcp = tokio::net::TcpStream::connect(addr)
                                .await
                                .map_err(|e| e.to_string())?;
                            let connector = tokio_rustls::TlsConnector::from(
                                std::sync::Arc::new(client_cfg),
                            );
                            let name = rustls::pki_types::ServerName::try_from("localhost")
                                .map_err(|e| e.to_string())?;
                            let mut tls = connector
                                .connect(name, tcp)
                                .await
                                .map_err(|e| e.to_string())?;
                            let mut got = String::new();
                            tls.read_to_string(&mut got)
                                .await
                                .map_err(|e| e.to_string())?;
                            Ok::<_, String>(got)
                        })
                    });
                (report, dumpable, probes, unshare, mnt, ptrace, file, thread, tls)
            });
        assert_eq!(report.profile, "identity");
        assert_eq!(report.seccomp_allowed, allowed_syscalls(Profile::Identity).len() + 2);
        assert_eq!(dumpable, Ok(false), "PR_SET_DUMPABLE is 0");
        assert_eq!(
            probes.as_deref(),
            Ok("errno=1,errno=1,errno=38,ok"),
            "x32 syscall EPERM, namespace clone EPERM, clone3 ENOSYS, native getpid allowed"
        );
        assert_eq!(unshare, Some(Errno::EPERM), "unshare(CLONE_NEWUSER)");
        assert_eq!(mnt, Some(Errno::EPERM), "mount");
        assert_eq!(ptrace, Some(Errno::EPERM), "ptrace");
        assert_eq!(file.as_deref(), Ok("{}"), "file IO in the profile's paths");
        assert_eq!(thread, Ok(42), "threads (clone3 falls back to clone)");
        assert_eq!(tls.as_deref(), Ok("hello"), "TLS to loopback");
    }

    #[test]
    fn landlock_gets_the_kernel_s_own_abi_and_says_so() {
        let abi = kernel_landlock_abi();
        let (_d, p) = node();
        let report = in_sandbox_with(Profile::Cert, p, |r| r);
        if abi == ABI::Unsupported {
            assert_eq!(report.landlock_abi, 0);
            return;
        }
        assert_eq!(report.landlock_abi, abi as u32);
        assert_eq!(
            report.landlock,
            format!("fully enforced (ABI {})", abi as u32),
            "the kernel's ABI is applied in full"
        );
    }

    #[test]
    fn only_the_identity_profile_may_start_programs() {
        for p in [
            Profile::Enroll,
            Profile::Cert,
            Profile::Agent,
            Profile::Events,
            Profile::Mount,
        ] {
            let allowed = allowed_syscalls(p);
            assert!(!allowed.contains(&libc::SYS_execve), "{p:?}");
            for nr in [libc::SYS_mount, libc::SYS_unshare, libc::SYS_setns, libc::SYS_ptrace, libc::SYS_bpf] {
                assert!(!allowed.contains(&nr), "{p:?} allows {nr}");
            }
        }
        assert!(allowed_syscalls(Profile::Identity).contains(&libc::SYS_execve));
    }
}
