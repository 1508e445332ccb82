//! BEEP frames on the wire: header lines of MSG, RPY, ERR, ANS, NUL and SEQ, payload and trailer
//! (RFC 3080 §2.2.1, RFC 3081 §3.1.3). Bytes to values and back; no channel state.
//!
//! ```text
//! header  = keyword SP channel SP msgno SP more SP seqno SP size [SP ansno] CRLF
//! seq     = "SEQ" SP channel SP ackno SP window CRLF
//! frame   = header payload "END" CRLF        ; payload is exactly `size` octets
//! ```
//!
//! Parsing is strict (exactly one space between fields, digits only, ranges checked) and
//! zero-copy: a frame's payload is a [`Bytes`] slice of the caller's read buffer. Incomplete input
//! is `Ok(None)`, never an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::beep::output::FrameSink;
use crate::error::{Field, FrameError};
use crate::limits::MAX_31BIT;

/// The trailer after every data frame's payload (RFC 3080 §2.2.1.3).
pub const TRAILER: &[u8; 5] = b"END\r\n";

/// Largest seqno/ackno/ansno accepted on input: 2^32 - 1.
const MAX_32BIT: u64 = u32::MAX as u64;

/// Data-frame keywords (RFC 3080 §2.2.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Keyword {
    /// A message (request).
    Msg,
    /// A positive one-to-one reply.
    Rpy,
    /// A negative one-to-one reply.
    Err,
    /// One answer of a one-to-many reply.
    Ans,
    /// The end of a one-to-many reply.
    Nul,
}

impl Keyword {
    /// The three octets on the wire.
    pub fn as_bytes(self) -> &'static [u8; 3] {
        match self {
            Keyword::Msg => b"MSG",
            Keyword::Rpy => b"RPY",
            Keyword::Err => b"ERR",
            Keyword::Ans => b"ANS",
            Keyword::Nul => b"NUL",
        }
    }

    /// True for the reply keywords (everything but MSG).
    pub fn is_reply(self) -> bool {
        self != Keyword::Msg
    }
}

/// A parsed data-frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub keyword: Keyword,
    /// Channel number, 0..=2^31-1.
    pub channel: u32,
    /// Message number, 0..=2^31-1.
    pub msgno: u32,
    /// `*`: more frames of this message follow.
    pub more: bool,
    /// Sequence number of the first payload octet, 0..=2^32-1.
    pub seqno: u32,
    /// Payload length, 0..=2^31-1.
    pub size: u32,
    /// Answer number; present exactly on ANS frames.
    pub ansno: Option<u32>,
}

/// A SEQ frame (RFC 3081 §3.1.3): "expect `ackno` next, accept `window` octets from there".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq {
    /// Channel whose receive window is updated.
    pub channel: u32,
    /// Next seqno the sender of the SEQ expects.
    pub ackno: u32,
    /// Octets it will accept starting at `ackno`, 0..=2^31-1.
    pub window: u32,
}

/// A complete data frame. `payload` shares the read buffer's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header line.
    pub header: Header,
    /// Exactly `header.size` octets.
    pub payload: Bytes,
}

/// A header line recognised at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A data frame; its payload and trailer follow the header line.
    Data(Header),
    /// A SEQ frame; the header line is the whole frame.
    Seq(Seq),
}

/// Anything that arrives on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A data frame.
    Data(Frame),
    /// A SEQ frame.
    Seq(Seq),
}

/// Recognises the header line at the front of `buf`.
///
/// Returns the header and the length of its line including CRLF, `Ok(None)` when the line is
/// not complete yet, or the poorly-formed condition found. A keyword that cannot begin a frame is
/// reported as soon as its first octets arrive, so a peer cannot make us buffer garbage.
#[inline]
pub fn parse_head(buf: &[u8], max_header_line: usize) -> Result<Option<(Head, usize)>, FrameError> {
    if let Some((header, header_len)) = parse_data_head_fast(buf, max_header_line) {
        return Ok(Some((Head::Data(header), header_len)));
    }
    parse_head_general(buf, max_header_line)
}

