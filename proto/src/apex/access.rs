//! Access entries and their evaluation (RFC 3341 §2, §3, §3.1; ACC-03..09, ACC-19): action
//! tokens and their containment, actor patterns with their wildcards and escaping, the four
//! default entries every owner has, and the selection of the one entry that decides a request.
//!
//! The relay consults an [`AccessTable`] for `core:data` on every local delivery (RFC 3340
//! §4.4.4.1 step 5.3); the `apex=access` service's `query` uses the same selection. The
//! `query`/`get`/`set` protocol itself, persistence and timestamps are not here: this module
//! has no clock and no storage beyond memory.
//!
//! Selection (RFC 3341 §3.1), as [`AccessTable::select`] implements it:
//!
//! 1. candidates are the owner's explicit entries plus the default entries whose actor is not
//!    overridden by an explicit entry with the same actor;
//! 2. only candidates whose actor pattern matches the actor remain;
//! 3. the best domain match wins (exact, then the subdomain wildcard covering the fewest
//!    characters, then `*`); among equal domain matches the best local match wins (exact,
//!    then the wildcard covering the fewest characters);
//! 4. the winner's actions decide.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::apex::addr::{self, AddrError, Endpoint, SERVICE_PREFIX};

/// Why an actor pattern, action token or grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AccessError {
    /// The owner, or the literal parts of an actor, are not a valid identity (APEX-01).
    #[error("invalid address: {0}")]
    Address(#[from] AddrError),
    /// A `\` not followed by `*` or `\` (ACC-07), at this byte offset of the pattern.
    #[error("'\\' at offset {0} is not followed by '*' or '\\'")]
    BadEscape(usize),
    /// A `*` where RFC 3341 §3 allows none: wildcards are the whole local part (`*`),
    /// `apex=*`, `address/*`, the whole domain (`*`) or a leading `*.` of the domain (ACC-06).
    #[error("unsupported wildcard in actor pattern {0:?}")]
    UnsupportedWildcard(String),
    /// Not a `service:operation` token (ACC-04).
    #[error("invalid action token {0:?}: expected service:operation")]
    BadAction(String),
    /// An action list with no token; `all:none` is how an entry grants nothing.
    #[error("empty action list")]
    NoActions,
    /// A configuration grant not of the form `ACTOR=ACTIONS`.
    #[error("invalid grant {0:?}: expected ACTOR=ACTIONS")]
    BadGrant(String),
}

/// An action token `service:operation` (RFC 3341 §3, ACC-04, ACC-05).
///
/// The service `all` stands for every service and `core` for the relaying mesh itself; the
/// operation `all` stands for every operation of the service and `none` for no operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Action {
    /// The whole token; borrowed for the predefined constants.
    token: Cow<'static, str>,
    /// Byte offset of the `:`.
    colon: usize,
}

impl Action {
    /// `core:data`: sending data to the owner, checked by relays (ACC-19).
    pub const CORE_DATA: Action = Action::builtin("core:data", 4);
    /// `all:all`: every operation of every service.
    pub const ALL_ALL: Action = Action::builtin("all:all", 3);
    /// `all:none`: nothing; an explicit "no permissions" entry.
    pub const ALL_NONE: Action = Action::builtin("all:none", 3);
    /// `access:query`: asking the access service about the owner's entries.
    pub const ACCESS_QUERY: Action = Action::builtin("access:query", 6);
    /// `access:get`: reading the owner's entries.
    pub const ACCESS_GET: Action = Action::builtin("access:get", 6);
    /// `access:set`: changing the owner's entries.
    pub const ACCESS_SET: Action = Action::builtin("access:set", 6);
    /// `presence:subscribe`: subscribing to the owner's presence.
    pub const PRESENCE_SUBSCRIBE: Action = Action::builtin("presence:subscribe", 8);
    /// `presence:watch`: watching the owner's subscribers.
    pub const PRESENCE_WATCH: Action = Action::builtin("presence:watch", 8);
    /// `presence:publish`: publishing the owner's presence.
    pub const PRESENCE_PUBLISH: Action = Action::builtin("presence:publish", 8);

    const fn builtin(token: &'static str, colon: usize) -> Self {
        Self {
            token: Cow::Borrowed(token),
            colon,
        }
    }

    /// Parses one token: a non-empty service and a non-empty operation separated by exactly
    /// one `:`, each made of XML name characters (the attribute is NMTOKENS).
    pub fn parse(token: &str) -> Result<Self, AccessError> {
        let bad = || AccessError::BadAction(token.to_owned());
        let (service, operation) = token.split_once(':').ok_or_else(bad)?;
        let part_ok = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !part_ok(service) || !part_ok(operation) {
            return Err(bad());
        }
        Ok(Self {
            token: Cow::Owned(token.to_owned()),
            colon: service.len(),
        })
    }

    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// The service part (`core` in `core:data`).
    pub fn service(&self) -> &str {
        &self.token[..self.colon]
    }

    /// The operation part (`data` in `core:data`).
    pub fn operation(&self) -> &str {
        &self.token[self.colon + 1..]
    }

    /// Whether holding this token grants `requested` (ACC-05): the services match or this
    /// one is `all`, the operations match or this one is `all`, and this operation is not
    /// `none` (so `all:none` grants nothing, not even `all:none`).
    pub fn grants(&self, requested: &Action) -> bool {
        let (service, operation) = (self.service(), self.operation());
        operation != "none"
            && (service == "all" || service == requested.service())
            && (operation == "all" || operation == requested.operation())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.token)
    }
}

