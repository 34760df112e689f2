//! An open-addressing hash table (linear probing, backward-shift deletion)
//! in memory no child inherits ([`crate::memory::private`]), for the
//! dispatcher's indexes: pids to slots ([`crate::ids`]) and sources to
//! counts ([`crate::sources`]). Sized once, for a number of entries that
//! the caller never exceeds, and kept at most half full; a page of it costs
//! memory only once an entry lands there.

use std::io;

/// An entry: all-zero bytes must be the empty entry.
pub trait Entry: Copy {
    fn is_empty(&self) -> bool;
    /// Where the entry's probe starts; equal keys, equal hashes.
    fn hash(&self) -> u64;
}

pub struct Probe<E: 'static> {
    entries: &'static mut [E],
    /// `entries.len() - 1`; the length is a power of two.
    mask: usize,
}

impl<E: Entry> Probe<E> {
    /// A table for up to `n` entries at once.
    ///
    /// # Safety
    /// An all-zero `E` must be a valid, empty entry.
    pub unsafe fn new(n: usize) -> io::Result<Probe<E>> {
        let len = n
            .max(8)
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .ok_or_else(|| io::Error::other("index too large"))?;
        // SAFETY: the caller's promise.
        let entries = unsafe { crate::memory::private::<E>(len)? };
        Ok(Probe {
            entries,
            mask: len - 1,
        })
    }

    fn home(&self, hash: u64) -> usize {
        // Fibonacci hashing: consecutive keys land far apart.
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Add `e` (the caller keeps within the size given to `new`).
    pub fn insert(&mut self, e: E) {
        let mut i = self.home(e.hash());
        while !self.entries[i].is_empty() {
            i = (i + 1) & self.mask;
        }
        self.entries[i] = e;
    }

    /// The places of the entries that might have `hash`, in probe order,
    /// for the caller to pick from.
    pub fn run(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let mut i = self.home(hash);
        std::iter::from_fn(move || {
            if self.entries[i].is_empty() {
                return None;
            }
            let at = i;
            i = (i + 1) & self.mask;
            Some(at)
        })
    }

    pub fn get(&self, at: usize) -> &E {
        &self.entries[at]
    }

    pub fn get_mut(&mut self, at: usize) -> &mut E {
        &mut self.entries[at]
    }

    /// Empty place `at` and move later entries of its run back, so that
    /// every entry stays reachable from its home without tombstones.
    pub fn remove(&mut self, mut at: usize) {
        let mut i = at;
        loop {
            i = (i + 1) & self.mask;
            let e = self.entries[i];
            if e.is_empty() {
                break;
            }
            let home = self.home(e.hash());
            // Can `e` move back to `at`? Not if its home lies cyclically in (at, i].
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
        // SAFETY: all-zero is the empty entry (the promise of `new`).
        self.entries[at] = unsafe { std::mem::zeroed() };
    }

    /// Is every place empty? (For tests.)
    pub fn is_clear(&self) -> bool {
        self.entries.iter().all(Entry::is_empty)
    }
}
