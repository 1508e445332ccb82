//! The elements of the `apex=access` protocol (RFC 3341 §4, §6): `query`, `get` and `set` from
//! a consumer; `allow`, `deny`, `set` and `reply` from the service, whose `set` also notifies
//! an owner of a change. The bytes of one element in, a value out ([`parse_request`],
//! [`parse_answer`]), and back ([`format_request`], [`format_answer`]), byte-stable.
//!
//! Sans-IO and stateless: no clock, no store, no routing. What the service decides
//! (ACC-11..ACC-15) and how an endpoint sends a request are elsewhere; this module reads and
//! writes the elements, and finds the one a `data` carries ([`carried_element`]). Values are
//! kept as written, because the service, not the syntax, decides what is wrong with them:
//!
//! * an `owner` that is no endpoint is answered with 550 (RFC 3341 §4.2 step 2), so it is not a
//!   parse error here;
//! * an `actor` of `get` and `access` stays in its escaped form (`\*`, `\\`, ACC-07), the form
//!   the service compares literally (ACC-10); the `actor` of `query` is a plain address;
//! * a `lastUpdate` stays RFC 3339 text, which the service compares as an instant (ACC-13).
//!
//! Action lists are the exception: a token that is not `service:operation` makes the element
//! break the DTD (NMTOKENS of [`Action`]s), answered with 501.
//!
//! Reading is bounded: the element is read as a stream of quick-xml events and refused at the
//! first thing its DTD does not allow, so nothing nests deeper than `set` > `access`, at most
//! [`MAX_ATTRIBUTES`] attributes are read per element, and nothing is kept but the values
//! returned. Attributes the DTD does not name for an element (`xml:lang` of `reply`) are
//! skipped, as the APEX parser does.
//!
//! Writing uses single-quoted attributes in the layout of the RFC's and the digest's examples:
//!
//! ```text
//! <query owner='..' actor='..' actions='..' transID='..' />
//! <get owner='..' actor='..' transID='..' />
//! <set transID='..'><access owner='..' actor='..' actions='..' lastUpdate='..' /></set>
//! <allow transID='..' />    <deny transID='..' />
//! <reply code='250' transID='..' />    <reply code='550' transID='..'>text</reply>
//! ```

use std::ops::Range;

use bytes::Bytes;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::apex::access::{format_actions, parse_actions, Action};
use crate::apex::client::{self, Content, DataBuilder};
use crate::apex::msg::Data;
use crate::beep::mgmt::code;
use crate::limits::MAX_31BIT;

/// The well-known endpoint of the access service (RFC 3341 §5, ACC-01).
pub const ACCESS_SERVICE: &str = "apex=access";

/// Attributes read from one element at most. The DTD gives an element four at most
/// (`query`, `access`); the rest of the bound leaves room for `xml:lang` and the like.
pub const MAX_ATTRIBUTES: usize = 8;

/// The access service of `domain`: `apex=access@<domain>` (RFC 3341 §1, ACC-01).
pub fn service_endpoint(domain: &str) -> String {
    format!("{ACCESS_SERVICE}@{domain}")
}

/// One request to apex=access (RFC 3341 §4.2-4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessRequest {
    /// `<query owner actor actions transID/>`: actor is a plain address, never escaped.
    Query {
        /// The subject.
        owner: String,
        /// The address whose permissions are asked about (ACC-07: not a pattern).
        actor: String,
        /// Every one of these must be granted for `allow`.
        actions: Vec<Action>,
        /// Transaction identifier, 1..=2147483647.
        trans_id: u32,
    },
    /// `<get owner actor transID/>`: actor exactly as written (escaped pattern, `\*`, `\\`).
    Get {
        /// The subject.
        owner: String,
        /// The actor value of the entry wanted, escaped (ACC-07).
        actor: String,
        /// Transaction identifier, 1..=2147483647.
        trans_id: u32,
    },
    /// `<set transID><access .../></set>`.
    Set {
        /// Transaction identifier, 1..=2147483647.
        trans_id: u32,
        /// The entry to create, replace or (without actions) delete.
        access: AccessElement,
    },
}

impl AccessRequest {
    /// The request's transaction identifier, which every answer carries (ACC-15).
    pub fn trans_id(&self) -> u32 {
        match self {
            Self::Query { trans_id, .. }
            | Self::Get { trans_id, .. }
            | Self::Set { trans_id, .. } => *trans_id,
        }
    }
}

/// The `access` element (RFC 3341 §6). `actor` is kept as written (escaped pattern);
/// `actions: None` means delete (absent attribute); `last_update` as written (RFC 3339 text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessElement {
    /// The subject.
    pub owner: String,
    /// The actor value, escaped (ACC-07).
    pub actor: String,
    /// The permissions; absent to delete the entry (and in the owner's notice of a deletion).
    pub actions: Option<Vec<Action>>,
    /// The entry's timestamp as written; absent when creating.
    pub last_update: Option<String>,
}

/// What the service answers (and the owner notification, which is `Set`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessAnswer {
    /// `<allow transID/>`: every queried action is granted.
    Allow {
        /// The query's transaction identifier.
        trans_id: u32,
    },
    /// `<deny transID/>`: not every queried action is granted.
    Deny {
        /// The query's transaction identifier.
        trans_id: u32,
    },
    /// `<set transID><access/></set>`: the entry a `get` asked for, or the owner's notice of a
    /// change made by the `set` with this transaction identifier.
    Set {
        /// The request's transaction identifier.
        trans_id: u32,
        /// The entry.
        access: AccessElement,
    },
    /// `<reply code='...' transID='...'>text</reply>` (RFC 3340 §6.1.2), text may be empty.
    Reply {
        /// Three-digit reply code (RFC 3341 §4.5).
        code: u16,
        /// The request's transaction identifier.
        trans_id: u32,
        /// Diagnostic, without surrounding whitespace; empty for none.
        text: String,
    },
}

impl AccessAnswer {
    /// The transaction identifier of the request answered (ACC-15).
    pub fn trans_id(&self) -> u32 {
        match self {
            Self::Allow { trans_id }
            | Self::Deny { trans_id }
            | Self::Set { trans_id, .. }
            | Self::Reply { trans_id, .. } => *trans_id,
        }
    }
}

/// Why an element could not be read: `code` is the reply code to answer with (500 syntax / 501 parameter),
/// `trans_id` when the element carried a readable one (so the answer can carry it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct AccessParseError {
    /// 500: not well-formed XML (or not UTF-8); 501: well-formed, but not what RFC 3341 §6's
    /// DTD allows.
    pub code: u16,
    /// Diagnostic.
    pub text: String,
    /// The element's transaction identifier, when it had a valid one.
    pub trans_id: Option<u32>,
}

