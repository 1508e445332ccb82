use super::*;

fn relay() -> Relay {
    Relay::new(RelayConfig {
        domain: "example.com".into(),
        shard: 0,
        shards: 1,
        limits: ApexLimits::default(),
        access: AccessTable::new().into(),
        trusted: Vec::new(),
        hold: options::HoldLimits::default(),
        store_queue: DEFAULT_STORE_QUEUE,
        report_watch: Default::default(),
        // Attach policy has its own tests (auth.rs, tests/security.rs).
        auth: AuthPolicy {
            mode: AuthMode::Off,
            ..AuthPolicy::default()
        },
    })
}

/// A relay where every endpoint of example.com may send data to every other.
fn granted_relay() -> Relay {
    let mut access = AccessTable::new();
    access
        .grant_domain(
            "example.com",
            crate::apex::access::ActorPattern::parse("*@example.com").unwrap(),
            vec![crate::apex::access::Action::CORE_DATA],
        )
        .unwrap();
    Relay::new(RelayConfig {
        access: access.into(),
        ..relay().config
    })
}

/// A granted relay with fred attached on connection 1 and barney on connection 2, both
/// edge sessions on channel 1; the attach replies are still queued.
fn fred_and_barney() -> Relay {
    let mut r = granted_relay();
    r.conn_opened(ConnId(1), ConnKind::Edge);
    r.conn_opened(ConnId(2), ConnKind::Edge);
    r.handle_message(
        ConnId(1),
        1,
        0,
        &message("<attach endpoint='fred@example.com' transID='1' />"),
    );
    r.handle_message(
        ConnId(2),
        1,
        0,
        &message("<attach endpoint='barney@example.com' transID='1' />"),
    );
    r
}

/// APEX-38: when a delivery's MSG cannot be queued (its channel is closing), the report
/// is about that delivery, and one sent before it still gets its own answer's report.
#[test]
fn a_refused_send_fails_the_newest_delivery_not_the_oldest() {
    let mut r = fred_and_barney();
    while r.poll_action().is_some() {}
    let with_status = |trans_id: u32| {
        message(&format!(
            "<data content='#C'><originator identity='fred@example.com' /><recipient identity='barney@example.com' /><option internal='statusRequest' transID='{trans_id}' /><data-content Name='C'>hi</data-content></data>"
        ))
    };
    for (msgno, trans_id) in [(1, 10), (2, 11)] {
        r.handle_message(ConnId(1), 1, msgno, &with_status(trans_id));
        let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
        assert!(
            matches!(
                actions.as_slice(),
                [
                    Action::Reply {
                        reply: MsgReply { positive: true, .. },
                        ..
                    },
                    Action::Send {
                        conn: ConnId(2),
                        ..
                    }
                ]
            ),
            "{actions:?}"
        );
    }
    // The first delivery went out; the second was refused by the closing channel.
    r.send_failed(ConnId(2), 1, "endpoint went away");
    let report = |r: &mut Relay| match r.poll_action() {
        Some(Action::Send {
            conn: ConnId(1),
            payload,
            ..
        }) => String::from_utf8_lossy(&payload).into_owned(),
        other => panic!("expected a report to fred, got {other:?}"),
    };
    let failed = report(&mut r);
    assert!(failed.contains("statusResponse transID='11'"), "{failed}");
    assert!(failed.contains("code='550'"), "{failed}");
    // Barney answers the first: its own report, a success.
    r.handle_reply(ConnId(2), 1, 0, ReplyKind::Rpy, &msg::ok_payload());
    let delivered = report(&mut r);
    assert!(
        delivered.contains("statusResponse transID='10'"),
        "{delivered}"
    );
    assert!(
        delivered.contains(&format!("code='{}'", apex_code::SUCCESS)),
        "{delivered}"
    );
    assert_eq!(r.poll_action(), None);
}

