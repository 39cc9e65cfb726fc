//! Approval messages: what an approver signs, byte for byte.
//!
//! The format is specified in docs/approval-format.md, with test vectors.
//! `tests/approval_sign.py` is an independent implementation of it. An
//! approver's tool recomputes the intent hash from the transaction, builds
//! this message, and signs it with the approver's own key. custos parses it
//! strictly and verifies the signature (ECDSA secp256k1 over SHA-256, 64-byte
//! `r || s`, low-S only) against the key on the policy roster. The message
//! binds the service, the withdrawal, the intent, the policy version, the vote
//! and an expiry, so an approval cannot be replayed anywhere else.

use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::ecdsa::{Signature, VerifyingKey};
use k256::sha2::{Digest, Sha256};

use crate::policy::document::PublicKey;
use crate::policy::{Approval, Policy, Vote};

/// Domain separator that starts every approval message.
pub const APPROVAL_DOMAIN: &[u8; 18] = b"custos/approval/v1";
/// Longest id (service, withdrawal, approver) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// A decoded approval message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalMessage {
    /// The custos deployment, so approvals cannot cross deployments.
    pub service_id: String,
    /// The withdrawal approved or rejected.
    pub withdrawal_id: String,
    /// The intent hash the approver recomputed.
    pub intent_hash: [u8; 32],
    /// The policy version the approver saw.
    pub policy_hash: [u8; 32],
    /// Approve or reject.
    pub vote: Vote,
    /// Unix seconds after which the approval is void.
    pub expires_at: u64,
    /// The approver's roster id.
    pub approver: String,
}

/// Why an approval message or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// The bytes are not a well-formed v1 approval message.
    #[error("malformed approval message: {0}")]
    Malformed(&'static str),
    /// The signature is not 64 bytes of valid `r || s`.
    #[error("malformed signature: {0}")]
    BadSignatureEncoding(&'static str),
    /// `s` is in the upper half of the order; custos accepts only low-S.
    #[error("signature has high S; only low-S signatures are accepted")]
    HighS,
    /// The signature does not verify under the approver's key.
    #[error("signature does not verify under the approver's key")]
    InvalidSignature,
    /// The message names another custos deployment.
    #[error("approval is for service {0:?}, not this one")]
    WrongService(String),
    /// The approver is not on the policy's roster.
    #[error("approver {0:?} is not on the policy roster")]
    UnknownApprover(String),
}

impl ApprovalMessage {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(APPROVAL_DOMAIN);
        put_str(&mut out, &self.service_id);
        put_str(&mut out, &self.withdrawal_id);
        out.extend_from_slice(&self.intent_hash);
        out.extend_from_slice(&self.policy_hash);
        out.push(match self.vote {
            Vote::Approve => 0x01,
            Vote::Reject => 0x02,
        });
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        put_str(&mut out, &self.approver);
        out
    }

    /// Parses a message; anything but the exact canonical encoding is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApprovalError> {
        let mut rest = bytes
            .strip_prefix(APPROVAL_DOMAIN.as_slice())
            .ok_or(ApprovalError::Malformed(
                "missing the custos/approval/v1 domain separator",
            ))?;
        let service_id = take_str(&mut rest)?;
        let withdrawal_id = take_str(&mut rest)?;
        let intent_hash = take::<32>(&mut rest)?;
        let policy_hash = take::<32>(&mut rest)?;
        let vote = match take::<1>(&mut rest)? {
            [0x01] => Vote::Approve,
            [0x02] => Vote::Reject,
            _ => {
                return Err(ApprovalError::Malformed(
                    "vote must be 0x01 (approve) or 0x02 (reject)",
                ));
            }
        };
        let expires_at = u64::from_be_bytes(take::<8>(&mut rest)?);
        let approver = take_str(&mut rest)?;
        if !rest.is_empty() {
            return Err(ApprovalError::Malformed("trailing bytes after approver"));
        }
        Ok(Self {
            service_id,
            withdrawal_id,
            intent_hash,
            policy_hash,
            vote,
            expires_at,
            approver,
        })
    }

    /// SHA-256 of the encoding: the prehash the approver signs.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }

    /// Verifies `signature` (64-byte `r || s`, low-S) under `key`. A message
    /// built in code must also be one that [`ApprovalMessage::parse`] accepts,
    /// so that what is verified always has one unambiguous encoding.
    pub fn verify(&self, signature: &[u8], key: &VerifyingKey) -> Result<(), ApprovalError> {
        if Self::parse(&self.encode()).as_ref() != Ok(self) {
            return Err(ApprovalError::Malformed(
                "ids must be 1 to 128 bytes without control characters",
            ));
        }
        verify_prehash(&self.digest(), signature, key)
    }

    /// Parses a submitted approval and verifies it for this deployment: the
    /// service id must be `service_id`, and the signature must verify under
    /// the key the policy's roster lists for the named approver. Returns the
    /// approval as the policy core counts it.
    pub fn verify_submitted(
        message: &[u8],
        signature: &[u8],
        service_id: &str,
        policy: &Policy,
    ) -> Result<(Self, Approval), ApprovalError> {
        let parsed = Self::parse(message)?;
        if parsed.service_id != service_id {
            return Err(ApprovalError::WrongService(parsed.service_id));
        }
        let approver = policy
            .approver(&parsed.approver)
            .ok_or_else(|| ApprovalError::UnknownApprover(parsed.approver.clone()))?;
        let PublicKey::Secp256k1(key) = &approver.key;
        parsed.verify(signature, key)?;
        let approval = parsed.to_approval();
        Ok((parsed, approval))
    }

    /// The policy core's view of this approval.
    pub fn to_approval(&self) -> Approval {
        Approval {
            approver: self.approver.clone(),
            vote: self.vote,
            withdrawal_id: self.withdrawal_id.clone(),
            intent_hash: self.intent_hash,
            policy_hash: self.policy_hash,
            expires_at: self.expires_at,
        }
    }
}

