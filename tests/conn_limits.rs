//! Issue 19 items 9 and 11 against the real binary over loopback: connections that never
//! greet, greet one octet at a time, stop half-way, greet and then sit idle, or come by the
//! dozen from one address are closed or refused with byte-exact BEEP frames (RFC 3080 §2.4,
//! §2.3.1.5; BEEP-18, BEEP-19), accepted sockets have TCP keepalive, and a relay out of file
//! descriptors answers every connection (a greeting or ERR 421) instead of leaving it hanging;
//! in each case a healthy pair attaches and exchanges data alongside.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{http_get, metric_sum, Client, Relay};

/// The relay's greeting (RFC 3080 §2.3.1.1).
const RELAY_GREETING: &str = "RPY 0 0 . 0 111\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

/// The relay asks to release the session with 421 (RFC 3080 §2.4, §8).
const CLOSE_421: &str = "MSG 0 1 . 111 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='0' code='421' />\r\nEND\r\n";

/// A client's greeting, 52 octets of payload.
const CLIENT_GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

/// The relay's window update for that greeting.
const SEQ_AFTER_GREETING: &str = "SEQ 0 52 262144\r\n";

/// BEEP-18: a listener's ERR instead of its greeting, with `text`.
fn refusal(text: &str) -> String {
    let payload =
        format!("Content-Type: application/beep+xml\r\n\r\n<error code='421'>{text}</error>\r\n");
    format!("ERR 0 0 . 0 {}\r\n{payload}END\r\n", payload.len())
}

/// A relay for example.com on `shards` with `toml` as its configuration file and the
/// monitoring endpoint on.
fn relay_configured(shards: usize, toml: &str) -> Relay {
    let state = common::ScratchDir::new("conn-limits-config");
    let config = format!("{}/relay.toml", state.as_str());
    std::fs::write(&config, toml).unwrap();
    Relay::start_with(&[
        "--shards",
        &shards.to_string(),
        "--domain",
        "example.com",
        "--config",
        &config,
        "--metrics-listen",
        "127.0.0.1:0",
    ])
}

/// fred and barney attached, each on a session of its own.
struct Pair {
    fred: Client,
    channel: u32,
    barney: Client,
    sent: usize,
}

impl Pair {
    fn attach(relay: SocketAddr) -> Pair {
        let mut barney = Client::connect(relay);
        barney.greet();
        assert_eq!(barney.attach("barney@example.com").1, "<ok />");
        let mut fred = Client::connect(relay);
        fred.greet();
        let (channel, reply) = fred.attach("fred@example.com");
        assert_eq!(reply, "<ok />");
        Pair {
            fred,
            channel,
            barney,
            sent: 0,
        }
    }

    /// fred sends barney one message, and barney gets it.
    fn exchange(&mut self) {
        self.sent += 1;
        let content = format!("message {}", self.sent);
        let data = format!("Content-Type: application/beep+xml\r\n\r\n<data content='#C'><originator identity='fred@example.com' /><recipient identity='barney@example.com' /><data-content Name='C'>{content}</data-content></data>");
        let (positive, reply) = self.fred.request(self.channel, Bytes::from(data));
        assert!(positive, "{}", String::from_utf8_lossy(&reply));
        let got = self.barney.receive();
        assert!(String::from_utf8_lossy(&got).contains(&content));
    }
}

/// A plain TCP connection to `addr` from `source` (a loopback address).
fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    stream
}

/// Reads what arrived on `stream` without waiting long; `true` once the relay closed it.
fn read_some(stream: &mut TcpStream, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => {
            into.extend_from_slice(&buf[..n]);
            false
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(_) => true,
    }
}

fn metric(relay: &Relay, series: &str) -> f64 {
    let (status, text) = http_get(relay.metrics.unwrap(), "/metrics");
    assert_eq!(status, 200);
    metric_sum(&text, series)
}

