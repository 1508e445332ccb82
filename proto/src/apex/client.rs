//! The endpoint side of APEX (RFC 3340 §4.2, §4.4, §6.2): what an application attached to a
//! relay sends, and how it reads what the relay sends it. Pure builders and parsers, no state:
//! the caller drives a [`Session`](crate::Session) (bytes in, bytes out) and calls these.
//!
//! This module owns, for every endpoint client of apexd (the `apex` CLI, the `apex-load`
//! generator, the loopback test client and `testing::RelayNet`'s clients):
//!
//! * the `attach` document (and a relay's `bind`, [`bind_offer`]), piggybacked on the channel `start` or sent as a MSG
//!   ([`attach_offer`], [`attach_message`]), and reading the relay's answer to it or to a
//!   `data` ([`parse_answer`], [`parse_piggybacked_answer`]);
//! * the one `data` builder ([`DataBuilder`]): originator, recipients, options such as
//!   `statusRequest`, content inline as `data-content` or as a separate MIME part. The relay
//!   builds its own reports with it too;
//! * reading what arrives on the APEX channel ([`parse_incoming`]): a `data` delivery, a
//!   `statusResponse` from `apex=report@DOMAIN` ([`StatusResponse`], APEX-38) or a `terminate`;
//!   and a delivered data's content ([`content`]), the MIME part found with the one
//!   `multipart/related` splitter, [`split_related`] (shared with the relay's parser);
//! * the `ok` reply to a delivery ([`ok_payload`]).

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

use crate::apex::addr::Endpoint;
use crate::apex::msg::{parse_document, parse_message, ApexLimits, Data, OpError, Operation};
use crate::apex::options::REPORT_SERVICE;
use crate::apex::relay::APEX_PROFILE;
use crate::beep::mgmt::{code, ProfileOffer};
use crate::beep::mime::{Entity, BEEP_XML_HEADERS};
use crate::xml;

pub use crate::apex::msg::{ok_payload, split_related, Related, RelatedPart};

/// The `Name` of the `data-content` element of every data built here (`content='#Content'`,
/// RFC 3340 §4.1).
pub const CONTENT_NAME: &str = "Content";

/// The start tag of the `data-content` element of every data built here.
pub const DATA_CONTENT_OPEN: &[u8] = b"<data-content Name='Content'>";

/// What follows the inline content of every data built here.
const DATA_CONTENT_CLOSE: &[u8] = b"</data-content>\r\n</data>\r\n";

/// The `attach` element for `endpoint` with transaction `trans_id` (RFC 3340 §4.4.1), as
/// piggybacked on the channel `start` (RFC 3340 §4.2, APEX-06): no entity headers.
pub fn attach_document(endpoint: &str, trans_id: u32) -> String {
    format!(
        "<attach endpoint='{}' transID='{trans_id}' />",
        xml::escape(endpoint)
    )
}

/// The APEX profile offer for a channel `start` with the `attach` piggybacked.
pub fn attach_offer(endpoint: &str, trans_id: u32) -> ProfileOffer {
    apex_offer(attach_document(endpoint, trans_id))
}

/// The `attach` as a MSG payload (entity headers included), for a relay that ignored the
/// piggybacked one.
pub fn attach_message(endpoint: &str, trans_id: u32) -> Bytes {
    with_headers(&attach_document(endpoint, trans_id))
}

/// The `bind` element for the relay of `domain` with transaction `trans_id` (RFC 3340 §4.4.2):
/// what a relay sends when it opens a link to another relay's apex-mesh port.
pub fn bind_document(domain: &str, trans_id: u32) -> String {
    format!(
        "<bind relay='{}' transID='{trans_id}' />",
        xml::escape(domain)
    )
}

/// The APEX profile offer for a channel `start` with the `bind` piggybacked.
pub fn bind_offer(domain: &str, trans_id: u32) -> ProfileOffer {
    apex_offer(bind_document(domain, trans_id))
}

fn apex_offer(piggyback: String) -> ProfileOffer {
    ProfileOffer {
        uri: APEX_PROFILE.to_owned(),
        content: Some(Bytes::from(piggyback)),
    }
}

