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
//! Sender-side, the time from writing a data (its stamp: the due time in open loop) to reading
//! the relay's reply is the `ok` latency; replies other than `ok` are counted apart. With
//! `hold`, every data carries a per-data `hold4Endpoint` option (RFC 3342 §3); with
//! `absent_receivers`, no receiver attaches (the data goes to endpoints that are not attached,
//! held or dropped by the relay) and the run ends when every data has its reply.
//!
//! Setters (see [`crate::access`]) are endpoints that change their own access entries through
//! `apex=access@DOMAIN` with `set` data, and read the service's `reply` and the owner notice
//! that come back as data: one `setter@DOMAIN` on a thread of its own beside the pairs (open
//! loop, `--sets-per-sec`; its failure ends only itself), or `setter{i}@DOMAIN` alone
//! (`apex-load access`, closed loop).
//!
//! ```text
//!   main: connect all ──► spawn threads ──► wait until every endpoint attached ──► schedule
//!   (TLS:     greeting ─► start TLS + ready ─► proceed ─► handshake ─► then as below)
//!   sender:   greeting ─► attach ─► (schedule) send ≤ depth ... measure_end ─► drain acks ─► release
//!   receiver: greeting ─► attach ─► answer ok, check seq, latency ... all acked seen ─► release
//!   setter:   greeting ─► attach ─► (schedule) set ≤ depth, answer ok to replies and notices
//!             ... measure_end ─► every request answered ─► release
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use apex_proto::apex::access_ops::{
    carried_element, element_data, format_request, parse_answer as parse_access_answer,
    service_endpoint,
};
use apex_proto::apex::client::{
    attach_offer, ok_payload, parse_answer, parse_incoming, parse_piggybacked_answer, Answer,
    DataBuilder, Incoming, DATA_CONTENT_OPEN,
};
use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::beep::tuning::{self, TuningElement};
use apex_proto::tls::TlsLayer;
use apex_proto::{Event, Limits, ReplyKind, Role, Session, SessionConfig};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;

use crate::access::{Answered, SetBook, SetReport, MAX_ACTORS, SET_OK};
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
    /// Every data carries a per-data `hold4Endpoint` option (RFC 3342 §3).
    pub(crate) hold: bool,
    /// The receivers never attach: the data goes to endpoints that are not attached, and the
    /// run ends when every data got its reply.
    pub(crate) absent_receivers: bool,
    /// Endpoints that change their own access entries through `apex=access@DOMAIN`.
    pub(crate) setters: Option<SetterConfig>,
}

/// The setters of a run: connections attached as `setter@DOMAIN` (beside pairs) or
/// `setter{i}@DOMAIN` (alone), each making access `set`s (see [`crate::access`]).
#[derive(Debug, Clone)]
pub(crate) struct SetterConfig {
    /// Setter connections.
    pub(crate) connections: usize,
    /// Most requests in flight per connection (capped at the actors per owner).
    pub(crate) depth: usize,
    /// Open loop: sets per second in total; `None`: closed loop, `depth` in flight.
    pub(crate) rate: Option<f64>,
    /// Beside the pairs: one setter, `setter@DOMAIN`, on a thread of its own, whose failure
    /// ends only itself (it touches the pairs only through the relay).
    pub(crate) background: bool,
}

impl SetterConfig {
    /// The endpoint setter `i` attaches as.
    fn name(&self, i: usize, domain: &str) -> String {
        if self.background {
            format!("setter@{domain}")
        } else {
            format!("setter{i}@{domain}")
        }
    }
}

