//! SIGHUP reloads the configuration on loopback: static peers and grants added to the file are
//! in force for the next data of a session attached before the reload; a broken file leaves
//! the relay as it was and the error names the file and line; a changed listen address is
//! named as needing a restart and the relay keeps listening where it did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use apex_proto::apex::client::DataBuilder;
use bytes::Bytes;
use common::{free_port, Client, Relay, ScratchDir};

fn hup(relay: &Relay) {
    let status = Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The relay's log lines, without the colours of its terminal output.
struct Log {
    lines: mpsc::Receiver<String>,
}

impl Log {
    /// The next line for which `wanted` holds (skipping others); panics after 10 s.
    fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {what} within 10 s"));
            let line = strip_colours(&line);
            if wanted(&line) {
                return line;
            }
        }
    }
}

fn strip_colours(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn attached(relay: &Relay, endpoint: &str) -> (Client, u32) {
    let mut client = Client::connect(relay.edge);
    client.greet();
    let (channel, reply) = client.attach(endpoint);
    assert_eq!(reply, "<ok />", "attach {endpoint}");
    (client, channel)
}

fn data(from: &str, to: &str, text: &str) -> Bytes {
    DataBuilder::new(from)
        .to(to)
        .option("<option internal='statusRequest' transID='7' />")
        .markup(text)
}

/// The next report to `sender`, while `recipient` takes (and answers) what it is sent, which
/// a delivery report waits for; what `recipient` took is added to `taken`.
fn report_to(sender: &mut Client, recipient: &mut Client, taken: &mut Vec<Bytes>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        taken.extend(recipient.drain_messages());
        sender.pump();
        if sender
            .events
            .iter()
            .any(|e| matches!(e, apex_proto::Event::Message { .. }))
        {
            return String::from_utf8(sender.receive().to_vec()).unwrap();
        }
        assert!(Instant::now() < deadline, "no report within 10 s");
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// The acceptance run: relay A starts from a file with no peer and no grant; fred is
/// attached to it on one session; the file gains `mesh.peers` (rubble.com's relay B) and a
/// grant; after SIGHUP, on that same session, data to barney@rubble.com is delivered through
/// B (before: no route) and data to wilma, whom the grant now lets fred reach, is delivered
/// (before: 537).
#[test]
fn sighup_puts_new_peers_and_grants_in_force_on_a_live_session() {
    let dir = ScratchDir::new("reload");
    let (port_a, port_b) = (free_port(), free_port());
    let b = Relay::start_with(&[
        "--shards",
        "1",
        "--domain",
        "rubble.com",
        "--mesh-listen",
        &format!("127.0.0.1:{port_b}"),
        "--peer",
        &format!("example.com=127.0.0.1:{port_a}"),
        "--grant",
        "*@example.com=core:data",
    ]);
    let config = dir.path.join("relay.toml");
    let head = format!(
        "domain = \"example.com\"\nedge_listen = \"127.0.0.1:0\"\n\
         mesh_listen = \"127.0.0.1:{port_a}\"\ndata_dir = \"{}\"\n",
        dir.path.join("state").display()
    );
    write(&config, &format!("{head}[access]\ngrants = []\n"));
    let (a, lines) = Relay::spawn_logged(&[
        "--config",
        config.to_str().unwrap(),
        "--shards",
        "2",
        "--log",
        "warn,apexd::reload=debug",
    ]);
    let log = Log { lines };
    let (mut barney, _) = attached(&b, "barney@rubble.com");
    let (mut wilma, _) = attached(&a, "wilma@example.com");
    let (mut fred, channel) = attached(&a, "fred@example.com");

    // Before: rubble.com has no route (and DNS stays on loopback), wilma takes nothing from
    // fred.
    let (accepted, _) = fred.request(
        channel,
        data("fred@example.com", "barney@rubble.com", "before"),
    );
    assert!(
        accepted,
        "data for another domain is accepted, then reported"
    );
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<destination identity='barney@rubble.com'>")
            && !report.contains("code='250'"),
        "{report}"
    );
    let (accepted, _) = fred.request(
        channel,
        data("fred@example.com", "wilma@example.com", "before"),
    );
    assert!(accepted, "data is accepted, then reported");
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(report.contains("code='537'"), "no grant yet: {report}");

    write(
        &config,
        &format!(
            "{head}mesh.peers = [\"rubble.com=127.0.0.1:{port_b}\"]\n\
             [access]\ngrants = [\"*@$DOMAIN=core:data\"]\n"
        ),
    );
    hup(&a);
    let summary = log.wait_for("summarising the reload", |l| {
        l.contains("configuration reloaded")
    });
    assert!(
        summary.contains("access.grants") && summary.contains("mesh.peers"),
        "{summary}"
    );
    // Both shards: fred's connection and the link to rubble.com may be on either.
    for _ in 0..2 {
        log.wait_for("of a shard taking the settings", |l| {
            l.contains("settings in force") && l.contains("generation=2")
        });
    }

    let sent = data("fred@example.com", "barney@rubble.com", "after");
    let (accepted, _) = fred.request(channel, sent.clone());
    assert!(accepted);
    assert_eq!(
        barney.receive(),
        sent,
        "delivered through rubble.com's relay"
    );
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<reply code='250' transID='7' />"),
        "{report}"
    );

    // The grant is in force once the store has published it (right after the reload).
    let sent = data("fred@example.com", "wilma@example.com", "after");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut taken = Vec::new();
    loop {
        assert!(fred.request(channel, sent.clone()).0);
        let report = report_to(&mut fred, &mut wilma, &mut taken);
        if report.contains("code='250'") {
            break;
        }
        assert!(
            report.contains("code='537'") && Instant::now() < deadline,
            "the grant never took effect: {report}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(taken, [sent]);
    fred.pump();
    assert!(!fred.eof, "fred's session was dropped");
}

/// A file that does not load leaves the configuration in force, and the error names the file,
/// the line and the field; a changed `edge_listen` is named as needing a restart, and the relay
/// keeps listening where it did.
#[test]
fn sighup_with_a_broken_file_or_a_new_listen_address_keeps_the_relay_as_it_was() {
    let dir = ScratchDir::new("reload-kept");
    let edge = format!("127.0.0.1:{}", free_port());
    let config = dir.path.join("relay.toml");
    let head = format!(
        "domain = \"example.com\"\nmesh_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
        dir.path.join("state").display()
    );
    write(&config, &format!("{head}edge_listen = \"{edge}\"\n"));
    let (a, lines) = Relay::spawn_logged(&[
        "--config",
        config.to_str().unwrap(),
        "--shards",
        "1",
        "--log",
        "warn",
    ]);
    let log = Log { lines };
    assert_eq!(a.edge.to_string(), edge);
    let (mut wilma, _) = attached(&a, "wilma@example.com");
    let (mut fred, channel) = attached(&a, "fred@example.com");
    let hello = |fred: &mut Client, wilma: &mut Client, text: &str| {
        let sent = data("fred@example.com", "wilma@example.com", text);
        let (accepted, reply) = fred.request(channel, sent.clone());
        assert!(accepted, "{text}: {reply:?}");
        assert_eq!(wilma.receive(), sent, "{text}");
        let report = String::from_utf8(fred.receive().to_vec()).unwrap();
        assert!(report.contains("code='250'"), "{text}: {report}");
    };
    hello(&mut fred, &mut wilma, "first");

    // Line 6 sets a count as text.
    write(
        &config,
        &format!("{head}edge_listen = \"{edge}\"\n[hold]\nmax_messages = \"many\"\n"),
    );
    hup(&a);
    let error = log.wait_for("with the reload's error", |l| l.contains("reload failed"));
    assert!(
        error.contains(&format!("{}:6:", config.display())) && error.contains("hold.max_messages"),
        "{error}"
    );
    hello(&mut fred, &mut wilma, "after the broken file");

    // A new listen address needs a restart; the grants (dropped here) do not.
    let moved = format!("127.0.0.1:{}", free_port());
    write(
        &config,
        &format!("{head}edge_listen = \"{moved}\"\n[access]\ngrants = []\n"),
    );
    hup(&a);
    let warning = log.wait_for("naming what needs a restart", |l| l.contains("restart"));
    assert!(
        warning.contains("edge_listen") && !warning.contains("access.grants"),
        "{warning}"
    );
    // Still where it was, for sessions old and new; the grant is gone.
    let (mut barney, barney_channel) = attached(&a, "barney@example.com");
    let sent = data("barney@example.com", "wilma@example.com", "after the move");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(barney.request(barney_channel, sent.clone()).0);
        let mut taken = Vec::new();
        let report = report_to(&mut barney, &mut wilma, &mut taken);
        if report.contains("code='537'") {
            assert!(taken.is_empty(), "delivered though refused");
            break;
        }
        assert!(
            report.contains("code='250'") && Instant::now() < deadline,
            "the grant was never withdrawn: {report}"
        );
        assert_eq!(taken.as_slice(), std::slice::from_ref(&sent));
        std::thread::sleep(Duration::from_millis(100));
    }
    fred.pump();
    wilma.pump();
    assert!(!fred.eof && !wilma.eof, "a session was dropped");
}
