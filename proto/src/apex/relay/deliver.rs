//! Data acceptance and delivery (RFC 3340 §4.4.4.1, APEX-22..28): who may send as the
//! originator, the per-data options, the access check, then each recipient as [`route`] says:
//! its channel (here or on another shard), its home shard, the hold queue, or another relay.

use super::*;

/// The data to send onward at `hop`: only `recipients`, the per-data options replaced by
/// `options` (rewritten or removed ones edited in place), the options of the originator and of
/// those recipients that must not travel further removed (`targetHop='this'` when forwarding,
/// APEX-35), every other byte as received (APEX-28).
pub(super) fn rebuild(
    data: &Data,
    recipients: &[usize],
    options: &[ApexOption],
    hop: Hop,
) -> Bytes {
    let mut edits = Vec::new();
    let mut strip = |party: &msg::Party| {
        for option in &party.options {
            if options::must_remove_before_sending(option, hop) {
                edits.push(Edit::remove(&option.raw));
            }
        }
    };
    strip(&data.originator);
    for (i, party) in data.recipients.iter().enumerate() {
        if recipients.contains(&i) {
            strip(party);
        }
    }
    for (i, party) in data.recipients.iter().enumerate() {
        if !recipients.contains(&i) {
            edits.push(Edit::remove(&party.raw));
        }
    }
    for old in &data.options {
        match options
            .iter()
            .find(|new| new.name() == old.name() && new.trans_id == old.trans_id)
        {
            Some(new) if new.raw == old.raw => {}
            Some(new) => edits.push(Edit::replace(&old.raw, new.raw.clone())),
            None => edits.push(Edit::remove(&old.raw)),
        }
    }
    options::edit_payload(data.payload(), &edits)
        .unwrap_or_else(|| data.payload_for(recipients, |o| options.iter().any(|n| n.raw == o.raw)))
}

/// The `dataTiming` of a forward whose per-data options are `options` (as they will be sent,
/// values brought up to `now_ms`), when it applies on the way and has something to count down
/// until the data leaves for the next relay (RFC 3342 §2.1, §2.2; OPT-08, OPT-12).
fn forward_timing(
    options: &[ApexOption],
    now_ms: u64,
    recipients: &[&str],
) -> Option<ForwardTiming> {
    let option = options.iter().find(|o| {
        options::KnownOption::of(o) == Some(options::KnownOption::DataTiming)
            && options::applies_here(o, Hop::Intermediate)
    })?;
    let timing = options::DataTiming::parse(option).ok()?;
    if timing.no_later_than == 0 && timing.report_after == 0 {
        return None;
    }
    Some(ForwardTiming {
        option: option.clone(),
        stamped_at_ms: now_ms,
        recipients: recipients.iter().map(|r| CompactString::from(*r)).collect(),
    })
}

impl Relay {
    /// Whether data for `at` is refused (see [`Relay::set_refusing`]).
    pub(super) fn is_refusing(&self, at: &ChannelRef) -> bool {
        !self.refusing.is_empty() && self.refusing.contains(at)
    }

    /// Whether `recipient` names a local endpoint whose channel refuses data.
    pub(super) fn refuses(&mut self, recipient: &str) -> bool {
        if self.refusing.is_empty() {
            return false;
        }
        let Ok(target) = self.parse_endpoint(recipient) else {
            return false;
        };
        self.serves(target.domain())
            && self
                .directory
                .get(&target)
                .is_some_and(|at| self.refusing.contains(at))
    }

