//! Where a session's outgoing frames are written ([`FrameSink`]): one contiguous `BytesMut`, or
//! [`Vectored`] output that references large payloads instead of copying them.
//!
//! A relay's payloads already sit in memory as `Bytes` (slices of the buffer they were read
//! into). Copying each one into a write buffer doubles the memory traffic of relaying large
//! messages; with [`Vectored`] output the frame headers and trailers are still coalesced, but
//! a payload of at least `shared_min` octets ([`Vectored::new`]) goes to the socket from where it is,
//! in one vectored write with the rest.

use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};

/// The destination of [`Session::poll_transmit`](super::session::Session::poll_transmit).
pub trait FrameSink {
    /// The buffer headers, trailers and small payloads are appended to.
    fn buffer(&mut self) -> &mut BytesMut;
    /// Appends `payload[range]` as a frame payload: copied, or referenced.
    fn put_payload(&mut self, payload: &Bytes, range: std::ops::Range<usize>);
    /// Octets appended so far.
    fn written(&self) -> usize;
}

impl FrameSink for BytesMut {
    fn buffer(&mut self) -> &mut BytesMut {
        self
    }

    fn put_payload(&mut self, payload: &Bytes, range: std::ops::Range<usize>) {
        self.put_slice(&payload[range]);
    }

    fn written(&self) -> usize {
        self.len()
    }
}

/// Output as a list of parts written with one vectored write: coalesced small frames, and the
/// large payloads themselves.
#[derive(Debug)]
pub struct Vectored {
    /// Finished parts, in wire order.
    parts: Vec<Bytes>,
    /// Octets in `parts`.
    parts_len: usize,
    /// The part being coalesced.
    buf: BytesMut,
    shared_min: usize,
    /// Octets coalesced into `buf` since the last [`Vectored::take`].
    round_coalesced: usize,
    /// The most octets a round has coalesced, up to [`MAX_ROUND_ROOM`]: the room
    /// [`Vectored::make_room`] makes, so that a round as large as one before it fits.
    largest_round: usize,
}

/// The most coalescing room a round is given ahead of time, however large rounds were. After a
/// larger round the buffer is let go (its memory is freed once that round's parts are written):
/// a burst of output does not pin its memory for the connection's life.
pub const MAX_ROUND_ROOM: usize = 1024 * 1024;

impl Vectored {
    /// Payloads of at least `shared_min` octets are referenced, smaller ones copied. Below a
    /// few hundred octets an extra part costs the kernel more than the copy it saves.
    pub fn new(shared_min: usize) -> Self {
        Self {
            parts: Vec::new(),
            parts_len: 0,
            buf: BytesMut::new(),
            shared_min: shared_min.max(1),
            round_coalesced: 0,
            largest_round: 0,
        }
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.buf.is_empty()
    }

    /// Octets to write.
    pub fn len(&self) -> usize {
        self.parts_len + self.buf.len()
    }

    /// Makes coalescing space ahead of a round of output, while the buffer is empty: `room`
    /// octets, or as many as the largest round before took. Growing it later, with frames in
    /// it, would copy them, and with them everything written from the buffer before (the
    /// buffer grows as a whole). Once the last round's parts are gone, this takes the buffer's
    /// memory back from its start, which copies nothing when it already holds that much room
    /// (growing it copies what was written from it, once).
    pub fn make_room(&mut self, room: usize) {
        let room = room.max(self.largest_round);
        if self.buf.is_empty() && self.buf.capacity() < room {
            self.buf.reserve(room);
        }
    }

    /// Takes everything to write, in order, leaving this empty (its buffer keeps its memory
    /// once the parts are dropped, unless the round was larger than [`MAX_ROUND_ROOM`]).
    pub fn take(&mut self, into: &mut Vec<Bytes>) {
        self.seal();
        into.append(&mut self.parts);
        self.parts_len = 0;
        if self.round_coalesced > MAX_ROUND_ROOM {
            // The parts alone hold the burst's memory now: it is freed once they are written.
            self.buf = BytesMut::new();
        }
        self.largest_round = self
            .largest_round
            .max(self.round_coalesced)
            .min(MAX_ROUND_ROOM);
        self.round_coalesced = 0;
    }

