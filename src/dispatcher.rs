//! The dispatcher: one `poll` loop over the listeners and the wake-up pipe,
//! shared by every concurrency model.
//!
//! A [`Model`] answers one question, "who runs the echo handler for this
//! connection?" (a child process, a thread, ...). Everything else is here,
//! the same for every model: accepting, the connection cap and the
//! per-address limit, backing off when the system runs short, logging each
//! end, status, and the graceful stop.
//!
//! The loop never blocks anywhere but in `poll`, which a signal always
//! interrupts. At the connection cap the listeners simply leave the poll
//! set: new connections wait in the kernel's backlog, and the loop sleeps
//! until a connection ends (SIGCHLD or a thread's wake-up), never spinning
//! and never waiting in `waitpid`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::signal::Signal;

use crate::echo::End;
use crate::error::{EXIT_SOFTWARE, Error};
use crate::limits::PerIp;
use crate::listen::Listener;
use crate::scoreboard::{Scoreboard, shared_zeroed};
use crate::signals::{Pending, Signals};
use crate::systemd;

/// A concurrency model: how an accepted connection gets served.
pub trait Model {
    /// For logs and status: "fork", "thread", ...
    fn name(&self) -> String;
    /// What an id is in log lines ("pid" for processes, "conn" for threads).
    fn id_label(&self) -> &'static str;
    /// Serve `conn` (from `peer`, scoreboard slot `slot`) with the echo
    /// handler, which stores its byte count in `bytes` at the end; returns
    /// the connection's id (a pid, say). On error the connection is closed.
    fn start(
        &mut self,
        conn: OwnedFd,
        peer: SocketAddr,
        slot: u32,
        bytes: &'static AtomicU64,
    ) -> io::Result<u64>;
    /// Report, by slot, each connection that ended since the last call.
    fn collect(&mut self, why: Collect, ended: &mut dyn FnMut(u32, How));
    /// Ask (Terminate) or force (Kill) the given (slot, id) connections to end.
    fn stop(&mut self, how: Stop, targets: &mut dyn Iterator<Item = (u32, u64)>);
    /// Has this connection's process ended without being reaped?
    fn is_zombie(&self, _id: u64) -> bool {
        false
    }
    /// Last call before forkd exits: report anything still unreported.
    fn finish(&mut self, ended: &mut dyn FnMut(u32, How)) {
        self.collect(Collect::NeedRoom, ended);
    }
}

/// Why the dispatcher asks a model to collect ended connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collect {
    /// The wake-up pipe fired (a signal, or a thread ending).
    Woken,
    /// A client is waiting and about to be accepted.
    BeforeAccept,
    /// At the connection cap, or stopping: ended connections are needed now.
    NeedRoom,
}

/// How hard [`Model::stop`] asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Terminate,
    Kill,
}

/// How a connection's process or thread ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// A child exited with this status (see [`End::exit_code`]).
    Exited(i32),
    /// A child was killed by this signal.
    Signaled(Signal),
    /// A thread's echo handler returned.
    Returned(End),
}

impl How {
    fn is_normal(self) -> bool {
        matches!(
            self,
            How::Exited(0 | 2 | 3) | How::Returned(End::Closed | End::Reset | End::IdleTimeout)
        )
    }
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::Exited(code) => write!(f, "exit {code} ({})", End::describe_exit_code(*code)),
            How::Signaled(sig) => write!(f, "killed by {}", sig.as_str()),
            How::Returned(end) => f.write_str(end.describe()),
        }
    }
}

/// Settings the dispatcher takes from the command line.
pub struct Settings {
    pub max_conns: usize,
    pub max_per_ip: u32,
    pub grace: Duration,
}

/// What the dispatcher did, for the exit line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub served: u64,
    pub ended: u64,
    pub killed: u64,
    pub refused_per_ip: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for connections to finish by themselves.
    Grace,
    /// SIGTERM (or shutdown) sent; waiting a second.
    Terminated,
    /// SIGKILL sent; waiting for the last ends to be collected.
    Killed,
}

/// At most one line a second about one kind of trouble, with a count of the rest.
#[derive(Default)]
struct Throttle {
    next: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + Duration::from_secs(1));
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn more(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more since the last report)")
    }
}

