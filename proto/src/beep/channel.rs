//! Per-channel state of a BEEP session (RFC 3080 §2.2.1, §2.6; RFC 3081 §3): message numbers in
//! both directions, reply ordering, reassembly of continued frames, ANS/NUL bookkeeping,
//! sequence numbers and the sliding windows in both directions.
//!
//! Two independent numbering spaces per channel (RFC 3080 §2.2.1.1, §2.7):
//!
//! ```text
//!   peer's MSGs  --> [assembly] --> pending_replies (in order) --> our RPY/ERR/ANS*NUL
//!   our MSGs     --> send queue --> outstanding (in order)     <-- peer's replies
//! ```

use std::collections::VecDeque;

// Keyed by msgno/ansno values a peer chooses (up to `max_pending_replies` of them), so the hash
// is seeded per map against crafted collisions; foldhash does that for a fraction of SipHash's
// cost, which every message paid.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use bytes::{Bytes, BytesMut};

use crate::beep::frame::{self, Header, Keyword};
use crate::beep::output::FrameSink;
use crate::error::ProtocolError;
use crate::limits::{Limits, INITIAL_WINDOW, MAX_31BIT};

/// A message waiting in the send queue; `sent` octets of it have been framed already.
#[derive(Debug)]
pub(crate) struct OutMsg {
    pub(crate) keyword: Keyword,
    pub(crate) msgno: u32,
    pub(crate) ansno: Option<u32>,
    pub(crate) payload: Bytes,
    pub(crate) sent: usize,
    /// Writing this message's last frame makes the named channel known to the peer (the
    /// positive reply to its `start`): only then may that channel transmit.
    pub(crate) announces: Option<u32>,
}

/// A MSG received from the peer that our reply has not completed yet.
#[derive(Debug)]
struct PendingReply {
    msgno: u32,
    /// Reply messages given by the application before it was this MSG's turn.
    parts: Vec<OutMsg>,
    /// The last part (RPY, ERR or NUL) has been given.
    complete: bool,
    next_ansno: u32,
}

/// The peer's msgnos that are not free for reuse (P4): each from its MSG's arrival until the
/// last frame of our reply to it is written, which happens in arrival order (BEEP-35).
///
/// Peers number their MSGs upward, so `order` is nearly always increasing: then a lookup is a
/// comparison with its newest entry, or a binary search. Only once a peer breaks the order is
/// the hash set built (from `order`, once), and it is dropped when `order` empties; a peer
/// forcing rebuilds pays for each with as many MSGs answered.
#[derive(Debug, Default)]
struct MsgnosInUse {
    order: VecDeque<u32>,
    /// The msgnos of `order`, kept while `order` is not increasing.
    unordered: Option<HashSet<u32>>,
}

impl MsgnosInUse {
    #[inline]
    fn contains(&self, msgno: u32) -> bool {
        if let Some(set) = &self.unordered {
            return set.contains(&msgno);
        }
        match self.order.back() {
            Some(&newest) if msgno <= newest => self.order.binary_search(&msgno).is_ok(),
            _ => false,
        }
    }

    /// Adds a msgno not [`contains`](Self::contains)ed.
    fn push(&mut self, msgno: u32) {
        if self.unordered.is_none() && self.order.back().is_some_and(|&newest| msgno < newest) {
            self.unordered = Some(self.order.iter().copied().collect());
        }
        if let Some(set) = &mut self.unordered {
            set.insert(msgno);
        }
        self.order.push_back(msgno);
    }

    fn release(&mut self, msgno: u32) {
        if self.order.front() == Some(&msgno) {
            self.order.pop_front();
        } else if let Some(at) = self.order.iter().position(|&m| m == msgno) {
            self.order.remove(at);
        }
        if self.order.is_empty() {
            self.unordered = None;
        } else if let Some(set) = &mut self.unordered {
            set.remove(&msgno);
        }
    }
}

