//! Fork mode, the dispatcher's side: one child process per connection.
//!
//! The dispatcher forks for each accepted connection, closes its own copy of
//! the socket at once, and records the child under its pid together with a
//! scoreboard slot for the child's byte count. The child's side of the fork
//! is in [`crate::child`]; it never returns here.
//!
//! Forking is sound only because the fork-mode dispatcher is single-threaded
//! (no signal thread, no logger thread): the child may then use the
//! allocator and stdio freely, since no other thread can hold their locks at
//! the moment of the fork.
//!
//! Children are reaped according to `--reap` (see [`crate::reaper`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Pid, fork};

use crate::child::{self, ChildSetup};
use crate::cli::ReapMode;
use crate::dispatcher::{Collect, Ended, How, Model, Stop};
use crate::reaper;
use crate::scoreboard::Scoreboard;

pub struct ForkModel {
    reap: ReapMode,
    setup: ChildSetup,
    board: Scoreboard,
    /// Live (and, unreaped, dead) children: pid -> scoreboard slot.
    children: HashMap<Pid, u32>,
    reaped: Vec<(Pid, WaitStatus)>,
}

impl ForkModel {
    /// `max_conns` sizes the scoreboard and the reaper's ring; call
    /// [`reaper::install`] with at least that capacity first.
    pub fn new(reap: ReapMode, setup: ChildSetup, max_conns: usize) -> nix::Result<ForkModel> {
        Ok(ForkModel {
            reap,
            setup,
            board: Scoreboard::new(max_conns)?,
            children: HashMap::with_capacity(max_conns.min(1 << 16)),
            reaped: Vec::new(),
        })
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

    fn id_label(&self) -> &'static str {
        "pid"
    }

    fn start(&mut self, conn: OwnedFd, peer: SocketAddr) -> io::Result<u64> {
        let slot = self
            .board
            .claim()
            .ok_or_else(|| io::Error::other("no free scoreboard slot"))?;
        // SAFETY: the dispatcher is single-threaded (module docs), so the
        // child starts with no lock held by a vanished thread; it runs
        // `child::serve`, which ends in `_exit` and never returns here.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // ---- child: from here on, this is the connection's process.
                child::serve(conn, peer, &self.setup, self.board.cell(slot))
            }
            Ok(ForkResult::Parent { child }) => {
                // ---- parent: the child owns the connection now.
                drop(conn);
                self.children.insert(child, slot);
                Ok(child.as_raw() as u64)
            }
            Err(e) => {
                self.board.release(slot);
                Err(e.into())
            }
        }
    }

    fn collect(&mut self, why: Collect, ended: &mut Vec<Ended>) {
        let reap_now = match self.reap {
            // The SIGCHLD handler has already reaped.
            ReapMode::Handler => false,
            ReapMode::Lazy => why != Collect::Woken,
            ReapMode::Off => false,
        };
        if reap_now {
            reaper::reap_into_ring();
        }
        reaper::drain(&mut self.reaped);
        for (pid, status) in self.reaped.drain(..) {
            let Some(slot) = self.children.remove(&pid) else {
                continue;
            };
            let bytes = self.board.release(slot);
            let how = match status {
                WaitStatus::Signaled(_, sig, _) => How::Signaled(sig),
                WaitStatus::Exited(_, code) => How::Exited(code),
                _ => How::Exited(-1),
            };
            ended.push(Ended {
                id: pid.as_raw() as u64,
                bytes,
                how,
            });
        }
    }

    fn stop(&mut self, how: Stop, ids: &mut dyn Iterator<Item = u64>) {
        let signal = match how {
            Stop::Terminate => Signal::SIGTERM,
            Stop::Kill => Signal::SIGKILL,
        };
        for id in ids {
            // Only pids of our own unreaped children are in the table, so the
            // pid cannot have been reused by an unrelated process.
            let _ = kill(Pid::from_raw(id as i32), signal);
        }
    }

    fn is_zombie(&self, id: u64) -> bool {
        self.reap != ReapMode::Handler && reaper::is_zombie(Pid::from_raw(id as i32))
    }

    fn finish(&mut self, ended: &mut Vec<Ended>) {
        // Whatever the mode, forkd reaps every remaining child before it exits.
        reaper::reap_into_ring();
        self.collect(Collect::NeedRoom, ended);
    }
}
