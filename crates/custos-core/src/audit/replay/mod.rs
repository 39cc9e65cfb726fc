//! Offline replay of the audit log: an auditor feeds every entry, in order,
//! to a [`Replayer`] and gets a [`ReplayReport`] listing each entry the rest
//! of the log does not justify, as a [`Finding`] with a stable code.
//!
//! Replay needs nothing but the entries. It rebuilds the policy history from
//! the genesis version (the trust anchor: its hash is in the report, for the
//! auditor to compare with the pinned one), the wallets' public keys, the
//! freeze state, and every withdrawal; then it checks each entry with the
//! same library code the engine runs:
//!
//! - indexes run from 0 without gaps;
//! - every proposed policy parses and hashes to its logged hash; each
//!   activation after genesis carries an admin quorum of the version active
//!   before it, counted as the engine counts it
//!   (the server's `custody::governance`); versions only go forward; allowlists are
//!   anchored at the activation entry's time ([`anchor_allowlists`]);
//! - freezes carry a security officer's signature and unfreezes the admin
//!   quorum, each naming the current freeze epoch;
//! - each withdrawal's intent is recomputed from its unsigned transaction,
//!   the wallet's public key and the policy's network and asset registry
//!   ([`crate::recompute`]), and must be the logged intent;
//! - each vote verifies under the rostered key of the policy active then and
//!   is bound to its withdrawal, intent, policy and time;
//! - each decision is evaluated again ([`crate::policy::evaluate()`]) under the
//!   policy active then, with the votes that verified and the rolling limit
//!   usage recomputed from the log, at the entry's time (the engine decides
//!   and appends in one store transaction, with one clock reading);
//! - each signature needs a decision that replay itself reaches with state
//!   APPROVED, outside a freeze, and must be the withdrawal's transaction
//!   signed by the wallet's key;
//! - expiry and cancellation only close a withdrawal that is still open.
//!
//! After a finding, replay goes on with the state the log records (the
//! activated policy, the freeze flag, a withdrawal's state and its limit
//! usage), because that is what the engine acted on next; each forgery is
//! therefore reported at its own entry rather than at every later one.
//! Authorization does not follow the log: a signature counts as authorized
//! only through a decision replay agrees with, under a policy whose
//! activation chain back to genesis verified, outside a freeze that a valid
//! unfreeze has not lifted.
//!
//! Replay cannot see what the log never recorded: refused requests, reads,
//! and the engine's configuration (its chain id and token registry). It
//! does not check the Merkle tree or checkpoints over the entries;
//! [`crate::audit::merkle`] does. The service id is learned from the first
//! signed message unless pinned with [`Replayer::for_service`].
//!
//! Work per entry is constant apart from the signature checks an entry
//! carries and a policy evaluation: withdrawals are kept in hash maps and
//! dropped at their terminal state, and limit usage is kept as running
//! totals per wallet and asset, so a window costs O(log n) to read. The
//! signature checks dominate; [`Replayer::push_all`] runs a batch's checks
//! on every core first, with the same result as [`Replayer::push`].

use std::collections::{BTreeSet, HashMap, HashSet};

use alloy_primitives::U256;
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
use serde::{Serialize, Serializer};

use crate::approval::{ApprovalError, ApprovalMessage};
use crate::audit::entry::{Entry, EntryError, Event, WindowUsage};
use crate::chain::ethereum;
use crate::chain::{Network, UnsignedTx};
use crate::governance::PolicySignature;
use crate::governance::valid_signers;
use crate::governance::{GovernanceAction, GovernanceMessage, anchor_allowlists};
use crate::lifecycle::State;
use crate::policy::document::PublicKey;
use crate::policy::record::DecisionRecord;
use crate::policy::record::{frozen_decision, no_policy_decision, record, window_usage};
use crate::policy::usage::UsageLedger;
use crate::policy::{self, Approval, DenyReason, Outcome, Policy};
use crate::recompute::{self, BITCOIN_NETWORKS, ParsedTx};
use crate::vote;

mod ahead;
mod governance;
#[cfg(test)]
mod tests;
mod withdrawals;

use ahead::{Ahead, Recovered};
use withdrawals::{Created, Logged};

