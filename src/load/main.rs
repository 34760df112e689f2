//! The `forkd-load` binary: all of it lives in the library (see `src/load/lib.rs`).

fn main() -> std::process::ExitCode {
    forkd_load::main()
}
