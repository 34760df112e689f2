//! Opening `hold`'s connections and keeping them open: in this process
//! while its descriptor limit allows, else spread over client processes.
//!
//! One process can hold no more sockets than its RLIMIT_NOFILE, whose hard
//! limit an unprivileged process cannot raise (20,000 on some hosts), and
//! one client address has about 28,000 ports to connect from
//! (`net.ipv4.ip_local_port_range`). So a hold of 100,000 runs as several
//! copies of `forkd-load hold --part FIRST`, each holding its share; on
//! IPv4 loopback, connection i comes from 127.0.0.(1 + i mod 254). A part reports on its stdout, one line each:
//! `opened DONE HELD` after every batch, `error KIND MESSAGE` for each
//! failure, `note TEXT`, and at last `held N`; it then keeps its connections
//! until its stdin closes.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cli::HoldArgs;
use super::progress::Progress;
use super::report::{Errors, Failure, Kind};
use super::sys;
use forkd::error::{EXIT_OSERR, Error, count};

/// Descriptors kept free for everything that is not a held connection.
const RESERVE: u64 = 64;
/// Connections opened before their echoes are checked; bounds how many wait
/// in the server's listen queue at once.
const BATCH: usize = 100;

/// Held connections, counted at a moment of the ramp.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct RampPoint {
    pub held: u64,
    /// Seconds since the first connect.
    pub s: f64,
}

/// Where the connections are kept.
enum Holder {
    Here(Vec<TcpStream>),
    Parts(Vec<(Child, Option<ChildStdin>)>),
}

/// The connections opened, and what opening them showed.
pub struct Opened {
    pub held: u64,
    pub errors: Errors,
    pub notes: Vec<String>,
    /// Held connections at each tenth of the way (and at the end).
    pub ramp: Vec<RampPoint>,
    /// Seconds from the first connect to the last echo checked.
    pub open_s: f64,
    /// Client processes that held them (1: this one).
    pub procs: usize,
    holder: Holder,
}

