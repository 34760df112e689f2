//! The one harness of the integration tests, forkd's (tests/) and
//! forkd-load's (src/load/tests/): find the binaries, start the real forkd
//! on port 0 and read the addresses it prints when ready, run any other
//! process with its output collected, watch a log and a process tree, keep
//! temporary directories, and never wait without a deadline.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The forkd binary this test was built with.
pub fn forkd() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| binary("forkd"))
}

/// The forkd-load binary this test was built with.
pub fn forkd_load() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| binary("forkd-load"))
}

/// The path of the workspace's binary `name`. A test of that binary's
/// package is told where cargo built it (`CARGO_BIN_EXE_<name>`). Any other
/// test finds it beside its own build, in the same profile's directory,
/// after asking cargo to build what a plain `cargo test` at the top builds
/// (both binaries, with the same features, so nothing is built twice): a
/// no-op under `cargo test`, which has built them; under `cargo test -p`,
/// the other package's binary is brought up to date.
fn binary(name: &str) -> String {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return path.to_string_lossy().into_owned();
    }
    // This test is TARGET/PROFILE/deps/TEST-HASH.
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary in TARGET/PROFILE/deps");
    if let Some(cargo) = std::env::var_os("CARGO") {
        static BUILT: OnceLock<()> = OnceLock::new();
        BUILT.get_or_init(|| build_all(&cargo, dir));
    }
    let path = dir.join(name);
    assert!(path.is_file(), "no {name} binary at {}", path.display());
    path.to_string_lossy().into_owned()
}

/// `cargo test --no-run` for the whole default workspace, into `dir`'s
/// target directory and profile.
fn build_all(cargo: &OsStr, dir: &Path) {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(cargo);
    cmd.args(["test", "--no-run", "--quiet", "--manifest-path"])
        .arg(top.join("Cargo.toml"));
    match dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    if let Some(target) = dir.parent() {
        cmd.arg("--target-dir").arg(target);
    }
    let status = cmd.status().expect("run cargo test --no-run");
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// A directory of its own under the system's temporary directory, made
/// empty at start and removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `forkd-WHAT-PID-N`: unique in this process and across processes.
    pub fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "forkd-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a reader gave so far, collected line by line by a thread of its
/// own, so a process never blocks on a full pipe while a test waits.
#[derive(Clone)]
pub struct Collected {
    text: Arc<Mutex<String>>,
    ended: Arc<AtomicBool>,
}

impl Collected {
    /// Start collecting `r` until its end.
    pub fn from(r: impl Read + Send + 'static) -> Collected {
        let c = Collected {
            text: Arc::new(Mutex::new(String::new())),
            ended: Arc::new(AtomicBool::new(false)),
        };
        let sink = c.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                sink.text.lock().unwrap().push_str(&line);
                line.clear();
            }
            sink.ended.store(true, Ordering::SeqCst);
        });
        c
    }

    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Has the writing end closed (and everything been read)?
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

/// A spawned process whose stdout and stderr are collected as they come;
/// killed (SIGKILL) and waited for on drop.
pub struct Running {
    pub child: Child,
    out: Collected,
    /// None while stderr is left unread ([`Running::spawn_leaving_stderr`]).
    err: Option<Collected>,
    what: String,
}

impl Running {
    /// Spawn `cmd` with stdin from /dev/null and its output collected.
    pub fn spawn(cmd: Command) -> Running {
        let mut run = Running::spawn_leaving_stderr(cmd);
        run.read_stderr_from_now();
        run
    }

    /// As [`Running::spawn`], but stderr is a pipe nobody reads (its read
    /// end open in `child.stderr`, so writes to it wait rather than fail)
    /// until [`Running::read_stderr_from_now`].
    pub fn spawn_leaving_stderr(mut cmd: Command) -> Running {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let out = Collected::from(child.stdout.take().unwrap());
        Running {
            child,
            out,
            err: None,
            what,
        }
    }

