//! Load on the access service `apex=access@DOMAIN` (RFC 3341): the bookkeeping of a setter,
//! an endpoint that changes its own access entries with `set` as fast as asked.
//!
//! A setter `OWNER` keeps entries for at most [`MAX_ACTORS`] actors `a{k}@DOMAIN` (under the
//! relay's default limit of 256 entries per owner), and takes them in turn:
//!
//! ```text
//!   actor k:  Absent ──create (no lastUpdate)──►  reply 250 + owner notice `set` ──► Known(lu)
//!             Known(lu) ──replace (lastUpdate lu)──► reply 250 + owner notice ──► Known(lu')
//!             Unknown ──get──► `set` answer ──► Known(lu)  |  reply 551 ──► Absent
//!   any set answered other than 250 (555 stale, 554 full, ...) ──► Unknown (read it again)
//! ```
//!
//! A set is done when its `reply` arrives (RFC 3341 §4.4). The owner notice (a `set` with the
//! same transID, sent because the setter owns the entry) carries the entry's new `lastUpdate`,
//! which the next replace of that actor needs; an actor is taken again only once both arrived
//! (or the notice is overdue, [`NOTICE_WAIT`]: then the entry is read back with `get`).
//!
//! Sans-IO: requests out as [`AccessRequest`]s, answers in as [`AccessAnswer`]s, times in
//! nanoseconds of the run's clock.

use std::collections::{BTreeMap, HashMap};

use apex_proto::apex::access::Action;
use apex_proto::apex::access_ops::{AccessAnswer, AccessElement, AccessRequest};
use serde::Serialize;

use crate::stats::LatencySummary;

/// Actors per owner: under the relay's default `max_entries_per_owner` (256).
pub(crate) const MAX_ACTORS: usize = 200;

/// How long after its 250 reply a set's owner notice may take before the entry is read back.
pub(crate) const NOTICE_WAIT_NS: u64 = 1_000_000_000;

/// The reply code of a set that succeeded (RFC 3341 §4.4).
pub(crate) const SET_OK: u16 = 250;

/// The reply code of a set whose lastUpdate does not match the entry's, or that creates an
/// entry that exists (RFC 3341 §4.4 steps 5 and 7).
const STALE: u16 = 555;

/// The reply code of a get that found no entry (RFC 3341 §4.3 step 5).
const NO_ENTRY: u16 = 551;

/// Largest transaction identifier (RFC 3340 §6.1.1: 1..=2^31-1).
const MAX_TRANS_ID: u32 = 2_147_483_647;

/// What the setter believes about one actor's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// No entry: the next set creates it (no lastUpdate).
    Absent,
    /// The entry exists with this lastUpdate: the next set replaces it.
    Known(String),
    /// Not known (a set failed, a notice was missed): read it with `get` first.
    Unknown,
}

/// What a request in progress is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A `set` (counted as load); `create` when sent without lastUpdate.
    Set { create: bool },
    /// A `get` to learn an entry's lastUpdate (not counted as a set).
    Get,
}

/// A request sent and not yet settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    actor: usize,
    kind: Kind,
    /// When it was sent (or due, open loop), ns.
    sent_ns: u64,
    /// When its 250 reply arrived (a set then waits for its owner notice).
    replied_ns: Option<u64>,
    /// The owner notice arrived (possibly before the reply).
    noticed: bool,
}

/// What an answer from the service meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answered {
    /// The reply to a set: its code and latency (ns). `existed`: a create answered 555, the
    /// entry was there already (a store kept from an earlier run); it is read back and replaced.
    Set {
        code: u16,
        latency_ns: u64,
        existed: bool,
    },
    /// The answer to a get, or an owner notice: bookkeeping only.
    Other,
    /// An answer with a transID no request in progress has (a late notice, say).
    Stray,
}

/// The setter's state: its actors, the requests in progress and the transIDs.
#[derive(Debug)]
pub(crate) struct SetBook {
    owner: String,
    actor_names: Vec<String>,
    entries: Vec<Entry>,
    /// Per actor: the transID of its request in progress.
    busy: Vec<Option<u32>>,
    pending: HashMap<u32, Pending>,
    /// Requests without their reply yet (the in-flight count).
    awaiting_reply: usize,
    next_trans_id: u32,
    /// Where the search for an idle actor starts.
    cursor: usize,
    /// Per actor: sets sent for it (alternates its actions, so each replace changes it).
    sets_sent: Vec<u64>,
    actions: [Vec<Action>; 2],
}

