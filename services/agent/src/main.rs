//! `powernode-agent`: the operator CLI, the resident agent service and, through argv[0], the
//! entry point of every daemon of the suite (so an initramfs can ship one file plus symlinks).

mod boot;
mod cli;
mod modules_cmd;
mod multicall;
mod output;
mod service;
mod tasks;
mod verify_cmd;

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match multicall::callname_from_argv0(argv.first().map(|s| s.as_os_str())) {
        multicall::Callname::Identityd => powernode_identityd::entry(argv),
        multicall::Callname::Enrolld => powernode_enrolld::entry(argv),
        multicall::Callname::Certd => powernode_certd::entry(argv),
        multicall::Callname::Fleeteventd => powernode_fleeteventd::entry(argv),
        multicall::Callname::Mountd => powernode_mountd::entry(argv),
        multicall::Callname::MountHelper => powernode_mount_helper::entry(argv),
        multicall::Callname::Ipn => {
            eprintln!(
                "ipn: the legacy flag interface is not available in this build; use `powernode-agent <command>`"
            );
            ExitCode::from(1)
        }
        multicall::Callname::Agent => cli::main(argv),
    }
}
