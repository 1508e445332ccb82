//! `apex`: a command-line APEX endpoint (RFC 3340) for talking to a relay over BEEP.
//!
//! ```text
//! apex [RELAY] [SECURITY] attach NAME [--count N] [--timeout SECS]
//! apex [RELAY] [SECURITY] send --from NAME --to NAME [--to NAME...] [--status] [TIMING] [--timeout SECS] TEXT|-
//! apex [RELAY] [SECURITY] access --as NAME [--timeout SECS] query OWNER ACTOR ACTION...
//! apex [RELAY] [SECURITY] access --as NAME [--timeout SECS] get [--literal] OWNER ACTOR
//! apex [RELAY] [SECURITY] access --as NAME [--timeout SECS] set [--literal] OWNER ACTOR ACTION... [--last-update TS]
//! apex [RELAY] [SECURITY] access --as NAME [--timeout SECS] delete [--literal] OWNER ACTOR [--last-update TS]
//! apex status [--metrics ADDR] [--interval SECS] [--json] [--timeout SECS]
//! apex endpoints [--metrics ADDR] [--limit N] [--json] [--timeout SECS]
//! apex links [--metrics ADDR] [--json] [--timeout SECS]
//!
//! RELAY:    --relay HOST:PORT | [--dns-server ADDR:PORT]
//! SECURITY: [--tls] [--tls-ca PEM] [--tls-name NAME]
//!           [--user NAME@DOMAIN [--password-file FILE] [--mechanism SCRAM-SHA-256|PLAIN]]
//! ```
//!
//! Without `--relay`, the relay is the one of the endpoint's domain (NAME, or `--from`), found
//! as RFC 3340 §3.1 says (APEX-04): the DNS SRV records `_apex-edge._tcp.DOMAIN` in RFC 2782
//! order, else DOMAIN's own addresses on port 913; a domain literal (`fred@[192.0.2.1]`) is
//! its address on port 913. `--dns-server` asks that server instead of the system's.
//!
//! Both commands connect, exchange greetings and start a channel with the APEX profile,
//! piggybacking `<attach endpoint='NAME' transID='1' />` (RFC 3340 §4.2). `attach` then
//! prints `attached NAME` and one line per delivered `data`; `send` sends one `data` and prints
//! `accepted` or `error CODE TEXT`, then, with `--status`, one `status IDENTITY CODE TEXT` line per
//! destination of the relay's statusResponse (RFC 3340 §5.1, §6.2). TIMING (`--no-later-than
//! MS`, `--report-after MS`, `--return-trip MS`, `--report-errors`) adds a dataTiming option
//! (RFC 3342 §2, `targetHop='all' mustUnderstand='true'`): each timing report prints
//! `timing IDENTITY CODE TEXT` (350 transient, 550 timing error, 250 final hop), and with
//! `--return-trip` send waits for a 250 or 550 per recipient. Blocking std
//! networking over the sans-IO session of `apex-proto`; no async runtime.
//!
//! `access` attaches as `--as NAME` and talks to the access service of OWNER's domain,
//! `apex=access@DOMAIN` (RFC 3341): each request is a `data` from NAME with the element inline,
//! each answer a `data` from the service, matched by transID (a fresh one per request); other
//! deliveries are acknowledged and ignored. OWNER and ACTOR are typed as a person writes them:
//! `'*@example.com'` is the wildcard pattern; `--literal` escapes `*` and `\` (`\*`, `\\`,
//! RFC 3341 §3) so that an endpoint whose name holds them can be named. `query`'s ACTOR is an
//! address, never escaped. ACTION is a `service:operation` token (`core:data`).
//!
//! - `query` prints `allow` or `deny`;
//! - `get` prints `OWNER ACTOR ACTIONS lastUpdate=TS` (ACTOR as the service writes it, escaped);
//! - `set` prints `250 set`, `delete` prints `250 deleted`. Without `--last-update` they first
//!   `get` the entry for its lastUpdate, as RFC 3341 §2.3 asks of clients; a 551 answer (no
//!   such entry) makes `set` create it, and ends `delete` with that error.
//!
//! A refusal prints `error CODE TEXT`, no answer within `--timeout` (default 10 s) prints
//! `error timeout waiting for apex=access`; both exit with status 1.
//!
//! Before the attach, the session can be tuned (RFC 3080 §3-4), as a relay with `--users`
//! requires (an attach without authentication gets 530):
//!
//! - `--tls` (implied by `--tls-ca` and `--tls-name`) starts TLS right after the greetings
//!   (`<ready />` piggybacked on the TLS profile's `start`, `<proceed />` in its reply), as the
//!   TLS client, and greets again over it; it fails when the relay does not offer TLS. The
//!   relay's certificate must name `--tls-name` (default: the domain of the endpoint attached
//!   as, or the host of `--relay` when that domain is an address literal) and be signed by a
//!   root in `--tls-ca` (default: the system's roots).
//! - `--user NAME@DOMAIN` authenticates with SASL SCRAM-SHA-256, checking the relay's server
//!   signature too (mutual authentication), or with `--mechanism PLAIN` (only with TLS). The
//!   password is the first line of `--password-file FILE`, else the environment variable
//!   `APEX_PASSWORD`, never an argument. A refusal prints `error CODE TEXT` (e.g.
//!   `error 535 authentication failed`) and exits with status 1.
//!
//! `status`, `endpoints` and `links` need no `--relay`: they read apexd's monitoring endpoint
//! (`apexd --metrics-listen ADDR`) over HTTP; see the `status` module.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use apex_proto::apex::access::{escape, format_actions, parse_actions, Action, ActorPattern};
use apex_proto::apex::access_ops::{
    carried_element, element_data, format_answer, format_request,
    parse_answer as parse_access_answer, service_endpoint, AccessAnswer, AccessElement,
    AccessRequest, ACCESS_SERVICE,
};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::client::{
    self, attach_message, attach_offer, ok_payload, parse_answer, parse_incoming,
    parse_piggybacked_answer, Answer, Content, DataBuilder, Incoming, StatusResponse,
};
use apex_proto::apex::msg::{apex_code, error_payload, Data};
use apex_proto::apex::timestamp::Timestamp;
use apex_proto::auth::scram::{fresh_nonce, ScramClient};
use apex_proto::beep::mgmt::{ErrorElement, Greeting, ProfileOffer};
use apex_proto::beep::tuning::{self, BlobStatus, TuningElement};
use apex_proto::limits::MAX_31BIT;
use apex_proto::tls::{crypto_provider, TlsLayer};
use apex_proto::{xml, Event, ReplyKind, Role, Session, SessionConfig};
use bytes::{Bytes, BytesMut};
use clap::{CommandFactory, Parser, Subcommand};

use apex_proto::apex::relay::APEX_PROFILE as APEX;
use apexd::dns;

#[path = "apex/status.rs"]
mod status;

/// The transaction identifier of our (only) attach on the channel.
const ATTACH_TRANS_ID: u32 = 1;

/// Longest a single read blocks, so that a signal is noticed promptly.
const POLL: Duration = Duration::from_millis(100);

/// How long `send --status` waits for the report by default.
const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `access` waits for each answer of the service by default.
const DEFAULT_ACCESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds for XML we parse ourselves (data-content bodies).
const XML_DEPTH: usize = 32;
const XML_ATTRIBUTES: usize = 16;

/// Command-line APEX endpoint: attach to a relay and print the data it delivers, or send data.
#[derive(Debug, Parser)]
#[command(name = "apex", version)]
struct Cli {
    /// The relay's endpoint (apex-edge) address (attach, send and access). Default: the relay
    /// of the endpoint's domain, found with DNS SRV `_apex-edge._tcp.DOMAIN` (RFC 3340 §3.1),
    /// else DOMAIN's addresses on port 913; a domain literal (`[192.0.2.1]`) is its address on
    /// port 913.
    #[arg(long, value_name = "HOST:PORT")]
    relay: Option<String>,
    /// The DNS server to ask for the relay when --relay is not given (default: the system's,
    /// from /etc/resolv.conf).
    #[arg(long, value_name = "ADDR:PORT")]
    dns_server: Option<SocketAddr>,
    /// Seconds allowed for connecting, each handshake step, the relay's answer to our data and
    /// closing the session.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// attach: detach and exit (status 0) after SECS without traffic from the relay (default:
    /// never). send: seconds to wait for the status report once the relay accepted the data
    /// (default: 10). access: seconds to wait for each answer of the service (default: 10).
    /// status, endpoints, links: seconds allowed for connecting to the monitoring endpoint and
    /// for its whole answer (default: 5).
    #[arg(long, global = true, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Start TLS right after the greetings and greet again over it (RFC 3080 §3.1); fails when
    /// the relay does not offer TLS.
    #[arg(long, global = true)]
    tls: bool,
    /// PEM file of the root certificates that verify the relay's certificate (implies --tls;
    /// default: the system's roots).
    #[arg(long, global = true, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The name the relay's certificate must carry (implies --tls; default: the domain of the
    /// endpoint attached as, or the host of --relay when that domain is an address literal).
    #[arg(long, global = true, value_name = "NAME")]
    tls_name: Option<String>,
    /// Authenticate as this user with SASL before attaching. The password is the first line of
    /// --password-file, else the environment variable APEX_PASSWORD.
    #[arg(long, global = true, value_name = "NAME@DOMAIN")]
    user: Option<String>,
    /// File whose first line is --user's password.
    #[arg(long, global = true, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// SASL mechanism for --user: SCRAM-SHA-256 (the default; the relay proves it knows the
    /// credentials too) or PLAIN (sends the password, so only under TLS).
    #[arg(long, global = true, value_enum, value_name = "MECHANISM")]
    mechanism: Option<Mechanism>,
    #[command(subcommand)]
    command: Command,
}

/// A SASL mechanism `apex` can authenticate with (RFC 3080 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mechanism {
    /// SCRAM-SHA-256 (RFC 5802, RFC 7677).
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// PLAIN (RFC 4616).
    #[value(name = "PLAIN")]
    Plain,
}

impl Mechanism {
    /// Its IANA name, which ends its BEEP profile URI.
    fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::Plain => "PLAIN",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach as NAME and print one line per data delivered: `from=.. to=.. content=..`.
    Attach {
        /// Endpoint identity to attach as, e.g. barney@example.com.
        #[arg(value_name = "NAME")]
        name: String,
        /// Detach and exit after N data messages.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Attach as --from and send one data to every --to; prints `accepted` or `error CODE TEXT`.
    Send {
        /// Originator: the endpoint to attach and send as.
        #[arg(long, value_name = "NAME")]
        from: String,
        /// Recipient endpoint (repeatable).
        #[arg(long = "to", value_name = "NAME", required = true)]
        to: Vec<String>,
        /// Ask for a statusResponse and print `status IDENTITY CODE TEXT` per destination.
        #[arg(long)]
        status: bool,
        /// dataTiming noLaterThan: the data must be delivered within MS milliseconds
        /// (RFC 3342 §2.1).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..=MAX_TIMING_MS))]
        no_later_than: Option<u32>,
        /// dataTiming reportAfter: a transient report (350) when delivery takes longer than MS.
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..=MAX_TIMING_MS))]
        report_after: Option<u32>,
        /// dataTiming returnTrip: a final hop report (250) on delivery, itself bounded by MS.
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..=MAX_TIMING_MS))]
        return_trip: Option<u32>,
        /// dataTiming reportErrors: a timing error report (550) when noLaterThan runs out.
        #[arg(long)]
        report_errors: bool,
        /// The content, sent as text in a data-content element; `-` reads standard input
        /// (one trailing newline is dropped).
        #[arg(value_name = "TEXT|-")]
        text: String,
    },
    /// Attach as --as and ask the access service of OWNER's domain (apex=access@DOMAIN,
    /// RFC 3341) to query, read, set or delete an access entry.
    Access {
        /// The endpoint to attach as: the originator of the requests.
        #[arg(long = "as", value_name = "NAME")]
        name: String,
        #[command(subcommand)]
        op: AccessCommand,
    },
    /// The relay at a glance, from its monitoring endpoint: a header, then sessions,
    /// endpoints, links and message rates per shard and in total.
    Status {
        #[command(flatten)]
        metrics: status::MetricsArgs,
        /// Seconds between the two reads the rates come from (0: read once, no rates;
        /// --json reads once).
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = status::parse_interval)]
        interval: Duration,
    },
    /// The endpoints attached to the relay, from its monitoring endpoint.
    Endpoints {
        #[command(flatten)]
        metrics: status::MetricsArgs,
        /// List at most N endpoints.
        #[arg(long, value_name = "N", default_value_t = status::DEFAULT_ENDPOINT_LIMIT,
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// The relay's outbound links and the relays bound to it, from its monitoring endpoint.
    Links {
        #[command(flatten)]
        metrics: status::MetricsArgs,
    },
}

