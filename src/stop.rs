//! The graceful stop, the same for the dispatcher and the prefork parent:
//! stop accepting, let connections finish for `--grace`, then ask them to
//! end (SIGTERM, or a shutdown of reading), then force them a second later,
//! then give up after five more seconds. What "ask" and "force" mean is the
//! caller's ([`crate::model::Stop`]); when to do which, and the log lines
//! that say so, are here.

use std::time::{Duration, Instant};

use crate::events;
use crate::model::{Stop, Terms};

/// After asking connections to end, wait this long before forcing them.
const TERM_TO_KILL: Duration = Duration::from_secs(1);
/// After forcing, give up waiting for ends after this long.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for connections to finish by themselves.
    Grace,
    /// Asked to end; waiting a second.
    Terminated,
    /// Forced; waiting for the last ends to be collected.
    Killed,
}

/// Where a stop is, if one has begun.
#[derive(Clone, Copy, Debug, Default)]
pub struct Drain {
    at: Option<(Phase, Instant)>,
}

/// What [`Drain::step`] asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet.
    Wait,
    /// Ask (Terminate) or force (Kill) every connection still running.
    End(Stop),
    /// Every connection has ended, or forkd gives up on them: exit.
    Done,
}

impl Drain {
    pub fn is_stopping(&self) -> bool {
        self.at.is_some()
    }

    /// When the next step is due, while stopping.
    pub fn deadline(&self) -> Option<Instant> {
        self.at.map(|(_, t)| t)
    }

    /// Stop requests: `terminate` SIGTERMs and SIGINTs, and SIGXCPU if
    /// `cpu_limit`. Logs them; true when the stop begins now (the caller then
    /// stops accepting). A second request skips the rest of the grace period.
    pub fn on_requests(
        &mut self,
        terminate: u32,
        cpu_limit: bool,
        active: usize,
        grace: Duration,
    ) -> bool {
        let mut stops = terminate;
        if cpu_limit && self.at.is_none() {
            events::cpu_limit();
            stops = stops.max(1);
        }
        let mut began = false;
        for _ in 0..stops {
            match self.at {
                None => {
                    events::stopping(active, grace);
                    self.at = Some((Phase::Grace, Instant::now() + grace));
                    began = true;
                }
                Some((Phase::Grace, _)) => {
                    events::second_stop();
                    self.at = Some((Phase::Grace, Instant::now()));
                }
                Some(_) => {}
            }
        }
        began
    }

    /// Begin a stop with no request to log (an upgrade's old dispatcher):
    /// connections may finish until `deadline`.
    pub fn begin_until(&mut self, deadline: Instant) {
        self.at = Some((Phase::Grace, deadline));
    }

    /// SIGQUIT: the caller has forced every connection; wait for the ends.
    pub fn killed(&mut self) {
        self.at = Some((Phase::Killed, Instant::now() + KILL_WAIT));
    }

    /// One step of the stop, with `live` connections still running.
    pub fn step(&mut self, live: usize, now: Instant, terms: &Terms) -> Step {
        if live == 0 {
            return Step::Done;
        }
        let Some((phase, deadline)) = self.at else {
            return Step::Wait;
        };
        if now < deadline {
            return Step::Wait;
        }
        match phase {
            Phase::Grace => {
                events::grace_over(terms, live);
                self.at = Some((Phase::Terminated, now + TERM_TO_KILL));
                Step::End(Stop::Terminate)
            }
            Phase::Terminated => {
                events::still_open(terms, live);
                self.at = Some((Phase::Killed, now + KILL_WAIT));
                Step::End(Stop::Kill)
            }
            Phase::Killed => {
                events::gave_up(live);
                Step::Done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TERMS: Terms = Terms {
        id: "pid",
        terminate: "sending SIGTERM to",
        kill: "killing",
        forced: "by signal",
        collected: "reaped",
        finished: None,
    };

    #[test]
    fn a_stop_escalates_and_a_second_request_skips_the_grace() {
        let mut d = Drain::default();
        assert_eq!(d.step(1, Instant::now(), &TERMS), Step::Wait);
        assert!(d.on_requests(1, false, 1, Duration::from_secs(60)));
        assert_eq!(d.step(1, Instant::now(), &TERMS), Step::Wait, "in grace");
        assert!(!d.on_requests(1, false, 1, Duration::from_secs(60)));
        let now = Instant::now();
        assert_eq!(d.step(1, now, &TERMS), Step::End(Stop::Terminate));
        let later = now + TERM_TO_KILL;
        assert_eq!(d.step(1, later, &TERMS), Step::End(Stop::Kill));
        assert_eq!(d.step(1, later + KILL_WAIT, &TERMS), Step::Done);
        assert_eq!(d.step(0, now, &TERMS), Step::Done);
    }
}
