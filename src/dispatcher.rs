//! The dispatcher: one `poll` loop over the listeners and the wake-up pipe,
//! the same for every concurrency model ([`Model`]).
//!
//! The loop: wait in `poll`; take the signals; collect the connections that
//! ended; accept, and hand each connection to the model. Every end goes
//! through one place, `Books::end_connection`: the table frees the slot,
//! the per-address count drops, and the end is logged. The loop never
//! blocks anywhere but in `poll`, which a signal always interrupts. At the
//! connection cap the listeners simply leave the poll set: new connections
//! wait in the kernel's backlog, and the loop sleeps until a connection
//! ends, never spinning and never waiting in `waitpid`.
//!
//! Nothing here trusts memory a connection's process can write: the table
//! of connections, their ids and the poll set are the dispatcher's own
//! (see [`crate::table`]); the byte counters are read for the end line only.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollTimeout;

use crate::cli::EarlyDrop;
use crate::counters::Counters;
use crate::error::{EXIT_SOFTWARE, Error};
use crate::events::{self, Throttle};
use crate::listen::Listener;
use crate::model::{Collect, How, Model, Stop, Terms};
use crate::proxy::{self, Via};
use crate::signals::{Pending, Signals};
use crate::sources::{Limits, Refused, Sources};
use crate::stop::{Drain, Step};
use crate::table::Table;
use crate::udp::Udp;
use crate::upgrade::{Outcome, Upgrade};
use crate::{logging, signals, systemd};

/// Settings the dispatcher takes from the command line.
pub struct Settings {
    pub max_conns: usize,
    pub sources: Limits,
    pub early_drop: EarlyDrop,
    pub grace: Duration,
    /// `--proxy-protocol`: read each connection's PROXY header first.
    pub proxy: Option<proxy::Settings>,
    /// What SIGUSR2 starts (None: no upgrade, as in tests of the loop).
    pub upgrade: Option<Upgrade>,
}

/// What the dispatcher did, for the exit line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub served: u64,
    pub ended: u64,
    /// Ended by a signal (fork) or a shutdown (thread), not by the client.
    pub forced: u64,
    /// Refused by --max-per-ip, --max-per-net, --early-drop.
    pub refused: Refusals,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Refusals {
    pub per_ip: u64,
    pub per_net: u64,
    pub early: u64,
}

/// Poll entries beyond the pipe and the listeners: the PROXY stage's epoll
/// descriptor, and an upgrade's notify socket and pidfd.
const HOOK_ENTRIES: usize = 3;
/// After fork/thread failures and descriptor exhaustion, stop accepting this long.
const BACKOFF: Duration = Duration::from_millis(100);
/// Accepts per listener per wake-up, so signals and ends are never starved.
const ACCEPT_BATCH: usize = 64;
/// Least time between two STATUS= updates to the service manager.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The dispatcher's record of its connections: everything an end touches.
struct Books {
    terms: &'static Terms,
    table: Table,
    counters: Counters,
    sources: Sources,
    summary: Summary,
    /// Something changed since the last STATUS= update.
    status_dirty: bool,
}

impl Books {
    /// The one place a connection ends: free its slot and its per-address
    /// count, count it, log it. An id forkd does not know ends nothing.
    fn end_connection(&mut self, id: u64, how: How) {
        let Some((slot, conn)) = self.table.end(id) else {
            return;
        };
        self.sources.release(conn.peer.ip());
        self.summary.ended += 1;
        if how.is_forced() {
            self.summary.forced += 1;
        }
        self.status_dirty = true;
        let bytes = self.counters.read(slot);
        let took = conn.start.elapsed();
        events::end(self.terms, id, conn.peer, how, bytes, took, conn.quiet);
    }
}

