//! The log key and signed checkpoints, on the service side.
//!
//! The log key is generated in the HSM the first time custosd starts on a
//! store, with the same non-extractable template and read-back as wallet
//! keys, and recorded once. Every later start loads it by CKA_ID and refuses
//! to run if the token's public key, the algorithm or the origin differ from
//! the record: a log keeps one key and one origin for its whole life.
//!
//! [`Checkpointer::issue`] signs the tree's current size and root as a C2SP
//! checkpoint, verifies the HSM's signature before trusting it, and stores
//! the note. It never signs a tree that contradicts the last checkpoint it
//! signed or found verified at startup: a store edited under a checkpoint
//! stops the checkpoints (and says so in the log) instead of getting a
//! signature. [`run`] issues one every N entries or T seconds and a last one
//! on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hsm::{Hsm, HsmError, KeyAttributes, KeyId};
use crate::store::audit::{self as log, LogKeyRecord, SqlNodes, StoredCheckpoint};
use crate::store::{Store, StoreError};
use custos_core::audit::merkle;
use custos_core::audit::note::{Checkpoint, NoteVerifier};

/// Default checkpoint cadence in entries.
pub const DEFAULT_CHECKPOINT_ENTRIES: u64 = 1000;

/// Default checkpoint cadence in seconds.
pub const DEFAULT_CHECKPOINT_SECONDS: u64 = 10;

/// The audit log's signed checkpoints.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The checkpoint origin line, also the note key name. Defaults to
    /// `custos.local/<service id>`.
    pub origin: String,
    /// The log key's algorithm: Ed25519 (default) or P-256.
    pub key_kind: custos_core::key::KeyKind,
    /// Issue a checkpoint once this many entries are not covered by one.
    pub checkpoint_every_entries: u64,
    /// Issue a checkpoint when entries have waited this long for one.
    pub checkpoint_every: Duration,
}

/// Label prefix of the log key on the token.
pub const LOG_KEY_LABEL: &str = "custos-audit-log";

/// Why the log key or a checkpoint is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The HSM refused or failed.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The recorded log key does not match the configuration or the token.
    #[error("log key: {0}")]
    KeyMismatch(String),
    /// The HSM's signature did not verify under the log key.
    #[error("the HSM's checkpoint signature does not verify under the log key")]
    BadSignature,
    /// The stored log contradicts a checkpoint already signed: it was
    /// altered, and custos refuses to sign it.
    #[error("the stored log contradicts the checkpoint at size {0}; refusing to sign it")]
    Contradicted(u64),
    /// A blocking worker was lost.
    #[error("worker task failed")]
    Worker,
}

/// The log key, and what issues checkpoints with it.
#[derive(Debug)]
pub struct Checkpointer {
    hsm: Hsm,
    store: Arc<Store>,
    key: LogKeyRecord,
    verifier: NoteVerifier,
    every_entries: u64,
    every: Duration,
    /// The last checkpoint signed or verified here, (size, root); held by
    /// the one issuer at a time, so two signings never race for one size.
    anchor: tokio::sync::Mutex<Option<(u64, [u8; 32])>>,
}

impl Checkpointer {
    /// Loads the log key recorded in the store, or generates and records it.
    /// Instances that start together on an empty PostgreSQL store each
    /// generate a key, but only one is recorded: the others destroy theirs
    /// and adopt the recorded one, so a log has one key for life.
    pub async fn open(hsm: Hsm, store: Arc<Store>, config: &AuditConfig) -> Result<Self, CheckpointError> {
        let recorded = blocking(&store, log::log_key).await?;
        let key = match recorded {
            Some(record) => adopt(&hsm, record, config).await?,
            None => match generate(&hsm, &store, config).await? {
                Some(record) => record,
                None => {
                    let record = blocking(&store, log::log_key).await?.ok_or_else(|| {
                        CheckpointError::KeyMismatch("the log key another instance recorded is gone".into())
                    })?;
                    tracing::info!("another instance recorded the audit log key first; using it");
                    adopt(&hsm, record, config).await?
                }
            },
        };
        let verifier = NoteVerifier::new(&key.origin, key.kind, &key.public_key)
            .map_err(|e| CheckpointError::KeyMismatch(e.to_string()))?;
        let latest = blocking(&store, |conn| log::checkpoint(conn, None)).await?;
        let anchor = match latest {
            None => None,
            Some(stored) => match verifier.open_checkpoint(&stored.note) {
                Ok(c) if c.size == stored.size && c.root == stored.root => Some((c.size, c.root)),
                _ => {
                    return Err(CheckpointError::KeyMismatch(format!(
                        "the stored checkpoint at size {} does not verify under the log key",
                        stored.size
                    )));
                }
            },
        };
        tracing::info!(
            origin = %key.origin,
            algorithm = key.kind.name(),
            verifier_key = %verifier.encode(),
            "audit log key ready"
        );
        Ok(Self {
            hsm,
            store,
            key,
            verifier,
            every_entries: config.checkpoint_every_entries,
            every: config.checkpoint_every,
            anchor: tokio::sync::Mutex::new(anchor),
        })
    }