impl FromStr for Action {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Parses a space-separated action list (the NMTOKENS of an `actions` attribute or of a
/// configuration grant). At least one token is required.
pub fn parse_actions(list: &str) -> Result<Vec<Action>, AccessError> {
    let actions = list
        .split([' ', '\t', '\r', '\n'])
        .filter(|token| !token.is_empty())
        .map(Action::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if actions.is_empty() {
        return Err(AccessError::NoActions);
    }
    Ok(actions)
}

/// Writes an action list as the value of an `actions` attribute.
pub fn format_actions(actions: &[Action]) -> String {
    let tokens: Vec<&str> = actions.iter().map(Action::as_str).collect();
    tokens.join(" ")
}

/// Whether any token of `actions` grants `requested`.
fn grants(actions: &[Action], requested: &Action) -> bool {
    actions.iter().any(|held| held.grants(requested))
}

/// The local part of an actor pattern (RFC 3341 §3, ACC-06).
#[derive(Debug, Clone, Copy)]
enum LocalPattern<S> {
    /// Exactly this local part, subaddress included.
    Exact(S),
    /// `address/*`: any non-empty subaddress of this address, not the address itself.
    Subaddresses(S),
    /// `apex=*`: every APEX service (local part `apex=` followed by at least one character).
    Services,
    /// `*`: every local part that is not an APEX service.
    NonServices,
}

/// The domain part of an actor pattern (RFC 3341 §3, ACC-06).
#[derive(Debug, Clone, Copy)]
enum DomainPattern<S> {
    /// Exactly this domain (name or address literal).
    Exact(S),
    /// `*.domain`: this domain name itself and every subdomain at any depth.
    Subdomains(S),
    /// `*`: every administrative domain.
    Any,
}

/// An actor pattern over owned (`String`) or borrowed (`&str`) text: the defaults are built
/// as borrowed patterns over the owner so that evaluation allocates nothing.
#[derive(Debug, Clone, Copy)]
struct Pattern<S> {
    local: LocalPattern<S>,
    domain: DomainPattern<S>,
}

impl<S: AsRef<str>> Pattern<S> {
    fn borrowed(&self) -> Pattern<&str> {
        Pattern {
            local: match &self.local {
                LocalPattern::Exact(l) => LocalPattern::Exact(l.as_ref()),
                LocalPattern::Subaddresses(a) => LocalPattern::Subaddresses(a.as_ref()),
                LocalPattern::Services => LocalPattern::Services,
                LocalPattern::NonServices => LocalPattern::NonServices,
            },
            domain: match &self.domain {
                DomainPattern::Exact(d) => DomainPattern::Exact(d.as_ref()),
                DomainPattern::Subdomains(d) => DomainPattern::Subdomains(d.as_ref()),
                DomainPattern::Any => DomainPattern::Any,
            },
        }
    }

    fn owned(&self) -> Pattern<String> {
        let p = self.borrowed();
        Pattern {
            local: match p.local {
                LocalPattern::Exact(l) => LocalPattern::Exact(l.to_owned()),
                LocalPattern::Subaddresses(a) => LocalPattern::Subaddresses(a.to_owned()),
                LocalPattern::Services => LocalPattern::Services,
                LocalPattern::NonServices => LocalPattern::NonServices,
            },
            domain: match p.domain {
                DomainPattern::Exact(d) => DomainPattern::Exact(d.to_owned()),
                DomainPattern::Subdomains(d) => DomainPattern::Subdomains(d.to_owned()),
                DomainPattern::Any => DomainPattern::Any,
            },
        }
    }

    /// Same actor value: local parts exactly, domains as endpoint domains compare. This is
    /// the identity of an entry for "one entry per owner/actor" (ACC-03) and for overriding
    /// a default (ACC-08).
    fn same<T: AsRef<str>>(&self, other: &Pattern<T>) -> bool {
        let (a, b) = (self.borrowed(), other.borrowed());
        let local = match (a.local, b.local) {
            (LocalPattern::Exact(x), LocalPattern::Exact(y))
            | (LocalPattern::Subaddresses(x), LocalPattern::Subaddresses(y)) => x == y,
            (LocalPattern::Services, LocalPattern::Services)
            | (LocalPattern::NonServices, LocalPattern::NonServices) => true,
            _ => false,
        };
        let domain = match (a.domain, b.domain) {
            (DomainPattern::Exact(x), DomainPattern::Exact(y)) => addr::domains_equal(x, y),
            (DomainPattern::Subdomains(x), DomainPattern::Subdomains(y)) => {
                x.eq_ignore_ascii_case(y)
            }
            (DomainPattern::Any, DomainPattern::Any) => true,
            _ => false,
        };
        local && domain
    }

    /// How well this pattern matches `actor`, or `None` if it does not (ACC-06, ACC-09).
    fn rank(&self, actor: &Endpoint) -> Option<MatchRank> {
        let p = self.borrowed();
        let domain = match p.domain {
            DomainPattern::Exact(d) => actor.same_domain(d).then_some(DomainRank::Exact)?,
            DomainPattern::Subdomains(suffix) => {
                DomainRank::Subdomains(subdomain_cover(actor, suffix)?)
            }
            DomainPattern::Any => DomainRank::Any,
        };
        let local = actor.local();
        let local = match p.local {
            LocalPattern::Exact(l) => (local == l).then_some(LocalRank::Exact)?,
            LocalPattern::Subaddresses(a) => match actor.subaddress() {
                Some(sub) if actor.address() == a => LocalRank::Wildcard(sub.chars().count()),
                _ => return None,
            },
            LocalPattern::Services => {
                let name = local.strip_prefix(SERVICE_PREFIX)?;
                // A wildcard covers a non-empty sequence only (RFC 3341 §3.1).
                if name.is_empty() {
                    return None;
                }
                LocalRank::Wildcard(name.chars().count())
            }
            LocalPattern::NonServices if actor.is_service() => return None,
            LocalPattern::NonServices => LocalRank::Wildcard(local.chars().count()),
        };
        Some(MatchRank { domain, local })
    }
}

/// Characters of `actor`'s domain covered by the wildcard of `*.suffix`: none when the domain
/// is `suffix` itself (the RFC's explicit exception to "wildcards match non-empty
/// sequences"), the leading labels and their dot for a subdomain, `None` when not under it.
fn subdomain_cover(actor: &Endpoint, suffix: &str) -> Option<usize> {
    if actor.is_domain_literal() {
        return None;
    }
    let domain = actor.domain();
    if domain.eq_ignore_ascii_case(suffix) {
        return Some(0);
    }
    let cover = domain.len().checked_sub(suffix.len())?;
    let tail = domain.get(cover..)?;
    (cover >= 2 && domain.get(..cover)?.ends_with('.') && tail.eq_ignore_ascii_case(suffix))
        .then_some(cover)
}

impl<S: AsRef<str>> fmt::Display for Pattern<S> {
    /// The escaped form used in `get`, `access` and configuration (ACC-07).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.local {
            LocalPattern::Exact(l) => f.write_str(&escape(l.as_ref()))?,
            LocalPattern::Subaddresses(a) => write!(f, "{}/*", escape(a.as_ref()))?,
            LocalPattern::Services => write!(f, "{SERVICE_PREFIX}*")?,
            LocalPattern::NonServices => f.write_str("*")?,
        }
        match &self.domain {
            DomainPattern::Exact(d) => write!(f, "@{}", d.as_ref()),
            DomainPattern::Subdomains(d) => write!(f, "@*.{}", d.as_ref()),
            DomainPattern::Any => f.write_str("@*"),
        }
    }
}

/// Escapes `\` and `*` of a literal for the `actor` of `get` and `access` (ACC-07).
pub fn escape(literal: &str) -> Cow<'_, str> {
    if !literal.contains(['\\', '*']) {
        return Cow::Borrowed(literal);
    }
    let mut out = String::with_capacity(literal.len() + 2);
    for c in literal.chars() {
        if matches!(c, '\\' | '*') {
            out.push('\\');
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// How well an actor pattern matched an actor (ACC-09). Smaller is better: the domain match
/// is compared first, then the local match, so `min` over candidates is the selected entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MatchRank {
    domain: DomainRank,
    local: LocalRank,
}

impl MatchRank {
    /// Whether both parts matched literally, without any wildcard.
    pub fn is_exact(&self) -> bool {
        self.domain == DomainRank::Exact && self.local == LocalRank::Exact
    }
}

/// Domain exactness, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum DomainRank {
    Exact,
    /// `*.suffix`, with the number of characters the wildcard covered.
    Subdomains(usize),
    /// `*`, the weakest.
    Any,
}

/// Local-part exactness, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LocalRank {
    Exact,
    /// `address/*`, `apex=*` or `*`, with the number of characters the wildcard covered.
    Wildcard(usize),
}

