//! The wire error model, a leaf that both the gRPC services and the guard
//! use: the `ErrorInfo` domain, the one table of stable reasons, the
//! `BadRequest` field violation, and [`status`], the one function that builds
//! a `tonic::Status` from a code, a reason and a safe message.
//!
//! Errors follow the google.rpc model (via tonic-types). A message sent here
//! must be safe to show a client: internal details (PKCS#11 return codes,
//! SQLite messages) are logged by the caller, never put in a status.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every custos error.
pub const ERROR_DOMAIN: &str = "custos.v1";

/// Stable `ErrorInfo.reason` strings.
pub mod reason {
    /// A request field is missing or malformed; see the `BadRequest` details.
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    /// The transaction does not decode, or breaks its encoding's rules.
    pub const MALFORMED_TRANSACTION: &str = "MALFORMED_TRANSACTION";
    /// The transaction decodes but is of a kind custos does not sign.
    pub const UNSUPPORTED_TRANSACTION: &str = "UNSUPPORTED_TRANSACTION";
    /// The transaction's chain id is not the wallet's network.
    pub const CHAIN_ID_MISMATCH: &str = "CHAIN_ID_MISMATCH";
    /// A mixed-case address fails its EIP-55 checksum.
    pub const BAD_ADDRESS_CHECKSUM: &str = "BAD_ADDRESS_CHECKSUM";
    /// An amount or fee is outside what the chain or field allows.
    pub const AMOUNT_OUT_OF_RANGE: &str = "AMOUNT_OUT_OF_RANGE";
    /// The gas limit is below the transaction's intrinsic cost.
    pub const GAS_BELOW_INTRINSIC: &str = "GAS_BELOW_INTRINSIC";
    /// The named wallet does not exist.
    pub const WALLET_NOT_FOUND: &str = "WALLET_NOT_FOUND";
    /// The wallet id is taken.
    pub const WALLET_ALREADY_EXISTS: &str = "WALLET_ALREADY_EXISTS";
    /// The wallet's key on the HSM is missing or does not match; it cannot sign.
    pub const WALLET_KEY_UNUSABLE: &str = "WALLET_KEY_UNUSABLE";
    /// The HSM is unreachable or lost its session and did not recover.
    pub const HSM_UNAVAILABLE: &str = "HSM_UNAVAILABLE";
    /// The HSM produced output custos refused to release.
    pub const HSM_FAULT: &str = "HSM_FAULT";
    /// The transaction spends from an address that is not the wallet's.
    pub const WRONG_SENDER: &str = "WRONG_SENDER";
    /// Anything else; details are in the server log.
    pub const INTERNAL: &str = "INTERNAL";
    /// The named withdrawal or policy does not exist.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// The request id was used with a different body, or a vote or proposal exists.
    pub const ALREADY_EXISTS: &str = "ALREADY_EXISTS";
    /// A submitted signature or signed message was refused.
    pub const BAD_SIGNATURE: &str = "BAD_SIGNATURE";
    /// The signer may not do this (initiator voting, too few admins).
    pub const NOT_AUTHORIZED: &str = "NOT_AUTHORIZED";
    /// The stored state contradicts itself; custos failed closed.
    pub const INCONSISTENT_STATE: &str = "INCONSISTENT_STATE";
    /// The store's connection broke while committing and the outcome could
    /// not be learnt: the change may or may not be stored, and nothing was
    /// released. Retry with the same request id, or read the object.
    pub const COMMIT_OUTCOME_UNKNOWN: &str = "COMMIT_OUTCOME_UNKNOWN";
    /// The store cannot be written or read now (unreachable, disk full,
    /// failing); nothing was stored or signed. Retry with the same request id.
    pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";
    /// A concurrent request wrote the same record first; nothing of this one
    /// was stored or signed. Retry with the same request id.
    pub const STORE_CONFLICT: &str = "STORE_CONFLICT";

