//! forkd's build helper, run as `cargo xtask` (an alias in .cargo/config.toml):
//!
//! - `cargo xtask assets [DIR]`: the manual pages forkd(8) and
//!   forkd-load(1), completions for bash, zsh and fish, and the units as the
//!   Debian package installs them, into DIR (default `target/assets`);
//! - `cargo xtask deb [ARGS...]`: those into `target/assets`, then
//!   `cargo deb ARGS...` (cargo-deb, configured in Cargo.toml).
//!
//! The pages and completions come from the clap definitions `--help` prints
//! (`forkd::cli::Config`, `forkd_load::cli::Args`); the SIGNALS and EXIT
//! STATUS sections of forkd(8) from the README's tables of the same names,
//! and a connection's exit codes from `forkd::exit_code`. A separate
//! program, so that neither forkd nor forkd-load links clap_mangen or
//! clap_complete.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("assets") if args.len() <= 2 => {
            let dir = args
                .get(1)
                .map_or_else(|| root().join("target/assets"), PathBuf::from);
            assets(&dir).map(|files| {
                for f in files {
                    println!("{}", f.display());
                }
            })
        }
        Some("deb") => deb(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask assets [DIR]      manual pages, completions, packaged units (default DIR: target/assets)\n       cargo xtask deb [ARGS...]       those, then cargo deb ARGS (the Debian package, in target/debian)"
            );
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The repository: xtask's parent directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Write everything into `dir`; returns the files written.
fn assets(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let readme = std::fs::read_to_string(root().join("README.md"))
        .map_err(|e| format!("cannot read README.md: {e}"))?;
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![
        ("man/forkd.8".into(), forkd_page(&readme)?.into_bytes()),
        ("man/forkd-load.1".into(), load_page().into_bytes()),
    ];
    for (name, cmd) in [
        ("forkd", forkd::cli::Config::command()),
        ("forkd-load", forkd_load::cli::Args::command()),
    ] {
        for (shell, path) in [
            (Shell::Bash, format!("completions/bash/{name}")),
            (Shell::Zsh, format!("completions/zsh/_{name}")),
            (Shell::Fish, format!("completions/fish/{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut out);
            files.push((path.into(), out));
        }
    }
    files.extend(debian_units()?);
    // cargo-deb writes the maintainer scripts for the units (reload,
    // stop on removal) only into a maintainer-scripts directory: ours has
    // no scripts of its own.
    let scripts = dir.join("debian");
    std::fs::create_dir_all(&scripts)
        .map_err(|e| format!("cannot create {}: {e}", scripts.display()))?;
    let mut written = Vec::new();
    for (rel, bytes) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The units with `ExecStart=/usr/bin/forkd`, where the package puts the
/// binary, laid out as cargo-deb's `systemd-units` expects: a directory
/// per `unit-name`, a template unit named `forkd@.NAME.service`.
fn debian_units() -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (unit, file) in [
        ("forkd.socket", "forkd/forkd.socket"),
        ("forkd.service", "forkd/forkd.service"),
        ("forkd-inetd.socket", "forkd-inetd/forkd-inetd.socket"),
        (
            "forkd-inetd@.service",
            "forkd-inetd/forkd@.forkd-inetd.service",
        ),
        (
            "forkd-standalone.service",
            "forkd-standalone/forkd-standalone.service",
        ),
    ] {
        let text = std::fs::read_to_string(root().join("systemd").join(unit))
            .map_err(|e| format!("cannot read systemd/{unit}: {e}"))?;
        let text = text.replace("/usr/local/bin/forkd", "/usr/bin/forkd");
        out.push((Path::new("systemd").join(file), text.into_bytes()));
    }
    Ok(out)
}

/// `cargo xtask deb ARGS`: the assets, then `cargo deb ARGS`.
fn deb(args: &[String]) -> Result<(), String> {
    assets(&root().join("target/assets"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .arg("deb")
        .args(["--package", "forkd"])
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo deb: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "cargo deb failed ({status}); cargo-deb is installed with: cargo install cargo-deb"
        ))
    }
}

// ---------------------------------------------------------------------------
// Manual pages.

fn render(f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
    let mut out = Vec::new();
    f(&mut out).expect("rendering into memory");
    String::from_utf8(out).expect("roff is UTF-8")
}

/// Escape text for roff, with Markdown's `code`, **bold** and `[links](x)`
/// turned into bold and plain text.
fn roff(md: &str) -> String {
    let mut out = String::new();
    let mut chars = md.chars().peekable();
    let mut code = false;
    let mut bold = false;
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                out.push_str(if code { "\\fR" } else { "\\fB" });
                code = !code;
            }
            '*' if !code && chars.peek() == Some(&'*') => {
                chars.next();
                out.push_str(if bold { "\\fR" } else { "\\fB" });
                bold = !bold;
            }
            '[' if !code => {
                // [text](target): the text alone.
                let rest: String = chars.clone().collect();
                if let Some(close) = rest.find("](")
                    && let Some(end) = rest[close..].find(')')
                {
                    out.push_str(&roff(&rest[..close]));
                    for _ in 0..close + end + 1 {
                        chars.next();
                    }
                } else {
                    out.push('[');
                }
            }
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                out.push('|');
            }
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '…' => out.push_str("\\&..."),
            c => out.push(c),
        }
    }
    // A line may not begin with a control character.
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// The rows of the Markdown table under the heading `## title` in `md`.
fn table(md: &str, title: &str) -> Result<Vec<Vec<String>>, String> {
    let heading = format!("## {title}");
    let start = md
        .lines()
        .position(|l| l.trim() == heading)
        .ok_or_else(|| format!("README.md has no '{heading}'"))?;
    let rows: Vec<Vec<String>> = md
        .lines()
        .skip(start + 1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // the header and the |---| line
        .map(|l| {
            l.replace("\\|", "\u{0}")
                .trim()
                .trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().replace('\u{0}', "\\|"))
                .collect()
        })
        .collect();
    if rows.is_empty() {
        return Err(format!("README.md's '{heading}' has no table"));
    }
    Ok(rows)
}