/// [`parse_head`] without the fast path: every outcome, every poorly-formed condition.
///
/// Public so the fuzz target can check that the fast path agrees with it.
#[doc(hidden)]
pub fn parse_head_general(
    buf: &[u8],
    max_header_line: usize,
) -> Result<Option<(Head, usize)>, FrameError> {
    let window = &buf[..buf.len().min(max_header_line)];
    let Some(lf) = memchr::memchr(b'\n', window) else {
        check_keyword_prefix(window)?;
        if buf.len() >= max_header_line {
            return Err(FrameError::HeaderTooLong);
        }
        return Ok(None);
    };
    // A header line ends in CRLF: a bare LF is a malformed separator.
    if lf == 0 || window[lf - 1] != b'\r' {
        check_keyword_prefix(&window[..lf])?;
        return Err(FrameError::BadField(Field::Layout));
    }
    let head = parse_line(&window[..lf - 1])?;
    Ok(Some((head, lf + 1)))
}

/// Recognises a complete, well-formed data-frame header line in one pass over its octets, the
/// shape of nearly every frame a busy session reads.
///
/// `None` means "not this shape" (incomplete, SEQ, too long or poorly formed) and leaves the
/// verdict to [`parse_head_general`]. On `Some` the result is exactly what the general path
/// returns: the line consists only of the keyword, single spaces, digits and `.`/`*`, so its
/// CRLF is the first LF in the window and every field has been range-checked the same way.
#[inline(always)]
pub fn parse_data_head_fast(buf: &[u8], max_header_line: usize) -> Option<(Header, usize)> {
    let line = &buf[..buf.len().min(max_header_line)];
    let keyword = match line.get(..4)? {
        b"MSG " => Keyword::Msg,
        b"RPY " => Keyword::Rpy,
        b"ERR " => Keyword::Err,
        b"ANS " => Keyword::Ans,
        b"NUL " => Keyword::Nul,
        _ => return None,
    };
    let mut at = 4;
    let channel = fast_number(line, &mut at, MAX_31BIT.into(), b' ')?;
    let msgno = fast_number(line, &mut at, MAX_31BIT.into(), b' ')?;
    let more = match line.get(at..at + 2)? {
        b". " => false,
        b"* " => true,
        _ => return None,
    };
    at += 2;
    let seqno = fast_number(line, &mut at, MAX_32BIT, b' ')?;
    let (size, ansno) = if keyword == Keyword::Ans {
        let size = fast_number(line, &mut at, MAX_31BIT.into(), b' ')?;
        (size, Some(fast_number(line, &mut at, MAX_32BIT, b'\r')?))
    } else {
        (fast_number(line, &mut at, MAX_31BIT.into(), b'\r')?, None)
    };
    if *line.get(at)? != b'\n' || (keyword == Keyword::Nul && (more || size != 0)) {
        return None;
    }
    let header = Header {
        keyword,
        channel,
        msgno,
        more,
        seqno,
        size,
        ansno,
    };
    Some((header, at + 1))
}

