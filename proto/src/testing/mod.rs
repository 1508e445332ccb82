//! Test support, available with the `testing` feature:
//!
//! * [`RelayNet`]: shards of APEX relays and their clients in memory. Each shard is the
//!   [`ShardCore`] the runtime drives, so relay tests (and the `relay` fuzz target) run the
//!   production path: the relay is driven by `ShardCore`, and by nothing else.
//! * [`Pair`]: two bare BEEP sessions talking without sockets, on a simulated clock, each
//!   answered by an [`EchoProfile`] through the [`profile`] harness ([`Dispatcher`],
//!   [`ProfileHandler`]). This serves the BEEP engine tests only; it is not how the relay
//!   receives events.
//! * Byte builders for frames ([`frame_bytes`], [`split_frames`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::apex::access::AccessTable;
use crate::apex::client;
use crate::apex::msg::ApexLimits;
use crate::apex::relay::{ConnId, ConnKind, Envelope, Relay, RelayConfig};
use crate::beep::frame::{self as beep_frame, encode_data_frame, Header, Inbound, Keyword};
use crate::beep::mgmt::{ErrorElement, ProfileOffer};
use crate::beep::output::Vectored;
use crate::beep::session::{Event, ReplyKind, Role, Session, SessionConfig, StartRequest};
use crate::error::ProtocolError;
use crate::limits::Limits;
use crate::shard::{Budgets, Output, ShardCore};
use std::collections::HashMap;

mod next_relay;
pub mod profile;
pub use next_relay::{NextRelay, NextRelayBehaviour};
pub use profile::{Dispatcher, ProfileHandler, StartDecision};

/// The encoded bytes of one data frame.
pub fn frame_bytes(
    keyword: Keyword,
    channel: u32,
    msgno: u32,
    more: bool,
    seqno: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = BytesMut::new();
    let header = Header {
        keyword,
        channel,
        msgno,
        more,
        seqno,
        size: payload.len() as u32,
        ansno: None,
    };
    encode_data_frame(&mut out, &header, payload);
    out.to_vec()
}

/// A test profile: answers every MSG with a RPY carrying the same payload, accepts every start
/// and echoes piggybacked content. Records what it saw.
#[derive(Debug, Default)]
pub struct EchoProfile {
    /// Profile URI served.
    pub uri: String,
    /// MSG payloads received, in order.
    pub messages: Vec<(u32, u32, Bytes)>,
    /// Replies received to our MSGs.
    pub replies: Vec<(u32, u32, ReplyKind, Bytes)>,
    /// Channels of this profile that were created, with piggybacked content.
    pub started: Vec<(u32, Option<Bytes>)>,
    /// Channels of this profile that were closed.
    pub closed: Vec<u32>,
    /// Do not reply automatically (the test replies itself).
    pub manual: bool,
}

impl EchoProfile {
    /// An echo profile for `uri`.
    pub fn new(uri: &str) -> Self {
        Self {
            uri: uri.to_owned(),
            ..Self::default()
        }
    }
}

impl ProfileHandler for EchoProfile {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn on_start(
        &mut self,
        _: &mut Session,
        _: &StartRequest,
        offer: &ProfileOffer,
    ) -> StartDecision {
        StartDecision::Accept {
            content: offer.content.clone(),
        }
    }

    fn on_message(&mut self, session: &mut Session, channel: u32, msgno: u32, payload: Bytes) {
        self.messages.push((channel, msgno, payload.clone()));
        if !self.manual {
            let _ = session.send_rpy(channel, msgno, payload);
        }
    }

    fn on_reply(
        &mut self,
        _: &mut Session,
        channel: u32,
        msgno: u32,
        kind: ReplyKind,
        payload: Bytes,
    ) {
        self.replies.push((channel, msgno, kind, payload));
    }

    fn on_channel_started(&mut self, _: &mut Session, channel: u32, content: Option<Bytes>) {
        self.started.push((channel, content));
    }

    fn on_channel_closed(&mut self, _: &mut Session, channel: u32) {
        self.closed.push(channel);
    }
}

/// One side of a [`Pair`].
#[derive(Debug)]
pub struct Side {
    /// The session.
    pub session: Session,
    /// The profile handler that answers on this side.
    pub profile: EchoProfile,
    /// Events not routed to the profile (greeting, release, refusals...).
    pub events: Vec<Event>,
    /// Octets received and not consumed yet.
    pub inbox: BytesMut,
    /// Set when `handle_input` failed: the session was terminated.
    pub error: Option<ProtocolError>,
    /// Octets this side has written.
    pub bytes_sent: usize,
}

impl Side {
    fn new(role: Role, config: SessionConfig, uri: &str) -> Self {
        Self {
            session: Session::new(role, config),
            profile: EchoProfile::new(uri),
            events: Vec::new(),
            inbox: BytesMut::new(),
            error: None,
            bytes_sent: 0,
        }
    }

