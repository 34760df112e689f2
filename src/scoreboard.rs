//! Prefork mode's scoreboard: one record per worker, in memory every worker
//! shares writable ([`crate::memory::shared`]), as Apache httpd's prefork
//! scoreboard.
//!
//! Each worker keeps its own record: whether it is serving, the keys of its
//! client's address and network (for `--max-per-ip` and `--max-per-net`
//! across workers), and its counts. Any worker can write every record, so
//! the whole board is untrusted:
//!
//! - to the parent, which reads it for the status line, `STATUS=` and the
//!   summary only: every number is clamped ([`Board::report`]), and none is
//!   ever used as a pid, an index, a length or a pointer (Apache httpd's
//!   CVE-2007-3304 was a parent that signalled pids read from here). The
//!   parent's own records of its workers are private (see
//!   [`crate::prefork`]);
//! - to the workers, which count other workers' clients here: a record
//!   written by a hostile worker can only make the per-source limits refuse
//!   more, or fewer, connections. Nothing else reads it.
//!
//! Addresses are not stored, only their keyed hashes ([`Keys`]): a
//! 64-bit word each, which a reader can never see torn, and a client cannot
//! choose to collide with another's (the key is random per run).

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sources::{Limits, Refused};

/// One worker's record. All-zero: an idle worker with nothing counted.
///
/// Each record has cache lines of its own (128 bytes: a line and the one
/// the CPU prefetches beside it). A worker writes its record at every
/// connection; records that shared a line made it bounce between CPUs
/// (measured: see docs/prefork.md).
#[derive(Default)]
#[repr(C, align(128))]
pub struct Record {
    /// [`BUSY`] while the worker holds a connection (from its admission to its end).
    state: AtomicU32,
    /// Keyed hashes of the client's address and network (0: none).
    addr: AtomicU64,
    net: AtomicU64,
    /// Bytes echoed on the current connection.
    pub bytes: AtomicU64,
    /// Connections served (admitted and handed to the echo handler).
    served: AtomicU64,
    /// Connections whose echo ended.
    ended: AtomicU64,
    /// Refused by --max-per-ip, --max-per-net, --early-drop.
    refused: [AtomicU64; 3],
}

const BUSY: u32 = 1;

/// The largest count the parent believes: more than any worker can reach
/// in centuries at millions a second. Anything above is a corrupt record.
const MOST: u64 = 1 << 50;

/// The board: one record per worker place, and the log gates.
#[derive(Clone, Copy)]
pub struct Board {
    records: &'static [Record],
    /// Per kind of line ([`Gate`]), the monotonic millisecond a worker last
    /// logged one, so that the pool as a whole logs at most one a second.
    gates: &'static [AtomicU64],
}

/// Lines the workers log at most once a second between them.
#[derive(Clone, Copy, Debug)]
pub enum Gate {
    Refused = 0,
    DroppedEarly = 1,
    AcceptFailed = 2,
    /// Closed before a PROXY header was read (see [`crate::proxy::Closed`]).
    ProxyUntrusted = 3,
    ProxyBad = 4,
    ProxyLate = 5,
}

const GATES: usize = 6;

/// What a worker's record says, clamped: numbers for reports only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub busy: bool,
    pub bytes: u64,
    pub served: u64,
    pub ended: u64,
    pub refused: [u64; 3],
}

impl Report {
    /// Add `other` to these counts (saturating: the counts are untrusted).
    pub fn add(&mut self, other: &Report) {
        self.served = self.served.saturating_add(other.served);
        self.ended = self.ended.saturating_add(other.ended);
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            *a = a.saturating_add(b);
        }
    }
}

impl Board {
    /// A board for `workers` places.
    pub fn new(workers: usize) -> io::Result<Board> {
        // SAFETY: all-zero is a valid Record (atomics).
        let records = unsafe { crate::memory::shared::<Record>(workers)? };
        // SAFETY: as above.
        let gates = unsafe { crate::memory::shared::<AtomicU64>(GATES)? };
        Ok(Board {
            records: &records[..workers.max(1)],
            gates: &gates[..GATES],
        })
    }