/// One decimal field of [`parse_data_head_fast`]: digits from `*at`, at most `max`, then
/// `terminator`, which is consumed too.
///
/// Eight octets are classified and converted at once (a field of under eight digits, nearly
/// every one, needs no loop); the octets after eight digits, or a field too near the end of
/// `line` for a word, are read one at a time. The range is checked once, after the digits: a
/// field of more than [`FAST_MAX_DIGITS`] digits (only possible with leading zeros) is left to
/// the general path, so the arithmetic never overflows for a field this function accepts.
#[inline(always)]
fn fast_number(line: &[u8], at: &mut usize, max: u64, terminator: u8) -> Option<u32> {
    let start = *at;
    let mut end = start;
    let mut value: u64 = 0;
    if let Some(word) = line.get(start..start + 8) {
        let word = u64::from_le_bytes(<[u8; 8]>::try_from(word).ok()?);
        let digits = leading_digits(word);
        if digits == 0 {
            return None;
        }
        // Digit values, the first in the lowest octet; shifted up so the octets below them are
        // leading zeros (the octets after the digits, and any borrow they made, fall off).
        let values = word.wrapping_sub(ASCII_ZEROS) << (8 * (8 - digits));
        value = u64::from(eight_digit_value(values));
        end = start + digits;
        if digits < 8 {
            // At most 99,999,999: within every field's range.
            if line[end] != terminator {
                return None;
            }
            *at = end + 1;
            return Some(value as u32);
        }
    }
    let octet = loop {
        let octet = *line.get(end)?;
        let digit = octet.wrapping_sub(b'0');
        if digit > 9 {
            break octet;
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
        end += 1;
    };
    let digits = end - start;
    if digits == 0 || digits > FAST_MAX_DIGITS || octet != terminator || value > max {
        return None;
    }
    *at = end + 1;
    // `max` never exceeds u32::MAX, so this always succeeds.
    u32::try_from(value).ok()
}

/// How many of the eight octets of `word` (the first in the lowest octet) are ASCII digits
/// before the first that is not.
///
/// An octet is a digit when its high nibble is 3 and stays 3 with 6 added (0x30 to 0x39).
/// Adding 6 carries out of an octet only from 0xFA up, which is not a digit: it can disturb
/// only octets after the first non-digit, which are not counted.
#[inline(always)]
fn leading_digits(word: u64) -> usize {
    const HIGH_NIBBLES: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    let high = word & HIGH_NIBBLES;
    let high_plus_6 = word.wrapping_add(0x0606_0606_0606_0606) & HIGH_NIBBLES;
    let not_digits = (high ^ ASCII_ZEROS) | (high_plus_6 ^ ASCII_ZEROS);
    (not_digits.trailing_zeros() / 8) as usize
}

/// The number whose eight decimal digit values are the octets of `values`, the most
/// significant in the lowest octet: pairs of digits, then pairs of pairs, in every lane at
/// once (no lane exceeds 99, then 9,999, so none reaches into the next).
#[inline(always)]
fn eight_digit_value(values: u64) -> u32 {
    const LOW_OCTETS: u64 = 0x0000_00FF_0000_00FF;
    let pairs = values.wrapping_mul(10).wrapping_add(values >> 8);
    let high = (pairs & LOW_OCTETS).wrapping_mul(100 + (1_000_000 << 32));
    let low = ((pairs >> 16) & LOW_OCTETS).wrapping_mul(1 + (10_000 << 32));
    (high.wrapping_add(low) >> 32) as u32
}

/// The most digits [`fast_number`] reads: every value up to 2^32 - 1 without leading zeros.
const FAST_MAX_DIGITS: usize = 10;

/// Parses one complete frame from the front of `buf`, splitting it off without copying.
///
/// This is the stateless entry point (tests, fuzzing, benchmarks); a session uses
/// [`parse_head`] first so it can check the header against channel state and windows before
/// waiting for a payload.
#[inline]
pub fn parse(buf: &mut BytesMut, max_header_line: usize) -> Result<Option<Inbound>, FrameError> {
    let Some((head, header_len)) = parse_head(buf, max_header_line)? else {
        return Ok(None);
    };
    match head {
        Head::Seq(seq) => {
            let _ = buf.split_to(header_len);
            Ok(Some(Inbound::Seq(seq)))
        }
        Head::Data(header) => Ok(take_payload(buf, header, header_len)?.map(Inbound::Data)),
    }
}

/// Splits a data frame whose header was recognised by [`parse_head`] off `buf` once its payload
/// and trailer are present. The payload is a zero-copy slice (RFC 3080 §2.2.1.3 trailer check).
#[inline]
pub fn take_payload(
    buf: &mut BytesMut,
    header: Header,
    header_len: usize,
) -> Result<Option<Frame>, FrameError> {
    let size = header.size as usize;
    let total = header_len + size + TRAILER.len();
    if buf.len() < total {
        // Reject a wrong trailer as soon as its first octets are visible.
        let seen = &buf[(header_len + size).min(buf.len())..];
        if !TRAILER.starts_with(seen) {
            return Err(FrameError::BadTrailer);
        }
        return Ok(None);
    }
    if &buf[header_len + size..total] != TRAILER {
        return Err(FrameError::BadTrailer);
    }
    // One reference-count increment per frame: split, then narrow to the payload in place.
    let mut frame = buf.split_to(total);
    frame.advance(header_len);
    frame.truncate(size);
    Ok(Some(Frame {
        header,
        payload: frame.freeze(),
    }))
}

/// Fails with P1 when the octets seen so far cannot start any keyword.
fn check_keyword_prefix(seen: &[u8]) -> Result<(), FrameError> {
    const KEYWORDS: [&[u8; 4]; 6] = [b"MSG ", b"RPY ", b"ERR ", b"ANS ", b"NUL ", b"SEQ "];
    let n = seen.len().min(4);
    if KEYWORDS.iter().any(|k| k[..n] == seen[..n]) {
        Ok(())
    } else {
        Err(FrameError::BadKeyword)
    }
}

#[inline]
fn parse_line(line: &[u8]) -> Result<Head, FrameError> {
    if line.len() < 4 || line[3] != b' ' {
        check_keyword_prefix(line)?;
        return Err(FrameError::BadField(Field::Layout));
    }
    let keyword = match &line[..3] {
        b"MSG" => Keyword::Msg,
        b"RPY" => Keyword::Rpy,
        b"ERR" => Keyword::Err,
        b"ANS" => Keyword::Ans,
        b"NUL" => Keyword::Nul,
        b"SEQ" => return parse_seq(&line[4..]).map(Head::Seq),
        _ => return Err(FrameError::BadKeyword),
    };
    let mut fields = Fields::new(&line[4..]);
    let channel = fields.number(Field::Channel, MAX_31BIT.into())?;
    let msgno = fields.number(Field::Msgno, MAX_31BIT.into())?;
    let more = match fields.next_field(Field::More)? {
        b"." => false,
        b"*" => true,
        _ => return Err(FrameError::BadField(Field::More)),
    };
    let seqno = fields.number(Field::Seqno, MAX_32BIT)?;
    let size = fields.number(Field::Size, MAX_31BIT.into())?;
    // The ansno range is 0..2^31-1 in the ABNF but 0..2^32-1 in the prose: accept the wider
    // one on input (RFC 3080 §2.2.1 against §2.2.1.1).
    let ansno = if keyword == Keyword::Ans {
        Some(fields.number(Field::Ansno, MAX_32BIT)?)
    } else {
        None
    };
    fields.finish()?;
    if keyword == Keyword::Nul && (more || size != 0) {
        return Err(FrameError::BadNul);
    }
    Ok(Head::Data(Header {
        keyword,
        channel,
        msgno,
        more,
        seqno,
        size,
        ansno,
    }))
}

#[inline]
fn parse_seq(rest: &[u8]) -> Result<Seq, FrameError> {
    let mut fields = Fields::new(rest);
    let channel = fields.number(Field::Channel, MAX_31BIT.into())?;
    let ackno = fields.number(Field::Ackno, MAX_32BIT)?;
    let window = fields.number(Field::Window, MAX_31BIT.into())?;
    fields.finish()?;
    Ok(Seq {
        channel,
        ackno,
        window,
    })
}

/// The space-separated fields after the keyword, read in one pass. `dangling` records a
/// separator with nothing after it, which makes the line malformed even when no further field is
/// expected.
struct Fields<'a> {
    rest: &'a [u8],
    dangling: bool,
}

