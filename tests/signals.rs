//! What every signal an operator or the kernel can send does to forkd, in
//! both modes: each has the meaning the README's signal table gives it, and
//! none kills the dispatcher or drops a connection unless it means to.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);
const MODES: [&str; 3] = ["fork", "thread", "event"];

/// Is `signal` pending for `pid` (process-wide or for its main thread)?
fn pending(pid: i32, signal: i32) -> bool {
    ["ShdPnd", "SigPnd"].iter().any(|key| {
        let mask = u64::from_str_radix(&status_field(pid, key), 16).unwrap_or(0);
        mask & (1 << (signal - 1)) != 0
    })
}

fn served(f: &Forkd, what: &str) {
    let data = pattern(3000, 3);
    f.check(roundtrip(f.addr(), &data) == data, what);
}

#[test]
fn signals_without_a_meaning_are_ignored_and_logged() {
    let rtmin = libc::SIGRTMIN();
    let rtmax = libc::SIGRTMAX();
    let signals = [
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGSYS, "SIGSYS"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGIO, "SIGIO"),
        (rtmin, "SIGRTMIN+0"),
        (rtmin + 5, "SIGRTMIN+5"),
        (rtmax, ""),
    ];
    for mode in MODES {
        let mut f = Forkd::start(&["--mode", mode]);
        // A connection held through all of it must survive, in thread mode too.
        let mut held = connect(f.addr());
        ping(&mut held, b"before\n");
        for (sig, name) in signals {
            f.signal(sig);
            if !name.is_empty() {
                f.check(
                    f.wait_log(name, LONG),
                    &format!("{mode}: {name} was not logged as ignored"),
                );
            }
            let alive = f.child.try_wait().unwrap().is_none();
            f.check(
                alive,
                &format!("{mode}: signal {sig} ({name}) killed forkd"),
            );
            served(&f, &format!("{mode}: not serving after signal {sig}"));
        }
        f.signal(libc::SIGTTOU);
        f.signal(libc::SIGTTIN);
        served(&f, &format!("{mode}: not serving after SIGTTOU/SIGTTIN"));
        ping(&mut held, b"after\n");
        f.check(f.log().contains(": forkd gives it no meaning"), "wording");
        f.signal(libc::SIGTERM);
        f.expect_clean_exit(LONG);
    }
}

#[test]
fn sighup_logs_the_status_line_and_forkd_goes_on() {
    for mode in MODES {
        let mut f = Forkd::start(&["--mode", mode, "-q"]);
        served(&f, "before SIGHUP");
        f.signal(libc::SIGHUP);
        f.check(
            f.wait_log("status: mode ", LONG),
            &format!("{mode}: SIGHUP logged no status line under -q"),
        );
        served(&f, "after SIGHUP");
        f.signal(libc::SIGTERM);
        let status = f.wait_exit(LONG);
        f.check(
            status.and_then(|s| s.code()) == Some(0),
            &format!("{mode}: exit {status:?}"),
        );
    }
}

#[test]
fn sigusr1_logs_the_status_line_even_under_quiet() {
    for mode in MODES {
        let f = Forkd::start(&["--mode", mode, "-qq"]);
        f.signal(libc::SIGUSR1);
        f.check(
            f.wait_log("status: mode ", LONG),
            &format!("{mode}: SIGUSR1 under -qq logged nothing"),
        );
    }
}

#[test]
fn sigxcpu_stops_forkd_gracefully() {
    for mode in MODES {
        let mut f = Forkd::start(&["--mode", mode]);
        served(&f, "before SIGXCPU");
        f.signal(libc::SIGXCPU);
        f.expect_clean_exit(LONG);
        f.check(f.log().contains("SIGXCPU"), "SIGXCPU not named");
    }
}