    /// Step 1 of RFC 3340 §4.4.4.1 (APEX-22): may the peer on this channel send in the name of
    /// `identity`? The originator when it may; otherwise the error to answer.
    pub(super) fn authorize(
        &mut self,
        conn: ConnId,
        channel: u32,
        identity: &str,
    ) -> Result<Endpoint, ApexError> {
        let kind = self.connections.get(&conn).copied();
        // Nearly always the originator is the endpoint attached on this very channel, spelled
        // as it attached: then it is that endpoint, with no parsing and no lookup.
        if kind == Some(ConnKind::Edge) {
            let attached_here = self.channels.get(&(conn, channel)).and_then(|c| {
                c.associations.values().find_map(|a| match a {
                    Association::Attached(e) if e.as_str() == identity => Some(e),
                    _ => None,
                })
            });
            if let Some(endpoint) = attached_here {
                return Ok(endpoint.clone());
            }
        }
        let originator = self
            .parse_endpoint(identity)
            .map_err(|e| ApexError::malformed(code::PARAMETER_ERROR, e.to_string()))?;
        let may_send_as = |a: &Association| match (kind, a) {
            (Some(ConnKind::Edge), Association::Attached(e)) => *e == originator,
            (Some(ConnKind::Mesh), Association::Bound(d)) => {
                originator.same_domain(d)
                    || self
                        .config
                        .trusted
                        .iter()
                        .any(|t| t == "*" || t.eq_ignore_ascii_case(d))
            }
            _ => false,
        };
        // Usually the originator attached (or the relay bound) on this very channel; only
        // otherwise look at the rest of the session.
        let authorized = self
            .channels
            .get(&(conn, channel))
            .is_some_and(|c| c.associations.values().any(may_send_as))
            || self.associations_of(conn).any(may_send_as);
        if !authorized {
            return Err(ApexError::ForeignOriginator);
        }
        Ok(originator)
    }

    /// [`Relay::data`] for [`SimpleData`]: one recipient and no options, so no option applies
    /// or asks for a report, and the payload goes on exactly as received (APEX-28). Routes as
    /// `data` does, without building a [`Data`] first.
    /// A [`SimpleData`]. Returns where it went straight to the recipient's channel, for the
    /// next data with the same identities (`None`: another way, worked out every time).
    pub(super) fn simple_data(
        &mut self,
        conn: ConnId,
        channel: u32,
        msgno: u32,
        payload: &Bytes,
        data: SimpleData<'_>,
    ) -> Option<ChannelRef> {
        let answer = Answer::Msg(msgno);
        let originator = match self.authorize(conn, channel, data.originator) {
            Ok(o) => o,
            Err(refusal) => {
                self.answer(conn, channel, answer, Err(refusal));
                return None;
            }
        };
        if self.refuses(data.recipient) {
            self.answer(conn, channel, answer, Err(ApexError::RecipientNotTaking));
            return None;
        }
        self.accept_data(conn, channel, msgno);
        // An invalid recipient is only ever reported when a statusRequest asks (APEX-38).
        let target = self.parse_endpoint(data.recipient).ok()?;
        if self.serves(target.domain()) {
            self.deliver_local(&originator, &target, payload.clone(), None, Hold::No)
        } else {
            // No options: no statusRequest to answer for.
            self.actions.push_back(Action::Forward {
                domain: target.domain().to_ascii_lowercase(),
                payload: payload.clone(),
                reports: None,
            });
            None
        }
    }

