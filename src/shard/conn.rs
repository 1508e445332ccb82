//! The connection driver: one task per TCP connection. Reads into the connection's buffer, feeds
//! the BEEP session, hands APEX events to the shard's relay, executes the relay's actions (which
//! may queue output on other connections of the shard and wake them), and writes what the
//! session polls, coalesced into one write per round. It never parses payloads itself.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use apex_proto::apex::relay::{domain_shard, Action, ConnId, ConnKind, Envelope};
use apex_proto::beep::mgmt::{code, ErrorElement};
use apex_proto::beep::output::{self, Vectored};
use apex_proto::{Event, Misuse, Role, Session};
use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::{debug, warn};

use crate::apex_profile::APEX_PROFILE;
use crate::shard::notify::Notify;
use crate::shard::{peer, ShardContext};
use crate::sys::{self, StreamFd as _};

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Released by agreement (RFC 3080 §2.4) or refused at greeting.
    Released,
    /// The peer closed or reset the transport.
    PeerClosed,
    /// Terminated for a protocol violation: aborted with a reset (RFC 3081 §2).
    Aborted,
    /// Shutdown grace expired before the peer agreed to close.
    GraceExpired,
}

/// What other tasks of the shard may touch of a connection: its session (to queue output) and
/// its wake-up flag.
#[derive(Debug)]
pub struct ConnShared {
    /// The BEEP session.
    pub session: RefCell<Session>,
    /// Woken when output was queued by another task.
    pub wake: Notify,
    /// Relay MSGs that did not fit the session's outstanding limit, in order. While any
    /// connection of the shard has some, the shard stops reading new input elsewhere
    /// (backpressure), so this stays bounded by what was already read.
    pub overflow: RefCell<VecDeque<(u32, Bytes)>>,
}

enum Wake {
    Read(std::io::Result<usize>),
    Output,
    Stop,
}

/// Drives one accepted connection until it ends.
pub async fn drive(mut stream: TcpStream, ctx: Rc<ShardContext>, kind: ConnKind) -> Ending {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let session = if ctx.connections.get() > ctx.config.runtime.max_connections {
        Session::new_refusing(
            ctx.session_config.clone(),
            ErrorElement::new(code::SERVICE_NOT_AVAILABLE, "too many connections"),
        )
    } else {
        Session::new(Role::Listener, ctx.session_config.clone())
    };
    let conn = ctx.next_conn_id();
    let shared = Rc::new(ConnShared {
        session: RefCell::new(session),
        wake: Notify::default(),
        overflow: RefCell::new(VecDeque::new()),
    });
    ctx.conns.borrow_mut().insert(conn, shared.clone());
    ctx.relay.borrow_mut().conn_opened(conn, kind);

    let ending = run(&mut stream, conn, &shared, &ctx).await;

    ctx.conns.borrow_mut().remove(&conn);
    if !shared.overflow.borrow().is_empty() {
        shared.overflow.borrow_mut().clear();
        ctx.backlogged.remove();
    }
    ctx.relay.borrow_mut().conn_closed(conn);
    execute_actions(&ctx);
    match ending {
        Ending::Aborted => {
            let _ = sys::reset_on_close(stream.as_fd());
        }
        _ => {
            let _ = stream.shutdown(std::net::Shutdown::Both).await;
        }
    }
    debug!(?peer, ?ending, shard = ctx.id, conn, "connection ended");
    ending
}

