//! A latency percentile plot as hand-written SVG: x is the percentile on a log scale of
//! `1 / (1 - p)` from 50 to 99.999, y the latency in microseconds (linear from 0).

use std::fmt::Write as _;

use crate::stats::Report;

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// Percentiles with a labelled grid line.
const TICKS: [(f64, &str); 6] = [
    (50.0, "50"),
    (90.0, "90"),
    (99.0, "99"),
    (99.9, "99.9"),
    (99.99, "99.99"),
    (99.999, "99.999"),
];

/// x position of `percentile`: log10(1 / (1 - p)), 0.301 (p50) to 5 (p99.999).
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-5);
    -rest.log10()
}

/// A round axis maximum at or above `max`.
fn nice_max(max: u64) -> u64 {
    let max = max.max(1);
    let mut step = 1u64;
    while step.saturating_mul(10) <= max {
        step *= 10;
    }
    for m in [1, 2, 5, 10] {
        if step.saturating_mul(m) >= max {
            return step.saturating_mul(m);
        }
    }
    step.saturating_mul(10)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the report's percentile curve.
pub(crate) fn render(report: &Report) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x0 = nines(50.0);
    let x1 = nines(99.999);
    let y_max = nice_max(report.curve.iter().map(|p| p.1).max().unwrap_or(1));
    let px = |p: f64| LEFT + (nines(p) - x0) / (x1 - x0) * plot_w;
    let py = |us: u64| TOP + plot_h - (us as f64 / y_max as f64) * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "{} {} x{}, {} B, {}: {:.0} msg/s, p50 {} / p99 {} / p99.9 {} us",
        report.target,
        report.pattern,
        report.pairs,
        report.size,
        report.rate.map_or_else(
            || "throughput".to_owned(),
            |r| format!("{r:.0} msg/s offered")
        ),
        report.msgs_per_sec,
        report.latency_us.p50,
        report.latency_us.p99,
        report.latency_us.p999
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(&title)
    );
    for (p, label) in TICKS {
        let x = px(p);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    for i in 0..=5u64 {
        let us = y_max * i / 5;
        let y = py(us);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{us}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency (us)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    let points: Vec<String> = report
        .curve
        .iter()
        .map(|&(p, us)| format!("{:.1},{:.1}", px(p), py(us)))
        .collect();
    if !points.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats;

    #[test]
    fn axis_helpers() {
        assert!((nines(50.0) - std::f64::consts::LOG10_2).abs() < 1e-9);
        assert!((nines(99.999) - 5.0).abs() < 1e-6);
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(7), 10);
        assert_eq!(nice_max(130), 200);
        assert_eq!(nice_max(500), 500);
    }

    #[test]
    fn renders_a_curve() {
        let mut h = stats::latency_histogram();
        for us in 1..=1000u64 {
            stats::record_ns(&mut h, us * 1000);
        }
        let mut r = Report::empty("nats", "127.0.0.1:1");
        r.set_latency(&h);
        let svg = render(&r);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("99.999"));
        // Empty curve: still a valid document without a line.
        let svg = render(&Report::empty("raw", "x"));
        assert!(!svg.contains("<polyline"));
    }
}
