//! The monitoring endpoint (`metrics_listen`, `--metrics-listen`): Prometheus metrics at
//! `/metrics`, readiness at `/healthz`, and the JSON documents `apex status` reads at
//! `/status`, `/status/endpoints` and `/status/links`.
//!
//! It runs on its own thread, away from the shards. Each shard keeps its counters as plain
//! integers in its own core (`apex_proto::stats`); a request sends every shard a [`Probe`]
//! over its probe queue, the shard answers with a snapshot between two of its tasks, and the
//! endpoint sums the answers. Nothing the shards touch per message is shared, and a shard
//! that does not answer within [`PROBE_TIMEOUT`] shows as down rather than holding the
//! request up.
//!
//! HTTP/1.1 is served by hyper (the most used and scrutinised HTTP implementation in Rust: it
//! deals with pipelining, keep-alive and malformed requests so this module does not), on a
//! current-thread tokio runtime; the exposition format is written by prometheus-client (the
//! Prometheus project's own Rust client: escaping, metric types and histogram layout follow
//! the OpenMetrics text format exactly).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use apex_proto::stats::{Latency, ShardSnapshot};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde_json::{json, Value};

use crate::config::Config;
use crate::store::{Store, StoreStats};

/// How long a request waits for each shard's answer before counting it as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Requests a shard may have waiting in its probe queue; more are not sent (the shard is
/// behind, and shows as down).
const PROBE_QUEUE: usize = 16;

/// Connections the endpoint serves at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 32;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Most endpoints `/status/endpoints` lists, whatever `limit` asks.
const MAX_ENDPOINTS_LISTED: usize = 100_000;

/// Endpoints `/status/endpoints` lists without a `limit`.
const DEFAULT_ENDPOINTS_LISTED: usize = 1000;

/// Upper bounds of the latency histograms' buckets, in microseconds.
const LATENCY_BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// What the endpoint asks a shard; the answer goes back on the sender it carries, with the
/// shard's index.
#[derive(Debug)]
pub enum Probe {
    /// The shard's counters and gauges.
    Report(flume::Sender<(usize, ShardReport)>),
    /// Endpoints attached on the shard: how many, and at most `limit` of them.
    Endpoints {
        /// Most endpoints to list.
        limit: usize,
        /// Where the answer goes.
        reply: flume::Sender<(usize, EndpointList)>,
    },
    /// The shard's outbound links and the relays bound on its sessions.
    Links(flume::Sender<(usize, LinkList)>),
}

/// One shard's answer to [`Probe::Report`]: the core's snapshot and what the runtime counts.
#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    /// The shard core's counters and gauges.
    pub core: ShardSnapshot,
    /// Octets read from the shard's connections.
    pub octets_in: u64,
    /// Octets written to them.
    pub octets_out: u64,
    /// Times a queue to another shard went over `runtime.mesh_queue` (the shard paused
    /// reading until it drained).
    pub shard_queue_overflows: u64,
    /// Connections refused with 421 past `runtime.max_connections`.
    pub refused_capacity: u64,
    /// Connections accepted while the process had no descriptor to spare, and refused.
    pub refused_descriptors: u64,
    /// Accepts that failed for want of a descriptor (EMFILE, ENFILE).
    pub accept_failures: u64,
}

/// Endpoints attached on one shard.
#[derive(Debug, Clone, Default)]
pub struct EndpointList {
    /// How many are attached.
    pub total: usize,
    /// Up to the asked limit: endpoint, connection and channel.
    pub endpoints: Vec<(String, u32, u32)>,
}