async fn run(
    stream: &mut TcpStream,
    conn: ConnId,
    shared: &ConnShared,
    ctx: &Rc<ShardContext>,
) -> Ending {
    let read_chunk = ctx.config.runtime.read_chunk;
    let mut read_buf = BytesMut::with_capacity(read_chunk);
    // A read after a wait goes through glommio's `read`, which wants an initialised slice: it
    // lands in this scratch buffer and what arrived is copied to `read_buf` (whose frames are
    // then split off as `Bytes`). When a read filled all the room it had, more is probably
    // waiting: that is received straight into `read_buf`, with no copy. After a large burst
    // the wait reads a single octet, so that the next burst is received directly too.
    let mut scratch = vec![0u8; read_chunk];
    let mut pacing = ReadPacing::default();
    let mut out = Vectored::new(SHARED_PAYLOAD_MIN);
    let mut parts = Vec::new();
    let stop = ctx.shutdown.acquire(1);
    futures_lite::pin!(stop);
    let mut closing_since: Option<Instant> = None;
    let grace = Duration::from_millis(ctx.config.shutdown_grace_ms);

    loop {
        let finished = {
            let mut session = shared.session.borrow_mut();
            if session.has_output() {
                out.make_room(WRITE_ROOM);
            }
            while session.poll_transmit(&mut out) > 0 {}
            session.is_finished()
        };
        if !out.is_empty() && write_out(stream, &mut out, &mut parts).await.is_err() {
            return Ending::PeerClosed;
        }
        if finished {
            return Ending::Released;
        }

        // Backpressure: while some connection of the shard cannot take more relay output, or
        // envelopes for another shard pile up faster than it takes them, the others stop
        // reading (their peers' windows close). A backlogged connection keeps reading: its
        // replies are what drains it. Output queued for a connection held here is still
        // written, since its peer's replies may be what clears the backlog. Shutdown is not
        // held up.
        let keep_reading =
            || !shared.overflow.borrow().is_empty() || closing_since.is_some() || ctx.stopping();
        let gate = future::or(
            async {
                ctx.backlogged.wait(keep_reading).await;
                ctx.outbox_backlog.wait(keep_reading).await;
                true
            },
            async {
                shared.wake.notified().await;
                false
            },
        );
        if !gate.await {
            continue;
        }
        if pacing.read_directly() && closing_since.is_none() && !ctx.stopping() {
            match receive(stream, &mut read_buf, read_chunk) {
                Ok(Some((0, _))) | Err(_) => return Ending::PeerClosed,
                Ok(Some((n, room))) => {
                    let yield_first = pacing.after_direct_read(n, room);
                    if handle_input(conn, shared, ctx, &mut read_buf).is_err() {
                        return Ending::Aborted;
                    }
                    if yield_first {
                        future::yield_now().await;
                    }
                    continue;
                }
                Ok(None) => {}
            }
        }
        pacing.before_waiting();
        let wait_room = pacing.wait_room(scratch.len());
        // Until shutdown, the shard's stop signal ends the wait; while closing, the grace
        // period's end does.
        let stop_or_grace = async {
            match closing_since {
                None => {
                    let _ = (&mut stop).await;
                }
                Some(since) => glommio::timer::sleep(grace.saturating_sub(since.elapsed())).await,
            }
            Wake::Stop
        };
        let wake = future::or(
            future::or(
                async { Wake::Read(stream.read(&mut scratch[..wait_room]).await) },
                async {
                    shared.wake.notified().await;
                    Wake::Output
                },
            ),
            stop_or_grace,
        )
        .await;
        let n = match wake {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return Ending::PeerClosed,
            Wake::Read(Ok(n)) => n,
            Wake::Output => continue,
            Wake::Stop => {
                if closing_since.is_some() {
                    return Ending::GraceExpired;
                }
                // Shutdown: ask the peer to release the session (RFC 3080 §2.4).
                closing_since = Some(Instant::now());
                let _ = shared
                    .session
                    .borrow_mut()
                    .close_session(code::SERVICE_NOT_AVAILABLE);
                continue;
            }
        };
        read_buf.extend_from_slice(&scratch[..n]);
        if wait_room < scratch.len() {
            // A probe: the rest is received in place, and handled with it. There may be no
            // rest (the octet may complete a frame), or the peer may have closed right after
            // it: the octet is handled first, and the next read sees the end.
            let (more, room) = match receive(stream, &mut read_buf, read_chunk) {
                Ok(Some((more, room))) if more > 0 => (more, room),
                _ => (0, 1), // nothing more: as a short read
            };
            pacing.after_read(n + more, wait_room + room);
        } else {
            pacing.after_read(n, wait_room);
        }
        if handle_input(conn, shared, ctx, &mut read_buf).is_err() {
            return Ending::Aborted;
        }
    }
}

