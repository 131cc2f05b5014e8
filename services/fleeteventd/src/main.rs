fn main() -> std::process::ExitCode {
    powernode_fleeteventd::entry(std::env::args_os())
}
