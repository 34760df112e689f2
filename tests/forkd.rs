//! forkd's core behaviour, seen the way a user sees it: the real binary on
//! port 0, real sockets, and the process table in /proc and `ps`.
//!
//! Every wait has a deadline and polls, so a loaded machine only makes the
//! tests slower, never wrong. A few checks are about something *not*
//! happening (a client left in the backlog, zombies left alone); those watch
//! for a fixed short while, which can only make them miss a bug, never fail
//! a working forkd.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

/// Read until the server closes; true if it did (end of file or reset) within 10 s.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                );
            }
        }
    }
}

/// Open `n` connections and make sure each is being served (one echo each).
fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(addr);
            ping(&mut s, format!("held {i}\n").as_bytes());
            s
        })
        .collect()
}

// ---- many clients at once

/// 200 clients connect, each proves it is served, and only then do all of
/// them send 64 KiB of their own bytes at once; every byte must come back.
fn two_hundred_clients(mode: &str) {
    const CLIENTS: usize = 200;
    const LEN: usize = 64 << 10;
    raise_nofile();
    let f = Forkd::start(&["--mode", mode, "--idle-timeout", "60s"]);
    let addr = f.addr();
    let ready = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (ready, failed, go) = (ready.clone(), failed.clone(), go.clone());
            std::thread::spawn(move || {
                let run = || -> Result<(), String> {
                    let mut s = TcpStream::connect_timeout(&addr, LONG)
                        .map_err(|e| format!("client {i}: connect: {e}"))?;
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                    let hello = format!("client {i}\n");
                    s.write_all(hello.as_bytes())
                        .map_err(|e| format!("client {i}: {e}"))?;
                    let mut back = vec![0u8; hello.len()];
                    s.read_exact(&mut back)
                        .map_err(|e| format!("client {i}: first echo: {e}"))?;
                    ready.fetch_add(1, Ordering::SeqCst);
                    if !wait_until(Duration::from_secs(30), || go.load(Ordering::SeqCst)) {
                        return Err(format!("client {i}: never told to go"));
                    }
                    let data = pattern(LEN, i as u64 + 1);
                    let back =
                        echo_all(&mut s, data.clone()).map_err(|e| format!("client {i}: {e}"))?;
                    if back != data {
                        let at = back.iter().zip(&data).position(|(a, b)| a != b);
                        return Err(format!(
                            "client {i}: {} bytes back of {LEN}, first difference at {at:?}",
                            back.len()
                        ));
                    }
                    Ok(())
                };
                let result = run();
                if result.is_err() {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                result
            })
        })
        .collect();

    let all_in = wait_until(Duration::from_secs(30), || {
        ready.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) == CLIENTS
    });
    let served_at_once = ready.load(Ordering::SeqCst);
    if mode == "fork" && served_at_once == CLIENTS {
        let kids = f.live_children();
        f.check(
            kids.len() == CLIENTS,
            &format!("{} children for {CLIENTS} open clients", kids.len()),
        );
    }
    if mode == "thread" && served_at_once == CLIENTS {
        let threads: usize = status_field(f.pid(), "Threads").parse().unwrap_or(0);
        f.check(
            threads > CLIENTS,
            &format!("{threads} threads for {CLIENTS} open clients"),
        );
    }
    go.store(true, Ordering::SeqCst);
    let errors: Vec<String> = clients
        .into_iter()
        .filter_map(|t| match t.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("a client thread panicked".into()),
        })
        .collect();
    f.check(
        all_in && errors.is_empty(),
        &format!(
            "{served_at_once}/{CLIENTS} served at once; {} failed:\n{}",
            errors.len(),
            errors.join("\n")
        ),
    );
    let label = if mode == "fork" {
        "end pid"
    } else {
        "end conn"
    };
    let ends = f.wait_log_count(label, CLIENTS, LONG);
    f.check(ends, &format!("expected {CLIENTS} '{label}' lines"));
}

#[test]
fn two_hundred_concurrent_clients_fork_mode() {
    two_hundred_clients("fork");
}

