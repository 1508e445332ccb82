//! `apex-load`: load generator and benchmark driver for apexd.
//!
//! ```text
//! apex-load apex --relay 127.0.0.1:PORT [--domain example.com] [--pairs 1] [--size 128]
//!                [--duration 5] [--warmup 1] [--depth 1000] [--rate MSGS_PER_S] [--threads N]
//!                [--pattern pairs|fan-in|fan-out] [--cpus LIST] [--quiet] [--json FILE]
//!                [--svg FILE] [--tls-ca CA.pem [--tls-name NAME]]
//!                [--hold] [--absent-receivers] [--sets-per-sec R]
//! apex-load access --relay 127.0.0.1:PORT [--domain example.com] [--conns 4] [--depth 1]
//!                [--duration 5] [--warmup 1] [--threads N] [--cpus LIST] [--quiet] [--json FILE]
//!                [--tls-ca CA.pem [--tls-name NAME]]
//! apex-load raw|nats|mqtt --relay 127.0.0.1:PORT [--pairs 1] [--size 128] [--duration 5]
//!                [--warmup 1] [--rate MSGS_PER_S] [--pattern pairs|fan-in|fan-out]
//!                [--window 1000] [--cpus LIST] [--quiet] [--json FILE] [--svg FILE]
//!                [--tls-ca CA.pem [--tls-name NAME]]   (nats only)
//! apex-load null-relay --listen 127.0.0.1:PORT
//! ```
//!
//! `apex --hold` puts a per-data `hold4Endpoint` option (RFC 3342 §3) in every data;
//! `--absent-receivers` never attaches the receivers, so the data goes to endpoints that are not
//! attached (with `--hold` the relay holds it; the run ends when every data got its reply). The
//! apex report adds the sender-side `ok` latency (writing a data to reading the relay's reply)
//! and the ERR replies. `--sets-per-sec R` adds a background connection attached as
//! `setter@DOMAIN` that makes R access `set`s per second on its own entries through
//! `apex=access@DOMAIN` (RFC 3341 §4.4), with their replies and latency in the report.
//!
//! `access` measures the access service alone: `--conns` connections attached as
//! `setter{i}@DOMAIN`, each keeping `--depth` sets in flight on its own entries (at most 200
//! actors per owner, replaced with the lastUpdate of the owner notice), and reports the sets
//! answered 250 per second and their latency.
//!
//! `raw` speaks to the null relay (a 16-octet hello, then u32 BE length-prefixed frames),
//! `nats` to nats-server (text protocol, subject `load.I`), `mqtt` to an MQTT 3.1.1 broker
//! (QoS 0, topic `load/I`). The null relay forwards sender I's bytes to receiver I unparsed.
//!
//! `--tls-ca` puts every connection under TLS, trusting the CA certificates in the PEM file and
//! verifying that the server's certificate names `--tls-name` (default: `--domain` for apex,
//! `example.com` for nats). apex: the BEEP TLS profile (greeting, `start` with a piggybacked
//! `ready`, `proceed`, handshake, a new greeting) before the attach; nats: the upgrade after the
//! server's INFO (`tls_required`), before CONNECT.
//!
//! Load goes to loopback addresses only (127.0.0.0/8 and ::1). The run lasts warm-up plus
//! duration, and never longer than that plus a 10 s grace to drain. The report gives the
//! delivered messages per second and payload MB/s in the measured window, one-way latency
//! percentiles, and errors, lost and reordered messages. The exit status is 1 when any of
//! those last three is not zero, and 2 when the run could not be set up.

mod access;
mod apex;
mod driver;
mod nullrelay;
mod payload;
mod stats;
mod stream;
mod svg;
mod tls;
mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

