//! APEX relay conformance, in memory: one or more [`Relay`] shards driven through real BEEP
//! sessions by [`RelayNet`] (the runtime's event/action mapping of `src/shard/conn.rs`, without
//! sockets). Tests cite the checklist items APEX-nn (RFC 3340), OPT-nn (RFC 3340 §5, RFC 3342)
//! and ACC-nn (RFC 3341), which docs/conformance.md maps to RFC sections.
//!
//! The byte-exact vectors are four example exchanges: an endpoint session (fred attaches with a
//! piggybacked attach, sends data to barney, reuses a live transID, detaches), the delivery to
//! barney, a status report to fred, and a relay-relay session (bind, forwarded data); plus an
//! attachOverride exchange. They are compared frame by frame with what the relay's listener
//! session wrote ([`RelayClient::relay_data_frames`]; SEQ frames, whose window values depend on
//! the configured buffer, are left out). Raw clients ([`RelayNet::connect_raw`]) let a test
//! write the initiator's octets verbatim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::msg::{self, ApexLimits, Data, Operation};
use apex_proto::apex::relay::{domain_shard, home_shard, ConnKind};
use apex_proto::testing::{split_frames, ClientId, RelayNet};
use apex_proto::ReplyKind;
use bytes::Bytes;

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

/// Endpoint session: the application's greeting (52).
const I_GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

/// Endpoint session: the relay's greeting offering TLS, SASL/DIGEST-MD5 and APEX (217).
const L_GREETING_217: &[u8] = b"RPY 0 0 . 0 217\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/TLS' />\r\n   <profile uri='http://iana.org/beep/SASL/DIGEST-MD5' />\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

/// Endpoint session: channel 1 with a piggybacked attach of fred (RFC 3340 §4.2; 199).
const START_ATTACH_FRED: &[u8] = b"MSG 0 1 . 52 199\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>\r\n      <![CDATA[<attach endpoint='fred@example.com' transID='1' />]]>\r\n   </profile>\r\n</start>\r\nEND\r\n";

/// Endpoint session: channel created and attach accepted (109).
const RPY_START_OK: &[u8] = b"RPY 0 1 . 217 109\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<ok />]]></profile>\r\nEND\r\n";

/// Endpoint session: data from fred to barney with inline content (RFC 3340 §4.4.4; 231).
const DATA_231: &[u8] = b"MSG 1 0 . 0 231\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n";

/// Endpoint session and delivery to barney: `ok` to msgno 0, seqno 0 (46).
const RPY_1_0_OK: &[u8] =
    b"RPY 1 0 . 0 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

/// Endpoint session: a second attach reusing live transID 1 (98) and its refusal with 555
/// (RFC 3340 §4.4.1; 97).
const ATTACH_REUSE: &[u8] = b"MSG 1 1 . 231 98\r\nContent-Type: application/beep+xml\r\n\r\n<attach endpoint='fred/appl=wb@example.com' transID='1' />\r\nEND\r\n";
const ERR_555: &[u8] = b"ERR 1 1 . 46 97\r\nContent-Type: application/beep+xml\r\n\r\n<error code='555'>transaction already in progress</error>\r\nEND\r\n";

/// Endpoint session: detach everything, transID 0 (RFC 3340 §4.4.3; 65), and its acceptance
/// (46).
const TERMINATE_0: &[u8] = b"MSG 1 2 . 329 65\r\nContent-Type: application/beep+xml\r\n\r\n<terminate transID='0' />\r\nEND\r\n";
const RPY_1_2_OK: &[u8] =
    b"RPY 1 2 . 143 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

/// Status report: data with a per-recipient statusRequest (RFC 3340 §5.1; 302).
const DATA_302: &[u8] = b"MSG 1 0 . 0 302\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com'>\r\n      <option internal='statusRequest' transID='86' />\r\n   </recipient>\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n";

/// Status report: the relay's report to fred (RFC 3340 §6.2; 416) and fred's acceptance.
const REPORT_416: &[u8] = b"MSG 1 0 . 46 416\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='86'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='86' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\nEND\r\n";
const FRED_ACCEPTS_REPORT: &[u8] =
    b"RPY 1 0 . 302 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

/// Relay-relay session: rubble.com's relay greeting (111), example.com's start with a
/// piggybacked bind (RFC 3340 §4.4.2; 189), acceptance (109).
const L_GREETING_111: &[u8] = b"RPY 0 0 . 0 111\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";
const START_BIND: &[u8] = b"MSG 0 1 . 52 189\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>\r\n      <![CDATA[<bind relay='example.com' transID='1' />]]>\r\n   </profile>\r\n</start>\r\nEND\r\n";
const RPY_BIND_OK: &[u8] = b"RPY 0 1 . 111 109\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<ok />]]></profile>\r\nEND\r\n";
/// Relay-relay session: forwarded data with a per-data statusRequest (283).
const DATA_283: &[u8] = b"MSG 1 0 . 0 283\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@rubble.com' />\r\n   <option internal='statusRequest' transID='86' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n";

/// attachOverride (RFC 3342 §1): app #2 attaches with the option (152) on its channel 1.
const ATTACH_OVERRIDE_152: &[u8] = b"MSG 1 0 . 0 152\r\nContent-Type: application/beep+xml\r\n\r\n<attach endpoint='fred@example.com' transID='2'>\r\n   <option internal='attachOverride' transID='3' />\r\n</attach>\r\nEND\r\n";
/// attachOverride (RFC 3342 §1): the relay terminates app #1's attachment with 556 (107).
const TERMINATE_556_107: &[u8] = b"MSG 1 0 . 0 107\r\nContent-Type: application/beep+xml\r\n\r\n<terminate transID='1' code='556'>attachment overridden</terminate>\r\nEND\r\n";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Checks a literal data frame's size field against its octets; returns the frame.
#[track_caller]
fn checked(frame: &[u8]) -> &[u8] {
    let lf = frame.iter().position(|&b| b == b'\n').unwrap();
    let line = std::str::from_utf8(&frame[..lf - 1]).unwrap();
    let size: usize = line.split(' ').nth(5).unwrap().parse().unwrap();
    assert!(frame.ends_with(b"END\r\n"), "{line:?} has no trailer");
    assert_eq!(
        frame.len() - (lf + 1) - 5,
        size,
        "vector bug: size of {line:?}"
    );
    frame
}

/// The payload of a literal data frame.
fn payload_of(frame: &[u8]) -> Bytes {
    let lf = frame.iter().position(|&b| b == b'\n').unwrap();
    Bytes::copy_from_slice(&frame[lf + 1..frame.len() - 5])
}

