//! A BEEP session: the channel table, channel 0, flow control and output scheduling.
//!
//! Sans-IO in the manner of quinn-proto: the caller owns the socket and the buffers.
//!
//! ```text
//!   bytes read ──► handle_input(buf, now) ──► poll_event() ──► application / profiles
//!                                                 │
//!   application ──► send_msg / reply / answer / start_channel / close_*
//!                                                 │
//!   bytes to write ◄── poll_transmit(out) ◄───────┘   (SEQ first, then round-robin frames)
//! ```
//!
//! Poll order after every input: drain `poll_event`, act on it, then `poll_transmit` until it
//! appends nothing; write what it appended in one write. When `handle_input` fails the session is
//! dead and the connection must be aborted without writing anything more (RFC 3080 §2.2.1.1).
//! When [`Session::is_finished`] turns true after a flush, close the connection (RFC 3081 §2).

use std::collections::{HashMap, HashSet, VecDeque};

use rustc_hash::FxHashMap;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::beep::channel::{Channel, Received};
use crate::beep::frame::{self, Head, Header, Keyword, Seq};
use crate::beep::mgmt::{
    self, code, Close, ErrorElement, Greeting, Mgmt, MgmtLimits, ProfileOffer, Start,
};
use crate::beep::mime::Entity;
use crate::beep::output::FrameSink;
use crate::beep::tuning;
use crate::error::{Misuse, ProtocolError};
use crate::limits::{Limits, MAX_31BIT};

/// The language of every diagnostic the session writes (RFC 3066 tag), sent as `xml:lang`
/// where the peer asked for another first (BEEP-30).
const DIAGNOSTIC_LANG: &str = "en";

/// Which end of the transport this session is (RFC 3080 §2.1; RFC 3081 §2, BEEP-57).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection; starts odd-numbered channels.
    Initiator,
    /// Accepted the connection; starts even-numbered channels.
    Listener,
}

/// Everything a session needs to know at creation.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    /// Profiles offered in the greeting: the ones the peer may start.
    pub profiles: Vec<String>,
    /// Tuning profiles the peer may ask for though the greeting does not list them, so that
    /// the application can say why it refuses them (SASL PLAIN before TLS gets 538).
    pub unlisted_profiles: Vec<String>,
    /// Channel-management features announced in the greeting.
    pub features: Vec<String>,
    /// Languages we prefer for diagnostics, most preferred first.
    pub localize: Vec<String>,
    /// Resource bounds.
    pub limits: Limits,
}

/// A `start` from the peer that passed the engine's checks and awaits the application's
/// decision ([`Session::accept_start`] / [`Session::refuse_start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    /// Identifies the request in `accept_start`/`refuse_start`.
    pub id: u32,
    /// The channel the peer wants to create.
    pub channel: u32,
    /// The candidates this session offers, in the peer's order, with decoded piggybacks.
    pub profiles: Vec<ProfileOffer>,
    /// The server name asked for, if any.
    pub server_name: Option<String>,
}

/// The kind of a complete reply message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// Positive reply.
    Rpy,
    /// Negative reply.
    Err,
    /// One answer (with its ansno) of a one-to-many reply.
    Ans(u32),
    /// End of a one-to-many reply.
    Nul,
}

/// What the session reports to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's greeting arrived.
    Greeting(Greeting),
    /// The peer asks to start a channel.
    StartRequested(StartRequest),
    /// A channel exists now: one we asked for was accepted (`content` is the piggybacked
    /// response) or one the peer asked for was accepted by us.
    ChannelStarted {
        /// Channel number.
        channel: u32,
        /// The profile running on it.
        profile: String,
        /// Piggybacked response to our initialization message.
        content: Option<Bytes>,
    },
    /// The peer refused our `start`.
    StartRefused {
        /// The channel we asked for.
        channel: u32,
        /// The peer's error.
        error: ErrorElement,
    },
    /// A complete MSG arrived on a profile channel; answer it with `reply`/`answer`.
    Message {
        /// Channel.
        channel: u32,
        /// The peer's msgno (use it to reply).
        msgno: u32,
        /// The whole MIME entity.
        payload: Bytes,
    },
    /// A complete reply message to one of our MSGs.
    Reply {
        /// Channel.
        channel: u32,
        /// Our msgno it answers.
        msgno: u32,
        /// RPY, ERR, ANS or NUL.
        kind: ReplyKind,
        /// The whole MIME entity (empty for NUL).
        payload: Bytes,
    },
    /// A channel was closed, by us or by the peer.
    ChannelClosed {
        /// Channel number.
        channel: u32,
        /// The profile that ran on it.
        profile: String,
    },
    /// The peer declined our `close`.
    CloseRefused {
        /// The channel (0: the session).
        channel: u32,
        /// The peer's error.
        error: ErrorElement,
    },
    /// The session was released by agreement; close the transport once output is flushed.
    SessionReleased,
}

/// Where a session is in its life, as status displays show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Waiting for the peer's greeting.
    Greeting,
    /// Greeted, exchanging messages.
    Open,
    /// Its release was asked for or agreed, or service was refused.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingGreeting,
    Open,
    /// Release agreed (or the listener refused service): flush, then close the transport.
    Releasing,
    Dead,
}

/// Our outstanding channel-0 requests.
#[derive(Debug)]
enum Request {
    Greeting,
    Start { channel: u32, offers: Vec<String> },
    Close { channel: u32 },
}

/// A BEEP session over one transport connection.
#[derive(Debug)]
pub struct Session {
    role: Role,
    config: SessionConfig,
    state: State,
    /// Keyed by channel number (at most `max_channels`, so a fast hash is safe here).
    channels: FxHashMap<u32, Channel>,
    /// Channel numbers promised to a start in progress (ours or the peer's).
    reserved: HashSet<u32>,
    /// Channels closed during this session: a SEQ racing the close is ignored for them.
    recently_closed: HashSet<u32>,
    /// Header recognised in the read buffer whose payload has not fully arrived.
    pending_head: Option<(Header, usize)>,
    events: VecDeque<Event>,
    ready: VecDeque<u32>,
    seq_dirty: Vec<u32>,
    /// Octets of one channel's events polled by the application and not yet taken off the
    /// channel's `undelivered`: a run of events on one channel (a read's worth, usually) costs
    /// one channel lookup. Settled before anything reads `undelivered`, writes SEQs, or
    /// changes the set of channels.
    released: Option<(u32, u32)>,
    requests: HashMap<u32, Request>,
    starts: HashMap<u32, u32>,
    next_channel: u32,
    server_name: Option<String>,
    peer_greeting: Option<Greeting>,
    last_input: Option<Instant>,
    /// A listener that answered the session with an error: all input is ignored (BEEP-18).
    refusing: bool,
    /// `close` requests (channel, code) waiting for their channel's output to drain.
    deferred_closes: Vec<(u32, u16)>,
    /// Octets of partial messages held for reassembly, over all channels.
    assembling: usize,
    /// Octets of replies to profile channels' MSGs given and not completely written.
    queued_replies: usize,
    /// Octets of message and reply events not yet polled.
    unpolled: usize,
    /// Most octets of partial messages this session may hold: [`Limits::max_session_assembly`]
    /// unless the application lowers it ([`Session::set_assembly_allowance`]).
    assembly_allowance: usize,
    /// The channel running a tuning profile (TLS or SASL), if one exists: only one may at a
    /// time (RFC 3080 §2, BEEP-43).
    tuning_channel: Option<u32>,
    /// A tuning request arrived: input stops there until the application decides
    /// ([`Session::resume_input`]), because after a TLS `ready` the peer's next octets may be
    /// a TLS handshake rather than frames (RFC 3080 §3.1.3).
    input_paused: bool,
    /// Complete messages (MSG, RPY, ERR, ANS, NUL; channel 0's included) received and sent,
    /// for the session's end-of-life log line: plain counters, bumped once per message.
    messages_in: u64,
    messages_out: u64,
}