/// The `bind` as a MSG payload (entity headers included), for a relay that accepted the
/// channel without answering the piggybacked one (RFC 3340 §4.2).
pub fn bind_message(domain: &str, trans_id: u32) -> Bytes {
    with_headers(&bind_document(domain, trans_id))
}

fn with_headers(doc: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(BEEP_XML_HEADERS.len() + doc.len() + 2);
    out.put_slice(BEEP_XML_HEADERS);
    out.put_slice(doc.as_bytes());
    out.put_slice(b"\r\n");
    out.freeze()
}

/// The relay's answer to an `attach` or a `data` (RFC 3340 §9.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `ok`.
    Ok,
    /// `error`.
    Error {
        /// Reply code.
        code: u16,
        /// Diagnostic (possibly empty).
        text: String,
    },
}

impl Answer {
    fn from_operation(op: Operation) -> Result<Self, OpError> {
        match op {
            Operation::Ok => Ok(Answer::Ok),
            Operation::Error { code, text } => Ok(Answer::Error { code, text }),
            other => Err(OpError {
                code: code::PARAMETER_ERROR,
                text: format!("expected ok or error, got {}", operation_name(&other)),
            }),
        }
    }
}

fn operation_name(op: &Operation) -> &'static str {
    match op {
        Operation::Attach { .. } => "attach",
        Operation::Bind { .. } => "bind",
        Operation::Terminate { .. } => "terminate",
        Operation::Data(_) => "data",
        Operation::Ok => "ok",
        Operation::Error { .. } => "error",
    }
}

/// The answer in a RPY or ERR payload (entity headers included). The `ok` this crate writes
/// is recognised without parsing.
pub fn parse_answer(payload: &Bytes) -> Result<Answer, OpError> {
    if payload[..] == ok_payload()[..] {
        return Ok(Answer::Ok);
    }
    Answer::from_operation(parse_message(payload, &ApexLimits::default())?)
}

/// The answer piggybacked on the `start` reply (`profile` element content, no headers).
pub fn parse_piggybacked_answer(content: &Bytes) -> Result<Answer, OpError> {
    Answer::from_operation(parse_document(content, &ApexLimits::default())?)
}

/// A MIME part to carry a data's content (RFC 3340 §4.1), and the `multipart/related`
/// framing around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentPart<'a> {
    /// The multipart boundary; must not occur in `body` after a line break.
    pub boundary: &'a str,
    /// The Content-ID of the control document (without angle brackets).
    pub start_id: &'a str,
    /// The Content-ID of the content part; `content` is `cid:` it (APEX-07, APEX-09).
    pub content_id: &'a str,
    /// The content part's Content-Type.
    pub content_type: &'a str,
    /// The content, sent as is (binary transfer encoding, APEX-08).
    pub body: &'a [u8],
}

/// Builds `data` payloads (RFC 3340 §4.4.4, §9.1) laid out one element a line, with a
/// three-space indent and `data-content Name='Content'`. Identities are XML-escaped; options
/// are written as given (complete `option` elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataBuilder<'a> {
    originator: &'a str,
    recipients: Vec<&'a str>,
    options: Vec<Cow<'a, str>>,
}

impl<'a> DataBuilder<'a> {
    /// A data from `originator`, so far to no one.
    pub fn new(originator: &'a str) -> Self {
        Self {
            originator,
            recipients: Vec::new(),
            options: Vec::new(),
        }
    }

    /// Adds a recipient.
    pub fn to(mut self, recipient: &'a str) -> Self {
        self.recipients.push(recipient);
        self
    }

    /// Adds recipients.
    pub fn to_all(mut self, recipients: impl IntoIterator<Item = &'a str>) -> Self {
        self.recipients.extend(recipients);
        self
    }

    /// Adds a per-data `statusRequest` option (RFC 3340 §6.1.2) with `trans_id`: the relays
    /// answer with a statusResponse from `apex=report@DOMAIN` (APEX-38).
    pub fn status_request(self, trans_id: u32) -> Self {
        self.option(format!(
            "<option internal='statusRequest' transID='{trans_id}' />"
        ))
    }

