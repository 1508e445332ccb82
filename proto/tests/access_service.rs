//! The access service `apex=access` (RFC 3341, ACC-01..20) and durable holds (RFC 3342 §3), in
//! the in-memory relay: [`RelayNet`] applies the shards' store requests to the same
//! [`StoreState`](apex_proto::store::StoreState) the runtime's store keeps, hands every shard
//! its access table after each change, and can restart the relay from it.
//!
//! Byte-exact where the digest gives bytes (its §6 exchange); elsewhere each answer's element
//! is compared as text. Timestamps are the simulated store's clock
//! ([`STORE_EPOCH_UNIX_MS`]: 2024-03-01T10:00:00Z plus the net's milliseconds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::access::{AccessTable, Action, ActorPattern};
use apex_proto::apex::access_ops::{parse_answer, AccessAnswer};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::client::{self, Content};
use apex_proto::apex::msg::{self, ApexLimits, Operation};
use apex_proto::apex::relay::{home_shard, ConnKind};
use apex_proto::testing::{split_frames, ClientId, RelayNet};
use bytes::Bytes;

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

/// The application's greeting (52).
const I_GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

/// Channel 1 with a piggybacked attach of fred (199).
const START_ATTACH_FRED: &[u8] = b"MSG 0 1 . 52 199\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>\r\n      <![CDATA[<attach endpoint='fred@example.com' transID='1' />]]>\r\n   </profile>\r\n</start>\r\nEND\r\n";

/// apex-access.md §6: fred asks whether barney may send him data and subscribe (365).
const QUERY_365: &[u8] = b"MSG 1 0 . 0 365\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='apex=access@example.com' />\r\n   <data-content Name='Content'>\r\n      <query owner='fred@example.com' actor='barney@example.com'\r\n             actions='core:data presence:subscribe' transID='7001' />\r\n   </data-content>\r\n</data>\r\nEND\r\n";

/// apex-access.md §6: the relay accepts it (46).
const RPY_OK_46: &[u8] =
    b"RPY 1 0 . 0 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

/// apex-access.md §6: the service's answer, as data on the same channel (246).
const DENY_246: &[u8] = b"MSG 1 0 . 46 246\r\nContent-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=access@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'><deny transID='7001' /></data-content>\r\n</data>\r\nEND\r\n";

/// apex-access.md §6: fred accepts the answer.
const FRED_RPY_OK: &[u8] =
    b"RPY 1 0 . 365 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A data payload from `originator` to `recipients` with `content` as inline markup;
/// `options`: whole lines.
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

const HOLD: &str = "   <option internal='hold4Endpoint' transID='70' />\r\n";

/// A request to the access service of example.com from `from`.
fn request(from: &str, element: &str) -> Bytes {
    data(from, &["apex=access@example.com"], "", element)
}

/// The markup inside a data's `data-content`.
fn content_markup(payload: &Bytes) -> Option<(String, String)> {
    let Ok(Operation::Data(data)) = msg::parse_message(payload, &ApexLimits::default()) else {
        return None;
    };
    let Content::Inline(raw) = client::content(&data) else {
        return None;
    };
    let raw = text(raw);
    let start = raw.find('>')? + 1;
    let end = raw.rfind("</")?;
    Some((
        data.originator.identity.to_string(),
        raw[start..end].to_owned(),
    ))
}

/// What the access service sent client `id` on `channel`, in order.
fn answers(net: &RelayNet, id: ClientId, channel: u32) -> Vec<AccessAnswer> {
    net.clients[id]
        .received_on(channel)
        .iter()
        .filter_map(content_markup)
        .filter(|(from, _)| from == "apex=access@example.com")
        .map(|(_, markup)| parse_answer(markup.as_bytes()).unwrap())
        .collect()
}

/// Data (not from a service) delivered to client `id` on `channel`.
fn deliveries(net: &RelayNet, id: ClientId, channel: u32) -> Vec<String> {
    net.clients[id]
        .received_on(channel)
        .iter()
        .filter_map(content_markup)
        .filter(|(from, _)| !from.starts_with("apex="))
        .map(|(_, markup)| markup)
        .collect()
}

/// Reports (statusResponses) client `id` got on `channel`, as (transID, code) pairs.
fn report_codes(net: &RelayNet, id: ClientId, channel: u32) -> Vec<(u32, u16)> {
    net.clients[id]
        .received_on(channel)
        .iter()
        .filter_map(|p| match msg::parse_message(p, &ApexLimits::default()) {
            Ok(Operation::Data(d)) => client::status_response(&d),
            _ => None,
        })
        .flat_map(|r| {
            r.destinations
                .into_iter()
                .map(move |d| (r.trans_id, d.code))
        })
        .collect()
}

