//! Vote admission: which signed votes a withdrawal takes, and why any other
//! is refused.
//!
//! The custody engine calls [`admit`] inside the transaction that stores a
//! vote, and the audit replay calls it for every `Vote` entry of the log, so
//! the rules exist once:
//!
//! 1. the message names this service and this withdrawal;
//! 2. the withdrawal is PENDING_APPROVAL and its approval window is open;
//! 3. custody is not frozen and a policy is active;
//! 4. the approver is on the active policy's roster and the signature
//!    verifies under the roster's key;
//! 5. the message names the withdrawal's intent hash and the active policy's
//!    hash, and has not expired;
//! 6. the approver did not initiate the withdrawal;
//! 7. the approver has no earlier vote that still counts (one under the
//!    active policy that has not expired). An earlier vote that stopped
//!    counting gives way to the new one.
//!
//! The checks run in that order and the first that fails is the
//! [`Refusal`]. Each caller words refusals for its audience; the rule is the
//! variant.

use k256::ecdsa::VerifyingKey;

use crate::approval::{ApprovalError, ApprovalMessage};
use crate::lifecycle::State;
use crate::policy::document::PublicKey;
use crate::policy::{Approval, Policy};

/// The withdrawal a vote is for, as its voter's checks need it.
#[derive(Debug, Clone, Copy)]
pub struct Ballot<'a> {
    /// The withdrawal's id, which the message must name.
    pub withdrawal_id: &'a str,
    /// Its state; `None` while no decision has been made on it.
    pub state: Option<State>,
    /// When its approval window ends (Unix seconds).
    pub window_ends_at: u64,
    /// The intent hash the withdrawal was created with.
    pub intent_hash: [u8; 32],
    /// Who submitted it; they may not vote on it.
    pub initiator: &'a str,
    /// The votes it holds already.
    pub votes: &'a [Approval],
}

/// Custody-wide facts at the moment of the vote.
#[derive(Debug, Clone, Copy)]
pub struct Custody<'a> {
    /// This deployment's service id.
    pub service_id: &'a str,
    /// Whether a security officer froze custody.
    pub frozen: bool,
    /// The active policy, if any.
    pub policy: Option<&'a Policy>,
    /// Unix seconds now.
    pub now: u64,
}

/// A vote the withdrawal takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The vote, as the policy core counts it.
    pub approval: Approval,
    /// The index in [`Ballot::votes`] of the approver's earlier vote that
    /// stopped counting and gives way to this one.
    pub replaces: Option<usize>,
}

/// Why a vote was refused: the first rule of the module's list it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The message names another deployment.
    WrongService {
        /// The service the message names.
        named: String,
    },
    /// The message names another withdrawal.
    WrongWithdrawal {
        /// The withdrawal the message names.
        named: String,
    },
    /// The withdrawal is not waiting for votes.
    NotPending {
        /// Its state (`None`: undecided).
        state: Option<State>,
    },
    /// The withdrawal's approval window has ended.
    WindowEnded {
        /// When it ended.
        at: u64,
    },
    /// Custody is frozen.
    Frozen,
    /// No policy is active.
    NoPolicy,
    /// The approver is not on the active policy's roster.
    UnknownApprover {
        /// The approver the message names.
        approver: String,
        /// The active policy's version.
        version: u64,
    },
    /// The signature does not verify under the roster's key.
    BadSignature(ApprovalError),
    /// The message names another intent.
    WrongIntent {
        /// The intent hash the message names.
        named: [u8; 32],
        /// The withdrawal's.
        actual: [u8; 32],
    },
    /// The message names a policy that is not the active one.
    StalePolicy {
        /// The policy hash the message names.
        named: [u8; 32],
        /// The active policy's version.
        version: u64,
        /// The active policy's hash.
        active: [u8; 32],
    },
    /// The message has expired.
    Expired {
        /// When it expired.
        at: u64,
    },
    /// The approver initiated the withdrawal.
    Initiator,
    /// The approver's earlier vote still counts.
    AlreadyCounted,
}

