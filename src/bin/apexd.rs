//! `apexd`: the APEX relay daemon.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use apexd::config::{Config, Overrides};
use apexd::reload::{Reloader, Settings, SharedSettings};
use clap::{CommandFactory, Parser};

/// APEX relay (RFC 3340) on thread-per-core io_uring shards.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Administrative domain served (default: this host's name).
    #[arg(long)]
    domain: Option<String>,
    /// apex-edge listen address (endpoints), default 0.0.0.0:913.
    #[arg(long, value_name = "ADDR")]
    edge_listen: Option<std::net::SocketAddr>,
    /// apex-mesh listen address (relays), default 0.0.0.0:912.
    #[arg(long, value_name = "ADDR")]
    mesh_listen: Option<std::net::SocketAddr>,
    /// Number of shards (default: one per online CPU).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// TOML configuration file; flags override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL")]
    log: Option<String>,
    /// Log line format on standard error: text or json (one object per line).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<apexd::config::LogFormat>,
    /// Grant ACTIONS to ACTOR for every local endpoint (repeatable), e.g.
    /// `--grant '*@example.com=core:data'`.
    #[arg(long, value_name = "ACTOR=ACTIONS")]
    grant: Vec<String>,
    /// Static route to another relay's apex-mesh port (repeatable), e.g.
    /// `--peer rubble.com=127.0.0.1:9912`.
    #[arg(long, value_name = "DOMAIN=HOST:PORT")]
    peer: Vec<String>,
    /// Trust the relays of DOMAIN as intermediaries for any originator (repeatable; `*`: all).
    #[arg(long, value_name = "DOMAIN")]
    trust: Vec<String>,
    /// Ask this DNS server only (UDP, TCP for truncated answers) for the SRV records of domains
    /// without a static route, instead of the system's resolvers, e.g. `--dns-server 127.0.0.1:53`.
    #[arg(long, value_name = "ADDR:PORT")]
    dns_server: Option<std::net::SocketAddr>,
    /// Who must authenticate to attach: required, loopback-open or off (default: required
    /// with --users, else loopback-open).
    #[arg(long = "auth", value_name = "MODE")]
    auth_mode: Option<String>,
    /// Credentials file (lines made by `apexd passwd NAME@DOMAIN`).
    #[arg(long, value_name = "FILE")]
    users: Option<String>,
    /// PEM certificate chain: both ports offer TLS, relay links start it.
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM")]
    tls_key: Option<String>,
    /// PEM roots verifying other relays' and endpoints' certificates.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<String>,
    /// Directory of the durable store (access entries, held messages); default
    /// $STATE_DIRECTORY, else /var/lib/apexd as root, else $XDG_STATE_HOME/apexd or
    /// ~/.local/state/apexd.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Serve Prometheus metrics (/metrics), /healthz and /status (for `apex status`) over
    /// HTTP at ADDR, e.g. 127.0.0.1:9914 (default: off).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Do not pin shards to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Read one password line from standard input and print the users-file line for
    /// NAME@DOMAIN (a SCRAM-SHA-256 verifier: the file never holds the password).
    Passwd {
        /// The user, as NAME@DOMAIN.
        user: String,
        /// PBKDF2 iterations (at least 4096).
        #[arg(long, default_value_t = apex_proto::auth::scram::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
}

/// `apexd passwd`: the users-file line for `user` with the password on standard input.
fn passwd(user: &str, iterations: u32) -> Result<()> {
    use apex_proto::auth::scram::{random_octets, ScramVerifier, DEFAULT_ITERATIONS};
    let Some((local, domain)) = user.rsplit_once('@') else {
        anyhow::bail!("'{user}' is not NAME@DOMAIN");
    };
    if local.is_empty() || domain.is_empty() || user.contains(char::is_whitespace) {
        anyhow::bail!("'{user}' is not NAME@DOMAIN");
    }
    if iterations < DEFAULT_ITERATIONS {
        anyhow::bail!("--iterations {iterations}: at least {DEFAULT_ITERATIONS} (RFC 7677)");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("no password on standard input (one line is read)");
    }
    let salt = random_octets(16).ok_or_else(|| anyhow::anyhow!("no random salt"))?;
    let verifier = ScramVerifier::from_password(password, &salt, iterations);
    println!("{user} {verifier}");
    Ok(())
}

/// SIGHUP reloads: the configuration file under the same flags, the users file and the TLS
/// files (see `apexd::reload`); a bad file leaves everything in force.
fn reload_on_sighup(reloader: Arc<Reloader>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("apexd-reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                reloader.reload_and_log();
            }
        })?;
    Ok(())
}

