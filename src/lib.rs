//! # apexd: the runtime shell of the APEX relay
//!
//! Owns CPUs, executors, sockets, timers, configuration, signals and logs, and drives the
//! sans-IO protocol core in `apex-proto`. It never parses payloads itself.
#![deny(unsafe_code)]

pub mod apex_profile;
pub mod config;
pub mod dns;
pub mod logs;
pub mod manpages;
pub mod monitor;
pub mod reload;
pub mod security;
pub mod service_manager;
pub mod shard;
pub mod store;
pub mod sys;
