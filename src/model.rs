//! What a concurrency model is, seen from the dispatcher: the answer to
//! "who runs the echo handler for this connection?" (a child process, a
//! thread...). A model starts a connection's server, reports the ends it
//! sees, and stops servers when asked. Everything else (accepting, caps,
//! limits, the table of connections, logging, the stop) is the
//! dispatcher's, the same for every model.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::echo::End;
use crate::exit_code;

/// Who runs the echo handler for an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One child process per connection, forked by the dispatcher.
    Fork,
    /// One thread per connection inside the dispatcher process.
    Thread,
    /// A pool of worker processes forked at start, each serving one connection at a time.
    Prefork,
    /// One epoll loop over every connection, in the dispatcher's one thread.
    Event,
}

pub trait Model {
    /// For the status line: "fork (reap handler)", "thread", ...
    fn name(&self) -> String;
    /// The words this model's log lines use.
    fn terms(&self) -> &'static Terms;
    /// Serve `conn` (from `peer`) with the echo handler, which keeps its
    /// byte count in `bytes`; returns the connection's id (never 0), which
    /// the model later reports the end under. `slot` is the dispatcher's
    /// number for the connection, unique among live ones, for a model that
    /// keeps state per connection. On error the connection is closed.
    fn start(
        &mut self,
        conn: OwnedFd,
        peer: SocketAddr,
        slot: u32,
        bytes: &'static AtomicU64,
    ) -> io::Result<u64>;
    /// Report, by id, each connection that ended since the last call.
    fn collect(&mut self, why: Collect, ended: &mut dyn FnMut(u64, How));
    /// Ask (Terminate) or force (Kill) these connections, given as
    /// (slot, id), to end.
    fn stop(&mut self, how: Stop, conns: &mut dyn Iterator<Item = (u32, u64)>);
    /// Has this connection's server finished, though its end is not yet
    /// collected (an unreaped child: a zombie)? Such a connection still
    /// holds its slot, but there is nothing left to stop.
    fn finished(&self, _id: u64) -> bool {
        false
    }
    /// Whether the model wants its connections non-blocking (set at accept).
    fn nonblocking(&self) -> bool {
        false
    }
    /// A descriptor for the dispatcher's poll set, for a model that does
    /// its work in the dispatcher's thread (the event loop's epoll
    /// descriptor): when it is readable, or [`Model::next_deadline`] has
    /// come, the dispatcher calls [`Model::on_ready`], then collects.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }
    /// Do the work that is ready or due (see [`Model::poll_fd`]), without
    /// blocking; ends found are reported by the next [`Model::collect`].
    fn on_ready(&mut self) {}
    /// When the model next needs [`Model::on_ready`] even if its descriptor
    /// stays quiet (a timer).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Last call before forkd exits: report everything still unreported.
    fn finish(&mut self, ended: &mut dyn FnMut(u64, How)) {
        self.collect(Collect::NeedRoom, ended);
    }
}

/// The words a model's log and status lines use, true for that model.
pub struct Terms {
    /// What an id is: "pid" or "conn".
    pub id: &'static str,
    /// How [`Stop::Terminate`] is done: "sending SIGTERM to".
    pub terminate: &'static str,
    /// How [`Stop::Kill`] is done: "killing".
    pub kill: &'static str,
    /// Ends the model forced: "by signal".
    pub forced: &'static str,
    /// Ends collected, in the status line: "reaped".
    pub collected: &'static str,
    /// Servers finished but not collected, in the status line: "zombies";
    /// None where that cannot happen.
    pub finished: Option<&'static str>,
}

/// Why the dispatcher asks a model to collect ended connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collect {
    /// The dispatcher woke up (a signal, or a connection's end).
    Woken,
    /// A client is waiting and about to be accepted.
    BeforeAccept,
    /// At the connection cap, or stopping: ends are needed now, and each
    /// later end must wake the dispatcher.
    NeedRoom,
}

/// How hard [`Model::stop`] asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Terminate,
    Kill,
}

/// How a connection's server ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// A child exited with this code (see [`crate::exit_code`]).
    Exited(i32),
    /// A child was killed by this signal.
    Signaled(Signal),
    /// A thread's echo handler returned.
    Returned(End),
    /// A thread's echo handler returned after the dispatcher shut its
    /// socket down (the thread-mode stop).
    ShutDown(Stop, End),
}

impl How {
    /// An ordinary end, logged at info rather than as a warning.
    pub fn is_normal(self) -> bool {
        match self {
            How::Exited(code) => exit_code::is_normal(code),
            How::Signaled(_) | How::ShutDown(..) => false,
            How::Returned(end) => end.is_normal(),
        }
    }

    /// Did the dispatcher (or someone else) end it, rather than the client?
    pub fn is_forced(self) -> bool {
        matches!(self, How::Signaled(_) | How::ShutDown(..))
    }
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::Exited(code) => write!(f, "exit {code} ({})", exit_code::describe(*code)),
            How::Signaled(sig) => write!(f, "killed by {}", sig.as_str()),
            How::Returned(end) => f.write_str(end.describe()),
            How::ShutDown(Stop::Terminate, end) => {
                write!(f, "stopped (reading shut down), then {}", end.describe())
            }
            How::ShutDown(Stop::Kill, end) => {
                write!(f, "stopped (socket shut down), then {}", end.describe())
            }
        }
    }
}
