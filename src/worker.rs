//! Prefork mode, a worker's side: a process forked at start that serves one
//! connection at a time, for as long as its pool keeps it.
//!
//! In order, once forked: signal handling is at the defaults as in a
//! fork-mode child (see `crate::child`: the inherited handler acts as each
//! signal's default in any process but the parent, so SIGTERM ends a worker
//! at once); every inherited descriptor is closed but stdio, the
//! listeners and the read end of the pool's stop pipe; the worker names
//! itself (`forkd-worker`), raises its OOM score above its parent's, and
//! waits for a connection:
//!
//! - on one listener, blocked in accept (the kernel wakes one waiter per
//!   connection);
//! - on several, in an epoll set of its own: each listener registered with
//!   `EPOLLEXCLUSIVE` (`--wake one`), so a new connection wakes one idle
//!   worker, not all of them (the thundering herd; `--wake all` leaves the
//!   flag off to show it), and the stop pipe. Why this and not an accept
//!   lock or SO_REUSEPORT: docs/prefork.md.
//!
//! The parent closes the stop pipe to drain the pool (the kernel closes it
//! if the parent dies) and shuts down the listeners it bound: an idle
//! worker exits at once (blocked in accept on a socket from systemd, at its
//! next tick: see [`crate::ticker`]), a busy one when its connection ends.
//!
//! A connection goes through the per-source limits, counted across the pool
//! on the [`crate::scoreboard`], and `--early-drop`; then the same echo
//! handler as every model ([`echo::serve`], half-close honoured, the
//! timeouts the listeners hand every accepted socket), and the same end
//! line as fork mode ([`events::end`]), logged by the worker with its own
//! pid. After `--max-conns-per-worker` connections the worker exits, and its
//! parent starts a fresh one. It leaves with `_exit`: it never returns into
//! its parent's code.

use std::ffi::CString;
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::cli::{EarlyDrop, Wake};
use crate::echo;
use crate::events;
use crate::model::{How, Terms};
use crate::proxy::{self, Closed, Via};
use crate::scoreboard::{Board, Count, Gate, Keys, Seat};
use crate::sources::Limits;
use crate::ticker;
use crate::title::{self, Retitle, TitleArea};

/// The words of a worker's end lines: the same as fork mode's, the id
/// being the worker's pid.
pub static TERMS: Terms = Terms {
    id: "pid",
    terminate: "sending SIGTERM to",
    kill: "killing",
    forced: "by signal",
    collected: "reaped",
    finished: None,
};

/// A worker's exit codes.
pub mod code {
    /// The pool drains (its stop pipe closed, or its listeners shut down).
    pub const STOPPED: i32 = 0;
    /// It could not set itself up (epoll, its buffer).
    pub const FAILED: i32 = 1;
    /// It panicked (the message is on stderr).
    pub const PANIC: i32 = crate::exit_code::PANIC;
    /// It served `--max-conns-per-worker` connections.
    pub const RECYCLED: i32 = 6;

    /// What a worker's exit code says.
    pub fn describe(code: i32) -> &'static str {
        match code {
            STOPPED => "stopped",
            FAILED => "could not start",
            PANIC => "panicked",
            RECYCLED => "recycled after --max-conns-per-worker connections",
            _ => "unexpected exit",
        }
    }
}

/// A kind of line the pool logs at most once a second between its
/// workers; each worker counts what it did not log, for its next line.
struct Gated {
    gate: Gate,
    suppressed: u64,
}

impl Gated {
    fn new(gate: Gate) -> Gated {
        Gated {
            gate,
            suppressed: 0,
        }
    }

