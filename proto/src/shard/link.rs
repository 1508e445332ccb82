//! Outbound relay links (RFC 3340 §3.1, §4.4.4.1 step 5.2): one link per remote domain, owned
//! by the shard `domain_shard(domain)`. This module owns what a link decides: when to ask the
//! runtime for a connection, how the session is set up (greeting check, channel `start` with a
//! piggybacked `bind`, the `bind` as a MSG when the next relay accepted the channel without
//! answering it, RFC 3340 §4.2), what is sent and what each reply means, when to give up,
//! and how long to wait before the next attempt. The session itself lives among the shard
//! core's connections, so the runtime drives it with the same loop as every other one.
//!
//! A link is `Idle` until data is queued for its domain, then `Connecting` (the runtime
//! resolves the domain and connects), then `Open` on a connection: greeting, start, bound.
//! Data is sent pipelined, at most [`LinkConfig::in_flight`] unanswered. The next relay's `ok`
//! is success; an `error`, a lost connection or no route is a failure, which the relay reports
//! to the originator when asked (statusRequest). A reply that is neither `ok` nor `error` is a
//! failure too, and ends the link (RFC 3080 §2.2.2.1 closes the channel, BEEP-15). A link that must end asks the next relay to
//! release the session and waits for its answer before the transport is closed (RFC 3080
//! §2.4), at most [`LinkConfig::close_timeout`]. A next relay that accepts the connection but
//! does not greet, start the channel or answer the `bind` within [`LinkConfig::setup_timeout`]
//! loses it, as an accepted peer that does not greet does (RFC 3080 §2.4 lets either side
//! close a session that goes nowhere). Failed connection attempts back off, doubling from
//! [`FIRST_BACKOFF`] up to [`LinkConfig::max_backoff`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::apex::client::{self, Answer};
use crate::apex::msg::{self};
use crate::apex::options::{self, Restamp};
use crate::apex::relay::{ConnId, ForwardReports, APEX_PROFILE};
use crate::beep::mgmt::{code, ProfileOffer};
use crate::beep::session::{Event, ReplyKind, Session};
use crate::beep::tuning;

/// The wait before the second connection attempt; it doubles with every failed one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How links behave: from the `[mesh]` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// The domain this relay binds as.
    pub our_domain: String,
    /// Data queued per link while it connects; beyond it the data fails at once.
    pub queue: usize,
    /// Data sent and not yet answered per link.
    pub in_flight: usize,
    /// Failed connection attempts in a row after which the queued data fails.
    pub connect_attempts: u32,
    /// Longest wait between connection attempts.
    pub max_backoff: Duration,
    /// How long a link that asked to release its session waits for the next relay's answer
    /// before its transport is closed anyway.
    pub close_timeout: Duration,
    /// From the connection until bound: greeting, TLS, channel start and `bind` answered.
    pub setup_timeout: Duration,
    /// Start TLS before binding, and give up on a next relay that does not offer it (a
    /// greeting without TLS may be a man in the middle's, RFC 3080 §9).
    pub tls: bool,
}

impl LinkConfig {
    /// The defaults of the `[mesh]` section for a relay of `our_domain`.
    pub fn new(our_domain: &str) -> Self {
        Self {
            our_domain: our_domain.to_owned(),
            queue: 4096,
            in_flight: 256,
            connect_attempts: 5,
            max_backoff: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            setup_timeout: Duration::from_secs(10),
            tls: false,
        }
    }
}

/// Why the runtime could not give a link a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The domain has no relay to connect to (no static route, no SRV record): the queued
    /// data fails at once.
    NoRoute(String),
    /// No address of the domain's relay accepted the connection: counts as one attempt.
    Unreachable(String),
}

/// Where a link's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the next relay's greeting.
    Greeting,
    /// Asked for a TLS channel with `ready` piggybacked (or sent on it): waiting for
    /// `proceed` (RFC 3080 §3.1).
    StartingTls,
    /// The TLS handshake runs; the next relay greets again once it is done.
    Securing,
    /// Asked for an APEX channel with our `bind` piggybacked.
    Starting,
    /// The channel exists and our `bind` was sent on it as a MSG.
    Binding {
        /// The APEX channel.
        channel: u32,
    },
    /// Bound: data flows on `channel`.
    Bound {
        /// The APEX channel.
        channel: u32,
    },
    /// Asked the next relay to release the session; waiting for its answer.
    Closing {
        /// Since when.
        since: Instant,
    },
    /// The next relay did not answer our `close` in time: the transport is being closed.
    Abandoned,
}

