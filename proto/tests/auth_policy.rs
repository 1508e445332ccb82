//! Who may attach and bind as what (RFC 3340 §4.5.1, APEX-47; `--auth`), in the in-memory
//! relay: attach before authenticating where it is required (530), an identity attaching as
//! someone else (537), attachOverride only for a session that may attach as the endpoint, and
//! binds accepted only from a domain's relay (its certificate, its static route's or SRV
//! targets' address, or `--trust`), never as our own domain.

use std::net::IpAddr;

use apex_proto::apex::client::DataBuilder;
use apex_proto::apex::relay::{AuthMode, AuthPolicy, ConnKind};
use apex_proto::testing::RelayNet;

fn policy(mode: AuthMode) -> AuthPolicy {
    AuthPolicy {
        mode,
        ..AuthPolicy::default()
    }
}

fn address(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|_| panic!("bad test address {text}"))
}

/// The code of an `error` reply, or 0 for `<ok />`.
fn code(reply: &str) -> u16 {
    if reply == "<ok />" {
        return 0;
    }
    let start = reply
        .find("code='")
        .map(|i| i + 6)
        .unwrap_or_else(|| panic!("{reply}"));
    reply[start..start + 3]
        .parse()
        .unwrap_or_else(|_| panic!("{reply}"))
}

/// APEX-47, `--auth loopback-open`: loopback sessions attach unauthenticated, others get
/// 530 (authentication required).
#[test]
fn loopback_open_lets_loopback_attach_and_asks_others_to_authenticate() {
    let mut net = RelayNet::new("example.com", 1);
    net.set_auth(policy(AuthMode::LoopbackOpen));
    let local = net.connect(0, ConnKind::Edge);
    assert_eq!(code(&net.attach(local, "fred@example.com").1), 0);
    net.peer_address = address("::1");
    let local6 = net.connect(0, ConnKind::Edge);
    assert_eq!(code(&net.attach(local6, "wilma@example.com").1), 0);
    net.peer_address = address("192.0.2.7");
    let remote = net.connect(0, ConnKind::Edge);
    assert_eq!(code(&net.attach(remote, "barney@example.com").1), 530);
}

/// APEX-47, `--auth required`: even loopback sessions authenticate first.
#[test]
fn required_asks_every_unauthenticated_session_to_authenticate() {
    let mut net = RelayNet::new("example.com", 2);
    net.set_auth(policy(AuthMode::Required));
    let local = net.connect(0, ConnKind::Edge);
    assert_eq!(code(&net.attach(local, "fred@example.com").1), 530);
    let other_shard = net.connect(1, ConnKind::Edge);
    assert_eq!(code(&net.attach(other_shard, "fred@example.com").1), 530);
}

/// RFC 3340 §4.5.1: an authenticated identity attaches as itself and its subaddresses;
/// anything else is 537, and an attachOverride for someone else's endpoint evicts nobody.
#[test]
fn an_identity_attaches_as_itself_only_and_cannot_evict_others() {
    let mut net = RelayNet::new("example.com", 1);
    net.set_auth(policy(AuthMode::Required));
    let fred = net.connect(0, ConnKind::Edge);
    net.shards[0]
        .relay_mut()
        .authenticated(net.clients[fred].conn, "fred@example.com".into());
    assert_eq!(code(&net.attach(fred, "fred@example.com").1), 0);
    assert_eq!(code(&net.attach(fred, "fred/appl=wb@example.com").1), 0);
    assert_eq!(code(&net.attach(fred, "barney@example.com").1), 537);

    let barney = net.connect(0, ConnKind::Edge);
    net.shards[0]
        .relay_mut()
        .authenticated(net.clients[barney].conn, "barney@example.com".into());
    let overriding = "<attach endpoint='fred@example.com' transID='1'>\
                      <option internal='attachOverride' /></attach>";
    let (_, reply) = net.start(barney, Some(overriding));
    assert_eq!(code(&reply.unwrap_or_default()), 537);
    // fred's attachment stands.
    assert!(net
        .relay(0)
        .lookup(&"fred@example.com".parse().unwrap())
        .is_some());
    assert!(
        net.clients[fred].closed.is_empty(),
        "fred's channel was not ended"
    );
}