/// One shard's outbound links and bound relays.
#[derive(Debug, Clone, Default)]
pub struct LinkList {
    /// Domain, state and data queued of each outbound link.
    pub links: Vec<(String, &'static str, usize)>,
    /// Domain and connection of each relay bound on the shard's sessions.
    pub bound: Vec<(String, u32)>,
}

/// The endpoint's view of the relay: the shards' probe queues and what does not change.
#[derive(Debug)]
pub struct Monitor {
    probes: Vec<flume::Sender<Probe>>,
    version: &'static str,
    domain: String,
    config_digest: String,
    started: SystemTime,
    started_at: Instant,
    listening: OnceLock<(SocketAddr, SocketAddr)>,
    store: OnceLock<Store>,
    ready: AtomicBool,
}

impl Monitor {
    /// A monitor of `shards` shards running `config`, and the probe queue each shard answers.
    pub fn new(config: &Config, shards: usize) -> (Arc<Monitor>, Vec<flume::Receiver<Probe>>) {
        let (probes, receivers) = (0..shards).map(|_| flume::bounded(PROBE_QUEUE)).unzip();
        let digest = ring::digest::digest(&ring::digest::SHA256, config.to_toml().as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let monitor = Monitor {
            probes,
            version: env!("CARGO_PKG_VERSION"),
            domain: config.domain.clone(),
            config_digest: format!("sha256:{hex}"),
            started: SystemTime::now(),
            started_at: Instant::now(),
            listening: OnceLock::new(),
            store: OnceLock::new(),
            ready: AtomicBool::new(false),
        };
        (Arc::new(monitor), receivers)
    }

    /// The store, once it is open: its size and writes are reported.
    pub fn set_store(&self, store: Store) {
        let _ = self.store.set(store);
    }

    /// Every shard listens, on these addresses.
    pub fn set_ready(&self, edge: SocketAddr, mesh: SocketAddr) {
        let _ = self.listening.set((edge, mesh));
        self.ready.store(true, Ordering::Release);
    }

    /// Sends every shard the probe `make` builds and collects the answers, by shard; `None`
    /// for a shard that did not answer within [`PROBE_TIMEOUT`].
    async fn gather<T>(&self, make: impl Fn(flume::Sender<(usize, T)>) -> Probe) -> Vec<Option<T>> {
        let (reply, answers) = flume::bounded(self.probes.len());
        let mut asked = 0;
        for probe in &self.probes {
            if probe.try_send(make(reply.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(reply);
        let mut gathered: Vec<Option<T>> = (0..self.probes.len()).map(|_| None).collect();
        let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
        for _ in 0..asked {
            match tokio::time::timeout_at(deadline, answers.recv_async()).await {
                Ok(Ok((shard, answer))) => {
                    if let Some(slot) = gathered.get_mut(shard) {
                        *slot = Some(answer);
                    }
                }
                _ => break,
            }
        }
        gathered
    }

    fn uptime(&self) -> f64 {
        self.started_at.elapsed().as_secs_f64()
    }

    /// `/metrics`: the Prometheus exposition of every shard's report and the store's.
    pub async fn metrics(&self) -> String {
        let shards = self.gather(Probe::Report).await;
        let scrape = Scrape {
            shards,
            store: self.store.get().map(Store::stats),
            uptime: self.uptime(),
            version: self.version,
        };
        render_metrics(scrape)
    }

    /// `/healthz`: ready once every shard listens and answers.
    pub async fn health(&self) -> (bool, String) {
        if !self.ready.load(Ordering::Acquire) {
            return (false, "starting: not every shard listens yet\n".to_owned());
        }
        let answered = self.gather(Probe::Report).await;
        let down: Vec<String> = answered
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_none())
            .map(|(i, _)| i.to_string())
            .collect();
        if down.is_empty() {
            (true, "ready\n".to_owned())
        } else {
            (
                false,
                format!("shard(s) {} did not answer\n", down.join(", ")),
            )
        }
    }

    /// `/status`: version, uptime, configuration digest, and each shard's counts with their
    /// total.
    pub async fn status(&self) -> Value {
        let shards = self.gather(Probe::Report).await;
        let mut total = ShardReport::default();
        for report in shards.iter().flatten() {
            total.core.merge(&report.core);
            total.octets_in += report.octets_in;
            total.octets_out += report.octets_out;
            total.shard_queue_overflows += report.shard_queue_overflows;
            total.refused_capacity += report.refused_capacity;
            total.refused_descriptors += report.refused_descriptors;
            total.accept_failures += report.accept_failures;
        }
        let all_up = shards.iter().all(Option::is_some);
        let (edge, mesh) = self
            .listening
            .get()
            .map(|(e, m)| (e.to_string(), m.to_string()))
            .unwrap_or_default();
        let started_ms = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        json!({
            "version": self.version,
            "domain": self.domain,
            "started_at": apex_proto::apex::timestamp::Timestamp::from_unix_millis(started_ms).to_string(),
            "uptime_seconds": self.uptime(),
            "config_digest": self.config_digest,
            "edge_listen": edge,
            "mesh_listen": mesh,
            "ready": self.ready.load(Ordering::Acquire) && all_up,
            "shards": shards
                .iter()
                .enumerate()
                .map(|(i, report)| shard_json(Some(i), report.as_ref(), true))
                .collect::<Vec<_>>(),
            "total": shard_json(None, Some(&total), all_up),
            "store": self.store.get().map(|s| {
                let stats = s.stats();
                json!({
                    "file_octets": stats.file_octets,
                    "commits": stats.commits,
                    "commit_failures": stats.writes.failures,
                    "write_p99_us": stats.writes.latency.quantile(0.99),
                })
            }),
        })
    }

    /// `/status/endpoints`: how many endpoints are attached, and up to `limit` of them.
    pub async fn endpoints(&self, limit: usize) -> Value {
        let limit = limit.min(MAX_ENDPOINTS_LISTED);
        let lists = self.gather(|reply| Probe::Endpoints { limit, reply }).await;
        let mut total = 0;
        let mut listed = Vec::new();
        for (shard, list) in lists.iter().enumerate() {
            let Some(list) = list else { continue };
            total += list.total;
            for (endpoint, conn, channel) in &list.endpoints {
                if listed.len() < limit {
                    listed.push(json!({
                        "endpoint": endpoint, "shard": shard, "conn": conn, "channel": channel,
                    }));
                }
            }
        }
        json!({ "total": total, "endpoints": listed, "shards_down": down(&lists) })
    }

    /// `/status/links`: outbound links and bound relays of every shard.
    pub async fn links(&self) -> Value {
        let lists = self.gather(Probe::Links).await;
        let mut links = Vec::new();
        let mut bound = Vec::new();
        for (shard, list) in lists.iter().enumerate() {
            let Some(list) = list else { continue };
            for (domain, state, queued) in &list.links {
                links.push(
                    json!({"domain": domain, "shard": shard, "state": state, "queued": queued}),
                );
            }
            for (domain, conn) in &list.bound {
                bound.push(json!({"domain": domain, "shard": shard, "conn": conn}));
            }
        }
        json!({ "links": links, "bound": bound, "shards_down": down(&lists) })
    }
}

fn down<T>(answers: &[Option<T>]) -> Vec<usize> {
    answers
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_none())
        .map(|(i, _)| i)
        .collect()
}

/// One shard's entry of `/status` (or the total's, with `shard` `None`; `up` then says whether
/// every shard answered).
fn shard_json(shard: Option<usize>, report: Option<&ShardReport>, up: bool) -> Value {
    let Some(r) = report else {
        return json!({ "shard": shard, "up": false });
    };
    let c = &r.core;
    json!({
        "shard": shard,
        "up": up,
        "sessions": {"edge": c.sessions_edge, "mesh": c.sessions_mesh, "link": c.sessions_link},
        "sessions_by_state": {
            "greeting": c.session_states.greeting,
            "open": c.session_states.open,
            "closing": c.session_states.closing,
        },
        "endpoints": c.endpoints,
        "relays_bound": c.relays_bound,
        "links": {
            "connecting": c.links.connecting,
            "open": c.links.open,
            "backoff": c.links.backoff,
            "idle": c.links.idle,
        },
        "messages_in": c.messages_in,
        "messages_out": c.messages_out,
        "octets_in": r.octets_in,
        "octets_out": r.octets_out,
        "data_accepted": c.relay.data_accepted,
        "data_delivered": c.relay.data_delivered,
        "data_forwarded": c.relay.data_forwarded,
        "data_held": c.relay.data_held,
        "held_now": c.held_now,
        "queued_octets": c.queued_octets,
        "delivery_p50_us": c.relay.latency.quantile(0.5),
        "delivery_p99_us": c.relay.latency.quantile(0.99),
    })
}

/// What one scrape gathered.
#[derive(Debug)]
struct Scrape {
    shards: Vec<Option<ShardReport>>,
    store: Option<StoreStats>,
    uptime: f64,
    version: &'static str,
}

/// The Prometheus (OpenMetrics) text of a scrape.
fn render_metrics(scrape: Scrape) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("apexd");
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: `values` are its series.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let series = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(series)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(series)?,
        }
    }
    Ok(())
}

