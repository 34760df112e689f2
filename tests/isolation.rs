//! A connection's process cannot harm the dispatcher: what a child shares
//! with it is overwritten the way an attacker who controls the child would,
//! and the pid bookkeeping holds whatever the pid range.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use forkd_test_util::*;

const LONG: Duration = Duration::from_secs(15);

fn root_or_skip(test: &str, why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping {test}: needs root ({why})");
    false
}

/// The writable shared mappings of `pid`, as (start, end) addresses.
fn writable_shared_mappings(pid: i32) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            if !(perms.contains('w') && perms.ends_with('s')) {
                return None;
            }
            let (lo, hi) = range.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .collect()
}

/// Garbage a hostile child would write: the decoy's pid in every width
/// and alignment a table could hold it, between huge and tiny numbers.
fn garbage(len: usize, decoy: i32) -> Vec<u8> {
    let mut unit = Vec::new();
    unit.extend_from_slice(&(decoy as u32).to_le_bytes());
    unit.extend_from_slice(&(decoy as u32).to_le_bytes());
    unit.extend_from_slice(&(decoy as u64).to_le_bytes());
    unit.extend_from_slice(&u64::MAX.to_le_bytes());
    unit.extend_from_slice(&1u32.to_le_bytes());
    unit.extend_from_slice(&(decoy as u32 + 1).to_le_bytes());
    unit.iter().copied().cycle().take(len).collect()
}

/// Overwrite every writable shared mapping of `pid` through /proc/PID/mem;
/// returns the bytes written.
fn trample(pid: i32, decoy: i32) -> u64 {
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open the child's memory");
    let mut written = 0;
    for (lo, hi) in writable_shared_mappings(pid) {
        let junk = garbage((hi - lo) as usize, decoy);
        mem.write_all_at(&junk, lo)
            .expect("write the child's memory");
        written += hi - lo;
    }
    written
}

/// `lazy`: whether the last child stays a zombie until the next accept.
fn compromised_child(mode_args: &[&str], lazy: bool) {
    // A process forkd did not start, whose pid the garbage carries.
    let mut decoy = Command::new("sleep")
        .arg("120")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the decoy");
    let decoy_pid = decoy.id() as i32;

    let mut args = vec!["--grace", "1s"];
    args.extend_from_slice(mode_args);
    let mut f = Forkd::start(&args);
    let mut hostile = connect(f.addr());
    ping(&mut hostile, b"the connection an attacker controls\n");
    f.check(
        wait_until(LONG, || f.live_children().len() == 1),
        "expected one child",
    );
    let kid = f.live_children()[0];
    let written = trample(kid, decoy_pid);
    f.check(written > 0, "the child has no writable shared mapping");

    // Everyone else is still served, byte for byte, and reaped.
    for i in 0..20u64 {
        let data = pattern(4096 + i as usize * 777, i);
        f.check(
            roundtrip(f.addr(), &data) == data,
            &format!("client {i} not echoed unchanged"),
        );
    }
    // With --reap lazy, the last children stay zombies until the next
    // accept (one or, on a busy machine, a few); otherwise all are reaped.
    f.check(
        wait_until(LONG, || {
            let (ends, zombies) = (f.count_log("end pid "), f.zombies());
            ends + zombies >= 20 && (if lazy { zombies >= 1 } else { zombies == 0 })
        }),
        "the 20 clients were not all reaped",
    );
    // The compromised child is still connected; the stop must end it, and
    // signal nothing else.
    ping(&mut hostile, b"still here\n");
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    let mut buf = [0u8; 1];
    f.check(
        matches!(hostile.read(&mut buf), Ok(0) | Err(_)),
        "the compromised child outlived the stop",
    );
    f.check(
        decoy.try_wait().unwrap().is_none(),
        "forkd signalled the decoy, a process it did not start",
    );
    let _ = decoy.kill();
    let _ = decoy.wait();
}

#[test]
fn a_compromised_child_cannot_harm_the_dispatcher() {
    if !root_or_skip(
        "a_compromised_child_cannot_harm_the_dispatcher",
        "writing another process's memory through /proc/PID/mem",
    ) {
        return;
    }
    compromised_child(&[], false);
    compromised_child(&["--reap", "lazy"], true);
    compromised_worker();
}