/// How far the reply to one of our MSGs has arrived.
#[derive(Debug)]
pub(crate) enum ReplyState {
    /// No reply frame yet.
    Awaiting,
    /// RPY or ERR frames arriving; the keyword of the first one.
    OneToOne(Keyword),
    /// ANS messages in progress (ansno -> keyword seen), last frame was ANS.
    Answers(HashSet<u32>),
}

/// One of our MSGs awaiting its reply.
#[derive(Debug)]
pub(crate) struct Outstanding {
    pub(crate) msgno: u32,
    pub(crate) state: ReplyState,
}

/// What the session must do with a frame the channel accepted.
#[derive(Debug)]
pub(crate) enum Received {
    /// Nothing yet: a continuation was buffered, or a discarded MSG's frame was dropped.
    Nothing,
    /// A MSG arrived completely.
    Msg { msgno: u32, payload: Bytes },
    /// A MSG grew past the size limit: answer it with a pre-emptive ERR (BEEP-38).
    MsgTooLarge { msgno: u32 },
    /// A reply message to our MSG arrived completely.
    Reply {
        keyword: Keyword,
        msgno: u32,
        ansno: Option<u32>,
        payload: Bytes,
    },
}

/// State of one open channel.
#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) profile: String,
    /// We sent `close` for this channel and await the answer (BEEP-26).
    pub(crate) closing: bool,

    // Receive direction.
    recv_next: u32,
    recv_edge: u32,
    recv_buffer: u32,
    /// Octets handed to the application as events it has not polled yet.
    pub(crate) undelivered: u32,
    /// Octets the application asked to keep out of the advertised window
    /// ([`crate::Session::withhold_window`]): data it accepted but could not pass on yet.
    pub(crate) withheld: u32,
    /// Msgno and keyword of the last frame received, when it had `*` (P7, P9).
    last_continued: Option<(u32, Keyword)>,
    /// Frames of the peer's MSG being assembled.
    msg_assembly: Option<(u32, BytesMut)>,
    /// Msgno of a MSG answered pre-emptively; its remaining frames are dropped (BEEP-38).
    discarding: Option<u32>,
    pending_replies: VecDeque<PendingReply>,
    in_use: MsgnosInUse,
    /// Partially received replies: (msgno, ansno) -> octets so far.
    reply_assembly: HashMap<(u32, Option<u32>), BytesMut>,

    // Send direction.
    send_next: u32,
    send_edge: u32,
    send_acked: u32,
    next_msgno: u32,
    pub(crate) queue: VecDeque<OutMsg>,
    /// Octets of our MSGs in `queue`, each counted whole until its last frame is written
    /// (`Limits::max_queued_octets`).
    pub(crate) queued_msg_octets: usize,
    /// Octets of our replies given by the application and not completely written (queued, or
    /// waiting for the replies to earlier MSGs).
    pub(crate) queued_reply_octets: usize,
    pub(crate) outstanding: VecDeque<Outstanding>,
    /// Set while the channel is listed as ready in the session's round-robin.
    pub(crate) in_ready: bool,
    /// Set while the channel is listed for a SEQ check.
    pub(crate) seq_dirty: bool,
    /// False until the reply creating this channel has been written: nothing may be sent on a
    /// channel the peer does not know yet (it would be a P3 violation on its side).
    pub(crate) announced: bool,
}

impl Channel {
    pub(crate) fn new(profile: String, limits: &Limits, first_msgno: u32) -> Self {
        Self {
            profile,
            closing: false,
            recv_next: 0,
            recv_edge: INITIAL_WINDOW,
            recv_buffer: limits.recv_window,
            undelivered: 0,
            withheld: 0,
            last_continued: None,
            msg_assembly: None,
            discarding: None,
            pending_replies: VecDeque::new(),
            in_use: MsgnosInUse::default(),
            reply_assembly: HashMap::default(),
            send_next: 0,
            send_edge: INITIAL_WINDOW,
            send_acked: 0,
            next_msgno: first_msgno,
            queue: VecDeque::new(),
            queued_msg_octets: 0,
            queued_reply_octets: 0,
            outstanding: VecDeque::new(),
            in_ready: false,
            seq_dirty: false,
            announced: true,
        }
    }

