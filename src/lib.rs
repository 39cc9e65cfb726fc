//! custos: a custody signing service whose withdrawal keys live only inside a PKCS#11 HSM.
//!
//! # Layout
//!
//! Data flows one way, from the gRPC edge through pure domain code to the HSM:
//!
//! | module | owns |
//! |---|---|
//! | [`approval`] | approval messages: canonical encoding, strict parsing, low-S signature verification |
//! | [`audit`] | the audit log: entries and their RFC 6962 Merkle tree, roots and proofs, and the offline replay |
//! | [`api`] | the only code that knows prost types: `TryFrom` conversions, gRPC services, the error-to-`Status` mapping |
//! | [`custody`] | the custody engine: withdrawals, votes, signing, and policy governance over the store and HSM |
//! | [`failpoint`] | debug-build crash points for the crash-consistency tests |
//! | [`governance`] | governance messages (policy activation, freeze, unfreeze) and allowlist time anchoring |
//! | [`lifecycle`] | the withdrawal state machine: the only legal transitions between states |
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
//! | [`telemetry`] | tracing subscriber setup (text or JSON) |
//!
//! See `docs/ARCHITECTURE.md` for the invariants each module upholds.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod api;
pub mod approval;
pub mod audit;
pub mod chain;
pub mod config;
pub mod custody;
pub mod dev;
pub mod failpoint;
pub mod governance;
pub mod hsm;
pub mod lifecycle;
pub mod policy;
pub mod secret;
pub mod server;
pub mod signature;
pub mod signer;
pub mod store;
pub mod telemetry;
pub mod wallet;

/// Generated protobuf and gRPC code for `custos.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod proto {
    tonic::include_proto!("custos.v1");

    /// Encoded `FileDescriptorSet` of every custos proto, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/custos_descriptor.bin"));
}