impl Opened {
    /// Close every connection; with parts, wait until each has exited.
    pub fn close(self) {
        match self.holder {
            Holder::Here(held) => drop(held),
            Holder::Parts(mut parts) => {
                for (_, stdin) in parts.iter_mut() {
                    stdin.take();
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                for (child, _) in parts.iter_mut() {
                    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if matches!(child.try_wait(), Ok(None)) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
    }
}

/// The bytes connection `i` sends: its number, so a reply from another connection shows.
pub const TAG_LEN: usize = 8;

fn tag(i: usize) -> [u8; TAG_LEN] {
    (i as u64 ^ 0xF0F0_5A5A_0000_0000).to_le_bytes()
}

/// Records held connections at each tenth of `target`.
struct Ramp {
    start: Instant,
    target: u64,
    points: Vec<RampPoint>,
}

impl Ramp {
    fn new(target: u64) -> Ramp {
        Ramp {
            start: Instant::now(),
            target: target.max(1),
            points: Vec::new(),
        }
    }

    fn at(&mut self, held: u64) {
        let tenth = held * 10 / self.target;
        if tenth > self.points.len() as u64 {
            self.points.push(RampPoint {
                held,
                s: self.start.elapsed().as_secs_f64(),
            });
        }
    }

    fn end(mut self, held: u64) -> (Vec<RampPoint>, f64) {
        let s = self.start.elapsed().as_secs_f64();
        if self.points.last().map(|p| p.held) != Some(held) {
            self.points.push(RampPoint { held, s });
        }
        (self.points, s)
    }
}

/// Open `conns` connections to `addr` and keep them, reporting progress
/// under `label`; `procs` forces a number of client processes. Stops early
/// when `stop` is set.
pub fn open(
    addr: SocketAddr,
    conns: usize,
    timeout: Duration,
    procs: Option<usize>,
    label: &str,
    stop: &AtomicBool,
) -> Result<Opened, Error> {
    let per_proc = sys::nofile_hard()
        .map_err(|e| Error::new(EXIT_OSERR, format!("cannot read RLIMIT_NOFILE: {e}")))?
        .saturating_sub(RESERVE)
        .max(1) as usize;
    let procs = procs
        .unwrap_or(conns.div_ceil(per_proc))
        .clamp(1, conns.max(1));
    if procs == 1 && conns <= per_proc {
        open_here(addr, conns, timeout, label, stop)
    } else {
        open_parts(addr, conns, timeout, procs, per_proc, label, stop)
    }
}

fn open_here(
    addr: SocketAddr,
    conns: usize,
    timeout: Duration,
    label: &str,
    stop: &AtomicBool,
) -> Result<Opened, Error> {
    room_for(conns)?;
    // About a millisecond per connection: a bar from a few thousand on.
    let progress = Progress::count(conns as u64, Duration::from_millis(conns as u64), label);
    let mut ramp = Ramp::new(conns as u64);
    let mut done = 0;
    let batch = open_batches(addr, 0, conns, timeout, stop, |d, held, _| {
        progress.inc((d - done) as u64);
        done = d;
        ramp.at(held as u64);
    });
    progress.finish();
    let held = batch.held.len() as u64;
    let (ramp, open_s) = ramp.end(held);
    Ok(Opened {
        held,
        errors: batch.errors,
        notes: batch.note.into_iter().collect(),
        ramp,
        open_s,
        procs: 1,
        holder: Holder::Here(batch.held),
    })
}

/// Raise this process's descriptor limit for `conns` connections and the rest.
fn room_for(conns: usize) -> Result<u64, Error> {
    sys::raise_nofile(conns as u64 + RESERVE)
        .map_err(|e| Error::new(EXIT_OSERR, format!("cannot raise RLIMIT_NOFILE: {e}")))
}

/// What one process's batches opened.
struct Batches {
    held: Vec<TcpStream>,
    errors: Errors,
    /// Why it stopped before the end, if it did.
    note: Option<String>,
}

/// Open connections `first..first + n` in batches, calling `each` after
/// every batch with (connections tried, held, the failures of the batch).
fn open_batches(
    addr: SocketAddr,
    first: usize,
    n: usize,
    timeout: Duration,
    stop: &AtomicBool,
    mut each: impl FnMut(usize, usize, &[Failure]),
) -> Batches {
    let mut b = Batches {
        held: Vec::with_capacity(n),
        errors: Errors::default(),
        note: None,
    };
    let mut next = 0;
    while next < n {
        if stop.load(Ordering::Relaxed) {
            b.note = Some(format!(
                "interrupted after {}",
                count(b.held.len() as u64, "connection", "connections")
            ));
            break;
        }
        let end = (next + BATCH).min(n);
        let mut failed = Vec::new();
        let opened: Vec<(usize, TcpStream)> = (first + next..first + end)
            .filter_map(|i| match open_one(addr, source_of(addr, i), timeout, i) {
                Ok(s) => Some((i, s)),
                Err(f) => {
                    failed.push(f);
                    None
                }
            })
            .collect();
        // The echoes of one batch share one deadline, so a server that stopped
        // serving costs one timeout, not one per connection.
        let deadline = Instant::now() + timeout;
        for (i, mut s) in opened {
            match check_echo(&mut s, i, deadline) {
                Ok(()) => b.held.push(s),
                Err(f) => failed.push(f),
            }
        }
        let timeouts = failed.iter().any(|f| f.kind == Kind::Timeout);
        each(end, b.held.len(), &failed);
        for f in failed {
            b.errors.add(f);
        }
        next = end;
        if timeouts {
            b.note = Some(format!(
                "the server stopped serving new connections after {}: not opening more",
                count(b.held.len() as u64, "connection", "connections")
            ));
            break;
        }
    }
    b
}

fn open_one(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    i: usize,
) -> Result<TcpStream, Failure> {
    let mut s = sys::connect_from(addr, source, timeout).map_err(|e| Failure::io("connect", &e))?;
    s.write_all(&tag(i)).map_err(|e| Failure::io("write", &e))?;
    Ok(s)
}

/// Read connection `i`'s tag back before `deadline`.
fn check_echo(s: &mut TcpStream, i: usize, deadline: Instant) -> Result<(), Failure> {
    let want = tag(i);
    let mut got = [0u8; TAG_LEN];
    let mut n = 0;
    while n < TAG_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| Failure::io("socket options", &e))?;
        match s.read(&mut got[n..]) {
            Ok(0) => {
                return Err(Failure::new(
                    Kind::ShortRead,
                    format!("echo ended after {n} of {TAG_LEN} bytes"),
                ));
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::io("read", &e)),
        }
    }
    if got != want {
        return Err(Failure::new(
            Kind::Corrupt,
            format!("tag {want:02x?} came back as {got:02x?}"),
        ));
    }
    Ok(())
}

/// Client addresses connections take in turn on IPv4 loopback.
const SOURCES: usize = 254;

/// The address connection `i` connects from: on IPv4 loopback one of
/// 127.0.0.1 to 127.0.0.254 in turn (about 400 connections each for
/// 100,000, far from the 14,000 ports Linux prefers for `connect` from one
/// address to one server); else none.
fn source_of(addr: SocketAddr, i: usize) -> Option<IpAddr> {
    sys::loopback_source(addr, i, SOURCES)
}

/// What a part says on one line.
#[derive(Debug, PartialEq)]
enum Said {
    Opened { done: usize, held: usize },
    Failed(Failure),
    Note(String),
    Held(usize),
}

fn parse_line(line: &str) -> Option<Said> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "opened" => {
            let (d, h) = rest.split_once(' ')?;
            Some(Said::Opened {
                done: d.parse().ok()?,
                held: h.parse().ok()?,
            })
        }
        "error" => {
            let (kind, message) = rest.split_once(' ').unwrap_or((rest, ""));
            Some(Said::Failed(Failure::new(Kind::named(kind)?, message)))
        }
        "note" => Some(Said::Note(rest.to_string())),
        "held" => Some(Said::Held(rest.parse().ok()?)),
        _ => None,
    }
}