/// Load generator for apexd: measures throughput, latency and delivery correctness.
#[derive(Debug, Parser)]
#[command(name = "apex-load", version, about)]
struct Cli {
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, Subcommand)]
enum Target {
    /// APEX endpoints through a relay: in pair i, sndI@DOMAIN sends data to rcvI@DOMAIN.
    Apex(ApexArgs),
    /// The access service alone: setters change their own entries through apex=access@DOMAIN.
    Access(AccessArgs),
    /// Length-prefixed frames through the null relay (`apex-load null-relay`).
    Raw(StreamArgs),
    /// NATS text protocol against nats-server: pair i publishes and subscribes on `load.i`.
    Nats(StreamArgs),
    /// MQTT 3.1.1 QoS 0 against a broker (mosquitto): pair i uses topic `load/i`.
    Mqtt(StreamArgs),
    /// The ceiling baseline: forwards sender i's bytes to receiver i, no parsing.
    NullRelay(NullRelayArgs),
}

#[derive(Debug, Args)]
struct StreamArgs {
    /// The target's address; loopback only (127.0.0.0/8, ::1).
    #[arg(long, alias = "server", value_name = "HOST:PORT")]
    relay: String,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    load: LoadArgs,
}

/// TLS to the target.
#[derive(Debug, Args)]
struct TlsArgs {
    /// Speak TLS, trusting the CA certificates in this PEM file (apex: the BEEP TLS profile
    /// before the attach; nats: the upgrade after the server's INFO).
    #[arg(long, value_name = "CA.pem")]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (default: --domain for apex, example.com
    /// for nats).
    #[arg(long, value_name = "NAME")]
    tls_name: Option<String>,
}

impl TlsArgs {
    /// The TLS client, if asked for; `name` when --tls-name is not given.
    fn client(&self, name: &str) -> Result<Option<tls::TlsClient>> {
        match (&self.tls_ca, &self.tls_name) {
            (None, None) => Ok(None),
            (None, Some(_)) => bail!("--tls-name needs --tls-ca"),
            (Some(ca), given) => Ok(Some(tls::TlsClient::load(
                Path::new(ca),
                given.as_deref().unwrap_or(name),
            )?)),
        }
    }
}

#[derive(Debug, Args)]
struct NullRelayArgs {
    /// Address to listen on; loopback only.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
}

#[derive(Debug, Args)]
struct ApexArgs {
    /// The relay's apex-edge address; loopback only (127.0.0.0/8, ::1).
    #[arg(long, value_name = "HOST:PORT")]
    relay: String,
    /// Administrative domain of the endpoints (the relay's --domain).
    #[arg(long, default_value = "example.com")]
    domain: String,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Every data carries a per-data hold4Endpoint option (RFC 3342 §3).
    #[arg(long)]
    hold: bool,
    /// The receivers never attach: data goes to endpoints that are not attached; the run ends
    /// when every data got its reply.
    #[arg(long)]
    absent_receivers: bool,
    /// A background connection attached as setter@DOMAIN makes this many access `set`s per
    /// second on its own entries (0: none).
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    sets_per_sec: f64,
}

