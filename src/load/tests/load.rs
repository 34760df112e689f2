//! forkd-load against the real forkd, and against echo servers that lie.
use forkd_test_util::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// Run forkd-load with `args`, killing it if it outlives `limit`.
fn load(args: &[&str], limit: Duration) -> Run {
    // compare starts the forkd beside forkd-load: have it built there.
    forkd();
    let mut cmd = Command::new(forkd_load());
    cmd.args(args);
    run_with_deadline(cmd, limit)
}

/// Show everything about a run that went wrong.
fn explain(args: &[&str], out: &Run) -> String {
    format!(
        "forkd-load {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status, out.stdout, out.stderr
    )
}

/// The one JSON object a run printed.
fn json(args: &[&str], out: &Run) -> Value {
    let text = &out.stdout;
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no JSON\n{}", explain(args, out)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON ({e})\n{}", explain(args, out)))
}

/// Run forkd-load against `f`, which must succeed, and return its JSON.
fn succeeded(f: &Forkd, args: &[&str]) -> Value {
    let out = load(args, LIMIT);
    f.check(out.status.success(), &explain(args, &out));
    json(args, &out)
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[derive(Clone, Copy)]
enum Lie {
    /// Echo everything, with the first byte of each read flipped.
    Flip,
    /// Echo half of the first read, swallow the rest, close at end-of-input.
    Truncate,
}

/// An echo server on a thread that lies in the given way.
fn lying_server(lie: Lie) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_lying(s, lie));
        }
    });
    addr
}

fn serve_lying(mut s: TcpStream, lie: Lie) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 4096];
    let mut first = true;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let reply = match lie {
            Lie::Flip => {
                buf[0] ^= 0x55;
                &buf[..n]
            }
            Lie::Truncate if first => &buf[..n / 2],
            Lie::Truncate => &buf[..0],
        };
        first = false;
        if s.write_all(reply).is_err() {
            return;
        }
    }
}

/// The repository's top, two levels above this package (src/load).
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn rate_and_stream_against_forkd_are_clean() {
    let f = Forkd::start(&["-q"]);
    let addr = f.addr().to_string();
    let pid = f.pid().to_string();

    let args = [
        "rate",
        "--addr",
        &addr,
        "--duration",
        "1s",
        "--concurrency",
        "4",
        "--json",
        "--pid",
        &pid,
    ];
    let r = succeeded(&f, &args);
    assert_eq!(r["workload"], "rate");
    assert_eq!(num(&r, &["errors", "total"]), 0.0, "{r}");
    assert!(num(&r, &["conns"]) > 10.0, "{r}");
    assert!(num(&r, &["conn_per_s"]) > 10.0, "{r}");
    let (p50, p99, max) = (
        num(&r, &["latency_us", "p50"]),
        num(&r, &["latency_us", "p99"]),
        num(&r, &["latency_us", "max"]),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{r}");
    assert!(num(&r, &["server_cpu_s"]) >= 0.0 && num(&r, &["gen_cpu_s"]) > 0.0);
    assert_eq!(r["ok"], true);

    let args = [
        "stream",
        "--addr",
        &addr,
        "--duration",
        "1s",
        "--conns",
        "2",
        "--size",
        "16KiB",
        "--json",
    ];
    let s = succeeded(&f, &args);
    assert_eq!(num(&s, &["errors", "total"]), 0.0, "{s}");
    assert!(num(&s, &["bytes"]) > 1e6, "{s}");
    assert!(num(&s, &["mib_per_s"]) > 1.0, "{s}");
    assert!(s["server_cpu_s"].is_null(), "no --pid, no server CPU: {s}");
}

/// `udp` against forkd: every datagram echoed and checked, none lost; against
/// a socket that never answers: every datagram lost, and exit 1.
#[test]
fn udp_against_forkd_is_clean_and_silence_is_loss() {
    let f = Forkd::start(&["-q", "--udp", "127.0.0.1:0"]);
    let addr = f.udp_addr().to_string();
    let pid = f.pid().to_string();
    let args = [
        "udp",
        "--addr",
        &addr,
        "--duration",
        "1s",
        "--concurrency",
        "4",
        "--size",
        "1000",
        "--json",
        "--pid",
        &pid,
    ];
    let r = succeeded(&f, &args);
    assert_eq!(r["workload"], "udp");
    assert_eq!(num(&r, &["errors", "total"]), 0.0, "{r}");
    assert_eq!(num(&r, &["lost"]), 0.0, "{r}");
    assert!(num(&r, &["datagrams"]) > 100.0, "{r}");
    assert_eq!(num(&r, &["bytes"]), num(&r, &["datagrams"]) * 1000.0, "{r}");
    assert!(num(&r, &["latency_us", "p50"]) > 0.0, "{r}");
    assert!(num(&r, &["server_cpu_s"]) >= 0.0, "{r}");

    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let args = [
        "udp",
        "--addr",
        &addr,
        "--duration",
        "300ms",
        "--wait",
        "50ms",
        "--json",
    ];
    let out = load(&args, LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&args, &out));
    let r = json(&args, &out);
    assert!(num(&r, &["lost"]) >= 32.0, "{r}");
    assert_eq!(num(&r, &["loss_pct"]), 100.0, "{r}");
}