/// Reads one request element (`query`, `get` or `set`), possibly surrounded by whitespace.
pub fn parse_request(element: &[u8]) -> Result<AccessRequest, AccessParseError> {
    let mut p = Parser::new(element)?;
    let (start, open) = p.root()?;
    let request = match start.name().as_ref() {
        b"query" => {
            let a = p.attributes(&start)?;
            let actions = p.actions(a.actions.as_deref(), "query")?;
            let request = AccessRequest::Query {
                owner: p.required(a.owner, "owner", "query")?,
                actor: p.required(a.actor, "actor", "query")?,
                actions: actions.ok_or_else(|| p.invalid("query needs actions"))?,
                trans_id: p.trans_id(a.trans_id.as_deref(), "query")?,
            };
            p.empty_content(open, "query")?;
            request
        }
        b"get" => {
            let a = p.attributes(&start)?;
            let request = AccessRequest::Get {
                owner: p.required(a.owner, "owner", "get")?,
                actor: p.required(a.actor, "actor", "get")?,
                trans_id: p.trans_id(a.trans_id.as_deref(), "get")?,
            };
            p.empty_content(open, "get")?;
            request
        }
        b"set" => {
            let a = p.attributes(&start)?;
            let trans_id = p.trans_id(a.trans_id.as_deref(), "set")?;
            AccessRequest::Set {
                trans_id,
                access: p.set_content(open)?,
            }
        }
        other => return Err(p.unknown(other, "query, get or set")),
    };
    p.end()?;
    Ok(request)
}

/// Reads one answer element (`allow`, `deny`, `set` or `reply`), possibly surrounded by
/// whitespace.
pub fn parse_answer(element: &[u8]) -> Result<AccessAnswer, AccessParseError> {
    let mut p = Parser::new(element)?;
    let (start, open) = p.root()?;
    let answer = match start.name().as_ref() {
        name @ (b"allow" | b"deny") => {
            let allow = name == b"allow";
            let what = if allow { "allow" } else { "deny" };
            let a = p.attributes(&start)?;
            let trans_id = p.trans_id(a.trans_id.as_deref(), what)?;
            p.empty_content(open, what)?;
            if allow {
                AccessAnswer::Allow { trans_id }
            } else {
                AccessAnswer::Deny { trans_id }
            }
        }
        b"set" => {
            let a = p.attributes(&start)?;
            let trans_id = p.trans_id(a.trans_id.as_deref(), "set")?;
            AccessAnswer::Set {
                trans_id,
                access: p.set_content(open)?,
            }
        }
        b"reply" => {
            let a = p.attributes(&start)?;
            let trans_id = p.trans_id(a.trans_id.as_deref(), "reply")?;
            let code = p.reply_code(a.code.as_deref())?;
            AccessAnswer::Reply {
                code,
                trans_id,
                text: p.text_content(open)?,
            }
        }
        other => return Err(p.unknown(other, "allow, deny, set or reply")),
    };
    p.end()?;
    Ok(answer)
}

/// Writes a request element (one line, no line break).
///
/// Values must consist of XML characters: a C0 control other than tab, line feed and carriage
/// return, U+FFFE or U+FFFF cannot be written and comes out as U+FFFD, so the output is always
/// well-formed. Transaction identifiers are written as given (valid ones are 1..=2147483647).
pub fn format_request(request: &AccessRequest) -> String {
    let mut out = String::with_capacity(128);
    match request {
        AccessRequest::Query {
            owner,
            actor,
            actions,
            trans_id,
        } => {
            out.push_str("<query");
            attribute(&mut out, "owner", owner);
            attribute(&mut out, "actor", actor);
            attribute(&mut out, "actions", &format_actions(actions));
            trans_id_attribute(&mut out, *trans_id);
            out.push_str(" />");
        }
        AccessRequest::Get {
            owner,
            actor,
            trans_id,
        } => {
            out.push_str("<get");
            attribute(&mut out, "owner", owner);
            attribute(&mut out, "actor", actor);
            trans_id_attribute(&mut out, *trans_id);
            out.push_str(" />");
        }
        AccessRequest::Set { trans_id, access } => set_element(&mut out, *trans_id, access),
    }
    out
}

/// Writes an answer element (one line, no line break). A reply's text is written without its
/// surrounding whitespace, which is not part of it (see [`AccessAnswer::Reply`]); the code
/// must be a three-digit reply code. Otherwise as [`format_request`].
pub fn format_answer(answer: &AccessAnswer) -> String {
    let mut out = String::with_capacity(128);
    match answer {
        AccessAnswer::Allow { trans_id } => {
            out.push_str("<allow");
            trans_id_attribute(&mut out, *trans_id);
            out.push_str(" />");
        }
        AccessAnswer::Deny { trans_id } => {
            out.push_str("<deny");
            trans_id_attribute(&mut out, *trans_id);
            out.push_str(" />");
        }
        AccessAnswer::Set { trans_id, access } => set_element(&mut out, *trans_id, access),
        AccessAnswer::Reply {
            code,
            trans_id,
            text,
        } => {
            out.push_str("<reply code='");
            out.push_str(&code.to_string());
            out.push('\'');
            trans_id_attribute(&mut out, *trans_id);
            let text = text.trim_matches(is_xml_space);
            if text.is_empty() {
                out.push_str(" />");
            } else {
                out.push('>');
                escape_into(&mut out, text, false);
                out.push_str("</reply>");
            }
        }
    }
    out
}

/// The `data` (RFC 3340 §4.4.4) that carries `element` from `originator` to `recipient`,
/// inline: `content='#Content'` and `<data-content Name='Content'>ELEMENT</data-content>`, as
/// RFC 3341 §4.1 and the digest's §6 exchange send requests and answers.
pub fn element_data(originator: &str, recipient: &str, element: &str) -> Bytes {
    DataBuilder::new(originator).to(recipient).markup(element)
}

/// The access element a delivered `data` carries (RFC 3341 §4.1): what its `data-content`
/// holds, or the body of the MIME part its `content='cid:…'` names. `None` when the content is
/// only referred to by URI. The bytes are a slice of the payload, for [`parse_request`] or
/// [`parse_answer`].
pub fn carried_element(data: &Data) -> Option<Bytes> {
    match client::content(data) {
        Content::Inline(raw) => inner_range(raw).map(|range| raw.slice(range)),
        Content::Part(body) => Some(body),
        Content::Reference(_) => None,
    }
}

