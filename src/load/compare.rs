//! `compare`: start forkd in each mode (and, if asked, the C floor servers
//! and the peers), run the same workloads against each, and write
//! `compare.json`, `compare.md` and `compare.svg`.
//!
//! All servers run for the whole comparison, idle when not measured. The
//! `rate` and `stream` time is split into rounds; each round measures every
//! server in turn, the order reversed from one round to the next, so a
//! machine that drifts (another build starting, a CPU warming up) weighs on
//! every server alike. `hold` runs once per server, last.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::cli::{CompareArgs, Workload};
use super::report::Report;
use super::targets::{Kind, Launcher, Server, Started};
use super::{EXIT_CANTCREAT, EXIT_ERRORS, EXIT_OK, chart, hold, markdown, rate, stream, sys, udp};
use crate::cli::Mode;
use crate::error::Error;

/// Pause between two runs, so one run's closing connections do not weigh on the next.
const BETWEEN_RUNS: Duration = Duration::from_millis(300);
/// How long `hold` waits for a server to settle after closing.
const HOLD_SETTLE: Duration = Duration::from_secs(3);

/// The machine a comparison ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    /// How servers and generator were pinned, if they were.
    pub pinned: Option<String>,
}

/// The workloads' settings.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Those that ran, in the order they ran.
    pub workloads: Vec<Workload>,
    pub duration_s: f64,
    pub rounds: u32,
    pub concurrency: usize,
    pub size: usize,
    /// rate: the open loop's pace in connections a second; null for a closed loop.
    pub pace_per_s: Option<f64>,
    pub stream_conns: usize,
    pub stream_size: usize,
    pub hold: usize,
    /// udp: bytes per datagram (workers: `concurrency`).
    pub udp_size: usize,
    pub timeout_s: f64,
}

/// One server's results.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    /// `forkd`, `floor` or `peer`.
    pub family: &'static str,
    /// Whether it starts a process per connection.
    pub forks: bool,
    pub rate: Option<Report>,
    pub stream: Option<Report>,
    pub hold: Option<Report>,
    pub udp: Option<Report>,
    /// How the server ended when stopped with SIGTERM (`exit 0`...).
    pub stopped: String,
    pub notes: Vec<String>,
    pub ok: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// Everything `compare.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub machine: Machine,
    pub settings: Settings,
    pub servers: Vec<Row>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
}

/// What is gathered for one server while the comparison runs.
struct Slot {
    server: Server,
    rate: Option<rate::Outcome>,
    stream: Option<stream::Outcome>,
    hold: Option<Report>,
    udp: Option<udp::Outcome>,
    notes: Vec<String>,
}

