//! forkd under a real systemd: systemd 252 booted as PID 1 of a
//! `systemd-nspawn` container (a minimal Debian 12 tree, built once with
//! `debootstrap` and kept outside the repository), driven with `systemctl`
//! and `journalctl` through `nsenter`, one container per deployment:
//!
//! - `forkd.socket` + `forkd.service`: activation on the first connection
//!   (IPv4 and IPv6), `Type=notify` readiness and `STATUS=` in `systemctl
//!   status`, priorities in the journal, a `systemctl stop` that lets a held
//!   connection finish, and the sandbox as the running processes have it;
//! - `forkd-inetd.socket` + `forkd-inetd@.service`: one instance per
//!   connection, sandboxed likewise;
//! - `forkd-standalone.service`: forkd binds port 7 itself, then holds no
//!   capability;
//! - the Debian package (`cargo deb`): `dpkg -i`, then `systemctl enable
//!   --now forkd.socket` serves echo.
//!
//! Each test needs root, `systemd-nspawn` (Debian: systemd-container) and
//! `debootstrap`; without them, or where nspawn cannot boot a container,
//! it says so in one line and passes (`FORKD_LIVE_REQUIRED=1`, which
//! `.ci/run` sets, makes that a failure). The tree is built on first use
//! (about 80 s, from the Debian mirror apt uses) in `$FORKD_LIVE_TREE`, by
//! default `/var/cache/forkd-test/bookworm`. Every command and wait has a
//! deadline; a container is powered off from inside even when a check
//! fails (its `Drop`), and `systemd-nspawn` gets SIGTERM (which it turns
//! into an orderly shutdown) if the test process dies.
use forkd_test_util::*;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);
const V4: &str = "127.0.0.1:7";
const V6: &str = "[::1]:7";
/// The range systemd gives `DynamicUser=` users (systemd 252).
const DYNAMIC_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Say in one line, on stderr itself (libtest captures eprintln!), that
/// `test` is skipped and why; a failure instead under FORKD_LIVE_REQUIRED.
fn skip(test: &str, why: &str) {
    if std::env::var_os("FORKD_LIVE_REQUIRED").is_some_and(|v| v != "0") {
        panic!("{test}: {why} (FORKD_LIVE_REQUIRED is set, so this is a failure)");
    }
    let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// What a finished command said.
struct Output {
    ok: bool,
    code: Option<i32>,
    out: String,
    err: String,
}

impl Output {
    fn text(&self) -> String {
        format!("{}{}", self.out, self.err)
    }
}

fn collect(r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut r = r;
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// Run `cmd` to its end, killing it after `limit`; panics on a timeout.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what} did not finish within {limit:?}; it said:\n{}{}",
            String::from_utf8_lossy(&out.lock().unwrap()),
            String::from_utf8_lossy(&err.lock().unwrap())
        );
    };
    // The readers end at end-of-file, which the exit brings, unless the
    // command left a process holding its output: wait for them briefly.
    let take = |b: &Arc<Mutex<Vec<u8>>>| {
        wait_until(SECOND, || Arc::strong_count(b) == 1);
        String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
    };
    Output {
        ok: status.success(),
        code: status.code(),
        out: take(&out),
        err: take(&err),
    }
}

// ---------------------------------------------------------------------------
// The Debian tree, built once.

/// The Debian mirror apt uses on this machine: the first `bookworm` source
/// in /etc/apt/sources.list or a deb822 file under sources.list.d.
fn apt_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        // One-line style: deb [options] URI SUITE COMPONENTS...
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() != Some(&"deb") {
                continue;
            }
            let rest: Vec<&str> = words[1..]
                .iter()
                .copied()
                .skip_while(|w| w.starts_with('['))
                .collect();
            let rest = match rest.iter().position(|w| w.ends_with(']')) {
                Some(i) if !rest[0].contains("://") => rest[i + 1..].to_vec(),
                _ => rest,
            };
            if rest.len() >= 2 && rest[1] == "bookworm" {
                return Some(rest[0].to_string());
            }
        }
        // deb822 style: stanzas of Types:, URIs:, Suites:.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                })
            };
            let (Some(types), Some(uris), Some(suites)) =
                (field("Types"), field("URIs"), field("Suites"))
            else {
                continue;
            };
            if types.split_whitespace().any(|t| t == "deb")
                && suites.split_whitespace().any(|s| s == "bookworm")
            {
                return uris.split_whitespace().next().map(str::to_string);
            }
        }
    }
    None
}

