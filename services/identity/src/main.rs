fn main() -> std::process::ExitCode {
    powernode_identityd::entry(std::env::args_os())
}
