//! Relay-to-relay tests on loopback (RFC 3340 §4.4.2, §4.4.4.1 step 5.2; RFC 3342 dataHopping):
//! two relays in different domains delivering to each other with the originator preserved,
//! reports crossing back, an unreachable domain reported, a three-relay routing loop
//! stopped by dataHopping, and relays found by DNS SRV (APEX-04) on a loopback DNS server: the
//! next relay by apexd (`_apex-mesh._tcp`), an endpoint's relay by the `apex` client
//! (`_apex-edge._tcp`).
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

/// Two relays that route to each other: example.com (A, given the configuration file `toml_a`,
/// none when empty) and rubble.com (B).
fn relay_pair(toml_a: &str) -> (Relay, Relay, common::ScratchDir) {
    let (port_a, port_b) = (free_port(), free_port());
    let peer_b = format!("rubble.com=127.0.0.1:{port_b}");
    let peer_a = format!("example.com=127.0.0.1:{port_a}");
    let dir = common::ScratchDir::new("mesh-config");
    let config = format!("{}/a.toml", dir.as_str());
    std::fs::write(&config, toml_a).unwrap();
    let a = relay(
        "example.com",
        port_a,
        &[
            "--config",
            &config,
            "--peer",
            &peer_b,
            "--grant",
            "*@rubble.com=core:data",
        ],
    );
    let b = relay(
        "rubble.com",
        port_b,
        &["--peer", &peer_a, "--grant", "*@example.com=core:data"],
    );
    (a, b, dir)
}

/// The report service and reply of a report payload: (`apex=report@DOMAIN`, the `<reply`
/// element).
fn report_of(payload: &Bytes) -> (String, String) {
    let text = String::from_utf8_lossy(payload);
    let field = |start: &str, end: &str| {
        let at = text
            .find(start)
            .unwrap_or_else(|| panic!("{start} in {text}"));
        let rest = &text[at..];
        rest[..rest.find(end).unwrap() + end.len()].to_owned()
    };
    (field("apex=report@", "'"), field("<reply", ">"))
}

#[test]
fn apex_38_opt_02_every_relay_on_the_path_reports_target_hop_all() {
    let (a, b, _dir) = relay_pair("");
    let (mut barney, _) = attached(&b, "barney@rubble.com");
    let (mut fred, fred_channel) = attached(&a, "fred@example.com");
    let option = "<option internal='statusRequest' targetHop='all' transID='86' />";
    let sent = data("fred@example.com", "barney@rubble.com", option, "hello");
    assert!(fred.request(fred_channel, sent.clone()).0);
    assert_eq!(barney.receive(), sent, "the option travels on unchanged");
    // One report from each relay: the forwarding relay's on the forward, the delivering
    // relay's on the delivery (RFC 3340 §5.1), in either order.
    let mut reports = vec![report_of(&fred.receive()), report_of(&fred.receive())];
    reports.sort();
    assert_eq!(
        reports,
        vec![
            (
                "apex=report@example.com'".to_owned(),
                "<reply code='250' transID='86'>".to_owned()
            ),
            (
                "apex=report@rubble.com'".to_owned(),
                "<reply code='250' transID='86' />".to_owned()
            ),
        ]
    );
}

