//! SCRAM-SHA-256 (RFC 5802, RFC 7677): the server's side, which keeps only verifiers
//! (StoredKey and ServerKey, never the password), and a client for tools and tests.
//!
//! The password is used as its UTF-8 octets: SASLprep (RFC 4013) normalisation is not applied,
//! as PostgreSQL does for passwords that are not valid SASLprep input. Clients that normalise
//! differ only for passwords with characters SASLprep maps.

use std::fmt;
use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom as _};
use subtle::ConstantTimeEq as _;

/// PBKDF2 iterations `apexd passwd` uses (RFC 7677 §4's minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// The most iterations a client computes for a server: a hostile server must not make it
/// spend minutes of CPU (a few seconds at this count).
pub const MAX_CLIENT_ITERATIONS: u32 = 10_000_000;

/// What a server stores for one user (RFC 5802 §3): enough to check a proof, not to make one.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// Why a verifier string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad verifier: {0}")]
pub struct VerifierError(&'static str);

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password,
        &mut out,
    );
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

fn key32(text: &str) -> Result<[u8; 32], VerifierError> {
    let bytes = B64
        .decode(text)
        .map_err(|_| VerifierError("a key is not base64"))?;
    bytes
        .try_into()
        .map_err(|_| VerifierError("a key is not 32 octets"))
}

