//! PSBT decoding: bytes as the binary PSBT a `CreateWithdrawal` request
//! carries in `transaction.bitcoin.psbt`.
//!
//! Properties: decoding never panics; a decoded PSBT survives serialization;
//! and parsing it for the wallet either refuses with a named field or yields
//! an intent whose destinations, change and fee add up to its inputs (see
//! [`custos_fuzz::check_psbt`]).

#![no_main]

use libfuzzer_sys::fuzz_target;

use custos_core::chain::bitcoin;

fuzz_target!(|data: &[u8]| {
    match bitcoin::decode_psbt(data) {
        Ok(psbt) => custos_fuzz::check_psbt(&psbt),
        Err(refusal) => {
            custos_fuzz::check_refusal(&refusal);
            assert_eq!(refusal.field, "psbt");
        }
    }
});
