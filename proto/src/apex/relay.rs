//! The per-shard APEX relay (RFC 3340 §4.4, §8): attachments and bindings, the endpoint
//! directory, data acceptance, local delivery, forwarding decisions and status reports.
//!
//! Sans-IO like the rest of the core: the runtime tells the relay what happened on its
//! connections (`handle_*`) and executes the [`Action`]s it polls. The relay never sees a socket;
//! connections are [`ConnId`]s and channels are numbers.
//!
//! ```text
//!  session events ─► handle_message / handle_reply / handle_start / channel_closed ─┐
//!  other shards   ─► handle_envelope ───────────────────────────────────────────────┤
//!                                                                                    ▼
//!            Relay { directory replica, channel associations, pending deliveries }
//!                                                                                    │
//!  poll_action ◄─ Reply / StartReply / Send (MSG to an endpoint) / ToShard / Forward ◄┘
//! ```
//!
//! Every endpoint has a home shard (`home_shard`) that settles attach conflicts; attachments are
//! broadcast so every shard holds a replica of the directory and data needs at most one hop.
//! A replica can lag its home shard (an endpoint is answered before the broadcast reaches every
//! shard), so a shard that does not know a local recipient hands the data to the recipient's
//! home shard, which is never behind: it delivers, holds (hold4Endpoint) or reports.

use std::collections::{HashMap, VecDeque};

use std::hash::Hasher;

use rustc_hash::FxHashMap;

/// Maps keyed by endpoints, which peers choose: foldhash is seeded per map (resisting
/// collision floods like SipHash) and costs a fraction of SipHash on short keys.
type EndpointMap<V> = HashMap<Endpoint, V, foldhash::fast::RandomState>;

use bytes::Bytes;
use compact_str::CompactString;

use crate::apex::access::AccessTable;
use crate::apex::addr::Endpoint;
use crate::apex::client::DataBuilder;
use crate::apex::msg::{self, apex_code, ApexLimits, ApexOption, Data, Operation, SimpleData};
use crate::apex::options::{self, Edit, Hop};
use crate::beep::mgmt::{code, ErrorElement};
use crate::beep::session::{Event, ReplyKind, Session};
use crate::error::Misuse;

/// A connection of this shard, as numbered by the runtime.
pub type ConnId = u32;

/// The APEX profile URI (RFC 3340 §4.2, APEX-06).
pub const APEX_PROFILE: &str = "http://iana.org/beep/APEX";

/// Where an attachment lives: shard, connection and APEX channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelRef {
    /// Shard owning the connection.
    pub shard: usize,
    /// Connection on that shard.
    pub conn: ConnId,
    /// APEX channel of the attachment.
    pub channel: u32,
}

/// Which port a session arrived on: endpoints attach on apex-edge, relays bind on apex-mesh
/// (RFC 3340 §2.1, §3.1; which port takes which mode is an implementation choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// apex-edge (913): endpoint-relay mode.
    Edge,
    /// apex-mesh (912): relay-relay mode.
    Mesh,
}

/// Relay settings, validated by the runtime.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The administrative domain served.
    pub domain: String,
    /// This shard's index.
    pub shard: usize,
    /// Number of shards.
    pub shards: usize,
    /// Bounds on control documents.
    pub limits: ApexLimits,
    /// Access entries consulted for local delivery (`core:data`).
    pub access: AccessTable,
    /// Domains whose relays are trusted intermediaries: data they send is accepted whatever the
    /// originator's domain (RFC 3340 §4.5.2, APEX-32). `*` trusts every bound relay.
    pub trusted: Vec<String>,
    /// Bounds of the hold4Endpoint queue (RFC 3342 §3).
    pub hold: options::HoldLimits,
}

/// Something the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer the peer's MSG `msgno` on `channel` of `conn` (RPY when `positive`, else ERR).
    Reply {
        /// Connection.
        conn: ConnId,
        /// What to answer, on which channel.
        reply: MsgReply,
    },
    /// Accept the deferred `start` `start_id` with this piggybacked reply (`<ok />` or an
    /// `error`): the channel exists either way (RFC 3080 §2.3.1.2).
    StartReply {
        /// Connection.
        conn: ConnId,
        /// The start request id given to [`Relay::handle_start`].
        start_id: u32,
        /// Piggybacked content.
        content: Bytes,
    },
    /// Send a MSG on a channel of a local connection (delivery, report or terminate). Its
    /// reply must be passed to [`Relay::handle_reply`]; a MSG the session refuses, to
    /// [`Relay::send_failed`].
    Send {
        /// Connection.
        conn: ConnId,
        /// Channel.
        channel: u32,
        /// The message.
        payload: Bytes,
        /// The channel whose peer sent the data delivered here (`None` for the relay's own
        /// MSGs): while the MSG waits for room, that channel's window is held back by its size.
        source: Option<ChannelRef>,
    },
    /// Hand an envelope to another shard over the mesh queue.
    ToShard {
        /// Destination shard.
        shard: usize,
        /// The envelope.
        envelope: Envelope,
    },
    /// Send data towards another administrative domain over the relay mesh.
    Forward {
        /// Destination domain.
        domain: String,
        /// The data message, carrying only the recipients routed there.
        payload: Bytes,
    },
}

/// Messages between shards. Payloads are `Bytes`: crossing shards moves a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// To the endpoint's home shard: may `endpoint` attach at `at`?
    AttachRequest {
        /// Request id, echoed in the verdict.
        id: u64,
        /// Endpoint.
        endpoint: Endpoint,
        /// Where it would attach.
        at: ChannelRef,
        /// The attach carried attachOverride (RFC 3342).
        overriding: bool,
    },
    /// From the home shard: the verdict (`Err(code)` on conflict).
    AttachVerdict {
        /// Request id.
        id: u64,
        /// Outcome.
        result: Result<(), u16>,
    },
    /// Broadcast: `endpoint` is attached at `at`.
    Attached {
        /// Endpoint.
        endpoint: Endpoint,
        /// Its channel.
        at: ChannelRef,
    },
    /// Broadcast: `endpoint` is no longer attached at `at`.
    Detached {
        /// Endpoint.
        endpoint: Endpoint,
        /// The channel it was attached on.
        at: ChannelRef,
    },
    /// To the shard owning `at`: end that attachment with 556 (attachOverride).
    Evict {
        /// Endpoint.
        endpoint: Endpoint,
        /// The old channel.
        at: ChannelRef,
    },
    /// To the shard owning the link to `domain`: send `payload` over it.
    Forward {
        /// Destination domain.
        domain: String,
        /// The data message.
        payload: Bytes,
    },
    /// To `recipient`'s home shard: this shard's replica did not know it. The home shard
    /// settles every attach before the endpoint is answered, so it is never behind; it
    /// delivers, holds or reports (access was already checked).
    DeliverHome {
        /// The recipient.
        recipient: Endpoint,
        /// The data message.
        payload: Bytes,
        /// Report the outcome to the originator when set.
        report: Option<Report>,
        /// hold4Endpoint: hold until this deadline (`Some(None)`: no deadline).
        hold: Option<Option<u64>>,
        /// The channel the data came from (see [`Action::Send`]).
        source: Option<ChannelRef>,
    },
    /// To the shard owning `at`: deliver `payload` there.
    Deliver {
        /// Recipient's channel.
        at: ChannelRef,
        /// The data message.
        payload: Bytes,
        /// Report the outcome to the originator when set.
        report: Option<Report>,
        /// The channel the data came from (see [`Action::Send`]).
        source: Option<ChannelRef>,
    },
    /// To the shard owning `at`: hold back (`withhold`) or give back `octets` of that channel's
    /// receive window, for data from it that waits for a recipient on the sending shard.
    /// Handled by the shard core, not the relay.
    Window {
        /// The sending channel.
        at: ChannelRef,
        /// Octets.
        octets: u32,
        /// Hold back when set, give back otherwise.
        withhold: bool,
    },
    /// Broadcast: the recipient channel `at` has taken nothing for longer than the shard's
    /// stall limit (`refusing`), or is taking messages again: data for it is refused with 450
    /// rather than queued while it refuses.
    Refusing {
        /// The recipient's channel.
        at: ChannelRef,
        /// Refusing from now on, or no longer.
        refusing: bool,
    },
}

/// A [`ReportRequest`] travelling with a data message. Boxed: reports are rarely asked for,
/// and every message's actions, envelopes and sent-queue entries would otherwise carry room
/// for one.
pub type Report = Box<ReportRequest>;

/// A statusRequest to honour once a recipient's outcome is known (RFC 3340 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRequest {
    /// The option's transID.
    pub trans_id: u32,
    /// Who asked (the data's originator).
    pub originator: Endpoint,
    /// The recipient reported on, as the data named it.
    pub recipient: CompactString,
}

