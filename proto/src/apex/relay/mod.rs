//! The per-shard APEX relay (RFC 3340 §4.4, §4.5, §6): attachments and bindings, the endpoint
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
//!
//! Along its seams: `directory` (attach, bind, terminate, the replica), `route` (where a
//! recipient is reached from this shard, a pure function), `deliver` (data acceptance and
//! delivery), `hold` (hold4Endpoint, each originator's share of it), `report` (the report
//! service, and the outcome of forwards), `watch` (forwarded statusRequests waiting for a
//! later relay's report), `timing` (dataTiming watches on local deliveries, RFC 3342 §2),
//! `reply` (what replies to the relay's MSGs say), `error` (each refusal
//! with its reply code) and `actions` (what goes to the runtime and to other shards).

use std::collections::{HashMap, VecDeque};

use std::hash::Hasher;
use std::sync::Arc;

use rustc_hash::FxHashMap;

/// Maps keyed by endpoints, which peers choose: foldhash is seeded per map (resisting
/// collision floods like SipHash) and costs a fraction of SipHash on short keys.
type EndpointMap<V> = HashMap<Endpoint, V, foldhash::fast::RandomState>;

use bytes::Bytes;
use compact_str::CompactString;

use crate::apex::access::AccessTable;
use crate::apex::addr::Endpoint;
use crate::apex::msg::{self, apex_code, ApexLimits, ApexOption, Data, Operation, SimpleData};
use crate::apex::options::{self, Edit, Hop};
use crate::apex::service::{Outgoing, ServiceContext, Services};
use crate::beep::mgmt::{code, ErrorElement};
use crate::beep::session::{Event, ReplyKind, Session};
use crate::error::Misuse;
use crate::stats::RelayStats;
use crate::store::{HoldId, StoreDone, StoreOp, StoreRequest};

mod actions;
mod auth;
mod deliver;
mod directory;
mod durable;
mod error;
mod hold;
mod reply;
mod report;
mod route;
#[cfg(test)]
mod tests;
mod timing;
mod watch;

pub use actions::{
    Action, Envelope, ForwardReports, ForwardTiming, Hold, MsgReply, Report, ReportRequest,
    ReportSeen, StatusAsked, Stored, TimingHandle,
};
use auth::BindCheck;
pub use auth::{
    may_act_as, ActedAs, AuthMode, AuthPolicy, Credentials, SessionIdentity, MAX_NAMES_RECORDED,
};
pub use durable::DEFAULT_STORE_QUEUE;
use durable::{AwaitingStore, PersistHold};
pub use error::ApexError;
use error::RECIPIENT_NOT_TAKING;
use hold::Held;
use reply::ReplyOutcome;
pub use reply::{POORLY_FORMED_REPLY, POORLY_FORMED_REPLY_CLOSE_CODE};
pub use route::{domain_shard, home_shard};
use route::{route, Route};
pub use timing::DEFAULT_MAX_TIMING_WATCHES;
pub use watch::{ReportWatchLimits, DEFAULT_MAX_REPORT_WATCHES, DEFAULT_REPORT_TIMEOUT_MS};

/// A connection of one shard: a slot and the generation of the connection in it (see the
/// shard core's slab), so an id that outlived its connection names nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u32);

