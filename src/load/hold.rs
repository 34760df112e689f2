//! `hold`: open many connections and keep them open, idle.
//!
//! Each connection echoes one short tag to prove a server is behind it (a
//! connection waiting in the listen queue is not served). With the server's
//! pid, the tree is read twice: before the first connection (the baseline)
//! and with all of them open. Memory per connection is the growth of the
//! tree's PSS divided by the connections held, so the server's fixed cost
//! is not spread over them. Then everything is closed, and the tree is
//! watched for up to `--settle` until it is back to its baseline process
//! count with no zombie.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::cli::HoldArgs;
use super::proctree::Tree;
use super::progress::Progress;
use super::report::{Failure, Kind, Report};
use super::sys;
use forkd::error::{EXIT_OSERR, EXIT_UNAVAILABLE, Error, count};

/// Descriptors kept free for everything that is not a held connection.
const RESERVE: u64 = 64;
/// Connections opened before their echoes are checked; bounds how many wait
/// in the server's listen queue at once.
const BATCH: usize = 100;

/// What a hold run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub conns: usize,
    pub timeout: Duration,
    pub pid: Option<i32>,
    pub settle: Duration,
}

/// `forkd-load hold`.
pub fn main(a: &HoldArgs) -> Result<u8, Error> {
    let plan = Plan {
        addr: a.common.addr,
        conns: a.conns,
        timeout: a.common.timeout,
        pid: a.common.pid,
        settle: a.settle,
    };
    let report = run(&plan, "hold")?;
    report.print(a.common.json);
    Ok(report.exit_code())
}

fn read_tree(pid: i32) -> Result<Tree, Error> {
    Tree::read(pid).map_err(|e| {
        Error::new(
            EXIT_UNAVAILABLE,
            format!(
                "cannot read the process tree of pid {pid}: {}",
                forkd::error::describe(&e)
            ),
        )
    })
}

/// Run the workload once.
pub fn run(plan: &Plan, label: &str) -> Result<Report, Error> {
    let mut r = Report {
        workload: "hold",
        addr: plan.addr.to_string(),
        conns: plan.conns as u64,
        ..Report::default()
    };
    let want = plan.conns as u64 + RESERVE;
    let limit = sys::raise_nofile(want)
        .map_err(|e| Error::new(EXIT_OSERR, format!("cannot raise RLIMIT_NOFILE: {e}")))?;
    let target = if limit < want {
        let n = limit.saturating_sub(RESERVE) as usize;
        r.notes.push(format!(
            "RLIMIT_NOFILE hard limit allows {}: holding {n} of {}",
            count(limit, "descriptor", "descriptors"),
            count(plan.conns as u64, "connection", "connections")
        ));
        eprintln!("forkd-load: {}", r.notes[r.notes.len() - 1]);
        n
    } else {
        plan.conns
    };

    let base = match plan.pid {
        Some(pid) => Some(read_tree(pid)?),
        None => None,
    };
    let base_pss = base.as_ref().map(|t| t.pss_kib());
    let cpu0 = sys::self_cpu_s();
    let start = Instant::now();

    let mut held: Vec<TcpStream> = Vec::with_capacity(target);
    // About a millisecond per connection: a bar from a few thousand on.
    let progress = Progress::count(target as u64, Duration::from_millis(target as u64), label);
    let mut next = 0usize;
    while next < target {
        let batch_end = (next + BATCH).min(target);
        let before = r.errors.timeout;
        let opened: Vec<(usize, TcpStream)> = (next..batch_end)
            .filter_map(|i| match open(plan.addr, plan.timeout, i) {
                Ok(s) => Some((i, s)),
                Err(f) => {
                    r.errors.add(f);
                    None
                }
            })
            .collect();
        // The echoes of one batch share one deadline, so a server that stopped
        // serving costs one timeout, not one per connection.
        let deadline = Instant::now() + plan.timeout;
        for (i, mut s) in opened {
            match check_echo(&mut s, i, deadline) {
                Ok(()) => held.push(s),
                Err(f) => r.errors.add(f),
            }
        }
        progress.inc((batch_end - next) as u64);
        next = batch_end;
        if r.errors.timeout > before {
            r.notes.push(format!(
                "the server stopped serving new connections after {}: not opening more",
                count(held.len() as u64, "connection", "connections")
            ));
            break;
        }
    }
    progress.finish();
    r.held = Some(held.len() as u64);

    if let (Some(pid), Some(_)) = (plan.pid, &base) {
        let now = read_tree(pid)?;
        let total = now.pss_kib();
        let base_pss = base_pss.unwrap_or(0);
        r.procs = Some(now.count());
        r.threads = Some(now.threads());
        r.zombies = Some(now.zombies());
        r.pss_kib_baseline = Some(base_pss as f64);
        r.pss_kib_total = Some(total as f64);
        if !held.is_empty() {
            r.pss_kib_per_conn = Some((total as f64 - base_pss as f64) / held.len() as f64);
        }
    }
    r.elapsed_s = start.elapsed().as_secs_f64();
    r.bytes = held.len() as u64 * TAG_LEN as u64;
    drop(held);

    if let (Some(pid), Some(base)) = (plan.pid, &base) {
        let end = Instant::now() + plan.settle;
        let mut after = read_tree(pid)?;
        while Instant::now() < end && (after.count() > base.count() || after.zombies() > 0) {
            std::thread::sleep(Duration::from_millis(20));
            after = read_tree(pid)?;
        }
        r.procs_after = Some(after.count());
        r.zombies_after = Some(after.zombies());
        r.server_cpu_s = Some(after.cpu_s() - base.cpu_s());
    }
    r.gen_cpu_s = sys::self_cpu_s() - cpu0;
    r.ok = r.errors.total == 0 && r.held == Some(target as u64);
    Ok(r)
}

const TAG_LEN: usize = 8;

/// The bytes connection `i` sends: its number, so a reply from another connection shows.
fn tag(i: usize) -> [u8; TAG_LEN] {
    (i as u64 ^ 0xF0F0_5A5A_0000_0000).to_le_bytes()
}

fn open(addr: SocketAddr, timeout: Duration, i: usize) -> Result<TcpStream, Failure> {
    let mut s = sys::connect(addr, timeout).map_err(|e| Failure::io("connect", &e))?;
    s.write_all(&tag(i)).map_err(|e| Failure::io("write", &e))?;
    Ok(s)
}

/// Read connection `i`'s tag back before `deadline`.
fn check_echo(s: &mut TcpStream, i: usize, deadline: Instant) -> Result<(), Failure> {
    let want = tag(i);
    let mut got = [0u8; TAG_LEN];
    let mut n = 0;
    while n < TAG_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| Failure::io("socket options", &e))?;
        match s.read(&mut got[n..]) {
            Ok(0) => {
                return Err(Failure::new(
                    Kind::ShortRead,
                    format!("echo ended after {n} of {TAG_LEN} bytes"),
                ));
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::io("read", &e)),
        }
    }
    if got != want {
        return Err(Failure::new(
            Kind::Corrupt,
            format!("tag {want:02x?} came back as {got:02x?}"),
        ));
    }
    Ok(())
}
