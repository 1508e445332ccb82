//! Relay-to-relay tests on loopback (RFC 3340 §4.4.2, §4.4.4.1 step 5.2; RFC 3342 dataHopping):
//! two relays in different domains delivering to each other with the originator preserved,
//! reports crossing back, an unreachable domain reported, a three-relay routing loop
//! stopped by dataHopping, and relays found by DNS SRV (APEX-04) on a loopback DNS server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use apex_proto::apex::client::DataBuilder;
use bytes::Bytes;
use common::dns_server::{DnsServer, Zone};
use common::{free_port, Client, Relay};

fn relay(domain: &str, mesh_port: u16, extra: &[&str]) -> Relay {
    let mesh = format!("127.0.0.1:{mesh_port}");
    let mut args = vec!["--shards", "2", "--domain", domain, "--mesh-listen", &mesh];
    args.extend_from_slice(extra);
    Relay::start_with(&args)
}

fn attached(relay: &Relay, endpoint: &str) -> (Client, u32) {
    let mut client = Client::connect(relay.edge);
    client.greet();
    let (channel, reply) = client.attach(endpoint);
    assert_eq!(reply, "<ok />", "attach {endpoint}");
    (client, channel)
}

/// A data from `from` to `to` carrying the per-data `option` element (none if empty), `text`
/// inline.
fn data(from: &str, to: &str, option: &str, text: &str) -> Bytes {
    let data = DataBuilder::new(from).to(to);
    match option {
        "" => data.markup(text),
        option => data.option(option).markup(text),
    }
}

#[test]
fn apex_24_two_relays_deliver_across_the_mesh() {
    let (port_a, port_b) = (free_port(), free_port());
    let peer_b = format!("rubble.com=127.0.0.1:{port_b}");
    let peer_a = format!("example.com=127.0.0.1:{port_a}");
    let a = relay(
        "example.com",
        port_a,
        &["--peer", &peer_b, "--grant", "*@rubble.com=core:data"],
    );
    let b = relay(
        "rubble.com",
        port_b,
        &["--peer", &peer_a, "--grant", "*@example.com=core:data"],
    );
    let (mut barney, _) = attached(&b, "barney@rubble.com");
    let (mut fred, fred_channel) = attached(&a, "fred@example.com");

    let option = "<option internal='statusRequest' transID='86' />";
    let sent = data(
        "fred@example.com",
        "barney@rubble.com",
        option,
        "hello, barney",
    );
    let (positive, _) = fred.request(fred_channel, sent.clone());
    assert!(positive, "accepted by example.com's relay");
    // Delivered by rubble.com's relay with the originator preserved and the content unchanged.
    let delivered = barney.receive();
    assert_eq!(delivered, sent, "byte-identical across two relays");
    // The final relay reports back across the mesh (APEX-38).
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<originator identity='apex=report@rubble.com' />"),
        "{report}"
    );
    assert!(
        report.contains("<reply code='250' transID='86' />"),
        "{report}"
    );

    // And the other way round, over rubble.com's own link.
    let (mut barney2, channel) = attached(&b, "barney2@rubble.com");
    let back = data("barney2@rubble.com", "fred@example.com", "", "hi fred");
    assert!(barney2.request(channel, back.clone()).0);
    assert_eq!(fred.receive(), back);
}

#[test]
fn unreachable_domain_is_reported() {
    let port_a = free_port();
    let dead = format!("nowhere.test=127.0.0.1:{}", free_port());
    let a = relay("example.com", port_a, &["--peer", &dead]);
    let (mut fred, channel) = attached(&a, "fred@example.com");
    let option = "<option internal='statusRequest' transID='9' />";
    assert!(
        fred.request(
            channel,
            data("fred@example.com", "x@nowhere.test", option, "?")
        )
        .0
    );
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<destination identity='x@nowhere.test'>"),
        "{report}"
    );
    assert!(report.contains("code='550'"), "{report}");
}

