//! Prefork mode, the parent's side: it keeps a pool of workers
//! ([`crate::worker`]) and never touches a connection.
//!
//! The workers accept from the listeners themselves, so the parent's loop
//! is not the dispatcher's: it waits in `poll` on the wake-up pipe alone
//! (signals, and the SIGCHLD handler's reaping into the [`crate::reaper`]'s
//! ring) and does four things:
//!
//! - **respawn**: a worker that ends is logged with its exit status or
//!   signal and replaced. One that served its `--max-conns-per-worker`
//!   (exit [`code::RECYCLED`]) is replaced at once; one that dies within
//!   [`QUICK`] of its start is replaced after a delay that doubles with each
//!   such death in a row in its place (100 ms up to `MOST_DELAY`, 30 s), so a
//!   worker that dies at once cannot make the parent fork without end;
//! - **drain** on SIGTERM/SIGINT: close the stop pipe (idle workers exit at
//!   once, busy ones when their connection ends), stop listening (new
//!   clients are refused), wait `--grace`, then SIGTERM the workers left,
//!   SIGKILL a second later; a second SIGTERM skips the grace, SIGQUIT kills
//!   at once;
//! - **report**: SIGUSR1/SIGHUP status lines, systemd `STATUS=`, the summary;
//! - **nothing else**: no per-connection work at all.
//!
//! The rule of [`crate::memory`] holds here as in fork mode: every pid the
//! parent signals comes from its own records (`Place`, ordinary private
//! memory a worker only ever has a copy of), checked against its own pool,
//! with SIGCHLD blocked from the last reap to the last `kill`. What workers
//! write (the [`crate::scoreboard`]) is read for reports only, clamped.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Pid, fork};

use crate::dispatcher::{Refusals, Summary};
use crate::error::{EXIT_SOFTWARE, Error};
use crate::events::{self, Throttle};
use crate::listen::Listener;
use crate::model::{How, Stop};
use crate::scoreboard::{Board, Report};
use crate::signals::{self, Pending, Signals};
use crate::stop::{Drain, Step};
use crate::udp::Udp;
use crate::upgrade::{Outcome, Upgrade};
use crate::worker::{self, Setup, TERMS, code};
use crate::{logging, reaper, systemd};

/// The default pool of prefork mode: 8 workers per CPU this process may
/// run on. A worker spends most of a connection waiting for its client, so a
/// pool the size of the CPU count would leave the CPUs idle; 8 per CPU keeps
/// them busy under a short-connection load (measured: see docs/prefork.md)
/// while a pool stays a few MiB.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 8
}

/// A worker that ends sooner than this after its start "died at once".
pub const QUICK: Duration = Duration::from_secs(1);
/// The first respawn delay after a quick death; it doubles up to [`MOST_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MOST_DELAY: Duration = Duration::from_secs(30);
/// Least time between two STATUS= updates.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The parent's own record of one place in the pool.
#[derive(Clone, Copy, Debug, Default)]
struct Place {
    /// The worker's pid, from fork; None when the place is empty.
    pid: Option<Pid>,
    started: Option<Instant>,
    /// Quick deaths in a row here.
    quick: u32,
    /// When to start the next worker here (None: now, unless stopping).
    due: Option<Instant>,
}

pub struct Pool {
    setup: Setup,
    listeners: Vec<Listener>,
    activated: bool,
    signals: Signals,
    grace: Duration,
    places: Vec<Place>,
    /// The write end of the stop pipe; closing it drains the pool.
    stop_write: Option<OwnedFd>,
    /// Kept only so that workers started later inherit it.
    _stop_read: OwnedFd,
    /// What ended workers reported (clamped), and what the parent saw.
    gone: Report,
    forced: u64,
    respawned: u64,
    stop: Drain,
    status_sent: Option<(Instant, String)>,
    fork_fail_log: Throttle,
    ignored_log: events::Ignored,
    /// UDP sockets, served by the parent in its own loop, as the fork-mode
    /// dispatcher serves them (see [`crate::udp`]); workers close them.
    udp: Udp,
    /// The parent's poll set: the wake-up pipe, the UDP sockets, then an
    /// upgrade's descriptors.
    pollfds: Vec<libc::pollfd>,
    /// What SIGUSR2 starts (see [`crate::upgrade`]).
    upgrade: Option<Upgrade>,
}

