//! Finding a domain's relays with DNS (RFC 3340 §3.1, APEX-04): another domain's relays for
//! the relay when no static route names them (SRV `_apex-mesh._tcp.<domain>`, port 912), and
//! the relay of an endpoint's domain for the `apex` client when `--relay` does not name it (SRV
//! `_apex-edge._tcp.<domain>`, port 913); see [`Service`]. The SRV targets come in the order
//! RFC 2782 gives them ([`srv::order`]: priority, then weighted random), with every address of
//! every target in that order; a lone SRV record whose target is `.` means the domain has no
//! relay; without SRV records, the domain's own addresses on the service's IANA port. A domain
//! literal (`[192.0.2.1]`) is its address, on that port, without DNS.
//!
//! One resolver serves the whole process, off the shards: a thread running a current-thread tokio
//! runtime and one hickory resolver (one cache), fed lookups over a channel. A caller on any
//! executor (glommio's included) awaits the answer on a oneshot channel, without polling. A lookup
//! that outlives its timeout, or whose caller stopped waiting, is dropped on that thread, which
//! cancels its queries.
//!
//! `mesh.dns_server` (the client's `--dns-server`) sends every query to that one server (UDP, and TCP when an answer is
//! truncated) instead of those of /etc/resolv.conf, and ignores /etc/hosts. With
//! `APEXD_DNS_LOOPBACK_ONLY=1` in the environment (the tests and `scripts/test` set it), a lookup
//! that would leave loopback fails with an error naming the domain: one without a `dns_server`
//! on 127.0.0.0/8 or ::1, or one whose answer is outside loopback.

pub mod srv;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup_ip::LookupIp;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::sync::{mpsc, oneshot};

use crate::config::MeshConfig;

/// The IANA port of apex-mesh (RFC 3340 §8.2).
pub const APEX_MESH_PORT: u16 = 912;

/// The IANA port of apex-edge (RFC 3340 §8.1).
pub const APEX_EDGE_PORT: u16 = 913;

/// Which relay a lookup finds (RFC 3340 §3.1: SRV over TCP, with the IANA port of §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// A domain's relays as other relays reach them: `_apex-mesh._tcp`, port 912.
    Mesh,
    /// A domain's relay as its endpoints reach it: `_apex-edge._tcp`, port 913.
    Edge,
}

impl Service {
    /// The SRV owner name of `domain`'s relays for this service, fully qualified.
    pub fn srv_name(self, domain: &str) -> String {
        let label = match self {
            Service::Mesh => "_apex-mesh",
            Service::Edge => "_apex-edge",
        };
        format!("{label}._tcp.{}.", domain.trim_end_matches('.'))
    }

    /// The IANA port, used for a domain literal and for a domain without SRV records.
    pub fn port(self) -> u16 {
        match self {
            Service::Mesh => APEX_MESH_PORT,
            Service::Edge => APEX_EDGE_PORT,
        }
    }
}

/// The environment variable that keeps lookups on loopback (tests).
pub const LOOPBACK_ONLY_ENV: &str = "APEXD_DNS_LOOPBACK_ONLY";

/// How long one lookup (SRV, then the targets' addresses) may take in all.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one query may wait for its answer (a lookup's own timeout may cut it short).
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Most lookups waiting for the resolver thread at once; more fail at once.
pub const MAX_PENDING_LOOKUPS: usize = 1024;

/// How lookups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The one server to ask; `None`: the system's configuration (/etc/resolv.conf).
    pub server: Option<SocketAddr>,
    /// The longest a lookup may take in all.
    pub timeout: Duration,
    /// Refuse a lookup that would leave loopback ([`LOOPBACK_ONLY_ENV`]).
    pub loopback_only: bool,
}

impl Settings {
    /// The settings of `mesh`, with [`LOOPBACK_ONLY_ENV`] from the environment.
    pub fn from_config(mesh: &MeshConfig) -> Settings {
        Settings {
            server: mesh.dns_server(),
            timeout: LOOKUP_TIMEOUT,
            loopback_only: std::env::var_os(LOOPBACK_ONLY_ENV)
                .is_some_and(|v| !v.is_empty() && v != "0"),
        }
    }