/// Where the content of an element sits: from after its start tag to its end tag. `raw` is a
/// `data-content` element that the APEX parser already found well-formed, so its start tag
/// ends at the first `>` outside quotes and its end tag is the last `</`.
fn inner_range(raw: &[u8]) -> Option<Range<usize>> {
    let mut quote = None;
    let mut tag_end = None;
    for (i, &b) in raw.iter().enumerate() {
        match (quote, b) {
            (None, b'\'' | b'"') => quote = Some(b),
            (Some(q), b) if b == q => quote = None,
            (None, b'>') => {
                tag_end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let tag_end = tag_end?;
    if tag_end > 0 && raw[tag_end - 1] == b'/' {
        return Some(tag_end + 1..tag_end + 1);
    }
    let close = memchr::memmem::rfind(raw, b"</")?;
    (close > tag_end).then_some(tag_end + 1..close)
}

fn set_element(out: &mut String, trans_id: u32, access: &AccessElement) {
    out.push_str("<set");
    trans_id_attribute(out, trans_id);
    out.push_str("><access");
    attribute(out, "owner", &access.owner);
    attribute(out, "actor", &access.actor);
    if let Some(actions) = &access.actions {
        attribute(out, "actions", &format_actions(actions));
    }
    if let Some(last_update) = &access.last_update {
        attribute(out, "lastUpdate", last_update);
    }
    out.push_str(" /></set>");
}

fn trans_id_attribute(out: &mut String, trans_id: u32) {
    out.push_str(" transID='");
    out.push_str(&trans_id.to_string());
    out.push('\'');
}

/// ` name='value'`, the value escaped.
fn attribute(out: &mut String, name: &str, value: &str) {
    out.push(' ');
    out.push_str(name);
    out.push_str("='");
    escape_into(out, value, true);
    out.push('\'');
}

/// Escapes `&`, `<`, `>`, `'` and `"`. A carriage return becomes `&#13;` (a parser would
/// normalise a literal one away, XML 1.0 §2.11), and in an attribute tab and line feed become
/// references too (attribute-value normalisation would turn them into spaces, §3.3.3).
fn escape_into(out: &mut String, text: &str, in_attribute: bool) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' if in_attribute => out.push_str("&#10;"),
            '\t' if in_attribute => out.push_str("&#9;"),
            c if !is_xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// XML 1.0's `Char` production (Rust strings hold no surrogates).
fn is_xml_char(c: char) -> bool {
    !matches!(c, '\0'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}')
}

/// XML's `S`: space, tab, carriage return, line feed.
fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// The attributes an access element may have, unescaped; others are skipped.
#[derive(Debug, Default)]
struct Attributes {
    owner: Option<String>,
    actor: Option<String>,
    actions: Option<String>,
    trans_id: Option<String>,
    last_update: Option<String>,
    code: Option<String>,
}

/// What the reader found next, comments and processing instructions skipped.
enum Node<'a> {
    Open(BytesStart<'a>),
    Empty(BytesStart<'a>),
    Close,
    /// Character data (or CDATA), unescaped.
    Text(String),
    Eof,
}

/// One element being read; remembers its transID once read, so that every later error can
/// carry it.
struct Parser<'a> {
    reader: Reader<&'a [u8]>,
    /// The root element's transID, once read and valid.
    trans_id: Option<u32>,
    /// Whether the root element's attributes were read (later ones are the child's).
    root_read: bool,
}

impl<'a> Parser<'a> {
    fn new(element: &'a [u8]) -> Result<Self, AccessParseError> {
        let text = std::str::from_utf8(element).map_err(|_| AccessParseError {
            code: code::SYNTAX_ERROR,
            text: "element is not UTF-8".to_owned(),
            trans_id: None,
        })?;
        let mut reader = Reader::from_str(text);
        reader.config_mut().check_comments = true;
        Ok(Self {
            reader,
            trans_id: None,
            root_read: false,
        })
    }

    fn error(&self, code: u16, text: impl Into<String>) -> AccessParseError {
        AccessParseError {
            code,
            text: text.into(),
            trans_id: self.trans_id,
        }
    }

    /// 500: not well-formed.
    fn syntax(&self, text: impl Into<String>) -> AccessParseError {
        self.error(code::SYNTAX_ERROR, text)
    }

    /// 501: well-formed, but not what the DTD allows.
    fn invalid(&self, text: impl Into<String>) -> AccessParseError {
        self.error(code::PARAMETER_ERROR, text)
    }

    fn unknown(&self, name: &[u8], expected: &str) -> AccessParseError {
        self.invalid(format!(
            "unexpected element '{}': expected {expected}",
            String::from_utf8_lossy(name)
        ))
    }

    fn next(&mut self) -> Result<Node<'a>, AccessParseError> {
        loop {
            let event = self
                .reader
                .read_event()
                .map_err(|e| self.syntax(format!("poorly-formed XML: {e}")))?;
            return Ok(match event {
                Event::Comment(_) | Event::PI(_) => continue,
                Event::Decl(_) => return Err(self.syntax("XML declaration is not allowed")),
                Event::DocType(_) => return Err(self.syntax("DOCTYPE is not allowed")),
                Event::Start(start) => Node::Open(start),
                Event::Empty(start) => Node::Empty(start),
                Event::End(_) => Node::Close,
                Event::Text(text) => Node::Text(
                    self.xml_chars(
                        text.unescape()
                            .map_err(|e| self.syntax(format!("bad character data: {e}")))?
                            .into_owned(),
                    )?,
                ),
                Event::CData(data) => Node::Text(
                    self.xml_chars(
                        std::str::from_utf8(&data)
                            .map_err(|_| self.syntax("CDATA is not UTF-8"))?
                            .to_owned(),
                    )?,
                ),
                Event::Eof => Node::Eof,
            });
        }
    }

    /// `text` when every character of it is one XML 1.0 allows (written directly or as a
    /// character reference): a control character other than tab, CR and LF cannot be written
    /// back, so it is refused rather than changed.
    fn xml_chars(&self, text: String) -> Result<String, AccessParseError> {
        if text.chars().all(is_xml_char) {
            Ok(text)
        } else {
            Err(self.syntax("a character XML 1.0 does not allow"))
        }
    }

    /// The root element's start tag, and whether it is open (has an end tag to come).
    fn root(&mut self) -> Result<(BytesStart<'a>, bool), AccessParseError> {
        loop {
            match self.next()? {
                Node::Text(text) if is_space(&text) => {}
                Node::Open(start) => return Ok((start, true)),
                Node::Empty(start) => return Ok((start, false)),
                Node::Text(_) => return Err(self.syntax("text outside the element")),
                Node::Close | Node::Eof => return Err(self.syntax("no element")),
            }
        }
    }

    /// After the root element: nothing but whitespace and comments.
    fn end(&mut self) -> Result<(), AccessParseError> {
        loop {
            match self.next()? {
                Node::Eof => return Ok(()),
                Node::Text(text) if is_space(&text) => {}
                Node::Text(_) => return Err(self.syntax("text after the element")),
                Node::Open(_) | Node::Empty(_) | Node::Close => {
                    return Err(self.syntax("more than one element"))
                }
            }
        }
    }

    /// Reads the attributes of `start`, at most [`MAX_ATTRIBUTES`]. The root element's
    /// transID, when valid, is remembered as soon as it is read, so that the errors found
    /// after it (in later attributes too) carry it.
    fn attributes(&mut self, start: &BytesStart<'_>) -> Result<Attributes, AccessParseError> {
        let root = !self.root_read;
        self.root_read = true;
        let mut found = Attributes::default();
        for (n, attribute) in start.attributes().enumerate() {
            if n == MAX_ATTRIBUTES {
                return Err(self.invalid(format!("more than {MAX_ATTRIBUTES} attributes")));
            }
            let attribute = attribute.map_err(|e| self.syntax(format!("bad attribute: {e}")))?;
            let slot = match attribute.key.as_ref() {
                b"owner" => &mut found.owner,
                b"actor" => &mut found.actor,
                b"actions" => &mut found.actions,
                b"transID" => &mut found.trans_id,
                b"lastUpdate" => &mut found.last_update,
                b"code" => &mut found.code,
                _ => continue,
            };
            let value = attribute
                .unescape_value()
                .map_err(|e| self.syntax(format!("bad attribute value: {e}")))?;
            if root && attribute.key.as_ref() == b"transID" {
                self.trans_id = valid_trans_id(&value);
            }
            *slot = Some(self.xml_chars(value.into_owned())?);
        }
        Ok(found)
    }

    fn required(
        &self,
        value: Option<String>,
        name: &str,
        element: &str,
    ) -> Result<String, AccessParseError> {
        value.ok_or_else(|| self.invalid(format!("{element} needs the attribute {name}")))
    }

    /// A UNIQID (RFC 3340 §6.1.1): 1..=2147483647, decimal digits only.
    fn trans_id(&self, value: Option<&str>, element: &str) -> Result<u32, AccessParseError> {
        let value =
            value.ok_or_else(|| self.invalid(format!("{element} needs the attribute transID")))?;
        valid_trans_id(value)
            .ok_or_else(|| self.invalid(format!("'{value}' is not a valid transaction identifier")))
    }

    /// A reply code: three digits, the first 1 to 5 (RFC 3340 §10).
    fn reply_code(&self, value: Option<&str>) -> Result<u16, AccessParseError> {
        let value = value.ok_or_else(|| self.invalid("reply needs the attribute code"))?;
        let b = value.as_bytes();
        let three_digits =
            b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && b[1..].iter().all(u8::is_ascii_digit);
        three_digits
            .then(|| value.parse().ok())
            .flatten()
            .ok_or_else(|| self.invalid(format!("'{value}' is not a three-digit reply code")))
    }

    /// An `actions` list, when present (ACC-04: `service:operation` tokens, at least one).
    fn actions(
        &self,
        value: Option<&str>,
        element: &str,
    ) -> Result<Option<Vec<Action>>, AccessParseError> {
        value
            .map(|list| {
                parse_actions(list).map_err(|e| self.invalid(format!("{element} actions: {e}")))
            })
            .transpose()
    }

    /// The content of an EMPTY element: nothing (whitespace is tolerated) up to its end tag.
    fn empty_content(&mut self, open: bool, element: &str) -> Result<(), AccessParseError> {
        if !open {
            return Ok(());
        }
        loop {
            match self.next()? {
                Node::Close => return Ok(()),
                Node::Text(text) if is_space(&text) => {}
                Node::Text(_) => return Err(self.invalid(format!("{element} has no text"))),
                Node::Open(_) | Node::Empty(_) => {
                    return Err(self.invalid(format!("{element} has no child elements")))
                }
                Node::Eof => return Err(self.syntax(format!("{element} is not closed"))),
            }
        }
    }

    /// The content of `set`: exactly one `access` element, whitespace around it.
    fn set_content(&mut self, open: bool) -> Result<AccessElement, AccessParseError> {
        if !open {
            return Err(self.invalid("set needs one access element"));
        }
        let mut access = None;
        loop {
            match self.next()? {
                Node::Close => break,
                Node::Text(text) if is_space(&text) => {}
                Node::Text(_) => return Err(self.invalid("set has no text")),
                Node::Open(start) | Node::Empty(start) if start.name().as_ref() != b"access" => {
                    return Err(self.unknown(start.name().as_ref(), "access"))
                }
                Node::Open(_) | Node::Empty(_) if access.is_some() => {
                    return Err(self.invalid("set has more than one access element"))
                }
                Node::Open(start) => {
                    access = Some(self.access(&start)?);
                    self.empty_content(true, "access")?;
                }
                Node::Empty(start) => access = Some(self.access(&start)?),
                Node::Eof => return Err(self.syntax("set is not closed")),
            }
        }
        access.ok_or_else(|| self.invalid("set needs one access element"))
    }

    fn access(&mut self, start: &BytesStart<'_>) -> Result<AccessElement, AccessParseError> {
        let a = self.attributes(start)?;
        let actions = self.actions(a.actions.as_deref(), "access")?;
        Ok(AccessElement {
            owner: self.required(a.owner, "owner", "access")?,
            actor: self.required(a.actor, "actor", "access")?,
            actions,
            last_update: a.last_update,
        })
    }

    /// The text of `reply`, without surrounding whitespace; no child elements.
    fn text_content(&mut self, open: bool) -> Result<String, AccessParseError> {
        let mut text = String::new();
        if !open {
            return Ok(text);
        }
        loop {
            match self.next()? {
                Node::Close => break,
                Node::Text(more) => text.push_str(&more),
                Node::Open(_) | Node::Empty(_) => {
                    return Err(self.invalid("reply has no child elements"))
                }
                Node::Eof => return Err(self.syntax("reply is not closed")),
            }
        }
        let trimmed = text.trim_matches(is_xml_space);
        if trimmed.len() != text.len() {
            text = trimmed.to_owned();
        }
        Ok(text)
    }
}

fn is_space(text: &str) -> bool {
    text.chars().all(is_xml_space)
}

fn valid_trans_id(value: &str) -> Option<u32> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_31BIT).contains(n))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::apex::client::{parse_incoming, Incoming};
    use proptest::prelude::*;

    fn acts(list: &str) -> Vec<Action> {
        parse_actions(list).unwrap()
    }

    fn request(text: &str) -> AccessRequest {
        parse_request(text.as_bytes()).unwrap()
    }

    fn answer(text: &str) -> AccessAnswer {
        parse_answer(text.as_bytes()).unwrap()
    }

    fn request_err(text: &str) -> AccessParseError {
        parse_request(text.as_bytes()).unwrap_err()
    }

    fn answer_err(text: &str) -> AccessParseError {
        parse_answer(text.as_bytes()).unwrap_err()
    }

    fn entry(actor: &str, actions: Option<&str>, last_update: Option<&str>) -> AccessElement {
        AccessElement {
            owner: "fred@example.com".to_owned(),
            actor: actor.to_owned(),
            actions: actions.map(acts),
            last_update: last_update.map(str::to_owned),
        }
    }

    /// The digest's §6 query, spread over two lines as it shows it.
    const QUERY_6: &str = "<query owner='fred@example.com' actor='barney@example.com'\r\n             actions='core:data presence:subscribe' transID='7001' />";

    #[test]
    fn acc_11_query_of_the_worked_exchange() {
        let query = request(QUERY_6);
        assert_eq!(
            query,
            AccessRequest::Query {
                owner: "fred@example.com".into(),
                actor: "barney@example.com".into(),
                actions: acts("core:data presence:subscribe"),
                trans_id: 7001,
            }
        );
        assert_eq!(
            format_request(&query),
            "<query owner='fred@example.com' actor='barney@example.com' actions='core:data presence:subscribe' transID='7001' />"
        );
        // Inside its data-content, surrounded by the whitespace of the digest's layout.
        let padded = format!("\r\n      {QUERY_6}\r\n   ");
        assert_eq!(request(&padded), query);
        assert_eq!(query.trans_id(), 7001);
    }

    #[test]
    fn acc_15_deny_of_the_worked_exchange_byte_exact() {
        let deny = AccessAnswer::Deny { trans_id: 7001 };
        assert_eq!(format_answer(&deny), "<deny transID='7001' />");
        assert_eq!(answer("<deny transID='7001' />"), deny);
        // The whole data the service sends fred (digest §6: payload 246 octets).
        let data = element_data(
            "apex=access@example.com",
            "fred@example.com",
            &format_answer(&deny),
        );
        assert_eq!(
            &data[..],
            &b"Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=access@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'><deny transID='7001' /></data-content>\r\n</data>\r\n"[..]
        );
        assert_eq!(data.len(), 246);
        let Ok(Incoming::Data(delivered)) = parse_incoming(&data) else {
            panic!("not a data")
        };
        let element = carried_element(&delivered).unwrap();
        assert_eq!(&element[..], b"<deny transID='7001' />");
        assert_eq!(parse_answer(&element), Ok(deny));
        assert_eq!(
            answer("<allow transID='7001'></allow>"),
            AccessAnswer::Allow { trans_id: 7001 }
        );
        assert_eq!(
            format_answer(&AccessAnswer::Allow { trans_id: 9 }),
            "<allow transID='9' />"
        );
    }

    #[test]
    fn acc_12_acc_13_get_set_and_reply_of_the_digest_examples() {
        let get = request("<get owner='fred@example.com' actor='*@example.com' transID='31' />");
        assert_eq!(
            get,
            AccessRequest::Get {
                owner: "fred@example.com".into(),
                actor: "*@example.com".into(),
                trans_id: 31,
            }
        );
        assert_eq!(
            format_request(&get),
            "<get owner='fred@example.com' actor='*@example.com' transID='31' />"
        );

        let found = answer("<set transID='31'>\r\n  <access owner='fred@example.com' actor='*@example.com'\r\n          actions='core:data' lastUpdate='2024-03-01T10:00:00Z' />\r\n</set>");
        let expected = AccessAnswer::Set {
            trans_id: 31,
            access: entry(
                "*@example.com",
                Some("core:data"),
                Some("2024-03-01T10:00:00Z"),
            ),
        };
        assert_eq!(found, expected);
        assert_eq!(
            format_answer(&found),
            "<set transID='31'><access owner='fred@example.com' actor='*@example.com' actions='core:data' lastUpdate='2024-03-01T10:00:00Z' /></set>"
        );

        let replace = request("<set transID='32'>\r\n  <access owner='fred@example.com' actor='*@example.com'\r\n          actions='core:data presence:watch' lastUpdate='2024-03-01T10:00:00Z' />\r\n</set>");
        assert_eq!(
            replace,
            AccessRequest::Set {
                trans_id: 32,
                access: entry(
                    "*@example.com",
                    Some("core:data presence:watch"),
                    Some("2024-03-01T10:00:00Z")
                ),
            }
        );
        assert_eq!(replace.trans_id(), 32);

        let ok = AccessAnswer::Reply {
            code: 250,
            trans_id: 32,
            text: String::new(),
        };
        assert_eq!(format_answer(&ok), "<reply code='250' transID='32' />");
        assert_eq!(answer("<reply code='250' transID='32' />"), ok);
        assert_eq!(ok.trans_id(), 32);
    }

    #[test]
    fn acc_13_create_and_delete_omit_their_attributes() {
        let create = AccessRequest::Set {
            trans_id: 5,
            access: entry("barney@example.com", Some("core:data"), None),
        };
        let text = format_request(&create);
        assert_eq!(
            text,
            "<set transID='5'><access owner='fred@example.com' actor='barney@example.com' actions='core:data' /></set>"
        );
        assert_eq!(request(&text), create);
        let delete = AccessRequest::Set {
            trans_id: 6,
            access: entry("barney@example.com", None, Some("2024-03-01T10:00:00Z")),
        };
        let text = format_request(&delete);
        assert_eq!(
            text,
            "<set transID='6'><access owner='fred@example.com' actor='barney@example.com' lastUpdate='2024-03-01T10:00:00Z' /></set>"
        );
        assert_eq!(request(&text), delete);
        // The owner's notice of a deletion: owner and actor only.
        let notice = AccessAnswer::Set {
            trans_id: 6,
            access: entry("barney@example.com", None, None),
        };
        let text = format_answer(&notice);
        assert_eq!(
            text,
            "<set transID='6'><access owner='fred@example.com' actor='barney@example.com' /></set>"
        );
        assert_eq!(answer(&text), notice);
        // An access element with an end tag.
        assert_eq!(
            request("<set transID='6'><access owner='fred@example.com' actor='barney@example.com' lastUpdate='2024-03-01T10:00:00Z'> </access></set>"),
            delete
        );
    }

    #[test]
    fn acc_07_actors_are_kept_as_written() {
        // The endpoint `a\b*c@example.com`: escaped in get and access, plain in query.
        let get =
            request(r"<get owner='fred@example.com' actor='a\\b\*c@example.com' transID='1' />");
        let AccessRequest::Get { actor, .. } = &get else {
            panic!()
        };
        assert_eq!(actor, r"a\\b\*c@example.com");
        assert_eq!(
            format_request(&get),
            r"<get owner='fred@example.com' actor='a\\b\*c@example.com' transID='1' />"
        );
        let query = request(
            r"<query owner='fred@example.com' actor='a\b*c@example.com' actions='core:data' transID='2' />",
        );
        let AccessRequest::Query { actor, .. } = &query else {
            panic!()
        };
        assert_eq!(actor, r"a\b*c@example.com");
        // Neither owner nor actor is validated here: the service answers 550 for an owner
        // that is no endpoint (ACC-11 step 2).
        assert!(matches!(
            request("<get owner='not an address' actor='' transID='3' />"),
            AccessRequest::Get { ref owner, ref actor, .. } if owner == "not an address" && actor.is_empty()
        ));
    }

    #[test]
    fn values_are_escaped_and_unescaped() {
        let query = AccessRequest::Query {
            owner: "o'neil&co@example.com".into(),
            actor: "a<b>\"c\"@example.com".into(),
            actions: acts("core:data"),
            trans_id: 1,
        };
        let text = format_request(&query);
        assert_eq!(
            text,
            "<query owner='o&apos;neil&amp;co@example.com' actor='a&lt;b&gt;&quot;c&quot;@example.com' actions='core:data' transID='1' />"
        );
        assert_eq!(request(&text), query);
        // Double-quoted attributes and character references are read too.
        assert_eq!(
            request("<query owner=\"o'neil&#38;co@example.com\" actor='a&lt;b>&#34;c\"@example.com' actions='core:data' transID=\"1\"/>"),
            query
        );
        // Whitespace that a parser would normalise is written as references.
        let reply = AccessAnswer::Reply {
            code: 550,
            trans_id: 4,
            text: "it's <bad> & \"worse\"\r\nline\ttwo".into(),
        };
        let text = format_answer(&reply);
        assert_eq!(
            text,
            "<reply code='550' transID='4'>it&apos;s &lt;bad&gt; &amp; &quot;worse&quot;&#13;\nline\ttwo</reply>"
        );
        assert_eq!(answer(&text), reply);
        let set = AccessAnswer::Set {
            trans_id: 8,
            access: entry("x\r\n\ty@example.com", Some("core:data"), Some("a'b")),
        };
        let text = format_answer(&set);
        assert!(
            text.contains("actor='x&#13;&#10;&#9;y@example.com'"),
            "{text}"
        );
        assert!(text.contains("lastUpdate='a&apos;b'"), "{text}");
        assert_eq!(answer(&text), set);
        // Characters XML cannot carry are replaced, so the output stays well-formed.
        let get = AccessRequest::Get {
            owner: "a\u{1}b@example.com".into(),
            actor: "c@example.com".into(),
            trans_id: 1,
        };
        let text = format_request(&get);
        assert!(text.contains("owner='a\u{FFFD}b@example.com'"), "{text}");
        assert!(parse_request(text.as_bytes()).is_ok());
    }

    /// Found by fuzzing: a control character (raw or as a character reference) in text or in
    /// an attribute was read, then written back as U+FFFD, so the answer changed on its way.
    #[test]
    fn characters_xml_forbids_are_refused_not_changed() {
        for text in [
            "<reply code='555' transID='9'>stale \u{4}d</reply>",
            "<reply code='555' transID='9'>stale &#4;d</reply>",
            "<reply code='555' transID='9'><![CDATA[\u{1}]]></reply>",
        ] {
            let err = parse_answer(text.as_bytes()).unwrap_err();
            assert_eq!(err.code, 500, "{text:?}: {err:?}");
        }
        let err =
            parse_request("<get transID='3' owner='a&#1;b@example.com' actor='*@*' />".as_bytes())
                .unwrap_err();
        assert_eq!((err.code, err.trans_id), (500, Some(3)));
    }

    #[test]
    fn reply_text_and_cdata() {
        let reply = answer("<reply code='551' transID='9' xml:lang='en'>\r\n   no entry for <![CDATA[<that>]]> actor &amp; owner\r\n</reply>");
        assert_eq!(
            reply,
            AccessAnswer::Reply {
                code: 551,
                trans_id: 9,
                text: "no entry for <that> actor & owner".into(),
            }
        );
        // Surrounding whitespace is not part of the text, on the way out either.
        let padded = AccessAnswer::Reply {
            code: 553,
            trans_id: 9,
            text: "  outside \r\n".into(),
        };
        assert_eq!(
            format_answer(&padded),
            "<reply code='553' transID='9'>outside</reply>"
        );
        let blank = AccessAnswer::Reply {
            code: 250,
            trans_id: 9,
            text: " \r\n".into(),
        };
        assert_eq!(format_answer(&blank), "<reply code='250' transID='9' />");
        // Comments and processing instructions are skipped.
        assert_eq!(
            answer("<!-- answer --><reply code='250' transID='9'>o<!-- x -->k</reply><?pi?>"),
            AccessAnswer::Reply {
                code: 250,
                trans_id: 9,
                text: "ok".into()
            }
        );
    }

    /// (element, code, transID the error carries)
    const BAD_REQUESTS: &[(&str, u16, Option<u32>)] = &[
        // Not well-formed, or not an element at all.
        ("", 500, None),
        ("   \r\n", 500, None),
        ("query", 500, None),
        ("<query owner='a@x' actor='b@x' actions='core:data' transID='1'", 500, None),
        ("<get owner='a@x' actor='b@x' transID='1'>", 500, Some(1)),
        ("<get owner='a@x' actor='b@x' transID='1'></set>", 500, Some(1)),
        ("<get owner='a@x' owner='b@x' actor='b@x' transID='1' />", 500, None),
        ("<get owner='a&bogus;' actor='b@x' transID='1' />", 500, None),
        ("<get owner=a@x actor='b@x' transID='1' />", 500, None),
        ("<?xml version='1.0'?><get owner='a@x' actor='b@x' transID='1' />", 500, None),
        ("<!DOCTYPE get><get owner='a@x' actor='b@x' transID='1' />", 500, None),
        ("text<get owner='a@x' actor='b@x' transID='1' />", 500, None),
        ("<get owner='a@x' actor='b@x' transID='1' />text", 500, Some(1)),
        ("<get owner='a@x' actor='b@x' transID='1' /><get owner='a@x' actor='b@x' transID='2' />", 500, Some(1)),
        ("<set transID='4'><access owner='a@x' actor='b@x' actions='core:data' />", 500, Some(4)),
        // Unknown elements.
        ("<allow transID='1' />", 501, None),
        ("<reply code='250' transID='1' />", 501, None),
        ("<access owner='a@x' actor='b@x' actions='core:data' />", 501, None),
        ("<apex:get owner='a@x' actor='b@x' transID='1' />", 501, None),
        // Missing attributes.
        ("<query actor='b@x' actions='core:data' transID='2' />", 501, Some(2)),
        ("<query owner='a@x' actions='core:data' transID='2' />", 501, Some(2)),
        ("<query owner='a@x' actor='b@x' transID='2' />", 501, Some(2)),
        ("<query owner='a@x' actor='b@x' actions='core:data' />", 501, None),
        ("<get actor='b@x' transID='3' />", 501, Some(3)),
        ("<get owner='a@x' transID='3' />", 501, Some(3)),
        ("<get owner='a@x' actor='b@x' />", 501, None),
        ("<set><access owner='a@x' actor='b@x' actions='core:data' /></set>", 501, None),
        ("<set transID='4'><access actor='b@x' actions='core:data' /></set>", 501, Some(4)),
        ("<set transID='4'><access owner='a@x' actions='core:data' /></set>", 501, Some(4)),
        // Bad action tokens (ACC-04).
        ("<query owner='a@x' actor='b@x' actions='' transID='2' />", 501, Some(2)),
        ("<query owner='a@x' actor='b@x' actions='core' transID='2' />", 501, Some(2)),
        ("<query owner='a@x' actor='b@x' actions='core:data :x' transID='2' />", 501, Some(2)),
        ("<set transID='4'><access owner='a@x' actor='b@x' actions='core data' /></set>", 501, Some(4)),
        ("<set transID='4'><access owner='a@x' actor='b@x' actions=' ' /></set>", 501, Some(4)),
        // transID outside 1..=2147483647, or not a plain decimal.
        ("<get owner='a@x' actor='b@x' transID='0' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID='2147483648' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID='99999999999' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID='-1' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID='+1' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID=' 1' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID='' />", 501, None),
        ("<get owner='a@x' actor='b@x' transID='x' />", 501, None),
        // set without exactly one access.
        ("<set transID='4' />", 501, Some(4)),
        ("<set transID='4'></set>", 501, Some(4)),
        ("<set transID='4'> \r\n </set>", 501, Some(4)),
        ("<set transID='4'><access owner='a@x' actor='b@x' /><access owner='a@x' actor='c@x' /></set>", 501, Some(4)),
        ("<set transID='4'><get owner='a@x' actor='b@x' transID='5' /></set>", 501, Some(4)),
        ("<set transID='4'><access owner='a@x' actor='b@x'><x /></access></set>", 501, Some(4)),
        // Text where none is allowed.
        ("<set transID='4'>x<access owner='a@x' actor='b@x' /></set>", 501, Some(4)),
        ("<set transID='4'><access owner='a@x' actor='b@x' />x</set>", 501, Some(4)),
        ("<set transID='4'><access owner='a@x' actor='b@x'>x</access></set>", 501, Some(4)),
        ("<get owner='a@x' actor='b@x' transID='1'>x</get>", 501, Some(1)),
        ("<get owner='a@x' actor='b@x' transID='1'><![CDATA[x]]></get>", 501, Some(1)),
        ("<query owner='a@x' actor='b@x' actions='core:data' transID='2'><x /></query>", 501, Some(2)),
        // Too many attributes.
        ("<get owner='a@x' actor='b@x' transID='1' a='' b='' c='' d='' e='' f='' />", 501, Some(1)),
    ];

    #[test]
    fn every_request_error() {
        for (text, code, trans_id) in BAD_REQUESTS {
            let err = request_err(text);
            assert_eq!(
                (err.code, err.trans_id),
                (*code, *trans_id),
                "{text}: {err}"
            );
            assert!(!err.text.is_empty());
        }
        let err = parse_request(b"<get owner='\xff' actor='b@x' transID='1' />").unwrap_err();
        assert_eq!((err.code, err.trans_id), (500, None));
        // Unknown attributes within the bound are skipped, as the APEX parser does.
        assert!(matches!(
            request("<get owner='a@x' actor='b@x' transID='1' xml:lang='en' />"),
            AccessRequest::Get { trans_id: 1, .. }
        ));
    }

    const BAD_ANSWERS: &[(&str, u16, Option<u32>)] = &[
        ("", 500, None),
        ("<allow transID='1'>", 500, Some(1)),
        ("<deny transID='1' /><deny transID='1' />", 500, Some(1)),
        (
            "<query owner='a@x' actor='b@x' actions='core:data' transID='2' />",
            501,
            None,
        ),
        ("<get owner='a@x' actor='b@x' transID='2' />", 501, None),
        ("<ok />", 501, None),
        ("<allow />", 501, None),
        ("<deny transID='0' />", 501, None),
        ("<allow transID='1'>yes</allow>", 501, Some(1)),
        (
            "<deny transID='1'><reply code='250' transID='1' /></deny>",
            501,
            Some(1),
        ),
        ("<reply transID='1' />", 501, Some(1)),
        ("<reply code='25' transID='1' />", 501, Some(1)),
        ("<reply code='650' transID='1' />", 501, Some(1)),
        ("<reply code='2x0' transID='1' />", 501, Some(1)),
        ("<reply code='250' />", 501, None),
        (
            "<reply code='250' transID='1'>a<b />c</reply>",
            501,
            Some(1),
        ),
        ("<set transID='3' />", 501, Some(3)),
        (
            "<set transID='3'><access owner='a@x' actor='b@x' actions='x' /></set>",
            501,
            Some(3),
        ),
    ];

    #[test]
    fn every_answer_error() {
        for (text, code, trans_id) in BAD_ANSWERS {
            let err = answer_err(text);
            assert_eq!(
                (err.code, err.trans_id),
                (*code, *trans_id),
                "{text}: {err}"
            );
        }
        assert_eq!(
            answer_err("<deny transID='7' ")
                .to_string()
                .split(' ')
                .next(),
            Some("500")
        );
    }

    #[test]
    fn carried_element_inline_empty_and_as_a_part() {
        let data = element_data("fred@example.com", "apex=access@example.com", QUERY_6);
        let Ok(Incoming::Data(delivered)) = parse_incoming(&data) else {
            panic!()
        };
        assert_eq!(
            &carried_element(&delivered).unwrap()[..],
            QUERY_6.as_bytes()
        );
        let empty = Bytes::from_static(b"Content-Type: application/beep+xml\r\n\r\n<data content='#C'><originator identity='a@x' /><recipient identity='apex=access@x' /><data-content Name='C' /></data>");
        let Ok(Incoming::Data(delivered)) = parse_incoming(&empty) else {
            panic!()
        };
        let element = carried_element(&delivered).unwrap();
        assert!(element.is_empty());
        assert_eq!(parse_request(&element).unwrap_err().code, 500);
        // The element as a separate application/beep+xml part (RFC 3341 §4.1).
        let part = client::ContentPart {
            boundary: "XX",
            start_id: "1@x",
            content_id: "2@x",
            content_type: "application/beep+xml",
            body: b"<get owner='a@x' actor='b@x' transID='7' />",
        };
        let related = DataBuilder::new("a@x")
            .to("apex=access@x")
            .related(&part)
            .unwrap();
        let Ok(Incoming::Data(delivered)) = parse_incoming(&related) else {
            panic!()
        };
        assert_eq!(
            parse_request(&carried_element(&delivered).unwrap()).map(|r| r.trans_id()),
            Ok(7)
        );
        // Content that is only referred to carries no element here.
        let reference = Bytes::from_static(b"Content-Type: application/beep+xml\r\n\r\n<data content='http://example.com/x'><originator identity='a@x' /><recipient identity='apex=access@x' /></data>");
        let Ok(Incoming::Data(delivered)) = parse_incoming(&reference) else {
            panic!()
        };
        assert_eq!(carried_element(&delivered), None);
        assert_eq!(service_endpoint("example.com"), "apex=access@example.com");
    }

    #[test]
    fn inner_range_of_data_content() {
        let raw = b"<data-content Name='a>b'>x</y></data-content>\r\n";
        assert_eq!(inner_range(raw), Some(25..30));
        assert_eq!(inner_range(b"<data-content Name='C'/>"), Some(24..24));
        assert_eq!(inner_range(b"<data-content Name='C'"), None);
    }

    /// Text that XML can carry (no C0 controls but tab, LF and CR; no U+FFFE/FFFF).
    fn xml_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                4 => proptest::char::range('a', 'z'),
                2 => proptest::sample::select(vec![
                    '\'', '"', '&', '<', '>', ' ', '\t', '\r', '\n', '*', '\\', '@', '/', '=', ';', '#',
                ]),
                1 => any::<char>().prop_filter("an XML character", |c| is_xml_char(*c)),
            ],
            0..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    fn action() -> impl Strategy<Value = Action> {
        ("[a-z][a-z0-9._-]{0,7}", "[a-z][a-z0-9._-]{0,7}").prop_map(|(service, operation)| {
            Action::parse(&format!("{service}:{operation}")).unwrap()
        })
    }

    fn actions() -> impl Strategy<Value = Vec<Action>> {
        proptest::collection::vec(action(), 1..4)
    }

    fn trans_id() -> impl Strategy<Value = u32> {
        1..=MAX_31BIT
    }

    fn access_element() -> impl Strategy<Value = AccessElement> {
        (
            xml_text(),
            xml_text(),
            proptest::option::of(actions()),
            proptest::option::of(xml_text()),
        )
            .prop_map(|(owner, actor, actions, last_update)| AccessElement {
                owner,
                actor,
                actions,
                last_update,
            })
    }

    fn any_request() -> impl Strategy<Value = AccessRequest> {
        prop_oneof![
            (xml_text(), xml_text(), actions(), trans_id()).prop_map(
                |(owner, actor, actions, trans_id)| AccessRequest::Query {
                    owner,
                    actor,
                    actions,
                    trans_id
                }
            ),
            (xml_text(), xml_text(), trans_id()).prop_map(|(owner, actor, trans_id)| {
                AccessRequest::Get {
                    owner,
                    actor,
                    trans_id,
                }
            }),
            (trans_id(), access_element())
                .prop_map(|(trans_id, access)| AccessRequest::Set { trans_id, access }),
        ]
    }

    fn any_answer() -> impl Strategy<Value = AccessAnswer> {
        prop_oneof![
            trans_id().prop_map(|trans_id| AccessAnswer::Allow { trans_id }),
            trans_id().prop_map(|trans_id| AccessAnswer::Deny { trans_id }),
            (trans_id(), access_element())
                .prop_map(|(trans_id, access)| AccessAnswer::Set { trans_id, access }),
            (100u16..600, trans_id(), xml_text()).prop_map(|(code, trans_id, text)| {
                AccessAnswer::Reply {
                    code,
                    trans_id,
                    text,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in any_request()) {
            let text = format_request(&request);
            let parsed = parse_request(text.as_bytes()).unwrap();
            prop_assert_eq!(&parsed, &request);
            prop_assert_eq!(format_request(&parsed), text.clone());
            // As it arrives inside a data-content, padded.
            let padded = format!("\r\n   {text}\r\n");
            prop_assert_eq!(&parse_request(padded.as_bytes()).unwrap(), &request);
            // `set` is both a request and an answer; the others are one or the other.
            let is_set = matches!(request, AccessRequest::Set { .. });
            prop_assert_eq!(parse_answer(text.as_bytes()).is_ok(), is_set);
        }

        #[test]
        fn answers_round_trip(answer in any_answer()) {
            let text = format_answer(&answer);
            let parsed = parse_answer(text.as_bytes()).unwrap();
            let expected = match &answer {
                // Surrounding whitespace is not part of a reply's text.
                AccessAnswer::Reply { code, trans_id, text } => AccessAnswer::Reply {
                    code: *code,
                    trans_id: *trans_id,
                    text: text.trim_matches(is_xml_space).to_owned(),
                },
                other => other.clone(),
            };
            prop_assert_eq!(&parsed, &expected);
            prop_assert_eq!(format_answer(&parsed), text);
        }

        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            for result in [parse_request(&bytes).err(), parse_answer(&bytes).err()].into_iter().flatten() {
                prop_assert!(result.code == 500 || result.code == 501);
            }
        }
    }
}