    /// Adds a per-data option: a complete `option` element, written as given.
    pub fn option(mut self, element: impl Into<Cow<'a, str>>) -> Self {
        self.options.push(element.into());
        self
    }

    /// The control document up to the content: start tag, originator, recipients, options.
    fn control_head(&self, out: &mut BytesMut, content: &str) {
        out.put_slice(b"<data content='");
        out.put_slice(xml::escape(content).as_bytes());
        out.put_slice(b"'>\r\n   <originator identity='");
        out.put_slice(xml::escape(self.originator).as_bytes());
        out.put_slice(b"' />\r\n");
        for recipient in &self.recipients {
            out.put_slice(b"   <recipient identity='");
            out.put_slice(xml::escape(recipient).as_bytes());
            out.put_slice(b"' />\r\n");
        }
        for option in &self.options {
            out.put_slice(b"   ");
            out.put_slice(option.as_bytes());
            out.put_slice(b"\r\n");
        }
    }

    /// The message with inline content, split around it: (everything before, everything
    /// after). The content goes between them as is; it must be XML character data or markup.
    pub fn inline_frame(&self) -> (Bytes, &'static [u8]) {
        let mut out = BytesMut::with_capacity(256);
        out.put_slice(BEEP_XML_HEADERS);
        self.control_head(&mut out, "#Content");
        out.put_slice(b"   ");
        out.put_slice(DATA_CONTENT_OPEN);
        (out.freeze(), DATA_CONTENT_CLOSE)
    }

    /// The message with `markup` (XML, written as is) as its inline `data-content`.
    pub fn markup(&self, markup: &str) -> Bytes {
        let (head, tail) = self.inline_frame();
        let mut out = BytesMut::with_capacity(head.len() + markup.len() + tail.len());
        out.put_slice(&head);
        out.put_slice(markup.as_bytes());
        out.put_slice(tail);
        out.freeze()
    }

    /// The message with `text` as its inline `data-content`, escaped; CR is sent as `&#13;`
    /// (an XML parser would normalise a bare one away).
    pub fn text(&self, text: &str) -> Bytes {
        self.markup(&xml::escape(text).replace('\r', "&#13;"))
    }

    /// The message as a `multipart/related` entity (RFC 2387, RFC 3340 §4.1) whose start part
    /// is the control document, with `content='cid:…'` naming the second part, which carries
    /// the content. `None` when the boundary occurs in the body.
    pub fn related(&self, part: &ContentPart<'_>) -> Option<Bytes> {
        let delimiter = format!("\r\n--{}", part.boundary);
        if part.body.starts_with(&delimiter.as_bytes()[2..])
            || memchr::memmem::find(part.body, delimiter.as_bytes()).is_some()
        {
            return None;
        }
        let mut out = BytesMut::with_capacity(512 + part.body.len());
        out.put_slice(b"Content-Type: multipart/related; boundary=\"");
        out.put_slice(part.boundary.as_bytes());
        out.put_slice(b"\"; start=\"<");
        out.put_slice(part.start_id.as_bytes());
        out.put_slice(b">\"; type=\"application/beep+xml\"\r\n\r\n--");
        out.put_slice(part.boundary.as_bytes());
        out.put_slice(b"\r\nContent-Type: application/beep+xml\r\nContent-ID: <");
        out.put_slice(part.start_id.as_bytes());
        out.put_slice(b">\r\n\r\n");
        self.control_head(&mut out, &format!("cid:{}", part.content_id));
        out.put_slice(b"</data>");
        out.put_slice(delimiter.as_bytes());
        out.put_slice(b"\r\nContent-Type: ");
        out.put_slice(part.content_type.as_bytes());
        out.put_slice(b"\r\nContent-ID: <");
        out.put_slice(part.content_id.as_bytes());
        out.put_slice(b">\r\n\r\n");
        out.put_slice(part.body);
        out.put_slice(delimiter.as_bytes());
        out.put_slice(b"--\r\n");
        Some(out.freeze())
    }
}

