//! Logging: one `log::Log` implementation writing to stderr (plain, or with
//! journald's `<N>` priority prefixes) or to syslog through the `syslog` crate.
//!
//! `--log auto` picks journald prefixes when systemd connected stderr to the
//! journal (`JOURNAL_STREAM` names stderr's device and inode), plain stderr
//! on a terminal, syslog when its socket exists, and stderr otherwise.
//!
//! Children log too, and their lines must carry their own pid. The syslog
//! crate fixes the pid in its formatter when the logger is created, so each
//! connection remembers the pid it was made for; a line logged by any other
//! process (a child) forgets the inherited connection (the child closed
//! that descriptor with the rest) and connects anew with its own pid. A
//! child that logs nothing touches nothing here: every page a child writes
//! is a page it copies. A send that fails (syslogd restarted) is retried
//! once on a fresh connection, since the crate itself never reconnects;
//! [`reopen`] makes the next line reconnect anyway (SIGHUP, after a log
//! daemon was replaced).
//!
//! # Never blocking
//!
//! A log reader that stops reading (a pipe nobody drains, a wedged journald
//! or syslog daemon) must not stop the service, so no write here ever
//! waits: a line that cannot be written at once is dropped. The dispatcher
//! counts its dropped lines ([`dropped_lines`]), and the first line it gets
//! through afterwards is preceded by `N log lines dropped`. A child drops
//! without counting (its count would die with it, and a counter it wrote
//! would be one more page it copies).
//!
//! stderr is not forkd's own: it may be a terminal, a pipe or journald's
//! stream socket shared with the process that started forkd, and O_NONBLOCK
//! belongs to the open file description, so setting it on stderr would
//! change every other holder's writes (and reads) too. So, at start:
//!
//! - a pipe, FIFO, terminal or other character device is opened anew
//!   through `/proc/self/fd/2` with O_NONBLOCK, and that new description,
//!   forkd's own, replaces descriptor 2 (`dup2`). Nobody else holds it but
//!   forkd's children, which inherit it as their stderr, so they never wait
//!   either; the description the starter shares is left as it was. This
//!   works on every kernel, and before privileges are dropped (a pipe's
//!   inode belongs to whoever made it);
//! - a socket (journald's stream) is written with `send(MSG_DONTWAIT)`,
//!   non-blocking for that one call;
//! - a regular file is written plainly: it never waits on a reader.
//!
//! Where the reopening fails (no /proc), each line goes out with
//! `pwritev2(RWF_NOWAIT)`, which pipes and sockets honour on recent kernels,
//! and failing that after `poll` with a zero timeout: a write then waits only
//! if another writer fills the pipe between the two calls, or a terminal has
//! room for part of the line. Each line is one write of at most PIPE_BUF
//! bytes, so a pipe takes it whole or not at all, and lines of different
//! processes never interleave. A terminal or a socket may take only part of
//! a line when nearly full; the rest is lost with the lines after it.
//!
//! The syslog connection is forkd's own socket, so it is simply made
//! non-blocking: a datagram that does not fit the daemon's queue is dropped.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

use crate::cli::LogTarget;
use crate::error::{EXIT_OSERR, Error};

/// The dispatcher's pid: a line from any other pid comes from a child.
static DISPATCHER: AtomicU32 = AtomicU32::new(0);
static LOGGER: OnceLock<Logger> = OnceLock::new();
/// Lines the dispatcher could not write, in all.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines dropped since the last line that got through (told with the next).
static UNTOLD: AtomicU64 = AtomicU64::new(0);
/// Set by [`reopen`]: the next syslog line connects anew.
static REOPEN: AtomicBool = AtomicBool::new(false);
/// stderr refused RWF_NOWAIT once: poll before each write from then on
/// (only where stderr could not be reopened).
static NO_NOWAIT: AtomicBool = AtomicBool::new(false);

/// The longest line written: PIPE_BUF, the most a pipe takes at once.
const MAX_LINE: usize = libc::PIPE_BUF;

type SyslogConn = syslog::Logger<LoggerBackend, Formatter3164>;

enum Sink {
    /// `journald`: `<N>` prefixes and no timestamps; otherwise a timestamp,
    /// pid and level. `stream`: how to write without waiting.
    Stderr { journald: bool, stream: Stream },
    Syslog {
        path: PathBuf,
        /// The connection and the pid its formatter carries.
        conn: Mutex<Option<(u32, SyslogConn)>>,
    },
}

/// What stderr is, and so how a line is written to it without waiting.
#[derive(Clone, Copy, Debug)]
enum Stream {
    /// A regular file: a plain write never waits.
    File,
    /// A socket: `send(MSG_DONTWAIT)`.
    Socket,
    /// forkd's own non-blocking description (reopened at start).
    Own,
    /// Shared, and could not be reopened: RWF_NOWAIT, else poll first.
    Shared,
}

struct Logger {
    sink: Sink,
}

