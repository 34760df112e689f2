//! `rate`: short connections, one after another on each of N workers.
//!
//! A worker connects, sends `--size` bytes, half-closes (shutdown SHUT_WR,
//! as a client of RFC 862 says "that is all"), reads the echo to its end,
//! checks every byte, and starts again until the run's time is up. The
//! latency of a connection is the whole of it, connect to end-of-file: it
//! includes what the server spends to start serving it (a fork, a thread).
//!
//! A reply that ends early is a short read, a wrong byte is corruption, a
//! byte too many is extra: all are errors.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::cli::{ProxyVersion, RateArgs};
use super::pattern;
use super::report::{Errors, Failure, Kind, Latency, MIB, Report, new_histogram, record};
use super::sys;
use super::workers::{self, Cost};
use forkd::error::{Error, count};

/// Offsets into a worker's pattern, so consecutive connections send different bytes.
const SHIFTS: usize = 251;
/// Above this, a connection's sending moves to its own thread, so a server
/// that echoes before reading everything cannot deadlock with us.
const INLINE_WRITE_MAX: usize = 64 << 10;
/// Pause after a failed connection, so a dead server is not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// What a rate run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub duration: Duration,
    pub concurrency: usize,
    pub size: usize,
    pub timeout: Duration,
    /// The server's pid, for its tree's CPU time.
    pub pid: Option<i32>,
    /// Open loop: connections a second in all (see `worker`).
    pub pace: Option<f64>,
    /// Send a PROXY header first.
    pub proxy: Option<ProxyVersion>,
}

/// What a rate run measured; runs against one server can be merged.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub conns: u64,
    pub bytes: u64,
    pub errors: Errors,
    pub latency: Histogram<u64>,
    pub cost: Cost,
    pub pace: Option<f64>,
}

impl workers::Outcome for Outcome {
    fn merge(&mut self, o: &Outcome) {
        self.conns += o.conns;
        self.bytes += o.bytes;
        self.errors.merge(&o.errors);
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&o.latency);
        self.cost.add(&o.cost);
    }

    fn report(&self, addr: SocketAddr) -> Report {
        let secs = self.cost.elapsed.as_secs_f64().max(1e-9);
        Report {
            workload: "rate",
            addr: addr.to_string(),
            elapsed_s: secs,
            conns: self.conns,
            conn_per_s: Some(self.conns as f64 / secs),
            bytes: self.bytes,
            mib_per_s: Some(self.bytes as f64 / MIB / secs),
            latency_us: Latency::of(&self.latency),
            errors: self.errors.clone(),
            gen_cpu_s: self.cost.gen_cpu_s,
            server_cpu_s: self.cost.server_cpu_s,
            pace_per_s: self.pace,
            ok: self.errors.total == 0 && self.conns > 0,
            ..Report::default()
        }
    }
}

