//! The access service and the durable store through the real binaries (RFC 3341, ACC-02,
//! ACC-19; RFC 3342 §3): `apex access` changes who may send to whom, the change is in force
//! for the next data, and access entries and held data survive `kill -9`. A damaged store
//! stops apexd with an error naming the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use apex_proto::apex::client::DataBuilder;
use common::{Client, Relay, ScratchDir};

/// Runs `apex --relay EDGE ARGS...`; returns whether it exited 0 and its standard output.
fn apex(relay: &Relay, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["--relay", &relay.edge.to_string()])
        .args(args)
        .env_remove("APEX_PASSWORD")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// `apex send` from barney to fred asking for the status; returns its output.
fn barney_to_fred(relay: &Relay, text: &str) -> String {
    let (_, out) = apex(
        relay,
        &[
            "send",
            "--from",
            "barney@example.com",
            "--to",
            "fred@example.com",
            "--status",
            "--timeout",
            "10",
            text,
        ],
    );
    out
}

/// A 2-shard relay for example.com keeping its store in `dir`, with the RFC's default entries
/// alone (no `access.grants`): ordinary endpoints may not send each other data until an
/// owner's entry says so.
/// The relay listens on `edge`, so that it is restarted where its clients find it.
fn start(dir: &ScratchDir, edge: &str) -> Relay {
    let config = dir.path.join("strict.toml");
    std::fs::write(&config, "[access]\ngrants = []\n").unwrap();
    Relay::spawn(
        &[
            "--shards",
            "2",
            "--domain",
            "example.com",
            "--edge-listen",
            edge,
            "--config",
            config.to_str().unwrap(),
        ],
        Some(dir.as_str()),
    )
}

fn kill_9(relay: &mut Relay) {
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
}

/// The acceptance run: barney cannot send to fred; fred sets an entry with
/// `apex access set`; barney's next message is delivered; apexd is killed with SIGKILL and
/// restarted; the entry and the messages held for an absent endpoint are still there.
#[test]
fn entries_and_held_data_survive_kill_9() {
    let dir = ScratchDir::new("access");
    let edge = format!("127.0.0.1:{}", common::free_port());
    let mut relay = start(&dir, &edge);

    // ACC-19 with the defaults: barney holds nothing on fred.
    let out = barney_to_fred(&relay, "before");
    assert!(out.contains("status fred@example.com 537"), "{out}");

    let (ok, out) = apex(
        &relay,
        &[
            "access",
            "--as",
            "fred@example.com",
            "set",
            "fred@example.com",
            "barney@example.com",
            "core:data",
        ],
    );
    assert!(ok && out.contains("250"), "{out}");

    let mut fred = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["--relay", &relay.edge.to_string()])
        .args([
            "attach",
            "fred@example.com",
            "--count",
            "1",
            "--timeout",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(fred.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "attached fred@example.com");
    let out = barney_to_fred(&relay, "after");
    assert!(out.contains("status fred@example.com 250"), "{out}");
    let delivered = lines.next().unwrap().unwrap();
    assert!(delivered.contains("after"), "{delivered}");
    assert!(fred.wait().unwrap().success());

    // Wilma lets her domain send to her, then is away: barney's data waits for her.
    let (ok, out) = apex(
        &relay,
        &[
            "access",
            "--as",
            "wilma@example.com",
            "set",
            "wilma@example.com",
            "*@example.com",
            "core:data",
        ],
    );
    assert!(ok, "{out}");
    let mut barney = Client::connect(relay.edge);
    barney.greet();
    let (channel, reply) = barney.attach("barney@example.com");
    assert_eq!(reply, "<ok />");
    for i in 0..3 {
        let payload = DataBuilder::new("barney@example.com")
            .to("wilma@example.com")
            .option("<option internal='hold4Endpoint' transID='9' />")
            .text(&format!("held {i}"));
        let (positive, answer) = barney.request(channel, payload);
        assert!(positive, "{answer:?}");
    }
    drop(barney);

    // Restarted at once on the same port, as a supervisor would: the killed relay's listeners
    // outlive it for a moment (io_uring teardown), which must not stop the new one.
    kill_9(&mut relay);
    let relay = start(&dir, &edge);

    let (ok, out) = apex(
        &relay,
        &[
            "access",
            "--as",
            "fred@example.com",
            "get",
            "fred@example.com",
            "barney@example.com",
        ],
    );
    assert!(ok && out.contains("core:data"), "the entry survived: {out}");
    let out = barney_to_fred(&relay, "again");
    assert!(
        out.contains("status fred@example.com 550"),
        "allowed, not attached: {out}"
    );

    let (ok, out) = apex(
        &relay,
        &[
            "attach",
            "wilma@example.com",
            "--count",
            "3",
            "--timeout",
            "20",
        ],
    );
    assert!(ok, "{out}");
    for i in 0..3 {
        assert!(
            out.contains(&format!("held {i}")),
            "held {i} delivered: {out}"
        );
    }
}

/// A store file that is not a database stops apexd before it listens, with an error naming
/// the file; the file is left as it was.
#[test]
fn a_damaged_store_is_refused_naming_the_file() {
    let dir = ScratchDir::new("damaged");
    let file = dir.path.join("apexd.redb");
    std::fs::write(
        &file,
        b"this is not a database, it is a text file".repeat(100),
    )
    .unwrap();
    let before = std::fs::read(&file).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_apexd"))
        .args(["--shards", "1", "--no-pin", "--data-dir", dir.as_str()])
        .args([
            "--edge-listen",
            "127.0.0.1:0",
            "--mesh-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("apexd started on a damaged store");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&file.display().to_string()) && err.contains("damaged"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before, "left as it was");
}
