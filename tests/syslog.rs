//! Syslog from children: every line a connection's process logs must carry
//! that process's own pid, not the dispatcher's.
//!
//! The test runs a real rsyslogd of its own, listening on a socket in a
//! temporary directory and writing what it receives to a file there, so
//! nothing of the host's logging is touched. Without rsyslogd (Debian
//! package `rsyslog`) the test fails: it cannot check anything otherwise.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

/// An rsyslogd of the test's own, stopped on drop.
struct Rsyslogd {
    child: Child,
    socket: PathBuf,
    output: PathBuf,
}

fn find_rsyslogd() -> PathBuf {
    let mut places: Vec<PathBuf> = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        places.extend(std::env::split_paths(&path).map(|d| d.join("rsyslogd")));
    }
    places.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "rsyslogd is not installed, so forkd's logging to syslog cannot be checked: \
             install it (Debian: apt-get install -y rsyslog) and run the tests again"
        )
    })
}

impl Rsyslogd {
    fn start(dir: &Path) -> Rsyslogd {
        let bin = find_rsyslogd();
        let socket = dir.join("log.sock");
        let output = dir.join("messages");
        let conf = dir.join("rsyslog.conf");
        // Only the socket in `dir`: no /dev/log (SysSock.Use off), no kernel
        // log (imklog is never loaded), no rate limiting; each line is
        // "TAG[PID]: MESSAGE".
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" RateLimit.Interval="0")
template(name="plain" type="string" string="%syslogtag%%msg%\n")
*.* action(type="omfile" file="{output}" template="plain")
"#,
                dir = dir.display(),
                socket = socket.display(),
                output = output.display(),
            ),
        )
        .unwrap();
        let child = Command::new(&bin)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("rsyslogd.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut r = Rsyslogd {
            child,
            socket,
            output,
        };
        if !wait_until(LONG, || r.socket.exists()) {
            let status = r.child.try_wait();
            let err = std::fs::read_to_string(dir.join("rsyslogd.err")).unwrap_or_default();
            panic!("rsyslogd made no socket ({status:?}):\n{err}");
        }
        r
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Rsyslogd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if !wait_until(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten().is_some()
        }) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The pid in "forkd[PID]: ..." and the message after it.
fn parse(line: &str) -> Option<(i32, &str)> {
    let rest = line.strip_prefix("forkd[")?;
    let close = rest.find("]: ")?;
    Some((rest[..close].parse().ok()?, &rest[close + 3..]))
}

#[test]
fn children_log_to_syslog_under_their_own_pid() {
    let dir = TempDir::new("syslog");
    let syslog = Rsyslogd::start(dir.path());
    let socket = syslog.socket.to_str().unwrap().to_string();
    let mut f = Forkd::start_exact(&[
        "--print-addr",
        "--log",
        "syslog",
        "--syslog-socket",
        &socket,
        "-vv",
        "-l",
        "127.0.0.1:0",
    ]);
    let dispatcher = f.pid();

    // Some one after another, some at once.
    for i in 0..4 {
        let data = pattern(1000, i);
        assert_eq!(roundtrip(f.addr(), &data), data);
    }
    let held: Vec<_> = (0..3)
        .map(|i| {
            let mut s = connect(f.addr());
            ping(&mut s, format!("held {i}\n").as_bytes());
            s
        })
        .collect();
    drop(held);

    f.signal(libc::SIGTERM);
    let status = f.wait_exit(LONG);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "forkd's exit");
    let complete = wait_until(LONG, || {
        syslog.text().contains("stopped: 7 connections served")
    });
    let text = syslog.text();
    assert!(
        complete,
        "rsyslogd's file lacks forkd's summary line:\n{text}"
    );

    let mut ended = BTreeSet::new();
    let mut children = BTreeSet::new();
    for (pid, message) in text.lines().filter_map(parse) {
        if pid == dispatcher {
            if let Some(rest) = message.strip_prefix("end pid ") {
                ended.insert(rest.split(' ').next().unwrap().parse::<i32>().unwrap());
            }
        } else {
            assert!(
                message.starts_with("conn "),
                "a line under pid {pid} that is not a child's: {message:?}\n{text}"
            );
            children.insert(pid);
        }
    }
    assert_eq!(ended.len(), 7, "expected 7 'end pid' lines:\n{text}");
    assert!(!children.contains(&dispatcher));
    assert_eq!(
        children, ended,
        "the pids children logged under differ from the pids the dispatcher reaped:\n{text}"
    );
}

/// A syslog daemon that stops reading cannot stop forkd: its socket's queue
/// is full before forkd starts (the test fills it with non-blocking sends
/// from fresh sockets until one's first datagram is refused), the lines of
/// 300 connections (dispatcher's and children's, `-v`) are dropped while
/// every client is served, the next line after the daemon reads again says
/// how many were dropped, and SIGTERM stops forkd with exit 0.
#[test]
fn a_syslog_daemon_that_stops_reading_cannot_stop_forkd() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("syslog-full");
    let path = dir.join("log.sock");
    let daemon = UnixDatagram::bind(&path).unwrap();
    let mut fillers = Vec::new();
    let full = (0..10_000).any(|_| {
        let s = UnixDatagram::unbound().unwrap();
        s.set_nonblocking(true).unwrap();
        s.connect(&path).unwrap();
        let mut sent = 0;
        while s.send(b"<13>filler").is_ok() {
            sent += 1;
        }
        fillers.push(s);
        sent == 0
    });
    assert!(full, "the syslog socket's queue never filled");
    let socket = path.to_str().unwrap();
    let args = ["--log", "syslog", "--syslog-socket", socket, "-v"];
    let mut f = Forkd::start_exact(&[&["--print-addr", "-l", "127.0.0.1:0"], &args[..]].concat());
    for i in 0..300 {
        let data = pattern(100, i);
        assert!(roundtrip(f.addr(), &data) == data, "connection {i}");
    }
    // The daemon reads again: drain, then one more connection's lines.
    daemon.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 8192];
    while daemon.recv(&mut buf).is_ok() {}
    daemon.set_nonblocking(false).unwrap();
    daemon
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let data = pattern(100, 999);
    assert!(
        roundtrip(f.addr(), &data) == data,
        "not served after the drain"
    );
    let mut got = Vec::new();
    let told = wait_until(LONG, || {
        if let Ok(n) = daemon.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got.iter()
            .any(|m| m.contains(" dropped: the log was not being read"))
    });
    assert!(told, "no count of dropped lines after the drain: {got:?}");
    f.signal(libc::SIGTERM);
    let status = f.wait_exit(LONG);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "forkd's exit");
}
