//! The PostgreSQL backend: its connection settings, its pools, its schema
//! and migrations, and the write lock that serialises writers across
//! instances.
//!
//! The store is blocking and PostgreSQL's client (tokio-postgres, pooled by
//! deadpool-postgres) is async, so the backend owns a small private runtime
//! that drives the connections; store calls block on it (see
//! `sql::block_on`). Writes use one connection per instance, taken
//! from a pool of one so that a broken connection is replaced on the next
//! transaction; reads use a pool of their own.
//!
//! Every write transaction starts by locking the single `log_head` row
//! (`SELECT … FOR UPDATE`). Every instance's writer takes that lock first,
//! so writers run one at a time across all instances, exactly as SQLite's
//! one writer does within one: whatever a write closure reads (a request
//! id, the rolling usage, the freeze flag, the log size) stays true until it
//! commits. Statements read committed data (`READ COMMITTED`), so the next
//! lock holder sees everything the previous one committed.
//!
//! Each process also holds a *presence* lock: a session advisory lock on a
//! random key, on a connection of its own, for as long as it is connected.
//! The same connection listens on the `custos_freeze` channel, where every freeze
//! and unfreeze is announced as it commits, so each instance's pre-sign
//! freeze hint learns of another's freeze at once.
//! A dead instance's connection closes and PostgreSQL drops the lock with
//! it, which is how the others know they may take over its signing leases
//! (see `withdrawals::claim_signing`).
//!
//! The schema has the same tables, constraints and append-only rules as the
//! SQLite one, written for PostgreSQL: `BIGINT` for integers, `BYTEA` for
//! blobs, identity columns for insertion order, and triggers that refuse an
//! update or delete of the log. `custos_schema` records how many migrations
//! ran; a session advisory lock keeps instances started together from
//! migrating at once.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;

use super::StoreError;
use super::sql::{Conn, Pg, WriteTx, block_on};

/// How to reach PostgreSQL.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/database`; a password in it is refused.
    pub url: String,
    /// A file (mode 0600) holding the password.
    pub password_file: Option<PathBuf>,
    /// The CA certificates (PEM) that sign the server's certificate. When
    /// set, every connection uses TLS and verifies the server's certificate
    /// and host name; without it, only a loopback or unix-socket address is
    /// accepted, in plaintext.
    pub ca_file: Option<PathBuf>,
    /// Reads allowed at once.
    pub read_pool: usize,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.redacted_url())
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("read_pool", &self.read_pool)
            .finish()
    }
}

/// One pool's connections now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// The most it opens.
    pub max: usize,
    /// Open now.
    pub open: usize,
    /// Open and idle.
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

impl From<deadpool_postgres::Status> for PoolUse {
    fn from(status: deadpool_postgres::Status) -> Self {
        Self {
            max: status.max_size,
            open: status.size,
            idle: status.available,
            waiting: status.waiting,
        }
    }
}

/// What a PostgreSQL store's connections are doing now, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// The writer's pool (one connection).
    pub writer: PoolUse,
    /// The read pool.
    pub reader: PoolUse,
    /// Whether this process holds its presence lock now; while it does not,
    /// other instances may take over its signing leases.
    pub presence: bool,
}

/// The connections of a PostgreSQL store.
pub(crate) struct PgBackend {
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    /// The key of this process's presence lock (see [`super::Instance`]).
    presence_key: i64,
    /// Set while the presence lock is held.
    presence: Arc<AtomicBool>,
    /// Told of every freeze and unfreeze any instance commits.
    freeze_sinks: Arc<FreezeSinks>,
    writer_pool: Pool,
    reader_pool: Pool,
}