impl ConnId {
    /// The id with this number (the shard core numbers its connections; harnesses and tests
    /// that drive a [`Relay`] alone number their own).
    pub const fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// The id's number, as logs and envelopes carry it.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

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
    /// Access entries consulted for local delivery (`core:data`) and by the access service:
    /// the store's current table, replaced as a whole when it changes
    /// ([`Relay::set_access`]).
    pub access: Arc<AccessTable>,
    /// Domains whose relays are trusted intermediaries: data they send is accepted whatever the
    /// originator's domain (RFC 3340 §4.5.2, APEX-32). `*` trusts every bound relay.
    pub trusted: Vec<String>,
    /// Bounds of the hold4Endpoint queue (RFC 3342 §3).
    pub hold: options::HoldLimits,
    /// Who may attach and bind as what.
    pub auth: AuthPolicy,
    /// Most store requests the relay keeps waiting for their answer (default
    /// [`DEFAULT_STORE_QUEUE`]): past it, data to hold is refused with 450 and a service's
    /// change answered 451, rather than queued without bound behind a store that does not
    /// keep up (a stalled disk).
    pub store_queue: usize,
    /// Bounds of the watches on forwarded statusRequests (`mesh.report_timeout_ms`,
    /// `mesh.max_report_watches`; issue 19 item 7).
    pub report_watch: ReportWatchLimits,
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

impl Sent {
    /// A delivery, of data kept in the store or not, accepted at relay-clock microsecond
    /// `since`.
    fn delivery(report: Option<Report>, stored: Option<Box<Stored>>, since: u64) -> Self {
        match stored {
            Some(stored) => Sent::Stored(report, stored, since),
            None => Sent::Delivery(report, since),
        }
    }
}

/// What the relay's own MSGs on a channel were, in order, to match the replies.
#[derive(Debug)]
enum Sent {
    /// A delivery and when its data was accepted (relay-clock microseconds), for the latency
    /// [`RelayStats`] keeps.
    Delivery(Option<Report>, u64),
    /// A delivery of data kept in the store (hold4Endpoint): released when it is answered,
    /// held again when it is not.
    Stored(Option<Report>, Box<Stored>, u64),
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
    waiting: Vec<Waiting>,
    /// The head of the last simple data received on the channel (see
    /// [`msg::parse_simple_data_memo`]).
    simple_memo: msg::SimpleMemo,
    /// Where that head's data went, while nothing that routes could have changed since.
    simple_route: Option<SimpleRoute>,
    /// The peer answered one of our MSGs here with a poorly formed reply: nothing more is
    /// delivered on the channel, which is closed once our MSGs on it are answered (RFC 3080
    /// §2.2.2.1, see `reply`).
    answered_poorly: bool,
    /// That close was asked of the runtime.
    close_asked: bool,
    /// Our MSG whose one-to-many reply (ANS) was settled at its first frame: the rest of that
    /// reply is not another reply.
    one_to_many_settled: Option<u32>,
}

/// A delivery waiting for its channel to be ready.
#[derive(Debug)]
struct Waiting {
    payload: Bytes,
    report: Option<Report>,
    stored: Option<Box<Stored>>,
    /// When its data was accepted (relay-clock microseconds).
    since: u64,
}

/// A simple data's way to its recipient's channel, remembered with the sender's memo of its
/// head: while the relay's [`Relay::routes_epoch`] stands, the same two identities are
/// authorized, allowed and routed the same way, so none of that is worked out again.
#[derive(Debug, Clone, Copy)]
struct SimpleRoute {
    epoch: u64,
    at: ChannelRef,
}

/// A bind waiting for the addresses of its domain's relay.
#[derive(Debug)]
struct PendingBind {
    conn: ConnId,
    channel: u32,
    answer: Answer,
    domain: String,
    trans_id: u32,
    /// Why the bind's options refuse it once the peer proves to be the domain's relay (step 3
    /// comes after the 537 check of step 2).
    option_refusal: Option<ApexError>,
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
    /// What each connection proved about its peer; consulted only by attach and bind.
    credentials: FxHashMap<ConnId, Credentials>,
    /// What each connection attached and bound as, for its end-of-life log line (bounded per
    /// connection by [`MAX_NAMES_RECORDED`]).
    acted_as: FxHashMap<ConnId, ActedAs>,
    /// Keyed by our connection ids and channel numbers bounded per connection: a fast hash is
    /// safe here (the directory, keyed by names peers choose, keeps the default hasher).
    channels: FxHashMap<(ConnId, u32), ChannelState>,
    /// The channels of `channels` by connection: what a session's associations are looked
    /// up by, without a pass over every channel of the shard (bounded by the session's
    /// channel limit).
    conn_channels: FxHashMap<ConnId, Vec<u32>>,
    pending: HashMap<u64, PendingAttach>,
    /// Binds waiting for their domain's relay addresses ([`Action::ResolveRelay`]).
    pending_binds: Vec<PendingBind>,
    next_request: u64,
    actions: VecDeque<Action>,
    /// Milliseconds on the runtime's monotonic clock, as last told ([`Relay::set_now`]).
    now_ms: u64,
    /// The same clock in microseconds ([`Relay::set_clock`]): delivery latencies.
    now_us: u64,
    /// While an [`Envelope::Deliver`] is handled: when its data was accepted, on the other
    /// shard (the shards' clocks share their start).
    accepted_us: Option<u64>,
    /// What the relay counts, for metrics.
    stats: RelayStats,
    /// transIDs for the relay's own reports.
    next_report_trans: u32,
    /// Data held for endpoints not attached yet (hold4Endpoint), in arrival order.
    held: EndpointMap<VecDeque<Held>>,
    held_messages: usize,
    held_bytes: usize,
    /// Data in the hold queue by originator, for `hold.max_per_originator` (only originators
    /// with some held; bounded by `hold.max_messages`).
    held_by_originator: EndpointMap<usize>,
    /// The earliest deadline of held data (relay-clock ms), if any has one.
    hold_deadline: Option<u64>,
    /// `core:data` decisions by recipient then originator, for the access table in force
    /// (emptied when it is replaced). Bounded by [`ACCESS_CACHE_ENTRIES`].
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
    /// The relay's own well-known endpoints.
    services: Services,
    /// What waits for a [`StoreDone`], by token.
    awaiting_store: FxHashMap<u64, AwaitingStore>,
    next_store_token: u64,
    /// Data for recipients that are not attached, routed while a data with hold4Endpoint is
    /// handled: kept in the store before the data is acknowledged.
    persisting: Vec<PersistHold>,
    /// The report requests of recipients of that data the hold queue had no room for, and
    /// why (the queue, or the originator's share of it).
    hold_full: Vec<(Option<Report>, &'static str)>,
    /// Records whose release the store failed to make: asked again with the next request.
    release_retry: Vec<HoldId>,
    /// Forwarded statusRequests waiting for a report from a relay further on.
    watches: watch::Watches,
    /// Local deliveries of data with a `dataTiming` option, waiting for their recipient.
    timing_watches: timing::TimingWatches,
}

/// Most cached access decisions before the cache starts over.
const ACCESS_CACHE_ENTRIES: usize = 65_536;

/// Most cached parsed identities before the cache starts over.
const PARSED_CACHE_ENTRIES: usize = 16_384;

impl Relay {
    /// A relay for one shard.
    pub fn new(config: RelayConfig) -> Self {
        let domain = config.domain.clone();
        Self {
            config,
            directory: EndpointMap::default(),
            connections: FxHashMap::default(),
            credentials: FxHashMap::default(),
            acted_as: FxHashMap::default(),
            channels: FxHashMap::default(),
            conn_channels: FxHashMap::default(),
            pending: HashMap::new(),
            pending_binds: Vec::new(),
            next_request: 0,
            actions: VecDeque::new(),
            now_ms: 0,
            now_us: 0,
            accepted_us: None,
            stats: RelayStats::default(),
            next_report_trans: 1,
            held: EndpointMap::default(),
            held_messages: 0,
            held_bytes: 0,
            held_by_originator: EndpointMap::default(),
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
            services: Services::new(&domain),
            awaiting_store: FxHashMap::default(),
            next_store_token: 1,
            persisting: Vec::new(),
            hold_full: Vec::new(),
            release_retry: Vec::new(),
            watches: watch::Watches::default(),
            timing_watches: timing::TimingWatches::default(),
        }
    }

