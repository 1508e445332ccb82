//! MIME entity headers of BEEP messages (RFC 3080 §2.2): a message is optional headers, an empty
//! line, then the body. Splits headers from body without copying; knows the defaults. No XML.

use bytes::Bytes;
use thiserror::Error;

/// The entity header block every XML message this implementation sends starts with.
pub const BEEP_XML_HEADERS: &[u8] = b"Content-Type: application/beep+xml\r\n\r\n";

/// Default `Content-Type` when the header is absent (RFC 3080 §2.2, BEEP-12).
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Default `Content-Transfer-Encoding` when the header is absent (RFC 3080 §2.2, BEEP-12).
pub const DEFAULT_TRANSFER_ENCODING: &str = "binary";

/// Why an entity could not be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MimeError {
    /// No empty line ends the header block.
    #[error("entity headers are not terminated by an empty line")]
    Unterminated,
    /// A header line without a colon, or with an empty name.
    #[error("malformed entity header line")]
    BadHeader,
    /// A header value that is not valid UTF-8.
    #[error("entity header is not UTF-8")]
    NotUtf8,
}

/// One message split into its entity headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    headers: Bytes,
    /// The body, a zero-copy slice of the message.
    pub body: Bytes,
}

impl Entity {
    /// Splits `message` at the empty line that ends its headers. A message without headers
    /// begins with CRLF (RFC 3080 §2.2).
    pub fn parse(message: &Bytes) -> Result<Entity, MimeError> {
        let end = if message.starts_with(b"\r\n") {
            0
        } else {
            memchr::memmem::find(message, b"\r\n\r\n")
                .map(|i| i + 2)
                .ok_or(MimeError::Unterminated)?
        };
        let headers = message.slice(..end);
        for line in HeaderLines(&headers) {
            if !line.starts_with(b" ") && !line.starts_with(b"\t") {
                match memchr::memchr(b':', line) {
                    Some(colon) if colon > 0 => {}
                    _ => return Err(MimeError::BadHeader),
                }
            }
            std::str::from_utf8(line).map_err(|_| MimeError::NotUtf8)?;
        }
        Ok(Entity {
            headers,
            body: message.slice(end + 2..),
        })
    }

    /// The value of header `name` (case-insensitive), continuation lines unfolded, trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut value: Option<String> = None;
        let mut in_match = false;
        for line in HeaderLines(&self.headers) {
            // Validated as UTF-8 in `parse`.
            let line = std::str::from_utf8(line).unwrap_or_default();
            if line.starts_with([' ', '\t']) {
                if in_match {
                    if let Some(v) = value.as_mut() {
                        v.push(' ');
                        v.push_str(line.trim());
                    }
                }
                continue;
            }
            let (n, v) = line.split_once(':').unwrap_or((line, ""));
            in_match = n.trim().eq_ignore_ascii_case(name);
            if in_match {
                value = Some(v.trim().to_owned());
            }
        }
        value
    }

    /// The media type (`type/subtype`, lower-cased), defaulting to `application/octet-stream`.
    pub fn media_type(&self) -> String {
        match self.header("Content-Type") {
            Some(v) => v
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase(),
            None => DEFAULT_CONTENT_TYPE.to_owned(),
        }
    }

    /// The `charset` parameter of `Content-Type`, if any.
    pub fn charset(&self) -> Option<String> {
        let value = self.header("Content-Type")?;
        value.split(';').skip(1).find_map(|param| {
            let (k, v) = param.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("charset")
                .then(|| v.trim().trim_matches('"').to_owned())
        })
    }

    /// The transfer encoding, lower-cased, defaulting to `binary`.
    pub fn transfer_encoding(&self) -> String {
        self.header("Content-Transfer-Encoding")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_else(|| DEFAULT_TRANSFER_ENCODING.to_owned())
    }

    /// True when the entity is `application/beep+xml` in UTF-8 (the only charset this
    /// implementation reads; RFC 3080 §6.4 makes UTF-8 the default).
    pub fn is_beep_xml(&self) -> bool {
        self.media_type() == "application/beep+xml"
            && self
                .charset()
                .is_none_or(|c| c.eq_ignore_ascii_case("utf-8"))
    }
}

/// Header lines without their CRLF.
struct HeaderLines<'a>(&'a [u8]);

impl<'a> Iterator for HeaderLines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let end = memchr::memmem::find(self.0, b"\r\n").unwrap_or(self.0.len());
        let line = &self.0[..end];
        self.0 = self.0.get(end + 2..).unwrap_or_default();
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_without_headers() {
        // BEEP-12: absent headers mean application/octet-stream, binary.
        let entity = Entity::parse(&Bytes::from_static(b"\r\nhello")).unwrap();
        assert_eq!(entity.media_type(), "application/octet-stream");
        assert_eq!(entity.transfer_encoding(), "binary");
        assert_eq!(&entity.body[..], b"hello");
    }

    #[test]
    fn beep_xml_with_parameters_and_folding() {
        let msg = Bytes::from_static(
            b"content-type: Application/BEEP+XML;\r\n  charset=\"UTF-8\"\r\nX-Other: 1\r\n\r\n<ok />",
        );
        let entity = Entity::parse(&msg).unwrap();
        assert_eq!(entity.media_type(), "application/beep+xml");
        assert_eq!(entity.charset().as_deref(), Some("UTF-8"));
        assert!(entity.is_beep_xml());
        assert_eq!(&entity.body[..], b"<ok />");
    }

    #[test]
    fn other_charsets_are_not_read_as_beep_xml() {
        let msg = Bytes::from_static(
            b"Content-Type: application/beep+xml; charset=iso-8859-1\r\n\r\n<ok/>",
        );
        assert!(!Entity::parse(&msg).unwrap().is_beep_xml());
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert_eq!(
            Entity::parse(&Bytes::from_static(b"Content-Type: x")),
            Err(MimeError::Unterminated)
        );
        assert_eq!(
            Entity::parse(&Bytes::from_static(b"no colon here\r\n\r\nbody")),
            Err(MimeError::BadHeader)
        );
    }
}