/// The stable codes a [`Finding`] carries.
pub mod code {
    /// An entry's index is not the one after the previous entry's.
    pub const INDEX_GAP: &str = "index_gap";
    /// Bytes that are not an entry ([`super::Replayer::push_encoded`]).
    pub const MALFORMED_ENTRY: &str = "malformed_entry";
    /// A wallet created twice, or with a malformed key or key attributes
    /// the engine refuses.
    pub const WALLET_INVALID: &str = "wallet_invalid";
    /// A proposed policy that does not parse, does not hash to its logged
    /// hash or version, or could not have been proposed.
    pub const POLICY_INVALID: &str = "policy_invalid";
    /// A proposal or activation whose version is not above the active one.
    pub const VERSION_NOT_NEWER: &str = "version_not_newer";
    /// An admin signature over a policy that the engine would have refused.
    pub const POLICY_APPROVAL_INVALID: &str = "policy_approval_invalid";
    /// An activation without an admin quorum of the version before it, or
    /// of a document that was never validly proposed.
    pub const ACTIVATION_UNAUTHORIZED: &str = "activation_unauthorized";
    /// An admin signature that completed a quorum, without the activation
    /// the engine appends with it.
    pub const ACTIVATION_MISSING: &str = "activation_missing";
    /// A freeze or unfreeze that is not authorized, names the wrong epoch,
    /// or does not fit the freeze state.
    pub const FREEZE_INVALID: &str = "freeze_invalid";
    /// A withdrawal whose id or request id was used before, or whose wallet
    /// was never created.
    pub const WITHDRAWAL_INVALID: &str = "withdrawal_invalid";
    /// A logged intent (or intent hash) that the transaction does not give.
    pub const INTENT_MISMATCH: &str = "intent_mismatch";
    /// A vote whose message does not parse.
    pub const APPROVAL_MALFORMED: &str = "approval_malformed";
    /// A vote that names another service, withdrawal, intent or policy than
    /// the one active, or that had expired.
    pub const APPROVAL_UNBOUND: &str = "approval_unbound";
    /// A vote by someone not on the roster of the active policy, signed by
    /// another key than the rostered one, or by the initiator.
    pub const APPROVAL_UNAUTHORIZED: &str = "approval_unauthorized";
    /// A vote the engine refuses whatever its signature: the withdrawal is
    /// not pending, its window ended, custody is frozen, no policy is
    /// active, or the approver's earlier vote still counts.
    pub const VOTE_REFUSED: &str = "vote_refused";
    /// A withdrawal or vote without the decision the engine appends with it.
    pub const DECISION_MISSING: &str = "decision_missing";
    /// A decision that no withdrawal or vote entry just before it explains.
    pub const DECISION_ORPHAN: &str = "decision_orphan";
    /// A decision other than the one replay reaches.
    pub const DECISION_MISMATCH: &str = "decision_mismatch";
    /// A decision while frozen that is not DENIED with code `frozen`.
    pub const DECISION_WHILE_FROZEN: &str = "decision_while_frozen";
    /// A decision on a withdrawal whose state takes none.
    pub const ILLEGAL_TRANSITION: &str = "illegal_transition";
    /// A signature without a valid APPROVED decision (or with one, while
    /// frozen), or on a withdrawal that is not APPROVED.
    pub const SIGNATURE_UNAUTHORIZED: &str = "signature_unauthorized";
    /// A signed transaction that is not the withdrawal's transaction with a
    /// valid signature by the wallet's key.
    pub const SIGNATURE_INVALID: &str = "signature_invalid";
    /// An expiry or cancellation of a withdrawal that is not open, or an
    /// expiry before the approval window ended.
    pub const CLOSE_INVALID: &str = "close_invalid";
}

/// Something in the log that the rest of the log does not justify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Index of the offending entry.
    pub index: u64,
    /// A stable short code, one of [`code`].
    pub code: &'static str,
    /// What is wrong, in words.
    pub detail: String,
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Entries replayed.
    pub entries: u64,
    /// Policy versions activated, genesis included.
    pub policy_versions: u64,
    /// Withdrawals created.
    pub withdrawals: u64,
    /// Decisions.
    pub decisions: u64,
    /// Votes.
    pub votes: u64,
    /// Signed transactions.
    pub signatures: u64,
    /// Hash of the first activated policy: the trust anchor, to compare
    /// with the genesis the operator pinned.
    #[serde(serialize_with = "hex_hash")]
    pub genesis_policy_hash: Option<[u8; 32]>,
    /// The service id the signed messages were checked against.
    pub service_id: Option<String>,
    /// Every finding, in log order.
    pub findings: Vec<Finding>,
}

fn hex_hash<S: Serializer>(hash: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match hash {
        Some(h) => s.serialize_some(&hex::encode(h)),
        None => s.serialize_none(),
    }
}

