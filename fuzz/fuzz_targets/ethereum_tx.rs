//! Ethereum transaction decoding: bytes as the canonical unsigned encoding a
//! `CreateWithdrawal` request carries in `transaction.ethereum.rlp`.
//!
//! Properties: decoding never panics; what decodes is exactly the canonical
//! encoding of what was decoded (one encoding per transaction); and the
//! checks of [`custos_fuzz::check_ethereum`] hold for it.

#![no_main]

use libfuzzer_sys::fuzz_target;

use custos_core::chain::ethereum;

fuzz_target!(|data: &[u8]| {
    match ethereum::decode_unsigned(data) {
        Ok(tx) => {
            assert_eq!(
                ethereum::signing_payload(&tx),
                data,
                "accepted a non-canonical encoding"
            );
            custos_fuzz::check_ethereum(&tx);
        }
        Err(refusal) => {
            custos_fuzz::check_refusal(&refusal);
            assert_eq!(refusal.field, "rlp");
        }
    }
});
