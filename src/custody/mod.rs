//! The custody engine: the only path from a withdrawal request to a signature.
//!
//! It ties the pure pieces to durable state and the HSM:
//! - a request is parsed against its wallet ([`custos_core::chain`]) before anything
//!   is stored; a malformed one changes nothing;
//! - the request id is reserved, the rolling usage read, the policy evaluated
//!   ([`custos_core::policy::evaluate`]) and the outcome stored in ONE
//!   `BEGIN IMMEDIATE` transaction, so concurrent requests can never push a
//!   limit past its cap, and one request id is one withdrawal;
//! - votes are verified against the active policy's roster and bound to the
//!   withdrawal, its intent hash and the active policy hash, then the
//!   withdrawal is re-evaluated in the same transaction as the vote;
//! - APPROVED withdrawals are signed one at a time per withdrawal (the
//!   signing lock), by `create` or the deciding vote right after their
//!   decision commits, or by the sweep ([`Custody::sign`]); always from the
//!   stored transaction re-parsed (never from anything a caller hands in),
//!   and the signature is released only after SIGNED is committed. A crash
//!   between approval and signing leaves an APPROVED row that
//!   [`Custody::resume`] signs on the next start.
//!
//! State moves only through [`custos_core::lifecycle::State::apply`]. Governance
//! (policy versions, freeze) is in [`governance`].

pub mod governance;
mod usage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub use governance::{ActivePolicy, GovernanceView, ProposalView};
use k256::sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use usage::UsageCache;

use crate::clock::unix_now;
use crate::store::audit as audit_store;
use crate::store::governance as gov_store;
use crate::store::withdrawals::{self as wd_store, ApprovalRow, WithdrawalRow};
use crate::store::{Store, StoreError};
use crate::wallet::{Wallet, WalletError, WalletId, Wallets};
use custos_core::approval::{ApprovalError, ApprovalMessage};
use custos_core::audit::entry::{Event as AuditEvent, WindowUsage};
use custos_core::chain::ethereum::EthereumNetwork;
use custos_core::chain::{Chain, Intent, TxRefusal, UnsignedTx, bitcoin as bitcoin_chain, ethereum};
use custos_core::lifecycle::{Event, FirstDecision, IllegalTransition, State};
use custos_core::policy::record::{frozen_decision, no_policy_decision, record, window_usage};
use custos_core::policy::{self, DenyReason, Outcome, Policy, RollingUsage, Usage, Vote};
use custos_core::vote;

/// Chain parameters.
#[derive(Debug, Clone)]
pub struct ChainConfig {
    /// The Bitcoin network addresses are derived for.
    pub bitcoin_network: bitcoin::Network,
    /// The Ethereum chain id and its token registry.
    pub ethereum: EthereumNetwork,
}

/// Longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Domain separator of the request hash that makes retries idempotent.
const REQUEST_DOMAIN: &[u8] = b"custos/request/v1";

