//! Replies to the relay's own MSGs on APEX channels (deliveries, reports, notices): what each
//! one says, and what happens to a channel whose peer answers with something that is not an
//! APEX reply.
//!
//! RFC 3340 §9.1 gives APEX one-to-one exchanges answered by `ok` (in a RPY) or `error` (in an
//! ERR). Only an `ok` is success; an `error` is a failure with its code (also when a RPY
//! carries it); anything else - another element, a document that does not parse, an `ok` in
//! an ERR, a one-to-many reply (ANS, NUL) - is a poorly formed reply: a failure, and by
//! RFC 3080 §2.2.2.1 ("if a poorly-formed reply is received on any other channel [than 0],
//! the peer must close the channel") the channel is closed. The relay stops delivering on it at
//! once, waits until its MSGs already sent there are answered (a close may only be asked then,
//! RFC 3080 §2.3.1.3, BEEP-25), and asks the runtime to close it ([`Action::CloseChannel`]);
//! its attachments end when it is closed (APEX-16).

use super::*;

use crate::apex::client::{self, Answer};

/// The close code of a channel closed for a poorly formed reply (RFC 3080 §2.3.1.3: a
/// three-digit reply code; 500, "general syntax error").
pub const POORLY_FORMED_REPLY_CLOSE_CODE: u16 = code::SYNTAX_ERROR;

/// The diagnostic reported (statusRequest) for a delivery answered with a poorly formed reply.
pub const POORLY_FORMED_REPLY: &str = "poorly formed reply from the endpoint";

/// What a reply to one of the relay's MSGs says (RFC 3340 §9.1, BEEP-15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReplyOutcome {
    /// `ok` in a RPY: success.
    Ok,
    /// An `error`: failure with its code and diagnostic.
    Error {
        /// Reply code.
        code: u16,
        /// Diagnostic.
        text: String,
    },
    /// Anything else: failure, and the channel is to be closed (RFC 3080 §2.2.2.1).
    PoorlyFormed,
}

impl ReplyOutcome {
    /// Reads the payload of a RPY (`positive`) or ERR.
    fn of(positive: bool, payload: &Bytes) -> Self {
        // `parse_answer` recognises the `ok` every implementation writes without parsing.
        match client::parse_answer(payload) {
            Ok(Answer::Ok) if positive => ReplyOutcome::Ok,
            Ok(Answer::Error { code, text }) => ReplyOutcome::Error { code, text },
            Ok(Answer::Ok) | Err(_) => ReplyOutcome::PoorlyFormed,
        }
    }
}

impl Relay {
    /// A reply (frame `kind`, to our MSG `msgno`) to one of the relay's MSGs on `channel`:
    /// settles the oldest of them (replies come in order, BEEP-35), reported when asked.
    pub fn handle_reply(
        &mut self,
        conn: ConnId,
        channel: u32,
        msgno: u32,
        kind: ReplyKind,
        payload: &Bytes,
    ) {
        let outcome = match kind {
            ReplyKind::Rpy => ReplyOutcome::of(true, payload),
            ReplyKind::Err => ReplyOutcome::of(false, payload),
            // A one-to-many reply: its first frame settles the MSG as poorly answered, the
            // rest of the same reply is not another reply.
            ReplyKind::Ans(_) | ReplyKind::Nul => {
                let Some(state) = self.channels.get_mut(&(conn, channel)) else {
                    return;
                };
                if state.one_to_many_settled == Some(msgno) {
                    if kind == ReplyKind::Nul {
                        state.one_to_many_settled = None;
                    }
                    return;
                }
                if kind != ReplyKind::Nul {
                    state.one_to_many_settled = Some(msgno);
                }
                ReplyOutcome::PoorlyFormed
            }
        };
        if outcome == ReplyOutcome::PoorlyFormed {
            tracing::debug!(%conn, channel, msgno, "poorly formed reply: closing the channel");
            if let Some(state) = self.channels.get_mut(&(conn, channel)) {
                state.answered_poorly = true;
            }
        }
        self.settle_reply(conn, channel, &outcome);
        self.close_if_answered_poorly(conn, channel);
    }

    /// Asks the runtime to close `channel` once its peer answered poorly and every MSG the
    /// relay sent there has its reply (RFC 3080 §2.2.2.1, §2.3.1.3).
    pub(super) fn close_if_answered_poorly(&mut self, conn: ConnId, channel: u32) {
        let Some(state) = self.channels.get_mut(&(conn, channel)) else {
            return;
        };
        if state.answered_poorly && !state.close_asked && state.sent.is_empty() {
            state.close_asked = true;
            self.actions.push_back(Action::CloseChannel {
                conn,
                channel,
                code: POORLY_FORMED_REPLY_CLOSE_CODE,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(body: &str) -> Bytes {
        Bytes::from(format!("Content-Type: application/beep+xml\r\n\r\n{body}"))
    }

    /// BEEP-15, RFC 3340 §9.1: only `ok` in a RPY is success.
    #[test]
    fn beep_15_what_a_reply_says() {
        assert_eq!(ReplyOutcome::of(true, &msg::ok_payload()), ReplyOutcome::Ok);
        assert_eq!(
            ReplyOutcome::of(true, &payload("<ok></ok>\r\n")),
            ReplyOutcome::Ok
        );
        let refused = ReplyOutcome::Error {
            code: 537,
            text: "no".into(),
        };
        let error = payload("<error code='537'>no</error>\r\n");
        assert_eq!(ReplyOutcome::of(false, &error), refused);
        assert_eq!(ReplyOutcome::of(true, &error), refused, "an error in a RPY");
        for poor in [
            payload("<okay />\r\n"),
            payload("<ok"),
            payload("<data content='#x'><originator identity='a@b' /><recipient identity='c@d' /></data>"),
            Bytes::from_static(b"garbage"),
            Bytes::new(),
        ] {
            assert_eq!(
                ReplyOutcome::of(true, &poor),
                ReplyOutcome::PoorlyFormed,
                "{poor:?}"
            );
        }
        assert_eq!(
            ReplyOutcome::of(false, &msg::ok_payload()),
            ReplyOutcome::PoorlyFormed,
            "an ok in an ERR"
        );
    }
}
