//! Tuning in the shard core (RFC 3080 §3, §4; beep.md §7-9): the TLS profile (`ready` /
//! `proceed`, then the handshake on the connection and a fresh session with new greetings)
//! and the SASL profiles (SCRAM-SHA-256, PLAIN under TLS, EXTERNAL from a TLS client
//! certificate), whose success gives the connection an identity the relay authorizes attach
//! with. A connection that never tunes has no [`Secured`] state and never enters this module.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::apex::relay::{ConnId, ConnKind, APEX_PROFILE};
use crate::auth::plain::check_plain;
use crate::auth::scram::{fresh_nonce, SaslStep, ScramServer};
use crate::auth::users::{same_identity, Users};
use crate::beep::mgmt::{code, ErrorElement, Mgmt};
use crate::beep::session::{Event, Session, SessionConfig, StartRequest};
use crate::beep::tuning::{self, BlobStatus, TuningElement};
use crate::error::ProtocolError;
use crate::tls::{CertificateNames, TlsLayer};

use super::ShardCore;

/// The SASL mechanisms apexd offers (DIGEST-MD5 and CRAM-MD5 are obsolete, RFC 6331).
pub const SCRAM: &str = "SCRAM-SHA-256";
/// RFC 4616; offered only under TLS.
pub const PLAIN: &str = "PLAIN";
/// RFC 4422 Appendix A: the identity of a verified TLS client certificate.
pub const EXTERNAL: &str = "EXTERNAL";

/// Failed SASL exchanges a session may make before further attempts are refused: each PLAIN
/// attempt costs the shard a PBKDF2 computation.
pub const MAX_SASL_FAILURES: u32 = 3;

/// What the shard's sessions may use to secure and authenticate themselves.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Offer TLS on accepted connections with this configuration.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Start TLS on outbound relay links with this configuration (it verifies that the next
    /// relay's certificate names its domain).
    pub tls_client: Option<Arc<rustls::ClientConfig>>,
    /// Who may authenticate with SASL.
    pub users: Arc<Users>,
}

impl Security {
    /// The profiles a listener session of `kind` lists in its greeting, and those it answers
    /// without listing them, before TLS (`under_tls` false) or after it.
    fn profiles(
        &self,
        kind: ConnKind,
        under_tls: bool,
        certified: bool,
    ) -> (Vec<String>, Vec<String>) {
        let mut listed = vec![APEX_PROFILE.to_owned()];
        let mut unlisted = Vec::new();
        if self.tls_server.is_some() && !under_tls {
            listed.push(tuning::TLS_PROFILE.to_owned());
        }
        if kind == ConnKind::Edge {
            if !self.users.is_empty() {
                // SCRAM never exposes the password: offered before TLS too.
                listed.push(tuning::sasl_profile(SCRAM));
                if under_tls {
                    listed.push(tuning::sasl_profile(PLAIN));
                } else {
                    unlisted.push(tuning::sasl_profile(PLAIN));
                }
            }
            if certified {
                listed.push(tuning::sasl_profile(EXTERNAL));
            }
        }
        (listed, unlisted)
    }

    /// The configuration of a listener session of `kind`, from `base` (limits, features).
    pub(super) fn listener_config(
        &self,
        base: &SessionConfig,
        kind: ConnKind,
        under_tls: bool,
        certified: bool,
    ) -> SessionConfig {
        let (listed, unlisted) = self.profiles(kind, under_tls, certified);
        let mut config = base.clone();
        for profile in listed {
            if !config.profiles.contains(&profile) {
                config.profiles.push(profile);
            }
        }
        config.unlisted_profiles = unlisted;
        config
    }
}

/// A SASL exchange in progress.
#[derive(Debug)]
enum Exchange {
    Scram(Box<ScramServer>),
}

