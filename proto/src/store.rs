//! The relay's durable state as the core sees it: access entries (RFC 3341 §4, ACC-02) and
//! data held for endpoints that are not attached (hold4Endpoint, RFC 3342 §3).
//!
//! The core never waits on storage. It asks for changes with [`StoreRequest`]s (the shard
//! core's `Output::Store`) and learns their outcome from a [`StoreDone`]; it reads access
//! entries from an in-memory table the store keeps current and hands every shard
//! (`ShardCore::set_access`). What a change does is decided here, in [`StoreState::apply`], by
//! whoever applies it: the runtime's store thread (which also writes it to disk, see the root
//! crate's `store` module) and the in-memory harness alike. That is where `set`'s check of
//! `lastUpdate` (ACC-13) happens, in one place for every shard, so two shards changing one
//! entry at once cannot both win.
//!
//! [`Mutation`]s are what an applied operation changed, as key/value records
//! ([`Mutation::key`], [`Mutation::value`]) a key-value store persists and
//! [`StoreState::load`] reads back. Their encoding is versioned by [`FORMAT_VERSION`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use compact_str::CompactString;

use crate::apex::access::{
    format_actions, parse_actions, AccessEntry, AccessTable, Action, ActorPattern,
};
use crate::apex::addr::Endpoint;
use crate::apex::relay::ReportRequest;
use crate::apex::timestamp::Timestamp;

/// The version of the record encoding below. A store written by a later version is refused
/// rather than misread.
pub const FORMAT_VERSION: u32 = 1;

/// Identifies a held message in the store (assigned by [`StoreState::apply`]).
pub type HoldId = u64;

/// A batch of operations one shard asks to be made durable, in order. `token` comes back in
/// the [`StoreDone`]; 0 means nobody waits for the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    /// Echoed in the answer.
    pub token: u64,
    /// The operations, applied in order.
    pub ops: Vec<StoreOp>,
}

/// The answer to a [`StoreRequest`]: once it is given, everything in `result` is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDone {
    /// The request's token.
    pub token: u64,
    /// One outcome per operation, in order; or why none of them was made durable.
    pub result: Result<Vec<Outcome>, StoreFailure>,
}

/// Why a batch could not be made durable (a full disk, an I/O error): nothing of it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreFailure(pub String);

/// One change to the durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// The access service's `set` (RFC 3341 §4.4): create, replace or delete one entry,
    /// checked against the `lastUpdate` the client had.
    SetAccess(AccessChange),
    /// Keep a message for an endpoint that is not attached.
    Hold(HeldMessage),
    /// The held message was delivered (its recipient said `ok`), expired or given up.
    Release(HoldId),
}

/// An access `set`: the `access` element, parsed (RFC 3341 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessChange {
    /// The entry's owner.
    pub owner: Endpoint,
    /// The entry's actor, literally (ACC-10).
    pub actor: ActorPattern,
    /// The new actions; `None` deletes the entry.
    pub actions: Option<Vec<Action>>,
    /// The `lastUpdate` the client read (`None`: it expects no entry).
    pub expect: Option<Timestamp>,
}

/// A message held for `recipient`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldMessage {
    /// Who it waits for.
    pub recipient: Endpoint,
    /// The whole `data` message, as it will be delivered.
    pub payload: Bytes,
    /// The statusRequest to answer once its fate is known.
    pub report: Option<ReportRequest>,
    /// How much longer it may wait, in milliseconds (`None`: no bound). Stored as an instant.
    pub remaining_ms: Option<u64>,
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// What a [`StoreOp::SetAccess`] did, or why it was refused.
    Access(Result<AccessWritten, SetRefused>),
    /// The message is held under this id.
    Held(HoldId),
    /// The message is gone (also when it was already).
    Released,
}

/// An access entry as a `set` left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessWritten {
    /// Created or replaced; `last_update` is the new `lastUpdate`.
    Written(AccessEntry),
    /// Deleted.
    Deleted {
        /// Owner.
        owner: Endpoint,
        /// Actor.
        actor: ActorPattern,
    },
}

/// Why a `set` changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetRefused {
    /// A `lastUpdate` was given but there is no entry, or there is an entry but no `lastUpdate`
    /// was given or it is not the entry's (ACC-13): 555.
    Stale,
    /// A delete of an entry that does not exist: 551.
    NoEntry,
    /// The owner (or the relay) has as many entries as it may: 554.
    TooMany,
}

