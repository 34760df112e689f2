//! `--proxy-protocol` without a balancer: the tests write the headers
//! themselves (v1, v2, LOCAL, cut in pieces, late, forged), and
//! `--reuse-port`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use forkd::proxy::{header_v1, header_v2, header_v2_local};
use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(10);

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn proxied(extra: &[&str]) -> Forkd {
    let mut args = vec!["--proxy-protocol", "--proxy-from", "127.0.0.0/8"];
    args.extend_from_slice(extra);
    Forkd::start(&args)
}

/// Did forkd close `s` without echoing anything?
fn closed_unanswered(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn v1_and_v2_headers_name_the_client_everywhere_and_are_never_echoed() {
    for mode in ["fork", "thread", "event", "prefork"] {
        let f = proxied(&["--mode", mode]);
        for (i, make) in [header_v1, header_v2].into_iter().enumerate() {
            let client = a(&format!("198.51.100.{}:{}", 7 + i, 40000 + i));
            let mut s = connect(f.addr());
            // Header and data in one write: the data must stay in the socket.
            let mut first = make(client, f.addr());
            first.extend_from_slice(b"hello\n");
            s.write_all(&first).unwrap();
            let mut back = [0u8; 6];
            s.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"hello\n");
            if mode == "fork" || mode == "prefork" {
                // The child's (the worker's) title names the client, not
                // the balancer.
                let title = format!("conn {client}");
                f.check(
                    wait_until(LONG, || {
                        f.live_children()
                            .iter()
                            .any(|&p| cmdline(p).is_some_and(|c| c.contains(&title)))
                    }),
                    &format!("no child titled {title}"),
                );
            }
            let data = pattern(300_000, i as u64);
            let got = echo_all(&mut s, data.clone()).unwrap();
            f.check(got == data, &format!("{mode}: echo not byte-exact"));
            f.check(
                f.wait_log(&format!(" {client}: "), LONG),
                &format!("{mode}: no end line for {client}"),
            );
        }
    }
}

#[test]
fn a_header_in_pieces_waits_without_blocking_others() {
    for mode in ["fork", "prefork"] {
        header_in_pieces(mode);
    }
}

fn header_in_pieces(mode: &str) {
    let f = proxied(&["--mode", mode]);
    let slow_client = a("192.0.2.1:1111");
    let h = header_v2(slow_client, f.addr());
    let mut slow = connect(f.addr());
    slow.write_all(&h[..7]).unwrap();
    // Meanwhile another connection is served at once.
    let quick = a("192.0.2.2:2222");
    let mut s = connect(f.addr());
    let mut first = header_v1(quick, f.addr());
    first.extend_from_slice(b"quick\n");
    s.write_all(&first).unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"quick\n");
    // The rest of the slow header, then data.
    std::thread::sleep(Duration::from_millis(200));
    slow.write_all(&h[7..]).unwrap();
    ping(&mut slow, b"slow\n");
    drop(slow);
    f.check(
        f.wait_log(&format!(" {slow_client}: "), LONG),
        "the slow client's end line",
    );
}

#[test]
fn missing_bad_late_and_untrusted_headers_close_with_a_log_line() {
    for mode in ["fork", "prefork"] {
        missing_bad_late_and_untrusted(mode);
    }
}

