//! Running a workload's threads: start one per worker, show progress until
//! the deadline, and gather what each returns; for the timed workloads
//! (`rate`, `stream`, `udp`), also what the run cost, and printing a run
//! asked for on the command line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::progress::Progress;
use super::report::Report;
use super::{proctree, sys};
use forkd::error::{EXIT_OSERR, Error};

/// What a timed workload measured, whichever it is: runs against one
/// server merge (compare's rounds), and the sum is reported.
pub trait Outcome {
    fn merge(&mut self, o: &Self);
    fn report(&self, addr: SocketAddr) -> Report;
}

/// What a timed run cost besides what it measured: how long it ran, and
/// the CPU time it took from the generator and from the server's process
/// tree (if its pid was given). Runs against one server add up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub elapsed: Duration,
    pub gen_cpu_s: f64,
    pub server_cpu_s: Option<f64>,
}

impl Cost {
    pub fn add(&mut self, o: &Cost) {
        self.elapsed += o.elapsed;
        self.gen_cpu_s += o.gen_cpu_s;
        self.server_cpu_s = match (self.server_cpu_s, o.server_cpu_s) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }
}

/// A timed run: `n` threads as [`run`] starts them, each calling
/// `work(i, start, deadline)`, from now until `duration` has passed, with a
/// progress timer labelled `label`; their results, and what the run cost
/// (the server's CPU time from `pid`'s process tree).
#[allow(clippy::too_many_arguments)]
pub fn timed<T, F>(
    label: &str,
    duration: Duration,
    pid: Option<i32>,
    n: usize,
    what: &str,
    stack: Option<usize>,
    work: F,
) -> Result<(Vec<T>, Cost), Error>
where
    T: Send,
    F: Fn(usize, Instant, Instant) -> T + Sync,
{
    let cpu0 = sys::self_cpu_s();
    let server0 = proctree::cpu_s(pid);
    let start = Instant::now();
    let deadline = start + duration;
    let progress = Progress::timer(duration, label);
    let results = run(n, what, stack, &progress, start, deadline, |i| {
        work(i, start, deadline)
    })?;
    progress.finish();
    let cost = Cost {
        elapsed: start.elapsed(),
        gen_cpu_s: sys::self_cpu_s() - cpu0,
        server_cpu_s: proctree::cpu_s_since(server0, pid),
    };
    Ok((results, cost))
}

/// A run asked for on the command line: its report printed (as JSON if
/// asked), and the exit status it calls for.
pub fn print<O: Outcome>(outcome: &O, addr: SocketAddr, json: bool) -> u8 {
    let report = outcome.report(addr);
    report.print(json);
    report.exit_code()
}

/// Run `n` threads named `{what}-{i}` (with `stack` bytes of stack, if
/// given), each calling `work(i)`, ticking `progress` until they all finish;
/// returns their results in order.
pub fn run<T, F>(
    n: usize,
    what: &str,
    stack: Option<usize>,
    progress: &Progress,
    start: Instant,
    deadline: Instant,
    work: F,
) -> Result<Vec<T>, Error>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let work = &work;
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let mut builder = std::thread::Builder::new().name(format!("{what}-{i}"));
            if let Some(size) = stack {
                builder = builder.stack_size(size);
            }
            match builder.spawn_scoped(scope, move || work(i)) {
                Ok(h) => handles.push(h),
                Err(e) => return Err(Error::os(format!("cannot start a {what} thread"), e)),
            }
        }
        progress.tick_until(start, deadline, || handles.iter().all(|h| h.is_finished()));
        let mut all = Vec::with_capacity(handles.len());
        for h in handles {
            match h.join() {
                Ok(r) => all.push(r),
                Err(_) => return Err(Error::new(EXIT_OSERR, format!("a {what} thread panicked"))),
            }
        }
        Ok(all)
    })
}
