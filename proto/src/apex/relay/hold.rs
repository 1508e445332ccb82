//! The hold queue (hold4Endpoint, RFC 3342 §3): data for an endpoint that is not attached yet
//! waits here, within `hold.*`, until it attaches or its deadline passes (then reported). What
//! waits here is also in the store (see `durable`), from before it was acknowledged until its
//! fate is settled, so a restart does not lose it.

use super::*;

/// A data message waiting for its recipient to attach.
#[derive(Debug)]
pub(super) struct Held {
    payload: Bytes,
    report: Option<Report>,
    /// Relay-clock millisecond after which it is dropped; `None`: no bound.
    deadline: Option<u64>,
    /// Its record in the store.
    stored: Option<HoldId>,
}

impl Relay {
    /// Holds data for `recipient` (not attached) until it attaches or `deadline` passes, if
    /// the queue has room; otherwise the data is reported as not delivered.
    pub(super) fn hold(
        &mut self,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        deadline: Option<u64>,
        stored: Option<HoldId>,
    ) {
        if !self
            .config
            .hold
            .admits(self.held_messages, self.held_bytes, payload.len())
        {
            self.release(stored);
            return self.report(report, code::ACTION_NOT_TAKEN, error::HOLD_FULL);
        }
        self.held_messages += 1;
        self.held_bytes += payload.len();
        self.stats.data_held += 1;
        if let Some(at) = deadline {
            self.hold_deadline = Some(self.hold_deadline.map_or(at, |d| d.min(at)));
        }
        self.held
            .entry(recipient.clone())
            .or_default()
            .push_back(Held {
                payload,
                report,
                deadline,
                stored,
            });
    }

    /// `endpoint` attached at `at`: what was held for it goes there, in arrival order.
    pub(super) fn release_held(&mut self, endpoint: &Endpoint, at: ChannelRef) {
        if let Some(queue) = self.held.remove(endpoint) {
            self.as_own(|relay| {
                for held in queue {
                    relay.held_messages -= 1;
                    relay.held_bytes -= held.payload.len();
                    let stored = held.stored.map(|id| {
                        Box::new(Stored {
                            id,
                            recipient: endpoint.clone(),
                            payload: held.payload.clone(),
                            deadline: held.deadline,
                        })
                    });
                    relay.deliver_at(at, held.payload, held.report, stored);
                }
            });
        }
    }

    /// When the relay next needs [`Relay::handle_timeout`] (relay-clock ms), if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        self.hold_deadline
    }

    /// Time passed: held data past its deadline is dropped and reported (RFC 3342 §3).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.routes_may_change();
        self.now_ms = now_ms;
        let mut expired = Vec::new();
        for queue in self.held.values_mut() {
            queue.retain_mut(|held| {
                let keep = held.deadline.is_none_or(|d| d > now_ms);
                if !keep {
                    expired.push((held.payload.len(), held.report.take(), held.stored));
                }
                keep
            });
        }
        self.held.retain(|_, q| !q.is_empty());
        self.hold_deadline = self
            .held
            .values()
            .flatten()
            .filter_map(|held| held.deadline)
            .min();
        for (size, report, stored) in expired {
            self.held_messages -= 1;
            self.held_bytes -= size;
            self.release(stored);
            self.report(
                report,
                code::ACTION_NOT_TAKEN,
                "endpoint did not attach in time",
            );
        }
    }
}
