//! systemd glue: readiness and status through `sd_notify`, and listening
//! sockets passed in by socket activation (`LISTEN_FDS`).
//!
//! Everything here is a no-op outside systemd: without `NOTIFY_SOCKET` the
//! notifications go nowhere, and without `LISTEN_PID`/`LISTEN_FDS` naming
//! this process forkd binds its `--listen` addresses itself.
//!
//! Notifications are sent here rather than by `sd_notify::notify`, which
//! only knows file-system sockets: `NOTIFY_SOCKET` may also name an abstract
//! one (`@name`, sd_notify(3)), as container managers and tests use.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use sd_notify::NotifyState;

use crate::error::{EXIT_OSERR, Error};
use crate::listen::Listener;

/// Tell the service manager forkd is accepting (Type=notify).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Update the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A graceful stop has begun.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Send one datagram of `STATE=value` lines to `NOTIFY_SOCKET`, if set.
/// Failures are ignored: nobody listening must not stop forkd.
fn notify(states: &[NotifyState]) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let _ = send(&target, message.as_bytes());
}

fn send(target: &OsStr, message: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target.as_bytes().strip_prefix(b"@") {
        Some(name) => sock.connect_addr(&SocketAddr::from_abstract_name(name)?)?,
        None => sock.connect(target)?,
    }
    sock.send(message)?;
    Ok(())
}

/// Is a service manager listening for notifications?
///
/// Read once: the dispatcher asks on every turn of its loop, and reading the
/// environment copies the value onto the heap, a page every child forked
/// after would then carry a private copy of.
pub fn notify_socket_set() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SET.get_or_init(|| std::env::var_os("NOTIFY_SOCKET").is_some())
}

/// The sockets passed by socket activation, named by `LISTEN_FDNAMES`;
/// empty when none were passed. The variables are removed so that nothing
/// forkd starts inherits them.
pub fn activated_listeners() -> Result<Vec<Listener>, Error> {
    // SAFETY: called at start-up, before forkd starts any thread or child
    // (std::env::remove_var is only unsound with concurrent env access).
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(|e| Error::new(EXIT_OSERR, format!("bad socket activation variables: {e}")))?;
    fds.map(|(fd, name)| {
        // SAFETY: systemd passes these descriptors to this process
        // (LISTEN_PID matched) for it to own; nothing else in forkd uses them.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = (!name.is_empty() && name != "unknown").then_some(name);
        Listener::adopt(fd, name)
    })
    .collect()
}
