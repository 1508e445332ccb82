//! `apex status`, `apex endpoints`, `apex links`: the relay at a glance, read from apexd's
//! monitoring endpoint (`apexd --metrics-listen ADDR`), not from its edge port.
//!
//! This module owns the client side of that endpoint: the HTTP GETs (plain HTTP, bounded in
//! time by `--timeout` and in size by `--max-response`), the JSON documents as this client
//! reads them (unknown fields are ignored, so the server may add some), the rates between two
//! `/status` snapshots, and the terminal tables. With `--json` a document is printed as
//! received, pretty-printed, instead of a table.
//!
//! Every failure prints one `error: ...` line on standard error and exits with status 1: no
//! endpoint listening (connection refused), a timeout, an answer other than 200 (its status and
//! the start of its body), a body over the size cap, a body that is not the expected JSON.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read as _, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::Status;

/// Where apexd's monitoring endpoint listens unless `--metrics`/`APEX_METRICS` says otherwise.
pub(super) const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9914";

/// How long one request (connect, send, answer) may take unless `--timeout` says otherwise.
pub(super) const DEFAULT_METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response body accepted unless `--max-response` says otherwise: ample for the
/// default 1000 endpoints, small enough that a wrong port cannot fill memory.
pub(super) const DEFAULT_MAX_RESPONSE: u64 = 8 * 1024 * 1024;

/// Largest response header block accepted (the endpoint sends a handful of short headers).
const MAX_RESPONSE_HEADERS: usize = 16 * 1024;

/// How much of an error answer's body is shown: enough for a reason line or two.
const ERROR_BODY_SHOWN: usize = 512;

/// Longest the interval between the two `/status` reads sleeps at a time, so that a signal
/// is noticed promptly.
const SLEEP_SLICE: Duration = Duration::from_millis(100);

/// How many endpoints `apex endpoints` asks for unless `--limit` says otherwise (the server's
/// own default).
pub(super) const DEFAULT_ENDPOINT_LIMIT: u32 = 1000;

/// Options every monitoring command shares.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct MetricsArgs {
    /// The relay's monitoring address (apexd --metrics-listen ADDR), not its edge port.
    #[arg(long = "metrics", value_name = "ADDR", env = "APEX_METRICS", default_value = DEFAULT_METRICS_ADDR)]
    pub(super) addr: String,
    /// Print the document as received (pretty-printed JSON) instead of a table.
    #[arg(long)]
    pub(super) json: bool,
    /// Largest response body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RESPONSE,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(super) max_response: u64,
}

/// Which monitoring command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Query {
    /// `/status` twice, `interval` apart (once when zero, or with `--json`).
    Status { interval: Duration },
    /// `/status/endpoints?limit=N`.
    Endpoints { limit: u32 },
    /// `/status/links`.
    Links,
}

/// `--interval`: a number of seconds, zero allowed (read once, no rates).
pub(super) fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!(
            "'{s}' must be zero or a positive number of seconds"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// Runs one monitoring command, printing its result on `out` and any failure as one
/// `error: ...` line on standard error.
pub(super) fn run(
    args: &MetricsArgs,
    query: Query,
    timeout: Duration,
    stop: &AtomicBool,
    out: &mut impl Write,
) -> Status {
    match run_query(args, query, timeout, stop, out) {
        Ok(()) => Status::Success,
        Err(e) => {
            eprintln!("error: {e:#}");
            Status::Failed
        }
    }
}

fn run_query(
    args: &MetricsArgs,
    query: Query,
    timeout: Duration,
    stop: &AtomicBool,
    out: &mut impl Write,
) -> Result<()> {
    let endpoint = MonitoringEndpoint::new(&args.addr, timeout, args.max_response)?;
    let path = match query {
        Query::Status { .. } => "/status".to_owned(),
        Query::Endpoints { limit } => format!("/status/endpoints?limit={limit}"),
        Query::Links => "/status/links".to_owned(),
    };
    if args.json {
        let body = endpoint.get(&path)?;
        let doc: serde_json::Value = parse_json(&endpoint, &path, &body)?;
        let pretty = serde_json::to_string_pretty(&doc)?;
        writeln!(out, "{pretty}")?;
        return Ok(());
    }
    let text = match query {
        Query::Status { interval } => {
            let first: StatusDoc = endpoint.get_json(&path)?;
            let first_read = Instant::now();
            if interval.is_zero() {
                render_status(&first, None)
            } else {
                sleep_unless_stopped(interval, stop)?;
                let second: StatusDoc = endpoint.get_json(&path)?;
                let measured = first_read.elapsed();
                render_status(&second, Some((&first, measured)))
            }
        }
        Query::Endpoints { limit } => {
            render_endpoints(&endpoint.get_json::<EndpointsDoc>(&path)?, limit)
        }
        Query::Links => render_links(&endpoint.get_json::<LinksDoc>(&path)?),
    };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn sleep_unless_stopped(interval: Duration, stop: &AtomicBool) -> Result<()> {
    let until = Instant::now() + interval;
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(SLEEP_SLICE));
    }
}

