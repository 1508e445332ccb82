//! Channel 0, the channel-management profile (RFC 3080 §2.3, §7.1): the `greeting`, `start`,
//! `profile`, `close`, `ok` and `error` elements, read from and written to
//! `application/beep+xml` bodies. Values only; the session decides what they mean.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};

use crate::beep::mime::BEEP_XML_HEADERS;
use crate::xml::{self, Element, XmlError};

/// BEEP reply codes used by the engine (RFC 3080 §8).
pub mod code {
    /// Success.
    pub const SUCCESS: u16 = 200;
    /// Service not available.
    pub const SERVICE_NOT_AVAILABLE: u16 = 421;
    /// Requested action not taken, transiently (e.g. the recipient is not taking messages).
    pub const ACTION_NOT_TAKEN_TRANSIENT: u16 = 450;
    /// Requested action aborted: local error.
    pub const LOCAL_ERROR: u16 = 451;
    /// General syntax error (poorly-formed XML).
    pub const SYNTAX_ERROR: u16 = 500;
    /// Syntax error in parameters (non-valid XML).
    pub const PARAMETER_ERROR: u16 = 501;
    /// Parameter not implemented.
    pub const NOT_IMPLEMENTED: u16 = 504;
    /// Authentication required.
    pub const AUTHENTICATION_REQUIRED: u16 = 530;
    /// Authentication failure: a SASL exchange did not prove the identity.
    pub const AUTHENTICATION_FAILED: u16 = 535;
    /// Authentication mechanism requires encryption (PLAIN before TLS).
    pub const ENCRYPTION_REQUIRED: u16 = 538;
    /// Requested action not taken (e.g. no requested profile acceptable).
    pub const ACTION_NOT_TAKEN: u16 = 550;
    /// Parameter invalid.
    pub const PARAMETER_INVALID: u16 = 553;
    /// Transaction failed.
    pub const TRANSACTION_FAILED: u16 = 554;
}

/// A `greeting` (RFC 3080 §2.3.1.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Greeting {
    /// Profiles the sender will serve.
    pub profiles: Vec<String>,
    /// Optional channel-management features (unregistered ones start with `x-`, BEEP-34).
    pub features: Vec<String>,
    /// Preferred languages for diagnostics sent to the sender, most preferred first.
    pub localize: Vec<String>,
}

/// One candidate `profile` inside a `start`, or the chosen one in its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileOffer {
    /// Profile URI.
    pub uri: String,
    /// Piggybacked initialization message (or its response), base64-decoded when it was
    /// encoded (BEEP-21).
    pub content: Option<Bytes>,
}

impl ProfileOffer {
    /// A candidate without piggybacked content.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            content: None,
        }
    }
}

/// A `start` request (RFC 3080 §2.3.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Channel to create, 1..=2^31-1.
    pub number: u32,
    /// Server name the requester wants the session served as.
    pub server_name: Option<String>,
    /// Candidate profiles, at least one.
    pub profiles: Vec<ProfileOffer>,
}

/// A `close` request (RFC 3080 §2.3.1.3); `number` 0 releases the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Channel to close; 0 (the default) means the whole session.
    pub number: u32,
    /// Three-digit reply code.
    pub code: u16,
    /// Diagnostic text.
    pub text: String,
}

/// An `error` element (RFC 3080 §2.3.1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorElement {
    /// Three-digit reply code.
    pub code: u16,
    /// Language of the diagnostic, when given.
    pub lang: Option<String>,
    /// Diagnostic text.
    pub text: String,
}

impl ErrorElement {
    /// An error with `code` and English diagnostic `text`.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            lang: None,
            text: text.into(),
        }
    }
}

/// Any channel-management element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mgmt {
    /// `greeting`.
    Greeting(Greeting),
    /// `start`.
    Start(Start),
    /// `profile` (the positive reply to `start`).
    Profile(ProfileOffer),
    /// `close`.
    Close(Close),
    /// `ok`.
    Ok,
    /// `error`.
    Error(ErrorElement),
}

/// Why a channel-0 document was refused, with the reply code to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtError {
    /// 500 for poorly-formed XML, 501 for valid XML that breaks the DTD.
    pub code: u16,
    /// Diagnostic.
    pub text: String,
}

impl MgmtError {
    fn invalid(text: impl Into<String>) -> Self {
        Self {
            code: code::PARAMETER_ERROR,
            text: text.into(),
        }
    }
}

impl From<XmlError> for MgmtError {
    fn from(e: XmlError) -> Self {
        Self {
            code: code::SYNTAX_ERROR,
            text: e.to_string(),
        }
    }
}