/// APEX-22 and APEX-16: an attachment on one channel authorizes data on the session's
/// other channels and no other session's; closing a session ends its channels alone.
#[test]
fn a_session_s_channels_are_found_by_its_connection() {
    let mut r = fred_and_barney();
    r.channel_started(ConnId(2), 3);
    while r.poll_action().is_some() {}
    let answer = |r: &mut Relay, conn, channel| {
        r.handle_message(
            conn,
            channel,
            1,
            &simple("fred@example.com", "barney@example.com"),
        );
        let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
        matches!(
            actions.first(),
            Some(Action::Reply {
                reply: MsgReply { positive: true, .. },
                ..
            })
        )
    };
    assert!(
        answer(&mut r, ConnId(1), 5),
        "fred's session, another channel"
    );
    assert!(!answer(&mut r, ConnId(2), 3), "another session");
    assert_eq!(r.conn_channels[&ConnId(1)], [1, 5]);
    assert_eq!(r.conn_channels[&ConnId(2)], [1, 3]);
    r.channel_closed(ConnId(2), 3);
    assert_eq!(r.conn_channels[&ConnId(2)], [1]);
    r.conn_closed(ConnId(1));
    assert!(!r.conn_channels.contains_key(&ConnId(1)));
    assert!(r
        .lookup(&Endpoint::parse("fred@example.com").unwrap())
        .is_none());
    assert!(r
        .lookup(&Endpoint::parse("barney@example.com").unwrap())
        .is_some());
    assert_eq!(r.conn_channels[&ConnId(2)], [1]);
}

fn message(doc: &str) -> Bytes {
    Bytes::from(format!("Content-Type: application/beep+xml\r\n\r\n{doc}"))
}

fn simple(originator: &str, recipient: &str) -> Bytes {
    message(&format!(
        "<data content='#C'><originator identity='{originator}' /><recipient identity='{recipient}' /><data-content Name='C'>hi</data-content></data>"
    ))
}

/// APEX-22..25: data of the common shape, routed by `simple_data`, leads to exactly the
/// actions the general path (the full `Data`) leads to, in every routing case: attached,
/// not attached, remote, unauthorized originator, invalid identities, access denied, from
/// an edge and from a bound relay.
#[test]
fn simple_data_acts_exactly_as_the_general_path() {
    let build = || {
        let mut r = fred_and_barney();
        r.conn_opened(ConnId(3), ConnKind::Mesh);
        r.handle_message(
            ConnId(3),
            1,
            0,
            &message("<bind relay='other.org' transID='1' />"),
        );
        let setup: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
        assert!(
            setup.iter().all(|a| matches!(
                a,
                Action::Reply {
                    reply: MsgReply { positive: true, .. },
                    ..
                }
            )),
            "{setup:?}"
        );
        assert!(r
            .lookup(&Endpoint::parse("barney@example.com").unwrap())
            .is_some());
        r
    };
    let (mut fast, mut general) = (build(), build().without_simple_data_path());
    let cases: [(ConnId, &str, &str); 10] = [
        (ConnId(1), "fred@example.com", "barney@example.com"),
        (ConnId(2), "barney@example.com", "fred@example.com"),
        (ConnId(1), "fred@example.com", "barney@EXAMPLE.com"),
        (ConnId(1), "fred@example.com", "nobody@example.com"),
        (ConnId(1), "fred@example.com", "someone@other.org"),
        (ConnId(1), "barney@example.com", "fred@example.com"),
        (ConnId(1), "fred", "barney@example.com"),
        (ConnId(1), "fred@example.com", "barney"),
        (ConnId(3), "ann@other.org", "barney@example.com"),
        (ConnId(3), "ann@third.net", "barney@example.com"),
    ];
    let mut seen = Vec::new();
    // Each case twice in a row: the second finds the channel's memo of the first's head.
    let twice = cases.iter().flat_map(|case| [*case, *case]);
    for (msgno, (conn, originator, recipient)) in (1..).zip(twice) {
        let payload = simple(originator, recipient);
        assert!(
            msg::parse_simple_data(&payload, &ApexLimits::default()).is_some(),
            "{originator} -> {recipient} must take the simple path"
        );
        let run = |r: &mut Relay| {
            r.handle_message(conn, 1, msgno, &payload);
            std::iter::from_fn(|| r.poll_action()).collect::<Vec<_>>()
        };
        let (a, b) = (run(&mut fast), run(&mut general));
        assert_eq!(a, b, "{originator} -> {recipient}");
        seen.push(a);
    }
    // The cases reach every outcome: delivered, forwarded, accepted and dropped, refused.
    let any = |f: &dyn Fn(&Action) -> bool| seen.iter().flatten().any(f);
    assert!(any(&|a| matches!(
        a,
        Action::Send {
            conn: ConnId(2),
            ..
        }
    )));
    assert!(any(&|a| matches!(
        a,
        Action::Send {
            conn: ConnId(1),
            ..
        }
    )));
    assert!(any(
        &|a| matches!(a, Action::Forward { domain, .. } if domain == "other.org")
    ));
    assert!(any(&|a| matches!(
        a,
        Action::Reply {
            reply: MsgReply {
                positive: false,
                ..
            },
            ..
        }
    )));
    assert!(seen.iter().any(|actions| actions.len() == 1
        && matches!(
            actions[0],
            Action::Reply {
                reply: MsgReply { positive: true, .. },
                ..
            }
        )));
}