/// What an endpoint does in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Receiver,
    Sender,
    Setter,
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

    /// Number of receiving endpoints that attach (none with `absent_receivers`).
    fn attached_receivers(&self) -> usize {
        if self.absent_receivers {
            0
        } else {
            self.receivers()
        }
    }

    /// Number of setter connections.
    fn setter_count(&self) -> usize {
        self.setters.as_ref().map_or(0, |s| s.connections)
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
    let receivers = config.attached_receivers();
    let mut endpoints = Vec::with_capacity(config.senders() + receivers + config.setter_count());
    for i in 0..config.senders().max(receivers) {
        if i < receivers {
            endpoints.push((i, Kind::Receiver));
        }
        if i < config.senders() {
            endpoints.push((i, Kind::Sender));
        }
    }
    // A background setter gets a thread of its own; setters alone are dealt like endpoints.
    let background = config.setters.as_ref().is_some_and(|s| s.background);
    let setters: Vec<(usize, Kind)> = (0..config.setter_count())
        .map(|i| (i, Kind::Setter))
        .collect();
    let mut own_thread = Vec::new();
    if background {
        own_thread = setters;
    } else {
        endpoints.extend(setters);
    }
    let groups = driver::deal(endpoints, config.threads);
    let threads = groups.len();
    let mut tasks = Vec::with_capacity(threads);
    for group in groups
        .into_iter()
        .chain([own_thread].into_iter().filter(|g| !g.is_empty()))
    {
        let blocking = group.len() == 1;
        let mut list = Vec::with_capacity(group.len());
        for (index, role) in group {
            list.push(Endpoint::connect(config, &shared, index, role, blocking)?);
        }
        tasks.push(list);
    }
    let total = config.senders() + receivers + config.setter_count();
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
        /// Replies other than `ok` (ERR, or a RPY that is no `ok`).
        refused: u64,
        /// Time from writing a data to reading the relay's `ok`, measured window.
        ok_latency: Box<Histogram<u64>>,
    },
    Setter(Box<SetterStats>),
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
    let mut ok_latency = stats::latency_histogram();
    let mut set_latency = stats::latency_histogram();
    let target = if config.senders() == 0 && config.setters.is_some() {
        "access"
    } else {
        "apex"
    };
    let mut r = Report::empty(target, &config.relay.to_string());
    r.hold = config.hold;
    r.absent_receivers = config.absent_receivers;
    if let Some(s) = &config.setters {
        r.sets = Some(SetReport {
            connections: s.connections,
            depth: s.depth,
            rate: s.rate,
            ..SetReport::default()
        });
    }
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
                refused,
                ok_latency: h,
                ..
            } => {
                r.sent += sent;
                r.acknowledged += acked;
                r.refused += refused;
                acked_in_window_total += acked_in_window;
                if ok_latency.add(&*h).is_err() {
                    r.notes
                        .push(format!("{}: ok latency histogram not merged", o.name));
                }
            }
            PartOutcome::Setter(st) => {
                if set_latency.add(&st.latency).is_err() {
                    r.notes
                        .push(format!("{}: set latency histogram not merged", o.name));
                }
                if let Some(sets) = &mut r.sets {
                    st.add_to(sets);
                }
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
    r.ok_latency_us = stats::LatencySummary::of(&ok_latency);
    if let Some(sets) = &mut r.sets {
        sets.latency_us = stats::LatencySummary::of(&set_latency);
        if secs > 0.0 {
            sets.sets_per_sec = sets.ok_in_window as f64 / secs;
        }
        // A set not answered 250, or never seen by the service, is a failed operation.
        r.errors += sets.failed + sets.refused + sets.unanswered;
    }
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
    /// Replies other than `ok`.
    refused: u64,
    /// Send time (ns, the stamp's) of each data not yet answered, oldest first: the relay
    /// answers a channel's MSGs in order.
    sent_at: VecDeque<u64>,
    /// Time from writing a data to reading its `ok`, replies in the measured window.
    ok_latency: Box<Histogram<u64>>,
    /// Past the measured window: no new messages.
    draining: bool,
}

/// A setter's state: the bookkeeping of its access entries and what it counted.
#[derive(Debug)]
struct Setter {
    book: SetBook,
    /// `apex=access@DOMAIN`.
    service: String,
    /// The transID each data sent carries, oldest first (the relay answers in order).
    data_sent: VecDeque<u32>,
    /// Open loop: sets per second of this setter.
    rate: Option<f64>,
    /// Requests sent so far (in open loop, request k is due at start + k / rate).
    issued: u64,
    depth: usize,
    draining: bool,
    stats: Box<SetterStats>,
}

/// What one setter counted.
#[derive(Debug)]
struct SetterStats {
    sent: u64,
    ok: u64,
    failed: u64,
    existed: u64,
    refused: u64,
    codes: BTreeMap<u16, u64>,
    ok_in_window: u64,
    gets: u64,
    stray: u64,
    unanswered: u64,
    /// Set latency (sent or due to reply 250), replies in the measured window.
    latency: Histogram<u64>,
}

impl SetterStats {
    fn new() -> Self {
        Self {
            sent: 0,
            ok: 0,
            failed: 0,
            existed: 0,
            refused: 0,
            codes: BTreeMap::new(),
            ok_in_window: 0,
            gets: 0,
            stray: 0,
            unanswered: 0,
            latency: stats::latency_histogram(),
        }
    }

    /// Adds the counts (not the latency) to the report's.
    fn add_to(&self, r: &mut SetReport) {
        r.sent += self.sent;
        r.ok += self.ok;
        r.failed += self.failed;
        r.existed += self.existed;
        r.refused += self.refused;
        for (code, n) in &self.codes {
            *r.codes.entry(*code).or_default() += n;
        }
        r.ok_in_window += self.ok_in_window;
        r.gets += self.gets;
        r.stray += self.stray;
        r.unanswered += self.unanswered;
    }

