//! Accepting while the process has no file descriptor left (EMFILE) or the system has none
//! (ENFILE): how long the accept loop waits before it tries again ([`AcceptPressure`]: doubling,
//! capped at `runtime.accept_backoff_max_ms`), how often it says so (once per
//! `warnings.interval_ms`, with the count of failures left out), and the descriptor it keeps
//! spare ([`SpareDescriptor`]) to answer the connections waiting in the kernel with a BEEP
//! refusal (ERR 421 instead of a greeting, RFC 3080 §2.3.1.5, BEEP-18) rather than leaving them
//! hanging. The classic technique: close the spare, accept, answer, close, reopen the spare.

use std::time::{Duration, Instant};

use apex_proto::beep::mgmt::{code, ErrorElement};
use apex_proto::{Session, SessionConfig};
use bytes::BytesMut;

/// The first wait after an accept failed.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// Connections answered with a refusal per failed accept: the rest wait for the next round,
/// so a full backlog does not hold the shard's other tasks up.
pub const MAX_REFUSALS_PER_ROUND: usize = 256;

/// The backoff and log throttle of one accept loop.
#[derive(Debug)]
pub struct AcceptPressure {
    next_wait: Duration,
    max_wait: Duration,
    log_interval: Duration,
    /// When a failure was last logged, while failures go on.
    logged_at: Option<Instant>,
    /// Failures since the last one logged.
    suppressed: u64,
}

/// What to do after a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub struct AfterFailure {
    /// Wait this long before accepting again.
    pub wait: Duration,
    /// Log this failure, saying how many were left out since the last one logged.
    pub log: Option<u64>,
}

impl AcceptPressure {
    /// Waits doubling from [`FIRST_BACKOFF`] up to `max_wait`; one log line per
    /// `log_interval`.
    pub fn new(max_wait: Duration, log_interval: Duration) -> Self {
        Self {
            next_wait: FIRST_BACKOFF.min(max_wait),
            max_wait,
            log_interval,
            logged_at: None,
            suppressed: 0,
        }
    }

    /// An accept failed at `now`.
    pub fn failed(&mut self, now: Instant) -> AfterFailure {
        let wait = self.next_wait;
        self.next_wait = (self.next_wait * 2).min(self.max_wait);
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= self.log_interval);
        let log = if due {
            self.logged_at = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        };
        AfterFailure { wait, log }
    }

    /// An accept succeeded: the next failure waits [`FIRST_BACKOFF`] and is logged. Returns
    /// the failures left out of the log since the last one logged, if any.
    pub fn succeeded(&mut self) -> Option<u64> {
        self.next_wait = FIRST_BACKOFF.min(self.max_wait);
        self.logged_at = None;
        Some(std::mem::take(&mut self.suppressed)).filter(|n| *n > 0)
    }
}

/// A descriptor held open so that one is free when the process has none: `/dev/null`, opened
/// read-only.
#[derive(Debug)]
pub struct SpareDescriptor(Option<std::fs::File>);

impl SpareDescriptor {
    /// Opens the spare (none when even that fails; [`SpareDescriptor::release`] tries again).
    pub fn open() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    /// Runs `with_one_free` with the spare closed, then opens it again. Returns `None` when
    /// there was no spare to close (it is opened for next time if it can be).
    pub fn release<T>(&mut self, with_one_free: impl FnOnce() -> T) -> Option<T> {
        let Some(spare) = self.0.take() else {
            self.0 = std::fs::File::open("/dev/null").ok();
            return None;
        };
        drop(spare);
        let result = with_one_free();
        self.0 = std::fs::File::open("/dev/null").ok();
        Some(result)
    }

    /// Whether the spare is open.
    pub fn is_open(&self) -> bool {
        self.0.is_some()
    }
}

/// The octets a listener sends instead of its greeting when it has no descriptor to spare
/// (BEEP-18: ERR msgno 0 on channel 0 with `error` 421), made by the same session code that
/// answers past `runtime.max_connections`.
pub fn refusal() -> Vec<u8> {
    let error = ErrorElement::new(code::SERVICE_NOT_AVAILABLE, "no file descriptor to spare");
    let mut session = Session::new_refusing(SessionConfig::default(), error);
    let mut out = BytesMut::new();
    while session.poll_transmit(&mut out) > 0 {}
    out.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19 item 11: failures wait 10, 20, 40 ... ms up to the cap, and are logged once per
    /// interval with the count of those left out; a success starts over.
    #[test]
    fn failures_back_off_to_the_cap_and_are_logged_once_per_interval() {
        let t0 = Instant::now();
        let mut pressure = AcceptPressure::new(Duration::from_millis(100), Duration::from_secs(10));
        let waits: Vec<u64> = (0..6)
            .map(|i| {
                pressure
                    .failed(t0 + Duration::from_millis(i))
                    .wait
                    .as_millis() as u64
            })
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 100, 100]);
        // The first was logged; the five after it, within the interval, were not.
        let after = pressure.failed(t0 + Duration::from_secs(10));
        assert_eq!(after.log, Some(5), "logged with the five left out");
        assert_eq!(pressure.failed(t0 + Duration::from_secs(11)).log, None);
        assert_eq!(pressure.succeeded(), Some(1));
        let again = pressure.failed(t0 + Duration::from_secs(12));
        assert_eq!(
            again,
            AfterFailure {
                wait: FIRST_BACKOFF,
                log: Some(0)
            }
        );
        assert_eq!(pressure.succeeded(), None);
    }

    #[test]
    fn the_refusal_is_an_err_421_instead_of_a_greeting() {
        let payload = "Content-Type: application/beep+xml\r\n\r\n<error code='421'>no file descriptor to spare</error>\r\n";
        let expected = format!("ERR 0 0 . 0 {}\r\n{payload}END\r\n", payload.len());
        assert_eq!(String::from_utf8(refusal()).unwrap(), expected);
    }

    #[test]
    fn the_spare_is_reopened_after_use() {
        let mut spare = SpareDescriptor::open();
        assert!(spare.is_open());
        assert_eq!(spare.release(|| 7), Some(7));
        assert!(spare.is_open());
    }
}