/// Verifies a 64-byte low-S ECDSA secp256k1 signature over a SHA-256 prehash.
pub fn verify_prehash(prehash: &[u8; 32], signature: &[u8], key: &VerifyingKey) -> Result<(), ApprovalError> {
    if signature.len() != 64 {
        return Err(ApprovalError::BadSignatureEncoding("must be 64 bytes of r || s"));
    }
    let signature = Signature::from_slice(signature)
        .map_err(|_| ApprovalError::BadSignatureEncoding("r and s must be in [1, n-1]"))?;
    if !crate::signature::is_low_s(&signature) {
        return Err(ApprovalError::HighS);
    }
    key.verify_prehash(prehash, &signature)
        .map_err(|_| ApprovalError::InvalidSignature)
}

pub(crate) fn put_str(out: &mut Vec<u8>, text: &str) {
    // Ids are bounded by MAX_ID_BYTES when parsed; a longer one produced
    // locally would fail to parse, never encode ambiguously.
    let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

pub(crate) fn take<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], ApprovalError> {
    if rest.len() < N {
        return Err(ApprovalError::Malformed("truncated"));
    }
    let (head, tail) = rest.split_at(N);
    *rest = tail;
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    Ok(out)
}

pub(crate) fn take_str(rest: &mut &[u8]) -> Result<String, ApprovalError> {
    let len = usize::from(u16::from_be_bytes(take::<2>(rest)?));
    if len == 0 || len > MAX_ID_BYTES {
        return Err(ApprovalError::Malformed("ids must be 1 to 128 bytes"));
    }
    if rest.len() < len {
        return Err(ApprovalError::Malformed("truncated"));
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    let text = std::str::from_utf8(head).map_err(|_| ApprovalError::Malformed("ids must be UTF-8"))?;
    if text.chars().any(char::is_control) {
        return Err(ApprovalError::Malformed(
            "ids must not contain control characters",
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use k256::ecdsa::SigningKey;
    use proptest::prelude::*;

    use super::*;
    use crate::policy::tests::{NOW, policy};

    pub(crate) fn message() -> ApprovalMessage {
        ApprovalMessage {
            service_id: "custos-dev".into(),
            withdrawal_id: "wd_0123456789abcdef".into(),
            intent_hash: [0x11; 32],
            policy_hash: [0x22; 32],
            vote: Vote::Approve,
            expires_at: 1_800_000_000,
            approver: "alice".into(),
        }
    }

    // Test-only software key standing in for an approver's own key.
    fn approver_key() -> SigningKey {
        SigningKey::from_slice(&[0x01; 32]).unwrap()
    }

    fn sign(m: &ApprovalMessage) -> Vec<u8> {
        let (sig, _) = approver_key().sign_prehash_recoverable(&m.digest());
        sig.normalize_s().to_bytes().to_vec()
    }

    #[test]
    fn round_trip_and_verify() {
        let m = message();
        assert_eq!(ApprovalMessage::parse(&m.encode()).unwrap(), m);
        m.verify(&sign(&m), approver_key().verifying_key()).unwrap();
    }

    #[test]
    fn any_changed_field_fails_verification() {
        let m = message();
        let sig = sign(&m);
        let mut variants = vec![];
        let mut v = m.clone();
        v.service_id = "custos-prod".into();
        variants.push(v);
        let mut v = m.clone();
        v.withdrawal_id.push('0');
        variants.push(v);
        let mut v = m.clone();
        v.intent_hash[31] ^= 1;
        variants.push(v);
        let mut v = m.clone();
        v.policy_hash[0] ^= 1;
        variants.push(v);
        let mut v = m.clone();
        v.vote = Vote::Reject;
        variants.push(v);
        let mut v = m.clone();
        v.expires_at += 1;
        variants.push(v);
        let mut v = m.clone();
        v.approver = "bob".into();
        variants.push(v);
        for v in variants {
            assert_eq!(
                v.verify(&sig, approver_key().verifying_key()),
                Err(ApprovalError::InvalidSignature),
                "{v:?}"
            );
        }
    }

    #[test]
    fn high_s_and_malformed_signatures_are_refused() {
        let m = message();
        let sig = k256::ecdsa::Signature::from_slice(&sign(&m)).unwrap();
        let (r, s) = sig.split_scalars();
        let high = k256::ecdsa::Signature::from_scalars(*r, -*s).unwrap();
        let key = approver_key();
        assert_eq!(
            m.verify(&high.to_bytes(), key.verifying_key()),
            Err(ApprovalError::HighS)
        );
        assert!(matches!(
            m.verify(&[0u8; 64], key.verifying_key()),
            Err(ApprovalError::BadSignatureEncoding(_))
        ));
        assert!(matches!(
            m.verify(sig.to_der().as_bytes(), key.verifying_key()),
            Err(ApprovalError::BadSignatureEncoding(_))
        ));
        let other = SigningKey::from_slice(&[0x02; 32]).unwrap();
        assert_eq!(
            m.verify(&sig.to_bytes(), other.verifying_key()),
            Err(ApprovalError::InvalidSignature)
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = message().encode();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut bad_vote = good.clone();
        let vote_at = APPROVAL_DOMAIN.len() + 2 + 10 + 2 + 19 + 64;
        bad_vote[vote_at] = 0x03;
        for (bytes, expected) in [
            (&good[..good.len() - 1], "truncated"),
            (&trailing[..], "trailing"),
            (&bad_vote[..], "vote"),
            (&good[1..], "domain"),
            (&[][..], "domain"),
        ] {
            let err = ApprovalMessage::parse(bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn messages_built_in_code_must_be_canonical() {
        let mut m = message();
        let sig = sign(&m);
        m.approver = "x".repeat(200);
        assert!(matches!(
            m.verify(&sig, approver_key().verifying_key()),
            Err(ApprovalError::Malformed(_))
        ));
        let mut m = message();
        m.withdrawal_id = "a\nb".into();
        assert!(matches!(
            m.verify(&sig, approver_key().verifying_key()),
            Err(ApprovalError::Malformed(_))
        ));
    }

    /// The doc's vector, whitespace removed, so wrapped hex lines compare.
    pub(crate) fn spec_without_whitespace() -> String {
        include_str!("../../../docs/approval-format.md")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect()
    }

    #[test]
    fn published_approval_vector() {
        let m = message();
        let (sig, _) = approver_key().sign_prehash_recoverable(&m.digest());
        let sig = sig.normalize_s().to_bytes();
        let spec = spec_without_whitespace();
        for (what, hex_value) in [
            (
                "public key",
                hex::encode(approver_key().verifying_key().to_sec1_bytes()),
            ),
            ("message", hex::encode(m.encode())),
            ("sha256", hex::encode(m.digest())),
            ("r || s", hex::encode(sig)),
        ] {
            assert!(
                spec.contains(&hex_value),
                "docs/approval-format.md lacks the approval {what} {hex_value}"
            );
        }
        m.verify(&sig, approver_key().verifying_key()).unwrap();
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(m) = ApprovalMessage::parse(&bytes) {
                // Whatever parses is canonical: it re-encodes to the same bytes.
                prop_assert_eq!(m.encode(), bytes);
            }
        }
    }

    /// A submitted approval counts only for this deployment, and only under the
    /// roster key of the approver it names.
    #[test]
    fn submitted_approvals_are_bound_to_service_and_roster() {
        let p = policy();
        // Test-only stand-in for alice's own key (seed 1 in the fixture).
        let alice = k256::ecdsa::SigningKey::from_slice(&[1; 32]).unwrap();
        let sign = |m: &ApprovalMessage| {
            let (sig, _) = alice.sign_prehash_recoverable(&m.digest());
            sig.normalize_s().to_bytes().to_vec()
        };
        let message = ApprovalMessage {
            service_id: "custos-test".into(),
            withdrawal_id: "w-1".into(),
            intent_hash: [5; 32],
            policy_hash: p.hash,
            vote: Vote::Approve,
            expires_at: NOW + 60,
            approver: "alice".into(),
        };
        let (_, approval) =
            ApprovalMessage::verify_submitted(&message.encode(), &sign(&message), "custos-test", &p).unwrap();
        assert_eq!(approval.approver, "alice");
        assert_eq!(approval.policy_hash, p.hash);

        let err = ApprovalMessage::verify_submitted(&message.encode(), &sign(&message), "custos-prod", &p);
        assert_eq!(
            err.unwrap_err(),
            ApprovalError::WrongService("custos-test".into())
        );

        let mut eve = message.clone();
        eve.approver = "eve".into();
        let err = ApprovalMessage::verify_submitted(&eve.encode(), &sign(&eve), "custos-test", &p);
        assert_eq!(err.unwrap_err(), ApprovalError::UnknownApprover("eve".into()));

        // Alice's key cannot speak for bob.
        let mut bob = message.clone();
        bob.approver = "bob".into();
        let err = ApprovalMessage::verify_submitted(&bob.encode(), &sign(&bob), "custos-test", &p);
        assert_eq!(err.unwrap_err(), ApprovalError::InvalidSignature);
    }
}
