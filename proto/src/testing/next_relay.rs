//! The far end of a shard's outbound relay links in [`super::RelayNet`]: a simulated next
//! relay (a listener [`Session`] on the other domain's apex-mesh port) whose behaviour a test
//! chooses per domain ([`NextRelayBehaviour`]): healthy by default, or unreachable, without
//! APEX, refusing or ignoring the piggybacked `bind`, refusing data, or never answering a
//! `close`. The data it accepts is what [`super::RelayNet::forwards`] records.

use bytes::{Bytes, BytesMut};

use crate::apex::client;
use crate::apex::msg::{self, ApexLimits, Operation};
use crate::apex::relay::{ConnId, APEX_PROFILE};
use crate::beep::session::{Event, Role, Session, SessionConfig};
use crate::shard::ConnectFailure;

/// How the next relay of one domain behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextRelayBehaviour {
    /// `None`: it accepts connections; else why connecting fails.
    pub connect_failure: Option<ConnectFailure>,
    /// Whether its greeting offers the APEX profile.
    pub offers_apex: bool,
    /// Whether it answers the `bind` piggybacked on the channel `start` (else it accepts the
    /// channel without an answer and waits for the `bind` as a MSG, RFC 3340 §4.2).
    pub answers_piggyback: bool,
    /// The code of its `error` to our `bind`; `None`: `ok`.
    pub bind_error: Option<u16>,
    /// The code of its `error` to every `data`; `None`: `ok`.
    pub data_error: Option<u16>,
    /// Whether it takes in what the link sends once the link asked to release the session
    /// (false: a relay that never answers our `close`).
    pub answers_close: bool,
    /// Whether it keeps every `data` without answering it (a relay about to crash).
    pub holds_data: bool,
    /// When set, it answers every `data` with a RPY carrying this payload instead of `ok`
    /// (a broken relay's poorly formed reply, BEEP-15).
    pub data_reply: Option<Bytes>,
    /// Whether it accepts the connection and then neither reads nor writes (no greeting).
    pub silent: bool,
}

impl Default for NextRelayBehaviour {
    fn default() -> Self {
        Self {
            connect_failure: None,
            offers_apex: true,
            answers_piggyback: true,
            bind_error: None,
            data_error: None,
            answers_close: true,
            holds_data: false,
            data_reply: None,
            silent: false,
        }
    }
}

/// One connection from a shard's link to a simulated next relay.
#[derive(Debug)]
pub struct NextRelay {
    /// The shard that owns the link.
    pub shard: usize,
    /// The link's connection on that shard.
    pub conn: ConnId,
    /// The remote domain.
    pub domain: String,
    /// How it behaves.
    pub behaviour: NextRelayBehaviour,
    /// The next relay's session.
    pub session: Session,
    /// Every octet the link wrote, for byte-exact checks.
    pub from_link: Vec<u8>,
    /// Octets written by the link and not yet taken in by the next relay.
    pub inbox: BytesMut,
    /// Octets written by the next relay and not yet taken in by the link.
    pub outbox: BytesMut,
    /// The `data` it keeps unanswered ([`NextRelayBehaviour::holds_data`]).
    pub held: Vec<Bytes>,
    /// The relay the link bound as, once bound.
    pub bound_as: Option<String>,
    /// Whether the transport is still open.
    pub connected: bool,
}

impl NextRelay {
    /// A next relay for `domain` that just accepted the link's connection `conn`.
    pub fn new(shard: usize, conn: ConnId, domain: String, behaviour: NextRelayBehaviour) -> Self {
        let profiles = if behaviour.offers_apex {
            vec![APEX_PROFILE.to_owned()]
        } else {
            vec!["http://example.com/beep/not-apex".to_owned()]
        };
        Self {
            shard,
            conn,
            domain,
            behaviour,
            session: Session::new(
                Role::Listener,
                SessionConfig {
                    profiles,
                    ..SessionConfig::default()
                },
            ),
            from_link: Vec::new(),
            inbox: BytesMut::new(),
            outbox: BytesMut::new(),
            held: Vec::new(),
            bound_as: None,
            connected: true,
        }
    }

    /// Runs the next relay's session on what is in its inbox; returns the data it accepted.
    /// `Err`: the link broke the protocol.
    pub fn step(&mut self, now: std::time::Instant) -> Result<Vec<Bytes>, String> {
        let mut accepted = Vec::new();
        if !self.inbox.is_empty() {
            self.session
                .handle_input(&mut self.inbox, now)
                .map_err(|e| e.to_string())?;
        }
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::StartRequested(request) => {
                    let bind = request
                        .profiles
                        .iter()
                        .find(|o| o.uri == APEX_PROFILE)
                        .and_then(|o| o.content.clone());
                    let answer = if self.behaviour.answers_piggyback {
                        bind.map(|doc| self.answer_bind(&doc, false))
                    } else {
                        None
                    };
                    let _ = self.session.accept_start(request.id, APEX_PROFILE, answer);
                }
                Event::Message {
                    channel,
                    msgno,
                    payload,
                } => match msg::parse_message(&payload, &ApexLimits::default()) {
                    Ok(Operation::Bind { .. }) => {
                        let answer = self.answer_bind(&payload, true);
                        let _ = match self.behaviour.bind_error {
                            None => self.session.send_rpy(channel, msgno, answer),
                            Some(_) => self.session.send_err(channel, msgno, answer),
                        };
                    }
                    Ok(Operation::Data(_)) if self.behaviour.holds_data => self.held.push(payload),
                    Ok(Operation::Data(_)) if self.behaviour.data_reply.is_some() => {
                        let reply = self.behaviour.data_reply.clone().unwrap_or_default();
                        let _ = self.session.send_rpy(channel, msgno, reply);
                    }
                    Ok(Operation::Data(_)) => match self.behaviour.data_error {
                        None => {
                            accepted.push(payload);
                            let _ = self.session.send_rpy(channel, msgno, client::ok_payload());
                        }
                        Some(code) => {
                            let error = msg::error_payload(code, "refused by the next relay");
                            let _ = self.session.send_err(channel, msgno, error);
                        }
                    },
                    _ => {
                        let error = msg::error_payload(500, "not understood");
                        let _ = self.session.send_err(channel, msgno, error);
                    }
                },
                _ => {}
            }
        }
        Ok(accepted)
    }

    /// The answer to a `bind` (`doc` is a MSG payload when `with_headers`, else the piggybacked
    /// document): `ok`, or the behaviour's error. Records what the link bound as.
    fn answer_bind(&mut self, doc: &Bytes, with_headers: bool) -> Bytes {
        let parsed = if with_headers {
            msg::parse_message(doc, &ApexLimits::default())
        } else {
            msg::parse_document(doc, &ApexLimits::default())
        };
        if let (Ok(Operation::Bind { relay, .. }), None) = (parsed, self.behaviour.bind_error) {
            self.bound_as = Some(relay);
        }
        match (self.behaviour.bind_error, with_headers) {
            (None, true) => client::ok_payload(),
            (None, false) => Bytes::from_static(b"<ok />"),
            (Some(code), true) => msg::error_payload(code, "bind refused"),
            (Some(code), false) => Bytes::from(msg::error_xml(code, "bind refused")),
        }
    }
}