fn show(frames: &[Bytes]) -> Vec<String> {
    frames
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

/// A data payload laid out as the vectors above; `options` are whole lines
/// ("   <option .../>\r\n").
fn data(originator: &str, recipients: &[&str], options: &str, content: &str) -> Bytes {
    let mut s = format!(
        "{HEADERS}<data content='#Content'>\r\n   <originator identity='{originator}' />\r\n"
    );
    for r in recipients {
        s.push_str(&format!("   <recipient identity='{r}' />\r\n"));
    }
    s.push_str(options);
    s.push_str(&format!(
        "   <data-content Name='Content'>{content}</data-content>\r\n</data>\r\n"
    ));
    Bytes::from(s)
}

fn status_request(trans_id: u32) -> String {
    format!("   <option internal='statusRequest' transID='{trans_id}' />\r\n")
}

fn xml(body: &str) -> Bytes {
    Bytes::from(format!("{HEADERS}{body}"))
}

fn parse_data(payload: &Bytes) -> Data {
    match msg::parse_message(payload, &ApexLimits::default()) {
        Ok(Operation::Data(d)) => d,
        other => panic!(
            "not a data: {other:?}: {}",
            String::from_utf8_lossy(payload)
        ),
    }
}

fn recipients_of(payload: &Bytes) -> Vec<String> {
    parse_data(payload)
        .recipients
        .into_iter()
        .map(|r| r.identity.to_string())
        .collect()
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error code of an `error` reply payload.
fn error_code(payload: &Bytes) -> u16 {
    match msg::parse_message(payload, &ApexLimits::default()) {
        Ok(Operation::Error { code, .. }) => code,
        other => panic!("not an error: {other:?}"),
    }
}

/// Whether `payload` is a report from `apex=report@<domain>` with this transID, destination
/// and reply code.
fn is_report(payload: &Bytes, domain: &str, trans_id: u32, identity: &str, code: u16) -> bool {
    let d = parse_data(payload);
    let t = text(payload);
    d.originator.identity == format!("apex=report@{domain}")
        && t.contains(&format!("<statusResponse transID='{trans_id}'>"))
        && t.contains(&format!("<destination identity='{identity}'>"))
        && t.contains(&format!("<reply code='{code}' transID='{trans_id}'"))
}

/// Reports among the MSGs `id` received.
fn reports(net: &RelayNet, id: ClientId) -> Vec<Bytes> {
    net.clients[id]
        .received
        .iter()
        .map(|(_, _, p)| p.clone())
        .filter(|p| text(p).contains("<statusResponse"))
        .collect()
}

/// Data (not reports) among the MSGs `id` received.
fn deliveries(net: &RelayNet, id: ClientId) -> Vec<Bytes> {
    net.clients[id]
        .received
        .iter()
        .map(|(_, _, p)| p.clone())
        .filter(|p| text(p).contains("<data ") && !text(p).contains("<statusResponse"))
        .collect()
}

/// `*@example.com` may send `core:data` to every endpoint of example.com.
fn domain_grant(domain: &str) -> AccessTable {
    let mut access = AccessTable::new();
    access
        .grant_domain(
            domain,
            ActorPattern::parse(&format!("*@{domain}")).unwrap(),
            vec![Access::CORE_DATA],
        )
        .unwrap();
    access
}

fn granted(shards: usize) -> RelayNet {
    RelayNet::with(
        "example.com",
        shards,
        domain_grant("example.com"),
        Vec::new(),
    )
}

/// An endpoint of example.com whose home shard is `home`.
fn endpoint_homed(stem: &str, shards: usize, home: usize) -> String {
    (0..)
        .map(|i| format!("{stem}{i}@example.com"))
        .find(|e| home_shard(&Endpoint::parse(e).unwrap(), shards) == home)
        .unwrap()
}

fn ep(s: &str) -> Endpoint {
    Endpoint::parse(s).unwrap()
}

/// The client is attached as `endpoint` per every shard's directory replica.
fn attached_everywhere(net: &RelayNet, endpoint: &str, id: ClientId, channel: u32) -> bool {
    let c = &net.clients[id];
    net.shards.iter().map(|s| s.relay()).all(|r| {
        r.lookup(&ep(endpoint))
            .is_some_and(|at| at.shard == c.shard && at.conn == c.conn && at.channel == channel)
    })
}

fn detached_everywhere(net: &RelayNet, endpoint: &str) -> bool {
    net.shards
        .iter()
        .map(|s| s.relay())
        .all(|r| r.lookup(&ep(endpoint)).is_none())
}

/// An edge client attached as `endpoint` on a piggybacked channel.
fn attached(net: &mut RelayNet, shard: usize, endpoint: &str) -> (ClientId, u32) {
    let id = net.connect(shard, ConnKind::Edge);
    let (channel, reply) = net.attach(id, endpoint);
    assert_eq!(reply, "<ok />", "attach {endpoint}");
    (id, channel)
}

// ---------------------------------------------------------------------------------------------
// The endpoint session and the delivery to barney, byte for byte
// ---------------------------------------------------------------------------------------------

fn run_13_1(shards: usize, fred_shard: usize, barney_shard: usize) {
    let mut net = granted(shards);
    // Barney attached earlier through a piggybacked attach on his channel 1.
    let (barney, barney_ch) = attached(&mut net, barney_shard, "barney@example.com");
    assert_eq!(barney_ch, 1);

    net.listener_config.profiles = vec![
        "http://iana.org/beep/TLS".into(),
        "http://iana.org/beep/SASL/DIGEST-MD5".into(),
        "http://iana.org/beep/APEX".into(),
    ];
    let fred = net.connect_raw(fred_shard, ConnKind::Edge);
    net.inject(fred, checked(I_GREETING));
    net.inject(fred, checked(START_ATTACH_FRED));
    net.inject(fred, checked(DATA_231));
    net.inject(fred, checked(ATTACH_REUSE));
    // The terminate's seqno 329 counts a 98-octet MSG 1 1 after 231: 231 + 98 = 329.
    net.inject(fred, checked(TERMINATE_0));

    let expected: Vec<Bytes> = [
        checked(L_GREETING_217),
        checked(RPY_START_OK),
        checked(RPY_1_0_OK),
        checked(ERR_555),
        checked(RPY_1_2_OK),
    ]
    .iter()
    .map(|f| Bytes::copy_from_slice(f))
    .collect();
    assert_eq!(
        show(&net.clients[fred].relay_data_frames()),
        show(&expected),
        "APEX-06/10/15/18, endpoint session"
    );

    // Delivery (RFC 3340 §4.4.4.1 step 5.3): the relay's first MSG on barney's channel 1 is the
    // data, byte-identical.
    let barney_frames = net.clients[barney].relay_data_frames();
    let delivery = barney_frames
        .iter()
        .find(|f| f.starts_with(b"MSG 1 "))
        .expect("delivered to barney");
    assert_eq!(
        text(delivery),
        text(&Bytes::from_static(DATA_231)),
        "delivery to barney"
    );
    // ...and barney answers it with `ok`.
    let from_barney = split_frames(&net.clients[barney].to_relay);
    assert!(
        from_barney.iter().any(|f| f[..] == *RPY_1_0_OK),
        "barney's RPY: {:?}",
        show(&from_barney)
    );
    assert_eq!(deliveries(&net, barney).len(), 1, "delivered once");
    // APEX-18: fred is detached everywhere.
    assert!(detached_everywhere(&net, "fred@example.com"));
}

#[test]
fn apex_13_1_endpoint_session_byte_exact() {
    run_13_1(1, 0, 0);
}

#[test]
fn apex_13_1_and_13_2_across_two_shards() {
    run_13_1(2, 0, 1);
    run_13_1(2, 1, 0);
}

/// BEEP-23 (RFC 3080 §2.3.1.2): a start carrying serverName and a piggybacked attach (229).
const START_ATTACH_SERVER_NAME: &[u8] = b"MSG 0 1 . 52 229\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1' serverName='apex.example.com'>\r\n   <profile uri='http://iana.org/beep/APEX'>\r\n      <![CDATA[<attach endpoint='fred@example.com' transID='1' />]]>\r\n   </profile>\r\n</start>\r\n";

/// BEEP-23: the serverName of the first successful `start` holds for the session, also when
/// that start carries a piggybacked attach (the channel is created whatever the attach meets,
/// RFC 3080 §2.3.1.2); a later start's serverName does not replace it.
#[test]
fn beep_23_server_name_of_a_start_with_piggyback_is_recorded() {
    let mut net = granted(1);
    let fred = net.connect_raw(0, ConnKind::Edge);
    net.inject(fred, checked(I_GREETING));
    let mut start = START_ATTACH_SERVER_NAME.to_vec();
    start.extend_from_slice(b"END\r\n");
    net.inject(fred, checked(&start));
    let frames = net.clients[fred].relay_data_frames();
    assert_eq!(
        text(&frames[1]),
        "RPY 0 1 . 111 109\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<ok />]]></profile>\r\nEND\r\n",
        "channel created, attach accepted"
    );
    let conn = net.clients[fred].conn;
    assert_eq!(
        net.shards[0].session(conn).unwrap().server_name(),
        Some("apex.example.com"),
        "BEEP-23: serverName of the first successful start"
    );
    // A second start (no piggyback) naming another server changes nothing.
    let second = b"Content-Type: application/beep+xml\r\n\r\n<start number='3' serverName='other.example.com'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\n";
    let frame = apex_proto::testing::frame_bytes(
        apex_proto::beep::frame::Keyword::Msg,
        0,
        2,
        false,
        52 + 229,
        second,
    );
    net.inject(fred, &frame);
    assert_eq!(
        net.clients[fred].relay_data_frames().len(),
        3,
        "second start accepted"
    );
    assert_eq!(
        net.shards[0].session(conn).unwrap().server_name(),
        Some("apex.example.com")
    );
}

/// The relay's answer to a document holding a character XML 1.0 §2.2 forbids.
const ERR_501_FORBIDDEN_CHAR: &[u8] = b"Content-Type: application/beep+xml\r\n\r\n<error code='501'>character not allowed in XML (XML 1.0 section 2.2)</error>\r\n";

/// Issue 19 item 12 (XML 1.0 §2.2, RFC 3340 §9.1): NUL, the other C0 controls but tab, line
/// feed and carriage return, U+FFFE and U+FFFF are not XML characters, written literally or
/// as character references, in `data-content` text, attribute values or diagnostics. Such a
/// document is refused with 501 (byte-exact) and nothing is relayed; the same channel and a
/// healthy pair alongside go on.
#[test]
fn xml_forbidden_characters_are_refused_with_501() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        let (barney, _) = attached(&mut net, shards - 1, "barney@example.com");
        let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
        let (betty, _) = attached(&mut net, shards - 1, "betty@example.com");
        // A valid data first: the channel's memo of the head is then the same as below, so
        // the check also holds on the path that reads only what follows the head.
        let (ok, _) = net.send(
            fred,
            ch,
            data("fred@example.com", &["barney@example.com"], "", "first"),
        );
        assert!(ok);
        let contents = [
            "nul \0 here",
            "start of heading \u{1}",
            "unit separator \u{1F}",
            "vertical tab \u{B}",
            "nonchar \u{FFFE}",
            "nonchar \u{FFFF}",
            "reference &#0;",
            "reference &#x1;",
            "reference &#xFFFE;",
            "reference &#65535;",
        ];
        for content in contents {
            let (ok, reply) = net.send(
                fred,
                ch,
                data("fred@example.com", &["barney@example.com"], "", content),
            );
            assert!(!ok, "{content:?}");
            assert_eq!(
                text(&reply),
                text(&Bytes::from_static(ERR_501_FORBIDDEN_CHAR)),
                "{content:?}"
            );
        }
        // In an attribute value, literal or referenced, and with options (the full parser).
        let in_attributes = [
            data("fred@example.com", &["barney\u{2}@example.com"], "", "x"),
            data("fred@example.com", &["barney&#x2;@example.com"], "", "x"),
            data(
                "fred@example.com",
                &["barney@example.com"],
                &status_request(5),
                "with an option &#8;",
            ),
        ];
        for payload in in_attributes {
            let (ok, reply) = net.send(fred, ch, payload.clone());
            assert!(!ok, "{}", text(&payload));
            assert_eq!(reply, Bytes::from_static(ERR_501_FORBIDDEN_CHAR));
        }
        // Anywhere in APEX XML: a terminate's diagnostic.
        let (ok, reply) = net.send(
            fred,
            ch,
            xml("<terminate transID='7'>bye &#x1B;</terminate>\r\n"),
        );
        assert!(!ok);
        assert_eq!(reply, Bytes::from_static(ERR_501_FORBIDDEN_CHAR));
        assert_eq!(
            deliveries(&net, barney).len(),
            1,
            "only the first was relayed"
        );
        // Tab, line feed and carriage return are characters, literal or referenced.
        let fine = data(
            "fred@example.com",
            &["barney@example.com"],
            "",
            "tab\there\r\nline &#9;&#xA;&#13; \u{FFFD} \u{10000}",
        );
        let (ok, _) = net.send(fred, ch, fine.clone());
        assert!(ok);
        assert_eq!(deliveries(&net, barney).last(), Some(&fine));
        // The healthy pair alongside was never disturbed.
        let (ok, _) = net.send(
            wilma,
            wch,
            data("wilma@example.com", &["betty@example.com"], "", "hello"),
        );
        assert!(ok);
        assert_eq!(deliveries(&net, betty).len(), 1);
    }
}

#[test]
fn apex_06_piggyback_reply_content() {
    let mut net = granted(1);
    let id = net.connect(0, ConnKind::Edge);
    let (channel, reply) = net.attach(id, "fred@example.com");
    assert_eq!((channel, reply.as_str()), (1, "<ok />"));
    // A failed piggybacked attach still creates the channel (RFC 3080 §2.3.1.2, RFC 3340 §4.2).
    let (channel, reply) = net.attach(id, "fred@other.org");
    assert_eq!(channel, 3);
    assert!(reply.starts_with("<error code='553'"), "{reply}");
    // ...and the application may retry with a MSG on it.
    let (ok, payload) = net.send(
        id,
        channel,
        xml("<attach endpoint='fred/appl=wb@example.com' transID='1' />\r\n"),
    );
    assert!(ok, "{}", text(&payload));
    assert_eq!(payload, msg::ok_payload(), "RPY <ok /> (46 octets)");
}

// ---------------------------------------------------------------------------------------------
// attach (APEX-10..15)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_10_reused_live_trans_id_555() {
    let mut net = granted(1);
    let (id, ch) = attached(&mut net, 0, "fred@example.com");
    let (ok, payload) = net.send(
        id,
        ch,
        xml("<attach endpoint='fred/appl=wb@example.com' transID='1' />\r\n"),
    );
    assert!(!ok);
    assert_eq!(
        payload,
        payload_of(ERR_555),
        "ERR 555 payload of the endpoint session"
    );
    // transIDs are channel-scoped (APEX-42): transID 1 on another channel is fine.
    let (ch3, _) = net.start(id, None);
    let (ok, _) = net.send(
        id,
        ch3,
        xml("<attach endpoint='fred/appl=wb@example.com' transID='1' />\r\n"),
    );
    assert!(ok, "APEX-42");
    // After terminate, the transID is free again.
    let (ok, _) = net.send(id, ch, xml("<terminate transID='1' />\r\n"));
    assert!(ok);
    let (ok, payload) = net.send(
        id,
        ch,
        xml("<attach endpoint='fred@example.com' transID='1' />\r\n"),
    );
    assert!(ok, "{}", text(&payload));
}

#[test]
fn apex_11_foreign_domain_553() {
    let mut net = granted(2);
    let id = net.connect(1, ConnKind::Edge);
    let (ch, reply) = net.attach(id, "fred@other.org");
    assert!(reply.starts_with("<error code='553'"), "{reply}");
    let (ok, payload) = net.send(
        id,
        ch,
        xml("<attach endpoint='fred@Other.Org' transID='2' />\r\n"),
    );
    assert!(!ok);
    assert_eq!(error_code(&payload), 553);
    // The domain compares case-insensitively (RFC 3340 §2.2.1 is silent on it; DNS names do).
    let (ok, _) = net.send(
        id,
        ch,
        xml("<attach endpoint='fred@EXAMPLE.com' transID='3' />\r\n"),
    );
    assert!(ok);
}

#[test]
fn apex_12_attach_on_mesh_or_as_service_537() {
    let mut net = granted(1);
    let mesh = net.connect(0, ConnKind::Mesh);
    let (_, reply) = net.attach(mesh, "fred@example.com");
    assert!(reply.starts_with("<error code='537'"), "mesh: {reply}");
    let edge = net.connect(0, ConnKind::Edge);
    let (ch, reply) = net.attach(edge, "apex=report@example.com");
    assert!(reply.starts_with("<error code='537'"), "service: {reply}");
    let (ok, payload) = net.send(
        edge,
        ch,
        xml("<attach endpoint='apex=access@example.com' transID='2' />\r\n"),
    );
    assert!(!ok);
    assert_eq!(error_code(&payload), 537);
    assert!(detached_everywhere(&net, "fred@example.com"));
}

#[test]
fn apex_13_options_before_duplicate_check_504() {
    // An unknown mustUnderstand option in attach is refused (targetHop ignored, APEX-37)
    // even when the endpoint is free.
    let mut net = granted(1);
    let id = net.connect(0, ConnKind::Edge);
    let (ch, _) = net.start(id, None);
    let (ok, payload) = net.send(
        id,
        ch,
        xml("<attach endpoint='fred@example.com' transID='1'>\r\n   <option external='http://example.org/x' targetHop='final' mustUnderstand='true' transID='9' />\r\n</attach>\r\n"),
    );
    assert!(!ok);
    assert_eq!(error_code(&payload), 504);
    assert!(detached_everywhere(&net, "fred@example.com"));
}

