//! forkd as a systemd citizen, without a running systemd: socket activation
//! and `--inetd` through `systemd-socket-activate`, `sd_notify` messages on a
//! datagram socket the test binds, journald prefixes through
//! `JOURNAL_STREAM`, the units in `systemd/` through `systemd-analyze`, and
//! `scripts/install.sh` into a staging directory.
//!
//! Every wait has a deadline, and each test arms a 60 s alarm as a backstop.
use forkd_test_util::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);

/// Backstop for a test that hangs despite its deadlines: SIGALRM ends the
/// test binary after 60 s (each test re-arms it when it starts).
fn watchdog() {
    // SAFETY: alarm(2) only schedules a signal.
    unsafe { libc::alarm(60) };
}

/// Panic with install advice when a systemd tool is missing.
fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} not found: install systemd (Debian: apt-get install systemd) to run these tests"
    );
}

fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// Start `systemd-socket-activate [PRE...] -l HOST:PORT... forkd() ARGS...`
/// on a free port, retrying with another port when the bind fails. Returns
/// once every socket is listening, with the addresses.
fn socket_activate(
    hosts: &[&str],
    pre: &[&str],
    forkd_args: &[&str],
) -> (Running, Vec<SocketAddr>) {
    let v6 = hosts.iter().any(|h| h.starts_with('['));
    for _attempt in 0..5 {
        let port = free_port(v6);
        let addrs: Vec<SocketAddr> = hosts
            .iter()
            .map(|h| format!("{h}:{port}").parse().unwrap())
            .collect();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(pre);
        for a in &addrs {
            cmd.arg("-l").arg(a.to_string());
        }
        cmd.arg(forkd())
            .args(forkd_args)
            .env_remove("NOTIFY_SOCKET");
        let mut run = Running::spawn(cmd);
        let listening = wait_until(10 * SECOND, || {
            run.log().matches("Listening on").count() == addrs.len() || run.exited()
        });
        if listening && !run.exited() {
            return (run, addrs);
        }
        run.check(
            run.log().contains("Address already in use"),
            "systemd-socket-activate did not listen",
        );
    }
    panic!("no free port for systemd-socket-activate after 5 tries");
}

/// Socket activation: forkd serves every passed socket, names them in its
/// log, prints their addresses, and stops cleanly on SIGTERM.
fn activated(mode: &str, hosts: &[&str], names: Option<&str>) {
    watchdog();
    require("systemd-socket-activate");
    let fdname = names.map(|n| format!("--fdname={n}"));
    let pre: Vec<&str> = fdname.iter().map(String::as_str).collect();
    let (mut run, addrs) = socket_activate(
        hosts,
        &pre,
        &["--print-addr", "--log", "stderr", "--mode", mode],
    );
    // systemd-socket-activate execs forkd (same pid) at the first connection.
    let first = pattern(100_000, 7);
    run.check(roundtrip(addrs[0], &first) == first, "first echo differs");
    run.check(
        wait_until(10 * SECOND, || run.out().lines().count() == addrs.len()),
        "forkd did not print every activated address",
    );
    let printed: Vec<SocketAddr> = run.out().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(printed, addrs);
    for (i, a) in addrs.iter().enumerate() {
        let data = pattern(4096 + i, i as u64);
        run.check(
            roundtrip(*a, &data) == data,
            &format!("echo on {a} differs"),
        );
    }
    let names: Vec<String> = match names {
        Some(n) => n.split(':').map(str::to_string).collect(),
        None => addrs.iter().map(|a| a.to_string()).collect(),
    };
    run.check(
        run.wait_log(
            &format!("socket-activated on {}", names.join(", ")),
            5 * SECOND,
        ),
        "no start-up line naming the activated sockets",
    );
    if let Some(n) = fdname.as_ref().map(|_| &names) {
        for (name, a) in n.iter().zip(&addrs) {
            run.check(
                run.log().contains(&format!("socket {name} is {a}")),
                &format!("the log does not say socket {name} is {a}"),
            );
        }
    }
    if mode == "fork" {
        run.check(
            wait_until(5 * SECOND, || {
                run.log().matches("end pid ").count() > addrs.len()
            }),
            "fork mode logged no child ends",
        );
    }
    let status = run.terminate(15 * SECOND);
    run.check(
        status.is_some_and(|s| s.success()),
        &format!("forkd did not stop cleanly on SIGTERM: {status:?}"),
    );
}