#[test]
fn issue_19_item_7_a_next_relay_killed_after_accepting_is_reported_450() {
    let (a, mut b, _dir) = relay_pair("[mesh]\nreport_timeout_ms = 1500\n");
    // A healthy pair on A alongside, asking for reports too.
    let (mut betty, _) = attached(&a, "betty@example.com");
    let (mut wilma, wilma_channel) = attached(&a, "wilma@example.com");
    // barney takes the delivery in but never answers it: B accepted the data and holds it.
    let (mut barney, _) = attached(&b, "barney@rubble.com");
    let (mut fred, fred_channel) = attached(&a, "fred@example.com");
    let option = "<option internal='statusRequest' transID='7' />";
    let sent = data("fred@example.com", "barney@rubble.com", option, "hello");
    assert!(fred.request(fred_channel, sent).0);
    barney.pump_until("the delivery", |c| {
        c.events
            .iter()
            .any(|e| matches!(e, apex_proto::Event::Message { .. }))
    });
    // B answered A's forward before it delivered; let that answer reach A, then B dies.
    std::thread::sleep(std::time::Duration::from_millis(200));
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    for i in 0..5 {
        let option = format!("<option internal='statusRequest' transID='{}' />", 100 + i);
        let text = format!("healthy {i}");
        let sent = data("wilma@example.com", "betty@example.com", &option, &text);
        assert!(wilma.request(wilma_channel, sent.clone()).0);
        assert_eq!(betty.receive(), sent);
        let (_, reply) = report_of(&wilma.receive());
        assert_eq!(reply, format!("<reply code='250' transID='{}' />", 100 + i));
    }
    // Nobody further on will report: A does, once the bound passed.
    let (reporter, reply) = report_of(&fred.receive());
    assert_eq!(reporter, "apex=report@example.com'");
    assert_eq!(reply, "<reply code='450' transID='7'>");
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

/// What the hand-written next relay of [`a_link_sends_bind_as_a_msg_and_closes_by_agreement`]
/// saw.
struct NextRelaySaw {
    bind: Bytes,
    data: Bytes,
    close: String,
    /// Whether the transport was still open 300 ms after the link's `close`, unanswered.
    open_while_unanswered: bool,
    /// Whether the transport closed (FIN) after our `ok` to the `close`.
    closed_after_ok: bool,
}

/// A next relay for a domain, on `listener`: accepts the APEX channel without answering the
/// piggybacked bind, answers the bind sent as a MSG and the data with `ok` (telling
/// `data_arrived`), then waits for the link's session `close`, holds its answer back 300 ms,
/// and answers it.
fn hand_written_next_relay(
    listener: std::net::TcpListener,
    data_arrived: std::sync::mpsc::Sender<()>,
) -> NextRelaySaw {
    use apex_proto::apex::relay::APEX_PROFILE;
    use apex_proto::{Event, Role, Session, SessionConfig};
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let (mut stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut session = Session::new(
        Role::Listener,
        SessionConfig {
            profiles: vec![APEX_PROFILE.to_owned()],
            ..SessionConfig::default()
        },
    );
    let flush = |session: &mut Session, stream: &mut std::net::TcpStream| {
        let mut out = bytes::BytesMut::new();
        while session.poll_transmit(&mut out) > 0 {}
        stream.write_all(&out).unwrap();
    };
    // Every octet the link wrote, and how many of them the session has been given.
    let mut wire = Vec::new();
    let mut fed = 0;
    let mut inbox = bytes::BytesMut::new();
    let (mut bind, mut data) = (Bytes::new(), Bytes::new());
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    let close = loop {
        assert!(Instant::now() < deadline, "the link never asked to close");
        flush(&mut session, &mut stream);
        match stream.read(&mut buf) {
            Ok(0) => panic!("the link closed TCP without a session close"),
            Ok(n) => wire.extend_from_slice(&buf[..n]),
            Err(_) => continue,
        }
        let unseen = String::from_utf8_lossy(&wire[fed..]).into_owned();
        if let Some(at) = unseen.find("<close number='0'") {
            // Hold the answer back: the close is not given to the session yet.
            let end = unseen[at..].find("/>").map_or(unseen.len(), |e| at + e + 2);
            break unseen[at..end].to_owned();
        }
        inbox.extend_from_slice(&wire[fed..]);
        fed = wire.len();
        session.handle_input(&mut inbox, Instant::now()).unwrap();
        while let Some(event) = session.poll_event() {
            match event {
                Event::StartRequested(request) => {
                    // Accepted without answering the piggybacked bind (RFC 3340 §4.2).
                    session
                        .accept_start(request.id, APEX_PROFILE, None)
                        .unwrap();
                }
                Event::Message {
                    channel,
                    msgno,
                    payload,
                } => {
                    if bind.is_empty() {
                        bind = payload;
                    } else {
                        data = payload;
                        data_arrived.send(()).unwrap();
                    }
                    let ok = apex_proto::apex::client::ok_payload();
                    session.send_rpy(channel, msgno, ok).unwrap();
                }
                _ => {}
            }
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    stream.set_nonblocking(true).unwrap();
    let open_while_unanswered = !matches!(stream.peek(&mut buf[..1]), Ok(0));
    stream.set_nonblocking(false).unwrap();
    // Answer: the session takes the close (and anything after it) and replies ok.
    inbox.extend_from_slice(&wire[fed..]);
    session.handle_input(&mut inbox, Instant::now()).unwrap();
    while session.poll_event().is_some() {}
    flush(&mut session, &mut stream);
    let mut closed_after_ok = false;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => {
                closed_after_ok = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => {}
        }
    }
    NextRelaySaw {
        bind,
        data,
        close,
        open_while_unanswered,
        closed_after_ok,
    }
}

/// APEX-06, APEX-24, BEEP-32, BEEP-58 on the real runtime: a next relay that accepts the
/// channel without answering the piggybacked `bind` gets the `bind` as a MSG and then the
/// data; when the relay shuts down, its link asks to release the session with `close`
/// number 0 and keeps the transport open until the next relay answers, then closes it.
#[test]
fn a_link_sends_bind_as_a_msg_and_closes_by_agreement() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let next_relay = format!("rubble.test={}", listener.local_addr().unwrap());
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let far_end = std::thread::spawn(move || hand_written_next_relay(listener, arrived_tx));
    let mut a = relay("example.com", free_port(), &["--peer", &next_relay]);
    let (mut fred, channel) = attached(&a, "fred@example.com");
    let sent = data(
        "fred@example.com",
        "barney@rubble.test",
        "",
        "over the link",
    );
    assert!(fred.request(channel, sent.clone()).0);
    arrived
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the data reached the next relay");
    assert!(a.terminate().success());
    let saw = far_end.join().unwrap();
    assert_eq!(
        &saw.bind[..],
        b"Content-Type: application/beep+xml\r\n\r\n<bind relay='example.com' transID='1' />\r\n"
    );
    assert_eq!(saw.data, sent, "APEX-24: the data unchanged");
    assert_eq!(saw.close, "<close number='0' code='421' />");
    assert!(
        saw.open_while_unanswered,
        "BEEP-58: the link must not close TCP before the close is answered"
    );
    assert!(saw.closed_after_ok, "BEEP-58: closed once answered");
}

/// Runs the `apex` client with `args`, keeping its DNS lookups on loopback as apexd's are
/// here; returns whether it exited 0 and what it printed.
fn apex_client(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(args)
        .env("APEXD_DNS_LOOPBACK_ONLY", "1")
        .env_remove("APEX_PASSWORD")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// APEX-04 (RFC 3340 §3.1) for endpoints: `apex` without `--relay` finds the relay of the
/// endpoint's domain under `_apex-edge._tcp` (not the relays' `_apex-mesh._tcp`), tries the
/// targets in RFC 2782 order (the first, by priority, refuses connections) and sends through
/// the second, which delivers.
#[test]
fn apex_04_the_apex_client_finds_its_domains_relay_by_apex_edge_srv() {
    let b = Relay::start_with(&[
        "--shards",
        "1",
        "--domain",
        "rubble.test",
        "--grant",
        "*@rubble.test=core:data",
    ]);
    let dead = free_port();
    let dns = DnsServer::start(
        Zone::new()
            .srv(
                "_apex-edge._tcp.rubble.test",
                10,
                0,
                dead,
                "down.rubble.test",
            )
            .srv(
                "_apex-edge._tcp.rubble.test",
                20,
                0,
                b.edge.port(),
                "edge.rubble.test",
            )
            .srv(
                "_apex-mesh._tcp.rubble.test",
                0,
                0,
                dead,
                "down.rubble.test",
            )
            .a("down.rubble.test", [127, 0, 0, 1])
            .a("edge.rubble.test", [127, 0, 0, 1]),
    );
    let dns_server = dns.addr.to_string();
    let (mut barney, _) = attached(&b, "barney@rubble.test");
    let (ok, out) = apex_client(&[
        "--dns-server",
        &dns_server,
        "send",
        "--from",
        "fred@rubble.test",
        "--to",
        "barney@rubble.test",
        "found by SRV",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out, "accepted\n");
    let delivered = String::from_utf8(barney.receive().to_vec()).unwrap();
    assert!(delivered.contains("found by SRV"), "{delivered}");
    let queries = dns.queries();
    assert!(
        queries
            .iter()
            .any(|(name, _, _)| name == "_apex-edge._tcp.rubble.test"),
        "{queries:?}"
    );
    assert!(
        queries
            .iter()
            .all(|(name, _, _)| !name.starts_with("_apex-mesh")),
        "{queries:?}"
    );
}

/// APEX-04: a lone `.` target says the domain has no relay for endpoints, so `apex` stops
/// there with an error naming the domain (its address is not tried); and without
/// `--dns-server` under `APEXD_DNS_LOOPBACK_ONLY` it refuses to ask the system's resolver.
#[test]
fn apex_04_the_apex_client_reports_a_domain_without_a_relay() {
    let dns = DnsServer::start(
        Zone::new()
            .srv("_apex-edge._tcp.closed.test", 0, 0, 0, ".")
            .a("closed.test", [127, 0, 0, 1]),
    );
    let dns_server = dns.addr.to_string();
    let send = |extra: &[&str]| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--connect-timeout", "5"]);
        args.extend([
            "send",
            "--from",
            "fred@closed.test",
            "--to",
            "x@closed.test",
            "?",
        ]);
        apex_client(&args)
    };
    let (ok, out) = send(&["--dns-server", &dns_server]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot find the relay of closed.test") && out.contains("has no relay"),
        "{out}"
    );
    assert!(!dns.asked_addresses_of("closed.test"));
    let (ok, out) = send(&[]);
    assert!(!ok, "{out}");
    assert!(out.contains("APEXD_DNS_LOOPBACK_ONLY"), "{out}");
}
