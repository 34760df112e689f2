//! Start-up and the top of the program: from a [`Config`] to a running
//! dispatcher, in the order a careful daemon does it.
//!
//! 1. stdio descriptors exist (so no client socket becomes "stderr");
//! 2. logging; 3. the descriptor limit raised; 4. listeners, inherited from
//!    systemd or bound; 5. privileges dropped; 6. signal handlers and the
//!    reaper; 7. readiness announced (`--print-addr`, `READY=1`); 8. the
//!    dispatcher runs until stopped.

use std::io::Write;
use std::os::fd::AsRawFd;

use log::{info, warn};

use crate::child::{self, ChildSetup};
use crate::cli::{Config, Mode};
use crate::dispatcher::{Dispatcher, Settings, Summary};
use crate::error::{EXIT_OK, Error};
use crate::fork::ForkModel;
use crate::listen::Listener;
use crate::scoreboard::{PidIndex, Scoreboard};
use crate::signals::Signals;
use crate::thread::ThreadModel;
use crate::{inetd, limits, logging, privdrop, reaper, scoreboard, systemd, title};

/// Run forkd as configured; returns the exit code for a clean stop.
pub fn run(config: Config) -> Result<u8, Error> {
    ensure_stdio();
    logging::init(config.log, &config.syslog_socket, config.level())?;
    if config.inetd {
        return inetd::serve(config.buffer, config.idle());
    }
    limits::check_start(&config)?;
    // Resolve names before binding, so a typo fails before anything happens.
    let identity = match &config.user {
        Some(user) => Some(privdrop::resolve(user, config.group.as_deref())?),
        None => None,
    };
    let nofile = limits::raise_nofile();
    // Room for the shared tables: scoreboard, reaper ring, pid index, poll set.
    let pid_index = match config.mode {
        Mode::Fork => PidIndex::bytes(),
        Mode::Thread => 0,
    };
    scoreboard::reserve_shared(pid_index + config.max_conns * 256 + (1 << 20))
        .map_err(|e| Error::os("cannot map shared memory", e))?;
    let mut listeners = systemd::activated_listeners()?;
    let activated = !listeners.is_empty();
    if !activated {
        for addr in &config.listen {
            listeners.push(Listener::bind(*addr, config.backlog)?);
        }
    }
    for l in &listeners {
        l.set_idle_timeout(config.idle())?;
    }
    if let Some(id) = &identity {
        privdrop::drop_to(id)?;
    } else if !nix::unistd::geteuid().is_root() {
        // A system call filter may forbid capset: serve anyway, but say so.
        if let Err(e) = privdrop::drop_capabilities() {
            log::warn!("{e}; connections keep the capabilities forkd was started with");
        }
    }
    let signals = Signals::install().map_err(|e| Error::os("cannot install signal handlers", e))?;
    let settings = Settings {
        max_conns: config.max_conns,
        max_per_ip: config.max_per_ip,
        grace: config.grace,
    };
    title::set_comm(c"forkd");
    let board =
        Scoreboard::new(config.max_conns).map_err(|e| Error::os("cannot map the scoreboard", e))?;

    // Hand start-up's freed heap back to the kernel: every resident page of
    // the dispatcher is a page table entry each fork copies.
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe { libc::malloc_trim(0) };

    let summary = match config.mode {
        Mode::Fork => {
            // Room in the ring for every child forkd can have, plus margin.
            reaper::install(
                config.max_conns + 64,
                config.reap == crate::cli::ReapMode::Handler,
            )
            .map_err(|e| Error::os("cannot install the SIGCHLD handler", e))?;
            let dispatcher = nix::unistd::getpid();
            child::exit_on_panic_in_children(dispatcher);
            let setup = ChildSetup::new(
                config.die_with_parent,
                dispatcher,
                title::TitleArea::capture(),
            );
            let model = ForkModel::new(config.reap, setup, config.buffer)
                .map_err(|e| Error::os("cannot map the pid index", e))?;
            announce(&config, &listeners, activated, &model_name(&config), nofile);
            Dispatcher::new(model, board, listeners, signals, settings)?.run()?
        }
        Mode::Thread => {
            let model = ThreadModel::new(config.thread_stack, config.buffer, config.max_conns);
            announce(&config, &listeners, activated, "thread", nofile);
            Dispatcher::new(model, board, listeners, signals, settings)?.run()?
        }
    };
    info!("{}", summary_line(&summary));
    Ok(EXIT_OK)
}

fn model_name(config: &Config) -> String {
    format!("fork, reap {:?}", config.reap).to_lowercase()
}

/// Tell the world forkd accepts: log, `--print-addr`, and `READY=1`.
fn announce(
    config: &Config,
    listeners: &[Listener],
    activated: bool,
    model: &str,
    nofile: nix::Result<u64>,
) {
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let how = if activated {
        "socket-activated"
    } else {
        "listening"
    };
    info!(
        "forkd {} {how} on {} (mode {model}, max {} connections), logging to {}",
        env!("CARGO_PKG_VERSION"),
        names.join(", "),
        config.max_conns,
        logging::describe()
    );
    if activated {
        for l in listeners {
            if l.name != l.addr.to_string() {
                info!("socket {} is {}", l.name, l.addr);
            }
        }
    }
    match nofile {
        Ok(n) if (n as usize) < config.max_conns + 64 && config.mode == Mode::Thread => warn!(
            "descriptor limit {n} is below --max-conns {}: accepts will pause when it runs out",
            config.max_conns
        ),
        Ok(_) => {}
        Err(e) => warn!("cannot raise the descriptor limit: {}", e.desc()),
    }
    if config.print_addr {
        let mut out = std::io::stdout().lock();
        for l in listeners {
            let _ = writeln!(out, "{}", l.addr);
        }
        let _ = out.flush();
        drop(out);
        close_stdout();
    }
    systemd::ready(&format!("active 0/{}, served 0", config.max_conns));
}

/// Replace stdout with /dev/null: readers see end-of-file, and descriptor 1
/// stays taken, so no socket can land on it.
fn close_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto descriptor 1, which std's stdout keeps using; it
        // now writes to /dev/null.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// Make sure descriptors 0, 1 and 2 are open (on /dev/null if they were closed).
fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        else {
            continue;
        };
        if null.as_raw_fd() == fd {
            // open(2) took the lowest free number, which is `fd`: keep it.
            std::mem::forget(null);
        } else {
            // SAFETY: `fd` is closed, so dup2 takes that free number.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn summary_line(s: &Summary) -> String {
    format!(
        "stopped: {} connections served, {} ended ({} by signal), {} refused by --max-per-ip",
        s.served, s.ended, s.killed, s.refused_per_ip
    )
}
