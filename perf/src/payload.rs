//! The load payload: what a sender puts in each message and a receiver reads back.
//!
//! ```text
//!   <seq> SP <sent_ns> SP xxxxxxxx...x      exactly `size` octets
//! ```
//!
//! Both numbers are decimal digits: `seq` counts a sender's messages from 0, `sent_ns` is the
//! send time in nanoseconds since the run's shared epoch (one `Instant` for every thread). The
//! padding is `x`, so the whole payload is plain text that needs no XML escaping and can be
//! embedded as it is in an APEX `data-content` element (or any other target's message body).

use bytes::{BufMut, BytesMut};

/// Octets used for padding.
const PAD: u8 = b'x';

/// The longest header: two 20-digit numbers, each followed by a space.
const MAX_HEADER: usize = 42;

/// Smallest `size` that always holds the header.
pub(crate) const MIN_SIZE: usize = MAX_HEADER;

/// What a payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The sender's sequence number, from 0.
    pub(crate) seq: u64,
    /// Send time, nanoseconds since the run's epoch.
    pub(crate) sent_ns: u64,
}

/// Appends the payload for `stamp` to `out`: exactly `size` octets when `size >= MIN_SIZE`
/// (shorter sizes get the bare header, which is then longer than `size`).
pub(crate) fn encode(out: &mut BytesMut, stamp: Stamp, size: usize) {
    let start = out.len();
    put_decimal(out, stamp.seq);
    out.put_u8(b' ');
    put_decimal(out, stamp.sent_ns);
    out.put_u8(b' ');
    let written = out.len() - start;
    out.put_bytes(PAD, size.saturating_sub(written));
}

/// Reads the stamp at the front of `text` (anything may follow the header).
pub(crate) fn decode(text: &[u8]) -> Option<Stamp> {
    let (seq, rest) = take_decimal(text)?;
    let (sent_ns, _) = take_decimal(rest)?;
    Some(Stamp { seq, sent_ns })
}

fn put_decimal(out: &mut BytesMut, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// Digits up to a space; returns the value and what follows the space.
fn take_decimal(text: &[u8]) -> Option<(u64, &[u8])> {
    let end = text.iter().position(|b| *b == b' ')?;
    if end == 0 || end > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &b in &text[..end] {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((value, &text[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(stamp: Stamp, size: usize) -> BytesMut {
        let mut out = BytesMut::new();
        encode(&mut out, stamp, size);
        out
    }

    #[test]
    fn round_trip_at_exact_size() {
        for (seq, sent_ns) in [
            (0, 0),
            (1, 999),
            (123_456, 5_000_000_123),
            (u64::MAX, u64::MAX),
        ] {
            for size in [MIN_SIZE, 64, 128, 4096] {
                let stamp = Stamp { seq, sent_ns };
                let out = encoded(stamp, size);
                assert_eq!(out.len(), size);
                assert_eq!(decode(&out), Some(stamp));
                assert!(out.iter().all(|b| b.is_ascii_alphanumeric() || *b == b' '));
            }
        }
    }

    #[test]
    fn layout_is_decimal_then_padding() {
        let out = encoded(
            Stamp {
                seq: 7,
                sent_ns: 1200,
            },
            16,
        );
        assert_eq!(&out[..], b"7 1200 xxxxxxxxx");
        // Too small a size: the header is kept whole.
        let out = encoded(
            Stamp {
                seq: 7,
                sent_ns: 1200,
            },
            2,
        );
        assert_eq!(&out[..], b"7 1200 ");
    }

    #[test]
    fn garbage_does_not_decode() {
        for text in [
            &b""[..],
            b"7",
            b"7 ",
            b" 7 8 ",
            b"7 x8 ",
            b"-1 5 ",
            b"18446744073709551616 1 ",
            b"1 123456789012345678901 ",
        ] {
            assert_eq!(decode(text), None, "{}", String::from_utf8_lossy(text));
        }
    }
}
