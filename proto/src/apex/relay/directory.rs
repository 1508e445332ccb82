//! The endpoint directory (RFC 3340 §4.4.1-§4.4.3): attach with its arbitration at the
//! endpoint's home shard (one attachment per endpoint, APEX-14; an overriding attach evicts the
//! old one with 556), bind on apex-mesh sessions, terminate, and the replica of the directory
//! every shard keeps from the home shards' broadcasts.

use super::*;

/// Most binds a shard keeps waiting for their domain's relay addresses: each costs a DNS
/// lookup, so a peer binding as many domains at once is refused transiently past it.
const MAX_PENDING_BINDS: usize = 256;

/// Most binds one connection keeps waiting for DNS: one peer cannot fill the shard's table and
/// keep other relays' binds waiting.
const MAX_PENDING_BINDS_PER_CONN: usize = 4;

impl Relay {
    /// Where `endpoint` is attached, per this shard's replica.
    pub fn lookup(&self, endpoint: &Endpoint) -> Option<ChannelRef> {
        self.directory.get(endpoint).copied()
    }

    /// RFC 3340 §4.4.1 steps 1-6 (APEX-10..15).
    pub(super) fn attach(
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
                let malformed = ApexError::malformed(code::PARAMETER_ERROR, e.to_string());
                return self.answer(conn, channel, answer, Err(malformed));
            }
        };
        if !self.serves(endpoint.domain()) {
            return self.answer(conn, channel, answer, Err(ApexError::ForeignDomain));
        }
        // Step 3 (APEX-12): attach only on apex-edge sessions, and never as a service.
        if self.connections.get(&conn) != Some(&ConnKind::Edge) || endpoint.is_service() {
            return self.answer(conn, channel, answer, Err(ApexError::MayNotAttach));
        }
        // RFC 3340 §4.5.1 (APEX-47): the session's identity must cover the endpoint. This
        // also decides attachOverride: only a session that may attach as the endpoint can
        // evict its current attachment.
        if let Err(refused) = self.may_attach(conn, &endpoint) {
            return self.answer(conn, channel, answer, Err(refused));
        }
        // Step 4 (APEX-13, APEX-37): options before the duplicate check.
        let overriding = match options::attach_options(options) {
            Ok(o) => o.override_existing,
            Err(e) => {
                let malformed = ApexError::malformed(e.code, e.text);
                return self.answer(conn, channel, answer, Err(malformed));
            }
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
    pub(super) fn arbitrate(
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

    pub(super) fn record_attached(&mut self, endpoint: Endpoint, at: ChannelRef) {
        self.now_attached(endpoint.clone(), at);
        self.broadcast(|| Envelope::Attached {
            endpoint: endpoint.clone(),
            at,
        });
    }

    pub(super) fn broadcast(&mut self, envelope: impl Fn() -> Envelope) {
        for shard in (0..self.config.shards).filter(|s| *s != self.config.shard) {
            self.actions.push_back(Action::ToShard {
                shard,
                envelope: envelope(),
            });
        }
    }

    pub(super) fn evict(&mut self, endpoint: Endpoint, old: ChannelRef) {
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
    pub(super) fn end_attachment(&mut self, endpoint: &Endpoint, at: ChannelRef) {
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

    pub(super) fn finish_attach(
        &mut self,
        endpoint: Endpoint,
        at: ChannelRef,
        trans_id: u32,
        answer: Answer,
        result: Result<(), u16>,
    ) {
        match result {
            Ok(()) => {
                self.note_attached(at.conn, endpoint.as_str());
                self.now_attached(endpoint.clone(), at);
                self.channels
                    .entry((at.conn, at.channel))
                    .or_default()
                    .associations
                    .insert(trans_id, Association::Attached(endpoint));
                self.answer(at.conn, at.channel, answer, Ok(()));
            }
            // The home shard's verdict is the code alone: only one refusal has it.
            Err(_) => self.answer(at.conn, at.channel, answer, Err(ApexError::AlreadyAttached)),
        }
    }

    pub(super) fn detach(&mut self, endpoint: Endpoint, at: ChannelRef) {
        if self.directory.get(&endpoint) == Some(&at) {
            self.directory.remove(&endpoint);
        }
        self.broadcast(|| Envelope::Detached {
            endpoint: endpoint.clone(),
            at,
        });
    }

    /// RFC 3340 §4.4.2 (APEX-17): binds are accepted on apex-mesh sessions, in the RFC's
    /// order: 555 (checked by the caller), 537, then the options.
    pub(super) fn bind(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        relay: &str,
        trans_id: u32,
        options: &[ApexOption],
    ) {
        if self.connections.get(&conn) != Some(&ConnKind::Mesh)
            || crate::apex::addr::validate_domain(relay).is_err()
        {
            return self.answer(conn, channel, answer, Err(ApexError::MayNotBind));
        }
        let option_refusal = bind_option_refusal(options);
        match self.may_bind(conn, relay) {
            BindCheck::Allowed => {
                self.bound(conn, channel, answer, relay, trans_id, option_refusal)
            }
            BindCheck::Refused => {
                tracing::info!(%conn, domain = relay, "bind refused: not that domain's relay");
                self.answer(conn, channel, answer, Err(ApexError::MayNotBind));
            }
            BindCheck::Lookup
                if self.pending_binds.len() >= MAX_PENDING_BINDS
                    || self.pending_binds.iter().filter(|p| p.conn == conn).count()
                        >= MAX_PENDING_BINDS_PER_CONN =>
            {
                let busy = ApexError::malformed(
                    code::ACTION_NOT_TAKEN_TRANSIENT,
                    "too many binds waiting for DNS",
                );
                self.answer(conn, channel, answer, Err(busy));
            }
            BindCheck::Lookup => {
                let asked = self
                    .pending_binds
                    .iter()
                    .any(|p| p.domain.eq_ignore_ascii_case(relay));
                self.pending_binds.push(PendingBind {
                    conn,
                    channel,
                    answer,
                    domain: relay.to_owned(),
                    trans_id,
                    option_refusal,
                });
                if !asked {
                    self.actions.push_back(Action::ResolveRelay {
                        domain: relay.to_owned(),
                    });
                }
            }
        }
    }

    /// Bind step 3 and 4: an authorized bind is refused by its options, or accepted.
    fn bound(
        &mut self,
        conn: ConnId,
        channel: u32,
        answer: Answer,
        relay: &str,
        trans_id: u32,
        option_refusal: Option<ApexError>,
    ) {
        if let Some(refused) = option_refusal {
            return self.answer(conn, channel, answer, Err(refused));
        }
        self.note_bound(conn, relay);
        self.channels
            .entry((conn, channel))
            .or_default()
            .associations
            .insert(trans_id, Association::Bound(relay.to_owned()));
        self.answer(conn, channel, answer, Ok(()));
    }

    /// The addresses `domain`'s relay is reached at (after [`Action::ResolveRelay`]; empty
    /// when it has none): the binds waiting for them are answered, accepted from one of them.
    pub fn relay_addresses_found(&mut self, domain: &str, addresses: &[std::net::IpAddr]) {
        let (ready, waiting): (Vec<PendingBind>, Vec<PendingBind>) =
            std::mem::take(&mut self.pending_binds)
                .into_iter()
                .partition(|p| p.domain.eq_ignore_ascii_case(domain));
        self.pending_binds = waiting;
        for p in ready {
            if !self.connections.contains_key(&p.conn) {
                continue; // the peer left meanwhile
            }
            let from_relay = self
                .credentials
                .get(&p.conn)
                .is_some_and(|c| addresses.iter().any(|a| c.same_address(a)));
            if from_relay {
                self.bound(
                    p.conn,
                    p.channel,
                    p.answer,
                    &p.domain,
                    p.trans_id,
                    p.option_refusal,
                );
            } else {
                tracing::info!(conn = %p.conn, domain = p.domain, "bind refused: not from that domain's relay");
                self.answer(p.conn, p.channel, p.answer, Err(ApexError::MayNotBind));
            }
        }
    }

    /// RFC 3340 §4.4.3 (APEX-18, APEX-19).
    pub(super) fn terminate(&mut self, conn: ConnId, channel: u32, msgno: u32, trans_id: u32) {
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
            None => self.answer(conn, channel, answer, Err(ApexError::UnknownTransaction)),
            Some(association) => {
                if let Association::Attached(endpoint) = association {
                    self.detach(endpoint, self.at(conn, channel));
                }
                self.answer(conn, channel, answer, Ok(()));
            }
        }
    }

    pub(super) fn associations_of(&self, conn: ConnId) -> impl Iterator<Item = &Association> {
        self.conn_channels
            .get(&conn)
            .into_iter()
            .flatten()
            .filter_map(move |channel| self.channels.get(&(conn, *channel)))
            .flat_map(|s| s.associations.values())
    }

    /// [`Endpoint::parse`], remembered: parsing is a pure function of the text, and a relay sees
    /// the same identities over and over. Failures are not cached. Endpoints parsed from the
    /// same text share their memory, so the directory's key (parsed here at attach) and a data
    /// message's recipient compare equal by pointer, without comparing their text.
    pub(super) fn parse_endpoint(
        &mut self,
        text: &str,
    ) -> Result<Endpoint, crate::apex::addr::AddrError> {
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

    /// `endpoint` is attached at `at` now: record it and release what was held for it.
    pub(super) fn now_attached(&mut self, endpoint: Endpoint, at: ChannelRef) {
        self.release_held(&endpoint, at);
        self.directory.insert(endpoint, at);
    }
}

/// Bind step 3 (APEX-17, RFC 3340 §4.4.2 and §5): a bind is processed by the relay receiving
/// it, so every option in it applies here whatever its `targetHop`; one that is not understood
/// and has `mustUnderstand='true'` refuses the bind with 504, as it refuses an attach
/// ([`options::attach_options`]). The other options mean nothing to a bind and are ignored.
fn bind_option_refusal(options: &[ApexOption]) -> Option<ApexError> {
    options::attach_options(options)
        .err()
        .map(|e| ApexError::malformed(e.code, e.text))
}
