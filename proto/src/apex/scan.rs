//! A hand-written scanner for the common shape of a `data` control document: one `content`
//! attribute, an `originator` and `recipient`s with one `identity` attribute each and no
//! options, an optional `data-content` holding text only, ASCII whitespace between elements:
//!
//! ```text
//! <data content='#Content'>
//!    <originator identity='fred@example.com' />
//!    <recipient identity='barney@example.com' />
//!    <data-content Name='Content'>hello, barney</data-content>
//! </data>
//! ```
//!
//! It answers `None` as soon as the input strays from that shape (a comment, an option, an
//! entity reference, another attribute, any markup inside `data-content`...), and the full
//! parser (quick-xml) then decides, errors included. So the scanner only ever has to be right
//! about documents it accepts: the `apex_msg` fuzz target checks that for each of them the full
//! parser returns the same [`Data`](super::msg::Data). It exists because relaying data is the
//! hot path, and the general parser spent most of a relayed message's instructions.

use std::ops::Range;

use bytes::Bytes;

use compact_str::CompactString;

use super::msg::{names_data_content, ApexLimits, Party, Recipients};

/// What the scanner found, borrowed from the payload: identities and names as `&str` slices of
/// the document, elements as ranges of the payload. Nothing is allocated or counted.
pub(super) struct View<'a> {
    pub content: &'a str,
    pub originator: Element<'a>,
    pub recipients: smallvec::SmallVec<[Element<'a>; 1]>,
    /// The `data-content` element's range and `Name`.
    pub data_content: Option<(Range<usize>, &'a str)>,
    pub start_tag: Range<usize>,
    /// Where the `data-content` text starts, when the element has a start tag: everything
    /// before is the document's head, which [`tail`] does not need to see again.
    pub head_end: Option<usize>,
}

/// An `originator` or `recipient` element: its identity and where it sits in the payload.
pub(super) struct Element<'a> {
    pub identity: &'a str,
    pub raw: Range<usize>,
}

impl View<'_> {
    /// Whether `content` is `#Name` for the `data-content` element's `Name`.
    pub(super) fn content_names_data_content(&self) -> bool {
        names_data_content(
            self.content,
            self.data_content.as_ref().map(|(_, name)| *name),
        )
    }
}

/// What the scanner found, owned; the caller assembles the `Data`.
pub(super) struct Scanned {
    pub content: CompactString,
    pub originator: Party,
    pub recipients: Recipients,
    /// The `data-content` element as received.
    pub data_content: Option<Bytes>,
    /// Whether `content` is `#Name` for that element's `Name`.
    pub content_names_data_content: bool,
    pub start_tag: Range<usize>,
}

struct Cursor<'a> {
    payload: &'a [u8],
    /// The control document, already checked to be UTF-8: values are sliced from it.
    doc: &'a str,
    /// Where `doc` starts in `payload`.
    base: usize,
    pos: usize,
    end: usize,
    limits: ApexLimits,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &[u8] {
        &self.payload[self.pos..self.end]
    }

    fn skip_space(&mut self) {
        while self.pos < self.end && is_space(self.payload[self.pos]) {
            self.pos += 1;
        }
    }

    // Literals are fixed-size arrays: compared inline, where a slice comparison is a call to
    // memcmp for a handful of octets.
    fn eat<const N: usize>(&mut self, literal: &[u8; N]) -> bool {
        if self.rest().first_chunk::<N>() == Some(literal) {
            self.pos += N;
            true
        } else {
            false
        }
    }

    /// At `<name` followed by whitespace?
    fn at_tag<const N: usize>(&self, name: &[u8; N]) -> bool {
        let rest = self.rest();
        rest.len() > N + 1
            && rest[0] == b'<'
            && rest[1..].first_chunk::<N>() == Some(name)
            && is_space(rest[N + 1])
    }

    /// `<name attr='value'` then `/>` or `>`: the value and whether the element was empty.
    /// The value must hold neither `<` nor `&` (so it needs no unescaping) and fit the limits.
    fn start_tag<const N: usize, const A: usize>(
        &mut self,
        name: &[u8; N],
        attr: &[u8; A],
    ) -> Option<(&'a str, bool)> {
        if !self.at_tag(name) || self.limits.max_attributes < 1 {
            return None;
        }
        self.pos += 1 + N;
        self.skip_space();
        if !self.eat(attr) || !self.eat(b"=") {
            return None;
        }
        let quote = *self.rest().first()?;
        if quote != b'\'' && quote != b'"' {
            return None;
        }
        self.pos += 1;
        // One pass to the closing quote, refusing what would need unescaping or is not XML.
        let len = value_end(self.rest(), quote)?;
        if self.rest()[len] != quote || len > self.limits.max_attribute_len {
            return None;
        }
        // Between two ASCII quotes of a UTF-8 document: a whole string, no check needed.
        let doc = self.doc;
        let value = doc.get(self.pos - self.base..self.pos - self.base + len)?;
        self.pos += len + 1;
        self.skip_space();
        if self.eat(b"/>") {
            Some((value, true))
        } else if self.eat(b">") {
            Some((value, false))
        } else {
            None
        }
    }

    /// An `originator` or `recipient` without options: `<name identity='...' />`.
    fn element<const N: usize>(&mut self, name: &[u8; N]) -> Option<Element<'a>> {
        let at = self.pos;
        let (identity, empty) = self.start_tag(name, b"identity")?;
        empty.then_some(Element {
            identity,
            raw: at..self.pos,
        })
    }

    /// `<data-content Name='...'>text</data-content>` (or empty), text without markup or
    /// entity references: the element and its name.
    /// Also returns where the text starts (`None` for an empty element).
    fn data_content(&mut self) -> Option<(Range<usize>, &'a str, Option<usize>)> {
        let at = self.pos;
        let (name, empty) = self.start_tag(b"data-content", b"Name")?;
        let mut text_start = None;
        if !empty {
            text_start = Some(self.pos);
            self.data_content_text()?;
        }
        Some((at..self.pos, name, text_start))
    }

    /// Text without markup or entity references, then `</data-content>`.
    fn data_content_text(&mut self) -> Option<()> {
        let text = memchr::memchr2(b'<', b'&', self.rest())?;
        if self.rest()[text] != b'<' {
            return None;
        }
        self.pos += text;
        self.eat(b"</data-content>").then_some(())
    }

    /// `</data>` and nothing after it but whitespace.
    fn data_end(&mut self) -> Option<()> {
        if !self.eat(b"</data>") {
            return None;
        }
        self.skip_space();
        (self.pos == self.end).then_some(())
    }
}