impl Session {
    /// Creates a session and queues our greeting (RFC 3080 §2.3.1.1, BEEP-17).
    pub fn new(role: Role, config: SessionConfig) -> Self {
        let greeting = Mgmt::Greeting(Greeting {
            profiles: config.profiles.clone(),
            features: config.features.clone(),
            localize: config.localize.clone(),
        });
        let mut session = Self::bare(role, config);
        session.queue_greeting(Keyword::Rpy, greeting.to_payload());
        session
    }

    /// Creates a listener session that refuses service: an ERR with `error` instead of the
    /// greeting, then the transport is closed (RFC 3080 §2.3.1.5, §2.4, BEEP-18/BEEP-19).
    pub fn new_refusing(config: SessionConfig, error: ErrorElement) -> Self {
        let mut session = Self::bare(Role::Listener, config);
        session.queue_greeting(Keyword::Err, Mgmt::Error(error).to_payload());
        session.state = State::Releasing;
        session.refusing = true;
        session
    }

    fn bare(role: Role, config: SessionConfig) -> Self {
        let mut ch0 = Channel::new(String::new(), &config.limits, 1);
        ch0.expect_reply(0); // the peer's greeting answers no MSG (P6 exception)
        let mut channels = FxHashMap::default();
        channels.insert(0, ch0);
        Self {
            role,
            state: State::AwaitingGreeting,
            channels,
            reserved: HashSet::new(),
            recently_closed: HashSet::new(),
            pending_head: None,
            events: VecDeque::new(),
            ready: VecDeque::new(),
            seq_dirty: Vec::new(),
            released: None,
            requests: HashMap::from([(0, Request::Greeting)]),
            starts: HashMap::new(),
            next_channel: if role == Role::Initiator { 1 } else { 2 },
            server_name: None,
            peer_greeting: None,
            last_input: None,
            refusing: false,
            deferred_closes: Vec::new(),
            assembling: 0,
            queued_replies: 0,
            unpolled: 0,
            assembly_allowance: config.limits.max_session_assembly,
            tuning_channel: None,
            input_paused: false,
            messages_in: 0,
            messages_out: 0,
            config,
        }
    }

    fn queue_greeting(&mut self, keyword: Keyword, payload: Bytes) {
        if let Some(ch0) = self.channels.get_mut(&0) {
            ch0.queue_raw(keyword, 0, payload);
        }
        self.mark_ready(0);
    }

    /// This session's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The peer's greeting, once received.
    pub fn peer_greeting(&self) -> Option<&Greeting> {
        self.peer_greeting.as_ref()
    }

    /// The payload of `error`, its diagnostic text labelled as English (`xml:lang='en'`) when
    /// the peer's greeting asked for another language first (BEEP-30, RFC 3080 §2.3.1.5: the
    /// label may be left out only for text in the peer's first choice). Our diagnostics are
    /// English; a peer without `localize` gets `i-default`, which RFC 2277 §4.5 reads as
    /// English too.
    fn error_payload(&self, mut error: ErrorElement) -> Bytes {
        if error.lang.is_none() && !error.text.is_empty() {
            error.lang = self.diagnostic_lang().map(str::to_owned);
        }
        Mgmt::Error(error).to_payload()
    }