impl SetRefused {
    /// The reply code (RFC 3341 §4.5).
    pub fn code(self) -> u16 {
        match self {
            SetRefused::Stale => 555,
            SetRefused::NoEntry => 551,
            SetRefused::TooMany => 554,
        }
    }

    /// The reply's text.
    pub fn text(self) -> &'static str {
        match self {
            SetRefused::Stale => "lastUpdate does not match the entry",
            SetRefused::NoEntry => "no entry with that actor",
            SetRefused::TooMany => "too many access entries",
        }
    }
}

/// Bounds on the stored access entries (each `set` may add one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLimits {
    /// Most explicit entries one owner may have, its subaddresses' entries included (an
    /// endpoint may attach as any subaddress of itself, each an owner of its own).
    pub max_entries_per_owner: usize,
    /// Most explicit entries over all owners.
    pub max_entries: usize,
}

impl Default for AccessLimits {
    fn default() -> Self {
        Self {
            max_entries_per_owner: 256,
            max_entries: 1_000_000,
        }
    }
}

/// A change to persist: the record under [`Mutation::key`] becomes [`Mutation::value`], or
/// goes away when that is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// An access entry, keyed by owner and actor.
    Access {
        /// The key.
        key: Vec<u8>,
        /// The record, or `None` to delete.
        value: Option<Vec<u8>>,
    },
    /// A held message, keyed by its id.
    Hold {
        /// The id.
        id: HoldId,
        /// The record, or `None` to delete.
        value: Option<Vec<u8>>,
    },
}

/// A record that could not be read back: which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct RecordError {
    /// Which record (`access entry fred@example.com ...`, `held message 12`).
    pub what: String,
    /// What is wrong with it.
    pub why: String,
}

/// A held message as stored: its expiry is an instant, so it survives a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredHold {
    recipient: Endpoint,
    payload: Bytes,
    report: Option<ReportRequest>,
    expires: Option<Timestamp>,
}

/// The durable state, in memory: what was last committed, plus what [`StoreState::apply`]
/// changed since.
#[derive(Debug, Clone, Default)]
pub struct StoreState {
    access: AccessTable,
    entries: usize,
    /// Stored entries by owner endpoint without subaddress (see [`owner_base`]).
    per_owner: std::collections::HashMap<String, usize>,
    limits: AccessLimits,
    held: std::collections::BTreeMap<HoldId, StoredHold>,
    next_hold: HoldId,
}

impl StoreState {
    /// An empty state whose access table starts as `access` (the relay-wide grants of the
    /// configuration, which are not stored).
    pub fn new(access: AccessTable, limits: AccessLimits) -> Self {
        Self {
            access,
            entries: 0,
            per_owner: Default::default(),
            limits,
            held: Default::default(),
            next_hold: 1,
        }
    }

    /// The access table: configuration grants and stored entries.
    pub fn access(&self) -> &AccessTable {
        &self.access
    }

    /// Number of stored access entries.
    pub fn access_entries(&self) -> usize {
        self.entries
    }

    /// Number of held messages.
    pub fn held_messages(&self) -> usize {
        self.held.len()
    }

    /// Replaces the configuration grants, keeping the stored entries (a reload).
    pub fn set_grants(&mut self, grants: AccessTable) {
        let mut access = grants;
        for entry in self.access.all_entries() {
            access.set(entry.clone());
        }
        self.access = access;
    }

