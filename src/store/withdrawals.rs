//! Withdrawal and approval rows.
//!
//! `request_id` and `withdrawal_id` are UNIQUE, so one request id can never
//! become two withdrawals, whatever races in code. A withdrawal counts against
//! rolling limits exactly while `counted_at` is set, and a CHECK ties that to
//! the APPROVED and SIGNED states; the usage index serves the limit query.
//! On PostgreSQL, every write that counts or uncounts a withdrawal also
//! bumps the usage epoch of its wallet and asset, in the same transaction:
//! the check that keeps an instance's usage cache exact while others write;
//! and signing takes a lease. SQLite has one process per file, so it keeps
//! neither: its cache and its signing lock see everything already.
//! State changes are conditional on the state the caller read
//! ([`set_state`]), so two writers can never both move one withdrawal.

use super::governance::{to_i64, to_u64};
use super::sql::{Backend, Conn, Row};
use super::{Instance, StoreError};
use custos_core::chain::Chain;
use custos_core::lifecycle::State;
use custos_core::policy::record::DecisionRecord;

/// A withdrawal as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithdrawalRow {
    /// Insertion order, for paging.
    pub seq: i64,
    /// `wd_` and 32 hex digits.
    pub withdrawal_id: String,
    /// The caller's idempotency key.
    pub request_id: String,
    /// SHA-256 over what the request asked for; a retry must match it.
    pub request_hash: [u8; 32],
    /// Wallet id.
    pub wallet_id: String,
    /// Who submitted it.
    pub initiator: String,
    /// The chain the transaction is for.
    pub chain: Chain,
    /// The canonical unsigned encoding (Ethereum) or the PSBT (Bitcoin).
    pub unsigned_tx: Vec<u8>,
    /// The intent as JSON, for display; a row whose JSON does not parse is
    /// refused as corrupt when read.
    pub intent: serde_json::Value,
    /// The intent hash approvals sign.
    pub intent_hash: [u8; 32],
    /// Asset symbol.
    pub asset: String,
    /// Total amount in base units, decimal.
    pub amount: String,
    /// Lifecycle state.
    pub state: State,
    /// The latest decision.
    pub decision: DecisionRecord,
    /// Unix seconds.
    pub created_at: u64,
    /// End of the approval window, unix seconds.
    pub expires_at: u64,
    /// When it started counting against limits (APPROVED and SIGNED only).
    pub counted_at: Option<u64>,
    /// Unix seconds of the last change.
    pub updated_at: u64,
    /// The broadcastable signed transaction, once SIGNED.
    pub signed_tx: Option<Vec<u8>>,
    /// Its transaction hash (Ethereum) or txid (Bitcoin).
    pub signed_tx_hash: Option<Vec<u8>>,
}

/// A stored vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    /// Approver id.
    pub approver: String,
    /// `APPROVE` or `REJECT`.
    pub vote: String,
    /// The signed approval message, verbatim.
    pub message: Vec<u8>,
    /// 64-byte `r || s`.
    pub signature: Vec<u8>,
    /// Unix seconds.
    pub submitted_at: u64,
}

/// Inserts a new withdrawal; [`StoreError::Conflict`] if its request id (or id) exists.
pub fn insert(conn: Conn<'_>, row: &WithdrawalRow) -> Result<i64, StoreError> {
    let decision = decision_json(&row.decision)?;
    let inserted = conn.query_one(
        "INSERT INTO withdrawals (withdrawal_id, request_id, request_hash, wallet_id, initiator, chain,
            unsigned_tx, intent, intent_hash, asset, amount, state, decision, created_at, expires_at,
            counted_at, updated_at, signed_tx, signed_tx_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, NULL, NULL)
         RETURNING seq",
        &[
            &row.withdrawal_id,
            &row.request_id,
            &row.request_hash.as_slice(),
            &row.wallet_id,
            &row.initiator,
            &row.chain.name(),
            &row.unsigned_tx,
            &row.intent.to_string(),
            &row.intent_hash.as_slice(),
            &row.asset,
            &row.amount,
            &row.state.name(),
            &decision,
            &to_i64(row.created_at),
            &to_i64(row.expires_at),
            &row.counted_at.map(to_i64),
            &to_i64(row.updated_at),
        ],
        |r| r.get::<i64>(0),
    );
    let seq = super::conflict_as(inserted, "withdrawal")?;
    if row.counted_at.is_some() {
        bump_usage_epoch(conn, &row.wallet_id, &row.asset)?;
    }
    Ok(seq)
}

