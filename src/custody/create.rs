//! Creating a withdrawal: parse, reserve the request id, read the rolling
//! usage, evaluate and store the outcome in one transaction, then sign at
//! once if the policy allows it. A retry with the same request id returns
//! the stored withdrawal.

use super::*;

impl Custody {
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
        let (row, fence) = self
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
                        return Ok((existing, None));
                    }
                    let now = unix_now();
                    let governance = gov_store::state(tx)?;
                    this.saw_freeze(governance.frozen);
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
                    let fence = match row.state {
                        State::Approved => Some(claim_new(store, tx, &row.withdrawal_id, now)?),
                        _ => None,
                    };
                    if let Some(at) = row.counted_at {
                        let mut cache = this.usage.lock().unwrap_or_else(PoisonError::into_inner);
                        cache.counted(tx, &row.wallet_id, &row.asset, at, intent.total_amount());
                    }
                    Ok((row, fence))
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
        let row = match fence {
            Some(fence) => {
                let stored = self.parse_for(&signing_wallet, decode_stored(&row)?)?;
                self.sign_locked(row, &wallet_id, &stored, fence).await?
            }
            None => row,
        };
        Ok(WithdrawalView {
            row,
            approvals: Vec::new(),
        })
    }

    /// Signs `row` if it is APPROVED, then returns the withdrawal with votes.
    /// A retry that finds another instance signing it waits (up to
    /// [`RETRY_WAIT`]) for that signing to end, as the signing lock makes a
    /// retry on the same instance wait, so that every instance gives a retry
    /// the same answer.
    pub(super) async fn finish(&self, row: WithdrawalRow) -> Result<WithdrawalView, CustodyError> {
        let id = row.withdrawal_id.clone();
        if row.state != State::Approved {
            return self.get(&id).await;
        }
        self.sign(&id).await?;
        let deadline = tokio::time::Instant::now() + RETRY_WAIT;
        loop {
            let view = self.get(&id).await?;
            if view.row.state != State::Approved
                || self.frozen_hint.load(Ordering::SeqCst)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(view);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// How long a retry waits for another instance's signing of its withdrawal.
const RETRY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// SHA-256 over everything a request asks for: a retry with the same request
/// id must match it exactly.
pub(super) fn request_hash(request: &NewWithdrawal, chain: Chain, unsigned: &[u8]) -> [u8; 32] {
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

pub(super) fn new_withdrawal_id() -> Result<String, CustodyError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| CustodyError::Randomness)?;
    Ok(format!("wd_{}", hex::encode(bytes)))
}
