//! Policy parsing: bytes as a policy document (`ProposePolicy`, the CLI's
//! `policy` commands, the audit replay).
//!
//! Properties: parsing never panics; refusals say why; an accepted policy's
//! hash is the document's; and deciding withdrawals under it keeps the
//! decision core's promises (see [`custos_fuzz::check_policy`]).

#![no_main]

use libfuzzer_sys::fuzz_target;

use custos_core::policy::{Policy, PolicyError};

fuzz_target!(|data: &[u8]| {
    match Policy::parse(data) {
        Ok(policy) => custos_fuzz::check_policy(data, &policy),
        Err(PolicyError::Syntax(why) | PolicyError::Invalid(why)) => assert!(!why.is_empty()),
    }
});
