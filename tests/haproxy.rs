//! forkd behind a real HAProxy (Debian's `haproxy`, which `.ci/run`
//! installs), started by the tests on loopback from `docs/haproxy.cfg`, in
//! front of two forkd instances: one `send-proxy-v2`, one `send-proxy`
//! (v1), both checked.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

/// A running HAProxy (stdout and stderr collected), killed on drop, and
/// the directory of its configuration.
struct Haproxy {
    run: Running,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Haproxy {
    /// What HAProxy wrote, stdout then stderr.
    fn log(&self) -> String {
        format!("{}{}", self.run.out(), self.run.log())
    }
}

/// Is HAProxy installed? Says so in one line when it is not.
fn haproxy_or_skip(test: &str) -> bool {
    let found = Command::new(haproxy_bin())
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        let _ = writeln!(
            std::io::stderr(),
            "skipped {test}: haproxy is not installed (apt-get install haproxy; .ci/run does)"
        );
    }
    found
}

/// docs/haproxy.cfg with the test's addresses, and checks every 200 ms.
fn config(front: u16, v2: SocketAddr, v1: SocketAddr) -> String {
    let text = include_str!("../docs/haproxy.cfg");
    let out = text
        .replace("bind 0.0.0.0:7007", &format!("bind 127.0.0.1:{front}"))
        .replace("192.0.2.11:7007", &v2.to_string())
        .replace("192.0.2.12:7007", &v1.to_string())
        .replace("inter 2s", "inter 200ms");
    assert!(out.contains(&v2.to_string()) && out.contains(&v1.to_string()));
    assert!(out.contains("send-proxy-v2") && out.contains("send-proxy\n"));
    out
}

/// Start HAProxy in front of `v2` (send-proxy-v2) and `v1` (send-proxy),
/// and wait until it serves an echo.
fn haproxy(v2: SocketAddr, v1: SocketAddr) -> Haproxy {
    let dir = TempDir::new("haproxy");
    // HAProxy cannot bind port 0: a free port, and another try if it was taken.
    for _ in 0..5 {
        let front = free_port(false);
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(front, v2, v1)).unwrap();
        let mut cmd = Command::new(haproxy_bin());
        cmd.arg("-db").arg("-f").arg(&cfg);
        let mut run = Running::spawn(cmd);
        let addr: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
        // The probe comes from 127.0.0.4, a client of its own.
        let up = wait_until(LONG, || {
            try_connect_from("127.0.0.4", addr).is_some_and(|mut s| try_ping(&mut s, b"up?\n"))
        });
        if up {
            return Haproxy {
                run,
                addr,
                _dir: dir,
            };
        }
        // The port was taken meanwhile, or HAProxy failed: say why if it exited.
        if let Ok(Some(st)) = run.child.try_wait() {
            eprintln!("haproxy exited {st}: {}{}", run.out(), run.log());
        }
    }
    panic!("haproxy did not come up");
}

/// Echo `msg` on `s`; false if it did not come back whole.
fn try_ping(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).is_ok() && back == msg
}

/// Connect to `to` from `from` (127.0.0.2, 127.0.0.3...).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    try_connect_from(from, to).expect("connect")
}

fn try_connect_from(from: &str, to: SocketAddr) -> Option<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let local: SockaddrIn = format!("{from}:0").parse().unwrap();
    bind(fd.as_raw_fd(), &local).unwrap();
    let remote: SockaddrIn = to.to_string().parse().unwrap();
    nix::sys::socket::connect(fd.as_raw_fd(), &remote).ok()?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    Some(s)
}

fn backend(extra: &[&str]) -> Forkd {
    let mut args = vec!["--proxy-protocol", "--proxy-from", "127.0.0.1/32", "-v"];
    args.extend_from_slice(extra);
    Forkd::start(&args)
}

#[test]
fn clients_appear_as_themselves_and_are_limited_each() {
    if !haproxy_or_skip("clients_appear_as_themselves_and_are_limited_each") {
        return;
    }
    let a = backend(&["--max-per-ip", "1", "--max-per-net", "0"]);
    let b = backend(&["--max-per-ip", "1", "--max-per-net", "0"]);
    let h = haproxy(a.addr(), b.addr());
    // Wait until the "up?" probe's connection is over on both.
    std::thread::sleep(Duration::from_millis(300));
    let both = || format!("{}{}", a.log(), b.log());

    // One connection per client per forkd: from 127.0.0.2, two held (one
    // on each forkd), the rest refused...
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..4 {
        let mut s = connect_from("127.0.0.2", h.addr);
        if try_ping(&mut s, format!("two {i}\n").as_bytes()) {
            held.push(s);
        } else {
            refused += 1;
        }
    }
    a.check(
        held.len() == 2 && refused == 2,
        &format!(
            "127.0.0.2: {} held, {refused} refused\n{}",
            held.len(),
            both()
        ),
    );
    a.check(
        both().contains("refused 127.0.0.2:"),
        "no refusal for 127.0.0.2",
    );
    // ...while 127.0.0.3 is another client, not HAProxy's 127.0.0.1 again.
    for i in 0..2 {
        let mut s = connect_from("127.0.0.3", h.addr);
        a.check(
            try_ping(&mut s, format!("three {i}\n").as_bytes()),
            &format!("127.0.0.3 refused\n{}", both()),
        );
        held.push(s);
    }
    // The children's titles name the clients.
    let titles: Vec<String> = a
        .live_children()
        .into_iter()
        .chain(b.live_children())
        .filter_map(cmdline)
        .collect();
    for client in ["127.0.0.2:", "127.0.0.3:"] {
        let want = format!("forkd: conn {client}");
        a.check(
            titles.iter().filter(|t| t.contains(&want)).count() == 2,
            &format!("titles {titles:?}: want two {want}"),
        );
    }
    drop(held);
    // And so do the end lines, of both forkd (v2 and v1).
    for (f, name) in [(&a, "v2"), (&b, "v1")] {
        for client in [" 127.0.0.2:", " 127.0.0.3:"] {
            f.check(
                wait_until(LONG, || {
                    f.log()
                        .lines()
                        .any(|l| l.contains("INFO: end pid") && l.contains(client))
                }),
                &format!("{name}: no end line for{client}"),
            );
        }
        f.check(
            !f.log()
                .lines()
                .any(|l| l.contains("INFO: end pid") && l.contains(" 127.0.0.1:")),
            &format!("{name}: a connection was logged as HAProxy's"),
        );
        f.check(
            !f.log().contains("closed 127.0.0.1:"),
            &format!("{name}: health checks were refused"),
        );
    }
}