    fn pump_events(&mut self) {
        let events = &mut self.events;
        Dispatcher::new(vec![&mut self.profile]).dispatch(&mut self.session, |_, e| events.push(e));
    }
}

/// Two sessions connected in memory: `client` (initiator) and `server` (listener).
#[derive(Debug)]
pub struct Pair {
    /// The initiator.
    pub client: Side,
    /// The listener.
    pub server: Side,
    /// Simulated time.
    pub now: Instant,
    /// Deliver at most this many octets per step (1 = byte at a time).
    pub chunk: usize,
    /// Transmit through [`Vectored`] output with this `shared_min`, as the runtime does,
    /// instead of into one buffer.
    pub vectored: Option<usize>,
}

impl Pair {
    /// A pair where the server offers `uri` (served by an [`EchoProfile`]).
    pub fn new(uri: &str) -> Self {
        Self::with_configs(
            uri,
            SessionConfig::default(),
            SessionConfig {
                profiles: vec![uri.to_owned()],
                ..SessionConfig::default()
            },
        )
    }

    /// A pair with explicit session configurations.
    pub fn with_configs(uri: &str, client: SessionConfig, server: SessionConfig) -> Self {
        Self {
            client: Side::new(Role::Initiator, client, uri),
            server: Side::new(Role::Listener, server, uri),
            now: Instant::now(),
            chunk: usize::MAX,
            vectored: None,
        }
    }

    /// Moves bytes both ways and dispatches events until neither side has anything to say.
    /// Returns the number of rounds; stops after `max_rounds` (a stall or a livelock).
    pub fn drive(&mut self) -> usize {
        let max_rounds = 1_000_000;
        for round in 0..max_rounds {
            self.now += Duration::from_millis(1);
            let (chunk, vectored, now) = (self.chunk, self.vectored, self.now);
            let moved_a = Self::step(&mut self.client, &mut self.server, chunk, vectored, now);
            let moved_b = Self::step(&mut self.server, &mut self.client, chunk, vectored, now);
            if !moved_a && !moved_b {
                return round;
            }
        }
        max_rounds
    }

    /// One direction: `from` transmits, `to` receives and dispatches.
    fn step(
        from: &mut Side,
        to: &mut Side,
        chunk: usize,
        vectored: Option<usize>,
        now: Instant,
    ) -> bool {
        from.pump_events();
        let mut out = BytesMut::new();
        match vectored {
            None => while from.session.poll_transmit(&mut out) > 0 {},
            Some(shared_min) => {
                let mut parts_out = Vectored::new(shared_min);
                while from.session.poll_transmit(&mut parts_out) > 0 {}
                let mut parts = Vec::new();
                parts_out.take(&mut parts);
                for part in parts {
                    out.extend_from_slice(&part);
                }
            }
        }
        from.bytes_sent += out.len();
        let mut moved = !out.is_empty();
        to.inbox.extend_from_slice(&out);
        // Deliver in chunks to exercise partial input.
        let mut pending = std::mem::take(&mut to.inbox);
        let mut fed = BytesMut::new();
        while !pending.is_empty() && to.error.is_none() {
            let n = chunk.min(pending.len());
            fed.extend_from_slice(&pending.split_to(n));
            if let Err(e) = to.session.handle_input(&mut fed, now) {
                to.error = Some(e);
            }
        }
        to.inbox = fed;
        let before = to.events.len() + to.profile.messages.len() + to.profile.replies.len();
        to.pump_events();
        moved |= to.events.len() + to.profile.messages.len() + to.profile.replies.len() != before;
        moved
    }
}

// ---------------------------------------------------------------------------------------------
// RelayNet: shards of APEX relays and endpoint clients, in memory
// ---------------------------------------------------------------------------------------------

/// The APEX profile URI (RFC 3340 §8.1).
pub use crate::apex::relay::APEX_PROFILE;

/// Index of a client in [`RelayNet::clients`].
pub type ClientId = usize;

/// A data message a shard's link delivered to the next relay of `domain` (which accepted it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The shard that owns the link to `domain`.
    pub shard: usize,
    /// Destination domain.
    pub domain: String,
    /// The data message.
    pub payload: Bytes,
}

