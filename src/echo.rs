//! The echo handler (RFC 862, TCP): every byte received is sent back
//! unchanged, in order, until the client closes its side; then the rest is
//! sent and the connection closed.
//!
//! Every concurrency model calls [`serve`]; nothing here knows whether it
//! runs in a child process or a thread. Memory is bounded by the one buffer
//! the caller lends, whatever the length of the stream. A half-close by the
//! client is honoured: its FIN ends reading, and everything read before it
//! still goes back.
//!
//! The idle timeout is the socket's SO_RCVTIMEO and SO_SNDTIMEO (set on the
//! listener, whose accepted sockets inherit them): a read that
//! waits that long for a byte, or a write that cannot hand the kernel a
//! single byte for that long (a client that stopped reading), ends the
//! connection. Any progress starts the clock again.

use std::io::{self, ErrorKind, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    let mut bytes = 0u64;
    let mut received = false;
    let mut hook = watch.on_long_lived;
    // The receive timeout the socket has now: set only when it must change.
    let mut timeout = watch.starts_with;
    loop {
        let real = if received {
            watch.idle
        } else {
            watch.first_byte
        };
        if hook.is_none() {
            set_receive_timeout(sock, &mut timeout, real);
        }
        let data = match receive(sock, buf, 0) {
            Ok([]) => break,
            Ok(data) => data,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock && hook.is_some() => {
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
                return Outcome {
                    bytes,
                    end: if received {
                        End::IdleTimeout
                    } else {
                        End::Silent
                    },
                };
            }
            Err(e) => {
                let end = match classify(&e) {
                    End::IdleTimeout if !received => End::Silent,
                    end => end,
                };
                return Outcome { bytes, end };
            }
        };
        received = true;
        let mut sent = 0;
        while sent < data.len() {
            match sock.write(&data[sent..]) {
                Ok(0) => {
                    return Outcome {
                        bytes,
                        end: End::Reset,
                    };
                }
                Ok(k) => {
                    sent += k;
                    bytes += k as u64;
                    watch.echoed.store(bytes, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Outcome {
                        bytes,
                        end: classify(&e),
                    };
                }
            }
        }
    }
    // The client's FIN arrived and every byte went back. Our FIN follows
    // when the caller closes the socket (a child's exit, a thread's end).
    Outcome {
        bytes,
        end: End::Closed,
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

/// One recv(2) into `buf`; returns the bytes received (empty at end of stream).
fn receive<'a>(
    sock: &TcpStream,
    buf: &'a mut [MaybeUninit<u8>],
    flags: libc::c_int,
) -> io::Result<&'a [u8]> {
    // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`, which is
    // valid for writes of that length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised the first `n` bytes of `buf`.
    Ok(unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) })
}

fn classify(e: &io::Error) -> End {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            End::Reset
        }
        // SO_RCVTIMEO / SO_SNDTIMEO expired: EAGAIN.
        ErrorKind::WouldBlock | ErrorKind::TimedOut => End::IdleTimeout,
        _ => End::Error(e.raw_os_error().unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
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
}
