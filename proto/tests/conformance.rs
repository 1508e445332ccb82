//! Byte-exact conformance vectors for the BEEP engine (RFC 3080, RFC 3081), one or more tests
//! per checklist item BEEP-01..BEEP-70 (docs/conformance.md maps each to its RFC section).
//!
//! Every session test drives a real [`Session`] with literal wire bytes and asserts the exact
//! bytes it transmits back, or the exact [`ProtocolError`] it terminates with. Literal frames go
//! through [`checked`], which verifies their size field independently of the engine, so a wrong
//! vector shows up as a vector bug and not as an engine failure.
//!
//! Covered elsewhere: TLS and SASL (BEEP-43..56) in `proto/tests/tuning.rs`, the
//! transport-level items BEEP-57..59 in the loopback tests and `src/sys.rs`, and BEEP-64,
//! BEEP-70 are runtime concerns (docs/conformance.md says where each stands).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use apex_proto::beep::frame::{
    self, encode_data_frame, Frame, Head, Header, Inbound, Keyword, Seq,
};
use apex_proto::beep::mgmt::{ErrorElement, Greeting, ProfileOffer};
use apex_proto::error::Field;
use apex_proto::testing::{Dispatcher, EchoProfile};
use apex_proto::{
    Event, FrameError, Limits, Misuse, ProtocolError, ReplyKind, Role, Session, SessionConfig,
};
use bytes::{Bytes, BytesMut};

const APEX: &str = "http://iana.org/beep/APEX";

/// The listener's greeting offering APEX (RFC 3080 §2.3.1.1): payload 111.
const L_GREETING: &[u8] = b"RPY 0 0 . 0 111\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

/// The initiator's empty greeting (RFC 3080 §2.3.1.1): payload 52.
const I_GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

/// The initiator asks for channel 1 with APEX: payload 116, seqno 52 after its greeting.
const START_1: &[u8] = b"MSG 0 1 . 52 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n";

/// The listener accepts it: payload 83, seqno 111 after its greeting.
const RPY_START_1: &[u8] = b"RPY 0 1 . 111 83\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX' />\r\nEND\r\n";

/// The SEQ the listener sends once it consumed the initiator's 52-octet greeting: it opens the
/// channel-0 window to its 256 KiB buffer (BEEP-63, BEEP-66).
const SEQ_0_AFTER_GREETING: &[u8] = b"SEQ 0 52 262144\r\n";

/// The SEQ that opens a new channel's window to the 256 KiB buffer.
const SEQ_1_OPEN: &[u8] = b"SEQ 1 0 262144\r\n";

/// A listener refusing service with 421 instead of a greeting (RFC 3080 §2.3.1.5, §2.4):
/// payload 85.
const L_REFUSAL: &[u8] = b"ERR 0 0 . 0 85\r\nContent-Type: application/beep+xml\r\n\r\n<error code='421'>relay shutting down</error>\r\nEND\r\n";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Checks that a literal data frame's size field matches the octets between its header line and
/// its `END\r\n` trailer, independently of the engine's parser; returns the frame.
#[track_caller]
fn checked(frame: &[u8]) -> &[u8] {
    if frame.starts_with(b"SEQ ") {
        // A SEQ frame is its header line alone.
        assert_eq!(
            frame.iter().position(|&b| b == b'\n'),
            Some(frame.len() - 1)
        );
        return frame;
    }
    let lf = frame.iter().position(|&b| b == b'\n').expect("header line");
    let line = std::str::from_utf8(&frame[..lf - 1]).unwrap();
    let size: usize = line.split(' ').nth(5).unwrap().parse().unwrap();
    assert!(
        frame.ends_with(b"END\r\n"),
        "vector {line:?} has no trailer"
    );
    assert_eq!(
        frame.len() - (lf + 1) - 5,
        size,
        "test vector bug: size field of {line:?}"
    );
    frame
}

/// Concatenates checked frames.
fn cat(frames: &[&[u8]]) -> Vec<u8> {
    frames.iter().flat_map(|f| checked(f).to_vec()).collect()
}

/// Builds a data frame from parts (for vectors too long to write out, e.g. 4 KiB payloads).
fn data(
    keyword: &str,
    channel: u32,
    msgno: u32,
    more: char,
    seqno: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "{keyword} {channel} {msgno} {more} {seqno} {}\r\n",
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"END\r\n");
    out
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_wire(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}\n got: {:?}\nwant: {:?}",
        lossy(got),
        lossy(want)
    );
}

/// One session plus the profile that answers on it.
struct Peer {
    session: Session,
    profile: EchoProfile,
    events: Vec<Event>,
}

impl Peer {
    fn new(role: Role, config: SessionConfig) -> Self {
        Self {
            session: Session::new(role, config),
            profile: EchoProfile::new(APEX),
            events: Vec::new(),
        }
    }

    fn listener_with(limits: Limits) -> Self {
        Self::new(
            Role::Listener,
            SessionConfig {
                profiles: vec![APEX.into()],
                limits,
                ..SessionConfig::default()
            },
        )
    }

    fn initiator() -> Self {
        Self::new(Role::Initiator, SessionConfig::default())
    }

    /// Feeds complete frames without dispatching the events.
    fn feed_raw(&mut self, input: &[u8]) -> Result<(), ProtocolError> {
        let mut buf = BytesMut::from(input);
        let result = self.session.handle_input(&mut buf, Instant::now());
        if result.is_ok() {
            assert!(buf.is_empty(), "input left over: {:?}", lossy(&buf));
        }
        result
    }

    /// Feeds complete frames and lets the profile react to the events.
    fn feed(&mut self, input: &[u8]) -> Result<(), ProtocolError> {
        let result = self.feed_raw(input);
        self.dispatch();
        result
    }

    fn dispatch(&mut self) {
        let events = &mut self.events;
        Dispatcher::new(vec![&mut self.profile]).dispatch(&mut self.session, |_, e| events.push(e));
    }

    /// Everything the session has to send now.
    fn transmit(&mut self) -> Vec<u8> {
        let mut out = BytesMut::new();
        while self.session.poll_transmit(&mut out) > 0 {}
        out.to_vec()
    }

    #[track_caller]
    fn expect(&mut self, want: &[u8], what: &str) {
        let got = self.transmit();
        assert_wire(&got, want, what);
    }
}

/// A listener offering APEX whose greeting went out and which consumed the initiator's greeting.
fn listener() -> Peer {
    listener_limits(Limits::default(), SEQ_0_AFTER_GREETING)
}

fn listener_limits(limits: Limits, after_greeting: &[u8]) -> Peer {
    let mut l = Peer::listener_with(limits);
    l.expect(L_GREETING, "BEEP-17: listener greeting");
    l.feed(I_GREETING).unwrap();
    assert_eq!(l.events, vec![Event::Greeting(Greeting::default())]);
    l.events.clear();
    l.expect(after_greeting, "after the initiator's greeting");
    l
}

/// [`listener`] with channel 1 (APEX) started by the initiator. Afterwards the initiator's next
/// channel-0 seqno is 168 and msgno 2; the listener's next channel-0 seqno is 194.
fn listener_ch1() -> Peer {
    let mut l = listener();
    l.feed(START_1).unwrap();
    l.expect(&cat(&[RPY_START_1, SEQ_1_OPEN]), "start of channel 1");
    l
}

fn listener_ch1_limits(limits: Limits, after_greeting: &[u8], after_start: &[u8]) -> Peer {
    let mut l = listener_limits(limits, after_greeting);
    l.feed(START_1).unwrap();
    l.expect(after_start, "start of channel 1");
    l
}

/// `peer` after sending MSG 0 ("ping") on channel 1, which went out whole.
fn pinged(mut peer: Peer) -> Peer {
    peer.session
        .send_msg(1, Bytes::from_static(b"\r\nping"))
        .unwrap();
    peer.expect(checked(b"MSG 1 0 . 0 6\r\n\r\npingEND\r\n"), "our MSG");
    peer
}

/// An initiator that exchanged greetings with a listener offering APEX.
fn initiator() -> Peer {
    let mut i = Peer::initiator();
    i.expect(I_GREETING, "BEEP-17: initiator greeting");
    i.feed(L_GREETING).unwrap();
    i.expect(b"SEQ 0 111 262144\r\n", "SEQ after the listener's greeting");
    i
}

/// [`initiator`] with channel 1 started and accepted.
fn initiator_ch1() -> Peer {
    let mut i = initiator();
    let channel = i
        .session
        .start_channel(vec![ProfileOffer::new(APEX)], None)
        .unwrap();
    assert_eq!(channel, 1);
    i.expect(START_1, "BEEP-07/BEEP-20: the initiator's start");
    i.feed(RPY_START_1).unwrap();
    assert_eq!(i.profile.started, vec![(1, None)]);
    i.expect(SEQ_1_OPEN, "SEQ for the new channel");
    i
}

/// Feeds `input`, which must terminate the session with `expected`; then nothing may be sent,
/// ever (BEEP-08/09/10: "terminate the session without a reply").
#[track_caller]
fn assert_aborts(peer: &mut Peer, input: &[u8], expected: ProtocolError) {
    assert_eq!(peer.feed(input), Err(expected));
    let mut out = BytesMut::new();
    assert_eq!(
        peer.session.poll_transmit(&mut out),
        0,
        "no reply after abort"
    );
    assert!(out.is_empty());
    assert!(peer.session.is_finished(), "the session is over");
    // A dead session swallows further input and stays silent.
    let mut more = BytesMut::from(&b"MSG 1 9 . 0 0\r\nEND\r\n"[..]);
    assert_eq!(peer.session.handle_input(&mut more, Instant::now()), Ok(()));
    assert_eq!(peer.transmit(), b"");
}

fn parse_one(input: &[u8]) -> Result<Option<Inbound>, FrameError> {
    frame::parse(&mut BytesMut::from(input), 128)
}

fn head(input: &[u8]) -> Result<Option<(Head, usize)>, FrameError> {
    frame::parse_head(input, 128)
}

fn header(
    keyword: Keyword,
    channel: u32,
    msgno: u32,
    more: bool,
    seqno: u32,
    size: u32,
    ansno: Option<u32>,
) -> Header {
    Header {
        keyword,
        channel,
        msgno,
        more,
        seqno,
        size,
        ansno,
    }
}

fn data_frame(h: Header, payload: &'static [u8]) -> Inbound {
    Inbound::Data(Frame {
        header: h,
        payload: Bytes::from_static(payload),
    })
}

/// Every frame in `out`, in order.
fn frames_of(out: &[u8]) -> Vec<Inbound> {
    let mut buf = BytesMut::from(out);
    let mut frames = Vec::new();
    while let Some(f) = frame::parse(&mut buf, 128).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty(), "trailing output {:?}", lossy(&buf));
    frames
}

// ---------------------------------------------------------------------------------------------
// BEEP-01..03: frame grammar (frame level)
// ---------------------------------------------------------------------------------------------

/// BEEP-01: each of the five keywords, fields in order, single spaces, CRLF.
#[test]
fn beep_01_each_keyword_parses() {
    let cases: [(&[u8], Inbound); 5] = [
        (
            b"MSG 0 1 . 52 0\r\nEND\r\n",
            data_frame(header(Keyword::Msg, 0, 1, false, 52, 0, None), b""),
        ),
        (
            b"RPY 7 0 * 0 2\r\nhiEND\r\n",
            data_frame(header(Keyword::Rpy, 7, 0, true, 0, 2, None), b"hi"),
        ),
        (
            b"ERR 2 9 . 100 3\r\nnoXEND\r\n",
            data_frame(header(Keyword::Err, 2, 9, false, 100, 3, None), b"noX"),
        ),
        (
            b"ANS 3 0 . 8 9 1\r\n\r\nans-1\r\nEND\r\n",
            data_frame(
                header(Keyword::Ans, 3, 0, false, 8, 9, Some(1)),
                b"\r\nans-1\r\n",
            ),
        ),
        (
            b"NUL 3 0 . 23 0\r\nEND\r\n",
            data_frame(header(Keyword::Nul, 3, 0, false, 23, 0, None), b""),
        ),
    ];
    for (wire, want) in cases {
        assert_eq!(parse_one(checked(wire)), Ok(Some(want)), "{}", lossy(wire));
    }
}