/// `rate` and `stream` against a server that lies in one way: both exit 1,
/// and every error counted is of `kind`.
fn lies_are_caught(lie: Lie, kind: &str) {
    let addr = lying_server(lie).to_string();
    for (workload, size) in [("rate", "64"), ("stream", "8KiB")] {
        let args = [
            workload,
            "--addr",
            &addr,
            "--duration",
            "1s",
            "--size",
            size,
            "--json",
        ];
        let out = load(&args, LIMIT);
        assert_eq!(out.status.code(), Some(1), "{}", explain(&args, &out));
        let r = json(&args, &out);
        assert!(num(&r, &["errors", kind]) > 0.0, "{r}");
        assert_eq!(
            num(&r, &["errors", "total"]),
            num(&r, &["errors", kind]),
            "{r}"
        );
        assert_eq!(r["ok"], false);
    }
}

#[test]
fn corrupting_server_fails_rate_and_stream() {
    lies_are_caught(Lie::Flip, "corrupt");
}

#[test]
fn truncating_server_counts_short_reads() {
    // The reader sees fewer bytes than were sent; nothing else goes wrong.
    lies_are_caught(Lie::Truncate, "short_read");
}

/// A listener that never accepts, its queue already full: the kernel drops
/// every further SYN, so a connect to it waits until it gives up.
fn full_listener() -> (OwnedFd, SocketAddr, Vec<TcpStream>) {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, getsockname, listen, socket,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    // A backlog of 0 queues one connection.
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let local: SockaddrIn = getsockname(fd.as_raw_fd()).unwrap();
    let addr = SocketAddr::V4(local.into());
    let queued: Vec<TcpStream> = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok())
        .collect();
    assert!(!queued.is_empty(), "nothing queued on {addr}");
    (fd, addr, queued)
}

/// A server that accepts and then says nothing, keeping every connection.
fn silent_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in l.incoming().flatten() {
            kept.push(s);
        }
    });
    addr
}

#[test]
fn connects_and_reads_that_hang_count_as_timeouts() {
    let (_listener, full, _queued) = full_listener();
    for (addr, what) in [(full, "connect"), (silent_server(), "read")] {
        let addr = addr.to_string();
        let args = [
            "rate",
            "--addr",
            &addr,
            "--duration",
            "1s",
            "--timeout",
            "300ms",
            "--concurrency",
            "2",
            "--json",
        ];
        let out = load(&args, LIMIT);
        assert_eq!(out.status.code(), Some(1), "{}", explain(&args, &out));
        let r = json(&args, &out);
        assert_eq!(num(&r, &["conns"]), 0.0, "{r}");
        assert!(num(&r, &["errors", "timeout"]) > 0.0, "{what}: {r}");
        assert_eq!(
            num(&r, &["errors", "total"]),
            num(&r, &["errors", "timeout"]),
            "{what}: {r}"
        );
        assert!(
            out.stderr.contains(&format!("{what}: timed out"))
                || out.stdout.contains(&format!("{what}: timed out")),
            "{}",
            explain(&args, &out)
        );
    }
}

