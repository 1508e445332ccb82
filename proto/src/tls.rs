//! TLS as a sans-IO layer under a BEEP session (RFC 3080 §3.1): rustls's connection state,
//! driven with ciphertext in and ciphertext out. No socket and no async TLS crate: the shard
//! core feeds what the runtime read and appends what is to be written to the same output as
//! plaintext sessions, so the runtime's loop does not know TLS exists and a plaintext session
//! pays nothing for it.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use rustls::pki_types::{CertificateDer, ServerName};

/// The cryptography under every TLS configuration of apexd: rustls's *ring* provider, the
/// library SCRAM uses too. rustls now prefers aws-lc-rs for its post-quantum key exchange,
/// but that needs cmake and a long C build on every machine that builds apexd; *ring* gives
/// TLS 1.2/1.3 with AES-GCM and ChaCha20-Poly1305 over X25519 and the NIST curves.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS connection failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError(e.to_string())
    }
}

/// One connection's TLS state.
#[derive(Debug)]
pub struct TlsLayer {
    conn: rustls::Connection,
}

impl TlsLayer {
    /// The listener's side: the peer sent `ready`, so it is the TLS client (beep.md §7).
    pub fn server(config: Arc<rustls::ServerConfig>) -> Result<Self, TlsError> {
        let mut conn = rustls::ServerConnection::new(config)?;
        // What the session writes is encrypted and taken at once (see `transmit`): nothing
        // accumulates, and the greeting written during the handshake must not be refused.
        conn.set_buffer_limit(None);
        Ok(Self { conn: conn.into() })
    }

    /// The side that sent `ready`: the TLS client, verifying that the peer's certificate
    /// names `server_name` (the next relay's domain).
    pub fn client(config: Arc<rustls::ClientConfig>, server_name: &str) -> Result<Self, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| TlsError(format!("'{server_name}' cannot name a TLS server: {e}")))?;
        let mut conn = rustls::ClientConnection::new(config, name)?;
        conn.set_buffer_limit(None);
        Ok(Self { conn: conn.into() })
    }

    /// Takes every octet of `cipher` and appends what it decrypts to `plain`. An error ends
    /// the connection (an alert may wait in [`TlsLayer::transmit`]).
    pub fn receive(&mut self, cipher: &mut BytesMut, plain: &mut BytesMut) -> Result<(), TlsError> {
        while !cipher.is_empty() {
            let mut reader: &[u8] = cipher;
            let taken = self
                .conn
                .read_tls(&mut reader)
                .map_err(|e| TlsError(e.to_string()))?;
            let _ = cipher.split_to(taken);
            let state = self.conn.process_new_packets()?;
            if state.peer_has_closed() && !cipher.is_empty() {
                // Octets after close_notify would never be read: end the connection rather
                // than hold them.
                return Err(TlsError("data after the peer's close_notify".to_owned()));
            }
            let mut waiting = state.plaintext_bytes_to_read();
            while waiting > 0 {
                let start = plain.len();
                plain.resize(start + waiting, 0);
                let n = self
                    .conn
                    .reader()
                    .read(&mut plain[start..])
                    .map_err(|e| TlsError(e.to_string()))?;
                plain.truncate(start + n);
                if n == 0 {
                    break;
                }
                waiting -= n;
            }
            if taken == 0 && !cipher.is_empty() {
                // Its plaintext was read, so rustls refusing more means it never will.
                return Err(TlsError("TLS input not taken".to_owned()));
            }
        }
        Ok(())
    }

    /// Encrypts `plain` for the peer (buffered while the handshake runs).
    pub fn send(&mut self, plain: &[u8]) -> Result<(), TlsError> {
        self.conn
            .writer()
            .write_all(plain)
            .map_err(|e| TlsError(e.to_string()))
    }

    /// Appends every TLS record waiting to be written to `out`; returns how many octets.
    pub fn transmit(&mut self, out: &mut BytesMut) -> usize {
        let mut written = 0;
        let mut writer = out.writer();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut writer) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
        }
        written
    }

    /// Whether records wait to be written.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Tells the peer no more data follows (the session ended).
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// The peer's certificate chain, verified by the configuration's verifier, if it sent one.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.conn
            .peer_certificates()
            .and_then(|chain| chain.first())
    }

    /// The negotiated protocol version and cipher suite, for logs.
    pub fn describe(&self) -> String {
        let version = self
            .conn
            .protocol_version()
            .map_or_else(|| "-".to_owned(), |v| format!("{v:?}"));
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .map_or_else(|| "-".to_owned(), |s| format!("{:?}", s.suite()));
        format!("{version} {suite}")
    }
}