/// After fork/thread failures and descriptor exhaustion, stop accepting this long.
const BACKOFF: Duration = Duration::from_millis(100);
/// Accepts per listener per wake-up, so signals and ends are never starved.
const ACCEPT_BATCH: usize = 64;
/// After SIGTERM to the children, wait this long before SIGKILL.
const TERM_TO_KILL: Duration = Duration::from_secs(1);
/// After SIGKILL, give up waiting for ends after this long.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Least time between two STATUS= updates to the service manager.
const STATUS_EVERY: Duration = Duration::from_secs(1);

pub struct Dispatcher<M: Model> {
    model: M,
    listeners: Vec<Listener>,
    signals: Signals,
    settings: Settings,
    board: Scoreboard,
    per_ip: PerIp,
    summary: Summary,
    at_cap: bool,
    paused_until: Option<Instant>,
    stopping: Option<(Phase, Instant)>,
    status_sent: Option<Instant>,
    status_dirty: bool,
    /// The poll set: room for the wake-up pipe and every listener.
    pollfds: &'static mut [libc::pollfd],
    /// How many entries of `pollfds` the last poll used.
    polled: usize,
    per_ip_log: Throttle,
    start_fail_log: Throttle,
    accept_fail_log: Throttle,
}

impl<M: Model> Dispatcher<M> {
    /// `board` must have room for `settings.max_conns` connections.
    pub fn new(
        model: M,
        board: Scoreboard,
        listeners: Vec<Listener>,
        signals: Signals,
        settings: Settings,
    ) -> Result<Self, Error> {
        // SAFETY: all-zero is a valid pollfd (plain integers).
        let pollfds = unsafe { shared_zeroed::<libc::pollfd>(1 + listeners.len()) }
            .map_err(|e| Error::os("cannot map the poll set", e))?;
        Ok(Dispatcher {
            board,
            model,
            listeners,
            signals,
            per_ip: PerIp::new(settings.max_per_ip),
            settings,
            summary: Summary::default(),
            at_cap: false,
            paused_until: None,
            stopping: None,
            status_sent: None,
            status_dirty: true,
            pollfds,
            polled: 0,
            per_ip_log: Throttle::default(),
            start_fail_log: Throttle::default(),
            accept_fail_log: Throttle::default(),
        })
    }

    /// Serve until a stop signal, then drain; returns what was done.
    pub fn run(mut self) -> Result<Summary, Error> {
        let label = self.model.id_label();
        loop {
            let now = Instant::now();
            if self.paused_until.is_some_and(|t| now >= t) {
                self.paused_until = None;
            }
            let accepting = self.stopping.is_none()
                && self.paused_until.is_none()
                && self.board.active() < self.settings.max_conns;
            let timeout = self.timeout(now);
            let woken = self.wait(accepting, timeout)?;

            if woken {
                let pending = self.signals.take();
                self.on_signals(pending);
            }
            let why = if self.stopping.is_some() || self.board.active() >= self.settings.max_conns {
                Collect::NeedRoom
            } else {
                Collect::Woken
            };
            self.collect(why);

            if self.stopping.is_some() {
                if self.drain_step(Instant::now()) {
                    break;
                }
                continue;
            }
            for i in 0..self.listeners.len() {
                if self.listener_ready(i) {
                    self.accept_from(i);
                }
            }
            self.update_cap_episode();
            self.send_status(Instant::now());
        }
        let Dispatcher {
            model,
            board,
            per_ip,
            summary,
            ..
        } = &mut self;
        model.finish(&mut |slot, how| log_end(board, per_ip, summary, label, slot, how));
        Ok(self.summary)
    }