/// Where the logs are going, for the start-up line.
pub fn describe() -> String {
    match LOGGER.get().map(|l| &l.sink) {
        Some(Sink::Stderr { journald: true, .. }) => "journal (stderr)".into(),
        Some(Sink::Syslog { path, .. }) => format!("syslog ({})", path.display()),
        _ => "stderr".into(),
    }
}

/// How many log lines the dispatcher dropped because they could not be
/// written at once (stderr or syslog not read), for the stop summary.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Make the next syslog line connect anew (on SIGHUP: the daemon may have
/// been replaced, or /dev/log recreated). Only stores a flag, so it may be
/// called from a signal handler; with stderr it changes nothing.
pub fn reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

/// Install the logger. With `--log syslog` an unreachable syslog socket is an error.
pub fn init(target: LogTarget, syslog_socket: &Path, level: LevelFilter) -> Result<(), Error> {
    DISPATCHER.store(std::process::id(), Ordering::Relaxed);
    let stderr = |journald| Sink::Stderr {
        journald,
        stream: own_stderr(),
    };
    let sink = match target {
        LogTarget::Stderr => stderr(stderr_is_journal()),
        LogTarget::Syslog => syslog_sink(syslog_socket)?,
        LogTarget::Auto => {
            if stderr_is_journal() {
                stderr(true)
            } else if std::io::stderr().is_terminal() || !syslog_socket.exists() {
                stderr(false)
            } else {
                syslog_sink(syslog_socket).unwrap_or_else(|_| stderr(false))
            }
        }
    };
    let logger = LOGGER.get_or_init(|| Logger { sink });
    // A second init (only in unit tests) keeps the first logger.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
    Ok(())
}

fn syslog_sink(path: &Path) -> Result<Sink, Error> {
    let pid = std::process::id();
    let conn = connect(path, pid).map_err(|e| {
        Error::new(
            EXIT_OSERR,
            format!(
                "cannot connect to syslog at {}: {}",
                path.display(),
                crate::error::describe_syslog(&e)
            ),
        )
    })?;
    Ok(Sink::Syslog {
        path: path.to_path_buf(),
        conn: Mutex::new(Some((pid, conn))),
    })
}

/// Connect to the syslog daemon, non-blocking: the socket is forkd's own,
/// so the flag affects nobody else, and a full daemon queue drops a line
/// (EAGAIN) instead of stopping the caller.
fn connect(path: &Path, pid: u32) -> Result<SyslogConn, syslog::Error> {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: "forkd".into(),
        pid,
    };
    let conn = syslog::unix_custom(formatter, path)?;
    match &conn.backend {
        LoggerBackend::Unix(s) => s.set_nonblocking(true)?,
        LoggerBackend::UnixStream(w) => w.get_ref().set_nonblocking(true)?,
        LoggerBackend::Udp(s, _) => s.set_nonblocking(true)?,
        LoggerBackend::Tcp(w) => w.get_ref().set_nonblocking(true)?,
    }
    Ok(conn)
}

/// Find out what stderr is and, for a pipe, FIFO or character device,
/// give forkd a non-blocking description of its own (see the module notes).
fn own_stderr() -> Stream {
    use nix::fcntl::{OFlag, open};
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return Stream::Shared;
    };
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => return Stream::File,
        libc::S_IFSOCK => return Stream::Socket,
        libc::S_IFIFO | libc::S_IFCHR => {}
        _ => return Stream::Shared,
    }
    let flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    // Not O_CLOEXEC: it becomes descriptor 2, which dup2 leaves inheritable.
    let Ok(own) = open("/proc/self/fd/2", flags, nix::sys::stat::Mode::empty()) else {
        return Stream::Shared;
    };
    // SAFETY: dup2 onto descriptor 2, which std's stderr keeps using; it
    // now names the same pipe or terminal through forkd's own description.
    if unsafe { libc::dup2(own.as_raw_fd(), 2) } == 2 {
        Stream::Own
    } else {
        Stream::Shared
    }
}

