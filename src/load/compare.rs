//! `compare`: start forkd in each mode (and, if asked, the C floor servers
//! and the peers), run the same workloads against each, and write
//! `compare.json`, `compare.md` and `compare.svg`.
//!
//! All servers run for the whole comparison, idle when not measured. The
//! `rate` and `stream` time is split into rounds; each round measures every
//! server in turn, the order reversed from one round to the next, so a
//! machine that drifts (another build starting, a CPU warming up) weighs on
//! every server alike. `hold` runs once per server, last.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::cli::{CompareArgs, Workload};
use super::comparison::{Comparison, Machine, Row, Settings, Skipped};
use super::report::Report;
use super::targets::{Kind, Launcher, Server, Started};
use super::workers::Outcome;
use super::{EXIT_CANTCREAT, EXIT_ERRORS, EXIT_OK, chart, hold, markdown, rate, stream, sys, udp};
use forkd::error::Error;
use forkd::model::Mode;

/// Pause between two runs, so one run's closing connections do not weigh on the next.
const BETWEEN_RUNS: Duration = Duration::from_millis(300);
/// How long `hold` waits for a server to settle after closing.
const HOLD_SETTLE: Duration = Duration::from_secs(3);

/// What is gathered for one server while the comparison runs.
struct Slot {
    server: Server,
    rate: Option<rate::Outcome>,
    stream: Option<stream::Outcome>,
    hold: Option<Report>,
    udp: Option<udp::Outcome>,
    notes: Vec<String>,
}

/// `forkd-load compare`: start the servers, measure them, stop them, then
/// write and print what was found.
pub fn main(a: &CompareArgs) -> Result<u8, Error> {
    let out = a.out.clone();
    for dir in [out.clone(), out.join("logs")] {
        std::fs::create_dir_all(&dir).map_err(|e| cant_create(&dir, e))?;
    }
    // Counted before pinning, which narrows what this process may use.
    let cpus = sys::cpus();
    let (pinning, notes) = pin(a)?;
    let launcher = Launcher {
        out: out.clone(),
        forkd: Launcher::find_forkd(a.forkd.as_deref())?,
        capacity: a.hold.max(a.concurrency) + 1024,
        cpus: pinning.as_ref().map(|p| p.servers.clone()),
    };
    let (mut slots, skipped) = start(&launcher, kinds(a))?;
    measure(a, &mut slots, launcher.workers())?;
    let comparison = Comparison {
        machine: machine(cpus, pinning.map(|p| p.said)),
        settings: settings(a),
        servers: slots.into_iter().map(|s| stop(a, s)).collect(),
        skipped,
        notes,
    };
    write_outputs(&out, &comparison)?;
    print(a, &comparison);
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

/// With `--pin`, the servers' CPUs and how the pinning is said.
struct Pinning {
    servers: Vec<usize>,
    said: String,
}

/// `--pin`: pin this process to the second half of the CPUs, and return the
/// first half for the servers; a note instead when there are too few.
fn pin(a: &CompareArgs) -> Result<(Option<Pinning>, Vec<String>), Error> {
    if !a.pin {
        return Ok((None, Vec::new()));
    }
    match sys::split_cpus() {
        Some((servers, generator)) => {
            sys::pin_current(&generator)
                .map_err(|e| Error::os("cannot pin forkd-load to its CPUs", e))?;
            let said = format!("servers pinned to CPUs {servers:?}, forkd-load to {generator:?}");
            Ok((Some(Pinning { servers, said }), Vec::new()))
        }
        None => Ok((
            None,
            vec!["--pin needs at least 2 CPUs: nothing pinned".to_string()],
        )),
    }
}

/// The servers to measure, in the order of the table: forkd's modes, then
/// (`--floor`) the floor of each model measured and the UDP one, then
/// (`--peers`) the others.
fn kinds(a: &CompareArgs) -> Vec<Kind> {
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
    kinds
}

/// Start every server: a slot for each that runs, a line for each skipped.
fn start(launcher: &Launcher, kinds: Vec<Kind>) -> Result<(Vec<Slot>, Vec<Skipped>), Error> {
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
    Ok((slots, skipped))
}

/// Every workload asked for on every server it applies to: the timed ones
/// in rounds, each round in the other order, then `hold` once each.
fn measure(a: &CompareArgs, slots: &mut [Slot], pool: usize) -> Result<(), Error> {
    let wants = |w: Workload| a.workloads.contains(&w);
    let slice = a.duration / a.rounds;
    let tcp = |s: &Server| s.kind.tcp().then_some(s.addr);
    for round in 0..a.rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..slots.len()).collect()
        } else {
            (0..slots.len()).rev().collect()
        };
        if wants(Workload::Rate) {
            each(
                slots,
                &order,
                "rate",
                tcp,
                |s| &mut s.rate,
                |addr, pid, label| {
                    let plan = rate::Plan {
                        addr,
                        duration: slice,
                        concurrency: a.concurrency,
                        size: a.size,
                        timeout: a.timeout,
                        pid: Some(pid),
                        pace: a.pace,
                        proxy: None,
                    };
                    rate::run(&plan, label)
                },
            )?;
        }
        if wants(Workload::Stream) {
            each(
                slots,
                &order,
                "stream",
                tcp,
                |s| &mut s.stream,
                |addr, pid, label| {
                    let plan = stream::Plan {
                        addr,
                        duration: slice,
                        conns: a.stream_conns,
                        size: a.stream_size,
                        timeout: a.timeout,
                        pid: Some(pid),
                    };
                    stream::run(&plan, label)
                },
            )?;
        }
        if wants(Workload::Udp) {
            each(
                slots,
                &order,
                "udp",
                |s| s.udp,
                |s| &mut s.udp,
                |addr, pid, label| {
                    let plan = udp::Plan {
                        addr,
                        duration: slice,
                        concurrency: a.concurrency,
                        size: a.udp_size,
                        wait: a.udp_wait,
                        pid: Some(pid),
                    };
                    udp::run(&plan, label)
                },
            )?;
        }
    }
    if wants(Workload::Hold) {
        hold_each(a, slots, pool)?;
    }
    Ok(())
}

