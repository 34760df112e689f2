//! Signals, turned into events for the dispatcher's `poll` loop.
//!
//! A handler does two async-signal-safe things: it sets a bit in a word of
//! shared memory and writes one byte to the wake-up pipe, whose read end sits
//! in the dispatcher's poll set. `poll` is never restarted after a signal,
//! so the dispatcher wakes at once; it drains the pipe *first* and only then
//! takes the pending bits, so no signal that arrives in between is lost.
//! The SIGCHLD handler lives in [`crate::reaper`] and ends with [`note`].
//!
//! SIGPIPE stays ignored (Rust's default): a write to a vanished client
//! returns EPIPE, which the echo handler treats as a normal end.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, Ordering};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

/// What a signal asked the dispatcher to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending(u32);

impl Pending {
    pub const TERMINATE: u32 = 1; // SIGTERM, SIGINT: graceful stop
    pub const QUIT: u32 = 2; // SIGQUIT: kill the children, exit now
    pub const STATUS: u32 = 4; // SIGUSR1: log a status line
    pub const CHILD: u32 = 8; // SIGCHLD: children ended

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
}

/// What handlers write. It lives in shared memory (mapped by `install`): a
/// handler's write in the dispatcher then leaves no copy-on-write page
/// behind in children (see `crate::scoreboard`).
#[derive(Default)]
struct Shared {
    /// Bits set by handlers, taken by the dispatcher.
    pending: AtomicU32,
    /// Set while the pipe holds an unread byte, so a burst of signals (one
    /// SIGCHLD per child) writes, and the dispatcher reads, one byte, not many.
    awake: AtomicBool,
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
/// Write end of the wake-up pipe (-1 until installed).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// The signals forkd handles itself, each with the event it stands for.
const HANDLED: [(Signal, u32); 4] = [
    (Signal::SIGTERM, Pending::TERMINATE),
    (Signal::SIGINT, Pending::TERMINATE),
    (Signal::SIGQUIT, Pending::QUIT),
    (Signal::SIGUSR1, Pending::STATUS),
];

/// The wake-up pipe. Dropping it does not uninstall the handlers: forkd
/// installs them once and keeps them until it exits.
pub struct Signals {
    read: OwnedFd,
    _write: OwnedFd,
}

impl Signals {
    /// Create the pipe and install the handlers for SIGTERM, SIGINT, SIGQUIT and SIGUSR1.
    pub fn install() -> io::Result<Signals> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // SAFETY: all-zero is a valid Shared (atomics).
        let shared = unsafe { crate::scoreboard::shared_zeroed::<Shared>(1)? };
        SHARED.store(&raw mut shared[0], Ordering::SeqCst);
        alternate_stack()?;
        WAKE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        // Whatever mask forkd was started with, it blocks nothing now; the
        // children inherit that empty mask, so they need not reset it.
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
        for (signal, bit) in HANDLED {
            // SAFETY: the action only does async-signal-safe work: an atomic
            // fetch_or and a write(2) to a non-blocking pipe (see `note`).
            unsafe { signal_hook::low_level::register(signal as i32, move || note(bit)) }?;
        }
        Ok(Signals {
            read,
            _write: write,
        })
    }

    /// Empty the pipe, then take every pending event (in that order: see the module docs).
    pub fn take(&self) -> Pending {
        match shared() {
            Some(shared) => shared.take(self.read.as_fd(), |_| {}),
            None => Pending::default(),
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

fn shared() -> Option<&'static Shared> {
    let ptr = SHARED.load(Ordering::SeqCst);
    // SAFETY: non-null only once `install` stored a pointer into a mapping
    // that is never unmapped.
    (!ptr.is_null()).then(|| unsafe { &*ptr })
}

/// Record `bit` and wake the dispatcher. Async-signal-safe.
pub fn note(bit: u32) {
    if let Some(shared) = shared() {
        shared.note(bit, WAKE_FD.load(Ordering::SeqCst));
    }
}

/// Wake the dispatcher's poll. Async-signal-safe; a full pipe already means "awake".
pub fn wake() {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if let Some(shared) = shared() {
        shared.wake(fd);
    }
}

/// The points inside [`Shared::take`] where another thread or a signal
/// handler may run; a test runs a wake-up at each in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TakeStep {
    BeforeDrain,
    AfterDrain,
    AfterClear,
}

impl Shared {
    /// Record `bit`, then wake the dispatcher through `fd`.
    fn note(&self, bit: u32, fd: RawFd) {
        self.pending.fetch_or(bit, Ordering::SeqCst);
        self.wake(fd);
    }