/// Is stderr the journal stream systemd gave us? (sd-daemon(3): compare
/// `JOURNAL_STREAM`'s `device:inode` with stderr's.)
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    stream == format!("{}:{}", st.st_dev, st.st_ino)
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let pid = std::process::id();
        let dispatcher = pid == DISPATCHER.load(Ordering::Relaxed);
        match &self.sink {
            Sink::Stderr { journald, stream } => {
                let line = |level: Level, args: &dyn std::fmt::Display| {
                    if *journald {
                        // The journal knows the dispatcher's pid; name children.
                        let who = if dispatcher {
                            String::new()
                        } else {
                            format!("child {pid}: ")
                        };
                        format!("<{}>{who}{args}\n", journald_priority(level))
                    } else {
                        format!(
                            "{} forkd[{pid}] {level}: {args}\n",
                            humantime::format_rfc3339_millis(SystemTime::now()),
                        )
                    }
                };
                let write = |text: &str| write_stderr(text.as_bytes(), *stream);
                if dispatcher && !tell_dropped(|notice| write(&line(Level::Warn, &notice))) {
                    return count_dropped();
                }
                if !write(&line(record.level(), record.args())) && dispatcher {
                    count_dropped();
                }
            }
            Sink::Syslog { path, conn } => {
                let Ok(mut guard) = conn.lock() else { return };
                let message = record.args().to_string();
                if guard.as_ref().is_some_and(|(p, _)| *p != pid) {
                    // Inherited from the dispatcher: its descriptor is closed
                    // (or reused) in this child, so forget it, never drop it.
                    std::mem::forget(guard.take());
                }
                if REOPEN.load(Ordering::Relaxed) && REOPEN.swap(false, Ordering::Relaxed) {
                    *guard = None;
                }
                let mut send = |level: Level, message: &str| {
                    for _attempt in 0..2 {
                        if guard.is_none() {
                            *guard = connect(path, pid).ok().map(|c| (pid, c));
                        }
                        let Some((_, c)) = guard.as_mut() else {
                            return false;
                        };
                        let sent = match level {
                            Level::Error => c.err(message),
                            Level::Warn => c.warning(message),
                            Level::Info => c.info(message),
                            Level::Debug | Level::Trace => c.debug(message),
                        };
                        match sent {
                            Ok(()) => return true,
                            // The daemon's queue is full: drop, keep the connection.
                            Err(syslog::Error::Write(e))
                                if e.kind() == std::io::ErrorKind::WouldBlock =>
                            {
                                return false;
                            }
                            Err(_) => *guard = None,
                        }
                    }
                    false
                };
                if dispatcher && !tell_dropped(|notice| send(Level::Warn, &notice)) {
                    return count_dropped();
                }
                if !send(record.level(), &message) && dispatcher {
                    count_dropped();
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Before the dispatcher's next line: if lines were dropped since the last
/// one got through, try to say how many with `write`. False when that
/// notice could not be written either (the line to follow would not be).
fn tell_dropped(write: impl FnOnce(String) -> bool) -> bool {
    let untold = UNTOLD.load(Ordering::Relaxed);
    if untold == 0 {
        return true;
    }
    let plural = if untold == 1 { "" } else { "s" };
    let written = write(format!(
        "{untold} log line{plural} dropped: the log was not being read"
    ));
    if written {
        UNTOLD.fetch_sub(untold, Ordering::Relaxed);
    }
    written
}

/// The dispatcher dropped a line.
fn count_dropped() {
    DROPPED.fetch_add(1, Ordering::Relaxed);
    UNTOLD.fetch_add(1, Ordering::Relaxed);
}

/// Write one line to stderr without waiting (see the module notes); true
/// if it was written. A line longer than PIPE_BUF is cut to fit.
fn write_stderr(line: &[u8], stream: Stream) -> bool {
    let cut;
    let line = if line.len() > MAX_LINE {
        cut = [&line[..MAX_LINE - 1], b"\n"].concat();
        &cut[..]
    } else {
        line
    };
    let fd = std::io::stderr().as_raw_fd();
    let (ptr, len) = (line.as_ptr().cast(), line.len());
    loop {
        // SAFETY (each call): `line` outlives the call and `len` is its length.
        let n = match stream {
            Stream::File | Stream::Own => unsafe { libc::write(fd, ptr, len) },
            Stream::Socket => unsafe {
                libc::send(fd, ptr, len, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            },
            Stream::Shared => write_shared(fd, line),
        };
        if n >= 0 {
            return true;
        }
        if nix::errno::Errno::last() != nix::errno::Errno::EINTR {
            // EAGAIN: the reader is not reading; EPIPE: there is none.
            return false;
        }
    }
}

/// Write to a shared stderr that could not be reopened: RWF_NOWAIT where the
/// kernel honours it, else only if poll says stderr is writable now.
fn write_shared(fd: i32, line: &[u8]) -> isize {
    if !NO_NOWAIT.load(Ordering::Relaxed) {
        let iov = libc::iovec {
            iov_base: line.as_ptr().cast_mut().cast(),
            iov_len: line.len(),
        };
        // SAFETY: one iovec describing `line`, which outlives the call;
        // offset -1 writes at the current position, as write(2) does.
        let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        use nix::errno::Errno::{EINVAL, ENOSYS, EOPNOTSUPP};
        if n >= 0 || !matches!(nix::errno::Errno::last(), EOPNOTSUPP | EINVAL | ENOSYS) {
            return n;
        }
        NO_NOWAIT.store(true, Ordering::Relaxed);
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd on this stack frame; zero timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    if ready != 1 || pfd.revents & libc::POLLOUT == 0 {
        nix::errno::Errno::EAGAIN.set();
        return -1;
    }
    // SAFETY: `line` outlives the call.
    unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) }
}

fn journald_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}
