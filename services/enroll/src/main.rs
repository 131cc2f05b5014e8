fn main() -> std::process::ExitCode {
    powernode_enrolld::entry(std::env::args_os())
}