    /// Some(lines this worker suppressed since its last) if it may log now.
    fn allow(&mut self, board: Board) -> Option<u64> {
        if board.allow(self.gate) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Pause after an accept that failed for want of descriptors or memory.
const BACKOFF: Duration = Duration::from_millis(100);

/// What every worker needs, prepared once by the parent; a worker reads
/// its copy (fork copies the parent's memory).
pub struct Setup {
    pub listeners: Vec<RawFd>,
    /// The read end of the stop pipe.
    pub stop: RawFd,
    pub board: Board,
    pub keys: Keys,
    pub limits: Limits,
    pub early_drop: EarlyDrop,
    pub pool: usize,
    pub max_conns_per_worker: u64,
    pub wake: Wake,
    /// Wait in accept on the one listener (blocking), not in epoll.
    pub block_in_accept: bool,
    /// The listeners came from systemd, so a drain cannot shut them down.
    pub activated: bool,
    pub buffer: usize,
    pub title: Option<TitleArea>,
    pub oom: Option<(CString, Vec<u8>)>,
    pub first_byte: Option<Duration>,
    pub idle: Option<Duration>,
    pub die_with_parent: bool,
    pub parent: nix::unistd::Pid,
    /// `--proxy-protocol`: each connection's PROXY header is read first.
    pub proxy: Option<proxy::Settings>,
}

/// Run worker number `n` (0-based; titles count from 1) in this freshly
/// forked process, until the pool drains or it is recycled; then `_exit`.
pub fn run(setup: &Setup, n: usize) -> ! {
    if setup.die_with_parent {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
        if nix::unistd::getppid() != setup.parent {
            exit(code::STOPPED);
        }
    }
    let mut keep = setup.listeners.clone();
    keep.push(setup.stop);
    close_all_but(&mut keep);
    title::set_comm(c"forkd-worker");
    if let Some((path, value)) = &setup.oom {
        let _ = std::fs::write(path.to_str().unwrap_or_default(), value);
    }
    let me = std::process::id() as u64;
    let number = n + 1;
    let seat = Seat::new(setup.board, n);
    let mut title = setup
        .title
        .map(|area| Retitle::new(area, format!("forkd: worker {number} ").as_bytes()));
    show(&mut title, format_args!("idle"));
    // Blocked in accept on one listener, the worker has no epoll set: a
    // listener registered in sets nobody waits in still costs every
    // connection a call into each of them, made in the client's connect as
    // the kernel looks for a waiter to wake. With 16 workers that was about
    // 2 µs of the client's CPU per connection, and 4 % of the rate against
    // the floor (docs/prefork.md, "Against its floor").
    let epoll = if setup.block_in_accept {
        None
    } else {
        let Some(epoll) = wait_set(setup) else {
            exit(code::FAILED);
        };
        Some(epoll)
    };
    if ticker::start(setup.first_byte, setup.idle, setup.stop).is_err() {
        exit(code::FAILED);
    }
    let mut buf: Vec<MaybeUninit<u8>> = Vec::new();
    if buf.try_reserve_exact(setup.buffer).is_err() {
        exit(code::FAILED);
    }
    // SAFETY: the capacity is `buffer`, and MaybeUninit needs no initialisation.
    unsafe { buf.set_len(setup.buffer) };
    let mut refused_log = Gated::new(Gate::Refused);
    let mut dropped_log = Gated::new(Gate::DroppedEarly);
    let mut accept_log = Gated::new(Gate::AcceptFailed);
    let mut proxy_logs = [Gate::ProxyUntrusted, Gate::ProxyBad, Gate::ProxyLate].map(Gated::new);
    let mut header = match setup.proxy {
        Some(_) => vec![0u8; proxy::MAX_HEADER],
        None => Vec::new(),
    };
    let mut coin = seed();
    let mut served = 0u64;
    let early_drop = setup.early_drop != EarlyDrop::Off;
    loop {
        let Some((conn, accepted)) = next_connection(setup, epoll.as_ref(), &mut accept_log) else {
            exit(code::STOPPED);
        };
        // Behind a balancer, the client is the one its header names.
        let (peer, via) = match &setup.proxy {
            None => (accepted, Via::Direct),
            Some(p) => {
                show(&mut title, format_args!("PROXY header from {accepted}"));
                match p.read_waiting(&conn, accepted, &mut header) {
                    Ok(named) => named,
                    Err(why) => {
                        drop(conn);
                        let log = match why {
                            Closed::Untrusted => &mut proxy_logs[0],
                            Closed::Bad(_) => &mut proxy_logs[1],
                            Closed::Late => &mut proxy_logs[2],
                        };
                        if let Some(k) = log.allow(setup.board) {
                            proxy::closed(accepted, why, p, k);
                        }
                        show(&mut title, format_args!("idle"));
                        continue;
                    }
                }
            }
        };
        let busy = match seat.admit(peer.ip(), setup.limits, &setup.keys, early_drop) {
            Ok(busy) => busy,
            Err(why) => {
                drop(conn);
                seat.count(Count::Refused(why));
                if let Some(k) = refused_log.allow(setup.board) {
                    events::refused(peer, why, setup.limits, k);
                }
                continue;
            }
        };
        let chance = setup.early_drop.chance(busy.saturating_sub(1), setup.pool);
        if chance > 0 {
            coin ^= coin << 13;
            coin ^= coin >> 7;
            coin ^= coin << 17;
            if coin % 1000 < chance as u64 {
                drop(conn);
                seat.release();
                seat.count(Count::DroppedEarly);
                if let Some(k) = dropped_log.allow(setup.board) {
                    events::dropped_early(peer, busy - 1, setup.pool, k);
                }
                continue;
            }
        }
        seat.count(Count::Served);
        show(&mut title, format_args!("conn {peer}"));
        let start = Instant::now();
        let bytes = seat.bytes();
        // No socket timeouts: the worker's ticker keeps them (see
        // `ticker`), so no wait arms a timer of its own.
        let watch = echo::Watch::counting(bytes);
        ticker::watch(std::os::fd::AsRawFd::as_raw_fd(&conn), bytes);
        let mut sock = TcpStream::from(conn);
        let mut outcome = echo::serve(&mut sock, &mut buf, &watch);
        if ticker::unwatch() {
            outcome.end = if outcome.bytes > 0 {
                echo::End::IdleTimeout
            } else {
                echo::End::Silent
            };
        }
        // Closed before the end is told, as a fork-mode child's exit closes it.
        drop(sock);
        seat.count(Count::Ended);
        seat.release();
        events::end(
            &TERMS,
            me,
            peer,
            How::Returned(outcome.end),
            outcome.bytes,
            start.elapsed(),
            via == Via::Local,
        );
        served += 1;
        if setup.max_conns_per_worker > 0 && served >= setup.max_conns_per_worker {
            exit(code::RECYCLED);
        }
        show(&mut title, format_args!("idle"));
    }
}

/// The worker's epoll set: the stop pipe, and each listener (exclusive
/// under `--wake one`). Tokens: 0 the stop pipe, 1 + i listener i.
fn wait_set(setup: &Setup) -> Option<OwnedFd> {
    // SAFETY: epoll_create1 makes a new descriptor, owned below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return None;
    }
    // SAFETY: `ep` is a new descriptor nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let add = |fd: RawFd, token: u64, events: u32| {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are open; `ev` is a valid event.
        unsafe { libc::epoll_ctl(raw(&ep), libc::EPOLL_CTL_ADD, fd, &mut ev) == 0 }
    };
    if !add(setup.stop, 0, libc::EPOLLIN as u32) {
        return None;
    }
    let exclusive = match setup.wake {
        Wake::One => libc::EPOLLEXCLUSIVE as u32,
        Wake::All => 0,
    };
    for (i, &l) in setup.listeners.iter().enumerate() {
        if !add(l, 1 + i as u64, libc::EPOLLIN as u32 | exclusive) {
            return None;
        }
    }
    Some(ep)
}