/// The tree to boot: `$FORKD_LIVE_TREE`, or /var/cache/forkd-test/bookworm,
/// built with debootstrap if it is not there yet. Tests running at once
/// take turns through a lock file; the tree appears under its name only
/// once complete. Err: why it cannot be had.
fn tree() -> Result<PathBuf, String> {
    let dir = std::env::var_os("FORKD_LIVE_TREE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd-test/bookworm"));
    let complete = |d: &Path| d.join("usr/lib/systemd/systemd").is_file();
    if complete(&dir) {
        return Ok(dir);
    }
    let parent = dir.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {parent:?}: {e}"))?;
    let lock = File::create(parent.join(".forkd-live.lock"))
        .map_err(|e| format!("cannot create the lock in {parent:?}: {e}"))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    let locked = wait_until(600 * SECOND, || unsafe {
        libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0
    });
    if !locked {
        return Err(format!(
            "another run held {parent:?}/.forkd-live.lock for 10 minutes"
        ));
    }
    if complete(&dir) {
        return Ok(dir);
    }
    let mirror = apt_mirror().ok_or("no bookworm mirror in apt's sources")?;
    let partial = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let _ = writeln!(
        std::io::stderr(),
        "building the container tree {} from {mirror} (debootstrap, once; about 80 s)",
        dir.display()
    );
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--variant=minbase",
        "--include=systemd,systemd-sysv,dbus",
        "bookworm",
    ])
    .arg(&partial)
    .arg(&mirror);
    let out = run(cmd, 900 * SECOND);
    if !out.ok || !complete(&partial) {
        let _ = std::fs::remove_dir_all(&partial);
        let tail: Vec<&str> = out.err.lines().rev().take(3).collect();
        return Err(format!(
            "debootstrap from {mirror} failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    std::fs::rename(&partial, &dir).map_err(|e| format!("cannot rename {partial:?}: {e}"))?;
    Ok(dir)
}

/// None when the live tests can run here, or why not.
fn cannot_run(test: &str) -> Option<String> {
    if !root_or_skip(test, "to boot systemd in a container (systemd-nspawn)") {
        return Some(String::new());
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ] {
        if !on_path(tool) {
            return Some(format!(
                "{tool} not found (Debian: apt-get install {package})"
            ));
        }
    }
    None
}

// ---------------------------------------------------------------------------
// A container.

/// systemd booted in a container from the tree; powered off on drop.
struct Container {
    nspawn: Option<Child>,
    /// The container's init, as the host numbers it.
    leader: i32,
    name: String,
    console: Arc<Mutex<Vec<u8>>>,
}

impl Container {
    /// Boot systemd with `binds` (host path, container path) bound
    /// read-only. Err: the container could not boot (the caller skips).
    fn boot(binds: &[(&Path, &str)]) -> Result<Container, String> {
        let tree = tree()?;
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "forkd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&tree)
            .args([
                "--volatile=overlay",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=pipe",
                "--capability=CAP_BPF",
                "--system-call-filter=bpf",
                "-M",
                &name,
            ])
            .env("SYSTEMD_LOG_COLOR", "0");
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        cmd.arg("-b")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl in the child before exec touches no shared state.
        // nspawn turns SIGTERM into an orderly shutdown of the container:
        // if this test process dies, the container goes too.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("systemd-nspawn: {e}"))?;
        let console = collect(child.stdout.take().unwrap());
        let errors = collect(child.stderr.take().unwrap());
        let nspawn = child.id() as i32;
        let mut c = Container {
            nspawn: Some(child),
            leader: 0,
            name,
            console,
        };
        // The container's init is nspawn's child; systemd is up once its
        // private socket exists.
        let mut exited = false;
        let booted = wait_until(60 * SECOND, || {
            if c.nspawn.as_mut().unwrap().try_wait().unwrap().is_some() {
                exited = true;
                return true;
            }
            // nspawn's first child sets the container up and goes; init
            // is the child that has become systemd.
            c.leader = children_of(nspawn)
                .iter()
                .find(|p| p.comm == "systemd")
                .map_or(0, |p| p.pid);
            c.leader != 0
                && Path::new(&format!("/proc/{}/root/run/systemd/private", c.leader)).exists()
        });
        if exited || !booted {
            let said = String::from_utf8_lossy(&errors.lock().unwrap()).into_owned();
            let last = said.lines().rev().find(|l| !l.trim().is_empty());
            return Err(format!(
                "systemd-nspawn could not boot {} ({})",
                tree.display(),
                last.unwrap_or(if exited {
                    "it exited"
                } else {
                    "no /run/systemd/private within 60 s"
                })
            ));
        }
        // Wait for the boot to settle, so units start in a quiet system.
        let state = c.sh("systemctl is-system-running --wait", 60 * SECOND);
        assert!(
            ["running", "degraded"].contains(&state.out.trim()),
            "{}: system state {:?}\nconsole:\n{}",
            c.name,
            state.text(),
            c.console()
        );
        Ok(c)
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).into_owned()
    }

    /// `sh -c SCRIPT` inside the container (all its namespaces, its root).
    fn sh(&self, script: &str, limit: Duration) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "-r", "-w", "--"])
            .args(["/bin/sh", "-c", script])
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("LC_ALL", "C.UTF-8")
            .env("COLUMNS", "160");
        run(cmd, limit)
    }

    /// As [`Container::sh`], panicking unless it succeeds; its stdout.
    fn must(&self, script: &str) -> String {
        let out = self.sh(script, 30 * SECOND);
        assert!(
            out.ok,
            "{}: `{script}` failed (exit {:?}):\n{}",
            self.name,
            out.code,
            out.text()
        );
        out.out
    }

    /// One property of a unit (`systemctl show -P`).
    fn prop(&self, unit: &str, name: &str) -> String {
        self.must(&format!("systemctl show -P {name} {unit}"))
            .trim()
            .to_string()
    }

    fn wait_prop(&self, unit: &str, name: &str, value: &str, limit: Duration) {
        let mut last = String::new();
        let ok = wait_until(limit, || {
            last = self.prop(unit, name);
            last == value
        });
        assert!(
            ok,
            "{}: {unit} {name} is {last:?}, not {value:?} after {limit:?}\n{}",
            self.name,
            self.journal("")
        );
    }

    /// The journal's lines, as `journalctl ARGS -o short-iso` gives them.
    fn journal(&self, args: &str) -> String {
        self.must(&format!("journalctl --no-pager -o short-iso {args}"))
    }

    /// (priority, message) of every line `identifier` logged for `unit`.
    fn logged(&self, unit: &str, identifier: &str) -> Vec<(u8, String)> {
        let text = self.must(&format!(
            "journalctl --no-pager -o json -u '{unit}' SYSLOG_IDENTIFIER={identifier}"
        ));
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let prio = v["PRIORITY"].as_str().unwrap().parse().unwrap();
                let msg = v["MESSAGE"].as_str().unwrap_or_default().to_string();
                (prio, msg)
            })
            .collect()
    }

    /// Wait until `unit`'s journal (from `identifier`) has a line with `needle`.
    fn wait_logged(&self, unit: &str, identifier: &str, needle: &str, limit: Duration) {
        let ok = wait_until(limit, || {
            self.logged(unit, identifier)
                .iter()
                .any(|(_, m)| m.contains(needle))
        });
        assert!(
            ok,
            "{}: no {needle:?} from {unit} within {limit:?}:\n{}",
            self.name,
            self.journal(&format!("-u '{unit}'"))
        );
    }

    /// Connect to `addr` in the container's network namespace (a thread
    /// enters it to create the socket, which then works from anywhere).
    fn connect(&self, addr: &str) -> TcpStream {
        let addr: SocketAddr = addr.parse().unwrap();
        let ns = File::open(format!("/proc/{}/ns/net", self.leader)).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns(2) moves only this new thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            TcpStream::connect_timeout(&addr, 10 * SECOND)
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {addr} in the container: {e}"))
    }

    /// The host's pid for the container's `pid`.
    fn host_pid(&self, pid: i32) -> i32 {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.leader)).unwrap();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(host) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{host}/ns/pid")).ok() != Some(ns.clone()) {
                continue;
            }
            let status =
                std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"));
            if nspid.and_then(|s| s.split_whitespace().last()) == Some(&pid.to_string()) {
                return host;
            }
        }
        panic!("{}: no host pid for the container's pid {pid}", self.name);
    }

    /// The host pid of a unit's main process.
    fn main_pid(&self, unit: &str) -> i32 {
        let pid: i32 = self.prop(unit, "MainPID").parse().unwrap();
        assert!(pid > 0, "{}: {unit} has no main process", self.name);
        self.host_pid(pid)
    }
}

