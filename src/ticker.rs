//! Prefork mode: a worker's timeouts, kept by a ticking interval timer
//! rather than by socket timeouts.
//!
//! The other blocking models give each socket `SO_RCVTIMEO` and
//! `SO_SNDTIMEO` (inherited from the listener), and the kernel arms and
//! removes a timer for every wait that blocks: a few per connection. A
//! prefork worker lives for many connections, so it arms one timer once
//! instead: `setitimer(ITIMER_REAL)` sends it SIGALRM every tick (at most
//! [`echo::PATIENCE`]). The handler looks at the connection the worker is
//! serving: if its byte count has not moved for the first-byte timeout (no
//! byte yet) or the idle timeout (after one), it marks the connection
//! expired and shuts its socket down, which ends the wait the worker is
//! blocked in; the worker then reports the end as a timeout. A timeout
//! therefore ends up to one tick late, as fork mode's can (see
//! [`echo::PATIENCE`]). Measured: docs/prefork.md, "Against its floor".
//!
//! The tick also interrupts a worker blocked in accept (EINTR), which then
//! looks at its stop pipe: how an idle worker learns that the pool drains
//! when its listener is systemd's or handed on to a new forkd by an
//! upgrade (neither of which the parent may shut down), or that its parent
//! died. And at each tick the handler itself looks at the stop pipe (one
//! `poll` a tick, none per connection), so that a worker busy whenever a
//! tick comes learns it as well, before it accepts again ([`draining`]).
//!
//! The handler is async-signal-safe: atomics, `clock_gettime`, `poll`, `shutdown`.
//! It runs on the worker's only thread, so the connection it reads cannot
//! change under it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};
use std::time::Duration;

use crate::echo;

/// The socket being served (-1: none).
static CONN: AtomicI32 = AtomicI32::new(-1);
/// Its byte counter (what the echo handler has sent back).
static BYTES: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
/// The count at the last tick that saw it move, and when (monotonic ms; 0:
/// not yet seen).
static SEEN: AtomicU64 = AtomicU64::new(0);
static SINCE: AtomicU64 = AtomicU64::new(0);
/// The timeouts in ms (0: none).
static FIRST_MS: AtomicU64 = AtomicU64::new(0);
static IDLE_MS: AtomicU64 = AtomicU64::new(0);
/// Set by the handler when it ended the connection.
static EXPIRED: AtomicBool = AtomicBool::new(false);
/// The read end of the pool's stop pipe, and whether a tick found it closed.
static STOP: AtomicI32 = AtomicI32::new(-1);
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Install the SIGALRM handler (without SA_RESTART, so a tick interrupts a
/// blocked accept) and start ticking; `stop` is the read end of the
/// pool's stop pipe. Call once, in the worker.
pub fn start(
    first_byte: Option<Duration>,
    idle: Option<Duration>,
    stop: RawFd,
) -> std::io::Result<()> {
    STOP.store(stop, Ordering::Relaxed);
    let ms = |d: Option<Duration>| d.map_or(0, |d| (d.as_millis() as u64).max(1));
    FIRST_MS.store(ms(first_byte), Ordering::Relaxed);
    IDLE_MS.store(ms(idle), Ordering::Relaxed);
    // A tick a quarter of the shortest timeout, at most PATIENCE: a
    // timeout then ends at most a quarter late (a second for long ones).
    let shortest = [first_byte, idle]
        .into_iter()
        .flatten()
        .min()
        .map_or(echo::PATIENCE, |t| (t / 4).min(echo::PATIENCE));
    let tick = shortest.max(Duration::from_millis(10));
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C"
    // function that only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_tick as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let tv = libc::timeval {
        tv_sec: tick.as_secs() as libc::time_t,
        tv_usec: tick.subsec_micros() as libc::suseconds_t,
    };
    let timer = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: setitimer reads one itimerval.
    if unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Watch the connection on `fd`, whose echo counts into `bytes`.
pub fn watch(fd: RawFd, bytes: &'static AtomicU64) {
    EXPIRED.store(false, Ordering::Relaxed);
    SEEN.store(0, Ordering::Relaxed);
    SINCE.store(0, Ordering::Relaxed);
    BYTES.store((bytes as *const AtomicU64).cast_mut(), Ordering::Relaxed);
    CONN.store(fd, Ordering::Relaxed);
}

/// Stop watching (before the socket is closed); true if the handler ended
/// the connection for a timeout.
pub fn unwatch() -> bool {
    CONN.store(-1, Ordering::Relaxed);
    EXPIRED.load(Ordering::Relaxed)
}

/// Whether a tick found the stop pipe closed: the pool drains, and the
/// worker must not accept again.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// Is the stop pipe closed (the pool drains, or the parent is gone)? Looks
/// now, with one `poll` (async-signal-safe), and remembers a yes for
/// [`draining`].
pub fn stop_closed() -> bool {
    let mut p = libc::pollfd {
        fd: STOP.load(Ordering::Relaxed),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd; a zero timeout never
    // blocks. The pipe is never written: readable means closed.
    let closed = p.fd >= 0 && unsafe { libc::poll(&mut p, 1, 0) } > 0;
    if closed {
        DRAINING.store(true, Ordering::Relaxed);
    }
    closed
}

/// The monotonic clock in ms, plus one, so that 0 can mean "not yet seen".
fn now_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000 + 1
}

extern "C" fn on_tick(_: libc::c_int) {
    // SAFETY: errno is read and put back around the calls below.
    let errno = unsafe { *libc::__errno_location() };
    if !DRAINING.load(Ordering::Relaxed) {
        stop_closed();
    }
    expire();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The timeouts: end the watched connection if its count has not moved for
/// long enough.
fn expire() {
    let fd = CONN.load(Ordering::Relaxed);
    let bytes = BYTES.load(Ordering::Relaxed);
    if fd < 0 || bytes.is_null() {
        return;
    }
    // SAFETY: `watch` stored a 'static counter.
    let count = unsafe { &*bytes }.load(Ordering::Relaxed);
    let now = now_ms();
    let since = SINCE.load(Ordering::Relaxed);
    if since == 0 || count != SEEN.load(Ordering::Relaxed) {
        SEEN.store(count, Ordering::Relaxed);
        SINCE.store(now, Ordering::Relaxed);
    } else {
        let first = FIRST_MS.load(Ordering::Relaxed);
        let limit = if count == 0 && first != 0 {
            first
        } else {
            IDLE_MS.load(Ordering::Relaxed)
        };
        if limit != 0 && now.saturating_sub(since) >= limit {
            EXPIRED.store(true, Ordering::Relaxed);
            CONN.store(-1, Ordering::Relaxed);
            // SAFETY: `fd` is the socket the worker is serving (it clears
            // CONN before closing it, and cannot run while this does).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}
