//! Moving a single-node SQLite store into PostgreSQL: every durable row, the
//! audit log and its Merkle tree included, copied in one transaction on each
//! side and checked before the target commits.
//!
//! The copy runs inside a write of the source (which holds SQLite's write
//! lock, so no custosd can change the file meanwhile and the copy is one
//! consistent snapshot) and a write of the target (which holds the
//! cross-instance write lock, so no instance on the target can write
//! either). The target must be empty: a store that already holds wallets,
//! policies, withdrawals or log entries is refused and left as it was.
//!
//! Columns are read from the source's schema and checked against the
//! target's, so the copy follows the migrations instead of listing every
//! column a second time. Rows keep their keys, insertion order and
//! timestamps; the identity counters of the target then continue after the
//! largest copied key. Signing leases are not copied: they belong to
//! running instances, and a withdrawal that was APPROVED but unsigned is
//! claimed afresh by the target's sweep.
//!
//! Before committing, the target is checked: the same row count in every
//! table, the same log size, the same Merkle root computed from the target's
//! own nodes, and the latest signed checkpoint's root equal to the target's
//! tree at that size. Any difference rolls the whole copy back.

use bytes::BytesMut;
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::audit::{self, SqlNodes};
use super::sql::{Backend, Conn, Param};
use super::{Store, StoreError};
use custos_core::audit::merkle;

/// A table copied, in an order that satisfies the foreign keys.
struct Table {
    name: &'static str,
    /// The source's row order, which is also the insertion order kept.
    order: &'static str,
    /// A column the target generates (`GENERATED ALWAYS AS IDENTITY`) that
    /// the copy sets explicitly.
    identity: Option<&'static str>,
}

const TABLES: &[Table] = &[
    Table {
        name: "wallets",
        order: "seq",
        identity: Some("seq"),
    },
    Table {
        name: "policies",
        order: "rowid",
        identity: None,
    },
    Table {
        name: "policy_signatures",
        order: "rowid",
        identity: None,
    },
    Table {
        name: "freeze_events",
        order: "epoch",
        identity: None,
    },
    Table {
        name: "withdrawals",
        order: "seq",
        identity: Some("seq"),
    },
    Table {
        name: "approvals",
        order: "rowid",
        identity: None,
    },
    Table {
        name: "audit_log",
        order: "idx",
        identity: None,
    },
    Table {
        name: "merkle_nodes",
        order: "level, idx",
        identity: None,
    },
    Table {
        name: "log_key",
        order: "id",
        identity: None,
    },
    Table {
        name: "checkpoints",
        order: "size",
        identity: None,
    },
    Table {
        name: "usage_epochs",
        order: "wallet_id, asset",
        identity: None,
    },
];

/// What a migration copied, and the log it checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Rows copied per table, in copy order.
    pub tables: Vec<(&'static str, u64)>,
    /// Entries in the log.
    pub log_size: u64,
    /// The log's Merkle root, the same in both stores.
    pub root: [u8; 32],
    /// The size of the latest signed checkpoint, if there is one.
    pub checkpoint_size: Option<u64>,
}

/// Copies the SQLite store `from` into the empty PostgreSQL store `to`.
/// Nothing is written to `to` unless the whole copy checks out; `from` is
/// only read.
pub fn migrate(from: &Store, to: &Store) -> Result<MigrateReport, StoreError> {
    from.write(|src| {
        if src.backend() != Backend::Sqlite {
            return Err(StoreError::Settings("migrate copies from a SQLite store".into()));
        }
        to.write(|dst| {
            if dst.backend() != Backend::Postgres {
                return Err(StoreError::Settings(
                    "migrate copies into a PostgreSQL store".into(),
                ));
            }
            refuse_unless_empty(dst)?;
            copy(src, dst)
        })
    })
}

