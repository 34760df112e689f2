//! `--proxy-protocol`: the PROXY protocol stage between accept and admission.
//!
//! Behind a balancer (HAProxy's `send-proxy` / `send-proxy-v2`), every
//! connection begins with a PROXY header naming the real client (HAProxy's
//! `doc/proxy-protocol.txt`). The dispatcher must know that client before it
//! admits the connection: `--max-per-ip` and `--max-per-net` count it, the
//! table keeps it, the end line and the child's title show it. So the
//! dispatcher reads the header itself, and never blocks doing so:
//!
//! - A connection from an address outside `--proxy-from` is closed at once
//!   (a header from anyone else is a forged client address: pitfall 22).
//! - Right after accept the header is usually there already (the balancer
//!   sends it with its first segment): it is read at once.
//! - Otherwise the connection waits here, in an epoll set of its own whose
//!   one descriptor sits in the dispatcher's poll set, until the header is
//!   complete or `--proxy-timeout` passes (3 s by default). A waiting
//!   connection holds a place under `--max-conns`, so the set is bounded.
//! - A prefork worker holds one connection at a time, so it simply waits
//!   for that connection's header, blocked in `poll` on it for at most
//!   `--proxy-timeout` ([`Settings::read_waiting`]).
//!
//! Reading never consumes a byte beyond the header: the socket is peeked
//! (`MSG_PEEK`), the header parsed, and exactly its length then read, so
//! whatever the client sent after it stays in the socket for the echo.
//! Parsing is the [`ppp`] crate's (v1 and v2); forkd adds only the
//! policy. A header that is malformed, too long (more than
//! [`MAX_HEADER`] bytes), missing, or late closes the connection with one
//! log line (at most one a second per kind, with a count of the rest).
//!
//! A header without a client address, v2's LOCAL command (HAProxy's health
//! checks) or v1's `UNKNOWN`, or one naming the connection's own address
//! and port as the client (HAProxy's v1 health checks), is served as a
//! connection from the balancer itself, and its end is logged at debug
//! level only ([`Via::Local`]).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, Instant};

use log::warn;
use ppp::v2;

use crate::events::Throttle;

/// The longest header accepted, in bytes: a v1 header is at most 107, a v2
/// header without TLVs at most 232 (216 with AF_UNIX addresses); the rest
/// leaves room for the TLVs a balancer may add.
pub const MAX_HEADER: usize = 4096;

/// An address range, as `--proxy-from` takes it: `10.0.0.0/8`,
/// `2001:db8::/32`, or a bare address (a /32 or /128). IPv4 ranges also
/// match IPv4-mapped IPv6 peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network as a (mapped) IPv6 address.
    net: u128,
    /// Prefix length among 128 bits.
    bits: u8,
    /// As written, for messages: prefix length in its own family.
    shown: (IpAddr, u8),
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = u128::MAX.checked_shl(128 - self.bits as u32).unwrap_or(0);
        as_v6(ip) & mask == self.net
    }
}

fn as_v6(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6),
        },
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("'{s}' is not an address or CIDR range (as 10.0.0.0/8 or ::1/128)");
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len {
            Some(l) => l.parse().map_err(|_| bad())?,
            None => max,
        };
        if len > max {
            return Err(bad());
        }
        let bits = if ip.is_ipv4() || as_v6(ip) >> 32 == 0xffff {
            // IPv4, or IPv4-mapped written as IPv6 (then len counts 128 bits).
            if ip.is_ipv4() { 96 + len } else { len }
        } else {
            len
        };
        let mask = u128::MAX.checked_shl(128 - bits as u32).unwrap_or(0);
        let net = as_v6(ip) & mask;
        if net != as_v6(ip) {
            return Err(format!(
                "'{s}' has host bits set (the network is {}/{len})",
                shown_net(ip, net)
            ));
        }
        Ok(Cidr {
            net,
            bits,
            shown: (ip, len),
        })
    }
}

fn shown_net(ip: IpAddr, net: u128) -> IpAddr {
    let v6 = Ipv6Addr::from(net);
    match (ip, v6.to_ipv4_mapped()) {
        (IpAddr::V4(_), Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.shown.0, self.shown.1)
    }
}

