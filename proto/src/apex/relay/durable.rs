//! What the relay keeps in the store and how it waits for it (see [`crate::store`]): data
//! held for an endpoint that is not attached is stored before the data is acknowledged
//! (RFC 3342 §3: the relay accepted it, so a restart must not lose it), held again when a
//! delivery of it does not complete, and released once the endpoint answered it (or it
//! expired); a service's change (the access service's `set`) is answered once durable.
//! Nothing here blocks: the relay asks with [`Action::Store`] and carries on where
//! [`Relay::store_done`] says. At most [`RelayConfig::store_queue`] requests wait per shard.

use super::*;
use crate::apex::service::Continuation;
use crate::store::{HeldMessage, Outcome, StoreFailure};

/// The default of [`RelayConfig::store_queue`] (`runtime.store_queue`).
pub const DEFAULT_STORE_QUEUE: usize = 4096;

/// Data for a recipient that is not attached, to store before it is held (or handed to the
/// recipient's home shard, which holds it).
#[derive(Debug)]
pub(super) struct PersistHold {
    recipient: Endpoint,
    /// Whose share of the hold queue it is counted against meanwhile (held here only).
    originator: Option<Endpoint>,
    payload: Bytes,
    report: Option<Report>,
    hold: Hold,
    /// The recipient's home shard when it is not this one.
    home: Option<usize>,
}

/// What waits for a [`StoreDone`].
#[derive(Debug)]
pub(super) enum AwaitingStore {
    /// Data whose held recipients are being stored: acknowledged once they are.
    Data {
        /// The MSG to answer (`None`: answered already).
        answer: Option<(ConnId, u32, u32)>,
        /// The held recipients, in the order of their operations.
        holds: Vec<PersistHold>,
        /// Every recipient was to be held, so nothing of the data went anywhere else: a store
        /// failure refuses the data rather than reporting each recipient.
        all_held: bool,
    },
    /// A service's change, answered by the service once durable.
    Service {
        /// The service's endpoint, the originator of what it sends.
        from: Endpoint,
        /// What the service does next.
        then: Continuation,
    },
    /// Records of settled data: asked again should the store fail to remove them (a record
    /// left behind would be delivered again after a restart).
    Release(Vec<HoldId>),
}

impl Relay {
    /// Whether the store has as many requests of this shard to answer as it may.
    pub(super) fn store_busy(&self) -> bool {
        self.awaiting_store.len() >= self.config.store_queue
    }

    /// Data for `recipient` to hold (hold4Endpoint) and not stored yet: stored before the data
    /// is acknowledged, then held here (`home` = `None`) or handed to its home shard.
    pub(super) fn persist_hold(
        &mut self,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        hold: Hold,
        home: Option<usize>,
    ) {
        let mut originator = None;
        if home.is_none() {
            originator = self.held_originator(&payload);
            if let Err(full) = self.hold_admits(originator.as_ref(), payload.len()) {
                // Reported, or the data refused, once every recipient is routed.
                self.hold_full.push((report, full));
                return;
            }
            // Counted from now, so that data stored meanwhile cannot overfill the queue.
            self.count_held(originator.as_ref(), payload.len());
        }
        self.persisting.push(PersistHold {
            recipient: recipient.clone(),
            originator,
            payload,
            report,
            hold,
            home,
        });
    }

    /// Asks the store to keep what [`Relay::persist_hold`] collected; `answer` is the MSG to
    /// acknowledge once it is (answered now when nothing was collected). `recipients`: how
    /// many the data had. Data none of whose recipients could be held (the queue is full) is
    /// refused with 450 instead of acknowledged and dropped.
    pub(super) fn store_holds(&mut self, answer: Option<(ConnId, u32, u32)>, recipients: usize) {
        let full = std::mem::take(&mut self.hold_full);
        if !full.is_empty() && full.len() == recipients && self.persisting.is_empty() {
            if let Some((conn, channel, msgno)) = answer {
                let refusal = match full.first() {
                    Some((_, why)) if *why == error::HOLD_SHARE_FULL => ApexError::HoldShareFull,
                    _ => ApexError::HoldFull,
                };
                return self.answer(conn, channel, Answer::Msg(msgno), Err(refusal));
            }
        }
        for (report, why) in full {
            self.report(report, code::ACTION_NOT_TAKEN, why);
        }
        if self.persisting.is_empty() {
            if let Some((conn, channel, msgno)) = answer {
                self.accept_data(conn, channel, msgno);
            }
            return;
        }
        let holds = std::mem::take(&mut self.persisting);
        let ops =
            holds
                .iter()
                .map(|h| {
                    StoreOp::Hold(HeldMessage {
                        recipient: h.recipient.clone(),
                        payload: h.payload.clone(),
                        // Only a statusRequest survives a restart; a dataTiming watch is this
                        // process's (the record keeps the time the data may still wait).
                        report: h.report.as_deref().filter(|r| r.status_asked).map(|r| {
                            ReportRequest {
                                timing: None,
                                ..r.clone()
                            }
                        }),
                        remaining_ms: h.hold.deadline().map(|at| at.saturating_sub(self.now_ms)),
                    })
                })
                .collect();
        let all_held = holds.len() == recipients;
        self.ask_store(
            ops,
            AwaitingStore::Data {
                answer,
                holds,
                all_held,
            },
        );
    }

    /// Asks the store to make `ops` durable; `then` goes on when it has. Releases that failed
    /// before are asked again first.
    pub(super) fn ask_store(&mut self, ops: Vec<StoreOp>, then: AwaitingStore) {
        if !self.release_retry.is_empty() {
            let ids = std::mem::take(&mut self.release_retry);
            self.ask_store_once(
                ids.iter().map(|&id| StoreOp::Release(id)).collect(),
                AwaitingStore::Release(ids),
            );
        }
        self.ask_store_once(ops, then);
    }

