//! What one shard counts about its own traffic, for the runtime's metrics and status
//! endpoint: plain integers and a histogram owned by the shard core (no atomics, nothing shared
//! between shards; the shard's traffic costs an add). The runtime asks each shard for a
//! [`ShardSnapshot`] when it is scraped and sums them ([`ShardSnapshot::merge`]).

use hdrhistogram::Histogram;

/// Most distinct reply codes counted on their own; further ones count as "other". Codes in
/// reports come from recipients' replies, which peers choose: their variety is bounded here.
pub const MAX_CODES: usize = 32;

/// Counts by reply code (RFC 3340 §4.4, RFC 3080 §8), bounded to [`MAX_CODES`] codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeCounts {
    counts: Vec<(u16, u64)>,
    other: u64,
}

impl CodeCounts {
    /// Counts one occurrence of `code`.
    pub fn add(&mut self, code: u16) {
        self.add_n(Some(code), 1);
    }

    fn add_n(&mut self, code: Option<u16>, n: u64) {
        let Some(code) = code else {
            self.other += n;
            return;
        };
        if let Some((_, count)) = self.counts.iter_mut().find(|(c, _)| *c == code) {
            *count += n;
        } else if self.counts.len() < MAX_CODES {
            self.counts.push((code, n));
            self.counts.sort_unstable_by_key(|(c, _)| *c);
        } else {
            self.other += n;
        }
    }

    /// Every code counted, in ascending order, then `None` (the codes past [`MAX_CODES`])
    /// when there were any.
    pub fn iter(&self) -> impl Iterator<Item = (Option<u16>, u64)> + '_ {
        self.counts
            .iter()
            .map(|&(code, n)| (Some(code), n))
            .chain((self.other > 0).then_some((None, self.other)))
    }

    /// The count of `code`.
    pub fn get(&self, code: u16) -> u64 {
        self.counts
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }

    /// The sum over every code.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum::<u64>() + self.other
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &CodeCounts) {
        for (code, n) in other.iter() {
            self.add_n(code, n);
        }
    }
}

/// Counts by a fixed set of names (protocol error kinds), bounded by the names' set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindCounts {
    counts: Vec<(&'static str, u64)>,
}

impl KindCounts {
    /// Counts one occurrence of `kind`.
    pub fn add(&mut self, kind: &'static str) {
        self.add_n(kind, 1);
    }

    fn add_n(&mut self, kind: &'static str, n: u64) {
        match self.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += n,
            None => {
                self.counts.push((kind, n));
                self.counts.sort_unstable_by_key(|(k, _)| *k);
            }
        }
    }

    /// Every kind counted, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().copied()
    }

    /// The count of `kind`.
    pub fn get(&self, kind: &str) -> u64 {
        self.counts
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &KindCounts) {
        for (kind, n) in other.iter() {
            self.add_n(kind, n);
        }
    }
}

/// The longest latency told apart (an hour, in microseconds); longer ones count as an hour.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Delivery latencies in microseconds, to two significant digits (about 25 KiB).
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Option<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).ok(),
        }
    }
}

impl Latency {
    /// Records one latency.
    pub fn record(&mut self, micros: u64) {
        if let Some(h) = &mut self.histogram {
            h.saturating_record(micros.clamp(1, LATENCY_MAX_US));
        }
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.histogram.as_ref().map_or(0, Histogram::len)
    }

    /// The sum of the recorded latencies in microseconds (each as the value its bucket stands
    /// for, so within the histogram's precision).
    pub fn sum_micros(&self) -> u64 {
        self.histogram.as_ref().map_or(0, |h| {
            h.iter_recorded()
                .map(|v| h.median_equivalent(v.value_iterated_to()) * v.count_at_value())
                .sum()
        })
    }

    /// For each bound (microseconds, ascending), how many latencies were at most that bound:
    /// the cumulative buckets of a Prometheus histogram.
    pub fn cumulative(&self, bounds: &[u64]) -> Vec<u64> {
        let mut counts = vec![0; bounds.len()];
        if let Some(h) = &self.histogram {
            for v in h.iter_recorded() {
                let value = h.highest_equivalent(v.value_iterated_to());
                let first = bounds.partition_point(|&b| b < value);
                for count in &mut counts[first..] {
                    *count += v.count_at_value();
                }
            }
        }
        counts
    }

