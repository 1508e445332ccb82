//! APEX operations on the wire (RFC 3340 §4.1, §4.4, §9.1): `attach`, `bind`, `terminate`,
//! `data`, `ok` and `error`, read from a BEEP message and written back. No routing, no state.
//!
//! A message is an `application/beep+xml` control document, or a `multipart/related` entity
//! whose start part is that document (APEX-07). Parsing borrows nothing it does not need: the
//! `originator`, each `recipient`, each `option` and the `data-content` element are kept as
//! [`Bytes`] slices of the received payload, so a relay re-emits them byte for byte (APEX-28)
//! and MIME parts outside the control document are never touched.
//!
//! XML from peers is restricted: no XML declaration, DOCTYPE or processing instruction, only the
//! predefined entities and character references, bounded depth, attribute count and attribute
//! length ([`ApexLimits`]). Violations are answered with 500 (poorly formed) or 501 (not valid).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use compact_str::CompactString;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::beep::mgmt::code;
use crate::beep::mime::{Entity, BEEP_XML_HEADERS};
use crate::xml;

/// Reply codes of RFC 3340 §10 beyond BEEP's.
pub mod apex_code {
    /// Transaction successful.
    pub const SUCCESS: u16 = 250;
    /// Action not authorized.
    pub const NOT_AUTHORIZED: u16 = 537;
    /// Transaction already in progress.
    pub const IN_PROGRESS: u16 = 555;
    /// get: no access entry with that owner and actor (RFC 3341 §4.3).
    pub const NO_ENTRY: u16 = 551;
    /// Attachment terminated by an override (RFC 3342).
    pub const OVERRIDDEN: u16 = 556;
}

/// Bounds on control documents received from peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApexLimits {
    /// Most nested elements.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attributes: usize,
    /// Longest attribute value, octets.
    pub max_attribute_len: usize,
    /// Most `recipient` elements in one `data`.
    pub max_recipients: usize,
    /// Most `option` elements in one operation (all containers together).
    pub max_options: usize,
}

impl Default for ApexLimits {
    fn default() -> Self {
        Self {
            max_depth: 32,
            max_attributes: 16,
            max_attribute_len: 1024,
            max_recipients: 256,
            max_options: 64,
        }
    }
}

/// Why an APEX message was refused, with the reply code to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// 500 for poorly-formed input, 501 for input that breaks the DTD, 504 for unsupported.
    pub code: u16,
    /// Diagnostic.
    pub text: String,
}

impl OpError {
    fn syntax(text: impl Into<String>) -> Self {
        Self {
            code: code::SYNTAX_ERROR,
            text: text.into(),
        }
    }

    fn invalid(text: impl Into<String>) -> Self {
        Self {
            code: code::PARAMETER_ERROR,
            text: text.into(),
        }
    }

    /// A character XML 1.0 §2.2 forbids (NUL, another C0 control than tab, line feed and
    /// carriage return, U+FFFE, U+FFFF), written literally or as a character reference: 501,
    /// the document's content is refused rather than relayed.
    fn forbidden_char() -> Self {
        Self::invalid(FORBIDDEN_CHAR_TEXT)
    }
}

/// The diagnostic of [`OpError::forbidden_char`].
pub const FORBIDDEN_CHAR_TEXT: &str = "character not allowed in XML (XML 1.0 section 2.2)";

/// Which relays process an option (RFC 3340 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetHop {
    /// Only the receiving relay, which removes it before forwarding.
    This,
    /// Only the relay delivering to the recipient (the default).
    Final,
    /// Every relay.
    All,
}

/// An `option` element (RFC 3340 §5, §9.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApexOption {
    /// IANA-registered name (`internal`), when given.
    pub internal: Option<String>,
    /// URI naming the option (`external`), when given.
    pub external: Option<String>,
    /// Which relays process it.
    pub target_hop: TargetHop,
    /// Whether not understanding it is an error.
    pub must_understand: bool,
    /// Its transaction identifier (0 when absent, e.g. inside `attach`).
    pub trans_id: u32,
    /// The element exactly as received.
    pub raw: Bytes,
}

impl ApexOption {
    /// The option's name: `internal`, else `external`.
    pub fn name(&self) -> &str {
        self.internal
            .as_deref()
            .or(self.external.as_deref())
            .unwrap_or_default()
    }
}

/// The `originator` or a `recipient` of a `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// The endpoint identity, unescaped. Identities of up to 24 octets are stored inline, so
    /// parsing a data operation allocates nothing for them.
    pub identity: CompactString,
    /// Per-originator or per-recipient options.
    pub options: Vec<ApexOption>,
    /// The element exactly as received (options included).
    pub raw: Bytes,
}

/// A `data` operation (RFC 3340 §4.4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// The `content` URI-reference (`#Name` or an absolute URI such as `cid:...`); inline up
    /// to 24 octets, like identities.
    pub content: CompactString,
    /// The sending endpoint.
    pub originator: Party,
    /// One or more recipients; nearly always one, which then needs no allocation.
    pub recipients: Recipients,
    /// Per-data options.
    pub options: Vec<ApexOption>,
    /// The `data-content` element exactly as received, when present.
    pub data_content: Option<Bytes>,
    /// The whole BEEP payload it came in.
    payload: Bytes,
    /// Where the control document sits in `payload`.
    control: Range<usize>,
    /// Where the `data` start tag (`<data content='...'>`) sits in `payload`.
    start_tag: Range<usize>,
    /// Whether `content` is `#Name` for the `data-content` element's (unescaped) `Name`:
    /// all APEX-07 asks of that name, decided while parsing so it is never kept.
    content_names_data_content: bool,
}

/// The recipients of a [`Data`].
pub type Recipients = smallvec::SmallVec<[Party; 1]>;

/// Whether `content` (`#Name`) refers to the `data-content` element named `name`.
pub(super) fn names_data_content(content: &str, name: Option<&str>) -> bool {
    name.is_some_and(|name| content.strip_prefix('#') == Some(name))
}

/// Any APEX element that can arrive on an APEX channel.
// `Data` is the variant every relayed message parses into; boxing it to shrink the others would
// add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `attach` (initiator only).
    Attach {
        /// Endpoint to attach as.
        endpoint: String,
        /// Transaction identifier, 1..=2^31-1.
        trans_id: u32,
        /// Options (their targetHop and transID are ignored, APEX-37).
        options: Vec<ApexOption>,
    },
    /// `bind`.
    Bind {
        /// Administrative domain the sender serves.
        relay: String,
        /// Transaction identifier.
        trans_id: u32,
        /// Options.
        options: Vec<ApexOption>,
    },
    /// `terminate`.
    Terminate {
        /// The attach/bind to end; 0: all of them.
        trans_id: u32,
        /// Why (default 250).
        code: u16,
        /// Diagnostic.
        text: String,
    },
    /// `data`.
    Data(Data),
    /// `ok`.
    Ok,
    /// `error`.
    Error {
        /// Reply code.
        code: u16,
        /// Diagnostic.
        text: String,
    },
}

