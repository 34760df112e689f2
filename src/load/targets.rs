//! The servers `compare` measures, and how each is started and stopped.
//!
//! Every server runs in its own process group, with stdout on a pipe (the
//! readiness line: its bound address, or tcpserver's port) and stderr in
//! `OUT/logs/NAME.log`. Stopping sends SIGTERM to the group, waits up to
//! [`STOP_GRACE`], then SIGKILLs whatever of the group is left.
//!
//! The C floor servers are built from the sources compiled into forkd-load
//! (`benches/*.c`), and the Python server is written out from
//! `scripts/py_echo.py`, so a comparison needs nothing from the source tree.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::EXIT_CANTCREAT;
use forkd::error::{EXIT_UNAVAILABLE, Error};
use forkd::model::Mode;

/// How long a server may take to say it is listening.
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How long a server may take to stop after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

const FLOOR_FORK_C: &str = include_str!("../../benches/floor_fork.c");
const FLOOR_THREAD_C: &str = include_str!("../../benches/floor_thread.c");
const FLOOR_UDP_C: &str = include_str!("../../benches/floor_udp.c");
const FLOOR_PREFORK_C: &str = include_str!("../../benches/floor_prefork.c");
const FLOOR_EPOLL_C: &str = include_str!("../../benches/floor_epoll.c");
const PY_ECHO: &str = include_str!("../../scripts/py_echo.py");

/// A kind of server to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Forkd(Mode),
    FloorFork,
    FloorThread,
    /// UDP only: a blocking receive-and-send loop.
    FloorUdp,
    FloorPrefork,
    FloorEpoll,
    PythonFork,
    PythonThread,
    Socat,
    Tcpserver,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Forkd(Mode::Fork) => "forkd-fork",
            Kind::Forkd(Mode::Thread) => "forkd-thread",
            Kind::Forkd(Mode::Prefork) => "forkd-prefork",
            Kind::Forkd(Mode::Event) => "forkd-event",
            Kind::FloorFork => "floor-fork",
            Kind::FloorThread => "floor-thread",
            Kind::FloorUdp => "floor-udp",
            Kind::FloorPrefork => "floor-prefork",
            Kind::FloorEpoll => "floor-epoll",
            Kind::PythonFork => "python-fork",
            Kind::PythonThread => "python-thread",
            Kind::Socat => "socat",
            Kind::Tcpserver => "tcpserver",
        }
    }

    /// The C floor server of a forkd model: the least that model can do.
    pub fn floor(mode: Mode) -> Kind {
        match mode {
            Mode::Fork => Kind::FloorFork,
            Mode::Thread => Kind::FloorThread,
            Mode::Prefork => Kind::FloorPrefork,
            Mode::Event => Kind::FloorEpoll,
        }
    }

    /// `forkd`, `floor` or `peer`: how the table and chart group it.
    pub fn family(self) -> &'static str {
        match self {
            Kind::Forkd(_) => "forkd",
            Kind::FloorFork
            | Kind::FloorThread
            | Kind::FloorPrefork
            | Kind::FloorEpoll
            | Kind::FloorUdp => "floor",
            _ => "peer",
        }
    }

    /// Whether the server serves TCP (the rate, stream and hold workloads).
    pub fn tcp(self) -> bool {
        self != Kind::FloorUdp
    }

    /// Whether the server starts a process per connection.
    pub fn forks(self) -> bool {
        matches!(
            self,
            Kind::Forkd(Mode::Fork)
                | Kind::FloorFork
                | Kind::PythonFork
                | Kind::Socat
                | Kind::Tcpserver
        )
    }
}

/// What every start needs.
pub struct Launcher {
    pub out: PathBuf,
    pub forkd: PathBuf,
    /// Connections a server must be able to hold at once.
    pub capacity: usize,
    /// CPUs the servers are pinned to (`--pin`).
    pub cpus: Option<Vec<usize>>,
}

/// A running server, stopped on drop.
pub struct Server {
    pub kind: Kind,
    /// The TCP address (for a UDP-only server, its UDP address).
    pub addr: SocketAddr,
    /// The UDP address, for a server that echoes UDP.
    pub udp: Option<SocketAddr>,
    child: Child,
    stopped: Option<String>,
}

/// What starting a server came to.
pub enum Started {
    Running(Server),
    /// Not installed: skipped, with the reason.
    Skipped(String),
}

