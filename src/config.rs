//! apexd configuration: the embedded default, a TOML file (`--config FILE`) and command-line
//! flags, merged in that order (flags win) and validated once. Errors name the file, the line and
//! the field.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use std::str::FromStr;

use apex_proto::apex::access::{AccessTable, Grant};
use apex_proto::apex::msg::ApexLimits;
use apex_proto::apex::options::HoldLimits;
use apex_proto::apex::relay::AuthMode;
use apex_proto::store::AccessLimits;
use apex_proto::Limits;
use serde::{Deserialize, Serialize};

/// The configuration apexd runs with when given no file: every field explicit, so
/// `--print-config` shows what is in force.
pub const EMBEDDED_DEFAULT: &str = r#"# apexd embedded default configuration.
# SIGHUP re-reads the --config file (flags still override it) and applies, without dropping
# sessions, the settings marked "(reload)"; the others need a restart, and a reload that finds
# one changed names it in a warning and keeps the value in force.
# domain: the administrative domain this relay serves; empty means "this host's name".
domain = ""
# apex-edge: endpoints attach here (RFC 3340 §3: TCP port 913).
edge_listen = "0.0.0.0:913"
# apex-mesh: relays exchange data here (RFC 3340 §3: TCP port 912).
mesh_listen = "0.0.0.0:912"
# shards: one glommio executor per shard; 0 means one per online CPU.
shards = 0
# pin: pin each shard to its own CPU (production); false lets the kernel place them (tests).
pin = true
# log: error, warn, info, debug or trace (or a tracing filter such as "apexd=debug"). (reload)
log = "info"
# log_format: "text" (one human-readable line per event) or "json" (one JSON object per line:
# timestamp, level, target, fields, message).
log_format = "text"
# grace_ms: how long a shutting-down session may take to answer our BEEP close.
shutdown_grace_ms = 2000
# data_dir: where the durable store (apexd.redb: access entries set by endpoints, held
# messages) lives. Empty: $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/apexd when
# running as root, else $XDG_STATE_HOME/apexd, else $HOME/.local/state/apexd.
data_dir = ""
# metrics_listen: HTTP address of the monitoring endpoint (/metrics for Prometheus, /healthz,
# /status for `apex status`), e.g. "127.0.0.1:9914"; empty: off. It tells anyone who reaches
# it about the relay's traffic and endpoints: keep it on loopback or an admin network.
metrics_listen = ""

[runtime]
# Registered io_uring buffer memory per shard (bytes); counts against `ulimit -l`.
io_memory = 524288
# Entries in each io_uring submission ring per shard.
ring_depth = 128
# Most concurrent connections per shard; beyond it new sessions get ERR 421 (BEEP-18).
max_connections = 10000
# Most connections one peer address may hold per shard (an IPv6 address counts by its /64);
# beyond it its new sessions get ERR 421 instead of a greeting. 0: no bound but max_connections.
max_connections_per_address = 64
# How long a peer has to complete its BEEP greeting (and, after TLS begins, the handshake and
# its new greeting), in milliseconds; then the relay sends close 421 and closes. 0: forever.
greeting_timeout_ms = 10000
# How long a session may have no channel open besides channel 0 (no endpoint attached, no relay
# bound) before the relay asks its peer to release it (close 421), in milliseconds. 0: forever.
idle_timeout_ms = 60000
# How long the peer of an idle session has to answer that close before the connection closes
# anyway, in milliseconds.
release_timeout_ms = 5000
# TCP keepalive on accepted connections: after this many milliseconds of silence the kernel
# probes the peer, again at this interval, and drops the connection after 3 unanswered probes,
# so the sessions of dead peers (attached endpoints too) end. 0: off.
tcp_keepalive_ms = 30000
# With no file descriptor left (EMFILE, ENFILE), accepting waits, doubling from 10 ms up to
# this many milliseconds, and answers waiting connections with ERR 421 from a spare descriptor.
accept_backoff_max_ms = 1000
# Octets read per read call.
read_chunk = 65536
# Connections the kernel queues per shard and port before apexd accepts them (capped by
# net.core.somaxconn).
listen_backlog = 1024
# Capacity of each shard-to-shard queue (messages).
mesh_queue = 1024
# Store requests (held data, access changes) a shard may have waiting for the store; past
# it, data to hold gets 450 and an access set 451 until the store catches up. (reload)
store_queue = 4096

[warnings]
# Warnings one peer address causes on one shard (a session terminated for a protocol error, no
# room for a connection): `burst` at once, then one per `interval_ms`; the rest are counted
# and summarised ("suppressed K similar warnings from ADDR") once per interval. Each shard
# remembers at most `max_peers` addresses (the oldest is forgotten first).
burst = 3
interval_ms = 10000
max_peers = 4096

[access]
# Access entries granted for every local endpoint (RFC 3341), as ACTOR=ACTIONS. The RFC's
# default entries deny core:data between ordinary endpoints; this grant lets the endpoints of
# this relay's own domain send each other data. $DOMAIN stands for `domain`. (reload: put in
# force like an access `set`)
grants = ["*@$DOMAIN=core:data"]
# Bounds on the entries endpoints store with the access service's `set` (RFC 3341 §4.4): per
# owner, and over all owners; past either a new entry is refused with 554.
max_entries_per_owner = 256
max_entries = 1000000

[mesh]
# Static routes to other relays' apex-mesh ports, as DOMAIN=HOST:PORT. Domains without a
# static route are looked up in DNS (SRV _apex-mesh._tcp.DOMAIN, then port 912 of DOMAIN).
# (reload: a link's next connection, and the addresses a bind is accepted from)
peers = []
# Domains whose relays may relay data for originators of other domains (trusted
# intermediaries, RFC 3340 §4.5.2); "*" trusts every relay that binds. (reload)
trusted = []
# Link settings, down to setup_timeout_ms (reload).
# Data messages queued per outbound link while it connects; beyond it recipients fail.
link_queue = 4096
# Data messages in flight (awaiting the next relay's reply) per link.
link_in_flight = 256
# Longest wait between reconnection attempts (milliseconds); the wait doubles from 100 ms.
max_backoff_ms = 10000
# Connection attempts before queued data fails (and is reported when asked).
connect_attempts = 5
# How long a link that asked the next relay to release the session (RFC 3080 §2.4) waits for
# its answer before closing the connection anyway (milliseconds).
close_timeout_ms = 5000
# How long a new link connection may take to be bound: the next relay's greeting, TLS, the
# channel start and the answer to our bind (milliseconds). A relay that accepts the connection
# and goes silent loses it, and the data queued for it fails (reported when asked).
setup_timeout_ms = 10000
# Watches on forwarded data that asks for status reports (statusRequest), for originators of
# this domain: when no relay further on reports within report_timeout_ms (or the data's
# dataTiming noLaterThan + returnTrip) of the data going onto the link, this relay reports 450,
# delivery unknown (a next relay that crashed after accepting). 0: not watched. At most
# max_report_watches watches per shard; past it, forwards go unwatched. (restart)
report_timeout_ms = 60000
max_report_watches = 65536
# Local deliveries of data carrying a dataTiming option (RFC 3342 §2) watched at once per shard
# for its noLaterThan, reportAfter and returnTrip reports; past it, a delivery goes unwatched
# (no timing reports) and is counted in timing_watches_refused. (restart)
max_timing_watches = 65536
# The DNS server (ADDR:PORT) asked for the SRV records of domains without a static route, over
# UDP (TCP for truncated answers); empty means the system's resolvers (/etc/resolv.conf).
# (restart: one resolver serves the process)
dns_server = ""

