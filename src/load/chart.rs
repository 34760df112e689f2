//! `compare.svg`: four bar charts (connections per second, p99 latency,
//! stream throughput, memory per held connection), one bar per server, and
//! below them the whole memory of a held connection stacked by where it
//! goes (PSS, page tables, kernel stacks, kernel objects); drawn with
//! plotters' SVG backend.
//!
//! The chart reads on its own: its header says how the run was made (the
//! workloads and their settings, the machine), a legend says what the
//! colours mean, and each panel says its unit and scale. Latency and memory
//! use a logarithmic scale, where one slow or fat server (Python's forking
//! server is ten times the rest) does not squash every other bar; every bar
//! is labelled with its value.

use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, SegmentValue, SegmentedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordusize;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::comparison::{Comparison, Row};
use super::markdown::{self, short};
use super::report::Cost;

/// One panel: a metric, its axis, and how to read and label it.
struct Panel {
    title: &'static str,
    axis: &'static str,
    /// A logarithmic scale (for metrics where one server can be far off the rest).
    log: bool,
    value: fn(&Row) -> Option<f64>,
    label: fn(f64) -> String,
}

const PANELS: [Panel; 4] = [
    Panel {
        title: "rate: connections per second (higher is better)",
        axis: "connections per second",
        log: false,
        value: |r| r.rate.as_ref().and_then(|x| x.conn_per_s),
        label: short,
    },
    Panel {
        title: "rate: p99 latency of a connection (lower is better)",
        axis: "p99 latency, ms (log scale)",
        log: true,
        value: |r| {
            r.rate
                .as_ref()
                .and_then(|x| x.latency_us.map(|l| l.p99 as f64 / 1000.0))
        },
        label: |v| format!("{} ms", ms(v)),
    },
    Panel {
        title: "stream: echo throughput (higher is better)",
        axis: "MiB/s",
        log: false,
        value: |r| r.stream.as_ref().and_then(|x| x.mib_per_s),
        label: short,
    },
    Panel {
        title: "hold: memory (PSS) per idle connection (lower is better)",
        axis: "KiB per connection (log scale)",
        log: true,
        value: |r| r.hold.as_ref().and_then(|x| x.pss_kib_per_conn),
        label: |v| format!("{} KiB", short(v)),
    },
];

/// The bar colour: forkd blue, floor grey, peers orange; models that fork no
/// process per connection (threads, an event loop) lighter.
fn colour(family: &str, forks: bool) -> RGBColor {
    match (family, forks) {
        ("forkd", true) => RGBColor(31, 119, 180),
        ("forkd", false) => RGBColor(120, 172, 222),
        ("floor", true) => RGBColor(80, 80, 80),
        ("floor", false) => RGBColor(165, 165, 165),
        (_, true) => RGBColor(222, 110, 20),
        (_, false) => RGBColor(246, 182, 110),
    }
}

/// The legend's entries, in order: family, forks, what it means.
const LEGEND: [(&str, bool, &str); 6] = [
    ("forkd", true, "forkd, a process per connection"),
    (
        "forkd",
        false,
        "forkd, a thread per connection or one event loop",
    ),
    ("floor", true, "C floor server, fork"),
    ("floor", false, "C floor server, thread or epoll"),
    ("peer", true, "other servers, a process per connection"),
    ("peer", false, "other servers, a thread per connection"),
];

/// Draw the chart of comparison `c` into `path`.
pub fn draw(path: &Path, c: &Comparison) -> Result<(), String> {
    draw_inner(path, c).map_err(|e| e.to_string())
}