    /// Start collecting stderr, if nothing does yet.
    pub fn read_stderr_from_now(&mut self) {
        if let Some(stderr) = self.child.stderr.take() {
            self.err = Some(Collected::from(stderr));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything written to stdout so far.
    pub fn out(&self) -> String {
        self.out.text()
    }

    /// Wait up to `limit` for stdout to close; everything written to it,
    /// or nothing if it did not close in time.
    pub fn out_to_end(&self, limit: Duration) -> String {
        if wait_until(limit, || self.out.ended()) {
            self.out()
        } else {
            String::new()
        }
    }

    /// Everything written to stderr so far (forkd's log); nothing while
    /// stderr is left unread.
    pub fn log(&self) -> String {
        self.err.as_ref().map(Collected::text).unwrap_or_default()
    }

    /// Wait up to `limit` for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log().contains(needle))
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Wait up to `limit` for at least `n` log lines containing `needle`.
    pub fn wait_log_count(&self, needle: &str, n: usize, limit: Duration) -> bool {
        wait_until(limit, || self.count_log(needle) >= n)
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait up to `limit` for the process to exit; None if it did not.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(limit)
    }

    /// Panic with the command and its output unless `ok`.
    pub fn check(&self, ok: bool, what: &str) {
        if !ok {
            panic!(
                "{what}\ncommand: {}\nstdout:\n{}\nstderr:\n{}",
                self.what,
                self.out(),
                self.log()
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free right now on 127.0.0.1 (and on ::1 when `v6`), for a
/// program that cannot pick its own (systemd-socket-activate and HAProxy
/// refuse port 0; forkd takes it, and prints what it got with
/// `--print-addr`). Another process may take it before it is used: callers
/// retry on a failed bind.
pub fn free_port(v6: bool) -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !v6 || TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// Poll `cond` every 10 ms until it holds or `limit` passes; true if it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when the tests run as root. When not, says on stderr, in one line
/// that `cargo test`'s capture does not swallow, that the calling test is
/// skipped and why, so the rest of the suite runs and the skip is seen.
pub fn root_or_skip(test: &str, why: &str) -> bool {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return true;
    }
    // Written to the descriptor itself: libtest captures eprintln!, not this.
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: needs root {why} (running as uid {euid})"
    );
    false
}

/// A running forkd (a [`Running`], which it derefs to: its log, signals,
/// exit), killed (SIGKILL) and waited for on drop.
pub struct Forkd {
    run: Running,
    /// The TCP addresses printed, one per line as `IP:PORT`.
    pub addrs: Vec<SocketAddr>,
    /// The UDP addresses printed, one per line as `udp IP:PORT`.
    pub udp_addrs: Vec<SocketAddr>,
    args: Vec<String>,
}

impl std::ops::Deref for Forkd {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.run
    }
}

impl std::ops::DerefMut for Forkd {
    fn deref_mut(&mut self) -> &mut Running {
        &mut self.run
    }
}

impl Forkd {
    /// Start `forkd --print-addr --log stderr -l 127.0.0.1:0 ARGS...` (no `-l`
    /// added when ARGS has one, or a `--udp`) and wait up to 10 s for its
    /// addresses. Every client of a test comes from one address, so the
    /// per-source limits (UDP's too) and early drop are off unless ARGS
    /// sets them.
    pub fn start(args: &[&str]) -> Forkd {
        Forkd::start_with(Command::new(forkd()), args)
    }

    /// As [`Forkd::start`], with a prepared command (environment, pre_exec...).
    pub fn start_with(cmd: Command, args: &[&str]) -> Forkd {
        let mut full: Vec<String> = vec!["--print-addr".into(), "--log".into(), "stderr".into()];
        if !args.iter().any(|a| ["-l", "--listen", "--udp"].contains(a)) {
            full.extend(["-l".into(), "127.0.0.1:0".into()]);
        }
        for (option, off) in [
            ("--max-per-ip", "0"),
            ("--max-per-net", "0"),
            ("--early-drop", "off"),
            ("--udp-rate", "0"),
        ] {
            if !args.contains(&option) {
                full.extend([option.into(), off.into()]);
            }
        }
        full.extend(args.iter().map(|s| s.to_string()));
        Forkd::launch(cmd, full)
    }

    /// Spawn `cmd` with `args`, collect its log, and wait up to 10 s for
    /// the addresses it prints (forkd closes stdout once it has).
    fn launch(cmd: Command, full: Vec<String>) -> Forkd {
        Forkd::launch_by(cmd, full, Running::spawn)
    }

    /// As [`Forkd::launch`], spawned by `spawn`.
    fn launch_by(mut cmd: Command, full: Vec<String>, spawn: fn(Command) -> Running) -> Forkd {
        cmd.args(&full);
        let run = spawn(cmd);
        let text = run.out_to_end(Duration::from_secs(10));
        let addrs: Vec<SocketAddr> = text.lines().filter_map(|l| l.parse().ok()).collect();
        let udp_addrs: Vec<SocketAddr> = text
            .lines()
            .filter_map(|l| l.strip_prefix("udp ")?.parse().ok())
            .collect();
        let mut f = Forkd {
            run,
            addrs,
            udp_addrs,
            args: full,
        };
        if f.addrs.is_empty() && f.udp_addrs.is_empty() {
            let status = f.wait_exit(Duration::from_secs(2));
            panic!(
                "forkd {:?} printed no address (status {status:?}); log:\n{}",
                f.args,
                f.log()
            );
        }
        f
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The first UDP address printed.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addrs[0]
    }

    /// The dispatcher's children as (pid, state, comm), from /proc.
    pub fn children(&self) -> Vec<Proc> {
        children_of(self.pid())
    }

    pub fn zombies(&self) -> usize {
        self.children().iter().filter(|p| p.state == 'Z').count()
    }

    /// Panic with the log if `ok` is false.
    pub fn check(&self, ok: bool, what: &str) {
        if !ok {
            // The failure again after the log, which can be long: a reader
            // of only the output's tail still sees what failed.
            panic!(
                "{what}\nforkd {:?} log:\n{}\n(failed: {what})",
                self.args,
                self.log()
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub comm: String,
}

/// Read /proc/PID/stat.
pub fn proc_stat(pid: i32) -> Option<Proc> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let mut rest = s[close + 2..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        state,
        comm,
    })
}

/// Every process whose parent is `ppid`.
pub fn children_of(ppid: i32) -> Vec<Proc> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some(p) = proc_stat(pid).filter(|p| p.ppid == ppid) {
            out.push(p);
        }
    }
    out
}

/// Connect with a 5 s timeout and 10 s read/write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Send `data`, half-close, read everything back (writing from a second thread
/// so large payloads cannot deadlock), and return what came back.
pub fn roundtrip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read echo");
    writer.join().unwrap();
    back
}

/// Deterministic pseudo-random bytes, different per `seed` (the pattern
/// forkd-load sends).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    forkd_load::pattern::bytes(len, seed)
}

