//! The `forkd-load` command line: four subcommands, parsed with clap.
//!
//! Load goes to loopback addresses only (127.0.0.0/8, ::1), and every count
//! and time is bounded, so a typo cannot turn the generator on another host
//! or leave it running for a day.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use forkd::model::Mode;
use forkd::usage::{ParseOutcome, one_line};

/// Longest run any subcommand accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most workers (`rate`) or connections (`stream`) at once.
pub const MAX_WORKERS: usize = 4096;
/// Most connections `hold` opens.
pub const MAX_HOLD: usize = 1_000_000;
/// Largest message or chunk.
pub const MAX_SIZE: usize = 16 << 20;

/// forkd-load: a load generator for echo servers (RFC 862) that checks every byte echoed.
///
/// Each subcommand loads one echo server on a loopback address (127.0.0.0/8
/// or ::1) and reports what it measured, as text or as JSON: `rate` opens
/// short connections as fast as the server takes them (or at a set pace) and
/// times each; `stream` keeps a few connections echoing and measures the
/// throughput; `hold` opens many idle connections and reports what they cost
/// the server (processes, memory). `compare` starts forkd in both modes, and
/// if asked the C floor servers and other echo servers, runs the workloads
/// against each, and writes a table, a chart and JSON.
///
/// Every byte that comes back is compared with the byte sent; errors are
/// counted by kind, and any error makes the exit status 1.
#[derive(Parser, Debug)]
// The doc comment above is the about text (a bare `about` would print the
// package's description).
#[command(name = "forkd-load", version, after_help = super::EXIT_CODES_HELP)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; in each, a negative number is a (bad) value, not an option.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Short connections: connect, send, half-close, read the echo to its end, check, again.
    #[command(allow_negative_numbers = true)]
    Rate(RateArgs),
    /// Long connections echoing continuously; every byte checked.
    #[command(allow_negative_numbers = true)]
    Stream(StreamArgs),
    /// Open many idle connections, echo once on each, report what they cost the server.
    #[command(allow_negative_numbers = true)]
    Hold(HoldArgs),
    /// Datagrams over UDP, one in flight per worker: datagrams/s, loss, latency; every byte checked.
    #[command(allow_negative_numbers = true)]
    Udp(UdpArgs),
    /// Start forkd (and others) and compare them under the same workloads.
    #[command(allow_negative_numbers = true)]
    Compare(CompareArgs),
}

/// Options every workload shares.
#[derive(ClapArgs, Debug, Clone)]
pub struct Common {
    /// The echo server to load (loopback only).
    #[arg(long, value_name = "ADDR", value_parser = parse_loopback)]
    pub addr: SocketAddr,

    /// The server's pid: its process tree's CPU time (and for hold, processes and memory) is reported.
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: Option<i32>,

    /// Limit on every connect, read and write; a slower one counts as a timeout.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Print one JSON object per run instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct RateArgs {
    #[command(flatten)]
    pub common: Common,

    /// How long to run.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Workers, each with one connection at a time.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = parse_workers)]
    pub concurrency: usize,

    /// Bytes sent (and expected back) on each connection.
    #[arg(long, value_name = "SIZE", default_value = "64", value_parser = parse_size)]
    pub size: usize,

    /// Open loop: start R connections a second in all, spread over the
    /// workers, and time each from when it was due (default: each worker
    /// starts its next connection as soon as the last ends).
    #[arg(long, value_name = "R", value_parser = parse_pace)]
    pub pace: Option<f64>,

    /// Begin each connection with a PROXY protocol header (as HAProxy's
    /// send-proxy or send-proxy-v2 would), naming the connection's own
    /// address as the client: for a forkd run with --proxy-protocol.
    #[arg(long, value_name = "VERSION")]
    pub proxy: Option<ProxyVersion>,
}