/// What the stage is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--proxy-from`: who may send headers.
    pub from: Vec<Cidr>,
    /// `--proxy-timeout`: how long the whole header may take.
    pub timeout: Duration,
}

/// How a connection came, for the dispatcher's books.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Straight from the client (no `--proxy-protocol`).
    Direct,
    /// Through a balancer; the peer is the client its header named.
    Proxied,
    /// A header naming no client (v2 LOCAL, v1 UNKNOWN) or naming the
    /// connection's own end: the balancer's own connection, a health
    /// check. The peer is the balancer.
    Local,
}

/// A connection whose header was read: admit it as from `peer`.
#[derive(Debug)]
pub struct Ready {
    pub conn: OwnedFd,
    pub peer: SocketAddr,
    pub via: Via,
}

/// What reading a header gave.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Read and consumed: the client (None: no client address).
    Done(Option<SocketAddr>),
    /// Not all there yet.
    More,
    /// Malformed, too long, or the connection ended first.
    Bad(&'static str),
}

/// A connection waiting for the rest of its header.
struct Waiting {
    conn: OwnedFd,
    peer: SocketAddr,
    deadline: Instant,
    generation: u32,
}

/// The connections waiting for their headers, and the policy.
pub struct Stage {
    settings: Settings,
    epoll: OwnedFd,
    slots: Vec<Option<Waiting>>,
    free: Vec<u32>,
    waiting: usize,
    /// (deadline, slot, generation) in order of arrival, which is the order
    /// of deadlines (one timeout for all); entries of connections gone are
    /// skipped when met.
    order: VecDeque<(Instant, u32, u32)>,
    generation: u32,
    ready: VecDeque<Ready>,
    buf: Box<[u8]>,
    events: Vec<libc::epoll_event>,
    untrusted_log: Throttle,
    bad_log: Throttle,
    late_log: Throttle,
    /// Closed: untrusted source, bad header, late header.
    pub refused: [u64; 3],
}