impl Phase {
    /// Whether the connection is still being set up (not yet bound, not ending).
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            Phase::Greeting
                | Phase::StartingTls
                | Phase::Securing
                | Phase::Starting
                | Phase::Binding { .. }
        )
    }
}

/// A link's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Nothing queued, no connection.
    Idle,
    /// The runtime was asked for a connection ([`super::Output::Connect`]).
    Connecting,
    /// Waiting before the next connection attempt.
    Backoff {
        /// When the wait ends.
        until: Instant,
    },
    /// On connection `conn`.
    Open {
        /// The connection, among the shard core's.
        conn: ConnId,
        /// How far its setup got.
        phase: Phase,
    },
}

impl LinkState {
    /// The state's name, as status displays show it.
    pub fn name(&self) -> &'static str {
        match self {
            LinkState::Idle => "idle",
            LinkState::Connecting => "connecting",
            LinkState::Backoff { .. } => "backoff",
            LinkState::Open { .. } => "open",
        }
    }
}

/// The statusRequests one forwarded data answers for (see [`ForwardReports`]); `None` for
/// data that asks for no report.
pub(super) type Answers = Option<Box<ForwardReports>>;

/// Data queued on a link.
#[derive(Debug)]
struct Queued {
    payload: Bytes,
    reports: Answers,
}

/// What a link asks of the shard core after an input.
#[derive(Debug, Default)]
pub(super) struct LinkEffects {
    /// Data that failed, and why: the relay reports it where asked.
    pub(super) failed: Vec<(Answers, String)>,
    /// Data the next relay accepted that asked for reports: the relay answers those that
    /// apply at this relay (APEX-38).
    pub(super) accepted: Vec<ForwardReports>,
    /// Ask the runtime for a connection.
    pub(super) connect: bool,
    /// The next relay said `proceed`: begin the TLS handshake on the connection.
    pub(super) start_tls: bool,
    /// Reports a forward's `dataTiming` asked for as it left (transient, 350) or instead of
    /// leaving (timing error), with the forward they are about (RFC 3342 §2.1, §2.2).
    pub(super) timing_reports: Vec<(Box<ForwardReports>, options::Report)>,
}

/// Why a forward fails whose `dataTiming` `noLaterThan` ran out while it waited on the link.
pub(super) const TIMING_EXPIRED: &str = "dataTiming noLaterThan ran out before the data left";

/// The link to one remote domain.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) domain: String,
    pub(super) state: LinkState,
    queue: VecDeque<Queued>,
    /// What each unanswered data answers for, in the order sent (replies come in order).
    in_flight: VecDeque<Answers>,
    /// Failed connection attempts in a row.
    attempts: u32,
    backoff: Duration,
    /// Why the current connection is ending, when the link ended it.
    ending: Option<String>,
    /// Whether the current connection got bound.
    bound: bool,
    /// Whether the current connection runs TLS.
    secured: bool,
    /// When the current connection was made: its setup must be done by
    /// [`LinkConfig::setup_timeout`] after it.
    connected_at: Option<Instant>,
}

/// `payload`, the data of `forward`, with the time since its `dataTiming` values were worked
/// out subtracted at relay-clock `now_ms` (`forward.timing` follows), or `None` when its
/// `noLaterThan` ran out; and the report that asks for, if any. Option content that no longer
/// parses (it parsed when the data was accepted) leaves the data as it is.
fn restamp(
    forward: &mut ForwardReports,
    payload: &Bytes,
    now_ms: u64,
) -> (Option<Bytes>, Option<options::Report>) {
    let Some(timing) = forward.timing.as_mut() else {
        return (Some(payload.clone()), None);
    };
    match options::restamp_forward(payload, &timing.option, timing.stamped_at_ms, now_ms) {
        Ok(Restamp::Send {
            payload,
            option,
            report,
        }) => {
            timing.option = option;
            timing.stamped_at_ms = timing.stamped_at_ms.max(now_ms);
            (Some(payload), report)
        }
        Ok(Restamp::Drop { report }) => (None, report),
        Err(_) => (Some(payload.clone()), None),
    }
}

