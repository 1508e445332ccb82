//! Frame codec throughput: `apex_proto::beep::frame::parse` and `encode_data_frame` against a
//! memchr baseline, for small (128 B) and page-sized (4 KiB) payloads.
//!
//! Every iteration handles [`FRAMES`] back-to-back MSG frames on one channel with consecutive
//! msgnos and seqnos, the shape of a busy relay's read buffer. Benchmarks per payload size:
//!
//! * `parse`: split every frame off a fresh `BytesMut` (zero-copy payloads). Building the buffer
//!   is setup, not measured; dropping it happens after the measurement too.
//! * `encode`: append the frames to a reused, cleared `BytesMut`.
//! * `encode_vectored`: the connection driver's output path, `put_data_frame` into a
//!   `Vectored` sink that copies payloads under 1 KiB and references larger ones, then the
//!   parts handed over for the `sendmsg` and dropped.
//! * `memchr_scan`: count every LF of the same bytes with `memchr_iter`, the cost of looking at
//!   each octet once with SIMD.
//! * `memchr_headers`: the least any parser must do: find each header line's LF with `memchr`,
//!   then jump over payload and trailer (lengths known in advance, nothing parsed).
//! * `payload_refcount`: one `Bytes` clone and drop per frame, nothing else: what handing out
//!   each payload as a zero-copy `Bytes` costs by itself (one atomic increment, one decrement).
//!
//! `Throughput::Elements` reports frames per second; the `frame_bytes` groups repeat parse and
//! encode with `Throughput::Bytes`.
//!
//! Run: `cargo bench --bench frame` (quick look: `cargo bench --bench frame -- --quick`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use apex_proto::beep::frame::{self, encode_data_frame, put_data_frame, Header, Inbound, Keyword};
use apex_proto::beep::output::Vectored;
use apex_proto::limits::DEFAULT_MAX_HEADER_LINE;
use apexd::shard::conn::SHARED_PAYLOAD_MIN;
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

/// Frames per iteration.
const FRAMES: u32 = 1000;

/// Payload sizes benchmarked, with their group labels.
const SIZES: [(usize, &str); 2] = [(128, "128B"), (4096, "4KiB")];

/// A MIME entity of exactly `size` octets, like a profile message: headers, blank line, body.
fn payload(size: usize) -> Vec<u8> {
    let mut p = b"Content-Type: application/beep+xml\r\n\r\n".to_vec();
    let body = b"<data content='0123456789abcdefghijklmnopqrstuvwxyz' />\r\n";
    while p.len() < size {
        let n = body.len().min(size - p.len());
        p.extend_from_slice(&body[..n]);
    }
    p.truncate(size);
    p
}

/// The header of frame `i`: MSG on channel 1, msgno `i`, seqno after `i` payloads.
fn header(i: u32, size: usize) -> Header {
    Header {
        keyword: Keyword::Msg,
        channel: 1,
        msgno: i,
        more: false,
        seqno: i.wrapping_mul(size as u32),
        size: size as u32,
        ansno: None,
    }
}

/// `FRAMES` encoded frames back to back, and the wire length of each.
fn build(payload: &[u8]) -> (Bytes, Vec<usize>) {
    let mut out = BytesMut::new();
    let mut lengths = Vec::with_capacity(FRAMES as usize);
    for i in 0..FRAMES {
        let before = out.len();
        encode_data_frame(&mut out, &header(i, payload.len()), payload);
        lengths.push(out.len() - before);
    }
    (out.freeze(), lengths)
}

/// Parses every frame off `buf`; returns the frame count and payload octets seen.
fn parse_all(buf: &mut BytesMut) -> (u32, usize) {
    let mut frames = 0;
    let mut octets = 0;
    while let Some(inbound) = frame::parse(buf, DEFAULT_MAX_HEADER_LINE).unwrap() {
        if let Inbound::Data(f) = inbound {
            octets += f.payload.len();
        }
        frames += 1;
    }
    (frames, octets)
}