/// Prefork: a worker overwrites everything it shares (the scoreboard: every
/// worker's state, per-source keys and counts, and the log gates) with the
/// decoy's pid; the parent reads it only for reports, and signals only its
/// own records' pids.
fn compromised_worker() {
    let mut decoy = Command::new("sleep")
        .arg("120")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the decoy");
    let decoy_pid = decoy.id() as i32;
    // Per-source limits on: the garbage lands in their counts too.
    let mut f = Forkd::start(&[
        "--mode",
        "prefork",
        "--workers",
        "4",
        "--grace",
        "1s",
        "--max-per-ip",
        "32",
        "--max-per-net",
        "128",
    ]);
    let mut hostile = connect(f.addr());
    ping(&mut hostile, b"the connection an attacker controls\n");
    f.check(
        wait_until(LONG, || f.live_children().len() == 4),
        "expected four workers",
    );
    let want = format!("conn {}", hostile.local_addr().unwrap());
    let kid = *f
        .live_children()
        .iter()
        .find(|&&p| cmdline(p).unwrap_or_default().ends_with(&want))
        .expect("the hostile connection's worker");
    let written = trample(kid, decoy_pid);
    f.check(written > 0, "the worker has no writable shared mapping");
    for i in 0..20u64 {
        let data = pattern(4096 + i as usize * 777, i);
        f.check(
            roundtrip(f.addr(), &data) == data,
            &format!("client {i} not echoed unchanged"),
        );
    }
    // Status, and STATUS-like reports, read the garbage without harm.
    f.signal(libc::SIGUSR1);
    f.check(f.wait_log("status: mode prefork", LONG), "no status line");
    ping(&mut hostile, b"still here\n");
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    f.check(f.log().contains("stopped: "), "no summary");
    let mut buf = [0u8; 1];
    f.check(
        matches!(hostile.read(&mut buf), Ok(0) | Err(_)),
        "the compromised worker outlived the stop",
    );
    f.check(
        decoy.try_wait().unwrap().is_none(),
        "forkd signalled the decoy, a process it did not start",
    );
    let _ = decoy.kill();
    let _ = decoy.wait();
}

#[test]
fn a_child_killed_mid_stream_is_logged_with_what_it_echoed() {
    let f = Forkd::start(&[]);
    let mut s = connect(f.addr());
    let data = pattern(10_000, 7);
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    f.check(
        wait_until(LONG, || f.live_children().len() == 1),
        "expected one child",
    );
    let kid = f.live_children()[0];
    // Asleep again in recv: the count for what it sent is stored.
    f.check(
        wait_until(LONG, || proc_stat(kid).is_some_and(|p| p.state == 'S')),
        "the child did not go back to waiting for data",
    );
    // SAFETY: kill(2) on forkd's child.
    unsafe { libc::kill(kid, libc::SIGKILL) };
    f.check(
        f.wait_log(
            &format!(
                "end pid {kid} {}: killed by SIGKILL, 10000 bytes echoed",
                s.local_addr().unwrap()
            ),
            LONG,
        ),
        "the killed child's end line lost its byte count",
    );
}

fn read_sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .unwrap()
        .trim()
        .to_string()
}

fn write_sysctl(name: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/kernel/{name}"), value)
}

/// Puts `kernel.pid_max` back however the test ends.
struct PidMax(String);

impl Drop for PidMax {
    fn drop(&mut self) {
        let _ = write_sysctl("pid_max", &self.0);
    }
}

#[test]
fn pids_above_the_pid_max_forkd_started_with_are_tracked_exactly() {
    if !root_or_skip(
        "pids_above_the_pid_max_forkd_started_with_are_tracked_exactly",
        "raising kernel.pid_max",
    ) {
        return;
    }
    let old: u64 = read_sysctl("pid_max").parse().unwrap();
    let mut f = Forkd::start(&["-c", "16"]);
    let restore = PidMax(old.to_string());
    let high = (old * 4).min(4_194_304);
    if write_sysctl("pid_max", &high.to_string()).is_err()
        || write_sysctl("ns_last_pid", &(old + 100).to_string()).is_err()
    {
        eprintln!("skipping: kernel.pid_max or ns_last_pid cannot be written here");
        return;
    }
    let mut above = 0;
    for i in 0..64u64 {
        let mut s = connect(f.addr());
        ping(&mut s, b"hello\n");
        if f.live_children().iter().any(|&p| p as u64 > old) {
            above += 1;
        }
        drop(s);
        let _ = i;
    }
    drop(restore);
    f.check(above > 0, "no child got a pid above the old pid_max");
    f.check(
        wait_until(LONG, || f.count_log("end pid ") == 64),
        "not every child's end was logged",
    );
    f.signal(libc::SIGUSR1);
    f.check(
        f.wait_log("active 0/16, served 64, reaped 64", LONG),
        "slots leaked: the status line should show none active",
    );
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
    f.check(
        f.log()
            .contains("stopped: 64 connections served, 64 ended (0 by signal)"),
        "summary",
    );
}

