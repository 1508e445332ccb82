//! Fuzzes what the access service and the store read from outside: the `apex=access` elements
//! (`apex_proto::apex::access_ops`), RFC 3339 timestamps, and the store's records as read back
//! from disk (`apex_proto::store::StoreState::load_access` / `load_hold`).
//!
//! The first octet picks the reader; the rest is its input. Checked:
//!
//! * nothing panics;
//! * a request or answer that parses is written back (`format_*`) to text that parses to the
//!   same value (ACC-15: nothing of it, transID included, is lost on the way);
//! * a timestamp that parses is written (UTC, `-00:00`) to one that parses to the same instant,
//!   to the millisecond;
//! * a record that loads counts once: an access entry adds one stored entry, a held message one
//!   held message.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use apex_proto::apex::access::AccessTable;
use apex_proto::apex::access_ops::{format_answer, format_request, parse_answer, parse_request};
use apex_proto::apex::timestamp::Timestamp;
use apex_proto::store::{AccessLimits, StoreState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, rest)) = input.split_first() else {
        return;
    };
    match pick % 5 {
        0 => {
            if let Ok(request) = parse_request(rest) {
                let text = format_request(&request);
                assert_eq!(parse_request(text.as_bytes()), Ok(request), "{text}");
            }
        }
        1 => {
            if let Ok(answer) = parse_answer(rest) {
                let text = format_answer(&answer);
                assert_eq!(parse_answer(text.as_bytes()), Ok(answer), "{text}");
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(at) = Timestamp::parse(text) {
                    let written = at.to_string();
                    let again = Timestamp::parse(&written).unwrap();
                    assert_eq!(again.unix_millis(), at.unix_millis(), "{text} -> {written}");
                }
            }
        }
        3 => {
            let split = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
            let (key, value) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
            let mut state = StoreState::new(AccessTable::new(), AccessLimits::default());
            if state.load_access(key, value).is_ok() {
                assert_eq!(state.access_entries(), 1);
            }
        }
        _ => {
            let mut state = StoreState::new(AccessTable::new(), AccessLimits::default());
            if state.load_hold(7, rest).is_ok() {
                assert_eq!(state.held_messages(), 1);
                assert_eq!(state.held(Timestamp::from_unix_millis(0)).len(), 1);
            }
        }
    }
});
