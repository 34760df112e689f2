//! What one run measured, with the field names `--json` prints, and how a
//! failed operation is sorted into an error kind.
//!
//! Every field is always present in the JSON (null where a workload does not
//! measure it), so scripts can read any run the same way.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::spread::RampPoint;
use forkd::error::count;

/// Why one connection (or one operation on it) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// connect(2) was refused: nothing listens, or the queue overflowed.
    Refused,
    /// The server reset the connection (ECONNRESET, EPIPE).
    Reset,
    /// A connect, read or write took longer than `--timeout`.
    Timeout,
    /// The echo ended (end-of-file) before every byte sent came back.
    ShortRead,
    /// A byte came back different from the byte sent.
    Corrupt,
    /// More bytes came back than were sent.
    Extra,
    /// Anything else (out of ports, out of descriptors...).
    Other,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Refused => "refused",
            Kind::Reset => "reset",
            Kind::Timeout => "timeout",
            Kind::ShortRead => "short_read",
            Kind::Corrupt => "corrupt",
            Kind::Extra => "extra",
            Kind::Other => "other",
        }
    }

    /// The kind called `name` (as [`Kind::name`] gives it).
    pub fn named(name: &str) -> Option<Kind> {
        [
            Kind::Refused,
            Kind::Reset,
            Kind::Timeout,
            Kind::ShortRead,
            Kind::Corrupt,
            Kind::Extra,
            Kind::Other,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }

    /// The kind of an I/O error from connect, read or write.
    pub fn of(e: &io::Error) -> Kind {
        match e.kind() {
            ErrorKind::ConnectionRefused => Kind::Refused,
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                Kind::Reset
            }
            // A read or write past SO_RCVTIMEO/SO_SNDTIMEO fails with EAGAIN.
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Kind::Timeout,
            ErrorKind::UnexpectedEof => Kind::ShortRead,
            _ => Kind::Other,
        }
    }
}

/// A failed connection: its kind, and a message for the first of each kind.
#[derive(Debug, PartialEq)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// A failed operation `what` (connect, read, write...).
    pub fn io(what: &str, e: &io::Error) -> Failure {
        let kind = Kind::of(e);
        let text = match kind {
            // EAGAIN's own text ("resource temporarily unavailable") hides that it is a timeout.
            Kind::Timeout => "timed out".to_string(),
            _ => forkd::error::describe(e),
        };
        Failure::new(kind, format!("{what}: {text}"))
    }
}

/// Errors counted by kind, plus their total.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Errors {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub short_read: u64,
    pub corrupt: u64,
    pub extra: u64,
    pub other: u64,
    pub total: u64,
    /// The first message seen of each kind, to say what went wrong.
    #[serde(skip)]
    pub examples: BTreeMap<&'static str, String>,
}

impl Errors {
    pub fn add(&mut self, f: Failure) {
        let slot = match f.kind {
            Kind::Refused => &mut self.refused,
            Kind::Reset => &mut self.reset,
            Kind::Timeout => &mut self.timeout,
            Kind::ShortRead => &mut self.short_read,
            Kind::Corrupt => &mut self.corrupt,
            Kind::Extra => &mut self.extra,
            Kind::Other => &mut self.other,
        };
        *slot += 1;
        self.total += 1;
        self.examples.entry(f.kind.name()).or_insert(f.message);
    }

    pub fn merge(&mut self, o: &Errors) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.short_read += o.short_read;
        self.corrupt += o.corrupt;
        self.extra += o.extra;
        self.other += o.other;
        self.total += o.total;
        for (k, v) in &o.examples {
            self.examples.entry(k).or_insert_with(|| v.clone());
        }
    }

    /// `corrupt 3, timeout 1`, or `none`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            ("refused", self.refused),
            ("reset", self.reset),
            ("timeout", self.timeout),
            ("short read", self.short_read),
            ("corrupt", self.corrupt),
            ("extra", self.extra),
            ("other", self.other),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, h.high());
    // Cannot fail: the value is clamped into the histogram's range.
    let _ = h.record(us);
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        Some(Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// What one held connection costs, in KiB: the server's share, split by
/// where it goes (see `hold` and `docs/load.md` for how each is read).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Cost {
    /// Growth of the server tree's PSS.
    pub pss: f64,
    /// Growth of the server tree's page tables (VmPTE summed).
    pub page_tables: f64,
    /// The server's new threads times one thread's kernel stack.
    pub kernel_stacks: f64,
    /// Slab growth without the client's half of the sockets.
    pub kernel_objects: f64,
    /// The sum of the four above.
    pub whole: f64,
    /// Slab growth, both ends (`Slab:` in /proc/meminfo).
    pub slab_both_ends: f64,
    /// Of which socket caches (both ends), task caches, and the rest
    /// (null without /proc/slabinfo, which only root can read).
    pub slab_sockets: Option<f64>,
    pub slab_tasks: Option<f64>,
    pub slab_other: Option<f64>,
    /// One thread's kernel stack, as measured (null if no thread was made).
    pub kernel_stack_kib: Option<f64>,
    /// How far `MemAvailable:` fell: everything, both ends, the generator too.
    pub machine: f64,
}

