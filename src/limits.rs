//! Resource limits: the limits checked at start, and the descriptor limit
//! forkd raises for itself. (Per-source counts are in [`crate::sources`].)

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::cli::{Config, Mode};
use crate::error::Error;

/// Refuse, before anything is bound or mapped, the limits this host can
/// never honour, naming the option and the reason (a usage error, exit 64):
///
/// - `--max-conns` above the tasks the kernel can ever run: every
///   connection is a process (fork mode) or a thread (thread mode), and each
///   takes a pid (`kernel.pid_max`) and a task (`kernel.threads-max`); the
///   dispatcher is one more. In thread and event mode each connection
///   holds a descriptor of the dispatcher's, and no process can have more
///   than `fs.nr_open` (event mode's only ceiling: a connection is no task).
/// - in thread mode, a `--thread-stack` no thread can be created with (the
///   address space or memory cannot hold it): one thread is created with it
///   and joined, so the refusal carries the kernel's reason.
///
/// A lower descriptor limit (RLIMIT_NOFILE) is only warned about when
/// forkd announces itself: accepts pause when it runs out, and it can be
/// raised while forkd runs.
pub fn check_start(config: &Config) -> Result<(), Error> {
    // (sysctl, why it bounds connections, what the dispatcher itself takes)
    let mut ceilings = vec![];
    if config.mode != Mode::Event {
        ceilings.push(("kernel.pid_max", "each connection takes a pid", 1));
        ceilings.push(("kernel.threads-max", "each connection is a task", 1));
    }
    if config.mode != Mode::Fork {
        ceilings.push(("fs.nr_open", "each connection holds a descriptor", 64));
    }
    let n = config.max_conns as u64;
    for (name, why, own) in ceilings {
        let Some(most) = read_sysctl(name) else {
            continue;
        };
        let room = most.saturating_sub(own);
        if n > room {
            return Err(Error::usage(format!(
                "--max-conns {n} is more than this host can ever serve at once: \
                 {name} is {most} and {why} (at most {room})"
            )));
        }
    }
    if config.mode == Mode::Thread {
        let stack = config.thread_stack;
        let spawned = std::thread::Builder::new()
            .name("stack check".into())
            .stack_size(stack)
            .spawn(|| ());
        match spawned {
            Ok(t) => {
                let _ = t.join();
            }
            Err(e) => {
                return Err(Error::usage(format!(
                    "--thread-stack {stack} bytes: cannot create a thread with this stack: {}",
                    crate::error::describe(&e)
                )));
            }
        }
    }
    Ok(())
}

/// A sysctl's number (`kernel.pid_max` from /proc/sys/kernel/pid_max);
/// None when it cannot be read, as in some containers.
fn read_sysctl(name: &str) -> Option<u64> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Raise the RLIMIT_NOFILE soft limit to the hard limit; returns the new
/// soft limit. Each connection costs the dispatcher a descriptor in thread
/// mode, and a moment's descriptor in fork mode.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}