/// The names a certificate's subjectAltName gives: DNS names (a relay's domain) and email
/// addresses (an endpoint, for SASL EXTERNAL), lower-cased domain parts. A certificate that
/// does not parse names nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateNames {
    /// dNSName entries.
    pub domains: Vec<String>,
    /// rfc822Name entries.
    pub emails: Vec<String>,
}

impl CertificateNames {
    /// Reads the subjectAltName of `der`.
    pub fn of(der: &[u8]) -> Self {
        use x509_parser::extensions::GeneralName;
        let mut names = Self::default();
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return names;
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return names;
        };
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => names.domains.push(d.to_ascii_lowercase()),
                GeneralName::RFC822Name(e) => names.emails.push((*e).to_owned()),
                _ => {}
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    /// A CA, and a server certificate for `example.com` signed by it.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["example.com".to_owned()]).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let provider = crypto_provider();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Moves what `from` has to write into `to`, returning what `to` decrypted.
    fn pass(from: &mut TlsLayer, to: &mut TlsLayer) -> Result<BytesMut, TlsError> {
        let mut wire = BytesMut::new();
        from.transmit(&mut wire);
        let mut plain = BytesMut::new();
        to.receive(&mut wire, &mut plain)?;
        assert!(wire.is_empty(), "ciphertext left unread");
        Ok(plain)
    }

    /// Both ends in memory: a handshake, then data both ways through rustls, the greeting
    /// written before the handshake ended delivered after it.
    #[test]
    fn an_in_memory_pair_runs_tls_both_ways() {
        let (server_config, client_config) = configs();
        let mut server = TlsLayer::server(server_config).unwrap();
        let mut client = TlsLayer::client(client_config, "example.com").unwrap();
        server.send(b"RPY 0 0 . 0 0\r\nEND\r\n").unwrap();
        for _ in 0..4 {
            let at_client = pass(&mut client, &mut server).unwrap();
            let at_server = pass(&mut server, &mut client).unwrap();
            assert!(at_client.is_empty());
            if !at_server.is_empty() {
                assert_eq!(&at_server[..], b"RPY 0 0 . 0 0\r\nEND\r\n");
            }
        }
        assert!(!server.is_handshaking() && !client.is_handshaking());
        client.send(&vec![7u8; 100_000]).unwrap();
        let got = pass(&mut client, &mut server).unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(got.iter().all(|b| *b == 7));
        assert!(server.describe().contains("TLS"));
    }

    /// The client checks that the certificate names the domain it connects to.
    #[test]
    fn a_certificate_for_another_name_fails_the_handshake() {
        let (server_config, client_config) = configs();
        let mut server = TlsLayer::server(server_config).unwrap();
        let mut client = TlsLayer::client(client_config, "rubble.com").unwrap();
        let mut failed = None;
        for _ in 0..4 {
            if let Err(e) =
                pass(&mut client, &mut server).and_then(|_| pass(&mut server, &mut client))
            {
                failed = Some(e);
                break;
            }
        }
        let failed = failed.expect("handshake with a certificate for example.com succeeded");
        assert!(failed.0.contains("certificate"), "{failed}");
    }

    /// Octets after the peer's close_notify end the connection: nothing would read them.
    #[test]
    fn data_after_close_notify_is_an_error() {
        let (server_config, client_config) = configs();
        let mut server = TlsLayer::server(server_config).unwrap();
        let mut client = TlsLayer::client(client_config, "example.com").unwrap();
        for _ in 0..4 {
            pass(&mut client, &mut server).unwrap();
            pass(&mut server, &mut client).unwrap();
        }
        client.close();
        pass(&mut client, &mut server).unwrap();
        let mut wire = BytesMut::from(&[0x17u8, 0x03, 0x03, 0x00, 0x10][..]);
        wire.extend_from_slice(&[0u8; 16]);
        let mut plain = BytesMut::new();
        assert!(server.receive(&mut wire, &mut plain).is_err());
    }

    /// Garbage instead of a ClientHello ends the connection with an error, not a panic.
    #[test]
    fn garbage_is_an_error() {
        let (server_config, _) = configs();
        let mut server = TlsLayer::server(server_config).unwrap();
        let mut wire = BytesMut::from(&b"MSG 0 1 . 0 10\r\nhello"[..]);
        let mut plain = BytesMut::new();
        assert!(server.receive(&mut wire, &mut plain).is_err());
    }

    #[test]
    fn certificate_names_come_from_the_subject_alt_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["Relay.Example.com".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "fred@example.com".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let names = CertificateNames::of(cert.der());
        assert_eq!(names.domains, ["relay.example.com"]);
        assert_eq!(names.emails, ["fred@example.com"]);
        assert_eq!(
            CertificateNames::of(b"not a certificate"),
            CertificateNames::default()
        );
    }
}
