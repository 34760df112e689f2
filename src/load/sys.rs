//! The generator's own resources: its CPU time (so it can be seen not to be
//! the bottleneck), its descriptor limit, CPU affinity for `--pin`, and the
//! cheapest way to open a connection with timeouts.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect as connect_fd, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;

/// Connect to `addr`, with `timeout` on the connect and on every later read
/// and write.
///
/// Both timeouts are set before connecting, and the connect itself blocks:
/// Linux bounds a blocking connect by SO_SNDTIMEO. That is four system calls
/// (socket, two setsockopt, connect) where std's `connect_timeout` and its
/// timeouts take eight (a non-blocking connect, two ioctls, a poll, then the
/// two setsockopt). The generator shares the machine with the servers it
/// measures: what it spends per connection, they cannot use.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_from(addr, None, timeout)
}

/// [`connect`] from a chosen local address (its port picked at connect time,
/// IP_BIND_ADDRESS_NO_PORT): each loopback address 127.0.0.0/8 has its own
/// range of client ports, so spreading connections over several lifts the
/// limit `net.ipv4.ip_local_port_range` puts on one (about 28,000).
pub fn connect_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    if let Some(ip) = source {
        setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
        bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(ip, 0)),
        )?;
    }
    // A zero timeout would mean none at all.
    let t = timeout.max(Duration::from_micros(1));
    let tv = TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    match connect_fd(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) => Ok(TcpStream::from(fd)),
        // A blocking connect still waiting at SO_SNDTIMEO fails with EINPROGRESS.
        Err(Errno::EINPROGRESS) => Err(io::ErrorKind::TimedOut.into()),
        Err(e) => Err(e.into()),
    }
}

/// Client addresses the generator spreads its connections over on IPv4
/// loopback. Linux hands `connect` only every other port of
/// `ip_local_port_range` and reuses a port in TIME_WAIT only after a second,
/// which caps one client address at about 14,000 connections a second to
/// one server: below what the faster servers here can take. Eight
/// addresses lift that cap eightfold.
pub const SOURCES: usize = 8;

/// The local address connection source `k` uses towards `addr`: one of
/// 127.0.0.1..=127.0.0.`n` when `addr` is IPv4 loopback, else none (IPv6
/// loopback is a single address).
pub fn loopback_source(addr: SocketAddr, k: usize, n: usize) -> Option<IpAddr> {
    match addr {
        SocketAddr::V4(a) if a.ip().is_loopback() => Some(IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            0,
            0,
            1 + (k % n.clamp(1, 254)) as u8,
        ))),
        _ => None,
    }
}

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

/// The hard RLIMIT_NOFILE: the most descriptors this process may have.
pub fn nofile_hard() -> io::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.1)
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
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    Some(
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
    )
}

/// Restrict the calling thread (and threads it starts later) to `cpus`.
///
/// Allocates nothing and makes only the sched_setaffinity system call, so
/// it may also run between fork and exec (`pre_exec`).
pub fn pin_current(cpus: &[usize]) -> io::Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(())
}

/// The size of a memory page in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Clock ticks per second, the unit of CPU times in /proc/PID/stat.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_the_cpus_it_was_given() {
        let allowed = allowed_cpus().expect("sched_getaffinity");
        assert!(!allowed.is_empty());
        let last = *allowed.last().unwrap();
        // In a thread of its own, so the test's other threads keep their CPUs.
        let after = std::thread::spawn(move || {
            pin_current(&[last]).unwrap();
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(after, Some(vec![last]));
        assert!(pin_current(&[CpuSet::count()]).is_err());
    }
}
