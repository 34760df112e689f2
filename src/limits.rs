//! Resource limits: the descriptor limit forkd raises for itself, and the
//! per-source-address connection counts behind `--max-per-ip`.

use std::collections::HashMap;
use std::net::IpAddr;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raise the RLIMIT_NOFILE soft limit to the hard limit; returns the new
/// soft limit. Each connection costs the dispatcher a descriptor in thread
/// mode, and a moment's descriptor in fork mode.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Live connections per source address. Every connection counted in
/// [`PerIp::admit`] is released by [`PerIp::release`] when its end is
/// collected, whatever way it ended (the dispatcher does both, keyed by the
/// connection's record, so no path can leak a count).
#[derive(Default)]
pub struct PerIp {
    limit: u32,
    counts: HashMap<IpAddr, u32>,
}

impl PerIp {
    /// `limit` 0 means no limit (and no bookkeeping).
    pub fn new(limit: u32) -> PerIp {
        PerIp {
            limit,
            counts: HashMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Count a new connection from `ip`, or refuse it if `ip` is at its limit.
    pub fn admit(&mut self, ip: IpAddr) -> bool {
        if !self.enabled() {
            return true;
        }
        let n = self.counts.entry(canonical(ip)).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    pub fn release(&mut self, ip: IpAddr) {
        if !self.enabled() {
            return;
        }
        let ip = canonical(ip);
        if let Some(n) = self.counts.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&ip);
            }
        }
    }
}

/// An IPv4 client seen through an IPv6 socket counts as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_releases() {
        let mut p = PerIp::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(p.admit(a));
        assert!(p.admit(mapped));
        assert!(!p.admit(a));
        p.release(a);
        assert!(p.admit(a));
        p.release(a);
        p.release(a);
        assert!(p.counts.is_empty());
    }
}