    /// RFC 3340 §4.4.4.1 (APEX-22..25).
    pub(super) fn data(&mut self, conn: ConnId, channel: u32, msgno: u32, data: &Data) {
        let answer = Answer::Msg(msgno);
        // Step 1: may this peer send in the originator's name?
        let originator = match self.authorize(conn, channel, &data.originator.identity) {
            Ok(o) => o,
            Err(refusal) => return self.answer(conn, channel, answer, Err(refusal)),
        };
        // Step 2: per-data options that apply here (APEX-36).
        if let Err(e) = options::check_must_understand(&data.options, Hop::Receiving) {
            let malformed = ApexError::malformed(e.code, e.text);
            return self.answer(conn, channel, answer, Err(malformed));
        }
        // Data for one recipient that takes nothing is refused rather than accepted and then
        // dropped (for several, each refusing one is reported on its own).
        if let [only] = data.recipients.as_slice() {
            if self.refuses(&only.identity) {
                return self.answer(conn, channel, answer, Err(ApexError::RecipientNotTaking));
            }
        }
        // Step 3: accepted (not yet delivered). Data that may be held is acknowledged only
        // once what is held of it is in the store (see `durable`).
        let holding = options::hold_requested(&data.options, Hop::Final);
        if !holding {
            self.accept_data(conn, channel, msgno);
        } else if self.store_busy() {
            return self.answer(conn, channel, answer, Err(ApexError::StoreBusy));
        }
        // Step 4, after the `ok` (RFC 3340 §4.4.4.1, APEX-23): per-originator options. One
        // that applies here, says mustUnderstand and is not understood is an error in
        // processing (APEX-36) the data cannot go past: every recipient fails.
        let originator_refused =
            options::check_must_understand(&data.originator.options, Hop::Receiving).err();
        // Step 5: each recipient, routed on its own.
        let mut remote: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, recipient) in data.recipients.iter().enumerate() {
            let report = options::status_requests_for(data, i, Hop::Final)
                .first()
                .map(|&trans_id| {
                    Box::new(ReportRequest::asked(
                        trans_id,
                        originator.clone(),
                        recipient.identity.clone(),
                    ))
                });
            if let Some(e) = &originator_refused {
                self.report(report, e.code, &e.text);
                continue;
            }
            let target = match self.parse_endpoint(&recipient.identity) {
                Ok(t) => t,
                Err(_) => {
                    self.report(
                        report,
                        code::PARAMETER_INVALID,
                        "invalid recipient identity",
                    );
                    continue;
                }
            };
            if !self.serves(target.domain()) {
                // Step 5.1: the recipient's own options that apply on the way (`this`, `all`);
                // one not understood fails this recipient before anything is sent (APEX-36).
                if let Err(e) =
                    options::check_must_understand(&recipient.options, Hop::Intermediate)
                {
                    self.report(report, e.code, &e.text);
                    continue;
                }
                remote
                    .entry(target.domain().to_ascii_lowercase())
                    .or_default()
                    .push(i);
                continue;
            }
            // This relay delivers: `final` options now apply, per-data and per-originator ones
            // too (APEX-36); one it does not understand fails this recipient.
            let understood = options::check_must_understand(&data.options, Hop::Final)
                .and_then(|()| options::check_must_understand(&data.originator.options, Hop::Final))
                .and_then(|()| options::check_must_understand(&recipient.options, Hop::Final));
            if let Err(e) = understood {
                self.report(report, e.code, &e.text);
                continue;
            }
            match options::prepare_delivery(&data.options, self.now_ms, self.now_ms) {
                Ok(options::Delivery::Deliver {
                    options,
                    reports,
                    timings,
                }) => {
                    self.option_reports(&reports, &originator, &[recipient.identity.as_str()]);
                    // From receipt (now) until the recipient's `ok` (RFC 3342 §2.1, §2.2).
                    let report = match timings.first() {
                        Some(timing) => {
                            self.with_timing(report, timing, &originator, &recipient.identity)
                        }
                        None => report,
                    };
                    let payload = rebuild(data, &[i], &options, Hop::Final);
                    let hold = if options::hold_requested(&data.options, Hop::Final) {
                        match self.config.hold.deadline(self.now_ms, timings.first()) {
                            Some(at) => Hold::Until(at),
                            None => Hold::Indefinitely,
                        }
                    } else {
                        Hold::No
                    };
                    self.deliver_local(&originator, &target, payload, report, hold);
                }
                Ok(options::Delivery::Drop { reports }) => {
                    self.option_reports(&reports, &originator, &[recipient.identity.as_str()]);
                }
                Err(e) => self.report(report, e.code, &e.text),
            }
        }
        for (domain, recipients) in remote {
            let names: Vec<&str> = recipients
                .iter()
                .map(|&i| data.recipients[i].identity.as_str())
                .collect();
            match options::prepare_forward(&data.options, self.now_ms, self.now_ms) {
                Ok(options::Forward::Send { options, reports }) => {
                    self.option_reports(&reports, &originator, &names);
                    let payload = rebuild(data, &recipients, &options, Hop::Intermediate);
                    let timing = forward_timing(&options, self.now_ms, &names);
                    let reports = self.forward_reports(data, &originator, &recipients, timing);
                    self.actions.push_back(Action::Forward {
                        domain,
                        payload,
                        reports,
                    });
                }
                Ok(options::Forward::Drop { reports }) => {
                    // A routing loop or an expired deadline (dataHopping, dataTiming).
                    self.option_reports(&reports, &originator, &names);
                }
                Err(e) => {
                    for &i in &recipients {
                        let report = options::status_requests_for(data, i, Hop::Intermediate)
                            .first()
                            .map(|&trans_id| {
                                Box::new(ReportRequest::asked(
                                    trans_id,
                                    originator.clone(),
                                    data.recipients[i].identity.clone(),
                                ))
                            });
                        self.report(report, e.code, &e.text);
                    }
                }
            }
        }
        if holding {
            self.store_holds(Some((conn, channel, msgno)), data.recipients.len());
        }
    }

    /// The statusRequests a forward of `data` for `recipients` answers for (APEX-38): those
    /// that apply here, whose outcome this relay reports, and those that travel on, watched
    /// until a later relay reports when the originator is of this domain (its reports come
    /// back through this relay; issue 19 item 7). `None` when the data asks for no report.
    fn forward_reports(
        &self,
        data: &Data,
        originator: &Endpoint,
        recipients: &[usize],
        timing: Option<ForwardTiming>,
    ) -> Option<Box<ForwardReports>> {
        let mut here = Vec::new();
        let mut onward = Vec::new();
        for &i in recipients {
            let recipient = &data.recipients[i].identity;
            let asked = |trans_id| StatusAsked {
                trans_id,
                recipient: recipient.clone(),
            };
            here.extend(
                options::status_requests_for(data, i, Hop::Intermediate)
                    .into_iter()
                    .map(asked),
            );
            onward.extend(
                options::status_requests_onward(data, i)
                    .into_iter()
                    .map(asked),
            );
        }
        if here.is_empty() && onward.is_empty() && timing.is_none() {
            return None;
        }
        let watch_ms = if !onward.is_empty() && self.serves(originator.domain()) {
            let timing = options::data_timing(&data.options, Hop::Intermediate);
            let (no_later_than, return_trip) =
                timing.map_or((0, 0), |t| (t.no_later_than, t.return_trip));
            let held = options::hold_requested(&data.options, Hop::Final);
            self.config
                .report_watch
                .bound(no_later_than, return_trip, held)
        } else {
            None
        };
        Some(Box::new(ForwardReports {
            originator: originator.clone(),
            here,
            onward,
            watch_ms,
            timing,
        }))
    }

    /// `report` carrying the handle of a new `dataTiming` watch on the delivery to
    /// `recipient` of data received now (see `timing`); a request made for it alone when no
    /// statusRequest asked. Unchanged when there is nothing to watch or no room.
    fn with_timing(
        &mut self,
        report: Option<Report>,
        timing: &options::DataTiming,
        originator: &Endpoint,
        recipient: &CompactString,
    ) -> Option<Report> {
        let Some(handle) = self.watch_timing(timing, self.now_ms, originator, recipient) else {
            return report;
        };
        let mut request = report.unwrap_or_else(|| {
            Box::new(ReportRequest {
                status_asked: false,
                ..ReportRequest::asked(timing.trans_id, originator.clone(), recipient.clone())
            })
        });
        request.timing = Some(handle);
        Some(request)
    }

    /// Sends the reports options asked for (dataTiming, dataHopping) to the originator.
    pub(super) fn option_reports(
        &mut self,
        reports: &[options::Report],
        originator: &Endpoint,
        recipients: &[&str],
    ) {
        for report in reports {
            let trans_id = self.next_report_trans;
            self.next_report_trans = self.next_report_trans % crate::limits::MAX_31BIT + 1;
            let payload = report.payload(
                &self.config.domain,
                originator.as_str(),
                recipients,
                trans_id,
            );
            self.route_report(payload, originator);
        }
    }

    /// Step 5.3 (APEX-25): access check, then the attached recipient's channel.
    /// `hold`: whether the data waits for a recipient that is not attached (hold4Endpoint).
    pub(super) fn deliver_local(
        &mut self,
        originator: &Endpoint,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        hold: Hold,
    ) -> Option<ChannelRef> {
        let route = self.route_of(recipient);
        // The relay's services and endpoints reach each other without `core:data` entries:
        // each service decides by its own operations (RFC 3341 §3 and RFC 3340 §4.4.4.1 step
        // 5.3 leave this open).
        let allowed = originator.is_service()
            || route == Route::Service
            || self.may_send(recipient, originator);
        if !allowed {
            self.report(report, apex_code::NOT_AUTHORIZED, "access denied");
            return None;
        }
        if originator.is_service() && !self.watches_off() {
            self.note_passing_report(originator, recipient, &payload);
        }
        self.deliver_routed(
            route,
            Some(originator),
            recipient,
            payload,
            report,
            hold,
            None,
        )
    }

    /// Hands data to the relay's service at `recipient`, and sends what it answers.
    fn deliver_to_service(
        &mut self,
        originator: &Endpoint,
        recipient: &Endpoint,
        payload: &Bytes,
        report: Option<Report>,
    ) {
        let mut out = Vec::new();
        let access = self.config.access.clone();
        let mut ctx = ServiceContext {
            access: &access,
            out: &mut out,
            store: None,
        };
        let result = self
            .services
            .receive(recipient, originator, payload, &mut ctx);
        let store = ctx.store.take();
        match result {
            Ok(()) => self.report(report, apex_code::SUCCESS, ""),
            Err(refused) => self.report(report, refused.code, refused.text),
        }
        // What a service sends comes from its endpoint proper, whatever subaddress the data
        // was for.
        let from = self
            .services
            .endpoint_of(recipient)
            .cloned()
            .unwrap_or_else(|| recipient.clone());
        self.send_all_from_service(&from, out);
        if let Some((op, then)) = store {
            if self.store_busy() {
                let busy = crate::store::StoreFailure("too many changes waiting".into());
                self.service_goes_on(&from, then, Err(busy));
            } else {
                self.ask_store(vec![op], durable::AwaitingStore::Service { from, then });
            }
        }
    }

    pub(super) fn route_of(&self, recipient: &Endpoint) -> Route {
        route(
            &self.directory,
            recipient,
            self.config.shard,
            self.config.shards,
        )
    }

    /// Delivers to the recipient's channel. A replica that does not know the recipient may be
    /// behind the home shard (the `Attached` broadcast can still be in a shard queue after the
    /// endpoint was answered), so such data goes to the home shard, which holds or reports.
    pub(super) fn deliver_to(
        &mut self,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        hold: Hold,
        stored: Option<HoldId>,
    ) -> Option<ChannelRef> {
        let route = self.route_of(recipient);
        let delivered = self.deliver_routed(route, None, recipient, payload, report, hold, stored);
        // Data to hold from another shard is stored there first; should some not be, it is
        // stored now (nobody waits for an answer).
        self.store_holds(None, 0);
        delivered
    }

    /// Delivers as `route` says. `originator` is known except for data handed on by another
    /// shard, which is never for a service. Data to hold that is not in the store yet
    /// (`stored`) is collected to be stored first ([`Relay::persist_hold`]).
    #[allow(clippy::too_many_arguments)]
    fn deliver_routed(
        &mut self,
        route: Route,
        originator: Option<&Endpoint>,
        recipient: &Endpoint,
        payload: Bytes,
        report: Option<Report>,
        hold: Hold,
        stored: Option<HoldId>,
    ) -> Option<ChannelRef> {
        let to_store = hold != Hold::No && stored.is_none();
        match route {
            Route::Service => {
                match originator {
                    Some(originator) => {
                        self.deliver_to_service(originator, recipient, &payload, report)
                    }
                    None => self.report(report, code::ACTION_NOT_TAKEN, "no such service"),
                }
                None
            }
            Route::Channel(at) => {
                let stored = stored.map(|id| {
                    Box::new(Stored {
                        id,
                        recipient: recipient.clone(),
                        payload: payload.clone(),
                        deadline: hold.deadline(),
                    })
                });
                self.deliver_at(at, payload, report, stored);
                Some(at)
            }
            Route::HomeShard(home) if to_store => {
                self.persist_hold(recipient, payload, report, hold, Some(home));
                None
            }
            Route::HomeShard(home) => {
                self.actions.push_back(Action::ToShard {
                    shard: home,
                    envelope: Envelope::DeliverHome {
                        recipient: recipient.clone(),
                        payload,
                        report,
                        hold,
                        stored,
                        source: self.current_source,
                    },
                });
                None
            }
            Route::Absent if to_store => {
                self.persist_hold(recipient, payload, report, hold, None);
                None
            }
            Route::Absent => {
                match hold {
                    Hold::No => {
                        self.release(stored);
                        self.report(report, code::ACTION_NOT_TAKEN, "endpoint is not attached")
                    }
                    Hold::Indefinitely => self.hold(recipient, payload, report, None, stored),
                    Hold::Until(at) => self.hold(recipient, payload, report, Some(at), stored),
                }
                None
            }
        }
    }

    /// Whether the recipient's access entries grant the originator `core:data` (APEX-25).
    pub(super) fn may_send(&mut self, recipient: &Endpoint, originator: &Endpoint) -> bool {
        if let Some(&known) = self
            .access_cache
            .get(recipient)
            .and_then(|m| m.get(originator))
        {
            return known;
        }
        let allowed = self
            .config
            .access
            .allows(recipient, originator, "core:data");
        if self.access_cached >= ACCESS_CACHE_ENTRIES {
            self.access_cache.clear();
            self.access_cached = 0;
        }
        self.access_cache
            .entry(recipient.clone())
            .or_default()
            .insert(originator.clone(), allowed);
        self.access_cached += 1;
        allowed
    }

    pub(super) fn deliver_at(
        &mut self,
        at: ChannelRef,
        payload: Bytes,
        report: Option<Report>,
        stored: Option<Box<Stored>>,
    ) {
        if self.is_refusing(&at) {
            // Reported as not delivered (450) like any data for a recipient that does not
            // read: its fate is known, so its record goes.
            self.release(stored.map(|s| s.id));
            return self.report(
                report,
                code::ACTION_NOT_TAKEN_TRANSIENT,
                RECIPIENT_NOT_TAKING,
            );
        }
        // Data from another shard was accepted there; data released from the hold queue, now.
        let since = self.accepted_us.unwrap_or(self.now_us);
        if at.shard != self.config.shard {
            self.actions.push_back(Action::ToShard {
                shard: at.shard,
                envelope: Envelope::Deliver {
                    at,
                    payload,
                    report,
                    stored,
                    source: self.current_source,
                    accepted_us: since,
                },
            });
            return;
        }
        match self.channels.get_mut(&(at.conn, at.channel)) {
            // Its peer answered poorly: the channel is being closed (RFC 3080 §2.2.2.1).
            Some(state) if state.answered_poorly => match stored {
                Some(stored) => self.hold_again(report, *stored),
                None => self.report(
                    report,
                    code::ACTION_NOT_TAKEN,
                    "the endpoint's channel is closing",
                ),
            },
            Some(state) if !state.ready => state.waiting.push(Waiting {
                payload,
                report,
                stored,
                since,
            }),
            Some(state) => {
                state.sent.push_back(Sent::delivery(report, stored, since));
                self.actions.push_back(Action::Send {
                    conn: at.conn,
                    channel: at.channel,
                    payload,
                    source: self.current_source,
                });
            }
            // The channel went away meanwhile: stored data waits for the endpoint again.
            None => match stored {
                Some(stored) => self.hold_again(report, *stored),
                None => self.report(report, code::ACTION_NOT_TAKEN, "endpoint is not attached"),
            },
        }
    }
}
