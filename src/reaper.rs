//! Reaping children: the record of exits the SIGCHLD handler fills.
//!
//! In `--reap handler` mode the handler ([`crate::signals`]) calls
//! [`reap_into_ring`]: `waitpid(-1, WNOHANG)` in a loop until no child is
//! left to reap (one SIGCHLD can stand for many exits), each (pid, status)
//! stored in a fixed ring allocated at start; the dispatcher then reads the
//! ring ([`drain`]) and ends each connection. Nothing in the handler
//! allocates, locks or logs. The ring holds as many entries as forkd can
//! have children, so it cannot fill up; if it ever did, the handler would
//! stop reaping (leaving the rest as zombies, never losing an exit) and
//! [`drain`] would raise SIGCHLD again once it made room.
//!
//! In `lazy` and `off` modes the handler only wakes the dispatcher, which
//! reaps itself ([`reap_now`]) when its mode says so. The ring is a
//! single-producer, single-consumer queue: only the dispatcher empties it,
//! and whenever the dispatcher fills it, SIGCHLD is blocked, so the handler
//! never fills it at the same time.
//!
//! The ring lives in memory no child inherits ([`crate::memory::private`]):
//! no connection's process can forge an exit or a pid.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

struct Entry {
    pid: AtomicI32,
    status: AtomicI32,
}

static ENTRIES: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());
static CAP: AtomicUsize = AtomicUsize::new(0);
static INDEX: AtomicPtr<Index> = AtomicPtr::new(std::ptr::null_mut());

#[derive(Default)]
struct Index {
    /// Next entry to write; advanced only by the producer.
    head: AtomicUsize,
    /// Next entry to read; advanced only by the dispatcher.
    tail: AtomicUsize,
    overflowed: AtomicBool,
}

/// The ring's entries and indices, once allocated.
fn ring() -> Option<(&'static [Entry], &'static Index)> {
    let entries = ENTRIES.load(Ordering::Acquire);
    let index = INDEX.load(Ordering::Acquire);
    if entries.is_null() || index.is_null() {
        return None;
    }
    // SAFETY: `init` stored pointers into mappings that are never
    // unmapped, CAP before ENTRIES (Release/Acquire).
    unsafe {
        Some((
            std::slice::from_raw_parts(entries, CAP.load(Ordering::Relaxed)),
            &*index,
        ))
    }
}

/// Allocate the ring for up to `capacity` unread exits. Call before the
/// SIGCHLD handler is installed.
pub fn init(capacity: usize) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid Entry and Index (atomics).
    let entries = unsafe { crate::memory::private::<Entry>(capacity)? };
    let index = unsafe { crate::memory::private::<Index>(1)? };
    CAP.store(entries.len(), Ordering::Relaxed);
    INDEX.store(&raw mut index[0], Ordering::Release);
    ENTRIES.store(entries.as_mut_ptr(), Ordering::Release);
    Ok(())
}

/// Reap every child that has exited, recording each in the ring. For the
/// SIGCHLD handler: async-signal-safe. Returns how many were reaped.
pub fn reap_into_ring() -> usize {
    let Some((entries, index)) = ring() else {
        return 0;
    };
    let cap = entries.len();
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
        let entry = &entries[head % cap];
        entry.pid.store(pid, Ordering::Relaxed);
        entry.status.store(status, Ordering::Relaxed);
        index.head.store(head + 1, Ordering::Release);
        reaped += 1;
    }
}

/// Reap from the dispatcher itself (`--reap lazy`, and at exit), with
/// SIGCHLD blocked so the handler is never a second producer.
pub fn reap_now() -> usize {
    crate::signals::without_sigchld(reap_into_ring)
}

/// Hand every recorded exit to `each`, oldest first (dispatcher only).
pub fn drain(each: &mut dyn FnMut(Pid, WaitStatus)) {
    let Some((entries, index)) = ring() else {
        return;
    };
    let cap = entries.len();
    let head = index.head.load(Ordering::Acquire);
    let mut tail = index.tail.load(Ordering::Relaxed);
    while tail != head {
        let entry = &entries[tail % cap];
        let pid = Pid::from_raw(entry.pid.load(Ordering::Relaxed));
        let raw = entry.status.load(Ordering::Relaxed);
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
