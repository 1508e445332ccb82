//! The outbound relay link (RFC 3340 §3.1, §4.4.2, §4.4.4.1 step 5.2) as the shard core runs
//! it, against simulated next relays ([`NextRelayBehaviour`]) in [`RelayNet`]: the `bind`
//! piggybacked or as a MSG, success only on the next relay's `ok`, every failure reported
//! where a statusRequest asked, backoff between connection attempts, and a session released
//! by agreement before its transport closes.

use apex_proto::apex::client::{self, DataBuilder, Incoming};
use apex_proto::apex::relay::ConnKind;
use apex_proto::shard::{ConnectFailure, LinkConfig, LinkPhase, LinkState};
use apex_proto::testing::{ClientId, NextRelayBehaviour, RelayNet};
use bytes::Bytes;

/// example.com's relay on `shards` shards, with fred attached; the next relay of rubble.com
/// behaves as `behaviour`.
fn net_with(shards: usize, behaviour: NextRelayBehaviour) -> (RelayNet, ClientId, u32) {
    let mut net = RelayNet::new("example.com", shards);
    net.next_relay_behaviour
        .insert("rubble.com".to_owned(), behaviour);
    let fred = net.connect(0, ConnKind::Edge);
    let (channel, reply) = net.attach(fred, "fred@example.com");
    assert_eq!(reply, "<ok />");
    (net, fred, channel)
}

/// fred's data to barney@rubble.com with content `text`, asking for a report (transID 7).
fn to_barney(text: &str) -> Bytes {
    DataBuilder::new("fred@example.com")
        .to("barney@rubble.com")
        .status_request(7)
        .text(text)
}

/// The codes and diagnostics of the statusResponses fred received, in order.
fn reports(net: &RelayNet, fred: ClientId) -> Vec<(u16, String)> {
    net.clients[fred]
        .received
        .iter()
        .filter_map(|(_, _, payload)| match client::parse_incoming(payload) {
            Ok(Incoming::Status { response, .. }) => Some(response),
            _ => None,
        })
        .flat_map(|r| r.destinations)
        .map(|d| (d.code, d.text))
        .collect()
}

fn link_state(net: &RelayNet, shard: usize) -> Option<LinkState> {
    net.shards[shard].link_state("rubble.com")
}

fn wire(net: &RelayNet, link: usize) -> String {
    String::from_utf8_lossy(&net.next_relays[link].from_link).into_owned()
}

/// APEX-24, APEX-06: the link starts the APEX channel with our `bind` piggybacked (byte-exact
/// start), the next relay's `ok` binds it, and the data goes out unchanged; its `ok` is
/// success (no report beyond the statusRequest's own route).
#[test]
fn apex_24_the_link_binds_piggybacked_and_delivers_on_the_next_relays_ok() {
    let (mut net, fred, channel) = net_with(1, NextRelayBehaviour::default());
    let data = to_barney("hello");
    let (ok, _) = net.send(fred, channel, data.clone());
    assert!(ok);
    assert_eq!(net.forwards_to("rubble.com"), vec![data]);
    let start = "MSG 0 1 . 52 176\r\nContent-Type: application/beep+xml\r\n\r\n\
        <start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>\
        <![CDATA[<bind relay='example.com' transID='1' />]]></profile>\r\n</start>\r\nEND\r\n";
    assert!(wire(&net, 0).contains(start), "{}", wire(&net, 0));
    assert_eq!(net.next_relays[0].bound_as.as_deref(), Some("example.com"));
    assert!(matches!(
        link_state(&net, 0),
        Some(LinkState::Open {
            phase: LinkPhase::Bound { channel: 1 },
            ..
        })
    ));
    assert!(reports(&net, fred).is_empty(), "no failure to report");
}

