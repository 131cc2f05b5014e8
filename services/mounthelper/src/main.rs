fn main() -> std::process::ExitCode {
    powernode_mount_helper::entry(std::env::args_os())
}