fn attached(net: &mut RelayNet, shard: usize, endpoint: &str) -> (ClientId, u32) {
    let id = net.connect(shard, ConnKind::Edge);
    let (channel, reply) = net.attach(id, endpoint);
    assert_eq!(reply, "<ok />", "{endpoint} attaches");
    (id, channel)
}

/// An endpoint of example.com named `stem...` whose home shard is `home`.
fn homed(stem: &str, shards: usize, home: usize) -> String {
    (0..)
        .map(|i| format!("{stem}{i}@example.com"))
        .find(|e| home_shard(&Endpoint::parse(e).unwrap(), shards) == home)
        .unwrap()
}

fn reply_code(answer: &AccessAnswer) -> Option<u16> {
    match answer {
        AccessAnswer::Reply { code, .. } => Some(*code),
        _ => None,
    }
}

/// apex-access.md §6 (ACC-01, ACC-08, ACC-11, ACC-15), byte for byte: fred queries barney's
/// rights on fred; the default `*@*` entry (`all:none`) selects, so the answer is `deny`,
/// carried as data from `apex=access@example.com` on fred's channel.
#[test]
fn acc_digest_6_query_answered_deny_byte_exact() {
    for shards in [1, 2] {
        for shard in 0..shards {
            let mut net = RelayNet::new("example.com", shards);
            let fred = net.connect_raw(shard, ConnKind::Edge);
            net.inject(fred, I_GREETING);
            net.inject(fred, START_ATTACH_FRED);
            net.inject(fred, QUERY_365);
            let frames: Vec<String> = net.clients[fred]
                .relay_data_frames()
                .iter()
                .map(|f| text(f))
                .collect();
            assert!(
                frames.contains(&text(RPY_OK_46)),
                "accepted ({shards} shards): {frames:?}"
            );
            assert!(
                frames.contains(&text(DENY_246)),
                "answered deny ({shards} shards, fred on {shard}): {frames:?}"
            );
            // Fred's `ok` to the answer is the digest's too.
            net.inject(fred, FRED_RPY_OK);
            let sent = split_frames(&net.clients[fred].to_relay);
            assert!(sent.iter().any(|f| f[..] == *FRED_RPY_OK));
        }
    }
}