/// Migrations, applied in order; `custos_schema.version` counts how many ran.
/// Each keeps the meaning of the SQLite migration of the same number.
const MIGRATIONS: &[&str] = &[
    // 1: wallets.
    "CREATE TABLE wallets (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        wallet_id TEXT NOT NULL UNIQUE,
        display_name TEXT NOT NULL,
        key_label TEXT NOT NULL UNIQUE,
        key_id BYTEA NOT NULL UNIQUE,
        public_key BYTEA NOT NULL UNIQUE,
        attributes TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );",
    // 2: policies, freeze state, withdrawals, approvals.
    "CREATE TABLE policies (
        hash BYTEA PRIMARY KEY CHECK (length(hash) = 32),
        version BIGINT NOT NULL CHECK (version > 0),
        document BYTEA NOT NULL,
        proposed_at BIGINT NOT NULL,
        activated_at BIGINT
    );
    CREATE UNIQUE INDEX policies_activated_version ON policies(version) WHERE activated_at IS NOT NULL;
    CREATE TABLE policy_signatures (
        policy_hash BYTEA NOT NULL REFERENCES policies(hash),
        admin TEXT NOT NULL,
        message BYTEA NOT NULL UNIQUE,
        signature BYTEA NOT NULL,
        signed_at BIGINT NOT NULL,
        PRIMARY KEY (policy_hash, admin)
    );
    CREATE TABLE governance (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        active_version BIGINT,
        frozen BIGINT NOT NULL CHECK (frozen IN (0, 1)),
        freeze_epoch BIGINT NOT NULL
    );
    INSERT INTO governance (id, active_version, frozen, freeze_epoch) VALUES (1, NULL, 0, 0);
    CREATE TABLE freeze_events (
        epoch BIGINT PRIMARY KEY,
        action TEXT NOT NULL CHECK (action IN ('FREEZE', 'UNFREEZE')),
        signatures TEXT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE TABLE withdrawals (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        withdrawal_id TEXT NOT NULL UNIQUE,
        request_id TEXT NOT NULL UNIQUE,
        request_hash BYTEA NOT NULL,
        wallet_id TEXT NOT NULL,
        initiator TEXT NOT NULL,
        chain TEXT NOT NULL CHECK (chain IN ('ethereum', 'bitcoin')),
        unsigned_tx BYTEA NOT NULL,
        intent TEXT NOT NULL,
        intent_hash BYTEA NOT NULL CHECK (length(intent_hash) = 32),
        asset TEXT NOT NULL,
        amount TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('PENDING_APPROVAL', 'APPROVED', 'SIGNED', 'DENIED', 'REJECTED', 'EXPIRED', 'CANCELLED')),
        decision TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        counted_at BIGINT,
        updated_at BIGINT NOT NULL,
        signed_tx BYTEA,
        signed_tx_hash BYTEA,
        CHECK ((state IN ('APPROVED', 'SIGNED')) = (counted_at IS NOT NULL)),
        CHECK ((state = 'SIGNED') = (signed_tx IS NOT NULL))
    );
    CREATE INDEX withdrawals_usage ON withdrawals(wallet_id, asset, counted_at) WHERE counted_at IS NOT NULL;
    CREATE INDEX withdrawals_by_state ON withdrawals(state, seq);
    CREATE TABLE approvals (
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        withdrawal_id TEXT NOT NULL REFERENCES withdrawals(withdrawal_id),
        approver TEXT NOT NULL,
        vote TEXT NOT NULL CHECK (vote IN ('APPROVE', 'REJECT')),
        message BYTEA NOT NULL UNIQUE,
        signature BYTEA NOT NULL,
        submitted_at BIGINT NOT NULL,
        PRIMARY KEY (withdrawal_id, approver)
    );",
    // 3: the audit log and its Merkle tree, append-only.
    "CREATE TABLE audit_log (
        idx BIGINT PRIMARY KEY CHECK (idx >= 0),
        time BIGINT NOT NULL,
        entry BYTEA NOT NULL
    );
    CREATE TABLE merkle_nodes (
        level BIGINT NOT NULL CHECK (level BETWEEN 0 AND 63),
        idx BIGINT NOT NULL CHECK (idx >= 0),
        hash BYTEA NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    );
    CREATE FUNCTION custos_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END $$;
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION custos_refuse('the audit log is append-only');
    CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION custos_refuse('the audit log is append-only');
    CREATE TRIGGER merkle_nodes_no_update BEFORE UPDATE OR DELETE ON merkle_nodes
        FOR EACH ROW EXECUTE FUNCTION custos_refuse('the Merkle tree is append-only');
    CREATE TRIGGER merkle_nodes_no_truncate BEFORE TRUNCATE ON merkle_nodes
        FOR EACH STATEMENT EXECUTE FUNCTION custos_refuse('the Merkle tree is append-only');",
    // 4: the log key and the signed checkpoints.
    "CREATE TABLE log_key (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        kind TEXT NOT NULL CHECK (kind IN ('ed25519', 'p256')),
        key_label TEXT NOT NULL,
        key_id BYTEA NOT NULL,
        public_key BYTEA NOT NULL,
        attributes TEXT NOT NULL,
        origin TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE checkpoints (
        size BIGINT PRIMARY KEY CHECK (size >= 0),
        root BYTEA NOT NULL CHECK (length(root) = 32),
        note TEXT NOT NULL,
        signed_at BIGINT NOT NULL
    );
    CREATE TRIGGER log_key_no_update BEFORE UPDATE OR DELETE ON log_key
        FOR EACH ROW EXECUTE FUNCTION custos_refuse('the log key is set once');
    CREATE TRIGGER checkpoints_no_update BEFORE UPDATE OR DELETE ON checkpoints
        FOR EACH ROW EXECUTE FUNCTION custos_refuse('checkpoints are append-only');
    CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
        FOR EACH STATEMENT EXECUTE FUNCTION custos_refuse('checkpoints are append-only');",
    // 5: the row every write transaction locks first.
    "CREATE TABLE log_head (id BIGINT PRIMARY KEY CHECK (id = 1));
    INSERT INTO log_head (id) VALUES (1);",
    // 6: the usage epochs and the signing leases (as SQLite's 5).
    "CREATE TABLE usage_epochs (
        wallet_id TEXT NOT NULL,
        asset TEXT NOT NULL,
        epoch BIGINT NOT NULL CHECK (epoch > 0),
        PRIMARY KEY (wallet_id, asset)
    );
    CREATE TABLE signing_leases (
        withdrawal_id TEXT PRIMARY KEY REFERENCES withdrawals(withdrawal_id),
        owner TEXT NOT NULL,
        owner_key BIGINT,
        fence BIGINT NOT NULL CHECK (fence > 0),
        until BIGINT NOT NULL
    );",
    // 7: the log's size on the lock row, kept by the database: an entry must
    // take the next index, so the log has no gap whatever a writer believes.
    // `chain` folds every entry in order (SHA-256 of the chain before and the
    // entry), so a writer that kept the log's tip from its own last commit
    // can tell, from the write lock's reply, that no other history (another
    // instance's appends, a failover that lost commits) came in between.
    "ALTER TABLE log_head ADD COLUMN size BIGINT NOT NULL DEFAULT 0 CHECK (size >= 0);
    ALTER TABLE log_head ADD COLUMN chain BYTEA NOT NULL DEFAULT '\\x';
    DO $$
        DECLARE
            folded BYTEA := '\\x';
            entry_row RECORD;
        BEGIN
            FOR entry_row IN SELECT entry FROM audit_log ORDER BY idx LOOP
                folded := sha256(folded || entry_row.entry);
            END LOOP;
            UPDATE log_head SET size = (SELECT COUNT(*) FROM audit_log), chain = folded;
        END $$;
    CREATE FUNCTION custos_log_next() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE log_head SET size = size + 1, chain = sha256(chain || NEW.entry)
                WHERE id = 1 AND size = NEW.idx;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'audit log entry % is not the next one', NEW.idx;
            END IF;
            RETURN NEW;
        END $$;
    CREATE TRIGGER audit_log_next BEFORE INSERT ON audit_log
        FOR EACH ROW EXECUTE FUNCTION custos_log_next();",
];