/// The kernel's version without its build suffix: `6.1.0-18-amd64` → `6.1.0`.
fn kernel_version(release: &str) -> &str {
    release
        .split(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .next()
        .filter(|v| !v.is_empty())
        .unwrap_or(release)
}

/// The header's lines: how the run was made, and on what.
fn header(c: &Comparison) -> [String; 2] {
    let m = &c.machine;
    let settings = markdown::workloads(&c.settings);
    let machine = format!(
        "Machine: {} CPUs ({}), Linux {}{}.",
        m.cpus,
        m.cpu,
        kernel_version(&m.kernel),
        match &m.pinned {
            Some(p) => format!("; {p}"),
            None => String::new(),
        }
    );
    [settings.trim().to_string(), machine]
}

fn draw_inner(path: &Path, c: &Comparison) -> Result<(), Box<dyn std::error::Error>> {
    let rows = &c.servers;
    let n = rows.len().max(1);
    let width = 1600u32.max(2 * 100 * n as u32);
    let costs = rows
        .iter()
        .any(|r| r.hold.as_ref().is_some_and(|h| h.cost.is_some()));
    let height = if costs { 1400 } else { 1000 };
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(118);
    let (body, bottom) = body.split_vertically(882);

    // Title, settings, machine, legend.
    let centre = |size| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top))
    };
    let mid = width as i32 / 2;
    head.draw_text("forkd: fork vs thread under load", &centre(22), (mid, 8))?;
    for (i, line) in header(c).iter().enumerate() {
        head.draw_text(line, &centre(13), (mid, 38 + 18 * i as i32))?;
    }
    let present = |family: &str, forks: bool| {
        rows.iter().any(|r| {
            let f = if matches!(r.family, "forkd" | "floor") {
                r.family
            } else {
                "peer"
            };
            f == family && r.forks == forks
        })
    };
    let entries: Vec<_> = LEGEND.iter().filter(|(f, k, _)| present(f, *k)).collect();
    let slot = (width as i32 - 40) / entries.len().max(1) as i32;
    let left = ("sans-serif", 13)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (family, forks, text)) in entries.iter().enumerate() {
        let x = 20 + slot * i as i32;
        head.draw(&Rectangle::new(
            [(x, 88), (x + 18, 104)],
            colour(family, *forks).filled(),
        ))?;
        head.draw_text(text, &left, (x + 24, 96))?;
    }

    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let on_bar = ("sans-serif", 12)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (panel, area) in PANELS.iter().zip(body.split_evenly((2, 2)).iter()) {
        let values: Vec<Option<f64>> = rows.iter().map(|r| (panel.value)(r)).collect();
        let positive = values.iter().flatten().copied().filter(|v| *v > 0.0);
        let top = positive.clone().fold(0.0f64, f64::max);
        let least = positive.fold(f64::INFINITY, f64::min);

        // One body for both scales; only the y axis differs.
        macro_rules! bars {
            ($y:expr, $floor:expr, $above:expr) => {{
                let mut chart = frame(area, panel.title, &names, $y, panel.axis)?;
                chart.draw_series(rows.iter().zip(&values).enumerate().filter_map(
                    |(i, (r, v))| {
                        v.filter(|v| *v > 0.0).map(|v| {
                            let mut bar = Rectangle::new(
                                [
                                    (SegmentValue::Exact(i), $floor),
                                    (SegmentValue::Exact(i + 1), v),
                                ],
                                colour(r.family, r.forks).filled(),
                            );
                            bar.set_margin(0, 0, 8, 8);
                            bar
                        })
                    },
                ))?;
                chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                    v.map(|v| {
                        Text::new(
                            (panel.label)(v),
                            (SegmentValue::CenterOf(i), $above(v)),
                            on_bar.clone(),
                        )
                    })
                }))?;
            }};
        }
        if panel.log && top > 0.0 {
            // Whole powers of ten around the values, with room above the
            // tallest bar for its label.
            let floor = 10f64.powf(least.log10().floor());
            let ceiling = 10f64.powf((top * 2.0).log10().ceil());
            bars!((floor..ceiling).log_scale(), floor, |v: f64| v * 1.06);
        } else {
            let top = if top > 0.0 { top * 1.18 } else { 1.0 };
            bars!(0f64..top, 0.0, |v: f64| v + top * 0.01);
        }
    }
    if costs {
        draw_costs(&bottom, rows, &names)?;
    }
    root.present()?;
    Ok(())
}

/// A panel's frame, the same for every panel: its caption, one segment per
/// server with its name under it, a y axis `y` described as `y_desc`.
fn frame<'a, 'b, Y>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    names: &[&str],
    y: Y,
    y_desc: &str,
) -> Result<Framed<'a, 'b, Y::CoordDescType>, Box<dyn std::error::Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let n = names.len().max(1);
    // Integer ranges are inclusive when made discrete: 0..n-1 gives n segments.
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n - 1).into_segmented(), y)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(n)
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).unwrap_or(&"").to_string(),
            _ => String::new(),
        })
        .y_labels(8)
        .y_desc(y_desc)
        .y_label_formatter(&|v| axis_label(*v))
        .draw()?;
    Ok(chart)
}