/// How to answer an attach or bind once it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Msg(u32),
    Start(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Association {
    Attached(Endpoint),
    Bound(String),
}

/// What the relay's own MSGs on a channel were, in order, to match the replies.
#[derive(Debug)]
enum Sent {
    Delivery(Option<Report>),
    Notice,
}

#[derive(Debug, Default)]
struct ChannelState {
    /// transID -> live attach/bind on this channel (APEX-42).
    associations: HashMap<u32, Association>,
    /// Our MSGs awaiting replies, in order.
    sent: VecDeque<Sent>,
    /// The session knows the channel: false while the reply to its `start` (carrying a
    /// piggybacked attach) is still to be sent. MSGs for it wait in `waiting` until then.
    ready: bool,
    waiting: Vec<(Bytes, Option<Report>)>,
    /// The head of the last simple data received on the channel (see
    /// [`msg::parse_simple_data_memo`]).
    simple_memo: msg::SimpleMemo,
    /// Where that head's data went, while nothing that routes could have changed since.
    simple_route: Option<SimpleRoute>,
}

/// A simple data's way to its recipient's channel, remembered with the sender's memo of its
/// head: while the relay's [`Relay::routes_epoch`] stands, the same two identities are
/// authorized, allowed and routed the same way, so none of that is worked out again.
#[derive(Debug, Clone, Copy)]
struct SimpleRoute {
    epoch: u64,
    at: ChannelRef,
}

#[derive(Debug)]
struct PendingAttach {
    endpoint: Endpoint,
    at: ChannelRef,
    trans_id: u32,
    answer: Answer,
}

/// One shard's relay.
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    directory: EndpointMap<ChannelRef>,
    connections: FxHashMap<ConnId, ConnKind>,
    /// Keyed by our connection ids and channel numbers bounded per connection: a fast hash is
    /// safe here (the directory, keyed by names peers choose, keeps the default hasher).
    channels: FxHashMap<(ConnId, u32), ChannelState>,
    /// The channels of `channels` by connection: what a session's associations are looked
    /// up by, without a pass over every channel of the shard (bounded by the session's
    /// channel limit).
    conn_channels: FxHashMap<ConnId, Vec<u32>>,
    pending: HashMap<u64, PendingAttach>,
    next_request: u64,
    actions: VecDeque<Action>,
    /// Milliseconds on the runtime's monotonic clock, as last told ([`Relay::set_now`]).
    now_ms: u64,
    /// transIDs for the relay's own reports.
    next_report_trans: u32,
    /// Data held for endpoints not attached yet (hold4Endpoint), in arrival order.
    held: EndpointMap<VecDeque<Held>>,
    held_messages: usize,
    held_bytes: usize,
    /// The earliest deadline of held data (relay-clock ms), if any has one.
    hold_deadline: Option<u64>,
    /// `core:data` decisions by recipient then originator: the access table is fixed for the
    /// relay's life, so a decision once made stands. Bounded by [`ACCESS_CACHE_ENTRIES`].
    access_cache: EndpointMap<EndpointMap<bool>>,
    access_cached: usize,
    /// Identities of data originators and recipients already parsed: the same few names come
    /// with every message. Bounded by [`PARSED_CACHE_ENTRIES`].
    parsed: HashMap<Box<str>, Endpoint, foldhash::fast::RandomState>,
    /// Whether data of the common shape takes [`Relay::simple_data`]; off only where tests
    /// compare it with the general path.
    simple_data_path: bool,
    /// Advanced by everything that may change how a data is authorized or routed
    /// (associations, the directory, connections and channels, other shards' news, time), which
    /// is every entry point but a simple data and a reply to the relay's own MSG: a
    /// [`SimpleRoute`] of an earlier epoch is not used.
    routes_epoch: u64,
    /// The connection whose MSG is being handled with its session at hand: answers to it are
    /// collected in `direct_replies` rather than queued as actions (see
    /// [`Relay::handle_session_event`]).
    answering_directly: Option<ConnId>,
    direct_replies: Vec<MsgReply>,
    /// Recipient channels that have taken nothing for too long (see [`Envelope::Refusing`]).
    refusing: rustc_hash::FxHashSet<ChannelRef>,
    /// The channel whose data is being routed, for [`Action::Send::source`]; `None` while the
    /// relay sends its own MSGs (reports, notices, held data).
    current_source: Option<ChannelRef>,
}

/// The relay's answer to a peer's MSG: what an [`Action::Reply`] carries, and what the relay
/// puts straight into the session at hand (see [`Relay::handle_session_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgReply {
    /// Channel.
    pub channel: u32,
    /// The peer's msgno.
    pub msgno: u32,
    /// RPY or ERR.
    pub positive: bool,
    /// The `ok` or `error` payload.
    pub payload: Bytes,
}

impl MsgReply {
    /// Queues the answer in the session of its connection.
    pub fn send_in(self, session: &mut Session) -> Result<(), Misuse> {
        if self.positive {
            session.send_rpy(self.channel, self.msgno, self.payload)
        } else {
            session.send_err(self.channel, self.msgno, self.payload)
        }
    }
}

/// Why data for a recipient that takes nothing was refused (450, transient).
const RECIPIENT_NOT_TAKING: &str = "the recipient is not taking its messages";

/// Most cached access decisions before the cache starts over.
const ACCESS_CACHE_ENTRIES: usize = 65_536;

/// Most cached parsed identities before the cache starts over.
const PARSED_CACHE_ENTRIES: usize = 16_384;

/// A data message waiting for its recipient to attach.
#[derive(Debug)]
struct Held {
    payload: Bytes,
    report: Option<Report>,
    /// Relay-clock millisecond after which it is dropped; `None`: no bound.
    deadline: Option<u64>,
}

/// The shard that owns the relay-mesh link to `domain` (case-insensitive).
pub fn domain_shard(domain: &str, shards: usize) -> usize {
    let mut hasher = rustc_hash::FxHasher::default();
    domain
        .bytes()
        .for_each(|b| hasher.write_u8(b.to_ascii_lowercase()));
    shard_of(hasher.finish(), shards)
}

/// The home shard of an endpoint: the same on every shard and in every run (FxHash is not
/// seeded), over the local part and the lower-cased domain, matching [`Endpoint`] equality.
pub fn home_shard(endpoint: &Endpoint, shards: usize) -> usize {
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(endpoint.local().as_bytes());
    hasher.write_u8(b'@');
    endpoint
        .domain()
        .bytes()
        .for_each(|b| hasher.write_u8(b.to_ascii_lowercase()));
    shard_of(hasher.finish(), shards)
}

fn shard_of(hash: u64, shards: usize) -> usize {
    (hash % shards.max(1) as u64) as usize
}

impl Relay {
    /// A relay for one shard.
    pub fn new(config: RelayConfig) -> Self {
        Self {
            config,
            directory: EndpointMap::default(),
            connections: FxHashMap::default(),
            channels: FxHashMap::default(),
            conn_channels: FxHashMap::default(),
            pending: HashMap::new(),
            next_request: 0,
            actions: VecDeque::new(),
            now_ms: 0,
            next_report_trans: 1,
            held: EndpointMap::default(),
            held_messages: 0,
            held_bytes: 0,
            hold_deadline: None,
            access_cache: EndpointMap::default(),
            parsed: HashMap::default(),
            access_cached: 0,
            simple_data_path: true,
            routes_epoch: 0,
            answering_directly: None,
            direct_replies: Vec::new(),
            refusing: rustc_hash::FxHashSet::default(),
            current_source: None,
        }
    }

    /// Marks the recipient channel `at` as refusing data (it has taken nothing for too long)
    /// or taking it again. Data for a refusing recipient is refused with 450 when it is the
    /// only one, and otherwise reported as not delivered (with 450) when a report was asked.
    pub fn set_refusing(&mut self, at: ChannelRef, refusing: bool) {
        self.routes_may_change();
        if refusing {
            self.refusing.insert(at);
        } else {
            self.refusing.remove(&at);
        }
    }

    /// Whether data for `at` is refused (see [`Relay::set_refusing`]).
    fn is_refusing(&self, at: &ChannelRef) -> bool {
        !self.refusing.is_empty() && self.refusing.contains(at)
    }

    /// Whether `recipient` names a local endpoint whose channel refuses data.
    fn refuses(&mut self, recipient: &str) -> bool {
        if self.refusing.is_empty() {
            return false;
        }
        let Ok(target) = self.parse_endpoint(recipient) else {
            return false;
        };
        self.serves(target.domain())
            && self
                .directory
                .get(&target)
                .is_some_and(|at| self.refusing.contains(at))
    }

