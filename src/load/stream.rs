//! `stream`: a few long connections echoing continuously.
//!
//! Each connection has a writer, sending the connection's own cyclic pattern
//! (see [`super::pattern`]) in `--size` writes until the run's time is up
//! and then half-closing, and a reader checking every byte that comes back
//! against the same pattern, to end-of-file. Throughput counts only checked
//! bytes. A wrong byte ends the connection as corrupt; an echo that ends
//! before everything sent came back is a short read; more than was sent is
//! extra.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::cli::StreamArgs;
use super::pattern::Cyclic;
use super::report::{Errors, Failure, Kind, MIB, Report};
use super::sys;
use super::workers::{self, Cost};
use forkd::error::{Error, count};

/// Size of each reader's buffer.
const READ_BUF: usize = 64 << 10;

/// What a stream run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub duration: Duration,
    pub conns: usize,
    pub size: usize,
    pub timeout: Duration,
    pub pid: Option<i32>,
}

/// What a stream run measured; runs against one server can be merged.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub conns: u64,
    pub bytes: u64,
    pub errors: Errors,
    pub cost: Cost,
}

impl workers::Outcome for Outcome {
    fn merge(&mut self, o: &Outcome) {
        self.conns = self.conns.max(o.conns);
        self.bytes += o.bytes;
        self.errors.merge(&o.errors);
        self.cost.add(&o.cost);
    }

    fn report(&self, addr: SocketAddr) -> Report {
        let secs = self.cost.elapsed.as_secs_f64().max(1e-9);
        Report {
            workload: "stream",
            addr: addr.to_string(),
            elapsed_s: secs,
            conns: self.conns,
            bytes: self.bytes,
            mib_per_s: Some(self.bytes as f64 / MIB / secs),
            errors: self.errors.clone(),
            gen_cpu_s: self.cost.gen_cpu_s,
            server_cpu_s: self.cost.server_cpu_s,
            ok: self.errors.total == 0 && self.bytes > 0,
            ..Report::default()
        }
    }
}

/// `forkd-load stream`.
pub fn main(a: &StreamArgs) -> Result<u8, Error> {
    let plan = Plan {
        addr: a.common.addr,
        duration: a.duration,
        conns: a.conns,
        size: a.size,
        timeout: a.common.timeout,
        pid: a.common.pid,
    };
    Ok(workers::print(
        &run(&plan, "stream")?,
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
        plan.conns,
        "connection",
        None,
        |id, _, deadline| connection(plan, id as u64, deadline),
    )?;
    let mut total = Outcome {
        conns: plan.conns as u64,
        cost,
        ..Outcome::default()
    };
    for (bytes, failure) in results {
        total.bytes += bytes;
        if let Some(f) = failure {
            total.errors.add(f);
        }
    }
    Ok(total)
}

/// One long connection: the bytes checked, and why it failed if it did.
fn connection(plan: &Plan, id: u64, deadline: Instant) -> (u64, Option<Failure>) {
    let mut s = match sys::connect(plan.addr, plan.timeout) {
        Ok(s) => s,
        Err(e) => return (0, Some(Failure::io("connect", &e))),
    };
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => return (0, Some(Failure::io("socket options", &e))),
    };
    let stream = Cyclic::new(0x5EED_0000 + id, plan.size);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_until(&mut w, &stream, plan.size, deadline, &stop));
        let (got, read) = read_checked(&mut s, &stream);
        if read.is_err() {
            // Unblock the writer; its error, a consequence, is not counted.
            stop.store(true, Ordering::Relaxed);
            let _ = s.shutdown(Shutdown::Both);
        }
        let (sent, wrote) = writer
            .join()
            .unwrap_or((0, Err(Failure::new(Kind::Other, "writer panicked"))));
        let verdict = match (read, wrote) {
            (Err(f), _) | (Ok(()), Err(f)) => Some(f),
            (Ok(()), Ok(())) if got < sent => Some(Failure::new(
                Kind::ShortRead,
                format!("echo ended after {got} of {sent} bytes"),
            )),
            (Ok(()), Ok(())) if got > sent => Some(Failure::new(
                Kind::Extra,
                format!("{} came back for {sent} sent", count(got, "byte", "bytes")),
            )),
            _ => None,
        };
        (got, verdict)
    })
}

/// Send the stream in `size` writes until `deadline`, then half-close.
fn write_until(
    w: &mut TcpStream,
    stream: &Cyclic,
    size: usize,
    deadline: Instant,
    stop: &AtomicBool,
) -> (u64, Result<(), Failure>) {
    let mut sent = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Err(e) = w.write_all(stream.at(sent, size)) {
            return (sent, Err(Failure::io("write", &e)));
        }
        sent += size as u64;
    }
    let done = w.shutdown(Shutdown::Write);
    (sent, done.map_err(|e| Failure::io("shutdown", &e)))
}

/// Read to end-of-file, checking every byte; the count of good bytes.
fn read_checked(s: &mut TcpStream, stream: &Cyclic) -> (u64, Result<(), Failure>) {
    let mut buf = vec![0u8; READ_BUF];
    let mut got = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                let mut f = Failure::io("read", &e);
                f.message = format!("{} after {}", f.message, count(got, "byte", "bytes"));
                return (got, Err(f));
            }
        };
        if let Some(i) = stream.mismatch(got, &buf[..n]) {
            let at = got + i as u64;
            let want = stream.at(at, 1)[0];
            let msg = format!("byte {at} came back as {:#04x}, sent {want:#04x}", buf[i]);
            return (at, Err(Failure::new(Kind::Corrupt, msg)));
        }
        got += n as u64;
    }
}
