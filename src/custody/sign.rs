//! Signing an APPROVED withdrawal: under its signing lock in this process
//! and its signing lease in the store (so that one instance at a time asks
//! the HSM), from the stored transaction parsed again, with the freeze
//! checked before the HSM is asked and again in the transaction that commits
//! SIGNED. That transaction also checks the lease's fence: if another
//! instance took the lease over meanwhile, this signature is dropped. The
//! signature is released only after that commit.

use super::*;

impl Custody {
    /// Signs an APPROVED withdrawal: re-parses the stored transaction, signs
    /// its digests in the HSM, and commits SIGNED before anyone sees the
    /// signature. At most one signing runs per withdrawal, in this process and
    /// across instances; a withdrawal in any other state, one whose lease
    /// another live instance holds, or any withdrawal while custody is
    /// frozen, is left as is.
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
        // Another instance may have frozen or unfrozen custody: the hint
        // follows what the store says.
        self.frozen_hint.store(frozen, Ordering::SeqCst);
        if row.state != State::Approved || frozen {
            return Ok(());
        }
        let wallet_id = WalletId::parse(&row.wallet_id)
            .map_err(|e| CustodyError::Inconsistent(format!("stored wallet id: {e}")))?;
        let wallet = self.wallets.signable(&wallet_id)?;
        let parsed = self.parse_for(&wallet, decode_stored(&row)?)?;
        let id = row.withdrawal_id.clone();
        let fence = self
            .blocking(move |store| {
                store.write(|tx| {
                    let current = wd_store::by_id(tx, &id)?
                        .ok_or_else(|| CustodyError::NotFound(format!("withdrawal {id}")))?;
                    if current.state != State::Approved {
                        return Ok(None);
                    }
                    let now = unix_now();
                    Ok(wd_store::claim_signing(
                        tx,
                        &id,
                        store.instance(),
                        now,
                        now.saturating_add(SIGNING_LEASE_SECS),
                    )?)
                })
            })
            .await?;
        let Some(fence) = fence else {
            tracing::debug!(withdrawal = %row.withdrawal_id, "another instance holds the signing lease");
            return Ok(());
        };
        self.sign_locked(row, &wallet_id, &parsed, fence)
            .await
            .map(|_| ())
    }

    /// Signs `row`, an APPROVED withdrawal whose signing lock the caller
    /// holds and whose signing lease it claimed with `fence`, from `parsed`,
    /// its stored transaction; commits SIGNED with its log entry and returns
    /// the row as committed. A freeze that landed after the decision wins:
    /// the signature is dropped unreleased and the row stays APPROVED, for
    /// the sweep to sign once custody is unfrozen. So does a lease another
    /// instance took over: that instance signs it.
    pub(super) async fn sign_locked(
        &self,
        row: WithdrawalRow,
        wallet_id: &WalletId,
        parsed: &ParsedTx,
        fence: u64,
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
                        return Ok(Err("custody was frozen while signing"));
                    }
                    if !wd_store::holds_signing(tx, &id, store.instance(), fence)? {
                        return Ok(Err("another instance took the signing lease over"));
                    }
                    let now = unix_now();
                    let signed = wd_store::set_signed(tx, &id, &raw, &tx_hash, now)?;
                    audit_store::append(
                        tx,
                        now,
                        AuditEvent::Signed {
                            withdrawal_id: id.clone(),
                            signed_tx: raw,
                            tx_hash,
                        },
                    )?;
                    Ok(Ok(signed))
                })
            })
            .await?;
        let signed = match committed {
            Ok(signed) => signed,
            Err(why) => {
                tracing::warn!(withdrawal = %row.withdrawal_id, "{why}; the signature was dropped and the withdrawal stays APPROVED");
                return Ok(row);
            }
        };
        tracing::info!(withdrawal = %signed.withdrawal_id, wallet = %signed.wallet_id, "withdrawal signed");
        self.announce(&signed.withdrawal_id);
        Ok(signed)
    }
}
