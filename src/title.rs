//! Process titles, so that `ps` tells the dispatcher from its children.
//!
//! Two names are set. The short one (`comm`, 15 bytes, shown by
//! `ps -o comm` and `top`) goes through `prctl(PR_SET_NAME)`. The long one
//! (the command line, shown by `ps -ef --forest`) is rewritten in place the
//! way PostgreSQL retitles its backends: the kernel shows whatever lies in
//! the argument area of the process's stack, so a child writes its title
//! there. If the title needs more room than the arguments had, it runs on
//! into the environment strings that follow them; the kernel then reads the
//! title up to its terminating NUL. Only children do that, and they never
//! read their environment again.

use std::ffi::CStr;

/// Where the argument and environment strings lie, read once in the dispatcher.
#[derive(Clone, Copy, Debug, Default)]
pub struct TitleArea {
    start: usize,
    arg_end: usize,
    env_end: usize,
}

impl TitleArea {
    /// Read the area's bounds from `/proc/self/stat` (fields 48–51).
    /// Inherited unchanged by every child, since fork copies the address space.
    pub fn capture() -> Option<TitleArea> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<usize> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // `rest` starts at field 3.
        let field = |n: usize| fields.get(n - 3).copied();
        let (start, arg_end, env_start, env_end) = (field(48)?, field(49)?, field(50)?, field(51)?);
        if start == 0 || arg_end <= start {
            return None;
        }
        let env_end = if env_start == arg_end && env_end > env_start {
            env_end
        } else {
            arg_end
        };
        Some(TitleArea {
            start,
            arg_end,
            env_end,
        })
    }

    /// Rewrite the command line to `title` (children only: see the module docs).
    /// A child's code: byte by byte, a few dozen bytes, rather than through
    /// libc's memcpy and memset, which would be two more pages to fault in.
    pub fn set(&self, title: &[u8]) {
        // Clear the rest of the argument area, so no old argument shows.
        self.write(0, title, self.arg_end - self.start);
    }

    /// Write `bytes` at offset `at` of the area, then NULs up to offset
    /// `clear_to` and at least one after them; returns the offset just past
    /// the bytes written. Everything stays inside the area.
    fn write(&self, at: usize, bytes: &[u8], clear_to: usize) -> usize {
        let room = self.env_end - self.start;
        let at = at.min(room - 1);
        let end = at + bytes.len().min(room - 1 - at);
        let clear_to = clear_to.clamp(end + 1, room);
        // SAFETY: [start, env_end) is the initial argument and environment
        // string area of this process's stack, mapped read-write for the life
        // of the process; the kernel reported its bounds. Nothing in the child
        // reads these strings after this point (std::env is not used there),
        // and the writes stay inside the area (`clear_to` <= room).
        // Volatile writes, so that the compiler does not turn the loops back
        // into calls to memcpy and memset.
        unsafe {
            let p = self.start as *mut u8;
            for (i, &b) in bytes[..end - at].iter().enumerate() {
                p.add(at + i).write_volatile(b);
            }
            for i in end..clear_to {
                p.add(i).write_volatile(0);
            }
        }
        end
    }
}

/// A title that changes at every connection (a prefork worker's state): a
/// head written once, then only the tail after it is rewritten, and only
/// what the last tail left is cleared. (Rewriting the whole title and the
/// whole argument area each time was about 1 % of a worker's CPU under
/// `forkd-load rate`, more than the floor's whole user time: docs/prefork.md.)
pub struct Retitle {
    area: TitleArea,
    head: usize,
    end: usize,
}

impl Retitle {
    /// Write `head` (as [`TitleArea::set`] does).
    pub fn new(area: TitleArea, head: &[u8]) -> Retitle {
        let end = area.write(0, head, area.arg_end - area.start);
        Retitle {
            area,
            head: end,
            end,
        }
    }

    /// The title becomes the head followed by `tail`.
    pub fn tail(&mut self, tail: &[u8]) {
        self.end = self.area.write(self.head, tail, self.end + 1);
    }
}

/// Set the short name (`comm`), truncated to 15 bytes by the kernel.
pub fn set_comm(name: &CStr) {
    let _ = nix::sys::prctl::set_name(name);
}
