//! What the shard core counts for the metrics endpoint (`ShardCore::snapshot`), driven through
//! real BEEP sessions by `RelayNet`: data accepted on the shard that took it, delivered and
//! timed on the recipient's, refusals and reports by code, protocol errors by kind, sessions
//! and endpoints as gauges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::msg::{self, ApexLimits, Operation};
use apex_proto::apex::relay::{home_shard, ConnKind};
use apex_proto::testing::{ClientId, RelayNet};
use bytes::Bytes;

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

fn data(originator: &str, recipient: &str, options: &str) -> Bytes {
    Bytes::from(format!(
        "{HEADERS}<data content='#c'>\r\n   <originator identity='{originator}' />\r\n   \
         <recipient identity='{recipient}' />\r\n{options}   \
         <data-content Name='c'>hello</data-content>\r\n</data>\r\n"
    ))
}

fn net(shards: usize) -> RelayNet {
    let mut access = AccessTable::new();
    access
        .grant_domain(
            "example.com",
            ActorPattern::parse("*@example.com").unwrap(),
            vec![Access::CORE_DATA],
        )
        .unwrap();
    RelayNet::with("example.com", shards, access, Vec::new())
}

/// An endpoint of example.com whose home shard is `home`, attached on a client of that shard.
fn attached(net: &mut RelayNet, stem: &str, shards: usize, home: usize) -> (ClientId, u32, String) {
    let name = (0..)
        .map(|i| format!("{stem}{i}@example.com"))
        .find(|e| home_shard(&Endpoint::parse(e).unwrap(), shards) == home)
        .unwrap();
    let id = net.connect(home, ConnKind::Edge);
    let (channel, reply) = net.attach(id, &name);
    assert_eq!(reply, "<ok />");
    (id, channel, name)
}

fn error_code(payload: &Bytes) -> u16 {
    match msg::parse_message(payload, &ApexLimits::default()) {
        Ok(Operation::Error { code, .. }) => code,
        other => panic!("not an error: {other:?}"),
    }
}

#[test]
fn data_is_counted_where_it_is_accepted_and_where_it_is_delivered() {
    let mut net = net(2);
    let (_fred, _, fred) = attached(&mut net, "fred", 2, 0);
    let (barney, barney_ch, barney_name) = attached(&mut net, "barney", 2, 1);
    for _ in 0..10 {
        let (ok, _) = net.send(barney, barney_ch, data(&barney_name, &fred, ""));
        assert!(ok);
    }
    let (zero, one) = (net.shards[0].snapshot(), net.shards[1].snapshot());
    // Barney's session: the greetings, the attach's start and its reply, ten data and their
    // ten oks (and a SEQ is no message).
    assert_eq!((one.messages_in, one.messages_out), (12, 12), "{one:?}");
    assert_eq!(zero.messages_in, 12, "fred's greeting, start, and oks");
    assert_eq!(one.relay.data_accepted, 10, "accepted by barney's shard");
    assert_eq!(zero.relay.data_accepted, 0);
    assert_eq!(zero.relay.data_delivered, 10, "delivered by fred's shard");
    assert_eq!(zero.relay.latency.count(), 10);
    assert_eq!(one.relay.data_delivered, 0);
    assert_eq!((zero.sessions_edge, one.sessions_edge), (1, 1));
    assert_eq!((zero.endpoints, one.endpoints), (1, 1));
    assert_eq!(zero.session_states.open, 1);
    assert_eq!(zero.sessions_accepted + one.sessions_accepted, 2);

    // Data in another's name is refused: counted by its code on the shard that refused it.
    let (ok, reply) = net.send(barney, barney_ch, data(&fred, &barney_name, ""));
    assert!(!ok);
    let code = error_code(&reply);
    let one = net.shards[1].snapshot();
    assert_eq!(one.relay.errors.get(code), 1, "{:?}", one.relay.errors);
    assert_eq!(one.relay.data_accepted, 10);
}

#[test]
fn latency_runs_from_acceptance_to_the_recipients_ok_and_refusals_are_reported_by_code() {
    let mut net = net(1);
    let (wilma, _, wilma_name) = attached(&mut net, "wilma", 1, 0);
    net.clients[wilma].auto_reply = false;
    let (barney, barney_ch, barney_name) = attached(&mut net, "barney", 1, 0);
    let status = "   <option internal='statusRequest' transID='7' />\r\n";

    // Refused by the recipient: not delivered, reported with the recipient's code (the
    // report itself is data from apex=report, delivered to barney at once).
    let (ok, _) = net.send(barney, barney_ch, data(&barney_name, &wilma_name, status));
    assert!(ok);
    let (channel, msgno, _) = net.clients[wilma].received.last().cloned().unwrap();
    let refusal = Bytes::from(format!("{HEADERS}<error code='550'>no room</error>"));
    net.reply(wilma, channel, msgno, false, refusal);
    let snapshot = net.shards[0].snapshot();
    assert_eq!(snapshot.relay.deliveries_refused, 1);
    assert_eq!(snapshot.relay.reports.get(550), 1);
    assert_eq!(snapshot.relay.data_delivered, 1, "the report");
    assert_eq!(snapshot.relay.latency.count(), 1);
    assert!(snapshot.relay.latency.quantile(1.0) < 1_000);

    // Answered 5 ms after it was accepted.
    let (ok, _) = net.send(barney, barney_ch, data(&barney_name, &wilma_name, ""));
    assert!(ok);
    let (channel, msgno, _) = net.clients[wilma].received.last().cloned().unwrap();
    net.advance(5);
    net.reply(
        wilma,
        channel,
        msgno,
        true,
        Bytes::from(format!("{HEADERS}<ok />")),
    );
    let snapshot = net.shards[0].snapshot();
    assert_eq!(snapshot.relay.data_delivered, 2);
    assert_eq!(snapshot.relay.latency.count(), 2);
    let slowest = snapshot.relay.latency.quantile(1.0);
    assert!((5_000..5_100).contains(&slowest), "{slowest} µs");
    assert_eq!(snapshot.relay.latency.cumulative(&[4_999, 6_000]), [1, 2]);
}

#[test]
fn a_protocol_error_is_counted_by_kind() {
    let mut net = net(1);
    let raw = net.connect_raw(0, ConnKind::Edge);
    assert_eq!(net.shards[0].snapshot().session_states.greeting, 1);
    let before = net.shards[0].snapshot().messages_out;
    assert_eq!(before, 1, "the relay's greeting");
    net.inject(raw, b"XYZ this is no frame\r\n");
    let snapshot = net.shards[0].snapshot();
    assert_eq!(snapshot.messages_out, 1, "an ended session's count stays");
    assert_eq!(snapshot.protocol_errors.get("frame"), 1, "{snapshot:?}");
    assert_eq!(snapshot.sessions_edge, 0, "the session was ended");
}
