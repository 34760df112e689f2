//! Event mode (`--mode event`): what one epoll loop must get right beyond
//! what every mode shares (those tests run it too: see echo.rs, faults.rs,
//! abuse.rs, signals.rs): a client that never reads costs a bounded
//! buffer, idle connections cost almost nothing, a thousand and more are
//! served at once, and the stop ends even a client that reads nothing.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

/// A field of /proc/PID/smaps_rollup or /proc/PID/status, in KiB.
fn kib(pid: i32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: i32) -> u64 {
    kib(pid, "smaps_rollup", "Pss")
}

/// Send `data` on `s` until a write would block for `patience`; returns
/// how much went out (the rest of `data` was not sent).
fn send_until_stalled(s: &mut TcpStream, data: &[u8], patience: Duration) -> usize {
    s.set_write_timeout(Some(patience)).unwrap();
    let mut sent = 0;
    while sent < data.len() {
        match s.write(&data[sent..(sent + 64 * 1024).min(data.len())]) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("send failed after {sent} bytes: {e}"),
        }
    }
    sent
}

#[test]
fn a_client_that_never_reads_costs_one_buffer_and_is_served_when_it_reads() {
    let f = Forkd::start(&["--mode", "event", "--buffer", "16KiB"]);
    let warm = pattern(1 << 20, 1);
    f.check(roundtrip(f.addr(), &warm) == warm, "warm-up echo");
    let before = kib(f.pid(), "status", "VmRSS");

    // Sends 64 MiB and reads nothing: forkd stops reading from it once its
    // echo cannot be written, so the bytes back up in the kernel, not in forkd.
    let mut hog = connect(f.addr());
    let data = pattern(64 << 20, 2);
    let sent = send_until_stalled(&mut hog, &data, Duration::from_millis(500));
    f.check(
        sent < data.len(),
        "64 MiB went out to a server that should have stopped reading",
    );
    let grown = kib(f.pid(), "status", "VmRSS").saturating_sub(before);
    f.check(
        grown < 1024,
        &format!("forkd grew by {grown} KiB holding a non-reading client's {sent} bytes"),
    );
    // Others are served meanwhile.
    let other = pattern(1 << 20, 3);
    f.check(
        roundtrip(f.addr(), &other) == other,
        "another client was not served beside the stalled one",
    );
    // Once it reads, it gets every byte back, in order, and the rest goes through.
    let mut reader = hog.try_clone().unwrap();
    let want = data.clone();
    let check = std::thread::spawn(move || {
        let mut back = Vec::new();
        reader.read_to_end(&mut back).map(|_| back == want)
    });
    hog.set_write_timeout(Some(LONG)).unwrap();
    hog.write_all(&data[sent..]).unwrap();
    hog.shutdown(Shutdown::Write).unwrap();
    let same = check.join().unwrap();
    f.check(
        matches!(same, Ok(true)),
        &format!("the stalled client's echo: {same:?}"),
    );
    f.check(
        f.wait_log("67108864 bytes echoed", LONG),
        "the end line should count every byte",
    );
}

/// 1,200 connections open at once, each echoing; and what the idle ones
/// cost: the target is at most 2 KiB of PSS each (README: 10,000 held).
#[test]
fn twelve_hundred_connections_at_once_and_idle_ones_cost_little() {
    const N: usize = 1200;
    raise_nofile();
    let f = Forkd::start(&["--mode", "event", "-c", "2000", "-q"]);
    let warm = pattern(64 << 10, 1);
    f.check(roundtrip(f.addr(), &warm) == warm, "warm-up echo");
    let before = pss_kib(f.pid());
    let mut conns: Vec<TcpStream> = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = connect(f.addr());
        ping(&mut s, format!("hello {i}\n").as_bytes());
        conns.push(s);
    }
    let per_conn = (pss_kib(f.pid()).saturating_sub(before)) as f64 / N as f64;
    eprintln!("event mode: {per_conn:.2} KiB of PSS per idle connection ({N} held)");
    f.check(
        per_conn <= 2.0,
        &format!("{per_conn:.2} KiB of PSS per idle connection"),
    );
    // Every one at once: 4 KiB out on each, then every echo back.
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&pattern(4096, i as u64)).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut back = vec![0u8; 4096];
        s.read_exact(&mut back).unwrap();
        assert!(
            back == pattern(4096, i as u64),
            "connection {i}: echo differs"
        );
    }
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log(&format!("active {N}/2000"), LONG),
        "the status line should count them all",
    );
    drop(conns);
    let all_ended = format!("active 0/2000, served {}", N + 1);
    f.check(
        wait_until(LONG, || {
            f.signal(libc::SIGUSR1);
            f.wait_log(&all_ended, Duration::from_millis(200))
        }),
        "every connection should end",
    );
}

/// The stop escalates on a client that never reads: SHUT_RD cannot end it
/// (it waits to write), so after a second SHUT_RDWR does, and forkd exits 0.
#[test]
fn sigterm_ends_a_client_that_never_reads_after_the_grace_period() {
    let mut f = Forkd::start(&["--mode", "event", "--grace", "300ms"]);
    let mut hog = connect(f.addr());
    let sent = send_until_stalled(&mut hog, &pattern(64 << 20, 4), Duration::from_millis(500));
    f.check(sent > 0, "nothing sent");
    let start = Instant::now();
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    f.check(
        start.elapsed() < Duration::from_secs(8),
        &format!("stopping took {:?}", start.elapsed()),
    );
    f.check(
        f.log().contains("stopped (socket shut down)")
            && f.log().contains("(1 shut down by forkd)"),
        "the non-reading client should be shut down by forkd",
    );
}

/// Timers cost nothing while nothing is due: a hundred idle connections
/// with timeouts keep the loop asleep, not polling.
#[test]
fn idle_connections_with_timers_keep_the_loop_asleep() {
    let f = Forkd::start(&[
        "--mode",
        "event",
        "--idle-timeout",
        "60s",
        "--first-byte-timeout",
        "30s",
    ]);
    let mut conns: Vec<TcpStream> = (0..100).map(|_| connect(f.addr())).collect();
    for s in conns.iter_mut().step_by(2) {
        ping(s, b"x");
    }
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = cpu_time(f.pid()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_time(f.pid()).unwrap() - cpu0;
    f.check(
        spent < Duration::from_millis(50),
        &format!("the loop used {spent:?} of CPU in 1 s with nothing due"),
    );
    for s in conns.iter_mut() {
        ping(s, b"still here");
    }
}

/// A connection is no task in event mode: a cap above `kernel.pid_max`
/// (refused in fork and thread mode) is fine; only descriptors bound it.
#[test]
fn a_cap_above_pid_max_is_accepted_in_event_mode() {
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let over = (pid_max + 1).min(1 << 22).to_string();
    let f = Forkd::start(&["--mode", "event", "-c", &over]);
    let data = pattern(10_000, 5);
    f.check(roundtrip(f.addr(), &data) == data, "not served");
    f.check(
        f.log().contains(&format!("max {over} connections")),
        "the cap should be announced",
    );
}