/// Parses a whole APEX BEEP message (MIME entity).
pub fn parse_message(payload: &Bytes, limits: &ApexLimits) -> Result<Operation, OpError> {
    parse_message_with(payload, limits, Scanner::Fast)
}

/// [`parse_message`] without the fast scanner of common `data` documents: the reference the
/// fuzz target compares the scanner with.
#[doc(hidden)]
pub fn parse_message_full(payload: &Bytes, limits: &ApexLimits) -> Result<Operation, OpError> {
    parse_message_with(payload, limits, Scanner::Full)
}

/// Whether the hand-written scanner may answer for common `data` documents (`Fast`), or only
/// the general parser is used (`Full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scanner {
    Fast,
    Full,
}

fn parse_message_with(
    payload: &Bytes,
    limits: &ApexLimits,
    scanner: Scanner,
) -> Result<Operation, OpError> {
    // Fast path: the header block every APEX implementation writes for a control document
    // alone; anything else goes through the general MIME reader.
    if payload.starts_with(BEEP_XML_HEADERS) {
        let op = parse_control(
            payload,
            BEEP_XML_HEADERS.len()..payload.len(),
            limits,
            scanner,
        )?;
        if let Operation::Data(data) = &op {
            check_content_reference(data, &[])?;
        }
        return Ok(op);
    }
    let entity = Entity::parse(payload).map_err(|e| OpError::syntax(e.to_string()))?;
    let media = entity.media_type();
    let (control, parts) = match media.as_str() {
        "application/beep+xml" => {
            if !entity.is_beep_xml() {
                return Err(OpError::invalid(
                    "only UTF-8 control documents are accepted",
                ));
            }
            let start = payload.len() - entity.body.len();
            (start..payload.len(), Vec::new())
        }
        "multipart/related" => {
            let related = split_related(payload, &entity)?;
            let ids = related
                .parts
                .iter()
                .filter_map(|p| p.content_id.clone())
                .collect();
            (related.parts[related.start].range.clone(), ids)
        }
        other => {
            return Err(OpError::invalid(format!(
                "unexpected content type '{other}'"
            )))
        }
    };
    let op = parse_control(payload, control, limits, scanner)?;
    if let Operation::Data(data) = &op {
        check_content_reference(data, &parts)?;
    }
    Ok(op)
}

/// A `data` of the shape nearly every one has: a control document alone, one originator, one
/// recipient, no options anywhere, and a valid content reference (APEX-07). Borrowed from the
/// payload: the relay routes it without building a [`Data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleData<'a> {
    /// The originator's identity.
    pub originator: &'a str,
    /// The one recipient's identity.
    pub recipient: &'a str,
}

/// The payload as a [`SimpleData`], or `None` when it is anything else (any other operation,
/// options, several recipients, MIME parts, markup the scanner leaves to the full parser, or
/// an error): then [`parse_message`] has the answer. Whenever this returns `Some`,
/// [`parse_message`] returns a `Data` with the same two identities and no options.
pub fn parse_simple_data<'a>(payload: &'a Bytes, limits: &ApexLimits) -> Option<SimpleData<'a>> {
    simple_view(payload, limits).map(|(data, _)| data)
}

/// [`parse_simple_data`], and where the `data-content` text starts (if the element has any).
fn simple_view<'a>(
    payload: &'a Bytes,
    limits: &ApexLimits,
) -> Option<(SimpleData<'a>, Option<usize>)> {
    if !payload.starts_with(BEEP_XML_HEADERS) {
        return None;
    }
    let control = BEEP_XML_HEADERS.len()..payload.len();
    let doc = simdutf8::basic::from_utf8(&payload[control.clone()]).ok()?;
    // The full parser refuses such a document (501).
    if xml::forbidden_char(doc.as_bytes()).is_some() {
        return None;
    }
    let view = super::scan::view(payload, doc, control, limits)?;
    let [recipient] = view.recipients.as_slice() else {
        return None;
    };
    check_content(view.content, view.content_names_data_content(), &[]).ok()?;
    let data = SimpleData {
        originator: view.originator.identity,
        recipient: recipient.identity,
    };
    Some((data, view.head_end))
}

/// What [`parse_simple_data_memo`] remembers of the last simple data on a channel: the
/// message's head (MIME headers and document up to the start of the `data-content` text) and
/// where the two identities sit in it. A sender's data to one recipient differ only after it.
/// At most [`MAX_MEMO_HEAD`] octets; one memo serves one set of limits.
#[derive(Debug, Default, Clone)]
pub struct SimpleMemo {
    head: Vec<u8>,
    /// The identities found in `head`, owned: taking them from a new payload would mean
    /// checking their UTF-8 again.
    originator: Box<str>,
    recipient: Box<str>,
}

impl SimpleMemo {
    /// The length of the head it holds, if any.
    pub fn head_len(&self) -> Option<usize> {
        (!self.head.is_empty()).then_some(self.head.len())
    }
}

/// The longest message head a [`SimpleMemo`] keeps: longer heads (long identities) are parsed
/// in full every time, so a channel's memo never holds more than this.
pub const MAX_MEMO_HEAD: usize = 512;

/// [`parse_simple_data`], remembering the head of what it accepted in `memo`: a payload that
/// starts with the same head is only checked from there on (its text, UTF-8, and the end
/// tags), since the scanner reaches the same state at the end of the same octets. Answers
/// exactly as [`parse_simple_data`] does, whatever `memo` holds.
///
/// With the data comes whether it has the head the memo held before this call (`true`): then
/// the caller may reuse what it derived from the identities last time, as they are the same.
pub fn parse_simple_data_memo<'a>(
    payload: &'a Bytes,
    limits: &ApexLimits,
    memo: &'a mut SimpleMemo,
) -> Option<(SimpleData<'a>, bool)> {
    let head = memo.head.len();
    if head != 0 && payload.get(..head) == Some(&memo.head[..]) {
        // The head ends just after a start tag's `>`: the rest starts on a character boundary.
        simdutf8::basic::from_utf8(&payload[head..]).ok()?;
        // The head was checked when the memo took it.
        if xml::forbidden_char(&payload[head..]).is_some()
            || !super::scan::tail(payload, head, limits)
        {
            return None;
        }
        let data = SimpleData {
            originator: &memo.originator,
            recipient: &memo.recipient,
        };
        return Some((data, true));
    }
    let (data, head_end) = simple_view(payload, limits)?;
    match head_end {
        Some(end) if end <= MAX_MEMO_HEAD => {
            memo.head.clear();
            memo.head.extend_from_slice(&payload[..end]);
            // A sender alternating recipients changes only one of them.
            if *memo.originator != *data.originator {
                memo.originator = data.originator.into();
            }
            if *memo.recipient != *data.recipient {
                memo.recipient = data.recipient.into();
            }
        }
        _ => memo.head.clear(),
    }
    Some((data, false))
}

/// Parses a control document alone, as piggybacked in a `start` (RFC 3340 §4.2).
pub fn parse_document(doc: &Bytes, limits: &ApexLimits) -> Result<Operation, OpError> {
    parse_document_with(doc, limits, Scanner::Fast)
}

