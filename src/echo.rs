//! The echo handler (RFC 862, TCP): every byte received is sent back
//! unchanged, in order, until the client closes its side; then the rest is
//! sent and the connection closed.
//!
//! Every concurrency model runs one [`Session`] per connection: fork and
//! thread mode through [`serve`], which drives it over a blocking socket,
//! and event mode (`crate::event`) on readiness over a non-blocking one.
//! Nothing here knows whether it runs in a child process, a thread or an
//! event loop. Memory is bounded by the one buffer the caller lends,
//! whatever the length of the stream. A half-close by the client is
//! honoured: its FIN ends reading, and everything read before it still
//! goes back.
//!
//! In [`serve`] the idle timeout is the socket's SO_RCVTIMEO and
//! SO_SNDTIMEO (set on the listener, whose accepted sockets inherit them):
//! a read that waits that long for a byte, or a write that cannot hand the
//! kernel a single byte for that long (a client that stopped reading), ends
//! the connection. Any progress starts the clock again. The event loop
//! keeps the same rule with timers ([`Session::moved`] tells it progress).

use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client closed its side and got every byte back.
    Closed,
    /// Any other socket error (errno).
    Error(i32),
    /// The client reset the connection or closed it before reading its echo
    /// (ECONNRESET, EPIPE): a normal end, not an error.
    Reset,
    /// No progress in either direction for the idle timeout.
    IdleTimeout,
    /// Nothing at all came within the first-byte timeout.
    Silent,
}

impl End {
    pub fn describe(self) -> &'static str {
        match self {
            End::Closed => "closed by client",
            End::Error(_) => "socket error",
            End::Reset => "reset by client",
            End::IdleTimeout => "idle timeout",
            End::Silent => "sent nothing (first-byte timeout)",
        }
    }

    /// An ordinary end (a client's close or reset, a timeout), not trouble.
    pub fn is_normal(self) -> bool {
        !matches!(self, End::Error(_))
    }
}

/// The result of one echo session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes sent back to the client (equal to bytes received unless the end was abnormal).
    pub bytes: u64,
    pub end: End,
}

/// What the echo handler reports and watches for as it runs.
pub struct Watch<'a> {
    /// Kept at the bytes sent back so far.
    pub echoed: &'a AtomicU64,
    /// The receive timeout until the first byte comes
    /// (`--first-byte-timeout`) and after it (`--idle-timeout`); None: wait
    /// for ever.
    pub first_byte: Option<Duration>,
    pub idle: Option<Duration>,
    /// The receive timeout the socket has when the handler starts (set on
    /// the listener, whose sockets inherit it: see [`initial_timeout`]).
    pub starts_with: Option<Duration>,
    /// Called once, when the connection proves long-lived: it has waited
    /// [`PATIENCE`] at a stretch for its client. Fork mode raises the
    /// process's OOM score there (see `crate::child`). A short connection
    /// never calls it, and pays nothing for it.
    pub on_long_lived: Option<&'a dyn Fn()>,
}

/// See [`Watch::on_long_lived`]. With the hook, a socket starts with a
/// receive timeout of at most this; when it expires, the hook runs and the
/// wait goes on for the whole timeout (so a timeout can end up to this much
/// later than set).
pub const PATIENCE: Duration = Duration::from_secs(1);

/// The receive timeout a socket should start with (the listener's): the
/// first-byte timeout, or with a long-lived hook at most [`PATIENCE`].
pub fn initial_timeout(first_byte: Option<Duration>, hooked: bool) -> Option<Duration> {
    match (hooked, first_byte) {
        (false, t) => t,
        (true, None) => Some(PATIENCE),
        (true, Some(t)) => Some(t.min(PATIENCE)),
    }
}

impl<'a> Watch<'a> {
    /// Count into `echoed`; the socket's timeouts never change.
    pub fn counting(echoed: &'a AtomicU64) -> Watch<'a> {
        Watch {
            echoed,
            first_byte: None,
            idle: None,
            starts_with: None,
            on_long_lived: None,
        }
    }
}

/// Which way a [`Session`] waits for its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// For the client to send (a receive would block, or timed out).
    Read,
    /// For the client to take its echo (a send would block, or timed out).
    Write,
}