#[test]
fn hold_counts_the_fork_tree_and_leaves_no_zombie() {
    let f = Forkd::start(&["-q", "--mode", "fork"]);
    let addr = f.addr().to_string();
    let pid = f.pid().to_string();
    let args = [
        "hold", "--addr", &addr, "--conns", "50", "--pid", &pid, "--json",
    ];
    let h = succeeded(&f, &args);
    assert_eq!(num(&h, &["held"]), 50.0, "{h}");
    assert_eq!(num(&h, &["procs"]), 51.0, "dispatcher + 50 children: {h}");
    assert_eq!(num(&h, &["zombies_after"]), 0.0, "{h}");
    assert_eq!(num(&h, &["procs_after"]), 1.0, "{h}");
    assert!(num(&h, &["pss_kib_per_conn"]) > 0.0, "{h}");
    assert_eq!(num(&h, &["errors", "total"]), 0.0, "{h}");
    // Nothing left behind, as the tests' own view of /proc says too.
    f.check(
        wait_until(Duration::from_secs(5), || f.children().is_empty()),
        "children left after hold",
    );
}

/// Past one process's share, hold spreads the connections over client
/// processes (copies of itself) and over loopback addresses, and reports
/// the whole cost of each connection. forkd allows one connection per
/// client address here: all 90 served shows 90 addresses.
#[test]
fn hold_spreads_over_client_processes_and_reports_the_whole_cost() {
    let f = Forkd::start(&["-q", "--mode", "fork", "--max-per-ip", "1"]);
    let addr = f.addr().to_string();
    let pid = f.pid().to_string();
    let args = [
        "hold", "--addr", &addr, "--conns", "90", "--procs", "3", "--pid", &pid, "--json",
    ];
    let h = succeeded(&f, &args);
    assert_eq!(num(&h, &["held"]), 90.0, "{h}");
    assert_eq!(num(&h, &["client_procs"]), 3.0, "{h}");
    assert_eq!(num(&h, &["procs"]), 91.0, "dispatcher + 90 children: {h}");
    assert_eq!(num(&h, &["errors", "total"]), 0.0, "{h}");
    assert_eq!(num(&h, &["zombies_after"]), 0.0, "{h}");
    assert_eq!(num(&h, &["procs_after"]), 1.0, "{h}");
    let parts = ["pss", "page_tables", "kernel_stacks", "kernel_objects"];
    let sum: f64 = parts.iter().map(|p| num(&h, &["cost", p])).sum();
    assert!(
        (num(&h, &["cost", "whole"]) - sum).abs() < 1e-6,
        "whole is the sum of its parts: {h}"
    );
    // Every child has page tables of its own and a kernel stack.
    assert!(num(&h, &["cost", "page_tables"]) > 0.0, "{h}");
    assert!(num(&h, &["cost", "pss"]) > 0.0, "{h}");
    let ramp = h["ramp"].as_array().expect("ramp points");
    assert_eq!(ramp.last().map(|p| num(p, &["held"])), Some(90.0), "{h}");
    f.check(
        wait_until(Duration::from_secs(5), || f.children().is_empty()),
        "children left after hold",
    );
}

