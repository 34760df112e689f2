//! Startup errors and the exit codes they map to.
//!
//! forkd reports an error once, at the top (`main`), as one line naming what
//! failed and why, then exits with one of the documented codes below. The
//! numbers follow sysexits(3), which systemd also understands
//! (`systemctl status` prints them by name).

use std::fmt;
use std::io;

/// Stopped cleanly (SIGTERM, SIGINT, SIGQUIT), or `--inetd` served its connection.
pub const EXIT_OK: u8 = 0;
/// Bad command line: unknown option, bad value, bad address syntax.
pub const EXIT_USAGE: u8 = 64;
/// `--user` or `--group` names no such user or group.
pub const EXIT_NOUSER: u8 = 67;
/// An address cannot be served: in use, or not an address of this host.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// The dispatcher failed while running (an unexpected error from poll or accept).
pub const EXIT_SOFTWARE: u8 = 70;
/// Another operating-system failure at start (socket, pipe, signals, inherited sockets).
pub const EXIT_OSERR: u8 = 71;
/// Permission denied: a privileged port without the capability, or a failed privilege drop.
pub const EXIT_NOPERM: u8 = 77;

/// An error that ends forkd: a one-line message and the exit code to leave with.
#[derive(Debug)]
pub struct Error {
    pub code: u8,
    pub message: String,
}

impl Error {
    pub fn new(code: u8, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(EXIT_USAGE, message)
    }

    /// An OS error while doing `what`; the exit code follows the errno.
    pub fn os(what: impl fmt::Display, err: impl Into<io::Error>) -> Error {
        let err: io::Error = err.into();
        let code = match err.raw_os_error() {
            Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL) => EXIT_UNAVAILABLE,
            Some(libc::EACCES) | Some(libc::EPERM) => EXIT_NOPERM,
            _ => EXIT_OSERR,
        };
        Error::new(code, format!("{what}: {}", describe(&err)))
    }
}

/// The errno text without Rust's " (os error N)" suffix, so messages read like C daemons'.
pub fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// A syslog error said once, plainly. The syslog crate wraps the OS error
/// it met in layers that each add their name (`Initialization error: Io
/// error: No such file or directory (os error 2)`); this is the innermost
/// error alone, as [`describe`] says it (`No such file or directory`).
pub fn describe_syslog(err: &syslog::Error) -> String {
    match err {
        syslog::Error::Io(e) | syslog::Error::Write(e) => describe(e),
        syslog::Error::Initialization(inner) => {
            if let Some(e) = inner.downcast_ref::<syslog::Error>() {
                describe_syslog(e)
            } else if let Some(e) = inner.downcast_ref::<io::Error>() {
                describe(e)
            } else {
                inner.to_string()
            }
        }
    }
}

/// `1 connection`, `2 connections`: a count with its noun in the number it takes.
///
/// ```
/// use forkd::error::count;
/// assert_eq!(count(1, "connection", "connections"), "1 connection");
/// assert_eq!(count(0, "process", "processes"), "0 processes");
/// ```
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syslog_error_is_said_once() {
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        let nested = syslog::Error::Initialization(Box::new(syslog::Error::Io(enoent())));
        assert_eq!(
            nested.to_string(),
            "Initialization error: Io error: No such file or directory (os error 2)"
        );
        assert_eq!(describe_syslog(&nested), "No such file or directory");
        let direct = syslog::Error::Initialization(Box::new(enoent()));
        assert_eq!(describe_syslog(&direct), "No such file or directory");
        let text = syslog::Error::Initialization("unix socket paths not found".into());
        assert_eq!(describe_syslog(&text), "unix socket paths not found");
    }
}
