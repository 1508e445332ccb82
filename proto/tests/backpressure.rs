//! Isolation and bounded memory, in memory: the shard core's backlogs and backpressure driven
//! through real BEEP sessions by [`RelayNet`], on one shard and across two. Each case runs a
//! misbehaving endpoint beside a healthy pair and checks that the pair is served, that what
//! the relay holds stays within its bounds, and that nothing accepted disappears unreported
//! (RFC 3340 §5.1, APEX-38; RFC 3081 §3.1.3, BEEP-61/63/68).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use apex_proto::apex::access::{AccessTable, Action as Access, ActorPattern};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::relay::{home_shard, ConnKind};
use apex_proto::shard::Budgets;
use apex_proto::testing::{ClientId, RelayNet};
use apex_proto::ReplyKind;
use bytes::Bytes;

const HEADERS: &str = "Content-Type: application/beep+xml\r\n\r\n";

/// A net of `shards` where every endpoint of example.com may send data to every other.
fn granted(shards: usize, budgets: Budgets) -> RelayNet {
    let mut access = AccessTable::new();
    access
        .grant_domain(
            "example.com",
            ActorPattern::parse("*@example.com").unwrap(),
            vec![Access::CORE_DATA],
        )
        .unwrap();
    let mut net = RelayNet::with_budgets("example.com", shards, access, Vec::new(), budgets);
    // A recipient session takes 1,024 MSGs before its backlog starts: the cases below send a
    // few thousand.
    net.listener_config.limits.max_outstanding_msgs = 1024;
    net
}

/// Data from `from` to `to` with `size` octets of content, asking for a report when
/// `status` is given.
fn data(from: &str, to: &str, size: usize, status: Option<u32>) -> Bytes {
    let option = status
        .map(|t| format!("<option internal='statusRequest' transID='{t}' />"))
        .unwrap_or_default();
    Bytes::from(format!(
        "{HEADERS}<data content='#C'><originator identity='{from}' /><recipient identity='{to}' />{option}<data-content Name='C'>{}</data-content></data>",
        "x".repeat(size)
    ))
}

/// An endpoint attached on a fresh edge connection of `shard`.
fn endpoint(net: &mut RelayNet, shard: usize, name: &str) -> (ClientId, u32) {
    let id = net.connect(shard, ConnKind::Edge);
    let (channel, reply) = net.attach(id, name);
    assert_eq!(reply, "<ok />", "attach {name}");
    (id, channel)
}

/// Replies to `id`'s MSGs on `channel` so far, as (positive, payload).
fn replies(net: &RelayNet, id: ClientId, channel: u32) -> Vec<(bool, String)> {
    net.clients[id]
        .replies
        .iter()
        .filter(|r| r.0 == channel)
        .map(|r| {
            (
                r.2 == ReplyKind::Rpy,
                String::from_utf8_lossy(&r.3).into_owned(),
            )
        })
        .collect()
}

/// Reports (statusResponses) `id` received, by reply code.
fn report_codes(net: &RelayNet, id: ClientId) -> Vec<u16> {
    net.clients[id]
        .received
        .iter()
        .filter_map(|(_, _, p)| {
            let text = String::from_utf8_lossy(p);
            let at = text.find("<reply code='")? + "<reply code='".len();
            text[at..at + 3].parse().ok()
        })
        .collect()
}

/// The healthy pair: `sender` sends `count` messages to `receiver`, which all arrive.
#[track_caller]
fn healthy_pair_is_served(
    net: &mut RelayNet,
    sender: (ClientId, u32),
    receiver: ClientId,
    count: usize,
) {
    let before = net.clients[receiver].received.len();
    for i in 0..count {
        net.send_nowait(
            sender.0,
            sender.1,
            data("wilma@example.com", "betty@example.com", 100 + i % 7, None),
        );
    }
    net.drive();
    assert_eq!(
        net.clients[receiver].received.len() - before,
        count,
        "the healthy pair's messages all arrive"
    );
}

/// What a recipient's backlog may hold with one sender: its slack, one window of the sender
/// (256 KiB by default) and one message.
fn held_bound() -> usize {
    Budgets::default().backlog_slack + 256 * 1024 + 2048
}

/// Shard placements of the slow recipient and its sender: together, and apart.
fn placements() -> Vec<(usize, usize, usize)> {
    // (shards, sender's shard, recipient's shard)
    vec![(1, 0, 0), (2, 0, 1), (2, 1, 0)]
}

