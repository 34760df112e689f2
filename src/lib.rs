//! forkd: a process-per-connection echo server (RFC 862) for Unix, with a
//! thread-per-connection twin for comparison.
//!
//! # Layout
//!
//! - [`cli`]: the command line, parsed into a [`cli::Config`].
//! - [`server`]: start-up in order, from a config to a running dispatcher.
//! - [`listen`]: binding listeners (SO_REUSEADDR, V6ONLY) and accepting.
//! - [`dispatcher`]: the one `poll` loop every model shares: accept, caps,
//!   per-address limits, back-off, the one place a connection ends, status,
//!   graceful stop.
//! - [`udp`]: UDP echo, served in the dispatcher's loop (no process or
//!   thread per datagram), with inetd's source checks and a per-source limit.
//! - [`model`]: what a concurrency model is to the dispatcher ([`model::Model`]),
//!   and the models there are ([`model::Mode`]).
//! - [`fork`]: fork mode, the dispatcher's side (fork, close, record).
//! - [`child`]: fork mode, the child's side (hygiene, title, echo, `_exit`).
//! - [`thread`]: thread mode, one thread per connection.
//! - [`prefork`]: prefork mode, the parent keeping its pool of workers.
//! - [`worker`]: prefork mode, a worker (its wait, limits, echo, end lines).
//! - [`ticker`]: prefork mode, a worker's timeouts by one interval timer,
//!   which also tells it of a drain.
//! - [`scoreboard`]: what prefork workers share (untrusted; reports and
//!   per-source limits only).
//! - [`event`]: event mode, one epoll loop over every connection.
//! - [`echo`]: the echo handler every model runs ([`echo::Session`]).
//! - [`exit_code`]: what a connection process's exit code means.
//! - [`inetd`]: `--inetd`, one connection on stdin for systemd `Accept=yes`.
//! - [`table`]: the dispatcher's private table of live connections.
//! - [`ids`]: from a pid or connection number to its slot in the table.
//! - [`probe`]: the private hash table under [`ids`] and [`sources`].
//! - [`counters`]: the byte counters, the only memory children share with
//!   the dispatcher (untrusted, reported only).
//! - [`memory`]: private (not inherited) and shared mappings for the tables.
//! - [`signals`]: the signal handler, what each signal means, the wake-up pipe.
//! - [`reaper`]: the ring of exits the SIGCHLD handler fills.
//! - [`events`]: the dispatcher's log lines, one helper per event.
//! - [`stop`]: the graceful stop's steps, for the dispatcher and the prefork parent.
//! - [`logging`]: stderr, journald prefixes or syslog, with per-child pids.
//! - [`systemd`]: `sd_notify` readiness and status, socket activation.
//! - [`limits`]: the descriptor limit and the start-up checks of `--max-conns`.
//! - [`sources`]: `--max-per-ip` and `--max-per-net` counting.
//! - [`proxy`]: `--proxy-protocol`, the PROXY header read between accept
//!   and admission (never blocking the dispatcher; a prefork worker waits
//!   for its own), so the real client is what is counted.
//! - [`upgrade`]: SIGUSR2, the binary upgrade that hands the listening
//!   sockets to a new forkd and drains.
//! - [`privdrop`]: `--user` / `--group`.
//! - [`title`]: process names and titles for `ps`.
//! - [`error`]: start-up errors and the documented exit codes.
//! - [`usage`]: a command line that cannot be run (help, version, one-line
//!   usage errors), and the one place an error is reported; forkd-load
//!   uses it too.
//!
//! The load generator, `forkd-load`, is a package of its own in `src/load`
//! (it uses this library; this library knows nothing of it), and the
//! tests' harness is `tests/util`.
//!
//! A new model is one new file implementing [`model::Model`], plus its line
//! in [`model::Mode`] and [`server`]; a model that works inside the
//! dispatcher's thread, as [`event`] does, joins its poll loop through
//! [`model::Model::poll_fd`]. Prefork is the exception: its parent never
//! accepts, so it has its own loop ([`prefork`]) rather than the dispatcher's.
//!
//! The fork path, in the order it runs: [`dispatcher`] accepts and calls
//! [`fork::ForkModel`]'s `start`, which forks; the child runs
//! [`child::serve`] (the echo of [`echo`]) and leaves with `_exit`; the
//! parent closes the socket and the dispatcher records the pid in its
//! [`table`]. The exit is reaped by the handler in [`signals`] into the
//! [`reaper`]'s ring, and the dispatcher ends the connection.

pub mod child;
pub mod cli;
pub mod counters;
pub mod dispatcher;
pub mod echo;
pub mod error;
pub mod event;
pub mod events;
pub mod exit_code;
pub mod fork;
pub mod ids;
pub mod inetd;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod memory;
pub mod model;
pub mod prefork;
pub mod privdrop;
pub mod probe;
pub mod proxy;
pub mod reaper;
pub mod scoreboard;
pub mod server;
pub mod signals;
pub mod sources;
pub mod stop;
pub mod systemd;
pub mod table;
pub mod thread;
pub mod ticker;
pub mod title;
pub mod udp;
pub mod upgrade;
pub mod usage;
pub mod worker;

/// The whole program: parse the arguments, run, report an error once.
pub fn main() -> std::process::ExitCode {
    usage::main(
        "forkd",
        cli::Config::from_args(std::env::args_os()),
        server::run,
    )
}