impl<'a> Fields<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self {
            rest,
            dangling: false,
        }
    }

    /// Consumes one field and the single space after it.
    #[inline]
    fn next_field(&mut self, field: Field) -> Result<&'a [u8], FrameError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or(self.rest.len());
        if end == 0 {
            return Err(FrameError::BadField(field));
        }
        let value = &self.rest[..end];
        if end < self.rest.len() {
            self.rest = &self.rest[end + 1..];
            self.dangling = self.rest.is_empty();
        } else {
            self.rest = &[];
        }
        Ok(value)
    }

    /// Consumes a decimal field of at most `max`, digits only (leading zeros allowed).
    #[inline(always)]
    fn number(&mut self, field: Field, max: u64) -> Result<u32, FrameError> {
        let mut value: u64 = 0;
        let mut digits = 0usize;
        for &b in self.rest {
            if b == b' ' {
                break;
            }
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return Err(FrameError::BadField(field));
            }
            value = value * 10 + u64::from(d);
            if value > max {
                return Err(FrameError::BadField(field));
            }
            digits += 1;
        }
        if digits == 0 {
            return Err(FrameError::BadField(field));
        }
        if digits < self.rest.len() {
            self.rest = &self.rest[digits + 1..];
            self.dangling = self.rest.is_empty();
        } else {
            self.rest = &[];
        }
        // `max` never exceeds u32::MAX, so the conversion cannot fail.
        u32::try_from(value).map_err(|_| FrameError::BadField(field))
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.rest.is_empty() && !self.dangling {
            Ok(())
        } else {
            Err(FrameError::BadField(Field::Layout))
        }
    }
}