pub struct Dispatcher<M: Model> {
    model: M,
    books: Books,
    listeners: Vec<Listener>,
    signals: Signals,
    settings: Settings,
    at_cap: bool,
    paused_until: Option<Instant>,
    stop: Drain,
    status_sent: Option<Instant>,
    /// The poll set: room for the wake-up pipe and every listener, in memory
    /// no child inherits (a write to it costs no copy-on-write fault).
    pollfds: &'static mut [libc::pollfd],
    /// How many entries of `pollfds` the last poll used.
    polled: usize,
    // What is big and rarely written lives on the heap, behind a Box: the
    // dispatcher's own frame on the stack stays small, and so does the
    // number of its pages that each fork write-protects and the next
    // iteration writes again (measured: a frame with these inline cost the
    // dispatcher one page fault more per connection, and each child two).
    /// Connections waiting for their PROXY header (see [`crate::proxy`]).
    proxy: Option<Box<proxy::Stage>>,
    upgrade: Option<Box<Upgrade>>,
    /// Where the last poll put the PROXY stage's and the upgrade's entries.
    hooks_at: usize,
    refused_log: Throttle,
    early_drop_log: Throttle,
    /// xorshift state for --early-drop's coin.
    coin: u64,
    start_fail_log: Throttle,
    accept_fail_log: Throttle,
    ignored_log: events::Ignored,
    /// UDP sockets, polled after the listeners (accepting or not) and
    /// served in this loop: see [`crate::udp`].
    udp: Box<Udp>,
}

impl<M: Model> Dispatcher<M> {
    pub fn new(
        model: M,
        listeners: Vec<Listener>,
        signals: Signals,
        settings: Settings,
    ) -> Result<Self, Error> {
        let table = Table::new(settings.max_conns)
            .map_err(|e| Error::os("cannot map the connection table", e))?;
        let counters = Counters::new(settings.max_conns)
            .map_err(|e| Error::os("cannot map the byte counters", e))?;
        let sources = Sources::new(settings.sources, settings.max_conns)
            .map_err(|e| Error::os("cannot map the per-source counts", e))?;
        // SAFETY: all-zero is a valid pollfd (plain integers).
        // The wake-up pipe, the model's descriptor, the listeners, UDP, hooks.
        let room = 2 + listeners.len() + crate::udp::MAX_SOCKETS + HOOK_ENTRIES;
        let pollfds = unsafe { crate::memory::private::<libc::pollfd>(room) }
            .map_err(|e| Error::os("cannot map the poll set", e))?;
        let proxy = match settings.proxy.clone() {
            Some(p) => Some(
                proxy::Stage::new(p, settings.max_conns)
                    .map_err(|e| Error::os("cannot create the PROXY stage", e))?,
            ),
            None => None,
        };
        let mut settings = settings;
        let upgrade = settings.upgrade.take();
        Ok(Dispatcher {
            books: Books {
                terms: model.terms(),
                table,
                counters,
                sources,
                summary: Summary::default(),
                status_dirty: true,
            },
            model,
            listeners,
            signals,
            settings,
            at_cap: false,
            paused_until: None,
            stop: Drain::default(),
            status_sent: None,
            pollfds,
            polled: 0,
            proxy: proxy.map(Box::new),
            upgrade: upgrade.map(Box::new),
            hooks_at: 0,
            refused_log: Throttle::default(),
            early_drop_log: Throttle::default(),
            coin: seed(),
            start_fail_log: Throttle::default(),
            accept_fail_log: Throttle::default(),
            ignored_log: events::Ignored::default(),
            udp: Box::new(Udp::default()),
        })
    }

    /// Serve these UDP sockets too (at most [`crate::udp::MAX_SOCKETS`]).
    pub fn with_udp(mut self, udp: Udp) -> Self {
        self.udp = Box::new(udp);
        self
    }