/// BEEP-01 P1: only MSG RPY ERR ANS NUL (and SEQ) in upper case start a frame; a bad keyword is
/// reported as soon as its first octets rule out every keyword.
#[test]
fn beep_01_unknown_keyword_is_rejected() {
    for wire in [
        &b"Msg 1 0 . 0 0\r\nEND\r\n"[..],
        b"msg 1 0 . 0 0\r\nEND\r\n",
        b"XYZ 1 0 . 0 0\r\nEND\r\n",
        b"MSGS 1 0 . 0 0\r\nEND\r\n",
        b" MSG 1 0 . 0 0\r\nEND\r\n",
        b"MSG\t1 0 . 0 0\r\nEND\r\n",
        b"END\r\n",
    ] {
        assert_eq!(
            parse_one(wire),
            Err(FrameError::BadKeyword),
            "{}",
            lossy(wire)
        );
    }
    // Early rejection: two octets that start no keyword are enough.
    assert_eq!(head(b"MX"), Err(FrameError::BadKeyword));
    // A prefix of a keyword is merely incomplete.
    assert_eq!(head(b"MS"), Ok(None));
    assert_eq!(head(b"NUL 1"), Ok(None));
}

/// BEEP-01: the ansno field is present if and only if the keyword is ANS.
#[test]
fn beep_01_ansno_only_on_ans() {
    assert_eq!(
        parse_one(b"ANS 3 0 . 0 0\r\nEND\r\n"),
        Err(FrameError::BadField(Field::Ansno))
    );
    for wire in [
        &b"MSG 3 0 . 0 0 0\r\nEND\r\n"[..],
        b"RPY 3 0 . 0 0 0\r\nEND\r\n",
        b"ERR 3 0 . 0 0 0\r\nEND\r\n",
        b"NUL 3 0 . 0 0 0\r\nEND\r\n",
        b"ANS 3 0 . 0 0 0 0\r\nEND\r\n",
    ] {
        assert_eq!(
            parse_one(wire),
            Err(FrameError::BadField(Field::Layout)),
            "{}",
            lossy(wire)
        );
    }
}

/// BEEP-01: exactly one SP between fields, none before CRLF.
#[test]
fn beep_01_fields_separated_by_exactly_one_space() {
    let cases: [(&[u8], FrameError); 6] = [
        (
            b"MSG  1 0 . 0 0\r\nEND\r\n",
            FrameError::BadField(Field::Channel),
        ),
        (
            b"MSG 1  0 . 0 0\r\nEND\r\n",
            FrameError::BadField(Field::Msgno),
        ),
        (
            b"MSG 1 0  . 0 0\r\nEND\r\n",
            FrameError::BadField(Field::More),
        ),
        (
            b"MSG 1 0 . 0  0\r\nEND\r\n",
            FrameError::BadField(Field::Size),
        ),
        (
            b"MSG 1 0 . 0 0 \r\nEND\r\n",
            FrameError::BadField(Field::Layout),
        ),
        (
            b"MSG 1\t0 . 0 0\r\nEND\r\n",
            FrameError::BadField(Field::Channel),
        ),
    ];
    for (wire, err) in cases {
        assert_eq!(parse_one(wire), Err(err), "{}", lossy(wire));
    }
}

/// BEEP-01: the header line ends in CRLF; a bare LF or a stray CR is poorly formed.
#[test]
fn beep_01_header_line_ends_in_crlf() {
    assert_eq!(
        parse_one(b"MSG 1 0 . 0 0\nEND\r\n"),
        Err(FrameError::BadField(Field::Layout))
    );
    assert_eq!(
        parse_one(b"MSG 1 0 . 0 0\r\r\nEND\r\n"),
        Err(FrameError::BadField(Field::Size))
    );
    assert_eq!(
        parse_one(b"MSG 1 0 . 0 0\rEND\r\n"),
        Err(FrameError::BadField(Field::Size))
    );
    assert_eq!(
        parse_one(b"SEQ 1 0 4096\n"),
        Err(FrameError::BadField(Field::Layout))
    );
}

/// BEEP-02: channel, msgno and size are 0..2147483647; seqno 0..4294967295; ansno accepted in
/// 0..4294967295 on input (the prose of RFC 3080 §2.2.1.1; the ABNF of §2.2.1 stops at
/// 2147483647); more is `.` or `*`.
#[test]
fn beep_02_field_ranges() {
    let ok = |wire: &[u8]| match head(wire) {
        Ok(Some((Head::Data(h), len))) => {
            assert_eq!(len, wire.len(), "{}", lossy(wire));
            h
        }
        other => panic!("{}: {other:?}", lossy(wire)),
    };
    assert_eq!(ok(b"MSG 2147483647 0 . 0 0\r\n").channel, 2_147_483_647);
    assert_eq!(ok(b"MSG 0 2147483647 . 0 0\r\n").msgno, 2_147_483_647);
    assert_eq!(ok(b"MSG 0 0 . 4294967295 0\r\n").seqno, 4_294_967_295);
    assert_eq!(ok(b"MSG 0 0 . 0 2147483647\r\n").size, 2_147_483_647);
    assert_eq!(
        ok(b"ANS 0 0 . 0 0 4294967295\r\n").ansno,
        Some(4_294_967_295)
    );
    assert!(ok(b"MSG 0 0 * 0 0\r\n").more);
    assert!(!ok(b"MSG 0 0 . 0 0\r\n").more);

    let cases: [(&[u8], Field); 14] = [
        (b"MSG 2147483648 0 . 0 0\r\n", Field::Channel),
        (b"MSG 0 2147483648 . 0 0\r\n", Field::Msgno),
        (b"MSG 0 0 . 4294967296 0\r\n", Field::Seqno),
        (b"MSG 0 0 . 0 2147483648\r\n", Field::Size),
        (b"ANS 0 0 . 0 0 4294967296\r\n", Field::Ansno),
        (b"MSG 99999999999999999999 0 . 0 0\r\n", Field::Channel),
        (b"MSG -1 0 . 0 0\r\n", Field::Channel),
        (b"MSG +1 0 . 0 0\r\n", Field::Channel),
        (b"MSG 0 x . 0 0\r\n", Field::Msgno),
        (b"MSG 0 0 , 0 0\r\n", Field::More),
        (b"MSG 0 0 ** 0 0\r\n", Field::More),
        (b"MSG 0 0 .* 0 0\r\n", Field::More),
        (b"MSG 0 0 . 0\r\n", Field::Size),
        (b"MSG 0 0 .\r\n", Field::Seqno),
    ];
    for (wire, field) in cases {
        assert_eq!(
            head(wire),
            Err(FrameError::BadField(field)),
            "{}",
            lossy(wire)
        );
    }
    // One or more digits is all the grammar asks for: zero padding is read by value.
    assert_eq!(ok(b"MSG 007 0 . 00052 0\r\n").channel, 7);
    assert_eq!(ok(b"MSG 007 0 . 00052 0\r\n").seqno, 52);
}

/// BEEP-02: with the ranges of RFC 3080 §2.2.1.1 and no leading zeros, the longest legal
/// header is 62 octets (`ANS`, five 10-digit numbers, the flag, six spaces, CRLF); header lines
/// are bounded (128 octets including CRLF by default) and an over-long one is poorly formed (P2).
#[test]
fn beep_02_header_line_length() {
    let longest = b"ANS 2147483647 2147483647 * 4294967295 2147483647 4294967295\r\n";
    assert_eq!(longest.len(), 62);
    assert!(matches!(head(longest), Ok(Some((Head::Data(_), 62)))));

    let padded = |total: usize| {
        let mut line = b"MSG 0 0 . ".to_vec();
        let zeros = total - line.len() - b" 0\r\n".len() - 1;
        line.extend(std::iter::repeat_n(b'0', zeros));
        line.extend_from_slice(b"5 0\r\n");
        assert_eq!(line.len(), total);
        line
    };
    let at_limit = padded(128);
    assert!(matches!(
        head(&at_limit),
        Ok(Some((Head::Data(h), 128))) if h.seqno == 5
    ));
    assert_eq!(head(&padded(129)), Err(FrameError::HeaderTooLong));
    // No CRLF within the bound: poorly formed without waiting for more input.
    let mut endless = b"MSG 1 0 . ".to_vec();
    endless.extend(std::iter::repeat_n(b'0', 200));
    assert_eq!(head(&endless), Err(FrameError::HeaderTooLong));
}

/// BEEP-03 (RFC 3080 §2.2.1.1, §2.2.1.3): frames are read by their size field; `END` inside or
/// directly after the payload text is payload. Six example frames on channel 3 (a MSG in two
/// frames, then a one-to-many reply whose answers interleave) parse back exactly.
#[test]
fn beep_03_size_exact_parsing_of_the_13_4_examples() {
    let wire = cat(&[
        b"MSG 3 0 * 0 14\r\n\r\nfirst half, END\r\n",
        b"MSG 3 0 . 14 13\r\nsecond half\r\nEND\r\n",
        b"ANS 3 0 * 0 8 0\r\n\r\nans-0 END\r\n",
        b"ANS 3 0 . 8 9 1\r\n\r\nans-1\r\nEND\r\n",
        b"ANS 3 0 . 17 6 0\r\ndone\r\nEND\r\n",
        b"NUL 3 0 . 23 0\r\nEND\r\n",
    ]);
    assert_eq!(
        frames_of(&wire),
        vec![
            data_frame(
                header(Keyword::Msg, 3, 0, true, 0, 14, None),
                b"\r\nfirst half, "
            ),
            data_frame(
                header(Keyword::Msg, 3, 0, false, 14, 13, None),
                b"second half\r\n"
            ),
            data_frame(
                header(Keyword::Ans, 3, 0, true, 0, 8, Some(0)),
                b"\r\nans-0 "
            ),
            data_frame(
                header(Keyword::Ans, 3, 0, false, 8, 9, Some(1)),
                b"\r\nans-1\r\n"
            ),
            data_frame(
                header(Keyword::Ans, 3, 0, false, 17, 6, Some(0)),
                b"done\r\n"
            ),
            data_frame(header(Keyword::Nul, 3, 0, false, 23, 0, None), b""),
        ]
    );
}

/// BEEP-03: a payload may consist of trailer text; only the size decides where it ends.
#[test]
fn beep_03_payload_made_of_trailers() {
    let wire = checked(b"MSG 3 1 . 0 10\r\nEND\r\nEND\r\nEND\r\n");
    assert_eq!(
        parse_one(wire),
        Ok(Some(data_frame(
            header(Keyword::Msg, 3, 1, false, 0, 10, None),
            b"END\r\nEND\r\n"
        )))
    );
}

/// BEEP-03: every proper prefix of a frame is incomplete input, never an error.
#[test]
fn beep_03_every_prefix_is_incomplete() {
    let wire = checked(b"ANS 3 0 . 8 9 1\r\n\r\nans-1\r\nEND\r\n");
    for n in 0..wire.len() {
        let mut buf = BytesMut::from(&wire[..n]);
        assert_eq!(
            frame::parse(&mut buf, 128),
            Ok(None),
            "prefix of {n} octets"
        );
        assert_eq!(buf.len(), n, "incomplete input is left in place");
    }
}

/// BEEP-03 / BEEP-10 (P12): a size that does not match the payload puts something other than
/// `END\r\n` after it.
#[test]
fn beep_03_size_mismatch_is_a_bad_trailer() {
    for wire in [
        &b"MSG 3 0 . 0 3\r\nabcdEND\r\n"[..],
        b"MSG 3 0 . 0 5\r\nabcEND\r\n",
        b"MSG 3 0 . 0 3\r\nabcEND\n",
        b"MSG 3 0 . 0 3\r\nabcend\r\n",
        b"MSG 3 0 . 0 3\r\nabc\r\nEND\r\n",
    ] {
        assert_eq!(
            parse_one(wire),
            Err(FrameError::BadTrailer),
            "{}",
            lossy(wire)
        );
    }
    // Detected as soon as the first wrong trailer octet is visible.
    assert_eq!(
        parse_one(b"MSG 3 0 . 0 3\r\nabcX"),
        Err(FrameError::BadTrailer)
    );
    assert_eq!(parse_one(b"MSG 3 0 . 0 3\r\nabcEN"), Ok(None));
}

