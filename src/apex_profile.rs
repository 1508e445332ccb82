//! The `http://iana.org/beep/APEX` profile as this release serves it: channels start and close
//! at the BEEP level; APEX operations (attach, bind, terminate, data) are answered with a 504
//! error until the relay logic lands, so a peer never waits on an unanswered MSG.

use apex_proto::beep::mgmt::{code, ErrorElement, Mgmt, ProfileOffer};
use apex_proto::beep::profile::{ProfileHandler, StartDecision};
use apex_proto::{Session, StartRequest};
use bytes::Bytes;

/// The APEX profile URI (RFC 3340 §4).
pub const APEX_PROFILE: &str = "http://iana.org/beep/APEX";

/// Per-connection APEX profile state.
#[derive(Debug, Default)]
pub struct ApexProfile {
    /// MSGs answered on this connection.
    pub answered: u64,
}

fn not_implemented() -> Bytes {
    Mgmt::Error(ErrorElement::new(
        code::NOT_IMPLEMENTED,
        "APEX operations are not implemented by this relay yet",
    ))
    .to_payload()
}

impl ProfileHandler for ApexProfile {
    fn uri(&self) -> &str {
        APEX_PROFILE
    }

    fn on_start(
        &mut self,
        _: &mut Session,
        _: &StartRequest,
        offer: &ProfileOffer,
    ) -> StartDecision {
        // A piggybacked operation fails while the channel still opens (RFC 3080 §2.3.1.2).
        let content = offer.content.as_ref().map(|_| {
            Bytes::from(
                Mgmt::Error(ErrorElement::new(
                    code::NOT_IMPLEMENTED,
                    "APEX operations are not implemented yet",
                ))
                .to_xml(),
            )
        });
        StartDecision::Accept { content }
    }

    fn on_message(&mut self, session: &mut Session, channel: u32, msgno: u32, _payload: Bytes) {
        if session.send_err(channel, msgno, not_implemented()).is_ok() {
            self.answered += 1;
        }
    }
}
