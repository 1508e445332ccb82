//! dataTiming end to end on loopback (RFC 3342 §2; OPT-09..OPT-13, issue 19 item 1): the
//! issue's scenario over real sockets, with 1 and 2 shards. fred sends barney data with
//! noLaterThan 300, reportAfter 100, returnTrip 10000 and reportErrors; barney answers only
//! after about a second. fred hears a transient report (350) no sooner than 100 ms after
//! sending, then a timing error (550) no sooner than 300 ms, and nothing for the late `ok`.
//! A healthy pair exchanging data meanwhile is unaffected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use apex_proto::apex::client::{self, DataBuilder};
use apex_proto::Event;
use bytes::Bytes;
use common::{Client, Relay};

fn attached(relay: &Relay, endpoint: &str) -> (Client, u32) {
    let mut client = Client::connect(relay.edge);
    client.greet();
    let (channel, reply) = client.attach(endpoint);
    assert_eq!(reply, "<ok />", "attach {endpoint}");
    (client, channel)
}

/// The code and transID of the one reply of a statusResponse.
fn reported(payload: &Bytes) -> (u16, u32) {
    let text = String::from_utf8_lossy(payload);
    let attribute = |name: &str| -> u32 {
        let at = text
            .find("<reply code='")
            .and_then(|r| text[r..].find(&format!("{name}='")).map(|i| r + i))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        let rest = &text[at + name.len() + 2..];
        rest[..rest.find('\'').unwrap()].parse().unwrap()
    };
    (attribute("code") as u16, attribute("transID"))
}

/// Waits (at most 5 s) for barney's delivery and leaves it unanswered: its (channel, msgno).
fn delivered_unanswered(barney: &mut Client) -> (u32, u32, Bytes) {
    barney.pump_until("the delivery to barney", |c| {
        c.events.iter().any(|e| matches!(e, Event::Message { .. }))
    });
    let index = barney
        .events
        .iter()
        .position(|e| matches!(e, Event::Message { .. }))
        .unwrap();
    match barney.events.remove(index) {
        Event::Message {
            channel,
            msgno,
            payload,
        } => (channel, msgno, payload),
        _ => unreachable!(),
    }
}

fn late_recipient_scenario(shards: usize) {
    let shard_count = shards.to_string();
    let relay = Relay::start_with(&["--shards", &shard_count, "--domain", "example.com"]);
    let (mut fred, fred_ch) = attached(&relay, "fred@example.com");
    let (mut barney, _) = attached(&relay, "barney@example.com");
    let (mut wilma, wilma_ch) = attached(&relay, "wilma@example.com");
    let (mut betty, _) = attached(&relay, "betty@example.com");

    let timed = DataBuilder::new("fred@example.com")
        .to("barney@example.com")
        .option("<option internal='dataTiming' targetHop='all' mustUnderstand='true' transID='7'><dataTiming noLaterThan='300' returnTrip='10000' reportAfter='100' reportErrors='true' /></option>")
        .markup("late?");
    let sent_at = Instant::now();
    let (accepted, _) = fred.request(fred_ch, timed);
    assert!(accepted, "{shards} shard(s)");
    let (barney_ch, msgno, payload) = delivered_unanswered(&mut barney);
    assert!(String::from_utf8_lossy(&payload).contains("late?"));

    // The healthy pair, while barney's delivery is pending.
    let plain = DataBuilder::new("wilma@example.com")
        .to("betty@example.com")
        .markup("hello betty");
    let (accepted, _) = wilma.request(wilma_ch, plain);
    assert!(accepted);
    let got = betty.receive();
    assert!(String::from_utf8_lossy(&got).contains("hello betty"));

    // fred's reports: a 350 then a 550, each no sooner than its bound.
    let mut reports: Vec<(Duration, Bytes)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reports.len() < 2 && Instant::now() < deadline {
        for report in fred.drain_messages() {
            reports.push((sent_at.elapsed(), report));
        }
        barney.pump();
        wilma.pump();
        betty.pump();
    }
    assert_eq!(reports.len(), 2, "{shards} shard(s): two reports");
    assert_eq!(
        reported(&reports[0].1),
        (350, 7),
        "OPT-13 transient report first"
    );
    assert!(
        reports[0].0 >= Duration::from_millis(100),
        "{:?}",
        reports[0].0
    );
    assert_eq!(reported(&reports[1].1), (550, 7), "OPT-11 timing error");
    assert!(
        reports[1].0 >= Duration::from_millis(300),
        "{:?}",
        reports[1].0
    );

    // barney answers after about a second: no 250, no final hop report.
    while sent_at.elapsed() < Duration::from_millis(1000) {
        barney.pump();
        fred.pump();
    }
    barney
        .session
        .send_rpy(barney_ch, msgno, client::ok_payload())
        .unwrap();
    let quiet_until = Instant::now() + Duration::from_millis(500);
    let mut later = Vec::new();
    while Instant::now() < quiet_until {
        barney.pump();
        later.extend(fred.drain_messages());
    }
    assert!(
        later.is_empty(),
        "a late ok reports nothing: {:?}",
        later
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    );

    // The healthy pair still goes on.
    let (accepted, _) = wilma.request(
        wilma_ch,
        DataBuilder::new("wilma@example.com")
            .to("betty@example.com")
            .markup("still here"),
    );
    assert!(accepted);
    assert!(String::from_utf8_lossy(&betty.receive()).contains("still here"));
}

#[test]
fn opt_09_11_13_late_recipient_over_sockets_one_shard() {
    late_recipient_scenario(1);
}

#[test]
fn opt_09_11_13_late_recipient_over_sockets_two_shards() {
    late_recipient_scenario(2);
}