fn missing_bad_late_and_untrusted(mode: &str) {
    let f = proxied(&["--mode", mode, "--proxy-timeout", "300ms"]);
    // No header: plain data.
    let mut s = connect(f.addr());
    s.write_all(b"hello, no header\r\n").unwrap();
    f.check(
        closed_unanswered(&mut s),
        "a connection without header was served",
    );
    f.check(
        f.wait_log("no PROXY header", LONG),
        "no log line for a missing header",
    );
    // A malformed v1 header (a second later: one line a second per kind).
    std::thread::sleep(Duration::from_millis(1100));
    let mut s = connect(f.addr());
    s.write_all(b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\nhi")
        .unwrap();
    f.check(closed_unanswered(&mut s), "a malformed header was served");
    f.check(
        f.wait_log("malformed PROXY v1 header", LONG),
        "malformed: no log line",
    );
    // Nothing at all: closed at the deadline.
    let mut s = connect(f.addr());
    let t0 = std::time::Instant::now();
    f.check(closed_unanswered(&mut s), "a silent connection was served");
    f.check(
        t0.elapsed() < Duration::from_secs(3),
        "the deadline was not kept",
    );
    f.check(f.wait_log("--proxy-timeout", LONG), "late: no log line");
    // Still serving.
    let mut s = connect(f.addr());
    s.write_all(&header_v2(a("192.0.2.9:9"), f.addr())).unwrap();
    ping(&mut s, b"still\n");

    // A balancer that is not in --proxy-from: closed before anything is read.
    let g = Forkd::start(&[
        "--mode",
        mode,
        "--proxy-protocol",
        "--proxy-from",
        "10.0.0.0/8",
    ]);
    let mut s = connect(g.addr());
    let _ = s.write_all(&header_v2(a("192.0.2.9:9"), g.addr()));
    g.check(
        closed_unanswered(&mut s),
        "an untrusted header was honoured",
    );
    g.check(
        g.wait_log("not a --proxy-from address", LONG),
        "untrusted: no log line",
    );
}

#[test]
fn local_headers_are_served_quietly_as_the_balancer() {
    for mode in ["fork", "prefork"] {
        local_headers(mode);
    }
}

fn local_headers(mode: &str) {
    let f = proxied(&["--mode", mode]);
    for _ in 0..3 {
        let mut s = connect(f.addr());
        let mut first = header_v2_local();
        first.extend_from_slice(b"check\n");
        s.write_all(&first).unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"check\n");
    }
    // v1's UNKNOWN, as HAProxy's checks send with send-proxy.
    let mut s = connect(f.addr());
    s.write_all(b"PROXY UNKNOWN\r\n").unwrap();
    ping(&mut s, b"unknown\n");
    drop(s);
    // v1 naming the connection's own end, as HAProxy's v1 checks do.
    let mut s = connect(f.addr());
    let own = s.local_addr().unwrap();
    s.write_all(&header_v1(own, f.addr())).unwrap();
    ping(&mut s, b"self\n");
    drop(s);
    // A proxied one after them: its end line comes, theirs never did.
    let mut s = connect(f.addr());
    s.write_all(&header_v2(a("192.0.2.5:5"), f.addr())).unwrap();
    ping(&mut s, b"x\n");
    drop(s);
    f.check(f.wait_log(" 192.0.2.5:5: ", LONG), "the proxied end line");
    let ends = f.log().lines().filter(|l| l.contains("end pid")).count();
    f.check(
        ends == 1,
        &format!("health checks were logged: {ends} end lines"),
    );
    f.check(!f.log().contains("WARN"), "warnings for health checks");
}

#[test]
fn per_ip_limits_count_the_real_client() {
    for mode in ["fork", "prefork"] {
        per_ip_limits(mode);
    }
}

fn per_ip_limits(mode: &str) {
    let f = proxied(&["--mode", mode, "--max-per-ip", "1", "--max-per-net", "0"]);
    let open = |client: &str| {
        let mut s = connect(f.addr());
        s.write_all(&header_v2(a(client), f.addr())).unwrap();
        s
    };
    let mut first = open("203.0.113.1:1");
    ping(&mut first, b"one\n");
    let mut second = open("203.0.113.1:2");
    f.check(
        closed_unanswered(&mut second),
        "a second connection from one client",
    );
    f.check(f.wait_log("refused 203.0.113.1:2", LONG), "no refusal line");
    let mut other = open("203.0.113.2:1");
    ping(&mut other, b"other\n");
}

#[test]
fn proxy_options_are_checked() {
    for (args, needle) in [
        (&["--proxy-protocol"][..], "needs --proxy-from"),
        (
            &["--proxy-from", "10.0.0.0/8"][..],
            "needs --proxy-protocol",
        ),
        (
            &["--proxy-protocol", "--proxy-from", "10.0.0.1/8"][..],
            "host bits",
        ),
        (
            &["--proxy-protocol", "--proxy-from", "nonsense"][..],
            "not an address",
        ),
        (
            &[
                "--proxy-protocol",
                "--proxy-from",
                "::1",
                "--proxy-timeout",
                "0",
            ][..],
            "more than 0",
        ),
    ] {
        let mut cmd = std::process::Command::new(forkd());
        cmd.args(args);
        let run = run_with_deadline(cmd, LONG);
        assert_eq!(run.status.code(), Some(64), "{args:?}: {run:?}");
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
    }
}

#[test]
fn reuse_port_lets_two_forkd_share_a_port() {
    let f = Forkd::start(&["--reuse-port"]);
    let port = f.addr().port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let g = Forkd::start(&["--reuse-port", "-l", &addr]);
    for i in 0..40 {
        let data = pattern(100, i);
        assert_eq!(roundtrip(f.addr(), &data), data);
    }
    let served = |x: &Forkd| x.count_log("end pid");
    f.check(
        wait_until(LONG, || served(&f) + served(&g) == 40),
        "40 ends in all",
    );
    f.check(
        served(&f) > 0 && served(&g) > 0,
        "one forkd served them all",
    );
    // Without --reuse-port the address is taken.
    let mut cmd = std::process::Command::new(forkd());
    cmd.args(["-l", &addr]);
    let run = run_with_deadline(cmd, LONG);
    assert_eq!(run.status.code(), Some(69), "{run:?}");
}