/// Which PROXY protocol header `rate --proxy` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct StreamArgs {
    #[command(flatten)]
    pub common: Common,

    /// How long to send.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Connections, each with a writer and a checking reader.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_workers)]
    pub conns: usize,

    /// Bytes per write.
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub size: usize,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct HoldArgs {
    #[command(flatten)]
    pub common: Common,

    /// Connections to open and hold.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = parse_hold)]
    pub conns: usize,

    /// After closing them all, how long to wait for the server to settle.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_timeout)]
    pub settle: Duration,

    /// Client processes holding the connections (default: as few as the descriptor limit allows).
    #[arg(long, value_name = "N", value_parser = parse_procs)]
    pub procs: Option<usize>,

    /// Internal: hold --conns connections numbered from FIRST for a parent hold, and report on stdout.
    #[arg(long, value_name = "FIRST", hide = true)]
    pub part: Option<usize>,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct UdpArgs {
    /// The server's UDP address (loopback only), and as for every workload --pid, --json.
    #[command(flatten)]
    pub common: Common,

    /// How long to run.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Workers, each with its own socket and one datagram in flight.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = parse_workers)]
    pub concurrency: usize,

    /// Bytes per datagram (at most 65,507, the most UDP carries over IPv4).
    #[arg(long, value_name = "SIZE", default_value = "64", value_parser = parse_datagram)]
    pub size: usize,

    /// A datagram whose reply takes longer than this is lost.
    #[arg(long, value_name = "DUR", default_value = "200ms", value_parser = parse_timeout)]
    pub wait: Duration,
}

/// A workload of `compare`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Rate,
    Stream,
    Hold,
    Udp,
}

impl Workload {
    /// Every workload, in the order `compare` runs them.
    pub const ALL: [Workload; 4] = [
        Workload::Rate,
        Workload::Stream,
        Workload::Hold,
        Workload::Udp,
    ];
}

#[derive(ClapArgs, Debug, Clone)]
pub struct CompareArgs {
    /// forkd modes to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fork,thread,event"
    )]
    pub modes: Vec<Mode>,

    /// Also measure, when installed: Python's ForkingTCPServer and ThreadingTCPServer, socat, tcpserver.
    #[arg(long)]
    pub peers: bool,

    /// Also measure the minimal C echo server of each mode measured (fork, thread, prefork, epoll) and the UDP one, built at run time with $CC $CFLAGS (default: cc -O2).
    #[arg(long)]
    pub floor: bool,

    /// How long each rate and each stream run lasts, per server (split over the rounds).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Workloads to run, in this order whatever the order given.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rate,stream,hold,udp"
    )]
    pub workloads: Vec<Workload>,

    /// rate: open loop at R connections a second (see `rate --pace`), the
    /// same load for every server, for latencies at equal load.
    #[arg(long, value_name = "R", value_parser = parse_pace)]
    pub pace: Option<f64>,

    /// Rounds; each runs rate and stream on every server, in alternating order.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,

    /// Directory for compare.md, compare.svg, compare.json and the servers' logs.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// The forkd binary (default: `forkd` next to forkd-load).
    #[arg(long, value_name = "PATH")]
    pub forkd: Option<PathBuf>,

    /// rate: workers.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = parse_workers)]
    pub concurrency: usize,

    /// rate: bytes per connection.
    #[arg(long, value_name = "SIZE", default_value = "64", value_parser = parse_size)]
    pub size: usize,

    /// stream: connections.
    #[arg(long = "stream-conns", value_name = "N", default_value_t = 4, value_parser = parse_workers)]
    pub stream_conns: usize,

    /// stream: bytes per write.
    #[arg(long = "stream-size", value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub stream_size: usize,

    /// hold: connections held on each server.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = parse_hold)]
    pub hold: usize,

    /// udp: bytes per datagram (workers: --concurrency).
    #[arg(long = "udp-size", value_name = "SIZE", default_value = "64", value_parser = parse_datagram)]
    pub udp_size: usize,

    /// udp: a datagram whose reply takes longer than this is lost.
    #[arg(long = "udp-wait", value_name = "DUR", default_value = "200ms", value_parser = parse_timeout)]
    pub udp_wait: Duration,

    /// Limit on every connect, read and write.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Pin the servers and the generator to separate halves of the CPUs (needs at least 2).
    #[arg(long)]
    pub pin: bool,

    /// Also print each run as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Parse the process's arguments; errors come back as one-line usage errors.
    pub fn from_args<I, T>(args: I) -> Result<Args, ParseOutcome>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        forkd::usage::parse::<Args>(args, |e| {
            use clap::error::ErrorKind;
            match e.kind() {
                // No subcommand is a bad command line (exit 64), not a request for help.
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => Some(format!(
                    "no subcommand given: {} (forkd-load --help describes them)",
                    subcommands()
                )),
                ErrorKind::InvalidSubcommand => {
                    Some(format!("{} [subcommands: {}]", one_line(e), subcommands()))
                }
                _ => None,
            }
        })
    }
}

