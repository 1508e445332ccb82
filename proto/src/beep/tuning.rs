//! The tuning profiles' vocabulary: the TLS profile (RFC 3080 §3.1, §7.2: `ready`, `proceed`)
//! and the SASL family (RFC 3080 §4.1, §7.3: `blob`), parsed from and written to the
//! `application/beep+xml` documents they exchange. What a tuning exchange *does* (switching
//! the transport to TLS, checking credentials) belongs to the shard core; this module only
//! knows the elements.

use base64::Engine as _;
use bytes::Bytes;

use crate::beep::mgmt::{code, ErrorElement};
use crate::beep::mime::Entity;
use crate::xml;

/// The TLS transport security profile (RFC 3080 §3.1, BEEP-44).
pub const TLS_PROFILE: &str = "http://iana.org/beep/TLS";

/// The SASL profiles are this prefix followed by the mechanism's IANA name (RFC 3080 §4.1,
/// BEEP-51).
pub const SASL_PREFIX: &str = "http://iana.org/beep/SASL/";

/// Whether `uri` names a tuning profile (TLS or a SASL mechanism).
pub fn is_tuning(uri: &str) -> bool {
    uri == TLS_PROFILE || uri.starts_with(SASL_PREFIX)
}

/// The SASL mechanism `uri` names, if it is a SASL profile.
pub fn sasl_mechanism(uri: &str) -> Option<&str> {
    uri.strip_prefix(SASL_PREFIX).filter(|m| !m.is_empty())
}

/// The profile URI of SASL mechanism `mechanism`.
pub fn sasl_profile(mechanism: &str) -> String {
    format!("{SASL_PREFIX}{mechanism}")
}

/// The `status` of a `blob` (RFC 3080 §4.1.2, §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobStatus {
    /// More steps follow (the default).
    Continue,
    /// The server reports success.
    Complete,
    /// The client gives up.
    Abort,
}

/// One document of a tuning exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TuningElement {
    /// TLS: the sender asks to begin the handshake; `version` is the earliest TLS version it
    /// accepts (default "1").
    Ready {
        /// The `version` attribute.
        version: String,
    },
    /// TLS: go ahead with the handshake.
    Proceed,
    /// SASL: one step, its octets already base64-decoded.
    Blob {
        /// The `status` attribute.
        status: BlobStatus,
        /// The mechanism's octets.
        data: Vec<u8>,
    },
    /// A refusal.
    Error(ErrorElement),
}

/// Parses a tuning document: the XML alone (a piggyback) or a MIME entity (a message on the
/// tuning channel). Anything else is answered with the error returned.
pub fn parse(
    content: &Bytes,
    max_depth: usize,
    max_attributes: usize,
) -> Result<TuningElement, ErrorElement> {
    let body = if content.starts_with(b"<") {
        content.clone()
    } else {
        Entity::parse(content)
            .map_err(|e| ErrorElement::new(code::SYNTAX_ERROR, e.to_string()))?
            .body
    };
    let element = xml::parse(&body, max_depth, max_attributes)
        .map_err(|e| ErrorElement::new(code::SYNTAX_ERROR, e.to_string()))?;
    match element.name.as_str() {
        "ready" => Ok(TuningElement::Ready {
            version: element.attr("version").unwrap_or("1").to_owned(),
        }),
        "proceed" => Ok(TuningElement::Proceed),
        "blob" => {
            let status = match element.attr("status").unwrap_or("continue") {
                "continue" => BlobStatus::Continue,
                "complete" => BlobStatus::Complete,
                "abort" => BlobStatus::Abort,
                _ => {
                    return Err(ErrorElement::new(
                        code::PARAMETER_ERROR,
                        "blob status must be abort, complete or continue",
                    ))
                }
            };
            // Always base64 (RFC 3080 §4.1.2); whitespace may wrap it.
            let text: String = element.text.split_ascii_whitespace().collect();
            let data = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|_| ErrorElement::new(code::PARAMETER_ERROR, "blob is not base64"))?;
            Ok(TuningElement::Blob { status, data })
        }
        "error" => {
            let code = element
                .attr("code")
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(code::ACTION_NOT_TAKEN);
            Ok(TuningElement::Error(ErrorElement::new(
                code,
                element.text.trim(),
            )))
        }
        other => Err(ErrorElement::new(
            code::PARAMETER_ERROR,
            format!("unexpected element '{other}' on a tuning channel"),
        )),
    }
}

