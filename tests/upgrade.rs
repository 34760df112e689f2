//! SIGUSR2, the binary upgrade: a steady load across it sees no refused,
//! reset or corrupted connection; a new binary that fails leaves the old
//! one serving.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

/// The new forkd is not our child (its parent is the old forkd, which
/// exits): end it on the way out, whatever happens.
struct Reaped(i32);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SAFETY: kill(2); the pid was read from the old forkd's log.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// The new forkd's pid, from the old one's "upgrade: pid N is ready" line.
fn new_pid(f: &Forkd) -> Option<i32> {
    let log = f.log();
    let rest = log.split("upgrade: pid ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn an_upgrade_under_steady_load_drops_nothing() {
    for mode in ["fork", "thread", "event", "prefork"] {
        let mut f = Forkd::start(&["--mode", mode, "--grace", "10s"]);
        let addr = f.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for w in 0..3u64 {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            workers.push(std::thread::spawn(move || -> Result<(), String> {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let data = pattern(1000 + (n as usize % 5000), w * 1_000_000 + n);
                    let mut s = std::net::TcpStream::connect_timeout(&addr, LONG)
                        .map_err(|e| format!("connection {n}: connect: {e}"))?;
                    s.set_read_timeout(Some(LONG)).unwrap();
                    let back = echo_all(&mut s, data.clone())
                        .map_err(|e| format!("connection {n}: {e}"))?;
                    if back != data {
                        return Err(format!("connection {n}: echo corrupted"));
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        // One connection held by the old forkd across the upgrade.
        let mut held = connect(addr);
        ping(&mut held, b"before\n");
        f.check(
            wait_until(LONG, || served.load(Ordering::Relaxed) > 50),
            "the load did not start",
        );
        f.signal(libc::SIGUSR2);
        f.check(
            f.wait_log("is ready and accepting", LONG),
            &format!("{mode}: the new forkd was not ready"),
        );
        let pid = new_pid(&f).expect("the new pid in the log");
        let _guard = Reaped(pid);
        f.check(pid != f.pid(), "the new forkd is a new process");
        f.check(
            f.log().contains("socket-activated on 127.0.0.1:"),
            "the new forkd did not adopt the listeners",
        );
        // The old dispatcher still serves what it holds.
        ping(&mut held, b"after\n");
        let before = served.load(Ordering::Relaxed);
        drop(held);
        f.expect_clean_exit(LONG);
        // The load goes on against the new forkd alone.
        f.check(
            wait_until(LONG, || served.load(Ordering::Relaxed) > before + 100),
            "the load stalled after the old forkd left",
        );
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let r = w.join().unwrap();
            f.check(r.is_ok(), &format!("{mode}: a connection failed: {r:?}"));
        }
        f.check(proc_stat(pid).is_some(), "the new forkd is gone");
        // The new one stops cleanly on SIGTERM too.
        // SAFETY: kill(2) on the new forkd.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        f.check(
            wait_until(LONG, || ended(pid)),
            "the new forkd did not stop",
        );
    }
}

#[test]
fn a_failed_upgrade_leaves_the_old_forkd_serving() {
    let dir = TempDir::new("upgrade");
    let exe = dir.join("forkd");
    std::fs::copy(forkd(), &exe).unwrap();
    let f = Forkd::start_with(std::process::Command::new(&exe), &[]);
    let data = pattern(5000, 1);

    // The binary is gone: exec fails.
    std::fs::remove_file(&exe).unwrap();
    f.signal(libc::SIGUSR2);
    f.check(
        f.wait_log("upgrade failed: cannot execute", LONG),
        "exec failure",
    );
    assert_eq!(roundtrip(f.addr(), &data), data);

    // A "binary" that exits at once, before it is ready.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&exe, "#!/bin/sh\necho 'new binary: failing' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    f.signal(libc::SIGUSR2);
    f.check(
        f.wait_log("exited before it was ready", LONG),
        "early exit not noticed",
    );
    assert_eq!(roundtrip(f.addr(), &data), data);
    f.check(
        !f.log().contains("is ready and accepting"),
        "a failed upgrade was taken for a ready one",
    );
}

/// A prefork worker that is busy when the new forkd becomes ready accepts
/// nothing after its connection: a client queued meanwhile is the new
/// forkd's, and the old one exits as soon as its last connection ends.
#[test]
fn an_upgraded_pool_accepts_nothing_more() {
    let mut f = Forkd::start(&["--mode", "prefork", "--workers", "1", "--grace", "10s"]);
    let addr = f.addr();
    // A, held by the old pool's one worker across the upgrade.
    let mut a = connect(addr);
    ping(&mut a, b"a\n");
    f.signal(libc::SIGUSR2);
    f.check(
        f.wait_log("is ready and accepting", LONG),
        "the new forkd was not ready",
    );
    let pid = new_pid(&f).expect("the new pid in the log");
    let _guard = Reaped(pid);
    // C, served by the new pool's one worker (the old one is busy with A).
    let mut c = connect(addr);
    ping(&mut c, b"c\n");
    // The old worker learns of the drain at a tick (at most a second).
    std::thread::sleep(Duration::from_millis(1500));
    // B waits in the backlog: both workers are busy.
    let mut b = connect(addr);
    b.write_all(b"b\n").unwrap();
    // A ends: the old worker must leave rather than take B (which it
    // would then hold until the grace runs out, and be killed serving it).
    drop(a);
    f.expect_clean_exit(Duration::from_secs(5));
    f.check(
        !f.log().contains("grace period over"),
        "the old worker took a connection after the drain began",
    );
    // B is the new forkd's: served once C ends.
    drop(c);
    b.set_read_timeout(Some(LONG)).unwrap();
    let mut back = [0u8; 2];
    b.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"b\n");
    drop(b);
    // SAFETY: kill(2) on the new forkd.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    f.check(
        wait_until(LONG, || ended(pid)),
        "the new forkd did not stop",
    );
}
