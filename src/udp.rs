//! UDP echo (RFC 862): datagram sockets served inside the dispatcher's loop.
//!
//! UDP has no connection to fork or spawn for, so no process or thread is
//! started per datagram (inetd's built-in services do the same): whichever
//! process runs the dispatcher's `poll` loop adds [`Udp`]'s descriptors to
//! its poll set and calls [`Udp::on_readable`] when one is readable. In
//! fork and thread mode that is the dispatcher itself. A model with a loop
//! of its own (an event loop, a prefork pool's parent) serves UDP the same
//! way: poll [`Udp::fds`], call [`Udp::serve`] for each readable one.
//!
//! The dispatcher must never block here: every socket is non-blocking, a
//! readable socket is drained at most [`BATCH`] datagrams at a time, and a
//! reply that does not fit the send buffer (EAGAIN) is dropped and counted.
//!
//! What comes back: every datagram whole and unchanged, up to
//! `--udp-buffer` bytes (64 KiB by default, above the largest UDP payload
//! over IPv4, 65,507 bytes, and IPv6, 65,527). A larger one is received
//! with `MSG_TRUNC`, which gives its real length, and dropped with a log
//! line: never echoed cut. On a wildcard bind the reply leaves from the
//! address the datagram was sent to (`IP_PKTINFO`, `IPV6_RECVPKTINFO`), so
//! a multi-homed host answers from the address the client knows.
//!
//! Not an amplifier, not a loop (CERT CA-1996-01: spoofed echo↔chargen
//! ping-pong). Dropped without a reply, as OpenBSD's inetd does for its
//! built-in services (`dg_badinput`): datagrams from a source port below
//! 1024 or 2049 (NFS), from a multicast, broadcast, `0.0.0.0/8`, `255/8` or
//! unspecified source, from an IPv4-compatible IPv6 address; and, beyond
//! inetd, datagrams sent *to* a broadcast or multicast address, which would
//! make every host on a link answer one packet. Replies to one source
//! address are limited by a token bucket (`--udp-rate` a second, bursts of
//! `--udp-burst`; see [`Buckets`]). Each kind of drop is logged at most
//! once a second, with a count of those not logged; the totals are logged
//! when UDP stops.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use log::{info, warn};

use crate::error::{EXIT_OSERR, Error};
use crate::events::Throttle;

/// Most datagrams served from one socket per call, so the loop gets back
/// to signals, ends and the other sockets under a flood.
pub const BATCH: usize = 64;
/// Most UDP sockets forkd serves (`--udp`, and `ListenDatagram=` sockets).
pub const MAX_SOCKETS: usize = 64;
/// The largest `--udp-buffer`: above the largest UDP payload (65,527 bytes over IPv6).
pub const MAX_BUFFER: usize = 65_536;
/// Source addresses the per-source limit remembers at once (see [`Buckets`]).
pub const SOURCES: usize = 8192;
/// Entries looked at for one source.
pub const WAYS: usize = 8;

/// One UDP socket and how to name it in logs.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    /// The address bound (port 0 resolved).
    pub addr: SocketAddr,
    /// A name for logs: the address, or systemd's LISTEN_FDNAMES entry.
    pub name: String,
    /// Bound to a wildcard address: replies name their source address.
    wildcard: bool,
}

