//! Signals, turned into events for the dispatcher's `poll` loop.
//!
//! | signal | meaning |
//! |---|---|
//! | SIGTERM, SIGINT | graceful stop; a second one skips the grace period |
//! | SIGQUIT | kill every connection and exit now |
//! | SIGUSR1 | log the status line, whatever the log level |
//! | SIGHUP | log the status line and reconnect to syslog |
//! | SIGXCPU | the CPU-time limit is reached: graceful stop (SIGKILL follows at the hard limit) |
//! | SIGCHLD | reap (fork mode, see [`crate::reaper`]) |
//! | SIGUSR2 | binary upgrade: start the binary anew with the listening sockets, then drain (see [`crate::upgrade`]) |
//! | SIGALRM, SIGVTALRM, SIGPROF, SIGTRAP, SIGSTKFLT, SIGSYS, SIGXFSZ, SIGPWR, SIGIO, SIGRTMIN..SIGRTMAX | no meaning: ignored, and logged at most once a second |
//! | SIGTTIN, SIGTTOU | ignored quietly, so terminal I/O never stops forkd |
//! | SIGPIPE | ignored (Rust's default): a vanished client is EPIPE, a normal end |
//! | SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT | a real fault: the default, forkd dies (and systemd restarts it) |
//! | SIGTSTP, SIGSTOP, SIGCONT, SIGKILL | the defaults |
//!
//! One handler, `on_signal`, serves them all. It does only
//! async-signal-safe things: counts the signal in a word of memory, reaps
//! (SIGCHLD, `--reap handler`), and writes one byte to the wake-up pipe,
//! whose read end sits in the dispatcher's poll set. `poll` is never
//! restarted after a signal, so the dispatcher wakes at once; it drains the
//! pipe *first* and only then takes the pending events, so no signal that
//! arrives in between is lost.
//!
//! Everything the handler writes lives in memory no child inherits
//! ([`crate::memory::private`]), and the alternate stack it runs on is
//! wiped in children: a connection's process can neither forge an event nor
//! write into the dispatcher's signal frames. A
//! child also inherits the handler itself; the handler sees it is not in
//! the dispatcher (its pid differs) and does what the signal's default
//! would, so a child behaves as if forkd had installed nothing, without
//! paying a `sigaction` per signal at every fork.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

/// What signals asked the dispatcher to do since it last looked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    bits: u32,
    /// SIGTERM and SIGINT received, each counted (a second skips the grace).
    pub terminate: u32,
    /// Bit `n` set: signal `n` came and was ignored.
    ignored: u64,
}

impl Pending {
    pub const QUIT: u32 = 1; // SIGQUIT: kill the connections, exit now
    pub const STATUS: u32 = 2; // SIGUSR1: log a status line
    pub const RELOAD: u32 = 4; // SIGHUP: status line, reconnect to syslog
    pub const CHILD: u32 = 8; // SIGCHLD: children ended
    pub const CPU_LIMIT: u32 = 16; // SIGXCPU: graceful stop
    pub const UPGRADE: u32 = 32; // SIGUSR2: binary upgrade

    pub fn has(self, bit: u32) -> bool {
        self.bits & bit != 0
    }

    /// The numbers of the signals ignored.
    pub fn ignored(self) -> impl Iterator<Item = i32> {
        (1..64).filter(move |n| self.ignored & (1 << n) != 0)
    }
}

/// What a signal means to forkd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meaning {
    /// Counted as a stop request.
    Terminate,
    /// Sets this bit of [`Pending`].
    Event(u32),
    /// No meaning: recorded, so the dispatcher can say it ignored it.
    Ignore,
    /// No meaning, and not worth a line (terminal job control).
    Quiet,
}

/// Every signal forkd installs its handler for, with what it means.
const HANDLED: [(Signal, Meaning); 19] = [
    (Signal::SIGTERM, Meaning::Terminate),
    (Signal::SIGINT, Meaning::Terminate),
    (Signal::SIGQUIT, Meaning::Event(Pending::QUIT)),
    (Signal::SIGUSR1, Meaning::Event(Pending::STATUS)),
    (Signal::SIGHUP, Meaning::Event(Pending::RELOAD)),
    (Signal::SIGXCPU, Meaning::Event(Pending::CPU_LIMIT)),
    (Signal::SIGUSR2, Meaning::Event(Pending::UPGRADE)),
    (Signal::SIGALRM, Meaning::Ignore),
    (Signal::SIGVTALRM, Meaning::Ignore),
    (Signal::SIGPROF, Meaning::Ignore),
    (Signal::SIGTRAP, Meaning::Ignore),
    (Signal::SIGSTKFLT, Meaning::Ignore),
    (Signal::SIGSYS, Meaning::Ignore),
    (Signal::SIGXFSZ, Meaning::Ignore),
    (Signal::SIGPWR, Meaning::Ignore),
    (Signal::SIGIO, Meaning::Ignore),
    // Caught rather than ignored (SIG_IGN would pass on to every child, and
    // resetting it there costs a system call per connection). A background
    // write to a terminal is then refused with EINTR instead of stopping
    // forkd: the log line is dropped and counted.
    (Signal::SIGTTIN, Meaning::Quiet),
    (Signal::SIGTTOU, Meaning::Quiet),
    // SIGCHLD last: only fork mode handles it (see `install`).
    (Signal::SIGCHLD, Meaning::Event(Pending::CHILD)),
];

