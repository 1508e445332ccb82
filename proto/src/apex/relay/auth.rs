//! Who may attach as which endpoint and bind as which domain (RFC 3340 §4.5.1, apex-core.md
//! §10; APEX-47): the policy of `--auth`, the credentials a connection earned (its source
//! address, a SASL identity, a verified TLS certificate), and the checks attach and bind make
//! with them.

use std::net::IpAddr;

use super::*;

/// Whether endpoints must authenticate before they attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Every apex-edge session authenticates (SASL) before it may attach: 530 otherwise.
    Required,
    /// Sessions from a loopback address may attach unauthenticated, as anything; others
    /// authenticate first. The default without users: a relay on a public address is not
    /// open by accident, and one on loopback works out of the box.
    #[default]
    LoopbackOpen,
    /// Anyone attaches as anything and binds as any domain: for benchmarks on a closed box.
    Off,
}

impl AuthMode {
    /// The mode's name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Required => "required",
            AuthMode::LoopbackOpen => "loopback-open",
            AuthMode::Off => "off",
        }
    }

    /// Parses a configured mode name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "required" => Some(AuthMode::Required),
            "loopback-open" => Some(AuthMode::LoopbackOpen),
            "off" => Some(AuthMode::Off),
            _ => None,
        }
    }
}

/// The relay's authentication policy.
#[derive(Debug, Clone, Default)]
pub struct AuthPolicy {
    /// Who must authenticate to attach.
    pub mode: AuthMode,
    /// Addresses the relays of a domain connect from, by lower-cased domain: those its static
    /// route (`--peer`) resolves to. Without TLS, a bind as the domain from one of them is
    /// accepted (RFC 3340 §4.5.1 leaves how a relay is recognised to local policy).
    pub relay_addresses: FxHashMap<String, Vec<IpAddr>>,
}

/// The verdict on a bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BindCheck {
    Allowed,
    Refused,
    /// Only the domain's relay addresses (DNS) can tell.
    Lookup,
}

/// What a connection proved about who is at its other end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The address it came from, when known.
    pub address: Option<IpAddr>,
    /// The identity a SASL exchange authenticated (`fred@example.com`).
    pub identity: Option<String>,
    /// The DNS names of the TLS client certificate it presented, verified against the
    /// configured roots (a relay's domain).
    pub certificate_domains: Vec<String>,
}

impl Credentials {
    /// Credentials of a connection from `address`, nothing proven yet.
    pub fn from_address(address: Option<IpAddr>) -> Self {
        Self {
            address,
            ..Self::default()
        }
    }

    fn loopback(&self) -> bool {
        self.address.is_some_and(|a| match a {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        })
    }

    pub(super) fn same_address(&self, other: &IpAddr) -> bool {
        let canonical = |a: IpAddr| match a {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.address
            .is_some_and(|a| canonical(a) == canonical(*other))
    }
}

/// Most names a connection's [`ActedAs`] keeps; further ones are only counted, so that a peer
/// attaching as thousands of endpoints over one session costs no more memory than a few.
pub const MAX_NAMES_RECORDED: usize = 4;

/// What a connection attached or bound as during its life (kept after the attachment ends,
/// for the session's end-of-life log line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActedAs {
    /// Endpoints it attached as, the first [`MAX_NAMES_RECORDED`] of them.
    pub attached: Vec<String>,
    /// Relay domains it bound as, the first [`MAX_NAMES_RECORDED`] of them.
    pub bound: Vec<String>,
    /// Names not kept in `attached` or `bound` (past the bound).
    pub more: usize,
}

impl ActedAs {
    fn note(list: &mut Vec<String>, more: &mut usize, name: &str) {
        if list.iter().any(|known| known.eq_ignore_ascii_case(name)) {
            return;
        }
        if list.len() < MAX_NAMES_RECORDED {
            list.push(name.to_owned());
        } else {
            *more += 1;
        }
    }
}

/// Who a connection's peer was, as far as the relay knows: what it proved and what it acted as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionIdentity {
    /// The identity a SASL exchange authenticated.
    pub sasl: Option<String>,
    /// The DNS names of its verified client certificate.
    pub certificate_domains: Vec<String>,
    /// What it attached and bound as.
    pub acted_as: ActedAs,
}

/// Whether `identity` may act as `endpoint`: itself and its subaddresses (RFC 3340 §4.5.1:
/// `fred@example.com` may attach as `fred/appl=wb@example.com`).
pub fn may_act_as(identity: &str, endpoint: &Endpoint) -> bool {
    let Some((local, domain)) = identity.rsplit_once('@') else {
        return false;
    };
    endpoint.same_domain(domain) && (endpoint.local() == local || endpoint.address() == local)
}

impl Relay {
    /// Decides attach and bind with `policy` from now on (a reload): sessions keep the
    /// attachments and binds they made.
    pub fn set_auth(&mut self, policy: AuthPolicy) {
        self.config.auth = policy;
    }

    /// What `conn` has proven so far (the runtime sets the address when it accepts; the
    /// shard core adds identities as tuning establishes them).
    pub fn set_credentials(&mut self, conn: ConnId, credentials: Credentials) {
        self.credentials.insert(conn, credentials);
    }

    /// Which port `conn` came in on.
    pub fn conn_kind(&self, conn: ConnId) -> Option<ConnKind> {
        self.connections.get(&conn).copied()
    }

    /// The credentials of `conn`.
    pub fn credentials(&self, conn: ConnId) -> Option<&Credentials> {
        self.credentials.get(&conn)
    }