    /// The `xml:lang` our diagnostic text must carry for this peer (BEEP-30): `Some` when the
    /// peer's greeting asked for a language other than ours first, `None` when the text may
    /// go unlabelled. Profiles whose replies carry diagnostics (APEX's `error`) label theirs
    /// with it.
    pub fn diagnostic_lang(&self) -> Option<&'static str> {
        (!self.peer_reads_english_first()).then_some(DIAGNOSTIC_LANG)
    }

    /// Whether the first language in the peer's `localize` is English (any `en` tag) or
    /// `i-default`; true before its greeting arrives, when nothing else is known.
    fn peer_reads_english_first(&self) -> bool {
        let first = self.peer_greeting.as_ref().and_then(|g| g.localize.first());
        first.is_none_or(|tag| {
            let primary = tag.split('-').next().unwrap_or_default();
            primary.eq_ignore_ascii_case("en") || tag.eq_ignore_ascii_case("i-default")
        })
    }

    /// The serverName of the first successful `start` (RFC 3080 §2.3.1.2, BEEP-23).
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The profile running on `channel`.
    pub fn channel_profile(&self, channel: u32) -> Option<&str> {
        self.channels
            .get(&channel)
            .filter(|_| channel != 0)
            .map(|c| c.profile.as_str())
    }

    /// Channels open besides channel 0.
    pub fn open_channels(&self) -> Vec<u32> {
        let mut list: Vec<u32> = self.channels.keys().copied().filter(|c| *c != 0).collect();
        list.sort_unstable();
        list
    }

    /// Whether any channel besides channel 0 is open or being started.
    pub fn has_channels(&self) -> bool {
        self.channels.len() > 1 || !self.reserved.is_empty()
    }

    /// Complete messages received so far (MSG, RPY, ERR, each ANS, NUL), on every channel
    /// including channel 0; a MSG answered pre-emptively for its size counts too.
    pub fn messages_received(&self) -> u64 {
        self.messages_in
    }

    /// Complete messages sent so far: those whose last frame `poll_transmit` wrote.
    pub fn messages_sent(&self) -> u64 {
        self.messages_out
    }

    /// Carries the message counts of `earlier`, the session this one replaced on the same
    /// transport (TLS restarts the session, RFC 3080 §3.1.3), into this one.
    pub fn count_from(&mut self, earlier: &Session) {
        self.messages_in += earlier.messages_in;
        self.messages_out += earlier.messages_out;
    }

    /// Time of the last `handle_input` call.
    pub fn last_input(&self) -> Option<Instant> {
        self.last_input
    }

    /// Where the session is in its life (for status displays).
    pub fn lifecycle(&self) -> Lifecycle {
        match self.state {
            State::AwaitingGreeting => Lifecycle::Greeting,
            State::Open
                if self.deferred_closes.iter().any(|(c, _)| *c == 0)
                    || self
                        .requests
                        .values()
                        .any(|r| matches!(r, Request::Close { channel: 0 })) =>
            {
                Lifecycle::Closing
            }
            State::Open => Lifecycle::Open,
            State::Releasing | State::Dead => Lifecycle::Closing,
        }
    }

    /// True once the session has been released and all output polled: close the transport.
    pub fn is_finished(&self) -> bool {
        match self.state {
            State::Dead => true,
            State::Releasing => self.ready.is_empty(),
            _ => false,
        }
    }

    /// Consumes frames from the front of `buf` (the connection's read buffer), leaving an
    /// incomplete frame in place. Payloads are split off without copying.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) -> Result<(), ProtocolError> {
        self.last_input = Some(now);
        if self.input_paused {
            return Ok(());
        }
        if self.state == State::Dead || self.refusing {
            // A refusing listener ignores the initiator's greeting and everything after it.
            buf.clear();
            return Ok(());
        }
        let result = self.consume(buf);
        if result.is_err() {
            self.state = State::Dead;
            self.ready.clear();
            self.seq_dirty.clear();
        }
        result
    }

    fn consume(&mut self, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        // A close checks `undelivered`, and channels may come and go.
        self.settle_released();
        loop {
            if buf.is_empty() {
                // Most reads end on a frame boundary: no header to look for.
                return Ok(());
            }
            let (header, header_len, fresh) = match self.pending_head.take() {
                Some((header, len)) => (header, len, false),
                None => match frame::parse_head(buf, self.config.limits.max_header_line)? {
                    None => return Ok(()),
                    Some((Head::Seq(seq), len)) => {
                        let _ = buf.split_to(len);
                        self.handle_seq(seq)?;
                        continue;
                    }
                    Some((Head::Data(header), len)) => (header, len, true),
                },
            };
            if fresh {
                self.check_greeting_order(&header)?;
            }
            // One lookup serves the checks, the frame and the window accounting.
            let channel = self
                .channels
                .get_mut(&header.channel)
                .ok_or(ProtocolError::UnknownChannel(header.channel))?;
            if fresh {
                // Checked before its payload is waited for (RFC 3081 §3.1.2): a peer cannot
                // make us buffer beyond the window.
                channel.check_header(&header)?;
            }
            let Some(frame) = frame::take_payload(buf, header, header_len)? else {
                self.pending_head = Some((header, header_len));
                return Ok(());
            };
            // Only a continued frame, or one on a channel with a partial message, can change
            // what is held for reassembly: single-frame messages skip the bookkeeping.
            let assembles = header.more || channel.has_partial();
            let (room, held_before) = if assembles {
                (
                    self.assembly_allowance.saturating_sub(self.assembling),
                    channel.assembling(),
                )
            } else {
                (usize::MAX, 0)
            };
            let received = receive_on(
                channel,
                &header,
                frame.payload,
                &self.config.limits,
                room,
                &mut self.seq_dirty,
                &mut self.ready,
            )?;
            if assembles {
                let held_after = channel.assembling();
                self.assembling = (self.assembling + held_after).saturating_sub(held_before);
            }
            self.handle_received(&header, received)?;
            if self.state == State::Dead {
                buf.clear();
                return Ok(());
            }
            if self.input_paused {
                return Ok(());
            }
        }
    }

    fn check_greeting_order(&self, h: &Header) -> Result<(), ProtocolError> {
        if self.state == State::AwaitingGreeting
            && !(h.channel == 0 && h.msgno == 0 && matches!(h.keyword, Keyword::Rpy | Keyword::Err))
        {
            return Err(ProtocolError::GreetingExpected);
        }
        Ok(())
    }

    fn handle_seq(&mut self, seq: Seq) -> Result<(), ProtocolError> {
        let Some(channel) = self.channels.get_mut(&seq.channel) else {
            if self.recently_closed.contains(&seq.channel) {
                return Ok(()); // a SEQ that crossed our `ok` to the channel's close
            }
            return Err(ProtocolError::InvalidSeq(seq.channel));
        };
        channel
            .apply_seq(seq.ackno, seq.window)
            .map_err(|()| ProtocolError::InvalidSeq(seq.channel))?;
        if !channel.queue.is_empty() {
            self.mark_ready(seq.channel);
        }
        Ok(())
    }

    fn handle_received(&mut self, h: &Header, received: Received) -> Result<(), ProtocolError> {
        if !matches!(received, Received::Nothing) {
            self.messages_in += 1;
        }
        match received {
            Received::Nothing => Ok(()),
            Received::MsgTooLarge { msgno } => {
                let error = self.error_payload(ErrorElement::new(
                    code::ACTION_NOT_TAKEN,
                    "message too large",
                ));
                if h.channel == 0 {
                    return Err(ProtocolError::MessageTooLarge(0));
                }
                self.queue_reply(h.channel, Keyword::Err, msgno, error);
                Ok(())
            }
            Received::Msg { msgno, payload } if h.channel == 0 => {
                self.handle_mgmt_msg(msgno, payload);
                Ok(())
            }
            Received::Msg { msgno, payload } => {
                if self.tuning_channel == Some(h.channel) {
                    self.input_paused = true;
                }
                self.unpolled += payload.len();
                self.events.push_back(Event::Message {
                    channel: h.channel,
                    msgno,
                    payload,
                });
                let limits = &self.config.limits;
                if self.queued_replies > limits.max_queued_replies
                    && self.unpolled > limits.max_unanswered_octets
                {
                    // Each channel's window bounds what waits on it, but not over a thousand
                    // channels: a peer that takes no replies and fills them all is ended.
                    return Err(ProtocolError::RepliesNotTaken);
                }
                Ok(())
            }
            Received::Reply {
                keyword,
                msgno,
                ansno,
                payload,
            } => {
                if h.channel == 0 {
                    return self.handle_mgmt_reply(keyword, msgno, payload);
                }
                if self.tuning_channel == Some(h.channel) {
                    self.input_paused = true;
                }
                let kind = match (keyword, ansno) {
                    (Keyword::Rpy, _) => ReplyKind::Rpy,
                    (Keyword::Ans, Some(n)) => ReplyKind::Ans(n),
                    (Keyword::Nul, _) => ReplyKind::Nul,
                    _ => ReplyKind::Err,
                };
                self.unpolled += payload.len();
                self.events.push_back(Event::Reply {
                    channel: h.channel,
                    msgno,
                    kind,
                    payload,
                });
                Ok(())
            }
        }
    }

    fn mgmt_limits(&self) -> MgmtLimits {
        MgmtLimits {
            max_depth: self.config.limits.max_xml_depth,
            max_attributes: self.config.limits.max_xml_attributes,
            max_piggyback: self.config.limits.max_piggyback,
        }
    }

    fn parse_mgmt(&self, payload: &Bytes) -> Result<Mgmt, ErrorElement> {
        let entity = Entity::parse(payload)
            .map_err(|e| ErrorElement::new(code::SYNTAX_ERROR, e.to_string()))?;
        // Channel 0 carries only application/beep+xml (RFC 3080 §2.3). A message without a
        // Content-Type is strictly an octet stream; read it as XML anyway (robustness).
        if entity.header("Content-Type").is_some() && !entity.is_beep_xml() {
            return Err(ErrorElement::new(
                code::PARAMETER_ERROR,
                "channel 0 carries application/beep+xml in UTF-8 only",
            ));
        }
        mgmt::parse(&entity.body, self.mgmt_limits()).map_err(|e| ErrorElement::new(e.code, e.text))
    }

    /// A complete MSG on channel 0: `start` or `close` (RFC 3080 §2.3.1).
    fn handle_mgmt_msg(&mut self, msgno: u32, payload: Bytes) {
        let outcome = match self.parse_mgmt(&payload) {
            Err(error) => Err(error),
            Ok(Mgmt::Start(start)) => self.handle_start(msgno, start),
            Ok(Mgmt::Close(close)) => self.handle_close(close),
            Ok(_) => Err(ErrorElement::new(
                code::PARAMETER_ERROR,
                "unexpected element in a channel-0 MSG",
            )),
        };
        match outcome {
            Ok(Some(reply)) => self.queue_reply(0, Keyword::Rpy, msgno, reply.to_payload()),
            Ok(None) => {} // answered later by accept_start/refuse_start
            Err(error) => {
                let payload = self.error_payload(error);
                self.queue_reply(0, Keyword::Err, msgno, payload)
            }
        }
    }

    fn handle_start(&mut self, msgno: u32, start: Start) -> Result<Option<Mgmt>, ErrorElement> {
        let odd = start.number % 2 == 1;
        let peer_is_initiator = self.role == Role::Listener;
        if odd != peer_is_initiator {
            let text = if peer_is_initiator {
                "initiator must use odd channel numbers"
            } else {
                "listener must use even channel numbers"
            };
            return Err(ErrorElement::new(code::PARAMETER_ERROR, text));
        }
        if self.channels.contains_key(&start.number) || self.reserved.contains(&start.number) {
            return Err(ErrorElement::new(
                code::ACTION_NOT_TAKEN,
                "channel already in use",
            ));
        }
        if self.channels.len() - 1 + self.reserved.len() >= self.config.limits.max_channels {
            return Err(ErrorElement::new(
                code::ACTION_NOT_TAKEN,
                "too many channels",
            ));
        }
        if matches!(self.state, State::Releasing) {
            return Err(ErrorElement::new(
                code::SERVICE_NOT_AVAILABLE,
                "session is closing",
            ));
        }
        let profiles: Vec<ProfileOffer> = start
            .profiles
            .into_iter()
            .filter(|p| {
                self.config.profiles.contains(&p.uri)
                    || self.config.unlisted_profiles.contains(&p.uri)
            })
            .collect();
        if profiles.is_empty() {
            return Err(ErrorElement::new(
                code::ACTION_NOT_TAKEN,
                "no requested profile is acceptable",
            ));
        }
        // The application takes the first acceptable profile (shard::secure does the same
        // test): only a tuning one stops input.
        if profiles.first().is_some_and(|p| tuning::is_tuning(&p.uri)) {
            if self.tuning_channel.is_some() {
                return Err(ErrorElement::new(
                    code::ACTION_NOT_TAKEN,
                    "a tuning channel is already open",
                ));
            }
            self.input_paused = true;
        }
        self.reserved.insert(start.number);
        self.starts.insert(msgno, start.number);
        self.events.push_back(Event::StartRequested(StartRequest {
            id: msgno,
            channel: start.number,
            profiles,
            server_name: start.server_name,
        }));
        Ok(None)
    }

    fn handle_close(&mut self, close: Close) -> Result<Option<Mgmt>, ErrorElement> {
        if close.number == 0 {
            // Session release (RFC 3080 §2.4): every channel must be idle, as for closing it
            // (BEEP-28, RFC 3080 §2.3.1.3).
            let busy = self.channels.iter().any(|(n, c)| *n != 0 && c.is_busy())
                || !self.starts.is_empty();
            if busy {
                return Err(ErrorElement::new(
                    code::ACTION_NOT_TAKEN,
                    "replies still pending",
                ));
            }
            self.state = State::Releasing;
            self.events.push_back(Event::SessionReleased);
            return Ok(Some(Mgmt::Ok));
        }
        match self.channels.get(&close.number) {
            None => Err(ErrorElement::new(code::ACTION_NOT_TAKEN, "no such channel")),
            Some(c) if c.is_busy() || c.undelivered > 0 => Err(ErrorElement::new(
                code::ACTION_NOT_TAKEN,
                "replies still pending",
            )),
            Some(_) => {
                self.remove_channel(close.number);
                Ok(Some(Mgmt::Ok))
            }
        }
    }

    fn remove_channel(&mut self, number: u32) {
        self.settle_released();
        let Some(channel) = self.channels.remove(&number) else {
            return;
        };
        self.assembling = self.assembling.saturating_sub(channel.assembling());
        self.queued_replies = self
            .queued_replies
            .saturating_sub(channel.queued_reply_octets);
        self.recently_closed.insert(number);
        self.ready.retain(|c| *c != number);
        if self.tuning_channel == Some(number) {
            self.tuning_channel = None;
        }
        self.events.push_back(Event::ChannelClosed {
            channel: number,
            profile: channel.profile,
        });
    }

    /// A complete reply on channel 0 to one of our requests; anything that does not fit the
    /// request is a poorly-formed reply and ends the session (BEEP-15).
    fn handle_mgmt_reply(
        &mut self,
        keyword: Keyword,
        msgno: u32,
        payload: Bytes,
    ) -> Result<(), ProtocolError> {
        let request = self
            .requests
            .remove(&msgno)
            .ok_or(ProtocolError::BadManagementReply("reply to no request"))?;
        let element = self
            .parse_mgmt(&payload)
            .map_err(|_| ProtocolError::BadManagementReply("unparsable channel-0 reply"))?;
        match (request, keyword, element) {
            (Request::Greeting, Keyword::Rpy, Mgmt::Greeting(greeting)) => {
                self.state = State::Open;
                self.peer_greeting = Some(greeting.clone());
                self.events.push_back(Event::Greeting(greeting));
            }
            (Request::Greeting, Keyword::Err, Mgmt::Error(error)) => {
                // BEEP-18: the listener refused service; both peers terminate.
                return Err(ProtocolError::SessionRefused {
                    code: error.code,
                    text: error.text,
                });
            }
            (Request::Start { channel, offers }, Keyword::Rpy, Mgmt::Profile(profile)) => {
                self.reserved.remove(&channel);
                if !offers.contains(&profile.uri) {
                    return Err(ProtocolError::BadManagementReply(
                        "peer chose a profile we did not offer",
                    ));
                }
                if tuning::is_tuning(&profile.uri) {
                    self.input_paused = true;
                }
                self.open_channel(channel, profile.uri.clone());
                self.events.push_back(Event::ChannelStarted {
                    channel,
                    profile: profile.uri,
                    content: profile.content,
                });
            }
            (Request::Start { channel, .. }, Keyword::Err, Mgmt::Error(error)) => {
                self.reserved.remove(&channel);
                self.events
                    .push_back(Event::StartRefused { channel, error });
            }
            (Request::Close { channel: 0 }, Keyword::Rpy, Mgmt::Ok) => {
                self.state = State::Releasing;
                self.events.push_back(Event::SessionReleased);
            }
            (Request::Close { channel }, Keyword::Rpy, Mgmt::Ok) => {
                if self.channels.contains_key(&channel) {
                    self.remove_channel(channel);
                }
            }
            (Request::Close { channel }, Keyword::Err, Mgmt::Error(error)) => {
                if let Some(c) = self.channels.get_mut(&channel) {
                    c.closing = false;
                }
                self.events
                    .push_back(Event::CloseRefused { channel, error });
            }
            _ => {
                return Err(ProtocolError::BadManagementReply(
                    "reply does not answer its request",
                ))
            }
        }
        Ok(())
    }

    fn open_channel(&mut self, number: u32, profile: String) {
        self.settle_released();
        let tuning = tuning::is_tuning(&profile);
        let mut channel = Channel::new(profile, &self.config.limits, 0);
        if tuning {
            channel.keep_initial_window();
        }
        self.channels.insert(number, channel);
        self.recently_closed.remove(&number);
        if tuning {
            // Its few small messages fit the initial window, and after a TLS `proceed` not
            // even a SEQ may follow the reply (RFC 3080 §3.1.3.1).
            self.tuning_channel = Some(number);
        } else {
            // Advertise the configured window as soon as the channel may speak.
            if let Some(c) = self.channels.get_mut(&number) {
                c.seq_dirty = true;
            }
            self.seq_dirty.push(number);
        }
    }

    fn queue_reply(&mut self, channel: u32, keyword: Keyword, msgno: u32, payload: Bytes) {
        self.queue_reply_announcing(channel, keyword, msgno, payload, None);
    }

    fn queue_reply_announcing(
        &mut self,
        channel: u32,
        keyword: Keyword,
        msgno: u32,
        payload: Bytes,
        announces: Option<u32>,
    ) {
        if let Some(c) = self.channels.get_mut(&channel) {
            if c.reply(keyword, msgno, payload, announces).is_ok() && !c.queue.is_empty() {
                make_ready(c, channel, &mut self.ready);
            }
        }
    }

    fn mark_ready(&mut self, channel: u32) {
        if let Some(c) = self.channels.get_mut(&channel) {
            make_ready(c, channel, &mut self.ready);
        }
    }

    /// The next event, if any. Taking a message event counts its octets as consumed by the
    /// application, which lets the next `poll_transmit` reopen the window (BEEP-63).
    ///
    /// While more than [`Limits::max_queued_replies`] octets of our replies wait to be written
    /// (the peer does not open its window for them), no event is handed out: what the peer
    /// sends then stays counted against the windows we advertise, which close, so a peer that
    /// never takes its replies cannot make us queue more of them (BEEP-61/63). SEQ frames are
    /// still applied on input; once the replies drain below the limit, events flow again.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.queued_replies > self.config.limits.max_queued_replies {
            return None;
        }
        let event = self.events.pop_front()?;
        if let Event::Message {
            channel, payload, ..
        }
        | Event::Reply {
            channel, payload, ..
        } = &event
        {
            self.unpolled = self.unpolled.saturating_sub(payload.len());
            let octets = payload.len() as u32;
            match &mut self.released {
                Some((number, pending)) if number == channel => {
                    *pending = pending.saturating_add(octets);
                }
                _ => {
                    self.settle_released();
                    self.released = Some((*channel, octets));
                }
            }
        }
        Some(event)
    }

    /// Takes what the application polled off its channel's `undelivered`, which may reopen the
    /// window with a SEQ (BEEP-66).
    fn settle_released(&mut self) {
        let Some((number, octets)) = self.released.take() else {
            return;
        };
        if let Some(c) = self.channels.get_mut(&number) {
            c.undelivered = c.undelivered.saturating_sub(octets);
            if !c.seq_dirty {
                c.seq_dirty = true;
                self.seq_dirty.push(number);
            }
        }
    }

    /// Appends pending output to `out`: first the SEQ frames that reopen windows (BEEP-67),
    /// then data frames round-robin across channels (BEEP-65), each within the peer's window
    /// (BEEP-61) and the frame limit, up to `max_transmit` octets. Returns the octets appended.
    pub fn poll_transmit(&mut self, out: &mut impl FrameSink) -> usize {
        let start = out.written();
        if self.state == State::Dead {
            return 0;
        }
        self.settle_released();
        let mut deferred = Vec::new();
        // Drained and put back at the end, so that its allocation serves every call.
        let mut dirty = std::mem::take(&mut self.seq_dirty);
        for number in dirty.drain(..) {
            if let Some(channel) = self.channels.get_mut(&number) {
                if !channel.announced {
                    deferred.push(number);
                    continue;
                }
                if let Some((ackno, window)) = channel.take_seq() {
                    Seq {
                        channel: number,
                        ackno,
                        window,
                    }
                    .encode(out.buffer());
                }
            }
        }
        if !self.deferred_closes.is_empty() {
            self.release_deferred_closes();
        }
        let max_frame = self.config.limits.max_send_frame;
        let budget = self.config.limits.max_transmit;
        while out.written() - start < budget {
            let Some(number) = self.ready.pop_front() else {
                break;
            };
            let Some(channel) = self.channels.get_mut(&number) else {
                continue;
            };
            // While no other channel is ready, round-robin among one is this channel's frames
            // back to back: one lookup serves them all.
            let mut announced_now = None;
            let replies_before = channel.queued_reply_octets;
            loop {
                let queued = channel.queue.len();
                let wrote = channel.write_frame(number, max_frame, out);
                // A message leaves the queue with its last frame.
                if channel.queue.len() < queued {
                    self.messages_out += 1;
                }
                if let Some(Some(announced)) = wrote {
                    announced_now = Some(announced);
                }
                if wrote.is_none() || channel.queue.is_empty() {
                    channel.in_ready = false;
                    break;
                }
                if announced_now.is_some()
                    || !self.ready.is_empty()
                    || out.written() - start >= budget
                {
                    self.ready.push_back(number);
                    break;
                }
            }
            if number != 0 {
                // Channel 0's replies are the session's own, never counted.
                self.queued_replies = self
                    .queued_replies
                    .saturating_sub(replies_before - channel.queued_reply_octets);
            }
            if let Some(announced) = announced_now {
                // The peer learns of the channel with this frame: it may speak from now on.
                if let Some(c) = self.channels.get_mut(&announced) {
                    c.announced = true;
                    deferred.push(announced);
                    if !c.queue.is_empty() {
                        self.mark_ready(announced);
                    }
                }
            }
        }
        dirty.extend(deferred);
        dirty.append(&mut self.seq_dirty);
        self.seq_dirty = dirty;
        out.written() - start
    }

    /// True when `poll_transmit` has frames it could write now.
    pub fn has_output(&self) -> bool {
        !self.ready.is_empty() || !self.seq_dirty.is_empty() || self.released.is_some()
    }

    /// Keeps `octets` more of `channel`'s receive window closed: data the application accepted
    /// from the peer but cannot pass on yet (a relay whose recipient does not read). The peer
    /// may send that much less until [`Session::release_window`] gives it back; replies keep
    /// the rest of the window, so the peer can still answer what we send it (BEEP-68).
    /// Unknown channels are ignored (the octets died with the channel).
    pub fn withhold_window(&mut self, channel: u32, octets: u32) {
        if let Some(c) = self.channels.get_mut(&channel).filter(|_| channel != 0) {
            c.withheld = c.withheld.saturating_add(octets);
        }
    }

    /// Gives back `octets` withheld with [`Session::withhold_window`]; the next
    /// `poll_transmit` reopens the window with a SEQ when that is worth one (BEEP-66).
    pub fn release_window(&mut self, channel: u32, octets: u32) {
        if let Some(c) = self.channels.get_mut(&channel) {
            c.withheld = c.withheld.saturating_sub(octets);
            if !c.seq_dirty {
                c.seq_dirty = true;
                self.seq_dirty.push(channel);
            }
        }
    }

    /// Octets of `channel`'s window withheld by the application.
    pub fn withheld(&self, channel: u32) -> u32 {
        self.channels.get(&channel).map_or(0, |c| c.withheld)
    }

    /// Octets of our replies given and not yet completely written (see
    /// [`Session::poll_event`]).
    pub fn queued_replies(&self) -> usize {
        self.queued_replies
    }

    /// Whether events wait that [`Session::poll_event`] would hand out.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty() && self.queued_replies <= self.config.limits.max_queued_replies
    }

    /// Octets of partial messages this session holds for reassembly, over all its channels.
    pub fn assembling(&self) -> usize {
        self.assembling
    }

    /// Lowers (or restores, up to [`Limits::max_session_assembly`]) how many octets of partial
    /// messages the session may hold: a runtime sharing one budget between its sessions gives
    /// each what is left. A continued MSG that needs more is answered with a pre-emptive ERR
    /// 550 and its remaining frames are ignored (BEEP-38); a continued reply that needs more
    /// ends the session (its octets are ours to hold and there is no one to refuse).
    pub fn set_assembly_allowance(&mut self, octets: usize) {
        self.assembly_allowance = octets.min(self.config.limits.max_session_assembly);
    }

    fn usable(&self) -> Result<(), Misuse> {
        match self.state {
            State::Releasing | State::Dead => Err(Misuse::SessionClosed),
            _ => Ok(()),
        }
    }

    /// Asks the peer to start a channel with one of `profiles` (RFC 3080 §2.3.1.2). Returns the
    /// channel number; [`Event::ChannelStarted`] or [`Event::StartRefused`] follows.
    pub fn start_channel(
        &mut self,
        profiles: Vec<ProfileOffer>,
        server_name: Option<String>,
    ) -> Result<u32, Misuse> {
        self.usable()?;
        if self.channels.len() - 1 + self.reserved.len() >= self.config.limits.max_channels {
            return Err(Misuse::ChannelsExhausted);
        }
        let first = if self.role == Role::Initiator { 1 } else { 2 };
        let step = |n: u32| if n + 2 > MAX_31BIT { first } else { n + 2 };
        let mut number = self.next_channel;
        while self.channels.contains_key(&number) || self.reserved.contains(&number) {
            number = step(number);
        }
        self.next_channel = step(number);
        self.reserved.insert(number);
        let offers = profiles.iter().map(|p| p.uri.clone()).collect();
        let payload = Mgmt::Start(Start {
            number,
            server_name,
            profiles,
        })
        .to_payload();
        let msgno = self.queue_mgmt_msg(payload);
        self.requests.insert(
            msgno,
            Request::Start {
                channel: number,
                offers,
            },
        );
        Ok(number)
    }

    fn queue_mgmt_msg(&mut self, payload: Bytes) -> u32 {
        let msgno = match self.channels.get_mut(&0) {
            Some(ch0) => ch0.queue_msg(payload),
            None => 0,
        };
        self.mark_ready(0);
        msgno
    }

    /// Accepts the peer's start `id` with `profile`, piggybacking `content` in the reply when
    /// given (RFC 3080 §2.3.1.2, BEEP-22).
    pub fn accept_start(
        &mut self,
        id: u32,
        profile: &str,
        content: Option<Bytes>,
    ) -> Result<u32, Misuse> {
        let channel = self.starts.remove(&id).ok_or(Misuse::NoSuchStart(id))?;
        self.reserved.remove(&channel);
        self.open_channel(channel, profile.to_owned());
        if let Some(c) = self.channels.get_mut(&channel) {
            c.announced = false;
        }
        let reply = Mgmt::Profile(ProfileOffer {
            uri: profile.to_owned(),
            content,
        });
        self.queue_reply_announcing(0, Keyword::Rpy, id, reply.to_payload(), Some(channel));
        self.events.push_back(Event::ChannelStarted {
            channel,
            profile: profile.to_owned(),
            content: None,
        });
        Ok(channel)
    }

    /// Whether input stopped at a tuning request (a `start` offering a tuning profile, or a
    /// message or reply on the tuning channel): what follows it in the read buffer is left
    /// there until [`Session::resume_input`].
    pub fn input_paused(&self) -> bool {
        self.input_paused
    }

    /// Reads frames again after a tuning request was dealt with without a tuning reset (a
    /// refused `ready`, a SASL step).
    pub fn resume_input(&mut self) {
        self.input_paused = false;
    }

    /// The channel running a tuning profile, if any (BEEP-43).
    pub fn tuning_channel(&self) -> Option<u32> {
        self.tuning_channel
    }

    /// Whether `channel` is the only channel besides 0 and nothing else is being started or
    /// closed: a tuning reset would then discard nothing the application knows of.
    pub fn alone_with(&self, channel: u32) -> bool {
        self.channels.keys().all(|c| *c == 0 || *c == channel)
            && self.reserved.iter().all(|c| *c == channel)
            && self
                .requests
                .values()
                .all(|r| matches!(r, Request::Start { channel: c, .. } if *c == channel))
    }

    /// Records the serverName of the first successful start (BEEP-23).
    pub fn set_server_name(&mut self, name: &str) {
        if self.server_name.is_none() {
            self.server_name = Some(name.to_owned());
        }
    }

    /// Refuses the peer's start `id` with `error` (RFC 3080 §2.3.1.2).
    pub fn refuse_start(&mut self, id: u32, error: ErrorElement) -> Result<(), Misuse> {
        let channel = self.starts.remove(&id).ok_or(Misuse::NoSuchStart(id))?;
        self.reserved.remove(&channel);
        let payload = self.error_payload(error);
        self.queue_reply(0, Keyword::Err, id, payload);
        Ok(())
    }

    fn profile_channel(&mut self, channel: u32) -> Result<&mut Channel, Misuse> {
        profile_channel_in(&mut self.channels, channel)
    }

    /// Queues a MSG on a profile channel; returns its msgno.
    pub fn send_msg(&mut self, channel: u32, payload: Bytes) -> Result<u32, Misuse> {
        self.try_send_msg(channel, payload)
            .map_err(|(misuse, _)| misuse)
    }

    /// [`Session::send_msg`] that hands the payload back when it cannot be queued, for a caller
    /// that keeps it for later (a relay holding MSGs until replies free room) without paying
    /// for a second reference to it on every MSG that does go out.
    pub fn try_send_msg(&mut self, channel: u32, payload: Bytes) -> Result<u32, (Misuse, Bytes)> {
        if let Err(misuse) = self.usable().and_then(|()| check_size(&payload)) {
            return Err((misuse, payload));
        }
        let limit = self.config.limits.max_outstanding_msgs;
        let octet_limit = self.config.limits.max_queued_octets;
        let c = match profile_channel_in(&mut self.channels, channel) {
            Ok(c) => c,
            Err(misuse) => return Err((misuse, payload)),
        };
        if c.closing {
            return Err((Misuse::ChannelClosing(channel), payload));
        }
        if c.outstanding.len() >= limit || c.queued_msg_octets >= octet_limit {
            return Err((Misuse::TooManyOutstanding(channel), payload));
        }
        let msgno = c.queue_msg(payload);
        make_ready(c, channel, &mut self.ready);
        Ok(msgno)
    }

    /// Answers the peer's MSG `msgno` with a RPY.
    pub fn send_rpy(&mut self, channel: u32, msgno: u32, payload: Bytes) -> Result<(), Misuse> {
        self.reply(channel, Keyword::Rpy, msgno, payload)
            .map(|_| ())
    }

    /// Answers the peer's MSG `msgno` with an ERR.
    pub fn send_err(&mut self, channel: u32, msgno: u32, payload: Bytes) -> Result<(), Misuse> {
        self.reply(channel, Keyword::Err, msgno, payload)
            .map(|_| ())
    }

    /// Sends one ANS of a one-to-many reply; returns its ansno. End the reply with
    /// [`Session::send_nul`].
    pub fn send_ans(&mut self, channel: u32, msgno: u32, payload: Bytes) -> Result<u32, Misuse> {
        self.reply(channel, Keyword::Ans, msgno, payload)
            .map(|a| a.unwrap_or_default())
    }

    /// Ends a one-to-many reply (BEEP-11: NUL carries `.` and no payload).
    pub fn send_nul(&mut self, channel: u32, msgno: u32) -> Result<(), Misuse> {
        self.reply(channel, Keyword::Nul, msgno, Bytes::new())
            .map(|_| ())
    }

    fn reply(
        &mut self,
        channel: u32,
        keyword: Keyword,
        msgno: u32,
        payload: Bytes,
    ) -> Result<Option<u32>, Misuse> {
        if self.state == State::Dead {
            return Err(Misuse::SessionClosed);
        }
        check_size(&payload)?;
        let octets = payload.len();
        let c = profile_channel_in(&mut self.channels, channel)?;
        let ansno = c
            .reply(keyword, msgno, payload, None)
            .map_err(|()| Misuse::NoPendingMsg { channel, msgno })?;
        if !c.queue.is_empty() {
            make_ready(c, channel, &mut self.ready);
        }
        self.queued_replies += octets;
        Ok(ansno)
    }

    /// Asks the peer to close `channel` (RFC 3080 §2.3.1.3). Allowed only when every MSG we
    /// sent on it has been acknowledged (BEEP-25); no MSG may follow (BEEP-26).
    pub fn close_channel(&mut self, channel: u32, reply_code: u16) -> Result<(), Misuse> {
        self.usable()?;
        let c = self.profile_channel(channel)?;
        if c.closing {
            return Err(Misuse::ChannelClosing(channel));
        }
        if !c.all_acknowledged() {
            return Err(Misuse::Unacknowledged(channel));
        }
        c.closing = true;
        self.deferred_closes.push((channel, reply_code));
        self.release_deferred_closes();
        Ok(())
    }

    /// Queues the `close` requests whose channels have no output left: a close must not
    /// overtake replies already queued on the channel it closes (the peer would refuse it as
    /// busy, BEEP-28); a session release waits for every channel.
    fn release_deferred_closes(&mut self) {
        let mut i = 0;
        while i < self.deferred_closes.len() {
            let (channel, reply_code) = self.deferred_closes[i];
            let idle = |c: &Channel| c.queue.is_empty();
            let ready = if channel == 0 {
                self.channels.iter().all(|(n, c)| *n == 0 || idle(c))
            } else {
                self.channels.get(&channel).is_none_or(idle)
            };
            if !ready {
                i += 1;
                continue;
            }
            self.deferred_closes.remove(i);
            let payload = Mgmt::Close(Close {
                number: channel,
                code: reply_code,
                text: String::new(),
            })
            .to_payload();
            let msgno = self.queue_mgmt_msg(payload);
            self.requests.insert(msgno, Request::Close { channel });
        }
    }

    /// Asks the peer to release the session (`close` with number 0, RFC 3080 §2.4).
    pub fn close_session(&mut self, reply_code: u16) -> Result<(), Misuse> {
        self.usable()?;
        let asked = self
            .requests
            .values()
            .any(|r| matches!(r, Request::Close { channel: 0 }))
            || self.deferred_closes.iter().any(|(c, _)| *c == 0);
        if !asked {
            self.deferred_closes.push((0, reply_code));
            self.release_deferred_closes();
        }
        Ok(())
    }
}

