//! systemd glue: readiness and status through `sd_notify`, and listening
//! sockets passed in by socket activation (`LISTEN_FDS`).
//!
//! Everything here is a no-op outside systemd: without `NOTIFY_SOCKET` the
//! notifications go nowhere, and without `LISTEN_PID`/`LISTEN_FDS` naming
//! this process forkd binds its `--listen` addresses itself.

use std::os::fd::{FromRawFd, OwnedFd};

use sd_notify::NotifyState;

use crate::error::{EXIT_OSERR, Error};
use crate::listen::Listener;

/// Tell the service manager forkd is accepting (Type=notify).
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Update the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// A graceful stop has begun.
pub fn stopping(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Is a service manager listening for notifications?
pub fn notify_socket_set() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
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
