//! Durable state, in SQLite (WAL journal, `synchronous=FULL`) or in
//! PostgreSQL ([`postgres`]), with versioned migrations for each.
//!
//! The store owns the schema and every SQL statement: wallets here, withdrawals
//! and approvals in [`withdrawals`], policy versions and freeze state in
//! [`governance`]. Uniqueness is enforced by constraints, not only by checks in
//! code. Callers run these blocking methods off the async runtime. Every
//! statement goes through [`sql::Conn`], written once for SQLite and
//! PostgreSQL alike.
//!
//! Writes go through one connection, one closure at a time, so whatever a
//! [`Store::write`] closure reads stays true until it commits: that is how
//! check-and-reserve of request ids and limits happens atomically. Writers
//! that arrive while another is running share its commit (group commit):
//! each closure after the first runs in its own savepoint inside one `BEGIN
//! IMMEDIATE` transaction (the first, alone in it until it returns, needs
//! none), and the last writer in line commits for all of them, so one
//! fsync covers the group. No writer returns before the commit that holds its
//! changes succeeded, and a failed commit fails every writer in the group.
//! Reads use a second connection, which only ever sees committed data.

pub mod audit;
pub mod governance;
pub mod migrate;
pub mod postgres;
pub mod sql;
pub mod withdrawals;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, ErrorCode};

use self::sql::{Conn, Row};
use crate::hsm::KeyAttributes;

/// Store settings: which backend, and where.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// One SQLite file, created if missing: the embedded default.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database that several instances may share.
    Postgres(postgres::PgSettings),
}

impl StoreConfig {
    /// Where the store is, for messages: the file, or the URL without any
    /// credentials.
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sqlite { path } => path.display().to_string(),
            StoreConfig::Postgres(settings) => settings.redacted_url(),
        }
    }
}

/// Schema migrations, applied in order. `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: wallets, one row per HSM key pair.
    "CREATE TABLE wallets (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        wallet_id TEXT NOT NULL UNIQUE,
        display_name TEXT NOT NULL,
        key_label TEXT NOT NULL UNIQUE,
        key_id BLOB NOT NULL UNIQUE,
        public_key BLOB NOT NULL UNIQUE,
        attributes TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;",
    // 2: governed withdrawals: policy versions, freeze state, withdrawals, approvals.
    "CREATE TABLE policies (
        hash BLOB PRIMARY KEY CHECK (length(hash) = 32),
        version INTEGER NOT NULL CHECK (version > 0),
        document BLOB NOT NULL,
        proposed_at INTEGER NOT NULL,
        activated_at INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX policies_activated_version ON policies(version) WHERE activated_at IS NOT NULL;
    CREATE TABLE policy_signatures (
        policy_hash BLOB NOT NULL REFERENCES policies(hash),
        admin TEXT NOT NULL,
        message BLOB NOT NULL UNIQUE,
        signature BLOB NOT NULL,
        signed_at INTEGER NOT NULL,
        PRIMARY KEY (policy_hash, admin)
    ) STRICT;
    CREATE TABLE governance (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        active_version INTEGER,
        frozen INTEGER NOT NULL CHECK (frozen IN (0, 1)),
        freeze_epoch INTEGER NOT NULL
    ) STRICT;
    INSERT INTO governance (id, active_version, frozen, freeze_epoch) VALUES (1, NULL, 0, 0);
    CREATE TABLE freeze_events (
        epoch INTEGER PRIMARY KEY,
        action TEXT NOT NULL CHECK (action IN ('FREEZE', 'UNFREEZE')),
        signatures TEXT NOT NULL,
        at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE withdrawals (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        withdrawal_id TEXT NOT NULL UNIQUE,
        request_id TEXT NOT NULL UNIQUE,
        request_hash BLOB NOT NULL,
        wallet_id TEXT NOT NULL,
        initiator TEXT NOT NULL,
        chain TEXT NOT NULL CHECK (chain IN ('ethereum', 'bitcoin')),
        unsigned_tx BLOB NOT NULL,
        intent TEXT NOT NULL,
        intent_hash BLOB NOT NULL CHECK (length(intent_hash) = 32),
        asset TEXT NOT NULL,
        amount TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('PENDING_APPROVAL', 'APPROVED', 'SIGNED', 'DENIED', 'REJECTED', 'EXPIRED', 'CANCELLED')),
        decision TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        counted_at INTEGER,
        updated_at INTEGER NOT NULL,
        signed_tx BLOB,
        signed_tx_hash BLOB,
        CHECK ((state IN ('APPROVED', 'SIGNED')) = (counted_at IS NOT NULL)),
        CHECK ((state = 'SIGNED') = (signed_tx IS NOT NULL))
    ) STRICT;
    CREATE INDEX withdrawals_usage ON withdrawals(wallet_id, asset, counted_at) WHERE counted_at IS NOT NULL;
    CREATE INDEX withdrawals_by_state ON withdrawals(state, seq);
    CREATE TABLE approvals (
        withdrawal_id TEXT NOT NULL REFERENCES withdrawals(withdrawal_id),
        approver TEXT NOT NULL,
        vote TEXT NOT NULL CHECK (vote IN ('APPROVE', 'REJECT')),
        message BLOB NOT NULL UNIQUE,
        signature BLOB NOT NULL,
        submitted_at INTEGER NOT NULL,
        PRIMARY KEY (withdrawal_id, approver)
    ) STRICT;",
    // 3: the audit log and its Merkle tree (complete subtrees only).
    "CREATE TABLE audit_log (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        time INTEGER NOT NULL,
        entry BLOB NOT NULL
    ) STRICT;
    CREATE TABLE merkle_nodes (
        level INTEGER NOT NULL CHECK (level BETWEEN 0 AND 63),
        idx INTEGER NOT NULL CHECK (idx >= 0),
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    ) STRICT, WITHOUT ROWID;
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER merkle_nodes_no_update BEFORE UPDATE ON merkle_nodes
        BEGIN SELECT RAISE(ABORT, 'the Merkle tree is append-only'); END;",
    // 4: the log key (one row, made once) and the signed checkpoints.
    "CREATE TABLE log_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        kind TEXT NOT NULL CHECK (kind IN ('ed25519', 'p256')),
        key_label TEXT NOT NULL,
        key_id BLOB NOT NULL,
        public_key BLOB NOT NULL,
        attributes TEXT NOT NULL,
        origin TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE checkpoints (
        size INTEGER PRIMARY KEY CHECK (size >= 0),
        root BLOB NOT NULL CHECK (length(root) = 32),
        note TEXT NOT NULL,
        signed_at INTEGER NOT NULL
    ) STRICT;
    CREATE TRIGGER log_key_no_update BEFORE UPDATE ON log_key
        BEGIN SELECT RAISE(ABORT, 'the log key is set once'); END;
    CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
        BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
    CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
        BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
    CREATE TRIGGER merkle_nodes_no_delete BEFORE DELETE ON merkle_nodes
        BEGIN SELECT RAISE(ABORT, 'the Merkle tree is append-only'); END;",
    // 5: what lets several instances share the store: a counter per wallet
    // and asset that every change of the counted set bumps (usage caches
    // check it), and the signing leases.
    "CREATE TABLE usage_epochs (
        wallet_id TEXT NOT NULL,
        asset TEXT NOT NULL,
        epoch INTEGER NOT NULL CHECK (epoch > 0),
        PRIMARY KEY (wallet_id, asset)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE signing_leases (
        withdrawal_id TEXT PRIMARY KEY REFERENCES withdrawals(withdrawal_id),
        owner TEXT NOT NULL,
        owner_key INTEGER,
        fence INTEGER NOT NULL CHECK (fence > 0),
        until INTEGER NOT NULL
    ) STRICT;",
];

