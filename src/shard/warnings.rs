//! Rate limit on the warnings one peer address can cause on one shard: a peer that reconnects
//! and sends garbage a thousand times a second gets a few warning lines, then one per
//! interval, and a summary of what was left out. This module only decides (time comes in as
//! `now`, nothing is written); the shard asks it before it warns and writes the summaries it
//! hands out ([`WarnLimiter::poll_summary`]).
//!
//! Each address has a bucket of [`WarnLimits::burst`] warnings, refilled by one per
//! [`WarnLimits::interval`]. A warning with no token left is suppressed and counted; the count
//! is handed out as a summary when the next warning is let through, or one interval after the
//! first suppressed one, whichever comes first. The table of addresses is bounded
//! ([`WarnLimits::max_peers`]): a new address past it evicts the oldest one (whose pending
//! count is still summarised).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

/// How many warnings each peer address may cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarnLimits {
    /// Warnings let through at once from an address that caused none lately.
    pub burst: u32,
    /// One more warning is allowed per interval; suppressed ones are summarised once per
    /// interval.
    pub interval: Duration,
    /// Addresses remembered per shard; past it the oldest is forgotten.
    pub max_peers: usize,
}

/// Warnings from one address let through before the limit applies.
pub const DEFAULT_WARN_BURST: u32 = 3;
/// After the burst, one warning per address per this long.
pub const DEFAULT_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Addresses a shard keeps warning counts for.
pub const DEFAULT_WARN_PEERS: usize = 4096;

impl Default for WarnLimits {
    fn default() -> Self {
        Self {
            burst: DEFAULT_WARN_BURST,
            interval: DEFAULT_WARN_INTERVAL,
            max_peers: DEFAULT_WARN_PEERS,
        }
    }
}

/// Whether to write a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; first say that `suppressed` similar warnings from the address were left out
    /// (when not 0).
    Warn {
        /// Warnings suppressed since the last one written or summarised.
        suppressed: u64,
    },
    /// Leave it out: it is counted for the address's summary.
    Suppress,
}

#[derive(Debug)]
struct Peer {
    tokens: u32,
    /// When the last token was added (or the bucket was last full).
    refilled: Instant,
    suppressed: u64,
    /// When the oldest warning in `suppressed` was left out.
    suppressed_since: Option<Instant>,
}

/// The warning budget of every peer address of one shard.
#[derive(Debug)]
pub struct WarnLimiter {
    limits: WarnLimits,
    peers: FxHashMap<IpAddr, Peer>,
    /// Addresses in the order they were first seen, for eviction.
    order: VecDeque<IpAddr>,
    /// Counts of evicted addresses, still to be summarised, and when they were evicted.
    evicted: Vec<(IpAddr, u64, Instant)>,
}

impl WarnLimiter {
    /// A limiter with `limits` (a `burst` or `max_peers` of 0 is taken as 1).
    pub fn new(limits: WarnLimits) -> Self {
        Self {
            limits: WarnLimits {
                burst: limits.burst.max(1),
                max_peers: limits.max_peers.max(1),
                ..limits
            },
            peers: FxHashMap::default(),
            order: VecDeque::new(),
            evicted: Vec::new(),
        }
    }