/// Receives what is waiting on `stream` into `read_buf`, without waiting: `Some((n, room))`,
/// the octets received and the room they had (`n` is 0 when the peer closed), or `None` when
/// nothing was waiting.
fn receive(
    stream: &TcpStream,
    read_buf: &mut BytesMut,
    read_chunk: usize,
) -> std::io::Result<Option<(usize, usize)>> {
    make_read_room(read_buf, read_chunk);
    let room = (read_buf.capacity() - read_buf.len()).min(read_chunk);
    Ok(sys::recv_into(stream.as_fd(), read_buf, room)?.map(|n| (n, room)))
}

/// Makes room for a direct read once less than [`MIN_DIRECT_ROOM`] is left. Room is made a
/// chunk at a time, not on every read: while payloads split off earlier are alive the buffer
/// cannot be reused, and growing it means a new one.
///
/// The octets already there are the start of a frame. Asking for a whole chunk on top of them
/// would outgrow a buffer of one chunk whenever a read ended mid-frame, and growing a buffer
/// nothing else holds copies all of it, the octets already handled included. So a short start
/// (up to [`MIN_DIRECT_ROOM`], the usual case) is given a chunk counting itself, which reuses
/// a free buffer from its start; a longer one (the start of a large frame) is copied to a new
/// buffer with a whole chunk of room after it, so that each read still takes a chunk.
fn make_read_room(read_buf: &mut BytesMut, read_chunk: usize) {
    if read_buf.capacity() - read_buf.len() >= MIN_DIRECT_ROOM {
        return;
    }
    let started = read_buf.len();
    if started <= MIN_DIRECT_ROOM {
        read_buf.reserve(read_chunk.saturating_sub(started).max(MIN_DIRECT_ROOM));
    } else {
        let mut fresh = BytesMut::with_capacity(started + read_chunk);
        fresh.extend_from_slice(read_buf);
        *read_buf = fresh;
    }
}

/// A burst of input (octets read between two waits) from which the next wait only probes for
/// input: copying this much costs more than a second receive.
const LARGE_BURST: usize = 32 * 1024;

/// Reads straight from the socket a connection's task makes before it yields to the others.
const READS_BEFORE_YIELDING: u32 = 16;

/// How a connection reads next: straight from the socket, or by waiting for input.
///
/// A read that filled all the room it had most likely left more behind, so the next one is
/// made at once, straight into the read buffer. One that got less found the socket empty: the
/// next read waits (glommio then polls), rather than asking the kernel for nothing. A peer that
/// always has more waiting would never let its task wait, so every
/// [`READS_BEFORE_YIELDING`] reads in a row the task lets the shard's others run first.
#[derive(Debug, Default)]
struct ReadPacing {
    more_waiting: bool,
    reads_without_waiting: u32,
    /// Octets read since the task last waited.
    burst: usize,
    /// Whether the next wait reads a single octet (see [`ReadPacing::wait_room`]).
    probe: bool,
}

impl ReadPacing {
    /// Whether the next read should go straight to the socket.
    fn read_directly(&self) -> bool {
        self.more_waiting
    }

    /// How much of the `scratch` octets a read after a wait may fill. What it gets is copied to
    /// the read buffer, and with many connections those copies miss the cache: when the last
    /// burst was large, the wait reads one octet and the rest is received straight into the
    /// read buffer (one more receive, no copy). Small bursts are cheaper copied than received
    /// twice.
    fn wait_room(&self, scratch: usize) -> usize {
        if self.probe {
            1
        } else {
            scratch
        }
    }

    /// After any read of `n` octets into `room`.
    fn after_read(&mut self, n: usize, room: usize) {
        self.more_waiting = n >= room;
        self.burst += n;
    }

    /// After a direct read: whether the task should yield before its next read.
    fn after_direct_read(&mut self, n: usize, room: usize) -> bool {
        self.after_read(n, room);
        self.reads_without_waiting += 1;
        if self.reads_without_waiting == READS_BEFORE_YIELDING {
            self.reads_without_waiting = 0;
            return true;
        }
        false
    }

