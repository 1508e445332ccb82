//! Authentication without I/O: the SASL mechanisms apexd offers (SCRAM-SHA-256, PLAIN; the
//! shard core adds EXTERNAL from TLS), and the credentials file they check against. The shard
//! core wraps these octets in BEEP's `blob` elements (RFC 3080 §4.1.2).

pub mod plain;
pub mod scram;
pub mod users;