    /// A channel whose receive window stays at the initial 4096 octets: a tuning channel,
    /// which must not send a SEQ after a TLS `proceed` (RFC 3080 §3.1.3.1).
    pub(crate) fn keep_initial_window(&mut self) {
        self.recv_buffer = INITIAL_WINDOW;
    }

    /// Work that keeps the channel from being closed (BEEP-28): replies we owe, replies owed
    /// to us, or queued output.
    pub(crate) fn is_busy(&self) -> bool {
        !self.pending_replies.is_empty()
            || !self.outstanding.is_empty()
            || !self.queue.is_empty()
            || self.msg_assembly.is_some()
    }

    /// Every MSG we sent has had at least one reply frame (BEEP-25).
    pub(crate) fn all_acknowledged(&self) -> bool {
        self.outstanding
            .iter()
            .all(|o| !matches!(o.state, ReplyState::Awaiting))
    }

    /// Checks a data header against this channel before its payload is read: P4-P10 and the
    /// window (RFC 3081 §3.1.2). Done early so a peer cannot make us buffer beyond the window.
    #[inline]
    pub(crate) fn check_header(&self, h: &Header) -> Result<(), ProtocolError> {
        let ch = h.channel;
        if h.seqno != self.recv_next {
            return Err(ProtocolError::SeqnoMismatch {
                channel: ch,
                expected: self.recv_next,
                got: h.seqno,
            });
        }
        if self.recv_edge.wrapping_sub(self.recv_next) < h.size {
            return Err(ProtocolError::WindowOverrun(ch));
        }
        if let Some((msgno, keyword)) = self.last_continued {
            if h.msgno != msgno {
                return Err(ProtocolError::ContinuationMismatch(ch));
            }
            if h.keyword != keyword && h.keyword != Keyword::Nul {
                return Err(ProtocolError::KeywordChanged(ch));
            }
        }
        match h.keyword {
            Keyword::Msg => {
                let continuing = self.last_continued.is_some() || self.discarding == Some(h.msgno);
                if !continuing && self.in_use.contains(h.msgno) {
                    return Err(ProtocolError::MsgnoInUse {
                        channel: ch,
                        msgno: h.msgno,
                    });
                }
            }
            _ => {
                let Some(out) = self.outstanding.iter().find(|o| o.msgno == h.msgno) else {
                    return Err(ProtocolError::UnexpectedReply {
                        channel: ch,
                        msgno: h.msgno,
                    });
                };
                match (&out.state, h.keyword) {
                    (ReplyState::Awaiting, _) => {}
                    (ReplyState::OneToOne(k), kw) if *k == kw => {}
                    (ReplyState::OneToOne(_), Keyword::Nul) => {
                        return Err(ProtocolError::NulNotAfterAns(ch))
                    }
                    (ReplyState::OneToOne(_), _) => return Err(ProtocolError::KeywordChanged(ch)),
                    (ReplyState::Answers(_), Keyword::Ans | Keyword::Nul) => {}
                    (ReplyState::Answers(_), _) => return Err(ProtocolError::KeywordChanged(ch)),
                }
            }
        }
        Ok(())
    }