/// What one [`Session::advance`] came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A chunk was received and all of it sent back (or the rest of one held
    /// back was sent): call again.
    Echoed,
    /// The socket would block (a blocking socket: its timeout expired).
    Wait(Want),
    /// The connection is over.
    Done(End),
}

/// One connection's echo as a small state machine, the same for every
/// model: the blocking ones ([`serve`]) drive it in a loop on a blocking
/// socket, the event loop (`crate::event`) on readiness over a
/// non-blocking one. Only [`Session::advance`] moves bytes, so what is
/// echoed, how a half-close and each error end a connection, and what is
/// counted cannot drift apart between models.
///
/// The rule: a chunk is read only when every byte of the last one went
/// back. A client that does not read its echo is therefore not read from
/// either (backpressure): it costs at most one chunk, whatever it sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Bytes sent back so far.
    bytes: u64,
    /// Bytes received so far.
    received: u64,
    /// The chunk being sent back: `buf[from..to]` of the caller's buffer.
    from: usize,
    to: usize,
}

impl Session {
    pub fn new() -> Session {
        Session::default()
    }

    /// Bytes sent back so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Has any byte come from the client?
    pub fn received(&self) -> bool {
        self.received > 0
    }

    /// Bytes moved either way so far: it changes exactly when the connection
    /// made progress (for idle timers).
    pub fn moved(&self) -> u64 {
        self.bytes + self.received
    }

    /// The bytes received and not yet sent back, as a range of the buffer
    /// last given to [`Session::advance`].
    pub fn pending(&self) -> std::ops::Range<usize> {
        self.from..self.to
    }

    /// The pending bytes now sit at the start of another buffer (the event
    /// loop moves them out of its shared one into the connection's own).
    pub fn moved_pending_to_start(&mut self) {
        self.to -= self.from;
        self.from = 0;
    }

    /// How a connection that timed out waiting for its client ends.
    pub fn timed_out(&self) -> End {
        if self.received() {
            End::IdleTimeout
        } else {
            End::Silent
        }
    }

    /// The result so far, ended by `end`.
    pub fn outcome(&self, end: End) -> Outcome {
        Outcome {
            bytes: self.bytes,
            end,
        }
    }

    /// Send back what is pending; if nothing is, receive one chunk (with
    /// `recv_flags`) into `buf` and send it back. Returns at the first
    /// send or receive that would block, at the end, or when a chunk is
    /// wholly sent. `buf` must hold the pending bytes, if any, at
    /// [`Session::pending`]; it need not be initialised otherwise.
    ///
    /// Always inlined, and errors read as raw errno values: a forked child
    /// pays a page fault for each page of code it runs first, and this keeps
    /// fork mode's path as compact as before the state machine
    /// (`tests/static_build.rs` holds the budget).
    #[inline(always)]
    pub fn advance(
        &mut self,
        fd: RawFd,
        buf: &mut [MaybeUninit<u8>],
        recv_flags: libc::c_int,
        echoed: &AtomicU64,
    ) -> Step {
        if self.from == self.to {
            loop {
                // SAFETY: recv(2) writes at most `buf.len()` bytes into
                // `buf`, which is valid for writes of that length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), recv_flags) };
                if n > 0 {
                    self.received += n as u64;
                    (self.from, self.to) = (0, n as usize);
                    break;
                }
                if n == 0 {
                    // The client's FIN, and every byte went back. Our FIN
                    // follows when the caller closes the socket.
                    return Step::Done(End::Closed);
                }
                match Errno::last_raw() {
                    libc::EINTR => continue,
                    libc::EAGAIN => return Step::Wait(Want::Read),
                    e => return Step::Done(self.classify_errno(e)),
                }
            }
        }
        while self.from < self.to {
            // SAFETY: `buf[from..to]` was initialised by the kernel (a recv
            // into this buffer, or a copy of such bytes).
            let data = unsafe {
                std::slice::from_raw_parts(
                    buf[self.from..].as_ptr().cast::<u8>(),
                    self.to - self.from,
                )
            };
            // SAFETY: send(2) reads at most `data.len()` bytes of `data`.
            let k = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
            if k > 0 {
                self.from += k as usize;
                self.bytes += k as u64;
                echoed.store(self.bytes, Ordering::Relaxed);
                continue;
            }
            if k == 0 {
                return Step::Done(End::Reset);
            }
            match Errno::last_raw() {
                libc::EINTR => continue,
                libc::EAGAIN => return Step::Wait(Want::Write),
                e => return Step::Done(self.classify_errno(e)),
            }
        }
        (self.from, self.to) = (0, 0);
        Step::Echoed
    }

