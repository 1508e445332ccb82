//! APEX load: pairs of endpoints attached to a relay; in pair i, `snd{i}@DOMAIN` sends `data`
//! to `rcv{i}@DOMAIN`.
//!
//! Each endpoint is a BEEP initiator on its own TCP connection, driven by the sans-IO
//! [`Session`] of `apex-proto`. It attaches with an `attach` piggybacked on the channel `start`
//! (RFC 3340 §4.2). A sender keeps at most `depth` `data` messages unacknowledged by the relay
//! (its `ok` reply); with `--rate` it sends each message at its scheduled time instead (open
//! loop, latency from that time), `depth` remaining the cap; a receiver answers each `data` with `ok`, checks the sequence numbers and
//! records the one-way latency. Output is coalesced: every step drains `poll_transmit` into one
//! buffer and writes it whole.
//!
//! With TLS (`--tls-ca`), each connection first runs the BEEP TLS profile (RFC 3080 §3.1): the
//! relay's greeting, a `start` of the TLS profile with `ready` piggybacked, the relay's
//! `proceed`, the TLS handshake (verifying the relay's certificate names `--tls-name`), and a
//! new session that greets again; then the attach and the load as usual, all through the
//! protocol core's sans-IO [`TlsLayer`](apex_proto::tls::TlsLayer): a read's ciphertext is
//! decrypted into the session's input, and each step's output is sealed at once into records
//! of up to 16 KiB.
//!
//! ```text
//!   main: connect all ──► spawn threads ──► wait until every endpoint attached ──► schedule
//!   (TLS:     greeting ─► start TLS + ready ─► proceed ─► handshake ─► then as below)
//!   sender:   greeting ─► attach ─► (schedule) send ≤ depth ... measure_end ─► drain acks ─► release
//!   receiver: greeting ─► attach ─► answer ok, check seq, latency ... all acked seen ─► release
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use apex_proto::apex::client::{
    attach_offer, ok_payload, parse_answer, parse_piggybacked_answer, Answer, DataBuilder,
    DATA_CONTENT_OPEN,
};
use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::beep::tuning::{self, TuningElement};
use apex_proto::tls::TlsLayer;
use apex_proto::{Event, Limits, ReplyKind, Role, Session, SessionConfig};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;

use crate::driver::{self, Schedule, Task};
use crate::payload::{self, Stamp};
use crate::stats::{self, Report};
use crate::stream::Pattern;
use crate::tls::TlsClient;

/// How long a blocking read waits before the task looks at the clock again.
const READ_TIMEOUT: Duration = Duration::from_millis(10);

/// How long every endpoint has to connect and attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session release may take at the end.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest read wait of an open-loop sender (a zero timeout would mean "block forever").
const MIN_READ_WAIT: Duration = Duration::from_micros(20);

/// Bytes read per `read` call.
const READ_CHUNK: usize = 256 * 1024;

/// Keep at most this much output buffered on a non-blocking socket.
const MAX_OUTBOX: usize = 1024 * 1024;

/// A sender builds its messages in chunks of this many octets (or one message, if larger).
const BUILD_CHUNK: usize = 64 * 1024;

/// Error messages kept per endpoint.
const MAX_SAMPLES: usize = 5;

/// The `data-content` start tag of every message; the payload follows it.
const CONTENT_OPEN: &[u8] = DATA_CONTENT_OPEN;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The relay's apex-edge address (loopback, checked by the caller).
    pub(crate) relay: SocketAddr,
    /// Domain of the endpoint names.
    pub(crate) domain: String,
    /// Sender/receiver pairs (for fan-in: senders; for fan-out: receivers).
    pub(crate) pairs: usize,
    /// How senders map to receivers.
    pub(crate) pattern: Pattern,
    /// Payload octets per message.
    pub(crate) size: usize,
    /// Most unacknowledged messages per sender.
    pub(crate) depth: usize,
    /// Open loop: messages per second offered in total, spread evenly over the senders; each
    /// message's latency runs from its scheduled send time (no coordinated omission). `None`:
    /// closed loop, `depth` messages in flight per sender.
    pub(crate) rate: Option<f64>,
    /// Warm-up, not measured.
    pub(crate) warmup: Duration,
    /// Measured window.
    pub(crate) duration: Duration,
    /// Load threads (at most one per connection).
    pub(crate) threads: usize,
    /// CPUs to pin the threads to, round-robin (empty: no pinning).
    pub(crate) cpus: Vec<usize>,
    /// Print a progress line on stderr each second.
    pub(crate) progress: bool,
    /// Speak TLS to the relay (the BEEP TLS profile), verifying its certificate.
    pub(crate) tls: Option<TlsClient>,
}

/// The in-flight bound of an apex sender: `depth` messages, bounded like the nats and mqtt
/// senders' window, so every target runs with the same one (the method in docs/performance.md:
/// 1000 messages or 256 KiB per pair).
pub(crate) fn depth_for(depth: usize, size: usize) -> usize {
    crate::stream::in_flight_bound(depth, size)
}

impl Config {
    /// Number of sending endpoints.
    fn senders(&self) -> usize {
        match self.pattern {
            Pattern::FanOut => 1,
            Pattern::Pairs | Pattern::FanIn => self.pairs,
        }
    }

    /// Number of receiving endpoints.
    fn receivers(&self) -> usize {
        match self.pattern {
            Pattern::FanIn => 1,
            Pattern::Pairs | Pattern::FanOut => self.pairs,
        }
    }

