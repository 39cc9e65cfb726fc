//! One SQL surface over both backends: statements, parameters, rows and the
//! errors they raise, the same for SQLite and PostgreSQL.
//!
//! Every statement in the store is written once, with SQLite's numbered
//! placeholders (`?1`, `?2`, …), and runs through a [`Conn`]: on SQLite it is
//! prepared (and cached) by rusqlite as written, on PostgreSQL the
//! placeholders become `$1`, `$2`, … and the statement is prepared once per
//! connection by deadpool-postgres's statement cache. Parameters and columns
//! are the types both drivers map the same way: `i64` for every integer
//! (PostgreSQL `BIGINT`), `&str`/`String` for text, `&[u8]`/`Vec<u8>` for
//! blobs (`BYTEA`), and `Option` of these for NULL.
//!
//! A uniqueness, CHECK or foreign-key violation is the same fact on both
//! backends; [`StoreError::is_constraint`] recognises it from either driver,
//! so `conflict_as` maps both to [`StoreError::Conflict`].
//!
//! On PostgreSQL every statement is a network round trip, and the write
//! transaction holds the lock every instance's writer waits for, so the
//! writer's connection carries a [`WriteTx`]: statements whose only possible
//! answer is "done" ([`Conn::defer`]: the log's inserts, savepoints) wait in
//! it and go out together with the next statement that needs an answer, or
//! with the COMMIT, in one pipelined round trip. They still run in the order
//! they were issued. If any statement fails, deferred or not, the
//! transaction is *poisoned*: PostgreSQL has aborted it, and unless a
//! rollback to a savepoint taken before the failure ends that, its COMMIT is
//! refused rather than sent (PostgreSQL would answer a COMMIT of an aborted
//! transaction with a rollback, not an error). So a write closure that
//! swallowed a failed statement fails its write instead of returning as if
//! it had committed. The [`WriteTx`] also holds the log's tip ([`LogTip`]), which
//! [`super::audit::append`] keeps so that an append needs no read.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use deadpool_postgres::ClientWrapper;
use rusqlite::OptionalExtension;

use super::{StoreError, lock};

/// A connection of either backend, borrowed for the length of one call:
/// the writer's (inside its transaction) or a reader's.
#[derive(Clone, Copy)]
pub enum Conn<'a> {
    /// An SQLite connection.
    Sqlite(&'a rusqlite::Connection),
    /// A PostgreSQL connection and the runtime that drives it.
    Postgres(Pg<'a>),
}

/// A PostgreSQL client and the store's private runtime.
#[derive(Clone, Copy)]
pub struct Pg<'a> {
    pub(crate) client: &'a ClientWrapper,
    pub(crate) runtime: &'a tokio::runtime::Runtime,
    /// The open write transaction's state, on the writer's connection;
    /// `None` on a read connection, where every statement runs at once.
    pub(crate) tx: Option<&'a WriteTx>,
}

/// A statement parameter the statement owns, for a deferred statement.
pub type OwnedParam = Box<dyn Param + Send>;

/// A statement sent later, with the next one that needs an answer.
enum Deferred {
    /// A statement with parameters (extended protocol, prepared).
    Execute(&'static str, Vec<OwnedParam>),
    /// A parameterless control statement (simple protocol).
    Control(&'static str),
}

/// The state of the writer's open PostgreSQL transaction that its
/// statements share: what waits to be sent, whether a statement of it
/// failed, and the log's tip.
#[derive(Default)]
pub struct WriteTx {
    sent: Mutex<Pending>,
    tip: Mutex<Option<LogTip>>,
}

#[derive(Default)]
struct Pending {
    deferred: Vec<Deferred>,
    /// Why the transaction is aborted, once a statement of it failed.
    poisoned: Option<String>,
}

/// The audit log as the open transaction sees it: its size, its chain (the
/// SHA-256 fold of every entry that PostgreSQL keeps on the lock row), and
/// those complete subtrees on its right edge that are known without a
/// read: all of them once this instance appended, none when the log's
/// history is not the one this instance last committed.
/// Kept and read only by [`super::audit::append`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTip {
    /// Entries in the log.
    pub size: u64,
    /// SHA-256(chain before ‖ entry), folded over the entries in order;
    /// empty for an empty log.
    pub chain: Vec<u8>,
    /// `(level, index) → hash` of right-edge subtrees.
    pub frontier: BTreeMap<(u8, u64), [u8; 32]>,
}

impl WriteTx {
    /// A transaction begins, holding the write lock, on a log of `size`
    /// entries folding to `chain`: the tip kept from this instance's last
    /// commit stays if the log is still that one; otherwise only its size
    /// and chain are known.
    pub(crate) fn begin(&self, size: u64, chain: Vec<u8>) {
        let mut tip = lock(&self.tip);
        if tip.as_ref().is_none_or(|t| t.size != size || t.chain != chain) {
            *tip = Some(LogTip {
                size,
                chain,
                frontier: BTreeMap::new(),
            });
        }
    }