/// `forkd-load compare`.
pub fn main(a: &CompareArgs) -> Result<u8, Error> {
    let out = a.out.clone();
    for dir in [out.clone(), out.join("logs")] {
        std::fs::create_dir_all(&dir).map_err(|e| cant_create(&dir, e))?;
    }
    // Counted before pinning, which narrows what this process may use.
    let cpus = sys::cpus();
    let mut notes = Vec::new();
    let mut pinned = None;
    let mut server_cpus = None;
    if a.pin {
        match sys::split_cpus() {
            Some((servers, generator)) => {
                sys::pin_current(&generator)
                    .map_err(|e| Error::os("cannot pin forkd-load to its CPUs", e))?;
                pinned = Some(format!(
                    "servers pinned to CPUs {servers:?}, forkd-load to {generator:?}"
                ));
                server_cpus = Some(servers);
            }
            None => notes.push("--pin needs at least 2 CPUs: nothing pinned".to_string()),
        }
    }
    let launcher = Launcher {
        out: out.clone(),
        forkd: Launcher::find_forkd(a.forkd.as_deref())?,
        capacity: a.hold.max(a.concurrency) + 1024,
        cpus: server_cpus,
    };

    let mut kinds: Vec<Kind> = Vec::new();
    for m in &a.modes {
        if !kinds.contains(&Kind::Forkd(*m)) {
            kinds.push(Kind::Forkd(*m));
        }
    }
    if a.floor {
        // The floor of each model measured, after the forkd rows.
        for m in &a.modes {
            let floor = Kind::floor(*m);
            if !kinds.contains(&floor) {
                kinds.push(floor);
            }
        }
        if a.workloads.contains(&Workload::Udp) {
            kinds.push(Kind::FloorUdp);
        }
    }
    if a.peers {
        kinds.extend([
            Kind::PythonFork,
            Kind::PythonThread,
            Kind::Socat,
            Kind::Tcpserver,
        ]);
    }
    let mut slots = Vec::new();
    let mut skipped = Vec::new();
    for kind in kinds {
        match launcher.start(kind)? {
            Started::Running(server) => {
                let udp = server.udp.map(|u| format!(", udp {u}")).unwrap_or_default();
                eprintln!(
                    "forkd-load: {} listening on {}{udp} (pid {})",
                    server.name(),
                    server.addr,
                    server.pid()
                );
                slots.push(Slot {
                    server,
                    rate: None,
                    stream: None,
                    hold: None,
                    udp: None,
                    notes: Vec::new(),
                });
            }
            Started::Skipped(reason) => {
                eprintln!("forkd-load: skipping {}: {reason}", kind.name());
                skipped.push(Skipped {
                    name: kind.name().to_string(),
                    reason,
                });
            }
        }
    }

    let wants = |w: Workload| a.workloads.contains(&w);
    let slice = a.duration / a.rounds;
    for round in 0..a.rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..slots.len()).collect()
        } else {
            (0..slots.len()).rev().collect()
        };
        for &i in order.iter().filter(|_| wants(Workload::Rate)) {
            let s = &mut slots[i];
            if !s.server.kind.tcp() || !still_running(s, "rate") {
                continue;
            }
            let plan = rate::Plan {
                addr: s.server.addr,
                duration: slice,
                concurrency: a.concurrency,
                size: a.size,
                timeout: a.timeout,
                pid: Some(s.server.pid()),
                pace: a.pace,
                proxy: None,
            };
            let o = rate::run(&plan, &format!("rate {}", s.server.name()))?;
            match &mut s.rate {
                Some(r) => r.merge(&o),
                None => s.rate = Some(o),
            }
            std::thread::sleep(BETWEEN_RUNS);
        }
        for &i in order.iter().filter(|_| wants(Workload::Stream)) {
            let s = &mut slots[i];
            if !s.server.kind.tcp() || !still_running(s, "stream") {
                continue;
            }
            let plan = stream::Plan {
                addr: s.server.addr,
                duration: slice,
                conns: a.stream_conns,
                size: a.stream_size,
                timeout: a.timeout,
                pid: Some(s.server.pid()),
            };
            let o = stream::run(&plan, &format!("stream {}", s.server.name()))?;
            match &mut s.stream {
                Some(r) => r.merge(&o),
                None => s.stream = Some(o),
            }
            std::thread::sleep(BETWEEN_RUNS);
        }
        for &i in order.iter().filter(|_| wants(Workload::Udp)) {
            let s = &mut slots[i];
            let Some(addr) = s.server.udp else {
                continue;
            };
            if !still_running(s, "udp") {
                continue;
            }
            let plan = udp::Plan {
                addr,
                duration: slice,
                concurrency: a.concurrency,
                size: a.udp_size,
                wait: a.udp_wait,
                pid: Some(s.server.pid()),
            };
            let o = udp::run(&plan, &format!("udp {}", s.server.name()))?;
            match &mut s.udp {
                Some(r) => r.merge(&o),
                None => s.udp = Some(o),
            }
            std::thread::sleep(BETWEEN_RUNS);
        }
    }
    for s in slots.iter_mut().filter(|_| wants(Workload::Hold)) {
        if !s.server.kind.tcp() || !still_running(s, "hold") {
            continue;
        }
        // A prefork pool serves one connection per worker: it holds no more
        // than its workers (the rest would wait in the listen queue, unserved).
        let prefork = matches!(
            s.server.kind,
            Kind::Forkd(Mode::Prefork) | Kind::FloorPrefork
        );
        let conns = if prefork {
            a.hold.min(launcher.workers())
        } else {
            a.hold
        };
        let plan = hold::Plan {
            addr: s.server.addr,
            conns,
            timeout: a.timeout,
            pid: Some(s.server.pid()),
            settle: HOLD_SETTLE,
            procs: None,
        };
        let never = std::sync::atomic::AtomicBool::new(false);
        s.hold = Some(hold::run(
            &plan,
            &format!("hold {}", s.server.name()),
            &never,
        )?);
        if conns < a.hold
            && let Some(h) = &mut s.hold
        {
            h.notes.push(format!(
                "a prefork pool holds one connection per worker: {conns} held, not {}",
                a.hold
            ));
        }
        std::thread::sleep(BETWEEN_RUNS);
    }

    let mut rows = Vec::new();
    for mut s in slots {
        let stopped = s.server.stop();
        let name = s.server.name().to_string();
        let addr = s.server.addr;
        let tag = |mut r: Report| {
            r.target = Some(name.clone());
            r
        };
        let rate = s.rate.map(|o| tag(o.report(addr)));
        let stream = s.stream.map(|o| tag(o.report(addr)));
        let hold = s.hold.map(tag);
        let udp = s.udp.map(|o| tag(o.report(s.server.udp.unwrap_or(addr))));
        // What applies: TCP workloads to TCP servers, udp to UDP ones.
        let tcp = s.server.kind.tcp();
        let serves_udp = s.server.udp.is_some() || s.server.kind == Kind::FloorUdp;
        if wants(Workload::Udp) && s.server.kind.family() == "forkd" && s.server.udp.is_none() {
            s.notes.push("forkd printed no UDP address".to_string());
        }
        let ran_all = [
            (Workload::Rate, rate.is_some() || !tcp),
            (Workload::Stream, stream.is_some() || !tcp),
            (Workload::Hold, hold.is_some() || !tcp),
            (Workload::Udp, udp.is_some() || !serves_udp),
        ]
        .iter()
        .all(|&(w, ran)| ran || !wants(w));
        let clean = [&rate, &stream, &hold, &udp]
            .iter()
            .all(|r| r.as_ref().is_none_or(|r| r.ok));
        if s.server.kind.family() == "forkd" && stopped != "exit 0" {
            s.notes
                .push(format!("forkd did not stop cleanly on SIGTERM: {stopped}"));
        }
        rows.push(Row {
            name,
            family: s.server.kind.family(),
            forks: s.server.kind.forks(),
            rate,
            stream,
            hold,
            udp,
            stopped,
            notes: s.notes,
            ok: ran_all && clean,
        });
    }

    let comparison = Comparison {
        machine: machine(cpus, pinned),
        settings: Settings {
            workloads: Workload::ALL.into_iter().filter(|&w| wants(w)).collect(),
            duration_s: a.duration.as_secs_f64(),
            rounds: a.rounds,
            concurrency: a.concurrency,
            size: a.size,
            pace_per_s: a.pace,
            stream_conns: a.stream_conns,
            stream_size: a.stream_size,
            hold: a.hold,
            udp_size: a.udp_size,
            timeout_s: a.timeout.as_secs_f64(),
        },
        servers: rows,
        skipped,
        notes,
    };
    write_outputs(&out, &comparison)?;
    if a.json {
        for r in &comparison.servers {
            for rep in [&r.rate, &r.stream, &r.hold, &r.udp].into_iter().flatten() {
                rep.print(true);
            }
        }
    } else {
        print!("{}", markdown::table(&comparison.servers));
        if comparison.servers.iter().any(|r| r.udp.is_some()) {
            print!("\n{}", markdown::udp_table(&comparison.servers));
        }
        for r in &comparison.servers {
            for rep in [&r.rate, &r.stream, &r.hold, &r.udp].into_iter().flatten() {
                if !rep.ok {
                    eprint!("{}", rep.text());
                }
            }
        }
    }
    eprintln!(
        "forkd-load: wrote {0}/compare.md, {0}/compare.svg, {0}/compare.json",
        out.display()
    );
    if comparison.servers.iter().all(|r| r.ok) {
        Ok(EXIT_OK)
    } else {
        Ok(EXIT_ERRORS)
    }
}

