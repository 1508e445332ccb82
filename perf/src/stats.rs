//! Latency histograms and the run report (text for people, JSON for scripts).

use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// How often a receiver hands its latest latencies to the progress line.
const PROGRESS_MERGE: Duration = Duration::from_millis(100);

/// The live progress line: deliveries and latencies that receivers hand over as they go, and
/// the loop that prints one line per second (rate, p50, p99 of that second).
#[derive(Debug)]
pub(crate) struct Progress {
    delivered: AtomicU64,
    interval: Mutex<Histogram<u64>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            interval: Mutex::new(latency_histogram()),
        }
    }
}

/// A receiver's side of the progress line: what it saw since it last handed over.
#[derive(Debug)]
pub(crate) struct ProgressTally {
    delivered: u64,
    latency: Histogram<u64>,
    last_merge: Instant,
}

impl Default for ProgressTally {
    fn default() -> Self {
        Self {
            delivered: 0,
            latency: latency_histogram(),
            last_merge: Instant::now(),
        }
    }
}

impl ProgressTally {
    /// Counts one delivery and its latency.
    pub(crate) fn record(&mut self, latency_ns: u64) {
        self.delivered += 1;
        record_ns(&mut self.latency, latency_ns);
    }

    /// Hands the tally to `progress` when the last hand-over is old enough.
    pub(crate) fn merge_into(&mut self, progress: &Progress, now: Instant) {
        if now.saturating_duration_since(self.last_merge) < PROGRESS_MERGE {
            return;
        }
        self.last_merge = now;
        progress
            .delivered
            .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
        if let Ok(mut h) = progress.interval.lock() {
            let _ = h.add(&self.latency);
        }
        self.latency.reset();
    }
}

impl Progress {
    /// Prints a line per second on stderr, labelled by the phase of `schedule`, until `done`.
    pub(crate) fn print_until(&self, schedule: &crate::driver::Schedule, done: impl Fn() -> bool) {
        let mut tick = schedule.start;
        let mut last = 0u64;
        let mut second = 0u32;
        while !done() {
            if Instant::now() < tick + Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            tick += Duration::from_secs(1);
            second += 1;
            let delivered = self.delivered.load(Ordering::Relaxed);
            let (p50, p99) = match self.interval.lock() {
                Ok(mut h) => {
                    let v = (h.value_at_quantile(0.5), h.value_at_quantile(0.99));
                    h.reset();
                    v
                }
                Err(_) => (0, 0),
            };
            let phase = if tick <= schedule.warm_end {
                "warm-up"
            } else if tick <= schedule.measure_end {
                "measure"
            } else {
                "drain"
            };
            eprintln!(
                "[{second:>3} s {phase}] {:>10} msg/s  p50 {p50} us  p99 {p99} us",
                delivered - last
            );
            last = delivered;
        }
    }
}

/// Highest latency the histograms track, in microseconds (60 s); longer ones are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds with 3 significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    // Bounds 1..=60 s at 3 digits are valid by construction; the fallback is never taken.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("3 significant digits are always accepted"))
}

/// Records one latency given in nanoseconds.
pub(crate) fn record_ns(histogram: &mut Histogram<u64>, latency_ns: u64) {
    histogram.saturating_record(latency_ns / 1_000);
}

/// Highest percentile plotted: 99.999.
const CURVE_MAX_NINES: f64 = 5.0;

/// Points of the percentile curve, evenly spaced in `-log10(1 - p)` from the 50th to the
/// 99.999th percentile.
pub(crate) fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, u64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let first = 2f64.log10();
    let steps = 100;
    (0..=steps)
        .map(|i| {
            let nines = first + (CURVE_MAX_NINES - first) * f64::from(i) / f64::from(steps);
            let q = 1.0 - 10f64.powf(-nines);
            (q * 100.0, histogram.value_at_quantile(q))
        })
        .collect()
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct LatencySummary {
    /// Number of recorded latencies.
    pub(crate) samples: u64,
    /// Smallest.
    pub(crate) min: u64,
    /// Arithmetic mean.
    pub(crate) mean: f64,
    /// Median.
    pub(crate) p50: u64,
    /// 90th percentile.
    pub(crate) p90: u64,
    /// 99th percentile.
    pub(crate) p99: u64,
    /// 99.9th percentile.
    pub(crate) p999: u64,
    /// Largest.
    pub(crate) max: u64,
}