[auth]
# (reload: new attaches and binds, new sessions)
# Who may attach as which endpoint (RFC 3340 §4.5.1):
#   "required"       every apex-edge session authenticates (SASL) before it attaches;
#   "loopback-open"  sessions from 127.0.0.0/8 or ::1 may attach as anything, others
#                    authenticate first;
#   "off"            anyone attaches as anything and binds as any domain (benchmarks only).
# Empty: "required" when `users` is set, else "loopback-open".
mode = ""
# Credentials file: one `NAME@DOMAIN SCRAM-SHA-256$ITER:SALT$STOREDKEY:SERVERKEY` per line
# (make lines with `apexd passwd NAME@DOMAIN`). Re-read on SIGHUP.
users = ""

[tls]
# (reload: new sessions, links' next connections)
# PEM certificate chain and private key of this relay: both ports then offer the BEEP TLS
# profile (RFC 3080 §3), and outbound relay links start TLS. Empty: no TLS.
cert = ""
key = ""
# PEM roots that verify other relays' certificates (outbound links, and inbound relays that
# present a client certificate) and endpoints' certificates for SASL EXTERNAL.
ca = ""

[hold]
# (reload)
# Data held for endpoints that are not attached yet, when the data asks for it with the
# hold4Endpoint option (RFC 3342): most messages and octets held per shard, most messages of
# one originator held per shard (its share, so that one sender cannot fill the queue), and
# the longest hold in milliseconds, one hour by default (0: as long as the data's dataTiming
# allows, forever without one, as RFC 3342 reads).
max_messages = 1024
max_bytes = 16777216
max_per_originator = 256
max_hold_ms = 3600000

[backpressure]
# (reload)
# A recipient that does not take its messages holds back only the channels that send to it
# (their BEEP windows). Octets of messages waiting for such recipients, per shard: past it,
# every recipient with messages waiting refuses new data (450) until it takes them.
max_backlog_octets = 67108864
# Octets of partial messages (continued frames not yet complete) held per shard over all its
# sessions (each session is also bounded by limits.max_session_assembly).
max_assembly_octets = 268435456
# A recipient that takes nothing for this long (milliseconds) refuses data with 450 until it
# reads again; the senders it held back are let go.
stall_ms = 5000
# Octets a recipient may fall behind before the channels that send to it are held back.
backlog_slack = 65536

[apex]
# (reload)
# Bounds on APEX control documents from peers (apex_proto::apex::msg::ApexLimits).
max_depth = 32
max_attributes = 16
max_attribute_len = 1024
max_recipients = 256
max_options = 64

[limits]
# See apex_proto::Limits for the meaning of each bound. (reload: sessions from then on)
max_header_line = 128
recv_window = 262144
max_message_size = 4194304
max_send_frame = 32768
max_channels = 1024
max_pending_replies = 65536
max_answers_in_progress = 64
max_outstanding_msgs = 4096
max_queued_octets = 16777216
max_session_assembly = 8388608
max_queued_replies = 1048576
max_unanswered_octets = 8388608
max_piggyback = 4096
max_transmit = 262144
max_xml_depth = 16
max_xml_attributes = 16
"#;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Administrative domain; empty means the host name.
    pub domain: String,
    /// apex-edge listen address.
    pub edge_listen: SocketAddr,
    /// apex-mesh listen address.
    pub mesh_listen: SocketAddr,
    /// Number of shards; 0: one per online CPU.
    pub shards: usize,
    /// Pin shards to CPUs.
    pub pin: bool,
    /// Log filter.
    pub log: String,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Milliseconds a session has to answer our close at shutdown.
    pub shutdown_grace_ms: u64,
    /// Directory of the durable store; empty: see [`Config::data_dir`].
    pub data_dir: String,
    /// The monitoring endpoint's address; empty: off (see [`Config::metrics_listen`]).
    pub metrics_listen: String,
    /// Executor and socket settings.
    pub runtime: Runtime,
    /// The rate limit on warnings per peer address.
    pub warnings: WarningsConfig,
    /// Access entries.
    pub access: AccessConfig,
    /// Relay-to-relay settings.
    pub mesh: MeshConfig,
    /// Authentication policy and credentials.
    pub auth: AuthConfig,
    /// TLS certificate, key and roots.
    pub tls: TlsConfig,
    /// The hold4Endpoint queue.
    pub hold: HoldConfig,
    /// Shard-wide bounds of backpressure.
    pub backpressure: BackpressureConfig,
    /// Bounds on APEX control documents.
    pub apex: ApexConfig,
    /// Protocol limits.
    pub limits: LimitsConfig,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// The name the configuration and `--log-format` use.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format '{other}': expected text or json"
            )),
        }
    }
}

/// The rate limit on warnings per peer address (`shard::warnings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarningsConfig {
    /// Warnings let through at once.
    pub burst: u32,
    /// Then one per this many milliseconds.
    pub interval_ms: u64,
    /// Addresses remembered per shard.
    pub max_peers: usize,
}

impl From<&WarningsConfig> for crate::shard::warnings::WarnLimits {
    fn from(c: &WarningsConfig) -> Self {
        Self {
            burst: c.burst,
            interval: std::time::Duration::from_millis(c.interval_ms),
            max_peers: c.max_peers,
        }
    }
}

