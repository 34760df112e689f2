//! forkd-load: the load generator behind the `forkd-load` binary, and the
//! fork-vs-thread comparison built on it.
//!
//! # Layout
//!
//! - [`cli`]: the subcommands and their options, parsed with clap.
//! - [`report`]: what one run measured (the JSON fields), error kinds and how
//!   an I/O error is sorted into one, printing.
//! - [`pattern`]: the bytes sent, so every byte echoed can be checked.
//! - [`rate`]: short connections, as many per second as the server takes.
//! - [`stream`]: long connections echoing continuously.
//! - [`hold`]: many idle connections, and what they cost the server.
//! - [`spread`]: opening hold's connections, in this process or spread over
//!   client processes when one process's descriptor limit is too few.
//! - [`kernel`]: what the kernel spends meanwhile (page tables, kernel stacks,
//!   slab caches), and how much room the kernel's task limits leave.
//! - [`udp`]: datagrams over UDP, one in flight per worker: rate, loss, latency.
//! - [`proctree`]: a server's process tree from `/proc`: processes, threads,
//!   zombies, PSS and CPU time.
//! - [`sys`]: the generator's own CPU time, descriptor limit and CPU affinity.
//! - [`progress`]: a progress bar on a terminal, nothing otherwise.
//! - [`workers`]: a workload's threads, started, watched and gathered.
//! - [`targets`]: starting the servers `compare` measures (forkd, the C
//!   floor servers (fork, thread, UDP), Python, socat, tcpserver).
//! - [`compare`]: the comparison run.
//! - [`comparison`]: what it found, as `compare.json` holds it (below
//!   [`markdown`] and [`chart`], which draw it as `compare.md` and
//!   `compare.svg`).
//!
//! The load generator is honest by construction: every byte that comes back
//! is compared with the byte sent, a reply that is corrupt, short or too long
//! is an error, and any error makes the exit status non-zero.

pub mod chart;
pub mod cli;
pub mod compare;
pub mod comparison;
pub mod hold;
pub mod kernel;
pub mod markdown;
pub mod pattern;
pub mod proctree;
pub mod progress;
pub mod rate;
pub mod report;
pub mod spread;
pub mod stream;
pub mod sys;
pub mod targets;
pub mod udp;
pub mod workers;

use std::process::ExitCode;

use forkd::error::Error;

/// Every run was clean.
pub const EXIT_OK: u8 = 0;
/// A run counted errors (refused, reset, timeout, short read, corrupt, extra,
/// other), or fewer connections were served than asked for.
pub const EXIT_ERRORS: u8 = 1;
/// An operating-system failure in the generator itself (threads, limits, /proc).
pub use forkd::error::EXIT_OSERR;
/// A server to measure could not be found, built or started.
pub use forkd::error::EXIT_UNAVAILABLE;
/// Bad command line.
pub use forkd::error::EXIT_USAGE;
/// The output directory or a file in it could not be written.
pub const EXIT_CANTCREAT: u8 = 73;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "Exit status:
  0   every run was clean
  1   errors were counted (refused, reset, timeout, short read, corrupt, extra, other)
      or fewer connections were served than asked for
  64  bad command line
  69  a server to measure could not be found, built or started
  71  an operating-system failure in forkd-load itself
  73  the output directory could not be written";

/// The whole `forkd-load` program: parse, run, report an error once.
pub fn main() -> ExitCode {
    forkd::usage::main("forkd-load", cli::Args::from_args(std::env::args_os()), run)
}

/// Run one subcommand; `Ok` carries the exit status (0 or [`EXIT_ERRORS`]).
pub fn run(args: cli::Args) -> Result<u8, Error> {
    match args.command {
        cli::Command::Rate(a) => rate::main(&a),
        cli::Command::Stream(a) => stream::main(&a),
        cli::Command::Hold(a) => hold::main(&a),
        cli::Command::Udp(a) => udp::main(&a),
        cli::Command::Compare(a) => compare::main(&a),
    }
}