/// The withdrawal with this id.
pub fn by_id(conn: Conn<'_>, withdrawal_id: &str) -> Result<Option<WithdrawalRow>, StoreError> {
    conn.query_opt(
        &format!("{SELECT} WHERE withdrawal_id = ?1"),
        &[&withdrawal_id],
        row,
    )
}

/// The withdrawal created for this request id.
pub fn by_request_id(conn: Conn<'_>, request_id: &str) -> Result<Option<WithdrawalRow>, StoreError> {
    conn.query_opt(&format!("{SELECT} WHERE request_id = ?1"), &[&request_id], row)
}

/// Up to `limit` withdrawals after cursor `after`, optionally in one state.
pub fn page(
    conn: Conn<'_>,
    state: Option<State>,
    after: i64,
    limit: usize,
) -> Result<Vec<WithdrawalRow>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    match state {
        Some(state) => conn.query(
            &format!("{SELECT} WHERE state = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"),
            &[&state.name(), &after, &limit],
            row,
        ),
        None => conn.query(
            &format!("{SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
            &[&after, &limit],
            row,
        ),
    }
}

/// Ids of withdrawals in `state`, oldest first.
pub fn ids_in_state(conn: Conn<'_>, state: State) -> Result<Vec<String>, StoreError> {
    conn.query(
        "SELECT withdrawal_id FROM withdrawals WHERE state = ?1 ORDER BY seq",
        &[&state.name()],
        |r| r.get(0),
    )
}

/// Ids of PENDING_APPROVAL withdrawals whose window ended at or before `now`.
pub fn ids_expired(conn: Conn<'_>, now: u64) -> Result<Vec<String>, StoreError> {
    conn.query(
        "SELECT withdrawal_id FROM withdrawals WHERE state = 'PENDING_APPROVAL' AND expires_at <= ?1 ORDER BY seq",
        &[&to_i64(now)],
        |r| r.get(0),
    )
}