    /// Applies `op` at wall-clock instant `now`: its outcome, and what to persist.
    pub fn apply(&mut self, op: StoreOp, now: Timestamp) -> (Outcome, Option<Mutation>) {
        match op {
            StoreOp::SetAccess(change) => self.set_access(change, now),
            StoreOp::Hold(message) => {
                let id = self.next_hold;
                self.next_hold += 1;
                let expires = message.remaining_ms.map(|ms| {
                    Timestamp::from_unix_millis(
                        now.unix_millis()
                            .saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)),
                    )
                });
                let stored = StoredHold {
                    recipient: message.recipient,
                    payload: message.payload,
                    report: message.report,
                    expires,
                };
                let value = encode_hold(&stored);
                self.held.insert(id, stored);
                (
                    Outcome::Held(id),
                    Some(Mutation::Hold {
                        id,
                        value: Some(value),
                    }),
                )
            }
            StoreOp::Release(id) => {
                let mutation = self
                    .held
                    .remove(&id)
                    .map(|_| Mutation::Hold { id, value: None });
                (Outcome::Released, mutation)
            }
        }
    }

    fn set_access(&mut self, change: AccessChange, now: Timestamp) -> (Outcome, Option<Mutation>) {
        let AccessChange {
            owner,
            actor,
            actions,
            expect,
        } = change;
        let existing = self.access.entry(&owner, &actor);
        let current = existing.and_then(|e| e.last_update.as_deref());
        let matches = match (current, expect) {
            (None, None) => existing.is_none(),
            (Some(current), Some(expect)) => Timestamp::parse(current).ok() == Some(expect),
            _ => false,
        };
        if actions.is_none() && existing.is_none() && expect.is_none() {
            return (Outcome::Access(Err(SetRefused::NoEntry)), None);
        }
        if !matches {
            return (Outcome::Access(Err(SetRefused::Stale)), None);
        }
        // An entry keeps the spelling it was created with (domains compare case-insensitively),
        // so that its record is the one replaced or deleted.
        let (owner, actor) = match existing {
            Some(e) => (e.owner.clone(), e.actor.clone()),
            None => (owner, actor),
        };
        let key = access_key(&owner, &actor);
        let base = owner_base(&owner);
        let Some(actions) = actions else {
            self.access.remove(&owner, &actor);
            self.entries -= 1;
            if let Some(count) = self.per_owner.get_mut(&base) {
                *count -= 1;
                if *count == 0 {
                    self.per_owner.remove(&base);
                }
            }
            return (
                Outcome::Access(Ok(AccessWritten::Deleted { owner, actor })),
                Some(Mutation::Access { key, value: None }),
            );
        };
        let replacing = existing.is_some();
        if !replacing
            && (self.entries >= self.limits.max_entries
                || self.per_owner.get(&base).copied().unwrap_or(0)
                    >= self.limits.max_entries_per_owner)
        {
            return (Outcome::Access(Err(SetRefused::TooMany)), None);
        }
        // A replaced entry's lastUpdate SHOULD change (ACC-14), even within a millisecond.
        let mut stamp = Timestamp::from_unix_millis(now.unix_millis());
        if let Some(previous) = current.and_then(|c| Timestamp::parse(c).ok()) {
            if stamp <= previous {
                stamp = previous.next_milli();
            }
        }
        let entry = AccessEntry {
            owner,
            actor,
            actions,
            last_update: Some(stamp.to_string()),
        };
        let value = encode_access(&entry);
        self.access.set(entry.clone());
        if !replacing {
            self.entries += 1;
            *self.per_owner.entry(base).or_default() += 1;
        }
        (
            Outcome::Access(Ok(AccessWritten::Written(entry))),
            Some(Mutation::Access {
                key,
                value: Some(value),
            }),
        )
    }

    /// Reads back one persisted access record.
    pub fn load_access(&mut self, key: &[u8], value: &[u8]) -> Result<(), RecordError> {
        let entry = decode_access(key, value)?;
        let base = owner_base(&entry.owner);
        if self.access.set(entry).is_none() {
            self.entries += 1;
            *self.per_owner.entry(base).or_default() += 1;
        }
        Ok(())
    }

    /// Reads back one persisted held message.
    pub fn load_hold(&mut self, id: HoldId, value: &[u8]) -> Result<(), RecordError> {
        let stored = decode_hold(id, value)?;
        self.held.insert(id, stored);
        self.next_hold = self.next_hold.max(id + 1);
        Ok(())
    }

    /// The held messages, oldest first, with the time each may still wait as of `now`.
    pub fn held(&self, now: Timestamp) -> Vec<(HoldId, HeldMessage)> {
        self.held
            .iter()
            .map(|(&id, stored)| {
                let remaining_ms = stored.expires.map(|expires| {
                    u64::try_from(expires.unix_millis().saturating_sub(now.unix_millis()))
                        .unwrap_or(0)
                });
                (
                    id,
                    HeldMessage {
                        recipient: stored.recipient.clone(),
                        payload: stored.payload.clone(),
                        report: stored.report.clone(),
                        remaining_ms,
                    },
                )
            })
            .collect()
    }
}

/// Held messages by the shard that holds them again after a restart: each recipient's home
/// shard ([`crate::apex::relay::home_shard`]), of `shards`.
pub fn by_home_shard(
    held: Vec<(HoldId, HeldMessage)>,
    shards: usize,
) -> Vec<Vec<(HoldId, HeldMessage)>> {
    let mut by_shard: Vec<Vec<(HoldId, HeldMessage)>> = (0..shards).map(|_| Vec::new()).collect();
    for (id, message) in held {
        let home = crate::apex::relay::home_shard(&message.recipient, shards);
        if let Some(mine) = by_shard.get_mut(home) {
            mine.push((id, message));
        }
    }
    by_shard
}