/// The most writers one group commit holds.
const MAX_GROUP: usize = 64;

/// A store failure. Messages carry no secrets (the store holds none).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness constraint refused the write.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// The database was written by a newer custos.
    #[error("database schema version {found} is newer than this custos ({supported})")]
    TooNew {
        /// Version in the file.
        found: usize,
        /// Highest version this build knows.
        supported: usize,
    },
    /// The store settings are unusable (a URL, a password file).
    #[error("{0}")]
    Settings(String),
    /// The database cannot be reached now; nothing was done.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// SQLite reported an error.
    #[error("SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL (or the connection to it) reported an error. The message
    /// carries the causes too ("error performing TLS handshake: invalid
    /// peer certificate: UnknownIssuer"); the driver's own stops at the first.
    #[error("PostgreSQL error: {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The group commit holding this write failed; nothing of it is stored.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// The connection broke during the COMMIT of this write's group and the
    /// database could not be asked whether it committed: it may or may not
    /// be stored.
    #[error("commit outcome unknown: {0}")]
    CommitUnknown(String),
    /// A stored row does not decode.
    #[error("corrupt row in {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// `error` and each of its sources, joined by ": ".
fn with_causes(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A wallet as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletRecord {
    /// Insertion order, used for paging.
    pub seq: i64,
    /// `wallet_id` from `wallets/{wallet_id}`.
    pub wallet_id: String,
    /// Label for people.
    pub display_name: String,
    /// CKA_LABEL of both key objects.
    pub key_label: String,
    /// CKA_ID of both key objects.
    pub key_id: Vec<u8>,
    /// SEC1 compressed public key (33 bytes).
    pub public_key: Vec<u8>,
    /// Attributes read back when the key was generated.
    pub attributes: KeyAttributes,
    /// Unix seconds.
    pub created_at: i64,
}

/// The store, on SQLite or on PostgreSQL.
pub struct Store {
    writer: Mutex<Writer>,
    /// Signalled when a group commit finishes.
    group_done: Condvar,
    /// Writers waiting for the writer lock; while there are any, a writer
    /// leaves the transaction open for them to commit.
    writers_waiting: AtomicUsize,
    /// Group commits that failed, counted before the next writer runs.
    commit_failures: AtomicU64,
    reader: Reader,
    instance: Instance,
    /// Whether the last [`Store::probe`] answered.
    reachable: AtomicBool,
}

/// Who this process is to the other instances on the store: the owner named
/// in the signing leases it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The owner id in `signing_leases`.
    pub id: String,
    /// On PostgreSQL, the key of the session advisory lock this process
    /// holds for as long as it is connected: another instance that can take
    /// that lock knows the owner is gone and may take over its leases. On
    /// SQLite the file is the instance (one process per file), so a
    /// restarted process is the same owner and there is no key.
    pub presence_key: Option<i64>,
}

/// How reads reach the database: SQLite's one read connection, or the
/// PostgreSQL backend (its read pool; it also hands the writer connections).
enum Reader {
    Sqlite(Mutex<Connection>),
    Postgres(postgres::PgBackend),
}

/// The connection writes go through.
enum WriterConn {
    Sqlite(Connection),
    /// `None` after the connection broke; the next transaction takes a new one.
    Postgres(Option<deadpool_postgres::Object>),
}

/// The write connection and its group-commit state.
struct Writer {
    conn: WriterConn,
    /// The group whose transaction is open, if any.
    open: Option<u64>,
    /// Writers in the open group so far.
    members: usize,
    /// The last group number handed out.
    groups: u64,
    /// The last group finished, and whether its commit failed (why).
    finished: u64,
    failed: Vec<(u64, GroupFailure)>,
    /// On PostgreSQL, the open transaction's id.
    txid: Option<i64>,
    /// On PostgreSQL, what the open transaction's statements share.
    pg_tx: sql::WriteTx,
}

/// How a group commit failed.
#[derive(Debug, Clone)]
enum GroupFailure {
    /// Rolled back: nothing of it is stored.
    RolledBack(String),
    /// Nobody knows whether it committed.
    Unknown(String),
}

