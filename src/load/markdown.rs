//! `compare.md`: the comparison as a Markdown table, one row per server,
//! with the machine and settings it was measured with.

use super::cli::Workload;
use super::comparison::{Comparison, Row, Settings};
use forkd::error::count;

/// The whole file.
pub fn render(c: &Comparison) -> String {
    let mut out = String::new();
    let m = &c.machine;
    out.push_str("# forkd: fork vs thread under load\n\n");
    out.push_str(&format!(
        "Machine: {} CPUs ({}), Linux {}{}.\n\n",
        m.cpus,
        m.cpu,
        m.kernel,
        match &m.pinned {
            Some(p) => format!(", {p}"),
            None => String::new(),
        }
    ));
    out.push_str(&workloads(&c.settings));
    out.push_str(&table(&c.servers));
    out.push('\n');
    if c.servers.iter().any(|r| r.udp.is_some()) {
        out.push_str(&udp_table(&c.servers));
        out.push('\n');
        out.push_str(
            "dgram/s, p50, p99: `udp` (one datagram in flight per worker, from its send to \
             its checked echo). lost: datagrams with no echo within the wait. CPU µs/dgram: \
             the server's CPU time per datagram echoed.\n\n",
        );
    }
    if c.servers
        .iter()
        .any(|r| r.hold.as_ref().is_some_and(|h| h.cost.is_some()))
    {
        out.push_str(&cost_table(&c.servers));
        out.push('\n');
        out.push_str(
            "The whole memory of a held connection, KiB, the server's share: PSS (as above), page \
             tables (`VmPTE` summed over the tree), kernel stacks (the tree's new threads times \
             one thread's stack), kernel objects (slab growth in /proc/meminfo less half the \
             socket caches' growth: on loopback both ends' sockets are in one kernel). Slab \
             grew by the last three columns, both ends. Machine-wide counters: other work on \
             the machine moves them too.\n\n",
        );
    }
    out.push_str(
        "conn/s, p50, p99: `rate` (a whole connection: connect, send, half-close, echo to \
         end-of-file). MiB/s: `stream`, every byte checked. KiB/conn: growth of the server \
         tree's PSS while holding, divided by the connections held. procs: processes in \
         the tree while holding. CPU s: CPU time of the server's tree (utime + stime, \
         children included) and of forkd-load itself during `rate`; CPU µs/conn is the \
         server's per connection.\n",
    );
    for s in &c.skipped {
        out.push_str(&format!("\nSkipped {}: {}.", s.name, s.reason));
    }
    for n in &c.notes {
        out.push_str(&format!("\nNote: {n}"));
    }
    for r in &c.servers {
        for n in &r.notes {
            out.push_str(&format!("\nNote ({}): {n}", r.name));
        }
    }
    if !c.skipped.is_empty() || !c.notes.is_empty() || c.servers.iter().any(|r| !r.notes.is_empty())
    {
        out.push('\n');
    }
    out
}

/// The UDP table: the servers that ran `udp`.
pub fn udp_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| server | dgram/s | p50 µs | p99 µs | lost | server CPU s | CPU µs/dgram | load CPU s | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let num = |v: Option<f64>| v.map(short).unwrap_or_else(|| "–".to_string());
    for r in rows {
        let Some(u) = &r.udp else {
            continue;
        };
        let lat = u.latency_us;
        let per = match (u.server_cpu_s, u.datagrams) {
            (Some(s), Some(n)) if n > 0 => Some(s * 1e6 / n as f64),
            _ => None,
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            num(u.dgram_per_s),
            num(lat.map(|l| l.p50 as f64)),
            num(lat.map(|l| l.p99 as f64)),
            u.lost.unwrap_or(0),
            num(u.server_cpu_s),
            num(per),
            num(Some(u.gen_cpu_s)),
            u.errors.total
        ));
    }
    out
}

