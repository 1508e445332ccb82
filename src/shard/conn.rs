//! The connection driver: one task per TCP connection. Reads into the connection's buffer,
//! hands the octets to the shard core (which runs the session, the relay and backpressure),
//! carries out what the core asks (wake other connections, envelopes to other shards, data
//! to mesh links), and writes what the core polls for this connection, coalesced into one
//! write per round. It never parses payloads and never decides.
//!
//! It also owns the connection's buffers, and keeps an idle connection's small: a read after a
//! wait lands in the shard's one landing buffer and is copied to a read buffer of its size,
//! and before each wait the read buffer and the write buffer let go of the memory they do not
//! hold data in (what a peer sent of a frame's start stays). A connection grows a chunk of read
//! room only while input keeps coming.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use apex_proto::apex::relay::{ConnId, ConnKind};
use apex_proto::beep::mgmt::{code, ErrorElement};
use apex_proto::beep::output::{self, Vectored};
use apex_proto::ProtocolError;
use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::warn;

use crate::shard::notify::Notify;
use crate::shard::session_log::{self, Port, Traffic};
use crate::shard::ShardContext;
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

enum Wake {
    Read(std::io::Result<usize>),
    Output,
    Stop,
}

/// Drives one accepted connection until it ends.
pub async fn drive(stream: TcpStream, ctx: Rc<ShardContext>, kind: ConnKind) -> Ending {
    let peer = stream.peer_addr().ok();
    let opened = {
        let mut core = ctx.core.borrow_mut();
        let now = Instant::now();
        if ctx.connections.get() > ctx.config.runtime.max_connections {
            let error = ErrorElement::new(code::SERVICE_NOT_AVAILABLE, "too many connections");
            ctx.refused_capacity.set(ctx.refused_capacity.get() + 1);
            core.open_refusing(kind, error, now)
        } else {
            core.open(kind, peer.map(|p| p.ip()), now)
        }
    };
    let Some(conn) = opened else {
        // Every slot of the shard is taken: nothing to say to the peer.
        if ctx.may_warn(peer) {
            warn!(shard = ctx.id, ?peer, "no room for another connection");
        }
        let _ = sys::reset_on_close(stream.as_fd());
        return Ending::Aborted;
    };
    serve(stream, ctx, conn, peer, Port::accepted(kind)).await
}

/// Drives `conn`, the shard core's session of `stream` (an accepted connection, or an
/// outbound relay link's, as `port` says), until it ends; then tells the core and closes the
/// transport. The session's start and end are logged (`session_log`).
pub async fn serve(
    mut stream: TcpStream,
    ctx: Rc<ShardContext>,
    conn: ConnId,
    peer: Option<SocketAddr>,
    port: Port,
) -> Ending {
    let started = Instant::now();
    session_log::started(ctx.id, conn, port, peer);
    let _ = stream.set_nodelay(true);
    let wake = Rc::new(Notify::default());
    ctx.wakers.borrow_mut().insert(conn, wake.clone());
    ctx.dispatch();

    let mut traffic = Traffic::default();
    let ending = run(&mut stream, conn, &wake, &ctx, &mut traffic).await;

    ctx.wakers.borrow_mut().remove(&conn);
    let summary = ctx.core.borrow().session_summary(conn);
    ctx.core.borrow_mut().close(conn, Instant::now());
    ctx.dispatch();
    match ending {
        Ending::Aborted => {
            let _ = sys::reset_on_close(stream.as_fd());
        }
        _ => {
            let _ = stream.shutdown(std::net::Shutdown::Both).await;
        }
    }
    if let Some(error) = &traffic.error {
        if ctx.may_warn(peer) {
            warn!(shard = ctx.id, %conn, ?peer, %error, "terminating session");
        }
    }
    session_log::ended(&session_log::Ended {
        shard: ctx.id,
        conn,
        port,
        peer,
        ending: &ending,
        duration: started.elapsed(),
        traffic: &traffic,
        summary: summary.as_ref(),
    });
    ending
}