/// The index of the first `quote`, `<` or `&` in `text`.
///
/// Values are a few dozen octets: too short for a vector search to pay for its set-up, long
/// enough that a loop over single octets showed in profiles (inlined into the scanner, its
/// state lived on the stack). Eight octets are tested at a time, as one word: a lane equals
/// `c` when `word ^ c` has a zero octet there, and the classic has-zero test marks the first
/// such lane exactly (its false positives only ever follow a true zero).
#[inline(never)]
fn value_end(text: &[u8], quote: u8) -> Option<usize> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(LOW) & !v & HIGH;
    let (quote, lt, amp) = (
        LOW * u64::from(quote),
        LOW * u64::from(b'<'),
        LOW * u64::from(b'&'),
    );
    let mut chunks = text.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let found = has_zero(word ^ quote) | has_zero(word ^ lt) | has_zero(word ^ amp);
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let tail = chunks.remainder();
    let quote = quote as u8;
    tail.iter()
        .position(|&b| b == quote || b == b'<' || b == b'&')
        .map(|i| offset + i)
}

/// Scans the control document `doc`, found at `control` in `payload`, into owned parts.
pub(super) fn data(
    payload: &Bytes,
    doc: &str,
    control: Range<usize>,
    limits: &ApexLimits,
) -> Option<Scanned> {
    let view = view(payload, doc, control, limits)?;
    let party = |element: &Element<'_>| Party {
        identity: CompactString::new(element.identity),
        options: Vec::new(),
        raw: payload.slice(element.raw.clone()),
    };
    Some(Scanned {
        content_names_data_content: view.content_names_data_content(),
        content: CompactString::new(view.content),
        originator: party(&view.originator),
        recipients: view.recipients.iter().map(party).collect(),
        data_content: view.data_content.map(|(raw, _)| payload.slice(raw)),
        start_tag: view.start_tag,
    })
}

/// Scans the control document `doc`, found at `control` in `payload`, borrowing from both.
pub(super) fn view<'a>(
    payload: &'a [u8],
    doc: &'a str,
    control: Range<usize>,
    limits: &ApexLimits,
) -> Option<View<'a>> {
    let mut c = Cursor {
        payload,
        doc,
        base: control.start,
        pos: control.start,
        end: control.end,
        limits: *limits,
    };
    c.skip_space();
    let root = c.pos;
    let (content, empty) = c.start_tag(b"data", b"content")?;
    if empty {
        return None;
    }
    let start_tag = root..c.pos;
    c.skip_space();
    let originator = c.element(b"originator")?;
    let mut recipients = smallvec::SmallVec::new();
    loop {
        c.skip_space();
        if !c.at_tag(b"recipient") {
            break;
        }
        if recipients.len() == limits.max_recipients {
            return None;
        }
        recipients.push(c.element(b"recipient")?);
    }
    if recipients.is_empty() {
        return None;
    }
    let (data_content, head_end) = if c.at_tag(b"data-content") {
        let (range, name, text_start) = c.data_content()?;
        c.skip_space();
        (Some((range, name)), text_start)
    } else {
        (None, None)
    };
    c.data_end()?;
    Some(View {
        content,
        originator,
        recipients,
        data_content,
        start_tag,
        head_end,
    })
}

