//! The relay's own well-known endpoints (RFC 3340 §2.2: local parts starting `apex=`), one
//! module each. Data for a service of this relay's domain is handed to it instead of to an
//! attached application (RFC 3340 §4.4.4.1 step 5.3 leaves this to the relay), after the same
//! access check as any recipient; what a service sends is data from its endpoint, routed like
//! any endpoint's. The access and presence services plug in here.
//!
//! Services run on every shard alike: the report service holds no state, and the access
//! service reads the access table every shard has and leaves its changes to the store, which
//! decides them in one place ([`crate::store`]).

use bytes::Bytes;

use crate::apex::access::AccessTable;
use crate::apex::addr::Endpoint;
use crate::beep::mgmt::code;
use crate::store::{Outcome, StoreFailure, StoreOp};

pub mod access;
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

/// What a service goes on with once the store made its change durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuation {
    /// The access service's `set`: answer it.
    AccessSet(access::SetPending),
}

/// What a service works with while it handles one data.
#[derive(Debug)]
pub struct ServiceContext<'a> {
    /// The access table in force.
    pub access: &'a AccessTable,
    /// What the service sends, as data from its endpoint.
    pub out: &'a mut Vec<Outgoing>,
    /// A change to make durable, and what to do once it is (at most one per data).
    pub store: Option<(StoreOp, Continuation)>,
}

/// One well-known endpoint's behaviour.
pub trait Service {
    /// The service's address (`apex=report`): its endpoint and every subaddress of it.
    fn address(&self) -> &'static str;

    /// A `data` for the service from `originator`. `Ok` when taken; what the service sends in
    /// return goes in the context.
    fn receive(
        &mut self,
        originator: &Endpoint,
        payload: &Bytes,
        ctx: &mut ServiceContext<'_>,
    ) -> Result<(), Refused>;
}

/// The services of one relay's domain.
#[derive(Debug)]
pub struct Services {
    report: report::ReportService,
    access: access::AccessService,
}

impl Services {
    /// The services of `domain`.
    pub fn new(domain: &str) -> Self {
        Self {
            report: report::ReportService::new(domain),
            access: access::AccessService::new(domain),
        }
    }

    /// The endpoint of the service at `recipient`'s address, the originator of what it sends.
    pub fn endpoint_of(&self, recipient: &Endpoint) -> Option<&Endpoint> {
        match recipient.address() {
            a if a.eq_ignore_ascii_case(self.access.address()) => self.access.endpoint(),
            a if a.eq_ignore_ascii_case(self.report.address()) => self.report.endpoint(),
            _ => None,
        }
    }

    /// The store decided a service's change: the service goes on.
    pub fn stored(
        &self,
        then: Continuation,
        outcome: Result<Outcome, StoreFailure>,
        out: &mut Vec<Outgoing>,
    ) {
        match then {
            Continuation::AccessSet(pending) => self.access.stored(pending, outcome, out),
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
        ctx: &mut ServiceContext<'_>,
    ) -> Result<(), Refused> {
        let service: &mut dyn Service = match recipient.address() {
            a if a.eq_ignore_ascii_case(self.report.address()) => &mut self.report,
            a if a.eq_ignore_ascii_case(self.access.address()) => &mut self.access,
            _ => {
                return Err(Refused {
                    code: code::ACTION_NOT_TAKEN,
                    text: "no such service",
                })
            }
        };
        service.receive(originator, payload, ctx)
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
        let access = AccessTable::new();
        let mut ctx = ServiceContext {
            access: &access,
            out: &mut out,
            store: None,
        };
        let refused = services.receive(
            &endpoint("apex=nothing@example.com"),
            &endpoint("fred@example.com"),
            &Bytes::from_static(b"x"),
            &mut ctx,
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