/// `--auth off`: anything goes (benchmarks).
#[test]
fn off_lets_anyone_attach_and_bind() {
    let mut net = RelayNet::new("example.com", 1);
    net.set_auth(policy(AuthMode::Off));
    net.peer_address = address("192.0.2.7");
    let anyone = net.connect(0, ConnKind::Edge);
    assert_eq!(code(&net.attach(anyone, "fred@example.com").1), 0);
    let relay = net.connect(0, ConnKind::Mesh);
    assert_eq!(code(&net.bind(relay, "rubble.com").1), 0);
}

/// The spoofing case of the issue: a raw client binds on the mesh port as our own domain, then
/// as a peer's, and its data claiming to come from our user is not delivered.
#[test]
fn a_bind_as_our_domain_or_an_unproven_peer_is_refused_and_relays_nothing() {
    let mut net = RelayNet::new("example.com", 1);
    net.set_auth(policy(AuthMode::LoopbackOpen));
    let barney = net.connect(0, ConnKind::Edge);
    assert_eq!(code(&net.attach(barney, "barney@example.com").1), 0);

    net.peer_address = address("192.0.2.66");
    let spoofer = net.connect(0, ConnKind::Mesh);
    let (channel, reply) = net.bind(spoofer, "example.com");
    assert_eq!(code(&reply), 537, "bound as our own domain");
    // rubble.com's relay is at 192.0.2.10 per DNS: 192.0.2.66 is not it.
    net.relay_dns
        .insert("rubble.com".into(), vec![address("192.0.2.10")]);
    let (_, reply) = net.bind(spoofer, "rubble.com");
    assert_eq!(code(&reply), 537, "bound as a peer from elsewhere");
    let forged = DataBuilder::new("fred@example.com")
        .to("barney@example.com")
        .text("it is me, fred");
    let (positive, _) = net.send(spoofer, channel, forged);
    assert!(!positive, "data over a refused bind was accepted");
    assert!(
        net.clients[barney].received.is_empty(),
        "barney got forged data"
    );
}

/// Without TLS a relay is recognised by its address: that of its static route, or of its SRV
/// targets (looked up when it binds); `--trust` accepts a domain from anywhere.
#[test]
fn a_relay_binds_from_its_routed_or_resolved_address_or_when_trusted() {
    let mut net = RelayNet::new("example.com", 2);
    let mut routed = policy(AuthMode::LoopbackOpen);
    routed
        .relay_addresses
        .insert("slate.com".into(), vec![address("192.0.2.20")]);
    net.set_auth(routed);
    net.relay_dns
        .insert("rubble.com".into(), vec![address("192.0.2.10")]);

    net.peer_address = address("192.0.2.20");
    let slate = net.connect(1, ConnKind::Mesh);
    assert_eq!(code(&net.bind(slate, "slate.com").1), 0, "static route");
    assert_eq!(code(&net.bind(slate, "rubble.com").1), 537, "not rubble's");

    net.peer_address = address("192.0.2.10");
    let rubble = net.connect(0, ConnKind::Mesh);
    assert_eq!(code(&net.bind(rubble, "rubble.com").1), 0, "SRV targets");
    assert_eq!(
        code(&net.bind(rubble, "slate.com").1),
        537,
        "a static route names slate.com's relay: DNS is not asked"
    );

    let mut net = RelayNet::with(
        "example.com",
        1,
        Default::default(),
        vec!["quarry.com".into()],
    );
    net.set_auth(policy(AuthMode::LoopbackOpen));
    net.peer_address = address("198.51.100.1");
    let quarry = net.connect(0, ConnKind::Mesh);
    assert_eq!(code(&net.bind(quarry, "quarry.com").1), 0, "--trust");
    assert_eq!(code(&net.bind(quarry, "example.com").1), 537);
}