    /// Puts a new access table in force (the store changed it): the very next data is checked
    /// against it, on this shard's every path.
    pub fn set_access(&mut self, access: Arc<AccessTable>) {
        self.routes_may_change();
        self.config.access = access;
        self.access_cache.clear();
        self.access_cached = 0;
    }

    /// Keeps at most `requests` store requests waiting from now on (see
    /// [`RelayConfig::store_queue`]).
    pub fn set_store_queue(&mut self, requests: usize) {
        self.config.store_queue = requests;
    }

    /// Bounds the watches on forwarded statusRequests with `limits` from now on (watches
    /// running keep their deadline).
    pub fn set_report_watch(&mut self, limits: ReportWatchLimits) {
        self.config.report_watch = limits;
    }

    /// Forwarded statusRequests waiting for a report from a relay further on.
    pub fn watched_reports(&self) -> usize {
        self.watches.len()
    }

    /// Bounds the hold4Endpoint queue with `limits` from now on.
    pub fn set_hold_limits(&mut self, limits: options::HoldLimits) {
        self.config.hold = limits;
    }

    /// Trusts the relays of `domains` as intermediaries from now on (see
    /// [`RelayConfig::trusted`]; a reload). Binds already made stay; data is checked against
    /// the new list from the next message on.
    pub fn set_trusted(&mut self, domains: Vec<String>) {
        self.routes_may_change();
        self.config.trusted = domains;
    }