/// ACC-12, ACC-13, ACC-14, ACC-15: create, get, replace with the lastUpdate get gave, stale
/// replace (555), delete, get after delete (551); every change answered 250 to the
/// originator and notified to the owner as a `set` with the request's transID.
#[test]
fn acc_12_13_14_get_set_replace_delete() {
    let mut net = RelayNet::new("example.com", 1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let create = "<set transID='31'><access owner='fred@example.com' actor='*@example.com' actions='core:data' /></set>";
    assert!(net.send(fred, ch, request("fred@example.com", create)).0);
    let got = answers(&net, fred, ch);
    // 250 to the originator, then the notification to the owner (here the same endpoint).
    assert_eq!(
        got.iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .len(),
        2,
        "{got:?}"
    );
    assert_eq!(
        apex_proto::apex::access_ops::format_answer(&got[0]),
        "<reply code='250' transID='31' />"
    );
    assert_eq!(
        apex_proto::apex::access_ops::format_answer(&got[1]),
        "<set transID='31'><access owner='fred@example.com' actor='*@example.com' actions='core:data' lastUpdate='2024-03-01T10:00:00.000-00:00' /></set>"
    );

    net.advance(5);
    let get = "<get owner='fred@example.com' actor='*@example.com' transID='32' />";
    assert!(net.send(fred, ch, request("fred@example.com", get)).0);
    let got = answers(&net, fred, ch);
    assert_eq!(
        apex_proto::apex::access_ops::format_answer(&got[2]),
        "<set transID='32'><access owner='fred@example.com' actor='*@example.com' actions='core:data' lastUpdate='2024-03-01T10:00:00.000-00:00' /></set>"
    );

    // Replace with the lastUpdate as another offset spells it (ACC-13: the same instant).
    let replace = "<set transID='33'><access owner='fred@example.com' actor='*@example.com' actions='core:data presence:watch' lastUpdate='2024-03-01T11:00:00+01:00' /></set>";
    assert!(net.send(fred, ch, request("fred@example.com", replace)).0);
    let got = answers(&net, fred, ch);
    assert_eq!(reply_code(&got[3]), Some(250), "{got:?}");
    assert_eq!(
        apex_proto::apex::access_ops::format_answer(&got[4]),
        "<set transID='33'><access owner='fred@example.com' actor='*@example.com' actions='core:data presence:watch' lastUpdate='2024-03-01T10:00:00.005-00:00' /></set>"
    );

    // The old lastUpdate is stale now; a create of an existing entry is unexpected.
    let stale = "<set transID='34'><access owner='fred@example.com' actor='*@example.com' actions='all:all' lastUpdate='2024-03-01T10:00:00Z' /></set>";
    assert!(net.send(fred, ch, request("fred@example.com", stale)).0);
    let recreate = "<set transID='35'><access owner='fred@example.com' actor='*@example.com' actions='all:all' /></set>";
    assert!(net.send(fred, ch, request("fred@example.com", recreate)).0);
    let got = answers(&net, fred, ch);
    assert_eq!(reply_code(&got[5]), Some(555), "{got:?}");
    assert_eq!(reply_code(&got[6]), Some(555), "{got:?}");

    // Delete: the notification has no actions.
    let delete = "<set transID='36'><access owner='fred@example.com' actor='*@example.com' lastUpdate='2024-03-01T10:00:00.005Z' /></set>";
    assert!(net.send(fred, ch, request("fred@example.com", delete)).0);
    let got = answers(&net, fred, ch);
    assert_eq!(reply_code(&got[7]), Some(250), "{got:?}");
    assert_eq!(
        apex_proto::apex::access_ops::format_answer(&got[8]),
        "<set transID='36'><access owner='fred@example.com' actor='*@example.com' /></set>"
    );
    let get = "<get owner='fred@example.com' actor='*@example.com' transID='37' />";
    assert!(net.send(fred, ch, request("fred@example.com", get)).0);
    let got = answers(&net, fred, ch);
    assert_eq!(reply_code(&got[9]), Some(551), "{got:?}");
    assert_eq!(net.store.access_entries(), 0);
}

/// ACC-11..13 steps 1-3 and syntax: 553 for another domain's owner, 550 for an invalid one,
/// 537 without the operation's token (barney holds nothing on fred), 501 for a bad actor or
/// lastUpdate, and an answer carries the request's transID even when it is refused.
#[test]
fn acc_11_12_13_refusals_carry_their_codes() {
    let mut net = RelayNet::new("example.com", 1);
    let (barney, ch) = attached(&mut net, 0, "barney@example.com");
    let cases = [
        ("<query owner='fred@rubble.com' actor='barney@example.com' actions='core:data' transID='1' />", 553),
        ("<get owner='fred/@example.com' actor='*@*' transID='2' />", 550),
        ("<query owner='fred@example.com' actor='barney@example.com' actions='core:data' transID='3' />", 537),
        ("<get owner='fred@example.com' actor='*@*' transID='4' />", 537),
        ("<set transID='5'><access owner='fred@example.com' actor='*@*' actions='core:data' /></set>", 537),
        ("<get owner='barney@example.com' actor='a\\b@example.com' transID='6' />", 501),
        ("<set transID='7'><access owner='barney@example.com' actor='*@*' actions='core:data' lastUpdate='yesterday' /></set>", 501),
        ("<query owner='barney@example.com' actor='barney@' actions='core:data' transID='8' />", 501),
        ("<get owner='barney@example.com' actor='*@*' transID='9' />", 551),
    ];
    for (element, _) in &cases {
        assert!(
            net.send(barney, ch, request("barney@example.com", element))
                .0
        );
    }
    let got = answers(&net, barney, ch);
    let codes: Vec<(u32, Option<u16>)> = got
        .iter()
        .map(|a| match a {
            AccessAnswer::Reply { trans_id, code, .. } => (*trans_id, Some(*code)),
            other => panic!("not a reply: {other:?}"),
        })
        .collect();
    let expected: Vec<(u32, Option<u16>)> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, code))| (i as u32 + 1, Some(*code)))
        .collect();
    assert_eq!(codes, expected);
    assert_eq!(net.store_requests, 0, "nothing refused reached the store");
}