impl SetBook {
    /// A setter `owner` (`setter@DOMAIN`) whose actors are `a0@domain` .. `a{actors-1}@domain`,
    /// believed absent (a fresh store). `actors` is capped at [`MAX_ACTORS`].
    pub(crate) fn new(owner: &str, domain: &str, actors: usize) -> Self {
        let actors = actors.clamp(1, MAX_ACTORS);
        Self {
            owner: owner.to_owned(),
            actor_names: (0..actors).map(|k| format!("a{k}@{domain}")).collect(),
            entries: vec![Entry::Absent; actors],
            busy: vec![None; actors],
            pending: HashMap::new(),
            awaiting_reply: 0,
            next_trans_id: 1,
            cursor: 0,
            sets_sent: vec![0; actors],
            actions: [
                vec![Action::CORE_DATA],
                vec![Action::CORE_DATA, Action::PRESENCE_SUBSCRIBE],
            ],
        }
    }

    /// Requests sent whose reply has not arrived.
    pub(crate) fn in_flight(&self) -> usize {
        self.awaiting_reply
    }

    /// Nothing in progress: no reply and no owner notice awaited.
    pub(crate) fn settled(&self) -> bool {
        self.pending.is_empty()
    }

    fn trans_id(&mut self) -> u32 {
        loop {
            let id = self.next_trans_id;
            self.next_trans_id = if id >= MAX_TRANS_ID { 1 } else { id + 1 };
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// The next request, sent at `now_ns`: a set for the next idle actor (create or replace),
    /// or a get when its entry is unknown. `None` when every actor has a request in progress.
    /// The second value is true for a set.
    pub(crate) fn next_request(&mut self, now_ns: u64) -> Option<(AccessRequest, bool)> {
        let n = self.busy.len();
        let actor = (0..n)
            .map(|i| (self.cursor + i) % n)
            .find(|&k| self.busy[k].is_none())?;
        self.cursor = (actor + 1) % n;
        let trans_id = self.trans_id();
        let name = self.actor_names[actor].clone();
        let (request, kind) = match &self.entries[actor] {
            Entry::Unknown => (
                AccessRequest::Get {
                    owner: self.owner.clone(),
                    actor: name,
                    trans_id,
                },
                Kind::Get,
            ),
            entry => {
                let last_update = match entry {
                    Entry::Known(lu) => Some(lu.clone()),
                    _ => None,
                };
                let create = last_update.is_none();
                let actions = self.actions[(self.sets_sent[actor] % 2) as usize].clone();
                self.sets_sent[actor] += 1;
                (
                    AccessRequest::Set {
                        trans_id,
                        access: AccessElement {
                            owner: self.owner.clone(),
                            actor: name,
                            actions: Some(actions),
                            last_update,
                        },
                    },
                    Kind::Set { create },
                )
            }
        };
        self.busy[actor] = Some(trans_id);
        self.pending.insert(
            trans_id,
            Pending {
                actor,
                kind,
                sent_ns: now_ns,
                replied_ns: None,
                noticed: false,
            },
        );
        self.awaiting_reply += 1;
        Some((request, matches!(kind, Kind::Set { .. })))
    }

    /// Ends request `trans_id`, freeing its actor.
    fn finish(&mut self, trans_id: u32) {
        if let Some(p) = self.pending.remove(&trans_id) {
            if p.replied_ns.is_none() {
                self.awaiting_reply -= 1;
            }
            if self.busy[p.actor] == Some(trans_id) {
                self.busy[p.actor] = None;
            }
        }
    }

    /// The relay refused the data carrying request `trans_id` (an ERR): the service never saw
    /// it, so the entry is as it was. Returns whether it was a set.
    pub(crate) fn refused(&mut self, trans_id: u32) -> bool {
        let was_set = matches!(
            self.pending.get(&trans_id).map(|p| p.kind),
            Some(Kind::Set { .. })
        );
        self.finish(trans_id);
        was_set
    }

    /// An answer from the service, received at `now_ns`.
    pub(crate) fn on_answer(&mut self, answer: &AccessAnswer, now_ns: u64) -> Answered {
        let trans_id = answer.trans_id();
        let Some(p) = self.pending.get(&trans_id).copied() else {
            return Answered::Stray;
        };
        match (p.kind, answer) {
            (Kind::Set { create }, AccessAnswer::Reply { code, .. }) if p.replied_ns.is_none() => {
                let latency_ns = now_ns.saturating_sub(p.sent_ns);
                if *code == SET_OK && !p.noticed {
                    // Wait for the owner notice and its lastUpdate.
                    self.awaiting_reply -= 1;
                    if let Some(p) = self.pending.get_mut(&trans_id) {
                        p.replied_ns = Some(now_ns);
                    }
                } else {
                    if *code != SET_OK {
                        // 555 (stale or unexpected lastUpdate), 554 (full), ...: read it back.
                        self.entries[p.actor] = Entry::Unknown;
                    }
                    self.finish(trans_id);
                }
                Answered::Set {
                    code: *code,
                    latency_ns,
                    existed: create && *code == STALE,
                }
            }
            (Kind::Set { .. }, AccessAnswer::Set { access, .. })
                if !p.noticed && access.owner == self.owner =>
            {
                self.entries[p.actor] = entry_after(access);
                if p.replied_ns.is_some() {
                    self.finish(trans_id);
                } else if let Some(p) = self.pending.get_mut(&trans_id) {
                    p.noticed = true;
                }
                Answered::Other
            }
            (Kind::Get, AccessAnswer::Set { access, .. }) => {
                self.entries[p.actor] = entry_after(access);
                self.finish(trans_id);
                Answered::Other
            }
            (Kind::Get, AccessAnswer::Reply { code, .. }) => {
                if *code == NO_ENTRY {
                    self.entries[p.actor] = Entry::Absent;
                }
                self.finish(trans_id);
                Answered::Other
            }
            _ => Answered::Stray,
        }
    }

    /// Sets answered 250 whose owner notice is overdue at `now_ns`: their entries are read
    /// back. Returns how many.
    pub(crate) fn expire(&mut self, now_ns: u64) -> usize {
        let overdue: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.replied_ns
                    .is_some_and(|at| now_ns.saturating_sub(at) >= NOTICE_WAIT_NS)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in &overdue {
            if let Some(p) = self.pending.get(id) {
                self.entries[p.actor] = Entry::Unknown;
            }
            self.finish(*id);
        }
        overdue.len()
    }
}

/// The entry as an owner notice or a get answer describes it: deleted when it has no actions,
/// else known with its lastUpdate (unknown if it has none).
fn entry_after(access: &AccessElement) -> Entry {
    match (&access.actions, &access.last_update) {
        (None, _) => Entry::Absent,
        (Some(_), Some(lu)) => Entry::Known(lu.clone()),
        (Some(_), None) => Entry::Unknown,
    }
}

/// What the setters did, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SetReport {
    /// Setter connections.
    pub(crate) connections: usize,
    /// Most requests in flight per connection.
    pub(crate) depth: usize,
    /// Sets per second asked for in total (open loop); `None`: as fast as `depth` allows.
    pub(crate) rate: Option<f64>,
    /// Sets sent over the whole run.
    pub(crate) sent: u64,
    /// Sets answered 250 over the whole run.
    pub(crate) ok: u64,
    /// Sets answered with another code (per code in `codes`), except `existed`.
    pub(crate) failed: u64,
    /// Creates answered 555 because the entry existed already (a store kept from an earlier
    /// run against the same relay): read back and replaced, not a failure.
    pub(crate) existed: u64,
    /// Sets whose data the relay refused (ERR), never seen by the service.
    pub(crate) refused: u64,
    /// Replies per code.
    pub(crate) codes: BTreeMap<u16, u64>,
    /// Sets answered 250 in the measured window.
    pub(crate) ok_in_window: u64,
    /// Sets answered 250 per second in the measured window.
    pub(crate) sets_per_sec: f64,
    /// Time from sending a set (its due time, open loop) to its reply, in microseconds
    /// (250 replies in the measured window).
    pub(crate) latency_us: LatencySummary,
    /// Gets sent to read back an entry whose lastUpdate was not known.
    pub(crate) gets: u64,
    /// Owner notices that arrived past their wait, and other answers matching no request.
    pub(crate) stray: u64,
    /// Sets still unanswered at the end.
    pub(crate) unanswered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use apex_proto::apex::access_ops::{format_request, parse_answer, parse_request};

    const OWNER: &str = "setter@example.com";

    fn set_parts(request: &AccessRequest) -> (u32, &AccessElement) {
        match request {
            AccessRequest::Set { trans_id, access } => (*trans_id, access),
            other => panic!("not a set: {other:?}"),
        }
    }

    fn reply(code: u16, trans_id: u32) -> AccessAnswer {
        AccessAnswer::Reply {
            code,
            trans_id,
            text: String::new(),
        }
    }

    fn notice(trans_id: u32, actor: &str, actions: bool, lu: &str) -> AccessAnswer {
        AccessAnswer::Set {
            trans_id,
            access: AccessElement {
                owner: OWNER.into(),
                actor: actor.into(),
                actions: actions.then(|| vec![Action::CORE_DATA]),
                last_update: Some(lu.into()),
            },
        }
    }

    #[test]
    fn create_then_replace_with_the_noticed_last_update() {
        let mut book = SetBook::new(OWNER, "example.com", 2);
        let (r0, set) = book.next_request(100).unwrap();
        assert!(set);
        let (t0, a0) = set_parts(&r0);
        assert_eq!(a0.owner, OWNER);
        assert_eq!(a0.actor, "a0@example.com");
        assert_eq!(a0.last_update, None);
        // The request is what the service reads.
        assert_eq!(parse_request(format_request(&r0).as_bytes()).unwrap(), r0);
        let (r1, _) = book.next_request(150).unwrap();
        let (t1, a1) = set_parts(&r1);
        assert_eq!(a1.actor, "a1@example.com");
        assert_ne!(t0, t1);
        assert_eq!(book.in_flight(), 2);
        // Both actors busy: nothing more to send.
        assert!(book.next_request(160).is_none());

        // Reply first, then the notice.
        assert_eq!(
            book.on_answer(&reply(250, t0), 1_100),
            Answered::Set {
                code: 250,
                latency_ns: 1_000,
                existed: false
            }
        );
        assert_eq!(book.in_flight(), 1);
        assert!(!book.settled());
        // Still waiting for the notice: a0 is not taken again.
        assert!(book.next_request(1_200).is_none());
        let lu = "2026-12-06T10:00:00.000-00:00";
        assert_eq!(
            book.on_answer(&notice(t0, "a0@example.com", true, lu), 1_300),
            Answered::Other
        );
        let (r2, set) = book.next_request(1_400).unwrap();
        assert!(set);
        let (t2, a2) = set_parts(&r2);
        assert_eq!(a2.actor, "a0@example.com");
        assert_eq!(a2.last_update.as_deref(), Some(lu));
        // Replaces alternate their actions, so each changes the entry.
        assert_ne!(a2.actions, a0.actions);

        // Notice first, then the reply.
        let lu1 = "2026-12-06T10:00:00.001-00:00";
        book.on_answer(&notice(t1, "a1@example.com", true, lu1), 2_000);
        assert_eq!(book.in_flight(), 2);
        assert!(matches!(
            book.on_answer(&reply(250, t1), 2_050),
            Answered::Set { code: 250, .. }
        ));
        let (r3, _) = book.next_request(2_100).unwrap();
        assert_eq!(set_parts(&r3).1.last_update.as_deref(), Some(lu1));
        // A second reply to the same set is a stray.
        book.on_answer(&reply(250, t2), 3_000);
        assert_eq!(book.on_answer(&reply(250, t2), 3_001), Answered::Stray);
    }

    #[test]
    fn a_stale_set_is_read_back_with_get() {
        let mut book = SetBook::new(OWNER, "example.com", 1);
        let (r, _) = book.next_request(0).unwrap();
        let (t, _) = set_parts(&r);
        // The entry already existed (a store from an earlier run): 555.
        assert_eq!(
            book.on_answer(&reply(555, t), 10),
            Answered::Set {
                code: 555,
                latency_ns: 10,
                existed: true
            }
        );
        assert!(book.settled());
        let (get, set) = book.next_request(20).unwrap();
        assert!(!set);
        let AccessRequest::Get {
            owner,
            actor,
            trans_id,
        } = &get
        else {
            panic!("not a get: {get:?}");
        };
        assert_eq!((owner.as_str(), actor.as_str()), (OWNER, "a0@example.com"));
        let lu = "2026-12-06T10:00:00Z";
        assert_eq!(
            book.on_answer(&notice(*trans_id, "a0@example.com", true, lu), 30),
            Answered::Other
        );
        let (r, _) = book.next_request(40).unwrap();
        assert_eq!(set_parts(&r).1.last_update.as_deref(), Some(lu));
        // A replace answered 555 is a failure (someone else changed the entry), not an entry
        // found in an old store.
        assert_eq!(
            book.on_answer(&reply(555, r.trans_id()), 50),
            Answered::Set {
                code: 555,
                latency_ns: 10,
                existed: false
            }
        );
        let (get, set) = book.next_request(60).unwrap();
        assert!(!set && matches!(get, AccessRequest::Get { .. }));

        // A get that finds nothing (551): the next set creates.
        let mut book = SetBook::new(OWNER, "example.com", 1);
        let (r, _) = book.next_request(0).unwrap();
        book.on_answer(&reply(554, set_parts(&r).0), 1);
        let (get, _) = book.next_request(2).unwrap();
        book.on_answer(&reply(551, get.trans_id()), 3);
        let (r, set) = book.next_request(4).unwrap();
        assert!(set);
        assert_eq!(set_parts(&r).1.last_update, None);
    }

    #[test]
    fn a_deletion_notice_means_create_next() {
        let mut book = SetBook::new(OWNER, "example.com", 1);
        let (r, _) = book.next_request(0).unwrap();
        let t = set_parts(&r).0;
        book.on_answer(&reply(250, t), 1);
        book.on_answer(
            &notice(t, "a0@example.com", false, "2026-12-06T10:00:00Z"),
            2,
        );
        let (r, _) = book.next_request(3).unwrap();
        assert_eq!(set_parts(&r).1.last_update, None);
    }

    #[test]
    fn an_overdue_notice_frees_the_actor_for_a_get() {
        let mut book = SetBook::new(OWNER, "example.com", 1);
        let (r, _) = book.next_request(0).unwrap();
        let t = set_parts(&r).0;
        book.on_answer(&reply(250, t), 5);
        assert_eq!(book.expire(NOTICE_WAIT_NS), 0);
        assert_eq!(book.expire(NOTICE_WAIT_NS + 5), 1);
        assert!(book.settled());
        // The late notice matches nothing now.
        assert_eq!(
            book.on_answer(
                &notice(t, "a0@example.com", true, "2026-12-06T10:00:00Z"),
                6
            ),
            Answered::Stray
        );
        let (get, set) = book.next_request(7).unwrap();
        assert!(!set);
        assert!(matches!(get, AccessRequest::Get { .. }));
    }

    #[test]
    fn refused_and_foreign_answers() {
        let mut book = SetBook::new(OWNER, "example.com", 3);
        let (r, _) = book.next_request(0).unwrap();
        let t = set_parts(&r).0;
        assert!(book.refused(t));
        assert_eq!(book.in_flight(), 0);
        // Refused by the relay: the service never saw it, the entry is still absent.
        let (r, _) = book.next_request(1).unwrap();
        let (t, a) = set_parts(&r);
        assert_eq!(a.last_update, None);
        // A notice for another owner's entry, or an allow, is not ours.
        let mut other = notice(t, "a1@example.com", true, "2026-12-06T10:00:00Z");
        if let AccessAnswer::Set { access, .. } = &mut other {
            access.owner = "someone@example.com".into();
        }
        assert_eq!(book.on_answer(&other, 2), Answered::Stray);
        assert_eq!(
            book.on_answer(&AccessAnswer::Allow { trans_id: t }, 2),
            Answered::Stray
        );
        assert_eq!(book.on_answer(&reply(250, 999), 2), Answered::Stray);
        assert_eq!(book.in_flight(), 1);
    }

    #[test]
    fn trans_ids_wrap_and_skip_those_in_progress() {
        let mut book = SetBook::new(OWNER, "example.com", 3);
        book.next_trans_id = MAX_TRANS_ID;
        let (a, _) = book.next_request(0).unwrap();
        assert_eq!(a.trans_id(), MAX_TRANS_ID);
        let (b, _) = book.next_request(0).unwrap();
        assert_eq!(b.trans_id(), 1);
        book.next_trans_id = MAX_TRANS_ID;
        let (c, _) = book.next_request(0).unwrap();
        assert_eq!(c.trans_id(), 2);
    }

    #[test]
    fn actors_stay_under_the_per_owner_limit() {
        let mut book = SetBook::new(OWNER, "example.com", 10_000);
        let mut actors = std::collections::HashSet::new();
        for i in 0..1_000u64 {
            let (r, _) = book.next_request(i).unwrap();
            let (t, a) = set_parts(&r);
            actors.insert(a.actor.clone());
            book.on_answer(&reply(250, t), i);
            book.on_answer(
                &notice(t, &a.actor.clone(), true, "2026-12-06T10:00:00Z"),
                i,
            );
        }
        assert_eq!(actors.len(), MAX_ACTORS);
        // The answers the service sends parse back into what the book reads.
        let text = "<set transID='7'><access owner='setter@example.com' actor='a0@example.com' actions='core:data' lastUpdate='2026-12-06T10:00:00Z' /></set>";
        assert_eq!(
            parse_answer(text.as_bytes()).unwrap(),
            notice(7, "a0@example.com", true, "2026-12-06T10:00:00Z")
        );
    }
}
