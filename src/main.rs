//! The `forkd` binary: all of it lives in the library (see `src/lib.rs`).

fn main() -> std::process::ExitCode {
    forkd::main()
}
