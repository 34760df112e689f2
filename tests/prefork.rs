//! Prefork mode against the real binary: the pool, its titles, respawning
//! and its back-off, recycling, the cap, the drain, status, and the
//! thundering herd measured as context switches per connection. (Limits,
//! timeouts and SIGTERM under load run against prefork in tests/faults.rs,
//! systemd's protocols in tests/systemd.rs, a compromised worker in
//! tests/isolation.rs.)

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

fn prefork(args: &[&str]) -> Forkd {
    let mut all = vec!["--mode", "prefork"];
    all.extend_from_slice(args);
    Forkd::start(&all)
}

/// The pool's workers (live children), waiting until there are `n`.
/// Wait for `n` live workers, each past its start (named and titled).
fn workers(f: &Forkd, n: usize) -> Vec<i32> {
    f.check(
        wait_until(LONG, || {
            let kids = f.live_children();
            kids.len() == n
                && kids.iter().all(|&p| {
                    proc_stat(p).is_some_and(|s| s.comm == "forkd-worker")
                        && title_of(p).starts_with("forkd: worker")
                })
        }),
        &format!("expected {n} workers, have {:?}", f.children()),
    );
    f.live_children()
}

fn title_of(pid: i32) -> String {
    cmdline(pid).unwrap_or_default()
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a worker of the forkd this test started.
    unsafe { libc::kill(pid, sig) };
}

#[test]
fn a_pool_of_titled_workers_echoes_every_byte() {
    let f = prefork(&["--workers", "3", "-v"]);
    let pids = workers(&f, 3);
    for p in &pids {
        let st = proc_stat(*p).unwrap();
        f.check(st.comm == "forkd-worker", &format!("comm {:?}", st.comm));
    }
    let mut titles: Vec<String> = pids.iter().map(|&p| title_of(p)).collect();
    titles.sort();
    f.check(
        titles
            == [
                "forkd: worker 1 idle",
                "forkd: worker 2 idle",
                "forkd: worker 3 idle",
            ],
        &format!("titles {titles:?}"),
    );
    // A held connection shows on its worker's title.
    let mut held = connect(f.addr());
    ping(&mut held, b"hello\n");
    let want = format!("conn {}", held.local_addr().unwrap());
    f.check(
        wait_until(LONG, || pids.iter().any(|&p| title_of(p).ends_with(&want))),
        &format!("no worker titled '... {want}'"),
    );
    // Every byte back, any size, half-close honoured.
    for (i, len) in [0usize, 1, 100_000, 3 << 20].into_iter().enumerate() {
        let data = pattern(len, i as u64);
        f.check(roundtrip(f.addr(), &data) == data, &format!("{len} bytes"));
    }
    drop(held);
    // End lines look like fork mode's, with the worker's pid.
    f.check(
        wait_until(LONG, || f.count_log("end pid ") >= 5),
        "end lines",
    );
    let log = f.log();
    let line = log.lines().find(|l| l.contains("end pid ")).unwrap();
    let pid: i32 = line
        .split("end pid ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    f.check(
        pids.contains(&pid) && line.contains(&format!("forkd[{pid}]")),
        &format!("end line not the worker's own: {line}"),
    );
    f.check(
        log.contains("bytes echoed in "),
        "end lines carry bytes and duration",
    );
}

#[test]
fn a_killed_worker_is_replaced_and_logged() {
    let f = prefork(&["--workers", "2"]);
    let before = workers(&f, 2);
    // One idle, then one in the middle of a connection.
    let mut s = connect(f.addr());
    ping(&mut s, b"ten bytes\n");
    let busy = *before
        .iter()
        .find(|&&p| title_of(p).contains(" conn "))
        .expect("a busy worker");
    let idle = *before.iter().find(|&&p| p != busy).unwrap();
    kill(idle, libc::SIGKILL);
    f.check(
        f.wait_log(&format!("pid {idle}: killed by SIGKILL"), LONG),
        "the idle worker's death was not logged",
    );
    kill(busy, libc::SIGKILL);
    f.check(
        f.wait_log(&format!("pid {busy}: killed by SIGKILL after "), LONG),
        "the busy worker's death was not logged",
    );
    f.check(
        f.log()
            .contains("while serving a connection (10 bytes echoed, as it reported)"),
        "the busy worker's connection was not told",
    );
    let mut b = [0u8; 1];
    f.check(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "connection outlived its worker",
    );
    let after = workers(&f, 2);
    f.check(
        after.iter().all(|p| !before.contains(p)),
        &format!("not replaced: before {before:?}, after {after:?}"),
    );
    let data = pattern(50_000, 9);
    f.check(roundtrip(f.addr(), &data) == data, "served after the kills");
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log("respawned 2", LONG),
        "the status line should count 2 respawns",
    );
}

