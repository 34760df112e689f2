//! Fork mode, the child's side: everything that runs in a connection's
//! process between `fork` and `_exit`.
//!
//! Signal handling needs nothing done here: the handler a child inherits
//! acts as each signal's default would in any process but the dispatcher,
//! SIGSEGV and SIGBUS are at their defaults since start, the mask is empty,
//! and the signal stack's pages are wiped (the child's own zero pages); see
//! [`crate::signals`]. (Resetting them here took five system calls per
//! connection.) In order: with `--die-with-parent` the kernel is asked to
//! end the child with its dispatcher; every inherited descriptor but the connection and stdio is
//! closed (listeners, wake-up pipe, syslog socket); the process is retitled;
//! the echo handler runs, keeping its byte count in the connection's
//! counter ([`crate::counters`]); and the child leaves with `_exit`, so it
//! never returns into dispatcher code nor runs its destructors or atexit
//! handlers. The exit status says how the connection ended
//! ([`crate::exit_code`]).
//!
//! The child shares nothing writable with the dispatcher but the byte
//! counters: the dispatcher's tables are not even mapped here (see
//! [`crate::memory`]).
//!
//! Every page a child touches costs it a page fault, and the pages it maps
//! are torn down again at its exit: on a loopback echo that is most of what
//! a connection costs beyond the fork itself. So the child touches as little
//! as it can. Whatever it writes it copies (fork shares the dispatcher's
//! pages copy-on-write), so it allocates nothing and writes no static: its
//! title comes formatted from the dispatcher, its name is a copy the
//! dispatcher made at start, and its echo buffer is memory the dispatcher
//! never touched. What that buys is held by the page-fault test in
//! `tests/static_build.rs`. (A linker section gathering the child's code
//! in one piece was tried and measured: no fault fewer, so it went.)

use std::ffi::CString;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use log::debug;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};

use crate::echo::{self, End};
use crate::exit_code;
use crate::title::{self, TitleArea};

/// Make a panic in a child end that child, at once: it must never unwind
/// out of [`serve`] into the dispatcher's code, which the child shares. The
/// hook runs before any unwinding; in the dispatcher (and in thread mode)
/// it only prints the message, as the default hook does.
pub fn exit_on_panic_in_children(dispatcher: Pid) {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        if nix::unistd::getpid() != dispatcher {
            exit(exit_code::PANIC);
        }
    }));
}

/// What a child needs to know, prepared once by the dispatcher.
#[derive(Clone, Debug)]
pub struct ChildSetup {
    pub die_with_parent: bool,
    pub dispatcher: Pid,
    pub title: Option<TitleArea>,
    /// The children's short name, `forkd-conn`. A copy on the dispatcher's
    /// heap rather than a literal: the kernel reads it from the child's
    /// memory, and the heap's pages are mapped in every child already,
    /// while a literal's page of read-only data would be one more fault.
    pub comm: CString,
    /// What the child writes to `/proc/self/oom_score_adj`, and the path
    /// (both on the heap, as `comm`). None if the dispatcher's own could not
    /// be read.
    pub oom: Option<(CString, Vec<u8>)>,
    /// The receive timeouts before and after the first byte (see [`echo::Watch`]).
    pub first_byte: Option<std::time::Duration>,
    pub idle: Option<std::time::Duration>,
}

/// How much more a connection's process is worth to the OOM killer than
/// the dispatcher: a child is always killed first, so memory pressure ends
/// a connection, never the service (PostgreSQL's backends do the same).
/// Raising one's own score needs no privilege.
pub const OOM_SCORE_ABOVE_DISPATCHER: i32 = 500;

impl ChildSetup {
    pub fn new(
        die_with_parent: bool,
        dispatcher: Pid,
        title: Option<TitleArea>,
        first_byte: Option<std::time::Duration>,
        idle: Option<std::time::Duration>,
    ) -> ChildSetup {
        let oom = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .map(|own| {
                let child = (own + OOM_SCORE_ABOVE_DISPATCHER).min(1000);
                (
                    c"/proc/self/oom_score_adj".to_owned(),
                    child.to_string().into_bytes(),
                )
            });
        ChildSetup {
            die_with_parent,
            dispatcher,
            title,
            comm: c"forkd-conn".to_owned(),
            oom,
            first_byte,
            idle,
        }
    }
}

/// Raise this process's OOM score (see [`OOM_SCORE_ABOVE_DISPATCHER`]):
/// once its connection proves long-lived ([`echo::Watch::on_long_lived`]:
/// it waited a second for its client), so every process that holds a
/// connection open for long is raised, while a short one pays nothing. (Raised right after the fork, it cost about 2 % of the
/// connections a second, measured with `forkd-load rate`.)
fn raise_oom_score(setup: &ChildSetup) {
    let Some((path, value)) = &setup.oom else {
        return;
    };
    // SAFETY: open/write/close on a NUL-terminated path and a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, value.as_ptr().cast(), value.len());
            libc::close(fd);
        }
    }
}

/// Serve one connection in this freshly forked child, then `_exit`.
///
/// `name` is the title the dispatcher prepared for this child; `buf` is the
/// dispatcher's untouched echo buffer (see `ForkModel`);
/// `bytes` is this connection's byte counter.
pub fn serve(
    conn: OwnedFd,
    peer: SocketAddr,
    name: &[u8],
    setup: &ChildSetup,
    buf: &mut [std::mem::MaybeUninit<u8>],
    bytes: &AtomicU64,
) -> ! {
    if setup.die_with_parent {
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        // The dispatcher may have died before the request took effect.
        if getppid() != setup.dispatcher {
            exit(exit_code::for_end(End::Reset));
        }
    }
    close_inherited(conn.as_raw_fd());
    title::set_comm(&setup.comm);
    if let Some(area) = &setup.title {
        area.set(name);
    }

    let mut sock = TcpStream::from(conn);
    let raise = || raise_oom_score(setup);
    let watch = echo::Watch {
        echoed: bytes,
        first_byte: setup.first_byte,
        idle: setup.idle,
        starts_with: echo::initial_timeout(setup.first_byte, true),
        on_long_lived: Some(&raise),
    };
    let outcome = echo::serve(&mut sock, buf, &watch);
    debug!(
        "conn {peer}: {}, {} bytes",
        outcome.end.describe(),
        outcome.bytes
    );
    exit(exit_code::for_end(outcome.end))
}

/// Leave the process at once: no destructors, no atexit handlers, no stdio flush.
fn exit(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process; nothing of the dispatcher's runs.
    unsafe { libc::_exit(code) }
}

/// The highest descriptor number this process can have open.
fn max_fd() -> i32 {
    // SAFETY: sysconf only reads a limit.
    let open_max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    i32::try_from(open_max).map_or(i32::MAX, |n| n.max(1024)) - 1
}

/// Close every descriptor above stderr except `keep`.
fn close_inherited(keep: i32) {
    let ranges = [(3, keep - 1), (keep + 1, i32::MAX)];
    for (lo, hi) in ranges {
        if lo > hi {
            continue;
        }
        // SAFETY: close_range(2) only closes descriptors; none in these ranges
        // is used by the child after this point (the logger never uses the
        // dispatcher's syslog connection in a child, and `keep` is kept).
        let r = unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32) };
        if r != 0 {
            // Kernels before 5.9: close what the dispatcher can have open
            // (both ends of each range included, as close_range's are).
            for fd in lo..=hi.min(max_fd()) {
                // SAFETY: as above.
                unsafe { libc::close(fd) };
            }
        }
    }
}
