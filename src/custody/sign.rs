//! Signing an APPROVED withdrawal: under its signing lock, from the stored
//! transaction parsed again, with the freeze checked before the HSM is asked
//! and again in the transaction that commits SIGNED. The signature is
//! released only after that commit.

use super::*;

impl Custody {
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
    pub(super) async fn sign_locked(
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
}
