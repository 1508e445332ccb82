//! Property tests for the BEEP engine (RFC 3080 §2.2.1, RFC 3081 §3; checklist items cited per
//! property).
//!
//! * Frames: any sequence of valid frames, encoded into one buffer and cut at every offset,
//!   parses back to exactly the same frames (BEEP-01/02/03, BEEP-62).
//! * Headers and SEQ frames round-trip through encode/parse in canonical decimal form; values
//!   out of range are rejected (BEEP-02).
//! * Sessions: arbitrary input never panics, always yields well-formed output and silence after
//!   a protocol error (BEEP-08); a valid client conversation cut at every offset gives the same
//!   events and data frames as delivering it in one piece per phase; flow control keeps to the
//!   peer's window (BEEP-61) and never shrinks our own (BEEP-69).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use apex_proto::beep::frame::{self, Frame, Head, Header, Inbound, Keyword, Seq};
use apex_proto::error::Field;
use apex_proto::testing::{Dispatcher, EchoProfile};
use apex_proto::{Event, FrameError, ProtocolError, Role, Session, SessionConfig};
use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const MAX31: u32 = 2_147_483_647;
const APEX: &str = "http://iana.org/beep/APEX";

const I_GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";
const START_1: &[u8] = b"MSG 0 1 . 52 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n";

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// 0..=2^31-1 with the edges over-represented.
fn num31() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(MAX31), 0u32..10, 0..=MAX31]
}

/// 0..=2^32-1 with the edges over-represented.
fn num32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(u32::MAX), 0u32..10, any::<u32>()]
}

fn keyword() -> impl Strategy<Value = Keyword> {
    prop::sample::select(vec![
        Keyword::Msg,
        Keyword::Rpy,
        Keyword::Err,
        Keyword::Ans,
        Keyword::Nul,
    ])
}

/// Payloads full of things a searching parser would trip over: trailers, CRLFs, header text.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    let tricky = prop::sample::select(b"END\r\n .*0123MSGSEQ".to_vec());
    let chunk = prop_oneof![
        vec(any::<u8>(), 0..16),
        vec(tricky, 0..16),
        Just(b"END\r\n".to_vec()),
        Just(b"\r\nEND\r\nMSG 0 0 . 0 0\r\nEND\r\n".to_vec()),
        Just(b"SEQ 0 0 4096\r\n".to_vec()),
    ];
    vec(chunk, 0..5).prop_map(|chunks| chunks.concat())
}

/// A valid data header (NUL has `.` and size 0; ansno iff ANS) for a payload of `size` octets.
fn header_for(size: u32) -> impl Strategy<Value = Header> {
    (keyword(), num31(), num31(), any::<bool>(), num32(), num32()).prop_map(
        move |(keyword, channel, msgno, more, seqno, ansno)| {
            let nul = keyword == Keyword::Nul;
            Header {
                keyword,
                channel,
                msgno,
                more: more && !nul,
                seqno,
                size: if nul { 0 } else { size },
                ansno: (keyword == Keyword::Ans).then_some(ansno),
            }
        },
    )
}

fn seq() -> impl Strategy<Value = Seq> {
    (num31(), num32(), num31()).prop_map(|(channel, ackno, window)| Seq {
        channel,
        ackno,
        window,
    })
}

fn inbound() -> impl Strategy<Value = Inbound> {
    let data = payload().prop_flat_map(|payload| {
        header_for(payload.len() as u32).prop_map(move |header| {
            let payload = if header.keyword == Keyword::Nul {
                Bytes::new()
            } else {
                Bytes::from(payload.clone())
            };
            Inbound::Data(Frame { header, payload })
        })
    });
    prop_oneof![4 => data, 1 => seq().prop_map(Inbound::Seq)]
}

fn encode(frames: &[Inbound]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in frames {
        match f {
            Inbound::Data(f) => f.encode(&mut out),
            Inbound::Seq(s) => s.encode(&mut out),
        }
    }
    out.to_vec()
}

