//! In-memory session pairs (no sockets): greeting, start, close, windows and SEQ under a 1 MB
//! transfer, byte-at-a-time delivery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apex_proto::beep::mgmt::ProfileOffer;
use apex_proto::testing::Pair;
use apex_proto::{Event, ReplyKind};
use bytes::Bytes;

const APEX: &str = "http://iana.org/beep/APEX";

fn started_pair(chunk: usize) -> (Pair, u32) {
    let mut pair = Pair::new(APEX);
    pair.chunk = chunk;
    started(pair)
}

/// Offers `payload` to the client's `try_send_msg` on `channel`, which must refuse it as one
/// too many (a limit of outstanding MSGs or of queued octets), and returns what it handed back.
fn refused_as_too_many(pair: &mut Pair, channel: u32, payload: Bytes) -> Bytes {
    let (misuse, back) = pair
        .client
        .session
        .try_send_msg(channel, payload)
        .unwrap_err();
    assert_eq!(misuse, apex_proto::Misuse::TooManyOutstanding(channel));
    back
}

/// Greets and starts the APEX channel on `pair`.
fn started(mut pair: Pair) -> (Pair, u32) {
    pair.drive();
    assert!(pair
        .client
        .events
        .iter()
        .any(|e| matches!(e, Event::Greeting(g) if g.profiles == [APEX])));
    let channel = pair
        .client
        .session
        .start_channel(vec![ProfileOffer::new(APEX)], None)
        .unwrap();
    assert_eq!(channel, 1, "BEEP-20: the initiator's first channel is odd");
    pair.drive();
    assert_eq!(pair.client.profile.started, vec![(1, None)]);
    assert_eq!(pair.client.session.channel_profile(1), Some(APEX));
    assert_eq!(pair.server.session.channel_profile(1), Some(APEX));
    (pair, channel)
}

#[test]
fn greeting_start_close_release() {
    let (mut pair, channel) = started_pair(usize::MAX);
    pair.client.session.close_channel(channel, 200).unwrap();
    pair.drive();
    assert_eq!(pair.client.profile.closed, vec![1]);
    assert_eq!(pair.server.profile.closed, vec![1]);
    assert_eq!(pair.server.session.channel_profile(1), None);
    pair.client.session.close_session(200).unwrap();
    pair.drive();
    assert!(pair.client.events.contains(&Event::SessionReleased));
    assert!(pair.server.events.contains(&Event::SessionReleased));
    assert!(pair.client.session.is_finished() && pair.server.session.is_finished());
    assert!(pair.client.error.is_none() && pair.server.error.is_none());
}

#[test]
fn byte_at_a_time_is_the_same_session() {
    let (mut pair, channel) = started_pair(1);
    pair.client
        .session
        .send_msg(channel, Bytes::from_static(b"\r\nhello"))
        .unwrap();
    pair.drive();
    assert_eq!(
        pair.client.profile.replies,
        vec![(1, 0, ReplyKind::Rpy, Bytes::from_static(b"\r\nhello"))]
    );
}

#[test]
fn one_megabyte_of_messages_never_stalls() {
    // BEEP-60/61/63/66: windows start at 4096 and are reopened by SEQ as data is consumed.
    let (mut pair, channel) = started_pair(usize::MAX);
    let payload = Bytes::from(vec![b'x'; 8192]);
    let count = (1 << 20) / payload.len();
    for _ in 0..count {
        pair.client
            .session
            .send_msg(channel, payload.clone())
            .unwrap();
    }
    pair.drive();
    assert!(pair.client.error.is_none() && pair.server.error.is_none());
    assert_eq!(pair.server.profile.messages.len(), count);
    assert_eq!(pair.client.profile.replies.len(), count);
    for (i, (_, msgno, kind, body)) in pair.client.profile.replies.iter().enumerate() {
        assert_eq!(
            (*msgno as usize, *kind, body.len()),
            (i, ReplyKind::Rpy, 8192)
        );
    }
}

