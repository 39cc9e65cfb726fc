//! secp256k1 post-processing of raw HSM signatures.
//!
//! `CKM_ECDSA` returns `r || s` with `s` high about half the time. BIP-146 and
//! EIP-2 forbid high `s`, and k256 rejects it, so custos normalises to low-S,
//! verifies the result against the cached public key (guarding against HSM
//! faults and key substitution), and computes the recovery id that Ethereum
//! needs. Nothing leaves this module unless it verified.

use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
use k256::elliptic_curve::scalar::IsHigh;

/// Why a raw HSM signature was not released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The HSM output is not 64 bytes of valid `r || s`.
    #[error("HSM returned a malformed ECDSA signature ({0} bytes)")]
    Malformed(usize),
    /// The normalised signature does not verify under the wallet's public key.
    #[error("HSM signature does not verify under the wallet's public key")]
    VerificationFailed,
    /// No recovery id maps the signature back to the wallet's public key.
    #[error("no recovery id reproduces the wallet's public key")]
    Unrecoverable,
}

/// A verified, low-S secp256k1 signature with its recovery id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoverableSignature {
    signature: Signature,
    recovery_id: RecoveryId,
}

impl RecoverableSignature {
    /// The low-S signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The recovery id (0..=3; 0 or 1 for every key that can occur in practice).
    pub fn recovery_id(&self) -> RecoveryId {
        self.recovery_id
    }

    /// `r || s || v` with `v` the recovery id byte (0..=3).
    pub fn to_bytes65(&self) -> [u8; 65] {
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&self.signature.to_bytes());
        out[64] = self.recovery_id.to_byte();
        out
    }
}

/// Normalises, verifies and makes recoverable a raw `r || s` from the HSM.
///
/// Verification is by recovery: the public key recovered with some recovery
/// id must be the wallet's. Recovery solves the verification equation for
/// the key, so a match proves the signature valid for that key, at the cost
/// of one or two variable-time multiplications instead of a verification
/// plus the trial recoveries.
pub fn finalize(
    raw: &[u8],
    digest: &[u8; 32],
    key: &VerifyingKey,
) -> Result<RecoverableSignature, SignatureError> {
    if raw.len() != 64 {
        return Err(SignatureError::Malformed(raw.len()));
    }
    let signature = Signature::from_slice(raw)
        .map_err(|_| SignatureError::Malformed(raw.len()))?
        .normalize_s();
    (0..=3)
        .map(RecoveryId::from_byte)
        .find_map(|id| {
            let id = id?;
            let recovered = VerifyingKey::recover_from_prehash(digest, &signature, id).ok()?;
            (recovered == *key).then_some(RecoverableSignature {
                signature,
                recovery_id: id,
            })
        })
        .ok_or(SignatureError::VerificationFailed)
}

/// Whether `s` is in the lower half of the group order (BIP-62/146, EIP-2).
pub fn is_low_s(signature: &Signature) -> bool {
    !bool::from(signature.s().is_high())
}

#[cfg(test)]
mod tests {
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::PrehashVerifier;

    use super::*;

    // Test-only software key: stands in for the HSM to produce raw `r || s`,
    // so that the post-processing can be checked against known-good math.
    fn test_key() -> SigningKey {
        SigningKey::from_slice(&[0x11; 32]).unwrap()
    }

    fn high_s(sig: &Signature) -> Signature {
        let (r, s) = sig.split_scalars();
        Signature::from_scalars(*r, -*s).unwrap()
    }

    #[test]
    fn high_s_is_normalised_and_recoverable() {
        let key = test_key();
        let digest = [0x42u8; 32];
        let (low, _) = key.sign_prehash_recoverable(&digest);
        let high = high_s(&low);
        assert!(!is_low_s(&high));
        for raw in [low.to_bytes(), high.to_bytes()] {
            let done = finalize(&raw, &digest, key.verifying_key()).unwrap();
            assert!(is_low_s(done.signature()));
            // What recovery accepted, standard verification accepts too.
            key.verifying_key()
                .verify_prehash(&digest, done.signature())
                .unwrap();
            let recovered =
                VerifyingKey::recover_from_prehash(&digest, done.signature(), done.recovery_id()).unwrap();
            assert_eq!(&recovered, key.verifying_key());
        }
    }

    #[test]
    fn wrong_key_or_digest_is_refused() {
        let key = test_key();
        let other = SigningKey::from_slice(&[0x22; 32]).unwrap();
        let digest = [7u8; 32];
        let (sig, _) = key.sign_prehash_recoverable(&digest);
        assert_eq!(
            finalize(&sig.to_bytes(), &digest, other.verifying_key()),
            Err(SignatureError::VerificationFailed)
        );
        assert_eq!(
            finalize(&sig.to_bytes(), &[8u8; 32], key.verifying_key()),
            Err(SignatureError::VerificationFailed)
        );
    }

    #[test]
    fn malformed_output_is_refused() {
        let key = test_key();
        assert_eq!(
            finalize(&[1u8; 63], &[0; 32], key.verifying_key()),
            Err(SignatureError::Malformed(63))
        );
        assert_eq!(
            finalize(&[0u8; 64], &[0; 32], key.verifying_key()),
            Err(SignatureError::Malformed(64))
        );
        // DER from an HSM that ignored CKM_ECDSA's raw format is not accepted.
        let (sig, _) = key.sign_prehash_recoverable(&[3u8; 32]);
        let der = sig.to_der();
        assert!(finalize(der.as_bytes(), &[3u8; 32], key.verifying_key()).is_err());
    }
}