/// Whether `payload[start..]` is what [`view`] accepts after a document head that ended at
/// the start of `data-content` text: the text, `</data-content>`, optional whitespace,
/// `</data>`, optional whitespace. `payload[start..]` must be UTF-8, checked by the caller.
pub(super) fn tail(payload: &[u8], start: usize, limits: &ApexLimits) -> bool {
    let mut c = Cursor {
        payload,
        // Only `start_tag` reads values from `doc`, and no start tag is left in a tail.
        doc: "",
        base: start,
        pos: start,
        end: payload.len(),
        limits: *limits,
    };
    c.data_content_text().is_some() && {
        c.skip_space();
        c.data_end().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apex::msg::{parse_message, parse_message_full, parse_simple_data, Operation};

    const HEAD: &str = "Content-Type: application/beep+xml\r\n\r\n";
    const DIGEST_13_1: &str = "<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n";

    fn scan(doc: &str) -> Option<Scanned> {
        let payload = Bytes::from(format!("{HEAD}{doc}"));
        data(
            &payload,
            doc,
            HEAD.len()..payload.len(),
            &ApexLimits::default(),
        )
    }

    /// Both parsers give the same answer for `doc`, and a simple data view of it (if any)
    /// shows what they found. Returns whether there was one.
    fn agree(doc: &str) -> bool {
        let payload = Bytes::from(format!("{HEAD}{doc}"));
        let limits = ApexLimits::default();
        let parsed = parse_message(&payload, &limits);
        assert_eq!(parsed, parse_message_full(&payload, &limits), "{doc}");
        let Some(simple) = parse_simple_data(&payload, &limits) else {
            return false;
        };
        let Ok(Operation::Data(d)) = parsed else {
            panic!("simple data that does not parse as data: {doc}")
        };
        assert!(
            d.options.is_empty() && d.originator.options.is_empty(),
            "{doc}"
        );
        assert_eq!(d.recipients.len(), 1, "{doc}");
        assert!(d.recipients[0].options.is_empty(), "{doc}");
        assert_eq!(d.originator.identity, simple.originator, "{doc}");
        assert_eq!(d.recipients[0].identity, simple.recipient, "{doc}");
        true
    }

    #[test]
    fn apex_21_digest_example_is_scanned_like_the_full_parser() {
        let found = scan(DIGEST_13_1).expect("the common shape is scanned");
        assert_eq!(found.content, "#Content");
        assert_eq!(found.originator.identity, "fred@example.com");
        assert_eq!(
            &found.originator.raw[..],
            b"<originator identity='fred@example.com' />"
        );
        assert_eq!(found.recipients.len(), 1);
        let raw = found.data_content.expect("data-content scanned");
        assert_eq!(
            &raw[..],
            b"<data-content Name='Content'>hello, barney</data-content>"
        );
        assert!(found.content_names_data_content);
        assert!(agree(DIGEST_13_1), "one recipient, no options: simple data");
        let Ok(Operation::Data(d)) = parse_message(
            &Bytes::from(format!("{HEAD}{DIGEST_13_1}")),
            &ApexLimits::default(),
        ) else {
            panic!("data expected")
        };
        assert_eq!(d.recipients[0].identity, "barney@example.com");
    }

    #[test]
    fn common_variants_are_scanned() {
        for doc in [
            "<data content=\"#C\"><originator identity=\"a@x\"/><recipient identity=\"b@x\"/><recipient identity='c@y'/><data-content Name='C'/></data>",
            "<data content='cid:1@x'><originator identity='a@x' /><recipient identity='b@x' /></data>",
            // Longer than the 24 octets a CompactString keeps inline.
            "<data content='cid:0123456789abcdef0123456789@mail.example.com'><originator identity='a-rather-long-originator-name@example.com' /><recipient identity='and-an-even-longer-recipient-name@subdomain.example.com' /></data>",
            "  \r\n<data\tcontent='#C' >\n<originator  identity='a@x'\t/>\n<recipient identity='b@x' />\n<data-content Name='C'>x > y \"q\"</data-content>\n</data>\n\n",
        ] {
            assert!(scan(doc).is_some(), "{doc}");
            // Simple when there is one recipient and the content reference holds: a cid:
            // names no part of a message that has none (APEX-07).
            let simple = doc.matches("<recipient").count() == 1 && !doc.contains("'cid:");
            assert_eq!(agree(doc), simple, "{doc}");
        }
    }

    #[test]
    fn simple_data_needs_a_valid_content_reference() {
        for doc in [
            // APEX-07: `#Name` naming no data-content, a cid: with no MIME part, a relative
            // reference. The full parser refuses each; none is simple data.
            "<data content='#Other'><originator identity='a@x' /><recipient identity='b@x' /><data-content Name='C'>x</data-content></data>",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /></data>",
            "<data content='cid:1@x'><originator identity='a@x' /><recipient identity='b@x' /></data>",
            "<data content='C'><originator identity='a@x' /><recipient identity='b@x' /><data-content Name='C'>x</data-content></data>",
        ] {
            assert!(scan(doc).is_some(), "the scanner takes the shape: {doc}");
            assert!(!agree(doc), "{doc}");
            let payload = Bytes::from(format!("{HEAD}{doc}"));
            assert!(parse_message(&payload, &ApexLimits::default()).is_err(), "{doc}");
        }
        // An absolute URI other than cid: is a valid reference.
        assert!(agree("<data content='http://x/y'><originator identity='a@x' /><recipient identity='b@x' /></data>"));
    }

    #[test]
    fn anything_else_is_left_to_the_full_parser() {
        for doc in [
            // Options, comments, entity and character references, markup in the content.
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /><option internal='statusRequest' transID='1' /><data-content Name='C'>x</data-content></data>",
            "<data content='#C'><originator identity='a@x'><option internal='x' transID='1'/></originator><recipient identity='b@x' /></data>",
            "<data content='#C'><!-- hi --><originator identity='a@x' /><recipient identity='b@x' /></data>",
            "<data content='#C'><originator identity='a&amp;b@x' /><recipient identity='b@x' /></data>",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /><data-content Name='C'>&lt;</data-content></data>",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /><data-content Name='C'><b>x</b></data-content></data>",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /><data-content Name='C'><![CDATA[x]]></data-content></data>",
            // Other attributes, other spellings, errors of every kind.
            "<data content='#C' x='1'><originator identity='a@x' /><recipient identity='b@x' /></data>",
            "<data content = '#C'><originator identity='a@x' /><recipient identity='b@x' /></data>",
            "<data content='#C'><originator identity='a@x'></originator><recipient identity='b@x' /></data>",
            "<data content='#C'><originator identity='a@x' /></data>",
            "<data content='#C'><recipient identity='b@x' /></data>",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /></data >",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /></data><ok />",
            "<data content='#C'><originator identity='a@x' /><recipient identity='b<@x' /></data>",
            "<data content='#C'/>",
            "\u{a0}<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /></data>",
        ] {
            assert!(scan(doc).is_none(), "{doc}");
            assert!(!agree(doc), "{doc}");
        }
    }

    #[test]
    fn value_end_finds_the_first_stop_octet_in_every_lane() {
        let naive = |text: &[u8], quote: u8| {
            text.iter()
                .position(|&b| b == quote || b == b'<' || b == b'&')
        };
        // Every length up to three words, a stop octet (or none) at every position, with
        // octets around it that the has-zero test could confuse with a match (a stop octet
        // plus or minus one, 0x00, 0x80, 0xff).
        let fillers = [b'a', b'\'' + 1, b'<' - 1, b'&' + 1, 0x00, 0x80, 0xff, b'"'];
        for quote in [b'\'', b'"'] {
            for len in 0..=24 {
                for filler in fillers {
                    if [quote, b'<', b'&'].contains(&filler) {
                        continue;
                    }
                    let mut text = vec![filler; len];
                    assert_eq!(value_end(&text, quote), naive(&text, quote));
                    for at in 0..len {
                        for stop in [quote, b'<', b'&'] {
                            text[at] = stop;
                            assert_eq!(value_end(&text, quote), Some(at), "{text:?}");
                            // A second stop later does not matter.
                            if at + 3 < len {
                                text[at + 3] = b'&';
                                assert_eq!(value_end(&text, quote), Some(at), "{text:?}");
                                text[at + 3] = filler;
                            }
                            text[at] = filler;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn limits_send_the_document_to_the_full_parser() {
        let limits = ApexLimits {
            max_recipients: 1,
            max_attribute_len: 8,
            ..ApexLimits::default()
        };
        for doc in [
            "<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /><recipient identity='c@x' /></data>",
            "<data content='#C'><originator identity='a@example.com' /><recipient identity='b@x' /></data>",
        ] {
            let payload = Bytes::from(format!("{HEAD}{doc}"));
            assert!(data(&payload, doc, HEAD.len()..payload.len(), &limits).is_none());
            let fast = parse_message(&payload, &limits);
            assert_eq!(fast.clone().unwrap_err().code, 501, "{doc}");
            assert_eq!(fast, parse_message_full(&payload, &limits));
        }
    }
}