/// The channel a freeze or unfreeze is announced on (`NOTIFY`), with the
/// payload `1` (frozen) or `0`, delivered when its transaction commits.
pub(crate) const FREEZE_CHANNEL: &str = "custos_freeze";

/// Where this process's freeze announcements go: the flags that
/// [`super::Store::watch_freeze`] registered.
#[derive(Default)]
struct FreezeSinks(std::sync::Mutex<Vec<Arc<AtomicBool>>>);

impl FreezeSinks {
    fn publish(&self, frozen: bool) {
        let sinks = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for sink in sinks.iter() {
            sink.store(frozen, Ordering::SeqCst);
        }
    }
}

/// The advisory lock key migrations hold (`custos` in ASCII).
const MIGRATION_LOCK: i64 = 0x6375_7374_6f73;

/// Opens the transaction of a write.
pub(crate) const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// Then takes the cross-instance write lock and reads the transaction's id,
/// by which a COMMIT whose reply was lost is resolved ([`commit_status`]),
/// and the log's size and chain (migration 7). `FOR UPDATE` returns the row
/// as the last lock holder committed it, so both are current even though
/// the statement's snapshot predates the wait.
pub(crate) const LOCK: &str = "SELECT txid_current(), size, chain FROM log_head WHERE id = 1 FOR UPDATE";

