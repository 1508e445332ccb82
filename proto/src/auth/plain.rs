//! PLAIN (RFC 4616): `authzid NUL authcid NUL password`, checked against the user's SCRAM
//! verifier. The password crosses the wire, so the shard core offers PLAIN only under TLS.

use super::scram::{SaslFailure, ScramVerifier};
use super::users::same_identity;

/// Checks a PLAIN message; the authenticated identity (as `lookup` knows it) on success.
pub fn check_plain(
    message: &[u8],
    lookup: impl Fn(&str) -> Option<ScramVerifier>,
) -> Result<String, SaslFailure> {
    let mut fields = message.split(|b| *b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslFailure::Malformed(
            "expected authzid NUL authcid NUL password",
        ));
    };
    let text = |octets: &[u8]| std::str::from_utf8(octets).map(str::to_owned);
    let (Ok(authzid), Ok(authcid), Ok(password)) = (text(authzid), text(authcid), text(password))
    else {
        return Err(SaslFailure::Malformed("not UTF-8"));
    };
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslFailure::Malformed("empty user name or password"));
    }
    if !authzid.is_empty() && !same_identity(&authzid, &authcid) {
        return Err(SaslFailure::Refused("authzid must be the user name"));
    }
    match lookup(&authcid) {
        Some(verifier) if verifier.matches(&password) => Ok(authcid),
        Some(_) => Err(SaslFailure::Rejected),
        None => {
            // As long as a wrong password takes, so that timing does not tell who exists.
            let _ = ScramVerifier::from_password(
                &password,
                b"no such user",
                super::scram::DEFAULT_ITERATIONS,
            );
            Err(SaslFailure::Rejected)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lookup(name: &str) -> Option<ScramVerifier> {
        (name == "fred@example.com").then(|| ScramVerifier::from_password("yabba", b"salt", 16))
    }

    #[test]
    fn plain_checks_the_password_against_the_verifier() {
        assert_eq!(
            check_plain(b"\0fred@example.com\0yabba", lookup).unwrap(),
            "fred@example.com"
        );
        assert_eq!(
            check_plain(b"fred@EXAMPLE.com\0fred@example.com\0yabba", lookup).unwrap(),
            "fred@example.com"
        );
        assert_eq!(
            check_plain(b"\0fred@example.com\0dabba", lookup),
            Err(SaslFailure::Rejected)
        );
        assert_eq!(
            check_plain(b"\0wilma@example.com\0yabba", lookup),
            Err(SaslFailure::Rejected)
        );
        assert!(matches!(
            check_plain(b"barney@example.com\0fred@example.com\0yabba", lookup),
            Err(SaslFailure::Refused(_))
        ));
        for bad in [&b"fred"[..], b"\0fred", b"\0\0pw", b"\0f\0p\0x", b"\0f\0"] {
            assert!(
                matches!(check_plain(bad, lookup), Err(SaslFailure::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