/// BEEP-01/BEEP-03: the encoder writes plain decimals, single spaces, the ansno only on ANS,
/// and takes the size from the payload.
#[test]
fn beep_01_03_encoder_is_exact() {
    let mut out = BytesMut::new();
    encode_data_frame(
        &mut out,
        &header(Keyword::Ans, 3, 0, true, 0, 999, Some(0)),
        b"\r\nans-0 ",
    );
    encode_data_frame(
        &mut out,
        &header(Keyword::Nul, 3, 0, false, 23, 0, None),
        b"",
    );
    assert_wire(
        &out,
        &cat(&[
            b"ANS 3 0 * 0 8 0\r\n\r\nans-0 END\r\n",
            b"NUL 3 0 . 23 0\r\nEND\r\n",
        ]),
        "encoded frames",
    );
    out.clear();
    Seq {
        channel: 1,
        ackno: 231,
        window: 4096,
    }
    .encode(&mut out);
    assert_wire(&out, b"SEQ 1 231 4096\r\n", "SEQ, RFC 3081 §3.1.3");
}

/// BEEP-07: seqno arithmetic is modulo 2^32; after 4294967295 comes 0 (frame level: a frame
/// ending exactly at the wrap is followed by seqno 0).
#[test]
fn beep_07_seqno_wraps_modulo_2_32() {
    let wire = cat(&[
        b"MSG 1 0 * 4294967291 5\r\nabcdeEND\r\n",
        b"MSG 1 0 . 0 3\r\nfghEND\r\n",
    ]);
    let frames = frames_of(&wire);
    let [Inbound::Data(a), Inbound::Data(b)] = &frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!(a.header.seqno, 4_294_967_291);
    assert_eq!(a.header.seqno.wrapping_add(a.header.size), b.header.seqno);
    assert_eq!(b.header.seqno, 0);
}

/// BEEP-62: `SEQ channel ackno window CRLF`; no payload and no trailer; ranges as seqno and size.
#[test]
fn beep_62_seq_grammar() {
    let wire = b"SEQ 1 231 4096\r\nNUL 1 0 . 0 0\r\nEND\r\n";
    let mut buf = BytesMut::from(&wire[..]);
    assert_eq!(
        frame::parse(&mut buf, 128),
        Ok(Some(Inbound::Seq(Seq {
            channel: 1,
            ackno: 231,
            window: 4096
        })))
    );
    assert_eq!(
        buf.len(),
        wire.len() - 16,
        "the SEQ frame is its 16-octet line"
    );
    assert!(matches!(
        frame::parse(&mut buf, 128),
        Ok(Some(Inbound::Data(_)))
    ));
    assert_eq!(
        parse_one(b"SEQ 2147483647 4294967295 2147483647\r\n"),
        Ok(Some(Inbound::Seq(Seq {
            channel: 2_147_483_647,
            ackno: 4_294_967_295,
            window: 2_147_483_647
        })))
    );
    let cases: [(&[u8], Field); 7] = [
        (b"SEQ 1 231\r\n", Field::Window),
        (b"SEQ 1 231 4096 5\r\n", Field::Layout),
        (b"SEQ 1 231 4096 \r\n", Field::Layout),
        (b"SEQ 2147483648 0 0\r\n", Field::Channel),
        (b"SEQ 1 4294967296 0\r\n", Field::Ackno),
        (b"SEQ 1 0 2147483648\r\n", Field::Window),
        (b"SEQ 1 0 -5\r\n", Field::Window),
    ];
    for (wire, field) in cases {
        assert_eq!(
            parse_one(wire),
            Err(FrameError::BadField(field)),
            "{}",
            lossy(wire)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// BEEP-17/18: greetings
// ---------------------------------------------------------------------------------------------

/// BEEP-17: each peer sends its greeting immediately (RPY 0 0 seqno 0; RFC 3080 §2.3.1.1, §2.4),
/// byte for byte, before it has received anything.
#[test]
fn beep_17_greetings_are_sent_immediately() {
    let mut l = Peer::listener_with(Limits::default());
    l.expect(checked(L_GREETING), "listener greeting, payload 111");
    let mut i = Peer::initiator();
    i.expect(checked(I_GREETING), "initiator greeting, payload 52");

    // An edge relay offering three profiles (TLS, SASL/DIGEST-MD5, APEX): payload 217.
    let mut edge = Peer::new(
        Role::Listener,
        SessionConfig {
            profiles: vec![
                "http://iana.org/beep/TLS".into(),
                "http://iana.org/beep/SASL/DIGEST-MD5".into(),
                APEX.into(),
            ],
            ..SessionConfig::default()
        },
    );
    edge.expect(checked(L_GREETING_217), "edge relay greeting, payload 217");

    // BEEP-34: features (x- names) and localize are attributes of the greeting.
    let mut f = Peer::new(
        Role::Listener,
        SessionConfig {
            profiles: vec![APEX.into()],
            features: vec!["x-foo".into()],
            localize: vec!["en".into()],
            ..SessionConfig::default()
        },
    );
    f.expect(
        checked(b"RPY 0 0 . 0 142\r\nContent-Type: application/beep+xml\r\n\r\n<greeting features='x-foo' localize='en'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n"),
        "greeting with features and localize",
    );
}

/// BEEP-17 (RFC 3080 §2.3.1.1, §2.4): the first frame must be the greeting.
#[test]
fn beep_17_first_frame_must_be_the_greeting() {
    let mut l = Peer::listener_with(Limits::default());
    l.expect(L_GREETING, "greeting");
    assert_aborts(&mut l, checked(START_1), ProtocolError::GreetingExpected);
}

/// BEEP-17/BEEP-15: greeting `profile` elements carry no content; a greeting that has some is
/// a poorly-formed channel-0 reply and terminates the session.
#[test]
fn beep_17_greeting_profile_with_content_terminates() {
    let mut l = Peer::listener_with(Limits::default());
    l.expect(L_GREETING, "greeting");
    assert_aborts(
        &mut l,
        checked(b"RPY 0 0 . 0 120\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX'>x</profile>\r\n</greeting>\r\nEND\r\n"),
        ProtocolError::BadManagementReply("unparsable channel-0 reply"),
    );
}

/// BEEP-17 / P5: the greeting is the only reply to msgno 0; a second one answers nothing.
#[test]
fn beep_17_second_greeting_is_a_reply_to_nothing() {
    let mut l = listener();
    assert_aborts(
        &mut l,
        checked(
            b"RPY 0 0 . 52 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n",
        ),
        ProtocolError::UnexpectedReply {
            channel: 0,
            msgno: 0,
        },
    );
}

/// BEEP-18: a refusing listener sends ERR msgno 0 with an `error` instead of a greeting
/// (RFC 3080 §2.3.1.5, §2.4; payload 85) and is finished once that is written.
#[test]
fn beep_18_refusing_listener_sends_err_instead_of_greeting() {
    let mut l = Peer {
        session: Session::new_refusing(
            SessionConfig {
                profiles: vec![APEX.into()],
                ..SessionConfig::default()
            },
            ErrorElement::new(421, "relay shutting down"),
        ),
        profile: EchoProfile::new(APEX),
        events: Vec::new(),
    };
    assert!(!l.session.is_finished(), "the ERR is not written yet");
    l.expect(checked(L_REFUSAL), "refusal, payload 85");
    assert!(l.session.is_finished(), "close the transport after the ERR");
}

/// BEEP-18: "the initiator's greeting is ignored; both peers then terminate". A refusing
/// listener that receives the initiator's greeting (which is sent immediately, so it normally
/// arrives) must stay finished and must not start serving the session.
#[test]
fn beep_18_refusing_listener_ignores_the_initiators_greeting() {
    let mut l = Peer {
        session: Session::new_refusing(
            SessionConfig {
                profiles: vec![APEX.into()],
                ..SessionConfig::default()
            },
            ErrorElement::new(421, "relay shutting down"),
        ),
        profile: EchoProfile::new(APEX),
        events: Vec::new(),
    };
    l.expect(L_REFUSAL, "refusal");
    let _ = l.feed(&cat(&[I_GREETING, START_1]));
    let out = l.transmit();
    assert_wire(
        &out,
        b"",
        "BEEP-18: nothing but the ERR may be sent; the initiator's greeting is ignored",
    );
    assert!(
        l.session.is_finished(),
        "BEEP-18: a refusing listener terminates; the initiator's greeting must not revive it"
    );
}

/// BEEP-18: an initiator whose listener answers with ERR instead of a greeting terminates the
/// session (SessionRefused) and sends nothing more.
#[test]
fn beep_18_initiator_receiving_refusal_terminates() {
    let mut i = Peer::initiator();
    i.expect(I_GREETING, "greeting");
    assert_aborts(
        &mut i,
        checked(L_REFUSAL),
        ProtocolError::SessionRefused {
            code: 421,
            text: "relay shutting down".into(),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// BEEP-07, BEEP-42: sequence and message numbers in a session
// ---------------------------------------------------------------------------------------------

/// BEEP-07: channel-0 seqnos count the greeting: after the 52-octet greeting the initiator's
/// start carries seqno 52, after the 111-octet greeting the listener's reply seqno 111.
#[test]
fn beep_07_channel_0_seqnos_include_the_greeting() {
    // Listener side: accepts START_1 (seqno 52) and answers at seqno 111.
    let _ = listener_ch1();
    // Initiator side: its own start goes out at seqno 52 (asserted in initiator_ch1).
    let _ = initiator_ch1();
}

/// BEEP-07/BEEP-09 (P10): a start with seqno 0 after a 52-octet greeting is out of sync.
#[test]
fn beep_07_wrong_seqno_after_greeting_terminates() {
    let mut l = listener();
    assert_aborts(
        &mut l,
        checked(b"MSG 0 1 . 0 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"),
        ProtocolError::SeqnoMismatch {
            channel: 0,
            expected: 52,
            got: 0,
        },
    );
}

/// BEEP-07: seqnos are per channel and per direction, across messages of every kind, starting
/// at 0 on a new channel. BEEP-42: both peers number their MSGs independently (both use msgno 0
/// on channel 1 at the same time).
#[test]
fn beep_07_42_seqnos_per_direction_and_independent_msgnos() {
    let mut l = listener_ch1();
    // The peer's MSG 0 (its numbering), seqno 0 in its direction.
    l.feed(checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    // Our own MSG, also msgno 0 (our numbering), queued after the echo reply.
    assert_eq!(
        l.session.send_msg(1, Bytes::from_static(b"\r\nping")),
        Ok(0)
    );
    l.expect(
        &cat(&[
            b"RPY 1 0 . 0 7\r\n\r\nhelloEND\r\n",
            b"MSG 1 0 . 7 6\r\n\r\npingEND\r\n",
        ]),
        "reply then MSG, one seqno space for our direction",
    );
    // The peer's reply to our msgno 0 continues the peer's direction at seqno 7.
    l.feed(checked(b"RPY 1 0 . 7 6\r\n\r\npongEND\r\n"))
        .unwrap();
    assert_eq!(
        l.profile.replies,
        vec![(1, 0, ReplyKind::Rpy, Bytes::from_static(b"\r\npong"))]
    );
    assert_eq!(
        l.profile.messages,
        vec![(1, 0, Bytes::from_static(b"\r\nhello"))]
    );
    l.expect(b"", "nothing more");
    // Seqno that did not advance by the last frame's size: out of sync.
    assert_aborts(
        &mut l,
        checked(b"MSG 1 1 . 7 0\r\nEND\r\n"),
        ProtocolError::SeqnoMismatch {
            channel: 1,
            expected: 13,
            got: 7,
        },
    );
}

/// BEEP-04: our own MSGs on a channel get distinct msgnos while replies are outstanding.
#[test]
fn beep_04_own_msgnos_are_distinct() {
    let mut l = listener_ch1();
    assert_eq!(l.session.send_msg(1, Bytes::from_static(b"\r\na")), Ok(0));
    assert_eq!(l.session.send_msg(1, Bytes::from_static(b"\r\nb")), Ok(1));
    l.expect(
        &cat(&[
            b"MSG 1 0 . 0 3\r\n\r\naEND\r\n",
            b"MSG 1 1 . 3 3\r\n\r\nbEND\r\n",
        ]),
        "two MSGs",
    );
}

// ---------------------------------------------------------------------------------------------
// BEEP-08/09/10: the twelve poorly-formed-frame conditions of RFC 3080 §2.2.1.1-§2.2.1.3
// (P1-P12 as numbered in proto/src/error.rs), each aborting silently
// ---------------------------------------------------------------------------------------------

/// BEEP-08 P1: a header that does not begin with a known keyword.
#[test]
fn beep_08_p1_unknown_keyword() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"HELO 1 0 . 0 0\r\nEND\r\n",
        ProtocolError::Frame(FrameError::BadKeyword),
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"msg 1 0 . 0 0\r\nEND\r\n",
        ProtocolError::Frame(FrameError::BadKeyword),
    );
}

/// BEEP-08 P2: a header parameter missing, unparsable or out of range.
#[test]
fn beep_08_p2_bad_parameter() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"MSG 1 2147483648 . 0 0\r\nEND\r\n",
        ProtocolError::Frame(FrameError::BadField(Field::Msgno)),
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"MSG 1 0 . 0\r\nEND\r\n",
        ProtocolError::Frame(FrameError::BadField(Field::Size)),
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"MSG 1 0 x 0 0\r\nEND\r\n",
        ProtocolError::Frame(FrameError::BadField(Field::More)),
    );
}

/// BEEP-08 P3: the channel does not exist.
#[test]
fn beep_08_p3_unknown_channel() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        checked(b"MSG 3 0 . 0 3\r\nabcEND\r\n"),
        ProtocolError::UnknownChannel(3),
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        checked(b"MSG 2147483647 0 . 0 0\r\nEND\r\n"),
        ProtocolError::UnknownChannel(2_147_483_647),
    );
}

/// BEEP-08 P4: a MSG reusing the msgno of a completely received MSG we have not answered.
#[test]
fn beep_08_p4_msgno_in_use() {
    let mut l = listener_ch1();
    l.profile.manual = true;
    l.feed(checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    l.expect(b"", "not answered yet");
    assert_aborts(
        &mut l,
        checked(b"MSG 1 0 . 7 7\r\n\r\nhelloEND\r\n"),
        ProtocolError::MsgnoInUse {
            channel: 1,
            msgno: 0,
        },
    );
}

/// BEEP-08 P4: every unanswered msgno stays in use, not only the newest, whether the peer numbers
/// its MSGs upward (3 among 1, 3, 5) or not (9 among 9, 2, 5).
#[test]
fn beep_08_p4_any_unanswered_msgno_is_in_use() {
    for (numbers, reused) in [(&[1u32, 3, 5][..], 3u32), (&[9, 2, 5][..], 9)] {
        let mut l = listener_ch1();
        l.profile.manual = true;
        let mut seqno = 0;
        for msgno in numbers {
            l.feed(checked(
                format!("MSG 1 {msgno} . {seqno} 2\r\nhiEND\r\n").as_bytes(),
            ))
            .unwrap();
            seqno += 2;
        }
        l.expect(b"", "not answered yet");
        assert_aborts(
            &mut l,
            checked(format!("MSG 1 {reused} . {seqno} 2\r\nhiEND\r\n").as_bytes()),
            ProtocolError::MsgnoInUse {
                channel: 1,
                msgno: reused,
            },
        );
    }
}

/// BEEP-04/BEEP-08 P4: once the reply has been completely sent, the msgno may be reused.
#[test]
fn beep_04_msgno_reusable_after_complete_reply() {
    let mut l = listener_ch1();
    l.feed(checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    l.expect(checked(b"RPY 1 0 . 0 7\r\n\r\nhelloEND\r\n"), "echo");
    l.feed(checked(b"MSG 1 0 . 7 7\r\n\r\nagainEND\r\n"))
        .unwrap();
    l.expect(checked(b"RPY 1 0 . 7 7\r\n\r\nagainEND\r\n"), "echo again");
}

/// BEEP-08 P4: "whose reply has not yet been completely sent". Our 5000-octet reply is blocked
/// after its first 4096 octets by the initial window (BEEP-60), so the peer has seen only a `*`
/// frame of it; reusing msgno 0 now is poorly formed.
#[test]
fn beep_08_p4_msgno_in_use_while_reply_partly_sent() {
    let mut l = listener_ch1();
    l.profile.manual = true;
    l.feed(checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    l.session
        .send_rpy(1, 0, Bytes::from(vec![b'r'; 5000]))
        .unwrap();
    let out = l.transmit();
    assert!(
        out.starts_with(b"RPY 1 0 * 0 4096\r\n") && out.len() == 18 + 4096 + 5,
        "only the first 4096 octets fit: {:?}",
        lossy(&out[..out.len().min(40)])
    );
    assert_aborts(
        &mut l,
        checked(b"MSG 1 0 . 7 7\r\n\r\nhelloEND\r\n"),
        ProtocolError::MsgnoInUse {
            channel: 1,
            msgno: 0,
        },
    );
}

/// BEEP-08 P5: a reply for a MSG whose reply was already completely received.
#[test]
fn beep_08_p5_reply_to_completed_msg() {
    let mut l = pinged(listener_ch1());
    l.feed(checked(b"RPY 1 0 . 0 6\r\n\r\npongEND\r\n"))
        .unwrap();
    assert_aborts(
        &mut l,
        checked(b"RPY 1 0 . 6 0\r\nEND\r\n"),
        ProtocolError::UnexpectedReply {
            channel: 1,
            msgno: 0,
        },
    );
}

/// BEEP-08 P6: a reply for a msgno we never sent.
#[test]
fn beep_08_p6_reply_to_unsent_msg() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        checked(b"RPY 1 7 . 0 6\r\n\r\npongEND\r\n"),
        ProtocolError::UnexpectedReply {
            channel: 1,
            msgno: 7,
        },
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        checked(b"ANS 1 0 . 0 0 0\r\nEND\r\n"),
        ProtocolError::UnexpectedReply {
            channel: 1,
            msgno: 0,
        },
    );
}

/// BEEP-08 P7: a continuation frame of a MSG with another keyword.
#[test]
fn beep_08_p7_keyword_changes_within_a_msg() {
    let mut l = listener_ch1();
    l.feed(checked(b"MSG 1 0 * 0 3\r\nabcEND\r\n")).unwrap();
    assert_aborts(
        &mut l,
        checked(b"RPY 1 0 . 3 3\r\ndefEND\r\n"),
        ProtocolError::KeywordChanged(1),
    );
}

/// BEEP-08 P7: a continuation frame of a reply with another keyword (RPY * then ERR).
#[test]
fn beep_08_p7_keyword_changes_within_a_reply() {
    let mut l = pinged(listener_ch1());
    l.feed(checked(b"RPY 1 0 * 0 3\r\nabcEND\r\n")).unwrap();
    assert_aborts(
        &mut l,
        checked(b"ERR 1 0 . 3 3\r\ndefEND\r\n"),
        ProtocolError::KeywordChanged(1),
    );
}

/// BEEP-08 P8 / BEEP-11: NUL after a reply frame that was not ANS.
#[test]
fn beep_08_p8_nul_not_after_ans() {
    let mut l = pinged(listener_ch1());
    l.feed(checked(b"RPY 1 0 * 0 3\r\nabcEND\r\n")).unwrap();
    assert_aborts(
        &mut l,
        checked(b"NUL 1 0 . 3 0\r\nEND\r\n"),
        ProtocolError::NulNotAfterAns(1),
    );
}

/// BEEP-08 P9: after a `*` frame, the next frame on the channel has another msgno.
#[test]
fn beep_08_p9_continuation_with_other_msgno() {
    let mut l = listener_ch1();
    l.feed(checked(b"MSG 1 0 * 0 3\r\nabcEND\r\n")).unwrap();
    assert_aborts(
        &mut l,
        checked(b"MSG 1 1 . 3 3\r\ndefEND\r\n"),
        ProtocolError::ContinuationMismatch(1),
    );
}

/// BEEP-08 P10 / BEEP-09: the seqno is not the expected one.
#[test]
fn beep_08_p10_seqno_mismatch() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        checked(b"MSG 1 0 . 1 3\r\nabcEND\r\n"),
        ProtocolError::SeqnoMismatch {
            channel: 1,
            expected: 0,
            got: 1,
        },
    );
    let mut l = listener_ch1();
    l.feed(checked(b"MSG 1 0 . 0 3\r\nabcEND\r\n")).unwrap();
    assert_aborts(
        &mut l,
        checked(b"MSG 1 1 . 0 3\r\nabcEND\r\n"),
        ProtocolError::SeqnoMismatch {
            channel: 1,
            expected: 3,
            got: 0,
        },
    );
}