/// apexd's monitoring endpoint, as `--metrics` names it.
struct MonitoringEndpoint {
    agent: ureq::Agent,
    /// `HOST:PORT`, as the user wrote it (minus any `http://`), for messages.
    addr: String,
    max_response: u64,
}

impl MonitoringEndpoint {
    fn new(addr: &str, timeout: Duration, max_response: u64) -> Result<MonitoringEndpoint> {
        let addr = addr.trim();
        let host_port = addr.strip_prefix("http://").unwrap_or(addr);
        let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
        let has_port = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !has_port || host_port.contains(['/', '?', '#', '@', ' ']) {
            bail!("--metrics must be HOST:PORT (e.g. {DEFAULT_METRICS_ADDR}), not '{addr}'");
        }
        let config = ureq::Agent::config_builder()
            // The endpoint is an admin port on this host or network: never through a proxy.
            .proxy(None)
            .timeout_connect(Some(timeout))
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .max_response_header_size(MAX_RESPONSE_HEADERS)
            // Non-200 answers are reported with their body, not as a bare code.
            .http_status_as_error(false)
            .build();
        Ok(MonitoringEndpoint {
            agent: config.into(),
            addr: host_port.to_owned(),
            max_response,
        })
    }

    /// The body of a 200 answer to `GET path`.
    fn get(&self, path: &str) -> Result<Vec<u8>> {
        let url = format!("http://{}{path}", self.addr);
        let addr = &self.addr;
        let mut response = self.agent.get(&url).call().map_err(|e| match e {
            ureq::Error::Io(io) if io.kind() == ErrorKind::ConnectionRefused => anyhow!(
                "no monitoring endpoint at {addr} (start apexd with --metrics-listen {addr})"
            ),
            ureq::Error::Timeout(_) => {
                anyhow!("no answer from the monitoring endpoint at {addr} in time (--timeout)")
            }
            other => anyhow!("cannot GET {path} from {addr}: {other}"),
        })?;
        let status = response.status();
        if status != ureq::http::StatusCode::OK {
            // Only the start of the body: it is shown, not parsed.
            let mut shown = Vec::new();
            let _ = response
                .body_mut()
                .as_reader()
                .take(ERROR_BODY_SHOWN as u64)
                .read_to_end(&mut shown);
            let body = printable(String::from_utf8_lossy(&shown).trim());
            let status = format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            bail!("GET {path} from {addr}: {}: {body}", status.trim_end());
        }
        let limit = self.max_response;
        response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => anyhow!(
                    "GET {path} from {addr}: the answer is larger than {limit} bytes (--max-response)"
                ),
                ureq::Error::Timeout(_) => {
                    anyhow!("GET {path} from {addr}: the answer did not arrive in time (--timeout)")
                }
                other => anyhow!("GET {path} from {addr}: reading the answer: {other}"),
            })
    }

    /// The body of a 200 answer to `GET path`, as document `T`.
    fn get_json<T: DeserializeOwned + Document>(&self, path: &str) -> Result<T> {
        let body = self.get(path)?;
        let doc: T = parse_json(self, path, &body)?;
        doc.check()
            .map_err(|e| anyhow!("GET {path} from {}: bad document: {e}", self.addr))?;
        Ok(doc)
    }
}

fn parse_json<T: DeserializeOwned>(
    endpoint: &MonitoringEndpoint,
    path: &str,
    body: &[u8],
) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        anyhow!(
            "GET {path} from {}: not the expected JSON document: {e}",
            endpoint.addr
        )
    })
}

