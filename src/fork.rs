//! Fork mode, the dispatcher's side: one child process per connection.
//!
//! accept → fork → (child: [`crate::child::serve`], `_exit`) | (parent:
//! close the socket, record the pid). The dispatcher forks for each
//! accepted connection, closes its own copy of the socket at once, and
//! returns the child's pid, which the dispatcher records in its own table.
//! Ends come from the reaper's ring as (pid, status).
//!
//! Forking is sound only because the fork-mode dispatcher is single-threaded
//! (no signal thread, no logger thread): the child may then use the
//! allocator and stdio freely, since no other thread can hold their locks at
//! the moment of the fork.
//!
//! Children are reaped according to `--reap` (see [`crate::reaper`]).

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU64;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Pid, fork};

use crate::child::{self, ChildSetup};
use crate::cli::ReapMode;
use crate::model::{Collect, How, Model, Stop, Terms};
use crate::reaper;

/// Room for a child's title: `forkd: conn ` and the longest IPv6 peer.
const TITLE_MAX: usize = 64;

static TERMS: Terms = Terms {
    id: "pid",
    terminate: "sending SIGTERM to",
    kill: "killing",
    forced: "by signal",
    collected: "reaped",
    finished: Some("zombies"),
};

pub struct ForkModel {
    reap: ReapMode,
    setup: ChildSetup,
    /// The echo buffer every child inherits, allocated once and never
    /// touched by the dispatcher: its pages are not even present until a
    /// child reads into them, so a 64-byte echo costs a child one page, not
    /// a copy of the whole buffer.
    buffer: Box<[MaybeUninit<u8>]>,
}

impl ForkModel {
    /// Call [`reaper::init`] with room for every child first.
    pub fn new(reap: ReapMode, setup: ChildSetup, buffer: usize) -> ForkModel {
        stop_rseq();
        ForkModel {
            reap,
            setup,
            buffer: Box::new_uninit_slice(buffer),
        }
    }
}

impl Model for ForkModel {
    fn name(&self) -> String {
        let reap = match self.reap {
            ReapMode::Handler => "handler",
            ReapMode::Lazy => "lazy",
            ReapMode::Off => "off",
        };
        format!("fork (reap {reap})")
    }

