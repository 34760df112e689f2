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
        let room = self.env_end - self.start;
        let len = title.len().min(room - 1);
        // SAFETY: [start, env_end) is the initial argument and environment
        // string area of this process's stack, mapped read-write for the life
        // of the process; the kernel reported its bounds. Nothing in the child
        // reads these strings after this point (std::env is not used there),
        // and the writes stay inside the area.
        // Volatile writes, so that the compiler does not turn the loops back
        // into calls to memcpy and memset.
        unsafe {
            let p = self.start as *mut u8;
            for (i, &b) in title[..len].iter().enumerate() {
                p.add(i).write_volatile(b);
            }
            // Clear the rest of the argument area, so no old argument shows.
            let clear_to = self.arg_end.max(self.start + len + 1);
            for i in len..clear_to - self.start {
                p.add(i).write_volatile(0);
            }
        }
    }
}

/// Set the short name (`comm`), truncated to 15 bytes by the kernel.
pub fn set_comm(name: &CStr) {
    let _ = nix::sys::prctl::set_name(name);
}
