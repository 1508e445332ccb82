//! The two log lines of every session's life, target `apexd::session` at INFO: one when it
//! starts (an accepted connection on the edge or mesh port, or an outbound relay link that
//! connected) and one when it ends, with who the peer was, how it ended, how long it lasted
//! and what went through it. The octets are the driver's ([`Traffic`]); the messages and the
//! identity are the shard core's ([`SessionSummary`]), asked before the core forgets the
//! connection.

use std::net::SocketAddr;
use std::time::Duration;

use apex_proto::apex::relay::{ActedAs, ConnId, ConnKind};
use apex_proto::shard::SessionSummary;
use apex_proto::ProtocolError;
use tracing::info;

use crate::shard::conn::Ending;

/// Which way a session came: accepted on a port, or opened by this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Accepted on apex-edge (an endpoint).
    Edge,
    /// Accepted on apex-mesh (another relay).
    Mesh,
    /// An outbound relay link this shard opened.
    Link,
}

impl Port {
    /// The port an accepted connection came in on.
    pub fn accepted(kind: ConnKind) -> Self {
        match kind {
            ConnKind::Edge => Port::Edge,
            ConnKind::Mesh => Port::Mesh,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Port::Edge => "edge",
            Port::Mesh => "mesh",
            Port::Link => "link",
        }
    }
}

/// What the driver of one connection counts as it goes: octets read and written, and the
/// protocol error that ended the session, if one did.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Octets read from the transport (TLS records included).
    pub octets_in: u64,
    /// Octets written to the transport.
    pub octets_out: u64,
    /// Why the session was aborted.
    pub error: Option<ProtocolError>,
}

fn ending_name(ending: &Ending) -> &'static str {
    match ending {
        Ending::Released => "released",
        Ending::PeerClosed => "peer_closed",
        Ending::Aborted => "aborted",
        Ending::GraceExpired => "grace_expired",
    }
}

/// Names, comma-separated; `None` (the field is left out) when there are none.
fn listed(names: &[String]) -> Option<String> {
    (!names.is_empty()).then(|| names.join(","))
}

/// The session of `conn` on `shard` started.
pub fn started(shard: usize, conn: ConnId, port: Port, peer: Option<SocketAddr>) {
    info!(
        target: "apexd::session",
        shard,
        conn = conn.raw(),
        port = port.name(),
        peer = peer.map(tracing::field::display),
        "session started"
    );
}

/// Everything the end line says about one session.
#[derive(Debug)]
pub struct Ended<'a> {
    /// Shard index.
    pub shard: usize,
    /// The connection.
    pub conn: ConnId,
    /// Which way it came.
    pub port: Port,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// How it ended.
    pub ending: &'a Ending,
    /// How long it lasted.
    pub duration: Duration,
    /// The driver's counts.
    pub traffic: &'a Traffic,
    /// The core's account of it (none if the core no longer knew the connection).
    pub summary: Option<&'a SessionSummary>,
}

/// The session ended: one line with all of [`Ended`].
pub fn ended(end: &Ended<'_>) {
    let summary = end.summary.cloned().unwrap_or_default();
    let identity = &summary.identity;
    let ActedAs {
        attached,
        bound,
        more,
    } = &identity.acted_as;
    info!(
        target: "apexd::session",
        shard = end.shard,
        conn = end.conn.raw(),
        port = end.port.name(),
        peer = end.peer.map(tracing::field::display),
        link = summary.link.as_deref(),
        sasl = identity.sasl.as_deref(),
        cert = listed(&identity.certificate_domains),
        attached = listed(attached),
        bound = listed(bound),
        // Names attached or bound as past those kept (apex_proto's MAX_NAMES_RECORDED).
        more_names = (*more > 0).then_some(*more as u64),
        ending = ending_name(end.ending),
        // The relay ended it: no greeting in time, or nothing on it for too long.
        timed_out = summary.timed_out.map(apex_proto::shard::Timeout::name),
        error = end.traffic.error.as_ref().map(tracing::field::display),
        duration_ms = end.duration.as_millis() as u64,
        msgs_in = summary.messages_in,
        msgs_out = summary.messages_out,
        octets_in = end.traffic.octets_in,
        octets_out = end.traffic.octets_out,
        "session ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_listed_and_none_leaves_the_field_out() {
        assert_eq!(listed(&[]), None);
        let names = ["a@x".to_owned(), "b@x".to_owned()];
        assert_eq!(listed(&names).as_deref(), Some("a@x,b@x"));
    }
}