/// Hands a frame to its channel and does the channel's share of what follows: the payload of a
/// complete message counts against the window until it is polled, and the peer's ERR ends our
/// unsent MSG (BEEP-39). Takes the session's parts it touches rather than the session, so the
/// caller's one lookup of `channel` serves for all of it.
fn receive_on(
    channel: &mut Channel,
    h: &Header,
    payload: Bytes,
    limits: &Limits,
    room: usize,
    seq_dirty: &mut Vec<u32>,
    ready: &mut VecDeque<u32>,
) -> Result<Received, ProtocolError> {
    let received = channel.receive(h, payload, limits, room)?;
    if !channel.seq_dirty {
        channel.seq_dirty = true;
        seq_dirty.push(h.channel);
    }
    match &received {
        Received::Msg { payload, .. } if h.channel != 0 => {
            channel.undelivered = channel.undelivered.saturating_add(payload.len() as u32);
        }
        Received::Reply {
            keyword,
            msgno,
            payload,
            ..
        } => {
            // BEEP-39: finish our MSG with an empty final frame, window or not.
            if *keyword == Keyword::Err && channel.truncate_unsent_msg(*msgno) {
                make_ready(channel, h.channel, ready);
            }
            if h.channel != 0 {
                channel.undelivered = channel.undelivered.saturating_add(payload.len() as u32);
            }
        }
        _ => {}
    }
    Ok(received)
}

