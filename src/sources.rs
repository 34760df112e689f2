//! Live connections per source, behind `--max-per-ip` and `--max-per-net`:
//! one count per address, and one per network (the address cut to
//! `--net-prefix`, /24 and /64 by default, as OpenSSH's
//! `PerSourceNetBlockSize`). An IPv4 client seen through an IPv6 socket
//! counts as its IPv4 address.
//!
//! Every connection counted by [`Sources::admit`] is released by
//! [`Sources::release`] when its end is collected, whatever way it ended
//! (the dispatcher does both, keyed by the peer in its own table, so no
//! path can leak a count). The counts live in memory no child inherits
//! ([`crate::probe`]): a child cannot forge them, and counting a
//! connection costs the dispatcher no copy-on-write fault.

use std::io;
use std::net::{IpAddr, Ipv6Addr};

use crate::probe::{self, Probe};

/// One count: an address or a network (as IPv6, IPv4 mapped), and how many.
#[derive(Clone, Copy)]
struct Count {
    key: u128,
    /// 0 empty, 1 an address, 2 a network.
    kind: u8,
    n: u32,
}

impl probe::Entry for Count {
    fn is_empty(&self) -> bool {
        self.kind == 0
    }
    fn hash(&self) -> u64 {
        (self.key as u64) ^ ((self.key >> 64) as u64).rotate_left(17) ^ self.kind as u64
    }
}

const ADDRESS: u8 = 1;
const NETWORK: u8 = 2;

/// The limits; 0 means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub per_ip: u32,
    pub per_net: u32,
    /// Network prefix lengths: IPv4 (0..=32), IPv6 (0..=128).
    pub v4_prefix: u8,
    pub v6_prefix: u8,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its address has `per_ip` connections already.
    Address,
    /// Its network has `per_net` connections already.
    Network,
}

pub struct Sources {
    limits: Limits,
    counts: Probe<Count>,
}

impl Sources {
    /// Counts for up to `max_conns` connections at once.
    pub fn new(limits: Limits, max_conns: usize) -> io::Result<Sources> {
        // Two counts per connection at most: its address and its network.
        let room = if limits.per_ip == 0 && limits.per_net == 0 {
            1
        } else {
            max_conns.saturating_mul(2)
        };
        // SAFETY: all-zero is an empty Count.
        let counts = unsafe { Probe::new(room)? };
        Ok(Sources { limits, counts })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The address and network keys of `ip`.
    fn keys(&self, ip: IpAddr) -> [(u8, u128, u32); 2] {
        let (addr, net) = keys(ip, self.limits);
        [
            (ADDRESS, addr, self.limits.per_ip),
            (NETWORK, net, self.limits.per_net),
        ]
    }

    fn find(&self, kind: u8, key: u128) -> Option<usize> {
        let probe = Count { key, kind, n: 0 };
        let hash = probe::Entry::hash(&probe);
        self.counts.run(hash).find(|&i| {
            let c = self.counts.get(i);
            c.kind == kind && c.key == key
        })
    }

    /// Count a new connection from `ip`, or say why it is refused.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refused> {
        let keys = self.keys(ip);
        for (kind, key, limit) in keys {
            if limit > 0
                && self
                    .find(kind, key)
                    .is_some_and(|i| self.counts.get(i).n >= limit)
            {
                return Err(if kind == ADDRESS {
                    Refused::Address
                } else {
                    Refused::Network
                });
            }
        }
        for (kind, key, limit) in keys {
            if limit == 0 {
                continue;
            }
            match self.find(kind, key) {
                Some(i) => self.counts.get_mut(i).n += 1,
                None => self.counts.insert(Count { key, kind, n: 1 }),
            }
        }
        Ok(())
    }

    /// A connection from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        for (kind, key, limit) in self.keys(ip) {
            if limit == 0 {
                continue;
            }
            if let Some(i) = self.find(kind, key) {
                let c = self.counts.get_mut(i);
                c.n -= 1;
                if c.n == 0 {
                    self.counts.remove(i);
                }
            }
        }
    }
}

/// The keys `ip` is counted under: its address and its network, as
/// IPv6 (IPv4 mapped), the network cut to `limits`' prefix. (Prefork mode
/// counts these across workers: see [`crate::scoreboard`].)
pub fn keys(ip: IpAddr, limits: Limits) -> (u128, u128) {
    let (v6, prefix) = match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + limits.v4_prefix as u32),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (v4.to_ipv6_mapped(), 96 + limits.v4_prefix as u32),
            None => (v6, limits.v6_prefix as u32),
        },
    };
    let addr = u128::from(v6);
    (
        addr,
        addr & u128::MAX.checked_shl(128 - prefix).unwrap_or(0),
    )
}

/// The network `ip` belongs to, as `--max-per-net` counts it, for log lines.
pub fn network(ip: IpAddr, limits: Limits) -> String {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6)
                & u128::MAX
                    .checked_shl(128 - limits.v6_prefix as u32)
                    .unwrap_or(0);
            format!("{}/{}", Ipv6Addr::from(bits), limits.v6_prefix)
        }
        _ => {
            let v4 = match ip {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            };
            let bits = u32::from(v4)
                & u32::MAX
                    .checked_shl(32 - limits.v4_prefix as u32)
                    .unwrap_or(0);
            format!("{}/{}", std::net::Ipv4Addr::from(bits), limits.v4_prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const LIMITS: Limits = Limits {
        per_ip: 2,
        per_net: 3,
        v4_prefix: 24,
        v6_prefix: 64,
    };

    #[test]
    fn an_address_and_its_network_are_limited_and_released() {
        let mut s = Sources::new(LIMITS, 16).unwrap();
        assert_eq!(s.admit(ip("10.0.0.1")), Ok(()));
        assert_eq!(s.admit(ip("::ffff:10.0.0.1")), Ok(()));
        assert_eq!(s.admit(ip("10.0.0.1")), Err(Refused::Address));
        assert_eq!(s.admit(ip("10.0.0.2")), Ok(()));
        assert_eq!(s.admit(ip("10.0.0.3")), Err(Refused::Network));
        assert_eq!(s.admit(ip("10.0.1.3")), Ok(()), "another /24");
        s.release(ip("10.0.0.1"));
        assert_eq!(s.admit(ip("10.0.0.3")), Ok(()));
        for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.3"] {
            s.release(ip(a));
        }
        assert!(s.counts.is_clear(), "a count leaked");
    }

    #[test]
    fn ipv6_networks_are_slash_64() {
        let mut s = Sources::new(LIMITS, 16).unwrap();
        for host in 1..=3 {
            assert_eq!(s.admit(ip(&format!("2001:db8::{host}"))), Ok(()));
        }
        assert_eq!(s.admit(ip("2001:db8::4")), Err(Refused::Network));
        assert_eq!(s.admit(ip("2001:db8:0:1::4")), Ok(()));
        assert_eq!(network(ip("2001:db8::4"), LIMITS), "2001:db8::/64");
        assert_eq!(network(ip("::ffff:10.1.2.3"), LIMITS), "10.1.2.0/24");
    }

    #[test]
    fn no_limits_count_nothing() {
        let none = Limits {
            per_ip: 0,
            per_net: 0,
            ..LIMITS
        };
        let mut s = Sources::new(none, 16).unwrap();
        for _ in 0..100 {
            assert_eq!(s.admit(ip("10.0.0.1")), Ok(()));
        }
        assert!(s.counts.is_clear());
    }
}
