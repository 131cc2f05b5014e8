fn main() -> std::process::ExitCode {
    powernode_mountd::entry(std::env::args_os())
}
