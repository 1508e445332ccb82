//! Endpoint identities (RFC 3340 §2.2, §2.2.1; APEX-01..03): parsing `local "@" Domain`,
//! the parts of an identity, the reserved `apex=` / `appl=` conventions, and comparison
//! (local part exactly, domain case-insensitively).
//!
//! ```text
//! entity     = local "@" Domain          ; Domain as in RFC 2821: FQDN or address literal
//! local      = address [ "/" subaddress ]
//! address    = token
//! subaddress = token
//! token      = 1*( %x20-2E / %x30-3F / %x41-7E / UTF-8 )
//! ```
//!
//! An [`Endpoint`] keeps the text it was parsed from and the byte offsets of its separators, so
//! every accessor is a borrow of that one string.

use std::borrow::Cow;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use thiserror::Error;

/// Prefix of the local part of every well-known endpoint of an APEX service (RFC 3340 §2.2).
pub const SERVICE_PREFIX: &str = "apex=";

/// Prefix of subaddresses reserved for IANA-registered endpoint applications (RFC 3340 §2.2).
pub const APPLICATION_PREFIX: &str = "appl=";

/// Service addresses that can never be assigned (RFC 3340 §7.2): they would be ambiguous with
/// the reserved `all` and `core` service names of access tokens.
pub const UNASSIGNABLE_SERVICES: [&str; 2] = ["apex=all", "apex=core"];

/// Longest domain name accepted (RFC 1035 §2.3.4: 255 octets on the wire, 253 as text).
const MAX_DOMAIN: usize = 253;

/// Longest label of a domain name (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;

/// Why a string is not an endpoint identity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddrError {
    /// No `@` separates the local part from the domain.
    #[error("missing '@' between local part and domain")]
    MissingAt,
    /// More than one `@`: tokens may not contain it (APEX-01).
    #[error("more than one '@'")]
    ExtraAt,
    /// More than one `/` in the local part: at most one subaddress (APEX-01).
    #[error("more than one '/' in the local part")]
    ExtraSlash,
    /// The address (the local part before any `/`) is empty.
    #[error("empty address")]
    EmptyAddress,
    /// A `/` is not followed by a subaddress.
    #[error("empty subaddress")]
    EmptySubaddress,
    /// Nothing follows the `@`.
    #[error("empty domain")]
    EmptyDomain,
    /// A control character (%x00-1F or %x7F) in the local part, at this byte offset.
    #[error("control character in the local part at offset {0}")]
    ControlCharacter(usize),
    /// The domain is neither a domain name nor an address literal.
    #[error("invalid domain {domain:?}: {reason}")]
    InvalidDomain {
        /// The offending domain text.
        domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An `apex:` URI that is not one (wrong scheme, bad percent-encoding, not UTF-8).
    #[error("invalid apex: URI: {0}")]
    InvalidUri(&'static str),
}

/// How the domain of an endpoint compares: names and general literals case-insensitively,
/// IP literals by address so that equivalent spellings of an IPv6 address are one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DomainKind {
    /// A domain name (`example.com`).
    Name,
    /// `[10.0.0.1]`.
    V4(Ipv4Addr),
    /// `[IPv6:2001:db8::1]`.
    V6(Ipv6Addr),
    /// `[tag:content]` (RFC 2821 General-address-literal).
    General,
}

/// An APEX endpoint identity, `address[/subaddress]@domain` (RFC 3340 §2.2, APEX-01).
///
/// Equality and hashing follow RFC 3340 §2.2.1 (APEX-03): the local part (address and
/// subaddress) is compared exactly, byte for byte, so `Fred@example.com` and
/// `fred@example.com` are different endpoints; the domain, about which the RFC is silent, is
/// compared as DNS does, case-insensitively, and IP address literals by address.
#[derive(Debug, Clone)]
pub struct Endpoint(Arc<Parsed>);

