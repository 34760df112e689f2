//! The byte counters: the one thing a connection's server writes that the
//! dispatcher reads. One counter per table slot, in shared memory
//! ([`crate::memory::shared`]), kept current while the connection runs, so
//! even a connection whose process is killed is logged with what it echoed,
//! with no pipe and no system call.
//!
//! A forked child can write every counter, not only its own: what the
//! dispatcher reads here is an untrusted number. It is read at an index the
//! dispatcher chose (a slot of its own table), and used for nothing but the
//! end line; never as a pid, an index, a length or a pointer.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counters {
    cells: &'static [AtomicU64],
}

impl Counters {
    /// Counters for `len` slots.
    pub fn new(len: usize) -> io::Result<Counters> {
        // SAFETY: all-zero is valid for atomics.
        let cells = unsafe { crate::memory::shared::<AtomicU64>(len)? };
        Ok(Counters { cells })
    }

    /// `slot`'s counter, zeroed, for a new connection's server to write.
    pub fn start(&self, slot: u32) -> &'static AtomicU64 {
        let cell = &self.cells[slot as usize];
        cell.store(0, Ordering::Relaxed);
        cell
    }

    /// What `slot`'s server last wrote: bytes echoed, as it claims (0 for a
    /// slot out of range).
    pub fn read(&self, slot: u32) -> u64 {
        self.cells
            .get(slot as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}