/// Puts channel `number` in the round-robin of channels with output, unless it is there.
fn make_ready(channel: &mut Channel, number: u32, ready: &mut VecDeque<u32>) {
    if !channel.in_ready {
        channel.in_ready = true;
        ready.push_back(number);
    }
}

/// A channel other than 0, which the application may use.
fn profile_channel_in(
    channels: &mut FxHashMap<u32, Channel>,
    channel: u32,
) -> Result<&mut Channel, Misuse> {
    if channel == 0 {
        return Err(Misuse::NoSuchChannel(0));
    }
    channels
        .get_mut(&channel)
        .ok_or(Misuse::NoSuchChannel(channel))
}

fn check_size(payload: &Bytes) -> Result<(), Misuse> {
    if payload.len() > MAX_31BIT as usize {
        Err(Misuse::PayloadTooLarge)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APEX: &str = "http://iana.org/beep/APEX";

    fn feed(session: &mut Session, octets: &[u8]) {
        let mut buf = BytesMut::from(octets);
        session.handle_input(&mut buf, Instant::now()).unwrap();
        assert!(buf.is_empty(), "every frame was taken");
    }

    fn flush(session: &mut Session) -> BytesMut {
        let mut out = BytesMut::new();
        while session.poll_transmit(&mut out) > 0 {}
        out
    }

    /// The end-of-session counts are of messages, not frames: a MSG in two frames is one, each
    /// ANS of a one-to-many reply is one, and channel 0's greeting, start and reply count too.
    #[test]
    fn messages_are_counted_once_each_however_they_are_framed() {
        let mut session = Session::new(
            Role::Listener,
            SessionConfig {
                profiles: vec![APEX.to_owned()],
                ..SessionConfig::default()
            },
        );
        assert_eq!(
            (session.messages_received(), session.messages_sent()),
            (0, 0)
        );
        flush(&mut session);
        assert_eq!(session.messages_sent(), 1, "our greeting");

        // The peer's greeting and a start on channel 0 (RFC 3080 §2.3.1).
        feed(
            &mut session,
            b"RPY 0 0 . 0 50\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />END\r\n\
              MSG 0 1 . 50 107\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'><profile uri='http://iana.org/beep/APEX' /></start>END\r\n",
        );
        assert_eq!(session.messages_received(), 2);
        let start = std::iter::from_fn(|| session.poll_event())
            .find_map(|e| match e {
                Event::StartRequested(request) => Some(request.id),
                _ => None,
            })
            .unwrap();
        session.accept_start(start, APEX, None).unwrap();
        flush(&mut session);
        assert_eq!(session.messages_sent(), 2, "greeting and the start's reply");

        // One MSG in two frames, then one in a single frame: two messages, and a frame that
        // only begins a message counts nothing.
        feed(&mut session, b"MSG 1 0 * 0 3\r\nabcEND\r\n");
        assert_eq!(session.messages_received(), 2);
        feed(
            &mut session,
            b"MSG 1 0 . 3 2\r\ndeEND\r\nMSG 1 1 . 5 1\r\nfEND\r\n",
        );
        assert_eq!(session.messages_received(), 4);
        while session.poll_event().is_some() {}

        // A RPY to the first, two ANS and a NUL to the second: four messages sent.
        session.send_rpy(1, 0, Bytes::from_static(b"ok")).unwrap();
        session.send_ans(1, 1, Bytes::from_static(b"one")).unwrap();
        session.send_ans(1, 1, Bytes::from_static(b"two")).unwrap();
        session.send_nul(1, 1).unwrap();
        let out = flush(&mut session);
        assert!(
            out.windows(b"NUL 1 1 . ".len()).any(|w| w == b"NUL 1 1 . "),
            "{out:?}"
        );
        assert_eq!(session.messages_sent(), 6);
        assert_eq!(session.messages_received(), 4, "sending receives nothing");

        // The peer's reply to a MSG of ours arrives in two frames: one message.
        let msgno = session.send_msg(1, Bytes::from_static(b"hi")).unwrap();
        flush(&mut session);
        assert_eq!(session.messages_sent(), 7);
        feed(
            &mut session,
            format!("RPY 1 {msgno} * 6 1\r\nyEND\r\nRPY 1 {msgno} . 7 1\r\nzEND\r\n").as_bytes(),
        );
        assert_eq!(session.messages_received(), 5);

        // A session that replaces this one on the same transport (after TLS) counts on.
        let mut next = Session::new(Role::Listener, SessionConfig::default());
        next.count_from(&session);
        assert_eq!((next.messages_received(), next.messages_sent()), (5, 7));
    }
}
