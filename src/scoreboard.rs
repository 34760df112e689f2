//! The scoreboard: the table of live connections, in shared memory (Apache's
//! prefork MPM keeps its per-child state the same way).
//!
//! Each connection owns one slot from accept to end: who serves it (pid or
//! connection number), its peer, its start time, and the bytes it echoed,
//! which a child or thread writes itself at its end. The table is one
//! anonymous `MAP_SHARED` mapping made before the first fork, for two
//! reasons. Children write their byte counts into the very page the
//! dispatcher reads, with no pipe and no syscall. And the dispatcher's own
//! writes (a new slot per connection) are not copy-on-write: every page the
//! dispatcher dirties in private memory between two forks would stay behind
//! as a private copy in the earlier child, costing it memory and costing
//! both a page fault. Fork mode's pid index ([`PidIndex`]) and the reaper's
//! ring live in shared memory for the same reason.

use std::cell::UnsafeCell;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};

/// The shared region `shared_zeroed` carves from: [next, end) addresses.
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);
static ARENA_END: AtomicUsize = AtomicUsize::new(0);

/// Map one shared region of `bytes` for the tables `shared_zeroed` hands out
/// later: one mapping rather than one per table, since every mapping costs
/// each fork and each exit a little. Untouched pages cost nothing.
pub fn reserve_shared(bytes: usize) -> io::Result<()> {
    let region = map_shared(bytes)?;
    let start = region.as_ptr() as usize;
    ARENA_END.store(start + bytes, Ordering::SeqCst);
    ARENA_NEXT.store(start, Ordering::SeqCst);
    Ok(())
}

fn map_shared(bytes: usize) -> io::Result<std::ptr::NonNull<std::ffi::c_void>> {
    let len = NonZeroUsize::new(bytes).ok_or_else(|| io::Error::other("empty shared table"))?;
    // SAFETY: a fresh anonymous mapping aliases nothing. NORESERVE: pages
    // never touched cost nothing. It is never unmapped.
    Ok(unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
        )?
    })
}

/// `n` zero-filled `T`s in shared memory that lives until exit: carved from
/// the region of [`reserve_shared`] while it has room, else mapped apart.
///
/// # Safety
/// An all-zero `T` must be a valid value (atomics, integers, `MaybeUninit`).
pub unsafe fn shared_zeroed<T>(n: usize) -> io::Result<&'static mut [T]> {
    let n = n.max(1);
    let bytes = n
        .checked_mul(size_of::<T>())
        .ok_or_else(|| io::Error::other("shared table too large"))?;
    // Cache-line alignment keeps tables written by different processes apart.
    let align = align_of::<T>().max(64);
    let mut addr = None;
    let _ = ARENA_NEXT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
        let start = next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(bytes)?;
        (next != 0 && end <= ARENA_END.load(Ordering::SeqCst)).then(|| {
            addr = Some(start);
            end
        })
    });
    let ptr = match addr {
        Some(a) => a as *mut T,
        None => map_shared(bytes)?.as_ptr().cast::<T>(),
    };
    // SAFETY: `ptr` starts `n` zero-filled, suitably aligned `T`s of shared
    // memory that stays mapped for the life of the process, and no other
    // part of this process was handed the same bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
}

/// One connection's slot.
pub struct Slot {
    /// pid (fork mode) or connection number (thread mode); 0 while free.
    id: AtomicU64,
    /// Bytes echoed, written by whoever served the connection, at its end.
    bytes: AtomicU64,
    /// Start, in nanoseconds after the table's epoch.
    start: AtomicU64,
    /// The client's address. Only the dispatcher thread reads or writes it.
    peer: UnsafeCell<MaybeUninit<SocketAddr>>,
}

// SAFETY: `peer` is only touched by the dispatcher thread (through
// `&mut Scoreboard`); every other field is atomic.
unsafe impl Sync for Slot {}

/// What the scoreboard knew about a connection, read when it ends.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub id: u64,
    pub peer: SocketAddr,
    pub start: Instant,
    pub bytes: u64,
}

pub struct Scoreboard {
    slots: &'static [Slot],
    /// A stack of free slot numbers, in shared memory too (see module docs).
    free: &'static [AtomicU32],
    free_len: usize,
    epoch: Instant,
}