/// APEX-22, APEX-16: a sender's simple data go where the general path sends them after
/// every kind of change that decides routes: the recipient detached, attached on another
/// channel or connection or shard, its channel or connection closed, the originator's own
/// attachment ended. Each data is sent twice, so the second follows a remembered route.
/// (A closed channel or connection is caught by the delivery's own look at the channel as
/// well: the epoch guards those twice.)
#[test]
fn remembered_simple_routes_follow_every_change_as_the_general_path() {
    let barney = || Endpoint::parse("barney@example.com").unwrap();
    let attach = |who: &str, trans_id: u32| {
        message(&format!(
            "<attach endpoint='{who}@example.com' transID='{trans_id}' />"
        ))
    };
    type Change = Box<dyn Fn(&mut Relay)>;
    let on_shard_1 = ChannelRef {
        shard: 1,
        conn: ConnId(9),
        channel: 1,
    };
    let changes: Vec<(&str, Change)> = vec![
        ("nothing", Box::new(|_| {})),
        (
            "barney terminates",
            Box::new(|r| r.handle_message(ConnId(2), 1, 1, &message("<terminate transID='1' />"))),
        ),
        (
            "barney attaches on channel 3",
            Box::new(move |r| r.handle_message(ConnId(2), 3, 0, &attach("barney", 2))),
        ),
        (
            "shard 1 says barney attached there",
            Box::new(move |r| {
                r.handle_envelope(Envelope::Attached {
                    endpoint: barney(),
                    at: on_shard_1,
                })
            }),
        ),
        (
            "shard 1 says barney detached there",
            Box::new(move |r| {
                r.handle_envelope(Envelope::Detached {
                    endpoint: barney(),
                    at: on_shard_1,
                })
            }),
        ),
        (
            "barney's channel 3 closes",
            Box::new(|r| r.channel_closed(ConnId(2), 3)),
        ),
        (
            "barney attaches over connection 4",
            Box::new(move |r| {
                r.conn_opened(ConnId(4), ConnKind::Edge);
                r.handle_message(ConnId(4), 1, 0, &attach("barney", 1));
            }),
        ),
        (
            "connection 4 closes",
            Box::new(|r| r.conn_closed(ConnId(4))),
        ),
        (
            "barney attaches in the start of channel 5",
            Box::new(move |r| r.handle_start(ConnId(2), 7, 5, &attach("barney", 3))),
        ),
        (
            "fred terminates",
            Box::new(|r| r.handle_message(ConnId(1), 1, 1, &message("<terminate transID='1' />"))),
        ),
    ];
    let (mut fast, mut general) = (
        fred_and_barney(),
        fred_and_barney().without_simple_data_path(),
    );
    let data = simple("fred@example.com", "barney@example.com");
    let mut sent_to = Vec::new();
    for (step, (name, change)) in changes.iter().enumerate() {
        let msgno = 10 + 2 * step as u32;
        let run = |r: &mut Relay| {
            change(r);
            let changed: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
            let sent: Vec<Vec<Action>> = (msgno..msgno + 2)
                .map(|msgno| {
                    r.handle_message(ConnId(1), 1, msgno, &data);
                    std::iter::from_fn(|| r.poll_action()).collect()
                })
                .collect();
            (changed, sent)
        };
        let (a, b) = (run(&mut fast), run(&mut general));
        assert_eq!(a, b, "after {name}");
        sent_to.extend(a.1.iter().flatten().filter_map(|action| match action {
            Action::Send { conn, channel, .. } => Some((0, *conn, *channel)),
            Action::ToShard { shard, .. } => Some((*shard, ConnId(0), 0)),
            _ => None,
        }));
    }
    // The routes did change: barney was reached at each of its places in turn. (Its
    // channel in a start takes MSGs once the start is answered: none are sent before.)
    sent_to.dedup();
    assert_eq!(
        sent_to,
        [
            (0, ConnId(2), 1),
            (0, ConnId(2), 3),
            (1, ConnId(0), 0),
            (0, ConnId(4), 1)
        ]
    );
}