    /// Counts the reply `code` to a set that took `latency_ns` (`existed`: a create of an entry
    /// that was there already).
    fn record(&mut self, code: u16, latency_ns: u64, existed: bool, measuring: bool) {
        *self.codes.entry(code).or_default() += 1;
        if existed {
            self.existed += 1;
        } else if code == SET_OK {
            self.ok += 1;
            if measuring {
                self.ok_in_window += 1;
                stats::record_ns(&mut self.latency, latency_ns);
            }
        } else {
            self.failed += 1;
        }
    }
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
    Setter(Box<Setter>),
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
    /// A failure ends this endpoint only, not the run (the background setter).
    alone: bool,
}

/// When message `seq` of an open-loop sender offering `rate` messages per second is due.
fn due_at(schedule: &Schedule, seq: u64, rate: f64) -> Instant {
    schedule.start + Duration::from_secs_f64(seq as f64 / rate)
}

/// The `data` message around a payload: (prefix, suffix); with `hold`, a per-data
/// `hold4Endpoint` option with that transID.
fn data_frame(
    originator: &str,
    recipients: &[String],
    hold: Option<u32>,
) -> (Bytes, &'static [u8]) {
    let builder = DataBuilder::new(originator).to_all(recipients.iter().map(String::as_str));
    match hold {
        Some(trans_id) => builder.option(hold_option(trans_id)),
        None => builder,
    }
    .inline_frame()
}

/// The per-data `hold4Endpoint` option (RFC 3342 §3, §5.3): no content, no attributes of its
/// own; the relay queues the data for a recipient that is not attached.
fn hold_option(trans_id: u32) -> String {
    format!("<option internal='hold4Endpoint' transID='{trans_id}' />")
}