/// Moves a withdrawal from `from` to `to`, recording the decision and
/// whether it counts against limits from `counted_at`. Fails with
/// [`StoreError::Conflict`] if the stored state is no longer `from`.
pub fn set_state(
    conn: Conn<'_>,
    withdrawal_id: &str,
    from: State,
    to: State,
    decision: &DecisionRecord,
    counted_at: Option<u64>,
    now: u64,
) -> Result<(), StoreError> {
    // The row's wallet and asset come back with the update: a change of
    // the counted set bumps their usage epoch without another read.
    let updated: Option<(String, String)> = conn.query_opt(
        "UPDATE withdrawals SET state = ?3, decision = ?4, counted_at = ?5, updated_at = ?6
         WHERE withdrawal_id = ?1 AND state = ?2
         RETURNING wallet_id, asset",
        &[
            &withdrawal_id,
            &from.name(),
            &to.name(),
            &decision_json(decision)?,
            &counted_at.map(to_i64),
            &to_i64(now),
        ],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Some((wallet, asset)) = updated else {
        return Err(StoreError::Conflict("state change (the withdrawal moved on)"));
    };
    if counts(from) != counted_at.is_some() {
        bump_usage_epoch(conn, &wallet, &asset)?;
    }
    Ok(())
}

/// Whether a withdrawal in `state` counts against rolling limits (the
/// schema's CHECK ties `counted_at` to these states).
fn counts(state: State) -> bool {
    matches!(state, State::Approved | State::Signed)
}

/// How many times the counted withdrawals of this wallet and asset changed
/// (0 if never): a usage cache built at one epoch is stale at any other.
/// Always 0 on SQLite, where the one process's cache sees every change.
pub fn usage_epoch(conn: Conn<'_>, wallet_id: &str, asset: &str) -> Result<u64, StoreError> {
    if conn.backend() == Backend::Sqlite {
        // One process writes the file: its cache sees every change itself.
        return Ok(0);
    }
    let epoch: Option<i64> = conn.query_opt(
        "SELECT epoch FROM usage_epochs WHERE wallet_id = ?1 AND asset = ?2",
        &[&wallet_id, &asset],
        |r| r.get(0),
    )?;
    Ok(epoch.map_or(0, to_u64))
}

/// How far one change of a counted set moves its usage epoch: 1 on
/// PostgreSQL, 0 on SQLite, which keeps no epochs.
pub fn usage_epoch_step(conn: Conn<'_>) -> u64 {
    match conn.backend() {
        Backend::Sqlite => 0,
        Backend::Postgres => 1,
    }
}

/// Records one change of the counted set of this wallet and asset. Every
/// write that counts or uncounts a withdrawal calls it, in its transaction;
/// nothing waits for its answer (it is deferred, see [`Conn::defer`]).
fn bump_usage_epoch(conn: Conn<'_>, wallet_id: &str, asset: &str) -> Result<(), StoreError> {
    if conn.backend() == Backend::Sqlite {
        return Ok(());
    }
    conn.defer(
        "INSERT INTO usage_epochs (wallet_id, asset, epoch) VALUES (?1, ?2, 1)
         ON CONFLICT (wallet_id, asset) DO UPDATE SET epoch = usage_epochs.epoch + 1",
        vec![Box::new(wallet_id.to_owned()), Box::new(asset.to_owned())],
    )
}

/// Records the signed transaction: APPROVED to SIGNED, keeping `counted_at`.
/// Returns the row as updated.
pub fn set_signed(
    conn: Conn<'_>,
    withdrawal_id: &str,
    signed_tx: &[u8],
    signed_tx_hash: &[u8],
    now: u64,
) -> Result<WithdrawalRow, StoreError> {
    let updated = conn.query_opt(
        &format!(
            "UPDATE withdrawals SET state = 'SIGNED', signed_tx = ?2, signed_tx_hash = ?3, updated_at = ?4
             WHERE withdrawal_id = ?1 AND state = 'APPROVED' RETURNING {COLUMNS}"
        ),
        &[&withdrawal_id, &signed_tx, &signed_tx_hash, &to_i64(now)],
        row,
    )?;
    updated.ok_or(StoreError::Conflict("signature (the withdrawal is not APPROVED)"))
}

/// The signing leases of the withdrawals still APPROVED (being signed, or
/// left by a crash or an outage), by whose they are at `now`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LeaseCounts {
    /// Unexpired, held by this instance.
    pub held_here: u64,
    /// Unexpired, held by another instance.
    pub held_elsewhere: u64,
    /// Expired: free for any instance's sweep.
    pub expired: u64,
    /// Never leased.
    pub unleased: u64,
}