/// The owner an entry counts against for [`AccessLimits::max_entries_per_owner`]: the
/// endpoint without subaddress, its domain lower-cased.
fn owner_base(owner: &Endpoint) -> String {
    format!(
        "{}@{}",
        owner.address(),
        owner.domain().to_ascii_lowercase()
    )
}

/// `owner NUL actor` (the actor in its escaped form, which is unique per actor value).
fn access_key(owner: &Endpoint, actor: &ActorPattern) -> Vec<u8> {
    format!("{}\0{}", owner, actor).into_bytes()
}

/// `actions NUL lastUpdate`.
fn encode_access(entry: &AccessEntry) -> Vec<u8> {
    format!(
        "{}\0{}",
        format_actions(&entry.actions),
        entry.last_update.as_deref().unwrap_or("")
    )
    .into_bytes()
}

fn decode_access(key: &[u8], value: &[u8]) -> Result<AccessEntry, RecordError> {
    let what = || format!("access entry {:?}", String::from_utf8_lossy(key));
    let bad = |why: String| RecordError { what: what(), why };
    let key = std::str::from_utf8(key).map_err(|e| bad(e.to_string()))?;
    let value = std::str::from_utf8(value).map_err(|e| bad(e.to_string()))?;
    let (owner, actor) = key
        .split_once('\0')
        .ok_or_else(|| bad("no owner/actor separator".into()))?;
    let (actions, last_update) = value
        .split_once('\0')
        .ok_or_else(|| bad("no actions/lastUpdate separator".into()))?;
    let owner = Endpoint::parse(owner).map_err(|e| bad(format!("owner: {e}")))?;
    let actor = ActorPattern::parse(actor).map_err(|e| bad(format!("actor: {e}")))?;
    let actions = parse_actions(actions).map_err(|e| bad(format!("actions: {e}")))?;
    if !last_update.is_empty() {
        Timestamp::parse(last_update).map_err(|e| bad(format!("lastUpdate: {e}")))?;
    }
    Ok(AccessEntry {
        owner,
        actor,
        actions,
        last_update: (!last_update.is_empty()).then(|| last_update.to_owned()),
    })
}

/// Version octet, recipient, report flag (+ transID, originator, recipient as named),
/// expiry flag (+ ms since the epoch), payload; strings and the payload length-prefixed.
fn encode_hold(stored: &StoredHold) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(stored.payload.len() + 64);
    out.put_u8(1);
    put_str(&mut out, stored.recipient.as_str());
    match &stored.report {
        Some(report) => {
            out.put_u8(1);
            out.put_u32(report.trans_id);
            put_str(&mut out, report.originator.as_str());
            put_str(&mut out, &report.recipient);
        }
        None => out.put_u8(0),
    }
    match stored.expires {
        Some(at) => {
            out.put_u8(1);
            out.put_i64(at.unix_millis());
        }
        None => out.put_u8(0),
    }
    out.put_u32(u32::try_from(stored.payload.len()).unwrap_or(u32::MAX));
    out.put_slice(&stored.payload);
    out.to_vec()
}

fn put_str(out: &mut BytesMut, text: &str) {
    out.put_u32(u32::try_from(text.len()).unwrap_or(u32::MAX));
    out.put_slice(text.as_bytes());
}