fn run_554(shards: usize, first: usize, second: usize) {
    let mut net = granted(shards);
    let (a, a_ch) = attached(&mut net, first, "fred@example.com");
    let b = net.connect(second, ConnKind::Edge);
    let (b_ch, reply) = net.attach(b, "fred@example.com");
    assert!(
        reply.starts_with("<error code='554'"),
        "APEX-14 shards {first}->{second}: {reply}"
    );
    let (ok, payload) = net.send(
        b,
        b_ch,
        xml("<attach endpoint='fred@example.com' transID='7' />\r\n"),
    );
    assert!(!ok);
    assert_eq!(error_code(&payload), 554);
    assert!(attached_everywhere(&net, "fred@example.com", a, a_ch));
    // Data still reaches the first application.
    let (w, w_ch) = attached(&mut net, second, "wilma@example.com");
    let (ok, _) = net.send(
        w,
        w_ch,
        data("wilma@example.com", &["fred@example.com"], "", "hi"),
    );
    assert!(ok);
    assert_eq!(deliveries(&net, a).len(), 1);
    assert_eq!(deliveries(&net, b).len(), 0);
    // Re-attaching on the same channel as the same endpoint with a new transID is not a
    // conflict with another application (step 5 speaks of "another application").
    let (ok, payload) = net.send(
        a,
        a_ch,
        xml("<attach endpoint='fred@example.com' transID='2' />\r\n"),
    );
    assert!(ok, "{}", text(&payload));
}

#[test]
fn apex_14_already_attached_554() {
    run_554(1, 0, 0);
}

#[test]
fn apex_14_554_across_shards_home_arbitrates() {
    for home in 0..2 {
        let fred = endpoint_homed("fred", 2, home);
        for (first, second) in [(0, 1), (1, 0)] {
            let mut net = granted(2);
            let (a, a_ch) = attached(&mut net, first, &fred);
            let b = net.connect(second, ConnKind::Edge);
            let (_, reply) = net.attach(b, &fred);
            assert!(
                reply.starts_with("<error code='554'"),
                "home {home}, {first}->{second}: {reply}"
            );
            assert!(attached_everywhere(&net, &fred, a, a_ch));
        }
    }
    run_554(2, 0, 1);
    run_554(2, 1, 0);
}

#[test]
fn apex_14_simultaneous_attaches_on_two_shards_one_wins() {
    for home in 0..2 {
        let fred = endpoint_homed("fred", 2, home);
        let mut net = granted(2);
        let a = net.connect(0, ConnKind::Edge);
        let b = net.connect(1, ConnKind::Edge);
        let doc = format!("<attach endpoint='{fred}' transID='1' />");
        // Both starts are on the wire before either relay answers.
        for id in [a, b] {
            let offer = apex_proto::beep::mgmt::ProfileOffer {
                uri: "http://iana.org/beep/APEX".into(),
                content: Some(Bytes::from(doc.clone())),
            };
            net.session(id).start_channel(vec![offer], None).unwrap();
        }
        net.drive();
        let outcome = |id: ClientId| text(net.clients[id].started[0].1.as_ref().unwrap());
        let (ra, rb) = (outcome(a), outcome(b));
        let oks = [&ra, &rb].iter().filter(|r| r.as_str() == "<ok />").count();
        assert_eq!(oks, 1, "home {home}: exactly one wins: {ra} / {rb}");
        let winner = if ra == "<ok />" { a } else { b };
        assert!(attached_everywhere(&net, &fred, winner, 1));
    }
}

// ---------------------------------------------------------------------------------------------
// attachOverride (OPT-05, RFC 3342 §1)
// ---------------------------------------------------------------------------------------------

const OVERRIDE_ATTACH: &str = "<attach endpoint='fred@example.com' transID='2'>\r\n   <option internal='attachOverride' transID='3' />\r\n</attach>\r\n";

fn run_override(shards: usize, old_shard: usize, new_shard: usize, home: usize) {
    let fred = endpoint_homed("fred", shards, home);
    let mut net = granted(shards);
    let (old, old_ch) = attached(&mut net, old_shard, &fred);
    let new = net.connect(new_shard, ConnKind::Edge);
    let (new_ch, _) = net.start(new, None);
    let (ok, payload) = net.send(
        new,
        new_ch,
        xml(&OVERRIDE_ATTACH.replace("fred@example.com", &fred)),
    );
    assert!(ok, "OPT-05: the override succeeds: {}", text(&payload));
    // The old application got a terminate for its attach transID with code 556.
    let got = net.clients[old].received_on(old_ch);
    assert_eq!(got.len(), 1, "one terminate to the old application");
    match msg::parse_message(&got[0], &ApexLimits::default()).unwrap() {
        Operation::Terminate { trans_id, code, .. } => assert_eq!((trans_id, code), (1, 556)),
        other => panic!("expected terminate, got {other:?}"),
    }
    assert!(attached_everywhere(&net, &fred, new, new_ch));
    // Data for fred now reaches the new application only.
    let (w, w_ch) = attached(&mut net, old_shard, "wilma@example.com");
    let (ok, _) = net.send(
        w,
        w_ch,
        data("wilma@example.com", &[&fred], "", "to the new one"),
    );
    assert!(ok);
    assert_eq!(deliveries(&net, new).len(), 1);
    assert_eq!(deliveries(&net, old).len(), 0);
    // The old application's transID 1 is no longer live: terminating it is 550 (APEX-19).
    let (ok, payload) = net.send(old, old_ch, xml("<terminate transID='1' />\r\n"));
    assert!(!ok);
    assert_eq!(error_code(&payload), 550);
    // The old channel closing does not detach the new attachment (APEX-16 applies to the old
    // one only, already ended).
    net.close_channel(old, old_ch);
    assert!(net.clients[old].closed.contains(&old_ch));
    assert!(attached_everywhere(&net, &fred, new, new_ch));
}

#[test]
fn opt_05_attach_override_terminates_old_with_556() {
    run_override(1, 0, 0, 0);
}

#[test]
fn opt_05_attach_override_across_shards() {
    for home in 0..2 {
        for (old, new) in [(0, 1), (1, 0), (0, 0), (1, 1)] {
            run_override(2, old, new, home);
        }
    }
}

#[test]
fn opt_05_override_terminate_bytes_match_digest() {
    // attachOverride (RFC 3342 §1), byte for byte: app #2's attach (152) is answered RPY 1 0 . 0 46
    // and app #1 receives MSG 1 0 . 0 107 `<terminate transID='1' code='556'>attachment
    // overridden</terminate>` (options::override_terminate_payload builds exactly this).
    let mut net = granted(1);
    let (old, _) = attached(&mut net, 0, "fred@example.com");
    let new = net.connect(0, ConnKind::Edge);
    let (ch, _) = net.start(new, None);
    assert_eq!(ch, 1);
    let (ok, _) = net.send(new, 1, payload_of(checked(ATTACH_OVERRIDE_152)));
    assert!(ok);
    let sent = split_frames(&net.clients[new].to_relay);
    assert!(
        sent.iter().any(|f| f[..] == *ATTACH_OVERRIDE_152),
        "{:?}",
        show(&sent)
    );
    assert!(net.clients[new]
        .relay_data_frames()
        .iter()
        .any(|f| f[..] == *RPY_1_0_OK));
    let old_frames = net.clients[old].relay_data_frames();
    let terminate = old_frames
        .iter()
        .find(|f| f.starts_with(b"MSG 1 0 "))
        .expect("terminate sent to app #1");
    assert_eq!(
        text(terminate),
        text(&Bytes::from_static(checked(TERMINATE_556_107))),
        "attachOverride terminate, byte for byte"
    );
}

// ---------------------------------------------------------------------------------------------
// terminate (APEX-18, APEX-19)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_18_terminate_zero_ends_every_association_of_the_session() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch1) = attached(&mut net, 0, "fred@example.com");
        let (ch3, reply) = net.attach(fred, "fred/appl=wb@example.com");
        assert_eq!(reply, "<ok />");
        // Pitfall 9: `<terminate />` is transID 0.
        let (ok, payload) = net.send(fred, ch1, xml("<terminate />\r\n"));
        assert!(ok, "{}", text(&payload));
        assert!(detached_everywhere(&net, "fred@example.com"));
        assert!(detached_everywhere(&net, "fred/appl=wb@example.com"));
        // No longer attached: data as fred is refused (APEX-22).
        let (ok, payload) = net.send(
            fred,
            ch3,
            data("fred@example.com", &["b@example.com"], "", "x"),
        );
        assert!(!ok);
        assert_eq!(error_code(&payload), 537);
        // Others may attach as them now.
        let (_, _) = attached(&mut net, shards - 1, "fred@example.com");
        let (_, _) = attached(&mut net, shards - 1, "fred/appl=wb@example.com");
    }
}

#[test]
fn apex_19_terminate_unknown_trans_id_550() {
    let mut net = granted(2);
    let (fred, ch1) = attached(&mut net, 1, "fred@example.com");
    let (ok, payload) = net.send(fred, ch1, xml("<terminate transID='42' />\r\n"));
    assert!(!ok);
    assert_eq!(
        payload,
        msg::error_payload(550, "unknown transaction-identifier"),
        "APEX-19"
    );
    // Channel scope: transID 1 lives on channel 1, not on channel 3.
    let (ch3, _) = net.start(fred, None);
    let (ok, payload) = net.send(fred, ch3, xml("<terminate transID='1' />\r\n"));
    assert!(!ok);
    assert_eq!(error_code(&payload), 550);
    assert!(attached_everywhere(&net, "fred@example.com", fred, ch1));
    // The known one ends the attachment; a second terminate of it is 550.
    let (ok, _) = net.send(fred, ch1, xml("<terminate transID='1' code='250' />\r\n"));
    assert!(ok);
    assert!(detached_everywhere(&net, "fred@example.com"));
    let (ok, payload) = net.send(fred, ch1, xml("<terminate transID='1' />\r\n"));
    assert!(!ok);
    assert_eq!(error_code(&payload), 550);
}

// ---------------------------------------------------------------------------------------------
// data authorization (APEX-22, APEX-17, APEX-32)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_22_data_for_a_foreign_originator_537() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    let (ok, payload) = net.send(
        fred,
        ch,
        data("wilma@example.com", &["barney@example.com"], "", "x"),
    );
    assert!(!ok);
    assert_eq!(
        payload,
        msg::error_payload(537, "not authorized to send as the originator")
    );
    // Attached as fred/appl=wb is not being fred (exact identity).
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred/appl=wb@example.com", &["barney@example.com"], "", "x"),
    );
    assert!(!ok);
    // A channel of another session where fred is not attached.
    let other = net.connect(0, ConnKind::Edge);
    let (och, _) = net.start(other, None);
    let (ok, payload) = net.send(
        other,
        och,
        data("fred@example.com", &["barney@example.com"], "", "x"),
    );
    assert!(!ok);
    assert_eq!(error_code(&payload), 537);
    assert_eq!(deliveries(&net, barney).len(), 0);
    // Attached on another channel of the same session is enough (session-wide, RFC 3340 §4.5.1).
    let (ch3, _) = net.start(fred, None);
    let (ok, _) = net.send(
        fred,
        ch3,
        data("fred@example.com", &["barney@example.com"], "", "x"),
    );
    assert!(ok);
    assert_eq!(deliveries(&net, barney).len(), 1);
}

#[test]
fn apex_17_13_5_bind_on_mesh_byte_exact_and_report_forwarded() {
    // Relay-relay session: example.com's relay binds to rubble.com's relay (RFC 3340 §4.4.2) and
    // forwards data with a per-data statusRequest; rubble.com delivers to barney and reports to
    // fred@example.com over the mesh (a Forward to example.com).
    let mut access = AccessTable::new();
    access
        .grant_domain(
            "rubble.com",
            ActorPattern::parse("*@example.com").unwrap(),
            vec![Access::CORE_DATA],
        )
        .unwrap();
    let mut net = RelayNet::with("rubble.com", 1, access, Vec::new());
    let (barney, _) = {
        let id = net.connect(0, ConnKind::Edge);
        let (ch, reply) = net.attach(id, "barney@rubble.com");
        assert_eq!(reply, "<ok />");
        (id, ch)
    };
    let peer = net.connect_raw(0, ConnKind::Mesh);
    net.inject(peer, checked(I_GREETING));
    net.inject(peer, checked(START_BIND));
    net.inject(peer, checked(DATA_283));
    let expected: Vec<String> = [L_GREETING_111, RPY_BIND_OK, RPY_1_0_OK]
        .iter()
        .map(|f| String::from_utf8_lossy(checked(f)).into_owned())
        .collect();
    assert_eq!(
        show(&net.clients[peer].relay_data_frames()),
        expected,
        "relay-relay session"
    );
    // Delivered to barney with the final options kept (APEX-35).
    let got = deliveries(&net, barney);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0], payload_of(DATA_283), "delivered unchanged");
    // The report goes back towards fred's domain.
    let back = net.forwards_to("example.com");
    assert_eq!(back.len(), 1, "one report forwarded");
    assert!(is_report(
        &back[0],
        "rubble.com",
        86,
        "barney@rubble.com",
        250
    ));
    assert_eq!(recipients_of(&back[0]), vec!["fred@example.com".to_owned()]);
}