/// Relay-to-relay settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// `DOMAIN=HOST:PORT` static routes.
    pub peers: Vec<String>,
    /// Trusted intermediary domains (`*`: all).
    pub trusted: Vec<String>,
    /// Queued data messages per link.
    pub link_queue: usize,
    /// In-flight data messages per link.
    pub link_in_flight: usize,
    /// Longest reconnection wait, milliseconds.
    pub max_backoff_ms: u64,
    /// Connection attempts before queued data fails.
    pub connect_attempts: u32,
    /// Wait for the next relay's answer to our session `close`, milliseconds.
    pub close_timeout_ms: u64,
    /// Wait from a link's connection until it is bound, milliseconds.
    pub setup_timeout_ms: u64,
    /// Wait for a later relay's status report on forwarded data, milliseconds; 0: none.
    pub report_timeout_ms: u64,
    /// Most forwards watched for a later relay's report, per shard.
    pub max_report_watches: usize,
    /// Most local deliveries watched for their `dataTiming`, per shard.
    pub max_timing_watches: usize,
    /// `ADDR:PORT` of the one DNS server to ask; empty: the system's.
    pub dns_server: String,
}

impl Config {
    /// The monitoring endpoint's address, if it is on.
    pub fn metrics_listen(&self) -> Result<Option<SocketAddr>> {
        if self.metrics_listen.is_empty() {
            return Ok(None);
        }
        self.metrics_listen.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "field `metrics_listen`: '{}' is not ADDR:PORT (e.g. 127.0.0.1:9914)",
                self.metrics_listen
            )
        })
    }
}

impl MeshConfig {
    /// The configured DNS server, if any (validated by [`Config::validate`]).
    pub fn dns_server(&self) -> Option<SocketAddr> {
        parse_dns_server(&self.dns_server).ok().flatten()
    }
}

fn parse_dns_server(text: &str) -> Result<Option<SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        anyhow::anyhow!("field `mesh.dns_server`: '{text}' is not ADDR:PORT (e.g. 127.0.0.1:53)")
    })
}

/// Bounds on APEX control documents, mirrored from the core's `ApexLimits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ApexConfig {
    pub max_depth: usize,
    pub max_attributes: usize,
    pub max_attribute_len: usize,
    pub max_recipients: usize,
    pub max_options: usize,
}

impl From<&ApexConfig> for ApexLimits {
    fn from(c: &ApexConfig) -> Self {
        ApexLimits {
            max_depth: c.max_depth,
            max_attributes: c.max_attributes,
            max_attribute_len: c.max_attribute_len,
            max_recipients: c.max_recipients,
            max_options: c.max_options,
        }
    }
}

/// Shard-wide bounds of backpressure, mirrored from the core's `Budgets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackpressureConfig {
    /// Octets waiting for recipients that do not take them, per shard.
    pub max_backlog_octets: usize,
    /// Octets of partial messages per shard.
    pub max_assembly_octets: usize,
    /// Milliseconds a recipient may take nothing before data for it is refused.
    pub stall_ms: u64,
    /// Octets a recipient may fall behind before its senders are held back.
    pub backlog_slack: usize,
}

/// Bounds of the hold4Endpoint queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldConfig {
    /// Most held messages per shard.
    pub max_messages: usize,
    /// Most held octets per shard.
    pub max_bytes: usize,
    /// Most held messages of one originator per shard.
    pub max_per_originator: usize,
    /// Longest hold, ms; 0: no cap.
    pub max_hold_ms: u64,
}

impl From<&HoldConfig> for HoldLimits {
    fn from(c: &HoldConfig) -> Self {
        HoldLimits {
            max_messages: c.max_messages,
            max_bytes: c.max_bytes,
            max_per_originator: c.max_per_originator,
            max_hold_ms: (c.max_hold_ms > 0).then_some(c.max_hold_ms),
        }
    }
}

/// Authentication settings (`[auth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `required`, `loopback-open`, `off`, or empty for the default.
    pub mode: String,
    /// Path of the credentials file; empty: no users.
    pub users: String,
}

/// TLS settings (`[tls]`); all paths, empty when unused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// PEM roots for peers' certificates.
    pub ca: String,
}

impl Config {
    /// The authentication mode in force: the configured one, else `required` with users and
    /// `loopback-open` without.
    pub fn auth_mode(&self) -> Result<AuthMode> {
        if self.auth.mode.is_empty() {
            return Ok(if self.auth.users.is_empty() {
                AuthMode::LoopbackOpen
            } else {
                AuthMode::Required
            });
        }
        AuthMode::parse(&self.auth.mode).ok_or_else(|| {
            anyhow::anyhow!(
                "field `auth.mode`: '{}' is not required, loopback-open or off",
                self.auth.mode
            )
        })
    }
}

/// Access entries from configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// `ACTOR=ACTIONS` grants applied to every local endpoint.
    pub grants: Vec<String>,
    /// Most stored entries one owner may have.
    pub max_entries_per_owner: usize,
    /// Most stored entries over all owners.
    pub max_entries: usize,
}

/// Executor and socket settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Registered io_uring buffer memory per shard, bytes.
    pub io_memory: usize,
    /// io_uring ring depth.
    pub ring_depth: usize,
    /// Connection limit per shard.
    pub max_connections: usize,
    /// Connections one address (IPv6: its /64) may hold per shard; 0: no bound.
    pub max_connections_per_address: usize,
    /// Milliseconds a peer has to greet; 0: forever.
    pub greeting_timeout_ms: u64,
    /// Milliseconds a session may have no channel besides channel 0; 0: forever.
    pub idle_timeout_ms: u64,
    /// Milliseconds the peer of an idle session has to answer the relay's close.
    pub release_timeout_ms: u64,
    /// TCP keepalive time and interval on accepted connections, milliseconds; 0: off.
    pub tcp_keepalive_ms: u64,
    /// Longest wait between accepts while file descriptors run out, milliseconds.
    pub accept_backoff_max_ms: u64,
    /// Octets per read call.
    pub read_chunk: usize,
    /// Accept queue length of each listening socket.
    pub listen_backlog: i32,
    /// Capacity of each shard-to-shard queue.
    pub mesh_queue: usize,
    /// Store requests a shard may have waiting for the store.
    pub store_queue: usize,
}

/// The protocol limits, mirrored here so the protocol core stays free of serde.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LimitsConfig {
    pub max_header_line: usize,
    pub recv_window: u32,
    pub max_message_size: usize,
    pub max_send_frame: u32,
    pub max_channels: usize,
    pub max_pending_replies: usize,
    pub max_answers_in_progress: usize,
    pub max_outstanding_msgs: usize,
    pub max_queued_octets: usize,
    pub max_session_assembly: usize,
    pub max_queued_replies: usize,
    pub max_unanswered_octets: usize,
    pub max_piggyback: usize,
    pub max_transmit: usize,
    pub max_xml_depth: usize,
    pub max_xml_attributes: usize,
}

