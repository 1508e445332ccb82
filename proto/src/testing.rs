//! Test support: an in-memory [`Pair`] of sessions talking without sockets, on a simulated
//! clock, and byte builders for frames. Available with the `testing` feature.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::beep::frame::{encode_data_frame, Header, Keyword};
use crate::beep::mgmt::ProfileOffer;
use crate::beep::profile::{Dispatcher, ProfileHandler, StartDecision};
use crate::beep::session::{Event, ReplyKind, Role, Session, SessionConfig, StartRequest};
use crate::error::ProtocolError;

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
        }
    }

    /// Moves bytes both ways and dispatches events until neither side has anything to say.
    /// Returns the number of rounds; stops after `max_rounds` (a stall or a livelock).
    pub fn drive(&mut self) -> usize {
        let max_rounds = 1_000_000;
        for round in 0..max_rounds {
            self.now += Duration::from_millis(1);
            let moved_a = Self::step(&mut self.client, &mut self.server, self.chunk, self.now);
            let moved_b = Self::step(&mut self.server, &mut self.client, self.chunk, self.now);
            if !moved_a && !moved_b {
                return round;
            }
        }
        max_rounds
    }

    /// One direction: `from` transmits, `to` receives and dispatches.
    fn step(from: &mut Side, to: &mut Side, chunk: usize, now: Instant) -> bool {
        from.pump_events();
        let mut out = BytesMut::new();
        while from.session.poll_transmit(&mut out) > 0 {}
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