/// An endpoint's text and what parsing it found, shared by every copy: the relay keeps and
/// passes endpoints around (directory, replicas on other shards, reports, the actions and
/// envelopes of each message), so a copy is one pointer and a reference count, not a string.
#[derive(Debug)]
struct Parsed {
    /// The identity exactly as parsed.
    text: Box<str>,
    /// Byte offset of the `/` introducing the subaddress, if any.
    slash: Option<usize>,
    /// Byte offset of the `@`.
    at: usize,
    /// How the domain compares.
    kind: DomainKind,
    /// Hash of what equality compares, computed once at parse: the relay looks endpoints up
    /// several times per message, and folding the domain's case on each lookup showed in
    /// profiles. Seeded per process (see [`fingerprint`]).
    fingerprint: u64,
}

impl Endpoint {
    /// Parses an identity, enforcing the ABNF of RFC 3340 §2.2 (APEX-01): exactly one `@`, at
    /// most one `/` in the local part, non-empty tokens without control characters, and a
    /// domain that is a domain name or an RFC 2821 address literal.
    ///
    /// Non-ASCII characters are accepted anywhere in the local part, as the ABNF's `UTF-8`
    /// alternative allows; the input being a `&str` already guarantees well-formed UTF-8.
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let at = memchr::memchr(b'@', text.as_bytes()).ok_or(AddrError::MissingAt)?;
        if memchr::memchr(b'@', &text.as_bytes()[at + 1..]).is_some() {
            return Err(AddrError::ExtraAt);
        }
        let slash = validate_local(&text[..at])?;
        let kind = classify_domain(&text[at + 1..])?;
        Ok(Self::new(Box::from(text), slash, at, kind))
    }

    fn new(text: Box<str>, slash: Option<usize>, at: usize, kind: DomainKind) -> Self {
        let fingerprint = fingerprint(&text[..at], kind, &text[at + 1..]);
        Self(Arc::new(Parsed {
            text,
            slash,
            at,
            kind,
            fingerprint,
        }))
    }

    /// Parses an `apex:` URI (`apex:fred@example.com`), undoing its percent-encoding first so
    /// that `apex:f%72ed@example.com` is `fred@example.com` (RFC 3340 §2.2.1, APEX-03).
    pub fn parse_uri(uri: &str) -> Result<Self, AddrError> {
        let rest = uri
            .get(..5)
            .filter(|scheme| scheme.eq_ignore_ascii_case("apex:"))
            .map(|_| &uri[5..])
            .ok_or(AddrError::InvalidUri("scheme is not apex:"))?;
        Self::parse(&percent_decode(rest)?)
    }

    /// The identity as text, exactly as it was parsed.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The address: the local part without any subaddress (`fred` in `fred/appl=wb@x`).
    pub fn address(&self) -> &str {
        &self.0.text[..self.0.slash.unwrap_or(self.0.at)]
    }

    /// The subaddress, if the local part has one (`appl=wb` in `fred/appl=wb@x`).
    pub fn subaddress(&self) -> Option<&str> {
        self.0.slash.map(|slash| &self.0.text[slash + 1..self.0.at])
    }

    /// The domain as written (`example.com`, `[10.0.0.1]`).
    pub fn domain(&self) -> &str {
        &self.0.text[self.0.at + 1..]
    }

    /// The local part: the address plus `/subaddress` when there is one.
    pub fn local(&self) -> &str {
        &self.0.text[..self.0.at]
    }

    /// Whether the domain is an address literal (`[...]`) rather than a domain name.
    pub fn is_domain_literal(&self) -> bool {
        self.0.kind != DomainKind::Name
    }

    /// The endpoint a subaddress belongs to (`fred@x` for `fred/appl=wb@x`); the endpoint
    /// itself when it has no subaddress. Attaching as an endpoint implies the right to attach
    /// as any of its subaddresses (RFC 3340 §4.5.1, APEX-30), which is checked on this base.
    pub fn base(&self) -> Cow<'_, Endpoint> {
        match self.0.slash {
            None => Cow::Borrowed(self),
            Some(slash) => {
                let removed = self.0.at - slash;
                Cow::Owned(Self::new(
                    format!("{}{}", &self.0.text[..slash], &self.0.text[self.0.at..]).into(),
                    None,
                    self.0.at - removed,
                    self.0.kind,
                ))
            }
        }
    }

    /// Whether this is the well-known endpoint of an APEX service, or one of its
    /// subaddresses: the local part starts with `apex=` (RFC 3340 §2.2, APEX-02).
    pub fn is_service(&self) -> bool {
        self.local().starts_with(SERVICE_PREFIX)
    }

    /// Whether the address is `apex=all` or `apex=core`, which can never be assigned
    /// (RFC 3340 §7.2, APEX-02); subaddresses of them are refused with them.
    pub fn is_reserved_unassignable(&self) -> bool {
        UNASSIGNABLE_SERVICES.contains(&self.address())
    }

    /// Whether the subaddress is reserved for a registered endpoint application
    /// (starts with `appl=`, RFC 3340 §2.2, APEX-02).
    pub fn is_application_subaddress(&self) -> bool {
        self.subaddress()
            .is_some_and(|sub| sub.starts_with(APPLICATION_PREFIX))
    }

    /// Whether this endpoint belongs to `domain`, compared as endpoint domains are compared
    /// (case-insensitively; IP literals by address). A `domain` that is not a valid domain
    /// is compared case-insensitively as text.
    pub fn same_domain(&self, domain: &str) -> bool {
        match classify_domain(domain) {
            Ok(kind) => domain_eq(self.domain(), self.0.kind, domain, kind),
            Err(_) => self.domain().eq_ignore_ascii_case(domain),
        }
    }
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        // The same text is the same endpoint; only different spellings need the rules below.
        // Copies of one parse share it: no text to compare.
        if Arc::ptr_eq(&self.0, &other.0) || self.0.text == other.0.text {
            return true;
        }
        self.local() == other.local()
            && domain_eq(self.domain(), self.0.kind, other.domain(), other.0.kind)
    }
}