#[test]
fn a_worker_that_dies_at_once_is_replaced_ever_more_slowly() {
    let f = prefork(&["--workers", "1"]);
    let mut last = workers(&f, 1)[0];
    let start = Instant::now();
    // Kill the worker in place 1 as soon as each replacement appears.
    for round in 0..5 {
        kill(last, libc::SIGKILL);
        f.check(
            wait_until(LONG, || {
                f.live_children().first().is_some_and(|&p| p != last)
            }),
            &format!("round {round}: no replacement"),
        );
        last = f.live_children()[0];
    }
    let took = start.elapsed();
    let log = f.log();
    for delay in ["100ms", "200ms", "400ms", "800ms"] {
        f.check(
            log.contains(&format!("replacing it in {delay}")),
            &format!("no back-off of {delay}"),
        );
    }
    // 100 + 200 + 400 + 800 (+ the first kill's) ms at least: no fork loop.
    f.check(
        took >= Duration::from_millis(1500),
        &format!("took {took:?}"),
    );
    // Once a worker lives past a second, its replacement is immediate again.
    std::thread::sleep(Duration::from_millis(1200));
    let cpu = cpu_time(f.pid()).unwrap();
    f.check(cpu < Duration::from_secs(2), &format!("parent CPU {cpu:?}"));
    let data = pattern(1000, 1);
    f.check(
        roundtrip(f.addr(), &data) == data,
        "served after the deaths",
    );
}

#[test]
fn a_worker_is_recycled_after_max_conns_per_worker() {
    let f = prefork(&["--workers", "1", "--max-conns-per-worker", "3"]);
    let first = workers(&f, 1)[0];
    for i in 0..7u64 {
        let data = pattern(100, i);
        f.check(roundtrip(f.addr(), &data) == data, "echo");
    }
    f.check(
        f.wait_log_count("recycled after --max-conns-per-worker connections", 2, LONG),
        "expected two recycles",
    );
    let pids = || {
        let log = f.log();
        let pids: std::collections::BTreeSet<String> = log
            .lines()
            .filter_map(|l| Some(l.split("end pid ").nth(1)?.split(' ').next()?.to_string()))
            .collect();
        pids
    };
    // A worker closes the connection, then logs its end.
    f.check(
        wait_until(LONG, || pids().len() == 3),
        &format!("end lines from {:?}", pids()),
    );
    let log = f.log();
    f.check(
        !f.live_children().contains(&first),
        "the first worker still runs",
    );
    f.check(
        !log.contains("WARN"),
        "a recycle is not trouble: no warning",
    );
}

#[test]
fn the_pool_is_the_cap_and_waiting_clients_are_served_in_turn() {
    let f = prefork(&["--workers", "2"]);
    let mut a = connect(f.addr());
    let mut b = connect(f.addr());
    ping(&mut a, b"a");
    ping(&mut b, b"b");
    let mut c = connect(f.addr());
    f.check(
        unanswered(&mut c, Duration::from_millis(500)),
        "a third client was served by a pool of two",
    );
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log("active 2/2, served 2, workers 2/2", LONG),
        "status line at the cap",
    );
    drop(a);
    let mut x = [0u8; 1];
    // The "?" sent by unanswered() comes back once a worker is free.
    f.check(
        matches!(c.read(&mut x), Ok(1)),
        "the waiting client was not served",
    );
    ping(&mut c, b"c");
    let parent_cpu = cpu_time(f.pid()).unwrap();
    f.check(
        parent_cpu < Duration::from_secs(1),
        &format!("the parent spun: {parent_cpu:?}"),
    );
}