impl Stage {
    /// A stage for up to `capacity` waiting connections.
    pub fn new(settings: Settings, capacity: usize) -> io::Result<Stage> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let events = capacity.clamp(1, 256);
        Ok(Stage {
            settings,
            epoll,
            slots: Vec::new(),
            free: Vec::new(),
            waiting: 0,
            order: VecDeque::new(),
            generation: 0,
            ready: VecDeque::new(),
            buf: vec![0u8; MAX_HEADER].into_boxed_slice(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; events],
            untrusted_log: Throttle::default(),
            bad_log: Throttle::default(),
            late_log: Throttle::default(),
            refused: [0; 3],
        })
    }

    /// Connections waiting for their header.
    pub fn len(&self) -> usize {
        self.waiting
    }

    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// The descriptor for the dispatcher's poll set: readable when a
    /// waiting connection is.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// When the first waiting connection runs out of time.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.order
            .iter()
            .find(|&&(_, slot, generation)| self.live(slot, generation))
            .map(|&(t, ..)| t)
    }

    fn live(&self, slot: u32, generation: u32) -> bool {
        matches!(self.slots.get(slot as usize), Some(Some(w)) if w.generation == generation)
    }

    /// A connection just accepted from `peer`. Its header is read if it is
    /// there; returns the connection to admit, or None (waiting, or closed).
    pub fn arrive(&mut self, conn: OwnedFd, peer: SocketAddr, now: Instant) -> Option<Ready> {
        if !self.settings.trusts(peer) {
            self.refused[0] += 1;
            if let Some(n) = self.untrusted_log.allow(now) {
                closed(peer, Closed::Untrusted, &self.settings, n);
            }
            return None;
        }
        match read_header(&conn, &mut self.buf) {
            Read::Done(client) => Some(ready(conn, peer, client)),
            Read::Bad(why) => {
                self.bad(peer, why, now);
                None
            }
            Read::More => {
                if let Err(e) = self.wait(conn, peer, now) {
                    // The connection is closed: count it as a bad one.
                    self.bad(peer, "cannot wait for its header", now);
                    log::debug!("epoll_ctl: {e}");
                }
                None
            }
        }
    }

    fn wait(&mut self, conn: OwnedFd, peer: SocketAddr, now: Instant) -> io::Result<()> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: (u64::from(generation) << 32) | u64::from(slot),
        };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                conn.as_raw_fd(),
                &mut ev,
            )
        };
        if r != 0 {
            self.free.push(slot);
            return Err(io::Error::last_os_error());
        }
        let deadline = now + self.settings.timeout;
        self.slots[slot as usize] = Some(Waiting {
            conn,
            peer,
            deadline,
            generation,
        });
        self.order.push_back((deadline, slot, generation));
        self.waiting += 1;
        Ok(())
    }

    /// Take `slot` out of the set (and out of the epoll set: a child that
    /// inherits the socket would otherwise keep it registered).
    fn take(&mut self, slot: u32) -> Option<Waiting> {
        let w = self.slots.get_mut(slot as usize)?.take()?;
        // SAFETY: both descriptors are open; DEL ignores the event argument.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                w.conn.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        self.free.push(slot);
        self.waiting -= 1;
        Some(w)
    }

    /// The epoll descriptor is readable: read the headers that came. Those
    /// complete wait in [`Stage::next_ready`].
    pub fn on_readable(&mut self, now: Instant) {
        // SAFETY: `events` has room for `len` entries; timeout 0 never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                0,
            )
        };
        for i in 0..n.max(0) as usize {
            let data = self.events[i].u64;
            let (slot, generation) = (data as u32, (data >> 32) as u32);
            if !self.live(slot, generation) {
                continue;
            }
            let read = match &self.slots[slot as usize] {
                Some(w) => read_header(&w.conn, &mut self.buf),
                None => continue,
            };
            match read {
                Read::More => {}
                Read::Done(client) => {
                    if let Some(w) = self.take(slot) {
                        self.ready.push_back(ready(w.conn, w.peer, client));
                    }
                }
                Read::Bad(why) => {
                    if let Some(w) = self.take(slot) {
                        self.bad(w.peer, why, now);
                    }
                }
            }
        }
    }

    /// The next connection whose header is read, to admit.
    pub fn next_ready(&mut self) -> Option<Ready> {
        self.ready.pop_front()
    }

    /// Close the connections whose time ran out.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, slot, generation)) = self.order.front() {
            if !self.live(slot, generation) {
                self.order.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if let Some(w) = self.take(slot) {
                self.refused[2] += 1;
                if let Some(n) = self.late_log.allow(now) {
                    closed(w.peer, Closed::Late, &self.settings, n);
                }
                debug_assert!(w.deadline <= now);
            }
        }
    }

    /// Close every waiting connection (forkd stops).
    pub fn clear(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            self.take(slot);
        }
        self.order.clear();
        self.ready.clear();
    }

    fn bad(&mut self, peer: SocketAddr, why: &'static str, now: Instant) {
        self.refused[1] += 1;
        if let Some(n) = self.bad_log.allow(now) {
            closed(peer, Closed::Bad(why), &self.settings, n);
        }
    }
}

/// Why a connection was closed before its header was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// From outside `--proxy-from`.
    Untrusted,
    /// Missing, malformed, too long, or the connection ended first.
    Bad(&'static str),
    /// Not complete within `--proxy-timeout`.
    Late,
}

/// The line for a connection closed so (`n`: lines of its kind left out
/// since the last).
pub fn closed(peer: SocketAddr, why: Closed, settings: &Settings, n: u64) {
    match why {
        Closed::Untrusted => warn!(
            "closed {peer}: not a --proxy-from address, so its PROXY header cannot be trusted{}",
            more(n)
        ),
        Closed::Bad(why) => warn!("closed {peer}: {why}{}", more(n)),
        Closed::Late => warn!(
            "closed {peer}: no complete PROXY header within {} (--proxy-timeout){}",
            humantime::format_duration(settings.timeout),
            more(n)
        ),
    }
}

impl Settings {
    /// May `peer` send a header?
    pub fn trusts(&self, peer: SocketAddr) -> bool {
        self.from.iter().any(|c| c.contains(peer.ip()))
    }

