//! The runtime's part of outbound relay links (RFC 3340 §3.1, §4.4.4.1 step 5.2): when the
//! shard core asks for a connection to a domain's relay ([`Output::Connect`]), find that relay
//! (a static route from the configuration, else the domain's `_apex-mesh._tcp` SRV records)
//! and connect to its apex-mesh port. What the link says and decides (greeting, `bind`,
//! replies, failures, reconnection and its backoff) is the core's
//! (`apex_proto::shard::LinkConfig`); once connected, the link's session is driven by
//! [`conn::serve`], the loop that drives every connection.
//!
//! [`Output::Connect`]: apex_proto::shard::Output::Connect

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use apex_proto::shard::ConnectFailure;
use glommio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::shard::conn;
use crate::shard::session_log::Port;
use crate::shard::ShardContext;

/// Finds and connects the relay of `domain` for this shard's link to it, then drives the
/// connection until it ends.
pub fn connect(ctx: &Rc<ShardContext>, domain: String) {
    let ctx = ctx.clone();
    // Counted as a connection from now on: shutdown waits for it.
    ctx.connections.set(ctx.connections.get() + 1);
    glommio::spawn_local(async move {
        let outcome = match addresses(&ctx, &domain).await {
            Ok(addrs) => match connect_first(&addrs).await {
                Ok(connected) => Ok(connected),
                Err(e) => {
                    warn!(shard = ctx.id, %domain, ?addrs, error = %e, "relay link failed");
                    Err(ConnectFailure::Unreachable(e.to_string()))
                }
            },
            Err(reason) => {
                warn!(shard = ctx.id, %domain, %reason, "no route");
                Err(ConnectFailure::NoRoute(
                    "no route to the recipient's domain".to_owned(),
                ))
            }
        };
        match outcome {
            Ok((stream, addr)) => {
                let conn = ctx
                    .core
                    .borrow_mut()
                    .link_connected(&domain, Instant::now());
                match conn {
                    Some(conn) => {
                        info!(shard = ctx.id, %domain, %addr, %conn, "relay link connected");
                        let ending =
                            conn::serve(stream, ctx.clone(), conn, Some(addr), Port::Link).await;
                        info!(shard = ctx.id, %domain, ?ending, "relay link ended");
                    }
                    None => drop(stream),
                }
            }
            Err(failure) => {
                ctx.core
                    .borrow_mut()
                    .link_connect_failed(&domain, failure, Instant::now());
            }
        }
        ctx.dispatch();
        ctx.connections.set(ctx.connections.get() - 1);
    })
    .detach();
}

/// Looks up the addresses of `domain`'s relay for a bind as `domain` waiting on them
/// (RFC 3340 §4.5.1: a relay without TLS is recognised by where it connects from).
pub fn resolve_relay(ctx: &Rc<ShardContext>, domain: String) {
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        let found: Vec<std::net::IpAddr> = match addresses(&ctx, &domain).await {
            Ok(addrs) => addrs.iter().map(SocketAddr::ip).collect(),
            Err(reason) => {
                info!(shard = ctx.id, %domain, %reason, "bind: no relay addresses for the domain");
                Vec::new()
            }
        };
        ctx.core
            .borrow_mut()
            .relay_addresses_found(&domain, &found, Instant::now());
        ctx.dispatch();
    })
    .detach();
}

/// The addresses of `domain`'s relay: its static route, else its SRV records.
async fn addresses(ctx: &ShardContext, domain: &str) -> Result<Vec<SocketAddr>, String> {
    if let Some(addr) = ctx.route(domain) {
        return Ok(vec![addr]);
    }
    crate::dns::resolve_mesh(&ctx.config.mesh, domain)
        .await
        .map_err(|e| e.to_string())
}

/// Connects to the first of `addrs` that accepts, trying them in order (RFC 2782: every address
/// of every target); when none does, the last error.
async fn connect_first(addrs: &[SocketAddr]) -> std::io::Result<(TcpStream, SocketAddr)> {
    let mut last = std::io::Error::other("no address to connect to");
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => {
                debug!(%addr, error = %e, "relay address refused");
                last = e.into();
            }
        }
    }
    Err(last)
}

impl ShardContext {
    /// The address of `domain`'s relay: a static route (the one in force since the last
    /// reload).
    pub fn route(&self, domain: &str) -> Option<SocketAddr> {
        self.routes
            .borrow()
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map(|(_, a)| *a)
    }
}