    /// The receivers of sender `s`'s data: one per data, except fan-out (every receiver named
    /// in each data, which the relay delivers to each of them).
    fn recipients_of(&self, s: usize) -> Vec<usize> {
        match self.pattern {
            Pattern::Pairs => vec![s],
            Pattern::FanIn => vec![0],
            Pattern::FanOut => (0..self.pairs).collect(),
        }
    }

    /// The senders receiver `r` hears from.
    fn senders_of(&self, r: usize) -> Vec<usize> {
        match self.pattern {
            Pattern::Pairs => vec![r],
            Pattern::FanIn => (0..self.pairs).collect(),
            Pattern::FanOut => vec![0],
        }
    }

    /// Sequence numbers: sender `s` numbers its k-th message `k * stride + s % stride`, so a
    /// fan-in receiver tells its senders apart; elsewhere the stride is 1.
    fn stride(&self) -> u64 {
        match self.pattern {
            Pattern::FanIn => self.pairs as u64,
            Pattern::Pairs | Pattern::FanOut => 1,
        }
    }
}

/// State every thread sees.
#[derive(Debug)]
struct Shared {
    /// Timestamps in payloads are nanoseconds since this instant.
    epoch: Instant,
    /// Set once every endpoint has attached.
    schedule: OnceLock<Schedule>,
    /// Set when any endpoint failed or the attach phase timed out: everyone stops.
    abort: AtomicBool,
    /// Endpoints attached so far.
    attached: AtomicUsize,
    /// Per sender: messages the relay had answered when it stopped (`u64::MAX` while running).
    finished: Vec<AtomicU64>,
    /// The progress line's live figures.
    progress: stats::Progress,
    /// The TLS version and cipher suite of the first connection secured.
    tls: OnceLock<String>,
}

impl Shared {
    fn now_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Runs the load and returns the report.
pub(crate) fn run(config: &Config) -> Result<Report> {
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        schedule: OnceLock::new(),
        abort: AtomicBool::new(false),
        attached: AtomicUsize::new(0),
        finished: (0..config.senders())
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
        progress: stats::Progress::default(),
        tls: OnceLock::new(),
    });
    // Every endpoint attaches before any sender sends (the barrier below); a receiver and its
    // sender land on different threads whenever there are two or more.
    let mut endpoints = Vec::with_capacity(config.senders() + config.receivers());
    for i in 0..config.senders().max(config.receivers()) {
        if i < config.receivers() {
            endpoints.push((i, true));
        }
        if i < config.senders() {
            endpoints.push((i, false));
        }
    }
    let groups = driver::deal(endpoints, config.threads);
    let threads = groups.len();
    let mut tasks = Vec::with_capacity(threads);
    for group in groups {
        let blocking = group.len() == 1;
        let mut list = Vec::with_capacity(group.len());
        for (pair, receiver) in group {
            list.push(Endpoint::connect(
                config, &shared, pair, receiver, blocking,
            )?);
        }
        tasks.push(list);
    }
    let total = config.senders() + config.receivers();
    let handles = driver::spawn(tasks, &config.cpus)?;

    let mut setup_error = None;
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        if shared.abort.load(Ordering::Acquire) {
            break;
        }
        let attached = shared.attached.load(Ordering::Acquire);
        if attached == total {
            let schedule = Schedule::new(Instant::now(), config.warmup, config.duration);
            let _ = shared.schedule.set(schedule);
            break;
        }
        if Instant::now() > deadline {
            setup_error = Some(format!(
                "only {attached} of {total} endpoints attached within {} s",
                ATTACH_TIMEOUT.as_secs()
            ));
            shared.abort.store(true, Ordering::Release);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    if let (true, Some(schedule)) = (config.progress, shared.schedule.get()) {
        shared
            .progress
            .print_until(schedule, || handles.iter().all(|h| h.is_finished()));
    }
    let mut outcomes = Vec::with_capacity(total);
    for handle in handles {
        let tasks = handle
            .join()
            .map_err(|_| anyhow!("a load thread panicked"))?;
        outcomes.extend(tasks.into_iter().map(Endpoint::into_outcome));
    }
    if shared.schedule.get().is_none() {
        // No load was offered: a setup failure, not a measurement.
        let mut reasons: Vec<String> = setup_error.into_iter().collect();
        for o in &outcomes {
            reasons.extend(o.error_samples.iter().map(|e| format!("{}: {e}", o.name)));
        }
        bail!("setup failed: {}", reasons.join("; "));
    }
    Ok(report(config, threads, &shared, outcomes, setup_error))
}

/// What an endpoint did, collected after the run.
#[derive(Debug)]
struct Outcome {
    /// Sender or receiver index.
    index: usize,
    name: String,
    /// Octets this endpoint wrote and read in the measured window.
    wire_in_window: u64,
    errors: u64,
    error_samples: Vec<String>,
    notes: Vec<String>,
    role: PartOutcome,
}

#[derive(Debug)]
enum PartOutcome {
    Sender {
        sent: u64,
        answered: u64,
        acked: u64,
        acked_in_window: u64,
    },
    Receiver {
        delivered: u64,
        in_window: u64,
        /// Per sender heard from: (sender, messages seen so far).
        seen: Vec<(usize, u64)>,
        lost: u64,
        reordered: u64,
        latency: Box<Histogram<u64>>,
        /// Seconds from the end of the measured window until the last delivery it waited for.
        drain_s: f64,
    },
}

