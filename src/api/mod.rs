//! The gRPC edge: the only module that knows prost types.
//!
//! Requests are converted into domain types with `TryFrom` (parse, don't
//! validate); every failure becomes a `tonic::Status` through [`to_status`],
//! the one documented place where internal errors meet clients.
//!
//! Error model (google.rpc, via tonic-types): each status carries a code, a
//! safe message, and an `ErrorInfo` whose `reason` is a stable string clients
//! can match on (see [`reason`]). Invalid arguments also carry a `BadRequest`
//! with one field violation per refused field. Internal details (PKCS#11
//! return codes, SQLite messages) go to the log, never to the client.

mod audit;
mod policy;
pub mod transaction;
mod wallet;
mod withdrawal;

use std::collections::HashMap;

pub use audit::AuditApi;
pub use policy::PolicyApi;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
pub use wallet::WalletApi;
pub use withdrawal::{ApprovalApi, WithdrawalApi};

/// The request conversions that service methods run inline, reachable for
/// the fuzz targets under `fuzz/`. Not a stable API.
#[doc(hidden)]
pub mod fuzz_api {
    pub use super::wallet::{CreateWallet, ListWallets};
    pub use super::withdrawal::{signed_message, state_filter, withdrawal_id};
}

use crate::custody::CustodyError;
use crate::hsm::HsmError;
pub use crate::status::{ERROR_DOMAIN, FieldViolation, reason, status};
use crate::store::StoreError;
use crate::wallet::WalletError;

/// Default and maximum `page_size` of every List RPC.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// Parses a List request's `page_size` and `page_token` into (cursor, limit).
/// Tokens are the sequence number of the last item of the previous page.
pub fn paging(page_size: i32, page_token: &str) -> Result<(i64, usize), FieldViolation> {
    let limit = match usize::try_from(page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        _ => return Err(FieldViolation::new("page_size", "must be between 0 and 1000")),
    };
    let after = if page_token.is_empty() {
        0
    } else {
        page_token
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| FieldViolation::new("page_token", "is not a token from a previous response"))?
    };
    Ok((after, limit))
}

/// Maps a wallet-registry error to the status sent to the client.
///
/// Errors the client caused (not found, already exists) are described in
/// full. Server-side failures are logged here with their details and reach
/// the client only as a code, a reason and a generic message.
pub fn to_status(error: &WalletError) -> Status {
    match error {
        WalletError::NotFound(id) => status(
            Code::NotFound,
            reason::WALLET_NOT_FOUND,
            format!("wallet {id} not found"),
        ),
        WalletError::AlreadyExists(id) => status(
            Code::AlreadyExists,
            reason::WALLET_ALREADY_EXISTS,
            format!("wallet {id} already exists"),
        ),
        WalletError::KeyUnusable(id, _) => {
            tracing::error!(error = %error, "request refused");
            status(
                Code::FailedPrecondition,
                reason::WALLET_KEY_UNUSABLE,
                format!("wallet {id} cannot sign: its HSM key is missing or does not match"),
            )
        }
        WalletError::Hsm(hsm) => {
            tracing::error!(error = %hsm, "HSM error");
            hsm_status(hsm)
        }
        WalletError::Signature(e) => {
            tracing::error!(error = %e, "HSM signature refused");
            status(
                Code::Internal,
                reason::HSM_FAULT,
                "the HSM returned a signature that failed verification",
            )
        }
        WalletError::WrongSender(id) => status(
            Code::InvalidArgument,
            reason::WRONG_SENDER,
            format!("the transaction does not spend from wallet {id}"),
        ),
        WalletError::Store(e) => store_status(e),
        WalletError::Worker => {
            tracing::error!(error = %error, "internal error");
            status(
                Code::Internal,
                reason::INTERNAL,
                "internal error; see the server log",
            )
        }
    }
}