/// A relay whose peers have 1 s to greet: ten silent connections, ten that stop half-way
/// through their greeting and ten that send it one octet every 100 ms are all sent the close
/// and closed after about 1 s, while fred and barney exchange data throughout.
#[test]
fn issue_19_9_silent_half_and_slow_greetings_are_closed_at_the_greeting_timeout() {
    let relay = relay_configured(
        2,
        "[runtime]\ngreeting_timeout_ms = 1000\nidle_timeout_ms = 0\n",
    );
    let mut pair = Pair::attach(relay.edge);
    let opened = Instant::now();
    let mut bad: Vec<(TcpStream, &str, Vec<u8>, bool)> = Vec::new();
    for kind in ["silent", "half", "slow"] {
        for _ in 0..10 {
            let mut stream = connect_from("127.0.0.1", relay.edge);
            if kind == "half" {
                stream.write_all(&CLIENT_GREETING[..40]).unwrap();
            }
            bad.push((stream, kind, Vec::new(), false));
        }
    }
    let mut octet = 0;
    while bad.iter().any(|(_, _, _, closed)| !closed) {
        assert!(
            opened.elapsed() < Duration::from_secs(8),
            "still open after 8 s"
        );
        for (stream, kind, got, closed) in &mut bad {
            if *closed {
                continue;
            }
            if *kind == "slow" && octet < CLIENT_GREETING.len() {
                let _ = stream.write_all(&CLIENT_GREETING[octet..=octet]);
            }
            *closed = read_some(stream, got);
        }
        octet += 1;
        pair.exchange();
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = opened.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    for (_, kind, got, _) in &bad {
        assert_eq!(
            String::from_utf8_lossy(got),
            format!("{RELAY_GREETING}{CLOSE_421}"),
            "{kind}"
        );
    }
    pair.exchange();
    assert_eq!(
        metric(&relay, "apexd_sessions_timed_out_total"),
        30.0,
        "every one of them, counted as a greeting timeout"
    );
}

/// A session greeted and left without a channel for the idle limit is asked to release the
/// session: a client that agrees is closed at once, one that never answers after
/// `release_timeout_ms`; the attached pair is not touched.
#[test]
fn issue_19_9_idle_sessions_are_released_and_attached_ones_stay() {
    let relay = relay_configured(
        1,
        "[runtime]\nidle_timeout_ms = 1000\nrelease_timeout_ms = 500\n",
    );
    let mut pair = Pair::attach(relay.edge);
    let mut polite = Client::connect(relay.edge);
    polite.greet();
    let mut mute = connect_from("127.0.0.1", relay.edge);
    mute.write_all(CLIENT_GREETING).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut mute_closed_after = None;
    while mute_closed_after.is_none() || !polite.eof {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "still open after 8 s"
        );
        if mute_closed_after.is_none() && read_some(&mut mute, &mut got) {
            mute_closed_after = Some(started.elapsed());
        }
        polite.pump();
        pair.exchange();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        polite.events.contains(&apex_proto::Event::SessionReleased),
        "released by agreement (BEEP-32)"
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("{RELAY_GREETING}{SEQ_AFTER_GREETING}{CLOSE_421}")
    );
    let mute_after = mute_closed_after.unwrap();
    assert!(
        mute_after >= Duration::from_millis(1400),
        "the mute one had release_timeout_ms to answer: closed after {mute_after:?}"
    );
    // Attached long past the idle limit, the pair still exchanges data.
    pair.exchange();
    assert_eq!(metric(&relay, "apexd_sessions_timed_out_total"), 2.0);
}

/// One address holding `max_connections_per_address` connections gets ERR 421 for the next
/// (BEEP-18) and the others stay greeted; another address's pair attaches and exchanges data.
#[test]
fn issue_19_9_one_address_past_its_bound_is_refused_and_others_are_served() {
    let relay = relay_configured(1, "[runtime]\nmax_connections_per_address = 3\n");
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| connect_from("127.0.0.2", relay.edge))
        .collect();
    for stream in &mut held {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < RELAY_GREETING.len() && Instant::now() < deadline {
            assert!(!read_some(stream, &mut got), "closed");
        }
        assert_eq!(String::from_utf8_lossy(&got), RELAY_GREETING);
    }
    let mut extra = Vec::new();
    for _ in 0..20 {
        let mut stream = connect_from("127.0.0.2", relay.edge);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !read_some(&mut stream, &mut got) {
            assert!(Instant::now() < deadline, "no refusal within 5 s");
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            refusal("too many connections from this address")
        );
        extra.push(stream);
    }
    let mut pair = Pair::attach(relay.edge);
    pair.exchange();
    // One of the three goes: its address may connect again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = connect_from("127.0.0.2", relay.edge);
        let mut got = Vec::new();
        let wait = Instant::now() + Duration::from_secs(5);
        while got.len() < RELAY_GREETING.len() && Instant::now() < wait {
            if read_some(&mut stream, &mut got) {
                break;
            }
        }
        if String::from_utf8_lossy(&got) == RELAY_GREETING {
            break;
        }
        // The relay may not have seen the close yet.
        assert!(Instant::now() < deadline, "not greeted again: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    pair.exchange();
    assert!(metric(&relay, "apexd_connections_refused_total") >= 20.0);
}

