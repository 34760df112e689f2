//! Start-up and the top of the program: from a [`Config`] to a running
//! dispatcher, in the order a careful daemon does it.
//!
//! 1. stdio descriptors exist (so no client socket becomes "stderr");
//! 2. logging; 3. the descriptor limit raised; 4. listeners, inherited from
//!    systemd or bound; 5. privileges dropped; 6. signal handlers and the
//!    reaper; 7. readiness announced (`--print-addr`, `READY=1`); 8. the
//!    dispatcher runs until stopped.

use std::io::Write;
use std::net::SocketAddr;
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
use crate::udp::{Udp, UdpSocket};
use crate::{events, inetd, limits, logging, privdrop, reaper, signals, systemd, title};

/// Run forkd as configured; returns the exit code for a clean stop.
pub fn run(config: Config) -> Result<u8, Error> {
    ensure_stdio();
    systemd::take_upgrade_socket();
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
    let (mut listeners, mut datagrams) = systemd::activated_sockets()?;
    let activated = !listeners.is_empty() || !datagrams.is_empty();
    if !activated {
        for addr in &config.listen {
            listeners.push(Listener::bind(*addr, config.backlog, config.reuse_port)?);
        }
        for addr in &config.udp {
            datagrams.push(UdpSocket::bind(*addr)?);
        }
    }
    let udp = Udp::new(datagrams, config.udp_limits())?;
    for l in &listeners {
        // Fork and thread mode watch for long-lived connections with a
        // shorter first timeout (see `echo::initial_timeout`): a short
        // connection then never sets a timeout of its own. Prefork's
        // workers keep their timeouts by a timer of their own (`ticker`):
        // their sockets have none.
        if config.mode != Mode::Prefork {
            let hooked = matches!(config.mode, Mode::Fork | Mode::Thread);
            let first = crate::echo::initial_timeout(config.first_byte(), hooked);
            l.set_timeouts(first, config.idle())?;
        }
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
        proxy: config.proxy(),
        upgrade: Some(crate::upgrade::Upgrade::capture()),
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
            let bound = Bound {
                listeners,
                udp,
                activated,
            };
            serve(&config, model, children, bound, settings, nofile)
        }
        Mode::Thread => {
            let model = ThreadModel::new(
                config.thread_stack,
                config.buffer,
                config.max_conns,
                (config.first_byte(), config.idle()),
            );
            let bound = Bound {
                listeners,
                udp,
                activated,
            };
            serve(&config, model, Children::None, bound, settings, nofile)
        }
        Mode::Prefork => {
            let bound = Bound {
                listeners,
                udp,
                activated,
            };
            prefork(config, bound, settings, nofile)
        }
        Mode::Event => {
            let model = EventModel::new(config.buffer, config.first_byte(), config.idle())
                .map_err(|e| Error::os("cannot create the epoll instance", e))?;
            let bound = Bound {
                listeners,
                udp,
                activated,
            };
            serve(&config, model, Children::None, bound, settings, nofile)
        }
    }
}

/// The sockets served: TCP listeners and UDP sockets, bound or inherited.
pub struct Bound {
    pub listeners: Vec<Listener>,
    /// UDP, served in the dispatcher's loop whatever the mode (see [`crate::udp`]).
    pub udp: Udp,
    /// Passed by socket activation rather than bound here.
    pub activated: bool,
}

/// Prefork mode: fork the pool, announce, keep the pool until stopped.
fn prefork(
    mut config: Config,
    bound: Bound,
    mut settings: Settings,
    nofile: nix::Result<u64>,
) -> Result<u8, Error> {
    let Bound {
        listeners,
        udp,
        activated,
    } = bound;
    let udp_names = udp.names();
    // A worker serves one connection at a time: the pool is the cap.
    let pool = config.pool();
    config.max_conns = pool;
    // Room in the ring for every worker's exit, plus margin.
    reaper::init(pool + 64).map_err(|e| Error::os("cannot map the reaper's ring", e))?;
    let parent = nix::unistd::getpid();
    child::exit_on_panic_in_children(parent);
    let oom = ChildSetup::new(false, parent, None, None, None).oom;
    let setup = crate::worker::Setup {
        listeners: Vec::new(),
        stop: -1,
        board: crate::scoreboard::Board::new(pool)
            .map_err(|e| Error::os("cannot map the scoreboard", e))?,
        keys: crate::scoreboard::Keys::default(),
        limits: settings.sources,
        early_drop: settings.early_drop,
        pool,
        max_conns_per_worker: config.max_conns_per_worker,
        wake: config.wake,
        block_in_accept: false,
        activated: false,
        buffer: config.buffer,
        title: title::TitleArea::capture(),
        oom,
        first_byte: config.first_byte(),
        idle: config.idle(),
        die_with_parent: config.die_with_parent,
        parent,
        proxy: config.proxy(),
    };
    let signals = signals::install(Children::ReapInHandler)
        .map_err(|e| Error::os("cannot install signal handlers", e))?;
    let mut pool = crate::prefork::Pool::new(
        setup,
        (listeners, udp),
        activated,
        signals,
        settings.grace,
        settings.upgrade.take(),
    )?;
    let name = format!(
        "prefork, {} workers, wake {:?}",
        config.max_conns, config.wake
    )
    .to_lowercase();
    // Announced first, so that no worker inherits the stdout --print-addr
    // closes (its reader waits for the end of it); a client that comes in
    // between waits in the backlog for the first worker.
    announce(
        &config,
        (pool.listeners(), &udp_names),
        activated,
        &name,
        nofile,
    );
    pool.fill();
    let s = pool.run()?;
    let dropped = events::Dropped {
        log_lines: logging::dropped_lines(),
        notifications: systemd::dropped_notifications(),
    };
    let r = [s.refused.per_ip, s.refused.per_net, s.refused.early];
    events::stopped(
        &crate::worker::TERMS,
        s.served,
        s.ended,
        s.forced,
        r,
        dropped,
    );
    Ok(EXIT_OK)
}

/// Install the signal handlers, announce readiness, run the dispatcher
/// until it stops, and log the summary.
fn serve<M: Model>(
    config: &Config,
    model: M,
    children: Children,
    bound: Bound,
    settings: Settings,
    nofile: nix::Result<u64>,
) -> Result<u8, Error> {
    let Bound {
        listeners,
        udp,
        activated,
    } = bound;
    let signals =
        signals::install(children).map_err(|e| Error::os("cannot install signal handlers", e))?;
    let terms = model.terms();
    let name = match config.mode {
        Mode::Fork => format!("fork, reap {:?}", config.reap).to_lowercase(),
        Mode::Thread => "thread".to_string(),
        Mode::Prefork => "prefork".to_string(),
        Mode::Event => "event".to_string(),
    };
    let udp_names = udp.names();
    let dispatcher = Dispatcher::new(model, listeners, signals, settings)?.with_udp(udp);
    let sockets = (dispatcher.listeners(), &udp_names[..]);
    announce(config, sockets, activated, &name, nofile);
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
    (listeners, udp): (&[Listener], &[(String, SocketAddr)]),
    activated: bool,
    model: &str,
    nofile: nix::Result<u64>,
) {
    let mut names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    names.extend(udp.iter().map(|(name, _)| format!("udp {name}")));
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
        for (name, addr) in udp {
            if *name != addr.to_string() {
                info!("socket {name} is udp {addr}");
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
        // After the TCP lines, each marked, so a script reading addresses
        // one per line as IP:PORT skips them.
        for (_, addr) in udp {
            let _ = writeln!(out, "udp {addr}");
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