#[test]
fn paced_rate_sends_what_was_asked_and_no_more() {
    let f = Forkd::start(&["-q"]);
    let addr = f.addr().to_string();
    // 200 a second over 4 workers: one due every 20 ms on each, for 1 s.
    let args = [
        "rate",
        "--addr",
        &addr,
        "--duration",
        "1s",
        "--concurrency",
        "4",
        "--pace",
        "200",
        "--json",
    ];
    let r = succeeded(&f, &args);
    assert_eq!(num(&r, &["pace_per_s"]), 200.0, "{r}");
    assert_eq!(num(&r, &["errors", "total"]), 0.0, "{r}");
    // A closed loop would have made thousands; the schedule has 200 slots.
    let conns = num(&r, &["conns"]);
    assert!((150.0..=200.0).contains(&conns), "{r}");
    assert!(num(&r, &["elapsed_s"]) >= 0.9, "{r}");
    assert!(num(&r, &["latency_us", "p50"]) > 0.0, "{r}");

    // Without --pace, the field is there and null.
    let args = ["rate", "--addr", &addr, "--duration", "100ms", "--json"];
    let r = succeeded(&f, &args);
    assert!(r["pace_per_s"].is_null(), "{r}");
}

#[test]
fn compare_runs_only_the_workloads_asked_at_the_pace_asked() {
    let dir = TempDir::new("load-compare-paced");
    let out_dir = dir.path().to_string_lossy().to_string();
    let args = [
        "compare",
        "--modes",
        "fork",
        "--workloads",
        "rate",
        "--pace",
        "100",
        "--duration",
        "1s",
        "--rounds",
        "1",
        "--concurrency",
        "2",
        "--out",
        &out_dir,
    ];
    let out = load(&args, Duration::from_secs(60));
    assert!(out.status.success(), "{}", explain(&args, &out));
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).unwrap()).unwrap();
    assert_eq!(
        j["settings"]["workloads"],
        serde_json::json!(["rate"]),
        "{j}"
    );
    assert_eq!(num(&j, &["settings", "pace_per_s"]), 100.0, "{j}");
    let s = &j["servers"][0];
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(num(s, &["rate", "pace_per_s"]), 100.0, "{s}");
    assert!(num(s, &["rate", "conns"]) <= 100.0, "{s}");
    assert!(s["stream"].is_null() && s["hold"].is_null(), "{s}");
    let md = std::fs::read_to_string(dir.join("compare.md")).unwrap();
    assert!(md.contains("paced at 100 conn/s"), "{md}");
    assert!(!md.contains("stream ") && !md.contains("hold "), "{md}");
}

#[test]
fn compare_writes_a_table_a_chart_and_json() {
    let dir = TempDir::new("load-compare");
    let out_dir = dir.path().to_string_lossy().to_string();
    let args = [
        "compare",
        "--modes",
        "fork,thread",
        "--duration",
        "1s",
        "--hold",
        "50",
        "--concurrency",
        "4",
        "--stream-conns",
        "2",
        "--out",
        &out_dir,
    ];
    let out = load(&args, Duration::from_secs(60));
    assert!(out.status.success(), "{}", explain(&args, &out));

    let md = std::fs::read_to_string(dir.join("compare.md")).unwrap();
    for name in ["forkd-fork", "forkd-thread"] {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row for {name} in\n{md}"));
        assert_eq!(row.matches('|').count(), 12, "{row}");
        assert!(!row.contains("| – |"), "a missing figure in {row}");
    }

    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("compare.json")).unwrap()).unwrap();
    let servers = j["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{j}");
    for s in servers {
        assert_eq!(s["ok"], true, "{s}");
        assert_eq!(
            s["stopped"], "exit 0",
            "forkd stops cleanly on SIGTERM: {s}"
        );
        assert!(num(s, &["rate", "conn_per_s"]) > 0.0);
        assert!(num(s, &["stream", "mib_per_s"]) > 0.0);
        assert_eq!(num(s, &["hold", "held"]), 50.0);
        assert!(num(s, &["udp", "dgram_per_s"]) > 0.0, "{s}");
        assert_eq!(num(s, &["udp", "errors", "total"]), 0.0, "{s}");
    }
    assert!(md.contains("| server | dgram/s |"), "no UDP table in\n{md}");
    let fork = &servers[0];
    assert_eq!(fork["name"], "forkd-fork");
    assert_eq!(num(fork, &["hold", "procs"]), 51.0);
    assert_eq!(
        num(&servers[1], &["hold", "procs"]),
        1.0,
        "thread mode is one process"
    );

    let svg = dir.join("compare.svg");
    let check = Command::new("python3")
        .args(["-c", "import sys, xml.dom.minidom as m; d = m.parse(sys.argv[1]); assert d.documentElement.tagName == 'svg'"])
        .arg(&svg)
        .output()
        .expect("python3 to check the SVG");
    assert!(
        check.status.success(),
        "compare.svg is not well-formed XML: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("forkd-fork") && text.contains("forkd-thread"));
    // It says what it shows without the README: colours, settings, machine.
    for needed in [
        "forkd, a process per connection",
        "p99 latency, ms (log scale)",
        "4 workers x 64 B for 1 s",
        "Machine: ",
    ] {
        assert!(text.contains(needed), "compare.svg lacks {needed:?}");
    }
}

