//! custos: a custody signing service whose withdrawal keys live only inside a PKCS#11 HSM.
//!
//! # Layout
//!
//! Data flows one way, from the gRPC edge through pure domain code to the HSM:
//!
//! | module | owns |
//! |---|---|
//! | [`access`] | who may call what: client identities, roles, the authorization matrix, and the guard enforcing it with request limits |
//! | [`approval`] | approval messages: canonical encoding, strict parsing, low-S signature verification |
//! | [`audit`] | the audit log: entries and their RFC 6962 Merkle tree, roots and proofs, and the offline replay |
//! | [`api`] | the only code that knows prost types: `TryFrom` conversions, gRPC services, the error-to-`Status` mapping |
//! | [`custody`] | the custody engine: withdrawals, votes, signing, and policy governance over the store and HSM |
//! | [`failpoint`] | debug-build crash points for the crash-consistency tests |
//! | [`governance`] | governance messages (policy activation, freeze, unfreeze) and allowlist time anchoring |
//! | [`lifecycle`] | the withdrawal state machine: the only legal transitions between states |
//! | [`metrics`] | Prometheus `/metrics` on its own port: decision and HSM counters, store state read at each scrape |
//! | [`policy`] | the withdrawal policy language, its hash, and the pure decision core `evaluate` |
//! | [`server`] | `server::run(listener, shutdown)`: wiring, health, reflection, graceful shutdown |
//! | [`config`] | the TOML configuration, parsed into validated types (unknown fields rejected) |
//! | [`dev`] | `custosd --dev`: a fresh SoftHSM token, config and store under one directory |
//! | [`hsm`] | cryptoki: token discovery, login, session pool, key generation with read-back, raw signing |
//! | [`chain`] | parsing unsigned Ethereum and Bitcoin transactions into intents and digests; assembling signed transactions |
//! | [`signer`] | people's own keys (approvers, admins): 0600 PKCS#8 key files and personal PKCS#11 tokens |
//! | [`signature`] | secp256k1 post-processing of HSM output: low-S, recovery id, verification |
//! | [`address`] | Ethereum (EIP-55) and Bitcoin (P2WPKH) addresses from a public key |
//! | [`wallet`] | the wallet registry: creating HSM keys, caching them, signing digests with them |
//! | [`store`] | SQLite persistence with versioned migrations |
//! | [`secret`] | the HSM PIN in a zeroizing type with redacted `Debug` |
//! | [`tls`] | the transport: TLS 1.3 with client certificates, each connection's peer identity, the dev PKI |
//! | [`telemetry`] | tracing subscriber setup (text or JSON) |
//!
//! See `docs/ARCHITECTURE.md` for the invariants each module upholds.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod api;
pub mod checkpoints;
pub mod clock;
pub mod config;
pub mod custody;
pub mod dev;
pub mod exporter;
pub mod failpoint;
pub mod guard;
pub mod hsm;
pub mod metrics;
pub mod secret;
pub mod server;
pub mod signer;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wallet;

/// Generated protobuf and gRPC code for `custos.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod proto {
    tonic::include_proto!("custos.v1");

    /// Encoded `FileDescriptorSet` of every custos proto, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/custos_descriptor.bin"));

    use std::fmt;

    /// Stands in for a field's contents in a redacted `Debug`.
    struct Redacted(usize);

    impl fmt::Debug for Redacted {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "<{} bytes redacted>", self.0)
        }
    }

    impl fmt::Debug for CreateWithdrawalRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateWithdrawalRequest")
                .field("request_id", &self.request_id)
                .field("wallet", &self.wallet)
                .field(
                    "transaction",
                    &Redacted(self.transaction.as_ref().map_or(0, prost::Message::encoded_len)),
                )
                .field("initiator", &self.initiator)
                .finish()
        }
    }

    impl fmt::Debug for SubmitApprovalRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SubmitApprovalRequest")
                .field("message", &Redacted(self.message.len()))
                .field("signature", &Redacted(self.signature.len()))
                .finish()
        }
    }

    impl fmt::Debug for SignedMessage {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SignedMessage")
                .field("message", &Redacted(self.message.len()))
                .field("signature", &Redacted(self.signature.len()))
                .finish()
        }
    }

    impl fmt::Debug for ProposePolicyRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ProposePolicyRequest")
                .field("document", &Redacted(self.document.len()))
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn sensitive_messages_debug_as_sizes() {
            let request = SubmitApprovalRequest {
                message: b"secret-ish approval".to_vec(),
                signature: vec![0xab; 64],
            };
            let text = format!("{request:?}");
            assert_eq!(
                text,
                "SubmitApprovalRequest { message: <19 bytes redacted>, signature: <64 bytes redacted> }"
            );
            let signed = SignedMessage {
                message: b"freeze".to_vec(),
                signature: vec![1; 64],
            };
            assert!(!format!("{signed:?}").contains("102, 114"));
            let propose = ProposePolicyRequest {
                document: b"allowlist".to_vec(),
            };
            assert!(!format!("{propose:?}").contains("97, 108"));
        }
    }
}
