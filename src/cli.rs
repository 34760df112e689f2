//! The command line: every option forkd takes, parsed with clap into a [`Config`].
//!
//! Parsing is the only thing done here; each option's behaviour lives in the
//! module that owns it. Durations read like `10s`, `500ms`, `5m`; sizes like
//! `64KiB`, `1MiB`, `16384`.
//!
//! Every value is checked here against what it will meet later, so that a
//! value that cannot work is a usage error at start rather than a panic or
//! a surprise hours later: durations are at most [`MAX_DURATION`], a
//! non-zero `--idle-timeout` at least [`MIN_TIMEOUT`], `--thread-stack` at
//! most [`MAX_STACK`], `--max-conns` at most [`MAX_CONNS`]. What depends on
//! the host (pid_max, a stack that cannot be mapped) is checked by
//! [`crate::limits::check_start`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::Error;
pub use crate::model::Mode;
pub use crate::usage::ParseOutcome;

/// When the fork-mode dispatcher collects its finished children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReapMode {
    /// In the SIGCHLD handler, at once: no zombie outlives its exit by more than a moment.
    Handler,
    /// Only just before each accept, like the textbook dispatcher: zombies wait for the next client.
    Lazy,
    /// Never (until forkd exits): zombies pile up, and count against --max-conns.
    Off,
}

/// How a prefork worker waits for a connection (see `crate::worker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Wake {
    /// One idle worker is woken per connection (one listener: workers block in accept; several: EPOLLEXCLUSIVE).
    One,
    /// Each listener wakes every idle worker, and all but one find nothing: the thundering herd.
    All,
}

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogTarget {
    /// journald prefixes under systemd, stderr on a terminal, syslog if /dev/log exists, else stderr.
    Auto,
    Stderr,
    Syslog,
}

/// forkd: a process-per-connection echo server (RFC 862).
#[derive(Parser, Debug, Clone)]
// The doc comment above is the about text (a bare `about` would print the
// package's, which names the load generator too). Negative numbers are
// values (`--idle-timeout -1` is a bad duration), not options.
#[command(name = "forkd", version, long_about = None, allow_negative_numbers = true)]
pub struct Config {
    /// TCP address to listen on (repeatable); IPv6 as `[::1]:7007`; port 0 picks a free port [default: 127.0.0.1:7007 unless --udp is given].
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,

    /// UDP address to echo datagrams on (repeatable); with --udp alone, no TCP listener is opened.
    #[arg(long = "udp", value_name = "ADDR")]
    pub udp: Vec<SocketAddr>,

    /// UDP: replies a second to one source address, a token bucket (0: no limit).
    #[arg(long = "udp-rate", value_name = "N", default_value_t = 100)]
    pub udp_rate: u32,

    /// UDP: replies one source address may get at once before --udp-rate applies.
    #[arg(long = "udp-burst", value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_burst: u32,

    /// UDP: the largest datagram echoed; a larger one is dropped, never echoed cut (at most 64KiB).
    #[arg(long = "udp-buffer", value_name = "SIZE", default_value = "64KiB", value_parser = parse_udp_buffer)]
    pub udp_buffer: usize,

    /// Length of each listener's queue of connections not yet accepted.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: i32,

    /// Concurrency model.
    #[arg(long, value_enum, default_value_t = Mode::Fork)]
    pub mode: Mode,

    /// When finished children are reaped (fork mode).
    #[arg(long, value_enum, default_value_t = ReapMode::Handler)]
    pub reap: ReapMode,

    /// Most connections served at once; at the cap forkd stops accepting until one ends.
    #[arg(short = 'c', long = "max-conns", value_name = "N", default_value_t = 1024, value_parser = parse_conns)]
    pub max_conns: usize,

    /// Most connections at once from one source address (0: no limit).
    #[arg(long = "max-per-ip", value_name = "N", default_value_t = 32)]
    pub max_per_ip: u32,

    /// Most connections at once from one source network, as cut by --net-prefix (0: no limit).
    #[arg(long = "max-per-net", value_name = "N", default_value_t = 128)]
    pub max_per_net: u32,

    /// The network --max-per-net counts: IPv4 and IPv6 prefix lengths, as `24:64`.
    #[arg(long = "net-prefix", value_name = "V4:V6", default_value = "24:64", value_parser = parse_prefixes)]
    pub net_prefix: (u8, u8),