/// The `actor` of an access entry: an endpoint, or a wildcard pattern of endpoints
/// (RFC 3341 §3, ACC-06).
///
/// Local part: a literal, `address/*` (any non-empty subaddress of `address`), `apex=*` (every
/// APEX service) or `*` (every address that is not an APEX service). Domain: a literal,
/// `*.domain` (the domain and all its subdomains) or `*`. Two patterns are equal when they
/// denote the same actor value (local parts exactly, domains case-insensitively).
#[derive(Debug, Clone)]
pub struct ActorPattern(Pattern<String>);

impl ActorPattern {
    /// Parses the escaped form used in the `actor` of `get` and `access` and in configuration
    /// (ACC-07): an unescaped `*` is a wildcard, `\*` a literal `*`, `\\` a literal `\`.
    /// (The `actor` of `query` is never a pattern: parse it with [`Endpoint::parse`].)
    pub fn parse(text: &str) -> Result<Self, AccessError> {
        let (plain, wild) = unescape(text)?;
        let mut ats = plain.match_indices('@').map(|(i, _)| i);
        let at = ats.next().ok_or(AddrError::MissingAt)?;
        if ats.next().is_some() {
            return Err(AddrError::ExtraAt.into());
        }
        let (local, domain) = (&plain[..at], &plain[at + 1..]);
        let unsupported = || AccessError::UnsupportedWildcard(text.to_owned());

        let local_wild: Vec<usize> = wild.iter().copied().filter(|&w| w < at).collect();
        let local = match local_wild.as_slice() {
            [] => {
                addr::validate_local(local)?;
                LocalPattern::Exact(local.to_owned())
            }
            [w] if w + 1 == local.len() => {
                let prefix = &local[..*w];
                if prefix.is_empty() {
                    LocalPattern::NonServices
                } else if prefix == SERVICE_PREFIX {
                    LocalPattern::Services
                } else if let Some(address) = prefix.strip_suffix('/') {
                    addr::validate_address(address)?;
                    LocalPattern::Subaddresses(address.to_owned())
                } else {
                    return Err(unsupported());
                }
            }
            _ => return Err(unsupported()),
        };

        let domain_wild: Vec<usize> = wild
            .iter()
            .filter(|&&w| w > at)
            .map(|w| w - at - 1)
            .collect();
        let domain = match (domain_wild.as_slice(), domain) {
            ([], _) => {
                addr::validate_domain(domain)?;
                DomainPattern::Exact(domain.to_owned())
            }
            ([0], "*") => DomainPattern::Any,
            ([0], _) => {
                let suffix = domain.strip_prefix("*.").ok_or_else(unsupported)?;
                addr::validate_domain(suffix)?;
                if !addr::is_domain_name(suffix) {
                    // `*.[10.0.0.1]` would be meaningless: literals have no subdomains.
                    return Err(unsupported());
                }
                DomainPattern::Subdomains(suffix.to_owned())
            }
            _ => return Err(unsupported()),
        };
        Ok(Self(Pattern { local, domain }))
    }

    /// The pattern matching exactly `endpoint` (as the `actor` of a `query` denotes it).
    pub fn endpoint(endpoint: &Endpoint) -> Self {
        Self(Pattern {
            local: LocalPattern::Exact(endpoint.local().to_owned()),
            domain: DomainPattern::Exact(endpoint.domain().to_owned()),
        })
    }

    /// Whether `actor` is one of the endpoints this pattern denotes (ACC-06).
    pub fn matches(&self, actor: &Endpoint) -> bool {
        self.0.rank(actor).is_some()
    }

    /// How well the pattern matches `actor` (ACC-09), or `None` if it does not match.
    pub fn rank(&self, actor: &Endpoint) -> Option<MatchRank> {
        self.0.rank(actor)
    }

    /// Whether the pattern has a wildcard in either part.
    pub fn is_wildcard(&self) -> bool {
        !matches!(
            self.0,
            Pattern {
                local: LocalPattern::Exact(_),
                domain: DomainPattern::Exact(_)
            }
        )
    }
}

impl PartialEq for ActorPattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.same(&other.0)
    }
}

impl Eq for ActorPattern {}

impl fmt::Display for ActorPattern {
    /// The escaped form (ACC-07); [`ActorPattern::parse`] reads it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ActorPattern {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<&Endpoint> for ActorPattern {
    fn from(endpoint: &Endpoint) -> Self {
        Self::endpoint(endpoint)
    }
}

/// Undoes `\*` and `\\`; returns the plain text and the byte offsets (in it) of the unescaped
/// `*` characters, which are the wildcards.
fn unescape(text: &str) -> Result<(String, Vec<usize>), AccessError> {
    let mut plain = String::with_capacity(text.len());
    let mut wild = Vec::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, escaped @ ('*' | '\\'))) => plain.push(escaped),
                _ => return Err(AccessError::BadEscape(i)),
            },
            '*' => {
                wild.push(plain.len());
                plain.push('*');
            }
            _ => plain.push(c),
        }
    }
    Ok((plain, wild))
}

/// An access entry (RFC 3341 §2, ACC-04): what `actor` may do in `owner`'s context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// The endpoint (or subaddress) the entry belongs to; never a pattern.
    pub owner: Endpoint,
    /// The endpoint, or pattern of endpoints, granted the actions.
    pub actor: ActorPattern,
    /// The permissions granted; `all:none` grants nothing.
    pub actions: Vec<Action>,
    /// When the access service last created or modified the entry (RFC 3339 timestamp, kept
    /// as text: this crate has no clock). `None` for entries from configuration.
    pub last_update: Option<String>,
}

impl AccessEntry {
    /// An entry without a `lastUpdate`, as configuration creates them.
    pub fn new(owner: Endpoint, actor: ActorPattern, actions: Vec<Action>) -> Self {
        Self {
            owner,
            actor,
            actions,
            last_update: None,
        }
    }

    /// Whether the entry grants `requested` (ACC-05).
    pub fn grants(&self, requested: &Action) -> bool {
        grants(&self.actions, requested)
    }
}

/// The four entries every owner implicitly has (RFC 3341 §3, ACC-08), each overridden by an
/// explicit entry with the same actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultEntry {
    /// Actor: the owner itself; `all:all`.
    Owner,
    /// Actor: `apex=*@<owner's domain>`; `all:all`: services of the owner's own domain.
    DomainServices,
    /// Actor: `apex=*@*`; `core:data`: any service may send data (e.g. status reports).
    AllServices,
    /// Actor: `*@*`; `all:none`: everyone else may do nothing.
    Everyone,
}

impl DefaultEntry {
    /// The four defaults, in the RFC's order.
    pub const ALL: [DefaultEntry; 4] = [
        DefaultEntry::Owner,
        DefaultEntry::DomainServices,
        DefaultEntry::AllServices,
        DefaultEntry::Everyone,
    ];

