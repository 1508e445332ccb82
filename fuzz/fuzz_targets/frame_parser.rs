//! Fuzzes the stateless frame parser, `apex_proto::beep::frame::parse`.
//!
//! The input is raw wire bytes. Frames are parsed from the front until the parser asks for more
//! input (`Ok(None)`) or rejects the bytes (`Err`). Checked for every call:
//!
//! * the parser never panics;
//! * `Ok(None)` consumes nothing;
//! * a data frame's payload has exactly `header.size` octets, a NUL carries neither `*` nor a
//!   payload, and an `ansno` is present exactly on ANS frames;
//! * the one-pass header path (`parse_data_head_fast`) never disagrees with the general one;
//! * every frame round-trips: re-encoding it and parsing the result gives the same value and
//!   consumes the whole encoding (the encoding is canonical, so it is never longer than the
//!   header line that was accepted).
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use apex_proto::beep::frame::{self, Inbound, Keyword};
use apex_proto::limits::DEFAULT_MAX_HEADER_LINE;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        if let Some((header, len)) = frame::parse_data_head_fast(&buf, DEFAULT_MAX_HEADER_LINE) {
            assert_eq!(
                frame::parse_head_general(&buf, DEFAULT_MAX_HEADER_LINE),
                Ok(Some((frame::Head::Data(header), len))),
                "the fast header path disagrees with the general one"
            );
        }
        match frame::parse(&mut buf, DEFAULT_MAX_HEADER_LINE) {
            Ok(Some(inbound)) => {
                assert!(buf.len() < before, "a parsed frame must consume input");
                check_frame(&inbound);
                round_trip(&inbound);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) must not consume input");
                break;
            }
            Err(_) => break,
        }
    }
});

fn check_frame(inbound: &Inbound) {
    if let Inbound::Data(f) = inbound {
        let h = &f.header;
        assert_eq!(f.payload.len(), h.size as usize, "payload length != size");
        assert_eq!(
            h.ansno.is_some(),
            h.keyword == Keyword::Ans,
            "ansno present iff ANS"
        );
        if h.keyword == Keyword::Nul {
            assert!(!h.more && h.size == 0, "NUL with '*' or payload accepted");
        }
    }
}

fn round_trip(inbound: &Inbound) {
    let mut wire = BytesMut::new();
    match inbound {
        Inbound::Data(f) => f.encode(&mut wire),
        Inbound::Seq(s) => s.encode(&mut wire),
    }
    let encoded = wire.clone();
    let again = frame::parse(&mut wire, DEFAULT_MAX_HEADER_LINE);
    match again {
        Ok(Some(ref reparsed)) => assert_eq!(
            reparsed, inbound,
            "round trip changed the frame; encoding: {encoded:?}"
        ),
        other => panic!("re-encoded frame did not parse: {other:?}; encoding: {encoded:?}"),
    }
    assert!(
        wire.is_empty(),
        "re-encoded frame left {} octets behind; encoding: {encoded:?}",
        wire.len()
    );
}