/// One connection's tuning state.
#[derive(Debug, Default)]
pub(super) struct Secured {
    /// The TLS layer, from the moment `proceed` was sent or received.
    tls: Option<TlsLayer>,
    /// Plaintext queued before TLS began (the `proceed`): written before any TLS record.
    preamble: BytesMut,
    /// Decrypted octets the session has not taken yet.
    plain_in: BytesMut,
    /// Scratch for the session's plaintext output on its way into TLS.
    plain_out: BytesMut,
    /// The handshake runs: the session starts over once it completes.
    handshaking: bool,
    close_sent: bool,
    /// The SASL exchange on its channel.
    sasl: Option<(u32, Exchange)>,
    /// A SASL exchange succeeded: no other may start (BEEP-52), nor TLS (BEEP-53).
    authenticated: bool,
    failures: u32,
    /// Email names of the peer's verified client certificate (for EXTERNAL).
    certificate_emails: Vec<String>,
    /// The peer presented a certificate the configured roots verified.
    certified: bool,
}

impl Secured {
    /// Whether the TLS handshake runs (the session starts over once it completes).
    pub(super) fn handshaking(&self) -> bool {
        self.handshaking
    }

    /// Whether output goes through this layer (TLS began).
    pub(super) fn encrypting(&self) -> bool {
        self.tls.is_some() || !self.preamble.is_empty()
    }

    /// Whether anything of this layer's waits to be written.
    pub(super) fn has_output(&self) -> bool {
        !self.preamble.is_empty() || self.tls.as_ref().is_some_and(TlsLayer::wants_write)
    }

    /// Appends what is to be written to `out`: the plaintext before TLS, then the session's
    /// output encrypted. Returns the octets appended.
    pub(super) fn transmit(&mut self, session: &mut Session, out: &mut BytesMut) -> usize {
        let start = out.len();
        if !self.preamble.is_empty() {
            out.extend_from_slice(&self.preamble);
            self.preamble.clear();
        }
        if let Some(tls) = &mut self.tls {
            if !self.handshaking {
                while session.poll_transmit(&mut self.plain_out) > 0 {}
                if !self.plain_out.is_empty() {
                    // Writing into rustls's unbounded buffer does not fail.
                    let _ = tls.send(&self.plain_out);
                    self.plain_out.clear();
                }
                if session.is_finished() && !self.close_sent {
                    tls.close();
                    self.close_sent = true;
                }
            }
            tls.transmit(out);
        }
        out.len() - start
    }
}

/// Whether `event` belongs to the session's tuning rather than to the relay.
#[inline]
pub(super) fn is_tuning_event(session: &Session, event: &Event) -> bool {
    match event {
        Event::Message { channel, .. } | Event::Reply { channel, .. } => {
            session.tuning_channel() == Some(*channel)
        }
        Event::StartRequested(request) => request
            .profiles
            .first()
            .is_some_and(|p| tuning::is_tuning(&p.uri)),
        Event::ChannelStarted { profile, .. } | Event::ChannelClosed { profile, .. } => {
            tuning::is_tuning(profile)
        }
        _ => false,
    }
}

/// A tuning profile's `error`, its English text labelled `lang` when the peer asked for another
/// language first (RFC 3080 §2.3.1.5, BEEP-30: see [`Session::diagnostic_lang`]).
fn error_payload(code: u16, text: &str, lang: Option<&str>) -> Bytes {
    Mgmt::Error(ErrorElement {
        lang: lang.map(str::to_owned),
        ..ErrorElement::new(code, text)
    })
    .to_payload()
}

/// How a tuning step ended for the session's input.
enum After {
    /// Read on: the request was answered.
    Resume,
    /// TLS begins: what follows in the read buffer is the handshake.
    Tls,
}

impl ShardCore {
    /// The security configuration for connections from now on (a reload: sessions keep what
    /// they negotiated).
    pub fn set_security(&mut self, security: Security) {
        self.link_config.tls = security.tls_client.is_some();
        self.security = security;
    }

