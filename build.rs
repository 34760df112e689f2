//! Link the unwinder into the binary instead of loading `libgcc_s.so.1`.
//!
//! Rust's standard library asks the linker for `-lgcc_s` (its unwinder, for
//! panics and backtraces). Found as a shared library, that is five more
//! mappings in the dispatcher, and `fork` copies, and every child's exit
//! tears down, each of them. This build script puts a file named
//! `libgcc_s.so` in a directory the linker searches first: a linker script
//! that names the static unwinder, `libgcc_eh.a`, instead (the same code,
//! what `gcc -static-libgcc` links). What it buys is measured in the
//! README ("What it took").

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    // A static build (crt-static) links libgcc_eh itself.
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if !linux_gnu || features.split(',').any(|f| f == "crt-static") {
        return;
    }
    let dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("unwind");
    std::fs::create_dir_all(&dir).expect("cannot create OUT_DIR/unwind");
    std::fs::write(dir.join("libgcc_s.so"), "INPUT(-lgcc_eh)\n")
        .expect("cannot write OUT_DIR/unwind/libgcc_s.so");
    println!("cargo:rustc-link-search=native={}", dir.display());
}