#[test]
fn large_message_is_segmented_and_reassembled() {
    let (mut pair, channel) = started_pair(usize::MAX);
    let payload = Bytes::from((0..1_000_000u32).map(|i| i as u8).collect::<Vec<_>>());
    pair.client
        .session
        .send_msg(channel, payload.clone())
        .unwrap();
    pair.drive();
    assert_eq!(pair.server.profile.messages[0].2, payload);
    assert_eq!(pair.client.profile.replies[0].3, payload);
}

#[test]
fn vectored_output_puts_the_same_octets_on_the_wire() {
    // BEEP-61/65: large payloads written from their own memory (as apexd's runtime does) must
    // leave the wire exactly as a single copied buffer would: segmentation, SEQ and replies.
    let payload = Bytes::from((0..300_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    let run = |vectored: Option<usize>| {
        let (mut pair, channel) = started_pair(usize::MAX);
        pair.vectored = vectored;
        for size in [10, 5000, 300_000, 1024, 1023] {
            pair.client
                .session
                .send_msg(channel, payload.slice(..size))
                .unwrap();
        }
        pair.drive();
        assert!(pair.client.error.is_none() && pair.server.error.is_none());
        (
            pair.client.bytes_sent,
            pair.server.bytes_sent,
            pair.server.profile.messages.clone(),
            pair.client.profile.replies.clone(),
        )
    };
    let copied = run(None);
    assert_eq!(copied.2.len(), 5);
    assert_eq!(copied.2[2].2, payload);
    for shared_min in [1, 1024, 4096] {
        assert_eq!(run(Some(shared_min)), copied, "shared_min {shared_min}");
    }
}

#[test]
fn try_send_msg_hands_back_what_it_cannot_queue() {
    let (mut pair, channel) = started_pair(usize::MAX);
    let limit = pair.client.session.limits().max_outstanding_msgs;
    for n in 0..limit {
        let msgno = pair
            .client
            .session
            .try_send_msg(channel, Bytes::from_static(b"\r\nqueued"))
            .map_err(|(misuse, _)| misuse)
            .unwrap();
        assert_eq!(msgno as usize, n, "BEEP-04: msgnos count up from 0");
    }
    // One over the limit: refused, and the very payload comes back (not a copy).
    let payload = Bytes::from(b"\r\nheld back".to_vec());
    let back = refused_as_too_many(&mut pair, channel, payload.clone());
    assert_eq!(back.as_ptr(), payload.as_ptr());
    assert_eq!(back, payload);
    // A channel that does not exist hands it back too.
    let (misuse, back) = pair.client.session.try_send_msg(7, back).unwrap_err();
    assert_eq!(misuse, apex_proto::Misuse::NoSuchChannel(7));
    assert_eq!(back, payload);
    // Once the replies come in there is room again, and the held payload goes out.
    pair.drive();
    assert_eq!(pair.client.profile.replies.len(), limit);
    assert!(pair.client.session.try_send_msg(channel, back).is_ok());
    pair.drive();
    assert_eq!(
        pair.client.profile.replies.last().map(|r| r.3.clone()),
        Some(payload)
    );
}

/// `max_queued_octets` bounds what queued MSGs weigh, whatever their number: the MSG that
/// crosses it is still taken, the next is handed back, and writing the queue frees room.
#[test]
fn queued_octets_bound_what_a_channel_holds() {
    use apex_proto::{Limits, SessionConfig};
    let client = SessionConfig {
        limits: Limits {
            max_queued_octets: 1000,
            ..Limits::default()
        },
        ..SessionConfig::default()
    };
    let server = SessionConfig {
        profiles: vec![APEX.to_owned()],
        ..SessionConfig::default()
    };
    let (mut pair, channel) = started(Pair::with_configs(APEX, client, server));
    let payload = Bytes::from(vec![b'x'; 400]);
    let take_three = |pair: &mut Pair| {
        for _ in 0..3 {
            assert!(pair
                .client
                .session
                .try_send_msg(channel, payload.clone())
                .is_ok());
        }
    };
    // 0, 400 and 800 queued octets are below the bound: taken (the third crosses it).
    take_three(&mut pair);
    let back = refused_as_too_many(&mut pair, channel, payload.clone());
    assert_eq!(back, payload);
    // Written (and answered), the queue has room again.
    pair.drive();
    assert_eq!(pair.client.profile.replies.len(), 3);
    take_three(&mut pair);
}