    /// Drops whatever waits to be sent, and the poison: nothing of a
    /// transaction is open.
    pub(crate) fn clear_pending(&self) {
        *lock(&self.sent) = Pending::default();
    }

    /// The transaction did not commit, or nobody knows: forget its tip.
    pub(crate) fn abandon(&self) {
        *lock(&self.sent) = Pending::default();
        *lock(&self.tip) = None;
    }

    /// A rollback to a savepoint succeeded: whatever failed after it is
    /// undone, and nothing failed before it (the savepoint itself would
    /// have failed).
    pub(crate) fn cure(&self) {
        lock(&self.sent).poisoned = None;
    }

    /// Why the transaction is aborted, if a statement of it failed.
    pub(crate) fn poisoned(&self) -> Option<String> {
        lock(&self.sent).poisoned.clone()
    }

    /// The log's tip as it is now, for a savepoint to return to.
    pub(crate) fn save_tip(&self) -> Option<LogTip> {
        lock(&self.tip).clone()
    }

    /// Back to the tip saved at a savepoint that was rolled back to.
    pub(crate) fn restore_tip(&self, tip: Option<LogTip>) {
        *lock(&self.tip) = tip;
    }

    /// The log's tip, for [`super::audit::append`].
    pub(crate) fn tip(&self) -> MutexGuard<'_, Option<LogTip>> {
        lock(&self.tip)
    }

    fn defer(&self, statement: Deferred) {
        lock(&self.sent).deferred.push(statement);
    }

    fn take(&self) -> Vec<Deferred> {
        std::mem::take(&mut lock(&self.sent).deferred)
    }

    fn poison(&self, why: String) {
        lock(&self.sent).poisoned.get_or_insert(why);
    }
}

/// Which engine a [`Conn`] talks to, for the few statements whose text
/// differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A value bound to a statement parameter, on either backend.
pub trait Param: Sync {
    /// As rusqlite binds it.
    fn sqlite(&self) -> &dyn rusqlite::ToSql;
    /// As tokio-postgres binds it.
    fn pg(&self) -> &(dyn tokio_postgres::types::ToSql + Sync);
}

impl<T> Param for T
where
    T: rusqlite::ToSql + tokio_postgres::types::ToSql + Sync,
{
    fn sqlite(&self) -> &dyn rusqlite::ToSql {
        self
    }
    fn pg(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        self
    }
}

/// A column type both drivers decode the same way.
pub trait Column: Sized {
    /// Reads column `i` of an SQLite row.
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self>;
    /// Reads column `i` of a PostgreSQL row.
    fn pg(row: &tokio_postgres::Row, i: usize) -> Result<Self, tokio_postgres::Error>;
}

impl<T> Column for T
where
    T: rusqlite::types::FromSql + for<'r> tokio_postgres::types::FromSql<'r>,
{
    fn sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        row.get(i)
    }
    fn pg(row: &tokio_postgres::Row, i: usize) -> Result<Self, tokio_postgres::Error> {
        row.try_get(i)
    }
}

