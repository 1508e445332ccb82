//! Fuzzes a listener `Session` driven the way the runtime drives it.
//!
//! Input layout: one control byte, then the octets the peer sends.
//!
//! ```text
//!   bit 7    prepend a valid client greeting so the fuzzer starts past it
//!   bit 6    tight limits (small messages, windows of frames, few channels and pending replies)
//!   bit 5    probe: send a MSG on every channel as soon as it starts, so the peer's RPY, ERR,
//!            ANS and NUL frames have something to answer
//!   bit 4    manual: the echo profile does not answer MSGs (replies pile up)
//!   bits 0-3 chunk size index into CHUNKS: the input is fed in pieces of that size
//! ```
//!
//! After every chunk: `handle_input`, then events go through a `Dispatcher` with an
//! `EchoProfile` (accepts starts, echoes MSGs), then `poll_transmit` is drained. Stops at the
//! first protocol error. Checked:
//!
//! * nothing panics;
//! * after an error the session writes nothing more;
//! * everything the session writes is a sequence of complete, well-formed frames.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use apex_proto::beep::frame::{self, Inbound};
use apex_proto::testing::{Dispatcher, EchoProfile};
use apex_proto::{Limits, Role, Session, SessionConfig};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

use apex_proto::apex::relay::APEX_PROFILE as APEX;

const GREETING: &[u8] =
    b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";

const CHUNKS: [usize; 16] = [
    usize::MAX,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    13,
    16,
    31,
    64,
    100,
    256,
    1000,
    4096,
];

const PROBE: &[u8] = b"Content-Type: application/octet-stream\r\n\r\nprobe";

fn tight_limits() -> Limits {
    Limits {
        max_header_line: 64,
        recv_window: 4096,
        max_message_size: 256,
        max_send_frame: 16,
        max_channels: 2,
        max_pending_replies: 2,
        max_answers_in_progress: 2,
        max_outstanding_msgs: 2,
        max_queued_octets: 512,
        max_piggyback: 64,
        max_transmit: 1024,
        max_xml_depth: 2,
        max_xml_attributes: 4,
        max_session_assembly: 512,
        max_queued_replies: 512,
        max_unanswered_octets: 1024,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let greeting = control & 0x80 != 0;
    let tight = control & 0x40 != 0;
    let probe = control & 0x20 != 0;
    let manual = control & 0x10 != 0;
    let chunk = CHUNKS[usize::from(control & 0x0f)];

    let limits = if tight {
        tight_limits()
    } else {
        Limits::default()
    };
    assert_eq!(limits.validate(), Ok(()));
    let max_header_line = limits.max_header_line.max(128);
    let mut session = Session::new(
        Role::Listener,
        SessionConfig {
            profiles: vec![APEX.to_owned()],
            limits,
            ..SessionConfig::default()
        },
    );
    let mut profile = EchoProfile::new(APEX);
    profile.manual = manual;
    let mut probed = 0;

    let mut input = Vec::with_capacity(GREETING.len() + rest.len());
    if greeting {
        input.extend_from_slice(GREETING);
    }
    input.extend_from_slice(rest);

    let mut now = Instant::now();
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();

    // The greeting goes out before anything is read.
    drain_output(&mut session, &mut out, max_header_line);

    for piece in input.chunks(chunk) {
        now += Duration::from_millis(1);
        inbuf.extend_from_slice(piece);
        if session.handle_input(&mut inbuf, now).is_err() {
            out.clear();
            assert_eq!(
                session.poll_transmit(&mut out),
                0,
                "a terminated session must not write"
            );
            assert!(session.is_finished(), "a terminated session is finished");
            return;
        }
        Dispatcher::new(vec![&mut profile]).dispatch(&mut session, |_, _| {});
        if probe {
            for &(channel, _) in &profile.started[probed..] {
                let _ = session.send_msg(channel, Bytes::from_static(PROBE));
            }
            probed = profile.started.len();
        }
        drain_output(&mut session, &mut out, max_header_line);
        if session.is_finished() {
            return;
        }
    }
});

/// Drains `poll_transmit` and checks the octets are whole, well-formed frames.
fn drain_output(session: &mut Session, out: &mut BytesMut, max_header_line: usize) {
    out.clear();
    while session.poll_transmit(out) > 0 {}
    while !out.is_empty() {
        match frame::parse(out, max_header_line) {
            Ok(Some(Inbound::Data(_) | Inbound::Seq(_))) => {}
            Ok(None) => panic!("session wrote a partial frame: {out:?}"),
            Err(e) => panic!("session wrote a malformed frame ({e}): {out:?}"),
        }
    }
}