    /// Nearly full, refuse new connections at random (START:RATE:FULL, percent of --max-conns; `off`: never).
    #[arg(long = "early-drop", value_name = "START:RATE:FULL", default_value = "75:30:100", value_parser = parse_early_drop)]
    pub early_drop: EarlyDrop,

    /// Close a connection with no progress in either direction for this long (0: never).
    #[arg(long = "idle-timeout", value_name = "DUR", default_value = "300s", value_parser = parse_timeout)]
    pub idle_timeout: Duration,

    /// Close a connection that sent nothing at all for this long (0: the idle timeout applies).
    #[arg(long = "first-byte-timeout", value_name = "DUR", default_value = "30s", value_parser = parse_timeout)]
    pub first_byte_timeout: Duration,

    /// On SIGTERM/SIGINT, how long connections may finish before they are ended.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Prefork mode: worker processes in the pool (default: 8 per CPU, at most --max-conns).
    #[arg(long, value_name = "N", value_parser = parse_conns)]
    pub workers: Option<usize>,

    /// Prefork mode: a worker exits and is replaced after this many connections (0: never).
    #[arg(long = "max-conns-per-worker", value_name = "N", default_value_t = 0)]
    pub max_conns_per_worker: u64,

    /// Prefork mode: wake one idle worker per new connection (blocking accept on one listener, EPOLLEXCLUSIVE on several), or every idle worker (the thundering herd, to watch).
    #[arg(long, value_enum, default_value_t = Wake::One)]
    pub wake: Wake,

    /// Stack size of each connection thread (thread mode).
    #[arg(long = "thread-stack", value_name = "SIZE", default_value = "64KiB", value_parser = parse_stack)]
    pub thread_stack: usize,

    /// Size of each connection's echo buffer.
    #[arg(long = "buffer", value_name = "SIZE", default_value = "16KiB", value_parser = parse_bytes)]
    pub buffer: usize,

    /// Where to log.
    #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
    pub log: LogTarget,

    /// The syslog daemon's socket.
    #[arg(
        long = "syslog-socket",
        value_name = "PATH",
        default_value = "/dev/log"
    )]
    pub syslog_socket: PathBuf,

    /// Log more (-v: each connection's start, -vv: everything).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log less (-q: warnings and errors only, -qq: errors only).
    #[arg(short = 'q', long = "quiet", action = clap::ArgAction::Count)]
    pub quiet: u8,

    /// Once accepting, print each bound address on stdout, one per line (UDP ones as `udp ADDR`, after the TCP ones), then close stdout.
    #[arg(long = "print-addr")]
    pub print_addr: bool,

    /// After binding, serve as this user (dispatcher and children alike).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// After binding, serve as this group; requires --user (default: the --user's primary group).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,

    /// Children end when the dispatcher dies, even by SIGKILL (PR_SET_PDEATHSIG).
    #[arg(long = "die-with-parent")]
    pub die_with_parent: bool,

    /// Serve the one connection open on stdin/stdout, then exit (systemd Accept=yes, inetd).
    #[arg(long)]
    pub inetd: bool,

    /// Every connection must begin with a PROXY protocol header (v1 or v2), from a --proxy-from address.
    #[arg(long = "proxy-protocol")]
    pub proxy_protocol: bool,

    /// A balancer allowed to send PROXY headers, as an address or CIDR (repeatable; needs --proxy-protocol).
    #[arg(long = "proxy-from", value_name = "CIDR", value_parser = parse_cidr)]
    pub proxy_from: Vec<crate::proxy::Cidr>,

    /// How long a connection may take to send its whole PROXY header before it is closed.
    #[arg(long = "proxy-timeout", value_name = "DUR", default_value = "3s", value_parser = parse_proxy_timeout)]
    pub proxy_timeout: Duration,

    /// Bind with SO_REUSEPORT, so several forkd can listen on one address (the kernel spreads connections).
    #[arg(long = "reuse-port")]
    pub reuse_port: bool,
}