    /// Accepts a frame whose header passed [`Channel::check_header`]. `room`: octets the
    /// session may still hold for reassembly (its share of [`Limits::max_session_assembly`]);
    /// a continued frame that needs more fails its message as too large.
    #[inline]
    pub(crate) fn receive(
        &mut self,
        h: &Header,
        payload: Bytes,
        limits: &Limits,
        room: usize,
    ) -> Result<Received, ProtocolError> {
        let ch = h.channel;
        self.recv_next = self.recv_next.wrapping_add(h.size);
        self.last_continued = h.more.then_some((h.msgno, h.keyword));
        if h.keyword == Keyword::Msg {
            return self.receive_msg(h, payload, limits, room);
        }
        let idx = self
            .outstanding
            .iter()
            .position(|o| o.msgno == h.msgno)
            .ok_or(ProtocolError::UnexpectedReply {
                channel: ch,
                msgno: h.msgno,
            })?;
        if h.keyword == Keyword::Nul {
            // The whole one-to-many reply ends here (BEEP-11).
            self.remove_outstanding(idx);
            self.reply_assembly.retain(|(m, _), _| *m != h.msgno);
            return Ok(Received::Reply {
                keyword: Keyword::Nul,
                msgno: h.msgno,
                ansno: None,
                payload,
            });
        }
        let key = (h.msgno, h.ansno);
        match &mut self.outstanding[idx].state {
            state @ ReplyState::Awaiting => {
                *state = if h.keyword == Keyword::Ans {
                    ReplyState::Answers(HashSet::default())
                } else {
                    ReplyState::OneToOne(h.keyword)
                };
            }
            ReplyState::OneToOne(_) => {}
            ReplyState::Answers(_) => {}
        }
        if let (ReplyState::Answers(in_progress), Some(ansno)) =
            (&mut self.outstanding[idx].state, h.ansno)
        {
            let continuing = self.reply_assembly.contains_key(&key);
            if !continuing && in_progress.contains(&ansno) {
                return Err(ProtocolError::AnsnoInUse { channel: ch, ansno });
            }
            if h.more {
                if !continuing && in_progress.len() >= limits.max_answers_in_progress {
                    return Err(ProtocolError::TooManyAnswers(ch));
                }
                in_progress.insert(ansno);
            } else {
                in_progress.remove(&ansno);
            }
        }
        let Some(payload) = assemble(&mut self.reply_assembly, key, h.more, payload, limits, room)
            .map_err(|()| ProtocolError::MessageTooLarge(ch))?
        else {
            return Ok(Received::Nothing);
        };
        if h.keyword != Keyword::Ans {
            self.remove_outstanding(idx);
        }
        Ok(Received::Reply {
            keyword: h.keyword,
            msgno: h.msgno,
            ansno: h.ansno,
            payload,
        })
    }

    /// Replies usually come in the order of their MSGs: the oldest is removed without
    /// shifting the rest.
    #[inline]
    fn remove_outstanding(&mut self, idx: usize) {
        if idx == 0 {
            self.outstanding.pop_front();
        } else {
            self.outstanding.remove(idx);
        }
    }

    #[inline]
    fn receive_msg(
        &mut self,
        h: &Header,
        payload: Bytes,
        limits: &Limits,
        room: usize,
    ) -> Result<Received, ProtocolError> {
        if self.discarding == Some(h.msgno) {
            if !h.more {
                self.discarding = None;
            }
            return Ok(Received::Nothing);
        }
        let whole = match self.msg_assembly.take() {
            None if !h.more => payload,
            None => {
                if payload.len() > limits.max_message_size || payload.len() > room {
                    return self.too_large(h);
                }
                self.msg_assembly = Some((h.msgno, BytesMut::from(&payload[..])));
                return Ok(Received::Nothing);
            }
            Some((msgno, mut buf)) => {
                debug_assert_eq!(msgno, h.msgno, "P9 checked in check_header");
                let held_on = h.more && payload.len() > room;
                if buf.len() + payload.len() > limits.max_message_size || held_on {
                    return self.too_large(h);
                }
                buf.extend_from_slice(&payload);
                if h.more {
                    self.msg_assembly = Some((msgno, buf));
                    return Ok(Received::Nothing);
                }
                buf.freeze()
            }
        };
        if self.pending_replies.len() >= limits.max_pending_replies {
            return Err(ProtocolError::TooManyPendingReplies(h.channel));
        }
        self.push_pending(h.msgno);
        Ok(Received::Msg {
            msgno: h.msgno,
            payload: whole,
        })
    }