    /// The listeners, as bound or inherited.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Serve until a stop signal, then drain; returns what was done.
    pub fn run(mut self) -> Result<Summary, Error> {
        loop {
            let now = Instant::now();
            if self.paused_until.is_some_and(|t| now >= t) {
                self.paused_until = None;
            }
            let accepting = !self.stop.is_stopping() && self.paused_until.is_none() && !self.full();
            let timeout = self.timeout(now);
            if self.wait(accepting, timeout)? {
                let pending = self.signals.take();
                self.on_signals(pending);
            }
            if self.model_ready(Instant::now()) {
                self.model.on_ready();
            }
            let why = if self.stop.is_stopping() || self.full() {
                Collect::NeedRoom
            } else {
                Collect::Woken
            };
            self.collect(why);
            self.udp.on_readable(&self.pollfds[..self.polled]);
            self.run_hooks(Instant::now());

            if self.stop.is_stopping() {
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
            if self.full() {
                // The cap may have been reached by the last accept: the
                // model must know now that each end has to wake us.
                self.collect(Collect::NeedRoom);
            }
            self.update_cap_episode();
            self.send_status(Instant::now());
        }
        let Dispatcher { model, books, .. } = &mut self;
        model.finish(&mut |id, how| books.end_connection(id, how));
        Ok(self.books.summary)
    }

    /// At the cap: connections served, plus those waiting for their PROXY
    /// header (each holds a place, so the wait is bounded too).
    fn full(&self) -> bool {
        self.books.table.active() + self.waiting() >= self.settings.max_conns
    }

    fn waiting(&self) -> usize {
        self.proxy.as_ref().map_or(0, |p| p.len())
    }

    /// The PROXY stage and the upgrade, after each wake-up: headers read,
    /// connections admitted, late ones closed; an upgrade's progress.
    fn run_hooks(&mut self, now: Instant) {
        let readable = |i: usize| i < self.polled && self.pollfds[i].revents != 0;
        if let Some(stage) = &mut self.proxy {
            if !stage.is_empty() && readable(self.hooks_at) {
                stage.on_readable(now);
            }
            stage.expire(now);
        }
        while let Some(r) = self.proxy.as_mut().and_then(|p| p.next_ready()) {
            self.admit(r.conn, r.peer, r.via);
        }
        let Some(outcome) = self.upgrade.as_mut().and_then(|u| u.check(now)) else {
            return;
        };
        match outcome {
            Outcome::Failed(why) => events::upgrade_failed(&why),
            Outcome::Ready(pid) => {
                let active = self.books.table.active();
                events::upgrade_ready(pid, active, self.settings.grace);
                systemd::main_pid(
                    pid,
                    &format!("upgraded: pid {pid} serves, the old dispatcher drains {active}"),
                );
                // Only this process's copies close: the new forkd holds the
                // sockets, and what waits in their backlog is its to accept.
                self.listeners.clear();
                self.stop.begin_until(now + self.settings.grace);
            }
        }
    }

    /// Poll the wake-up pipe, the model's descriptor if it has one, and
    /// (when accepting) the listeners; returns whether the pipe was
    /// readable. Which others are readable is left in `self.pollfds` (see
    /// [`Self::listener_ready`], [`Self::model_ready`]).
    fn wait(&mut self, accepting: bool, timeout: PollTimeout) -> Result<bool, Error> {
        let entry = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        self.pollfds[0] = entry(self.signals.fd());
        // A negative descriptor: poll skips the entry.
        self.pollfds[1] = entry(self.model.poll_fd().unwrap_or(-1));
        self.polled = 2;
        if accepting {
            for (i, l) in self.listeners.iter().enumerate() {
                self.pollfds[2 + i] = entry(l.as_fd().as_raw_fd());
            }
            self.polled += self.listeners.len();
        }
        // Listeners not polled now are skipped (fd -1); the rest go after them.
        let at = 2 + self.listeners.len();
        self.pollfds[self.polled..at]
            .iter_mut()
            .for_each(|e| e.fd = -1);
        self.polled = at;
        if !self.udp.is_empty() {
            self.polled += self.udp.add_to(self.pollfds, at);
        }
        self.hooks_at = self.polled;
        if let Some(stage) = self.proxy.as_ref().filter(|p| !p.is_empty()) {
            self.pollfds[self.polled] = entry(stage.fd());
            self.polled += 1;
        }
        if let Some(fds) = self.upgrade.as_ref().and_then(|u| u.fds()) {
            for fd in fds {
                self.pollfds[self.polled] = entry(fd);
                self.polled += 1;
            }
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
        i < self.listeners.len() && self.pollfds[i + 2].revents != 0
    }

    /// Has the model work: its descriptor was readable, or its deadline came?
    fn model_ready(&self, now: Instant) -> bool {
        self.pollfds[1].revents != 0 || self.model.next_deadline().is_some_and(|t| t <= now)
    }

    /// How long poll may sleep: until the next deadline, if any.
    fn timeout(&self, now: Instant) -> PollTimeout {
        let mut next: Option<Instant> = self.paused_until;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(deadline) = self.stop.deadline() {
            consider(deadline);
            // Zombies (in --reap off) are counted by looking, not told by a signal.
            consider(now + Duration::from_millis(100));
        }
        if let Some(t) = self.proxy.as_ref().and_then(|p| p.next_deadline()) {
            consider(t);
        }
        if let Some(t) = self.model.next_deadline() {
            consider(t);
        }
        if let Some(t) = self.upgrade.as_ref().and_then(|u| u.deadline()) {
            consider(t);
        }
        if self.books.status_dirty && systemd::notify_socket_set() {
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
        if pending.has(Pending::STATUS) || pending.has(Pending::RELOAD) {
            events::status(&self.status_line());
        }
        if pending.has(Pending::RELOAD) {
            logging::reopen();
        }
        self.ignored_log.log(pending);
        let active = self.books.table.active();
        if pending.has(Pending::UPGRADE) {
            let stopping = self.stop.is_stopping();
            crate::upgrade::on_request(self.upgrade.as_deref_mut(), stopping, &self.listeners);
        }
        if pending.has(Pending::QUIT) {
            events::quit(self.books.terms, active);
            self.begin_stop();
            if let Some(p) = &mut self.proxy {
                p.clear();
            }
            self.stop_all(Stop::Kill);
            self.stop.killed();
            return;
        }
        let cpu_limit = pending.has(Pending::CPU_LIMIT);
        if self
            .stop
            .on_requests(pending.terminate, cpu_limit, active, self.settings.grace)
        {
            self.begin_stop();
        }
    }

    /// Close the listeners (so clients are refused, not queued) and tell systemd.
    fn begin_stop(&mut self) {
        self.listeners.clear();
        self.udp.close();
        systemd::stopping(&format!("stopping: {} active", self.books.table.active()));
    }

    /// One step of the stop: true when every connection has ended.
    fn drain_step(&mut self, now: Instant) -> bool {
        let live = self.books.table.active() - self.finished() + self.waiting();
        match self.stop.step(live, now, self.books.terms) {
            Step::Wait => false,
            Step::Done => true,
            Step::End(how) => {
                if how == Stop::Terminate
                    && let Some(p) = &mut self.proxy
                {
                    // Connections still waiting for their header are dropped.
                    p.clear();
                }
                self.stop_all(how);
                false
            }
        }
    }

    /// Ask or force every connection still running to end. SIGCHLD stays
    /// blocked from the last collect to the last signal sent, so no id in
    /// the table can be a child reaped (and its pid reused) meanwhile.
    fn stop_all(&mut self, how: Stop) {
        signals::without_sigchld(|| {
            self.collect(Collect::NeedRoom);
            let model = &self.model;
            let conns: Vec<(u32, u64)> = self
                .books
                .table
                .assigned()
                .filter(|&(_, id)| !model.finished(id))
                .collect();
            self.model.stop(how, &mut conns.into_iter());
        });
    }

    /// Connections whose server finished but whose end is not collected.
    fn finished(&self) -> usize {
        self.books
            .table
            .assigned()
            .filter(|&(_, id)| self.model.finished(id))
            .count()
    }

    /// Collect ended connections from the model and end each.
    fn collect(&mut self, why: Collect) {
        let Dispatcher { model, books, .. } = self;
        model.collect(why, &mut |id, how| books.end_connection(id, how));
    }

    /// Accept up to a batch of connections from listener `i`.
    fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            if self.full() {
                self.collect(Collect::NeedRoom);
                if self.full() {
                    return;
                }
            }
            self.collect(Collect::BeforeAccept);
            let nonblocking = self.model.nonblocking();
            let (conn, peer) = match self.listeners[i].accept(nonblocking) {
                Ok(c) => c,
                Err(Errno::EAGAIN) => return,
                // The client gave up between SYN and accept, or a signal: try the next.
                Err(Errno::ECONNABORTED | Errno::EPROTO | Errno::EINTR) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    // The listener stays readable: pause it instead of spinning.
                    let now = Instant::now();
                    if let Some(n) = self.accept_fail_log.allow(now) {
                        events::accept_short(&self.listeners[i].name, e.desc(), BACKOFF, n);
                    }
                    self.paused_until = Some(now + BACKOFF);
                    return;
                }
                Err(e) => {
                    events::accept_failed(&self.listeners[i].name, e.desc());
                    self.paused_until = Some(Instant::now() + BACKOFF);
                    return;
                }
            };
            match &mut self.proxy {
                None => self.admit(conn, peer, Via::Direct),
                Some(stage) => {
                    if let Some(r) = stage.arrive(conn, peer, Instant::now()) {
                        self.admit(r.conn, r.peer, r.via);
                    }
                }
            }
            if self.paused_until.is_some() {
                return;
            }
        }
    }