fn oom_score_adj(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn under_memory_pressure_a_connection_dies_before_the_dispatcher() {
    let f = Forkd::start(&[]);
    let (_s, kid) = f.connection_and_child();
    // The child raises its score before it first waits for its client.
    let parent = oom_score_adj(f.pid());
    let raised = (parent + 500).min(1000);
    wait_until(LONG, || oom_score_adj(kid) == raised);
    let child = oom_score_adj(kid);
    f.check(
        child == (parent + 500).min(1000) && child > parent,
        &format!("oom_score_adj: dispatcher {parent}, child {child}"),
    );
}

/// A memory cgroup (v1 or v2) of its own, removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn new(limit: u64) -> Option<MemoryCgroup> {
        let name = format!("forkd-oom-test-{}", std::process::id());
        for (root, v2) in [("/sys/fs/cgroup/memory", false), ("/sys/fs/cgroup", true)] {
            let dir = std::path::Path::new(root).join(&name);
            let limit_file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            if !std::path::Path::new(root)
                .join(if v2 { "cgroup.controllers" } else { "tasks" })
                .exists()
            {
                continue;
            }
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cg = MemoryCgroup { dir, v2 };
            if std::fs::write(cg.dir.join(limit_file), limit.to_string()).is_ok() {
                let swap = if v2 {
                    "memory.swap.max"
                } else {
                    "memory.memsw.limit_in_bytes"
                };
                let _ = std::fs::write(
                    cg.dir.join(swap),
                    if v2 { "0".into() } else { limit.to_string() },
                );
                return Some(cg);
            }
        }
        None
    }

    fn procs(&self) -> std::path::PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = self.v2;
        wait_until(Duration::from_secs(10), || {
            std::fs::remove_dir(&self.dir).is_ok()
        });
    }
}

#[test]
fn out_of_memory_a_connection_is_killed_never_the_dispatcher() {
    if !root_or_skip(
        "out_of_memory_a_connection_is_killed_never_the_dispatcher",
        "creating a memory cgroup",
    ) {
        return;
    }
    let Some(cg) = MemoryCgroup::new(24 << 20) else {
        eprintln!("skipping out_of_memory_...: no memory cgroup can be made here");
        return;
    };
    // forkd starts inside the cgroup (its children follow it there).
    let procs = cg.procs();
    let mut cmd = Command::new(forkd());
    // SAFETY: the closure only opens, writes and closes a file (no allocation
    // beyond what the path already holds), before exec.
    let path = std::ffi::CString::new(procs.to_str().unwrap()).unwrap();
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let me = b"0";
            libc::write(fd, me.as_ptr().cast(), me.len());
            libc::close(fd);
            Ok(())
        });
    }
    let mut f = Forkd::start_with(cmd, &["--buffer", "1MiB", "-c", "100"]);
    let mut conns: Vec<std::net::TcpStream> = (0..30).map(|_| connect(f.addr())).collect();
    for s in &mut conns {
        ping(s, b"hi");
    }
    // Each child waits for more, and after a second raises its score.
    let dispatcher = oom_score_adj(f.pid());
    f.check(
        wait_until(LONG, || {
            let kids = f.live_children();
            kids.len() == 30 && kids.iter().all(|&k| oom_score_adj(k) > dispatcher)
        }),
        "the children did not raise their OOM scores",
    );
    // Now every child fills its 1 MiB buffer: 30 MiB in a 24 MiB cgroup.
    let senders: Vec<_> = conns
        .iter()
        .map(|s| {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = w.write_all(&vec![7u8; 1 << 20]);
            })
        })
        .collect();
    f.check(
        f.wait_log("killed by SIGKILL", Duration::from_secs(30)),
        "no child was killed: the cgroup never ran out of memory",
    );
    let alive = f.child.try_wait().unwrap().is_none();
    f.check(alive, "the OOM killer took the dispatcher");
    drop(conns);
    for s in senders {
        let _ = s.join();
    }
    let data = pattern(1000, 5);
    f.check(
        wait_until(LONG, || roundtrip(f.addr(), &data) == data),
        "not serving after the OOM kill",
    );
    f.signal(libc::SIGTERM);
    f.expect_clean_exit(LONG);
}
