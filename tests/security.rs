//! TLS, SASL and authorization end to end (issue "Security"; RFC 3080 §3-4, RFC 3340 §4.5,
//! APEX-47): the real binary with certificates and a users file, driven by an independent
//! client (Python's ssl and a hand-written SCRAM in `tests/tls_client.py`; OpenSSL's
//! `s_client`), by the protocol core's own client for byte-level refusals, and by the `apex`
//! command-line client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use apex_proto::apex::client::DataBuilder;
use apex_proto::auth::scram::ScramVerifier;
use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::Event;
use common::{free_port, Client, Relay};

/// A directory of its own for one test's files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("apexd-security-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A lab CA and certificates it signs.
struct Lab {
    ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Lab {
    fn new() -> Lab {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "apexd lab CA");
        let ca = params.self_signed(&key).unwrap();
        Lab {
            ca,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for DNS names `names` (and emails `emails`).
    fn issue(&self, names: &[&str], emails: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        for email in emails {
            params
                .subject_alt_names
                .push(rcgen::SanType::Rfc822Name((*email).try_into().unwrap()));
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Files for a relay of `domain`: (cert, key, ca) paths.
    fn files(&self, scratch: &Scratch, domain: &str) -> (String, String, String) {
        let (cert, key) = self.issue(&[domain], &[]);
        (
            scratch.write(&format!("{domain}.pem"), &cert),
            scratch.write(&format!("{domain}.key"), &key),
            scratch.write("ca.pem", &self.ca.pem()),
        )
    }
}

/// One line of a users file for `name` with `password`, made by `apexd passwd`.
fn user_line(name: &str, password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_apexd"))
        .args(["passwd", name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "apexd passwd failed");
    String::from_utf8(output.stdout).unwrap()
}

/// `apexd passwd` prints a line the users file takes, whose verifier accepts the password
/// (a SCRAM exchange with our client) and nothing else; each run salts afresh.
#[test]
fn apexd_passwd_prints_a_verifier_that_accepts_only_the_password() {
    use apex_proto::auth::scram::{SaslStep, ScramClient, ScramServer};
    use apex_proto::auth::users::Users;
    let line = user_line("fred@example.com", "yabba dabba");
    assert!(
        line.starts_with("fred@example.com SCRAM-SHA-256$4096:"),
        "{line}"
    );
    assert_ne!(
        line,
        user_line("fred@example.com", "yabba dabba"),
        "the salt is random"
    );
    let users = Users::parse(&line, "passwd output").unwrap();
    let exchange = |password: &str| {
        let lookup = |name: &str| users.verifier(name).cloned();
        let mut client = ScramClient::new("fred@example.com", password, "client-nonce");
        let mut server = ScramServer::new("server-nonce".into());
        let SaslStep::Challenge(first) = server.step(&client.first(), lookup) else {
            panic!("no challenge");
        };
        let last = client.handle_server_first(&first).unwrap();
        server.step(&last, lookup)
    };
    assert!(matches!(exchange("yabba dabba"), SaslStep::Success { .. }));
    assert!(matches!(exchange("yabba"), SaslStep::Failure(_)));
    let verifier = ScramVerifier::parse(line.split_whitespace().nth(1).unwrap()).unwrap();
    assert!(verifier.matches("yabba dabba"));
}

/// Runs `tests/tls_client.py MODE ...` against `port`; returns its output lines.
fn python(mode: &str, port: u16, ca: &str, extra: &[&str]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls_client.py");
    let output = Command::new("python3")
        .arg(script)
        .args([mode, "--port", &port.to_string(), "--ca", ca])
        .args(extra)
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines().map(str::to_owned).collect()
}

fn has(lines: &[String], prefix: &str) -> bool {
    lines.iter().any(|l| l.starts_with(prefix))
}

/// A relay of example.com with TLS and users fred and barney (so `--auth required`).
fn secured_relay(scratch: &Scratch, lab: &Lab, extra: &[&str]) -> (Relay, String) {
    let (cert, key, ca) = lab.files(scratch, "example.com");
    let users = scratch.write(
        "users",
        &(user_line("fred@example.com", "fred's secret")
            + &user_line("barney@example.com", "rubble")),
    );
    let mut args = vec![
        "--domain",
        "example.com",
        "--shards",
        "1",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--users",
        &users,
    ];
    args.extend_from_slice(extra);
    (Relay::start_with(&args), ca)
}

/// The error code of an `error` element in `text`.
fn error_code(text: &str) -> Option<u16> {
    let start = text.find("code='")? + 6;
    text.get(start..start + 3)?.parse().ok()
}

/// The issue's "done when": an unauthenticated attach gets 530; fred attaches after SCRAM over
/// TLS (greeting -> TLS -> greeting -> SASL -> attach, BEEP-44..48, BEEP-51/52).
#[test]
fn unauthenticated_attach_gets_530_and_scram_over_tls_attaches() {
    let scratch = Scratch::new("scram");
    let lab = Lab::new();
    let (relay, ca) = secured_relay(&scratch, &lab, &[]);

    let mut anonymous = Client::connect(relay.edge);
    anonymous.greet();
    let (_, reply) = anonymous.attach("fred@example.com");
    assert_eq!(error_code(&reply), Some(530), "{reply}");

    let lines = python(
        "scram",
        relay.edge.port(),
        &ca,
        &[
            "--user",
            "fred@example.com",
            "--password",
            "fred's secret",
            "--attach",
            "fred@example.com",
        ],
    );
    let greetings: Vec<&String> = lines.iter().filter(|l| l.starts_with("greeting")).collect();
    assert_eq!(greetings.len(), 2, "{lines:?}");
    // Before TLS: TLS and SCRAM, never PLAIN; after it: no TLS, PLAIN too (BEEP-53).
    assert!(greetings[0].contains("beep/TLS") && greetings[0].contains("SASL/SCRAM-SHA-256"));
    assert!(!greetings[0].contains("SASL/PLAIN"), "{lines:?}");
    assert!(!greetings[1].contains("beep/TLS") && greetings[1].contains("SASL/PLAIN"));
    assert!(
        has(&lines, "proceed") && has(&lines, "tls TLSv1.3"),
        "{lines:?}"
    );
    assert!(has(&lines, "authenticated scram"), "{lines:?}");
    assert!(has(&lines, "attach <ok />"), "{lines:?}");
}

/// 535 for a wrong password; 537 for an identity attaching as someone else; PLAIN works under
/// TLS.
#[test]
fn wrong_passwords_get_535_and_identities_attach_only_as_themselves() {
    let scratch = Scratch::new("refusals");
    let lab = Lab::new();
    let (relay, ca) = secured_relay(&scratch, &lab, &[]);
    let port = relay.edge.port();

    let wrong = python(
        "scram",
        port,
        &ca,
        &[
            "--user",
            "fred@example.com",
            "--password",
            "guess",
            "--attach",
            "fred@example.com",
        ],
    );
    assert!(
        wrong
            .iter()
            .any(|l| l.starts_with("sasl failed") && l.contains("535")),
        "{wrong:?}"
    );
    assert!(!has(&wrong, "attach"), "{wrong:?}");

    let unknown = python(
        "scram",
        port,
        &ca,
        &[
            "--user",
            "nobody@example.com",
            "--password",
            "x",
            "--attach",
            "nobody@example.com",
        ],
    );
    assert!(
        unknown
            .iter()
            .any(|l| l.starts_with("sasl failed") && l.contains("535")),
        "an unknown user fails like a wrong password: {unknown:?}"
    );

    let elsewhere = python(
        "scram",
        port,
        &ca,
        &[
            "--user",
            "fred@example.com",
            "--password",
            "fred's secret",
            "--attach",
            "barney@example.com",
        ],
    );
    assert!(has(&elsewhere, "authenticated scram"), "{elsewhere:?}");
    let attach = elsewhere
        .iter()
        .find(|l| l.starts_with("attach"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(error_code(&attach), Some(537), "{elsewhere:?}");

    let plain = python(
        "plain",
        port,
        &ca,
        &[
            "--user",
            "barney@example.com",
            "--password",
            "rubble",
            "--attach",
            "barney/appl=wb@example.com",
        ],
    );
    assert!(has(&plain, "authenticated plain"), "{plain:?}");
    assert!(
        has(&plain, "attach <ok />"),
        "subaddresses are the identity's: {plain:?}"
    );
}

/// BEEP-44 with an independent TLS stack: OpenSSL's s_client completes the handshake after
/// `proceed` and receives the relay's new greeting.
#[test]
fn openssl_s_client_gets_the_greeting_after_tls() {
    if Command::new("openssl").arg("version").output().is_err() {
        panic!("openssl is needed (the CI script installs it)");
    }
    let scratch = Scratch::new("s_client");
    let lab = Lab::new();
    let (relay, ca) = secured_relay(&scratch, &lab, &[]);
    let lines = python("s_client", relay.edge.port(), &ca, &[]);
    let greeting = lines
        .iter()
        .find(|l| l.starts_with("s_client greeting"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        greeting.contains("beep/APEX") && greeting.contains("SASL/PLAIN"),
        "{greeting}"
    );
}

/// PLAIN before TLS is refused with 538 although the greeting does not offer it, and the
/// session carries on (the refusal is an `error` to the `start`, RFC 3080 §2.3.1.2).
#[test]
fn plain_before_tls_gets_538() {
    let scratch = Scratch::new("plain538");
    let lab = Lab::new();
    let (relay, _) = secured_relay(&scratch, &lab, &[]);
    let mut client = Client::connect(relay.edge);
    client.greet();
    let channel = client
        .session
        .start_channel(
            vec![ProfileOffer::new("http://iana.org/beep/SASL/PLAIN")],
            None,
        )
        .unwrap();
    client.pump_until("refusal", |c| {
        c.events
            .iter()
            .any(|e| matches!(e, Event::StartRefused { channel: ch, .. } if *ch == channel))
    });
    let code = client.events.iter().find_map(|e| match e {
        Event::StartRefused { error, .. } => Some(error.code),
        _ => None,
    });
    assert_eq!(code, Some(538));
    let (_, reply) = client.attach("fred@example.com");
    assert_eq!(error_code(&reply), Some(530), "{reply}");
}

/// example.com's relay (1 shard, a static route to rubble.com, links over TLS) and
/// rubble.com's (2 shards, no route back), both with certificates from one lab CA; rubble.com
/// verifies client certificates only when `verifying`.
fn tls_relay_pair(scratch: &Scratch, verifying: bool) -> (Relay, Relay) {
    let lab = Lab::new();
    let (cert_a, key_a, ca) = lab.files(scratch, "example.com");
    let (cert_b, key_b, _) = lab.files(scratch, "rubble.com");
    let mesh_b = free_port();
    let route = format!("rubble.com=127.0.0.1:{mesh_b}");
    let a = Relay::start_with(&[
        "--domain",
        "example.com",
        "--shards",
        "1",
        "--peer",
        &route,
        "--tls-cert",
        &cert_a,
        "--tls-key",
        &key_a,
        "--tls-ca",
        &ca,
        "--grant",
        "*@rubble.com=core:data",
    ]);
    let mesh_listen = format!("127.0.0.1:{mesh_b}");
    let mut args = vec![
        "--domain",
        "rubble.com",
        "--shards",
        "2",
        "--mesh-listen",
        &mesh_listen,
        "--tls-cert",
        &cert_b,
        "--tls-key",
        &key_b,
        "--grant",
        "*@example.com=core:data",
    ];
    if verifying {
        args.extend(["--tls-ca", ca.as_str()]);
    }
    (a, Relay::start_with(&args))
}

/// Two relays with certificates from one CA relay to each other over TLS; the receiving relay
/// has no route to the sender and no DNS, so only the certificate can make the bind good.
#[test]
fn two_relays_with_certificates_relay_over_tls() {
    let scratch = Scratch::new("mesh");
    let (a, b) = tls_relay_pair(&scratch, true);
    let mut barney = Client::connect(b.edge);
    barney.greet();
    assert_eq!(barney.attach("barney@rubble.com").1, "<ok />");
    let mut fred = Client::connect(a.edge);
    fred.greet();
    let (channel, reply) = fred.attach("fred@example.com");
    assert_eq!(reply, "<ok />");
    let data = DataBuilder::new("fred@example.com")
        .to("barney@rubble.com")
        .text("over TLS");
    assert!(fred.request(channel, data.clone()).0);
    assert_eq!(barney.receive(), data);
}

/// A relay without TLS that the receiver cannot recognise by address binds in vain: the
/// certificate was what made the previous test pass, and a raw client binding as the
/// receiver's own domain or as a peer's is refused with 537 (the spoofing case).
#[test]
fn spoofed_binds_are_refused() {
    let b = Relay::start_with(&["--domain", "rubble.com", "--shards", "1"]);
    let mut barney = Client::connect(b.edge);
    barney.greet();
    assert_eq!(barney.attach("barney@rubble.com").1, "<ok />");
    let mut spoofer = Client::connect(b.mesh);
    spoofer.greet();
    for domain in ["rubble.com", "example.com"] {
        let offer = apex_proto::apex::client::bind_offer(domain, 1);
        let channel = spoofer.session.start_channel(vec![offer], None).unwrap();
        spoofer.pump_until("bind answer", |c| {
            c.events.iter().any(|e| {
                matches!(e, Event::ChannelStarted { channel: ch, .. } | Event::StartRefused { channel: ch, .. } if *ch == channel)
            })
        });
        let answer = spoofer.events.iter().find_map(|e| match e {
            Event::ChannelStarted {
                channel: ch,
                content,
                ..
            } if *ch == channel => {
                Some(String::from_utf8_lossy(&content.clone().unwrap_or_default()).into_owned())
            }
            Event::StartRefused { channel: ch, error } if *ch == channel => {
                Some(format!("code='{}'", error.code))
            }
            _ => None,
        });
        let answer = answer.unwrap_or_default();
        assert_eq!(error_code(&answer), Some(537), "bind as {domain}: {answer}");
        if spoofer.session.open_channels().contains(&channel) {
            let forged = DataBuilder::new("fred@example.com")
                .to("barney@rubble.com")
                .text("forged");
            let (positive, _) = spoofer.request(channel, forged);
            assert!(!positive, "data over a refused bind was accepted");
        }
    }
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(
            barney.drain_messages().is_empty(),
            "barney received forged data"
        );
    }
}

/// SIGHUP re-reads the users file without dropping sessions: a user added is accepted, and a
/// bad file leaves the previous users in force.
#[test]
fn sighup_reloads_users_and_keeps_the_old_set_on_a_bad_file() {
    let scratch = Scratch::new("reload");
    let lab = Lab::new();
    let (relay, ca) = secured_relay(&scratch, &lab, &[]);
    let port = relay.edge.port();
    let mut kept = Client::connect(relay.edge);
    kept.greet();
    let wilma = [
        "--user",
        "wilma@example.com",
        "--password",
        "pebbles",
        "--attach",
        "wilma@example.com",
    ];
    assert!(!has(&python("scram", port, &ca, &wilma), "authenticated"));

    let users = scratch.0.join("users");
    let mut text = std::fs::read_to_string(&users).unwrap();
    text.push_str(&user_line("wilma@example.com", "pebbles"));
    std::fs::write(&users, &text).unwrap();
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &relay.child.id().to_string()])
            .status()
            .unwrap()
    };
    hup();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if has(&python("scram", port, &ca, &wilma), "attach <ok />") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "wilma was never accepted after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    std::fs::write(&users, "wilma@example.com SCRAM-SHA-256$oops\n").unwrap();
    hup();
    std::thread::sleep(Duration::from_millis(1500));
    let again = [
        "--user",
        "wilma@example.com",
        "--password",
        "pebbles",
        "--attach",
        "wilma/x@example.com",
    ];
    assert!(
        has(&python("scram", port, &ca, &again), "attach <ok />"),
        "the old users stay"
    );
    kept.pump();
    assert!(!kept.eof, "a session was dropped by the reload");
}

/// The converse of the test above: a receiving relay that cannot verify client certificates
/// (no `--tls-ca`) has nothing that proves example.com's bind, so it refuses it (537), and
/// fred's data is reported failed rather than delivered.
#[test]
fn without_a_verifiable_certificate_the_bind_is_refused() {
    let scratch = Scratch::new("mesh-refused");
    let (a, b) = tls_relay_pair(&scratch, false);
    let mut barney = Client::connect(b.edge);
    barney.greet();
    assert_eq!(barney.attach("barney@rubble.com").1, "<ok />");
    let mut fred = Client::connect(a.edge);
    fred.greet();
    let (channel, _) = fred.attach("fred@example.com");
    let data = DataBuilder::new("fred@example.com")
        .to("barney@rubble.com")
        .status_request(5)
        .text("who are you?");
    assert!(fred.request(channel, data).0, "accepted by our own relay");
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(report.contains("transID='5'"), "{report}");
    assert!(!report.contains("code='250'"), "{report}");
    assert!(
        barney.drain_messages().is_empty(),
        "delivered without a proven bind"
    );
}

/// Misbehaving TLS peers beside a healthy pair: clients that stop in the middle of the
/// handshake and clients that send garbage instead of TLS records. The garbage ends only its
/// own sessions; the healthy pair's messages flow meanwhile.
#[test]
fn broken_tls_peers_do_not_disturb_a_healthy_pair() {
    use std::io::{Read, Write};
    let scratch = Scratch::new("broken-tls");
    let lab = Lab::new();
    let (cert, key, _) = lab.files(&scratch, "example.com");
    let relay = Relay::start_with(&[
        "--domain",
        "example.com",
        "--shards",
        "2",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let ready = |stream: &mut std::net::TcpStream| {
        let start = "Content-Type: application/beep+xml\r\n\r\n<start number='1'><profile uri='http://iana.org/beep/TLS'><![CDATA[<ready />]]></profile></start>";
        let greeting =
            "RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";
        let frame = format!("{greeting}MSG 0 1 . 52 {}\r\n{start}END\r\n", start.len());
        stream.write_all(frame.as_bytes()).unwrap();
    };
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = std::net::TcpStream::connect(relay.edge).unwrap();
        ready(&mut s);
        // Half of a TLS record header, then nothing.
        s.write_all(&[0x16, 0x03]).unwrap();
        stalled.push(s);
    }
    let mut garbage = Vec::new();
    for _ in 0..10 {
        let mut s = std::net::TcpStream::connect(relay.edge).unwrap();
        ready(&mut s);
        std::thread::sleep(Duration::from_millis(5));
        s.write_all(b"MSG 0 2 . 200 10\r\nnot TLS at all\r\nEND\r\n")
            .unwrap();
        garbage.push(s);
    }
    let mut barney = Client::connect(relay.edge);
    barney.greet();
    assert_eq!(barney.attach("barney@example.com").1, "<ok />");
    let mut fred = Client::connect(relay.edge);
    fred.greet();
    let (channel, _) = fred.attach("fred@example.com");
    for i in 0..200 {
        let data = DataBuilder::new("fred@example.com")
            .to("barney@example.com")
            .text(&format!("message {i}"));
        assert!(fred.request(channel, data.clone()).0);
        assert_eq!(barney.receive(), data);
    }
    for mut s in garbage {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break true,
                Ok(_) => continue,
            }
        };
        assert!(ended, "a session sending garbage for TLS was not ended");
    }
    drop(stalled);
}

/// Runs the `apex` command-line client with `args` (`APEX_PASSWORD` set to `password` when
/// given); returns whether it exited 0, its standard output and its standard error.
fn apex_cli(args: &[&str], password: Option<&str>) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex"));
    command.args(args).env_remove("APEX_PASSWORD");
    if let Some(password) = password {
        command.env("APEX_PASSWORD", password);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The `apex` client against a relay that requires authentication: barney attaches and fred
/// sends to him, both over TLS (verified against the lab CA) after SCRAM-SHA-256, fred asking
/// for the status; then fred again with PLAIN under TLS and the password from `APEX_PASSWORD`.
#[test]
fn apex_cli_attaches_and_sends_over_tls_after_scram() {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;
    let scratch = Scratch::new("cli");
    let lab = Lab::new();
    let (relay, ca) = secured_relay(&scratch, &lab, &[]);
    let edge = relay.edge.to_string();
    let barney_password = scratch.write("barney.password", "rubble\n");
    let fred_password = scratch.write("fred.password", "fred's secret\nnot this line\n");

    let mut barney = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["--relay", &edge, "--tls-ca", &ca])
        .args(["--user", "barney@example.com"])
        .args(["--password-file", &barney_password])
        .args([
            "attach",
            "barney@example.com",
            "--count",
            "2",
            "--timeout",
            "20",
        ])
        .env_remove("APEX_PASSWORD")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(barney.stdout.take().unwrap()).lines();
    let mut next_line = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next_line(), "attached barney@example.com");

    let fred = [
        "--relay",
        &edge,
        "--tls-ca",
        &ca,
        "--user",
        "fred@example.com",
    ];
    let mut args = fred.to_vec();
    args.extend([
        "--password-file",
        &fred_password,
        "send",
        "--from",
        "fred@example.com",
        "--to",
        "barney@example.com",
        "--status",
        "hello, barney",
    ]);
    let (ok, out, err) = apex_cli(&args, None);
    assert!(ok, "{out}{err}");
    assert_eq!(out, "accepted\nstatus barney@example.com 250\n", "{err}");
    assert_eq!(
        next_line(),
        "from=fred@example.com to=barney@example.com content=hello, barney"
    );

    let mut args = fred.to_vec();
    args.extend([
        "--mechanism",
        "PLAIN",
        "send",
        "--from",
        "fred/appl=cli@example.com",
        "--to",
        "barney@example.com",
        "over PLAIN",
    ]);
    let (ok, out, err) = apex_cli(&args, Some("fred's secret"));
    assert!(ok, "{out}{err}");
    assert_eq!(out, "accepted\n", "{err}");
    assert_eq!(
        next_line(),
        "from=fred/appl=cli@example.com to=barney@example.com content=over PLAIN"
    );

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = barney.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = barney.kill();
            let _ = barney.wait();
            panic!("apex attach did not exit after --count 2");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// How the `apex` client reports what a secured relay refuses: a wrong password (535), no
/// authentication (530), a certificate for another name, and `--tls` against a relay without
/// TLS; each exits with status 1.
#[test]
fn apex_cli_reports_refusals_with_their_codes() {
    let scratch = Scratch::new("cli-refusals");
    let lab = Lab::new();
    let (relay, ca) = secured_relay(&scratch, &lab, &[]);
    let edge = relay.edge.to_string();
    let tls = ["--relay", edge.as_str(), "--tls-ca", ca.as_str()];
    let attach = ["attach", "fred@example.com", "--timeout", "0.2"];

    let mut args = tls.to_vec();
    args.extend(["--user", "fred@example.com"]);
    args.extend(attach);
    let (ok, out, err) = apex_cli(&args, Some("guess"));
    assert!(!ok);
    assert_eq!(out, "error 535 authentication failed\n", "{err}");
    assert!(
        err.contains("the relay refused to authenticate fred@example.com"),
        "{err}"
    );

    let mut args = tls.to_vec();
    args.extend(attach);
    let (ok, out, err) = apex_cli(&args, None);
    assert!(!ok);
    assert_eq!(out, "error 530 authentication required\n", "{err}");

    let mut args = tls.to_vec();
    args.extend(["--tls-name", "rubble.com"]);
    args.extend(attach);
    let (ok, out, err) = apex_cli(&args, None);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(
        err.contains("'rubble.com'") && err.contains("certificate not valid for name"),
        "{err}"
    );

    let plain = Relay::start_with(&["--domain", "example.com", "--shards", "1"]);
    let plain_edge = plain.edge.to_string();
    let mut args = vec!["--relay", plain_edge.as_str(), "--tls-ca", ca.as_str()];
    args.extend(attach);
    let (ok, out, err) = apex_cli(&args, None);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("the relay does not offer TLS"), "{err}");
}