/// The relay's side of every accepted connection has its keepalive timer running (the kernel
/// reports timer 2, keepalive, for it in /proc/net/tcp), so a vanished peer is found.
#[test]
fn issue_19_9_accepted_connections_have_tcp_keepalive() {
    let relay = relay_configured(1, "[runtime]\ntcp_keepalive_ms = 5000\n");
    let mut pair = Pair::attach(relay.edge);
    pair.exchange();
    let client_port = pair.fred.stream.local_addr().unwrap().port();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let hex = |port: u16| format!("{port:04X}");
    let line = table
        .lines()
        .find(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 5
                && fields[1].ends_with(&format!(":{}", hex(relay.edge.port())))
                && fields[2].ends_with(&format!(":{}", hex(client_port)))
        })
        .unwrap_or_else(|| {
            panic!("the relay's side of port {client_port} is not in /proc/net/tcp")
        });
    let timer = line.split_whitespace().nth(5).unwrap();
    assert!(timer.starts_with("02:"), "timer {timer}: {line}");
}

/// Under `ulimit -n 64` the relay answers a hundred connections at once: each gets a greeting
/// or ERR 421 (BEEP-19: no room for the session), none hangs; the accept failures are counted
/// and, once the connections go, a pair attaches and exchanges data.
#[test]
fn issue_19_11_out_of_descriptors_every_connection_gets_an_answer() {
    let state = common::ScratchDir::new("conn-limits-fd");
    let config = format!("{}/relay.toml", state.as_str());
    std::fs::write(
        &config,
        "[runtime]\nmax_connections_per_address = 0\naccept_backoff_max_ms = 200\n",
    )
    .unwrap();
    let relay = Relay::start_with_nofile(
        64,
        &[
            "--shards",
            "1",
            "--domain",
            "example.com",
            "--config",
            &config,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let mut streams: Vec<(TcpStream, Vec<u8>, bool)> = (0..100)
        .map(|_| (connect_from("127.0.0.1", relay.edge), Vec::new(), false))
        .collect();
    let refused_text = refusal("no file descriptor to spare");
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered =
        |got: &[u8]| got.starts_with(RELAY_GREETING.as_bytes()) || got == refused_text.as_bytes();
    while !streams.iter().all(|(_, got, _)| answered(got)) {
        assert!(
            Instant::now() < deadline,
            "{} of 100 have no answer after 10 s",
            streams.iter().filter(|(_, got, _)| !answered(got)).count()
        );
        for (stream, got, closed) in &mut streams {
            if !*closed {
                *closed = read_some(stream, got);
            }
        }
    }
    let refused = streams
        .iter()
        .filter(|(_, got, _)| got == refused_text.as_bytes())
        .count();
    assert!(refused > 0, "64 descriptors cannot hold 100 connections");
    // A refused connection is closed after its ERR.
    for (stream, got, closed) in &mut streams {
        let wait = Instant::now() + Duration::from_secs(5);
        while got == refused_text.as_bytes() && !*closed {
            assert!(Instant::now() < wait, "a refused connection stays open");
            *closed = read_some(stream, got);
        }
    }
    drop(streams);
    // The descriptors come back: the relay serves again. A probe sent before they all came back
    // may be refused too, and the relay counts it.
    let mut refused_probes = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pair = loop {
        let mut probe = connect_from("127.0.0.1", relay.edge);
        let mut got = Vec::new();
        let wait = Instant::now() + Duration::from_secs(2);
        while got.len() < RELAY_GREETING.len() && Instant::now() < wait {
            if read_some(&mut probe, &mut got) {
                break;
            }
        }
        if got == RELAY_GREETING.as_bytes() {
            drop(probe);
            break Pair::attach(relay.edge);
        }
        if got == refused_text.as_bytes() {
            refused_probes += 1;
        }
        assert!(Instant::now() < deadline, "not served again: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    pair.exchange();
    assert!(metric(&relay, "apexd_accept_failures_total") >= 1.0);
    assert_eq!(
        metric(&relay, "apexd_connections_refused_total"),
        (refused + refused_probes) as f64
    );
}