/// One request (or, for set and delete, a get and a set) to the access service.
#[derive(Debug, Subcommand)]
enum AccessCommand {
    /// Whether ACTOR may do every ACTION to OWNER: prints `allow` or `deny`.
    Query {
        /// The entries' owner, e.g. fred@example.com.
        #[arg(value_name = "OWNER")]
        owner: String,
        /// The address asked about (an address, not a pattern; never escaped).
        #[arg(value_name = "ACTOR")]
        actor: String,
        /// Action tokens, e.g. core:data presence:subscribe.
        #[arg(value_name = "ACTION", required = true)]
        actions: Vec<String>,
    },
    /// OWNER's entry whose actor is exactly ACTOR: prints `OWNER ACTOR ACTIONS lastUpdate=TS`.
    Get {
        /// The entries' owner.
        #[arg(value_name = "OWNER")]
        owner: String,
        /// The entry's actor: an address or a pattern such as '*@example.com'.
        #[arg(value_name = "ACTOR")]
        actor: String,
        /// ACTOR is an endpoint name: its `*` and `\` are literal characters, not wildcards.
        #[arg(long)]
        literal: bool,
    },
    /// Creates or replaces OWNER's entry for ACTOR: prints `250 set`.
    Set {
        /// The entries' owner.
        #[arg(value_name = "OWNER")]
        owner: String,
        /// The entry's actor: an address or a pattern such as '*@example.com'.
        #[arg(value_name = "ACTOR")]
        actor: String,
        /// Action tokens to grant, e.g. core:data (all:none grants nothing).
        #[arg(value_name = "ACTION", required = true)]
        actions: Vec<String>,
        /// The entry's current lastUpdate, which the service checks; without it the entry is
        /// read first (and created when there is none).
        #[arg(long, value_name = "TS")]
        last_update: Option<String>,
        /// ACTOR is an endpoint name: its `*` and `\` are literal characters, not wildcards.
        #[arg(long)]
        literal: bool,
    },
    /// Deletes OWNER's entry for ACTOR: prints `250 deleted`.
    Delete {
        /// The entries' owner.
        #[arg(value_name = "OWNER")]
        owner: String,
        /// The entry's actor: an address or a pattern such as '*@example.com'.
        #[arg(value_name = "ACTOR")]
        actor: String,
        /// The entry's current lastUpdate, which the service checks; without it the entry is
        /// read first.
        #[arg(long, value_name = "TS")]
        last_update: Option<String>,
        /// ACTOR is an endpoint name: its `*` and `\` are literal characters, not wildcards.
        #[arg(long)]
        literal: bool,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// How a command ended when it did not fail with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Exit status 0.
    Success,
    /// Exit status 1; the reason was already printed (`error CODE TEXT`).
    Failed,
}

fn main() -> ExitCode {
    if let Some(pages) = apexd::manpages::generate_if_asked(
        std::env::args_os(),
        Cli::command,
        "1",
        apexd::manpages::APEX_SECTIONS,
    ) {
        return match pages {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apex: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(Status::Success) => ExitCode::SUCCESS,
        Ok(Status::Failed) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("apex: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<Status> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a clean detach; a second one exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let io_timeout = cli.connect_timeout;
    let stdout = std::io::stdout();
    let env_password = std::env::var("APEX_PASSWORD").ok();
    let monitoring = |metrics, query| {
        let timeout = cli.timeout.unwrap_or(status::DEFAULT_METRICS_TIMEOUT);
        Ok(status::run(
            metrics,
            query,
            timeout,
            &stop,
            &mut stdout.lock(),
        ))
    };
    match &cli.command {
        Command::Status { metrics, interval } => monitoring(
            metrics,
            status::Query::Status {
                interval: *interval,
            },
        ),
        Command::Endpoints { metrics, limit } => {
            monitoring(metrics, status::Query::Endpoints { limit: *limit })
        }
        Command::Links { metrics } => monitoring(metrics, status::Query::Links),
        Command::Attach { name, count } => {
            let name = endpoint(name)?;
            let opts = AttachOpts {
                security: resolve_security(&cli, &name, env_password)?,
                name,
                count: *count,
                idle: cli.timeout,
                io_timeout,
            };
            let stream = connect_relay(&cli, &opts.name, io_timeout)?;
            run_attach(stream, &opts, stop, &mut stdout.lock())
        }
        Command::Send {
            from,
            to,
            status,
            no_later_than,
            report_after,
            return_trip,
            report_errors,
            text,
        } => {
            let from = endpoint(from)?;
            let security = resolve_security(&cli, &from, env_password)?;
            let text = if text == "-" {
                read_stdin()?
            } else {
                text.clone()
            };
            check_xml_chars(&text)?;
            let status = status.then(status_trans_id);
            let opts = SendOpts {
                from,
                to: to.iter().map(|t| endpoint(t)).collect::<Result<_>>()?,
                status,
                timing: timing_option(
                    *no_later_than,
                    *report_after,
                    *return_trip,
                    *report_errors,
                    status,
                )?,
                security,
                text,
                status_timeout: cli.timeout.unwrap_or(DEFAULT_STATUS_TIMEOUT),
                io_timeout,
            };
            let stream = connect_relay(&cli, &opts.from, io_timeout)?;
            run_send(stream, &opts, stop, &mut stdout.lock())
        }
        Command::Access { name, op } => {
            let name = endpoint(name)?;
            let (service, op) = access_op(op)?;
            let opts = AccessOpts {
                security: resolve_security(&cli, &name, env_password)?,
                name,
                service,
                op,
                answer_timeout: cli.timeout.unwrap_or(DEFAULT_ACCESS_TIMEOUT),
                io_timeout,
                first_trans_id: status_trans_id(),
            };
            let stream = connect_relay(&cli, &opts.name, io_timeout)?;
            run_access(stream, &opts, stop, &mut stdout.lock())
        }
    }
}

/// Connects to `--relay`, else to the relay of `me`'s domain as DNS names it (APEX-04).
fn connect_relay(cli: &Cli, me: &Endpoint, timeout: Duration) -> Result<TcpStream> {
    match &cli.relay {
        Some(relay) => connect(relay, timeout),
        None => {
            let found = find_relay(me.domain(), cli.dns_server)?;
            connect_first(&found, me.domain(), timeout)
        }
    }
}

/// The relay of `domain` for its endpoints (RFC 3340 §3.1): SRV `_apex-edge._tcp.<domain>` in
/// RFC 2782 order, else the domain's addresses on port 913, or a domain literal's address on
/// port 913; asking `dns_server` when given, and only loopback under
/// `APEXD_DNS_LOOPBACK_ONLY` (as apexd does).
fn find_relay(domain: &str, dns_server: Option<SocketAddr>) -> Result<Vec<SocketAddr>> {
    let settings = dns::Settings {
        server: dns_server,
        timeout: dns::LOOKUP_TIMEOUT,
        loopback_only: std::env::var_os(dns::LOOPBACK_ONLY_ENV)
            .is_some_and(|v| !v.is_empty() && v != "0"),
    };
    let resolver = dns::Resolver::start(settings).context("cannot start the DNS resolver")?;
    futures_lite::future::block_on(resolver.resolve(dns::Service::Edge, domain))
        .with_context(|| format!("cannot find the relay of {domain} (give --relay HOST:PORT)"))
}

/// How a session is tuned before the attach.
#[derive(Debug, Default)]
struct Security {
    /// TLS right after the greetings.
    tls: Option<TlsOpts>,
    /// SASL authentication (after TLS, when both are asked for).
    auth: Option<Credentials>,
}

/// What TLS with the relay verifies.
#[derive(Debug)]
struct TlsOpts {
    config: Arc<rustls::ClientConfig>,
    /// The name the relay's certificate must carry.
    name: String,
}

/// Who `--user` is.
struct Credentials {
    user: String,
    password: String,
    mechanism: Mechanism,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("mechanism", &self.mechanism)
            .finish_non_exhaustive()
    }
}

/// The tuning the command line asks for when attaching as `me`; `env_password` is
/// `APEX_PASSWORD`.
fn resolve_security(cli: &Cli, me: &Endpoint, env_password: Option<String>) -> Result<Security> {
    let tls = cli.tls || cli.tls_ca.is_some() || cli.tls_name.is_some();
    let auth = match &cli.user {
        None => {
            if cli.password_file.is_some() || cli.mechanism.is_some() {
                bail!("--password-file and --mechanism go with --user");
            }
            None
        }
        Some(user) => {
            let user = endpoint(user)
                .map_err(|_| anyhow!("--user must be NAME@DOMAIN, not '{user}'"))?
                .as_str()
                .to_owned();
            let mechanism = cli.mechanism.unwrap_or(Mechanism::ScramSha256);
            if mechanism == Mechanism::Plain && !tls {
                bail!("--mechanism PLAIN sends the password, so it needs --tls (or use SCRAM-SHA-256)");
            }
            let password = password(cli.password_file.as_deref(), env_password)?;
            Some(Credentials {
                user,
                password,
                mechanism,
            })
        }
    };
    let tls = if tls {
        let name = match &cli.tls_name {
            Some(name) => name.clone(),
            None => default_tls_name(me, cli.relay.as_deref())?,
        };
        rustls::pki_types::ServerName::try_from(name.as_str())
            .map_err(|e| anyhow!("'{name}' cannot name a TLS server: {e}"))?;
        Some(TlsOpts {
            config: tls_config(cli.tls_ca.as_deref())?,
            name,
        })
    } else {
        None
    };
    Ok(Security { tls, auth })
}

/// The first line of `file`, else `env` (`APEX_PASSWORD`).
fn password(file: Option<&Path>, env: Option<String>) -> Result<String> {
    let password = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the password file {}", path.display()))?;
            text.lines().next().unwrap_or_default().to_owned()
        }
        None => env.ok_or_else(|| {
            anyhow!("--user needs a password: --password-file FILE or the environment variable APEX_PASSWORD")
        })?,
    };
    if password.is_empty() {
        match file {
            Some(path) => bail!(
                "the password file {} starts with an empty line",
                path.display()
            ),
            None => bail!("APEX_PASSWORD is empty"),
        }
    }
    Ok(password)
}

/// The name the relay's certificate is checked for by default: the endpoint's domain (a
/// relay's certificate names the APEX domain it serves), or, for an address literal, the host
/// of `relay` when that is a name.
fn default_tls_name(me: &Endpoint, relay: Option<&str>) -> Result<String> {
    if !me.is_domain_literal() {
        return Ok(me.domain().to_owned());
    }
    let Some(relay) = relay else {
        bail!(
            "cannot tell which name the relay's certificate carries ({} is an address): give --tls-name",
            me.domain()
        );
    };
    let host = match relay.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => relay,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.parse::<IpAddr>().is_ok() {
        bail!(
            "cannot tell which name the relay's certificate carries ({} and {relay} are addresses): give --tls-name",
            me.domain()
        );
    }
    Ok(host.to_owned())
}

/// A TLS client configuration trusting the roots in `ca`, else the system's.
fn tls_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
            if certs.is_empty() {
                bail!("{}: no PEM certificate in it", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| anyhow!("{}: unusable root certificate: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!("no root certificates found on this system: give the relay's CA with --tls-ca PEM");
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn endpoint(text: &str) -> Result<Endpoint> {
    Endpoint::parse(text).map_err(|e| anyhow!("invalid endpoint identity '{text}': {e}"))
}

fn read_stdin() -> Result<String> {
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .context("reading standard input")?;
    let mut text = String::from_utf8(raw).map_err(|_| anyhow!("standard input is not UTF-8"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// XML 1.0 cannot carry most C0 controls, even as character references.
fn check_xml_chars(text: &str) -> Result<()> {
    match text.chars().find(|c| {
        (*c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    }) {
        Some(c) => bail!(
            "the content holds U+{:04X}, which XML cannot carry",
            u32::from(c)
        ),
        None => Ok(()),
    }
}

/// The largest dataTiming value (MILLISECS, RFC 3342 §6: 0..2147483647).
const MAX_TIMING_MS: i64 = 0x7FFF_FFFF;

/// The dataTiming option of `apex send`, when any TIMING flag was given: its transID is
/// fresh, and distinct from the statusRequest's (`status`), so that reports tell apart.
fn timing_option(
    no_later_than: Option<u32>,
    report_after: Option<u32>,
    return_trip: Option<u32>,
    report_errors: bool,
    status: Option<u32>,
) -> Result<Option<Timing>> {
    if no_later_than.is_none() && report_after.is_none() && return_trip.is_none() {
        if report_errors {
            bail!("--report-errors goes with --no-later-than");
        }
        return Ok(None);
    }
    Ok(Some(Timing {
        trans_id: status.map_or_else(status_trans_id, |id| id % 0x7FFF_FFFF + 1),
        no_later_than: no_later_than.unwrap_or(0),
        report_after: report_after.unwrap_or(0),
        return_trip: return_trip.unwrap_or(0),
        report_errors,
    }))
}

/// A random-looking transaction identifier in 1..=2^31-1 (RFC 3340 §6.1.1).
fn status_trans_id() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    match (x & 0x7FFF_FFFF) as u32 {
        0 => 1,
        id => id,
    }
}

fn connect(relay: &str, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = relay
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve relay address '{relay}'"))?
        .collect();
    if addrs.is_empty() {
        bail!("relay address '{relay}' resolves to nothing");
    }
    connect_first(&addrs, relay, timeout)
}

/// Connects to the first of `addrs` that accepts, in order (RFC 2782: every address of every
/// target); `relay` names them in the error.
fn connect_first(addrs: &[SocketAddr], relay: &str, timeout: Duration) -> Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some((addr, e)),
        }
    }
    match last {
        Some((addr, e)) => Err(anyhow!("cannot connect to {relay} at {addr}: {e}")),
        None => Err(anyhow!("no address for the relay of {relay}")),
    }
}

/// What `Peer::wait` came back with.
#[derive(Debug)]
enum Wait {
    Event(Event),
    Timeout,
    Interrupted,
}

/// One BEEP session over a blocking TCP stream, through TLS once it began.
struct Peer {
    stream: TcpStream,
    session: Session,
    /// TLS between the socket and the session, once `proceed` came.
    tls: Option<TlsLayer>,
    /// Octets read and not yet taken by TLS.
    cipher: BytesMut,
    /// Plaintext for the session.
    inbox: BytesMut,
    stop: Arc<AtomicBool>,
    /// Whether `wait` reports a raised stop flag (not while detaching).
    interruptible: bool,
    /// Deliveries to this endpoint that arrive while closing are acknowledged rather than
    /// refused with 421: set by a command that ignores deliveries anyway (`access`, which
    /// otherwise would refuse the owner's notice of its own change).
    accept_while_closing: Option<Endpoint>,
}

impl Peer {
    fn new(
        stream: TcpStream,
        session: Session,
        stop: Arc<AtomicBool>,
        io: Duration,
    ) -> Result<Self> {
        stream.set_nodelay(true).context("configuring the socket")?;
        stream
            .set_write_timeout(Some(io))
            .context("configuring the socket")?;
        Ok(Self {
            stream,
            session,
            tls: None,
            cipher: BytesMut::new(),
            inbox: BytesMut::with_capacity(16 * 1024),
            stop,
            interruptible: true,
            accept_while_closing: None,
        })
    }

    fn initiator(stream: TcpStream, stop: Arc<AtomicBool>, io: Duration) -> Result<Self> {
        Self::new(
            stream,
            Session::new(Role::Initiator, SessionConfig::default()),
            stop,
            io,
        )
    }

    /// Writes everything the session has to send (encrypted, under TLS), and what TLS itself
    /// has to send.
    fn flush(&mut self) -> Result<()> {
        let mut out = BytesMut::new();
        while self.session.poll_transmit(&mut out) > 0 {}
        if let Some(tls) = self.tls.as_mut() {
            if !out.is_empty() {
                tls.send(&out).map_err(|e| anyhow!("TLS failed: {}", e.0))?;
                out.clear();
            }
            tls.transmit(&mut out);
        }
        if !out.is_empty() {
            self.stream
                .write_all(&out)
                .context("writing to the relay")?;
        }
        Ok(())
    }

    /// Flushes, then returns the next session event, reading as needed until `deadline`.
    fn wait(&mut self, deadline: Option<Instant>) -> Result<Wait> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            self.flush()?;
            if let Some(event) = self.session.poll_event() {
                return Ok(Wait::Event(event));
            }
            if self.interruptible && self.stop.load(Ordering::Relaxed) {
                return Ok(Wait::Interrupted);
            }
            let slice = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(Wait::Timeout);
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            self.stream
                .set_read_timeout(Some(slice))
                .context("configuring the socket")?;
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("connection closed by the relay"),
                Ok(n) => self.input(&buf[..n])?,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("reading from the relay"),
            }
        }
    }

    /// Takes octets read from the socket: through TLS when it runs, then to the session.
    fn input(&mut self, octets: &[u8]) -> Result<()> {
        match self.tls.as_mut() {
            None => self.inbox.extend_from_slice(octets),
            Some(tls) => {
                self.cipher.extend_from_slice(octets);
                if let Err(e) = tls.receive(&mut self.cipher, &mut self.inbox) {
                    // Tell the relay why (a TLS alert), as far as the socket lets us.
                    let mut alert = BytesMut::new();
                    tls.transmit(&mut alert);
                    let _ = self.stream.write_all(&alert);
                    bail!("TLS failed: {}", e.0);
                }
            }
        }
        self.feed()
    }

    /// Hands the plaintext received to the session.
    fn feed(&mut self) -> Result<()> {
        self.session
            .handle_input(&mut self.inbox, Instant::now())
            .map_err(|e| anyhow!("BEEP protocol error from the relay: {e}"))
    }

    /// Reads on after a tuning step (the session stops at each, RFC 3080 §3-4).
    fn resume(&mut self) -> Result<()> {
        if self.session.input_paused() {
            self.session.resume_input();
            self.feed()?;
        }
        Ok(())
    }

    /// `proceed` came: TLS begins on the stream, as its client, under a fresh session
    /// (RFC 3080 §3.1.3). What the relay sent after `proceed` is its TLS already.
    fn begin_tls(&mut self, opts: &TlsOpts) -> Result<()> {
        let tls = TlsLayer::client(opts.config.clone(), &opts.name)
            .map_err(|e| anyhow!("cannot begin TLS: {}", e.0))?;
        self.cipher = std::mem::take(&mut self.inbox);
        self.tls = Some(tls);
        self.session = Session::new(Role::Initiator, SessionConfig::default());
        self.input(&[])
    }

    fn rpy_ok(&mut self, channel: u32, msgno: u32) -> Result<()> {
        self.session
            .send_rpy(channel, msgno, ok_payload())
            .map_err(|e| anyhow!("cannot reply: {e}"))
    }

    fn err(&mut self, channel: u32, msgno: u32, code: u16, text: &str) -> Result<()> {
        self.session
            .send_err(channel, msgno, error_payload(code, text))
            .map_err(|e| anyhow!("cannot reply: {e}"))
    }

    /// Closes `channel` (when given and still open), then releases the session (RFC 3080
    /// §2.3.1.3, §2.4). MSGs arriving meanwhile are refused with 421.
    fn close(&mut self, channel: Option<u32>, deadline: Instant) -> Result<()> {
        self.interruptible = false;
        let mut channel = channel.filter(|c| self.session.channel_profile(*c).is_some());
        match channel {
            Some(c) => self.session.close_channel(c, 200),
            None => self.session.close_session(200),
        }
        .map_err(|e| anyhow!("cannot close: {e}"))?;
        let mut refusals = 0;
        loop {
            let event = match self.wait(Some(deadline))? {
                Wait::Event(event) => event,
                Wait::Timeout => bail!("timed out closing the BEEP session"),
                Wait::Interrupted => continue,
            };
            match event {
                Event::Message {
                    channel: c,
                    msgno,
                    payload,
                } => {
                    let accept = self.accept_while_closing.as_ref().is_some_and(|me| {
                        matches!(
                            parse_incoming(&payload),
                            Ok(Incoming::Data(data) | Incoming::Status { data, .. })
                                if addressed_to(&data, me)
                        )
                    });
                    if accept {
                        self.rpy_ok(c, msgno)?;
                    } else {
                        self.err(c, msgno, 421, "endpoint is detaching")?;
                    }
                }
                Event::ChannelClosed { channel: c, .. } if Some(c) == channel => {
                    channel = None;
                    self.session
                        .close_session(200)
                        .map_err(|e| anyhow!("cannot release the session: {e}"))?;
                }
                Event::CloseRefused { channel: 0, error } => bail!(
                    "the relay refused to release the session: {}",
                    code_text(error.code, &error.text)
                ),
                Event::CloseRefused {
                    channel: refused,
                    error,
                } if Some(refused) == channel => {
                    refusals += 1;
                    if refusals > 5 {
                        bail!(
                            "the relay refused to close the channel: {}",
                            code_text(error.code, &error.text)
                        );
                    }
                    self.session
                        .close_channel(refused, 200)
                        .map_err(|e| anyhow!("cannot close: {e}"))?;
                }
                Event::SessionReleased => break,
                _ => {}
            }
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.close();
        }
        self.flush()?;
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }
}

/// `CODE` or `CODE TEXT`.
fn code_text(code: u16, text: &str) -> String {
    if text.is_empty() {
        code.to_string()
    } else {
        format!("{code} {text}")
    }
}

/// Outcome of the attach handshake.
#[derive(Debug)]
enum Attach {
    /// Attached; the APEX channel.
    Attached(u32),
    /// The relay answered the attach with an error (already printed).
    Refused,
}

/// Waits for the relay's greeting.
fn greet(peer: &mut Peer, io: Duration) -> Result<Greeting> {
    let deadline = Instant::now() + io;
    loop {
        match peer.wait(Some(deadline))? {
            Wait::Event(Event::Greeting(greeting)) => return Ok(greeting),
            Wait::Event(_) => {}
            Wait::Timeout => bail!("timed out waiting for the relay's BEEP greeting"),
            Wait::Interrupted => bail!("interrupted"),
        }
    }
}

/// The profiles of a greeting, for messages.
fn offered(greeting: &Greeting) -> String {
    if greeting.profiles.is_empty() {
        "nothing".to_owned()
    } else {
        greeting.profiles.join(" ")
    }
}

/// Starts TLS (RFC 3080 §3.1): a channel with the TLS profile and `<ready />` piggybacked,
/// `<proceed />` in the reply, the handshake verifying the relay's certificate, then the
/// greetings again, over TLS. Returns the new greeting.
fn start_tls(
    peer: &mut Peer,
    greeting: &Greeting,
    opts: &TlsOpts,
    io: Duration,
) -> Result<Greeting> {
    if !greeting.profiles.iter().any(|p| p == tuning::TLS_PROFILE) {
        bail!(
            "the relay does not offer TLS (it offers: {})",
            offered(greeting)
        );
    }
    let offer = ProfileOffer {
        uri: tuning::TLS_PROFILE.to_owned(),
        content: Some(Bytes::from_static(tuning::READY.as_bytes())),
    };
    let channel = peer
        .session
        .start_channel(vec![offer], None)
        .map_err(|e| anyhow!("cannot start a channel: {e}"))?;
    let deadline = Instant::now() + io;
    let mut ready_msgno = None;
    // The answer to `ready`: proceed, or why not.
    let answer = loop {
        match peer.wait(Some(deadline))? {
            Wait::Event(Event::ChannelStarted {
                channel: c,
                content,
                ..
            }) if c == channel => match content {
                Some(content) => break content,
                None => {
                    // The relay ignored the piggyback: `ready` as a MSG (RFC 3080 §3.1.1).
                    peer.resume()?;
                    let ready = tuning::entity(tuning::READY);
                    let msgno = peer
                        .session
                        .send_msg(channel, ready)
                        .map_err(|e| anyhow!("cannot send ready: {e}"))?;
                    ready_msgno = Some(msgno);
                }
            },
            Wait::Event(Event::StartRefused { channel: c, error }) if c == channel => bail!(
                "the relay refused to start TLS: {}",
                code_text(error.code, &error.text)
            ),
            Wait::Event(Event::Reply {
                channel: c,
                msgno,
                payload,
                ..
            }) if c == channel && Some(msgno) == ready_msgno => break payload,
            Wait::Event(_) => {}
            Wait::Timeout => bail!("timed out waiting for the relay to answer TLS ready"),
            Wait::Interrupted => bail!("interrupted"),
        }
    };
    match tuning::parse(&answer, XML_DEPTH, XML_ATTRIBUTES) {
        Ok(TuningElement::Proceed) => {}
        Ok(TuningElement::Error(error)) => bail!(
            "the relay refused to start TLS: {}",
            code_text(error.code, &error.text)
        ),
        _ => bail!(
            "unexpected answer to TLS ready: {}",
            String::from_utf8_lossy(&answer)
        ),
    }
    peer.begin_tls(opts)?;
    greet(peer, io).with_context(|| {
        format!(
            "TLS with the relay, its certificate checked for '{}'",
            opts.name
        )
    })
}

/// The first message of `credentials`' mechanism, and the SCRAM exchange it began.
fn sasl_initial(credentials: &Credentials) -> Result<(Vec<u8>, Option<ScramClient>)> {
    match credentials.mechanism {
        Mechanism::ScramSha256 => {
            let nonce = fresh_nonce().ok_or_else(|| anyhow!("no randomness for a SCRAM nonce"))?;
            let client = ScramClient::new(&credentials.user, &credentials.password, &nonce);
            Ok((client.first(), Some(client)))
        }
        Mechanism::Plain => {
            // RFC 4616: authzid (empty: the user) NUL authcid NUL password.
            let mut message = vec![0];
            message.extend_from_slice(credentials.user.as_bytes());
            message.push(0);
            message.extend_from_slice(credentials.password.as_bytes());
            Ok((message, None))
        }
    }
}

/// Authenticates with SASL (RFC 3080 §4.1): the initial response piggybacked in the `start`,
/// for SCRAM-SHA-256 the challenge in its reply and the final response as a MSG, then
/// `<blob status='complete'>`, whose server signature SCRAM checks. A refusal prints
/// `error CODE TEXT` on `out`, releases the session and returns false.
fn authenticate(
    peer: &mut Peer,
    greeting: &Greeting,
    credentials: &Credentials,
    io: Duration,
    out: &mut impl Write,
) -> Result<bool> {
    let mechanism = credentials.mechanism.name();
    let uri = tuning::sasl_profile(mechanism);
    if !greeting.profiles.contains(&uri) {
        bail!(
            "the relay does not offer SASL {mechanism} (it offers: {})",
            offered(greeting)
        );
    }
    let (initial, mut scram) = sasl_initial(credentials)?;
    let offer = ProfileOffer {
        uri,
        content: Some(Bytes::from(tuning::blob(BlobStatus::Continue, &initial))),
    };
    let channel = peer
        .session
        .start_channel(vec![offer], None)
        .map_err(|e| anyhow!("cannot start a channel: {e}"))?;
    let mut deadline = Instant::now() + io;
    let mut step_msgno = None;
    let mut challenged = false;
    let send_step = |peer: &mut Peer, octets: &[u8]| -> Result<u32> {
        let msg = tuning::entity(&tuning::blob(BlobStatus::Continue, octets));
        peer.session
            .send_msg(channel, msg)
            .map_err(|e| anyhow!("cannot send a SASL step: {e}"))
    };
    let refusal = loop {
        let (answer, positive) = match peer.wait(Some(deadline))? {
            Wait::Event(Event::ChannelStarted {
                channel: c,
                content,
                ..
            }) if c == channel => {
                peer.resume()?;
                match content {
                    Some(content) => (content, true),
                    None => {
                        // The relay ignored the piggyback: the initial response as a MSG.
                        step_msgno = Some(send_step(peer, &initial)?);
                        deadline = Instant::now() + io;
                        continue;
                    }
                }
            }
            Wait::Event(Event::StartRefused { channel: c, error }) if c == channel => {
                break error;
            }
            Wait::Event(Event::Reply {
                channel: c,
                msgno,
                kind,
                payload,
            }) if c == channel && Some(msgno) == step_msgno => {
                peer.resume()?;
                (payload, kind == ReplyKind::Rpy)
            }
            Wait::Event(_) => continue,
            Wait::Timeout => bail!("timed out waiting for the relay to answer SASL {mechanism}"),
            Wait::Interrupted => bail!("interrupted"),
        };
        let element = tuning::parse(&answer, XML_DEPTH, XML_ATTRIBUTES).map_err(|e| {
            anyhow!(
                "unparsable SASL answer ({}): {}",
                e.text,
                String::from_utf8_lossy(&answer)
            )
        })?;
        match element {
            TuningElement::Error(error) => break error,
            TuningElement::Blob {
                status: BlobStatus::Complete,
                data,
            } if positive => {
                if let Some(client) = &scram {
                    // Mutual authentication: the server signature proves the relay holds the
                    // verifier of this password (RFC 5802 §3).
                    client.verify_server_final(&data).map_err(|e| {
                        anyhow!(
                            "the relay did not prove that it knows {}'s credentials ({}): not attaching",
                            credentials.user,
                            e.0
                        )
                    })?;
                }
                return Ok(true);
            }
            TuningElement::Blob {
                status: BlobStatus::Continue,
                data,
            } if positive && !challenged => {
                let Some(client) = scram.as_mut() else {
                    bail!("the relay sent a challenge to SASL {mechanism}, which has none");
                };
                challenged = true;
                let last = client
                    .handle_server_first(&data)
                    .map_err(|e| anyhow!("the relay's SCRAM challenge: {}", e.0))?;
                step_msgno = Some(send_step(peer, &last)?);
                deadline = Instant::now() + io;
            }
            _ => bail!(
                "unexpected SASL answer: {}",
                String::from_utf8_lossy(&answer)
            ),
        }
    };
    sasl_refused(peer, credentials, &refusal, io, out)?;
    Ok(false)
}

/// Prints a refused authentication as `error CODE TEXT` and releases the session.
fn sasl_refused(
    peer: &mut Peer,
    credentials: &Credentials,
    error: &ErrorElement,
    io: Duration,
    out: &mut impl Write,
) -> Result<()> {
    let text = if error.text.is_empty() {
        "authentication failed"
    } else {
        &error.text
    };
    writeln!(out, "error {}", code_text(error.code, text))?;
    out.flush()?;
    eprintln!(
        "apex: the relay refused to authenticate {}",
        credentials.user
    );
    let _ = peer.close(None, Instant::now() + io);
    Ok(())
}

/// Greets, tunes the session as `security` asks (TLS, then SASL), starts the APEX channel with
/// a piggybacked attach as `name` and checks the answer. A refusal (of the authentication or
/// the attach) prints `error CODE TEXT` on `out`, detaches and returns [`Attach::Refused`].
fn handshake(
    peer: &mut Peer,
    name: &Endpoint,
    security: &Security,
    io: Duration,
    out: &mut impl Write,
) -> Result<Attach> {
    let mut greeting = greet(peer, io)?;
    if let Some(tls) = &security.tls {
        greeting = start_tls(peer, &greeting, tls, io)?;
    }
    if let Some(credentials) = &security.auth {
        if !authenticate(peer, &greeting, credentials, io, out)? {
            return Ok(Attach::Refused);
        }
    }
    if !greeting.profiles.iter().any(|p| p == APEX) {
        bail!(
            "the relay does not offer the APEX profile (it offers: {})",
            offered(&greeting)
        );
    }
    let deadline = Instant::now() + io;
    let offer = attach_offer(name.as_str(), ATTACH_TRANS_ID);
    let channel = peer
        .session
        .start_channel(vec![offer], None)
        .map_err(|e| anyhow!("cannot start a channel: {e}"))?;
    let mut attach_msgno = None;
    let answer = loop {
        match peer.wait(Some(deadline))? {
            Wait::Event(Event::ChannelStarted {
                channel: c,
                content,
                ..
            }) if c == channel => match content {
                Some(content) => {
                    break parse_piggybacked_answer(&content).map_err(|e| {
                        anyhow!(
                            "unparsable answer to the piggybacked attach ({}): {}",
                            e.text,
                            String::from_utf8_lossy(&content)
                        )
                    })?
                }
                None => {
                    // The relay ignored the piggyback: attach with an ordinary MSG (RFC 3340 §4.2).
                    let msgno = peer
                        .session
                        .send_msg(channel, attach_message(name.as_str(), ATTACH_TRANS_ID))
                        .map_err(|e| anyhow!("cannot send attach: {e}"))?;
                    attach_msgno = Some(msgno);
                }
            },
            Wait::Event(Event::StartRefused { channel: c, error }) if c == channel => bail!(
                "the relay refused to start the APEX profile: {}",
                code_text(error.code, &error.text)
            ),
            Wait::Event(Event::Reply {
                channel: c,
                msgno,
                payload,
                ..
            }) if c == channel && Some(msgno) == attach_msgno => {
                break parse_answer(&payload).map_err(|e| {
                    anyhow!(
                        "unparsable answer to attach ({}): {}",
                        e.text,
                        String::from_utf8_lossy(&payload)
                    )
                })?
            }
            Wait::Event(Event::Message {
                channel: c, msgno, ..
            }) => {
                peer.err(c, msgno, 421, "not attached yet")?;
            }
            Wait::Event(Event::ChannelClosed { channel: c, .. }) if c == channel => {
                bail!("the relay closed the APEX channel")
            }
            Wait::Event(_) => {}
            Wait::Timeout => bail!("timed out waiting for the relay to answer the attach"),
            Wait::Interrupted => bail!("interrupted"),
        }
    };
    match answer {
        Answer::Ok => Ok(Attach::Attached(channel)),
        Answer::Error { code, text } => {
            writeln!(out, "error {}", code_text(code, &text))?;
            out.flush()?;
            eprintln!("apex: the relay refused to attach {name}");
            let _ = peer.close(Some(channel), Instant::now() + io);
            Ok(Attach::Refused)
        }
    }
}

/// Opens a session over `stream` and attaches as `name` ([`handshake`]), the start of every
/// command: the session and its APEX channel, or `None` when the relay refused (printed).
fn attach_session(
    stream: TcpStream,
    name: &Endpoint,
    security: &Security,
    stop: Arc<AtomicBool>,
    io: Duration,
    out: &mut impl Write,
) -> Result<Option<(Peer, u32)>> {
    let mut peer = Peer::initiator(stream, stop, io)?;
    Ok(match handshake(&mut peer, name, security, io, out)? {
        Attach::Attached(channel) => Some((peer, channel)),
        Attach::Refused => None,
    })
}

/// A MSG from the relay, once the cases every command answers alike are answered.
// `Data` is what nearly every MSG is; boxing it would allocate per delivery.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// A `data` delivery (with the statusResponse it carries, from a report service), not
    /// answered yet: what to answer depends on the command.
    Data(Data, Option<StatusResponse>),
    /// A `terminate` that ended our attachment, answered `ok`.
    Terminated { code: u16, text: String },
    /// Already answered: unparsable (its error), an operation no endpoint takes (500), a
    /// terminate of another attachment (550).
    Answered,
}

