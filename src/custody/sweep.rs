//! What runs after the decision: cancelling, expiring ended approval
//! windows, and signing APPROVED withdrawals that a crash, an HSM outage or
//! a freeze left unsigned (the sweep custosd runs every second).

use super::*;

impl Custody {
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
}