/// APEX-06 (RFC 3340 §4.2): a next relay that accepts the channel without answering the
/// piggybacked `bind` gets it as an ordinary MSG (byte-exact), and the data follows its `ok`.
#[test]
fn apex_06_a_bind_the_next_relay_did_not_answer_is_sent_as_a_msg() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            answers_piggyback: false,
            ..NextRelayBehaviour::default()
        },
    );
    let data = to_barney("after the bind");
    let (ok, _) = net.send(fred, channel, data.clone());
    assert!(ok);
    let bind_msg = "MSG 1 0 . 0 80\r\nContent-Type: application/beep+xml\r\n\r\n\
        <bind relay='example.com' transID='1' />\r\nEND\r\n";
    assert!(wire(&net, 0).contains(bind_msg), "{}", wire(&net, 0));
    assert_eq!(net.forwards_to("rubble.com"), vec![data]);
    assert!(reports(&net, fred).is_empty());
}

/// APEX-17, APEX-24: a refused `bind` fails the queued data, reported with the next relay's
/// code; the link asks to release the session (`close` number 0, BEEP-32) and the transport
/// closes only after the next relay's `ok` to it (BEEP-58).
#[test]
fn apex_17_a_refused_bind_is_reported_and_the_session_released_by_agreement() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            bind_error: Some(537),
            ..NextRelayBehaviour::default()
        },
    );
    let (ok, _) = net.send(fred, channel, to_barney("refused"));
    assert!(ok, "accepted by our relay before it is forwarded");
    assert!(net.forwards.is_empty());
    let reported = reports(&net, fred);
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].0, 550);
    assert!(reported[0].1.contains("537"), "{reported:?}");
    let wire = wire(&net, 0);
    assert!(
        wire.contains("<close number='0' code='421' />"),
        "session close with number 0: {wire}"
    );
    // Released by agreement: the next relay's ok arrived, then the link closed.
    assert!(!net.next_relays[0].connected);
    assert!(net.next_relays[0].session.is_finished());
    assert_eq!(link_state(&net, 0), Some(LinkState::Idle));
}

/// BEEP-58 and the close timeout: a next relay that never answers our `close` keeps the
/// transport open until `close_timeout`, not a moment less, then it closes anyway.
#[test]
fn beep_58_a_link_waits_for_the_close_reply_until_its_timeout() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            bind_error: Some(550),
            answers_close: false,
            ..NextRelayBehaviour::default()
        },
    );
    let (ok, _) = net.send(fred, channel, to_barney("x"));
    assert!(ok);
    assert!(matches!(
        link_state(&net, 0),
        Some(LinkState::Open {
            phase: LinkPhase::Closing { .. },
            ..
        })
    ));
    let timeout = LinkConfig::new("example.com").close_timeout.as_millis() as u64;
    net.advance(timeout - 1);
    assert!(net.next_relays[0].connected, "still waiting for the reply");
    net.advance(1);
    assert!(!net.next_relays[0].connected, "closed at the timeout");
    assert_eq!(link_state(&net, 0), Some(LinkState::Idle));
}

/// APEX-24: success only on the next relay's `ok`: its `error` to a data is reported with
/// its code, and the link stays bound for the next data.
#[test]
fn apex_24_data_the_next_relay_refuses_is_reported() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            data_error: Some(554),
            ..NextRelayBehaviour::default()
        },
    );
    let (ok, _) = net.send(fred, channel, to_barney("one"));
    assert!(ok);
    let (ok, _) = net.send(fred, channel, to_barney("two"));
    assert!(ok);
    let reported = reports(&net, fred);
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(reported
        .iter()
        .all(|(code, text)| *code == 550 && text.contains("554")));
    assert_eq!(net.next_relays.len(), 1, "one connection served both");
}

