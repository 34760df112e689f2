//! Event mode: one thread, one `epoll` loop over every connection, with
//! non-blocking sockets, inside the dispatcher (the `select` server of the
//! tutorials, done with epoll; nginx and redis work this way).
//!
//! The dispatcher still accepts, limits, keeps the table and logs; this
//! model owns an epoll descriptor that the dispatcher adds to its poll set
//! ([`Model::poll_fd`]). When it is readable, the dispatcher calls
//! [`Model::on_ready`], which takes the ready connections from epoll
//! (level-triggered, without waiting) and drives each connection's
//! [`echo::Session`](crate::echo::Session), the same state machine the blocking models run: so
//! the echo cannot drift from theirs.
//!
//! - **A buffer only while bytes are in flight.** Every connection reads
//!   into one shared buffer (`--buffer`) and sends straight back. Only when
//!   the client does not take its echo at once are the bytes still to send
//!   copied into a buffer of the connection's own, freed when they are
//!   sent. An idle connection is a descriptor and about a hundred bytes.
//! - **Backpressure.** While a connection has bytes to send, it is watched
//!   for writing only, never read: a client that never reads costs at most
//!   one buffer's worth, however much it sends (the rest waits in the
//!   kernel's socket buffers, and then in the client's).
//! - **Timers, not socket timeouts**, which do not apply to non-blocking
//!   I/O: connections that have sent nothing yet wait in one list
//!   (`--first-byte-timeout`), the others in another (`--idle-timeout`),
//!   each in order of their last progress, so both lists are sorted by
//!   deadline and every operation is O(1). The earliest deadline is the
//!   dispatcher's poll timeout ([`Model::next_deadline`]).
//! - **Stopping** is thread mode's: `SHUT_RD` on the socket stands for
//!   SIGTERM (the session sees the end of input, sends what it has, ends),
//!   `SHUT_RDWR` for SIGKILL.
//! - **First try at accept.** A new connection is served at once, before
//!   it is added to epoll: a short client has often sent its bytes (and its
//!   FIN) by the time it is accepted, and is then served without epoll at all.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{Shutdown, shutdown};

use crate::echo::{End, Session, Step, Want};
use crate::model::{Collect, How, Model, Stop, Terms};

static TERMS: Terms = Terms {
    id: "conn",
    terminate: "shutting down reading on",
    kill: "shutting down",
    forced: "shut down by forkd",
    collected: "ended",
    finished: None,
};

/// Ready connections taken from epoll at a time.
const BATCH: usize = 256;
/// Chunks echoed for one connection per readiness, so a fast stream cannot
/// starve the others (level-triggered: it is ready again next time).
const ROUNDS: u32 = 16;
/// No slot: the end of a timer list.
const NIL: u32 = u32::MAX;

/// Which timer list a connection is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum List {
    None,
    /// Nothing received yet: `--first-byte-timeout`.
    Silent,
    /// `--idle-timeout`.
    Idle,
}

/// One connection.
struct Conn {
    fd: OwnedFd,
    id: u64,
    session: Session,
    bytes: &'static AtomicU64,
    /// The bytes still to send when the client did not take them at once.
    held: Option<Box<[MaybeUninit<u8>]>>,
    /// When it last made progress (or started).
    last: Instant,
    list: List,
    prev: u32,
    next: u32,
    /// How the dispatcher stopped it, if it did.
    stopped: Option<Stop>,
    /// Added to epoll (not yet, if it was served at accept and is over).
    watched: bool,
}

/// A doubly linked list of slots, oldest first.
#[derive(Clone, Copy)]
struct Chain {
    head: u32,
    tail: u32,
    /// Every connection in it ends this long after its last progress.
    after: Option<Duration>,
}

impl Chain {
    fn new(after: Option<Duration>) -> Chain {
        Chain {
            head: NIL,
            tail: NIL,
            after,
        }
    }
}

pub struct EventModel {
    epoll: Epoll,
    /// By the dispatcher's slot number.
    conns: Vec<Option<Conn>>,
    /// Every connection reads into this, and sends straight from it.
    shared: Box<[MaybeUninit<u8>]>,
    events: Vec<EpollEvent>,
    ended: Vec<(u64, How)>,
    silent: Chain,
    idle: Chain,
    next_id: u64,
}

