//! The `ferry` command.

fn main() -> std::process::ExitCode {
    ferry::main()
}