/// APEX-24 and the backoff: an unreachable next relay is tried `connect_attempts` times,
/// the waits doubling from 100 ms, before the queued data fails and is reported.
#[test]
fn apex_24_an_unreachable_relay_is_retried_with_backoff_then_reported() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            connect_failure: Some(ConnectFailure::Unreachable("refused".to_owned())),
            ..NextRelayBehaviour::default()
        },
    );
    let (ok, _) = net.send(fred, channel, to_barney("later"));
    assert!(ok);
    // Attempt 1 failed at once; attempts 2..5 follow after 100, 200, 400, 800 ms.
    for wait in [100, 200, 400] {
        assert!(matches!(
            link_state(&net, 0),
            Some(LinkState::Backoff { .. })
        ));
        net.advance(wait - 1);
        assert_eq!(net.shards[0].link_queued("rubble.com"), 1, "still queued");
        net.advance(1);
    }
    assert!(
        reports(&net, fred).is_empty(),
        "four attempts: nothing failed yet"
    );
    net.advance(800);
    let reported = reports(&net, fred);
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].1.contains("unreachable"), "{reported:?}");
    assert_eq!(net.shards[0].link_queued("rubble.com"), 0);
}

/// APEX-04: a domain without a route fails its data at once.
#[test]
fn apex_04_data_for_a_domain_without_a_route_fails_at_once() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            connect_failure: Some(ConnectFailure::NoRoute("no route".to_owned())),
            ..NextRelayBehaviour::default()
        },
    );
    let (ok, _) = net.send(fred, channel, to_barney("nowhere"));
    assert!(ok);
    let reported = reports(&net, fred);
    assert_eq!(reported, vec![(550, "no route".to_owned())]);
    assert_eq!(link_state(&net, 0), Some(LinkState::Idle));
}

/// A next relay that drops the connection with data in flight: what it never answered is
/// reported as lost, and what was still queued goes out on a new connection.
#[test]
fn a_lost_link_reports_what_was_in_flight_and_reconnects_for_the_rest() {
    let mut net = RelayNet::new("example.com", 1);
    net.shards[0].set_link_config(LinkConfig {
        in_flight: 2,
        ..LinkConfig::new("example.com")
    });
    net.next_relay_behaviour.insert(
        "rubble.com".to_owned(),
        NextRelayBehaviour {
            holds_data: true,
            ..NextRelayBehaviour::default()
        },
    );
    let fred = net.connect(0, ConnKind::Edge);
    let (channel, _) = net.attach(fred, "fred@example.com");
    for i in 0..5 {
        let (ok, _) = net.send(fred, channel, to_barney(&format!("m{i}")));
        assert!(ok);
    }
    assert_eq!(net.next_relays[0].held.len(), 2, "two in flight");
    assert_eq!(net.shards[0].link_queued("rubble.com"), 3);
    // The next connection finds a healthy relay.
    net.next_relay_behaviour.remove("rubble.com");
    net.drop_link(0);
    let reported = reports(&net, fred);
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(reported
        .iter()
        .all(|(_, t)| t.contains("connection to the next relay lost")));
    assert_eq!(net.next_relays.len(), 2, "reconnected");
    let delivered: Vec<Bytes> = net.forwards_to("rubble.com");
    assert_eq!(
        delivered,
        (2..5)
            .map(|i| to_barney(&format!("m{i}")))
            .collect::<Vec<_>>()
    );
}

/// Data beyond the link's queue fails at once (reported), while what fits waits.
#[test]
fn a_full_link_queue_refuses_more_data() {
    let mut net = RelayNet::new("example.com", 1);
    net.shards[0].set_link_config(LinkConfig {
        queue: 2,
        ..LinkConfig::new("example.com")
    });
    net.next_relay_behaviour.insert(
        "rubble.com".to_owned(),
        NextRelayBehaviour {
            connect_failure: Some(ConnectFailure::Unreachable("refused".to_owned())),
            ..NextRelayBehaviour::default()
        },
    );
    let fred = net.connect(0, ConnKind::Edge);
    let (channel, _) = net.attach(fred, "fred@example.com");
    for i in 0..3 {
        net.send(fred, channel, to_barney(&format!("q{i}")));
    }
    assert_eq!(net.shards[0].link_queued("rubble.com"), 2);
    let reported = reports(&net, fred);
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].1.contains("queue is full"), "{reported:?}");
}