// The allocator decides whether memory comes back after connection churn: glibc keeps the
// pages that thousands of closed sessions freed (0% returned in scripts/fault-churn), which is
// why the default build links another one. Only the daemon sets it: the library and the tests
// keep the system allocator, and `--no-default-features` builds the daemon with it too (an
// AddressSanitizer build needs its own interposed malloc; scripts/sanitize builds it so).
#[cfg(all(feature = "jemalloc", feature = "mimalloc"))]
compile_error!("features `jemalloc` and `mimalloc` each choose the global allocator: enable one");

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = run() {
        eprintln!("apexd: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    if let Some(pages) = apexd::manpages::generate_if_asked(
        std::env::args_os(),
        Args::command,
        "8",
        apexd::manpages::APEXD_SECTIONS,
    ) {
        return pages.map(drop);
    }
    let args = Args::parse();
    if let Some(Command::Passwd { user, iterations }) = &args.command {
        return passwd(user, *iterations);
    }
    let overrides = Overrides {
        domain: args.domain,
        edge_listen: args.edge_listen,
        mesh_listen: args.mesh_listen,
        shards: args.shards,
        no_pin: args.no_pin,
        log: args.log,
        log_format: args.log_format,
        grants: args.grant,
        peers: args.peer,
        trusted: args.trust,
        dns_server: args.dns_server,
        auth_mode: args.auth_mode,
        users: args.users,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_ca: args.tls_ca,
        data_dir: args.data_dir,
        metrics_listen: args.metrics_listen,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let set_log = apexd::logs::init(&config.log, config.log_format)?;

    let security = Arc::new(apexd::security::SharedSecurity::new(apexd::security::load(
        &config,
    )?));
    let settings = Arc::new(SharedSettings::new(Settings::from_config(&config)?));
    let reloader = Arc::new(Reloader::new(
        args.config.as_deref(),
        overrides,
        config.clone(),
        security.clone(),
        settings.clone(),
        set_log,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    reload_on_sighup(reloader.clone())?;
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    apexd::service_manager::stopping_on(&[
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    // The DNS resolver thread, started here so that it is not pinned to a shard's CPU.
    if let Err(e) = apexd::dns::shared(&apexd::dns::Settings::from_config(&config.mesh)) {
        tracing::warn!("{e:#}; a shard will try again when it needs DNS");
    }
    let domain = config.domain.clone();
    let data_dir = config.data_dir()?;
    let access_limits = config.access_limits();
    // The monitoring endpoint listens before the shards start, so that a busy address stops
    // apexd at once; /healthz answers 503 until every shard listens.
    let (monitor, probes, metrics_addr) = match config.metrics_listen()? {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr).map_err(|e| {
                anyhow::anyhow!("cannot listen for metrics on {addr} (--metrics-listen): {e}")
            })?;
            let bound = listener.local_addr()?;
            let (monitor, probes) = apexd::monitor::Monitor::new(&config, config.shard_count());
            apexd::monitor::serve(monitor.clone(), listener)?;
            (Some(monitor), probes, Some(bound))
        }
        None => (None, Vec::new(), None),
    };
    let store_monitor = monitor.clone();
    let open_store: apexd::shard::OpenStore<'_> = Box::new(move |shards| {
        // The grants in force when it opens: a reload may have come since the start.
        let opened = reloader.open_store(|grants| {
            apexd::store::Store::open(&data_dir, grants, access_limits, shards)
        })?;
        tracing::info!(path = %opened.0.path().display(), "store open");
        if let Some(monitor) = &store_monitor {
            monitor.set_store(opened.0.clone());
        }
        Ok(opened)
    });
    let store = apexd::shard::run(
        config,
        stop,
        security,
        settings,
        open_store,
        probes,
        |bound| {
            if let Some(monitor) = &monitor {
                monitor.set_ready(bound.edge, bound.mesh);
            }
            let metrics = metrics_addr.map_or_else(String::new, |a| format!(" metrics={a}"));
            // One machine-readable line for scripts and tests.
            println!(
                "apexd ready domain={domain} edge={} mesh={} shards={}{metrics}",
                bound.edge, bound.mesh, bound.shards
            );
            let _ = std::io::stdout().flush();
            apexd::service_manager::ready(&domain, &bound);
        },
    )?;
    // What the shards asked to store before they stopped is committed before exit.
    store.close();
    tracing::info!("apexd stopped");
    Ok(())
}