impl Config {
    /// Parse the process's arguments; errors come back as one-line usage errors.
    ///
    /// ```
    /// use forkd::cli::{Config, Mode, ParseOutcome};
    ///
    /// let c = Config::from_args(["forkd", "-l", "[::1]:0", "--mode", "thread"]).unwrap();
    /// assert_eq!(c.mode, Mode::Thread);
    /// assert_eq!(c.listen[0].port(), 0);
    ///
    /// let Err(ParseOutcome::Error(e)) = Config::from_args(["forkd", "--grace", "soon"]) else {
    ///     panic!("a bad duration must be refused");
    /// };
    /// assert_eq!(e.code, forkd::error::EXIT_USAGE);
    /// ```
    pub fn from_args<I, T>(args: I) -> Result<Config, ParseOutcome>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        crate::usage::parse::<Config>(args, |_| None)?
            .check()
            .map_err(ParseOutcome::Error)
    }

    /// Checks across options that clap cannot express.
    fn check(mut self) -> Result<Config, Error> {
        if self.listen.is_empty() && self.udp.is_empty() {
            self.listen.push(SocketAddr::from(([127, 0, 0, 1], 7007)));
        }
        if self.udp.len() > crate::udp::MAX_SOCKETS {
            return Err(Error::usage(format!(
                "at most {} --udp addresses",
                crate::udp::MAX_SOCKETS
            )));
        }
        if self.buffer == 0 {
            return Err(Error::usage("--buffer must be at least 1 byte"));
        }
        // Each connection allocates its buffer when it starts; a size no
        // allocation can meet would abort the process (in thread mode, all of forkd).
        if self.buffer > MAX_BUFFER {
            return Err(Error::usage("--buffer must be at most 64MiB"));
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(Error::usage("--group needs --user"));
        }
        if self.proxy_protocol && self.proxy_from.is_empty() {
            return Err(Error::usage(
                "--proxy-protocol needs --proxy-from CIDR: the balancers allowed to send PROXY headers",
            ));
        }
        if !self.proxy_from.is_empty() && !self.proxy_protocol {
            return Err(Error::usage("--proxy-from needs --proxy-protocol"));
        }
        if self.proxy_protocol && self.inetd {
            return Err(Error::usage("--proxy-protocol cannot be used with --inetd"));
        }
        if let Some(n) = self.workers
            && n > self.max_conns
        {
            return Err(Error::usage(format!(
                "--workers {n} is more than --max-conns {}: a worker serves one connection at a time, so the pool is the cap",
                self.max_conns
            )));
        }
        Ok(self)
    }

    /// The log level the -v and -q counts ask for.
    pub fn level(&self) -> log::LevelFilter {
        use log::LevelFilter::*;
        match self.verbose as i16 - self.quiet as i16 {
            i16::MIN..=-3 => Off,
            -2 => Error,
            -1 => Warn,
            0 => Info,
            1 => Debug,
            _ => Trace,
        }
    }

    /// The idle timeout, or None when it is switched off.
    pub fn idle(&self) -> Option<Duration> {
        (!self.idle_timeout.is_zero()).then_some(self.idle_timeout)
    }

    /// How long a connection may send nothing at all: the first-byte
    /// timeout, bounded by the idle timeout (None: for ever).
    pub fn first_byte(&self) -> Option<Duration> {
        match (self.first_byte_timeout.is_zero(), self.idle()) {
            (true, idle) => idle,
            (false, None) => Some(self.first_byte_timeout),
            (false, Some(idle)) => Some(self.first_byte_timeout.min(idle)),
        }
    }

    /// The UDP limits.
    pub fn udp_limits(&self) -> crate::udp::Limits {
        crate::udp::Limits {
            rate: self.udp_rate,
            burst: self.udp_burst,
            buffer: self.udp_buffer,
        }
    }

    /// Prefork mode: the pool's size, `--workers` or
    /// [`default_workers`](crate::prefork::default_workers)
    /// (never more than `--max-conns`).
    pub fn pool(&self) -> usize {
        self.workers
            .unwrap_or_else(crate::prefork::default_workers)
            .min(self.max_conns)
    }

    /// The per-source limits.
    pub fn sources(&self) -> crate::sources::Limits {
        crate::sources::Limits {
            per_ip: self.max_per_ip,
            per_net: self.max_per_net,
            v4_prefix: self.net_prefix.0,
            v6_prefix: self.net_prefix.1,
        }
    }

    /// The PROXY protocol stage, if `--proxy-protocol`.
    pub fn proxy(&self) -> Option<crate::proxy::Settings> {
        self.proxy_protocol.then(|| crate::proxy::Settings {
            from: self.proxy_from.clone(),
            timeout: self.proxy_timeout,
        })
    }
}

