//! Relay macro benchmark: relayed APEX data messages per second per core for the protocol core
//! alone (no sockets, no runtime), with the BEEP layer and the APEX parser as baselines measured
//! in the same run.
//!
//! Everything runs on one thread, so `Throughput::Elements` (messages per iteration) reads as
//! messages per second per core. Every iteration handles [`MESSAGES`] data messages from
//! `fred@example.com` to `barney@example.com`, built before the measurement: the payload is the
//! `data` layout of `apex_proto::apex::client::DataBuilder` with a `data-content` text of
//! exactly 128 octets (`128B`, a 346-octet BEEP payload) or 4096 octets (`4KiB`, 4314 octets).
//! Benchmarks:
//!
//! * `relay/<size>/1shard`: fred and barney attached to a 1-shard [`RelayNet`] whose access
//!   table grants `*@example.com` `core:data` on example.com. Fred pipelines the messages
//!   (`send_nowait`), then the net is driven until quiescent: fred's session encodes, the
//!   relay-side session parses, the relay parses the APEX document, checks the originator and
//!   the access entry, routes to barney's attachment and rebuilds the data, the relay-side
//!   session encodes the delivery, barney's session parses it and auto-replies `<ok />`, the
//!   relay consumes that reply, and fred's session parses the relay's `<ok />`. Checked after
//!   every iteration (outside the measurement): barney received all of them and fred got an RPY
//!   to each.
//! * `relay/128B/2shards`: the same with fred connected to shard 0 and barney to shard 1
//!   (`RelayNet::connect` takes the shard; the directory replica of shard 0 points at shard 1).
//!   Each delivery then crosses shards as an `Envelope::Deliver`; both shards run on the
//!   benchmark thread, so the figure is the whole path's cost on one core, and the in-memory
//!   envelope queue is cheaper than a real cross-core channel.
//! * `session_echo/<size>`: the BEEP layer alone. A [`Pair`] with the same session limits as
//!   the relay net; the client pipelines the same payloads on one channel and the server's
//!   `EchoProfile` answers each with a RPY carrying the payload back. `relay / session_echo`
//!   is the cost of the relay over one BEEP request/response exchange (the relay does two: fred
//!   to relay and relay to barney, whose replies are short `<ok />`s).
//! * `apex_parse/<size>`: `apex_proto::apex::msg::parse_message` of the data payload alone,
//!   [`MESSAGES`] times.
//!
//! Harness overhead inside the measurement: both [`RelayNet`] and [`Pair`] copy every octet
//! between the two sessions of a connection once more than a socket write would (`RelayNet`
//! also records them in `to_relay` / `from_relay`, cleared between iterations so their buffers
//! are reused), and record received messages (a `Bytes` clone each).
//!
//! Run: `cargo bench --bench relay` (quick look:
//! `cargo bench --bench relay -- --warm-up-time 1 --measurement-time 3`). Ratios are only
//! meaningful between benchmarks of the same run on a shared machine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::client::DataBuilder;
use apex_proto::apex::msg::{self, ApexLimits, Operation};
use apex_proto::apex::relay::ConnKind;
use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::testing::{ClientId, Pair, RelayNet, APEX_PROFILE};
use apex_proto::ReplyKind;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

/// Data messages per iteration.
const MESSAGES: u32 = 1000;

/// `data-content` text sizes benchmarked, with their labels.
const SIZES: [(usize, &str); 2] = [(128, "128B"), (4096, "4KiB")];

/// Octets of a [`data_message`] around its text: MIME headers, `data`, originator, recipient.
const DATA_OVERHEAD: usize = 218;

const DOMAIN: &str = "example.com";
const FRED: &str = "fred@example.com";
const BARNEY: &str = "barney@example.com";

/// `len` octets of text that need no XML escaping.
fn text(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ";
    (0..len)
        .map(|i| char::from(ALPHABET[i % ALPHABET.len()]))
        .collect()
}

/// The data message fred sends: one recipient, barney, with `text_len` octets of content.
fn data_message(text_len: usize) -> Bytes {
    DataBuilder::new(FRED).to(BARNEY).markup(&text(text_len))
}

/// A net of `shards` relays for example.com where every local endpoint may send data to
/// every other one (as the conformance tests' `granted`).
fn granted(shards: usize) -> RelayNet {
    let mut access = AccessTable::new();
    access
        .grant_domain(
            DOMAIN,
            ActorPattern::parse(&format!("*@{DOMAIN}")).unwrap(),
            vec![Access::CORE_DATA],
        )
        .unwrap();
    RelayNet::with(DOMAIN, shards, access, Vec::new())
}

/// Fred and barney attached to a [`RelayNet`], ready to relay.
struct Relayed {
    net: RelayNet,
    fred: ClientId,
    fred_channel: u32,
    barney: ClientId,
}

impl Relayed {
    fn new(shards: usize, fred_shard: usize, barney_shard: usize) -> Self {
        let mut net = granted(shards);
        let barney = net.connect(barney_shard, ConnKind::Edge);
        let (_, reply) = net.attach(barney, BARNEY);
        assert_eq!(reply, "<ok />", "attach barney");
        let fred = net.connect(fred_shard, ConnKind::Edge);
        let (fred_channel, reply) = net.attach(fred, FRED);
        assert_eq!(reply, "<ok />", "attach fred");
        // Fred's shard routes to barney's: locally, or over the shard queue.
        let at = net
            .relay(fred_shard)
            .lookup(&Endpoint::parse(BARNEY).unwrap())
            .expect("barney in fred's shard's directory");
        assert_eq!(at.shard, barney_shard);
        Self {
            net,
            fred,
            fred_channel,
            barney,
        }
    }

