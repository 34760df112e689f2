//! systemd glue: readiness and status through `sd_notify`, and listening
//! and datagram sockets passed in by socket activation (`LISTEN_FDS`).
//!
//! Everything here is a no-op outside systemd: without `NOTIFY_SOCKET` the
//! notifications go nowhere, and without `LISTEN_PID`/`LISTEN_FDS` naming
//! this process forkd binds its `--listen` addresses itself.
//!
//! Notifications are sent here rather than by `sd_notify::notify`, which
//! only knows file-system sockets: `NOTIFY_SOCKET` may also name an abstract
//! one (`@name`, sd_notify(3)), as container managers and tests use; and
//! which sends blocking. A datagram send blocks while the receiver's queue
//! is full (`net.unix.max_dgram_qlen`, often 10 or 512), so a service
//! manager that stops reading would stop the dispatcher. Here every send is
//! non-blocking: an update that does not fit is dropped and counted (see
//! [`dropped_notifications`]), the first drop of an episode is logged, and
//! so is the count once a send gets through again. Status updates describe
//! the present, so the next one replaces what was dropped.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};

use sd_notify::NotifyState;

use crate::error::{EXIT_OSERR, Error};
use crate::listen::Listener;
use crate::udp::UdpSocket;

/// Tell the service manager forkd is accepting (Type=notify). Started by
/// an upgrade (SIGUSR2, see [`crate::upgrade`]), tell the old forkd
/// instead: it is still the service's main process, and hands that over.
pub fn ready(status: &str) {
    if let Some(Some(old)) = UPGRADE_NOTIFY.get() {
        let pid = std::process::id();
        let _ = send(old, format!("READY=1\nMAINPID={pid}\n").as_bytes());
        return;
    }
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The upgrade is done: `pid` is the service's main process now.
pub fn main_pid(pid: i32, status: &str) {
    let pid = u32::try_from(pid).unwrap_or(0);
    notify(&[NotifyState::MainPid(pid), NotifyState::Status(status)]);
}

/// The old forkd's socket, when this one was started by an upgrade.
static UPGRADE_NOTIFY: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();

/// Read and remove [`crate::upgrade::NOTIFY_VAR`] (at start, as the
/// socket activation variables), so [`ready`] reports to the old forkd.
pub fn take_upgrade_socket() {
    let value = std::env::var_os(crate::upgrade::NOTIFY_VAR);
    if value.is_some() {
        // SAFETY: called at start-up, before forkd starts any thread or child.
        unsafe { std::env::remove_var(crate::upgrade::NOTIFY_VAR) };
    }
    let _ = UPGRADE_NOTIFY.set(value);
}

/// Update the one-line status `systemctl status` shows.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A graceful stop has begun.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Notifications dropped because `NOTIFY_SOCKET`'s queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Drops since the last send that got through (logged when one does).
static DROPPED_RUN: AtomicU64 = AtomicU64::new(0);

/// How many notifications were dropped because the service manager's
/// socket was full (for the stop summary).
pub fn dropped_notifications() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Send one datagram of `STATE=value` lines to `NOTIFY_SOCKET`, if set,
/// without ever blocking. Nobody listening must not stop forkd, nor must a
/// listener that stopped reading: a full queue drops the update.
fn notify(states: &[NotifyState]) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    match send(&target, message.as_bytes()) {
        Ok(()) => {
            let dropped = DROPPED_RUN.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                log::info!(
                    "NOTIFY_SOCKET drains again: {dropped} notifications were dropped while it was full"
                );
            }
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            if DROPPED_RUN.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "NOTIFY_SOCKET is full (the service manager is not reading): dropping notifications until it drains"
                );
            }
        }
        // Nobody listening (ECONNREFUSED, ENOENT): nothing to tell.
        Err(_) => {}
    }
}

fn send(target: &OsStr, message: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    // This socket is forkd's own, made for this one message: non-blocking
    // affects nobody else. A full receiver queue gives EAGAIN.
    sock.set_nonblocking(true)?;
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

/// The sockets passed by socket activation (`ListenStream=` listeners and
/// `ListenDatagram=` UDP sockets), named by `LISTEN_FDNAMES`; both empty
/// when none were passed. The variables are removed so that nothing forkd
/// starts inherits them.
pub fn activated_sockets() -> Result<(Vec<Listener>, Vec<UdpSocket>), Error> {
    // SAFETY: called at start-up, before forkd starts any thread or child
    // (std::env::remove_var is only unsound with concurrent env access).
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(|e| Error::new(EXIT_OSERR, format!("bad socket activation variables: {e}")))?;
    let (mut listeners, mut datagrams) = (Vec::new(), Vec::new());
    for (fd, name) in fds {
        // SAFETY: systemd passes these descriptors to this process
        // (LISTEN_PID matched) for it to own; nothing else in forkd uses them.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = (!name.is_empty() && name != "unknown").then_some(name);
        let datagram = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
            .is_ok_and(|t| t == nix::sys::socket::SockType::Datagram);
        if datagram {
            datagrams.push(UdpSocket::adopt(fd, name)?);
        } else {
            listeners.push(Listener::adopt(fd, name)?);
        }
    }
    Ok((listeners, datagrams))
}