fn refuse_unless_empty(dst: Conn<'_>) -> Result<(), StoreError> {
    for table in TABLES {
        let rows = count(dst, table.name)?;
        if rows > 0 {
            return Err(StoreError::Settings(format!(
                "the target already holds a custos store ({rows} rows in {}); migrate needs an empty database",
                table.name
            )));
        }
    }
    let (version, epoch): (Option<i64>, i64) = dst.query_one(
        "SELECT active_version, freeze_epoch FROM governance WHERE id = 1",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if version.is_some() || epoch != 0 {
        return Err(StoreError::Settings(
            "the target already holds governance state; migrate needs an empty database".into(),
        ));
    }
    Ok(())
}

fn copy(src: Conn<'_>, dst: Conn<'_>) -> Result<MigrateReport, StoreError> {
    let Conn::Sqlite(sqlite) = src else {
        return Err(StoreError::Settings("migrate copies from a SQLite store".into()));
    };
    let mut tables = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let columns = columns(sqlite, dst, table)?;
        let copied = copy_table(sqlite, dst, table, &columns)?;
        let target = count(dst, table.name)?;
        if copied != target {
            return Err(check_failed(format!(
                "{}: {copied} rows read, {target} in the target",
                table.name
            )));
        }
        if let Some(column) = table.identity {
            // The target's own inserts continue after the copied keys.
            dst.query_one(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{column}'), COALESCE(MAX({column}), 0) + 1, false) FROM {0}",
                    table.name
                ),
                &[],
                |r| r.get::<i64>(0),
            )?;
        }
        tables.push((table.name, copied));
    }
    let (version, frozen, epoch): (Option<i64>, i64, i64) = src.query_one(
        "SELECT active_version, frozen, freeze_epoch FROM governance WHERE id = 1",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    dst.execute(
        "UPDATE governance SET active_version = ?1, frozen = ?2, freeze_epoch = ?3 WHERE id = 1",
        &[&version, &frozen, &epoch],
    )?;
    check_log(src, dst, tables)
}