    /// The log key's record.
    pub fn key(&self) -> &LogKeyRecord {
        &self.key
    }

    /// The verifier an auditor pins.
    pub fn verifier(&self) -> &NoteVerifier {
        &self.verifier
    }

    /// Signs and stores a checkpoint of the log as it is now, unless the
    /// latest checkpoint already covers every entry (or the log is empty).
    /// Returns the checkpoint now latest.
    pub async fn issue(&self) -> Result<Option<StoredCheckpoint>, CheckpointError> {
        let mut anchor = self.anchor.lock().await;
        let anchor_size = anchor.map(|(size, _)| size);
        let (size, root, latest, proof) = blocking(&self.store, move |conn| {
            let nodes = SqlNodes(conn);
            let size = log::size(conn)?;
            let root = merkle::root(&nodes, size).map_err(merkle_store_error)?;
            let proof = match anchor_size {
                Some(old) if old <= size => {
                    Some(merkle::consistency_proof(&nodes, old, size).map_err(merkle_store_error)?)
                }
                _ => None,
            };
            Ok((size, root, log::checkpoint(conn, None)?, proof))
        })
        .await?;
        if let Some((old_size, old_root)) = *anchor {
            let consistent = proof.is_some_and(|proof| {
                merkle::verify_consistency(old_size, size, &old_root, &root, &proof).is_ok()
            });
            if !consistent {
                tracing::error!(
                    checkpoint_size = old_size,
                    log_size = size,
                    "the stored audit log contradicts a signed checkpoint: it was altered; no more checkpoints are signed"
                );
                return Err(CheckpointError::Contradicted(old_size));
            }
        }
        if size == 0 || latest.as_ref().is_some_and(|c| c.size >= size) {
            return Ok(latest);
        }
        let checkpoint = Checkpoint {
            origin: self.key.origin.clone(),
            size,
            root,
        };
        let text = checkpoint.text();
        let raw = self
            .hsm
            .sign_log_message(
                &KeyId::from_bytes(self.key.key_id.clone()),
                self.key.kind,
                text.as_bytes(),
            )
            .await?;
        let wire = self
            .verifier
            .wire_signature(&raw)
            .map_err(|_| CheckpointError::BadSignature)?;
        let note = self.verifier.signed_note(&text, &wire);
        if self.verifier.open_checkpoint(&note).ok().as_ref() != Some(&checkpoint) {
            tracing::error!(
                size,
                "HSM checkpoint signature failed verification; not storing it"
            );
            return Err(CheckpointError::BadSignature);
        }
        let stored = StoredCheckpoint {
            size,
            root,
            note,
            signed_at: crate::clock::unix_now(),
        };
        let to_store = stored.clone();
        // Another instance on the same store may have checkpointed this size
        // or a later one meanwhile: then this signature is not stored, and
        // checkpoints stay in order of size.
        let newer = write(&self.store, move |conn| match log::checkpoint(conn, None)? {
            Some(latest) if latest.size >= to_store.size => Ok(Some(latest)),
            _ => log::insert_checkpoint(conn, &to_store).map(|()| None),
        })
        .await?;
        // The tree at `size` was checked against the anchor above either way.
        *anchor = Some((size, root));
        if let Some(latest) = newer {
            tracing::debug!(size, latest = latest.size, "another instance checkpointed first");
            return Ok(Some(latest));
        }
        tracing::debug!(size, "checkpoint signed");
        Ok(Some(stored))
    }

    /// Whether the cadence calls for a checkpoint: `pending` entries are not
    /// covered, and there are enough of them or the oldest waited too long.
    fn due(&self, pending: u64, waiting_since: Option<Instant>) -> bool {
        pending >= self.every_entries
            || (pending > 0 && waiting_since.is_some_and(|t| t.elapsed() >= self.every))
    }
}