impl EventModel {
    /// With a `buffer`-byte shared buffer and the two timeouts (None: none).
    pub fn new(
        buffer: usize,
        first_byte: Option<Duration>,
        idle: Option<Duration>,
    ) -> io::Result<EventModel> {
        Ok(EventModel {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            conns: Vec::new(),
            shared: Box::new_uninit_slice(buffer),
            events: vec![EpollEvent::empty(); BATCH],
            ended: Vec::new(),
            silent: Chain::new(first_byte),
            idle: Chain::new(idle),
            next_id: 1,
        })
    }

    fn conn(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize)?.as_mut()
    }

    /// Echo on `slot` as far as its socket allows, then set what epoll
    /// watches it for; or end it.
    fn drive(&mut self, slot: u32, now: Instant) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = c.fd.as_raw_fd();
        let moved = c.session.moved();
        let was_held = c.held.is_some();
        let mut step = Step::Echoed;
        for _ in 0..ROUNDS {
            let buf = match c.held.as_deref_mut() {
                Some(own) => own,
                None => &mut self.shared[..],
            };
            step = c.session.advance(fd, buf, 0, c.bytes);
            match step {
                // Everything held went back: back to the shared buffer.
                Step::Echoed => c.held = None,
                Step::Wait(Want::Write) if c.held.is_none() => {
                    // Keep what the client has not taken, in a buffer of its own.
                    let pending = c.session.pending();
                    match hold(&self.shared[pending]) {
                        Ok(own) => {
                            c.held = Some(own);
                            c.session.moved_pending_to_start();
                        }
                        Err(e) => step = Step::Done(End::Error(e)),
                    }
                    break;
                }
                _ => break,
            }
        }
        let progressed = c.session.moved() != moved;
        let (watched, holding) = (c.watched, c.held.is_some());
        if let Step::Done(end) = step {
            self.end(slot, end);
            return;
        }
        if progressed {
            self.touch(slot, now);
        }
        // Level-triggered: watch for reading, or (holding bytes) for writing only.
        let flags = if holding {
            EpollFlags::EPOLLOUT
        } else {
            EpollFlags::EPOLLIN
        };
        let event = EpollEvent::new(flags, slot as u64);
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let r = if !watched {
            c.watched = true;
            let fd = c.fd.as_fd();
            self.epoll.add(fd, event)
        } else if holding != was_held {
            let fd = c.fd.as_fd();
            self.epoll.modify(fd, &mut { event })
        } else {
            Ok(())
        };
        if let Err(e) = r {
            self.end(slot, End::Error(e as i32));
        }
    }

    /// End the connection in `slot`: close it and report it.
    fn end(&mut self, slot: u32, end: End) {
        self.unlink(slot);
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        let how = match c.stopped {
            Some(stop) => How::ShutDown(stop, end),
            None => How::Returned(end),
        };
        let id = c.id;
        // Closing the descriptor takes it out of epoll.
        drop(c);
        self.ended.push((id, how));
    }

    fn chain(&mut self, list: List) -> Option<&mut Chain> {
        match list {
            List::None => None,
            List::Silent => Some(&mut self.silent),
            List::Idle => Some(&mut self.idle),
        }
    }

    /// Take `slot` out of its timer list.
    fn unlink(&mut self, slot: u32) {
        let Some(c) = self.conn(slot) else { return };
        let (list, prev, next) = (c.list, c.prev, c.next);
        c.list = List::None;
        let Some(chain) = self.chain(list) else {
            return;
        };
        if chain.head == slot {
            chain.head = next;
        }
        if chain.tail == slot {
            chain.tail = prev;
        }
        if let Some(p) = self.conn(prev) {
            p.next = next;
        }
        if let Some(n) = self.conn(next) {
            n.prev = prev;
        }
    }

    /// `slot` made progress at `now`: to the end of the list its timeout
    /// now comes from.
    fn touch(&mut self, slot: u32, now: Instant) {
        self.unlink(slot);
        let Some(c) = self.conn(slot) else { return };
        c.last = now;
        let list = if c.session.received() {
            List::Idle
        } else {
            List::Silent
        };
        let Some(chain) = self.chain(list) else {
            return;
        };
        if chain.after.is_none() {
            return;
        }
        let tail = chain.tail;
        chain.tail = slot;
        if tail == NIL {
            chain.head = slot;
        }
        if let Some(t) = self.conn(tail) {
            t.next = slot;
        }
        let c = self.conn(slot).expect("linked above");
        (c.list, c.prev, c.next) = (list, tail, NIL);
    }

    /// The deadline of the oldest connection of a list.
    fn first_deadline(&self, chain: &Chain) -> Option<Instant> {
        let after = chain.after?;
        let c = self.conns.get(chain.head as usize)?.as_ref()?;
        Some(c.last + after)
    }

    /// End every connection whose deadline has passed.
    fn expire(&mut self, now: Instant) {
        for list in [List::Silent, List::Idle] {
            loop {
                let chain = match list {
                    List::Silent => self.silent,
                    _ => self.idle,
                };
                match self.first_deadline(&chain) {
                    Some(t) if t <= now => {
                        let slot = chain.head;
                        let end = self
                            .conn(slot)
                            .map_or(End::IdleTimeout, |c| c.session.timed_out());
                        self.end(slot, end);
                    }
                    _ => break,
                }
            }
        }
    }
}