/// ACC-19 across shards: barney (on one shard) cannot send to fred (on the other); fred sets
/// an entry; barney's very next data is delivered; fred deletes it; barney is refused again.
/// The change, made through the service on fred's shard, is in force on barney's at once.
#[test]
fn acc_19_a_set_on_one_shard_is_in_force_on_the_other_at_once() {
    let fred_ep = homed("fred", 2, 0);
    let barney_ep = homed("barney", 2, 1);
    let mut net = RelayNet::new("example.com", 2);
    let (fred, fch) = attached(&mut net, 0, &fred_ep);
    let (barney, bch) = attached(&mut net, 1, &barney_ep);

    assert!(
        net.send(
            barney,
            bch,
            data(&barney_ep, &[&fred_ep], &status_request(1), "one")
        )
        .0
    );
    assert!(deliveries(&net, fred, fch).is_empty());
    assert_eq!(report_codes(&net, barney, bch), vec![(1, 537)]);

    let set = format!("<set transID='40'><access owner='{fred_ep}' actor='{barney_ep}' actions='core:data' /></set>");
    assert!(net.send(fred, fch, request(&fred_ep, &set)).0);
    assert_eq!(reply_code(&answers(&net, fred, fch)[0]), Some(250));
    assert!(
        net.send(
            barney,
            bch,
            data(&barney_ep, &[&fred_ep], &status_request(2), "two")
        )
        .0
    );
    assert_eq!(deliveries(&net, fred, fch), vec!["two".to_owned()]);

    let last_update = match &answers(&net, fred, fch)[1] {
        AccessAnswer::Set { access, .. } => access.last_update.clone().unwrap(),
        other => panic!("{other:?}"),
    };
    let delete = format!("<set transID='41'><access owner='{fred_ep}' actor='{barney_ep}' lastUpdate='{last_update}' /></set>");
    assert!(net.send(fred, fch, request(&fred_ep, &delete)).0);
    assert!(
        net.send(
            barney,
            bch,
            data(&barney_ep, &[&fred_ep], &status_request(3), "three")
        )
        .0
    );
    assert_eq!(deliveries(&net, fred, fch), vec!["two".to_owned()]);
    assert_eq!(
        report_codes(&net, barney, bch),
        vec![(1, 537), (2, 250), (3, 537)]
    );
}

/// RFC 3341 §3 and the relay-wide `--grant`: an owner's explicit entry with the same actor
/// replaces the grant for that owner only, so an owner can shut out its whole domain (and even
/// itself) while every other owner keeps the grant.
#[test]
fn acc_08_an_owner_entry_replaces_the_relay_wide_grant_for_that_owner() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let (fred, fch) = attached(&mut net, 0, "fred@example.com");
    let (barney, bch) = attached(&mut net, 0, "barney@example.com");
    let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
    let shut = "<set transID='50'><access owner='fred@example.com' actor='*@example.com' actions='all:none' /></set>";
    assert!(net.send(fred, fch, request("fred@example.com", shut)).0);
    assert!(
        net.send(
            barney,
            bch,
            data(
                "barney@example.com",
                &["fred@example.com", "wilma@example.com"],
                "",
                "hi"
            )
        )
        .0
    );
    assert!(
        deliveries(&net, fred, fch).is_empty(),
        "fred shut his domain out"
    );
    assert_eq!(deliveries(&net, wilma, wch), vec!["hi".to_owned()]);
    // Fred restricts even himself: the default owner entry is replaced.
    let me = "<set transID='51'><access owner='fred@example.com' actor='fred@example.com' actions='core:data' /></set>";
    assert!(net.send(fred, fch, request("fred@example.com", me)).0);
    let query = "<query owner='fred@example.com' actor='fred@example.com' actions='core:data' transID='52' />";
    assert!(net.send(fred, fch, request("fred@example.com", query)).0);
    let got = answers(&net, fred, fch);
    assert_eq!(reply_code(got.last().unwrap()), Some(537), "{got:?}");
}