impl Pool {
    /// A pool for `setup.pool` workers over `listeners`, none started yet.
    pub fn new(
        mut setup: Setup,
        (listeners, udp): (Vec<Listener>, Udp),
        activated: bool,
        signals: Signals,
        grace: Duration,
        upgrade: Option<Upgrade>,
    ) -> Result<Pool, Error> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::os("cannot make the pool's stop pipe", e))?;
        setup.listeners = listeners.iter().map(|l| l.as_fd().as_raw_fd()).collect();
        setup.activated = activated;
        // One listener: the workers block in accept itself, where the kernel
        // wakes one waiter per connection (see `worker`). With several they
        // wait in epoll, so the listeners must stay non-blocking.
        setup.block_in_accept = match &listeners[..] {
            [one] if setup.wake == crate::cli::Wake::One => one.set_blocking().is_ok(),
            _ => false,
        };
        setup.stop = read.as_raw_fd();
        Ok(Pool {
            places: vec![Place::default(); setup.pool],
            setup,
            listeners,
            activated,
            signals,
            grace,
            stop_write: Some(write),
            _stop_read: read,
            gone: Report::default(),
            forced: 0,
            respawned: 0,
            stop: Drain::default(),
            status_sent: None,
            fork_fail_log: Throttle::default(),
            ignored_log: events::Ignored::default(),
            udp,
            pollfds: Vec::new(),
            upgrade,
        })
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    pub fn board(&self) -> Board {
        self.setup.board
    }

    /// Start every worker (at start-up, before readiness is announced).
    pub fn fill(&mut self) {
        for i in 0..self.places.len() {
            self.spawn(i);
        }
    }

    /// Keep the pool until a stop, then drain it; returns what was done.
    pub fn run(mut self) -> Result<Summary, Error> {
        loop {
            let now = Instant::now();
            if self.wait(self.timeout(now))? {
                let pending = self.signals.take();
                self.on_signals(pending);
            }
            self.collect();
            let now = Instant::now();
            self.upgrade_step(now);
            if self.stop.is_stopping() {
                if self.drain_step(now) {
                    break;
                }
                continue;
            }
            for i in 0..self.places.len() {
                let p = self.places[i];
                if p.pid.is_none() && p.due.is_none_or(|t| now >= t) {
                    self.spawn(i);
                }
            }
            self.send_status(now);
        }
        // Whatever is left (a worker that would not die) is reaped if it can be.
        reaper::reap_now();
        self.collect();
        let mut total = self.gone;
        for i in 0..self.places.len() {
            if self.places[i].pid.is_some() {
                total.add(&self.setup.board.report(i));
            }
        }
        Ok(Summary {
            served: total.served,
            ended: total.ended.saturating_add(self.forced).min(total.served),
            forced: self.forced,
            refused: Refusals {
                per_ip: total.refused[0],
                per_net: total.refused[1],
                early: total.refused[2],
            },
        })
    }

    /// Fork worker `i`.
    fn spawn(&mut self, i: usize) {
        self.setup.board.clear(i);
        // SAFETY: the parent is single-threaded (as fork mode's dispatcher),
        // so the worker starts with no lock held by a vanished thread; it
        // runs `worker::run`, which ends in `_exit` and never returns here.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => worker::run(&self.setup, i),
            Ok(ForkResult::Parent { child }) => {
                let was = self.places[i];
                self.places[i] = Place {
                    pid: Some(child),
                    started: Some(Instant::now()),
                    quick: was.quick,
                    due: None,
                };
                if was.started.is_some() {
                    self.respawned += 1;
                }
                events::worker_started(i + 1, child.as_raw());
            }
            Err(e) => {
                let now = Instant::now();
                if let Some(n) = self.fork_fail_log.allow(now) {
                    events::worker_fork_failed(i + 1, e.desc(), QUICK, n);
                }
                self.places[i].due = Some(now + QUICK);
            }
        }
    }

    /// Take every reaped exit from the ring and end its worker's place.
    fn collect(&mut self) {
        let mut exits = Vec::new();
        reaper::drain(&mut |pid, status| exits.push((pid, status)));
        for (pid, status) in exits {
            self.ended(pid, status);
        }
    }

    /// The worker `pid` ended so; a pid the pool does not hold ends nothing.
    fn ended(&mut self, pid: Pid, status: WaitStatus) {
        let Some(i) = self.places.iter().position(|p| p.pid == Some(pid)) else {
            return;
        };
        let place = self.places[i];
        let how = match status {
            WaitStatus::Signaled(_, sig, _) => How::Signaled(sig),
            WaitStatus::Exited(_, c) => How::Exited(c),
            _ => How::Exited(-1),
        };
        let report = self.setup.board.report(i);
        self.gone.add(&report);
        // Killed while it held a connection: that connection ended too,
        // and the worker could not log it.
        let mid_connection = report.busy && matches!(how, How::Signaled(_));
        if mid_connection {
            self.forced += 1;
        }
        self.setup.board.clear(i);
        let lived = place.started.map_or(Duration::ZERO, |t| t.elapsed());
        let recycled = how == How::Exited(code::RECYCLED);
        let normal = recycled || how == How::Exited(code::STOPPED);
        let quick = if !recycled && lived < QUICK {
            place.quick.saturating_add(1)
        } else {
            0
        };
        let delay = match quick {
            0 => Duration::ZERO,
            q => FIRST_DELAY
                .saturating_mul(1 << (q - 1).min(16))
                .min(MOST_DELAY),
        };
        let now = Instant::now();
        self.places[i] = Place {
            pid: None,
            started: place.started,
            quick,
            due: Some(now + delay),
        };
        let replaced = (!self.stop.is_stopping()).then_some(delay);
        let describe = match how {
            How::Exited(c) => format!("exit {c} ({})", code::describe(c)),
            other => other.to_string(),
        };
        events::worker_ended(
            i + 1,
            pid.as_raw(),
            &describe,
            normal,
            mid_connection.then_some(report.bytes),
            lived,
            replaced,
        );
    }

    /// Poll the wake-up pipe, the UDP sockets and an upgrade under way, and serve the datagrams
    /// that came; true if the pipe was readable (or a signal came).
    fn wait(&mut self, timeout: i32) -> Result<bool, Error> {
        let pipe = libc::pollfd {
            fd: self.signals.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        self.pollfds.clear();
        self.pollfds.push(pipe);
        self.pollfds.resize(1 + self.udp.sockets().len(), pipe);
        let mut polled = 1 + self.udp.add_to(&mut self.pollfds, 1);
        self.pollfds.truncate(polled);
        if let Some(fds) = self.upgrade.as_ref().and_then(|u| u.fds()) {
            for fd in fds {
                self.pollfds.push(libc::pollfd { fd, ..pipe });
            }
            polled += fds.len();
        }
        // SAFETY: `pollfds` holds `polled` valid pollfd structures.
        let n = unsafe { libc::poll(self.pollfds.as_mut_ptr(), polled as libc::nfds_t, timeout) };
        if n > 0 {
            self.udp.on_readable(&self.pollfds[..polled]);
        }
        let p = self.pollfds[0];
        if n < 0 {
            return match Errno::last() {
                Errno::EINTR => Ok(true),
                e => Err(Error::new(
                    EXIT_SOFTWARE,
                    format!("poll failed: {}", e.desc()),
                )),
            };
        }
        Ok(p.revents != 0)
    }

    /// Milliseconds until the next thing to do (-1: none).
    fn timeout(&self, now: Instant) -> i32 {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match self.stop.deadline() {
            Some(deadline) => consider(deadline),
            None => {
                for p in &self.places {
                    if p.pid.is_none() {
                        consider(p.due.unwrap_or(now));
                    }
                }
                if systemd::notify_socket_set() {
                    consider(
                        self.status_sent
                            .as_ref()
                            .map_or(now, |(t, _)| *t + STATUS_EVERY),
                    );
                }
                if let Some(t) = self.upgrade.as_ref().and_then(|u| u.deadline()) {
                    consider(t);
                }
            }
        }
        match next {
            None => -1,
            Some(t) => (t.saturating_duration_since(now).as_millis() + 1).min(60_000) as i32,
        }
    }

    fn on_signals(&mut self, pending: Pending) {
        if pending.has(Pending::STATUS) || pending.has(Pending::RELOAD) {
            events::status(&self.status_line());
        }
        if pending.has(Pending::UPGRADE) {
            let stopping = self.stop.is_stopping();
            crate::upgrade::on_request(self.upgrade.as_mut(), stopping, &self.listeners);
        }
        if pending.has(Pending::RELOAD) {
            logging::reopen();
        }
        self.ignored_log.log(pending);
        let busy = self.busy();
        if pending.has(Pending::QUIT) {
            events::quit(&TERMS, busy);
            self.begin_stop();
            self.signal_all(Signal::SIGKILL);
            self.stop.killed();
            return;
        }
        let cpu_limit = pending.has(Pending::CPU_LIMIT);
        if self
            .stop
            .on_requests(pending.terminate, cpu_limit, busy, self.grace)
        {
            self.begin_stop();
        }
    }

    /// An upgrade's progress. Once the new forkd is ready the pool drains
    /// as on SIGTERM, but the listeners are only closed here, not shut
    /// down: they are the new forkd's now, and what waits in their backlog
    /// is its to accept. Idle workers see the stop pipe closed at their
    /// next tick, busy ones before they would accept again (see
    /// [`crate::ticker`]).
    fn upgrade_step(&mut self, now: Instant) {
        let Some(outcome) = self.upgrade.as_mut().and_then(|u| u.check(now)) else {
            return;
        };
        match outcome {
            Outcome::Failed(why) => events::upgrade_failed(&why),
            Outcome::Ready(pid) if !self.stop.is_stopping() => {
                let busy = self.busy();
                events::upgrade_ready(pid, busy, self.grace);
                systemd::main_pid(
                    pid,
                    &format!("upgraded: pid {pid} serves, the old pool drains {busy}"),
                );
                self.stop_write = None;
                self.udp.close();
                self.listeners.clear();
                self.stop.begin_until(now + self.grace);
            }
            Outcome::Ready(_) => {}
        }
    }

    /// Drain: close the stop pipe, stop listening, tell systemd.
    fn begin_stop(&mut self) {
        self.stop_write = None;
        self.udp.close();
        // Bound here: shut down, so that new clients are refused now, not
        // queued until the last busy worker lets go of its copy. Inherited
        // from systemd: only closed, as in the other modes, since the socket
        // is systemd's and must go on listening for the next start.
        if !self.activated {
            for l in &self.listeners {
                l.stop_listening();
            }
        }
        self.listeners.clear();
        systemd::stopping(&format!("stopping: {} active", self.busy()));
    }

    fn live(&self) -> usize {
        self.places.iter().filter(|p| p.pid.is_some()).count()
    }

    /// One step of the drain: true once every worker has ended.
    fn drain_step(&mut self, now: Instant) -> bool {
        match self.stop.step(self.live(), now, &TERMS) {
            Step::Wait => false,
            Step::Done => true,
            Step::End(Stop::Terminate) => {
                self.signal_all(Signal::SIGTERM);
                false
            }
            Step::End(Stop::Kill) => {
                self.signal_all(Signal::SIGKILL);
                false
            }
        }
    }

    /// Signal every worker still in the pool, by the pids of the parent's
    /// own records. SIGCHLD stays blocked from the last collect to the last
    /// signal, so none of these pids can have been reaped and reused.
    fn signal_all(&mut self, signal: Signal) {
        signals::without_sigchld(|| {
            self.collect();
            for p in &self.places {
                if let Some(pid) = p.pid {
                    let _ = kill(pid, signal);
                }
            }
        });
    }

    /// Workers the board says are busy (untrusted: at most the pool).
    fn busy(&self) -> usize {
        self.setup.board.busy().min(self.live())
    }

    /// Served so far: ended workers' counts and the live ones' reports.
    fn totals(&self) -> Report {
        let mut t = self.gone;
        for (i, p) in self.places.iter().enumerate() {
            if p.pid.is_some() {
                t.add(&self.setup.board.report(i));
            }
        }
        t
    }

    fn send_status(&mut self, now: Instant) {
        if !systemd::notify_socket_set() {
            return;
        }
        if self
            .status_sent
            .as_ref()
            .is_some_and(|(t, _)| now < *t + STATUS_EVERY)
        {
            return;
        }
        let busy = self.busy();
        let cap = if busy >= self.places.len() {
            " (at cap)"
        } else {
            ""
        };
        let line = format!(
            "active {busy}/{}{cap}, served {}",
            self.places.len(),
            self.totals().served
        );
        if self.status_sent.as_ref().is_none_or(|(_, l)| *l != line) {
            systemd::status(&line);
        }
        self.status_sent = Some((now, line));
    }

    fn status_line(&self) -> String {
        let t = self.totals();
        let wake = match self.setup.wake {
            crate::cli::Wake::One => "one",
            crate::cli::Wake::All => "all",
        };
        // Wake-ups as the kernel counts them for the parent's own pids:
        // each voluntary context switch is a sleep, so a wake-up (a herd
        // wakes every idle worker per connection; see docs/prefork.md).
        let (mut switches, mut served) = (0u64, 0u64);
        for (i, p) in self.places.iter().enumerate() {
            if let Some(pid) = p.pid {
                switches += voluntary_switches(pid);
                served += self.setup.board.report(i).served;
            }
        }
        format!(
            "status: mode prefork (wake {wake}), active {}/{}, served {}, workers {}/{}, respawned {}, {:.2} context switches per connection",
            self.busy(),
            self.places.len(),
            t.served,
            self.live(),
            self.places.len(),
            self.respawned,
            switches as f64 / served.max(1) as f64,
        )
    }
}

/// A process's voluntary context switches, from /proc/PID/status (0 if gone).
fn voluntary_switches(pid: Pid) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