#[test]
fn apex_17_32_bind_and_data_authorized_by_bound_domain() {
    for shards in [1, 2] {
        let mut access = AccessTable::new();
        access
            .grant_domain(
                "example.com",
                ActorPattern::parse("*@*").unwrap(),
                vec![Access::CORE_DATA],
            )
            .unwrap();
        let mut net = RelayNet::with("example.com", shards, access.clone(), Vec::new());
        let (barney, _) = attached(&mut net, 0, "barney@example.com");
        let peer = net.connect(shards - 1, ConnKind::Mesh);
        let (ch, reply) = net.bind(peer, "rubble.com");
        assert_eq!(reply, "<ok />", "APEX-17");
        // Same domain as the bound relay: accepted and delivered.
        let (ok, _) = net.send(
            peer,
            ch,
            data("wilma@rubble.com", &["barney@example.com"], "", "hi"),
        );
        assert!(ok, "APEX-32");
        assert_eq!(deliveries(&net, barney).len(), 1);
        // Another domain's originator through this relay: 537.
        let (ok, payload) = net.send(
            peer,
            ch,
            data("fred@other.org", &["barney@example.com"], "", "x"),
        );
        assert!(!ok);
        assert_eq!(error_code(&payload), 537, "APEX-32");
        // A live transID on the channel: 555 (APEX-17 step 1).
        let (ok, payload) = net.send(peer, ch, xml("<bind relay='other.org' transID='1' />\r\n"));
        assert!(!ok);
        assert_eq!(error_code(&payload), 555);
        // A second bind as other.org (new transID) authorizes its originators too.
        let (ok, _) = net.send(peer, ch, xml("<bind relay='other.org' transID='2' />\r\n"));
        assert!(ok);
        let (ok, _) = net.send(
            peer,
            ch,
            data("fred@other.org", &["barney@example.com"], "", "y"),
        );
        assert!(ok);
        assert_eq!(deliveries(&net, barney).len(), 2);
        // Unbound after terminate: refused again.
        let (ok, _) = net.send(peer, ch, xml("<terminate transID='2' />\r\n"));
        assert!(ok);
        let (ok, _) = net.send(
            peer,
            ch,
            data("fred@other.org", &["barney@example.com"], "", "z"),
        );
        assert!(!ok);

        // A trusted intermediary's data is accepted whatever the originator's domain.
        let mut net = RelayNet::with(
            "example.com",
            shards,
            access.clone(),
            vec!["rubble.com".into()],
        );
        let (barney, _) = attached(&mut net, 0, "barney@example.com");
        let peer = net.connect(0, ConnKind::Mesh);
        let (ch, _) = net.bind(peer, "rubble.com");
        let (ok, _) = net.send(
            peer,
            ch,
            data("fred@other.org", &["barney@example.com"], "", "t"),
        );
        assert!(ok, "trusted intermediary (APEX-32)");
        assert_eq!(deliveries(&net, barney).len(), 1);
    }
}

/// Relay-relay session: a bind carrying an unknown `mustUnderstand` option (155), refused with
/// 504 (109); the same bind with the option not marked `mustUnderstand` (133) and its `ok` (46).
const BIND_MUST_UNDERSTAND_155: &[u8] = b"MSG 1 0 . 0 155\r\nContent-Type: application/beep+xml\r\n\r\n<bind relay='other.org' transID='2'>\r\n   <option internal='x-unknown' mustUnderstand='true' transID='3' />\r\n</bind>\r\nEND\r\n";
const ERR_504_109: &[u8] = b"ERR 1 0 . 0 109\r\nContent-Type: application/beep+xml\r\n\r\n<error code='504'>option &apos;x-unknown&apos; not understood</error>\r\nEND\r\n";
const BIND_MAY_IGNORE_133: &[u8] = b"MSG 1 1 . 155 133\r\nContent-Type: application/beep+xml\r\n\r\n<bind relay='other.org' transID='2'>\r\n   <option internal='x-unknown' transID='5' />\r\n</bind>\r\nEND\r\n";
const RPY_1_1_OK_109: &[u8] =
    b"RPY 1 1 . 109 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

#[test]
fn apex_17_bind_with_unknown_must_understand_option_is_refused_with_504_byte_exact() {
    // RFC 3340 §4.4.2 step 3 and §5: the bind's options are processed after the 555 and 537
    // checks; an unknown option with mustUnderstand='true' is an error in processing (504, as
    // for attach), one without it is ignored. The refused bind leaves transID 2 free.
    let mut net = RelayNet::with("rubble.com", 1, AccessTable::new(), Vec::new());
    let peer = net.connect_raw(0, ConnKind::Mesh);
    net.inject(peer, checked(I_GREETING));
    net.inject(peer, checked(START_BIND));
    net.inject(peer, checked(BIND_MUST_UNDERSTAND_155));
    net.inject(peer, checked(BIND_MAY_IGNORE_133));
    let expected: Vec<String> = [L_GREETING_111, RPY_BIND_OK, ERR_504_109, RPY_1_1_OK_109]
        .iter()
        .map(|f| String::from_utf8_lossy(checked(f)).into_owned())
        .collect();
    assert_eq!(show(&net.clients[peer].relay_data_frames()), expected);
}

/// APEX-34 (RFC 3340 §5): data from fred carrying one option each, and the relay's answer. An
/// option has exactly one of `internal` and `external`, and `external` is an absolute URI
/// (RFC 3986 §4.3: a scheme, ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then `:`); otherwise
/// the data is refused with 501. A well-formed unknown option is ignored, or refused with 504
/// when it applies here with `mustUnderstand='true'` (APEX-36).
const APEX_34_EXCHANGES: &[(&str, &[u8], &[u8])] = &[
        (
            "both",
            b"MSG 1 0 . 0 306\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option internal='statusRequest' external='http://example.org/opt' transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"ERR 1 0 . 0 123\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>option needs exactly one of internal or absolute external</error>\r\nEND\r\n",
        ),
        (
            "neither",
            b"MSG 1 1 . 306 247\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"ERR 1 1 . 123 123\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>option needs exactly one of internal or absolute external</error>\r\nEND\r\n",
        ),
        (
            "relative",
            b"MSG 1 2 . 553 269\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option external='opt/status' transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"ERR 1 2 . 246 123\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>option needs exactly one of internal or absolute external</error>\r\nEND\r\n",
        ),
        (
            "bad scheme",
            b"MSG 1 3 . 822 270\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option external='1opt:status' transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"ERR 1 3 . 369 123\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>option needs exactly one of internal or absolute external</error>\r\nEND\r\n",
        ),
        (
            "path before colon",
            b"MSG 1 4 . 1092 270\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option external='/opt:status' transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"ERR 1 4 . 492 123\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>option needs exactly one of internal or absolute external</error>\r\nEND\r\n",
        ),
        (
            "valid, may be ignored",
            b"MSG 1 5 . 1362 283\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option external='http://example.org/opt#x' transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"RPY 1 5 . 615 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
        ),
        (
            "valid, mustUnderstand here",
            b"MSG 1 6 . 1645 315\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <option external='x-apex.test+1:opt' targetHop='this' mustUnderstand='true' transID='7' />\r\n   <data-content Name='Content'>hi</data-content>\r\n</data>\r\nEND\r\n",
            b"ERR 1 6 . 661 117\r\nContent-Type: application/beep+xml\r\n\r\n<error code='504'>option &apos;x-apex.test+1:opt&apos; not understood</error>\r\nEND\r\n",
        ),
];

#[test]
fn apex_34_option_identity_is_one_internal_or_one_absolute_external_byte_exact() {
    let mut net = granted(1);
    attached(&mut net, 0, "barney@example.com");
    let fred = net.connect_raw(0, ConnKind::Edge);
    net.inject(fred, checked(I_GREETING));
    net.inject(fred, checked(START_ATTACH_FRED));
    for (_, request, _) in APEX_34_EXCHANGES {
        net.inject(fred, checked(request));
    }
    let frames = net.clients[fred].relay_data_frames();
    assert_eq!(
        frames.len(),
        2 + APEX_34_EXCHANGES.len(),
        "{:?}",
        show(&frames)
    );
    // The start's reply carries seqno 111, as the relay-relay vector does.
    assert_eq!(
        show(&frames[..2]),
        show(&[
            Bytes::from_static(L_GREETING_111),
            Bytes::from_static(RPY_BIND_OK)
        ])
    );
    for ((case, _, reply), got) in APEX_34_EXCHANGES.iter().zip(&frames[2..]) {
        assert_eq!(text(got), String::from_utf8_lossy(checked(reply)), "{case}");
    }
}

/// BEEP-41 (RFC 3080 §2.7; RFC 3340 §4.4: `ok` and `error` are only replies): an `ok` (46) and
/// an `error` (79) sent as MSGs on an APEX channel are answered with ERR 501 (104 each), and
/// the channel goes on.
const MSG_OK_46: &[u8] =
    b"MSG 1 0 . 0 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";
const ERR_1_0_501: &[u8] = b"ERR 1 0 . 0 104\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>ok and error are replies, not requests</error>\r\nEND\r\n";
const MSG_ERROR_79: &[u8] = b"MSG 1 1 . 46 79\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>not a request</error>\r\nEND\r\n";
const ERR_1_1_501: &[u8] = b"ERR 1 1 . 104 104\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>ok and error are replies, not requests</error>\r\nEND\r\n";
const DATA_1_2: &[u8] = b"MSG 1 2 . 125 231\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n";
const RPY_1_2_OK_208: &[u8] =
    b"RPY 1 2 . 208 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

#[test]
fn beep_41_ok_and_error_sent_as_msg_get_501_byte_exact() {
    let mut net = granted(1);
    attached(&mut net, 0, "barney@example.com");
    let fred = net.connect_raw(0, ConnKind::Edge);
    for frame in [
        I_GREETING,
        START_ATTACH_FRED,
        MSG_OK_46,
        MSG_ERROR_79,
        DATA_1_2,
    ] {
        net.inject(fred, checked(frame));
    }
    let expected: Vec<String> = [
        L_GREETING_111,
        RPY_BIND_OK, // the start's `ok`, at seqno 111
        ERR_1_0_501,
        ERR_1_1_501,
        RPY_1_2_OK_208,
    ]
    .iter()
    .map(|f| String::from_utf8_lossy(checked(f)).into_owned())
    .collect();
    assert_eq!(show(&net.clients[fred].relay_data_frames()), expected);
}

/// BEEP-30 on APEX channels (RFC 3080 §2.3.1.5; RFC 3340 §4.4 uses BEEP's `error`): to an
/// application whose greeting asks for French first (69), the relay's English diagnostics say
/// `xml:lang='en'`, in the `error` piggybacked on the start's reply (a refused attach: 197,
/// 186) and in an ERR on the channel (46, 118). Unlabelled without `localize`: see
/// `beep_41_ok_and_error_sent_as_msg_get_501_byte_exact`.
const I_GREETING_FR_69: &[u8] = b"RPY 0 0 . 0 69\r\nContent-Type: application/beep+xml\r\n\r\n<greeting localize='fr en' />\r\nEND\r\n";
const START_ATTACH_FOREIGN_197: &[u8] = b"MSG 0 1 . 69 197\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>\r\n      <![CDATA[<attach endpoint='fred@other.org' transID='1' />]]>\r\n   </profile>\r\n</start>\r\nEND\r\n";
const RPY_START_553_EN_186: &[u8] = b"RPY 0 1 . 111 186\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<error code='553' xml:lang='en'>endpoint is not in this relay&apos;s domain</error>]]></profile>\r\nEND\r\n";
const MSG_OK_46_FR: &[u8] =
    b"MSG 1 0 . 0 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";
const ERR_501_EN_118: &[u8] = b"ERR 1 0 . 0 118\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501' xml:lang='en'>ok and error are replies, not requests</error>\r\nEND\r\n";

#[test]
fn beep_30_apex_errors_say_xml_lang_to_a_peer_asking_for_another_language() {
    let mut net = granted(1);
    let app = net.connect_raw(0, ConnKind::Edge);
    for frame in [I_GREETING_FR_69, START_ATTACH_FOREIGN_197, MSG_OK_46_FR] {
        net.inject(app, checked(frame));
    }
    let expected: Vec<String> = [L_GREETING_111, RPY_START_553_EN_186, ERR_501_EN_118]
        .iter()
        .map(|f| String::from_utf8_lossy(checked(f)).into_owned())
        .collect();
    assert_eq!(show(&net.clients[app].relay_data_frames()), expected);
}

