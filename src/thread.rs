//! Thread mode: one thread per connection inside the dispatcher process,
//! running the same echo handler as fork mode.
//!
//! Each thread reports its end in a list shared with the dispatcher. It wakes the dispatcher
//! (through the pipe the signal handlers use) only when the dispatcher
//! wants ends at once: when it waits for room (at the cap, or stopping),
//! logs each end, or keeps systemd's status line live. Otherwise ends are collected at the dispatcher's next
//! wake-up, before its next accept, sparing a context switch per connection.
//!
//! To stop connections, the dispatcher shuts their sockets down: `SHUT_RD`
//! (the echo handler sees the end of input, sends what it has and returns)
//! stands for SIGTERM, and `SHUT_RDWR` for SIGKILL. Each slot's socket sits
//! behind its own lock, which the thread holds while it closes the socket,
//! so the dispatcher never shuts down a descriptor number that was reused;
//! the locks of different connections never meet.

use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, Ordering, fence};
use std::sync::{Mutex, PoisonError};

use nix::sys::socket::{Shutdown, shutdown};

use crate::echo;
use crate::model::{Collect, How, Model, Stop, Terms};
use crate::signals;

static TERMS: Terms = Terms {
    id: "conn",
    terminate: "shutting down reading on",
    kill: "shutting down",
    forced: "shut down by forkd",
    collected: "ended",
    finished: None,
};

type Buffer = Box<[MaybeUninit<u8>]>;

/// What the dispatcher and every connection thread share. Allocated once
/// and never freed: detached threads may outlive any owner.
///
/// A connection's thread allocates and frees nothing. Its first malloc or
/// free would give it glibc's per-thread cache and attach it to an arena,
/// which it would give back at exit: a cost per connection. So its echo
/// buffer comes from the dispatcher through its slot and goes back with its
/// end, and the list of ends has room for every slot from the start.
struct Hub {
    /// Ends not yet collected (by id), each with the buffer to free.
    ends: Mutex<Vec<(u64, How, Option<Buffer>)>>,
    /// Whether an end must wake the dispatcher at once (see module docs).
    wake_on_end: AtomicBool,
}

/// One connection slot, handed to its thread by address.
struct Slot {
    hub: &'static Hub,
    /// The connection's id while its thread runs.
    id: AtomicU64,
    /// How the dispatcher stopped it: 0 not, 1 reading shut down, 2 all shut down.
    stopped: AtomicU8,
    /// The slot's socket while its thread runs (-1: none).
    socket: Mutex<RawFd>,
    /// The connection's byte counter ([`crate::counters`]).
    bytes: AtomicPtr<AtomicU64>,
    /// The echo buffer, from the dispatcher to the thread.
    buffer: Mutex<Option<Buffer>>,
}

pub struct ThreadModel {
    hub: &'static Hub,
    slots: &'static [Slot],
    /// Ends taken from the hub, kept between collects for its capacity.
    taken: Vec<(u64, How, Option<Buffer>)>,
    next_id: u64,
    stack: usize,
    buffer: usize,
}

type Timeouts = (Option<std::time::Duration>, Option<std::time::Duration>);

/// The receive timeouts before and after the first byte (see
/// [`echo::Watch`]); set once, before the first thread starts.
static TIMEOUTS: std::sync::OnceLock<Timeouts> = std::sync::OnceLock::new();

impl ThreadModel {
    /// For up to `max_conns` connections at once.
    pub fn new(stack: usize, buffer: usize, max_conns: usize, timeouts: Timeouts) -> ThreadModel {
        let _ = TIMEOUTS.set(timeouts);
        let hub: &'static Hub = Box::leak(Box::new(Hub {
            ends: Mutex::new(Vec::with_capacity(max_conns)),
            wake_on_end: AtomicBool::new(true),
        }));
        let slots = (0..max_conns)
            .map(|_| Slot {
                hub,
                id: AtomicU64::new(0),
                stopped: AtomicU8::new(0),
                socket: Mutex::new(-1),
                bytes: AtomicPtr::new(std::ptr::null_mut()),
                buffer: Mutex::new(None),
            })
            .collect();
        ThreadModel {
            hub,
            slots: Vec::leak(slots),
            taken: Vec::with_capacity(max_conns),
            next_id: 1,
            stack,
            buffer,
        }
    }
}

impl Model for ThreadModel {
    fn name(&self) -> String {
        "thread".into()
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
        let s = &self.slots[slot as usize];
        s.id.store(id, Ordering::Relaxed);
        s.stopped.store(0, Ordering::Relaxed);
        s.bytes
            .store(std::ptr::from_ref(bytes).cast_mut(), Ordering::Relaxed);
        // Uninitialised: no page of it is touched before data arrives. A
        // buffer that cannot be had fails this connection, not the process.
        *lock(&s.buffer) = Some(try_buffer(self.buffer)?);
        // The thread will own the descriptor, and close it (see `serve`).
        let fd = conn.into_raw_fd();
        *lock(&s.socket) = fd;
        if let Err(e) = spawn(self.stack, s) {
            // No thread: close the connection here.
            *lock(&s.socket) = -1;
            // SAFETY: `fd` is the accepted connection's, owned by nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            lock(&s.buffer).take();
            return Err(e);
        }
        Ok(id)
    }