    fn too_large(&mut self, h: &Header) -> Result<Received, ProtocolError> {
        if h.more {
            self.discarding = Some(h.msgno);
        }
        self.push_pending(h.msgno);
        Ok(Received::MsgTooLarge { msgno: h.msgno })
    }

    fn push_pending(&mut self, msgno: u32) {
        self.in_use.push(msgno);
        self.pending_replies.push_back(PendingReply {
            msgno,
            parts: Vec::new(),
            complete: false,
            next_ansno: 0,
        });
    }

    /// Whether a partial message is held for reassembly on this channel.
    pub(crate) fn has_partial(&self) -> bool {
        self.msg_assembly.is_some() || !self.reply_assembly.is_empty()
    }

    /// Octets of partial messages held for reassembly on this channel (the peer's MSG and
    /// replies to ours).
    pub(crate) fn assembling(&self) -> usize {
        let msg = self.msg_assembly.as_ref().map_or(0, |(_, buf)| buf.len());
        if self.reply_assembly.is_empty() {
            return msg;
        }
        msg + self
            .reply_assembly
            .values()
            .map(BytesMut::len)
            .sum::<usize>()
    }

    /// Queues one part of our reply to the peer's MSG `msgno`, in the order the MSGs arrived
    /// (BEEP-35): parts for a later MSG wait until every earlier reply is complete.
    /// Returns the ansno used for an ANS. `Err(())` when no such MSG awaits a reply.
    pub(crate) fn reply(
        &mut self,
        keyword: Keyword,
        msgno: u32,
        payload: Bytes,
        announces: Option<u32>,
    ) -> Result<Option<u32>, ()> {
        let index = self
            .pending_replies
            .iter()
            .position(|p| p.msgno == msgno && !p.complete)
            .ok_or(())?;
        let pending = &mut self.pending_replies[index];
        let ansno = (keyword == Keyword::Ans).then(|| {
            let n = pending.next_ansno;
            pending.next_ansno = (n + 1) % (MAX_31BIT + 1);
            n
        });
        pending.complete = keyword != Keyword::Ans;
        self.queued_reply_octets += payload.len();
        let part = OutMsg {
            keyword,
            msgno,
            ansno,
            payload,
            sent: 0,
            announces,
        };
        if index == 0 {
            // The oldest MSG's reply goes out at once: its earlier parts already did, so
            // nothing is held for it (and a plain reply costs no allocation).
            self.queue.push_back(part);
        } else {
            pending.parts.push(part);
        }
        self.release_ready_replies();
        Ok(ansno)
    }

    /// Moves reply parts whose turn has come into the send queue.
    fn release_ready_replies(&mut self) {
        while let Some(head) = self.pending_replies.front_mut() {
            // Usually empty: the oldest MSG's reply went straight to the queue.
            if !head.parts.is_empty() {
                self.queue.extend(head.parts.drain(..));
            }
            if !head.complete {
                break;
            }
            // The msgno stays in `in_use` until the reply's last frame is written (P4).
            self.pending_replies.pop_front();
        }
    }

    /// Allocates a msgno for our next MSG, skipping numbers still awaiting replies (BEEP-04).
    pub(crate) fn queue_msg(&mut self, payload: Bytes) -> u32 {
        // Numbers are handed out in increasing order (mod 2^31) and `outstanding` keeps that
        // order, so all of them lie between its front and back: the next number is free unless
        // it wrapped all the way round to the oldest one. `Limits::max_outstanding_msgs` stays
        // far below 2^31, so one comparison replaces a scan of the whole list.
        let mut msgno = self.next_msgno;
        while self.outstanding.front().is_some_and(|o| o.msgno == msgno) {
            msgno = (msgno + 1) % (MAX_31BIT + 1);
        }
        self.next_msgno = (msgno + 1) % (MAX_31BIT + 1);
        self.outstanding.push_back(Outstanding {
            msgno,
            state: ReplyState::Awaiting,
        });
        self.queued_msg_octets += payload.len();
        self.queue.push_back(OutMsg {
            keyword: Keyword::Msg,
            msgno,
            ansno: None,
            payload,
            sent: 0,
            announces: None,
        });
        msgno
    }

