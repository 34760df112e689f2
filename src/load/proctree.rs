//! A server's process tree as `/proc` shows it: the server and every
//! descendant, with their states, threads, memory (PSS) and CPU time.
//!
//! PSS (proportional set size) is the honest memory figure for forked
//! children: a page shared by the dispatcher and 1000 children counts 1/1001
//! to each, so summing PSS over the tree counts every page once. It is read
//! from `/proc/PID/smaps_rollup`.

use std::collections::HashMap;
use std::io;

/// One process's line of `/proc/PID/stat`, the fields used here.
#[derive(Clone, Debug)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub threads: u64,
    /// utime + stime + cutime + cstime, in clock ticks: the process's own
    /// CPU time and that of its children it has waited for.
    pub cpu_ticks: u64,
}

/// Parse `/proc/PID/stat` text (the command name may hold spaces and parentheses).
pub fn parse_stat(pid: i32, text: &str) -> Option<Stat> {
    let close = text.rfind(')')?;
    let f: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let cpu = num(14)? + num(15)? + num(16)? + num(17)?;
    Some(Stat {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        state: f.first()?.chars().next()?,
        threads: num(20)?,
        cpu_ticks: cpu,
    })
}

pub fn read_stat(pid: i32) -> Option<Stat> {
    parse_stat(
        pid,
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
    )
}

/// The tree rooted at a pid, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub procs: Vec<Stat>,
}

impl Tree {
    /// Read the tree rooted at `root`: the root and all its descendants.
    pub fn read(root: i32) -> io::Result<Tree> {
        let Some(top) = read_stat(root) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no process {root}"),
            ));
        };
        let mut by_parent: HashMap<i32, Vec<Stat>> = HashMap::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == root {
                continue;
            }
            if let Some(s) = read_stat(pid) {
                by_parent.entry(s.ppid).or_default().push(s);
            }
        }
        let mut procs = vec![top];
        let mut i = 0;
        while i < procs.len() {
            if let Some(kids) = by_parent.remove(&procs[i].pid) {
                procs.extend(kids);
            }
            i += 1;
        }
        Ok(Tree { procs })
    }

    pub fn count(&self) -> u64 {
        self.procs.len() as u64
    }

    pub fn threads(&self) -> u64 {
        self.procs.iter().map(|p| p.threads).sum()
    }

    pub fn zombies(&self) -> u64 {
        self.procs.iter().filter(|p| p.state == 'Z').count() as u64
    }

    /// CPU seconds of the whole tree, waited-for children included.
    pub fn cpu_s(&self) -> f64 {
        let ticks: u64 = self.procs.iter().map(|p| p.cpu_ticks).sum();
        ticks as f64 / super::sys::clock_ticks()
    }

    /// The tree's page tables in KiB: `VmPTE` summed (zombies and vanished processes count 0).
    pub fn page_tables_kib(&self) -> u64 {
        self.procs
            .iter()
            .map(|p| page_tables_kib(p.pid).unwrap_or(0))
            .sum()
    }

    /// Total PSS of the tree in KiB (zombies and vanished processes count 0).
    pub fn pss_kib(&self) -> u64 {
        self.procs.iter().map(|p| pss_kib(p.pid).unwrap_or(0)).sum()
    }
}

/// CPU seconds of the tree at `root` now, or None when it cannot be read.
pub fn cpu_s(root: Option<i32>) -> Option<f64> {
    Tree::read(root?).ok().map(|t| t.cpu_s())
}

/// CPU seconds the tree of `root` used since it had used `before`.
pub fn cpu_s_since(before: Option<f64>, root: Option<i32>) -> Option<f64> {
    Some(cpu_s(root)? - before?)
}

/// The `Pss:` line of `/proc/PID/smaps_rollup`, in KiB.
pub fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss(&text)
}

/// The `VmPTE:` line of `/proc/PID/status`, in KiB: the process's page tables.
pub fn page_tables_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmPTE:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn parse_pss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let text = "42 (a) b (c)) S 7 42 42 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 3 0 1 2 3";
        let s = parse_stat(42, text).unwrap();
        assert_eq!((s.ppid, s.state, s.threads, s.cpu_ticks), (7, 'S', 3, 110));
    }

    #[test]
    fn own_tree_and_pss() {
        let me = std::process::id() as i32;
        let t = Tree::read(me).unwrap();
        assert_eq!(t.procs[0].pid, me);
        assert!(t.threads() >= 1);
        assert!(t.pss_kib() > 0);
        assert!(t.page_tables_kib() > 0);
        assert_eq!(parse_pss("Rss: 10 kB\nPss:  123 kB\n"), Some(123));
    }
}
