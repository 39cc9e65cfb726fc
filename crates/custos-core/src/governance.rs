//! Governance messages: what admins and security officers sign to activate a
//! policy version, freeze custody, or unfreeze it, and how custos anchors a
//! new version's allowlist entries in time.
//!
//! The encoding is specified in docs/approval-format.md ("Governance
//! messages") and shares the approval message's conventions: a domain
//! separator, length-prefixed ids, fixed-width integers, and one ECDSA
//! secp256k1 signature over SHA-256, 64-byte `r || s`, low-S only.
//!
//! - Activating a policy: `sequence` is the policy version, `subject` its hash.
//!   The admins of the *active* version must reach its admin quorum.
//! - Freeze and unfreeze: `sequence` is the current freeze epoch, which
//!   advances with each one applied, so every such message works once. One
//!   security officer may freeze; unfreezing takes the admin quorum.

use std::collections::BTreeSet;

use k256::sha2::{Digest, Sha256};

use crate::approval::{ApprovalError, put_str, take, take_str, verify_prehash};
use crate::policy::Policy;
use crate::policy::document::PublicKey;

/// Domain separator that starts every governance message.
pub const GOVERNANCE_DOMAIN: &[u8; 20] = b"custos/governance/v1";

/// What a governance message authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GovernanceAction {
    /// Activate the policy whose hash is the subject (0x01).
    ActivatePolicy,
    /// Freeze all signing (0x02).
    Freeze,
    /// Lift a freeze (0x03).
    Unfreeze,
}

impl GovernanceAction {
    fn byte(self) -> u8 {
        match self {
            Self::ActivatePolicy => 0x01,
            Self::Freeze => 0x02,
            Self::Unfreeze => 0x03,
        }
    }

    /// Lower-case name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::ActivatePolicy => "activate-policy",
            Self::Freeze => "freeze",
            Self::Unfreeze => "unfreeze",
        }
    }
}

/// A decoded governance message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GovernanceMessage {
    /// The custos deployment.
    pub service_id: String,
    /// What is authorized.
    pub action: GovernanceAction,
    /// Policy version, or freeze epoch.
    pub sequence: u64,
    /// Policy hash, or 32 zero bytes.
    pub subject: [u8; 32],
    /// Unix seconds after which the signature is void.
    pub expires_at: u64,
    /// The signer's roster id.
    pub signer: String,
}

/// Why a governance request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GovernanceError {
    /// The message or signature is malformed or does not verify.
    #[error(transparent)]
    Signature(#[from] ApprovalError),
    /// The message authorizes something else than what was asked.
    #[error("the message authorizes {found}, not {expected}")]
    WrongAction {
        /// What the request needs.
        expected: &'static str,
        /// What the message says.
        found: &'static str,
    },
    /// The message names another deployment.
    #[error("the message is for service {0:?}, not this one")]
    WrongService(String),
    /// The message expired.
    #[error("the message expired at {0}")]
    Expired(u64),
    /// The signer may not authorize this.
    #[error("{0:?} may not sign this: {1}")]
    NotAuthorized(String, &'static str),
    /// The sequence is not the one expected (a replay, or a stale message).
    #[error("the message is for {what} {found}, but the current one is {expected}")]
    WrongSequence {
        /// `policy version` or `freeze epoch`.
        what: &'static str,
        /// In the message.
        found: u64,
        /// Expected.
        expected: u64,
    },
    /// The subject is not the one expected.
    #[error("the message signs another policy hash")]
    WrongSubject,
}

impl GovernanceMessage {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(GOVERNANCE_DOMAIN);
        put_str(&mut out, &self.service_id);
        out.push(self.action.byte());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.subject);
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        put_str(&mut out, &self.signer);
        out
    }

    /// Parses a message; anything but the exact canonical encoding is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApprovalError> {
        let mut rest = bytes
            .strip_prefix(GOVERNANCE_DOMAIN.as_slice())
            .ok_or(ApprovalError::Malformed(
                "missing the custos/governance/v1 domain separator",
            ))?;
        let service_id = take_str(&mut rest)?;
        let action = match take::<1>(&mut rest)? {
            [0x01] => GovernanceAction::ActivatePolicy,
            [0x02] => GovernanceAction::Freeze,
            [0x03] => GovernanceAction::Unfreeze,
            _ => return Err(ApprovalError::Malformed("action must be 0x01, 0x02 or 0x03")),
        };
        let sequence = u64::from_be_bytes(take::<8>(&mut rest)?);
        let subject = take::<32>(&mut rest)?;
        let expires_at = u64::from_be_bytes(take::<8>(&mut rest)?);
        let signer = take_str(&mut rest)?;
        if !rest.is_empty() {
            return Err(ApprovalError::Malformed("trailing bytes after signer"));
        }
        if action != GovernanceAction::ActivatePolicy && subject != [0; 32] {
            return Err(ApprovalError::Malformed(
                "freeze and unfreeze messages carry a zero subject",
            ));
        }
        Ok(Self {
            service_id,
            action,
            sequence,
            subject,
            expires_at,
            signer,
        })
    }

    /// SHA-256 of the encoding: the prehash the signer signs.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }

    /// Parses `message`, checks it is a current `action` for this deployment,
    /// and verifies `signature` under the signer's key in `policy`. Admin keys
    /// sign policy activations and unfreezes; security officers (admins or
    /// approvers named in `security_officers`) freeze.
    pub fn verify_signed(
        message: &[u8],
        signature: &[u8],
        action: GovernanceAction,
        service_id: &str,
        policy: &Policy,
        now: u64,
    ) -> Result<Self, GovernanceError> {
        let parsed = Self::parse(message)?;
        if parsed.action != action {
            return Err(GovernanceError::WrongAction {
                expected: action.name(),
                found: parsed.action.name(),
            });
        }
        if parsed.service_id != service_id {
            return Err(GovernanceError::WrongService(parsed.service_id));
        }
        if parsed.expires_at <= now {
            return Err(GovernanceError::Expired(parsed.expires_at));
        }
        let key = match action {
            GovernanceAction::ActivatePolicy | GovernanceAction::Unfreeze => {
                policy.admins.get(&parsed.signer).ok_or_else(|| {
                    GovernanceError::NotAuthorized(parsed.signer.clone(), "not an admin of the active policy")
                })?
            }
            GovernanceAction::Freeze => {
                if !policy.security_officers.contains(&parsed.signer) {
                    return Err(GovernanceError::NotAuthorized(
                        parsed.signer,
                        "not a security officer of the active policy",
                    ));
                }
                policy
                    .admins
                    .get(&parsed.signer)
                    .or_else(|| policy.approver(&parsed.signer).map(|a| &a.key))
                    .ok_or_else(|| {
                        GovernanceError::NotAuthorized(parsed.signer.clone(), "no key on the roster")
                    })?
            }
        };
        let PublicKey::Secp256k1(key) = key;
        verify_prehash(&parsed.digest(), signature, key)?;
        Ok(parsed)
    }
}

