//! Load over the simple targets (`raw`, `nats`, `mqtt`): one blocking thread per connection.
//!
//! ```text
//!   main:     spawn every endpoint ──► all handshakes done ──► schedule ──► progress each second
//!   sender:   hello ─► (schedule) write batches ≤ 64 KiB (or one message per tick at --rate)
//!             ... measure_end ─► goodbye
//!   receiver: hello + subscribe ─► read, check seq per sender, latency ... every message seen
//! ```
//!
//! Throughput mode: a sender writes batches of up to 64 KiB, stamped with the time the batch
//! was built. For `nats` and `mqtt` it keeps at most `window` messages (and 256 KiB) not yet
//! seen by its receivers (they publish their counts in shared atomics); `raw` relies on TCP
//! back-pressure only. Rate mode: message k of a sender is due at `start + k / rate`, and its
//! latency runs from that due time, not from when it was written (no coordinated omission).
//!
//! Patterns: `pairs` (sender i to receiver i on channel i), `fan-in` (N senders, one receiver,
//! channel 0; the payload's sequence field carries `k * N + sender`), `fan-out` (one sender,
//! N receivers subscribed to channel 0).
//!
//! TLS (`nats` only): the server's INFO arrives in plaintext and says `tls_required`; the
//! client then runs the TLS handshake and sends its CONNECT, and everything after, through it.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;

use crate::driver::Schedule;
use crate::payload::{self, Stamp};
use crate::stats::{self, Report};
use crate::tls::{not_ready, TlsClient, TlsStream};
use crate::wire::{self, Item, Proto};

/// How long a blocking read or write waits before the thread looks at the clock again.
const IO_TIMEOUT: Duration = Duration::from_millis(10);

/// How long every endpoint has to connect and finish its handshake.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest write in throughput mode.
const BATCH: usize = 64 * 1024;

/// Most payload octets a sender keeps in flight (nats, mqtt; apex too, see `apex::depth_for`).
const WINDOW_BYTES: usize = 256 * 1024;

/// A sender's in-flight bound, the same for every target: `messages`, and no more than
/// `WINDOW_BYTES` of payload of `size` octets (at least one message).
pub(crate) fn in_flight_bound(messages: usize, size: usize) -> usize {
    messages.min(WINDOW_BYTES / size.max(1)).max(1)
}

/// After the measured window, a receiver that saw nothing for this long stops waiting.
const IDLE_STOP: Duration = Duration::from_secs(1);

/// How long a sender without credit sleeps before looking again.
const CREDIT_WAIT: Duration = Duration::from_micros(100);

/// Bytes read per `read` call.
const READ_CHUNK: usize = 256 * 1024;

/// Error messages kept per endpoint.
const MAX_SAMPLES: usize = 5;

/// How senders map to receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Pattern {
    /// Sender i to receiver i.
    Pairs,
    /// N senders to one receiver.
    FanIn,
    /// One sender to N receivers.
    FanOut,
}

impl Pattern {
    /// The name used in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Pairs => "pairs",
            Self::FanIn => "fan-in",
            Self::FanOut => "fan-out",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Protocol of the target.
    pub(crate) proto: Proto,
    /// The target's address (loopback, checked by the caller).
    pub(crate) addr: SocketAddr,
    /// Pairs, or N of a fan pattern.
    pub(crate) pairs: usize,
    /// Payload octets per message.
    pub(crate) size: usize,
    /// Warm-up, not measured.
    pub(crate) warmup: Duration,
    /// Measured window.
    pub(crate) duration: Duration,
    /// Total messages per second across senders (open loop); `None`: throughput mode.
    pub(crate) rate: Option<f64>,
    /// Sender/receiver topology.
    pub(crate) pattern: Pattern,
    /// Most messages in flight per sender in throughput mode (nats, mqtt).
    pub(crate) window: usize,
    /// CPUs to pin the threads to, round-robin (empty: no pinning).
    pub(crate) cpus: Vec<usize>,
    /// Print a progress line on stderr each second.
    pub(crate) progress: bool,
    /// TLS to the target (nats), verifying its certificate.
    pub(crate) tls: Option<TlsClient>,
}

/// A sender's place in the topology.
#[derive(Debug, Clone)]
struct SenderSpec {
    index: usize,
    channel: usize,
}