fn raw(fd: &OwnedFd) -> RawFd {
    std::os::fd::AsRawFd::as_raw_fd(fd)
}

/// Show the worker's state after its number in its title (`ps`).
fn show(title: &mut Option<Retitle>, state: std::fmt::Arguments<'_>) {
    if let Some(t) = title {
        let mut b = [0u8; 80];
        let mut c = std::io::Cursor::new(&mut b[..]);
        let _ = c.write_fmt(state);
        let len = c.position() as usize;
        t.tail(&b[..len]);
    }
}

/// Wait for a connection and accept it; None when the pool drains.
fn next_connection(
    setup: &Setup,
    epoll: Option<&OwnedFd>,
    accept_log: &mut Gated,
) -> Option<(OwnedFd, SocketAddr)> {
    // A drain shuts bound listeners down, so accept tells a busy worker
    // after its connection; systemd's listeners stay open, so then the
    // worker looks at its stop pipe first (one poll per connection). After
    // an upgrade the listeners stay open too (the new forkd accepts on
    // them): the worker knows from its tick ([`ticker::draining`]).
    if ticker::draining() || setup.activated && ticker::stop_closed() {
        return None;
    }
    match epoll {
        Some(epoll) => wait_and_accept(setup, epoll, accept_log),
        // `block_in_accept`: the parent set it for its one listener.
        None => accept_blocking(setup, *setup.listeners.first()?, accept_log),
    }
}

/// One listener: block in accept, as the C floor does. The kernel queues
/// accept's waiters exclusively, so a connection wakes one idle worker, and
/// the worker makes one system call to get a connection where the epoll
/// way makes up to three (an accept that finds the queue empty, the wait,
/// the accept). Its system calls per connection are then the C floor's
/// (docs/prefork.md, "Against its floor").
///
/// The pool drains by shutting the listener down, which wakes every
/// waiter with EINVAL. A listener from systemd cannot be shut down (it is
/// systemd's); then the worker's tick ([`ticker`], at most
/// [`echo::PATIENCE`]) interrupts the wait and the worker looks at its stop
/// pipe, so an idle worker leaves within a tick, as it does when the parent
/// dies.
fn accept_blocking(
    setup: &Setup,
    listener: RawFd,
    accept_log: &mut Gated,
) -> Option<(OwnedFd, SocketAddr)> {
    loop {
        match accept(listener) {
            Ok(c) => return Some(c),
            Err(libc::EINTR) => {
                if ticker::stop_closed() {
                    return None;
                }
            }
            // The socket was made non-blocking under the worker: a new
            // forkd adopting it in an upgrade does (until its own pool
            // makes it blocking again). Wait in poll rather than spin.
            Err(libc::EAGAIN) => {
                if readable_or_stopped(listener, setup.stop) {
                    return None;
                }
            }
            Err(e) => accept_failed(setup, listener, e, accept_log)?,
        }
    }
}