/// Durable holds: data with hold4Endpoint for an endpoint that is not attached is
/// acknowledged only once it is in the store; after a restart it is delivered when the
/// endpoint attaches, and its record goes once the endpoint's `ok` arrives.
#[test]
fn held_data_is_acknowledged_once_stored_and_survives_a_restart() {
    for shards in [1, 2] {
        let wilma_ep = homed("wilma", shards, shards - 1);
        let mut net = RelayNet::with("example.com", shards, grants(), Vec::new());
        let (fred, ch) = attached(&mut net, 0, "fred@example.com");
        net.pause_store = true;
        let msgno = net.send_nowait(
            fred,
            ch,
            data("fred@example.com", &[&wilma_ep], HOLD, "kept"),
        );
        assert!(
            net.clients[fred].reply_to(ch, msgno).is_none(),
            "no ok before the data is stored ({shards} shards)"
        );
        net.pause_store = false;
        net.drive();
        let reply = net.clients[fred].reply_to(ch, msgno).expect("answered");
        assert_eq!(
            text(&reply.1),
            "Content-Type: application/beep+xml\r\n\r\n<ok />\r\n"
        );
        assert_eq!(net.store.held_messages(), 1);

        let mut net = net.restart();
        let (wilma, wch) = attached(&mut net, 0, &wilma_ep);
        assert_eq!(deliveries(&net, wilma, wch), vec!["kept".to_owned()]);
        assert_eq!(net.store.held_messages(), 0, "released after wilma's ok");
        // Nothing is held twice: a second restart delivers nothing more.
        let mut net = net.restart();
        let (wilma, wch) = attached(&mut net, 0, &wilma_ep);
        assert!(deliveries(&net, wilma, wch).is_empty());
    }
}

/// A store that cannot keep held data (a full disk): data whose every recipient was to be
/// held is refused with 451 rather than acknowledged and lost; with another recipient it is
/// accepted and the held one reported.
#[test]
fn held_data_the_store_cannot_keep_is_refused_or_reported() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (_barney, _) = attached(&mut net, 0, "barney@example.com");
    net.store_failing = true;
    let (positive, reply) = net.send(
        fred,
        ch,
        data("fred@example.com", &["wilma@example.com"], HOLD, "x"),
    );
    assert!(!positive);
    assert!(text(&reply).contains("code='451'"), "{}", text(&reply));
    let options = format!("{HOLD}{}", status_request(9));
    let (positive, _) = net.send(
        fred,
        ch,
        data(
            "fred@example.com",
            &["wilma@example.com", "barney@example.com"],
            &options,
            "y",
        ),
    );
    assert!(positive);
    assert!(report_codes(&net, fred, ch).contains(&(9, 451)));
    assert_eq!(net.store.held_messages(), 0);
}

/// A set the store refuses to make durable is answered 451, and nothing changes.
#[test]
fn a_set_the_store_cannot_keep_is_answered_451() {
    let mut net = RelayNet::new("example.com", 1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    net.store_failing = true;
    let create = "<set transID='60'><access owner='fred@example.com' actor='*@*' actions='core:data' /></set>";
    assert!(net.send(fred, ch, request("fred@example.com", create)).0);
    let got = answers(&net, fred, ch);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(reply_code(&got[0]), Some(451));
}

fn grants() -> AccessTable {
    let mut grants = AccessTable::new();
    grants.grant_all_local(
        ActorPattern::parse("*@example.com").unwrap(),
        vec![Action::CORE_DATA],
    );
    grants
}

fn held_count(net: &RelayNet, shard: usize) -> String {
    let dbg = format!("{:?}", net.relay(shard));
    let at = dbg.find("held_messages: ").unwrap();
    dbg[at..].split(',').next().unwrap().to_owned()
}

/// The recipient attaches while its held data is being written to the store: once stored,
/// the data goes to its channel, not into the hold queue of an attached endpoint.
#[test]
fn held_data_reaches_a_recipient_that_attached_while_it_was_being_stored() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    net.pause_store = true;
    let msgno = net.send_nowait(
        fred,
        ch,
        data("fred@example.com", &["wilma@example.com"], HOLD, "kept"),
    );
    net.drive();
    // wilma attaches while the write is in flight.
    let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
    net.pause_store = false;
    net.drive();
    assert!(net.clients[fred].reply_to(ch, msgno).is_some());
    assert_eq!(
        deliveries(&net, wilma, wch),
        vec!["kept".to_owned()],
        "held for an attached endpoint: {}",
        held_count(&net, 0)
    );
}