/// Why a custody operation was refused or failed. Each variant says what the
/// client should know; server-side details stay in the wrapped errors, which
/// [`crate::api`] logs and does not send.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    /// A request field is malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Field path.
        field: String,
        /// The rule it broke.
        reason: String,
    },
    /// The transaction does not parse for this wallet.
    #[error(transparent)]
    Transaction(#[from] TxRefusal),
    /// No such withdrawal or policy.
    #[error("{0} not found")]
    NotFound(String),
    /// The request id was used for a different request, or a vote or
    /// proposal already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not fit the current state.
    #[error("{message}")]
    FailedPrecondition {
        /// Stable reason code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The signer may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A submitted signed message or signature was refused.
    #[error(transparent)]
    Signature(#[from] ApprovalError),
    /// A governance message was refused.
    #[error(transparent)]
    Governance(#[from] custos_core::governance::GovernanceError),
    /// The wallet registry or HSM failed.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// The stored state contradicts itself (a bug or tampering); fail closed.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
    /// A blocking task failed.
    #[error("background task failed")]
    Worker,
}

impl From<StoreError> for CustodyError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<IllegalTransition> for CustodyError {
    fn from(e: IllegalTransition) -> Self {
        Self::FailedPrecondition {
            code: "illegal_transition",
            message: e.to_string(),
        }
    }
}

fn precondition(code: &'static str, message: impl Into<String>) -> CustodyError {
    CustodyError::FailedPrecondition {
        code,
        message: message.into(),
    }
}

/// A new withdrawal as the backend asks for it, already converted from the wire.
#[derive(Debug, Clone)]
pub struct NewWithdrawal {
    /// Idempotency key.
    pub request_id: RequestId,
    /// The paying wallet.
    pub wallet: WalletId,
    /// The unsigned transaction.
    pub transaction: UnsignedTx,
    /// Who asked for it.
    pub initiator: String,
}

/// A request id: 1 to 128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Parses a request id.
    pub fn parse(id: &str) -> Result<Self, &'static str> {
        if id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES {
            return Err("must be 1 to 128 characters");
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces");
        }
        Ok(Self(id.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A withdrawal with its votes, as the services present it.
#[derive(Debug, Clone)]
pub struct WithdrawalView {
    /// The stored row.
    pub row: WithdrawalRow,
    /// Votes, in submission order.
    pub approvals: Vec<ApprovalRow>,
}

/// A page of withdrawals.
#[derive(Debug, Clone)]
pub struct WithdrawalPage {
    /// In creation order.
    pub withdrawals: Vec<WithdrawalView>,
    /// Cursor for the next page, if there may be more.
    pub next_after: Option<i64>,
}

/// A transaction parsed for its wallet.
enum ParsedTx {
    Ethereum(ethereum::ParsedEthereumTx),
    Bitcoin(bitcoin_chain::ParsedBitcoinTx),
}

impl ParsedTx {
    fn intent(&self) -> &Intent {
        match self {
            Self::Ethereum(p) => p.intent(),
            Self::Bitcoin(p) => p.intent(),
        }
    }
}

/// The custody engine.
#[derive(Debug)]
pub struct Custody {
    store: Arc<Store>,
    wallets: Arc<Wallets>,
    chains: ChainConfig,
    service_id: String,
    policies: RwLock<HashMap<u64, Arc<ActivePolicy>>>,
    updates: broadcast::Sender<String>,
    signing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Rolling limit usage, read and updated only inside write closures.
    usage: Arc<Mutex<UsageCache>>,
    /// What the last freeze or unfreeze committed. Only a hint that spares
    /// the token a signature nobody may have: the SIGNED transaction reads
    /// the freeze itself.
    frozen_hint: AtomicBool,
}

impl Custody {
    /// The engine over an opened store and wallet registry. `service_id`
    /// names this deployment in every approval and governance message.
    pub fn new(store: Arc<Store>, wallets: Arc<Wallets>, chains: ChainConfig, service_id: String) -> Self {
        let (updates, _) = broadcast::channel(1024);
        Self {
            store,
            wallets,
            chains,
            service_id,
            policies: RwLock::new(HashMap::new()),
            updates,
            signing: Mutex::new(HashMap::new()),
            usage: Arc::new(Mutex::new(UsageCache::default())),
            frozen_hint: AtomicBool::new(false),
        }
    }

    /// This deployment's service id.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }

    /// Ids of withdrawals as they change state; [`Custody::watch`] filters it.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.updates.subscribe()
    }

    /// Creates a withdrawal, or returns the one this request id already made.
    /// If policy allows it at once, it is signed before this returns.
    pub async fn create(&self, request: NewWithdrawal) -> Result<WithdrawalView, CustodyError> {
        let wallet = self.wallets.signable(&request.wallet).map_err(|e| match e {
            WalletError::KeyUnusable(..) => self.wallet_missing_or_unusable(&request.wallet, e),
            other => other.into(),
        })?;
        let parsed = self.parse_for(&wallet, request.transaction.clone())?;
        let chain = request.transaction.chain();
        let unsigned = request.transaction.canonical_bytes();
        let intent = parsed.intent().clone();
        let intent_hash = intent.hash();
        let request_hash = request_hash(&request, chain, &unsigned);
        let withdrawal_id = new_withdrawal_id()?;
        let fresh_id = withdrawal_id.clone(); // a retry returns an older row
        let wallet_id = request.wallet.clone();
        let signing_wallet = Arc::clone(&wallet);
        // Held from before the decision commits until SIGNED does, so the
        // sweep or a cancel cannot act on the new row in between.
        let lock = self.signing_lock(&fresh_id);
        let held = lock.lock().await;
        let this = self.snapshot();
        let row = self
            .blocking(move |store| {
                store.write(|tx| {
                    if let Some(existing) = wd_store::by_request_id(tx, request.request_id.as_str())? {
                        if existing.request_hash != request_hash {
                            return Err(CustodyError::AlreadyExists(format!(
                                "request id {} was already used for a different withdrawal ({})",
                                request.request_id.as_str(),
                                existing.withdrawal_id
                            )));
                        }
                        return Ok(existing);
                    }
                    let now = unix_now();
                    let governance = gov_store::state(tx)?;
                    let active = this.active_policy(tx, governance.active_version)?;
                    let w = policy::Withdrawal {
                        id: &withdrawal_id,
                        wallet: request.wallet.as_str(),
                        key_label: &wallet.key_label,
                        intent: &intent,
                        intent_hash,
                        initiator: &request.initiator,
                    };
                    let (first, decision, window, windows) = match (&active, governance.frozen) {
                        (_, true) => (
                            FirstDecision::Deny,
                            frozen_decision(active.as_deref().map(|a| &a.policy)),
                            0,
                            Vec::new(),
                        ),
                        (None, false) => (FirstDecision::Deny, no_policy_decision(), 0, Vec::new()),
                        (Some(active), false) => {
                            let mut cache = this.usage.lock().unwrap_or_else(PoisonError::into_inner);
                            let usage = usage(&mut cache, store, tx, &active.policy, &w, now)?;
                            let decision = policy::evaluate(&active.policy, &w, usage, &[], now);
                            let first = match decision.outcome {
                                Outcome::Allow => FirstDecision::Allow,
                                Outcome::Pending(_) => FirstDecision::Pending,
                                Outcome::Deny(_) => FirstDecision::Deny,
                            };
                            let counted = first == FirstDecision::Allow;
                            (
                                first,
                                record(&decision, active.policy.version),
                                active.policy.approval_window_secs,
                                window_usage(&active.policy, &w, usage, now, counted),
                            )
                        }
                    };
                    let state = State::initial(first);
                    let mut row = WithdrawalRow {
                        seq: 0,
                        withdrawal_id: withdrawal_id.clone(),
                        request_id: request.request_id.as_str().to_owned(),
                        request_hash,
                        wallet_id: request.wallet.as_str().to_owned(),
                        initiator: request.initiator.clone(),
                        chain,
                        unsigned_tx: unsigned,
                        intent: intent.to_json(),
                        intent_hash,
                        asset: intent.asset.symbol.clone(),
                        amount: intent.total_amount().to_string(),
                        state,
                        decision,
                        created_at: now,
                        expires_at: now.saturating_add(window),
                        counted_at: (state == State::Approved).then_some(now),
                        updated_at: now,
                        signed_tx: None,
                        signed_tx_hash: None,
                    };
                    row.seq = wd_store::insert(tx, &row)?;
                    audit_store::append(
                        tx,
                        now,
                        AuditEvent::WithdrawalCreated {
                            withdrawal_id: row.withdrawal_id.clone(),
                            request_id: row.request_id.clone(),
                            wallet_id: row.wallet_id.clone(),
                            initiator: row.initiator.clone(),
                            chain: row.chain.name().to_owned(),
                            unsigned_tx: row.unsigned_tx.clone(),
                            intent: intent.canonical_bytes(),
                            intent_hash,
                        },
                    )?;
                    audit_store::append(tx, now, decision_event(&row, windows))?;
                    if let Some(at) = row.counted_at {
                        let mut cache = this.usage.lock().unwrap_or_else(PoisonError::into_inner);
                        cache.counted(&row.wallet_id, &row.asset, at, intent.total_amount());
                    }
                    Ok(row)
                })
            })
            .await?;
        if row.withdrawal_id != fresh_id {
            drop(held);
            return self.finish(row).await;
        }
        crate::metrics::decided(row.state, &row.decision);
        self.announce(&row.withdrawal_id);
        // A new withdrawal has no votes. What is signed is parsed again from
        // the bytes just stored, as the sweep would, not from the request.
        let row = match row.state {
            State::Approved => {
                let stored = self.parse_for(&signing_wallet, decode_stored(&row)?)?;
                self.sign_locked(row, &wallet_id, &stored).await?
            }
            _ => row,
        };
        Ok(WithdrawalView {
            row,
            approvals: Vec::new(),
        })
    }

    /// Signs `row` if it is APPROVED, then returns the withdrawal with votes.
    async fn finish(&self, row: WithdrawalRow) -> Result<WithdrawalView, CustodyError> {
        let id = row.withdrawal_id.clone();
        if row.state == State::Approved {
            self.sign(&id).await?;
        }
        self.get(&id).await
    }

    /// Signs an APPROVED withdrawal: re-parses the stored transaction, signs
    /// its digests in the HSM, and commits SIGNED before anyone sees the
    /// signature. At most one signing runs per withdrawal; a withdrawal in any
    /// other state, or any withdrawal while custody is frozen, is left as is.
    pub async fn sign(&self, withdrawal_id: &str) -> Result<(), CustodyError> {
        let lock = self.signing_lock(withdrawal_id);
        let _held = lock.lock().await;
        let id = withdrawal_id.to_owned();
        let (row, frozen) = self
            .blocking(move |store| {
                store.read(|conn| {
                    let row = wd_store::by_id(conn, &id)?
                        .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                    Ok((row, gov_store::state(conn)?.frozen))
                })
            })
            .await?;
        if row.state != State::Approved || frozen {
            return Ok(());
        }
        let wallet_id = WalletId::parse(&row.wallet_id)
            .map_err(|e| CustodyError::Inconsistent(format!("stored wallet id: {e}")))?;
        let wallet = self.wallets.signable(&wallet_id)?;
        let parsed = self.parse_for(&wallet, decode_stored(&row)?)?;
        self.sign_locked(row, &wallet_id, &parsed).await.map(|_| ())
    }

    /// Signs `row`, an APPROVED withdrawal whose signing lock the caller
    /// holds, from `parsed`, its stored transaction; commits SIGNED with its
    /// log entry and returns the row as committed. A freeze that landed after
    /// the decision wins: the signature is dropped unreleased and the row
    /// stays APPROVED, for the sweep to sign once custody is unfrozen.
    async fn sign_locked(
        &self,
        row: WithdrawalRow,
        wallet_id: &WalletId,
        parsed: &ParsedTx,
    ) -> Result<WithdrawalRow, CustodyError> {
        // The lifecycle and the approved intent are checked before the HSM is touched.
        row.state.apply(Event::Signed)?;
        crate::failpoint::pause_if("before-sign").await;
        if self.frozen_hint.load(Ordering::SeqCst) {
            tracing::info!(withdrawal = %row.withdrawal_id, "custody is frozen; the withdrawal stays APPROVED");
            return Ok(row);
        }
        if parsed.intent().hash() != row.intent_hash {
            return Err(CustodyError::Inconsistent(format!(
                "withdrawal {} no longer parses to its approved intent",
                row.withdrawal_id
            )));
        }
        let (raw, tx_hash) = match parsed {
            ParsedTx::Ethereum(p) => {
                let signed = self.wallets.sign_ethereum(wallet_id, p).await?;
                (signed.raw, signed.hash.to_vec())
            }
            ParsedTx::Bitcoin(p) => {
                let signed = self.wallets.sign_bitcoin(wallet_id, p).await?;
                let txid: &[u8] = signed.txid.as_ref();
                (signed.raw, txid.to_vec())
            }
        };
        crate::failpoint::crash_if("after-sign-before-commit");
        crate::failpoint::pause_if("after-sign-before-commit").await;
        let id = row.withdrawal_id.clone();
        let committed = self
            .blocking(move |store| {
                store.write(|tx| {
                    if gov_store::state(tx)?.frozen {
                        return Ok(None);
                    }
                    let now = unix_now();
                    wd_store::set_signed(tx, &id, &raw, &tx_hash, now)?;
                    audit_store::append(
                        tx,
                        now,
                        AuditEvent::Signed {
                            withdrawal_id: id.clone(),
                            signed_tx: raw,
                            tx_hash,
                        },
                    )?;
                    let signed = wd_store::by_id(tx, &id)?
                        .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                    Ok(Some(signed))
                })
            })
            .await?;
        let Some(signed) = committed else {
            tracing::warn!(withdrawal = %row.withdrawal_id, "custody was frozen while signing; the signature was dropped and the withdrawal stays APPROVED");
            return Ok(row);
        };
        tracing::info!(withdrawal = %signed.withdrawal_id, wallet = %signed.wallet_id, "withdrawal signed");
        self.announce(&signed.withdrawal_id);
        Ok(signed)
    }

    /// Records a signed vote and re-evaluates the withdrawal in the same
    /// transaction. A met quorum signs it before this returns.
    pub async fn submit_approval(
        &self,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<WithdrawalView, CustodyError> {
        let parsed = ApprovalMessage::parse(&message)?;
        if parsed.service_id != self.service_id {
            return Err(ApprovalError::WrongService(parsed.service_id).into());
        }
        let current = self.get(&parsed.withdrawal_id).await?.row;
        let wallet_id = WalletId::parse(&current.wallet_id)
            .map_err(|e| CustodyError::Inconsistent(format!("stored wallet id: {e}")))?;
        // The loaded wallet, without a store read; a vote is still taken
        // while its key is not loaded (it is signed later).
        let wallet = match self.wallets.signable(&wallet_id) {
            Ok(loaded) => loaded,
            Err(_) => Arc::new(self.wallets.get(&wallet_id).await?),
        };
        let parsed_tx = self.parse_for(&wallet, decode_stored(&current)?)?;
        let intent = parsed_tx.intent().clone();
        // Held from before the vote commits until SIGNED does (see `create`).
        let lock = self.signing_lock(&parsed.withdrawal_id);
        let _held = lock.lock().await;
        let this = self.snapshot();
        let view = self
            .blocking(move |store| {
                store.write(|tx| {
                    let id = &parsed.withdrawal_id;
                    let row = wd_store::by_id(tx, id)?
                        .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                    let now = unix_now();
                    let governance = gov_store::state(tx)?;
                    let active = match governance.frozen {
                        true => None,
                        false => this.active_policy(tx, governance.active_version)?,
                    };
                    let mut approvals = stored_approvals(tx, id)?;
                    let ballot = vote::Ballot {
                        withdrawal_id: id,
                        state: Some(row.state),
                        window_ends_at: row.expires_at,
                        intent_hash: row.intent_hash,
                        initiator: &row.initiator,
                        votes: &approvals,
                    };
                    let custody = vote::Custody {
                        service_id: &this.service_id,
                        frozen: governance.frozen,
                        policy: active.as_ref().map(|a| &a.policy),
                        now,
                    };
                    let admitted =
                        vote::admit(&parsed, |key| parsed.verify(&signature, key), &ballot, &custody)
                            .map_err(|refusal| vote_refused(refusal, &row, &parsed.approver))?;
                    let approval = admitted.approval;
                    // A vote that no longer counts (it named a replaced
                    // policy, or expired) gives way to the fresh one.
                    if let Some(at) = admitted.replaces {
                        approvals.remove(at);
                        wd_store::delete_approval(tx, id, &approval.approver)?;
                    }
                    let Some(active) = active else {
                        return Err(CustodyError::Inconsistent(
                            "a vote was admitted with no policy".into(),
                        ));
                    };
                    let policy = &active.policy;
                    wd_store::insert_approval(
                        tx,
                        id,
                        &ApprovalRow {
                            approver: approval.approver.clone(),
                            vote: vote_name(approval.vote).to_owned(),
                            message: message.clone(),
                            signature: signature.clone(),
                            submitted_at: now,
                        },
                    )
                    .map_err(|e| match e {
                        StoreError::Conflict(_) => CustodyError::AlreadyExists(format!(
                            "{} already voted on withdrawal {id}",
                            approval.approver
                        )),
                        other => other.into(),
                    })?;
                    audit_store::append(
                        tx,
                        now,
                        AuditEvent::Vote {
                            withdrawal_id: id.clone(),
                            message: message.clone(),
                            signature: signature.clone(),
                        },
                    )?;
                    approvals.push(approval.clone());
                    let w = policy::Withdrawal {
                        id,
                        wallet: &row.wallet_id,
                        key_label: &wallet.key_label,
                        intent: &intent,
                        intent_hash: row.intent_hash,
                        initiator: &row.initiator,
                    };
                    let mut cache = this.usage.lock().unwrap_or_else(PoisonError::into_inner);
                    let usage = usage(&mut cache, store, tx, policy, &w, now)?;
                    let decision = policy::evaluate(policy, &w, usage, &approvals, now);
                    let stored = record(&decision, policy.version);
                    let (to, counted_at) = match &decision.outcome {
                        Outcome::Allow => (row.state.apply(Event::QuorumMet)?, Some(now)),
                        Outcome::Deny(DenyReason::Rejected { .. }) => (row.state.apply(Event::Reject)?, None),
                        Outcome::Deny(_) => (row.state.apply(Event::Deny)?, None),
                        Outcome::Pending(_) => (row.state, None),
                    };
                    wd_store::set_state(tx, id, row.state, to, &stored, counted_at, now)?;
                    let windows = window_usage(policy, &w, usage, now, counted_at.is_some());
                    let row = wd_store::by_id(tx, id)?
                        .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                    audit_store::append(tx, now, decision_event(&row, windows))?;
                    if let Some(at) = counted_at {
                        cache.counted(&row.wallet_id, &row.asset, at, intent.total_amount());
                    }
                    Ok(WithdrawalView {
                        approvals: wd_store::approvals(tx, id)?,
                        row,
                    })
                })
            })
            .await?;
        let WithdrawalView { row, approvals } = view;
        tracing::info!(withdrawal = %row.withdrawal_id, state = %row.state, "vote recorded");
        crate::metrics::decided(row.state, &row.decision);
        self.announce(&row.withdrawal_id);
        let row = match row.state {
            State::Approved => {
                crate::failpoint::crash_if("after-approval-commit");
                self.sign_locked(row, &wallet_id, &parsed_tx).await?
            }
            _ => row,
        };
        Ok(WithdrawalView { row, approvals })
    }

    /// Cancels a withdrawal that is not yet signed or decided.
    pub async fn cancel(&self, withdrawal_id: &str) -> Result<WithdrawalView, CustodyError> {
        // Holding the signing lock means a cancel never races a C_Sign.
        let lock = self.signing_lock(withdrawal_id);
        let _held = lock.lock().await;
        let id = withdrawal_id.to_owned();
        let usage_cache = Arc::clone(&self.usage);
        self.blocking(move |store| {
            store.write(|tx| {
                let row = wd_store::by_id(tx, &id)?.ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                let to = row.state.apply(Event::Cancel).map_err(|_| {
                    precondition(
                        "not_cancellable",
                        format!("withdrawal {id} is {}; only PENDING_APPROVAL or APPROVED withdrawals can be cancelled", row.state),
                    )
                })?;
                let mut decision = row.decision.clone();
                decision.reason_code = Some("cancelled".into());
                decision.reason = Some("cancelled by request".into());
                let now = unix_now();
                wd_store::set_state(tx, &id, row.state, to, &decision, None, now)?;
                audit_store::append(
                    tx,
                    now,
                    AuditEvent::Closed {
                        withdrawal_id: id.clone(),
                        state: to.name().to_owned(),
                    },
                )?;
                if row.counted_at.is_some() {
                    let mut cache = usage_cache.lock().unwrap_or_else(PoisonError::into_inner);
                    cache.forget(&row.wallet_id, &row.asset);
                }
                Ok(())
            })
        })
        .await?;
        self.announce(withdrawal_id);
        self.get(withdrawal_id).await
    }

    /// Expires every PENDING_APPROVAL withdrawal whose window has ended.
    /// Returns how many expired.
    pub async fn expire_due(&self) -> Result<usize, CustodyError> {
        let expired = self
            .blocking(|store| {
                store.write(|tx| {
                    let now = unix_now();
                    let ids = wd_store::ids_expired(tx, now)?;
                    for id in &ids {
                        let row =
                            wd_store::by_id(tx, id)?.ok_or_else(|| CustodyError::NotFound(id.clone()))?;
                        let to = row.state.apply(Event::WindowElapsed)?;
                        let mut decision = row.decision.clone();
                        decision.reason_code = Some("expired".into());
                        decision.reason = Some(format!("the approval window ended at {}", row.expires_at));
                        wd_store::set_state(tx, id, row.state, to, &decision, None, now)?;
                        audit_store::append(
                            tx,
                            now,
                            AuditEvent::Closed {
                                withdrawal_id: id.clone(),
                                state: to.name().to_owned(),
                            },
                        )?;
                    }
                    Ok(ids)
                })
            })
            .await?;
        for id in &expired {
            tracing::info!(withdrawal = %id, "approval window ended; withdrawal expired");
            self.announce(id);
        }
        Ok(expired.len())
    }

    /// Signs every APPROVED withdrawal: those a crash or an HSM outage left
    /// between approval and signing, and those held by a freeze. Returns how
    /// many it tried; failures are logged and retried on the next call.
    pub async fn resume(&self) -> Result<usize, CustodyError> {
        let ids = self
            .blocking(|store| store.read(|conn| Ok(wd_store::ids_in_state(conn, State::Approved)?)))
            .await?;
        for id in &ids {
            if let Err(e) = self.sign(id).await {
                tracing::warn!(withdrawal = %id, error = %e, "signing an approved withdrawal failed; will retry");
            }
        }
        Ok(ids.len())
    }

    /// One withdrawal with its votes.
    pub async fn get(&self, withdrawal_id: &str) -> Result<WithdrawalView, CustodyError> {
        let id = withdrawal_id.to_owned();
        self.blocking(move |store| {
            store.read(|conn| {
                let row = wd_store::by_id(conn, &id)?
                    .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                let approvals = wd_store::approvals(conn, &id)?;
                Ok(WithdrawalView { row, approvals })
            })
        })
        .await
    }

    /// Up to `limit` withdrawals after cursor `after`, optionally in one state.
    pub async fn list(
        &self,
        state: Option<State>,
        after: i64,
        limit: usize,
    ) -> Result<WithdrawalPage, CustodyError> {
        self.blocking(move |store| {
            store.read(|conn| {
                let rows = wd_store::page(conn, state, after, limit)?;
                let next_after = (rows.len() == limit)
                    .then(|| rows.last().map(|r| r.seq))
                    .flatten();
                let withdrawals = rows
                    .into_iter()
                    .map(|row| {
                        let approvals = wd_store::approvals(conn, &row.withdrawal_id)?;
                        Ok(WithdrawalView { row, approvals })
                    })
                    .collect::<Result<_, CustodyError>>()?;
                Ok(WithdrawalPage {
                    withdrawals,
                    next_after,
                })
            })
        })
        .await
    }

    fn parse_for(&self, wallet: &Wallet, tx: UnsignedTx) -> Result<ParsedTx, CustodyError> {
        match tx {
            UnsignedTx::Ethereum(tx) => {
                let from = custos_core::address::ethereum_address(&wallet.public_key);
                Ok(ParsedTx::Ethereum(ethereum::parse(
                    tx,
                    &self.chains.ethereum,
                    from,
                )?))
            }
            UnsignedTx::Bitcoin(psbt) => {
                let key = custos_core::address::bitcoin_public_key(&wallet.public_key);
                Ok(ParsedTx::Bitcoin(bitcoin_chain::parse(
                    psbt,
                    self.chains.bitcoin_network,
                    &key,
                )?))
            }
        }
    }

    fn wallet_missing_or_unusable(&self, id: &WalletId, error: WalletError) -> CustodyError {
        match self.wallets.exists(id) {
            Ok(false) => WalletError::NotFound(id.as_str().to_owned()).into(),
            _ => error.into(),
        }
    }

    fn signing_lock(&self, withdrawal_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.signing.lock().unwrap_or_else(PoisonError::into_inner);
        // Drop locks nobody holds, so the map stays as small as the work in flight.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        Arc::clone(locks.entry(withdrawal_id.to_owned()).or_default())
    }

    fn announce(&self, withdrawal_id: &str) {
        // No subscriber is fine: nobody is watching.
        let _ = self.updates.send(withdrawal_id.to_owned());
    }

    /// What the blocking closures need, without borrowing `self` across threads.
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            service_id: self.service_id.clone(),
            policies: self
                .policies
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            usage: Arc::clone(&self.usage),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, CustodyError> + Send + 'static,
    ) -> Result<T, CustodyError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| CustodyError::Worker)?
    }
}

/// Policies and ids the store closures read.
struct Snapshot {
    service_id: String,
    policies: HashMap<u64, Arc<ActivePolicy>>,
    usage: Arc<Mutex<UsageCache>>,
}

impl Snapshot {
    /// The active policy, from the cache or (after a concurrent activation)
    /// rebuilt from the store.
    fn active_policy(
        &self,
        conn: &rusqlite::Connection,
        version: Option<u64>,
    ) -> Result<Option<Arc<ActivePolicy>>, CustodyError> {
        let Some(version) = version else { return Ok(None) };
        if let Some(active) = self.policies.get(&version) {
            return Ok(Some(Arc::clone(active)));
        }
        governance::load_version(conn, version).map(|p| Some(Arc::new(p)))
    }
}

/// The client's error for a refused vote: the rule [`vote::admit`] names,
/// in the words and codes custody has always used.
fn vote_refused(refusal: vote::Refusal, row: &WithdrawalRow, approver: &str) -> CustodyError {
    let id = &row.withdrawal_id;
    match refusal {
        vote::Refusal::WrongService { named } => ApprovalError::WrongService(named).into(),
        vote::Refusal::WrongWithdrawal { named } => CustodyError::InvalidArgument {
            field: "message.withdrawal_id".into(),
            reason: format!("is {named}, but the vote was submitted for withdrawal {id}"),
        },
        vote::Refusal::NotPending { .. } => precondition(
            "not_pending",
            format!("withdrawal {id} is {}; it takes no more votes", row.state),
        ),
        vote::Refusal::WindowEnded { at } => precondition(
            "approval_window_ended",
            format!("withdrawal {id}'s approval window ended at {at}"),
        ),
        vote::Refusal::Frozen => precondition("frozen", "custody is frozen; no votes are taken"),
        vote::Refusal::NoPolicy => precondition("no_policy", "no policy is active"),
        vote::Refusal::UnknownApprover { approver, .. } => ApprovalError::UnknownApprover(approver).into(),
        vote::Refusal::BadSignature(e) => e.into(),
        vote::Refusal::WrongIntent { named, actual } => CustodyError::InvalidArgument {
            field: "message.intent_hash".into(),
            reason: format!(
                "is {}, but withdrawal {id}'s intent hash is {}; recompute it from the transaction",
                hex::encode(named),
                hex::encode(actual)
            ),
        },
        vote::Refusal::StalePolicy {
            named,
            version,
            active,
        } => precondition(
            "stale_policy",
            format!(
                "the approval names policy {}, but the active policy is version {version} ({}); sign again under it",
                hex::encode(named),
                hex::encode(active)
            ),
        ),
        vote::Refusal::Expired { at } => {
            precondition("approval_expired", format!("the approval expired at {at}"))
        }
        vote::Refusal::Initiator => CustodyError::PermissionDenied(format!(
            "{approver} initiated withdrawal {id} and cannot vote on it"
        )),
        vote::Refusal::AlreadyCounted => {
            CustodyError::AlreadyExists(format!("{approver} already voted on withdrawal {id}"))
        }
    }
}

/// Every stored vote on a withdrawal, as the policy core counts them. Each
/// was verified when stored; they are parsed again from the signed bytes.
fn stored_approvals(
    conn: &rusqlite::Connection,
    withdrawal_id: &str,
) -> Result<Vec<policy::Approval>, CustodyError> {
    wd_store::approvals(conn, withdrawal_id)?
        .iter()
        .map(|a| {
            ApprovalMessage::parse(&a.message)
                .map(|m| m.to_approval())
                .map_err(|e| CustodyError::Inconsistent(format!("stored approval: {e}")))
        })
        .collect()
}

/// Rolling usage of the withdrawal's wallet and asset over the policy's
/// longest window for them.
/// The rolling usage `evaluate` needs for `w`, from the cache (loaded
/// through the write transaction `conn` when missing).
fn usage<'c>(
    cache: &'c mut UsageCache,
    store: &Store,
    conn: &rusqlite::Connection,
    policy: &Policy,
    w: &policy::Withdrawal<'_>,
    now: u64,
) -> Result<&'c dyn RollingUsage, CustodyError> {
    static NONE: Usage = Usage { entries: Vec::new() };
    let longest = policy
        .limits
        .iter()
        .filter(|l| l.wallet == w.wallet && l.asset == w.intent.asset.symbol)
        .flat_map(|l| l.windows.iter().map(|win| win.seconds))
        .max();
    let Some(longest) = longest else {
        return Ok(&NONE);
    };
    Ok(cache.list(store, conn, w.wallet, &w.intent.asset.symbol, now, longest)?)
}

