//! SIGUSR2: replace the running binary without refusing a connection
//! (nginx's convention).
//!
//! 1. The dispatcher starts the binary it was started from (the path read
//!    at start, so a binary replaced on disk since is the one started),
//!    with the same arguments, and hands it its listening sockets the way
//!    systemd's socket activation does: descriptors 3, 4... with
//!    `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`. `LISTEN_PID` must be
//!    the new process's own pid, known only after the fork: the child writes
//!    its pid's digits into room left in an environment string prepared
//!    before the fork (no allocation between fork and exec), then calls
//!    `execve`.
//! 2. The old dispatcher keeps accepting meanwhile: both accept from the
//!    same sockets, so no connection waits for the new one to start.
//! 3. The new forkd says it is ready as it would to systemd (`READY=1`), to
//!    a datagram socket the old one made for it (`FORKD_UPGRADE_NOTIFY`,
//!    an abstract socket name). The old one takes the message only from the
//!    new process's pid (`SO_PASSCRED`).
//! 4. Then the old dispatcher closes its copies of the listeners (the
//!    sockets stay open in the new process: nothing queued is lost) and
//!    lets its own connections finish within `--grace`, as a graceful stop.
//!    Under systemd it first tells the manager `MAINPID=` the new pid.
//!
//! If the new binary cannot be executed, exits before it is ready, or is
//! not ready within [`READY_WITHIN`], the old dispatcher logs why and
//! serves on as if nothing happened (a late new process is sent SIGTERM).
//!
//! Nothing the new process sends is trusted beyond "ready": the pid is the
//! one `fork` returned, checked against the sender's credentials the kernel
//! attaches, and the exec failure report is an errno, used for its text.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use crate::listen::Listener;

/// How long the new forkd has to report it is ready.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// The variable naming the old dispatcher's socket in the new one.
pub const NOTIFY_VAR: &str = "FORKD_UPGRADE_NOTIFY";

/// Variables forkd sets for the new process (any inherited value is dropped).
const OWN_VARS: [&str; 4] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", NOTIFY_VAR];

/// What forkd was started as, kept to start it again.
pub struct Upgrade {
    exe: Option<CString>,
    argv: Vec<CString>,
    under_way: Option<UnderWay>,
}

/// A new forkd started and not yet ready.
struct UnderWay {
    pid: i32,
    pidfd: OwnedFd,
    notify: UnixDatagram,
    /// Read end of a close-on-exec pipe: end of file when the exec
    /// succeeded, an errno when it failed.
    exec_errors: OwnedFd,
    deadline: Instant,
}

/// How an upgrade under way ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new forkd (this pid) accepts: stop accepting and drain.
    Ready(i32),
    /// It failed, for this reason: serve on.
    Failed(String),
}

/// SIGUSR2 came: start the new forkd unless forkd is stopping, and log
/// what was done; the caller serves on meanwhile. `upgrade` None: forkd
/// has none to offer (tests of the loop).
pub fn on_request(upgrade: Option<&mut Upgrade>, stopping: bool, listeners: &[Listener]) {
    let Some(upgrade) = upgrade else {
        return;
    };
    if stopping {
        crate::events::upgrade_refused("forkd is stopping");
        return;
    }
    match upgrade.start(listeners, Instant::now()) {
        Ok(pid) => crate::events::upgrade_started(pid),
        Err(why) => crate::events::upgrade_refused(&why),
    }
}