/// "00" to "99": two decimal digits per table lookup.
const DIGIT_PAIRS: [u8; 200] = {
    let mut table = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        table[2 * i] = b'0' + (i / 10) as u8;
        table[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    table
};

/// Every octet of a word set to ASCII `0`: added to digit values 0 to 9 (or'ed, as they never
/// carry), it makes them ASCII digits.
const ASCII_ZEROS: u64 = 0x3030_3030_3030_3030;

/// The eight decimal digit values of `n` (below 10^8, leading zeros included), one per octet,
/// the most significant in the lowest octet (first in memory once stored little-endian).
///
/// The word is split into halves of four digits, each half into pairs, each pair into digits,
/// all lanes at once: a lane's product never reaches the next lane (10^4 x 5243 < 2^32 and
/// 100 x 103 < 2^16), and the multiply-shifts divide exactly in these ranges (checked for
/// every value in the tests).
#[inline(always)]
fn eight_digits(n: u32) -> u64 {
    debug_assert!(n < 100_000_000);
    let halves = u64::from(n / 10_000) | (u64::from(n % 10_000) << 32);
    let hundreds = ((halves * 5243) >> 19) & 0x0000_007F_0000_007F;
    let pairs = hundreds | ((halves - hundreds * 100) << 16);
    let tens = ((pairs * 103) >> 10) & 0x000F_000F_000F_000F;
    tens | ((pairs - tens * 10) << 8)
}

/// The four decimal digit values of `n` (below 10^4), one per octet, the most significant in
/// the lowest: [`eight_digits`] on one half-word (99 x 103 < 2^16 keeps the lanes apart).
#[inline(always)]
fn four_digits(n: u32) -> u32 {
    debug_assert!(n < 10_000);
    let hundreds = (n * 5243) >> 19;
    let pairs = hundreds | ((n - hundreds * 100) << 16);
    let tens = ((pairs * 103) >> 10) & 0x000F_000F;
    tens | ((pairs - tens * 10) << 8)
}

/// Appends `n` in plain decimal (no sign, no leading zeros).
pub fn put_decimal(out: &mut BytesMut, n: u32) {
    Line::append(out, |line| {
        line.number(n);
    });
}

/// A header line written straight into room made at the end of the output buffer, then cut to
/// its length: frames are encoded for every message, and a dozen small appends to the buffer
/// cost more than the line itself. (Building it on the stack and appending it with one copy
/// stalled that copy's wide loads on the narrow stores just made.)
struct Line<'a> {
    /// The line, then room for the eight-octet store of a number written at its end.
    buf: &'a mut [u8; Line::ROOM],
    len: usize,
}

impl Line<'_> {
    /// The longest line: "ANS " and five 10-digit numbers with their separators, CRLF.
    const MAX: usize = 64;
    /// Room for the longest line and a number's eight-octet store past its end.
    const ROOM: usize = Self::MAX + 8;

    /// Appends the line `write` builds to `out`.
    #[inline(always)]
    fn append(out: &mut BytesMut, write: impl FnOnce(&mut Line<'_>)) {
        let start = out.len();
        out.extend_from_slice(&[0; Self::ROOM]);
        // Always there: the room was just appended.
        if let Some(buf) = out[start..].first_chunk_mut() {
            let mut line = Line { buf, len: 0 };
            write(&mut line);
            let len = line.len;
            out.truncate(start + len);
        }
    }

    // Pieces are fixed-size arrays, numbers are written in place and the line is appended as
    // one fixed-size block: building a header makes no calls to memcpy, whose set-up costs
    // more than these few octets (a header is encoded for every frame).
    fn text<const N: usize>(&mut self, text: &[u8; N]) -> &mut Self {
        self.buf[self.len..self.len + N].copy_from_slice(text);
        self.len += N;
        self
    }

    // Up to eight digits are formatted at once in a word (the numbers of a busy channel's
    // headers, seqno and msgno, are long: a loop over digit pairs was most of a header's cost)
    // and stored with one fixed-size write; leading zeros are dropped by shifting them out.
    // Short numbers (a channel, a small size) take a narrower word. Inlined: a header has four
    // numbers, and the call cost as much as a short number.
    #[inline(always)]
    fn number(&mut self, n: u32) -> &mut Self {
        if n < 10 {
            self.buf[self.len] = b'0' + n as u8;
            self.len += 1;
            return self;
        }
        if n < 10_000 {
            let digits = four_digits(n);
            let leading = ((digits.trailing_zeros() / 8) as usize).min(3);
            let shifted = (digits | ASCII_ZEROS as u32) >> (8 * leading);
            self.buf[self.len..self.len + 4].copy_from_slice(&shifted.to_le_bytes());
            self.len += 4 - leading;
            return self;
        }
        if n >= 100_000_000 {
            let top = (n / 100_000_000) as usize; // 1 to 42
            if top >= 10 {
                self.buf[self.len..self.len + 2]
                    .copy_from_slice(&DIGIT_PAIRS[2 * top..2 * top + 2]);
                self.len += 2;
            } else {
                self.buf[self.len] = b'0' + top as u8;
                self.len += 1;
            }
            let digits = eight_digits(n % 100_000_000);
            self.buf[self.len..self.len + 8].copy_from_slice(&(digits | ASCII_ZEROS).to_le_bytes());
            self.len += 8;
            return self;
        }
        let digits = eight_digits(n);
        // Digit values with the most significant in the lowest octet: the zero octets below
        // the first nonzero one are the leading zeros (all eight when n is 0, which keeps one).
        let leading = ((digits.trailing_zeros() / 8) as usize).min(7);
        let shifted = (digits | ASCII_ZEROS) >> (8 * leading);
        self.buf[self.len..self.len + 8].copy_from_slice(&shifted.to_le_bytes());
        self.len += 8 - leading;
        self
    }
}