#[test]
fn two_hundred_concurrent_clients_thread_mode() {
    two_hundred_clients("thread");
}

#[test]
fn two_hundred_concurrent_clients_event_mode() {
    two_hundred_clients("event");
}

// ---- the process tree

#[test]
fn one_child_per_held_connection_with_names_for_ps() {
    let f = Forkd::start(&[]);
    let held = hold(f.addr(), 3);
    f.check(
        wait_until(LONG, || f.live_children().len() == 3),
        "expected 3 children",
    );

    let me = proc_stat(f.pid()).unwrap();
    f.check(
        me.comm == "forkd",
        &format!("dispatcher comm is {:?}", me.comm),
    );
    for kid in f.children() {
        f.check(
            kid.ppid == f.pid(),
            &format!("{kid:?} is not the dispatcher's child"),
        );
        f.check(
            kid.comm == "forkd-conn",
            &format!("child comm is {:?}", kid.comm),
        );
    }

    // What `ps` prints: the dispatcher as forkd, its children as forkd-conn.
    let pid = f.pid().to_string();
    let ps = Command::new("ps")
        .args(["-o", "pid,ppid,stat,comm", "-p", &pid, "--ppid", &pid])
        .output()
        .expect("run ps (Debian package procps)");
    let text = String::from_utf8_lossy(&ps.stdout).to_string();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let dispatcher_rows = rows
        .iter()
        .filter(|r| r[0] == pid && r[3] == "forkd")
        .count();
    let child_rows = rows
        .iter()
        .filter(|r| r[1] == pid && r[3] == "forkd-conn")
        .count();
    f.check(
        dispatcher_rows == 1 && child_rows == 3,
        &format!("ps shows {dispatcher_rows} dispatcher and {child_rows} child rows:\n{text}"),
    );

    // Each child's command line names the client it serves.
    let titles: BTreeSet<String> = f
        .live_children()
        .iter()
        .filter_map(|&p| cmdline(p))
        .collect();
    let expected: BTreeSet<String> = held
        .iter()
        .map(|s| format!("forkd: conn {}", s.local_addr().unwrap()))
        .collect();
    f.check(
        titles == expected,
        &format!("child titles {titles:?}, expected {expected:?}"),
    );
}

// ---- reaping

#[test]
fn no_zombies_shortly_after_clients_close() {
    let f = Forkd::start(&[]);
    for i in 0..10 {
        let data = pattern(1000, i);
        assert_eq!(roundtrip(f.addr(), &data), data);
    }
    // Ten at once, closed together: their SIGCHLDs merge.
    let held = hold(f.addr(), 10);
    f.check(
        wait_until(LONG, || f.live_children().len() == 10),
        "expected 10 children",
    );
    drop(held);
    f.check(
        wait_until(LONG, || f.children().is_empty()),
        &format!("children left behind: {:?}", f.children()),
    );
    f.check(
        f.wait_log_count("end pid", 20, LONG),
        "expected 20 'end pid' lines",
    );
}

#[test]
fn lazy_reaping_keeps_zombies_until_the_next_accept() {
    let f = Forkd::start(&["--reap", "lazy"]);
    let held = hold(f.addr(), 3);
    let pids = {
        f.check(
            wait_until(LONG, || f.live_children().len() == 3),
            "expected 3 children",
        );
        f.live_children()
    };
    drop(held);
    f.check(wait_until(LONG, || f.zombies() == 3), "expected 3 zombies");
    // Nothing reaps them while no client arrives (a wake-up by signal neither).
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log("zombies 3", LONG),
        "SIGUSR1's status line should count 3 zombies",
    );
    f.check(
        !wait_until(Duration::from_millis(500), || f.zombies() != 3),
        "lazy zombies went away with no new client",
    );
    f.check(
        f.count_log("end pid") == 0,
        "ends logged before any reaping",
    );

    let mut next = connect(f.addr());
    ping(&mut next, b"next client\n");
    f.check(
        wait_until(LONG, || f.zombies() == 0),
        &format!("zombies left after the next accept: {:?}", f.children()),
    );
    for pid in pids {
        f.check(
            proc_stat(pid).is_none(),
            &format!("old child {pid} still in the process table"),
        );
        f.check(
            f.wait_log(&format!("end pid {pid} "), LONG),
            &format!("no end line for {pid}"),
        );
    }
    f.check(
        f.live_children().len() == 1,
        "the new client's child should be the only one",
    );
}

