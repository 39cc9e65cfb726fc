//! The audit log's rows: entries in order, the Merkle tree's complete
//! subtrees, the log key's record and the signed checkpoints.
//!
//! [`append`] runs inside the caller's transaction, so an entry is durable
//! exactly when the state change it records is: both commit, or neither does.
//! An entry's index is its row number; nothing hands an index out before the
//! transaction commits. The tree is stored as complete subtrees
//! (`merkle_nodes`), so roots and proofs cost O(log n) reads whatever the
//! log's size.

use std::collections::BTreeMap;

use super::StoreError;
use super::governance::{to_i64, to_u64};
use super::sql::{Conn, LogTip, Row};
use crate::hsm::KeyAttributes;
use custos_core::audit::entry::{Entry, Event};
use custos_core::audit::merkle::{self, NodeStore};
use custos_core::key::KeyKind;
use k256::sha2::{Digest, Sha256};

/// The tree nodes in the store, read through the caller's connection.
pub struct SqlNodes<'a>(pub Conn<'a>);

impl NodeStore for SqlNodes<'_> {
    type Error = StoreError;

    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        let hash: Option<Vec<u8>> = self.0.query_opt(
            "SELECT hash FROM merkle_nodes WHERE level = ?1 AND idx = ?2",
            &[&i64::from(level), &to_i64(index)],
            |r| r.get(0),
        )?;
        hash.map(|h| {
            <[u8; 32]>::try_from(h).map_err(|_| StoreError::Corrupt {
                table: "merkle_nodes",
                reason: "hash is not 32 bytes".into(),
            })
        })
        .transpose()
    }
}

/// Number of entries.
pub fn size(conn: Conn<'_>) -> Result<u64, StoreError> {
    let n: i64 = conn.query_one("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_log", &[], |r| {
        r.get(0)
    })?;
    Ok(to_u64(n))
}

/// Appends `event` at `time` as the next entry, with its tree nodes, in the
/// caller's transaction. Returns the entry.
///
/// On the PostgreSQL writer the index, and the tree nodes the new ones
/// hash, come from the transaction's [`LogTip`] instead of reads, and the
/// inserts are deferred (sent with the next statement that needs an
/// answer, see [`super::sql`]); the database still refuses an entry that
/// is not the next index (migration 7's trigger).
pub fn append(conn: Conn<'_>, time: u64, event: Event) -> Result<Entry, StoreError> {
    let mut tip = conn.write_tx().map(|tx| tx.tip());
    let tip = match tip.as_deref_mut() {
        None => None,
        Some(Some(tip)) => Some(tip),
        Some(None) => return Err(StoreError::Unavailable("no write transaction is open".into())),
    };
    let entry = Entry {
        index: match &tip {
            Some(tip) => tip.size,
            None => size(conn)?,
        },
        time,
        event,
    };
    let bytes = entry.encode();
    let leaf = merkle::leaf_hash(&bytes);
    let no_frontier = BTreeMap::new();
    let nodes = merkle::append_nodes(
        &TipNodes {
            frontier: tip.as_ref().map_or(&no_frontier, |tip| &tip.frontier),
            stored: SqlNodes(conn),
        },
        entry.index,
        leaf,
    )?;
    conn.defer(
        "INSERT INTO audit_log (idx, time, entry) VALUES (?1, ?2, ?3)",
        vec![
            Box::new(to_i64(entry.index)),
            Box::new(to_i64(time)),
            Box::new(bytes.clone()),
        ],
    )?;
    for &(level, index, hash) in &nodes {
        conn.defer(
            "INSERT INTO merkle_nodes (level, idx, hash) VALUES (?1, ?2, ?3)",
            vec![
                Box::new(i64::from(level)),
                Box::new(to_i64(index)),
                Box::new(hash.to_vec()),
            ],
        )?;
    }
    if let Some(tip) = tip {
        advance(tip, &bytes, &nodes);
    }
    Ok(entry)
}

/// Moves `tip` past the entry `bytes`, whose append made `nodes`.
fn advance(tip: &mut LogTip, bytes: &[u8], nodes: &[merkle::StoredNode]) {
    tip.frontier
        .extend(nodes.iter().map(|&(level, index, hash)| ((level, index), hash)));
    tip.size += 1;
    let mut chain = Sha256::new();
    chain.update(&tip.chain);
    chain.update(bytes);
    tip.chain = chain.finalize().to_vec();
    // Only the complete subtrees that make up the new size stay.
    let size = tip.size;
    tip.frontier
        .retain(|&(level, index), _| (size >> level) & 1 == 1 && index == (size >> level) - 1);
}

/// Tree nodes from the tip's right edge, else from the store.
struct TipNodes<'a> {
    frontier: &'a BTreeMap<(u8, u64), [u8; 32]>,
    stored: SqlNodes<'a>,
}

impl NodeStore for TipNodes<'_> {
    type Error = StoreError;

    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        match self.frontier.get(&(level, index)) {
            Some(hash) => Ok(Some(*hash)),
            None => self.stored.node(level, index),
        }
    }
}