    fn ask_store_once(&mut self, ops: Vec<StoreOp>, then: AwaitingStore) {
        let token = self.next_store_token;
        self.next_store_token += 1;
        self.awaiting_store.insert(token, then);
        self.actions
            .push_back(Action::Store(StoreRequest { token, ops }));
    }

    /// The stored message `stored` (if any) is settled: delivered, refused or expired.
    pub(super) fn release(&mut self, stored: Option<HoldId>) {
        if let Some(id) = stored {
            self.ask_store(vec![StoreOp::Release(id)], AwaitingStore::Release(vec![id]));
        }
    }

    /// A delivery of stored data did not complete (the recipient's channel went away, or the
    /// session refused the MSG): it waits for the endpoint again, for the time it had left,
    /// and keeps its record.
    pub(super) fn hold_again(&mut self, report: Option<Report>, stored: Stored) {
        let hold = stored.hold();
        let Stored {
            id,
            recipient,
            payload,
            ..
        } = stored;
        self.as_own(|relay| relay.deliver_to(&recipient, payload, report, hold, Some(id)));
    }

    /// The store answered the request with this token.
    pub fn store_done(&mut self, done: StoreDone) {
        self.routes_may_change();
        let Some(waiting) = self.awaiting_store.remove(&done.token) else {
            return;
        };
        match waiting {
            AwaitingStore::Data {
                answer,
                holds,
                all_held,
            } => self.holds_stored(answer, holds, all_held, done.result),
            AwaitingStore::Service { from, then } => {
                let outcome = match done.result {
                    Ok(mut outcomes) if !outcomes.is_empty() => Ok(outcomes.swap_remove(0)),
                    Ok(_) => Err(StoreFailure("no outcome".into())),
                    Err(failure) => Err(failure),
                };
                self.service_goes_on(&from, then, outcome);
            }
            AwaitingStore::Release(ids) => {
                if let Err(failure) = done.result {
                    tracing::warn!(%failure, records = ids.len(), "releasing held data failed; asked again with the next change");
                    self.release_retry.extend(ids);
                }
            }
        }
    }

    /// The store decided a service's change (or could not): the service at `from` answers.
    pub(super) fn service_goes_on(
        &mut self,
        from: &Endpoint,
        then: Continuation,
        outcome: Result<Outcome, StoreFailure>,
    ) {
        let mut out = Vec::new();
        self.services.stored(then, outcome, &mut out);
        self.send_all_from_service(from, out);
    }

    fn holds_stored(
        &mut self,
        answer: Option<(ConnId, u32, u32)>,
        holds: Vec<PersistHold>,
        all_held: bool,
        result: Result<Vec<Outcome>, StoreFailure>,
    ) {
        let mut outcomes = match result {
            Ok(outcomes) => outcomes.into_iter(),
            Err(failure) => {
                tracing::warn!(%failure, "data to hold could not be stored");
                Vec::new().into_iter()
            }
        };
        let mut failed = false;
        for hold in holds {
            let id = match outcomes.next() {
                Some(Outcome::Held(id)) => id,
                // No record (a failed batch, or an answer that does not fit): not held.
                _ => {
                    failed = true;
                    if hold.home.is_none() {
                        self.uncount_held(hold.originator.as_ref(), hold.payload.len());
                    }
                    // With other recipients the data was accepted: each held one is reported.
                    if !all_held {
                        self.report(hold.report, code::LOCAL_ERROR, error::STORE_FAILED);
                    }
                    continue;
                }
            };
            let PersistHold {
                recipient,
                originator,
                payload,
                report,
                hold,
                home,
            } = hold;
            match home {
                Some(home) => self.actions.push_back(Action::ToShard {
                    shard: home,
                    envelope: Envelope::DeliverHome {
                        recipient,
                        payload,
                        report,
                        hold,
                        stored: Some(id),
                        source: None,
                    },
                }),
                None => {
                    // Counted when it was stored: counted again by `hold`.
                    self.uncount_held(originator.as_ref(), payload.len());
                    // The endpoint may have attached while its data was being stored.
                    self.as_own(|relay| {
                        relay.deliver_to(&recipient, payload, report, hold, Some(id))
                    });
                }
            }
        }
        if let Some((conn, channel, msgno)) = answer {
            let result = if failed && all_held {
                Err(ApexError::StoreFailed)
            } else {
                Ok(())
            };
            if result.is_ok() {
                self.stats.data_accepted += 1;
            }
            self.reply_later(conn, channel, msgno, result);
        }
    }

    /// Answers a MSG whose session is not at hand (the answer waited for the store). Replies
    /// on a channel still go out in order: the session holds later ones back (BEEP-35).
    fn reply_later(
        &mut self,
        conn: ConnId,
        channel: u32,
        msgno: u32,
        result: Result<(), ApexError>,
    ) {
        let answering = self.answering_directly.take();
        self.answer(conn, channel, Answer::Msg(msgno), result);
        self.answering_directly = answering;
    }

    /// Data the store kept from before a restart: held here again (this is the recipient's
    /// home shard), each for the time it may still wait.
    pub fn restore_held(&mut self, held: Vec<(HoldId, HeldMessage)>) {
        self.routes_may_change();
        for (id, message) in held {
            let hold = match message.remaining_ms {
                Some(ms) => Hold::Until(self.now_ms.saturating_add(ms)),
                None => Hold::Indefinitely,
            };
            let report = message.report.map(Box::new);
            self.deliver_to(&message.recipient, message.payload, report, hold, Some(id));
        }
    }
}