#[test]
fn apex_17_bind_on_edge_or_unbound_mesh_537() {
    let mut net = granted(1);
    let edge = net.connect(0, ConnKind::Edge);
    let (_, reply) = net.bind(edge, "rubble.com");
    assert!(reply.starts_with("<error code='537'"), "{reply}");
    let mesh = net.connect(0, ConnKind::Mesh);
    let (ch, _) = net.start(mesh, None);
    let (ok, payload) = net.send(
        mesh,
        ch,
        data("wilma@rubble.com", &["barney@example.com"], "", "x"),
    );
    assert!(!ok, "data on an unbound mesh channel");
    assert_eq!(error_code(&payload), 537);
}

// ---------------------------------------------------------------------------------------------
// access (ACC-19, pitfall 8)
// ---------------------------------------------------------------------------------------------

#[test]
fn acc_19_defaults_deny_core_data_between_ordinary_endpoints() {
    for shards in [1, 2] {
        let mut net = RelayNet::new("example.com", shards);
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        let (barney, _) = attached(&mut net, shards - 1, "barney@example.com");
        let options = status_request(5);
        let (ok, _) = net.send(
            fred,
            ch,
            data("fred@example.com", &["barney@example.com"], &options, "x"),
        );
        assert!(ok, "ok means accepted, not delivered (pitfall 7)");
        assert!(
            deliveries(&net, barney).is_empty(),
            "pitfall 8: denied by the defaults"
        );
        let r = reports(&net, fred);
        assert_eq!(r.len(), 1);
        assert!(
            is_report(&r[0], "example.com", 5, "barney@example.com", 537),
            "{}",
            text(&r[0])
        );
        // The owner itself is granted all:all by the defaults.
        let (ok, _) = net.send(
            fred,
            ch,
            data("fred@example.com", &["fred@example.com"], "", "me"),
        );
        assert!(ok);
        assert_eq!(deliveries(&net, fred).len(), 1, "owner default entry");
    }
}

#[test]
fn acc_19_grant_allows_only_the_granted_actor() {
    let mut access = AccessTable::new();
    access.grant(
        ep("barney@example.com"),
        ActorPattern::parse("fred@example.com").unwrap(),
        vec![Access::CORE_DATA],
    );
    for shards in [1, 2] {
        let mut net = RelayNet::with("example.com", shards, access.clone(), Vec::new());
        let (fred, fch) = attached(&mut net, 0, "fred@example.com");
        let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
        let (barney, _) = attached(&mut net, shards - 1, "barney@example.com");
        let (ok, _) = net.send(
            fred,
            fch,
            data("fred@example.com", &["barney@example.com"], "", "from fred"),
        );
        assert!(ok);
        let (ok, _) = net.send(
            wilma,
            wch,
            data(
                "wilma@example.com",
                &["barney@example.com"],
                &status_request(3),
                "from wilma",
            ),
        );
        assert!(ok);
        let got = deliveries(&net, barney);
        assert_eq!(got.len(), 1);
        assert!(text(&got[0]).contains("from fred"));
        let r = reports(&net, wilma);
        assert_eq!(r.len(), 1);
        assert!(is_report(
            &r[0],
            "example.com",
            3,
            "barney@example.com",
            537
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// statusRequest (APEX-38, APEX-39, OPT-02/03)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_38_13_3_status_report_byte_exact() {
    for (shards, fred_shard, barney_shard) in [(1, 0, 0), (2, 0, 1), (2, 1, 0)] {
        let mut net = granted(shards);
        let (barney, _) = attached(&mut net, barney_shard, "barney@example.com");
        net.listener_config.profiles = vec![
            "http://iana.org/beep/TLS".into(),
            "http://iana.org/beep/SASL/DIGEST-MD5".into(),
            "http://iana.org/beep/APEX".into(),
        ];
        let fred = net.connect_raw(fred_shard, ConnKind::Edge);
        net.inject(fred, checked(I_GREETING));
        net.inject(fred, checked(START_ATTACH_FRED));
        net.inject(fred, checked(DATA_302));
        let expected: Vec<String> = [L_GREETING_217, RPY_START_OK, RPY_1_0_OK, REPORT_416]
            .iter()
            .map(|f| String::from_utf8_lossy(checked(f)).into_owned())
            .collect();
        assert_eq!(
            show(&net.clients[fred].relay_data_frames()),
            expected,
            "status report with {shards} shard(s)"
        );
        net.inject(fred, checked(FRED_ACCEPTS_REPORT));
        // Barney received the data with its per-recipient option (final relays strip nothing).
        let got = deliveries(&net, barney);
        assert_eq!(got, vec![payload_of(DATA_302)]);
        // The report carries no statusRequest (APEX-39).
        assert!(!text(&payload_of(REPORT_416)).contains("statusRequest"));
    }
}

#[test]
fn apex_38_report_codes() {
    let mut net = granted(2);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 1, "barney@example.com");
    net.clients[barney].auto_reply = false;
    // Per-data statusRequest, three recipients: barney (refuses), wilma (not attached),
    // betty (accepts).
    let (betty, _) = attached(&mut net, 1, "betty@example.com");
    let (ok, _) = net.send(
        fred,
        ch,
        data(
            "fred@example.com",
            &[
                "barney@example.com",
                "wilma@example.com",
                "betty@example.com",
            ],
            &status_request(77),
            "hello",
        ),
    );
    assert!(ok);
    // Each local recipient got data holding only itself (APEX-25).
    assert_eq!(
        recipients_of(&deliveries(&net, betty)[0]),
        vec!["betty@example.com".to_owned()]
    );
    let (bch, bmsgno, bpayload) = net.clients[barney].received[0].clone();
    assert_eq!(
        recipients_of(&bpayload),
        vec!["barney@example.com".to_owned()]
    );
    net.reply(
        barney,
        bch,
        bmsgno,
        false,
        msg::error_payload(550, "unknown endpoint identity"),
    );
    let r = reports(&net, fred);
    assert_eq!(r.len(), 3, "{:?}", r.iter().map(text).collect::<Vec<_>>());
    assert!(r
        .iter()
        .any(|p| is_report(p, "example.com", 77, "wilma@example.com", 550)));
    assert!(r
        .iter()
        .any(|p| is_report(p, "example.com", 77, "betty@example.com", 250)));
    assert!(r
        .iter()
        .any(|p| is_report(p, "example.com", 77, "barney@example.com", 550)));
    for p in &r {
        assert_eq!(recipients_of(p), vec!["fred@example.com".to_owned()]);
        assert!(!text(p).contains("statusRequest"), "APEX-39");
    }
}

#[test]
fn apex_39_no_report_on_a_report() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    // Data carrying a statusResponse must not carry a statusRequest; one that does is not
    // honoured (OPT-03).
    let content = "<statusResponse transID='5'><destination identity='x@example.com'><reply code='250' transID='5' /></destination></statusResponse>";
    let (ok, _) = net.send(
        fred,
        ch,
        data(
            "fred@example.com",
            &["barney@example.com", "nobody@example.com"],
            &status_request(9),
            content,
        ),
    );
    assert!(ok);
    assert_eq!(net.clients[barney].received.len(), 1, "delivered");
    assert!(
        net.clients[fred].received.is_empty(),
        "no report on a report"
    );
    // Control: the same data without the statusResponse content is reported twice.
    let (ok, _) = net.send(
        fred,
        ch,
        data(
            "fred@example.com",
            &["barney@example.com", "nobody@example.com"],
            &status_request(9),
            "plain",
        ),
    );
    assert!(ok);
    assert_eq!(reports(&net, fred).len(), 2);
}

// ---------------------------------------------------------------------------------------------
// options: mustUnderstand (APEX-36, OPT-01), dataHopping (OPT-17)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_36_unknown_must_understand_per_data_option_504() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    for hop in ["all", "this"] {
        let option = format!(
            "   <option external='http://example.org/unknown' targetHop='{hop}' mustUnderstand='true' transID='4' />\r\n"
        );
        let (ok, payload) = net.send(
            fred,
            ch,
            data("fred@example.com", &["barney@example.com"], &option, "x"),
        );
        assert!(!ok, "targetHop={hop}");
        assert_eq!(error_code(&payload), 504, "APEX-36 targetHop={hop}");
    }
    let option = "   <option internal='noSuchOption' targetHop='all' mustUnderstand='true' transID='4' />\r\n";
    let (ok, payload) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@example.com"], option, "x"),
    );
    assert!(!ok);
    assert_eq!(error_code(&payload), 504);
    assert!(deliveries(&net, barney).is_empty());
    // Not mustUnderstand: ignored, delivered with the option kept (OPT-01).
    let option =
        "   <option external='http://example.org/unknown' targetHop='all' transID='4' />\r\n";
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@example.com"], option, "y"),
    );
    assert!(ok);
    let got = deliveries(&net, barney);
    assert_eq!(got.len(), 1);
    assert!(text(&got[0]).contains("http://example.org/unknown"));
}

#[test]
fn apex_36_unknown_must_understand_final_option_fails_at_the_final_relay() {
    // targetHop='final' (explicit or default): the option cannot be known to apply when the
    // data arrives, so the data is accepted; but this relay *is* the final relay for a local
    // recipient, so the option applies there, is not understood, and the recipient must fail
    // (RFC 3340 §5: "an error in processing has occurred"; the RFC names no code, and after the
    // ok the affected recipients can only fail and be reported).
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    let options = format!(
        "   <option external='http://example.org/unknown' mustUnderstand='true' transID='4' />\r\n{}",
        status_request(8)
    );
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@example.com"], &options, "x"),
    );
    assert!(
        ok,
        "accepted: the final-hop option cannot be judged at step 2"
    );
    assert!(
        deliveries(&net, barney).is_empty(),
        "APEX-36: an applicable unknown mustUnderstand option at the final relay must not be delivered"
    );
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1, "the failure is reported (statusRequest)");
}

#[test]
fn apex_36_unknown_must_understand_per_recipient_option_fails_that_recipient() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    let (betty, _) = attached(&mut net, 0, "betty@example.com");
    let payload = Bytes::from(format!(
        "{HEADERS}<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com'>\r\n      <option external='http://example.org/unknown' mustUnderstand='true' transID='4' />\r\n      <option internal='statusRequest' transID='12' />\r\n   </recipient>\r\n   <recipient identity='betty@example.com' />\r\n   <data-content Name='Content'>x</data-content>\r\n</data>\r\n"
    ));
    let (ok, _) = net.send(fred, ch, payload);
    assert!(ok);
    assert!(deliveries(&net, barney).is_empty());
    assert_eq!(deliveries(&net, betty).len(), 1);
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1);
    assert!(
        is_report(&r[0], "example.com", 12, "barney@example.com", 504),
        "{}",
        text(&r[0])
    );
}

const HOPPING_1: &str = "   <option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='90'>\r\n      <dataHopping noMoreThan='1' reportErrors='true' />\r\n   </option>\r\n";

#[test]
fn opt_17_data_hopping_exhausted_is_dropped_and_reported() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, shards - 1, "fred@example.com");
        let (ok, _) = net.send(
            fred,
            ch,
            data(
                "fred@example.com",
                &["barney@rubble.com"],
                HOPPING_1,
                "loop?",
            ),
        );
        assert!(ok);
        assert!(net.forwards_to("rubble.com").is_empty(), "OPT-17: not sent");
        let r = reports(&net, fred);
        assert_eq!(r.len(), 1, "OPT-17: error report");
        assert!(
            is_report(&r[0], "example.com", 90, "barney@rubble.com", 550),
            "{}",
            text(&r[0])
        );
        assert!(!text(&r[0]).contains("statusRequest"));

        // From a bound relay, originator remote: the report itself goes over the mesh.
        let peer = net.connect(0, ConnKind::Mesh);
        let (pch, _) = net.bind(peer, "rubble.com");
        let (ok, _) = net.send(
            peer,
            pch,
            data("wilma@rubble.com", &["x@other.org"], HOPPING_1, "loop?"),
        );
        assert!(ok);
        assert!(net.forwards_to("other.org").is_empty());
        let back = net.forwards_to("rubble.com");
        assert_eq!(back.len(), 1);
        assert!(is_report(&back[0], "example.com", 90, "x@other.org", 550));
        assert_eq!(recipients_of(&back[0]), vec!["wilma@rubble.com".to_owned()]);
        for f in &net.forwards {
            assert_eq!(
                f.shard,
                domain_shard(&f.domain, shards),
                "owner shard sends"
            );
        }
    }
}