/// Maps a store error to the status sent to the client; the details are
/// logged here. Every one of these means the write, if any, is not stored
/// and nothing was signed, except `CommitUnknown`, which says so.
pub fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::CommitUnknown(_) => {
            tracing::error!(error = %error, "store commit outcome unknown");
            status(
                Code::Unavailable,
                reason::COMMIT_OUTCOME_UNKNOWN,
                "the store's connection broke while committing; the change may or may not be stored, and no signature was released. Retry with the same request id, or read the withdrawal",
            )
        }
        StoreError::Conflict(_) => {
            tracing::warn!(error = %error, "store write conflicted with a concurrent one");
            status(
                Code::Aborted,
                reason::STORE_CONFLICT,
                "a concurrent request changed the same record; nothing was stored or signed. Retry with the same request id",
            )
        }
        StoreError::Unavailable(_)
        | StoreError::Sqlite(_)
        | StoreError::Postgres(_)
        | StoreError::CommitFailed(_) => {
            tracing::error!(error = %error, "store unavailable");
            status(
                Code::Unavailable,
                reason::STORE_UNAVAILABLE,
                "the store is unavailable (unreachable, full or failing); nothing was stored or signed",
            )
        }
        _ => {
            tracing::error!(error = %error, "internal store error");
            status(
                Code::Internal,
                reason::INTERNAL,
                "internal store error; nothing was stored or signed; see the server log",
            )
        }
    }
}

/// Maps a custody-engine error to the status sent to the client. Refusals
/// of the client's own input are described in full; server-side failures are
/// logged here and reach the client as a code and a generic message.
/// Precondition failures carry their stable code as the `ErrorInfo` reason.
pub fn custody_status(error: &CustodyError) -> Status {
    match error {
        CustodyError::InvalidArgument { field, reason } => {
            FieldViolation::new(field.clone(), reason.clone()).into()
        }
        // The request's encoding is not known here; `create_withdrawal`
        // maps these itself, to the field that carried the item.
        CustodyError::Transaction(refusal) => {
            transaction::TxSource::Missing.violation(refusal.clone()).into()
        }
        CustodyError::NotFound(what) => {
            status(Code::NotFound, reason::NOT_FOUND, format!("{what} not found"))
        }
        CustodyError::AlreadyExists(message) => {
            status(Code::AlreadyExists, reason::ALREADY_EXISTS, message.clone())
        }
        CustodyError::FailedPrecondition { code, message } => {
            let details =
                ErrorDetails::with_error_info(code.to_ascii_uppercase(), ERROR_DOMAIN, HashMap::new());
            Status::with_error_details(Code::FailedPrecondition, message.clone(), details)
        }
        CustodyError::PermissionDenied(message) => {
            status(Code::PermissionDenied, reason::NOT_AUTHORIZED, message.clone())
        }
        CustodyError::Signature(e) => status(Code::InvalidArgument, reason::BAD_SIGNATURE, e.to_string()),
        CustodyError::Governance(e) => {
            use custos_core::governance::GovernanceError as G;
            match e {
                G::NotAuthorized(..) => status(Code::PermissionDenied, reason::NOT_AUTHORIZED, e.to_string()),
                G::WrongSequence { .. } | G::Expired(_) => {
                    status(Code::FailedPrecondition, reason::BAD_SIGNATURE, e.to_string())
                }
                _ => status(Code::InvalidArgument, reason::BAD_SIGNATURE, e.to_string()),
            }
        }
        CustodyError::Wallet(e) => to_status(e),
        CustodyError::Inconsistent(_) => {
            tracing::error!(error = %error, "request refused: inconsistent state");
            status(
                Code::Internal,
                reason::INCONSISTENT_STATE,
                "custos refused to act on inconsistent stored state; see the server log",
            )
        }
        CustodyError::Randomness => {
            tracing::error!(error = %error, "request refused: the random source failed");
            status(
                Code::Internal,
                reason::INTERNAL,
                "the server could not draw a withdrawal id; nothing was stored",
            )
        }
        CustodyError::Store(e) => store_status(e),
        CustodyError::Worker => {
            tracing::error!(error = %error, "internal error");
            status(
                Code::Internal,
                reason::INTERNAL,
                "internal error; nothing was stored or signed; see the server log",
            )
        }
    }
}