fn open_parts(
    addr: SocketAddr,
    conns: usize,
    timeout: Duration,
    procs: usize,
    per_proc: usize,
    label: &str,
    stop: &AtomicBool,
) -> Result<Opened, Error> {
    let share = conns.div_ceil(procs);
    if share > per_proc {
        return Err(Error::new(
            EXIT_OSERR,
            format!(
                "--procs {procs}: {share} connections each is more than RLIMIT_NOFILE allows one process ({per_proc})"
            ),
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::new(EXIT_OSERR, format!("cannot find forkd-load itself: {e}")))?;
    let progress = Progress::count(conns as u64, Duration::from_millis(conns as u64), label);
    let mut ramp = Ramp::new(conns as u64);
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    let mut parts = Vec::new();
    let mut notes = Vec::new();
    for k in 0..procs {
        let first = k * share;
        let n = share.min(conns - first);
        if n == 0 {
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.args([
            "hold",
            "--addr",
            &addr.to_string(),
            "--conns",
            &n.to_string(),
        ])
        .args(["--timeout", &format!("{}ms", timeout.as_millis())])
        .args(["--part", &first.to_string()]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error::new(EXIT_OSERR, format!("cannot start a client process: {e}")))?;
        let out = child.stdout.take().expect("stdout was piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((k, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((k, None));
        });
        let stdin = child.stdin.take();
        parts.push((child, stdin));
    }
    drop(tx);
    if matches!(addr, SocketAddr::V6(_)) {
        notes.push(format!(
            "IPv6 loopback has one address: all {} client processes connect from ::1",
            parts.len()
        ));
    }

    let mut errors = Errors::default();
    let mut done = vec![0usize; parts.len()];
    let mut held = vec![0usize; parts.len()];
    let mut finished = 0;
    let mut told_stop = false;
    while finished < parts.len() {
        if stop.load(Ordering::Relaxed) && !told_stop {
            // The parts got the same SIGINT from the terminal, or will end
            // when their stdin closes.
            told_stop = true;
            for (_, stdin) in parts.iter_mut() {
                stdin.take();
            }
        }
        let Ok((k, line)) = rx.recv_timeout(Duration::from_millis(100)) else {
            if parts
                .iter_mut()
                .all(|(c, _)| !matches!(c.try_wait(), Ok(None)))
            {
                break;
            }
            continue;
        };
        match line.as_deref().map(parse_line) {
            None => {
                // The part's stdout closed: it ended, with or without `held`.
                finished += 1;
            }
            Some(Some(Said::Opened { done: d, held: h })) => {
                progress.inc(d.saturating_sub(done[k]) as u64);
                done[k] = d;
                held[k] = h;
                ramp.at(held.iter().sum::<usize>() as u64);
            }
            Some(Some(Said::Failed(f))) => errors.add(f),
            Some(Some(Said::Note(n))) => notes.push(format!("client process {k}: {n}")),
            Some(Some(Said::Held(h))) => {
                held[k] = h;
                finished += 1;
            }
            Some(None) => notes.push(format!(
                "client process {k} said something unexpected: {}",
                line.unwrap_or_default()
            )),
        }
    }
    progress.finish();
    let total = held.iter().sum::<usize>() as u64;
    let (ramp, open_s) = ramp.end(total);
    notes.insert(
        0,
        format!(
            "held by {}, at most {share} each (one process holds no more sockets than its descriptor limit)",
            count(parts.len() as u64, "client process", "client processes"),
        ),
    );
    Ok(Opened {
        held: total,
        errors,
        notes,
        ramp,
        open_s,
        procs: parts.len(),
        holder: Holder::Parts(parts),
    })
}

/// `forkd-load hold --part FIRST`: hold connections FIRST.. for a parent
/// hold, say how it goes on stdout, and keep them until stdin closes.
pub fn part_main(a: &HoldArgs, first: usize) -> Result<u8, Error> {
    // Ctrl-C reaches the whole process group: the parent stops the ramp,
    // measures, then closes our stdin. A part that died at once would take
    // its connections with it before they were measured.
    // SAFETY: SIG_IGN installs no handler; nothing else handles SIGINT here.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    room_for(a.conns)?;
    let never = AtomicBool::new(false);
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        // The parent reads every line; if it is gone, so is the point of holding.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            std::process::exit(1);
        }
    };
    let b = open_batches(
        a.common.addr,
        first,
        a.conns,
        a.common.timeout,
        &never,
        |done, held, failed| {
            for f in failed {
                say(format!(
                    "error {} {}",
                    f.kind.name(),
                    f.message.replace('\n', " ")
                ));
            }
            say(format!("opened {done} {held}"));
        },
    );
    if let Some(n) = &b.note {
        say(format!("note {n}"));
    }
    say(format!("held {}", b.held.len()));
    // Hold until the parent closes our stdin (or exits).
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    drop(b.held);
    Ok(super::EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_understood_line_by_line() {
        assert_eq!(
            parse_line("opened 200 198"),
            Some(Said::Opened {
                done: 200,
                held: 198
            })
        );
        assert_eq!(parse_line("held 7"), Some(Said::Held(7)));
        assert_eq!(parse_line("note x y"), Some(Said::Note("x y".into())));
        match parse_line("error short_read echo ended after 3 of 8 bytes") {
            Some(Said::Failed(f)) => {
                assert_eq!(f.kind, Kind::ShortRead);
                assert_eq!(f.message, "echo ended after 3 of 8 bytes");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_line("error nonsense x"), None);
        assert_eq!(parse_line("gibberish"), None);
    }

    #[test]
    fn connections_spread_over_loopback_addresses() {
        let v4: SocketAddr = "127.0.0.1:7".parse().unwrap();
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(source_of(v4, 0), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(source_of(v4, 5), Some("127.0.0.6".parse().unwrap()));
        assert_eq!(source_of(v4, 253), Some("127.0.0.254".parse().unwrap()));
        assert_eq!(source_of(v4, 254), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(source_of(v6, 1), None);
    }

    #[test]
    fn the_ramp_is_sampled_at_each_tenth() {
        let mut r = Ramp::new(100);
        for held in (0..=100).step_by(5) {
            r.at(held);
        }
        let (points, _) = r.end(100);
        let helds: Vec<u64> = points.iter().map(|p| p.held).collect();
        assert_eq!(helds, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    }
}
