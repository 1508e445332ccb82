//! The `http://iana.org/beep/APEX` profile (RFC 3340 §4.2): its URI. The profile's behaviour
//! lives in the protocol core's relay (`apex_proto::apex::relay`), driven by the connection
//! driver.

pub use apex_proto::apex::relay::APEX_PROFILE;
