//! From a connection's id (a child's pid, a thread's connection number) to
//! its slot in the connection table: an open-addressing hash table in
//! memory no child inherits ([`crate::memory::private`]).
//!
//! Sized from `--max-conns`, not from `kernel.pid_max`: any pid, however
//! large, has a place, and raising `pid_max` while forkd runs changes
//! nothing. A pid can also appear twice. With few free pids, a child can be
//! reaped by the SIGCHLD handler and its pid handed to the next child
//! before the dispatcher has read that exit; both are then in the index
//! under one pid. Exits are read in the order they were reaped, and the
//! older child was necessarily reaped first, so [`IdIndex::take`] removes
//! the *oldest* entry under an id (the caller says which is older).

use std::io;

use crate::probe::{self, Probe};

/// One entry: an id (0: empty) and its slot.
#[derive(Clone, Copy)]
struct Entry {
    id: u64,
    slot: u32,
}

impl probe::Entry for Entry {
    fn is_empty(&self) -> bool {
        self.id == 0
    }
    fn hash(&self) -> u64 {
        self.id
    }
}

pub struct IdIndex {
    probe: Probe<Entry>,
}

impl IdIndex {
    /// An index for up to `n` ids at once.
    pub fn new(n: usize) -> io::Result<IdIndex> {
        // SAFETY: all-zero is an empty Entry.
        let probe = unsafe { Probe::new(n)? };
        Ok(IdIndex { probe })
    }

    /// Record that `id` (never 0) is served in `slot`.
    pub fn insert(&mut self, id: u64, slot: u32) {
        debug_assert!(id != 0);
        self.probe.insert(Entry { id, slot });
    }

    /// Remove `id`'s entry and return its slot; when `id` is there more than
    /// once, the entry whose slot `older` ranks first.
    pub fn take(&mut self, id: u64, older: impl Fn(u32, u32) -> bool) -> Option<u32> {
        let p = &self.probe;
        let at = p.run(id).filter(|&i| p.get(i).id == id).reduce(|best, i| {
            if older(p.get(i).slot, p.get(best).slot) {
                i
            } else {
                best
            }
        })?;
        let slot = self.probe.get(at).slot;
        self.probe.remove(at);
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_pid_has_a_place() {
        let mut idx = IdIndex::new(4).unwrap();
        for (i, id) in [1u64, 4_194_304, i32::MAX as u64, u64::MAX]
            .iter()
            .enumerate()
        {
            idx.insert(*id, i as u32);
        }
        for (i, id) in [1u64, 4_194_304, i32::MAX as u64, u64::MAX]
            .iter()
            .enumerate()
        {
            assert_eq!(idx.take(*id, |a, b| a < b), Some(i as u32));
            assert_eq!(idx.take(*id, |a, b| a < b), None);
        }
    }

    #[test]
    fn a_reused_pid_ends_its_oldest_connection_first() {
        let mut idx = IdIndex::new(8).unwrap();
        // Slot 5 is older than slot 2 (the caller's order, not the number's).
        let older = |a: u32, b: u32| a == 5 || (b != 5 && a < b);
        idx.insert(300, 5);
        idx.insert(300, 2);
        assert_eq!(idx.take(300, older), Some(5));
        assert_eq!(idx.take(300, older), Some(2));
        assert_eq!(idx.take(300, older), None);
    }

    #[test]
    fn churn_keeps_every_entry_reachable() {
        // Random inserts and removals against a plain map, at full load.
        let n = 64;
        let mut idx = IdIndex::new(n).unwrap();
        let mut model: Vec<(u64, u32)> = Vec::new();
        let mut x = 0x1234_5678_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..200_000u32 {
            if model.len() < n && (model.is_empty() || next() % 2 == 0) {
                // Ids from a small range collide and repeat, like reused pids.
                let id = next() % 200 + 1;
                idx.insert(id, step);
                model.push((id, step));
            } else {
                let (id, _) = model[(next() % model.len() as u64) as usize];
                let want = model
                    .iter()
                    .filter(|e| e.0 == id)
                    .map(|e| e.1)
                    .min()
                    .unwrap();
                assert_eq!(idx.take(id, |a, b| a < b), Some(want), "step {step}");
                model.retain(|e| *e != (id, want));
            }
        }
        for (id, slot) in model.clone() {
            let _ = slot;
            assert!(idx.take(id, |a, b| a < b).is_some());
        }
        assert!(idx.probe.is_clear());
    }
}