    /// Addresses remembered now.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// `peer` caused a warning at `now`: write it or not.
    pub fn check(&mut self, peer: IpAddr, now: Instant) -> Verdict {
        let limits = self.limits;
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= limits.max_peers {
                self.evict_oldest(now);
            }
            self.order.push_back(peer);
        }
        let entry = self.peers.entry(peer).or_insert(Peer {
            tokens: limits.burst,
            refilled: now,
            suppressed: 0,
            suppressed_since: None,
        });
        let elapsed = now.saturating_duration_since(entry.refilled);
        let earned = (elapsed.as_nanos() / limits.interval.as_nanos().max(1)) as u64;
        if earned > 0 {
            let tokens = u64::from(entry.tokens) + earned;
            entry.tokens = tokens.min(u64::from(limits.burst)) as u32;
            entry.refilled = if entry.tokens == limits.burst {
                now
            } else {
                entry.refilled + limits.interval * earned as u32
            };
        }
        if entry.tokens == 0 {
            entry.suppressed += 1;
            entry.suppressed_since.get_or_insert(now);
            return Verdict::Suppress;
        }
        entry.tokens -= 1;
        entry.suppressed_since = None;
        Verdict::Warn {
            suppressed: std::mem::take(&mut entry.suppressed),
        }
    }

    fn evict_oldest(&mut self, now: Instant) {
        while let Some(oldest) = self.order.pop_front() {
            if let Some(gone) = self.peers.remove(&oldest) {
                if gone.suppressed > 0 {
                    self.evicted.push((oldest, gone.suppressed, now));
                }
                return;
            }
        }
    }

    /// A summary due at `now`: an address and how many of its warnings were left out over
    /// the last interval. Call until `None`.
    pub fn poll_summary(&mut self, now: Instant) -> Option<(IpAddr, u64)> {
        if let Some((peer, suppressed, _)) = self.evicted.pop() {
            return Some((peer, suppressed));
        }
        let interval = self.limits.interval;
        let (peer, entry) = self.peers.iter_mut().find(|(_, p)| {
            p.suppressed_since
                .is_some_and(|since| now.saturating_duration_since(since) >= interval)
        })?;
        entry.suppressed_since = None;
        Some((*peer, std::mem::take(&mut entry.suppressed)))
    }

    /// When [`WarnLimiter::poll_summary`] next has something, if anything was suppressed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let interval = self.limits.interval;
        let evicted = self.evicted.iter().map(|(_, _, at)| *at).min();
        let suppressed = self
            .peers
            .values()
            .filter_map(|p| p.suppressed_since)
            .min()
            .map(|since| since + interval);
        evicted.into_iter().chain(suppressed).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn limiter() -> WarnLimiter {
        WarnLimiter::new(WarnLimits {
            burst: 3,
            interval: Duration::from_secs(10),
            max_peers: 4,
        })
    }

    const WARN: Verdict = Verdict::Warn { suppressed: 0 };

    #[test]
    fn a_burst_then_one_per_interval_with_the_suppressed_count() {
        let mut limiter = limiter();
        let t0 = Instant::now();
        let peer = addr(1);
        // A thousand warnings within a second: the burst, then silence.
        let verdicts: Vec<Verdict> = (0..1000)
            .map(|i| limiter.check(peer, t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(verdicts[..3], [WARN; 3]);
        assert!(verdicts[3..].iter().all(|v| *v == Verdict::Suppress));
        assert_eq!(limiter.poll_summary(t0 + Duration::from_secs(5)), None);
        // A token comes back after an interval: the next warning is written with the count.
        assert_eq!(
            limiter.check(peer, t0 + Duration::from_secs(10)),
            Verdict::Warn { suppressed: 997 }
        );
        assert_eq!(
            limiter.check(peer, t0 + Duration::from_secs(11)),
            Verdict::Suppress
        );
        assert_eq!(
            limiter.check(peer, t0 + Duration::from_secs(20)),
            Verdict::Warn { suppressed: 1 }
        );
        // Another address has its own budget.
        assert_eq!(limiter.check(addr(2), t0 + Duration::from_secs(20)), WARN);
    }

    #[test]
    fn a_quiet_address_gets_its_whole_burst_back() {
        let mut limiter = limiter();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(addr(1), t0), WARN);
        }
        assert_eq!(limiter.check(addr(1), t0), Verdict::Suppress);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            limiter.check(addr(1), later),
            Verdict::Warn { suppressed: 1 }
        );
        assert_eq!(limiter.check(addr(1), later), WARN);
        assert_eq!(limiter.check(addr(1), later), WARN);
        assert_eq!(limiter.check(addr(1), later), Verdict::Suppress);
    }

    #[test]
    fn suppressed_warnings_are_summarised_when_their_interval_ends() {
        let mut limiter = limiter();
        let t0 = Instant::now();
        assert_eq!(limiter.poll_timeout(), None, "nothing suppressed, no timer");
        for i in 0..10 {
            limiter.check(addr(1), t0 + Duration::from_millis(i));
        }
        let first_suppressed = t0 + Duration::from_millis(3);
        assert_eq!(
            limiter.poll_timeout(),
            Some(first_suppressed + Duration::from_secs(10))
        );
        assert_eq!(limiter.poll_summary(t0 + Duration::from_secs(9)), None);
        let due = first_suppressed + Duration::from_secs(10);
        assert_eq!(limiter.poll_summary(due), Some((addr(1), 7)));
        assert_eq!(limiter.poll_summary(due), None, "summarised once");
        assert_eq!(limiter.poll_timeout(), None);
        // A flood that goes on is summarised once per interval.
        for i in 0..5 {
            limiter.check(addr(1), due + Duration::from_millis(i));
        }
        // The token that came back at t0 + 10 s let the first through; the other four are
        // summarised an interval after the first of them.
        let first = due + Duration::from_millis(1);
        assert_eq!(limiter.poll_summary(first + Duration::from_secs(9)), None);
        assert_eq!(
            limiter.poll_summary(first + Duration::from_secs(10)),
            Some((addr(1), 4))
        );
    }

    #[test]
    fn the_table_is_bounded_and_an_evicted_count_is_still_summarised() {
        let mut limiter = limiter();
        let t0 = Instant::now();
        for _ in 0..5 {
            limiter.check(addr(1), t0);
        }
        for last in 2..=200 {
            limiter.check(addr(last), t0);
            assert!(limiter.peers() <= 4);
        }
        assert_eq!(
            limiter.poll_timeout(),
            Some(t0),
            "an evicted count is due at once"
        );
        assert_eq!(limiter.poll_summary(t0), Some((addr(1), 2)));
        assert_eq!(limiter.poll_summary(t0), None);
        // Forgotten, the first address starts with a whole burst again.
        assert_eq!(limiter.check(addr(1), t0), WARN);
    }
}