/// One run of one workload against one server.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// `rate`, `stream`, `hold` or `udp`.
    pub workload: &'static str,
    /// The server's name in a comparison (`forkd-fork`...), else null.
    pub target: Option<String>,
    pub addr: String,
    /// Wall-clock seconds from the first connect to the last check.
    pub elapsed_s: f64,
    /// rate: connections completed and checked; stream: connections used;
    /// hold: connections asked for.
    pub conns: u64,
    /// rate: checked connections per second.
    pub conn_per_s: Option<f64>,
    /// Bytes that came back and were checked.
    pub bytes: u64,
    /// stream (and rate): checked bytes per second, in MiB.
    pub mib_per_s: Option<f64>,
    /// rate: latency of a whole connection, connect to the end of its echo
    /// (open loop: from when the connection was due).
    pub latency_us: Option<Latency>,
    /// rate: the open loop's pace in connections a second; null for a closed loop.
    pub pace_per_s: Option<f64>,
    pub errors: Errors,
    /// udp: datagrams echoed and checked.
    pub datagrams: Option<u64>,
    /// udp: checked datagrams per second.
    pub dgram_per_s: Option<f64>,
    /// udp: datagrams with no reply within the wait.
    pub lost: Option<u64>,
    /// udp: lost, in percent of the datagrams sent.
    pub loss_pct: Option<f64>,
    /// hold: connections open and proven served (echoed once).
    pub held: Option<u64>,
    /// hold: processes in the server's tree while holding.
    pub procs: Option<u64>,
    /// hold: threads in the server's tree while holding.
    pub threads: Option<u64>,
    /// hold: zombies in the server's tree while holding.
    pub zombies: Option<u64>,
    /// hold: the tree's PSS before opening any connection, in KiB.
    pub pss_kib_baseline: Option<f64>,
    /// hold: the tree's PSS while holding, in KiB.
    pub pss_kib_total: Option<f64>,
    /// hold: (total - baseline) / held, in KiB.
    pub pss_kib_per_conn: Option<f64>,
    /// hold: what each held connection costs, in KiB (with `--pid`).
    pub cost: Option<Cost>,
    /// hold: client processes the connections were spread over.
    pub client_procs: Option<u64>,
    /// hold: connections opened and proven served per second, first to last.
    pub ramp_per_s: Option<f64>,
    /// hold: connections held at each tenth of the way.
    pub ramp: Option<Vec<RampPoint>>,
    /// hold: processes in the tree after closing everything and settling.
    pub procs_after: Option<u64>,
    /// hold: zombies in the tree after closing everything and settling.
    pub zombies_after: Option<u64>,
    /// CPU seconds (user + system) the generator itself used in this run.
    pub gen_cpu_s: f64,
    /// CPU seconds the server's tree used in this run (with `--pid`), children included.
    pub server_cpu_s: Option<f64>,
    /// Things worth knowing (a limit that capped the run...).
    pub notes: Vec<String>,
    /// No errors and everything asked for was done.
    pub ok: bool,
}