#[test]
fn opt_17_data_hopping_decremented_when_forwarded() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let options = HOPPING_1.replace("noMoreThan='1'", "noMoreThan='2'");
    let sent = data("fred@example.com", &["barney@rubble.com"], &options, "hop");
    let (ok, _) = net.send(fred, ch, sent.clone());
    assert!(ok);
    let out = net.forwards_to("rubble.com");
    assert_eq!(out.len(), 1);
    assert_eq!(
        text(&out[0]),
        text(&sent).replace("noMoreThan='2'", "noMoreThan='1'"),
        "only the dataHopping element changes"
    );
    // Local delivery does not decrement (RFC 3342 §4).
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    let sent = data(
        "fred@example.com",
        &["barney@example.com"],
        HOPPING_1,
        "local",
    );
    let (ok, _) = net.send(fred, ch, sent.clone());
    assert!(ok);
    assert_eq!(deliveries(&net, barney), vec![sent]);
}

// ---------------------------------------------------------------------------------------------
// Forwarding (APEX-24, APEX-26, APEX-28)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_24_26_one_forward_per_domain_with_only_its_recipients() {
    for shards in [1, 2, 3] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        let (barney, _) = attached(&mut net, shards - 1, "barney@example.com");
        let content = "<p a='1'>&amp; <![CDATA[<raw>]]></p>";
        let sent = data(
            "fred@example.com",
            &[
                "a@rubble.com",
                "barney@example.com",
                "c@other.org",
                "b@Rubble.com",
            ],
            "",
            content,
        );
        let (ok, _) = net.send(fred, ch, sent.clone());
        assert!(ok);
        assert_eq!(
            net.forwards.len(),
            2,
            "one Forward per domain ({shards} shards)"
        );
        let rubble = net.forwards_to("rubble.com");
        assert_eq!(rubble.len(), 1);
        assert_eq!(
            recipients_of(&rubble[0]),
            vec!["a@rubble.com".to_owned(), "b@Rubble.com".to_owned()]
        );
        let other = net.forwards_to("other.org");
        assert_eq!(other.len(), 1);
        assert_eq!(recipients_of(&other[0]), vec!["c@other.org".to_owned()]);
        let orig = parse_data(&sent);
        for f in rubble.iter().chain(&other) {
            let d = parse_data(f);
            assert_eq!(
                d.data_content, orig.data_content,
                "APEX-28: content bytes kept"
            );
            assert_eq!(d.originator.raw, orig.originator.raw);
        }
        for f in &net.forwards {
            assert_eq!(f.shard, domain_shard(&f.domain, shards));
        }
        let got = deliveries(&net, barney);
        assert_eq!(got.len(), 1);
        assert_eq!(
            recipients_of(&got[0]),
            vec!["barney@example.com".to_owned()]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Lifetime of attachments (APEX-16)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_16_channel_close_detaches() {
    for shards in [1, 2] {
        for home in 0..shards {
            let barney_ep = endpoint_homed("barney", shards, home);
            let mut net = granted(shards);
            let (fred, fch) = attached(&mut net, 0, "fred@example.com");
            let (barney, bch) = attached(&mut net, shards - 1, &barney_ep);
            assert!(attached_everywhere(&net, &barney_ep, barney, bch));
            net.close_channel(barney, bch);
            assert!(net.clients[barney].closed.contains(&bch));
            assert!(
                detached_everywhere(&net, &barney_ep),
                "APEX-16 channel close"
            );
            let (ok, _) = net.send(
                fred,
                fch,
                data("fred@example.com", &[&barney_ep], &status_request(1), "x"),
            );
            assert!(ok);
            let r = reports(&net, fred);
            assert!(is_report(&r[0], "example.com", 1, &barney_ep, 550));
            // Attachable again elsewhere.
            let (_, _) = attached(&mut net, 0, &barney_ep);
        }
    }
}

#[test]
fn apex_16_conn_close_detaches() {
    for shards in [1, 2] {
        for home in 0..shards {
            let barney_ep = endpoint_homed("barney", shards, home);
            let mut net = granted(shards);
            let (barney, _) = attached(&mut net, shards - 1, &barney_ep);
            let (_, _) = net.attach(barney, "barney/appl=wb@example.com");
            net.disconnect(barney);
            assert!(detached_everywhere(&net, &barney_ep), "APEX-16 session end");
            assert!(detached_everywhere(&net, "barney/appl=wb@example.com"));
            let (_, _) = attached(&mut net, 0, &barney_ep);
        }
    }
}

#[test]
fn apex_16_conn_closed_while_a_remote_attach_is_pending() {
    // The endpoint's home is another shard; the connection ends after the AttachRequest left
    // but before the verdict came back. The attachment must not outlive the session: another
    // application must be able to attach afterwards.
    let fred = endpoint_homed("fred", 2, 1);
    let mut net = granted(2);
    let a = net.connect(0, ConnKind::Edge);
    let offer = apex_proto::beep::mgmt::ProfileOffer {
        uri: "http://iana.org/beep/APEX".into(),
        content: Some(Bytes::from(format!(
            "<attach endpoint='{fred}' transID='1' />"
        ))),
    };
    net.session(a).start_channel(vec![offer], None).unwrap();
    net.pause_mesh = true;
    net.drive();
    net.disconnect(a);
    net.pause_mesh = false;
    net.drive();
    assert!(
        detached_everywhere(&net, &fred),
        "APEX-16: stale attachment left in the directory"
    );
    let b = net.connect(1, ConnKind::Edge);
    let (_, reply) = net.attach(b, &fred);
    assert_eq!(
        reply, "<ok />",
        "APEX-16: a dead session still holds the endpoint"
    );
}

// ---------------------------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------------------------

fn pipelined(shards: usize, fred_shard: usize, barney_shard: usize) {
    const N: usize = 5_000;
    let mut net = granted(shards);
    let (fred, ch) = attached(&mut net, fred_shard, "fred@example.com");
    let (barney, bch) = attached(&mut net, barney_shard, "barney@example.com");
    let mut msgnos = Vec::with_capacity(N);
    for i in 0..N {
        let payload = data(
            "fred@example.com",
            &["barney@example.com"],
            "",
            &format!("m{i}"),
        );
        msgnos.push(net.send_nowait(fred, ch, payload));
    }
    net.drive();
    for (i, msgno) in msgnos.iter().enumerate() {
        let (kind, _) = net.clients[fred]
            .reply_to(ch, *msgno)
            .unwrap_or_else(|| panic!("no reply to message {i}"));
        assert_eq!(kind, ReplyKind::Rpy);
    }
    let got = net.clients[barney].received_on(bch);
    assert_eq!(got.len(), N, "each delivered once");
    for (i, p) in got.iter().enumerate() {
        assert!(
            text(p).contains(&format!("<data-content Name='Content'>m{i}</data-content>")),
            "message {i} out of order"
        );
    }
    assert!(net.clients[fred].error.is_none() && net.clients[barney].error.is_none());
}

#[test]
fn pipelined_5000_in_order_one_shard() {
    pipelined(1, 0, 0);
}

#[test]
fn pipelined_5000_in_order_two_shards() {
    pipelined(2, 0, 1);
}

// ---------------------------------------------------------------------------------------------
// Reports when a delivery is abandoned (APEX-25, APEX-38, OPT-02)
// ---------------------------------------------------------------------------------------------

#[test]
fn apex_38_report_when_recipient_leaves_while_delivery_crosses_shards() {
    // fred on shard 0, barney on shard 1; barney's session ends while the Deliver envelope is
    // in the shard queue. The recipient was not processed: fred asked for a status and must get
    // a failure report.
    let mut net = granted(2);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 1, "barney@example.com");
    net.pause_mesh = true;
    let msgno = net.send_nowait(
        fred,
        ch,
        data(
            "fred@example.com",
            &["barney@example.com"],
            &status_request(31),
            "x",
        ),
    );
    net.drive();
    assert!(net.clients[fred].reply_to(ch, msgno).is_some());
    net.disconnect(barney);
    net.pause_mesh = false;
    net.drive();
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1, "one report");
    assert!(
        is_report(&r[0], "example.com", 31, "barney@example.com", 550),
        "{}",
        text(&r[0])
    );
}

#[test]
fn apex_38_report_when_recipient_leaves_before_answering() {
    // The data reached barney's application, which never answered before its session ended.
    // Success needs the application's ok (APEX-25), so the recipient failed; the statusRequest
    // asks the delivering relay for a statusResponse (APEX-38, OPT-02: "when delivery is
    // abandoned").
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        let (barney, _) = attached(&mut net, shards - 1, "barney@example.com");
        net.clients[barney].auto_reply = false;
        let (ok, _) = net.send(
            fred,
            ch,
            data(
                "fred@example.com",
                &["barney@example.com"],
                &status_request(32),
                "x",
            ),
        );
        assert!(ok);
        assert_eq!(
            net.clients[barney].received.len(),
            1,
            "delivered, not answered"
        );
        net.disconnect(barney);
        let r = reports(&net, fred);
        assert_eq!(
            r.len(),
            1,
            "{shards} shard(s): the abandoned delivery must be reported"
        );
        let t = text(&r[0]);
        assert!(
            t.contains("<statusResponse transID='32'>")
                && t.contains("<destination identity='barney@example.com'>")
                && !t.contains("<reply code='250'"),
            "a failure status for barney: {t}"
        );
    }
}

#[test]
fn apex_25_data_overtaking_the_attached_broadcast_reaches_the_recipient() {
    // barney attaches on its home shard 0 and is answered ok at once; the broadcast that tells
    // shard 1 is still in the shard queue when fred's data arrives on shard 1. barney is
    // attached (its application was told so), so the data must reach it (APEX-25): shard 1
    // asks the recipient's home shard instead of trusting its stale replica.
    let barney_ep = endpoint_homed("barney", 2, 0);
    let fred_ep = endpoint_homed("fred", 2, 1);
    let mut net = granted(2);
    let (fred, ch) = attached(&mut net, 1, &fred_ep);
    net.pause_mesh = true;
    let (barney, bch) = attached(&mut net, 0, &barney_ep);
    let msgno = net.send_nowait(
        fred,
        ch,
        data(&fred_ep, &[&barney_ep], &status_request(41), "overtaking"),
    );
    net.drive();
    assert_eq!(
        net.clients[fred].reply_to(ch, msgno).map(|(k, _)| k),
        Some(ReplyKind::Rpy),
        "accepted"
    );
    net.pause_mesh = false;
    net.drive();
    let got = net.clients[barney].received_on(bch);
    assert_eq!(got.len(), 1, "delivered once");
    assert!(text(&got[0]).contains(">overtaking<"), "{}", text(&got[0]));
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1, "one report");
    assert!(
        is_report(&r[0], "example.com", 41, &barney_ep, 250),
        "{}",
        text(&r[0])
    );
}

#[test]
fn opt_14_held_data_from_a_non_home_shard_is_released_once() {
    // hold4Endpoint data arrives on shard 1 for an endpoint whose home is shard 0 and which is
    // not attached: it is held (at the home shard) and delivered exactly once when it attaches
    // on either shard.
    for attach_on in [0, 1] {
        let barney_ep = endpoint_homed("barney", 2, 0);
        let fred_ep = endpoint_homed("fred", 2, 1);
        let mut net = granted(2);
        let (fred, ch) = attached(&mut net, 1, &fred_ep);
        let hold = "   <option internal='hold4Endpoint' transID='7' />\r\n";
        let (positive, _) = net.send(fred, ch, data(&fred_ep, &[&barney_ep], hold, "held"));
        assert!(positive);
        let (barney, bch) = attached(&mut net, attach_on, &barney_ep);
        let got = net.clients[barney].received_on(bch);
        assert_eq!(
            got.len(),
            1,
            "released once (attached on shard {attach_on})"
        );
        assert!(text(&got[0]).contains(">held<"));
    }
}

