//! Reports (RFC 3340 §5.1, APEX-38): once a delivery's outcome is known (the recipient's
//! reply, a failed send, a failed forward), the report service (`apex::service::report`)
//! answers the originator's statusRequest, and what it sends goes out like any service's data.

use super::*;

impl Relay {
    /// Sends a statusResponse from `apex=report@<domain>` to the originator (APEX-38).
    /// Also the moment a delivery's outcome is known: its `dataTiming` watch, if any, is told
    /// (success is only ever reported for a delivered data).
    pub(super) fn report(&mut self, request: Option<Report>, reply_code: u16, text: &str) {
        let Some(request) = request else { return };
        if let Some(timing) = request.timing {
            self.timing_outcome(timing, reply_code == apex_code::SUCCESS);
        }
        if !request.status_asked {
            return;
        }
        self.as_own(|relay| relay.send_report(&request, reply_code, text));
    }

    pub(super) fn send_report(&mut self, request: &ReportRequest, reply_code: u16, text: &str) {
        self.stats.reports.add(reply_code);
        let report = self.services.report();
        let (Some(reporter), Some(outgoing)) = (
            report.endpoint().cloned(),
            report.status_response(
                &request.originator,
                &request.recipient,
                request.trans_id,
                reply_code,
                text,
            ),
        ) else {
            return;
        };
        self.send_from_service(&reporter, outgoing);
    }

    /// Sends a report (a data from `apex=report`, built by the caller) to `originator`.
    pub(super) fn route_report(&mut self, payload: Bytes, originator: &Endpoint) {
        let Some(reporter) = self.services.report().endpoint().cloned() else {
            return;
        };
        let outgoing = Outgoing {
            recipient: originator.clone(),
            payload,
        };
        self.send_from_service(&reporter, outgoing);
    }

    /// Sends everything in `out` from the service at `from` (see
    /// [`Relay::send_from_service`]).
    pub(super) fn send_all_from_service(&mut self, from: &Endpoint, out: Vec<Outgoing>) {
        for outgoing in out {
            self.send_from_service(from, outgoing);
        }
    }

    /// Sends what the service at `from` sends: data routed like any endpoint's, here or to
    /// the recipient's relay.
    pub(super) fn send_from_service(&mut self, from: &Endpoint, outgoing: Outgoing) {
        let Outgoing { recipient, payload } = outgoing;
        self.as_own(|relay| {
            if relay.serves(recipient.domain()) {
                relay.deliver_local(from, &recipient, payload, None, Hold::No);
            } else {
                // A service's data carries no statusRequest (reports never do, OPT-03).
                relay.actions.push_back(Action::Forward {
                    domain: recipient.domain().to_ascii_lowercase(),
                    payload,
                    reports: None,
                });
            }
        });
    }

    /// Settles the oldest of the relay's MSGs on `channel` with what its reply said (replies
    /// come in order, BEEP-35; see `reply`): only an `ok` is a delivery.
    pub(super) fn settle_reply(&mut self, conn: ConnId, channel: u32, outcome: &ReplyOutcome) {
        let Some((report, since)) = self.settled_delivery(conn, channel) else {
            return;
        };
        let delivered = *outcome == ReplyOutcome::Ok;
        if let Some(since) = since {
            if delivered {
                self.stats.data_delivered += 1;
                self.stats.latency.record(self.now_us.saturating_sub(since));
            } else {
                self.stats.deliveries_refused += 1;
            }
        }
        let Some(report) = report else {
            return;
        };
        match outcome {
            ReplyOutcome::Ok => self.report(Some(report), apex_code::SUCCESS, ""),
            ReplyOutcome::Error { code, text } => self.report(Some(report), *code, text),
            ReplyOutcome::PoorlyFormed => {
                self.report(Some(report), code::ACTION_NOT_TAKEN, POORLY_FORMED_REPLY)
            }
        }
    }

    /// Takes the oldest of the relay's MSGs on `channel` awaiting a reply (replies come in
    /// order). `None` when there was none; otherwise, for a delivery whose originator asked
    /// for a report, that request (the outcome is known now), and for a delivery when its
    /// data was accepted. A delivery of data kept in the store is settled whatever the
    /// outcome (reported when asked): its record is released.
    fn settled_delivery(
        &mut self,
        conn: ConnId,
        channel: u32,
    ) -> Option<(Option<Report>, Option<u64>)> {
        match self.channels.get_mut(&(conn, channel))?.sent.pop_front()? {
            Sent::Delivery(report, since) => Some((report, Some(since))),
            Sent::Stored(report, stored, since) => {
                self.release(Some(stored.id));
                Some((report, Some(since)))
            }
            Sent::Notice => Some((None, None)),
        }
    }

    /// A MSG of [`Action::Send`] on `channel` could not be queued (the channel is closing or
    /// gone; not for lack of room, which the runtime waits out): the delivery failed, reported
    /// when asked (APEX-38). It is the newest of the channel's MSGs, not the oldest a reply
    /// would match: such a failure is permanent for the channel, so every later MSG on it
    /// fails too, and the failed ones are always the newest entries, while MSGs already
    /// queued before it may still be answered.
    pub fn send_failed(&mut self, conn: ConnId, channel: u32, reason: &str) {
        self.routes_may_change();
        let Some(channel_state) = self.channels.get_mut(&(conn, channel)) else {
            return;
        };
        match channel_state.sent.pop_back() {
            Some(Sent::Delivery(report, _)) => self.report(report, code::ACTION_NOT_TAKEN, reason),
            // Acknowledged with hold4Endpoint: it waits for the endpoint again.
            Some(Sent::Stored(report, stored, _)) => self.hold_again(report, *stored),
            Some(Sent::Notice) | None => {}
        }
        self.close_if_answered_poorly(conn, channel);
    }

    /// The next relay accepted forwarded data (its `ok`, RFC 3340 §4.4.4.1 step 5.2): each
    /// statusRequest that applies at this relay (`targetHop='this'` or `'all'`) is answered
    /// with 250 (RFC 3340 §5.1, §6.2; APEX-38). Those that travel on stay watched.
    pub fn forward_accepted(&mut self, reports: &ForwardReports, next_relay: &str) {
        if reports.here.is_empty() {
            return;
        }
        let text = format!("accepted by the relay of {next_relay}");
        for asked in &reports.here {
            let request = ReportRequest::asked(
                asked.trans_id,
                reports.originator.clone(),
                asked.recipient.clone(),
            );
            self.as_own(|relay| relay.send_report(&request, apex_code::SUCCESS, &text));
        }
    }

    /// Forwarded data failed (the next relay refused it, or could not be reached, or the link
    /// dropped before it answered; APEX-24): every statusRequest it carries is answered by
    /// this relay, where the data stops, those that apply here and those that would have
    /// travelled on alike, each once (APEX-38); its watches end.
    pub fn forward_failed(&mut self, reports: Option<&ForwardReports>, reason: &str) {
        self.routes_may_change();
        let Some(reports) = reports else {
            return;
        };
        self.unwatch(reports);
        let mut answered: Vec<(u32, &str)> = Vec::new();
        for asked in reports.here.iter().chain(&reports.onward) {
            if answered.contains(&(asked.trans_id, asked.recipient.as_str())) {
                continue;
            }
            answered.push((asked.trans_id, asked.recipient.as_str()));
            let request = Box::new(ReportRequest::asked(
                asked.trans_id,
                reports.originator.clone(),
                asked.recipient.clone(),
            ));
            self.report(Some(request), code::ACTION_NOT_TAKEN, reason);
        }
    }
}