/// The content of a received `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    /// The `data-content` element (`content='#Name'`), exactly as received.
    Inline(&'a Bytes),
    /// The body of the MIME part `content='cid:…'` names (a slice of the payload).
    Part(Bytes),
    /// Content only referred to: the `content` URI (or a `cid:` whose part is missing).
    Reference(&'a str),
}

/// Where a received data's content is (RFC 3340 §4.1, APEX-07): inline, in a MIME part of
/// the payload, or elsewhere. The bytes are those the originator sent (APEX-28).
pub fn content(data: &Data) -> Content<'_> {
    if data.content.starts_with('#') {
        if let Some(raw) = &data.data_content {
            return Content::Inline(raw);
        }
    } else if let Some(cid) = data.content.strip_prefix("cid:") {
        let part = Entity::parse(data.payload())
            .ok()
            .and_then(|entity| split_related(data.payload(), &entity).ok())
            .and_then(|related| related.part(cid).map(|p| p.body.clone()));
        if let Some(body) = part {
            return Content::Part(body);
        }
    }
    Content::Reference(&data.content)
}

/// One `destination` of a `statusResponse` (RFC 3340 §6.2, §9.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The recipient reported on.
    pub identity: String,
    /// Its status (250, 350, 537, 550...).
    pub code: u16,
    /// Diagnostic, trimmed; empty for none.
    pub text: String,
}

/// A `statusResponse` (RFC 3340 §6.2): the answer to a `statusRequest` (APEX-38).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusResponse {
    /// The `statusRequest` option's transID.
    pub trans_id: u32,
    /// The recipients reported on. A `destination` that does not parse is left out.
    pub destinations: Vec<Destination>,
}

/// The statusResponse `data` carries, when it comes from a report service
/// (`apex=report@DOMAIN`, APEX-38) and its `data-content` holds one.
pub fn status_response(data: &Data) -> Option<StatusResponse> {
    let originator = Endpoint::parse(&data.originator.identity).ok()?;
    if originator.address() != REPORT_SERVICE {
        return None;
    }
    let raw = data.data_content.as_ref()?;
    let limits = ApexLimits::default();
    let element = xml::parse(raw, limits.max_depth, limits.max_attributes).ok()?;
    let response = element
        .children
        .iter()
        .find(|c| c.name == "statusResponse")?;
    let trans_id = response.attr("transID")?.trim().parse().ok()?;
    let destinations = response
        .children
        .iter()
        .filter(|c| c.name == "destination")
        .filter_map(|d| {
            let reply = d.children.iter().find(|c| c.name == "reply")?;
            Some(Destination {
                identity: d.attr("identity")?.to_owned(),
                code: reply.attr("code")?.trim().parse().ok()?,
                text: reply.text.trim().to_owned(),
            })
        })
        .collect();
    Some(StatusResponse {
        trans_id,
        destinations,
    })
}

/// A MSG the relay sent an endpoint.
// `Data` is what nearly every MSG is; boxing it would allocate per delivery.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A `data` delivery for the application (RFC 3340 §4.4.4.2).
    Data(Data),
    /// A `data` from `apex=report@DOMAIN` carrying a `statusResponse` (APEX-38); answered
    /// `ok` whatever it reports.
    Status {
        /// The carrying data.
        data: Data,
        /// What it reports.
        response: StatusResponse,
    },
    /// A `terminate` of an attachment (RFC 3340 §4.4.3).
    Terminate {
        /// The attach it ends; 0: all of them.
        trans_id: u32,
        /// Why.
        code: u16,
        /// Diagnostic.
        text: String,
    },
    /// Any other operation: not for an endpoint.
    Other(Operation),
}

