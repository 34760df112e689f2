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
//! once on a fresh connection, since the crate itself never reconnects.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

use crate::cli::LogTarget;
use crate::error::{EXIT_OSERR, Error};

/// The dispatcher's pid: a line from any other pid comes from a child.
static DISPATCHER: AtomicU32 = AtomicU32::new(0);
static LOGGER: OnceLock<Logger> = OnceLock::new();

type SyslogConn = syslog::Logger<LoggerBackend, Formatter3164>;

enum Sink {
    /// `journald`: `<N>` prefixes and no timestamps; otherwise a timestamp, pid and level.
    Stderr { journald: bool },
    Syslog {
        path: PathBuf,
        /// The connection and the pid its formatter carries.
        conn: Mutex<Option<(u32, SyslogConn)>>,
    },
}

struct Logger {
    sink: Sink,
}

/// Where the logs are going, for the start-up line.
pub fn describe() -> String {
    match LOGGER.get().map(|l| &l.sink) {
        Some(Sink::Stderr { journald: true }) => "journal (stderr)".into(),
        Some(Sink::Syslog { path, .. }) => format!("syslog ({})", path.display()),
        _ => "stderr".into(),
    }
}

/// Install the logger. With `--log syslog` an unreachable syslog socket is an error.
pub fn init(target: LogTarget, syslog_socket: &Path, level: LevelFilter) -> Result<(), Error> {
    DISPATCHER.store(std::process::id(), Ordering::Relaxed);
    let sink = match target {
        LogTarget::Stderr => Sink::Stderr {
            journald: stderr_is_journal(),
        },
        LogTarget::Syslog => syslog_sink(syslog_socket)?,
        LogTarget::Auto => {
            if stderr_is_journal() {
                Sink::Stderr { journald: true }
            } else if std::io::stderr().is_terminal() || !syslog_socket.exists() {
                Sink::Stderr { journald: false }
            } else {
                syslog_sink(syslog_socket).unwrap_or(Sink::Stderr { journald: false })
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
            format!("cannot connect to syslog at {}: {e}", path.display()),
        )
    })?;
    Ok(Sink::Syslog {
        path: path.to_path_buf(),
        conn: Mutex::new(Some((pid, conn))),
    })
}

fn connect(path: &Path, pid: u32) -> Result<SyslogConn, syslog::Error> {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: "forkd".into(),
        pid,
    };
    syslog::unix_custom(formatter, path)
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
        match &self.sink {
            Sink::Stderr { journald } => {
                let line = if *journald {
                    // The journal knows the dispatcher's pid; name children.
                    let who = if pid != DISPATCHER.load(Ordering::Relaxed) {
                        format!("child {pid}: ")
                    } else {
                        String::new()
                    };
                    format!(
                        "<{}>{who}{}\n",
                        journald_priority(record.level()),
                        record.args()
                    )
                } else {
                    format!(
                        "{} forkd[{}] {}: {}\n",
                        humantime::format_rfc3339_millis(SystemTime::now()),
                        pid,
                        record.level(),
                        record.args()
                    )
                };
                // One write(2) per line keeps lines of different processes apart.
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Syslog { path, conn } => {
                let Ok(mut guard) = conn.lock() else { return };
                let message = record.args().to_string();
                if guard.as_ref().is_some_and(|(p, _)| *p != pid) {
                    // Inherited from the dispatcher: its descriptor is closed
                    // (or reused) in this child, so forget it, never drop it.
                    std::mem::forget(guard.take());
                }
                for _attempt in 0..2 {
                    if guard.is_none() {
                        *guard = connect(path, pid).ok().map(|c| (pid, c));
                    }
                    let Some((_, c)) = guard.as_mut() else { return };
                    let sent = match record.level() {
                        Level::Error => c.err(&message),
                        Level::Warn => c.warning(&message),
                        Level::Info => c.info(&message),
                        Level::Debug | Level::Trace => c.debug(&message),
                    };
                    if sent.is_ok() {
                        return;
                    }
                    *guard = None;
                }
            }
        }
    }

    fn flush(&self) {}
}

fn journald_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Forget the syslog connection, so the next line connects afresh (SIGHUP:
/// syslogd may have restarted or moved).
pub fn reopen() {
    if let Some(Logger {
        sink: Sink::Syslog { conn, .. },
    }) = LOGGER.get()
        && let Ok(mut guard) = conn.lock()
    {
        *guard = None;
    }
}
