//! The relay's own well-known endpoints (RFC 3340 §2.2: local parts starting `apex=`), one
//! module each. Data for a service of this relay's domain is handed to it instead of to an
//! attached application (RFC 3340 §4.4.4.1 step 5.3 leaves this to the relay), after the same
//! access check as any recipient; what a service sends is data from its endpoint, routed like
//! any endpoint's. The access and presence services plug in here.
//!
//! Services run on every shard alike (the report service holds no state); one whose state must
//! be kept in one place routes its requests to a home shard like an endpoint's.

use bytes::Bytes;

use crate::apex::addr::Endpoint;
use crate::beep::mgmt::code;

pub mod report;

/// Why a service did not take a data: reported to the originator when it asked (APEX-38).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Reply code.
    pub code: u16,
    /// Why.
    pub text: &'static str,
}

/// A data a service sends: from its endpoint to `recipient`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where it goes (an endpoint here or of another domain).
    pub recipient: Endpoint,
    /// The whole `data` message.
    pub payload: Bytes,
}

/// One well-known endpoint's behaviour.
pub trait Service {
    /// The service's address (`apex=report`): its endpoint and every subaddress of it.
    fn address(&self) -> &'static str;

    /// A `data` for the service from `originator`. `Ok` when taken; what the service sends in
    /// return goes in `out`.
    fn receive(
        &mut self,
        originator: &Endpoint,
        payload: &Bytes,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Refused>;
}

/// The services of one relay's domain.
#[derive(Debug)]
pub struct Services {
    report: report::ReportService,
}

impl Services {
    /// The services of `domain`.
    pub fn new(domain: &str) -> Self {
        Self {
            report: report::ReportService::new(domain),
        }
    }

    /// The report service, which the relay asks for statusResponses.
    pub fn report(&self) -> &report::ReportService {
        &self.report
    }

    /// Hands `payload` for `recipient` (a well-known endpoint of this domain) to its service;
    /// an address no service has is refused as an endpoint that is not there.
    pub fn receive(
        &mut self,
        recipient: &Endpoint,
        originator: &Endpoint,
        payload: &Bytes,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Refused> {
        let service: &mut dyn Service = match recipient.address() {
            a if a.eq_ignore_ascii_case(self.report.address()) => &mut self.report,
            _ => {
                return Err(Refused {
                    code: code::ACTION_NOT_TAKEN,
                    text: "no such service",
                })
            }
        };
        service.receive(originator, payload, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(text: &str) -> Endpoint {
        Endpoint::parse(text).unwrap()
    }

    #[test]
    fn an_address_no_service_has_is_refused_with_550() {
        let mut services = Services::new("example.com");
        let mut out = Vec::new();
        let refused = services.receive(
            &endpoint("apex=nothing@example.com"),
            &endpoint("fred@example.com"),
            &Bytes::from_static(b"x"),
            &mut out,
        );
        assert_eq!(
            refused,
            Err(Refused {
                code: 550,
                text: "no such service"
            })
        );
        assert!(out.is_empty());
    }
}