/// False (with a note) when the server has died.
fn still_running(s: &mut Slot, workload: &str) -> bool {
    if s.server.alive() {
        return true;
    }
    let note = format!("the server was gone before {workload}");
    if !s.notes.contains(&note) {
        s.notes.push(note);
    }
    false
}

fn write_outputs(out: &Path, c: &Comparison) -> Result<(), Error> {
    let json = serde_json::to_string_pretty(c).map_err(|e| {
        Error::new(
            super::EXIT_OSERR,
            format!("cannot encode compare.json: {e}"),
        )
    })?;
    let path = out.join("compare.json");
    std::fs::write(&path, json + "\n").map_err(|e| cant_create(&path, e))?;
    let path = out.join("compare.md");
    std::fs::write(&path, markdown::render(c)).map_err(|e| cant_create(&path, e))?;
    let path = out.join("compare.svg");
    chart::draw(&path, c).map_err(|e| {
        Error::new(
            EXIT_CANTCREAT,
            format!("cannot draw {}: {e}", path.display()),
        )
    })
}

fn cant_create(path: &Path, e: std::io::Error) -> Error {
    Error::new(
        EXIT_CANTCREAT,
        format!(
            "cannot write {}: {}",
            path.display(),
            crate::error::describe(&e)
        ),
    )
}

/// Kernel release and CPU model, from /proc.
pub fn machine(cpus: usize, pinned: Option<String>) -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    Machine {
        kernel,
        cpu,
        cpus,
        pinned,
    }
}