    /// The actions of this default.
    pub fn actions(self) -> &'static [Action] {
        const ALL_ALL: &[Action] = &[Action::ALL_ALL];
        const CORE_DATA: &[Action] = &[Action::CORE_DATA];
        const ALL_NONE: &[Action] = &[Action::ALL_NONE];
        match self {
            DefaultEntry::Owner | DefaultEntry::DomainServices => ALL_ALL,
            DefaultEntry::AllServices => CORE_DATA,
            DefaultEntry::Everyone => ALL_NONE,
        }
    }

    /// The actor of this default for `owner`.
    pub fn actor(self, owner: &Endpoint) -> ActorPattern {
        ActorPattern(self.pattern(owner).owned())
    }

    /// The default as an entry of `owner` (no `lastUpdate`: defaults are never stored).
    pub fn entry(self, owner: &Endpoint) -> AccessEntry {
        AccessEntry::new(owner.clone(), self.actor(owner), self.actions().to_vec())
    }

    fn pattern(self, owner: &Endpoint) -> Pattern<&str> {
        let (local, domain) = match self {
            DefaultEntry::Owner => (
                LocalPattern::Exact(owner.local()),
                DomainPattern::Exact(owner.domain()),
            ),
            DefaultEntry::DomainServices => {
                (LocalPattern::Services, DomainPattern::Exact(owner.domain()))
            }
            DefaultEntry::AllServices => (LocalPattern::Services, DomainPattern::Any),
            DefaultEntry::Everyone => (LocalPattern::NonServices, DomainPattern::Any),
        };
        Pattern { local, domain }
    }
}

/// The four default entries of `owner` (RFC 3341 §3, ACC-08).
pub fn default_entries(owner: &Endpoint) -> [AccessEntry; 4] {
    DefaultEntry::ALL.map(|default| default.entry(owner))
}

/// A grant from configuration, `ACTOR=ACTIONS` (`*@example.com=core:data presence:all`):
/// an actor pattern in escaped form and a space-separated action list. The split is at the
/// last `=`, since actor patterns contain `=` (`apex=*`) and action tokens cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who is granted.
    pub actor: ActorPattern,
    /// What they are granted.
    pub actions: Vec<Action>,
}

impl FromStr for Grant {
    type Err = AccessError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (actor, actions) = spec
            .rsplit_once('=')
            .ok_or_else(|| AccessError::BadGrant(spec.to_owned()))?;
        Ok(Self {
            actor: ActorPattern::parse(actor)?,
            actions: parse_actions(actions)?,
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.actor, format_actions(&self.actions))
    }
}

/// Where the entry chosen by [`AccessTable::select`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntrySource {
    /// An entry stored for this very owner.
    Owner,
    /// A grant for every owner of the owner's domain ([`AccessTable::grant_domain`]).
    Domain,
    /// A grant for every local owner ([`AccessTable::grant_all_local`]).
    AllLocal,
    /// One of the four defaults.
    Default(DefaultEntry),
}

/// The entry that decides for an owner/actor pair (RFC 3341 §3.1, ACC-09).
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    actor: Pattern<&'a str>,
    actions: &'a [Action],
    source: EntrySource,
    rank: MatchRank,
}

impl<'a> Selection<'a> {
    /// The actor value of the selected entry.
    pub fn actor(&self) -> ActorPattern {
        ActorPattern(self.actor.owned())
    }

    /// The actions of the selected entry.
    pub fn actions(&self) -> &'a [Action] {
        self.actions
    }

    /// Where the selected entry came from.
    pub fn source(&self) -> EntrySource {
        self.source
    }

    /// How well its actor matched.
    pub fn rank(&self) -> MatchRank {
        self.rank
    }

    /// Whether the selected entry grants `requested` (ACC-05).
    pub fn grants(&self, requested: &Action) -> bool {
        grants(self.actions, requested)
    }

    /// Whether it grants every action of `requested`, as `query` asks (ACC-11).
    pub fn grants_all(&self, requested: &[Action]) -> bool {
        requested.iter().all(|action| self.grants(action))
    }
}

/// Grants applying to every owner of one domain.
#[derive(Debug, Clone)]
struct DomainGrants {
    domain: String,
    grants: Vec<Grant>,
}

/// The access entries of the local domains, in memory (ACC-03), and their evaluation.
///
/// Three kinds of explicit entry are kept, none of which needs the set of endpoints to be
/// known (endpoints exist whether or not they are attached, ACC-03):
///
/// * entries stored per owner ([`AccessTable::set`], [`AccessTable::grant`]);
/// * grants for every owner of a domain ([`AccessTable::grant_domain`]), e.g.
///   `*@example.com=core:data` so that the domain's ordinary endpoints reach each other;
/// * grants for every local owner ([`AccessTable::grant_all_local`]), which is how the
///   relay's `--grant ACTOR=ACTIONS` is applied. The table does not know which domains are
///   local: the relay only asks about recipients of its own domains.
///
/// When an owner is evaluated, its effective explicit entries are merged from these, the most
/// specific winning for a given actor (owner, then domain, then all-local), so each owner still
/// has at most one entry per actor; then the defaults not overridden by them are added
/// (ACC-08) and [`AccessTable::select`] picks the best match (ACC-09).
///
/// Whether the relay's `core:data` check also applies to co-resident service WKEs as owners
/// is left open by the RFCs (RFC 3341 §3); that decision belongs to the caller, which
/// can either skip the check for them or add entries such as
/// `grant(apex=presence@example.com, *@*, core:data)`.
#[derive(Debug, Clone, Default)]
pub struct AccessTable {
    /// A persistent map: the store publishes a new table to every shard after each change,
    /// and cloning this one shares all but the changed owner's entries (a std `HashMap` of a
    /// million entries took 0.3-0.5 s to clone, stalling every acknowledgement behind it).
    owners: imbl::HashMap<Endpoint, Vec<AccessEntry>>,
    domains: Vec<DomainGrants>,
    all_local: Vec<Grant>,
}

impl AccessTable {
    /// An empty table: only the defaults apply, so ordinary endpoints cannot send each other
    /// data (RFC 3341 §3).
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `entry`, replacing the owner's entry with the same actor, which is returned
    /// (one entry per owner/actor pair, ACC-03).
    pub fn set(&mut self, entry: AccessEntry) -> Option<AccessEntry> {
        let entries = self.owners.entry(entry.owner.clone()).or_default();
        match entries.iter_mut().find(|e| e.actor == entry.actor) {
            Some(existing) => Some(std::mem::replace(existing, entry)),
            None => {
                entries.push(entry);
                None
            }
        }
    }

    /// Stores an entry without `lastUpdate` for `owner`; see [`AccessTable::set`].
    pub fn grant(
        &mut self,
        owner: Endpoint,
        actor: ActorPattern,
        actions: Vec<Action>,
    ) -> Option<AccessEntry> {
        self.set(AccessEntry::new(owner, actor, actions))
    }

    /// Removes the owner's entry whose actor is literally `actor` (ACC-10), returning it.
    /// Removal can widen rights: a wildcard entry or a default may then apply.
    pub fn remove(&mut self, owner: &Endpoint, actor: &ActorPattern) -> Option<AccessEntry> {
        let entries = self.owners.get_mut(owner)?;
        let index = entries.iter().position(|e| e.actor == *actor)?;
        let removed = entries.remove(index);
        if entries.is_empty() {
            self.owners.remove(owner);
        }
        Some(removed)
    }

    /// The owner's stored entry whose actor is literally `actor`, without wildcard evaluation
    /// (what `get` and `set` look up, ACC-10). Defaults and domain or relay-wide grants are
    /// not stored entries and are not returned.
    pub fn entry(&self, owner: &Endpoint, actor: &ActorPattern) -> Option<&AccessEntry> {
        self.entries(owner).iter().find(|e| e.actor == *actor)
    }

