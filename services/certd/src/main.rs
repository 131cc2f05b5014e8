fn main() -> std::process::ExitCode {
    powernode_certd::entry(std::env::args_os())
}
