//! Issue 19 item 9, in memory: the shard core's deadlines and per-address bound of accepted
//! connections ([`ConnLimits`]), driven through [`RelayNet`] with the clock passed in. A peer
//! that never greets, greets one octet at a time, stops half-way through its greeting, greets
//! and then does nothing, or opens connection after connection from one address, is ended or
//! refused with byte-exact BEEP frames (RFC 3080 §2.4, §2.3.1.5; BEEP-18, BEEP-32), while a
//! healthy pair beside it attaches and exchanges data throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::client;
use apex_proto::apex::relay::ConnKind;
use apex_proto::shard::{ConnLimits, Timeout};
use apex_proto::testing::{ClientId, RelayNet};
use bytes::Bytes;

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

/// The relay's greeting (RFC 3080 §2.3.1.1), the first octets of every accepted session.
const RELAY_GREETING: &str = "RPY 0 0 . 0 111\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

/// The relay's request to release the session with 421 (RFC 3080 §2.4, §8): its first MSG on
/// channel 0, right after its 111-octet greeting.
const CLOSE_421: &str = "MSG 0 1 . 111 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='0' code='421' />\r\nEND\r\n";

/// The relay's window update for the client's 52-octet greeting (RFC 3081 §3.1.3).
const SEQ_AFTER_GREETING: &str = "SEQ 0 52 262144\r\n";

/// A client's greeting, 52 octets of payload (RFC 3080 §2.3.1.1, spec digest 13.1).
const CLIENT_GREETING: &str =
    "RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

fn limits() -> ConnLimits {
    ConnLimits {
        greeting_timeout: Some(Duration::from_secs(10)),
        idle_timeout: Some(Duration::from_secs(60)),
        release_timeout: Duration::from_secs(5),
        max_per_address: Some(64),
    }
}

/// One shard for example.com whose endpoints may send each other data, with `limits`.
fn net(limits: ConnLimits) -> RelayNet {
    let mut access = AccessTable::new();
    access
        .grant_domain(
            "example.com",
            ActorPattern::parse("*@example.com").unwrap(),
            vec![Access::CORE_DATA],
        )
        .unwrap();
    let mut net = RelayNet::with("example.com", 1, access, Vec::new());
    let now = std::time::Instant::now();
    net.shards[0].set_conn_limits(limits, now);
    net
}

/// fred and barney, attached on their own sessions.
fn healthy_pair(net: &mut RelayNet) -> (ClientId, u32, ClientId) {
    let fred = net.connect(0, ConnKind::Edge);
    let (fred_channel, reply) = net.attach(fred, "fred@example.com");
    assert_eq!(reply, "<ok />");
    let barney = net.connect(0, ConnKind::Edge);
    assert_eq!(net.attach(barney, "barney@example.com").1, "<ok />");
    (fred, fred_channel, barney)
}

/// fred sends barney one message; barney receives it.
fn pair_exchanges(net: &mut RelayNet, pair: (ClientId, u32, ClientId), content: &str) {
    let (fred, channel, barney) = pair;
    assert!(net.clients[fred].connected && net.clients[barney].connected);
    let before = net.clients[barney].received.len();
    let doc = format!(
        "{HEADERS}<data content='#C'><originator identity='fred@example.com' /><recipient identity='barney@example.com' /><data-content Name='C'>{content}</data-content></data>"
    );
    let (positive, reply) = net.send(fred, channel, Bytes::from(doc));
    assert!(positive, "{reply:?}");
    let received = &net.clients[barney].received;
    assert_eq!(received.len(), before + 1, "barney got the data");
    let text = String::from_utf8_lossy(&received[before].2);
    assert!(text.contains(content), "{text}");
}

fn from_relay(net: &RelayNet, id: ClientId) -> String {
    String::from_utf8_lossy(&net.clients[id].from_relay).into_owned()
}

#[test]
fn issue_19_9_silent_slow_and_half_greetings_are_closed_at_the_greeting_timeout() {
    let mut net = net(limits());
    let pair = healthy_pair(&mut net);
    let silent = net.connect_raw(0, ConnKind::Edge);
    let half = net.connect_raw(0, ConnKind::Edge);
    net.inject(half, &CLIENT_GREETING.as_bytes()[..40]);
    let slow = net.connect_raw(0, ConnKind::Edge);
    // One octet a second: nine octets of the greeting by 9 s.
    for second in 0..9 {
        net.inject(slow, &CLIENT_GREETING.as_bytes()[second..=second]);
        net.advance(1000);
        pair_exchanges(&mut net, pair, &format!("tick {second}"));
    }
    net.advance(999);
    for id in [silent, half, slow] {
        assert!(net.clients[id].connected, "open until the timeout");
        assert_eq!(from_relay(&net, id), RELAY_GREETING);
    }
    net.advance(1);
    for id in [silent, half, slow] {
        assert!(!net.clients[id].connected, "closed at 10 s");
        assert_eq!(from_relay(&net, id), format!("{RELAY_GREETING}{CLOSE_421}"));
    }
    pair_exchanges(&mut net, pair, "after the timeouts");
    let snapshot = net.shards[0].snapshot();
    assert_eq!(snapshot.greeting_timeouts, 3);
    assert_eq!(snapshot.idle_timeouts, 0);
}