/// Reads MSG `msgno` on `channel` and answers it unless it is a delivery (see [`Msg`]).
fn read_msg(peer: &mut Peer, channel: u32, msgno: u32, payload: &Bytes) -> Result<Msg> {
    match parse_incoming(payload) {
        Err(e) => peer.err(channel, msgno, e.code, &e.text)?,
        Ok(Incoming::Data(data)) => return Ok(Msg::Data(data, None)),
        Ok(Incoming::Status { data, response }) => return Ok(Msg::Data(data, Some(response))),
        Ok(Incoming::Terminate {
            trans_id,
            code,
            text,
        }) => {
            if answer_terminate(peer, channel, msgno, trans_id)? {
                return Ok(Msg::Terminated { code, text });
            }
        }
        Ok(Incoming::Other(_)) => {
            peer.err(channel, msgno, 500, "unexpected operation for an endpoint")?
        }
    }
    Ok(Msg::Answered)
}

/// Whether `me` is among `data`'s recipients; an application fails the others (RFC 3340
/// §4.4.4.2, APEX-29).
fn addressed_to(data: &Data, me: &Endpoint) -> bool {
    data.recipients
        .iter()
        .any(|r| Endpoint::parse(&r.identity).is_ok_and(|e| e == *me))
}

/// Refuses delivery `msgno` with 550 unless `me` is among its recipients (RFC 3340 §4.4.4.2,
/// APEX-29: an application fails the recipients it is not attached as); true when refused.
fn refuse_unless_for(
    peer: &mut Peer,
    channel: u32,
    msgno: u32,
    data: &Data,
    me: &Endpoint,
) -> Result<bool> {
    if addressed_to(data, me) {
        return Ok(false);
    }
    let to: Vec<&str> = data
        .recipients
        .iter()
        .map(|r| r.identity.as_str())
        .collect();
    let text = format!("not attached as {}", to.join(", "));
    peer.err(channel, msgno, 550, &text)?;
    Ok(true)
}