/// One connection to a relay shard: an initiator [`Session`] (the endpoint or peer relay side;
/// absent for a raw client, whose octets the test writes itself) talking in memory to the
/// listener session the shard's [`ShardCore`] owns.
#[derive(Debug)]
pub struct RelayClient {
    /// Shard the connection was accepted on.
    pub shard: usize,
    /// The connection's id on that shard.
    pub conn: ConnId,
    /// apex-edge or apex-mesh.
    pub kind: ConnKind,
    /// The client side; `None` for a raw client ([`RelayNet::connect_raw`]).
    pub initiator: Option<Session>,
    /// Answer every MSG the relay sends with RPY `<ok />` (the default).
    pub auto_reply: bool,
    /// While set, the client reads nothing the relay writes (a peer that stopped reading):
    /// the relay's octets stay in its socket buffer, modelled as unbounded.
    pub paused: bool,
    /// MSGs the relay sent to this client: (channel, msgno, payload), in arrival order.
    pub received: Vec<(u32, u32, Bytes)>,
    /// Replies to this client's MSGs: (channel, msgno, kind, payload).
    pub replies: Vec<(u32, u32, ReplyKind, Bytes)>,
    /// Channels started by this client, with the relay's piggybacked reply.
    pub started: Vec<(u32, Option<Bytes>)>,
    /// Starts the relay refused.
    pub refused: Vec<(u32, ErrorElement)>,
    /// Channels closed (either side's initiative), as seen by the client.
    pub closed: Vec<u32>,
    /// Other client-side events (greeting, release...).
    pub events: Vec<Event>,
    /// Every octet the relay side wrote on this connection.
    pub from_relay: Vec<u8>,
    /// Every octet the client side wrote (or a raw client injected).
    pub to_relay: Vec<u8>,
    /// Set when one side's `handle_input` failed (the connection was then dropped).
    pub error: Option<ProtocolError>,
    /// False once the connection ended.
    pub connected: bool,
    listener_inbox: BytesMut,
    initiator_inbox: BytesMut,
}

impl RelayClient {
    /// Complete frames the relay wrote, each exactly as on the wire, SEQ frames included.
    pub fn relay_frames(&self) -> Vec<Bytes> {
        split_frames(&self.from_relay)
    }

    /// Complete data frames (no SEQ) the relay wrote, exactly as on the wire.
    pub fn relay_data_frames(&self) -> Vec<Bytes> {
        self.relay_frames()
            .into_iter()
            .filter(|f| !f.starts_with(b"SEQ "))
            .collect()
    }

    /// The reply to this client's MSG `msgno` on `channel`, once it arrived.
    pub fn reply_to(&self, channel: u32, msgno: u32) -> Option<(ReplyKind, Bytes)> {
        self.replies
            .iter()
            .find(|(c, m, _, _)| *c == channel && *m == msgno)
            .map(|(_, _, k, p)| (*k, p.clone()))
    }

    /// Payloads the relay sent to this client on `channel`, in order.
    pub fn received_on(&self, channel: u32) -> Vec<Bytes> {
        self.received
            .iter()
            .filter(|(c, _, _)| *c == channel)
            .map(|(_, _, p)| p.clone())
            .collect()
    }
}

/// Splits `wire` into complete frames (data and SEQ), each as the exact octets it occupied.
/// Stops at the first incomplete or malformed frame.
pub fn split_frames(wire: &[u8]) -> Vec<Bytes> {
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    loop {
        let before = buf.len();
        let snapshot = buf.clone().freeze();
        match beep_frame::parse(&mut buf, 4096) {
            Ok(Some(Inbound::Data(_) | Inbound::Seq(_))) => {
                out.push(snapshot.slice(..before - buf.len()));
            }
            _ => return out,
        }
    }
}