async fn run(
    stream: &mut TcpStream,
    conn: ConnId,
    wake: &Notify,
    ctx: &Rc<ShardContext>,
    traffic: &mut Traffic,
) -> Ending {
    let read_chunk = ctx.config.runtime.read_chunk;
    // Empty until input arrives: an idle connection holds no read room.
    let mut read_buf = BytesMut::new();
    // A read after a wait goes through glommio's `read`, which wants an initialised slice: it
    // lands in the shard's landing buffer and what arrived is copied to `read_buf` (whose
    // frames are then split off as `Bytes`). When a read filled all the room it had, more is
    // probably waiting: that is received straight into `read_buf`, with no copy. After a large
    // burst the wait reads a single octet, so that the next burst is received directly too.
    let mut pacing = ReadPacing::default();
    let mut out = Vectored::new(SHARED_PAYLOAD_MIN);
    let mut parts = Vec::new();
    let stop = ctx.shutdown.acquire(1);
    futures_lite::pin!(stop);
    let mut closing_since: Option<Instant> = None;
    let grace = Duration::from_millis(ctx.config.shutdown_grace_ms);

    loop {
        let finished = {
            let mut core = ctx.core.borrow_mut();
            if core.has_output(conn) {
                out.make_room(WRITE_ROOM);
            }
            let now = Instant::now();
            while core.poll_transmit(conn, &mut out, now) > 0 {}
            core.is_finished(conn)
        };
        // Writing may have made room for what waited for this connection.
        ctx.dispatch();
        if !out.is_empty() {
            match write_out(stream, &mut out, &mut parts).await {
                Ok(written) => sent(ctx, traffic, written),
                Err(_) => return Ending::PeerClosed,
            }
        }
        if finished {
            return Ending::Released;
        }

        // Backpressure between shards: while envelopes for another shard pile up faster than
        // it takes them, the shard's connections stop reading (their peers' windows close).
        // Backpressure towards one recipient is the core's: it holds back the windows of the
        // channels that send to it, and no one else's. Shutdown is not held up.
        let keep_reading = || closing_since.is_some() || ctx.stopping();
        let gate = future::or(
            async {
                ctx.outbox_backlog.wait(keep_reading).await;
                true
            },
            async {
                wake.notified().await;
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
                    received(ctx, traffic, n);
                    let yield_first = pacing.after_direct_read(n, room);
                    if let Err(error) = handle_input(conn, ctx, &mut read_buf) {
                        traffic.error = Some(error);
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
        // Waiting may take hours: hold only what holds data meanwhile.
        trim_read_buffer(&mut read_buf);
        out.release();
        let wait_room = pacing.wait_room(read_chunk);
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
        let woken = future::or(
            future::or(
                async { Wake::Read(land(stream, &ctx.landing, &mut read_buf, wait_room).await) },
                async {
                    wake.notified().await;
                    Wake::Output
                },
            ),
            stop_or_grace,
        )
        .await;
        let n = match woken {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return Ending::PeerClosed,
            Wake::Read(Ok(n)) => n,
            Wake::Output => continue,
            Wake::Stop => {
                if closing_since.is_some() {
                    return Ending::GraceExpired;
                }
                // Shutdown: ask the peer to release the session (RFC 3080 §2.4).
                closing_since = Some(Instant::now());
                ctx.core
                    .borrow_mut()
                    .close_session(conn, code::SERVICE_NOT_AVAILABLE);
                continue;
            }
        };
        received(ctx, traffic, n);
        if wait_room < read_chunk {
            // A probe: the rest is received in place, and handled with it. There may be no
            // rest (the octet may complete a frame), or the peer may have closed right after
            // it: the octet is handled first, and the next read sees the end.
            let (more, room) = match receive(stream, &mut read_buf, read_chunk) {
                Ok(Some((more, room))) if more > 0 => (more, room),
                _ => (0, 1), // nothing more: as a short read
            };
            received(ctx, traffic, more);
            pacing.after_read(n + more, wait_room + room);
        } else {
            pacing.after_read(n, wait_room);
        }
        if let Err(error) = handle_input(conn, ctx, &mut read_buf) {
            traffic.error = Some(error);
            return Ending::Aborted;
        }
    }
}

/// Waits for input and receives up to `room` octets of it into `landing`, the shard's landing
/// buffer, then appends them to `read_buf`. The landing buffer is borrowed only within a poll
/// (glommio's read uses the slice it is given only while it is polled, never later), so every
/// connection of the shard lands in the same memory, which stays in the cache; `read_buf`
/// grows by what arrived, no more.
async fn land(
    stream: &mut TcpStream,
    landing: &RefCell<Vec<u8>>,
    read_buf: &mut BytesMut,
    room: usize,
) -> std::io::Result<usize> {
    future::poll_fn(|cx| {
        let mut landing = landing.borrow_mut();
        let room = room.min(landing.len());
        let n = ready!(Pin::new(&mut *stream).poll_read(cx, &mut landing[..room]))?;
        read_buf.extend_from_slice(&landing[..n]);
        Poll::Ready(Ok(n))
    })
    .await
}

/// Before a wait: lets the read buffer's memory go but for what it holds. An empty buffer
/// (every frame handled) is dropped; the start of a frame of up to [`MIN_DIRECT_ROOM`]
/// octets, in a buffer with more room than that, is moved to a buffer of its own size (a
/// peer that sends part of a frame and stops pins what it sent, not a chunk). A longer start
/// stays where it is: copying it on every wait would cost the stream of large frames it
/// belongs to, and it already holds most of its buffer.
fn trim_read_buffer(read_buf: &mut BytesMut) {
    if read_buf.is_empty() {
        *read_buf = BytesMut::new();
    } else if read_buf.len() <= MIN_DIRECT_ROOM
        && read_buf.capacity() - read_buf.len() > MIN_DIRECT_ROOM
    {
        *read_buf = BytesMut::from(&read_buf[..]);
    }
}

/// Counts `n` octets read: for the connection's end-of-session line and the shard's metrics.
fn received(ctx: &ShardContext, traffic: &mut Traffic, n: usize) {
    traffic.octets_in += n as u64;
    ctx.count_in(n);
}

/// Counts `n` octets written.
fn sent(ctx: &ShardContext, traffic: &mut Traffic, n: usize) {
    traffic.octets_out += n as u64;
    ctx.count_out(n);
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

    /// How much of the landing buffer's `chunk` octets a read after a wait may fill. What it
    /// gets is copied to the read buffer, and large copies cost more than a second receive:
    /// when the last burst was large, the wait reads one octet and the rest is received
    /// straight into the read buffer (one more receive, no copy). Small bursts are cheaper
    /// copied than received twice.
    fn wait_room(&self, chunk: usize) -> usize {
        if self.probe {
            1
        } else {
            chunk
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

/// Feeds what was read to the shard core and carries out what it leads to. `Err` when the
/// session must be terminated (the driver warns, within the peer's warning budget).
fn handle_input(
    conn: ConnId,
    ctx: &Rc<ShardContext>,
    read_buf: &mut BytesMut,
) -> Result<(), ProtocolError> {
    // What was read arrived after everything the store had published when the read
    // completed: an access change acknowledged before it is in force for it.
    ctx.follow_access();
    let input = ctx
        .core
        .borrow_mut()
        .handle_input(conn, read_buf, Instant::now());
    ctx.dispatch();
    input
}

/// Payloads from this size on are written from where they were received rather than copied
/// into the write buffer; below it, the copy is cheaper than another slice for the kernel.
pub const SHARED_PAYLOAD_MIN: usize = 1024;

/// Writes everything `out` holds: headers and small frames coalesced, large payloads from
/// their own memory, in one vectored send when the socket takes it all. `parts` is scratch
/// space kept between calls. Returns the octets written.
pub(crate) async fn write_out(
    stream: &mut TcpStream,
    out: &mut Vectored,
    parts: &mut Vec<Bytes>,
) -> std::io::Result<usize> {
    out.take(parts);
    let mut offset = 0;
    let mut written = 0;
    let result = loop {
        let sent = match parts.len() {
            0 => break Ok(written),
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
            Ok(n) => {
                written += n;
                output::advance(parts, &mut offset, n)
            }
            Err(e) => break Err(e),
        }
    };
    parts.clear();
    result
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

    /// Before a wait, the read buffer keeps memory only for what it holds: none when every
    /// frame was handled, the size of a short frame start, and a long start where it is.
    #[test]
    fn a_waiting_connection_keeps_read_memory_only_for_what_it_holds() {
        const CHUNK: usize = 64 * 1024;
        // Handled: nothing of the chunk is kept, whether or not its frames are alive.
        for keep_frames in [false, true] {
            let mut read_buf = BytesMut::with_capacity(CHUNK);
            read_buf.extend_from_slice(&[b'x'; 3000]);
            let frames = read_buf.split().freeze();
            trim_read_buffer(&mut read_buf);
            assert_eq!(read_buf.capacity(), 0, "an empty buffer is let go");
            if keep_frames {
                assert_eq!(frames.len(), 3000);
            }
        }

        // The start of a frame, in a chunk: moved to a buffer of its size.
        let mut read_buf = BytesMut::with_capacity(CHUNK);
        read_buf.extend_from_slice(&[b'y'; 5000]);
        let frames = read_buf.split_to(4900).freeze();
        trim_read_buffer(&mut read_buf);
        assert_eq!(&read_buf[..], &[b'y'; 100][..]);
        assert_eq!(read_buf.capacity(), 100, "a short start keeps its size");
        drop(frames);
        // Already its size: not moved again.
        let at = read_buf.as_ptr();
        trim_read_buffer(&mut read_buf);
        assert_eq!(read_buf.as_ptr(), at);

        // A long start (of a large frame still arriving) stays where it is.
        let mut read_buf = BytesMut::with_capacity(CHUNK);
        read_buf.extend_from_slice(&[b'z'; MIN_DIRECT_ROOM + 1]);
        let at = read_buf.as_ptr();
        trim_read_buffer(&mut read_buf);
        assert_eq!(read_buf.as_ptr(), at);
        assert_eq!(read_buf.len(), MIN_DIRECT_ROOM + 1);
    }

    /// Two connections waiting at once land in the one landing buffer: each read buffer gets
    /// its own octets and grows by them only, and the landing buffer is free between polls.
    #[test]
    fn connections_waiting_at_once_share_the_landing_buffer() {
        let got = glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .ring_depth(64)
            .spawn(|| async {
                let (listener, _socket) = sys::listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
                let addr = listener.local_addr().unwrap();
                let first = std::net::TcpStream::connect(addr).unwrap();
                let mut a = listener.accept().await.unwrap();
                let second = std::net::TcpStream::connect(addr).unwrap();
                let mut b = listener.accept().await.unwrap();
                let landing = RefCell::new(vec![0u8; 64 * 1024]);
                let (mut buf_a, mut buf_b) = (BytesMut::new(), BytesMut::new());
                let client = std::thread::spawn(move || {
                    use std::io::Write;
                    // Both reads are pending before either connection has input.
                    std::thread::sleep(Duration::from_millis(50));
                    (&second).write_all(b"second").unwrap();
                    (&first).write_all(b"first!!").unwrap();
                    (first, second)
                });
                let (na, nb) = future::zip(
                    land(&mut a, &landing, &mut buf_a, 64 * 1024),
                    land(&mut b, &landing, &mut buf_b, 64 * 1024),
                )
                .await;
                let _ = client.join().unwrap();
                assert!(
                    landing.try_borrow_mut().is_ok(),
                    "the landing buffer is free"
                );
                (na.unwrap(), buf_a, nb.unwrap(), buf_b)
            })
            .unwrap()
            .join()
            .unwrap();
        let (na, buf_a, nb, buf_b) = got;
        assert_eq!((na, &buf_a[..]), (7, &b"first!!"[..]));
        assert_eq!((nb, &buf_b[..]), (6, &b"second"[..]));
        assert!(
            buf_a.capacity() < 64 && buf_b.capacity() < 64,
            "read buffers grow by what arrived: {} and {} octets",
            buf_a.capacity(),
            buf_b.capacity()
        );
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