/// A buffer of its own holding `data`, or the errno (ENOMEM) if memory is short.
fn hold(data: &[MaybeUninit<u8>]) -> Result<Box<[MaybeUninit<u8>]>, i32> {
    let mut v: Vec<MaybeUninit<u8>> = Vec::new();
    v.try_reserve_exact(data.len()).map_err(|_| libc::ENOMEM)?;
    v.extend_from_slice(data);
    Ok(v.into_boxed_slice())
}

impl Model for EventModel {
    fn name(&self) -> String {
        "event (epoll)".into()
    }

    fn terms(&self) -> &'static Terms {
        &TERMS
    }

    fn start(
        &mut self,
        conn: OwnedFd,
        _peer: SocketAddr,
        slot: u32,
        bytes: &'static AtomicU64,
    ) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let i = slot as usize;
        if self.conns.len() <= i {
            self.conns.resize_with(i + 1, || None);
        }
        let now = Instant::now();
        self.conns[i] = Some(Conn {
            fd: conn,
            id,
            session: Session::new(),
            bytes,
            held: None,
            last: now,
            list: List::None,
            prev: NIL,
            next: NIL,
            stopped: None,
            watched: false,
        });
        self.touch(slot, now);
        // Served at once; its end, if it is over already, is collected as any other.
        self.drive(slot, now);
        Ok(id)
    }

    fn collect(&mut self, _why: Collect, ended: &mut dyn FnMut(u64, How)) {
        for (id, how) in self.ended.drain(..) {
            ended(id, how);
        }
    }

    fn stop(&mut self, how: Stop, conns: &mut dyn Iterator<Item = (u32, u64)>) {
        let shut = match how {
            Stop::Terminate => Shutdown::Read,
            Stop::Kill => Shutdown::Both,
        };
        for (slot, id) in conns {
            if let Some(c) = self.conn(slot).filter(|c| c.id == id) {
                c.stopped = Some(how);
                // The socket turns readable (or hung up): the loop ends it.
                let _ = shutdown(c.fd.as_raw_fd(), shut);
            }
        }
    }

    fn nonblocking(&self) -> bool {
        true
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.epoll.0.as_raw_fd())
    }

    fn on_ready(&mut self) {
        let now = Instant::now();
        let n = self
            .epoll
            .wait(&mut self.events, EpollTimeout::ZERO)
            .unwrap_or(0);
        for i in 0..n {
            let slot = self.events[i].data() as u32;
            self.drive(slot, now);
        }
        self.expire(now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let a = self.first_deadline(&self.silent);
        let b = self.first_deadline(&self.idle);
        a.into_iter().chain(b).min()
    }
}