/// Several listeners (or `--wake all`): wait in epoll on them all and the
/// stop pipe, then accept without blocking.
fn wait_and_accept(
    setup: &Setup,
    epoll: &OwnedFd,
    accept_log: &mut Gated,
) -> Option<(OwnedFd, SocketAddr)> {
    const ROOM: usize = 8;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; ROOM];
    // Accept before waiting: under load a connection is usually queued
    // already when the last one ends, and this spares the epoll_wait
    // (with the short first timeout below: 11.5 to 10.5 µs of the pool's
    // CPU per connection, docs/prefork.md). When the queue is empty it
    // costs an accept that fails with EAGAIN.
    for &l in &setup.listeners {
        match accept(l) {
            Ok(c) => return Some(c),
            Err(libc::EINVAL) => return None,
            Err(_) => {}
        }
    }
    loop {
        // SAFETY: `events` has room for ROOM entries.
        let n = unsafe { libc::epoll_wait(raw(epoll), events.as_mut_ptr(), ROOM as i32, -1) };
        if n < 0 {
            if nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                continue;
            }
            return None;
        }
        let ready = &events[..n as usize];
        if ready.iter().any(|e| e.u64 == 0) {
            return None;
        }
        for e in ready {
            let Some(&l) = setup.listeners.get(e.u64 as usize - 1) else {
                continue;
            };
            match accept(l) {
                Ok(c) => return Some(c),
                Err(e) => accept_failed(setup, l, e, accept_log)?,
            }
        }
    }
}

/// After accept failed with `errno`: None if the pool drains (the parent
/// shut the listener down), else Some(()) to wait again, after a pause and
/// a (gated) log line if descriptors or memory ran short.
fn accept_failed(setup: &Setup, listener: RawFd, errno: i32, accept_log: &mut Gated) -> Option<()> {
    match errno {
        libc::EAGAIN | libc::ECONNABORTED | libc::EPROTO | libc::EINTR => {}
        libc::EINVAL => return None,
        e => {
            if let Some(k) = accept_log.allow(setup.board) {
                events::accept_short(
                    &listener_name(listener),
                    nix::errno::Errno::from_raw(e).desc(),
                    BACKOFF,
                    k,
                );
            }
            std::thread::sleep(BACKOFF);
        }
    }
    Some(())
}

/// Wait until `listener` is readable or the stop pipe closes (true).
fn readable_or_stopped(listener: RawFd, stop: RawFd) -> bool {
    let entry = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut p = [entry(stop), entry(listener)];
    // SAFETY: two valid pollfds.
    let ready = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
    ready > 0 && p[0].revents != 0
}

fn listener_name(fd: RawFd) -> String {
    nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd)
        .map_or_else(|_| format!("descriptor {fd}"), |a| a.to_string())
}

/// accept4 on a (non-blocking) listener; the errno on failure.
fn accept(listener: RawFd) -> Result<(OwnedFd, SocketAddr), i32> {
    // SAFETY: the listener is open for the life of the worker.
    let l = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener) };
    crate::listen::accept_on(l, false).map_err(|e| e as i32)
}

/// Close every descriptor above stderr but those in `keep`.
fn close_all_but(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut lo = 3;
    for &k in keep.iter().filter(|&&k| k >= 3) {
        close_range(lo, k - 1);
        lo = k + 1;
    }
    close_range(lo, i32::MAX);
}

fn close_range(lo: i32, hi: i32) {
    if lo > hi {
        return;
    }
    // SAFETY: close_range(2) only closes descriptors, none of which the
    // worker uses after this point.
    let r = unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32) };
    if r != 0 {
        // Kernels before 5.9.
        for fd in lo..=hi.min(4095) {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
}

/// A seed for the worker's `--early-drop` coin (never 0).
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into `bytes`.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    u64::from_ne_bytes(bytes) | 1
}

/// Leave at once: no destructors, no atexit handlers.
fn exit(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process; nothing of the parent's runs.
    unsafe { libc::_exit(code) }
}
