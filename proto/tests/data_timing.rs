//! dataTiming wired into the relay (RFC 3342 §2; OPT-07..OPT-13, issue 19 item 1), in memory:
//! [`RelayNet`] drives one or two shards through real BEEP sessions with a clock the test
//! advances. Local delivery: the transient report at `reportAfter`, the timing error at
//! `noLaterThan`, the final hop report on a timely `ok`, nothing for a late one. Forwarding:
//! the time queued on the link is subtracted as the data leaves, and data whose `noLaterThan`
//! ran out is not sent. hold4Endpoint: held data loses the time held, and expiring is a timing
//! error. Reports are compared byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::relay::ConnKind;
use apex_proto::testing::{ClientId, RelayNet};
use bytes::Bytes;

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

fn data(originator: &str, recipient: &str, options: &str, content: &str) -> Bytes {
    Bytes::from(format!(
        "{HEADERS}<data content='#Content'>\r\n   <originator identity='{originator}' />\r\n   <recipient identity='{recipient}' />\r\n{options}   <data-content Name='Content'>{content}</data-content>\r\n</data>\r\n"
    ))
}

/// A per-data dataTiming option as an originator sets it (OPT-07).
fn timing(trans_id: u32, attributes: &str) -> String {
    format!("   <option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='{trans_id}'><dataTiming {attributes} /></option>\r\n")
}

/// The report service's statusResponse to fred on `identity`, byte for byte (RFC 3340 §6.2).
fn report(trans_id: u32, identity: &str, code: u16) -> String {
    format!(
        "{HEADERS}<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='{trans_id}'>\r\n         <destination identity='{identity}'>\r\n            <reply code='{code}' transID='{trans_id}' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\n"
    )
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn reports(net: &RelayNet, id: ClientId) -> Vec<String> {
    received(net, id)
        .into_iter()
        .filter(|p| p.contains("<statusResponse"))
        .collect()
}

fn deliveries(net: &RelayNet, id: ClientId) -> Vec<(u32, u32, String)> {
    net.clients[id]
        .received
        .iter()
        .map(|(ch, msgno, p)| (*ch, *msgno, text(p)))
        .filter(|(_, _, p)| !p.contains("<statusResponse"))
        .collect()
}

fn received(net: &RelayNet, id: ClientId) -> Vec<String> {
    net.clients[id]
        .received
        .iter()
        .map(|(_, _, p)| text(p))
        .collect()
}

fn granted(shards: usize) -> RelayNet {
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

fn attached(net: &mut RelayNet, shard: usize, endpoint: &str) -> (ClientId, u32) {
    let id = net.connect(shard, ConnKind::Edge);
    let (channel, reply) = net.attach(id, endpoint);
    assert_eq!(reply, "<ok />", "attach {endpoint}");
    (id, channel)
}

fn ok() -> Bytes {
    Bytes::from(format!("{HEADERS}<ok />\r\n"))
}

/// Issue 19 item 1's scenario (OPT-09, OPT-11, OPT-12, OPT-13): noLaterThan 300,
/// reportAfter 100, returnTrip 10000, a recipient answering after 1 s. A transient report
/// (350) at 100 ms, a timing error (550) at 300 ms, nothing for the late `ok`: no 250, no
/// final hop report. fred and barney on the same shard and on different ones (the watch runs
/// where the data was accepted; the `ok` arrives where barney is).
#[test]
fn opt_09_11_12_13_late_recipient_gets_transient_then_timing_error_only() {
    for (shards, fred_shard) in [(1, 0), (2, 0), (2, 1)] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, fred_shard, "fred@example.com");
        let (barney, _) = attached(&mut net, 0, "barney@example.com");
        net.clients[barney].auto_reply = false;
        let options = timing(
            7,
            "noLaterThan='300' returnTrip='10000' reportAfter='100' reportErrors='true'",
        );
        let sent = data("fred@example.com", "barney@example.com", &options, "hi");
        let (accepted, _) = net.send(fred, ch, sent.clone());
        assert!(accepted);
        let delivered = deliveries(&net, barney);
        assert_eq!(delivered.len(), 1, "{shards} shard(s)");
        assert_eq!(delivered[0].2, text(&sent), "delivered as received");
        net.advance(99);
        assert!(reports(&net, fred).is_empty(), "nothing before reportAfter");
        net.advance(1);
        assert_eq!(
            reports(&net, fred),
            vec![report(7, "barney@example.com", 350)],
            "OPT-13: transient timing report at reportAfter ({shards} shard(s), fred on {fred_shard})"
        );
        net.advance(199);
        assert_eq!(
            reports(&net, fred).len(),
            1,
            "nothing more before noLaterThan"
        );
        net.advance(1);
        assert_eq!(
            reports(&net, fred),
            vec![
                report(7, "barney@example.com", 350),
                report(7, "barney@example.com", 550)
            ],
            "OPT-09, OPT-11: timing error report at noLaterThan"
        );
        net.advance(700);
        let (ch_b, msgno, _) = delivered[0].clone();
        net.reply(barney, ch_b, msgno, true, ok());
        net.advance(20_000);
        assert_eq!(
            reports(&net, fred).len(),
            2,
            "a late ok reports nothing: no 250, no final hop report: {:?}",
            reports(&net, fred)
        );
        assert_eq!(net.relay(fred_shard).watched_timings(), 0);
    }
}

