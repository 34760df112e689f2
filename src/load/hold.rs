//! `hold`: open many connections and keep them open, idle, and measure
//! what each costs the server: not only its memory (PSS) but what the
//! kernel keeps for it (page tables, kernel stacks, slab objects).
//!
//! Each connection echoes one short tag to prove a server is behind it (a
//! connection waiting in the listen queue is not served). With the server's
//! pid, the tree and the kernel's counters (see [`super::kernel`]) are read
//! twice: before the first connection (the baseline) and with all of them
//! open. Every figure per connection is a growth divided by the connections
//! held, so the server's fixed cost is not spread over them. Then everything
//! is closed, and the tree is watched for up to `--settle` until it is back
//! to its baseline process count with no zombie.
//!
//! Past one process's descriptor limit the connections are spread over
//! client processes ([`super::spread`]). The kernel's task limits
//! (`kernel.pid_max`, `kernel.threads-max`) are the host's to set:
//! `scripts/scale.sh` raises them for a run when asked and puts them back.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::cli::HoldArgs;
use super::kernel::{self, Meminfo, Slabs};
use super::proctree::Tree;
use super::report::{Cost, Report};
use super::spread::{self, TAG_LEN};
use super::sys;
use forkd::error::{EXIT_OSERR, EXIT_UNAVAILABLE, Error, count};

/// What a hold run is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: std::net::SocketAddr,
    pub conns: usize,
    pub timeout: Duration,
    pub pid: Option<i32>,
    pub settle: Duration,
    /// Client processes to spread over (None: as few as the descriptor limit allows).
    pub procs: Option<usize>,
}

/// `forkd-load hold`.
pub fn main(a: &HoldArgs) -> Result<u8, Error> {
    if let Some(first) = a.part {
        return spread::part_main(a, first);
    }
    let plan = Plan {
        addr: a.common.addr,
        conns: a.conns,
        timeout: a.common.timeout,
        pid: a.common.pid,
        settle: a.settle,
        procs: a.procs,
    };
    // Ctrl-C ends the ramp early and still measures, closes and settles.
    let stop = Arc::new(AtomicBool::new(false));
    for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(s, Arc::clone(&stop))
            .map_err(|e| Error::new(EXIT_OSERR, format!("cannot catch signal {s}: {e}")))?;
    }
    let report = run(&plan, "hold", &stop)?;
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

/// The server's tree and the kernel's counters at one moment.
struct Snapshot {
    tree: Tree,
    pss: u64,
    page_tables: u64,
    mem: Option<Meminfo>,
    slabs: Option<Slabs>,
    system_threads: Option<u64>,
}

impl Snapshot {
    fn take(pid: i32) -> Result<Snapshot, Error> {
        let tree = read_tree(pid)?;
        Ok(Snapshot {
            pss: tree.pss_kib(),
            page_tables: tree.page_tables_kib(),
            mem: Meminfo::read().ok(),
            slabs: Slabs::read(),
            system_threads: kernel::system_threads(),
            tree,
        })
    }