/// `<ready />`, as RFC 3080 §3.1.1 writes it (version "1" is the default).
pub const READY: &str = "<ready />";

/// `<proceed />`.
pub const PROCEED: &str = "<proceed />";

/// A `blob` element carrying `data` base64-encoded.
pub fn blob(status: BlobStatus, data: &[u8]) -> String {
    let status = match status {
        BlobStatus::Continue => "",
        BlobStatus::Complete => " status='complete'",
        BlobStatus::Abort => " status='abort'",
    };
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    format!("<blob{status}>{text}</blob>")
}

/// `xml` as a message on a tuning channel: an `application/beep+xml` entity.
pub fn entity(xml: &str) -> Bytes {
    Bytes::from(format!("Content-Type: application/beep+xml\r\n\r\n{xml}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<TuningElement, ErrorElement> {
        parse(&Bytes::from(text.to_owned()), 8, 8)
    }

    /// BEEP-44: `ready` defaults its version to "1"; `proceed` and `error` are recognised.
    #[test]
    fn tls_elements_parse_with_their_defaults() {
        assert_eq!(
            parse_str("<ready />"),
            Ok(TuningElement::Ready {
                version: "1".into()
            })
        );
        assert_eq!(
            parse_str("Content-Type: application/beep+xml\r\n\r\n<proceed />"),
            Ok(TuningElement::Proceed)
        );
        assert_eq!(
            parse_str("<error code='501'>no</error>"),
            Ok(TuningElement::Error(ErrorElement::new(501, "no")))
        );
        assert!(parse_str("<start number='1'/>").is_err());
    }

    /// BEEP-51: blob content is always base64, its status defaults to continue.
    #[test]
    fn blobs_round_trip_through_base64() {
        let xml = blob(BlobStatus::Complete, b"v=abc");
        assert_eq!(xml, "<blob status='complete'>dj1hYmM=</blob>");
        assert_eq!(
            parse_str(&xml),
            Ok(TuningElement::Blob {
                status: BlobStatus::Complete,
                data: b"v=abc".to_vec()
            })
        );
        assert_eq!(
            parse_str("<blob>dj1h\r\n YmM=</blob>"),
            Ok(TuningElement::Blob {
                status: BlobStatus::Continue,
                data: b"v=abc".to_vec()
            })
        );
        assert_eq!(
            parse_str("<blob status='abort'/>"),
            Ok(TuningElement::Blob {
                status: BlobStatus::Abort,
                data: Vec::new()
            })
        );
        assert_eq!(parse_str("<blob>%%%</blob>").map_err(|e| e.code), Err(501));
        assert_eq!(
            parse_str("<blob status='done'/>").map_err(|e| e.code),
            Err(501)
        );
    }

    #[test]
    fn tuning_uris_are_recognised() {
        assert!(is_tuning(TLS_PROFILE));
        assert!(is_tuning("http://iana.org/beep/SASL/PLAIN"));
        assert!(!is_tuning("http://iana.org/beep/APEX"));
        assert_eq!(
            sasl_mechanism("http://iana.org/beep/SASL/SCRAM-SHA-256"),
            Some("SCRAM-SHA-256")
        );
        assert_eq!(sasl_mechanism(SASL_PREFIX), None);
        assert_eq!(
            sasl_profile("EXTERNAL"),
            "http://iana.org/beep/SASL/EXTERNAL"
        );
    }
}
