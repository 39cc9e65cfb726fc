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

impl ReplayReport {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
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

    fn check_ahead(&self, entries: &[Entry]) -> Ahead {
        let roster = self.active.as_ref().map(|a| &a.policy);
        let jobs: Vec<Job<'_>> = entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::Vote {
                    message, signature, ..
                } => {
                    let m = ApprovalMessage::parse(message).ok()?;
                    let PublicKey::Secp256k1(key) = &roster?.approver(&m.approver)?.key;
                    Some(Job::Vote(e.index, Box::new(m), signature, *key))
                }
                Event::Signed { signed_tx, .. } => Some(Job::Recover(e.index, signed_tx)),
                _ => None,
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let mut ahead = Ahead::default();
        if threads < 2 || jobs.len() < 2 * threads {
            return ahead;
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = jobs
                .chunks(jobs.len().div_ceil(threads))
                .map(|chunk| scope.spawn(move || chunk.iter().map(Job::run).collect::<Vec<_>>()))
                .collect();
            for worker in workers {
                // A worker that failed only leaves its checks to `push`.
                for done in worker.join().into_iter().flatten() {
                    match done {
                        Done::Vote(index, key, result) => {
                            ahead.votes.insert(index, (key, result));
                        }
                        Done::Recover(index, recovered) => {
                            ahead.recovered.insert(index, recovered);
                        }
                        Done::Nothing => {}
                    }
                }
            }
        });
        ahead
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

    // Wallets and governance.

    fn wallet_created(
        &mut self,
        index: u64,
        wallet_id: &str,
        key_label: &str,
        public_key: &[u8],
        attributes: u8,
    ) {
        // Read back from the HSM: token, private, sensitive, not extractable,
        // always sensitive, never extractable (bits 0 to 5).
        const REQUIRED_ATTRIBUTES: u8 = 0b11_0111;
        if self.wallets.contains_key(wallet_id) {
            return self.flag(
                index,
                code::WALLET_INVALID,
                format!("wallet {wallet_id} was already created"),
            );
        }
        if attributes & 0b11_1111 != REQUIRED_ATTRIBUTES {
            self.flag(
                index,
                code::WALLET_INVALID,
                format!(
                    "wallet {wallet_id}'s key attributes read back as {attributes:#08b}; the engine refuses any key but {REQUIRED_ATTRIBUTES:#08b}"
                ),
            );
        }
        match VerifyingKey::from_sec1_bytes(public_key) {
            Ok(public) => {
                self.wallets.insert(
                    wallet_id.to_owned(),
                    WalletKey {
                        key_label: key_label.to_owned(),
                        public,
                    },
                );
            }
            Err(_) => self.flag(
                index,
                code::WALLET_INVALID,
                format!("wallet {wallet_id}'s public key is not a secp256k1 SEC1 point"),
            ),
        }
    }

    fn policy_proposed(&mut self, index: u64, hash: &[u8; 32], version: u64, document: &[u8]) {
        let policy = match Policy::parse(document) {
            Ok(p) if p.hash != *hash => Err(format!(
                "the document hashes to {}, not to the logged {}",
                hex::encode(p.hash),
                hex::encode(hash)
            )),
            Ok(p) if p.version != version => Err(format!(
                "the document is version {}, the entry says {version}",
                p.version
            )),
            Ok(p) => Ok(p),
            Err(e) => Err(format!("the document does not parse: {e}")),
        };
        let policy = match policy {
            Ok(p) => Some(p),
            Err(detail) => {
                self.flag(index, code::POLICY_INVALID, detail);
                None
            }
        };
        if self.proposals.contains_key(hash) {
            return self.flag(
                index,
                code::POLICY_INVALID,
                format!("policy {} was already proposed", hex::encode(hash)),
            );
        }
        match &self.active {
            Some(active) if version <= active.policy.version => self.flag(
                index,
                code::VERSION_NOT_NEWER,
                format!(
                    "version {version} is not newer than the active version {}",
                    active.policy.version
                ),
            ),
            Some(_) => {}
            // Only the genesis is proposed without an active policy, and it
            // is activated in the same transaction.
            None => {
                self.expect = Some(Expect::Activation { index, hash: *hash });
            }
        }
        self.proposals.insert(
            *hash,
            Proposal {
                version,
                policy,
                approvals: Vec::new(),
            },
        );
    }

    fn policy_approved(&mut self, index: u64, time: u64, hash: &[u8; 32], message: &[u8], signature: &[u8]) {
        let parsed = GovernanceMessage::parse(message).ok();
        let service_id = match &parsed {
            Some(m) => self.service_id(&m.service_id),
            None => self.report.service_id.clone().unwrap_or_default(),
        };
        let problem = match (&self.active, self.proposals.get(hash)) {
            (None, _) => Some("no policy was active to govern it".to_owned()),
            (_, None) => Some(format!(
                "policy {} is not a pending proposal: never proposed, already activated, or below the active version",
                hex::encode(hash)
            )),
            (Some(active), Some(proposal)) => GovernanceMessage::verify_signed(
                message,
                signature,
                GovernanceAction::ActivatePolicy,
                &service_id,
                &active.policy,
                time,
            )
            .map_err(|e| format!("{e} (checked against policy version {})", active.policy.version))
            .and_then(|m| {
                if m.subject != *hash {
                    Err(format!("the message signs policy {}", hex::encode(m.subject)))
                } else if proposal.version <= active.policy.version {
                    Err(format!(
                        "version {} is not newer than the active version {}",
                        proposal.version, active.policy.version
                    ))
                } else if m.sequence != proposal.version {
                    Err(format!(
                        "the message names version {}, the proposal is version {}",
                        m.sequence, proposal.version
                    ))
                } else if proposal.approvals.iter().any(|a| a.admin == m.signer) {
                    Err(format!("{} already signed this policy", m.signer))
                } else {
                    Ok(())
                }
            })
            .err(),
        };
        if let Some(problem) = &problem {
            self.flag(index, code::POLICY_APPROVAL_INVALID, problem.clone());
        }
        let Some(proposal) = self.proposals.get_mut(hash) else {
            return;
        };
        proposal.approvals.push(PolicySignature {
            admin: parsed.map(|m| m.signer).unwrap_or_default(),
            message: message.to_vec(),
            signature: signature.to_vec(),
            signed_at: time,
        });
        if let (None, Some(active)) = (problem, &self.active) {
            let signers = valid_signers(
                &active.policy,
                hash,
                proposal.version,
                &proposal.approvals,
                &service_id,
            );
            if signers.len() >= active.policy.admin_quorum {
                self.expect = Some(Expect::Activation { index, hash: *hash });
            }
        }
    }

    fn policy_activated(&mut self, index: u64, time: u64, hash: &[u8; 32], version: u64) {
        self.report.policy_versions += 1;
        let Some(proposal) = self.proposals.remove(hash) else {
            return self.flag(
                index,
                code::ACTIVATION_UNAUTHORIZED,
                format!(
                    "policy {} is not a pending proposal; replay keeps the policy active before it",
                    hex::encode(hash)
                ),
            );
        };
        let Some(mut policy) = proposal.policy else {
            return self.flag(
                index,
                code::ACTIVATION_UNAUTHORIZED,
                format!(
                    "policy {}'s document is invalid; replay keeps the policy active before it",
                    hex::encode(hash)
                ),
            );
        };
        if policy.version != version {
            self.flag(
                index,
                code::POLICY_INVALID,
                format!(
                    "the entry activates version {version}, the document is version {}",
                    policy.version
                ),
            );
        }
        let tainted = match &self.active {
            None => {
                self.report.genesis_policy_hash = Some(*hash);
                false
            }
            Some(previous) => {
                let mut problems = Vec::new();
                if policy.version <= previous.policy.version {
                    problems.push((
                        code::VERSION_NOT_NEWER,
                        format!(
                            "version {} is not newer than the active version {}",
                            policy.version, previous.policy.version
                        ),
                    ));
                }
                let service_id = self.report.service_id.clone().unwrap_or_default();
                let signers = valid_signers(
                    &previous.policy,
                    hash,
                    policy.version,
                    &proposal.approvals,
                    &service_id,
                );
                if signers.len() < previous.policy.admin_quorum {
                    problems.push((
                        code::ACTIVATION_UNAUTHORIZED,
                        format!(
                            "version {} has valid signatures by {} of the {} admins of version {} it needs ({:?})",
                            policy.version,
                            signers.len(),
                            previous.policy.admin_quorum,
                            previous.policy.version,
                            signers
                        ),
                    ));
                }
                anchor_allowlists(Some(&previous.policy), &mut policy, time);
                let tainted = previous.tainted || !problems.is_empty();
                for (code, detail) in problems {
                    self.flag(index, code, detail);
                }
                tainted
            }
        };
        // A proposal at or below the new version can never activate.
        let floor = policy.version;
        self.proposals.retain(|_, p| p.version > floor);
        self.active = Some(Active { policy, tainted });
    }

    fn freeze(&mut self, index: u64, time: u64, epoch: u64, signatures: &[(Vec<u8>, Vec<u8>)], freeze: bool) {
        let (action, verb) = if freeze {
            (GovernanceAction::Freeze, "freeze")
        } else {
            (GovernanceAction::Unfreeze, "unfreeze")
        };
        if let Some(m) = signatures
            .first()
            .and_then(|(m, _)| GovernanceMessage::parse(m).ok())
        {
            self.service_id(&m.service_id);
        }
        let service_id = self.report.service_id.clone().unwrap_or_default();
        let mut problems = Vec::new();
        if self.frozen == freeze {
            problems.push(format!(
                "custody is {}",
                if freeze { "already frozen" } else { "not frozen" }
            ));
        }
        if epoch != self.epoch {
            problems.push(format!(
                "it names epoch {epoch}, the current epoch is {}",
                self.epoch
            ));
        }
        match &self.active {
            None => problems.push("no policy is active".to_owned()),
            Some(active) => {
                let mut signers = BTreeSet::new();
                for (message, signature) in signatures {
                    match GovernanceMessage::verify_signed(
                        message,
                        signature,
                        action,
                        &service_id,
                        &active.policy,
                        time,
                    ) {
                        Err(e) => problems.push(e.to_string()),
                        Ok(m) if m.sequence != self.epoch => problems.push(format!(
                            "{}'s message names epoch {}, the current epoch is {}",
                            m.signer, m.sequence, self.epoch
                        )),
                        Ok(m) => {
                            if !signers.insert(m.signer.clone()) {
                                problems.push(format!("{} signed more than once", m.signer));
                            }
                        }
                    }
                }
                let needed = if freeze { 1 } else { active.policy.admin_quorum };
                if freeze && signatures.len() != 1 {
                    problems.push(format!(
                        "a freeze carries one security officer's signature, not {}",
                        signatures.len()
                    ));
                } else if signers.len() < needed {
                    problems.push(format!(
                        "{} valid signatures of the {needed} policy version {} needs",
                        signers.len(),
                        active.policy.version
                    ));
                }
                if active.tainted {
                    problems.push(format!(
                        "policy version {}, whose roster it was checked against, was not validly activated",
                        active.policy.version
                    ));
                }
            }
        }
        let valid = problems.is_empty();
        if !valid {
            self.flag(
                index,
                code::FREEZE_INVALID,
                format!("the {verb} is not valid: {}", problems.join("; ")),
            );
        }
        self.frozen = freeze;
        self.epoch = epoch.saturating_add(1);
        if valid {
            self.held = freeze;
        }
    }

    // Withdrawals.

    fn withdrawal_created(&mut self, index: u64, c: Created<'_>) {
        self.report.withdrawals += 1;
        let duplicate =
            self.open.contains_key(c.withdrawal_id) || self.finished.contains_key(c.withdrawal_id);
        if duplicate {
            self.flag(
                index,
                code::WITHDRAWAL_INVALID,
                format!("withdrawal id {} was already used", c.withdrawal_id),
            );
            self.expect = Some(Expect::Decision {
                index,
                withdrawal_id: c.withdrawal_id.to_owned(),
                trigger: Trigger::Ignored,
            });
            return;
        }
        self.expect = Some(Expect::Decision {
            index,
            withdrawal_id: c.withdrawal_id.to_owned(),
            trigger: Trigger::Created,
        });
        if !self.request_ids.insert(c.request_id.to_owned()) {
            self.flag(
                index,
                code::WITHDRAWAL_INVALID,
                format!("request id {} already made another withdrawal", c.request_id),
            );
        }
        let (key_label, parsed) = match self.wallets.get(c.wallet_id) {
            None => {
                self.flag(
                    index,
                    code::WITHDRAWAL_INVALID,
                    format!("wallet {} was never created", c.wallet_id),
                );
                (String::new(), None)
            }
            Some(wallet) => {
                let policy = self.active.as_ref().map(|a| &a.policy);
                let (parsed, problem) = recompute_intent(&c, wallet, policy);
                let label = wallet.key_label.clone();
                if let Some(problem) = problem {
                    self.flag(index, code::INTENT_MISMATCH, problem);
                }
                (label, parsed)
            }
        };
        self.open.insert(
            c.withdrawal_id.to_owned(),
            Open {
                wallet_id: c.wallet_id.to_owned(),
                key_label,
                initiator: c.initiator.to_owned(),
                logged_intent_hash: *c.intent_hash,
                intent_hash: parsed.as_ref().map_or(*c.intent_hash, |p| p.intent().hash()),
                parsed,
                state: None,
                expires_at: 0,
                votes: Vec::new(),
                authorized: false,
                counted: None,
            },
        );
    }

    fn vote(&mut self, index: u64, time: u64, withdrawal_id: &str, message: &[u8], signature: &[u8]) {
        self.report.votes += 1;
        self.expect = Some(Expect::Decision {
            index,
            withdrawal_id: withdrawal_id.to_owned(),
            trigger: Trigger::Vote,
        });
        let m = match ApprovalMessage::parse(message) {
            Ok(m) => m,
            Err(e) => return self.flag(index, code::APPROVAL_MALFORMED, e.to_string()),
        };
        let service_id = self.service_id(&m.service_id);
        let Replayer {
            report,
            open,
            finished,
            active,
            frozen,
            ahead,
            ..
        } = self;
        let w = open.get_mut(withdrawal_id);
        // A withdrawal that is closed or unknown takes no votes; its ballot
        // carries only the state, which the rules check before the rest.
        let (state_name, ballot) = match &w {
            Some(w) => (
                w.state.map_or("undecided", State::name),
                vote::Ballot {
                    withdrawal_id,
                    state: w.state,
                    window_ends_at: w.expires_at,
                    intent_hash: w.logged_intent_hash,
                    initiator: &w.initiator,
                    votes: &w.votes,
                },
            ),
            None => (
                finished.get(withdrawal_id).map_or("unknown", |s| s.name()),
                vote::Ballot {
                    withdrawal_id,
                    state: finished.get(withdrawal_id).copied(),
                    window_ends_at: 0,
                    intent_hash: [0; 32],
                    initiator: "",
                    votes: &[],
                },
            ),
        };
        let custody = vote::Custody {
            service_id: &service_id,
            frozen: *frozen,
            policy: active.as_ref().map(|a| &a.policy),
            now: time,
        };
        let verify = |key: &VerifyingKey| match ahead.votes.remove(&index) {
            Some((checked, result)) if checked == *key => result,
            _ => m.verify(signature, key),
        };
        let admitted = vote::admit(&m, verify, &ballot, &custody);
        let (code, detail) = match admitted {
            Ok(admitted) => {
                let Some(w) = w else {
                    // Unreachable: a withdrawal that is not open has no
                    // PENDING_APPROVAL state, so admission refused it.
                    return;
                };
                if let Some(at) = admitted.replaces {
                    w.votes.remove(at);
                }
                w.votes.push(admitted.approval);
                return;
            }
            Err(refusal) => {
                let version = custody.policy.map_or(0, |p| p.version);
                vote_finding(refusal, &m, withdrawal_id, state_name, &service_id, version)
            }
        };
        report.findings.push(Finding { index, code, detail });
    }

    fn decision(&mut self, index: u64, time: u64, trigger: Option<Trigger>, d: &Logged<'_>) {
        self.report.decisions += 1;
        let id = d.withdrawal_id;
        match trigger {
            Some(Trigger::Ignored) => return,
            Some(_) => {}
            None => self.flag(
                index,
                code::DECISION_ORPHAN,
                format!("no withdrawal or vote on {id} just before it; the engine decides only on those"),
            ),
        }
        let Some(logged) = State::from_name(d.state) else {
            return self.flag(
                index,
                code::DECISION_MISMATCH,
                format!("{:?} is not a withdrawal state", d.state),
            );
        };
        let Some(w) = self.open.get(id) else {
            let state = self.finished.get(id).map_or("unknown", |s| s.name());
            return self.flag(
                index,
                code::ILLEGAL_TRANSITION,
                format!("withdrawal {id} is {state}; it takes no decision"),
            );
        };
        let first = w.state.is_none();
        let legal = match w.state {
            None => matches!(logged, State::Approved | State::PendingApproval | State::Denied),
            Some(State::PendingApproval) => matches!(
                logged,
                State::Approved | State::PendingApproval | State::Denied | State::Rejected
            ),
            Some(_) => false,
        };
        if !legal {
            let from = w.state.map_or("a new", State::name);
            return self.flag(
                index,
                code::ILLEGAL_TRANSITION,
                format!("{from} withdrawal {id} cannot be decided {logged}"),
            );
        }
        let outcome = self.replay_decision(id, w, first, time);
        let agreed = match &outcome {
            Replayed::Decided(expected) => {
                let differences = expected.differences(logged, d);
                if self.frozen && !(logged == State::Denied && d.reason_code == "frozen") {
                    self.flag(
                        index,
                        code::DECISION_WHILE_FROZEN,
                        format!(
                            "custody is frozen, but the decision is {}",
                            describe_logged(logged, d)
                        ),
                    );
                } else if !differences.is_empty() {
                    let detail = format!(
                        "replay decides {}; the log says {}; they differ in {}",
                        expected.describe(),
                        describe_logged(logged, d),
                        differences.join(", ")
                    );
                    self.flag(index, code::DECISION_MISMATCH, detail);
                }
                differences.is_empty()
            }
            Replayed::FrozenVote => {
                if !(logged == State::Denied && d.reason_code == "frozen") {
                    self.flag(
                        index,
                        code::DECISION_WHILE_FROZEN,
                        format!(
                            "custody is frozen, but the decision is {}",
                            describe_logged(logged, d)
                        ),
                    );
                }
                false
            }
            Replayed::Unparsed => {
                if logged != State::Denied {
                    self.flag(
                        index,
                        code::DECISION_MISMATCH,
                        format!(
                            "the transaction does not parse for its wallet under the active policy, so only a denial is consistent; the log says {}",
                            describe_logged(logged, d)
                        ),
                    );
                }
                false
            }
        };
        let tainted = self.active.as_ref().is_some_and(|a| a.tainted);
        let window = match (&self.active, self.frozen) {
            (Some(a), false) => a.policy.approval_window_secs,
            _ => 0,
        };
        let Some(w) = self.open.get_mut(id) else { return };
        if first {
            w.expires_at = time.saturating_add(window);
        }
        w.state = Some(logged);
        if logged == State::Approved {
            w.authorized = agreed && !tainted && !self.frozen;
            if let Some(parsed) = &w.parsed {
                let intent = parsed.intent();
                let key = (w.wallet_id.clone(), intent.asset.symbol.clone());
                let amount = intent.total_amount();
                self.usage.entry(key.clone()).or_default().add(time, amount);
                w.counted = Some((key, time, amount));
            }
        }
        if logged.is_terminal() {
            self.finish_withdrawal(id, logged);
        }
    }

    /// What the engine decides for `w` at `time`: under the active policy,
    /// with the votes that verified and the usage the log accumulated.
    fn replay_decision(&self, id: &str, w: &Open, first: bool, time: u64) -> Replayed {
        let active = self.active.as_ref().map(|a| &a.policy);
        if self.frozen {
            if !first {
                return Replayed::FrozenVote;
            }
            let frozen = frozen_decision(None);
            let record = DecisionRecord {
                policy_hash: active.map(|p| p.hash),
                policy_version: active.map_or(0, |p| p.version),
                ..frozen
            };
            return Replayed::Decided(Expected {
                state: State::Denied,
                record,
                usage: Vec::new(),
            });
        }
        let Some(policy) = active else {
            return Replayed::Decided(Expected {
                state: State::Denied,
                record: no_policy_decision(),
                usage: Vec::new(),
            });
        };
        let Some(parsed) = &w.parsed else {
            return Replayed::Unparsed;
        };
        let intent = parsed.intent();
        let pw = policy::Withdrawal {
            id,
            wallet: &w.wallet_id,
            key_label: &w.key_label,
            intent,
            intent_hash: w.intent_hash,
            initiator: &w.initiator,
        };
        let empty = UsageLedger::default();
        let ledger = self
            .usage
            .get(&(w.wallet_id.clone(), intent.asset.symbol.clone()))
            .unwrap_or(&empty);
        let decision = policy::evaluate(policy, &pw, ledger, &w.votes, time);
        let state = match (&decision.outcome, first) {
            (Outcome::Allow, _) => State::Approved,
            (Outcome::Pending(_), _) => State::PendingApproval,
            (Outcome::Deny(DenyReason::Rejected { .. }), false) => State::Rejected,
            (Outcome::Deny(_), _) => State::Denied,
        };
        Replayed::Decided(Expected {
            state,
            record: record(&decision, policy.version),
            usage: window_usage(policy, &pw, ledger, time, state == State::Approved),
        })
    }

    fn signed(&mut self, index: u64, withdrawal_id: &str, signed_tx: &[u8], tx_hash: &[u8]) {
        self.report.signatures += 1;
        let Some(w) = self.open.get(withdrawal_id) else {
            let state = self.finished.get(withdrawal_id).map_or("unknown", |s| s.name());
            return self.flag(
                index,
                code::SIGNATURE_UNAUTHORIZED,
                format!("withdrawal {withdrawal_id} is {state}; nothing authorizes signing it"),
            );
        };
        let approved = w.state == Some(State::Approved);
        let unauthorized = if !approved {
            let state = w.state.map_or("undecided", State::name);
            Some(format!(
                "withdrawal {withdrawal_id} is {state}; only an APPROVED withdrawal is signed"
            ))
        } else if !w.authorized {
            Some(format!(
                "withdrawal {withdrawal_id} has no valid authorizing decision: its APPROVED decision is not the one replay reaches, or was made while frozen or under a policy that was not validly activated"
            ))
        } else if self.frozen || self.held {
            // The engine checks the freeze before it signs; a signature that
            // had passed that check when a freeze committed still completes,
            // so this is either that race or a signature while frozen.
            Some(format!(
                "withdrawal {withdrawal_id} is signed while custody is frozen"
            ))
        } else {
            None
        };
        let invalid = match (&w.parsed, self.wallets.get(&w.wallet_id)) {
            (Some(parsed), Some(wallet)) => {
                let ahead = self.ahead.recovered.remove(&index);
                verify_signed_tx(parsed, &wallet.public, signed_tx, tx_hash, ahead).err()
            }
            _ => Some("the withdrawal's transaction does not parse for its wallet".to_owned()),
        };
        if let Some(detail) = unauthorized {
            self.flag(index, code::SIGNATURE_UNAUTHORIZED, detail);
        }
        if let Some(detail) = invalid {
            self.flag(index, code::SIGNATURE_INVALID, detail);
        }
        if approved {
            self.finish_withdrawal(withdrawal_id, State::Signed);
        }
    }

    fn closed(&mut self, index: u64, time: u64, withdrawal_id: &str, state: &str) {
        let target = State::from_name(state).filter(|s| matches!(s, State::Expired | State::Cancelled));
        let Some(target) = target else {
            return self.flag(
                index,
                code::CLOSE_INVALID,
                format!("{state:?} is neither EXPIRED nor CANCELLED"),
            );
        };
        let Some(w) = self.open.get(withdrawal_id) else {
            let state = self.finished.get(withdrawal_id).map_or("unknown", |s| s.name());
            return self.flag(
                index,
                code::CLOSE_INVALID,
                format!("withdrawal {withdrawal_id} is {state}; it cannot become {target}"),
            );
        };
        let problem = match (w.state, target) {
            (Some(State::PendingApproval), State::Expired) if time < w.expires_at => Some(format!(
                "withdrawal {withdrawal_id} expired at {time}, before its approval window ended at {}",
                w.expires_at
            )),
            (Some(State::PendingApproval), State::Expired)
            | (Some(State::PendingApproval | State::Approved), State::Cancelled) => None,
            (from, _) => Some(format!(
                "a {} withdrawal cannot become {target}",
                from.map_or("undecided", State::name)
            )),
        };
        match problem {
            Some(problem) => self.flag(index, code::CLOSE_INVALID, problem),
            None => self.finish_withdrawal(withdrawal_id, target),
        }
    }

    /// Moves a withdrawal to its terminal state, dropping all but the state.
    /// A cancelled APPROVED withdrawal stops counting against limits.
    fn finish_withdrawal(&mut self, withdrawal_id: &str, state: State) {
        if let Some(w) = self.open.remove(withdrawal_id) {
            if state == State::Cancelled
                && let Some((key, at, amount)) = w.counted
                && let Some(ledger) = self.usage.get_mut(&key)
            {
                ledger.remove(at, amount);
            }
            self.finished.insert(withdrawal_id.to_owned(), state);
        }
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

/// Signature checks done ahead for one batch, by entry index.
#[derive(Debug, Default)]
struct Ahead {
    /// A vote's signature checked under this key.
    votes: HashMap<u64, (VerifyingKey, Result<(), ApprovalError>)>,
    /// The key an Ethereum signature recovers to.
    recovered: HashMap<u64, Recovered>,
}

/// The key `signature` with `recovery_id` recovers to over `prehash`.
#[derive(Debug)]
struct Recovered {
    prehash: [u8; 32],
    signature: Signature,
    recovery_id: RecoveryId,
    key: Option<VerifyingKey>,
}

enum Job<'a> {
    Vote(u64, Box<ApprovalMessage>, &'a [u8], VerifyingKey),
    Recover(u64, &'a [u8]),
}

enum Done {
    Vote(u64, VerifyingKey, Result<(), ApprovalError>),
    Recover(u64, Recovered),
    Nothing,
}

impl Job<'_> {
    fn run(&self) -> Done {
        match self {
            Job::Vote(index, m, signature, key) => Done::Vote(*index, *key, m.verify(signature, key)),
            Job::Recover(index, signed_tx) => {
                let Ok(decoded) = ethereum::decode_signed(signed_tx) else {
                    return Done::Nothing;
                };
                let key = VerifyingKey::recover_from_prehash(
                    decoded.signing_hash.as_slice(),
                    &decoded.signature,
                    decoded.recovery_id,
                )
                .ok();
                Done::Recover(
                    *index,
                    Recovered {
                        prehash: decoded.signing_hash.0,
                        signature: decoded.signature,
                        recovery_id: decoded.recovery_id,
                        key,
                    },
                )
            }
        }
    }
}

/// The fields of a withdrawal-created entry.
struct Created<'a> {
    withdrawal_id: &'a str,
    request_id: &'a str,
    wallet_id: &'a str,
    initiator: &'a str,
    chain: &'a str,
    unsigned_tx: &'a [u8],
    intent: &'a [u8],
    intent_hash: &'a [u8; 32],
}

