//! What the relay hands out: the [`Action`]s the runtime carries out, the [`Envelope`]s one
//! shard's relay sends another's, and the answers and report requests they carry.

use bytes::Bytes;

use super::*;

/// What to do with data whose recipient is not attached (hold4Endpoint, RFC 3342 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Report it as not delivered.
    No,
    /// Hold it until the recipient attaches.
    Indefinitely,
    /// Hold it until the recipient attaches or this relay-clock millisecond passes.
    Until(u64),
}

/// Something the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer the peer's MSG `msgno` on `channel` of `conn` (RPY when `positive`, else ERR).
    Reply {
        /// Connection.
        conn: ConnId,
        /// What to answer, on which channel.
        reply: MsgReply,
    },
    /// Accept the deferred `start` `start_id` with this piggybacked reply (`<ok />` or an
    /// `error`): the channel exists either way (RFC 3080 §2.3.1.2).
    StartReply {
        /// Connection.
        conn: ConnId,
        /// The start request id given to [`Relay::handle_start`].
        start_id: u32,
        /// Piggybacked content.
        content: Bytes,
    },
    /// Send a MSG on a channel of a local connection (delivery, report or terminate). Its
    /// reply must be passed to [`Relay::handle_reply`]; a MSG the session refuses, to
    /// [`Relay::send_failed`].
    Send {
        /// Connection.
        conn: ConnId,
        /// Channel.
        channel: u32,
        /// The message.
        payload: Bytes,
        /// The channel whose peer sent the data delivered here (`None` for the relay's own
        /// MSGs): while the MSG waits for room, that channel's window is held back by its size.
        source: Option<ChannelRef>,
    },
    /// Close `channel` of `conn` with `code` (BEEP `close`, RFC 3080 §2.3.1.3): its peer
    /// answered poorly (RFC 3080 §2.2.2.1) and every MSG the relay sent there is answered. A
    /// channel already closing or gone needs nothing more; the relay learns of the close
    /// through [`Relay::channel_closed`].
    CloseChannel {
        /// Connection.
        conn: ConnId,
        /// The APEX channel.
        channel: u32,
        /// The close's reply code.
        code: u16,
    },
    /// Hand an envelope to another shard over the mesh queue.
    ToShard {
        /// Destination shard.
        shard: usize,
        /// The envelope.
        envelope: Envelope,
    },
    /// Send data towards another administrative domain over the relay mesh. Its outcome
    /// goes to [`Relay::forward_accepted`] or [`Relay::forward_failed`] with `reports`, and
    /// [`Relay::forward_sending`] is told when it goes onto the link.
    Forward {
        /// Destination domain.
        domain: String,
        /// The data message, carrying only the recipients routed there.
        payload: Bytes,
        /// The statusRequests the forward answers for, when its data carries any.
        reports: Option<Box<ForwardReports>>,
    },
    /// Find the addresses `domain`'s relay is reached at (its `_apex-mesh._tcp` SRV
    /// targets) and tell [`Relay::relay_addresses_found`]: a bind as `domain` waits for them.
    ResolveRelay {
        /// The domain a peer binds as.
        domain: String,
    },
    /// Make these changes durable and answer [`Relay::store_done`] with the request's token
    /// (token 0: nobody waits).
    Store(StoreRequest),
}