    /// May a worker log a line of this kind now? True for the first worker
    /// to ask in each second. A gate set in the future (written by a hostile
    /// worker) is taken as open, so it can silence nobody for long.
    pub fn allow(&self, gate: Gate) -> bool {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `t`. The monotonic
        // clock is the same in every process, so workers can compare.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
            return true;
        }
        let now = (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000;
        let g = &self.gates[gate as usize];
        let last = g.load(Ordering::Relaxed);
        let open = now >= last.saturating_add(1000) || last > now.saturating_add(1000);
        open && g
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Place `i`'s record (a worker's own, by the number its parent gave it).
    pub fn record(&self, i: usize) -> &'static Record {
        &self.records[i.min(self.records.len() - 1)]
    }

    /// What place `i`'s record says, every number clamped (parent side).
    pub fn report(&self, i: usize) -> Report {
        let Some(r) = self.records.get(i) else {
            return Report::default();
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).min(MOST);
        Report {
            busy: r.state.load(Ordering::Relaxed) == BUSY,
            bytes: n(&r.bytes),
            served: n(&r.served),
            ended: n(&r.ended),
            refused: [n(&r.refused[0]), n(&r.refused[1]), n(&r.refused[2])],
        }
    }

    /// Empty place `i` for a new worker (parent side, once the last one
    /// there was reaped).
    pub fn clear(&self, i: usize) {
        if let Some(r) = self.records.get(i) {
            r.state.store(0, Ordering::Relaxed);
            for a in [&r.addr, &r.net, &r.bytes, &r.served, &r.ended] {
                a.store(0, Ordering::Relaxed);
            }
            for a in &r.refused {
                a.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Workers the board says are busy, at most its size.
    pub fn busy(&self) -> usize {
        (0..self.records.len())
            .filter(|&i| self.report(i).busy)
            .count()
    }
}

/// The random key the address hashes are made with: the parent's, drawn
/// once at start and inherited by every worker.
#[derive(Clone)]
pub struct Keys(RandomState);

impl Default for Keys {
    fn default() -> Keys {
        Keys(RandomState::new())
    }
}

impl Keys {
    /// The (address, network) hashes of `ip` under `limits`; never 0.
    fn of(&self, ip: IpAddr, limits: Limits) -> (u64, u64) {
        let (addr, net) = crate::sources::keys(ip, limits);
        let h = |kind: u8, key: u128| self.0.hash_one((kind, key)) | 1;
        (h(1, addr), h(2, net))
    }
}

/// A worker's side of the board: its own record, and everyone's to count.
pub struct Seat {
    board: Board,
    me: usize,
}

impl Seat {
    pub fn new(board: Board, me: usize) -> Seat {
        Seat { board, me }
    }

    fn own(&self) -> &'static Record {
        self.board.record(self.me)
    }

    /// Take a connection from `ip`: publish its keys, then count every
    /// worker's clients (its own included). Over a limit, withdraw and say
    /// which. Publishing before counting means two workers admitting the
    /// same address at once both see each other: at the limit both may be
    /// refused, but never both admitted past it. Returns the number of
    /// busy workers (for `--early-drop`) when admitted.
    ///
    /// With no per-source limit and `count_busy` false (no `--early-drop`)
    /// nothing is counted and the number returned is 0: the worker only
    /// marks itself busy, and reads no other worker's record (whose lines
    /// the other CPUs are writing).
    pub fn admit(
        &self,
        ip: IpAddr,
        limits: Limits,
        keys: &Keys,
        count_busy: bool,
    ) -> Result<usize, Refused> {
        let own = self.own();
        let (addr, net) = if limits.per_ip == 0 && limits.per_net == 0 {
            if !count_busy {
                own.state.store(BUSY, Ordering::SeqCst);
                return Ok(0);
            }
            (0, 0)
        } else {
            keys.of(ip, limits)
        };
        own.addr.store(addr, Ordering::SeqCst);
        own.net.store(net, Ordering::SeqCst);
        own.state.store(BUSY, Ordering::SeqCst);
        let (mut busy, mut same_addr, mut same_net) = (0usize, 0u64, 0u64);
        for r in self.board.records {
            if r.state.load(Ordering::SeqCst) != BUSY {
                continue;
            }
            busy += 1;
            if addr != 0 && r.addr.load(Ordering::SeqCst) == addr {
                same_addr += 1;
            }
            if net != 0 && r.net.load(Ordering::SeqCst) == net {
                same_net += 1;
            }
        }
        let over = |limit: u32, n: u64| limit > 0 && n > limit as u64;
        let why = if over(limits.per_ip, same_addr) {
            Some(Refused::Address)
        } else if over(limits.per_net, same_net) {
            Some(Refused::Network)
        } else {
            None
        };
        match why {
            Some(why) => {
                self.release();
                Err(why)
            }
            None => Ok(busy),
        }
    }

    /// The connection ended, or was refused: no longer busy.
    pub fn release(&self) {
        let own = self.own();
        own.state.store(0, Ordering::SeqCst);
        own.addr.store(0, Ordering::Relaxed);
        own.net.store(0, Ordering::Relaxed);
    }

    /// Count one of this worker's events.
    pub fn count(&self, what: Count) {
        let r = self.own();
        let a = match what {
            Count::Served => &r.served,
            Count::Ended => &r.ended,
            Count::Refused(Refused::Address) => &r.refused[0],
            Count::Refused(Refused::Network) => &r.refused[1],
            Count::DroppedEarly => &r.refused[2],
        };
        a.fetch_add(1, Ordering::Relaxed);
    }

    /// This worker's byte counter for the current connection, zeroed.
    pub fn bytes(&self) -> &'static AtomicU64 {
        let b = &self.own().bytes;
        b.store(0, Ordering::Relaxed);
        b
    }
}