/// Creates `path` if it is missing, and makes it readable and writable by
/// its owner only.
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    if file.metadata()?.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    ///
    /// The file is created, or tightened, to mode 0600 whatever the umask,
    /// before SQLite opens it; SQLite gives its `-wal` and `-shm` files the
    /// database file's mode.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        owner_only(path).map_err(|e| StoreError::Settings(format!("store file {}: {e}", path.display())))?;
        let connect = || -> Result<Connection, StoreError> {
            let conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            // Savepoint journals stay in memory; a group of writers would
            // otherwise spill them to a temporary file.
            conn.pragma_update(None, "temp_store", "MEMORY")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            Ok(conn)
        };
        let mut conn = connect()?;
        migrate(&mut conn)?;
        Ok(Self::with(
            WriterConn::Sqlite(conn),
            Reader::Sqlite(Mutex::new(connect()?)),
            Instance {
                id: "sqlite".into(),
                presence_key: None,
            },
        ))
    }

    /// Opens the store `config` names.
    pub fn open_config(config: &StoreConfig) -> Result<Self, StoreError> {
        match config {
            StoreConfig::Sqlite { path } => Self::open(path),
            StoreConfig::Postgres(settings) => Self::open_postgres(settings),
        }
    }

    /// Connects to PostgreSQL and applies pending migrations. Several
    /// instances may open one database at once.
    pub fn open_postgres(settings: &postgres::PgSettings) -> Result<Self, StoreError> {
        let backend = postgres::PgBackend::open(settings)?;
        let writer = backend.writer()?;
        let instance = backend.instance();
        Ok(Self::with(
            WriterConn::Postgres(Some(writer)),
            Reader::Postgres(backend),
            instance,
        ))
    }

    fn with(conn: WriterConn, reader: Reader, instance: Instance) -> Self {
        Self {
            writer: Mutex::new(Writer {
                conn,
                open: None,
                members: 0,
                groups: 0,
                finished: 0,
                failed: Vec::new(),
                txid: None,
                pg_tx: sql::WriteTx::default(),
            }),
            group_done: Condvar::new(),
            writers_waiting: AtomicUsize::new(0),
            commit_failures: AtomicU64::new(0),
            reader,
            instance,
            reachable: AtomicBool::new(true),
        }
    }

    /// This process as the owner of signing leases.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Asks the database for a trivial answer on a read connection (a
    /// broken one is replaced first), and records whether it came
    /// ([`Store::reachable`]). Health checks call it.
    pub fn probe(&self) -> Result<(), StoreError> {
        let answered = self
            .read(|c| c.query_one("SELECT CAST(1 AS BIGINT)", &[], |r| r.get::<i64>(0)))
            .map(|_| ());
        self.reachable.store(answered.is_ok(), Ordering::Relaxed);
        answered
    }

    /// Records that a probe got no answer in time.
    pub fn mark_unreachable(&self) {
        self.reachable.store(false, Ordering::Relaxed);
    }

    /// Whether the last probe answered (true before the first).
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Has `sink` set to each freeze state another instance commits, as
    /// soon as it is announced (PostgreSQL `LISTEN`). On SQLite, one
    /// process owns the file and nothing needs announcing.
    pub fn watch_freeze(&self, sink: std::sync::Arc<AtomicBool>) {
        if let Reader::Postgres(backend) = &self.reader {
            backend.watch_freeze(sink);
        }
    }

    /// What the PostgreSQL connections are doing now; `None` on SQLite.
    pub fn pool_status(&self) -> Option<postgres::PoolStatus> {
        match &self.reader {
            Reader::Sqlite(_) => None,
            Reader::Postgres(backend) => Some(backend.status()),
        }
    }

    /// The writer's connection as a [`Conn`]; `None` on PostgreSQL when it
    /// broke and no new one was taken yet.
    fn writer_conn<'a>(&'a self, writer: &'a Writer) -> Result<Conn<'a>, StoreError> {
        match (&writer.conn, &self.reader) {
            (WriterConn::Sqlite(conn), _) => Ok(Conn::Sqlite(conn)),
            (WriterConn::Postgres(Some(client)), Reader::Postgres(backend)) => {
                Ok(backend.writer_conn(client, &writer.pg_tx))
            }
            _ => Err(StoreError::Unavailable("the write connection is not open".into())),
        }
    }

    /// Runs a transaction-control statement on the writer's connection.
    fn control(&self, writer: &Writer, sql: &str) -> Result<(), StoreError> {
        match self.writer_conn(writer)? {
            Conn::Sqlite(conn) => run_cached(conn, sql),
            pg => pg.batch(sql),
        }
    }

    /// Opens a write transaction: `BEGIN IMMEDIATE` on SQLite; on
    /// PostgreSQL, a fresh connection if the last one broke, then the
    /// transaction and the cross-instance write lock.
    ///
    /// A transaction no group owns (left by a ROLLBACK that failed) holds
    /// nothing anyone was promised, and is ended first rather than wedging
    /// the writer. Only SQLite can have one: a PostgreSQL connection whose
    /// ROLLBACK failed is dropped ([`Store::rollback_if_open`]), so on
    /// PostgreSQL this costs no round trip.
    fn begin(&self, writer: &mut Writer) -> Result<(), StoreError> {
        match (&mut writer.conn, &self.reader) {
            (WriterConn::Sqlite(_), _) => {
                let _ = self.rollback_if_open(writer);
            }
            (WriterConn::Postgres(client), Reader::Postgres(backend)) => {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    // Returned to the pool of one before a new one is taken.
                    *client = None;
                    *client = Some(backend.writer()?);
                }
            }
            (WriterConn::Postgres(_), Reader::Sqlite(_)) => {}
        }
        writer.txid = None;
        if matches!(writer.conn, WriterConn::Sqlite(_)) {
            return self.control(writer, "BEGIN IMMEDIATE");
        }
        // BEGIN goes out with the lock, in one round trip.
        writer.pg_tx.clear_pending();
        let locked = self.writer_conn(writer).and_then(|c| {
            c.defer_control(postgres::BEGIN)?;
            c.query_one(postgres::LOCK, &[], |r| {
                Ok((r.get::<i64>(0)?, r.get::<i64>(1)?, r.get::<Vec<u8>>(2)?))
            })
        });
        match locked {
            Ok((txid, size, chain)) => {
                writer.txid = Some(txid);
                writer.pg_tx.begin(governance::to_u64(size), chain);
                Ok(())
            }
            Err(e) => {
                let _ = self.rollback_if_open(writer);
                Err(e)
            }
        }
    }

    /// After a COMMIT that failed: whether the transaction committed anyway.
    /// SQLite's COMMIT fails without committing. On PostgreSQL the reply may
    /// be lost after the commit happened, so the database is asked, on
    /// another connection, by transaction id.
    fn commit_outcome(&self, writer: &Writer) -> postgres::CommitStatus {
        match (&self.reader, writer.txid) {
            (Reader::Sqlite(_), _) => postgres::CommitStatus::Aborted,
            (Reader::Postgres(backend), Some(txid)) => backend.commit_status(txid),
            (Reader::Postgres(_), None) => postgres::CommitStatus::Unknown("no transaction id".into()),
        }
    }

    /// Rolls back the open transaction, if any: SQLite itself rolls back
    /// after some errors (a full disk), and then there is none. A
    /// PostgreSQL connection that cannot roll back is dropped: closing it
    /// ends its transaction.
    fn rollback_if_open(&self, writer: &mut Writer) -> Result<(), StoreError> {
        match &writer.conn {
            WriterConn::Sqlite(conn) => {
                return match conn.is_autocommit() {
                    true => Ok(()),
                    false => Ok(conn.execute_batch("ROLLBACK")?),
                };
            }
            WriterConn::Postgres(None) => return Ok(()),
            WriterConn::Postgres(Some(_)) => {}
        }
        writer.pg_tx.abandon();
        let rolled_back = self.control(writer, "ROLLBACK");
        if rolled_back.is_err() {
            writer.conn = WriterConn::Postgres(None);
        }
        rolled_back
    }

    /// Runs `f` in a savepoint of the open transaction: released when `f`
    /// succeeds, rolled back when it fails, so a failed writer leaves nothing
    /// behind in a group another writer commits. On PostgreSQL the
    /// savepoint and its release go out with the next statement that needs
    /// an answer, and a rollback to it also returns the log's tip to where
    /// it was.
    fn run_in_savepoint<T, E: From<StoreError>>(
        &self,
        writer: &Writer,
        f: impl FnOnce(Conn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = self.writer_conn(writer)?;
        let tip = writer.pg_tx.save_tip();
        conn.defer_control("SAVEPOINT writer")?;
        let result = f(conn);
        let end = match result {
            Ok(_) => conn.defer_control("RELEASE writer"),
            Err(_) => {
                writer.pg_tx.restore_tip(tip);
                self.control(writer, "ROLLBACK TO writer").and_then(|()| {
                    writer.pg_tx.cure();
                    conn.defer_control("RELEASE writer")
                })
            }
        };
        end?;
        result
    }
}