/// [`parse_document`] without the fast scanner (see [`parse_message_full`]).
#[doc(hidden)]
pub fn parse_document_full(doc: &Bytes, limits: &ApexLimits) -> Result<Operation, OpError> {
    parse_document_with(doc, limits, Scanner::Full)
}

fn parse_document_with(
    doc: &Bytes,
    limits: &ApexLimits,
    scanner: Scanner,
) -> Result<Operation, OpError> {
    let op = parse_control(doc, 0..doc.len(), limits, scanner)?;
    if let Operation::Data(data) = &op {
        check_content_reference(data, &[])?;
    }
    Ok(op)
}

/// APEX-07: `#Name` must name the `data-content`; `cid:` must name a part.
fn check_content_reference(data: &Data, content_ids: &[String]) -> Result<(), OpError> {
    check_content(&data.content, data.content_names_data_content, content_ids)
}

/// [`check_content_reference`] on the parts it looks at.
fn check_content(
    content: &str,
    names_data_content: bool,
    content_ids: &[String],
) -> Result<(), OpError> {
    if content.starts_with('#') {
        if !names_data_content {
            return Err(OpError::invalid("content names no data-content element"));
        }
    } else if let Some(cid) = content.strip_prefix("cid:") {
        if !content_ids.iter().any(|id| id == cid) {
            return Err(OpError::invalid("content names no MIME part"));
        }
    } else if !is_absolute_uri(content) {
        return Err(OpError::invalid(
            "content must be an absolute URI or a fragment",
        ));
    }
    Ok(())
}

/// Whether `uri` is an absolute URI (RFC 3986 §4.3, with the fragment RFC 3340 §5 allows an
/// option's `external`): a scheme, `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` (§3.1), then
/// `:`. A colon alone is not enough: `/a:b` and `1a:b` are relative references. No URI holds
/// whitespace or control characters (§2), so the rest may not either.
fn is_absolute_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return false;
    };
    let mut scheme_chars = scheme.bytes();
    scheme_chars.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_chars.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// One part of a `multipart/related` entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelatedPart {
    /// Its `Content-ID`, without the angle brackets.
    pub content_id: Option<String>,
    /// Whether it is an `application/beep+xml` (UTF-8) document.
    pub beep_xml: bool,
    /// Where its body sits in the payload.
    pub range: Range<usize>,
    /// Its body: a slice of the payload (no copy).
    pub body: Bytes,
}

/// A `multipart/related` payload split into its parts (RFC 2387), the start part located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Related {
    /// The parts, in order.
    pub parts: Vec<RelatedPart>,
    /// Index in `parts` of the start part (the `start` parameter's, else the first).
    pub start: usize,
}

impl Related {
    /// The start part: the control document (APEX-07).
    pub fn start_part(&self) -> Option<&RelatedPart> {
        self.parts.get(self.start)
    }

    /// The part whose Content-ID is `cid` (a `cid:` URI without its scheme).
    pub fn part(&self, cid: &str) -> Option<&RelatedPart> {
        self.parts
            .iter()
            .find(|p| p.content_id.as_deref() == Some(cid))
    }
}

/// The most parts a `multipart/related` payload may have.
const MAX_PARTS: usize = 64;

/// Splits a `multipart/related` payload (`entity` is its parsed header block) into its parts:
/// the one MIME splitter, used by the relay to find the control document and by endpoints to
/// find a data's content part. The start part must be `application/beep+xml` (APEX-07).
pub fn split_related(payload: &Bytes, entity: &Entity) -> Result<Related, OpError> {
    let content_type = entity.header("Content-Type").unwrap_or_default();
    let param = |name: &str| -> Option<String> {
        content_type.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().trim_matches('"').to_owned())
        })
    };
    let boundary =
        param("boundary").ok_or_else(|| OpError::invalid("multipart without boundary"))?;
    let start_id = param("start");
    let body_start = payload.len() - entity.body.len();
    let delimiter = format!("--{boundary}");
    let marker = format!("\r\n{delimiter}");
    let mut parts: Vec<RelatedPart> = Vec::new();
    // Positions of delimiter lines: at the body start or after CRLF.
    let body = &payload[body_start..];
    let mut cursor = if body.starts_with(delimiter.as_bytes()) {
        0
    } else {
        memchr::memmem::find(body, marker.as_bytes())
            .map(|i| i + 2)
            .ok_or_else(|| OpError::invalid("multipart body has no delimiter"))?
    };
    loop {
        let after = cursor + delimiter.len();
        let rest = body.get(after..).unwrap_or_default();
        if rest.starts_with(b"--") {
            break; // close delimiter
        }
        if !rest.starts_with(b"\r\n") {
            return Err(OpError::invalid("malformed multipart delimiter"));
        }
        let part_start = after + 2;
        let end = memchr::memmem::find(&body[part_start..], marker.as_bytes())
            .map(|i| part_start + i)
            .ok_or_else(|| OpError::invalid("multipart without close delimiter"))?;
        let part = payload.slice(body_start + part_start..body_start + end);
        let part_entity =
            Entity::parse(&part).map_err(|e| OpError::invalid(format!("multipart part: {e}")))?;
        let content_id = part_entity.header("Content-ID").map(|v| {
            v.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        });
        let body_offset = part.len() - part_entity.body.len();
        let range = body_start + part_start + body_offset..body_start + end;
        parts.push(RelatedPart {
            content_id,
            beep_xml: part_entity.is_beep_xml(),
            range,
            body: part_entity.body,
        });
        cursor = end + 2;
        if parts.len() > MAX_PARTS {
            return Err(OpError::invalid("too many MIME parts"));
        }
    }
    let wanted = start_id.map(|s| s.trim_start_matches('<').trim_end_matches('>').to_owned());
    let start = match &wanted {
        Some(id) => parts
            .iter()
            .position(|p| p.content_id.as_deref() == Some(id.as_str())),
        None => (!parts.is_empty()).then_some(0),
    }
    .ok_or_else(|| OpError::invalid("multipart start part not found"))?;
    if !parts[start].beep_xml {
        return Err(OpError::invalid(
            "multipart start part is not application/beep+xml",
        ));
    }
    Ok(Related { parts, start })
}

/// A streaming reader over the control document that remembers where each element starts.
struct Doc<'a> {
    reader: Reader<&'a [u8]>,
    base: usize,
    payload: &'a Bytes,
    limits: &'a ApexLimits,
    options_seen: usize,
}