/// Writes a latency histogram family with one series per `(labels, latency)`.
fn histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, Latency)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, latency) in series {
        let cumulative = latency.cumulative(&LATENCY_BUCKETS_US);
        let mut previous = 0;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_US
            .iter()
            .zip(&cumulative)
            .map(|(&bound, &count)| {
                let bucket = (bound as f64 / 1e6, count - previous);
                previous = count;
                bucket
            })
            .collect();
        buckets.push((f64::INFINITY, latency.count() - previous));
        let mut series = metric.encode_family(&labels)?;
        series.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            latency.sum_micros() as f64 / 1e6,
            latency.count(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let e = &mut encoder;
        let shard = |i: usize| -> Labels { vec![("shard", i.to_string())] };
        let answered: Vec<(usize, &ShardReport)> = self
            .shards
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
            .collect();
        // One series per answering shard of `value`.
        let per_shard = |value: &dyn Fn(&ShardReport) -> u64| -> Vec<(Labels, u64)> {
            answered
                .iter()
                .map(|(i, r)| (shard(*i), value(r)))
                .collect()
        };
        let with = |i: usize, name: &'static str, label: String| -> Labels {
            vec![("shard", i.to_string()), (name, label)]
        };

        family(
            e,
            "build_info",
            "The running apexd's version (always 1).",
            Gauge,
            [(vec![("version", self.version.to_owned())], 1)],
        )?;
        family(
            e,
            "uptime_seconds",
            "Seconds since apexd started.",
            Gauge,
            [(Vec::new(), self.uptime as u64)],
        )?;
        family(
            e,
            "shard_up",
            "1 when the shard answered this scrape within the probe timeout.",
            Gauge,
            self.shards
                .iter()
                .enumerate()
                .map(|(i, r)| (shard(i), u64::from(r.is_some()))),
        )?;
        let sessions: Vec<(Labels, u64)> = answered
            .iter()
            .flat_map(|(i, r)| {
                [
                    (with(*i, "port", "edge".into()), r.core.sessions_edge),
                    (with(*i, "port", "mesh".into()), r.core.sessions_mesh),
                    (with(*i, "port", "link".into()), r.core.sessions_link),
                ]
            })
            .collect();
        family(
            e,
            "sessions",
            "Open BEEP sessions by port (link: outbound relay links).",
            Gauge,
            sessions,
        )?;
        let states: Vec<(Labels, u64)> = answered
            .iter()
            .flat_map(|(i, r)| {
                let s = r.core.session_states;
                [
                    (with(*i, "state", "greeting".into()), s.greeting),
                    (with(*i, "state", "open".into()), s.open),
                    (with(*i, "state", "closing".into()), s.closing),
                ]
            })
            .collect();
        family(
            e,
            "sessions_by_state",
            "Open BEEP sessions by state.",
            Gauge,
            states,
        )?;
        family(
            e,
            "sessions_accepted",
            "Connections accepted on both ports.",
            Counter,
            per_shard(&|r| r.core.sessions_accepted),
        )?;
        let timed_out: Vec<(Labels, u64)> = answered
            .iter()
            .flat_map(|(i, r)| {
                [
                    (
                        with(*i, "reason", "greeting".into()),
                        r.core.greeting_timeouts,
                    ),
                    (with(*i, "reason", "idle".into()), r.core.idle_timeouts),
                ]
            })
            .collect();
        family(
            e,
            "sessions_timed_out",
            "Sessions the relay ended: no greeting within runtime.greeting_timeout_ms, or nothing on them for runtime.idle_timeout_ms.",
            Counter,
            timed_out,
        )?;
        let refused: Vec<(Labels, u64)> = answered
            .iter()
            .flat_map(|(i, r)| {
                [
                    (
                        with(*i, "reason", "address".into()),
                        r.core.refused_per_address,
                    ),
                    (with(*i, "reason", "capacity".into()), r.refused_capacity),
                    (
                        with(*i, "reason", "descriptors".into()),
                        r.refused_descriptors,
                    ),
                ]
            })
            .collect();
        family(
            e,
            "connections_refused",
            "Connections answered with 421 instead of a greeting: past runtime.max_connections_per_address, runtime.max_connections, or with no file descriptor to spare.",
            Counter,
            refused,
        )?;
        family(
            e,
            "accept_failures",
            "Accepts that failed for want of a file descriptor (EMFILE, ENFILE).",
            Counter,
            per_shard(&|r| r.accept_failures),
        )?;
        family(
            e,
            "endpoints_attached",
            "Endpoints attached (RFC 3340 §4.4.1).",
            Gauge,
            per_shard(&|r| r.core.endpoints),
        )?;
        family(
            e,
            "relays_bound",
            "Relays bound on apex-mesh sessions (RFC 3340 §4.4.2).",
            Gauge,
            per_shard(&|r| r.core.relays_bound),
        )?;
        let links: Vec<(Labels, u64)> = answered
            .iter()
            .flat_map(|(i, r)| {
                let l = r.core.links;
                [
                    (with(*i, "state", "connecting".into()), l.connecting),
                    (with(*i, "state", "open".into()), l.open),
                    (with(*i, "state", "backoff".into()), l.backoff),
                    (with(*i, "state", "idle".into()), l.idle),
                ]
            })
            .collect();
        family(
            e,
            "links",
            "Outbound links to other relays by state.",
            Gauge,
            links,
        )?;
        family(
            e,
            "messages_received",
            "BEEP messages (MSG, RPY, ERR, ANS, NUL) received.",
            Counter,
            per_shard(&|r| r.core.messages_in),
        )?;
        family(
            e,
            "messages_sent",
            "BEEP messages sent.",
            Counter,
            per_shard(&|r| r.core.messages_out),
        )?;
        family(
            e,
            "octets_received",
            "Octets read from connections.",
            Counter,
            per_shard(&|r| r.octets_in),
        )?;
        family(
            e,
            "octets_sent",
            "Octets written to connections.",
            Counter,
            per_shard(&|r| r.octets_out),
        )?;
        family(
            e,
            "data_accepted",
            "Data acknowledged with ok (RFC 3340 §4.4.4.1 step 3).",
            Counter,
            per_shard(&|r| r.core.relay.data_accepted),
        )?;
        family(
            e,
            "data_delivered",
            "Deliveries the recipient answered with ok.",
            Counter,
            per_shard(&|r| r.core.relay.data_delivered),
        )?;
        family(
            e,
            "data_delivery_refused",
            "Deliveries the recipient answered with an error.",
            Counter,
            per_shard(&|r| r.core.relay.deliveries_refused),
        )?;
        family(
            e,
            "data_forwarded",
            "Data handed to links towards other relays.",
            Counter,
            per_shard(&|r| r.core.relay.data_forwarded),
        )?;
        family(
            e,
            "data_held",
            "Data put in the hold queue (hold4Endpoint).",
            Counter,
            per_shard(&|r| r.core.relay.data_held),
        )?;
        family(
            e,
            "report_watches_refused",
            "Forwarded statusRequests left unwatched: mesh.max_report_watches were running.",
            Counter,
            per_shard(&|r| r.core.relay.report_watches_refused),
        )?;
        family(
            e,
            "timing_watches_refused",
            "Local deliveries with a dataTiming option left unwatched: mesh.max_timing_watches were running.",
            Counter,
            per_shard(&|r| r.core.relay.timing_watches_refused),
        )?;
        family(
            e,
            "held_messages",
            "Data in the hold queue now.",
            Gauge,
            per_shard(&|r| r.core.held_now),
        )?;
        let codes =
            |pick: &dyn Fn(&ShardReport) -> &apex_proto::stats::CodeCounts| -> Vec<(Labels, u64)> {
                answered
                    .iter()
                    .flat_map(|(i, r)| {
                        pick(r).iter().map(move |(code, n)| {
                            let code = code.map_or_else(|| "other".to_owned(), |c| c.to_string());
                            (vec![("shard", i.to_string()), ("code", code)], n)
                        })
                    })
                    .collect()
            };
        family(
            e,
            "apex_errors",
            "APEX operations answered with an error, by reply code.",
            Counter,
            codes(&|r| &r.core.relay.errors),
        )?;
        family(
            e,
            "reports",
            "Status reports sent to originators (RFC 3340 §5.1), by reply code.",
            Counter,
            codes(&|r| &r.core.relay.reports),
        )?;
        let kinds: Vec<(Labels, u64)> = answered
            .iter()
            .flat_map(|(i, r)| {
                r.core
                    .protocol_errors
                    .iter()
                    .map(move |(kind, n)| (with(*i, "kind", kind.to_owned()), n))
            })
            .collect();
        family(
            e,
            "protocol_errors",
            "Sessions ended for a BEEP protocol violation, by kind.",
            Counter,
            kinds,
        )?;
        family(
            e,
            "queued_octets",
            "Octets of deliveries waiting for room in recipients' sessions.",
            Gauge,
            per_shard(&|r| r.core.queued_octets),
        )?;
        family(
            e,
            "link_queued_messages",
            "Data queued on outbound links, not yet sent.",
            Gauge,
            per_shard(&|r| r.core.link_queued),
        )?;
        family(e, "recipient_overflows", "Times a recipient took nothing for too long and data for it was refused (backpressure.stall_ms, max_backlog_octets).", Counter, per_shard(&|r| r.core.overflows))?;
        family(
            e,
            "shard_queue_overflows",
            "Times a queue to another shard went over runtime.mesh_queue.",
            Counter,
            per_shard(&|r| r.shard_queue_overflows),
        )?;
        family(
            e,
            "tls_handshakes",
            "TLS handshakes completed.",
            Counter,
            per_shard(&|r| r.core.tls_handshakes),
        )?;
        family(
            e,
            "sasl_failures",
            "SASL authentications that failed.",
            Counter,
            per_shard(&|r| r.core.sasl_failures),
        )?;
        histogram(
            e,
            "delivery_latency_seconds",
            "From a data's acceptance to the recipient's ok, on the shard that delivered it.",
            answered
                .iter()
                .map(|(i, r)| (shard(*i), r.core.relay.latency.clone())),
        )?;
        if let Some(store) = &self.store {
            family(
                e,
                "store_file_bytes",
                "Size of the durable store's file.",
                Gauge,
                [(Vec::new(), store.file_octets)],
            )?;
            family(
                e,
                "store_commits",
                "Write transactions the store committed.",
                Counter,
                [(Vec::new(), store.commits)],
            )?;
            family(
                e,
                "store_commit_failures",
                "Store batches whose commit failed.",
                Counter,
                [(Vec::new(), store.writes.failures)],
            )?;
            histogram(
                e,
                "store_write_latency_seconds",
                "Time to write and sync one store transaction.",
                [(Vec::new(), store.writes.latency.clone())],
            )?;
        }
        Ok(())
    }
}