/// Shutdown: queued data fails with a reason, and a link takes no more.
#[test]
fn a_stopping_shard_reports_what_its_links_queued() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            connect_failure: Some(ConnectFailure::Unreachable("refused".to_owned())),
            ..NextRelayBehaviour::default()
        },
    );
    net.send(fred, channel, to_barney("queued"));
    let now = std::time::Instant::now();
    net.shards[0].stop_links(now);
    net.drive();
    net.send(fred, channel, to_barney("after"));
    let reported = reports(&net, fred);
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(reported.iter().all(|(_, t)| t.contains("shutting down")));
}

/// On two shards the link lives on the domain's owner shard only, whichever shard the sender
/// is on; the next relay sees one connection.
#[test]
fn apex_24_one_link_per_domain_on_its_owner_shard() {
    let mut net = RelayNet::new("example.com", 2);
    let mut senders = Vec::new();
    for shard in 0..2 {
        let id = net.connect(shard, ConnKind::Edge);
        let (channel, _) = net.attach(id, &format!("s{shard}@example.com"));
        senders.push((id, channel, shard));
    }
    for (id, channel, shard) in senders {
        let data = DataBuilder::new(&format!("s{shard}@example.com"))
            .to("barney@rubble.com")
            .text("x");
        assert!(net.send(id, channel, data).0);
    }
    assert_eq!(net.next_relays.len(), 1);
    assert_eq!(net.forwards_to("rubble.com").len(), 2);
    let owner = apex_proto::apex::relay::domain_shard("rubble.com", 2);
    assert_eq!(net.next_relays[0].shard, owner);
    assert!(link_state(&net, 1 - owner).is_none());
}

/// BEEP-15 (RFC 3080 §2.2.2.1), issue 19 item 5: a next relay answering data with a RPY that
/// is neither `ok` nor `error` has not accepted it: the data fails (reported), and the link's
/// APEX channel, its only one, is closed by releasing the session. The link to another
/// domain alongside is untouched.
#[test]
fn beep_15_a_poorly_formed_reply_from_the_next_relay_fails_the_data_and_ends_the_link() {
    let (mut net, fred, channel) = net_with(
        1,
        NextRelayBehaviour {
            data_reply: Some(Bytes::from_static(
                b"Content-Type: application/beep+xml\r\n\r\n<okay />\r\n",
            )),
            ..NextRelayBehaviour::default()
        },
    );
    let healthy = DataBuilder::new("fred@example.com")
        .to("wilma@other.org")
        .status_request(8)
        .text("fine");
    let (ok, _) = net.send(fred, channel, healthy.clone());
    assert!(ok);
    let (ok, _) = net.send(fred, channel, to_barney("garbled"));
    assert!(ok);
    assert_eq!(
        reports(&net, fred),
        vec![(550, "poorly formed reply from the next relay".to_owned())],
        "a failure, reported as a poorly formed reply"
    );
    assert!(net.forwards_to("rubble.com").is_empty());
    let rubble = net
        .next_relays
        .iter()
        .position(|r| r.domain == "rubble.com")
        .unwrap();
    assert!(
        wire(&net, rubble).contains("<close number='0' code='421' />"),
        "the link asked to release its session: {}",
        wire(&net, rubble)
    );
    assert!(
        !net.next_relays[rubble].connected,
        "and its transport closed"
    );
    assert_eq!(link_state(&net, 0), Some(LinkState::Idle));
    // The other domain's link delivered and stays bound.
    assert_eq!(net.forwards_to("other.org"), vec![healthy.clone()]);
    let (ok, _) = net.send(fred, channel, healthy);
    assert!(ok);
    assert_eq!(net.forwards_to("other.org").len(), 2);
    assert!(matches!(
        net.shards[0].link_state("other.org"),
        Some(LinkState::Open {
            phase: LinkPhase::Bound { .. },
            ..
        })
    ));
}

