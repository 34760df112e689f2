//! Reaping children: the SIGCHLD handler and the ring it reports through.
//!
//! In `--reap handler` mode the handler itself calls `waitpid(-1, WNOHANG)`
//! in a loop until no child is left to reap (one SIGCHLD can stand for many
//! exits), stores each (pid, status) in a fixed ring allocated at start, and
//! wakes the dispatcher, which logs the exits. Nothing in the handler
//! allocates, locks or logs. The ring holds as many entries as forkd can
//! have children, so it cannot fill up; if it ever did, the handler would
//! stop reaping (leaving the rest as zombies, never losing an exit) and
//! [`drain`] would raise SIGCHLD again once it made room.
//!
//! In `lazy` and `off` modes the handler only wakes the dispatcher, and the
//! dispatcher calls [`reap_into_ring`] itself when its mode says so. Either
//! way exactly one context fills the ring, and only the dispatcher empties
//! it: a single-producer, single-consumer queue.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::signals::{self, Pending};

struct Slot {
    pid: AtomicI32,
    status: AtomicI32,
}

struct Ring {
    slots: Box<[Slot]>,
    /// Next slot to write; advanced only by the producer.
    head: AtomicUsize,
    /// Next slot to read; advanced only by the dispatcher.
    tail: AtomicUsize,
}

static RING: AtomicPtr<Ring> = AtomicPtr::new(std::ptr::null_mut());
static OVERFLOWED: AtomicBool = AtomicBool::new(false);

/// Allocate the ring for up to `capacity` unprocessed exits and install the
/// SIGCHLD handler; `reap_in_handler` chooses `--reap handler` behaviour.
pub fn install(capacity: usize, reap_in_handler: bool) -> std::io::Result<()> {
    let slots = (0..capacity.max(1))
        .map(|_| Slot {
            pid: AtomicI32::new(0),
            status: AtomicI32::new(0),
        })
        .collect();
    let ring = Box::new(Ring {
        slots,
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    // The ring lives as long as the process: the handler may run at any time.
    RING.store(Box::into_raw(ring), Ordering::SeqCst);
    let action = move || {
        if reap_in_handler {
            reap_into_ring();
        }
        signals::note(Pending::CHILD);
    };
    // SAFETY: `action` is async-signal-safe: waitpid(2), atomics on memory
    // allocated before the handler was installed, and `signals::note`.
    unsafe { signal_hook::low_level::register(Signal::SIGCHLD as i32, action) }?;
    Ok(())
}

/// Reap every child that has exited, recording each in the ring.
/// Async-signal-safe. Returns how many were reaped.
pub fn reap_into_ring() -> usize {
    let ptr = RING.load(Ordering::SeqCst);
    if ptr.is_null() {
        return 0;
    }
    // SAFETY: the ring was leaked in `install` and is never freed.
    let ring = unsafe { &*ptr };
    let cap = ring.slots.len();
    let mut reaped = 0;
    loop {
        let head = ring.head.load(Ordering::Relaxed);
        if head - ring.tail.load(Ordering::Acquire) == cap {
            OVERFLOWED.store(true, Ordering::SeqCst);
            return reaped;
        }
        let mut status = 0;
        // SAFETY: waitpid(2) is async-signal-safe; `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            // 0: children remain but none has exited; -1: ECHILD, no children at all.
            return reaped;
        }
        let slot = &ring.slots[head % cap];
        slot.pid.store(pid, Ordering::Relaxed);
        slot.status.store(status, Ordering::Relaxed);
        ring.head.store(head + 1, Ordering::Release);
        reaped += 1;
    }
}

/// Move every recorded exit into `out` (dispatcher only).
pub fn drain(out: &mut Vec<(Pid, WaitStatus)>) {
    let ptr = RING.load(Ordering::SeqCst);
    if ptr.is_null() {
        return;
    }
    // SAFETY: as in `reap_into_ring`.
    let ring = unsafe { &*ptr };
    let cap = ring.slots.len();
    let head = ring.head.load(Ordering::Acquire);
    let mut tail = ring.tail.load(Ordering::Relaxed);
    while tail != head {
        let slot = &ring.slots[tail % cap];
        let pid = Pid::from_raw(slot.pid.load(Ordering::Relaxed));
        let raw = slot.status.load(Ordering::Relaxed);
        let status = WaitStatus::from_raw(pid, raw).unwrap_or(WaitStatus::Exited(pid, 255));
        out.push((pid, status));
        tail += 1;
    }
    ring.tail.store(tail, Ordering::Release);
    if OVERFLOWED.swap(false, Ordering::SeqCst) {
        // Exits were left unreaped for want of room: run the handler again.
        let _ = nix::sys::signal::raise(Signal::SIGCHLD);
    }
}

/// Has `pid` exited without being reaped (is it a zombie)? Leaves it as it is.
pub fn is_zombie(pid: Pid) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    matches!(
        waitid(Id::Pid(pid), flags),
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
    )
}
