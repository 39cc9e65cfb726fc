//! secp256k1 post-processing of raw HSM signatures.
//!
//! `CKM_ECDSA` returns `r || s` with `s` high about half the time. BIP-146 and
//! EIP-2 forbid high `s`, and k256 rejects it, so custos normalises to low-S,
//! verifies the result against the cached public key (guarding against HSM
//! faults and key substitution), and computes the recovery id that Ethereum
//! needs. Nothing leaves this module unless it verified.

use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::ops::{MulByGeneratorVartime, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::elliptic_curve::scalar::IsHigh;
use k256::{FieldBytes, ProjectivePoint, Scalar};

/// Why a raw HSM signature was not released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The HSM output is not 64 bytes of valid `r || s`.
    #[error("HSM returned a malformed ECDSA signature ({0} bytes)")]
    Malformed(usize),
    /// The normalised signature does not verify under the wallet's public key.
    #[error("HSM signature does not verify under the wallet's public key")]
    VerificationFailed,
    /// The signature verifies, but its recovery id cannot be expressed where
    /// it is needed (an Ethereum `v` carries only the y parity, not an
    /// `x(R) ≥ n`).
    #[error("the signature's recovery id cannot be expressed (x(R) exceeds the group order)")]
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
}

/// Normalises a raw `r || s` from the HSM to low-S, verifies it against
/// `key` over `digest`, and finds its recovery id, in one pass.
///
/// This is ECDSA verification that keeps the point it computes: with
/// `u1 = z/s` and `u2 = r/s`, `R = u1·G + u2·Q` must have `x(R) mod n = r`.
/// That `R` is the signer's nonce point for the normalised signature, so its
/// y parity, and whether `x(R)` was reduced mod n, are the recovery id
/// (SEC 1 §4.1.6). One variable-time double multiplication: the inputs are
/// public. Trial recovery needed one to four, each with a square root.
pub fn finalize(
    raw: &[u8],
    digest: &[u8; 32],
    key: &VerifyingKey,
) -> Result<RecoverableSignature, SignatureError> {
    if raw.len() != 64 {
        return Err(SignatureError::Malformed(raw.len()));
    }
    // Refuses r or s outside [1, n - 1].
    let signature = Signature::from_slice(raw)
        .map_err(|_| SignatureError::Malformed(raw.len()))?
        .normalize_s();
    let (r, s) = signature.split_scalars();
    let z = <Scalar as Reduce<FieldBytes>>::reduce(&FieldBytes::from(*digest));
    let s_inv =
        Option::<Scalar>::from(s.as_ref().invert_vartime()).ok_or(SignatureError::VerificationFailed)?;
    let nonce_point = ProjectivePoint::mul_by_generator_and_mul_add_vartime(
        &(z * s_inv),
        &(*r.as_ref() * s_inv),
        &ProjectivePoint::from(*key.as_affine()),
    )
    .to_affine();
    // The identity has x = 0, which no valid r equals.
    let x = nonce_point.x();
    if <Scalar as Reduce<FieldBytes>>::reduce(&x) != *r.as_ref() {
        return Err(SignatureError::VerificationFailed);
    }
    let x_reduced = bool::from(Scalar::from_repr(x).is_none());
    Ok(RecoverableSignature {
        signature,
        recovery_id: RecoveryId::new(nonce_point.y_is_odd().into(), x_reduced),
    })
}

/// Whether `s` is in the lower half of the group order (BIP-62/146, EIP-2).
pub fn is_low_s(signature: &Signature) -> bool {
    !bool::from(signature.s().is_high())
}

#[cfg(test)]
mod tests {
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::PrehashVerifier;
    use proptest::prelude::*;

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

    proptest! {
        /// Against k256's own signer and recovery: the same low-S signature
        /// and recovery id, from a low- or high-S input, and that recovery
        /// id gives back the key.
        #[test]
        fn matches_k256_recovery(secret in any::<[u8; 32]>(), digest in any::<[u8; 32]>()) {
            let Ok(key) = SigningKey::from_slice(&secret) else { return Ok(()) };
            let (sig, expected_id) = key.sign_prehash_recoverable(&digest);
            for raw in [sig.to_bytes(), high_s(&sig).to_bytes()] {
                let done = finalize(raw.as_slice(), &digest, key.verifying_key()).unwrap();
                prop_assert_eq!(done.signature(), &sig);
                prop_assert_eq!(done.recovery_id(), expected_id);
                let recovered = VerifyingKey::recover_from_prehash(&digest, &sig, done.recovery_id()).unwrap();
                prop_assert_eq!(&recovered, key.verifying_key());
            }
        }

        /// Any change to the signature or the digest is refused.
        #[test]
        fn a_changed_bit_is_refused(digest in any::<[u8; 32]>(), bit in 0usize..(96 * 8)) {
            let key = test_key();
            let (sig, _) = key.sign_prehash_recoverable(&digest);
            let mut raw = sig.to_bytes().to_vec();
            let mut digest = digest;
            if bit < 512 {
                raw[bit / 8] ^= 1 << (bit % 8);
            } else {
                digest[(bit - 512) / 8] ^= 1 << (bit % 8);
            }
            prop_assert!(finalize(&raw, &digest, key.verifying_key()).is_err());
        }
    }

    /// A nonce point whose x is at least the group order n (probability
    /// about 2^-128 in real signing) gets the "x reduced" recovery id. The
    /// signature is built backwards: pick such a point R, r = x(R) - n, any
    /// s and z, and solve for the key Q = r⁻¹(s·R - z·G).
    #[test]
    fn x_reduced_recovery_id_is_found() {
        use k256::elliptic_curve::Curve;
        use k256::elliptic_curve::bigint::U256;
        use k256::elliptic_curve::group::Group;
        use k256::elliptic_curve::point::DecompressPoint;
        use k256::{AffinePoint, Secp256k1};

        let found = (1u64..64).find_map(|offset| {
            let x = Secp256k1::ORDER.as_ref().wrapping_add(&U256::from(offset));
            let x = FieldBytes::from(x.to_be_bytes());
            Option::<AffinePoint>::from(AffinePoint::decompress(&x, 1.into())).map(|p| (p, offset))
        });
        let (nonce_point, offset) = found.expect("a point with x just above n");
        let r = Scalar::from(offset);
        let s = Scalar::from(7u64);
        let digest = [0x5au8; 32];
        let z = <Scalar as Reduce<FieldBytes>>::reduce(&FieldBytes::from(digest));
        let q = (ProjectivePoint::from(nonce_point) * s - ProjectivePoint::GENERATOR * z)
            * Option::<Scalar>::from(r.invert()).unwrap();
        assert!(!bool::from(q.is_identity()));
        let key = VerifyingKey::from_affine(q.to_affine()).unwrap();
        let raw = Signature::from_scalars(r, s).unwrap().to_bytes();
        let done = finalize(&raw, &digest, &key).unwrap();
        assert!(done.recovery_id().is_x_reduced());
        assert!(done.recovery_id().is_y_odd());
        assert_eq!(
            VerifyingKey::recover_from_prehash(&digest, done.signature(), done.recovery_id()).unwrap(),
            key
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
