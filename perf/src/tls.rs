//! TLS for the load generator: the client configuration (a lab CA from a PEM file) and a
//! blocking TLS stream for the simple targets (`nats`).
//!
//! Both drivers run rustls through the protocol core's sans-IO [`TlsLayer`], the code apexd's
//! shards use, rather than rustls's own `StreamOwned`: the apex driver already owns its socket
//! (blocking, or non-blocking and polled with others), reads 256 KiB per system call and writes
//! one coalesced buffer per step, and the sans-IO layer keeps exactly that: ciphertext in from
//! one read, plaintext out, one write of whole records. `StreamOwned` reads at most 4 KiB per
//! system call (rustls's `read_tls`) and surfaces `WouldBlock` in the middle of its own I/O. The
//! NATS driver uses the same layer, so both targets pay the same client-side TLS cost.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use apex_proto::tls::{crypto_provider, TlsLayer};
use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::CipherSuite;

/// Bytes read per `read` call.
const READ_CHUNK: usize = 256 * 1024;

/// What a TLS connection of the load generator verifies: the server's certificate chains to
/// the lab CA and names `name`.
#[derive(Debug, Clone)]
pub(crate) struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: String,
}

impl TlsClient {
    /// Trusts the certificates in the PEM file `ca`; verifies that servers are `name`.
    pub(crate) fn load(ca: &Path, name: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read CA file {}", ca.display()))?
        {
            let cert = cert.map_err(|e| anyhow!("{}: not a PEM certificate: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("{}: no PEM certificate in it", ca.display());
        }
        ServerName::try_from(name.to_owned())
            .map_err(|e| anyhow!("--tls-name '{name}' cannot name a TLS server: {e}"))?;
        let mut provider = (*crypto_provider()).clone();
        // AES-128-GCM first: a Go TLS 1.3 server (nats-server) picks it whatever the client
        // prefers, and a rustls server (apexd) follows the client's order, so both targets run
        // the same cipher.
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            name: name.to_owned(),
        })
    }

    /// A fresh client-side TLS state for one connection.
    pub(crate) fn layer(&self) -> Result<TlsLayer> {
        TlsLayer::client(Arc::clone(&self.config), &self.name).map_err(|e| anyhow!("{e}"))
    }
}