/// Replays the audit log entry by entry; see the module documentation.
#[derive(Debug, Default)]
pub struct Replayer {
    report: ReplayReport,
    next_index: u64,
    /// The entry that must come next: the engine appends it in the same
    /// store transaction as the previous one.
    expect: Option<Expect>,
    wallets: HashMap<String, WalletKey>,
    proposals: HashMap<[u8; 32], Proposal>,
    active: Option<Active>,
    /// Frozen as the log records it: what the engine acted on.
    frozen: bool,
    /// Frozen by a valid freeze that no valid unfreeze lifted.
    held: bool,
    epoch: u64,
    open: HashMap<String, Open>,
    /// Terminal withdrawals: only their state is kept.
    finished: HashMap<String, State>,
    request_ids: HashSet<String>,
    usage: HashMap<(String, String), UsageLedger>,
    /// Signature checks of the current batch, done ahead ([`Replayer::push_all`]).
    ahead: Ahead,
}

#[derive(Debug)]
enum Expect {
    Decision {
        index: u64,
        withdrawal_id: String,
        trigger: Trigger,
    },
    Activation {
        index: u64,
        hash: [u8; 32],
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Created,
    Vote,
    /// The withdrawal entry was itself refused; its decision is not replayed.
    Ignored,
}

#[derive(Debug)]
struct WalletKey {
    key_label: String,
    public: VerifyingKey,
}

#[derive(Debug)]
struct Proposal {
    version: u64,
    /// The parsed document, if it parsed to the logged hash and version.
    policy: Option<Policy>,
    /// Admin signatures as logged, valid or not: the engine's quorum rule
    /// picks the valid ones.
    approvals: Vec<PolicySignature>,
}

#[derive(Debug)]
struct Active {
    /// Allowlists anchored along the activation history.
    policy: Policy,
    /// This activation, or one before it back to genesis, lacked a quorum.
    tainted: bool,
}

/// A withdrawal that is not terminal yet.
#[derive(Debug)]
struct Open {
    wallet_id: String,
    key_label: String,
    initiator: String,
    /// As logged: what votes must name.
    logged_intent_hash: [u8; 32],
    /// The transaction parsed by replay, if it parses for the wallet.
    parsed: Option<ParsedTx>,
    /// The hash of the intent replay parsed (the logged one if none).
    intent_hash: [u8; 32],
    /// `None` until the first decision.
    state: Option<State>,
    expires_at: u64,
    /// Votes that verified, one per approver.
    votes: Vec<Approval>,
    /// An APPROVED decision that replay reached itself.
    authorized: bool,
    /// Counted against limits: (ledger key, time, amount).
    counted: Option<((String, String), u64, U256)>,
}

impl Replayer {
    /// A replayer that learns the service id from the first signed message.
    pub fn new() -> Self {
        Self::default()
    }

    /// A replayer that checks every signed message against `service_id`.
    pub fn for_service(service_id: impl Into<String>) -> Self {
        let mut replayer = Self::default();
        replayer.report.service_id = Some(service_id.into());
        replayer
    }

    /// Decodes and replays one encoded entry; bytes that are not an entry
    /// are a finding at the index the entry should have had.
    pub fn push_encoded(&mut self, bytes: &[u8]) -> Result<(), EntryError> {
        match Entry::decode(bytes) {
            Ok(entry) => {
                self.push(&entry);
                Ok(())
            }
            Err(e) => {
                self.report.entries += 1;
                let index = self.next_index;
                self.next_index += 1;
                self.flag(index, code::MALFORMED_ENTRY, e.to_string());
                Err(e)
            }
        }
    }