/// A chart drawn by [`frame`]: servers across, `Y` up.
type Framed<'a, 'b, Y> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<SegmentedCoord<RangedCoordusize>, Y>>;

/// One part of a held connection's whole cost: its name, colour and value.
type Part = (&'static str, RGBColor, fn(&Cost) -> f64);

/// The parts of a held connection's whole cost, bottom to top.
const PARTS: [Part; 4] = [
    ("PSS", RGBColor(31, 119, 180), |c| c.pss),
    ("page tables", RGBColor(44, 160, 44), |c| c.page_tables),
    ("kernel stacks", RGBColor(214, 39, 40), |c| c.kernel_stacks),
    ("kernel objects", RGBColor(148, 103, 189), |c| {
        c.kernel_objects
    }),
];

/// The whole cost panel: one stacked bar per server, on a linear scale set
/// by forkd and the floors (a peer far above them is cut, its total written).
fn draw_costs(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    rows: &[Row],
    names: &[&str],
) -> Result<(), Box<dyn std::error::Error>> {
    let costs: Vec<Option<Cost>> = rows
        .iter()
        .map(|r| r.hold.as_ref().and_then(|h| h.cost))
        .collect();
    let whole = |c: &Cost| PARTS.iter().map(|(_, _, f)| f(c).max(0.0)).sum::<f64>();
    let ours = rows
        .iter()
        .zip(&costs)
        .filter(|(r, _)| matches!(r.family, "forkd" | "floor"))
        .filter_map(|(_, c)| c.as_ref().map(whole));
    let top = ours.fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.18 } else { 1.0 };
    let mut chart = frame(
        area,
        "hold: the whole memory of an idle connection, the server's share (lower is better)",
        names,
        0f64..top,
        "KiB per connection",
    )?;
    for (i, c) in costs.iter().enumerate() {
        let Some(c) = c else { continue };
        let mut base = 0.0f64;
        for (_, colour, part) in PARTS {
            let v = part(c).max(0.0);
            let (lo, hi) = (base.min(top), (base + v).min(top));
            base += v;
            if hi <= lo {
                continue;
            }
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), lo),
                    (SegmentValue::Exact(i + 1), hi),
                ],
                colour.filled(),
            );
            bar.set_margin(0, 0, 8, 8);
            chart.draw_series(std::iter::once(bar))?;
        }
        let label = if base > top {
            format!("{} KiB (cut)", short(base))
        } else {
            format!("{} KiB", short(base))
        };
        let on_bar = ("sans-serif", 12)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(std::iter::once(Text::new(
            label,
            (SegmentValue::CenterOf(i), base.min(top) + top * 0.01),
            on_bar,
        )))?;
    }
    // The legend: each part as an empty series with its label.
    for &(name, colour, _) in PARTS.iter() {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(SegmentValue::Exact(0), 0.0), (SegmentValue::Exact(0), 0.0)],
                colour.filled(),
            )))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// An axis tick: 0.01, 0.5, 1, 10, 2500, 12.5k, 15k.
fn axis_label(v: f64) -> String {
    if v > 0.0 && v < 1.0 {
        ms(v)
    } else if v.fract() == 0.0 && v < 1e4 {
        format!("{v:.0}")
    } else if (v / 1e3).fract() == 0.0 && v < 1e6 {
        format!("{:.0}k", v / 1e3)
    } else {
        short(v)
    }
}

/// Milliseconds with three significant digits: 0.0421, 9.48, 52.1, 259.
fn ms(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.1 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_and_kernels_read_plainly() {
        assert_eq!(ms(9.479), "9.48");
        assert_eq!(ms(259.0), "259");
        assert_eq!(ms(52.1), "52.1");
        assert_eq!(kernel_version("6.18.44-fc-v669"), "6.18.44");
        assert_eq!(kernel_version("6.1.0-18-amd64"), "6.1.0");
        assert_eq!(kernel_version("weird"), "weird");
        assert_eq!(axis_label(1.0), "1");
        assert_eq!(axis_label(15_000.0), "15k");
        assert_eq!(axis_label(12_500.0), "12.5k");
        assert_eq!(axis_label(0.1), "0.100");
    }
}
