//! The `forkd-load` binary: all of it lives in the library (see `src/load/mod.rs`).

fn main() -> std::process::ExitCode {
    forkd::load::main()
}