impl Upgrade {
    /// Read this process's binary and arguments (at start, before the
    /// binary on disk can be replaced).
    pub fn capture() -> Upgrade {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| CString::new(p.into_os_string().into_vec()).ok());
        let argv = std::env::args_os()
            .filter_map(|a| CString::new(a.into_vec()).ok())
            .collect();
        Upgrade {
            exe,
            argv,
            under_way: None,
        }
    }

    /// The new forkd's pid, while one is starting.
    pub fn under_way(&self) -> Option<i32> {
        self.under_way.as_ref().map(|u| u.pid)
    }

    /// Descriptors to poll while an upgrade is under way: the notify socket
    /// and the new process's pidfd.
    pub fn fds(&self) -> Option<[RawFd; 2]> {
        self.under_way
            .as_ref()
            .map(|u| [u.notify.as_raw_fd(), u.pidfd.as_raw_fd()])
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.under_way.as_ref().map(|u| u.deadline)
    }

    /// Start the new forkd with `listeners`; returns its pid.
    pub fn start(&mut self, listeners: &[Listener], now: Instant) -> Result<i32, String> {
        if let Some(pid) = self.under_way() {
            return Err(format!("the new forkd (pid {pid}) is starting already"));
        }
        let Some(exe) = self.exe.clone() else {
            return Err("forkd's own binary could not be found at start".into());
        };
        if listeners.is_empty() {
            return Err("no listening socket to hand over".into());
        }
        let shown = String::from_utf8_lossy(exe.as_bytes()).into_owned();
        let os = |what: &str, e: io::Error| format!("{what}: {}", crate::error::describe(&e));

        let name = format!("forkd-upgrade-{}-{:016x}", std::process::id(), random());
        let notify = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| os("notify socket", e))?,
        )
        .map_err(|e| os("cannot bind the notify socket", e))?;
        notify
            .set_nonblocking(true)
            .map_err(|e| os("notify socket", e))?;
        set_passcred(&notify).map_err(|e| os("SO_PASSCRED", e))?;

        let n = listeners.len();
        // Everything the child needs lies above the descriptors it fills
        // (3..3+n), so no dup2 overwrites a source.
        let above = 3 + n as i32;
        let high = |fd: RawFd| -> io::Result<OwnedFd> {
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
            let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
            if d < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(d) })
        };
        let sources: Vec<OwnedFd> = listeners
            .iter()
            .map(|l| high(std::os::fd::AsFd::as_fd(l).as_raw_fd()))
            .collect::<io::Result<_>>()
            .map_err(|e| os("cannot duplicate a listener", e))?;
        let (err_read, err_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| os("pipe", e.into()))?;
        let err_write = high(err_write.as_raw_fd()).map_err(|e| os("pipe", e))?;

        // The environment: this one, with forkd's own variables replaced.
        let names: Vec<String> = listeners
            .iter()
            .map(|l| {
                // systemd's names never hold ':'; an address as name would
                // split LISTEN_FDNAMES, so those go as "unknown".
                if l.name == l.addr.to_string() || l.name.contains(':') {
                    "unknown".to_string()
                } else {
                    l.name.clone()
                }
            })
            .collect();
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| !OWN_VARS.iter().any(|o| k == *o))
            .filter_map(|(k, v)| {
                let mut e: OsString = k;
                e.push("=");
                e.push(v);
                CString::new(e.into_vec()).ok()
            })
            .collect();
        for (k, v) in [
            ("LISTEN_FDS", n.to_string()),
            ("LISTEN_FDNAMES", names.join(":")),
            (NOTIFY_VAR, format!("@{name}")),
        ] {
            env.push(CString::new(format!("{k}={v}")).map_err(|_| "bad variable".to_string())?);
        }
        // LISTEN_PID=, then room for any pid's digits and the NUL.
        const PID_AT: usize = "LISTEN_PID=".len();
        let mut listen_pid = b"LISTEN_PID=".to_vec();
        listen_pid.resize(PID_AT + 24, 0);
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(listen_pid.as_ptr().cast());
        envp.push(std::ptr::null());
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let src: Vec<RawFd> = sources.iter().map(|s| s.as_raw_fd()).collect();
        let err_fd = err_write.as_raw_fd();
        let pid_digits = listen_pid.as_mut_ptr();

        // SIGCHLD stays blocked from the fork to pidfd_open: the handler
        // must not reap the new process (one whose exec fails exits at
        // once) before it is watched, nor may its pid be signalled after.
        // The new forkd starts with SIGCHLD blocked; it sets its own mask.
        let started = crate::signals::without_sigchld(|| {
            // SAFETY: the child runs only async-signal-safe calls (dup2, getpid,
            // execve, write, _exit) and plain memory writes into buffers it
            // owns as a copy; nothing allocates between fork and exec.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(os("cannot fork", io::Error::last_os_error()));
            }
            if pid == 0 {
                // ---- child: becomes the new forkd.
                unsafe {
                    for (i, fd) in src.iter().enumerate() {
                        if libc::dup2(*fd, 3 + i as i32) < 0 {
                            exec_failed(err_fd);
                        }
                    }
                    write_pid(pid_digits.add(PID_AT), libc::getpid());
                    libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                    exec_failed(err_fd);
                }
            }
            // SAFETY: pidfd_open on our own child, which cannot have been
            // reaped yet (SIGCHLD is blocked).
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if pidfd < 0 {
                let e = io::Error::last_os_error();
                // SAFETY: our own child, not reaped (SIGCHLD is still blocked).
                unsafe { libc::kill(pid, libc::SIGTERM) };
                return Err(os("cannot watch the new forkd (pidfd_open)", e));
            }
            Ok((pid, pidfd))
        });
        drop(sources);
        drop(err_write);
        let (pid, pidfd) = started?;
        self.under_way = Some(UnderWay {
            pid,
            // SAFETY: a fresh descriptor nothing else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
            notify,
            exec_errors: err_read,
            deadline: now + READY_WITHIN,
        });
        log::debug!("upgrade: started {shown} as pid {pid}");
        Ok(pid)
    }

    /// Look at an upgrade under way: the new process ready, dead, or late.
    pub fn check(&mut self, now: Instant) -> Option<Outcome> {
        let u = self.under_way.as_ref()?;
        if ready_from(&u.notify, u.pid) {
            let pid = u.pid;
            self.under_way = None;
            return Some(Outcome::Ready(pid));
        }
        let exited = {
            let mut p = libc::pollfd {
                fd: u.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; timeout 0.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        if exited {
            let mut errno = [0u8; 4];
            let n = nix::unistd::read(&u.exec_errors, &mut errno).unwrap_or(0);
            let why = if n == 4 {
                let e = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
                let exe = self
                    .exe
                    .as_ref()
                    .map(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                    .unwrap_or_default();
                format!("cannot execute {exe}: {}", crate::error::describe(&e))
            } else {
                format!(
                    "the new forkd (pid {}) exited before it was ready (its own log line says why)",
                    u.pid
                )
            };
            // Reap it unless the SIGCHLD handler did (fork mode).
            // SAFETY: waitpid on our own child, without blocking.
            unsafe { libc::waitpid(u.pid, std::ptr::null_mut(), libc::WNOHANG) };
            self.under_way = None;
            return Some(Outcome::Failed(why));
        }
        if now >= u.deadline {
            let pid = u.pid;
            // SAFETY: our own child, not reaped (its pidfd is not readable).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            self.under_way = None;
            return Some(Outcome::Failed(format!(
                "the new forkd (pid {pid}) was not ready within {}s: sent it SIGTERM",
                READY_WITHIN.as_secs()
            )));
        }
        None
    }
}

/// Did a datagram from `pid` say `READY=1`? Reads every queued datagram.
fn ready_from(sock: &UnixDatagram, pid: i32) -> bool {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut ready = false;
    loop {
        let mut buf = [0u8; 512];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(libc::ucred);
        let Ok(msg) = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        ) else {
            return ready;
        };
        let from = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                _ => None,
            })
        });
        let len = msg.bytes;
        if from == Some(pid) && buf[..len].split(|&b| b == b'\n').any(|l| l == b"READY=1") {
            ready = true;
        }
    }
}