impl Drop for Container {
    /// Power off from inside (SIGRTMIN+4 to the container's systemd, as
    /// `machinectl poweroff` does); if it has not ended in 30 s, SIGKILL its
    /// init, which ends every process in the container.
    fn drop(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if self.leader > 0 {
            // SAFETY: kill(2) on the container's init, which we started.
            unsafe { libc::kill(self.leader, libc::SIGRTMIN() + 4) };
        }
        let gone = |n: &mut Child| n.try_wait().ok().flatten().is_some();
        if !wait_until(30 * SECOND, || gone(&mut nspawn)) {
            if self.leader > 0 {
                // SAFETY: as above.
                unsafe { libc::kill(self.leader, libc::SIGKILL) };
            }
            if !wait_until(10 * SECOND, || gone(&mut nspawn)) {
                let _ = nspawn.kill();
            }
            let _ = nspawn.wait();
        }
    }
}

/// Boot a container with forkd and the units in `systemd/` (at
/// /usr/local/bin/forkd and /mnt/units), or say why the test is skipped.
fn with_units(test: &str) -> Option<Container> {
    if let Some(why) = cannot_run(test) {
        if !why.is_empty() {
            skip(test, &why);
        }
        return None;
    }
    let units = repo().join("systemd");
    match Container::boot(&[
        (Path::new(forkd()), "/usr/local/bin/forkd"),
        (&units, "/mnt/units"),
    ]) {
        Ok(c) => {
            c.must("cp /mnt/units/* /etc/systemd/system/ && systemctl daemon-reload");
            Some(c)
        }
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Checks.

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.set_read_timeout(Some(10 * SECOND)).unwrap();
    s.set_write_timeout(Some(10 * SECOND)).unwrap();
    ping(s, msg);
}

/// One connection: send, half-close, read the echo to its end.
fn echo_once(c: &Container, addr: &str, msg: &[u8]) {
    let mut s = c.connect(addr);
    echo(&mut s, msg);
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "more than the echo from {addr}");
}