/// Decides whether the withdrawal of `ballot` takes the vote `message`.
/// `verify` checks the message's signature under a key; it is called at most
/// once, with the roster's key for the named approver, and only after every
/// cheaper rule before it passed. The replay passes a result it computed in
/// parallel; the engine verifies in place.
pub fn admit(
    message: &ApprovalMessage,
    verify: impl FnOnce(&VerifyingKey) -> Result<(), ApprovalError>,
    ballot: &Ballot<'_>,
    custody: &Custody<'_>,
) -> Result<Admitted, Refusal> {
    if message.service_id != custody.service_id {
        return Err(Refusal::WrongService {
            named: message.service_id.clone(),
        });
    }
    if message.withdrawal_id != ballot.withdrawal_id {
        return Err(Refusal::WrongWithdrawal {
            named: message.withdrawal_id.clone(),
        });
    }
    if ballot.state != Some(State::PendingApproval) {
        return Err(Refusal::NotPending { state: ballot.state });
    }
    if ballot.window_ends_at <= custody.now {
        return Err(Refusal::WindowEnded {
            at: ballot.window_ends_at,
        });
    }
    if custody.frozen {
        return Err(Refusal::Frozen);
    }
    let policy = custody.policy.ok_or(Refusal::NoPolicy)?;
    let approver = policy
        .approver(&message.approver)
        .ok_or_else(|| Refusal::UnknownApprover {
            approver: message.approver.clone(),
            version: policy.version,
        })?;
    let PublicKey::Secp256k1(key) = &approver.key;
    verify(key).map_err(Refusal::BadSignature)?;
    if message.intent_hash != ballot.intent_hash {
        return Err(Refusal::WrongIntent {
            named: message.intent_hash,
            actual: ballot.intent_hash,
        });
    }
    if message.policy_hash != policy.hash {
        return Err(Refusal::StalePolicy {
            named: message.policy_hash,
            version: policy.version,
            active: policy.hash,
        });
    }
    if message.expires_at <= custody.now {
        return Err(Refusal::Expired {
            at: message.expires_at,
        });
    }
    if message.approver == ballot.initiator {
        return Err(Refusal::Initiator);
    }
    let replaces = ballot.votes.iter().position(|a| a.approver == message.approver);
    if let Some(previous) = replaces.map(|at| &ballot.votes[at])
        && previous.policy_hash == policy.hash
        && previous.expires_at > custody.now
    {
        return Err(Refusal::AlreadyCounted);
    }
    Ok(Admitted {
        approval: message.to_approval(),
        replaces,
    })
}

#[cfg(test)]
mod tests {
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::PrehashSigner;

    use super::*;
    use crate::policy::Vote;
    // The policy tests' fixture: alice and bob hold seeds 1 and 2.
    use crate::policy::tests::policy;

    const INTENT: [u8; 32] = [7; 32];

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn message(policy: &Policy, approver: &str) -> ApprovalMessage {
        ApprovalMessage {
            service_id: "svc".into(),
            withdrawal_id: "wd_1".into(),
            intent_hash: INTENT,
            policy_hash: policy.hash,
            vote: Vote::Approve,
            expires_at: 2_000,
            approver: approver.into(),
        }
    }

    fn sign(m: &ApprovalMessage, seed: u8) -> Vec<u8> {
        let signature: k256::ecdsa::Signature = key(seed).sign_prehash(&m.digest()).unwrap();
        signature.normalize_s().to_bytes().to_vec()
    }