    /// Lets the coalescing buffer's memory go while there is nothing to write, for a
    /// connection about to wait: an idle session keeps no room (ten thousand of them would
    /// otherwise pin a round's room each, for as long as they stay open). The parts already
    /// taken keep what they use until they are written. The next [`Vectored::make_room`]
    /// makes room again, as much as before.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Octets of coalescing room the buffer holds (what an idle connection keeps).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.round_coalesced += self.buf.len();
            let part = self.buf.split().freeze();
            self.parts_len += part.len();
            self.parts.push(part);
        }
    }
}

impl FrameSink for Vectored {
    fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn put_payload(&mut self, payload: &Bytes, range: std::ops::Range<usize>) {
        if range.len() < self.shared_min {
            self.buf.put_slice(&payload[range]);
            return;
        }
        self.seal();
        self.parts_len += range.len();
        self.parts.push(payload.slice(range));
    }

    fn written(&self) -> usize {
        self.len()
    }
}

/// The slices one vectored write is given: up to [`MAX_SLICES`] of `parts`, skipping the first
/// `offset` octets of `parts[0]`.
pub fn io_slices(parts: &[Bytes], offset: usize) -> smallvec::SmallVec<[IoSlice<'_>; MAX_SLICES]> {
    let mut into = smallvec::SmallVec::new();
    for (i, part) in parts.iter().take(MAX_SLICES).enumerate() {
        let part = if i == 0 {
            part.get(offset..).unwrap_or_default()
        } else {
            &part[..]
        };
        into.push(IoSlice::new(part));
    }
    into
}

/// Most slices per vectored write (far below the kernel's IOV_MAX of 1024).
pub const MAX_SLICES: usize = 64;

