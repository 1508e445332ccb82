//! The shard core: one shard's BEEP sessions by connection id (accepted ones, and the
//! outbound relay links it owns), its [`Relay`], the relay MSGs waiting for room in their
//! recipients' sessions, and the backpressure that keeps one recipient that does not read from
//! slowing anyone but the channels that send to it.
//!
//! The runtime moves octets between sockets and this core, envelopes between shards, makes
//! the connections links ask for ([`Output::Connect`]), and calls
//! [`ShardCore::handle_timeout`] when [`ShardCore::poll_timeout`] says; everything the protocol
//! decides happens here, so the in-memory harness (`testing::RelayNet`) runs exactly the code
//! the runtime runs.
//!
//! ```text
//!  octets ─► handle_input(conn) ─► Session ─► events ─► Relay (or the conn's Link) ─► actions ─┐
//!  envelopes ─► handle_envelope ──────────────────────────────────────────────► Relay ────────┤
//!                                                                                              ▼
//!        execute: replies and MSGs into sessions (a full one: its backlog), envelopes,
//!        data onto links (link.rs), woken connections
//!                                                                                              │
//!  poll_transmit(conn) / poll_output (wake, to shard, connect a link) ◄────────────────────────┘
//! ```
//!
//! ## Backpressure (RFC 3081 §3.1.3, §3.1.4; backpressure.rs)
//! A relay MSG that its recipient's session cannot take yet (`max_outstanding_msgs` or
//! `max_queued_octets` reached) waits in that recipient channel's *backlog*, in order. While it
//! waits, the window of the channel whose peer sent the data is held back by the MSG's size
//! ([`Session::withhold_window`]; across shards with [`Envelope::Window`]): a sender can get at
//! most one window ahead of a recipient that does not keep up, and only the channels that send
//! to it slow down. When the recipient is on another shard, its shard holds the sender back
//! once it handles the delivery, so the sender may also be ahead by what is in flight between
//! the two shards (the runtime bounds that: `runtime.mesh_queue` envelopes per direction).
//! Replies keep flowing on those channels, so two endpoints sending to each
//! other cannot hold each other up. A recipient that takes nothing for [`Budgets::stall`]
//! (or while the shard's backlog is over [`Budgets::max_backlog_octets`]) is *refusing*: the
//! windows it held back are given back and data for it is refused with 450 (or reported, for
//! data with several recipients) until its backlog drains. Nothing accepted is dropped
//! silently: a backlog that dies with its connection is reported by the relay like every
//! unanswered delivery.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;

use crate::apex::access::AccessTable;
use crate::apex::relay::{domain_shard, Action, ForwardReports};
use crate::apex::relay::{
    ChannelRef, ConnId, ConnKind, Credentials, Envelope, Relay, SessionIdentity, APEX_PROFILE,
};
use crate::beep::mgmt::ErrorElement;
use crate::beep::output::FrameSink;
use crate::beep::session::{Lifecycle, Role, Session, SessionConfig};
use crate::error::ProtocolError;
use crate::stats::{KindCounts, LinkStates, SessionStates, ShardSnapshot};
use crate::store::{HeldMessage, HoldId, StoreDone, StoreRequest};
use std::sync::Arc;

mod backpressure;
mod link;
mod secure;
mod slab;
mod watch;
use backpressure::Backlog;
pub use link::{ConnectFailure, LinkConfig, LinkState, Phase as LinkPhase, FIRST_BACKOFF};
use link::{Link, LinkEffects};
use secure::Secured;
pub use secure::{Security, EXTERNAL, MAX_SASL_FAILURES, PLAIN, SCRAM};
use slab::Slab;
pub use slab::MAX_SLOTS;
pub use watch::{address_key, ConnLimits, Timeout};
use watch::{ConnWatch, Due};

/// Shard-wide bounds on what the sessions of one shard may make it hold, beyond what each
/// session's own [`crate::Limits`] bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    /// Most octets of relay MSGs waiting in recipients' backlogs over the shard. Past it, every
    /// recipient with a backlog refuses data until its backlog drains. What the input that
    /// crossed it had already routed (one read's worth, or envelopes already on their way
    /// from other shards) still joins the backlogs.
    pub max_backlog_octets: usize,
    /// Most octets of partial messages held for reassembly over all sessions of the shard
    /// (each session is also bounded by `Limits::max_session_assembly`).
    pub max_assembly_octets: usize,
    /// How long a recipient may take nothing from its backlog before data for it is refused.
    pub stall: Duration,
    /// Octets a recipient's backlog may hold before it holds back its senders' windows.
    pub backlog_slack: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            max_backlog_octets: 64 * 1024 * 1024,
            max_assembly_octets: 256 * 1024 * 1024,
            stall: Duration::from_secs(5),
            backlog_slack: 64 * 1024,
        }
    }
}