/// `rate, stream, hold, compare`: the subcommands, as clap knows them.
fn subcommands() -> String {
    use clap::CommandFactory;
    let names: Vec<String> = Args::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    names.join(", ")
}

fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:7007 or [::1]:7007".to_string())?;
    if !addr.ip().is_loopback() {
        return Err("forkd-load only loads loopback addresses (127.0.0.0/8, ::1)".to_string());
    }
    if addr.port() == 0 {
        return Err("port 0 is not a server's port".to_string());
    }
    Ok(addr)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 500ms)"))?;
    if d < Duration::from_millis(10) || d > MAX_DURATION {
        return Err("must be between 10ms and 1h".to_string());
    }
    Ok(d)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 5s, 500ms)"))?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(600) {
        return Err("must be between 1ms and 10m".to_string());
    }
    Ok(d)
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n = parse_size::parse_size(s).map_err(|e| format!("{e} (examples: 64, 64KiB, 1MiB)"))?;
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_SIZE).contains(&n) => Ok(n),
        _ => Err("must be between 1 byte and 16MiB".to_string()),
    }
}

/// The largest UDP payload over IPv4: 65,535 − 20 (IP) − 8 (UDP).
pub const MAX_DATAGRAM: usize = 65_507;

fn parse_datagram(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        n if n > MAX_DATAGRAM => Err(format!("must be between 1 and {MAX_DATAGRAM} bytes")),
        n => Ok(n),
    }
}

fn parse_count(s: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be between 1 and {max}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Most connections a second `--pace` asks for.
pub const MAX_PACE: f64 = 1_000_000.0;

fn parse_pace(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (1.0..=MAX_PACE).contains(&r) => Ok(r),
        Ok(_) => Err(format!(
            "must be between 1 and {MAX_PACE} connections a second"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_workers(s: &str) -> Result<usize, String> {
    parse_count(s, MAX_WORKERS)
}

fn parse_hold(s: &str) -> Result<usize, String> {
    parse_count(s, MAX_HOLD)
}

/// Most client processes `hold` spreads over.
pub const MAX_PROCS: usize = 256;

fn parse_procs(s: &str) -> Result<usize, String> {
    parse_count(s, MAX_PROCS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, ParseOutcome> {
        Args::from_args(std::iter::once("forkd-load").chain(args.iter().copied()))
    }

    #[test]
    fn rate_defaults() {
        let Ok(Args {
            command: Command::Rate(r),
        }) = parse(&["rate", "--addr", "127.0.0.1:7007"])
        else {
            panic!("rate did not parse");
        };
        assert_eq!(r.duration, Duration::from_secs(10));
        assert_eq!(r.concurrency, 32);
        assert_eq!(r.size, 64);
        assert_eq!(r.common.timeout, Duration::from_secs(5));
    }

    #[test]
    fn remote_address_is_refused_in_one_line() {
        match parse(&["rate", "--addr", "192.0.2.1:7"]) {
            Err(ParseOutcome::Error(e)) => {
                assert_eq!(e.code, forkd::error::EXIT_USAGE);
                assert!(e.message.contains("loopback"), "{}", e.message);
                assert!(!e.message.contains('\n'));
            }
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn modes_and_sizes() {
        let Ok(Args {
            command: Command::Compare(c),
        }) = parse(&[
            "compare",
            "--modes",
            "thread",
            "--out",
            "x",
            "--stream-size",
            "1MiB",
        ])
        else {
            panic!("compare did not parse");
        };
        assert_eq!(c.modes, vec![Mode::Thread]);
        assert_eq!(c.stream_size, 1 << 20);
        assert!(parse(&["hold", "--addr", "[::1]:7", "--conns", "0"]).is_err());
    }
}
