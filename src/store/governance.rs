//! Governance rows: policy documents (proposed and activated), the admin
//! signatures over them, and the freeze state with its history.
//!
//! The `governance` table has exactly one row: the active policy version, the
//! freeze flag and the freeze epoch (how many freezes and unfreezes have been
//! applied, which every freeze or unfreeze message must name, so none can be
//! replayed). Activated versions are unique, and a signature row per admin and
//! policy is unique, by constraint.

use super::StoreError;
use super::sql::{Conn, Row};
use custos_core::governance::PolicySignature;

/// The single governance row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GovernanceRow {
    /// The active policy version, if any policy was ever activated.
    pub active_version: Option<u64>,
    /// Whether custody is frozen.
    pub frozen: bool,
    /// Freezes and unfreezes applied so far.
    pub freeze_epoch: u64,
}

/// A stored policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    /// Policy hash.
    pub hash: [u8; 32],
    /// Version declared in the document.
    pub version: u64,
    /// The exact bytes admins signed.
    pub document: Vec<u8>,
    /// Unix seconds.
    pub proposed_at: u64,
    /// Unix seconds, once activated.
    pub activated_at: Option<u64>,
}

/// Reads the governance row.
pub fn state(conn: Conn<'_>) -> Result<GovernanceRow, StoreError> {
    conn.query_one(
        "SELECT active_version, frozen, freeze_epoch FROM governance WHERE id = 1",
        &[],
        |row| {
            Ok(GovernanceRow {
                active_version: row.get::<Option<i64>>(0)?.map(to_u64),
                frozen: row.get::<i64>(1)? == 1,
                freeze_epoch: to_u64(row.get(2)?),
            })
        },
    )
}

/// Inserts a proposed document; [`StoreError::Conflict`] if it is already stored.
pub fn insert_policy(conn: Conn<'_>, row: &PolicyRow) -> Result<(), StoreError> {
    let inserted = conn.execute(
        "INSERT INTO policies (hash, version, document, proposed_at, activated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        &[
            &row.hash.as_slice(),
            &to_i64(row.version),
            &row.document,
            &to_i64(row.proposed_at),
            &row.activated_at.map(to_i64),
        ],
    );
    super::conflict_as(inserted, "policy").map(|_| ())
}

/// Marks a stored policy active from `at` and makes it the active version.
pub fn activate(conn: Conn<'_>, hash: &[u8; 32], version: u64, at: u64) -> Result<(), StoreError> {
    let updated = conn.execute(
        "UPDATE policies SET activated_at = ?2 WHERE hash = ?1 AND activated_at IS NULL",
        &[&hash.as_slice(), &to_i64(at)],
    );
    if super::conflict_as(updated, "active policy version")? != 1 {
        return Err(StoreError::Conflict("active policy"));
    }
    conn.execute(
        "UPDATE governance SET active_version = ?1 WHERE id = 1",
        &[&to_i64(version)],
    )?;
    Ok(())
}

/// One policy by hash.
pub fn policy(conn: Conn<'_>, hash: &[u8; 32]) -> Result<Option<PolicyRow>, StoreError> {
    conn.query_opt(
        &format!("{SELECT_POLICY} WHERE hash = ?1"),
        &[&hash.as_slice()],
        policy_row,
    )
}

/// The activated policy of `version`.
pub fn activated(conn: Conn<'_>, version: u64) -> Result<Option<PolicyRow>, StoreError> {
    conn.query_opt(
        &format!("{SELECT_POLICY} WHERE version = ?1 AND activated_at IS NOT NULL"),
        &[&to_i64(version)],
        policy_row,
    )
}

/// Every activated policy, oldest first. Versions are few: one per policy
/// change, so this stays small whatever the withdrawal history.
pub fn activated_history(conn: Conn<'_>) -> Result<Vec<PolicyRow>, StoreError> {
    conn.query(
        &format!("{SELECT_POLICY} WHERE activated_at IS NOT NULL ORDER BY version"),
        &[],
        policy_row,
    )
}

/// Records an admin signature; [`StoreError::Conflict`] if this admin already signed.
pub fn insert_policy_signature(
    conn: Conn<'_>,
    hash: &[u8; 32],
    row: &PolicySignature,
) -> Result<(), StoreError> {
    let inserted = conn.execute(
        "INSERT INTO policy_signatures (policy_hash, admin, message, signature, signed_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        &[
            &hash.as_slice(),
            &row.admin,
            &row.message,
            &row.signature,
            &to_i64(row.signed_at),
        ],
    );
    super::conflict_as(inserted, "signature by this admin").map(|_| ())
}

/// Admin signatures over a policy, by admin id.
pub fn policy_signatures(conn: Conn<'_>, hash: &[u8; 32]) -> Result<Vec<PolicySignature>, StoreError> {
    conn.query(
        "SELECT admin, message, signature, signed_at FROM policy_signatures WHERE policy_hash = ?1 ORDER BY admin",
        &[&hash.as_slice()],
        |row| {
            Ok(PolicySignature {
                admin: row.get(0)?,
                message: row.get(1)?,
                signature: row.get(2)?,
                signed_at: to_u64(row.get(3)?),
            })
        },
    )
}

/// Applies a freeze or unfreeze: records it under the current epoch and
/// advances the epoch. `signatures` is the JSON record of who signed. On
/// PostgreSQL it is also announced to every instance when it commits.
pub fn set_frozen(
    conn: Conn<'_>,
    frozen: bool,
    epoch: u64,
    signatures: &str,
    at: u64,
) -> Result<(), StoreError> {
    let inserted = conn.execute(
        "INSERT INTO freeze_events (epoch, action, signatures, at) VALUES (?1, ?2, ?3, ?4)",
        &[
            &to_i64(epoch),
            &if frozen { "FREEZE" } else { "UNFREEZE" },
            &signatures,
            &to_i64(at),
        ],
    );
    super::conflict_as(inserted, "freeze event for this epoch")?;
    let updated = conn.execute(
        "UPDATE governance SET frozen = ?1, freeze_epoch = freeze_epoch + 1 WHERE id = 1 AND freeze_epoch = ?2",
        &[&i64::from(frozen), &to_i64(epoch)],
    )?;
    if updated != 1 {
        return Err(StoreError::Conflict("freeze epoch"));
    }
    if conn.backend() == super::sql::Backend::Postgres {
        // Delivered to every listening instance when this commits.
        conn.execute(
            "SELECT pg_notify(?1, ?2)",
            &[&super::postgres::FREEZE_CHANNEL, &if frozen { "1" } else { "0" }],
        )?;
    }
    Ok(())
}

const SELECT_POLICY: &str = "SELECT hash, version, document, proposed_at, activated_at FROM policies";

fn policy_row(row: &Row<'_, '_>) -> Result<PolicyRow, StoreError> {
    let hash: Vec<u8> = row.get(0)?;
    Ok(PolicyRow {
        // The column is CHECKed to 32 bytes.
        hash: hash.try_into().unwrap_or([0; 32]),
        version: to_u64(row.get(1)?),
        document: row.get(2)?,
        proposed_at: to_u64(row.get(3)?),
        activated_at: row.get::<Option<i64>>(4)?.map(to_u64),
    })
}

/// Stored integers are signed (SQLite INTEGER, PostgreSQL BIGINT); custos stores only non-negative values.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Times and versions stay far below `i64::MAX`; saturate rather than wrap.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