/// N shards serving one domain and the clients connected to them, all in memory: each shard is
/// the [`ShardCore`] the runtime drives, so every test runs the production path (sessions,
/// relay, backlogs and backpressure included).
///
/// The harness plays the runtime's shell: it moves octets between client sessions and the
/// cores, hands `ToShard` envelopes in FIFO order to the other shard's core, and sends
/// `Forward` data, like the runtime, to the shard owning the domain's link, where it is
/// recorded in [`RelayNet::forwards`]. [`RelayNet::drive`] loops until quiescent.
#[derive(Debug)]
pub struct RelayNet {
    /// One core per shard.
    pub shards: Vec<ShardCore>,
    /// Connections, by [`ClientId`].
    pub clients: Vec<RelayClient>,
    /// Data the next relays of other domains accepted from the shards' links, in order.
    pub forwards: Vec<Forwarded>,
    /// The far ends of the shards' outbound links, in the order they connected.
    pub next_relays: Vec<NextRelay>,
    /// How the next relay of a domain (lower-cased) behaves; healthy when not listed.
    pub next_relay_behaviour: HashMap<String, NextRelayBehaviour>,
    /// Envelopes exchanged between shards so far.
    pub envelopes_sent: usize,
    /// Configuration of the relay-side sessions of connections opened from now on (by default
    /// offering only APEX).
    pub listener_config: SessionConfig,
    /// Configuration of the client-side sessions of connections opened from now on.
    pub initiator_config: SessionConfig,
    /// The relays' clock, ms since the net started.
    pub now_ms: u64,
    /// The simulated DNS of relays' addresses (lower-cased domain -> addresses), answering
    /// [`Output::ResolveRelay`]; a domain missing here has none.
    pub relay_dns: HashMap<String, Vec<std::net::IpAddr>>,
    /// The address connections opened from now on come from (127.0.0.1 at first).
    pub peer_address: std::net::IpAddr,
    /// While set, envelopes between shards stay queued (a slow shard queue): lets a test
    /// interleave connection events with cross-shard exchanges.
    pub pause_mesh: bool,
    /// While set, links' requests for a connection wait (a slow connect): data queues on the
    /// link until [`RelayNet::release_connects`].
    pub hold_connects: bool,
    held_connects: Vec<(usize, String)>,
    /// The relay's durable state, as the runtime's store keeps it: [`Output::Store`] requests
    /// are applied to it, and the shards get its access table after every change.
    pub store: crate::store::StoreState,
    /// While set, store requests stay queued (a slow disk): lets a test see what waits for
    /// durability.
    pub pause_store: bool,
    /// While set, the store fails every request (a full disk).
    pub store_failing: bool,
    /// Store requests answered so far.
    pub store_requests: usize,
    store_queue: VecDeque<(usize, crate::store::StoreRequest)>,
    envelopes: VecDeque<(usize, Envelope)>,
    epoch: Instant,
    /// What the net was built with, to build it again ([`RelayNet::restart`]).
    built_with: BuiltWith,
}

/// What a [`RelayNet`] was built with.
#[derive(Debug, Clone)]
struct BuiltWith {
    domain: String,
    shards: usize,
    trusted: Vec<String>,
    budgets: Budgets,
}

/// The wall clock of the simulated store at the net's start: 2024-03-01T10:00:00Z, so that
/// `lastUpdate`s are the same in every run.
pub const STORE_EPOCH_UNIX_MS: i64 = 1_709_287_200_000;

impl RelayNet {
    /// Every shard's relay decides attach and bind with `policy` from now on.
    pub fn set_auth(&mut self, policy: crate::apex::relay::AuthPolicy) {
        for core in &mut self.shards {
            core.relay_mut().set_auth(policy.clone());
        }
    }

    /// Every shard offers TLS and SASL with `security` to connections opened from now on.
    pub fn set_security(&mut self, security: crate::shard::Security) {
        for core in &mut self.shards {
            core.set_security(security.clone());
        }
    }

    /// `shards` relays for `domain` with only the default access entries and no trusted relay.
    pub fn new(domain: &str, shards: usize) -> Self {
        Self::with(domain, shards, AccessTable::new(), Vec::new())
    }

    /// `shards` relays for `domain` sharing `access` and `trusted`, with
    /// [`ApexLimits::default`] and [`Budgets::default`].
    pub fn with(domain: &str, shards: usize, access: AccessTable, trusted: Vec<String>) -> Self {
        Self::with_budgets(domain, shards, access, trusted, Budgets::default())
    }

    /// [`RelayNet::with`] and the shards' `budgets`.
    pub fn with_budgets(
        domain: &str,
        shards: usize,
        access: AccessTable,
        trusted: Vec<String>,
        budgets: Budgets,
    ) -> Self {
        let epoch = Instant::now();
        let store = crate::store::StoreState::new(access.clone(), Default::default());
        let access = std::sync::Arc::new(access);
        let listener_config = SessionConfig {
            profiles: vec![APEX_PROFILE.to_owned()],
            ..SessionConfig::default()
        };
        let cores = (0..shards)
            .map(|shard| {
                let relay = Relay::new(RelayConfig {
                    domain: domain.to_owned(),
                    shard,
                    shards,
                    limits: ApexLimits::default(),
                    access: access.clone(),
                    trusted: trusted.clone(),
                    hold: crate::apex::options::HoldLimits::default(),
                    store_queue: crate::apex::relay::DEFAULT_STORE_QUEUE,
                    report_watch: Default::default(),
                    // The simulated network is a closed box: tests about who may attach
                    // or bind choose a policy with `RelayNet::set_auth`.
                    auth: crate::apex::relay::AuthPolicy {
                        mode: crate::apex::relay::AuthMode::Off,
                        ..Default::default()
                    },
                });
                ShardCore::new(
                    relay,
                    shard,
                    shards,
                    listener_config.clone(),
                    budgets.clone(),
                    epoch,
                )
            })
            .collect();
        Self {
            built_with: BuiltWith {
                domain: domain.to_owned(),
                shards,
                trusted,
                budgets,
            },
            store,
            pause_store: false,
            store_failing: false,
            store_requests: 0,
            store_queue: VecDeque::new(),
            shards: cores,
            clients: Vec::new(),
            forwards: Vec::new(),
            next_relays: Vec::new(),
            next_relay_behaviour: HashMap::new(),
            envelopes_sent: 0,
            relay_dns: HashMap::new(),
            peer_address: std::net::Ipv4Addr::LOCALHOST.into(),
            listener_config,
            // Tests pipeline freely from the client side.
            initiator_config: SessionConfig {
                limits: Limits {
                    max_outstanding_msgs: 1 << 20,
                    max_queued_octets: usize::MAX,
                    ..Limits::default()
                },
                ..SessionConfig::default()
            },
            now_ms: 0,
            pause_mesh: false,
            hold_connects: false,
            held_connects: Vec::new(),
            envelopes: VecDeque::new(),
            epoch,
        }
    }