fn decode_hold(id: HoldId, value: &[u8]) -> Result<StoredHold, RecordError> {
    let bad = |why: &str| RecordError {
        what: format!("held message {id}"),
        why: why.to_owned(),
    };
    let mut buf = value;
    let take_u8 = |buf: &mut &[u8]| (buf.remaining() >= 1).then(|| buf.get_u8());
    let take_u32 = |buf: &mut &[u8]| (buf.remaining() >= 4).then(|| buf.get_u32());
    let take_bytes = |buf: &mut &[u8]| -> Option<Vec<u8>> {
        let len = take_u32(buf)? as usize;
        (buf.remaining() >= len).then(|| {
            let bytes = buf[..len].to_vec();
            buf.advance(len);
            bytes
        })
    };
    let take_str = |buf: &mut &[u8]| -> Option<String> { String::from_utf8(take_bytes(buf)?).ok() };
    let truncated = || bad("truncated or not text where text belongs");
    if take_u8(&mut buf) != Some(1) {
        return Err(bad("unknown record version"));
    }
    let recipient = take_str(&mut buf).ok_or_else(truncated)?;
    let recipient = Endpoint::parse(&recipient).map_err(|e| bad(&e.to_string()))?;
    let report = match take_u8(&mut buf) {
        Some(0) => None,
        Some(1) => {
            let trans_id = take_u32(&mut buf).ok_or_else(truncated)?;
            let originator = take_str(&mut buf).ok_or_else(truncated)?;
            let named = take_str(&mut buf).ok_or_else(truncated)?;
            Some(ReportRequest::asked(
                trans_id,
                Endpoint::parse(&originator).map_err(|e| bad(&e.to_string()))?,
                CompactString::from(named),
            ))
        }
        _ => return Err(truncated()),
    };
    let expires = match take_u8(&mut buf) {
        Some(0) => None,
        Some(1) if buf.remaining() >= 8 => Some(Timestamp::from_unix_millis(buf.get_i64())),
        _ => return Err(truncated()),
    };
    let payload = take_bytes(&mut buf).ok_or_else(truncated)?;
    if buf.has_remaining() {
        return Err(bad("octets after the payload"));
    }
    Ok(StoredHold {
        recipient,
        payload: Bytes::from(payload),
        report,
        expires,
    })
}

impl Mutation {
    /// The record's key (an access entry's owner and actor; a held message's id, big-endian
    /// so that keys sort by age).
    pub fn key(&self) -> Vec<u8> {
        match self {
            Mutation::Access { key, .. } => key.clone(),
            Mutation::Hold { id, .. } => id.to_be_bytes().to_vec(),
        }
    }

    /// The record, or `None` when it is deleted.
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            Mutation::Access { value, .. } | Mutation::Hold { value, .. } => value.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(text: &str) -> Endpoint {
        Endpoint::parse(text).unwrap()
    }