    /// The latency at quantile `q` (0.0 to 1.0), in microseconds; 0 when none was recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        self.histogram
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(0, |h| h.value_at_quantile(q))
    }

    /// Adds `other`'s latencies to these.
    pub fn merge(&mut self, other: &Latency) {
        if let (Some(mine), Some(theirs)) = (&mut self.histogram, &other.histogram) {
            // Both have the same bounds: adding cannot fail.
            let _ = mine.add(theirs);
        }
    }
}

/// What the relay of one shard counts (RFC 3340 §4.4.4: data and its outcomes).
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Data acknowledged with `ok` to whoever sent it (endpoint or relay).
    pub data_accepted: u64,
    /// Deliveries the recipient (an endpoint, or a relay this shard delivers to) answered
    /// with `ok`.
    pub data_delivered: u64,
    /// Deliveries the recipient answered with an error.
    pub deliveries_refused: u64,
    /// Data handed to a link towards another relay.
    pub data_forwarded: u64,
    /// Data put in the hold queue (hold4Endpoint) for an endpoint not attached.
    pub data_held: u64,
    /// Operations (data, attach, bind, terminate) answered with an error, by code.
    pub errors: CodeCounts,
    /// Status reports sent to originators (APEX-38), by code.
    pub reports: CodeCounts,
    /// From acceptance to the recipient's `ok`, for data this shard delivered.
    pub latency: Latency,
    /// Forwarded statusRequests left unwatched because `mesh.max_report_watches` watches
    /// were running (issue 19 item 7).
    pub report_watches_refused: u64,
    /// Local deliveries with a `dataTiming` option left unwatched (no timing reports) because
    /// `mesh.max_timing_watches` watches were running.
    pub timing_watches_refused: u64,
}

/// Sessions by what they are doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStates {
    /// Waiting for the peer's greeting.
    pub greeting: u64,
    /// Greeted; exchanging messages.
    pub open: u64,
    /// Being released (BEEP `close` of the session agreed or refused service).
    pub closing: u64,
}

/// Outbound relay links by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStates {
    /// A connection is being made.
    pub connecting: u64,
    /// Connected (greeting, TLS, binding or bound).
    pub open: u64,
    /// Waiting before the next attempt.
    pub backoff: u64,
    /// Nothing queued and no connection.
    pub idle: u64,
}

/// One shard's counters and gauges at one moment.
#[derive(Debug, Clone, Default)]
pub struct ShardSnapshot {
    /// Open sessions accepted on apex-edge.
    pub sessions_edge: u64,
    /// Open sessions accepted on apex-mesh.
    pub sessions_mesh: u64,
    /// Open sessions of outbound relay links.
    pub sessions_link: u64,
    /// Sessions by state.
    pub session_states: SessionStates,
    /// Endpoints attached on this shard.
    pub endpoints: u64,
    /// Relays bound on this shard's sessions.
    pub relays_bound: u64,
    /// Outbound links by state.
    pub links: LinkStates,
    /// Data in the hold queue now.
    pub held_now: u64,
    /// Octets of relay MSGs waiting for room in recipients' sessions.
    pub queued_octets: u64,
    /// Data messages queued on outbound links, not yet sent.
    pub link_queued: u64,
    /// Times a recipient took nothing for too long and data for it was refused.
    pub overflows: u64,
    /// Sessions accepted since the start.
    pub sessions_accepted: u64,
    /// Sessions ended because the peer did not greet in time (`runtime.greeting_timeout_ms`).
    pub greeting_timeouts: u64,
    /// Sessions ended because nothing was on them for too long (`runtime.idle_timeout_ms`).
    pub idle_timeouts: u64,
    /// Connections refused because their address held `runtime.max_connections_per_address`.
    pub refused_per_address: u64,
    /// BEEP messages received (MSG, RPY, ERR, ANS, NUL), over every session since the start.
    pub messages_in: u64,
    /// BEEP messages sent.
    pub messages_out: u64,
    /// Sessions ended for a protocol violation, by kind.
    pub protocol_errors: KindCounts,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// SASL exchanges that failed.
    pub sasl_failures: u64,
    /// The relay's counts.
    pub relay: RelayStats,
}