/// Parses every complete frame at the front of `buf`.
fn parse_available(buf: &mut BytesMut, into: &mut Vec<Inbound>) -> Result<(), TestCaseError> {
    loop {
        match frame::parse(buf, 128) {
            Ok(Some(f)) => into.push(f),
            Ok(None) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("parse error {e:?}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (a) frames cut at every offset, (b) header and SEQ round trips
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// BEEP-01/02/03/62: valid frames (payloads containing `END\r\n`, ANS with ansno, SEQ
    /// frames) encoded back to back parse back exactly, wherever the input is cut in two.
    #[test]
    fn frames_parse_back_at_every_split(frames in vec(inbound(), 1..8)) {
        let wire = encode(&frames);
        for split in 0..=wire.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            buf.extend_from_slice(&wire[..split]);
            parse_available(&mut buf, &mut got)?;
            buf.extend_from_slice(&wire[split..]);
            parse_available(&mut buf, &mut got)?;
            prop_assert!(buf.is_empty(), "left over at split {}", split);
            prop_assert_eq!(&got, &frames, "split at {}", split);
        }
    }

    /// BEEP-01/02: a header encodes in canonical form (plain decimals, single spaces, ansno
    /// only on ANS) and parses back to itself, consuming exactly its line.
    #[test]
    fn header_round_trip(header in (0u32..100).prop_flat_map(header_for)) {
        let mut out = BytesMut::new();
        header.encode(&mut out);
        let mut text = format!(
            "{} {} {} {} {} {}",
            std::str::from_utf8(header.keyword.as_bytes()).unwrap(),
            header.channel,
            header.msgno,
            if header.more { '*' } else { '.' },
            header.seqno,
            header.size
        );
        if let Some(ansno) = header.ansno {
            text.push_str(&format!(" {ansno}"));
        }
        text.push_str("\r\n");
        prop_assert_eq!(&out[..], text.as_bytes());
        prop_assert!(out.len() <= 62);
        prop_assert_eq!(
            frame::parse_head(&out, 128),
            Ok(Some((Head::Data(header), out.len())))
        );
    }

    /// BEEP-62: SEQ frames round-trip in canonical form.
    #[test]
    fn seq_round_trip(s in seq()) {
        let mut out = BytesMut::new();
        s.encode(&mut out);
        let text = format!("SEQ {} {} {}\r\n", s.channel, s.ackno, s.window);
        prop_assert_eq!(&out[..], text.as_bytes());
        prop_assert!(out.len() <= 38);
        prop_assert_eq!(frame::parse_head(&out, 128), Ok(Some((Head::Seq(s), out.len()))));
    }

    /// BEEP-02: zero-padded fields are read by value (one or more digits is the grammar).
    #[test]
    fn zero_padding_reads_by_value(channel in num31(), pad in 0usize..20) {
        let line = format!("MSG {}{channel} 0 . 0 0\r\n", "0".repeat(pad));
        let parsed = frame::parse_head(line.as_bytes(), 128);
        prop_assert!(
            matches!(parsed, Ok(Some((Head::Data(h), _))) if h.channel == channel),
            "{:?}",
            parsed
        );
    }

    /// BEEP-02 (P2): a field one past its range, or anywhere beyond, is rejected and named.
    #[test]
    fn out_of_range_fields_are_rejected(
        which in 0usize..8,
        excess in prop_oneof![Just(0u64), 0u64..1000, 0u64..(1 << 40)],
    ) {
        let over31 = u64::from(MAX31) + 1 + excess;
        let over32 = u64::from(u32::MAX) + 1 + excess;
        let (line, field) = match which {
            0 => (format!("MSG {over31} 0 . 0 0\r\n"), Field::Channel),
            1 => (format!("RPY 0 {over31} . 0 0\r\n"), Field::Msgno),
            2 => (format!("ERR 0 0 . {over32} 0\r\n"), Field::Seqno),
            3 => (format!("MSG 0 0 * 0 {over31}\r\n"), Field::Size),
            4 => (format!("ANS 0 0 . 0 0 {over32}\r\n"), Field::Ansno),
            5 => (format!("SEQ {over31} 0 0\r\n"), Field::Channel),
            6 => (format!("SEQ 0 {over32} 0\r\n"), Field::Ackno),
            _ => (format!("SEQ 0 0 {over31}\r\n"), Field::Window),
        };
        prop_assert_eq!(
            frame::parse_head(line.as_bytes(), 128),
            Err(FrameError::BadField(field)),
            "{}",
            line
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (c) sessions
// ---------------------------------------------------------------------------------------------

/// Drains the session's output into `output`; returns the octets appended.
fn transmit(session: &mut Session, output: &mut BytesMut) -> usize {
    let before = output.len();
    while session.poll_transmit(output) > 0 {}
    output.len() - before
}

/// What a listener did with some input.
#[derive(Debug, PartialEq)]
struct Outcome {
    error: Option<ProtocolError>,
    messages: Vec<(u32, u32, Bytes)>,
    started: Vec<(u32, Option<Bytes>)>,
    events: Vec<Event>,
    data: Vec<Frame>,
    seqs: Vec<Seq>,
}

/// Delivers `chunks` one after the other to a fresh listener offering APEX (served by an
/// [`EchoProfile`]), dispatching events and draining output after each chunk as a runtime does.
/// Checks the invariants every run must satisfy whatever the input.
fn run_listener(chunks: &[&[u8]]) -> Result<Outcome, TestCaseError> {
    let mut session = Session::new(
        Role::Listener,
        SessionConfig {
            profiles: vec![APEX.into()],
            ..SessionConfig::default()
        },
    );
    let mut profile = EchoProfile::new(APEX);
    let mut events = Vec::new();
    let mut error = None;
    let mut output = BytesMut::new();
    let mut buf = BytesMut::new();
    transmit(&mut session, &mut output);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let result = session.handle_input(&mut buf, Instant::now());
        Dispatcher::new(vec![&mut profile]).dispatch(&mut session, |_, e| events.push(e));
        let wrote = transmit(&mut session, &mut output);
        match result {
            Err(e) => {
                prop_assert!(error.is_none(), "a dead session reported {:?}", e);
                prop_assert_eq!(wrote, 0, "BEEP-08: output after {:?}", e);
                prop_assert!(session.is_finished());
                error = Some(e);
            }
            Ok(()) if error.is_some() => prop_assert_eq!(wrote, 0, "output after death"),
            Ok(()) => {}
        }
    }
    // Everything the engine writes is well formed.
    let mut frames = Vec::new();
    parse_available(&mut output, &mut frames)?;
    prop_assert!(output.is_empty(), "partial frame in output");
    let mut data = Vec::new();
    let mut seqs = Vec::new();
    for f in frames {
        match f {
            Inbound::Data(f) => data.push(f),
            Inbound::Seq(s) => seqs.push(s),
        }
    }
    check_output_seqnos(&data)?;
    check_never_shrinks(&seqs)?;
    Ok(Outcome {
        error,
        messages: profile.messages,
        started: profile.started,
        events,
        data,
        seqs,
    })
}

/// BEEP-07: our data frames on each channel carry consecutive seqnos from 0.
fn check_output_seqnos(data: &[Frame]) -> Result<(), TestCaseError> {
    let mut next = std::collections::HashMap::new();
    for f in data {
        let expected = next.entry(f.header.channel).or_insert(0u32);
        prop_assert_eq!(
            f.header.seqno,
            *expected,
            "BEEP-07 on channel {}",
            f.header.channel
        );
        prop_assert_eq!(f.header.size as usize, f.payload.len());
        *expected = expected.wrapping_add(f.header.size);
    }
    Ok(())
}

/// BEEP-69: the right edge (ackno + window) we advertise per channel never moves left of the
/// initial 4096 or of an earlier SEQ.
fn check_never_shrinks(seqs: &[Seq]) -> Result<(), TestCaseError> {
    let mut edge = std::collections::HashMap::new();
    for s in seqs {
        let right = s.ackno.wrapping_add(s.window);
        let previous = edge.entry(s.channel).or_insert(4096u32);
        prop_assert!(
            right.wrapping_sub(*previous) <= MAX31,
            "BEEP-69: edge of channel {} moved from {} to {}",
            s.channel,
            previous,
            right
        );
        *previous = right;
    }
    Ok(())
}

fn data_frame(
    keyword: &str,
    channel: u32,
    msgno: u32,
    more: bool,
    seqno: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "{keyword} {channel} {msgno} {} {seqno} {}\r\n",
        if more { '*' } else { '.' },
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"END\r\n");
    out
}

/// The client's MSGs on channel 1: each payload cut into `frames` frames (some may be empty).
fn client_msgs(msgs: &[(Vec<u8>, usize)]) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut seqno = 0u32;
    for (msgno, (payload, frames)) in msgs.iter().enumerate() {
        let step = payload.len().div_ceil(*frames).max(1);
        let mut parts: Vec<&[u8]> = payload.chunks(step).collect();
        while parts.len() < *frames {
            parts.push(&[]);
        }
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            wire.extend(data_frame("MSG", 1, msgno as u32, !last, seqno, part));
            seqno += part.len() as u32;
        }
    }
    wire
}

fn msgs_strategy(max_len: usize, max_msgs: usize) -> impl Strategy<Value = Vec<(Vec<u8>, usize)>> {
    vec(
        (
            payload().prop_map(move |mut p| {
                p.truncate(max_len);
                p
            }),
            1usize..4,
        ),
        1..max_msgs,
    )
}

/// A small mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Mutation::Flip(at, x)),
        (any::<usize>(), 1usize..8).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), vec(any::<u8>(), 1..8)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut wire: Vec<u8>, m: &Mutation) -> Vec<u8> {
    if wire.is_empty() {
        return wire;
    }
    match m {
        Mutation::Flip(at, x) => {
            let at = at % wire.len();
            wire[at] ^= x;
        }
        Mutation::Delete(at, n) => {
            let at = at % wire.len();
            let end = (at + n).min(wire.len());
            wire.drain(at..end);
        }
        Mutation::Insert(at, bytes) => {
            let at = at % (wire.len() + 1);
            wire.splice(at..at, bytes.iter().copied());
        }
        Mutation::Truncate(at) => wire.truncate(at % wire.len()),
    }
    wire
}