/// BEEP-41 (RFC 3080 §2.7: a profile defines the answer to a MSG it does not expect): the next
/// relay sends a `data` as a MSG on our link's APEX channel; the link carries our data only, so
/// it answers ERR 504 (byte-exact, after the 0-octet seqno of its own first data) and stays
/// bound: our next data still goes out.
#[test]
fn beep_41_an_unexpected_msg_on_a_link_gets_err_504_and_the_link_stays() {
    let (mut net, fred, channel) = net_with(1, NextRelayBehaviour::default());
    let first = to_barney("first");
    let (ok, _) = net.send(fred, channel, first.clone());
    assert!(ok);
    assert_eq!(net.forwards_to("rubble.com"), vec![first.clone()]);
    let theirs = DataBuilder::new("barney@rubble.com")
        .to("fred@example.com")
        .text("not on your link");
    net.next_relays[0].session.send_msg(1, theirs).unwrap();
    net.drive();
    let refusal = "Content-Type: application/beep+xml\r\n\r\n\
        <error code='504'>send over your own relay link</error>\r\n";
    let expected = format!(
        "ERR 1 0 . {} {}\r\n{refusal}END\r\n",
        first.len(),
        refusal.len()
    );
    assert!(wire(&net, 0).ends_with(&expected), "{}", wire(&net, 0));
    assert!(matches!(
        link_state(&net, 0),
        Some(LinkState::Open {
            phase: LinkPhase::Bound { channel: 1 },
            ..
        })
    ));
    let second = to_barney("second");
    let (ok, _) = net.send(fred, channel, second.clone());
    assert!(ok);
    assert_eq!(net.forwards_to("rubble.com"), vec![first, second]);
    assert!(reports(&net, fred).is_empty(), "nothing failed");
}

/// A next relay that accepts the connection and never greets (RFC 3080 §2.4: either side may
/// close a session that goes nowhere): the link keeps it `setup_timeout` and not a moment less,
/// then closes it, and the queued data fails with that reason, reported where asked.
#[test]
fn a_next_relay_that_never_greets_loses_the_connection_at_the_setup_timeout() {
    for shards in [1, 2] {
        let (mut net, fred, channel) = net_with(
            shards,
            NextRelayBehaviour {
                silent: true,
                ..NextRelayBehaviour::default()
            },
        );
        let (ok, _) = net.send(fred, channel, to_barney("to a silent relay"));
        assert!(ok, "accepted by our relay before it is forwarded");
        let owner = net.next_relays[0].shard;
        assert!(matches!(
            link_state(&net, owner),
            Some(LinkState::Open {
                phase: LinkPhase::Greeting,
                ..
            })
        ));
        let timeout = LinkConfig::new("example.com").setup_timeout.as_millis() as u64;
        net.advance(timeout - 1);
        assert!(
            net.next_relays[0].connected,
            "still within the setup timeout"
        );
        assert!(reports(&net, fred).is_empty());
        net.advance(1);
        assert!(!net.next_relays[0].connected, "closed at the setup timeout");
        assert_eq!(link_state(&net, owner), Some(LinkState::Idle));
        let reported = reports(&net, fred);
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert_eq!(reported[0].0, 550);
        assert!(
            reported[0]
                .1
                .contains("did not set up the session within 10000 ms"),
            "{reported:?}"
        );
        assert!(net.forwards.is_empty());
    }
}

/// The setup timeout runs only until the link is bound: a bound link that stays quiet far
/// longer keeps its connection and sends the next data on it.
#[test]
fn a_bound_link_is_not_subject_to_the_setup_timeout() {
    let (mut net, fred, channel) = net_with(1, NextRelayBehaviour::default());
    let (ok, _) = net.send(fred, channel, to_barney("one"));
    assert!(ok);
    let timeout = LinkConfig::new("example.com").setup_timeout.as_millis() as u64;
    net.advance(3 * timeout);
    assert!(net.next_relays[0].connected);
    let (ok, _) = net.send(fred, channel, to_barney("two"));
    assert!(ok);
    assert_eq!(net.forwards_to("rubble.com").len(), 2);
    assert_eq!(net.next_relays.len(), 1, "one connection served both");
    assert!(reports(&net, fred).is_empty());
}