/// Echo one message on an open connection and check it comes back.
pub fn ping(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

impl Forkd {
    /// Start forkd with exactly `args` (nothing added; include `--print-addr`)
    /// and wait up to 10 s for the addresses it prints.
    pub fn start_exact(args: &[&str]) -> Forkd {
        let args = args.iter().map(|s| s.to_string()).collect();
        Forkd::launch(Command::new(forkd()), args)
    }

    /// As [`Forkd::start_exact`], with stderr left unread: a log reader
    /// that stopped reading (see [`Running::spawn_leaving_stderr`]).
    pub fn start_exact_leaving_stderr(args: &[&str]) -> Forkd {
        let args = args.iter().map(|s| s.to_string()).collect();
        Forkd::launch_by(Command::new(forkd()), args, Running::spawn_leaving_stderr)
    }

    /// Wait up to `limit` for forkd to stop cleanly: exit status 0, and its
    /// last line, the "stopped: ..." summary, read from its stderr (which a
    /// thread reads, so the line can arrive a moment after the exit).
    pub fn expect_clean_exit(&mut self, limit: Duration) {
        let status = self.wait_exit(limit);
        self.check(
            status.and_then(|s| s.code()) == Some(0),
            &format!("expected forkd to exit with 0 within {limit:?}, got {status:?}"),
        );
        self.check(
            self.wait_log("stopped: ", limit),
            "forkd exited without its summary line",
        );
    }

    /// Panic with the log unless `read` gives `want` for the dispatcher and
    /// for its first live child (`what` names the property).
    pub fn check_dispatcher_and_child<T: PartialEq + std::fmt::Debug>(
        &self,
        what: &str,
        read: impl Fn(i32) -> T,
        want: &T,
    ) {
        let kid = *self
            .live_children()
            .first()
            .unwrap_or_else(|| panic!("no child to check {what} on"));
        for (who, pid) in [("dispatcher", self.pid()), ("child", kid)] {
            let got = read(pid);
            self.check(
                &got == want,
                &format!("{what} of the {who}: {got:?}, want {want:?}"),
            );
        }
    }

    /// Open a connection, echo one message on it, and wait for the one
    /// child serving it (fork mode, no other connection open); returns both.
    pub fn connection_and_child(&self) -> (TcpStream, i32) {
        let mut s = connect(self.addr());
        ping(&mut s, b"hello\n");
        self.check(
            wait_until(Duration::from_secs(15), || self.live_children().len() == 1),
            "expected one child",
        );
        (s, self.live_children()[0])
    }

    /// Pids of the dispatcher's live (not zombie) children.
    pub fn live_children(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .children()
            .iter()
            .filter(|p| p.state != 'Z')
            .map(|p| p.pid)
            .collect();
        pids.sort();
        pids
    }
}

/// Field `key` of /proc/PID/status (`"Uid"`, `"Threads"`...), its words
/// joined by single spaces; empty if the process or the field is gone.
pub fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// User plus system CPU time `pid` has used, from /proc/PID/stat.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // `rest` starts at field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// The command line `ps -f` shows for `pid`: /proc/PID/cmdline with NULs as spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(text.trim_end().to_string())
}

