//! `--inetd`: serve the one connection already open on stdin/stdout, then
//! exit. For systemd `Accept=yes` socket units and classic inetd, where the
//! service manager accepts and forks, and forkd only runs the echo handler.

use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

use log::info;
use nix::sys::socket::{SockType, SockaddrStorage, getpeername, getsockopt, sockopt};

use crate::echo::{self, End};
use crate::error::{EXIT_OK, EXIT_OSERR, Error};

/// Echo on the socket at stdin until the client closes; returns the exit code.
pub fn serve(
    buffer: usize,
    first_byte: Option<std::time::Duration>,
    idle: Option<std::time::Duration>,
) -> Result<u8, Error> {
    let stdin = std::io::stdin();
    match getsockopt(&stdin.as_fd(), sockopt::SockType) {
        Ok(SockType::Stream) => {}
        _ => {
            return Err(Error::new(
                EXIT_OSERR,
                "--inetd: stdin is not a connected stream socket",
            ));
        }
    }
    let peer = getpeername::<SockaddrStorage>(stdin.as_raw_fd())
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    // SAFETY: fd 0 is a stream socket (checked above) that this process owns
    // for its whole life; nothing else reads or writes it.
    let mut sock = unsafe { TcpStream::from_raw_fd(0) };
    let _ = sock.set_read_timeout(first_byte);
    let _ = sock.set_write_timeout(idle);
    let mut buf = Box::<[u8]>::new_uninit_slice(buffer);
    let echoed = std::sync::atomic::AtomicU64::new(0);
    let watch = echo::Watch {
        first_byte,
        idle,
        starts_with: first_byte,
        ..echo::Watch::counting(&echoed)
    };
    let outcome = echo::serve(&mut sock, &mut buf, &watch);
    // Send our FIN now rather than at exit. Classic inetd also hands the
    // connection over as stderr, so a log line written before the FIN would
    // reach the client as part of its echo. After the shutdown such a line
    // fails with EPIPE instead and is lost. Under systemd, stderr is the
    // journal, and the client just hears its end-of-file sooner.
    let _ = sock.shutdown(Shutdown::Write);
    info!(
        "inetd conn {peer}: {}, {} echoed",
        outcome.end.describe(),
        crate::error::count(outcome.bytes, "byte", "bytes")
    );
    Ok(match outcome.end {
        End::Error(_) => EXIT_OSERR,
        _ => EXIT_OK,
    })
}
