//! BEEP (RFC 3080) over TCP (RFC 3081): frames, MIME entities, channels, channel management
//! and the session that ties them together.

pub mod channel;
pub mod frame;
pub mod mgmt;
pub mod mime;
pub mod output;
pub mod session;
pub mod tuning;