impl From<&LimitsConfig> for Limits {
    fn from(c: &LimitsConfig) -> Self {
        Limits {
            max_header_line: c.max_header_line,
            recv_window: c.recv_window,
            max_message_size: c.max_message_size,
            max_send_frame: c.max_send_frame,
            max_channels: c.max_channels,
            max_pending_replies: c.max_pending_replies,
            max_answers_in_progress: c.max_answers_in_progress,
            max_outstanding_msgs: c.max_outstanding_msgs,
            max_queued_octets: c.max_queued_octets,
            max_session_assembly: c.max_session_assembly,
            max_queued_replies: c.max_queued_replies,
            max_unanswered_octets: c.max_unanswered_octets,
            max_piggyback: c.max_piggyback,
            max_transmit: c.max_transmit,
            max_xml_depth: c.max_xml_depth,
            max_xml_attributes: c.max_xml_attributes,
        }
    }
}

/// Values given on the command line; `None` leaves the file's (or default's) value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--domain`.
    pub domain: Option<String>,
    /// `--edge-listen`.
    pub edge_listen: Option<SocketAddr>,
    /// `--mesh-listen`.
    pub mesh_listen: Option<SocketAddr>,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--no-pin`.
    pub no_pin: bool,
    /// `--log`.
    pub log: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--grant`, repeatable: added to `access.grants`.
    pub grants: Vec<String>,
    /// `--peer`, repeatable: added to `mesh.peers`.
    pub peers: Vec<String>,
    /// `--trust`, repeatable: added to `mesh.trusted`.
    pub trusted: Vec<String>,
    /// `--dns-server`.
    pub dns_server: Option<SocketAddr>,
    /// `--auth`.
    pub auth_mode: Option<String>,
    /// `--users`.
    pub users: Option<String>,
    /// `--tls-cert`.
    pub tls_cert: Option<String>,
    /// `--tls-key`.
    pub tls_key: Option<String>,
    /// `--tls-ca`.
    pub tls_ca: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors (a path, or "embedded default").
    /// A file may give any subset of fields: the rest come from the embedded default.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config> {
        let mut base: toml::Table =
            toml::from_str(EMBEDDED_DEFAULT).context("embedded default configuration")?;
        let file: toml::Table = toml::from_str(text).map_err(|e| located(origin, text, &e))?;
        merge(&mut base, file);
        let merged = toml::to_string(&base).context("re-encoding configuration")?;
        let config: Config = toml::from_str(&merged).map_err(|e| {
            // Type errors are found after merging: report them against the user's file.
            match toml::from_str::<Config>(text) {
                Err(orig) if orig.span().is_some() => located(origin, text, &orig),
                _ => anyhow::anyhow!("{origin}: {}", e.message()),
            }
        })?;
        Ok(config)
    }

    /// Reads `path`, or the embedded default when `None`, then applies `overrides`.
    ///
    /// A value that parses but cannot work is reported against the file's line that sets it
    /// ("FILE:LINE: field `x`: ..."), or against the file alone when a flag or the default
    /// gave it.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        let (mut config, file) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read configuration file {}", path.display())
                })?;
                let origin = path.display().to_string();
                (Config::from_toml(&text, &origin)?, Some((origin, text)))
            }
            None => (Config::from_toml("", "embedded default")?, None),
        };
        config.apply(overrides);
        config.resolve_domain();
        if let Err(e) = config.validate() {
            return Err(match file {
                Some((origin, text)) => locate_invalid(&origin, &text, e),
                None => e,
            });
        }
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.domain {
            self.domain = v.clone();
        }
        if let Some(v) = o.edge_listen {
            self.edge_listen = v;
        }
        if let Some(v) = o.mesh_listen {
            self.mesh_listen = v;
        }
        if let Some(v) = o.shards {
            self.shards = v;
        }
        if o.no_pin {
            self.pin = false;
        }
        if let Some(v) = &o.log {
            self.log = v.clone();
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        self.access.grants.extend(o.grants.iter().cloned());
        self.mesh.peers.extend(o.peers.iter().cloned());
        self.mesh.trusted.extend(o.trusted.iter().cloned());
        if let Some(v) = o.dns_server {
            self.mesh.dns_server = v.to_string();
        }
        if let Some(v) = o.metrics_listen {
            self.metrics_listen = v.to_string();
        }
        for (value, field) in [
            (&o.auth_mode, &mut self.auth.mode),
            (&o.users, &mut self.auth.users),
            (&o.tls_cert, &mut self.tls.cert),
            (&o.tls_key, &mut self.tls.key),
            (&o.tls_ca, &mut self.tls.ca),
            (&o.data_dir, &mut self.data_dir),
        ] {
            if let Some(v) = value {
                field.clone_from(v);
            }
        }
    }

    /// The shard core's backpressure budgets.
    pub fn budgets(&self) -> apex_proto::shard::Budgets {
        apex_proto::shard::Budgets {
            max_backlog_octets: self.backpressure.max_backlog_octets,
            max_assembly_octets: self.backpressure.max_assembly_octets,
            stall: std::time::Duration::from_millis(self.backpressure.stall_ms),
            backlog_slack: self.backpressure.backlog_slack,
        }
    }

    /// The bounds of the relay's watches on forwarded statusRequests.
    pub fn report_watch(&self) -> apex_proto::apex::relay::ReportWatchLimits {
        apex_proto::apex::relay::ReportWatchLimits {
            timeout_ms: self.mesh.report_timeout_ms,
            max_watches: self.mesh.max_report_watches,
            max_timing_watches: self.mesh.max_timing_watches,
        }
    }

    /// The deadlines and per-address bound of accepted connections.
    pub fn conn_limits(&self) -> apex_proto::shard::ConnLimits {
        let millis = |ms: u64| (ms > 0).then(|| std::time::Duration::from_millis(ms));
        let runtime = &self.runtime;
        apex_proto::shard::ConnLimits {
            greeting_timeout: millis(runtime.greeting_timeout_ms),
            idle_timeout: millis(runtime.idle_timeout_ms),
            release_timeout: std::time::Duration::from_millis(runtime.release_timeout_ms),
            max_per_address: (runtime.max_connections_per_address > 0)
                .then_some(runtime.max_connections_per_address),
        }
    }

    /// How the shard core's outbound relay links behave.
    pub fn link_config(&self) -> apex_proto::shard::LinkConfig {
        apex_proto::shard::LinkConfig {
            our_domain: self.domain.clone(),
            queue: self.mesh.link_queue,
            in_flight: self.mesh.link_in_flight,
            connect_attempts: self.mesh.connect_attempts,
            max_backoff: std::time::Duration::from_millis(self.mesh.max_backoff_ms),
            close_timeout: std::time::Duration::from_millis(self.mesh.close_timeout_ms),
            setup_timeout: std::time::Duration::from_millis(self.mesh.setup_timeout_ms),
            // Links start TLS when there are roots to verify the next relay with.
            tls: !self.tls.ca.is_empty(),
        }
    }

    /// The static routes: domain (lower-cased) -> address.
    pub fn static_routes(&self) -> Result<Vec<(String, SocketAddr)>> {
        self.mesh
            .peers
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let (domain, addr) = text.rsplit_once('=').ok_or_else(|| {
                    anyhow::anyhow!("field `mesh.peers[{i}]`: '{text}' is not DOMAIN=HOST:PORT")
                })?;
                apex_proto::apex::addr::validate_domain(domain)
                    .map_err(|e| anyhow::anyhow!("field `mesh.peers[{i}]`: '{domain}': {e}"))?;
                let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        anyhow::anyhow!("field `mesh.peers[{i}]`: '{addr}' is not HOST:PORT")
                    })?;
                Ok((domain.to_ascii_lowercase(), addr))
            })
            .collect()
    }

    fn resolve_domain(&mut self) {
        if self.domain.is_empty() {
            self.domain = host_name().unwrap_or_else(|| "localhost".to_owned());
        }
        for grant in &mut self.access.grants {
            *grant = grant.replace("$DOMAIN", &self.domain);
        }
    }

    /// The access table: the RFC defaults plus `access.grants` for every local endpoint.
    pub fn access_table(&self) -> Result<AccessTable> {
        let mut table = AccessTable::new();
        for (i, text) in self.access.grants.iter().enumerate() {
            let text = text.replace("$DOMAIN", &self.domain);
            let grant = Grant::from_str(&text)
                .map_err(|e| anyhow::anyhow!("field `access.grants[{i}]`: '{text}': {e}"))?;
            table.grant_all_local(grant.actor, grant.actions);
        }
        Ok(table)
    }

    /// Bounds on the access entries endpoints store.
    pub fn access_limits(&self) -> AccessLimits {
        AccessLimits {
            max_entries_per_owner: self.access.max_entries_per_owner,
            max_entries: self.access.max_entries,
        }
    }

    /// The directory of the durable store: `data_dir` (`--data-dir`) when given, else
    /// `$STATE_DIRECTORY` (systemd; the first when it lists several), else `/var/lib/apexd` when
    /// running as root, else `$XDG_STATE_HOME/apexd`, else `$HOME/.local/state/apexd`.
    pub fn data_dir(&self) -> Result<PathBuf> {
        resolve_data_dir(
            &self.data_dir,
            |name| std::env::var_os(name),
            crate::sys::effective_uid(),
        )
    }

    /// Checks values that parse but cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.auth_mode()?;
        self.metrics_listen()?;
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            bail!("fields `tls.cert` and `tls.key` go together: give both or neither");
        }
        if self.domain.contains(char::is_whitespace) || self.domain.contains('@') {
            bail!("field `domain`: '{}' is not a domain name", self.domain);
        }
        if self.edge_listen == self.mesh_listen && self.edge_listen.port() != 0 {
            bail!(
                "fields `edge_listen` and `mesh_listen` are both {}",
                self.edge_listen
            );
        }
        if self.runtime.ring_depth < 8 || !self.runtime.ring_depth.is_power_of_two() {
            bail!(
                "field `runtime.ring_depth`: {} must be a power of two >= 8",
                self.runtime.ring_depth
            );
        }
        if self.runtime.io_memory < 64 * 1024 {
            bail!(
                "field `runtime.io_memory`: {} must be at least 65536",
                self.runtime.io_memory
            );
        }
        if self.runtime.read_chunk < 1024 {
            bail!(
                "field `runtime.read_chunk`: {} must be at least 1024",
                self.runtime.read_chunk
            );
        }
        if !(1..=65535).contains(&self.runtime.listen_backlog) {
            bail!(
                "field `runtime.listen_backlog`: {} must be between 1 and 65535",
                self.runtime.listen_backlog
            );
        }
        if self.runtime.max_connections == 0
            || self.runtime.mesh_queue == 0
            || self.runtime.store_queue == 0
        {
            bail!("fields `runtime.max_connections`, `runtime.mesh_queue` and `runtime.store_queue` must be at least 1");
        }
        // Refused sessions take a slot too while they are answered: leave room for them.
        if self.runtime.max_connections > apex_proto::shard::MAX_SLOTS / 2 {
            bail!(
                "field `runtime.max_connections`: {} must be at most {}",
                self.runtime.max_connections,
                apex_proto::shard::MAX_SLOTS / 2
            );
        }
        if self.runtime.release_timeout_ms == 0 {
            bail!("field `runtime.release_timeout_ms` must be at least 1");
        }
        if self.runtime.tcp_keepalive_ms != 0 && self.runtime.tcp_keepalive_ms < 1000 {
            bail!(
                "field `runtime.tcp_keepalive_ms`: {} must be 0 (off) or at least 1000 (the kernel counts seconds)",
                self.runtime.tcp_keepalive_ms
            );
        }
        if self.runtime.accept_backoff_max_ms < 10 {
            bail!(
                "field `runtime.accept_backoff_max_ms`: {} must be at least 10 (the first wait)",
                self.runtime.accept_backoff_max_ms
            );
        }
        if self.backpressure.max_assembly_octets < self.limits.max_message_size {
            bail!(
                "field `backpressure.max_assembly_octets`: {} must be at least limits.max_message_size ({})",
                self.backpressure.max_assembly_octets,
                self.limits.max_message_size
            );
        }
        if self.warnings.burst == 0
            || self.warnings.interval_ms == 0
            || self.warnings.max_peers == 0
        {
            bail!("fields `warnings.burst`, `warnings.interval_ms` and `warnings.max_peers` must be at least 1");
        }
        if self.backpressure.stall_ms == 0 {
            bail!("field `backpressure.stall_ms` must be at least 1");
        }
        if self.access.max_entries_per_owner == 0 {
            bail!("field `access.max_entries_per_owner` must be at least 1");
        }
        if self.access.max_entries == 0 {
            bail!("field `access.max_entries` must be at least 1");
        }
        if apex_proto::apex::addr::validate_domain(&self.domain).is_err() {
            bail!("field `domain`: '{}' is not a domain name", self.domain);
        }
        self.access_table()?;
        self.static_routes()?;
        if self.apex.max_depth < 4
            || self.apex.max_attributes < 4
            || self.apex.max_attribute_len < 64
        {
            bail!("fields `apex.max_depth`/`apex.max_attributes` must be >= 4 and `apex.max_attribute_len` >= 64");
        }
        if self.apex.max_recipients == 0 {
            bail!("field `apex.max_recipients` must be at least 1");
        }
        if self.mesh.link_queue == 0
            || self.mesh.link_in_flight == 0
            || self.mesh.connect_attempts == 0
        {
            bail!("fields `mesh.link_queue`, `mesh.link_in_flight` and `mesh.connect_attempts` must be at least 1");
        }
        if self.hold.max_per_originator == 0 {
            bail!("field `hold.max_per_originator` must be at least 1");
        }
        if self.mesh.max_report_watches == 0 {
            bail!("field `mesh.max_report_watches` must be at least 1 (to watch nothing, set `mesh.report_timeout_ms` to 0)");
        }
        if self.mesh.max_timing_watches == 0 {
            bail!("field `mesh.max_timing_watches` must be at least 1");
        }
        if self.mesh.setup_timeout_ms == 0 {
            bail!("field `mesh.setup_timeout_ms` must be at least 1");
        }
        parse_dns_server(&self.mesh.dns_server)?;
        Limits::from(&self.limits)
            .validate()
            .map_err(|field| anyhow::anyhow!("field `limits.{field}`"))?;
        Ok(())
    }

    /// The effective configuration as TOML (for `--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot encode configuration: {e}\n"))
    }

    /// Shards to run: the configured count, or one per CPU this process may use.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => online_cpus(),
            n => n,
        }
    }
}

