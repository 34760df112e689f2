//! The end of a command line that cannot be run, for forkd and forkd-load
//! alike: `--help` and `--version` are printed (exit 0), and any other of
//! clap's errors becomes one line on stderr and exit 64
//! ([`EXIT_USAGE`](crate::error::EXIT_USAGE)), never clap's screenful; an
//! error from running is said once, at the top ([`main`]), with its own
//! exit code.

use std::process::ExitCode;

use clap::Parser;

use crate::error::Error;

/// Parse `args` as `P`. `--help` and `--version` come back as
/// [`ParseOutcome::Print`]; any other error as a usage error (exit code 64)
/// in one line: `word`'s, when it has one for that error (a program's own
/// wording, such as naming its subcommands), else [`one_line`]'s.
pub fn parse<P: Parser>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    word: impl FnOnce(&clap::Error) -> Option<String>,
) -> Result<P, ParseOutcome> {
    P::try_parse_from(args).map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            ParseOutcome::Print(e.render().to_string())
        }
        _ => ParseOutcome::Error(Error::usage(word(&e).unwrap_or_else(|| one_line(&e)))),
    })
}

/// A whole program: `parsed` (from [`parse`]) run by `run`, whose `Ok` is
/// the exit status; help and version printed; an error said once, as
/// `PROGRAM: error: MESSAGE`, and left with its exit code.
pub fn main<A>(
    program: &str,
    parsed: Result<A, ParseOutcome>,
    run: impl FnOnce(A) -> Result<u8, Error>,
) -> ExitCode {
    let result = match parsed {
        Ok(args) => run(args),
        Err(ParseOutcome::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ParseOutcome::Error(e)) => Err(e),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Not eprintln!, which panics when the write fails: stderr may
            // be forkd's own non-blocking description of a pipe nobody reads
            // (see logging), and the documented exit code matters more.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{program}: error: {e}");
            ExitCode::from(e.code)
        }
    }
}

/// What parsing a command line ended with when it gave no arguments to run with.
#[derive(Debug)]
pub enum ParseOutcome {
    /// --help or --version: print this and exit 0.
    Print(String),
    Error(Error),
}

/// clap's error as one line: what is wrong, the argument it is about, and
/// what clap lists under it (the possible values, the missing arguments, a
/// similar argument), without the usage and `--help` lines that follow.
///
/// `invalid value 'bogus' for '--mode <MODE>' [possible values: fork, thread]`,
/// `the following required arguments were not provided: --addr <ADDR>`,
/// `unexpected argument '--mod' found; tip: a similar argument exists: '--mode'`.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut out = String::new();
    // After a line ending in ':' clap lists items, one per line.
    let mut listing = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') || line.starts_with('[') {
                " "
            } else if listing && !line.starts_with("tip:") {
                ", "
            } else {
                "; "
            });
        }
        listing = line.ends_with(':') || (listing && !line.starts_with("tip:"));
        out.push_str(line);
    }
    if out.is_empty() {
        "bad arguments".to_string()
    } else {
        out
    }
}
