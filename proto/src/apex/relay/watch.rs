//! Watches on forwarded statusRequests (RFC 3340 §5.1; issue 19 item 7). A relay that hands
//! data to the next relay has its `ok`, which means only "accepted" (RFC 3340 §4.4.4.1): should
//! that relay fail before it reports (a crash with a backlog), the originator would hear
//! nothing. So the shard owning the link watches each statusRequest that travels on, for data
//! of a local originator (its reports come back through this relay), from when the data goes
//! onto the link until a relay further on reports on it, or the forward fails here (reported
//! here), or the watch's bound passes: then this relay reports 450, outcome unknown.
//!
//! A watch is settled by a failure report from any relay on the path, or by any report from
//! the report service of the recipient's own domain (the relay that delivers); a success
//! report from an intermediate relay (`targetHop='all'`, a trace) or a transient one (350)
//! leaves it running. At most [`ReportWatchLimits::max_watches`] per shard: past it, a
//! forward is not watched (and counted), rather than memory growing without bound.

use std::collections::BTreeMap;

use super::*;

/// Default [`ReportWatchLimits::timeout_ms`] (`mesh.report_timeout_ms`): 60 s.
pub const DEFAULT_REPORT_TIMEOUT_MS: u64 = 60_000;

/// Default [`ReportWatchLimits::max_watches`] (`mesh.max_report_watches`), per shard.
pub const DEFAULT_MAX_REPORT_WATCHES: usize = 65_536;

/// Why a watched forward is reported when no later relay reported in time.
pub(super) const NO_REPORT_IN_TIME: &str =
    "no report from the relays further on in time: delivery unknown";

/// Bounds of the watches on forwarded statusRequests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportWatchLimits {
    /// How long a later relay's report may take, from when the data goes onto the link, when
    /// the data's `dataTiming` gives no `returnTrip` (ms). 0: forwards are not watched.
    pub timeout_ms: u64,
    /// Most watches per shard.
    pub max_watches: usize,
    /// Most `dataTiming` watches on local deliveries per shard (`mesh.max_timing_watches`;
    /// see `timing`).
    pub max_timing_watches: usize,
}

impl Default for ReportWatchLimits {
    fn default() -> Self {
        Self {
            timeout_ms: DEFAULT_REPORT_TIMEOUT_MS,
            max_watches: DEFAULT_MAX_REPORT_WATCHES,
            max_timing_watches: super::timing::DEFAULT_MAX_TIMING_WATCHES,
        }
    }
}

impl ReportWatchLimits {
    /// How long to watch a forward of data whose `dataTiming` (if any) says `no_later_than`
    /// and `return_trip` (ms, 0 when absent), and which asks to be held (`hold4Endpoint`) or
    /// not: the delivery bound plus the report's. `None`: not watched, because watching is
    /// off, or the data may wait at the next relay for as long as that relay lets it (held
    /// without a `noLaterThan` bound).
    pub fn bound(&self, no_later_than: u32, return_trip: u32, held: bool) -> Option<u64> {
        if self.timeout_ms == 0 || (held && no_later_than == 0) {
            return None;
        }
        let report = match return_trip {
            0 => self.timeout_ms,
            ms => u64::from(ms),
        };
        Some(u64::from(no_later_than).saturating_add(report))
    }
}

/// What a watch is on: one statusRequest of one originator for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct WatchKey {
    pub(super) originator: Endpoint,
    pub(super) trans_id: u32,
    pub(super) recipient: Endpoint,
}

/// The running watches of one shard, by key and by deadline. An originator may reuse a
/// transID while an earlier data with it is still watched: a key then has several watches,
/// settled oldest first.
#[derive(Debug, Default)]
pub(super) struct Watches {
    by_key: HashMap<WatchKey, VecDeque<(u64, u64)>, foldhash::fast::RandomState>,
    /// (deadline in relay-clock ms, sequence number) -> key.
    by_deadline: BTreeMap<(u64, u64), WatchKey>,
    next_seq: u64,
}

impl Watches {
    /// Running watches.
    pub(super) fn len(&self) -> usize {
        self.by_deadline.len()
    }

    /// Starts a watch on `key` until relay-clock millisecond `deadline`.
    pub(super) fn insert(&mut self, key: WatchKey, deadline: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_key
            .entry(key.clone())
            .or_default()
            .push_back((deadline, seq));
        self.by_deadline.insert((deadline, seq), key);
    }

    /// Ends the oldest watch on `key`; whether there was one.
    pub(super) fn settle(&mut self, key: &WatchKey) -> bool {
        let Some(queue) = self.by_key.get_mut(key) else {
            return false;
        };
        let oldest = queue.pop_front();
        if queue.is_empty() {
            self.by_key.remove(key);
        }
        match oldest {
            Some(at) => self.by_deadline.remove(&at).is_some(),
            None => false,
        }
    }

