//! The audit log: an append-only log of every custody event, hashed into an
//! RFC 6962 Merkle tree so that auditors can check inclusion and consistency
//! proofs, and replay every decision, offline ([`replay`], [`verify`]). The
//! log is signed by checkpoints of a key held in the HSM: the service
//! signs them, and [`note`] is their format and verifier.

pub mod entry;
pub mod merkle;
pub mod note;
pub mod replay;
pub mod verify;