/// Issues checkpoints by the configured cadence until `shutdown` resolves,
/// then issues a last one.
pub async fn run(checkpointer: Arc<Checkpointer>, shutdown: impl std::future::Future<Output = ()>) {
    let tick = checkpointer
        .every
        .min(Duration::from_millis(500))
        .max(Duration::from_millis(50));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_since: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = interval.tick() => {}
        }
        let pending = blocking(&checkpointer.store, |conn| {
            let size = log::size(conn)?;
            let covered = log::checkpoint(conn, None)?.map_or(0, |c| c.size);
            Ok(size.saturating_sub(covered))
        })
        .await;
        let pending = match pending {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "reading the log size failed; will retry");
                continue;
            }
        };
        if pending == 0 {
            waiting_since = None;
            continue;
        }
        let since = *waiting_since.get_or_insert_with(Instant::now);
        if checkpointer.due(pending, Some(since)) {
            match checkpointer.issue().await {
                Ok(_) => waiting_since = None,
                Err(e) => tracing::warn!(error = %e, "issuing a checkpoint failed; will retry"),
            }
        }
    }
    match checkpointer.issue().await {
        Ok(Some(c)) => tracing::info!(size = c.size, "final checkpoint signed"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
    }
}

/// Checks the recorded log key against the config and the token.
async fn adopt(
    hsm: &Hsm,
    record: LogKeyRecord,
    config: &AuditConfig,
) -> Result<LogKeyRecord, CheckpointError> {
    if record.origin != config.origin || record.kind != config.key_kind {
        return Err(CheckpointError::KeyMismatch(format!(
            "the log was started with origin {} and a {} key; the config says origin {} and {}. A log keeps one origin and key for life",
            record.origin,
            record.kind.name(),
            config.origin,
            config.key_kind.name()
        )));
    }
    let loaded = hsm
        .load_key(record.kind, &KeyId::from_bytes(record.key_id.clone()))
        .await?;
    if loaded.public_key != record.public_key {
        return Err(CheckpointError::KeyMismatch(
            "the key on the token differs from the recorded log key".into(),
        ));
    }
    Ok(record)
}

/// Generates the log key and records it. `None` if another instance
/// recorded its key first: this one's key is destroyed again.
async fn generate(
    hsm: &Hsm,
    store: &Arc<Store>,
    config: &AuditConfig,
) -> Result<Option<LogKeyRecord>, CheckpointError> {
    let generated = hsm.generate(config.key_kind, LOG_KEY_LABEL).await?;
    let record = LogKeyRecord {
        kind: config.key_kind,
        key_label: generated.label.clone(),
        key_id: generated.id.as_bytes().to_vec(),
        public_key: generated.public_key.clone(),
        attributes: generated.attributes,
        origin: config.origin.clone(),
        created_at: crate::clock::unix_now(),
    };
    let to_store = record.clone();
    if let Err(e) = write(store, move |conn| log::insert_log_key(conn, &to_store)).await {
        // Never leave an unrecorded key behind: it could not sign anything
        // auditors would accept, and a retry makes a fresh one.
        if let Err(destroy) = hsm.destroy_key(&generated.id).await {
            tracing::error!(error = %destroy, label = %generated.label, "could not destroy unrecorded log key");
        }
        return match e {
            CheckpointError::Store(StoreError::Conflict(_)) => Ok(None),
            other => Err(other),
        };
    }
    tracing::info!(
        label = %record.key_label,
        algorithm = record.kind.name(),
        "generated the audit log key in the HSM"
    );
    Ok(Some(record))
}

/// The bits of [`KeyAttributes`] in audit-entry order, for display.
pub fn attribute_names(a: &KeyAttributes) -> Vec<(&'static str, bool)> {
    vec![
        ("CKA_TOKEN", a.token),
        ("CKA_PRIVATE", a.private),
        ("CKA_SENSITIVE", a.sensitive),
        ("CKA_EXTRACTABLE", a.extractable),
        ("CKA_ALWAYS_SENSITIVE", a.always_sensitive),
        ("CKA_NEVER_EXTRACTABLE", a.never_extractable),
    ]
}

fn merkle_store_error(e: merkle::MerkleError<StoreError>) -> StoreError {
    match e {
        merkle::MerkleError::Store(e) => e,
        other => StoreError::Corrupt {
            table: "merkle_nodes",
            reason: other.to_string(),
        },
    }
}

async fn write<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(crate::store::sql::Conn<'_>) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CheckpointError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.write(f))
        .await
        .map_err(|_| CheckpointError::Worker)?
        .map_err(CheckpointError::Store)
}

async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(crate::store::sql::Conn<'_>) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CheckpointError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.read(f))
        .await
        .map_err(|_| CheckpointError::Worker)?
        .map_err(CheckpointError::Store)
}