/// A receiver's place in the topology.
#[derive(Debug, Clone)]
struct ReceiverSpec {
    index: usize,
    channel: usize,
    /// Global indices of the senders it hears from; a payload's `seq % from.len()` picks one
    /// (fan-in), otherwise there is exactly one.
    from: Vec<usize>,
    /// This receiver's slot in each of its senders' `received` counters.
    slot: usize,
}

fn topology(pattern: Pattern, n: usize) -> (Vec<SenderSpec>, Vec<ReceiverSpec>) {
    match pattern {
        Pattern::Pairs => (
            (0..n)
                .map(|i| SenderSpec {
                    index: i,
                    channel: i,
                })
                .collect(),
            (0..n)
                .map(|i| ReceiverSpec {
                    index: i,
                    channel: i,
                    from: vec![i],
                    slot: 0,
                })
                .collect(),
        ),
        Pattern::FanIn => (
            (0..n)
                .map(|i| SenderSpec {
                    index: i,
                    channel: 0,
                })
                .collect(),
            vec![ReceiverSpec {
                index: 0,
                channel: 0,
                from: (0..n).collect(),
                slot: 0,
            }],
        ),
        Pattern::FanOut => (
            vec![SenderSpec {
                index: 0,
                channel: 0,
            }],
            (0..n)
                .map(|i| ReceiverSpec {
                    index: i,
                    channel: 0,
                    from: vec![0],
                    slot: i,
                })
                .collect(),
        ),
    }
}

/// State every thread sees.
#[derive(Debug)]
struct Shared {
    epoch: Instant,
    schedule: OnceLock<Schedule>,
    abort: AtomicBool,
    ready: AtomicUsize,
    /// Per sender, per receiver slot: messages delivered so far.
    received: Vec<Vec<AtomicU64>>,
    /// Per sender: messages sent, once it stopped (`u64::MAX` while running).
    finished: Vec<AtomicU64>,
    /// The progress line's live figures.
    progress: stats::Progress,
    /// The TLS version and cipher suite of the first connection secured.
    tls: OnceLock<String>,
}

impl Shared {
    fn now_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn fail(&self) {
        self.abort.store(true, Ordering::Release);
    }