impl UdpSocket {
    /// Create, configure and bind a UDP socket; each failure names the
    /// address and the cause (as [`crate::listen::Listener::bind`]).
    pub fn bind(addr: SocketAddr) -> Result<UdpSocket, Error> {
        let family = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        let what = |step: &str| format!("cannot {step} udp {addr}");
        // SAFETY: socket(2) with constant arguments.
        let raw = unsafe {
            libc::socket(
                family,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(Error::os(what("create a socket for"), last()));
        }
        // SAFETY: socket(2) returned a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on = |level, name| set_int(raw, level, name, 1);
        on(libc::SOL_SOCKET, libc::SO_REUSEADDR)
            .map_err(|e| Error::os(what("set SO_REUSEADDR on"), e))?;
        if family == libc::AF_INET6 {
            on(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
                .map_err(|e| Error::os(what("set IPV6_V6ONLY on"), e))?;
        }
        let ss = nix::sys::socket::SockaddrStorage::from(addr);
        // SAFETY: `ss` is a valid socket address of `ss.len()` bytes.
        let r = unsafe {
            libc::bind(
                raw,
                nix::sys::socket::SockaddrLike::as_ptr(&ss),
                nix::sys::socket::SockaddrLike::len(&ss),
            )
        };
        if r < 0 {
            let mut e = Error::os(format!("cannot bind udp {addr}"), last());
            if matches!(
                last(),
                nix::errno::Errno::ENODEV | nix::errno::Errno::EINVAL
            ) {
                e.code = crate::error::EXIT_UNAVAILABLE;
            }
            return Err(e);
        }
        UdpSocket::configure(fd, None).map_err(|e| Error::os(what("set up"), e))
    }

    /// Adopt a datagram socket passed by a service manager (`ListenDatagram=`).
    pub fn adopt(fd: OwnedFd, name: Option<String>) -> Result<UdpSocket, Error> {
        let raw = fd.as_raw_fd();
        UdpSocket::configure(fd, name)
            .map_err(|e| Error::os(format!("inherited datagram descriptor {raw}"), e))
    }

    /// Non-blocking; on a wildcard address, ask for each datagram's
    /// destination address (IPv4 datagrams on a dual-stack IPv6 socket
    /// bring IP_PKTINFO, so both are asked for there).
    fn configure(fd: OwnedFd, name: Option<String>) -> nix::Result<UdpSocket> {
        let raw = fd.as_raw_fd();
        let addr = local_addr(raw)?;
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(last());
            }
        }
        let wildcard = addr.ip().is_unspecified();
        if wildcard {
            match addr {
                SocketAddr::V4(_) => set_int(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?,
                SocketAddr::V6(_) => {
                    set_int(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
                    // Fails harmlessly on a V6ONLY socket, which sees no IPv4.
                    let _ = set_int(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
                }
            }
        }
        Ok(UdpSocket {
            fd,
            addr,
            name: name.unwrap_or_else(|| addr.to_string()),
            wildcard,
        })
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `--udp-rate` and `--udp-burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Replies a second to one source address; 0: no limit.
    pub rate: u32,
    /// Replies one source may have at once before the rate applies.
    pub burst: u32,
    /// Largest datagram echoed (`--udp-buffer`).
    pub buffer: usize,
}

/// Why a datagram got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// From a port below 1024 or 2049: another service may be answering.
    ServicePort,
    /// From a broadcast, multicast or otherwise impossible source address.
    BadSource,
    /// Sent to a broadcast or multicast address.
    BadDestination,
    /// Over the source's `--udp-rate`.
    Limited,
    /// Larger than `--udp-buffer`.
    Truncated,
    /// The reply did not fit the send buffer (EAGAIN).
    SendFull,
    /// The reply could not be sent (another error).
    SendFailed,
}

impl Why {
    const ALL: [Why; 7] = [
        Why::ServicePort,
        Why::BadSource,
        Why::BadDestination,
        Why::Limited,
        Why::Truncated,
        Why::SendFull,
        Why::SendFailed,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// For the summary: "from a port below 1024".
    fn short(self) -> &'static str {
        match self {
            Why::ServicePort => "from a port below 1024",
            Why::BadSource => "from a broadcast or multicast source",
            Why::BadDestination => "to a broadcast or multicast address",
            Why::Limited => "over --udp-rate",
            Why::Truncated => "over --udp-buffer",
            Why::SendFull => "with the send buffer full",
            Why::SendFailed => "failed to send",
        }
    }
}

/// What UDP did, for the line logged when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub echoed: u64,
    pub bytes: u64,
    pub dropped: [u64; 7],
}

/// The UDP sockets and everything serving them needs.
pub struct Udp {
    sockets: Vec<UdpSocket>,
    /// One datagram, in memory no child inherits (children never see a
    /// datagram, and a write here costs no copy-on-write fault).
    buf: &'static mut [u8],
    buckets: Buckets,
    /// IPv4 broadcast addresses of this host's interfaces, at start.
    broadcasts: Vec<Ipv4Addr>,
    stats: Stats,
    logs: [Throttle; 7],
    /// Where in the poll set [`Udp::add_to`] put the sockets.
    at: usize,
}

impl Default for Udp {
    /// No sockets: nothing to poll, nothing to serve.
    fn default() -> Udp {
        Udp {
            sockets: Vec::new(),
            buf: &mut [],
            buckets: Buckets::default(),
            broadcasts: Vec::new(),
            stats: Stats::default(),
            logs: Default::default(),
            at: 0,
        }
    }
}

impl Udp {
    /// Serve `sockets` with these limits (nothing is allocated without sockets).
    pub fn new(sockets: Vec<UdpSocket>, limits: Limits) -> Result<Udp, Error> {
        if sockets.is_empty() {
            return Ok(Udp::default());
        }
        if sockets.len() > MAX_SOCKETS {
            return Err(Error::new(
                EXIT_OSERR,
                format!("{} UDP sockets: at most {MAX_SOCKETS}", sockets.len()),
            ));
        }
        let size = limits.buffer.clamp(1, MAX_BUFFER);
        // SAFETY: all-zero bytes are valid u8s.
        let buf = unsafe { crate::memory::private::<u8>(size) }
            .map_err(|e| Error::os("cannot map the UDP buffer", e))?;
        Ok(Udp {
            sockets,
            buf: &mut buf[..size],
            buckets: Buckets::new(limits.rate, limits.burst)?,
            broadcasts: broadcast_addresses(),
            stats: Stats::default(),
            logs: Default::default(),
            at: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The sockets, as bound or inherited.
    pub fn sockets(&self) -> &[UdpSocket] {
        &self.sockets
    }

    /// Each socket's name and address, for the start-up line.
    pub fn names(&self) -> Vec<(String, SocketAddr)> {
        self.sockets
            .iter()
            .map(|u| (u.name.clone(), u.addr))
            .collect()
    }

    /// The descriptors to poll for reading (for a loop of its own: epoll...).
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.sockets.iter().map(|s| s.as_raw_fd())
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Put one POLLIN entry per socket at `pollfds[at..]`; returns how many.
    /// `pollfds` must have room for every socket (at most [`MAX_SOCKETS`]).
    pub fn add_to(&mut self, pollfds: &mut [libc::pollfd], at: usize) -> usize {
        self.at = at;
        for (e, s) in pollfds[at..].iter_mut().zip(&self.sockets) {
            *e = libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
        }
        self.sockets.len()
    }

    /// After a poll over what [`Udp::add_to`] set up: serve every socket
    /// that is readable (or in error: the receive takes the error).
    pub fn on_readable(&mut self, polled: &[libc::pollfd]) {
        for i in 0..self.sockets.len() {
            let ready = polled
                .get(self.at + i)
                .is_some_and(|e| e.revents != 0 && e.fd == self.sockets[i].as_raw_fd());
            if ready {
                self.serve(i);
            }
        }
    }

    /// Serve up to [`BATCH`] datagrams waiting on socket `i`, never blocking.
    pub fn serve(&mut self, i: usize) {
        for _ in 0..BATCH {
            if !self.serve_one(i) {
                return;
            }
        }
    }

    /// One datagram: receive, check, echo. False when nothing is waiting.
    fn serve_one(&mut self, i: usize) -> bool {
        let sock = &self.sockets[i];
        let got = match receive(sock, self.buf) {
            Ok(g) => g,
            Err(nix::errno::Errno::EAGAIN) => return false,
            Err(nix::errno::Errno::EINTR) => return true,
            Err(e) => {
                // ICMP errors queued on the socket, ENOMEM: log, try later.
                if let Some(n) = self.logs[Why::SendFailed.index()].allow(Instant::now()) {
                    warn!("udp {}: receive failed: {}{}", sock.name, e.desc(), more(n));
                }
                return false;
            }
        };
        let peer = unmap(got.peer);
        let verdict = if got.len > self.buf.len() || got.truncated {
            Err(Why::Truncated)
        } else {
            let wildcard = sock.wildcard;
            self.admit(wildcard, peer, got.dst)
        };
        if let Err(why) = verdict {
            self.dropped(i, why, peer, got.len);
            return true;
        }
        match send(&self.sockets[i], &self.buf[..got.len], got.peer, got.dst) {
            Ok(()) => {
                self.stats.echoed += 1;
                self.stats.bytes += got.len as u64;
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOBUFS) => {
                self.dropped(i, Why::SendFull, peer, got.len)
            }
            Err(e) => {
                self.stats.dropped[Why::SendFailed.index()] += 1;
                if let Some(n) = self.logs[Why::SendFailed.index()].allow(Instant::now()) {
                    warn!(
                        "udp {}: no reply to {peer}: {}{}",
                        self.sockets[i].name,
                        e.desc(),
                        more(n)
                    );
                }
            }
        }
        true
    }

    /// Is a reply to `peer` allowed (the source, the destination, the rate)?
    fn admit(&mut self, wildcard: bool, peer: SocketAddr, dst: Option<Dst>) -> Result<(), Why> {
        bad_source(peer, &self.broadcasts)?;
        if wildcard && dst.is_some_and(|d| !d.unicast()) {
            return Err(Why::BadDestination);
        }
        if !self.buckets.take(peer.ip()) {
            return Err(Why::Limited);
        }
        Ok(())
    }

    fn dropped(&mut self, i: usize, why: Why, peer: SocketAddr, len: usize) {
        self.stats.dropped[why.index()] += 1;
        let Some(n) = self.logs[why.index()].allow(Instant::now()) else {
            return;
        };
        let name = &self.sockets[i].name;
        let reason = match why {
            Why::ServicePort => format!(
                "source port {} is below 1024 or NFS's: a service's port, maybe spoofed (echo and chargen answering each other)",
                peer.port()
            ),
            Why::BadSource => "a broadcast, multicast or impossible source address".to_string(),
            Why::BadDestination => "sent to a broadcast or multicast address".to_string(),
            Why::Limited => format!(
                "over --udp-rate {}/s (--udp-burst {}) for {}",
                self.buckets.rate,
                self.buckets.burst,
                peer.ip()
            ),
            Why::Truncated => format!(
                "{} is over --udp-buffer {} (not echoed cut)",
                crate::error::count(len as u64, "byte", "bytes"),
                self.buf.len()
            ),
            Why::SendFull => "the send buffer is full".to_string(),
            Why::SendFailed => "the send failed".to_string(),
        };
        warn!(
            "udp {name}: dropped a datagram from {peer}: {reason}{}",
            more(n)
        );
    }

    /// Close every socket (the stop) and log what UDP did.
    pub fn close(&mut self) {
        if self.sockets.is_empty() {
            return;
        }
        self.sockets.clear();
        info!("udp stopped: {}", summary(&self.stats));
    }
}

/// `12 datagrams echoed (340 bytes); dropped 3 over --udp-rate, ...`.
pub fn summary(s: &Stats) -> String {
    let mut out = format!(
        "{} echoed ({})",
        crate::error::count(s.echoed, "datagram", "datagrams"),
        crate::error::count(s.bytes, "byte", "bytes")
    );
    let drops: Vec<String> = Why::ALL
        .iter()
        .filter(|d| s.dropped[d.index()] > 0)
        .map(|d| format!("{} {}", s.dropped[d.index()], d.short()))
        .collect();
    if drops.is_empty() {
        out.push_str(", none dropped");
    } else {
        out.push_str(&format!(", dropped {}", drops.join(", ")));
    }
    out
}

fn more(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more since the last report)")
    }
}

/// OpenBSD inetd's `dg_badinput`: may this source be answered at all?
pub fn bad_source(peer: SocketAddr, broadcasts: &[Ipv4Addr]) -> Result<(), Why> {
    match peer.ip() {
        IpAddr::V4(ip) => {
            let first = ip.octets()[0];
            if ip.is_multicast() || first == 0 || first == 255 || broadcasts.contains(&ip) {
                return Err(Why::BadSource);
            }
        }
        IpAddr::V6(ip) => {
            let compat = ip.segments()[..6] == [0; 6] && !ip.is_loopback();
            if ip.is_multicast() || ip.is_unspecified() || compat {
                return Err(Why::BadSource);
            }
        }
    }
    if peer.port() < 1024 || peer.port() == 2049 {
        return Err(Why::ServicePort);
    }
    Ok(())
}

/// An IPv4 peer of a dual-stack IPv6 socket, as the IPv4 address it is.
fn unmap(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => peer,
        },
        v4 => v4,
    }
}

/// The IPv4 broadcast addresses of this host's interfaces.
fn broadcast_addresses() -> Vec<Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.broadcast?.as_sockaddr_in().map(|s| s.ip()))
        .collect()
}

/// Where a datagram was sent, from its IP_PKTINFO or IPV6_PKTINFO.
#[derive(Clone, Copy, Debug)]
enum Dst {
    /// The header's destination and the local address Linux would answer
    /// from (they differ for broadcasts).
    V4 {
        addr: Ipv4Addr,
        spec: Ipv4Addr,
    },
    V6 {
        addr: Ipv6Addr,
        ifindex: u32,
    },
}

impl Dst {
    fn unicast(self) -> bool {
        match self {
            Dst::V4 { addr, spec } => addr == spec && !addr.is_multicast() && !addr.is_broadcast(),
            Dst::V6 { addr, .. } => !addr.is_multicast(),
        }
    }
}

struct Received {
    len: usize,
    truncated: bool,
    peer: SocketAddr,
    dst: Option<Dst>,
}

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message, aligned.
#[repr(C, align(8))]
struct Control([u8; 64]);

fn receive(sock: &UdpSocket, buf: &mut [u8]) -> nix::Result<Received> {
    // SAFETY: all-zero is a valid sockaddr_storage, msghdr and Control.
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut control: Control = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if sock.wildcard {
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
    }
    // SAFETY: every pointer in `msg` refers to a live local or to `buf`,
    // with its length; MSG_TRUNC makes the result the datagram's real length.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(last());
    }
    let peer = sockaddr(&name).ok_or(nix::errno::Errno::EAFNOSUPPORT)?;
    let mut dst = None;
    if sock.wildcard {
        // SAFETY: the kernel filled `msg_control` with `msg_controllen`
        // bytes of well-formed control messages; each is read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let p: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                        dst = Some(Dst::V4 {
                            addr: Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr)),
                            spec: Ipv4Addr::from(u32::from_be(p.ipi_spec_dst.s_addr)),
                        });
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let p: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                        dst = Some(Dst::V6 {
                            addr: Ipv6Addr::from(p.ipi6_addr.s6_addr),
                            ifindex: p.ipi6_ifindex,
                        });
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    Ok(Received {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        peer,
        dst,
    })
}

/// Send `data` to `peer`, from `dst` when known; never blocks.
fn send(sock: &UdpSocket, data: &[u8], peer: SocketAddr, dst: Option<Dst>) -> nix::Result<()> {
    let ss = nix::sys::socket::SockaddrStorage::from(peer);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: all-zero is a valid msghdr and Control.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    let mut control: Control = unsafe { mem::zeroed() };
    msg.msg_name = nix::sys::socket::SockaddrLike::as_ptr(&ss) as *mut libc::c_void;
    msg.msg_namelen = nix::sys::socket::SockaddrLike::len(&ss);
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(dst) = dst {
        // SAFETY: `control` has room for one control message of either
        // kind (CMSG_SPACE of in6_pktinfo is 40 bytes), aligned for cmsghdr.
        unsafe {
            let (level, kind, len) = match dst {
                Dst::V4 { .. } => (
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    mem::size_of::<libc::in_pktinfo>(),
                ),
                Dst::V6 { .. } => (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    mem::size_of::<libc::in6_pktinfo>(),
                ),
            };
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
            let data = libc::CMSG_DATA(c);
            match dst {
                Dst::V4 { addr, .. } => {
                    let p = libc::in_pktinfo {
                        // Let routing choose the interface; the source is `addr`.
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(addr).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(data.cast(), p);
                }
                Dst::V6 { addr, ifindex } => {
                    let p = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: addr.octets(),
                        },
                        // Only a link-local source needs its interface.
                        ipi6_ifindex: if is_link_local(addr) { ifindex } else { 0 },
                    };
                    std::ptr::write_unaligned(data.cast(), p);
                }
            }
        }
    }
    // SAFETY: every pointer in `msg` refers to a live local or to `data`.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    if n < 0 { Err(last()) } else { Ok(()) }
}

fn is_link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

fn sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { std::ptr::read(ss as *const _ as *const _) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read(ss as *const _ as *const _) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn local_addr(fd: RawFd) -> nix::Result<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage; the pointers are live.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    if unsafe { libc::getsockname(fd, (&raw mut ss).cast(), &mut len) } < 0 {
        return Err(last());
    }
    sockaddr(&ss).ok_or(nix::errno::Errno::EAFNOSUPPORT)
}

fn set_int(fd: RawFd, level: i32, name: i32, value: i32) -> nix::Result<()> {
    // SAFETY: setsockopt with a pointer to a live int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(last()) } else { Ok(()) }
}

fn last() -> nix::errno::Errno {
    nix::errno::Errno::last()
}

/// The per-source limit: a token bucket per source address, kept as GCRA
/// (one "theoretical arrival time" per source, in nanoseconds): a reply is
/// allowed when the source's time is at most `burst` intervals ahead of
/// now, and each reply moves it one interval (1 / `rate` s) on.
///
/// The table is fixed ([`SOURCES`] entries in memory no child inherits),
/// so spoofed sources cannot grow it: a source is looked for in [`WAYS`]
/// entries chosen by a keyed hash (SipHash with a random key, so nobody
/// can aim at one entry). A new source takes an entry whose bucket is full
/// again, which forgets nothing; only when all are limiting someone does it
/// take the one closest to full. Reaching a victim past its limit thus
/// takes flooding forkd with thousands of other sources at once, and gains
/// one burst per eviction.
pub struct Buckets {
    /// Replies a second (0: no limit) and the burst.
    pub rate: u32,
    pub burst: u32,
    interval: u64,
    tolerance: u64,
    table: &'static mut [Entry],
    hasher: RandomState,
    start: Option<Instant>,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Entry {
    /// The address as IPv6 (IPv4 mapped); all-zero for an empty entry.
    key: [u8; 16],
    /// The source's theoretical arrival time, in ns since `start`.
    tat: u64,
}

impl Default for Buckets {
    fn default() -> Buckets {
        Buckets {
            rate: 0,
            burst: 0,
            interval: 0,
            tolerance: 0,
            table: &mut [],
            hasher: RandomState::new(),
            start: None,
        }
    }
}

impl Buckets {
    pub fn new(rate: u32, burst: u32) -> Result<Buckets, Error> {
        if rate == 0 {
            return Ok(Buckets::default());
        }
        // SAFETY: all-zero is a valid Entry (an empty one).
        let table = unsafe { crate::memory::private::<Entry>(SOURCES) }
            .map_err(|e| Error::os("cannot map the UDP per-source table", e))?;
        let interval = 1_000_000_000 / rate as u64;
        Ok(Buckets {
            rate,
            burst,
            interval,
            tolerance: interval * burst.max(1) as u64,
            table,
            hasher: RandomState::new(),
            start: Some(Instant::now()),
        })
    }

    /// May `ip` have one more reply now? Counts it if so.
    pub fn take(&mut self, ip: IpAddr) -> bool {
        let Some(start) = self.start else {
            return true;
        };
        self.take_at(ip, start.elapsed().as_nanos() as u64)
    }

    /// [`Buckets::take`] at `elapsed` ns since the table was made (tests
    /// pass their own, so that no time passes between two takes).
    fn take_at(&mut self, ip: IpAddr, elapsed: u64) -> bool {
        // +1: an entry's time 0 means empty, never a real time.
        let now = elapsed + 1;
        let key = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let base = (self.hasher.hash_one(key) as usize) % self.table.len();
        let (mut pick, mut found, mut best) = (base, false, u64::MAX);
        for k in 0..WAYS {
            let i = (base + k) % self.table.len();
            let e = &self.table[i];
            if e.tat != 0 && e.key == key {
                (pick, found) = (i, true);
                break;
            }
            // An empty entry, or a full bucket (time not ahead of now), is
            // as good as new; else take the one closest to full.
            if e.tat.max(now) < best {
                (pick, best) = (i, e.tat.max(now));
            }
        }
        let e = &mut self.table[pick];
        if !found {
            *e = Entry { key, tat: now };
        }
        let tat = e.tat.max(now);
        if tat + self.interval - now > self.tolerance {
            return false;
        }
        e.tat = tat + self.interval;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn dg_badinput() {
        let bc = [Ipv4Addr::new(192, 0, 2, 255)];
        assert_eq!(bad_source(v4("192.0.2.1:40000"), &bc), Ok(()));
        assert_eq!(bad_source(v4("[2001:db8::1]:40000"), &bc), Ok(()));
        assert_eq!(bad_source(v4("[::1]:40000"), &bc), Ok(()));
        for port in [0, 7, 19, 1023, 2049] {
            let p = SocketAddr::from(([192, 0, 2, 1], port));
            assert_eq!(bad_source(p, &bc), Err(Why::ServicePort), "{p}");
        }
        for s in [
            "224.0.0.1:40000",
            "255.255.255.255:40000",
            "0.1.2.3:40000",
            "192.0.2.255:40000",
            "[ff02::1]:40000",
            "[::]:40000",
            "[::192.0.2.1]:40000",
        ] {
            assert_eq!(bad_source(v4(s), &bc), Err(Why::BadSource), "{s}");
        }
        assert_eq!(
            unmap(v4("[::ffff:192.0.2.1]:5")),
            v4("192.0.2.1:5"),
            "an IPv4 peer of a dual-stack socket is judged as IPv4"
        );
    }

    #[test]
    fn buckets_allow_the_burst_then_the_rate() {
        let mut b = Buckets::new(10, 5).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let allowed = (0..50).filter(|_| b.take(a)).count();
        assert!((5..=6).contains(&allowed), "{allowed}");
        assert!(b.take(other), "another source has its own bucket");
        std::thread::sleep(std::time::Duration::from_millis(250));
        let later = (0..50).filter(|_| b.take(a)).count();
        assert!((1..=4).contains(&later), "{later}");
        let mut none = Buckets::new(0, 0).unwrap();
        assert!((0..1000).all(|_| none.take(a)));
    }

    #[test]
    fn many_sources_cannot_grow_the_table_nor_free_a_limited_one_cheaply() {
        let mut b = Buckets::new(1, 1).unwrap();
        let victim: IpAddr = "192.0.2.1".parse().unwrap();
        // All at one instant: with the real clock, a slow run (a debug
        // build on a busy machine) took over a second, and the victim's
        // bucket refilled as it should.
        let t = 1_000;
        assert!(b.take_at(victim, t));
        assert!(!b.take_at(victim, t));
        // Fewer new sources than the table holds: the victim stays limited.
        for i in 0..2000u32 {
            b.take_at(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t);
        }
        assert!(!b.take_at(victim, t));
        assert_eq!(b.table.len(), SOURCES);
    }

    #[test]
    fn summary_names_each_drop() {
        let mut s = Stats {
            echoed: 2,
            bytes: 10,
            ..Stats::default()
        };
        assert_eq!(summary(&s), "2 datagrams echoed (10 bytes), none dropped");
        s.dropped[Why::Limited.index()] = 3;
        s.dropped[Why::Truncated.index()] = 1;
        assert_eq!(
            summary(&s),
            "2 datagrams echoed (10 bytes), dropped 3 over --udp-rate, 1 over --udp-buffer"
        );
    }
}