#[test]
fn reap_off_keeps_zombies_and_they_count_against_the_cap() {
    let mut f = Forkd::start(&["--reap", "off", "-c", "3"]);
    let held = hold(f.addr(), 3);
    drop(held);
    f.check(wait_until(LONG, || f.zombies() == 3), "expected 3 zombies");
    f.check(
        f.wait_log("at the cap of 3", LONG),
        "the cap should be logged",
    );

    // A fourth client gets through the handshake (the backlog) but is not served.
    let mut fourth = connect(f.addr());
    f.check(
        unanswered(&mut fourth, Duration::from_secs(1)),
        "a 4th client was served while 3 zombies fill the cap",
    );
    f.check(
        f.zombies() == 3 && f.children().len() == 3,
        "zombies should stay",
    );
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log("active 3/3, served 3, reaped 0, zombies 3", LONG),
        "status line with 3 zombies",
    );
    f.check(f.count_log("at the cap") == 1, "the cap logged once");

    // At the stop forkd reaps them all and exits at once (nothing is live).
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    f.check(
        f.log().contains("stopped: 3 connections served, 3 ended"),
        "summary should count the 3 reaped zombies",
    );
    f.check(
        closed_by_server(&mut fourth),
        "the waiting client should be dropped",
    );
}

// ---- signals

#[test]
fn sigterm_lets_a_held_connection_finish_during_the_grace_period() {
    let mut f = Forkd::start(&["--grace", "20s"]);
    let addr = f.addr();
    let mut held = hold(addr, 1).pop().unwrap();
    f.signal(libc::SIGTERM);
    f.check(
        f.wait_log("stopping: no new connections; 1 active", LONG),
        "no stopping line",
    );
    // New clients are refused once the listener is closed ...
    f.check(
        wait_until(LONG, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err()
        }),
        "still accepting after SIGTERM",
    );
    // ... while the held one is still served.
    ping(&mut held, b"still here during the grace period\n");
    let running = f.child.try_wait().unwrap().is_none();
    f.check(running, "forkd exited with a connection open");
    let back = echo_all(&mut held, b"last words".to_vec()).unwrap();
    assert_eq!(back, b"last words");
    f.expect_clean_exit(LONG);
    let log = f.log();
    f.check(
        log.contains("closed by client"),
        "the held connection should end normally",
    );
    f.check(
        log.contains("stopped: 1 connection served, 1 ended (0 by signal)"),
        "no summary line",
    );
}

#[test]
fn sigterm_after_a_short_grace_terminates_an_idle_child() {
    let mut f = Forkd::start(&["--grace", "300ms"]);
    let mut held = hold(f.addr(), 1).pop().unwrap();
    let kid = f.live_children()[0];
    let t0 = Instant::now();
    f.signal(libc::SIGTERM);
    let exited = f.wait_exit(LONG);
    let took = t0.elapsed();
    f.check(exited.is_some(), "forkd did not stop");
    f.expect_clean_exit(LONG);
    f.check(
        took < Duration::from_secs(5),
        &format!("took {took:?} to stop"),
    );
    let log = f.log();
    f.check(
        log.contains("grace period over: sending SIGTERM to 1 connection"),
        "no SIGTERM line",
    );
    f.check(
        log.contains(&format!("end pid {kid} ")) && log.contains("killed by SIGTERM"),
        "the child should end by SIGTERM",
    );
    f.check(
        log.contains("stopped: 1 connection served, 1 ended (1 by signal)"),
        "no summary",
    );
    f.check(wait_until(LONG, || ended(kid)), "the child still runs");
    f.check(
        closed_by_server(&mut held),
        "the client should see its connection closed",
    );
}