/// Drops the first `n` written octets from `parts`/`offset` (as advanced by a vectored write).
pub fn advance(parts: &mut Vec<Bytes>, offset: &mut usize, mut n: usize) {
    let mut done = 0;
    for part in parts.iter() {
        let left = part.len() - *offset;
        if n < left {
            *offset += n;
            break;
        }
        n -= left;
        *offset = 0;
        done += 1;
    }
    parts.drain(..done);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_are_copied_large_ones_referenced() {
        let large = Bytes::from(vec![b'x'; 2000]);
        let mut out = Vectored::new(1024);
        out.buffer().put_slice(b"HDR1\r\n");
        out.put_payload(&Bytes::from_static(b"small"), 0..5);
        out.buffer().put_slice(b"END\r\nHDR2\r\n");
        out.put_payload(&large, 500..2000);
        out.buffer().put_slice(b"END\r\n");
        assert_eq!(out.len(), 6 + 5 + 11 + 1500 + 5);
        let mut parts = Vec::new();
        out.take(&mut parts);
        assert!(out.is_empty());
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[0][..], b"HDR1\r\nsmallEND\r\nHDR2\r\n");
        // The large payload is the very memory it was given, not a copy.
        assert_eq!(parts[1].as_ptr(), large[500..].as_ptr());
        assert_eq!(parts[1].len(), 1500);
        assert_eq!(&parts[2][..], b"END\r\n");
    }

    #[test]
    fn room_made_ahead_of_a_round_is_filled_without_moving() {
        let mut out = Vectored::new(1024);
        let mut parts = Vec::new();
        // A previous round leaves the buffer with little room.
        out.buffer().put_slice(&[b'a'; 100]);
        out.take(&mut parts);
        parts.clear();
        out.make_room(8192);
        assert!(out.buffer().capacity() >= 8192);
        let start = out.buffer().as_ptr();
        for _ in 0..64 {
            out.put_payload(&Bytes::from_static(&[b'x'; 128]), 0..128);
        }
        assert_eq!(
            out.buffer().as_ptr(),
            start,
            "the buffer grew in the middle of the round"
        );
        assert_eq!(out.len(), 64 * 128);
        // With frames already in it, no room is made: that would copy them.
        let capacity = out.buffer().capacity();
        out.make_room(capacity * 4);
        assert_eq!(out.buffer().capacity(), capacity);
    }

    /// A round larger than the room asked for is given room for the next one like it ahead of
    /// time: with frames in the buffer, growing it copies them and everything written from the
    /// buffer before them.
    #[test]
    fn a_round_as_large_as_the_last_does_not_grow_the_buffer() {
        const ROOM: usize = 32 * 1024;
        const ROUND: usize = 90 * 1024;
        let payload = Bytes::from_static(&[b'x'; 128]);
        let mut out = Vectored::new(1024);
        let mut parts = Vec::new();
        // Whether the round found room for all of it made ahead of time, and kept to it.
        let mut round = |out: &mut Vectored| {
            out.make_room(ROOM);
            let room_ahead = out.buffer().capacity() >= ROUND;
            let start = out.buffer().as_ptr();
            for _ in 0..ROUND / 128 {
                out.put_payload(&payload, 0..128);
            }
            let stayed = out.buffer().as_ptr() == start;
            out.take(&mut parts);
            assert_eq!(parts.iter().map(Bytes::len).sum::<usize>(), ROUND);
            parts.clear(); // written
            room_ahead && stayed
        };
        assert!(
            !round(&mut out),
            "the first round had room for {ROUND} octets"
        );
        for n in 2..5 {
            assert!(round(&mut out), "round {n} grew the buffer");
        }
    }

    /// A round larger than [`MAX_ROUND_ROOM`] does not keep its memory: the next round starts
    /// in a buffer of the bounded size.
    #[test]
    fn a_burst_larger_than_the_bound_lets_its_memory_go() {
        const ROOM: usize = 32 * 1024;
        let payload = Bytes::from_static(&[b'x'; 1000]);
        let mut out = Vectored::new(4096);
        let mut parts = Vec::new();
        out.make_room(ROOM);
        for _ in 0..2 * MAX_ROUND_ROOM / 1000 {
            out.put_payload(&payload, 0..1000);
        }
        out.take(&mut parts);
        parts.clear(); // written
        out.make_room(ROOM);
        let capacity = out.buffer().capacity();
        assert!(
            (ROOM..=MAX_ROUND_ROOM).contains(&capacity),
            "{capacity} octets of room after a burst"
        );
    }

    /// A connection that goes idle keeps no coalescing room, and its next round gets as much
    /// room ahead of time as the largest before; one with output still to write keeps it.
    #[test]
    fn an_idle_connection_keeps_no_room_and_gets_it_back_for_its_next_round() {
        const ROOM: usize = 32 * 1024;
        let payload = Bytes::from_static(&[b'x'; 128]);
        let mut out = Vectored::new(1024);
        let mut parts = Vec::new();
        out.make_room(ROOM);
        for _ in 0..(48 * 1024) / 128 {
            out.put_payload(&payload, 0..128);
        }
        out.release();
        assert_eq!(out.len(), 48 * 1024, "output still to write is kept");
        out.take(&mut parts);
        let written = parts[0].clone();
        parts.clear();
        out.release();
        assert_eq!(out.capacity(), 0, "an idle connection holds no room");
        assert_eq!(written.len(), 48 * 1024, "what was taken is not touched");
        out.make_room(ROOM);
        assert!(
            out.capacity() >= 48 * 1024,
            "the next round has room for one as large as the last: {}",
            out.capacity()
        );
    }

    #[test]
    fn advance_walks_partial_writes() {
        let mut parts = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"h"),
        ];
        let mut offset = 0;
        advance(&mut parts, &mut offset, 2);
        let seen: Vec<Vec<u8>> = io_slices(&parts, offset)
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(seen, [&b"c"[..], b"defg", b"h"]);
        advance(&mut parts, &mut offset, 3);
        assert_eq!((parts.len(), offset), (2, 2));
        let seen: Vec<Vec<u8>> = io_slices(&parts, offset)
            .iter()
            .map(|s| s.to_vec())
            .collect();
        assert_eq!(seen, [&b"fg"[..], b"h"]);
        let many = vec![Bytes::from_static(b"x"); MAX_SLICES + 3];
        assert_eq!(io_slices(&many, 0).len(), MAX_SLICES);
        advance(&mut parts, &mut offset, 3);
        assert!(parts.is_empty());
        assert_eq!(offset, 0);
    }
}