/// Why data fails when the next relay answers it with something that is not `ok` or `error`.
const POORLY_FORMED_REPLY: &str = "poorly formed reply from the next relay";

/// The transaction number of our `bind` (the only transaction a link starts).
const BIND_TRANS_ID: u32 = 1;

impl Link {
    pub(super) fn new(domain: String) -> Self {
        Self {
            domain,
            state: LinkState::Idle,
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            attempts: 0,
            backoff: FIRST_BACKOFF,
            ending: None,
            bound: false,
            secured: false,
            connected_at: None,
        }
    }

    /// The connection the link is on, if any.
    pub(super) fn conn(&self) -> Option<ConnId> {
        match self.state {
            LinkState::Open { conn, .. } => Some(conn),
            _ => None,
        }
    }

    /// Data queued and not yet sent.
    pub(super) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues `payload`; sends it at once when bound and there is room (`session` is the
    /// link's, when open). A full queue fails it.
    /// `now_ms` is the relay clock's (see [`Link::pump`]).
    pub(super) fn enqueue(
        &mut self,
        payload: Bytes,
        reports: Answers,
        session: Option<&mut Session>,
        config: &LinkConfig,
        now_ms: u64,
        effects: &mut LinkEffects,
    ) {
        if self.queue.len() >= config.queue {
            effects
                .failed
                .push((reports, "relay link queue is full".to_owned()));
            return;
        }
        self.queue.push_back(Queued { payload, reports });
        match (self.state, session) {
            (LinkState::Idle, _) => {
                self.state = LinkState::Connecting;
                effects.connect = true;
            }
            (LinkState::Open { .. }, Some(session)) => self.pump(session, config, now_ms, effects),
            _ => {}
        }
    }

    /// The runtime connected the link at `now`: `conn` carries its initiator session from now
    /// on.
    pub(super) fn connected(&mut self, conn: ConnId, now: Instant) {
        self.connected_at = Some(now);
        self.attempts = 0;
        self.backoff = FIRST_BACKOFF;
        self.ending = None;
        self.bound = false;
        self.secured = false;
        self.state = LinkState::Open {
            conn,
            phase: Phase::Greeting,
        };
    }

    /// The TLS handshake completed: the session starts over (beep.md §9), and the next
    /// relay greets again.
    pub(super) fn secured(&mut self) {
        if let LinkState::Open {
            conn,
            phase: Phase::Securing,
        } = self.state
        {
            self.secured = true;
            self.set_phase(conn, Phase::Greeting);
        }
    }

    /// The runtime could not connect.
    pub(super) fn connect_failed(
        &mut self,
        failure: ConnectFailure,
        config: &LinkConfig,
        now: Instant,
        effects: &mut LinkEffects,
    ) {
        match failure {
            ConnectFailure::NoRoute(reason) => {
                self.fail_queued(&reason, effects);
                self.state = LinkState::Idle;
            }
            ConnectFailure::Unreachable(_) => {
                self.attempts += 1;
                if self.attempts >= config.connect_attempts {
                    self.fail_queued("the recipient's relay is unreachable", effects);
                    self.attempts = 0;
                }
                self.state = LinkState::Backoff {
                    until: now + self.backoff,
                };
                self.backoff = (self.backoff * 2).min(config.max_backoff);
            }
        }
    }

    /// A session event of the link's connection.
    pub(super) fn handle_event(
        &mut self,
        session: &mut Session,
        event: Event,
        config: &LinkConfig,
        now: Instant,
        now_ms: u64,
        effects: &mut LinkEffects,
    ) {
        let LinkState::Open { conn, phase } = self.state else {
            return;
        };
        let failure = match (phase, event) {
            (Phase::Greeting, Event::Greeting(greeting)) if config.tls && !self.secured => {
                if !greeting.profiles.iter().any(|p| p == tuning::TLS_PROFILE) {
                    Some("the next relay does not offer TLS".to_owned())
                } else {
                    let ready = ProfileOffer {
                        uri: tuning::TLS_PROFILE.to_owned(),
                        content: Some(Bytes::from_static(tuning::READY.as_bytes())),
                    };
                    match session.start_channel(vec![ready], None) {
                        Ok(_) => {
                            self.set_phase(conn, Phase::StartingTls);
                            None
                        }
                        Err(e) => Some(format!("cannot start TLS: {e}")),
                    }
                }
            }
            (
                Phase::StartingTls,
                Event::ChannelStarted {
                    channel, content, ..
                },
            ) => {
                match content {
                    // Accepted without an answer to the piggybacked ready: send it.
                    None => match session.send_msg(channel, tuning::entity(tuning::READY)) {
                        Ok(_) => None,
                        Err(e) => Some(format!("cannot send ready: {e}")),
                    },
                    Some(content) => self.tls_answered(&content, conn, effects),
                }
            }
            (Phase::StartingTls, Event::Reply { kind, payload, .. }) => {
                if kind == ReplyKind::Rpy {
                    self.tls_answered(&payload, conn, effects)
                } else {
                    Some(format!(
                        "the next relay refused TLS: {}",
                        String::from_utf8_lossy(&payload)
                    ))
                }
            }
            (Phase::StartingTls, Event::StartRefused { error, .. }) => Some(format!(
                "the next relay refused TLS: {} {}",
                error.code, error.text
            )),
            (Phase::Greeting, Event::Greeting(greeting)) => {
                if !greeting.profiles.iter().any(|p| p == APEX_PROFILE) {
                    Some("the next relay does not offer APEX".to_owned())
                } else {
                    let offer = client::bind_offer(&config.our_domain, BIND_TRANS_ID);
                    match session.start_channel(vec![offer], None) {
                        Ok(_) => {
                            self.set_phase(conn, Phase::Starting);
                            None
                        }
                        Err(e) => Some(format!("cannot start an APEX channel: {e}")),
                    }
                }
            }
            (
                Phase::Starting,
                Event::ChannelStarted {
                    channel, content, ..
                },
            ) => match content {
                // Accepted without an answer to the piggybacked bind: send it as a MSG.
                None => match session.send_msg(
                    channel,
                    client::bind_message(&config.our_domain, BIND_TRANS_ID),
                ) {
                    Ok(_) => {
                        self.set_phase(conn, Phase::Binding { channel });
                        None
                    }
                    Err(e) => Some(format!("cannot send our bind: {e}")),
                },
                Some(content) => {
                    self.bind_answered(client::parse_piggybacked_answer(&content), conn, channel)
                }
            },
            (Phase::Starting, Event::StartRefused { error, .. }) => Some(format!(
                "the next relay refused the APEX channel: {} {}",
                error.code, error.text
            )),
            (
                Phase::Binding { channel },
                Event::Reply {
                    channel: on,
                    kind,
                    payload,
                    ..
                },
            ) if on == channel => self.bind_answered(answer_in(kind, &payload), conn, channel),
            (
                Phase::Bound { channel },
                Event::Reply {
                    channel: on,
                    kind,
                    payload,
                    ..
                },
            ) if on == channel => {
                match self.in_flight.pop_front() {
                    // Only an `ok` in a RPY is success (RFC 3340 §9.1).
                    Some(sent) => match answer_in(kind, &payload) {
                        Ok(Answer::Ok) if kind == ReplyKind::Rpy => {
                            effects.accepted.extend(sent.map(|reports| *reports));
                            None
                        }
                        Ok(Answer::Error { code, text }) => {
                            effects
                                .failed
                                .push((sent, format!("next relay: {code} {text}")));
                            None
                        }
                        // Not an APEX reply (BEEP-15): a failure, and RFC 3080 §2.2.2.1 has the
                        // channel closed. It is the link's only one, so the link ends (its
                        // session released): what is in flight fails, never resent (D14).
                        _ => {
                            effects.failed.push((sent, POORLY_FORMED_REPLY.to_owned()));
                            Some(POORLY_FORMED_REPLY.to_owned())
                        }
                    },
                    None => None,
                }
            }
            (_, Event::Message { channel, msgno, .. }) => {
                // A link carries our data only; the next relay sends its own on its own link.
                let refusal =
                    msg::error_payload(code::NOT_IMPLEMENTED, "send over your own relay link");
                let refusal = session
                    .diagnostic_lang()
                    .and_then(|lang| msg::label_error_text(&refusal, lang))
                    .unwrap_or(refusal);
                let _ = session.send_err(channel, msgno, refusal);
                None
            }
            (
                Phase::Binding { channel } | Phase::Bound { channel },
                Event::ChannelClosed {
                    channel: closed, ..
                },
            ) if closed == channel => Some("the next relay closed the APEX channel".to_owned()),
            (Phase::Closing { .. } | Phase::Abandoned, _) => None,
            (_, Event::CloseRefused { .. } | Event::SessionReleased) => None,
            (_, Event::StartRequested(request)) => {
                let _ = session.refuse_start(
                    request.id,
                    crate::beep::mgmt::ErrorElement::new(
                        code::ACTION_NOT_TAKEN,
                        "a relay link starts no channel for its peer",
                    ),
                );
                None
            }
            _ => None,
        };
        match failure {
            Some(reason) => self.end(session, conn, reason, now),
            // Newly bound, or a reply made room: what is queued goes out.
            None => self.pump(session, config, now_ms, effects),
        }
    }

    fn tls_answered(
        &mut self,
        content: &Bytes,
        conn: ConnId,
        effects: &mut LinkEffects,
    ) -> Option<String> {
        match tuning::parse(content, 4, 4) {
            Ok(tuning::TuningElement::Proceed) => {
                effects.start_tls = true;
                self.set_phase(conn, Phase::Securing);
                None
            }
            Ok(tuning::TuningElement::Error(e)) => {
                Some(format!("the next relay refused TLS: {} {}", e.code, e.text))
            }
            _ => Some("the next relay answered ready oddly".to_owned()),
        }
    }

    fn bind_answered(
        &mut self,
        answer: Result<Answer, msg::OpError>,
        conn: ConnId,
        channel: u32,
    ) -> Option<String> {
        match answer {
            Ok(Answer::Ok) => {
                self.bound = true;
                self.set_phase(conn, Phase::Bound { channel });
                None
            }
            Ok(Answer::Error { code, text }) => {
                Some(format!("the next relay refused our bind: {code} {text}"))
            }
            Err(_) => Some("the next relay answered the bind oddly".to_owned()),
        }
    }

    fn set_phase(&mut self, conn: ConnId, phase: Phase) {
        self.state = LinkState::Open { conn, phase };
    }

    /// Sends queued data while the in-flight bound allows (only when bound). A data with a
    /// `dataTiming` has the time it waited here subtracted as it leaves (relay-clock `now_ms`;
    /// OPT-08, OPT-12): one whose `noLaterThan` ran out is not sent but fails.
    pub(super) fn pump(
        &mut self,
        session: &mut Session,
        config: &LinkConfig,
        now_ms: u64,
        effects: &mut LinkEffects,
    ) {
        let LinkState::Open {
            phase: Phase::Bound { channel },
            ..
        } = self.state
        else {
            return;
        };
        while self.in_flight.len() < config.in_flight {
            let Some(Queued {
                mut payload,
                mut reports,
            }) = self.queue.pop_front()
            else {
                break;
            };
            if let Some(forward) = reports.as_mut().filter(|r| r.timing.is_some()) {
                let (restamped, report) = restamp(forward, &payload, now_ms);
                if let Some(report) = report {
                    effects.timing_reports.push((forward.clone(), report));
                }
                match restamped {
                    Some(restamped) => payload = restamped,
                    None => {
                        effects.failed.push((reports, TIMING_EXPIRED.to_owned()));
                        continue;
                    }
                }
            }
            match session.try_send_msg(channel, payload) {
                Ok(_) => self.in_flight.push_back(reports),
                Err((_, payload)) => {
                    self.queue.push_front(Queued { payload, reports });
                    break;
                }
            }
        }
    }

    /// Ends the link's connection for `reason`: asks the next relay to release the session;
    /// the transport closes once it answered (or [`LinkConfig::close_timeout`] passed).
    pub(super) fn end(
        &mut self,
        session: &mut Session,
        conn: ConnId,
        reason: String,
        now: Instant,
    ) {
        if matches!(
            self.state,
            LinkState::Open {
                phase: Phase::Closing { .. } | Phase::Abandoned,
                ..
            }
        ) {
            return;
        }
        self.ending = Some(reason);
        let _ = session.close_session(code::SERVICE_NOT_AVAILABLE);
        self.set_phase(conn, Phase::Closing { since: now });
    }

    /// The link's connection ended. What was in flight fails; what is queued fails too when
    /// the connection never got bound (it would meet the same refusal), or else goes on the
    /// next connection, asked for at once.
    pub(super) fn closed(&mut self, stopping: bool, effects: &mut LinkEffects) {
        let reason = self
            .ending
            .take()
            .unwrap_or_else(|| "connection to the next relay lost".to_owned());
        for sent in self.in_flight.drain(..) {
            effects.failed.push((sent, reason.clone()));
        }
        if stopping {
            self.fail_queued("relay shutting down", effects);
        } else if !self.bound {
            self.fail_queued(&reason, effects);
        }
        self.bound = false;
        if self.queue.is_empty() {
            self.state = LinkState::Idle;
        } else {
            self.state = LinkState::Connecting;
            effects.connect = true;
        }
    }

    /// When the link next needs time.
    pub(super) fn deadline(&self, config: &LinkConfig) -> Option<Instant> {
        match self.state {
            LinkState::Backoff { until } => Some(until),
            LinkState::Open {
                phase: Phase::Closing { since },
                ..
            } => Some(since + config.close_timeout),
            LinkState::Open { phase, .. } if phase.is_setup() => {
                self.connected_at.map(|since| since + config.setup_timeout)
            }
            _ => None,
        }
    }

    /// Time passed. Returns true when the link's connection must be closed without waiting
    /// any longer for the next relay's answer to our `close`.
    pub(super) fn handle_timeout(
        &mut self,
        config: &LinkConfig,
        now: Instant,
        effects: &mut LinkEffects,
    ) -> bool {
        match self.state {
            LinkState::Backoff { until } if until <= now => {
                if self.queue.is_empty() {
                    self.state = LinkState::Idle;
                } else {
                    self.state = LinkState::Connecting;
                    effects.connect = true;
                }
                false
            }
            LinkState::Open {
                conn,
                phase: Phase::Closing { since },
            } if since + config.close_timeout <= now => {
                self.set_phase(conn, Phase::Abandoned);
                true
            }
            LinkState::Open { conn, phase }
                if phase.is_setup()
                    && self
                        .connected_at
                        .is_some_and(|since| since + config.setup_timeout <= now) =>
            {
                // No session to release yet (or none that answers): the transport goes. What
                // is queued fails with this reason, as after any setup that did not bind.
                self.ending = Some(format!(
                    "the next relay did not set up the session within {} ms",
                    config.setup_timeout.as_millis()
                ));
                self.set_phase(conn, Phase::Abandoned);
                true
            }
            _ => false,
        }
    }

    /// Shutdown: what is queued fails, and what is in flight fails with the same reason if
    /// the connection ends before the next relay answers it.
    pub(super) fn shut_down(&mut self, effects: &mut LinkEffects) {
        self.fail_queued("relay shutting down", effects);
        if self.conn().is_some() {
            self.ending
                .get_or_insert_with(|| "relay shutting down".to_owned());
        }
    }

    /// Fails every queued data with `reason`.
    pub(super) fn fail_queued(&mut self, reason: &str, effects: &mut LinkEffects) {
        for queued in self.queue.drain(..) {
            effects.failed.push((queued.reports, reason.to_owned()));
        }
    }
}

/// The `ok` or `error` in a reply (ANS and NUL carry none).
fn answer_in(kind: ReplyKind, payload: &Bytes) -> Result<Answer, msg::OpError> {
    match kind {
        ReplyKind::Rpy | ReplyKind::Err => client::parse_answer(payload),
        _ => Err(msg::OpError {
            code: code::PARAMETER_ERROR,
            text: "not a reply with an answer".to_owned(),
        }),
    }
}