impl Scoreboard {
    /// A table for `len` connections at once.
    pub fn new(len: usize) -> io::Result<Scoreboard> {
        // SAFETY: all-zero is valid for atomics and MaybeUninit.
        let slots = unsafe { shared_zeroed::<Slot>(len)? };
        let free = unsafe { shared_zeroed::<AtomicU32>(len)? };
        for (i, f) in free.iter().enumerate() {
            f.store((len - 1 - i) as u32, Ordering::Relaxed);
        }
        Ok(Scoreboard {
            slots,
            free,
            free_len: len,
            epoch: Instant::now(),
        })
    }

    /// Connections with a slot.
    pub fn active(&self) -> usize {
        self.slots.len() - self.free_len
    }

    /// Take a free slot for a connection from `peer`, or None when all are taken.
    pub fn claim(&mut self, peer: SocketAddr) -> Option<u32> {
        self.free_len = self.free_len.checked_sub(1)?;
        let slot = self.free[self.free_len].load(Ordering::Relaxed);
        let s = &self.slots[slot as usize];
        s.bytes.store(0, Ordering::Relaxed);
        let start = self.epoch.elapsed().as_nanos() as u64;
        s.start.store(start, Ordering::Relaxed);
        // SAFETY: only the dispatcher (holding `&mut self`) touches `peer`.
        unsafe { (*s.peer.get()).write(peer) };
        Some(slot)
    }

    /// Record who serves the connection in `slot`.
    pub fn assign(&mut self, slot: u32, id: u64) {
        self.slots[slot as usize].id.store(id, Ordering::Relaxed);
    }

    /// Free `slot` and return what it recorded.
    pub fn release(&mut self, slot: u32) -> Record {
        let record = self.record(slot);
        self.slots[slot as usize].id.store(0, Ordering::Relaxed);
        self.free[self.free_len].store(slot, Ordering::Relaxed);
        self.free_len += 1;
        record
    }

    fn record(&self, slot: u32) -> Record {
        let s = &self.slots[slot as usize];
        Record {
            id: s.id.load(Ordering::Relaxed),
            // SAFETY: `claim` wrote `peer` before the slot was handed out.
            peer: unsafe { (*s.peer.get()).assume_init() },
            start: self.epoch + Duration::from_nanos(s.start.load(Ordering::Relaxed)),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }

    /// The counter a connection's server writes its byte count to.
    pub fn bytes_cell(&self, slot: u32) -> &'static AtomicU64 {
        &self.slots[slot as usize].bytes
    }

    /// (slot, id) of every assigned connection.
    pub fn assigned(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let id = s.id.load(Ordering::Relaxed);
            (id != 0).then_some((i as u32, id))
        })
    }
}

/// Fork mode's index from a child's pid to its slot, in shared memory.
///
/// The kernel hands out pids in rising order, so the entries of consecutive
/// children share a page; pages never touched cost nothing. The index has
/// one entry per possible pid (`/proc/sys/kernel/pid_max`).
pub struct PidIndex {
    entries: &'static [AtomicU32],
}

impl PidIndex {
    pub fn new() -> io::Result<PidIndex> {
        // SAFETY: all-zero is valid for atomics.
        let entries = unsafe { shared_zeroed::<AtomicU32>(Self::entries())? };
        Ok(PidIndex { entries })
    }

    /// One entry per possible pid.
    fn entries() -> usize {
        std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1 << 22)
            + 1
    }

    /// The shared memory an index needs.
    pub fn bytes() -> usize {
        Self::entries() * size_of::<AtomicU32>()
    }

    pub fn insert(&self, pid: i32, slot: u32) {
        if let Some(e) = self.entries.get(pid as usize) {
            e.store(slot + 1, Ordering::Relaxed);
        }
    }

    /// The slot of `pid`, removing it from the index.
    pub fn take(&self, pid: i32) -> Option<u32> {
        let e = self.entries.get(pid as usize)?;
        e.swap(0, Ordering::Relaxed).checked_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_assigned_and_released() {
        let mut b = Scoreboard::new(2).unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = b.claim(peer).unwrap();
        let c = b.claim(peer).unwrap();
        assert!(b.claim(peer).is_none());
        b.assign(a, 42);
        b.bytes_cell(a).store(7, Ordering::Relaxed);
        assert_eq!(b.assigned().collect::<Vec<_>>(), vec![(a, 42)]);
        let r = b.release(a);
        assert_eq!((r.id, r.bytes, r.peer), (42, 7, peer));
        assert_eq!(b.active(), 1);
        b.release(c);
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn pid_index_round_trips() {
        let idx = PidIndex::new().unwrap();
        idx.insert(1234, 0);
        assert_eq!(idx.take(1234), Some(0));
        assert_eq!(idx.take(1234), None);
    }
}