    /// Waits until the schedule is set; `None` when the run was aborted.
    fn wait_schedule(&self) -> Option<Schedule> {
        loop {
            if self.abort.load(Ordering::Acquire) {
                return None;
            }
            if let Some(s) = self.schedule.get() {
                return Some(*s);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Errors of one endpoint.
#[derive(Debug, Default)]
struct Errors {
    count: u64,
    samples: Vec<String>,
    notes: Vec<String>,
}

impl Errors {
    fn add(&mut self, name: &str, text: impl FnOnce() -> String) {
        self.count += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(format!("{name}: {}", text()));
        }
    }

    fn note(&mut self, name: &str, text: impl FnOnce() -> String) {
        if self.notes.len() < MAX_SAMPLES {
            self.notes.push(format!("{name}: {}", text()));
        }
    }
}

#[derive(Debug, Default)]
struct SenderOutcome {
    sent: u64,
    wire_in_window: u64,
    errors: Errors,
}

#[derive(Debug)]
struct ReceiverOutcome {
    delivered: u64,
    in_window: u64,
    lost: u64,
    reordered: u64,
    latency: Box<Histogram<u64>>,
    wire_in_window: u64,
    drain_s: f64,
    errors: Errors,
}

/// An input buffer read into in place.
#[derive(Debug)]
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> Self {
        Self {
            buf: vec![0; 2 * READ_CHUNK],
            start: 0,
            end: 0,
        }
    }

    /// Reads once; `Ok(None)` on timeout, `Ok(Some(0))` at end of stream.
    fn fill(&mut self, stream: &mut impl Read) -> Result<Option<usize>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < READ_CHUNK / 4 {
                let grown = self.buf.len() * 2;
                self.buf.resize(grown, 0);
            }
        }
        match stream.read(&mut self.buf[self.end..]) {
            Ok(n) => {
                self.end += n;
                Ok(Some(n))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("reading from the target"),
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

/// A connection to the target: TCP, or TLS over it.
#[derive(Debug)]
enum Link {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

impl Link {
    /// Ends the sending side (under TLS: close_notify first).
    fn shutdown(&mut self) {
        match self {
            Self::Plain(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            Self::Tls(s) => s.shutdown(),
        }
    }
}

/// Connects to the target; with TLS, reads the server's INFO (NATS: plaintext, asking for TLS)
/// and runs the handshake before anything else is sent.
fn open(config: &Config, input: &mut InBuf, shared: &Shared) -> Result<Link> {
    let mut stream = connect(config.addr)?;
    let Some(client) = &config.tls else {
        return Ok(Link::Plain(stream));
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        if let Some(eol) = memchr::memmem::find(input.data(), b"\r\n") {
            let line = &input.data()[..eol];
            if !line.starts_with(b"INFO ") {
                let text = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                bail!("expected the server's INFO before TLS, got {text:?}");
            }
            if memchr::memmem::find(line, b"\"tls_required\":true").is_none() {
                bail!("the server does not ask for TLS (nats-server needs a tls block)");
            }
            input.start += eol + 2;
            if !input.data().is_empty() {
                bail!("the server sent more than its INFO before the TLS handshake");
            }
            break;
        }
        if Instant::now() > deadline || shared.abort.load(Ordering::Acquire) {
            bail!("no INFO within {} s", SETUP_TIMEOUT.as_secs());
        }
        if input.fill(&mut stream)? == Some(0) {
            bail!("the target closed the connection before its INFO");
        }
    }
    let tls = TlsStream::handshake(stream, client, deadline)?;
    let _ = shared.tls.set(tls.describe());
    Ok(Link::Tls(Box::new(tls)))
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .context("setting the read timeout")?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .context("setting the write timeout")?;
    Ok(stream)
}

/// Writes all of `data` (under TLS: and the records it made), retrying on timeouts until
/// `deadline` or an abort.
fn write_all(stream: &mut Link, mut data: &[u8], deadline: Instant, shared: &Shared) -> Result<()> {
    let retry = |e: io::Error| -> Result<()> {
        if !not_ready(&e) {
            return Err(e).context("writing to the target");
        }
        if Instant::now() > deadline {
            bail!("the target accepted no data until the deadline");
        }
        if shared.abort.load(Ordering::Acquire) {
            bail!("aborted");
        }
        Ok(())
    };
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => bail!("the target stopped accepting data"),
            Ok(n) => data = &data[n..],
            Err(e) => retry(e)?,
        }
    }
    if let Link::Tls(_) = stream {
        while let Err(e) = stream.flush() {
            retry(e)?;
        }
    }
    Ok(())
}

/// Sends `hello`, then reads until `want` arrives (answering PINGs).
fn handshake(
    stream: &mut Link,
    input: &mut InBuf,
    proto: Proto,
    hello: &[u8],
    want: Option<Item>,
    shared: &Shared,
) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    write_all(stream, hello, deadline, shared)?;
    let Some(_) = want else {
        return Ok(());
    };
    loop {
        while let Some((item, used)) = wire::parse(proto, input.data())? {
            input.start += used;
            if item == Item::Ping {
                write_all(stream, b"PONG\r\n", deadline, shared)?;
            } else if wire::handshake_done(want, item) {
                return Ok(());
            } else if let Item::Msg { .. } = item {
                bail!("a message arrived during the handshake");
            }
        }
        if Instant::now() > deadline || shared.abort.load(Ordering::Acquire) {
            bail!("no handshake answer within {} s", SETUP_TIMEOUT.as_secs());
        }
        if input.fill(stream)? == Some(0) {
            bail!("the target closed the connection during the handshake");
        }
    }
}

fn client_id(role: &str, index: usize) -> String {
    format!("apexload-{}-{role}{index}", std::process::id())
}

fn run_sender(config: &Config, shared: &Shared, spec: &SenderSpec) -> SenderOutcome {
    let mut out = SenderOutcome::default();
    let name = format!("snd{}", spec.index);
    if let Err(e) = sender(config, shared, spec, &mut out) {
        if !shared.abort.load(Ordering::Acquire) || out.errors.count == 0 {
            let text = format!("{e:#}");
            if text != "aborted" {
                out.errors.add(&name, || text);
            }
        }
        shared.fail();
    }
    shared.finished[spec.index].store(out.sent, Ordering::Release);
    out
}

fn sender(
    config: &Config,
    shared: &Shared,
    spec: &SenderSpec,
    out: &mut SenderOutcome,
) -> Result<()> {
    let proto = config.proto;
    let mut input = InBuf::new();
    let mut stream = open(config, &mut input, shared)?;
    let mut hello = BytesMut::new();
    wire::sender_hello(&mut hello, proto, spec.channel, &client_id("s", spec.index));
    handshake(
        &mut stream,
        &mut input,
        proto,
        &hello,
        wire::sender_ready_on(proto),
        shared,
    )?;
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let Some(schedule) = shared.wait_schedule() else {
        return Ok(());
    };
    let topic = wire::subject(proto, spec.channel);
    let stride = if config.pattern == Pattern::FanIn {
        config.pairs as u64
    } else {
        1
    };
    let received = &shared.received[spec.index];
    let window = in_flight_bound(config.window, config.size) as u64;
    let per_sender_rate = config.rate.map(|r| r / shared.finished.len() as f64);
    let mut batch = BytesMut::with_capacity(BATCH + config.size + 64);
    let mut k: u64 = 0;
    loop {
        if shared.abort.load(Ordering::Acquire) {
            bail!("aborted");
        }
        let now = Instant::now();
        if now >= schedule.measure_end {
            break;
        }
        batch.clear();
        match per_sender_rate {
            None => {
                let mut allowed = u64::MAX;
                if proto != Proto::Raw {
                    let seen = received
                        .iter()
                        .map(|c| c.load(Ordering::Acquire))
                        .min()
                        .unwrap_or(0);
                    allowed = window.saturating_sub(k - seen.min(k));
                    if allowed == 0 {
                        // Spinning would steal the load CPU from the receivers.
                        std::thread::sleep(CREDIT_WAIT);
                        continue;
                    }
                }
                let sent_ns = shared.now_ns(now);
                while allowed > 0 && batch.len() < BATCH {
                    put_message(
                        &mut batch,
                        proto,
                        &topic,
                        k * stride + spec_slot(spec, config),
                        sent_ns,
                        config.size,
                    );
                    k += 1;
                    allowed -= 1;
                }
            }
            Some(rate) => {
                let due = schedule.start + Duration::from_secs_f64(k as f64 / rate);
                if due > now {
                    let wait = due - now;
                    if wait > Duration::from_micros(200) {
                        std::thread::sleep(wait - Duration::from_micros(100));
                    } else {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                put_message(
                    &mut batch,
                    proto,
                    &topic,
                    k * stride + spec_slot(spec, config),
                    shared.now_ns(due),
                    config.size,
                );
                k += 1;
            }
        }
        write_all(&mut stream, &batch, schedule.hard_stop, shared)?;
        out.sent = k;
        if schedule.measuring(now) {
            out.wire_in_window += batch.len() as u64;
        }
    }
    out.sent = k;
    shared.finished[spec.index].store(k, Ordering::Release);
    batch.clear();
    wire::goodbye(&mut batch, proto);
    write_all(&mut stream, &batch, schedule.hard_stop, shared)?;
    if proto == Proto::Nats {
        // Wait for the PONG: the server has then taken every PUB.
        let deadline = Instant::now() + Duration::from_secs(2);
        'wait: while Instant::now() < deadline {
            while let Some((item, used)) = wire::parse(proto, input.data())? {
                input.start += used;
                if item == Item::Pong {
                    break 'wait;
                }
            }
            if input.fill(&mut stream)? == Some(0) {
                break;
            }
        }
    }
    stream.shutdown();
    Ok(())
}

/// The sender's number within a fan-in (its residue in the sequence field), else 0.
fn spec_slot(spec: &SenderSpec, config: &Config) -> u64 {
    if config.pattern == Pattern::FanIn {
        spec.index as u64
    } else {
        0
    }
}

fn put_message(out: &mut BytesMut, proto: Proto, topic: &str, seq: u64, sent_ns: u64, size: usize) {
    let len = size.max(payload::MIN_SIZE);
    wire::frame_head(out, proto, topic, len);
    payload::encode(out, Stamp { seq, sent_ns }, size);
    wire::frame_tail(out, proto);
}

/// Per-sender bookkeeping in a receiver.
#[derive(Debug, Clone, Copy, Default)]
struct Track {
    next_seq: u64,
    count: u64,
}

fn run_receiver(config: &Config, shared: &Shared, spec: &ReceiverSpec) -> ReceiverOutcome {
    let mut out = ReceiverOutcome {
        delivered: 0,
        in_window: 0,
        lost: 0,
        reordered: 0,
        latency: Box::new(stats::latency_histogram()),
        wire_in_window: 0,
        drain_s: 0.0,
        errors: Errors::default(),
    };
    let mut tracks = vec![Track::default(); spec.from.len()];
    let name = format!("rcv{}", spec.index);
    if let Err(e) = receiver(config, shared, spec, &mut out, &mut tracks, &name) {
        let text = format!("{e:#}");
        if text != "aborted" {
            out.errors.add(&name, || text);
        }
        shared.fail();
    }
    if !shared.abort.load(Ordering::Acquire) {
        for (t, &s) in tracks.iter().zip(&spec.from) {
            let sent = shared.finished[s].load(Ordering::Acquire);
            if sent != u64::MAX && sent > t.next_seq {
                let missing = sent - t.next_seq;
                out.lost += missing;
                out.errors.note(&name, || {
                    format!(
                        "{missing} messages of snd{s} never arrived (next seq due {})",
                        t.next_seq
                    )
                });
            }
        }
    }
    out
}

fn receiver(
    config: &Config,
    shared: &Shared,
    spec: &ReceiverSpec,
    out: &mut ReceiverOutcome,
    tracks: &mut [Track],
    name: &str,
) -> Result<()> {
    let proto = config.proto;
    let mut input = InBuf::new();
    let mut stream = open(config, &mut input, shared)?;
    let mut hello = BytesMut::new();
    wire::receiver_hello(&mut hello, proto, spec.channel, &client_id("r", spec.index));
    handshake(
        &mut stream,
        &mut input,
        proto,
        &hello,
        wire::receiver_ready_on(proto),
        shared,
    )?;
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let Some(schedule) = shared.wait_schedule() else {
        return Ok(());
    };
    let stride = spec.from.len() as u64;
    let want_len = config.size.max(payload::MIN_SIZE);
    let mut tally = stats::ProgressTally::default();
    let mut last_data = Instant::now();
    loop {
        if shared.abort.load(Ordering::Acquire) {
            bail!("aborted");
        }
        let now = Instant::now();
        if now >= schedule.hard_stop {
            out.errors
                .note(name, || "gave up at the hard stop".to_owned());
            break;
        }
        if now >= schedule.measure_end {
            let all_in = spec.from.iter().zip(tracks.iter()).all(|(&s, t)| {
                let sent = shared.finished[s].load(Ordering::Acquire);
                sent != u64::MAX && t.next_seq >= sent
            });
            if all_in {
                out.drain_s = now
                    .saturating_duration_since(schedule.measure_end)
                    .as_secs_f64();
                break;
            }
            if now.saturating_duration_since(last_data) > IDLE_STOP {
                out.errors.note(name, || {
                    "nothing arrived for 1 s after the window: stopped".to_owned()
                });
                break;
            }
        }
        let n = match input.fill(&mut stream)? {
            None => continue,
            Some(0) => {
                let senders_done = spec
                    .from
                    .iter()
                    .all(|&s| shared.finished[s].load(Ordering::Acquire) != u64::MAX);
                if !senders_done {
                    bail!("the target closed the connection");
                }
                break;
            }
            Some(n) => n as u64,
        };
        let now = Instant::now();
        last_data = now;
        let measuring = schedule.measuring(now);
        let now_ns = shared.now_ns(now);
        if measuring {
            out.wire_in_window += n;
        }
        while let Some((item, used)) = wire::parse(proto, input.data())? {
            match item {
                Item::Msg { start, end } => {
                    let payload = &input.data()[start..end];
                    let Some(stamp) = payload::decode(payload) else {
                        out.errors
                            .add(name, || "a message without a stamp".to_owned());
                        input.start += used;
                        continue;
                    };
                    if payload.len() != want_len {
                        let len = payload.len();
                        out.errors.add(name, || {
                            format!("seq {} has {len} octets, {want_len} sent", stamp.seq)
                        });
                    }
                    let local = (stamp.seq % stride) as usize;
                    let seq = stamp.seq / stride;
                    let t = &mut tracks[local];
                    t.count += 1;
                    if seq >= t.next_seq {
                        let gap = seq - t.next_seq;
                        if gap > 0 {
                            out.lost += gap;
                            out.errors.note(name, || {
                                format!("gap: seq {seq} arrived when {} was due", t.next_seq)
                            });
                        }
                        t.next_seq = seq + 1;
                    } else {
                        out.reordered += 1;
                        out.errors.note(name, || {
                            format!("seq {seq} arrived after seq {}", t.next_seq - 1)
                        });
                    }
                    out.delivered += 1;
                    if measuring {
                        out.in_window += 1;
                        stats::record_ns(&mut out.latency, now_ns.saturating_sub(stamp.sent_ns));
                    }
                    if config.progress {
                        tally.record(now_ns.saturating_sub(stamp.sent_ns));
                    }
                }
                Item::Ping => {
                    write_all(&mut stream, b"PONG\r\n", schedule.hard_stop, shared)?;
                }
                _ => {}
            }
            input.start += used;
        }
        for (t, &s) in tracks.iter().zip(&spec.from) {
            shared.received[s][spec.slot].store(t.count, Ordering::Release);
        }
        if config.progress {
            tally.merge_into(&shared.progress, now);
        }
    }
    Ok(())
}

/// Spawns `f` on a thread pinned to `cpu`.
fn spawn<T: Send + 'static>(
    name: String,
    cpu: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Some(cpu) = cpu {
                let _ = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
            }
            f()
        })
        .context("spawning a load thread")
}

/// Runs the load and returns the report.
pub(crate) fn run(config: &Config) -> Result<Report> {
    if config.proto == Proto::Raw && config.pattern != Pattern::Pairs {
        bail!(
            "the raw protocol (null relay) forwards one sender to one receiver: --pattern {} is not supported",
            config.pattern.name()
        );
    }
    let (senders, receivers) = topology(config.pattern, config.pairs);
    let mut slots = vec![0usize; senders.len()];
    for r in &receivers {
        for &s in &r.from {
            slots[s] = slots[s].max(r.slot + 1);
        }
    }
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        schedule: OnceLock::new(),
        abort: AtomicBool::new(false),
        ready: AtomicUsize::new(0),
        received: slots
            .iter()
            .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        finished: (0..senders.len())
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
        progress: stats::Progress::default(),
        tls: OnceLock::new(),
    });
    let cpu = |i: usize| (!config.cpus.is_empty()).then(|| config.cpus[i % config.cpus.len()]);
    let mut rx_handles = Vec::new();
    for (i, spec) in receivers.iter().cloned().enumerate() {
        let (c, s) = (config.clone(), Arc::clone(&shared));
        rx_handles.push(spawn(format!("rcv{i}"), cpu(2 * i), move || {
            run_receiver(&c, &s, &spec)
        })?);
    }
    let mut tx_handles = Vec::new();
    for (i, spec) in senders.iter().cloned().enumerate() {
        let (c, s) = (config.clone(), Arc::clone(&shared));
        tx_handles.push(spawn(format!("snd{i}"), cpu(2 * i + 1), move || {
            run_sender(&c, &s, &spec)
        })?);
    }
    let total = senders.len() + receivers.len();
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut setup_error = None;
    loop {
        if shared.abort.load(Ordering::Acquire) {
            break;
        }
        if shared.ready.load(Ordering::Acquire) == total {
            let _ = shared.schedule.set(Schedule::new(
                Instant::now(),
                config.warmup,
                config.duration,
            ));
            break;
        }
        if Instant::now() > deadline {
            setup_error = Some(format!(
                "only {} of {total} connections ready within {} s",
                shared.ready.load(Ordering::Acquire),
                SETUP_TIMEOUT.as_secs()
            ));
            shared.fail();
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if config.progress {
        if let Some(s) = shared.schedule.get() {
            shared.progress.print_until(s, || {
                rx_handles.iter().all(JoinHandle::is_finished)
                    && tx_handles.iter().all(JoinHandle::is_finished)
            });
        }
    }
    let mut sent_out = Vec::new();
    for h in tx_handles {
        sent_out.push(h.join().map_err(|_| anyhow!("a sender thread panicked"))?);
    }
    let mut rcv_out = Vec::new();
    for h in rx_handles {
        rcv_out.push(
            h.join()
                .map_err(|_| anyhow!("a receiver thread panicked"))?,
        );
    }
    if shared.schedule.get().is_none() {
        let mut reasons: Vec<String> = setup_error.into_iter().collect();
        for o in &sent_out {
            reasons.extend(o.errors.samples.iter().cloned());
        }
        for o in &rcv_out {
            reasons.extend(o.errors.samples.iter().cloned());
        }
        bail!("setup failed: {}", reasons.join("; "));
    }
    let mut r = report(config, total, sent_out, rcv_out);
    r.tls = shared.tls.get().cloned();
    Ok(r)
}

fn report(
    config: &Config,
    threads: usize,
    senders: Vec<SenderOutcome>,
    receivers: Vec<ReceiverOutcome>,
) -> Report {
    let mut latency = stats::latency_histogram();
    let mut r = Report::empty(config.proto.name(), &config.addr.to_string());
    r.pattern = config.pattern.name().to_owned();
    r.rate = config.rate;
    r.pairs = config.pairs;
    r.size = config.size;
    r.depth = if config.proto == Proto::Raw {
        0
    } else {
        config.window
    };
    r.threads = threads;
    r.warmup_s = config.warmup.as_secs_f64();
    r.duration_s = config.duration.as_secs_f64();
    let mut wire = 0u64;
    for s in senders {
        r.sent += s.sent;
        wire += s.wire_in_window;
        r.errors += s.errors.count;
        r.error_samples.extend(s.errors.samples);
        r.notes.extend(s.errors.notes);
    }
    for o in receivers {
        r.delivered += o.delivered;
        r.delivered_in_window += o.in_window;
        r.lost += o.lost;
        r.reordered += o.reordered;
        r.drain_s = r.drain_s.max(o.drain_s);
        wire += o.wire_in_window;
        r.errors += o.errors.count;
        r.error_samples.extend(o.errors.samples);
        r.notes.extend(o.errors.notes);
        if latency.add(&*o.latency).is_err() {
            r.notes
                .push("a latency histogram was not merged".to_owned());
        }
    }
    r.acknowledged = r.sent;
    let secs = config.duration.as_secs_f64();
    r.msgs_per_sec = r.delivered_in_window as f64 / secs;
    r.acks_per_sec = r.msgs_per_sec;
    r.payload_mb_per_sec = r.msgs_per_sec * config.size as f64 / 1e6;
    r.set_wire(wire, secs);
    r.set_latency(&latency);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topologies() {
        let (s, r) = topology(Pattern::Pairs, 3);
        assert_eq!((s.len(), r.len()), (3, 3));
        assert_eq!(
            (s[2].channel, r[2].channel, r[2].from.clone()),
            (2, 2, vec![2])
        );
        let (s, r) = topology(Pattern::FanIn, 4);
        assert_eq!((s.len(), r.len(), r[0].from.len()), (4, 1, 4));
        assert!(s.iter().all(|s| s.channel == 0));
        let (s, r) = topology(Pattern::FanOut, 4);
        assert_eq!((s.len(), r.len()), (1, 4));
        assert_eq!(r[3].slot, 3);
    }

    fn config(proto: Proto, addr: SocketAddr, pattern: Pattern, rate: Option<f64>) -> Config {
        Config {
            proto,
            addr,
            pairs: 2,
            size: 128,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(300),
            rate,
            pattern,
            window: 1000,
            cpus: Vec::new(),
            progress: false,
            tls: None,
        }
    }

    #[test]
    fn raw_through_the_null_relay() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        std::thread::spawn(move || crate::nullrelay::run(addr));
        for _ in 0..200 {
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for rate in [None, Some(2000.0)] {
            let r = run(&config(Proto::Raw, addr, Pattern::Pairs, rate)).unwrap();
            assert!(r.passed(), "{r}");
            assert!(r.delivered_in_window > 0, "{r}");
            assert_eq!(r.delivered, r.sent, "{r}");
            if rate.is_some() {
                // 2000/s for 0.3 s.
                assert!((500..=700).contains(&r.delivered_in_window), "{r}");
            }
        }
        assert!(run(&config(Proto::Raw, addr, Pattern::FanIn, None)).is_err());
    }
}