/// The audit entry of a withdrawal's latest decision.
fn decision_event(row: &WithdrawalRow, usage: Vec<WindowUsage>) -> AuditEvent {
    let d = &row.decision;
    // The log writes all zeros when no policy was active.
    let policy_hash = d.policy_hash.unwrap_or([0u8; 32]);
    AuditEvent::Decision {
        withdrawal_id: row.withdrawal_id.clone(),
        policy_hash,
        policy_version: d.policy_version,
        state: row.state.name().to_owned(),
        rule: d.rule.clone().unwrap_or_default(),
        reason_code: d.reason_code.clone().unwrap_or_default(),
        reason: d.reason.clone().unwrap_or_default(),
        counted_approvers: d.counted_approvers.clone(),
        usage,
    }
}

fn vote_name(vote: Vote) -> &'static str {
    match vote {
        Vote::Approve => "APPROVE",
        Vote::Reject => "REJECT",
    }
}

/// Decodes a stored transaction again.
fn decode_stored(row: &WithdrawalRow) -> Result<UnsignedTx, CustodyError> {
    UnsignedTx::decode(row.chain, &row.unsigned_tx)
        .map_err(|e| CustodyError::Inconsistent(format!("stored transaction no longer decodes: {e}")))
}

/// SHA-256 over everything a request asks for: a retry with the same request
/// id must match it exactly.
fn request_hash(request: &NewWithdrawal, chain: Chain, unsigned: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(REQUEST_DOMAIN);
    for part in [
        request.wallet.as_str().as_bytes(),
        request.initiator.as_bytes(),
        chain.name().as_bytes(),
        unsigned,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn new_withdrawal_id() -> Result<String, CustodyError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| CustodyError::Worker)?;
    Ok(format!("wd_{}", hex::encode(bytes)))
}