/// What became of a transaction whose COMMIT got no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CommitStatus {
    /// It committed: everything in it is stored.
    Committed,
    /// It was rolled back: nothing in it is stored.
    Aborted,
    /// Nobody could say (the database is unreachable).
    Unknown(String),
}

impl PgSettings {
    /// The URL with any user and password replaced by `…`, for messages.
    pub fn redacted_url(&self) -> String {
        match self.url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://…@{host}"),
                None => self.url.clone(),
            },
            None => "(unparsable url)".into(),
        }
    }
}

impl PgBackend {
    /// Connects (checking the settings), and applies pending migrations.
    pub(crate) fn open(settings: &PgSettings) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(&settings.url)
            .map_err(|e| StoreError::Settings(format!("store url: {e}")))?;
        if config.get_password().is_some() {
            return Err(StoreError::Settings(
                "store url: the password goes in password_file, not in the url".into(),
            ));
        }
        if let Some(file) = &settings.password_file {
            // Read as the PIN is: zeroized, refused if group or others can read it.
            let password = crate::secret::Pin::load(&crate::secret::PinSource::File(file.clone()))
                .map_err(|e| StoreError::Settings(format!("store password_file: {e}")))?;
            config.password(password.expose().as_bytes());
        }
        let tls = tls(settings, &mut config)?;
        config.application_name("custosd");
        config.connect_timeout(std::time::Duration::from_secs(5));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("custos-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Settings(format!("store runtime: {e}")))?;
        let pool = |size: usize| {
            let manager = Manager::from_config(
                config.clone(),
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(std::time::Duration::from_secs(10)))
                .create_timeout(Some(std::time::Duration::from_secs(5)))
                .build()
                .map_err(|e| StoreError::Settings(format!("store pool: {e}")))
        };
        let mut key = [0u8; 8];
        getrandom::fill(&mut key)
            .map_err(|_| StoreError::Settings("no randomness for the instance id".into()))?;
        let presence_key = i64::from_be_bytes(key);
        let freeze_sinks = Arc::new(FreezeSinks::default());
        let first = block_on(
            &runtime,
            take_presence(&config, &tls, presence_key, Arc::clone(&freeze_sinks)),
        )?;
        let presence = Arc::new(AtomicBool::new(true));
        runtime.spawn(hold_presence(
            config.clone(),
            tls.clone(),
            presence_key,
            first,
            Presence {
                held: Arc::clone(&presence),
                freeze_sinks: Arc::clone(&freeze_sinks),
            },
        ));
        let backend = Self {
            writer_pool: pool(1)?,
            reader_pool: pool(settings.read_pool)?,
            runtime: Some(runtime),
            presence_key,
            presence,
            freeze_sinks,
        };
        backend.migrate()?;
        Ok(backend)
    }