#[test]
fn two_stop_signals_back_to_back_always_skip_the_grace_period() {
    for mode in MODES {
        for round in 0..4 {
            let mut f = Forkd::start(&["--mode", mode, "--grace", "60s"]);
            let mut held = connect(f.addr());
            ping(&mut held, b"held\n");
            if mode == "fork" {
                f.check(
                    wait_until(LONG, || f.live_children().len() == 1),
                    "expected one child",
                );
            }
            // The second comes as soon as the first is delivered, before the
            // dispatcher has looked: the two must count as two. (Sent while
            // the first is still pending, the kernel would merge them into
            // one: standard signals do not queue.)
            f.signal(libc::SIGTERM);
            f.check(
                wait_until(LONG, || !pending(f.pid(), libc::SIGTERM)),
                "SIGTERM never delivered",
            );
            f.signal(libc::SIGTERM);
            f.expect_clean_exit(Duration::from_secs(10));
            f.check(
                f.log().contains("second stop signal"),
                &format!("{mode}, round {round}: the second SIGTERM was lost"),
            );
        }
    }
}

#[test]
fn a_child_dies_of_the_first_sigsegv() {
    let f = Forkd::start(&[]);
    let (_s, kid) = f.connection_and_child();
    // SAFETY: kill(2) on forkd's child.
    unsafe { libc::kill(kid, libc::SIGSEGV) };
    f.check(
        f.wait_log(&format!("end pid {kid} "), LONG),
        "a child survived its first SIGSEGV",
    );
    f.check(
        f.log().contains("killed by SIGSEGV"),
        "not killed by SIGSEGV",
    );
}

#[test]
fn a_child_gets_the_default_for_signals_the_dispatcher_handles() {
    // SIGUSR1 means "status" to the dispatcher; to a connection's process it
    // is the default, which ends it.
    let f = Forkd::start(&[]);
    let (_s, kid) = f.connection_and_child();
    // The dispatcher catches SIGTTIN and SIGTTOU (terminal I/O never stops
    // it); its child ignores neither. SIGPIPE stays ignored in both.
    let mask = |pid: i32, key: &str| u64::from_str_radix(&status_field(pid, key), 16).unwrap();
    let bit = |signal: i32| 1u64 << (signal - 1);
    let tty = bit(libc::SIGTTIN) | bit(libc::SIGTTOU);
    let (caught, child) = (mask(f.pid(), "SigCgt"), mask(kid, "SigIgn"));
    f.check(
        caught & tty == tty && child & tty == 0,
        &format!("dispatcher SigCgt {caught:x}, child SigIgn {child:x}"),
    );
    f.check(
        child & bit(libc::SIGPIPE) != 0,
        "SIGPIPE not ignored in the child",
    );
    // SAFETY: kill(2) on forkd's child.
    unsafe { libc::kill(kid, libc::SIGUSR1) };
    f.check(
        f.wait_log(&format!("end pid {kid} "), LONG) && f.log().contains("killed by SIGUSR1"),
        "a child's SIGUSR1 should end it as the default does",
    );
    f.check(
        !f.log().contains("status: "),
        "the child's signal reached the dispatcher",
    );
}

#[test]
fn thread_mode_at_the_cap_never_stalls_when_threads_end_quietly() {
    // 64 clients arrive in one burst, fill a cap of 64 on the last accept of
    // a batch, then all leave; under -q no end is logged. The next client
    // must still be served.
    for round in 0..3 {
        let f = Forkd::start(&["--mode", "thread", "-q", "-c", "64"]);
        let addr = f.addr();
        let mut burst: Vec<TcpStream> = (0..64).map(|_| connect(addr)).collect();
        for s in &mut burst {
            ping(s, b"x");
        }
        drop(burst);
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"after the burst\n").unwrap();
        let mut back = [0u8; 16];
        let r = s.read_exact(&mut back);
        f.check(
            r.is_ok() && &back == b"after the burst\n",
            &format!("round {round}: the client after the burst was not served: {r:?}"),
        );
    }
}

#[test]
fn thread_mode_speaks_of_threads_when_it_stops() {
    let mut f = Forkd::start(&["--mode", "thread", "--grace", "100ms"]);
    let mut held = connect(f.addr());
    ping(&mut held, b"held\n");
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    let log = f.log();
    for want in [
        "grace period over: shutting down reading on 1 connection",
        "stopped (reading shut down), then closed by client",
        "1 ended (1 shut down by forkd)",
    ] {
        f.check(log.contains(want), &format!("missing {want:?}"));
    }
    f.check(!log.contains("SIGTERM to"), "thread mode spoke of SIGTERM");
}