    /// How an error (errno) on the socket ends the connection.
    fn classify_errno(&self, errno: i32) -> End {
        match errno {
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => End::Reset,
            // SO_RCVTIMEO / SO_SNDTIMEO expired (EAGAIN is a Wait), or keepalive.
            libc::ETIMEDOUT if self.received() => End::IdleTimeout,
            libc::ETIMEDOUT => End::Silent,
            e => End::Error(e),
        }
    }
}

/// Echo everything on `sock` back to it until the client closes, using
/// `buf`, and report as `watch` asks.
///
/// The buffer need not be initialised: only bytes the kernel wrote into it
/// are ever read, so no page of it is touched before data arrives.
///
/// The long-lived hook costs a short connection nothing: its socket comes
/// with the short timeout from the listener, and only a wait that runs
/// into it (a second of silence) sets another. Raising the OOM score at
/// every fork cost three system calls into `/proc` (about 2 % of the
/// connections a second, `forkd-load rate`); a non-blocking receive and a
/// `setsockopt` before each first wait still cost fork mode measurably.
pub fn serve(sock: &mut TcpStream, buf: &mut [MaybeUninit<u8>], watch: &Watch<'_>) -> Outcome {
    let fd = sock.as_raw_fd();
    let mut session = Session::new();
    let mut hook = watch.on_long_lived;
    // The receive timeout the socket has now: set only when it must change.
    let mut timeout = watch.starts_with;
    loop {
        let real = if session.received() {
            watch.idle
        } else {
            watch.first_byte
        };
        if hook.is_none() {
            set_receive_timeout(sock, &mut timeout, real);
        }
        match session.advance(fd, buf, 0, watch.echoed) {
            Step::Echoed => {}
            Step::Done(end) => return session.outcome(end),
            // SO_SNDTIMEO expired: the client took nothing for the idle timeout.
            Step::Wait(Want::Write) => return session.outcome(End::IdleTimeout),
            Step::Wait(Want::Read) if hook.is_some() => {
                // The short timeout ran out.
                let waited = timeout.unwrap_or(PATIENCE);
                if waited >= PATIENCE
                    && let Some(f) = hook.take()
                {
                    f();
                }
                if real.is_none_or(|t| t > waited) {
                    // Wait on, for the whole timeout.
                    set_receive_timeout(sock, &mut timeout, real);
                    continue;
                }
                return session.outcome(session.timed_out());
            }
            // SO_RCVTIMEO expired.
            Step::Wait(Want::Read) => return session.outcome(session.timed_out()),
        }
    }
}

