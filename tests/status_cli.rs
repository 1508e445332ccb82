#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `apex` binary's `status`, `endpoints` and `links` against a canned monitoring
//! endpoint on loopback: what a person sees, the exit status, and the failures (no endpoint,
//! a 503, bad JSON, an oversized answer).

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest the binary or the canned server may take before the test gives up on it.
const LIMIT: Duration = Duration::from_secs(20);

/// A loopback HTTP server answering one connection per canned response, in order, and
/// returning the request lines it saw; it gives up after `LIMIT` without a client.
fn serve(responses: Vec<Vec<u8>>) -> (SocketAddr, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = Instant::now() + LIMIT;
        for response in responses {
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("no client for the canned server: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(LIMIT)).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            seen.push(request_line.trim_end().to_owned());
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

fn response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What one run of `apex` printed, and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `apex ARGS` with `APEX_METRICS` as given (unset when None), killing it past `LIMIT`.
fn apex(args: &[&str], env_metrics: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex"));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match env_metrics {
        Some(addr) => command.env("APEX_METRICS", addr),
        None => command.env_remove("APEX_METRICS"),
    };
    let mut child = command.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("apex {args:?} did not exit within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn shard(n: &str, up: bool, messages_in: u64) -> String {
    format!(
        r#"{{"shard": {n}, "up": {up},
          "sessions": {{"edge": 3, "mesh": 1, "link": 0}},
          "sessions_by_state": {{"greeting": 0, "open": 3, "closing": 1}},
          "endpoints": 2, "relays_bound": 0,
          "links": {{"connecting": 0, "open": 1, "backoff": 0, "closing": 0}},
          "messages_in": {messages_in}, "messages_out": {}, "octets_in": 1000, "octets_out": 2000,
          "data_accepted": {}, "data_delivered": 5, "data_held": 0, "held_now": 0,
          "queued_octets": 0}}"#,
        messages_in + 2,
        messages_in / 10,
    )
}

fn status_doc(uptime: f64, messages_in: u64) -> String {
    format!(
        r#"{{"version": "0.1.0", "domain": "example.com",
          "started_at": "2026-12-06T05:00:00.000Z", "uptime_seconds": {uptime},
          "config_digest": "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
          "edge_listen": "127.0.0.1:9913", "mesh_listen": "127.0.0.1:9912", "ready": false,
          "shards": [{}, {{"shard": 1, "up": false}}], "total": {}}}"#,
        shard("0", true, messages_in),
        shard("null", false, messages_in),
    )
}

#[test]
fn status_prints_rates_between_two_reads_and_a_down_shard() {
    let (addr, server) = serve(vec![
        response("200 OK", &status_doc(12.5, 100)),
        response("200 OK", &status_doc(13.5, 350)),
    ]);
    let addr = addr.to_string();
    let run = apex(
        &[
            "status",
            "--metrics",
            &addr,
            "--interval",
            "0.05",
            "--timeout",
            "5",
        ],
        None,
    );
    assert_eq!(server.join().unwrap(), ["GET /status HTTP/1.1"; 2]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "\
example.com  apexd 0.1.0  up 13s  NOT READY  config sha256:9f86d081884c
edge 127.0.0.1:9913  mesh 127.0.0.1:9912  rates over 1.0s

SHARD  STATE    EDGE  MESH  LINK  ENDPOINTS  BOUND  LINKS  MSG_IN/S  MSG_OUT/S  ACCEPTED/S  DELIVERED/S  HELD  QUEUED
0      up          3     1     0          2      0      1     250.0      250.0        25.0          0.0     0     0 B
1      down
total  partial     3     1     0          2      0      1         -          -           -            -     0     0 B
"
    );
}