    /// Runs `f` with no data source: what it sends is the relay's own.
    fn as_own<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let source = self.current_source.take();
        let result = f(self);
        self.current_source = source;
        result
    }

    /// Sends every `data` through the general path (the full [`Data`], options and all), as
    /// the differential tests and fuzzing need to compare the two paths.
    #[doc(hidden)]
    pub fn without_simple_data_path(mut self) -> Self {
        self.simple_data_path = false;
        self
    }

    /// Tells the relay the time (milliseconds of a monotonic clock); used by `dataTiming`.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// The domain served.
    pub fn domain(&self) -> &str {
        &self.config.domain
    }

    /// Where `endpoint` is attached, per this shard's replica.
    pub fn lookup(&self, endpoint: &Endpoint) -> Option<ChannelRef> {
        self.directory.get(endpoint).copied()
    }

    /// The next action to execute.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn at(&self, conn: ConnId, channel: u32) -> ChannelRef {
        ChannelRef {
            shard: self.config.shard,
            conn,
            channel,
        }
    }

    /// Retires every [`SimpleRoute`]: something that decides routes may change now.
    fn routes_may_change(&mut self) {
        self.routes_epoch += 1;
    }

    fn serves(&self, domain: &str) -> bool {
        domain.eq_ignore_ascii_case(&self.config.domain)
    }

    /// A connection was accepted.
    pub fn conn_opened(&mut self, conn: ConnId, kind: ConnKind) {
        self.routes_may_change();
        self.connections.insert(conn, kind);
    }

    /// A connection ended: every association made over it ends (APEX-16).
    pub fn conn_closed(&mut self, conn: ConnId) {
        self.routes_may_change();
        for channel in self.conn_channels.remove(&conn).unwrap_or_default() {
            self.channel_closed(conn, channel);
        }
        self.connections.remove(&conn);
        // Attaches still waiting for their home shard's verdict stay pending: when the verdict
        // arrives the channel is gone and the attachment is undone everywhere (APEX-16).
    }

    /// An APEX channel was created without a piggybacked operation.
    pub fn channel_started(&mut self, conn: ConnId, channel: u32) {
        self.routes_may_change();
        self.channel_state(conn, channel).ready = true;
    }

    /// The state of `channel` of `conn`, created (and listed under its connection) on first
    /// use.
    fn channel_state(&mut self, conn: ConnId, channel: u32) -> &mut ChannelState {
        match self.channels.entry((conn, channel)) {
            std::collections::hash_map::Entry::Occupied(state) => state.into_mut(),
            std::collections::hash_map::Entry::Vacant(vacant) => {
                self.conn_channels.entry(conn).or_default().push(channel);
                vacant.insert(ChannelState::default())
            }
        }
    }

    /// An APEX channel closed: its attachments and bindings end (APEX-16).
    pub fn channel_closed(&mut self, conn: ConnId, channel: u32) {
        self.routes_may_change();
        if let Some(listed) = self.conn_channels.get_mut(&conn) {
            listed.retain(|c| *c != channel);
        }
        if let Some(state) = self.channels.remove(&(conn, channel)) {
            let at = self.at(conn, channel);
            for association in state.associations.into_values() {
                if let Association::Attached(endpoint) = association {
                    self.detach(endpoint, at);
                }
            }
            // Deliveries the endpoint never answered failed; say so when a report was asked.
            let unanswered = state.sent.into_iter().filter_map(|s| match s {
                Sent::Delivery(report) => report,
                Sent::Notice => None,
            });
            let unsent = state.waiting.into_iter().filter_map(|(_, report)| report);
            for report in unanswered.chain(unsent).collect::<Vec<_>>() {
                self.report(
                    Some(report),
                    code::ACTION_NOT_TAKEN,
                    "the endpoint went away before answering",
                );
            }
        }
    }

    /// Hands one event of connection `conn`'s BEEP session to the relay: what a runtime does
    /// with every event it polls from an APEX session. A `start` for APEX without a piggyback
    /// is accepted here; with one, the relay answers later through [`Action::StartReply`];
    /// other profiles are refused (550). Events that are not the relay's business come back.
    pub fn handle_session_event(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        event: Event,
    ) -> Option<Event> {
        match event {
            Event::StartRequested(request) => {
                match request.profiles.iter().find(|p| p.uri == APEX_PROFILE) {
                    Some(offer) => match &offer.content {
                        Some(content) => {
                            self.handle_start(conn, request.id, request.channel, content)
                        }
                        None => {
                            if let Some(name) = &request.server_name {
                                session.set_server_name(name);
                            }
                            if session.accept_start(request.id, APEX_PROFILE, None).is_ok() {
                                self.channel_started(conn, request.channel);
                            }
                        }
                    },
                    None => {
                        let error = ErrorElement::new(
                            code::ACTION_NOT_TAKEN,
                            "no requested profile is acceptable",
                        );
                        let _ = session.refuse_start(request.id, error);
                    }
                }
                None
            }
            Event::Message {
                channel,
                msgno,
                payload,
            } => {
                self.answering_directly = Some(conn);
                self.handle_message(conn, channel, msgno, &payload);
                self.answering_directly = None;
                self.reply_directly(session);
                None
            }
            Event::Reply {
                channel,
                kind,
                payload,
                ..
            } => {
                self.handle_reply(conn, channel, kind == ReplyKind::Rpy, &payload);
                None
            }
            Event::ChannelClosed { channel, .. } => {
                self.channel_closed(conn, channel);
                None
            }
            other => Some(other),
        }
    }

    /// Puts the answers collected in `direct_replies` straight into their session, which the
    /// caller holds, instead of queuing them for the runtime (which would look the session up
    /// again). They may go out ahead of deliveries to the same session queued before them: a
    /// relay's MSG and its RPY to the peer's MSG are independent exchanges (RFC 3080 §2.6), and
    /// replies keep their own order (BEEP-35).
    fn reply_directly(&mut self, session: &mut Session) {
        for reply in self.direct_replies.drain(..) {
            // A session that can no longer take it (closing) has nobody to tell.
            let _ = reply.send_in(session);
        }
    }

    /// A `start` for APEX carrying `piggyback` (RFC 3340 §4.2, APEX-06): the runtime defers
    /// its answer until [`Action::StartReply`]. Only attach and bind may ride in a start.
    pub fn handle_start(&mut self, conn: ConnId, start_id: u32, channel: u32, piggyback: &Bytes) {
        self.routes_may_change();
        self.channel_state(conn, channel);
        let operation = msg::parse_document(piggyback, &self.config.limits);
        self.operation(conn, channel, Answer::Start(start_id), &operation);
    }

    /// A MSG on an APEX channel.
    pub fn handle_message(&mut self, conn: ConnId, channel: u32, msgno: u32, payload: &Bytes) {
        self.current_source = Some(self.at(conn, channel));
        self.handle_message_from_source(conn, channel, msgno, payload);
        self.current_source = None;
    }

    fn handle_message_from_source(
        &mut self,
        conn: ConnId,
        channel: u32,
        msgno: u32,
        payload: &Bytes,
    ) {
        let (limits, simple_data_path) = (self.config.limits, self.simple_data_path);
        let epoch = self.routes_epoch;
        let state = self.channel_state(conn, channel);
        // A MSG on the channel proves the peer knows it.
        state.ready = true;
        if simple_data_path {
            if let Some(route) = state.simple_route.filter(|r| r.epoch == epoch) {
                // The same head as last time names the same identities, which are then not
                // needed: the memo's verdict in place is enough.
                if let Some((_, true)) =
                    msg::parse_simple_data_memo(payload, &limits, &mut state.simple_memo)
                {
                    self.answer(conn, channel, Answer::Msg(msgno), Ok(()));
                    self.deliver_at(route.at, payload.clone(), None);
                    return;
                }
                // Another head, which the memo now holds, or no simple data at all: handled
                // afresh below, and routed afresh.
                state.simple_route = None;
            }
            // Taken out while the data it may lend identities to is routed.
            let mut memo = std::mem::take(&mut state.simple_memo);
            let routed = msg::parse_simple_data_memo(payload, &limits, &mut memo)
                .map(|(data, _)| self.simple_data(conn, channel, msgno, payload, data));
            if let Some(state) = self.channels.get_mut(&(conn, channel)) {
                state.simple_memo = memo;
                // A route is only ever followed for a head the memo recalls.
                if let Some(at) = routed
                    .flatten()
                    .filter(|_| state.simple_memo.head_len().is_some())
                {
                    state.simple_route = Some(SimpleRoute { epoch, at });
                }
            }
            if routed.is_some() {
                return;
            }
        }
        self.routes_may_change();
        let operation = msg::parse_message(payload, &self.config.limits);
        self.operation(conn, channel, Answer::Msg(msgno), &operation);
    }

    fn operation(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        operation: &Result<Operation, msg::OpError>,
    ) {
        let refuse = |text: &'static str| Err((code::PARAMETER_ERROR, text));
        // Step 1 of attach and of bind (APEX-10, APEX-17): the transID must not be live on
        // this channel.
        if let Ok(Operation::Attach { trans_id, .. } | Operation::Bind { trans_id, .. }) = operation
        {
            if self.trans_live(conn, channel, *trans_id) {
                let busy = Err((apex_code::IN_PROGRESS, "transaction already in progress"));
                return self.answer(conn, channel, answer, busy);
            }
        }
        // Matched by reference: moving the operation (a `Data` is some 300 octets) into a
        // tuple and out again showed as memmove in profiles.
        match (operation, answer) {
            (
                Ok(Operation::Attach {
                    endpoint,
                    trans_id,
                    options,
                }),
                _,
            ) => self.attach(conn, channel, answer, endpoint, *trans_id, options),
            (
                Ok(Operation::Bind {
                    relay, trans_id, ..
                }),
                _,
            ) => self.bind(conn, channel, answer, relay, *trans_id),
            (Ok(Operation::Terminate { trans_id, .. }), Answer::Msg(msgno)) => {
                self.terminate(conn, channel, msgno, *trans_id)
            }
            (Ok(Operation::Data(data)), Answer::Msg(msgno)) => {
                self.data(conn, channel, msgno, data)
            }
            (Ok(Operation::Ok | Operation::Error { .. }), _) => self.answer(
                conn,
                channel,
                answer,
                refuse("ok and error are replies, not requests"),
            ),
            (Ok(_), Answer::Start(_)) => self.answer(
                conn,
                channel,
                answer,
                refuse("only attach or bind may be piggybacked"),
            ),
            (Err(e), _) => self.answer(conn, channel, answer, Err((e.code, &e.text))),
        }
    }

    fn answer(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        result: Result<(), (u16, &str)>,
    ) {
        self.answer_owned(
            conn,
            channel,
            answer,
            result.map_err(|(c, t)| (c, t.to_owned())),
        );
    }

    fn answer_owned(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        result: Result<(), (u16, String)>,
    ) {
        let action = match (answer, result) {
            (Answer::Msg(msgno), result) => {
                let (positive, payload) = match result {
                    Ok(()) => (true, msg::ok_payload()),
                    Err((code, text)) => (false, msg::error_payload(code, &text)),
                };
                let reply = MsgReply {
                    channel,
                    msgno,
                    positive,
                    payload,
                };
                if self.answering_directly == Some(conn) {
                    self.direct_replies.push(reply);
                    return;
                }
                Action::Reply { conn, reply }
            }
            (Answer::Start(start_id), Ok(())) => Action::StartReply {
                conn,
                start_id,
                content: Bytes::from_static(b"<ok />"),
            },
            (Answer::Start(start_id), Err((code, text))) => Action::StartReply {
                conn,
                start_id,
                content: Bytes::from(msg::error_xml(code, &text).trim_end().to_owned()),
            },
        };
        self.actions.push_back(action);
        if let Answer::Start(_) = answer {
            // The channel exists for the peer once this reply is out: release what waited.
            if let Some(state) = self.channels.get_mut(&(conn, channel)) {
                state.ready = true;
                for (payload, report) in std::mem::take(&mut state.waiting) {
                    state.sent.push_back(Sent::Delivery(report));
                    self.actions.push_back(Action::Send {
                        conn,
                        channel,
                        payload,
                        source: None,
                    });
                }
            }
        }
    }

    fn trans_live(&self, conn: ConnId, channel: u32, trans_id: u32) -> bool {
        self.channels
            .get(&(conn, channel))
            .is_some_and(|c| c.associations.contains_key(&trans_id))
    }

    /// RFC 3340 §4.4.1 steps 1-6 (APEX-10..15).
    fn attach(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        endpoint: &str,
        trans_id: u32,
        options: &[ApexOption],
    ) {
        let endpoint = match self.parse_endpoint(endpoint) {
            Ok(e) => e,
            Err(e) => {
                return self.answer_owned(
                    conn,
                    channel,
                    answer,
                    Err((code::PARAMETER_ERROR, e.to_string())),
                )
            }
        };
        if !self.serves(endpoint.domain()) {
            return self.answer(
                conn,
                channel,
                answer,
                Err((
                    code::PARAMETER_INVALID,
                    "endpoint is not in this relay's domain",
                )),
            );
        }
        // Step 3 (APEX-12): attach only on apex-edge sessions, and never as a service.
        if self.connections.get(&conn) != Some(&ConnKind::Edge) || endpoint.is_service() {
            return self.answer(
                conn,
                channel,
                answer,
                Err((
                    apex_code::NOT_AUTHORIZED,
                    "not authorized to attach as this endpoint",
                )),
            );
        }
        // Step 4 (APEX-13, APEX-37): options before the duplicate check.
        let overriding = match options::attach_options(options) {
            Ok(o) => o.override_existing,
            Err(e) => return self.answer_owned(conn, channel, answer, Err((e.code, e.text))),
        };
        let at = self.at(conn, channel);
        let home = home_shard(&endpoint, self.config.shards);
        if home == self.config.shard {
            let result = self.arbitrate(&endpoint, at, overriding);
            self.finish_attach(endpoint, at, trans_id, answer, result);
        } else {
            let id = self.next_request;
            self.next_request += 1;
            self.pending.insert(
                id,
                PendingAttach {
                    endpoint: endpoint.clone(),
                    at,
                    trans_id,
                    answer,
                },
            );
            self.actions.push_back(Action::ToShard {
                shard: home,
                envelope: Envelope::AttachRequest {
                    id,
                    endpoint,
                    at,
                    overriding,
                },
            });
        }
    }

    /// Step 5 at the endpoint's home shard: one attachment per endpoint (APEX-14), unless the
    /// attach overrides the old one, which is then terminated with 556.
    fn arbitrate(
        &mut self,
        endpoint: &Endpoint,
        at: ChannelRef,
        overriding: bool,
    ) -> Result<(), u16> {
        match self.directory.get(endpoint).copied() {
            Some(old) if old != at && !overriding => Err(code::TRANSACTION_FAILED),
            Some(old) if old != at => {
                self.evict(endpoint.clone(), old);
                self.record_attached(endpoint.clone(), at);
                Ok(())
            }
            _ => {
                self.record_attached(endpoint.clone(), at);
                Ok(())
            }
        }
    }

    fn record_attached(&mut self, endpoint: Endpoint, at: ChannelRef) {
        self.now_attached(endpoint.clone(), at);
        self.broadcast(|| Envelope::Attached {
            endpoint: endpoint.clone(),
            at,
        });
    }

    fn broadcast(&mut self, envelope: impl Fn() -> Envelope) {
        for shard in (0..self.config.shards).filter(|s| *s != self.config.shard) {
            self.actions.push_back(Action::ToShard {
                shard,
                envelope: envelope(),
            });
        }
    }

    fn evict(&mut self, endpoint: Endpoint, old: ChannelRef) {
        if old.shard == self.config.shard {
            self.end_attachment(&endpoint, old);
        } else {
            self.actions.push_back(Action::ToShard {
                shard: old.shard,
                envelope: Envelope::Evict { endpoint, at: old },
            });
        }
    }

    /// Ends a local attachment at the relay's initiative: `terminate` with 556 (RFC 3342).
    fn end_attachment(&mut self, endpoint: &Endpoint, at: ChannelRef) {
        let Some(state) = self.channels.get_mut(&(at.conn, at.channel)) else {
            return;
        };
        let found = state
            .associations
            .iter()
            .find(|(_, a)| matches!(a, Association::Attached(e) if e == endpoint))
            .map(|(t, _)| *t);
        if let Some(trans_id) = found {
            state.associations.remove(&trans_id);
            state.sent.push_back(Sent::Notice);
            self.actions.push_back(Action::Send {
                conn: at.conn,
                channel: at.channel,
                payload: options::override_terminate_payload(trans_id),
                source: None,
            });
        }
    }

    fn finish_attach(
        &mut self,
        endpoint: Endpoint,
        at: ChannelRef,
        trans_id: u32,
        answer: Answer,
        result: Result<(), u16>,
    ) {
        match result {
            Ok(()) => {
                self.now_attached(endpoint.clone(), at);
                self.channels
                    .entry((at.conn, at.channel))
                    .or_default()
                    .associations
                    .insert(trans_id, Association::Attached(endpoint));
                self.answer(at.conn, at.channel, answer, Ok(()));
            }
            Err(code) => self.answer(
                at.conn,
                at.channel,
                answer,
                Err((code, "endpoint is already attached")),
            ),
        }
    }

    fn detach(&mut self, endpoint: Endpoint, at: ChannelRef) {
        if self.directory.get(&endpoint) == Some(&at) {
            self.directory.remove(&endpoint);
        }
        self.broadcast(|| Envelope::Detached {
            endpoint: endpoint.clone(),
            at,
        });
    }

    /// RFC 3340 §4.4.2 (APEX-17): binds are accepted on apex-mesh sessions.
    fn bind(&mut self, conn: ConnId, channel: u32, answer: Answer, relay: &str, trans_id: u32) {
        if self.connections.get(&conn) != Some(&ConnKind::Mesh)
            || crate::apex::addr::validate_domain(relay).is_err()
        {
            return self.answer(
                conn,
                channel,
                answer,
                Err((
                    apex_code::NOT_AUTHORIZED,
                    "not authorized to bind for this domain",
                )),
            );
        }
        self.channels
            .entry((conn, channel))
            .or_default()
            .associations
            .insert(trans_id, Association::Bound(relay.to_owned()));
        self.answer(conn, channel, answer, Ok(()));
    }

    /// RFC 3340 §4.4.3 (APEX-18, APEX-19).
    fn terminate(&mut self, conn: ConnId, channel: u32, msgno: u32, trans_id: u32) {
        let answer = Answer::Msg(msgno);
        if trans_id == 0 {
            // Every association of this peer over the whole session.
            let keys: Vec<(ConnId, u32)> = self
                .channels
                .keys()
                .filter(|(c, _)| *c == conn)
                .copied()
                .collect();
            for key in keys {
                let ended: Vec<Association> = self
                    .channels
                    .get_mut(&key)
                    .map(|s| s.associations.drain().map(|(_, a)| a).collect())
                    .unwrap_or_default();
                for association in ended {
                    if let Association::Attached(endpoint) = association {
                        self.detach(endpoint, self.at(key.0, key.1));
                    }
                }
            }
            return self.answer(conn, channel, answer, Ok(()));
        }
        let removed = self
            .channels
            .get_mut(&(conn, channel))
            .and_then(|s| s.associations.remove(&trans_id));
        match removed {
            None => self.answer(
                conn,
                channel,
                answer,
                Err((code::ACTION_NOT_TAKEN, "unknown transaction-identifier")),
            ),
            Some(association) => {
                if let Association::Attached(endpoint) = association {
                    self.detach(endpoint, self.at(conn, channel));
                }
                self.answer(conn, channel, answer, Ok(()));
            }
        }
    }

    fn associations_of(&self, conn: ConnId) -> impl Iterator<Item = &Association> {
        self.conn_channels
            .get(&conn)
            .into_iter()
            .flatten()
            .filter_map(move |channel| self.channels.get(&(conn, *channel)))
            .flat_map(|s| s.associations.values())
    }

    /// Step 1 of RFC 3340 §4.4.4.1 (APEX-22): may the peer on this channel send in the name of
    /// `identity`? The originator when it may; otherwise the error to answer.
    fn authorize(
        &mut self,
        conn: ConnId,
        channel: u32,
        identity: &str,
    ) -> Result<Endpoint, (u16, String)> {
        let kind = self.connections.get(&conn).copied();
        // Nearly always the originator is the endpoint attached on this very channel, spelled
        // as it attached: then it is that endpoint, with no parsing and no lookup.
        if kind == Some(ConnKind::Edge) {
            let attached_here = self.channels.get(&(conn, channel)).and_then(|c| {
                c.associations.values().find_map(|a| match a {
                    Association::Attached(e) if e.as_str() == identity => Some(e),
                    _ => None,
                })
            });
            if let Some(endpoint) = attached_here {
                return Ok(endpoint.clone());
            }
        }
        let originator = self
            .parse_endpoint(identity)
            .map_err(|e| (code::PARAMETER_ERROR, e.to_string()))?;
        let may_send_as = |a: &Association| match (kind, a) {
            (Some(ConnKind::Edge), Association::Attached(e)) => *e == originator,
            (Some(ConnKind::Mesh), Association::Bound(d)) => {
                originator.same_domain(d)
                    || self
                        .config
                        .trusted
                        .iter()
                        .any(|t| t == "*" || t.eq_ignore_ascii_case(d))
            }
            _ => false,
        };
        // Usually the originator attached (or the relay bound) on this very channel; only
        // otherwise look at the rest of the session.
        let authorized = self
            .channels
            .get(&(conn, channel))
            .is_some_and(|c| c.associations.values().any(may_send_as))
            || self.associations_of(conn).any(may_send_as);
        if !authorized {
            return Err((
                apex_code::NOT_AUTHORIZED,
                "not authorized to send as the originator".to_owned(),
            ));
        }
        Ok(originator)
    }

    /// [`Relay::data`] for [`SimpleData`]: one recipient and no options, so no option applies
    /// or asks for a report, and the payload goes on exactly as received (APEX-28). Routes as
    /// `data` does, without building a [`Data`] first.
    /// A [`SimpleData`]. Returns where it went straight to the recipient's channel, for the
    /// next data with the same identities (`None`: another way, worked out every time).
    fn simple_data(
        &mut self,
        conn: ConnId,
        channel: u32,
        msgno: u32,
        payload: &Bytes,
        data: SimpleData<'_>,
    ) -> Option<ChannelRef> {
        let answer = Answer::Msg(msgno);
        let originator = match self.authorize(conn, channel, data.originator) {
            Ok(o) => o,
            Err(refusal) => {
                self.answer_owned(conn, channel, answer, Err(refusal));
                return None;
            }
        };
        if self.refuses(data.recipient) {
            let refusal = Err((code::ACTION_NOT_TAKEN_TRANSIENT, RECIPIENT_NOT_TAKING));
            self.answer(conn, channel, answer, refusal);
            return None;
        }
        self.answer(conn, channel, answer, Ok(()));
        // An invalid recipient is only ever reported when a statusRequest asks (APEX-38).
        let target = self.parse_endpoint(data.recipient).ok()?;
        if self.serves(target.domain()) {
            self.deliver_local(&originator, &target, payload.clone(), None, None)
        } else {
            self.actions.push_back(Action::Forward {
                domain: target.domain().to_ascii_lowercase(),
                payload: payload.clone(),
            });
            None
        }
    }

    /// RFC 3340 §4.4.4.1 (APEX-22..25).
    fn data(&mut self, conn: ConnId, channel: u32, msgno: u32, data: &Data) {
        let answer = Answer::Msg(msgno);
        // Step 1: may this peer send in the originator's name?
        let originator = match self.authorize(conn, channel, &data.originator.identity) {
            Ok(o) => o,
            Err(refusal) => return self.answer_owned(conn, channel, answer, Err(refusal)),
        };
        // Step 2: per-data options that apply here (APEX-36).
        if let Err(e) = options::check_must_understand(&data.options, Hop::Receiving)
            .and_then(|()| options::check_must_understand(&data.originator.options, Hop::Receiving))
        {
            return self.answer_owned(conn, channel, answer, Err((e.code, e.text)));
        }
        // Data for one recipient that takes nothing is refused rather than accepted and then
        // dropped (for several, each refusing one is reported on its own).
        if let [only] = data.recipients.as_slice() {
            if self.refuses(&only.identity) {
                let refusal = Err((code::ACTION_NOT_TAKEN_TRANSIENT, RECIPIENT_NOT_TAKING));
                return self.answer(conn, channel, answer, refusal);
            }
        }
        // Step 3: accepted (not yet delivered).
        self.answer(conn, channel, answer, Ok(()));
        // Steps 4-5: each recipient, routed on its own.
        let mut remote: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, recipient) in data.recipients.iter().enumerate() {
            let report = options::status_requests_for(data, i, Hop::Final)
                .first()
                .map(|&trans_id| {
                    Box::new(ReportRequest {
                        trans_id,
                        originator: originator.clone(),
                        recipient: recipient.identity.clone(),
                    })
                });
            let target = match self.parse_endpoint(&recipient.identity) {
                Ok(t) => t,
                Err(_) => {
                    self.report(
                        report,
                        code::PARAMETER_INVALID,
                        "invalid recipient identity",
                    );
                    continue;
                }
            };
            if !self.serves(target.domain()) {
                remote
                    .entry(target.domain().to_ascii_lowercase())
                    .or_default()
                    .push(i);
                continue;
            }
            // This relay delivers: `final` options now apply, per-data and per-originator ones
            // too (APEX-36); one it does not understand fails this recipient.
            let understood = options::check_must_understand(&data.options, Hop::Final)
                .and_then(|()| options::check_must_understand(&data.originator.options, Hop::Final))
                .and_then(|()| options::check_must_understand(&recipient.options, Hop::Final));
            if let Err(e) = understood {
                self.report(report, e.code, &e.text);
                continue;
            }
            match options::prepare_delivery(&data.options, self.now_ms, self.now_ms) {
                Ok(options::Delivery::Deliver {
                    options,
                    reports,
                    timings,
                }) => {
                    self.option_reports(&reports, &originator, &[recipient.identity.as_str()]);
                    let payload = rebuild(data, &[i], &options);
                    let hold = options::hold_requested(&data.options, Hop::Final)
                        .then(|| self.config.hold.deadline(self.now_ms, timings.first()));
                    self.deliver_local(&originator, &target, payload, report, hold);
                }
                Ok(options::Delivery::Drop { reports }) => {
                    self.option_reports(&reports, &originator, &[recipient.identity.as_str()]);
                }
                Err(e) => self.report(report, e.code, &e.text),
            }
        }
        for (domain, recipients) in remote {
            let names: Vec<&str> = recipients
                .iter()
                .map(|&i| data.recipients[i].identity.as_str())
                .collect();
            match options::prepare_forward(&data.options, self.now_ms, self.now_ms) {
                Ok(options::Forward::Send { options, reports }) => {
                    self.option_reports(&reports, &originator, &names);
                    let payload = rebuild(data, &recipients, &options);
                    self.actions.push_back(Action::Forward { domain, payload });
                }
                Ok(options::Forward::Drop { reports }) => {
                    // A routing loop or an expired deadline (dataHopping, dataTiming).
                    self.option_reports(&reports, &originator, &names);
                }
                Err(e) => {
                    for &i in &recipients {
                        let report = options::status_requests_for(data, i, Hop::Intermediate)
                            .first()
                            .map(|&trans_id| {
                                Box::new(ReportRequest {
                                    trans_id,
                                    originator: originator.clone(),
                                    recipient: data.recipients[i].identity.clone(),
                                })
                            });
                        self.report(report, e.code, &e.text);
                    }
                }
            }
        }
    }

    /// Sends the reports options asked for (dataTiming, dataHopping) to the originator.
    fn option_reports(
        &mut self,
        reports: &[options::Report],
        originator: &Endpoint,
        recipients: &[&str],
    ) {
        for report in reports {
            let trans_id = self.next_report_trans;
            self.next_report_trans = self.next_report_trans % crate::limits::MAX_31BIT + 1;
            let payload = report.payload(
                &self.config.domain,
                originator.as_str(),
                recipients,
                trans_id,
            );
            self.route_report(payload, originator);
        }
    }

    /// Step 5.3 (APEX-25): access check, then the attached recipient's channel.
    /// `hold`: the recipient asked to be held for (hold4Endpoint) until this deadline.
    fn deliver_local(
        &mut self,
        originator: &Endpoint,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        hold: Option<Option<u64>>,
    ) -> Option<ChannelRef> {
        // Services inside the relay (the report service) reach endpoints without access entries
        // (RFC 3341 §3 and RFC 3340 §4.4.4.1 step 5.3 leave this open).
        let allowed = originator.is_service() || self.may_send(recipient, originator);
        if !allowed {
            self.report(report, apex_code::NOT_AUTHORIZED, "access denied");
            return None;
        }
        self.deliver_to(recipient, payload, report, hold)
    }

    /// Delivers to the recipient's channel. A replica that does not know the recipient may be
    /// behind the home shard (the `Attached` broadcast can still be in a shard queue after the
    /// endpoint was answered), so such data goes to the home shard, which holds or reports.
    fn deliver_to(
        &mut self,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        hold: Option<Option<u64>>,
    ) -> Option<ChannelRef> {
        let Some(at) = self.directory.get(recipient).copied() else {
            let home = home_shard(recipient, self.config.shards);
            if home != self.config.shard {
                self.actions.push_back(Action::ToShard {
                    shard: home,
                    envelope: Envelope::DeliverHome {
                        recipient: recipient.clone(),
                        payload,
                        report,
                        hold,
                        source: self.current_source,
                    },
                });
                return None;
            }
            if let Some(deadline) = hold {
                if self
                    .config
                    .hold
                    .admits(self.held_messages, self.held_bytes, payload.len())
                {
                    self.held_messages += 1;
                    self.held_bytes += payload.len();
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
                        });
                    return None;
                }
                self.report(report, code::ACTION_NOT_TAKEN, "hold queue is full");
                return None;
            }
            self.report(report, code::ACTION_NOT_TAKEN, "endpoint is not attached");
            return None;
        };
        self.deliver_at(at, payload, report);
        Some(at)
    }

    /// [`Endpoint::parse`], remembered: parsing is a pure function of the text, and a relay sees
    /// the same identities over and over. Failures are not cached. Endpoints parsed from the
    /// same text share their memory, so the directory's key (parsed here at attach) and a data
    /// message's recipient compare equal by pointer, without comparing their text.
    fn parse_endpoint(&mut self, text: &str) -> Result<Endpoint, crate::apex::addr::AddrError> {
        if let Some(known) = self.parsed.get(text) {
            return Ok(known.clone());
        }
        let endpoint = Endpoint::parse(text)?;
        if self.parsed.len() >= PARSED_CACHE_ENTRIES {
            self.parsed.clear();
        }
        self.parsed.insert(text.into(), endpoint.clone());
        Ok(endpoint)
    }

    /// Whether the recipient's access entries grant the originator `core:data` (APEX-25).
    fn may_send(&mut self, recipient: &Endpoint, originator: &Endpoint) -> bool {
        if let Some(&known) = self
            .access_cache
            .get(recipient)
            .and_then(|m| m.get(originator))
        {
            return known;
        }
        let allowed = self
            .config
            .access
            .allows(recipient, originator, "core:data");
        if self.access_cached >= ACCESS_CACHE_ENTRIES {
            self.access_cache.clear();
            self.access_cached = 0;
        }
        self.access_cache
            .entry(recipient.clone())
            .or_default()
            .insert(originator.clone(), allowed);
        self.access_cached += 1;
        allowed
    }

    /// `endpoint` is attached at `at` now: record it and release what was held for it.
    fn now_attached(&mut self, endpoint: Endpoint, at: ChannelRef) {
        if let Some(queue) = self.held.remove(&endpoint) {
            self.as_own(|relay| {
                for held in queue {
                    relay.held_messages -= 1;
                    relay.held_bytes -= held.payload.len();
                    relay.deliver_at(at, held.payload, held.report);
                }
            });
        }
        self.directory.insert(endpoint, at);
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
                    expired.push((held.payload.len(), held.report.take()));
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
        for (size, report) in expired {
            self.held_messages -= 1;
            self.held_bytes -= size;
            self.report(
                report,
                code::ACTION_NOT_TAKEN,
                "endpoint did not attach in time",
            );
        }
    }

    fn deliver_at(&mut self, at: ChannelRef, payload: Bytes, report: Option<Report>) {
        if self.is_refusing(&at) {
            return self.report(
                report,
                code::ACTION_NOT_TAKEN_TRANSIENT,
                RECIPIENT_NOT_TAKING,
            );
        }
        if at.shard != self.config.shard {
            self.actions.push_back(Action::ToShard {
                shard: at.shard,
                envelope: Envelope::Deliver {
                    at,
                    payload,
                    report,
                    source: self.current_source,
                },
            });
            return;
        }
        match self.channels.get_mut(&(at.conn, at.channel)) {
            Some(state) if !state.ready => state.waiting.push((payload, report)),
            Some(state) => {
                state.sent.push_back(Sent::Delivery(report));
                self.actions.push_back(Action::Send {
                    conn: at.conn,
                    channel: at.channel,
                    payload,
                    source: self.current_source,
                });
            }
            None => self.report(report, code::ACTION_NOT_TAKEN, "endpoint is not attached"),
        }
    }

    /// Sends a statusResponse from `apex=report@<domain>` to the originator (APEX-38).
    fn report(&mut self, request: Option<Report>, reply_code: u16, text: &str) {
        let Some(request) = request else { return };
        self.as_own(|relay| relay.send_report(&request, reply_code, text));
    }

    fn send_report(&mut self, request: &ReportRequest, reply_code: u16, text: &str) {
        let reporter = options::report_originator(&self.config.domain);
        let Ok(reporter) = Endpoint::parse(&reporter) else {
            return;
        };
        let destination = options::Destination {
            identity: &request.recipient,
            code: reply_code,
            text,
        };
        let xml = options::status_response_xml(request.trans_id, &[destination]);
        let payload = DataBuilder::new(reporter.as_str())
            .to(request.originator.as_str())
            .markup(&xml);
        self.route_report(payload, &request.originator);
    }

    /// Sends a report (a data from `apex=report`) to `originator`, locally or over the mesh.
    fn route_report(&mut self, payload: Bytes, originator: &Endpoint) {
        self.as_own(|relay| relay.route_own_report(payload, originator));
    }

    fn route_own_report(&mut self, payload: Bytes, originator: &Endpoint) {
        if self.serves(originator.domain()) {
            let Ok(reporter) = Endpoint::parse(&options::report_originator(&self.config.domain))
            else {
                return;
            };
            self.deliver_local(&reporter, originator, payload, None, None);
        } else {
            self.actions.push_back(Action::Forward {
                domain: originator.domain().to_ascii_lowercase(),
                payload,
            });
        }
    }

    /// A reply to one of the relay's MSGs on `channel` (replies come in order, BEEP-35).
    pub fn handle_reply(&mut self, conn: ConnId, channel: u32, positive: bool, payload: &Bytes) {
        let Some(report) = self.settled_delivery(conn, channel, |sent| sent.pop_front()) else {
            return;
        };
        if positive {
            self.report(report, apex_code::SUCCESS, "");
        } else {
            let (code, text) = match msg::parse_message(payload, &self.config.limits) {
                Ok(Operation::Error { code, text }) => (code, text),
                _ => (code::ACTION_NOT_TAKEN, "refused by the endpoint".to_owned()),
            };
            self.report(report, code, &text);
        }
    }

    /// Takes the relay's MSG on `channel` that `pick` chooses from those awaiting a reply;
    /// when it was a delivery, its report request (the outcome is then known).
    fn settled_delivery(
        &mut self,
        conn: ConnId,
        channel: u32,
        pick: impl FnOnce(&mut VecDeque<Sent>) -> Option<Sent>,
    ) -> Option<Option<Report>> {
        match pick(&mut self.channels.get_mut(&(conn, channel))?.sent)? {
            Sent::Delivery(report) => Some(report),
            Sent::Notice => None,
        }
    }

    /// A MSG of [`Action::Send`] on `channel` could not be queued (the channel is closing or
    /// gone; not for lack of room, which the runtime waits out): the delivery failed, reported
    /// when asked (APEX-38). It is the newest of the channel's MSGs, not the oldest a reply
    /// would match: such a failure is permanent for the channel, so every later MSG on it
    /// fails too, and the failed ones are always the newest entries, while MSGs already
    /// queued before it may still be answered.
    pub fn send_failed(&mut self, conn: ConnId, channel: u32, reason: &str) {
        self.routes_may_change();
        if let Some(report) = self.settled_delivery(conn, channel, |sent| sent.pop_back()) {
            self.report(report, code::ACTION_NOT_TAKEN, reason);
        }
    }

    /// The outcome of forwarding to another relay, for reports (APEX-24).
    pub fn forward_failed(&mut self, payload: &Bytes, reason: &str) {
        self.routes_may_change();
        if let Ok(Operation::Data(data)) = msg::parse_message(payload, &self.config.limits) {
            let Ok(originator) = Endpoint::parse(&data.originator.identity) else {
                return;
            };
            for (i, recipient) in data.recipients.iter().enumerate() {
                if let Some(&trans_id) = options::status_requests_for(&data, i, Hop::Final).first()
                {
                    let request = Box::new(ReportRequest {
                        trans_id,
                        originator: originator.clone(),
                        recipient: recipient.identity.clone(),
                    });
                    self.report(Some(request), code::ACTION_NOT_TAKEN, reason);
                }
            }
        }
    }

    /// An envelope from another shard.
    pub fn handle_envelope(&mut self, envelope: Envelope) {
        self.routes_may_change();
        match envelope {
            Envelope::AttachRequest {
                id,
                endpoint,
                at,
                overriding,
            } => {
                let result = self.arbitrate(&endpoint, at, overriding);
                self.actions.push_back(Action::ToShard {
                    shard: at.shard,
                    envelope: Envelope::AttachVerdict { id, result },
                });
            }
            Envelope::AttachVerdict { id, result } => {
                if let Some(p) = self.pending.remove(&id) {
                    if result.is_ok() && !self.channels.contains_key(&(p.at.conn, p.at.channel)) {
                        // The channel went away meanwhile: undo the attachment.
                        self.detach(p.endpoint, p.at);
                        return;
                    }
                    self.finish_attach(p.endpoint, p.at, p.trans_id, p.answer, result);
                }
            }
            Envelope::Attached { endpoint, at } => self.now_attached(endpoint, at),
            Envelope::Detached { endpoint, at } => {
                if self.directory.get(&endpoint) == Some(&at) {
                    self.directory.remove(&endpoint);
                }
            }
            Envelope::Evict { endpoint, at } => self.end_attachment(&endpoint, at),
            Envelope::Forward { domain, payload } => {
                self.actions.push_back(Action::Forward { domain, payload })
            }
            Envelope::DeliverHome {
                recipient,
                payload,
                report,
                hold,
                source,
            } => {
                self.current_source = source;
                self.deliver_to(&recipient, payload, report, hold);
                self.current_source = None;
            }
            Envelope::Deliver {
                at,
                payload,
                report,
                source,
            } => {
                self.current_source = source;
                self.deliver_at(at, payload, report);
                self.current_source = None;
            }
            Envelope::Refusing { at, refusing } => self.set_refusing(at, refusing),
            // The shard core's business: a relay handed one has nothing to do with it.
            Envelope::Window { .. } => {}
        }
    }
}