    /// Every stored entry, of every owner.
    pub fn all_entries(&self) -> impl Iterator<Item = &AccessEntry> {
        self.owners.values().flatten()
    }

    /// The entries stored for `owner`.
    pub fn entries(&self, owner: &Endpoint) -> &[AccessEntry] {
        self.owners.get(owner).map_or(&[], Vec::as_slice)
    }

    /// Grants `actions` to `actor` in the context of every owner of `domain`, replacing an
    /// earlier grant for the same domain and actor. An owner's own entry for the same actor
    /// takes precedence.
    pub fn grant_domain(
        &mut self,
        domain: &str,
        actor: ActorPattern,
        actions: Vec<Action>,
    ) -> Result<(), AccessError> {
        addr::validate_domain(domain)?;
        let index = match self
            .domains
            .iter()
            .position(|d| addr::domains_equal(&d.domain, domain))
        {
            Some(index) => index,
            None => {
                self.domains.push(DomainGrants {
                    domain: domain.to_owned(),
                    grants: Vec::new(),
                });
                self.domains.len() - 1
            }
        };
        if let Some(grants) = self.domains.get_mut(index) {
            upsert(&mut grants.grants, Grant { actor, actions });
        }
        Ok(())
    }

    /// Grants `actions` to `actor` in the context of every local owner (the relay's
    /// `--grant ACTOR=ACTIONS`), replacing an earlier such grant for the same actor. Entries of
    /// the owner or of its domain for the same actor take precedence.
    pub fn grant_all_local(&mut self, actor: ActorPattern, actions: Vec<Action>) {
        upsert(&mut self.all_local, Grant { actor, actions });
    }

    /// Selects the entry of `owner` that applies to `actor` (RFC 3341 §3.1, ACC-08,
    /// ACC-09). With the defaults present some entry always matches an actor whose local part
    /// is more than a bare `apex=`; `None` (which callers treat as a denial) is returned only
    /// for such a degenerate actor.
    pub fn select<'a>(&'a self, owner: &'a Endpoint, actor: &Endpoint) -> Option<Selection<'a>> {
        let stored = self.entries(owner);
        let domain_grants = || {
            self.domains
                .iter()
                .filter(|d| owner.same_domain(&d.domain))
                .flat_map(|d| d.grants.iter())
        };
        let in_stored = |p: &Pattern<&str>| stored.iter().any(|e| e.actor.0.same(p));
        let in_domain = |p: &Pattern<&str>| domain_grants().any(|g| g.actor.0.same(p));
        let in_all_local = |p: &Pattern<&str>| self.all_local.iter().any(|g| g.actor.0.same(p));

        let mut best: Option<Selection<'a>> = None;
        let mut consider = |actor_pattern: Pattern<&'a str>, actions: &'a [Action], source| {
            if let Some(rank) = actor_pattern.rank(actor) {
                // Strictly better only: on a tie the earlier, more specific source stays.
                if best.as_ref().is_none_or(|b| rank < b.rank) {
                    best = Some(Selection {
                        actor: actor_pattern,
                        actions,
                        source,
                        rank,
                    });
                }
            }
        };

        for entry in stored {
            consider(entry.actor.0.borrowed(), &entry.actions, EntrySource::Owner);
        }
        for grant in domain_grants() {
            let p = grant.actor.0.borrowed();
            if !in_stored(&p) {
                consider(p, &grant.actions, EntrySource::Domain);
            }
        }
        for grant in &self.all_local {
            let p = grant.actor.0.borrowed();
            if !in_stored(&p) && !in_domain(&p) {
                consider(p, &grant.actions, EntrySource::AllLocal);
            }
        }
        for default in DefaultEntry::ALL {
            let p = default.pattern(owner);
            if !in_stored(&p) && !in_domain(&p) && !in_all_local(&p) {
                consider(p, default.actions(), EntrySource::Default(default));
            }
        }
        best
    }

    /// Whether `actor` may perform `action` in `owner`'s context. The relay calls this with
    /// `core:data` for each local recipient (ACC-19). A malformed `action` is denied.
    pub fn allows(&self, owner: &Endpoint, actor: &Endpoint, action: &str) -> bool {
        match Action::parse(action) {
            Ok(action) => self.allows_action(owner, actor, &action),
            Err(err) => {
                tracing::debug!(%err, "access check with a malformed action denied");
                false
            }
        }
    }

    /// Whether `actor` may perform `action` in `owner`'s context.
    pub fn allows_action(&self, owner: &Endpoint, actor: &Endpoint, action: &Action) -> bool {
        self.select(owner, actor)
            .is_some_and(|selection| selection.grants(action))
    }

    /// Whether `actor` may perform every one of `actions` in `owner`'s context (the `allow`
    /// answer of `query`, ACC-11).
    pub fn allows_all(&self, owner: &Endpoint, actor: &Endpoint, actions: &[Action]) -> bool {
        self.select(owner, actor)
            .is_some_and(|selection| selection.grants_all(actions))
    }
}