/// [`Config::data_dir`] with the environment (`env`) and effective user id (`euid`) given, so
/// that it can be tested without changing the process's environment.
pub fn resolve_data_dir(
    configured: &str,
    env: impl Fn(&str) -> Option<OsString>,
    euid: u32,
) -> Result<PathBuf> {
    if !configured.is_empty() {
        return Ok(PathBuf::from(configured));
    }
    // systemd's StateDirectory= sets it, absolute, colon-separated when there are several.
    if let Some(dirs) = env("STATE_DIRECTORY") {
        if let Some(first) = dirs
            .as_bytes()
            .split(|&b| b == b':')
            .find(|d| !d.is_empty())
        {
            return Ok(PathBuf::from(OsStr::from_bytes(first)));
        }
    }
    if euid == 0 {
        return Ok(PathBuf::from("/var/lib/apexd"));
    }
    // The XDG base directory specification says relative values are to be ignored.
    let absolute = |name: &str| env(name).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(state) = absolute("XDG_STATE_HOME") {
        return Ok(state.join("apexd"));
    }
    if let Some(home) = absolute("HOME") {
        return Ok(home.join(".local/state/apexd"));
    }
    bail!(
        "no data directory: set `data_dir` or --data-dir (STATE_DIRECTORY is not set, apexd \
         is not running as root, and neither XDG_STATE_HOME nor HOME is an absolute path)"
    )
}

