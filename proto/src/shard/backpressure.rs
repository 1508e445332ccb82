//! Backpressure towards recipients that do not keep up (RFC 3081 §3.1.3, §3.1.4): the
//! backlog of relay MSGs a recipient channel's session has no room for yet, the windows of the
//! sending channels held back while their MSGs wait (here or on their own shard, by
//! [`Envelope::Window`]), a recipient that takes nothing for too long turned *refusing*, and
//! the shard-wide backlog budget. The module documentation of [`super`] says how it fits.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{ShardCore, ENDPOINT_GONE};
use crate::apex::relay::{ChannelRef, ConnId, Envelope};
use crate::error::Misuse;

/// A relay MSG waiting for room in its recipient's session.
#[derive(Debug)]
pub(super) struct Waiting {
    pub(super) payload: Bytes,
    /// The channel whose window is held back by this MSG's size, while it is.
    pub(super) source: Option<ChannelRef>,
}

/// The backlog of one recipient channel.
#[derive(Debug)]
pub(super) struct Backlog {
    pub(super) queue: VecDeque<Waiting>,
    /// Octets in `queue`.
    pub(super) octets: usize,
    /// When the recipient last took a MSG from it (or it began).
    pub(super) progress: Instant,
    pub(super) refusing: bool,
}

impl ShardCore {
    /// A relay MSG for `channel` of `conn`: into the session, or its backlog when the session
    /// has no room (or earlier MSGs wait there: order is kept).
    pub(super) fn send(
        &mut self,
        conn: ConnId,
        channel: u32,
        payload: Bytes,
        source: Option<ChannelRef>,
        now: Instant,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            self.relay.send_failed(conn, channel, ENDPOINT_GONE);
            return;
        };
        let payload = if !c.backlogs.is_empty() && c.backlogs.contains_key(&channel) {
            payload
        } else {
            match c.session.try_send_msg(channel, payload) {
                Ok(_) => {
                    if !c.woken {
                        c.woken = true;
                        self.woken.push_back(conn);
                    }
                    return;
                }
                Err((Misuse::TooManyOutstanding(_), payload)) => payload,
                Err(_) => {
                    // The channel is closing or gone: reports still flow.
                    self.relay.send_failed(conn, channel, ENDPOINT_GONE);
                    return;
                }
            }
        };
        let octets = payload.len();
        let backlog = c.backlogs.entry(channel).or_insert_with(|| {
            // A new stall deadline.
            self.deadline_moved = true;
            Backlog {
                queue: VecDeque::new(),
                octets: 0,
                progress: now,
                refusing: false,
            }
        });
        // Within its slack a backlog holds nobody back (a recipient a little behind catches
        // up without its senders' windows being worked), and a refusing one no longer does.
        let slack = self.budgets.backlog_slack;
        let source = source.filter(|_| !backlog.refusing && backlog.octets >= slack);
        backlog.octets += octets;
        backlog.queue.push_back(Waiting { payload, source });
        self.backlog_octets += octets;
        if let Some(source) = source {
            // A run of data from one channel is held back with one adjustment.
            match &mut self.withholding {
                Some((at, sum)) if *at == source => {
                    *sum = sum.saturating_add(window_octets(octets))
                }
                pending => {
                    if let Some((at, sum)) = pending.replace((source, window_octets(octets))) {
                        self.adjust_window(at, sum, true);
                    }
                }
            }
        }
        if self.backlog_octets > self.budgets.max_backlog_octets {
            // Over the shard's budget: every recipient with a backlog refuses from now on.
            let shard = self.shard;
            let backlogged: Vec<ChannelRef> = self
                .conns
                .iter()
                .flat_map(|(conn, c)| {
                    c.backlogs
                        .iter()
                        .filter(|(_, b)| !b.refusing)
                        .map(move |(channel, _)| ChannelRef {
                            shard,
                            conn,
                            channel: *channel,
                        })
                })
                .collect();
            for at in backlogged {
                self.set_refusing(at, true);
            }
        }
    }

    /// Moves what waits in `conn`'s backlogs into its session as far as it has room.
    pub(super) fn drain(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut released = Vec::new();
        let mut failed = Vec::new();
        let mut emptied = Vec::new();
        for (channel, backlog) in c.backlogs.iter_mut() {
            let before = backlog.queue.len();
            while let Some(waiting) = backlog.queue.pop_front() {
                let octets = waiting.payload.len();
                match c.session.try_send_msg(*channel, waiting.payload) {
                    Ok(_) => {
                        self.backlog_octets -= octets;
                        backlog.octets -= octets;
                        if let Some(source) = waiting.source {
                            add_to(&mut released, source, octets);
                        }
                    }
                    Err((Misuse::TooManyOutstanding(_), payload)) => {
                        backlog.queue.push_front(Waiting {
                            payload,
                            source: waiting.source,
                        });
                        break;
                    }
                    Err(_) => {
                        // The channel is closing: everything behind fails as well.
                        self.backlog_octets -= octets;
                        backlog.octets -= octets;
                        failed.push(*channel);
                        if let Some(source) = waiting.source {
                            add_to(&mut released, source, octets);
                        }
                    }
                }
            }
            if backlog.queue.len() < before {
                backlog.progress = now;
            }
            if backlog.queue.is_empty() {
                emptied.push((*channel, backlog.refusing));
            }
        }
        for (channel, _) in &emptied {
            c.backlogs.remove(channel);
        }
        if !released.is_empty() || !emptied.is_empty() {
            self.wake(conn);
        }
        for (source, octets) in released {
            self.adjust_window(source, window_octets(octets), false);
        }
        for channel in failed {
            self.relay.send_failed(conn, channel, ENDPOINT_GONE);
        }
        for (channel, refusing) in emptied {
            if refusing {
                let at = self.at(conn, channel);
                self.announce_refusing(at, false);
            }
        }
    }

    /// A backlog that ends with its connection: the windows it held go back, and a refusing
    /// recipient is no more.
    pub(super) fn end_backlog(&mut self, at: ChannelRef, backlog: Backlog) {
        for waiting in backlog.queue {
            self.backlog_octets -= waiting.payload.len();
            if let Some(source) = waiting.source {
                self.adjust_window(source, window_octets(waiting.payload.len()), false);
            }
        }
        if backlog.refusing {
            self.announce_refusing(at, false);
        }
    }

    /// The recipient channel `at` (on this shard) refuses data from now on: what its backlog
    /// held back is given back, and every shard learns it.
    pub(super) fn set_refusing(&mut self, at: ChannelRef, refusing: bool) {
        let Some(backlog) = self
            .conns
            .get_mut(&at.conn)
            .and_then(|c| c.backlogs.get_mut(&at.channel))
        else {
            return;
        };
        if backlog.refusing == refusing {
            return;
        }
        backlog.refusing = refusing;
        if refusing {
            self.counts.overflows += 1;
        }
        let mut released = Vec::new();
        for waiting in backlog.queue.iter_mut() {
            if let Some(source) = waiting.source.take() {
                add_to(&mut released, source, waiting.payload.len());
            }
        }
        for (source, octets) in released {
            self.adjust_window(source, window_octets(octets), false);
        }
        tracing::debug!(shard = self.shard, ?at, refusing, "recipient refusing data");
        self.announce_refusing(at, refusing);
    }

    fn announce_refusing(&mut self, at: ChannelRef, refusing: bool) {
        self.relay.set_refusing(at, refusing);
        for shard in (0..self.shards).filter(|s| *s != self.shard) {
            self.to_shards
                .push_back((shard, Envelope::Refusing { at, refusing }));
        }
    }

    /// Holds back or gives back `octets` of the sending channel `at`'s window, here or on its
    /// own shard.
    pub(super) fn adjust_window(&mut self, at: ChannelRef, octets: u32, withhold: bool) {
        if !withhold {
            // What is given back must have been held back first.
            if let Some((pending, sum)) = self.withholding.take() {
                self.adjust_window(pending, sum, true);
            }
        }
        if at.shard != self.shard {
            self.to_shards.push_back((
                at.shard,
                Envelope::Window {
                    at,
                    octets,
                    withhold,
                },
            ));
            return;
        }
        let Some(c) = self.conns.get_mut(&at.conn) else {
            return;
        };
        if withhold {
            c.session.withhold_window(at.channel, octets);
        } else {
            c.session.release_window(at.channel, octets);
            // The SEQ that reopens the window is output.
            self.wake(at.conn);
        }
    }
}

/// Adds `octets` given back to `source` to `released`, in one entry with the last one when it
/// is for the same channel (the usual run of one sender's data).
fn add_to(released: &mut Vec<(ChannelRef, usize)>, source: ChannelRef, octets: usize) {
    match released.last_mut() {
        Some((at, sum)) if *at == source => *sum += octets,
        _ => released.push((source, octets)),
    }
}

/// A payload's size as window octets (payloads beyond 2^31 cannot be framed anyway).
fn window_octets(octets: usize) -> u32 {
    u32::try_from(octets).unwrap_or(u32::MAX)
}