    fn ballot(votes: &[Approval]) -> Ballot<'_> {
        Ballot {
            withdrawal_id: "wd_1",
            state: Some(State::PendingApproval),
            window_ends_at: 1_500,
            intent_hash: INTENT,
            initiator: "ops",
            votes,
        }
    }

    fn custody(policy: &Policy) -> Custody<'_> {
        Custody {
            service_id: "svc",
            frozen: false,
            policy: Some(policy),
            now: 1_000,
        }
    }

    fn run(m: &ApprovalMessage, seed: u8, b: &Ballot<'_>, c: &Custody<'_>) -> Result<Admitted, Refusal> {
        let signature = sign(m, seed);
        admit(m, |k| m.verify(&signature, k), b, c)
    }

    #[test]
    fn a_valid_vote_is_admitted() {
        let p = policy();
        let m = message(&p, "alice");
        let admitted = run(&m, 1, &ballot(&[]), &custody(&p)).unwrap();
        assert_eq!(admitted.approval, m.to_approval());
        assert_eq!(admitted.replaces, None);
    }

    /// Each rule, broken alone, is the refusal; the order of the list is the
    /// order of the checks.
    #[test]
    fn each_rule_refuses_alone() {
        let p = policy();
        let good = message(&p, "alice");
        let counted = [good.to_approval()];
        let mut stale = good.to_approval();
        stale.policy_hash = [0; 32];
        let stale = [stale];
        type Case<'a> = (&'a str, ApprovalMessage, u8, Ballot<'a>, Custody<'a>, Refusal);
        let cases: Vec<Case<'_>> = vec![
            (
                "service",
                ApprovalMessage {
                    service_id: "other".into(),
                    ..good.clone()
                },
                1,
                ballot(&[]),
                custody(&p),
                Refusal::WrongService {
                    named: "other".into(),
                },
            ),
            (
                "withdrawal",
                ApprovalMessage {
                    withdrawal_id: "wd_2".into(),
                    ..good.clone()
                },
                1,
                ballot(&[]),
                custody(&p),
                Refusal::WrongWithdrawal { named: "wd_2".into() },
            ),
            (
                "state",
                good.clone(),
                1,
                Ballot {
                    state: Some(State::Signed),
                    ..ballot(&[])
                },
                custody(&p),
                Refusal::NotPending {
                    state: Some(State::Signed),
                },
            ),
            (
                "window",
                good.clone(),
                1,
                Ballot {
                    window_ends_at: 1_000,
                    ..ballot(&[])
                },
                custody(&p),
                Refusal::WindowEnded { at: 1_000 },
            ),
            (
                "frozen",
                good.clone(),
                1,
                ballot(&[]),
                Custody {
                    frozen: true,
                    ..custody(&p)
                },
                Refusal::Frozen,
            ),
            (
                "no policy",
                good.clone(),
                1,
                ballot(&[]),
                Custody {
                    policy: None,
                    ..custody(&p)
                },
                Refusal::NoPolicy,
            ),
            (
                "roster",
                message(&p, "mallory"),
                1,
                ballot(&[]),
                custody(&p),
                Refusal::UnknownApprover {
                    approver: "mallory".into(),
                    version: p.version,
                },
            ),
            (
                "signature",
                good.clone(),
                2,
                ballot(&[]),
                custody(&p),
                Refusal::BadSignature(ApprovalError::InvalidSignature),
            ),
            (
                "intent",
                ApprovalMessage {
                    intent_hash: [8; 32],
                    ..good.clone()
                },
                1,
                ballot(&[]),
                custody(&p),
                Refusal::WrongIntent {
                    named: [8; 32],
                    actual: INTENT,
                },
            ),
            (
                "policy",
                ApprovalMessage {
                    policy_hash: [1; 32],
                    ..good.clone()
                },
                1,
                ballot(&[]),
                custody(&p),
                Refusal::StalePolicy {
                    named: [1; 32],
                    version: p.version,
                    active: p.hash,
                },
            ),
            (
                "expiry",
                ApprovalMessage {
                    expires_at: 1_000,
                    ..good.clone()
                },
                1,
                ballot(&[]),
                custody(&p),
                Refusal::Expired { at: 1_000 },
            ),
            (
                "initiator",
                good.clone(),
                1,
                Ballot {
                    initiator: "alice",
                    ..ballot(&[])
                },
                custody(&p),
                Refusal::Initiator,
            ),
            (
                "counted",
                good.clone(),
                1,
                ballot(&counted),
                custody(&p),
                Refusal::AlreadyCounted,
            ),
        ];
        for (rule, m, seed, b, c, refusal) in cases {
            assert_eq!(run(&m, seed, &b, &c), Err(refusal), "{rule}");
        }
        // A vote that stopped counting gives way.
        let admitted = run(&good, 1, &ballot(&stale), &custody(&p)).unwrap();
        assert_eq!(admitted.replaces, Some(0));
    }

    #[test]
    fn the_signature_is_checked_only_after_the_cheap_rules() {
        let p = policy();
        let m = message(&p, "alice");
        let frozen = Custody {
            frozen: true,
            ..custody(&p)
        };
        let refused = admit(&m, |_| panic!("verified while frozen"), &ballot(&[]), &frozen);
        assert_eq!(refused, Err(Refusal::Frozen));
    }
}