/// The fields of a decision entry.
struct Logged<'a> {
    withdrawal_id: &'a str,
    policy_hash: &'a [u8; 32],
    policy_version: u64,
    state: &'a str,
    rule: &'a str,
    reason_code: &'a str,
    reason: &'a str,
    counted_approvers: &'a [String],
    usage: &'a [WindowUsage],
}

enum Replayed {
    Decided(Expected),
    /// A vote's decision while frozen: the engine refuses such votes.
    FrozenVote,
    /// The transaction does not parse for its wallet: nothing to evaluate.
    Unparsed,
}

/// The decision replay reaches, in the engine's own record.
struct Expected {
    state: State,
    record: DecisionRecord,
    usage: Vec<WindowUsage>,
}

impl Expected {
    fn differences(&self, state: State, d: &Logged<'_>) -> Vec<&'static str> {
        let r = &self.record;
        let policy_hash = r.policy_hash.unwrap_or([0u8; 32]) == *d.policy_hash;
        [
            ("policy_hash", policy_hash),
            ("policy_version", r.policy_version == d.policy_version),
            ("state", self.state == state),
            ("rule", r.rule.as_deref().unwrap_or_default() == d.rule),
            (
                "reason_code",
                r.reason_code.as_deref().unwrap_or_default() == d.reason_code,
            ),
            ("reason", r.reason.as_deref().unwrap_or_default() == d.reason),
            ("counted_approvers", r.counted_approvers == d.counted_approvers),
            ("usage", self.usage == d.usage),
        ]
        .into_iter()
        .filter_map(|(field, same)| (!same).then_some(field))
        .collect()
    }

    fn describe(&self) -> String {
        let r = &self.record;
        let mut text = format!("{} under policy version {}", self.state, r.policy_version);
        if let Some(rule) = &r.rule {
            text.push_str(&format!(", rule {rule}"));
        }
        if let (Some(code), Some(reason)) = (&r.reason_code, &r.reason) {
            text.push_str(&format!(", {code}: {reason}"));
        }
        if !r.counted_approvers.is_empty() {
            text.push_str(&format!(", counting {}", r.counted_approvers.join(" and ")));
        }
        text.push_str(&format!(", usage {}", describe_usage(&self.usage)));
        text
    }
}

/// The finding of a vote that [`vote::admit`] refused, with the code and
/// the words the replay reports.
fn vote_finding(
    refusal: vote::Refusal,
    m: &ApprovalMessage,
    withdrawal_id: &str,
    state_name: &str,
    service_id: &str,
    version: u64,
) -> (&'static str, String) {
    use vote::Refusal as R;
    match refusal {
        R::WrongService { named } => (
            code::APPROVAL_UNBOUND,
            format!("the approval names service {named}, not {service_id}"),
        ),
        R::WrongWithdrawal { named } => (
            code::APPROVAL_UNBOUND,
            format!("the approval names withdrawal {named}"),
        ),
        R::NotPending { .. } => (
            code::VOTE_REFUSED,
            format!("withdrawal {withdrawal_id} is {state_name}; it takes no votes"),
        ),
        R::WindowEnded { at } => (code::VOTE_REFUSED, format!("the approval window ended at {at}")),
        R::Frozen => (code::VOTE_REFUSED, "custody is frozen".into()),
        R::NoPolicy => (code::VOTE_REFUSED, "no policy is active".into()),
        R::UnknownApprover { approver, version } => (
            code::APPROVAL_UNAUTHORIZED,
            format!("{approver} is not on the roster of policy version {version}"),
        ),
        R::BadSignature(e) => (
            code::APPROVAL_UNAUTHORIZED,
            format!(
                "{e}: the vote is not signed by {}'s key on the roster of policy version {version}",
                m.approver
            ),
        ),
        R::WrongIntent { named, actual } => (
            code::APPROVAL_UNBOUND,
            format!(
                "the approval names intent {}, the withdrawal's is {}",
                hex::encode(named),
                hex::encode(actual)
            ),
        ),
        R::StalePolicy {
            named,
            version,
            active,
        } => (
            code::APPROVAL_UNBOUND,
            format!(
                "the approval names policy {}, the active policy is version {version} ({})",
                hex::encode(named),
                hex::encode(active)
            ),
        ),
        R::Expired { at } => (code::APPROVAL_UNBOUND, format!("the approval expired at {at}")),
        R::Initiator => (
            code::APPROVAL_UNAUTHORIZED,
            format!("{} initiated the withdrawal and cannot vote on it", m.approver),
        ),
        R::AlreadyCounted => (
            code::VOTE_REFUSED,
            format!("{}'s earlier vote still counts", m.approver),
        ),
    }
}

fn describe_logged(state: State, d: &Logged<'_>) -> String {
    let mut text = format!("{state} under policy version {}", d.policy_version);
    if !d.rule.is_empty() {
        text.push_str(&format!(", rule {}", d.rule));
    }
    if !d.reason_code.is_empty() {
        text.push_str(&format!(", {}: {}", d.reason_code, d.reason));
    }
    if !d.counted_approvers.is_empty() {
        text.push_str(&format!(", counting {}", d.counted_approvers.join(" and ")));
    }
    text.push_str(&format!(", usage {}", describe_usage(d.usage)));
    text
}

fn describe_usage(usage: &[WindowUsage]) -> String {
    if usage.is_empty() {
        return "none".into();
    }
    usage
        .iter()
        .map(|u| {
            format!(
                "[{} s: {}/{} before, {}/{} after]",
                u.seconds, u.amount_before, u.count_before, u.amount_after, u.count_after
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Recomputes a withdrawal's intent and compares it with the logged one.
/// Returns the transaction as replay parsed it (if it parses) and what is
/// wrong with the logged intent, if anything.
///
/// The engine parses with its configured network and token registry, which
/// the log does not hold. Replay parses first as the active policy governs
/// the wallet, which is what `custos approve` does; if that does not give
/// the logged intent (the policy may not govern the wallet, or name another
/// network, and the engine then denies), it parses on the transaction's own
/// chain id (Ethereum) or each Bitcoin network in turn, with the policy's
/// token registry. Any of these giving exactly the logged intent proves the
/// intent is the transaction's.
fn recompute_intent(
    c: &Created<'_>,
    wallet: &WalletKey,
    policy: Option<&Policy>,
) -> (Option<ParsedTx>, Option<String>) {
    let tx = match recompute::decode(c.chain, c.unsigned_tx) {
        Ok(tx) => tx,
        Err(e) => {
            return (
                None,
                Some(format!("the unsigned transaction does not decode: {e}")),
            );
        }
    };
    // `None`: as the policy governs the wallet; then the fallbacks.
    let mut attempts: Vec<Option<Network>> = Vec::new();
    if policy.is_some() {
        attempts.push(None);
    }
    match &tx {
        UnsignedTx::Ethereum(t) => {
            attempts.extend(recompute::chain_id(t).map(|chain_id| Some(Network::Ethereum { chain_id })));
        }
        UnsignedTx::Bitcoin(_) => attempts.extend(BITCOIN_NETWORKS.map(|n| Some(Network::Bitcoin(n)))),
    }
    let mut first: Option<Result<ParsedTx, String>> = None;
    for attempt in attempts {
        let parsed = match (attempt, policy) {
            (Some(network), _) => recompute::parse_on(tx.clone(), network, policy, &wallet.public),
            (None, Some(policy)) => {
                recompute::parse_under_policy(tx.clone(), policy, c.wallet_id, &wallet.public)
            }
            (None, None) => continue,
        }
        .map_err(|e| e.to_string());
        if let Ok(p) = &parsed
            && p.intent().canonical_bytes() == c.intent
        {
            let problem = (p.intent().hash() != *c.intent_hash).then(|| {
                format!(
                    "the logged intent hash {} is not the hash of the logged intent, {}",
                    hex::encode(c.intent_hash),
                    hex::encode(p.intent().hash())
                )
            });
            return (parsed.ok(), problem);
        }
        first.get_or_insert(parsed);
    }
    match first {
        Some(Ok(p)) => {
            let problem = format!(
                "the transaction gives intent {} ({} {} base units of {} to {}), not the logged intent {}",
                hex::encode(p.intent().hash()),
                p.intent().network.caip2(),
                p.intent().total_amount(),
                p.intent().asset.symbol,
                p.intent()
                    .destinations
                    .iter()
                    .map(|d| d.to.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                hex::encode(c.intent_hash)
            );
            (Some(p), Some(problem))
        }
        Some(Err(e)) => (
            None,
            Some(format!(
                "the transaction does not parse for wallet {}: {e}",
                c.wallet_id
            )),
        ),
        None => (None, Some("the transaction names no chain id".into())),
    }
}

/// Checks that `signed_tx` is the parsed transaction with a valid signature
/// by the wallet's key, and that `tx_hash` is its hash.
///
/// Ethereum: alloy decodes the signed transaction; its unsigned part must
/// be the withdrawal's, and the signature (low-S) must recover to the
/// wallet's key over the signing hash. Bitcoin: rust-bitcoin decodes the
/// transaction; without witnesses it must be the PSBT's unsigned
/// transaction, and each input's witness must be a SIGHASH_ALL low-S
/// signature by the wallet's key over that input's BIP-143 sighash,
/// followed by the wallet's key.
fn verify_signed_tx(
    parsed: &ParsedTx,
    key: &VerifyingKey,
    signed_tx: &[u8],
    tx_hash: &[u8],
    ahead: Option<Recovered>,
) -> Result<(), String> {
    match parsed {
        ParsedTx::Ethereum(p) => {
            let decoded = ethereum::decode_signed(signed_tx)?;
            let (unsigned, signature, recovery_id, hash) = (
                decoded.unsigned,
                decoded.signature,
                decoded.recovery_id,
                decoded.hash,
            );
            if unsigned != *p.transaction() {
                return Err("the signed transaction is not the withdrawal's transaction".into());
            }
            if hash.as_slice() != tx_hash {
                return Err(format!(
                    "the logged transaction hash {} is not the signed transaction's, {hash}",
                    hex::encode(tx_hash)
                ));
            }
            if !crate::signature::is_low_s(&signature) {
                return Err("the signature has high S".into());
            }
            let recovered = match ahead {
                Some(a)
                    if a.prehash == p.signing_hash()
                        && a.signature == signature
                        && a.recovery_id == recovery_id =>
                {
                    a.key
                }
                _ => VerifyingKey::recover_from_prehash(&p.signing_hash(), &signature, recovery_id).ok(),
            }
            .ok_or_else(|| "no key recovers from the signature".to_owned())?;
            if recovered != *key {
                return Err(format!(
                    "the transaction is signed by {}, not by the wallet's key ({})",
                    crate::address::ethereum_address_checksummed(&recovered),
                    crate::address::ethereum_address_checksummed(key)
                ));
            }
            Ok(())
        }
        ParsedTx::Bitcoin(p) => {
            use ::bitcoin::hashes::Hash;
            let tx: ::bitcoin::Transaction = ::bitcoin::consensus::encode::deserialize(signed_tx)
                .map_err(|e| format!("the signed transaction does not decode: {e}"))?;
            let mut stripped = tx.clone();
            for input in &mut stripped.input {
                input.witness = ::bitcoin::Witness::new();
            }
            if stripped != *p.unsigned_tx() {
                return Err("the signed transaction is not the withdrawal's transaction".into());
            }
            let txid = tx.compute_txid();
            if txid.as_byte_array().as_slice() != tx_hash {
                return Err(format!(
                    "the logged txid {} is not the signed transaction's, {txid}",
                    hex::encode(tx_hash)
                ));
            }
            let wallet_key = crate::address::bitcoin_public_key(key).to_bytes();
            for (i, (input, sighash)) in tx.input.iter().zip(p.sighashes()).enumerate() {
                let items: Vec<&[u8]> = input.witness.iter().collect();
                let [sig, public] = items.as_slice() else {
                    return Err(format!("input {i}'s witness is not a signature and a key"));
                };
                if *public != wallet_key.as_slice() {
                    return Err(format!("input {i} is signed with another key than the wallet's"));
                }
                let sig = ::bitcoin::ecdsa::Signature::from_slice(sig)
                    .map_err(|e| format!("input {i}'s signature is malformed: {e}"))?;
                if sig.sighash_type != ::bitcoin::EcdsaSighashType::All {
                    return Err(format!("input {i}'s signature is not SIGHASH_ALL"));
                }
                let signature = Signature::from_slice(&sig.signature.serialize_compact())
                    .map_err(|_| format!("input {i}'s signature is out of range"))?;
                if !crate::signature::is_low_s(&signature) {
                    return Err(format!("input {i}'s signature has high S"));
                }
                key.verify_prehash(sighash.as_bytes(), &signature)
                    .map_err(|_| format!("input {i}'s signature does not verify under the wallet's key"))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use alloy_consensus::TxEip1559;
    use alloy_primitives::{Address, TxKind};
    use k256::ecdsa::SigningKey;

    use super::*;
    use crate::chain::ethereum::{EthereumNetwork, UnsignedEthereumTx};
    use crate::policy::{Vote, policy_hash};

    const SERVICE: &str = "custos-test";
    const T0: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;
    const ETHER: u128 = 1_000_000_000_000_000_000;
    const EXCHANGE: &str = "0x3535353535353535353535353535353535353535";
    const LATE: &str = "0x5757575757575757575757575757575757575757";
    const STRANGER: &str = "0x6868686868686868686868686868686868686868";
    /// A wallet public key (the generator point). Nothing here signs with
    /// a wallet key: there is no software signer for wallet keys.
    const WALLET_KEY: &str = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";

    /// People's keys: test-only software keys for approvers, admins and the
    /// security officer, and one for someone on no roster.
    fn person(who: &str) -> SigningKey {
        let seed = match who {
            "root-1" => 0x11,
            "root-2" => 0x12,
            "root-3" => 0x13,
            "alice" => 0x21,
            "bob" => 0x22,
            "carol" => 0x23,
            "sam" => 0x24,
            _ => 0x66,
        };
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn roster_key(who: &str) -> String {
        format!(
            "secp256k1:{}",
            hex::encode(person(who).verifying_key().to_sec1_point(true).as_bytes())
        )
    }

    fn sign(who: &str, digest: &[u8; 32]) -> Vec<u8> {
        let (sig, _) = person(who).sign_prehash_recoverable(digest);
        sig.normalize_s().to_bytes().to_vec()
    }

    /// The test policy: small withdrawals to an allowlisted address are
    /// signed at once, larger ones need two treasury approvals; 3 ETH an
    /// hour, 20 ETH a day. `extra` is added to the allowlist.
    fn document(version: u64, extra: &[(&str, u64)]) -> Vec<u8> {
        let mut entries = format!(
            "  {{ address = \"{EXCHANGE}\", added_at = {} }},\n",
            T0 - 10 * DAY
        );
        for (address, added_at) in extra {
            entries.push_str(&format!(
                "  {{ address = \"{address}\", added_at = {added_at} }},\n"
            ));
        }
        format!(
            r#"version = {version}
approval_window_seconds = 86400
allowlist_delay_seconds = 86400

[admins]
quorum = 2
keys = {{ root-1 = "{r1}", root-2 = "{r2}", root-3 = "{r3}" }}
security_officers = ["sam"]

[approvers.alice]
key = "{alice}"
groups = ["treasury"]
[approvers.bob]
key = "{bob}"
groups = ["treasury"]
[approvers.carol]
key = "{carol}"
groups = ["treasury"]
[approvers.sam]
key = "{sam}"
groups = ["security"]

[wallets.hot]
network = "eip155:1"
key_label = "custos-wallet-hot"

[allowlists.exchanges]
entries = [
{entries}]

[[limits]]
wallet = "hot"
asset = "ETH"
per_transaction = "100000000000000000000"
windows = [
  {{ seconds = 3600, amount = "3000000000000000000", count = 5 }},
  {{ seconds = 86400, amount = "20000000000000000000" }},
]

[fee_caps.ethereum]
max_fee_per_gas = "200000000000"
max_total_fee = "20000000000000000"

[[rules]]
name = "auto-small"
wallets = ["hot"]
assets = ["ETH"]
allowlist = "exchanges"
amount_max = "1000000000000000000"
action = "allow"

[[rules]]
name = "large"
allowlist = "exchanges"
amount_max = "100000000000000000000"
action = "require"
quorum = [{{ group = "treasury", min = 2 }}]
"#,
            r1 = roster_key("root-1"),
            r2 = roster_key("root-2"),
            r3 = roster_key("root-3"),
            alice = roster_key("alice"),
            bob = roster_key("bob"),
            carol = roster_key("carol"),
            sam = roster_key("sam"),
        )
        .into_bytes()
    }

    /// The canonical unsigned EIP-1559 transfer and its intent.
    fn transfer(to: &str, wei: u128, nonce: u64) -> (Vec<u8>, crate::chain::Intent) {
        let tx = UnsignedEthereumTx::Eip1559(TxEip1559 {
            chain_id: 1,
            nonce,
            gas_limit: 21_000,
            max_fee_per_gas: 30_000_000_000,
            max_priority_fee_per_gas: 1_000_000_000,
            to: TxKind::Call(to.parse::<Address>().unwrap()),
            value: U256::from(wei),
            access_list: Default::default(),
            input: Default::default(),
        });
        let key = VerifyingKey::from_sec1_bytes(&hex::decode(WALLET_KEY).unwrap()).unwrap();
        let network = EthereumNetwork {
            chain_id: 1,
            tokens: Vec::new(),
        };
        let parsed = ethereum::parse(tx.clone(), &network, crate::address::ethereum_address(&key)).unwrap();
        (ethereum::signing_payload(&tx), parsed.intent().clone())
    }

    fn window(seconds: u64, before: (u128, u64), after: (u128, u64)) -> WindowUsage {
        WindowUsage {
            seconds,
            amount_before: before.0.to_string(),
            count_before: before.1,
            amount_after: after.0.to_string(),
            count_after: after.1,
        }
    }

    /// Both windows, when everything so far falls in the last hour.
    fn usage(before: (u128, u64), after: (u128, u64)) -> Vec<WindowUsage> {
        vec![window(3600, before, after), window(DAY, before, after)]
    }

    /// A log under construction, as the engine would write it.
    struct History {
        entries: Vec<Entry>,
        /// Entries already handed on ([`History::drain`]).
        offset: u64,
        time: u64,
        intents: HashMap<String, [u8; 32]>,
        /// Hash and version of the active policy.
        policy: ([u8; 32], u64),
        epoch: u64,
    }

    impl History {
        /// A wallet and the genesis policy.
        fn new() -> Self {
            Self::with_genesis(document(1, &[]))
        }

        fn with_genesis(genesis: Vec<u8>) -> Self {
            let mut h = Self {
                entries: Vec::new(),
                offset: 0,
                time: T0,
                intents: HashMap::new(),
                policy: ([0; 32], 0),
                epoch: 0,
            };
            h.push(Event::WalletCreated {
                wallet_id: "hot".into(),
                key_label: "custos-wallet-hot".into(),
                key_id: vec![1; 16],
                public_key: hex::decode(WALLET_KEY).unwrap(),
                attributes: 0b11_0111,
            });
            let hash = policy_hash(&genesis);
            h.push(Event::PolicyProposed {
                hash,
                version: 1,
                document: genesis,
            });
            h.push(Event::PolicyActivated { hash, version: 1 });
            h.policy = (hash, 1);
            h
        }

        fn at(&mut self, time: u64) -> &mut Self {
            self.time = time;
            self
        }

        fn push(&mut self, event: Event) -> u64 {
            let index = self.offset + self.entries.len() as u64;
            self.entries.push(Entry {
                index,
                time: self.time,
                event,
            });
            index
        }

        fn create(&mut self, id: &str, to: &str, wei: u128, nonce: u64, initiator: &str) -> u64 {
            let (unsigned_tx, intent) = transfer(to, wei, nonce);
            self.intents.insert(id.into(), intent.hash());
            self.push(Event::WithdrawalCreated {
                withdrawal_id: id.into(),
                request_id: format!("request-{id}"),
                wallet_id: "hot".into(),
                initiator: initiator.into(),
                chain: "ethereum".into(),
                unsigned_tx,
                intent: intent.canonical_bytes(),
                intent_hash: intent.hash(),
            })
        }

        fn decide(
            &mut self,
            id: &str,
            state: &str,
            rule: &str,
            refusal: (&str, &str),
            counted: &[&str],
            usage: Vec<WindowUsage>,
        ) -> u64 {
            self.push(Event::Decision {
                withdrawal_id: id.into(),
                policy_hash: self.policy.0,
                policy_version: self.policy.1,
                state: state.into(),
                rule: rule.into(),
                reason_code: refusal.0.into(),
                reason: refusal.1.into(),
                counted_approvers: counted.iter().map(|s| (*s).to_owned()).collect(),
                usage,
            })
        }

        /// A vote for `approver`, signed with `signer`'s key.
        fn vote_signed_by(&mut self, id: &str, approver: &str, signer: &str, vote: Vote) -> u64 {
            let m = ApprovalMessage {
                service_id: SERVICE.into(),
                withdrawal_id: id.into(),
                intent_hash: self.intents[id],
                policy_hash: self.policy.0,
                vote,
                expires_at: self.time + 600,
                approver: approver.into(),
            };
            self.push(Event::Vote {
                withdrawal_id: id.into(),
                message: m.encode(),
                signature: sign(signer, &m.digest()),
            })
        }

        fn vote(&mut self, id: &str, approver: &str) -> u64 {
            self.vote_signed_by(id, approver, approver, Vote::Approve)
        }

        fn governance(
            &self,
            action: GovernanceAction,
            sequence: u64,
            subject: [u8; 32],
            signer: &str,
        ) -> (Vec<u8>, Vec<u8>) {
            let m = GovernanceMessage {
                service_id: SERVICE.into(),
                action,
                sequence,
                subject,
                expires_at: self.time + 600,
                signer: signer.into(),
            };
            (m.encode(), sign(signer, &m.digest()))
        }

        /// Proposes `document` and logs each signer's approval; the entry
        /// after the last one activates it when `activate` is set. Returns
        /// the index of the last entry.
        fn new_version(&mut self, document: Vec<u8>, signers: &[&str], activate: bool) -> u64 {
            let hash = policy_hash(&document);
            let version = Policy::parse(&document).unwrap().version;
            self.push(Event::PolicyProposed {
                hash,
                version,
                document,
            });
            for signer in signers {
                let (message, signature) =
                    self.governance(GovernanceAction::ActivatePolicy, version, hash, signer);
                self.push(Event::PolicyApproved {
                    hash,
                    message,
                    signature,
                });
            }
            if !activate {
                return self.entries.len() as u64 - 1;
            }
            self.policy = (hash, version);
            self.push(Event::PolicyActivated { hash, version })
        }

        fn freeze(&mut self, signer: &str) -> u64 {
            let signature = self.governance(GovernanceAction::Freeze, self.epoch, [0; 32], signer);
            let epoch = self.epoch;
            self.epoch += 1;
            self.push(Event::Frozen {
                epoch,
                signatures: vec![signature],
            })
        }

        fn unfreeze(&mut self, signers: &[&str]) -> u64 {
            let signatures = signers
                .iter()
                .map(|s| self.governance(GovernanceAction::Unfreeze, self.epoch, [0; 32], s))
                .collect();
            let epoch = self.epoch;
            self.epoch += 1;
            self.push(Event::Unfrozen { epoch, signatures })
        }

        /// Hands on the entries so far, keeping the indexes running.
        fn drain(&mut self) -> Vec<Entry> {
            self.offset += self.entries.len() as u64;
            std::mem::take(&mut self.entries)
        }

        fn replay(&self) -> ReplayReport {
            let mut replayer = Replayer::for_service(SERVICE);
            for entry in &self.entries {
                replayer.push(entry);
            }
            replayer.finish()
        }
    }

    /// The findings as (index, code), for assertions that name both.
    fn found(report: &ReplayReport) -> Vec<(u64, &'static str)> {
        report.findings.iter().map(|f| (f.index, f.code)).collect()
    }

    fn detail(report: &ReplayReport, index: u64, code: &str) -> String {
        report
            .findings
            .iter()
            .find(|f| f.index == index && f.code == code)
            .map(|f| f.detail.clone())
            .unwrap_or_else(|| panic!("no {code} at {index}: {:#?}", report.findings))
    }

    const NONE: (&str, &str) = ("", "");

    /// A history the engine could have written: withdrawals signed at once,
    /// after two approvals, denied, cancelled after approval and expired; a
    /// new version by admin quorum; a freeze and an unfreeze.
    fn clean() -> History {
        let mut h = History::new();
        h.at(T0 + 10).create("wd_small", EXCHANGE, ETHER / 2, 0, "ops");
        h.decide(
            "wd_small",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (ETHER / 2, 1)),
        );

        h.at(T0 + 20).create("wd_large", EXCHANGE, 2 * ETHER, 1, "ops");
        let half = (ETHER / 2, 1);
        h.decide(
            "wd_large",
            "PENDING_APPROVAL",
            "large",
            NONE,
            &[],
            usage(half, half),
        );
        h.at(T0 + 30).vote("wd_large", "alice");
        h.decide(
            "wd_large",
            "PENDING_APPROVAL",
            "large",
            NONE,
            &["alice"],
            usage(half, half),
        );
        h.at(T0 + 40).vote("wd_large", "bob");
        let after = (ETHER / 2 + 2 * ETHER, 2);
        h.decide(
            "wd_large",
            "APPROVED",
            "large",
            NONE,
            &["alice", "bob"],
            usage(half, after),
        );

        h.at(T0 + 50).create("wd_far", STRANGER, ETHER / 10, 2, "ops");
        let reason = format!(
            "destination {STRANGER} is not on allowlist exchanges (rule auto-small); no other rule matched, the default is deny"
        );
        h.decide(
            "wd_far",
            "DENIED",
            "",
            ("not_allowlisted", &reason),
            &[],
            usage(after, after),
        );

        // Approved, then cancelled: it stops counting.
        h.at(T0 + 60).create("wd_cancel", EXCHANGE, ETHER / 4, 3, "ops");
        let with_cancelled = (after.0 + ETHER / 4, 3);
        h.decide(
            "wd_cancel",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage(after, with_cancelled),
        );
        h.at(T0 + 70).push(Event::Closed {
            withdrawal_id: "wd_cancel".into(),
            state: "CANCELLED".into(),
        });

        h.at(T0 + 100)
            .new_version(document(2, &[(LATE, T0 - 5 * DAY)]), &["root-1", "root-2"], true);
        h.at(T0 + 110).create("wd_after", EXCHANGE, ETHER / 5, 4, "ops");
        let cancelled_freed = (after.0 + ETHER / 5, 3);
        h.decide(
            "wd_after",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage(after, cancelled_freed),
        );

        h.at(T0 + 120).freeze("sam");
        h.at(T0 + 130).create("wd_frozen", EXCHANGE, ETHER / 10, 5, "ops");
        h.decide(
            "wd_frozen",
            "DENIED",
            "",
            (
                "frozen",
                "custody is frozen by a security officer; nothing is signed until admins unfreeze",
            ),
            &[],
            Vec::new(),
        );
        h.at(T0 + 140).unfreeze(&["root-1", "root-3"]);

        // An hour on, only wd_after is in the hour's window.
        h.at(T0 + 3700).create("wd_slow", EXCHANGE, 2 * ETHER, 6, "ops");
        let hour = (ETHER / 5, 1);
        let windows = vec![
            window(3600, hour, hour),
            window(DAY, cancelled_freed, cancelled_freed),
        ];
        h.decide("wd_slow", "PENDING_APPROVAL", "large", NONE, &[], windows);
        h.at(T0 + 3700 + DAY).push(Event::Closed {
            withdrawal_id: "wd_slow".into(),
            state: "EXPIRED".into(),
        });
        h
    }

    #[test]
    fn a_clean_history_gives_no_findings() {
        let h = clean();
        let report = h.replay();
        assert_eq!(report.findings, [], "{:#?}", report.findings);
        assert_eq!(report.entries, h.entries.len() as u64);
        assert_eq!(
            (
                report.policy_versions,
                report.withdrawals,
                report.decisions,
                report.votes,
                report.signatures
            ),
            (2, 7, 9, 2, 0)
        );
        assert_eq!(report.genesis_policy_hash, Some(policy_hash(&document(1, &[]))));
        assert_eq!(report.service_id.as_deref(), Some(SERVICE));
        // Learning the service id from the first message gives the same.
        let mut learning = Replayer::new();
        for entry in &h.entries {
            learning.push(entry);
        }
        assert_eq!(learning.finish(), report);
    }

    /// (a) A signature with no decision authorizing it.
    #[test]
    fn a_signature_without_an_approved_decision_is_flagged() {
        let mut h = History::new();
        h.at(T0 + 10).create("wd_large", EXCHANGE, 2 * ETHER, 0, "ops");
        h.decide(
            "wd_large",
            "PENDING_APPROVAL",
            "large",
            NONE,
            &[],
            usage((0, 0), (0, 0)),
        );
        let pending = h.push(Event::Signed {
            withdrawal_id: "wd_large".into(),
            signed_tx: vec![0x02, 0xf8, 0x01],
            tx_hash: vec![0x33; 32],
        });
        let created = h.create("wd_bare", EXCHANGE, ETHER / 2, 1, "ops");
        let bare = h.push(Event::Signed {
            withdrawal_id: "wd_bare".into(),
            signed_tx: vec![0x02, 0xf8, 0x01],
            tx_hash: vec![0x33; 32],
        });
        let unknown = h.push(Event::Signed {
            withdrawal_id: "wd_nobody".into(),
            signed_tx: vec![0x02],
            tx_hash: vec![0x33; 32],
        });
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (pending, code::SIGNATURE_UNAUTHORIZED),
                (pending, code::SIGNATURE_INVALID),
                (created, code::DECISION_MISSING),
                (bare, code::SIGNATURE_UNAUTHORIZED),
                (bare, code::SIGNATURE_INVALID),
                (unknown, code::SIGNATURE_UNAUTHORIZED),
            ],
            "{:#?}",
            report.findings
        );
        assert!(detail(&report, pending, code::SIGNATURE_UNAUTHORIZED).contains("PENDING_APPROVAL"));
        assert_eq!(report.signatures, 3);
    }

    /// (b) Approvals by keys the roster does not list, and what they would
    /// have approved.
    #[test]
    fn an_approval_by_a_key_not_on_the_roster_is_flagged() {
        let mut h = History::new();
        h.at(T0 + 10).create("wd_large", EXCHANGE, 2 * ETHER, 0, "ops");
        let none = usage((0, 0), (0, 0));
        h.decide("wd_large", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
        // Alice's name, mallory's key.
        let as_alice = h.vote_signed_by("wd_large", "alice", "mallory", Vote::Approve);
        h.decide("wd_large", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
        // Mallory under her own name.
        let as_mallory = h.vote_signed_by("wd_large", "mallory", "mallory", Vote::Approve);
        h.decide("wd_large", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
        h.vote("wd_large", "bob");
        // A forged decision counting the forged vote.
        let forged = h.decide(
            "wd_large",
            "APPROVED",
            "large",
            NONE,
            &["alice", "bob"],
            usage((0, 0), (2 * ETHER, 1)),
        );
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (as_alice, code::APPROVAL_UNAUTHORIZED),
                (as_mallory, code::APPROVAL_UNAUTHORIZED),
                (forged, code::DECISION_MISMATCH),
            ],
            "{:#?}",
            report.findings
        );
        assert!(detail(&report, as_alice, code::APPROVAL_UNAUTHORIZED).contains("alice's key"));
        assert!(detail(&report, as_mallory, code::APPROVAL_UNAUTHORIZED).contains("not on the roster"));
        let mismatch = detail(&report, forged, code::DECISION_MISMATCH);
        assert!(
            mismatch.contains("replay decides PENDING_APPROVAL") && mismatch.contains("counting bob,"),
            "{mismatch}"
        );
    }

    /// (c) A decision that exceeds a rolling limit counted from the log.
    #[test]
    fn a_decision_over_a_limit_is_flagged() {
        let mut h = History::new();
        let step = 9 * ETHER / 10;
        for n in 0..3u64 {
            let id = format!("wd_{n}");
            h.at(T0 + 10 * n).create(&id, EXCHANGE, step, n, "ops");
            let used = (step * u128::from(n as u32), n);
            h.decide(
                &id,
                "APPROVED",
                "auto-small",
                NONE,
                &[],
                usage(used, (used.0 + step, n + 1)),
            );
        }
        // 2.7 ETH used of 3 ETH an hour: the fourth does not fit, but the
        // log approves it and claims less was used.
        h.at(T0 + 40).create("wd_3", EXCHANGE, step, 3, "ops");
        let over = h.decide(
            "wd_3",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (step, 1)),
        );
        let signed = h.push(Event::Signed {
            withdrawal_id: "wd_3".into(),
            signed_tx: vec![0x02],
            tx_hash: vec![0; 32],
        });
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (over, code::DECISION_MISMATCH),
                (signed, code::SIGNATURE_UNAUTHORIZED),
                (signed, code::SIGNATURE_INVALID),
            ],
            "{:#?}",
            report.findings
        );
        let mismatch = detail(&report, over, code::DECISION_MISMATCH);
        assert!(
            mismatch.contains("DENIED under policy version 1, rolling_amount_limit")
                && mismatch.contains("2700000000000000000 used"),
            "{mismatch}"
        );
        // An hour later the window has room again.
        let mut later = History::new();
        later.entries = h.entries[..h.entries.len() - 3].to_vec();
        later.intents = h.intents.clone();
        later.policy = h.policy;
        // The hour now covers what was counted after T0 + 5: wd_1 and wd_2.
        later.at(T0 + 3605).create("wd_3", EXCHANGE, step, 3, "ops");
        let day = (3 * step, 3);
        later.decide(
            "wd_3",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            vec![
                window(3600, (2 * step, 2), (3 * step, 3)),
                window(DAY, day, (4 * step, 4)),
            ],
        );
        assert_eq!(later.replay().findings, []);
    }

    /// (d) An allowlist entry used before its time-lock ended: the new
    /// version backdates it, but the lock runs from the activation.
    #[test]
    fn an_allowlist_entry_used_before_its_time_lock_is_flagged() {
        let mut h = History::new();
        let activated_at = T0 + 100;
        h.at(activated_at)
            .new_version(document(2, &[(LATE, T0 - 30 * DAY)]), &["root-1", "root-2"], true);
        h.at(activated_at + 60)
            .create("wd_early", LATE, ETHER / 2, 0, "ops");
        let early = h.decide(
            "wd_early",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (ETHER / 2, 1)),
        );
        let report = h.replay();
        assert_eq!(
            found(&report),
            [(early, code::DECISION_MISMATCH)],
            "{:#?}",
            report.findings
        );
        let mismatch = detail(&report, early, code::DECISION_MISMATCH);
        assert!(
            mismatch.contains("not_allowlisted")
                && mismatch.contains(&format!("time-lock ends at {}", activated_at + DAY)),
            "{mismatch}"
        );

        // Once the lock has run, the same withdrawal is allowed.
        let mut h = History::new();
        h.at(activated_at)
            .new_version(document(2, &[(LATE, T0 - 30 * DAY)]), &["root-1", "root-2"], true);
        h.at(activated_at + DAY)
            .create("wd_later", LATE, ETHER / 2, 0, "ops");
        h.decide(
            "wd_later",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (ETHER / 2, 1)),
        );
        assert_eq!(h.replay().findings, []);
    }

    #[test]
    fn policy_history_needs_quorum_and_goes_forward() {
        let mut h = History::new();
        // One admin of two needed, and an activation all the same.
        let short = h.at(T0 + 10).new_version(document(2, &[]), &["root-1"], true);
        // The forged version's own admins then sign the next one.
        h.at(T0 + 20)
            .new_version(document(3, &[]), &["root-1", "root-2"], true);
        // An older version can be neither proposed nor activated.
        let stale = h.at(T0 + 30).new_version(document(2, &[(LATE, 1)]), &[], false);
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (short, code::ACTIVATION_UNAUTHORIZED),
                (stale, code::VERSION_NOT_NEWER)
            ],
            "{:#?}",
            report.findings
        );
        assert_eq!(report.policy_versions, 3);
        // Version 3 verified against version 2's admins, but version 2 was
        // never validly activated: nothing under either authorizes a signature.
        let mut replayer = Replayer::for_service(SERVICE);
        for entry in &h.entries {
            replayer.push(entry);
        }
        assert!(
            replayer
                .active
                .as_ref()
                .is_some_and(|a| a.tainted && a.policy.version == 3)
        );

        // A document that does not hash to its logged hash.
        let mut h = History::new();
        let index = h.push(Event::PolicyProposed {
            hash: [7; 32],
            version: 2,
            document: document(2, &[]),
        });
        let report = h.replay();
        assert_eq!(found(&report), [(index, code::POLICY_INVALID)]);
    }

    #[test]
    fn a_quorum_without_its_activation_and_a_bad_admin_signature_are_flagged() {
        let mut h = History::new();
        h.at(T0 + 10)
            .new_version(document(2, &[]), &["root-1", "root-2"], false);
        let quorum = h.entries.len() as u64 - 1;
        h.create("wd_x", EXCHANGE, ETHER / 2, 0, "ops");
        h.decide(
            "wd_x",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (ETHER / 2, 1)),
        );
        let report = h.replay();
        assert_eq!(found(&report), [(quorum, code::ACTIVATION_MISSING)]);

        let mut h = History::new();
        let doc = document(2, &[]);
        let hash = policy_hash(&doc);
        h.push(Event::PolicyProposed {
            hash,
            version: 2,
            document: doc,
        });
        let (message, _) = h.governance(GovernanceAction::ActivatePolicy, 2, hash, "root-1");
        let bad = h.push(Event::PolicyApproved {
            hash,
            message,
            signature: sign("mallory", &[1; 32]),
        });
        let report = h.replay();
        assert_eq!(found(&report), [(bad, code::POLICY_APPROVAL_INVALID)]);
    }

