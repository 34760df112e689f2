//! A progress bar on stderr, only when stderr is a terminal and the run is
//! long enough to wait for (over 2 s); plain output otherwise, so logs and
//! pipes never fill with control sequences.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Runs shorter than this get no bar.
const MIN_RUN: Duration = Duration::from_secs(2);

/// A bar, or nothing.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar counting `total` items (connections to open, say).
    pub fn count(total: u64, expected: Duration, label: &str) -> Progress {
        Progress::new(total, expected, label, "{prefix} [{bar:40}] {pos}/{len}")
    }

    /// A bar over a run of `duration`, advanced with [`Progress::tick_until`].
    pub fn timer(duration: Duration, label: &str) -> Progress {
        Progress::new(
            duration.as_millis() as u64,
            duration,
            label,
            "{prefix} [{bar:40}] {elapsed}",
        )
    }

    fn new(total: u64, expected: Duration, label: &str, template: &str) -> Progress {
        if expected <= MIN_RUN || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        Progress { bar: Some(bar) }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Advance a timer bar until `deadline` (or until `done` says stop).
    pub fn tick_until(&self, start: Instant, deadline: Instant, done: impl Fn() -> bool) {
        let Some(b) = &self.bar else { return };
        while Instant::now() < deadline && !done() {
            b.set_position(start.elapsed().as_millis() as u64);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
