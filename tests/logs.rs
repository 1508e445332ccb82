//! apexd's log lines, read from the real binary's standard error: `--log-format json` writes
//! one JSON object per line and text does not; every session's end line says who the peer was
//! and what went through it; and a peer that keeps sending garbage gets a handful of warnings
//! and a summary, while a healthy client on the same relay is served throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use apex_proto::apex::client::DataBuilder;
use common::{Client, Relay, ScratchDir};

/// The lines of `path` once one satisfies `done` (panics after 10 s).
fn lines_once(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(&done) {
            return text.lines().map(str::to_owned).collect();
        }
        assert!(Instant::now() < deadline, "no {what} in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Attaches as fred, sends himself `n` notes and releases the session.
fn fred_sends_himself(relay: &Relay, n: usize) {
    let mut fred = Client::connect(relay.edge);
    fred.greet();
    let (channel, reply) = fred.attach("fred@example.com");
    assert!(reply.contains("<ok"), "{reply}");
    for i in 0..n {
        let note = DataBuilder::new("fred@example.com")
            .to("fred@example.com")
            .text(&format!("note {i}"));
        let (positive, reply) = fred.request(channel, note);
        assert!(positive, "{reply:?}");
        fred.receive();
    }
    fred.release();
}

#[test]
fn json_lines_parse_and_the_session_end_line_has_identity_and_counts() {
    const N: usize = 5;
    let scratch = ScratchDir::new("logs-json");
    let stderr = scratch.path.join("stderr");
    let mut relay = Relay::start_logging(
        &[
            "--shards",
            "2",
            "--domain",
            "example.com",
            "--log",
            "info",
            "--log-format",
            "json",
        ],
        &stderr,
    );
    fred_sends_himself(&relay, N);
    let is_end = |line: &str| line.contains("session ended");
    lines_once(&stderr, "session end line", is_end);
    assert!(relay.terminate().success());

    let text = std::fs::read_to_string(&stderr).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for line in &lines {
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(line.get(key).is_some(), "no {key} in {line}");
        }
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    let session = |message: &str| {
        lines
            .iter()
            .filter(|l| l["target"] == "apexd::session" && l["fields"]["message"] == message)
            .map(|l| &l["fields"])
            .collect::<Vec<_>>()
    };
    let started = session("session started");
    assert_eq!(started.len(), 1, "{text}");
    assert_eq!(started[0]["port"], "edge");
    assert!(started[0]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let ended = session("session ended");
    assert_eq!(ended.len(), 1, "{text}");
    let end = ended[0];
    assert_eq!(end["conn"], started[0]["conn"]);
    assert_eq!(end["shard"], started[0]["shard"]);
    assert_eq!(end["port"], "edge");
    assert_eq!(end["attached"], "fred@example.com");
    assert_eq!(end["ending"], "released");
    // Fred's notes and the replies to the relay's deliveries of them, each way.
    for field in ["msgs_in", "msgs_out"] {
        assert!(
            end[field].as_u64().unwrap() >= 2 * N as u64,
            "{field}: {end}"
        );
    }
    for field in ["octets_in", "octets_out"] {
        assert!(end[field].as_u64().unwrap() > 0, "{field}: {end}");
    }
    assert!(end["duration_ms"].is_u64(), "{end}");
}

#[test]
fn text_lines_are_not_json() {
    let scratch = ScratchDir::new("logs-text");
    let stderr = scratch.path.join("stderr");
    let mut relay = Relay::start_logging(
        &["--shards", "1", "--domain", "example.com", "--log", "info"],
        &stderr,
    );
    fred_sends_himself(&relay, 1);
    let lines = lines_once(&stderr, "session end line", |l| l.contains("session ended"));
    assert!(relay.terminate().success());
    assert!(lines.len() >= 3);
    for line in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_err(),
            "a JSON line in text format: {line}"
        );
    }
    let end = lines.iter().find(|l| l.contains("session ended")).unwrap();
    // Plain text: no colour codes in a file.
    assert!(!end.contains('\u{1b}'), "{end}");
    for field in [
        "attached=\"fred@example.com\"",
        "ending=\"released\"",
        "port=\"edge\"",
    ] {
        assert!(end.contains(field), "no {field} in {end}");
    }
}

/// A connection that greets with garbage: the relay aborts it (RFC 3080 §2.2.1.1). Waits
/// until the relay has closed it.
fn garbage_session(relay: &Relay) {
    let mut stream = TcpStream::connect(relay.edge).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(b"GARBAGE garbage garbage\r\n");
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    panic!("the relay did not close a garbage session");
}

#[test]
fn a_peer_sending_garbage_gets_a_few_warnings_and_a_summary() {
    const SESSIONS: usize = 200;
    let scratch = ScratchDir::new("logs-flood");
    let stderr = scratch.path.join("stderr");
    let config = scratch.path.join("apexd.toml");
    // A short interval, so that the summary comes within the test.
    std::fs::write(&config, "[warnings]\nburst = 3\ninterval_ms = 1500\n").unwrap();
    let mut relay = Relay::start_logging(
        &[
            "--shards",
            "1",
            "--domain",
            "example.com",
            "--log",
            "warn",
            "--config",
            config.to_str().unwrap(),
        ],
        &stderr,
    );
    let mut wilma = Client::connect(relay.edge);
    wilma.greet();
    let (channel, reply) = wilma.attach("wilma@example.com");
    assert!(reply.contains("<ok"), "{reply}");
    let flood_started = Instant::now();
    let mut delivered = 0;
    for i in 0..SESSIONS {
        garbage_session(&relay);
        if i % 20 == 0 {
            let note = DataBuilder::new("wilma@example.com")
                .to("wilma@example.com")
                .text(&format!("still here {i}"));
            let (positive, reply) = wilma.request(channel, note);
            assert!(positive, "{reply:?}");
            let got = wilma.receive();
            let got = String::from_utf8_lossy(&got);
            assert!(got.contains(&format!("still here {i}")), "{got}");
            delivered += 1;
        }
    }
    let flood_took = flood_started.elapsed();
    assert_eq!(delivered, SESSIONS / 20);
    let lines = lines_once(&stderr, "suppression summary", |l| {
        l.contains("similar warnings from 127.0.0.1")
    });
    let terminating = lines
        .iter()
        .filter(|l| l.contains("terminating session"))
        .count();
    // The burst, plus one per interval the flood lasted.
    let intervals = (flood_took.as_millis() / 1500) as usize;
    assert!(terminating >= 1, "{lines:#?}");
    assert!(
        terminating <= 3 + intervals + 1,
        "{terminating} warnings in {flood_took:?}: {lines:#?}"
    );
    let warnings = lines.iter().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 2 * (3 + intervals + 1), "{lines:#?}");
    let suppressed: u64 = lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("suppressed ")? + "suppressed ".len()..];
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    assert!(
        suppressed as usize + terminating <= SESSIONS && suppressed > 0,
        "{suppressed} suppressed: {lines:#?}"
    );
    // Wilma's session is untouched: it releases cleanly.
    wilma.release();
    assert!(relay.terminate().success());
}
