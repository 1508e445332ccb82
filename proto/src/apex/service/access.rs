//! The access service `apex=access` (RFC 3341 §4, ACC-01, ACC-10..15): `query`, `get` and
//! `set` on the access entries of this relay's domain, answered as data from
//! `apex=access@DOMAIN` carrying `allow`, `deny`, `set` or `reply`; and the notification of
//! the owner (a `set`) on every change.
//!
//! `query` and `get` are answered from the access table in force (the store's in-memory
//! copy). A `set` is checked here (553, 550, 537, syntax) and then decided by the store
//! (`lastUpdate`, ACC-13), which is one place for every shard: the relay asks the store,
//! and the service answers once the change is durable ([`AccessService::stored`]).
//! Whether the originator may use the service at all is each operation's own token
//! (`access:query`, `access:get`, `access:set` on the subject), not `core:data`.

use bytes::Bytes;

use super::{Continuation, Outgoing, Refused, Service, ServiceContext};
use crate::apex::access::{AccessEntry, Action, ActorPattern};
use crate::apex::access_ops::{
    carried_element, element_data, format_answer, parse_request, service_endpoint, AccessAnswer,
    AccessElement, AccessRequest,
};
use crate::apex::addr::{self, Endpoint};
use crate::apex::msg::{self, apex_code, ApexLimits, Operation};
use crate::apex::timestamp::Timestamp;
use crate::beep::mgmt::code;
use crate::store::{AccessChange, AccessWritten, Outcome, StoreFailure, StoreOp};

/// A `set` the store is deciding: whom to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetPending {
    originator: Endpoint,
    trans_id: u32,
}

/// The access service of one domain.
#[derive(Debug)]
pub struct AccessService {
    domain: String,
    /// `apex=access@DOMAIN` (`None` only for a domain no endpoint can have).
    endpoint: Option<Endpoint>,
}

