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