/// The source's columns of `table`, once the target is known to have each of
/// them and nothing else it needs filled.
fn columns(src: &rusqlite::Connection, dst: Conn<'_>, table: &Table) -> Result<Vec<String>, StoreError> {
    let mut stmt = src.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
    let source: Vec<String> = stmt
        .query_map([table.name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let target: Vec<(String, bool)> = dst.query(
        "SELECT column_name::text, (is_nullable = 'YES' OR column_default IS NOT NULL OR is_identity = 'YES')
         FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?1",
        &[&table.name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if source.is_empty() || target.is_empty() {
        return Err(check_failed(format!("{}: the table is missing", table.name)));
    }
    for name in &source {
        if !target.iter().any(|(t, _)| t == name) {
            return Err(check_failed(format!(
                "{}.{name} has no column in the target",
                table.name
            )));
        }
    }
    for (name, optional) in &target {
        if !optional && !source.contains(name) {
            return Err(check_failed(format!(
                "{}.{name} is required in the target and missing in the source",
                table.name
            )));
        }
    }
    Ok(source)
}

fn copy_table(
    src: &rusqlite::Connection,
    dst: Conn<'_>,
    table: &Table,
    columns: &[String],
) -> Result<u64, StoreError> {
    let list = columns.join(", ");
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
    let insert = format!(
        "INSERT INTO {} ({list}){} VALUES ({})",
        table.name,
        if table.identity.is_some() {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        },
        placeholders.join(", ")
    );
    let mut stmt = src.prepare(&format!(
        "SELECT {list} FROM {} ORDER BY {}",
        table.name, table.order
    ))?;
    let mut rows = stmt.query([])?;
    let mut copied = 0u64;
    while let Some(row) = rows.next()? {
        let cells = (0..columns.len())
            .map(|i| row.get::<_, Value>(i).map(Cell))
            .collect::<Result<Vec<_>, _>>()?;
        let params: Vec<&dyn Param> = cells.iter().map(|c| c as &dyn Param).collect();
        dst.execute(&insert, &params)?;
        copied += 1;
    }
    Ok(copied)
}

fn check_log(
    src: Conn<'_>,
    dst: Conn<'_>,
    tables: Vec<(&'static str, u64)>,
) -> Result<MigrateReport, StoreError> {
    let log_size = audit::size(src)?;
    if audit::size(dst)? != log_size {
        return Err(check_failed("the log sizes differ".into()));
    }
    let root_of = |conn: Conn<'_>, size: u64| {
        merkle::root(&SqlNodes(conn), size).map_err(|e| check_failed(format!("the Merkle tree: {e}")))
    };
    let root = root_of(src, log_size)?;
    if root_of(dst, log_size)? != root {
        return Err(check_failed("the Merkle roots differ".into()));
    }
    let checkpoint = audit::checkpoint(dst, None)?;
    if let Some(checkpoint) = &checkpoint
        && root_of(dst, checkpoint.size)?.as_slice() != checkpoint.root.as_slice()
    {
        return Err(check_failed(format!(
            "the checkpoint at size {} does not match the copied tree",
            checkpoint.size
        )));
    }
    Ok(MigrateReport {
        tables,
        log_size,
        root,
        checkpoint_size: checkpoint.map(|c| c.size),
    })
}

fn count(conn: Conn<'_>, table: &str) -> Result<u64, StoreError> {
    let n: i64 = conn.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn check_failed(reason: String) -> StoreError {
    StoreError::Corrupt {
        table: "(migrate)",
        reason: format!("the copy did not check out, nothing was written: {reason}"),
    }
}

/// One SQLite value, bound as the PostgreSQL column's own type.
#[derive(Debug)]
struct Cell(Value);

impl rusqlite::ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::from(&self.0)))
    }
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let wrong = || format!("a {} value for a {ty} column", kind(&self.0));
        match &self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Integer(v) if <i64 as ToSql>::accepts(ty) => v.to_sql(ty, out),
            Value::Text(v) if <String as ToSql>::accepts(ty) => v.to_sql(ty, out),
            Value::Blob(v) if <Vec<u8> as ToSql>::accepts(ty) => v.to_sql(ty, out),
            _ => Err(wrong().into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <String as ToSql>::accepts(ty) || <Vec<u8> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Integer(_) => "integer",
        Value::Real(_) => "real",
        Value::Text(_) => "text",
        Value::Blob(_) => "blob",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres;
    use custos_core::audit::entry::Event;

    fn stores() -> Option<(tempfile::TempDir, Store, Store)> {
        let Some(settings) = postgres::test_database() else {
            eprintln!("skipped: CUSTOS_TEST_POSTGRES_URL is not set");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let from = Store::open(&dir.path().join("s.db")).unwrap();
        let to = Store::open_postgres(&settings).unwrap();
        Some((dir, from, to))
    }

    fn proposed(version: u64) -> Event {
        Event::PolicyProposed {
            hash: [u8::try_from(version).unwrap(); 32],
            version,
            document: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_store_moves_with_its_log_and_root_and_a_full_target_is_refused() {
        let Some((_dir, from, to)) = stores() else { return };
        for version in 1..=5 {
            from.write(|c| audit::append(c, 1_000 + version, proposed(version)).map(|_| ()))
                .unwrap();
        }
        from.write(|c| {
            c.execute(
                "UPDATE governance SET frozen = 1, freeze_epoch = 3 WHERE id = 1",
                &[],
            )
        })
        .unwrap();
        let report = migrate(&from, &to).unwrap();
        assert_eq!(report.log_size, 5);
        assert_eq!(
            report.root,
            from.read(|c| Ok::<_, StoreError>(merkle::root(&SqlNodes(c), 5)))
                .unwrap()
                .unwrap()
        );
        assert!(report.tables.contains(&("audit_log", 5)));
        let entries = |store: &Store| store.read(|c| audit::entries(c, 0, 5)).unwrap();
        assert_eq!(entries(&to), entries(&from));
        let governance = |store: &Store| {
            store
                .read(|c| {
                    c.query_one(
                        "SELECT frozen, freeze_epoch FROM governance WHERE id = 1",
                        &[],
                        |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?)),
                    )
                })
                .unwrap()
        };
        assert_eq!(governance(&to), (1, 3));

        // The target is no longer empty: a second copy is refused whole.
        from.write(|c| audit::append(c, 2_000, proposed(6)).map(|_| ()))
            .unwrap();
        let error = migrate(&from, &to).unwrap_err().to_string();
        assert!(error.contains("5 rows in audit_log"), "{error}");
        assert_eq!(to.read(audit::size).unwrap(), 5);
    }

    #[test]
    fn a_target_column_the_source_cannot_fill_rolls_the_copy_back() {
        let Some((_dir, from, to)) = stores() else { return };
        from.write(|c| audit::append(c, 1_000, proposed(1)).map(|_| ()))
            .unwrap();
        to.write(|c| c.batch("ALTER TABLE checkpoints ADD COLUMN extra BIGINT NOT NULL"))
            .unwrap();
        let error = migrate(&from, &to).unwrap_err().to_string();
        assert!(error.contains("checkpoints.extra is required"), "{error}");
        assert!(error.contains("nothing was written"), "{error}");
        // The tables copied before the failing one were rolled back with it.
        assert_eq!(to.read(audit::size).unwrap(), 0);
    }

    #[test]
    fn a_value_is_bound_only_as_its_own_postgres_type() {
        let mut out = BytesMut::new();
        let error = |value| match ToSql::to_sql(&Cell(value), &Type::INT8, &mut BytesMut::new()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("bound"),
        };
        assert_eq!(error(Value::Real(1.5)), "a real value for a int8 column");
        assert_eq!(error(Value::Text("1".into())), "a text value for a int8 column");
        assert!(out.is_empty());
        assert!(matches!(
            ToSql::to_sql(&Cell(Value::Integer(7)), &Type::INT8, &mut out),
            Ok(IsNull::No)
        ));
        assert_eq!(&out[..], &7i64.to_be_bytes());
    }
}