    /// The relay of `shard`.
    pub fn relay(&self, shard: usize) -> &Relay {
        self.shards[shard].relay()
    }

    fn open(&mut self, shard: usize, kind: ConnKind, raw: bool) -> ClientId {
        assert!(shard < self.shards.len(), "no shard {shard}");
        let now = self.instant();
        let core = &mut self.shards[shard];
        core.set_session_config(self.listener_config.clone());
        let Some(conn) = core.open(kind, Some(self.peer_address), now) else {
            panic!("shard {shard} has no room for another connection");
        };
        self.clients.push(RelayClient {
            shard,
            conn,
            kind,
            initiator: (!raw).then(|| Session::new(Role::Initiator, self.initiator_config.clone())),
            auto_reply: true,
            paused: false,
            received: Vec::new(),
            replies: Vec::new(),
            started: Vec::new(),
            refused: Vec::new(),
            closed: Vec::new(),
            events: Vec::new(),
            from_relay: Vec::new(),
            to_relay: Vec::new(),
            error: None,
            connected: true,
            listener_inbox: BytesMut::new(),
            initiator_inbox: BytesMut::new(),
        });
        self.drive();
        self.clients.len() - 1
    }

    /// Opens a connection on `shard` with a client session; greetings are exchanged.
    pub fn connect(&mut self, shard: usize, kind: ConnKind) -> ClientId {
        self.open(shard, kind, false)
    }

    /// Opens a connection on `shard` whose client side is the test itself: it writes octets
    /// with [`RelayNet::inject`] and reads [`RelayClient::from_relay`]. The relay's greeting
    /// has been written when this returns.
    pub fn connect_raw(&mut self, shard: usize, kind: ConnKind) -> ClientId {
        self.open(shard, kind, true)
    }

    /// Writes `octets` to the relay on a raw client's connection, then drives.
    pub fn inject(&mut self, id: ClientId, octets: &[u8]) {
        let client = &mut self.clients[id];
        client.to_relay.extend_from_slice(octets);
        client.listener_inbox.extend_from_slice(octets);
        self.drive();
    }

    /// The client side of `id`.
    pub fn session(&mut self, id: ClientId) -> &mut Session {
        match self.clients[id].initiator.as_mut() {
            Some(s) => s,
            None => panic!("client {id} is raw: it has no session"),
        }
    }

    /// Starts an APEX channel, piggybacking `content` (an attach or bind document) when given.
    /// Returns the channel and the relay's piggybacked reply. Panics if the start is refused.
    pub fn start(&mut self, id: ClientId, content: Option<&str>) -> (u32, Option<String>) {
        let offer = ProfileOffer {
            uri: APEX_PROFILE.to_owned(),
            content: content.map(|c| Bytes::copy_from_slice(c.as_bytes())),
        };
        let channel = match self.session(id).start_channel(vec![offer], None) {
            Ok(c) => c,
            Err(e) => panic!("start_channel: {e:?}"),
        };
        self.drive();
        let client = &self.clients[id];
        if let Some((_, error)) = client.refused.iter().find(|(c, _)| *c == channel) {
            panic!("start of channel {channel} refused: {error:?}");
        }
        match client.started.iter().find(|(c, _)| *c == channel) {
            Some((_, reply)) => (
                channel,
                reply
                    .as_ref()
                    .map(|r| String::from_utf8_lossy(r).into_owned()),
            ),
            None => panic!("channel {channel} did not start"),
        }
    }

    /// Starts a channel with a piggybacked `attach` of `endpoint` (transID 1); returns the
    /// channel and the piggybacked reply text (`<ok />` or an `error` element).
    pub fn attach(&mut self, id: ClientId, endpoint: &str) -> (u32, String) {
        let doc = client::attach_document(endpoint, 1);
        let (channel, reply) = self.start(id, Some(&doc));
        (channel, reply.unwrap_or_default())
    }

