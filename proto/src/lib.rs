//! # apex-proto: the sans-IO protocol core of apexd
//!
//! BEEP (RFC 3080, mapped onto TCP by RFC 3081) and, on top of it, APEX (RFC 3340). This crate
//! does no I/O: no sockets, no runtime, no threads, no clock, no files. Bytes and events go in,
//! bytes and events come out; time is passed in by the caller.
//!
//! ```text
//!   read buffer (BytesMut) ─► beep::frame ─► beep::session/channel ─► Event ─► profile (APEX)
//!                                                                                 │
//!   write buffer (BytesMut) ◄──────────── poll_transmit ◄── send_msg / reply ◄────┘
//! ```
//!
//! Payloads are `bytes::Bytes` slices of the read buffer: a message that arrives in one frame
//! is never copied; only messages continued over several frames are reassembled.
#![forbid(unsafe_code)]

pub mod apex;
pub mod auth;
pub mod beep;
pub mod error;
pub mod limits;
pub mod shard;
pub mod stats;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod xml;

pub use beep::session::{Event, ReplyKind, Role, Session, SessionConfig, StartRequest};
pub use error::{Disposition, FrameError, Misuse, ProtocolError};
pub use limits::Limits;