/// Both loopbacks when IPv6 is there; IPv4 alone (with a note) when not.
fn both_families() -> Vec<&'static str> {
    if ipv6_loopback() {
        vec!["127.0.0.1", "[::1]"]
    } else {
        eprintln!("note: no IPv6 loopback here; testing activation over IPv4 only");
        vec!["127.0.0.1"]
    }
}

#[test]
fn socket_activation_fork_one_unnamed_socket() {
    activated("fork", &["127.0.0.1"], None);
}

#[test]
fn socket_activation_fork_ipv4_and_ipv6_named() {
    let hosts = both_families();
    let names = ["echo4", "echo6"][..hosts.len()].join(":");
    activated("fork", &hosts, Some(&names));
}

#[test]
fn socket_activation_prefork_ipv4_and_ipv6_named() {
    let hosts = both_families();
    let names = ["echo4", "echo6"][..hosts.len()].join(":");
    activated("prefork", &hosts, Some(&names));
}

/// One socket from systemd: prefork's workers block in accept on it, and
/// a drain cannot shut it down (it is systemd's). Idle workers still leave
/// (their wait times out and they find the stop pipe closed), and the busy
/// one finishes its client but takes no client queued after the drain began.
#[test]
fn socket_activated_prefork_on_one_socket_drains() {
    watchdog();
    require("systemd-socket-activate");
    let (mut run, addrs) = socket_activate(
        &["127.0.0.1"],
        &[],
        &[
            "--print-addr",
            "--log",
            "stderr",
            "--mode",
            "prefork",
            "--workers",
            "3",
            "--grace",
            "30s",
        ],
    );
    // The first connection makes systemd-socket-activate exec forkd.
    let mut held = connect(addrs[0]);
    ping(&mut held, b"before");
    let workers = || children_of(run.pid()).len();
    run.check(
        wait_until(10 * SECOND, || workers() == 3),
        "the pool did not start",
    );
    run.signal(libc::SIGTERM);
    run.check(run.wait_log("stopping:", 10 * SECOND), "no stopping line");
    run.check(
        wait_until(10 * SECOND, || workers() == 1),
        "idle workers did not leave",
    );
    // systemd's socket still listens: this client waits in its queue.
    let mut queued = connect(addrs[0]);
    queued.write_all(b"late").unwrap();
    ping(&mut held, b"still served while draining");
    drop(held);
    let status = run.wait_exit(20 * SECOND);
    run.check(
        status.is_some_and(|s| s.success()),
        &format!("forkd did not stop cleanly: {status:?}"),
    );
    run.check(
        run.log()
            .contains("stopped: 1 connection served, 1 ended (0 by signal)"),
        "summary",
    );
    let mut got = Vec::new();
    let _ = queued.read_to_end(&mut got);
    run.check(got.is_empty(), "a client queued after the drain was served");
}

#[test]
fn socket_activation_thread_ipv4_and_ipv6_named() {
    let hosts = both_families();
    let names = ["echo4", "echo6"][..hosts.len()].join(":");
    activated("thread", &hosts, Some(&names));
}

#[test]
fn socket_activation_event_ipv4_and_ipv6_named() {
    let hosts = both_families();
    let names = ["echo4", "echo6"][..hosts.len()].join(":");
    activated("event", &hosts, Some(&names));
}

