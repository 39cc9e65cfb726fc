//! custos integration tests: the real `custosd` binary and the real library,
//! on fresh SoftHSM tokens in temp directories, real SQLite files, and gRPC
//! servers bound to port 0. Nothing here mocks the HSM.
//!
//! SoftHSM reads its configuration from `SOFTHSM2_CONF` once per process, so
//! tests that use PKCS#11 in-process re-run themselves as a child process of
//! this binary with the variable set (see `support::in_child`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod access;
mod audit;
mod checkpoints;
mod crash;
mod formats;
mod ha;
mod ha_kill;
mod hsm_faults;
mod metrics;
mod secrets;
mod signing_core;
mod store_faults;
mod transactions;
mod withdrawals;
mod wycheproof;
