//! apexd under a service manager: the sd_notify(3) messages a `Type=notify` unit
//! (`dist/apexd.service`) waits for, received on a datagram socket standing in for systemd's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{Relay, ScratchDir};

/// Reads one notification; `None` when none came within `wait`.
fn notification(socket: &UnixDatagram, wait: Duration) -> Option<String> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("reading the notify socket: {e}"),
    }
}

#[test]
fn notifies_ready_once_listening_and_stopping_on_sigterm() {
    let dir = ScratchDir::new("notify");
    let socket_path = dir.path.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let state = ScratchDir::new("notify-state");

    // Returns once apexd printed its ready line.
    let mut relay = Relay::spawn_with_env(
        &["--domain", "example.com", "--shards", "2"],
        Some(state.as_str()),
        &[("NOTIFY_SOCKET", socket_path.as_os_str())],
    );
    let ready = notification(&socket, Duration::from_secs(10)).expect("no READY=1 from apexd");
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    let status = format!(
        "STATUS=serving domain=example.com edge={} mesh={} shards=2",
        relay.edge, relay.mesh
    );
    assert!(
        lines.contains(&status.as_str()),
        "{ready:?}, wanted {status}"
    );

    // Nothing more while it serves.
    assert_eq!(notification(&socket, Duration::from_millis(300)), None);

    let exit = relay.terminate();
    assert!(exit.success(), "apexd exited with {exit}");
    let stopping =
        notification(&socket, Duration::from_secs(5)).expect("no STOPPING=1 after SIGTERM");
    assert!(
        stopping.lines().any(|line| line == "STOPPING=1"),
        "{stopping:?}"
    );
    assert_eq!(notification(&socket, Duration::from_millis(100)), None);
}

#[test]
fn an_unreachable_notify_socket_does_not_stop_the_relay() {
    // NOTIFY_SOCKET naming nothing: the notifications fail, the relay serves and stops as usual.
    let dir = ScratchDir::new("notify-missing");
    let missing = dir.path.join("no-such.sock");
    let state = ScratchDir::new("notify-missing-state");
    let mut relay = Relay::spawn_with_env(
        &["--shards", "1"],
        Some(state.as_str()),
        &[("NOTIFY_SOCKET", missing.as_os_str())],
    );
    let mut client = common::Client::connect(relay.edge);
    client.greet();
    client.release();
    let exit = relay.terminate();
    assert!(exit.success(), "apexd exited with {exit}");
}