/// A field of /proc/PID/status.
fn status_field(pid: i32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// What the sandbox of a running process must be: a dynamic user, no new
/// privileges, a seccomp filter, no capability but `bounding` in the
/// bounding set, the system read-only, and (if `private_net`) a network
/// namespace with nothing but loopback.
fn check_sandbox(c: &Container, pid: i32, what: &str, bounding: u64, private_net: bool) {
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        DYNAMIC_UIDS.contains(&uid),
        "{what}: uid {uid} is not a DynamicUser= uid"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}: NoNewPrivs");
    assert_eq!(status_field(pid, "Seccomp"), "2", "{what}: seccomp filter");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            u64::from_str_radix(&status_field(pid, set), 16).unwrap(),
            0,
            "{what}: {set} must be empty"
        );
    }
    assert_eq!(
        u64::from_str_radix(&status_field(pid, "CapBnd"), 16).unwrap(),
        bounding,
        "{what}: capability bounding set"
    );
    // The mounts the process sees: the one on top at each point.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mut top: Vec<(String, bool)> = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ro = f[5].split(',').any(|o| o == "ro");
        top.retain(|(p, _)| p != f[4]);
        top.push((f[4].to_string(), ro));
    }
    for path in [
        "/",
        "/etc",
        "/usr",
        "/usr/local/bin/forkd",
        "/var",
        "/var/lib",
        "/home",
        "/root",
    ] {
        let (mount, ro) = top
            .iter()
            .filter(|(p, _)| path == p || p == "/" || path.starts_with(&format!("{p}/")))
            .max_by_key(|(p, _)| p.len())
            .unwrap();
        assert!(*ro, "{what}: {path} is writable (mount {mount})");
    }
    let own = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let host = std::fs::read_link(format!("/proc/{}/ns/net", c.leader)).unwrap();
    if private_net {
        assert_ne!(own, host, "{what}: no network namespace of its own");
        let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let links: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(links, ["lo"], "{what}: network interfaces");
    } else {
        assert_eq!(own, host, "{what}: expected the system's network");
    }
}

/// The host pids of the children of host pid `pid`.
fn child_pids(pid: i32) -> Vec<i32> {
    children_of(pid).iter().map(|p| p.pid).collect()
}