/// BEEP-08 P11 / BEEP-11: NUL with `*` or with a payload.
#[test]
fn beep_08_p11_nul_with_more_or_payload() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"NUL 1 0 * 0 0\r\nEND\r\n",
        ProtocolError::Frame(FrameError::BadNul),
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"NUL 1 0 . 0 3\r\nabcEND\r\n",
        ProtocolError::Frame(FrameError::BadNul),
    );
}

/// BEEP-08 P12 / BEEP-10: the five octets after the payload are not `END\r\n`.
#[test]
fn beep_08_p12_bad_trailer() {
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"MSG 1 0 . 0 3\r\nabcENX\r\n",
        ProtocolError::Frame(FrameError::BadTrailer),
    );
    let mut l = listener_ch1();
    assert_aborts(
        &mut l,
        b"MSG 1 0 . 0 2\r\nabcEND\r\n",
        ProtocolError::Frame(FrameError::BadTrailer),
    );
}

/// BEEP-08: "without a reply" includes replies already queued by frames that arrived in the
/// same read before the bad one: the channel-0 ERR for an unexpected element and the echo.
#[test]
fn beep_08_abort_discards_replies_queued_before_the_bad_frame() {
    let mut l = listener_ch1();
    let input = [
        checked(b"MSG 0 2 . 168 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"),
        &b"XYZ\r\n"[..],
    ]
    .concat();
    assert_aborts(&mut l, &input, ProtocolError::Frame(FrameError::BadKeyword));
}

// ---------------------------------------------------------------------------------------------
// BEEP-11, BEEP-36: one-to-many replies
// ---------------------------------------------------------------------------------------------

/// BEEP-11: a NUL alone is a complete (empty) one-to-many reply.
#[test]
fn beep_11_nul_alone_is_a_whole_reply() {
    let mut l = pinged(listener_ch1());
    l.feed(checked(b"NUL 1 0 . 0 0\r\nEND\r\n")).unwrap();
    assert_eq!(
        l.profile.replies,
        vec![(1, 0, ReplyKind::Nul, Bytes::new())]
    );
    l.expect(b"", "nothing to send");
}

/// BEEP-11/BEEP-05/BEEP-36: our one-to-many reply: ANS with distinct ansnos, then NUL with `.`
/// and size 0; a reply to the next MSG waits for the NUL (BEEP-35/36).
#[test]
fn beep_11_36_sending_ans_then_nul() {
    let mut l = listener_ch1();
    l.profile.manual = true;
    l.feed(&cat(&[
        b"MSG 1 0 . 0 7\r\n\r\nqueryEND\r\n",
        b"MSG 1 1 . 7 8\r\n\r\nsecondEND\r\n",
    ]))
    .unwrap();
    assert_eq!(
        l.session.send_ans(1, 0, Bytes::from_static(b"\r\na")),
        Ok(0)
    );
    assert_eq!(
        l.session.send_ans(1, 0, Bytes::from_static(b"\r\nb")),
        Ok(1)
    );
    l.session
        .send_rpy(1, 1, Bytes::from_static(b"\r\nrpy"))
        .unwrap();
    l.expect(
        &cat(&[
            b"ANS 1 0 . 0 3 0\r\n\r\naEND\r\n",
            b"ANS 1 0 . 3 3 1\r\n\r\nbEND\r\n",
        ]),
        "answers; the RPY to msgno 1 waits for the NUL",
    );
    l.session.send_nul(1, 0).unwrap();
    l.expect(
        &cat(&[
            b"NUL 1 0 . 6 0\r\nEND\r\n",
            b"RPY 1 1 . 6 5\r\n\r\nrpyEND\r\n",
        ]),
        "NUL, then the next reply",
    );
}

