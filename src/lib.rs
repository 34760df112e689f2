//! forkd: a process-per-connection echo server (RFC 862) for Unix, with a
//! thread-per-connection twin for comparison.
//!
//! # Layout
//!
//! - [`cli`]: the command line, parsed into a [`cli::Config`].
//! - [`server`]: start-up in order, from a config to a running dispatcher.
//! - [`listen`]: binding listeners (SO_REUSEADDR, V6ONLY) and accepting.
//! - [`dispatcher`]: the one `poll` loop every model shares: accept, caps,
//!   per-address limits, back-off, logging each end, status, graceful stop.
//! - [`echo`]: the echo handler every model calls.
//! - [`fork`]: fork mode, the dispatcher's side (fork, record, reap).
//! - [`child`]: fork mode, the child's side (hygiene, title, echo, `_exit`).
//! - [`thread`]: thread mode, one thread per connection.
//! - [`inetd`]: `--inetd`, one connection on stdin for systemd `Accept=yes`.
//! - [`reaper`]: the SIGCHLD handler and the ring of exits it fills.
//! - [`scoreboard`]: the table of live connections and the other tables the
//!   dispatcher writes per connection, in memory shared with the children.
//! - [`signals`]: the other signal handlers and the wake-up pipe.
//! - [`logging`]: stderr, journald prefixes or syslog, with per-child pids.
//! - [`systemd`]: `sd_notify` readiness and status, socket activation.
//! - [`limits`]: the descriptor limit and `--max-per-ip` counting.
//! - [`privdrop`]: `--user` / `--group`.
//! - [`title`]: process names and titles for `ps`.
//! - [`error`]: start-up errors and the documented exit codes.
//! - [`load`]: the `forkd-load` load generator and fork-vs-thread comparison.
//!
//! A new model (a prefork pool, an event loop) is one new file implementing
//! [`dispatcher::Model`], plus its line in [`cli::Mode`] and [`server`].

pub mod child;
pub mod cli;
pub mod dispatcher;
pub mod echo;
pub mod error;
pub mod fork;
pub mod inetd;
pub mod limits;
pub mod listen;
pub mod load;
pub mod logging;
pub mod privdrop;
pub mod reaper;
pub mod scoreboard;
pub mod server;
pub mod signals;
pub mod systemd;
pub mod thread;
pub mod title;

use std::process::ExitCode;

/// The whole program: parse the arguments, run, report an error once.
pub fn main() -> ExitCode {
    let config = match cli::Config::from_args(std::env::args_os()) {
        Ok(c) => c,
        Err(cli::ParseOutcome::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(cli::ParseOutcome::Error(e)) => return fail(&e),
    };
    match server::run(config) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(&e),
    }
}

fn fail(e: &error::Error) -> ExitCode {
    // Not eprintln!, which panics when the write fails: stderr may be
    // forkd's own non-blocking description of a pipe nobody reads
    // (see logging), and the documented exit code matters more.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "forkd: error: {e}");
    ExitCode::from(e.code)
}