/// This host's name (gethostname(2)), when it has a non-empty one in UTF-8.
fn host_name() -> Option<String> {
    gethostname::gethostname()
        .into_string()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// CPUs this process may run on (its affinity mask), at least 1.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// "FILE:LINE: field `table.key`: message" from a toml error with a span.
fn located(origin: &str, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let Some(span) = e.span() else {
        return anyhow::anyhow!("{origin}: {}", e.message());
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    let table = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            (l.starts_with('[') && l.ends_with(']'))
                .then(|| l.trim_matches(['[', ']']).trim().to_owned())
        })
        .last();
    match line.split_once('=') {
        Some((key, _)) if !line.trim_start().starts_with('[') => {
            let key = key.trim();
            let field = table.map_or_else(|| key.to_owned(), |t| format!("{t}.{key}"));
            anyhow::anyhow!("{origin}:{line_no}: field `{field}`: {}", e.message())
        }
        _ => anyhow::anyhow!("{origin}:{line_no}: {}", e.message()),
    }
}

/// A validation error (which names the field as "field `table.key`") prefixed with the origin
/// and, when the file sets that field, its line.
fn locate_invalid(origin: &str, text: &str, e: anyhow::Error) -> anyhow::Error {
    let message = e.to_string();
    let line = message
        .split('`')
        .nth(1)
        // `mesh.peers[2]` is set by the line of `mesh.peers`.
        .map(|field| field.split('[').next().unwrap_or(field))
        .and_then(|field| field_line(text, field));
    match line {
        Some(line) => anyhow::anyhow!("{origin}:{line}: {message}"),
        None => anyhow::anyhow!("{origin}: {message}"),
    }
}