/// The runtime's fault handlers, put back to the defaults at start, so
/// that a child inherits the defaults and need not reset them (Rust's
/// handler would swallow a first SIGSEGV sent by `kill`, and only adds a
/// message to a stack overflow, which kills the process either way).
const DEFAULTS: [Signal; 2] = [Signal::SIGSEGV, Signal::SIGBUS];

/// What the handler writes.
#[derive(Default)]
struct State {
    bits: AtomicU32,
    terminate: AtomicU32,
    ignored: AtomicU64,
    /// Set while the pipe holds an unread byte, so a burst of signals (one
    /// SIGCHLD per child) writes, and the dispatcher reads, one byte, not many.
    awake: AtomicBool,
}

static STATE: AtomicPtr<State> = AtomicPtr::new(std::ptr::null_mut());
/// The wake-up pipe's ends (-1 until installed). Never closed: a late
/// handler or thread can never write into a descriptor that was reused.
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// The dispatcher's pid: the handler running in any other process is a child's.
static DISPATCHER: AtomicI32 = AtomicI32::new(0);
/// `--reap handler`: the SIGCHLD handler reaps.
static REAP_IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// The read end of the wake-up pipe, for the dispatcher's poll set.
#[derive(Clone, Copy, Debug)]
pub struct Signals {
    read: RawFd,
}

/// Which children forkd has, for [`install`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Children {
    /// No child processes (thread mode): SIGCHLD keeps its default.
    None,
    /// Children reaped by the dispatcher itself (`--reap lazy|off`).
    Woken,
    /// Children reaped in the SIGCHLD handler (`--reap handler`).
    ReapInHandler,
}

/// Create the pipe and install the handlers (once, for the life of the process).
pub fn install(children: Children) -> io::Result<Signals> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // SAFETY: all-zero is a valid State (atomics).
    let state = unsafe { crate::memory::private::<State>(1)? };
    STATE.store(&raw mut state[0], Ordering::SeqCst);
    alternate_stack()?;
    DISPATCHER.store(nix::unistd::getpid().as_raw(), Ordering::SeqCst);
    REAP_IN_HANDLER.store(children == Children::ReapInHandler, Ordering::SeqCst);
    let read = read.into_raw_fd();
    WAKE_READ.store(read, Ordering::SeqCst);
    WAKE_WRITE.store(write.into_raw_fd(), Ordering::SeqCst);
    // Whatever mask forkd was started with, it blocks nothing now; the
    // children inherit that empty mask, so they need not reset it.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    let handled = match children {
        Children::None => &HANDLED[..HANDLED.len() - 1],
        _ => &HANDLED[..],
    };
    let rt = libc::SIGRTMIN()..=libc::SIGRTMAX();
    for signal in handled.iter().map(|(s, _)| *s as i32).chain(rt) {
        catch(signal)?;
    }
    for signal in DEFAULTS {
        // SAFETY: SIG_DFL runs no code.
        unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) }?;
    }
    Ok(Signals { read })
}