/// Reads a MSG from the relay. An error is answered with its code and text.
pub fn parse_incoming(payload: &Bytes) -> Result<Incoming, OpError> {
    Ok(match parse_message(payload, &ApexLimits::default())? {
        Operation::Data(data) => match status_response(&data) {
            Some(response) => Incoming::Status { data, response },
            None => Incoming::Data(data),
        },
        Operation::Terminate {
            trans_id,
            code,
            text,
        } => Incoming::Terminate {
            trans_id,
            code,
            text,
        },
        other => Incoming::Other(other),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::apex::msg::error_payload;

    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    /// Fred's data to barney with inline content (RFC 3340 §4.4.4).
    const DATA_13_1: &str = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n   <data-content Name='Content'>hello, barney</data-content>\r\n</data>\r\n";

    /// The same data with its content as a separate MIME part (RFC 3340 §4.1); 423 octets.
    const DATA_13_4: &str = "Content-Type: multipart/related; boundary=\"XX\"; start=\"<1@fred.example.com>\"; type=\"application/beep+xml\"\r\n\r\n--XX\r\nContent-Type: application/beep+xml\r\nContent-ID: <1@fred.example.com>\r\n\r\n<data content='cid:2@fred.example.com'>\r\n   <originator identity='fred@example.com' />\r\n   <recipient identity='barney@example.com' />\r\n</data>\r\n--XX\r\nContent-Type: text/plain\r\nContent-ID: <2@fred.example.com>\r\n\r\nhello, barney\r\n--XX--\r\n";

    /// The relay's report to fred (RFC 3340 §6.2; payload 416 octets).
    const REPORT_13_3: &str = "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='apex=report@example.com' />\r\n   <recipient identity='fred@example.com' />\r\n   <data-content Name='Content'>\r\n      <statusResponse transID='86'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='86' />\r\n         </destination>\r\n      </statusResponse>\r\n   </data-content>\r\n</data>\r\n";

    #[test]
    fn apex_06_attach_piggybacked_and_as_a_msg() {
        // APEX-06: the piggybacked attach rides the APEX profile offer.
        let offer = attach_offer("fred@example.com", 1);
        assert_eq!(offer.uri, "http://iana.org/beep/APEX");
        assert_eq!(
            offer.content.as_deref(),
            Some(&b"<attach endpoint='fred@example.com' transID='1' />"[..])
        );
        assert_eq!(
            attach_document("a'b&c@example.com", 7),
            "<attach endpoint='a&apos;b&amp;c@example.com' transID='7' />"
        );
        let msg = attach_message("fred/appl=wb@example.com", 1);
        assert_eq!(
            text(&msg),
            "Content-Type: application/beep+xml\r\n\r\n<attach endpoint='fred/appl=wb@example.com' transID='1' />\r\n"
        );
        assert_eq!(msg.len(), 98);
        assert!(matches!(
            parse_message(&msg, &ApexLimits::default()),
            Ok(Operation::Attach { trans_id: 1, .. })
        ));
    }

    #[test]
    fn answers_ok_and_error() {
        assert_eq!(parse_answer(&ok_payload()), Ok(Answer::Ok));
        let spaced = Bytes::from_static(b"Content-Type: application/beep+xml\r\n\r\n<ok/>");
        assert_eq!(parse_answer(&spaced), Ok(Answer::Ok));
        assert_eq!(
            parse_answer(&error_payload(553, "not a local domain")),
            Ok(Answer::Error {
                code: 553,
                text: "not a local domain".into()
            })
        );
        assert_eq!(
            parse_piggybacked_answer(&Bytes::from_static(b"<ok />")),
            Ok(Answer::Ok)
        );
        assert_eq!(
            parse_piggybacked_answer(&Bytes::from_static(b"<error code='537' />")),
            Ok(Answer::Error {
                code: 537,
                text: String::new()
            })
        );
        let data = Bytes::from_static(DATA_13_1.as_bytes());
        assert_eq!(parse_answer(&data).unwrap_err().code, 501);
        assert_eq!(
            parse_answer(&Bytes::from_static(b"garbage"))
                .unwrap_err()
                .code,
            500
        );
    }

    #[test]
    fn apex_21_data_of_13_1_byte_exact() {
        let built = DataBuilder::new("fred@example.com")
            .to("barney@example.com")
            .text("hello, barney");
        assert_eq!(text(&built), DATA_13_1);
        let (head, tail) = DataBuilder::new("fred@example.com")
            .to("barney@example.com")
            .inline_frame();
        assert!(head.ends_with(DATA_CONTENT_OPEN));
        assert_eq!(
            [&head[..], b"hello, barney", tail].concat(),
            DATA_13_1.as_bytes()
        );
    }

    #[test]
    fn apex_38_report_of_13_3_byte_exact() {
        // APEX-38: the relay's report is built with the same builder.
        let content = "\r\n      <statusResponse transID='86'>\r\n         <destination identity='barney@example.com'>\r\n            <reply code='250' transID='86' />\r\n         </destination>\r\n      </statusResponse>\r\n   ";
        let built = DataBuilder::new("apex=report@example.com")
            .to("fred@example.com")
            .markup(content);
        assert_eq!(text(&built), REPORT_13_3);
        assert_eq!(built.len(), 416);
    }

    #[test]
    fn apex_07_data_of_13_4_byte_exact() {
        let part = ContentPart {
            boundary: "XX",
            start_id: "1@fred.example.com",
            content_id: "2@fred.example.com",
            content_type: "text/plain",
            body: b"hello, barney",
        };
        let built = DataBuilder::new("fred@example.com")
            .to("barney@example.com")
            .related(&part)
            .unwrap();
        assert_eq!(text(&built), DATA_13_4);
        assert_eq!(built.len(), 423);
        // The boundary may not occur in the body.
        let clash = ContentPart {
            body: b"a\r\n--XX\r\nb",
            ..part
        };
        assert_eq!(DataBuilder::new("a@x").to("b@x").related(&clash), None);
        let clash = ContentPart {
            body: b"--XX--",
            ..part
        };
        assert_eq!(DataBuilder::new("a@x").to("b@x").related(&clash), None);
    }

    #[test]
    fn recipients_options_and_escaping() {
        let built = DataBuilder::new("fr'ed@example.com")
            .to_all(["b<x@example.com", "c@example.com"])
            .status_request(5)
            .text("a & b\r\nline <2>");
        assert_eq!(
            text(&built),
            "Content-Type: application/beep+xml\r\n\r\n<data content='#Content'>\r\n   <originator identity='fr&apos;ed@example.com' />\r\n   <recipient identity='b&lt;x@example.com' />\r\n   <recipient identity='c@example.com' />\r\n   <option internal='statusRequest' transID='5' />\r\n   <data-content Name='Content'>a &amp; b&#13;\nline &lt;2&gt;</data-content>\r\n</data>\r\n"
        );
        let Ok(Operation::Data(d)) = parse_message(&built, &ApexLimits::default()) else {
            panic!("not a data");
        };
        assert_eq!(d.originator.identity, "fr'ed@example.com");
        assert_eq!(d.recipients.len(), 2);
        assert_eq!(d.recipients[0].identity, "b<x@example.com");
        assert_eq!(d.options[0].name(), "statusRequest");
        assert_eq!(d.options[0].trans_id, 5);
        let el = xml::parse(d.data_content.as_ref().unwrap(), 8, 8).unwrap();
        assert_eq!(el.text, "a & b\r\nline <2>");
    }

    #[test]
    fn apex_28_content_inline_part_and_reference() {
        // APEX-28: the content is handed over exactly as the originator sent it.
        let Ok(Incoming::Data(d)) = parse_incoming(&Bytes::from_static(DATA_13_1.as_bytes()))
        else {
            panic!()
        };
        assert_eq!(
            content(&d),
            Content::Inline(&Bytes::from_static(
                b"<data-content Name='Content'>hello, barney</data-content>"
            ))
        );
        let Ok(Incoming::Data(d)) = parse_incoming(&Bytes::from_static(DATA_13_4.as_bytes()))
        else {
            panic!()
        };
        assert_eq!(
            content(&d),
            Content::Part(Bytes::from_static(b"hello, barney"))
        );
        let uri = DATA_13_1
            .replace("'#Content'", "'http://example.com/x'")
            .replace(
                "   <data-content Name='Content'>hello, barney</data-content>\r\n",
                "",
            );
        let Ok(Incoming::Data(d)) = parse_incoming(&Bytes::from(uri)) else {
            panic!()
        };
        assert_eq!(content(&d), Content::Reference("http://example.com/x"));
    }

    #[test]
    fn apex_07_split_related_of_13_4() {
        let payload = Bytes::from_static(DATA_13_4.as_bytes());
        let entity = Entity::parse(&payload).unwrap();
        let related = split_related(&payload, &entity).unwrap();
        assert_eq!(related.parts.len(), 2);
        let start = related.start_part().unwrap();
        assert_eq!(start.content_id.as_deref(), Some("1@fred.example.com"));
        assert!(start.beep_xml);
        assert!(start
            .body
            .starts_with(b"<data content='cid:2@fred.example.com'>"));
        assert!(start.body.ends_with(b"</data>"));
        assert_eq!(&payload[start.range.clone()], &start.body[..]);
        let part = related.part("2@fred.example.com").unwrap();
        assert!(!part.beep_xml);
        assert_eq!(&part.body[..], b"hello, barney");
        assert_eq!(related.part("3@fred.example.com"), None);
        // No close delimiter; start part that is not beep+xml.
        let open = Bytes::from(DATA_13_4.replace("\r\n--XX--\r\n", ""));
        let entity = Entity::parse(&open).unwrap();
        assert_eq!(split_related(&open, &entity).unwrap_err().code, 501);
        let swapped = Bytes::from(DATA_13_4.replace("start=\"<1@", "start=\"<2@"));
        let entity = Entity::parse(&swapped).unwrap();
        assert_eq!(split_related(&swapped, &entity).unwrap_err().code, 501);
    }

    #[test]
    fn apex_38_report_is_recognised_and_parsed() {
        // APEX-38: a statusResponse comes as data from apex=report@DOMAIN.
        let Ok(Incoming::Status { data, response }) =
            parse_incoming(&Bytes::from_static(REPORT_13_3.as_bytes()))
        else {
            panic!("not a report")
        };
        assert_eq!(data.recipients[0].identity, "fred@example.com");
        assert_eq!(
            response,
            StatusResponse {
                trans_id: 86,
                destinations: vec![Destination {
                    identity: "barney@example.com".into(),
                    code: 250,
                    text: String::new(),
                }],
            }
        );
        // The same content from anyone else is an ordinary delivery.
        let forged = REPORT_13_3.replace("apex=report@", "fred@");
        assert!(matches!(
            parse_incoming(&Bytes::from(forged)),
            Ok(Incoming::Data(_))
        ));
        // A report whose content is something else.
        let other = REPORT_13_3.replace("statusResponse", "other");
        assert!(matches!(
            parse_incoming(&Bytes::from(other)),
            Ok(Incoming::Data(_))
        ));
        // Text, and several destinations.
        let built = DataBuilder::new("apex=report@rubble.com")
            .to("fred@example.com")
            .markup("<statusResponse transID='7'><destination identity='b@x'><reply code='550' transID='7'> unknown endpoint identity </reply></destination><destination identity='c@x'><reply code='537' /></destination></statusResponse>");
        let Ok(Incoming::Status { response, .. }) = parse_incoming(&built) else {
            panic!()
        };
        assert_eq!(response.trans_id, 7);
        assert_eq!(response.destinations[0].code, 550);
        assert_eq!(response.destinations[0].text, "unknown endpoint identity");
        assert_eq!(response.destinations[1].identity, "c@x");
        assert_eq!(response.destinations[1].code, 537);
    }

    #[test]
    fn terminate_and_other_operations() {
        let t = Bytes::from_static(b"Content-Type: application/beep+xml\r\n\r\n<terminate transID='1' code='421'>relay going down</terminate>\r\n");
        assert_eq!(
            parse_incoming(&t),
            Ok(Incoming::Terminate {
                trans_id: 1,
                code: 421,
                text: "relay going down".into()
            })
        );
        assert_eq!(
            parse_incoming(&attach_message("a@x", 1)).map(|i| matches!(i, Incoming::Other(_))),
            Ok(true)
        );
        assert_eq!(
            parse_incoming(&Bytes::from_static(b"nonsense"))
                .unwrap_err()
                .code,
            500
        );
    }
}