#[test]
fn apex_45_the_report_service_takes_no_requests_and_unknown_services_are_550() {
    // Data for a well-known endpoint of this domain goes to the relay's service module, on
    // every shard, not to an attachment: the report service refuses requests (consumers
    // initiate nothing, RFC 3340 §6.2) and an address no service has is not there.
    for (shards, fred_shard) in [(1, 0), (2, 0), (2, 1)] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, fred_shard, "fred@example.com");
        for (trans_id, service, why) in [
            (
                5,
                "apex=report@example.com",
                "the report service takes no requests",
            ),
            (6, "apex=nothing@example.com", "no such service"),
        ] {
            let (ok, _) = net.send(
                fred,
                ch,
                data(
                    "fred@example.com",
                    &[service],
                    &status_request(trans_id),
                    "hi",
                ),
            );
            assert!(ok, "accepted, then reported ({shards} shard(s))");
            let found = reports(&net, fred).iter().any(|r| {
                is_report(r, "example.com", trans_id, service, 550) && text(r).contains(why)
            });
            assert!(
                found,
                "{service}: {:?}",
                reports(&net, fred).iter().map(text).collect::<Vec<_>>()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replies to the relay's deliveries (BEEP-15, issue 19 item 5)
// ---------------------------------------------------------------------------------------------

/// The payload of an APEX reply with `body`.
fn reply_body(body: &str) -> Bytes {
    xml(body)
}

/// BEEP-15 (RFC 3080 §2.2.2.1, RFC 3340 §9.1): a RPY to a delivery that is not `ok` is not a
/// success. A poorly formed one fails that delivery (reported, 550) and the relay closes the
/// channel: at once it delivers nothing more there, and asks to close it (code 500, byte-exact)
/// once its MSGs already sent there are answered; the attachment then ends. A healthy pair on
/// the same shards goes on throughout.
#[test]
fn beep_15_a_poorly_formed_reply_fails_the_delivery_and_closes_the_channel() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        let (barney, bch) = attached(&mut net, shards - 1, "barney@example.com");
        net.clients[barney].auto_reply = false;
        let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
        let (betty, _) = attached(&mut net, shards - 1, "betty@example.com");
        for (trans_id, content) in [(21, "one"), (22, "two")] {
            let (ok, _) = net.send(
                fred,
                ch,
                data(
                    "fred@example.com",
                    &["barney@example.com"],
                    &status_request(trans_id),
                    content,
                ),
            );
            assert!(ok);
        }
        let received = net.clients[barney].received.clone();
        assert_eq!(received.len(), 2);
        // The first answered with an element APEX has no reply of.
        net.reply(barney, bch, received[0].1, true, reply_body("<okay />\r\n"));
        let r = reports(&net, fred);
        assert_eq!(r.len(), 1, "{:?}", r.iter().map(text).collect::<Vec<_>>());
        assert!(
            is_report(&r[0], "example.com", 21, "barney@example.com", 550),
            "a failure, not 250: {}",
            text(&r[0])
        );
        assert!(text(&r[0]).contains("poorly formed reply from the endpoint"));
        assert!(
            net.clients[barney].closed.is_empty(),
            "not closed while the second delivery is unanswered (BEEP-25)"
        );
        // Nothing more is delivered on the channel.
        let (ok, _) = net.send(
            fred,
            ch,
            data(
                "fred@example.com",
                &["barney@example.com"],
                &status_request(24),
                "three",
            ),
        );
        assert!(ok);
        assert_eq!(net.clients[barney].received.len(), 2, "not delivered");
        let r = reports(&net, fred);
        assert!(is_report(
            &r[1],
            "example.com",
            24,
            "barney@example.com",
            550
        ));
        // The healthy pair meanwhile.
        let (ok, _) = net.send(
            wilma,
            wch,
            data(
                "wilma@example.com",
                &["betty@example.com"],
                &status_request(31),
                "fine",
            ),
        );
        assert!(ok);
        assert_eq!(deliveries(&net, betty).len(), 1);
        assert!(reports(&net, wilma).iter().any(|p| is_report(
            p,
            "example.com",
            31,
            "betty@example.com",
            250
        )));
        // The second is answered properly: reported as delivered, then the channel closes.
        net.reply(barney, bch, received[1].1, true, msg::ok_payload());
        let r = reports(&net, fred);
        assert_eq!(r.len(), 3);
        assert!(is_report(
            &r[2],
            "example.com",
            22,
            "barney@example.com",
            250
        ));
        let close = net.clients[barney]
            .relay_data_frames()
            .into_iter()
            .filter(|f| f.starts_with(b"MSG 0 "))
            .map(|f| text(&f))
            .collect::<Vec<_>>();
        assert_eq!(close.len(), 1, "{close:?}");
        assert!(
            close[0].ends_with(
                "\r\nContent-Type: application/beep+xml\r\n\r\n<close number='1' code='500' />\r\nEND\r\n"
            ),
            "{close:?}"
        );
        assert_eq!(
            net.clients[barney].closed,
            vec![bch],
            "closed (RFC 3080 §2.2.2.1)"
        );
        assert!(detached_everywhere(&net, "barney@example.com"), "APEX-16");
        let (ok, _) = net.send(
            wilma,
            wch,
            data(
                "wilma@example.com",
                &["betty@example.com"],
                "",
                "still fine",
            ),
        );
        assert!(ok);
        assert_eq!(deliveries(&net, betty).len(), 2);
    }
}

/// BEEP-15, RFC 3340 §9.1: what else a reply to a delivery may be. An `error` is a failure
/// with its code, also in a RPY (it was reported as 250); an `ok` in an ERR and a one-to-many
/// reply (ANS ... NUL) are poorly formed: one failure each, and the channel is closed.
#[test]
fn beep_15_error_in_a_rpy_ok_in_an_err_and_answers_are_failures() {
    // An error in a RPY: its code; the channel stays.
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, bch) = attached(&mut net, 0, "barney@example.com");
    net.clients[barney].auto_reply = false;
    let to_barney = |trans_id| {
        data(
            "fred@example.com",
            &["barney@example.com"],
            &status_request(trans_id),
            "x",
        )
    };
    net.send(fred, ch, to_barney(41));
    let msgno = net.clients[barney].received[0].1;
    net.reply(
        barney,
        bch,
        msgno,
        true,
        reply_body("<error code='537'>not from you</error>\r\n"),
    );
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1);
    assert!(
        is_report(&r[0], "example.com", 41, "barney@example.com", 537),
        "{}",
        text(&r[0])
    );
    assert!(text(&r[0]).contains("not from you"));
    assert!(
        net.clients[barney].closed.is_empty(),
        "an error is a proper reply"
    );

    // An ok in an ERR.
    net.send(fred, ch, to_barney(42));
    let msgno = net.clients[barney].received[1].1;
    net.reply(barney, bch, msgno, false, msg::ok_payload());
    let r = reports(&net, fred);
    assert_eq!(r.len(), 2);
    assert!(is_report(
        &r[1],
        "example.com",
        42,
        "barney@example.com",
        550
    ));
    assert_eq!(net.clients[barney].closed, vec![bch]);

    // A one-to-many reply: one failure for the MSG, whatever number of frames.
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, bch) = attached(&mut net, 0, "barney@example.com");
    net.clients[barney].auto_reply = false;
    net.send(fred, ch, to_barney(43));
    let msgno = net.clients[barney].received[0].1;
    for _ in 0..3 {
        net.session(barney)
            .send_ans(bch, msgno, msg::ok_payload())
            .unwrap();
    }
    net.session(barney).send_nul(bch, msgno).unwrap();
    net.drive();
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1, "{:?}", r.iter().map(text).collect::<Vec<_>>());
    assert!(is_report(
        &r[0],
        "example.com",
        43,
        "barney@example.com",
        550
    ));
    assert_eq!(net.clients[barney].closed, vec![bch]);
}

// ---------------------------------------------------------------------------------------------
// Party options: order of processing (APEX-23), mustUnderstand for remote recipients (APEX-36),
// targetHop='this' removed when forwarding (APEX-35, OPT-01)
// ---------------------------------------------------------------------------------------------

/// A data from fred whose originator element carries `originator_options`, to `recipients`
/// (identity, own options), with `options` per data.
fn data_with_parties(
    originator_options: &str,
    recipients: &[(&str, &str)],
    options: &str,
    content: &str,
) -> Bytes {
    let mut s = format!("{HEADERS}<data content='#Content'>\r\n");
    if originator_options.is_empty() {
        s.push_str("   <originator identity='fred@example.com' />\r\n");
    } else {
        s.push_str(&format!(
            "   <originator identity='fred@example.com'>\r\n{originator_options}   </originator>\r\n"
        ));
    }
    for (identity, own) in recipients {
        if own.is_empty() {
            s.push_str(&format!("   <recipient identity='{identity}' />\r\n"));
        } else {
            s.push_str(&format!(
                "   <recipient identity='{identity}'>\r\n{own}   </recipient>\r\n"
            ));
        }
    }
    s.push_str(options);
    s.push_str(&format!(
        "   <data-content Name='Content'>{content}</data-content>\r\n</data>\r\n"
    ));
    Bytes::from(s)
}

/// APEX-23 (RFC 3340 §4.4.4.1): per-data options, then `ok`, then per-originator options. An
/// unknown mustUnderstand option on the originator is met after the `ok`: every recipient,
/// local or remote, fails (504, D15) and is reported where asked; nothing is delivered or
/// forwarded. A healthy pair alongside goes on.
#[test]
fn apex_23_originator_options_are_processed_after_the_ok() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        let (barney, _) = attached(&mut net, shards - 1, "barney@example.com");
        let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
        let (betty, _) = attached(&mut net, shards - 1, "betty@example.com");
        let unknown = "      <option external='http://example.org/unknown' targetHop='all' mustUnderstand='true' transID='4' />\r\n";
        let sent = data_with_parties(
            unknown,
            &[("barney@example.com", ""), ("dino@rubble.com", "")],
            &status_request(61),
            "x",
        );
        let (ok, reply) = net.send(fred, ch, sent);
        assert!(ok, "ok first (APEX-23), not 504: {}", text(&reply));
        assert_eq!(reply, msg::ok_payload());
        assert!(deliveries(&net, barney).is_empty());
        assert!(net.forwards_to("rubble.com").is_empty());
        let r = reports(&net, fred);
        assert_eq!(r.len(), 2, "{:?}", r.iter().map(text).collect::<Vec<_>>());
        assert!(r
            .iter()
            .any(|p| is_report(p, "example.com", 61, "barney@example.com", 504)));
        assert!(r
            .iter()
            .any(|p| is_report(p, "example.com", 61, "dino@rubble.com", 504)));
        let (ok, _) = net.send(
            wilma,
            wch,
            data("wilma@example.com", &["betty@example.com"], "", "fine"),
        );
        assert!(ok);
        assert_eq!(deliveries(&net, betty).len(), 1);
    }
}

/// APEX-36 (RFC 3340 §5, §4.4.4.1 step 5.1): a remote recipient's own option that applies at
/// this relay (`this` or `all`), says mustUnderstand and is not understood fails that
/// recipient here (504, reported); the other recipients of the same domain are forwarded
/// without it. A `final` one is left to the relay that delivers.
#[test]
fn apex_36_a_remote_recipients_unknown_must_understand_option_fails_it() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let unknown = |hop: &str| {
        format!("      <option external='http://example.org/unknown' targetHop='{hop}' mustUnderstand='true' transID='4' />\r\n      <option internal='statusRequest' transID='71' />\r\n")
    };
    let (this, all, fin) = (unknown("this"), unknown("all"), unknown("final"));
    let sent = data_with_parties(
        "",
        &[
            ("a@rubble.com", &this),
            ("b@rubble.com", &all),
            ("c@rubble.com", &fin),
            ("d@rubble.com", ""),
        ],
        "",
        "x",
    );
    let (ok, _) = net.send(fred, ch, sent);
    assert!(ok);
    let r = reports(&net, fred);
    assert_eq!(r.len(), 2, "{:?}", r.iter().map(text).collect::<Vec<_>>());
    assert!(r
        .iter()
        .any(|p| is_report(p, "example.com", 71, "a@rubble.com", 504)));
    assert!(r
        .iter()
        .any(|p| is_report(p, "example.com", 71, "b@rubble.com", 504)));
    let out = net.forwards_to("rubble.com");
    assert_eq!(out.len(), 1);
    assert_eq!(
        recipients_of(&out[0]),
        vec!["c@rubble.com".to_owned(), "d@rubble.com".to_owned()]
    );
}

