//! How long an accepted connection may hold a slot without using it, and how many slots one
//! peer address may hold: the deadlines of the shard core's connections (the wait for the
//! peer's greeting, the time a session may sit with nothing on it, the wait for the answer to
//! the release the relay asked for) and the count of connections per address.
//!
//! BEEP has no keep-alive of its own, and a session exists only once both greetings are
//! exchanged (RFC 3080 §2.4): a peer that connects and never greets, greets one octet at a
//! time, or greets and then does nothing, would otherwise hold its connection forever. Time
//! comes in as `now`; the shard core asks [`ConnWatch::deadline`] of each connection and keeps
//! one timer entry per connection (see `ShardCore::watch`).

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Bounds on the connections a shard accepts (outbound relay links are not bound by them:
/// their own state machine decides when they go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// How long an accepted connection may take to complete its greeting (and, after TLS
    /// begins, its handshake and new greeting); `None`: forever.
    pub greeting_timeout: Option<Duration>,
    /// How long a session may have no channel open besides channel 0 (so no endpoint attached
    /// and no relay bound: both live on a channel) before the relay asks the peer to release
    /// it; `None`: forever.
    pub idle_timeout: Option<Duration>,
    /// How long the peer of a session timed out for idleness has to answer the relay's
    /// `close` before the transport closes anyway.
    pub release_timeout: Duration,
    /// Most connections one peer address (an IPv6 address counts by its /64 prefix) may hold
    /// on the shard; past it the listener refuses with 421 instead of greeting (BEEP-18).
    /// `None`: no bound but the shard's.
    pub max_per_address: Option<usize>,
}

impl Default for ConnLimits {
    /// No deadline and no per-address bound: the in-memory tests' relays, whose clients
    /// greet at once. apexd's configuration gives the bounds it runs with.
    fn default() -> Self {
        Self {
            greeting_timeout: None,
            idle_timeout: None,
            release_timeout: Duration::from_secs(5),
            max_per_address: None,
        }
    }
}

/// Why the relay ended a session on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// The peer did not complete its greeting (or TLS handshake) in time.
    Greeting,
    /// The session had nothing on it for too long.
    Idle,
}

impl Timeout {
    /// The name logs and metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Timeout::Greeting => "greeting",
            Timeout::Idle => "idle",
        }
    }
}

/// The deadlines of one accepted connection.
#[derive(Debug, Default)]
pub(super) struct ConnWatch {
    /// The session has waited for the peer's greeting (or a TLS handshake) since then.
    establishing_since: Option<Instant>,
    /// The session has had no channel besides channel 0 since then.
    idle_since: Option<Instant>,
    /// The relay asked the peer to release the session: the transport goes at this time.
    release_by: Option<Instant>,
    /// The deadline of this connection's entry in the shard's timer heap, if it has one.
    pub(super) armed_at: Option<Instant>,
    /// Why the relay ended the session, once it did.
    pub(super) timed_out: Option<Timeout>,
}

/// What is due for a connection at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing yet.
    Nothing,
    /// The greeting did not come in time.
    Greeting,
    /// The session was idle too long.
    Idle,
    /// The peer did not answer the release in time: close the transport.
    Release,
}

impl ConnWatch {
    /// A connection that waits for its peer's greeting from `now`.
    pub(super) fn accepted(now: Instant) -> Self {
        Self {
            establishing_since: Some(now),
            ..Self::default()
        }
    }

    /// Follows the session's state: `establishing` while it waits for a greeting or a TLS
    /// handshake, `bare` while it is open with no channel besides channel 0. A wait that goes
    /// on keeps the time it began.
    pub(super) fn follow(&mut self, establishing: bool, bare: bool, now: Instant) {
        if self.timed_out.is_some() {
            return;
        }
        self.establishing_since = establishing.then(|| self.establishing_since.unwrap_or(now));
        self.idle_since = bare.then(|| self.idle_since.unwrap_or(now));
    }

    /// When something is next due, under `limits`.
    pub(super) fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.release_by.is_some() {
            return self.release_by;
        }
        if self.timed_out.is_some() {
            return None;
        }
        if let Some(since) = self.establishing_since {
            return limits.greeting_timeout.map(|t| since + t);
        }
        let since = self.idle_since?;
        limits.idle_timeout.map(|t| since + t)
    }

    /// What is due at `now`.
    pub(super) fn due(&self, limits: &ConnLimits, now: Instant) -> Due {
        if self.deadline(limits).is_none_or(|at| at > now) {
            return Due::Nothing;
        }
        if self.release_by.is_some() {
            Due::Release
        } else if self.establishing_since.is_some() {
            Due::Greeting
        } else {
            Due::Idle
        }
    }

    /// The relay ended the session for `why`; when it asked the peer to release it, the
    /// transport goes at `release_by` whatever the answer.
    pub(super) fn timed_out(&mut self, why: Timeout, release_by: Option<Instant>) {
        self.timed_out = Some(why);
        self.release_by = release_by;
    }
}

/// The key `ip` counts under for [`ConnLimits::max_per_address`]: an IPv4 address (also when
/// written as an IPv4-mapped IPv6 one) as it is, an IPv6 address by its /64 prefix, the
/// smallest block a site is usually given (one host can use any address of its /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            greeting_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
            release_timeout: Duration::from_secs(5),
            max_per_address: Some(64),
        }
    }

    #[test]
    fn a_greeting_wait_keeps_its_start_and_an_idle_wait_begins_when_the_session_is_bare() {
        let t0 = Instant::now();
        let mut watch = ConnWatch::accepted(t0);
        let limits = limits();
        // Octets trickle in: the wait is measured from the accept, not from the last octet.
        watch.follow(true, false, t0 + Duration::from_secs(9));
        assert_eq!(watch.deadline(&limits), Some(t0 + Duration::from_secs(10)));
        assert_eq!(
            watch.due(&limits, t0 + Duration::from_secs(10)),
            Due::Greeting
        );
        // Greeted at 3 s with no channel: idle from then.
        let mut watch = ConnWatch::accepted(t0);
        watch.follow(false, true, t0 + Duration::from_secs(3));
        assert_eq!(watch.deadline(&limits), Some(t0 + Duration::from_secs(63)));
        // A channel opens, then closes at 100 s: the idle wait starts again.
        watch.follow(false, false, t0 + Duration::from_secs(20));
        assert_eq!(watch.deadline(&limits), None);
        watch.follow(false, true, t0 + Duration::from_secs(100));
        assert_eq!(
            watch.due(&limits, t0 + Duration::from_secs(159)),
            Due::Nothing
        );
        assert_eq!(watch.due(&limits, t0 + Duration::from_secs(160)), Due::Idle);
        let asked = t0 + Duration::from_secs(160);
        watch.timed_out(Timeout::Idle, Some(asked + limits.release_timeout));
        assert_eq!(watch.due(&limits, asked), Due::Nothing);
        assert_eq!(
            watch.due(&limits, asked + limits.release_timeout),
            Due::Release
        );
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(address_key(v4), v4);
    }
}