enum Node<'a> {
    Open(BytesStart<'a>, usize),
    Empty(BytesStart<'a>, usize),
    Close,
    Text(bool),
    Eof,
}

impl<'a> Doc<'a> {
    fn next(&mut self) -> Result<Node<'a>, OpError> {
        loop {
            let at = self.base + self.reader.buffer_position() as usize;
            let event = self
                .reader
                .read_event()
                .map_err(|e| OpError::syntax(format!("poorly-formed XML: {e}")))?;
            return Ok(match event {
                Event::Decl(_) => return Err(OpError::syntax("XML declaration is not allowed")),
                Event::DocType(_) => return Err(OpError::syntax("DOCTYPE is not allowed")),
                Event::PI(_) => {
                    return Err(OpError::syntax("processing instructions are not allowed"))
                }
                Event::Comment(_) => continue,
                Event::Start(s) => {
                    self.check_attributes(&s)?;
                    Node::Open(s, at)
                }
                Event::Empty(s) => {
                    self.check_attributes(&s)?;
                    Node::Empty(s, at)
                }
                Event::End(_) => Node::Close,
                Event::Text(t) => {
                    if !xml::references_are_chars(&t) {
                        return Err(OpError::forbidden_char());
                    }
                    let text = t
                        .unescape()
                        .map_err(|e| OpError::syntax(format!("bad text: {e}")))?;
                    Node::Text(text.trim().is_empty())
                }
                Event::CData(_) => Node::Text(false),
                Event::Eof => Node::Eof,
            });
        }
    }

    fn check_attributes(&self, start: &BytesStart<'_>) -> Result<(), OpError> {
        let mut count = 0;
        for a in start.attributes() {
            let a = a.map_err(|e| OpError::syntax(format!("bad attribute: {e}")))?;
            count += 1;
            if count > self.limits.max_attributes {
                return Err(OpError::invalid("too many attributes"));
            }
            if a.value.len() > self.limits.max_attribute_len {
                return Err(OpError::invalid("attribute value too long"));
            }
            // XML 1.0 §3.1 (AttValue): a literal '<' is not allowed in an attribute value.
            if memchr::memchr(b'<', &a.value).is_some() {
                return Err(OpError::syntax("'<' in an attribute value"));
            }
            if !xml::references_are_chars(&a.value) {
                return Err(OpError::forbidden_char());
            }
        }
        Ok(())
    }

    fn pos(&self) -> usize {
        self.base + self.reader.buffer_position() as usize
    }

    /// Skips the rest of an element opened at depth 1 relative to here, bounded in depth.
    fn skip_element(&mut self, depth_now: usize) -> Result<(), OpError> {
        let mut depth = 1;
        while depth > 0 {
            match self.next()? {
                Node::Open(..) => {
                    depth += 1;
                    if depth_now + depth > self.limits.max_depth {
                        return Err(OpError::invalid("elements nested too deeply"));
                    }
                }
                Node::Close => depth -= 1,
                Node::Eof => return Err(OpError::syntax("unclosed element")),
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads `option` children until the element that contains them closes. `open` tells
    /// whether the container had content at all.
    fn options(&mut self, open: bool, depth: usize) -> Result<Vec<ApexOption>, OpError> {
        let mut options = Vec::new();
        if !open {
            return Ok(options);
        }
        loop {
            match self.next()? {
                Node::Text(true) => {}
                Node::Close => return Ok(options),
                Node::Empty(s, at) if s.name().as_ref() == b"option" => {
                    options.push(self.option(&s, at, false, depth)?);
                }
                Node::Open(s, at) if s.name().as_ref() == b"option" => {
                    options.push(self.option(&s, at, true, depth)?);
                }
                Node::Eof => return Err(OpError::syntax("unclosed element")),
                _ => return Err(OpError::invalid("only option elements may appear here")),
            }
        }
    }

    fn option(
        &mut self,
        s: &BytesStart<'_>,
        at: usize,
        open: bool,
        depth: usize,
    ) -> Result<ApexOption, OpError> {
        self.options_seen += 1;
        if self.options_seen > self.limits.max_options {
            return Err(OpError::invalid("too many options"));
        }
        let internal = attr(s, "internal")?.filter(|v| !v.is_empty());
        let external = attr(s, "external")?.filter(|v| !v.is_empty());
        // APEX-34: exactly one of internal/external; external is an absolute URI.
        match (&internal, &external) {
            (Some(_), None) => {}
            (None, Some(uri)) if is_absolute_uri(uri) => {}
            _ => {
                return Err(OpError::invalid(
                    "option needs exactly one of internal or absolute external",
                ))
            }
        }
        let target_hop = match attr(s, "targetHop")?.as_deref() {
            None | Some("final") => TargetHop::Final,
            Some("this") => TargetHop::This,
            Some("all") => TargetHop::All,
            Some(_) => return Err(OpError::invalid("targetHop must be this, final or all")),
        };
        let must_understand = match attr(s, "mustUnderstand")?.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(OpError::invalid("mustUnderstand must be true or false")),
        };
        let trans_id = attr(s, "transID")?
            .map(|v| number(&v, false))
            .transpose()?
            .unwrap_or(0);
        if open {
            self.skip_element(depth + 1)?;
        }
        let raw = self.payload.slice(at..self.pos());
        Ok(ApexOption {
            internal,
            external,
            target_hop,
            must_understand,
            trans_id,
            raw,
        })
    }

    fn party(&mut self, s: &BytesStart<'_>, at: usize, open: bool) -> Result<Party, OpError> {
        let identity = required(s, "identity")?;
        let options = self.options(open, 2)?;
        Ok(Party {
            identity: identity.into(),
            options,
            raw: self.payload.slice(at..self.pos()),
        })
    }
}

fn attr(s: &BytesStart<'_>, name: &str) -> Result<Option<String>, OpError> {
    for a in s.attributes() {
        let a = a.map_err(|e| OpError::syntax(format!("bad attribute: {e}")))?;
        if a.key.as_ref() == name.as_bytes() {
            let v = a
                .unescape_value()
                .map_err(|e| OpError::syntax(format!("bad attribute value: {e}")))?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

fn required(s: &BytesStart<'_>, name: &str) -> Result<String, OpError> {
    attr(s, name)?.ok_or_else(|| OpError::invalid(format!("attribute {name} is required")))
}

/// UNIQID (1..2^31-1) or UNIZID (0..2^31-1).
fn number(v: &str, zero_allowed: bool) -> Result<u32, OpError> {
    v.parse::<u32>()
        .ok()
        .filter(|n| *n <= crate::limits::MAX_31BIT && (zero_allowed || *n > 0))
        .ok_or_else(|| OpError::invalid(format!("'{v}' is not a valid transaction identifier")))
}

fn reply_code(v: Option<String>, default: u16) -> Result<u16, OpError> {
    match v {
        None => Ok(default),
        Some(v) => {
            let b = v.as_bytes();
            if b.len() == 3
                && (b'1'..=b'5').contains(&b[0])
                && b[1..].iter().all(u8::is_ascii_digit)
            {
                v.parse().map_err(|_| OpError::invalid("bad reply code"))
            } else {
                Err(OpError::invalid("reply code must be three digits"))
            }
        }
    }
}

fn parse_control(
    payload: &Bytes,
    control: Range<usize>,
    limits: &ApexLimits,
    scanner: Scanner,
) -> Result<Operation, OpError> {
    let text = &payload[control.clone()];
    let doc = simdutf8::basic::from_utf8(text)
        .map_err(|_| OpError::syntax("control document is not UTF-8"))?;
    // XML 1.0 §2.2: forbidden characters written as they are, anywhere in the document
    // (references are checked where text and attribute values are read).
    if xml::forbidden_char(text).is_some() {
        return Err(OpError::forbidden_char());
    }
    if scanner == Scanner::Fast {
        if let Some(found) = super::scan::data(payload, doc, control.clone(), limits) {
            return Ok(Operation::Data(Data {
                content: found.content,
                originator: found.originator,
                recipients: found.recipients,
                options: Vec::new(),
                data_content: found.data_content,
                content_names_data_content: found.content_names_data_content,
                payload: payload.clone(),
                control,
                start_tag: found.start_tag,
            }));
        }
    }
    let mut doc = Doc {
        reader: Reader::from_reader(text),
        base: control.start,
        payload,
        limits,
        options_seen: 0,
    };
    let (root, open) = loop {
        match doc.next()? {
            Node::Text(true) => {}
            Node::Open(s, at) => break ((s, at), true),
            Node::Empty(s, at) => break ((s, at), false),
            _ => return Err(OpError::syntax("control document has no root element")),
        }
    };
    let ((start, root_at), open) = (root, open);
    let root_tag = root_at..doc.pos();
    let op = match start.name().as_ref() {
        b"attach" => Operation::Attach {
            endpoint: required(&start, "endpoint")?,
            trans_id: number(&required(&start, "transID")?, false)?,
            options: doc.options(open, 1)?,
        },
        b"bind" => Operation::Bind {
            relay: required(&start, "relay")?,
            trans_id: number(&required(&start, "transID")?, false)?,
            options: doc.options(open, 1)?,
        },
        b"terminate" | b"error" => {
            let is_error = start.name().as_ref() == b"error";
            let code = if is_error {
                reply_code(Some(required(&start, "code")?), 0)?
            } else {
                reply_code(attr(&start, "code")?, apex_code::SUCCESS)?
            };
            let trans_id = match attr(&start, "transID")? {
                Some(v) if !is_error => number(&v, true)?,
                _ => 0,
            };
            let text = if open {
                element_text(&mut doc)?
            } else {
                String::new()
            };
            if is_error {
                Operation::Error { code, text }
            } else {
                Operation::Terminate {
                    trans_id,
                    code,
                    text,
                }
            }
        }
        b"ok" => {
            if open || start.attributes().next().is_some() {
                // `ok` is empty; tolerate `<ok></ok>` but nothing inside it.
                if open && !matches!(doc.next()?, Node::Close) {
                    return Err(OpError::invalid("ok has no content"));
                }
            }
            Operation::Ok
        }
        b"data" => Operation::Data(data(
            &mut doc,
            &start,
            open,
            payload.clone(),
            control.clone(),
            root_tag,
        )?),
        other => {
            return Err(OpError::invalid(format!(
                "unknown APEX element '{}'",
                String::from_utf8_lossy(other)
            )))
        }
    };
    // Nothing but whitespace and comments may follow the root element.
    loop {
        match doc.next()? {
            Node::Eof => return Ok(op),
            Node::Text(true) => {}
            _ => return Err(OpError::syntax("content after the root element")),
        }
    }
}

fn element_text(doc: &mut Doc<'_>) -> Result<String, OpError> {
    let mut text = String::new();
    loop {
        let event = doc
            .reader
            .read_event()
            .map_err(|e| OpError::syntax(format!("poorly-formed XML: {e}")))?;
        match event {
            Event::Text(t) => {
                if !xml::references_are_chars(&t) {
                    return Err(OpError::forbidden_char());
                }
                text.push_str(&t.unescape().map_err(|e| OpError::syntax(e.to_string()))?)
            }
            Event::CData(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Event::End(_) => return Ok(text.trim().to_owned()),
            Event::Comment(_) => {}
            _ => return Err(OpError::invalid("diagnostic text only")),
        }
    }
}

/// `data = originator, recipient+, option*, data-content?` in this order (APEX-21).
fn data(
    doc: &mut Doc<'_>,
    start: &BytesStart<'_>,
    open: bool,
    payload: Bytes,
    control: Range<usize>,
    start_tag: Range<usize>,
) -> Result<Data, OpError> {
    let content = required(start, "content")?;
    if !open {
        return Err(OpError::invalid("data needs an originator and recipients"));
    }
    let mut originator = None;
    let mut recipients = Recipients::new();
    let mut options = Vec::new();
    let mut data_content = None;
    let mut data_content_name = None;
    loop {
        let node = doc.next()?;
        let (s, at, has_children) = match node {
            Node::Text(true) => continue,
            Node::Close => break,
            Node::Open(s, at) => (s, at, true),
            Node::Empty(s, at) => (s, at, false),
            Node::Eof => return Err(OpError::syntax("unclosed data element")),
            _ => return Err(OpError::invalid("unexpected content in data")),
        };
        match s.name().as_ref() {
            b"originator" if originator.is_none() && recipients.is_empty() => {
                originator = Some(doc.party(&s, at, has_children)?);
            }
            b"recipient"
                if originator.is_some() && options.is_empty() && data_content.is_none() =>
            {
                if recipients.len() == doc.limits.max_recipients {
                    return Err(OpError::invalid("too many recipients"));
                }
                recipients.push(doc.party(&s, at, has_children)?);
            }
            b"option" if !recipients.is_empty() && data_content.is_none() => {
                options.push(doc.option(&s, at, has_children, 1)?);
            }
            b"data-content" if !recipients.is_empty() && data_content.is_none() => {
                data_content_name = Some(required(&s, "Name")?);
                if has_children {
                    doc.skip_element(2)?;
                }
                data_content = Some(doc.payload.slice(at..doc.pos()));
            }
            _ => {
                return Err(OpError::invalid(
                    "data must be originator, recipient+, option*, data-content?",
                ))
            }
        }
    }
    let originator = originator.ok_or_else(|| OpError::invalid("data without originator"))?;
    if recipients.is_empty() {
        return Err(OpError::invalid("data without recipient"));
    }
    let content_names_data_content = names_data_content(&content, data_content_name.as_deref());
    Ok(Data {
        content: content.into(),
        originator,
        recipients,
        options,
        data_content,
        content_names_data_content,
        payload,
        control,
        start_tag,
    })
}

impl Data {
    /// The BEEP payload this data arrived in.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The message to send onward carrying only `recipients` (indices into
    /// [`Data::recipients`]) and the per-data options `keep_option` accepts. Everything else -
    /// originator, the recipients' own elements, `data-content`, MIME parts - is copied byte for
    /// byte (APEX-28). When nothing changes the received payload itself is returned (no copy).
    pub fn payload_for(
        &self,
        recipients: &[usize],
        keep_option: impl Fn(&ApexOption) -> bool,
    ) -> Bytes {
        let all = recipients.len() == self.recipients.len()
            && recipients.iter().enumerate().all(|(i, r)| i == *r);
        let kept: Vec<&ApexOption> = self.options.iter().filter(|o| keep_option(o)).collect();
        if all && kept.len() == self.options.len() {
            return self.payload.clone();
        }
        let mut out = BytesMut::with_capacity(self.payload.len());
        out.put_slice(&self.payload[..self.control.start]);
        // The start tag as received: re-escaping its attributes could change their length.
        out.put_slice(&self.payload[self.start_tag.clone()]);
        out.put_slice(b"\r\n   ");
        out.put_slice(&self.originator.raw);
        for &r in recipients {
            if let Some(party) = self.recipients.get(r) {
                out.put_slice(b"\r\n   ");
                out.put_slice(&party.raw);
            }
        }
        for option in kept {
            out.put_slice(b"\r\n   ");
            out.put_slice(&option.raw);
        }
        if let Some(dc) = &self.data_content {
            out.put_slice(b"\r\n   ");
            out.put_slice(dc);
        }
        out.put_slice(b"\r\n</data>\r\n");
        out.put_slice(&self.payload[self.control.end..]);
        out.freeze()
    }
}

/// The `ok` reply payload (RFC 3340 §9.1).
pub fn ok_payload() -> Bytes {
    // Every accepted data is answered with it: a static, so answering allocates nothing.
    const OK: &[u8] = b"Content-Type: application/beep+xml\r\n\r\n<ok />\r\n";
    debug_assert!(OK.starts_with(BEEP_XML_HEADERS));
    Bytes::from_static(OK)
}

/// The `error` reply payload.
pub fn error_payload(code: u16, text: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(BEEP_XML_HEADERS);
    out.put_slice(error_xml(code, text).as_bytes());
    out.freeze()
}

/// The `error` element alone (for piggybacked replies), followed by CRLF.
pub fn error_xml(code: u16, text: &str) -> String {
    if text.is_empty() {
        format!("<error code='{code}' />\r\n")
    } else {
        format!("<error code='{code}'>{}</error>\r\n", xml::escape(text))
    }
}

/// `error` (a payload of [`error_payload`] or an element of [`error_xml`]) with its diagnostic
/// text labelled `xml:lang='{lang}'`, for a peer whose first language is another (BEEP-30,
/// RFC 3080 §2.3.1.5, which RFC 3340 §4.4 adopts with the element). `None` when it is not such
/// an error with text, which then goes out as it is.
pub fn label_error_text(error: &[u8], lang: &str) -> Option<Bytes> {
    const OPEN: &[u8] = b"<error code='";
    let body_at = if error.starts_with(BEEP_XML_HEADERS) {
        BEEP_XML_HEADERS.len()
    } else {
        0
    };
    // The code is three digits (RFC 3080 §8), then `'>` and text.
    let code_end = body_at + OPEN.len() + 3;
    let after_code = error.get(code_end..)?;
    if !error[body_at..].starts_with(OPEN)
        || !after_code.starts_with(b"'>")
        || after_code[2..].starts_with(b"</error>")
    {
        return None;
    }
    let label = format!(" xml:lang='{}'", xml::escape(lang));
    let mut out = BytesMut::with_capacity(error.len() + label.len());
    out.put_slice(&error[..=code_end]);
    out.put_slice(label.as_bytes());
    out.put_slice(&after_code[1..]);
    Some(out.freeze())
}

/// A `terminate` payload.
pub fn terminate_payload(trans_id: u32, code: u16, text: &str) -> Bytes {
    if text.is_empty() {
        xml_payload(&format!(
            "<terminate transID='{trans_id}' code='{code}' />\r\n"
        ))
    } else {
        xml_payload(&format!(
            "<terminate transID='{trans_id}' code='{code}'>{}</terminate>\r\n",
            xml::escape(text)
        ))
    }
}

fn xml_payload(body: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(BEEP_XML_HEADERS.len() + body.len());
    out.put_slice(BEEP_XML_HEADERS);
    out.put_slice(body.as_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ApexLimits = ApexLimits {
        max_depth: 32,
        max_attributes: 16,
        max_attribute_len: 1024,
        max_recipients: 256,
        max_options: 64,
    };

    fn msg(s: &str) -> Result<Operation, OpError> {
        parse_message(&Bytes::copy_from_slice(s.as_bytes()), &LIMITS)
    }

    const DATA_13_1: &str = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n";

    #[test]
    fn beep_30_error_text_is_labelled_in_payloads_and_piggybacked_elements() {
        let labelled = label_error_text(&error_payload(501, "a 'b'"), "en").unwrap();
        assert_eq!(
            &labelled[..],
            &b"Content-Type: application/beep+xml\r\n\r\n<error code='501' xml:lang='en'>a &apos;b&apos;</error>\r\n"[..]
        );
        let element = error_xml(537, "no").trim_end().to_owned();
        assert_eq!(
            &label_error_text(element.as_bytes(), "en").unwrap()[..],
            b"<error code='537' xml:lang='en'>no</error>"
        );
        // Nothing to label: no text, already labelled, not an error.
        assert_eq!(label_error_text(&error_payload(550, ""), "en"), None);
        assert_eq!(label_error_text(&labelled, "en"), None);
        assert_eq!(label_error_text(&ok_payload(), "en"), None);
        assert_eq!(label_error_text(b"<error code='5", "en"), None);
    }

    #[test]
    fn apex_34_absolute_uri_needs_a_scheme() {
        for uri in [
            "http://example.org/opt",
            "urn:x-apex:opt#v2",
            "x-a.b+c-1:",
            "A:b",
        ] {
            assert!(is_absolute_uri(uri), "{uri}");
        }
        for uri in [
            "opt", "/a:b", "1a:b", ":b", "a b:c", "a:b c", "a:b\tc", "#frag", "+a:b",
        ] {
            assert!(!is_absolute_uri(uri), "{uri}");
        }
    }

    #[test]
    fn apex_21_data_of_13_1() {
        let Operation::Data(d) = msg(DATA_13_1).unwrap() else {
            panic!()
        };
        assert_eq!(d.content, "#Content");
        assert_eq!(d.originator.identity, "fred@example.com");
        assert_eq!(d.recipients[0].identity, "barney@example.com");
        assert_eq!(
            d.data_content.as_deref(),
            Some(&b"<data-content Name='Content'>hello, barney</data-content>"[..])
        );
        // Delivered unchanged to its only recipient (RFC 3340 §4.4.4.1 step 5.3): same bytes, no copy.
        let out = d.payload_for(&[0], |_| true);
        assert_eq!(out, d.payload());
        assert_eq!(out.as_ptr(), d.payload().as_ptr());
    }

    #[test]
    fn apex_28_splitting_recipients_keeps_content_bytes() {
        let payload = "Content-Type: application/beep+xml\r\n\r\n<data content='#C'><originator identity='a@x' /><recipient identity='b@x'><option internal='statusRequest' transID='7'/></recipient><recipient identity='c@y' /><option internal='x' targetHop='this' transID='2'/><data-content Name='C'><p a='1'>&amp; <![CDATA[<raw>]]></p></data-content></data>";
        let Operation::Data(d) = msg(payload).unwrap() else {
            panic!()
        };
        assert_eq!(
            d.recipients[0].options[0].internal.as_deref(),
            Some("statusRequest")
        );
        assert_eq!(d.options[0].target_hop, TargetHop::This);
        let out = d.payload_for(&[1], |o| o.target_hop != TargetHop::This);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("<recipient identity='c@y' />"));
        assert!(!text.contains("b@x") && !text.contains("internal='x'"));
        assert!(text.contains(
            "<data-content Name='C'><p a='1'>&amp; <![CDATA[<raw>]]></p></data-content>"
        ));
        let Operation::Data(again) = parse_message(&out, &LIMITS).unwrap() else {
            panic!()
        };
        assert_eq!(again.recipients.len(), 1);
        assert_eq!(again.data_content, d.data_content);
    }

    #[test]
    fn apex_28_start_tag_copied_as_received_when_recipients_split() {
        // A content attribute full of characters an encoder would escape ('>' and '"' are
        // legal in a single-quoted value): dropping a recipient must not re-encode it, or the
        // onward message could grow past max_attribute_len and be refused by the next relay.
        let name = ">\"".repeat(LIMITS.max_attribute_len / 2 - 4);
        let content = format!("#{name}");
        let payload = format!(
            "Content-Type: application/beep+xml\r\n\r\n<data  content='{content}' >\r\n<originator identity='a@x' /><recipient identity='b@x' /><recipient identity='c@x' /><data-content Name='{name}'>hi</data-content></data>"
        );
        let Operation::Data(d) = msg(&payload).unwrap() else {
            panic!()
        };
        let out = d.payload_for(&[1], |_| true);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.contains(&format!("<data  content='{content}' >")),
            "{text}"
        );
        let Operation::Data(again) = msg(&text).unwrap() else {
            panic!()
        };
        assert_eq!(again.content, d.content);
        assert_eq!(again.recipients.len(), 1);
        assert_eq!(again.recipients[0].identity, "c@x");
    }

    #[test]
    fn apex_07_multipart_related_of_13_4() {
        let payload = "Content-Type: multipart/related; boundary=\"XX\"; start=\"<1@fred.example.com>\"; type=\"application/beep+xml\"\r\n\r\n--XX\r\nContent-Type: application/beep+xml\r\nContent-ID: <1@fred.example.com>\r\n\r\n<data content='cid:2@fred.example.com'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n</data>\r\n--XX\r\nContent-Type: text/plain\r\nContent-ID: <2@fred.example.com>\r\n\r\nhello, barney\r\n--XX--\r\n";
        assert_eq!(payload.len(), 423, "RFC 3340 §4.1");
        let Operation::Data(d) = msg(payload).unwrap() else {
            panic!()
        };
        assert_eq!(d.content, "cid:2@fred.example.com");
        // A second recipient removed: the text/plain part is still byte-identical.
        let bytes = Bytes::copy_from_slice(
            payload
                .replace(
                    "/>\r\n</data>",
                    "/>\r\n   <recipient identity='wilma@example.com' />\r\n</data>",
                )
                .as_bytes(),
        );
        let Operation::Data(two) = parse_message(&bytes, &LIMITS).unwrap() else {
            panic!()
        };
        let out = two.payload_for(&[1], |_| true);
        let tail = "--XX\r\nContent-Type: text/plain\r\nContent-ID: <2@fred.example.com>\r\n\r\nhello, barney\r\n--XX--\r\n";
        assert!(String::from_utf8_lossy(&out).ends_with(tail));
        assert!(!String::from_utf8_lossy(&out).contains("barney@example.com'"));
    }

    #[test]
    fn control_document_must_be_utf8() {
        // XML 1.0 §2.2 (the control document is application/beep+xml, UTF-8): a malformed
        // sequence anywhere, data-content text included, is a syntax error for both parsers;
        // well-formed multi-octet text is relayed.
        let good = DATA_13_1.replace("hello, barney", "h\u{e9}llo, \u{1F600}");
        for parse in [parse_message, parse_message_full] {
            assert!(matches!(
                parse(&Bytes::from(good.clone()), &LIMITS),
                Ok(Operation::Data(_))
            ));
            for (find, bad) in [
                ("hello", &b"h\xe9llo"[..]),         // a lone Latin-1 octet
                ("barney@", &b"barn\xc3y@"[..]),     // a truncated sequence in an identity
                ("hello", &b"h\xed\xa0\x80llo"[..]), // an encoded surrogate
            ] {
                let at = DATA_13_1.find(find).unwrap();
                let mut wire = DATA_13_1.as_bytes()[..at].to_vec();
                wire.extend_from_slice(bad);
                wire.extend_from_slice(&DATA_13_1.as_bytes()[at + find.len()..]);
                let error = parse(&Bytes::from(wire), &LIMITS).unwrap_err();
                assert_eq!(error.code, code::SYNTAX_ERROR, "{find}");
            }
        }
    }

    #[test]
    fn apex_07_content_must_resolve() {
        let bad = DATA_13_1.replace("#Content", "#Other");
        assert_eq!(msg(&bad).unwrap_err().code, 501);
        let bad = DATA_13_1.replace("#Content", "relative/path");
        assert_eq!(msg(&bad).unwrap_err().code, 501);
        // A colon does not make an absolute URI (RFC 3986 §4.3): a scheme must lead it.
        for relative in ["/a:b", "1a:b", ":x", "a b:c"] {
            let bad = DATA_13_1.replace("#Content", relative);
            assert_eq!(msg(&bad).unwrap_err().code, 501, "{relative}");
        }
        let good = DATA_13_1.replace("#Content", "urn:x-apex:thing");
        assert!(matches!(msg(&good), Ok(Operation::Data(_))));
        // Both parsers: `#Name` without a data-content names nothing; names compare unescaped.
        let head = "Content-Type: application/beep+xml\r\n\r\n";
        let parties = "<originator identity='a@x' /><recipient identity='b@x' />";
        let none = format!("{head}<data content='#C'>{parties}</data>");
        let escaped = format!(
            "{head}<data content='#C&amp;D'>{parties}<data-content Name='C&amp;D'>x</data-content></data>"
        );
        for parse in [parse_message, parse_message_full] {
            assert_eq!(
                parse(&Bytes::from(none.clone()), &LIMITS).unwrap_err().code,
                501
            );
            assert!(matches!(
                parse(&Bytes::from(escaped.clone()), &LIMITS),
                Ok(Operation::Data(_))
            ));
        }
    }

    #[test]
    fn apex_21_element_order() {
        let bad = "Content-Type: application/beep+xml\r\n\r\n<data content='http://x/y'><recipient identity='b@x' /><originator identity='a@x' /></data>";
        assert_eq!(msg(bad).unwrap_err().code, 501);
        let bad = "Content-Type: application/beep+xml\r\n\r\n<data content='http://x/y'><originator identity='a@x' /></data>";
        assert_eq!(msg(bad).unwrap_err().code, 501);
    }

    #[test]
    fn attach_bind_terminate() {
        assert_eq!(
            parse_document(
                &Bytes::from_static(b"<attach endpoint='fred@example.com' transID='1' />"),
                &LIMITS
            )
            .unwrap(),
            Operation::Attach {
                endpoint: "fred@example.com".into(),
                trans_id: 1,
                options: vec![]
            }
        );
        assert!(matches!(
            msg("Content-Type: application/beep+xml\r\n\r\n<bind relay='example.com' transID='1'><option internal='x' transID='3' /></bind>").unwrap(),
            Operation::Bind { ref relay, trans_id: 1, ref options } if relay == "example.com" && options.len() == 1
        ));
        // Pitfall 9: <terminate /> means transID 0, code 250.
        assert_eq!(
            msg("Content-Type: application/beep+xml\r\n\r\n<terminate />").unwrap(),
            Operation::Terminate {
                trans_id: 0,
                code: 250,
                text: String::new()
            }
        );
        assert_eq!(
            msg("Content-Type: application/beep+xml\r\n\r\n<terminate transID='1' code='421'>relay going down</terminate>\r\n").unwrap(),
            Operation::Terminate { trans_id: 1, code: 421, text: "relay going down".into() }
        );
        assert_eq!(
            msg("Content-Type: application/beep+xml\r\n\r\n<attach endpoint='f@x' transID='0' />")
                .unwrap_err()
                .code,
            501
        );
    }

    #[test]
    fn restricted_xml_gets_500() {
        for doc in [
            "<?xml version='1.0'?><ok />",
            "<!DOCTYPE data><ok />",
            "<?pi x?><ok />",
            "<error code='500'>&custom;</error>",
            "<data content='#C'><originator identity='a@x'>",
            // XML 1.0 AttValue: no literal '<' (quick-xml alone would accept it).
            "<attach endpoint='a<b@x' transID='1' />",
        ] {
            let r = msg(&format!("Content-Type: application/beep+xml\r\n\r\n{doc}"));
            assert_eq!(r.unwrap_err().code, 500, "{doc}");
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let deep = format!(
            "Content-Type: application/beep+xml\r\n\r\n<data content='#C'><originator identity='a@x' /><recipient identity='b@x' /><data-content Name='C'>{}{}</data-content></data>",
            "<a>".repeat(40),
            "</a>".repeat(40)
        );
        assert_eq!(msg(&deep).unwrap_err().code, 501);
        let long = format!(
            "Content-Type: application/beep+xml\r\n\r\n<attach endpoint='{}@x' transID='1' />",
            "a".repeat(2000)
        );
        assert_eq!(msg(&long).unwrap_err().code, 501);
        let many: String = (0..300)
            .map(|i| format!("<recipient identity='r{i}@x' />"))
            .collect();
        let many = format!("Content-Type: application/beep+xml\r\n\r\n<data content='http://x/'><originator identity='a@x' />{many}</data>");
        assert_eq!(msg(&many).unwrap_err().code, 501);
    }

    #[test]
    fn encoders_match_the_digest() {
        assert_eq!(ok_payload().len(), 46);
        assert_eq!(
            &error_payload(555, "transaction already in progress")[..],
            &b"Content-Type: application/beep+xml\r\n\r\n<error code='555'>transaction already in progress</error>\r\n"[..]
        );
        let report = crate::apex::client::DataBuilder::new("apex=report@example.com")
            .to("fred@example.com")
            .markup("x");
        assert!(matches!(
            parse_message(&report, &LIMITS).unwrap(),
            Operation::Data(_)
        ));
    }

    /// The memo answers exactly as `parse_simple_data`: each payload is parsed after one that
    /// set the memo, and the answers compared.
    #[test]
    fn a_memo_answers_as_the_full_scan() {
        let head = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>";
        let same_head = |tail: &[u8]| {
            let mut p = head.as_bytes().to_vec();
            p.extend_from_slice(tail);
            Bytes::from(p)
        };
        let first = Bytes::from(DATA_13_1);
        let followers = [
            same_head(b"hello again</data-content>\r\n</data>\r\n"),
            same_head(b"</data-content></data>"),
            same_head(b"x</data-content>\r\n</data>\r\n  \t"),
            same_head(b"a &amp; b</data-content></data>"),
            same_head(b"a <b/></data-content></data>"),
            same_head(b"text</data-content></data> trailing"),
            same_head(b"text</data-content></data></data>"),
            same_head(b"text</data-content>"),
            same_head(b"text"),
            same_head(b""),
            same_head(b"bad \xff utf-8</data-content></data>"),
            same_head("caf\u{e9}</data-content></data>".as_bytes()),
            same_head(b"text</data-content><data-content Name='x'>y</data-content></data>"),
            crate::apex::client::DataBuilder::new("fred@example.com")
                .to("wilma@example.com")
                .markup("to wilma"),
            crate::apex::client::DataBuilder::new("fred@example.com")
                .to("barney@example.com")
                .markup(""),
            Bytes::from(DATA_13_1.replace(
                "<data-content Name='Content'>hello, barney</data-content>",
                "<data-content Name='Content' />",
            )),
            Bytes::from(DATA_13_1.replace("fred@", &format!("{}@", "f".repeat(600)))),
            Bytes::from(DATA_13_1.replace("<originator", "<originator\r\n")),
        ];
        for follower in &followers {
            let mut memo = SimpleMemo::default();
            assert_eq!(
                parse_simple_data_memo(&first, &LIMITS, &mut memo),
                parse_simple_data(&first, &LIMITS).map(|data| (data, false))
            );
            assert!(!memo.head.is_empty(), "fred's data to barney leaves a memo");
            let want = parse_simple_data(follower, &LIMITS);
            let head_kept = follower.starts_with(&memo.head);
            let got = parse_simple_data_memo(follower, &LIMITS, &mut memo);
            let name = String::from_utf8_lossy(follower);
            assert_eq!(got, want.map(|data| (data, head_kept)), "{name:?}");
            // And again, now with whatever memo the follower left.
            let head_kept = !memo.head.is_empty() && follower.starts_with(&memo.head);
            let again = parse_simple_data_memo(follower, &LIMITS, &mut memo);
            assert_eq!(again, want.map(|data| (data, head_kept)), "{name:?} twice");
        }
    }

    /// A payload with the memo's head is not scanned again: the identities come from where the
    /// memo says they are. (The memo is tampered with here to show which path answered.)
    #[test]
    fn a_payload_with_the_memo_s_head_is_checked_from_its_text_on() {
        let first = Bytes::from(DATA_13_1);
        let mut memo = SimpleMemo::default();
        parse_simple_data_memo(&first, &LIMITS, &mut memo).unwrap();
        let text_start = DATA_13_1.find("hello, barney").unwrap();
        assert_eq!(memo.head, DATA_13_1.as_bytes()[..text_start]);
        assert_eq!(&*memo.originator, "fred@example.com");
        assert_eq!(&*memo.recipient, "barney@example.com");
        memo.recipient = memo.originator.clone();
        let second = Bytes::from(DATA_13_1.replace("hello, barney", "hello again"));
        let (data, recalled) = parse_simple_data_memo(&second, &LIMITS, &mut memo).unwrap();
        assert_eq!(data.recipient, "fred@example.com");
        assert!(recalled);
    }

    /// Heads longer than `MAX_MEMO_HEAD` are not kept.
    #[test]
    fn a_memo_keeps_no_head_longer_than_its_bound() {
        let long =
            Bytes::from(DATA_13_1.replace("fred@", &format!("{}@", "f".repeat(MAX_MEMO_HEAD))));
        let mut memo = SimpleMemo::default();
        assert!(parse_simple_data_memo(&long, &LIMITS, &mut memo).is_some());
        assert!(memo.head.is_empty());
    }
}