/// A recipient that stops reading holds back only the sender that writes to it: its window is
/// withheld once the recipient's session is full, the relay holds at most about one window of
/// that sender's data besides the session's own queue, and a healthy pair on the same shard
/// keeps going. Once the recipient disconnects, every message accepted for it is reported.
#[test]
fn a_recipient_that_does_not_read_holds_back_only_its_senders() {
    for (shards, sender_shard, slow_shard) in placements() {
        let mut net = granted(shards, Budgets::default());
        let (barney, _) = endpoint(&mut net, slow_shard, "barney@example.com");
        let fred = endpoint(&mut net, sender_shard, "fred@example.com");
        let wilma = endpoint(&mut net, sender_shard, "wilma@example.com");
        let (betty, _) = endpoint(&mut net, slow_shard, "betty@example.com");
        net.clients[barney].paused = true;

        // Fred pipelines 3,000 KiB-sized messages, each asking for a report.
        const SENT: usize = 3000;
        for i in 0..SENT {
            net.send_nowait(
                fred.0,
                fred.1,
                data(
                    "fred@example.com",
                    "barney@example.com",
                    1024,
                    Some(i as u32 + 1),
                ),
            );
        }
        net.drive();
        let accepted = replies(&net, fred.0, fred.1).iter().filter(|r| r.0).count();
        assert!(
            accepted < SENT,
            "{shards} shard(s): fred is held back ({accepted} of {SENT} accepted)"
        );
        // What the relay holds for barney beyond his session's queue is at most the backlog's
        // slack, one window of fred's (256 KiB) and one message.
        let held: usize = net.shards.iter().map(|s| s.backlog_octets()).sum();
        assert!(
            held <= held_bound(),
            "{shards} shard(s): {held} octets in backlogs"
        );
        assert!(held > 0, "barney's session filled and the rest waits");

        healthy_pair_is_served(&mut net, wilma, betty, 200);

        // Barney goes away: every accepted message is accounted for by a report (none was
        // delivered: he read nothing).
        net.disconnect(barney);
        // Every message is accounted for by a report: those accepted while barney was
        // attached (he read none), and the rest, accepted once fred's window came back and
        // barney was gone.
        let reports = report_codes(&net, fred.0);
        assert_eq!(
            reports.len(),
            SENT,
            "{shards} shard(s): one report per message"
        );
        assert!(reports.iter().all(|&c| c == 550), "{reports:?}");
        assert!(replies(&net, fred.0, fred.1).iter().all(|r| r.0));
        assert_eq!(
            net.shards.iter().map(|s| s.backlog_octets()).sum::<usize>(),
            0
        );
    }
}

/// A recipient that takes nothing for the stall limit refuses data: its sender's window is
/// given back and its next data is answered with 450 instead of silence. When the recipient
/// reads again, its backlog drains and data is accepted again.
#[test]
fn a_stalled_recipient_refuses_with_450_then_recovers() {
    for (shards, sender_shard, slow_shard) in placements() {
        let budgets = Budgets {
            stall: Duration::from_millis(500),
            ..Budgets::default()
        };
        let mut net = granted(shards, budgets);
        let (barney, _) = endpoint(&mut net, slow_shard, "barney@example.com");
        let fred = endpoint(&mut net, sender_shard, "fred@example.com");
        net.clients[barney].paused = true;
        for _ in 0..2000 {
            net.send_nowait(
                fred.0,
                fred.1,
                data("fred@example.com", "barney@example.com", 1024, None),
            );
        }
        net.drive();
        let before = replies(&net, fred.0, fred.1);
        assert!(before.iter().all(|r| r.0) && before.len() < 2000);

        net.advance(400);
        assert_eq!(replies(&net, fred.0, fred.1).len(), before.len(), "not yet");
        net.advance(200);
        let after = replies(&net, fred.0, fred.1);
        assert_eq!(
            after.len(),
            2000,
            "{shards} shard(s): every message answered"
        );
        let refused: Vec<&(bool, String)> = after.iter().filter(|r| !r.0).collect();
        assert!(!refused.is_empty());
        assert!(
            refused.iter().all(|r| r.1.contains("code='450'")
                && r.1.contains("the recipient is not taking its messages")),
            "{:?}",
            refused.first()
        );

        // Barney reads again: his backlog drains and he is a recipient like any other.
        net.clients[barney].paused = false;
        net.drive();
        let delivered = net.clients[barney].received.len();
        assert_eq!(delivered, after.iter().filter(|r| r.0).count());
        net.send_nowait(
            fred.0,
            fred.1,
            data("fred@example.com", "barney@example.com", 10, None),
        );
        net.drive();
        assert_eq!(net.clients[barney].received.len(), delivered + 1);
        assert_eq!(
            replies(&net, fred.0, fred.1).last().map(|r| r.0),
            Some(true)
        );
    }
}

/// An endpoint that sends data to itself and never answers the deliveries holds back only
/// itself: the relay stops granting it window, and the others keep their rate.
#[test]
fn an_endpoint_that_never_answers_its_own_data_holds_back_only_itself() {
    let mut net = granted(1, Budgets::default());
    let fred = endpoint(&mut net, 0, "fred@example.com");
    let wilma = endpoint(&mut net, 0, "wilma@example.com");
    let (betty, _) = endpoint(&mut net, 0, "betty@example.com");
    net.clients[fred.0].auto_reply = false;
    for _ in 0..5000 {
        net.send_nowait(
            fred.0,
            fred.1,
            data("fred@example.com", "fred@example.com", 1024, None),
        );
    }
    net.drive();
    let accepted = replies(&net, fred.0, fred.1).len();
    assert!(accepted < 5000, "{accepted}");
    assert!(net.shards[0].backlog_octets() <= held_bound());
    healthy_pair_is_served(&mut net, wilma, betty, 200);
}