    /// The earliest deadline, if any watch runs.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.by_deadline.keys().next().map(|(at, _)| *at)
    }

    /// Ends every watch whose deadline is `now_ms` or earlier, and returns them.
    pub(super) fn expire(&mut self, now_ms: u64) -> Vec<WatchKey> {
        let mut expired = Vec::new();
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let (at, key) = entry.remove_entry();
            if let Some(queue) = self.by_key.get_mut(&key) {
                queue.retain(|w| *w != at);
                if queue.is_empty() {
                    self.by_key.remove(&key);
                }
            }
            expired.push(key);
        }
        expired
    }
}

impl Relay {
    /// Forwarded data goes onto this shard's link now: its statusRequests that travel on are
    /// watched ([`ForwardReports::watch_ms`]) until a relay further on reports on them.
    pub fn forward_sending(&mut self, reports: &ForwardReports) {
        let Some(watch_ms) = reports.watch_ms else {
            return;
        };
        let deadline = self.now_ms.saturating_add(watch_ms);
        for asked in &reports.onward {
            if self.watches.len() >= self.config.report_watch.max_watches {
                self.stats.report_watches_refused += 1;
                continue;
            }
            let Ok(recipient) = self.parse_endpoint(&asked.recipient) else {
                continue;
            };
            let key = WatchKey {
                originator: reports.originator.clone(),
                trans_id: asked.trans_id,
                recipient,
            };
            self.watches.insert(key, deadline);
        }
    }

    /// Ends the watches of a forward whose outcome this relay reports itself.
    pub(super) fn unwatch(&mut self, reports: &ForwardReports) {
        if reports.watch_ms.is_none() {
            return;
        }
        for asked in &reports.onward {
            if let Ok(recipient) = self.parse_endpoint(&asked.recipient) {
                self.watches.settle(&WatchKey {
                    originator: reports.originator.clone(),
                    trans_id: asked.trans_id,
                    recipient,
                });
            }
        }
    }

    /// Whether forwards are not watched (`mesh.report_timeout_ms` = 0).
    pub(super) fn watches_off(&self) -> bool {
        self.config.report_watch.timeout_ms == 0
    }

    /// Data from `originator` for the local `recipient` is about to be delivered: when it is a
    /// report from another relay's report service (APEX-45), each recipient it reports on is
    /// told to the shard that watches its forward ([`Envelope::ReportSeen`]).
    pub(super) fn note_passing_report(
        &mut self,
        originator: &Endpoint,
        recipient: &Endpoint,
        payload: &Bytes,
    ) {
        if self.watches_off()
            || originator.address() != options::REPORT_SERVICE
            || self.serves(originator.domain())
        {
            return;
        }
        let Ok(Operation::Data(data)) = msg::parse_message(payload, &self.config.limits) else {
            return;
        };
        let Some(response) = crate::apex::client::status_response(&data) else {
            return;
        };
        for destination in response.destinations {
            let Ok(reported) = self.parse_endpoint(&destination.identity) else {
                continue;
            };
            let seen = ReportSeen {
                originator: recipient.clone(),
                trans_id: response.trans_id,
                recipient: reported,
                code: destination.code,
                reporter_domain: CompactString::from(originator.domain()),
            };
            let owner = domain_shard(seen.recipient.domain(), self.config.shards);
            if owner == self.config.shard {
                self.report_seen(&seen);
            } else {
                self.actions.push_back(Action::ToShard {
                    shard: owner,
                    envelope: Envelope::ReportSeen(Box::new(seen)),
                });
            }
        }
    }

    /// A report from a relay further on passed through: it settles the watch on its forward
    /// when it is final, a failure from any relay or any report from the recipient's own
    /// domain (not a trace from an intermediate relay, nor a transient report).
    pub(super) fn report_seen(&mut self, seen: &ReportSeen) {
        let from_delivering_relay = seen.recipient.same_domain(&seen.reporter_domain);
        let failure = seen.code >= 400;
        if !(failure || (from_delivering_relay && seen.code < 300)) {
            return;
        }
        self.watches.settle(&WatchKey {
            originator: seen.originator.clone(),
            trans_id: seen.trans_id,
            recipient: seen.recipient.clone(),
        });
    }

    /// Watches past their bound: the originator hears that the outcome is unknown (450).
    pub(super) fn expire_watches(&mut self, now_ms: u64) {
        for key in self.watches.expire(now_ms) {
            let request = Box::new(ReportRequest::asked(
                key.trans_id,
                key.originator,
                CompactString::from(key.recipient.as_str()),
            ));
            self.report(
                Some(request),
                code::ACTION_NOT_TAKEN_TRANSIENT,
                NO_REPORT_IN_TIME,
            );
        }
    }
}