    /// The task is about to wait: whatever it read before, it has let the others run.
    fn before_waiting(&mut self) {
        self.reads_without_waiting = 0;
        self.probe = self.burst >= LARGE_BURST;
        self.burst = 0;
    }
}

/// Coalescing space made before a round of output: enough for a window's worth of small
/// frames, so the write buffer rarely grows (and copies) in the middle of a round.
pub(crate) const WRITE_ROOM: usize = 32 * 1024;

/// Below this much room in the read buffer, a direct read first makes a chunk's worth.
const MIN_DIRECT_ROOM: usize = 4096;

/// Feeds what was read to the session and runs what it leads to. `Err` when the session must
/// be terminated.
fn handle_input(
    conn: ConnId,
    shared: &ConnShared,
    ctx: &Rc<ShardContext>,
    read_buf: &mut BytesMut,
) -> Result<(), ()> {
    // One clock reading serves the session and the relay: a batch of input is one moment.
    let now = Instant::now();
    let input = shared.session.borrow_mut().handle_input(read_buf, now);
    if let Err(error) = input {
        warn!(shard = ctx.id, conn, %error, "terminating session");
        return Err(());
    }
    handle_events(conn, shared, ctx, ctx.ms_at(now));
    drain_overflow(conn, shared, ctx);
    execute_actions(ctx);
    Ok(())
}

/// Payloads from this size on are written from where they were received rather than copied
/// into the write buffer; below it, the copy is cheaper than another slice for the kernel.
pub const SHARED_PAYLOAD_MIN: usize = 1024;

/// Writes everything `out` holds: headers and small frames coalesced, large payloads from
/// their own memory, in one vectored send when the socket takes it all. `parts` is scratch
/// space kept between calls.
pub(crate) async fn write_out(
    stream: &mut TcpStream,
    out: &mut Vectored,
    parts: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    out.take(parts);
    let mut offset = 0;
    let result = loop {
        let sent = match parts.len() {
            0 => break Ok(()),
            1 => stream.write(&parts[0][offset..]).await,
            _ => match sys::send_vectored(stream.as_fd(), &output::io_slices(parts, offset)) {
                Ok(Some(n)) => Ok(n),
                // No room: glommio's write waits for some, then sends part of the first part.
                Ok(None) => stream.write(&parts[0][offset..]).await,
                Err(e) => Err(e),
            },
        };
        match sent {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => output::advance(parts, &mut offset, n),
            Err(e) => break Err(e),
        }
    };
    parts.clear();
    result
}

/// Moves held relay MSGs into the session as replies free room.
fn drain_overflow(conn: ConnId, shared: &ConnShared, ctx: &ShardContext) {
    let mut overflow = shared.overflow.borrow_mut();
    if overflow.is_empty() {
        return;
    }
    let mut session = shared.session.borrow_mut();
    while let Some((channel, payload)) = overflow.pop_front() {
        match session.try_send_msg(channel, payload) {
            Ok(_) => {}
            Err((Misuse::TooManyOutstanding(_), payload)) => {
                overflow.push_front((channel, payload));
                return;
            }
            Err(_) => {
                ctx.relay
                    .borrow_mut()
                    .send_failed(conn, channel, ENDPOINT_GONE);
            }
        }
    }
    ctx.backlogged.remove();
}

/// Hands the session's events to the relay, one at a time as they are polled: the relay answers
/// into this session directly and queues the rest as actions, which run after both borrows
/// end, so nothing needs collecting first.
fn handle_events(conn: ConnId, shared: &ConnShared, ctx: &ShardContext, now_ms: u64) {
    let mut relay = ctx.relay.borrow_mut();
    relay.set_now(now_ms);
    let mut session = shared.session.borrow_mut();
    while let Some(event) = session.poll_event() {
        if let Some(Event::CloseRefused { channel: 0, .. }) =
            relay.handle_session_event(conn, &mut session, event)
        {
            debug!(conn, "peer declined session release");
        }
    }
}

/// Why a delivery the session refused failed, in the report its originator asked for.
const ENDPOINT_GONE: &str = "endpoint went away";

