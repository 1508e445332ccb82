//! Finding another domain's relay when no static route names it (RFC 3340 §3.1, APEX-04):
//! DNS SRV `_apex-mesh._tcp.<domain>`, targets tried by priority; without SRV records, the
//! domain's own addresses on the IANA port 912; a domain literal (`[192.0.2.1]`) is its address.
//!
//! Lookups run on a short-lived thread with its own small tokio runtime (hickory's resolver is
//! tokio-based), so they never block a shard: the shard polls for the answer.

pub mod srv;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// The IANA port of apex-mesh (RFC 3340 §8.3).
pub const APEX_MESH_PORT: u16 = 912;

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The address of a domain literal such as `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
pub fn literal_address(domain: &str) -> Option<SocketAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let text = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    let ip: IpAddr = text.parse().ok()?;
    Some(SocketAddr::new(ip, APEX_MESH_PORT))
}

/// Starts resolving `domain`'s relays; the handle yields candidate addresses, best first.
pub fn resolve_mesh(domain: &str) -> std::thread::JoinHandle<Result<Vec<SocketAddr>>> {
    let domain = domain.to_owned();
    std::thread::Builder::new()
        .name("apexd-dns".into())
        .spawn(move || lookup(&domain))
        .unwrap_or_else(|e| {
            let error = anyhow!("cannot start a DNS lookup thread: {e}");
            std::thread::spawn(move || Err(error))
        })
}

fn lookup(domain: &str) -> Result<Vec<SocketAddr>> {
    if let Some(addr) = literal_address(domain) {
        return Ok(vec![addr]);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("DNS runtime")?;
    runtime.block_on(async {
        let mut builder = hickory_resolver::TokioResolver::builder_tokio()
            .context("reading the system DNS configuration")?;
        builder.options_mut().timeout = LOOKUP_TIMEOUT;
        builder.options_mut().attempts = 1;
        let resolver = builder.build().context("building the DNS resolver")?;
        let name = format!("_apex-mesh._tcp.{domain}.");
        let mut found = Vec::new();
        if let Ok(srv) = resolver.srv_lookup(name.as_str()).await {
            let mut records: Vec<_> = srv
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::SRV(srv) => Some(srv.clone()),
                    _ => None,
                })
                .collect();
            records.sort_by_key(|r| (r.priority, std::cmp::Reverse(r.weight)));
            for record in records {
                if let Ok(ips) = resolver.lookup_ip(record.target.to_utf8().as_str()).await {
                    found.extend(ips.iter().map(|ip| SocketAddr::new(ip, record.port)));
                }
            }
        }
        if found.is_empty() {
            let ips = resolver
                .lookup_ip(format!("{domain}.").as_str())
                .await
                .with_context(|| {
                    format!("no relay found for {domain} (no SRV {name}, no address)")
                })?;
            found.extend(ips.iter().map(|ip| SocketAddr::new(ip, APEX_MESH_PORT)));
        }
        Ok(found)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apex_04_domain_literals_use_the_iana_port() {
        assert_eq!(
            literal_address("[192.0.2.1]"),
            Some("192.0.2.1:912".parse().unwrap())
        );
        assert_eq!(
            literal_address("[IPv6:2001:db8::1]"),
            Some("[2001:db8::1]:912".parse().unwrap())
        );
        assert_eq!(literal_address("example.com"), None);
        assert_eq!(literal_address("[not an ip]"), None);
    }

    #[test]
    fn literal_lookup_needs_no_dns() {
        let found = resolve_mesh("[127.0.0.1]").join().unwrap().unwrap();
        assert_eq!(found, vec!["127.0.0.1:912".parse().unwrap()]);
    }
}