fn report(
    config: &Config,
    threads: usize,
    shared: &Shared,
    outcomes: Vec<Outcome>,
    setup_error: Option<String>,
) -> Report {
    let aborted = shared.abort.load(Ordering::Acquire);
    let mut latency = stats::latency_histogram();
    let mut r = Report::empty("apex", &config.relay.to_string());
    r.pattern = config.pattern.name().to_owned();
    r.rate = config.rate;
    r.pairs = config.pairs;
    r.size = config.size;
    r.depth = config.depth;
    r.threads = threads;
    r.warmup_s = config.warmup.as_secs_f64();
    r.duration_s = config.duration.as_secs_f64();
    r.tls = shared.tls.get().cloned();
    if let Some(e) = setup_error {
        r.errors += 1;
        r.error_samples.push(e);
    }
    let mut acked_in_window_total = 0u64;
    let wire_in_window: u64 = outcomes.iter().map(|o| o.wire_in_window).sum();
    let mut answered = vec![0u64; config.senders()];
    for o in &outcomes {
        if let PartOutcome::Sender { answered: a, .. } = o.role {
            answered[o.index] = a;
        }
    }
    for o in outcomes {
        r.errors += o.errors;
        r.error_samples.extend(
            o.error_samples
                .into_iter()
                .map(|e| format!("{}: {e}", o.name)),
        );
        r.notes
            .extend(o.notes.into_iter().map(|n| format!("{}: {n}", o.name)));
        match o.role {
            PartOutcome::Sender {
                sent,
                acked,
                acked_in_window,
                ..
            } => {
                r.sent += sent;
                r.acknowledged += acked;
                acked_in_window_total += acked_in_window;
            }
            PartOutcome::Receiver {
                delivered,
                in_window,
                seen,
                lost,
                reordered,
                latency: h,
                drain_s,
            } => {
                r.drain_s = r.drain_s.max(drain_s);
                r.delivered += delivered;
                r.delivered_in_window += in_window;
                r.lost += lost;
                r.reordered += reordered;
                if latency.add(&*h).is_err() {
                    r.notes
                        .push(format!("{}: latency histogram not merged", o.name));
                }
                // Everything the relay answered must have arrived (a failed run proves nothing).
                for (sender, count) in seen {
                    let missing = answered[sender].saturating_sub(count);
                    if !aborted && missing > 0 {
                        r.lost += missing;
                        r.error_samples.push(format!(
                            "{}: {missing} answered messages of snd{sender} never arrived ({count} seen)",
                            o.name
                        ));
                    }
                }
            }
        }
    }
    let secs = config.duration.as_secs_f64();
    if secs > 0.0 {
        r.msgs_per_sec = r.delivered_in_window as f64 / secs;
        r.acks_per_sec = acked_in_window_total as f64 / secs;
        r.payload_mb_per_sec = r.msgs_per_sec * config.size as f64 / 1e6;
        r.set_wire(wire_in_window, secs);
    }
    r.set_latency(&latency);
    r
}

/// One BEEP connection: socket, session and buffers.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    session: Session,
    /// Plaintext input for the session.
    inbox: BytesMut,
    /// Octets to write: the session's frames, or TLS records once secured.
    outbox: BytesMut,
    scratch: Box<[u8]>,
    /// TLS, once the relay said `proceed`.
    tls: Option<TlsLayer>,
    /// Ciphertext read and not yet decrypted (a record's tail).
    cipher_in: BytesMut,
    /// Under TLS: the session's frames of one step, sealed together.
    staging: BytesMut,
    /// The MSGs a sender keeps unanswered, which its session (and the one after TLS) allows.
    depth: usize,
    eof: bool,
    /// Octets written and read so far.
    moved: u64,
    /// A blocking socket (the thread drives this connection alone).
    blocking: bool,
    /// The read timeout currently set on a blocking socket.
    read_wait: Duration,
}

impl Conn {
    /// `depth`: the MSGs a sender keeps unanswered, which its session must allow.
    fn connect(addr: SocketAddr, blocking: bool, depth: usize) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .with_context(|| format!("connecting to the relay at {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        if blocking {
            stream
                .set_read_timeout(Some(READ_TIMEOUT))
                .context("setting the read timeout")?;
        } else {
            stream
                .set_nonblocking(true)
                .context("making the socket non-blocking")?;
        }
        Ok(Self {
            stream,
            session: Self::session(depth),
            inbox: BytesMut::with_capacity(READ_CHUNK),
            outbox: BytesMut::with_capacity(64 * 1024),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            tls: None,
            cipher_in: BytesMut::new(),
            staging: BytesMut::new(),
            depth,
            eof: false,
            moved: 0,
            blocking,
            read_wait: READ_TIMEOUT,
        })
    }

    /// A new initiator session allowing `depth` unanswered MSGs.
    fn session(depth: usize) -> Session {
        Session::new(
            Role::Initiator,
            SessionConfig {
                limits: Limits {
                    max_outstanding_msgs: depth.max(Limits::default().max_outstanding_msgs),
                    ..Limits::default()
                },
                ..SessionConfig::default()
            },
        )
    }

    /// The relay said `proceed`: from here on every octet is TLS, and a new session greets
    /// (RFC 3080 §3.1). What the old session had still to send (a SEQ) is dropped: nothing in
    /// plaintext may follow the `proceed`. Octets already in the outbox went before it.
    fn begin_tls(&mut self, tls: TlsLayer) -> Result<()> {
        if !self.inbox.is_empty() {
            bail!("the relay sent octets after proceed, before the TLS handshake");
        }
        self.session = Self::session(self.depth);
        self.tls = Some(tls);
        self.outbox.reserve(READ_CHUNK);
        self.staging.reserve(READ_CHUNK);
        self.cipher_in.reserve(READ_CHUNK);
        Ok(())
    }

