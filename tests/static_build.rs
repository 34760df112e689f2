//! The statically linked build, `scripts/build-static.sh`: the forkd that
//! `scripts/install.sh` installs and `scripts/bench.sh` measures. Built for
//! real (a full release build of its own, a minute or two), then run like
//! any forkd. That build is why this test is `#[ignore]`d: plain `cargo test`
//! does not pay for it, and `.ci/run` runs it by name:
//!
//! ```sh
//! cargo test --test static_build -- --ignored
//! ```
mod util;
use util::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The target directory this test binary was built into.
fn target_dir() -> PathBuf {
    // FORKD is TARGET/debug/forkd (or TARGET/release/forkd).
    Path::new(FORKD)
        .parent()
        .and_then(Path::parent)
        .expect("forkd lives in TARGET/PROFILE")
        .to_path_buf()
}

/// The ELF program header types of `path` (64-bit little-endian only).
fn program_headers(path: &Path) -> Vec<u32> {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(
        &elf[..5],
        b"\x7fELF\x02",
        "{} is not a 64-bit ELF",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count)
        .map(|i| {
            let o = phoff + i * size;
            u32::from_le_bytes(elf[o..o + 4].try_into().unwrap())
        })
        .collect()
}

const PT_INTERP: u32 = 3;

fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

#[test]
#[ignore = "a full static release build (a minute or two): cargo test --test static_build -- --ignored"]
fn static_build_is_static_and_serves_as_any_forkd() {
    let mut cmd = Command::new("sh");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-static.sh"))
        .env("CARGO_TARGET_DIR", target_dir());
    let run = run_with_deadline(cmd, Duration::from_secs(900));
    assert!(
        run.status.success(),
        "build-static.sh failed: {}",
        run.stderr
    );
    let bin = PathBuf::from(run.stdout.trim());
    assert!(bin.is_file(), "build-static.sh printed {:?}", run.stdout);

    // No program interpreter: nothing is loaded at run time.
    let headers = program_headers(&bin);
    assert!(!headers.is_empty());
    assert!(
        !headers.contains(&PT_INTERP),
        "{} asks for a loader",
        bin.display()
    );

    // The dynamic build, for comparison, maps libc.
    let dynamic = Forkd::start(&["-q"]);
    assert!(maps(dynamic.pid()).contains("libc.so"));
    drop(dynamic);

    // It looks up a user (glibc's built-in files database), drops to it
    // after binding, echoes, and reaps. Only root can drop to another user:
    // otherwise the static build serves as the user running the test.
    let as_root = root_or_skip(
        "static_build_is_static_and_serves_as_any_forkd's --user nobody part",
        "to start forkd with --user nobody",
    );
    let args: &[&str] = if as_root { &["--user", "nobody"] } else { &[] };
    let mut f = Forkd::start_with(Command::new(&bin), args);
    let layout = maps(f.pid());
    f.check(
        !layout.contains(".so"),
        &format!("the static build maps a shared library:\n{layout}"),
    );
    let data = pattern(100_000, 7);
    f.check(roundtrip(f.addr(), &data) == data, "echo differs");
    let mut s = connect(f.addr());
    ping(&mut s, b"who am I");
    if as_root {
        let nobody = "65534 65534 65534 65534".to_string();
        f.check_dispatcher_and_child("Uid", |pid| status_field(pid, "Uid"), &nobody);
    }
    drop(s);
    f.check(
        wait_until(Duration::from_secs(10), || f.children().is_empty()),
        &format!("children left: {:?}", f.children()),
    );
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(Duration::from_secs(10));
}
