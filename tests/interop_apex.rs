#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real relay against an independent APEX endpoint (tests/interop/apex_endpoint.py), written
//! to the protocol specifications (RFC 3340, RFC 3080, RFC 3081) and not from this code:
//! piggybacked attach (APEX-06, APEX-15), byte-identical delivery (APEX-25, APEX-28), the
//! attach/data/terminate error codes (APEX-10, -11, -14, -19, -22), status reports (APEX-38,
//! -39, -45) and delivery between two relays over the mesh (APEX-24).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{free_port, Relay};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/apex_endpoint.py"
);

/// Upper bound on any one endpoint process or line (its own whole-scenario timeout is 20 s).
const PROCESS_LIMIT: Duration = Duration::from_secs(40);

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Spawns the independent endpoint against `port` with piped output.
fn endpoint(port: u16, args: &[&str]) -> Guard {
    Guard(
        Command::new("python3")
            .arg(SCRIPT)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs the independent endpoint"),
    )
}

/// Reads a child's pipe to the end on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Waits, bounded, for the child to exit.
fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + PROCESS_LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no exit within {PROCESS_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs one endpoint scenario to completion and asserts it reported `OK`.
fn scenario_passes(port: u16, args: &[&str]) {
    let mut child = endpoint(port, args);
    let stdout = collect(child.0.stdout.take().unwrap());
    let stderr = collect(child.0.stderr.take().unwrap());
    let status = wait_exit(&mut child.0, &format!("{args:?}"));
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        status.success() && stdout.starts_with("OK: "),
        "{args:?}: {status}\n{stdout}{stderr}"
    );
}

fn relay(shards: usize) -> Relay {
    Relay::start_with(&["--shards", &shards.to_string(), "--domain", "example.com"])
}

/// APEX-06/15 piggybacked attach, APEX-23 `ok` on acceptance, APEX-25/28 delivery of data laid
/// out one element a line (RFC 3340 §4.4.4), byte for byte, APEX-19 terminate, then close and
/// release.
fn attach_send_receive(shards: usize) {
    let relay = relay(shards);
    scenario_passes(
        relay.edge.port(),
        &["attach-send-receive", "--domain", "example.com"],
    );
}

#[test]
fn independent_endpoint_attach_send_receive_apex_25_28_1_shard() {
    attach_send_receive(1);
}

#[test]
fn independent_endpoint_attach_send_receive_apex_25_28_2_shards() {
    attach_send_receive(2);
}

/// APEX-10 (555 live transID), APEX-22 (537 foreign originator), APEX-14 (554 piggybacked, for a
/// second application), APEX-11 (553 outside the domain), APEX-19 (550 unknown transID).
#[test]
fn independent_endpoint_errors_apex_10_11_14_19_22() {
    let relay = relay(2);
    scenario_passes(relay.edge.port(), &["errors", "--domain", "example.com"]);
}

/// APEX-38/39/45: a per-recipient statusRequest for an unattached recipient yields a
/// statusResponse from apex=report with reply code 550, which the endpoint answers `ok`.
#[test]
fn independent_endpoint_status_report_apex_38_39_45() {
    let relay = relay(2);
    scenario_passes(relay.edge.port(), &["status", "--domain", "example.com"]);
}

fn mesh_relay(domain: &str, port: u16, other: &str, other_port: u16) -> Relay {
    let mesh = format!("127.0.0.1:{port}");
    let peer = format!("{other}=127.0.0.1:{other_port}");
    let grant = format!("*@{other}=core:data");
    Relay::start_with(&[
        "--shards",
        "2",
        "--domain",
        domain,
        "--mesh-listen",
        &mesh,
        "--peer",
        &peer,
        "--grant",
        &grant,
    ])
}

/// APEX-24: data from an independent endpoint on example.com's relay reaches an independent
/// endpoint on rubble.com's relay, with the originator and the content preserved.
#[test]
fn independent_endpoints_across_two_relays_apex_24() {
    let (port_a, port_b) = (free_port(), free_port());
    let a = mesh_relay("example.com", port_a, "rubble.com", port_b);
    let b = mesh_relay("rubble.com", port_b, "example.com", port_a);

    let mut receiver = endpoint(
        b.edge.port(),
        &["receive", "--name", "barney@rubble.com", "--count", "1"],
    );
    let stderr = collect(receiver.0.stderr.take().unwrap());
    let stdout = receiver.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut next_line = |prefix: &str| -> String {
        let deadline = Instant::now() + PROCESS_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!("receiver printed no {prefix:?} line ({e}); saw {seen:?}"),
            }
        }
    };

    assert_eq!(next_line("attached "), "attached barney@rubble.com");
    scenario_passes(
        a.edge.port(),
        &[
            "send",
            "--from",
            "fred@example.com",
            "--to",
            "barney@rubble.com",
            "--text",
            "hi",
        ],
    );
    assert_eq!(
        next_line("received "),
        "received from=fred@example.com text=hi"
    );
    let status = wait_exit(&mut receiver.0, "receiver");
    assert!(
        status.success(),
        "receiver: {status} {}",
        stderr.join().unwrap()
    );
    assert_eq!(
        next_line("OK: "),
        "OK: receive 1 data received by barney@rubble.com"
    );
}