    // The guard's refusals, before any handler runs.
    /// No client certificate, or one the server does not trust.
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    /// The caller's roles do not include this RPC.
    pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
    /// The caller exceeded its request rate.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// The server is at its concurrency limit.
    pub const OVERLOADED: &str = "OVERLOADED";
    /// The path names no RPC custos serves (an authenticated caller only).
    pub const UNIMPLEMENTED: &str = "UNIMPLEMENTED";
    /// The request message is over the size limit.
    pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";
    /// The deadline passed before the reply.
    pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";
}

/// A refused request field: the field path, the rule it broke, and the
/// stable reason sent in `ErrorInfo` (with the path as its `field` metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path in the request message, e.g. `wallet.display_name`.
    pub field: String,
    /// The rule, e.g. `must be at most 128 characters`.
    pub description: String,
    /// The `ErrorInfo.reason`: [`reason::INVALID_FIELD`] unless a more
    /// specific one applies.
    pub reason: &'static str,
}

impl FieldViolation {
    /// A missing or malformed `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
            reason: reason::INVALID_FIELD,
        }
    }

    /// The same violation with a more specific reason.
    pub fn because(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }
}

impl From<FieldViolation> for Status {
    fn from(violation: FieldViolation) -> Self {
        let mut details = ErrorDetails::new();
        let metadata = HashMap::from([("field".to_owned(), violation.field.clone())]);
        details.set_error_info(violation.reason, ERROR_DOMAIN, metadata);
        details.add_bad_request_violation(violation.field.clone(), violation.description.clone());
        Status::with_error_details(
            Code::InvalidArgument,
            format!("{}: {}", violation.field, violation.description),
            details,
        )
    }
}

/// A status with a code, a safe message and an `ErrorInfo` reason.
pub fn status(code: Code, reason: &'static str, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_violations_carry_bad_request() {
        let status: Status = FieldViolation::new("wallet_id", "must not be empty").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "wallet_id");
        assert_eq!(bad.field_violations[0].description, "must not be empty");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.metadata["field"], "wallet_id");
    }

    /// Every `ErrorInfo.reason` the server crate can send, read from its
    /// source: the uses of `reason` constants and the codes given to
    /// `precondition(..)` and `FailedPrecondition { code: .. }` (sent
    /// upper-cased). Each must be listed, in backquotes, in docs/errors.md.
    #[test]
    fn every_reason_the_code_can_send_is_catalogued() {
        fn sources(dir: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        /// The string literal right after each `marker` (skipping
        /// whitespace), or the identifier, for `reason::`.
        fn after(text: &str, marker: &str, quoted: bool, found: &mut std::collections::BTreeSet<String>) {
            for (at, _) in text.match_indices(marker) {
                let rest = text[at + marker.len()..].trim_start();
                let name: String = if quoted {
                    let Some(body) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let code: String = body.chars().take_while(|c| *c != '"').collect();
                    if !code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                        continue;
                    }
                    code.to_ascii_uppercase()
                } else {
                    rest.chars()
                        .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                        .collect()
                };
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        sources(&root.join("src"), &mut files);
        let mut reasons = std::collections::BTreeSet::new();
        for text in &files {
            after(text, "reason::", false, &mut reasons);
            after(text, "precondition(", true, &mut reasons);
            after(text, "code: ", true, &mut reasons);
        }
        // The constants themselves, used or not.
        let this = std::fs::read_to_string(root.join("src/status.rs")).unwrap();
        after(&this, "pub const ", false, &mut reasons);
        reasons.remove("ERROR_DOMAIN");
        assert!(reasons.len() > 30, "the scan found too little: {reasons:?}");
        let catalogue = std::fs::read_to_string(root.join("docs/errors.md")).unwrap();
        let missing: Vec<_> = reasons
            .iter()
            .filter(|r| !catalogue.contains(&format!("`{r}`")))
            .collect();
        assert!(missing.is_empty(), "docs/errors.md does not list {missing:?}");
    }
}