/// APEX-35, OPT-01 (RFC 3340 §5): options with `targetHop='this'` inside `originator` and
/// `recipient` are handled here and removed before the data is forwarded (byte-exact: only
/// those elements go); `all` and `final` ones travel on. Delivering locally strips nothing.
#[test]
fn apex_35_this_options_of_the_parties_are_removed_before_forwarding() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    let this_o = "      <option internal='x-note' targetHop='this' transID='1' />\r\n";
    let all_o = "      <option internal='x-trace' targetHop='all' transID='2' />\r\n";
    let this_r = "      <option internal='x-here' targetHop='this' transID='3' />\r\n";
    let final_r = "      <option internal='x-there' transID='5' />\r\n";
    let originator = format!("{this_o}{all_o}");
    let own = format!("{this_r}{final_r}");
    let sent = data_with_parties(
        &originator,
        &[("dino@rubble.com", &own), ("barney@example.com", &own)],
        "",
        "x",
    );
    let (ok, _) = net.send(fred, ch, sent);
    assert!(ok);
    let out = net.forwards_to("rubble.com");
    assert_eq!(out.len(), 1);
    let expected = format!(
        "{HEADERS}<data content='#Content'>\r\n   <originator identity='fred@example.com'>\r\n{all_o}   </originator>\r\n   <recipient identity='dino@rubble.com'>\r\n{final_r}   </recipient>\r\n   <data-content Name='Content'>x</data-content>\r\n</data>\r\n"
    );
    assert_eq!(text(&out[0]), expected);
    // The local recipient gets them all (APEX-35: the final relay strips nothing).
    let got = deliveries(&net, barney);
    assert_eq!(got.len(), 1);
    assert!(text(&got[0]).contains("x-note") && text(&got[0]).contains("x-here"));
}

// ---------------------------------------------------------------------------------------------
// Reports from the relays on the path, and watches on forwards (APEX-38, OPT-02; issue 19
// items 3 and 7)
// ---------------------------------------------------------------------------------------------

/// fred's data for barney@rubble.com with a per-data statusRequest for every relay on the path
/// (`targetHop='all'`, RFC 3340 §5.1; 299).
const DATA_ALL_299: &[u8] = b"MSG 1 0 . 0 299\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@rubble.com' />\r\n   <option internal='statusRequest' targetHop='all' transID='86' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\nEND\r\n";

/// example.com's own report once rubble.com's relay accepted the forward (RFC 3340 §6.2; 456).
const REPORT_FORWARDED_456: &[u8] = b"MSG 1 0 . 46 456\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='86'>\r\n         <destination identity='barney@rubble.com'>\r\n            <reply code='250' transID='86'>accepted by the relay of rubble.com</reply>\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\nEND\r\n";

/// example.com's report when no relay further on reported within the bound: 450, transient,
/// delivery unknown (issue 19 item 7; 483).
const REPORT_UNKNOWN_483: &[u8] = b"MSG 1 0 . 46 483\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='86'>\r\n         <destination identity='barney@rubble.com'>\r\n            <reply code='450' transID='86'>no report from the relays further on in time: delivery unknown</reply>\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\nEND\r\n";

/// Endpoint session with the relay's 111-octet greeting: channel created and attach accepted
/// (109).
const RPY_START_OK_AFTER_111: &[u8] = b"RPY 0 1 . 111 109\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<ok />]]></profile>\r\nEND\r\n";

/// The default bound on a later relay's report (`mesh.report_timeout_ms`).
const REPORT_TIMEOUT_MS: u64 = apex_proto::apex::relay::DEFAULT_REPORT_TIMEOUT_MS;

/// fred, a raw client on `shard`, greeted and attached (channel 1), then `data` sent.
fn raw_fred_sends(net: &mut RelayNet, shard: usize, data: &[u8]) -> ClientId {
    let fred = net.connect_raw(shard, ConnKind::Edge);
    net.inject(fred, checked(I_GREETING));
    net.inject(fred, checked(START_ATTACH_FRED));
    net.inject(fred, checked(data));
    fred
}

/// The frames the relay wrote fred up to its `ok` to the data, then `then`.
fn fred_frames(then: &[&[u8]]) -> Vec<String> {
    [L_GREETING_111, RPY_START_OK_AFTER_111, RPY_1_0_OK]
        .iter()
        .chain(then)
        .map(|f| String::from_utf8_lossy(checked(f)).into_owned())
        .collect()
}

/// A report from `apex=report@<reporter>` to fred on barney@rubble.com, as a relay further on
/// sends it over the mesh.
fn report_from(reporter: &str, trans_id: u32, code: u16) -> Bytes {
    Bytes::from(format!(
        "{HEADERS}<data content='#Content'>\r\n   <originator identity='apex=report@{reporter}' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='{trans_id}'>\r\n         <destination identity='barney@rubble.com'>\r\n            <reply code='{code}' transID='{trans_id}' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\n"
    ))
}

#[test]
fn apex_38_opt_02_forwarding_relay_reports_target_hop_all_byte_exact() {
    for (shards, fred_shard) in [(1, 0), (2, 0), (2, 1)] {
        let mut net = granted(shards);
        let fred = raw_fred_sends(&mut net, fred_shard, DATA_ALL_299);
        // The next relay accepted it: this relay reports the forward's outcome (RFC 3340
        // §5.1: every relay `all` applies to), and the option travels on unchanged.
        assert_eq!(
            show(&net.clients[fred].relay_data_frames()),
            fred_frames(&[REPORT_FORWARDED_456]),
            "{shards} shard(s), fred on {fred_shard}"
        );
        assert_eq!(
            net.forwards_to("rubble.com"),
            vec![payload_of(DATA_ALL_299)]
        );
    }
}

#[test]
fn apex_38_target_hop_this_is_reported_by_the_forwarding_relay_and_final_is_not() {
    let mut net = granted(2);
    let (fred, ch) = attached(&mut net, 1, "fred@example.com");
    let this = "   <option internal='statusRequest' targetHop='this' transID='7' />\r\n";
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@rubble.com"], this, "hi"),
    );
    assert!(ok);
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1, "{:?}", r.iter().map(text).collect::<Vec<_>>());
    assert!(is_report(&r[0], "example.com", 7, "barney@rubble.com", 250));
    // Processed here and removed before passing on (APEX-35).
    assert!(!text(&net.forwards_to("rubble.com")[0]).contains("statusRequest"));
    // targetHop='final' (the default): only the delivering relay reports.
    let (ok, _) = net.send(
        fred,
        ch,
        data(
            "fred@example.com",
            &["barney@rubble.com"],
            &status_request(8),
            "hi",
        ),
    );
    assert!(ok);
    assert_eq!(
        reports(&net, fred).len(),
        1,
        "no report of our own for final"
    );
}

#[test]
fn apex_38_forward_refused_by_the_next_relay_is_reported_once_per_request() {
    let mut net = granted(1);
    net.next_relay_behaviour.insert(
        "rubble.com".into(),
        apex_proto::testing::NextRelayBehaviour {
            data_error: Some(554),
            ..Default::default()
        },
    );
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let all = "   <option internal='statusRequest' targetHop='all' transID='9' />\r\n";
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@rubble.com"], all, "hi"),
    );
    assert!(ok);
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1, "{:?}", r.iter().map(text).collect::<Vec<_>>());
    assert!(is_report(&r[0], "example.com", 9, "barney@rubble.com", 550));
    // Reported here: nothing is watched, nothing more comes.
    assert_eq!(net.relay(0).watched_reports(), 0);
    net.advance(REPORT_TIMEOUT_MS + 1);
    assert_eq!(reports(&net, fred).len(), 1);
}

#[test]
fn issue_19_item_7_forward_without_a_later_report_is_reported_450_byte_exact() {
    for (shards, fred_shard) in [(1, 0), (2, 0), (2, 1)] {
        let mut net = granted(shards);
        let fred = raw_fred_sends(&mut net, fred_shard, DATA_283);
        // Accepted by rubble.com's relay, which then never reports (it crashed with the data
        // in its backlog).
        assert_eq!(net.forwards_to("rubble.com").len(), 1);
        let watched: usize = (0..shards).map(|s| net.relay(s).watched_reports()).sum();
        assert_eq!(watched, 1);
        net.advance(REPORT_TIMEOUT_MS - 1);
        assert_eq!(
            show(&net.clients[fred].relay_data_frames()),
            fred_frames(&[]),
            "nothing before the bound"
        );
        net.advance(1);
        assert_eq!(
            show(&net.clients[fred].relay_data_frames()),
            fred_frames(&[REPORT_UNKNOWN_483]),
            "{shards} shard(s), fred on {fred_shard}"
        );
        let watched: usize = (0..shards).map(|s| net.relay(s).watched_reports()).sum();
        assert_eq!(watched, 0);
    }
}

#[test]
fn issue_19_item_7_a_later_report_passing_through_ends_the_watch() {
    for (shards, fred_shard, peer_shard) in [(1, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)] {
        // rubble.com's relay also passes on reports of relays beyond it (a trusted
        // intermediary, RFC 3340 §4.5.2).
        let mut net = RelayNet::with(
            "example.com",
            shards,
            domain_grant("example.com"),
            vec!["rubble.com".to_owned()],
        );
        let (fred, ch) = attached(&mut net, fred_shard, "fred@example.com");
        let peer = net.connect(peer_shard, ConnKind::Mesh);
        let (pch, _) = net.bind(peer, "rubble.com");
        for trans_id in [1, 2, 3] {
            let (ok, _) = net.send(
                fred,
                ch,
                data(
                    "fred@example.com",
                    &["barney@rubble.com"],
                    &status_request(trans_id),
                    "hi",
                ),
            );
            assert!(ok);
        }
        // 1: the delivering relay (rubble.com) reports success; 2: an intermediate relay
        // reports a failure; 3: only an intermediate relay's trace (250) and a transient
        // report (350), which do not end the watch.
        for report in [
            report_from("rubble.com", 1, 250),
            report_from("other.org", 2, 550),
            report_from("other.org", 3, 250),
            report_from("rubble.com", 3, 350),
        ] {
            let (ok, _) = net.send(peer, pch, report);
            assert!(ok);
        }
        assert_eq!(reports(&net, fred).len(), 4, "every report reaches fred");
        net.advance(REPORT_TIMEOUT_MS);
        let r = reports(&net, fred);
        assert_eq!(
            r.len(),
            5,
            "{shards} shard(s): only transID 3 is reported unknown: {:?}",
            r.iter().map(text).collect::<Vec<_>>()
        );
        assert!(is_report(&r[4], "example.com", 3, "barney@rubble.com", 450));
    }
}

#[test]
fn issue_19_item_7_return_trip_bounds_the_watch_and_held_data_is_not_watched() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let timed = format!(
        "{}   <option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='5'><dataTiming noLaterThan='2000' returnTrip='3000' /></option>\r\n",
        status_request(4)
    );
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@rubble.com"], &timed, "hi"),
    );
    assert!(ok);
    // Held at the next relay for as long as it lets it: no bound this relay could know.
    let held = format!(
        "{}   <option internal='hold4Endpoint' transID='6' />\r\n",
        status_request(6)
    );
    let (ok, _) = net.send(
        fred,
        ch,
        data("fred@example.com", &["barney@rubble.com"], &held, "hi"),
    );
    assert!(ok);
    assert_eq!(net.relay(0).watched_reports(), 1);
    // Delivery within noLaterThan (2 s), then the report within returnTrip (3 s).
    net.advance(4999);
    assert!(reports(&net, fred).is_empty());
    net.advance(1);
    let r = reports(&net, fred);
    assert_eq!(r.len(), 1);
    assert!(is_report(&r[0], "example.com", 4, "barney@rubble.com", 450));
}

#[test]
fn issue_19_item_7_watches_are_bounded_per_shard() {
    let mut net = granted(1);
    net.shards[0]
        .relay_mut()
        .set_report_watch(apex_proto::apex::relay::ReportWatchLimits {
            timeout_ms: 1000,
            max_watches: 2,
            ..Default::default()
        });
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    for trans_id in 1..=5 {
        let (ok, _) = net.send(
            fred,
            ch,
            data(
                "fred@example.com",
                &["barney@rubble.com"],
                &status_request(trans_id),
                "hi",
            ),
        );
        assert!(ok);
    }
    assert_eq!(net.relay(0).watched_reports(), 2);
    assert_eq!(net.relay(0).stats().report_watches_refused, 3);
    net.advance(1000);
    let r = reports(&net, fred);
    assert_eq!(r.len(), 2);
    assert!(is_report(&r[0], "example.com", 1, "barney@rubble.com", 450));
    assert!(is_report(&r[1], "example.com", 2, "barney@rubble.com", 450));
}

#[test]
fn issue_19_item_7_remote_originators_are_not_watched() {
    // Data relayed for wilma@rubble.com to other.org: reports go to rubble.com directly, never
    // back through this relay, so a watch here could only report in error.
    let mut net = granted(1);
    let peer = net.connect(0, ConnKind::Mesh);
    let (pch, _) = net.bind(peer, "rubble.com");
    let (ok, _) = net.send(
        peer,
        pch,
        data(
            "wilma@rubble.com",
            &["x@other.org"],
            &status_request(3),
            "hi",
        ),
    );
    assert!(ok);
    assert_eq!(net.forwards_to("other.org").len(), 1);
    assert_eq!(net.relay(0).watched_reports(), 0);
}
