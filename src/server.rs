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
use crate::cli::{Config, Mode, ReapMode};
use crate::dispatcher::{Dispatcher, Settings};
use crate::error::{EXIT_OK, Error};
use crate::event::EventModel;
use crate::fork::ForkModel;
use crate::listen::Listener;
use crate::model::Model;
use crate::signals::Children;
use crate::thread::ThreadModel;
use crate::{events, inetd, limits, logging, privdrop, reaper, signals, systemd, title};

/// Run forkd as configured; returns the exit code for a clean stop.
pub fn run(config: Config) -> Result<u8, Error> {
    ensure_stdio();
    logging::init(config.log, &config.syslog_socket, config.level())?;
    if config.inetd {
        return inetd::serve(config.buffer, config.first_byte(), config.idle());
    }
    limits::check_start(&config)?;
    // Resolve names before binding, so a typo fails before anything happens.
    let identity = match &config.user {
        Some(user) => Some(privdrop::resolve(user, config.group.as_deref())?),
        None => None,
    };
    let nofile = limits::raise_nofile();
    let mut listeners = systemd::activated_listeners()?;
    let activated = !listeners.is_empty();
    if !activated {
        for addr in &config.listen {
            listeners.push(Listener::bind(*addr, config.backlog)?);
        }
    }
    for l in &listeners {
        l.set_timeouts(config.first_byte(), config.idle())?;
    }
    if let Some(id) = &identity {
        privdrop::drop_to(id)?;
    } else if !nix::unistd::geteuid().is_root() {
        // A system call filter may forbid capset: serve anyway, but say so.
        if let Err(e) = privdrop::drop_capabilities() {
            log::warn!("{e}; connections keep the capabilities forkd was started with");
        }
    }
    let settings = Settings {
        max_conns: config.max_conns,
        sources: config.sources(),
        early_drop: config.early_drop,
        grace: config.grace,
    };
    title::set_comm(c"forkd");
    match config.mode {
        Mode::Fork => {
            // Room in the ring for every child forkd can have, plus margin.
            reaper::init(config.max_conns + 64)
                .map_err(|e| Error::os("cannot map the reaper's ring", e))?;
            let children = match config.reap {
                ReapMode::Handler => Children::ReapInHandler,
                ReapMode::Lazy | ReapMode::Off => Children::Woken,
            };
            let dispatcher = nix::unistd::getpid();
            child::exit_on_panic_in_children(dispatcher);
            let setup = ChildSetup::new(
                config.die_with_parent,
                dispatcher,
                title::TitleArea::capture(),
                config.first_byte(),
                config.idle(),
            );
            let model = ForkModel::new(config.reap, setup, config.buffer);
            serve(
                &config, model, children, listeners, settings, activated, nofile,
            )
        }
        Mode::Thread => {
            let model = ThreadModel::new(
                config.thread_stack,
                config.buffer,
                config.max_conns,
                (config.first_byte(), config.idle()),
            );
            let (l, s) = (listeners, settings);
            serve(&config, model, Children::None, l, s, activated, nofile)
        }
        Mode::Event => {
            let model = EventModel::new(config.buffer, config.first_byte(), config.idle())
                .map_err(|e| Error::os("cannot create the epoll instance", e))?;
            let (l, s) = (listeners, settings);
            serve(&config, model, Children::None, l, s, activated, nofile)
        }
    }
}

/// Install the signal handlers, announce readiness, run the dispatcher
/// until it stops, and log the summary.
fn serve<M: Model>(
    config: &Config,
    model: M,
    children: Children,
    listeners: Vec<Listener>,
    settings: Settings,
    activated: bool,
    nofile: nix::Result<u64>,
) -> Result<u8, Error> {
    let signals =
        signals::install(children).map_err(|e| Error::os("cannot install signal handlers", e))?;
    let terms = model.terms();
    let name = match config.mode {
        Mode::Fork => format!("fork, reap {:?}", config.reap).to_lowercase(),
        Mode::Thread => "thread".to_string(),
        Mode::Event => "event".to_string(),
    };
    let dispatcher = Dispatcher::new(model, listeners, signals, settings)?;
    announce(config, dispatcher.listeners(), activated, &name, nofile);
    let s = dispatcher.run()?;
    let dropped = events::Dropped {
        log_lines: logging::dropped_lines(),
        notifications: systemd::dropped_notifications(),
    };
    let r = [s.refused.per_ip, s.refused.per_net, s.refused.early];
    events::stopped(terms, s.served, s.ended, s.forced, r, dropped);
    Ok(EXIT_OK)
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
        "forkd {} {how} on {} (mode {model}, max {}), logging to {}",
        env!("CARGO_PKG_VERSION"),
        names.join(", "),
        crate::error::count(config.max_conns as u64, "connection", "connections"),
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
        Ok(n) if (n as usize) < config.max_conns + 64 && config.mode != Mode::Fork => warn!(
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
