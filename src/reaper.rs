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

use nix::errno::Errno;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::signals::{self, Pending};

struct Slot {
    pid: AtomicI32,
    status: AtomicI32,
}

// The ring: slots and indices in shared memory, so that the handler's
// writes in the dispatcher leave no copy-on-write pages behind in children
// (see `crate::scoreboard`).
static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static CAP: AtomicUsize = AtomicUsize::new(0);
static INDEX: AtomicPtr<Index> = AtomicPtr::new(std::ptr::null_mut());

#[derive(Default)]
struct Index {
    /// Next slot to write; advanced only by the producer.
    head: AtomicUsize,
    /// Next slot to read; advanced only by the dispatcher.
    tail: AtomicUsize,
    overflowed: AtomicBool,
}

/// The ring's slots and indices, once installed.
fn ring() -> Option<(&'static [Slot], &'static Index)> {
    let slots = SLOTS.load(Ordering::Acquire);
    let index = INDEX.load(Ordering::Acquire);
    if slots.is_null() || index.is_null() {
        return None;
    }
    // SAFETY: `install` stored pointers into mappings that are never
    // unmapped, CAP before SLOTS (Release/Acquire).
    unsafe {
        Some((
            std::slice::from_raw_parts(slots, CAP.load(Ordering::Relaxed)),
            &*index,
        ))
    }
}

/// Allocate the ring for up to `capacity` unprocessed exits and install the
/// SIGCHLD handler; `reap_in_handler` chooses `--reap handler` behaviour.
pub fn install(capacity: usize, reap_in_handler: bool) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid Slot (two atomics).
    let slots = unsafe { crate::scoreboard::shared_zeroed::<Slot>(capacity)? };
    // SAFETY: all-zero is a valid Index (atomics).
    let index = unsafe { crate::scoreboard::shared_zeroed::<Index>(1)? };
    CAP.store(slots.len(), Ordering::Relaxed);
    INDEX.store(&raw mut index[0], Ordering::Release);
    SLOTS.store(slots.as_mut_ptr(), Ordering::Release);
    REAP_IN_HANDLER.store(reap_in_handler, Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_sigchld),
        // ONSTACK: run on the dispatcher's alternate stack, which lives in
        // shared memory (see `signals::install`), so the kernel's signal
        // frame dirties no private page. NOCLDSTOP: only exits matter.
        SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    // SAFETY: `on_sigchld` is async-signal-safe (see there); the memory it
    // touches was mapped above, before the handler was installed.
    unsafe { sigaction(Signal::SIGCHLD, &action) }?;
    Ok(())
}

/// `--reap handler`: does the handler reap, or only wake the dispatcher?
static REAP_IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// The SIGCHLD handler. SIGCHLD comes once per connection, so the handler
/// is forkd's own rather than signal-hook's shared one, which counts readers
/// in private memory and saves errno on every call: here every write goes
/// to shared memory, and errno is put back only if a call changed it. Each
/// private page written here would cost a page fault and a copy after the
/// next fork.
extern "C" fn on_sigchld(_: libc::c_int) {
    let saved = Errno::last_raw();
    if REAP_IN_HANDLER.load(Ordering::Relaxed) {
        reap_into_ring();
    }
    signals::note(Pending::CHILD);
    if Errno::last_raw() != saved {
        Errno::set_raw(saved);
    }
}

/// Reap every child that has exited, recording each in the ring.
/// Async-signal-safe. Returns how many were reaped.
pub fn reap_into_ring() -> usize {
    let Some((slots, index)) = ring() else {
        return 0;
    };
    let cap = slots.len();
    let mut reaped = 0;
    loop {
        let head = index.head.load(Ordering::Relaxed);
        if head - index.tail.load(Ordering::Acquire) == cap {
            index.overflowed.store(true, Ordering::SeqCst);
            return reaped;
        }
        let mut status = 0;
        // SAFETY: waitpid(2) is async-signal-safe; `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            // 0: children remain but none has exited; -1: ECHILD, no children at all.
            return reaped;
        }
        let slot = &slots[head % cap];
        slot.pid.store(pid, Ordering::Relaxed);
        slot.status.store(status, Ordering::Relaxed);
        index.head.store(head + 1, Ordering::Release);
        reaped += 1;
    }
}

/// Hand every recorded exit to `each` (dispatcher only).
pub fn drain(each: &mut dyn FnMut(Pid, WaitStatus)) {
    let Some((slots, index)) = ring() else {
        return;
    };
    let cap = slots.len();
    let head = index.head.load(Ordering::Acquire);
    let mut tail = index.tail.load(Ordering::Relaxed);
    while tail != head {
        let slot = &slots[tail % cap];
        let pid = Pid::from_raw(slot.pid.load(Ordering::Relaxed));
        let raw = slot.status.load(Ordering::Relaxed);
        let status = WaitStatus::from_raw(pid, raw).unwrap_or(WaitStatus::Exited(pid, 255));
        tail += 1;
        index.tail.store(tail, Ordering::Release);
        each(pid, status);
    }
    if index.overflowed.swap(false, Ordering::SeqCst) {
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