#[test]
fn status_with_interval_zero_reads_once_from_apex_metrics() {
    let (addr, server) = serve(vec![response("200 OK", &status_doc(3725.0, 100))]);
    let run = apex(&["status", "--interval", "0"], Some(&addr.to_string()));
    assert_eq!(server.join().unwrap(), ["GET /status HTTP/1.1"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let mut lines = run.stdout.lines();
    assert!(
        lines.next().unwrap().contains("up 1h 02m"),
        "{}",
        run.stdout
    );
    assert!(lines.next().unwrap().ends_with("no rates (--interval 0)"));
}

#[test]
fn endpoints_and_links_print_tables() {
    let endpoints = r#"{"total": 1002, "endpoints": [
        {"endpoint": "fred@example.com", "shard": 0, "conn": 3, "channel": 1},
        {"endpoint": "wilma@example.com", "shard": 1, "conn": 40, "channel": 1}]}"#;
    let links = r#"{"links": [{"domain": "rubble.com", "shard": 1, "state": "open", "queued": 0}],
                    "bound": [{"domain": "rubble.com", "shard": 0, "conn": 5}]}"#;
    let (addr, server) = serve(vec![
        response("200 OK", endpoints),
        response("200 OK", links),
    ]);
    let addr = addr.to_string();
    let run = apex(&["endpoints", "--metrics", &addr, "--limit", "2"], None);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "\
ENDPOINT           SHARD  CONN  CHANNEL
fred@example.com       0     3        1
wilma@example.com      1    40        1
1000 more (1002 attached; --limit 2 listed 2)
"
    );
    let run = apex(&["links", "--metrics", &addr], None);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "\
OUTBOUND LINKS (1)
DOMAIN      SHARD  STATE  QUEUED
rubble.com      1  open        0

BOUND RELAYS (1)
DOMAIN      SHARD  CONN
rubble.com      0     5
"
    );
    assert_eq!(
        server.join().unwrap(),
        [
            "GET /status/endpoints?limit=2 HTTP/1.1",
            "GET /status/links HTTP/1.1"
        ]
    );
}

#[test]
fn json_prints_the_document_pretty() {
    let links = r#"{"links":[],"bound":[],"note":"x"}"#;
    let (addr, server) = serve(vec![response("200 OK", links)]);
    let run = apex(&["links", "--json", "--metrics", &addr.to_string()], None);
    server.join().unwrap();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "{\n  \"links\": [],\n  \"bound\": [],\n  \"note\": \"x\"\n}\n"
    );
}

#[test]
fn no_monitoring_endpoint_is_named_with_the_flag_that_starts_one() {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let run = apex(&["status", "--metrics", &addr], None);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.stderr,
        format!(
            "error: no monitoring endpoint at {addr} (start apexd with --metrics-listen {addr})\n"
        )
    );
}

#[test]
fn a_503_bad_json_and_an_oversized_answer_fail_clearly() {
    let big = format!(
        r#"{{"links": [], "bound": [], "pad": "{}"}}"#,
        "x".repeat(2048)
    );
    let (addr, server) = serve(vec![
        response("503 Service Unavailable", "shard 1 not answering\n"),
        response("200 OK", "<html>not json</html>"),
        response("200 OK", &big),
    ]);
    let addr = addr.to_string();

    let run = apex(&["links", "--metrics", &addr], None);
    assert_eq!(run.code, Some(1));
    assert_eq!(
        run.stderr,
        format!("error: GET /status/links from {addr}: 503 Service Unavailable: shard 1 not answering\n")
    );

    let run = apex(&["links", "--metrics", &addr], None);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.starts_with(&format!(
            "error: GET /status/links from {addr}: not the expected JSON document: "
        )),
        "{}",
        run.stderr
    );

    let run = apex(
        &["links", "--metrics", &addr, "--max-response", "1024"],
        None,
    );
    assert_eq!(run.code, Some(1));
    assert_eq!(
        run.stderr,
        format!("error: GET /status/links from {addr}: the answer is larger than 1024 bytes (--max-response)\n")
    );
    assert_eq!(run.stdout, "");
    assert_eq!(server.join().unwrap().len(), 3);
}