/// Cuts `wire` at the given offsets (sorted, deduplicated, empty pieces dropped).
fn cut<'a>(wire: &'a [u8], offsets: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = offsets
        .iter()
        .copied()
        .filter(|&o| o < wire.len())
        .collect();
    points.push(0);
    points.push(wire.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &wire[w[0]..w[1]]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// BEEP-08: arbitrary bytes, in arbitrary chunks, after nothing, after the greeting or
    /// after a started channel, never make the session panic; output stays well formed and
    /// stops at the first protocol error.
    #[test]
    fn arbitrary_input_never_panics(
        prefix in 0usize..3,
        tail in prop_oneof![
            vec(any::<u8>(), 0..300),
            vec(prop::sample::select(b"MSGRPYERRANSNULSEQ 0123456789.*\r\nEND".to_vec()), 0..300),
            vec(inbound(), 0..6).prop_map(|f| encode(&f)),
        ],
        offsets in vec(any::<usize>(), 0..6),
    ) {
        let mut wire = match prefix {
            0 => Vec::new(),
            1 => I_GREETING.to_vec(),
            _ => [I_GREETING, START_1].concat(),
        };
        wire.extend_from_slice(&tail);
        let offsets: Vec<usize> = offsets.iter().map(|o| o % (wire.len() + 1)).collect();
        run_listener(&cut(&wire, &offsets))?;
    }

    /// BEEP-08: a valid conversation with one random mutation never panics either.
    #[test]
    fn mutated_conversation_never_panics(
        msgs in msgs_strategy(64, 5),
        m in mutation(),
        offsets in vec(any::<usize>(), 0..4),
    ) {
        let phase1 = [I_GREETING, START_1].concat();
        let phase2 = client_msgs(&msgs);
        let wire = mutate([phase1.clone(), phase2].concat(), &m);
        let mut offsets: Vec<usize> = offsets.iter().map(|o| o % (wire.len() + 1)).collect();
        offsets.push(phase1.len());
        run_listener(&cut(&wire, &offsets))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// BEEP-03/BEEP-07: a valid client conversation (greeting + start, then MSGs on channel 1
    /// over one or more frames) cut at any offset, or delivered byte by byte, gives the same
    /// events and the same data frames as delivering each phase in one piece. (A client sends
    /// MSGs on channel 1 only after the start was answered, so "whole" means one piece per
    /// phase. SEQ frames may differ in timing, so they are compared by invariant only.)
    #[test]
    fn split_at_every_offset_is_the_same_session(msgs in msgs_strategy(32, 5)) {
        let phase1 = [I_GREETING, START_1].concat();
        let phase2 = client_msgs(&msgs);
        let wire = [phase1.clone(), phase2].concat();
        let reference = run_listener(&cut(&wire, &[phase1.len()]))?;
        prop_assert_eq!(&reference.error, &None);
        prop_assert_eq!(reference.messages.len(), msgs.len());
        for (i, (payload, _)) in msgs.iter().enumerate() {
            prop_assert_eq!(&reference.messages[i], &(1, i as u32, Bytes::from(payload.clone())));
        }
        let compare = |got: &Outcome, how: &str| -> Result<(), TestCaseError> {
            prop_assert_eq!(&got.error, &reference.error, "{}", how);
            prop_assert_eq!(&got.messages, &reference.messages, "{}", how);
            prop_assert_eq!(&got.started, &reference.started, "{}", how);
            prop_assert_eq!(&got.events, &reference.events, "{}", how);
            prop_assert_eq!(&got.data, &reference.data, "{}", how);
            Ok(())
        };
        for split in 1..wire.len() {
            let got = run_listener(&cut(&wire, &[phase1.len(), split]))?;
            compare(&got, &format!("split at {split}"))?;
        }
        let bytes: Vec<usize> = (0..wire.len()).collect();
        compare(&run_listener(&cut(&wire, &bytes))?, "byte at a time")?;
    }

    /// BEEP-61/BEEP-06/BEEP-35: echo replies to MSGs of up to 3000 octets never exceed the
    /// window the client granted (4096 initially, then one SEQ of 4096 at a time), frames of one
    /// reply are consecutive, replies come in MSG order and reassemble to the MSGs.
    #[test]
    fn replies_respect_the_peers_window(
        sizes in vec(0usize..3000, 1..6),
        frames in vec(1usize..4, 6),
    ) {
        let msgs: Vec<(Vec<u8>, usize)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ((0..n).map(|k| (k * 7 + i) as u8).collect(), frames[i]))
            .collect();
        let mut session = Session::new(
            Role::Listener,
            SessionConfig { profiles: vec![APEX.into()], ..SessionConfig::default() },
        );
        let mut profile = EchoProfile::new(APEX);
        let mut out = BytesMut::new();
        let now = Instant::now();
        for (phase, input) in [[I_GREETING, START_1].concat(), client_msgs(&msgs)].iter().enumerate() {
            let mut buf = BytesMut::from(&input[..]);
            session.handle_input(&mut buf, now).map_err(|e| TestCaseError::fail(e.to_string()))?;
            Dispatcher::new(vec![&mut profile]).dispatch(&mut session, |_, _| {});
            if phase == 0 {
                // Greeting, start reply and the SEQ opening channel 1's window.
                transmit(&mut session, &mut BytesMut::new());
            }
        }
        prop_assert_eq!(profile.messages.len(), msgs.len());

        let mut edge = 4096u32; // BEEP-60: before any SEQ from the client
        let mut next = 0u32;
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut open: Option<u32> = None;
        for _round in 0..100 {
            out.clear();
            while session.poll_transmit(&mut out) > 0 {}
            let mut frames = Vec::new();
            parse_available(&mut out, &mut frames)?;
            for f in frames {
                let Inbound::Data(f) = f else { continue };
                if f.header.channel != 1 {
                    continue;
                }
                prop_assert_eq!(f.header.seqno, next);
                next = next.wrapping_add(f.header.size);
                prop_assert!(edge.wrapping_sub(next) <= MAX31, "BEEP-61: past the window");
                prop_assert_eq!(f.header.keyword, Keyword::Rpy);
                match open {
                    Some(msgno) => prop_assert_eq!(f.header.msgno, msgno, "BEEP-06"),
                    None => {
                        prop_assert_eq!(f.header.msgno as usize, replies.len(), "BEEP-35");
                        replies.push(Vec::new());
                    }
                }
                replies.last_mut().unwrap().extend_from_slice(&f.payload);
                open = f.header.more.then_some(f.header.msgno);
            }
            if replies.len() == msgs.len() && open.is_none() {
                break;
            }
            // The client consumed everything: a fresh 4096-octet window.
            edge = next.wrapping_add(4096);
            let mut buf = BytesMut::from(format!("SEQ 1 {next} 4096\r\n").as_bytes());
            session.handle_input(&mut buf, now).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let want: Vec<Vec<u8>> = msgs.iter().map(|(p, _)| p.clone()).collect();
        prop_assert_eq!(replies, want);
    }
}