fn catch(signal: i32) -> io::Result<()> {
    // SAFETY: all-zero is a valid sigaction to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_signal as *const () as usize;
    // ONSTACK: on the dispatcher's private alternate stack (see
    // `alternate_stack`). NOCLDSTOP: only exits matter. No SA_RESTART: the
    // dispatcher only ever sleeps in poll, which is never restarted anyway.
    action.sa_flags = libc::SA_ONSTACK | libc::SA_NOCLDSTOP;
    // SAFETY: `on_signal` is async-signal-safe (see there), and everything
    // it touches was set up above, before the first handler was installed.
    if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The one handler. Async-signal-safe: atomics, `getpid`, `waitpid`
/// (through the reaper), `write` to a non-blocking pipe, and in a child
/// `sigaction` and `raise`. errno is put back if a call changed it.
extern "C" fn on_signal(signal: libc::c_int) {
    let saved = nix::errno::Errno::last_raw();
    // SAFETY: getpid(2) is async-signal-safe.
    if unsafe { libc::getpid() } != DISPATCHER.load(Ordering::Relaxed) {
        // A connection's process: act as the default would.
        as_default(signal);
    } else {
        if signal == libc::SIGCHLD && REAP_IN_HANDLER.load(Ordering::Relaxed) {
            crate::reaper::reap_into_ring();
        }
        if let Some(state) = state()
            && state.record(signal)
        {
            state.wake(WAKE_WRITE.load(Ordering::Relaxed));
        }
    }
    if nix::errno::Errno::last_raw() != saved {
        nix::errno::Errno::set_raw(saved);
    }
}

/// Put `signal`'s default action back and send it again: delivered when the
/// handler returns (the signal is blocked while its handler runs).
fn as_default(signal: libc::c_int) {
    // SAFETY: an all-zero sigaction is SIG_DFL with no flags and an empty mask.
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: sigaction(2) and raise(3) are async-signal-safe.
    unsafe {
        libc::sigaction(signal, &default, std::ptr::null_mut());
        libc::raise(signal);
    }
}

fn meaning(signal: i32) -> Meaning {
    HANDLED
        .iter()
        .find(|(s, _)| *s as i32 == signal)
        .map_or(Meaning::Ignore, |(_, m)| *m)
}

impl Signals {
    /// Empty the pipe, then take every pending event (in that order: see the module docs).
    pub fn take(&self) -> Pending {
        match state() {
            // SAFETY: the pipe's read end is never closed.
            Some(state) => state.take(unsafe { BorrowedFd::borrow_raw(self.read) }, |_| {}),
            None => Pending::default(),
        }
    }

    /// For the poll set.
    pub fn fd(&self) -> RawFd {
        self.read
    }
}

fn state() -> Option<&'static State> {
    let ptr = STATE.load(Ordering::Relaxed);
    // SAFETY: non-null only once `install` stored a pointer into a mapping
    // that is never unmapped.
    (!ptr.is_null()).then(|| unsafe { &*ptr })
}

/// Wake the dispatcher's poll (a thread-mode connection's end).
/// Async-signal-safe; a full pipe already means "awake".
pub fn wake() {
    if let Some(state) = state() {
        state.wake(WAKE_WRITE.load(Ordering::Relaxed));
    }
}

/// The points inside [`State::take`] where another thread or a signal
/// handler may run; a test runs a wake-up at each in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TakeStep {
    BeforeDrain,
    AfterDrain,
    AfterClear,
}

impl State {
    /// Count `signal` by its meaning; false if it means nothing worth a wake-up.
    fn record(&self, signal: i32) -> bool {
        match meaning(signal) {
            Meaning::Terminate => {
                self.terminate.fetch_add(1, Ordering::SeqCst);
            }
            Meaning::Event(bit) => {
                self.bits.fetch_or(bit, Ordering::SeqCst);
            }
            Meaning::Ignore => {
                if (1..64).contains(&signal) {
                    self.ignored.fetch_or(1 << signal, Ordering::SeqCst);
                }
            }
            Meaning::Quiet => return false,
        }
        true
    }

    /// Write a byte to the pipe unless one is known to be there already.
    fn wake(&self, fd: RawFd) {
        if fd >= 0 && !self.awake.swap(true, Ordering::SeqCst) {
            // SAFETY: write(2) is async-signal-safe; the buffer is a valid byte.
            // The pipe is non-blocking, so a full pipe returns EAGAIN at once.
            unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Empty the pipe, then clear `awake`, then take the pending events.
    ///
    /// The order keeps `awake` true only while the pipe holds a byte (or a
    /// writer is about to write one). Clearing it first would let a wake-up
    /// between the clear and the read set it again and have its byte read
    /// here: the flag would stay set over an empty pipe, and every later
    /// wake-up would skip its write and leave `poll` asleep. A wake-up before
    /// the clear writes nothing, but its event is already recorded and is
    /// taken below (events here; a thread's end by the collect that follows).
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
        Pending {
            bits: self.bits.swap(0, Ordering::SeqCst),
            terminate: self.terminate.swap(0, Ordering::SeqCst),
            ignored: self.ignored.swap(0, Ordering::SeqCst),
        }
    }
}

/// A signal's name: `SIGALRM`, `SIGRTMIN+3`.
pub fn name(signal: i32) -> String {
    match Signal::try_from(signal) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if signal >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", signal - libc::SIGRTMIN()),
        Err(_) => format!("signal {signal}"),
    }
}

/// Bytes of the dispatcher's alternate signal stack.
const ALT_STACK: usize = 64 << 10;

