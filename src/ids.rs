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

/// One entry: an id (0: empty) and its slot.
#[derive(Clone, Copy)]
struct Entry {
    id: u64,
    slot: u32,
}

pub struct IdIndex {
    entries: &'static mut [Entry],
    /// `entries.len() - 1`; the length is a power of two.
    mask: usize,
}

impl IdIndex {
    /// An index for up to `n` ids at once (kept at most half full).
    pub fn new(n: usize) -> io::Result<IdIndex> {
        let len = n
            .max(8)
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .ok_or_else(|| io::Error::other("id index too large"))?;
        // SAFETY: all-zero is an empty Entry.
        let entries = unsafe { crate::memory::private::<Entry>(len)? };
        Ok(IdIndex {
            entries,
            mask: len - 1,
        })
    }

    fn home(&self, id: u64) -> usize {
        // Fibonacci hashing: consecutive pids land far apart.
        (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Record that `id` (never 0) is served in `slot`. The caller keeps at
    /// most `n` entries (see `new`), so there is always an empty place.
    pub fn insert(&mut self, id: u64, slot: u32) {
        debug_assert!(id != 0);
        let mut i = self.home(id);
        while self.entries[i].id != 0 {
            i = (i + 1) & self.mask;
        }
        self.entries[i] = Entry { id, slot };
    }

    /// Remove `id`'s entry and return its slot; when `id` is there more than
    /// once, the entry whose slot `older` ranks first.
    pub fn take(&mut self, id: u64, older: impl Fn(u32, u32) -> bool) -> Option<u32> {
        let mut found: Option<usize> = None;
        let mut i = self.home(id);
        while self.entries[i].id != 0 {
            if self.entries[i].id == id
                && found.is_none_or(|f| older(self.entries[i].slot, self.entries[f].slot))
            {
                found = Some(i);
            }
            i = (i + 1) & self.mask;
        }
        let at = found?;
        let slot = self.entries[at].slot;
        self.remove(at);
        Some(slot)
    }

    /// Empty place `at` and move later entries of its run back, so that
    /// every entry stays reachable from its home without tombstones.
    fn remove(&mut self, mut at: usize) {
        let mut i = at;
        loop {
            i = (i + 1) & self.mask;
            let e = self.entries[i];
            if e.id == 0 {
                break;
            }
            let home = self.home(e.id);
            // Does `e` belong after `at` (can it move back to `at`)? It can
            // unless its home lies cyclically in (at, i].
            let stays = if at <= i {
                at < home && home <= i
            } else {
                at < home || home <= i
            };
            if !stays {
                self.entries[at] = e;
                at = i;
            }
        }
        self.entries[at] = Entry { id: 0, slot: 0 };
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
        assert!(idx.entries.iter().all(|e| e.id == 0));
    }
}