/// The forkd lines at warning or worse, as `journalctl -p warning` shows them.
fn warnings(c: &Container, unit: &str) -> Vec<String> {
    c.must(&format!(
        "journalctl --no-pager -o cat -p warning -u '{unit}' SYSLOG_IDENTIFIER=forkd"
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

/// `systemctl stop` while a connection is held: the connection goes on
/// echoing through the stop, and once the client closes, the service
/// stops at once, well within --grace (10 s), with a clean result.
fn stop_lets_held_connection_finish(c: &Container, unit: &str, held: &mut TcpStream) {
    c.must(&format!("systemctl stop --no-block {unit}"));
    c.wait_logged(
        unit,
        "forkd",
        "stopping: no new connections; 1 active connection may finish within 10s",
        10 * SECOND,
    );
    assert_eq!(c.prop(unit, "ActiveState"), "deactivating");
    echo(held, b"still served while stopping\n");
    held.shutdown(Shutdown::Write).unwrap();
    let closed = Instant::now();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    c.wait_prop(unit, "ActiveState", "inactive", 10 * SECOND);
    let took = closed.elapsed();
    assert!(
        took < 5 * SECOND,
        "{unit} took {took:?} to stop after the last client"
    );
    assert_eq!(c.prop(unit, "Result"), "success");
    assert_eq!(c.prop(unit, "ExecMainStatus"), "0");
    let lines = c.logged(unit, "forkd");
    let last = &lines.last().unwrap().1;
    assert!(
        last.starts_with("stopped: ") && last.contains("served"),
        "{unit}: last line {last:?}"
    );
}

/// Where a test leaves what it captured (for the README).
fn capture(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::write(path, text);
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn live_socket_activated_forkd_service() {
    let Some(c) = with_units("live_socket_activated_forkd_service") else {
        return;
    };
    let unit = "forkd.service";
    c.must("systemctl enable --now forkd.socket");
    assert_eq!(c.prop("forkd.socket", "ActiveState"), "active");
    assert_eq!(
        c.prop(unit, "ActiveState"),
        "inactive",
        "started before a client came"
    );

    // The first connection starts forkd, IPv4 or IPv6 alike.
    echo_once(&c, V4, b"hello over IPv4\n");
    assert_eq!(c.prop(unit, "ActiveState"), "active");
    echo_once(&c, V6, b"hello over IPv6\n");
    // Type=notify: active means READY=1 came; STATUS= follows the counts.
    c.wait_prop(unit, "StatusText", "active 0/1024, served 2", 5 * SECOND);
    assert!(
        warnings(&c, unit).is_empty(),
        "warnings at start: {:?}",
        warnings(&c, unit)
    );
    let logged = c.logged(unit, "forkd");
    assert!(
        logged.iter().any(|(p, m)| *p == 6
            && m.starts_with("forkd ")
            && m.contains("socket-activated on echo, echo")),
        "{logged:?}"
    );

    // Connections held: the sandbox of the dispatcher and of a child.
    let mut held = c.connect(V4);
    echo(&mut held, b"held\n");
    let mut doomed = c.connect(V6);
    echo(&mut doomed, b"doomed\n");
    let main = c.main_pid(unit);
    wait_until(5 * SECOND, || child_pids(main).len() == 2);
    let kids = child_pids(main);
    assert_eq!(kids.len(), 2, "children of forkd: {kids:?}");
    check_sandbox(&c, main, "forkd.service's dispatcher", 0, true);
    for k in &kids {
        check_sandbox(&c, *k, "forkd.service's child", 0, true);
    }
    c.wait_prop(unit, "StatusText", "active 2/1024, served 4", 5 * SECOND);
    let status = c.sh(
        "systemctl status --no-pager --full forkd.service",
        10 * SECOND,
    );
    assert!(
        status.out.contains("Status: \"active 2/1024, served 4\""),
        "{}",
        status.text()
    );
    capture("live-systemctl-status.txt", &status.out);

    // Priorities: SIGUSR1's status line is info; a child killed by a signal
    // is a warning, and the only line `journalctl -p warning` shows.
    c.must("systemctl kill --kill-whom=main -s SIGUSR1 forkd.service");
    c.wait_logged(
        unit,
        "forkd",
        "status: mode fork (reap handler), active 2/1024",
        10 * SECOND,
    );
    let doomed_pid = {
        let mut peer = None;
        wait_until(5 * SECOND, || {
            peer = kids.iter().copied().find(|k| {
                let cmdline = std::fs::read(format!("/proc/{k}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains("[::1]")
            });
            peer.is_some()
        });
        peer.expect("the IPv6 connection's child")
    };
    // SAFETY: kill(2) on a child of the forkd this test started.
    unsafe { libc::kill(doomed_pid, libc::SIGKILL) };
    c.wait_logged(unit, "forkd", "killed by SIGKILL", 10 * SECOND);
    let warned = warnings(&c, unit);
    assert_eq!(warned.len(), 1, "journalctl -p warning: {warned:?}");
    assert!(
        warned[0].starts_with("end pid ")
            && warned[0].contains(": killed by SIGKILL, 7 bytes echoed"),
        "{warned:?}"
    );
    for (prio, msg) in c.logged(unit, "forkd") {
        let want = if msg.contains("killed by SIGKILL") {
            4
        } else {
            6
        };
        assert_eq!(prio, want, "priority of {msg:?}");
    }

    stop_lets_held_connection_finish(&c, unit, &mut held);
    capture(
        "live-journalctl.txt",
        &c.journal("-u forkd.service -u forkd.socket"),
    );
    // The socket stays, and a new client starts forkd again.
    echo_once(&c, V4, b"again\n");
    assert_eq!(c.prop(unit, "ActiveState"), "active");
    assert!(warnings(&c, unit).len() == 1, "{:?}", warnings(&c, unit));
}

#[test]
fn live_inetd_one_instance_per_connection() {
    let Some(c) = with_units("live_inetd_one_instance_per_connection") else {
        return;
    };
    c.must("systemctl enable --now forkd-inetd.socket");
    let running = || -> Vec<String> {
        c.must("systemctl list-units --plain --no-legend --state=running 'forkd-inetd@*'")
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    assert!(running().is_empty());
    let mut a = c.connect(V4);
    let mut b = c.connect(V6);
    echo(&mut a, b"first\n");
    echo(&mut b, b"second\n");
    let mut units = Vec::new();
    wait_until(10 * SECOND, || {
        units = running();
        units.len() == 2
    });
    assert_eq!(units.len(), 2, "instances: {units:?}");
    let pids: BTreeSet<i32> = units.iter().map(|u| c.main_pid(u)).collect();
    assert_eq!(pids.len(), 2, "one process per connection: {pids:?}");
    for (u, p) in units.iter().zip(&pids) {
        check_sandbox(&c, *p, u, 0, true);
        assert!(warnings(&c, u).is_empty(), "{u}: {:?}", warnings(&c, u));
    }
    for s in [&mut a, &mut b] {
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
    let gone = wait_until(10 * SECOND, || running().is_empty());
    assert!(gone, "instances left: {:?}", running());
    let lines = c.logged("forkd-inetd@*", "forkd");
    let ends: Vec<&(u8, String)> = lines
        .iter()
        .filter(|(_, m)| m.starts_with("inetd conn "))
        .collect();
    assert_eq!(ends.len(), 2, "{lines:?}");
    for (prio, msg) in ends {
        assert_eq!(*prio, 6, "{msg}");
        assert!(msg.contains(": closed by client, "), "{msg}");
    }
    assert!(lines.iter().any(|(_, m)| m.contains("[::1]")), "{lines:?}");
    assert!(warnings(&c, "forkd-inetd@*").is_empty());
}

#[test]
fn live_standalone_service() {
    let Some(c) = with_units("live_standalone_service") else {
        return;
    };
    let unit = "forkd-standalone.service";
    // Type=notify: start returns once READY=1 came.
    c.must("systemctl enable --now forkd-standalone.service");
    assert_eq!(c.prop(unit, "ActiveState"), "active");
    assert_eq!(c.prop(unit, "StatusText"), "active 0/1024, served 0");
    assert!(
        warnings(&c, unit).is_empty(),
        "warnings at start: {:?}",
        warnings(&c, unit)
    );
    echo_once(&c, V4, b"standalone over IPv4\n");
    echo_once(&c, V6, b"standalone over IPv6\n");
    let mut held = c.connect(V4);
    echo(&mut held, b"held\n");
    let main = c.main_pid(unit);
    wait_until(5 * SECOND, || child_pids(main).len() == 1);
    // CAP_NET_BIND_SERVICE stays in the bounding set, but neither the
    // dispatcher nor a child holds it once port 7 is bound.
    let bind = 1u64 << 10; // CAP_NET_BIND_SERVICE
    check_sandbox(&c, main, "forkd-standalone's dispatcher", bind, false);
    for k in child_pids(main) {
        check_sandbox(&c, k, "forkd-standalone's child", bind, false);
    }
    c.wait_prop(unit, "StatusText", "active 1/1024, served 3", 5 * SECOND);
    stop_lets_held_connection_finish(&c, unit, &mut held);
    assert!(warnings(&c, unit).is_empty(), "{:?}", warnings(&c, unit));
}

/// The Debian package of this build: `cargo xtask deb`, packaging the
/// binaries `cargo test` built (`--no-build --profile dev`) rather than a
/// release build of its own. Err: why it cannot be made.
fn debian_package() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut probe = Command::new(&cargo);
    probe.args(["deb", "--version"]);
    if !run(probe, 60 * SECOND).ok {
        return Err("cargo-deb not installed (cargo install cargo-deb)".into());
    }
    // forkd-load is another package's binary: make sure it is there to pack.
    forkd_load();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-forkd.deb");
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(repo())
        .args([
            "xtask",
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "--quiet",
            "--output",
        ])
        .arg(&out);
    let made = run(cmd, 600 * SECOND);
    assert!(
        made.ok && out.is_file(),
        "cargo xtask deb failed:\n{}",
        made.text()
    );
    Ok(out)
}

#[test]
fn live_debian_package_installs_and_serves() {
    let test = "live_debian_package_installs_and_serves";
    if let Some(why) = cannot_run(test) {
        if !why.is_empty() {
            skip(test, &why);
        }
        return;
    }
    let deb = match debian_package() {
        Ok(d) => d,
        Err(why) => return skip(test, &why),
    };
    let c = match Container::boot(&[(&deb, "/mnt/forkd.deb")]) {
        Ok(c) => c,
        Err(why) => return skip(test, &why),
    };
    c.must("dpkg -i /mnt/forkd.deb");
    // Installed, not enabled: the three deployments share port 7.
    for unit in [
        "forkd.socket",
        "forkd-inetd.socket",
        "forkd-standalone.service",
    ] {
        assert_eq!(c.prop(unit, "UnitFileState"), "disabled", "{unit}");
        assert_eq!(c.prop(unit, "ActiveState"), "inactive", "{unit}");
    }
    for file in [
        "/usr/bin/forkd",
        "/usr/bin/forkd-load",
        "/usr/lib/systemd/system/forkd-inetd@.service",
        "/usr/share/man/man8/forkd.8.gz",
        "/usr/share/man/man1/forkd-load.1.gz",
        "/usr/share/bash-completion/completions/forkd",
        "/usr/share/zsh/vendor-completions/_forkd",
        "/usr/share/fish/vendor_completions.d/forkd.fish",
        "/usr/share/doc/forkd/README.md",
    ] {
        c.must(&format!("dpkg -S {file} && test -s {file}"));
    }
    let sections = c.must("zcat /usr/share/man/man8/forkd.8.gz | grep '^\\.SH'");
    for s in ["OPTIONS", "SIGNALS", "EXIT STATUS", "ENVIRONMENT", "FILES"] {
        assert!(
            sections.contains(&format!(".SH {s}")),
            "forkd.8: {sections}"
        );
    }
    assert!(c.must("forkd --version").starts_with("forkd "));

    c.must("systemctl enable --now forkd.socket");
    echo_once(&c, V4, b"packaged, over IPv4\n");
    echo_once(&c, V6, b"packaged, over IPv6\n");
    let unit = "forkd.service";
    assert_eq!(c.prop(unit, "ActiveState"), "active");
    assert!(c.prop(unit, "ExecStart").contains("path=/usr/bin/forkd "));
    c.wait_prop(unit, "StatusText", "active 0/1024, served 2", 5 * SECOND);
    check_sandbox(&c, c.main_pid(unit), "the packaged forkd.service", 0, true);
    assert!(warnings(&c, unit).is_empty(), "{:?}", warnings(&c, unit));

    // Removing the package stops what it started.
    c.must("dpkg -r forkd");
    assert_eq!(c.prop("forkd.socket", "ActiveState"), "inactive");
    assert_eq!(c.prop(unit, "ActiveState"), "inactive");
    assert!(!c.sh("test -e /usr/bin/forkd", 10 * SECOND).ok);
}