    /// Sets how long the next blocking read may wait (one system call when it changes).
    fn set_read_wait(&mut self, wait: Duration) -> Result<()> {
        if wait != self.read_wait {
            self.stream
                .set_read_timeout(Some(wait))
                .context("setting the read timeout")?;
            self.read_wait = wait;
        }
        Ok(())
    }

    /// Drains the session's output into the outbox and writes as much as the socket takes (on a
    /// blocking socket: all of it). Returns true when anything was written.
    fn flush(&mut self) -> Result<bool> {
        match &mut self.tls {
            None => {
                while self.outbox.len() < MAX_OUTBOX
                    && self.session.poll_transmit(&mut self.outbox) > 0
                {}
            }
            Some(tls) => {
                // The step's frames sealed in one go: full records, not one per frame.
                while self.outbox.len() + self.staging.len() < MAX_OUTBOX
                    && self.session.poll_transmit(&mut self.staging) > 0
                {}
                if !self.staging.is_empty() {
                    tls.send(&self.staging)
                        .map_err(|e| anyhow!("sealing for the relay: {e}"))?;
                    self.staging.clear();
                }
                // Records, and during the handshake the handshake's messages.
                tls.transmit(&mut self.outbox);
            }
        }
        let mut wrote = false;
        while !self.outbox.is_empty() {
            match self.stream.write(&self.outbox) {
                Ok(0) => bail!("the relay stopped accepting data (write returned 0)"),
                Ok(n) => {
                    self.outbox.advance(n);
                    self.moved += n as u64;
                    wrote = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("writing to the relay"),
            }
        }
        Ok(wrote)
    }

    /// Reads once (waiting up to the read timeout on a blocking socket) and feeds the session.
    /// Returns true when bytes arrived.
    fn fill(&mut self, now: Instant) -> Result<bool> {
        match self.stream.read(&mut self.scratch) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.moved += n as u64;
                match &mut self.tls {
                    None => self.inbox.extend_from_slice(&self.scratch[..n]),
                    Some(tls) => {
                        self.cipher_in.extend_from_slice(&self.scratch[..n]);
                        tls.receive(&mut self.cipher_in, &mut self.inbox)
                            .map_err(|e| anyhow!("from the relay: {e}"))?;
                    }
                }
                self.session
                    .handle_input(&mut self.inbox, now)
                    .map_err(|e| anyhow!("the relay broke the BEEP protocol: {e}"))?;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).context("reading from the relay"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the relay's greeting (under TLS: its second one).
    Greeting,
    /// The `start` of the TLS profile with the piggybacked `ready` is out.
    StartingTls {
        channel: u32,
    },
    /// The `start` with the piggybacked `attach` is out.
    Attaching {
        channel: u32,
    },
    /// Attached; sending or receiving once the schedule is set.
    Running,
    /// Our `close` of the session is out.
    Releasing {
        deadline: Instant,
    },
    Done,
}

/// A sender's state.
#[derive(Debug)]
struct Sender {
    /// Everything before the payload.
    prefix: Bytes,
    /// Everything after it.
    suffix: &'static [u8],
    /// Messages are built here and split off.
    build: BytesMut,
    /// Message k carries sequence number `k * stride + offset` (`Config::stride`).
    stride: u64,
    offset: u64,
    next_seq: u64,
    outstanding: usize,
    /// Replies received (ok or not).
    answered: u64,
    /// `ok` replies.
    acked: u64,
    /// `ok` replies received in the measured window.
    acked_in_window: u64,
    /// Past the measured window: no new messages.
    draining: bool,
}

/// A receiver's state.
#[derive(Debug)]
struct Receiver {
    /// Octets of each delivered message per sender (what it sent, with only this recipient
    /// left), in `tracks` order.
    message_lens: Vec<usize>,
    /// Where the payload began in the last delivery (see `stamp_of`).
    payload_at: usize,
    /// Per sender heard from, in `Config::senders_of` order: (sender, next message number).
    tracks: Vec<(usize, u64)>,
    /// The senders' sequence stride (`Config::stride`).
    stride: u64,
    delivered: u64,
    in_window: u64,
    lost: u64,
    reordered: u64,
    latency: Box<Histogram<u64>>,
    /// Deliveries not yet handed to the progress line (`None`: no progress line).
    tally: Option<Box<stats::ProgressTally>>,
    /// When the last expected delivery arrived (or the run gave up).
    finished_at: Option<Instant>,
}

#[derive(Debug)]
enum Part {
    Sender(Sender),
    Receiver(Receiver),
}

/// One APEX endpoint on its own connection.
#[derive(Debug)]
struct Endpoint {
    name: String,
    /// Sender or receiver index.
    index: usize,
    conn: Conn,
    phase: Phase,
    channel: u32,
    depth: usize,
    /// Messages per second this sender offers (open loop), if any.
    rate: Option<f64>,
    size: usize,
    /// Speak TLS to the relay before attaching.
    tls: Option<TlsClient>,
    part: Part,
    shared: Arc<Shared>,
    errors: u64,
    error_samples: Vec<String>,
    notes: Vec<String>,
    /// Octets moved while measuring, and the connection's count when last looked at.
    wire_in_window: u64,
    wire_seen: u64,
}

/// When message `seq` of an open-loop sender offering `rate` messages per second is due.
fn due_at(schedule: &Schedule, seq: u64, rate: f64) -> Instant {
    schedule.start + Duration::from_secs_f64(seq as f64 / rate)
}

/// The `data` message around a payload: (prefix, suffix).
fn data_frame(originator: &str, recipients: &[String]) -> (Bytes, &'static [u8]) {
    DataBuilder::new(originator)
        .to_all(recipients.iter().map(String::as_str))
        .inline_frame()
}

/// Finds the payload in a delivered `data` message and decodes its stamp. `hint` is where the
/// payload began in the last message: a sender's messages differ only in it, so that is tried
/// first, and updated when the search had to look elsewhere.
fn stamp_of(message: &[u8], hint: &mut usize) -> Option<Stamp> {
    let at = match message.get(*hint..) {
        Some(rest) if message[..*hint].ends_with(CONTENT_OPEN) => rest,
        _ => {
            let at = memchr::memmem::find(message, CONTENT_OPEN)? + CONTENT_OPEN.len();
            *hint = at;
            &message[at..]
        }
    };
    payload::decode(at)
}

fn is_ok_reply(payload: &Bytes) -> bool {
    matches!(parse_answer(payload), Ok(Answer::Ok))
}

impl Endpoint {
    fn connect(
        config: &Config,
        shared: &Arc<Shared>,
        index: usize,
        receiver: bool,
        blocking: bool,
    ) -> Result<Self> {
        let rcv = |r: usize| format!("rcv{r}@{}", config.domain);
        let snd = |s: usize| format!("snd{s}@{}", config.domain);
        let body = config.size.max(payload::MIN_SIZE);
        let (name, part) = if receiver {
            // What the relay delivers: the data with this recipient only.
            let senders = config.senders_of(index);
            let message_lens = senders
                .iter()
                .map(|&s| {
                    let (prefix, suffix) = data_frame(&snd(s), &[rcv(index)]);
                    prefix.len() + body + suffix.len()
                })
                .collect();
            let part = Part::Receiver(Receiver {
                message_lens,
                payload_at: 0,
                tracks: senders.into_iter().map(|s| (s, 0)).collect(),
                stride: config.stride(),
                delivered: 0,
                in_window: 0,
                lost: 0,
                reordered: 0,
                latency: Box::new(stats::latency_histogram()),
                tally: config.progress.then(Box::default),
                finished_at: None,
            });
            (rcv(index), part)
        } else {
            let recipients: Vec<String> =
                config.recipients_of(index).into_iter().map(rcv).collect();
            let (prefix, suffix) = data_frame(&snd(index), &recipients);
            let part = Part::Sender(Sender {
                prefix,
                suffix,
                stride: config.stride(),
                offset: index as u64 % config.stride(),
                build: BytesMut::new(),
                next_seq: 0,
                outstanding: 0,
                answered: 0,
                acked: 0,
                acked_in_window: 0,
                draining: false,
            });
            (snd(index), part)
        };
        let conn = Conn::connect(config.relay, blocking, config.depth)
            .with_context(|| format!("endpoint {name}"))?;
        Ok(Self {
            name,
            index,
            conn,
            phase: Phase::Greeting,
            channel: 0,
            depth: config.depth,
            rate: config.rate.map(|r| r / config.pairs.max(1) as f64),
            size: config.size,
            tls: config.tls.clone(),
            part,
            shared: Arc::clone(shared),
            errors: 0,
            error_samples: Vec::new(),
            notes: Vec::new(),
            wire_in_window: 0,
            wire_seen: 0,
        })
    }

    fn error(&mut self, text: impl FnOnce() -> String) {
        self.errors += 1;
        if self.error_samples.len() < MAX_SAMPLES {
            self.error_samples.push(text());
        }
    }

    fn into_outcome(self) -> Outcome {
        let measure_end = self.shared.schedule.get().map(|s| s.measure_end);
        let role = match self.part {
            Part::Sender(s) => PartOutcome::Sender {
                sent: s.next_seq,
                answered: s.answered,
                acked: s.acked,
                acked_in_window: s.acked_in_window,
            },
            Part::Receiver(r) => PartOutcome::Receiver {
                delivered: r.delivered,
                in_window: r.in_window,
                seen: r.tracks,
                lost: r.lost,
                reordered: r.reordered,
                latency: r.latency,
                drain_s: match (measure_end, r.finished_at) {
                    (Some(end), Some(at)) => at.saturating_duration_since(end).as_secs_f64(),
                    _ => 0.0,
                },
            },
        };
        Outcome {
            index: self.index,
            wire_in_window: self.wire_in_window,
            name: self.name,
            errors: self.errors,
            error_samples: self.error_samples,
            notes: self.notes,
            role,
        }
    }

    fn try_step(&mut self) -> Result<bool> {
        if self.shared.abort.load(Ordering::Acquire) {
            self.phase = Phase::Done;
            return Ok(true);
        }
        let now = Instant::now();
        let schedule = self.shared.schedule.get().copied();
        if let Some(s) = schedule {
            if now >= s.hard_stop && self.phase == Phase::Running {
                self.hard_stop();
                self.phase = Phase::Done;
                return Ok(true);
            }
        }
        if let Phase::Releasing { deadline } = self.phase {
            if now >= deadline {
                self.notes.push(format!(
                    "session release not completed within {} s",
                    RELEASE_TIMEOUT.as_secs()
                ));
                self.phase = Phase::Done;
                return Ok(true);
            }
        }
        if let (Phase::Running, Some(s)) = (self.phase, schedule) {
            self.produce(now, &s)?;
        }
        let mut progress = self.conn.flush()?;
        if matches!(self.phase, Phase::Releasing { .. })
            && self.conn.session.is_finished()
            && self.conn.outbox.is_empty()
        {
            self.phase = Phase::Done;
            return Ok(true);
        }
        if self.rate.is_some() && self.conn.blocking {
            self.conn.set_read_wait(self.read_wait(Instant::now()))?;
        }
        progress |= self.conn.fill(now)?;
        if self.conn.eof {
            if matches!(self.phase, Phase::Releasing { .. }) {
                self.phase = Phase::Done;
                return Ok(true);
            }
            bail!("the relay closed the connection");
        }
        let now = Instant::now();
        let now_ns = self.shared.now_ns(now);
        let measuring = schedule.is_some_and(|s| s.measuring(now));
        if measuring {
            self.wire_in_window += self.conn.moved - self.wire_seen;
        }
        self.wire_seen = self.conn.moved;
        while let Some(event) = self.conn.session.poll_event() {
            progress = true;
            self.on_event(event, now_ns, measuring)?;
        }
        if let Part::Receiver(Receiver {
            tally: Some(tally), ..
        }) = &mut self.part
        {
            tally.merge_into(&self.shared.progress, now);
        }
        self.check_finished(now);
        Ok(progress)
    }

    /// A sender tops up to `depth` outstanding messages until the window ends, then drains.
    fn produce(&mut self, now: Instant, schedule: &Schedule) -> Result<()> {
        let Part::Sender(s) = &mut self.part else {
            return Ok(());
        };
        if now >= schedule.measure_end {
            s.draining = true;
        }
        if s.draining || s.outstanding >= self.depth {
            return Ok(());
        }
        let now_ns = self.shared.now_ns(now);
        let len = s.prefix.len() + self.size.max(payload::MIN_SIZE) + s.suffix.len();
        while s.outstanding < self.depth {
            // Open loop: message k is due at start + k / rate and is stamped with that time,
            // so a late send (a full depth, a slow relay) shows as latency.
            let sent_ns = match self.rate {
                Some(rate) => {
                    let due = due_at(schedule, s.next_seq, rate);
                    if due > now {
                        break;
                    }
                    self.shared.now_ns(due)
                }
                None => now_ns,
            };
            if s.build.capacity() - s.build.len() < len {
                // Messages are carved out of shared chunks: one allocation per chunk, not
                // per message.
                s.build.reserve(len.max(BUILD_CHUNK));
            }
            s.build.put_slice(&s.prefix);
            let stamp = Stamp {
                seq: s.next_seq * s.stride + s.offset,
                sent_ns,
            };
            payload::encode(&mut s.build, stamp, self.size);
            s.build.put_slice(s.suffix);
            let message = s.build.split().freeze();
            self.conn
                .session
                .send_msg(self.channel, message)
                .map_err(|e| anyhow!("queueing data: {e}"))?;
            s.outstanding += 1;
            s.next_seq += 1;
        }
        Ok(())
    }

    /// How long a blocking read may wait: until the next message is due in open-loop mode.
    fn read_wait(&self, now: Instant) -> Duration {
        match (&self.part, self.rate, self.shared.schedule.get()) {
            (Part::Sender(s), Some(rate), Some(schedule)) if !s.draining => {
                due_at(schedule, s.next_seq, rate)
                    .saturating_duration_since(now)
                    .clamp(MIN_READ_WAIT, READ_TIMEOUT)
            }
            _ => READ_TIMEOUT,
        }
    }

    /// Moves to the release once this endpoint's part of the run is over.
    fn check_finished(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        let finished = match &mut self.part {
            Part::Sender(s) => {
                let done = s.draining && s.outstanding == 0;
                if done {
                    self.shared.finished[self.index].store(s.answered, Ordering::Release);
                }
                done
            }
            Part::Receiver(r) => {
                // Close only once every `ok` is on the wire: the session interleaves channels
                // frame by frame, and a relay declines a close that overtakes its replies.
                let all_seen = r.tracks.iter().all(|&(sender, seen)| {
                    let answered = self.shared.finished[sender].load(Ordering::Acquire);
                    answered != u64::MAX && seen >= answered
                });
                if all_seen && r.finished_at.is_none() {
                    r.finished_at = Some(now);
                }
                all_seen && !self.conn.session.has_output() && self.conn.outbox.is_empty()
            }
        };
        if finished {
            match self.conn.session.close_session(200) {
                Ok(()) => {
                    self.phase = Phase::Releasing {
                        deadline: now + RELEASE_TIMEOUT,
                    }
                }
                Err(e) => {
                    self.notes.push(format!("no session release: {e}"));
                    self.phase = Phase::Done;
                }
            }
        }
    }

    /// The run's hard stop came before this endpoint finished.
    fn hard_stop(&mut self) {
        match &mut self.part {
            Part::Sender(s) if s.outstanding > 0 => {
                let outstanding = s.outstanding;
                self.error(|| {
                    format!(
                        "hard stop: {outstanding} data messages still unacknowledged by the relay {} s after the end of the run",
                        Schedule::GRACE.as_secs()
                    )
                });
            }
            Part::Receiver(r) => {
                r.finished_at.get_or_insert_with(Instant::now);
                let seen: Vec<String> = r
                    .tracks
                    .iter()
                    .map(|(sender, seen)| format!("{seen} from snd{sender}"))
                    .collect();
                self.notes.push(format!(
                    "hard stop: still waiting for deliveries ({} seen)",
                    seen.join(", ")
                ));
            }
            Part::Sender(_) => {}
        }
    }

    fn on_event(&mut self, event: Event, now_ns: u64, measuring: bool) -> Result<()> {
        match event {
            Event::Greeting(greeting)
                if self.phase == Phase::Greeting
                    && self.tls.is_some()
                    && self.conn.tls.is_none() =>
            {
                if !greeting.profiles.iter().any(|p| p == tuning::TLS_PROFILE) {
                    bail!("the relay does not offer TLS (is apexd running with --tls-cert and --tls-key?)");
                }
                let ready = ProfileOffer {
                    uri: tuning::TLS_PROFILE.to_owned(),
                    content: Some(Bytes::from_static(tuning::READY.as_bytes())),
                };
                let channel = self
                    .conn
                    .session
                    .start_channel(vec![ready], None)
                    .map_err(|e| anyhow!("starting the TLS profile: {e}"))?;
                self.phase = Phase::StartingTls { channel };
            }
            Event::ChannelStarted {
                channel, content, ..
            } if self.phase == (Phase::StartingTls { channel }) => {
                let content = content.unwrap_or_default();
                match tuning::parse(&content, 4, 4) {
                    Ok(TuningElement::Proceed) => {}
                    Ok(TuningElement::Error(e)) => {
                        bail!("the relay refused TLS: {} {}", e.code, e.text)
                    }
                    _ => bail!(
                        "the relay answered the piggybacked ready with {:?}",
                        String::from_utf8_lossy(&content).trim()
                    ),
                }
                let Some(client) = &self.tls else {
                    bail!("TLS started without a TLS configuration");
                };
                let layer = client.layer()?;
                self.conn.begin_tls(layer)?;
                self.phase = Phase::Greeting;
            }
            Event::Greeting(_) if self.phase == Phase::Greeting => {
                if let Some(tls) = &self.conn.tls {
                    let _ = self.shared.tls.set(tls.describe());
                }
                let offer = attach_offer(&self.name, 1);
                let channel = self
                    .conn
                    .session
                    .start_channel(vec![offer], None)
                    .map_err(|e| anyhow!("starting the APEX channel: {e}"))?;
                self.phase = Phase::Attaching { channel };
            }
            Event::ChannelStarted {
                channel, content, ..
            } if self.phase == (Phase::Attaching { channel }) => {
                let reply = content.unwrap_or_default();
                if parse_piggybacked_answer(&reply) != Ok(Answer::Ok) {
                    bail!(
                        "the relay did not accept the attach of {}: piggybacked reply {:?}",
                        self.name,
                        String::from_utf8_lossy(&reply).trim()
                    );
                }
                self.channel = channel;
                self.phase = Phase::Running;
                self.shared.attached.fetch_add(1, Ordering::AcqRel);
            }
            Event::StartRefused { channel, error } => bail!(
                "the relay refused to start the APEX channel {channel}: {} {}",
                error.code,
                error.text
            ),
            Event::Message {
                channel,
                msgno,
                payload,
            } => {
                self.on_message(&payload, now_ns, measuring);
                self.conn
                    .session
                    .send_rpy(channel, msgno, ok_payload())
                    .map_err(|e| anyhow!("answering MSG {msgno}: {e}"))?;
            }
            Event::Reply { kind, payload, .. } => self.on_reply(kind, &payload, measuring),
            Event::ChannelClosed { channel, .. }
                if channel == self.channel && !matches!(self.phase, Phase::Releasing { .. }) =>
            {
                bail!("the relay closed the APEX channel");
            }
            Event::CloseRefused { error, .. } => {
                self.notes.push(format!(
                    "the relay declined the session release: {} {}",
                    error.code, error.text
                ));
                self.phase = Phase::Done;
            }
            _ => {}
        }
        Ok(())
    }

    /// A MSG from the relay: for a receiver, one delivered `data`.
    fn on_message(&mut self, message: &Bytes, now_ns: u64, measuring: bool) {
        let Part::Receiver(r) = &mut self.part else {
            let text = String::from_utf8_lossy(&message[..message.len().min(200)]).into_owned();
            self.error(|| format!("unexpected message from the relay: {text:?}"));
            return;
        };
        let Some(stamp) = stamp_of(message, &mut r.payload_at) else {
            let text = String::from_utf8_lossy(&message[..message.len().min(200)]).into_owned();
            self.error(|| format!("undecodable delivery: {text:?}"));
            return;
        };
        r.delivered += 1;
        // Which sender (fan-in: the residue), and that sender's message number.
        let slot = (stamp.seq % r.stride) as usize;
        let k = stamp.seq / r.stride;
        let slot = if r.tracks.len() == 1 { 0 } else { slot };
        let (Some((sender, next)), Some(&want)) =
            (r.tracks.get_mut(slot), r.message_lens.get(slot))
        else {
            self.error(|| format!("delivery with seq {} from no known sender", stamp.seq));
            return;
        };
        let sender = *sender;
        let len = message.len();
        let gap = k.saturating_sub(*next);
        let expected = *next;
        if k >= *next {
            r.lost += gap;
            *next = k + 1;
        } else {
            r.reordered += 1;
            if self.notes.len() < MAX_SAMPLES {
                self.notes.push(format!(
                    "message {k} of snd{sender} arrived after message {}",
                    expected - 1
                ));
            }
        }
        if gap > 0 && self.notes.len() < MAX_SAMPLES {
            self.notes.push(format!(
                "gap: message {k} of snd{sender} arrived when {expected} was due ({gap} missing)"
            ));
        }
        if measuring {
            r.in_window += 1;
            stats::record_ns(&mut r.latency, now_ns.saturating_sub(stamp.sent_ns));
        }
        if let Some(tally) = &mut r.tally {
            tally.record(now_ns.saturating_sub(stamp.sent_ns));
        }
        if len != want {
            self.error(|| {
                format!(
                    "delivery of seq {} has {len} octets, {want} were sent",
                    stamp.seq
                )
            });
        }
    }

    /// A reply to one of our MSGs: for a sender, the relay's answer to a `data`.
    fn on_reply(&mut self, kind: ReplyKind, payload: &Bytes, measuring: bool) {
        let Part::Sender(s) = &mut self.part else {
            self.error(|| "reply to a MSG a receiver never sent".to_owned());
            return;
        };
        s.outstanding = s.outstanding.saturating_sub(1);
        s.answered += 1;
        if kind == ReplyKind::Rpy && is_ok_reply(payload) {
            s.acked += 1;
            s.acked_in_window += u64::from(measuring);
            return;
        }
        let text = String::from_utf8_lossy(payload).trim().to_owned();
        self.error(|| format!("the relay answered data with {kind:?}: {text}"));
    }
}

impl Task for Endpoint {
    fn step(&mut self) -> bool {
        if self.phase == Phase::Done {
            return false;
        }
        match self.try_step() {
            Ok(progress) => progress,
            Err(e) => {
                let text = format!("{e:#}");
                self.error(|| text);
                self.phase = Phase::Done;
                self.shared.abort.store(true, Ordering::Release);
                true
            }
        }
    }

    fn done(&self) -> bool {
        self.phase == Phase::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apex_proto::apex::msg::{parse_message, ApexLimits, Operation};

    fn config(pattern: Pattern, pairs: usize) -> Config {
        Config {
            relay: "127.0.0.1:913".parse().unwrap(),
            domain: "example.com".into(),
            pairs,
            pattern,
            size: 128,
            depth: 64,
            rate: None,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            threads: 1,
            cpus: Vec::new(),
            progress: false,
            tls: None,
        }
    }

    #[test]
    fn patterns_map_senders_to_receivers() {
        let pairs = config(Pattern::Pairs, 3);
        assert_eq!(
            (pairs.senders(), pairs.receivers(), pairs.stride()),
            (3, 3, 1)
        );
        assert_eq!(pairs.recipients_of(2), vec![2]);
        assert_eq!(pairs.senders_of(1), vec![1]);

        let fan_in = config(Pattern::FanIn, 3);
        assert_eq!(
            (fan_in.senders(), fan_in.receivers(), fan_in.stride()),
            (3, 1, 3)
        );
        assert_eq!(fan_in.recipients_of(2), vec![0]);
        assert_eq!(fan_in.senders_of(0), vec![0, 1, 2]);

        let fan_out = config(Pattern::FanOut, 3);
        assert_eq!(
            (fan_out.senders(), fan_out.receivers(), fan_out.stride()),
            (1, 3, 1)
        );
        assert_eq!(fan_out.recipients_of(0), vec![0, 1, 2]);
        assert_eq!(fan_out.senders_of(2), vec![0]);
    }

    #[test]
    fn data_message_parses_and_carries_the_stamp() {
        let (prefix, suffix) = data_frame(
            "snd0@example.com",
            &["rcv0@example.com".to_owned(), "rcv1@example.com".to_owned()],
        );
        let mut m = BytesMut::new();
        m.put_slice(&prefix);
        let stamp = Stamp {
            seq: 42,
            sent_ns: 1_234_567,
        };
        payload::encode(&mut m, stamp, 128);
        m.put_slice(suffix);
        let m = m.freeze();
        let Ok(Operation::Data(data)) = parse_message(&m, &ApexLimits::default()) else {
            panic!("not a data: {}", String::from_utf8_lossy(&m));
        };
        assert_eq!(data.originator.identity, "snd0@example.com");
        assert_eq!(data.recipients[0].identity, "rcv0@example.com");
        assert_eq!(data.recipients[1].identity, "rcv1@example.com");
        let content = data.data_content.unwrap();
        assert_eq!(
            content.len(),
            CONTENT_OPEN.len() + 128 + "</data-content>".len()
        );
        let mut hint = 0;
        assert_eq!(stamp_of(&m, &mut hint), Some(stamp));
        assert_eq!(&m[hint - CONTENT_OPEN.len()..hint], CONTENT_OPEN);
        // The hint serves the next message, and a wrong one is searched past.
        assert_eq!(stamp_of(&m, &mut hint), Some(stamp));
        let mut wrong = 7;
        assert_eq!(stamp_of(&m, &mut wrong), Some(stamp));
        assert_eq!(wrong, hint);
    }

    #[test]
    fn ok_replies_are_recognised() {
        assert!(is_ok_reply(&ok_payload()));
        let spaced = Bytes::from_static(b"Content-Type: application/beep+xml\r\n\r\n<ok/>");
        assert!(is_ok_reply(&spaced));
        let error = apex_proto::apex::msg::error_payload(550, "no");
        assert!(!is_ok_reply(&error));
    }
}