    /// The cost of each of `held` connections, from `self` to `now`.
    fn cost(&self, now: &Snapshot, held: u64) -> Option<Cost> {
        if held == 0 {
            return None;
        }
        let per = |before: f64, after: f64| (after - before) / held as f64;
        let (m0, m1) = (self.mem?, now.mem?);
        let threads = now.tree.threads() as f64 - self.tree.threads() as f64;
        // The kernel stack of one thread: how KernelStack grew over how many
        // threads the machine gained (16 KiB on x86-64 and arm64).
        let stack = match (self.system_threads, now.system_threads) {
            (Some(a), Some(b)) if b > a => {
                Some((m1.kernel_stack as f64 - m0.kernel_stack as f64) / (b - a) as f64)
            }
            _ => None,
        };
        let kernel_stacks = match stack {
            Some(s) => threads.max(0.0) * s / held as f64,
            None if threads <= 0.0 => 0.0,
            None => per(m0.kernel_stack as f64, m1.kernel_stack as f64),
        };
        let slab = per(m0.slab as f64, m1.slab as f64);
        let growth = match (&self.slabs, &now.slabs) {
            (Some(a), Some(b)) => Some(a.growth(b)),
            _ => None,
        };
        // The server's share: every slab object but the client's half of
        // the sockets (both ends of a loopback connection are alike).
        let kernel_objects = match growth {
            Some(g) => slab - g.sockets / 2.0 / held as f64,
            None => slab,
        };
        let pss = per(self.pss as f64, now.pss as f64);
        let page_tables = per(self.page_tables as f64, now.page_tables as f64);
        Some(Cost {
            pss,
            page_tables,
            kernel_stacks,
            kernel_objects,
            whole: pss + page_tables + kernel_stacks + kernel_objects,
            slab_both_ends: slab,
            slab_sockets: growth.map(|g| g.sockets / held as f64),
            slab_tasks: growth.map(|g| g.tasks / held as f64),
            slab_other: growth.map(|g| g.other / held as f64),
            kernel_stack_kib: stack,
            machine: per(m1.available as f64, m0.available as f64),
        })
    }
}

/// Run the workload once; setting `stop` ends the ramp early.
pub fn run(plan: &Plan, label: &str, stop: &AtomicBool) -> Result<Report, Error> {
    let mut r = Report {
        workload: "hold",
        addr: plan.addr.to_string(),
        conns: plan.conns as u64,
        ..Report::default()
    };
    if let Some((room, limit)) = kernel::task_room()
        && room < plan.conns as u64
    {
        r.notes.push(format!(
            "{limit} leaves room for {} more: a server with a process or thread per connection stops there",
            count(room, "task", "tasks")
        ));
    }
    let before = match plan.pid {
        Some(pid) => Some(Snapshot::take(pid)?),
        None => None,
    };
    let cpu0 = sys::self_cpu_s();
    let mut opened = spread::open(plan.addr, plan.conns, plan.timeout, plan.procs, label, stop)?;
    let held = opened.held;
    r.held = Some(held);
    r.errors.merge(&opened.errors);
    r.notes.append(&mut opened.notes);
    r.client_procs = Some(opened.procs as u64);
    if opened.open_s > 0.0 {
        r.ramp_per_s = Some(held as f64 / opened.open_s);
    }
    r.ramp = Some(std::mem::take(&mut opened.ramp));
    r.elapsed_s = opened.open_s;
    r.bytes = held * TAG_LEN as u64;

    if let (Some(pid), Some(base)) = (plan.pid, &before) {
        let now = Snapshot::take(pid)?;
        r.procs = Some(now.tree.count());
        r.threads = Some(now.tree.threads());
        r.zombies = Some(now.tree.zombies());
        r.pss_kib_baseline = Some(base.pss as f64);
        r.pss_kib_total = Some(now.pss as f64);
        if held > 0 {
            r.pss_kib_per_conn = Some((now.pss as f64 - base.pss as f64) / held as f64);
        }
        r.cost = base.cost(&now, held);
        if base.slabs.is_none() {
            r.notes.push(
                "/proc/slabinfo is not readable (root only): kernel objects include the client's sockets"
                    .to_string(),
            );
        }
    }
    opened.close();

    if let (Some(pid), Some(base)) = (plan.pid, &before) {
        let end = std::time::Instant::now() + plan.settle;
        let mut after = read_tree(pid)?;
        while std::time::Instant::now() < end
            && (after.count() > base.tree.count() || after.zombies() > 0)
        {
            std::thread::sleep(Duration::from_millis(20));
            after = read_tree(pid)?;
        }
        r.procs_after = Some(after.count());
        r.zombies_after = Some(after.zombies());
        r.server_cpu_s = Some(after.cpu_s() - base.tree.cpu_s());
    }
    r.gen_cpu_s = sys::self_cpu_s() - cpu0;
    r.ok = r.errors.total == 0 && r.held == Some(plan.conns as u64);
    Ok(r)
}