/// Give the calling thread (the dispatcher) an alternate signal stack that
/// no child can reach. The kernel writes each signal's frame (registers and
/// vector state, a few KiB) on the stack a handler runs on; on the ordinary
/// stack that dirties pages below the dispatcher's frames, which after every
/// fork means page faults and copies, and a frame there could be read and
/// written by the children. The mapping is wiped in children
/// ([`crate::memory::wiped_in_children`]): a child sees fresh zero pages
/// at those addresses, never the dispatcher's. (Not mapped in children at
/// all, as the tables are, a signal that reached a child in the moment
/// between its fork and [`reset_in_child`] found no stack and killed it
/// with SIGSEGV: seen in a test that signalled a prefork worker at once.)
fn alternate_stack() -> io::Result<()> {
    // SAFETY: all-zero bytes are valid MaybeUninit<u8>.
    let stack = unsafe { crate::memory::wiped_in_children::<MaybeUninit<u8>>(ALT_STACK)? };
    let ss = libc::stack_t {
        ss_sp: stack.as_mut_ptr().cast(),
        ss_flags: 0,
        ss_size: stack.len(),
    };
    let mut old = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: 0,
        ss_size: 0,
    };
    // SAFETY: `ss` describes memory that stays mapped until exit and that
    // nothing else uses; the previous stack (std's) is no longer used.
    if unsafe { libc::sigaltstack(&ss, &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    keep_from_children(&old);
    Ok(())
}

/// The alternate stack std made for the main thread at start (and its
/// guard page below it) is used by no one once ours replaces it, least of
/// all by a child: mark both mappings `MADV_DONTFORK`, so that fork does
/// not copy them into every connection's process. (Left mapped: std unmaps
/// it itself at exit.) Each mapping fork copies costs the fork and the
/// child's exit time: measured, about 2 µs of CPU per connection (README,
/// "What it took").
fn keep_from_children(old: &libc::stack_t) {
    if old.ss_sp.is_null() || old.ss_flags & libc::SS_DISABLE != 0 || old.ss_size == 0 {
        return;
    }
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as usize;
    let start = old.ss_sp as usize;
    if !start.is_multiple_of(page) || start < page {
        return;
    }
    for (at, len) in [(start - page, page), (start, old.ss_size)] {
        // SAFETY: madvise(MADV_DONTFORK) changes only what fork copies; it
        // neither unmaps nor changes the memory, and fails harmlessly on a
        // range that is not mapped.
        unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_DONTFORK) };
    }
}

/// Run `f` with SIGCHLD blocked, so the handler cannot reap meanwhile
/// (the dispatcher reaping itself, or signalling pids that must not be
/// reaped and reused under it).
pub fn without_sigchld<T>(f: impl FnOnce() -> T) -> T {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    let mut old = SigSet::empty();
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old));
    let out = f();
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn every_signal_has_one_meaning() {
        let mut seen = std::collections::HashSet::new();
        for (s, _) in HANDLED {
            assert!(seen.insert(s), "{s} twice");
            assert!(!DEFAULTS.contains(&s));
        }
        assert_eq!(meaning(libc::SIGTERM), Meaning::Terminate);
        assert_eq!(meaning(libc::SIGRTMIN() + 1), Meaning::Ignore);
        assert_eq!(name(libc::SIGRTMIN() + 1), "SIGRTMIN+1");
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
    fn two_stop_signals_are_two() {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        let state = State::default();
        for _ in 0..2 {
            state.record(libc::SIGTERM);
            state.wake(write.as_raw_fd());
        }
        let got = state.take(std::os::fd::AsFd::as_fd(&read), |_| {});
        assert_eq!(got.terminate, 2);
    }

    #[test]
    fn a_wake_up_during_take_is_never_lost() {
        // The dispatcher has been woken (one byte in the pipe, `awake` set) and
        // takes its events; an event arrives at each point of `take` in turn.
        use std::os::fd::AsFd;
        for step in [
            TakeStep::BeforeDrain,
            TakeStep::AfterDrain,
            TakeStep::AfterClear,
        ] {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
            let w = write.as_raw_fd();
            let state = State::default();
            let event = |signal: i32| {
                state.record(signal);
                state.wake(w);
            };
            event(libc::SIGUSR1);
            assert!(readable(read.as_fd()));

            let got = state.take(read.as_fd(), |at| {
                if at == step {
                    event(libc::SIGHUP);
                }
            });
            assert!(got.has(Pending::STATUS), "{step:?}: {got:?}");
            // The event that came mid-take is taken now, or wakes the next poll.
            assert!(
                got.has(Pending::RELOAD) || readable(read.as_fd()),
                "{step:?}: event lost ({got:?}, pipe empty)"
            );
            // And a later event always wakes the next poll.
            event(libc::SIGQUIT);
            assert!(
                readable(read.as_fd()),
                "{step:?}: a later event left the pipe empty"
            );
            let next = state.take(read.as_fd(), |_| {});
            assert!(next.has(Pending::QUIT), "{step:?}: {next:?}");
            assert!(
                got.has(Pending::RELOAD) || next.has(Pending::RELOAD),
                "{step:?}"
            );
            assert!(!readable(read.as_fd()), "{step:?}: pipe left readable");
        }
    }
}
