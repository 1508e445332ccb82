//! `dataTiming` on local delivery (RFC 3342 §2.1, §2.2; OPT-09..OPT-13): the watch this relay
//! keeps on each delivery of data carrying a `dataTiming` option, from the instant the data was
//! received until the recipient's application answers. The watch runs on the shard that
//! accepted the data (relay-clock milliseconds compare across shards); the delivery carries
//! its [`TimingHandle`] inside its [`ReportRequest`], and whichever shard learns the outcome
//! tells the watch ([`Envelope::TimingSettled`]).
//!
//! - `noLaterThan` passes without an `ok`: timing error report when `reportErrors` (OPT-09,
//!   OPT-11); the watch ends, so a late `ok` reports nothing more.
//! - `reportAfter` passes without an `ok`: transient timing report, 350 (OPT-12, OPT-13);
//!   delivery goes on.
//! - `ok` in time with `returnTrip` non-zero: final hop report, 250, carrying a new
//!   `dataTiming` (OPT-10). A failed delivery is an `ok` that will never come: a timing error
//!   report at once when `reportErrors`.
//!
//! At most [`ReportWatchLimits::max_timing_watches`] per shard: past it a delivery goes
//! unwatched (counted in [`RelayStats::timing_watches_refused`]), rather than memory growing
//! without bound. Forwarded data needs no watch: its time is subtracted when it leaves for the
//! next relay (see [`options::restamp_forward`] and the shard core's links).

use std::collections::BTreeSet;

use super::*;
use crate::apex::options::DataTiming;

/// Default [`ReportWatchLimits::max_timing_watches`] (`mesh.max_timing_watches`), per shard.
pub const DEFAULT_MAX_TIMING_WATCHES: usize = 65_536;

/// One delivery's `dataTiming` watch.
#[derive(Debug)]
struct TimingWatch {
    /// The option's values as received.
    timing: DataTiming,
    originator: Endpoint,
    /// The recipient, as the data named it.
    recipient: CompactString,
    /// When the `ok` is due (`noLaterThan`), relay-clock ms.
    ok_due: Option<u64>,
    /// When the transient report falls due (`reportAfter`), until it is sent.
    report_due: Option<u64>,
}

/// Which timer of a watch a deadline entry is. Part of the entry's key, so that a
/// `reportAfter` equal to `noLaterThan` keeps both timers; at the same instant the transient
/// report goes first (the order of the variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    ReportAfter,
    Ok,
}

/// The running `dataTiming` watches of one shard, by number and by deadline.
#[derive(Debug, Default)]
pub(super) struct TimingWatches {
    by_id: FxHashMap<u64, TimingWatch>,
    /// (deadline in relay-clock ms, watch number, which timer).
    by_deadline: BTreeSet<(u64, u64, Due)>,
    next_id: u64,
}

impl TimingWatches {
    /// Running watches.
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The earliest deadline, if any timer runs.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.by_deadline.first().map(|(at, _, _)| *at)
    }

    fn remove(&mut self, id: u64) -> Option<TimingWatch> {
        let watch = self.by_id.remove(&id)?;
        if let Some(at) = watch.ok_due {
            self.by_deadline.remove(&(at, id, Due::Ok));
        }
        if let Some(at) = watch.report_due {
            self.by_deadline.remove(&(at, id, Due::ReportAfter));
        }
        Some(watch)
    }
}

impl Relay {
    /// Starts the watch of a delivery to `recipient` of data received at `received_at_ms`
    /// whose applicable `dataTiming` is `timing` (values as received). `None` when there is
    /// nothing to watch (no `noLaterThan`, `reportAfter` or `returnTrip`) or no room.
    pub(super) fn watch_timing(
        &mut self,
        timing: &DataTiming,
        received_at_ms: u64,
        originator: &Endpoint,
        recipient: &str,
    ) -> Option<TimingHandle> {
        if timing.no_later_than == 0 && timing.report_after == 0 && timing.return_trip == 0 {
            return None;
        }
        let watches = &mut self.timing_watches;
        if watches.len() >= self.config.report_watch.max_timing_watches {
            self.stats.timing_watches_refused += 1;
            tracing::warn!(
                limit = self.config.report_watch.max_timing_watches,
                "dataTiming delivery left unwatched: mesh.max_timing_watches reached"
            );
            return None;
        }
        let id = watches.next_id;
        watches.next_id += 1;
        let ok_due = timing.deadline(received_at_ms);
        let report_due = timing.report_after_deadline(received_at_ms);
        if let Some(at) = ok_due {
            watches.by_deadline.insert((at, id, Due::Ok));
        }
        if let Some(at) = report_due {
            watches.by_deadline.insert((at, id, Due::ReportAfter));
        }
        watches.by_id.insert(
            id,
            TimingWatch {
                timing: *timing,
                originator: originator.clone(),
                recipient: CompactString::from(recipient),
                ok_due,
                report_due,
            },
        );
        Some(TimingHandle {
            shard: self.config.shard,
            id,
        })
    }