/// Options of `apex attach`.
#[derive(Debug)]
struct AttachOpts {
    name: Endpoint,
    security: Security,
    count: Option<u64>,
    idle: Option<Duration>,
    io_timeout: Duration,
}

/// What an incoming MSG turned out to be.
enum AttachMsg {
    /// A data for us, printed and acknowledged.
    Data,
    /// A `terminate` that ended our attachment (answered `ok`).
    Terminated { code: u16, text: String },
    /// Anything else (answered with an error).
    Other,
}

/// Answers a relay's `terminate` (RFC 3340 §4.4.3): true when it ends our attachment.
fn answer_terminate(peer: &mut Peer, channel: u32, msgno: u32, trans_id: u32) -> Result<bool> {
    if trans_id == 0 || trans_id == ATTACH_TRANS_ID {
        peer.rpy_ok(channel, msgno)?;
        peer.flush()?;
        Ok(true)
    } else {
        peer.err(channel, msgno, 550, "unknown transaction-identifier")?;
        Ok(false)
    }
}

/// Handles one MSG in `attach` mode: prints and acknowledges data addressed to `me`.
fn on_attach_msg(
    peer: &mut Peer,
    channel: u32,
    msgno: u32,
    payload: &Bytes,
    me: &Endpoint,
    out: &mut impl Write,
) -> Result<AttachMsg> {
    let data = match read_msg(peer, channel, msgno, payload)? {
        Msg::Data(data, _) => data,
        Msg::Terminated { code, text } => return Ok(AttachMsg::Terminated { code, text }),
        Msg::Answered => return Ok(AttachMsg::Other),
    };
    if refuse_unless_for(peer, channel, msgno, &data, me)? {
        return Ok(AttachMsg::Other);
    }
    let to: Vec<&str> = data
        .recipients
        .iter()
        .map(|r| r.identity.as_str())
        .collect();
    writeln!(
        out,
        "from={} to={} content={}",
        data.originator.identity,
        to.join(","),
        content_text(&data)
    )?;
    out.flush()?;
    peer.rpy_ok(channel, msgno)?;
    Ok(AttachMsg::Data)
}

/// `apex attach`: attaches, prints deliveries until `--count`, `--timeout`, a signal, or the
/// relay ends the attachment.
fn run_attach(
    stream: TcpStream,
    opts: &AttachOpts,
    stop: Arc<AtomicBool>,
    out: &mut impl Write,
) -> Result<Status> {
    let io = opts.io_timeout;
    let Some((mut peer, channel)) =
        attach_session(stream, &opts.name, &opts.security, stop, io, out)?
    else {
        return Ok(Status::Failed);
    };
    writeln!(out, "attached {}", opts.name)?;
    out.flush()?;
    let mut received = 0u64;
    let idle_deadline = || opts.idle.map(|d| Instant::now() + d);
    let mut deadline = idle_deadline();
    loop {
        let event = match peer.wait(deadline)? {
            Wait::Event(event) => event,
            Wait::Timeout | Wait::Interrupted => break,
        };
        deadline = idle_deadline();
        match event {
            Event::Message {
                channel: c,
                msgno,
                payload,
            } => match on_attach_msg(&mut peer, c, msgno, &payload, &opts.name, out)? {
                AttachMsg::Data => {
                    received += 1;
                    if Some(received) == opts.count {
                        break;
                    }
                }
                AttachMsg::Terminated { code, text } => {
                    writeln!(out, "terminated {}", code_text(code, &text))?;
                    out.flush()?;
                    // The attachment is over whatever happens now; detach politely.
                    let _ = peer.close(Some(channel), Instant::now() + io);
                    return Ok(Status::Success);
                }
                AttachMsg::Other => {}
            },
            Event::ChannelClosed { channel: c, .. } if c == channel => {
                eprintln!("apex: the relay closed the APEX channel");
                let _ = peer.close(None, Instant::now() + io);
                return Ok(Status::Success);
            }
            Event::SessionReleased => {
                eprintln!("apex: the relay released the session");
                peer.flush()?;
                return Ok(Status::Success);
            }
            _ => {}
        }
    }
    peer.close(Some(channel), Instant::now() + io)?;
    Ok(Status::Success)
}

/// Options of `apex send`.
#[derive(Debug)]
struct SendOpts {
    from: Endpoint,
    to: Vec<Endpoint>,
    /// The statusRequest transID, when `--status` was given.
    status: Option<u32>,
    /// The dataTiming option, when TIMING flags were given.
    timing: Option<Timing>,
    security: Security,
    text: String,
    status_timeout: Duration,
    io_timeout: Duration,
}

/// The values of `apex send`'s dataTiming option (RFC 3342 §2, §6); 0 leaves one out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    trans_id: u32,
    no_later_than: u32,
    report_after: u32,
    return_trip: u32,
    report_errors: bool,
}

impl Timing {
    /// The option element: an originator sets `targetHop='all'` and `mustUnderstand='true'`
    /// (RFC 3342 §2, OPT-07).
    fn option_xml(&self) -> String {
        let mut element = String::from("<dataTiming");
        for (name, value) in [
            ("noLaterThan", self.no_later_than),
            ("returnTrip", self.return_trip),
            ("reportAfter", self.report_after),
        ] {
            if value != 0 {
                element.push_str(&format!(" {name}='{value}'"));
            }
        }
        if self.report_errors {
            element.push_str(" reportErrors='true'");
        }
        format!(
            "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='{}'>{element} /></option>",
            self.trans_id
        )
    }
}

/// The `data` message of `apex send` (RFC 3340 §4.4.4).
fn data_document(
    from: &Endpoint,
    to: &[Endpoint],
    status: Option<u32>,
    timing: Option<&Timing>,
    text: &str,
) -> Bytes {
    let mut data = DataBuilder::new(from.as_str()).to_all(to.iter().map(Endpoint::as_str));
    if let Some(id) = status {
        data = data.status_request(id);
    }
    if let Some(timing) = timing {
        data = data.option(timing.option_xml());
    }
    data.text(text)
}

/// `apex send`: attaches as the originator, sends one data, reports the answer and, with
/// `--status`, the statusResponse.
fn run_send(
    stream: TcpStream,
    opts: &SendOpts,
    stop: Arc<AtomicBool>,
    out: &mut impl Write,
) -> Result<Status> {
    let io = opts.io_timeout;
    let Some((mut peer, channel)) =
        attach_session(stream, &opts.from, &opts.security, stop, io, out)?
    else {
        return Ok(Status::Failed);
    };
    let payload = data_document(
        &opts.from,
        &opts.to,
        opts.status,
        opts.timing.as_ref(),
        &opts.text,
    );
    let data_msgno = peer
        .session
        .send_msg(channel, payload)
        .map_err(|e| anyhow!("cannot send data: {e}"))?;
    let mut accepted = false;
    let mut missing: Vec<&Endpoint> = Vec::new();
    for to in &opts.to {
        if !missing.contains(&to) {
            missing.push(to);
        }
    }
    // With returnTrip, each recipient's final timing report (250 or 550) is waited for.
    let mut timing_missing: Vec<&Endpoint> = match opts.timing {
        Some(timing) if timing.return_trip != 0 => missing.clone(),
        _ => Vec::new(),
    };
    // Status lines that arrive before the relay's `ok` are printed after `accepted`.
    let mut held: Vec<String> = Vec::new();
    let mut deadline = Instant::now() + io;
    loop {
        if accepted && (opts.status.is_none() || missing.is_empty()) && timing_missing.is_empty() {
            break;
        }
        let event = match peer.wait(Some(deadline))? {
            Wait::Event(event) => event,
            Wait::Timeout if !accepted => {
                bail!("timed out waiting for the relay to answer the data")
            }
            Wait::Timeout => {
                let names: Vec<&str> = missing
                    .iter()
                    .chain(&timing_missing)
                    .map(|e| e.as_str())
                    .collect();
                bail!("timed out waiting for the status of {}", names.join(", "))
            }
            Wait::Interrupted => bail!("interrupted"),
        };
        match event {
            Event::Reply {
                channel: c,
                msgno,
                kind,
                payload,
            } if c == channel && msgno == data_msgno => match parse_answer(&payload) {
                Ok(Answer::Ok) if kind == ReplyKind::Rpy => {
                    writeln!(out, "accepted")?;
                    for line in held.drain(..) {
                        writeln!(out, "{line}")?;
                    }
                    out.flush()?;
                    accepted = true;
                    deadline = Instant::now() + opts.status_timeout;
                }
                Ok(Answer::Error { code, text }) => {
                    writeln!(out, "error {}", code_text(code, &text))?;
                    out.flush()?;
                    let _ = peer.close(Some(channel), Instant::now() + io);
                    return Ok(Status::Failed);
                }
                _ => bail!(
                    "unexpected reply to data: {}",
                    String::from_utf8_lossy(&payload)
                ),
            },
            Event::Message {
                channel: c,
                msgno,
                payload,
            } => match read_msg(&mut peer, c, msgno, &payload)? {
                Msg::Data(_, Some(response)) => {
                    // The carrying data is answered ok whatever it reports (RFC 3340 §6.2).
                    peer.rpy_ok(c, msgno)?;
                    let is_status = Some(response.trans_id) == opts.status;
                    let is_timing = opts.timing.map(|t| t.trans_id) == Some(response.trans_id);
                    if !is_status && !is_timing {
                        continue;
                    }
                    for d in response.destinations {
                        let kind = if is_status { "status" } else { "timing" };
                        let line = format!("{kind} {} {}", d.identity, code_text(d.code, &d.text));
                        if let Ok(dest) = Endpoint::parse(&d.identity) {
                            if is_status {
                                missing.retain(|m| **m != dest);
                            } else if d.code != 350 {
                                // 350 is transient (RFC 3342 §2.2.1); 250 and 550 are final.
                                timing_missing.retain(|m| **m != dest);
                            }
                        }
                        if accepted {
                            writeln!(out, "{line}")?;
                        } else {
                            held.push(line);
                        }
                    }
                    out.flush()?;
                }
                Msg::Data(_, None) => {
                    peer.err(c, msgno, 550, "this endpoint only sends (apex send)")?
                }
                Msg::Terminated { code, text } => bail!(
                    "the relay terminated the attachment: {}",
                    code_text(code, &text)
                ),
                Msg::Answered => {}
            },
            Event::ChannelClosed { channel: c, .. } if c == channel => {
                bail!("the relay closed the APEX channel")
            }
            Event::SessionReleased => bail!("the relay released the session"),
            _ => {}
        }
    }
    peer.close(Some(channel), Instant::now() + io)?;
    Ok(Status::Success)
}

/// What `apex access` asks the service, as the command line gave it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AccessOp {
    /// `query`: whether `actor` (an address) may do every one of `actions` to `owner`.
    Query {
        owner: String,
        actor: String,
        actions: Vec<Action>,
    },
    /// `get`: the entry of `owner` whose actor is `actor` (written escaped, ACC-07).
    Get { owner: String, actor: String },
    /// `set` (`actions`) or `delete` (`None`) of the entry of `owner` for `actor` (escaped).
    /// Without `last_update` the entry is read first (RFC 3341 §2.3, ACC-16).
    Set {
        owner: String,
        actor: String,
        actions: Option<Vec<Action>>,
        last_update: Option<String>,
    },
}

/// Options of `apex access`.
#[derive(Debug)]
struct AccessOpts {
    /// The endpoint attached as, the originator of every request.
    name: Endpoint,
    /// `apex=access@DOMAIN`, DOMAIN being the owner's.
    service: Endpoint,
    op: AccessOp,
    security: Security,
    /// How long each answer of the service may take.
    answer_timeout: Duration,
    io_timeout: Duration,
    /// The first request's transID; each further request takes the next.
    first_trans_id: u32,
}