    /// Bounds the control documents parsed from now on with `limits` (a reload).
    pub fn set_apex_limits(&mut self, limits: ApexLimits) {
        self.routes_may_change();
        self.config.limits = limits;
    }

    /// The access table in force.
    pub fn access(&self) -> &AccessTable {
        &self.config.access
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
        self.set_clock(now_ms.saturating_mul(1000));
    }

    /// Tells the relay the time in microseconds of a monotonic clock (the shard core's; every
    /// shard's starts at the same instant, so times carried between shards compare).
    pub fn set_clock(&mut self, now_us: u64) {
        self.now_us = now_us;
        self.now_ms = now_us / 1000;
    }

    /// What the relay counted so far.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// The endpoints attached on this shard and their channels.
    pub fn attached_here(&self) -> impl Iterator<Item = (&Endpoint, ChannelRef)> + '_ {
        self.directory
            .iter()
            .filter(|(_, at)| at.shard == self.config.shard)
            .map(|(endpoint, at)| (endpoint, *at))
    }

    /// The relays bound on this shard's sessions: domain and connection.
    pub fn bound_relays(&self) -> Vec<(&str, ConnId)> {
        self.channels
            .iter()
            .flat_map(|((conn, _), state)| {
                state.associations.values().filter_map(move |a| match a {
                    Association::Bound(domain) => Some((domain.as_str(), *conn)),
                    Association::Attached(_) => None,
                })
            })
            .collect()
    }

    /// Data in the hold queue.
    pub fn held_count(&self) -> usize {
        self.held_messages
    }

    /// Acknowledges a data message (`ok`, RFC 3340 §4.4.4.1 step 3), counting it.
    fn accept_data(&mut self, conn: ConnId, channel: u32, msgno: u32) {
        self.stats.data_accepted += 1;
        self.answer(conn, channel, Answer::Msg(msgno), Ok(()));
    }

