//! UDP echo (RFC 862) over real sockets: whole datagrams up to 65,507
//! bytes, IPv6, replies from the destination address on a wildcard bind,
//! no reply to a service port, the per-source limit, truncated datagrams,
//! and TCP served alongside. Every wait has a deadline.
use forkd_test_util::*;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);
/// The largest UDP payload over IPv4: 65,535 − 20 (IP) − 8 (UDP).
const LARGEST_V4: usize = 65_507;

fn echo_whole(f: &Forkd, to: SocketAddr, local: &str) {
    let c = udp_client(local, 5 * SECOND);
    for (len, seed) in [(1, 1), (LARGEST_V4, 2), (1000, 3)] {
        let data = pattern(len, seed);
        let back = udp_echo(&c, to, &data);
        f.check(
            back.as_ref()
                .is_some_and(|(b, from)| *b == data && *from == to),
            &format!(
                "a {len}-byte datagram to {to} came back as {:?}",
                back.map(|(b, from)| (b.len(), from))
            ),
        );
    }
}

fn whole_datagrams(mode: &str) {
    let f = Forkd::start(&["--mode", mode, "--udp", "127.0.0.1:0", "--workers", "2"]);
    if mode == "prefork" {
        f.check(
            wait_until(Duration::from_secs(10), || f.children().len() == 2),
            "the pool did not fill",
        );
    }
    f.check(
        f.addrs.is_empty() && f.udp_addrs.len() == 1,
        "--udp alone must open no TCP listener",
    );
    let before = f.children().len();
    echo_whole(&f, f.udp_addr(), "127.0.0.1:0");
    // No process (fork) or thread (thread) per datagram; prefork's pool
    // stays as it was.
    f.check(
        f.children().len() == before && (mode == "prefork" || before == 0),
        "a process was forked for UDP",
    );
    f.check(
        status_field(f.pid(), "Threads") == "1",
        "a thread was started for UDP",
    );
}

#[test]
fn udp_echoes_1_and_65507_bytes_whole_fork() {
    whole_datagrams("fork");
}

#[test]
fn udp_echoes_1_and_65507_bytes_whole_prefork() {
    // The pool's parent serves datagrams; its workers serve TCP.
    whole_datagrams("prefork");
}

#[test]
fn udp_echoes_1_and_65507_bytes_whole_thread() {
    whole_datagrams("thread");
}

#[test]
fn udp_and_tcp_side_by_side_and_print_addr_tells_them_apart() {
    let f = Forkd::start_exact(&[
        "--print-addr",
        "--log",
        "stderr",
        "-l",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--udp-rate",
        "0",
    ]);
    f.check(
        f.addrs.len() == 1 && f.udp_addrs.len() == 2,
        &format!("addresses {:?} udp {:?}", f.addrs, f.udp_addrs),
    );
    let data = pattern(5000, 4);
    f.check(roundtrip(f.addr(), &data) == data, "TCP echo differs");
    for a in f.udp_addrs.clone() {
        echo_whole(&f, a, "127.0.0.1:0");
    }
    f.check(
        f.log().contains(&format!("udp {}", f.udp_addrs[1])),
        "the start-up line names the UDP sockets",
    );
}

#[test]
fn udp_over_ipv6_and_a_wildcard_ipv6_bind() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped udp_over_ipv6: no IPv6 loopback here");
        return;
    }
    let f = Forkd::start(&["--udp", "[::1]:0", "--udp", "[::]:0"]);
    echo_whole(&f, f.udp_addrs[0], "[::1]:0");
    // The wildcard bind replies through IPV6_PKTINFO, from ::1.
    let to = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], f.udp_addrs[1].port()));
    echo_whole(&f, to, "[::1]:0");
}

/// On 0.0.0.0, a datagram sent to 127.0.0.2 is answered from 127.0.0.2
/// (IP_PKTINFO), not from the address routing would pick (127.0.0.1).
#[test]
fn wildcard_bind_answers_from_the_destination_address() {
    let f = Forkd::start(&["--udp", "0.0.0.0:0", "--mode", "thread"]);
    let port = f.udp_addr().port();
    for dst in [[127, 0, 0, 2], [127, 0, 0, 1], [127, 1, 2, 3]] {
        let to = SocketAddr::from((dst, port));
        let c = udp_client("127.0.0.1:0", 5 * SECOND);
        let data = pattern(300, 5);
        let back = udp_echo(&c, to, &data);
        f.check(
            back.as_ref()
                .is_some_and(|(b, from)| *b == data && *from == to),
            &format!(
                "sent to {to}, the reply came from {:?}",
                back.map(|(_, from)| from)
            ),
        );
    }
}

/// Source port 19 (chargen): no reply, one line, and the next client is served.
#[test]
fn a_datagram_from_source_port_19_gets_no_reply() {
    if !root_or_skip(
        "a_datagram_from_source_port_19_gets_no_reply",
        "to bind port 19",
    ) {
        return;
    }
    let f = Forkd::start(&["--udp", "127.0.0.1:0"]);
    let chargen = match std::net::UdpSocket::bind("127.0.0.1:19") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skipped a_datagram_from_source_port_19_gets_no_reply: bind port 19: {e}");
            return;
        }
    };
    chargen
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..3 {
        chargen
            .send_to(b"chargen says hello", f.udp_addr())
            .unwrap();
    }
    let mut buf = [0u8; 64];
    f.check(
        chargen.recv_from(&mut buf).is_err(),
        "a datagram from port 19 was answered",
    );
    f.check(
        f.wait_log("source port 19 is below 1024", 5 * SECOND),
        "no line about the drop",
    );
    f.check(
        f.count_log("source port 19") == 1,
        "three drops within a second must make one line",
    );
    echo_whole(&f, f.udp_addr(), "127.0.0.1:0");
}