/// OPT-09, OPT-11, OPT-12: `reportAfter` equal to `noLaterThan` keeps both timers: at that
/// instant the transient report, then the timing error, and the watch ends.
#[test]
fn opt_09_12_report_after_equal_to_no_later_than_sends_both_reports() {
    let mut net = granted(1);
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    net.clients[barney].auto_reply = false;
    let options = timing(8, "noLaterThan='300' reportAfter='300' reportErrors='true'");
    let sent = data("fred@example.com", "barney@example.com", &options, "hi");
    assert!(net.send(fred, ch, sent).0);
    net.advance(299);
    assert!(reports(&net, fred).is_empty());
    net.advance(1);
    assert_eq!(
        reports(&net, fred),
        vec![
            report(8, "barney@example.com", 350),
            report(8, "barney@example.com", 550)
        ]
    );
    assert_eq!(net.relay(0).watched_timings(), 0);
}

/// OPT-09, OPT-10, OPT-07: an `ok` within noLaterThan with returnTrip non-zero gets a final hop
/// report: a new dataTiming (targetHop='all', mustUnderstand='true', fresh transID) whose only
/// attribute is noLaterThan = the original returnTrip, and a statusResponse with the option's
/// transID and 250 for the recipient. No transient or error report follows.
#[test]
fn opt_07_09_10_timely_ok_gets_final_hop_report() {
    for (shards, fred_shard) in [(1, 0), (2, 1)] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, fred_shard, "fred@example.com");
        let (barney, _) = attached(&mut net, 0, "barney@example.com");
        net.clients[barney].auto_reply = false;
        let options = timing(
            9,
            "noLaterThan='300' returnTrip='10000' reportAfter='200' reportErrors='true'",
        );
        let (accepted, _) = net.send(
            fred,
            ch,
            data("fred@example.com", "barney@example.com", &options, "hi"),
        );
        assert!(accepted);
        net.advance(150);
        let (ch_b, msgno, _) = deliveries(&net, barney)[0].clone();
        net.reply(barney, ch_b, msgno, true, ok());
        let expected = format!(
            "{HEADERS}<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='1'>\r\n      <dataTiming noLaterThan='10000' />\r\n   </option>\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='9'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='9' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\n"
        );
        assert_eq!(reports(&net, fred), vec![expected], "{shards} shard(s)");
        net.advance(1000);
        assert_eq!(
            reports(&net, fred).len(),
            1,
            "no transient or error report after the ok"
        );
    }
}

/// OPT-08, OPT-12, OPT-13: forwarded data has the time it spent here, queued on the link
/// while the next relay was being reached, subtracted as it leaves: noLaterThan 500 after
/// 150 ms goes as 350, and reportAfter 100, exhausted, goes as 0 (left out, its default) with
/// a transient report (350) to the originator. Only the dataTiming element changes.
#[test]
fn opt_08_12_forwarding_subtracts_time_queued_on_the_link() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        net.hold_connects = true;
        let (fred, ch) = attached(&mut net, shards - 1, "fred@example.com");
        let sent = data(
            "fred@example.com",
            "barney@rubble.com",
            &timing(4, "noLaterThan='500' reportAfter='100' reportErrors='true'"),
            "hi",
        );
        let (accepted, _) = net.send(fred, ch, sent.clone());
        assert!(accepted);
        net.advance(150);
        assert!(net.forwards_to("rubble.com").is_empty(), "still connecting");
        net.release_connects();
        let out = net.forwards_to("rubble.com");
        assert_eq!(out.len(), 1, "{shards} shard(s)");
        assert_eq!(
            text(&out[0]),
            text(&sent).replace(
                "<dataTiming noLaterThan='500' reportAfter='100' reportErrors='true' />",
                "<dataTiming noLaterThan='350' reportErrors='true' />"
            ),
        );
        assert_eq!(
            reports(&net, fred),
            vec![report(4, "barney@rubble.com", 350)]
        );
        // Sent at once, nothing is subtracted and nothing reported.
        let again = data(
            "fred@example.com",
            "barney@rubble.com",
            &timing(5, "noLaterThan='500' reportAfter='100'"),
            "again",
        );
        let (accepted, _) = net.send(fred, ch, again.clone());
        assert!(accepted);
        assert_eq!(net.forwards_to("rubble.com")[1], again);
        assert_eq!(reports(&net, fred).len(), 1);
    }
}