    /// Running `dataTiming` watches on this shard.
    pub fn watched_timings(&self) -> usize {
        self.timing_watches.len()
    }

    /// A delivery with a `dataTiming` watch is settled (its recipient answered, or it failed):
    /// tells the watch, here or on the shard that runs it.
    pub(super) fn timing_outcome(&mut self, handle: TimingHandle, delivered: bool) {
        if handle.shard == self.config.shard {
            self.timing_settled(handle.id, delivered);
        } else {
            self.actions.push_back(Action::ToShard {
                shard: handle.shard,
                envelope: Envelope::TimingSettled {
                    id: handle.id,
                    delivered,
                },
            });
        }
    }

    /// The outcome of watch `id`'s delivery: a final hop report for an `ok` with `returnTrip`
    /// (OPT-10), a timing error report for a failure when `reportErrors` (OPT-11). A watch that
    /// already ended (its `noLaterThan` passed) reports nothing more.
    pub(super) fn timing_settled(&mut self, id: u64, delivered: bool) {
        let Some(watch) = self.timing_watches.remove(id) else {
            return;
        };
        let report = if delivered {
            watch.timing.on_ok()
        } else {
            watch.timing.on_deadline()
        };
        if let Some(report) = report {
            self.as_own(|relay| {
                relay.option_reports(&[report], &watch.originator, &[watch.recipient.as_str()])
            });
        }
    }

    /// Timers due at `now_ms`: `reportAfter` sends the transient report and the watch goes
    /// on; `noLaterThan` ends the watch with a timing error report when `reportErrors`.
    pub(super) fn expire_timings(&mut self, now_ms: u64) {
        while let Some(&(at, id, due)) = self.timing_watches.by_deadline.first() {
            if at > now_ms {
                break;
            }
            self.timing_watches.by_deadline.remove(&(at, id, due));
            let report = match due {
                Due::Ok => self.timing_watches.remove(id).and_then(|w| {
                    w.timing
                        .on_deadline()
                        .map(|r| (r, w.originator, w.recipient))
                }),
                Due::ReportAfter => {
                    let Some(watch) = self.timing_watches.by_id.get_mut(&id) else {
                        continue;
                    };
                    watch.report_due = None;
                    let report = watch.timing.on_report_after();
                    let owed = (report, watch.originator.clone(), watch.recipient.clone());
                    // Nothing left to wait for: no `ok` deadline and no final hop report.
                    if watch.ok_due.is_none() && watch.timing.return_trip == 0 {
                        self.timing_watches.remove(id);
                    }
                    Some(owed)
                }
            };
            if let Some((report, originator, recipient)) = report {
                self.as_own(|relay| {
                    relay.option_reports(&[report], &originator, &[recipient.as_str()])
                });
            }
        }
    }
}

impl Relay {
    /// A forward's `dataTiming` asked for `report` as the data left for the next relay, or
    /// instead of leaving (OPT-08, OPT-11, OPT-12, OPT-13): sent to its originator, on the
    /// recipients the forward carried.
    pub fn forward_timing_report(&mut self, forward: &ForwardReports, report: options::Report) {
        let recipients: Vec<&str> = forward
            .timing
            .iter()
            .flat_map(|t| t.recipients.iter().map(CompactString::as_str))
            .collect();
        self.as_own(|relay| relay.option_reports(&[report], &forward.originator, &recipients));
    }
}