/// ACC-02: entries compare domains case-insensitively; a delete spelled otherwise than the
/// create removes the entry's record too, so it does not come back after a restart.
#[test]
fn acc_02_an_entry_deleted_in_another_spelling_stays_deleted_after_a_restart() {
    use apex_proto::apex::access::parse_actions;
    use apex_proto::apex::timestamp::Timestamp;
    use apex_proto::store::*;
    use std::collections::BTreeMap;
    let mut disk: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut state = StoreState::new(AccessTable::new(), AccessLimits::default());
    let fred = Endpoint::parse("fred@example.com").unwrap();
    let op = |actor: &str, actions: Option<&str>, expect: Option<&str>| {
        StoreOp::SetAccess(AccessChange {
            owner: fred.clone(),
            actor: ActorPattern::parse(actor).unwrap(),
            actions: actions.map(|a| parse_actions(a).unwrap()),
            expect: expect.map(|t| Timestamp::parse(t).unwrap()),
        })
    };
    let mut persist = |m: Option<Mutation>| {
        let m = m.unwrap();
        match m.value() {
            Some(v) => disk.insert(m.key(), v.to_vec()),
            None => disk.remove(&m.key()),
        };
    };
    let (outcome, m) = state.apply(
        op("*@EXAMPLE.COM", Some("core:data"), None),
        Timestamp::from_unix_millis(1000),
    );
    persist(m);
    let Outcome::Access(Ok(AccessWritten::Written(entry))) = outcome else {
        panic!()
    };
    let (outcome, m) = state.apply(
        op("*@example.com", None, entry.last_update.as_deref()),
        Timestamp::from_unix_millis(2000),
    );
    assert!(matches!(
        outcome,
        Outcome::Access(Ok(AccessWritten::Deleted { .. }))
    ));
    persist(m);
    assert_eq!(state.access_entries(), 0);
    // Restart: read the records back.
    let mut loaded = StoreState::new(AccessTable::new(), AccessLimits::default());
    for (k, v) in &disk {
        loaded.load_access(k, v).unwrap();
    }
    assert_eq!(
        loaded.access_entries(),
        0,
        "deleted entry resurrected: {disk:?}"
    );
}

/// A release the store fails to make (a transient disk error while the recipient's ok is
/// handled) is asked again with the next change: data delivered and acknowledged before a
/// restart is not delivered again after it.
#[test]
fn a_release_the_store_failed_is_asked_again_so_nothing_is_delivered_twice() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    assert!(
        net.send(
            fred,
            ch,
            data("fred@example.com", &["wilma@example.com"], HOLD, "kept")
        )
        .0
    );
    assert_eq!(net.store.held_messages(), 1);
    net.store_failing = true; // a transient disk error while wilma's ok is handled
    let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
    assert_eq!(deliveries(&net, wilma, wch), vec!["kept".to_owned()]);
    net.store_failing = false;
    // Later commits succeed; the release is never retried.
    assert!(
        net.send(
            fred,
            ch,
            data("fred@example.com", &["barney@example.com"], HOLD, "other")
        )
        .0
    );
    let mut net = net.restart();
    let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
    assert!(
        deliveries(&net, wilma, wch).is_empty(),
        "delivered and acknowledged before the restart, delivered again after it"
    );
}

/// Held data handed to a recipient whose channel goes away before it answers is held again
/// (and keeps its record): data the relay acknowledged with hold4Endpoint is not dropped.
#[test]
fn held_data_whose_delivery_is_not_answered_is_held_again() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    assert!(
        net.send(
            fred,
            ch,
            data("fred@example.com", &["wilma@example.com"], HOLD, "kept")
        )
        .0
    );
    let wilma = net.connect(0, ConnKind::Edge);
    net.clients[wilma].auto_reply = false;
    let (wch, reply) = net.attach(wilma, "wilma@example.com");
    assert_eq!(reply, "<ok />");
    assert_eq!(deliveries(&net, wilma, wch), vec!["kept".to_owned()]);
    net.disconnect(wilma); // gone before its ok
    assert_eq!(
        net.store.held_messages(),
        1,
        "released though never acknowledged"
    );
    // ...and it reaches wilma when she is back.
    let (wilma, wch) = attached(&mut net, 0, "wilma@example.com");
    assert_eq!(deliveries(&net, wilma, wch), vec!["kept".to_owned()]);
    assert_eq!(net.store.held_messages(), 0);
}

/// The owner notice of a change to an entry owned by the access service itself is data to
/// the service: it is not taken as a request (it would rewrite the entry and notify again,
/// forever).
#[test]
fn a_change_to_an_entry_the_service_owns_settles() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut grants = grants();
        grants.grant_all_local(
            ActorPattern::parse("admin@example.com").unwrap(),
            vec![Action::parse("access:all").unwrap()],
        );
        let mut net = RelayNet::with("example.com", 1, grants, Vec::new());
        let (admin, ch) = attached(&mut net, 0, "admin@example.com");
        let set = "<set transID='9'><access owner='apex=access@example.com' actor='*@example.com' actions='access:query' /></set>";
        net.send(
            admin,
            ch,
            data("admin@example.com", &["apex=access@example.com"], "", set),
        );
        let _ = tx.send(net.store_requests);
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(requests) => assert!(requests < 10, "{requests} store requests for one set"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("one set to an entry owned by apex=access never settles")
        }
        Err(e) => panic!("scenario failed: {e}"),
    }
}