/// The line (from 1) of `text` that sets `field` ("table.key"), under a `[table]` header or as
/// a dotted key.
pub fn field_line(text: &str, field: &str) -> Option<usize> {
    let dotted = |key: &str| {
        key.split('.')
            .map(|part| part.trim().trim_matches(['"', '\'']))
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            table = dotted(line.trim_matches(['[', ']']));
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let key = dotted(key);
        let path = if table.is_empty() {
            key
        } else {
            format!("{table}.{key}")
        };
        if path == field {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.edge_listen.port(), 913);
        assert_eq!(config.mesh_listen.port(), 912);
        assert!(!config.domain.is_empty());
        // An empty domain is this host's name, as the kernel holds it.
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(config.domain, kernel.trim());
        assert_eq!(Limits::from(&config.limits), Limits::default());
        assert_eq!(ApexLimits::from(&config.apex), ApexLimits::default());
        assert_eq!(HoldLimits::from(&config.hold), HoldLimits::default());
        assert_eq!(
            crate::shard::warnings::WarnLimits::from(&config.warnings),
            crate::shard::warnings::WarnLimits::default()
        );
    }

    #[test]
    fn file_values_and_flags_merge() {
        let config = Config::from_toml(
            "domain = \"example.com\"\n[runtime]\nring_depth = 256\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(config.domain, "example.com");
        assert_eq!(config.runtime.ring_depth, 256);
        assert_eq!(config.runtime.io_memory, 524288);
        let mut config = config;
        config.apply(&Overrides {
            domain: Some("rubble.com".into()),
            shards: Some(2),
            ..Overrides::default()
        });
        assert_eq!((config.domain.as_str(), config.shards), ("rubble.com", 2));
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_validated() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.metrics_listen().unwrap(), None);
        let mut config =
            Config::from_toml("metrics_listen = \"127.0.0.1:9914\"\n", "t.toml").unwrap();
        assert_eq!(
            config.metrics_listen().unwrap(),
            Some("127.0.0.1:9914".parse().unwrap())
        );
        config.apply(&Overrides {
            metrics_listen: Some("127.0.0.2:1".parse().unwrap()),
            ..Overrides::default()
        });
        let again = Config::from_toml(&config.to_toml(), "printed").unwrap();
        assert_eq!(again.metrics_listen, "127.0.0.2:1");
        let config = Config::from_toml("metrics_listen = \"localhost\"\n", "t.toml").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("metrics_listen") && err.contains("localhost"),
            "{err}"
        );
    }

    #[test]
    fn dns_server_from_file_and_flag() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.mesh.dns_server, "");
        assert_eq!(config.mesh.dns_server(), None);
        let mut config = Config::from_toml(
            "domain = \"example.com\"\n[mesh]\ndns_server = \"127.0.0.1:5353\"\n",
            "t.toml",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.mesh.dns_server(),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        config.apply(&Overrides {
            dns_server: Some("[::1]:53".parse().unwrap()),
            ..Overrides::default()
        });
        config.validate().unwrap();
        assert_eq!(config.mesh.dns_server, "[::1]:53");
        assert_eq!(config.mesh.dns_server(), Some("[::1]:53".parse().unwrap()));
        // The effective configuration shows it and reads back the same.
        let again = Config::from_toml(&config.to_toml(), "printed").unwrap();
        assert_eq!(again.mesh.dns_server(), config.mesh.dns_server());
        for bad in ["127.0.0.1", "resolver.example:53", "127.0.0.1:x"] {
            let config = Config::from_toml(
                &format!("domain = \"example.com\"\n[mesh]\ndns_server = \"{bad}\"\n"),
                "t.toml",
            )
            .unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains("mesh.dns_server") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err = Config::from_toml(
            "domain = \"x\"\n\n[runtime]\nring_depth = \"deep\"\n",
            "relay.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("relay.toml:4:"), "{err}");
        assert!(
            err.contains("ring_depth") || err.contains("integer"),
            "{err}"
        );
        let err = Config::from_toml("domian = \"x\"\n", "relay.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("relay.toml:1:") && err.contains("domian"),
            "{err}"
        );
        let err = Config::from_toml("domain = \"x.org\"\n[limits]\nrecv_window = 10\n", "r.toml")
            .unwrap();
        assert!(err
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limits.recv_window"));
        for backlog in [0, 65536] {
            let config = Config::from_toml(
                &format!("domain = \"x.org\"\n[runtime]\nlisten_backlog = {backlog}\n"),
                "r.toml",
            )
            .unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("runtime.listen_backlog"), "{err}");
        }
    }

    /// Issue 19 items 7 and 8: the hold queue's originator share and default expiry, and the
    /// watches on forwarded statusRequests, come from the file with the core's defaults, and
    /// a zero share or watch limit names its file, line and field.
    #[test]
    fn hold_share_expiry_and_report_watches() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.hold.max_per_originator, 256);
        assert_eq!(HoldLimits::from(&config.hold).max_hold_ms, Some(3_600_000));
        assert_eq!(
            config.report_watch(),
            apex_proto::apex::relay::ReportWatchLimits::default()
        );
        // 0 is still "no administrative bound" (RFC 3342 §3 reads: indefinitely).
        let config = Config::from_toml("[hold]\nmax_hold_ms = 0\n", "t.toml").unwrap();
        assert_eq!(HoldLimits::from(&config.hold).max_hold_ms, None);
        let config = Config::from_toml(
            "[mesh]\nreport_timeout_ms = 1500\nmax_report_watches = 10\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(config.report_watch().timeout_ms, 1500);
        assert_eq!(config.report_watch().max_watches, 10);
        let config = Config::from_toml("[mesh]\nsetup_timeout_ms = 250\n", "t.toml").unwrap();
        assert_eq!(
            config.link_config().setup_timeout,
            std::time::Duration::from_millis(250)
        );
        let config = Config::from_toml("[mesh]\nmax_timing_watches = 7\n", "t.toml").unwrap();
        assert_eq!(config.report_watch().max_timing_watches, 7);
        let dir = std::env::temp_dir().join(format!("apexd-hold-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, field, line) in [
            (
                "domain = \"x.org\"\n[hold]\nmax_per_originator = 0\n",
                "hold.max_per_originator",
                3,
            ),
            (
                "domain = \"x.org\"\n\n[mesh]\nmax_report_watches = 0\n",
                "mesh.max_report_watches",
                4,
            ),
            (
                "domain = \"x.org\"\n[mesh]\nmax_timing_watches = 0\n",
                "mesh.max_timing_watches",
                3,
            ),
            (
                "domain = \"x.org\"\n[mesh]\n\nsetup_timeout_ms = 0\n",
                "mesh.setup_timeout_ms",
                4,
            ),
        ] {
            let path = dir.join("relay.toml");
            std::fs::write(&path, text).unwrap();
            let err = Config::load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("relay.toml:{line}:")) && err.contains(field),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_format_from_file_and_flag() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.log_format, LogFormat::Text);
        let mut config =
            Config::from_toml("domain = \"x.org\"\nlog_format = \"json\"\n", "t.toml").unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        config.apply(&Overrides {
            log_format: Some(LogFormat::Text),
            ..Overrides::default()
        });
        assert_eq!(config.log_format, LogFormat::Text);
        // --print-config shows it, and reads back the same.
        config.log_format = LogFormat::Json;
        let printed = config.to_toml();
        assert!(printed.contains("log_format = \"json\""), "{printed}");
        let again = Config::from_toml(&printed, "printed").unwrap();
        assert_eq!(again.log_format, LogFormat::Json);
        let err = Config::from_toml("domain = \"x.org\"\n\nlog_format = \"xml\"\n", "relay.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("relay.toml:3: field `log_format`") && err.contains("xml"),
            "{err}"
        );
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        let config =
            Config::from_toml("domain = \"x.org\"\n[warnings]\nburst = 0\n", "t.toml").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("warnings.burst"), "{err}");
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(
            err.contains("yaml") && err.contains("text or json"),
            "{err}"
        );
    }

    /// A value that parses but cannot work is reported at the line of the file that sets it,
    /// under a table header or as a dotted key; one given by a flag names the file only.
    #[test]
    fn invalid_values_name_the_file_line_and_field() {
        let dir = std::env::temp_dir().join(format!("apexd-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        let origin = path.display().to_string();
        for (text, line, field) in [
            (
                "domain = \"x.org\"\n\n[mesh]\npeers = [\"nowhere\"]\n",
                4,
                "mesh.peers[0]",
            ),
            (
                "domain = \"x.org\"\nmesh.peers = [\"nowhere\"]\n",
                2,
                "mesh.peers[0]",
            ),
            (
                "# c\n[runtime]\n# ring_depth = 8\nring_depth = 100\n",
                4,
                "runtime.ring_depth",
            ),
            ("[ tls ]\ncert = \"c.pem\"\n", 2, "tls.cert"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("{origin}:{line}: ")) && err.contains(field),
                "{text}: {err}"
            );
        }
        std::fs::write(&path, "domain = \"x.org\"\n").unwrap();
        let flagged = Overrides {
            peers: vec!["nowhere".into()],
            ..Overrides::default()
        };
        let err = Config::load(Some(&path), &flagged).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{origin}: field `mesh.peers[0]`")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 19 item 9 and 11: the connection deadlines, the per-address bound, keepalive and
    /// the accept backoff have defaults, reach the shard core, and a value that cannot work
    /// names the file, the line and the field.
    #[test]
    fn connection_deadlines_and_bounds_from_file_and_validated() {
        use std::time::Duration;
        let config = Config::load(None, &Overrides::default()).unwrap();
        let limits = config.conn_limits();
        assert_eq!(limits.greeting_timeout, Some(Duration::from_secs(10)));
        assert_eq!(limits.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(limits.release_timeout, Duration::from_secs(5));
        assert_eq!(limits.max_per_address, Some(64));
        assert_eq!(config.runtime.tcp_keepalive_ms, 30_000);
        assert_eq!(config.runtime.accept_backoff_max_ms, 1000);
        let config = Config::from_toml(
            "domain = \"x.org\"\n[runtime]\ngreeting_timeout_ms = 0\nidle_timeout_ms = 0\nmax_connections_per_address = 0\n",
            "t.toml",
        )
        .unwrap();
        let limits = config.conn_limits();
        assert_eq!(
            (
                limits.greeting_timeout,
                limits.idle_timeout,
                limits.max_per_address
            ),
            (None, None, None),
            "0 turns each off"
        );
        let dir = std::env::temp_dir().join(format!("apexd-config-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        let origin = path.display().to_string();
        for (text, line, field) in [
            (
                "[runtime]\ntcp_keepalive_ms = 500\n",
                2,
                "runtime.tcp_keepalive_ms",
            ),
            (
                "[runtime]\n\nrelease_timeout_ms = 0\n",
                3,
                "runtime.release_timeout_ms",
            ),
            (
                "[runtime]\naccept_backoff_max_ms = 1\n",
                2,
                "runtime.accept_backoff_max_ms",
            ),
            (
                "[runtime]\nidle_timeout_ms = \"soon\"\n",
                2,
                "runtime.idle_timeout_ms",
            ),
        ] {
            std::fs::write(&path, format!("domain = \"x.org\"\n{text}")).unwrap();
            let err = Config::load(Some(&path), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("{origin}:{}: ", line + 1)) && err.contains(field),
                "{text}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn data_dir_resolution_order() {
        let all = [
            ("STATE_DIRECTORY", "/run/state/apexd:/run/state/other"),
            ("XDG_STATE_HOME", "/home/fred/.state"),
            ("HOME", "/home/fred"),
        ];
        // The configured directory (file or --data-dir) wins over everything.
        assert_eq!(
            resolve_data_dir("/srv/apexd", env(&all), 0).unwrap(),
            PathBuf::from("/srv/apexd")
        );
        // systemd's, the first of several.
        assert_eq!(
            resolve_data_dir("", env(&all), 1000).unwrap(),
            PathBuf::from("/run/state/apexd")
        );
        // Root without systemd.
        assert_eq!(
            resolve_data_dir("", env(&all[1..]), 0).unwrap(),
            PathBuf::from("/var/lib/apexd")
        );
        assert_eq!(
            resolve_data_dir("", env(&all[1..]), 1000).unwrap(),
            PathBuf::from("/home/fred/.state/apexd")
        );
        assert_eq!(
            resolve_data_dir("", env(&all[2..]), 1000).unwrap(),
            PathBuf::from("/home/fred/.local/state/apexd")
        );
        // Empty or relative values are not used.
        let odd = [
            ("STATE_DIRECTORY", ""),
            ("XDG_STATE_HOME", "state"),
            ("HOME", "/home/wilma"),
        ];
        assert_eq!(
            resolve_data_dir("", env(&odd), 1000).unwrap(),
            PathBuf::from("/home/wilma/.local/state/apexd")
        );
        let err = resolve_data_dir("", env(&[("HOME", "")]), 1000)
            .unwrap_err()
            .to_string();
        for name in [
            "data_dir",
            "--data-dir",
            "STATE_DIRECTORY",
            "XDG_STATE_HOME",
            "HOME",
        ] {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn data_dir_from_file_and_flag() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.data_dir, "");
        let mut config = Config::from_toml(
            "domain = \"example.com\"\ndata_dir = \"/srv/a\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(config.data_dir().unwrap(), PathBuf::from("/srv/a"));
        config.apply(&Overrides {
            data_dir: Some("/srv/b".into()),
            ..Overrides::default()
        });
        assert_eq!(config.data_dir().unwrap(), PathBuf::from("/srv/b"));
        let again = Config::from_toml(&config.to_toml(), "printed").unwrap();
        assert_eq!(again.data_dir, "/srv/b");
    }

    #[test]
    fn access_limits_from_file_and_validated() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.access_limits(), AccessLimits::default());
        let config = Config::from_toml(
            "domain = \"example.com\"\n[access]\nmax_entries_per_owner = 8\nmax_entries = 100\n",
            "t.toml",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.access_limits(),
            AccessLimits {
                max_entries_per_owner: 8,
                max_entries: 100
            }
        );
        // The grants stay the default's when only the limits are given.
        assert_eq!(config.access.grants, vec!["*@$DOMAIN=core:data".to_owned()]);
        for field in ["max_entries_per_owner", "max_entries"] {
            let config = Config::from_toml(
                &format!("domain = \"example.com\"\n[access]\n{field} = 0\n"),
                "t.toml",
            )
            .unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`access.{field}`")), "{err}");
        }
        let err = Config::from_toml("[access]\nmax_entries = -1\n", "r.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("r.toml:2:") && err.contains("access.max_entries"),
            "{err}"
        );
    }
}