    /// Write a byte to the pipe unless one is known to be there already.
    fn wake(&self, fd: RawFd) {
        if fd >= 0 && !self.awake.swap(true, Ordering::SeqCst) {
            // SAFETY: write(2) is async-signal-safe; the buffer is a valid byte.
            // The pipe is non-blocking, so a full pipe returns EAGAIN at once.
            unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Empty the pipe, then clear `awake`, then take the pending bits.
    ///
    /// The order keeps `awake` true only while the pipe holds a byte (or a
    /// writer is about to write one). Clearing it first would let a wake-up
    /// between the clear and the read set it again and have its byte read
    /// here: the flag would stay set over an empty pipe, and every later
    /// wake-up would skip its write and leave `poll` asleep. A wake-up before
    /// the clear writes nothing, but its event is already recorded and is
    /// taken below (bits here; a thread's end by the collect that follows).
    fn take(&self, read: BorrowedFd<'_>, mut at: impl FnMut(TakeStep)) -> Pending {
        at(TakeStep::BeforeDrain);
        let mut buf = [0u8; 64];
        while let Ok(n) = nix::unistd::read(read, &mut buf) {
            if n < buf.len() {
                break;
            }
        }
        at(TakeStep::AfterDrain);
        self.awake.store(false, Ordering::SeqCst);
        at(TakeStep::AfterClear);
        Pending(self.pending.swap(0, Ordering::SeqCst))
    }
}

/// Bytes of the dispatcher's alternate signal stack.
const ALT_STACK: usize = 64 << 10;

/// Give the calling thread (the dispatcher) an alternate signal stack in
/// shared memory. The kernel writes each signal's frame (registers and
/// vector state, a few KiB) on the stack a handler runs on; on the ordinary
/// stack that dirties private pages below the dispatcher's frames, which
/// after every fork means page faults and copies. Handlers registered with
/// `SA_ONSTACK` (the SIGCHLD handler) run here instead. A child must never
/// use this stack: it disables it first thing (see [`reset_in_child`]).
fn alternate_stack() -> io::Result<()> {
    // SAFETY: all-zero bytes are valid MaybeUninit<u8>.
    let stack = unsafe { crate::scoreboard::shared_zeroed::<MaybeUninit<u8>>(ALT_STACK)? };
    let ss = libc::stack_t {
        ss_sp: stack.as_mut_ptr().cast(),
        ss_flags: 0,
        ss_size: stack.len(),
    };
    // SAFETY: `ss` describes memory that stays mapped until exit and that
    // nothing else uses; the previous stack (std's) is simply no longer used.
    if unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a freshly forked child: default dispositions for every signal the
/// dispatcher handles, and no alternate stack. The mask is already empty
/// (see `install`); SIGPIPE stays ignored.
///
/// A child's code (see `crate::child`): plain libc calls on constants, no
/// table of signals to read and no sigset to build, so it touches no page
/// beyond libc's sigaction and sigaltstack.
#[unsafe(link_section = ".text.hot.forkd_child")]
pub fn reset_in_child() {
    // SAFETY: an all-zero sigaction is SIG_DFL with no flags and an empty mask.
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    let reset = |signal: libc::c_int| {
        // SAFETY: installing SIG_DFL runs no code of ours in signal context.
        unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
    };
    // HANDLED's signals (checked by a test below), then SIGCHLD.
    reset(libc::SIGTERM);
    reset(libc::SIGINT);
    reset(libc::SIGQUIT);
    reset(libc::SIGUSR1);
    reset(libc::SIGCHLD);
    // The alternate stack is the dispatcher's, in memory it shares with
    // every child; any handler left (std's SIGSEGV one) runs on the
    // child's own stack instead.
    let off = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: libc::SS_DISABLE,
        ss_size: 0,
    };
    // SAFETY: disabling the alternate stack touches no memory of ours.
    unsafe { libc::sigaltstack(&off, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_resets_every_handled_signal() {
        // `reset_in_child` names its signals one by one; it must name these.
        let reset = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGUSR1];
        let handled: Vec<i32> = HANDLED.iter().map(|(s, _)| *s as i32).collect();
        assert_eq!(handled, reset);
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; timeout 0 never blocks.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_wake_up_during_take_is_never_lost() {
        // The dispatcher has been woken (one byte in the pipe, `awake` set) and
        // takes its events; an event arrives at each point of `take` in turn.
        for step in [
            TakeStep::BeforeDrain,
            TakeStep::AfterDrain,
            TakeStep::AfterClear,
        ] {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
            let w = write.as_raw_fd();
            let shared = Shared::default();
            let event = |bit: u32| shared.note(bit, w);
            event(Pending::STATUS);
            assert!(readable(read.as_fd()));

            let got = shared.take(read.as_fd(), |at| {
                if at == step {
                    event(Pending::TERMINATE);
                }
            });
            assert!(got.has(Pending::STATUS), "{step:?}: {got:?}");
            // The event that came mid-take is taken now, or wakes the next poll.
            assert!(
                got.has(Pending::TERMINATE) || readable(read.as_fd()),
                "{step:?}: event lost ({got:?}, pipe empty)"
            );
            // And a later event always wakes the next poll.
            event(Pending::QUIT);
            assert!(
                readable(read.as_fd()),
                "{step:?}: a later event left the pipe empty"
            );
            let next = shared.take(read.as_fd(), |_| {});
            assert!(next.has(Pending::QUIT), "{step:?}: {next:?}");
            assert!(
                got.has(Pending::TERMINATE) || next.has(Pending::TERMINATE),
                "{step:?}"
            );
            assert!(!readable(read.as_fd()), "{step:?}: pipe left readable");
        }
    }
}
