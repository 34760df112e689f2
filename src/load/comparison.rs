//! What a comparison found, as `compare.json` holds it: the machine, the
//! settings, one row per server measured and those skipped. [`compare`]
//! fills it; [`markdown`] and [`chart`] draw it, and neither needs the
//! other's types or the comparison's running.
//!
//! [`compare`]: super::compare
//! [`markdown`]: super::markdown
//! [`chart`]: super::chart

use serde::Serialize;

use super::cli::Workload;
use super::report::Report;

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
