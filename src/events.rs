//! The dispatcher's log lines, one helper per event (as tcpserver's
//! `log_accept`, `log_close`...): what each event says, at which level,
//! lives here and nowhere else.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::model::{How, Terms};
use crate::signals::{self, Pending};
use crate::sources::{self, Limits, Refused};

/// "1 connection", "2 connections" (plural by an `s`).
fn count(n: impl Into<u64>, noun: &str) -> String {
    crate::error::count(n.into(), noun, &format!("{noun}s"))
}

/// At most one line a second about one kind of trouble, with a count of the rest.
#[derive(Default)]
pub struct Throttle {
    next: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Some(lines suppressed since the last one) if a line may be written now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + Duration::from_secs(1));
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn more(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more since the last report)")
    }
}

pub fn started(terms: &Terms, id: u64, peer: SocketAddr) {
    debug!("start {} {id} for {peer}", terms.id);
}

pub fn refused(peer: SocketAddr, why: Refused, limits: Limits, suppressed: u64) {
    let (who, limit, option) = match why {
        Refused::Address => (peer.ip().to_string(), limits.per_ip, "--max-per-ip"),
        Refused::Network => (
            sources::network(peer.ip(), limits),
            limits.per_net,
            "--max-per-net",
        ),
    };
    warn!(
        "refused {peer}: {who} has {} already ({option}){}",
        count(limit, "connection"),
        more(suppressed)
    );
}

pub fn dropped_early(peer: SocketAddr, active: usize, max: usize, suppressed: u64) {
    warn!(
        "dropped {peer}: {active}/{max} busy, refusing new connections at random (--early-drop){}",
        more(suppressed)
    );
}

pub fn cannot_serve(peer: SocketAddr, why: &str, pause: Duration, suppressed: u64) {
    warn!(
        "cannot serve {peer}: {why} - connection closed, pausing {}ms{}",
        pause.as_millis(),
        more(suppressed)
    );
}

pub fn accept_short(listener: &str, why: &str, pause: Duration, suppressed: u64) {
    warn!(
        "accept on {listener}: {why} - pausing {}ms{}",
        pause.as_millis(),
        more(suppressed)
    );
}

pub fn accept_failed(listener: &str, why: &str) {
    error!("accept on {listener}: {why}");
}

/// A connection ended: one line, at info if it ended normally (at debug
/// for a `quiet` one, a balancer's health check).
pub fn end(
    terms: &Terms,
    id: u64,
    peer: SocketAddr,
    how: How,
    bytes: u64,
    took: Duration,
    quiet: bool,
) {
    let level = match (how.is_normal(), quiet) {
        (true, true) => log::Level::Debug,
        (true, false) => log::Level::Info,
        (false, _) => log::Level::Warn,
    };
    log::log!(
        level,
        "end {} {id} {peer}: {how}, {} echoed in {:.3}s",
        terms.id,
        count(bytes, "byte"),
        took.as_secs_f64()
    );
}

pub fn at_cap(max: usize) {
    warn!(
        "at the cap of {}: accepting paused (new clients wait in the backlog)",
        count(max as u64, "connection")
    );
}

pub fn below_cap() {
    info!("below the cap again: accepting");
}

/// The status line: asked for explicitly (SIGUSR1, SIGHUP), so written
/// whatever the log level.
pub fn status(line: &str) {
    let level = log::max_level();
    if level < log::LevelFilter::Info {
        log::set_max_level(log::LevelFilter::Info);
    }
    info!("{line}");
    log::set_max_level(level);
}

pub fn stopping(active: usize, grace: Duration) {
    info!(
        "stopping: no new connections; {} may finish within {}",
        count(active as u64, "active connection"),
        humantime::format_duration(grace)
    );
}

pub fn cpu_limit() {
    warn!("SIGXCPU: the CPU time limit is reached; stopping");
}

pub fn second_stop() {
    info!("second stop signal: ending connections now");
}

pub fn quit(terms: &Terms, active: usize) {
    info!(
        "SIGQUIT: {} {} and exiting",
        terms.kill,
        count(active as u64, "connection")
    );
}

pub fn grace_over(terms: &Terms, live: usize) {
    info!(
        "grace period over: {} {}",
        terms.terminate,
        count(live as u64, "connection")
    );
}

pub fn still_open(terms: &Terms, live: usize) {
    warn!(
        "{} {} still open",
        terms.kill,
        count(live as u64, "connection")
    );
}

pub fn gave_up(live: usize) {
    error!(
        "{} did not end when forced; exiting anyway",
        count(live as u64, "connection")
    );
}