/// Give `sock` the receive timeout `want` (None: none), unless `now` says
/// it has it already; straight through setsockopt(2), which touches fewer
/// pages of a child's code than std's wrapper.
fn set_receive_timeout(sock: &TcpStream, now: &mut Option<Duration>, want: Option<Duration>) {
    if *now == want {
        return;
    }
    *now = want;
    let d = want.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt(2) reads `size_of::<timeval>()` bytes from `tv`.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn echoes_and_honours_half_close() {
        let (mut client, mut server) = pair();
        let echoed = std::sync::Arc::new(AtomicU64::new(0));
        let count = echoed.clone();
        let t = std::thread::spawn(move || {
            let watch = Watch::counting(&count);
            serve(&mut server, &mut [MaybeUninit::uninit(); 7], &watch)
        });
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        client.write_all(&data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(
            t.join().unwrap(),
            Outcome {
                bytes: 100_000,
                end: End::Closed
            }
        );
        assert_eq!(echoed.load(Ordering::Relaxed), 100_000);
    }

    #[test]
    fn silent_client_times_out() {
        let (_client, mut server) = pair();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let out = serve(
            &mut server,
            &mut [MaybeUninit::uninit(); 64],
            &Watch::counting(&AtomicU64::new(0)),
        );
        assert_eq!(out.end, End::Silent, "nothing sent: silent, not idle");
    }

    /// Run `client` against `serve` with a long-lived hook; how many times did it run?
    fn hook_calls(client: impl FnOnce(&mut TcpStream) + Send + 'static) -> (usize, Outcome) {
        let (mut c, mut server) = pair();
        let t = std::thread::spawn(move || client(&mut c));
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let count = AtomicU64::new(0);
        let hook = || {
            calls.fetch_add(1, Ordering::Relaxed);
        };
        let first = Some(Duration::from_secs(5));
        let starts_with = initial_timeout(first, true);
        server.set_read_timeout(starts_with).unwrap();
        let watch = Watch {
            first_byte: first,
            idle: Some(Duration::from_secs(5)),
            starts_with,
            on_long_lived: Some(&hook),
            ..Watch::counting(&count)
        };
        let out = serve(&mut server, &mut [MaybeUninit::uninit(); 64], &watch);
        t.join().unwrap();
        (calls.load(Ordering::Relaxed), out)
    }

    fn exchange(c: &mut TcpStream, msg: &[u8]) {
        c.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn a_short_connection_is_not_long_lived() {
        let (calls, out) = hook_calls(|c| {
            exchange(c, b"hello");
            c.shutdown(Shutdown::Write).unwrap();
        });
        assert_eq!((calls, out.end, out.bytes), (0, End::Closed, 5));
    }

    #[test]
    fn a_connection_that_waits_a_second_is_long_lived() {
        let (calls, out) = hook_calls(|c| {
            exchange(c, b"hello");
            std::thread::sleep(PATIENCE + Duration::from_millis(300));
            exchange(c, b"again");
            c.shutdown(Shutdown::Write).unwrap();
        });
        assert_eq!((calls, out.end, out.bytes), (1, End::Closed, 10));
    }

    #[test]
    fn a_session_on_a_non_blocking_socket_waits_to_write_and_goes_on() {
        let (mut client, server) = pair();
        server.set_nonblocking(true).unwrap();
        let fd = server.as_raw_fd();
        let echoed = AtomicU64::new(0);
        let mut s = Session::new();
        let mut buf = vec![MaybeUninit::uninit(); 64 << 10];
        assert_eq!(s.advance(fd, &mut buf, 0, &echoed), Step::Wait(Want::Read));
        assert_eq!(s.timed_out(), End::Silent);
        // The client sends without reading until the server's sends block.
        client.set_nonblocking(true).unwrap();
        let chunk = vec![9u8; 64 << 10];
        let mut sent = 0usize;
        let step = loop {
            if let Ok(n) = client.write(&chunk) {
                sent += n;
            }
            match s.advance(fd, &mut buf, 0, &echoed) {
                Step::Echoed | Step::Wait(Want::Read) => continue,
                step => break step,
            }
        };
        assert_eq!(step, Step::Wait(Want::Write));
        let held = s.pending();
        assert!(!held.is_empty());
        // The rest moves to a buffer of its own, as the event loop does it.
        let mut own: Vec<MaybeUninit<u8>> = buf[held.clone()].to_vec();
        s.moved_pending_to_start();
        assert_eq!(s.pending(), 0..held.len());
        assert_eq!(s.timed_out(), End::IdleTimeout);
        // Once the client reads, everything comes back and the session goes on.
        client.set_nonblocking(false).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let reader = std::thread::spawn(move || {
            let mut back = Vec::new();
            client.read_to_end(&mut back).unwrap();
            back
        });
        let end = loop {
            let step = match s.pending().is_empty() {
                false => s.advance(fd, &mut own, 0, &echoed),
                true => s.advance(fd, &mut buf, 0, &echoed),
            };
            match step {
                Step::Done(end) => break end,
                Step::Wait(_) => std::thread::sleep(Duration::from_millis(1)),
                Step::Echoed => {}
            }
        };
        assert_eq!(end, End::Closed);
        drop(server);
        let back = reader.join().unwrap();
        assert_eq!(back.len(), sent);
        assert!(back.iter().all(|&b| b == 9));
        assert_eq!(s.bytes(), sent as u64);
        assert_eq!(echoed.load(Ordering::Relaxed), sent as u64);
    }
}
