//! Loading what the relay secures itself with: the TLS certificate, key and roots (PEM files)
//! into rustls configurations, and the credentials file (`--users`). Every error names the
//! file and what is wrong with it; the shard cores receive the result
//! (`apex_proto::shard::Security`) and never touch the filesystem.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use apex_proto::auth::users::Users;
use apex_proto::shard::Security;
use apex_proto::tls::crypto_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// The TLS configurations and users `config` names.
pub fn load(config: &Config) -> Result<Security> {
    let users = if config.auth.users.is_empty() {
        Users::default()
    } else {
        load_users(Path::new(&config.auth.users))?
    };
    let mut security = Security {
        users: Arc::new(users),
        ..Security::default()
    };
    let roots = if config.tls.ca.is_empty() {
        None
    } else {
        Some(load_roots(Path::new(&config.tls.ca))?)
    };
    let identity = if config.tls.cert.is_empty() {
        None
    } else {
        let chain = load_certificates(Path::new(&config.tls.cert))?;
        let key = load_key(Path::new(&config.tls.key))?;
        Some((chain, key))
    };
    if let Some((chain, key)) = &identity {
        security.tls_server = Some(Arc::new(server_config(chain, key, roots.clone(), config)?));
    }
    if let Some(roots) = roots {
        security.tls_client = Some(Arc::new(client_config(identity, roots, config)?));
    }
    Ok(security)
}

/// Reads and parses the credentials file.
pub fn load_users(path: &Path) -> Result<Users> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read users file {}", path.display()))?;
    Users::parse(&text, &path.display().to_string()).map_err(|e| anyhow!("{e}"))
}

fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    if chain.is_empty() {
        bail!("{}: no PEM certificate in it", path.display());
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    if path.as_os_str().is_empty() {
        bail!("field `tls.key`: a certificate needs its private key (--tls-key)");
    }
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow!("{}: no usable PEM private key: {e}", path.display()))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| anyhow!("{}: not a usable root certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The listener's side: our certificate; client certificates verified against `roots` when
/// given (optional: endpoints may authenticate with SASL instead, relays by address).
fn server_config(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    roots: Option<rustls::RootCertStore>,
    config: &Config,
) -> Result<rustls::ServerConfig> {
    let provider = crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match roots {
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| anyhow!("{}: {e}", config.tls.ca))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map_err(|e| anyhow!("{} and {}: {e}", config.tls.cert, config.tls.key))
}

/// The link's side: verifies that the next relay's certificate chains to `roots` and names
/// its domain; presents our certificate when we have one.
fn client_config(
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    roots: rustls::RootCertStore,
    config: &Config,
) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| anyhow!("{} and {}: {e}", config.tls.cert, config.tls.key)),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The security configuration every shard uses, replaced as a whole by a reload (SIGHUP,
/// `crate::reload`):
/// shards notice the new generation and take it for new sessions and new SASL exchanges;
/// sessions keep the identity and TLS they negotiated.
#[derive(Debug, Default)]
pub struct SharedSecurity {
    current: std::sync::Mutex<Security>,
    generation: std::sync::atomic::AtomicU64,
}

impl SharedSecurity {
    /// Starts with `security`.
    pub fn new(security: Security) -> Self {
        Self {
            current: std::sync::Mutex::new(security),
            generation: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The generation in force; it grows with every replacement.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration in force, with its generation.
    pub fn get(&self) -> (u64, Security) {
        let current = match self.current.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        (self.generation(), current)
    }

    /// Puts `security` in force.
    pub fn replace(&self, security: Security) {
        match self.current.lock() {
            Ok(mut guard) => *guard = security,
            Err(poisoned) => *poisoned.into_inner() = security,
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}
