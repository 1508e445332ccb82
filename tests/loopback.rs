//! Loopback integration tests against the real `apexd` binary with 1 and 2 shards: greeting,
//! start, close, release, malformed input closing only its own session, a byte-at-a-time client,
//! the independent RFC client (tests/interop/beep_client.py), and shutdown by signal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use apex_proto::Event;
use bytes::Bytes;
use common::{Client, Relay};

/// The listener's greeting offering APEX, byte for byte (BEEP-17; RFC 3080 §2.3.1.1): payload 111.
const GREETING: &[u8] = b"RPY 0 0 . 0 111\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

fn read_exact_with_timeout(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn greeting_is_byte_exact(shards: usize) {
    let relay = Relay::start(shards);
    let mut stream = TcpStream::connect(relay.edge).unwrap();
    assert_eq!(
        read_exact_with_timeout(&mut stream, GREETING.len()),
        GREETING
    );
    let mut stream = TcpStream::connect(relay.mesh).unwrap();
    assert_eq!(
        read_exact_with_timeout(&mut stream, GREETING.len()),
        GREETING
    );
}

#[test]
fn beep_17_greeting_1_shard() {
    greeting_is_byte_exact(1);
}

#[test]
fn beep_17_greeting_2_shards() {
    greeting_is_byte_exact(2);
}

fn start_message_close(shards: usize) {
    let relay = Relay::start_with(&["--shards", &shards.to_string(), "--domain", "example.com"]);
    let mut client = Client::connect(relay.edge);
    client.greet();
    let channel = client.start_apex();
    assert_eq!(channel, 1);
    // An attach as a MSG on the channel (APEX-15), answered `ok`.
    let msgno = client
        .session
        .send_msg(channel, Bytes::from_static(b"Content-Type: application/beep+xml\r\n\r\n<attach endpoint='fred@example.com' transID='1' />"))
        .unwrap();
    client.pump_until("reply", |c| {
        c.events
            .iter()
            .any(|e| matches!(e, Event::Reply { msgno: m, .. } if *m == msgno))
    });
    let reply = client.events.iter().find_map(|e| match e {
        Event::Reply { payload, .. } => Some(payload.clone()),
        _ => None,
    });
    assert_eq!(
        &reply.unwrap()[..],
        &b"Content-Type: application/beep+xml\r\n\r\n<ok />\r\n"[..]
    );
    client.session.close_channel(channel, 200).unwrap();
    client.pump_until("channel close", |c| {
        c.events
            .iter()
            .any(|e| matches!(e, Event::ChannelClosed { channel: 1, .. }))
    });
    client.release();
}

/// A frame completed by one octet that arrives on its own, after a large burst of input: the
/// relay must handle it then, not wait for more (a read after a large burst fetches a single
/// octet before receiving the rest in place, and the rest may be nothing), nor drop it when the
/// peer ends its output right after it (`half_close`).
fn last_octet_alone_after_a_large_burst(shards: usize, half_close: bool) {
    let relay = Relay::start_with(&["--shards", &shards.to_string(), "--domain", "example.com"]);
    let mut client = Client::connect(relay.edge);
    client.greet();
    let channel = client.start_apex();
    // Six MSGs of 32 KiB (within the relay's 256 KiB window), then a small one.
    let mut msgnos = Vec::new();
    for _ in 0..6 {
        let big = format!(
            "Content-Type: application/beep+xml\r\n\r\n<bulk>{}</bulk>",
            "a".repeat(32 * 1024)
        );
        msgnos.push(client.session.send_msg(channel, Bytes::from(big)).unwrap());
    }
    let small = Bytes::from_static(
        b"Content-Type: application/beep+xml\r\n\r\n<attach endpoint='fred@example.com' transID='7' />",
    );
    let last = client.session.send_msg(channel, small).unwrap();
    let mut wire = bytes::BytesMut::new();
    while client.session.poll_transmit(&mut wire) > 0 {}
    let (burst, final_octet) = wire.split_at(wire.len() - 1);
    client.stream.set_write_timeout(None).unwrap();
    client.stream.write_all(burst).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    client.stream.write_all(final_octet).unwrap();
    if half_close {
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    client.pump_until("the replies to every MSG", |c| {
        msgnos.iter().chain([&last]).all(|&msgno| {
            c.events
                .iter()
                .any(|e| matches!(e, Event::Reply { msgno: m, .. } if *m == msgno))
        })
    });
    let reply = client.events.iter().find_map(|e| match e {
        Event::Reply { msgno, payload, .. } if *msgno == last => Some(payload.clone()),
        _ => None,
    });
    assert_eq!(
        &reply.unwrap()[..],
        &b"Content-Type: application/beep+xml\r\n\r\n<ok />\r\n"[..]
    );
}

#[test]
fn last_octet_alone_after_a_large_burst_1_shard() {
    last_octet_alone_after_a_large_burst(1, false);
}

#[test]
fn last_octet_alone_after_a_large_burst_2_shards() {
    last_octet_alone_after_a_large_burst(2, false);
}

#[test]
fn last_octet_alone_then_end_of_input_after_a_large_burst() {
    last_octet_alone_after_a_large_burst(1, true);
}

#[test]
fn start_message_close_release_1_shard() {
    start_message_close(1);
}

#[test]
fn start_message_close_release_2_shards() {
    start_message_close(2);
}

fn malformed_closes_only_that_session(shards: usize) {
    let relay = Relay::start(shards);
    // Several bystanders so that, with two shards, some share the offender's shard.
    let mut bystanders: Vec<Client> = (0..6).map(|_| Client::connect(relay.edge)).collect();
    for c in &mut bystanders {
        c.greet();
    }
    let mut bad = TcpStream::connect(relay.edge).unwrap();
    read_exact_with_timeout(&mut bad, GREETING.len());
    // A valid initiator greeting, then a MSG whose trailer is wrong (P12, BEEP-10).
    bad.write_all(
        b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n",
    )
    .unwrap();
    bad.write_all(b"MSG 0 1 . 52 5\r\nhelloXXXXX").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let outcome = bad.read_to_end(&mut rest);
    // Terminated without a reply: at most SEQ frames, then a reset (RFC 3081 §2).
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("RPY") && !text.contains("ERR") && !text.contains("MSG"),
        "{text}"
    );
    match outcome {
        Ok(_) => {}
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "connection must end"
        ),
    }
    for c in &mut bystanders {
        let channel = c.start_apex();
        c.session.close_channel(channel, 200).unwrap();
        c.pump_until("close", |c| {
            c.events
                .iter()
                .any(|e| matches!(e, Event::ChannelClosed { .. }))
        });
        c.release();
    }
}