impl Eq for Endpoint {}

impl Hash for Endpoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.fingerprint);
    }
}

/// Hashes exactly what `eq` compares: the local part, the kind of domain, and a domain name
/// lower-cased (an IP literal's address is left out: equal addresses may be spelled apart).
/// The seed is random per process, so peers cannot aim identities at one bucket; it is the
/// same on every shard, since endpoints travel between shards.
fn fingerprint(local: &str, kind: DomainKind, domain: &str) -> u64 {
    static SEED: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    let mut state = SEED.get_or_init(Default::default).build_hasher();
    local.hash(&mut state);
    kind.hash(&mut state);
    if matches!(kind, DomainKind::Name | DomainKind::General) {
        // Lower-cased a chunk at a time: one hasher write per chunk, not per octet.
        let mut chunk = [0u8; 64];
        for part in domain.as_bytes().chunks(chunk.len()) {
            let lower = &mut chunk[..part.len()];
            lower.copy_from_slice(part);
            lower.make_ascii_lowercase();
            state.write(lower);
        }
    }
    state.finish()
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.text)
    }
}

impl FromStr for Endpoint {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for Endpoint {
    fn as_ref(&self) -> &str {
        &self.0.text
    }
}

/// Checks `domain` is a domain name or an RFC 2821 address literal, as the domain part of an
/// endpoint must be. Used by configuration (served domains) as well as by [`Endpoint::parse`].
pub fn validate_domain(domain: &str) -> Result<(), AddrError> {
    classify_domain(domain).map(|_| ())
}

/// Checks a local part (`address[/subaddress]`) and returns the offset of its `/`, if any.
pub(crate) fn validate_local(local: &str) -> Result<Option<usize>, AddrError> {
    let bytes = local.as_bytes();
    let slash = memchr::memchr(b'/', bytes);
    if slash.is_some_and(|i| memchr::memchr(b'/', &bytes[i + 1..]).is_some()) {
        return Err(AddrError::ExtraSlash);
    }
    if let Some(i) = bytes.iter().position(u8::is_ascii_control) {
        return Err(AddrError::ControlCharacter(i));
    }
    if memchr::memchr(b'@', bytes).is_some() {
        return Err(AddrError::ExtraAt);
    }
    match slash {
        None if local.is_empty() => Err(AddrError::EmptyAddress),
        Some(0) => Err(AddrError::EmptyAddress),
        Some(i) if i + 1 == local.len() => Err(AddrError::EmptySubaddress),
        _ => Ok(slash),
    }
}

/// Checks an address token (a local part without subaddress).
pub(crate) fn validate_address(address: &str) -> Result<(), AddrError> {
    match validate_local(address)? {
        None => Ok(()),
        Some(_) => Err(AddrError::ExtraSlash),
    }
}

/// Whether `domain` is a domain name (not an address literal) that is valid.
pub(crate) fn is_domain_name(domain: &str) -> bool {
    matches!(classify_domain(domain), Ok(DomainKind::Name))
}

/// Compares two domains the way endpoint domains are compared; both must be valid.
pub(crate) fn domains_equal(a: &str, b: &str) -> bool {
    match (classify_domain(a), classify_domain(b)) {
        (Ok(ka), Ok(kb)) => domain_eq(a, ka, b, kb),
        _ => a.eq_ignore_ascii_case(b),
    }
}

fn domain_eq(a: &str, ka: DomainKind, b: &str, kb: DomainKind) -> bool {
    match (ka, kb) {
        (DomainKind::Name, DomainKind::Name) | (DomainKind::General, DomainKind::General) => {
            a.eq_ignore_ascii_case(b)
        }
        (DomainKind::V4(x), DomainKind::V4(y)) => x == y,
        (DomainKind::V6(x), DomainKind::V6(y)) => x == y,
        _ => false,
    }
}

fn invalid(domain: &str, reason: &'static str) -> AddrError {
    AddrError::InvalidDomain {
        domain: domain.to_owned(),
        reason,
    }
}

/// Validates a domain and says how it compares.
fn classify_domain(domain: &str) -> Result<DomainKind, AddrError> {
    if domain.is_empty() {
        return Err(AddrError::EmptyDomain);
    }
    if let Some(inner) = domain.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| invalid(domain, "address literal without closing ']'"))?;
        return classify_literal(domain, inner);
    }
    if domain.len() > MAX_DOMAIN {
        return Err(invalid(domain, "longer than 253 characters"));
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err(invalid(domain, "empty label"));
        }
        if label.len() > MAX_LABEL {
            return Err(invalid(domain, "label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(invalid(
                domain,
                "only letters, digits, '-' and '.' are allowed",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(domain, "label starts or ends with '-'"));
        }
    }
    Ok(DomainKind::Name)
}