#[test]
fn workers_cannot_outnumber_max_conns() {
    let run = run_with_deadline(
        {
            let mut c = Command::new(forkd());
            c.args(["--mode", "prefork", "--workers", "9", "-c", "8"]);
            c
        },
        LONG,
    );
    assert_eq!(run.status.code(), Some(64), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("--workers 9"), "{run:?}");
    // Without --workers the default pool shrinks to fit the cap.
    let f = prefork(&["-c", "2"]);
    workers(&f, 2);
}

#[test]
fn sigterm_lets_busy_workers_finish_and_refuses_new_clients() {
    let mut f = prefork(&["--workers", "3", "--grace", "20s"]);
    let mut held = connect(f.addr());
    ping(&mut held, b"before");
    f.signal(libc::SIGTERM);
    f.check(f.wait_log("stopping:", LONG), "no stopping line");
    // Idle workers leave at once; new clients are refused, not queued.
    f.check(
        wait_until(LONG, || f.live_children().len() == 1),
        "idle workers did not leave",
    );
    f.check(
        TcpStream::connect_timeout(&f.addr(), Duration::from_secs(2)).is_err(),
        "a new client was accepted while draining",
    );
    ping(&mut held, b"still served while draining");
    drop(held);
    f.expect_clean_exit(LONG);
    f.check(
        f.log()
            .contains("stopped: 1 connection served, 1 ended (0 by signal)"),
        "summary",
    );
}

#[test]
fn after_the_grace_a_busy_worker_is_ended_and_counted() {
    let mut f = prefork(&["--workers", "2", "--grace", "500ms"]);
    let mut held = connect(f.addr());
    ping(&mut held, b"x");
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    let log = f.log();
    f.check(
        log.contains("grace period over: sending SIGTERM to 1 connection"),
        "grace over",
    );
    f.check(
        log.contains("stopped: 1 connection served, 1 ended (1 by signal)"),
        "summary",
    );
}

#[test]
fn sigquit_kills_the_pool_and_exits() {
    let mut f = prefork(&["--workers", "2"]);
    let pids = workers(&f, 2);
    let mut held = connect(f.addr());
    ping(&mut held, b"x");
    f.signal(libc::SIGQUIT);
    f.expect_clean_exit(LONG);
    f.check(pids.iter().all(|&p| ended(p)), "workers outlived SIGQUIT");
}

#[test]
fn a_worker_gets_the_default_for_signals_the_parent_handles() {
    let f = prefork(&["--workers", "1"]);
    let w = workers(&f, 1)[0];
    // SIGUSR1 means "status" to the parent, and its default (the end) to a worker.
    kill(w, libc::SIGUSR1);
    f.check(
        f.wait_log(&format!("pid {w}: killed by SIGUSR1"), LONG),
        "the worker did not die of SIGUSR1",
    );
    f.check(
        !f.log().contains("status:"),
        "the worker's signal reached the parent",
    );
    workers(&f, 1);
}

#[test]
fn the_parent_dying_drains_its_workers() {
    let mut f = prefork(&["--workers", "2"]);
    let pids = workers(&f, 2);
    let mut held = connect(f.addr());
    ping(&mut held, b"x");
    f.signal(libc::SIGKILL);
    f.wait_exit(LONG);
    // The stop pipe's write end died with the parent: the idle worker leaves,
    // the busy one finishes its client first.
    let busy: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| title_of(p).contains(" conn "))
        .collect();
    assert_eq!(busy.len(), 1, "{pids:?}");
    assert!(
        wait_until(LONG, || pids.iter().filter(|&&p| !ended(p)).count() == 1),
        "the idle orphan did not leave"
    );
    ping(&mut held, b"served by an orphan");
    drop(held);
    assert!(
        wait_until(LONG, || ended(busy[0])),
        "the busy orphan did not leave"
    );
}

