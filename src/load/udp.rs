//! `udp`: datagrams echoed over UDP (RFC 862), one in flight per worker.
//!
//! Each of N workers has its own UDP socket, connected to the server, and
//! sends a datagram of `--size` bytes, waits up to `--wait` for the reply,
//! checks every byte, and sends the next. A datagram with no reply within
//! `--wait` is lost: counted, not an error, since UDP may lose datagrams
//! (but `compare` reports it, and on loopback it should be none). The
//! latency is from the send to the checked reply.
//!
//! A datagram of 8 bytes or more starts with its worker and sequence
//! number, so a reply that comes after its datagram was counted lost is
//! recognised as late and skipped, not taken for a wrong echo. Anything
//! else that comes back different is corruption; a reply of another length
//! is a short read or extra: errors, as in `rate`.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::cli::UdpArgs;
use super::pattern;
use super::report::{Errors, Failure, Kind, Latency, MIB, Report, new_histogram, record};
use super::workers::{self, Cost, Outcome as _};
use forkd::error::Error;

/// Offsets into a worker's pattern, so consecutive datagrams differ.
const SHIFTS: usize = 251;
/// Pause after a refused send (nothing listening), so a dead server is not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// What a UDP run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub duration: Duration,
    pub concurrency: usize,
    pub size: usize,
    /// How long a reply may take before its datagram counts as lost.
    pub wait: Duration,
    pub pid: Option<i32>,
}

/// What a UDP run measured; runs against one server can be merged.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub datagrams: u64,
    pub lost: u64,
    pub late: u64,
    pub bytes: u64,
    pub errors: Errors,
    pub latency: Histogram<u64>,
    pub cost: Cost,
}

impl workers::Outcome for Outcome {
    fn merge(&mut self, o: &Outcome) {
        self.datagrams += o.datagrams;
        self.lost += o.lost;
        self.late += o.late;
        self.bytes += o.bytes;
        self.errors.merge(&o.errors);
        let _ = self.latency.add(&o.latency);
        self.cost.add(&o.cost);
    }

    fn report(&self, addr: SocketAddr) -> Report {
        let secs = self.cost.elapsed.as_secs_f64().max(1e-9);
        let sent = self.datagrams + self.lost + self.errors.total;
        let mut notes = Vec::new();
        if self.late > 0 {
            notes.push(format!(
                "{} replies came after their datagram was counted lost",
                self.late
            ));
        }
        Report {
            workload: "udp",
            addr: format!("udp {addr}"),
            elapsed_s: secs,
            datagrams: Some(self.datagrams),
            dgram_per_s: Some(self.datagrams as f64 / secs),
            lost: Some(self.lost),
            loss_pct: Some(if sent == 0 {
                0.0
            } else {
                self.lost as f64 * 100.0 / sent as f64
            }),
            bytes: self.bytes,
            mib_per_s: Some(self.bytes as f64 / MIB / secs),
            latency_us: Latency::of(&self.latency),
            errors: self.errors.clone(),
            gen_cpu_s: self.cost.gen_cpu_s,
            server_cpu_s: self.cost.server_cpu_s,
            notes,
            ok: self.errors.total == 0 && self.datagrams > 0,
            ..Report::default()
        }
    }
}

/// `forkd-load udp`.
pub fn main(a: &UdpArgs) -> Result<u8, Error> {
    let plan = Plan {
        addr: a.common.addr,
        duration: a.duration,
        concurrency: a.concurrency,
        size: a.size,
        wait: a.wait,
        pid: a.common.pid,
    };
    Ok(workers::print(
        &run(&plan, "udp")?,
        plan.addr,
        a.common.json,
    ))
}

/// Run the workload once.
pub fn run(plan: &Plan, label: &str) -> Result<Outcome, Error> {
    let (results, cost) = workers::timed(
        label,
        plan.duration,
        plan.pid,
        plan.concurrency,
        "udp",
        Some(256 << 10),
        |id, _, deadline| worker(plan, id, deadline),
    )?;
    let mut total = empty();
    for w in results {
        total.merge(&w?);
    }
    // The workers' own costs are nothing: the run's is the whole.
    total.cost = cost;
    Ok(total)
}

/// Nothing measured yet.
fn empty() -> Outcome {
    Outcome {
        datagrams: 0,
        lost: 0,
        late: 0,
        bytes: 0,
        errors: Errors::default(),
        latency: new_histogram(),
        cost: Cost::default(),
    }
}