/// `--inetd` under `systemd-socket-activate --inetd --accept`: one forkd
/// process per connection, each echoing on its own stdin.
#[test]
fn inetd_one_process_per_connection() {
    watchdog();
    require("systemd-socket-activate");
    let (run, addrs) = socket_activate(
        &["127.0.0.1"],
        &["--inetd", "--accept"],
        &["--inetd", "--log", "stderr"],
    );
    let mut a = connect(addrs[0]);
    let mut b = connect(addrs[0]);
    ping(&mut a, b"first client\n");
    ping(&mut b, b"second client\n");
    // Both connections are open, so both forkd processes are alive.
    let mut pids = Vec::new();
    let both = wait_until(5 * SECOND, || {
        pids = children_of(run.pid())
            .into_iter()
            .filter(|p| p.comm == "forkd" && p.state != 'Z')
            .map(|p| p.pid)
            .collect();
        pids.len() == 2
    });
    run.check(both, &format!("expected two forkd processes, saw {pids:?}"));
    ping(&mut a, b"again\n");
    drop(a);
    drop(b);
    run.check(
        wait_until(5 * SECOND, || run.log().matches("inetd conn ").count() == 2),
        "each forkd --inetd should log its connection once",
    );
    for pid in &pids {
        run.check(
            run.log()
                .contains(&format!("forkd[{pid}] INFO: inetd conn 127.0.0.1:")),
            &format!("no inetd line from forkd {pid}"),
        );
    }
    run.check(
        wait_until(5 * SECOND, || {
            run.log().matches("died with code 0").count() == 2
        }),
        "both forkd --inetd processes should exit 0",
    );
}

/// Classic inetd passes the connection as stdin, stdout and stderr: forkd
/// must keep its log lines out of the echo.
#[test]
fn inetd_with_stderr_on_the_connection_echoes_only_the_data() {
    watchdog();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = connect(listener.local_addr().unwrap());
    let (conn, _) = listener.accept().unwrap();
    let fd = std::os::fd::OwnedFd::from(conn);
    let mut cmd = Command::new(forkd());
    cmd.args(["--inetd", "--log", "stderr"])
        .stdin(fd.try_clone().unwrap())
        .stdout(fd.try_clone().unwrap())
        .stderr(fd);
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    // The command holds the descriptors it was given: close them here, so
    // the client's end-of-file depends on forkd alone.
    drop(cmd);
    let data = pattern(50_000, 11);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let w = std::thread::spawn(move || {
        std::io::Write::write_all(&mut writer, &sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    w.join().unwrap();
    assert!(
        back == data,
        "the echo carried {} extra bytes: {:?}",
        back.len() as i64 - data.len() as i64,
        String::from_utf8_lossy(back.get(data.len()..).unwrap_or_default())
    );
    let c = &mut child.0;
    assert!(wait_until(5 * SECOND, || c.try_wait().unwrap().is_some()));
    assert!(c.try_wait().unwrap().unwrap().success());
}

/// Receive notification datagrams until one contains `needle`; all received.
fn recv_until(
    sock: &UnixDatagram,
    needle: &str,
    limit: Duration,
) -> Result<Vec<String>, Vec<String>> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.contains(needle);
                got.push(msg);
                if done {
                    return Ok(got);
                }
            }
            Err(_) => break,
        }
    }
    Err(got)
}