/// A live recipient reading slower than its sender writes slows that sender to its pace; the
/// relay's backlog stays within one window of the sender, and everything arrives in order.
#[test]
fn a_slow_reader_paces_its_sender_and_receives_everything_in_order() {
    let mut net = granted(2, Budgets::default());
    let barney_shard = home_shard(&Endpoint::parse("barney@example.com").unwrap(), 2);
    let (barney, _) = endpoint(&mut net, barney_shard, "barney@example.com");
    let fred = endpoint(&mut net, 1 - barney_shard, "fred@example.com");
    const SENT: usize = 4000;
    for i in 0..SENT {
        net.send_nowait(
            fred.0,
            fred.1,
            data("fred@example.com", "barney@example.com", 512 + i % 13, None),
        );
    }
    let mut peak = 0;
    // Barney reads in short bursts.
    for _ in 0..10_000 {
        net.clients[barney].paused = true;
        net.drive();
        peak = peak.max(net.shards.iter().map(|s| s.backlog_octets()).sum::<usize>());
        net.clients[barney].paused = false;
        net.drive();
        if net.clients[barney].received.len() == SENT {
            break;
        }
    }
    assert_eq!(net.clients[barney].received.len(), SENT);
    assert!(peak <= held_bound(), "peak backlog {peak}");
    let sizes: Vec<usize> = net.clients[barney]
        .received
        .iter()
        .map(|(_, _, p)| p.len())
        .collect();
    let want: Vec<usize> = (0..SENT)
        .map(|i| data("fred@example.com", "barney@example.com", 512 + i % 13, None).len())
        .collect();
    assert_eq!(sizes, want, "in order");
}

/// Partial messages over a shard share its assembly budget: a session that leaves continued
/// MSGs unfinished gets pre-emptive 550s once the shard's budget is spent (BEEP-38), and the
/// other sessions still complete theirs.
#[test]
fn partial_messages_share_the_shard_s_assembly_budget() {
    let budgets = Budgets {
        max_assembly_octets: 64 * 1024,
        ..Budgets::default()
    };
    let mut net = granted(1, budgets);
    let (hog, _) = endpoint(&mut net, 0, "fred@example.com");
    // Continued frames of one MSG per channel, never finished: 4 channels of 20 KiB.
    let mut channels = Vec::new();
    for _ in 0..4 {
        let (channel, _) = net.start(hog, None);
        channels.push(channel);
    }
    let chunk = "y".repeat(20 * 1024);
    let mut octets = Vec::new();
    for channel in &channels {
        octets
            .extend(format!("MSG {channel} 0 * 0 {}\r\n{chunk}END\r\n", chunk.len()).into_bytes());
    }
    // Written as raw frames on the channels the client session started (each channel's first
    // octets from the client, so seqno 0).
    net.clients[hog].initiator = None;
    net.inject(hog, &octets);
    assert!(
        net.shards[0].assembling() <= 64 * 1024,
        "{}",
        net.shards[0].assembling()
    );
    let refused = net.clients[hog]
        .from_relay
        .windows(b"code='550'".len())
        .filter(|w| *w == b"code='550'")
        .count();
    assert_eq!(refused, 1, "the fourth partial message does not fit");

    let wilma = endpoint(&mut net, 0, "wilma@example.com");
    let (betty, _) = endpoint(&mut net, 0, "betty@example.com");
    healthy_pair_is_served(&mut net, wilma, betty, 50);
}

/// Past the shard's backlog budget a recipient refuses at once (no stall wait): its sender's
/// held-back window comes back whole, and the rest of its data is answered 450.
#[test]
fn over_the_backlog_budget_a_recipient_refuses_at_once() {
    for (shards, sender_shard, slow_shard) in placements() {
        let budgets = Budgets {
            max_backlog_octets: 50 * 1024,
            ..Budgets::default()
        };
        let mut net = granted(shards, budgets);
        let (barney, _) = endpoint(&mut net, slow_shard, "barney@example.com");
        let fred = endpoint(&mut net, sender_shard, "fred@example.com");
        net.clients[barney].paused = true;
        for _ in 0..3000 {
            net.send_nowait(
                fred.0,
                fred.1,
                data("fred@example.com", "barney@example.com", 1024, None),
            );
        }
        net.drive();
        let answers = replies(&net, fred.0, fred.1);
        assert_eq!(
            answers.len(),
            3000,
            "{shards} shard(s): all answered, no time passed"
        );
        assert!(answers.iter().any(|r| !r.0 && r.1.contains("code='450'")));
        let conn = net.clients[fred.0].conn;
        let withheld = net.shards[sender_shard]
            .session(conn)
            .unwrap()
            .withheld(fred.1);
        assert_eq!(
            withheld, 0,
            "{shards} shard(s): fred's window is whole again"
        );
        // The budget, plus what the batch of input that crossed it had already routed.
        let held: usize = net.shards.iter().map(|s| s.backlog_octets()).sum();
        assert!(held <= 50 * 1024 + 64 * 1024, "{shards} shard(s): {held}");
    }
}
