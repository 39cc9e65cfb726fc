//! custos: a custody signing service whose withdrawal keys live only inside a PKCS#11 HSM.
//!
//! This crate is the server: everything that does I/O (gRPC, TLS, the
//! store, the HSM, metrics, the clock). Everything that decides or verifies
//! without I/O is in the [`custos_core`] crate (`crates/custos-core`):
//! the policy language and `evaluate`, the chains' parsers, intents,
//! approval and governance messages, vote admission, the lifecycle, the
//! signature post-processing, and the audit log's format, replay and
//! verifier. This crate depends on the core, never the reverse.
//!
//! # Layout
//!
//! Dependencies point down the table: a module uses only modules below it
//! (`scripts/check-module-cycles.py`, run by CI, fails on a cycle).
//!
//! | layer | module | owns |
//! |---|---|---|
//! | wiring | [`server`] | `server::run(listener, app, shutdown)`: the services, health, reflection, the sweep, graceful shutdown |
//! | | [`dev`] | `custosd --dev`: a fresh SoftHSM token, config, keys and store under one directory |
//! | | [`config`] | the TOML file, parsed and assembled into each subsystem's own config type (unknown fields rejected) |
//! | edge | [`api`] | the only code that knows prost types: `TryFrom` conversions, the gRPC services, errors mapped to `Status` |
//! | | [`guard`] | the tower layer in front of every service: authentication, the authorization matrix, rate, concurrency, size and deadline limits |
//! | | [`exporter`] | Prometheus `/metrics` on its own port: the event counters and the store's state at each scrape |
//! | | [`tls`] | TLS 1.3 with client certificates, each connection's peer identity, the dev PKI |
//! | engine | [`custody`] | withdrawals, votes, signing, the sweep and policy governance, over the store and the wallets |
//! | below the engine | [`wallet`] | the wallet registry: HSM keys, their addresses, signing a parsed transaction's digests |
//! | | [`checkpoints`] | the log key in the HSM and the signed checkpoints |
//! | | [`store`] | SQLite persistence: versioned migrations, group commit, the audit log's rows and tree |
//! | | [`signer`] | people's own keys (approvers, admins): 0600 key files and personal PKCS#11 tokens, for the CLI and dev mode |
//! | HSM | [`hsm`] | cryptoki: token discovery, login, the session pool, recovery, key generation with read-back, signing |
//! | leaves | [`access`] | client identities, roles and the authorization matrix (`RPC_ACCESS`) |
//! | | [`status`] | the wire error model: the `ErrorInfo` domain, the table of reasons, the one `Status` builder |
//! | | [`metrics`] | metrics events (decisions, `C_Sign` latency, PKCS#11 errors), imported by hsm and custody |
//! | | [`secret`] | the HSM PIN in a zeroizing type with redacted `Debug` |
//! | | [`clock`] | the one wall clock |
//! | | [`telemetry`] | tracing subscriber setup (text or JSON) |
//! | | [`failpoint`] | debug-build crash and pause points for the crash-consistency tests |
//! | | [`proto`] | the generated `custos.v1` types and the descriptor set |
//!
//! Where to look for a job: a gRPC method, `api/`; who may call it,
//! `access/` and `guard.rs`; a withdrawal's path, `custody/create.rs`,
//! `custody/vote.rs`, `custody/sign.rs`; a PKCS#11 call, `hsm/`; a table or a
//! migration, `store/`; a policy rule or a chain's parser, the core crate.
//! The binaries are `src/bin/custosd.rs` and `src/bin/custos/`.
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
pub mod health;
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
