//! Error tiers of the protocol core and what each means on the wire.
//!
//! * [`FrameError`]: bytes that are not a frame (poorly formed, RFC 3080 §2.2.1.1 P1, P2, P11,
//!   P12; RFC 3081 §3.1.3 for SEQ).
//! * [`ProtocolError`]: well-formed frames used illegally (P3-P10, window overruns, channel-0
//!   replies that make no sense). Every one terminates the session without a reply.
//! * [`Misuse`]: our own caller broke the API contract; the peer did nothing wrong.
//!
//! Channel-0 *requests* that are malformed are not errors here: the session answers them with an
//! `error` element (BEEP-31) and carries on.

use thiserror::Error;

/// What the runtime must do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Abort the transport connection without sending anything more (RFC 3081 §2: TCP abort).
    AbortSession,
    /// Report to the local caller; the session is unaffected.
    ReportToCaller,
}

/// A header field of a data or SEQ frame, named in [`FrameError::BadField`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Channel number.
    Channel,
    /// Message number.
    Msgno,
    /// Continuation indicator (`.` or `*`).
    More,
    /// Sequence number.
    Seqno,
    /// Payload size.
    Size,
    /// Answer number (ANS only).
    Ansno,
    /// SEQ acknowledgement number.
    Ackno,
    /// SEQ window.
    Window,
    /// The field count or separators of the line.
    Layout,
}

/// Bytes that do not form a frame. Each variant cites the poorly-formed condition of
/// RFC 3080 §2.2.1.1 it implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// P1: the header does not begin with MSG, RPY, ERR, ANS, NUL or SEQ.
    #[error("unknown frame keyword (P1)")]
    BadKeyword,
    /// P2: a header field is missing, unparsable or out of range.
    #[error("header field {0:?} missing, unparsable or out of range (P2)")]
    BadField(Field),
    /// P2: no CRLF within the header-line limit.
    #[error("header line longer than the limit (P2)")]
    HeaderTooLong,
    /// P11: NUL with `*` or with a non-zero size.
    #[error("NUL frame with '*' or a payload (P11)")]
    BadNul,
    /// P12: the five octets after the payload are not `END\r\n`.
    #[error("trailer is not END CRLF (P12)")]
    BadTrailer,
}

/// A well-formed frame used against the protocol; the session must be terminated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The bytes were not a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// P3: the channel does not exist.
    #[error("frame for channel {0} which does not exist (P3)")]
    UnknownChannel(u32),
    /// P4: MSG reuses a msgno whose reply we have not completely sent.
    #[error("MSG {msgno} on channel {channel} is still awaiting our reply (P4)")]
    MsgnoInUse {
        /// Channel of the frame.
        channel: u32,
        /// The reused message number.
        msgno: u32,
    },
    /// P5/P6: a reply for a MSG we never sent or whose reply is complete.
    #[error("reply for msgno {msgno} on channel {channel} which awaits no reply (P5/P6)")]
    UnexpectedReply {
        /// Channel of the frame.
        channel: u32,
        /// The message number replied to.
        msgno: u32,
    },
    /// P7: a continuation frame changed keyword.
    #[error("continuation frame changed keyword on channel {0} (P7)")]
    KeywordChanged(u32),
    /// P8: NUL not preceded by ANS in a reply that had frames.
    #[error("NUL after a non-ANS reply frame on channel {0} (P8)")]
    NulNotAfterAns(u32),
    /// P9: after a `*` frame the next frame on the channel has another msgno.
    #[error("continuation frame with another msgno on channel {0} (P9)")]
    ContinuationMismatch(u32),
    /// P10: seqno differs from the expected value.
    #[error("seqno {got} on channel {channel}, expected {expected} (P10)")]
    SeqnoMismatch {
        /// Channel of the frame.
        channel: u32,
        /// Expected seqno.
        expected: u32,
        /// Seqno received.
        got: u32,
    },
    /// RFC 3081 §3.1.2: the peer sent payload beyond the window we advertised.
    #[error("payload beyond the advertised window on channel {0}")]
    WindowOverrun(u32),
    /// RFC 3081 §3.1.3: a SEQ frame names a channel that does not exist or acknowledges
    /// octets never sent.
    #[error("invalid SEQ for channel {0}")]
    InvalidSeq(u32),
    /// ANS reuses an ansno still in progress (BEEP-05).
    #[error("ansno {ansno} reused on channel {channel}")]
    AnsnoInUse {
        /// Channel of the frame.
        channel: u32,
        /// The reused answer number.
        ansno: u32,
    },
    /// The first frame of a session was not the greeting (RFC 3080 §2.3.1.1, §2.4).
    #[error("first frame was not a greeting")]
    GreetingExpected,
    /// A reply on channel 0 that is poorly formed or does not fit its request (BEEP-15).
    #[error("poorly-formed channel-0 reply: {0}")]
    BadManagementReply(&'static str),
    /// The peer did not take our replies (past [`crate::Limits::max_queued_replies`]) and
    /// sent more than [`crate::Limits::max_unanswered_octets`] of messages meanwhile.
    #[error("the peer does not take its replies and keeps sending")]
    RepliesNotTaken,
    /// The TLS layer failed (a handshake that did not verify, a corrupt record): the
    /// session ends (RFC 3080 §3.1.3: a failed negotiation may terminate it).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The peer pipelined more MSGs than [`crate::Limits::max_pending_replies`].
    #[error("too many MSGs awaiting reply on channel {0}")]
    TooManyPendingReplies(u32),
    /// The peer had more answers in progress for one MSG than
    /// [`crate::Limits::max_answers_in_progress`].
    #[error("too many answers in progress on channel {0}")]
    TooManyAnswers(u32),
    /// A channel-0 message or a reply grew past [`crate::Limits::max_message_size`].
    #[error("message on channel {0} exceeds the size limit")]
    MessageTooLarge(u32),
    /// The listener answered the session with an error instead of a greeting (BEEP-18).
    #[error("peer refused the session: {code} {text}")]
    SessionRefused {
        /// Reply code from the peer's `error`.
        code: u16,
        /// Diagnostic text.
        text: String,
    },
}