    /// Under `loopback_only`, refuses a lookup of `domain` that would query off loopback.
    fn check_server(&self, domain: &str) -> Result<()> {
        match self.server {
            _ if !self.loopback_only => Ok(()),
            Some(server) if is_loopback(server.ip()) => Ok(()),
            Some(server) => bail!(
                "DNS lookup for {domain} refused: {LOOPBACK_ONLY_ENV} is set and the DNS server \
                 {server} is not on loopback"
            ),
            None => bail!(
                "DNS lookup for {domain} refused: {LOOPBACK_ONLY_ENV} is set and no loopback \
                 DNS server (`mesh.dns_server`, --dns-server) is configured, so it would ask \
                 the system's resolver"
            ),
        }
    }

    /// Under `loopback_only`, refuses an answer for `domain` that points off loopback.
    fn check_answer(&self, domain: &str, found: &[SocketAddr]) -> Result<()> {
        match found.iter().find(|a| !is_loopback(a.ip())) {
            Some(addr) if self.loopback_only => bail!(
                "the relay of {domain} is at {addr}, outside loopback, and {LOOPBACK_ONLY_ENV} \
                 is set"
            ),
            _ => Ok(()),
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The apex-mesh address of a domain literal such as `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
pub fn literal_address(domain: &str) -> Option<SocketAddr> {
    literal_address_for(Service::Mesh, domain)
}

/// The address of a domain literal for `service`: its IP on the service's IANA port.
pub fn literal_address_for(service: Service, domain: &str) -> Option<SocketAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let text = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    let ip: IpAddr = text.parse().ok()?;
    Some(SocketAddr::new(ip, service.port()))
}

/// Resolves `domain`'s relays with the process's resolver ([`shared`]) set up from `mesh`:
/// every candidate address, in the order to try them, never none.
pub async fn resolve_mesh(mesh: &MeshConfig, domain: &str) -> Result<Vec<SocketAddr>> {
    shared(&Settings::from_config(mesh))?
        .resolve_mesh(domain)
        .await
}

static SHARED: OnceLock<Resolver> = OnceLock::new();

/// The process's resolver, started with `settings` on first use; later settings are ignored
/// (every shard has the same). apexd starts it from its main thread, before the shards, so that
/// the resolver thread is not pinned to a shard's CPU.
pub fn shared(settings: &Settings) -> Result<&'static Resolver> {
    if let Some(resolver) = SHARED.get() {
        return Ok(resolver);
    }
    let started =
        Resolver::start(settings.clone()).context("cannot start the DNS resolver thread")?;
    // Two shards may race here: the loser's resolver is dropped, and its thread ends.
    Ok(SHARED.get_or_init(|| started))
}

/// A handle on a resolver thread; the thread ends once every handle is gone, cancelling the
/// lookups it still runs.
#[derive(Debug)]
pub struct Resolver {
    settings: Settings,
    requests: mpsc::UnboundedSender<Request>,
    pending: Arc<AtomicUsize>,
}

/// One lookup for the resolver thread.
struct Request {
    service: Service,
    domain: String,
    reply: oneshot::Sender<Result<Vec<SocketAddr>>>,
    _pending: Pending,
}

/// Counts a lookup as pending from its request until its answer (or its cancellation).
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Resolver {
    /// Starts a resolver thread with `settings`.
    pub fn start(settings: Settings) -> std::io::Result<Resolver> {
        let (requests, receiver) = mpsc::unbounded_channel();
        let thread_settings = settings.clone();
        std::thread::Builder::new()
            .name("apexd-dns".into())
            .spawn(move || serve(thread_settings, receiver))?;
        Ok(Resolver {
            settings,
            requests,
            pending: Arc::default(),
        })
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Lookups asked for and not yet answered or cancelled.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// `domain`'s relays for other relays (apex-mesh): every candidate address in the order
    /// to try them, never none.
    pub async fn resolve_mesh(&self, domain: &str) -> Result<Vec<SocketAddr>> {
        self.resolve(Service::Mesh, domain).await
    }

    /// `domain`'s relays for `service`: every candidate address in the order to try them,
    /// never none.
    pub async fn resolve(&self, service: Service, domain: &str) -> Result<Vec<SocketAddr>> {
        let found = match literal_address_for(service, domain) {
            Some(addr) => vec![addr],
            None => {
                self.settings.check_server(domain)?;
                self.ask(service, domain).await?
            }
        };
        if found.is_empty() {
            bail!("no address for the relay of {domain}");
        }
        self.settings.check_answer(domain, &found)?;
        Ok(found)
    }

    async fn ask(&self, service: Service, domain: &str) -> Result<Vec<SocketAddr>> {
        let before = self.pending.fetch_add(1, Ordering::Relaxed);
        let pending = Pending(self.pending.clone());
        if before >= MAX_PENDING_LOOKUPS {
            bail!("DNS lookup for {domain} refused: {MAX_PENDING_LOOKUPS} lookups are pending");
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            service,
            domain: domain.to_owned(),
            reply,
            _pending: pending,
        };
        let stopped = || anyhow!("DNS lookup for {domain}: the resolver thread has stopped");
        self.requests.send(request).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The resolver thread: answers requests until every handle is gone.
fn serve(settings: Settings, mut requests: mpsc::UnboundedReceiver<Request>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            while let Some(request) = requests.blocking_recv() {
                let _ = request
                    .reply
                    .send(Err(anyhow!("cannot start the DNS runtime: {e}")));
            }
            return;
        }
    };
    runtime.block_on(async {
        let resolver = build(&settings);
        while let Some(request) = requests.recv().await {
            match &resolver {
                Ok(resolver) => {
                    tokio::spawn(answer(resolver.clone(), request, settings.timeout));
                }
                Err(e) => {
                    let _ = request.reply.send(Err(anyhow!("{e}")));
                }
            }
        }
    });
    // Dropping the runtime drops the lookups still running.
}

fn build(settings: &Settings) -> std::result::Result<TokioResolver, String> {
    let mut builder = match settings.server {
        Some(server) => {
            let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut name_server.connections {
                connection.port = server.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system DNS configuration: {e}"))?,
    };
    let options = builder.options_mut();
    options.timeout = QUERY_TIMEOUT;
    options.attempts = 1;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    if settings.server.is_some() {
        options.use_hosts_file = ResolveHosts::Never;
    }
    builder
        .build()
        .map_err(|e| format!("building the DNS resolver: {e}"))
}

/// Runs one lookup until it is done, its time is up or its caller stops waiting.
async fn answer(resolver: TokioResolver, request: Request, timeout: Duration) {
    let Request {
        service,
        domain,
        mut reply,
        _pending: pending,
    } = request;
    let outcome = futures_lite::future::or(
        async {
            Some(
                tokio::time::timeout(timeout, lookup(&resolver, service, &domain))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow!(
                            "DNS lookup for {domain} timed out after {timeout:?}"
                        ))
                    }),
            )
        },
        async {
            reply.closed().await;
            None
        },
    )
    .await;
    // The lookup's future, and with it its queries, is gone by now.
    drop(pending);
    if let Some(result) = outcome {
        let _ = reply.send(result);
    }
}

/// The SRV procedure of RFC 2782 for `service` of `domain` (`_apex-mesh._tcp.<domain>` or
/// `_apex-edge._tcp.<domain>`).
async fn lookup(
    resolver: &TokioResolver,
    service: Service,
    domain: &str,
) -> Result<Vec<SocketAddr>> {
    let port = service.port();
    let domain = domain.trim_end_matches('.');
    let service = service.srv_name(domain);
    let records: Vec<srv::Srv> = match resolver.srv_lookup(service.as_str()).await {
        Ok(found) => found
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(srv::Srv {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: srv.target.to_ascii(),
                }),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_no_records_found() => Vec::new(),
        Err(e) => bail!("DNS lookup of {service} failed: {e}"),
    };
    if records.is_empty() {
        // No SRV records: the domain's own addresses, on the service's port.
        let ips = resolver
            .lookup_ip(format!("{domain}."))
            .await
            .map_err(|e| anyhow!("no relay found for {domain} (no SRV {service}): {e}"))?;
        return Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect());
    }
    let ordered = srv::order(records, &mut fastrand::Rng::new()).map_err(|srv::NotAvailable| {
        anyhow!("{domain} has no relay: its SRV record {service} has the target \".\"")
    })?;
    // The targets' addresses, looked up together; a set drops (cancels) its tasks when dropped.
    let mut lookups = tokio::task::JoinSet::new();
    for (index, record) in ordered.iter().enumerate() {
        let resolver = resolver.clone();
        let target = format!("{}.", record.target.trim_end_matches('.'));
        lookups.spawn(async move { (index, resolver.lookup_ip(target).await) });
    }
    let mut results: Vec<Option<std::result::Result<LookupIp, NetError>>> =
        ordered.iter().map(|_| None).collect();
    while let Some(joined) = lookups.join_next().await {
        if let Ok((index, result)) = joined {
            results[index] = Some(result);
        }
    }
    let mut found: Vec<SocketAddr> = Vec::new();
    let mut failures = Vec::new();
    for (record, result) in ordered.iter().zip(results) {
        match result {
            Some(Ok(ips)) => {
                for addr in ips.iter().map(|ip| SocketAddr::new(ip, record.port)) {
                    if !found.contains(&addr) {
                        found.push(addr);
                    }
                }
            }
            Some(Err(e)) => failures.push(format!("{}: {e}", record.target)),
            None => failures.push(format!("{}: lookup failed", record.target)),
        }
    }
    if found.is_empty() {
        bail!(
            "no address for the relays of {domain} named by {service} ({})",
            failures.join("; ")
        );
    }
    Ok(found)
}

#[cfg(test)]
#[path = "../tests/common/dns_server.rs"]
mod dns_server;

#[cfg(test)]
mod tests {
    use super::dns_server::{DnsServer, Zone};
    use super::*;
    use futures_lite::future::block_on;
    use std::net::Ipv6Addr;
    use std::time::Instant;

    fn settings(server: &DnsServer) -> Settings {
        Settings {
            server: Some(server.addr),
            timeout: Duration::from_secs(5),
            loopback_only: true,
        }
    }

    fn resolve(server: &DnsServer, domain: &str) -> Result<Vec<SocketAddr>> {
        let resolver = Resolver::start(settings(server)).unwrap();
        block_on(resolver.resolve_mesh(domain))
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn apex_04_domain_literals_use_the_iana_port() {
        assert_eq!(
            literal_address("[192.0.2.1]"),
            Some("192.0.2.1:912".parse().unwrap())
        );
        assert_eq!(
            literal_address("[IPv6:2001:db8::1]"),
            Some("[2001:db8::1]:912".parse().unwrap())
        );
        assert_eq!(literal_address("example.com"), None);
        assert_eq!(literal_address("[not an ip]"), None);
    }

    #[test]
    fn literal_lookup_needs_no_dns() {
        let resolver = Resolver::start(Settings {
            server: None,
            timeout: Duration::from_secs(1),
            loopback_only: true,
        })
        .unwrap();
        let found = block_on(resolver.resolve_mesh("[127.0.0.1]")).unwrap();
        assert_eq!(found, addrs(&["127.0.0.1:912"]));
        let found = block_on(resolver.resolve_mesh("[IPv6:::1]")).unwrap();
        assert_eq!(found, addrs(&["[::1]:912"]));
    }

    #[test]
    fn apex_04_srv_targets_by_priority_with_every_address_of_each() {
        let server = DnsServer::start(
            Zone::new()
                .srv(
                    "_apex-mesh._tcp.rubble.test",
                    20,
                    0,
                    7002,
                    "late.rubble.test",
                )
                .srv(
                    "_apex-mesh._tcp.rubble.test",
                    10,
                    0,
                    7001,
                    "first.rubble.test",
                )
                .a("first.rubble.test", [127, 0, 0, 2])
                .a("first.rubble.test", [127, 0, 0, 3])
                .aaaa("first.rubble.test", Ipv6Addr::LOCALHOST)
                .a("late.rubble.test", [127, 0, 0, 4]),
        );
        let found = resolve(&server, "rubble.test").unwrap();
        assert_eq!(
            found,
            addrs(&[
                "127.0.0.2:7001",
                "127.0.0.3:7001",
                "[::1]:7001",
                "127.0.0.4:7002"
            ])
        );
        // Every query went to the configured server over UDP, fully qualified.
        let queries = server.queries();
        assert!(queries
            .iter()
            .any(|(name, _, _)| name == "_apex-mesh._tcp.rubble.test"));
        assert!(queries.iter().all(|(_, _, tcp)| !tcp), "{queries:?}");
    }

    /// APEX-04 for endpoints: the `apex` client finds its domain's relay under
    /// `_apex-edge._tcp` (never the relays' `_apex-mesh._tcp`), on port 913 without SRV
    /// records or for a domain literal.
    #[test]
    fn apex_04_edge_lookups_use_apex_edge_srv_and_port_913() {
        let server = DnsServer::start(
            Zone::new()
                .srv(
                    "_apex-edge._tcp.rubble.test",
                    0,
                    0,
                    7913,
                    "edge.rubble.test",
                )
                .srv(
                    "_apex-mesh._tcp.rubble.test",
                    0,
                    0,
                    7912,
                    "mesh.rubble.test",
                )
                .a("edge.rubble.test", [127, 0, 0, 2])
                .a("mesh.rubble.test", [127, 0, 0, 3])
                .srv("_apex-mesh._tcp.plain.test", 0, 0, 7912, "mesh.rubble.test")
                .a("plain.test", [127, 0, 0, 9]),
        );
        let resolver = Resolver::start(settings(&server)).unwrap();
        let edge = |domain| block_on(resolver.resolve(Service::Edge, domain));
        assert_eq!(edge("rubble.test").unwrap(), addrs(&["127.0.0.2:7913"]));
        assert_eq!(edge("plain.test").unwrap(), addrs(&["127.0.0.9:913"]));
        assert_eq!(edge("[127.0.0.1]").unwrap(), addrs(&["127.0.0.1:913"]));
        let queries = server.queries();
        assert!(
            queries
                .iter()
                .all(|(name, _, _)| !name.starts_with("_apex-mesh")),
            "{queries:?}"
        );
        assert!(queries
            .iter()
            .any(|(name, _, _)| name == "_apex-edge._tcp.plain.test"));
    }

    #[test]
    fn apex_04_without_srv_the_domains_addresses_on_port_912() {
        let server = DnsServer::start(Zone::new().a("plain.test", [127, 0, 0, 9]));
        assert_eq!(
            resolve(&server, "plain.test").unwrap(),
            addrs(&["127.0.0.9:912"])
        );
    }

    #[test]
    fn apex_04_a_lone_dot_target_means_no_relay_and_no_fallback() {
        let server = DnsServer::start(
            Zone::new()
                .srv("_apex-mesh._tcp.closed.test", 0, 0, 0, ".")
                .a("closed.test", [127, 0, 0, 5]),
        );
        let error = resolve(&server, "closed.test").unwrap_err().to_string();
        assert!(
            error.contains("closed.test has no relay") && error.contains("\".\""),
            "{error}"
        );
        assert!(!server.asked_addresses_of("closed.test"));
    }

    #[test]
    fn srv_targets_without_addresses_do_not_fall_back_to_the_domain() {
        let server = DnsServer::start(
            Zone::new()
                .srv("_apex-mesh._tcp.gone.test", 0, 0, 7000, "missing.gone.test")
                .a("gone.test", [127, 0, 0, 6]),
        );
        let error = resolve(&server, "gone.test").unwrap_err().to_string();
        assert!(
            error.contains("no address for the relays of gone.test")
                && error.contains("missing.gone.test"),
            "{error}"
        );
        assert!(!server.asked_addresses_of("gone.test"));
    }

    #[test]
    fn an_unknown_domain_is_an_error_naming_it() {
        let server = DnsServer::start(Zone::new());
        let error = resolve(&server, "nowhere.test").unwrap_err().to_string();
        assert!(error.contains("no relay found for nowhere.test"), "{error}");
    }

    #[test]
    fn truncated_answers_are_asked_again_over_tcp() {
        let server = DnsServer::start(
            Zone::new()
                .srv("_apex-mesh._tcp.big.test", 0, 0, 7003, "relay.big.test")
                .a("relay.big.test", [127, 0, 0, 7])
                .truncate_udp(),
        );
        assert_eq!(
            resolve(&server, "big.test").unwrap(),
            addrs(&["127.0.0.7:7003"])
        );
        let queries = server.queries();
        assert!(
            queries
                .iter()
                .any(|(name, _, tcp)| *tcp && name == "_apex-mesh._tcp.big.test"),
            "{queries:?}"
        );
    }

    #[test]
    fn a_lookup_past_its_timeout_is_cancelled() {
        let server = DnsServer::start(Zone::new().silent());
        let resolver = Resolver::start(Settings {
            timeout: Duration::from_millis(300),
            ..settings(&server)
        })
        .unwrap();
        let started = Instant::now();
        let error = block_on(resolver.resolve_mesh("slow.test"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("slow.test") && error.contains("timed out after"),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // Nothing of it is left running: not counted, and no more queries go out.
        assert_eq!(resolver.pending(), 0);
        let asked = server.queries().len();
        assert!(asked >= 1);
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(server.queries().len(), asked, "{:?}", server.queries());
    }

    #[test]
    fn a_lookup_whose_caller_stops_waiting_is_cancelled() {
        let server = DnsServer::start(Zone::new().silent());
        let resolver = Resolver::start(settings(&server)).unwrap();
        let mut lookup = Box::pin(resolver.resolve_mesh("slow.test"));
        assert!(block_on(futures_lite::future::poll_once(&mut lookup)).is_none());
        let deadline = Instant::now() + Duration::from_secs(2);
        while server.queries().is_empty() {
            assert!(Instant::now() < deadline, "the query never went out");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resolver.pending(), 1);
        drop(lookup);
        while resolver.pending() > 0 {
            assert!(Instant::now() < deadline, "the lookup was not cancelled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn loopback_only_refuses_lookups_that_would_leave_loopback() {
        let system = Resolver::start(Settings {
            server: None,
            timeout: Duration::from_secs(1),
            loopback_only: true,
        })
        .unwrap();
        let error = block_on(system.resolve_mesh("example.org"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("example.org") && error.contains(LOOPBACK_ONLY_ENV),
            "{error}"
        );
        let remote = Resolver::start(Settings {
            server: Some("192.0.2.53:53".parse().unwrap()),
            timeout: Duration::from_secs(1),
            loopback_only: true,
        })
        .unwrap();
        let error = block_on(remote.resolve_mesh("example.org"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("192.0.2.53:53"), "{error}");
        // Answers and literals outside loopback are refused too.
        let error = block_on(system.resolve_mesh("[192.0.2.1]"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("192.0.2.1:912"), "{error}");
        let server = DnsServer::start(Zone::new().a("far.test", [192, 0, 2, 7]));
        let error = resolve(&server, "far.test").unwrap_err().to_string();
        assert!(
            error.contains("far.test") && error.contains("outside loopback"),
            "{error}"
        );
        // Without the guard the same answer is taken.
        let resolver = Resolver::start(Settings {
            loopback_only: false,
            ..settings(&server)
        })
        .unwrap();
        assert_eq!(
            block_on(resolver.resolve_mesh("far.test")).unwrap(),
            addrs(&["192.0.2.7:912"])
        );
    }
}