/// Executes the relay's actions until none is left. Output for other connections wakes them;
/// envelopes for other shards go to that shard's outbox, sent in order by its flusher task.
/// Nothing here waits, so no task holds up another while actions are pending.
pub fn execute_actions(ctx: &Rc<ShardContext>) {
    // The connection of the last Send: a batch of input from one sender usually delivers
    // everything to one recipient, so the table is looked up once per run of Sends. Nothing
    // here removes a connection from it.
    let mut last_send: Option<(ConnId, Rc<ConnShared>)> = None;
    loop {
        let Some(action) = ctx.relay.borrow_mut().poll_action() else {
            return;
        };
        match action {
            Action::Reply { conn, reply } => {
                ctx.with_session(conn, |s| {
                    let _ = reply.send_in(s);
                });
            }
            Action::StartReply {
                conn,
                start_id,
                content,
            } => {
                let channel = ctx.with_session(conn, |s| {
                    s.accept_start(start_id, APEX_PROFILE, Some(content)).ok()
                });
                if channel.flatten().is_none() {
                    debug!(conn, start_id, "start answered after its connection ended");
                }
            }
            Action::Send {
                conn,
                channel,
                payload,
            } => {
                let shared = match &last_send {
                    Some((last, shared)) if *last == conn => shared,
                    _ => {
                        let Some(shared) = ctx.conns.borrow().get(&conn).cloned() else {
                            ctx.relay
                                .borrow_mut()
                                .send_failed(conn, channel, ENDPOINT_GONE);
                            continue;
                        };
                        &last_send.insert((conn, shared)).1
                    }
                };
                let mut overflow = shared.overflow.borrow_mut();
                let result = if overflow.is_empty() {
                    shared.session.borrow_mut().try_send_msg(channel, payload)
                } else {
                    Err((Misuse::TooManyOutstanding(channel), payload)) // keep the order
                };
                match result {
                    Ok(_) => shared.wake.notify(),
                    Err((Misuse::TooManyOutstanding(_), payload)) => {
                        if overflow.is_empty() {
                            ctx.backlogged.add();
                            // Its driver may be held back by the other shards' envelopes:
                            // with overflow of its own it must read its peer's replies.
                            shared.wake.notify();
                        }
                        overflow.push_back((channel, payload));
                    }
                    Err(_) => {
                        // The channel is closing or went away: reports still flow.
                        drop(overflow);
                        ctx.relay
                            .borrow_mut()
                            .send_failed(conn, channel, ENDPOINT_GONE);
                    }
                }
            }
            Action::ToShard { shard, envelope } => ctx.post(shard, envelope),
            Action::Forward { domain, payload } => {
                let owner = domain_shard(&domain, ctx.config.shard_count());
                if owner == ctx.id || ctx.mesh.is_none() {
                    peer::enqueue(ctx, domain, payload);
                } else {
                    let envelope = Envelope::Forward { domain, payload };
                    ctx.post(owner, envelope);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read buffer of one chunk, its frames handled, the start of a frame at its end. A short
    /// start is moved to the front of the same buffer when nothing else holds it (only the start
    /// is copied), or to a new one of a chunk while frames split off it are alive; a long start
    /// gets a new buffer with a whole chunk of room after it. The buffer never grows past a
    /// chunk plus the start it holds.
    #[test]
    fn read_room_is_a_chunk_and_copies_only_the_start_of_a_frame() {
        const CHUNK: usize = 64 * 1024;
        // Fills the room, then splits off all but `started` octets: the frames read.
        let filled = |read_buf: &mut BytesMut, started: usize| {
            let room = read_buf.capacity() - read_buf.len();
            read_buf.extend((0..room).map(|i| i as u8));
            read_buf.split_to(read_buf.len() - started).freeze()
        };
        let check = |read_buf: &BytesMut, start: &[u8], room: usize| {
            assert_eq!(read_buf[..], start[..], "the start of the frame is kept");
            assert!(read_buf.capacity() - read_buf.len() >= room);
            assert!(
                read_buf.capacity() <= start.len() + CHUNK,
                "the buffer grew to {} octets",
                read_buf.capacity()
            );
        };

        // A short start, the frames dropped: the same memory, from its start.
        let mut read_buf = BytesMut::with_capacity(CHUNK);
        let base = read_buf.as_ptr();
        let frames = filled(&mut read_buf, 100);
        let start = read_buf.to_vec();
        drop(frames);
        make_read_room(&mut read_buf, CHUNK);
        check(&read_buf, &start, CHUNK - 100);
        assert_eq!(read_buf.as_ptr(), base, "a free buffer is reused");

        // A short start, the frames alive: another buffer of a chunk.
        let frames = filled(&mut read_buf, 100);
        let start = read_buf.to_vec();
        make_read_room(&mut read_buf, CHUNK);
        check(&read_buf, &start, CHUNK - 100);
        drop(frames);

        // A long start, whether or not the frames are alive: a whole chunk after it.
        for keep_frames in [false, true] {
            let frames = filled(&mut read_buf, 40_000);
            let start = read_buf.to_vec();
            if !keep_frames {
                drop(frames);
                make_read_room(&mut read_buf, CHUNK);
            } else {
                make_read_room(&mut read_buf, CHUNK);
                drop(frames);
            }
            check(&read_buf, &start, CHUNK);
        }
    }

    #[test]
    fn a_read_that_fills_its_room_is_followed_by_a_direct_one() {
        let mut pacing = ReadPacing::default();
        assert!(!pacing.read_directly(), "a new connection waits for input");
        pacing.after_read(100, 4096);
        assert!(
            !pacing.read_directly(),
            "a short read found the socket empty"
        );
        pacing.after_read(4096, 4096);
        assert!(pacing.read_directly());
        assert!(!pacing.after_direct_read(1000, 4096));
        assert!(
            !pacing.read_directly(),
            "a short direct read drains the socket"
        );
    }

    #[test]
    fn after_a_large_burst_the_next_wait_only_probes() {
        let mut pacing = ReadPacing::default();
        assert_eq!(
            pacing.wait_room(65536),
            65536,
            "a new connection reads in full"
        );
        pacing.after_read(LARGE_BURST - 1, 65536);
        pacing.before_waiting();
        assert_eq!(pacing.wait_room(65536), 65536, "a small burst is copied");
        // A full read and a direct one make a large burst.
        pacing.after_read(LARGE_BURST / 2, LARGE_BURST / 2);
        assert!(pacing.read_directly());
        assert!(!pacing.after_direct_read(LARGE_BURST / 2, 65536));
        pacing.before_waiting();
        assert_eq!(pacing.wait_room(65536), 1);
        // The probe's octet fills its room: the rest is read directly.
        pacing.after_read(1, 1);
        assert!(pacing.read_directly());
        assert!(!pacing.after_direct_read(5000, 65536));
        pacing.before_waiting();
        assert_eq!(
            pacing.wait_room(65536),
            65536,
            "the burst is counted afresh after each wait"
        );
    }

    #[test]
    fn a_connection_that_never_drains_yields_every_so_many_reads() {
        let mut pacing = ReadPacing::default();
        pacing.after_read(4096, 4096);
        let yields: Vec<u32> = (1..=3 * READS_BEFORE_YIELDING)
            .filter(|_| pacing.after_direct_read(4096, 4096))
            .collect();
        assert_eq!(
            yields,
            [
                READS_BEFORE_YIELDING,
                2 * READS_BEFORE_YIELDING,
                3 * READS_BEFORE_YIELDING
            ]
        );
        assert!(pacing.read_directly());
        // Waiting lets the others run too: the count starts again.
        for _ in 0..READS_BEFORE_YIELDING - 1 {
            assert!(!pacing.after_direct_read(4096, 4096));
        }
        pacing.before_waiting();
        pacing.after_read(4096, 4096);
        for read in 1..READS_BEFORE_YIELDING {
            assert!(
                !pacing.after_direct_read(4096, 4096),
                "yielded after {read} reads"
            );
        }
        assert!(pacing.after_direct_read(4096, 4096));
    }
}