/// Voluntary context switches of `pids`, summed: each is a sleep, and so one
/// wake-up to come.
fn switches(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|&p| {
            status_field(p, "voluntary_ctxt_switches")
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

/// Context switches of the whole pool per connection, with 8 workers and
/// two listeners, 200 connections one after another alternating between them.
fn switches_per_connection(wake: &str, listeners: usize) -> (f64, String) {
    let mut args = vec!["--workers", "8", "--wake", wake, "-q"];
    for _ in 0..listeners {
        args.extend(["-l", "127.0.0.1:0"]);
    }
    let f = prefork(&args);
    let pids = workers(&f, 8);
    // Let every worker settle into its wait.
    std::thread::sleep(Duration::from_millis(300));
    let before = switches(&pids);
    let n = 200;
    for i in 0..n {
        let data = pattern(64, i as u64);
        f.check(roundtrip(f.addrs[i % listeners], &data) == data, "echo");
    }
    std::thread::sleep(Duration::from_millis(100));
    let per = (switches(&pids) - before) as f64 / n as f64;
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log("context switches per connection", LONG),
        "status line",
    );
    let status = f
        .log()
        .lines()
        .find(|l| l.contains("status:"))
        .unwrap()
        .to_string();
    (per, status)
}

#[test]
fn one_connection_wakes_one_worker_not_the_pool() {
    // Two listeners: the workers wait in epoll.
    let (one, status_one) = switches_per_connection("one", 2);
    let (all, status_all) = switches_per_connection("all", 2);
    // One listener: they block in accept itself.
    let (blocking, _) = switches_per_connection("one", 1);
    eprintln!(
        "context switches per connection: wake one {one:.2}, wake all {all:.2}, \
         one listener {blocking:.2}"
    );
    eprintln!("{status_one}\n{status_all}");
    assert!(
        blocking < 5.0,
        "one listener: {blocking:.2} switches per connection"
    );
    // The worker that serves sleeps a few times per connection (waiting for
    // it, for its bytes, for their end); the herd adds the other idle workers.
    assert!(one < 5.0, "--wake one: {one:.2} switches per connection");
    assert!(all > one + 3.0, "--wake all: {all:.2}, one: {one:.2}");
    assert!(status_one.contains("(wake one)"), "{status_one}");
}

/// `scripts/zombie-lab.sh prefork`: the pool on show, a worker killed and
/// replaced, the drain.
#[test]
fn zombie_lab_kills_a_worker_and_the_pool_replaces_it() {
    let lab = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/zombie-lab.sh");
    let mut cmd = Command::new(&lab);
    cmd.arg("prefork")
        .env("FORKD", forkd())
        .env("LAB_TIMEOUT", "60");
    let run = run_with_deadline(cmd, Duration::from_secs(90));
    let out = format!("{}{}", run.stdout, run.stderr);
    assert!(run.status.success(), "{:?}\n{out}", run.status);
    for needed in [
        // Whichever worker the kernel woke (not always the first).
        " conn 127.0.0.1:",
        " idle",
        "killed by SIGKILL after ",
        "replacing it",
        "stopped: 1 connection served, 1 ended (0 by signal)",
        "Done.",
    ] {
        assert!(
            out.contains(needed),
            "the lab's output lacks {needed:?}:\n{out}"
        );
    }
    // Three workers again after the kill, none of them the one killed.
    let killed = out
        .split("kill -KILL ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the lab names the worker it kills");
    let after = out.split("2. A worker is killed").nth(1).unwrap();
    let listing = after.split("The parent reaped it").next().unwrap();
    assert_eq!(listing.matches("forkd-worker").count(), 3, "{listing}");
    assert!(!listing.contains(&format!(" {killed} ")), "{listing}");
}

/// A worker keeps its timeouts by a ticking timer (src/ticker.rs): a
/// client that keeps moving bytes, each pause shorter than the idle
/// timeout, is never cut however long it lasts; once it stops, it is.
#[test]
fn a_slow_client_that_keeps_moving_outlives_the_idle_timeout() {
    let f = prefork(&["--workers", "2", "--idle-timeout", "600ms"]);
    let mut s = connect(f.addr());
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        ping(&mut s, b"x");
        sent += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    f.check(
        !f.log().contains("idle timeout"),
        "a client with pauses of 200 ms was cut by a 600 ms idle timeout",
    );
    // Now silent: it ends within the timeout and a few ticks.
    let quiet = Instant::now();
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(LONG)).unwrap();
    let n = s.read(&mut b);
    f.check(
        matches!(n, Ok(0)),
        &format!("the idle client was not closed: {n:?}"),
    );
    let waited = quiet.elapsed();
    f.check(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        &format!("closed after {waited:?} of silence, with a 600 ms idle timeout"),
    );
    f.check(
        f.wait_log(&format!("idle timeout, {sent} bytes echoed"), LONG),
        "the end line does not say idle timeout with every byte echoed",
    );
}