impl Launcher {
    /// The forkd binary: `--forkd`, or `forkd` next to the running executable.
    pub fn find_forkd(given: Option<&Path>) -> Result<PathBuf, Error> {
        let path = match given {
            Some(p) => p.to_path_buf(),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("forkd")))
                .unwrap_or_else(|| PathBuf::from("forkd")),
        };
        if !path.is_file() {
            return Err(Error::new(
                EXIT_UNAVAILABLE,
                format!(
                    "no forkd binary at {} (give one with --forkd PATH)",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    /// The pool of forkd's prefork mode and of the prefork floor: forkd's
    /// default for this machine, or the capacity if that is less.
    pub fn workers(&self) -> usize {
        forkd::prefork::default_workers().min(self.capacity)
    }

    pub fn start(&self, kind: Kind) -> Result<Started, Error> {
        let cap = self.capacity.to_string();
        match kind {
            Kind::Forkd(mode) => {
                let mode = clap::ValueEnum::to_possible_value(&mode)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                let mut cmd = Command::new(&self.forkd);
                cmd.args(["--print-addr", "-l", "127.0.0.1:0", "--log", "stderr", "-q"])
                    .args(["--udp", "127.0.0.1:0", "--udp-rate", "0"])
                    .args(["--mode", &mode, "--max-conns", &cap])
                    // The load comes from one address, as no public client
                    // does: the per-source limits and early drop stay off.
                    .args([
                        "--max-per-ip",
                        "0",
                        "--max-per-net",
                        "0",
                        "--early-drop",
                        "off",
                    ]);
                if mode == "prefork" {
                    // The same pool as the floor's.
                    cmd.args(["--workers", &self.workers().to_string()]);
                }
                self.spawn(kind, cmd, Ready::Address).map(Started::Running)
            }
            Kind::FloorFork
            | Kind::FloorThread
            | Kind::FloorPrefork
            | Kind::FloorEpoll
            | Kind::FloorUdp => {
                let bin = self.build_floor(kind)?;
                let mut cmd = Command::new(bin);
                cmd.arg("0");
                if kind == Kind::FloorPrefork {
                    cmd.arg(self.workers().to_string());
                }
                self.spawn(kind, cmd, Ready::Address).map(Started::Running)
            }
            Kind::PythonFork | Kind::PythonThread => {
                let Some(python) = which("python3") else {
                    return Ok(Started::Skipped("python3 is not installed".into()));
                };
                let script = self.out.join("py_echo.py");
                write(&script, PY_ECHO)?;
                let mode = if kind == Kind::PythonFork {
                    "fork"
                } else {
                    "thread"
                };
                let mut cmd = Command::new(python);
                cmd.arg(&script).args([mode, "0"]);
                self.spawn(kind, cmd, Ready::Address).map(Started::Running)
            }
            Kind::Socat => {
                let Some(socat) = which("socat") else {
                    return Ok(Started::Skipped(
                        "socat is not installed (apt-get install socat)".into(),
                    ));
                };
                let port = free_port()?;
                let mut cmd = Command::new(socat);
                // -b 4096: with socat's default 8 KiB blocks, a write into
                // the PIPE can block on a nearly full pipe that only socat
                // itself drains, and a long stream stalls.
                cmd.args(["-b", "4096"])
                    .arg(format!(
                        "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024"
                    ))
                    .arg("PIPE");
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                self.spawn(kind, cmd, Ready::Connect(addr))
                    .map(Started::Running)
            }
            Kind::Tcpserver => {
                let Some(tcpserver) = which("tcpserver") else {
                    return Ok(Started::Skipped(
                        "tcpserver is not installed (apt-get install ucspi-tcp)".into(),
                    ));
                };
                let mut cmd = Command::new(tcpserver);
                // -1: print the port when listening; -R -H -l0: no ident or
                // DNS lookups per connection; -c: the connection limit
                // (default 40); -b: the listen queue (default 20).
                cmd.args(["-1", "-R", "-H", "-l", "0", "-c", &cap, "-b", "1024"])
                    .args(["127.0.0.1", "0", "cat"]);
                self.spawn(kind, cmd, Ready::Port).map(Started::Running)
            }
        }
    }

    /// Compile a floor server into the output directory with `$CC $CFLAGS`
    /// (default `cc -O2`; `CFLAGS="-O2 -static-pie"` builds it statically linked).
    fn build_floor(&self, kind: Kind) -> Result<PathBuf, Error> {
        let (stem, source, extra): (&str, &str, &[&str]) = match kind {
            Kind::FloorFork => ("floor_fork", FLOOR_FORK_C, &[]),
            Kind::FloorUdp => ("floor_udp", FLOOR_UDP_C, &[]),
            Kind::FloorPrefork => ("floor_prefork", FLOOR_PREFORK_C, &[]),
            Kind::FloorEpoll => ("floor_epoll", FLOOR_EPOLL_C, &[]),
            _ => ("floor_thread", FLOOR_THREAD_C, &["-pthread"]),
        };
        let src = self.out.join(format!("{stem}.c"));
        let bin = self.out.join(stem);
        write(&src, source)?;
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let cflags = std::env::var("CFLAGS").unwrap_or_else(|_| "-O2".to_string());
        let out = Command::new(&cc)
            .args(cflags.split_whitespace())
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::new(EXIT_UNAVAILABLE, format!("cannot run {cc}: {e}")))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            return Err(Error::new(
                EXIT_UNAVAILABLE,
                format!(
                    "{cc} failed to build {}: {}",
                    src.display(),
                    msg.lines().next().unwrap_or("no message")
                ),
            ));
        }
        Ok(bin)
    }

    fn spawn(&self, kind: Kind, mut cmd: Command, ready: Ready) -> Result<Server, Error> {
        let log_path = self.out.join("logs").join(format!("{}.log", kind.name()));
        let log = File::create(&log_path).map_err(|e| {
            Error::new(
                EXIT_CANTCREAT,
                format!("cannot create {}: {e}", log_path.display()),
            )
        })?;
        cmd.stdin(Stdio::null())
            .stdout(match ready {
                Ready::Connect(_) => Stdio::null(),
                _ => Stdio::piped(),
            })
            .stderr(log)
            .process_group(0);
        if let Some(cpus) = self.cpus.clone() {
            // SAFETY: between fork and exec the closure only makes the
            // sched_setaffinity system call (no allocation, no locks).
            unsafe {
                cmd.pre_exec(move || super::sys::pin_current(&cpus));
            }
        }
        let unavailable = |what: String| {
            Error::new(
                EXIT_UNAVAILABLE,
                format!("{}: {what} (see {})", kind.name(), log_path.display()),
            )
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| unavailable(format!("cannot start: {e}")))?;
        // forkd prints its TCP address, then `udp ADDR`; the UDP floor only the latter.
        let lines = match kind {
            Kind::Forkd(_) => 2,
            _ => 1,
        };
        let (addr, udp) = match ready {
            Ready::Address | Ready::Port => {
                let printed = child
                    .stdout
                    .take()
                    .map(|out| first_lines(out, lines, READY_WAIT))
                    .unwrap_or_default();
                let udp = printed
                    .iter()
                    .find_map(|l| l.trim().strip_prefix("udp ")?.parse().ok());
                let tcp = printed.iter().find_map(|l| parse_ready(l, ready));
                (tcp.or(udp), udp)
            }
            Ready::Connect(addr) => (
                wait_connect(addr, READY_WAIT, &mut child).then_some(addr),
                None,
            ),
        };
        let mut server = Server {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            udp,
            child,
            stopped: None,
        };
        match addr {
            Some(a) => {
                server.addr = a;
                Ok(server)
            }
            None => {
                let status = server.stop();
                Err(unavailable(format!(
                    "did not say it was listening ({status})"
                )))
            }
        }
    }
}

/// How a server says it is listening.
#[derive(Clone, Copy, Debug)]
enum Ready {
    /// Prints `IP:PORT` on stdout.
    Address,
    /// Prints the port number on stdout (tcpserver -1).
    Port,
    /// Says nothing: poll until a connection succeeds.
    Connect(SocketAddr),
}

fn parse_ready(line: &str, ready: Ready) -> Option<SocketAddr> {
    let line = line.trim();
    match ready {
        Ready::Port => line
            .parse::<u16>()
            .ok()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        _ => line.parse().ok(),
    }
}

/// The first `n` lines a child prints (fewer if it closes stdout first), within `limit`.
fn first_lines(out: impl std::io::Read + Send + 'static, n: usize, limit: Duration) -> Vec<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        for _ in 0..n {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 || tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + limit;
    let mut lines = Vec::new();
    while lines.len() < n {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    lines
}

fn wait_connect(addr: SocketAddr, limit: Duration, child: &mut Child) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A port free right now on 127.0.0.1, for servers that cannot take port 0.
fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::os("cannot find a free port on 127.0.0.1", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::os("cannot find a free port on 127.0.0.1", e))
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| {
        Error::new(
            EXIT_CANTCREAT,
            format!("cannot write {}: {e}", path.display()),
        )
    })
}

impl Server {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether the server is still running.
    pub fn alive(&mut self) -> bool {
        self.stopped.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Stop the server's process group (SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`]); how the server itself ended, e.g. `exit 0`.
    pub fn stop(&mut self) -> String {
        if let Some(s) = &self.stopped {
            return s.clone();
        }
        let group = self.pid();
        // SAFETY: kill(2) on the process group of a child we started with
        // process_group(0), so its pgid is its pid.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let end = Instant::now() + STOP_GRACE;
        let mut status: Option<ExitStatus> = None;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; ends what is left of the group (stragglers, or
        // the server itself if it ignored SIGTERM).
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let text = match status {
            Some(s) => describe(s),
            None => {
                let s = self.child.wait().ok();
                format!(
                    "still running {} s after SIGTERM, killed ({})",
                    STOP_GRACE.as_secs(),
                    s.map(describe).unwrap_or_default()
                )
            }
        };
        self.stopped = Some(text.clone());
        text
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown".to_string(),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