impl ShardSnapshot {
    /// Adds `other` to this one (totals over shards).
    pub fn merge(&mut self, other: &ShardSnapshot) {
        self.sessions_edge += other.sessions_edge;
        self.sessions_mesh += other.sessions_mesh;
        self.sessions_link += other.sessions_link;
        self.session_states.greeting += other.session_states.greeting;
        self.session_states.open += other.session_states.open;
        self.session_states.closing += other.session_states.closing;
        self.endpoints += other.endpoints;
        self.relays_bound += other.relays_bound;
        self.links.connecting += other.links.connecting;
        self.links.open += other.links.open;
        self.links.backoff += other.links.backoff;
        self.links.idle += other.links.idle;
        self.held_now += other.held_now;
        self.queued_octets += other.queued_octets;
        self.link_queued += other.link_queued;
        self.overflows += other.overflows;
        self.sessions_accepted += other.sessions_accepted;
        self.greeting_timeouts += other.greeting_timeouts;
        self.idle_timeouts += other.idle_timeouts;
        self.refused_per_address += other.refused_per_address;
        self.messages_in += other.messages_in;
        self.messages_out += other.messages_out;
        self.protocol_errors.merge(&other.protocol_errors);
        self.tls_handshakes += other.tls_handshakes;
        self.sasl_failures += other.sasl_failures;
        let (mine, theirs) = (&mut self.relay, &other.relay);
        mine.data_accepted += theirs.data_accepted;
        mine.data_delivered += theirs.data_delivered;
        mine.deliveries_refused += theirs.deliveries_refused;
        mine.data_forwarded += theirs.data_forwarded;
        mine.data_held += theirs.data_held;
        mine.report_watches_refused += theirs.report_watches_refused;
        mine.timing_watches_refused += theirs.timing_watches_refused;
        mine.errors.merge(&theirs.errors);
        mine.reports.merge(&theirs.reports);
        mine.latency.merge(&theirs.latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_past_the_bound_count_as_other() {
        let mut counts = CodeCounts::default();
        for code in 0..MAX_CODES as u16 + 5 {
            counts.add(500 - code);
        }
        counts.add(500);
        assert_eq!(counts.get(500), 2);
        assert_eq!(counts.iter().last(), Some((None, 5)));
        assert_eq!(counts.total(), MAX_CODES as u64 + 6);
        let listed: Vec<u16> = counts.iter().filter_map(|(c, _)| c).collect();
        assert!(listed.windows(2).all(|w| w[0] < w[1]), "{listed:?}");
        let mut sum = CodeCounts::default();
        sum.add(250);
        sum.merge(&counts);
        assert_eq!(sum.total(), counts.total() + 1);
    }

    #[test]
    fn latency_buckets_are_cumulative_and_merge() {
        let mut a = Latency::default();
        for micros in [40, 90, 900, 5_000, 2_000_000] {
            a.record(micros);
        }
        let bounds = [50, 100, 1_000, 10_000, 1_000_000];
        assert_eq!(a.cumulative(&bounds), [1, 2, 3, 4, 4]);
        let mut b = Latency::default();
        b.record(60);
        b.merge(&a);
        assert_eq!(b.count(), 6);
        assert_eq!(b.cumulative(&bounds), [1, 3, 4, 5, 5]);
        let sum = b.sum_micros();
        assert!((1_990_000..2_030_000).contains(&sum), "{sum}");
    }

    #[test]
    fn snapshots_sum() {
        let mut one = ShardSnapshot {
            sessions_edge: 2,
            ..Default::default()
        };
        one.relay.data_accepted = 7;
        one.protocol_errors.add("frame");
        let mut two = one.clone();
        two.protocol_errors.add("tls");
        two.merge(&one);
        assert_eq!(two.sessions_edge, 4);
        assert_eq!(two.relay.data_accepted, 14);
        assert_eq!(two.protocol_errors.get("frame"), 2);
        assert_eq!(two.protocol_errors.get("tls"), 1);
    }
}