/// A table as tagged paragraphs: the first cell bold, the rest below.
fn tagged(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for row in rows {
        out += &format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            roff(&row[0]),
            roff(&row[1..].join(" "))
        );
    }
    out
}

/// The help texts' Markdown code spans (`--help` prints them as they are)
/// in bold.
fn code_spans(roff: &str) -> String {
    let mut out = String::new();
    for (i, part) in roff.split('`').enumerate() {
        if i > 0 {
            out.push_str(if i % 2 == 1 { "\\fB" } else { "\\fR" });
        }
        out.push_str(part);
    }
    out
}

/// A later part of a page: without the definitions of the page's start
/// (clap_mangen opens every rendering with the `Aq` string's), which
/// repeated mid-page swallow the line after them.
fn fragment(roff: String) -> String {
    roff.lines()
        .filter(|l| !l.starts_with(".ie \\n(.g .ds Aq") && !l.starts_with(".el .ds Aq"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn section(title: &str, body: &str) -> String {
    format!(".SH {title}\n{body}")
}

/// forkd(8).
fn forkd_page(readme: &str) -> Result<String, String> {
    let cmd = forkd::cli::Config::command()
        .about("a process-per-connection echo server (RFC 862)")
        .long_about(DESCRIPTION);
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("System Manager's Manual");
    let mut page = render(|w| {
        man.render_title(w)?;
        man.render_name_section(w)?;
        man.render_synopsis_section(w)?;
        man.render_description_section(w)?;
        man.render_options_section(w)
    });
    page = code_spans(&page);
    page += &section("SIGNALS", &tagged(&table(readme, "Signals")?));
    let mut status = tagged(&table(readme, "Exit codes")?);
    status += ".PP\nIn fork mode, the process of one connection exits with a code that says how the connection ended; the dispatcher logs it in the connection's end line:\n";
    for code in 0..=5 {
        status += &format!(
            ".TP\n\\fB{code}\\fR\n{}\n",
            roff(forkd::exit_code::describe(code))
        );
    }
    page += &section("EXIT STATUS", &status);
    page += &section("ENVIRONMENT", &tagged(&rows(ENVIRONMENT)));
    page += &section("FILES", &tagged(&rows(FILES)));
    page += &section("SEE ALSO", SEE_ALSO_FORKD);
    page += &fragment(render(|w| man.render_version_section(w)));
    Ok(page)
}

fn rows(pairs: &[(&str, &str)]) -> Vec<Vec<String>> {
    pairs
        .iter()
        .map(|(a, b)| vec![a.to_string(), b.to_string()])
        .collect()
}

const DESCRIPTION: &str = "forkd is an echo server (RFC 862: every byte back, unchanged) that serves each TCP connection in a process of its own: a dispatcher accepts, forks a child per client, and reaps its children from a SIGCHLD handler. --mode thread serves each connection in a thread instead.

Under systemd, forkd takes its listening sockets from socket activation (LISTEN_FDS), announces readiness and status with sd_notify (READY=1, STATUS=, STOPPING=1), and writes its log to the journal with priorities. --inetd serves one connection passed on standard input, for systemd socket units with Accept=yes and for inetd. Three units come with it: forkd.socket with forkd.service (recommended), forkd-standalone.service, and forkd-inetd.socket with forkd-inetd@.service.

Durations read like 500ms, 10s, 5m; sizes like 16384, 64KiB, 1MiB.";

const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES",
        "socket activation (sd_listen_fds(3)): when `LISTEN_PID` is forkd's pid, forkd serves the `LISTEN_FDS` listening TCP sockets instead of binding `--listen`, and names them in its log by `LISTEN_FDNAMES`.",
    ),
    (
        "NOTIFY_SOCKET",
        "where `READY=1`, `STATUS=` and `STOPPING=1` go (sd_notify(3)); a file-system or abstract (`@name`) socket. Nothing is sent without it.",
    ),
    (
        "JOURNAL_STREAM",
        "when it names standard error's device and inode, `--log auto` and `--log stderr` write journald priority prefixes (`<4>`, `<6>`) and no timestamp.",
    ),
];

const FILES: &[(&str, &str)] = &[
    (
        "/usr/lib/systemd/system/forkd.socket, forkd.service",
        "the socket-activated deployment, as the Debian package installs it (scripts/install.sh installs the units to /etc/systemd/system); enable with `systemctl enable --now forkd.socket`.",
    ),
    (
        "/usr/lib/systemd/system/forkd-standalone.service",
        "forkd binding port 7 itself, with `CAP_NET_BIND_SERVICE` until it is bound.",
    ),
    (
        "/usr/lib/systemd/system/forkd-inetd.socket, forkd-inetd@.service",
        "one `forkd --inetd` unit instance per connection (`Accept=yes`).",
    ),
    (
        "/dev/log",
        "the syslog daemon's socket (`--syslog-socket`), for `--log syslog`, and for `--log auto` when it exists and standard error is neither a terminal nor the journal.",
    ),
    (
        "/proc/sys/kernel/pid_max, /proc/sys/kernel/threads-max, /proc/sys/fs/nr_open",
        "read at start: a `--max-conns` the host can never run is refused.",
    ),
    (
        "/proc/sys/kernel/cap_last_cap",
        "the last capability, for emptying the bounding set under `--user`.",
    ),
];

const SEE_ALSO_FORKD: &str = ".BR forkd\\-load (1),
.BR systemd.socket (5),
.BR systemd.exec (5),
.BR sd_notify (3),
.BR sd_listen_fds (3),
.BR systemd\\-socket\\-activate (1),
.BR tcpserver (1),
.BR inetd (8),
RFC 862.
.PP
README.md and docs/systemd.md (in /usr/share/doc/forkd with the Debian package).
";

/// forkd-load(1): the top level, then each subcommand's options.
fn load_page() -> String {
    let mut cmd = forkd_load::cli::Args::command();
    cmd.build();
    let long = cmd
        .get_long_about()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Its first paragraph repeats the about line; Markdown's backticks go.
    let description = long
        .split_once("\n\n")
        .map_or("", |(_, rest)| rest)
        .replace('`', "");
    let cmd = cmd
        .about("a load generator for echo servers (RFC 862) that checks every byte echoed")
        .long_about(description)
        .after_help("");
    let man = clap_mangen::Man::new(cmd.clone()).section("1");
    let mut page = render(|w| {
        man.render_title(w)?;
        man.render_name_section(w)?;
        man.render_synopsis_section(w)?;
        man.render_description_section(w)?;
        man.render_options_section(w)
    });
    // The subcommands with their options below, not as pages of their own.
    page += ".SH SUBCOMMANDS\n";
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        page += &format!(".TP\n\\fB{}\\fR\n{}\n", sub.get_name(), roff(&about));
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_name().to_string();
        // A name of its own: clap keeps &'static str names (no `string` feature).
        let full: &'static str = Box::leak(format!("forkd-load {name}").into_boxed_str());
        let sub_man = clap_mangen::Man::new(sub.clone().name(full));
        let options = fragment(render(|w| sub_man.render_options_section(w)));
        let synopsis = fragment(render(|w| sub_man.render_synopsis_section(w)));
        let title = format!(".SH FORKD-LOAD {}", name.to_uppercase());
        page += &synopsis.replacen(".SH SYNOPSIS", &title, 1);
        page += &format!(
            ".PP\n{}\n",
            roff(&sub.get_about().map(|a| a.to_string()).unwrap_or_default())
        );
        page += &code_spans(&options.replacen(".SH OPTIONS\n", "", 1));
    }
    let mut status = String::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for line in forkd_load::EXIT_CODES_HELP.lines().skip(1) {
        let line = line.trim();
        match line.split_once(' ') {
            Some((code, text)) if code.parse::<u8>().is_ok() => {
                rows.push(vec![code.to_string(), text.trim().to_string()])
            }
            _ => {
                if let Some(last) = rows.last_mut() {
                    last[1] = format!("{} {line}", last[1]);
                }
            }
        }
    }
    status += &tagged(&rows);
    page += &section("EXIT STATUS", &status);
    page += &section(
        "SEE ALSO",
        ".BR forkd (8)\n.PP\ndocs/load.md (in /usr/share/doc/forkd with the Debian package).\n",
    );
    page += &fragment(render(|w| man.render_version_section(w)));
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forkd_page_has_every_option_signal_and_code() {
        let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
        let page = forkd_page(&readme).unwrap();
        for arg in forkd::cli::Config::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                let long = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(page.contains(&long), "no {long} in forkd.8");
            }
        }
        for needle in [
            ".SH SIGNALS",
            "SIGHUP",
            "SIGXCPU",
            "SIGTTIN",
            ".SH EXIT STATUS",
            "\\fB64\\fR",
            "\\fB77\\fR",
            "sent nothing (first\\-byte timeout)",
            ".SH ENVIRONMENT",
            ".SH FILES",
            "/dev/log",
            ".SH SEE ALSO",
        ] {
            assert!(page.contains(needle), "no {needle:?} in forkd.8");
        }
        assert!(!page.contains('`'), "Markdown left in forkd.8");
    }

    #[test]
    fn load_page_has_every_subcommand_option_and_code() {
        let page = load_page();
        for sub in forkd_load::cli::Args::command().get_subcommands() {
            assert!(page.contains(&format!(".SH FORKD-LOAD {}", sub.get_name().to_uppercase())));
            // Hidden options are internal (hold's client processes), not the user's.
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    let long = format!("\\-\\-{}", long.replace('-', "\\-"));
                    assert!(
                        page.contains(&long),
                        "no {long} ({}) in forkd-load.1",
                        sub.get_name()
                    );
                }
            }
        }
        for code in ["\\fB0\\fR", "\\fB1\\fR", "\\fB64\\fR", "\\fB73\\fR"] {
            assert!(page.contains(code), "no exit code {code} in forkd-load.1");
        }
    }

    #[test]
    fn roff_escapes_markdown() {
        assert_eq!(
            roff("`--grace` [Zombies](#z)"),
            "\\fB\\-\\-grace\\fR Zombies"
        );
        assert_eq!(roff(".hidden"), "\\&.hidden");
        assert_eq!(roff("a \\| b"), "a | b");
    }
}