impl ProtocolError {
    /// A short name for the kind of violation, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::Frame(_) => "frame",
            ProtocolError::UnknownChannel(_) => "unknown_channel",
            ProtocolError::MsgnoInUse { .. } => "msgno_in_use",
            ProtocolError::UnexpectedReply { .. } => "unexpected_reply",
            ProtocolError::KeywordChanged(_) => "keyword_changed",
            ProtocolError::NulNotAfterAns(_) => "nul_not_after_ans",
            ProtocolError::ContinuationMismatch(_) => "continuation_mismatch",
            ProtocolError::SeqnoMismatch { .. } => "seqno_mismatch",
            ProtocolError::WindowOverrun(_) => "window_overrun",
            ProtocolError::InvalidSeq(_) => "invalid_seq",
            ProtocolError::AnsnoInUse { .. } => "ansno_in_use",
            ProtocolError::GreetingExpected => "greeting_expected",
            ProtocolError::BadManagementReply(_) => "bad_management_reply",
            ProtocolError::RepliesNotTaken => "replies_not_taken",
            ProtocolError::Tls(_) => "tls",
            ProtocolError::TooManyPendingReplies(_) => "too_many_pending_replies",
            ProtocolError::TooManyAnswers(_) => "too_many_answers",
            ProtocolError::MessageTooLarge(_) => "message_too_large",
            ProtocolError::SessionRefused { .. } => "session_refused",
        }
    }

    /// Every protocol error ends the session without a reply (RFC 3080 §2.2.1.1).
    pub fn disposition(&self) -> Disposition {
        Disposition::AbortSession
    }
}

/// The local caller used the session API wrongly.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Misuse {
    /// No such channel is open.
    #[error("channel {0} is not open")]
    NoSuchChannel(u32),
    /// `close` was sent for the channel; no more MSGs may go out on it (BEEP-26).
    #[error("channel {0} is closing")]
    ChannelClosing(u32),
    /// A MSG on the channel has not been acknowledged yet (BEEP-25).
    #[error("channel {0} has unacknowledged MSGs")]
    Unacknowledged(u32),
    /// No received MSG with that number awaits a reply.
    #[error("no MSG {msgno} on channel {channel} awaits a reply")]
    NoPendingMsg {
        /// Channel named by the caller.
        channel: u32,
        /// Message number named by the caller.
        msgno: u32,
    },
    /// [`crate::Limits::max_outstanding_msgs`] or [`crate::Limits::max_queued_octets`]
    /// reached: the channel takes more once replies or the peer's window free room.
    #[error("too many MSGs outstanding on channel {0}")]
    TooManyOutstanding(u32),
    /// No start request with that id awaits an answer.
    #[error("no start request {0} awaits an answer")]
    NoSuchStart(u32),
    /// No channel number is left for a new channel.
    #[error("no channel number available")]
    ChannelsExhausted,
    /// The session is released or terminated.
    #[error("the session is closed")]
    SessionClosed,
    /// A payload over the 31-bit size range.
    #[error("payload too large")]
    PayloadTooLarge,
}

impl Misuse {
    /// Misuse is reported to the caller; the session is unaffected.
    pub fn disposition(&self) -> Disposition {
        Disposition::ReportToCaller
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_errors_abort_and_misuse_reports() {
        assert_eq!(
            ProtocolError::from(FrameError::BadTrailer).disposition(),
            Disposition::AbortSession
        );
        assert_eq!(
            ProtocolError::UnknownChannel(3).disposition(),
            Disposition::AbortSession
        );
        assert_eq!(
            Misuse::SessionClosed.disposition(),
            Disposition::ReportToCaller
        );
    }
}