    #[test]
    fn freezes_need_their_signers_and_decisions_while_frozen_deny() {
        let mut h = History::new();
        // A freeze by an approver who is no security officer.
        let bad_freeze = h.at(T0 + 10).freeze("alice");
        h.create("wd_x", EXCHANGE, ETHER / 2, 0, "ops");
        let approved = h.decide(
            "wd_x",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (ETHER / 2, 1)),
        );
        // One admin where two are needed.
        let bad_unfreeze = h.at(T0 + 20).unfreeze(&["root-1"]);
        let signed = h.push(Event::Signed {
            withdrawal_id: "wd_x".into(),
            signed_tx: vec![0x02],
            tx_hash: vec![0; 32],
        });
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (bad_freeze, code::FREEZE_INVALID),
                (approved, code::DECISION_WHILE_FROZEN),
                (bad_unfreeze, code::FREEZE_INVALID),
                (signed, code::SIGNATURE_UNAUTHORIZED),
                (signed, code::SIGNATURE_INVALID),
            ],
            "{:#?}",
            report.findings
        );
    }

    #[test]
    fn a_logged_intent_that_is_not_the_transactions_is_flagged() {
        let mut h = History::new();
        let (unsigned_tx, _) = transfer(EXCHANGE, 50 * ETHER, 0);
        // The log shows approvers half an ether; the transaction sends fifty.
        let (_, shown) = transfer(EXCHANGE, ETHER / 2, 0);
        h.intents.insert("wd_x".into(), shown.hash());
        let created = h.at(T0 + 10).push(Event::WithdrawalCreated {
            withdrawal_id: "wd_x".into(),
            request_id: "r".into(),
            wallet_id: "hot".into(),
            initiator: "ops".into(),
            chain: "ethereum".into(),
            unsigned_tx,
            intent: shown.canonical_bytes(),
            intent_hash: shown.hash(),
        });
        let decided = h.decide(
            "wd_x",
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage((0, 0), (ETHER / 2, 1)),
        );
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (created, code::INTENT_MISMATCH),
                (decided, code::DECISION_MISMATCH)
            ],
            "{:#?}",
            report.findings
        );
        assert!(detail(&report, created, code::INTENT_MISMATCH).contains("50000000000000000000 base units"));
        // Fifty ether does not fit the hour's three.
        assert!(detail(&report, decided, code::DECISION_MISMATCH).contains("replay decides DENIED"));
        assert!(detail(&report, decided, code::DECISION_MISMATCH).contains("rolling_amount_limit"));
    }

    #[test]
    fn votes_bind_to_their_withdrawal_and_close_only_open_withdrawals() {
        let mut h = History::new();
        h.at(T0 + 10).create("wd_a", EXCHANGE, 2 * ETHER, 0, "alice");
        let none = usage((0, 0), (0, 0));
        h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
        let own = h.vote("wd_a", "alice");
        h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
        h.vote("wd_a", "bob");
        h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &["bob"], none.clone());
        let twice = h.vote("wd_a", "bob");
        h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &["bob"], none.clone());
        let early = h.at(T0 + 20).push(Event::Closed {
            withdrawal_id: "wd_a".into(),
            state: "EXPIRED".into(),
        });
        h.push(Event::Closed {
            withdrawal_id: "wd_a".into(),
            state: "CANCELLED".into(),
        });
        let again = h.push(Event::Closed {
            withdrawal_id: "wd_a".into(),
            state: "CANCELLED".into(),
        });
        let late = h.vote("wd_a", "carol");
        let orphan = h.decide("wd_a", "APPROVED", "large", NONE, &["bob", "carol"], none.clone());
        let gap = h.push(Event::Closed {
            withdrawal_id: "wd_a".into(),
            state: "EXPIRED".into(),
        });
        h.entries[gap as usize].index += 1;
        let report = h.replay();
        assert_eq!(
            found(&report),
            [
                (own, code::APPROVAL_UNAUTHORIZED),
                (twice, code::VOTE_REFUSED),
                (early, code::CLOSE_INVALID),
                (again, code::CLOSE_INVALID),
                (late, code::VOTE_REFUSED),
                (orphan, code::ILLEGAL_TRANSITION),
                (gap + 1, code::INDEX_GAP),
                (gap + 1, code::CLOSE_INVALID),
            ],
            "{:#?}",
            report.findings
        );
        assert!(detail(&report, own, code::APPROVAL_UNAUTHORIZED).contains("initiated"));
    }

    #[test]
    fn bytes_that_are_not_an_entry_are_flagged_at_their_place() {
        let h = History::new();
        let mut replayer = Replayer::for_service(SERVICE);
        for entry in &h.entries {
            replayer.push_encoded(&entry.encode()).unwrap();
        }
        assert!(
            replayer
                .push_encoded(b"custos/audit/v1 and then nonsense")
                .is_err()
        );
        let report = replayer.finish();
        assert_eq!(found(&report), [(3, code::MALFORMED_ENTRY)]);
        assert_eq!(report.entries, 4);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["genesis_policy_hash"],
            hex::encode(policy_hash(&document(1, &[])))
        );
        assert_eq!(json["findings"][0]["code"], "malformed_entry");
    }

    /// A busy log: two of three withdrawals wait for two verified votes, so
    /// a third of the entries carry a signature check, about the share of
    /// a real log where each approved withdrawal is also signed. Windows of
    /// 1 and 2 seconds, and withdrawals 4 seconds apart, keep every
    /// decision's usage at zero before; the ledger still grows. Hands the
    /// entries on in batches of about `batch`.
    fn busy(target: u64, batch: usize, mut sink: impl FnMut(Vec<Entry>)) {
        let genesis = String::from_utf8(document(1, &[]))
            .unwrap()
            .replace("seconds = 3600,", "seconds = 1,")
            .replace("seconds = 86400,", "seconds = 2,");
        let mut h = History::with_genesis(genesis.into_bytes());
        let mut n = 0u64;
        while h.offset + (h.entries.len() as u64) < target {
            let t = T0 + 4 * n;
            let id = format!("wd_{n:08}");
            let win = |amount: u128| vec![window(1, (0, 0), (amount, 1)), window(2, (0, 0), (amount, 1))];
            let none = vec![window(1, (0, 0), (0, 0)), window(2, (0, 0), (0, 0))];
            if n % 3 == 0 {
                h.at(t).create(&id, EXCHANGE, ETHER / 2, n, "ops");
                h.decide(&id, "APPROVED", "auto-small", NONE, &[], win(ETHER / 2));
            } else {
                h.at(t).create(&id, EXCHANGE, 2 * ETHER, n, "ops");
                h.decide(&id, "PENDING_APPROVAL", "large", NONE, &[], none.clone());
                h.at(t + 1).vote(&id, "alice");
                h.decide(&id, "PENDING_APPROVAL", "large", NONE, &["alice"], none);
                h.at(t + 2).vote(&id, "bob");
                h.decide(&id, "APPROVED", "large", NONE, &["alice", "bob"], win(2 * ETHER));
            }
            h.intents.clear();
            if h.entries.len() >= batch {
                sink(h.drain());
            }
            n += 1;
        }
        sink(h.drain());
    }

    /// Checking signatures ahead on other cores changes nothing but the time.
    #[test]
    fn push_all_gives_the_same_report_as_push() {
        let mut entries = Vec::new();
        busy(600, 600, |batch| entries.extend(batch));
        // Forgeries among them: a vote by a key not on the roster, a
        // signature for a pending withdrawal, a vote for nobody.
        // (A vote mid-log: the first batch starts before the genesis policy,
        // with no roster to check anything ahead against, and a short last
        // batch is not worth other threads.)
        let forged_vote = (entries.len() / 2..)
            .find(|i| matches!(entries[*i].event, Event::Vote { .. }))
            .unwrap();
        let Event::Vote { signature, .. } = &mut entries[forged_vote].event else {
            unreachable!()
        };
        *signature = sign("mallory", &[5; 32]);
        let pending = entries
            .iter()
            .position(|e| matches!(&e.event, Event::Decision { state, .. } if state == "PENDING_APPROVAL"))
            .unwrap();
        let Event::Decision { withdrawal_id, .. } = &entries[pending].event else {
            unreachable!()
        };
        let (unsigned, _) = transfer(EXCHANGE, ETHER, 1);
        let garbage = Event::Signed {
            withdrawal_id: withdrawal_id.clone(),
            signed_tx: unsigned,
            tx_hash: vec![0; 32],
        };
        entries.insert(
            pending + 1,
            Entry {
                index: 0,
                time: T0,
                event: garbage,
            },
        );
        for (i, e) in entries.iter_mut().enumerate() {
            e.index = i as u64;
        }
        let mut one_by_one = Replayer::for_service(SERVICE);
        for e in &entries {
            one_by_one.push(e);
        }
        let one_by_one = one_by_one.finish();
        assert!(one_by_one.findings.len() >= 3, "{:#?}", one_by_one.findings);
        for batch in [7, 100, 128] {
            let mut batched = Replayer::for_service(SERVICE);
            for chunk in entries.chunks(batch) {
                batched.push_all(chunk);
            }
            assert_eq!(batched.finish(), one_by_one, "batches of {batch}");
        }
    }

    /// Scale: a million-entry log (a third auto-signed, two thirds approved
    /// by two votes) goes through the whole offline verifier (strict
    /// decoding, the tree, the replay with every vote signature checked) with
    /// no finding. Run by hand for docs/performance.md:
    /// `cargo test --release --lib audit::replay::tests::verifies_a_million_entries -- --ignored --nocapture`.
    #[test]
    #[ignore = "a scale run, minutes in debug builds"]
    fn verifies_a_million_entries() {
        use crate::audit::note::NoteVerifier;
        use crate::audit::verify::LogVerifier;
        let target: u64 = std::env::var("REPLAY_ENTRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        // Only verification happens here; no checkpoint is signed, so the
        // verifier reports `no_checkpoint` and nothing else.
        let rfc8032_test_1 =
            hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a").unwrap();
        let key = NoteVerifier::new(
            "custos.example/log",
            crate::key::KeyKind::Ed25519,
            &rfc8032_test_1,
        )
        .unwrap();
        let mut verifier = LogVerifier::new(key, Some(SERVICE));
        let mut verifying = std::time::Duration::ZERO;
        busy(target, 4096, |batch| {
            let encoded: Vec<Vec<u8>> = batch.iter().map(Entry::encode).collect();
            let start = std::time::Instant::now();
            for bytes in &encoded {
                verifier.push_entry(bytes, None);
            }
            verifying += start.elapsed();
        });
        let start = std::time::Instant::now();
        let report = verifier.finish();
        verifying += start.elapsed();
        let codes: Vec<&str> = report.failures.iter().map(|f| f.code).collect();
        assert_eq!(codes, ["no_checkpoint"]);
        assert!(report.entries >= target, "{} entries", report.entries);
        assert_eq!(report.replay.findings, []);
        eprintln!(
            "verified {} entries ({} withdrawals, {} votes) on {} cores in {:.2?}",
            report.entries,
            report.replay.withdrawals,
            report.replay.votes,
            std::thread::available_parallelism().map_or(1, usize::from),
            verifying
        );
    }
}