#[test]
fn bad_arguments_are_one_line_usage_errors() {
    // Each is one line that names the argument, and what it may be.
    for (args, mentions) in [
        (&["rate", "--addr", "192.0.2.7:7"][..], "loopback"),
        (
            &["hold", "--addr", "127.0.0.1:7", "--conns", "0"],
            "'--conns <N>'",
        ),
        (
            &["stream", "--addr", "127.0.0.1:7", "--duration", "soon"],
            "'soon' for '--duration <DUR>'",
        ),
        (&["rate", "--addr", "127.0.0.1:7", "--pace", "0"], "--pace"),
        (
            &["compare", "--out", "x", "--workloads", "rate,nap"],
            "'nap' for '--workloads <WORKLOADS>' [possible values: rate, stream, hold, udp]",
        ),
        (
            &["compare", "--out", "x", "--modes", "fork,forks"],
            "'forks' for '--modes <MODES>' [possible values: fork, thread",
        ),
        (&["rate"], "not provided: --addr <ADDR>"),
        (
            &["rate", "--addr", "127.0.0.1:7", "--concurrency", "-3"],
            "'-3' for '--concurrency <N>'",
        ),
        (&["hold", "--addr", "127.0.0.1:7", "--pid", "-1"], "--pid"),
        (
            &["frobnicate"],
            "'frobnicate' [subcommands: rate, stream, hold, udp, compare]",
        ),
        // No subcommand is a bad command line, not a request for help.
        (&[], "no subcommand given: rate, stream, hold, udp, compare"),
    ] {
        let out = load(args, LIMIT);
        assert_eq!(out.status.code(), Some(64), "{}", explain(args, &out));
        let err = &out.stderr;
        assert_eq!(err.lines().count(), 1, "{}", explain(args, &out));
        assert!(err.starts_with("forkd-load: error: "), "{err}");
        assert!(err.contains(mentions), "expected {mentions:?}: {err}");
        assert!(out.stdout.is_empty(), "{}", explain(args, &out));
    }
    // --help describes the load generator, not the package.
    let help = load(&["--help"], LIMIT);
    assert_eq!(
        help.status.code(),
        Some(0),
        "{}",
        explain(&["--help"], &help)
    );
    assert!(
        help.stdout
            .starts_with("forkd-load: a load generator for echo servers"),
        "{}",
        help.stdout
    );
    // Nothing listening: refused connections are errors, and the exit says so.
    let free = format!("127.0.0.1:{}", free_port(false));
    let args = ["rate", "--addr", &free, "--duration", "200ms", "--json"];
    let out = load(&args, LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&args, &out));
    assert!(num(&json(&args, &out), &["errors", "refused"]) > 0.0);
}

/// A figure as compare.md prints it: `6595`, `13.7k`, `31.9`.
fn figure(cell: &str) -> f64 {
    let cell = cell.trim();
    match cell.strip_suffix('k') {
        Some(k) => k.parse::<f64>().unwrap() * 1000.0,
        None => cell.parse().unwrap(),
    }
}