    fn collect(&mut self, why: Collect, ended: &mut dyn FnMut(u64, How)) {
        // Ends are wanted at once when waiting for room, when each is logged,
        // and when systemd shows live counts (STATUS=).
        let urgent = why == Collect::NeedRoom
            || log::log_enabled!(log::Level::Info)
            || crate::systemd::notify_socket_set();
        self.hub.wake_on_end.store(urgent, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        std::mem::swap(&mut *lock(&self.hub.ends), &mut self.taken);
        for (id, how, buffer) in self.taken.drain(..) {
            drop(buffer);
            ended(id, how);
        }
    }

    fn stop(&mut self, how: Stop, conns: &mut dyn Iterator<Item = (u32, u64)>) {
        let (mark, shut) = match how {
            Stop::Terminate => (1, Shutdown::Read),
            Stop::Kill => (2, Shutdown::Both),
        };
        for (slot, _) in conns {
            let Some(s) = self.slots.get(slot as usize) else {
                continue;
            };
            let fd = lock(&s.socket);
            if *fd >= 0 {
                // The thread cannot close the socket while we hold its lock,
                // and reads `stopped` only after closing it.
                s.stopped.store(mark, Ordering::Relaxed);
                let _ = shutdown(*fd, shut);
            }
        }
    }
}

/// A connection's thread: echo, record the end, wake the dispatcher if it asked.
fn serve(s: &'static Slot) {
    let fd = *lock(&s.socket);
    // SAFETY: the dispatcher handed this descriptor to this thread alone
    // (`start` gave up its OwnedFd); it is closed
    // below, under the lock.
    let mut sock = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut buffer = lock(&s.buffer).take();
    // SAFETY: `start` stored the slot's byte counter, which lives until exit.
    let unused = AtomicU64::new(0);
    let bytes = unsafe { s.bytes.load(Ordering::Relaxed).as_ref() }.unwrap_or(&unused);
    let outcome = match buffer.as_deref_mut() {
        Some(buf) => {
            let (first_byte, idle) = TIMEOUTS.get().copied().unwrap_or_default();
            // As in fork and prefork mode, the socket keeps the listener's
            // short first timeout until the connection waits it out, so a
            // short connection makes no setsockopt call.
            let long_lived = || {};
            let watch = echo::Watch {
                first_byte,
                idle,
                starts_with: echo::initial_timeout(first_byte, true),
                on_long_lived: Some(&long_lived),
                ..echo::Watch::counting(bytes)
            };
            panic::catch_unwind(AssertUnwindSafe(|| echo::serve(&mut sock, buf, &watch))).ok()
        }
        None => None,
    }
    .unwrap_or(echo::Outcome {
        bytes: 0,
        end: echo::End::Error(0),
    });
    let stopped = {
        let mut fd = lock(&s.socket);
        *fd = -1;
        drop(sock);
        s.stopped.load(Ordering::Relaxed)
    };
    let how = match stopped {
        1 => How::ShutDown(Stop::Terminate, outcome.end),
        2 => How::ShutDown(Stop::Kill, outcome.end),
        _ => How::Returned(outcome.end),
    };
    let id = s.id.load(Ordering::Relaxed);
    // The list has room for every slot: no allocation here.
    lock(&s.hub.ends).push((id, how, buffer));
    // Pairs with the fence in `collect`: either this thread sees the flag,
    // or the dispatcher sees the end.
    fence(Ordering::SeqCst);
    if s.hub.wake_on_end.load(Ordering::Relaxed) {
        signals::wake();
    }
}

/// Start a detached thread with a `stack`-byte stack serving `slot`.
///
/// Straight through pthread_create rather than std::thread: std gives each
/// thread a signal stack for its overflow message (mmap, mprotect,
/// sigaltstack, and at exit munmap, whose TLB shoot-down interrupts every
/// other thread), a name, a join handle and a boxed closure, which cost a
/// short connection more than its echo. Overflow still hits the guard page
/// (SIGSEGV).
fn spawn(stack: usize, slot: &'static Slot) -> io::Result<()> {
    extern "C" fn run(arg: *mut c_void) -> *mut c_void {
        // SAFETY: `arg` is the `&'static Slot` given to pthread_create below.
        let slot = unsafe { &*arg.cast::<Slot>() };
        // A panic must not unwind into C; `serve` catches the echo's own.
        let _ = panic::catch_unwind(|| serve(slot));
        std::ptr::null_mut()
    }
    let mut attr = MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: `attr` is initialised by pthread_attr_init before use and
    // destroyed after; the slot outlives the thread (it is never freed).
    unsafe {
        let attr = attr.as_mut_ptr();
        libc::pthread_attr_init(attr);
        libc::pthread_attr_setstacksize(attr, stack.max(libc::PTHREAD_STACK_MIN));
        libc::pthread_attr_setdetachstate(attr, libc::PTHREAD_CREATE_DETACHED);
        let mut tid: libc::pthread_t = 0;
        let arg = std::ptr::from_ref(slot).cast_mut().cast();
        let r = libc::pthread_create(&mut tid, attr, run, arg);
        libc::pthread_attr_destroy(attr);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// An uninitialised echo buffer, or ENOMEM (never an abort) when memory is short.
fn try_buffer(len: usize) -> io::Result<Buffer> {
    let mut v: Vec<MaybeUninit<u8>> = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: the capacity is `len`, and MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    Ok(v.into_boxed_slice())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