#[test]
fn sigquit_kills_the_children_and_exits() {
    let mut f = Forkd::start(&[]);
    let mut held = hold(f.addr(), 2);
    f.check(
        wait_until(LONG, || f.live_children().len() == 2),
        "expected 2 children",
    );
    let kids = f.live_children();
    f.signal(libc::SIGQUIT);
    f.expect_clean_exit(LONG);
    let log = f.log();
    f.check(
        log.contains("SIGQUIT: killing 2 connections"),
        "no SIGQUIT line",
    );
    f.check(
        log.matches("killed by SIGKILL").count() == 2,
        "both children should be killed",
    );
    for kid in kids {
        f.check(
            wait_until(LONG, || ended(kid)),
            &format!("child {kid} survived SIGQUIT"),
        );
    }
    for s in &mut held {
        f.check(closed_by_server(s), "a client's connection stayed open");
    }
}

#[test]
fn sigusr1_logs_a_status_line() {
    for mode in ["fork", "thread", "event"] {
        let f = Forkd::start(&["--mode", mode]);
        let _held = hold(f.addr(), 1);
        f.signal(libc::SIGUSR1);
        let expected = match mode {
            "fork" => {
                "status: mode fork (reap handler), active 1/1024, served 1, reaped 0, zombies 0"
            }
            "event" => "status: mode event (epoll), active 1/1024, served 1, ended 0",
            _ => "status: mode thread, active 1/1024, served 1, ended 0",
        };
        f.check(
            f.wait_log(expected, LONG),
            &format!("no status line {expected:?}"),
        );
    }
}

// ---- the connection cap

#[test]
fn at_the_cap_clients_wait_without_the_dispatcher_spinning() {
    let f = Forkd::start(&["-c", "2"]);
    let mut held = hold(f.addr(), 2);
    f.check(
        f.wait_log("at the cap of 2 connections", LONG),
        "the cap should be logged",
    );
    let mut third = connect(f.addr());
    let mut fourth = connect(f.addr());

    let cpu0 = cpu_time(f.pid()).unwrap();
    // Wake the dispatcher a few times while at the cap: still one cap line.
    for _ in 0..3 {
        f.signal(libc::SIGUSR1);
    }
    f.check(
        unanswered(&mut third, Duration::from_secs(1)),
        "a 3rd client was served at a cap of 2",
    );
    let spent = cpu_time(f.pid()).unwrap() - cpu0;
    f.check(
        spent < Duration::from_millis(200),
        &format!("the dispatcher used {spent:?} of CPU in ~1 s at the cap"),
    );
    f.check(
        f.count_log("at the cap") == 1,
        "the cap should be logged once per episode",
    );
    f.check(f.wait_log("active 2/2", LONG), "status should show 2/2");

    // One ends: the first waiting client is served, with the byte it sent.
    drop(held.remove(0));
    third.set_read_timeout(Some(LONG)).unwrap();
    let mut b = [0u8; 1];
    third.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"?");
    ping(&mut third, b"served now\n");
    f.check(
        f.wait_log("below the cap again", LONG),
        "leaving the cap should be logged",
    );
    f.check(
        unanswered(&mut fourth, Duration::from_millis(300)),
        "a 4th client was served at a cap of 2",
    );
    drop(held);
    fourth.set_read_timeout(Some(LONG)).unwrap();
    let got = fourth.read_exact(&mut b);
    f.check(
        got.is_ok() && &b == b"?",
        &format!("the 4th client got {got:?} {b:?}"),
    );
    ping(&mut fourth, b"served at last\n");
}

// ---- restarts and start-up errors

