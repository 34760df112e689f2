//! Running a workload's threads: start one per worker, show progress until
//! the deadline, and gather what each returns. `rate` and `stream` share it.

use std::time::Instant;

use super::progress::Progress;
use forkd::error::{EXIT_OSERR, Error};

/// Run `n` threads named `{what}-{i}` (with `stack` bytes of stack, if
/// given), each calling `work(i)`, ticking `progress` until they all finish;
/// returns their results in order.
pub fn run<T, F>(
    n: usize,
    what: &str,
    stack: Option<usize>,
    progress: &Progress,
    start: Instant,
    deadline: Instant,
    work: F,
) -> Result<Vec<T>, Error>
where
    T: Send,
    F: Fn(usize) -> T + Sync,
{
    let work = &work;
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let mut builder = std::thread::Builder::new().name(format!("{what}-{i}"));
            if let Some(size) = stack {
                builder = builder.stack_size(size);
            }
            match builder.spawn_scoped(scope, move || work(i)) {
                Ok(h) => handles.push(h),
                Err(e) => return Err(Error::os(format!("cannot start a {what} thread"), e)),
            }
        }
        progress.tick_until(start, deadline, || handles.iter().all(|h| h.is_finished()));
        let mut all = Vec::with_capacity(handles.len());
        for h in handles {
            match h.join() {
                Ok(r) => all.push(r),
                Err(_) => return Err(Error::new(EXIT_OSERR, format!("a {what} thread panicked"))),
            }
        }
        Ok(all)
    })
}
