//! Slow and greedy clients at forkd's defaults: per-address and
//! per-network limits, the first-byte deadline and early drop keep a
//! public service open to honest clients.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use forkd_test_util::*;
use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrStorage};

const LONG: Duration = Duration::from_secs(15);

/// Connect to `addr` from the source address `from` (any 127.0.0.0/8
/// address is this host's).
fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let fd = sock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    sock::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(from, 0)),
    )?;
    sock::connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    // SAFETY: a connected socket we own.
    let s = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Was `s` closed by forkd without an echo (refused)?
fn refused(s: &mut TcpStream) -> bool {
    let _ = std::io::Write::write_all(s, b"?");
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn defaults_limit_one_address_to_32_connections() {
    let mut f = Forkd::start_exact(&["--print-addr", "--log", "stderr", "-l", "127.0.0.1:0"]);
    let mut held: Vec<TcpStream> = (0..32).map(|_| connect(f.addr())).collect();
    for s in &mut held {
        ping(s, b"x");
    }
    let mut extra = connect(f.addr());
    f.check(refused(&mut extra), "the 33rd connection was served");
    f.check(
        f.wait_log("(--max-per-ip)", LONG),
        "the refusal was not logged",
    );
    drop(held);
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    f.check(f.log().contains("refused 1 by --max-per-ip"), "summary");
}

#[test]
fn a_network_is_limited_and_its_neighbours_are_not() {
    for mode in ["fork", "thread", "event"] {
        let f = Forkd::start(&[
            "--mode",
            mode,
            "--max-per-net",
            "3",
            "--net-prefix",
            "24:64",
        ]);
        let mut held = Vec::new();
        for host in 2..=4 {
            let mut s = connect_from(ip(&format!("127.0.0.{host}")), f.addr()).unwrap();
            ping(&mut s, b"x");
            held.push(s);
        }
        let mut fourth = connect_from(ip("127.0.0.5"), f.addr()).unwrap();
        f.check(refused(&mut fourth), "a 4th address of one /24 was served");
        f.check(
            f.wait_log(
                "127.0.0.0/24 has 3 connections already (--max-per-net)",
                LONG,
            ),
            "the refusal was not logged with its network",
        );
        let mut neighbour = connect_from(ip("127.0.1.5"), f.addr()).unwrap();
        ping(&mut neighbour, b"another /24 is served");
        // A slot freed in the /24 is free again.
        drop(held.pop());
        f.check(
            wait_until(LONG, || {
                connect_from(ip("127.0.0.6"), f.addr()).is_ok_and(|mut s| !refused_or_echo(&mut s))
            }),
            "the /24 stayed full after a connection ended",
        );
    }
}

/// Echo one byte; false if it came back, true if refused.
fn refused_or_echo(s: &mut TcpStream) -> bool {
    let _ = std::io::Write::write_all(s, b"!");
    let mut b = [0u8; 1];
    !matches!(s.read(&mut b), Ok(1))
}

#[test]
fn nearly_full_new_connections_are_dropped_early_not_queued() {
    // From half full on, every new connection is dropped (rate 100 %).
    let f = Forkd::start(&["-c", "20", "--early-drop", "50:100:100"]);
    let mut held: Vec<TcpStream> = (0..10).map(|_| connect(f.addr())).collect();
    for s in &mut held {
        ping(s, b"x");
    }
    let mut extra = connect(f.addr());
    f.check(refused(&mut extra), "a connection past 50 % was served");
    f.check(f.wait_log("(--early-drop)", LONG), "not logged");
    drop(held);
    f.check(
        wait_until(LONG, || {
            let data = pattern(100, 1);
            roundtrip(f.addr(), &data) == data
        }),
        "not serving once below the threshold",
    );
}

/// Slowloris at the defaults: 1,100 connections (more than the default cap
/// of 1,024, which used to lock everyone out) from one /24 that send
/// nothing, or a byte now and then, and an honest client from elsewhere.
/// `scripts/slowloris.sh` runs it as a benchmark and prints the figures.
#[test]
fn an_honest_client_is_served_while_slow_connections_attack_from_one_net() {
    raise_nofile();
    for mode in ["fork", "thread", "event"] {
        let f = Forkd::start_exact(&[
            "--print-addr",
            "--log",
            "stderr",
            "-q",
            "-l",
            "127.0.0.1:0",
            "--mode",
            mode,
        ]);
        let addr = f.addr();
        let mut attack = Vec::new();
        for i in 0..1100u32 {
            let from = ip(&format!("127.0.0.{}", 2 + i % 250));
            if let Ok(s) = connect_from(from, addr) {
                attack.push(s);
            }
        }
        // Some attackers drip a byte now and then.
        for s in attack.iter_mut().step_by(10) {
            let _ = std::io::Write::write_all(s, b"x");
        }
        let start = Instant::now();
        let data = pattern(4096, 9);
        let mut honest = connect_from(ip("127.0.9.1"), addr).expect("honest connect");
        let mut w = honest.try_clone().unwrap();
        std::io::Write::write_all(&mut w, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        let r = honest.read_exact(&mut back);
        let took = start.elapsed();
        f.check(
            r.is_ok() && back == data,
            &format!("{mode}: the honest client was not served: {r:?}"),
        );
        f.check(
            took < Duration::from_secs(2),
            &format!("{mode}: the honest client waited {took:?}"),
        );
        let served = f.live_children().len();
        if mode == "fork" {
            f.check(
                served <= 129,
                &format!("{mode}: {served} attackers got a process (limit 128 per /24)"),
            );
        }
        eprintln!(
            "{mode}: {} attack connections open, honest client echoed 4096 bytes in {took:?}",
            attack.len()
        );
    }
}
