//! The audit log's rows: entries in order, and the Merkle tree's complete
//! subtrees.
//!
//! [`append`] runs inside the caller's transaction, so an entry is durable
//! exactly when the state change it records is: both commit, or neither does.
//! An entry's index is its row number; nothing hands an index out before the
//! transaction commits. The tree is stored as complete subtrees
//! (`merkle_nodes`), so roots and proofs cost O(log n) reads whatever the
//! log's size.

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use super::governance::{to_i64, to_u64};
use crate::audit::entry::{Entry, Event};
use crate::audit::merkle::{self, NodeStore};

/// The tree nodes in SQLite, read through the caller's connection.
pub struct SqlNodes<'a>(pub &'a Connection);

impl NodeStore for SqlNodes<'_> {
    type Error = StoreError;

    fn node(&self, level: u8, index: u64) -> Result<Option<[u8; 32]>, StoreError> {
        let hash: Option<Vec<u8>> = self
            .0
            .prepare_cached("SELECT hash FROM merkle_nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(params![level, to_i64(index)], |r| r.get(0))
            .optional()?;
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
pub fn size(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_log")?
        .query_row([], |r| r.get(0))?;
    Ok(to_u64(n))
}

/// Appends `event` at `time` as the next entry, with its tree nodes, in the
/// caller's transaction. Returns the entry.
pub fn append(conn: &Connection, time: u64, event: Event) -> Result<Entry, StoreError> {
    let entry = Entry {
        index: size(conn)?,
        time,
        event,
    };
    let bytes = entry.encode();
    let leaf = merkle::leaf_hash(&bytes);
    let nodes = merkle::append_nodes(&SqlNodes(conn), entry.index, leaf)?;
    conn.prepare_cached("INSERT INTO audit_log (idx, time, entry) VALUES (?1, ?2, ?3)")?
        .execute(params![to_i64(entry.index), to_i64(time), bytes])?;
    let mut insert =
        conn.prepare_cached("INSERT INTO merkle_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
    for (level, index, hash) in nodes {
        insert.execute(params![level, to_i64(index), hash.as_slice()])?;
    }
    Ok(entry)
}

/// Encoded entries with index in `start..end`, in order.
pub fn entries(conn: &Connection, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT entry FROM audit_log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
    let rows = stmt.query_map(params![to_i64(start), to_i64(end)], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