/// Applies pending migrations. `PRAGMA user_version` records how many ran.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: version,
            supported: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
        tracing::info!(version = index + 1, "store migrated");
    }
    Ok(())
}

impl Store {
    /// Inserts a wallet and its audit entry in one transaction;
    /// [`StoreError::Conflict`] if its id, label, key id or public key is
    /// already registered.
    pub fn insert_wallet(&self, wallet: &WalletRecord) -> Result<i64, StoreError> {
        let attributes = serde_json::to_string(&wallet.attributes).map_err(|e| StoreError::Corrupt {
            table: "wallets",
            reason: e.to_string(),
        })?;
        self.write(|tx| {
            let inserted = tx.query_one(
                "INSERT INTO wallets (wallet_id, display_name, key_label, key_id, public_key, attributes, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING seq",
                &[
                    &wallet.wallet_id,
                    &wallet.display_name,
                    &wallet.key_label,
                    &wallet.key_id,
                    &wallet.public_key,
                    &attributes,
                    &wallet.created_at,
                ],
                |r| r.get::<i64>(0),
            );
            let seq = conflict_as(inserted, "wallet")?;
            let a = wallet.attributes;
            let bits = [a.token, a.private, a.sensitive, a.extractable, a.always_sensitive, a.never_extractable]
                .iter()
                .enumerate()
                .fold(0u8, |acc, (bit, set)| acc | (u8::from(*set) << bit));
            audit::append(
                tx,
                governance::to_u64(wallet.created_at),
                custos_core::audit::entry::Event::WalletCreated {
                    wallet_id: wallet.wallet_id.clone(),
                    key_label: wallet.key_label.clone(),
                    key_id: wallet.key_id.clone(),
                    public_key: wallet.public_key.clone(),
                    attributes: bits,
                },
            )?;
            Ok(seq)
        })
    }

    /// One wallet by id.
    pub fn wallet(&self, wallet_id: &str) -> Result<Option<WalletRecord>, StoreError> {
        self.read(|conn| {
            conn.query_opt(
                &format!("{SELECT_WALLET} WHERE wallet_id = ?1"),
                &[&wallet_id],
                wallet_row,
            )
        })
    }

    /// Up to `limit` wallets with `seq > after`, in creation order.
    pub fn wallets_after(&self, after: i64, limit: usize) -> Result<Vec<WalletRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|conn| {
            conn.query(
                &format!("{SELECT_WALLET} WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
                &[&after, &limit],
                wallet_row,
            )
        })
    }

    /// Runs `f` as one atomic unit of a `BEGIN IMMEDIATE` transaction and
    /// returns once that transaction committed; if `f` fails, its changes
    /// are rolled back and the error returned. Writers run one at a time, so
    /// whatever `f` reads stays true until commit; writers that queued up
    /// meanwhile share one commit (see the module docs).
    pub fn write<T, E: From<StoreError>>(&self, f: impl FnOnce(Conn<'_>) -> Result<T, E>) -> Result<T, E> {
        self.writers_waiting.fetch_add(1, Ordering::SeqCst);
        let mut writer = lock(&self.writer);
        self.writers_waiting.fetch_sub(1, Ordering::SeqCst);
        let group = match writer.open {
            Some(group) => group,
            None => {
                self.begin(&mut writer)?;
                writer.groups += 1;
                let group = writer.groups;
                writer.open = Some(group);
                writer.members = 0;
                group
            }
        };
        writer.members += 1;
        // The writer that opened the group needs no savepoint: alone in the
        // transaction, a failure rolls back the whole of it. Savepoints copy
        // every page they touch to a journal first.
        let opened_group = writer.members == 1;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if opened_group {
                f(self.writer_conn(&writer)?)
            } else {
                self.run_in_savepoint(&writer, f)
            }
        }));
        let result = match run {
            Ok(result) => result,
            Err(panic) => {
                // What the writer left half-done must not reach the next
                // commit: the whole group fails, and every writer in it.
                let _ = self.rollback_if_open(&mut writer);
                self.group_failed(
                    &mut writer,
                    group,
                    GroupFailure::RolledBack("a writer panicked".into()),
                );
                drop(writer);
                std::panic::resume_unwind(panic);
            }
        };
        if opened_group && result.is_err() {
            let rolled_back = self.rollback_if_open(&mut writer);
            self.end_group(&mut writer, group);
            rolled_back?;
            return result;
        }
        // A bounded group: under a steady stream of writers someone must
        // commit, or the first in the group would wait for ever.
        if self.writers_waiting.load(Ordering::SeqCst) > 0 && writer.members < MAX_GROUP {
            // A writer is in line: it (or the last one after it) commits.
            while writer.finished < group {
                writer = self
                    .group_done
                    .wait(writer)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        } else if let Some(why) = writer.pg_tx.poisoned() {
            // PostgreSQL aborted the transaction when a statement failed; a
            // COMMIT would be answered with a silent rollback.
            let _ = self.rollback_if_open(&mut writer);
            self.group_failed(&mut writer, group, GroupFailure::RolledBack(why));
        } else {
            match self.control(&writer, "COMMIT") {
                Ok(()) => self.end_group(&mut writer, group),
                Err(e) => match self.commit_outcome(&writer) {
                    postgres::CommitStatus::Committed => {
                        tracing::warn!(error = %e, "the COMMIT reply was lost, but the transaction committed");
                        let _ = self.rollback_if_open(&mut writer);
                        self.end_group(&mut writer, group);
                    }
                    postgres::CommitStatus::Aborted => {
                        let _ = self.rollback_if_open(&mut writer);
                        self.group_failed(&mut writer, group, GroupFailure::RolledBack(e.to_string()));
                    }
                    postgres::CommitStatus::Unknown(why) => {
                        // The connection is not trusted again.
                        writer.pg_tx.abandon();
                        writer.conn = WriterConn::Postgres(None);
                        self.group_failed(&mut writer, group, GroupFailure::Unknown(format!("{e}; {why}")));
                    }
                },
            }
        }
        if let Some((_, failure)) = writer.failed.iter().find(|(g, _)| *g == group) {
            tracing::error!(error = ?failure, "store commit failed");
            return Err(match failure.clone() {
                GroupFailure::RolledBack(why) => StoreError::CommitFailed(why),
                GroupFailure::Unknown(why) => StoreError::CommitUnknown(why),
            }
            .into());
        }
        result
    }

    /// Ends `group` as failed (its transaction already rolled back): every
    /// writer in it returns [`StoreError::CommitFailed`], and whatever they
    /// cached is void.
    fn group_failed(&self, writer: &mut Writer, group: u64, failure: GroupFailure) {
        self.commit_failures.fetch_add(1, Ordering::SeqCst);
        writer.failed.push((group, failure));
        // Only recent failures can still have a waiter.
        if writer.failed.len() > 64 {
            writer.failed.remove(0);
        }
        self.end_group(writer, group);
    }

    /// Closes `group` and wakes the writers waiting on its outcome.
    fn end_group(&self, writer: &mut Writer, group: u64) {
        writer.open = None;
        writer.finished = group;
        self.group_done.notify_all();
    }

    /// How many group commits failed so far. Whatever a writer cached from
    /// uncommitted writes is void once this changes; it changes before the
    /// next writer runs.
    pub fn commit_failures(&self) -> u64 {
        self.commit_failures.load(Ordering::SeqCst)
    }

    /// Runs `f` with the read connection, which sees committed data only.
    pub fn read<T, E: From<StoreError>>(&self, f: impl FnOnce(Conn<'_>) -> Result<T, E>) -> Result<T, E> {
        match &self.reader {
            Reader::Sqlite(conn) => f(Conn::Sqlite(&lock(conn))),
            Reader::Postgres(backend) => backend.read(f),
        }
    }
}