/// One result row of either backend.
pub enum Row<'a, 'r> {
    /// An SQLite row.
    Sqlite(&'a rusqlite::Row<'r>),
    /// A PostgreSQL row.
    Postgres(&'a tokio_postgres::Row),
}

impl Row<'_, '_> {
    /// Column `i`, decoded as `T`.
    pub fn get<T: Column>(&self, i: usize) -> Result<T, StoreError> {
        match self {
            Row::Sqlite(row) => Ok(T::sqlite(row, i)?),
            Row::Postgres(row) => Ok(T::pg(row, i)?),
        }
    }
}

impl<'a> From<&'a rusqlite::Connection> for Conn<'a> {
    fn from(conn: &'a rusqlite::Connection) -> Self {
        Conn::Sqlite(conn)
    }
}

/// `sql` with `?N` placeholders rewritten as PostgreSQL's `$N`. Statements
/// here hold no string literal with a `?` in it.
pub(crate) fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '?' if chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            other => out.push(other),
        }
    }
    out
}

impl Pg<'_> {
    /// Runs `future` to completion on the store's runtime, from whichever
    /// thread calls: a blocking-pool thread or one outside any runtime.
    pub(crate) fn block<F: Future>(&self, future: F) -> F::Output {
        block_on(self.runtime, future)
    }

    async fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        Ok(self.client.prepare_cached(&to_postgres(sql)).await?)
    }

    /// Sends whatever was deferred, then `current`, in one pipelined round
    /// trip, in order; `current`'s result, or the first deferred failure.
    async fn with_deferred<T>(
        &self,
        current: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(tx) = self.tx else {
            return current.await;
        };
        let deferred = tx.take();
        if deferred.is_empty() {
            let result = current.await;
            if let Err(e) = &result {
                tx.poison(e.to_string());
            }
            return result;
        }
        // Prepared first (a miss costs a round trip once per connection), so
        // that the executes below are sent in the order they were issued.
        let mut prepared = Vec::with_capacity(deferred.len());
        for statement in &deferred {
            prepared.push(match statement {
                Deferred::Execute(sql, _) => Some(self.statement(sql).await?),
                Deferred::Control(_) => None,
            });
        }
        let sends = deferred
            .iter()
            .zip(&prepared)
            .map(|(statement, prepared)| async move {
                match (statement, prepared) {
                    (Deferred::Execute(_, params), Some(prepared)) => {
                        let params: Vec<_> = params.iter().map(|p| p.pg()).collect();
                        self.client.execute(prepared, &params).await.map(|_| ())
                    }
                    (Deferred::Control(sql), _) => self.client.batch_execute(sql).await,
                    (Deferred::Execute(..), None) => unreachable!("every execute was prepared above"),
                }
            });
        // `join` polls the deferred statements first, and a tokio-postgres
        // request goes out on its first poll: the order is kept.
        let (sent, result) = futures_util::future::join(futures_util::future::join_all(sends), current).await;
        if let Some(failed) = sent.into_iter().find_map(Result::err) {
            let failed = StoreError::from(failed);
            tx.poison(failed.to_string());
            return Err(failed);
        }
        if let Err(e) = &result {
            tx.poison(e.to_string());
        }
        result
    }

    fn params<'p>(params: &'p [&'p dyn Param]) -> Vec<&'p (dyn tokio_postgres::types::ToSql + Sync)> {
        params.iter().map(|p| p.pg()).collect()
    }
}

/// Blocks on `future` in `runtime`. Inside another runtime's worker thread
/// the worker is handed off first ([`tokio::task::block_in_place`]), so a
/// store call from async code stalls no other task.
pub(crate) fn block_on<F: Future>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output {
    tokio::task::block_in_place(|| runtime.block_on(future))
}