    /// The domain served.
    pub fn domain(&self) -> &str {
        &self.config.domain
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
        self.credentials.remove(&conn);
        self.acted_as.remove(&conn);
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
                Sent::Delivery(report, _) => Some((report, None)),
                Sent::Stored(report, stored, _) => Some((report, Some(stored))),
                Sent::Notice => None,
            });
            let unsent = state
                .waiting
                .into_iter()
                .map(|waiting| (waiting.report, waiting.stored));
            for (report, stored) in unanswered.chain(unsent).collect::<Vec<_>>() {
                match stored {
                    // Acknowledged with hold4Endpoint: it waits for the endpoint again.
                    Some(stored) => self.hold_again(report, *stored),
                    None => self.report(
                        report,
                        code::ACTION_NOT_TAKEN,
                        "the endpoint went away before answering",
                    ),
                }
            }
        }
    }

    /// Hands one event of connection `conn`'s BEEP session to the relay: what a runtime does
    /// with every event it polls from an APEX session. A `start` for APEX without a piggyback
    /// is accepted here; with one, the relay answers later through [`Action::StartReply`];
    /// other profiles are refused (550). Events that are not the relay's business (greetings,
    /// a declined release) need nothing from it.
    pub fn handle_session_event(&mut self, conn: ConnId, session: &mut Session, event: Event) {
        match event {
            Event::StartRequested(request) => {
                match request.profiles.iter().find(|p| p.uri == APEX_PROFILE) {
                    Some(offer) => match &offer.content {
                        Some(content) => {
                            // The start succeeds whatever the piggybacked attach or bind
                            // meets: its reply (`Action::StartReply`) always creates the
                            // channel, so its serverName counts (RFC 3080 §2.3.1.2, BEEP-23).
                            if let Some(name) = &request.server_name {
                                session.set_server_name(name);
                            }
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
            }
            Event::Reply {
                channel,
                msgno,
                kind,
                payload,
            } => {
                self.handle_reply(conn, channel, msgno, kind, &payload);
            }
            Event::ChannelClosed { channel, .. } => {
                self.channel_closed(conn, channel);
            }
            Event::CloseRefused { channel: 0, .. } => {
                tracing::debug!(%conn, "peer declined session release");
            }
            _ => {}
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
                    self.accept_data(conn, channel, msgno);
                    self.deliver_at(route.at, payload.clone(), None, None);
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
        // Step 1 of attach and of bind (APEX-10, APEX-17): the transID must not be live on
        // this channel.
        if let Ok(Operation::Attach { trans_id, .. } | Operation::Bind { trans_id, .. }) = operation
        {
            if self.trans_live(conn, channel, *trans_id) {
                let busy = Err(ApexError::TransactionInProgress);
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
                    relay,
                    trans_id,
                    options,
                }),
                _,
            ) => self.bind(conn, channel, answer, relay, *trans_id, options),
            (Ok(Operation::Terminate { trans_id, .. }), Answer::Msg(msgno)) => {
                self.terminate(conn, channel, msgno, *trans_id)
            }
            (Ok(Operation::Data(data)), Answer::Msg(msgno)) => {
                self.data(conn, channel, msgno, data)
            }
            (Ok(Operation::Ok | Operation::Error { .. }), _) => {
                self.answer(conn, channel, answer, Err(ApexError::NotARequest))
            }
            (Ok(_), Answer::Start(_)) => {
                self.answer(conn, channel, answer, Err(ApexError::NotPiggybackable))
            }
            (Err(e), _) => {
                let malformed = ApexError::malformed(e.code, e.text.as_str());
                self.answer(conn, channel, answer, Err(malformed))
            }
        }
    }

    /// Answers a MSG (RPY `ok` or ERR `error`) or a `start` (its piggybacked reply).
    fn answer(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        result: Result<(), ApexError>,
    ) {
        if let Err(e) = &result {
            self.stats.errors.add(e.code());
        }
        let action = match (answer, result) {
            (Answer::Msg(msgno), result) => {
                let (positive, payload) = match result {
                    Ok(()) => (true, msg::ok_payload()),
                    Err(e) => (false, msg::error_payload(e.code(), e.text())),
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
            (Answer::Start(start_id), Err(e)) => Action::StartReply {
                conn,
                start_id,
                content: Bytes::from(msg::error_xml(e.code(), e.text()).trim_end().to_owned()),
            },
        };
        self.actions.push_back(action);
        if let Answer::Start(_) = answer {
            // The channel exists for the peer once this reply is out: release what waited.
            if let Some(state) = self.channels.get_mut(&(conn, channel)) {
                state.ready = true;
                for waiting in std::mem::take(&mut state.waiting) {
                    let Waiting {
                        payload,
                        report,
                        stored,
                        since,
                    } = waiting;
                    state.sent.push_back(Sent::delivery(report, stored, since));
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
            Envelope::Forward {
                domain,
                payload,
                reports,
            } => self.actions.push_back(Action::Forward {
                domain,
                payload,
                reports,
            }),
            Envelope::ReportSeen(seen) => self.report_seen(&seen),
            Envelope::DeliverHome {
                recipient,
                payload,
                report,
                hold,
                stored,
                source,
            } => {
                self.current_source = source;
                self.deliver_to(&recipient, payload, report, hold, stored);
                self.current_source = None;
            }
            Envelope::Deliver {
                at,
                payload,
                report,
                stored,
                source,
                accepted_us,
            } => {
                self.current_source = source;
                self.accepted_us = Some(accepted_us);
                self.deliver_at(at, payload, report, stored);
                self.accepted_us = None;
                self.current_source = None;
            }
            Envelope::Refusing { at, refusing } => self.set_refusing(at, refusing),
            Envelope::TimingSettled { id, delivered } => self.timing_settled(id, delivered),
            // The shard core's business: a relay handed one has nothing to do with it.
            Envelope::Window { .. } => {}
        }
    }
}