/// Data with hold4Endpoint none of whose recipients the hold queue has room for is refused
/// with 450 instead of acknowledged and dropped; with a recipient that takes it, it is
/// accepted and the one not held is reported (550).
#[test]
fn data_the_hold_queue_has_no_room_for_is_refused_not_dropped() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    net.shards[0]
        .relay_mut()
        .set_hold_limits(apex_proto::apex::options::HoldLimits {
            max_messages: 1,
            ..Default::default()
        });
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (_barney, _) = attached(&mut net, 0, "barney@example.com");
    let held = data("fred@example.com", &["wilma@example.com"], HOLD, "first");
    assert!(net.send(fred, ch, held).0, "room for one");
    let (positive, reply) = net.send(
        fred,
        ch,
        data("fred@example.com", &["wilma@example.com"], HOLD, "second"),
    );
    assert!(!positive);
    assert!(text(&reply).contains("code='450'"), "{}", text(&reply));
    let options = format!("{HOLD}{}", status_request(12));
    let both = data(
        "fred@example.com",
        &["wilma@example.com", "barney@example.com"],
        &options,
        "third",
    );
    assert!(net.send(fred, ch, both).0);
    assert!(
        report_codes(&net, fred, ch).contains(&(12, 550)),
        "{:?}",
        report_codes(&net, fred, ch)
    );
    assert_eq!(net.store.held_messages(), 1);
}