/// Anchors the allowlist entries of a newly activated version in server time.
///
/// An entry new in this version counts from the later of its declared
/// `added_at` and the activation time, so a document cannot backdate an
/// address past its time-lock: the delay runs from when custos first saw the
/// entry in force. An entry already in `previous` keeps its place in line: its
/// anchor moves later by however much this version lowers the delay, so a
/// time-lock already running never ends earlier than it would have. The
/// genesis version (no `previous`) is set at initialisation by the operator
/// and keeps its declared times.
pub fn anchor_allowlists(previous: Option<&Policy>, next: &mut Policy, activated_at: u64) {
    let Some(previous) = previous else { return };
    let lowered_by = previous
        .allowlist_delay_secs
        .saturating_sub(next.allowlist_delay_secs);
    for (name, list) in &mut next.allowlists {
        let before = previous.allowlists.get(name);
        for entry in &mut list.entries {
            let known = before.and_then(|b| b.entries.iter().find(|e| e.address == entry.address));
            entry.added_at = match known {
                Some(old) => old.added_at.saturating_add(lowered_by),
                None => entry.added_at.max(activated_at),
            };
        }
    }
}

/// An admin's stored signature over a policy hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySignature {
    /// The admin id.
    pub admin: String,
    /// The signed governance message, verbatim.
    pub message: Vec<u8>,
    /// 64-byte `r || s`.
    pub signature: Vec<u8>,
    /// Unix seconds.
    pub signed_at: u64,
}

