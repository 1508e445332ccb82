//! What the relay keeps in the store and how it waits for it (see [`crate::store`]): data
//! held for an endpoint that is not attached is stored before the data is acknowledged
//! (RFC 3342 §3: the relay accepted it, so a restart must not lose it) and released once its
//! fate is settled; a service's change (the access service's `set`) is answered once durable.
//! Nothing here blocks: the relay asks with [`Action::Store`] and carries on where
//! [`Relay::store_done`] says.

use super::*;
use crate::apex::service::Continuation;
use crate::store::{HeldMessage, Outcome};

/// Data for a recipient that is not attached, to store before it is held (or handed to the
/// recipient's home shard, which holds it).
#[derive(Debug)]
pub(super) struct PersistHold {
    recipient: Endpoint,
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
}

impl Relay {
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
        if home.is_none() {
            if !self
                .config
                .hold
                .admits(self.held_messages, self.held_bytes, payload.len())
            {
                return self.report(report, code::ACTION_NOT_TAKEN, "hold queue is full");
            }
            // Counted from now, so that data stored meanwhile cannot overfill the queue.
            self.held_messages += 1;
            self.held_bytes += payload.len();
        }
        self.persisting.push(PersistHold {
            recipient: recipient.clone(),
            payload,
            report,
            hold,
            home,
        });
    }

    /// Asks the store to keep what [`Relay::persist_hold`] collected; `answer` is the MSG to
    /// acknowledge once it is (acknowledged now when nothing was collected).
    /// `recipients`: how many the data had.
    pub(super) fn store_holds(&mut self, answer: Option<(ConnId, u32, u32)>, recipients: usize) {
        if self.persisting.is_empty() {
            if let Some((conn, channel, msgno)) = answer {
                self.answer(conn, channel, Answer::Msg(msgno), Ok(()));
            }
            return;
        }
        let holds = std::mem::take(&mut self.persisting);
        let ops = holds
            .iter()
            .map(|h| {
                StoreOp::Hold(HeldMessage {
                    recipient: h.recipient.clone(),
                    payload: h.payload.clone(),
                    report: h.report.as_deref().cloned(),
                    remaining_ms: match h.hold {
                        Hold::Until(at) => Some(at.saturating_sub(self.now_ms)),
                        Hold::No | Hold::Indefinitely => None,
                    },
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

    /// Asks the store to make `ops` durable; `then` goes on when it has.
    pub(super) fn ask_store(&mut self, ops: Vec<StoreOp>, then: AwaitingStore) {
        let token = self.next_store_token;
        self.next_store_token += 1;
        self.awaiting_store.insert(token, then);
        self.actions
            .push_back(Action::Store(StoreRequest { token, ops }));
    }

    /// The stored message `stored` (if any) is settled: delivered, refused, expired or given
    /// up. Nobody waits for its release.
    pub(super) fn release(&mut self, stored: Option<HoldId>) {
        if let Some(id) = stored {
            self.actions.push_back(Action::Store(StoreRequest {
                token: 0,
                ops: vec![StoreOp::Release(id)],
            }));
        }
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
                    Ok(_) => Err(crate::store::StoreFailure("no outcome".into())),
                    Err(failure) => Err(failure),
                };
                let mut out = Vec::new();
                self.services.stored(then, outcome, &mut out);
                for outgoing in out {
                    self.send_from_service(&from, outgoing);
                }
            }
        }
    }

    fn holds_stored(
        &mut self,
        answer: Option<(ConnId, u32, u32)>,
        holds: Vec<PersistHold>,
        all_held: bool,
        result: Result<Vec<Outcome>, crate::store::StoreFailure>,
    ) {
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(failure) => {
                tracing::warn!(%failure, "data to hold could not be stored");
                for hold in holds {
                    if hold.home.is_none() {
                        self.held_messages -= 1;
                        self.held_bytes -= hold.payload.len();
                    }
                    // With other recipients the data was accepted: each held one is reported.
                    if !all_held {
                        self.report(hold.report, code::LOCAL_ERROR, error::STORE_FAILED);
                    }
                }
                if let Some((conn, channel, msgno)) = answer {
                    let result = if all_held {
                        Err(ApexError::StoreFailed)
                    } else {
                        Ok(())
                    };
                    self.reply_later(conn, channel, msgno, result);
                }
                return;
            }
        };
        for (hold, outcome) in holds.into_iter().zip(outcomes) {
            let Outcome::Held(id) = outcome else {
                continue;
            };
            match hold.home {
                Some(home) => self.actions.push_back(Action::ToShard {
                    shard: home,
                    envelope: Envelope::DeliverHome {
                        recipient: hold.recipient,
                        payload: hold.payload,
                        report: hold.report,
                        hold: hold.hold,
                        stored: Some(id),
                        source: None,
                    },
                }),
                None => {
                    // Counted when it was stored: counted again by `hold`.
                    self.held_messages -= 1;
                    self.held_bytes -= hold.payload.len();
                    let deadline = match hold.hold {
                        Hold::Until(at) => Some(at),
                        Hold::No | Hold::Indefinitely => None,
                    };
                    self.hold(
                        &hold.recipient,
                        hold.payload,
                        hold.report,
                        deadline,
                        Some(id),
                    );
                }
            }
        }
        if let Some((conn, channel, msgno)) = answer {
            self.reply_later(conn, channel, msgno, Ok(()));
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
            let deadline = message
                .remaining_ms
                .map(|ms| self.now_ms.saturating_add(ms));
            let report = message.report.map(Box::new);
            match self.route_of(&message.recipient) {
                Route::Channel(at) => self.deliver_at(at, message.payload, report, Some(id)),
                _ => self.hold(
                    &message.recipient,
                    message.payload,
                    report,
                    deadline,
                    Some(id),
                ),
            }
        }
    }
}