impl LatencySummary {
    /// Summarises `histogram` (all zero when it is empty).
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self {
                samples: 0,
                min: 0,
                mean: 0.0,
                p50: 0,
                p90: 0,
                p99: 0,
                p999: 0,
                max: 0,
            };
        }
        Self {
            samples: histogram.len(),
            min: histogram.min(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// What one run measured. Rates count the measured window only (after the warm-up).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// The system under load (`apex`).
    pub(crate) target: String,
    /// Where it was reached.
    pub(crate) address: String,
    /// How senders map to receivers (`pairs`, `fan-in`, `fan-out`).
    pub(crate) pattern: String,
    /// Offered rate, messages per second in total (open loop); `None` in throughput mode.
    pub(crate) rate: Option<f64>,
    /// Sender/receiver pairs.
    pub(crate) pairs: usize,
    /// Payload octets per message.
    pub(crate) size: usize,
    /// Most unacknowledged messages per sender.
    pub(crate) depth: usize,
    /// Load-generator threads.
    pub(crate) threads: usize,
    /// Warm-up, seconds (not measured).
    pub(crate) warmup_s: f64,
    /// Measured window, seconds.
    pub(crate) duration_s: f64,
    /// The TLS version and cipher suite the connections negotiated (`None`: plaintext).
    pub(crate) tls: Option<String>,
    /// Messages sent over the whole run.
    pub(crate) sent: u64,
    /// Messages the target acknowledged over the whole run.
    pub(crate) acknowledged: u64,
    /// Messages delivered to receivers over the whole run.
    pub(crate) delivered: u64,
    /// Messages delivered within the measured window.
    pub(crate) delivered_in_window: u64,
    /// Delivered messages per second in the measured window.
    pub(crate) msgs_per_sec: f64,
    /// Acknowledgements from the target per second in the measured window. Well above
    /// `msgs_per_sec`, it means the target accepts faster than it delivers: a growing backlog.
    pub(crate) acks_per_sec: f64,
    /// Delivered payload, 10^6 octets per second, in the measured window.
    pub(crate) payload_mb_per_sec: f64,
    /// Octets the load generator wrote and read on its sockets, 10^6 per second, in the
    /// measured window (0 when not counted).
    pub(crate) wire_mb_per_sec: f64,
    /// Those wire octets per delivered message.
    pub(crate) wire_bytes_per_msg: f64,
    /// Seconds from the end of the measured window until the last acknowledged message was
    /// delivered (the backlog left in the target; at most the 10 s grace).
    pub(crate) drain_s: f64,
    /// One-way latency, sender to receiver, in microseconds (measured window only).
    pub(crate) latency_us: LatencySummary,
    /// apex: every data carried the `hold4Endpoint` option.
    pub(crate) hold: bool,
    /// apex: the receivers never attached (data to endpoints that are not attached).
    pub(crate) absent_receivers: bool,
    /// apex: time from writing a data to reading the relay's `ok` for it, at the sender, in
    /// microseconds (replies in the measured window; open loop: from the data's due time).
    pub(crate) ok_latency_us: LatencySummary,
    /// apex: data the relay answered with something other than `ok` (ERR), over the run (also
    /// counted in `errors`).
    pub(crate) refused: u64,
    /// apex: the access `set`s made beside the pairs (`--sets-per-sec`), or alone
    /// (`apex-load access`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sets: Option<crate::access::SetReport>,
    /// Failed operations, refused messages and unexpected input.
    pub(crate) errors: u64,
    /// Messages that never arrived (sequence gaps, and acknowledged messages missing at the end).
    pub(crate) lost: u64,
    /// Messages that arrived behind a later one (or twice).
    pub(crate) reordered: u64,
    /// The first few error messages.
    pub(crate) error_samples: Vec<String>,
    /// Remarks that do not fail the run.
    pub(crate) notes: Vec<String>,
    /// Latency percentile curve: (percentile, microseconds), for plots.
    #[serde(skip)]
    pub(crate) curve: Vec<(f64, u64)>,
}

impl Report {
    /// A report with every figure at zero.
    pub(crate) fn empty(target: &str, address: &str) -> Self {
        Self {
            target: target.to_owned(),
            address: address.to_owned(),
            pattern: "pairs".to_owned(),
            rate: None,
            pairs: 0,
            size: 0,
            depth: 0,
            threads: 0,
            warmup_s: 0.0,
            duration_s: 0.0,
            tls: None,
            sent: 0,
            acknowledged: 0,
            delivered: 0,
            delivered_in_window: 0,
            msgs_per_sec: 0.0,
            acks_per_sec: 0.0,
            payload_mb_per_sec: 0.0,
            wire_mb_per_sec: 0.0,
            wire_bytes_per_msg: 0.0,
            drain_s: 0.0,
            latency_us: LatencySummary::of(&latency_histogram()),
            hold: false,
            absent_receivers: false,
            ok_latency_us: LatencySummary::of(&latency_histogram()),
            refused: 0,
            sets: None,
            errors: 0,
            lost: 0,
            reordered: 0,
            error_samples: Vec::new(),
            notes: Vec::new(),
            curve: Vec::new(),
        }
    }

    /// Sets the wire figures from `octets` moved in `secs` (call after `msgs_per_sec`).
    pub(crate) fn set_wire(&mut self, octets: u64, secs: f64) {
        if secs > 0.0 {
            self.wire_mb_per_sec = octets as f64 / secs / 1e6;
        }
        if self.delivered_in_window > 0 {
            self.wire_bytes_per_msg = octets as f64 / self.delivered_in_window as f64;
        }
    }

    /// Sets the latency summary and percentile curve from `histogram`.
    pub(crate) fn set_latency(&mut self, histogram: &Histogram<u64>) {
        self.latency_us = LatencySummary::of(histogram);
        self.curve = percentile_curve(histogram);
    }

    /// True when nothing was lost, reordered or failed.
    pub(crate) fn passed(&self) -> bool {
        self.errors == 0 && self.lost == 0 && self.reordered == 0
    }

    /// Writes the report as pretty-printed JSON.
    pub(crate) fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).context("encoding the JSON report")?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_us;
        let mut out = String::new();
        if let (Some(sets), "access") = (&self.sets, self.target.as_str()) {
            let _ = writeln!(
                out,
                "access @ {}{}: {} setter connection(s), depth {}, {:.1} s measured after {:.1} s warm-up",
                self.address,
                self.tls
                    .as_ref()
                    .map_or_else(String::new, |t| format!(" over {t}")),
                sets.connections,
                sets.depth,
                self.duration_s,
                self.warmup_s
            );
            write_sets(&mut out, sets);
            let _ = write!(
                out,
                "  errors {}  => {}",
                self.errors,
                if self.passed() { "PASS" } else { "FAIL" }
            );
            write_samples(&mut out, self);
            return f.write_str(&out);
        }
        let _ = writeln!(
            out,
            "{} @ {}{}: {} x{}{}, {} B payload, depth {}, {} thread(s), {:.1} s measured after {:.1} s warm-up",
            self.target,
            self.address,
            self.tls
                .as_ref()
                .map_or_else(String::new, |t| format!(" over {t}")),
            self.pattern,
            self.pairs,
            self.rate.map_or_else(|| " (throughput)".to_owned(), |r| format!(" at {r:.0} msg/s")),
            self.size,
            self.depth,
            self.threads,
            self.duration_s,
            self.warmup_s
        );
        if self.hold || self.absent_receivers {
            let _ = writeln!(
                out,
                "  options     {}{}",
                if self.hold {
                    "hold4Endpoint on every data; "
                } else {
                    ""
                },
                if self.absent_receivers {
                    "receivers absent (never attached)"
                } else {
                    "receivers attached"
                }
            );
        }
        let _ = writeln!(
            out,
            "  throughput  {:.0} msg/s  {:.2} MB/s payload  ({} delivered in the window; acknowledged {:.0}/s; drained {:.3} s after the window)",
            self.msgs_per_sec,
            self.payload_mb_per_sec,
            self.delivered_in_window,
            self.acks_per_sec,
            self.drain_s
        );
        let _ = writeln!(
            out,
            "  wire        {:.2} MB/s  {:.1} B/msg  (octets the load generator wrote and read)",
            self.wire_mb_per_sec, self.wire_bytes_per_msg
        );
        let _ = writeln!(
            out,
            "  latency us  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (min {}, mean {:.1}, {} samples)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.min, l.mean, l.samples
        );
        let o = &self.ok_latency_us;
        let _ = writeln!(
            out,
            "  ok latency  p50 {}  p90 {}  p99 {}  p99.9 {}  max {} us  ({} samples; data to the relay's ok, at the sender; ERR replies {})",
            o.p50, o.p90, o.p99, o.p999, o.max, o.samples, self.refused
        );
        if let Some(sets) = &self.sets {
            write_sets(&mut out, sets);
        }
        let _ = writeln!(
            out,
            "  totals      sent {}  acknowledged {}  delivered {}",
            self.sent, self.acknowledged, self.delivered
        );
        let _ = write!(
            out,
            "  errors {}  lost {}  reordered {}  => {}",
            self.errors,
            self.lost,
            self.reordered,
            if self.passed() { "PASS" } else { "FAIL" }
        );
        write_samples(&mut out, self);
        f.write_str(&out)
    }
}