    /// Starts a channel with a piggybacked `bind` of `domain` (transID 1).
    pub fn bind(&mut self, id: ClientId, domain: &str) -> (u32, String) {
        let doc = client::bind_document(domain, 1);
        let (channel, reply) = self.start(id, Some(&doc));
        (channel, reply.unwrap_or_default())
    }

    /// Sends a MSG without waiting; returns its msgno.
    pub fn send_nowait(&mut self, id: ClientId, channel: u32, payload: Bytes) -> u32 {
        match self.session(id).send_msg(channel, payload) {
            Ok(msgno) => msgno,
            Err(e) => panic!("send_msg on channel {channel}: {e:?}"),
        }
    }

    /// Sends a MSG, drives, and returns (RPY?, reply payload). Panics without a reply.
    pub fn send(&mut self, id: ClientId, channel: u32, payload: impl Into<Bytes>) -> (bool, Bytes) {
        let msgno = self.send_nowait(id, channel, payload.into());
        self.drive();
        match self.clients[id].reply_to(channel, msgno) {
            Some((kind, payload)) => (kind == ReplyKind::Rpy, payload),
            None => panic!("no reply to MSG {channel} {msgno}"),
        }
    }

    /// Answers the relay's MSG `msgno` on `channel` (for clients with `auto_reply` off).
    pub fn reply(
        &mut self,
        id: ClientId,
        channel: u32,
        msgno: u32,
        positive: bool,
        payload: Bytes,
    ) {
        let session = self.session(id);
        let result = if positive {
            session.send_rpy(channel, msgno, payload)
        } else {
            session.send_err(channel, msgno, payload)
        };
        if let Err(e) = result {
            panic!("reply to MSG {channel} {msgno}: {e:?}");
        }
        self.drive();
    }

    /// The client asks to close `channel` (BEEP `close`), and drives.
    pub fn close_channel(&mut self, id: ClientId, channel: u32) {
        if let Err(e) = self.session(id).close_channel(channel, 200) {
            panic!("close_channel {channel}: {e:?}");
        }
        self.drive();
    }

    /// The transport of `id` ends (as when the peer resets it): the relay is told, then drives.
    pub fn disconnect(&mut self, id: ClientId) {
        if !self.clients[id].connected {
            return;
        }
        self.abort(id);
        self.drive();
    }