fn notifications(mode: &str) {
    watchdog();
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut cmd = Command::new(forkd());
    cmd.env("NOTIFY_SOCKET", &path);
    let mut f = Forkd::start_with(cmd, &["--mode", mode, "--max-conns", "2"]);

    let ready = recv_until(&sock, "READY=1", 5 * SECOND);
    let got = ready.unwrap_or_else(|g| panic!("no READY=1; got {g:?}\nlog:\n{}", f.log()));
    let last = got.last().unwrap();
    assert!(
        last.lines().any(|l| l == "STATUS=active 0/2, served 0"),
        "READY=1 should come with the status: {last:?}"
    );

    // Counts change: a STATUS= update follows within about a second each time.
    let data = pattern(1000, 3);
    assert!(roundtrip(f.addr(), &data) == data);
    let status = recv_until(&sock, "STATUS=active 0/2, served 1", 5 * SECOND);
    f.check(
        status.is_ok(),
        &format!("no STATUS= with served 1: {status:?}"),
    );
    let mut a = connect(f.addr());
    let mut b = connect(f.addr());
    ping(&mut a, b"a");
    ping(&mut b, b"b");
    let status = recv_until(&sock, "STATUS=active 2/2 (at cap), served 3", 5 * SECOND);
    f.check(
        status.is_ok(),
        &format!("no STATUS= at the cap: {status:?}"),
    );
    drop(b);
    let status = recv_until(&sock, "STATUS=active 1/2, served 3", 5 * SECOND);
    f.check(
        status.is_ok(),
        &format!("no STATUS= below the cap: {status:?}"),
    );

    // The stop begins with one connection open, which then finishes.
    f.signal(libc::SIGTERM);
    let stopping = recv_until(&sock, "STOPPING=1", 5 * SECOND);
    f.check(stopping.is_ok(), &format!("no STOPPING=1: {stopping:?}"));
    ping(&mut a, b"still served while stopping");
    drop(a);
    let st = f.wait_exit(15 * SECOND);
    f.check(st.is_some_and(|s| s.success()), &format!("exit {st:?}"));
}

#[test]
fn notify_ready_status_stopping_fork() {
    notifications("fork");
}

#[test]
fn notify_ready_status_stopping_prefork() {
    // --max-conns 2 makes a pool of 2: the pool is the cap.
    notifications("prefork");
}

#[test]
fn notify_ready_status_stopping_thread() {
    notifications("thread");
}

#[test]
fn notify_ready_status_stopping_event() {
    notifications("event");
}

/// NOTIFY_SOCKET may name an abstract socket (`@name`, sd_notify(3)).
#[test]
fn notify_over_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    watchdog();
    let name = format!("forkd-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let mut cmd = Command::new(forkd());
    cmd.env("NOTIFY_SOCKET", format!("@{name}"));
    let mut f = Forkd::start_with(cmd, &["--mode", "thread"]);
    let ready = recv_until(&sock, "READY=1", 5 * SECOND);
    f.check(ready.is_ok(), &format!("no READY=1: {ready:?}"));
    f.signal(libc::SIGTERM);
    let stopping = recv_until(&sock, "STOPPING=1", 5 * SECOND);
    f.check(stopping.is_ok(), &format!("no STOPPING=1: {stopping:?}"));
    let st = f.wait_exit(15 * SECOND);
    f.check(st.is_some_and(|s| s.success()), &format!("exit {st:?}"));
}

/// A NOTIFY_SOCKET nobody listens on changes nothing.
#[test]
fn notify_socket_without_listener_is_harmless() {
    watchdog();
    let dir = TempDir::new("nonotify");
    let mut cmd = Command::new(forkd());
    cmd.env("NOTIFY_SOCKET", dir.path().join("absent.sock"));
    let mut f = Forkd::start_with(cmd, &[]);
    let data = pattern(5000, 9);
    assert!(roundtrip(f.addr(), &data) == data);
    f.signal(libc::SIGTERM);
    let st = f.wait_exit(15 * SECOND);
    f.check(st.is_some_and(|s| s.success()), &format!("exit {st:?}"));
}

/// Fill `path`'s receive queue with non-blocking sends until it refuses
/// more: a fresh socket's first datagram must get EAGAIN, so the limit met
/// is the receiver's queue (net.unix.max_dgram_qlen), not one sender's
/// buffer. Returns the senders, which keep their datagrams charged to them.
fn fill_queue(path: &Path) -> Vec<UnixDatagram> {
    let mut senders = Vec::new();
    for _ in 0..10_000 {
        let s = UnixDatagram::unbound().unwrap();
        s.set_nonblocking(true).unwrap();
        s.connect(path).unwrap();
        let mut sent = 0;
        while s.send(b"X_FILLER=1\n").is_ok() {
            sent += 1;
        }
        senders.push(s);
        if sent == 0 {
            return senders;
        }
    }
    panic!("the notification socket's queue never filled");
}

