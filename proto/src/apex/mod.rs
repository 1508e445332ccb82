//! APEX (RFC 3340): endpoint identities, access evaluation and operations, over BEEP.

pub mod access;
pub mod access_ops;
pub mod addr;
pub mod client;
pub mod msg;
pub mod options;
pub mod relay;
mod scan;
pub mod service;
pub mod timestamp;