    /// Handles a tuning event of a listener session.
    pub(super) fn handle_tuning_event(&mut self, conn: ConnId, event: Event) {
        let after = match event {
            Event::StartRequested(request) => self.tuning_start(conn, request),
            Event::Message {
                channel,
                msgno,
                payload,
            } => self.tuning_message(conn, channel, msgno, &payload),
            Event::ChannelClosed { channel, .. } => {
                // An exchange lives and dies with its channel.
                if let Some(secured) = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.secured.as_deref_mut())
                {
                    if secured.sasl.as_ref().is_some_and(|(on, _)| *on == channel) {
                        secured.sasl = None;
                    }
                }
                After::Resume
            }
            _ => After::Resume,
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match after {
            After::Resume => {
                if c.session.input_paused() {
                    c.session.resume_input();
                    self.retry_input = true;
                }
            }
            After::Tls => {
                let Some(config) = self.security.tls_server.clone() else {
                    // A reload took TLS away after this session was offered it: `proceed` went
                    // out, so the session cannot go on in plaintext.
                    c.abandoned = true;
                    return;
                };
                match TlsLayer::server(config) {
                    Ok(tls) => self.begin_tls(conn, tls),
                    Err(e) => {
                        tracing::warn!(%conn, %e, "cannot begin TLS");
                        c.abandoned = true;
                    }
                }
            }
        }
    }

    fn tuning_start(&mut self, conn: ConnId, request: StartRequest) -> After {
        let Some(c) = self.conns.get_mut(&conn) else {
            return After::Resume;
        };
        let secured = c.secured.get_or_insert_with(Box::default);
        let Some(offer) = request.profiles.first() else {
            return After::Resume;
        };
        let refuse = |session: &mut Session, code: u16, text: &str| {
            let _ = session.refuse_start(request.id, ErrorElement::new(code, text));
            After::Resume
        };
        if offer.uri == tuning::TLS_PROFILE {
            if secured.authenticated || secured.tls.is_some() {
                return refuse(
                    &mut c.session,
                    code::ACTION_NOT_TAKEN,
                    "TLS may not start now",
                );
            }
            if !c.session.alone_with(request.channel) {
                return refuse(
                    &mut c.session,
                    code::ACTION_NOT_TAKEN,
                    "start TLS before any other channel",
                );
            }
            let Some(content) = &offer.content else {
                let _ = c
                    .session
                    .accept_start(request.id, tuning::TLS_PROFILE, None);
                return After::Resume;
            };
            return match tuning::parse(content, 4, 4) {
                Ok(TuningElement::Ready { .. }) => {
                    let proceed = Bytes::from_static(tuning::PROCEED.as_bytes());
                    let _ = c
                        .session
                        .accept_start(request.id, tuning::TLS_PROFILE, Some(proceed));
                    After::Tls
                }
                Ok(_) => refuse(&mut c.session, code::PARAMETER_ERROR, "expected ready"),
                Err(e) => refuse(&mut c.session, e.code, &e.text),
            };
        }
        let Some(mechanism) = tuning::sasl_mechanism(&offer.uri) else {
            return refuse(
                &mut c.session,
                code::ACTION_NOT_TAKEN,
                "unknown tuning profile",
            );
        };
        if secured.authenticated {
            return refuse(
                &mut c.session,
                code::ACTION_NOT_TAKEN,
                "already authenticated",
            );
        }
        if secured.failures >= MAX_SASL_FAILURES {
            return refuse(
                &mut c.session,
                code::AUTHENTICATION_FAILED,
                "too many failed authentications",
            );
        }
        if mechanism == PLAIN && secured.tls.is_none() {
            return refuse(
                &mut c.session,
                code::ENCRYPTION_REQUIRED,
                "PLAIN requires TLS: start TLS first, or use SCRAM-SHA-256",
            );
        }
        let uri = offer.uri.clone();
        let mechanism = mechanism.to_owned();
        let initial = match &offer.content {
            None => None,
            Some(content) => match tuning::parse(content, 4, 4) {
                Ok(TuningElement::Blob { data, .. }) => Some(data),
                Ok(_) => {
                    return refuse(&mut c.session, code::PARAMETER_ERROR, "expected a blob");
                }
                Err(e) => return refuse(&mut c.session, e.code, &e.text),
            },
        };
        let channel = request.channel;
        let Some(data) = initial else {
            // The client's first response comes as a MSG on the channel.
            let _ = c.session.accept_start(request.id, &uri, None);
            return After::Resume;
        };
        // The initial response rode in the start: the first step rides in its reply, and a
        // failure refuses the channel (RFC 3080 §4.1.1).
        let step = self.sasl_step(conn, channel, &mechanism, &data);
        let Some(c) = self.conns.get_mut(&conn) else {
            return After::Resume;
        };
        match step {
            Step::Continue(challenge) => {
                let content = tuning::blob(BlobStatus::Continue, &challenge);
                let _ = c
                    .session
                    .accept_start(request.id, &uri, Some(content.into()));
            }
            Step::Complete(additional) => {
                let content = tuning::blob(BlobStatus::Complete, &additional);
                let _ = c
                    .session
                    .accept_start(request.id, &uri, Some(content.into()));
            }
            Step::Failed => {
                let _ = c.session.refuse_start(
                    request.id,
                    ErrorElement::new(code::AUTHENTICATION_FAILED, "authentication failed"),
                );
            }
        }
        After::Resume
    }