/// Encodes the `FRAMES` frames into `out`, which is cleared first.
fn encode_all(out: &mut BytesMut, payload: &[u8]) {
    out.clear();
    for i in 0..FRAMES {
        encode_data_frame(out, &header(i, payload.len()), black_box(payload));
    }
}

/// Puts the `FRAMES` frames into `sink` and moves its parts to `parts`, which is cleared first.
fn encode_vectored(sink: &mut Vectored, parts: &mut Vec<Bytes>, payload: &Bytes) {
    parts.clear();
    for i in 0..FRAMES {
        put_data_frame(sink, &header(i, payload.len()), payload, 0..payload.len());
    }
    sink.take(parts);
}

/// The header-line LFs found by `memchr`, jumping over each frame by its known length.
fn memchr_headers(wire: &[u8], lengths: &[usize]) -> usize {
    let mut at = 0;
    let mut found = 0;
    for &len in lengths {
        if let Some(lf) = memchr::memchr(b'\n', &wire[at..]) {
            found += lf;
        }
        at += len;
    }
    found
}

fn bench_frames(c: &mut Criterion) {
    for (size, label) in SIZES {
        let payload = payload(size);
        let (wire, lengths) = build(&payload);

        // Sanity checks, outside any measurement.
        let mut check = BytesMut::from(&wire[..]);
        assert_eq!(parse_all(&mut check), (FRAMES, size * FRAMES as usize));
        assert!(check.is_empty());
        let mut check = BytesMut::new();
        encode_all(&mut check, &payload);
        assert_eq!(&check[..], &wire[..]);

        let shared_payload = Bytes::from(payload.clone());
        let mut sink = Vectored::new(SHARED_PAYLOAD_MIN);
        let mut parts = Vec::new();
        encode_vectored(&mut sink, &mut parts, &shared_payload);
        assert_eq!(parts.concat(), &wire[..]);

        let mut group = c.benchmark_group(format!("frame/{label}"));
        group.throughput(Throughput::Elements(u64::from(FRAMES)));
        // LargeInput keeps few megabyte-sized input buffers alive at once; one iteration is
        // 1000 frames, so the timer overhead per batch is negligible either way.
        group.bench_function("parse", |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    black_box(parse_all(&mut buf));
                    buf // dropped (freeing the buffer) outside the measurement
                },
                BatchSize::LargeInput,
            );
        });
        let mut out = BytesMut::with_capacity(wire.len());
        group.bench_function("encode", |b| {
            b.iter(|| {
                encode_all(&mut out, &payload);
                black_box(out.len())
            });
        });
        // A second handle keeps the count above one, as the read buffer does while parsing.
        let shared = wire.clone();
        group.bench_function("encode_vectored", |b| {
            b.iter(|| {
                encode_vectored(&mut sink, &mut parts, black_box(&shared_payload));
                parts.len()
            });
        });
        group.bench_function("payload_refcount", |b| {
            b.iter(|| {
                let mut octets = 0;
                for _ in 0..FRAMES {
                    octets += black_box(black_box(&shared).clone()).len();
                }
                octets
            });
        });
        group.bench_function("memchr_scan", |b| {
            b.iter(|| memchr::memchr_iter(b'\n', black_box(&wire[..])).count());
        });
        group.bench_function("memchr_headers", |b| {
            b.iter(|| memchr_headers(black_box(&wire[..]), black_box(&lengths)));
        });
        group.finish();

        let mut group = c.benchmark_group(format!("frame_bytes/{label}"));
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function("parse", |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    black_box(parse_all(&mut buf));
                    buf
                },
                BatchSize::LargeInput,
            );
        });
        group.bench_function("encode", |b| {
            b.iter(|| {
                encode_all(&mut out, &payload);
                black_box(out.len())
            });
        });
        group.finish();
    }
}

criterion_group!(benches, bench_frames);
criterion_main!(benches);