    /// Advances the relays' clock and runs their timers (`handle_timeout`, when
    /// `poll_timeout` says it is due, as the shard's timer does), then drives.
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        let now = self.instant();
        for core in &mut self.shards {
            if core.poll_timeout().is_some_and(|due| due <= now) {
                core.handle_timeout(now);
            }
        }
        self.drive();
    }

    /// Connects the links whose connection waited ([`RelayNet::hold_connects`]), and drives.
    pub fn release_connects(&mut self) {
        self.hold_connects = false;
        for (shard, domain) in std::mem::take(&mut self.held_connects) {
            self.connect_link(shard, domain);
        }
        self.drive();
    }

    /// The forwarded payloads for `domain` (case-insensitive), in order.
    pub fn forwards_to(&self, domain: &str) -> Vec<Bytes> {
        self.forwards
            .iter()
            .filter(|f| f.domain.eq_ignore_ascii_case(domain))
            .map(|f| f.payload.clone())
            .collect()
    }

    fn instant(&self) -> Instant {
        self.epoch + Duration::from_millis(self.now_ms)
    }

    /// Moves octets, runs the cores and passes envelopes until nothing is left to do. Returns
    /// the number of rounds; panics on a livelock.
    pub fn drive(&mut self) -> usize {
        const MAX_ROUNDS: usize = 1_000_000;
        for round in 0..MAX_ROUNDS {
            let mut progress = false;
            for id in 0..self.clients.len() {
                progress |= self.client_to_relay(id);
            }
            progress |= self.run_outputs();
            for id in 0..self.clients.len() {
                progress |= self.relay_to_client(id);
            }
            progress |= self.run_outputs();
            for link in 0..self.next_relays.len() {
                progress |= self.run_link(link);
            }
            progress |= self.run_outputs();
            if !progress {
                return round;
            }
        }
        panic!("RelayNet did not settle after {MAX_ROUNDS} rounds");
    }

    /// Client octets into the shard core.
    fn client_to_relay(&mut self, id: ClientId) -> bool {
        let now = self.instant();
        let client = &mut self.clients[id];
        if !client.connected {
            return false;
        }
        let mut moved = false;
        if let Some(initiator) = client.initiator.as_mut() {
            let mut out = BytesMut::new();
            while initiator.poll_transmit(&mut out) > 0 {}
            if !out.is_empty() {
                moved = true;
                client.to_relay.extend_from_slice(&out);
                client.listener_inbox.extend_from_slice(&out);
            }
        }
        if !client.listener_inbox.is_empty() {
            let before = client.listener_inbox.len();
            let core = &mut self.shards[client.shard];
            if let Err(e) = core.handle_input(client.conn, &mut client.listener_inbox, now) {
                client.error = Some(e);
                client.listener_inbox.clear();
                self.abort(id);
                return true;
            }
            moved |= client.listener_inbox.len() != before;
        }
        moved
    }

    /// The shard core's octets to the client side; client events recorded (and auto-replied).
    fn relay_to_client(&mut self, id: ClientId) -> bool {
        let now = self.instant();
        let client = &mut self.clients[id];
        if !client.connected || client.paused {
            return false;
        }
        let core = &mut self.shards[client.shard];
        let mut out = BytesMut::new();
        while core.poll_transmit(client.conn, &mut out, now) > 0 {}
        if core.is_finished(client.conn) {
            client.connected = false;
            core.close(client.conn, now);
        }
        let mut moved = !out.is_empty();
        client.from_relay.extend_from_slice(&out);
        let Some(initiator) = client.initiator.as_mut() else {
            return moved;
        };
        client.initiator_inbox.extend_from_slice(&out);
        if !client.initiator_inbox.is_empty() {
            let before = client.initiator_inbox.len();
            if let Err(e) = initiator.handle_input(&mut client.initiator_inbox, now) {
                client.error = Some(e);
                client.initiator_inbox.clear();
                self.abort(id);
                return true;
            }
            moved |= client.initiator_inbox.len() != before;
        }
        while let Some(event) = initiator.poll_event() {
            moved = true;
            match event {
                Event::Message {
                    channel,
                    msgno,
                    payload,
                } => {
                    client.received.push((channel, msgno, payload));
                    if client.auto_reply {
                        let _ = initiator.send_rpy(channel, msgno, client::ok_payload());
                    }
                }
                Event::Reply {
                    channel,
                    msgno,
                    kind,
                    payload,
                } => client.replies.push((channel, msgno, kind, payload)),
                Event::ChannelStarted {
                    channel, content, ..
                } => client.started.push((channel, content)),
                Event::StartRefused { channel, error } => client.refused.push((channel, error)),
                Event::ChannelClosed { channel, .. } => client.closed.push(channel),
                other => client.events.push(other),
            }
        }
        moved
    }

    /// The connection ends: the runtime aborts it and tells the shard core.
    fn abort(&mut self, id: ClientId) {
        let now = self.instant();
        let client = &mut self.clients[id];
        client.connected = false;
        self.shards[client.shard].close(client.conn, now);
    }

    /// The runtime's answer to [`Output::Connect`]: the domain's next relay accepts the
    /// connection, or connecting fails as its behaviour says.
    fn connect_link(&mut self, shard: usize, domain: String) {
        let now = self.instant();
        let behaviour = self
            .next_relay_behaviour
            .get(&domain.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default();
        let core = &mut self.shards[shard];
        if let Some(failure) = behaviour.connect_failure.clone() {
            core.link_connect_failed(&domain, failure, now);
            return;
        }
        if let Some(conn) = core.link_connected(&domain, now) {
            self.next_relays
                .push(NextRelay::new(shard, conn, domain, behaviour));
        }
    }

    /// Moves octets both ways between a link and its next relay; records accepted data.
    fn run_link(&mut self, index: usize) -> bool {
        let now = self.instant();
        let link = &mut self.next_relays[index];
        if !link.connected {
            return false;
        }
        let core = &mut self.shards[link.shard];
        let mut moved = false;
        let mut out = BytesMut::new();
        while core.poll_transmit(link.conn, &mut out, now) > 0 {}
        if !out.is_empty() {
            moved = true;
            link.from_link.extend_from_slice(&out);
            link.inbox.extend_from_slice(&out);
        }
        let closing = matches!(
            core.link_state(&link.domain),
            Some(crate::shard::LinkState::Open {
                phase: crate::shard::LinkPhase::Closing { .. },
                ..
            })
        );
        if core.is_finished(link.conn) {
            link.connected = false;
            core.close(link.conn, now);
            return true;
        }
        if (closing && !link.behaviour.answers_close) || link.behaviour.silent {
            return moved;
        }
        let before = link.inbox.len();
        match link.step(now) {
            Ok(accepted) => {
                moved |= link.inbox.len() != before || !accepted.is_empty();
                for payload in accepted {
                    self.forwards.push(Forwarded {
                        shard: link.shard,
                        domain: link.domain.clone(),
                        payload,
                    });
                }
            }
            Err(_) => {
                link.connected = false;
                core.close(link.conn, now);
                return true;
            }
        }
        let mut back = BytesMut::new();
        while link.session.poll_transmit(&mut back) > 0 {}
        link.outbox.extend_from_slice(&back);
        if !link.outbox.is_empty() {
            let before = link.outbox.len();
            if core.handle_input(link.conn, &mut link.outbox, now).is_err() {
                link.connected = false;
                core.close(link.conn, now);
                return true;
            }
            moved |= link.outbox.len() != before;
        }
        if link.session.is_finished() && link.outbox.is_empty() {
            // The next relay released the session and wrote all it had: TCP closes.
            link.connected = false;
            core.close(link.conn, now);
            return true;
        }
        moved
    }

    /// What the runtime's store does with one request: applies it, makes it durable (or
    /// fails), publishes the access table when it changed, then answers.
    fn apply_store(&mut self, shard: usize, request: crate::store::StoreRequest, now: Instant) {
        use crate::store::{Mutation, StoreDone, StoreFailure};
        self.store_requests += 1;
        let result = if self.store_failing {
            Err(StoreFailure("simulated full disk".into()))
        } else {
            let wall = crate::apex::timestamp::Timestamp::from_unix_millis(
                STORE_EPOCH_UNIX_MS + self.now_ms as i64,
            );
            let mut outcomes = Vec::new();
            let mut access_changed = false;
            for op in request.ops {
                let (outcome, mutation) = self.store.apply(op, wall);
                access_changed |= matches!(mutation, Some(Mutation::Access { .. }));
                outcomes.push(outcome);
            }
            if access_changed {
                let table = std::sync::Arc::new(self.store.access().clone());
                for core in &mut self.shards {
                    core.set_access(table.clone());
                }
            }
            Ok(outcomes)
        };
        if request.token != 0 {
            let done = StoreDone {
                token: request.token,
                result,
            };
            self.shards[shard].store_done(done, now);
        }
    }

    /// The relay restarts (as after `kill -9`): every connection is gone, what was queued for
    /// the store but not applied is lost, and the new shards start from the store, holding
    /// again what it kept.
    pub fn restart(self) -> Self {
        let built = self.built_with.clone();
        let mut net = Self::with_budgets(
            &built.domain,
            built.shards,
            crate::apex::access::AccessTable::new(),
            built.trusted.clone(),
            built.budgets.clone(),
        );
        net.store = self.store;
        // The clock goes on from where it was.
        net.now_ms = self.now_ms;
        let table = std::sync::Arc::new(net.store.access().clone());
        let wall = crate::apex::timestamp::Timestamp::from_unix_millis(
            STORE_EPOCH_UNIX_MS + net.now_ms as i64,
        );
        let held = crate::store::by_home_shard(net.store.held(wall), built.shards);
        let now = net.instant();
        for (core, mine) in net.shards.iter_mut().zip(held) {
            core.set_access(table.clone());
            core.restore_held(mine, now);
        }
        net.drive();
        net
    }

    /// The next relay of link `index` drops the connection (as a crash would).
    pub fn drop_link(&mut self, index: usize) {
        let now = self.instant();
        let link = &mut self.next_relays[index];
        if link.connected {
            link.connected = false;
            self.shards[link.shard].close(link.conn, now);
            self.drive();
        }
    }

    /// The runtime's handling of the cores' outputs, and the shard queues.
    fn run_outputs(&mut self) -> bool {
        let now = self.instant();
        let mut any = false;
        loop {
            let mut round = false;
            for shard in 0..self.shards.len() {
                while let Some(output) = self.shards[shard].poll_output() {
                    round = true;
                    match output {
                        // Every client is looked at in every round anyway.
                        Output::Wake(_) => {}
                        Output::ToShard {
                            shard: to,
                            envelope,
                        } => {
                            self.envelopes_sent += 1;
                            self.envelopes.push_back((to, envelope));
                        }
                        Output::Connect { domain } if self.hold_connects => {
                            self.held_connects.push((shard, domain))
                        }
                        Output::Connect { domain } => self.connect_link(shard, domain),
                        Output::Store(request) => self.store_queue.push_back((shard, request)),
                        Output::ResolveRelay { domain } => {
                            let found = self
                                .relay_dns
                                .get(&domain.to_ascii_lowercase())
                                .cloned()
                                .unwrap_or_default();
                            self.shards[shard].relay_addresses_found(&domain, &found, now);
                        }
                    }
                }
            }
            if !self.pause_store {
                if let Some((shard, request)) = self.store_queue.pop_front() {
                    round = true;
                    self.apply_store(shard, request, now);
                }
            }
            let next = if self.pause_mesh {
                None
            } else {
                self.envelopes.pop_front()
            };
            if let Some((shard, envelope)) = next {
                round = true;
                self.shards[shard].handle_envelope(envelope, now);
            }
            if !round {
                return any;
            }
            any = true;
        }
    }
}