    /// Runs one step of the SASL exchange on `channel` (starting it when it is the first).
    fn sasl_step(&mut self, conn: ConnId, channel: u32, mechanism: &str, data: &[u8]) -> Step {
        let users = self.security.users.clone();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Step::Failed;
        };
        let secured = c.secured.get_or_insert_with(Box::default);
        if secured.authenticated || secured.failures >= MAX_SASL_FAILURES {
            // Another round on a channel whose exchange ended: no new exchange starts here
            // (BEEP-52), and failures stay counted.
            secured.sasl = None;
            return Step::Failed;
        }
        let lookup = |name: &str| users.verifier(name).cloned();
        let outcome = match mechanism {
            SCRAM => {
                let exchange = match secured.sasl.take() {
                    Some((on, Exchange::Scram(server))) if on == channel => Some(server),
                    _ => fresh_nonce().map(|nonce| Box::new(ScramServer::new(nonce))),
                };
                match exchange {
                    None => Err("no randomness for a nonce".to_owned()),
                    Some(mut server) => match server.step(data, lookup) {
                        SaslStep::Challenge(challenge) => {
                            secured.sasl = Some((channel, Exchange::Scram(server)));
                            return Step::Continue(challenge);
                        }
                        SaslStep::Success {
                            identity,
                            additional,
                        } => Ok((identity, additional.unwrap_or_default())),
                        SaslStep::Failure(failure) => Err(failure.to_string()),
                    },
                }
            }
            PLAIN if secured.tls.is_some() => check_plain(data, lookup)
                .map(|identity| (identity, Vec::new()))
                .map_err(|failure| failure.to_string()),
            EXTERNAL => external_identity(secured, data).map(|identity| (identity, Vec::new())),
            _ => Err(format!("mechanism {mechanism} is not offered")),
        };
        match outcome {
            Ok((identity, additional)) => {
                secured.authenticated = true;
                secured.sasl = None;
                tracing::info!(%conn, %identity, mechanism, "authenticated");
                self.relay.authenticated(conn, identity);
                Step::Complete(additional)
            }
            Err(reason) => {
                secured.failures += 1;
                self.counts.sasl_failures += 1;
                secured.sasl = None;
                tracing::info!(%conn, mechanism, %reason, "authentication failed");
                Step::Failed
            }
        }
    }

    fn tuning_message(&mut self, conn: ConnId, channel: u32, msgno: u32, payload: &Bytes) -> After {
        let Some(c) = self.conns.get_mut(&conn) else {
            return After::Resume;
        };
        let profile = c
            .session
            .channel_profile(channel)
            .unwrap_or_default()
            .to_owned();
        let lang = c.session.diagnostic_lang();
        let element = match tuning::parse(payload, 4, 4) {
            Ok(element) => element,
            Err(e) => {
                let _ = c
                    .session
                    .send_err(channel, msgno, error_payload(e.code, &e.text, lang));
                return After::Resume;
            }
        };
        if profile == tuning::TLS_PROFILE {
            let secured = c.secured.get_or_insert_with(Box::default);
            return match element {
                TuningElement::Ready { .. }
                    if !secured.authenticated && c.session.alone_with(channel) =>
                {
                    let proceed = tuning::entity(tuning::PROCEED);
                    let _ = c.session.send_rpy(channel, msgno, proceed);
                    After::Tls
                }
                TuningElement::Ready { .. } => {
                    let refusal =
                        error_payload(code::ACTION_NOT_TAKEN, "TLS may not start now", lang);
                    let _ = c.session.send_err(channel, msgno, refusal);
                    After::Resume
                }
                _ => {
                    let refusal = error_payload(code::PARAMETER_ERROR, "expected ready", lang);
                    let _ = c.session.send_err(channel, msgno, refusal);
                    After::Resume
                }
            };
        }
        let (status, data) = match element {
            TuningElement::Blob { status, data } => (status, data),
            _ => {
                let refusal = error_payload(code::PARAMETER_ERROR, "expected a blob", lang);
                let _ = c.session.send_err(channel, msgno, refusal);
                return After::Resume;
            }
        };
        let mechanism = tuning::sasl_mechanism(&profile)
            .unwrap_or_default()
            .to_owned();
        let reply = if status == BlobStatus::Abort {
            if let Some(secured) = c.secured.as_deref_mut() {
                secured.sasl = None;
            }
            Err(error_payload(
                code::AUTHENTICATION_FAILED,
                "authentication aborted",
                lang,
            ))
        } else {
            match self.sasl_step(conn, channel, &mechanism, &data) {
                Step::Continue(challenge) => Ok(tuning::blob(BlobStatus::Continue, &challenge)),
                Step::Complete(additional) => Ok(tuning::blob(BlobStatus::Complete, &additional)),
                Step::Failed => Err(error_payload(
                    code::AUTHENTICATION_FAILED,
                    "authentication failed",
                    lang,
                )),
            }
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            let _ = match reply {
                Ok(blob) => c.session.send_rpy(channel, msgno, tuning::entity(&blob)),
                Err(error) => c.session.send_err(channel, msgno, error),
            };
        }
        After::Resume
    }
}