#[test]
fn echo_through_haproxy_is_byte_exact() {
    if !haproxy_or_skip("echo_through_haproxy_is_byte_exact") {
        return;
    }
    let a = backend(&[]);
    let b = backend(&[]);
    let h = haproxy(a.addr(), b.addr());
    for i in 0..6u64 {
        let data = pattern(10 + i as usize * 997, i);
        assert_eq!(roundtrip(h.addr, &data), data, "connection {i}");
    }
    // A large stream, on each forkd (leastconn: the second goes to the other).
    let big = pattern(8 << 20, 42);
    let mut s1 = connect(h.addr);
    let mut s2 = connect(h.addr);
    let t = {
        let big = big.clone();
        std::thread::spawn(move || echo_all(&mut s2, big).unwrap())
    };
    let back1 = echo_all(&mut s1, big.clone()).unwrap();
    let back2 = t.join().unwrap();
    a.check(
        back1 == big && back2 == big,
        "a large stream was not echoed exactly",
    );
    for f in [&a, &b] {
        f.check(
            f.wait_log("8388608 bytes echoed", LONG),
            "each forkd echoed one large stream",
        );
    }
}

#[test]
fn untrusted_or_missing_headers_are_refused() {
    if !haproxy_or_skip("untrusted_or_missing_headers_are_refused") {
        return;
    }
    // Neither trusts HAProxy's 127.0.0.1.
    let a = Forkd::start(&["--proxy-protocol", "--proxy-from", "127.0.0.9/32"]);
    let b = Forkd::start(&["--proxy-protocol", "--proxy-from", "::1/128"]);
    let cfg_front = free_port(false);
    let dir = TempDir::new("haproxy-u");
    std::fs::write(
        dir.join("haproxy.cfg"),
        config(cfg_front, a.addr(), b.addr()),
    )
    .unwrap();
    let mut hp = Command::new(haproxy_bin())
        .arg("-db")
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let front: SocketAddr = format!("127.0.0.1:{cfg_front}").parse().unwrap();
    // Whatever HAProxy sends is refused: no echo ever comes back.
    a.check(
        wait_until(LONG, || {
            a.log().contains("not a --proxy-from address")
                && b.log().contains("not a --proxy-from address")
        }),
        "HAProxy's headers (checks or clients) were not refused",
    );
    for _ in 0..3 {
        if let Ok(mut s) = TcpStream::connect(front) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            a.check(
                !try_ping(&mut s, b"x\n"),
                "served through an untrusted balancer",
            );
        }
    }
    let _ = hp.kill();
    let _ = hp.wait();
    // No header at all, straight to forkd.
    let c = backend(&[]);
    let mut s = connect(c.addr());
    c.check(!try_ping(&mut s, b"no header\n"), "served without a header");
    c.check(
        c.wait_log("no PROXY header", LONG),
        "no log line for a missing header",
    );
}

#[test]
fn a_killed_forkd_is_marked_down_and_the_other_serves() {
    if !haproxy_or_skip("a_killed_forkd_is_marked_down_and_the_other_serves") {
        return;
    }
    let mut a = backend(&[]);
    let b = backend(&[]);
    let h = haproxy(a.addr(), b.addr());
    // Load through HAProxy, on both.
    for i in 0..20u64 {
        let data = pattern(500, i);
        assert_eq!(roundtrip(h.addr, &data), data);
    }
    a.check(a.count_log("INFO: end pid") > 0, "forkd a served nothing");
    let load = {
        let addr = h.addr;
        std::thread::spawn(move || {
            // Short connections while forkd a dies: count what fails.
            let mut failed = 0;
            for i in 0..300u64 {
                let data = pattern(200, 1000 + i);
                let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .ok()
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                        echo_all(&mut s, data.clone()).ok()
                    })
                    .is_some_and(|back| back == data);
                if !ok {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            failed
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    a.signal(libc::SIGKILL);
    let _ = a.wait_exit(LONG);
    a.check(
        wait_until(LONG, || h.log().contains("host1 is DOWN")),
        &format!("HAProxy did not mark forkd a down:\n{}", h.log()),
    );
    let failed_during = load.join().unwrap();
    // Once it is down, every new connection is the other forkd's.
    let before = b.count_log("INFO: end pid");
    for i in 0..30u64 {
        let data = pattern(300, 5000 + i);
        b.check(
            roundtrip(h.addr, &data) == data,
            "a connection after the failover failed",
        );
    }
    b.check(
        wait_until(LONG, || b.count_log("INFO: end pid") >= before + 30),
        "the other forkd did not serve them",
    );
    // Retries with redispatch hide the dead server from new clients; only
    // connections under way when it died may fail.
    b.check(
        failed_during <= 5,
        &format!("{failed_during} connections failed around the kill"),
    );
}

/// Debian's haproxy lives in /usr/sbin, which a user's PATH may lack.
fn haproxy_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy"
    } else {
        "haproxy"
    }
}