    /// Poll the wake-up pipe and (when accepting) the listeners; returns
    /// whether the pipe was readable. Which listeners are readable is left
    /// in `self.pollfds` (see [`Self::listener_ready`]).
    ///
    /// The poll set lives in shared memory, like the scoreboard, so writing
    /// it leaves no copy-on-write page in the children forked before.
    fn wait(&mut self, accepting: bool, timeout: PollTimeout) -> Result<bool, Error> {
        let entry = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        self.pollfds[0] = entry(self.signals.as_fd().as_raw_fd());
        self.polled = 1;
        if accepting {
            for (i, l) in self.listeners.iter().enumerate() {
                self.pollfds[1 + i] = entry(l.as_fd().as_raw_fd());
            }
            self.polled += self.listeners.len();
        }
        let timeout: i32 = timeout.into();
        // SAFETY: `pollfds` holds at least `polled` valid pollfd structures,
        // and every descriptor among them stays open during the call.
        let n = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.polled as libc::nfds_t,
                timeout,
            )
        };
        if n < 0 {
            return match Errno::last() {
                // A signal: its handler wrote to the pipe, so look at the pipe.
                Errno::EINTR => Ok(true),
                e => Err(Error::new(
                    EXIT_SOFTWARE,
                    format!("poll failed: {}", e.desc()),
                )),
            };
        }
        Ok(self.pollfds[0].revents != 0)
    }

    /// Did the last poll find listener `i` readable?
    fn listener_ready(&self, i: usize) -> bool {
        i + 1 < self.polled && self.pollfds[i + 1].revents != 0
    }

    /// How long poll may sleep: until the next deadline, if any.
    fn timeout(&self, now: Instant) -> PollTimeout {
        let mut next: Option<Instant> = self.paused_until;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some((_, deadline)) = self.stopping {
            consider(deadline);
            // Zombies (in --reap off) are counted by looking, not told by a signal.
            consider(now + Duration::from_millis(100));
        }
        if self.status_dirty && systemd::notify_socket_set() {
            consider(self.status_sent.map_or(now, |t| t + STATUS_EVERY));
        }
        match next {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis() + 1;
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    fn on_signals(&mut self, pending: Pending) {
        if pending.has(Pending::STATUS) {
            info!("{}", self.status_line());
        }
        if pending.has(Pending::QUIT) {
            info!(
                "SIGQUIT: killing {} connections and exiting",
                self.board.active()
            );
            self.begin_stop();
            self.stop_all(Stop::Kill);
            self.stopping = Some((Phase::Killed, Instant::now() + KILL_WAIT));
        } else if pending.has(Pending::TERMINATE) {
            match self.stopping {
                None => {
                    info!(
                        "stopping: no new connections; {} active may finish within {}",
                        self.board.active(),
                        humantime::format_duration(self.settings.grace)
                    );
                    self.begin_stop();
                    self.stopping = Some((Phase::Grace, Instant::now() + self.settings.grace));
                }
                Some((Phase::Grace, _)) => {
                    info!("second stop signal: ending connections now");
                    self.stopping = Some((Phase::Grace, Instant::now()));
                }
                Some(_) => {}
            }
        }
    }

    /// Close the listeners (so clients are refused, not queued) and tell systemd.
    fn begin_stop(&mut self) {
        self.listeners.clear();
        systemd::stopping(&format!("stopping: {} active", self.board.active()));
    }

    /// One step of the stop: true when every connection has ended.
    fn drain_step(&mut self, now: Instant) -> bool {
        let live = self.board.active() - self.zombies();
        if live == 0 {
            return true;
        }
        let Some((phase, deadline)) = self.stopping else {
            return false;
        };
        if now < deadline {
            return false;
        }
        match phase {
            Phase::Grace => {
                info!("grace period over: sending SIGTERM to {live} connections");
                self.stop_all(Stop::Terminate);
                self.stopping = Some((Phase::Terminated, now + TERM_TO_KILL));
            }
            Phase::Terminated => {
                warn!("{live} connections still open: sending SIGKILL");
                self.stop_all(Stop::Kill);
                self.stopping = Some((Phase::Killed, now + KILL_WAIT));
            }
            Phase::Killed => {
                error!("{live} connections did not end after SIGKILL; exiting anyway");
                return true;
            }
        }
        false
    }

    fn stop_all(&mut self, how: Stop) {
        let model = &self.model;
        let mut targets = self
            .board
            .assigned()
            .filter(|&(_, id)| !model.is_zombie(id))
            .collect::<Vec<_>>()
            .into_iter();
        self.model.stop(how, &mut targets);
    }

    fn zombies(&self) -> usize {
        self.board
            .assigned()
            .filter(|&(_, id)| self.model.is_zombie(id))
            .count()
    }

    /// Collect ended connections from the model; log each and free its slot.
    fn collect(&mut self, why: Collect) {
        let label = self.model.id_label();
        let Dispatcher {
            model,
            board,
            per_ip,
            summary,
            status_dirty,
            ..
        } = self;
        model.collect(why, &mut |slot, how| {
            log_end(board, per_ip, summary, label, slot, how);
            *status_dirty = true;
        });
    }

    /// Accept up to a batch of connections from listener `i`.
    fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            if self.board.active() >= self.settings.max_conns {
                self.collect(Collect::NeedRoom);
                if self.board.active() >= self.settings.max_conns {
                    return;
                }
            }
            self.collect(Collect::BeforeAccept);
            let (conn, peer) = match self.listeners[i].accept() {
                Ok(c) => c,
                Err(Errno::EAGAIN) => return,
                // The client gave up between SYN and accept, or a signal: try the next.
                Err(Errno::ECONNABORTED | Errno::EPROTO | Errno::EINTR) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    // The listener stays readable: pause it instead of spinning.
                    let now = Instant::now();
                    if let Some(n) = self.accept_fail_log.allow(now) {
                        warn!(
                            "accept on {}: {} - pausing {}ms{}",
                            self.listeners[i].name,
                            e.desc(),
                            BACKOFF.as_millis(),
                            more(n)
                        );
                    }
                    self.paused_until = Some(now + BACKOFF);
                    return;
                }
                Err(e) => {
                    error!("accept on {}: {}", self.listeners[i].name, e.desc());
                    self.paused_until = Some(Instant::now() + BACKOFF);
                    return;
                }
            };
            self.admit(conn, peer);
            if self.paused_until.is_some() {
                return;
            }
        }
    }

    /// Hand an accepted connection to the model, or refuse it.
    fn admit(&mut self, conn: OwnedFd, peer: SocketAddr) {
        if !self.per_ip.admit(peer.ip()) {
            drop(conn);
            self.summary.refused_per_ip += 1;
            if let Some(n) = self.per_ip_log.allow(Instant::now()) {
                warn!(
                    "refused {peer}: {} has {} connections already (--max-per-ip){}",
                    peer.ip(),
                    self.settings.max_per_ip,
                    more(n)
                );
            }
            return;
        }
        let Some(slot) = self.board.claim(peer) else {
            // Unreachable: accepting stops at the cap, and the board holds the cap.
            self.per_ip.release(peer.ip());
            return;
        };
        let bytes = self.board.bytes_cell(slot);
        match self.model.start(conn, peer, slot, bytes) {
            Ok(id) => {
                debug!("start {} {id} for {peer}", self.model.id_label());
                self.board.assign(slot, id);
                self.summary.served += 1;
                self.status_dirty = true;
            }
            Err(e) => {
                self.board.release(slot);
                self.per_ip.release(peer.ip());
                let now = Instant::now();
                if let Some(n) = self.start_fail_log.allow(now) {
                    warn!(
                        "cannot serve {peer}: {} - connection closed, pausing {}ms{}",
                        crate::error::describe(&e),
                        BACKOFF.as_millis(),
                        more(n)
                    );
                }
                self.paused_until = Some(now + BACKOFF);
            }
        }
    }

    /// Log the moment the cap is reached, once per episode, and when it is left.
    fn update_cap_episode(&mut self) {
        let full = self.board.active() >= self.settings.max_conns;
        if full && !self.at_cap {
            warn!(
                "at the cap of {} connections: accepting paused (new clients wait in the backlog)",
                self.settings.max_conns
            );
            self.status_dirty = true;
        } else if !full && self.at_cap {
            info!("below the cap again: accepting");
            self.status_dirty = true;
        }
        self.at_cap = full;
    }

    fn send_status(&mut self, now: Instant) {
        if !self.status_dirty || !systemd::notify_socket_set() {
            return;
        }
        if self.status_sent.is_some_and(|t| now < t + STATUS_EVERY) {
            return;
        }
        let cap = if self.at_cap { " (at cap)" } else { "" };
        systemd::status(&format!(
            "active {}/{}{cap}, served {}",
            self.board.active(),
            self.settings.max_conns,
            self.summary.served
        ));
        self.status_sent = Some(now);
        self.status_dirty = false;
    }

    fn status_line(&self) -> String {
        format!(
            "status: mode {}, active {}/{}, served {}, reaped {}, zombies {}",
            self.model.name(),
            self.board.active(),
            self.settings.max_conns,
            self.summary.served,
            self.summary.ended,
            self.zombies()
        )
    }
}

/// Log one ended connection and free its slot and per-address count.
fn log_end(
    board: &mut Scoreboard,
    per_ip: &mut PerIp,
    summary: &mut Summary,
    label: &str,
    slot: u32,
    how: How,
) {
    let rec = board.release(slot);
    per_ip.release(rec.peer.ip());
    summary.ended += 1;
    if matches!(how, How::Signaled(_)) {
        summary.killed += 1;
    }
    let level = if how.is_normal() {
        log::Level::Info
    } else {
        log::Level::Warn
    };
    if log::log_enabled!(level) {
        let secs = rec.start.elapsed().as_secs_f64();
        log::log!(
            level,
            "end {label} {} {}: {how}, {} bytes echoed in {secs:.3}s",
            rec.id,
            rec.peer,
            rec.bytes
        );
    }
}