impl ScramVerifier {
    /// The verifier of `password` with `salt` and `iterations` (RFC 5802 §3).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password.as_bytes(), salt, iterations);
        Self::from_salted(&salted, salt, iterations)
    }

    fn from_salted(salted: &[u8; 32], salt: &[u8], iterations: u32) -> Self {
        let client_key = hmac_sha256(salted, b"Client Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(salted, b"Server Key"),
        }
    }

    /// Parses PostgreSQL's format:
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64).
    pub fn parse(text: &str) -> Result<Self, VerifierError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(VerifierError("does not start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(VerifierError("no '$' between the parameters and the keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(VerifierError(
            "no ':' between the iteration count and the salt",
        ))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| VerifierError("the iteration count is not a number"))?;
        if iterations == 0 {
            return Err(VerifierError("the iteration count is 0"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| VerifierError("the salt is not base64"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(VerifierError("no ':' between StoredKey and ServerKey"))?;
        Ok(Self {
            iterations,
            salt,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// The PBKDF2 iteration count.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Whether `password` is the one this verifier was made from (PLAIN, RFC 4616): costs
    /// the PBKDF2 iterations.
    pub fn matches(&self, password: &str) -> bool {
        let salted = salted_password(password.as_bytes(), &self.salt, self.iterations);
        let other = Self::from_salted(&salted, &self.salt, self.iterations);
        let stored = other.stored_key.ct_eq(&self.stored_key);
        let server = other.server_key.ct_eq(&self.server_key);
        (stored & server).into()
    }
}

impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// A fresh nonce or salt: `len` random octets, from the operating system.
pub fn random_octets(len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    ring::rand::SystemRandom::new().fill(&mut out).ok()?;
    Some(out)
}

/// A server nonce: 18 random octets in base64 (printable, no comma, RFC 5802 §7).
pub fn fresh_nonce() -> Option<String> {
    random_octets(18).map(|octets| B64.encode(octets))
}

/// The outcome of one SASL step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslStep {
    /// Send this challenge; the exchange goes on.
    Challenge(Vec<u8>),
    /// Authenticated as `identity`; `additional` goes with the success (SCRAM's
    /// server-final message).
    Success {
        /// The identity as the users file spells it.
        identity: String,
        /// Data sent with the outcome.
        additional: Option<Vec<u8>>,
    },
    /// The exchange failed.
    Failure(SaslFailure),
}

/// Why an exchange failed. The text never says whether the user exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslFailure {
    /// The client's message does not follow the mechanism's syntax.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// The credentials did not prove the identity.
    #[error("authentication failed")]
    Rejected,
    /// The mechanism cannot be used in this state.
    #[error("{0}")]
    Refused(&'static str),
}

/// A SCRAM-SHA-256 exchange on the server's side (RFC 5802 §5).
#[derive(Debug)]
pub struct ScramServer {
    nonce: String,
    state: ServerState,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per exchange in progress, for a moment
enum ServerState {
    AwaitingFirst,
    AwaitingFinal {
        /// `None` for an unknown user: the exchange continues with a made-up salt and fails at
        /// the proof, like a wrong password (RFC 5802 §5.1).
        user: Option<(String, ScramVerifier)>,
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        combined_nonce: String,
    },
    Done,
}

/// `=2C` and `=3D` back to `,` and `=` (RFC 5802 §5.1); any other `=` is malformed.
fn unescape_name(name: &str) -> Result<String, SaslFailure> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(SaslFailure::Malformed("bad escape in the user name")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

fn escape_name(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// `key=value` attribute `key` of `field`.
fn attribute<'a>(field: Option<&'a str>, key: &str) -> Result<&'a str, SaslFailure> {
    field
        .and_then(|f| f.strip_prefix(key))
        .and_then(|f| f.strip_prefix('='))
        .ok_or(SaslFailure::Malformed(
            "an attribute is missing or out of order",
        ))
}

impl ScramServer {
    /// A new exchange; `nonce` is the server's part of the nonce ([`fresh_nonce`]).
    pub fn new(nonce: String) -> Self {
        Self {
            nonce,
            state: ServerState::AwaitingFirst,
        }
    }

    /// Handles the client's next message; `lookup` gives a user's verifier.
    pub fn step(
        &mut self,
        input: &[u8],
        lookup: impl Fn(&str) -> Option<ScramVerifier>,
    ) -> SaslStep {
        let state = std::mem::replace(&mut self.state, ServerState::Done);
        let result = match state {
            ServerState::AwaitingFirst => self.client_first(input, lookup),
            ServerState::AwaitingFinal {
                user,
                gs2_header,
                client_first_bare,
                server_first,
                combined_nonce,
            } => Self::client_final(
                input,
                user,
                &gs2_header,
                &client_first_bare,
                &server_first,
                &combined_nonce,
            ),
            ServerState::Done => Err(SaslFailure::Refused("the exchange is over")),
        };
        match result {
            Ok(step) => step,
            Err(failure) => {
                self.state = ServerState::Done;
                SaslStep::Failure(failure)
            }
        }
    }

    fn client_first(
        &mut self,
        input: &[u8],
        lookup: impl Fn(&str) -> Option<ScramVerifier>,
    ) -> Result<SaslStep, SaslFailure> {
        let text = std::str::from_utf8(input).map_err(|_| SaslFailure::Malformed("not UTF-8"))?;
        // gs2-header: channel binding flag, authzid, then the bare message (RFC 5802 §7).
        let mut parts = text.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let authzid = parts
            .next()
            .ok_or(SaslFailure::Malformed("no gs2 header"))?;
        let bare = parts
            .next()
            .ok_or(SaslFailure::Malformed("no gs2 header"))?;
        match flag {
            // `y`: the client supports channel binding but thinks we do not: we do not offer
            // SCRAM-SHA-256-PLUS, so that is true and fine.
            "n" | "y" => {}
            _ if flag.starts_with("p=") => {
                return Err(SaslFailure::Refused("channel binding is not offered"))
            }
            _ => return Err(SaslFailure::Malformed("bad channel binding flag")),
        }
        let authzid = match authzid {
            "" => None,
            a => Some(unescape_name(
                a.strip_prefix("a=")
                    .ok_or(SaslFailure::Malformed("bad authzid"))?,
            )?),
        };
        let mut fields = bare.split(',');
        let first = fields.next();
        if first.is_some_and(|f| f.starts_with("m=")) {
            return Err(SaslFailure::Refused(
                "mandatory extensions are not supported",
            ));
        }
        let name = unescape_name(attribute(first, "n")?)?;
        let client_nonce = attribute(fields.next(), "r")?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(SaslFailure::Malformed("bad client nonce"));
        }
        if let Some(authzid) = &authzid {
            if !super::users::same_identity(authzid, &name) {
                return Err(SaslFailure::Refused("authzid must be the user name"));
            }
        }
        let user = lookup(&name).map(|verifier| (name.clone(), verifier));
        let (salt, iterations) = match &user {
            Some((_, v)) => (v.salt.clone(), v.iterations),
            // A made-up salt that is the same for the same name within this process, so that
            // probing cannot tell an unknown user from a known one.
            None => (made_up_salt(&name), DEFAULT_ITERATIONS),
        };
        let combined_nonce = format!("{client_nonce}{}", self.nonce);
        let server_first = format!("r={combined_nonce},s={},i={iterations}", B64.encode(&salt));
        self.state = ServerState::AwaitingFinal {
            user,
            gs2_header: format!(
                "{flag},{},",
                authzid
                    .map(|a| format!("a={}", escape_name(&a)))
                    .unwrap_or_default()
            ),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            combined_nonce,
        };
        Ok(SaslStep::Challenge(server_first.into_bytes()))
    }

    fn client_final(
        input: &[u8],
        user: Option<(String, ScramVerifier)>,
        gs2_header: &str,
        client_first_bare: &str,
        server_first: &str,
        combined_nonce: &str,
    ) -> Result<SaslStep, SaslFailure> {
        let text = std::str::from_utf8(input).map_err(|_| SaslFailure::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(SaslFailure::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let binding = attribute(fields.next(), "c")?;
        if B64.decode(binding).ok().as_deref() != Some(gs2_header.as_bytes()) {
            return Err(SaslFailure::Malformed(
                "channel binding does not match the gs2 header",
            ));
        }
        if attribute(fields.next(), "r")? != combined_nonce {
            return Err(SaslFailure::Malformed("the nonce is not ours"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| SaslFailure::Malformed("the proof is not base64"))?;
        let Some((identity, verifier)) = user else {
            return Err(SaslFailure::Rejected);
        };
        if proof.len() != 32 {
            return Err(SaslFailure::Rejected);
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac_sha256(&verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        if !bool::from(sha256(&client_key).ct_eq(&verifier.stored_key)) {
            return Err(SaslFailure::Rejected);
        }
        let server_signature = hmac_sha256(&verifier.server_key, auth_message.as_bytes());
        Ok(SaslStep::Success {
            identity,
            additional: Some(format!("v={}", B64.encode(server_signature)).into_bytes()),
        })
    }
}

/// A salt for a user that does not exist: an HMAC of the name under a key made once per
/// process.
fn made_up_salt(name: &str) -> Vec<u8> {
    static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| random_octets(32).unwrap_or_else(|| b"apexd".to_vec()));
    hmac_sha256(key, name.as_bytes())[..16].to_vec()
}

/// Why the client side of an exchange stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SCRAM: {0}")]
pub struct ClientError(pub &'static str);

/// The client's side of SCRAM-SHA-256, for `apex` and tests.
#[derive(Debug)]
pub struct ScramClient {
    name: String,
    password: String,
    nonce: String,
    client_first_bare: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    /// An exchange for `name` with `password`; `nonce` is the client's nonce.
    pub fn new(name: &str, password: &str, nonce: &str) -> Self {
        let client_first_bare = format!("n={},r={nonce}", escape_name(name));
        Self {
            name: name.to_owned(),
            password: password.to_owned(),
            nonce: nonce.to_owned(),
            client_first_bare,
            expected_server_signature: None,
        }
    }

    /// The client-first message (no channel binding, no authzid).
    pub fn first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The client-final message answering `server_first`.
    pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ClientError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ClientError("not UTF-8"))?;
        let mut fields = text.split(',');
        let nonce = attribute(fields.next(), "r").map_err(|_| ClientError("no nonce"))?;
        let salt = attribute(fields.next(), "s").map_err(|_| ClientError("no salt"))?;
        let iterations =
            attribute(fields.next(), "i").map_err(|_| ClientError("no iteration count"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ClientError("the server's nonce does not extend ours"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ClientError("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|i| (1..=MAX_CLIENT_ITERATIONS).contains(i))
            .ok_or(ClientError("bad iteration count"))?;
        let salted = salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored_key = sha256(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac_sha256(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac_sha256(&server_key, auth_message.as_bytes()));
        let _ = &self.name;
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final message: the server knew the verifier (mutual authentication).
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ClientError> {
        let expected = self
            .expected_server_signature
            .ok_or(ClientError("no exchange in progress"))?;
        let text = std::str::from_utf8(server_final).map_err(|_| ClientError("not UTF-8"))?;
        if let Some(error) = text.strip_prefix("e=") {
            let _ = error;
            return Err(ClientError("the server reported an error"));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ClientError("no server signature"))?;
        if bool::from(signature.as_slice().ct_eq(expected.as_slice())) {
            Ok(())
        } else {
            Err(ClientError("the server's signature is wrong"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // RFC 7677 §3.
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn pencil() -> ScramVerifier {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramVerifier::from_password("pencil", &salt, 4096)
    }

    fn lookup(name: &str) -> Option<ScramVerifier> {
        (name == "user").then(pencil)
    }

    /// RFC 7677 §3's exchange, byte for byte, on the server's side.
    #[test]
    fn the_server_reproduces_rfc_7677() {
        let mut server = ScramServer::new("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        assert_eq!(
            server.step(CLIENT_FIRST.as_bytes(), lookup),
            SaslStep::Challenge(SERVER_FIRST.as_bytes().to_vec())
        );
        assert_eq!(
            server.step(CLIENT_FINAL.as_bytes(), lookup),
            SaslStep::Success {
                identity: "user".into(),
                additional: Some(SERVER_FINAL.as_bytes().to_vec())
            }
        );
        assert!(matches!(
            server.step(b"again", lookup),
            SaslStep::Failure(_)
        ));
    }

    /// RFC 7677 §3's exchange on the client's side.
    #[test]
    fn the_client_reproduces_rfc_7677() {
        let mut client = ScramClient::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(client.first(), CLIENT_FIRST.as_bytes());
        assert_eq!(
            client.handle_server_first(SERVER_FIRST.as_bytes()).unwrap(),
            CLIENT_FINAL.as_bytes()
        );
        client.verify_server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert!(client.verify_server_final(b"v=AAAA").is_err());
        let mut greedy = ScramClient::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        let too_many = SERVER_FIRST.replace("i=4096", "i=4000000000");
        assert!(greedy.handle_server_first(too_many.as_bytes()).is_err());
    }

    #[test]
    fn verifiers_round_trip_in_postgresql_format() {
        let text = pencil().to_string();
        assert!(
            text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"),
            "{text}"
        );
        assert_eq!(ScramVerifier::parse(&text).unwrap(), pencil());
        assert!(pencil().matches("pencil"));
        assert!(!pencil().matches("pencil "));
        for (bad, why) in [
            ("MD5$x", "does not start"),
            ("SCRAM-SHA-256$x:AAAA$a:b", "not a number"),
            ("SCRAM-SHA-256$0:AAAA$a:b", "is 0"),
            ("SCRAM-SHA-256$4096:!!$a:b", "salt"),
            ("SCRAM-SHA-256$4096:AAAA$AAAA:AAAA", "32 octets"),
            ("SCRAM-SHA-256$4096:AAAA", "no '$'"),
        ] {
            let error = ScramVerifier::parse(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    /// A full exchange between our client and server; a wrong password and an unknown user
    /// fail at the same step with the same failure.
    #[test]
    fn wrong_passwords_and_unknown_users_fail_alike() {
        let run = |name: &str, password: &str| {
            let mut client = ScramClient::new(name, password, "cnonce");
            let mut server = ScramServer::new("snonce".into());
            let SaslStep::Challenge(first) = server.step(&client.first(), lookup) else {
                panic!("no challenge for {name}");
            };
            let last = client.handle_server_first(&first).unwrap();
            server.step(&last, lookup)
        };
        assert!(matches!(run("user", "pencil"), SaslStep::Success { .. }));
        assert_eq!(run("user", "pen"), SaslStep::Failure(SaslFailure::Rejected));
        assert_eq!(
            run("nobody", "pencil"),
            SaslStep::Failure(SaslFailure::Rejected)
        );
    }

    #[test]
    fn malformed_and_forged_messages_fail() {
        let first = |input: &str| ScramServer::new("s".into()).step(input.as_bytes(), lookup);
        for bad in [
            "",
            "n",
            "n,,",
            "x,,n=user,r=a",
            "p=tls-unique,,n=user,r=a",
            "n,,m=ext,n=user,r=a",
            "n,,n=us=er,r=a",
            "n,,n=user",
            "n,,n=user,r=",
            "n,a=other,n=user,r=a",
        ] {
            assert!(matches!(first(bad), SaslStep::Failure(_)), "{bad}");
        }
        assert!(matches!(
            first("n,a=user,n=user,r=abc"),
            SaslStep::Challenge(_)
        ));
        assert!(matches!(first("y,,n=user,r=abc"), SaslStep::Challenge(_)));
        // A final message with another nonce, or another channel binding, fails.
        for forged in [
            CLIENT_FINAL.replace("r=rOpr", "r=XOpr"),
            CLIENT_FINAL.replace("c=biws", "c=eSws"),
            CLIENT_FINAL.replace(",p=", ",q="),
        ] {
            let mut server = ScramServer::new("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
            server.step(CLIENT_FIRST.as_bytes(), lookup);
            assert!(
                matches!(server.step(forged.as_bytes(), lookup), SaslStep::Failure(_)),
                "{forged}"
            );
        }
    }

    #[test]
    fn names_are_escaped_and_unescaped() {
        assert_eq!(unescape_name("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert_eq!(escape_name("a,b=c"), "a=2Cb=3Dc");
        assert!(unescape_name("a=4").is_err());
        assert!(fresh_nonce().is_some_and(|n| n.len() == 24 && !n.contains(',')));
    }

    proptest::proptest! {
        #[test]
        fn any_input_to_any_step_is_answered_without_panicking(a: Vec<u8>, b: Vec<u8>) {
            let mut server = ScramServer::new("n".into());
            let _ = server.step(&a, lookup);
            let _ = server.step(&b, lookup);
            let mut server = ScramServer::new("n".into());
            let _ = server.step(b"n,,n=user,r=abc", lookup);
            let _ = server.step(&b, lookup);
        }
    }
}