/// `forkd-load rate`.
pub fn main(a: &RateArgs) -> Result<u8, Error> {
    let plan = Plan {
        addr: a.common.addr,
        duration: a.duration,
        concurrency: a.concurrency,
        size: a.size,
        timeout: a.common.timeout,
        pid: a.common.pid,
        pace: a.pace,
        proxy: a.proxy,
    };
    Ok(workers::print(
        &run(&plan, "rate")?,
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
        "worker",
        Some(256 << 10),
        |id, start, deadline| worker(plan, id, start, deadline),
    )?;
    let mut total = Outcome {
        conns: 0,
        bytes: 0,
        errors: Errors::default(),
        latency: new_histogram(),
        cost,
        pace: plan.pace,
    };
    for w in results {
        total.conns += w.conns;
        total.bytes += w.bytes;
        total.errors.merge(&w.errors);
        let _ = total.latency.add(&w.latency);
    }
    Ok(total)
}

struct WorkerResult {
    conns: u64,
    bytes: u64,
    errors: Errors,
    latency: Histogram<u64>,
}

/// One worker's connections, one after another.
///
/// Closed loop (no pace), the next starts when the last ends, and a
/// connection's latency is its own duration. Open loop, at a pace of R a
/// second, each of the N workers has a connection due every N/R seconds (the
/// workers' schedules staggered evenly), waits for it if early, and times
/// it from when it was due: a server that falls behind is charged the
/// waiting too, rather than being sent less (the "coordinated omission" a
/// closed loop commits).
fn worker(plan: &Plan, id: usize, start: Instant, deadline: Instant) -> WorkerResult {
    let source = pattern::bytes(plan.size + SHIFTS, id as u64 + 1);
    let every = plan
        .pace
        .map(|r| Duration::from_secs_f64(plan.concurrency as f64 / r));
    let stagger = id as f64 / plan.concurrency as f64;
    let from = sys::loopback_source(plan.addr, id, sys::SOURCES);
    let mut buf = vec![0u8; plan.size.clamp(4096, 64 << 10)];
    let mut r = WorkerResult {
        conns: 0,
        bytes: 0,
        errors: Errors::default(),
        latency: new_histogram(),
    };
    let mut n = 0usize;
    while Instant::now() < deadline {
        // Open loop: this worker's n-th connection is due at start + (n + stagger) × every.
        let due = every.map(|e| start + e.mul_f64(n as f64 + stagger));
        if let Some(d) = due {
            if d >= deadline {
                break;
            }
            std::thread::sleep(d.saturating_duration_since(Instant::now()));
        }
        let shift = n % SHIFTS;
        n += 1;
        let payload = &source[shift..shift + plan.size];
        match one_from(from, plan.addr, payload, &mut buf, plan.timeout, plan.proxy) {
            Ok(took) => {
                r.conns += 1;
                r.bytes += payload.len() as u64;
                // Open loop: from when it was due.
                record(&mut r.latency, due.map_or(took, |d| d.elapsed()));
            }
            Err(f) => {
                r.errors.add(f);
                std::thread::sleep(ERROR_PAUSE);
            }
        }
    }
    r
}

/// One whole connection; its duration, or why it failed.
pub fn one(
    addr: SocketAddr,
    payload: &[u8],
    buf: &mut [u8],
    timeout: Duration,
) -> Result<Duration, Failure> {
    one_from(None, addr, payload, buf, timeout, None)
}

/// As [`one`], from a chosen local address (see [`sys::SOURCES`]), the
/// connection begun with a PROXY header if asked (before the payload, in
/// the same write when the payload is sent inline).
pub fn one_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    payload: &[u8],
    buf: &mut [u8],
    timeout: Duration,
    proxy: Option<ProxyVersion>,
) -> Result<Duration, Failure> {
    let t0 = Instant::now();
    // No TCP_NODELAY: the half-close after the payload pushes out its last
    // segment at once, so Nagle never holds it.
    let mut s = sys::connect_from(addr, from, timeout).map_err(|e| Failure::io("connect", &e))?;
    if let Some(version) = proxy {
        let client = s.local_addr().map_err(|e| Failure::io("getsockname", &e))?;
        let header = match version {
            ProxyVersion::V1 => forkd::proxy::header_v1(client, addr),
            ProxyVersion::V2 => forkd::proxy::header_v2(client, addr),
        };
        if payload.len() <= INLINE_WRITE_MAX {
            // One write, as a balancer's first segment often carries both:
            // a header alone would wait for its ACK under Nagle.
            let mut first = header;
            first.extend_from_slice(payload);
            send(&mut s, &first)?;
            read_echo(&mut s, payload, buf)?;
            return Ok(t0.elapsed());
        }
        s.write_all(&header).map_err(|e| Failure::io("write", &e))?;
    }
    if payload.len() <= INLINE_WRITE_MAX {
        send(&mut s, payload)?;
        read_echo(&mut s, payload, buf)?;
    } else {
        let mut w = s.try_clone().map_err(|e| Failure::io("dup", &e))?;
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || send(&mut w, payload));
            let read = read_echo(&mut s, payload, buf);
            let wrote = writer
                .join()
                .unwrap_or_else(|_| Err(Failure::new(Kind::Other, "writer panicked")));
            // What came back decides; a write error is only news if the read was fine.
            read.and(wrote)
        })?;
    }
    Ok(t0.elapsed())
}

fn send(s: &mut TcpStream, payload: &[u8]) -> Result<(), Failure> {
    s.write_all(payload).map_err(|e| Failure::io("write", &e))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| Failure::io("shutdown", &e))
}

/// Read until end-of-file, checking each byte against `payload`.
fn read_echo(s: &mut TcpStream, payload: &[u8], buf: &mut [u8]) -> Result<(), Failure> {
    let mut got = 0usize;
    loop {
        let n = match s.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                let mut f = Failure::io("read", &e);
                f.message = format!("{} after {got} of {} bytes", f.message, payload.len());
                return Err(f);
            }
        };
        let inside = n.min(payload.len() - got);
        let differs = buf[..inside] != payload[got..got + inside];
        if let Some(i) = (0..inside).find(|&i| differs && buf[i] != payload[got + i]) {
            return Err(Failure::new(
                Kind::Corrupt,
                format!(
                    "byte {} of {} came back as {:#04x}, sent {:#04x}",
                    got + i,
                    payload.len(),
                    buf[i],
                    payload[got + i]
                ),
            ));
        }
        if inside < n {
            return Err(Failure::new(
                Kind::Extra,
                format!(
                    "at least {} came back for {} sent",
                    count((got + n) as u64, "byte", "bytes"),
                    payload.len()
                ),
            ));
        }
        got += n;
    }
    if got < payload.len() {
        return Err(Failure::new(
            Kind::ShortRead,
            format!("echo ended after {got} of {} bytes", payload.len()),
        ));
    }
    Ok(())
}