/// The data to send onward: only `recipients`, the per-data options replaced by `options`
/// (rewritten or removed ones edited in place), every other byte as received (APEX-28).
fn rebuild(data: &Data, recipients: &[usize], options: &[ApexOption]) -> Bytes {
    let mut edits = Vec::new();
    for (i, party) in data.recipients.iter().enumerate() {
        if !recipients.contains(&i) {
            edits.push(Edit::remove(&party.raw));
        }
    }
    for old in &data.options {
        match options
            .iter()
            .find(|new| new.name() == old.name() && new.trans_id == old.trans_id)
        {
            Some(new) if new.raw == old.raw => {}
            Some(new) => edits.push(Edit::replace(&old.raw, new.raw.clone())),
            None => edits.push(Edit::remove(&old.raw)),
        }
    }
    options::edit_payload(data.payload(), &edits)
        .unwrap_or_else(|| data.payload_for(recipients, |o| options.iter().any(|n| n.raw == o.raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Relay {
        Relay::new(RelayConfig {
            domain: "example.com".into(),
            shard: 0,
            shards: 1,
            limits: ApexLimits::default(),
            access: AccessTable::new(),
            trusted: Vec::new(),
            hold: options::HoldLimits::default(),
        })
    }

    /// A relay where every endpoint of example.com may send data to every other.
    fn granted_relay() -> Relay {
        let mut access = AccessTable::new();
        access
            .grant_domain(
                "example.com",
                crate::apex::access::ActorPattern::parse("*@example.com").unwrap(),
                vec![crate::apex::access::Action::CORE_DATA],
            )
            .unwrap();
        Relay::new(RelayConfig {
            access,
            ..relay().config
        })
    }

    /// A granted relay with fred attached on connection 1 and barney on connection 2, both
    /// edge sessions on channel 1; the attach replies are still queued.
    fn fred_and_barney() -> Relay {
        let mut r = granted_relay();
        r.conn_opened(1, ConnKind::Edge);
        r.conn_opened(2, ConnKind::Edge);
        r.handle_message(
            1,
            1,
            0,
            &message("<attach endpoint='fred@example.com' transID='1' />"),
        );
        r.handle_message(
            2,
            1,
            0,
            &message("<attach endpoint='barney@example.com' transID='1' />"),
        );
        r
    }

    /// APEX-38: when a delivery's MSG cannot be queued (its channel is closing), the report
    /// is about that delivery, and one sent before it still gets its own answer's report.
    #[test]
    fn a_refused_send_fails_the_newest_delivery_not_the_oldest() {
        let mut r = fred_and_barney();
        while r.poll_action().is_some() {}
        let with_status = |trans_id: u32| {
            message(&format!(
                "<data content='#C'><originator identity='fred@example.com' /><recipient identity='barney@example.com' /><option internal='statusRequest' transID='{trans_id}' /><data-content Name='C'>hi</data-content></data>"
            ))
        };
        for (msgno, trans_id) in [(1, 10), (2, 11)] {
            r.handle_message(1, 1, msgno, &with_status(trans_id));
            let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
            assert!(
                matches!(
                    actions.as_slice(),
                    [
                        Action::Reply {
                            reply: MsgReply { positive: true, .. },
                            ..
                        },
                        Action::Send { conn: 2, .. }
                    ]
                ),
                "{actions:?}"
            );
        }
        // The first delivery went out; the second was refused by the closing channel.
        r.send_failed(2, 1, "endpoint went away");
        let report = |r: &mut Relay| match r.poll_action() {
            Some(Action::Send {
                conn: 1, payload, ..
            }) => String::from_utf8_lossy(&payload).into_owned(),
            other => panic!("expected a report to fred, got {other:?}"),
        };
        let failed = report(&mut r);
        assert!(failed.contains("statusResponse transID='11'"), "{failed}");
        assert!(failed.contains("code='550'"), "{failed}");
        // Barney answers the first: its own report, a success.
        r.handle_reply(2, 1, true, &msg::ok_payload());
        let delivered = report(&mut r);
        assert!(
            delivered.contains("statusResponse transID='10'"),
            "{delivered}"
        );
        assert!(
            delivered.contains(&format!("code='{}'", apex_code::SUCCESS)),
            "{delivered}"
        );
        assert_eq!(r.poll_action(), None);
    }

    /// APEX-22 and APEX-16: an attachment on one channel authorizes data on the session's
    /// other channels and no other session's; closing a session ends its channels alone.
    #[test]
    fn a_session_s_channels_are_found_by_its_connection() {
        let mut r = fred_and_barney();
        r.channel_started(2, 3);
        while r.poll_action().is_some() {}
        let answer = |r: &mut Relay, conn, channel| {
            r.handle_message(
                conn,
                channel,
                1,
                &simple("fred@example.com", "barney@example.com"),
            );
            let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
            matches!(
                actions.first(),
                Some(Action::Reply {
                    reply: MsgReply { positive: true, .. },
                    ..
                })
            )
        };
        assert!(answer(&mut r, 1, 5), "fred's session, another channel");
        assert!(!answer(&mut r, 2, 3), "another session");
        assert_eq!(r.conn_channels[&1], [1, 5]);
        assert_eq!(r.conn_channels[&2], [1, 3]);
        r.channel_closed(2, 3);
        assert_eq!(r.conn_channels[&2], [1]);
        r.conn_closed(1);
        assert!(!r.conn_channels.contains_key(&1));
        assert!(r
            .lookup(&Endpoint::parse("fred@example.com").unwrap())
            .is_none());
        assert!(r
            .lookup(&Endpoint::parse("barney@example.com").unwrap())
            .is_some());
        assert_eq!(r.conn_channels[&2], [1]);
    }

    fn message(doc: &str) -> Bytes {
        Bytes::from(format!("Content-Type: application/beep+xml\r\n\r\n{doc}"))
    }

    fn simple(originator: &str, recipient: &str) -> Bytes {
        message(&format!(
            "<data content='#C'><originator identity='{originator}' /><recipient identity='{recipient}' /><data-content Name='C'>hi</data-content></data>"
        ))
    }

    /// APEX-22..25: data of the common shape, routed by `simple_data`, leads to exactly the
    /// actions the general path (the full `Data`) leads to, in every routing case: attached,
    /// not attached, remote, unauthorized originator, invalid identities, access denied, from
    /// an edge and from a bound relay.
    #[test]
    fn simple_data_acts_exactly_as_the_general_path() {
        let build = || {
            let mut r = fred_and_barney();
            r.conn_opened(3, ConnKind::Mesh);
            r.handle_message(3, 1, 0, &message("<bind relay='other.org' transID='1' />"));
            let setup: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
            assert!(
                setup.iter().all(|a| matches!(
                    a,
                    Action::Reply {
                        reply: MsgReply { positive: true, .. },
                        ..
                    }
                )),
                "{setup:?}"
            );
            assert!(r
                .lookup(&Endpoint::parse("barney@example.com").unwrap())
                .is_some());
            r
        };
        let (mut fast, mut general) = (build(), build().without_simple_data_path());
        let cases: [(ConnId, &str, &str); 10] = [
            (1, "fred@example.com", "barney@example.com"),
            (2, "barney@example.com", "fred@example.com"),
            (1, "fred@example.com", "barney@EXAMPLE.com"),
            (1, "fred@example.com", "nobody@example.com"),
            (1, "fred@example.com", "someone@other.org"),
            (1, "barney@example.com", "fred@example.com"),
            (1, "fred", "barney@example.com"),
            (1, "fred@example.com", "barney"),
            (3, "ann@other.org", "barney@example.com"),
            (3, "ann@third.net", "barney@example.com"),
        ];
        let mut seen = Vec::new();
        // Each case twice in a row: the second finds the channel's memo of the first's head.
        let twice = cases.iter().flat_map(|case| [*case, *case]);
        for (msgno, (conn, originator, recipient)) in (1..).zip(twice) {
            let payload = simple(originator, recipient);
            assert!(
                msg::parse_simple_data(&payload, &ApexLimits::default()).is_some(),
                "{originator} -> {recipient} must take the simple path"
            );
            let run = |r: &mut Relay| {
                r.handle_message(conn, 1, msgno, &payload);
                std::iter::from_fn(|| r.poll_action()).collect::<Vec<_>>()
            };
            let (a, b) = (run(&mut fast), run(&mut general));
            assert_eq!(a, b, "{originator} -> {recipient}");
            seen.push(a);
        }
        // The cases reach every outcome: delivered, forwarded, accepted and dropped, refused.
        let any = |f: &dyn Fn(&Action) -> bool| seen.iter().flatten().any(f);
        assert!(any(&|a| matches!(a, Action::Send { conn: 2, .. })));
        assert!(any(&|a| matches!(a, Action::Send { conn: 1, .. })));
        assert!(any(
            &|a| matches!(a, Action::Forward { domain, .. } if domain == "other.org")
        ));
        assert!(any(&|a| matches!(
            a,
            Action::Reply {
                reply: MsgReply {
                    positive: false,
                    ..
                },
                ..
            }
        )));
        assert!(seen.iter().any(|actions| actions.len() == 1
            && matches!(
                actions[0],
                Action::Reply {
                    reply: MsgReply { positive: true, .. },
                    ..
                }
            )));
    }

    /// APEX-22, APEX-16: a sender's simple data go where the general path sends them after
    /// every kind of change that decides routes: the recipient detached, attached on another
    /// channel or connection or shard, its channel or connection closed, the originator's own
    /// attachment ended. Each data is sent twice, so the second follows a remembered route.
    /// (A closed channel or connection is caught by the delivery's own look at the channel as
    /// well: the epoch guards those twice.)
    #[test]
    fn remembered_simple_routes_follow_every_change_as_the_general_path() {
        let barney = || Endpoint::parse("barney@example.com").unwrap();
        let attach = |who: &str, trans_id: u32| {
            message(&format!(
                "<attach endpoint='{who}@example.com' transID='{trans_id}' />"
            ))
        };
        type Change = Box<dyn Fn(&mut Relay)>;
        let on_shard_1 = ChannelRef {
            shard: 1,
            conn: 9,
            channel: 1,
        };
        let changes: Vec<(&str, Change)> = vec![
            ("nothing", Box::new(|_| {})),
            (
                "barney terminates",
                Box::new(|r| r.handle_message(2, 1, 1, &message("<terminate transID='1' />"))),
            ),
            (
                "barney attaches on channel 3",
                Box::new(move |r| r.handle_message(2, 3, 0, &attach("barney", 2))),
            ),
            (
                "shard 1 says barney attached there",
                Box::new(move |r| {
                    r.handle_envelope(Envelope::Attached {
                        endpoint: barney(),
                        at: on_shard_1,
                    })
                }),
            ),
            (
                "shard 1 says barney detached there",
                Box::new(move |r| {
                    r.handle_envelope(Envelope::Detached {
                        endpoint: barney(),
                        at: on_shard_1,
                    })
                }),
            ),
            (
                "barney's channel 3 closes",
                Box::new(|r| r.channel_closed(2, 3)),
            ),
            (
                "barney attaches over connection 4",
                Box::new(move |r| {
                    r.conn_opened(4, ConnKind::Edge);
                    r.handle_message(4, 1, 0, &attach("barney", 1));
                }),
            ),
            ("connection 4 closes", Box::new(|r| r.conn_closed(4))),
            (
                "barney attaches in the start of channel 5",
                Box::new(move |r| r.handle_start(2, 7, 5, &attach("barney", 3))),
            ),
            (
                "fred terminates",
                Box::new(|r| r.handle_message(1, 1, 1, &message("<terminate transID='1' />"))),
            ),
        ];
        let (mut fast, mut general) = (
            fred_and_barney(),
            fred_and_barney().without_simple_data_path(),
        );
        let data = simple("fred@example.com", "barney@example.com");
        let mut sent_to = Vec::new();
        for (step, (name, change)) in changes.iter().enumerate() {
            let msgno = 10 + 2 * step as u32;
            let run = |r: &mut Relay| {
                change(r);
                let changed: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
                let sent: Vec<Vec<Action>> = (msgno..msgno + 2)
                    .map(|msgno| {
                        r.handle_message(1, 1, msgno, &data);
                        std::iter::from_fn(|| r.poll_action()).collect()
                    })
                    .collect();
                (changed, sent)
            };
            let (a, b) = (run(&mut fast), run(&mut general));
            assert_eq!(a, b, "after {name}");
            sent_to.extend(a.1.iter().flatten().filter_map(|action| match action {
                Action::Send { conn, channel, .. } => Some((0, *conn, *channel)),
                Action::ToShard { shard, .. } => Some((*shard, 0, 0)),
                _ => None,
            }));
        }
        // The routes did change: barney was reached at each of its places in turn. (Its
        // channel in a start takes MSGs once the start is answered: none are sent before.)
        sent_to.dedup();
        assert_eq!(sent_to, [(0, 2, 1), (0, 2, 3), (1, 0, 0), (0, 4, 1)]);
    }

    /// A route is remembered only with a head the memo keeps: data whose head is too long
    /// for it (long identities) would otherwise be parsed twice, once to find the head
    /// changed and once to route it.
    #[test]
    fn no_route_is_remembered_for_a_head_the_memo_does_not_keep() {
        let mut r = fred_and_barney();
        let long = format!("{}@example.com", "f".repeat(msg::MAX_MEMO_HEAD));
        r.handle_message(
            1,
            3,
            0,
            &message(&format!("<attach endpoint='{long}' transID='1' />")),
        );
        for (channel, originator, remembered) in [(1, "fred@example.com", true), (3, &*long, false)]
        {
            r.handle_message(1, channel, 5, &simple(originator, "barney@example.com"));
            let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
            assert!(
                actions
                    .iter()
                    .any(|a| matches!(a, Action::Send { conn: 2, .. })),
                "{originator}"
            );
            let state = &r.channels[&(1, channel)];
            assert_eq!(state.simple_route.is_some(), remembered, "{originator}");
        }
    }

    /// Home and link shards ignore the domain's case (as endpoint equality does), and spread
    /// names evenly enough: over 1,000 endpoints on 4 shards, none gets under a sixth.
    #[test]
    fn home_and_link_shards_fold_case_and_spread() {
        let ep = |s: &str| Endpoint::parse(s).unwrap();
        for shards in [1, 2, 3, 8] {
            assert_eq!(
                home_shard(&ep("fred@Example.COM"), shards),
                home_shard(&ep("fred@example.com"), shards)
            );
            assert_eq!(
                domain_shard("Rubble.COM", shards),
                domain_shard("rubble.com", shards)
            );
        }
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            counts[home_shard(&ep(&format!("e{i}@example.com")), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 1000 / 6), "{counts:?}");
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            counts[domain_shard(&format!("d{i}.example"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 1000 / 6), "{counts:?}");
    }

    #[test]
    fn parsed_identities_are_remembered_within_a_bound() {
        let mut r = relay();
        let fred = r.parse_endpoint("fred@Example.com").unwrap();
        assert_eq!(fred, Endpoint::parse("fred@example.com").unwrap());
        assert_eq!(
            r.parse_endpoint("fred@Example.com").unwrap().as_str(),
            "fred@Example.com"
        );
        // Failures are answered every time and never remembered (APEX-01).
        assert!(r.parse_endpoint("fred").is_err());
        assert!(r.parse_endpoint("fred").is_err());
        assert_eq!(r.parsed.len(), 1);
        for i in 0..PARSED_CACHE_ENTRIES + 10 {
            r.parse_endpoint(&format!("e{i}@example.com")).unwrap();
            assert!(r.parsed.len() <= PARSED_CACHE_ENTRIES);
        }
    }
}
