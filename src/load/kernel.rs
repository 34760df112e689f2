//! What the kernel spends while a server holds connections, as `/proc`
//! shows it, and how much room its task limits leave.
//!
//! A connection costs more than its process's PSS: the kernel keeps the
//! process's page tables (`VmPTE`), a stack per thread, and objects in its
//! slab caches (the task, its memory map, the socket of each end). Page
//! tables are read per process; the rest only exists machine-wide, in
//! `/proc/meminfo` and `/proc/slabinfo`, so it is read before and while
//! holding and the growth is divided by the connections held. What cannot be
//! separated: on loopback both ends' sockets live in the same kernel, so the
//! socket caches grow by two sockets per connection (the server's share is
//! taken as half: the two ends are the same kind of socket); and anything
//! else the machine does meanwhile moves the same counters.

use std::collections::HashMap;
use std::fs;
use std::io;

/// The lines of `/proc/meminfo` a hold reads, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Meminfo {
    pub available: u64,
    pub page_tables: u64,
    pub kernel_stack: u64,
    pub slab: u64,
}

impl Meminfo {
    pub fn read() -> io::Result<Meminfo> {
        Ok(Meminfo::parse(&fs::read_to_string("/proc/meminfo")?))
    }

    pub fn parse(text: &str) -> Meminfo {
        let mut m = Meminfo::default();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(key), Some(Ok(v))) = (f.next(), f.next().map(str::parse::<u64>)) else {
                continue;
            };
            match key {
                "MemAvailable:" => m.available = v,
                "PageTables:" => m.page_tables = v,
                "KernelStack:" => m.kernel_stack = v,
                "Slab:" => m.slab = v,
                _ => {}
            }
        }
        m
    }
}

/// Threads (kernel scheduling entities) on the whole machine: the number
/// after the slash in `/proc/loadavg`.
pub fn system_threads() -> Option<u64> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace()
        .nth(3)?
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// The bytes each slab cache holds (its slabs' pages), from `/proc/slabinfo`
/// (readable by root only).
#[derive(Clone, Debug, Default)]
pub struct Slabs(HashMap<String, u64>);

/// How the slab caches grew, in KiB, sorted by what the objects are for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SlabGrowth {
    /// Sockets and their buffers, both ends of a loopback connection.
    pub sockets: f64,
    /// Tasks, their memory maps, files and signal tables.
    pub tasks: f64,
    /// Every other cache (open files, directory entries, kmalloc...).
    pub other: f64,
}

/// Caches a TCP socket's objects live in (a loopback connection has two).
const SOCKET_CACHES: [&str; 6] = [
    "TCP",
    "TCPv6",
    "sock_inode_cache",
    "request_sock_",
    "tw_sock_",
    "skbuff_",
];

/// Caches a process's or thread's objects live in.
const TASK_CACHES: [&str; 14] = [
    "task_struct",
    "mm_struct",
    "vm_area_struct",
    "maple_node",
    "anon_vma",
    "anon_vma_chain",
    "signal_cache",
    "sighand_cache",
    "files_cache",
    "fs_cache",
    "cred_jar",
    "pid",
    "task_delay_info",
    "sigqueue",
];

impl Slabs {
    pub fn read() -> Option<Slabs> {
        let text = fs::read_to_string("/proc/slabinfo").ok()?;
        Some(Slabs::parse(&text, super::sys::page_size()))
    }

    /// `name active num objsize perslab pagesperslab : tunables ... : slabdata active_slabs num_slabs ...`
    pub fn parse(text: &str, page: u64) -> Slabs {
        let mut caches = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            let slabdata = f.iter().position(|w| *w == "slabdata");
            if let (Some(name), Some(pages), Some(at)) = (f.first(), num(5), slabdata)
                && let Some(slabs) = num(at + 2)
            {
                caches.insert(name.to_string(), slabs * pages * page);
            }
        }
        Slabs(caches)
    }

    /// How much each kind of cache grew from `self` to `later`, in KiB.
    pub fn growth(&self, later: &Slabs) -> SlabGrowth {
        let mut g = SlabGrowth::default();
        for (name, &now) in &later.0 {
            let kib = (now as f64 - *self.0.get(name).unwrap_or(&0) as f64) / 1024.0;
            let is = |list: &[&str]| {
                list.iter()
                    .any(|c| name == c || (c.ends_with('_') && name.starts_with(c)))
            };
            if is(&SOCKET_CACHES) {
                g.sockets += kib;
            } else if is(&TASK_CACHES) {
                g.tasks += kib;
            } else {
                g.other += kib;
            }
        }
        g
    }
}

/// The kernel limits on tasks that a host's defaults make the first to
/// stop a process-per-connection server.
const TASK_LIMITS: [&str; 2] = ["/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"];

fn read_sysctl(path: &str) -> io::Result<u64> {
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: not a number")))
}

/// `kernel.pid_max` from its path.
fn sysctl_name(path: &str) -> String {
    path.trim_start_matches("/proc/sys/").replace('/', ".")
}

/// How many more tasks (processes and threads) the kernel allows: the
/// smaller of `kernel.pid_max` and `kernel.threads-max`, less what runs now.
pub fn task_room() -> Option<(u64, String)> {
    let live = system_threads()?;
    TASK_LIMITS
        .iter()
        .filter_map(|p| Some((read_sysctl(p).ok()?, sysctl_name(p))))
        .min_by_key(|(v, _)| *v)
        .map(|(v, name)| (v.saturating_sub(live), format!("{name} = {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_lines_are_read_by_name() {
        let m = Meminfo::parse(
            "MemTotal:       24000000 kB\nMemFree:        20000000 kB\n\
             Slab:             305340 kB\nSReclaimable:     229536 kB\n\
             MemAvailable:   23000000 kB\nKernelStack:        2132 kB\n\
             PageTables:         3700 kB\n",
        );
        assert_eq!(
            m,
            Meminfo {
                available: 23_000_000,
                page_tables: 3700,
                kernel_stack: 2132,
                slab: 305_340
            }
        );
    }

    #[test]
    fn slab_growth_is_sorted_by_cache() {
        let head = "slabinfo - version: 2.1\n# name <active_objs> ...\n";
        let line = |name: &str, slabs: u64| {
            format!("{name} 1 1 64 64 2 : tunables 0 0 0 : slabdata {slabs} {slabs} 0\n")
        };
        let before = Slabs::parse(
            &format!(
                "{head}{}{}{}",
                line("TCP", 1),
                line("task_struct", 1),
                line("filp", 1)
            ),
            4096,
        );
        let after = Slabs::parse(
            &format!(
                "{head}{}{}{}{}",
                line("TCP", 3),
                line("task_struct", 2),
                line("filp", 1),
                line("skbuff_head_cache", 1)
            ),
            4096,
        );
        // Each slab is 2 pages of 4 KiB.
        let g = before.growth(&after);
        assert_eq!(g.sockets, 2.0 * 8.0 + 8.0);
        assert_eq!(g.tasks, 8.0);
        assert_eq!(g.other, 0.0);
    }

    #[test]
    fn sysctl_names_read_as_sysctl_prints_them() {
        assert_eq!(sysctl_name("/proc/sys/kernel/pid_max"), "kernel.pid_max");
        assert_eq!(
            sysctl_name("/proc/sys/kernel/threads-max"),
            "kernel.threads-max"
        );
    }
}