impl AccessService {
    /// The access service of `domain`.
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.to_owned(),
            endpoint: Endpoint::parse(&service_endpoint(domain)).ok(),
        }
    }

    /// The service's endpoint, the originator of what it sends.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    /// A data from the service to `to` carrying `answer`.
    fn send(&self, to: &Endpoint, answer: &AccessAnswer, out: &mut Vec<Outgoing>) {
        let Some(from) = &self.endpoint else { return };
        out.push(Outgoing {
            recipient: to.clone(),
            payload: element_data(from.as_str(), to.as_str(), &format_answer(answer)),
        });
    }

    fn reply(&self, to: &Endpoint, trans_id: u32, code: u16, text: &str, out: &mut Vec<Outgoing>) {
        let answer = AccessAnswer::Reply {
            code,
            trans_id,
            text: text.to_owned(),
        };
        self.send(to, &answer, out);
    }

    /// Steps 1-3 of every operation (RFC 3341 §4.2-4.4): the subject is of this domain (553),
    /// a valid address (550), and the originator holds `token` on it (537).
    fn subject(
        &self,
        owner: &str,
        originator: &Endpoint,
        token: &Action,
        ctx: &ServiceContext<'_>,
    ) -> Result<Endpoint, (u16, &'static str)> {
        let domain = owner.rsplit_once('@').map(|(_, d)| d);
        if let Some(domain) = domain {
            if !addr::domains_equal(domain, &self.domain) {
                return Err((code::PARAMETER_INVALID, "the owner is not in this domain"));
            }
        }
        let owner = Endpoint::parse(owner)
            .map_err(|_| (code::ACTION_NOT_TAKEN, "the owner is not a valid address"))?;
        if !ctx.access.allows_action(&owner, originator, token) {
            return Err((apex_code::NOT_AUTHORIZED, "not authorized for this owner"));
        }
        Ok(owner)
    }

    fn handle(&self, originator: &Endpoint, request: AccessRequest, ctx: &mut ServiceContext<'_>) {
        match request {
            AccessRequest::Query {
                owner,
                actor,
                actions,
                trans_id,
            } => {
                let owner = match self.subject(&owner, originator, &Action::ACCESS_QUERY, ctx) {
                    Ok(owner) => owner,
                    Err((code, text)) => {
                        return self.reply(originator, trans_id, code, text, ctx.out)
                    }
                };
                // The query's actor is an address, never a pattern (ACC-07).
                let Ok(actor) = Endpoint::parse(&actor) else {
                    let text = "the actor is not a valid address";
                    return self.reply(originator, trans_id, code::PARAMETER_ERROR, text, ctx.out);
                };
                let answer = if ctx.access.allows_all(&owner, &actor, &actions) {
                    AccessAnswer::Allow { trans_id }
                } else {
                    AccessAnswer::Deny { trans_id }
                };
                self.send(originator, &answer, ctx.out);
            }
            AccessRequest::Get {
                owner,
                actor,
                trans_id,
            } => {
                let owner = match self.subject(&owner, originator, &Action::ACCESS_GET, ctx) {
                    Ok(owner) => owner,
                    Err((code, text)) => {
                        return self.reply(originator, trans_id, code, text, ctx.out)
                    }
                };
                let Ok(actor) = ActorPattern::parse(&actor) else {
                    let text = "the actor is not a valid actor pattern";
                    return self.reply(originator, trans_id, code::PARAMETER_ERROR, text, ctx.out);
                };
                // Literally that actor (ACC-10); defaults and configured grants are not stored
                // entries.
                match ctx.access.entry(&owner, &actor) {
                    Some(entry) => {
                        let answer = AccessAnswer::Set {
                            trans_id,
                            access: element(entry),
                        };
                        self.send(originator, &answer, ctx.out);
                    }
                    None => {
                        let text = "no entry with that actor";
                        self.reply(originator, trans_id, apex_code::NO_ENTRY, text, ctx.out)
                    }
                }
            }
            AccessRequest::Set { trans_id, access } => {
                let owner = match self.subject(&access.owner, originator, &Action::ACCESS_SET, ctx)
                {
                    Ok(owner) => owner,
                    Err((code, text)) => {
                        return self.reply(originator, trans_id, code, text, ctx.out)
                    }
                };
                let Ok(actor) = ActorPattern::parse(&access.actor) else {
                    let text = "the actor is not a valid actor pattern";
                    return self.reply(originator, trans_id, code::PARAMETER_ERROR, text, ctx.out);
                };
                let expect = match access.last_update.as_deref().map(Timestamp::parse) {
                    None => None,
                    Some(Ok(at)) => Some(at),
                    Some(Err(_)) => {
                        let text = "lastUpdate is not an RFC 3339 date-time";
                        return self.reply(
                            originator,
                            trans_id,
                            code::PARAMETER_ERROR,
                            text,
                            ctx.out,
                        );
                    }
                };
                ctx.store = Some((
                    StoreOp::SetAccess(AccessChange {
                        owner,
                        actor,
                        actions: access.actions,
                        expect,
                    }),
                    Continuation::AccessSet(SetPending {
                        originator: originator.clone(),
                        trans_id,
                    }),
                ));
            }
        }
    }

    /// The store decided a `set` (RFC 3341 §4.4 steps 5-9, ACC-13, ACC-14): 250 to the
    /// originator and the new state of the entry to its owner, or why nothing changed.
    pub fn stored(
        &self,
        pending: SetPending,
        outcome: Result<Outcome, StoreFailure>,
        out: &mut Vec<Outgoing>,
    ) {
        let SetPending {
            originator,
            trans_id,
        } = pending;
        let (owner, notice) = match outcome {
            Ok(Outcome::Access(Ok(AccessWritten::Written(entry)))) => {
                (entry.owner.clone(), element(&entry))
            }
            Ok(Outcome::Access(Ok(AccessWritten::Deleted { owner, actor }))) => {
                let notice = AccessElement {
                    owner: owner.to_string(),
                    actor: actor.to_string(),
                    actions: None,
                    last_update: None,
                };
                (owner, notice)
            }
            Ok(Outcome::Access(Err(refused))) => {
                return self.reply(&originator, trans_id, refused.code(), refused.text(), out)
            }
            Ok(_) | Err(_) => {
                let text = "the relay could not store the change";
                return self.reply(&originator, trans_id, code::LOCAL_ERROR, text, out);
            }
        };
        self.reply(&originator, trans_id, apex_code::SUCCESS, "", out);
        // The owner learns of every change, with the transID of the request that made it.
        let answer = AccessAnswer::Set {
            trans_id,
            access: notice,
        };
        self.send(&owner, &answer, out);
    }
}

/// An entry as an `access` element (the actor in its escaped form, ACC-07).
fn element(entry: &AccessEntry) -> AccessElement {
    AccessElement {
        owner: entry.owner.to_string(),
        actor: entry.actor.to_string(),
        actions: Some(entry.actions.clone()),
        last_update: entry.last_update.clone(),
    }
}

impl Service for AccessService {
    fn address(&self) -> &'static str {
        "apex=access"
    }

    fn receive(
        &mut self,
        originator: &Endpoint,
        payload: &Bytes,
        ctx: &mut ServiceContext<'_>,
    ) -> Result<(), Refused> {
        let not_for_us = Refused {
            code: code::SYNTAX_ERROR,
            text: "the access service takes a query, get or set element as inline content",
        };
        // What this service sends its own endpoint (the notice of a change to an entry it
        // owns) is not a request: taken and dropped, or it would change the entry again.
        if self.endpoint.as_ref().is_some_and(|me| {
            me.address() == originator.address() && me.same_domain(originator.domain())
        }) {
            return Ok(());
        }
        let Ok(Operation::Data(data)) = msg::parse_message(payload, &ApexLimits::default()) else {
            return Err(not_for_us);
        };
        let Some(element) = carried_element(&data) else {
            return Err(not_for_us);
        };
        match parse_request(&element) {
            Ok(request) => {
                self.handle(originator, request, ctx);
                Ok(())
            }
            Err(error) => match error.trans_id {
                // With a transID the answer says what was wrong (ACC-15).
                Some(trans_id) => {
                    self.reply(originator, trans_id, error.code, &error.text, ctx.out);
                    Ok(())
                }
                None => Err(not_for_us),
            },
        }
    }
}