    /// A prefork worker's way, for the one connection it holds: from a
    /// trusted balancer, wait for the whole header (at most the timeout,
    /// in `poll` on this socket alone; a signal, such as the worker's tick,
    /// only makes it look again), read it, and return the client it names
    /// and how it came. `buf` holds at least [`MAX_HEADER`] bytes.
    pub fn read_waiting(
        &self,
        conn: &OwnedFd,
        peer: SocketAddr,
        buf: &mut [u8],
    ) -> Result<(SocketAddr, Via), Closed> {
        if !self.trusts(peer) {
            return Err(Closed::Untrusted);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match read_header(conn, &mut buf[..MAX_HEADER]) {
                Read::Done(client) => return Ok(named(peer, client)),
                Read::Bad(why) => return Err(Closed::Bad(why)),
                Read::More => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Closed::Late);
            }
            let mut p = libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32 + 1;
            // SAFETY: poll reads and writes one pollfd.
            unsafe { libc::poll(&mut p, 1, ms) };
        }
    }
}

fn more(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last report)")
    }
}

fn ready(conn: OwnedFd, balancer: SocketAddr, client: Option<SocketAddr>) -> Ready {
    let (peer, via) = named(balancer, client);
    Ready { conn, peer, via }
}

/// The peer a header names, and how the connection came.
fn named(balancer: SocketAddr, client: Option<SocketAddr>) -> (SocketAddr, Via) {
    match client {
        // The header names the connection's own end: the balancer's own
        // connection (HAProxy's v1 health checks send such a header).
        Some(peer) if peer != balancer => (peer, Via::Proxied),
        _ => (balancer, Via::Local),
    }
}

/// Peek at what the connection sent, parse a header from it, and if it is
/// complete read exactly its bytes. Never blocks.
fn read_header(conn: &OwnedFd, buf: &mut [u8]) -> Read {
    let n = match recv(conn, buf, libc::MSG_PEEK) {
        Ok(0) => return Read::Bad("closed before a PROXY header"),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::More,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Read::More,
        Err(_) => return Read::Bad("connection failed before a PROXY header"),
    };
    let (len, client) = match parse(&buf[..n]) {
        Parsed::Header { len, client } => (len, client),
        Parsed::Incomplete if n < buf.len() => return Read::More,
        Parsed::Incomplete => return Read::Bad("PROXY header too long"),
        Parsed::Invalid(why) => return Read::Bad(why),
    };
    // The header's bytes are in the socket already: this reads exactly them.
    match recv(conn, &mut buf[..len], 0) {
        Ok(got) if got == len => Read::Done(client),
        _ => Read::Bad("PROXY header could not be read back"),
    }
}

fn recv(conn: &OwnedFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;

/// What a buffer starting a connection holds.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole header of `len` bytes, naming `client` (None: no client).
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
    /// The start of a header.
    Incomplete,
    Invalid(&'static str),
}

/// Parse the header at the start of `input` (v2 or v1).
///
/// A v1 header is a line: it is parsed once its CRLF has come (ppp reads a
/// line cut short as malformed, not as incomplete), and refused once 107
/// bytes (v1's longest) came without one.
fn parse(input: &[u8]) -> Parsed {
    use ppp::PartialResult;
    let v1 = b"PROXY".starts_with(&input[..input.len().min(5)]) && !input.is_empty();
    if v1 && !input.windows(2).any(|w| w == b"\r\n") {
        return if input.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 header too long")
        } else {
            Parsed::Incomplete
        };
    }
    match ppp::HeaderResult::parse(input) {
        ppp::HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                // AF_UNSPEC, AF_UNIX: no client address forkd can count.
                _ => None,
            };
            Parsed::Header {
                len: h.len(),
                client,
            }
        }
        ppp::HeaderResult::V1(Ok(h)) => {
            let client = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            Parsed::Header {
                len: h.header.len(),
                client,
            }
        }
        r if r.is_incomplete() => Parsed::Incomplete,
        ppp::HeaderResult::V2(Err(_)) => Parsed::Invalid("malformed PROXY v2 header"),
        ppp::HeaderResult::V1(Err(ppp::v1::BinaryParseError::Parse(
            ppp::v1::ParseError::InvalidPrefix,
        ))) => Parsed::Invalid("no PROXY header (--proxy-protocol expects one first)"),
        ppp::HeaderResult::V1(Err(_)) => Parsed::Invalid("malformed PROXY v1 header"),
    }
}