/// The whole memory of a held connection, split by where it goes.
pub fn cost_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| server | whole KiB/conn | PSS | page tables | kernel stacks | kernel objects | slab: sockets | tasks | other |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let num = |v: Option<f64>| v.map(short).unwrap_or_else(|| "–".to_string());
    for r in rows {
        let Some(c) = r.hold.as_ref().and_then(|h| h.cost) else {
            continue;
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            num(Some(c.whole)),
            num(Some(c.pss)),
            num(Some(c.page_tables)),
            num(Some(c.kernel_stacks)),
            num(Some(c.kernel_objects)),
            num(c.slab_sockets),
            num(c.slab_tasks),
            num(c.slab_other),
        ));
    }
    out
}

/// The table alone (the TCP workloads; a UDP-only server has no row).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| server | conn/s | p50 µs | p99 µs | MiB/s | KiB/conn | procs | server CPU s | CPU µs/conn | load CPU s | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let num = |v: Option<f64>| v.map(short).unwrap_or_else(|| "–".to_string());
    for r in rows {
        if r.udp.is_some() && r.rate.is_none() && r.stream.is_none() && r.hold.is_none() {
            continue;
        }
        let rate = r.rate.as_ref();
        let lat = rate.and_then(|x| x.latency_us);
        let hold = r.hold.as_ref();
        let cpu_per_conn = rate.and_then(|x| match (x.server_cpu_s, x.conns) {
            (Some(s), n) if n > 0 => Some(s * 1e6 / n as f64),
            _ => None,
        });
        let errors: u64 = [&r.rate, &r.stream, &r.hold]
            .iter()
            .filter_map(|x| x.as_ref().map(|x| x.errors.total))
            .sum();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            num(rate.and_then(|x| x.conn_per_s)),
            num(lat.map(|l| l.p50 as f64)),
            num(lat.map(|l| l.p99 as f64)),
            num(r.stream.as_ref().and_then(|x| x.mib_per_s)),
            num(hold.and_then(|x| x.pss_kib_per_conn)),
            hold.and_then(|x| x.procs)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "–".into()),
            num(rate.and_then(|x| x.server_cpu_s)),
            num(cpu_per_conn),
            num(rate.map(|x| x.gen_cpu_s)),
            errors
        ));
    }
    out
}

/// The line that says what each server was put through (also the chart's).
pub fn workloads(s: &Settings) -> String {
    let each: Vec<String> = s
        .workloads
        .iter()
        .map(|w| match w {
            Workload::Rate => match s.pace_per_s {
                Some(p) => format!(
                    "rate {} x {}, paced at {p} conn/s in all (open loop), for {} s",
                    count(s.concurrency as u64, "worker", "workers"),
                    bytes(s.size),
                    s.duration_s
                ),
                None => format!(
                    "rate {} x {} for {} s",
                    count(s.concurrency as u64, "worker", "workers"),
                    bytes(s.size),
                    s.duration_s
                ),
            },
            Workload::Stream => format!(
                "stream {} x {} writes for {} s",
                count(s.stream_conns as u64, "connection", "connections"),
                bytes(s.stream_size),
                s.duration_s
            ),
            Workload::Hold => format!(
                "hold {}",
                count(s.hold as u64, "idle connection", "idle connections")
            ),
            Workload::Udp => format!(
                "udp {} x {} datagrams, one in flight each, for {} s",
                count(s.concurrency as u64, "worker", "workers"),
                bytes(s.udp_size),
                s.duration_s
            ),
        })
        .collect();
    format!(
        "Workloads, each server in turn, {} in alternating order: {}.\n\n",
        count(s.rounds.into(), "round", "rounds"),
        each.join("; ")
    )
}

/// A size as the options take it: `64 B`, `64 KiB`, `1 MiB`.
fn bytes(n: usize) -> String {
    match n {
        0 => "0 B".to_string(),
        n if n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// 12345 → "12.3k", 3.14159 → "3.14".
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