/// Messages between shards. Payloads are `Bytes`: crossing shards moves a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// To the endpoint's home shard: may `endpoint` attach at `at`?
    AttachRequest {
        /// Request id, echoed in the verdict.
        id: u64,
        /// Endpoint.
        endpoint: Endpoint,
        /// Where it would attach.
        at: ChannelRef,
        /// The attach carried attachOverride (RFC 3342).
        overriding: bool,
    },
    /// From the home shard: the verdict (`Err(code)` on conflict).
    AttachVerdict {
        /// Request id.
        id: u64,
        /// Outcome.
        result: Result<(), u16>,
    },
    /// Broadcast: `endpoint` is attached at `at`.
    Attached {
        /// Endpoint.
        endpoint: Endpoint,
        /// Its channel.
        at: ChannelRef,
    },
    /// Broadcast: `endpoint` is no longer attached at `at`.
    Detached {
        /// Endpoint.
        endpoint: Endpoint,
        /// The channel it was attached on.
        at: ChannelRef,
    },
    /// To the shard owning `at`: end that attachment with 556 (attachOverride).
    Evict {
        /// Endpoint.
        endpoint: Endpoint,
        /// The old channel.
        at: ChannelRef,
    },
    /// To the shard owning the link to `domain`: send `payload` over it.
    Forward {
        /// Destination domain.
        domain: String,
        /// The data message.
        payload: Bytes,
        /// The statusRequests the forward answers for (see [`Action::Forward`]).
        reports: Option<Box<ForwardReports>>,
    },
    /// To the shard owning the link to `recipient`'s domain, which watches the forwards of
    /// its statusRequests: a relay further on reported on `recipient` (issue 19 item 7).
    ReportSeen(Box<ReportSeen>),
    /// To `recipient`'s home shard: this shard's replica did not know it. The home shard
    /// settles every attach before the endpoint is answered, so it is never behind; it
    /// delivers, holds or reports (access was already checked).
    DeliverHome {
        /// The recipient.
        recipient: Endpoint,
        /// The data message.
        payload: Bytes,
        /// Report the outcome to the originator when set.
        report: Option<Report>,
        /// What to do if the recipient is not attached.
        hold: Hold,
        /// The data's record in the store, when the sending shard kept it there (hold4Endpoint):
        /// released once the recipient takes it.
        stored: Option<HoldId>,
        /// The channel the data came from (see [`Action::Send`]).
        source: Option<ChannelRef>,
    },
    /// To the shard owning `at`: deliver `payload` there.
    Deliver {
        /// Recipient's channel.
        at: ChannelRef,
        /// The data message.
        payload: Bytes,
        /// Report the outcome to the originator when set.
        report: Option<Report>,
        /// The data's record in the store, released once the recipient takes it (and held
        /// again should the delivery not complete).
        stored: Option<Box<Stored>>,
        /// The channel the data came from (see [`Action::Send`]).
        source: Option<ChannelRef>,
        /// When the data was accepted (relay-clock microseconds), for delivery latency.
        accepted_us: u64,
    },
    /// To the shard owning `at`: hold back (`withhold`) or give back `octets` of that channel's
    /// receive window, for data from it that waits for a recipient on the sending shard.
    /// Handled by the shard core, not the relay.
    Window {
        /// The sending channel.
        at: ChannelRef,
        /// Octets.
        octets: u32,
        /// Hold back when set, give back otherwise.
        withhold: bool,
    },
    /// Broadcast: the recipient channel `at` has taken nothing for longer than the shard's
    /// stall limit (`refusing`), or is taking messages again: data for it is refused with 450
    /// rather than queued while it refuses.
    Refusing {
        /// The recipient's channel.
        at: ChannelRef,
        /// Refusing from now on, or no longer.
        refusing: bool,
    },
    /// To the shard running a delivery's `dataTiming` watch ([`TimingHandle`]): the
    /// recipient answered (`delivered`: with `ok`), or the delivery failed.
    TimingSettled {
        /// The watch's number on that shard.
        id: u64,
        /// Whether the recipient answered `ok`.
        delivered: bool,
    },
}

/// A delivery of data kept in the store (hold4Endpoint): what holds it again should the
/// delivery not complete (the recipient's channel goes away before it answers), so that data
/// the relay acknowledged is never dropped on the way. Boxed where it travels, like reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its record in the store.
    pub id: HoldId,
    /// Whom it was held for.
    pub recipient: Endpoint,
    /// The data, to hold again.
    pub payload: Bytes,
    /// Relay-clock millisecond after which it expires (`None`: no bound).
    pub deadline: Option<u64>,
}

impl Stored {
    /// How long it may still be held, as a [`Hold`].
    pub fn hold(&self) -> Hold {
        match self.deadline {
            Some(at) => Hold::Until(at),
            None => Hold::Indefinitely,
        }
    }
}

impl Hold {
    /// The deadline a hold sets, if any.
    pub fn deadline(self) -> Option<u64> {
        match self {
            Hold::Until(at) => Some(at),
            Hold::No | Hold::Indefinitely => None,
        }
    }
}

/// A [`ReportRequest`] travelling with a data message. Boxed: reports are rarely asked for,
/// and every message's actions, envelopes and sent-queue entries would otherwise carry room
/// for one.
pub type Report = Box<ReportRequest>;

