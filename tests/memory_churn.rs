//! Issue 19 item 10 against the real binary over loopback: after a churn of greeted sessions
//! (RFC 3080 §2.3.1.1; BEEP-17) closes, apexd's resident memory comes back toward what it was
//! before them. The daemon's global allocator decides this (src/bin/apexd.rs): glibc keeps the
//! pages that the sessions freed, so this test fails against a `--no-default-features` build
//! (`APEXD_TEST_BIN=... cargo test --test memory_churn`).
//!
//! Memory is read from /proc/PID/status (VmRSS), never timed: the wait for the allocator to give
//! pages back is bounded, and the bound on what must come back is generous (half of the growth),
//! so that a loaded machine changes how long it takes, not the verdict.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Relay;

/// The relay's greeting (RFC 3080 §2.3.1.1).
const RELAY_GREETING: &str = "RPY 0 0 . 0 111\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

/// A client's greeting, 52 octets of payload.
const CLIENT_GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

/// The relay's window update for that greeting (RFC 3081 §3.1.3).
const SEQ_AFTER_GREETING: &str = "SEQ 0 52 262144\r\n";

/// Sessions held at once: enough that their memory stands far above the relay's own
/// (about 7 KiB each), few enough for the default open-file limits of both ends.
const SESSIONS: usize = 1500;

/// Below this growth the churn did not measure anything: each session holds at least this.
const MIN_GROWTH_KIB_PER_SESSION: u64 = 2;

/// How long the allocator may take to give the pages back (its purge runs on a timer).
const SETTLE_BOUND: Duration = Duration::from_secs(60);

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Opens a session and completes the greeting exchange, byte for byte (BEEP-17).
fn greeted_session(relay: &Relay) -> TcpStream {
    let mut stream = TcpStream::connect(relay.edge).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(CLIENT_GREETING).unwrap();
    let expected = format!("{RELAY_GREETING}{SEQ_AFTER_GREETING}");
    let mut got = vec![0u8; expected.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    stream
}

/// Issue 19 item 10: SESSIONS greeted sessions opened, held and closed; within SETTLE_BOUND
/// at least half of the RSS they added is given back to the system.
#[test]
fn memory_returns_after_session_churn() {
    let state = common::ScratchDir::new("memory-churn-config");
    let config = format!("{}/relay.toml", state.as_str());
    // Every session comes from 127.0.0.1: no per-address bound.
    std::fs::write(
        &config,
        "[runtime]\nmax_connections_per_address = 0\nidle_timeout_ms = 0\n",
    )
    .unwrap();
    // Each end holds every session: the test's open-file limit, which the relay inherits, must
    // hold them beside the descriptors a process already has.
    let needed = SESSIONS as u64 + 256;
    let nofile = rlimit::increase_nofile_limit(needed).unwrap();
    assert!(
        nofile >= needed,
        "this test holds {SESSIONS} sessions and needs {needed} open files; the hard limit allows {nofile}"
    );
    let relay = Relay::start_with(&[
        "--shards",
        "2",
        "--domain",
        "example.com",
        "--config",
        &config,
    ]);
    let pid = relay.child.id();
    // One session first, so that what every shard sets up once is in the baseline.
    drop(greeted_session(&relay));
    std::thread::sleep(Duration::from_millis(300));
    let fds = fd_count(pid);
    let baseline = status_kib(pid, "VmRSS");

    let sessions: Vec<TcpStream> = (0..SESSIONS).map(|_| greeted_session(&relay)).collect();
    let peak = status_kib(pid, "VmRSS");
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth >= MIN_GROWTH_KIB_PER_SESSION * SESSIONS as u64,
        "{SESSIONS} sessions added only {growth} KiB over {baseline} KiB: nothing to measure"
    );
    drop(sessions);

    let deadline = Instant::now() + SETTLE_BOUND;
    while fd_count(pid) > fds {
        assert!(
            Instant::now() < deadline,
            "apexd still holds {} session descriptors",
            fd_count(pid) - fds
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut settled = status_kib(pid, "VmRSS");
    while settled > baseline + growth / 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        settled = status_kib(pid, "VmRSS");
    }
    let returned_pct = 100 * peak.saturating_sub(settled) / growth;
    assert!(
        settled <= baseline + growth / 2,
        "RSS {baseline} KiB before {SESSIONS} sessions, {peak} KiB with them, still {settled} KiB \
         {SETTLE_BOUND:?} after they closed: {returned_pct}% of the growth came back, at least \
         50% must"
    );
}