/// `--early-drop START:RATE:FULL`, in percent of `--max-conns`: from START
/// full on, a new connection is refused with probability RATE, rising
/// linearly to 100 at FULL (OpenSSH's `MaxStartups`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyDrop {
    Off,
    Between { start: u8, rate: u8, full: u8 },
}

impl EarlyDrop {
    /// The chance, per mille, that a new connection is refused with
    /// `active` of `max` connections busy: RATE at START, rising linearly to
    /// 1000 at FULL; 0 below START (never below one connection: a cap of 1
    /// is never "nearly full" empty).
    pub fn chance(self, active: usize, max: usize) -> usize {
        let EarlyDrop::Between { start, rate, full } = self else {
            return 0;
        };
        let percent = |p: u8| (max * p as usize / 100).max(1);
        let (start, full) = (percent(start), percent(full));
        if active < start || full <= start {
            return 0;
        }
        let rate = rate as usize * 10;
        rate + (1000 - rate) * (active - start).min(full - start) / (full - start)
    }
}

fn parse_early_drop(s: &str) -> Result<EarlyDrop, String> {
    if s == "off" {
        return Ok(EarlyDrop::Off);
    }
    let bad = || {
        format!("'{s}' is not START:RATE:FULL (percent, START < FULL <= 100, RATE <= 100) nor off")
    };
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| p.parse::<u8>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [start, rate, full] = parts[..] else {
        return Err(bad());
    };
    if start >= full || full > 100 || rate > 100 {
        return Err(bad());
    }
    Ok(EarlyDrop::Between { start, rate, full })
}

fn parse_cidr(s: &str) -> Result<crate::proxy::Cidr, String> {
    s.parse()
}

fn parse_proxy_timeout(s: &str) -> Result<Duration, String> {
    match parse_timeout(s)? {
        d if d.is_zero() => Err("must be more than 0 (a header must come in time)".to_string()),
        d => Ok(d),
    }
}

fn parse_prefixes(s: &str) -> Result<(u8, u8), String> {
    let bad = || format!("'{s}' is not V4:V6 prefix lengths (0-32 and 0-128), as 24:64");
    let (v4, v6) = s.split_once(':').ok_or_else(bad)?;
    let v4: u8 = v4.parse().map_err(|_| bad())?;
    let v6: u8 = v6.parse().map_err(|_| bad())?;
    if v4 > 32 || v6 > 128 {
        return Err(bad());
    }
    Ok((v4, v6))
}

/// The largest `--buffer`: far above any useful echo buffer, far below what
/// a connection's allocation could fail on.
pub const MAX_BUFFER: usize = 64 << 20;

/// The longest duration any option takes: ten years (as humantime counts
/// them, 365.25 days each). The dispatcher adds `--grace` to the monotonic
/// clock, which panics on overflow (`18446744073709551615s`), and
/// `--idle-timeout` goes to the kernel as a `timeval` (SO_RCVTIMEO), whose
/// seconds are a `time_t`: 2^63 s and more would arrive negative. Ten years
/// is far beyond any useful value and far inside both, even with a 32-bit
/// `time_t`.
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

/// The shortest non-zero `--idle-timeout`: below a microsecond the timeval
/// the kernel gets would be zero, which means no timeout at all.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// The largest `--thread-stack`: 1 GiB, 128 times glibc's default 8 MiB.
/// Whether the host can map it is checked at start as well.
pub const MAX_STACK: usize = 1 << 30;

/// The largest `--max-conns`: Linux's PID_MAX_LIMIT on 64-bit systems. Every
/// connection is a process or a thread, and each needs a pid, so no host
/// can run more; the host's own kernel.pid_max is checked at start as well.
pub const MAX_CONNS: usize = 1 << 22;

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 500ms, 5m)"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "too long (at most {})",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !d.is_zero() && d < MIN_TIMEOUT {
        return Err(format!(
            "too short (0 for none, or at least {})",
            humantime::format_duration(MIN_TIMEOUT)
        ));
    }
    Ok(d)
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let n = parse_size::parse_size(s).map_err(|e| format!("{e} (examples: 64KiB, 1MiB)"))?;
    usize::try_from(n).map_err(|_| "too large".to_string())
}