    /// Nearly full (`--early-drop`): refuse this one at random?
    fn drop_early(&mut self) -> bool {
        let chance =
            (self.settings.early_drop).chance(self.books.table.active(), self.settings.max_conns);
        if chance == 0 {
            return false;
        }
        self.coin ^= self.coin << 13;
        self.coin ^= self.coin >> 7;
        self.coin ^= self.coin << 17;
        (self.coin % 1000) < chance as u64
    }

    /// Hand an accepted connection to the model, or refuse it. `peer` is
    /// the client: behind a balancer, the one its PROXY header named.
    fn admit(&mut self, conn: OwnedFd, peer: SocketAddr, via: Via) {
        if self.drop_early() {
            drop(conn);
            self.books.summary.refused.early += 1;
            if let Some(n) = self.early_drop_log.allow(Instant::now()) {
                events::dropped_early(peer, self.books.table.active(), self.settings.max_conns, n);
            }
            return;
        }
        let books = &mut self.books;
        if let Err(why) = books.sources.admit(peer.ip()) {
            drop(conn);
            let r = &mut books.summary.refused;
            match why {
                Refused::Address => r.per_ip += 1,
                Refused::Network => r.per_net += 1,
            }
            if let Some(n) = self.refused_log.allow(Instant::now()) {
                events::refused(peer, why, books.sources.limits(), n);
            }
            return;
        }
        let Some(slot) = books.table.claim(peer) else {
            // Unreachable: accepting stops at the cap, and the table holds the cap.
            books.sources.release(peer.ip());
            return;
        };
        if via == Via::Local {
            books.table.set_quiet(slot);
        }
        let bytes = books.counters.start(slot);
        match self.model.start(conn, peer, slot, bytes) {
            Ok(id) => {
                events::started(books.terms, id, peer);
                books.table.assign(slot, id);
                books.summary.served += 1;
                books.status_dirty = true;
            }
            Err(e) => {
                books.table.release(slot);
                books.sources.release(peer.ip());
                let now = Instant::now();
                if let Some(n) = self.start_fail_log.allow(now) {
                    events::cannot_serve(peer, &crate::error::describe(&e), BACKOFF, n);
                }
                self.paused_until = Some(now + BACKOFF);
            }
        }
    }

