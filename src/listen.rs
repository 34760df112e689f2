//! Listening sockets: bound here from `--listen`, or inherited from systemd.
//!
//! Every listener is non-blocking and close-on-exec: the dispatcher learns
//! from `poll` that one is readable and then accepts until it would block.
//! SO_REUSEADDR is set before bind so that a restart binds at once even while
//! connections of the previous run sit in TIME_WAIT; IPv6 sockets are
//! V6ONLY so that `[::]:P` and `0.0.0.0:P` can be listed side by side.

use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, sockopt,
};

use crate::error::{EXIT_UNAVAILABLE, Error};

/// One listening socket and how to name it in logs.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    /// A name for logs: the address, or systemd's LISTEN_FDNAMES entry.
    pub name: String,
}

impl Listener {
    /// Create, configure, bind and listen; each failure names the address and the cause.
    ///
    /// With `reuse_port`, SO_REUSEPORT too: several sockets (of one user) may
    /// bind `addr`, and the kernel spreads new connections over them by a
    /// hash of the client's address and port.
    pub fn bind(addr: SocketAddr, backlog: i32, reuse_port: bool) -> Result<Listener, Error> {
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let what = |step: &str| format!("cannot {step} {addr}");
        let fd = socket::socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| Error::os(what("create a socket for"), e))?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
            .map_err(|e| Error::os(what("set SO_REUSEADDR on"), e))?;
        if reuse_port {
            socket::setsockopt(&fd, sockopt::ReusePort, &true)
                .map_err(|e| Error::os(what("set SO_REUSEPORT on"), e))?;
        }
        if family == AddressFamily::Inet6 {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)
                .map_err(|e| Error::os(what("set IPV6_V6ONLY on"), e))?;
        }
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .map_err(|e| bind_error(addr, e))?;
        let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
        socket::listen(&fd, backlog).map_err(|e| Error::os(what("listen on"), e))?;
        let addr = local_addr(fd.as_raw_fd()).map_err(|e| Error::os(what("read back"), e))?;
        Ok(Listener {
            fd,
            addr,
            name: addr.to_string(),
        })
    }

    /// Adopt a listening socket passed in by a service manager (socket activation).
    ///
    /// The descriptor must be a listening stream socket; it is made non-blocking.
    pub fn adopt(fd: OwnedFd, name: Option<String>) -> Result<Listener, Error> {
        let raw = fd.as_raw_fd();
        let what = format!("inherited descriptor {raw}");
        let listening = socket::getsockopt(&fd, sockopt::AcceptConn)
            .map_err(|e| Error::os(format!("{what} is not a socket"), e))?;
        let stream = socket::getsockopt(&fd, sockopt::SockType)
            .map_err(|e| Error::os(format!("{what} is not a socket"), e))?;
        if !listening || stream != SockType::Stream {
            return Err(Error::new(
                crate::error::EXIT_OSERR,
                format!("{what} is not a listening TCP socket"),
            ));
        }
        let addr = local_addr(raw).map_err(|e| Error::os(format!("{what}: no address"), e))?;
        set_nonblocking(raw).map_err(|e| Error::os(&what, e))?;
        Ok(Listener {
            fd,
            addr,
            name: name.unwrap_or_else(|| addr.to_string()),
        })
    }

    /// Accept one connection: a close-on-exec socket, blocking unless
    /// `nonblocking`, and its peer.
    ///
    /// One `accept4` call, which also returns the peer's address (no
    /// separate `getpeername`) and sets the flags (no `fcntl`). `EAGAIN`
    /// means nothing is waiting.
    pub fn accept(&self, nonblocking: bool) -> nix::Result<(OwnedFd, SocketAddr)> {
        accept_on(self.fd.as_fd(), nonblocking)
    }

    /// Make accept on this socket block (for every process that holds
    /// it): for a prefork pool on one listener, whose workers wait in
    /// accept itself.
    pub fn set_blocking(&self) -> nix::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(&self.fd, FcntlArg::F_GETFL)?);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        Ok(())
    }

    /// Stop listening, for every process that holds this socket (prefork
    /// workers do): new clients are refused, those not yet accepted are
    /// reset, and a worker waiting in accept wakes with EINVAL.
    pub fn stop_listening(&self) {
        let _ = socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Read);
    }
}

