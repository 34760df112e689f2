//! The two kinds of memory the dispatcher maps for its tables, and why.
//!
//! - [`private`]: an anonymous private mapping marked `MADV_DONTFORK`. A
//!   child never inherits it: the mapping is simply absent from every
//!   connection's process, which can therefore neither read nor write it.
//!   Everything the dispatcher decides with (the connection table, the id
//!   index, the free list, the reaper's record of exits, the signal state
//!   and the stack the signal handlers run on) lives here. It also keeps
//!   the page-fault savings shared tables were once used for: fork
//!   write-protects every private page it copies into a child, so the
//!   dispatcher's next write to such a page is a fault and a copy; a mapping
//!   fork does not copy is never write-protected.
//! - [`wiped_in_children`]: a private mapping marked `MADV_WIPEONFORK`, for
//!   the signal stack: a child has the addresses, but its own zero pages.
//! - [`shared`]: an anonymous `MAP_SHARED` mapping, inherited writable by
//!   every child. Only the byte counters children report live there
//!   ([`crate::counters`]): untrusted numbers the dispatcher only reports.
//!
//! Both are `MAP_NORESERVE` and never unmapped: a page costs memory only
//! once it is touched, so a table sized for `--max-conns` grows with use.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous};

/// `n` zero-filled `T`s in a private mapping no child inherits, alive until exit.
///
/// # Safety
/// An all-zero `T` must be a valid value (atomics, integers, `MaybeUninit`).
pub unsafe fn private<T>(n: usize) -> io::Result<&'static mut [T]> {
    let (ptr, len) = map::<T>(n, MapFlags::MAP_PRIVATE)?;
    // SAFETY: `ptr..ptr+len` is the mapping just made, page-aligned.
    unsafe { madvise(ptr.cast(), len, MmapAdvise::MADV_DONTFORK) }?;
    // SAFETY: `n` zero-filled, aligned `T`s that stay mapped until exit and
    // that nothing else was handed.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), n.max(1)) })
}

/// `n` zero-filled `T`s in a private mapping marked `MADV_WIPEONFORK`: a
/// child gets the same addresses mapped, but to fresh zero pages of its
/// own, never the dispatcher's (and fork write-protects nothing of it).
/// For the signal stack: a signal that reaches a child before it has put
/// its handlers back still finds a stack to run on.
///
/// # Safety
/// An all-zero `T` must be a valid value.
pub unsafe fn wiped_in_children<T>(n: usize) -> io::Result<&'static mut [T]> {
    let (ptr, len) = map::<T>(n, MapFlags::MAP_PRIVATE)?;
    // SAFETY: `ptr..ptr+len` is the mapping just made, page-aligned.
    unsafe { madvise(ptr.cast(), len, MmapAdvise::MADV_WIPEONFORK) }?;
    // SAFETY: as in `private`.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), n.max(1)) })
}

/// `n` zero-filled `T`s in a mapping every later child shares, writable.
/// Whatever a child can write here is untrusted input to the dispatcher.
///
/// # Safety
/// An all-zero `T` must be a valid value.
pub unsafe fn shared<T>(n: usize) -> io::Result<&'static mut [T]> {
    let (ptr, _) = map::<T>(n, MapFlags::MAP_SHARED)?;
    // SAFETY: as in `private`.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), n.max(1)) })
}

fn map<T>(n: usize, kind: MapFlags) -> io::Result<(NonNull<T>, usize)> {
    let bytes = n
        .max(1)
        .checked_mul(size_of::<T>())
        .ok_or_else(|| io::Error::other("table too large"))?;
    let len = NonZeroUsize::new(bytes.max(1)).expect("at least one byte");
    // SAFETY: a fresh anonymous mapping aliases nothing; pages are
    // page-aligned, which satisfies any `T`'s alignment used here.
    let ptr = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            kind | MapFlags::MAP_NORESERVE,
        )?
    };
    Ok((ptr.cast(), len.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_table_is_not_in_a_forked_child() {
        // SAFETY: all-zero u64s.
        let table = unsafe { private::<u64>(512) }.unwrap();
        table[0] = 7;
        let addr = table.as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapped_here = |maps: &str| {
            maps.lines().any(|l| {
                let range = l.split(' ').next().unwrap();
                let (lo, hi) = range.split_once('-').unwrap();
                let lo = usize::from_str_radix(lo, 16).unwrap();
                let hi = usize::from_str_radix(hi, 16).unwrap();
                (lo..hi).contains(&addr)
            })
        };
        assert!(mapped_here(&maps));
        // SAFETY: the child only reads a file and calls _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(if mapped_here(&maps) { 1 } else { 0 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }

    #[test]
    fn a_wiped_mapping_is_zero_in_a_forked_child_and_kept_in_the_parent() {
        // SAFETY: all-zero u64s.
        let table = unsafe { wiped_in_children::<u64>(512) }.unwrap();
        table[0] = 7;
        let addr = table.as_ptr() as usize;
        // SAFETY: the child reads and writes its own copy, then calls _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: the mapping exists in the child, zero-filled.
                let first = unsafe { std::ptr::read_volatile(addr as *const u64) };
                unsafe { std::ptr::write_volatile(addr as *mut u64, 9) };
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(if first == 0 { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
                assert_eq!(table[0], 7, "the child's write reached the parent");
            }
        }
    }
}