#[test]
fn restart_binds_at_once_despite_server_side_time_wait() {
    let mut f = Forkd::start(&["--idle-timeout", "200ms"]);
    let addr = f.addr();
    // forkd closes first (idle timeout), so its side of the connection is
    // the one that waits in TIME_WAIT once the client closes too.
    let mut idle = connect(addr);
    f.check(
        closed_by_server(&mut idle),
        "the idle connection was not closed by forkd",
    );
    drop(idle);
    f.check(
        f.wait_log("first-byte timeout", LONG),
        "no timeout end line",
    );
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    const TIME_WAIT: u8 = 0x06;
    let waiting = wait_until(Duration::from_secs(5), || {
        tcp_states(addr.port()).contains(&TIME_WAIT)
    });
    if !waiting {
        // The kernel skips TIME_WAIT only when its table of them is full
        // (tcp_max_tw_buckets), as a busy load test elsewhere can make it.
        let max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(usize::MAX);
        let all = tcp_states_all().iter().filter(|&&s| s == TIME_WAIT).count();
        f.check(
            all + 100 >= max,
            &format!(
                "no TIME_WAIT on port {} ({:?}), with {all} of {max} TIME_WAIT slots in use",
                addr.port(),
                tcp_states(addr.port())
            ),
        );
        eprintln!("TIME_WAIT table full ({all} of {max}): restarting without one on the port");
    }

    let listen = addr.to_string();
    let again = Forkd::start(&["-l", &listen]);
    assert_eq!(again.addr(), addr);
    let data = pattern(4096, 7);
    assert_eq!(roundtrip(addr, &data), data);
}

fn forkd_run(args: &[&str]) -> Run {
    let mut cmd = Command::new(forkd());
    cmd.args(args).env("RUST_BACKTRACE", "1");
    run_with_deadline(cmd, LONG)
}

/// The exit code is `code` and stderr is one line, `forkd: error: ...`, with no panic.
fn check_error(args: &[&str], code: i32, mentions: &str) {
    check_run(forkd_run(args), args, code, mentions);
}

fn check_run(run: Run, args: &[&str], code: i32, mentions: &str) {
    let err = run.stderr.trim_end();
    let ok = run.status.code() == Some(code)
        && err.lines().count() == 1
        && err.starts_with("forkd: error: ")
        && err.contains(mentions)
        && !err.contains("panicked")
        && !err.contains("backtrace")
        && run.stdout.is_empty();
    assert!(
        ok,
        "forkd {args:?}: expected exit {code} and one line mentioning {mentions:?}, got {:?}\nstderr: {}\nstdout: {}",
        run.status, run.stderr, run.stdout
    );
}

#[test]
fn bad_arguments_exit_64_with_one_line() {
    check_error(&["--no-such-option"], 64, "--no-such-option");
    check_error(&["-l", "nonsense"], 64, "nonsense");
    check_error(&["-l", "127.0.0.1"], 64, "127.0.0.1");
    check_error(&["-c", "0"], 64, "at least 1");
    check_error(&["--grace", "soon"], 64, "soon");
    check_error(&["--buffer", "0"], 64, "--buffer");
    check_error(&["--buffer", "1TiB"], 64, "--buffer");
    check_error(&["--mode", "forks"], 64, "forks");
    // The line names the argument and what it may be.
    check_error(
        &["--mode", "forks"],
        64,
        "'--mode <MODE>' [possible values: fork, thread, prefork, event]",
    );
    check_error(&["--mode", "prefork", "--workers", "0"], 64, "--workers");
    check_error(&["--reap"], 64, "'--reap <REAP>'");
    check_error(&["--reap"], 64, "[possible values: handler, lazy, off]");
    check_error(
        &["--idle-timeout", "-1"],
        64,
        "'-1' for '--idle-timeout <DUR>'",
    );
    check_error(&["--max-per-ip", "-1"], 64, "'-1' for '--max-per-ip <N>'");
    check_error(
        &["--mod", "fork"],
        64,
        "a similar argument exists: '--mode'",
    );
    check_error(
        &["--group", "daemon", "-l", "127.0.0.1:0"],
        64,
        "--group needs --user",
    );
    let help = forkd_run(&["--help"]);
    assert!(
        help.status.success()
            && help.stdout.contains("--max-conns")
            && help
                .stdout
                .starts_with("forkd: a process-per-connection echo server"),
        "{help:?}"
    );
}

