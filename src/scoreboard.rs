//! The scoreboard: a small shared-memory table through which each child
//! tells the dispatcher how many bytes it echoed (Apache's prefork MPM keeps
//! its per-child state the same way).
//!
//! It is one anonymous `MAP_SHARED` mapping made before the first fork, so
//! every child writes into the very page the dispatcher reads, with no pipe
//! and no syscall. Slot `i` belongs to one live child at a time; the
//! dispatcher hands slots out and takes them back when it reaps the child.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};

pub struct Scoreboard {
    slots: NonNull<AtomicU64>,
    len: usize,
    free: Vec<u32>,
}

impl Scoreboard {
    /// Map `len` slots shared with every future child.
    pub fn new(len: usize) -> nix::Result<Scoreboard> {
        let len = len.max(1);
        let bytes = NonZeroUsize::new(len * size_of::<AtomicU64>()).expect("len >= 1");
        // SAFETY: a fresh anonymous mapping aliases nothing; it is zero-filled,
        // and all-zero is a valid AtomicU64. It is never unmapped (the process
        // keeps it until exit), so the pointer stays valid.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(Scoreboard {
            slots: ptr.cast(),
            len,
            free: (0..len as u32).rev().collect(),
        })
    }

    /// Take a free slot and zero it (dispatcher, before forking).
    pub fn claim(&mut self) -> Option<u32> {
        let slot = self.free.pop()?;
        self.cell(slot).store(0, Ordering::Relaxed);
        Some(slot)
    }

    /// Read a slot's byte count and free it (dispatcher, after reaping its child).
    pub fn release(&mut self, slot: u32) -> u64 {
        self.free.push(slot);
        self.cell(slot).load(Ordering::Relaxed)
    }

    /// The slot a child writes its count to.
    pub fn cell(&self, slot: u32) -> &AtomicU64 {
        assert!((slot as usize) < self.len);
        // SAFETY: `slot` is in bounds of the mapping, which lives for the whole process.
        unsafe { &*self.slots.as_ptr().add(slot as usize) }
    }
}