/// Encoded entries with index in `start..end`, in order.
pub fn entries(conn: Conn<'_>, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
    conn.query(
        "SELECT entry FROM audit_log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
        &[&to_i64(start), &to_i64(end)],
        |r| r.get(0),
    )
}

/// The log key as recorded when it was generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogKeyRecord {
    /// Ed25519 or P-256.
    pub kind: KeyKind,
    /// CKA_LABEL.
    pub key_label: String,
    /// CKA_ID.
    pub key_id: Vec<u8>,
    /// Ed25519: 32 bytes; P-256: SEC1.
    pub public_key: Vec<u8>,
    /// Attributes read back at generation.
    pub attributes: KeyAttributes,
    /// The checkpoint origin (note key name) it signs for.
    pub origin: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// The log key's record, if one was made.
pub fn log_key(conn: Conn<'_>) -> Result<Option<LogKeyRecord>, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        table: "log_key",
        reason: reason.to_owned(),
    };
    conn.query_opt(
        "SELECT kind, key_label, key_id, public_key, attributes, origin, created_at FROM log_key WHERE id = 1",
        &[],
        |r| {
            let kind: String = r.get(0)?;
            let attributes: String = r.get(4)?;
            Ok(LogKeyRecord {
                kind: KeyKind::from_name(&kind).ok_or_else(|| corrupt("unknown key kind"))?,
                key_label: r.get(1)?,
                key_id: r.get(2)?,
                public_key: r.get(3)?,
                attributes: serde_json::from_str::<super::StoredAttributes>(&attributes)
                    .map_err(|_| corrupt("attributes"))?
                    .into(),
                origin: r.get(5)?,
                created_at: to_u64(r.get(6)?),
            })
        },
    )
}

/// Records the log key; there is only ever one.
pub fn insert_log_key(conn: Conn<'_>, key: &LogKeyRecord) -> Result<(), StoreError> {
    let attributes = serde_json::to_string(&key.attributes).map_err(|_| StoreError::Corrupt {
        table: "log_key",
        reason: "attributes do not serialize".into(),
    })?;
    let inserted = conn.execute(
        "INSERT INTO log_key (id, kind, key_label, key_id, public_key, attributes, origin, created_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &[
            &key.kind.name(),
            &key.key_label,
            &key.key_id,
            &key.public_key,
            &attributes,
            &key.origin,
            &to_i64(key.created_at),
        ],
    );
    super::conflict_as(inserted, "log key")?;
    Ok(())
}

/// A stored signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// Tree size it signs.
    pub size: u64,
    /// Root hash at that size.
    pub root: [u8; 32],
    /// The signed note, verbatim.
    pub note: String,
    /// Unix seconds when it was signed.
    pub signed_at: u64,
}

/// Stores a signed checkpoint. A second one for the same size is refused:
/// a log has one root per size.
pub fn insert_checkpoint(conn: Conn<'_>, checkpoint: &StoredCheckpoint) -> Result<(), StoreError> {
    let inserted = conn.execute(
        "INSERT INTO checkpoints (size, root, note, signed_at) VALUES (?1, ?2, ?3, ?4)",
        &[
            &to_i64(checkpoint.size),
            &checkpoint.root.as_slice(),
            &checkpoint.note,
            &to_i64(checkpoint.signed_at),
        ],
    );
    super::conflict_as(inserted, "checkpoint")?;
    Ok(())
}

/// The checkpoint at `size`, or the latest one when `size` is `None`.
pub fn checkpoint(conn: Conn<'_>, size: Option<u64>) -> Result<Option<StoredCheckpoint>, StoreError> {
    match size {
        Some(size) => conn.query_opt(
            "SELECT size, root, note, signed_at FROM checkpoints WHERE size = ?1",
            &[&to_i64(size)],
            checkpoint_row,
        ),
        None => conn.query_opt(
            "SELECT size, root, note, signed_at FROM checkpoints ORDER BY size DESC LIMIT 1",
            &[],
            checkpoint_row,
        ),
    }
}

/// Every checkpoint, oldest first.
pub fn checkpoints(conn: Conn<'_>) -> Result<Vec<StoredCheckpoint>, StoreError> {
    conn.query(
        "SELECT size, root, note, signed_at FROM checkpoints ORDER BY size",
        &[],
        checkpoint_row,
    )
}

fn checkpoint_row(r: &Row<'_, '_>) -> Result<StoredCheckpoint, StoreError> {
    let (size, root, note, signed_at): (i64, Vec<u8>, String, i64) =
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
    <[u8; 32]>::try_from(root)
        .map_err(|_| StoreError::Corrupt {
            table: "checkpoints",
            reason: "root is not 32 bytes".into(),
        })
        .map(|root| StoredCheckpoint {
            size: to_u64(size),
            root,
            note,
            signed_at: to_u64(signed_at),
        })
}