/// Receive every datagram waiting on `sock`, without waiting for more.
fn drain(sock: &UnixDatagram) -> Vec<String> {
    sock.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    sock.set_nonblocking(false).unwrap();
    got
}

/// A service manager that stops reading NOTIFY_SOCKET cannot stop forkd:
/// with the queue full before forkd starts, READY=1, the STATUS= updates of
/// many connections and STOPPING=1 are dropped, clients are served all the
/// while, the drops are counted once the socket drains, and SIGTERM stops
/// forkd with exit 0. (The blocking send it replaced hung the dispatcher.)
fn notify_socket_nobody_reads(mode: &str) {
    watchdog();
    let dir = TempDir::new("fullnotify");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let _fillers = fill_queue(&path);
    let mut cmd = Command::new(forkd());
    cmd.env("NOTIFY_SOCKET", &path);
    let mut f = Forkd::start_with(cmd, &["--mode", mode]);
    // Long enough for STATUS= updates (at most one a second) to be due.
    let start = Instant::now();
    let mut served = 0;
    while served < 50 || start.elapsed() < 2 * SECOND {
        let data = pattern(100, served);
        f.check(
            roundtrip(f.addr(), &data) == data,
            "a client was not served while NOTIFY_SOCKET was full",
        );
        served += 1;
        f.check(start.elapsed() < 30 * SECOND, "connections too slow");
    }
    f.check(
        f.wait_log("NOTIFY_SOCKET is full", 5 * SECOND),
        "READY=1 to a full socket: no drop logged",
    );
    // The manager reads again: the next update gets through, the drops are told.
    let queued = drain(&sock);
    f.check(
        queued.iter().all(|m| m.starts_with("X_FILLER")),
        &format!("a notification got into a full queue: {queued:?}"),
    );
    let data = pattern(100, 999);
    f.check(
        roundtrip(f.addr(), &data) == data,
        "not served after the drain",
    );
    let status = recv_until(&sock, "STATUS=", 5 * SECOND);
    f.check(
        status.is_ok(),
        &format!("no STATUS= after the drain: {status:?}"),
    );
    f.check(
        f.wait_log("notifications were dropped while it was full", 5 * SECOND),
        "the dropped notifications were not counted once the socket drained",
    );
    // Full again: STOPPING=1 is dropped, and the stop goes on.
    let _fillers = fill_queue(&path);
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(15 * SECOND);
}

#[test]
fn notify_socket_nobody_reads_never_blocks_fork() {
    notify_socket_nobody_reads("fork");
}

#[test]
fn notify_socket_nobody_reads_never_blocks_thread() {
    notify_socket_nobody_reads("thread");
}

#[test]
fn notify_socket_nobody_reads_never_blocks_event() {
    notify_socket_nobody_reads("event");
}