/// Limits that apply to channel-0 documents.
#[derive(Debug, Clone, Copy)]
pub struct MgmtLimits {
    /// Maximum nesting.
    pub max_depth: usize,
    /// Maximum attributes per element.
    pub max_attributes: usize,
    /// Maximum piggybacked content per `profile` after decoding (BEEP-21).
    pub max_piggyback: usize,
}

/// Parses a channel-management body.
pub fn parse(body: &[u8], limits: MgmtLimits) -> Result<Mgmt, MgmtError> {
    let root = xml::parse(body, limits.max_depth, limits.max_attributes)?;
    match root.name.as_str() {
        "greeting" => {
            let mut profiles = Vec::new();
            for child in &root.children {
                let offer = profile(child, limits)?;
                if offer.content.is_some() {
                    return Err(MgmtError::invalid("greeting profiles carry no content"));
                }
                profiles.push(offer.uri);
            }
            Ok(Mgmt::Greeting(Greeting {
                profiles,
                features: tokens(root.attr("features")),
                localize: tokens(root.attr("localize")),
            }))
        }
        "start" => {
            let number = channel_number(root.attr("number"), false)?;
            if root.children.is_empty() {
                return Err(MgmtError::invalid("start names no profile"));
            }
            let profiles = root
                .children
                .iter()
                .map(|c| profile(c, limits))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Mgmt::Start(Start {
                number,
                server_name: root.attr("serverName").map(str::to_owned),
                profiles,
            }))
        }
        "profile" => Ok(Mgmt::Profile(profile(&root, limits)?)),
        "close" => {
            no_children(&root)?;
            Ok(Mgmt::Close(Close {
                number: channel_number(root.attr("number"), true)?,
                code: reply_code(root.attr("code"))?,
                text: root.text.trim().to_owned(),
            }))
        }
        "ok" => {
            // BEEP-29: ok has no attributes and no content.
            no_children(&root)?;
            if !root.attributes.is_empty() || !root.text.trim().is_empty() {
                return Err(MgmtError::invalid("ok has no attributes or content"));
            }
            Ok(Mgmt::Ok)
        }
        "error" => {
            no_children(&root)?;
            Ok(Mgmt::Error(ErrorElement {
                code: reply_code(root.attr("code"))?,
                lang: root.attr("xml:lang").map(str::to_owned),
                text: root.text.trim().to_owned(),
            }))
        }
        other => Err(MgmtError::invalid(format!("unknown element '{other}'"))),
    }
}

fn profile(el: &Element, limits: MgmtLimits) -> Result<ProfileOffer, MgmtError> {
    if el.name != "profile" {
        return Err(MgmtError::invalid(format!(
            "unexpected element '{}'",
            el.name
        )));
    }
    no_children(el)?;
    let uri = el
        .attr("uri")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| MgmtError::invalid("profile without uri"))?;
    let content = match el.attr("encoding").unwrap_or("none") {
        _ if el.text.trim().is_empty() => None,
        "none" => Some(Bytes::copy_from_slice(el.text.as_bytes())),
        "base64" => {
            let compact: String = el.text.split_ascii_whitespace().collect();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(|_| MgmtError::invalid("profile content is not valid base64"))?;
            Some(Bytes::from(decoded))
        }
        _ => return Err(MgmtError::invalid("encoding must be 'none' or 'base64'")),
    };
    if content
        .as_ref()
        .is_some_and(|c| c.len() > limits.max_piggyback)
    {
        return Err(MgmtError::invalid(
            "piggybacked content exceeds 4096 octets",
        ));
    }
    Ok(ProfileOffer {
        uri: uri.to_owned(),
        content,
    })
}

fn no_children(el: &Element) -> Result<(), MgmtError> {
    if el.children.is_empty() {
        Ok(())
    } else {
        Err(MgmtError::invalid(format!(
            "'{}' has no child elements",
            el.name
        )))
    }
}