impl Header {
    /// Appends the header line, CRLF included.
    pub fn encode(&self, out: &mut BytesMut) {
        Line::append(out, |line| {
            line.text(self.keyword.as_bytes())
                .text(b" ")
                .number(self.channel)
                .text(b" ")
                .number(self.msgno)
                .text(if self.more { b" * " } else { b" . " })
                .number(self.seqno)
                .text(b" ")
                .number(self.size);
            if let Some(ansno) = self.ansno {
                line.text(b" ").number(ansno);
            }
            line.text(b"\r\n");
        });
    }
}

impl Frame {
    /// Appends header, payload and trailer.
    pub fn encode(&self, out: &mut BytesMut) {
        encode_data_frame(out, &self.header, &self.payload);
    }
}

/// Appends one data frame; `header.size` is taken from `payload`.
pub fn encode_data_frame(out: &mut BytesMut, header: &Header, payload: &[u8]) {
    out.reserve(64 + payload.len());
    frame_around(out, header, payload.len(), |out| out.put_slice(payload));
}

/// Appends one data frame carrying `payload[range]`, which `out` copies or references (the
/// session's output path); `header.size` is taken from the range.
pub fn put_data_frame(
    out: &mut impl FrameSink,
    header: &Header,
    payload: &Bytes,
    range: std::ops::Range<usize>,
) {
    frame_around(out, header, range.len(), |out| {
        out.put_payload(payload, range)
    });
}

/// Header line, the payload `put` appends (`size` octets), trailer: the one place that knows
/// how a data frame is laid out.
fn frame_around<S: FrameSink>(out: &mut S, header: &Header, size: usize, put: impl FnOnce(&mut S)) {
    Header {
        size: size as u32,
        ..*header
    }
    .encode(out.buffer());
    put(out);
    out.buffer().put_slice(TRAILER);
}