/// Run forkd with stderr to a file and JOURNAL_STREAM set by `journal`
/// (given the file's `dev:ino`); serve two clients at --max-conns 1 (so a
/// warning is logged), stop, and return the log's lines.
fn log_with_journal_stream(journal: impl Fn(&str) -> String) -> Vec<String> {
    let dir = TempDir::new("journal");
    let log_path = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log_path).unwrap();
    let meta = file.metadata().unwrap();
    let mut cmd = Command::new(forkd());
    cmd.args(["--print-addr", "--log", "stderr", "-l", "127.0.0.1:0", "-v"])
        .args(["--max-conns", "1", "--mode", "fork"])
        .env(
            "JOURNAL_STREAM",
            journal(&format!("{}:{}", meta.dev(), meta.ino())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(file);
    let mut child = cmd.spawn().unwrap();
    let out = Collected::from(child.stdout.take().unwrap());
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut guard = KillOnDrop(child);
    let addr: Option<SocketAddr> = wait_until(10 * SECOND, || out.text().lines().count() > 0)
        .then(|| out.text().lines().next().unwrap().parse().unwrap());
    let addr = addr.unwrap_or_else(|| panic!("forkd printed no address; log:\n{}", read_log()));

    let mut a = connect(addr);
    ping(&mut a, b"one");
    // The cap is reached: the second client waits in the backlog.
    let mut b = TcpStream::connect_timeout(&addr, 5 * SECOND).unwrap();
    b.set_read_timeout(Some(10 * SECOND)).unwrap();
    assert!(
        wait_until(5 * SECOND, || read_log().contains("at the cap")),
        "no at-the-cap warning; log:\n{}",
        read_log()
    );
    drop(a);
    ping(&mut b, b"two");
    drop(b);
    assert!(
        wait_until(5 * SECOND, || read_log().matches("end pid ").count() == 2),
        "two ends should be logged; log:\n{}",
        read_log()
    );
    let child = &mut guard.0;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = wait_until(15 * SECOND, || child.try_wait().unwrap().is_some());
    let st = child.try_wait().unwrap();
    assert!(
        st.is_some_and(|s| s.success()),
        "exit {st:?}; log:\n{}",
        read_log()
    );
    read_log().lines().map(str::to_string).collect()
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn journal_stream_gives_priority_prefixes_and_no_timestamps() {
    watchdog();
    let lines = log_with_journal_stream(|dev_ino| dev_ino.to_string());
    let all = lines.join("\n");
    assert!(!lines.is_empty());
    for line in &lines {
        let prio = line
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .and_then(|(n, _)| n.parse::<u8>().ok());
        assert!(
            prio.is_some_and(|p| p <= 7),
            "line without a <N> prefix: {line:?}\n{all}"
        );
        let text = &line[3..];
        assert!(
            !text.starts_with(|c: char| c.is_ascii_digit()) && !text.contains(" forkd["),
            "journald lines carry no timestamp or pid tag of their own: {line:?}"
        );
    }
    assert!(
        all.contains("<6>forkd "),
        "start-up line at info (6):\n{all}"
    );
    assert!(
        all.contains("<4>at the cap"),
        "cap warning at warning (4):\n{all}"
    );
    assert!(
        all.contains("<7>child "),
        "a child's debug line (7) names the child:\n{all}"
    );
}

#[test]
fn journal_stream_of_another_file_gives_plain_lines() {
    watchdog();
    let lines = log_with_journal_stream(|dev_ino| {
        let (dev, ino) = dev_ino.split_once(':').unwrap();
        format!("{dev}:{}", ino.parse::<u64>().unwrap() + 1)
    });
    for line in &lines {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit()) && line.contains(" forkd["),
            "plain lines start with a timestamp: {line:?}"
        );
    }
}

// ---- units and install.sh

const UNITS: [&str; 5] = [
    "forkd.socket",
    "forkd.service",
    "forkd-standalone.service",
    "forkd-inetd.socket",
    "forkd-inetd@.service",
];

/// The highest `systemd-analyze security` exposure each service may have.
const EXPOSURE: [(&str, f64); 3] = [
    ("forkd.service", 0.5),
    ("forkd-inetd@.service", 0.5),
    ("forkd-standalone.service", 1.5),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The units, copied to `dir` with ExecStart= pointing at the built forkd
/// (`systemd-analyze verify` checks that the binary exists).
fn units_in(dir: &Path) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|u| {
            let text = std::fs::read_to_string(repo().join("systemd").join(u)).unwrap();
            let dest = dir.join(u);
            std::fs::write(&dest, text.replace("/usr/local/bin/forkd", forkd())).unwrap();
            dest
        })
        .collect()
}