/// Admins of `governing` whose stored signatures over the policy `hash` of
/// `version` verify. The audit replay applies the same rule to the log.
pub fn valid_signers(
    governing: &Policy,
    hash: &[u8; 32],
    version: u64,
    signatures: &[PolicySignature],
    service_id: &str,
) -> Vec<String> {
    signatures
        .iter()
        .filter_map(|s| {
            let m = GovernanceMessage::parse(&s.message).ok()?;
            let key = governing.admins.get(&m.signer)?;
            let PublicKey::Secp256k1(key) = key;
            let bound = m.action == GovernanceAction::ActivatePolicy
                && m.service_id == service_id
                && m.subject == *hash
                && m.sequence == version
                && m.signer == s.admin
                && m.expires_at > s.signed_at;
            (bound && verify_prehash(&m.digest(), &s.signature, key).is_ok()).then_some(m.signer)
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use k256::ecdsa::SigningKey;

    use super::*;

    fn message(action: GovernanceAction) -> GovernanceMessage {
        GovernanceMessage {
            service_id: "custos-dev".into(),
            action,
            sequence: 2,
            subject: if action == GovernanceAction::ActivatePolicy {
                [0x33; 32]
            } else {
                [0; 32]
            },
            expires_at: 1_900_000_000,
            signer: "root-1".into(),
        }
    }

    #[test]
    fn round_trip_and_strict_parse() {
        for action in [
            GovernanceAction::ActivatePolicy,
            GovernanceAction::Freeze,
            GovernanceAction::Unfreeze,
        ] {
            let m = message(action);
            assert_eq!(GovernanceMessage::parse(&m.encode()).unwrap(), m);
            let mut trailing = m.encode();
            trailing.push(0);
            assert!(GovernanceMessage::parse(&trailing).is_err());
        }
        let mut freeze = message(GovernanceAction::Freeze);
        freeze.subject = [1; 32];
        assert!(GovernanceMessage::parse(&freeze.encode()).is_err());
        // An approval message is not a governance message.
        let approval = crate::approval::ApprovalMessage {
            service_id: "custos-dev".into(),
            withdrawal_id: "wd_1".into(),
            intent_hash: [1; 32],
            policy_hash: [2; 32],
            vote: crate::policy::Vote::Approve,
            expires_at: 1,
            approver: "root-1".into(),
        };
        assert!(GovernanceMessage::parse(&approval.encode()).is_err());
    }

    /// The vectors in docs/approval-format.md, "Governance messages": key
    /// 32 bytes of 0x02, RFC 6979 nonces, low-S.
    #[test]
    fn published_governance_vectors() {
        let key = SigningKey::from_slice(&[0x02; 32]).unwrap();
        let spec: String = include_str!("../../../docs/approval-format.md")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let mut activate = message(GovernanceAction::ActivatePolicy);
        activate.expires_at = 1_800_000_000;
        let mut freeze = message(GovernanceAction::Freeze);
        freeze.sequence = 0;
        freeze.expires_at = 1_800_000_000;
        freeze.signer = "sam".into();
        let mut values = vec![hex::encode(key.verifying_key().to_sec1_bytes())];
        for m in [activate, freeze] {
            let (sig, _) = key.sign_prehash_recoverable(&m.digest());
            let sig = sig.normalize_s().to_bytes();
            verify_prehash(&m.digest(), &sig, key.verifying_key()).unwrap();
            values.extend([hex::encode(m.encode()), hex::encode(m.digest()), hex::encode(sig)]);
        }
        let missing: Vec<&String> = values.iter().filter(|v| !spec.contains(v.as_str())).collect();
        assert!(
            missing.is_empty(),
            "docs/approval-format.md lacks governance vector values; the vectors are:\n{}",
            values.join("\n")
        );
    }

    #[test]
    fn anchoring_never_shortens_a_time_lock() {
        let document = include_str!("../../../docs/policy-example.toml");
        let previous = Policy::parse(document.as_bytes()).unwrap();
        let old = &previous.allowlists["exchanges"].entries[0];
        let old_effective = old.added_at + previous.allowlist_delay_secs;
        let lowered = document.replace(
            "allowlist_delay_seconds = 86400",
            "allowlist_delay_seconds = 3600",
        );
        let mut next = Policy::parse(lowered.as_bytes()).unwrap();
        next.allowlists
            .get_mut("exchanges")
            .unwrap()
            .entries
            .push(crate::policy::AllowlistEntry {
                address: "0x5555555555555555555555555555555555555555".into(),
                added_at: 1,
            });
        let activated_at = 1_900_000_000;
        anchor_allowlists(Some(&previous), &mut next, activated_at);
        let entries = &next.allowlists["exchanges"].entries;
        assert_eq!(entries[0].added_at + next.allowlist_delay_secs, old_effective);
        assert_eq!(
            entries.last().unwrap().added_at,
            activated_at,
            "a backdated entry counts from activation"
        );
        let mut genesis = Policy::parse(document.as_bytes()).unwrap();
        anchor_allowlists(None, &mut genesis, activated_at);
        assert_eq!(genesis, previous, "genesis keeps its declared times");
    }

    #[test]
    fn signature_binds_every_field() {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let m = message(GovernanceAction::ActivatePolicy);
        let (sig, _) = key.sign_prehash_recoverable(&m.digest());
        let sig = sig.normalize_s().to_bytes();
        verify_prehash(&m.digest(), &sig, key.verifying_key()).unwrap();
        let mut other = m.clone();
        other.sequence = 3;
        assert_eq!(
            verify_prehash(&other.digest(), &sig, key.verifying_key()),
            Err(ApprovalError::InvalidSignature)
        );
    }
}