/// A store that does not keep up (paused here) holds at most `runtime.store_queue` requests
/// of a shard: past it, data to hold is refused with 450 and a set answered 451, and what
/// waited goes on once the store answers.
#[test]
fn store_requests_waiting_are_bounded() {
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    net.shards[0].relay_mut().set_store_queue(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    net.pause_store = true;
    let first = net.send_nowait(
        fred,
        ch,
        data("fred@example.com", &["wilma@example.com"], HOLD, "one"),
    );
    let second = net.send_nowait(
        fred,
        ch,
        data("fred@example.com", &["wilma@example.com"], HOLD, "two"),
    );
    let set = "<set transID='70'><access owner='fred@example.com' actor='*@*' actions='core:data' /></set>";
    net.send_nowait(fred, ch, request("fred@example.com", set));
    net.drive();
    // The set's answer is data, sent at once; the replies on the channel keep their order
    // (BEEP-35), so the 450 goes out after the first data's ok.
    assert_eq!(reply_code(&answers(&net, fred, ch)[0]), Some(451));
    assert!(net.clients[fred].reply_to(ch, first).is_none());
    net.pause_store = false;
    net.drive();
    let accepted = net.clients[fred]
        .reply_to(ch, first)
        .expect("answered once stored");
    assert!(text(&accepted.1).contains("<ok />"));
    let refused = net.clients[fred].reply_to(ch, second).expect("answered");
    assert!(
        text(&refused.1).contains("code='450'"),
        "{}",
        text(&refused.1)
    );
    assert_eq!(net.store.held_messages(), 1);
}

/// One originator flooding the hold queue (1,100 messages for an endpoint that never
/// attaches, more than the queue's 1,024) gets only its share of it (`hold.max_per_originator`,
/// 256): past it, its data is refused with 450 on one shard, reported 550 when it was accepted
/// on another shard first. Another originator still has data held and delivered once its
/// recipient attaches, and a pair of attached endpoints beside them exchange data throughout
/// (issue 19 item 8).
#[test]
fn issue_19_item_8_one_flooding_originator_gets_only_its_share_of_the_hold_queue() {
    use apex_proto::apex::options::DEFAULT_MAX_HELD_PER_ORIGINATOR as SHARE;
    for (shards, flooder_shard) in [(1, 0), (2, 0), (2, 1)] {
        let mut net = RelayNet::with("example.com", shards, grants(), Vec::new());
        let (mallory, mch) = attached(&mut net, flooder_shard, "mallory@example.com");
        let (fred, fch) = attached(&mut net, 0, "fred@example.com");
        let (wilma, wch) = attached(&mut net, shards - 1, "wilma@example.com");
        let (betty, bch) = attached(&mut net, 0, "betty@example.com");
        let absent = homed("absent", shards, shards - 1);
        let options = format!("{HOLD}{}", status_request(5));
        let (mut accepted, mut refused) = (0, 0);
        for i in 0..1100 {
            let flood = data("mallory@example.com", &[&absent], &options, &format!("{i}"));
            let (positive, reply) = net.send(mallory, mch, flood);
            if positive {
                accepted += 1;
            } else {
                assert!(
                    text(&reply)
                        .contains("<error code='450'>hold queue share of this originator is full"),
                    "{}",
                    text(&reply)
                );
                refused += 1;
            }
            if i % 100 == 0 {
                let healthy = data("wilma@example.com", &["betty@example.com"], "", "hi");
                assert!(net.send(wilma, wch, healthy).0, "the healthy pair goes on");
            }
        }
        let held: usize = (0..shards).map(|s| net.relay(s).held_count()).sum();
        assert_eq!(held, SHARE, "{shards} shard(s): the flooder's share only");
        let dropped = report_codes(&net, mallory, mch)
            .iter()
            .filter(|(t, code)| *t == 5 && *code == 550)
            .count();
        assert_eq!(accepted + refused, 1100);
        assert_eq!(
            accepted - dropped,
            SHARE,
            "every message held, refused or reported"
        );
        assert_eq!(deliveries(&net, betty, bch).len(), 11);
        // fred's data is still held, and delivered once barney attaches.
        let barney = homed("barney", shards, shards - 1);
        let mine = data("fred@example.com", &[&barney], HOLD, "for barney");
        assert!(
            net.send(fred, fch, mine).0,
            "{shards} shard(s): room for fred"
        );
        let (barney_id, barney_ch) = attached(&mut net, 0, &barney);
        assert_eq!(deliveries(&net, barney_id, barney_ch), vec!["for barney"]);
    }
}

/// The share is the originator's without its subaddress: an application attached as several
/// subaddresses of itself (RFC 3340 §2.2) fills one share between them, not one each, and
/// another originator still has room (issue 19 item 8).
#[test]
fn issue_19_item_8_subaddresses_of_one_originator_share_its_hold_queue_share() {
    use apex_proto::apex::options::DEFAULT_MAX_HELD_PER_ORIGINATOR as SHARE;
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let flooders: Vec<(String, _)> = (0..3)
        .map(|k| {
            let identity = format!("mallory/{k}@example.com");
            let attached = attached(&mut net, 0, &identity);
            (identity, attached)
        })
        .collect();
    let (fred, fch) = attached(&mut net, 0, "fred@example.com");
    let mut accepted = 0;
    for i in 0..SHARE {
        for (identity, (id, channel)) in &flooders {
            let flood = data(identity, &["absent@example.com"], HOLD, &format!("{i}"));
            if net.send(*id, *channel, flood).0 {
                accepted += 1;
            }
        }
    }
    assert_eq!(accepted, SHARE, "three subaddresses, one share");
    assert_eq!(net.relay(0).held_count(), SHARE);
    let mine = data(
        "fred@example.com",
        &["barney@example.com"],
        HOLD,
        "for barney",
    );
    assert!(net.send(fred, fch, mine).0, "room for another originator");
}

/// Held data without a `dataTiming` bound is no longer held for ever: after the default
/// `hold.max_hold_ms` (one hour) it is dropped and reported (issue 19 item 8, OPT-15).
#[test]
fn issue_19_item_8_held_data_expires_after_the_default_bound() {
    use apex_proto::apex::options::DEFAULT_MAX_HOLD_MS;
    let mut net = RelayNet::with("example.com", 1, grants(), Vec::new());
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let options = format!("{HOLD}{}", status_request(31));
    let held = data(
        "fred@example.com",
        &["wilma@example.com"],
        &options,
        "later",
    );
    assert!(net.send(fred, ch, held).0);
    net.advance(DEFAULT_MAX_HOLD_MS - 1);
    assert_eq!(net.relay(0).held_count(), 1);
    assert!(report_codes(&net, fred, ch).is_empty());
    net.advance(1);
    assert_eq!(net.relay(0).held_count(), 0);
    assert_eq!(report_codes(&net, fred, ch), vec![(31, 550)]);
    assert_eq!(net.store.held_messages(), 0, "its record goes too");
}