fn analyze(args: &[&str], unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn units_pass_verify_without_warnings() {
    watchdog();
    require("systemd-analyze");
    let dir = TempDir::new("verify");
    for unit in units_in(dir.path()) {
        let (ok, text) = analyze(&["verify"], &unit);
        // Warnings (unknown keys, bad values) do not fail verify: refuse them too.
        let ours: Vec<&str> = text.lines().filter(|l| l.contains("forkd")).collect();
        assert!(
            ok && ours.is_empty(),
            "systemd-analyze verify {}:\n{text}",
            unit.display()
        );
    }
}

#[test]
fn services_meet_their_exposure_bounds() {
    watchdog();
    require("systemd-analyze");
    let dir = TempDir::new("security");
    units_in(dir.path());
    for (unit, bound) in EXPOSURE {
        let path = dir.path().join(unit);
        let (_, text) = analyze(&["security", "--offline=true", "--no-pager"], &path);
        let score: f64 = text
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")
            })
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{text}"));
        assert!(
            score <= bound,
            "{unit}: exposure {score} above {bound}:\n{text}"
        );
        eprintln!("{unit}: exposure {score} (bound {bound})");
    }
}

/// What the deployments promise, read from the unit files.
#[test]
fn units_say_what_the_deployments_promise() {
    let read = |u: &str| std::fs::read_to_string(repo().join("systemd").join(u)).unwrap();
    let has = |u: &str, line: &str| {
        assert!(
            read(u).lines().any(|l| l.trim() == line),
            "{u} should have the line {line:?}"
        )
    };
    has("forkd.socket", "ListenStream=0.0.0.0:7");
    has("forkd.socket", "ListenStream=[::]:7");
    has("forkd.socket", "ListenDatagram=0.0.0.0:7");
    has("forkd.socket", "ListenDatagram=[::]:7");
    assert!(read("forkd-standalone.service").contains("--udp 0.0.0.0:7 --udp [::]:7"));
    has("forkd-inetd.socket", "Accept=yes");
    for service in ["forkd.service", "forkd-standalone.service"] {
        has(service, "Type=notify");
        has(service, "KillMode=mixed");
        has(service, "DynamicUser=yes");
    }
    for service in ["forkd.service", "forkd-inetd@.service"] {
        has(service, "PrivateNetwork=yes");
        has(service, "RestrictAddressFamilies=AF_UNIX");
        has(service, "CapabilityBoundingSet=");
    }
    has(
        "forkd-standalone.service",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    );
    has(
        "forkd-standalone.service",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    );
    has("forkd-inetd@.service", "StandardInput=socket");
    has("forkd-inetd@.service", "StandardError=journal");
    assert!(read("forkd-inetd@.service").contains("ExecStart=/usr/local/bin/forkd --inetd"));
}