/// README's "A real run": its table, and the settings and machine its text
/// gives (`DURATION=10s scripts/bench.sh`: 2 rounds; rate 32 workers x 64 B,
/// stream 4 connections x 64 KiB, hold 2000; 2 CPUs, Linux 6.18.44).
fn readme_run() -> forkd_load::comparison::Comparison {
    use forkd_load::cli::Workload;
    use forkd_load::comparison::{Comparison, Machine, Row, Settings};
    use forkd_load::report::{Latency, Report};
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = &readme[readme
        .find("### A real run")
        .expect("README has a real run")..];
    let servers: Vec<Row> = section
        .lines()
        .skip_while(|l| !l.starts_with("| server |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let name = cells[0].to_string();
            let family = match name.split('-').next() {
                Some("forkd") => "forkd",
                Some("floor") => "floor",
                _ => "peer",
            };
            Row {
                forks: !name.ends_with("thread"),
                family,
                rate: Some(Report {
                    workload: "rate",
                    conn_per_s: Some(figure(cells[1])),
                    latency_us: Some(Latency {
                        p50: figure(cells[2]) as u64,
                        p99: figure(cells[3]) as u64,
                        ..Latency::default()
                    }),
                    ok: true,
                    ..Report::default()
                }),
                stream: Some(Report {
                    workload: "stream",
                    mib_per_s: Some(figure(cells[4])),
                    ok: true,
                    ..Report::default()
                }),
                hold: Some(Report {
                    workload: "hold",
                    pss_kib_per_conn: Some(figure(cells[5])),
                    ok: true,
                    ..Report::default()
                }),
                udp: None,
                name,
                stopped: "exit 0".into(),
                notes: Vec::new(),
                ok: true,
            }
        })
        .collect();
    assert_eq!(servers.len(), 8, "README's real run has eight servers");
    Comparison {
        machine: Machine {
            kernel: "6.18.44".into(),
            cpu: "Intel Xeon".into(),
            cpus: 2,
            pinned: None,
        },
        settings: Settings {
            // The real run predates the udp workload.
            workloads: vec![Workload::Rate, Workload::Stream, Workload::Hold],
            duration_s: 10.0,
            rounds: 2,
            concurrency: 32,
            size: 64,
            pace_per_s: None,
            stream_conns: 4,
            stream_size: 64 << 10,
            hold: 2000,
            udp_size: 64,
            timeout_s: 5.0,
        },
        servers,
        skipped: Vec::new(),
        notes: Vec::new(),
    }
}

/// docs/compare.svg, the README's chart, is README's real run drawn by this
/// chart code: a change to either must redraw it, with
/// `FORKD_REDRAW_DOCS=1 cargo test --test load docs_chart`.
#[test]
fn docs_chart_is_the_readme_run_drawn_by_this_code() {
    let docs = repo().join("docs/compare.svg");
    let dir = TempDir::new("load-docs-chart");
    let drawn = dir.join("compare.svg");
    forkd_load::chart::draw(&drawn, &readme_run()).unwrap();
    let drawn = std::fs::read_to_string(&drawn).unwrap();
    if std::env::var_os("FORKD_REDRAW_DOCS").is_some() {
        std::fs::write(&docs, &drawn).unwrap();
    }
    // It reads without the README: legend, units and scales, settings, machine.
    for needed in [
        "forkd, a process per connection",
        "forkd, a thread per connection",
        "C floor server, fork",
        "other servers, a thread per connection",
        "p99 latency, ms (log scale)",
        "9.48 ms",
        "KiB per connection (log scale)",
        "32 workers x 64 B for 10 s",
        "4 connections x 64 KiB writes",
        "hold 2000 idle connections",
        "2 rounds",
        "2 CPUs (Intel Xeon), Linux 6.18.44.",
    ] {
        assert!(drawn.contains(needed), "the chart lacks {needed:?}");
    }
    assert!(!drawn.contains("µs"), "latency is in ms");
    let committed = std::fs::read_to_string(&docs).unwrap();
    assert!(
        committed == drawn,
        "docs/compare.svg is not README's run as this code draws it: \
         FORKD_REDRAW_DOCS=1 cargo test --test load docs_chart"
    );
}