fn tokens(value: Option<&str>) -> Vec<String> {
    value
        .map(|v| v.split_ascii_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// CHAN: 1..2147483647; `close` also takes 0 and defaults to it (RFC 3080 §2.4, §7.1).
fn channel_number(value: Option<&str>, zero_allowed: bool) -> Result<u32, MgmtError> {
    let Some(value) = value else {
        return if zero_allowed {
            Ok(0)
        } else {
            Err(MgmtError::invalid("number is required"))
        };
    };
    let n: u32 = value
        .parse()
        .ok()
        .filter(|n| *n <= crate::limits::MAX_31BIT && (zero_allowed || *n > 0))
        .ok_or_else(|| MgmtError::invalid("number out of range"))?;
    Ok(n)
}

/// XYZ: three digits, `[1-5][0-9][0-9]` (BEEP-30).
fn reply_code(value: Option<&str>) -> Result<u16, MgmtError> {
    let value = value.ok_or_else(|| MgmtError::invalid("code is required"))?;
    let bytes = value.as_bytes();
    if bytes.len() != 3
        || !(b'1'..=b'5').contains(&bytes[0])
        || !bytes[1..].iter().all(u8::is_ascii_digit)
    {
        return Err(MgmtError::invalid("code must be three digits 1xx-5xx"));
    }
    value
        .parse()
        .map_err(|_| MgmtError::invalid("code must be three digits"))
}

/// Appends the entity headers and `body` as one message payload.
fn entity(body: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(BEEP_XML_HEADERS.len() + body.len());
    out.put_slice(BEEP_XML_HEADERS);
    out.put_slice(body.as_bytes());
    out.freeze()
}

/// Wraps piggybacked content as element text: CDATA when it can be, escaped otherwise, base64
/// when it is not UTF-8.
fn content_xml(content: &[u8]) -> (Option<&'static str>, String) {
    match std::str::from_utf8(content) {
        Ok(text) if !text.contains("]]>") => (None, format!("<![CDATA[{text}]]>")),
        Ok(text) => (None, xml::escape(text).into_owned()),
        Err(_) => (
            Some("base64"),
            base64::engine::general_purpose::STANDARD.encode(content),
        ),
    }
}

impl Mgmt {
    /// The complete message payload (entity headers plus XML) for this element.
    pub fn to_payload(&self) -> Bytes {
        entity(&self.to_xml())
    }

    /// The XML body, followed by CRLF.
    pub fn to_xml(&self) -> String {
        match self {
            Mgmt::Greeting(g) => {
                let mut attrs = String::new();
                if !g.features.is_empty() {
                    attrs.push_str(&format!(
                        " features='{}'",
                        xml::escape(&g.features.join(" "))
                    ));
                }
                if !g.localize.is_empty() {
                    attrs.push_str(&format!(
                        " localize='{}'",
                        xml::escape(&g.localize.join(" "))
                    ));
                }
                if g.profiles.is_empty() {
                    format!("<greeting{attrs} />\r\n")
                } else {
                    let mut s = format!("<greeting{attrs}>\r\n");
                    for p in &g.profiles {
                        s.push_str(&format!("   <profile uri='{}' />\r\n", xml::escape(p)));
                    }
                    s.push_str("</greeting>\r\n");
                    s
                }
            }
            Mgmt::Start(start) => {
                let mut s = format!("<start number='{}'", start.number);
                if let Some(name) = &start.server_name {
                    s.push_str(&format!(" serverName='{}'", xml::escape(name)));
                }
                s.push_str(">\r\n");
                for p in &start.profiles {
                    s.push_str("   ");
                    s.push_str(&profile_xml(p));
                    s.push_str("\r\n");
                }
                s.push_str("</start>\r\n");
                s
            }
            Mgmt::Profile(p) => format!("{}\r\n", profile_xml(p)),
            Mgmt::Close(c) => {
                // `number` is written for the session (0) too: the attribute defaults to 0
                // (RFC 3080 §2.3.1.3), but some peers (Vortex 1.1) fail on a close without it.
                let number = format!("number='{}' ", c.number);
                if c.text.is_empty() {
                    format!("<close {number}code='{}' />\r\n", c.code)
                } else {
                    format!(
                        "<close {number}code='{}'>{}</close>\r\n",
                        c.code,
                        xml::escape(&c.text)
                    )
                }
            }
            Mgmt::Ok => "<ok />\r\n".to_owned(),
            Mgmt::Error(e) => {
                let lang = e
                    .lang
                    .as_ref()
                    .map(|l| format!(" xml:lang='{}'", xml::escape(l)))
                    .unwrap_or_default();
                if e.text.is_empty() {
                    format!("<error code='{}'{lang} />\r\n", e.code)
                } else {
                    format!(
                        "<error code='{}'{lang}>{}</error>\r\n",
                        e.code,
                        xml::escape(&e.text)
                    )
                }
            }
        }
    }
}

fn profile_xml(p: &ProfileOffer) -> String {
    let uri = xml::escape(&p.uri);
    match &p.content {
        None => format!("<profile uri='{uri}' />"),
        Some(content) => match content_xml(content) {
            (None, text) => format!("<profile uri='{uri}'>{text}</profile>"),
            (Some(enc), text) => format!("<profile uri='{uri}' encoding='{enc}'>{text}</profile>"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MgmtLimits = MgmtLimits {
        max_depth: 8,
        max_attributes: 8,
        max_piggyback: 4096,
    };

    #[test]
    fn start_with_piggyback_round_trips() {
        // RFC 3080 §2.3.1.2, RFC 3081 §3.1.1: piggybacked `ready` in CDATA (BEEP-21).
        let body = "<start number='1'>\r\n   <profile uri='http://iana.org/beep/TLS'><![CDATA[<ready />]]></profile>\r\n</start>\r\n";
        let Mgmt::Start(start) = parse(body.as_bytes(), LIMITS).unwrap() else {
            panic!()
        };
        assert_eq!(start.number, 1);
        assert_eq!(
            start.profiles[0].content.as_deref(),
            Some(&b"<ready />"[..])
        );
        assert_eq!(Mgmt::Start(start).to_xml(), body);
    }

    #[test]
    fn base64_content_is_decoded() {
        let body = b"<start number='1' serverName='relay.example.com'><profile uri='u' encoding='base64'>PHJlYWR5IC8+</profile></start>";
        let Mgmt::Start(start) = parse(body, LIMITS).unwrap() else {
            panic!()
        };
        assert_eq!(start.server_name.as_deref(), Some("relay.example.com"));
        assert_eq!(
            start.profiles[0].content.as_deref(),
            Some(&b"<ready />"[..])
        );
    }

    #[test]
    fn beep_21_piggyback_over_4k_is_refused() {
        let body = format!(
            "<start number='1'><profile uri='u'>{}</profile></start>",
            "a".repeat(4097)
        );
        assert_eq!(parse(body.as_bytes(), LIMITS).unwrap_err().code, 501);
    }

    #[test]
    fn close_defaults_to_session_and_needs_code() {
        // BEEP-32: number 0 (or absent) releases the session; BEEP-30: code is required.
        assert_eq!(
            parse(b"<close code='200' />", LIMITS).unwrap(),
            Mgmt::Close(Close {
                number: 0,
                code: 200,
                text: String::new()
            })
        );
        assert_eq!(
            parse(b"<close number='1' />", LIMITS).unwrap_err().code,
            501
        );
        assert_eq!(parse(b"<close code='20' />", LIMITS).unwrap_err().code, 501);
        assert_eq!(
            parse(b"<close code='600' />", LIMITS).unwrap_err().code,
            501
        );
    }

    #[test]
    fn beep_29_ok_is_empty() {
        assert_eq!(parse(b"<ok />", LIMITS).unwrap(), Mgmt::Ok);
        assert_eq!(parse(b"<ok x='1' />", LIMITS).unwrap_err().code, 501);
        assert_eq!(parse(b"<ok>text</ok>", LIMITS).unwrap_err().code, 501);
    }

    #[test]
    fn start_number_range_beep_20() {
        assert_eq!(
            parse(b"<start number='0'><profile uri='u'/></start>", LIMITS)
                .unwrap_err()
                .code,
            501
        );
        assert_eq!(
            parse(
                b"<start number='2147483648'><profile uri='u'/></start>",
                LIMITS
            )
            .unwrap_err()
            .code,
            501
        );
        assert!(parse(
            b"<start number='2147483647'><profile uri='u'/></start>",
            LIMITS
        )
        .is_ok());
    }

    #[test]
    fn poorly_formed_xml_is_500() {
        assert_eq!(parse(b"<start number='1'>", LIMITS).unwrap_err().code, 500);
        assert_eq!(parse(b"<bogus/>", LIMITS).unwrap_err().code, 501);
    }

    #[test]
    fn greeting_encoding_matches_the_digest() {
        // RFC 3080 §2.3.1.1, §3.1.3.2 (greeting after TLS): payload 111 octets.
        let g = Mgmt::Greeting(Greeting {
            profiles: vec!["http://iana.org/beep/APEX".into()],
            ..Greeting::default()
        });
        let payload = g.to_payload();
        assert_eq!(
            &payload[..],
            &b"Content-Type: application/beep+xml\r\n\r\n<greeting>\r\n   <profile uri='http://iana.org/beep/APEX' />\r\n</greeting>\r\n"[..]
        );
        assert_eq!(payload.len(), 111);
        assert_eq!(Mgmt::Greeting(Greeting::default()).to_payload().len(), 52);
    }

    #[test]
    fn binary_content_goes_base64() {
        let offer = ProfileOffer {
            uri: "u".into(),
            content: Some(Bytes::from_static(&[0xff, 0x00])),
        };
        let xml = Mgmt::Profile(offer.clone()).to_xml();
        assert!(xml.contains("encoding='base64'"));
        assert_eq!(parse(xml.as_bytes(), LIMITS).unwrap(), Mgmt::Profile(offer));
    }
}