    /// Log the moment the cap is reached, once per episode, and when it is left.
    fn update_cap_episode(&mut self) {
        let full = self.full();
        if full && !self.at_cap {
            events::at_cap(self.settings.max_conns);
            self.books.status_dirty = true;
        } else if !full && self.at_cap {
            events::below_cap();
            self.books.status_dirty = true;
        }
        self.at_cap = full;
    }

    fn send_status(&mut self, now: Instant) {
        if !self.books.status_dirty || !systemd::notify_socket_set() {
            return;
        }
        if self.status_sent.is_some_and(|t| now < t + STATUS_EVERY) {
            return;
        }
        let cap = if self.at_cap { " (at cap)" } else { "" };
        systemd::status(&format!(
            "active {}/{}{cap}, served {}",
            self.books.table.active(),
            self.settings.max_conns,
            self.books.summary.served
        ));
        self.status_sent = Some(now);
        self.books.status_dirty = false;
    }

    fn status_line(&self) -> String {
        let terms = self.books.terms;
        let finished = match terms.finished {
            Some(word) => format!(", {word} {}", self.finished()),
            None => String::new(),
        };
        let finished = match &self.proxy {
            Some(p) => format!("{finished}, awaiting PROXY header {}", p.len()),
            None => finished,
        };
        format!(
            "status: mode {}, active {}/{}, served {}, {} {}{finished}",
            self.model.name(),
            self.books.table.active(),
            self.settings.max_conns,
            self.books.summary.served,
            terms.collected,
            self.books.summary.ended,
        )
    }
}

/// A seed for `--early-drop`'s coin (never 0, which xorshift would keep).
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into `bytes`.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    u64::from_ne_bytes(bytes) | 1
}