/// Durations and sizes that cannot work are refused at start, naming the
/// option: `--grace 18446744073709551615s` used to be accepted and then
/// panicked at SIGTERM (Instant overflow), and the same `--idle-timeout`
/// reached the kernel as a negative SO_RCVTIMEO.
#[test]
fn durations_and_sizes_that_cannot_work_exit_64_naming_the_option() {
    let cases = [
        ("--grace", "18446744073709551615s"),
        ("--grace", "300000000000years"),
        ("--grace", "11years"),
        ("--idle-timeout", "18446744073709551615s"),
        ("--idle-timeout", "300000000000years"),
        ("--idle-timeout", "1ns"),
        ("--thread-stack", "100GiB"),
        ("--thread-stack", "18446744073709551616"),
        ("--buffer", "100GiB"),
        ("--max-conns", "18446744073709551615"),
        ("--max-conns", "100000000"),
        ("--backlog", "4294967296"),
        ("--max-per-ip", "4294967296"),
    ];
    for (option, value) in cases {
        let args = ["-l", "127.0.0.1:0", "--log", "stderr", option, value];
        check_error(&args, 64, option);
    }
}

/// The longest durations accepted work: forkd serves, and stops at once on
/// SIGTERM with no connection open, exit 0, no panic.
#[test]
fn the_longest_durations_accepted_still_stop_cleanly() {
    for mode in ["fork", "thread", "event"] {
        let args = [
            "--mode",
            mode,
            "--grace",
            "10years",
            "--idle-timeout",
            "10years",
        ];
        let mut f = Forkd::start(&args);
        let data = pattern(1000, 12);
        assert_eq!(roundtrip(f.addr(), &data), data);
        f.signal(libc::SIGTERM);
        f.expect_clean_exit(LONG);
    }
}

/// A sysctl's number, from /proc/sys (`kernel.pid_max`).
fn sysctl(name: &str) -> Option<u64> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Limits the host cannot honour are refused at start with the reason,
/// before any table is sized by them: `-c 100000000 --mode thread` used to
/// grow past 3 GiB before listening, and `--thread-stack 100GiB` announced
/// itself ready, then refused every connection.
#[test]
fn limits_the_host_cannot_honour_are_refused_at_start() {
    // One connection more than the kernel has pids or tasks for, in each mode.
    let tasks = ["kernel.pid_max", "kernel.threads-max"]
        .iter()
        .filter_map(|n| sysctl(n))
        .min()
        .expect("kernel.pid_max readable");
    let over = tasks.to_string();
    for mode in ["fork", "thread"] {
        let args = [
            "-l",
            "127.0.0.1:0",
            "--log",
            "stderr",
            "--mode",
            mode,
            "-c",
            &over,
        ];
        let run = forkd_run(&args);
        assert!(
            run.stderr.contains("kernel.") || run.stderr.contains("any Linux host"),
            "{mode}: the refusal should give the reason: {}",
            run.stderr
        );
        check_run(run, &args, 64, "--max-conns");
    }

    // A stack the address space cannot hold (RLIMIT_AS 512 MiB): forkd
    // creates one thread with it at start, and refuses with the kernel's reason.
    let args = ["-l", "127.0.0.1:0", "--log", "stderr", "--mode", "thread"];
    let args = [&args[..], &["--thread-stack", "1GiB"]].concat();
    let mut cmd = Command::new(forkd());
    cmd.args(&args);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only setrlimit(2), which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 512 << 20,
                    rlim_max: 512 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    check_run(
        run_with_deadline(cmd, LONG),
        &args,
        64,
        "--thread-stack 1073741824 bytes: cannot create a thread",
    );
}

#[test]
fn unavailable_addresses_and_unknown_users_have_their_own_codes() {
    // Busy: a listener already holds the port.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    check_error(&["-l", &addr, "--log", "stderr"], 69, "in use");
    // Busy: another forkd holds it.
    let f = Forkd::start(&[]);
    let taken = f.addr().to_string();
    check_error(&["-l", &taken, "--log", "stderr"], 69, &taken);
    // Not an address of this host (TEST-NET-1).
    check_error(
        &["-l", "192.0.2.1:7007", "--log", "stderr"],
        69,
        "192.0.2.1:7007",
    );
    check_error(
        &[
            "--user",
            "no-such-user-for-forkd",
            "-l",
            "127.0.0.1:0",
            "--log",
            "stderr",
        ],
        67,
        "no-such-user-for-forkd",
    );
}