/// The transID of sender `s`'s `hold4Endpoint` option: the same on each of its data, so every
/// data of a sender has the same length (the option asks for no report that would need it).
fn hold_trans_id(config: &Config, s: usize) -> Option<u32> {
    config
        .hold
        .then(|| u32::try_from(s + 1).unwrap_or(u32::MAX).min(2_147_483_647))
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
        role: Kind,
        blocking: bool,
    ) -> Result<Self> {
        let rcv = |r: usize| format!("rcv{r}@{}", config.domain);
        let snd = |s: usize| format!("snd{s}@{}", config.domain);
        let body = config.size.max(payload::MIN_SIZE);
        let mut depth = config.depth;
        let mut rate = config.rate.map(|r| r / config.pairs.max(1) as f64);
        let (name, part) = if role == Kind::Setter {
            let Some(setters) = &config.setters else {
                bail!("a setter without a setter configuration");
            };
            let name = setters.name(index, &config.domain);
            depth = setters.depth.clamp(1, MAX_ACTORS);
            rate = setters.rate.map(|r| r / setters.connections.max(1) as f64);
            let part = Part::Setter(Box::new(Setter {
                book: SetBook::new(&name, &config.domain, MAX_ACTORS),
                service: service_endpoint(&config.domain),
                data_sent: VecDeque::new(),
                rate,
                issued: 0,
                depth,
                draining: false,
                stats: Box::new(SetterStats::new()),
            }));
            (name, part)
        } else if role == Kind::Receiver {
            // What the relay delivers: the data with this recipient only (a final-hop option
            // such as hold4Endpoint stays in it).
            let senders = config.senders_of(index);
            let message_lens = senders
                .iter()
                .map(|&s| {
                    let (prefix, suffix) =
                        data_frame(&snd(s), &[rcv(index)], hold_trans_id(config, s));
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
            let (prefix, suffix) =
                data_frame(&snd(index), &recipients, hold_trans_id(config, index));
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
                refused: 0,
                sent_at: VecDeque::with_capacity(config.depth),
                ok_latency: Box::new(stats::latency_histogram()),
                draining: false,
            });
            (snd(index), part)
        };
        let conn = Conn::connect(config.relay, blocking, depth)
            .with_context(|| format!("endpoint {name}"))?;
        let alone = role == Kind::Setter && config.setters.as_ref().is_some_and(|s| s.background);
        Ok(Self {
            name,
            index,
            conn,
            phase: Phase::Greeting,
            channel: 0,
            depth,
            rate,
            size: config.size,
            tls: config.tls.clone(),
            part,
            shared: Arc::clone(shared),
            errors: 0,
            error_samples: Vec::new(),
            notes: Vec::new(),
            wire_in_window: 0,
            wire_seen: 0,
            alone,
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
                refused: s.refused,
                ok_latency: s.ok_latency,
            },
            Part::Setter(mut s) => {
                s.stats.unanswered += s.book.in_flight() as u64;
                PartOutcome::Setter(s.stats)
            }
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
        if let Part::Setter(s) = &mut self.part {
            s.book.expire(now_ns);
        }
        self.check_finished(now);
        Ok(progress)
    }

    /// A setter tops up to `depth` requests in flight (open loop: as they fall due) until the
    /// window ends, then drains.
    fn produce_sets(&mut self, now: Instant, schedule: &Schedule) -> Result<()> {
        let Part::Setter(s) = &mut self.part else {
            return Ok(());
        };
        if now >= schedule.measure_end {
            s.draining = true;
        }
        let now_ns = self.shared.now_ns(now);
        while !s.draining && s.book.in_flight() < s.depth {
            let sent_ns = match s.rate {
                Some(rate) => {
                    let due = due_at(schedule, s.issued, rate);
                    if due > now {
                        break;
                    }
                    self.shared.now_ns(due)
                }
                None => now_ns,
            };
            let Some((request, is_set)) = s.book.next_request(sent_ns) else {
                break;
            };
            s.issued += 1;
            if is_set {
                s.stats.sent += 1;
            } else {
                s.stats.gets += 1;
            }
            let payload = element_data(&self.name, &s.service, &format_request(&request));
            self.conn
                .session
                .send_msg(self.channel, payload)
                .map_err(|e| anyhow!("queueing an access request: {e}"))?;
            s.data_sent.push_back(request.trans_id());
        }
        Ok(())
    }

    /// A sender tops up to `depth` outstanding messages until the window ends, then drains.
    fn produce(&mut self, now: Instant, schedule: &Schedule) -> Result<()> {
        if matches!(self.part, Part::Setter(_)) {
            return self.produce_sets(now, schedule);
        }
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
            s.sent_at.push_back(sent_ns);
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
            (Part::Setter(s), Some(rate), Some(schedule)) if !s.draining => {
                due_at(schedule, s.issued, rate)
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
            // Every request answered, every owner notice in (or overdue), every ok on the
            // wire.
            Part::Setter(s) => {
                s.draining
                    && s.data_sent.is_empty()
                    && s.book.settled()
                    && !self.conn.session.has_output()
                    && self.conn.outbox.is_empty()
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
            Part::Setter(s) if s.book.in_flight() > 0 || !s.data_sent.is_empty() => {
                let (in_flight, data) = (s.book.in_flight(), s.data_sent.len());
                self.notes.push(format!(
                    "hard stop: {in_flight} access requests unanswered ({data} unacknowledged by the relay)"
                ));
            }
            Part::Sender(_) | Part::Setter(_) => {}
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
            Event::Reply { kind, payload, .. } => {
                self.on_reply(kind, &payload, now_ns, measuring);
            }
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

    /// A MSG from the relay to a setter: an answer of the access service (or an owner notice).
    fn on_service_message(&mut self, message: &Bytes, now_ns: u64, measuring: bool) {
        let Part::Setter(s) = &mut self.part else {
            return;
        };
        let answer = match parse_incoming(message) {
            Ok(Incoming::Data(data)) if data.originator.identity == s.service => {
                carried_element(&data).map(|element| parse_access_answer(&element))
            }
            _ => None,
        };
        match answer {
            Some(Ok(answer)) => match s.book.on_answer(&answer, now_ns) {
                Answered::Set {
                    code,
                    latency_ns,
                    existed,
                } => s.stats.record(code, latency_ns, existed, measuring),
                Answered::Other => {}
                Answered::Stray => s.stats.stray += 1,
            },
            Some(Err(e)) => self.error(|| format!("unreadable answer of the access service: {e}")),
            None => {
                let text = String::from_utf8_lossy(&message[..message.len().min(200)]).into_owned();
                self.error(|| format!("unexpected message from the relay: {text:?}"));
            }
        }
    }

    /// A MSG from the relay: for a receiver, one delivered `data`.
    fn on_message(&mut self, message: &Bytes, now_ns: u64, measuring: bool) {
        if matches!(self.part, Part::Setter(_)) {
            return self.on_service_message(message, now_ns, measuring);
        }
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
    fn on_reply(&mut self, kind: ReplyKind, payload: &Bytes, now_ns: u64, measuring: bool) {
        let ok = kind == ReplyKind::Rpy && is_ok_reply(payload);
        match &mut self.part {
            Part::Sender(s) => {
                s.outstanding = s.outstanding.saturating_sub(1);
                s.answered += 1;
                let sent_ns = s.sent_at.pop_front();
                if ok {
                    s.acked += 1;
                    s.acked_in_window += u64::from(measuring);
                    if let (true, Some(sent_ns)) = (measuring, sent_ns) {
                        stats::record_ns(&mut s.ok_latency, now_ns.saturating_sub(sent_ns));
                    }
                    return;
                }
                s.refused += 1;
            }
            Part::Setter(s) => {
                let Some(trans_id) = s.data_sent.pop_front() else {
                    self.error(|| "reply to a MSG the setter never sent".to_owned());
                    return;
                };
                if ok {
                    return;
                }
                if s.book.refused(trans_id) {
                    s.stats.refused += 1;
                }
                let text = String::from_utf8_lossy(payload).trim().to_owned();
                self.notes.push(format!(
                    "the relay answered an access request with {kind:?}: {text}"
                ));
                self.notes.truncate(MAX_SAMPLES);
                return;
            }
            Part::Receiver(_) => {
                self.error(|| "reply to a MSG a receiver never sent".to_owned());
                return;
            }
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
                if !self.alone {
                    self.shared.abort.store(true, Ordering::Release);
                }
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
            hold: false,
            absent_receivers: false,
            setters: None,
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
            None,
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
    fn hold_puts_one_option_in_every_data() {
        let mut c = config(Pattern::Pairs, 3);
        assert_eq!(hold_trans_id(&c, 2), None);
        c.hold = true;
        assert_eq!(hold_trans_id(&c, 0), Some(1));
        assert_eq!(hold_trans_id(&c, 2), Some(3));
        let (prefix, suffix) = data_frame(
            "snd2@example.com",
            &["rcv2@example.com".to_owned()],
            hold_trans_id(&c, 2),
        );
        let mut m = BytesMut::new();
        m.put_slice(&prefix);
        payload::encode(&mut m, Stamp { seq: 1, sent_ns: 2 }, 128);
        m.put_slice(suffix);
        let m = m.freeze();
        assert!(
            memchr::memmem::find(&m, b"<option internal='hold4Endpoint' transID='3' />").is_some()
        );
        let Ok(Operation::Data(data)) = parse_message(&m, &ApexLimits::default()) else {
            panic!("not a data: {}", String::from_utf8_lossy(&m));
        };
        assert_eq!(data.options.len(), 1);
        assert_eq!(data.options[0].name(), "hold4Endpoint");
        assert_eq!(data.options[0].trans_id, 3);
        assert!(apex_proto::apex::options::hold_requested(
            &data.options,
            apex_proto::apex::options::Hop::Final
        ));
        let mut hint = 0;
        assert_eq!(stamp_of(&m, &mut hint), Some(Stamp { seq: 1, sent_ns: 2 }));
    }

    #[test]
    fn absent_receivers_and_setters_change_who_attaches() {
        let mut c = config(Pattern::Pairs, 4);
        assert_eq!((c.attached_receivers(), c.setter_count()), (4, 0));
        c.absent_receivers = true;
        assert_eq!((c.senders(), c.attached_receivers()), (4, 0));
        // The data still names the receivers.
        assert_eq!(c.recipients_of(3), vec![3]);
        let background = SetterConfig {
            connections: 1,
            depth: 8,
            rate: Some(10.0),
            background: true,
        };
        assert_eq!(background.name(0, "example.com"), "setter@example.com");
        c.setters = Some(background);
        assert_eq!(c.setter_count(), 1);
        let alone = SetterConfig {
            connections: 4,
            depth: 1,
            rate: None,
            background: false,
        };
        assert_eq!(alone.name(3, "example.com"), "setter3@example.com");
    }

    #[test]
    fn setter_stats_count_codes_and_window() {
        let mut st = SetterStats::new();
        st.record(250, 2_000_000, false, true);
        st.record(250, 1_000_000, false, false);
        st.record(555, 500_000, false, true);
        st.record(555, 500_000, true, true);
        let mut r = SetReport::default();
        st.add_to(&mut r);
        st.add_to(&mut r);
        assert_eq!((r.ok, r.failed, r.ok_in_window, r.existed), (4, 2, 2, 2));
        assert_eq!(r.codes.get(&250), Some(&4));
        assert_eq!(r.codes.get(&555), Some(&4));
        // Latency only of 250 replies in the window.
        assert_eq!(st.latency.len(), 1);
        assert!(st.latency.value_at_quantile(0.5).abs_diff(2_000) <= 2);
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