#[test]
fn issue_19_9_a_greeting_in_time_is_not_timed_out() {
    let mut net = net(limits());
    let greeted = net.connect_raw(0, ConnKind::Edge);
    net.advance(9_999);
    net.inject(greeted, CLIENT_GREETING.as_bytes());
    // Attached at once: neither the greeting nor the idle deadline ends it.
    let attach = client::attach_document("wilma@example.com", 1);
    let start = format!(
        "{HEADERS}<start number='1'><profile uri='http://iana.org/beep/APEX'><![CDATA[{attach}]]></profile></start>"
    );
    net.inject(
        greeted,
        format!("MSG 0 1 . 52 {}\r\n{start}END\r\n", start.len()).as_bytes(),
    );
    net.advance(120_000);
    assert!(net.clients[greeted].connected);
    // Attached, and nothing after it: no close.
    let started = "Content-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<ok />]]></profile>";
    assert_eq!(
        from_relay(&net, greeted),
        format!(
            "{RELAY_GREETING}{SEQ_AFTER_GREETING}RPY 0 1 . 111 {}\r\n{started}\r\nEND\r\nSEQ 1 0 262144\r\n",
            started.len() + 2
        )
    );
    assert_eq!(net.shards[0].snapshot().greeting_timeouts, 0);
}

#[test]
fn issue_19_9_an_idle_session_is_asked_to_release_and_one_that_does_not_answer_is_closed() {
    let mut net = net(limits());
    let pair = healthy_pair(&mut net);
    // Greets and answers the relay's close (the client session agrees, BEEP-32).
    let polite = net.connect(0, ConnKind::Edge);
    // Greets, then reads nothing and answers nothing.
    let mute = net.connect_raw(0, ConnKind::Edge);
    net.inject(mute, CLIENT_GREETING.as_bytes());
    // Had a channel until 30 s: idle from then.
    let was_busy = net.connect(0, ConnKind::Edge);
    let (channel, _) = net.attach(was_busy, "wilma@example.com");
    net.advance(30_000);
    net.close_channel(was_busy, channel);
    net.advance(29_999);
    for id in [polite, mute, was_busy] {
        assert!(net.clients[id].connected);
    }
    net.advance(1);
    // 60 s without a channel: asked to release with 421.
    assert_eq!(
        from_relay(&net, mute),
        format!("{RELAY_GREETING}{SEQ_AFTER_GREETING}{CLOSE_421}")
    );
    assert!(!net.clients[polite].connected, "released by agreement");
    assert!(
        net.clients[mute].connected,
        "given release_timeout to answer"
    );
    assert!(net.clients[was_busy].connected, "idle for 30 s only");
    pair_exchanges(&mut net, pair, "beside the idle ones");
    net.advance(4_999);
    assert!(net.clients[mute].connected);
    net.advance(1);
    assert!(!net.clients[mute].connected, "no answer: closed anyway");
    net.advance(25_000);
    assert!(
        !net.clients[was_busy].connected,
        "60 s after its channel closed"
    );
    pair_exchanges(&mut net, pair, "after them");
    let snapshot = net.shards[0].snapshot();
    assert_eq!((snapshot.idle_timeouts, snapshot.greeting_timeouts), (3, 0));
}

#[test]
fn issue_19_9_without_limits_nothing_times_out() {
    let mut net = net(ConnLimits::default());
    let silent = net.connect_raw(0, ConnKind::Edge);
    let idle = net.connect(0, ConnKind::Edge);
    net.advance(3_600_000);
    assert!(net.clients[silent].connected && net.clients[idle].connected);
}

#[test]
fn issue_19_9_one_address_past_its_bound_is_refused_with_421_and_others_are_served() {
    let mut net = net(ConnLimits {
        max_per_address: Some(2),
        ..limits()
    });
    let flooder: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
    net.peer_address = flooder;
    let first = net.connect_raw(0, ConnKind::Edge);
    let second = net.connect_raw(0, ConnKind::Edge);
    let third = net.connect_raw(0, ConnKind::Edge);
    for id in [first, second] {
        assert!(net.clients[id].connected);
        assert_eq!(from_relay(&net, id), RELAY_GREETING);
    }
    // BEEP-18: ERR msgno 0 instead of the greeting, then the transport closes.
    let payload =
        format!("{HEADERS}<error code='421'>too many connections from this address</error>\r\n");
    assert_eq!(
        from_relay(&net, third),
        format!("ERR 0 0 . 0 {}\r\n{payload}END\r\n", payload.len())
    );
    assert!(!net.clients[third].connected);
    // Another address is greeted, and the pair attached from it exchanges data.
    net.peer_address = Ipv4Addr::new(192, 0, 2, 2).into();
    let pair = healthy_pair(&mut net);
    pair_exchanges(&mut net, pair, "beside the flood");
    // A connection of the flooder's ends: it may connect once more.
    net.disconnect(first);
    net.peer_address = flooder;
    let again = net.connect_raw(0, ConnKind::Edge);
    assert_eq!(from_relay(&net, again), RELAY_GREETING);
    assert!(net.clients[again].connected);
    assert_eq!(net.shards[0].snapshot().refused_per_address, 1);
    // A timed-out session says why in the summary the runtime logs when it ends.
    net.clients[second].paused = true;
    net.advance(10_000);
    let conn = net.clients[second].conn;
    let summary = net.shards[0].session_summary(conn).unwrap();
    assert_eq!(summary.timed_out, Some(Timeout::Greeting));
    net.clients[second].paused = false;
    net.drive();
    assert!(!net.clients[second].connected);
}
