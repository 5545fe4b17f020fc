//! Wiring only: everything the process does is `seedkeeper::process::main`.

fn main() -> std::process::ExitCode {
    seedkeeper::process::main()
}