    /// Who `conn`'s peer was: what it proved and what it attached or bound as so far. Ask
    /// before the connection is closed: [`Relay::conn_closed`] forgets it.
    pub fn session_identity(&self, conn: ConnId) -> SessionIdentity {
        let credentials = self.credentials.get(&conn);
        SessionIdentity {
            sasl: credentials.and_then(|c| c.identity.clone()),
            certificate_domains: credentials
                .map(|c| c.certificate_domains.clone())
                .unwrap_or_default(),
            acted_as: self.acted_as.get(&conn).cloned().unwrap_or_default(),
        }
    }

    /// `conn` attached as `endpoint`.
    pub(super) fn note_attached(&mut self, conn: ConnId, endpoint: &str) {
        let acted = self.acted_as.entry(conn).or_default();
        ActedAs::note(&mut acted.attached, &mut acted.more, endpoint);
    }

    /// `conn` bound as `domain`.
    pub(super) fn note_bound(&mut self, conn: ConnId, domain: &str) {
        let acted = self.acted_as.entry(conn).or_default();
        ActedAs::note(&mut acted.bound, &mut acted.more, domain);
    }

    /// Adds a SASL identity to `conn`'s credentials (RFC 3080 §4: it applies to every
    /// channel of the session from now on).
    pub fn authenticated(&mut self, conn: ConnId, identity: String) {
        self.credentials.entry(conn).or_default().identity = Some(identity);
    }

    /// Adds the domains of a verified client certificate to `conn`'s credentials.
    pub fn certified(&mut self, conn: ConnId, domains: Vec<String>) {
        self.credentials
            .entry(conn)
            .or_default()
            .certificate_domains = domains;
    }

    /// May the session of `conn` attach as `endpoint`? 530 when it must authenticate first,
    /// 537 when its identity is another endpoint's.
    pub(super) fn may_attach(&self, conn: ConnId, endpoint: &Endpoint) -> Result<(), ApexError> {
        let mode = self.config.auth.mode;
        if mode == AuthMode::Off {
            return Ok(());
        }
        let credentials = self.credentials.get(&conn);
        match credentials.and_then(|c| c.identity.as_deref()) {
            Some(identity) if may_act_as(identity, endpoint) => Ok(()),
            Some(_) => Err(ApexError::MayNotAttach),
            None if mode == AuthMode::LoopbackOpen && credentials.is_some_and(|c| c.loopback()) => {
                Ok(())
            }
            None => Err(ApexError::AuthenticationRequired),
        }
    }

    /// May the session of `conn` bind as the relay of `domain`? Only with a certificate that
    /// names it, from an address its static route or its SRV targets resolve to, or when it
    /// is trusted (`--trust`); never as this relay's own domain.
    pub(super) fn may_bind(&self, conn: ConnId, domain: &str) -> BindCheck {
        if self.config.auth.mode == AuthMode::Off {
            return BindCheck::Allowed;
        }
        if self.serves(domain) {
            return BindCheck::Refused;
        }
        let key = domain.to_ascii_lowercase();
        let trusted = self
            .config
            .trusted
            .iter()
            .any(|t| t == "*" || t.eq_ignore_ascii_case(domain));
        let Some(credentials) = self.credentials.get(&conn) else {
            return if trusted {
                BindCheck::Allowed
            } else {
                BindCheck::Refused
            };
        };
        let certified = credentials
            .certificate_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain));
        if certified || trusted {
            return BindCheck::Allowed;
        }
        match self.config.auth.relay_addresses.get(&key) {
            Some(addresses) if addresses.iter().any(|a| credentials.same_address(a)) => {
                BindCheck::Allowed
            }
            // A static route names the relay: it alone counts.
            Some(_) => BindCheck::Refused,
            None if credentials.address.is_some() => BindCheck::Lookup,
            None => BindCheck::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(text: &str) -> Endpoint {
        Endpoint::parse(text).expect("test endpoint")
    }

    /// RFC 3340 §4.5.1: an identity covers itself and its subaddresses, nothing else.
    #[test]
    fn an_identity_acts_as_itself_and_its_subaddresses() {
        assert!(may_act_as(
            "fred@example.com",
            &endpoint("fred@example.com")
        ));
        assert!(may_act_as(
            "fred@example.com",
            &endpoint("fred/appl=wb@EXAMPLE.com")
        ));
        assert!(!may_act_as(
            "fred@example.com",
            &endpoint("barney@example.com")
        ));
        assert!(!may_act_as(
            "fred@example.com",
            &endpoint("fred@rubble.com")
        ));
        assert!(!may_act_as("fred", &endpoint("fred@example.com")));
    }

    #[test]
    fn loopback_is_recognised_in_both_families() {
        for (address, loopback) in [
            ("127.0.0.1", true),
            ("127.8.9.10", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("10.0.0.1", false),
            ("::ffff:10.0.0.1", false),
        ] {
            let credentials = Credentials::from_address(address.parse().ok());
            assert_eq!(credentials.loopback(), loopback, "{address}");
        }
        assert!(!Credentials::default().loopback());
    }

    #[test]
    fn auth_modes_parse_their_names() {
        for mode in [AuthMode::Required, AuthMode::LoopbackOpen, AuthMode::Off] {
            assert_eq!(AuthMode::parse(mode.name()), Some(mode));
        }
        assert_eq!(AuthMode::parse("open"), None);
    }
}