/// A statusRequest to honour once a recipient's outcome is known (RFC 3340 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRequest {
    /// The option's transID.
    pub trans_id: u32,
    /// Who asked (the data's originator).
    pub originator: Endpoint,
    /// The recipient reported on, as the data named it.
    pub recipient: CompactString,
    /// Whether a statusRequest asked for this report: `false` when the request only carries
    /// `timing` (data with a `dataTiming` option and no statusRequest).
    pub status_asked: bool,
    /// The delivery's `dataTiming` watch (RFC 3342 §2.1, §2.2), told the delivery's outcome.
    pub timing: Option<TimingHandle>,
}

impl ReportRequest {
    /// The request of a statusRequest with transID `trans_id` (RFC 3340 §5.1), with no
    /// `dataTiming` watch.
    pub fn asked(trans_id: u32, originator: Endpoint, recipient: CompactString) -> Self {
        Self {
            trans_id,
            originator,
            recipient,
            status_asked: true,
            timing: None,
        }
    }
}

/// Where a local delivery's `dataTiming` watch runs: the shard that accepted the data, and
/// the watch's number there (see `timing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimingHandle {
    /// The shard whose relay runs the watch.
    pub shard: usize,
    /// The watch's number on that shard.
    pub id: u64,
}

/// A forward's `dataTiming` (RFC 3342 §2.1, §2.2): the values its payload carries were
/// worked out at relay-clock millisecond `stamped_at_ms`; the time from then until the data
/// leaves for the next relay is subtracted when it does (OPT-08, OPT-12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardTiming {
    /// The `dataTiming` option as it stands in the payload.
    pub option: ApexOption,
    /// When its values were last brought up to date (relay-clock ms).
    pub stamped_at_ms: u64,
    /// The recipients the forward carries, as the data named them (for reports).
    pub recipients: Vec<CompactString>,
}

/// One statusRequest of forwarded data, for one recipient (RFC 3340 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusAsked {
    /// The option's transID.
    pub trans_id: u32,
    /// The recipient, as the data named it.
    pub recipient: CompactString,
}

/// The statusRequests a forward to another relay answers for (RFC 3340 §5.1, §6.2; APEX-38),
/// worked out when the data was routed, while its options were at hand: the forward's outcome
/// is known only later, on the shard that owns the link. Boxed where it travels, like reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardReports {
    /// The data's originator, to whom reports go.
    pub originator: Endpoint,
    /// Requests that apply at this relay (`targetHop='this'` or `'all'`): this relay reports
    /// the forward's outcome, 250 once the next relay accepted the data.
    pub here: Vec<StatusAsked>,
    /// Requests that travel on (`targetHop='final'` or `'all'`): a later relay reports, unless
    /// the forward fails here, which this relay then reports.
    pub onward: Vec<StatusAsked>,
    /// How long, from when the data goes onto the link, a later relay's report on `onward`
    /// may take before this relay reports the outcome unknown (ms; issue 19 item 7). `None`:
    /// not watched (the originator is not of this domain, so its reports do not pass here).
    pub watch_ms: Option<u64>,
    /// The forward's `dataTiming`, when it has one with something to count down.
    pub timing: Option<ForwardTiming>,
}

/// A report from another relay's report service on one recipient, seen passing through on
/// its way to a local originator (see [`Envelope::ReportSeen`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSeen {
    /// The report's recipient: the originator of the data reported on.
    pub originator: Endpoint,
    /// The statusRequest's transID.
    pub trans_id: u32,
    /// The recipient reported on.
    pub recipient: Endpoint,
    /// The reply code reported.
    pub code: u16,
    /// The domain of the report service that sent it.
    pub reporter_domain: CompactString,
}

/// The relay's answer to a peer's MSG: what an [`Action::Reply`] carries, and what the relay
/// puts straight into the session at hand (see [`Relay::handle_session_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgReply {
    /// Channel.
    pub channel: u32,
    /// The peer's msgno.
    pub msgno: u32,
    /// RPY or ERR.
    pub positive: bool,
    /// The `ok` or `error` payload.
    pub payload: Bytes,
}

impl MsgReply {
    /// Queues the answer in the session of its connection; an `error`'s text labelled with
    /// its language when the peer asked for another first (BEEP-30).
    pub fn send_in(self, session: &mut Session) -> Result<(), Misuse> {
        if self.positive {
            return session.send_rpy(self.channel, self.msgno, self.payload);
        }
        let payload = session
            .diagnostic_lang()
            .and_then(|lang| crate::apex::msg::label_error_text(&self.payload, lang))
            .unwrap_or(self.payload);
        session.send_err(self.channel, self.msgno, payload)
    }
}
