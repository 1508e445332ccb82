//! The echo-profile harness of the BEEP engine tests: how a test profile plugs into a bare
//! [`Session`] without the engine knowing it. A [`Dispatcher`] drains a session's events and
//! routes each to the handler of the profile running on its channel.
//!
//! The relay does not use this: production sessions are owned by the shard core
//! ([`crate::shard::ShardCore`]), which hands their events to [`crate::apex::relay::Relay`]
//! itself. This interface only serves [`super::Pair`], the conformance and property tests of
//! the session engine, and the `session` fuzz target, which need a profile that answers without
//! bringing in APEX.

use bytes::Bytes;

use crate::beep::mgmt::{code, ErrorElement, ProfileOffer};
use crate::beep::session::{Event, ReplyKind, Session, StartRequest};

/// A profile's answer to a `start` naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartDecision {
    /// Create the channel; `content` is piggybacked in the reply (RFC 3080 §2.3.1.2).
    Accept {
        /// Response to the piggybacked initialization message.
        content: Option<Bytes>,
    },
    /// Refuse with an error.
    Refuse(ErrorElement),
    /// The handler answers later with [`Session::accept_start`] or [`Session::refuse_start`]
    /// (for decisions that need another shard or another relay).
    Defer,
}

/// One profile's behaviour on the channels that run it.
pub trait ProfileHandler {
    /// The profile URI this handler serves.
    fn uri(&self) -> &str;

    /// The peer asks for a channel with this profile; `offer.content` is the decoded
    /// piggybacked initialization message.
    fn on_start(
        &mut self,
        session: &mut Session,
        request: &StartRequest,
        offer: &ProfileOffer,
    ) -> StartDecision;

    /// A complete MSG arrived on one of this profile's channels. Every MSG must be answered
    /// (RPY, ERR, or ANS*NUL) for the channel to make progress (BEEP-35, BEEP-41).
    fn on_message(&mut self, session: &mut Session, channel: u32, msgno: u32, payload: Bytes);

    /// A reply to one of our MSGs arrived.
    fn on_reply(
        &mut self,
        session: &mut Session,
        channel: u32,
        msgno: u32,
        kind: ReplyKind,
        payload: Bytes,
    ) {
        let _ = (session, channel, msgno, kind, payload);
    }

    /// A channel of this profile was created (by either side).
    fn on_channel_started(&mut self, session: &mut Session, channel: u32, content: Option<Bytes>) {
        let _ = (session, channel, content);
    }

    /// A channel of this profile was closed.
    fn on_channel_closed(&mut self, session: &mut Session, channel: u32) {
        let _ = (session, channel);
    }
}

/// Routes session events to profile handlers by the profile of each channel. Stateless: the
/// session knows which profile runs where.
pub struct Dispatcher<'h> {
    handlers: Vec<&'h mut dyn ProfileHandler>,
}

impl<'h> Dispatcher<'h> {
    /// A dispatcher over `handlers`.
    pub fn new(handlers: Vec<&'h mut dyn ProfileHandler>) -> Self {
        Self { handlers }
    }

    fn handler_for_uri(&self, uri: &str) -> Option<usize> {
        self.handlers.iter().position(|h| h.uri() == uri)
    }

    fn handler_for_channel(&self, session: &Session, channel: u32) -> Option<usize> {
        self.handler_for_uri(session.channel_profile(channel)?)
    }

    /// Drains `session`'s events; those that belong to no profile channel (greeting, release,
    /// refusals of our own requests) are passed to `other`.
    pub fn dispatch(&mut self, session: &mut Session, mut other: impl FnMut(&mut Session, Event)) {
        while let Some(event) = session.poll_event() {
            match event {
                Event::StartRequested(request) => self.start(session, &request),
                Event::ChannelStarted {
                    channel,
                    profile,
                    content,
                } => match self.handler_for_uri(&profile) {
                    Some(h) => self.handlers[h].on_channel_started(session, channel, content),
                    None => other(
                        session,
                        Event::ChannelStarted {
                            channel,
                            profile,
                            content,
                        },
                    ),
                },
                Event::Message {
                    channel,
                    msgno,
                    payload,
                } => match self.handler_for_channel(session, channel) {
                    Some(h) => self.handlers[h].on_message(session, channel, msgno, payload),
                    None => other(
                        session,
                        Event::Message {
                            channel,
                            msgno,
                            payload,
                        },
                    ),
                },
                Event::Reply {
                    channel,
                    msgno,
                    kind,
                    payload,
                } => match self.handler_for_channel(session, channel) {
                    Some(h) => self.handlers[h].on_reply(session, channel, msgno, kind, payload),
                    None => other(
                        session,
                        Event::Reply {
                            channel,
                            msgno,
                            kind,
                            payload,
                        },
                    ),
                },
                Event::ChannelClosed { channel, profile } => match self.handler_for_uri(&profile) {
                    Some(h) => self.handlers[h].on_channel_closed(session, channel),
                    None => other(session, Event::ChannelClosed { channel, profile }),
                },
                event => other(session, event),
            }
        }
    }

    fn start(&mut self, session: &mut Session, request: &StartRequest) {
        // The first candidate, in the peer's order, that a handler serves.
        let chosen = request
            .profiles
            .iter()
            .find_map(|offer| self.handler_for_uri(&offer.uri).map(|h| (h, offer)));
        let Some((h, offer)) = chosen else {
            let error =
                ErrorElement::new(code::ACTION_NOT_TAKEN, "no requested profile is acceptable");
            let _ = session.refuse_start(request.id, error);
            return;
        };
        match self.handlers[h].on_start(session, request, offer) {
            StartDecision::Accept { content } => {
                if let Some(name) = &request.server_name {
                    session.set_server_name(name);
                }
                let _ = session.accept_start(request.id, &offer.uri, content);
            }
            StartDecision::Refuse(error) => {
                let _ = session.refuse_start(request.id, error);
            }
            StartDecision::Defer => {}
        }
    }
}
