//! `compare.svg`: four bar charts (connections per second, p99 latency,
//! stream throughput, memory per held connection), one bar per server,
//! drawn with plotters' SVG backend.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::compare::Row;

/// One panel: a metric, its unit, and how to read it from a row.
struct Panel {
    title: &'static str,
    unit: &'static str,
    value: fn(&Row) -> Option<f64>,
}

const PANELS: [Panel; 4] = [
    Panel {
        title: "rate: connections per second (higher is better)",
        unit: "conn/s",
        value: |r| r.rate.as_ref().and_then(|x| x.conn_per_s),
    },
    Panel {
        title: "rate: p99 latency of a connection (lower is better)",
        unit: "µs",
        value: |r| {
            r.rate
                .as_ref()
                .and_then(|x| x.latency_us.map(|l| l.p99 as f64))
        },
    },
    Panel {
        title: "stream: echo throughput (higher is better)",
        unit: "MiB/s",
        value: |r| r.stream.as_ref().and_then(|x| x.mib_per_s),
    },
    Panel {
        title: "hold: PSS per idle connection (lower is better)",
        unit: "KiB",
        value: |r| r.hold.as_ref().and_then(|x| x.pss_kib_per_conn),
    },
];

/// The bar colour: forkd blue, floor grey, peers orange; thread models lighter.
fn colour(r: &Row) -> RGBColor {
    match (r.family, r.forks) {
        ("forkd", true) => RGBColor(31, 119, 180),
        ("forkd", false) => RGBColor(120, 172, 222),
        ("floor", true) => RGBColor(80, 80, 80),
        ("floor", false) => RGBColor(165, 165, 165),
        (_, true) => RGBColor(222, 110, 20),
        (_, false) => RGBColor(246, 182, 110),
    }
}

/// Draw the chart for `rows` into `path`.
pub fn draw(path: &Path, rows: &[Row], subtitle: &str) -> Result<(), String> {
    draw_inner(path, rows, subtitle).map_err(|e| e.to_string())
}

fn draw_inner(path: &Path, rows: &[Row], subtitle: &str) -> Result<(), Box<dyn std::error::Error>> {
    let n = rows.len().max(1);
    let width = 1400u32.max(2 * 100 * n as u32);
    let root = SVGBackend::new(path, (width, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("forkd: fork vs thread under load ({subtitle})"),
        ("sans-serif", 20),
    )?;
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    // Integer ranges are inclusive when made discrete: 0..n-1 gives n segments.
    let segments = 0..n - 1;
    let label = ("sans-serif", 12)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (panel, area) in PANELS.iter().zip(root.split_evenly((2, 2)).iter()) {
        let values: Vec<Option<f64>> = rows.iter().map(|r| (panel.value)(r)).collect();
        let top = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
        let top = if top > 0.0 { top * 1.18 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(segments.clone().into_segmented(), 0f64..top)?;
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
            .y_desc(panel.unit)
            .y_label_formatter(&|v| short(*v))
            .draw()?;
        chart.draw_series(
            rows.iter()
                .zip(&values)
                .enumerate()
                .filter_map(|(i, (r, v))| {
                    v.map(|v| {
                        let mut bar = Rectangle::new(
                            [
                                (SegmentValue::Exact(i), 0.0),
                                (SegmentValue::Exact(i + 1), v),
                            ],
                            colour(r).filled(),
                        );
                        bar.set_margin(0, 0, 8, 8);
                        bar
                    })
                }),
        )?;
        chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
            v.map(|v| {
                Text::new(
                    short(v),
                    (SegmentValue::CenterOf(i), v + top * 0.01),
                    label.clone(),
                )
            })
        }))?;
    }
    root.present()?;
    Ok(())
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