/// Adds `grant`, replacing the one with the same actor.
fn upsert(grants: &mut Vec<Grant>, grant: Grant) {
    match grants.iter_mut().find(|g| g.actor == grant.actor) {
        Some(existing) => *existing = grant,
        None => grants.push(grant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    fn pat(s: &str) -> ActorPattern {
        ActorPattern::parse(s).unwrap()
    }

    fn acts(s: &str) -> Vec<Action> {
        parse_actions(s).unwrap()
    }

    fn act(s: &str) -> Action {
        Action::parse(s).unwrap()
    }

    #[test]
    fn acc_04_action_tokens_parse() {
        let a = act("presence:publish");
        assert_eq!(a.service(), "presence");
        assert_eq!(a.operation(), "publish");
        assert_eq!(a, Action::PRESENCE_PUBLISH);
        assert_eq!(Action::CORE_DATA.service(), "core");
        assert_eq!(Action::CORE_DATA.operation(), "data");
        for builtin in [
            Action::CORE_DATA,
            Action::ALL_ALL,
            Action::ALL_NONE,
            Action::ACCESS_QUERY,
            Action::ACCESS_GET,
            Action::ACCESS_SET,
            Action::PRESENCE_SUBSCRIBE,
            Action::PRESENCE_WATCH,
            Action::PRESENCE_PUBLISH,
        ] {
            assert_eq!(act(builtin.as_str()), builtin);
        }
        for bad in [
            "core",
            "core:",
            ":data",
            "a:b:c",
            "core data",
            "co*re:data",
            "",
        ] {
            assert_eq!(
                Action::parse(bad),
                Err(AccessError::BadAction(bad.to_owned()))
            );
        }
        assert_eq!(
            acts(" core:data\tpresence:subscribe\r\n"),
            vec![Action::CORE_DATA, Action::PRESENCE_SUBSCRIBE]
        );
        assert_eq!(parse_actions("  "), Err(AccessError::NoActions));
        assert_eq!(
            format_actions(&acts("core:data  access:get")),
            "core:data access:get"
        );
    }

    #[test]
    fn acc_05_reserved_tokens_and_containment() {
        let held = |s: &str, requested: &str| grants(&acts(s), &act(requested));
        assert!(held("all:all", "core:data"));
        assert!(held("all:all", "presence:publish"));
        assert!(held("all:data", "core:data"));
        assert!(!held("all:data", "presence:publish"));
        assert!(held("presence:all", "presence:watch"));
        assert!(!held("presence:all", "core:data"));
        assert!(held("core:data", "core:data"));
        assert!(!held("core:data", "core:all"));
        assert!(!held("presence:subscribe", "presence:all"));
        assert!(!held("all:none", "core:data"));
        assert!(!held("all:none", "all:none"));
        assert!(!held("core:none", "core:data"));
        assert!(held("all:none core:data", "core:data"));
    }

    #[test]
    fn acc_06_local_wildcards() {
        let fred = ep("fred@example.com");
        let fred_wb = ep("fred/appl=wb@example.com");
        let presence = ep("apex=presence@example.com");
        let pubsub_topic = ep("apex=pubsub/topic@example.com");

        assert!(pat("fred@example.com").matches(&fred));
        assert!(!pat("fred@example.com").matches(&fred_wb));
        assert!(!pat("Fred@example.com").matches(&fred));

        assert!(pat("fred/*@example.com").matches(&fred_wb));
        assert!(!pat("fred/*@example.com").matches(&fred));
        assert!(!pat("fred/*@example.com").matches(&ep("freda/x@example.com")));
        assert!(pat("apex=pubsub/*@example.com").matches(&pubsub_topic));
        assert!(!pat("apex=pubsub/*@example.com").matches(&presence));

        assert!(pat("apex=*@example.com").matches(&presence));
        assert!(pat("apex=*@example.com").matches(&pubsub_topic));
        assert!(!pat("apex=*@example.com").matches(&fred));
        // A wildcard covers a non-empty sequence: the bare `apex=` is matched by neither.
        assert!(!pat("apex=*@example.com").matches(&ep("apex=@example.com")));
        assert!(!pat("*@example.com").matches(&ep("apex=@example.com")));

        assert!(pat("*@example.com").matches(&fred));
        assert!(pat("*@example.com").matches(&fred_wb));
        assert!(!pat("*@example.com").matches(&presence));
    }

    #[test]
    fn acc_06_domain_wildcards() {
        let at = |domain: &str| ep(&format!("fred@{domain}"));
        let sub = pat("fred@*.example.com");
        assert!(sub.matches(&at("example.com")));
        assert!(sub.matches(&at("foo.example.com")));
        assert!(sub.matches(&at("bar.foo.EXAMPLE.com")));
        assert!(!sub.matches(&at("badexample.com")));
        assert!(!sub.matches(&at("example.org")));
        assert!(!sub.matches(&at("[10.0.0.1]")));

        let any = pat("fred@*");
        for domain in ["example.com", "rubble.com", "[10.0.0.1]"] {
            assert!(any.matches(&at(domain)), "{domain}");
        }
        assert!(pat("fred@EXAMPLE.COM").matches(&at("example.com")));
        assert!(pat("fred@[10.0.0.1]").matches(&at("[10.0.0.1]")));
        assert!(!pat("fred@example.com").matches(&at("foo.example.com")));
    }

    #[test]
    fn acc_06_rejects_unsupported_wildcards() {
        for bad in [
            "fr*d@example.com",
            "*fred@example.com",
            "fred*@example.com",
            "apex=pre*@example.com",
            "**@example.com",
            "*/*@example.com",
            "fred/x*@example.com",
            "fred@ex*ample.com",
            "fred@*example.com",
            "fred@example.*",
            "fred@*.*.example.com",
            "fred@**",
            "fred@*.[10.0.0.1]",
        ] {
            assert!(
                matches!(
                    ActorPattern::parse(bad),
                    Err(AccessError::UnsupportedWildcard(_))
                ),
                "{bad}: {:?}",
                ActorPattern::parse(bad)
            );
        }
        assert!(matches!(
            ActorPattern::parse("fred"),
            Err(AccessError::Address(AddrError::MissingAt))
        ));
        assert!(matches!(
            ActorPattern::parse("a/b/*@example.com"),
            Err(AccessError::Address(AddrError::ExtraSlash))
        ));
        assert!(matches!(
            ActorPattern::parse("/*@example.com"),
            Err(AccessError::Address(AddrError::EmptyAddress))
        ));
        assert!(matches!(
            ActorPattern::parse("fred@exa mple.com"),
            Err(AccessError::Address(AddrError::InvalidDomain { .. }))
        ));
    }

    #[test]
    fn acc_07_escaping() {
        // Escaping a literal `*` and `\` (RFC 3341 §3): endpoint `a\b*c@example.com`.
        let endpoint = ep("a\\b*c@example.com");
        let escaped = pat("a\\\\b\\*c@example.com");
        assert!(!escaped.is_wildcard());
        assert!(escaped.matches(&endpoint));
        assert!(!escaped.matches(&ep("abc@example.com")));
        assert_eq!(escaped.to_string(), "a\\\\b\\*c@example.com");
        assert_eq!(ActorPattern::endpoint(&endpoint), escaped);
        assert_eq!(
            ActorPattern::endpoint(&endpoint).to_string(),
            "a\\\\b\\*c@example.com"
        );
        // An escaped star is literal, so `\*@x` is the endpoint `*@x`, not the wildcard.
        let star = pat("\\*@example.com");
        assert!(star.matches(&ep("*@example.com")));
        assert!(!star.matches(&ep("fred@example.com")));
        assert!(pat("apex=\\*@example.com").matches(&ep("apex=*@example.com")));
        assert!(!pat("apex=\\*@example.com").matches(&ep("apex=report@example.com")));
        // Escapes inside a subaddress wildcard's address.
        let sub = pat("a\\*b/*@example.com");
        assert!(sub.is_wildcard());
        assert!(sub.matches(&ep("a*b/x@example.com")));
        assert_eq!(sub.to_string(), "a\\*b/*@example.com");
        // Malformed escapes.
        assert_eq!(
            ActorPattern::parse("a\\b@example.com"),
            Err(AccessError::BadEscape(1))
        );
        assert_eq!(
            ActorPattern::parse("fred@example.com\\"),
            Err(AccessError::BadEscape(16))
        );
        assert!(ActorPattern::parse("fred@\\*.example.com").is_err());
    }

    #[test]
    fn acc_07_patterns_round_trip_through_display() {
        for text in [
            "fred@example.com",
            "fred/appl=wb@example.com",
            "fred/*@example.com",
            "apex=pubsub/*@*",
            "apex=*@example.com",
            "apex=*@*",
            "*@*",
            "*@*.example.com",
            "a\\\\b\\*c@[10.0.0.1]",
        ] {
            assert_eq!(pat(text).to_string(), text);
            assert_eq!(pat(&pat(text).to_string()), pat(text));
        }
        assert_eq!(pat("*@EXAMPLE.com"), pat("*@example.com"));
        assert_eq!(pat("*@*.EXAMPLE.com"), pat("*@*.example.com"));
        assert_ne!(pat("Fred@example.com"), pat("fred@example.com"));
        assert_ne!(pat("*@*"), pat("apex=*@*"));
        assert_ne!(pat("*@example.com"), pat("*@*.example.com"));
    }

    #[test]
    fn acc_08_the_four_defaults() {
        let owner = ep("fred@example.com");
        let defaults = default_entries(&owner);
        let shown: Vec<(String, String)> = defaults
            .iter()
            .map(|e| (e.actor.to_string(), format_actions(&e.actions)))
            .collect();
        assert_eq!(
            shown,
            [
                ("fred@example.com", "all:all"),
                ("apex=*@example.com", "all:all"),
                ("apex=*@*", "core:data"),
                ("*@*", "all:none"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        assert!(defaults
            .iter()
            .all(|e| e.owner == owner && e.last_update.is_none()));
        // The borrowed patterns used during selection agree with the owned ones.
        for default in DefaultEntry::ALL {
            for actor in [
                "fred@example.com",
                "barney@example.com",
                "apex=report@example.com",
                "apex=report@rubble.com",
                "dino@rubble.com",
            ] {
                let actor = ep(actor);
                assert_eq!(
                    default.pattern(&owner).rank(&actor),
                    default.actor(&owner).rank(&actor)
                );
            }
        }
    }

    #[test]
    fn acc_08_defaults_alone_deny_ordinary_data_pitfall_8() {
        let table = AccessTable::new();
        let fred = ep("fred@example.com");
        let barney = ep("barney@example.com");
        let fred_wb = ep("fred/appl=wb@example.com");
        // Not even within the domain, nor from a subaddress of the owner.
        assert!(!table.allows(&fred, &barney, "core:data"));
        assert!(!table.allows(&fred, &ep("dino@rubble.com"), "core:data"));
        assert!(!table.allows(&fred, &fred_wb, "core:data"));
        assert!(!table.allows(&fred_wb, &fred, "core:data"));
        // The owner may do everything to itself.
        assert!(table.allows(&fred, &fred, "core:data"));
        assert!(table.allows(&fred, &ep("fred@EXAMPLE.COM"), "access:set"));
        assert!(table.allows(&fred_wb, &fred_wb, "presence:publish"));
        // Services: all of the own domain's, core:data only from other domains'.
        let report = ep("apex=report@example.com");
        let remote_report = ep("apex=report@rubble.com");
        assert!(table.allows(&fred, &report, "core:data"));
        assert!(table.allows(&fred, &report, "presence:watch"));
        assert!(table.allows(&fred, &remote_report, "core:data"));
        assert!(!table.allows(&fred, &remote_report, "access:get"));
        // Applied literally to a service owner, the defaults keep ordinary endpoints out.
        assert!(!table.allows(&report, &fred, "core:data"));
        assert_eq!(
            table.select(&fred, &barney).map(|s| s.source()),
            Some(EntrySource::Default(DefaultEntry::Everyone))
        );
    }

    #[test]
    fn acc_08_explicit_entry_overrides_a_default_with_the_same_actor() {
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        // Overriding the owner's own default: fred may no longer change his entries.
        table.grant(fred.clone(), pat("fred@EXAMPLE.com"), acts("core:data"));
        assert!(table.allows(&fred, &fred, "core:data"));
        assert!(!table.allows(&fred, &fred, "access:set"));
        // Overriding `apex=*@*`: remote services lose core:data.
        table.grant(fred.clone(), pat("apex=*@*"), acts("all:none"));
        assert!(!table.allows(&fred, &ep("apex=report@rubble.com"), "core:data"));
        // The domain's own services still match `apex=*@example.com` first.
        assert!(table.allows(&fred, &ep("apex=report@example.com"), "core:data"));
    }

    #[test]
    fn acc_09_worked_illustration() {
        // RFC 3341 §3.1: fred's three explicit entries and the table of outcomes.
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        table.grant(fred.clone(), pat("wilma@example.com"), acts("all:all"));
        table.grant(
            fred.clone(),
            pat("*@example.com"),
            acts("core:data presence:subscribe"),
        );
        table.grant(fred.clone(), pat("*@*"), acts("core:data"));

        let cases = [
            (
                "wilma@example.com",
                "wilma@example.com",
                EntrySource::Owner,
                true,
                true,
            ),
            (
                "dino@example.com",
                "*@example.com",
                EntrySource::Owner,
                true,
                true,
            ),
            ("dino@rubble.com", "*@*", EntrySource::Owner, true, false),
            (
                "apex=presence@example.com",
                "apex=*@example.com",
                EntrySource::Default(DefaultEntry::DomainServices),
                true,
                true,
            ),
            (
                "apex=report@rubble.com",
                "apex=*@*",
                EntrySource::Default(DefaultEntry::AllServices),
                true,
                false,
            ),
            (
                "fred@example.com",
                "fred@example.com",
                EntrySource::Default(DefaultEntry::Owner),
                true,
                true,
            ),
        ];
        for (actor, selected, source, data, subscribe) in cases {
            let actor = ep(actor);
            let selection = table.select(&fred, &actor).unwrap();
            assert_eq!(selection.actor(), pat(selected), "{actor}");
            assert_eq!(selection.source(), source, "{actor}");
            assert_eq!(selection.grants(&Action::CORE_DATA), data, "{actor}");
            assert_eq!(
                selection.grants(&Action::PRESENCE_SUBSCRIBE),
                subscribe,
                "{actor}"
            );
            assert_eq!(table.allows(&fred, &actor, "core:data"), data);
            assert_eq!(
                table.allows_all(&fred, &actor, &acts("core:data presence:subscribe")),
                data && subscribe
            );
        }
    }

    #[test]
    fn acc_09_domain_exactness_comes_before_local_exactness() {
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        // A literal local part in a wildcard domain loses to a wildcard local part in the
        // exact domain.
        table.grant(fred.clone(), pat("barney@*"), acts("all:all"));
        table.grant(fred.clone(), pat("*@example.com"), acts("core:data"));
        let barney = ep("barney@example.com");
        assert_eq!(
            table.select(&fred, &barney).unwrap().actor(),
            pat("*@example.com")
        );
        assert!(!table.allows(&fred, &barney, "presence:watch"));
        assert!(table.allows(&fred, &ep("barney@rubble.com"), "presence:watch"));
    }

    #[test]
    fn acc_09_narrower_domain_wildcard_wins() {
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        table.grant(fred.clone(), pat("*@*.example.com"), acts("core:data"));
        table.grant(fred.clone(), pat("*@*.foo.example.com"), acts("all:none"));
        table.grant(
            fred.clone(),
            pat("*@bar.foo.example.com"),
            acts("presence:all"),
        );
        let allows = |actor: &str, action: &str| table.allows(&fred, &ep(actor), action);
        // `*.foo.example.com` covers fewer characters of `baz.foo.example.com`.
        assert!(!allows("dino@baz.foo.example.com", "core:data"));
        // Exact beats both wildcards.
        assert!(allows("dino@bar.foo.example.com", "presence:watch"));
        assert!(!allows("dino@bar.foo.example.com", "core:data"));
        // `*.foo.example.com` also matches `foo.example.com` itself (covering nothing).
        assert!(!allows("dino@foo.example.com", "core:data"));
        assert!(allows("dino@other.example.com", "core:data"));
        assert!(allows("dino@example.com", "core:data"));
        // Outside: the default `*@*`.
        assert!(!allows("dino@example.org", "core:data"));
    }

    #[test]
    fn acc_09_narrower_local_wildcard_wins() {
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        table.grant(fred.clone(), pat("*@example.com"), acts("core:data"));
        table.grant(fred.clone(), pat("barney/*@example.com"), acts("all:none"));
        table.grant(
            fred.clone(),
            pat("barney/appl=wb@example.com"),
            acts("presence:subscribe"),
        );
        table.grant(
            fred.clone(),
            pat("apex=pubsub/*@example.com"),
            acts("all:none"),
        );
        let allows = |actor: &str, action: &str| table.allows(&fred, &ep(actor), action);
        assert!(allows("barney@example.com", "core:data"));
        assert!(!allows("barney/phone@example.com", "core:data"));
        assert!(allows("barney/appl=wb@example.com", "presence:subscribe"));
        assert!(!allows("barney/appl=wb@example.com", "core:data"));
        // `apex=pubsub/*` covers fewer characters than the default `apex=*`.
        assert!(!allows("apex=pubsub/topic@example.com", "core:data"));
        assert!(allows("apex=pubsub@example.com", "core:data"));

        let rank = |p: &str, a: &str| pat(p).rank(&ep(a)).unwrap();
        assert!(rank("barney/*@x.org", "barney/ab@x.org") < rank("*@x.org", "barney/ab@x.org"));
        assert!(
            rank("barney/*@x.org", "barney/a@x.org") < rank("barney/*@x.org", "barney/ab@x.org")
        );
        assert!(rank("*@x.org", "a@x.org") < rank("apex=*@*", "apex=a@x.org"));
        assert!(rank("a@x.org", "a@x.org").is_exact());
        assert!(!rank("*@x.org", "a@x.org").is_exact());
    }

    #[test]
    fn acc_03_one_entry_per_owner_and_actor() {
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        assert!(table
            .grant(fred.clone(), pat("*@example.com"), acts("core:data"))
            .is_none());
        let mut replacement = AccessEntry::new(
            ep("fred@Example.com"),
            pat("*@EXAMPLE.COM"),
            acts("presence:all"),
        );
        replacement.last_update = Some("2024-03-01T10:00:00Z".to_owned());
        let old = table.set(replacement).unwrap();
        assert_eq!(old.actions, acts("core:data"));
        assert_eq!(table.entries(&fred).len(), 1);
        let stored = table.entry(&fred, &pat("*@example.com")).unwrap();
        assert_eq!(stored.last_update.as_deref(), Some("2024-03-01T10:00:00Z"));
        // Literal lookup (ACC-10): a pattern is found only by the same pattern.
        assert!(table.entry(&fred, &pat("barney@example.com")).is_none());
        assert!(table.entry(&fred, &pat("*@*")).is_none());
        // Owners are exact: subaddresses and other case local parts have their own entries.
        assert!(table.entries(&ep("fred/x@example.com")).is_empty());
        assert!(table.entries(&ep("Fred@example.com")).is_empty());

        let barney = ep("barney@example.com");
        assert!(!table.allows(&fred, &barney, "core:data"));
        assert!(table.allows(&fred, &barney, "presence:watch"));
        // Deleting can widen or narrow: here the default `*@*` (all:none) applies again.
        assert!(table.remove(&fred, &pat("*@example.com")).is_some());
        assert!(table.remove(&fred, &pat("*@example.com")).is_none());
        assert!(table.entries(&fred).is_empty());
        assert!(!table.allows(&fred, &barney, "presence:watch"));
    }

    #[test]
    fn acc_19_relay_wide_and_domain_grants() {
        let mut table = AccessTable::new();
        let grant: Grant = "*@example.com=core:data".parse().unwrap();
        table.grant_all_local(grant.actor, grant.actions);
        let fred = ep("fred@example.com");
        let wilma = ep("wilma/appl=wb@example.com");
        let barney = ep("barney@example.com");
        // Every local owner, including subaddresses, without enumerating endpoints.
        assert!(table.allows(&fred, &barney, "core:data"));
        assert!(table.allows(&wilma, &barney, "core:data"));
        assert!(!table.allows(&fred, &barney, "presence:subscribe"));
        assert!(!table.allows(&fred, &ep("dino@rubble.com"), "core:data"));
        assert_eq!(
            table.select(&fred, &barney).map(|s| s.source()),
            Some(EntrySource::AllLocal)
        );

        // A domain grant beats the relay-wide grant for the same actor ...
        let other = ep("pebbles@other.org");
        table
            .grant_domain("Other.ORG", pat("*@example.com"), acts("all:none"))
            .unwrap();
        assert!(!table.allows(&other, &barney, "core:data"));
        assert!(table.allows(&fred, &barney, "core:data"));
        // ... and an owner's own entry beats both.
        table.grant(other.clone(), pat("*@example.com"), acts("core:data"));
        assert!(table.allows(&other, &barney, "core:data"));
        assert_eq!(
            table.select(&other, &barney).map(|s| s.source()),
            Some(EntrySource::Owner)
        );
        // A grant whose actor is a default's overrides that default.
        table.grant_all_local(pat("*@*"), acts("core:data"));
        assert!(table.allows(&fred, &ep("dino@rubble.com"), "core:data"));
        // Replacing a relay-wide grant.
        table.grant_all_local(pat("*@*"), acts("presence:subscribe"));
        assert!(!table.allows(&fred, &ep("dino@rubble.com"), "core:data"));
        assert!(table
            .grant_domain("bad domain", pat("*@*"), acts("core:data"))
            .is_err());
    }

    #[test]
    fn acc_19_service_owners_can_be_opened_explicitly() {
        // The open point of RFC 3341 §3: one explicit entry makes a service reachable.
        let presence = ep("apex=presence@example.com");
        let fred = ep("fred@example.com");
        let mut table = AccessTable::new();
        assert!(!table.allows(&presence, &fred, "core:data"));
        table.grant(presence.clone(), pat("*@*"), acts("core:data"));
        assert!(table.allows(&presence, &fred, "core:data"));
        assert!(table.allows(&presence, &ep("apex=report@rubble.com"), "core:data"));
    }

    #[test]
    fn malformed_action_is_denied() {
        let fred = ep("fred@example.com");
        let table = AccessTable::new();
        assert!(table.allows(&fred, &fred, "core:data"));
        assert!(!table.allows(&fred, &fred, "core data"));
        assert!(!table.allows(&fred, &fred, ""));
        assert!(table.select(&fred, &ep("apex=@example.com")).is_none());
    }

    #[test]
    fn grant_specs() {
        let g: Grant = "apex=*@*=core:data presence:all".parse().unwrap();
        assert_eq!(g.actor, pat("apex=*@*"));
        assert_eq!(g.actions, acts("core:data presence:all"));
        assert_eq!(g.to_string(), "apex=*@*=core:data presence:all");
        assert_eq!(
            "*@*".parse::<Grant>(),
            Err(AccessError::BadGrant("*@*".to_owned()))
        );
        assert_eq!("*@*=".parse::<Grant>(), Err(AccessError::NoActions));
        assert!("*@*=core".parse::<Grant>().is_err());
        assert!("fr*d@x.org=core:data".parse::<Grant>().is_err());
    }
}