impl Report {
    /// Print as JSON (one line) or as text.
    pub fn print(&self, json: bool) {
        if json {
            match serde_json::to_string(self) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("forkd-load: cannot encode the report: {e}"),
            }
            // stdout carries only JSON; what each error kind was goes to stderr.
            for (kind, msg) in &self.errors.examples {
                eprintln!("forkd-load: {} first {kind}: {msg}", self.workload);
            }
        } else {
            print!("{}", self.text());
        }
    }

    /// The human-readable form.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let name = match &self.target {
            Some(t) => format!("{} {t} ({})", self.workload, self.addr),
            None => format!("{} {}", self.workload, self.addr),
        };
        match self.workload {
            "rate" => out.push_str(&format!(
                "{name}: {} in {:.2} s = {:.1} conn/s{}\n",
                count(self.conns, "connection", "connections"),
                self.elapsed_s,
                self.conn_per_s.unwrap_or(0.0),
                match self.pace_per_s {
                    Some(p) => format!(" (paced at {p} conn/s)"),
                    None => String::new(),
                }
            )),
            "stream" => out.push_str(&format!(
                "{name}: {}, {:.1} MiB echoed and checked in {:.2} s = {:.1} MiB/s\n",
                count(self.conns, "connection", "connections"),
                self.bytes as f64 / MIB,
                self.elapsed_s,
                self.mib_per_s.unwrap_or(0.0)
            )),
            "udp" => out.push_str(&format!(
                "{name}: {} echoed and checked in {:.2} s = {:.1} datagrams/s, {} lost ({:.3}%)\n",
                count(self.datagrams.unwrap_or(0), "datagram", "datagrams"),
                self.elapsed_s,
                self.dgram_per_s.unwrap_or(0.0),
                self.lost.unwrap_or(0),
                self.loss_pct.unwrap_or(0.0)
            )),
            _ => out.push_str(&format!(
                "{name}: {} of {} held and served\n",
                self.held.unwrap_or(0),
                count(self.conns, "connection", "connections")
            )),
        }
        if let Some(l) = &self.latency_us {
            out.push_str(&format!(
                "  latency µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
                l.p50, l.p90, l.p99, l.p999, l.max
            ));
        }
        if let (Some(p), Some(t)) = (self.procs, self.threads) {
            out.push_str(&format!(
                "  server tree: {}, {}, {}\n",
                count(p, "process", "processes"),
                count(t, "thread", "threads"),
                count(self.zombies.unwrap_or(0), "zombie", "zombies")
            ));
        }
        if let (Some(total), Some(base)) = (self.pss_kib_total, self.pss_kib_baseline) {
            out.push_str(&format!(
                "  PSS: {total:.0} KiB held, {base:.0} KiB idle, {:.1} KiB per connection\n",
                self.pss_kib_per_conn.unwrap_or(0.0)
            ));
        }
        if let Some(c) = &self.cost {
            out.push_str(&format!(
                "  whole cost per connection: {:.1} KiB = PSS {:.1} + page tables {:.1} + kernel stacks {:.1} + kernel objects {:.1}\n",
                c.whole, c.pss, c.page_tables, c.kernel_stacks, c.kernel_objects
            ));
            let split = match (c.slab_sockets, c.slab_tasks, c.slab_other) {
                (Some(s), Some(t), Some(o)) => {
                    format!(": sockets {s:.1}, tasks {t:.1}, other {o:.1}")
                }
                _ => String::new(),
            };
            out.push_str(&format!(
                "    slab grew {:.1} KiB per connection, both ends{split}; MemAvailable fell {:.1} KiB per connection\n",
                c.slab_both_ends, c.machine
            ));
        }
        if let Some(rate) = self.ramp_per_s {
            let tenths: Vec<String> = self
                .ramp
                .iter()
                .flatten()
                .scan((0u64, 0f64), |last, p| {
                    let r = (p.held - last.0) as f64 / (p.s - last.1).max(1e-9);
                    *last = (p.held, p.s);
                    Some(short_rate(r))
                })
                .collect();
            out.push_str(&format!(
                "  ramp: {:.0} connections a second over {:.1} s, from {}; each tenth: {}/s\n",
                rate,
                self.elapsed_s,
                count(
                    self.client_procs.unwrap_or(1),
                    "client process",
                    "client processes"
                ),
                tenths.join(" ")
            ));
        }
        if let (Some(p), Some(z)) = (self.procs_after, self.zombies_after) {
            out.push_str(&format!(
                "  after closing: {}, {}\n",
                count(p, "process", "processes"),
                count(z, "zombie", "zombies")
            ));
        }
        out.push_str(&format!("  errors: {}\n", self.errors.summary()));
        for (kind, msg) in &self.errors.examples {
            out.push_str(&format!("    first {kind}: {msg}\n"));
        }
        match self.server_cpu_s {
            Some(s) => out.push_str(&format!(
                "  CPU: generator {:.2} s, server tree {s:.2} s\n",
                self.gen_cpu_s
            )),
            None => out.push_str(&format!("  CPU: generator {:.2} s\n", self.gen_cpu_s)),
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }

    /// The exit status this run calls for.
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            super::EXIT_OK
        } else {
            super::EXIT_ERRORS
        }
    }
}

pub const MIB: f64 = 1024.0 * 1024.0;

/// 812, 12.3k.
fn short_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_of_a_kind_is_singular() {
        let rate = Report {
            workload: "rate",
            addr: "127.0.0.1:7".into(),
            conns: 1,
            ..Report::default()
        };
        assert!(
            rate.text().contains(": 1 connection in "),
            "{}",
            rate.text()
        );
        let hold = Report {
            workload: "hold",
            addr: "127.0.0.1:7".into(),
            conns: 1,
            held: Some(1),
            procs: Some(1),
            threads: Some(1),
            zombies: Some(0),
            procs_after: Some(1),
            zombies_after: Some(1),
            ..Report::default()
        };
        let text = hold.text();
        assert!(text.contains("1 of 1 connection held"), "{text}");
        assert!(text.contains("1 process, 1 thread, 0 zombies"), "{text}");
        assert!(
            text.contains("after closing: 1 process, 1 zombie"),
            "{text}"
        );
    }
}