impl Seq {
    /// Appends the SEQ line, CRLF included.
    pub fn encode(&self, out: &mut BytesMut) {
        Line::append(out, |line| {
            line.text(b"SEQ ")
                .number(self.channel)
                .text(b" ")
                .number(self.ackno)
                .text(b" ")
                .number(self.window)
                .text(b"\r\n");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Option<Inbound>, FrameError> {
        parse(&mut BytesMut::from(input), 128)
    }

    #[test]
    fn greeting_rpy_is_parsed_by_size() {
        // RFC 3080 §2.3.1.1, BEEP-01/BEEP-03.
        let wire =
            b"RPY 0 0 . 0 52\r\nContent-Type: application/beep+xml\r\n\r\n<greeting />\r\nEND\r\n";
        let mut buf = BytesMut::from(&wire[..]);
        let Some(Inbound::Data(frame)) = parse(&mut buf, 128).unwrap() else {
            panic!("expected a data frame")
        };
        assert_eq!(frame.header.keyword, Keyword::Rpy);
        assert_eq!(frame.payload.len(), 52);
        assert!(buf.is_empty());
    }

    #[test]
    fn payload_may_contain_end() {
        // RFC 3080 §2.2.1.1, §2.2.1.3: END follows the payload on the same line; parse by size.
        let wire = b"MSG 3 0 * 0 14\r\n\r\nfirst half, END\r\n";
        let Some(Inbound::Data(frame)) = parse_all(wire).unwrap() else {
            panic!()
        };
        assert_eq!(&frame.payload[..], b"\r\nfirst half, ");
        assert!(frame.header.more);
    }

    #[test]
    fn trailing_space_is_rejected() {
        assert_eq!(
            parse_all(b"SEQ 1 2 3 \r\n"),
            Err(FrameError::BadField(Field::Layout))
        );
        assert_eq!(
            parse_all(b"MSG 1 2 . 3 0 \r\nEND\r\n"),
            Err(FrameError::BadField(Field::Layout))
        );
    }

    /// The fast path agrees with the general path on every data header the general path
    /// accepts, and declines everything else (BEEP-01..BEEP-12: it must not accept what the
    /// general path rejects, nor read it differently).
    fn assert_fast_agrees(line: &[u8], max: usize) {
        let general = parse_head_general(line, max);
        match parse_data_head_fast(line, max) {
            Some((header, len)) => assert_eq!(
                general,
                Ok(Some((Head::Data(header), len))),
                "fast path disagrees on {:?}",
                String::from_utf8_lossy(line)
            ),
            // Declining a well-formed header is allowed only for a field padded with leading
            // zeros to more than ten digits.
            None => assert!(
                !matches!(general, Ok(Some((Head::Data(_), _))))
                    || line
                        .split(|&b| !b.is_ascii_digit())
                        .any(|run| run.len() > 10),
                "fast path declined a well-formed header {:?}",
                String::from_utf8_lossy(line)
            ),
        }
    }

    #[test]
    fn fast_header_path_matches_the_general_parser() {
        // BEEP-01 (header layout), BEEP-04..BEEP-08 (ranges) through both paths.
        for line in [
            &b"MSG 1 2 . 3 4\r\n"[..],
            b"RPY 0 0 . 0 52\r\nContent",
            b"ERR 2147483647 2147483647 * 4294967295 2147483647\r\n",
            b"ANS 1 7 . 100 5 4294967295\r\n",
            b"NUL 1 7 . 100 0\r\n",
            b"MSG 0001 02 . 0003 04\r\n",
            b"MSG 1 2 . 00000000004294967295 4\r\n",
            b"MSG 1 2 . 99999999999999999999999 4\r\n",
            b"MSG 1 2 . 18446744073709551616 4\r\n", // 2^64: wraps to 0 if unchecked
            // Fields of eight digits and more, read a word at a time then one octet at a time.
            b"MSG 1 2 . 12345678 4\r\nEND\r\n",
            b"MSG 1 2 . 123456789 4\r\nEND\r\n",
            b"MSG 1 2 . 1234567890 4\r\nEND\r\n",
            b"MSG 1 2 . 0000000012 4\r\nEND\r\n",
            // A field ended by anything but its separator, with a word's worth after it.
            b"MSG 1x2 . 3 4\r\nEND\r\n",
            b"MSG 1 2/3 . 3 4\r\nEND\r\n",
            b"MSG 1 2 . 3:4 5\r\nEND\r\n",
            b"MSG 1 2 . 12345678x9 4\r\nEND\r\n",
            b"MSG 1 2 . 3 4\n\rEND\r\n",
            // Rejected by both: out of range, malformed, NUL with a payload or `*`.
            b"MSG 2147483648 0 . 0 0\r\n",
            b"MSG 1 2 . 4294967296 0\r\n",
            b"MSG 1 2 . 3 2147483648\r\n",
            b"ANS 1 7 . 100 5 4294967296\r\n",
            b"MSG 1 2 . 3 4 5\r\n",
            b"ANS 1 7 . 100 5\r\n",
            b"NUL 1 7 . 100 3\r\n",
            b"NUL 1 7 * 100 0\r\n",
            b"MSG 1 2 + 3 4\r\n",
            b"MSG 1  2 . 3 4\r\n",
            b"MSG 1 2 . 3 4\n",
            b"MSG 1 2 . 3 4\r\r\n",
            b"MSG 1 2 . 3 4 \r\n",
            b"MSG -1 2 . 3 4\r\n",
            b"msg 1 2 . 3 4\r\n",
            b"SEQ 1 2 3\r\n",
            // Incomplete.
            b"MSG 1 2 . 3 4\r",
            b"MSG 1 2 . 3",
            b"MS",
        ] {
            assert_fast_agrees(line, 128);
        }
        // A field padded past ten digits is the general path's to read.
        let padded = b"MSG 1 2 . 00000000004294967295 4\r\n";
        assert_eq!(parse_data_head_fast(padded, 128), None);
        let Ok(Some((Head::Data(header), _))) = parse_head(padded, 128) else {
            panic!("a padded seqno is well formed")
        };
        assert_eq!(header.seqno, u32::MAX);
        // A header longer than the window is the general path's to refuse.
        let long = b"MSG 1 2 . 3 000000000000000000000000000004\r\n";
        assert_eq!(parse_data_head_fast(long, 32), None);
        assert_eq!(parse_head_general(long, 32), Err(FrameError::HeaderTooLong));
    }

    proptest::proptest! {
        #[test]
        fn fast_header_path_agrees_on_any_token_line(
            tokens in proptest::collection::vec(
                proptest::sample::select(vec![
                    "MSG", "RPY", "ERR", "ANS", "NUL", "SEQ", " ", "  ", ".", "*", "0", "7",
                    "42", "2147483647", "2147483648", "4294967295", "4294967296", "0000000001", "18446744073709551616",
                    "\r\n", "\r", "\n", "x", "END",
                ]),
                0..14,
            ),
            max in 4usize..64,
        ) {
            let line = tokens.concat();
            assert_fast_agrees(line.as_bytes(), max);
        }
    }

    #[test]
    fn eight_digits_divides_exactly_in_every_lane() {
        // The two multiply-shift divisions, over their whole input ranges.
        for half in 0..10_000u64 {
            assert_eq!((half * 5243) >> 19, half / 100, "{half}");
        }
        for pair in 0..100u64 {
            assert_eq!((pair * 103) >> 10, pair / 10, "{pair}");
        }
        // Every digit lands in its octet: each position with every digit value.
        for position in 0..8 {
            for digit in 0..10u32 {
                let n = digit * 10u32.pow(7 - position);
                let mut expected = [0u8; 8];
                expected[position as usize] = digit as u8;
                assert_eq!(eight_digits(n).to_le_bytes(), expected, "{n}");
            }
        }
        for n in 0..10_000u32 {
            let expected = format!("{n:04}").into_bytes();
            let digits = (four_digits(n) | ASCII_ZEROS as u32).to_le_bytes();
            assert_eq!(&digits[..], &expected[..], "{n}");
        }
        assert_eq!(
            (eight_digits(12_345_678) | ASCII_ZEROS).to_le_bytes(),
            *b"12345678"
        );
        assert_eq!(
            (eight_digits(99_999_999) | ASCII_ZEROS).to_le_bytes(),
            *b"99999999"
        );
    }

    #[test]
    fn words_of_octets_read_as_their_leading_digits() {
        // Every octet value in every position, after a run of digits: the count stops at the
        // first non-digit whatever follows it (0xFA and up carry when 6 is added).
        for position in 0..8 {
            for octet in 0..=255u8 {
                let mut word = *b"12345678";
                word[position] = octet;
                if position < 7 {
                    word[position + 1] = 0xFF;
                }
                let expected = if octet.is_ascii_digit() {
                    position
                        + 1
                        + word[position + 1..]
                            .iter()
                            .take_while(|b| b.is_ascii_digit())
                            .count()
                } else {
                    position
                };
                assert_eq!(
                    leading_digits(u64::from_le_bytes(word)),
                    expected,
                    "{word:?}"
                );
            }
        }
        for (text, value) in [
            (b"00000000", 0),
            (b"00000001", 1),
            (b"10000000", 10_000_000),
            (b"12345678", 12_345_678),
            (b"99999999", 99_999_999),
            (b"09080706", 9_080_706),
        ] {
            let values = u64::from_le_bytes(*text).wrapping_sub(ASCII_ZEROS);
            assert_eq!(eight_digit_value(values), value, "{text:?}");
        }
    }

    #[test]
    fn decimal_encoding_has_no_leading_zeros() {
        let mut out = BytesMut::new();
        for n in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            101,
            999,
            1000,
            65_535,
            10_000_000,
            99_999_999,
            100_000_000,
            100_000_001,
            999_999_999,
            1_000_000_000,
            1_000_000_009,
            2_147_483_647,
            4_294_967_295,
        ] {
            out.clear();
            put_decimal(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
        // A spread of values of every length (a fixed linear congruential sweep).
        let mut n: u32 = 12_345;
        for _ in 0..20_000 {
            n = n.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = n >> (n % 29);
            out.clear();
            put_decimal(&mut out, v);
            assert_eq!(&out[..], v.to_string().as_bytes());
        }
    }
}
