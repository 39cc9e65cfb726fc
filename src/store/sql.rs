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

use std::future::Future;

use deadpool_postgres::ClientWrapper;
use rusqlite::OptionalExtension;

use super::StoreError;

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
            Conn::Postgres(pg) => pg.block(async {
                let statement = pg.statement(sql).await?;
                let changed = pg.client.execute(&statement, &Pg::params(params)).await?;
                Ok(usize::try_from(changed).unwrap_or(usize::MAX))
            }),
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
                let rows = pg.block(async {
                    let statement = pg.statement(sql).await?;
                    Ok::<_, StoreError>(pg.client.query(&statement, &Pg::params(params)).await?)
                })?;
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
                let row = pg.block(async {
                    let statement = pg.statement(sql).await?;
                    Ok::<_, StoreError>(pg.client.query_opt(&statement, &Pg::params(params)).await?)
                })?;
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
            Conn::Postgres(pg) => pg.block(async { Ok(pg.client.batch_execute(sql).await?) }),
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