/// A route is remembered only with a head the memo keeps: data whose head is too long
/// for it (long identities) would otherwise be parsed twice, once to find the head
/// changed and once to route it.
#[test]
fn no_route_is_remembered_for_a_head_the_memo_does_not_keep() {
    let mut r = fred_and_barney();
    let long = format!("{}@example.com", "f".repeat(msg::MAX_MEMO_HEAD));
    r.handle_message(
        ConnId(1),
        3,
        0,
        &message(&format!("<attach endpoint='{long}' transID='1' />")),
    );
    for (channel, originator, remembered) in [(1, "fred@example.com", true), (3, &*long, false)] {
        r.handle_message(
            ConnId(1),
            channel,
            5,
            &simple(originator, "barney@example.com"),
        );
        let actions: Vec<Action> = std::iter::from_fn(|| r.poll_action()).collect();
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::Send {
                    conn: ConnId(2),
                    ..
                }
            )),
            "{originator}"
        );
        let state = &r.channels[&(ConnId(1), channel)];
        assert_eq!(state.simple_route.is_some(), remembered, "{originator}");
    }
}

/// Home and link shards ignore the domain's case (as endpoint equality does), and spread
/// names evenly enough: over 1,000 endpoints on 4 shards, none gets under a sixth.
#[test]
fn home_and_link_shards_fold_case_and_spread() {
    let ep = |s: &str| Endpoint::parse(s).unwrap();
    for shards in [1, 2, 3, 8] {
        assert_eq!(
            home_shard(&ep("fred@Example.COM"), shards),
            home_shard(&ep("fred@example.com"), shards)
        );
        assert_eq!(
            domain_shard("Rubble.COM", shards),
            domain_shard("rubble.com", shards)
        );
    }
    let mut counts = [0usize; 4];
    for i in 0..1000 {
        counts[home_shard(&ep(&format!("e{i}@example.com")), 4)] += 1;
    }
    assert!(counts.iter().all(|&c| c > 1000 / 6), "{counts:?}");
    let mut counts = [0usize; 4];
    for i in 0..1000 {
        counts[domain_shard(&format!("d{i}.example"), 4)] += 1;
    }
    assert!(counts.iter().all(|&c| c > 1000 / 6), "{counts:?}");
}

#[test]
fn parsed_identities_are_remembered_within_a_bound() {
    let mut r = relay();
    let fred = r.parse_endpoint("fred@Example.com").unwrap();
    assert_eq!(fred, Endpoint::parse("fred@example.com").unwrap());
    assert_eq!(
        r.parse_endpoint("fred@Example.com").unwrap().as_str(),
        "fred@Example.com"
    );
    // Failures are answered every time and never remembered (APEX-01).
    assert!(r.parse_endpoint("fred").is_err());
    assert!(r.parse_endpoint("fred").is_err());
    assert_eq!(r.parsed.len(), 1);
    for i in 0..PARSED_CACHE_ENTRIES + 10 {
        r.parse_endpoint(&format!("e{i}@example.com")).unwrap();
        assert!(r.parsed.len() <= PARSED_CACHE_ENTRIES);
    }
}