/// Runs one transaction-control statement, parsed once per connection.
fn run_cached(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

// A panic inside a writer fails its whole group (see `Store::write`), and a
// reader holds no transaction across calls, so a poisoned lock guards
// nothing half-applied: continue.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Maps a constraint violation to [`StoreError::Conflict`] naming `what`.
pub(crate) fn conflict_as<T>(result: Result<T, StoreError>, what: &'static str) -> Result<T, StoreError> {
    match result {
        Err(e) if e.is_constraint() => Err(StoreError::Conflict(what)),
        other => other,
    }
}

impl StoreError {
    /// Whether a constraint (uniqueness, CHECK, foreign key, NOT NULL)
    /// refused the statement: SQLite's constraint error, or a PostgreSQL
    /// SQLSTATE of class 23 (integrity constraint violation).
    pub fn is_constraint(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == ErrorCode::ConstraintViolation
            }
            StoreError::Postgres(e) => e.code().is_some_and(|code| code.code().starts_with("23")),
            _ => false,
        }
    }
}

const SELECT_WALLET: &str =
    "SELECT seq, wallet_id, display_name, key_label, key_id, public_key, attributes, created_at FROM wallets";

fn wallet_row(row: &Row<'_, '_>) -> Result<WalletRecord, StoreError> {
    let attributes: String = row.get(6)?;
    let attributes = match serde_json::from_str::<StoredAttributes>(&attributes) {
        Ok(a) => a.into(),
        Err(e) => {
            return Err(StoreError::Corrupt {
                table: "wallets",
                reason: format!("attributes: {e}"),
            });
        }
    };
    Ok(WalletRecord {
        seq: row.get(0)?,
        wallet_id: row.get(1)?,
        display_name: row.get(2)?,
        key_label: row.get(3)?,
        key_id: row.get(4)?,
        public_key: row.get(5)?,
        attributes,
        created_at: row.get(7)?,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredAttributes {
    token: bool,
    private: bool,
    sensitive: bool,
    extractable: bool,
    always_sensitive: bool,
    never_extractable: bool,
}

impl From<StoredAttributes> for KeyAttributes {
    fn from(a: StoredAttributes) -> Self {
        KeyAttributes {
            token: a.token,
            private: a.private,
            sensitive: a.sensitive,
            extractable: a.extractable,
            always_sensitive: a.always_sensitive,
            never_extractable: a.never_extractable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers from many threads: every successful write is durable and
    /// visible to the reader once `write` returns, a failing writer leaves
    /// nothing behind even though others commit its group, and limits read
    /// inside a write stay exact (a counter incremented by every writer).
    #[test]
    fn concurrent_writers_share_commits_and_a_failed_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&dir.path().join("g.db")).unwrap());
        store
            .write(|c| {
                c.batch("CREATE TABLE t (v INTEGER PRIMARY KEY); CREATE TABLE n (id INTEGER PRIMARY KEY, k INTEGER);")?;
                c.execute("INSERT INTO n VALUES (1, 0)", &[])?;
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..50u32 {
                        let v = t * 1000 + i;
                        let result = store.write(|c| {
                            c.execute("INSERT INTO t VALUES (?1)", &[&i64::from(v)])?;
                            c.execute("UPDATE n SET k = k + 1 WHERE id = 1", &[])?;
                            if v % 10 == 0 {
                                return Err(StoreError::Conflict("refused on purpose"));
                            }
                            Ok(())
                        });
                        assert_eq!(result.is_ok(), v % 10 != 0);
                        if result.is_ok() {
                            let seen: i64 = store
                                .read(|c| {
                                    c.query_one(
                                        "SELECT COUNT(*) FROM t WHERE v = ?1",
                                        &[&i64::from(v)],
                                        |r| r.get(0),
                                    )
                                })
                                .unwrap();
                            assert_eq!(seen, 1, "a returned write is visible to readers");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (rows, failed, counter): (i64, i64, i64) = store
            .read(|c| {
                Ok::<_, StoreError>((
                    c.query_one("SELECT COUNT(*) FROM t", &[], |r| r.get(0))?,
                    c.query_one("SELECT COUNT(*) FROM t WHERE v % 10 = 0", &[], |r| r.get(0))?,
                    c.query_one("SELECT k FROM n", &[], |r| r.get(0))?,
                ))
            })
            .unwrap();
        assert_eq!((rows, failed, counter), (8 * 45, 0, 8 * 45));
        drop(store);
        let reopened = Store::open(&dir.path().join("g.db")).unwrap();
        let durable: i64 = reopened
            .read(|c| c.query_one("SELECT COUNT(*) FROM t", &[], |r| r.get(0)))
            .unwrap();
        assert_eq!(durable, 8 * 45);
    }

    /// A store at `path` with a table `t (v INTEGER PRIMARY KEY)`.
    fn store_with_table(path: &Path) -> Store {
        let store = Store::open(path).unwrap();
        store
            .write(|c| c.batch("CREATE TABLE t (v INTEGER PRIMARY KEY)"))
            .unwrap();
        store
    }

    /// Rows in `t`, as a reader sees them.
    fn count(store: &Store) -> i64 {
        store
            .read(|c| c.query_one("SELECT COUNT(*) FROM t", &[], |r| r.get(0)))
            .unwrap()
    }

    /// A writer alone in its transaction runs without a savepoint: when it
    /// fails, the whole transaction is rolled back, and the next writer opens
    /// a fresh one.
    #[test]
    fn a_lone_failing_writer_leaves_nothing_and_the_next_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_table(&dir.path().join("l.db"));
        let failed = store.write(|c| {
            c.execute("INSERT INTO t VALUES (1)", &[])?;
            Err::<(), _>(StoreError::Conflict("refused on purpose"))
        });
        assert!(matches!(failed, Err(StoreError::Conflict(_))));
        assert_eq!(count(&store), 0);
        // A statement error inside the writer, then a good writer.
        assert!(
            store
                .write(|c| c.execute("INSERT INTO missing VALUES (1)", &[]).map(|_| ()))
                .is_err()
        );
        store
            .write(|c| c.execute("INSERT INTO t VALUES (2)", &[]).map(|_| ()))
            .unwrap();
        assert_eq!(count(&store), 1);
        drop(store);
        assert_eq!(count(&Store::open(&dir.path().join("l.db")).unwrap()), 1);
    }

    /// A writer that panics fails its whole group: nothing it or the writers
    /// before it in the group wrote is committed, they are told so, and the
    /// store goes on.
    #[test]
    fn a_panicking_writer_fails_its_group_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(store_with_table(&dir.path().join("p.db")));
        let failures = store.commit_failures();

        // Alone in its transaction.
        let lone = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.write(|c| -> Result<(), StoreError> {
                c.execute("INSERT INTO t VALUES (1)", &[])?;
                panic!("writer fails half-way");
            })
        }));
        assert!(lone.is_err());
        assert_eq!(count(&store), 0);
        assert_eq!(store.commit_failures(), failures + 1);

        // After another writer in the same group: the opener's closure waits
        // until the second writer is in line, so the second joins its group.
        let (inside, opener_inside) = std::sync::mpsc::channel();
        let opener = {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                store.write(|c| {
                    c.execute("INSERT INTO t VALUES (2)", &[])?;
                    inside.send(()).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    Ok::<_, StoreError>(())
                })
            })
        };
        opener_inside.recv().unwrap();
        let joiner = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.write(|c| -> Result<(), StoreError> {
                c.execute("INSERT INTO t VALUES (3)", &[])?;
                panic!("joiner fails half-way");
            })
        }));
        assert!(joiner.is_err());
        assert!(matches!(opener.join().unwrap(), Err(StoreError::CommitFailed(_))));
        assert_eq!(count(&store), 0);

        store
            .write(|c| c.execute("INSERT INTO t VALUES (4)", &[]).map(|_| ()))
            .unwrap();
        assert_eq!(count(&store), 1);
    }

    fn record(id: &str, key: u8) -> WalletRecord {
        WalletRecord {
            seq: 0,
            wallet_id: id.into(),
            display_name: "d".into(),
            key_label: format!("label-{id}"),
            key_id: vec![key; 16],
            public_key: vec![key; 33],
            attributes: KeyAttributes {
                token: true,
                private: true,
                sensitive: true,
                extractable: false,
                always_sensitive: true,
                never_extractable: true,
            },
            created_at: 1,
        }
    }

    #[test]
    fn wallets_round_trip_and_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        wallets_case(&Store::open(&dir.path().join("c.db")).unwrap());
    }

    /// The same on PostgreSQL, where each insert also appends its audit entry
    /// and Merkle nodes.
    #[test]
    fn postgres_wallets_round_trip_and_are_unique() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let store = Store::open_postgres(&settings).unwrap();
        wallets_case(&store);
        assert_eq!(store.read(audit::size).unwrap(), 2);
        // A second instance on the same database migrates nothing and sees it all.
        let other = Store::open_postgres(&settings).unwrap();
        assert!(other.wallet("a").unwrap().is_some());
        assert_eq!(other.read(|c| audit::entries(c, 0, 2)).unwrap().len(), 2);
    }

    /// Inserts, conflicts and pages wallets in `store`.
    fn wallets_case(store: &Store) {
        let seq = store.insert_wallet(&record("a", 1)).unwrap();
        let got = store.wallet("a").unwrap().unwrap();
        assert_eq!(
            got,
            WalletRecord {
                seq,
                ..record("a", 1)
            }
        );
        assert!(matches!(
            store.insert_wallet(&record("a", 2)),
            Err(StoreError::Conflict(_))
        ));
        // Same key under another id is refused by the constraint too.
        assert!(matches!(
            store.insert_wallet(&record("b", 1)),
            Err(StoreError::Conflict(_))
        ));
        store.insert_wallet(&record("c", 3)).unwrap();
        let page = store.wallets_after(seq, 10).unwrap();
        assert_eq!(
            page.iter().map(|w| w.wallet_id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert!(store.wallet("zz").unwrap().is_none());
    }

    /// Two instances on one PostgreSQL database, eight threads each, do a
    /// read-modify-write of one counter in application code inside
    /// `Store::write`: the count is exact only if every write transaction,
    /// from either instance, runs alone from its read to its commit. A
    /// failing writer leaves nothing behind in the group others commit.
    /// A COMMIT that fails is resolved by transaction id: here the
    /// connection dies inside COMMIT (a deferred trigger terminates its own
    /// backend), the database says the transaction aborted, and the writer
    /// reports that nothing was stored; a committed transaction's id reads
    /// as committed.
    #[test]
    fn postgres_a_failed_commit_is_resolved_by_its_transaction_id() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let store = Store::open_postgres(&settings).unwrap();
        store
            .write(|c| {
                c.batch(
                    "CREATE TABLE t (v BIGINT PRIMARY KEY);
                    CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$;
                    CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON t
                        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.v < 0)
                        EXECUTE FUNCTION die_at_commit();",
                )
            })
            .unwrap();
        let txid = store
            .write(|c| {
                c.execute("INSERT INTO t VALUES (1)", &[])?;
                c.query_one("SELECT txid_current()", &[], |r| r.get::<i64>(0))
            })
            .unwrap();
        let Reader::Postgres(backend) = &store.reader else {
            unreachable!("a PostgreSQL store")
        };
        assert_eq!(backend.commit_status(txid), postgres::CommitStatus::Committed);

        let failures = store.commit_failures();
        let died = store.write(|c| c.execute("INSERT INTO t VALUES (-1)", &[]).map(|_| ()));
        assert!(matches!(died, Err(StoreError::CommitFailed(_))), "{died:?}");
        assert_eq!(store.commit_failures(), failures + 1);
        store
            .write(|c| c.execute("INSERT INTO t VALUES (2)", &[]).map(|_| ()))
            .unwrap();
        let stored: Vec<i64> = store
            .read(|c| c.query("SELECT v FROM t ORDER BY v", &[], |r| r.get(0)))
            .unwrap();
        assert_eq!(stored, vec![1, 2]);
    }

    #[test]
    fn postgres_writers_of_two_instances_run_one_at_a_time() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let a = std::sync::Arc::new(Store::open_postgres(&settings).unwrap());
        let b = std::sync::Arc::new(Store::open_postgres(&settings).unwrap());
        a.write(|c| {
            c.batch("CREATE TABLE t (v BIGINT PRIMARY KEY); CREATE TABLE n (id BIGINT PRIMARY KEY, k BIGINT NOT NULL); INSERT INTO n VALUES (1, 0);")
        })
        .unwrap();
        let threads: Vec<_> = (0..16u32)
            .map(|t| {
                let store = std::sync::Arc::clone(if t % 2 == 0 { &a } else { &b });
                std::thread::spawn(move || {
                    for i in 0..25u32 {
                        let v = i64::from(t * 1000 + i);
                        let result = store.write(|c| {
                            let k: i64 = c.query_one("SELECT k FROM n WHERE id = 1", &[], |r| r.get(0))?;
                            c.execute("INSERT INTO t VALUES (?1)", &[&v])?;
                            c.execute("UPDATE n SET k = ?1 WHERE id = 1", &[&(k + 1)])?;
                            if v % 10 == 0 {
                                return Err(StoreError::Conflict("refused on purpose"));
                            }
                            Ok(())
                        });
                        assert_eq!(result.is_ok(), v % 10 != 0, "{result:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (rows, counter): (i64, i64) = b
            .read(|c| {
                Ok::<_, StoreError>((
                    c.query_one("SELECT COUNT(*) FROM t", &[], |r| r.get(0))?,
                    c.query_one("SELECT k FROM n", &[], |r| r.get(0))?,
                ))
            })
            .unwrap();
        let kept = (0..16u32)
            .flat_map(|t| (0..25u32).map(move |i| t * 1000 + i))
            .filter(|v| v % 10 != 0)
            .count();
        let kept = i64::try_from(kept).unwrap();
        assert_eq!((rows, counter), (kept, kept));
    }

    /// Settings that would send a password in the clear, or keep it in the
    /// URL, are refused before any connection is made, naming the fix.
    #[test]
    fn postgres_settings_that_leak_the_password_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for (url, ca_file, expected) in [
            ("postgres://custos:pw@127.0.0.1/custos", None, "password_file"),
            (
                "postgres://custos@db.example.com/custos",
                None,
                "set store.ca_file",
            ),
            (
                "postgres://custos@127.0.0.1/custos?sslmode=require",
                None,
                "sslmode=require needs store.ca_file",
            ),
            (
                "postgres://custos@db.example.com/custos",
                Some(empty.clone()),
                "no certificate in the file",
            ),
            (
                "postgres://custos@db.example.com/custos",
                Some(dir.path().join("absent.pem")),
                "absent.pem",
            ),
            (
                "postgres://custos@db.example.com/custos?sslmode=disable",
                Some(empty.clone()),
                "no certificate",
            ),
        ] {
            let settings = postgres::PgSettings {
                url: url.into(),
                password_file: None,
                ca_file,
                read_pool: 1,
            };
            match Store::open_postgres(&settings) {
                Err(StoreError::Settings(message)) => {
                    assert!(message.contains(expected), "{url}: {message}");
                    assert!(!message.contains("pw@"), "{message}");
                }
                other => panic!("{url}: {:?}", other.map(|_| ())),
            }
        }
    }

    /// With `ca_file`, every connection is TLS and the server's certificate
    /// is verified: by the CA, and by the host name in the URL. A server
    /// certificate from another CA, or for another name, is refused before
    /// anything is sent.
    #[test]
    fn postgres_connections_are_tls_verified_against_the_ca_file() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        assert!(
            settings.ca_file.is_some(),
            "scripts/test.sh sets CUSTOS_TEST_POSTGRES_CA_FILE with the URL"
        );
        let store = Store::open_postgres(&settings).unwrap();
        let ssl = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        assert!(
            store
                .read(|c| c.query_one(ssl, &[], |r| r.get::<bool>(0)))
                .unwrap()
        );
        assert!(
            store
                .write(|c| c.query_one(ssl, &[], |r| r.get::<bool>(0)))
                .unwrap()
        );
        drop(store);

        let dir = tempfile::tempdir().unwrap();
        let other_ca = crate::tls::dev_pki::ensure(dir.path()).unwrap().ca_cert;
        let wrong_name = settings.url.replacen("127.0.0.1", "db.invalid", 1) + "?hostaddr=127.0.0.1";
        for (url, ca_file, expected) in [
            (settings.url.clone(), other_ca, "UnknownIssuer"),
            (
                wrong_name,
                settings.ca_file.clone().unwrap(),
                "not valid for name \"db.invalid\"",
            ),
        ] {
            let refused = postgres::PgSettings {
                url,
                ca_file: Some(ca_file),
                ..settings.clone()
            };
            match Store::open_postgres(&refused) {
                Err(e) => assert!(e.to_string().contains(expected), "{e}"),
                Ok(_) => panic!("{refused:?} connected"),
            }
        }
    }

    /// A freeze committed by one instance reaches another's freeze hint by
    /// notification, with no read or write on the second; so does the
    /// unfreeze.
    #[test]
    fn postgres_a_freeze_is_announced_to_other_instances() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let a = Store::open_postgres(&settings).unwrap();
        let b = Store::open_postgres(&settings).unwrap();
        let hint = std::sync::Arc::new(AtomicBool::new(false));
        b.watch_freeze(std::sync::Arc::clone(&hint));
        for (epoch, frozen) in [(0, true), (1, false)] {
            a.write(|c| governance::set_frozen(c, frozen, epoch, "[]", 1_000 + epoch))
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while hint.load(Ordering::SeqCst) != frozen {
                assert!(
                    std::time::Instant::now() < deadline,
                    "freeze {frozen} not announced"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// Two instances append in turn, from many threads, several entries per
    /// transaction, while some writers fail inside commits others share (so
    /// their savepoint is rolled back, and the log's tip with it): the log
    /// holds exactly the entries of the writes that succeeded, in one
    /// gapless sequence, and the tree nodes stored through each instance's
    /// kept tip give the root of those entries as stored.
    #[test]
    fn postgres_instances_appending_in_turn_keep_one_tree() {
        use custos_core::audit::entry::Event;
        use custos_core::audit::merkle::{self, MemoryNodes};
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let instances: Vec<_> = (0..2)
            .map(|_| std::sync::Arc::new(Store::open_postgres(&settings).unwrap()))
            .collect();
        let event = |n: u64| Event::PolicyProposed {
            hash: [u8::try_from(n % 251).unwrap(); 32],
            version: n,
            document: n.to_be_bytes().to_vec(),
        };
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let store = std::sync::Arc::clone(&instances[usize::try_from(t % 2).unwrap()]);
                std::thread::spawn(move || {
                    let mut appended = 0u64;
                    for i in 0..25u64 {
                        let n = t * 1_000 + i;
                        let entries = 1 + (i % 3);
                        let fails = i % 5 == 4;
                        let written = store.write(|c| {
                            for k in 0..entries {
                                audit::append(c, n, event(n * 10 + k))?;
                            }
                            match fails {
                                true => Err(StoreError::Conflict("this writer fails after appending")),
                                false => Ok(()),
                            }
                        });
                        assert_eq!(written.is_ok(), !fails, "{written:?}");
                        if !fails {
                            appended += entries;
                        }
                    }
                    appended
                })
            })
            .collect();
        let appended: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let store = &instances[0];
        let size = store.read(audit::size).unwrap();
        assert_eq!(size, appended);
        let entries = store.read(|c| audit::entries(c, 0, size)).unwrap();
        assert_eq!(entries.len() as u64, size, "one gapless sequence");
        let mut tree = MemoryNodes::new();
        for entry in &entries {
            tree.append(merkle::leaf_hash(entry));
        }
        for store in &instances {
            let stored = store
                .read(|c| Ok::<_, StoreError>(merkle::root(&audit::SqlNodes(c), size)))
                .unwrap()
                .unwrap();
            assert_eq!(stored, merkle::root(&tree, size).unwrap());
        }
    }

    /// A deferred statement that fails aborts its transaction: the write
    /// fails, nothing of it is stored (PostgreSQL would answer its COMMIT
    /// with a silent rollback), and the next write works. So does a failed
    /// statement whose error the closure swallowed. An audit entry that is
    /// not the next index is refused by the database itself.
    #[test]
    fn postgres_a_failed_deferred_statement_fails_its_write_and_stores_nothing() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let store = Store::open_postgres(&settings).unwrap();
        store.insert_wallet(&record("a", 1)).unwrap();
        let written = store.write(|c| {
            c.execute("UPDATE governance SET frozen = 1 WHERE id = 1", &[])?;
            // Level 99 breaks merkle_nodes' CHECK; nothing answers until COMMIT.
            c.defer(
                "INSERT INTO merkle_nodes (level, idx, hash) VALUES (?1, ?2, ?3)",
                vec![Box::new(99i64), Box::new(0i64), Box::new(vec![0u8; 32])],
            )
        });
        assert!(matches!(written, Err(StoreError::CommitFailed(_))), "{written:?}");
        assert!(
            !store.read(governance::state).unwrap().frozen,
            "nothing of the write is stored"
        );
        // A failed statement the closure swallows fails the write too.
        let swallowed = store.write(|c| {
            c.execute("UPDATE governance SET frozen = 1 WHERE id = 1", &[])?;
            let refused = c.execute("UPDATE governance SET frozen = 7 WHERE id = 1", &[]);
            assert!(refused.is_err(), "frozen is 0 or 1");
            Ok::<_, StoreError>(())
        });
        assert!(
            matches!(swallowed, Err(StoreError::CommitFailed(_))),
            "{swallowed:?}"
        );
        assert!(
            !store.read(governance::state).unwrap().frozen,
            "nothing of the swallowed write is stored"
        );
        let skipped = store.write(|c| {
            c.execute(
                "INSERT INTO audit_log (idx, time, entry) VALUES (?1, 0, ?2)",
                &[&5i64, &vec![0u8]],
            )
        });
        assert!(
            format!("{skipped:?}").contains("is not the next one"),
            "{skipped:?}"
        );
        store.insert_wallet(&record("b", 2)).unwrap();
        assert_eq!(store.read(audit::size).unwrap(), 2);
    }

    /// The PostgreSQL log refuses updates, deletes and truncation, as the
    /// SQLite one refuses updates and deletes.
    #[test]
    fn postgres_log_is_append_only() {
        let Some(settings) = postgres::test_database() else {
            eprintln!("CUSTOS_TEST_POSTGRES_URL is not set (scripts/test.sh sets it); skipped");
            return;
        };
        let store = Store::open_postgres(&settings).unwrap();
        store.insert_wallet(&record("a", 1)).unwrap();
        for sql in [
            "UPDATE audit_log SET time = 0",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
            "DELETE FROM merkle_nodes",
            "UPDATE log_head SET id = 1",
        ] {
            let result = store.write(|c| c.execute(sql, &[]));
            if sql.contains("log_head") {
                // The lock row itself may be touched; it holds nothing.
                assert!(result.is_ok(), "{sql}: {result:?}");
            } else {
                assert!(
                    format!("{:?}", result.unwrap_err()).contains("append-only"),
                    "{sql}"
                );
            }
        }
        assert_eq!(store.read(audit::size).unwrap(), 1);
    }

    #[test]
    fn the_store_and_its_wal_files_are_owner_only_whatever_their_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.path().join("fresh.db");
        let loose = dir.path().join("loose.db");
        std::fs::write(&loose, b"").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o666)).unwrap();
        for path in [&fresh, &loose] {
            let store = Store::open(path).unwrap();
            store.probe().unwrap();
            let wal = path.with_extension("db-wal");
            let shm = path.with_extension("db-shm");
            for file in [path.clone(), wal, shm] {
                assert!(file.exists(), "{}", file.display());
                assert_eq!(mode(&file), 0o600, "{}", file.display());
            }
        }
    }

    #[test]
    fn reopen_keeps_data_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        Store::open(&path)
            .unwrap()
            .insert_wallet(&record("a", 1))
            .unwrap();
        let store = Store::open(&path).unwrap();
        assert!(store.wallet("a").unwrap().is_some());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(Store::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
