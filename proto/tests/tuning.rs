//! Tuning conformance (beep.md §7-9, BEEP-43..55) as the shard core runs it, over `RelayNet`
//! with a raw connection whose octets each test writes and reads byte for byte: TLS `ready` /
//! `proceed` piggybacked and not, nothing sent after `proceed`, the handshake and the new
//! greetings, SASL `blob` exchanges with their status, one tuning channel at a time, and no
//! second authentication.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use apex_proto::apex::relay::{AuthMode, AuthPolicy, ConnKind};
use apex_proto::auth::scram::{ScramClient, ScramVerifier};
use apex_proto::auth::users::Users;
use apex_proto::shard::Security;
use apex_proto::testing::{split_frames, ClientId, RelayNet};
use apex_proto::tls::{crypto_provider, TlsLayer};
use base64::Engine as _;
use bytes::BytesMut;

const GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

struct Lab {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn lab() -> Lab {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["example.com".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Lab {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// example.com's relay requiring authentication, users fred (password "yabba"), TLS offered
/// when `lab` is given; a raw edge connection that has greeted.
fn relay(lab: Option<&Lab>) -> (RelayNet, ClientId) {
    let mut net = RelayNet::new("example.com", 1);
    let verifier = ScramVerifier::from_password("yabba", b"fixed salt", 4096);
    let users = Users::parse(&format!("fred@example.com {verifier}\n"), "test").unwrap();
    net.set_security(Security {
        tls_server: lab.map(|l| l.server.clone()),
        tls_client: None,
        users: Arc::new(users),
    });
    net.set_auth(AuthPolicy {
        mode: AuthMode::Required,
        ..AuthPolicy::default()
    });
    let id = net.connect_raw(0, ConnKind::Edge);
    net.inject(id, GREETING);
    (net, id)
}

fn frame(keyword: &str, channel: u32, msgno: u32, seqno: u32, payload: &str) -> Vec<u8> {
    format!(
        "{keyword} {channel} {msgno} . {seqno} {}\r\n{payload}END\r\n",
        payload.len()
    )
    .into_bytes()
}

fn beep_xml(xml: &str) -> String {
    format!("Content-Type: application/beep+xml\r\n\r\n{xml}")
}

fn start(number: u32, uri: &str, piggyback: Option<&str>) -> String {
    let content = piggyback.map_or(String::new(), |p| format!("<![CDATA[{p}]]>"));
    beep_xml(&format!(
        "<start number='{number}'><profile uri='{uri}'>{content}</profile></start>"
    ))
}

/// The relay's frames after the first `skip`, as text; SEQs (window updates) left out.
fn frames(net: &RelayNet, id: ClientId, skip: usize) -> Vec<String> {
    split_frames(&net.clients[id].from_relay)
        .iter()
        .filter(|f| !f.starts_with(b"SEQ "))
        .skip(skip)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

fn blob(data: &[u8]) -> String {
    format!(
        "<blob>{}</blob>",
        base64::engine::general_purpose::STANDARD.encode(data)
    )
}

fn blob_data(text: &str) -> Vec<u8> {
    let start = text.find("<blob").unwrap();
    let open = start + text[start..].find('>').unwrap() + 1;
    let close = open + text[open..].find("</blob>").unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(&text[open..close])
        .unwrap()
}

/// BEEP-44 and beep.md §13.3: the greeting lists TLS; a `start` with `ready` piggybacked is
/// answered with `proceed` in the RPY's profile, byte for byte, and nothing follows it, not
/// even a SEQ for the new channel (BEEP-46, BEEP-47).
#[test]
fn beep_44_piggybacked_ready_gets_proceed_and_nothing_after() {
    let lab = lab();
    let (mut net, id) = relay(Some(&lab));
    let greeting = beep_xml(
        "<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n   \
         <profile uri='http://iana.org/beep/TLS' />\r\n   \
         <profile uri='http://iana.org/beep/SASL/SCRAM-SHA-256' />\r\n</greeting>\r\n",
    );
    assert_eq!(
        frames(&net, id, 0),
        [String::from_utf8(frame("RPY", 0, 0, 0, &greeting)).unwrap()]
    );
    let ready = start(1, "http://iana.org/beep/TLS", Some("<ready />"));
    net.inject(id, &frame("MSG", 0, 1, 52, &ready));
    let proceed =
        beep_xml("<profile uri='http://iana.org/beep/TLS'><![CDATA[<proceed />]]></profile>\r\n");
    assert_eq!(proceed.len(), 113, "beep.md §13.3's size");
    let expected = String::from_utf8(frame("RPY", 0, 1, greeting.len() as u32, &proceed)).unwrap();
    assert_eq!(frames(&net, id, 1), std::slice::from_ref(&expected));
    let wire = String::from_utf8_lossy(&net.clients[id].from_relay).into_owned();
    assert!(wire.ends_with(&expected), "octets after proceed: {wire:?}");
}

/// BEEP-44: `ready` as a MSG on a TLS channel started without it.
#[test]
fn beep_44_ready_as_a_message_gets_proceed() {
    let lab = lab();
    let (mut net, id) = relay(Some(&lab));
    let plain_start = start(1, "http://iana.org/beep/TLS", None);
    net.inject(id, &frame("MSG", 0, 1, 52, &plain_start));
    let ready = beep_xml("<ready />");
    net.inject(id, &frame("MSG", 1, 0, 0, &ready));
    let replies = frames(&net, id, 1);
    assert!(replies[0].starts_with("RPY 0 1 ."), "{replies:?}");
    let proceed = beep_xml("<proceed />");
    assert_eq!(
        replies[1],
        String::from_utf8(frame("RPY", 1, 0, 0, &proceed)).unwrap(),
        "{replies:?}"
    );
    assert_eq!(replies.len(), 2, "{replies:?}");
}

/// BEEP-43: one tuning channel at a time.
#[test]
fn beep_43_a_second_tuning_channel_is_refused() {
    let lab = lab();
    let (mut net, id) = relay(Some(&lab));
    let tls = start(1, "http://iana.org/beep/TLS", None);
    net.inject(id, &frame("MSG", 0, 1, 52, &tls));
    let seqno = 52 + tls.len() as u32;
    let sasl = start(3, "http://iana.org/beep/SASL/SCRAM-SHA-256", None);
    net.inject(id, &frame("MSG", 0, 2, seqno, &sasl));
    let last = frames(&net, id, 0).pop().unwrap();
    assert!(
        last.starts_with("ERR 0 2 .") && last.contains("code='550'"),
        "{last}"
    );
}

/// BEEP-48, BEEP-49, BEEP-53: after the handshake both sides greet again, over TLS; the new
/// greeting no longer offers TLS and now offers PLAIN; PLAIN then authenticates and fred
/// attaches.
#[test]
fn beep_48_after_tls_a_new_greeting_then_plain_and_attach() {
    let lab = lab();
    let (mut net, id) = relay(Some(&lab));
    let ready = start(1, "http://iana.org/beep/TLS", Some("<ready />"));
    net.inject(id, &frame("MSG", 0, 1, 52, &ready));
    let mut taken = net.clients[id].from_relay.len();
    let mut tls = TlsLayer::client(lab.client.clone(), "example.com").unwrap();
    let mut plain = BytesMut::new();
    for _ in 0..4 {
        let mut wire = BytesMut::new();
        tls.transmit(&mut wire);
        if !wire.is_empty() {
            net.inject(id, &wire);
        }
        let out = &net.clients[id].from_relay;
        let mut wire = BytesMut::from(&out[taken..]);
        taken = out.len();
        tls.receive(&mut wire, &mut plain).unwrap();
    }
    assert!(!tls.is_handshaking());
    let greeting = String::from_utf8_lossy(&plain).into_owned();
    assert!(greeting.starts_with("RPY 0 0 . 0 "), "{greeting}");
    assert!(
        !greeting.contains("beep/TLS"),
        "TLS offered again: {greeting}"
    );
    assert!(greeting.contains("SASL/PLAIN"), "{greeting}");
    plain.clear();

    let mut send = |net: &mut RelayNet, tls: &mut TlsLayer, octets: &[u8], plain: &mut BytesMut| {
        tls.send(octets).unwrap();
        let mut wire = BytesMut::new();
        tls.transmit(&mut wire);
        net.inject(id, &wire);
        let out = &net.clients[id].from_relay;
        let mut wire = BytesMut::from(&out[taken..]);
        taken = out.len();
        tls.receive(&mut wire, plain).unwrap();
    };
    send(&mut net, &mut tls, GREETING, &mut plain);
    let auth = start(
        1,
        "http://iana.org/beep/SASL/PLAIN",
        Some(&blob(b"\0fred@example.com\0yabba")),
    );
    send(
        &mut net,
        &mut tls,
        &frame("MSG", 0, 1, 52, &auth),
        &mut plain,
    );
    let reply = String::from_utf8_lossy(&plain).into_owned();
    assert!(reply.contains("<blob status='complete'>"), "{reply}");
    plain.clear();
    let seqno = 52 + auth.len() as u32;
    let attach = start(
        3,
        "http://iana.org/beep/APEX",
        Some("<attach endpoint='fred@example.com' transID='1' />"),
    );
    send(
        &mut net,
        &mut tls,
        &frame("MSG", 0, 2, seqno, &attach),
        &mut plain,
    );
    let reply = String::from_utf8_lossy(&plain).into_owned();
    assert!(reply.contains("<![CDATA[<ok />]]>"), "{reply}");
}

/// BEEP-51, BEEP-52: SCRAM-SHA-256 with the client-first message piggybacked, the challenge in
/// the start's reply, the client-final as a MSG, success as `<blob status='complete'>` with the
/// server's signature; then attach works, and a second authentication is refused.
#[test]
fn beep_51_scram_exchange_then_no_second_authentication() {
    let (mut net, id) = relay(None);
    let mut client = ScramClient::new("fred@example.com", "yabba", "fyko+d2lbbFgONRv9qkxdawL");
    let first = start(
        1,
        "http://iana.org/beep/SASL/SCRAM-SHA-256",
        Some(&blob(&client.first())),
    );
    net.inject(id, &frame("MSG", 0, 1, 52, &first));
    let reply = frames(&net, id, 1).pop().unwrap();
    assert!(reply.starts_with("RPY 0 1 ."), "{reply}");
    let challenge = blob_data(&reply);
    let last = client.handle_server_first(&challenge).unwrap();
    net.inject(id, &frame("MSG", 1, 0, 0, &beep_xml(&blob(&last))));
    let reply = frames(&net, id, 2).pop().unwrap();
    assert!(reply.starts_with("RPY 1 0 ."), "{reply}");
    assert!(reply.contains("<blob status='complete'>"), "{reply}");
    client.verify_server_final(&blob_data(&reply)).unwrap();

    let mut seqno = 52 + first.len() as u32;
    let attach = start(
        3,
        "http://iana.org/beep/APEX",
        Some("<attach endpoint='fred@example.com' transID='1' />"),
    );
    net.inject(id, &frame("MSG", 0, 2, seqno, &attach));
    seqno += attach.len() as u32;
    assert!(frames(&net, id, 0)
        .iter()
        .any(|f| f.contains("<![CDATA[<ok />]]>")));
    // While the SASL channel is open a second tuning channel is refused anyway (BEEP-43):
    // close it, then try again.
    let close = beep_xml("<close number='1' code='200' />");
    net.inject(id, &frame("MSG", 0, 3, seqno, &close));
    seqno += close.len() as u32;
    assert!(frames(&net, id, 0).pop().unwrap().starts_with("RPY 0 3 ."));
    let again = start(5, "http://iana.org/beep/SASL/SCRAM-SHA-256", None);
    net.inject(id, &frame("MSG", 0, 4, seqno, &again));
    let last = frames(&net, id, 0).pop().unwrap();
    assert!(
        last.starts_with("ERR 0 4 .") && last.contains("already authenticated"),
        "{last}"
    );
}

/// 535 for a wrong password (the refusal of the start carrying it), and 538 for PLAIN before
/// TLS, which the greeting did not offer.
#[test]
fn failed_authentication_is_535_and_plain_before_tls_is_538() {
    let (mut net, id) = relay(None);
    let wrong = start(
        1,
        "http://iana.org/beep/SASL/PLAIN",
        Some(&blob(b"\0fred@example.com\0dabba")),
    );
    net.inject(id, &frame("MSG", 0, 1, 52, &wrong));
    let last = frames(&net, id, 0).pop().unwrap();
    assert!(
        last.starts_with("ERR 0 1 .") && last.contains("code='538'"),
        "{last}"
    );

    let mut client = ScramClient::new("fred@example.com", "dabba", "nonce");
    let seqno = 52 + wrong.len() as u32;
    let first = start(
        3,
        "http://iana.org/beep/SASL/SCRAM-SHA-256",
        Some(&blob(&client.first())),
    );
    net.inject(id, &frame("MSG", 0, 2, seqno, &first));
    let challenge = blob_data(&frames(&net, id, 0).pop().unwrap());
    let last = client.handle_server_first(&challenge).unwrap();
    net.inject(id, &frame("MSG", 3, 0, 0, &beep_xml(&blob(&last))));
    let reply = frames(&net, id, 0).pop().unwrap();
    assert!(
        reply.starts_with("ERR 3 0 .") && reply.contains("code='535'"),
        "{reply}"
    );
}

/// Failed exchanges are bounded per session, also when a client keeps sending blobs on the
/// channel of a failed exchange (each PLAIN attempt costs the relay a PBKDF2 computation).
#[test]
fn a_session_gets_three_attempts_in_all() {
    let (mut net, id) = relay(None);
    let scram = start(1, "http://iana.org/beep/SASL/SCRAM-SHA-256", None);
    net.inject(id, &frame("MSG", 0, 1, 52, &scram));
    let (mut msgno, mut seqno) = (0, 0);
    let mut send = |net: &mut RelayNet, octets: &[u8]| {
        let payload = beep_xml(&blob(octets));
        net.inject(id, &frame("MSG", 1, msgno, seqno, &payload));
        msgno += 1;
        seqno += payload.len() as u32;
        frames(net, id, 0).pop().unwrap()
    };
    for attempt in 1..=3 {
        let mut client = ScramClient::new("fred@example.com", "dabba", "nonce");
        let challenge = send(&mut net, &client.first());
        assert!(
            challenge.starts_with("RPY 1 "),
            "attempt {attempt}: {challenge}"
        );
        let last = client.handle_server_first(&blob_data(&challenge)).unwrap();
        let reply = send(&mut net, &last);
        assert!(reply.contains("code='535'"), "attempt {attempt}: {reply}");
    }
    // A fourth exchange, with the right password, does not even begin.
    let client = ScramClient::new("fred@example.com", "yabba", "nonce");
    let reply = send(&mut net, &client.first());
    assert!(
        reply.starts_with("ERR 1 ") && reply.contains("code='535'"),
        "{reply}"
    );
}

/// A `start` offering APEX first and a tuning profile second starts APEX, and the session
/// goes on reading: only a tuning profile the relay will take stops input (BEEP-43).
#[test]
fn a_start_preferring_apex_over_tls_does_not_stop_input() {
    let lab = lab();
    let (mut net, id) = relay(Some(&lab));
    let both = beep_xml(
        "<start number='1'><profile uri='http://iana.org/beep/APEX' />\
         <profile uri='http://iana.org/beep/TLS' /></start>",
    );
    net.inject(id, &frame("MSG", 0, 1, 52, &both));
    let reply = frames(&net, id, 0).pop().unwrap();
    assert!(reply.contains("beep/APEX"), "{reply}");
    let next = start(3, "http://iana.org/beep/APEX", None);
    net.inject(id, &frame("MSG", 0, 2, 52 + both.len() as u32, &next));
    let reply = frames(&net, id, 0).pop().unwrap();
    assert!(
        reply.starts_with("RPY 0 2 ."),
        "input stopped after the first start: {reply}"
    );
}

/// An exchange lives and dies with its channel (beep.md §9): a client-final message sent on
/// a new channel after the first was closed does not complete the old exchange.
#[test]
fn a_scram_exchange_ends_with_its_channel() {
    let (mut net, id) = relay(None);
    let mut client = ScramClient::new("fred@example.com", "yabba", "nonce");
    let first = start(
        1,
        "http://iana.org/beep/SASL/SCRAM-SHA-256",
        Some(&blob(&client.first())),
    );
    net.inject(id, &frame("MSG", 0, 1, 52, &first));
    let challenge = blob_data(&frames(&net, id, 0).pop().unwrap());
    let last = client.handle_server_first(&challenge).unwrap();
    let mut seqno = 52 + first.len() as u32;
    let close = beep_xml("<close number='1' code='200' />");
    net.inject(id, &frame("MSG", 0, 2, seqno, &close));
    seqno += close.len() as u32;
    let again = start(
        3,
        "http://iana.org/beep/SASL/SCRAM-SHA-256",
        Some(&blob(&last)),
    );
    net.inject(id, &frame("MSG", 0, 3, seqno, &again));
    let reply = frames(&net, id, 0).pop().unwrap();
    assert!(!reply.contains("status='complete'"), "{reply}");
    assert!(
        reply.starts_with("ERR 0 3 .") && reply.contains("code='535'"),
        "{reply}"
    );
}

/// BEEP-30 (RFC 3080 §2.3.1.5) in the SASL profile: its `error` carries English text, labelled
/// `xml:lang='en'` for a peer whose greeting asked for French first, unlabelled for one that
/// asked for nothing. Byte-exact: a `ready` where a `blob` belongs.
#[test]
fn beep_30_a_sasl_error_is_labelled_for_a_peer_asking_for_another_language() {
    for (greeting, label) in [
        ("<greeting localize='fr' />", " xml:lang='en'"),
        ("<greeting />", ""),
    ] {
        let mut net = RelayNet::new("example.com", 1);
        let verifier = ScramVerifier::from_password("yabba", b"fixed salt", 4096);
        let users = Users::parse(&format!("fred@example.com {verifier}\n"), "test").unwrap();
        net.set_security(Security {
            tls_server: None,
            tls_client: None,
            users: Arc::new(users),
        });
        let id = net.connect_raw(0, ConnKind::Edge);
        let greeting = beep_xml(&format!("{greeting}\r\n"));
        net.inject(id, &frame("RPY", 0, 0, 0, &greeting));
        let client = ScramClient::new("fred@example.com", "yabba", "nonce");
        let first = start(
            3,
            "http://iana.org/beep/SASL/SCRAM-SHA-256",
            Some(&blob(&client.first())),
        );
        net.inject(id, &frame("MSG", 0, 1, greeting.len() as u32, &first));
        assert!(
            frames(&net, id, 0).pop().unwrap().starts_with("RPY 0 1 ."),
            "the exchange started"
        );
        net.inject(id, &frame("MSG", 3, 0, 0, &beep_xml("<ready />")));
        let error = beep_xml(&format!(
            "<error code='501'{label}>expected a blob</error>\r\n"
        ));
        assert_eq!(
            frames(&net, id, 0).pop().unwrap(),
            String::from_utf8(frame("ERR", 3, 0, 0, &error)).unwrap()
        );
    }
}