    fn terms(&self) -> &'static Terms {
        &TERMS
    }

    fn start(
        &mut self,
        conn: OwnedFd,
        peer: SocketAddr,
        _slot: u32,
        bytes: &'static AtomicU64,
    ) -> io::Result<u64> {
        // The child's title, formatted by the dispatcher before the fork:
        // the formatting code is mapped in the dispatcher, while in the
        // child every page of it would be a fault. On the stack, whose page
        // the dispatcher dirties anyway and the child can read for free
        // (fork copies the page table entries of private memory).
        let mut title = [0u8; TITLE_MAX];
        let mut cursor = std::io::Cursor::new(&mut title[..]);
        let _ = write!(cursor, "forkd: conn {peer}");
        let title_len = cursor.position() as usize;
        // SAFETY: the dispatcher is single-threaded (module docs), so the
        // child starts with no lock held by a vanished thread; it runs
        // `child::serve`, which ends in `_exit` and never returns here.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // ---- child: from here on, this is the connection's process.
                child::serve(
                    conn,
                    peer,
                    &title[..title_len],
                    &self.setup,
                    &mut self.buffer,
                    bytes,
                )
            }
            Ok(ForkResult::Parent { child }) => {
                // ---- parent: the child owns the connection now.
                drop(conn);
                Ok(child.as_raw() as u64)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn collect(&mut self, why: Collect, ended: &mut dyn FnMut(u64, How)) {
        let reap_now = match self.reap {
            // The SIGCHLD handler has already reaped.
            ReapMode::Handler => false,
            ReapMode::Lazy => why != Collect::Woken,
            ReapMode::Off => false,
        };
        if reap_now {
            reaper::reap_now();
        }
        reaper::drain(&mut |pid, status| {
            let how = match status {
                WaitStatus::Signaled(_, sig, _) => How::Signaled(sig),
                WaitStatus::Exited(_, code) => How::Exited(code),
                _ => How::Exited(-1),
            };
            ended(pid.as_raw() as u64, how);
        });
    }

    fn stop(&mut self, how: Stop, conns: &mut dyn Iterator<Item = (u32, u64)>) {
        let signal = match how {
            Stop::Terminate => Signal::SIGTERM,
            Stop::Kill => Signal::SIGKILL,
        };
        for (_, id) in conns {
            // The ids are pids from the dispatcher's own table, of children
            // not yet reaped (the dispatcher holds SIGCHLD while it stops),
            // so none can have been reused by another process.
            match i32::try_from(id) {
                Ok(pid) if pid > 0 => {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
                _ => {}
            }
        }
    }

    fn finished(&self, id: u64) -> bool {
        self.reap != ReapMode::Handler
            && i32::try_from(id).is_ok_and(|pid| reaper::is_zombie(Pid::from_raw(pid)))
    }

    fn finish(&mut self, ended: &mut dyn FnMut(u64, How)) {
        // Whatever the mode, forkd reaps every remaining child before it exits.
        reaper::reap_now();
        self.collect(Collect::NeedRoom, ended);
    }
}

/// Unregister the dispatcher's restartable-sequences area (glibc registers
/// one per thread, in its thread control block). The kernel writes the
/// area's CPU fields each time the thread resumes after a signal or a
/// preemption: for the dispatcher, about once a connection (SIGCHLD). That
/// page is shared with every live child since fork write-protected it, so
/// each such write is a copy-on-write fault. Nothing in forkd uses rseq;
/// glibc's `sched_getcpu` falls back to the system call. Children inherit
/// the unregistered state. x86-64 with glibc 2.35 or later only (where the
/// area's place is `__rseq_offset` from the thread pointer); elsewhere a
/// no-op. Measured: README, "What it took" (half a fault and a few µs of
/// the dispatcher's CPU per connection).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn stop_rseq() {
    // SAFETY: rseq(2) unregistering the area glibc registered for this
    // thread; on failure (EINVAL: not the registered area) nothing changes.
    let _ = unsafe { rseq_unregister() };
}

/// Unregister this thread's area as glibc registered it: 0, or -1 (errno
/// EINVAL when it is not registered).
///
/// # Safety
/// Nothing in the process may rely on this thread's rseq area.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
unsafe fn rseq_unregister() -> libc::c_long {
    unsafe extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    const RSEQ_FLAG_UNREGISTER: libc::c_int = 1;
    const RSEQ_SIG: u32 = 0x5305_3053;
    // SAFETY: reading two constants glibc exports, and fs:0, which on
    // x86-64 holds the thread pointer (the TCB's address).
    let (offset, size, tp) = unsafe {
        let tp: usize;
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags));
        (__rseq_offset, __rseq_size, tp)
    };
    if size == 0 {
        return 0; // glibc did not register one
    }
    let area = tp.wrapping_add_signed(offset);
    // glibc registers at least the original 32-byte area, and exports the
    // size of the fields in use (20 since 2.40, and in Debian 12's 2.36);
    // unregistering must name the length registered.
    let len = size.max(32);
    // SAFETY: rseq(2) unregistering the area glibc registered for this
    // thread; on failure (EINVAL: not the registered area) nothing changes.
    unsafe { libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
fn stop_rseq() {}

#[cfg(test)]
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// The area and length `stop_rseq` names are the ones glibc
    /// registered: unregistering succeeds (a wrong address or length fails
    /// with EINVAL and leaves the area registered), and a second time fails.
    #[test]
    fn stop_rseq_unregisters_glibcs_area() {
        // A thread of its own, whose area nothing else uses.
        std::thread::spawn(|| {
            // SAFETY: this thread's area; nothing in the test uses rseq.
            let first = unsafe { rseq_unregister() };
            assert_eq!(first, 0, "{}", nix::errno::Errno::last());
            // SAFETY: as above.
            let again = unsafe { rseq_unregister() };
            assert_eq!(again, -1, "the area was still registered");
            assert_eq!(nix::errno::Errno::last(), nix::errno::Errno::EINVAL);
        })
        .join()
        .unwrap();
    }
}