/// What the runtime must do after the core handled an input, polled with
/// [`ShardCore::poll_output`].
#[derive(Debug)]
pub enum Output {
    /// The connection has output to write, or may read again: wake its driver.
    Wake(ConnId),
    /// Hand the envelope to the shard's queue to `shard`.
    ToShard {
        /// Destination shard.
        shard: usize,
        /// The envelope.
        envelope: Envelope,
    },
    /// The link to `domain` needs a connection: resolve the domain's relay, connect to its
    /// apex-mesh port, then [`ShardCore::link_connected`] (and drive the connection like any
    /// other) or [`ShardCore::link_connect_failed`].
    Connect {
        /// The remote domain.
        domain: String,
    },
    /// A peer binds as `domain` without a certificate or static route naming it: find the
    /// addresses of `domain`'s relay (its `_apex-mesh._tcp` SRV targets), then
    /// [`ShardCore::relay_addresses_found`].
    ResolveRelay {
        /// The domain bound as.
        domain: String,
    },
    /// Make these changes durable, then [`ShardCore::store_done`] with the request's token
    /// (unless it is 0). Requests of one shard are applied in the order given.
    Store(StoreRequest),
}

/// What the core knows about one connection's session, for the line the runtime logs when it
/// ends ([`ShardCore::session_summary`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSummary {
    /// Complete BEEP messages received ([`Session::messages_received`]).
    pub messages_in: u64,
    /// Complete BEEP messages sent ([`Session::messages_sent`]).
    pub messages_out: u64,
    /// What the peer proved and attached or bound as.
    pub identity: SessionIdentity,
    /// For an outbound relay link: the domain whose relay it connects to.
    pub link: Option<String>,
    /// The relay ended the session because the peer did not greet in time, or left it idle.
    pub timed_out: Option<Timeout>,
}

#[derive(Debug)]
struct Conn {
    session: Session,
    /// Backlogs by recipient channel; usually empty.
    backlogs: FxHashMap<u32, Backlog>,
    /// Listed in `woken` and not yet polled.
    woken: bool,
    /// For an outbound relay link: the key of its [`Link`] (the lower-cased domain).
    link: Option<String>,
    /// The link gave up waiting for its peer to release the session: close the transport.
    abandoned: bool,
    /// TLS and SASL state, once the peer asked for either.
    secured: Option<Box<Secured>>,
    /// Deadlines of an accepted connection (a link's are its [`Link`]'s).
    watch: ConnWatch,
    /// What an accepted connection counts under in [`ShardCore::addresses`].
    address: Option<IpAddr>,
}

/// Why a delivery the session refused failed, in the report its originator asked for.
const ENDPOINT_GONE: &str = "endpoint went away";

/// One shard's sessions and relay.
#[derive(Debug)]
pub struct ShardCore {
    shard: usize,
    shards: usize,
    relay: Relay,
    session_config: SessionConfig,
    budgets: Budgets,
    conns: Slab<Conn>,
    woken: VecDeque<ConnId>,
    to_shards: VecDeque<(usize, Envelope)>,
    /// Outbound relay links this shard owns, by lower-cased domain.
    links: FxHashMap<String, Link>,
    link_config: LinkConfig,
    /// Domains whose link needs a connection, for the runtime.
    connects: VecDeque<String>,
    /// Domains whose relay addresses a bind waits for, for the runtime.
    resolves: VecDeque<String>,
    /// Store requests for the runtime ([`Output::Store`]).
    stores: VecDeque<StoreRequest>,
    /// Shutting down: links take no more data.
    stopping: bool,
    /// A deadline earlier than any [`ShardCore::poll_timeout`] gave before may have appeared.
    deadline_moved: bool,
    /// Octets in every backlog of the shard.
    backlog_octets: usize,
    /// Octets of partial messages over the shard's sessions.
    assembling: usize,
    /// The relay's clock starts here: it counts milliseconds.
    epoch: Instant,
    /// The relay asked for time at this relay-clock millisecond (held data expires).
    relay_deadline: Option<u64>,
    /// Window octets to hold back, not yet applied: a run from one sending channel.
    withholding: Option<(ChannelRef, u32)>,
    /// TLS configurations and users.
    security: Security,
    /// A tuning request paused a session's input and was answered: read the rest now.
    retry_input: bool,
    /// TLS began on a connection during the current input.
    tls_began: bool,
    /// What the shard counts beside the relay's counts (see [`ShardCore::snapshot`]).
    counts: CoreCounts,
    /// Deadlines and per-address bounds of accepted connections.
    conn_limits: ConnLimits,
    /// One entry per accepted connection with a deadline (its [`ConnWatch::armed_at`]), plus
    /// entries left behind when a deadline came earlier, skipped when they come up.
    timers: BinaryHeap<Reverse<(Instant, ConnId)>>,
    /// Accepted connections by [`address_key`]. SipHash rather than FxHash: the keys are
    /// chosen by peers.
    addresses: HashMap<IpAddr, usize>,
}

/// The shard core's own counters (the relay keeps its own).
#[derive(Debug, Default)]
struct CoreCounts {
    sessions_accepted: u64,
    protocol_errors: KindCounts,
    tls_handshakes: u64,
    sasl_failures: u64,
    overflows: u64,
    data_forwarded: u64,
    /// BEEP messages received and sent by sessions that have ended (the live ones count
    /// their own).
    ended_messages_in: u64,
    ended_messages_out: u64,
    /// Sessions ended because the peer did not greet in time, or left them idle.
    greeting_timeouts: u64,
    idle_timeouts: u64,
    /// Connections refused because their address held `max_per_address` already.
    refused_per_address: u64,
}

