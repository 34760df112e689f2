//! The dispatcher's table of live connections: for each, who serves it
//! (pid or connection number), its peer and its start. Private to the
//! dispatcher, in memory no child inherits ([`crate::memory::private`]):
//! every pid forkd ever signals comes from here, never from memory a
//! connection's process can write (Apache httpd's CVE-2007-3304).
//!
//! A connection holds one slot from accept to end. Slot numbers are also
//! the index of the connection's byte counter ([`crate::counters`]). The
//! table grows with use: slots are handed out from the low end, and a freed
//! slot is taken again before a fresh one, so pages of a table sized for a
//! large `--max-conns` are touched only once that many connections have
//! been open at once.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::time::Instant;

use crate::ids::IdIndex;

/// What the table knows about one connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// pid (fork mode) or connection number (thread mode); 0 until assigned.
    pub id: u64,
    pub peer: SocketAddr,
    pub start: Instant,
    /// Not a client's: a balancer's health check (see [`crate::proxy::Via`]),
    /// whose end is logged at debug level only.
    pub quiet: bool,
    /// Order of assignment, to tell the older of two connections with one id.
    seq: u64,
}

pub struct Table {
    conns: &'static mut [MaybeUninit<Conn>],
    /// Freed slot numbers, taken again first.
    free: &'static mut [u32],
    free_len: usize,
    /// Slots at or above this were never used.
    fresh: usize,
    ids: IdIndex,
    next_seq: u64,
}

impl Table {
    /// A table for `len` connections at once.
    pub fn new(len: usize) -> io::Result<Table> {
        // SAFETY: all-zero is valid for MaybeUninit and u32.
        let conns = unsafe { crate::memory::private::<MaybeUninit<Conn>>(len)? };
        let free = unsafe { crate::memory::private::<u32>(len)? };
        Ok(Table {
            conns: &mut conns[..len],
            free: &mut free[..len],
            free_len: 0,
            fresh: 0,
            ids: IdIndex::new(len)?,
            next_seq: 1,
        })
    }

    /// Connections holding a slot.
    pub fn active(&self) -> usize {
        self.fresh - self.free_len
    }

    /// Take a slot for a connection from `peer`, or None when all are taken.
    pub fn claim(&mut self, peer: SocketAddr) -> Option<u32> {
        let slot = if self.free_len > 0 {
            self.free_len -= 1;
            self.free[self.free_len] as usize
        } else if self.fresh < self.conns.len() {
            self.fresh += 1;
            self.fresh - 1
        } else {
            return None;
        };
        self.conns[slot].write(Conn {
            id: 0,
            peer,
            start: Instant::now(),
            quiet: false,
            seq: 0,
        });
        Some(slot as u32)
    }

    /// Record who serves the connection in `slot` (`id` is never 0).
    pub fn assign(&mut self, slot: u32, id: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let c = self.conn_mut(slot);
        c.id = id;
        c.seq = seq;
        self.ids.insert(id, slot);
    }

    /// Mark the connection in `slot` as a health check (see [`Conn::quiet`]).
    pub fn set_quiet(&mut self, slot: u32) {
        self.conn_mut(slot).quiet = true;
    }

    /// Give back a slot that was claimed but never assigned.
    pub fn release(&mut self, slot: u32) {
        debug_assert_eq!(self.conn(slot).id, 0);
        self.free_slot(slot);
    }

    /// The connection served by `id` has ended: free its slot, and return
    /// the slot and what the table knew. None if no connection has that id.
    pub fn end(&mut self, id: u64) -> Option<(u32, Conn)> {
        let conns = &*self.conns;
        // SAFETY (in the closure): every slot in the index was written by `claim`.
        let seq = |s: u32| unsafe { conns[s as usize].assume_init_ref().seq };
        let slot = self.ids.take(id, |a, b| seq(a) < seq(b))?;
        let conn = *self.conn(slot);
        self.conn_mut(slot).id = 0;
        self.free_slot(slot);
        Some((slot, conn))
    }

    /// (slot, id) of every assigned connection.
    pub fn assigned(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.conns[..self.fresh]
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                // SAFETY: every slot below `fresh` was written by `claim`.
                let id = unsafe { c.assume_init_ref() }.id;
                (id != 0).then_some((i as u32, id))
            })
    }

    fn free_slot(&mut self, slot: u32) {
        self.free[self.free_len] = slot;
        self.free_len += 1;
    }

    fn conn(&self, slot: u32) -> &Conn {
        // SAFETY: callers pass slots handed out by `claim`, which wrote them.
        unsafe { self.conns[slot as usize].assume_init_ref() }
    }

    fn conn_mut(&mut self, slot: u32) -> &mut Conn {
        // SAFETY: as in `conn`.
        unsafe { self.conns[slot as usize].assume_init_mut() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_assigned_and_ended() {
        let mut t = Table::new(2).unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = t.claim(peer).unwrap();
        let c = t.claim(peer).unwrap();
        assert!(t.claim(peer).is_none());
        t.assign(a, 42);
        assert_eq!(t.assigned().collect::<Vec<_>>(), vec![(a, 42)]);
        let (slot, conn) = t.end(42).unwrap();
        assert_eq!((slot, conn.id, conn.peer), (a, 42, peer));
        assert!(t.end(42).is_none(), "an id ends once");
        assert!(t.end(7).is_none(), "an unknown id ends nothing");
        assert_eq!(t.active(), 1);
        t.release(c);
        assert_eq!(t.active(), 0);
    }

    #[test]
    fn a_reused_pid_ends_the_older_connection_first() {
        let mut t = Table::new(4).unwrap();
        let old: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let new: SocketAddr = "127.0.0.1:2".parse().unwrap();
        // The older connection takes a higher slot number: order is by time.
        let filler = t.claim(old).unwrap();
        let first = t.claim(old).unwrap();
        t.release(filler);
        t.assign(first, 300);
        let second = t.claim(new).unwrap();
        assert!(second < first);
        t.assign(second, 300);
        assert_eq!(t.end(300).unwrap().1.peer, old);
        assert_eq!(t.end(300).unwrap().1.peer, new);
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn a_large_table_costs_memory_only_as_it_is_used() {
        // 20 million slots would be gigabytes if the table were filled in.
        let before = rss_kib();
        let mut t = Table::new(20_000_000).unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for id in 1..=1000 {
            let slot = t.claim(peer).unwrap();
            t.assign(slot, id);
        }
        let grown = rss_kib().saturating_sub(before);
        assert!(grown < 64 << 10, "the table grew RSS by {grown} KiB");
        assert_eq!(t.active(), 1000);
    }
}