/// What a worker counts on its record.
#[derive(Clone, Copy, Debug)]
pub enum Count {
    Served,
    Ended,
    Refused(Refused),
    DroppedEarly,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_ip: 2,
        per_net: 3,
        v4_prefix: 24,
        v6_prefix: 64,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_count_every_workers_client() {
        let board = Board::new(8).unwrap();
        let keys = Keys::default();
        let seats: Vec<Seat> = (0..8).map(|i| Seat::new(board, i)).collect();
        assert_eq!(seats[0].admit(ip("10.0.0.1"), LIMITS, &keys, true), Ok(1));
        assert_eq!(seats[1].admit(ip("10.0.0.1"), LIMITS, &keys, true), Ok(2));
        assert_eq!(
            seats[2].admit(ip("10.0.0.1"), LIMITS, &keys, true),
            Err(Refused::Address)
        );
        assert_eq!(seats[2].admit(ip("10.0.0.2"), LIMITS, &keys, true), Ok(3));
        assert_eq!(
            seats[3].admit(ip("10.0.0.3"), LIMITS, &keys, true),
            Err(Refused::Network)
        );
        assert_eq!(seats[3].admit(ip("10.0.1.3"), LIMITS, &keys, true), Ok(4));
        seats[0].release();
        assert_eq!(seats[4].admit(ip("10.0.0.1"), LIMITS, &keys, true), Ok(4));
        assert_eq!(board.busy(), 4);
    }

    #[test]
    fn a_corrupt_board_is_clamped_and_only_refuses() {
        let board = Board::new(4).unwrap();
        let keys = Keys::default();
        // A hostile worker writes garbage over every record.
        let raw = board.records.as_ptr() as *mut u8;
        let len = std::mem::size_of_val(board.records);
        // SAFETY: the records are plain atomics; any bytes are valid.
        unsafe { std::ptr::write_bytes(raw, 0xff, len) };
        let r = board.report(1);
        assert!(!r.busy && r.served == MOST && r.bytes == MOST);
        // Limits may refuse; nothing breaks.
        let seat = Seat::new(board, 0);
        let _ = seat.admit(ip("10.0.0.1"), LIMITS, &keys, true);
        seat.release();
        board.clear(0);
        assert_eq!(board.report(0), Report::default());
    }
}
