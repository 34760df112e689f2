//! The docs a newcomer copies from: README.md and docs/*.md.
//!
//! Every ```sh block is a command to paste, from the top of a fresh clone,
//! into a fresh bash. Each is checked here for the traps that have caught
//! readers before: a developer machine's paths, `forkd` run bare (it is not
//! on PATH after `cargo build`), `$(pgrep forkd)` (several may run), `nc`
//! fed by a pipe without `-N` (it never hangs up), a pipeline that waits for
//! `--print-addr` output to end (forkd goes on serving). A block marked
//! `<!-- docs-check: run -->` is also run, with the binaries this test was
//! built with standing in for `cargo build`'s and a free port for 7007.
//! The other blocks serve until Ctrl-C, need systemd, root or minutes of
//! benchmark, and were run by hand as written.
use forkd_test_util::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file in docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// A fenced block: where it starts, its info string, whether it is marked
/// to be run, and its text.
struct Block {
    at: String,
    lang: String,
    run: bool,
    text: String,
}

fn blocks(page: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(page).unwrap();
    let name = page.strip_prefix(root()).unwrap().display().to_string();
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    let mut marked = false;
    while let Some((i, line)) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push(Block {
                at: format!("{name}:{}", i + 1),
                lang: lang.trim().to_string(),
                run: marked,
                text: body,
            });
            marked = false;
        } else if !line.trim().is_empty() {
            marked = line.trim() == "<!-- docs-check: run -->";
        }
    }
    out
}

/// A block's commands: continuation lines joined, comments dropped.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let command = match current.find(" #") {
                    Some(i) => &current[..i],
                    None => &current,
                };
                if !command.trim().is_empty() && !command.trim_start().starts_with('#') {
                    out.push(command.trim().to_string());
                }
                current.clear();
            }
        }
    }
    out
}

/// What is wrong with a command a reader pastes, if anything.
fn trap(command: &str) -> Option<&'static str> {
    let words: Vec<&str> = command.split_whitespace().collect();
    if command.starts_with("$ ") {
        return Some("a prompt in a block to paste: use ```console for a session with output");
    }
    let bare = words
        .iter()
        .enumerate()
        .any(|(i, w)| (*w == "forkd" || *w == "forkd-load") && (i == 0 || words[i - 1] != "--bin"));
    if bare {
        return Some(
            "forkd run bare: it is not on PATH after cargo build (target/release/forkd, cargo run)",
        );
    }
    if command.contains("$(pgrep") {
        return Some("$(pgrep ...): with more than one forkd running it names several");
    }
    let piped_nc = command
        .split('|')
        .skip(1)
        .any(|part| part.split_whitespace().next() == Some("nc"));
    if piped_nc && !words.contains(&"-N") {
        return Some("nc fed by a pipe needs -N (netcat-openbsd), or it never hangs up");
    }
    if command.contains("--print-addr |") {
        return Some("a pipeline from --print-addr waits for forkd to end, which it does not");
    }
    None
}

#[test]
fn no_page_names_a_developer_machine() {
    let mut files = pages();
    files.push(root().join("docs/compare.svg"));
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for bad in ["/work/", "target-core", "/home/", "-fc-v"] {
            assert!(
                !text.contains(bad),
                "{} contains {bad:?}, a path or build of the machine it was written on",
                file.display()
            );
        }
    }
}

#[test]
fn every_command_to_paste_avoids_the_known_traps() {
    let mut problems = Vec::new();
    let mut seen = 0;
    for page in pages() {
        for b in blocks(&page).iter().filter(|b| b.lang == "sh") {
            for c in commands(&b.text) {
                seen += 1;
                if let Some(why) = trap(&c) {
                    problems.push(format!("{}: {c}\n    {why}", b.at));
                }
            }
        }
    }
    assert!(
        seen > 10,
        "found only {seen} commands: is the parser right?"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_traps_are_recognised() {
    assert!(trap("forkd -l 127.0.0.1:0 --print-addr").is_some());
    assert!(trap("systemd-socket-activate -l 127.0.0.1:7 forkd --log stderr").is_some());
    assert!(trap("kill -USR1 \"$(pgrep -x forkd)\"").is_some());
    assert!(trap("printf 'a\\n' | nc 127.0.0.1 7007").is_some());
    assert!(trap("target/release/forkd --print-addr | { read a; }").is_some());
    assert!(trap("cargo run --release --bin forkd-load -- rate --addr 127.0.0.1:7").is_none());
    assert!(trap("printf 'a\\n' | nc -N 127.0.0.1 7007").is_none());
    assert!(trap("ps -o pid,comm -C forkd,forkd-conn").is_none());
}

/// Stand-ins for what `cargo build` leaves in a fresh clone's target/.
fn fake_clone() -> TempDir {
    let dir = TempDir::new("docs");
    for profile in ["debug", "release"] {
        let bin = dir.join("target").join(profile);
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(forkd(), bin.join("forkd")).unwrap();
        std::os::unix::fs::symlink(forkd_load(), bin.join("forkd-load")).unwrap();
    }
    dir
}

/// Stop at the first failing command; stop whatever the block left running
/// (a coproc is a job); `cargo build` has been done by the test's own build,
/// and nothing else is stood in for.
const PREAMBLE: &str = r#"set -eu -o pipefail
trap 'jobs=$(jobs -p); [ -z "$jobs" ] || kill -KILL $jobs 2>/dev/null || true' EXIT
cargo() {
    case "$1" in
    build) ;;
    *) echo "docs check: only cargo build is stood in for, not: cargo $*" >&2; return 1 ;;
    esac
}
"#;

#[test]
fn the_marked_commands_run_as_written() {
    let dir = fake_clone();
    let mut ran = 0;
    for page in pages() {
        for b in blocks(&page).iter().filter(|b| b.run) {
            ran += 1;
            if b.text.contains("nc ")
                && !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .any(|d| d.join("nc").is_file())
            {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped {}: needs nc (Debian: apt-get install netcat-openbsd)",
                    b.at
                );
                continue;
            }
            // The snippets name their port: a free one stands in for 7007.
            let port = free_port(false);
            let script = format!("{PREAMBLE}{}", b.text.replace("7007", &port.to_string()));
            let mut cmd = Command::new("bash");
            cmd.args(["-c", &script]).current_dir(dir.path());
            let run = run_with_deadline(cmd, Duration::from_secs(30));
            assert!(
                run.status.success(),
                "{} failed ({:?}):\n{}\nstdout:\n{}\nstderr:\n{}",
                b.at,
                run.status,
                b.text,
                run.stdout,
                run.stderr
            );
        }
    }
    assert!(ran >= 2, "only {ran} blocks are marked to run");
}
