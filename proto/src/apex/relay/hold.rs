//! The hold queue (hold4Endpoint, RFC 3342 §3): data for an endpoint that is not attached yet
//! waits here, within `hold.*`, until it attaches or its deadline passes (then reported). What
//! waits here is also in the store (see `durable`), from before it was acknowledged until its
//! fate is settled, so a restart does not lose it.

use super::*;

/// A data message waiting for its recipient to attach.
#[derive(Debug)]
pub(super) struct Held {
    payload: Bytes,
    /// Whose share of the queue it counts against (`hold.max_per_originator`).
    originator: Option<Endpoint>,
    report: Option<Report>,
    /// Relay-clock millisecond after which it is dropped; `None`: no bound.
    deadline: Option<u64>,
    /// Its record in the store.
    stored: Option<HoldId>,
    /// When it was put here (relay-clock ms): its `dataTiming` loses the time held.
    held_at: u64,
}

impl Relay {
    /// The originator of data to hold, whose share of the queue it counts against: the
    /// endpoint without its subaddress (RFC 3340 §2.2), so that an application attached as
    /// many subaddresses of itself still has one share. Held data was parsed when it was
    /// accepted, so this only fails for a record of the store that no longer parses: that
    /// counts against the queue alone.
    pub(super) fn held_originator(&mut self, payload: &Bytes) -> Option<Endpoint> {
        match msg::parse_message(payload, &self.config.limits) {
            Ok(Operation::Data(data)) => self
                .parse_endpoint(&data.originator.identity)
                .ok()
                .map(|originator| originator.base().into_owned()),
            _ => None,
        }
    }

    /// Whether data of `size` octets from `originator` fits in the hold queue: `Err` says why
    /// not, the whole queue (`hold.max_messages`, `hold.max_bytes`) or the originator's share
    /// of it (`hold.max_per_originator`; issue 19 item 8).
    pub(super) fn hold_admits(
        &self,
        originator: Option<&Endpoint>,
        size: usize,
    ) -> Result<(), &'static str> {
        let limits = &self.config.hold;
        if !limits.admits(self.held_messages, self.held_bytes, size) {
            return Err(error::HOLD_FULL);
        }
        let from_originator = originator
            .and_then(|o| self.held_by_originator.get(o))
            .copied()
            .unwrap_or(0);
        if !limits.admits_from(from_originator) {
            return Err(error::HOLD_SHARE_FULL);
        }
        Ok(())
    }

    /// Counts data of `size` octets from `originator` into the hold queue.
    pub(super) fn count_held(&mut self, originator: Option<&Endpoint>, size: usize) {
        self.held_messages += 1;
        self.held_bytes += size;
        if let Some(originator) = originator {
            *self
                .held_by_originator
                .entry(originator.clone())
                .or_default() += 1;
        }
    }

    /// Counts data of `size` octets from `originator` out of the hold queue.
    pub(super) fn uncount_held(&mut self, originator: Option<&Endpoint>, size: usize) {
        self.held_messages -= 1;
        self.held_bytes -= size;
        if let Some(originator) = originator {
            if let Some(count) = self.held_by_originator.get_mut(originator) {
                *count -= 1;
                if *count == 0 {
                    self.held_by_originator.remove(originator);
                }
            }
        }
    }

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
        let originator = self.held_originator(&payload);
        if let Err(full) = self.hold_admits(originator.as_ref(), payload.len()) {
            self.release(stored);
            return self.report(report, code::ACTION_NOT_TAKEN, full);
        }
        self.count_held(originator.as_ref(), payload.len());
        self.stats.data_held += 1;
        if let Some(at) = deadline {
            self.hold_deadline = Some(self.hold_deadline.map_or(at, |d| d.min(at)));
        }
        self.held
            .entry(recipient.clone())
            .or_default()
            .push_back(Held {
                payload,
                originator,
                report,
                deadline,
                stored,
                held_at: self.now_ms,
            });
    }

    /// `endpoint` attached at `at`: what was held for it goes there, in arrival order, its
    /// `dataTiming` reduced by the time held (RFC 3342 §2.1, §3). Data whose deadline has
    /// passed stays for [`Relay::handle_timeout`], which drops and reports it.
    pub(super) fn release_held(&mut self, endpoint: &Endpoint, at: ChannelRef) {
        if let Some(queue) = self.held.remove(endpoint) {
            let now_ms = self.now_ms;
            let (expired, queue): (VecDeque<Held>, VecDeque<Held>) = queue
                .into_iter()
                .partition(|held| held.deadline.is_some_and(|d| d <= now_ms));
            if !expired.is_empty() {
                self.held.insert(endpoint.clone(), expired);
            }
            self.as_own(|relay| {
                for mut held in queue {
                    relay.uncount_held(held.originator.as_ref(), held.payload.len());
                    held.payload = relay.less_time_held(held.payload, held.held_at);
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

    /// `payload` (held data) with the time since `held_at` subtracted from its `dataTiming`
    /// options (OPT-09, OPT-12): the recipient is given what remains. Its transient report is
    /// the delivery's `dataTiming` watch's business (see `timing`), not sent here.
    fn less_time_held(&mut self, payload: Bytes, held_at: u64) -> Bytes {
        if self.now_ms <= held_at
            || memchr::memmem::find(&payload, options::KnownOption::DataTiming.name().as_bytes())
                .is_none()
        {
            return payload;
        }
        let Ok(Operation::Data(data)) = msg::parse_message(&payload, &self.config.limits) else {
            return payload;
        };
        let Ok(options::Delivery::Deliver { options, .. }) =
            options::prepare_delivery(&data.options, held_at, self.now_ms)
        else {
            return payload;
        };
        let edits: Vec<Edit> = data
            .options
            .iter()
            .zip(&options)
            .filter(|(old, new)| old.raw != new.raw)
            .map(|(old, new)| Edit::replace(&old.raw, new.raw.clone()))
            .collect();
        options::edit_payload(data.payload(), &edits).unwrap_or(payload)
    }

    /// When the relay next needs [`Relay::handle_timeout`] (relay-clock ms), if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        [
            self.hold_deadline,
            self.watches.next_deadline(),
            self.timing_watches.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed: held data past its deadline is dropped and reported (RFC 3342 §3), and so
    /// are forwards no later relay reported on in time (see `watch`) and deliveries whose
    /// `dataTiming` ran out (see `timing`).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.routes_may_change();
        self.now_ms = now_ms;
        self.expire_watches(now_ms);
        self.expire_timings(now_ms);
        let mut expired = Vec::new();
        for queue in self.held.values_mut() {
            queue.retain_mut(|held| {
                let keep = held.deadline.is_none_or(|d| d > now_ms);
                if !keep {
                    expired.push((
                        held.payload.len(),
                        held.originator.take(),
                        held.report.take(),
                        held.stored,
                    ));
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
        for (size, originator, report, stored) in expired {
            self.uncount_held(originator.as_ref(), size);
            self.release(stored);
            self.report(
                report,
                code::ACTION_NOT_TAKEN,
                "endpoint did not attach in time",
            );
        }
    }
}