#[derive(Debug, Args)]
struct AccessArgs {
    /// The relay's apex-edge address; loopback only (127.0.0.0/8, ::1).
    #[arg(long, value_name = "HOST:PORT")]
    relay: String,
    /// Administrative domain of the setters (the relay's --domain).
    #[arg(long, default_value = "example.com")]
    domain: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Setter connections, each attached as setter{i}@DOMAIN.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    conns: u32,
    /// Sets in flight per connection (at most the 200 actors each setter uses).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=200))]
    depth: u32,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Load threads (default: two per CPU the load runs on, at most one per connection).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// CPUs to pin the load threads to, round-robin, e.g. `1` or `2-3`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// Options every target shares.
#[derive(Debug, Args)]
struct LoadArgs {
    /// Sender/receiver pairs, each endpoint on its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pairs: u32,
    /// Payload octets per message (sequence number, send timestamp, padding).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// apex: most messages per sender not yet acknowledged by the relay (and at most 256 KiB
    /// of payload), the in-flight bound the nats and mqtt senders keep with --window.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    depth: u32,
    /// Load threads; fewer threads than connections poll several each. apex default: two per
    /// CPU the load runs on (--cpus, else the CPUs this process may use), at most one per
    /// connection: 32 threads taking turns on one CPU cost the generator more than the relay
    /// (raw, nats, mqtt: always one blocking thread per connection).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// CPUs to pin the load threads to, round-robin, e.g. `1` or `2-3`.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write an SVG latency percentile plot to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Open loop: this many messages per second in total, latency from the scheduled send
    /// time (apex: still at most --depth unanswered per sender).
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<f64>,
    /// How senders map to receivers (raw: pairs only; apex: pairs only for now).
    #[arg(long, value_enum, default_value_t = stream::Pattern::Pairs)]
    pattern: stream::Pattern,
    /// Throughput mode, nats and mqtt: most messages per sender not yet delivered (and at
    /// most 256 KiB).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    window: u32,
    /// No progress line each second (raw, nats, mqtt).
    #[arg(long)]
    quiet: bool,
}

/// Largest payload accepted (the relay's default message limit is 4 MiB).
const MAX_SIZE: usize = 1024 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("apex-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the chosen target; returns whether the run passed.
fn run(cli: Cli) -> Result<bool> {
    match cli.target {
        Target::NullRelay(args) => {
            let listen = loopback_listen(&args.listen)?;
            nullrelay::run(listen)?;
            Ok(true)
        }
        Target::Raw(args) => run_stream(wire::Proto::Raw, &args),
        Target::Nats(args) => run_stream(wire::Proto::Nats, &args),
        Target::Mqtt(args) => run_stream(wire::Proto::Mqtt, &args),
        Target::Apex(args) => {
            let load = &args.load;
            let rate = check_rate(load.rate)?;
            let relay = loopback_addr(&args.relay)?;
            check_domain(&args.domain)?;
            let cpus = load_cpus(load)?;
            let pairs = load.pairs as usize;
            // Absent receivers are no connections to drive.
            let connections = if args.absent_receivers {
                pairs
            } else {
                pairs * 2
            };
            let config = apex::Config {
                relay,
                domain: args.domain.clone(),
                pairs,
                pattern: load.pattern,
                size: check_size(load.size)?,
                depth: apex::depth_for(load.depth as usize, load.size),
                rate,
                warmup: seconds("--warmup", load.warmup, true)?,
                duration: seconds("--duration", load.duration, false)?,
                threads: load
                    .threads
                    .map_or_else(|| default_threads(connections, &cpus), |t| t as usize),
                cpus,
                progress: !load.quiet,
                tls: args.tls.client(&args.domain)?,
                hold: args.hold,
                absent_receivers: args.absent_receivers,
                setters: background_setter(args.sets_per_sec)?,
            };
            let report = apex::run(&config)?;
            finish(&report, load)
        }
        Target::Access(args) => {
            let relay = loopback_addr(&args.relay)?;
            check_domain(&args.domain)?;
            let cpus = match &args.cpus {
                Some(list) => driver::parse_cpus(list)?,
                None => Vec::new(),
            };
            driver::check_cpus(&cpus)?;
            let conns = args.conns as usize;
            let config = apex::Config {
                relay,
                domain: args.domain.clone(),
                pairs: 0,
                pattern: stream::Pattern::Pairs,
                size: payload::MIN_SIZE,
                depth: 1,
                rate: None,
                warmup: seconds("--warmup", args.warmup, true)?,
                duration: seconds("--duration", args.duration, false)?,
                threads: args
                    .threads
                    .map_or_else(|| default_threads(conns, &cpus), |t| t as usize),
                cpus,
                progress: false,
                tls: args.tls.client(&args.domain)?,
                hold: false,
                absent_receivers: false,
                setters: Some(apex::SetterConfig {
                    connections: conns,
                    depth: args.depth as usize,
                    rate: None,
                    background: false,
                }),
            };
            let report = apex::run(&config)?;
            println!("{report}");
            if let Some(path) = &args.json {
                report.write_json(path)?;
            }
            Ok(report.passed())
        }
    }
}

/// Most sets in flight of the background setter: enough to ride out a slow commit at the
/// rates it is meant for (tens per second).
const BACKGROUND_SET_DEPTH: usize = 8;

/// `--sets-per-sec`: the background setter, if any (finite, 0..=10000; 0: none).
fn background_setter(rate: f64) -> Result<Option<apex::SetterConfig>> {
    if !(rate.is_finite() && (0.0..=10_000.0).contains(&rate)) {
        bail!("--sets-per-sec {rate}: want sets per second, 0..=10000");
    }
    Ok((rate > 0.0).then_some(apex::SetterConfig {
        connections: 1,
        depth: BACKGROUND_SET_DEPTH,
        rate: Some(rate),
        background: true,
    }))
}

/// Prints the report and writes the files asked for; returns whether the run passed.
fn finish(report: &stats::Report, load: &LoadArgs) -> Result<bool> {
    println!("{report}");
    if let Some(path) = &load.json {
        report.write_json(path)?;
    }
    if let Some(path) = &load.svg {
        std::fs::write(path, svg::render(report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.passed())
}

fn run_stream(proto: wire::Proto, args: &StreamArgs) -> Result<bool> {
    let load = &args.load;
    let cpus = load_cpus(load)?;
    let rate = check_rate(load.rate)?;
    let tls = args.tls.client("example.com")?;
    if tls.is_some() && proto != wire::Proto::Nats {
        bail!("--tls-ca: TLS is supported for the apex and nats targets only");
    }
    let config = stream::Config {
        tls,
        proto,
        addr: loopback_addr(&args.relay)?,
        pairs: load.pairs as usize,
        size: check_size(load.size)?,
        warmup: seconds("--warmup", load.warmup, true)?,
        duration: seconds("--duration", load.duration, false)?,
        rate,
        pattern: load.pattern,
        window: load.window as usize,
        cpus,
        progress: !load.quiet,
    };
    let report = stream::run(&config)?;
    finish(&report, load)
}

/// The apex load threads when `--threads` is not given: two per CPU the load runs on, at most
/// one per connection.
fn default_threads(connections: usize, cpus: &[usize]) -> usize {
    let cpus = if cpus.is_empty() {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cpus.len()
    };
    (2 * cpus).min(connections).max(1)
}

/// `--cpus`: the CPUs to pin load threads to, each checked to exist (empty: no pinning).
fn load_cpus(load: &LoadArgs) -> Result<Vec<usize>> {
    let cpus = match &load.cpus {
        Some(list) => driver::parse_cpus(list)?,
        None => Vec::new(),
    };
    driver::check_cpus(&cpus)?;
    Ok(cpus)
}

/// `--rate`: messages per second in total, finite and positive.
fn check_rate(rate: Option<f64>) -> Result<Option<f64>> {
    match rate {
        Some(r) if !(r.is_finite() && r > 0.0 && r <= 1e8) => {
            bail!("--rate {r}: want messages per second, > 0")
        }
        r => Ok(r),
    }
}

/// A loopback address to listen on (port 0 picks one).
fn loopback_listen(text: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = text
        .parse()
        .with_context(|| format!("bad address '{text}' (want IP:PORT)"))?;
    if !addr.ip().is_loopback() {
        bail!("refusing to listen on {addr}: loopback only (127.0.0.0/8, ::1)");
    }
    Ok(addr)
}

/// Resolves `text` and insists that every address it names is a loopback one.
fn loopback_addr(text: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .with_context(|| format!("bad address '{text}' (want HOST:PORT)"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("'{text}' resolves to no address");
    };
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "refusing to load {bad}: apex-load only connects to loopback addresses (127.0.0.0/8, ::1)"
        );
    }
    if first.port() == 0 {
        bail!("'{text}' has no port");
    }
    Ok(first)
}

/// Endpoint names are `sndI@DOMAIN`: keep the domain a plain host name.
fn check_domain(domain: &str) -> Result<()> {
    let ok = !domain.is_empty()
        && domain.len() <= 200
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !ok {
        bail!("bad --domain '{domain}': letters, digits, '.' and '-' only");
    }
    Ok(())
}

fn check_size(size: usize) -> Result<usize> {
    if !(payload::MIN_SIZE..=MAX_SIZE).contains(&size) {
        bail!(
            "--size {size} is out of range {}..={MAX_SIZE} (the payload holds a sequence number and a timestamp)",
            payload::MIN_SIZE
        );
    }
    Ok(size)
}

fn seconds(flag: &str, value: f64, zero_ok: bool) -> Result<Duration> {
    let ok = value.is_finite() && value <= 86_400.0 && (value > 0.0 || (zero_ok && value == 0.0));
    if !ok {
        bail!(
            "{flag} {value}: want a number of seconds, {}",
            if zero_ok { ">= 0" } else { "> 0" }
        );
    }
    Ok(Duration::from_secs_f64(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_accepted() {
        assert_eq!(
            loopback_addr("127.0.0.1:913").unwrap(),
            "127.0.0.1:913".parse().unwrap()
        );
        assert!(loopback_addr("127.1.2.3:913").is_ok());
        assert!(loopback_addr("[::1]:913").is_ok());
        for bad in [
            "10.0.0.1:913",
            "192.168.1.1:913",
            "0.0.0.0:913",
            "[::]:913",
            "[::ffff:127.0.0.1]:913",
            "8.8.8.8:53",
            "127.0.0.1",
            "127.0.0.1:0",
        ] {
            assert!(loopback_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments_are_checked() {
        assert!(check_domain("example.com").is_ok());
        assert!(check_domain("a'b").is_err());
        assert!(check_size(128).is_ok());
        assert!(check_size(8).is_err());
        assert!(seconds("--warmup", 0.0, true).is_ok());
        assert!(seconds("--duration", 0.0, false).is_err());
        assert!(seconds("--duration", f64::NAN, false).is_err());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "apex-load",
            "apex",
            "--relay",
            "127.0.0.1:9",
            "--pairs",
            "2",
            "--size",
            "4096",
            "--cpus",
            "1",
        ])
        .unwrap();
        let Target::Apex(a) = cli.target else {
            panic!("not apex");
        };
        assert_eq!((a.load.pairs, a.load.size, a.load.depth), (2, 4096, 1000));
        assert_eq!(default_threads(32, &[1]), 2);
        assert_eq!(default_threads(32, &[0, 1, 2]), 6);
        assert_eq!(default_threads(1, &[0, 1, 2]), 1);
        assert!((1..=32).contains(&default_threads(32, &[])));
        // The same in-flight bound as the nats and mqtt senders: 1000 messages or 256 KiB.
        assert_eq!(apex::depth_for(1000, 4096), 64);
        assert_eq!(apex::depth_for(1000, 128), 1000);
        assert_eq!(apex::depth_for(5, 128), 5);
        assert_eq!(apex::depth_for(1000, 1 << 20), 1);
        assert!(
            Cli::try_parse_from(["apex-load", "apex", "--relay", "x", "--depth", "0"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "apex-load",
            "nats",
            "--server",
            "127.0.0.1:4222",
            "--rate",
            "50000",
            "--pattern",
            "fan-out",
            "--svg",
            "/tmp/x.svg",
        ])
        .unwrap();
        let Target::Nats(a) = cli.target else {
            panic!("not nats");
        };
        assert_eq!(a.load.pattern, stream::Pattern::FanOut);
        assert_eq!(a.load.rate, Some(50_000.0));
        assert!(
            Cli::try_parse_from(["apex-load", "null-relay", "--listen", "127.0.0.1:0"]).is_ok()
        );
        assert!(loopback_listen("127.0.0.1:0").is_ok());
        let cli = Cli::try_parse_from([
            "apex-load",
            "apex",
            "--relay",
            "127.0.0.1:9",
            "--tls-ca",
            "/tmp/ca.pem",
            "--tls-name",
            "relay.example.com",
        ])
        .unwrap();
        let Target::Apex(a) = cli.target else {
            panic!("not apex");
        };
        assert_eq!(a.tls.tls_ca, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(a.tls.tls_name.as_deref(), Some("relay.example.com"));
        let no_ca = TlsArgs {
            tls_ca: None,
            tls_name: Some("example.com".into()),
        };
        assert!(no_ca.client("example.com").is_err());
        assert!(loopback_listen("0.0.0.0:1").is_err());
    }

    #[test]
    fn apex_hold_absent_receivers_and_sets() {
        let cli = Cli::try_parse_from(["apex-load", "apex", "--relay", "127.0.0.1:9"]).unwrap();
        let Target::Apex(a) = cli.target else {
            panic!("not apex");
        };
        assert!(!a.hold && !a.absent_receivers);
        assert_eq!(a.sets_per_sec, 0.0);
        assert!(background_setter(a.sets_per_sec).unwrap().is_none());
        let cli = Cli::try_parse_from([
            "apex-load",
            "apex",
            "--relay",
            "127.0.0.1:9",
            "--hold",
            "--absent-receivers",
            "--sets-per-sec",
            "10",
            "--rate",
            "500",
        ])
        .unwrap();
        let Target::Apex(a) = cli.target else {
            panic!("not apex");
        };
        assert!(a.hold && a.absent_receivers);
        let setter = background_setter(a.sets_per_sec).unwrap().unwrap();
        assert_eq!(
            (setter.connections, setter.rate, setter.background),
            (1, Some(10.0), true)
        );
        assert!(setter.depth >= 1);
        for bad in [-1.0, f64::NAN, f64::INFINITY, 10_001.0] {
            assert!(background_setter(bad).is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from([
            "apex-load",
            "apex",
            "--relay",
            "127.0.0.1:9",
            "--sets-per-sec",
            "ten"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["apex-load", "apex", "--relay", "x", "--hold", "yes"]).is_err()
        );
    }

    #[test]
    fn access_arguments() {
        let cli = Cli::try_parse_from(["apex-load", "access", "--relay", "127.0.0.1:9"]).unwrap();
        let Target::Access(a) = cli.target else {
            panic!("not access");
        };
        assert_eq!((a.conns, a.depth), (4, 1));
        assert_eq!((a.duration, a.warmup), (5.0, 1.0));
        assert_eq!(a.domain, "example.com");
        let cli = Cli::try_parse_from([
            "apex-load",
            "access",
            "--relay",
            "127.0.0.1:9",
            "--conns",
            "8",
            "--depth",
            "200",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--cpus",
            "0",
            "--json",
            "/tmp/a.json",
        ])
        .unwrap();
        let Target::Access(a) = cli.target else {
            panic!("not access");
        };
        assert_eq!((a.conns, a.depth), (8, 200));
        assert_eq!(a.json, Some(PathBuf::from("/tmp/a.json")));
        // Each setter stays under the relay's 256 entries per owner: at most 200 in flight.
        for bad in [
            ["--depth", "0"],
            ["--depth", "201"],
            ["--conns", "0"],
            ["--conns", "1025"],
        ] {
            let args = [
                "apex-load",
                "access",
                "--relay",
                "127.0.0.1:9",
                bad[0],
                bad[1],
            ];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        // Pair options are not access options.
        assert!(Cli::try_parse_from([
            "apex-load",
            "access",
            "--relay",
            "127.0.0.1:9",
            "--pairs",
            "2"
        ])
        .is_err());
    }
}