impl ShardCore {
    /// The core of shard `relay.shard()` of `shards`, whose listener sessions use
    /// `session_config`. `now` starts the relay's clock.
    pub fn new(
        relay: Relay,
        shard: usize,
        shards: usize,
        session_config: SessionConfig,
        budgets: Budgets,
        now: Instant,
    ) -> Self {
        let link_config = LinkConfig::new(relay.domain());
        Self {
            shard,
            shards,
            relay,
            session_config,
            budgets,
            conns: Slab::default(),
            woken: VecDeque::new(),
            to_shards: VecDeque::new(),
            links: FxHashMap::default(),
            link_config,
            connects: VecDeque::new(),
            resolves: VecDeque::new(),
            stores: VecDeque::new(),
            stopping: false,
            deadline_moved: false,
            backlog_octets: 0,
            assembling: 0,
            epoch: now,
            relay_deadline: None,
            withholding: None,
            security: Security::default(),
            retry_input: false,
            tls_began: false,
            counts: CoreCounts::default(),
            conn_limits: ConnLimits::default(),
            timers: BinaryHeap::new(),
            addresses: HashMap::new(),
        }
    }

    /// The deadlines and per-address bound of accepted connections from now on. Every
    /// connection's deadline is measured again against them.
    pub fn set_conn_limits(&mut self, limits: ConnLimits, now: Instant) {
        self.conn_limits = limits;
        self.timers.clear();
        let conns: Vec<ConnId> = self.conns.iter().map(|(conn, _)| conn).collect();
        for conn in conns {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.watch.armed_at = None;
            }
            self.watch(conn, now);
        }
    }

    /// The deadlines and per-address bound in force.
    pub fn conn_limits(&self) -> &ConnLimits {
        &self.conn_limits
    }

    /// How the shard's outbound relay links behave. Links already open keep their connection;
    /// the new bounds and waits apply from their next step on.
    pub fn set_link_config(&mut self, config: LinkConfig) {
        self.link_config = config;
        // Backoff and close waits are measured against it: the timer looks again.
        self.deadline_moved = true;
    }

    /// The shard-wide backpressure budgets from now on (a reload).
    pub fn set_budgets(&mut self, budgets: Budgets) {
        self.budgets = budgets;
        // A stalled recipient's deadline is measured against it: the timer looks again.
        self.deadline_moved = true;
    }

    /// The state of the link to `domain`, if the shard has one.
    pub fn link_state(&self, domain: &str) -> Option<LinkState> {
        self.links
            .get(&domain.to_ascii_lowercase())
            .map(|link| link.state)
    }

    /// Data queued on the link to `domain`, not yet sent.
    pub fn link_queued(&self, domain: &str) -> usize {
        self.links
            .get(&domain.to_ascii_lowercase())
            .map_or(0, Link::queued)
    }

    /// The configuration of listener sessions opened from now on.
    pub fn set_session_config(&mut self, config: SessionConfig) {
        self.session_config = config;
    }

    /// The relay (for look-ups).
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// The relay, to change its policies (a configuration reload).
    pub fn relay_mut(&mut self) -> &mut Relay {
        &mut self.relay
    }

    /// The session of `conn`.
    pub fn session(&self, conn: ConnId) -> Option<&Session> {
        self.conns.get(&conn).map(|c| &c.session)
    }

    /// What the core knows about `conn`'s session so far: its message counts, and who its
    /// peer was. Ask before [`ShardCore::close`], which forgets it.
    pub fn session_summary(&self, conn: ConnId) -> Option<SessionSummary> {
        let c = self.conns.get(&conn)?;
        Some(SessionSummary {
            messages_in: c.session.messages_received(),
            messages_out: c.session.messages_sent(),
            identity: self.relay.session_identity(conn),
            link: c
                .link
                .as_ref()
                .and_then(|key| self.links.get(key))
                .map(|link| link.domain.clone()),
            timed_out: c.watch.timed_out,
        })
    }

    /// Octets of relay MSGs waiting in backlogs over the shard.
    pub fn backlog_octets(&self) -> usize {
        self.backlog_octets
    }

    /// Octets of partial messages held over the shard's sessions.
    pub fn assembling(&self) -> usize {
        self.assembling
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The shard's counters and gauges now: the runtime sums every shard's for its metrics.
    /// Walks the shard's sessions, directory and links (a scrape's cost, not a message's).
    pub fn snapshot(&self) -> ShardSnapshot {
        let mut snapshot = ShardSnapshot {
            endpoints: self.relay.attached_here().count() as u64,
            relays_bound: self.relay.bound_relays().len() as u64,
            held_now: self.relay.held_count() as u64,
            queued_octets: self.backlog_octets as u64,
            overflows: self.counts.overflows,
            sessions_accepted: self.counts.sessions_accepted,
            greeting_timeouts: self.counts.greeting_timeouts,
            idle_timeouts: self.counts.idle_timeouts,
            refused_per_address: self.counts.refused_per_address,
            protocol_errors: self.counts.protocol_errors.clone(),
            tls_handshakes: self.counts.tls_handshakes,
            sasl_failures: self.counts.sasl_failures,
            relay: self.relay.stats().clone(),
            ..ShardSnapshot::default()
        };
        snapshot.relay.data_forwarded = self.counts.data_forwarded;
        snapshot.messages_in = self.counts.ended_messages_in;
        snapshot.messages_out = self.counts.ended_messages_out;
        let mut states = SessionStates::default();
        for (conn, c) in self.conns.iter() {
            snapshot.messages_in += c.session.messages_received();
            snapshot.messages_out += c.session.messages_sent();
            if c.link.is_some() {
                snapshot.sessions_link += 1;
            } else if self.relay.conn_kind(conn) == Some(ConnKind::Mesh) {
                snapshot.sessions_mesh += 1;
            } else {
                snapshot.sessions_edge += 1;
            }
            match c.session.lifecycle() {
                Lifecycle::Greeting => states.greeting += 1,
                Lifecycle::Open => states.open += 1,
                Lifecycle::Closing => states.closing += 1,
            }
        }
        snapshot.session_states = states;
        let mut links = LinkStates::default();
        for link in self.links.values() {
            snapshot.link_queued += link.queued() as u64;
            match link.state {
                LinkState::Idle => links.idle += 1,
                LinkState::Connecting => links.connecting += 1,
                LinkState::Backoff { .. } => links.backoff += 1,
                LinkState::Open { .. } => links.open += 1,
            }
        }
        snapshot.links = links;
        snapshot
    }

    /// The outbound links of this shard: domain, state and data queued.
    pub fn links(&self) -> Vec<(&str, LinkState, usize)> {
        self.links
            .values()
            .map(|link| (link.domain.as_str(), link.state, link.queued()))
            .collect()
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// A connection from `peer` was accepted: its listener session greets the peer. Returns
    /// the connection's id, or `None` when the shard holds [`MAX_SLOTS`] already (close it).
    pub fn open(&mut self, kind: ConnKind, peer: Option<IpAddr>, now: Instant) -> Option<ConnId> {
        let address = peer.map(address_key);
        if let (Some(address), Some(max)) = (address, self.conn_limits.max_per_address) {
            if self.addresses.get(&address).is_some_and(|n| *n >= max) {
                // One address must not take every slot of the shard (RFC 3080 §2.3.1.5: the
                // listener is not available to it, BEEP-18).
                self.counts.refused_per_address += 1;
                let error = ErrorElement::new(
                    crate::beep::mgmt::code::SERVICE_NOT_AVAILABLE,
                    "too many connections from this address",
                );
                return self.open_refusing(kind, error, now);
            }
        }
        let config = if self.security.tls_server.is_none() && self.security.users.is_empty() {
            self.session_config.clone()
        } else {
            self.security
                .listener_config(&self.session_config, kind, false, false)
        };
        let session = Session::new(Role::Listener, config);
        let conn = self.insert(kind, session, now)?;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.watch = ConnWatch::accepted(now);
            c.address = address;
        }
        if let Some(address) = address {
            *self.addresses.entry(address).or_default() += 1;
        }
        self.watch(conn, now);
        self.counts.sessions_accepted += 1;
        self.relay
            .set_credentials(conn, Credentials::from_address(peer));
        Some(conn)
    }

    /// A connection was accepted but is refused service: its session answers the greeting
    /// with `error` and ends (RFC 3080 §2.3.1.1). Returns its id as [`ShardCore::open`] does.
    pub fn open_refusing(
        &mut self,
        kind: ConnKind,
        error: ErrorElement,
        now: Instant,
    ) -> Option<ConnId> {
        let session = Session::new_refusing(self.session_config.clone(), error);
        self.insert(kind, session, now)
    }

    fn insert(&mut self, kind: ConnKind, session: Session, now: Instant) -> Option<ConnId> {
        let conn = self.conns.insert(Conn {
            session,
            backlogs: FxHashMap::default(),
            woken: false,
            link: None,
            abandoned: false,
            secured: None,
            watch: ConnWatch::default(),
            address: None,
        })?;
        self.relay.set_clock(self.us(now));
        self.relay.conn_opened(conn, kind);
        self.wake(conn);
        Some(conn)
    }

    /// Feeds octets read from `conn` to its session and runs what they lead to. `Err`: the
    /// session violated the protocol and must be aborted; [`ShardCore::close`] it. The caller
    /// polls `conn`'s output afterwards ([`ShardCore::poll_transmit`]): no [`Output::Wake`] is
    /// given for `conn` itself.
    pub fn handle_input(
        &mut self,
        conn: ConnId,
        read_buf: &mut BytesMut,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let result = self.take_input(conn, read_buf, now);
        if let Err(e) = &result {
            self.counts.protocol_errors.add(e.kind());
        }
        self.watch(conn, now);
        result
    }

    fn take_input(
        &mut self,
        conn: ConnId,
        read_buf: &mut BytesMut,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        if self.conns.get(&conn).is_some_and(|c| c.secured.is_some()) {
            return self.handle_secured_input(conn, read_buf, now);
        }
        self.tls_began = false;
        self.feed(conn, read_buf, now)?;
        if std::mem::take(&mut self.tls_began) && !read_buf.is_empty() {
            // TLS began in the middle of the buffer: the rest is the handshake.
            return self.handle_secured_input(conn, read_buf, now);
        }
        Ok(())
    }

    /// Octets of `conn`'s session (plaintext) to the session, and what they lead to.
    fn feed(
        &mut self,
        conn: ConnId,
        read_buf: &mut BytesMut,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        self.retry_input = false;
        loop {
            self.feed_once(conn, read_buf, now)?;
            if !std::mem::take(&mut self.retry_input) || read_buf.is_empty() {
                return Ok(());
            }
        }
    }

    fn feed_once(
        &mut self,
        conn: ConnId,
        read_buf: &mut BytesMut,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let now_us = self.us(now);
        let Some(c) = self.conns.get_mut(&conn) else {
            read_buf.clear();
            return Ok(());
        };
        let session = &mut c.session;
        let held = session.assembling();
        if self.assembling > held {
            // What the other sessions leave of the shard's budget.
            let others = self.assembling - held;
            session.set_assembly_allowance(self.budgets.max_assembly_octets.saturating_sub(others));
        } else {
            session.set_assembly_allowance(self.budgets.max_assembly_octets);
        }
        let result = session.handle_input(read_buf, now);
        self.assembling = (self.assembling + session.assembling()).saturating_sub(held);
        result?;
        // The caller polls this connection's output next: what its input leads to does not
        // wake it (marked as woken, it is not listed).
        let listed = std::mem::replace(&mut c.woken, true);
        self.relay.set_clock(now_us);
        self.handle_events(conn, now);
        if !listed {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.woken = false;
            }
        }
        Ok(())
    }

    /// Hands `conn`'s session events to the relay and runs what follows.
    fn handle_events(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(key) = &c.link {
            let Some(link) = self.links.get_mut(key) else {
                return;
            };
            let mut effects = LinkEffects::default();
            let before = link.deadline(&self.link_config);
            let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
            while let Some(event) = c.session.poll_event() {
                link.handle_event(
                    &mut c.session,
                    event,
                    &self.link_config,
                    now,
                    now_ms,
                    &mut effects,
                );
            }
            if !effects.start_tls && c.session.input_paused() {
                c.session.resume_input();
                self.retry_input = true;
            }
            let after = link.deadline(&self.link_config);
            if c.session.has_output() && !c.woken {
                c.woken = true;
                self.woken.push_back(conn);
            }
            let key = key.clone();
            self.note_deadline(before, after);
            if effects.start_tls {
                let domain = self.links.get(&key).map(|l| l.domain.clone());
                self.link_begins_tls(conn, &domain.unwrap_or_default());
            }
            self.apply_link_effects(&key, effects);
            self.execute(now);
            return;
        }
        let session = &mut c.session;
        let mut tuning = Vec::new();
        while let Some(event) = session.poll_event() {
            if secure::is_tuning_event(session, &event) {
                tuning.push(event);
                continue;
            }
            self.relay.handle_session_event(conn, session, event);
        }
        if tuning.is_empty() {
            if session.has_output() && !c.woken {
                c.woken = true;
                self.woken.push_back(conn);
            }
            if !c.backlogs.is_empty() {
                // Replies may have made room for what waits.
                self.drain(conn, now);
            }
            self.execute(now);
            return;
        }
        for event in tuning {
            self.handle_tuning_event(conn, event);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.woken
            && (c.session.has_output() || c.secured.as_ref().is_some_and(|s| s.has_output()))
        {
            c.woken = true;
            self.woken.push_back(conn);
        }
        if !c.backlogs.is_empty() {
            // Replies may have made room for what waits.
            self.drain(conn, now);
        }
        self.execute(now);
    }

    /// Appends `conn`'s pending output to `out` (see [`Session::poll_transmit`]); 0 when there
    /// is none. Written octets may make room for the connection's backlog.
    pub fn poll_transmit(&mut self, conn: ConnId, out: &mut impl FrameSink, now: Instant) -> usize {
        let Some(c) = self.conns.get_mut(&conn) else {
            return 0;
        };
        let written = match c.secured.as_deref_mut() {
            Some(secured) if secured.encrypting() => secured.transmit(&mut c.session, out.buffer()),
            _ => c.session.poll_transmit(out),
        };
        if written > 0 {
            // A start answered (an attach decided on another shard) opens or leaves no channel.
            self.watch(conn, now);
            let Some(c) = self.conns.get_mut(&conn) else {
                return written;
            };
            if c.session.has_events() {
                // Replies drained below `max_queued_replies`: the peer's messages held back
                // meanwhile are handled now.
                self.relay.set_clock(self.us(now));
                self.handle_events(conn, now);
            } else if !c.backlogs.is_empty() {
                self.drain(conn, now);
                self.execute(now);
            }
        }
        written
    }

    /// Whether `conn`'s session has output to poll.
    pub fn has_output(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| {
            c.session.has_output() || c.secured.as_ref().is_some_and(|s| s.has_output())
        })
    }

    /// Whether `conn`'s session is over and its output written: close the transport.
    pub fn is_finished(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_none_or(|c| {
            c.abandoned
                || (c.session.is_finished() && c.secured.as_ref().is_none_or(|s| !s.has_output()))
        })
    }

    /// Asks the peer of `conn` to release the session (shutdown).
    pub fn close_session(&mut self, conn: ConnId, reply_code: u16) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let _ = c.session.close_session(reply_code);
            self.wake(conn);
        }
    }

    /// The transport of `conn` ended. Its backlogs go (the relay reports every delivery it
    /// never saw answered), and the windows they held back are given back.
    pub fn close(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(address) = c.address {
            if let Some(n) = self.addresses.get_mut(&address) {
                *n -= 1;
                if *n == 0 {
                    self.addresses.remove(&address);
                }
            }
        }
        self.counts.ended_messages_in += c.session.messages_received();
        self.counts.ended_messages_out += c.session.messages_sent();
        self.assembling = self.assembling.saturating_sub(c.session.assembling());
        self.relay.set_clock(self.us(now));
        if let Some(key) = c.link {
            if let Some(link) = self.links.get_mut(&key) {
                let mut effects = LinkEffects::default();
                link.closed(self.stopping, &mut effects);
                self.apply_link_effects(&key, effects);
            }
            self.execute(now);
            return;
        }
        for (channel, backlog) in c.backlogs {
            let at = self.at(conn, channel);
            self.end_backlog(at, backlog);
        }
        self.relay.conn_closed(conn);
        self.execute(now);
    }

    /// An envelope from another shard.
    pub fn handle_envelope(&mut self, envelope: Envelope, now: Instant) {
        match envelope {
            Envelope::Window {
                at,
                octets,
                withhold,
            } => self.adjust_window(at, octets, withhold),
            envelope => {
                self.relay.set_clock(self.us(now));
                self.relay.handle_envelope(envelope);
            }
        }
        self.execute(now);
    }

    /// The runtime connected the link to `domain` at `now` (after [`Output::Connect`]):
    /// returns the connection's id, whose initiator session the runtime drives like any other;
    /// `None` when the link no longer wants it (close the transport).
    pub fn link_connected(&mut self, domain: &str, now: Instant) -> Option<ConnId> {
        let key = domain.to_ascii_lowercase();
        let link = self.links.get_mut(&key)?;
        if link.state != LinkState::Connecting || self.stopping {
            return None;
        }
        let session = Session::new(
            Role::Initiator,
            SessionConfig {
                limits: self.session_config.limits.clone(),
                ..SessionConfig::default()
            },
        );
        let conn = self.conns.insert(Conn {
            session,
            backlogs: FxHashMap::default(),
            woken: false,
            link: Some(key),
            abandoned: false,
            secured: None,
            watch: ConnWatch::default(),
            address: None,
        })?;
        link.connected(conn, now);
        let after = link.deadline(&self.link_config);
        self.note_deadline(None, after);
        self.wake(conn);
        Some(conn)
    }

    /// The runtime could not connect the link to `domain`.
    pub fn link_connect_failed(&mut self, domain: &str, failure: ConnectFailure, now: Instant) {
        let key = domain.to_ascii_lowercase();
        let Some(link) = self.links.get_mut(&key) else {
            return;
        };
        if link.state != LinkState::Connecting {
            return;
        }
        let mut effects = LinkEffects::default();
        link.connect_failed(failure, &self.link_config, now, &mut effects);
        if self.stopping {
            link.fail_queued("relay shutting down", &mut effects);
        }
        let after = link.deadline(&self.link_config);
        self.note_deadline(None, after);
        self.relay.set_clock(self.us(now));
        self.apply_link_effects(&key, effects);
        self.execute(now);
    }

    /// Shutdown: links take no more data and what they queued fails; their connections are
    /// released like every other one (the runtime asks each to close).
    pub fn stop_links(&mut self, now: Instant) {
        self.stopping = true;
        self.relay.set_clock(self.us(now));
        let keys: Vec<String> = self.links.keys().cloned().collect();
        for key in keys {
            let mut effects = LinkEffects::default();
            if let Some(link) = self.links.get_mut(&key) {
                link.shut_down(&mut effects);
            }
            self.apply_link_effects(&key, effects);
        }
        self.execute(now);
    }

    /// Data for another domain (after the relay's routing): onto this shard's link to it, or
    /// to the shard that owns that link.
    fn forward(
        &mut self,
        domain: String,
        payload: Bytes,
        reports: Option<Box<ForwardReports>>,
        now_ms: u64,
    ) {
        let owner = domain_shard(&domain, self.shards);
        if owner != self.shard {
            self.to_shards.push_back((
                owner,
                Envelope::Forward {
                    domain,
                    payload,
                    reports,
                },
            ));
            return;
        }
        if self.stopping {
            self.relay
                .forward_failed(reports.as_deref(), "relay shutting down");
            return;
        }
        // Watched from before it can reach the next relay, so that no report of a relay
        // further on can pass here before its watch exists (issue 19 item 7).
        if let Some(reports) = &reports {
            self.relay.forward_sending(reports);
        }
        let key = domain.to_ascii_lowercase();
        let link = self
            .links
            .entry(key.clone())
            .or_insert_with(|| Link::new(domain));
        let session = link
            .conn()
            .and_then(|conn| self.conns.get_mut(&conn))
            .map(|c| &mut c.session);
        let mut effects = LinkEffects::default();
        link.enqueue(
            payload,
            reports,
            session,
            &self.link_config,
            now_ms,
            &mut effects,
        );
        if let Some(conn) = link.conn() {
            self.wake(conn);
        }
        self.apply_link_effects(&key, effects);
    }

    /// Carries out what a link asked: failed data is reported by the relay (APEX-24), and a
    /// connection is asked of the runtime. The caller executes the relay's actions.
    fn apply_link_effects(&mut self, key: &str, effects: LinkEffects) {
        for (forward, report) in effects.timing_reports {
            self.relay.forward_timing_report(&forward, report);
        }
        for (reports, reason) in effects.failed {
            tracing::debug!(domain = key, %reason, "relay link data failed");
            self.relay.forward_failed(reports.as_deref(), &reason);
        }
        for reports in effects.accepted {
            self.relay.forward_accepted(&reports, key);
        }
        if effects.connect {
            if let Some(link) = self.links.get(key) {
                self.connects.push_back(link.domain.clone());
            }
        }
    }

    /// Whether [`ShardCore::poll_timeout`] may have become earlier since this was last asked
    /// (clears it): a runtime that sleeps until the timeout wakes up and asks again. A later
    /// timeout is not signalled: the runtime finds nothing due and sleeps on.
    pub fn take_deadline_moved(&mut self) -> bool {
        std::mem::take(&mut self.deadline_moved)
    }

    fn note_deadline(&mut self, before: Option<Instant>, after: Option<Instant>) {
        if let Some(after) = after {
            if before.is_none_or(|before| after < before) {
                self.deadline_moved = true;
            }
        }
    }

    /// When [`ShardCore::handle_timeout`] is next due, if anything waits for time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stalls = (self.backlog_octets > 0)
            .then(|| self.conns.values())
            .into_iter()
            .flatten()
            .flat_map(|c| c.backlogs.values())
            .filter(|b| !b.refusing)
            .map(|b| b.progress + self.budgets.stall)
            .min();
        let relay = self
            .relay_deadline
            .map(|ms| self.epoch + Duration::from_millis(ms));
        let links = self
            .links
            .values()
            .filter_map(|link| link.deadline(&self.link_config))
            .min();
        let conns = self.timers.peek().map(|Reverse((at, _))| *at);
        [stalls, relay, links, conns].into_iter().flatten().min()
    }

    /// Time passed: held data expires, and recipients that took nothing for too long refuse.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now_ms = self.ms(now);
        if self.relay_deadline.is_some_and(|due| due <= now_ms) {
            self.relay.handle_timeout(now_ms);
        }
        let stall = self.budgets.stall;
        let shard = self.shard;
        let stalled: Vec<ChannelRef> = self
            .conns
            .iter()
            .flat_map(|(conn, c)| {
                c.backlogs.iter().filter_map(move |(channel, b)| {
                    let stalled = !b.refusing && now.saturating_duration_since(b.progress) >= stall;
                    stalled.then_some(ChannelRef {
                        shard,
                        conn,
                        channel: *channel,
                    })
                })
            })
            .collect();
        for at in stalled {
            self.set_refusing(at, true);
        }
        let due: Vec<String> = self
            .links
            .iter()
            .filter(|(_, link)| link.deadline(&self.link_config).is_some_and(|at| at <= now))
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let mut effects = LinkEffects::default();
            let Some(link) = self.links.get_mut(&key) else {
                continue;
            };
            if link.handle_timeout(&self.link_config, now, &mut effects) {
                // The next relay never answered our close: the transport goes anyway.
                if let Some(conn) = link.conn() {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.abandoned = true;
                    }
                    self.wake(conn);
                }
            }
            self.apply_link_effects(&key, effects);
        }
        self.expire_conns(now);
        self.execute(now);
    }

    /// Follows `conn`'s session after anything that may have changed it: whether it waits for
    /// a greeting or has nothing on it, and the timer entry of its next deadline. Accepted
    /// connections only (a link's [`Link`] keeps its own time).
    fn watch(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.link.is_some() || c.abandoned {
            return;
        }
        let lifecycle = c.session.lifecycle();
        let handshaking = c.secured.as_ref().is_some_and(|s| s.handshaking());
        // An attached endpoint or a bound relay lives on a channel (APEX-16): a session with
        // no channel besides 0 (and none being started) has neither.
        let establishing = lifecycle == Lifecycle::Greeting || handshaking;
        let bare = lifecycle == Lifecycle::Open && !handshaking && !c.session.has_channels();
        c.watch.follow(establishing, bare, now);
        let Some(at) = c.watch.deadline(&self.conn_limits) else {
            return;
        };
        // An entry already in the heap for an earlier time looks again when it comes up.
        if c.watch.armed_at.is_some_and(|armed| armed <= at) {
            return;
        }
        c.watch.armed_at = Some(at);
        let before = self.timers.peek().map(|Reverse((at, _))| *at);
        self.timers.push(Reverse((at, conn)));
        self.note_deadline(before, Some(at));
    }

    /// Ends the accepted sessions whose deadline passed: a peer that did not greet in time
    /// is asked to release the session (a `close` with 421, RFC 3080 §2.4, §2.3.1.5: service
    /// not available to it) and the transport closes as soon as that is written; a session
    /// with nothing on it for too long is asked the same and given
    /// [`ConnLimits::release_timeout`] to answer; then its transport closes anyway.
    fn expire_conns(&mut self, now: Instant) {
        while let Some(Reverse((at, conn))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            let limits = &self.conn_limits;
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            if c.watch.armed_at != Some(at) {
                continue; // left behind by an earlier deadline
            }
            c.watch.armed_at = None;
            match c.watch.due(limits, now) {
                Due::Nothing => {}
                Due::Greeting => {
                    self.counts.greeting_timeouts += 1;
                    c.watch.timed_out(Timeout::Greeting, None);
                    // Mid-handshake nothing can be said in plaintext: the transport just goes.
                    if !c.secured.as_ref().is_some_and(|s| s.handshaking()) {
                        let _ = c
                            .session
                            .close_session(crate::beep::mgmt::code::SERVICE_NOT_AVAILABLE);
                    }
                    c.abandoned = true;
                    tracing::debug!(%conn, "no greeting in time");
                    self.wake(conn);
                }
                Due::Idle => {
                    self.counts.idle_timeouts += 1;
                    let release_by = now + limits.release_timeout;
                    c.watch.timed_out(Timeout::Idle, Some(release_by));
                    let _ = c
                        .session
                        .close_session(crate::beep::mgmt::code::SERVICE_NOT_AVAILABLE);
                    tracing::debug!(%conn, "idle session asked to release");
                    self.wake(conn);
                }
                Due::Release => {
                    c.abandoned = true;
                    self.wake(conn);
                }
            }
            self.watch(conn, now);
        }
    }

    /// The next thing for the runtime to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(conn) = self.woken.pop_front() {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.woken = false;
            }
            return Some(Output::Wake(conn));
        }
        if let Some((shard, envelope)) = self.to_shards.pop_front() {
            return Some(Output::ToShard { shard, envelope });
        }
        if let Some(domain) = self.connects.pop_front() {
            return Some(Output::Connect { domain });
        }
        if let Some(request) = self.stores.pop_front() {
            return Some(Output::Store(request));
        }
        self.resolves
            .pop_front()
            .map(|domain| Output::ResolveRelay { domain })
    }

    /// The store made the request with this token durable (or could not): what waited for it
    /// goes on.
    pub fn store_done(&mut self, done: StoreDone, now: Instant) {
        self.relay.set_clock(self.us(now));
        self.relay.store_done(done);
        self.execute(now);
    }

    /// The store's access table changed: in force from the next input on.
    pub fn set_access(&mut self, access: Arc<AccessTable>) {
        self.relay.set_access(access);
    }

    /// Data the store kept from before a restart, for recipients whose home shard this is.
    pub fn restore_held(&mut self, held: Vec<(HoldId, HeldMessage)>, now: Instant) {
        self.relay.set_clock(self.us(now));
        self.relay.restore_held(held);
        self.execute(now);
    }

    /// The addresses `domain`'s relay is reached at, after [`Output::ResolveRelay`] (empty
    /// when the lookup failed): the binds that waited for them are answered.
    pub fn relay_addresses_found(&mut self, domain: &str, addresses: &[IpAddr], now: Instant) {
        self.relay.set_clock(self.us(now));
        self.relay.relay_addresses_found(domain, addresses);
        self.execute(now);
    }

    fn at(&self, conn: ConnId, channel: u32) -> ChannelRef {
        ChannelRef {
            shard: self.shard,
            conn,
            channel,
        }
    }

    fn wake(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if !c.woken {
                c.woken = true;
                self.woken.push_back(conn);
            }
        }
    }

    /// Runs the relay's actions until none is left.
    fn execute(&mut self, now: Instant) {
        while let Some(action) = self.relay.poll_action() {
            match action {
                Action::Reply { conn, reply } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        let _ = reply.send_in(&mut c.session);
                        self.wake(conn);
                    }
                }
                Action::StartReply {
                    conn,
                    start_id,
                    content,
                } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        // A piggybacked `error` is labelled as a MSG's would be (BEEP-30).
                        let content = c
                            .session
                            .diagnostic_lang()
                            .and_then(|lang| crate::apex::msg::label_error_text(&content, lang))
                            .unwrap_or(content);
                        let _ = c
                            .session
                            .accept_start(start_id, APEX_PROFILE, Some(content));
                        self.wake(conn);
                    }
                }
                Action::Send {
                    conn,
                    channel,
                    payload,
                    source,
                } => self.send(conn, channel, payload, source, now),
                Action::CloseChannel {
                    conn,
                    channel,
                    code,
                } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        // Refused only for a channel already closing or gone.
                        let _ = c.session.close_channel(channel, code);
                        self.wake(conn);
                    }
                }
                Action::ToShard { shard, envelope } => self.to_shards.push_back((shard, envelope)),
                Action::Forward {
                    domain,
                    payload,
                    reports,
                } => {
                    self.counts.data_forwarded += 1;
                    let now_ms = self.ms(now);
                    self.forward(domain, payload, reports, now_ms)
                }
                Action::ResolveRelay { domain } => self.resolves.push_back(domain),
                Action::Store(request) => self.stores.push_back(request),
            }
        }
        if let Some((at, octets)) = self.withholding.take() {
            self.adjust_window(at, octets, true);
        }
        let next = self.relay.next_deadline();
        if next.is_some_and(|next| self.relay_deadline.is_none_or(|before| next < before)) {
            self.deadline_moved = true;
        }
        self.relay_deadline = next;
    }
}
