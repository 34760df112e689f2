//! Thread mode: one thread per connection inside the dispatcher process,
//! running the same echo handler as fork mode.
//!
//! Each thread reports its end into a shared list and wakes the dispatcher
//! through the same pipe the signal handlers use. To stop connections, the
//! dispatcher shuts their sockets down: `SHUT_RD` (the echo handler sees the
//! end of input, sends what it has and returns) stands for SIGTERM, and
//! `SHUT_RDWR` for SIGKILL. A thread removes its socket from the live table
//! before closing it, under the table's lock, so the dispatcher never shuts
//! down a descriptor number that has been reused.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::socket::{Shutdown, shutdown};

use crate::dispatcher::{Collect, Ended, How, Model, Stop};
use crate::echo;
use crate::signals;

#[derive(Default)]
struct Shared {
    /// Sockets of running connections, by id.
    live: Mutex<HashMap<u64, RawFd>>,
    /// Ends not yet collected by the dispatcher.
    ended: Mutex<Vec<Ended>>,
}

pub struct ThreadModel {
    shared: Arc<Shared>,
    next_id: u64,
    stack: usize,
    buffer: usize,
    idle: Option<Duration>,
}

impl ThreadModel {
    pub fn new(stack: usize, buffer: usize, idle: Option<Duration>) -> ThreadModel {
        ThreadModel {
            shared: Arc::default(),
            next_id: 1,
            stack,
            buffer,
            idle,
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

    fn start(&mut self, conn: OwnedFd, _peer: SocketAddr) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let shared = Arc::clone(&self.shared);
        lock(&shared.live).insert(id, conn.as_raw_fd());
        let (buffer, idle) = (self.buffer, self.idle);
        let spawned = std::thread::Builder::new()
            .name("forkd-conn".into())
            .stack_size(self.stack)
            .spawn(move || {
                let mut sock = TcpStream::from(conn);
                let _ = echo::set_idle_timeout(&sock, idle);
                let mut buf = vec![0u8; buffer];
                let outcome = echo::serve(&mut sock, &mut buf);
                let mut live = lock(&shared.live);
                live.remove(&id);
                drop(sock);
                drop(live);
                lock(&shared.ended).push(Ended {
                    id,
                    bytes: outcome.bytes,
                    how: How::Returned(outcome.end),
                });
                signals::wake();
            });
        if let Err(e) = spawned {
            // The closure, and with it the connection, was dropped.
            lock(&self.shared.live).remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    fn collect(&mut self, _why: Collect, ended: &mut Vec<Ended>) {
        ended.append(&mut lock(&self.shared.ended));
    }

    fn stop(&mut self, how: Stop, ids: &mut dyn Iterator<Item = u64>) {
        let how = match how {
            Stop::Terminate => Shutdown::Read,
            Stop::Kill => Shutdown::Both,
        };
        let live = lock(&self.shared.live);
        for id in ids {
            if let Some(&fd) = live.get(&id) {
                // The thread cannot close `fd` while we hold `live`.
                let _ = shutdown(fd, how);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