    /// Replays the next entry.
    pub fn push(&mut self, entry: &Entry) {
        self.report.entries += 1;
        let index = entry.index;
        if index != self.next_index {
            self.flag(
                index,
                code::INDEX_GAP,
                format!("expected index {}, found {index}", self.next_index),
            );
        }
        self.next_index = index.saturating_add(1);
        let expected = self.expect.take();
        let expected = match expected {
            Some(e) if !e.satisfied_by(&entry.event) => {
                self.missed(e);
                None
            }
            other => other,
        };
        let time = entry.time;
        match &entry.event {
            Event::WalletCreated {
                wallet_id,
                key_label,
                public_key,
                attributes,
                ..
            } => self.wallet_created(index, wallet_id, key_label, public_key, *attributes),
            Event::PolicyProposed {
                hash,
                version,
                document,
            } => self.policy_proposed(index, hash, *version, document),
            Event::PolicyApproved {
                hash,
                message,
                signature,
            } => self.policy_approved(index, time, hash, message, signature),
            Event::PolicyActivated { hash, version } => self.policy_activated(index, time, hash, *version),
            Event::WithdrawalCreated {
                withdrawal_id,
                request_id,
                wallet_id,
                initiator,
                chain,
                unsigned_tx,
                intent,
                intent_hash,
            } => self.withdrawal_created(
                index,
                Created {
                    withdrawal_id,
                    request_id,
                    wallet_id,
                    initiator,
                    chain,
                    unsigned_tx,
                    intent,
                    intent_hash,
                },
            ),
            Event::Decision {
                withdrawal_id,
                policy_hash,
                policy_version,
                state,
                rule,
                reason_code,
                reason,
                counted_approvers,
                usage,
            } => {
                let trigger = match expected {
                    Some(Expect::Decision { trigger, .. }) => Some(trigger),
                    _ => None,
                };
                self.decision(
                    index,
                    time,
                    trigger,
                    &Logged {
                        withdrawal_id,
                        policy_hash,
                        policy_version: *policy_version,
                        state,
                        rule,
                        reason_code,
                        reason,
                        counted_approvers,
                        usage,
                    },
                );
            }
            Event::Vote {
                withdrawal_id,
                message,
                signature,
            } => self.vote(index, time, withdrawal_id, message, signature),
            Event::Signed {
                withdrawal_id,
                signed_tx,
                tx_hash,
            } => self.signed(index, withdrawal_id, signed_tx, tx_hash),
            Event::Closed { withdrawal_id, state } => self.closed(index, time, withdrawal_id, state),
            Event::Frozen { epoch, signatures } => self.freeze(index, time, *epoch, signatures, true),
            Event::Unfrozen { epoch, signatures } => self.freeze(index, time, *epoch, signatures, false),
        }
    }

    /// Replays consecutive entries, as [`Replayer::push`] on each in turn
    /// does, with the same result, but first runs the batch's signature
    /// checks (votes, Ethereum signatures) on every available core. Each
    /// check is the function `push` calls, on the inputs the replay state
    /// gives at the start of the batch; `push` uses a result only for the
    /// same entry and the same key, prehash and signature, and checks
    /// anything else itself (a roster that changed within the batch, a
    /// Bitcoin transaction). Batches of a few thousand entries suit.
    pub fn push_all(&mut self, entries: &[Entry]) {
        self.ahead = self.check_ahead(entries);
        for entry in entries {
            self.push(entry);
        }
        self.ahead = Ahead::default();
    }

    /// The report; a withdrawal or quorum left without the entry that must
    /// follow it is a finding.
    pub fn finish(mut self) -> ReplayReport {
        if let Some(e) = self.expect.take() {
            self.missed(e);
        }
        self.report
    }

    fn flag(&mut self, index: u64, code: &'static str, detail: impl Into<String>) {
        self.report.findings.push(Finding {
            index,
            code,
            detail: detail.into(),
        });
    }

    fn missed(&mut self, e: Expect) {
        match e {
            Expect::Decision {
                index,
                withdrawal_id,
                trigger,
            } => {
                let what = if trigger == Trigger::Vote {
                    "vote"
                } else {
                    "withdrawal"
                };
                self.flag(
                    index,
                    code::DECISION_MISSING,
                    format!("no decision on {withdrawal_id} follows this {what}; the engine appends both in one transaction"),
                );
            }
            Expect::Activation { index, hash } => self.flag(
                index,
                code::ACTIVATION_MISSING,
                format!(
                    "policy {} is proposed as genesis or has its admin quorum here, but its activation does not follow",
                    hex::encode(hash)
                ),
            ),
        }
    }

    /// The service id messages must name: pinned, or learned from the first.
    fn service_id(&mut self, named: &str) -> String {
        self.report
            .service_id
            .get_or_insert_with(|| named.to_owned())
            .clone()
    }
}

impl Expect {
    fn satisfied_by(&self, event: &Event) -> bool {
        match (self, event) {
            (
                Expect::Decision { withdrawal_id, .. },
                Event::Decision {
                    withdrawal_id: decided,
                    ..
                },
            ) => withdrawal_id == decided,
            (Expect::Activation { hash, .. }, Event::PolicyActivated { hash: activated, .. }) => {
                hash == activated
            }
            _ => false,
        }
    }
}