/// A PROXY v1 header naming `src` as the client of `dst` (for clients and tests).
pub fn header_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A PROXY v2 header (PROXY command, TCP) naming `src` as the client of
/// `dst`; both must be of one family.
pub fn header_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = v2::PROTOCOL_PREFIX.to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.extend([0x11, 0, 12]);
            h.extend(s.ip().octets());
            h.extend(d.ip().octets());
            h.extend(s.port().to_be_bytes());
            h.extend(d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.extend([0x21, 0, 36]);
            h.extend(v6(src).octets());
            h.extend(v6(dst).octets());
            h.extend(src.port().to_be_bytes());
            h.extend(dst.port().to_be_bytes());
        }
    }
    h
}

/// A PROXY v2 LOCAL header, as HAProxy's health checks send.
pub fn header_v2_local() -> Vec<u8> {
    let mut h = v2::PROTOCOL_PREFIX.to_vec();
    h.extend([0x20, 0x00, 0, 0]);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.2.3.4".parse().unwrap()));
        assert!(c.contains("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        assert_eq!(c.to_string(), "10.0.0.0/8");
        for bad in [
            "10.0.0.0/33",
            "nonsense",
            "10.0.0.1/8",
            "::1/129",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn headers_parse_to_their_exact_length() {
        let src = a("192.0.2.7:4321");
        let dst = a("127.0.0.1:7007");
        for h in [header_v1(src, dst), header_v2(src, dst)] {
            let mut input = h.clone();
            input.extend(b"echo me");
            assert_eq!(
                parse(&input),
                Parsed::Header {
                    len: h.len(),
                    client: Some(src)
                }
            );
            for cut in 1..h.len() {
                assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "cut at {cut}");
            }
        }
        let v6 = a("[2001:db8::1]:5");
        let h = header_v2(v6, a("[::1]:7"));
        assert_eq!(
            parse(&h),
            Parsed::Header {
                len: h.len(),
                client: Some(v6)
            }
        );
        assert_eq!(
            parse(&header_v1(v6, a("[::1]:7"))),
            Parsed::Header {
                len: header_v1(v6, a("[::1]:7")).len(),
                client: Some(v6)
            }
        );
    }

    #[test]
    fn local_and_unknown_name_no_client() {
        let local = header_v2_local();
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: 16,
                client: None
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nhello"),
            Parsed::Header {
                len: 15,
                client: None
            }
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(parse(b"hello world\r\n"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 300.0.0.1 1.2.3.4 1 2\r\n"),
            Parsed::Invalid(_)
        ));
        let mut v2 = header_v2(a("1.2.3.4:1"), a("5.6.7.8:2"));
        v2[12] = 0x31; // version 3
        assert!(matches!(parse(&v2), Parsed::Invalid(_)));
        // A v1 line never ends: refused once it passes v1's 107 bytes.
        let long = [b'P', b'R', b'O', b'X', b'Y', b' ']
            .into_iter()
            .chain(std::iter::repeat_n(b'1', 200))
            .collect::<Vec<u8>>();
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
    }

    #[test]
    fn a_socket_keeps_what_follows_the_header() {
        use std::io::{Read as _, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let conn = OwnedFd::from(s);
        let mut buf = vec![0u8; MAX_HEADER];
        assert_eq!(read_header(&conn, &mut buf), Read::More);
        let h = header_v2(a("198.51.100.1:9"), a("127.0.0.1:1"));
        c.write_all(&h[..10]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read_header(&conn, &mut buf), Read::More);
        c.write_all(&h[10..]).unwrap();
        c.write_all(b"after").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            read_header(&conn, &mut buf),
            Read::Done(Some(a("198.51.100.1:9")))
        );
        let mut s = std::net::TcpStream::from(conn);
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"after");
    }
}