/// Addresses no socket of this host can serve exit 69, as the README's
/// table says, not 71: an interface index that does not exist, and an
/// IPv4-mapped IPv6 address (IPv6 listeners are V6ONLY).
#[test]
fn a_missing_interface_and_a_mapped_address_exit_69() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 on this host: nothing to check");
        return;
    }
    let taken = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path().join("ifindex")).is_ok_and(|i| i.trim() == "999")
        });
    if !taken {
        let args = ["-l", "[fe80::1%999]:0", "--log", "stderr"];
        check_error(&args, 69, "[fe80::1%999]:0");
    }
    let args = ["-l", "[::ffff:127.0.0.1]:0", "--log", "stderr"];
    check_error(&args, 69, "listen on 127.0.0.1:0 instead");
}

#[test]
fn a_privileged_port_without_permission_exits_77() {
    let unprivileged_start: u32 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024);
    if unprivileged_start <= 1 {
        eprintln!(
            "every port is unprivileged on this host (ip_unprivileged_port_start = 0): nothing to check"
        );
        return;
    }
    let args = ["-l", "127.0.0.1:1", "--log", "stderr"];
    let mut cmd = Command::new(forkd());
    cmd.args(args).env("RUST_BACKTRACE", "1");
    // SAFETY: getuid is always safe to call.
    if unsafe { libc::getuid() } == 0 {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only setgroups/setgid/setuid, all
        // async-signal-safe, to run forkd as nobody without capabilities.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    check_run(run_with_deadline(cmd, LONG), &args, 77, "127.0.0.1:1");
}

#[test]
fn ipv6_loopback_works() {
    let f = Forkd::start(&["-l", "[::1]:0"]);
    let addr = f.addr();
    assert!(addr.is_ipv6() && addr.ip().is_loopback(), "bound {addr}");
    let data = pattern(100_000, 6);
    assert_eq!(roundtrip(addr, &data), data);
    let held = hold(addr, 1);
    f.check(
        wait_until(LONG, || f.live_children().len() == 1),
        "expected a child",
    );
    let title = cmdline(f.live_children()[0]).unwrap_or_default();
    let expected = format!("forkd: conn {}", held[0].local_addr().unwrap());
    f.check(
        title == expected,
        &format!("child title {title:?}, expected {expected:?}"),
    );
    f.check(expected.starts_with("forkd: conn [::1]:"), &expected);
}

/// `scripts/zombie-lab.sh` bounds its own steps with LAB_TIMEOUT, not the
/// learner reading at its prompts: at a terminal (script(1) gives it one), a
/// reader who spends twice LAB_TIMEOUT at the five prompts of a mode still
/// sees the lab through. And the watchdog still bounds the steps themselves.
#[test]
fn zombie_lab_times_its_steps_not_the_reader() {
    let lab = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/zombie-lab.sh");
    // The reader: Enter every 2 s, five times (the sleeps are the reading).
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"for i in 1 2 3 4 5; do sleep 2; echo; done | script -qec "$0 handler" /dev/null"#,
    ])
    .arg(&lab)
    .env("FORKD", forkd())
    .env("LAB_TIMEOUT", "5");
    let run = run_with_deadline(cmd, Duration::from_secs(60));
    let out = format!("{}{}", run.stdout, run.stderr);
    assert!(
        run.status.success() && out.contains("Done.") && !out.contains("gave up"),
        "the lab under a terminal with a slow reader: {:?}\n{out}",
        run.status
    );
    assert_eq!(out.matches("[Enter to go on]").count(), 5, "{out}");

    let mut cmd = Command::new(&lab);
    cmd.arg("handler")
        .env("FORKD", forkd())
        .env("LAB_TIMEOUT", "0");
    let run = run_with_deadline(cmd, LONG);
    assert!(
        !run.status.success() && run.stderr.contains("zombie-lab: gave up"),
        "LAB_TIMEOUT=0 must stop the lab: {run:?}"
    );
}