/// `hold`, once on each TCP server that still runs, a pause after each; a
/// prefork server (a pool of `pool` workers) is asked for no more than that.
fn hold_each(a: &CompareArgs, slots: &mut [Slot], pool: usize) -> Result<(), Error> {
    for s in slots.iter_mut() {
        if !s.server.kind.tcp() || !still_running(s, "hold") {
            continue;
        }
        // A prefork pool serves one connection per worker: it holds no more
        // than its workers (the rest would wait in the listen queue, unserved).
        let prefork = matches!(
            s.server.kind,
            Kind::Forkd(Mode::Prefork) | Kind::FloorPrefork
        );
        let conns = if prefork { a.hold.min(pool) } else { a.hold };
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
    Ok(())
}

/// One round of one timed workload: in `order`, each server that has an
/// address for it (`target`) and still runs, measured by `run(address,
/// pid, label)`, merged into what the slot keeps of it (`kept`); a pause
/// after each.
fn each<O: Outcome>(
    slots: &mut [Slot],
    order: &[usize],
    workload: &str,
    target: impl Fn(&Server) -> Option<SocketAddr>,
    kept: impl Fn(&mut Slot) -> &mut Option<O>,
    run: impl Fn(SocketAddr, i32, &str) -> Result<O, Error>,
) -> Result<(), Error> {
    for &i in order {
        let s = &mut slots[i];
        let Some(addr) = target(&s.server) else {
            continue;
        };
        if !still_running(s, workload) {
            continue;
        }
        let o = run(
            addr,
            s.server.pid(),
            &format!("{workload} {}", s.server.name()),
        )?;
        match kept(s) {
            Some(r) => r.merge(&o),
            none => *none = Some(o),
        }
        std::thread::sleep(BETWEEN_RUNS);
    }
    Ok(())
}

/// Stop a server and make its row: its reports, and whether every
/// workload that applies ran and was clean.
fn stop(a: &CompareArgs, mut s: Slot) -> Row {
    let wants = |w: Workload| a.workloads.contains(&w);
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
    Row {
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
    }
}

/// The workloads' settings, for the JSON and the table's heading.
fn settings(a: &CompareArgs) -> Settings {
    Settings {
        workloads: Workload::ALL
            .into_iter()
            .filter(|w| a.workloads.contains(w))
            .collect(),
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
    }
}

/// Every run as JSON (`--json`), or the tables, with the text of each run
/// that was not clean on stderr.
fn print(a: &CompareArgs, c: &Comparison) {
    if a.json {
        for r in &c.servers {
            for rep in [&r.rate, &r.stream, &r.hold, &r.udp].into_iter().flatten() {
                rep.print(true);
            }
        }
    } else {
        print!("{}", markdown::table(&c.servers));
        if c.servers.iter().any(|r| r.udp.is_some()) {
            print!("\n{}", markdown::udp_table(&c.servers));
        }
        for r in &c.servers {
            for rep in [&r.rate, &r.stream, &r.hold, &r.udp].into_iter().flatten() {
                if !rep.ok {
                    eprint!("{}", rep.text());
                }
            }
        }
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
            forkd::error::describe(&e)
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
