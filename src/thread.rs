//! Thread mode: one thread per connection inside the dispatcher process,
//! running the same echo handler as fork mode.
//!
//! Each thread reports its end through a channel. It wakes the dispatcher
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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::socket::{Shutdown, shutdown};

use crate::dispatcher::{Collect, How, Model, Stop};
use crate::echo;
use crate::signals;

pub struct ThreadModel {
    /// Each slot's socket while its thread runs (-1: none).
    sockets: Arc<[Mutex<RawFd>]>,
    ends_tx: Sender<(u32, How)>,
    ends: Receiver<(u32, How)>,
    /// Whether an end must wake the dispatcher at once (see module docs).
    wake_on_end: Arc<AtomicBool>,
    next_id: u64,
    stack: usize,
    buffer: usize,
}

impl ThreadModel {
    /// For up to `max_conns` connections at once.
    pub fn new(stack: usize, buffer: usize, max_conns: usize) -> ThreadModel {
        let (ends_tx, ends) = channel();
        ThreadModel {
            sockets: (0..max_conns).map(|_| Mutex::new(-1)).collect(),
            ends_tx,
            ends,
            wake_on_end: Arc::new(AtomicBool::new(true)),
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

    fn id_label(&self) -> &'static str {
        "conn"
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
        *lock(&self.sockets[slot as usize]) = conn.as_raw_fd();
        let sockets = Arc::clone(&self.sockets);
        let ends = self.ends_tx.clone();
        let wake = Arc::clone(&self.wake_on_end);
        let buffer = self.buffer;
        let spawned = spawn(
            self.stack,
            Box::new(move || {
                let mut sock = TcpStream::from(conn);
                // Uninitialised heap memory: no syscall, and no page touched
                // before data arrives.
                let mut buf = Box::<[u8]>::new_uninit_slice(buffer);
                let outcome =
                    panic::catch_unwind(AssertUnwindSafe(|| echo::serve(&mut sock, &mut buf)))
                        .unwrap_or(echo::Outcome {
                            bytes: 0,
                            end: echo::End::Error(0),
                        });
                bytes.store(outcome.bytes, Ordering::Relaxed);
                {
                    let mut fd = lock(&sockets[slot as usize]);
                    *fd = -1;
                    drop(sock);
                }
                let _ = ends.send((slot, How::Returned(outcome.end)));
                // Pairs with the fence in `collect`: either this thread sees
                // the flag, or the dispatcher sees the end.
                fence(Ordering::SeqCst);
                if wake.load(Ordering::Relaxed) {
                    signals::wake();
                }
            }),
        );
        if let Err(e) = spawned {
            // The job, and with it the connection, was dropped.
            *lock(&self.sockets[slot as usize]) = -1;
            return Err(e);
        }
        Ok(id)
    }

    fn collect(&mut self, why: Collect, ended: &mut dyn FnMut(u32, How)) {
        // Ends are wanted at once when waiting for room, when each is logged,
        // and when systemd shows live counts (STATUS=).
        let urgent = why == Collect::NeedRoom
            || log::log_enabled!(log::Level::Info)
            || crate::systemd::notify_socket_set();
        self.wake_on_end.store(urgent, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        while let Ok((slot, how)) = self.ends.try_recv() {
            ended(slot, how);
        }
    }

    fn stop(&mut self, how: Stop, targets: &mut dyn Iterator<Item = (u32, u64)>) {
        let how = match how {
            Stop::Terminate => Shutdown::Read,
            Stop::Kill => Shutdown::Both,
        };
        for (slot, _) in targets {
            let fd = lock(&self.sockets[slot as usize]);
            if *fd >= 0 {
                // The thread cannot close the socket while we hold its lock.
                let _ = shutdown(*fd, how);
            }
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Start a detached thread with a `stack`-byte stack running `job`.
///
/// Straight through pthread_create rather than std::thread: std gives each
/// thread a signal stack for its overflow message (mmap, mprotect,
/// sigaltstack, and at exit munmap, whose TLB shoot-down interrupts every
/// other thread), a name and a join handle, which cost a short connection
/// more than its echo. Overflow still hits the guard page (SIGSEGV).
fn spawn(stack: usize, job: Job) -> io::Result<()> {
    extern "C" fn run(arg: *mut c_void) -> *mut c_void {
        // SAFETY: `arg` is the Box<Job> leaked by `spawn`, handed to exactly
        // this one thread.
        let job = unsafe { Box::from_raw(arg.cast::<Job>()) };
        // A panic must not unwind into C; the job catches its own.
        let _ = panic::catch_unwind(AssertUnwindSafe(job));
        std::ptr::null_mut()
    }
    let arg = Box::into_raw(Box::new(job));
    let mut attr = MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: `attr` is initialised by pthread_attr_init before use and
    // destroyed after; `run` takes ownership of `arg` only if the thread
    // starts, and otherwise it is reclaimed here.
    unsafe {
        let attr = attr.as_mut_ptr();
        libc::pthread_attr_init(attr);
        libc::pthread_attr_setstacksize(attr, stack.max(libc::PTHREAD_STACK_MIN));
        libc::pthread_attr_setdetachstate(attr, libc::PTHREAD_CREATE_DETACHED);
        let mut tid: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut tid, attr, run, arg.cast());
        libc::pthread_attr_destroy(attr);
        if r != 0 {
            drop(Box::from_raw(arg));
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