/// [`Listener::accept`] on any listening socket (a prefork worker's copy).
pub fn accept_on(
    listener: BorrowedFd<'_>,
    nonblocking: bool,
) -> nix::Result<(OwnedFd, SocketAddr)> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the pointers refer to `storage` and `len`, which outlive the call,
    // and `len` holds the size of `storage`.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut storage).cast(),
            &mut len,
            libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 },
        )
    };
    if fd < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    let peer = to_socket_addr(&storage, len).unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
    Ok((conn, peer))
}

impl Listener {
    /// Give every socket this listener accepts its timeouts (None: none):
    /// SO_RCVTIMEO the first-byte timeout (the echo handler moves it to the
    /// idle timeout once a byte came), SO_SNDTIMEO the idle timeout (see
    /// [`crate::echo`]).
    ///
    /// Linux copies both options from a listening socket to each socket it
    /// accepts, so setting them here once spares every connection two
    /// setsockopt calls.
    pub fn set_timeouts(
        &self,
        first_byte: Option<std::time::Duration>,
        idle: Option<std::time::Duration>,
    ) -> Result<(), Error> {
        // Durations are at most ten years (cli::MAX_DURATION), so the
        // seconds fit a time_t; saturate anyway rather than wrap negative.
        let tv = |d: Option<std::time::Duration>| {
            nix::sys::time::TimeVal::from(libc::timeval {
                tv_sec: d.map_or(0, |d| {
                    libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX)
                }),
                tv_usec: d.map_or(0, |d| d.subsec_micros() as libc::suseconds_t),
            })
        };
        let what = || format!("cannot set the timeouts on {}", self.name);
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv(first_byte))
            .map_err(|e| Error::os(what(), e))?;
        socket::setsockopt(&self.fd, sockopt::SendTimeout, &tv(idle))
            .map_err(|e| Error::os(what(), e))
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A failed bind: every address this host cannot serve exits
/// [`EXIT_UNAVAILABLE`], whatever errno says so. Besides EADDRINUSE and
/// EADDRNOTAVAIL, the kernel answers ENODEV for a scope naming no interface
/// (`[fe80::1%999]:0`) and EINVAL for an IPv4-mapped IPv6 address on a
/// V6ONLY socket (`[::ffff:127.0.0.1]:P`, served as `127.0.0.1:P`) or a
/// link-local address without a scope.
fn bind_error(addr: SocketAddr, e: Errno) -> Error {
    let mut err = Error::os(format!("cannot bind {addr}"), e);
    if matches!(e, Errno::ENODEV | Errno::EINVAL) {
        err.code = EXIT_UNAVAILABLE;
    }
    if let SocketAddr::V6(v6) = addr {
        if let Some(v4) = v6.ip().to_ipv4_mapped() {
            err.message += &format!(
                " (an IPv4-mapped address: listen on {v4}:{} instead)",
                v6.port()
            );
        } else if e == Errno::ENODEV {
            err.message += &format!(" (no network interface has index {})", v6.scope_id());
        }
    }
    err
}

fn local_addr(fd: RawFd) -> nix::Result<SocketAddr> {
    let ss: SockaddrStorage = socket::getsockname(fd)?;
    storage_to_addr(&ss).ok_or(nix::errno::Errno::EAFNOSUPPORT)
}

fn storage_to_addr(ss: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = ss.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    ss.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(std::net::SocketAddrV6::from(*v6)))
}

fn to_socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: `storage` is a sockaddr_storage that the kernel filled in with `len` bytes.
    let ss = unsafe {
        SockaddrStorage::from_raw((storage as *const libc::sockaddr_storage).cast(), Some(len))
    }?;
    storage_to_addr(&ss)
}

fn set_nonblocking(fd: RawFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    // SAFETY: the caller owns `fd` for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