#[test]
fn opt_17_routing_loop_stopped_by_data_hopping() {
    // Three relays whose static routes for loop.test form a cycle a -> b -> c -> a.
    let ports = [free_port(), free_port(), free_port()];
    let route = |i: usize| format!("loop.test=127.0.0.1:{}", ports[i]);
    let a = relay("a.test", ports[0], &["--peer", &route(1), "--trust", "*"]);
    let _b = relay(
        "b.test",
        ports[1],
        &[
            "--peer",
            &route(2),
            "--trust",
            "*",
            "--peer",
            &format!("a.test=127.0.0.1:{}", ports[0]),
        ],
    );
    let _c = relay(
        "c.test",
        ports[2],
        &[
            "--peer",
            &route(0),
            "--trust",
            "*",
            "--peer",
            &format!("a.test=127.0.0.1:{}", ports[0]),
        ],
    );
    let (mut fred, channel) = attached(&a, "fred@a.test");
    let option = "<option internal='dataHopping' targetHop='all' mustUnderstand='true' transID='90'>\r\n      <dataHopping noMoreThan='4' reportErrors='true' />\r\n   </option>";
    assert!(
        fred.request(
            channel,
            data("fred@a.test", "x@loop.test", option, "round and round")
        )
        .0
    );
    // After four relay-to-relay hops the data is dropped and the originator told (OPT-17).
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(report.contains("<statusResponse"), "{report}");
    assert!(
        report.contains("<destination identity='x@loop.test'>"),
        "{report}"
    );
    assert!(report.contains("code='550'"), "{report}");
}

#[test]
fn apex_04_domain_literal_is_routed_without_dns() {
    // No static route: the literal's address and the IANA port 912 are used (nothing listens
    // there in tests, so the recipient fails and is reported).
    let a = relay("example.com", free_port(), &[]);
    let (mut fred, channel) = attached(&a, "fred@example.com");
    let option = "<option internal='statusRequest' transID='4' />";
    assert!(
        fred.request(
            channel,
            data("fred@example.com", "x@[127.0.0.1]", option, "?")
        )
        .0
    );
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<destination identity='x@[127.0.0.1]'>"),
        "{report}"
    );
    assert!(report.contains("code='550'"), "{report}");
}

#[test]
fn apex_04_srv_records_lead_to_the_next_relay_trying_each_address_in_order() {
    // rubble.test has no static route; DNS names two targets: the first by priority refuses
    // connections, the second is rubble.test's relay.
    let (port_a, port_b, dead) = (free_port(), free_port(), free_port());
    let dns = DnsServer::start(
        Zone::new()
            .srv(
                "_apex-mesh._tcp.rubble.test",
                10,
                0,
                dead,
                "down.rubble.test",
            )
            .srv(
                "_apex-mesh._tcp.rubble.test",
                20,
                5,
                port_b,
                "relay.rubble.test",
            )
            .a("down.rubble.test", [127, 0, 0, 1])
            .a("relay.rubble.test", [127, 0, 0, 1]),
    );
    let dns_server = dns.addr.to_string();
    let peer_a = format!("example.com=127.0.0.1:{port_a}");
    let a = relay(
        "example.com",
        port_a,
        &[
            "--dns-server",
            &dns_server,
            "--grant",
            "*@rubble.test=core:data",
        ],
    );
    let b = relay(
        "rubble.test",
        port_b,
        &["--peer", &peer_a, "--grant", "*@example.com=core:data"],
    );
    let (mut barney, _) = attached(&b, "barney@rubble.test");
    let (mut fred, fred_channel) = attached(&a, "fred@example.com");
    let option = "<option internal='statusRequest' transID='12' />";
    let sent = data(
        "fred@example.com",
        "barney@rubble.test",
        option,
        "found you",
    );
    assert!(fred.request(fred_channel, sent.clone()).0);
    assert_eq!(barney.receive(), sent);
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<reply code='250' transID='12' />"),
        "{report}"
    );
    assert!(dns
        .queries()
        .iter()
        .any(|(name, _, _)| name == "_apex-mesh._tcp.rubble.test"));
}

#[test]
fn apex_04_a_lone_srv_target_dot_means_the_domain_has_no_relay() {
    // The domain has an address, but its SRV record says "no apex-mesh service here": the
    // recipient fails without the address being looked up.
    let dns = DnsServer::start(
        Zone::new()
            .srv("_apex-mesh._tcp.closed.test", 0, 0, 0, ".")
            .a("closed.test", [127, 0, 0, 1]),
    );
    let dns_server = dns.addr.to_string();
    let a = relay("example.com", free_port(), &["--dns-server", &dns_server]);
    let (mut fred, channel) = attached(&a, "fred@example.com");
    let option = "<option internal='statusRequest' transID='13' />";
    assert!(
        fred.request(
            channel,
            data("fred@example.com", "x@closed.test", option, "?")
        )
        .0
    );
    let report = String::from_utf8(fred.receive().to_vec()).unwrap();
    assert!(
        report.contains("<destination identity='x@closed.test'>"),
        "{report}"
    );
    assert!(report.contains("code='550'"), "{report}");
    assert!(!dns.asked_addresses_of("closed.test"));
}