    /// This process as a lease owner.
    pub(crate) fn instance(&self) -> super::Instance {
        super::Instance {
            id: format!("pg-{}-{:016x}", std::process::id(), self.presence_key),
            presence_key: Some(self.presence_key),
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Taken only by `drop`.
        self.runtime
            .as_ref()
            .unwrap_or_else(|| unreachable!("the store runtime lives as long as the store"))
    }

    /// A connection from `pool`, blocking on the store's runtime.
    fn get(&self, pool: &Pool) -> Result<Object, StoreError> {
        block_on(self.runtime(), pool.get()).map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
            other => StoreError::Unavailable(other.to_string()),
        })
    }

    /// Has `sink` set to every freeze state any instance commits, as soon as
    /// the announcement arrives.
    pub(crate) fn watch_freeze(&self, sink: Arc<AtomicBool>) {
        self.freeze_sinks
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sink);
    }

    /// The pools' use and the presence lock, now.
    pub(crate) fn status(&self) -> PoolStatus {
        PoolStatus {
            writer: self.writer_pool.status().into(),
            reader: self.reader_pool.status().into(),
            presence: self.presence.load(Ordering::Relaxed),
        }
    }

    /// The writer's connection.
    pub(crate) fn writer(&self) -> Result<Object, StoreError> {
        self.get(&self.writer_pool)
    }

    /// Runs `f` with a read connection, which sees committed data only.
    pub(crate) fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(Conn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let client = self.get(&self.reader_pool)?;
        f(self.conn(&client))
    }

    /// `client` as a [`Conn`] whose statements run at once.
    pub(crate) fn conn<'a>(&'a self, client: &'a Object) -> Conn<'a> {
        Conn::Postgres(Pg {
            client,
            runtime: self.runtime(),
            tx: None,
        })
    }

    /// The writer's `client` as a [`Conn`] carrying the transaction's
    /// shared state `tx` (deferred statements, the log's tip).
    pub(crate) fn writer_conn<'a>(&'a self, client: &'a Object, tx: &'a WriteTx) -> Conn<'a> {
        Conn::Postgres(Pg {
            client,
            runtime: self.runtime(),
            tx: Some(tx),
        })
    }

    /// What became of transaction `txid`, asked on a read connection. A
    /// transaction still in progress is one whose connection PostgreSQL has
    /// not yet found closed; it is asked again, for up to five seconds.
    pub(crate) fn commit_status(&self, txid: i64) -> CommitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let asked = self.read(|conn| {
                conn.query_one("SELECT txid_status(?1)", &[&txid], |r| r.get::<Option<String>>(0))
            });
            match asked.as_ref().map(Option::as_deref) {
                Ok(Some("committed")) => return CommitStatus::Committed,
                Ok(Some("aborted")) => return CommitStatus::Aborted,
                Ok(Some(_)) if std::time::Instant::now() < deadline => {}
                Ok(other) => return CommitStatus::Unknown(format!("transaction status {other:?}")),
                Err(e) => return CommitStatus::Unknown(e.to_string()),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let client = self.writer()?;
        let conn = self.conn(&client);
        conn.execute("SELECT pg_advisory_lock(?1)", &[&MIGRATION_LOCK])?;
        let result = (|| {
            conn.batch("CREATE TABLE IF NOT EXISTS custos_schema (id BIGINT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
                INSERT INTO custos_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")?;
            let version: i64 =
                conn.query_one("SELECT version FROM custos_schema WHERE id = 1", &[], |r| {
                    r.get(0)
                })?;
            let version = usize::try_from(version).unwrap_or(usize::MAX);
            if version > MIGRATIONS.len() {
                return Err(StoreError::TooNew {
                    found: version,
                    supported: MIGRATIONS.len(),
                });
            }
            for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
                let done = i64::try_from(index + 1).unwrap_or(i64::MAX);
                conn.batch(&format!(
                    "BEGIN; {sql}; UPDATE custos_schema SET version = {done} WHERE id = 1; COMMIT"
                ))
                .inspect_err(|_| {
                    let _ = conn.batch("ROLLBACK");
                })?;
                tracing::info!(version = index + 1, "store migrated");
            }
            Ok(())
        })();
        let unlocked = conn.execute("SELECT pg_advisory_unlock(?1)", &[&MIGRATION_LOCK]);
        result?;
        unlocked.map(|_| ())
    }
}

/// The connector every connection of the store uses, with `config`'s TLS
/// mode set to match: TLS required, verified against `ca_file`, when one is
/// named; plaintext otherwise, and then only to this host.
fn tls(settings: &PgSettings, config: &mut tokio_postgres::Config) -> Result<MakeRustlsConnect, StoreError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Settings(format!("store TLS: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    match &settings.ca_file {
        Some(file) => {
            let invalid =
                |reason: String| StoreError::Settings(format!("store ca_file {}: {reason}", file.display()));
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| invalid(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.to_string()))?;
            if certs.is_empty() {
                return Err(invalid("no certificate in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| invalid(e.to_string()))?;
            }
            if config.get_ssl_mode() == SslMode::Disable {
                return Err(StoreError::Settings(
                    "store url: sslmode=disable contradicts store.ca_file".into(),
                ));
            }
            config.ssl_mode(SslMode::Require);
        }
        None => {
            if config.get_ssl_mode() == SslMode::Require {
                return Err(StoreError::Settings(
                    "store url: sslmode=require needs store.ca_file, the CA that signs the server's certificate".into(),
                ));
            }
            let loopback = config.get_hosts().iter().all(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => {
                    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
                }
                tokio_postgres::config::Host::Unix(_) => true,
            });
            if !loopback {
                return Err(StoreError::Settings(
                    "store url: a database off this host needs TLS; set store.ca_file to the CA that signs the server's certificate"
                        .into(),
                ));
            }
            config.ssl_mode(SslMode::Disable);
        }
    }
    Ok(MakeRustlsConnect::new(
        builder.with_root_certificates(roots).with_no_client_auth(),
    ))
}