/// What a document must hold beyond its shape.
trait Document {
    /// Why the document cannot be shown, if it cannot.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// `GET /status`.
#[derive(Debug, Clone, Deserialize)]
struct StatusDoc {
    version: String,
    domain: String,
    started_at: String,
    uptime_seconds: f64,
    config_digest: String,
    #[serde(default)]
    edge_listen: Option<String>,
    #[serde(default)]
    mesh_listen: Option<String>,
    ready: bool,
    shards: Vec<ShardDoc>,
    total: ShardDoc,
}

impl Document for StatusDoc {
    fn check(&self) -> Result<(), String> {
        for shard in self.shards.iter().chain([&self.total]) {
            if shard.up && shard.counters.is_none() {
                return Err(format!(
                    "{} is up but its counters are missing or malformed",
                    shard.label()
                ));
            }
        }
        Ok(())
    }
}

/// One shard's entry in `/status`, or the total. A shard that did not answer has `up` false
/// and no counters; the total has `up` false, with the answering shards' sums, when some did
/// not answer.
#[derive(Debug, Clone, Deserialize)]
struct ShardDoc {
    shard: Option<u32>,
    up: bool,
    /// None when absent (a shard that did not answer) or malformed (caught by `check`).
    #[serde(flatten)]
    counters: Option<Counters>,
}

impl ShardDoc {
    fn label(&self) -> String {
        match self.shard {
            Some(n) => format!("shard {n}"),
            None => "total".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Counters {
    sessions: Sessions,
    endpoints: u64,
    relays_bound: u64,
    links: LinkStates,
    messages_in: u64,
    messages_out: u64,
    data_accepted: u64,
    data_delivered: u64,
    held_now: u64,
    queued_octets: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Sessions {
    edge: u64,
    mesh: u64,
    link: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct LinkStates {
    open: u64,
}

/// `GET /status/endpoints?limit=N`.
#[derive(Debug, Clone, Deserialize)]
struct EndpointsDoc {
    total: u64,
    endpoints: Vec<AttachedEndpoint>,
}

impl Document for EndpointsDoc {}

#[derive(Debug, Clone, Deserialize)]
struct AttachedEndpoint {
    endpoint: String,
    shard: u32,
    conn: u64,
    channel: u32,
}

/// `GET /status/links`.
#[derive(Debug, Clone, Deserialize)]
struct LinksDoc {
    links: Vec<OutboundLink>,
    bound: Vec<BoundRelay>,
}

impl Document for LinksDoc {}

#[derive(Debug, Clone, Deserialize)]
struct OutboundLink {
    domain: String,
    shard: u32,
    state: String,
    queued: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct BoundRelay {
    domain: String,
    shard: u32,
    conn: u64,
}

/// Per-second rates of the counters that move, between two snapshots of one shard.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates {
    messages_in: f64,
    messages_out: f64,
    data_accepted: f64,
    data_delivered: f64,
}

/// The rates from `before` to `after` over `elapsed`; None when a counter went backwards
/// (the relay restarted) or no time passed.
fn rates(before: &Counters, after: &Counters, elapsed: Duration) -> Option<Rates> {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let per_sec = |a: u64, b: u64| b.checked_sub(a).map(|d| d as f64 / secs);
    Some(Rates {
        messages_in: per_sec(before.messages_in, after.messages_in)?,
        messages_out: per_sec(before.messages_out, after.messages_out)?,
        data_accepted: per_sec(before.data_accepted, after.data_accepted)?,
        data_delivered: per_sec(before.data_delivered, after.data_delivered)?,
    })
}

/// The time between two snapshots: the relay's own clock (its uptime) when it moved, else
/// what the client `measured`; None when the relay restarted in between.
fn snapshot_interval(
    first: &StatusDoc,
    second: &StatusDoc,
    measured: Duration,
) -> Option<Duration> {
    if first.started_at != second.started_at {
        return None;
    }
    let relay_elapsed = second.uptime_seconds - first.uptime_seconds;
    if relay_elapsed.is_finite() && relay_elapsed > 0.0 {
        Duration::try_from_secs_f64(relay_elapsed).ok()
    } else {
        Some(measured)
    }
}

/// The compact view of `/status`: a header, one row per shard and the total; rates when an
/// earlier snapshot and the client-measured time since it are given.
fn render_status(doc: &StatusDoc, earlier: Option<(&StatusDoc, Duration)>) -> String {
    let interval = earlier.and_then(|(first, measured)| snapshot_interval(first, doc, measured));
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{}  apexd {}  up {}  {}  config {}",
        printable(&doc.domain),
        printable(&doc.version),
        human_duration(doc.uptime_seconds),
        if doc.ready { "ready" } else { "NOT READY" },
        short_digest(&doc.config_digest),
    );
    let mut second_line = Vec::new();
    if let Some(edge) = &doc.edge_listen {
        second_line.push(format!("edge {}", printable(edge)));
    }
    if let Some(mesh) = &doc.mesh_listen {
        second_line.push(format!("mesh {}", printable(mesh)));
    }
    second_line.push(match (earlier, interval) {
        (None, _) => "no rates (--interval 0)".to_owned(),
        (Some(_), None) => "no rates (the relay restarted between reads)".to_owned(),
        (Some(_), Some(d)) => format!("rates over {:.1}s", d.as_secs_f64()),
    });
    let _ = writeln!(text, "{}", second_line.join("  "));
    text.push('\n');

    let before = |shard: &ShardDoc| -> Option<&Counters> {
        let (first, _) = earlier?;
        let old = if shard.shard.is_none() {
            &first.total
        } else {
            first.shards.iter().find(|s| s.shard == shard.shard)?
        };
        old.counters.as_ref()
    };
    let rows: Vec<Vec<String>> = doc
        .shards
        .iter()
        .chain([&doc.total])
        .map(|shard| {
            let shard_rates = match (before(shard), &shard.counters, interval) {
                (Some(old), Some(new), Some(d)) if shard.up => rates(old, new, d),
                _ => None,
            };
            shard_row(shard, shard_rates)
        })
        .collect();
    text.push_str(&table(STATUS_COLUMNS, &rows));
    text
}

/// The `/status` table's columns: name and whether it is numeric (right-aligned).
const STATUS_COLUMNS: &[(&str, bool)] = &[
    ("SHARD", false),
    ("STATE", false),
    ("EDGE", true),
    ("MESH", true),
    ("LINK", true),
    ("ENDPOINTS", true),
    ("BOUND", true),
    ("LINKS", true),
    ("MSG_IN/S", true),
    ("MSG_OUT/S", true),
    ("ACCEPTED/S", true),
    ("DELIVERED/S", true),
    ("HELD", true),
    ("QUEUED", true),
];

fn shard_row(shard: &ShardDoc, rates: Option<Rates>) -> Vec<String> {
    let name = shard
        .shard
        .map_or_else(|| "total".to_owned(), |n| n.to_string());
    let Some(c) = &shard.counters else {
        return vec![name, "down".to_owned()];
    };
    // A total without every shard still sums those that answered.
    let state = if shard.up { "up" } else { "partial" };
    let rate = |pick: fn(&Rates) -> f64| {
        rates
            .as_ref()
            .map_or("-".to_owned(), |r| human_rate(pick(r)))
    };
    vec![
        name,
        state.to_owned(),
        c.sessions.edge.to_string(),
        c.sessions.mesh.to_string(),
        c.sessions.link.to_string(),
        c.endpoints.to_string(),
        c.relays_bound.to_string(),
        c.links.open.to_string(),
        rate(|r| r.messages_in),
        rate(|r| r.messages_out),
        rate(|r| r.data_accepted),
        rate(|r| r.data_delivered),
        c.held_now.to_string(),
        human_octets(c.queued_octets),
    ]
}

/// `/status/endpoints` as a table, with how many more are attached than were listed.
fn render_endpoints(doc: &EndpointsDoc, limit: u32) -> String {
    if doc.endpoints.is_empty() && doc.total == 0 {
        return "no endpoints attached\n".to_owned();
    }
    let rows: Vec<Vec<String>> = doc
        .endpoints
        .iter()
        .map(|e| {
            vec![
                printable(&e.endpoint),
                e.shard.to_string(),
                e.conn.to_string(),
                e.channel.to_string(),
            ]
        })
        .collect();
    let mut text = table(
        &[
            ("ENDPOINT", false),
            ("SHARD", true),
            ("CONN", true),
            ("CHANNEL", true),
        ],
        &rows,
    );
    let listed = doc.endpoints.len() as u64;
    if doc.total > listed {
        let _ = writeln!(
            text,
            "{} more ({} attached; --limit {limit} listed {listed})",
            doc.total - listed,
            doc.total
        );
    }
    text
}

/// `/status/links` as two tables: the links this relay made, and the relays bound to it.
fn render_links(doc: &LinksDoc) -> String {
    let mut text = format!("OUTBOUND LINKS ({})\n", doc.links.len());
    if doc.links.is_empty() {
        text.push_str("none\n");
    } else {
        let rows: Vec<Vec<String>> = doc
            .links
            .iter()
            .map(|l| {
                vec![
                    printable(&l.domain),
                    l.shard.to_string(),
                    printable(&l.state),
                    l.queued.to_string(),
                ]
            })
            .collect();
        text.push_str(&table(
            &[
                ("DOMAIN", false),
                ("SHARD", true),
                ("STATE", false),
                ("QUEUED", true),
            ],
            &rows,
        ));
    }
    let _ = write!(text, "\nBOUND RELAYS ({})\n", doc.bound.len());
    if doc.bound.is_empty() {
        text.push_str("none\n");
    } else {
        let rows: Vec<Vec<String>> = doc
            .bound
            .iter()
            .map(|b| {
                vec![
                    printable(&b.domain),
                    b.shard.to_string(),
                    b.conn.to_string(),
                ]
            })
            .collect();
        text.push_str(&table(
            &[("DOMAIN", false), ("SHARD", true), ("CONN", true)],
            &rows,
        ));
    }
    text
}

/// Aligned columns, two spaces apart; numeric columns right-aligned; no trailing blanks. A
/// row may be shorter than the header (a down shard).
fn table(columns: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns
        .iter()
        .map(|(name, _)| name.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(columns.len()) {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if columns[i].1 {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Text from the relay, made safe for a terminal: control characters are escaped.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// `sha256:9f86d081884c7d65...` -> `sha256:9f86d081884c`: enough to tell two configs apart.
fn short_digest(digest: &str) -> String {
    const SHOWN: usize = 12;
    let (algorithm, hex) = match digest.split_once(':') {
        Some((algorithm, hex)) => (Some(algorithm), hex),
        None => (None, digest),
    };
    let hex: String = hex.chars().take(SHOWN).collect();
    printable(&match algorithm {
        Some(algorithm) => format!("{algorithm}:{hex}"),
        None => hex,
    })
}

/// Uptime as a person reads it: `12s`, `4m 05s`, `3h 04m`, `2d 03h`.
fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_owned();
    }
    // Whole seconds are all a glance needs; the cast saturates for absurd values.
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Octets in binary units: `512 B`, `1.5 KiB`, `3.0 MiB`.
fn human_octets(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A per-second rate: one decimal, then k and M suffixes past 10 000 so columns stay narrow.
fn human_rate(r: f64) -> String {
    if r >= 10_000_000.0 {
        format!("{:.1}M", r / 1_000_000.0)
    } else if r >= 10_000.0 {
        format!("{:.1}k", r / 1_000.0)
    } else {
        format!("{r:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;
    use std::net::{SocketAddr, TcpListener};
    use std::thread::JoinHandle;

    /// Longest any canned server waits for a connection or a request.
    const SERVER_LIMIT: Duration = Duration::from_secs(10);

    /// A loopback HTTP server answering one connection per canned response, in order; returns
    /// the request lines it saw. Bounded: it gives up after `SERVER_LIMIT` without a client.
    fn serve(responses: Vec<Vec<u8>>) -> (SocketAddr, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let deadline = Instant::now() + SERVER_LIMIT;
            for response in responses {
                let stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break Some(stream),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            if Instant::now() > deadline {
                                break None;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                };
                let Some(mut stream) = stream else { break };
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(SERVER_LIMIT)).unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                seen.push(request_line.trim_end().to_owned());
                // The rest of the head, bounded in lines.
                for _ in 0..100 {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                }
                let _ = stream.write_all(&response);
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            seen
        });
        (addr, handle)
    }

    fn ok_json(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn shard_json(n: &str, messages_in: u64, messages_out: u64, accepted: u64) -> String {
        format!(
            r#"{{"shard": {n}, "up": true,
              "sessions": {{"edge": 3, "mesh": 1, "link": 0}},
              "sessions_by_state": {{"greeting": 0, "open": 3, "closing": 1}},
              "endpoints": 2, "relays_bound": 1,
              "links": {{"connecting": 0, "open": 1, "backoff": 0, "closing": 0}},
              "messages_in": {messages_in}, "messages_out": {messages_out},
              "octets_in": 1000, "octets_out": 2000,
              "data_accepted": {accepted}, "data_delivered": {accepted}, "data_held": 0,
              "held_now": 4, "queued_octets": 1536, "some_future_field": [1, 2]}}"#
        )
    }

    fn status_json(uptime: f64, shards: &[String], total: &str) -> String {
        format!(
            r#"{{"version": "0.1.0", "domain": "example.com",
              "started_at": "2026-12-06T05:00:00.000Z", "uptime_seconds": {uptime},
              "config_digest": "sha256:9f86d081884c7d659a2feaa0c55ad015",
              "edge_listen": "127.0.0.1:9913", "mesh_listen": "127.0.0.1:9912",
              "ready": true, "shards": [{}], "total": {total}}}"#,
            shards.join(",")
        )
    }

    fn status(uptime: f64, messages_in: u64) -> StatusDoc {
        let shards = [
            shard_json("0", messages_in, 2 * messages_in, 10),
            r#"{"shard": 1, "up": false}"#.to_owned(),
        ];
        let mut total = shard_json("null", messages_in, 2 * messages_in, 10);
        total = total.replacen(r#""up": true"#, r#""up": false"#, 1);
        serde_json::from_str(&status_json(uptime, &shards, &total)).unwrap()
    }

    fn args(addr: SocketAddr) -> MetricsArgs {
        MetricsArgs {
            addr: addr.to_string(),
            json: false,
            max_response: DEFAULT_MAX_RESPONSE,
        }
    }

    fn run_to_string(args: &MetricsArgs, query: Query) -> Result<String> {
        let mut out = Vec::new();
        let stop = AtomicBool::new(false);
        run_query(args, query, Duration::from_secs(5), &stop, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_down_shard_parses_without_counters_and_an_up_one_with_them() {
        let doc = status(12.5, 100);
        assert!(doc.check().is_ok());
        assert!(doc.shards[0].counters.is_some());
        assert!(doc.shards[1].counters.is_none());
        assert!(!doc.total.up && doc.total.counters.is_some());
    }

    #[test]
    fn an_up_shard_without_counters_is_a_bad_document() {
        let total = shard_json("null", 1, 1, 1);
        let json = status_json(1.0, &[r#"{"shard": 0, "up": true}"#.to_owned()], &total);
        let doc: StatusDoc = serde_json::from_str(&json).unwrap();
        assert_eq!(
            doc.check().unwrap_err(),
            "shard 0 is up but its counters are missing or malformed"
        );
    }

    #[test]
    fn rates_are_counter_differences_over_the_elapsed_time() {
        let before = status(12.5, 100);
        let after = status(14.5, 600);
        let c = |d: &StatusDoc| d.shards[0].counters.clone().unwrap();
        let r = rates(&c(&before), &c(&after), Duration::from_secs(2)).unwrap();
        assert_eq!(r.messages_in, 250.0);
        assert_eq!(r.messages_out, 500.0);
        assert_eq!(r.data_accepted, 0.0);
        // A counter that went backwards (a restart) gives no rate rather than a wrong one.
        assert!(rates(&c(&after), &c(&before), Duration::from_secs(2)).is_none());
        assert!(rates(&c(&before), &c(&after), Duration::ZERO).is_none());
    }

    #[test]
    fn the_interval_is_the_relays_uptime_difference_unless_it_restarted() {
        let first = status(12.5, 100);
        let second = status(13.5, 350);
        let measured = Duration::from_millis(1300);
        assert_eq!(
            snapshot_interval(&first, &second, measured),
            Some(Duration::from_secs(1))
        );
        // A relay clock that did not move: the client's measurement stands in.
        assert_eq!(snapshot_interval(&first, &first, measured), Some(measured));
        let mut restarted = second.clone();
        restarted.started_at = "2026-12-06T06:00:00.000Z".to_owned();
        assert_eq!(snapshot_interval(&first, &restarted, measured), None);
    }

    #[test]
    fn status_view_shows_rates_a_down_shard_and_a_partial_total() {
        let first = status(12.5, 100);
        let second = status(13.5, 350);
        let text = render_status(&second, Some((&first, Duration::from_millis(1400))));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "example.com  apexd 0.1.0  up 13s  ready  config sha256:9f86d081884c"
        );
        assert_eq!(
            lines[1],
            "edge 127.0.0.1:9913  mesh 127.0.0.1:9912  rates over 1.0s"
        );
        let header: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(header[0], "SHARD");
        let row0: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            row0,
            [
                "0", "up", "3", "1", "0", "2", "1", "1", "250.0", "500.0", "0.0", "0.0", "4",
                "1.5", "KiB"
            ]
        );
        assert_eq!(
            lines[5].split_whitespace().collect::<Vec<_>>(),
            ["1", "down"]
        );
        let total: Vec<&str> = lines[6].split_whitespace().collect();
        assert_eq!(&total[..2], ["total", "partial"]);
        assert_eq!(total[5], "2");
        // Sums over whichever shards answered each time are no basis for a rate.
        assert_eq!(total[8], "-");
        // Columns line up: each numeric cell ends where its header does.
        let end_of = |line: &str, word: &str| line.find(word).unwrap() + word.len();
        assert_eq!(end_of(lines[3], "MSG_IN/S"), end_of(lines[4], "250.0"));
    }

    #[test]
    fn status_view_without_rates_says_so() {
        let text = render_status(&status(4000.0, 100), None);
        assert!(text.lines().next().unwrap().contains("up 1h 06m"));
        assert!(text.contains("no rates (--interval 0)"));
        let row0: Vec<&str> = text.lines().nth(4).unwrap().split_whitespace().collect();
        assert_eq!(&row0[8..12], ["-", "-", "-", "-"]);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(59.9), "59s");
        assert_eq!(human_duration(65.0), "1m 05s");
        assert_eq!(human_duration(2.0 * 86400.0 + 3.0 * 3600.0), "2d 03h");
        assert_eq!(human_duration(f64::NAN), "?");
        assert_eq!(human_octets(0), "0 B");
        assert_eq!(human_octets(1023), "1023 B");
        assert_eq!(human_octets(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(human_rate(12.34), "12.3");
        assert_eq!(human_rate(25_000.0), "25.0k");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
    }

    #[test]
    fn status_reads_twice_and_shows_the_rate_between() {
        let shards = |m| [shard_json("0", m, m, 5)];
        let first = status_json(12.5, &shards(100), &shard_json("null", 100, 100, 5));
        let second = status_json(13.5, &shards(350), &shard_json("null", 350, 350, 5));
        let (addr, server) = serve(vec![ok_json(&first), ok_json(&second)]);
        let text = run_to_string(
            &args(addr),
            Query::Status {
                interval: Duration::from_millis(20),
            },
        )
        .unwrap();
        assert_eq!(server.join().unwrap(), ["GET /status HTTP/1.1"; 2]);
        let row0: Vec<&str> = text.lines().nth(4).unwrap().split_whitespace().collect();
        assert_eq!(&row0[8..10], ["250.0", "250.0"]);
        assert!(text.contains("rates over 1.0s"), "{text}");
    }

    #[test]
    fn endpoints_table_says_how_many_more_are_attached() {
        let body = r#"{"total": 5, "endpoints": [
            {"endpoint": "fred@example.com", "shard": 0, "conn": 3, "channel": 1},
            {"endpoint": "barney.rubble@example.com", "shard": 1, "conn": 12, "channel": 3}]}"#;
        let (addr, server) = serve(vec![ok_json(body)]);
        let text = run_to_string(&args(addr), Query::Endpoints { limit: 2 }).unwrap();
        assert_eq!(
            server.join().unwrap(),
            ["GET /status/endpoints?limit=2 HTTP/1.1"]
        );
        assert_eq!(
            text,
            "ENDPOINT                   SHARD  CONN  CHANNEL\n\
             fred@example.com               0     3        1\n\
             barney.rubble@example.com      1    12        3\n\
             3 more (5 attached; --limit 2 listed 2)\n"
        );
    }

    #[test]
    fn links_tables_list_outbound_links_and_bound_relays() {
        let body = r#"{"links": [{"domain": "rubble.com", "shard": 1, "state": "open", "queued": 7},
                                 {"domain": "slate.example", "shard": 0, "state": "backoff", "queued": 120}],
                       "bound": []}"#;
        let (addr, server) = serve(vec![ok_json(body)]);
        let text = run_to_string(&args(addr), Query::Links).unwrap();
        assert_eq!(server.join().unwrap(), ["GET /status/links HTTP/1.1"]);
        assert_eq!(
            text,
            "OUTBOUND LINKS (2)\n\
             DOMAIN         SHARD  STATE    QUEUED\n\
             rubble.com         1  open          7\n\
             slate.example      0  backoff     120\n\
             \n\
             BOUND RELAYS (0)\n\
             none\n"
        );
    }

    #[test]
    fn json_prints_the_document_as_received_in_order() {
        let body = r#"{"total": 0, "endpoints": [], "zeta": 1, "alpha": 2}"#;
        let (addr, server) = serve(vec![ok_json(body)]);
        let mut json_args = args(addr);
        json_args.json = true;
        let text = run_to_string(&json_args, Query::Endpoints { limit: 10 }).unwrap();
        server.join().unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(keys, ["total", "endpoints", "zeta", "alpha"]);
    }

    #[test]
    fn a_503_is_reported_with_its_status_and_body() {
        let response =
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 23\r\n\r\nshard 1 does not answer".to_vec();
        let (addr, server) = serve(vec![response]);
        let err = run_to_string(&args(addr), Query::Links).unwrap_err();
        server.join().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "GET /status/links from {addr}: 503 Service Unavailable: shard 1 does not answer"
            )
        );
    }

    #[test]
    fn bad_json_is_a_clear_error() {
        let (addr, server) = serve(vec![ok_json(r#"{"total": "many""#)]);
        let err = run_to_string(&args(addr), Query::Endpoints { limit: 1 }).unwrap_err();
        server.join().unwrap();
        let err = err.to_string();
        assert!(
            err.starts_with(&format!(
                "GET /status/endpoints?limit=1 from {addr}: not the expected JSON document: "
            )),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_body_is_refused() {
        let body = format!(
            r#"{{"links": [], "bound": [], "pad": "{}"}}"#,
            "x".repeat(4096)
        );
        let (addr, server) = serve(vec![ok_json(&body)]);
        let mut small = args(addr);
        small.max_response = 1024;
        let err = run_to_string(&small, Query::Links).unwrap_err();
        server.join().unwrap();
        assert_eq!(
            err.to_string(),
            format!("GET /status/links from {addr}: the answer is larger than 1024 bytes (--max-response)")
        );
    }

    #[test]
    fn a_closed_port_means_no_monitoring_endpoint() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = run_to_string(&args(addr), Query::Links).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no monitoring endpoint at {addr} (start apexd with --metrics-listen {addr})")
        );
    }

    #[test]
    fn a_silent_endpoint_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let endpoint =
            MonitoringEndpoint::new(&addr.to_string(), Duration::from_millis(300), 1024).unwrap();
        let err = endpoint.get("/status").unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("in time (--timeout)"), "{err}");
        drop(listener);
    }

    #[test]
    fn the_metrics_address_must_be_host_and_port() {
        for bad in [
            "127.0.0.1",
            ":9914",
            "127.0.0.1:9914/metrics",
            "user@127.0.0.1:1",
        ] {
            let err = MonitoringEndpoint::new(bad, Duration::from_secs(1), 1)
                .err()
                .unwrap();
            assert!(
                err.to_string().starts_with("--metrics must be HOST:PORT"),
                "{bad}: {err}"
            );
        }
        let ok =
            MonitoringEndpoint::new("http://127.0.0.1:9914/", Duration::from_secs(1), 1).unwrap();
        assert_eq!(ok.addr, "127.0.0.1:9914");
    }
}