/// True for the errors a socket with a timeout (or a non-blocking one) gives when it is not ready.
pub(crate) fn not_ready(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// A TLS client connection over a blocking TCP socket with read and write timeouts, which it
/// reports as they come (`WouldBlock`/`TimedOut`, retried by the caller). A write takes all of
/// its buffer once earlier ciphertext is out: what the socket did not take yet waits for the
/// next `write`, `read` or `flush`.
#[derive(Debug)]
pub(crate) struct TlsStream {
    sock: TcpStream,
    tls: TlsLayer,
    cipher_in: BytesMut,
    plain_in: BytesMut,
    cipher_out: BytesMut,
    scratch: Box<[u8]>,
}

impl TlsStream {
    /// Runs the TLS handshake on `sock` as the client; fails at `deadline`.
    pub(crate) fn handshake(
        sock: TcpStream,
        client: &TlsClient,
        deadline: Instant,
    ) -> Result<Self> {
        let mut s = Self {
            sock,
            tls: client.layer()?,
            cipher_in: BytesMut::with_capacity(READ_CHUNK),
            plain_in: BytesMut::with_capacity(READ_CHUNK),
            cipher_out: BytesMut::with_capacity(64 * 1024),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        };
        s.tls.transmit(&mut s.cipher_out);
        loop {
            match s.write_pending() {
                Ok(()) => {}
                Err(e) if not_ready(&e) => {}
                Err(e) => return Err(e).context("TLS handshake"),
            }
            if !s.tls.is_handshaking() && s.cipher_out.is_empty() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("TLS handshake not finished in time");
            }
            match s.read_cipher() {
                Ok(0) => bail!("the server closed the connection during the TLS handshake"),
                Ok(_) => {}
                Err(e) if not_ready(&e) => {}
                Err(e) => return Err(e).context("TLS handshake"),
            }
        }
    }

    /// The negotiated version and cipher suite.
    pub(crate) fn describe(&self) -> String {
        self.tls.describe()
    }

    /// Sends close_notify and shuts the socket's sending side (best effort).
    pub(crate) fn shutdown(&mut self) {
        self.tls.close();
        self.tls.transmit(&mut self.cipher_out);
        let _ = self.write_pending();
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }

    /// Reads once from the socket and decrypts what came; returns the octets read.
    fn read_cipher(&mut self) -> io::Result<usize> {
        let n = self.sock.read(&mut self.scratch)?;
        if n > 0 {
            self.cipher_in.extend_from_slice(&self.scratch[..n]);
            let received = self.tls.receive(&mut self.cipher_in, &mut self.plain_in);
            // Handshake messages the peer's records asked for, or the alert of a failure.
            self.tls.transmit(&mut self.cipher_out);
            if let Err(e) = received {
                let _ = self.write_pending();
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
        }
        Ok(n)
    }

    /// Writes the waiting ciphertext, stopping at the socket's timeout (reported).
    fn write_pending(&mut self) -> io::Result<()> {
        while !self.cipher_out.is_empty() {
            let n = self.sock.write(&self.cipher_out)?;
            if n == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
            self.cipher_out.advance(n);
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.plain_in.is_empty() {
                let n = buf.len().min(self.plain_in.len());
                buf[..n].copy_from_slice(&self.plain_in[..n]);
                self.plain_in.advance(n);
                return Ok(n);
            }
            match self.write_pending() {
                Err(e) if !not_ready(&e) => return Err(e),
                _ => {}
            }
            if self.read_cipher()? == 0 {
                return Ok(0);
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_pending()?;
        self.tls
            .send(buf)
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        self.tls.transmit(&mut self.cipher_out);
        match self.write_pending() {
            Err(e) if !not_ready(&e) => Err(e),
            // Taken: what the socket refused for now goes out on the next call.
            _ => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::time::Duration;

    use rustls::pki_types::PrivateKeyDer;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("apex-load-tls-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A lab CA in `dir`/ca.pem and a server configuration for example.com signed by it.
    fn lab(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["example.com".to_owned()]).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        (path, Arc::new(server))
    }

    /// A TLS echo server for one connection (the relay's own layer on its side); returns the
    /// plaintext octets it echoed.
    fn echo(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Result<usize, String> {
        let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut tls = TlsLayer::server(config).map_err(|e| e.to_string())?;
        let (mut cipher, mut plain, mut out) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
        let mut buf = vec![0u8; 64 * 1024];
        let mut echoed = 0;
        loop {
            let n = sock.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(echoed);
            }
            cipher.extend_from_slice(&buf[..n]);
            let received = tls.receive(&mut cipher, &mut plain);
            tls.transmit(&mut out);
            let _ = sock.write_all(&out);
            out.clear();
            received.map_err(|e| e.to_string())?;
            if !plain.is_empty() {
                echoed += plain.len();
                tls.send(&plain).map_err(|e| e.to_string())?;
                plain.clear();
                tls.transmit(&mut out);
                sock.write_all(&out).map_err(|e| e.to_string())?;
                out.clear();
            }
        }
    }

    fn client_socket(addr: std::net::SocketAddr) -> TcpStream {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        sock
    }

    /// Handshake, then 300 kB through the echo server with the socket timing out now and
    /// then: every octet comes back once and in order, AES-128-GCM negotiated.
    #[test]
    fn a_tls_stream_carries_data_both_ways() {
        let dir = scratch("echo");
        let (ca, config) = lab(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || echo(listener, config));
        let client = TlsClient::load(&ca, "example.com").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = TlsStream::handshake(client_socket(addr), &client, deadline).unwrap();
        assert!(
            s.describe().contains("TLS13_AES_128_GCM_SHA256"),
            "{}",
            s.describe()
        );
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 100_000];
        let mut sent = 0;
        while got.len() < data.len() {
            assert!(Instant::now() < deadline, "echo stalled at {}", got.len());
            if sent < data.len() {
                match s.write(&data[sent..(sent + 65_536).min(data.len())]) {
                    Ok(n) => sent += n,
                    Err(e) => assert!(not_ready(&e), "{e}"),
                }
            } else if let Err(e) = s.flush() {
                assert!(not_ready(&e), "{e}");
            }
            match s.read(&mut buf) {
                Ok(0) => panic!("the echo server closed"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => assert!(not_ready(&e), "{e}"),
            }
        }
        assert!(got == data, "the echo differs");
        s.shutdown();
        assert_eq!(server.join().unwrap(), Ok(data.len()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A certificate that does not name --tls-name fails the handshake.
    #[test]
    fn a_certificate_for_another_name_is_refused() {
        let dir = scratch("name");
        let (ca, config) = lab(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || echo(listener, config));
        let client = TlsClient::load(&ca, "rubble.com").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let failed = TlsStream::handshake(client_socket(addr), &client, deadline).unwrap_err();
        assert!(format!("{failed:#}").contains("certificate"), "{failed:#}");
        assert!(server.join().unwrap().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error() {
        let dir = scratch("ca");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(TlsClient::load(&empty, "example.com").is_err());
        assert!(TlsClient::load(&dir.join("none.pem"), "example.com").is_err());
        let (ca, _) = lab(&dir);
        assert!(TlsClient::load(&ca, "not a name!").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
