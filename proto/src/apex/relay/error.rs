//! Why the relay refuses an operation. Each refusal carries its reply code (RFC 3080 §8 codes,
//! which RFC 3340 §6 adopts, and APEX's own) and the text sent with it, so the code of every
//! answer is decided in one place.

use crate::apex::msg::apex_code;
use crate::beep::mgmt::code;

/// An operation the relay refuses, answered with an `error` element (RFC 3340 §4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApexError {
    /// The request, an identity in it or one of its options is malformed: the code and text
    /// of the parser that found it.
    Malformed {
        /// Reply code.
        code: u16,
        /// What was wrong.
        text: String,
    },
    /// An attach or bind reuses a transID live on the channel (APEX-10, APEX-17).
    TransactionInProgress,
    /// `ok` and `error` sent as requests.
    NotARequest,
    /// Something other than attach or bind piggybacked in a `start` (APEX-06).
    NotPiggybackable,
    /// An attach for an endpoint outside this relay's domain.
    ForeignDomain,
    /// An attach on an apex-mesh session, or as one of the relay's services (APEX-12).
    MayNotAttach,
    /// The endpoint is attached elsewhere and the attach does not override (APEX-14).
    AlreadyAttached,
    /// A bind on an apex-edge session, or for something that is not a domain (APEX-17).
    MayNotBind,
    /// A terminate naming no live transaction (APEX-19).
    UnknownTransaction,
    /// Data whose originator the peer may not speak for (APEX-22).
    ForeignOriginator,
    /// The only recipient has taken nothing for too long: try later (backpressure).
    RecipientNotTaking,
    /// An attach before the session authenticated, where the policy requires it (530).
    AuthenticationRequired,
    /// Data to hold could not be kept in the store (a full disk, an I/O error): try later.
    StoreFailed,
    /// Data to hold while the store has as many of this shard's requests as it may
    /// ([`super::RelayConfig::store_queue`]): try later.
    StoreBusy,
    /// Data none of whose recipients could be held: the hold queue is full.
    HoldFull,
    /// Data none of whose recipients could be held: its originator has its share of the hold
    /// queue (`hold.max_per_originator`).
    HoldShareFull,
}

impl ApexError {
    /// A malformed request, as a parser reported it.
    pub fn malformed(code: u16, text: impl Into<String>) -> Self {
        Self::Malformed {
            code,
            text: text.into(),
        }
    }

    /// The reply code.
    pub fn code(&self) -> u16 {
        match self {
            Self::Malformed { code, .. } => *code,
            Self::TransactionInProgress => apex_code::IN_PROGRESS,
            Self::NotARequest | Self::NotPiggybackable => code::PARAMETER_ERROR,
            Self::ForeignDomain => code::PARAMETER_INVALID,
            Self::MayNotAttach | Self::MayNotBind | Self::ForeignOriginator => {
                apex_code::NOT_AUTHORIZED
            }
            Self::AlreadyAttached => code::TRANSACTION_FAILED,
            Self::AuthenticationRequired => code::AUTHENTICATION_REQUIRED,
            Self::UnknownTransaction => code::ACTION_NOT_TAKEN,
            Self::RecipientNotTaking => code::ACTION_NOT_TAKEN_TRANSIENT,
            Self::StoreFailed => code::LOCAL_ERROR,
            Self::StoreBusy | Self::HoldFull | Self::HoldShareFull => {
                code::ACTION_NOT_TAKEN_TRANSIENT
            }
        }
    }

    /// The text sent with the code.
    pub fn text(&self) -> &str {
        match self {
            Self::Malformed { text, .. } => text,
            Self::TransactionInProgress => "transaction already in progress",
            Self::NotARequest => "ok and error are replies, not requests",
            Self::NotPiggybackable => "only attach or bind may be piggybacked",
            Self::ForeignDomain => "endpoint is not in this relay's domain",
            Self::MayNotAttach => "not authorized to attach as this endpoint",
            Self::AlreadyAttached => "endpoint is already attached",
            Self::MayNotBind => "not authorized to bind for this domain",
            Self::UnknownTransaction => "unknown transaction-identifier",
            Self::AuthenticationRequired => "authentication required",
            Self::ForeignOriginator => "not authorized to send as the originator",
            Self::RecipientNotTaking => RECIPIENT_NOT_TAKING,
            Self::StoreFailed => STORE_FAILED,
            Self::StoreBusy => "too many changes waiting for the store",
            Self::HoldFull => HOLD_FULL,
            Self::HoldShareFull => HOLD_SHARE_FULL,
        }
    }
}

/// Why data for a recipient that takes nothing is refused or reported (450, transient).
/// Why data to hold was refused or reported: the hold queue has no room.
pub(super) const HOLD_FULL: &str = "hold queue is full";

/// Why data to hold was refused or reported: its originator has as much held as one
/// originator may (`hold.max_per_originator`).
pub(super) const HOLD_SHARE_FULL: &str = "hold queue share of this originator is full";

/// Why data to hold was refused or reported: the store could not keep it.
pub(super) const STORE_FAILED: &str = "the relay could not store the data to hold";

pub(super) const RECIPIENT_NOT_TAKING: &str = "the recipient is not taking its messages";

impl std::fmt::Display for ApexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.text())
    }
}

impl std::error::Error for ApexError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_the_code_its_rfc_section_names() {
        // RFC 3340 §4.4.1 step 3 and §4.4.4.1 step 1: 537; §4.4.1 step 5: 554 (APEX-14);
        // §4.4.3: 550 for an unknown transID (APEX-19); RFC 3080 §8: 501, 553, 450.
        let cases = [
            (ApexError::MayNotAttach, 537),
            (ApexError::MayNotBind, 537),
            (ApexError::ForeignOriginator, 537),
            (ApexError::AlreadyAttached, 554),
            (ApexError::UnknownTransaction, 550),
            (ApexError::NotARequest, 501),
            (ApexError::NotPiggybackable, 501),
            (ApexError::ForeignDomain, 553),
            (ApexError::RecipientNotTaking, 450),
            (ApexError::TransactionInProgress, apex_code::IN_PROGRESS),
            (ApexError::malformed(500, "bad"), 500),
        ];
        for (error, expected) in cases {
            assert_eq!(error.code(), expected, "{error:?}");
            assert!(!error.text().is_empty(), "{error:?} has a text");
        }
    }
}
