//! What the shard core tells the runtime about a session before it closes it (the session's
//! end-of-life log line): its message counts, which must match what the other end counted the
//! other way, and who the peer was, including what it attached or bound as and no longer is.
#![allow(clippy::unwrap_used)]

use apex_proto::apex::access::{AccessTable, Grant};
use apex_proto::apex::client::DataBuilder;
use apex_proto::apex::relay::{AuthMode, AuthPolicy, ConnKind, MAX_NAMES_RECORDED};
use apex_proto::shard::SessionSummary;
use apex_proto::testing::{ClientId, RelayNet};

fn summary(net: &RelayNet, id: ClientId) -> SessionSummary {
    let client = &net.clients[id];
    net.shards[client.shard]
        .session_summary(client.conn)
        .unwrap()
}

/// An endpoint sends itself data on a relay of two shards (its home may be the other shard):
/// every message each side sent is one the other received, and the attachment is remembered
/// after the channel that carried it closed.
#[test]
fn counts_match_the_peer_and_the_attachment_outlives_its_channel() {
    let mut access = AccessTable::new();
    let grant: Grant = "*@example.com=core:data".parse().unwrap();
    access.grant_all_local(grant.actor, grant.actions);
    let mut net = RelayNet::with("example.com", 2, access, Vec::new());
    let fred = net.connect(0, ConnKind::Edge);
    let (channel, reply) = net.attach(fred, "fred@example.com");
    assert_eq!(reply, "<ok />");
    const N: usize = 7;
    for i in 0..N {
        let data = DataBuilder::new("fred@example.com")
            .to("fred@example.com")
            .text(&format!("note {i}"));
        let (positive, _) = net.send(fred, channel, data);
        assert!(positive);
    }
    assert_eq!(net.clients[fred].received.len(), N, "fred got his notes");
    net.close_channel(fred, channel);

    let seen = summary(&net, fred);
    let client = net.clients[fred].initiator.as_ref().unwrap();
    assert_eq!(seen.messages_in, client.messages_sent());
    assert_eq!(seen.messages_out, client.messages_received());
    // Greeting, start, N data, N replies to the relay's deliveries, close: at least 2N + 3.
    assert!(seen.messages_in >= 2 * N as u64 + 3, "{seen:?}");
    assert_eq!(seen.identity.acted_as.attached, ["fred@example.com"]);
    assert!(seen.identity.acted_as.bound.is_empty());
    assert_eq!(seen.identity.sasl, None);
    assert_eq!(seen.link, None);

    // Closed, the connection is forgotten.
    net.disconnect(fred);
    let client = &net.clients[fred];
    assert_eq!(net.shards[client.shard].session_summary(client.conn), None);
}

/// A relay's bind is remembered too, and a peer acting as many names costs a bounded record.
#[test]
fn binds_are_remembered_and_names_are_bounded() {
    let mut net = RelayNet::new("example.com", 1);
    net.set_auth(AuthPolicy {
        mode: AuthMode::Off,
        ..AuthPolicy::default()
    });
    let relay = net.connect(0, ConnKind::Mesh);
    assert_eq!(net.bind(relay, "rubble.com").1, "<ok />");
    assert_eq!(summary(&net, relay).identity.acted_as.bound, ["rubble.com"]);

    let busy = net.connect(0, ConnKind::Edge);
    for i in 0..MAX_NAMES_RECORDED + 3 {
        assert_eq!(
            net.attach(busy, &format!("user{i}@example.com")).1,
            "<ok />"
        );
    }
    let acted = summary(&net, busy).identity.acted_as;
    assert_eq!(acted.attached.len(), MAX_NAMES_RECORDED);
    assert_eq!(acted.attached[0], "user0@example.com");
    assert_eq!(acted.more, 3);
}