    /// Queues a message that answers nothing in our pending list (the greeting).
    pub(crate) fn queue_raw(&mut self, keyword: Keyword, msgno: u32, payload: Bytes) {
        self.queue.push_back(OutMsg {
            keyword,
            msgno,
            ansno: None,
            payload,
            sent: 0,
            announces: None,
        });
    }

    /// Registers a reply we expect without having sent a MSG (the peer's greeting).
    pub(crate) fn expect_reply(&mut self, msgno: u32) {
        self.outstanding.push_back(Outstanding {
            msgno,
            state: ReplyState::Awaiting,
        });
    }

    /// BEEP-39: the peer answered our MSG negatively before we sent its last frame; finish it
    /// with an empty final frame and drop the rest. Returns whether such a MSG was found.
    pub(crate) fn truncate_unsent_msg(&mut self, msgno: u32) -> bool {
        match self
            .queue
            .iter_mut()
            .find(|o| o.keyword == Keyword::Msg && o.msgno == msgno && o.sent > 0)
        {
            Some(out) => {
                let unsent = out.payload.len() - out.sent;
                self.queued_msg_octets = self.queued_msg_octets.saturating_sub(unsent);
                out.payload.truncate(out.sent);
                true
            }
            None => false,
        }
    }

    /// Octets we may still send before the peer's window is exhausted (RFC 3081 §3.1.2).
    pub(crate) fn send_window(&self) -> u32 {
        let avail = self.send_edge.wrapping_sub(self.send_next);
        if avail > MAX_31BIT {
            0 // the peer moved its right edge left of what we sent
        } else {
            avail
        }
    }

    /// Applies a SEQ from the peer (RFC 3081 §3.1.3). Fails when the ackno acknowledges
    /// octets never sent or moves backwards.
    pub(crate) fn apply_seq(&mut self, ackno: u32, window: u32) -> Result<(), ()> {
        let sent_since_acked = self.send_next.wrapping_sub(self.send_acked);
        let acked_now = ackno.wrapping_sub(self.send_acked);
        if acked_now > sent_since_acked {
            return Err(());
        }
        self.send_acked = ackno;
        self.send_edge = ackno.wrapping_add(window);
        Ok(())
    }

    /// Frames the head of the send queue, as much as window and frame limit allow. Returns
    /// `None` when nothing could be written, else the channel announced by the message the
    /// frame completed, if any.
    pub(crate) fn write_frame(
        &mut self,
        number: u32,
        max_frame: u32,
        out: &mut impl FrameSink,
    ) -> Option<Option<u32>> {
        let window = self.send_window();
        if !self.announced {
            return None;
        }
        let msg = self.queue.front_mut()?;
        let remaining = msg.payload.len() - msg.sent;
        let chunk = remaining.min(window as usize).min(max_frame as usize);
        if chunk == 0 && remaining > 0 {
            return None; // blocked until a SEQ opens the window
        }
        let more = chunk < remaining;
        let header = Header {
            keyword: msg.keyword,
            channel: number,
            msgno: msg.msgno,
            more,
            seqno: self.send_next,
            size: chunk as u32,
            ansno: msg.ansno,
        };
        frame::put_data_frame(out, &header, &msg.payload, msg.sent..msg.sent + chunk);
        msg.sent += chunk;
        self.send_next = self.send_next.wrapping_add(chunk as u32);
        if more {
            return Some(None);
        }
        let done = self.queue.pop_front()?;
        if done.keyword == Keyword::Msg {
            self.queued_msg_octets = self.queued_msg_octets.saturating_sub(done.payload.len());
        }
        if matches!(done.keyword, Keyword::Rpy | Keyword::Err | Keyword::Nul) {
            // The reply is completely sent: the peer may reuse the msgno now (P4).
            self.in_use.release(done.msgno);
        }
        if done.keyword != Keyword::Msg {
            self.queued_reply_octets = self.queued_reply_octets.saturating_sub(done.payload.len());
        }
        Some(done.announces)
    }