/// The lines of the access sets.
fn write_sets(out: &mut String, sets: &crate::access::SetReport) {
    let l = &sets.latency_us;
    let codes: Vec<String> = sets
        .codes
        .iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  sets        {:.1}/s answered 250 in the window ({}){}",
        sets.sets_per_sec,
        sets.ok_in_window,
        sets.rate
            .map_or_else(String::new, |r| format!(", {r} asked for"))
    );
    let _ = writeln!(
        out,
        "  set latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {} us  ({} samples; set to its reply)",
        l.p50, l.p90, l.p99, l.p999, l.max, l.samples
    );
    let _ = writeln!(
        out,
        "  set totals  sent {}  answered 250 {}  other codes {}  refused by the relay {}  unanswered {}  (replies {{{}}}; creates of entries already stored {}; gets {}, stray answers {})",
        sets.sent,
        sets.ok,
        sets.failed,
        sets.refused,
        sets.unanswered,
        codes.join(", "),
        sets.existed,
        sets.gets,
        sets.stray
    );
}

/// The error and note lines.
fn write_samples(out: &mut String, r: &Report) {
    for e in &r.error_samples {
        let _ = write!(out, "\n  error: {e}");
    }
    for n in &r.notes {
        let _ = write!(out, "\n  note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(errors: u64, lost: u64, reordered: u64) -> Report {
        Report {
            target: "apex".into(),
            address: "127.0.0.1:1".into(),
            pattern: "pairs".into(),
            rate: None,
            tls: None,
            wire_mb_per_sec: 0.0,
            wire_bytes_per_msg: 0.0,
            curve: Vec::new(),
            pairs: 1,
            size: 128,
            depth: 64,
            threads: 2,
            warmup_s: 1.0,
            duration_s: 5.0,
            sent: 10,
            acknowledged: 10,
            delivered: 10,
            delivered_in_window: 8,
            msgs_per_sec: 1.6,
            acks_per_sec: 1.6,
            payload_mb_per_sec: 0.0,
            drain_s: 0.0,
            latency_us: LatencySummary::of(&latency_histogram()),
            hold: false,
            absent_receivers: false,
            ok_latency_us: LatencySummary::of(&latency_histogram()),
            refused: 0,
            sets: None,
            errors,
            lost,
            reordered,
            error_samples: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = latency_histogram();
        for us in 1..=10_000u64 {
            record_ns(&mut h, us * 1_000 + 999);
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.samples, 10_000);
        assert_eq!(s.min, 1);
        // 3 significant digits: each value is within 0.1 % of the exact one.
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(s.p50, 5_000), "{s:?}");
        assert!(near(s.p90, 9_000), "{s:?}");
        assert!(near(s.p99, 9_900), "{s:?}");
        assert!(near(s.p999, 9_990), "{s:?}");
        assert!(near(s.max, 10_000), "{s:?}");
        assert!((s.mean - 5_000.5).abs() < 10.0, "{s:?}");
    }

    #[test]
    fn outliers_show_only_in_the_tail() {
        let mut h = latency_histogram();
        for _ in 0..999 {
            record_ns(&mut h, 20_000);
        }
        record_ns(&mut h, 5_000_000);
        // Beyond the tracked range: clamped, not dropped.
        record_ns(&mut h, 3_600 * 1_000_000_000);
        let s = LatencySummary::of(&h);
        assert_eq!((s.p50, s.p99), (20, 20));
        assert!(s.p999 >= 4_990, "{s:?}");
        assert!(s.max >= MAX_LATENCY_US * 999 / 1000, "{s:?}");
        assert_eq!(s.samples, 1_001);
    }

    #[test]
    fn empty_histogram_summarises_to_zero() {
        let s = LatencySummary::of(&latency_histogram());
        assert_eq!((s.samples, s.p50, s.max), (0, 0, 0));
    }

    #[test]
    fn pass_fail_and_json() {
        assert!(report(0, 0, 0).passed());
        assert!(!report(1, 0, 0).passed());
        assert!(!report(0, 1, 0).passed());
        assert!(!report(0, 0, 1).passed());
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&report(0, 2, 0)).unwrap()).unwrap();
        assert_eq!(json["lost"], 2);
        assert_eq!(json["latency_us"]["p999"], 0);
        assert!(report(0, 0, 0).to_string().contains("PASS"));
    }
}