/// OPT-08, OPT-11: data whose noLaterThan ran out while queued on the link is not sent, and a
/// timing error report (permanent failure, the option's transID) goes to the originator; a
/// statusRequest it carries is answered too (the data stops here). Without reportErrors it
/// is dropped with no timing report.
#[test]
fn opt_08_11_forward_past_no_later_than_is_not_sent_and_reported() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        net.hold_connects = true;
        let (fred, ch) = attached(&mut net, shards - 1, "fred@example.com");
        for (trans_id, flags) in [(6, " reportErrors='true'"), (8, "")] {
            let options = timing(trans_id, &format!("noLaterThan='200'{flags}"));
            let (accepted, _) = net.send(
                fred,
                ch,
                data("fred@example.com", "barney@rubble.com", &options, "late"),
            );
            assert!(accepted);
        }
        net.advance(200);
        net.release_connects();
        assert!(net.forwards_to("rubble.com").is_empty(), "OPT-08: not sent");
        assert_eq!(
            reports(&net, fred),
            vec![report(6, "barney@rubble.com", 550)],
            "{shards} shard(s)"
        );
    }
}

/// OPT-09, OPT-12, OPT-14: data held (hold4Endpoint) for 1200 ms is delivered with
/// noLaterThan 5000 reduced to 3800 and reportAfter 4000 to 2800; the rest as received.
#[test]
fn opt_14_held_data_loses_the_time_held() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, shards - 1, "fred@example.com");
        let options = format!(
            "{}   <option internal='hold4Endpoint' transID='3' />\r\n",
            timing(2, "noLaterThan='5000' reportAfter='4000'")
        );
        let sent = data("fred@example.com", "barney@example.com", &options, "held");
        let (accepted, _) = net.send(fred, ch, sent.clone());
        assert!(accepted);
        net.advance(1200);
        let (barney, _) = attached(&mut net, 0, "barney@example.com");
        let got = deliveries(&net, barney);
        assert_eq!(got.len(), 1, "{shards} shard(s)");
        assert_eq!(
            got[0].2,
            text(&sent).replace(
                "noLaterThan='5000' reportAfter='4000'",
                "noLaterThan='3800' reportAfter='2800'"
            )
        );
        assert!(reports(&net, fred).is_empty());
    }
}

/// OPT-09, OPT-11, OPT-14: held data whose noLaterThan runs out before the recipient attaches
/// is dropped with a timing error report (reportErrors), exactly one, and never delivered.
#[test]
fn opt_11_14_held_data_expiring_is_a_timing_error() {
    for shards in [1, 2] {
        let mut net = granted(shards);
        let (fred, ch) = attached(&mut net, shards - 1, "fred@example.com");
        let options = format!(
            "{}   <option internal='hold4Endpoint' transID='3' />\r\n",
            timing(12, "noLaterThan='1000' reportErrors='true'")
        );
        let (accepted, _) = net.send(
            fred,
            ch,
            data("fred@example.com", "barney@example.com", &options, "held"),
        );
        assert!(accepted);
        net.advance(999);
        assert!(reports(&net, fred).is_empty());
        net.advance(1);
        assert_eq!(
            reports(&net, fred),
            vec![report(12, "barney@example.com", 550)],
            "{shards} shard(s)"
        );
        let (barney, _) = attached(&mut net, 0, "barney@example.com");
        net.advance(5000);
        assert!(
            deliveries(&net, barney).is_empty(),
            "expired data is not delivered"
        );
        assert_eq!(reports(&net, fred).len(), 1);
    }
}

/// The watches are bounded per shard (`mesh.max_timing_watches`): past the bound a delivery
/// goes unwatched and is counted, rather than memory growing.
#[test]
fn opt_09_timing_watches_are_bounded_per_shard() {
    let mut net = granted(1);
    net.shards[0]
        .relay_mut()
        .set_report_watch(apex_proto::apex::relay::ReportWatchLimits {
            max_timing_watches: 2,
            ..Default::default()
        });
    let (fred, ch) = attached(&mut net, 0, "fred@example.com");
    let (barney, _) = attached(&mut net, 0, "barney@example.com");
    net.clients[barney].auto_reply = false;
    for trans_id in 1..=4 {
        let options = timing(trans_id, "noLaterThan='100' reportErrors='true'");
        let (accepted, _) = net.send(
            fred,
            ch,
            data("fred@example.com", "barney@example.com", &options, "hi"),
        );
        assert!(accepted);
    }
    assert_eq!(net.relay(0).watched_timings(), 2);
    assert_eq!(net.relay(0).stats().timing_watches_refused, 2);
    net.advance(100);
    assert_eq!(
        reports(&net, fred),
        vec![
            report(1, "barney@example.com", 550),
            report(2, "barney@example.com", 550)
        ]
    );
}