/// Checks an `access` command line: the service to ask (that of OWNER's domain) and what.
fn access_op(command: &AccessCommand) -> Result<(Endpoint, AccessOp)> {
    let owner_of = |owner: &str| -> Result<Endpoint> {
        Endpoint::parse(owner).map_err(|e| anyhow!("invalid owner '{owner}': {e}"))
    };
    let (owner, op) = match command {
        AccessCommand::Query {
            owner,
            actor,
            actions,
        } => {
            let owner = owner_of(owner)?;
            // The actor of a query is an address, written as it is (ACC-07).
            let actor = Endpoint::parse(actor).map_err(|e| {
                anyhow!("invalid actor '{actor}': {e} (a query names an address, not a pattern)")
            })?;
            let op = AccessOp::Query {
                owner: owner.as_str().to_owned(),
                actor: actor.as_str().to_owned(),
                actions: action_list(actions)?,
            };
            (owner, op)
        }
        AccessCommand::Get {
            owner,
            actor,
            literal,
        } => {
            let owner = owner_of(owner)?;
            let op = AccessOp::Get {
                owner: owner.as_str().to_owned(),
                actor: actor_value(actor, *literal)?,
            };
            (owner, op)
        }
        AccessCommand::Set {
            owner,
            actor,
            actions,
            last_update,
            literal,
        } => {
            let owner = owner_of(owner)?;
            let op = AccessOp::Set {
                owner: owner.as_str().to_owned(),
                actor: actor_value(actor, *literal)?,
                actions: Some(action_list(actions)?),
                last_update: last_update.as_deref().map(timestamp).transpose()?,
            };
            (owner, op)
        }
        AccessCommand::Delete {
            owner,
            actor,
            last_update,
            literal,
        } => {
            let owner = owner_of(owner)?;
            let op = AccessOp::Set {
                owner: owner.as_str().to_owned(),
                actor: actor_value(actor, *literal)?,
                actions: None,
                last_update: last_update.as_deref().map(timestamp).transpose()?,
            };
            (owner, op)
        }
    };
    let service = service_endpoint(owner.domain());
    let service = Endpoint::parse(&service)
        .map_err(|e| anyhow!("no access service address for '{owner}' ({service}): {e}"))?;
    Ok((service, op))
}

/// The ACTION arguments as one list; an argument may hold several tokens.
fn action_list(actions: &[String]) -> Result<Vec<Action>> {
    parse_actions(&actions.join(" "))
        .map_err(|e| anyhow!("{e} (an action is service:operation, e.g. core:data)"))
}

/// The `actor` of get and set as written on the wire: the pattern as typed, or with
/// `--literal` the endpoint name with its `*` and `\` escaped (RFC 3341 §3, ACC-07). Checked
/// here so that a typing mistake is not sent.
fn actor_value(actor: &str, literal: bool) -> Result<String> {
    let written = if literal {
        escape(actor).into_owned()
    } else {
        actor.to_owned()
    };
    ActorPattern::parse(&written).map_err(|e| {
        let hint = if literal {
            ""
        } else {
            " (--literal: an endpoint name whose * and \\ are not wildcards)"
        };
        anyhow!("invalid actor '{actor}': {e}{hint}")
    })?;
    Ok(written)
}

/// `--last-update`: an RFC 3339 timestamp, sent as typed (the service compares instants).
fn timestamp(text: &str) -> Result<String> {
    Timestamp::parse(text).map_err(|e| anyhow!("--last-update: {e}"))?;
    Ok(text.to_owned())
}

/// The transID after `id`, within 1..=2^31-1 (RFC 3340 §6.1.1).
fn next_trans_id(id: u32) -> u32 {
    if id >= MAX_31BIT {
        1
    } else {
        id + 1
    }
}

/// How `apex access` ends when the relay or the service says no, or nothing in time: the line
/// it prints (`error CODE TEXT`, `error timeout waiting for apex=access`), with exit status 1.
/// Carried as an error so that every request can end the command with `?`.
#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// The refusal `error CODE TEXT`.
fn refused(code: u16, text: &str) -> anyhow::Error {
    Refusal(format!("error {}", code_text(code, text))).into()
}

/// An attachment talking to the access service.
struct AccessClient<'a> {
    peer: Peer,
    channel: u32,
    opts: &'a AccessOpts,
    next_trans_id: u32,
}

impl AccessClient<'_> {
    /// A transID for the next request, distinct from the previous ones.
    fn trans_id(&mut self) -> u32 {
        let id = self.next_trans_id;
        self.next_trans_id = next_trans_id(id);
        id
    }

    /// Sends `request` as a data to the service, and waits for the relay to accept it and for
    /// the service's answer with its transID: an `allow`, `deny` or `reply` to a query, a `set`
    /// or `reply` to a get, a `reply` to a set (the owner's notice is a `set` with the same
    /// transID, and it is not the answer). Every delivery to NAME is acknowledged, whatever it
    /// is; one to another endpoint is refused with 550, as `attach` does (APEX-29). The relay's
    /// refusal of the data, or no answer within the timeout, is a [`Refusal`].
    fn ask(&mut self, request: &AccessRequest) -> Result<AccessAnswer> {
        let opts = self.opts;
        let payload = element_data(
            opts.name.as_str(),
            opts.service.as_str(),
            &format_request(request),
        );
        let msgno = self
            .peer
            .session
            .send_msg(self.channel, payload)
            .map_err(|e| anyhow!("cannot send data: {e}"))?;
        let sent = Instant::now();
        let relay_deadline = sent + opts.io_timeout;
        let answer_deadline = sent + opts.answer_timeout;
        let mut accepted = false;
        let mut answer = None;
        loop {
            if accepted {
                if let Some(answer) = answer.take() {
                    return Ok(answer);
                }
            }
            let deadline = if accepted {
                answer_deadline
            } else {
                relay_deadline.min(answer_deadline)
            };
            let event = match self.peer.wait(Some(deadline))? {
                Wait::Event(event) => event,
                Wait::Timeout if accepted || Instant::now() >= answer_deadline => {
                    return Err(
                        Refusal(format!("error timeout waiting for {ACCESS_SERVICE}")).into(),
                    )
                }
                Wait::Timeout => bail!("timed out waiting for the relay to answer the data"),
                Wait::Interrupted => bail!("interrupted"),
            };
            match event {
                Event::Reply {
                    channel: c,
                    msgno: m,
                    kind,
                    payload,
                } if c == self.channel && m == msgno => match parse_answer(&payload) {
                    Ok(Answer::Ok) if kind == ReplyKind::Rpy => accepted = true,
                    Ok(Answer::Error { code, text }) => return Err(refused(code, &text)),
                    _ => bail!(
                        "unexpected reply to data: {}",
                        String::from_utf8_lossy(&payload)
                    ),
                },
                Event::Message {
                    channel: c,
                    msgno: m,
                    payload,
                } => match read_msg(&mut self.peer, c, m, &payload)? {
                    Msg::Data(data, _) => {
                        if !refuse_unless_for(&mut self.peer, c, m, &data, &opts.name)? {
                            self.peer.rpy_ok(c, m)?;
                            if let Some(found) = self.answer_in(&data, request) {
                                answer = Some(found);
                            }
                        }
                    }
                    Msg::Terminated { code, text } => bail!(
                        "the relay terminated the attachment: {}",
                        code_text(code, &text)
                    ),
                    Msg::Answered => {}
                },
                Event::ChannelClosed { channel: c, .. } if c == self.channel => {
                    bail!("the relay closed the APEX channel")
                }
                Event::SessionReleased => bail!("the relay released the session"),
                _ => {}
            }
        }
    }

    /// The answer to `request` that `data` carries, if it is one: from the service, with the
    /// request's transID, of a kind that answers it.
    fn answer_in(&self, data: &Data, request: &AccessRequest) -> Option<AccessAnswer> {
        let from = Endpoint::parse(&data.originator.identity).ok()?;
        if from != self.opts.service {
            return None;
        }
        let element = carried_element(data)?;
        let answer = match parse_access_answer(&element) {
            Ok(answer) => answer,
            Err(e) => {
                eprintln!(
                    "apex: ignoring an unreadable element from {}: {e}",
                    self.opts.service
                );
                return None;
            }
        };
        if answer.trans_id() != request.trans_id() {
            return None;
        }
        let answers = match request {
            AccessRequest::Query { .. } => matches!(
                answer,
                AccessAnswer::Allow { .. } | AccessAnswer::Deny { .. } | AccessAnswer::Reply { .. }
            ),
            AccessRequest::Get { .. } => {
                matches!(
                    answer,
                    AccessAnswer::Set { .. } | AccessAnswer::Reply { .. }
                )
            }
            AccessRequest::Set { .. } => matches!(answer, AccessAnswer::Reply { .. }),
        };
        answers.then_some(answer)
    }
}

/// `apex access`: attaches as `--as`, asks the access service and prints its answer. A set or
/// delete without `--last-update` reads the entry first (ACC-16).
fn run_access(
    stream: TcpStream,
    opts: &AccessOpts,
    stop: Arc<AtomicBool>,
    out: &mut impl Write,
) -> Result<Status> {
    let io = opts.io_timeout;
    let Some((mut peer, channel)) =
        attach_session(stream, &opts.name, &opts.security, stop, io, out)?
    else {
        return Ok(Status::Failed);
    };
    peer.accept_while_closing = Some(opts.name.clone());
    let mut client = AccessClient {
        peer,
        channel,
        opts,
        next_trans_id: opts.first_trans_id,
    };
    let (status, line) = match access_exchange(&mut client) {
        Ok(line) => (Status::Success, line),
        Err(e) => match e.downcast::<Refusal>() {
            Ok(Refusal(line)) => (Status::Failed, line),
            Err(e) => return Err(e),
        },
    };
    writeln!(out, "{line}")?;
    out.flush()?;
    client.peer.close(Some(channel), Instant::now() + io)?;
    Ok(status)
}

/// The requests of `apex access`, and the line that reports their success.
fn access_exchange(client: &mut AccessClient<'_>) -> Result<String> {
    let unexpected = |answer: &AccessAnswer| {
        anyhow!(
            "unexpected answer from the access service: {}",
            format_answer(answer)
        )
    };
    match client.opts.op.clone() {
        AccessOp::Query {
            owner,
            actor,
            actions,
        } => {
            let query = AccessRequest::Query {
                owner,
                actor,
                actions,
                trans_id: client.trans_id(),
            };
            match client.ask(&query)? {
                AccessAnswer::Allow { .. } => Ok("allow".to_owned()),
                AccessAnswer::Deny { .. } => Ok("deny".to_owned()),
                AccessAnswer::Reply { code, text, .. } => Err(refused(code, &text)),
                other => Err(unexpected(&other)),
            }
        }
        AccessOp::Get { owner, actor } => {
            let get = AccessRequest::Get {
                owner,
                actor,
                trans_id: client.trans_id(),
            };
            match client.ask(&get)? {
                AccessAnswer::Set { access, .. } => Ok(entry_line(&access)),
                AccessAnswer::Reply { code, text, .. } => Err(refused(code, &text)),
                other => Err(unexpected(&other)),
            }
        }
        AccessOp::Set {
            owner,
            actor,
            actions,
            last_update,
        } => {
            let deleting = actions.is_none();
            let last_update = match last_update {
                Some(last_update) => Some(last_update),
                None => {
                    // Read the entry for its lastUpdate first (RFC 3341 §2.3, ACC-16).
                    let get = AccessRequest::Get {
                        owner: owner.clone(),
                        actor: actor.clone(),
                        trans_id: client.trans_id(),
                    };
                    match client.ask(&get)? {
                        AccessAnswer::Set { access, .. } => access.last_update,
                        // No entry: a set creates one; there is nothing to delete.
                        AccessAnswer::Reply { code, .. }
                            if code == apex_code::NO_ENTRY && !deleting =>
                        {
                            None
                        }
                        AccessAnswer::Reply { code, text, .. } => return Err(refused(code, &text)),
                        other => return Err(unexpected(&other)),
                    }
                }
            };
            let set = AccessRequest::Set {
                trans_id: client.trans_id(),
                access: AccessElement {
                    owner,
                    actor,
                    actions,
                    last_update,
                },
            };
            match client.ask(&set)? {
                AccessAnswer::Reply { code, .. } if (200..300).contains(&code) => {
                    let done = if deleting { "deleted" } else { "set" };
                    Ok(format!("{code} {done}"))
                }
                AccessAnswer::Reply { code, text, .. } => Err(refused(code, &text)),
                other => Err(unexpected(&other)),
            }
        }
    }
}

/// `OWNER ACTOR ACTIONS lastUpdate=TS`: an entry as `get` prints it, the actor as the service
/// wrote it (escaped), `-` for absent actions.
fn entry_line(access: &AccessElement) -> String {
    let actions = match &access.actions {
        Some(actions) => format_actions(actions),
        None => "-".to_owned(),
    };
    format!(
        "{} {} {} lastUpdate={}",
        access.owner,
        access.actor,
        actions,
        access.last_update.as_deref().unwrap_or_default()
    )
}

/// The content of a received data as one line of text: the `data-content` body (unescaped
/// text, or its markup when it holds elements), the body of the `cid:` MIME part, or the
/// content URI itself.
fn content_text(data: &Data) -> String {
    match client::content(data) {
        Content::Inline(raw) => data_content_text(raw),
        Content::Part(body) => one_line(&String::from_utf8_lossy(&body)),
        Content::Reference(uri) => uri.to_owned(),
    }
}

fn data_content_text(raw: &Bytes) -> String {
    match xml::parse(raw, XML_DEPTH, XML_ATTRIBUTES) {
        Ok(element) if element.children.is_empty() => one_line(&element.text),
        _ => compact_markup(&inner_markup(raw)),
    }
}