impl Conn<'_> {
    /// The engine behind this connection.
    pub fn backend(&self) -> Backend {
        match self {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<usize, StoreError> {
        match self {
            Conn::Sqlite(conn) => {
                let params: Vec<&dyn rusqlite::ToSql> = params.iter().map(|p| p.sqlite()).collect();
                Ok(conn.prepare_cached(sql)?.execute(params.as_slice())?)
            }
            Conn::Postgres(pg) => pg.block(pg.with_deferred(async {
                let statement = pg.statement(sql).await?;
                let changed = pg.client.execute(&statement, &Pg::params(params)).await?;
                Ok(usize::try_from(changed).unwrap_or(usize::MAX))
            })),
        }
    }

    /// Every row `sql` returns, each mapped by `f`.
    pub fn query<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        match self {
            Conn::Sqlite(conn) => {
                let params: Vec<&dyn rusqlite::ToSql> = params.iter().map(|p| p.sqlite()).collect();
                let mut stmt = conn.prepare_cached(sql)?;
                let mut rows = stmt.query(params.as_slice())?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(f(&Row::Sqlite(row))?);
                }
                Ok(out)
            }
            Conn::Postgres(pg) => {
                let rows = pg.block(pg.with_deferred(async {
                    let statement = pg.statement(sql).await?;
                    Ok::<_, StoreError>(pg.client.query(&statement, &Pg::params(params)).await?)
                }))?;
                rows.iter().map(|row| f(&Row::Postgres(row))).collect()
            }
        }
    }

    /// The one row `sql` returns, if any, mapped by `f`.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match self {
            Conn::Sqlite(conn) => {
                let params: Vec<&dyn rusqlite::ToSql> = params.iter().map(|p| p.sqlite()).collect();
                let mut stmt = conn.prepare_cached(sql)?;
                // The mapping's own error is carried out of rusqlite's closure.
                let row = stmt
                    .query_row(params.as_slice(), |row| Ok(f(&Row::Sqlite(row))))
                    .optional()?;
                row.transpose()
            }
            Conn::Postgres(pg) => {
                let row = pg.block(pg.with_deferred(async {
                    let statement = pg.statement(sql).await?;
                    Ok::<_, StoreError>(pg.client.query_opt(&statement, &Pg::params(params)).await?)
                }))?;
                row.as_ref().map(|row| f(&Row::Postgres(row))).transpose()
            }
        }
    }

    /// The one row `sql` must return, mapped by `f`.
    pub fn query_one<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row<'_, '_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.query_opt(sql, params, f)?.ok_or(StoreError::Corrupt {
            table: "(query)",
            reason: "a statement that returns one row returned none".into(),
        })
    }

    /// Runs several statements without parameters (schema changes).
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Conn::Postgres(pg) => {
                pg.block(pg.with_deferred(async { Ok(pg.client.batch_execute(sql).await?) }))
            }
        }
    }

    /// Runs a statement whose only possible answer is "done" (its failure
    /// aborts the transaction): on the PostgreSQL writer it is sent with
    /// the next statement that needs an answer (see the module docs);
    /// elsewhere it runs now.
    pub fn defer(&self, sql: &'static str, params: Vec<OwnedParam>) -> Result<(), StoreError> {
        match self {
            Conn::Postgres(Pg { tx: Some(tx), .. }) => {
                tx.defer(Deferred::Execute(sql, params));
                Ok(())
            }
            _ => {
                let params: Vec<&dyn Param> = params.iter().map(|p| p.as_ref() as &dyn Param).collect();
                self.execute(sql, &params).map(|_| ())
            }
        }
    }

    /// [`Conn::defer`] for a parameterless control statement (a savepoint).
    pub(crate) fn defer_control(&self, sql: &'static str) -> Result<(), StoreError> {
        match self {
            Conn::Postgres(Pg { tx: Some(tx), .. }) => {
                tx.defer(Deferred::Control(sql));
                Ok(())
            }
            _ => self.batch(sql),
        }
    }

    /// The open PostgreSQL write transaction's shared state; `None` on
    /// SQLite and on read connections.
    pub(crate) fn write_tx(&self) -> Option<&WriteTx> {
        match self {
            Conn::Postgres(Pg { tx, .. }) => *tx,
            Conn::Sqlite(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_dollars() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c > ?12 OR d IS NULL"),
            "SELECT a FROM t WHERE b = $1 AND c > $12 OR d IS NULL"
        );
        // A bare `?` is not a numbered placeholder and stays.
        assert_eq!(to_postgres("a ? b"), "a ? b");
    }

    /// Binds and reads back an integer, text, a blob and NULLs through `c`,
    /// in `table` (already created as `(a, b, c)`), then a duplicate `a` and
    /// a negative one, which the table's constraints refuse.
    fn round_trip(c: Conn<'_>, table: &str) {
        let blob: &[u8] = &[1, 2];
        let insert = format!("INSERT INTO {table} VALUES (?1, ?2, ?3)");
        assert_eq!(c.execute(&insert, &[&7i64, &"x", &blob]).unwrap(), 1);
        let none: Option<i64> = None;
        let no_blob: Option<Vec<u8>> = None;
        c.execute(&insert, &[&none, &"y".to_owned(), &no_blob]).unwrap();
        let rows = c
            .query(&format!("SELECT a, b, c FROM {table} ORDER BY b"), &[], |r| {
                Ok((
                    r.get::<Option<i64>>(0)?,
                    r.get::<String>(1)?,
                    r.get::<Option<Vec<u8>>>(2)?,
                ))
            })
            .unwrap();
        assert_eq!(
            rows,
            [
                (Some(7), "x".to_owned(), Some(vec![1, 2])),
                (None, "y".to_owned(), None)
            ]
        );
        let by_a = format!("SELECT b FROM {table} WHERE a = ?1");
        assert_eq!(
            c.query_opt(&by_a, &[&8i64], |r| r.get::<String>(0)).unwrap(),
            None
        );
        assert!(c.query_one(&by_a, &[&8i64], |r| r.get::<String>(0)).is_err());
        for refused in [7i64, -1] {
            let result = c.execute(&insert, &[&refused, &"z", &no_blob]);
            assert!(
                result.as_ref().is_err_and(StoreError::is_constraint),
                "{result:?}"
            );
        }
        // A statement error that is not a constraint is not one.
        let missing = c.execute("INSERT INTO no_such_table VALUES (?1)", &[&1i64]);
        assert!(missing.as_ref().is_err_and(|e| !e.is_constraint()), "{missing:?}");
    }

    #[test]
    fn sqlite_rows_params_and_constraints() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let c = Conn::Sqlite(&conn);
        assert_eq!(c.backend(), Backend::Sqlite);
        c.batch("CREATE TABLE t (a INTEGER UNIQUE CHECK (a >= 0), b TEXT NOT NULL, c BLOB) STRICT")
            .unwrap();
        round_trip(c, "t");
    }

    /// A connection to the test suite's PostgreSQL (`scripts/test.sh` starts
    /// one and sets `CUSTOS_TEST_POSTGRES_URL` and the password file), or
    /// `None` when run outside it.
    fn test_postgres() -> Option<(tokio::runtime::Runtime, deadpool_postgres::Pool)> {
        let url = std::env::var("CUSTOS_TEST_POSTGRES_URL").ok()?;
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        if let Ok(file) = std::env::var("CUSTOS_TEST_POSTGRES_PASSWORD_FILE") {
            config.password(std::fs::read(file).unwrap());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(2)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .unwrap();
        Some((runtime, pool))
    }

    /// The same statements, parameters and row reads run on a real
    /// PostgreSQL: placeholders are rewritten, `i64`/text/bytea/NULL bind and
    /// decode as on SQLite, and a unique or CHECK violation is a constraint
    /// error, as SQLite's is.
    #[test]
    fn postgres_runs_the_same_statements() {
        let Some((runtime, pool)) = test_postgres() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let client = runtime.block_on(pool.get()).unwrap();
        let c = Conn::Postgres(Pg {
            client: &client,
            runtime: &runtime,
            tx: None,
        });
        assert_eq!(c.backend(), Backend::Postgres);
        let table = format!("sql_test_{}", std::process::id());
        c.batch(&format!(
            "DROP TABLE IF EXISTS {table};
             CREATE TABLE {table} (a BIGINT UNIQUE CHECK (a >= 0), b TEXT NOT NULL, c BYTEA)"
        ))
        .unwrap();
        round_trip(c, &table);
        c.batch(&format!("DROP TABLE {table}")).unwrap();
    }
}