fn parse_udp_buffer(s: &str) -> Result<usize, String> {
    match parse_bytes(s)? {
        0 => Err("must be at least 1 byte".to_string()),
        n if n > crate::udp::MAX_BUFFER => Err("too large (at most 64KiB)".to_string()),
        n => Ok(n),
    }
}

fn parse_stack(s: &str) -> Result<usize, String> {
    match parse_bytes(s)? {
        n if n > MAX_STACK => Err("too large (at most 1GiB)".to_string()),
        n => Ok(n),
    }
}

fn parse_conns(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) if n > MAX_CONNS => Err(format!(
            "more than any Linux host can run at once (at most {MAX_CONNS})"
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_args(["forkd"]).unwrap();
        assert_eq!(
            c.listen,
            vec!["127.0.0.1:7007".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.mode, Mode::Fork);
        assert_eq!(c.reap, ReapMode::Handler);
        assert_eq!(c.max_conns, 1024);
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.idle(), Some(Duration::from_secs(300)));
        assert_eq!(c.level(), log::LevelFilter::Info);
    }

    #[test]
    fn udp_alone_opens_no_tcp_listener() {
        let c = Config::from_args(["forkd", "--udp", "[::1]:0"]).unwrap();
        assert!(c.listen.is_empty());
        assert_eq!(c.udp, vec!["[::1]:0".parse::<SocketAddr>().unwrap()]);
        let c = Config::from_args(["forkd", "--udp", "127.0.0.1:0", "-l", "127.0.0.1:0"]).unwrap();
        assert_eq!(c.listen.len(), 1);
        assert_eq!(c.udp_limits().buffer, 65536);
        for bad in [
            ["--udp-buffer", "65537"],
            ["--udp-burst", "0"],
            ["--udp", "x"],
        ] {
            assert!(matches!(
                Config::from_args(["forkd", bad[0], bad[1]]),
                Err(ParseOutcome::Error(e)) if e.code == crate::error::EXIT_USAGE
            ));
        }
    }

    #[test]
    fn bad_address_is_one_line_usage_error() {
        match Config::from_args(["forkd", "-l", "nonsense"]) {
            Err(ParseOutcome::Error(e)) => {
                assert_eq!(e.code, crate::error::EXIT_USAGE);
                assert!(e.message.contains("nonsense"), "{}", e.message);
                assert!(!e.message.contains('\n'));
            }
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn sizes_durations_and_levels() {
        let c = Config::from_args([
            "forkd",
            "--thread-stack",
            "128KiB",
            "--grace",
            "1500ms",
            "--idle-timeout",
            "0",
            "-qq",
        ])
        .unwrap();
        assert_eq!(c.thread_stack, 128 * 1024);
        assert_eq!(c.grace, Duration::from_millis(1500));
        assert_eq!(c.idle(), None);
        assert_eq!(c.level(), log::LevelFilter::Error);
    }

    #[test]
    fn bounds_are_inclusive_and_named() {
        let ok = Config::from_args([
            "forkd",
            "--grace",
            "10years",
            "--idle-timeout",
            "1ms",
            "--thread-stack",
            "1GiB",
            "-c",
            "4194304",
        ])
        .unwrap();
        assert_eq!(ok.grace, MAX_DURATION);
        assert_eq!(ok.idle_timeout, MIN_TIMEOUT);
        assert_eq!(ok.thread_stack, MAX_STACK);
        assert_eq!(ok.max_conns, MAX_CONNS);
        for (option, value) in [
            ("--grace", "3653days"),
            ("--idle-timeout", "999us"),
            ("--thread-stack", "1025MiB"),
            ("-c", "4194305"),
        ] {
            match Config::from_args(["forkd", option, value]) {
                Err(ParseOutcome::Error(e)) => {
                    assert_eq!(e.code, crate::error::EXIT_USAGE);
                    assert!(e.message.contains(value), "{}", e.message);
                }
                other => panic!("{option} {value} accepted: {other:?}"),
            }
        }
    }
}