/// Counts [`LeaseCounts`] for `me` at `now`.
pub fn lease_counts(conn: Conn<'_>, me: &Instance, now: u64) -> Result<LeaseCounts, StoreError> {
    let rows: Vec<(Option<String>, Option<i64>)> = conn.query(
        "SELECT l.owner, l.until FROM withdrawals w
         LEFT JOIN signing_leases l ON l.withdrawal_id = w.withdrawal_id
         WHERE w.state = 'APPROVED'",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut counts = LeaseCounts::default();
    for (owner, until) in rows {
        let slot = match (owner, until) {
            (Some(_), Some(until)) if to_u64(until) <= now => &mut counts.expired,
            (Some(owner), Some(_)) if owner == me.id => &mut counts.held_here,
            (Some(_), Some(_)) => &mut counts.held_elsewhere,
            _ => &mut counts.unleased,
        };
        *slot += 1;
    }
    Ok(counts)
}

/// Takes the signing lease of `withdrawal_id` for `me` until `until`: the
/// right to ask the HSM for its signature. Returns the lease's fence, which
/// the SIGNED commit must still find ([`holds_signing`]), or `None` while
/// another live instance holds an unexpired lease. A lease is free when it
/// is this instance's own (a restart on SQLite), when it expired, or when
/// its owner's presence lock is gone (the owner died or lost the database).
/// Call it in a write transaction, on a withdrawal the caller just read as
/// APPROVED. On SQLite, where one process owns the file, nothing is stored
/// and the lease is always this process's (fence 1).
pub fn claim_signing(
    conn: Conn<'_>,
    withdrawal_id: &str,
    me: &Instance,
    now: u64,
    until: u64,
) -> Result<Option<u64>, StoreError> {
    if conn.backend() == Backend::Sqlite {
        // The file is the instance, and the process's signing lock already
        // keeps its own tasks apart: a lease would say nothing more.
        return Ok(Some(1));
    }
    // One statement: a new lease, or one taken over when it is this
    // instance's own, expired, or its owner's presence lock can be taken
    // (the owner is gone); no row when another live owner holds it.
    let fence: Option<i64> = conn.query_opt(
        "INSERT INTO signing_leases AS l (withdrawal_id, owner, owner_key, fence, until) VALUES (?1, ?2, ?3, 1, ?4)
         ON CONFLICT (withdrawal_id) DO UPDATE
         SET owner = excluded.owner, owner_key = excluded.owner_key, fence = l.fence + 1, until = excluded.until
         WHERE l.owner = excluded.owner OR l.until <= ?5 OR pg_try_advisory_xact_lock(l.owner_key)
         RETURNING l.fence",
        &[&withdrawal_id, &me.id, &me.presence_key, &to_i64(until), &to_i64(now)],
        |r| r.get(0),
    )?;
    Ok(fence.map(to_u64))
}

/// Whether `me` still holds the signing lease of `withdrawal_id` with
/// `fence`: nobody took it over since it was claimed.
pub fn holds_signing(
    conn: Conn<'_>,
    withdrawal_id: &str,
    me: &Instance,
    fence: u64,
) -> Result<bool, StoreError> {
    if conn.backend() == Backend::Sqlite {
        return Ok(true);
    }
    let held: Option<(String, i64)> = conn.query_opt(
        "SELECT owner, fence FROM signing_leases WHERE withdrawal_id = ?1",
        &[&withdrawal_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(held.is_some_and(|(owner, held_fence)| owner == me.id && to_u64(held_fence) == fence))
}

/// `(counted_at, amount)` of withdrawals of this wallet and asset counted
/// after `since`: the rolling usage the policy core checks.
pub fn usage(
    conn: Conn<'_>,
    wallet_id: &str,
    asset: &str,
    since: u64,
) -> Result<Vec<(u64, String)>, StoreError> {
    conn.query(
        "SELECT counted_at, amount FROM withdrawals
         WHERE wallet_id = ?1 AND asset = ?2 AND counted_at IS NOT NULL AND counted_at > ?3",
        &[&wallet_id, &asset, &to_i64(since)],
        |r| Ok((to_u64(r.get(0)?), r.get(1)?)),
    )
}

/// Records a vote; [`StoreError::Conflict`] if this approver already voted
/// on this withdrawal or the exact message was submitted before.
pub fn insert_approval(
    conn: Conn<'_>,
    withdrawal_id: &str,
    approval: &ApprovalRow,
) -> Result<(), StoreError> {
    let inserted = conn.execute(
        "INSERT INTO approvals (withdrawal_id, approver, vote, message, signature, submitted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[
            &withdrawal_id,
            &approval.approver,
            &approval.vote,
            &approval.message,
            &approval.signature,
            &to_i64(approval.submitted_at),
        ],
    );
    super::conflict_as(inserted, "vote by this approver").map(|_| ())
}

/// Removes an approver's vote, so that a fresh one can replace a vote that
/// no longer counts.
pub fn delete_approval(conn: Conn<'_>, withdrawal_id: &str, approver: &str) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM approvals WHERE withdrawal_id = ?1 AND approver = ?2",
        &[&withdrawal_id, &approver],
    )?;
    Ok(())
}

/// Votes on a withdrawal, in submission order.
pub fn approvals(conn: Conn<'_>, withdrawal_id: &str) -> Result<Vec<ApprovalRow>, StoreError> {
    // Ties in submission time go in insertion order: SQLite's rowid, a
    // PostgreSQL identity column.
    let sql = match conn.backend() {
        Backend::Sqlite => {
            "SELECT approver, vote, message, signature, submitted_at FROM approvals
         WHERE withdrawal_id = ?1 ORDER BY submitted_at, rowid"
        }
        Backend::Postgres => {
            "SELECT approver, vote, message, signature, submitted_at FROM approvals
         WHERE withdrawal_id = ?1 ORDER BY submitted_at, seq"
        }
    };
    conn.query(sql, &[&withdrawal_id], |r| {
        Ok(ApprovalRow {
            approver: r.get(0)?,
            vote: r.get(1)?,
            message: r.get(2)?,
            signature: r.get(3)?,
            submitted_at: to_u64(r.get(4)?),
        })
    })
}

/// A withdrawal row's columns, in the order [`row`] reads them.
macro_rules! columns {
    () => {
        "seq, withdrawal_id, request_id, request_hash, wallet_id, initiator, chain, unsigned_tx,
    intent, intent_hash, asset, amount, state, decision, created_at, expires_at, counted_at, updated_at,
    signed_tx, signed_tx_hash"
    };
}
const COLUMNS: &str = columns!();
const SELECT: &str = concat!("SELECT ", columns!(), " FROM withdrawals");

fn decision_json(decision: &DecisionRecord) -> Result<String, StoreError> {
    serde_json::to_string(decision).map_err(|e| StoreError::Corrupt {
        table: "withdrawals",
        reason: format!("decision: {e}"),
    })
}

fn row(r: &Row<'_, '_>) -> Result<WithdrawalRow, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        table: "withdrawals",
        reason,
    };
    let state_name: String = r.get(12)?;
    let Some(state) = State::from_name(&state_name) else {
        return Err(corrupt(format!("unknown state {state_name}")));
    };
    let decision: String = r.get(13)?;
    let decision = match serde_json::from_str(&decision) {
        Ok(d) => d,
        Err(e) => return Err(corrupt(format!("decision: {e}"))),
    };
    let chain_name: String = r.get(6)?;
    let Some(chain) = Chain::from_name(&chain_name) else {
        return Err(corrupt(format!("unknown chain {chain_name:?}")));
    };
    let intent: String = r.get(8)?;
    let intent = match serde_json::from_str(&intent) {
        Ok(intent) => intent,
        Err(e) => return Err(corrupt(format!("intent: {e}"))),
    };
    let hash32 = |v: Vec<u8>| <[u8; 32]>::try_from(v);
    let (Ok(request_hash), Ok(intent_hash)) = (hash32(r.get(3)?), hash32(r.get(9)?)) else {
        return Err(corrupt("hash is not 32 bytes".into()));
    };
    Ok(WithdrawalRow {
        seq: r.get(0)?,
        withdrawal_id: r.get(1)?,
        request_id: r.get(2)?,
        request_hash,
        wallet_id: r.get(4)?,
        initiator: r.get(5)?,
        chain,
        unsigned_tx: r.get(7)?,
        intent,
        intent_hash,
        asset: r.get(10)?,
        amount: r.get(11)?,
        state,
        decision,
        created_at: to_u64(r.get(14)?),
        expires_at: to_u64(r.get(15)?),
        counted_at: r.get::<Option<i64>>(16)?.map(to_u64),
        updated_at: to_u64(r.get(17)?),
        signed_tx: r.get(18)?,
        signed_tx_hash: r.get(19)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn row(id: &str, request: &str, state: State, counted_at: Option<u64>) -> WithdrawalRow {
        WithdrawalRow {
            seq: 0,
            withdrawal_id: id.into(),
            request_id: request.into(),
            request_hash: [1; 32],
            wallet_id: "hot".into(),
            initiator: "ops".into(),
            chain: Chain::Ethereum,
            unsigned_tx: vec![0x02],
            intent: serde_json::json!({}),
            intent_hash: [2; 32],
            asset: "ETH".into(),
            amount: "5".into(),
            state,
            decision: DecisionRecord::default(),
            created_at: 100,
            expires_at: 200,
            counted_at,
            updated_at: 100,
            signed_tx: None,
            signed_tx_hash: None,
        }
    }

    #[test]
    fn constraints_back_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        store
            .write(|tx| {
                insert(tx, &row("wd_a", "r1", State::Approved, Some(150)))?;
                // One request id, one withdrawal.
                assert!(matches!(
                    insert(tx, &row("wd_b", "r1", State::PendingApproval, None)),
                    Err(StoreError::Conflict(_))
                ));
                // Counting against limits is tied to APPROVED and SIGNED.
                assert!(insert(tx, &row("wd_c", "r3", State::PendingApproval, Some(150))).is_err());
                assert!(insert(tx, &row("wd_d", "r4", State::Approved, None)).is_err());
                insert(tx, &row("wd_e", "r5", State::PendingApproval, None))?;
                // A state change must start from the state the caller read.
                assert!(matches!(
                    set_state(
                        tx,
                        "wd_e",
                        State::Approved,
                        State::Cancelled,
                        &DecisionRecord::default(),
                        None,
                        1
                    ),
                    Err(StoreError::Conflict(_))
                ));
                set_state(
                    tx,
                    "wd_e",
                    State::PendingApproval,
                    State::Approved,
                    &DecisionRecord::default(),
                    Some(160),
                    1,
                )?;
                // SIGNED needs APPROVED, once.
                set_signed(tx, "wd_a", &[1], &[2], 170)?;
                assert!(set_signed(tx, "wd_a", &[1], &[2], 171).is_err());
                let mut used = usage(tx, "hot", "ETH", 149)?;
                used.sort();
                assert_eq!(used, [(150, "5".to_owned()), (160, "5".to_owned())]);
                assert_eq!(usage(tx, "hot", "ETH", 155)?.len(), 1);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    /// A row whose chain, intent or decision cannot be read is refused as
    /// corrupt, naming what is wrong; it is never read as a default.
    #[test]
    fn unreadable_rows_are_corrupt_not_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.db")).unwrap();
        let cases = [
            (
                "chain",
                "UPDATE withdrawals SET chain = 'dogecoin'",
                "unknown chain",
            ),
            ("intent", "UPDATE withdrawals SET intent = '{not json'", "intent:"),
            (
                "policy hash",
                "UPDATE withdrawals SET decision = replace(decision, '\"policy_hash\":\"\"', '\"policy_hash\":\"zz\"')",
                "decision:",
            ),
        ];
        for (i, (what, corrupt, expected)) in cases.into_iter().enumerate() {
            let id = format!("wd_{i}");
            store
                .write(|tx| {
                    insert(tx, &row(&id, &format!("r{i}"), State::PendingApproval, None))?;
                    assert_eq!(by_id(tx, &id)?.unwrap().chain, Chain::Ethereum);
                    // The schema's CHECK refuses an unknown chain; the code
                    // checks again, for a store edited with checks off.
                    tx.batch("PRAGMA ignore_check_constraints = ON")?;
                    tx.execute(&format!("{corrupt} WHERE withdrawal_id = ?1"), &[&id])?;
                    tx.batch("PRAGMA ignore_check_constraints = OFF")?;
                    Ok::<_, StoreError>(())
                })
                .unwrap();
            let read = store.read(|conn| by_id(conn, &id));
            match read {
                Err(StoreError::Corrupt { reason, .. }) => {
                    assert!(reason.contains(expected), "{what}: {reason}")
                }
                other => panic!("{what}: read as {other:?}"),
            }
        }
    }
}