/// Serves the endpoint on `listener` on its own thread until the process ends.
pub fn serve(monitor: Arc<Monitor>, listener: std::net::TcpListener) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("monitoring endpoint")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("monitoring endpoint runtime")?;
    std::thread::Builder::new()
        .name("apexd-monitor".into())
        .spawn(move || runtime.block_on(accept(monitor, listener)))
        .context("cannot start the monitoring thread")?;
    Ok(())
}

async fn accept(monitor: Arc<Monitor>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("monitoring endpoint: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: try again shortly, quietly.
                tracing::debug!("monitoring endpoint accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let monitor = monitor.clone();
        tokio::task::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let monitor = monitor.clone();
                async move { Ok::<_, Infallible>(respond(&monitor, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn json_reply(value: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    reply(StatusCode::OK, "application/json", text)
}

/// The `limit` of a query string (`limit=N`), if it has a valid one.
fn limit_of(query: Option<&str>) -> usize {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("limit="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_ENDPOINTS_LISTED)
}

async fn respond(
    monitor: &Monitor,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n");
    }
    match request.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            monitor.metrics().await,
        ),
        "/healthz" => {
            let (ready, text) = monitor.health().await;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, TEXT, text)
        }
        "/status" => json_reply(&monitor.status().await),
        "/status/endpoints" => {
            json_reply(&monitor.endpoints(limit_of(request.uri().query())).await)
        }
        "/status/links" => json_reply(&monitor.links().await),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: /metrics, /healthz, /status, /status/endpoints, /status/links\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(accepted: u64, latencies: &[u64]) -> ShardReport {
        let mut report = ShardReport::default();
        report.core.relay.data_accepted = accepted;
        report.core.sessions_edge = 2;
        report.core.relay.errors.add(537);
        for &l in latencies {
            report.core.relay.latency.record(l);
        }
        report.octets_in = 1000;
        report
    }

    /// The value of the series `name` with exactly `labels` in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_scrape_shows_each_shard_and_marks_the_silent_one_down() {
        let text = render_metrics(Scrape {
            shards: vec![Some(report(7, &[80, 3_000])), None, Some(report(5, &[]))],
            store: None,
            uptime: 12.0,
            version: "0.1.0",
        });
        assert_eq!(
            value(&text, "apexd_data_accepted_total{shard=\"0\"}"),
            Some(7.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "apexd_data_accepted_total{shard=\"2\"}"),
            Some(5.0)
        );
        assert_eq!(value(&text, "apexd_data_accepted_total{shard=\"1\"}"), None);
        assert_eq!(value(&text, "apexd_shard_up{shard=\"1\"}"), Some(0.0));
        assert_eq!(value(&text, "apexd_shard_up{shard=\"2\"}"), Some(1.0));
        assert_eq!(
            value(&text, "apexd_sessions{shard=\"0\",port=\"edge\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "apexd_apex_errors_total{shard=\"0\",code=\"537\"}"),
            Some(1.0)
        );
        // Buckets are cumulative and end with +Inf at the count.
        assert_eq!(
            value(
                &text,
                "apexd_delivery_latency_seconds_bucket{le=\"0.0001\",shard=\"0\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "apexd_delivery_latency_seconds_bucket{le=\"0.0025\",shard=\"0\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "apexd_delivery_latency_seconds_bucket{le=\"0.005\",shard=\"0\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                "apexd_delivery_latency_seconds_bucket{le=\"+Inf\",shard=\"0\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "apexd_delivery_latency_seconds_count{shard=\"0\"}"),
            Some(2.0)
        );
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE apexd_data_accepted counter"));
    }

    #[test]
    fn a_status_totals_the_shards_that_answered() {
        let total = {
            let mut t = ShardReport::default();
            for r in [report(7, &[]), report(5, &[])] {
                t.core.merge(&r.core);
                t.octets_in += r.octets_in;
            }
            t
        };
        let one = shard_json(None, Some(&total), false);
        assert_eq!(one["data_accepted"], 12);
        assert_eq!(one["octets_in"], 2000);
        assert_eq!(one["sessions"]["edge"], 4);
        assert_eq!(one["up"], false);
        assert_eq!(
            shard_json(Some(3), None, true),
            json!({"shard": 3, "up": false})
        );
    }

    #[test]
    fn limits_come_from_the_query() {
        assert_eq!(limit_of(Some("limit=5")), 5);
        assert_eq!(limit_of(Some("x=1&limit=70")), 70);
        assert_eq!(limit_of(Some("limit=lots")), DEFAULT_ENDPOINTS_LISTED);
        assert_eq!(limit_of(None), DEFAULT_ENDPOINTS_LISTED);
    }
}
