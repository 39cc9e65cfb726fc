//! Votes: a signed approval or rejection is admitted by
//! [`custos_core::vote::admit`] inside the transaction that stores it, and
//! the withdrawal is evaluated again in that same transaction; a met quorum
//! is signed before the vote's reply.

use custos_core::vote;

use super::*;

impl Custody {
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
        let (view, fence) = self
            .blocking(move |store| {
                store.write(|tx| {
                    let id = &parsed.withdrawal_id;
                    let row = wd_store::by_id(tx, id)?
                        .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                    let now = unix_now();
                    let governance = gov_store::state(tx)?;
                    this.saw_freeze(governance.frozen);
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
                    let fence = match row.state {
                        State::Approved => Some(claim_new(store, tx, id, now)?),
                        _ => None,
                    };
                    if let Some(at) = counted_at {
                        cache.counted(tx, &row.wallet_id, &row.asset, at, intent.total_amount());
                    }
                    let view = WithdrawalView {
                        approvals: wd_store::approvals(tx, id)?,
                        row,
                    };
                    Ok((view, fence))
                })
            })
            .await?;
        let WithdrawalView { row, approvals } = view;
        tracing::info!(withdrawal = %row.withdrawal_id, state = %row.state, "vote recorded");
        crate::metrics::decided(row.state, &row.decision);
        self.announce(&row.withdrawal_id);
        let row = match fence {
            Some(fence) => {
                crate::failpoint::crash_if("after-approval-commit");
                self.sign_locked(row, &wallet_id, &parsed_tx, fence).await?
            }
            None => row,
        };
        Ok(WithdrawalView { row, approvals })
    }
}

/// The client's error for a refused vote: the rule [`vote::admit`] names,
/// in the words and codes custody has always used.
pub(super) fn vote_refused(refusal: vote::Refusal, row: &WithdrawalRow, approver: &str) -> CustodyError {
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
pub(super) fn stored_approvals(
    conn: crate::store::sql::Conn<'_>,
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

pub(super) fn vote_name(vote: Vote) -> &'static str {
    match vote {
        Vote::Approve => "APPROVE",
        Vote::Reject => "REJECT",
    }
}