/// A connection of its own that holds the session advisory lock `key`,
/// and the task that drives it (it ends when the connection closes).
type PresenceConnection = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

/// Connects, takes the presence lock `key`, and listens for freeze
/// announcements on the same connection, handing them to `sinks`.
async fn take_presence(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    key: i64,
    sinks: Arc<FreezeSinks>,
) -> Result<PresenceConnection, StoreError> {
    let (client, connection) = config.connect(tls.clone()).await?;
    let driver = tokio::spawn(drive(connection, sinks));
    // The key is random per process: nobody else holds it, so this returns at once.
    let taken = async {
        client.batch_execute(&format!("LISTEN {FREEZE_CHANNEL}")).await?;
        client.execute("SELECT pg_advisory_lock($1)", &[&key]).await
    };
    if let Err(e) = taken.await {
        driver.abort();
        return Err(e.into());
    }
    Ok((client, driver))
}

/// Drives a presence connection until it closes, handing each freeze
/// announcement to `sinks`.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    sinks: Arc<FreezeSinks>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) if n.channel() == FREEZE_CHANNEL => {
                sinks.publish(n.payload() == "1");
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

/// What the presence task keeps up to date.
struct Presence {
    /// Set while the lock is held.
    held: Arc<AtomicBool>,
    /// Told of freezes; on a new connection, of the freeze state missed.
    freeze_sinks: Arc<FreezeSinks>,
}

/// Keeps the presence lock for the life of the store: when its connection
/// closes (PostgreSQL restarted, the network broke), it says so and takes
/// the lock again on a new connection, once a second until that works.
/// While it is not held, other instances may take over this one's signing
/// leases; the fence in each lease keeps that safe.
async fn hold_presence(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    key: i64,
    first: PresenceConnection,
    presence: Presence,
) {
    let mut held = Some(first);
    loop {
        if let Some((client, driver)) = held.take() {
            let _ = driver.await;
            drop(client);
            presence.held.store(false, Ordering::Relaxed);
            tracing::warn!(
                "the store presence connection closed; other instances may take over this one's signing leases"
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        match take_presence(&config, &tls, key, Arc::clone(&presence.freeze_sinks)).await {
            Ok(connection) => {
                tracing::info!("store presence lock taken again");
                presence.held.store(true, Ordering::Relaxed);
                // Announcements made while disconnected were missed.
                if let Ok(row) = connection
                    .0
                    .query_one("SELECT frozen FROM governance WHERE id = 1", &[])
                    .await
                    && let Ok(frozen) = row.try_get::<_, i64>(0)
                {
                    presence.freeze_sinks.publish(frozen == 1);
                }
                held = Some(connection);
            }
            Err(e) => tracing::debug!(error = %e, "store presence lock not taken yet"),
        }
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.writer_pool.close();
        self.reader_pool.close();
        // Dropping a runtime blocks, which a store dropped inside async code
        // may not do; the connection tasks need no wait.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A fresh, empty database on the test suite's PostgreSQL for each caller
/// (`scripts/test.sh` starts the server and sets `CUSTOS_TEST_POSTGRES_URL`,
/// `CUSTOS_TEST_POSTGRES_PASSWORD_FILE` and, for TLS,
/// `CUSTOS_TEST_POSTGRES_CA_FILE`), or `None` outside it.
#[cfg(test)]
pub(crate) fn test_database() -> Option<PgSettings> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let url = std::env::var("CUSTOS_TEST_POSTGRES_URL").ok()?;
    let password_file = std::env::var("CUSTOS_TEST_POSTGRES_PASSWORD_FILE")
        .ok()
        .map(PathBuf::from);
    let name = format!(
        "custos_unit_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    );
    let mut config = tokio_postgres::Config::from_str(&url).unwrap();
    if let Some(file) = &password_file {
        config.password(std::fs::read(file).unwrap());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    });
    let (base, _) = url.rsplit_once('/').unwrap();
    Some(PgSettings {
        url: format!("{base}/{name}"),
        password_file,
        ca_file: std::env::var_os("CUSTOS_TEST_POSTGRES_CA_FILE").map(PathBuf::from),
        read_pool: 4,
    })
}