fn worker(plan: &Plan, id: usize, deadline: Instant) -> Result<Outcome, Error> {
    let local: SocketAddr = match plan.addr {
        SocketAddr::V4(_) => ([127, 0, 0, 1], 0).into(),
        SocketAddr::V6(_) => ([0, 0, 0, 0, 0, 0, 0, 1], 0).into(),
    };
    let setup = |e| Error::os("cannot set up a UDP client socket", e);
    let sock = UdpSocket::bind(local).map_err(setup)?;
    sock.connect(plan.addr).map_err(setup)?;
    let source = pattern::bytes(plan.size + SHIFTS, id as u64 + 1);
    let mut payload = vec![0u8; plan.size];
    let mut buf = vec![0u8; plan.size.max(1) + 1];
    let mut o = empty();
    // One timeout for every receive: a reply later than `wait` is lost (a
    // late reply skipped can stretch one wait; it is counted).
    sock.set_read_timeout(Some(plan.wait.max(Duration::from_micros(1))))
        .map_err(setup)?;
    let tagged = plan.size >= 8;
    let mut lost_any = false;
    let mut seq: u32 = 0;
    while Instant::now() < deadline {
        let shift = seq as usize % SHIFTS;
        payload.copy_from_slice(&source[shift..shift + plan.size]);
        if tagged {
            payload[..4].copy_from_slice(&(id as u32).to_be_bytes());
            payload[4..8].copy_from_slice(&seq.to_be_bytes());
        }
        seq = seq.wrapping_add(1);
        let t0 = Instant::now();
        if let Err(e) = sock.send(&payload) {
            o.errors.add(Failure::io("send", &e));
            std::thread::sleep(ERROR_PAUSE);
            continue;
        }
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    o.lost += 1;
                    lost_any = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    o.errors.add(Failure::io("receive", &e));
                    std::thread::sleep(ERROR_PAUSE);
                    break;
                }
            };
            match check(&buf[..n], &payload, tagged, lost_any) {
                Check::Ok => {
                    o.datagrams += 1;
                    o.bytes += n as u64;
                    record(&mut o.latency, t0.elapsed());
                    break;
                }
                Check::Late => o.late += 1,
                Check::Bad(f) => {
                    o.errors.add(f);
                    break;
                }
            }
        }
    }
    Ok(o)
}

enum Check {
    Ok,
    /// The reply to an earlier datagram, already counted lost.
    Late,
    Bad(Failure),
}

fn check(got: &[u8], sent: &[u8], tagged: bool, lost_any: bool) -> Check {
    if got == sent {
        return Check::Ok;
    }
    let late = if tagged {
        got.len() == sent.len() && got[..4] == sent[..4] && got[4..8] != sent[4..8]
    } else {
        // Untagged: after a loss, a reply of the right length may be the lost one's.
        lost_any && got.len() == sent.len()
    };
    if late {
        return Check::Late;
    }
    if got.len() < sent.len() {
        return Check::Bad(Failure::new(
            Kind::ShortRead,
            format!("{} of {} bytes came back", got.len(), sent.len()),
        ));
    }
    if got.len() > sent.len() {
        return Check::Bad(Failure::new(
            Kind::Extra,
            format!(
                "more than {} bytes came back for {}",
                sent.len(),
                sent.len()
            ),
        ));
    }
    let i = got.iter().zip(sent).position(|(a, b)| a != b).unwrap_or(0);
    Check::Bad(Failure::new(
        Kind::Corrupt,
        format!(
            "byte {i} of {} came back as {:#04x}, sent {:#04x}",
            sent.len(),
            got[i],
            sent[i]
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_sorted() {
        let sent = [0, 0, 0, 1, 0, 0, 0, 9, 42, 43];
        assert!(matches!(check(&sent, &sent, true, false), Check::Ok));
        let mut earlier = sent;
        earlier[7] = 8;
        assert!(matches!(check(&earlier, &sent, true, true), Check::Late));
        let mut wrong = sent;
        wrong[9] = 0;
        assert!(matches!(
            check(&wrong, &sent, true, false),
            Check::Bad(Failure {
                kind: Kind::Corrupt,
                ..
            })
        ));
        assert!(matches!(
            check(&sent[..5], &sent, true, false),
            Check::Bad(Failure {
                kind: Kind::ShortRead,
                ..
            })
        ));
        assert!(matches!(check(&[1], &[2], false, true), Check::Late));
        assert!(matches!(check(&[1], &[2], false, false), Check::Bad(_)));
    }
}