    fn change(actions: Option<&str>, expect: Option<&str>) -> StoreOp {
        StoreOp::SetAccess(AccessChange {
            owner: endpoint("fred@example.com"),
            actor: ActorPattern::parse("*@example.com").unwrap(),
            actions: actions.map(|a| parse_actions(a).unwrap()),
            expect: expect.map(|t| Timestamp::parse(t).unwrap()),
        })
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn written(outcome: Outcome) -> AccessEntry {
        match outcome {
            Outcome::Access(Ok(AccessWritten::Written(entry))) => entry,
            other => panic!("not written: {other:?}"),
        }
    }

    #[test]
    fn acc_13_create_replace_and_delete_check_last_update() {
        let mut state = StoreState::new(AccessTable::new(), AccessLimits::default());
        // A lastUpdate for an entry that does not exist is stale.
        let (outcome, mutation) = state.apply(
            change(Some("core:data"), Some("2024-03-01T10:00:00Z")),
            at(1000),
        );
        assert_eq!(outcome, Outcome::Access(Err(SetRefused::Stale)));
        assert!(mutation.is_none());
        // Create.
        let (outcome, mutation) = state.apply(change(Some("core:data"), None), at(1000));
        let entry = written(outcome);
        assert_eq!(
            entry.last_update.as_deref(),
            Some("1970-01-01T00:00:01.000-00:00")
        );
        assert!(mutation.is_some_and(|m| m.value().is_some()));
        // Creating again (no lastUpdate) while it exists is unexpected.
        let (outcome, _) = state.apply(change(Some("all:all"), None), at(1500));
        assert_eq!(outcome, Outcome::Access(Err(SetRefused::Stale)));
        // Replace with the same instant written another way; the clock did not move, the
        // lastUpdate still does.
        let (outcome, _) = state.apply(
            change(
                Some("core:data presence:all"),
                Some("1970-01-01T01:00:01+01:00"),
            ),
            at(1000),
        );
        let replaced = written(outcome);
        assert_eq!(
            replaced.last_update.as_deref(),
            Some("1970-01-01T00:00:01.001-00:00")
        );
        // The old lastUpdate is stale now.
        let (outcome, _) = state.apply(change(None, Some("1970-01-01T00:00:01Z")), at(2000));
        assert_eq!(outcome, Outcome::Access(Err(SetRefused::Stale)));
        let (outcome, mutation) =
            state.apply(change(None, Some("1970-01-01T00:00:01.001Z")), at(2000));
        assert!(matches!(
            outcome,
            Outcome::Access(Ok(AccessWritten::Deleted { .. }))
        ));
        assert!(mutation.is_some_and(|m| m.value().is_none()));
        assert_eq!(state.access_entries(), 0);
        let (outcome, _) = state.apply(change(None, None), at(2000));
        assert_eq!(outcome, Outcome::Access(Err(SetRefused::NoEntry)));
    }

    #[test]
    fn entries_per_owner_are_bounded() {
        let limits = AccessLimits {
            max_entries_per_owner: 1,
            max_entries: 10,
        };
        let mut state = StoreState::new(AccessTable::new(), limits);
        written(state.apply(change(Some("core:data"), None), at(1)).0);
        let other = StoreOp::SetAccess(AccessChange {
            owner: endpoint("fred@example.com"),
            actor: ActorPattern::parse("wilma@example.com").unwrap(),
            actions: Some(vec![Action::CORE_DATA]),
            expect: None,
        });
        assert_eq!(
            state.apply(other, at(2)).0,
            Outcome::Access(Err(SetRefused::TooMany))
        );
        // A subaddress of the owner counts against the same owner.
        let sub = StoreOp::SetAccess(AccessChange {
            owner: endpoint("fred/appl=wb@EXAMPLE.com"),
            actor: ActorPattern::parse("wilma@example.com").unwrap(),
            actions: Some(vec![Action::CORE_DATA]),
            expect: None,
        });
        assert_eq!(
            state.apply(sub, at(3)).0,
            Outcome::Access(Err(SetRefused::TooMany))
        );
        // Another owner has room.
        let barney = StoreOp::SetAccess(AccessChange {
            owner: endpoint("barney@example.com"),
            actor: ActorPattern::parse("wilma@example.com").unwrap(),
            actions: Some(vec![Action::CORE_DATA]),
            expect: None,
        });
        written(state.apply(barney, at(4)).0);
    }

    #[test]
    fn records_read_back_to_the_same_state() {
        let mut state = StoreState::new(AccessTable::new(), AccessLimits::default());
        let mut mutations = Vec::new();
        let (_, m) = state.apply(change(Some("core:data"), None), at(1));
        mutations.extend(m);
        let report =
            ReportRequest::asked(7, endpoint("barney@example.com"), "fred@example.com".into());
        let (outcome, m) = state.apply(
            StoreOp::Hold(HeldMessage {
                recipient: endpoint("fred@example.com"),
                payload: Bytes::from_static(b"<data />"),
                report: Some(report.clone()),
                remaining_ms: Some(5000),
            }),
            at(1000),
        );
        assert_eq!(outcome, Outcome::Held(1));
        mutations.extend(m);
        let mut loaded = StoreState::new(AccessTable::new(), AccessLimits::default());
        for m in &mutations {
            match m {
                Mutation::Access { key, value } => {
                    loaded.load_access(key, value.as_deref().unwrap()).unwrap()
                }
                Mutation::Hold { id, value } => {
                    loaded.load_hold(*id, value.as_deref().unwrap()).unwrap()
                }
            }
        }
        assert_eq!(loaded.access_entries(), 1);
        let held = loaded.held(at(3000));
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1.report, Some(report));
        assert_eq!(held[0].1.remaining_ms, Some(3000));
        assert_eq!(held[0].1.payload, Bytes::from_static(b"<data />"));
        // A new hold after loading gets a fresh id.
        let (outcome, _) = loaded.apply(
            StoreOp::Hold(HeldMessage {
                recipient: endpoint("fred@example.com"),
                payload: Bytes::new(),
                report: None,
                remaining_ms: None,
            }),
            at(3000),
        );
        assert_eq!(outcome, Outcome::Held(2));
        // Releasing removes; releasing again changes nothing.
        let (outcome, m) = loaded.apply(StoreOp::Release(1), at(3000));
        assert_eq!(outcome, Outcome::Released);
        assert!(m.is_some());
        assert!(loaded.apply(StoreOp::Release(1), at(3000)).1.is_none());
    }

    #[test]
    fn damaged_records_are_named() {
        let mut state = StoreState::new(AccessTable::new(), AccessLimits::default());
        let err = state.load_hold(9, &[1, 0, 0]).unwrap_err();
        assert_eq!(err.what, "held message 9");
        let err = state
            .load_access(b"fred@example.com\0*@*", b"nonsense\0")
            .unwrap_err();
        assert!(err.to_string().contains("actions"), "{err}");
        assert!(state.load_hold(9, &[2]).is_err());
    }
}