/// The outcome of one SASL step.
enum Step {
    Continue(Vec<u8>),
    Complete(Vec<u8>),
    Failed,
}

/// EXTERNAL (RFC 4422 Appendix A; BEEP-55): the identity is the verified client
/// certificate's email name, the one asked for (`authzid`) when the certificate has it, or its
/// only one when none is asked for.
fn external_identity(secured: &Secured, authzid: &[u8]) -> Result<String, String> {
    if !secured.certified {
        return Err("no verified client certificate".to_owned());
    }
    let asked = std::str::from_utf8(authzid).map_err(|_| "authzid is not UTF-8".to_owned())?;
    let emails = &secured.certificate_emails;
    if asked.is_empty() {
        return match emails.as_slice() {
            [only] => Ok(only.clone()),
            [] => Err("the certificate names no endpoint".to_owned()),
            _ => Err("the certificate names several endpoints: ask for one".to_owned()),
        };
    }
    emails
        .iter()
        .find(|e| same_identity(e, asked))
        .cloned()
        .ok_or_else(|| "the certificate does not name the identity asked for".to_owned())
}

impl ShardCore {
    /// TLS begins on `conn`: what its session still had to send (the `proceed`) goes out
    /// first, in plaintext; from then on every octet in either direction is TLS, and the
    /// session starts over once the handshake completes (RFC 3080 §3.1.3, beep.md §9).
    pub(super) fn begin_tls(&mut self, conn: ConnId, tls: TlsLayer) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let secured = c.secured.get_or_insert_with(Box::default);
        while c.session.poll_transmit(&mut secured.preamble) > 0 {}
        secured.tls = Some(tls);
        secured.handshaking = true;
        self.tls_began = true;
        self.wake(conn);
    }

    /// Input of a connection with tuning state: through TLS when it runs, then to the session.
    pub(super) fn handle_secured_input(
        &mut self,
        conn: ConnId,
        read_buf: &mut BytesMut,
        now: std::time::Instant,
    ) -> Result<(), ProtocolError> {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                read_buf.clear();
                return Ok(());
            };
            let Some(secured) = c.secured.as_deref_mut() else {
                return self.feed(conn, read_buf, now);
            };
            let Some(tls) = secured.tls.as_mut() else {
                // Tuned without TLS (SASL): the session reads the octets as they are, and a
                // TLS `ready` among them sends the rest round again.
                self.feed(conn, read_buf, now)?;
                let tls_began = self
                    .conns
                    .get(&conn)
                    .and_then(|c| c.secured.as_deref())
                    .is_some_and(|s| s.tls.is_some());
                if tls_began && !read_buf.is_empty() {
                    continue;
                }
                return Ok(());
            };
            tls.receive(read_buf, &mut secured.plain_in)?;
            if secured.handshaking && !tls.is_handshaking() {
                self.tls_established(conn);
            }
            let Some(secured) = self
                .conns
                .get_mut(&conn)
                .and_then(|c| c.secured.as_deref_mut())
            else {
                return Ok(());
            };
            if secured.plain_in.is_empty() {
                return Ok(());
            }
            let mut plain = std::mem::take(&mut secured.plain_in);
            let fed = self.feed(conn, &mut plain, now);
            if let Some(secured) = self
                .conns
                .get_mut(&conn)
                .and_then(|c| c.secured.as_deref_mut())
            {
                secured.plain_in = plain;
            }
            return fed;
        }
    }

    /// The handshake completed: a new session with a new greeting (beep.md §9: nothing of the
    /// session before TLS survives), and what the peer's certificate proves.
    fn tls_established(&mut self, conn: ConnId) {
        let kind = self.relay.conn_kind(conn);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(secured) = c.secured.as_deref_mut() else {
            return;
        };
        let Some(tls) = &secured.tls else {
            return;
        };
        secured.handshaking = false;
        secured.sasl = None;
        self.counts.tls_handshakes += 1;
        let names = tls.peer_certificate().map(|der| CertificateNames::of(der));
        tracing::debug!(%conn, tls = %tls.describe(), "TLS established");
        let role = c.session.role();
        let config = match (&c.link, kind) {
            (None, Some(kind)) => {
                self.security
                    .listener_config(&self.session_config, kind, true, names.is_some())
            }
            _ => SessionConfig {
                limits: self.session_config.limits.clone(),
                ..SessionConfig::default()
            },
        };
        let old = std::mem::replace(&mut c.session, Session::new(role, config));
        c.session.count_from(&old);
        self.assembling = self.assembling.saturating_sub(old.assembling());
        if let Some(names) = names.filter(|_| c.link.is_none()) {
            // A peer's client certificate (a link's peer is the server, verified by rustls
            // against the domain the link routes to).
            secured.certified = true;
            secured.certificate_emails = names.emails;
            self.relay.certified(conn, names.domains);
        }
        if let Some(key) = &c.link {
            if let Some(link) = self.links.get_mut(key) {
                link.secured();
            }
        }
        self.wake(conn);
    }

    /// The next relay of a link said `proceed`: the link's connection becomes TLS, verifying
    /// that the listener's certificate names `domain`.
    pub(super) fn link_begins_tls(&mut self, conn: ConnId, domain: &str) {
        let tls = self
            .security
            .tls_client
            .clone()
            .ok_or_else(|| crate::tls::TlsError("no TLS client configuration".to_owned()))
            .and_then(|config| TlsLayer::client(config, domain));
        match tls {
            Ok(tls) => self.begin_tls(conn, tls),
            Err(e) => {
                tracing::warn!(%conn, domain, %e, "cannot begin TLS on the relay link");
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.abandoned = true;
                }
                self.wake(conn);
            }
        }
    }
}