fn install_sh(destdir: &Path, args: &[&str]) -> String {
    let out = Command::new("sh")
        .arg(repo().join("scripts/install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("PREFIX", "/opt/forkd")
        .env("FORKD_BIN", forkd())
        .env_remove("UNITDIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh {args:?} failed:\n{text}");
    text
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn install_sh_installs_into_destdir_and_uninstalls() {
    watchdog();
    let dest = TempDir::new("install");
    let text = install_sh(dest.path(), &[]);
    assert!(
        text.contains("systemctl enable --now forkd.socket"),
        "{text}"
    );

    let bin = dest.path().join("opt/forkd/bin/forkd");
    let unitdir = dest.path().join("etc/systemd/system");
    let mut expected: Vec<PathBuf> = UNITS.iter().map(|u| unitdir.join(u)).collect();
    expected.push(bin.clone());
    let share = dest.path().join("opt/forkd/share");
    for f in [
        "man/man8/forkd.8",
        "bash-completion/completions/forkd",
        "zsh/site-functions/_forkd",
        "fish/vendor_completions.d/forkd.fish",
    ] {
        expected.push(share.join(f));
    }
    expected.sort();
    assert_eq!(files_under(dest.path()), expected);
    assert!(std::fs::read(&bin).unwrap() == std::fs::read(forkd()).unwrap());
    for u in UNITS.iter().filter(|u| u.ends_with(".service")) {
        let text = std::fs::read_to_string(unitdir.join(u)).unwrap();
        assert!(
            text.contains("ExecStart=/opt/forkd/bin/forkd "),
            "{u}:\n{text}"
        );
        assert!(
            !text.contains("/usr/local/bin/forkd"),
            "{u} still names /usr/local"
        );
    }

    let page = std::fs::read_to_string(share.join("man/man8/forkd.8")).unwrap();
    assert!(
        page.contains(".SH SIGNALS") && page.contains("\\-\\-grace"),
        "{page}"
    );
    let bash = std::fs::read_to_string(share.join("bash-completion/completions/forkd")).unwrap();
    assert!(bash.contains("--first-byte-timeout"), "{bash}");

    install_sh(dest.path(), &["--uninstall"]);
    assert_eq!(files_under(dest.path()), Vec::<PathBuf>::new());
}

/// `ListenDatagram=` activation, as `forkd.socket` does it: a stream and a
/// datagram socket on one port, passed together. `systemd-socket-activate`
/// makes sockets of one type per run but passes on the descriptors it was
/// given, so one run (TCP) starts another (`--datagram`, UDP), which starts
/// forkd with both. forkd serves each, and prints the UDP one as `udp ADDR`.
#[test]
fn socket_activation_listen_datagram_with_a_stream_socket() {
    watchdog();
    require("systemd-socket-activate");
    for _attempt in 0..5 {
        let port = free_port(false);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args([
            "-l",
            &addr.to_string(),
            "systemd-socket-activate",
            "--datagram",
        ])
        .args(["-l", &addr.to_string(), forkd()])
        .args(["--print-addr", "--log", "stderr", "--udp-rate", "0"])
        .env_remove("NOTIFY_SOCKET");
        let mut run = Running::spawn(cmd);
        if !wait_until(10 * SECOND, || {
            run.log().contains("Listening on") || run.exited()
        }) {
            run.check(false, "the outer systemd-socket-activate did not listen");
        }
        // The first connection execs the inner run, which binds UDP.
        let mut tcp = connect(addr);
        let inner = wait_until(10 * SECOND, || {
            run.log().matches("Listening on").count() >= 3 || run.exited()
        });
        if !inner || run.exited() {
            if run.log().contains("Address already in use") {
                continue;
            }
            run.check(false, "the inner systemd-socket-activate did not listen");
        }
        // The first datagram execs forkd, which finds it waiting.
        let c = udp_client("127.0.0.1:0", SECOND);
        let data = pattern(LARGEST, 12);
        let mut back = None;
        let answered = wait_until(10 * SECOND, || {
            back = udp_echo(&c, addr, &data);
            back.is_some()
        });
        run.check(answered, "no UDP echo from the activated forkd");
        run.check(
            back.is_some_and(|(b, from)| b == data && from == addr),
            "the UDP echo differs",
        );
        ping(&mut tcp, b"and TCP on the same port\n");
        run.check(
            wait_until(10 * SECOND, || run.out().lines().count() == 2),
            "forkd did not print both addresses",
        );
        assert_eq!(
            run.out().lines().collect::<Vec<_>>(),
            [addr.to_string(), format!("udp {addr}")]
        );
        drop(tcp);
        let status = run.terminate(15 * SECOND);
        run.check(
            status.is_some_and(|s| s.success()),
            &format!("forkd did not stop cleanly on SIGTERM: {status:?}"),
        );
        run.check(
            run.log().contains("udp stopped: "),
            "no UDP totals at the stop",
        );
        return;
    }
    panic!("no free port for systemd-socket-activate after 5 tries");
}

/// The largest UDP payload over IPv4.
const LARGEST: usize = 65_507;