/// Is `pid` gone, or a zombie? (A zombie no longer runs; its parent has yet to reap it.)
pub fn ended(pid: i32) -> bool {
    proc_stat(pid).is_none_or(|p| p.state == 'Z')
}

/// TCP states (as /proc/net/tcp numbers them: 0A LISTEN, 06 TIME_WAIT...) of
/// every IPv4 and IPv6 socket whose local port is `port`.
pub fn tcp_states(port: u16) -> Vec<u8> {
    tcp_sockets()
        .into_iter()
        .filter(|&(p, _)| p == port)
        .map(|(_, st)| st)
        .collect()
}

/// The states of every IPv4 and IPv6 TCP socket of this network namespace.
pub fn tcp_states_all() -> Vec<u8> {
    tcp_sockets().into_iter().map(|(_, st)| st).collect()
}

/// (local port, state) of every IPv4 and IPv6 TCP socket, from /proc/net.
fn tcp_sockets() -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
                continue;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if let (Some(port), Ok(st)) = (port, u8::from_str_radix(state, 16)) {
                out.push((port, st));
            }
        }
    }
    out
}

/// What a finished forkd run left: exit status, stdout and stderr.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd` to its end, killing it (and panicking) if it takes longer than `limit`.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Send `data` on an open connection (from a second thread, so nothing can
/// deadlock), half-close, and return everything read back until the end.
pub fn echo_all(s: &mut TcpStream, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = s.read_to_end(&mut back);
    let written = writer.join().expect("writer thread");
    read?;
    written?;
    Ok(back)
}

/// Is a client on `s` left waiting: does a byte sent get no echo within `limit`?
pub fn unanswered(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    if s.write_all(b"?").is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let waiting = matches!(
        s.read(&mut b),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    );
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    waiting
}

/// Raise this test process's descriptor limit to its hard limit, for tests
/// that hold hundreds of sockets (the soft limit is often 1024).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised rlimit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A UDP client socket bound to `local` (port 0: any), with a `limit` read timeout.
pub fn udp_client(local: &str, limit: Duration) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind(local).expect("bind a UDP client");
    s.set_read_timeout(Some(limit)).unwrap();
    s
}

/// Send `data` to `to` and wait up to the socket's read timeout for a
/// reply; the reply and where it came from, or None when none came.
pub fn udp_echo(
    s: &std::net::UdpSocket,
    to: SocketAddr,
    data: &[u8],
) -> Option<(Vec<u8>, SocketAddr)> {
    s.send_to(data, to).expect("send a datagram");
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some((buf, from))
}