fn hsm_status(error: &HsmError) -> Status {
    match error {
        HsmError::Unavailable(_) | HsmError::TokenNotFound { .. } | HsmError::ModuleLoad { .. } => status(
            Code::Unavailable,
            reason::HSM_UNAVAILABLE,
            "the HSM is unavailable",
        ),
        _ if error.is_session_loss() => status(
            Code::Unavailable,
            reason::HSM_UNAVAILABLE,
            "the HSM is unavailable",
        ),
        HsmError::KeyMissing(_) | HsmError::KeyMismatch(_) => status(
            Code::FailedPrecondition,
            reason::WALLET_KEY_UNUSABLE,
            "the wallet's HSM key is missing or does not match",
        ),
        HsmError::KeyRefused { .. } | HsmError::Malformed(_) => status(
            Code::Internal,
            reason::HSM_FAULT,
            "the HSM produced a key or output that custos refuses",
        ),
        _ => status(
            Code::Internal,
            reason::INTERNAL,
            "internal HSM error; see the server log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_say_which_kind_and_keep_details_in_the_log() {
        use tonic_types::StatusExt;
        let reason_of = |e: StoreError| {
            let status = store_status(&e);
            assert!(!status.message().contains("secret-path"), "{status:?}");
            (
                status.code(),
                status
                    .get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_default(),
            )
        };
        assert_eq!(
            reason_of(StoreError::Unavailable("secret-path: connection refused".into())),
            (Code::Unavailable, reason::STORE_UNAVAILABLE.to_owned())
        );
        assert_eq!(
            reason_of(StoreError::CommitFailed("secret-path: disk full".into())),
            (Code::Unavailable, reason::STORE_UNAVAILABLE.to_owned())
        );
        assert_eq!(
            reason_of(StoreError::Conflict("withdrawal")),
            (Code::Aborted, reason::STORE_CONFLICT.to_owned())
        );
        assert_eq!(
            reason_of(StoreError::CommitUnknown("secret-path".into())),
            (Code::Unavailable, reason::COMMIT_OUTCOME_UNKNOWN.to_owned())
        );
        assert_eq!(
            reason_of(StoreError::Settings("secret-path".into())),
            (Code::Internal, reason::INTERNAL.to_owned())
        );
        // The wallet path maps store errors the same way.
        let wallet = to_status(&WalletError::Store(StoreError::CommitUnknown("x".into())));
        assert_eq!(wallet.code(), Code::Unavailable);
    }

    #[test]
    fn internal_details_do_not_reach_clients() {
        let err = WalletError::Hsm(HsmError::Pkcs11 {
            function: "C_Sign".into(),
            rv: cryptoki::error::RvError::FunctionFailed,
        });
        let status = to_status(&err);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("C_Sign"));
        assert_eq!(status.get_details_error_info().unwrap().reason, reason::INTERNAL);
    }

    #[test]
    fn a_lost_token_is_unavailable_and_says_no_more() {
        // What SoftHSMv2 returns once its token files are gone.
        let lost = HsmError::Pkcs11 {
            function: "C_GetTokenInfo".into(),
            rv: cryptoki::error::RvError::GeneralError,
        };
        for err in [lost.clone(), HsmError::Unavailable(Box::new(lost))] {
            let status = to_status(&WalletError::Hsm(err));
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(status.message(), "the HSM is unavailable");
            assert_eq!(
                status.get_details_error_info().unwrap().reason,
                reason::HSM_UNAVAILABLE
            );
        }
    }

    #[test]
    fn unavailable_hsm_is_unavailable() {
        let err = WalletError::Hsm(HsmError::Unavailable(Box::new(HsmError::Worker)));
        let status = to_status(&err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            reason::HSM_UNAVAILABLE
        );
    }

    /// A failed random source is not reported as the store being down: the
    /// client learns that nothing was stored, and no more.
    #[test]
    fn a_failed_random_source_says_nothing_was_stored() {
        let status = custody_status(&CustodyError::Randomness);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.get_details_error_info().unwrap().reason, reason::INTERNAL);
        assert!(
            status.message().contains("nothing was stored"),
            "{}",
            status.message()
        );
        assert!(!status.message().contains("store is unavailable"));
    }
}
