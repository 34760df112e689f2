//! The generator's own resources: its CPU time (so it can be seen not to be
//! the bottleneck), its descriptor limit, and CPU affinity for `--pin`.

use std::io;

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn self_cpu_s() -> f64 {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            secs(u.user_time()) + secs(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// Raise the soft RLIMIT_NOFILE towards `want` descriptors, as far as the
/// hard limit allows; returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    let new = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard)?;
    Ok(new)
}

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// CPUs split for `--pin`: the servers get the first half, the generator the rest.
pub fn split_cpus() -> Option<(Vec<usize>, Vec<usize>)> {
    let allowed = allowed_cpus()?;
    if allowed.len() < 2 {
        return None;
    }
    let half = allowed.len() / 2;
    Some((allowed[..half].to_vec(), allowed[half..].to_vec()))
}

/// The CPU numbers in this process's affinity mask.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

/// Restrict the calling thread (and threads it starts later) to `cpus`.
///
/// Only makes the sched_setaffinity system call, so it may also run between
/// fork and exec (`pre_exec`).
pub fn pin_current(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: as in allowed_cpus; CPU_SET only sets bits inside the set, for
    // CPU numbers that came from CPU_ISSET below CPU_SETSIZE.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Clock ticks per second, the unit of CPU times in /proc/PID/stat.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
