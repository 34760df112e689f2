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
}

impl End {
    pub fn describe(self) -> &'static str {
        match self {
            End::Closed => "closed by client",
            End::Error(_) => "socket error",
            End::Reset => "reset by client",
            End::IdleTimeout => "idle timeout",
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

/// Apply the idle timeout to the socket (None: wait for ever).
pub fn set_idle_timeout(sock: &TcpStream, idle: Option<Duration>) -> io::Result<()> {
    sock.set_read_timeout(idle)?;
    sock.set_write_timeout(idle)
}

/// Echo everything on `sock` back to it until the client closes, using
/// `buf`, and keep `echoed` at the bytes sent back so far.
///
/// The buffer need not be initialised: only bytes the kernel wrote into it
/// are ever read, so no page of it is touched before data arrives.
pub fn serve(sock: &mut TcpStream, buf: &mut [MaybeUninit<u8>], echoed: &AtomicU64) -> Outcome {
    let mut bytes = 0u64;
    loop {
        let data = match receive(sock, buf) {
            Ok([]) => break,
            Ok(data) => data,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Outcome {
                    bytes,
                    end: classify(&e),
                };
            }
        };
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
                    echoed.store(bytes, Ordering::Relaxed);
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

/// One recv(2) into `buf`; returns the bytes received (empty at end of stream).
fn receive<'a>(sock: &TcpStream, buf: &'a mut [MaybeUninit<u8>]) -> io::Result<&'a [u8]> {
    // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`, which is
    // valid for writes of that length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
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
        let t =
            std::thread::spawn(move || serve(&mut server, &mut [MaybeUninit::uninit(); 7], &count));
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
        set_idle_timeout(&server, Some(Duration::from_millis(100))).unwrap();
        let out = serve(
            &mut server,
            &mut [MaybeUninit::uninit(); 64],
            &AtomicU64::new(0),
        );
        assert_eq!(out.end, End::IdleTimeout);
    }
}