pub fn upgrade_started(pid: i32) {
    info!("SIGUSR2: upgrade: started the new forkd as pid {pid}; accepting until it is ready");
}

pub fn upgrade_ready(pid: i32, active: usize, grace: Duration) {
    info!(
        "upgrade: pid {pid} is ready and accepting; this dispatcher stops accepting, and {} may finish within {}",
        count(active as u64, "active connection"),
        humantime::format_duration(grace)
    );
}

pub fn upgrade_failed(why: &str) {
    error!("upgrade failed: {why}; serving on");
}

pub fn upgrade_refused(why: &str) {
    warn!("SIGUSR2: no upgrade: {why}");
}

/// Signals forkd ignores, each logged at most once a second by itself, so
/// a storm of one can neither flood the log nor hide another.
pub struct Ignored(Box<[Throttle; 64]>);

impl Default for Ignored {
    fn default() -> Ignored {
        Ignored(Box::new(std::array::from_fn(|_| Throttle::default())))
    }
}

impl Ignored {
    /// Log the ignored signals among `pending`.
    pub fn log(&mut self, pending: Pending) {
        for signal in pending.ignored() {
            if self.0[signal as usize].allow(Instant::now()).is_some() {
                info!(
                    "ignored {}: forkd gives it no meaning",
                    signals::name(signal)
                );
            }
        }
    }
}

/// Prefork: worker `n` started (or was replaced) as `pid`.
pub fn worker_started(n: usize, pid: i32) {
    debug!("worker {n} started: pid {pid}");
}

/// Prefork: worker `n` cannot be forked; its place is tried again after `retry`.
pub fn worker_fork_failed(n: usize, why: &str, retry: Duration, suppressed: u64) {
    warn!(
        "cannot start worker {n}: {why} - trying again in {}ms{}",
        retry.as_millis(),
        more(suppressed)
    );
}

/// Prefork: worker `n` (`pid`) ended `how` after `lived`. `normal`: a
/// recycle or a stop, logged at info; `killed_serving`: it was killed
/// holding a connection, which had this many bytes echoed; `replaced`: when
/// its replacement starts (None: the pool is draining).
pub fn worker_ended(
    n: usize,
    pid: i32,
    how: &str,
    normal: bool,
    killed_serving: Option<u64>,
    lived: Duration,
    replaced: Option<Duration>,
) {
    let level = match (normal, replaced) {
        // A worker the drain stopped: the summary says it.
        (true, None) => log::Level::Debug,
        (true, Some(_)) => log::Level::Info,
        (false, _) => log::Level::Warn,
    };
    let serving = match killed_serving {
        Some(bytes) => format!(
            " while serving a connection ({} echoed, as it reported)",
            count(bytes, "byte")
        ),
        None => String::new(),
    };
    let next = match replaced {
        None => String::new(),
        Some(d) if d.is_zero() => "; replacing it".to_string(),
        Some(d) => format!(
            "; it died within {} of its start: replacing it in {}",
            humantime::format_duration(crate::prefork::QUICK),
            humantime::format_duration(d)
        ),
    };
    log::log!(
        level,
        "worker {n} pid {pid}: {how} after {:.3}s{serving}{next}",
        lived.as_secs_f64()
    );
}

/// What was dropped rather than let block the service, for the last line.
pub struct Dropped {
    pub log_lines: u64,
    pub notifications: u64,
}

/// The last line: what forkd did. `refused`: by --max-per-ip,
/// --max-per-net, --early-drop.
pub fn stopped(
    terms: &Terms,
    served: u64,
    ended: u64,
    forced: u64,
    refused: [u64; 3],
    dropped: Dropped,
) {
    let mut extra = String::new();
    if dropped.log_lines > 0 {
        extra += &format!(", {} dropped", count(dropped.log_lines, "log line"));
    }
    if dropped.notifications > 0 {
        extra += &format!(
            ", {} to systemd dropped",
            count(dropped.notifications, "notification")
        );
    }
    let [per_ip, per_net, early] = refused;
    info!(
        "stopped: {} served, {} ended ({} {}), refused {per_ip} by --max-per-ip, {per_net} by --max-per-net, {early} by --early-drop{extra}",
        count(served, "connection"),
        ended,
        forced,
        terms.forced,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_as_english() {
        assert_eq!(count(1u64, "connection"), "1 connection");
        assert_eq!(count(0u64, "connection"), "0 connections");
        assert_eq!(count(35u64, "byte"), "35 bytes");
    }
}
