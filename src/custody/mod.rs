//! The custody engine: the only path from a withdrawal request to a signature.
//!
//! It ties the pure pieces to durable state and the HSM:
//! - a request is parsed against its wallet ([`custos_core::chain`]) before anything
//!   is stored; a malformed one changes nothing;
//! - the request id is reserved, the rolling usage read, the policy evaluated
//!   ([`custos_core::policy::evaluate()`]) and the outcome stored in ONE
//!   `BEGIN IMMEDIATE` transaction, so concurrent requests can never push a
//!   limit past its cap, and one request id is one withdrawal;
//! - votes are verified against the active policy's roster and bound to the
//!   withdrawal, its intent hash and the active policy hash, then the
//!   withdrawal is re-evaluated in the same transaction as the vote;
//! - APPROVED withdrawals are signed one at a time per withdrawal (the
//!   signing lock in this process, and across instances the signing lease
//!   in the store, claimed in the transaction that approves or before the
//!   sweep signs, and checked by its fence when SIGNED commits), by
//!   `create` or the deciding vote right after their decision commits, or
//!   by the sweep ([`Custody::sign`]); always from the stored transaction
//!   re-parsed (never from anything a caller hands in), and the signature is
//!   released only after SIGNED is committed. A crash between approval and
//!   signing leaves an APPROVED row that [`Custody::resume`] signs on the
//!   next start, or that another instance signs once the dead one's lease
//!   is free.
//!
//! State moves only through [`custos_core::lifecycle::State::apply`]. Governance
//! (policy versions, freeze) is in [`governance`].
//!
//! One file per step: `create.rs` (a new withdrawal), `vote.rs` (a signed
//! vote), `sign.rs` (the HSM call and the SIGNED commit), `sweep.rs`
//! (cancel, expiry, and resuming APPROVED withdrawals), `governance.rs`, and
//! `usage.rs` (the rolling-usage cache). This file holds the engine's types,
//! reads, and the helpers the steps share.

mod create;
pub mod governance;
mod sign;
mod sweep;
mod usage;
mod vote;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub use governance::{ActivePolicy, GovernanceView, ProposalView};
use k256::sha2::{Digest, Sha256};
use tokio::sync::broadcast;

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
use usage::UsageCache;

/// Chain parameters.
#[derive(Debug, Clone)]
pub struct ChainConfig {
    /// The Bitcoin network addresses are derived for.
    pub bitcoin_network: bitcoin::Network,
    /// The Ethereum chain id and its token registry.
    pub ethereum: EthereumNetwork,
}

/// How long a signing lease lasts: from the claim to the SIGNED commit it
/// must outlast every HSM call of one signing. An instance that dies loses
/// its leases at once on PostgreSQL (its presence lock goes with its
/// connection); this bound frees the leases of one that hangs.
pub const SIGNING_LEASE_SECS: u64 = 120;

/// Longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Domain separator of the request hash that makes retries idempotent.
const REQUEST_DOMAIN: &[u8] = b"custos/request/v1";

/// Why a custody operation was refused or failed. Each variant says what the
/// client should know; server-side details stay in the wrapped errors, which
/// the API layer logs and does not send.
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
    /// The system's random source failed, so no withdrawal id could be drawn.
    #[error("no randomness for a new withdrawal id")]
    Randomness,
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
    /// the freeze itself. Every write that reads the freeze refreshes it,
    /// and on PostgreSQL every freeze or unfreeze another instance commits
    /// is announced to it at once (`Store::watch_freeze`).
    frozen_hint: Arc<AtomicBool>,
}

impl Custody {
    /// The engine over an opened store and wallet registry. `service_id`
    /// names this deployment in every approval and governance message.
    pub fn new(store: Arc<Store>, wallets: Arc<Wallets>, chains: ChainConfig, service_id: String) -> Self {
        let (updates, _) = broadcast::channel(1024);
        let frozen_hint = Arc::new(AtomicBool::new(false));
        store.watch_freeze(Arc::clone(&frozen_hint));
        Self {
            store,
            wallets,
            chains,
            service_id,
            policies: RwLock::new(HashMap::new()),
            updates,
            signing: Mutex::new(HashMap::new()),
            usage: Arc::new(Mutex::new(UsageCache::default())),
            frozen_hint,
        }
    }

    /// This deployment's service id.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }

    /// Ids of withdrawals as they change state; the API's `WatchWithdrawal` filters it.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.updates.subscribe()
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
            frozen_hint: Arc::clone(&self.frozen_hint),
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
    frozen_hint: Arc<AtomicBool>,
}

impl Snapshot {
    /// Records the freeze a write transaction read.
    fn saw_freeze(&self, frozen: bool) {
        self.frozen_hint.store(frozen, Ordering::SeqCst);
    }

    /// The active policy, from the cache or (after a concurrent activation)
    /// rebuilt from the store.
    fn active_policy(
        &self,
        conn: crate::store::sql::Conn<'_>,
        version: Option<u64>,
    ) -> Result<Option<Arc<ActivePolicy>>, CustodyError> {
        let Some(version) = version else { return Ok(None) };
        if let Some(active) = self.policies.get(&version) {
            return Ok(Some(Arc::clone(active)));
        }
        governance::load_version(conn, version).map(|p| Some(Arc::new(p)))
    }
}

/// Rolling usage of the withdrawal's wallet and asset over the policy's
/// longest window for them.
/// The rolling usage `evaluate` needs for `w`, from the cache (loaded
/// through the write transaction `conn` when missing).
fn usage<'c>(
    cache: &'c mut UsageCache,
    store: &Store,
    conn: crate::store::sql::Conn<'_>,
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

/// The signing lease of a withdrawal that was APPROVED in this transaction:
/// nobody can hold it yet.
fn claim_new(
    store: &Store,
    tx: crate::store::sql::Conn<'_>,
    withdrawal_id: &str,
    now: u64,
) -> Result<u64, CustodyError> {
    wd_store::claim_signing(
        tx,
        withdrawal_id,
        store.instance(),
        now,
        now.saturating_add(SIGNING_LEASE_SECS),
    )?
    .ok_or_else(|| {
        CustodyError::Inconsistent(format!(
            "withdrawal {withdrawal_id} was leased before it was approved"
        ))
    })
}

/// The audit entry of a withdrawal's latest decision.
fn decision_event(row: &WithdrawalRow, usage: Vec<WindowUsage>) -> AuditEvent {
    let d = &row.decision;
    let policy_hash = d.logged_policy_hash();
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

/// Decodes a stored transaction again.
fn decode_stored(row: &WithdrawalRow) -> Result<UnsignedTx, CustodyError> {
    UnsignedTx::decode(row.chain, &row.unsigned_tx)
        .map_err(|e| CustodyError::Inconsistent(format!("stored transaction no longer decodes: {e}")))
}
