//! The withdrawal policy: its document, its hash, and the pure decision core.
//!
//! `document` parses the policy language (TOML, unknown keys refused; see
//! docs/policy.md) into a validated [`Policy`]. `evaluate` decides one
//! withdrawal from the policy, the intent, the rolling usage, the approvals
//! and the time: no I/O, no clock, no randomness, so every decision can be
//! replayed.
//!
//! The default is deny: a withdrawal no rule matches is denied, and so is any
//! withdrawal whose wallet, asset, fee or limit the policy does not cover.

pub mod document;
pub mod evaluate;
pub mod record;
pub mod usage;

pub use document::{
    Action, Allowlist, AllowlistEntry, FeeCaps, GroupQuorum, LimitWindow, Policy, PolicyError, Rule,
    WalletLimit, policy_hash,
};
pub use evaluate::{
    AllowlistMiss, Approval, Decision, DenyReason, Outcome, RollingUsage, Usage, Vote, Withdrawal, evaluate,
};

#[cfg(test)]
pub(crate) mod tests;