#[test]
fn beep_08_malformed_frame_closes_only_that_session_1_shard() {
    malformed_closes_only_that_session(1);
}

#[test]
fn beep_08_malformed_frame_closes_only_that_session_2_shards() {
    malformed_closes_only_that_session(2);
}

/// Runs the independent client (written from the RFCs, not from this code) for `scenario`.
fn interop(relay: &Relay, scenario: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/beep_client.py");
    let output = Command::new("python3")
        .args([
            script,
            "--host",
            "127.0.0.1",
            "--port",
            &relay.edge.port().to_string(),
            scenario,
        ])
        .output()
        .expect("python3 runs the interop client");
    assert!(
        output.status.success(),
        "{scenario}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

const SCENARIOS: [&str; 6] = [
    "greet-start-close",
    "even-channel",
    "unknown-profile",
    "stream",
    "malformed",
    "byte-at-a-time",
];

#[test]
fn independent_rfc_client_1_shard() {
    let relay = Relay::start(1);
    for scenario in SCENARIOS {
        interop(&relay, scenario);
    }
}

#[test]
fn independent_rfc_client_2_shards() {
    let relay = Relay::start(2);
    for scenario in SCENARIOS {
        interop(&relay, scenario);
    }
}

#[test]
fn sigterm_sends_beep_close_and_exits_0() {
    let mut relay = Relay::start(2);
    let mut client = Client::connect(relay.edge);
    client.greet();
    let _ = client.start_apex();
    let _ = Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status();
    // The relay asks to release the session; the core answers `ok` (no channel is busy) and the
    // relay closes the connection.
    client.pump_until("EOF after the relay's close", |c| c.eof);
    assert!(
        client.session.is_finished(),
        "session released by BEEP close, not dropped"
    );
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn privileged_port_error_says_how_to_choose_another() {
    if Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
    {
        // Root may bind 913; run the check as an unprivileged user when one exists, with a
        // store directory that user can create.
        let nobody_state = std::env::temp_dir()
            .join(format!("apexd-test-nobody-{}", std::process::id()))
            .to_string_lossy()
            .into_owned();
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_apexd"),
                "--shards",
                "1",
                "--no-pin",
                "--data-dir",
                &nobody_state,
            ])
            .output();
        let _ = std::fs::remove_dir_all(&nobody_state);
        let Ok(out) = out else {
            return;
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("--edge-listen") || err.contains("--mesh-listen"),
            "{err}"
        );
        return;
    }
    let state = common::ScratchDir::new("state");
    let out = Command::new(env!("CARGO_BIN_EXE_apexd"))
        .args(["--shards", "1", "--no-pin", "--data-dir", state.as_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--edge-listen"), "{err}");
}

/// A relay that closed its connections leaves them in TIME_WAIT on its own port for a minute; a
/// relay restarted on that port (after a crash, an upgrade, a configuration change) must bind it.
#[test]
fn a_restarted_relay_binds_the_port_its_closed_connections_hold() {
    let edge = format!("127.0.0.1:{}", common::free_port());
    let mut relay = Relay::start_with(&["--shards", "1", "--edge-listen", &edge]);
    let mut client = Client::connect(relay.edge);
    client.greet();
    let _ = Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status();
    // The relay closes first, so its end of the connection waits in TIME_WAIT once the client,
    // having read the end of input, closes too.
    client.pump_until("EOF after the relay's close", |c| c.eof);
    drop(client);
    assert_eq!(relay.terminate().code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let restarted = Relay::start_with(&["--shards", "1", "--edge-listen", &edge]);
    assert_eq!(restarted.edge.to_string(), edge);
}

/// A relay killed with SIGKILL while clients are connected leaves its listening sockets
/// behind for a moment (the kernel tears its io_uring instances down after the process is
/// reaped): restarted at once on the same ports, as a supervisor does after a crash, it must
/// start rather than take them for another process's. (Timing-dependent: without the wait in
/// `reserve` this fails nearly every run against the release build,
/// `APEXD_TEST_BIN=target/release/apexd`, and seldom against the debug build.)
#[test]
fn a_relay_killed_with_sigkill_restarts_at_once_on_its_ports() {
    let state = common::ScratchDir::new("sigkill");
    let edge = format!("127.0.0.1:{}", common::free_port());
    let mesh = format!("127.0.0.1:{}", common::free_port());
    let args = [
        "--shards",
        "2",
        "--domain",
        "example.com",
        "--edge-listen",
        edge.as_str(),
        "--mesh-listen",
        mesh.as_str(),
    ];
    for round in 0..6 {
        let mut relay = Relay::spawn(&args, Some(state.as_str()));
        let mut client = Client::connect(relay.edge);
        client.greet();
        // A store write just before the kill: the case where the listeners were seen to
        // outlive the process most often.
        let actor = format!("a{round}@example.com");
        let set = Command::new(env!("CARGO_BIN_EXE_apex"))
            .args([
                "--relay",
                &edge,
                "access",
                "--as",
                "fred@example.com",
                "set",
            ])
            .args(["fred@example.com", &actor, "core:data"])
            .output()
            .unwrap();
        assert!(set.status.success(), "{set:?}");
        relay.child.kill().unwrap();
        relay.child.wait().unwrap();
    }
    let relay = Relay::spawn(&args, Some(state.as_str()));
    assert_eq!(relay.edge.to_string(), edge);
}

/// Another process listening on the edge address makes apexd refuse to start, saying which
/// address and which flag changes it, rather than sharing the port through SO_REUSEPORT.
#[test]
fn a_port_another_relay_listens_on_is_refused() {
    let first = Relay::start_with(&["--shards", "1"]);
    let state = common::ScratchDir::new("state");
    let out = Command::new(env!("CARGO_BIN_EXE_apexd"))
        .args(["--shards", "1", "--no-pin", "--mesh-listen", "127.0.0.1:0"])
        .args(["--data-dir", state.as_str()])
        .args(["--edge-listen", &first.edge.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second relay started: {err}");
    assert!(
        err.contains(&format!("edge address {} is already in use", first.edge))
            && err.contains("--edge-listen"),
        "{err}"
    );
}
