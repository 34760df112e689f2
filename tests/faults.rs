//! Abuse and faults: forkd keeps serving, loses no byte and leaves no zombie.
//! Each test runs the real binary and is bounded in time.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forkd_test_util::*;

/// A uid and gid of their own for the fork-failure test: RLIMIT_NPROC counts
/// every process of the user, so tests running forkd as `nobody` at the same
/// time (privilege drop, capabilities) must not eat into its three.
const NPROC_UID: u32 = 64_917;

/// utime + stime of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A connection the server closed (or reset) without serving: EOF or an error at once.
fn refused_quickly(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return true;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"x");
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut,
    }
}

/// A command for forkd that starts with `resource` limited to `n`, soft and
/// hard alike (so forkd cannot raise it).
fn forkd_with_limit(resource: libc::__rlimit_resource_t, n: libc::rlim_t) -> Command {
    let mut cmd = Command::new(forkd());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Lines in `log` containing `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn per_ip_limit_refuses_extra_connections_and_releases_on_every_end() {
    // Prefork counts across its workers, on the scoreboard.
    for mode in ["fork", "thread", "prefork", "event"] {
        let f = Forkd::start(&["--mode", mode, "--max-per-ip", "2"]);
        let mut a = connect(f.addr());
        let mut b = connect(f.addr());
        ping(&mut a, b"a");
        ping(&mut b, b"b");
        // A flood over the limit: every one closed at once, logged at a bounded rate.
        for _ in 0..30 {
            f.check(
                refused_quickly(f.addr()),
                "over-limit connection was served",
            );
        }
        f.check(
            lines_with(&f.log(), "--max-per-ip") <= 3,
            "refusals must be logged at a bounded rate",
        );
        // A clean close releases its count: a new client gets through.
        drop(a);
        let mut c = None;
        let served = wait_until(Duration::from_secs(10), || {
            let mut s = connect(f.addr());
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let _ = s.write_all(b"z");
            let mut x = [0u8; 1];
            let ok = matches!(s.read(&mut x), Ok(1));
            if ok {
                c = Some(s);
            }
            ok
        });
        f.check(served, "the count of a closed connection was not released");
        let mut c = c.unwrap();
        ping(&mut c, b"c");
        f.check(refused_quickly(f.addr()), "a third connection was served");
        // ...and so does a child killed by a signal (fork mode).
        if mode == "fork" {
            let before: Vec<i32> = f.children().iter().map(|p| p.pid).collect();
            for pid in before {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            f.check(
                f.wait_log("killed by SIGKILL", Duration::from_secs(10)),
                "killed child not logged",
            );
            f.check(
                wait_until(Duration::from_secs(10), || f.children().is_empty()),
                "killed children left behind",
            );
            let mut d = connect(f.addr());
            let mut e = connect(f.addr());
            ping(&mut d, b"d");
            ping(&mut e, b"e");
        }
        drop((b, c));
    }
}

#[test]
fn cap_holds_under_a_flood_and_everyone_is_served_in_turn() {
    let f = Forkd::start(&["-c", "4"]);
    let addr = f.addr();
    let clients: Vec<_> = (0..24u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pattern(4096, i);
                roundtrip(addr, &data) == data
            })
        })
        .collect();
    let mut peak = 0;
    let ok = wait_until(Duration::from_secs(30), || {
        peak = peak.max(f.children().len());
        clients.iter().all(|c| c.is_finished())
    });
    f.check(ok, "flooded clients did not all finish");
    for c in clients {
        assert!(c.join().unwrap(), "a client got a wrong echo");
    }
    f.check(peak <= 4, &format!("{peak} children at a cap of 4"));
    f.check(
        wait_until(Duration::from_secs(5), || f.zombies() == 0),
        "zombies left",
    );
}

fn idle_timeout_ends_silent_and_non_reading_clients(mode: &str) {
    let f = Forkd::start(&["--mode", mode, "--idle-timeout", "300ms"]);
    // A client that sends nothing: the server closes it.
    let start = Instant::now();
    let mut silent = connect(f.addr());
    let mut b = [0u8; 1];
    let n = silent.read(&mut b);
    f.check(matches!(n, Ok(0)), &format!("silent client: {n:?}"));
    f.check(
        start.elapsed() < Duration::from_secs(8),
        "silent client kept too long",
    );

    // A client that sends but never reads: the server's writes stall, and it gives up.
    let mut hog = connect(f.addr());
    hog.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let start = Instant::now();
    let mut failed = false;
    while start.elapsed() < Duration::from_secs(20) {
        if hog.write_all(&chunk).is_err() {
            failed = true;
            break;
        }
    }
    f.check(failed, "writes to a non-reading client never failed");
    f.check(
        wait_until(Duration::from_secs(10), || {
            // The silent one met the first-byte timeout (which is never
            // longer than the idle timeout), the hog the idle timeout.
            lines_with(&f.log(), "idle timeout") >= 1
                && lines_with(&f.log(), "sent nothing (first-byte timeout)") >= 1
        }),
        "idle timeouts not logged",
    );
    // Others are still served.
    let data = pattern(100_000, 3);
    assert!(roundtrip(f.addr(), &data) == data);
}

#[test]
fn idle_timeout_fork() {
    idle_timeout_ends_silent_and_non_reading_clients("fork");
}

#[test]
fn idle_timeout_thread() {
    idle_timeout_ends_silent_and_non_reading_clients("thread");
}

/// Event mode's timeouts are timers (socket timeouts do not apply to
/// non-blocking sockets): the same ends, the same lines.
#[test]
fn idle_timeout_event() {
    idle_timeout_ends_silent_and_non_reading_clients("event");
}

#[test]
fn idle_timeout_prefork() {
    idle_timeout_ends_silent_and_non_reading_clients("prefork");
}

#[test]
fn fork_failure_backs_off_without_spinning_and_recovers() {
    // Root is exempt from RLIMIT_NPROC, so run forkd as an unprivileged uid
    // of its own, allowed 3 processes: the dispatcher and two children.
    if !root_or_skip(
        "fork_failure_backs_off_without_spinning_and_recovers",
        "to run forkd as another user",
    ) {
        return;
    }
    let mut cmd = forkd_with_limit(libc::RLIMIT_NPROC, 3);
    cmd.uid(NPROC_UID).gid(NPROC_UID);
    let f = Forkd::start_with(cmd, &[]);
    let mut a = connect(f.addr());
    let mut b = connect(f.addr());
    ping(&mut a, b"1");
    ping(&mut b, b"2");
    // Further clients cannot get a process: each is closed, and the
    // dispatcher backs off instead of spinning, however hard they knock.
    let ticks = cpu_ticks(f.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let knockers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, addr) = (Arc::clone(&stop), f.addr());
            std::thread::spawn(move || {
                let mut refused = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if refused_quickly(addr) {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let refused: u32 = knockers.into_iter().map(|k| k.join().unwrap()).sum();
    let used = cpu_ticks(f.pid()) - ticks;
    f.check(refused > 0, "no client was refused");
    f.check(
        used <= 40,
        &format!("dispatcher used {used} ticks in 1.5 s: spinning"),
    );
    f.check(
        f.log().contains("cannot serve") && f.log().contains("Resource temporarily unavailable"),
        "fork failure not logged",
    );
    f.check(
        lines_with(&f.log(), "cannot serve") <= 4,
        "fork failures must be logged at a bounded rate",
    );
    // Service goes on as soon as processes free up.
    drop(a);
    let ok = wait_until(Duration::from_secs(10), || {
        let data = pattern(1000, 9);
        let mut s = connect(f.addr());
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = s.write_all(&data);
        let _ = s.shutdown(Shutdown::Write);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        back == data
    });
    f.check(ok, "not served again after a child ended");
    drop(b);
}

#[test]
fn emfile_in_thread_mode_backs_off_and_recovers() {
    emfile_backs_off_and_recovers("thread");
}

/// Event mode holds a descriptor per connection as thread mode does.
#[test]
fn emfile_in_event_mode_backs_off_and_recovers() {
    emfile_backs_off_and_recovers("event");
}

fn emfile_backs_off_and_recovers(mode: &str) {
    // A hard descriptor limit of 16: forkd cannot raise it, and runs out.
    let cmd = forkd_with_limit(libc::RLIMIT_NOFILE, 16);
    let f = Forkd::start_with(cmd, &["--mode", mode]);
    let mut held = Vec::new();
    for i in 0..24u8 {
        held.push(connect(f.addr()));
        let _ = held.last_mut().unwrap().write_all(&[i]);
    }
    f.check(
        f.wait_log("Too many open files", Duration::from_secs(10)),
        "EMFILE not logged",
    );
    let ticks = cpu_ticks(f.pid());
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_ticks(f.pid()) - ticks;
    f.check(
        used <= 40,
        &format!("dispatcher used {used} ticks in 1.5 s: spinning"),
    );
    // Free descriptors: every waiting client gets served.
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for (i, mut s) in held.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(1)) {
            assert_eq!(b[0], i as u8);
            served.push(s);
        } else {
            waiting.push((i as u8, s));
        }
    }
    f.check(
        !served.is_empty() && !waiting.is_empty(),
        "expected some served, some waiting",
    );
    drop(served);
    for (i, mut s) in waiting {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        f.check(
            matches!(r, Ok(1)) && b[0] == i,
            &format!("client {i} not served: {r:?}"),
        );
    }
}

#[test]
fn sigterm_under_load_never_truncates_an_accepted_reply() {
    for mode in ["fork", "thread", "prefork", "event"] {
        let mut f = Forkd::start(&["--mode", mode, "--grace", "20s"]);
        let addr = f.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..6u64)
            .map(|w| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let (mut complete, mut never_served) = (0u32, 0u32);
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let data = pattern(1 << 20, w * 1000 + i);
                        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        else {
                            never_served += 1;
                            continue;
                        };
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        let mut w = s.try_clone().unwrap();
                        let d2 = data.clone();
                        let writer = std::thread::spawn(move || {
                            let sent = w.write_all(&d2);
                            let _ = w.shutdown(Shutdown::Write);
                            sent
                        });
                        let mut back = Vec::new();
                        let r = s.read_to_end(&mut back);
                        let sent = writer.join().unwrap();
                        // A reset is reported once, to whichever of the two
                        // threads asks first: if the writer took it, the
                        // reader finds a closed socket and reads a clean end.
                        if back.is_empty() && (r.is_err() || sent.is_err()) {
                            // Queued but never accepted before the listener closed: reset.
                            never_served += 1;
                        } else {
                            assert!(
                                r.is_ok(),
                                "{mode}: read error after {} bytes: {r:?}",
                                back.len()
                            );
                            assert!(
                                back == data,
                                "{mode}: reply of {} bytes differs",
                                back.len()
                            );
                            complete += 1;
                        }
                    }
                    (complete, never_served)
                })
            })
            .collect();
        f.check(
            wait_until(Duration::from_secs(10), || f.count_log("end ") >= 6),
            "load did not start",
        );
        f.signal(libc::SIGTERM);
        let status = f.wait_exit(Duration::from_secs(20));
        stop.store(true, Ordering::Relaxed);
        let mut complete = 0;
        for w in workers {
            complete += w.join().expect("a reply was truncated or corrupted").0;
        }
        f.check(
            status.is_some_and(|s| s.success()),
            &format!("exit status {status:?}"),
        );
        f.check(f.log().contains(" ended (0 "), "connections were killed");
        assert!(complete >= 6);
    }
}

#[test]
fn a_child_killed_by_sigkill_is_reaped_logged_and_service_goes_on() {
    let f = Forkd::start(&[]);
    let mut s = connect(f.addr());
    ping(&mut s, b"hello");
    let kids = f.children();
    assert_eq!(kids.len(), 1);
    unsafe { libc::kill(kids[0].pid, libc::SIGKILL) };
    f.check(
        f.wait_log(
            &format!("end pid {} ", kids[0].pid),
            Duration::from_secs(10),
        ),
        "end not logged",
    );
    f.check(f.log().contains("killed by SIGKILL"), "signal not named");
    f.check(
        wait_until(Duration::from_secs(5), || f.children().is_empty()),
        "killed child not reaped",
    );
    let data = pattern(50_000, 4);
    assert!(roundtrip(f.addr(), &data) == data);
}

fn status_ids(pid: i32) -> (String, String, String) {
    let get = |k| status_field(pid, k);
    (get("Uid"), get("Gid"), get("Groups"))
}

#[test]
fn privileges_drop_after_binding_a_privileged_port() {
    if !root_or_skip(
        "privileges_drop_after_binding_a_privileged_port",
        "to bind port 7",
    ) {
        return;
    }
    // Port 7 (RFC 862's own) needs root to bind; then forkd serves as nobody.
    let mut f = Forkd::start(&["-l", "127.0.0.1:7", "--user", "nobody"]);
    let mut s = connect(f.addr());
    ping(&mut s, b"dropped");
    let want = (
        "65534 65534 65534 65534".to_string(),
        "65534 65534 65534 65534".to_string(),
        String::new(),
    );
    f.check_dispatcher_and_child("uids, gids, groups", status_ids, &want);
    drop(s);
    f.signal(libc::SIGTERM);
    assert!(
        f.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}

/// After `--user`, neither the dispatcher nor a connection's child can gain
/// privilege again: `NoNewPrivs` 1 (a setuid program runs without its
/// privilege) and an empty capability bounding set (so does a file
/// capability), every other capability set empty too.
#[test]
fn after_user_no_new_privileges_and_an_empty_bounding_set() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: --user needs root");
        return;
    }
    let mut f = Forkd::start(&["--user", "nobody"]);
    let mut s = connect(f.addr());
    ping(&mut s, b"unprivileged");
    let one = "1".to_string();
    f.check_dispatcher_and_child("NoNewPrivs", |pid| status_field(pid, "NoNewPrivs"), &one);
    let none = "0000000000000000".to_string();
    f.check_dispatcher_and_child("CapBnd", |pid| status_field(pid, "CapBnd"), &none);
    f.check_dispatcher_and_child("capabilities", capabilities, &vec![none; 4]);
    drop(s);
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(Duration::from_secs(15));
}

#[test]
fn unknown_user_is_a_documented_error() {
    let out = Command::new(forkd())
        .args(["-l", "127.0.0.1:0", "--user", "no-such-user-forkd"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(67));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no such user: no-such-user-forkd"), "{err}");
}

#[test]
fn children_outlive_a_killed_dispatcher_unless_die_with_parent() {
    for (flag, survives) in [(None, true), (Some("--die-with-parent"), false)] {
        let mut f = Forkd::start(&flag.into_iter().collect::<Vec<_>>());
        let mut s = connect(f.addr());
        ping(&mut s, b"x");
        let kid = f.children()[0].pid;
        f.signal(libc::SIGKILL);
        f.wait_exit(Duration::from_secs(5))
            .expect("dispatcher did not die");
        let alive = |pid| proc_stat(pid).is_some_and(|p| p.state != 'Z');
        if survives {
            // Orphaned: re-parented, still serving its client.
            ping(&mut s, b"still here");
            assert!(alive(kid));
            unsafe { libc::kill(kid, libc::SIGKILL) };
        } else {
            assert!(
                wait_until(Duration::from_secs(5), || !alive(kid)),
                "child outlived its dispatcher with --die-with-parent"
            );
        }
    }
}

#[test]
fn a_stalled_client_does_not_slow_a_100_mib_stream() {
    for mode in ["fork", "thread", "event"] {
        let f = Forkd::start(&["--mode", mode]);
        // The staller sends and never reads: its own connection backs up.
        let mut stall = connect(f.addr());
        stall
            .set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let junk = vec![1u8; 64 * 1024];
        while stall.write_all(&junk).is_ok() {}
        let data = pattern(100 << 20, 100);
        let start = Instant::now();
        let back = roundtrip(f.addr(), &data);
        assert_eq!(back.len(), data.len(), "{mode}: length");
        assert!(back == data, "{mode}: 100 MiB stream differs");
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}

/// Capability sets of a process from /proc/PID/status, as hex strings.
fn capabilities(pid: i32) -> Vec<String> {
    ["CapInh", "CapPrm", "CapEff", "CapAmb"]
        .iter()
        .map(|k| status_field(pid, k))
        .collect()
}

#[test]
fn a_capability_granted_for_bind_is_dropped_after_binding() {
    if !root_or_skip(
        "a_capability_granted_for_bind_is_dropped_after_binding",
        "to hand forkd a capability",
    ) {
        return;
    }
    // As systemd's forkd-standalone.service does: an unprivileged user with
    // CAP_NET_BIND_SERVICE as an ambient capability, binding a port below 1024.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+net_bind_service",
        "--ambient-caps=+net_bind_service",
        forkd(),
    ]);
    let f = Forkd::start_with(cmd, &["-l", "127.0.0.1:997"]);
    assert_eq!(f.addr().port(), 997);
    let mut s = connect(f.addr());
    ping(&mut s, b"no caps");
    let none = vec!["0000000000000000".to_string(); 4];
    f.check_dispatcher_and_child("capabilities", capabilities, &none);
}

/// Bytes waiting in the pipe of a forkd's unread stderr.
fn unread(f: &Forkd) -> usize {
    let mut n: libc::c_int = 0;
    let fd = std::os::fd::AsRawFd::as_raw_fd(f.child.stderr.as_ref().unwrap());
    // SAFETY: FIONREAD stores an int into `n`.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n as usize
}

/// A log reader that stops reading cannot stop forkd: with stderr a pipe
/// nobody drains, 2,100 connections (about 500 used to fill the pipe and
/// hang the dispatcher in a write, deaf to SIGTERM) are all served; once
/// the pipe is read again the dropped lines are counted; SIGTERM stops
/// forkd with exit 0. In fork mode with `-v` the children log too, and
/// must not hang either.
fn a_log_reader_that_stops_reading(args: &[&str]) {
    let mut exact = vec!["--print-addr", "--log", "stderr", "-l", "127.0.0.1:0"];
    exact.extend(args);
    let mut f = Forkd::start_exact_leaving_stderr(&exact);
    let start = Instant::now();
    for i in 0..2100u64 {
        let data = pattern(64, i);
        assert!(
            roundtrip(f.addr(), &data) == data,
            "{args:?}: connection {i} not echoed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{args:?}: only {i} connections in 120 s"
        );
    }
    let unread = unread(&f);
    assert!(
        unread >= 32 << 10,
        "{args:?}: the pipe should be full, holds {unread} bytes"
    );
    // The reader reads again: the next line tells what was lost. Each
    // client makes a line; one logged before the reader has made room is
    // dropped too, so clients come until the notice does.
    f.read_stderr_from_now();
    let mut i = 9999;
    let told = wait_until(Duration::from_secs(10), || {
        i += 1;
        let data = pattern(64, i);
        assert!(roundtrip(f.addr(), &data) == data, "{args:?}: not served");
        f.log().contains(" dropped: the log was not being read")
    });
    assert!(
        told,
        "{args:?}: no count of dropped lines once the pipe drained"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(f.child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = f.child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "{args:?}: SIGTERM gave {status:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || f.log().contains("stopped: ")),
        "{args:?}: no summary line"
    );
}

#[test]
fn a_log_reader_that_stops_reading_cannot_stop_forkd_fork() {
    a_log_reader_that_stops_reading(&["--mode", "fork", "-v"]);
}

#[test]
fn a_log_reader_that_stops_reading_cannot_stop_forkd_thread() {
    a_log_reader_that_stops_reading(&["--mode", "thread"]);
}

#[test]
fn thread_mode_survives_buffers_memory_cannot_give() {
    // 512 MiB of address space, 64 MiB per connection's buffer: a few
    // connections get one, the next ones cannot, and the process must live.
    let cmd = forkd_with_limit(libc::RLIMIT_AS, 512 << 20);
    let mut f = Forkd::start_with(cmd, &["--mode", "thread", "--buffer", "64MiB"]);
    let mut held = Vec::new();
    for _ in 0..16 {
        let Ok(mut s) = TcpStream::connect_timeout(&f.addr(), Duration::from_secs(5)) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"x");
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        held.push(s);
    }
    f.check(
        f.wait_log("cannot serve", Duration::from_secs(10)),
        "no connection was refused for want of memory",
    );
    let alive = f.child.try_wait().unwrap().is_none();
    f.check(alive, "forkd died of an allocation failure");
    drop(held);
    f.check(
        wait_until(Duration::from_secs(10), || {
            let data = pattern(1000, 1);
            roundtrip(f.addr(), &data) == data
        }),
        "not serving once memory was free again",
    );
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(Duration::from_secs(15));
}

#[test]
fn a_client_that_sends_nothing_meets_the_shorter_first_byte_timeout() {
    for mode in ["fork", "thread", "event"] {
        let f = Forkd::start(&[
            "--mode",
            mode,
            "--first-byte-timeout",
            "300ms",
            "--idle-timeout",
            "20s",
        ]);
        let start = Instant::now();
        let mut silent = connect(f.addr());
        let mut b = [0u8; 1];
        let n = silent.read(&mut b);
        f.check(
            matches!(n, Ok(0)) && start.elapsed() < Duration::from_secs(5),
            &format!("{mode}: silent client: {n:?} after {:?}", start.elapsed()),
        );
        f.check(
            f.wait_log("sent nothing (first-byte timeout)", Duration::from_secs(10)),
            "not logged",
        );
        // Once a byte came, pauses longer than the first-byte timeout are fine.
        let mut slow = connect(f.addr());
        ping(&mut slow, b"a");
        std::thread::sleep(Duration::from_millis(800));
        ping(&mut slow, b"b");
    }
}