    /// Relays [`MESSAGES`] copies of `payload`; returns the time taken by sending and driving.
    fn run(&mut self, payload: &Bytes) -> Duration {
        for id in [self.fred, self.barney] {
            let client = &mut self.net.clients[id];
            client.received.clear();
            client.replies.clear();
            client.from_relay.clear();
            client.to_relay.clear();
        }
        let envelopes = self.net.envelopes_sent;

        let start = Instant::now();
        for _ in 0..MESSAGES {
            self.net
                .send_nowait(self.fred, self.fred_channel, payload.clone());
        }
        self.net.drive();
        let elapsed = start.elapsed();

        let (fred, barney) = (&self.net.clients[self.fred], &self.net.clients[self.barney]);
        assert!(fred.error.is_none() && barney.error.is_none());
        assert_eq!(barney.received.len(), MESSAGES as usize, "delivered");
        assert_eq!(fred.replies.len(), MESSAGES as usize, "answered");
        assert!(
            fred.replies.iter().all(|r| r.2 == ReplyKind::Rpy),
            "accepted"
        );
        let hops = self.net.envelopes_sent - envelopes;
        let cross = self.net.clients[self.fred].shard != self.net.clients[self.barney].shard;
        assert_eq!(hops, if cross { MESSAGES as usize } else { 0 });
        elapsed
    }
}

/// A BEEP [`Pair`] with one started echo channel, limits as in [`RelayNet`].
struct Echo {
    pair: Pair,
    channel: u32,
}

impl Echo {
    fn new() -> Self {
        let template = RelayNet::new(DOMAIN, 1);
        let mut pair = Pair::with_configs(
            APEX_PROFILE,
            template.initiator_config.clone(),
            template.listener_config.clone(),
        );
        pair.drive();
        let channel = pair
            .client
            .session
            .start_channel(vec![ProfileOffer::new(APEX_PROFILE)], None)
            .unwrap();
        pair.drive();
        assert_eq!(pair.client.profile.started, vec![(channel, None)]);
        Self { pair, channel }
    }

    /// Sends [`MESSAGES`] copies of `payload` and drives until all are echoed; returns the
    /// time taken.
    fn run(&mut self, payload: &Bytes) -> Duration {
        self.pair.server.profile.messages.clear();
        self.pair.client.profile.replies.clear();

        let start = Instant::now();
        for _ in 0..MESSAGES {
            self.pair
                .client
                .session
                .send_msg(self.channel, payload.clone())
                .unwrap();
        }
        self.pair.drive();
        let elapsed = start.elapsed();

        assert!(self.pair.client.error.is_none() && self.pair.server.error.is_none());
        assert_eq!(self.pair.server.profile.messages.len(), MESSAGES as usize);
        let replies = &self.pair.client.profile.replies;
        assert_eq!(replies.len(), MESSAGES as usize);
        assert!(replies
            .iter()
            .all(|r| r.2 == ReplyKind::Rpy && r.3 == *payload));
        elapsed
    }
}

/// Parses `payload` as an APEX message [`MESSAGES`] times.
fn parse_all(payload: &Bytes, limits: &ApexLimits) {
    for _ in 0..MESSAGES {
        let op = msg::parse_message(black_box(payload), limits).unwrap();
        black_box(op);
    }
}

fn bench_relay(c: &mut Criterion) {
    let payloads: Vec<(Bytes, &str)> = SIZES
        .iter()
        .map(|&(size, label)| (data_message(size), label))
        .collect();

    // Sanity checks, outside any measurement: the payload is a data to barney, and the relay
    // delivers it unchanged.
    let limits = ApexLimits::default();
    for ((payload, _), (size, _)) in payloads.iter().zip(SIZES) {
        assert_eq!(payload.len(), size + DATA_OVERHEAD);
        match msg::parse_message(payload, &limits) {
            Ok(Operation::Data(d)) => assert_eq!(d.recipients[0].identity, BARNEY),
            other => panic!("not a data: {other:?}"),
        }
        let mut check = Relayed::new(1, 0, 0);
        check.run(payload);
        assert_eq!(check.net.clients[check.barney].received[0].2, *payload);
    }

    // One iteration takes milliseconds: flat sampling keeps a run near the requested time.
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(u64::from(MESSAGES)));
    group.sampling_mode(SamplingMode::Flat);
    let cases = [
        (&payloads[0], 1, 0, 0, "1shard"),
        (&payloads[1], 1, 0, 0, "1shard"),
        (&payloads[0], 2, 0, 1, "2shards"),
    ];
    for ((payload, label), shards, fred_shard, barney_shard, name) in cases {
        let mut relayed = Relayed::new(shards, fred_shard, barney_shard);
        group.bench_function(format!("{label}/{name}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| relayed.run(payload)).sum());
        });
    }
    group.finish();

    let mut group = c.benchmark_group("session_echo");
    group.throughput(Throughput::Elements(u64::from(MESSAGES)));
    group.sampling_mode(SamplingMode::Flat);
    for (payload, label) in &payloads {
        let mut echo = Echo::new();
        group.bench_function(*label, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| echo.run(payload)).sum());
        });
    }
    group.finish();

    let mut group = c.benchmark_group("apex_parse");
    group.throughput(Throughput::Elements(u64::from(MESSAGES)));
    for (payload, label) in &payloads {
        group.bench_function(*label, |b| b.iter(|| parse_all(payload, &limits)));
    }
    group.finish();
}

criterion_group!(benches, bench_relay);
criterion_main!(benches);