/// RFC 2821 §4.1.3: `[IPv4]`, `[IPv6:addr]`, or `[tag:content]`.
fn classify_literal(domain: &str, inner: &str) -> Result<DomainKind, AddrError> {
    if let Ok(v4) = inner.parse::<Ipv4Addr>() {
        return Ok(DomainKind::V4(v4));
    }
    let (tag, content) = inner
        .split_once(':')
        .ok_or_else(|| invalid(domain, "address literal is neither IPv4 nor tag:content"))?;
    if tag.eq_ignore_ascii_case("IPv6") {
        return content
            .parse::<Ipv6Addr>()
            .map(DomainKind::V6)
            .map_err(|_| invalid(domain, "invalid IPv6 address literal"));
    }
    let tag_ok = !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !tag.ends_with('-');
    // dcontent = %d33-90 / %d94-126, less '@' which an identity may contain only once.
    let content_ok = !content.is_empty()
        && content
            .bytes()
            .all(|b| matches!(b, 33..=90 | 94..=126) && b != b'@');
    if tag_ok && content_ok {
        Ok(DomainKind::General)
    } else {
        Err(invalid(domain, "invalid general address literal"))
    }
}

/// Undoes `%XX` escapes and checks the result is UTF-8.
fn percent_decode(text: &str) -> Result<String, AddrError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(AddrError::InvalidUri("bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| AddrError::InvalidUri("decoded identity is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn apex_01_parses_the_rfc_examples() {
        let fred = ep("fred@example.com");
        assert_eq!(fred.address(), "fred");
        assert_eq!(fred.subaddress(), None);
        assert_eq!(fred.domain(), "example.com");
        assert_eq!(fred.local(), "fred");
        assert_eq!(fred.as_str(), "fred@example.com");
        assert_eq!(fred.to_string(), "fred@example.com");

        let wb = ep("fred/appl=wb@example.com");
        assert_eq!(wb.address(), "fred");
        assert_eq!(wb.subaddress(), Some("appl=wb"));
        assert_eq!(wb.local(), "fred/appl=wb");
        assert_eq!(wb.domain(), "example.com");
        assert_eq!(*wb.base(), fred);
        assert_eq!(wb.base().as_str(), "fred@example.com");
        assert!(matches!(fred.base(), Cow::Borrowed(_)));

        let report = ep("apex=report@example.com");
        assert!(report.is_service());
        assert!(!fred.is_service());
    }

    #[test]
    fn apex_01_token_characters() {
        // Space is %x20; '*' and '\' are ordinary token characters.
        assert_eq!(
            ep("Fred Flintstone@example.com").address(),
            "Fred Flintstone"
        );
        assert_eq!(ep("a\\b*c@example.com").local(), "a\\b*c");
        // UTF-8 beyond ASCII.
        let u = ep("frédéric/ß@xn--bcher-kva.example");
        assert_eq!(u.address(), "frédéric");
        assert_eq!(u.subaddress(), Some("ß"));
        assert_eq!(ep("日本@example.com").local(), "日本");
    }

    #[test]
    fn apex_01_domain_literals() {
        let v4 = ep("fred@[10.0.0.1]");
        assert_eq!(v4.domain(), "[10.0.0.1]");
        assert!(v4.is_domain_literal());
        assert!(ep("fred@[IPv6:2001:db8::1]").is_domain_literal());
        assert!(ep("fred@[x-tag:some-thing]").is_domain_literal());
        assert!(!ep("fred@localhost").is_domain_literal());
        for bad in [
            "fred@[10.0.0.1",
            "fred@[10.0.0]",
            "fred@[IPv6:zz::1]",
            "fred@[]",
            "fred@[tag:]",
            "fred@[:x]",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(AddrError::InvalidDomain { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn apex_01_rejects_malformed_identities() {
        let cases: &[(&str, AddrError)] = &[
            ("fred.example.com", AddrError::MissingAt),
            ("", AddrError::MissingAt),
            ("fred@barney@example.com", AddrError::ExtraAt),
            ("fred/a/b@example.com", AddrError::ExtraSlash),
            ("@example.com", AddrError::EmptyAddress),
            ("/sub@example.com", AddrError::EmptyAddress),
            ("fred/@example.com", AddrError::EmptySubaddress),
            ("fred@", AddrError::EmptyDomain),
            ("fr\red@example.com", AddrError::ControlCharacter(2)),
            ("fred\u{7f}@example.com", AddrError::ControlCharacter(4)),
            ("\tfred@example.com", AddrError::ControlCharacter(0)),
        ];
        for (text, err) in cases {
            assert_eq!(Endpoint::parse(text).as_ref(), Err(err), "{text:?}");
        }
        for bad_domain in [
            "fred@example..com",
            "fred@example.com.",
            "fred@.example.com",
            "fred@exa mple.com",
            "fred@-example.com",
            "fred@example-.com",
            "fred@example.com/x",
            "fred@exa_mple.com",
            "fred@*.example.com",
        ] {
            assert!(
                matches!(
                    Endpoint::parse(bad_domain),
                    Err(AddrError::InvalidDomain { .. })
                ),
                "{bad_domain}"
            );
        }
        let long_label = format!("fred@{}.com", "a".repeat(64));
        assert!(Endpoint::parse(&long_label).is_err());
    }

    #[test]
    fn apex_02_reserved_conventions() {
        assert!(ep("apex=all@example.com").is_reserved_unassignable());
        assert!(ep("apex=core@example.com").is_reserved_unassignable());
        assert!(ep("apex=core/x@example.com").is_reserved_unassignable());
        assert!(!ep("apex=access@example.com").is_reserved_unassignable());
        assert!(!ep("apex=allx@example.com").is_reserved_unassignable());
        assert!(ep("apex=pubsub/topic@example.com").is_service());
        assert!(!ep("fred/apex=x@example.com").is_service());
        assert!(ep("fred/appl=wb@example.com").is_application_subaddress());
        assert!(!ep("fred/wb@example.com").is_application_subaddress());
        assert!(!ep("appl=wb@example.com").is_application_subaddress());
    }

    #[test]
    fn apex_03_local_part_is_case_sensitive_domain_is_not() {
        assert_ne!(ep("Fred@example.com"), ep("fred@example.com"));
        assert_ne!(ep("fred/A@example.com"), ep("fred/a@example.com"));
        assert_ne!(ep("fred@example.com"), ep("fred/x@example.com"));
        assert_eq!(ep("fred@EXAMPLE.com"), ep("fred@example.com"));
        assert_eq!(
            ep("fred@[IPv6:2001:DB8::1]"),
            ep("fred@[ipv6:2001:db8:0::1]")
        );
        assert_ne!(ep("fred@[10.0.0.1]"), ep("fred@[10.0.0.2]"));
        assert_ne!(ep("fred@[10.0.0.1]"), ep("fred@[IPv6:::ffff:10.0.0.1]"));

        let set: HashSet<Endpoint> = ["fred@example.com", "fred@Example.COM", "Fred@example.com"]
            .into_iter()
            .map(ep)
            .collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&ep("fred@EXAMPLE.COM")));
        // An endpoint derived from another (its base) hashes like the same identity parsed.
        assert!(set.contains(&*ep("fred/x@EXAMPLE.com").base()));
        let v6: HashSet<Endpoint> = ["a@[IPv6:2001:db8::1]", "a@[IPv6:2001:0db8:0:0::1]"]
            .into_iter()
            .map(ep)
            .collect();
        assert_eq!(v6.len(), 1);
        // Domains longer than one hashing chunk (64 octets) hash case-insensitively too.
        let long = format!("{}.example.com", ["abcdefghij"; 10].join("."));
        let long_set: HashSet<Endpoint> = [
            format!("fred@{long}"),
            format!("fred@{}", long.to_ascii_uppercase()),
        ]
        .iter()
        .map(|s| ep(s))
        .collect();
        assert_eq!(long_set.len(), 1);
    }

    #[test]
    fn apex_03_same_domain() {
        let fred = ep("fred@Example.com");
        assert!(fred.same_domain("example.COM"));
        assert!(!fred.same_domain("example.org"));
        assert!(!fred.same_domain("sub.example.com"));
        assert!(ep("fred@[10.0.0.1]").same_domain("[10.0.0.1]"));
        assert!(!ep("fred@[10.0.0.1]").same_domain("10.0.0.1"));
    }

    #[test]
    fn apex_03_uri_encoding_is_undone_before_comparison() {
        assert_eq!(
            Endpoint::parse_uri("apex:f%72ed@example.com").unwrap(),
            ep("fred@example.com")
        );
        assert_eq!(
            Endpoint::parse_uri("APEX:fred%2Fappl=wb@example.com")
                .unwrap()
                .subaddress(),
            Some("appl=wb")
        );
        assert_eq!(
            Endpoint::parse_uri("apex:fr%C3%A9d@example.com")
                .unwrap()
                .address(),
            "fréd"
        );
        assert!(matches!(
            Endpoint::parse_uri("mailto:fred@example.com"),
            Err(AddrError::InvalidUri(_))
        ));
        assert!(matches!(
            Endpoint::parse_uri("apex:fred%2@example.com"),
            Err(AddrError::InvalidUri(_))
        ));
        assert!(matches!(
            Endpoint::parse_uri("apex:fred%FF@example.com"),
            Err(AddrError::InvalidUri(_))
        ));
        assert_eq!(
            Endpoint::parse_uri("apex:fred%0A@example.com"),
            Err(AddrError::ControlCharacter(4))
        );
    }

    #[test]
    fn from_str_and_validate_domain() {
        let parsed: Endpoint = "fred@example.com".parse().unwrap();
        assert_eq!(parsed, ep("fred@example.com"));
        assert!(validate_domain("example.com").is_ok());
        assert!(validate_domain("[10.0.0.1]").is_ok());
        assert!(validate_domain("").is_err());
        assert!(is_domain_name("example.com"));
        assert!(!is_domain_name("[10.0.0.1]"));
        assert!(domains_equal("EXAMPLE.com", "example.COM"));
    }
}