/// `--udp-rate 10 --udp-burst 5`: a burst of 5, then 10 a second; the
/// drops are logged once a second with a count, and the totals at the stop.
#[test]
fn the_per_source_limit_holds_and_logs() {
    let mut f = Forkd::start(&[
        "--udp",
        "127.0.0.1:0",
        "--udp-rate",
        "10",
        "--udp-burst",
        "5",
    ]);
    let c = udp_client("127.0.0.1:0", Duration::from_millis(300));
    let start = Instant::now();
    for i in 0..100u32 {
        c.send_to(&i.to_be_bytes(), f.udp_addr()).unwrap();
    }
    let mut replies = 0;
    let mut buf = [0u8; 64];
    while c.recv_from(&mut buf).is_ok() {
        replies += 1;
    }
    let allowed = 5 + (start.elapsed().as_secs_f64() * 10.0).ceil() as usize;
    f.check(
        (5..=allowed).contains(&replies),
        &format!("{replies} replies to 100 datagrams; the limit allows {allowed}"),
    );
    f.check(
        f.wait_log(
            "over --udp-rate 10/s (--udp-burst 5) for 127.0.0.1",
            5 * SECOND,
        ),
        "no line about the limit",
    );
    // A second later, the next drop's line counts those not logged.
    std::thread::sleep(1100 * Duration::from_millis(1));
    for i in 0..30u32 {
        c.send_to(&i.to_be_bytes(), f.udp_addr()).unwrap();
    }
    f.check(
        f.wait_log("more since the last report", 5 * SECOND),
        "the second line does not count the drops not logged",
    );
    // Another source has its own bucket.
    echo_whole(&f, f.udp_addr(), "127.0.0.2:0");
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(15 * SECOND);
    let log = f.log();
    let line = log
        .lines()
        .find(|l| l.contains("udp stopped: "))
        .unwrap_or("");
    f.check(
        line.contains("over --udp-rate") && line.contains("datagrams echoed"),
        &format!("no UDP totals at the stop: {line:?}"),
    );
}

/// A datagram over `--udp-buffer` is dropped (MSG_TRUNC) with a line,
/// never echoed cut; the next datagram and TCP are served as before.
#[test]
fn a_truncated_datagram_leaves_nothing_broken() {
    let mut f = Forkd::start(&[
        "--udp",
        "127.0.0.1:0",
        "-l",
        "127.0.0.1:0",
        "--udp-buffer",
        "1KiB",
    ]);
    let c = udp_client("127.0.0.1:0", Duration::from_millis(500));
    for len in [1025, LARGEST_V4] {
        f.check(
            udp_echo(&c, f.udp_addr(), &pattern(len, 6)).is_none(),
            &format!("a {len}-byte datagram over --udp-buffer 1KiB was answered"),
        );
    }
    f.check(
        f.wait_log(
            "1025 bytes is over --udp-buffer 1024 (not echoed cut)",
            5 * SECOND,
        ),
        "no line about the truncated datagram",
    );
    c.set_read_timeout(Some(5 * SECOND)).unwrap();
    let data = pattern(1024, 7);
    f.check(
        udp_echo(&c, f.udp_addr(), &data).is_some_and(|(b, _)| b == data),
        "a 1024-byte datagram after the truncated ones was not echoed whole",
    );
    let tcp = pattern(100_000, 8);
    f.check(roundtrip(f.addr(), &tcp) == tcp, "TCP broke");
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(15 * SECOND);
    f.check(
        f.log().contains("2 over --udp-buffer"),
        "the totals do not count the truncated datagrams",
    );
}

/// A flood of datagrams (limited, so mostly dropped) never stops TCP: the
/// dispatcher serves at most a batch per socket per turn of its loop.
#[test]
fn a_udp_flood_does_not_starve_tcp() {
    let f = Forkd::start(&[
        "--udp",
        "127.0.0.1:0",
        "-l",
        "127.0.0.1:0",
        "--udp-rate",
        "1",
        "--udp-burst",
        "1",
    ]);
    let to = f.udp_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let c = udp_client("127.0.0.1:0", SECOND);
                let data = pattern(512, 9);
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = c.send_to(&data, to);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let start = Instant::now();
    let mut served = 0;
    while start.elapsed() < SECOND {
        let data = pattern(200, served);
        f.check(roundtrip(f.addr(), &data) == data, "TCP echo differs");
        served += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    f.check(
        served >= 20,
        &format!("only {served} TCP connections in a second of flood"),
    );
    f.check(
        sent > 1000,
        &format!("the flood sent only {sent} datagrams"),
    );
    f.check(
        f.count_log("over --udp-rate") <= 3,
        "drop lines must come at most once a second",
    );
}