/// Line breaks as `\n` (and lone CRs as `\r`), so one data is one output line.
fn one_line(text: &str) -> String {
    text.replace("\r\n", "\\n")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// The bytes between the start and end tags of an element, as text.
fn inner_markup(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut quote = None;
    let mut start_end = None;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => {
                start_end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let Some(start_end) = start_end else {
        return String::new();
    };
    if text[..start_end].ends_with('/') {
        return String::new();
    }
    match text.rfind("</") {
        Some(close) if close > start_end => text[start_end + 1..close].to_owned(),
        _ => String::new(),
    }
}

/// Pretty-printed markup on one line: lines trimmed, joined without the indentation.
fn compact_markup(markup: &str) -> String {
    let mut out = String::new();
    for line in markup.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let tight = out.is_empty() || (out.ends_with('>') && line.starts_with('<'));
        if !tight {
            out.push(' ');
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use apex_proto::apex::access_ops::parse_request;
    use apex_proto::apex::client::Destination;
    use apex_proto::apex::msg::{parse_document, parse_message, ApexLimits, Operation};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    const IO: Duration = Duration::from_secs(5);

    fn limits() -> ApexLimits {
        ApexLimits::default()
    }

    /// A data from `from` to `to` with `content_xml` inline.
    fn data_payload(from: &str, to: &str, content_xml: &str) -> Bytes {
        DataBuilder::new(from).to(to).markup(content_xml)
    }

    /// What the fake relay saw.
    #[derive(Debug, Default)]
    struct Log {
        start_content: Option<Bytes>,
        msgs: Vec<Bytes>,
        replies: Vec<(ReplyKind, Bytes)>,
        released: bool,
    }

    type Respond = Box<dyn FnMut(&Bytes) -> (bool, Bytes, Vec<Bytes>) + Send>;

    /// A one-connection relay: accepts the APEX start answering `piggyback`, then sends
    /// `initial` MSGs; each client MSG is answered by `respond` (ok?, reply, MSGs to send next).
    fn fake_relay(
        piggyback: Option<&'static str>,
        mut initial: Vec<Bytes>,
        mut respond: Respond,
    ) -> (SocketAddr, JoinHandle<Log>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let config = SessionConfig {
                profiles: vec![APEX.to_owned()],
                ..SessionConfig::default()
            };
            let session = Session::new(Role::Listener, config);
            let stop = Arc::new(AtomicBool::new(false));
            let mut peer = Peer::new(stream, session, stop, IO).unwrap();
            let mut log = Log::default();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let event = match peer.wait(Some(deadline)) {
                    Ok(Wait::Event(event)) => event,
                    _ => break,
                };
                match event {
                    Event::StartRequested(request) => {
                        log.start_content = request.profiles[0].content.clone();
                        let channel = peer
                            .session
                            .accept_start(request.id, APEX, piggyback.map(Bytes::from))
                            .unwrap();
                        for msg in initial.drain(..) {
                            peer.session.send_msg(channel, msg).unwrap();
                        }
                    }
                    Event::Message {
                        channel,
                        msgno,
                        payload,
                    } => {
                        log.msgs.push(payload.clone());
                        let (ok, reply, next) = respond(&payload);
                        if ok {
                            peer.session.send_rpy(channel, msgno, reply).unwrap();
                        } else {
                            peer.session.send_err(channel, msgno, reply).unwrap();
                        }
                        for msg in next {
                            peer.session.send_msg(channel, msg).unwrap();
                        }
                    }
                    Event::Reply { kind, payload, .. } => log.replies.push((kind, payload)),
                    Event::SessionReleased => {
                        log.released = true;
                        peer.flush().unwrap();
                        break;
                    }
                    _ => {}
                }
            }
            log
        });
        (addr, handle)
    }

    fn no_msgs() -> Respond {
        Box::new(|_| (false, error_payload(500, "unexpected"), Vec::new()))
    }

    fn stop() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    fn attach_opts(name: &str, count: Option<u64>, idle: Option<Duration>) -> AttachOpts {
        AttachOpts {
            name: ep(name),
            security: Security::default(),
            count,
            idle,
            io_timeout: IO,
        }
    }

    const MULTIPART_13_4: &str = "Content-Type: multipart/related; boundary=\"XX\"; start=\"<1@fred.example.com>\"; type=\"application/beep+xml\"\r\n\r\n--XX\r\nContent-Type: application/beep+xml\r\nContent-ID: <1@fred.example.com>\r\n\r\n<data content='cid:2@fred.example.com'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n</data>\r\n--XX\r\nContent-Type: text/plain\r\nContent-ID: <2@fred.example.com>\r\n\r\nhello, barney\r\n--XX--\r\n";

    #[test]
    fn attach_prints_deliveries_and_refuses_other_operations() {
        let bind = Bytes::from_static(
            b"Content-Type: application/beep+xml\r\n\r\n<bind relay='example.com' transID='1' />\r\n",
        );
        let initial = vec![
            bind,
            data_payload("fred@example.com", "wilma@example.com", "not for barney"),
            data_payload("fred@example.com", "barney@example.com", "hello, barney"),
            Bytes::from_static(MULTIPART_13_4.as_bytes()),
        ];
        let (addr, relay) = fake_relay(Some("<ok />"), initial, no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", Some(2), None);
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n\
             from=fred@example.com to=barney@example.com content=hello, barney\n\
             from=fred@example.com to=barney@example.com content=hello, barney\n"
        );
        let log = relay.join().unwrap();
        let attach = parse_document(log.start_content.as_ref().unwrap(), &limits()).unwrap();
        assert_eq!(
            attach,
            Operation::Attach {
                endpoint: "barney@example.com".into(),
                trans_id: 1,
                options: vec![]
            }
        );
        let kinds: Vec<ReplyKind> = log.replies.iter().map(|r| r.0).collect();
        assert_eq!(
            kinds,
            [
                ReplyKind::Err,
                ReplyKind::Err,
                ReplyKind::Rpy,
                ReplyKind::Rpy
            ]
        );
        assert_eq!(
            parse_message(&log.replies[0].1, &limits()).unwrap(),
            Operation::Error {
                code: 500,
                text: "unexpected operation for an endpoint".into()
            }
        );
        assert!(matches!(
            parse_message(&log.replies[1].1, &limits()).unwrap(),
            Operation::Error { code: 550, .. }
        ));
        assert_eq!(log.replies[2].1, ok_payload());
        assert!(log.released, "channel closed and session released");
    }

    #[test]
    fn attach_exits_on_terminate() {
        let terminate = apex_proto::apex::msg::terminate_payload(1, 421, "relay going down");
        let initial = vec![
            data_payload("fred@example.com", "barney@example.com", "a &lt; b"),
            terminate,
        ];
        let (addr, relay) = fake_relay(Some("<ok />"), initial, no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, None);
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n\
             from=fred@example.com to=barney@example.com content=a < b\n\
             terminated 421 relay going down\n"
        );
        let log = relay.join().unwrap();
        assert_eq!(log.replies.len(), 2);
        assert!(log.replies.iter().all(|r| r.0 == ReplyKind::Rpy));
        assert!(log.released);
    }

    #[test]
    fn attach_idle_timeout_detaches_cleanly() {
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, Some(Duration::from_millis(300)));
        let started = Instant::now();
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n"
        );
        assert!(relay.join().unwrap().released);
    }

    #[test]
    fn attach_refused_prints_the_error() {
        let (addr, relay) = fake_relay(
            Some("<error code='554'>already attached</error>"),
            Vec::new(),
            no_msgs(),
        );
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, None);
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Failed);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error 554 already attached\n"
        );
        assert!(relay.join().unwrap().released);
    }

    #[test]
    fn attach_without_piggybacked_answer_falls_back_to_a_msg() {
        let respond: Respond = Box::new(|payload| match parse_message(payload, &limits()) {
            Ok(Operation::Attach { .. }) => (true, ok_payload(), Vec::new()),
            _ => (false, error_payload(500, "?"), Vec::new()),
        });
        let (addr, relay) = fake_relay(None, Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = attach_opts("barney@example.com", None, Some(Duration::from_millis(100)));
        let status = run_attach(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached barney@example.com\n"
        );
        let log = relay.join().unwrap();
        assert_eq!(log.msgs.len(), 1);
    }

    fn send_opts(to: &[&str], status: Option<u32>, text: &str) -> SendOpts {
        SendOpts {
            from: ep("fred@example.com"),
            to: to.iter().map(|t| ep(t)).collect(),
            status,
            timing: None,
            security: Security::default(),
            text: text.to_owned(),
            status_timeout: Duration::from_secs(5),
            io_timeout: IO,
        }
    }

    fn status_response(trans_id: u32) -> Bytes {
        // RFC 3340 §6.2, with a second destination that failed.
        let content = format!(
            "\r\n      <statusResponse transID='{trans_id}'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='{trans_id}' />\r\n         </destination>\r\n         <destination identity='wilma@example.com'>\r\n            <reply code='550' transID='{trans_id}'>unknown endpoint identity</reply>\r\n         </destination>\r\n      </statusResponse>\r\n   "
        );
        data_payload("apex=report@example.com", "fred@example.com", &content)
    }

    /// A report from the report service on barney: `code` for option `trans_id`.
    fn timing_report(trans_id: u32, code: u16) -> Bytes {
        let content = format!(
            "\r\n      <statusResponse transID='{trans_id}'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='{code}' transID='{trans_id}' />\r\n         </destination>\r\n      </statusResponse>\r\n   "
        );
        data_payload("apex=report@example.com", "fred@example.com", &content)
    }

    /// RFC 3342 §2 (OPT-07): `--no-later-than`, `--report-after`, `--return-trip` and
    /// `--report-errors` send one dataTiming option with targetHop='all' and
    /// mustUnderstand='true'; the transient report prints, and send waits for the final hop
    /// report.
    #[test]
    fn opt_07_send_with_timing_prints_timing_reports() {
        let timing = timing_option(Some(300), Some(100), Some(10_000), true, Some(86))
            .unwrap()
            .unwrap();
        assert_eq!(timing.trans_id, 87, "distinct from the statusRequest's");
        assert_eq!(
            timing.option_xml(),
            "<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='87'><dataTiming noLaterThan='300' returnTrip='10000' reportAfter='100' reportErrors='true' /></option>"
        );
        assert!(timing_option(None, None, None, true, None).is_err());
        assert_eq!(timing_option(None, None, None, false, None).unwrap(), None);
        let respond: Respond = Box::new(|payload| {
            let Ok(Operation::Data(data)) = parse_message(payload, &limits()) else {
                return (false, error_payload(501, "not data"), Vec::new());
            };
            let option = &data.options[0];
            assert_eq!(option.internal.as_deref(), Some("dataTiming"));
            let id = option.trans_id;
            let reports = vec![timing_report(id, 350), timing_report(id, 250)];
            (true, ok_payload(), reports)
        });
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let mut opts = send_opts(&["barney@example.com"], None, "hi");
        opts.timing = Some(Timing {
            trans_id: 9,
            ..timing
        });
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "accepted\n\
             timing barney@example.com 350\n\
             timing barney@example.com 250\n"
        );
        relay.join().unwrap();
    }

    #[test]
    fn send_with_status_prints_acceptance_and_report() {
        let respond: Respond = Box::new(|payload| {
            let Ok(Operation::Data(data)) = parse_message(payload, &limits()) else {
                return (false, error_payload(501, "not data"), Vec::new());
            };
            let option = &data.options[0];
            assert_eq!(option.internal.as_deref(), Some("statusRequest"));
            (true, ok_payload(), vec![status_response(option.trans_id)])
        });
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(
            &["barney@example.com", "wilma@example.com"],
            Some(86),
            "a < b & 'c'\r\nline two",
        );
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "accepted\n\
             status barney@example.com 250\n\
             status wilma@example.com 550 unknown endpoint identity\n"
        );
        let log = relay.join().unwrap();
        // The attach as the originator, then exactly one data.
        assert!(matches!(
            parse_document(log.start_content.as_ref().unwrap(), &limits()).unwrap(),
            Operation::Attach { ref endpoint, trans_id: 1, .. } if endpoint == "fred@example.com"
        ));
        assert_eq!(log.msgs.len(), 1);
        let Operation::Data(data) = parse_message(&log.msgs[0], &limits()).unwrap() else {
            panic!("not data")
        };
        assert_eq!(data.content, "#Content");
        assert_eq!(data.originator.identity, "fred@example.com");
        let to: Vec<&str> = data
            .recipients
            .iter()
            .map(|r| r.identity.as_str())
            .collect();
        assert_eq!(to, ["barney@example.com", "wilma@example.com"]);
        assert_eq!(data.options[0].trans_id, 86);
        let element = xml::parse(data.data_content.as_ref().unwrap(), 8, 8).unwrap();
        assert_eq!(element.text, "a < b & 'c'\r\nline two");
        // The report was acknowledged with ok, then the session released.
        assert_eq!(log.replies.len(), 1);
        assert_eq!(log.replies[0], (ReplyKind::Rpy, ok_payload()));
        assert!(log.released);
    }

    /// OPT-06 (RFC 3342 §1): after an attachOverride another application's reports may reach
    /// this one. A report whose transID `apex send` did not ask for is acknowledged with `ok`
    /// and ignored: neither printed nor taken for the status it waits for.
    #[test]
    fn opt_06_send_acknowledges_and_ignores_a_report_it_did_not_ask_for() {
        let respond: Respond = Box::new(|payload| {
            let Ok(Operation::Data(data)) = parse_message(payload, &limits()) else {
                return (false, error_payload(501, "not data"), Vec::new());
            };
            let asked = data.options[0].trans_id;
            let stranger = data_payload(
                "apex=report@example.com",
                "fred@example.com",
                &format!(
                    "<statusResponse transID='{}'><destination identity='barney@example.com'><reply code='551' transID='{0}'>not yours</reply></destination></statusResponse>",
                    asked + 1
                ),
            );
            (true, ok_payload(), vec![stranger, status_response(asked)])
        });
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(&["barney@example.com", "wilma@example.com"], Some(86), "x");
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "accepted\n\
             status barney@example.com 250\n\
             status wilma@example.com 550 unknown endpoint identity\n",
            "the report for transID 87 is not printed"
        );
        let log = relay.join().unwrap();
        assert_eq!(
            log.replies,
            vec![
                (ReplyKind::Rpy, ok_payload()),
                (ReplyKind::Rpy, ok_payload())
            ],
            "both reports acknowledged"
        );
        assert!(log.released);
    }

    #[test]
    fn send_without_status_prints_accepted() {
        let respond: Respond = Box::new(|_| (true, ok_payload(), Vec::new()));
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(&["barney@example.com"], None, "hello, barney");
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(String::from_utf8(out).unwrap(), "accepted\n");
        let log = relay.join().unwrap();
        // Byte for byte: fred's data to barney with inline content (RFC 3340 §4.4.4).
        assert_eq!(
            &log.msgs[0][..],
            &b"Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n"[..]
        );
        assert!(log.released);
    }

    #[test]
    fn send_error_prints_code_and_text() {
        let respond: Respond = Box::new(|_| {
            (
                false,
                error_payload(537, "action not authorized"),
                Vec::new(),
            )
        });
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let opts = send_opts(&["barney@example.com"], Some(7), "x");
        let status = run_send(stream, &opts, stop(), &mut out).unwrap();
        assert_eq!(status, Status::Failed);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error 537 action not authorized\n"
        );
        assert!(relay.join().unwrap().released);
    }

    #[test]
    fn send_status_timeout_is_an_error() {
        let respond: Respond = Box::new(|_| (true, ok_payload(), Vec::new()));
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let mut opts = send_opts(&["barney@example.com"], Some(7), "x");
        opts.status_timeout = Duration::from_millis(200);
        let err = run_send(stream, &opts, stop(), &mut out).unwrap_err();
        assert!(err
            .to_string()
            .contains("timed out waiting for the status of barney@example.com"));
        assert_eq!(String::from_utf8(out).unwrap(), "accepted\n");
        drop(relay.join());
    }

    #[test]
    fn connection_refused_is_reported() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let err = connect(&format!("127.0.0.1:{port}"), IO).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot connect to 127.0.0.1:"),
            "{err}"
        );
    }

    #[test]
    fn content_extraction() {
        let Operation::Data(data) =
            parse_message(&Bytes::from_static(MULTIPART_13_4.as_bytes()), &limits()).unwrap()
        else {
            panic!()
        };
        assert_eq!(content_text(&data), "hello, barney");
        let Operation::Data(report) = parse_message(&status_response(86), &limits()).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            content_text(&report),
            "<statusResponse transID='86'><destination identity='barney@example.com'><reply code='250' transID='86' /></destination><destination identity='wilma@example.com'><reply code='550' transID='86'>unknown endpoint identity</reply></destination></statusResponse>"
        );
        assert_eq!(
            client::status_response(&report),
            Some(StatusResponse {
                trans_id: 86,
                destinations: vec![
                    Destination {
                        identity: "barney@example.com".into(),
                        code: 250,
                        text: String::new()
                    },
                    Destination {
                        identity: "wilma@example.com".into(),
                        code: 550,
                        text: "unknown endpoint identity".into()
                    },
                ],
            })
        );
        let lines = data_payload("a@x", "b@x", "one\r\ntwo<![CDATA[ & three]]>");
        let Operation::Data(lines) = parse_message(&lines, &limits()).unwrap() else {
            panic!()
        };
        assert_eq!(content_text(&lines), "one\\ntwo & three");
        assert_eq!(inner_markup(b"<data-content Name='C' />"), "");
        assert_eq!(
            inner_markup(b"<data-content Name='a>b'>x</data-content>"),
            "x"
        );
    }

    #[test]
    fn data_document_escapes_and_validates() {
        let doc = data_document(
            &ep("o'brien@example.com"),
            &[ep("b&b@example.com")],
            Some(5),
            None,
            "<tag> & \"q\"",
        );
        let Operation::Data(data) = parse_message(&doc, &limits()).unwrap() else {
            panic!()
        };
        assert_eq!(data.originator.identity, "o'brien@example.com");
        assert_eq!(data.recipients[0].identity, "b&b@example.com");
        assert_eq!(content_text(&data), "<tag> & \"q\"");
        assert!(check_xml_chars("tab\tok\r\n").is_ok());
        assert!(check_xml_chars("nul\0").is_err());
        let id = status_trans_id();
        assert!((1..=0x7FFF_FFFF).contains(&id));
    }

    /// What the fake SCRAM relay saw, in order.
    type Steps = Vec<String>;

    /// A one-connection relay offering SASL SCRAM-SHA-256 with user fred (password "yabba"),
    /// as apexd runs it: the client-first message piggybacked in the `start`, the challenge
    /// in its reply, the client-final as a MSG answered with `<blob status='complete'>` (with
    /// a wrong server signature when `forge`) or ERR 535; then the attach, answered `ok` only
    /// after success.
    fn fake_scram_relay(forge: bool) -> (SocketAddr, JoinHandle<Steps>) {
        use apex_proto::auth::scram::{SaslStep, ScramServer, ScramVerifier};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let scram = tuning::sasl_profile("SCRAM-SHA-256");
            let config = SessionConfig {
                profiles: vec![APEX.to_owned(), scram.clone()],
                ..SessionConfig::default()
            };
            let verifier = ScramVerifier::from_password("yabba", b"salt", 4096);
            let lookup = |name: &str| (name == "fred@example.com").then(|| verifier.clone());
            let session = Session::new(Role::Listener, config);
            let mut peer = Peer::new(stream, session, stop(), IO).unwrap();
            let mut server = ScramServer::new("server-nonce".to_owned());
            let mut authenticated = false;
            let mut steps = Steps::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let event = match peer.wait(Some(deadline)) {
                    Ok(Wait::Event(event)) => event,
                    _ => break,
                };
                match event {
                    Event::StartRequested(request) if request.profiles[0].uri == scram => {
                        let content = request.profiles[0].content.clone().unwrap();
                        let Ok(TuningElement::Blob { data, .. }) = tuning::parse(&content, 8, 8)
                        else {
                            panic!("no blob in the start")
                        };
                        steps.push(format!("start {}", String::from_utf8_lossy(&data)));
                        let SaslStep::Challenge(challenge) = server.step(&data, lookup) else {
                            panic!("no challenge")
                        };
                        let reply = tuning::blob(BlobStatus::Continue, &challenge);
                        peer.session
                            .accept_start(request.id, &scram, Some(reply.into()))
                            .unwrap();
                        peer.resume().unwrap();
                    }
                    Event::StartRequested(request) => {
                        let content = request.profiles[0].content.clone().unwrap();
                        steps.push(format!("attach {}", String::from_utf8_lossy(&content)));
                        let answer = if authenticated {
                            "<ok />"
                        } else {
                            "<error code='530'>authentication required</error>"
                        };
                        peer.session
                            .accept_start(request.id, APEX, Some(Bytes::from(answer)))
                            .unwrap();
                    }
                    Event::Message {
                        channel,
                        msgno,
                        payload,
                    } => {
                        let Ok(TuningElement::Blob { data, .. }) = tuning::parse(&payload, 8, 8)
                        else {
                            panic!("no blob in the MSG")
                        };
                        match server.step(&data, lookup) {
                            SaslStep::Success {
                                identity,
                                additional,
                            } => {
                                steps.push(format!("authenticated {identity}"));
                                authenticated = true;
                                let mut last = additional.unwrap();
                                if forge {
                                    last =
                                        b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_vec();
                                }
                                let reply = tuning::blob(BlobStatus::Complete, &last);
                                peer.session
                                    .send_rpy(channel, msgno, tuning::entity(&reply))
                                    .unwrap();
                            }
                            _ => {
                                steps.push("failed".to_owned());
                                let refusal = error_payload(535, "authentication failed");
                                peer.session.send_err(channel, msgno, refusal).unwrap();
                            }
                        }
                        peer.resume().unwrap();
                    }
                    Event::SessionReleased => {
                        steps.push("released".to_owned());
                        peer.flush().unwrap();
                        break;
                    }
                    _ => {}
                }
            }
            steps
        });
        (addr, handle)
    }

    fn scram_opts(password: &str) -> AttachOpts {
        let mut opts = attach_opts("fred@example.com", None, Some(Duration::from_millis(100)));
        opts.security.auth = Some(Credentials {
            user: "fred@example.com".to_owned(),
            password: password.to_owned(),
            mechanism: Mechanism::ScramSha256,
        });
        opts
    }

    #[test]
    fn scram_authenticates_before_the_attach() {
        let (addr, relay) = fake_scram_relay(false);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let status = run_attach(stream, &scram_opts("yabba"), stop(), &mut out).unwrap();
        assert_eq!(status, Status::Success);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "attached fred@example.com\n"
        );
        let steps = relay.join().unwrap();
        assert!(
            steps[0].starts_with("start n,,n=fred@example.com,r="),
            "{steps:?}"
        );
        assert_eq!(
            steps[1..],
            [
                "authenticated fred@example.com",
                "attach <attach endpoint='fred@example.com' transID='1' />",
                "released"
            ]
        );
    }

    #[test]
    fn a_refused_authentication_prints_the_code_and_releases() {
        let (addr, relay) = fake_scram_relay(false);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let status = run_attach(stream, &scram_opts("dabba"), stop(), &mut out).unwrap();
        assert_eq!(status, Status::Failed);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error 535 authentication failed\n"
        );
        let steps = relay.join().unwrap();
        assert_eq!(steps[1..], ["failed", "released"], "no attach: {steps:?}");
    }

    /// Mutual authentication: a relay that accepts the proof without knowing the verifier
    /// cannot compute the server signature, and `apex` does not attach through it.
    #[test]
    fn a_relay_without_the_right_server_signature_is_not_trusted() {
        let (addr, relay) = fake_scram_relay(true);
        let stream = TcpStream::connect(addr).unwrap();
        let mut out = Vec::new();
        let err = run_attach(stream, &scram_opts("yabba"), stop(), &mut out).unwrap_err();
        assert!(
            err.to_string()
                .contains("the relay did not prove that it knows fred@example.com's credentials"),
            "{err}"
        );
        assert!(out.is_empty());
        let steps = relay.join().unwrap();
        assert!(!steps.iter().any(|s| s.starts_with("attach")), "{steps:?}");
    }

    /// A greeting without TLS fails `--tls` before anything is sent in the clear.
    #[test]
    fn tls_fails_clearly_when_the_relay_does_not_offer_it() {
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), no_msgs());
        let stream = TcpStream::connect(addr).unwrap();
        let mut opts = attach_opts("barney@example.com", None, None);
        opts.security.tls = Some(TlsOpts {
            // Nothing gets as far as verifying: no roots are needed.
            config: Arc::new(
                rustls::ClientConfig::builder_with_provider(crypto_provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
            name: "example.com".to_owned(),
        });
        let mut out = Vec::new();
        let err = run_attach(stream, &opts, stop(), &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the relay does not offer TLS (it offers: http://iana.org/beep/APEX)"
        );
        assert!(relay.join().unwrap().start_content.is_none());
    }

    // ---- apex access ----

    /// The `access` subcommand of `args` (after `apex --relay r:1 access --as NAME`).
    fn access_command(args: &[&str]) -> Result<AccessCommand, clap::Error> {
        let mut all = vec![
            "apex",
            "--relay",
            "r:1",
            "access",
            "--as",
            "wilma@example.com",
        ];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| match cli.command {
            Command::Access { op, .. } => op,
            other => panic!("not access: {other:?}"),
        })
    }

    fn access_args(args: &[&str]) -> Result<(Endpoint, AccessOp)> {
        access_op(&access_command(args).unwrap())
    }

    fn access_err(args: &[&str]) -> String {
        format!("{:#}", access_args(args).unwrap_err())
    }

    #[test]
    fn access_arguments() {
        let (service, op) = access_args(&[
            "query",
            "fred@example.com",
            "barney@example.com",
            "core:data",
            "presence:subscribe",
        ])
        .unwrap();
        assert_eq!(service, ep("apex=access@example.com"));
        assert_eq!(
            op,
            AccessOp::Query {
                owner: "fred@example.com".into(),
                actor: "barney@example.com".into(),
                actions: parse_actions("core:data presence:subscribe").unwrap(),
            }
        );
        // Several tokens in one argument; the service is that of the owner's domain.
        let (service, op) = access_args(&[
            "set",
            "fred@rubble.com",
            "*@example.com",
            "core:data presence:watch",
        ])
        .unwrap();
        assert_eq!(service, ep("apex=access@rubble.com"));
        assert_eq!(
            op,
            AccessOp::Set {
                owner: "fred@rubble.com".into(),
                actor: "*@example.com".into(),
                actions: Some(parse_actions("core:data presence:watch").unwrap()),
                last_update: None,
            }
        );
        let (_, op) = access_args(&[
            "delete",
            "fred@example.com",
            "barney/*@*.example.com",
            "--last-update",
            "2024-03-01T10:00:00-08:00",
        ])
        .unwrap();
        assert_eq!(
            op,
            AccessOp::Set {
                owner: "fred@example.com".into(),
                actor: "barney/*@*.example.com".into(),
                actions: None,
                last_update: Some("2024-03-01T10:00:00-08:00".into()),
            }
        );
        // A query's actor is an address, written as typed, never escaped (ACC-07).
        let (_, op) = access_args(&[
            "query",
            "fred@example.com",
            r"a\b*c@example.com",
            "core:data",
        ])
        .unwrap();
        assert!(matches!(op, AccessOp::Query { ref actor, .. } if actor == r"a\b*c@example.com"));
    }

    #[test]
    fn access_literal_escapes_the_actor() {
        // Typed as a pattern, `*` is a wildcard ...
        let (_, op) = access_args(&["get", "fred@example.com", "*@example.com"]).unwrap();
        assert_eq!(
            op,
            AccessOp::Get {
                owner: "fred@example.com".into(),
                actor: "*@example.com".into()
            }
        );
        // ... and with --literal an endpoint name: `a\b*c` is written `a\\b\*c` (ACC-07).
        let (_, op) =
            access_args(&["get", "--literal", "fred@example.com", r"a\b*c@example.com"]).unwrap();
        assert!(matches!(op, AccessOp::Get { ref actor, .. } if actor == r"a\\b\*c@example.com"));
        let (_, op) = access_args(&[
            "set",
            "fred@example.com",
            "*@example.com",
            "core:data",
            "--literal",
        ])
        .unwrap();
        assert!(matches!(op, AccessOp::Set { ref actor, .. } if actor == r"\*@example.com"));
        // A literal name that is no pattern says how to write it.
        let err = access_err(&["get", "fred@example.com", "a*b@example.com"]);
        assert!(err.contains("invalid actor 'a*b@example.com'"), "{err}");
        assert!(err.contains("--literal"), "{err}");
        let err = access_err(&["delete", "fred@example.com", r"a\b@example.com"]);
        assert!(err.contains("--literal"), "{err}");
        let err = access_err(&["get", "--literal", "fred@example.com", "no-domain"]);
        assert!(err.starts_with("invalid actor 'no-domain'"), "{err}");
        assert!(!err.contains("--literal"), "{err}");
    }

    #[test]
    fn access_argument_errors() {
        let err = access_err(&["get", "fred", "*@example.com"]);
        assert!(err.starts_with("invalid owner 'fred'"), "{err}");
        let err = access_err(&["query", "fred@example.com", "barney", "core:data"]);
        assert!(err.starts_with("invalid actor 'barney'"), "{err}");
        let err = access_err(&["query", "fred@example.com", "b@example.com", "core"]);
        assert!(err.contains("service:operation"), "{err}");
        let err = access_err(&["set", "fred@example.com", "b@example.com", "core:data :x"]);
        assert!(err.contains("invalid action token"), "{err}");
        let err = access_err(&["set", "fred@example.com", "b@example.com", " "]);
        assert!(err.contains("empty action list"), "{err}");
        let err = access_err(&[
            "set",
            "fred@example.com",
            "b@example.com",
            "core:data",
            "--last-update",
            "yesterday",
        ]);
        assert!(err.starts_with("--last-update: not an RFC 3339"), "{err}");
        // What clap refuses: no action, no actor, an action list for delete, options out of place.
        for args in [
            &["query", "fred@example.com", "b@example.com"][..],
            &["set", "fred@example.com", "b@example.com"],
            &["get", "fred@example.com"],
            &["delete", "fred@example.com", "b@example.com", "core:data"],
            &[
                "query",
                "--literal",
                "fred@example.com",
                "b@example.com",
                "core:data",
            ],
            &[
                "query",
                "fred@example.com",
                "b@example.com",
                "core:data",
                "--last-update",
                "x",
            ],
            &["list", "fred@example.com"],
        ] {
            assert!(access_command(args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "access",
            "get",
            "fred@example.com",
            "b@example.com"
        ])
        .is_err());
        // --timeout may be given after the subcommand too.
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "access",
            "--as",
            "w@x",
            "get",
            "f@x",
            "b@x",
            "--timeout",
            "1.5",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn access_trans_ids_stay_in_range() {
        assert_eq!(next_trans_id(1), 2);
        assert_eq!(next_trans_id(MAX_31BIT - 1), MAX_31BIT);
        assert_eq!(next_trans_id(MAX_31BIT), 1);
        let id = status_trans_id();
        assert!((1..=MAX_31BIT).contains(&id));
    }

    const SERVICE: &str = "apex=access@example.com";

    /// The request a data from the client carries (checking where it goes).
    fn access_request(payload: &Bytes) -> AccessRequest {
        let Ok(Operation::Data(data)) = parse_message(payload, &limits()) else {
            panic!("not a data")
        };
        assert_eq!(data.recipients.len(), 1);
        assert_eq!(data.recipients[0].identity, SERVICE);
        assert_eq!(data.content, "#Content");
        parse_request(&carried_element(&data).unwrap()).unwrap()
    }

    /// A data from the service to `to` carrying `answer`.
    fn from_service(to: &str, answer: &AccessAnswer) -> Bytes {
        element_data(SERVICE, to, &format_answer(answer))
    }

    fn reply(code: u16, trans_id: u32, text: &str) -> AccessAnswer {
        AccessAnswer::Reply {
            code,
            trans_id,
            text: text.to_owned(),
        }
    }

    fn access_opts(name: &str, args: &[&str]) -> AccessOpts {
        let (service, op) = access_args(args).unwrap();
        AccessOpts {
            name: ep(name),
            service,
            op,
            security: Security::default(),
            answer_timeout: Duration::from_secs(5),
            io_timeout: IO,
            first_trans_id: 7001,
        }
    }

    /// Runs `apex access` as `name` against a fake relay whose service answers with `respond`;
    /// returns the status, what was printed and what the relay saw.
    fn run_access_with(
        name: &str,
        args: &[&str],
        respond: Respond,
        answer_timeout: Option<Duration>,
    ) -> (Status, String, Log) {
        let (addr, relay) = fake_relay(Some("<ok />"), Vec::new(), respond);
        let stream = TcpStream::connect(addr).unwrap();
        let mut opts = access_opts(name, args);
        if let Some(timeout) = answer_timeout {
            opts.answer_timeout = timeout;
        }
        let mut out = Vec::new();
        let status = run_access(stream, &opts, stop(), &mut out).unwrap();
        let log = relay.join().unwrap();
        assert!(log.released, "channel closed and session released");
        (status, String::from_utf8(out).unwrap(), log)
    }

    #[test]
    fn access_query_prints_the_answer_and_ignores_other_deliveries() {
        let respond: Respond = Box::new(|payload| {
            let request = access_request(payload);
            let id = request.trans_id();
            // Before the answer: someone else's data, an answer to another transaction, and an
            // answer with this transID from someone other than the service: all acknowledged,
            // none taken for the answer.
            let other = data_payload("barney@example.com", "fred@example.com", "hello");
            let stale = from_service(
                "fred@example.com",
                &AccessAnswer::Allow { trans_id: id + 1 },
            );
            let forged = element_data(
                "barney@example.com",
                "fred@example.com",
                &format_answer(&AccessAnswer::Allow { trans_id: id }),
            );
            let answer = from_service("fred@example.com", &AccessAnswer::Deny { trans_id: id });
            (true, ok_payload(), vec![other, stale, forged, answer])
        });
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &[
                "query",
                "fred@example.com",
                "barney@example.com",
                "core:data",
                "presence:subscribe",
            ],
            respond,
            None,
        );
        assert_eq!((status, out.as_str()), (Status::Success, "deny\n"));
        // The digest's §6 request, the element inline in data-content (content='#Content').
        assert_eq!(log.msgs.len(), 1);
        assert_eq!(
            &log.msgs[0][..],
            &b"Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='apex=access@example.com' />\r\n   <data-content Name='Content'><query owner='fred@example.com' actor='barney@example.com' actions='core:data presence:subscribe' transID='7001' /></data-content>\r\n</data>\r\n"[..]
        );
        assert_eq!(log.replies.len(), 4);
        assert!(log
            .replies
            .iter()
            .all(|r| *r == (ReplyKind::Rpy, ok_payload())));
    }

    #[test]
    fn access_query_allow_and_refusals() {
        let answer_with = |answer: fn(u32) -> AccessAnswer| -> Respond {
            Box::new(move |payload| {
                let id = access_request(payload).trans_id();
                (
                    true,
                    ok_payload(),
                    vec![from_service("wilma@example.com", &answer(id))],
                )
            })
        };
        let args = [
            "query",
            "fred@example.com",
            "barney@example.com",
            "core:data",
        ];
        let (status, out, _) = run_access_with(
            "wilma@example.com",
            &args,
            answer_with(|trans_id| AccessAnswer::Allow { trans_id }),
            None,
        );
        assert_eq!((status, out.as_str()), (Status::Success, "allow\n"));
        let (status, out, _) = run_access_with(
            "wilma@example.com",
            &args,
            answer_with(|id| reply(537, id, "access:query not granted")),
            None,
        );
        assert_eq!(
            (status, out.as_str()),
            (Status::Failed, "error 537 access:query not granted\n")
        );
        // The relay refuses the data itself.
        let refuse: Respond =
            Box::new(|_| (false, error_payload(550, "unknown endpoint"), Vec::new()));
        let (status, out, _) = run_access_with("wilma@example.com", &args, refuse, None);
        assert_eq!(
            (status, out.as_str()),
            (Status::Failed, "error 550 unknown endpoint\n")
        );
    }

    #[test]
    fn access_timeout_prints_an_error_and_detaches() {
        let silent: Respond = Box::new(|_| (true, ok_payload(), Vec::new()));
        let started = Instant::now();
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &["get", "fred@example.com", "*@example.com"],
            silent,
            Some(Duration::from_millis(300)),
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            (status, out.as_str()),
            (Status::Failed, "error timeout waiting for apex=access\n")
        );
        assert_eq!(log.msgs.len(), 1);
    }

    #[test]
    fn access_get_prints_the_entry() {
        let respond: Respond = Box::new(|payload| {
            let request = access_request(payload);
            assert!(matches!(
                request,
                AccessRequest::Get { ref owner, ref actor, trans_id: 7001 }
                    if owner == "fred@example.com" && actor == r"a\*b@example.com"
            ));
            let entry = AccessAnswer::Set {
                trans_id: 7001,
                access: AccessElement {
                    owner: "fred@example.com".into(),
                    actor: r"a\*b@example.com".into(),
                    actions: Some(parse_actions("core:data presence:watch").unwrap()),
                    last_update: Some("2024-03-01T10:00:00Z".into()),
                },
            };
            (
                true,
                ok_payload(),
                vec![from_service("wilma@example.com", &entry)],
            )
        });
        let (status, out, _) = run_access_with(
            "wilma@example.com",
            &["get", "--literal", "fred@example.com", "a*b@example.com"],
            respond,
            None,
        );
        assert_eq!(
            (status, out.as_str()),
            (
                Status::Success,
                "fred@example.com a\\*b@example.com core:data presence:watch lastUpdate=2024-03-01T10:00:00Z\n"
            )
        );
        let missing: Respond = Box::new(|payload| {
            let id = access_request(payload).trans_id();
            let answer = reply(551, id, "no such entry");
            (
                true,
                ok_payload(),
                vec![from_service("wilma@example.com", &answer)],
            )
        });
        let (status, out, _) = run_access_with(
            "wilma@example.com",
            &["get", "fred@example.com", "*@example.com"],
            missing,
            None,
        );
        assert_eq!(
            (status, out.as_str()),
            (Status::Failed, "error 551 no such entry\n")
        );
    }

    /// A fake access service for set and delete: `get` finds `stored` (its lastUpdate) or
    /// answers 551; `set` is answered `code`, the owner's notice (same transID) sent before
    /// the reply and, when `notice_after`, after it too.
    fn set_service(stored: Option<&'static str>, code: u16, notice_after: bool) -> Respond {
        Box::new(move |payload| {
            let answers = match access_request(payload) {
                AccessRequest::Get {
                    owner,
                    actor,
                    trans_id,
                } => vec![match stored {
                    Some(last_update) => AccessAnswer::Set {
                        trans_id,
                        access: AccessElement {
                            owner,
                            actor,
                            actions: Some(vec![Action::CORE_DATA]),
                            last_update: Some(last_update.to_owned()),
                        },
                    },
                    None => reply(551, trans_id, "no entry"),
                }],
                AccessRequest::Set { trans_id, access } => {
                    let notice = AccessAnswer::Set {
                        trans_id,
                        access: AccessElement {
                            last_update: Some("2024-03-01T10:05:17Z".into()),
                            ..access
                        },
                    };
                    let mut answers = vec![notice.clone(), reply(code, trans_id, "")];
                    if notice_after {
                        answers.push(notice);
                    }
                    answers
                }
                query => panic!("unexpected {query:?}"),
            };
            let msgs = answers
                .iter()
                .map(|a| from_service("fred@example.com", a))
                .collect();
            (true, ok_payload(), msgs)
        })
    }

    #[test]
    fn access_set_reads_first_then_creates() {
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &["set", "fred@example.com", "*@example.com", "core:data"],
            set_service(None, 250, false),
            None,
        );
        assert_eq!((status, out.as_str()), (Status::Success, "250 set\n"));
        let requests: Vec<AccessRequest> = log.msgs.iter().map(access_request).collect();
        assert_eq!(
            requests,
            [
                AccessRequest::Get {
                    owner: "fred@example.com".into(),
                    actor: "*@example.com".into(),
                    trans_id: 7001,
                },
                // 551: created, without lastUpdate; a transID of its own.
                AccessRequest::Set {
                    trans_id: 7002,
                    access: AccessElement {
                        owner: "fred@example.com".into(),
                        actor: "*@example.com".into(),
                        actions: Some(vec![Action::CORE_DATA]),
                        last_update: None,
                    },
                },
            ]
        );
        // The 551 answer, the notice (which did not end the wait) and the reply: all accepted.
        assert_eq!(log.replies.len(), 3);
        assert!(log
            .replies
            .iter()
            .all(|r| *r == (ReplyKind::Rpy, ok_payload())));
    }

    #[test]
    fn access_set_replaces_with_the_lastupdate_read() {
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &[
                "set",
                "fred@example.com",
                "*@example.com",
                "core:data",
                "presence:watch",
            ],
            set_service(Some("2024-03-01T10:00:00Z"), 555, false),
            None,
        );
        // The service's refusal (here a stale lastUpdate) is the command's.
        assert_eq!((status, out.as_str()), (Status::Failed, "error 555\n"));
        let set = access_request(&log.msgs[1]);
        assert!(matches!(
            set,
            AccessRequest::Set { trans_id: 7002, access: AccessElement { last_update: Some(ref ts), actions: Some(ref a), .. } }
                if ts == "2024-03-01T10:00:00Z" && a.len() == 2
        ));
        // With --last-update, no get.
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &[
                "set",
                "fred@example.com",
                "*@example.com",
                "core:data",
                "--last-update",
                "2024-03-01T13:02:00-08:00",
            ],
            set_service(None, 250, false),
            None,
        );
        assert_eq!((status, out.as_str()), (Status::Success, "250 set\n"));
        assert_eq!(log.msgs.len(), 1);
        assert!(matches!(
            access_request(&log.msgs[0]),
            AccessRequest::Set { trans_id: 7001, access: AccessElement { last_update: Some(ref ts), .. } }
                if ts == "2024-03-01T13:02:00-08:00"
        ));
    }

    #[test]
    fn access_delete_and_the_owners_notice() {
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &["delete", "fred@example.com", "barney@example.com"],
            set_service(Some("2024-03-01T10:00:00Z"), 250, true),
            None,
        );
        assert_eq!((status, out.as_str()), (Status::Success, "250 deleted\n"));
        assert_eq!(
            access_request(&log.msgs[1]),
            AccessRequest::Set {
                trans_id: 7002,
                access: AccessElement {
                    owner: "fred@example.com".into(),
                    actor: "barney@example.com".into(),
                    actions: None,
                    last_update: Some("2024-03-01T10:00:00Z".into()),
                },
            }
        );
        // The get's answer, the notices before and after the reply, the reply: the notice that
        // comes while detaching is accepted too, not refused with 421.
        assert_eq!(log.replies.len(), 4);
        assert!(log
            .replies
            .iter()
            .all(|r| *r == (ReplyKind::Rpy, ok_payload())));
        // Nothing to delete: the get's 551 ends the command.
        let (status, out, log) = run_access_with(
            "fred@example.com",
            &["delete", "fred@example.com", "barney@example.com"],
            set_service(None, 250, false),
            None,
        );
        assert_eq!(
            (status, out.as_str()),
            (Status::Failed, "error 551 no entry\n")
        );
        assert_eq!(log.msgs.len(), 1);
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn security_options() {
        let dir = std::env::temp_dir().join(format!("apex-cli-security-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "yabba dabba\r\nsecond line\n").unwrap();
        let pw = pw.to_str().unwrap();
        let me = ep("fred@example.com");

        // No options: the plaintext path as it was.
        let cli = parse(&["apex", "--relay", "r:1", "attach", "fred@example.com"]);
        let security = resolve_security(&cli, &me, Some("ignored".into())).unwrap();
        assert!(security.tls.is_none() && security.auth.is_none());

        // The options may follow the command; the password file's first line is the password.
        let cli = parse(&[
            "apex",
            "--relay",
            "relay.rubble.com:913",
            "attach",
            "fred@example.com",
            "--user",
            "fred@example.com",
            "--password-file",
            pw,
            "--mechanism",
            "SCRAM-SHA-256",
        ]);
        let security = resolve_security(&cli, &me, Some("from the environment".into())).unwrap();
        let auth = security.auth.unwrap();
        assert_eq!(auth.user, "fred@example.com");
        assert_eq!(auth.password, "yabba dabba");
        assert_eq!(auth.mechanism, Mechanism::ScramSha256);
        assert!(
            !format!("{auth:?}").contains("yabba"),
            "Debug shows no password"
        );

        // APEX_PASSWORD without a file; PLAIN needs TLS, which --tls-name implies.
        let base = ["apex", "--relay", "r:1", "--user", "fred@example.com"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            args.extend(["attach", "fred@example.com"]);
            parse(&args)
        };
        let cli = with(&[]);
        let auth = resolve_security(&cli, &me, Some("pebbles".into()))
            .unwrap()
            .auth
            .unwrap();
        assert_eq!(auth.password, "pebbles");
        let err = resolve_security(&cli, &me, None).unwrap_err().to_string();
        assert!(err.contains("APEX_PASSWORD"), "{err}");
        let err = resolve_security(&cli, &me, Some(String::new()))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "APEX_PASSWORD is empty");
        let cli = with(&["--mechanism", "PLAIN"]);
        let err = resolve_security(&cli, &me, Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs --tls"), "{err}");
        assert!(Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "--mechanism",
            "MD5",
            "attach",
            "a@x"
        ])
        .is_err());
        let cli = parse(&[
            "apex",
            "--relay",
            "r:1",
            "--password-file",
            pw,
            "attach",
            "fred@example.com",
        ]);
        let err = resolve_security(&cli, &me, None).unwrap_err().to_string();
        assert_eq!(err, "--password-file and --mechanism go with --user");
        let cli = parse(&[
            "apex",
            "--relay",
            "r:1",
            "--user",
            "not an identity",
            "attach",
            "fred@example.com",
        ]);
        assert!(resolve_security(&cli, &me, Some("x".into())).is_err());

        // --tls-ca implies --tls and reads the roots; a file without certificates is refused.
        let cli = with(&["--tls-ca", pw]);
        let err = resolve_security(&cli, &me, Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let cli = with(&["--tls-name", "not a name!", "--mechanism", "PLAIN"]);
        let err = resolve_security(&cli, &me, Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot name a TLS server"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tls_name_defaults_to_the_endpoint_domain() {
        let fred = ep("fred@example.com");
        assert_eq!(
            default_tls_name(&fred, Some("relay.rubble.com:913")).unwrap(),
            "example.com"
        );
        assert_eq!(
            default_tls_name(&fred, Some("127.0.0.1:913")).unwrap(),
            "example.com"
        );
        let literal = ep("fred@[192.0.2.1]");
        assert_eq!(
            default_tls_name(&literal, Some("relay.example.com:913")).unwrap(),
            "relay.example.com"
        );
        assert_eq!(
            default_tls_name(&literal, Some("relay.example.com")).unwrap(),
            "relay.example.com"
        );
        assert!(default_tls_name(&literal, Some("127.0.0.1:913")).is_err());
        assert!(default_tls_name(&literal, Some("[::1]:913")).is_err());
        // Found with DNS, a literal domain's relay has no name to check either.
        assert!(default_tls_name(&literal, None).is_err());
        assert_eq!(default_tls_name(&fred, None).unwrap(), "example.com");
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "127.0.0.1:913",
            "send",
            "--from",
            "fred@example.com",
            "--to",
            "a@example.com",
            "--to",
            "b@example.com",
            "--status",
            "-",
        ])
        .unwrap();
        assert_eq!(cli.timeout, None);
        let Command::Send {
            to, status, text, ..
        } = cli.command
        else {
            panic!()
        };
        assert_eq!(to.len(), 2);
        assert!(status);
        assert_eq!(text, "-");
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "attach",
            "b@x",
            "--count",
            "3",
            "--timeout",
            "0.5",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Attach { count: Some(3), .. }
        ));
        assert_eq!(cli.timeout, Some(Duration::from_millis(500)));
        let cli = Cli::try_parse_from([
            "apex",
            "--relay",
            "r:1",
            "--timeout",
            "2",
            "send",
            "--from",
            "a@x",
            "--to",
            "b@x",
            "hi",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Some(Duration::from_secs(2)));
        assert!(
            Cli::try_parse_from(["apex", "--relay", "r:1", "attach", "b@x", "--count", "0"])
                .is_err()
        );
    }
}