/// A listener whose peer started channel 3 (for the one-to-many examples), and which sent MSG 0
/// there, so the next frames the peer sends on channel 3 are its replies.
fn awaiting_reply_on_channel_3(limits: Limits) -> Peer {
    let mut l = listener_limits(limits, SEQ_0_AFTER_GREETING);
    l.feed(checked(b"MSG 0 1 . 52 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[RPY_START_1, b"SEQ 3 0 262144\r\n"]),
        "start of channel 3",
    );
    l.session
        .send_msg(3, Bytes::from_static(b"\r\nquery"))
        .unwrap();
    l.expect(checked(b"MSG 3 0 . 0 7\r\n\r\nqueryEND\r\n"), "our MSG");
    l
}

/// BEEP-36 / BEEP-03 (RFC 3080 §2.2.1.1, §2.6.1): the peer's answers 0 and 1 interleave, then
/// NUL; each answer is reassembled by ansno and delivered when complete.
#[test]
fn beep_36_interleaved_answers_of_13_4() {
    let mut l = awaiting_reply_on_channel_3(Limits::default());
    l.feed(&cat(&[
        b"ANS 3 0 * 0 8 0\r\n\r\nans-0 END\r\n",
        b"ANS 3 0 . 8 9 1\r\n\r\nans-1\r\nEND\r\n",
        b"ANS 3 0 . 17 6 0\r\ndone\r\nEND\r\n",
        b"NUL 3 0 . 23 0\r\nEND\r\n",
    ]))
    .unwrap();
    assert_eq!(
        l.profile.replies,
        vec![
            (
                3,
                0,
                ReplyKind::Ans(1),
                Bytes::from_static(b"\r\nans-1\r\n")
            ),
            (
                3,
                0,
                ReplyKind::Ans(0),
                Bytes::from_static(b"\r\nans-0 done\r\n")
            ),
            (3, 0, ReplyKind::Nul, Bytes::new()),
        ]
    );
    l.expect(b"", "nothing to send");
}

/// BEEP-03/BEEP-06 (RFC 3080 §2.2.1.1): a headerless MSG in two frames, `END` right after the
/// first payload, is reassembled and echoed in one frame.
#[test]
fn beep_03_two_frame_message_of_13_4() {
    let mut l = listener();
    l.feed(checked(b"MSG 0 1 . 52 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[RPY_START_1, b"SEQ 3 0 262144\r\n"]),
        "start of channel 3",
    );
    l.feed(&cat(&[
        b"MSG 3 0 * 0 14\r\n\r\nfirst half, END\r\n",
        b"MSG 3 0 . 14 13\r\nsecond half\r\nEND\r\n",
    ]))
    .unwrap();
    assert_eq!(
        l.profile.messages,
        vec![(3, 0, Bytes::from_static(b"\r\nfirst half, second half\r\n"))]
    );
    l.expect(
        checked(b"RPY 3 0 . 0 27\r\n\r\nfirst half, second half\r\nEND\r\n"),
        "echo",
    );
}

// ---------------------------------------------------------------------------------------------
// BEEP-13, BEEP-20..22, BEEP-29, BEEP-31: channel management
// ---------------------------------------------------------------------------------------------

/// BEEP-13/BEEP-31: a `start` with an XML declaration or a DOCTYPE is poorly formed: ERR 500;
/// undefined entities likewise; the predefined ones and character references are fine.
#[test]
fn beep_13_xml_restrictions_on_start() {
    let mut l = listener();
    l.feed(checked(b"MSG 0 1 . 52 139\r\nContent-Type: application/beep+xml\r\n\r\n<?xml version='1.0'?>\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 1 . 111 96\r\nContent-Type: application/beep+xml\r\n\r\n<error code='500'>XML declaration is not allowed</error>\r\nEND\r\n"),
        "XML declaration refused",
    );
    l.feed(checked(b"MSG 0 2 . 191 134\r\nContent-Type: application/beep+xml\r\n\r\n<!DOCTYPE start>\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 2 . 207 88\r\nContent-Type: application/beep+xml\r\n\r\n<error code='500'>DOCTYPE is not allowed</error>\r\nEND\r\n"),
        "DOCTYPE refused",
    );
    l.feed(checked(b"MSG 0 3 . 325 129\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>&foo;</profile>\r\n</start>\r\nEND\r\n"))
        .unwrap();
    let out = l.transmit();
    let frames = frames_of(&out);
    let [Inbound::Data(err)] = &frames[..] else {
        panic!("{}", lossy(&out))
    };
    assert_eq!(
        (err.header.keyword, err.header.msgno, err.header.seqno),
        (Keyword::Err, 3, 295)
    );
    assert!(
        err.payload
            .starts_with(b"Content-Type: application/beep+xml\r\n\r\n<error code='500'>"),
        "{}",
        lossy(&err.payload)
    );
    let next = 295 + err.header.size;
    // The five predefined entities and character references are allowed.
    l.feed(checked(b"MSG 0 4 . 454 166\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>a &amp; b &lt;&gt;&apos;&quot; &#65;&#x42;</profile>\r\n</start>\r\nEND\r\n"))
        .unwrap();
    let want = [
        format!("RPY 0 4 . {next} 116\r\n").as_bytes(),
        &b"Content-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[a & b <>'\" AB]]></profile>\r\nEND\r\n"[..],
        SEQ_1_OPEN,
    ]
    .concat();
    l.expect(&want, "accepted, decoded content echoed");
}

/// BEEP-20 + BEEP-22 + BEEP-28 (RFC 3080 §2.3.1.2, §2.3.1.3; byte for byte): the listener
/// offering three profiles picks APEX out of two candidates for channel 3, refuses the even
/// channel 4 with 501, declines to close channel 3 while a MSG on it is unanswered, then accepts
/// the close.
#[test]
fn beep_20_22_28_reproduce_13_2() {
    let mut l = Peer::new(
        Role::Listener,
        SessionConfig {
            profiles: vec![
                "http://iana.org/beep/TLS".into(),
                "http://iana.org/beep/SASL/DIGEST-MD5".into(),
                APEX.into(),
            ],
            ..SessionConfig::default()
        },
    );
    l.profile.manual = true;
    l.expect(checked(L_GREETING_217), "edge relay greeting, 217");
    l.feed(checked(I_GREETING)).unwrap();
    l.expect(SEQ_0_AFTER_GREETING, "window of channel 0");

    l.feed(checked(b"MSG 0 1 . 52 167\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://example.org/beep/NOPE' />\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[
            b"RPY 0 1 . 217 83\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX' />\r\nEND\r\n",
            b"SEQ 3 0 262144\r\n",
        ]),
        "start: one profile, the chosen one",
    );

    l.feed(checked(b"MSG 0 2 . 219 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='4'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 2 . 300 104\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>initiator must use odd channel numbers</error>\r\nEND\r\n"),
        "start: even channel refused",
    );

    // A MSG on channel 3 that we have not answered keeps the channel busy.
    l.feed(checked(b"MSG 3 0 . 0 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    l.expect(b"", "no automatic reply");
    l.feed(checked(b"MSG 0 3 . 335 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='3' code='200' />\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 3 . 404 87\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>replies still pending</error>\r\nEND\r\n"),
        "close declined",
    );
    assert_eq!(l.session.channel_profile(3), Some(APEX));

    // Answer the MSG; now the close is accepted with `ok` (BEEP-29).
    l.session
        .send_rpy(3, 0, Bytes::from_static(b"\r\nhello"))
        .unwrap();
    l.expect(checked(b"RPY 3 0 . 0 7\r\n\r\nhelloEND\r\n"), "reply");
    l.feed(checked(b"MSG 0 4 . 406 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='3' code='200' />\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"RPY 0 4 . 491 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        "close accepted",
    );
    assert_eq!(l.profile.closed, vec![3]);
    assert_eq!(l.session.channel_profile(3), None);
    // BEEP-08 P3: the channel is gone.
    assert_aborts(
        &mut l,
        checked(b"MSG 3 1 . 7 0\r\nEND\r\n"),
        ProtocolError::UnknownChannel(3),
    );
}

/// BEEP-20: the listener starts even channels; its channel-0 MSGs are numbered from 1.
#[test]
fn beep_20_listener_starts_even_channels() {
    let mut l = listener();
    assert_eq!(
        l.session.start_channel(vec![ProfileOffer::new(APEX)], None),
        Ok(2)
    );
    l.expect(
        checked(b"MSG 0 1 . 111 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='2'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"),
        "start number 2",
    );
}

/// BEEP-20: an initiator refuses an odd channel asked for by the listener (501), and a
/// channel number that is not 1..2147483647 or already in use is refused too.
#[test]
fn beep_20_channel_number_rules() {
    let mut i = initiator();
    i.feed(checked(b"MSG 0 1 . 111 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    i.expect(
        checked(b"ERR 0 1 . 52 104\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>listener must use even channel numbers</error>\r\nEND\r\n"),
        "odd number from the listener refused",
    );

    let mut l = listener();
    l.feed(checked(b"MSG 0 1 . 52 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='0'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 1 . 111 85\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>number out of range</error>\r\nEND\r\n"),
        "channel 0 cannot be started",
    );

    let mut l = listener_ch1();
    l.feed(checked(b"MSG 0 2 . 168 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 2 . 194 88\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>channel already in use</error>\r\nEND\r\n"),
        "channel 1 exists",
    );
    l.feed(checked(b"MSG 0 3 . 284 119\r\nContent-Type: application/beep+xml\r\n\r\n<start number='5'>\r\n   <profile uri='http://example.org/beep/NOPE' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 3 . 282 100\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>no requested profile is acceptable</error>\r\nEND\r\n"),
        "BEEP-22: refusal carries an error",
    );
}

/// BEEP-22/BEEP-21: a piggybacked initialization message is handed to the profile and its
/// response rides back in the single `profile` of the RPY.
#[test]
fn beep_22_start_with_piggyback() {
    let mut l = listener();
    l.feed(checked(b"MSG 0 1 . 52 145\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'><![CDATA[<hello />]]></profile>\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[
            b"RPY 0 1 . 111 112\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<hello />]]></profile>\r\nEND\r\n",
            SEQ_1_OPEN,
        ]),
        "piggybacked response",
    );
    assert_eq!(l.session.channel_profile(1), Some(APEX));

    // encoding='base64' content is decoded before the profile sees it.
    let mut l = listener();
    l.feed(checked(b"MSG 0 1 . 52 154\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' encoding='base64'>PHJlYWR5IC8+</profile>\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[
            b"RPY 0 1 . 111 112\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX'><![CDATA[<ready />]]></profile>\r\nEND\r\n",
            SEQ_1_OPEN,
        ]),
        "base64 piggyback decoded",
    );
}

/// BEEP-21: piggybacked content over 4096 octets is refused with 501.
#[test]
fn beep_21_piggyback_over_4k_refused() {
    let mut l = listener();
    let body = format!(
        "Content-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX'>{}</profile>\r\n</start>\r\n",
        "a".repeat(4097)
    );
    l.feed(&data("MSG", 0, 1, '.', 52, body.as_bytes()))
        .unwrap();
    l.expect(
        checked(b"ERR 0 1 . 111 105\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>piggybacked content exceeds 4096 octets</error>\r\nEND\r\n"),
        "over 4K refused",
    );
}

/// BEEP-31: a MSG on channel 0 with an unexpected or unknown element is answered with ERR and
/// the session carries on.
#[test]
fn beep_31_unexpected_element_gets_err() {
    let mut l = listener();
    l.feed(checked(
        b"MSG 0 1 . 52 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
    ))
    .unwrap();
    l.expect(
        checked(b"ERR 0 1 . 111 103\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>unexpected element in a channel-0 MSG</error>\r\nEND\r\n"),
        "ok is not a request",
    );
    l.feed(checked(
        b"MSG 0 2 . 98 49\r\nContent-Type: application/beep+xml\r\n\r\n<bogus />\r\nEND\r\n",
    ))
    .unwrap();
    l.expect(
        checked(b"ERR 0 2 . 214 99\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>unknown element &apos;bogus&apos;</error>\r\nEND\r\n"),
        "unknown element",
    );
    // Still alive: a proper start works.
    l.feed(checked(b"MSG 0 3 . 147 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='1'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[
            b"RPY 0 3 . 313 83\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX' />\r\nEND\r\n",
            SEQ_1_OPEN,
        ]),
        "session continues",
    );
}

/// BEEP-24 (RFC 3081 §3.1.1): a channel's 4096-octet window is reserved for it, so a
/// listener bounds what it reserves by `limits.max_channels` and declines a `start` past it with
/// 550. With one channel allowed and channel 1 open, the start of channel 3 is refused and no
/// window is opened for it; the session goes on (a start while the limit has room works, see
/// `listener_ch1`).
#[test]
fn beep_24_start_past_max_channels_is_declined_with_550() {
    let limits = Limits {
        max_channels: 1,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(
        limits,
        SEQ_0_AFTER_GREETING,
        &cat(&[RPY_START_1, SEQ_1_OPEN]),
    );
    l.feed(checked(b"MSG 0 2 . 168 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 2 . 194 83\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>too many channels</error>\r\nEND\r\n"),
        "BEEP-24: the start past max_channels is declined",
    );
    assert!(l.events.is_empty(), "no channel started: {:?}", l.events);
    // Channel 1 still carries messages (the echo profile answers).
    l.feed(checked(b"MSG 1 0 . 0 6\r\n\r\npingEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"RPY 1 0 . 0 6\r\n\r\npingEND\r\n"),
        "channel 1 goes on",
    );
}

/// BEEP-30 (RFC 3080 §2.3.1.5): diagnostic text may go without `xml:lang` only when it is in
/// the language the peer's greeting lists first in `localize` (`i-default` when absent, which
/// RFC 2277 §4.5 reads as English). apexd writes English: to a peer whose first choice is
/// another language its `error` says `xml:lang='en'`. Each case: the initiator's greeting,
/// the listener's SEQ for it, an `ok` sent as a request, the listener's ERR. Without
/// `localize` see `beep_31_unexpected_element_gets_err`.
/// A frame of the wire, as a literal.
type Wire = &'static [u8];

const BEEP_30_EXCHANGES: &[(Wire, Wire, Wire, Wire)] = &[
        (
            b"RPY 0 0 . 0 66\r\nContent-Type: application/beep+xml\r\n\r\n<greeting localize='fr' />\r\nEND\r\n",
            b"SEQ 0 66 262144\r\n",
            b"MSG 0 1 . 66 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
            b"ERR 0 1 . 111 117\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501' xml:lang='en'>unexpected element in a channel-0 MSG</error>\r\nEND\r\n",
        ),
        (
            b"RPY 0 0 . 0 72\r\nContent-Type: application/beep+xml\r\n\r\n<greeting localize='de-DE en' />\r\nEND\r\n",
            b"SEQ 0 72 262144\r\n",
            b"MSG 0 1 . 72 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
            b"ERR 0 1 . 111 117\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501' xml:lang='en'>unexpected element in a channel-0 MSG</error>\r\nEND\r\n",
        ),
        (
            b"RPY 0 0 . 0 72\r\nContent-Type: application/beep+xml\r\n\r\n<greeting localize='en-GB fr' />\r\nEND\r\n",
            b"SEQ 0 72 262144\r\n",
            b"MSG 0 1 . 72 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
            b"ERR 0 1 . 111 103\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>unexpected element in a channel-0 MSG</error>\r\nEND\r\n",
        ),
        (
            b"RPY 0 0 . 0 76\r\nContent-Type: application/beep+xml\r\n\r\n<greeting localize='i-default fr' />\r\nEND\r\n",
            b"SEQ 0 76 262144\r\n",
            b"MSG 0 1 . 76 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
            b"ERR 0 1 . 111 103\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>unexpected element in a channel-0 MSG</error>\r\nEND\r\n",
        ),
        (
            b"RPY 0 0 . 0 66\r\nContent-Type: application/beep+xml\r\n\r\n<greeting localize='EN' />\r\nEND\r\n",
            b"SEQ 0 66 262144\r\n",
            b"MSG 0 1 . 66 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
            b"ERR 0 1 . 111 103\r\nContent-Type: application/beep+xml\r\n\r\n<error code='501'>unexpected element in a channel-0 MSG</error>\r\nEND\r\n",
        ),
];

#[test]
fn beep_30_error_text_says_xml_lang_unless_english_is_the_peers_first_choice() {
    for (greeting, seq, request, error) in BEEP_30_EXCHANGES {
        let mut l = Peer::listener_with(Limits::default());
        l.expect(L_GREETING, "BEEP-17: listener greeting");
        l.feed(checked(greeting)).unwrap();
        l.expect(seq, "after the initiator's greeting");
        l.feed(checked(request)).unwrap();
        l.expect(checked(error), &lossy(greeting));
    }
}

/// BEEP-29/BEEP-32/BEEP-58: session release accepted: RPY `<ok />` (no attributes, no content),
/// then the session is finished once that is written.
#[test]
fn beep_32_session_release_accepted() {
    let mut l = listener_ch1();
    l.feed(checked(b"MSG 0 2 . 168 60\r\nContent-Type: application/beep+xml\r\n\r\n<close code='200' />\r\nEND\r\n"))
        .unwrap();
    assert!(l.events.contains(&Event::SessionReleased));
    assert!(!l.session.is_finished(), "the ok is not written yet");
    l.expect(
        checked(b"RPY 0 2 . 194 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        "ok",
    );
    assert!(l.session.is_finished(), "BEEP-58: close after sending ok");
}

/// BEEP-32/BEEP-33: session release declined (ERR 550) while a MSG awaits our reply; the
/// session stays up and a later release is accepted.
#[test]
fn beep_33_session_release_declined_keeps_session() {
    let mut l = listener_ch1();
    l.profile.manual = true;
    l.feed(checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    l.feed(checked(b"MSG 0 2 . 168 60\r\nContent-Type: application/beep+xml\r\n\r\n<close code='200' />\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 0 2 . 194 87\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>replies still pending</error>\r\nEND\r\n"),
        "release declined",
    );
    assert!(!l.session.is_finished());
    assert!(!l.events.contains(&Event::SessionReleased));
    l.session
        .send_rpy(1, 0, Bytes::from_static(b"\r\nhello"))
        .unwrap();
    l.expect(checked(b"RPY 1 0 . 0 7\r\n\r\nhelloEND\r\n"), "reply");
    l.feed(checked(b"MSG 0 3 . 228 60\r\nContent-Type: application/beep+xml\r\n\r\n<close code='200' />\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"RPY 0 3 . 281 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        "release accepted",
    );
    assert!(l.session.is_finished());
}

/// BEEP-32: closing one channel (number > 0) answers `ok` and removes only that channel.
#[test]
fn beep_32_close_channel_accepted() {
    let mut l = listener_ch1();
    l.feed(checked(b"MSG 0 2 . 168 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='1' code='200' />\r\nEND\r\n"))
        .unwrap();
    l.expect(
        checked(b"RPY 0 2 . 194 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        "ok",
    );
    assert_eq!(l.profile.closed, vec![1]);
    assert!(l.session.open_channels().is_empty());
    assert!(!l.session.is_finished());
}

/// BEEP-32/BEEP-28: a channel whose last reply the application has taken is idle, even before
/// anything is transmitted: the peer's close of it is accepted.
#[test]
fn beep_32_close_accepted_once_the_reply_is_taken() {
    let mut i = pinged(initiator_ch1());
    i.feed(checked(b"RPY 1 0 . 0 2\r\nokEND\r\n")).unwrap();
    assert_eq!(i.profile.replies.len(), 1, "the reply was taken");
    i.feed(checked(b"MSG 0 1 . 194 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='1' code='200' />\r\nEND\r\n"))
        .unwrap();
    i.expect(
        checked(b"RPY 0 1 . 168 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        "ok",
    );
    assert_eq!(i.profile.closed, vec![1]);
}

/// BEEP-29/BEEP-15: an `ok` with an attribute answering our release is a poorly-formed
/// channel-0 reply: the session terminates. A proper `<ok />` releases it. Our release names
/// channel 0 explicitly (the attribute's default; some peers need it written).
#[test]
fn beep_29_ok_with_attributes_terminates() {
    let mut i = initiator();
    i.session.close_session(200).unwrap();
    i.expect(
        checked(b"MSG 0 1 . 52 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='0' code='200' />\r\nEND\r\n"),
        "release request",
    );
    assert_aborts(
        &mut i,
        checked(b"RPY 0 1 . 111 57\r\nContent-Type: application/beep+xml\r\n\r\n<ok code='200' />\r\nEND\r\n"),
        ProtocolError::BadManagementReply("unparsable channel-0 reply"),
    );

    let mut i = initiator();
    i.session.close_session(200).unwrap();
    i.expect(
        b"MSG 0 1 . 52 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='0' code='200' />\r\nEND\r\n",
        "release request",
    );
    i.feed(checked(
        b"RPY 0 1 . 111 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
    ))
    .unwrap();
    assert!(i.events.contains(&Event::SessionReleased));
    i.expect(b"", "nothing more");
    assert!(i.session.is_finished(), "BEEP-58: close on receipt of ok");
}

/// BEEP-25/26/27: `close` only when all our MSGs are acknowledged; no MSG after it; the peer's
/// MSGs are still processed until the `ok` arrives.
#[test]
fn beep_25_26_27_closing_our_channel() {
    let mut i = pinged(initiator_ch1());
    assert_eq!(
        i.session.close_channel(1, 200),
        Err(Misuse::Unacknowledged(1))
    );
    // The first reply frame acknowledges the MSG.
    i.feed(checked(b"RPY 1 0 * 0 2\r\n\r\nEND\r\n")).unwrap();
    assert_eq!(i.session.close_channel(1, 200), Ok(()));
    i.expect(
        checked(b"MSG 0 2 . 168 71\r\nContent-Type: application/beep+xml\r\n\r\n<close number='1' code='200' />\r\nEND\r\n"),
        "close request",
    );
    assert_eq!(
        i.session.send_msg(1, Bytes::from_static(b"\r\nmore")),
        Err(Misuse::ChannelClosing(1))
    );
    i.feed(&cat(&[
        b"RPY 1 0 . 2 2\r\nokEND\r\n",
        b"MSG 1 0 . 4 7\r\n\r\nhelloEND\r\n",
    ]))
    .unwrap();
    i.expect(
        checked(b"RPY 1 0 . 6 7\r\n\r\nhelloEND\r\n"),
        "BEEP-27: still answering",
    );
    i.feed(checked(
        b"RPY 0 2 . 194 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n",
    ))
    .unwrap();
    assert_eq!(i.profile.closed, vec![1]);
    assert_eq!(i.session.channel_profile(1), None);
}

/// BEEP-16: at least 257 concurrent channels.
#[test]
fn beep_16_257_channels() {
    let mut l = listener();
    let mut seqno = 52;
    let mut our_seqno = 111;
    for k in 0..257u32 {
        let number = 2 * k + 1;
        let body = format!(
            "Content-Type: application/beep+xml\r\n\r\n<start number='{number}'>\r\n   <profile uri='{APEX}' />\r\n</start>\r\n"
        );
        let msg = data("MSG", 0, k + 1, '.', seqno, body.as_bytes());
        seqno += body.len() as u32;
        l.feed(&msg).unwrap();
        let out = l.transmit();
        let want = format!("RPY 0 {} . {our_seqno} 83\r\n", k + 1);
        assert!(out.starts_with(want.as_bytes()), "{}", lossy(&out));
        our_seqno += 83;
        // Acknowledge our replies so channel 0's window stays open.
        l.feed(format!("SEQ 0 {our_seqno} 4096\r\n").as_bytes())
            .unwrap();
    }
    assert_eq!(l.session.open_channels().len(), 257);
}

// ---------------------------------------------------------------------------------------------
// BEEP-35, BEEP-38, BEEP-39: exchange rules
// ---------------------------------------------------------------------------------------------

/// BEEP-35: replies go out in the order the MSGs arrived even when the application answers
/// msgno 1 before msgno 0.
#[test]
fn beep_35_replies_in_order_of_receipt() {
    let mut l = listener_ch1();
    l.profile.manual = true;
    l.feed(&cat(&[
        b"MSG 1 0 . 0 7\r\n\r\nfirstEND\r\n",
        b"MSG 1 1 . 7 8\r\n\r\nsecondEND\r\n",
    ]))
    .unwrap();
    l.session
        .send_rpy(1, 1, Bytes::from_static(b"\r\nreply-1"))
        .unwrap();
    l.expect(b"", "msgno 1 must wait for msgno 0");
    l.session
        .send_rpy(1, 0, Bytes::from_static(b"\r\nreply-0"))
        .unwrap();
    l.expect(
        &cat(&[
            b"RPY 1 0 . 0 9\r\n\r\nreply-0END\r\n",
            b"RPY 1 1 . 9 9\r\n\r\nreply-1END\r\n",
        ]),
        "0 then 1",
    );
}

/// BEEP-35 on channel 0: two pipelined starts answered by the application in reverse order
/// still get their replies in order of receipt.
#[test]
fn beep_35_start_replies_in_order_of_receipt() {
    let mut l = listener();
    l.feed_raw(&cat(&[
        START_1,
        b"MSG 0 2 . 168 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n",
    ]))
    .unwrap();
    let mut ids = Vec::new();
    while let Some(event) = l.session.poll_event() {
        match event {
            Event::StartRequested(request) => ids.push((request.id, request.channel)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ids, vec![(1, 1), (2, 3)]);
    assert_eq!(l.session.accept_start(2, APEX, None), Ok(3));
    l.expect(b"", "the reply to msgno 2 waits for msgno 1");
    assert_eq!(l.session.accept_start(1, APEX, None), Ok(1));
    let out = l.transmit();
    let replies = cat(&[
        RPY_START_1,
        b"RPY 0 2 . 194 83\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX' />\r\nEND\r\n",
    ]);
    assert_wire(&out[..replies.len().min(out.len())], &replies, "1 then 2");
    let seqs = &out[replies.len()..];
    assert!(
        seqs == b"SEQ 3 0 262144\r\nSEQ 1 0 262144\r\n"
            || seqs == b"SEQ 1 0 262144\r\nSEQ 3 0 262144\r\n",
        "{}",
        lossy(seqs)
    );
}

/// BEEP-08 P4 on channel 0: a second MSG 1 while our reply to the first start is pending.
#[test]
fn beep_08_p4_on_channel_0() {
    let mut l = listener();
    l.feed_raw(START_1).unwrap();
    assert_aborts(
        &mut l,
        checked(b"MSG 0 1 . 168 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        ProtocolError::MsgnoInUse {
            channel: 0,
            msgno: 1,
        },
    );
}

/// BEEP-15: a channel-0 reply that does not answer its request (`ok` to a `start`) terminates.
#[test]
fn beep_15_mismatched_channel_0_reply_terminates() {
    let mut i = initiator();
    i.session
        .start_channel(vec![ProfileOffer::new(APEX)], None)
        .unwrap();
    i.expect(START_1, "start");
    assert_aborts(
        &mut i,
        checked(b"RPY 0 1 . 111 46\r\nContent-Type: application/beep+xml\r\n\r\n<ok />\r\nEND\r\n"),
        ProtocolError::BadManagementReply("reply does not answer its request"),
    );
}

/// BEEP-38: a MSG that outgrows the message limit is answered pre-emptively with ERR before its
/// final frame; its remaining frames, up to and including the final one, are ignored; then the
/// msgno is free again.
#[test]
fn beep_38_preemptive_err_then_ignored_frames() {
    let limits = Limits {
        max_message_size: 10,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(
        limits,
        SEQ_0_AFTER_GREETING,
        &cat(&[RPY_START_1, SEQ_1_OPEN]),
    );
    l.feed(checked(b"MSG 1 0 * 0 8\r\n12345678END\r\n"))
        .unwrap();
    l.expect(b"", "8 octets fit the 10-octet limit");
    l.feed(checked(b"MSG 1 0 * 8 8\r\n12345678END\r\n"))
        .unwrap();
    l.expect(
        checked(b"ERR 1 0 . 0 83\r\nContent-Type: application/beep+xml\r\n\r\n<error code='550'>message too large</error>\r\nEND\r\n"),
        "pre-emptive ERR",
    );
    l.feed(&cat(&[
        b"MSG 1 0 * 16 8\r\n12345678END\r\n",
        b"MSG 1 0 . 24 8\r\n12345678END\r\n",
    ]))
    .unwrap();
    l.expect(b"", "remaining frames ignored");
    assert!(l.profile.messages.is_empty());
    l.feed(checked(b"MSG 1 0 . 32 7\r\n\r\nhelloEND\r\n"))
        .unwrap();
    assert_eq!(
        l.profile.messages,
        vec![(1, 0, Bytes::from_static(b"\r\nhello"))]
    );
    l.expect(
        checked(b"RPY 1 0 . 83 7\r\n\r\nhelloEND\r\n"),
        "normal service",
    );
}

/// BEEP-39 (initiator side): the peer's ERR arrives while our 10000-octet MSG is blocked after
/// its first 4096-octet frame; we finish the MSG with an empty `.` frame and drop the rest.
#[test]
fn beep_39_empty_final_frame_after_preemptive_err() {
    let mut i = initiator_ch1();
    assert_eq!(
        i.session.send_msg(1, Bytes::from(vec![b'x'; 10_000])),
        Ok(0)
    );
    let mut want = b"MSG 1 0 * 0 4096\r\n".to_vec();
    want.extend(std::iter::repeat_n(b'x', 4096));
    want.extend_from_slice(b"END\r\n");
    i.expect(&want, "BEEP-60/61: first frame is the 4096-octet window");
    i.feed(checked(b"ERR 1 0 . 0 6\r\n\r\nnopeEND\r\n"))
        .unwrap();
    assert_eq!(
        i.profile.replies,
        vec![(1, 0, ReplyKind::Err, Bytes::from_static(b"\r\nnope"))]
    );
    i.expect(checked(b"MSG 1 0 . 4096 0\r\nEND\r\n"), "empty final frame");
    i.feed(b"SEQ 1 4096 4096\r\n").unwrap();
    i.expect(b"", "the rest of the message is dropped");
}

// ---------------------------------------------------------------------------------------------
// BEEP-60..69: flow control
// ---------------------------------------------------------------------------------------------

/// BEEP-60/61/06: before any SEQ the peer's window is 4096: a 10000-octet MSG goes out as a
/// 4096-octet `*` frame, then one frame per window update; a window of 0 blocks; the next MSG
/// follows only after the last frame of the first (no interleaving on one channel).
#[test]
fn beep_60_61_window_segmentation() {
    let mut l = listener_ch1();
    let payload: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    l.session.send_msg(1, Bytes::from(payload.clone())).unwrap();
    l.session
        .send_msg(1, Bytes::from_static(b"\r\nsmall"))
        .unwrap();
    let first = [&b"MSG 1 0 * 0 4096\r\n"[..], &payload[..4096], b"END\r\n"].concat();
    l.expect(&first, "first frame");
    l.expect(b"", "window exhausted");
    l.feed(b"SEQ 1 4096 0\r\n").unwrap();
    l.expect(b"", "BEEP-61: a zero window sends nothing");
    l.feed(b"SEQ 1 4096 4096\r\n").unwrap();
    let second = [
        &b"MSG 1 0 * 4096 4096\r\n"[..],
        &payload[4096..8192],
        b"END\r\n",
    ]
    .concat();
    l.expect(&second, "second frame");
    l.feed(b"SEQ 1 8192 4096\r\n").unwrap();
    let third = [
        &b"MSG 1 0 . 8192 1808\r\n"[..],
        &payload[8192..],
        b"END\r\n",
        b"MSG 1 1 . 10000 7\r\n\r\nsmallEND\r\n",
    ]
    .concat();
    l.expect(&third, "last frame, then the next MSG");
}

/// BEEP-60/61 (receive side): with a 4096-octet buffer and no SEQ sent, the peer may send 4096
/// octets on a new channel and not one more.
#[test]
fn beep_60_61_peer_overrunning_the_initial_window_terminates() {
    let limits = Limits {
        recv_window: 4096,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(limits.clone(), b"", RPY_START_1);
    l.profile.manual = true;
    l.feed(&data("MSG", 1, 0, '.', 0, &[b'z'; 4096])).unwrap();

    let mut l = listener_ch1_limits(limits, b"", RPY_START_1);
    assert_aborts(
        &mut l,
        &data("MSG", 1, 0, '.', 0, &[b'z'; 4097]),
        ProtocolError::WindowOverrun(1),
    );
}

/// BEEP-62: a SEQ for a channel that does not exist, or acknowledging octets never sent, or
/// with an undeterminable field, terminates the session without reply.
#[test]
fn beep_62_invalid_seq_terminates() {
    let cases: [(&[u8], ProtocolError); 5] = [
        (b"SEQ 5 0 4096\r\n", ProtocolError::InvalidSeq(5)),
        (b"SEQ 1 1 4096\r\n", ProtocolError::InvalidSeq(1)),
        (b"SEQ 0 195 4096\r\n", ProtocolError::InvalidSeq(0)),
        (
            b"SEQ 1 0 2147483648\r\n",
            ProtocolError::Frame(FrameError::BadField(Field::Window)),
        ),
        (
            b"SEQ 1 0\r\n",
            ProtocolError::Frame(FrameError::BadField(Field::Window)),
        ),
    ];
    for (wire, err) in cases {
        let mut l = listener_ch1();
        assert_aborts(&mut l, wire, err);
    }
    // A valid SEQ acknowledging everything we sent on channel 0 (greeting + reply = 194).
    let mut l = listener_ch1();
    l.feed(b"SEQ 0 194 4096\r\n").unwrap();
    l.expect(b"", "a SEQ is never answered");
}

/// BEEP-62: a SEQ has no payload and no trailer; the next octets are the next frame.
#[test]
fn beep_62_seq_is_only_a_line() {
    let mut l = listener_ch1();
    l.feed(
        &[
            &b"SEQ 1 0 8192\r\n"[..],
            checked(b"MSG 1 0 . 0 7\r\n\r\nhelloEND\r\n"),
        ]
        .concat(),
    )
    .unwrap();
    l.expect(checked(b"RPY 1 0 . 0 7\r\n\r\nhelloEND\r\n"), "echo");
}

/// BEEP-66/67: many small frames read at once produce one consolidated SEQ for the channel,
/// sent ahead of that channel's data frames; growth below half the buffer sends none.
#[test]
fn beep_66_67_one_seq_ahead_of_the_data() {
    let limits = Limits {
        recv_window: 4096,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(limits, b"", RPY_START_1);
    let payload = |i: u32| format!("\r\n{i:038}").into_bytes();
    let mut input = Vec::new();
    let mut want = b"SEQ 1 2560 4096\r\n".to_vec();
    for i in 0..64u32 {
        input.extend(data("MSG", 1, i, '.', 40 * i, &payload(i)));
        want.extend(data("RPY", 1, i, '.', 40 * i, &payload(i)));
    }
    l.feed(&input).unwrap();
    assert_eq!(l.profile.messages.len(), 64);
    l.expect(&want, "one SEQ (2560 >= 4096/2), then the 64 replies");

    // 10 more (400 octets): the window would grow by less than half the buffer: no SEQ.
    let mut input = Vec::new();
    let mut want = Vec::new();
    for i in 64..74u32 {
        input.extend(data("MSG", 1, i, '.', 40 * i, &payload(i)));
        want.extend(data("RPY", 1, i, '.', 40 * i, &payload(i)));
    }
    l.feed(&input).unwrap();
    l.expect(&want, "replies only");
}

/// BEEP-69 (and BEEP-63/68): the advertised right edge never moves left. Data the application
/// has not taken yet keeps the window from growing, but never shrinks it; once the peer fills
/// the advertised window exactly, one more octet is an overrun.
#[test]
fn beep_69_window_never_shrinks() {
    let limits = Limits {
        recv_window: 4096,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(limits, b"", RPY_START_1);
    l.profile.manual = true;
    l.feed_raw(&data("MSG", 1, 0, '.', 0, &[b'a'; 3000]))
        .unwrap();
    l.expect(b"", "3000 octets not taken by the application: no SEQ");
    l.dispatch();
    l.expect(b"SEQ 1 3000 4096\r\n", "BEEP-63: taken: right edge 7096");
    l.feed_raw(&data("MSG", 1, 1, '.', 3000, &[b'b'; 3000]))
        .unwrap();
    l.expect(b"", "no SEQ that would move the edge left of 7096");
    l.feed_raw(&data("MSG", 1, 2, '.', 6000, &[b'c'; 1096]))
        .unwrap();
    l.expect(b"", "window full, edge unchanged");
    assert_aborts(
        &mut l,
        &data("MSG", 1, 3, '.', 7096, b"d"),
        ProtocolError::WindowOverrun(1),
    );
}

/// BEEP-61/63 and `max_queued_replies`: a peer that pipelines MSGs but never opens its window
/// for our replies (sends no SEQ) cannot make us queue replies without bound. Past the limit
/// the session hands out no more MSGs, whose octets then close the window we advertise; one
/// octet beyond it is an overrun. A SEQ is still applied, and once the replies drain, the
/// MSGs waiting are handed out.
#[test]
fn beep_63_replies_the_peer_will_not_take_stop_its_messages() {
    let limits = Limits {
        recv_window: 8192,
        max_queued_replies: 4096,
        ..Limits::default()
    };
    let body = [&b"\r\n"[..], &[b'x'; 1022]].concat();
    let msg = |i: u32| data("MSG", 1, i, '.', 1024 * i, &body);
    let listener = || {
        listener_ch1_limits(
            limits.clone(),
            b"SEQ 0 52 8192\r\n",
            &[RPY_START_1, b"SEQ 1 0 8192\r\n"].concat(),
        )
    };
    // The peer sends one MSG at a time while our window lets it, and never a SEQ.
    let mut l = listener();
    let mut sent = 0u32;
    let mut edge = 8192u32;
    loop {
        if 1024 * (sent + 1) > edge {
            break;
        }
        l.feed(&msg(sent)).unwrap();
        sent += 1;
        for frame in frames_of(&l.transmit()) {
            if let Inbound::Seq(seq) = frame {
                edge = seq.ackno + seq.window;
            }
        }
    }
    // Four replies fit the peer's initial window; five more wait (the fifth took the queue
    // past 4096); the MSGs after them are not handed out and hold our window shut.
    assert_eq!(l.profile.messages.len(), 9);
    assert_eq!(l.session.queued_replies(), 5 * 1024);
    assert!(!l.session.has_events());
    assert_eq!(
        sent,
        edge / 1024,
        "the peer filled every window we advertised"
    );
    assert!(sent < 30, "and the window closed: {sent} MSGs");
    assert_aborts(
        &mut l,
        &data("MSG", 1, sent, '.', edge, b"z"),
        ProtocolError::WindowOverrun(1),
    );

    // The same, but the peer opens its window at last: everything flows again.
    let mut l = listener();
    for i in 0..17 {
        l.feed(&msg(i)).unwrap();
        let _ = l.transmit();
    }
    assert_eq!(l.profile.messages.len(), 9);
    l.feed_raw(b"SEQ 1 4096 65536\r\n").unwrap();
    let replies = frames_of(&l.transmit()).len();
    assert_eq!(replies, 5, "the five waiting replies");
    // Handed out as the replies drain, up to the limit each time.
    let mut handed = Vec::new();
    let mut frames = 0;
    while l.session.has_events() {
        l.dispatch();
        handed.push(l.profile.messages.len());
        frames += frames_of(&l.transmit()).len();
    }
    assert_eq!(handed, [14, 17], "the MSGs held back are handed out");
    assert_eq!(frames, 8 + 1, "their replies, and a SEQ");
}

/// `max_unanswered_octets`: the windows bound what waits on each channel, not their sum over
/// a thousand channels. A peer whose replies are held (past `max_queued_replies`) and that
/// keeps sending past this bound is ended.
#[test]
fn beep_63_a_peer_that_takes_no_replies_and_keeps_sending_is_ended() {
    let limits = Limits {
        recv_window: 65536,
        max_queued_replies: 2048,
        max_unanswered_octets: 8192,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(
        limits,
        b"SEQ 0 52 65536\r\n",
        &[RPY_START_1, b"SEQ 1 0 65536\r\n"].concat(),
    );
    let body = [&b"\r\n"[..], &[b'x'; 1022]].concat();
    let mut result = Ok(());
    let mut sent = 0u32;
    while result.is_ok() && sent < 64 {
        result = l.feed(&data("MSG", 1, sent, '.', 1024 * sent, &body));
        let _ = l.transmit();
        sent += 1;
    }
    assert_eq!(result, Err(ProtocolError::RepliesNotTaken));
    // Four replies went out, three more were given (past 2048 waiting), then 8 KiB more.
    assert_eq!(sent, 4 + 3 + 9);
}

fn limits_4096() -> Limits {
    Limits {
        recv_window: 4096,
        ..Limits::default()
    }
}

/// BEEP-63/68: data the application accepted but cannot pass on yet may be kept out of the
/// window it advertises (`withhold_window`); replies and the rest of the window still flow,
/// and giving the octets back reopens the window with a SEQ.
#[test]
fn beep_68_withheld_octets_stay_out_of_the_window_until_released() {
    let mut l = listener_ch1_limits(limits_4096(), b"", RPY_START_1);
    let msg = |i: u32, seqno: u32| data("MSG", 1, i, '.', seqno, b"\r\na");
    let rpy = |i: u32, seqno: u32| data("RPY", 1, i, '.', seqno, b"\r\na");
    l.session.withhold_window(1, 3000);
    assert_eq!(l.session.withheld(1), 3000);
    // 700 small MSGs of 3 octets: 2100 octets, answered at once; the free window would have
    // grown by 2100 >= 4096/2, but 3000 of it are withheld: no SEQ.
    let mut input = Vec::new();
    let mut want = Vec::new();
    for i in 0..700u32 {
        input.extend(msg(i, 3 * i));
        want.extend(rpy(i, 3 * i));
    }
    l.feed(&input).unwrap();
    l.expect(&want, "replies, no SEQ while 3000 octets are withheld");
    l.session.release_window(1, 3000);
    assert_eq!(l.session.withheld(1), 0);
    l.expect(b"SEQ 1 2100 4096\r\n", "released: the whole buffer again");
    // Unknown channels and channel 0 are ignored.
    l.session.withhold_window(0, 10);
    l.session.withhold_window(9, 10);
    assert_eq!(l.session.withheld(0) + l.session.withheld(9), 0);
}

/// BEEP-38 and `max_session_assembly`: partial messages on many channels count against one
/// budget per session. A continued MSG that would take the session past it is answered with
/// a pre-emptive ERR 550 and its remaining frames are ignored; the channels' windows alone
/// would let a peer that never finishes its messages make us hold `max_message_size` on each.
#[test]
fn beep_38_partial_messages_share_one_budget_per_session() {
    let limits = Limits {
        max_message_size: 3000,
        max_session_assembly: 3000,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(
        limits,
        SEQ_0_AFTER_GREETING,
        &cat(&[RPY_START_1, SEQ_1_OPEN]),
    );
    l.feed_raw(&data("MSG", 1, 0, '*', 0, &[b'a'; 2000]))
        .unwrap();
    assert_eq!(l.session.assembling(), 2000);
    // 2000 more on the same message would pass the message limit anyway; 900 fit.
    l.feed_raw(&data("MSG", 1, 0, '*', 2000, &[b'b'; 900]))
        .unwrap();
    assert_eq!(l.session.assembling(), 2900);
    // The session lowers its allowance (a runtime sharing a shard budget): the next
    // continued frame does not fit and the message fails pre-emptively.
    l.session.set_assembly_allowance(2950);
    l.feed_raw(&data("MSG", 1, 0, '*', 2900, &[b'c'; 60]))
        .unwrap();
    assert_eq!(l.session.assembling(), 0, "the partial message is dropped");
    l.dispatch();
    let sent = lossy(&l.transmit());
    assert!(sent.starts_with("ERR 1 0 . 0 "), "{sent}");
    assert!(sent.contains("code='550'"), "{sent}");
    // Its last frame is ignored (BEEP-38), and the next message is assembled afresh.
    l.feed_raw(&data("MSG", 1, 0, '.', 2960, b"\r\nend"))
        .unwrap();
    l.feed(&data("MSG", 1, 1, '.', 2965, b"\r\nnext")).unwrap();
    assert_eq!(l.profile.messages.len(), 1);
}

/// `max_transmit` bounds what one `poll_transmit` appends, also when a single channel has
/// many messages queued: it stops after the frame that reaches the budget, and the next call
/// goes on where it stopped.
#[test]
fn max_transmit_bounds_one_poll_of_a_single_busy_channel() {
    let limits = Limits {
        max_transmit: 1024,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(
        limits,
        SEQ_0_AFTER_GREETING,
        &cat(&[RPY_START_1, SEQ_1_OPEN]),
    );
    for _ in 0..10 {
        l.session.send_msg(1, Bytes::from(vec![b'x'; 300])).unwrap();
    }
    let mut polls = Vec::new();
    loop {
        let mut out = BytesMut::new();
        let wrote = l.session.poll_transmit(&mut out);
        if wrote == 0 {
            break;
        }
        polls.push(frames_of(&out).len());
    }
    // A frame of 300 octets is 327 on the wire: the fourth frame crosses 1024.
    assert_eq!(polls, vec![4, 4, 2]);
}

/// BEEP-65: frames of channels with pending traffic go out round-robin.
#[test]
fn beep_65_round_robin_between_channels() {
    let limits = Limits {
        max_send_frame: 1000,
        ..Limits::default()
    };
    let mut l = listener_ch1_limits(
        limits,
        SEQ_0_AFTER_GREETING,
        &cat(&[RPY_START_1, SEQ_1_OPEN]),
    );
    l.feed(checked(b"MSG 0 2 . 168 116\r\nContent-Type: application/beep+xml\r\n\r\n<start number='3'>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</start>\r\nEND\r\n"))
        .unwrap();
    l.expect(
        &cat(&[
            b"RPY 0 2 . 194 83\r\nContent-Type: application/beep+xml\r\n\r\n<profile uri='http://iana.org/beep/APEX' />\r\nEND\r\n",
            b"SEQ 3 0 262144\r\n",
        ]),
        "channel 3",
    );
    l.session
        .send_msg(1, Bytes::from(vec![b'1'; 2500]))
        .unwrap();
    l.session
        .send_msg(3, Bytes::from(vec![b'3'; 2500]))
        .unwrap();
    let heads: Vec<(u32, bool, u32, u32)> = frames_of(&l.transmit())
        .into_iter()
        .map(|f| match f {
            Inbound::Data(f) => (
                f.header.channel,
                f.header.more,
                f.header.seqno,
                f.header.size,
            ),
            Inbound::Seq(s) => panic!("unexpected {s:?}"),
        })
        .collect();
    assert_eq!(
        heads,
        vec![
            (1, true, 0, 1000),
            (3, true, 0, 1000),
            (1, true, 1000, 1000),
            (3, true, 1000, 1000),
            (1, false, 2000, 500),
            (3, false, 2000, 500),
        ]
    );
}

/// The greeting of an edge relay offering TLS, SASL/DIGEST-MD5 and APEX (RFC 3080 §2.3.1.1): 217.
const L_GREETING_217: &[u8] = b"RPY 0 0 . 0 217\r\nContent-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/TLS' />\r\n   <profile uri='http://iana.org/beep/SASL/DIGEST-MD5' />\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\nEND\r\n";

/// BEEP-36 with a bound: answers interleave, so a peer could keep any number of partial answers
/// buffered; past `max_answers_in_progress` for one MSG it is terminated without a reply.
/// Finishing an answer frees its place, and continuing one does not take another.
#[test]
fn beep_36_answers_in_progress_are_bounded() {
    let limits = Limits {
        max_answers_in_progress: 2,
        ..Limits::default()
    };
    let mut l = awaiting_reply_on_channel_3(limits);
    l.feed(&cat(&[
        b"ANS 3 0 * 0 2 0\r\na0END\r\n",
        b"ANS 3 0 * 2 2 1\r\na1END\r\n",
        b"ANS 3 0 * 4 2 0\r\nb0END\r\n",
        b"ANS 3 0 . 6 2 1\r\nb1END\r\n",
        b"ANS 3 0 * 8 2 2\r\na2END\r\n",
    ]))
    .unwrap();
    assert_aborts(
        &mut l,
        b"ANS 3 0 * 10 2 3\r\na3END\r\n",
        ProtocolError::TooManyAnswers(3),
    );
}
