//! The report service `apex=report` (RFC 3340 §6.2, APEX-38, APEX-45): it sends each
//! statusResponse as a `data` from `apex=report@DOMAIN` to the originator that asked. Consumers
//! initiate nothing with it, so data sent to it is refused.

use bytes::Bytes;

use super::{Outgoing, Refused, Service, ServiceContext};
use crate::apex::addr::Endpoint;
use crate::apex::client::DataBuilder;
use crate::apex::options;
use crate::beep::mgmt::code;

/// The report service of one domain.
#[derive(Debug)]
pub struct ReportService {
    /// `apex=report@DOMAIN`, the originator of every report (`None` only for a domain no
    /// endpoint can have, which the relay's configuration refuses).
    endpoint: Option<Endpoint>,
}

impl ReportService {
    /// The report service of `domain`.
    pub fn new(domain: &str) -> Self {
        Self {
            endpoint: Endpoint::parse(&options::report_originator(domain)).ok(),
        }
    }

    /// The service's endpoint, the originator of its reports.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    /// The statusResponse (transID `trans_id`) telling `originator` what became of its data
    /// for `recipient`: `reply_code` with `text` (RFC 3340 §5.1, §6.2).
    pub fn status_response(
        &self,
        originator: &Endpoint,
        recipient: &str,
        trans_id: u32,
        reply_code: u16,
        text: &str,
    ) -> Option<Outgoing> {
        let reporter = self.endpoint.as_ref()?;
        let destination = options::Destination {
            identity: recipient,
            code: reply_code,
            text,
        };
        let xml = options::status_response_xml(trans_id, &[destination]);
        Some(Outgoing {
            recipient: originator.clone(),
            payload: DataBuilder::new(reporter.as_str())
                .to(originator.as_str())
                .markup(&xml),
        })
    }
}

impl Service for ReportService {
    fn address(&self) -> &'static str {
        "apex=report"
    }

    fn receive(
        &mut self,
        _originator: &Endpoint,
        _payload: &Bytes,
        _ctx: &mut ServiceContext<'_>,
    ) -> Result<(), Refused> {
        Err(Refused {
            code: code::ACTION_NOT_TAKEN,
            text: "the report service takes no requests",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apex_38_a_status_response_is_data_from_the_report_service() {
        let service = ReportService::new("example.com");
        let fred = Endpoint::parse("fred@example.com").unwrap();
        let report = service
            .status_response(&fred, "barney@example.com", 86, 250, "")
            .unwrap();
        assert_eq!(report.recipient, fred);
        let text = String::from_utf8(report.payload.to_vec()).unwrap();
        assert!(
            text.contains("<originator identity='apex=report@example.com' />"),
            "{text}"
        );
        assert!(
            text.contains("<recipient identity='fred@example.com' />"),
            "{text}"
        );
        assert!(text.contains("<statusResponse transID='86'>"), "{text}");
        assert!(
            text.contains("<destination identity='barney@example.com'>"),
            "{text}"
        );
        assert!(text.contains("<reply code='250' transID='86' />"), "{text}");
    }

    #[test]
    fn apex_45_consumers_initiate_nothing() {
        let mut service = ReportService::new("example.com");
        let fred = Endpoint::parse("fred@example.com").unwrap();
        let mut out = Vec::new();
        let access = crate::apex::access::AccessTable::new();
        let mut ctx = ServiceContext {
            access: &access,
            out: &mut out,
            store: None,
        };
        let refused = service.receive(&fred, &Bytes::from_static(b"x"), &mut ctx);
        assert_eq!(refused.map_err(|r| r.code), Err(550));
        assert!(out.is_empty());
    }
}
