//! Fuzzes the APEX control-document parser, `apex_proto::apex::msg::parse_message` (a whole
//! BEEP message: `application/beep+xml` or `multipart/related`) and `parse_document` (a bare
//! control document, as piggybacked in a `start`), with `ApexLimits::default()`.
//!
//! The input is the message octets, given to both parsers. Checked for every accepted `data`:
//!
//! * nothing panics;
//! * `Data::payload_for` (what the relay sends onward) gives a message that parses again with
//!   the same parser, as a `data` carrying exactly the chosen recipients (same identities, in
//!   order), exactly the kept per-data options, the same `content`, originator and
//!   `data-content` bytes (APEX-28);
//! * with every recipient and option kept, the received payload itself is returned;
//! * the fast scanner of common `data` documents agrees with the full parser: whatever the
//!   default parsers return, `parse_message_full` / `parse_document_full` (quick-xml only)
//!   return the same for the same input (APEX-21);
//! * whenever `parse_simple_data` (the relay's borrowed view of the common `data`) answers,
//!   `parse_message` returns a `data` with the same originator and one recipient, the same
//!   identities, and no options anywhere;
//! * `parse_simple_data_memo` answers as `parse_simple_data` does: for the input after its own
//!   memo (the common case of a sender's next data) and for a second payload made of the
//!   memo's head and the input cut at a point its first octet picks (other tails).
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use apex_proto::apex::msg::{
    parse_document, parse_document_full, parse_message, parse_message_full, parse_simple_data,
    parse_simple_data_memo, ApexLimits, ApexOption, Data, OpError, Operation, SimpleMemo,
    TargetHop,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

type Parser = fn(&Bytes, &ApexLimits) -> Result<Operation, OpError>;

fuzz_target!(|input: &[u8]| {
    let limits = ApexLimits::default();
    let payload = Bytes::copy_from_slice(input);
    let parsers: [(&str, Parser, Parser); 2] = [
        ("parse_message", parse_message, parse_message_full),
        ("parse_document", parse_document, parse_document_full),
    ];
    for (name, parse, full) in parsers {
        let fast = parse(&payload, &limits);
        let reference = full(&payload, &limits);
        match (&fast, &reference) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}: scanner and full parser differ"),
            (Err(a), Err(b)) => assert_eq!(a.code, b.code, "{name}: error codes differ"),
            _ => panic!("{name}: scanner {fast:?} but full parser {reference:?}"),
        }
        if let Ok(Operation::Data(data)) = fast {
            check_data(name, parse, &data, &limits, input);
        }
    }
    if let Some(simple) = parse_simple_data(&payload, &limits) {
        let Ok(Operation::Data(data)) = parse_message(&payload, &limits) else {
            panic!("simple data that parse_message does not take as data")
        };
        assert_eq!(data.originator.identity, simple.originator);
        assert_eq!(data.recipients.len(), 1);
        assert_eq!(data.recipients[0].identity, simple.recipient);
        assert!(data.options.is_empty());
        assert!(data.originator.options.is_empty() && data.recipients[0].options.is_empty());
    }
    check_memo(&payload, &limits, input);
});

fn check_memo(payload: &Bytes, limits: &ApexLimits, input: &[u8]) {
    let want = parse_simple_data(payload, limits);
    let mut memo = SimpleMemo::default();
    let first = parse_simple_data_memo(payload, limits, &mut memo);
    assert_eq!(first, want.map(|data| (data, false)), "first");
    let recalled = memo.head_len().is_some();
    let again = parse_simple_data_memo(payload, limits, &mut memo);
    assert_eq!(again, want.map(|data| (data, recalled)), "after its memo");
    let Some(text_start) = memo.head_len() else {
        return;
    };
    let cut = text_start + usize::from(input.first().copied().unwrap_or(0)) % (input.len() - text_start + 1);
    let mut other = payload[..text_start].to_vec();
    other.extend_from_slice(&input[cut..]);
    let other = Bytes::from(other);
    assert_eq!(
        parse_simple_data_memo(&other, limits, &mut memo),
        parse_simple_data(&other, limits).map(|data| (data, true)),
        "another tail"
    );
}

/// Recipient subsets to try: all, each one alone, the first half, and a subset picked by the
/// input's octets.
fn subsets(n: usize, input: &[u8]) -> Vec<Vec<usize>> {
    let mut out = vec![(0..n).collect::<Vec<_>>()];
    out.extend((0..n.min(8)).map(|i| vec![i]));
    if n > 1 {
        out.push((0..n / 2).collect());
        out.push((1..n).collect());
    }
    let picked: Vec<usize> = (0..n)
        .filter(|i| input.get(*i).is_some_and(|b| b & 1 == 1))
        .collect();
    if !picked.is_empty() {
        out.push(picked);
    }
    out
}

fn check_data(name: &str, parse: Parser, data: &Data, limits: &ApexLimits, input: &[u8]) {
    let n = data.recipients.len();
    assert!(n >= 1, "{name}: a data without recipients was accepted");

    // Nothing changes: the received payload comes back as is.
    let same = data.payload_for(&(0..n).collect::<Vec<_>>(), |_| true);
    assert_eq!(&same, data.payload(), "{name}: unchanged data was rebuilt");

    let keeps: [(&str, fn(&ApexOption) -> bool); 3] = [
        ("all", |_| true),
        ("none", |_| false),
        ("not this", |o| o.target_hop != TargetHop::This),
    ];
    for subset in subsets(n, input) {
        for (keep_name, keep) in keeps {
            let out = data.payload_for(&subset, keep);
            let again = match parse(&out, limits) {
                Ok(Operation::Data(d)) => d,
                other => panic!(
                    "{name}: payload_for({subset:?}, keep {keep_name}) does not parse again: \
                     {other:?}\ninput: {:?}\noutput: {:?}",
                    String::from_utf8_lossy(data.payload()),
                    String::from_utf8_lossy(&out)
                ),
            };
            let want: Vec<&str> = subset
                .iter()
                .map(|&i| data.recipients[i].identity.as_str())
                .collect();
            let got: Vec<&str> = again
                .recipients
                .iter()
                .map(|r| r.identity.as_str())
                .collect();
            assert_eq!(
                got, want,
                "{name}: recipients after payload_for({subset:?})"
            );
            for (&i, r) in subset.iter().zip(&again.recipients) {
                assert_eq!(
                    r.raw, data.recipients[i].raw,
                    "{name}: recipient element changed"
                );
            }
            let kept: Vec<&Bytes> = data
                .options
                .iter()
                .filter(|o| keep(o))
                .map(|o| &o.raw)
                .collect();
            let got_options: Vec<&Bytes> = again.options.iter().map(|o| &o.raw).collect();
            assert_eq!(
                got_options, kept,
                "{name}: per-data options (keep {keep_name})"
            );
            assert_eq!(
                again.content, data.content,
                "{name}: content reference changed"
            );
            assert_eq!(
                again.originator.raw, data.originator.raw,
                "{name}: originator changed"
            );
            assert_eq!(
                again.data_content, data.data_content,
                "{name}: data-content changed"
            );
        }
    }
}