fn set_passcred(sock: &UnixDatagram) -> io::Result<()> {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::PassCred, &true)
        .map_err(io::Error::from)
}

/// In the child, before exec: write `pid`'s decimal digits and a NUL at `at`.
///
/// # Safety
/// `at` must have room for 21 bytes.
unsafe fn write_pid(at: *mut u8, pid: libc::pid_t) {
    let mut digits = [0u8; 20];
    let mut n = pid.unsigned_abs() as u64;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    // SAFETY: the caller gives room for 21 bytes; `len` <= 20.
    unsafe {
        std::ptr::copy_nonoverlapping(digits.as_ptr().add(i), at, len);
        *at.add(len) = 0;
    }
}

/// In the child: report errno on the pipe and leave.
fn exec_failed(fd: RawFd) -> ! {
    let errno = nix::errno::Errno::last_raw().to_ne_bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(fd, errno.as_ptr().cast(), errno.len());
        libc::_exit(127)
    }
}

fn random() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into `bytes`.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_written_as_digits() {
        for pid in [1, 42, 4_194_304, i32::MAX] {
            let mut buf = [0xffu8; 24];
            // SAFETY: 24 bytes of room.
            unsafe { write_pid(buf.as_mut_ptr(), pid) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), pid.to_string());
        }
    }
}
