//! custos-core: everything custos decides or verifies without I/O.
//!
//! No module here reads a clock, a file handle it was not given, a socket, a
//! database or an HSM. The server crate (`custos`) does all of that and
//! depends on this crate; nothing here depends on the server, and Cargo
//! refuses a cycle back. What `custos audit verify` runs (`audit::verify`
//! and the replay), the fuzz targets of pure code (all but `grpc_requests`,
//! which fuzzes the server's request conversions) and the criterion bench of
//! pure code need only this crate.
//!
//! # Layout
//!
//! Dependencies point down this table: a module uses only modules below it.
//!
//! | module | owns |
//! |---|---|
//! | [`audit`] | the audit log's format: entries, the RFC 6962 tree and proofs, C2SP signed notes, the export format, the offline replay and verifier |
//! | [`vote`] | vote admission: which signed votes a withdrawal takes, one function for the engine and the replay |
//! | [`recompute`] | a stored transaction, a wallet key and a policy's registry back to the intent, without the server |
//! | [`governance`] | governance messages (policy activation, freeze, unfreeze), allowlist time anchoring, and which admin signatures activate a version |
//! | [`approval`] | approval messages: canonical encoding, strict parsing, low-S signature verification |
//! | [`policy`] | the policy language and its hash, the decision core `evaluate`, and decisions as recorded |
//! | [`chain`] | unsigned Ethereum and Bitcoin transactions parsed into intents and signing digests; signed transactions assembled; units and addresses as written |
//! | [`lifecycle`] | the withdrawal state machine: the only legal transitions between states |
//! | [`signature`] | secp256k1 post-processing of HSM output: low-S, recovery id, verification |
//! | [`address`] | Ethereum (EIP-55) and Bitcoin (P2WPKH) addresses from a public key |
//! | [`key`] | the kinds of key custos holds, by name |
//!
//! Which file to open for a job: a policy rule, `policy/evaluate.rs`; the
//! policy language, `policy/document.rs`; what an approver signs,
//! `chain/intent.rs` and `approval.rs`; a chain's parser, `chain/ethereum.rs`
//! or `chain/bitcoin.rs`; the log's bytes, `audit/entry.rs`; what `custos
//! audit verify` checks, `audit/verify.rs` and `audit/replay/`; who may vote
//! and when, `vote.rs`; rolling limits, `policy/usage.rs`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod approval;
pub mod audit;
pub mod chain;
pub mod governance;
pub mod key;
pub mod lifecycle;
pub mod policy;
pub mod recompute;
pub mod signature;
pub mod vote;