    /// The SEQ to send now, if the window we can advertise has grown by at least half the
    /// channel's buffer (BEEP-66) or the peer is stalled on a closed window. Never shrinks the
    /// window (BEEP-69).
    pub(crate) fn take_seq(&mut self) -> Option<(u32, u32)> {
        self.seq_dirty = false;
        let free = self
            .recv_buffer
            .saturating_sub(self.undelivered)
            .saturating_sub(self.withheld);
        let new_edge = self.recv_next.wrapping_add(free);
        let growth = new_edge.wrapping_sub(self.recv_edge);
        if growth == 0 || growth > MAX_31BIT {
            return None;
        }
        let stalled = self.recv_edge == self.recv_next;
        if growth < self.recv_buffer / 2 && !stalled {
            return None;
        }
        self.recv_edge = new_edge;
        Some((self.recv_next, free))
    }
}

/// Appends a frame's payload to its message. `Ok(Some)` when the message is complete,
/// `Ok(None)` when more frames follow, `Err` when it outgrows the limit.
#[inline]
fn assemble(
    partial: &mut HashMap<(u32, Option<u32>), BytesMut>,
    key: (u32, Option<u32>),
    more: bool,
    payload: Bytes,
    limits: &Limits,
    room: usize,
) -> Result<Option<Bytes>, ()> {
    if !more && partial.is_empty() {
        // The usual reply: one frame, nothing assembled on the channel (no key to hash).
        return Ok(Some(payload));
    }
    match partial.remove(&key) {
        None if !more => Ok(Some(payload)),
        None => {
            if payload.len() > limits.max_message_size || payload.len() > room {
                return Err(());
            }
            partial.insert(key, BytesMut::from(&payload[..]));
            Ok(None)
        }
        Some(mut buf) => {
            if buf.len() + payload.len() > limits.max_message_size || (more && payload.len() > room)
            {
                return Err(());
            }
            buf.extend_from_slice(&payload);
            if more {
                partial.insert(key, buf);
                Ok(None)
            } else {
                Ok(Some(buf.freeze()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MsgnosInUse;

    /// BEEP-08 P4: in-use msgnos are found whether the peer numbers upward (no set is kept),
    /// out of order (the set is built), and free again once released, in any order.
    #[test]
    fn msgnos_in_use_are_found_in_and_out_of_order() {
        let mut in_use = MsgnosInUse::default();
        for msgno in [1, 3, 5, 9] {
            assert!(!in_use.contains(msgno));
            in_use.push(msgno);
        }
        let check = |in_use: &MsgnosInUse, used: &[u32], free: &[u32]| {
            assert!(used.iter().all(|&m| in_use.contains(m)), "{used:?} in use");
            assert!(!free.iter().any(|&m| in_use.contains(m)), "{free:?} free");
        };
        assert!(in_use.unordered.is_none(), "upward numbering keeps no set");
        check(&in_use, &[1, 3, 5, 9], &[0, 2, 10]);
        in_use.push(4);
        assert!(in_use.unordered.is_some(), "a lower msgno breaks the order");
        check(&in_use, &[1, 3, 4, 9], &[2, 10]);
        in_use.release(1);
        in_use.release(5); // out of order too
        assert!(!in_use.contains(1) && !in_use.contains(5));
        assert!(in_use.contains(3) && in_use.contains(4) && in_use.contains(9));
        for msgno in [3, 9, 4] {
            in_use.release(msgno);
        }
        assert!(in_use.order.is_empty() && in_use.unordered.is_none());
        assert!(!in_use.contains(4));
        in_use.push(2);
        assert!(in_use.contains(2) && in_use.unordered.is_none());
    }
}
