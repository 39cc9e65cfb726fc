//! The HSM adapter: the only module that talks PKCS#11.
//!
//! It owns the cryptoki context, one logged-in *anchor* session that is never
//! closed while the adapter lives (closing a token's last session logs the
//! application out; SoftHSM issue #464), a fixed pool of worker sessions, and a
//! cache of key handles and public keys so that no signature pays for a lookup.
//!
//! Every PKCS#11 call runs on tokio's blocking pool, holding one of
//! `sessions` permits until the call returns, and is abandoned (failing
//! closed) after the configured timeout.
//!
//! # Losing the token, and getting it back
//!
//! A call that fails because the session, the login or the token was lost
//! (see [`HsmError::is_session_loss`]) is retried once after recovery; if
//! recovery or the retry fails, the call fails closed with
//! [`HsmError::Unavailable`], which the API maps to gRPC `UNAVAILABLE`.
//! Recovery first reopens: it finds the token again, opens and logs in a new
//! anchor. If that fails it re-initializes the module (`C_Finalize`, then
//! `C_Initialize`), which is the only way SoftHSMv2 sees a token whose files
//! vanished and came back, or a token re-created under the same label: it
//! reads its token directory only in `C_Initialize`, and a token whose files
//! went away stays broken in memory (`CKR_GENERAL_ERROR`) even after they
//! return. Re-initialization holds a process-wide gate exclusively, so it
//! waits for every call in flight and none starts until it is done.
//!
//! After a failed recovery the token is *down*: calls fail at once, without
//! touching the module, until a backoff (250 ms doubling to 2 s) lets the next
//! call try again. So a dead token is not hammered, and the service recovers
//! by itself, without a restart, once the token is back. A token that refuses
//! the PIN is not logged in to again automatically (that could lock it); it
//! needs a restart once the PIN is fixed. Key generation is never retried
//! automatically, so a lost reply cannot create a second key.
//!
//! A missing key or a stale handle is not taken at its word: a logged-out
//! session cannot see private objects, and SoftHSMv2 whose token files are
//! gone finds nothing and reports `CKR_OBJECT_HANDLE_INVALID`. The session's
//! login and the token (`C_GetTokenInfo`) are checked first, and a failure
//! there is the real, recoverable, error.
//!
//! Recovery starts a new *epoch*, and re-initialization a new module
//! *generation*: sessions and key handles from before are discarded rather
//! than reused (handle numbers start again after `C_Initialize`, so an old
//! handle may name another object). Handles are re-resolved by CKA_ID, and
//! the public key found must equal the one cached for that id, or the key is
//! refused. A token re-created with the same label and PIN but without the
//! wallet keys therefore signs nothing ([`HsmError::KeyMissing`]). A private
//! key planted under a wallet's id next to the genuine public key can still be
//! asked to sign once; its signature then fails verification against the
//! wallet's public key and is never released.
//!
//! A retried `C_Sign` is safe: the first attempt returned no signature, so at
//! most one signature per call ever leaves this module, and custody logs it
//! before releasing it.

mod config;
mod error;
mod keys;
pub mod personal;
pub mod raw_bench;
mod token;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub use config::{DEFAULT_HSM_CALL_TIMEOUT_MS, DEFAULT_SESSIONS, HsmConfig, TokenSelector};
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;
pub use error::HsmError;
pub use keys::{
    ED25519_EC_PARAMS, KEY_ID_LEN, KeyAttributes, KeyKind, P256_EC_PARAMS, SECP256K1_EC_PARAMS, TokenKeyKind,
    check_private_key_attributes, ed25519_from_ec_point, sec1_from_ec_point,
};
pub use token::init_token;
use tokio::sync::Semaphore;

use crate::secret::Pin;
use custos_core::chain::SigningDigest;

/// The CKA_ID of a key pair: random bytes from the token's RNG.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyId(Vec<u8>);

impl KeyId {
    /// Wraps stored CKA_ID bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The CKA_ID bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", hex::encode(&self.0))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

/// A key pair freshly generated on the token.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// CKA_ID shared by the private and public key objects.
    pub id: KeyId,
    /// CKA_LABEL shared by both objects.
    pub label: String,
    /// Public key as read from CKA_EC_POINT: SEC1 for ECDSA kinds, 32
    /// bytes for Ed25519.
    pub public_key: Vec<u8>,
    /// Security attributes read back from the private key.
    pub attributes: KeyAttributes,
}

/// A key pair found on the token and checked.
#[derive(Debug, Clone)]
pub struct LoadedKey {
    /// SEC1 public key as read from CKA_EC_POINT.
    pub public_key: Vec<u8>,
    /// Security attributes read back from the private key.
    pub attributes: KeyAttributes,
}

#[derive(Debug, Clone)]
struct CachedKey {
    kind: KeyKind,
    /// The private key handle and when it was resolved.
    private: Option<(Stamp, ObjectHandle)>,
    public_key: Vec<u8>,
}

/// A logged-in PKCS#11 token with a fixed pool of sessions.
///
/// Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    call_timeout: Duration,
}

/// Serialises re-initialization of the PKCS#11 module against every other call
/// into it, process-wide (initialization is per process, not per context):
/// `C_Finalize` while another thread is inside the module is undefined
/// behaviour in most modules (SoftHSM frees its state). Every call holds it
/// shared; only [`Inner::reinitialize`] holds it exclusively. Never taken
/// twice by one thread.
static MODULE_GATE: RwLock<()> = RwLock::new(());

/// How many times this process re-initialized the module. Sessions and
/// object handles from an older generation name nothing, or something else:
/// handle numbers start again after `C_Initialize`.
static MODULE_GENERATION: AtomicU64 = AtomicU64::new(0);

/// First wait after a failed recovery before the next attempt.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between recovery attempts while the token is down.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// When a session was opened or a handle resolved: valid only while both the
/// module generation and the adapter's epoch are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    generation: u64,
    epoch: u64,
}

struct Inner {
    pkcs11: Pkcs11,
    selector: TokenSelector,
    pin: Pin,
    slot: Mutex<Slot>,
    /// Incremented by every recovery.
    epoch: AtomicU64,
    /// Whether the last recovery failed; mirrors `recovery.outage` so that
    /// the common path does not take the recovery lock.
    down: AtomicBool,
    /// Held by the one worker recovering at a time.
    recovery: Mutex<Recovery>,
    idle: Mutex<Vec<TokenSession>>,
    max_idle: usize,
    keys: RwLock<HashMap<KeyId, CachedKey>>,
    /// `C_Sign` calls made with wallet keys, successful or not.
    wallet_sign_calls: AtomicU64,
}

struct Recovery {
    /// The login-holding session. Replaced only after a successor is logged
    /// in; absent only while the token is down after a re-initialization.
    anchor: Option<TokenSession>,
    /// Serial number of the token found last, to log a replaced token.
    serial: String,
    outage: Option<Outage>,
}

/// The token is down: the last recovery attempt failed.
struct Outage {
    since: Instant,
    failures: u32,
    retry_at: Instant,
    cause: HsmError,
}

impl Outage {
    /// Whether the next recovery attempt may run now. Never after the token
    /// refused the PIN: repeated attempts could lock it.
    fn due(&self) -> bool {
        !matches!(self.cause, HsmError::LoginRefused(_)) && Instant::now() >= self.retry_at
    }
}

/// A session opened by this adapter, without cryptoki's close-on-drop: it is
/// closed by [`TokenSession::retire`], and only if the module was not
/// re-initialized since it was opened (its handle may by then name another
/// session). Every PKCS#11 call on it happens under [`MODULE_GATE`].
struct TokenSession {
    session: Session,
    stamp: Stamp,
}

impl TokenSession {
    fn retire(self) {
        if self.stamp.generation != MODULE_GENERATION.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.session.close() {
            let e = HsmError::from_cryptoki("close session", e);
            tracing::debug!(error = %e, "closing a retired HSM session failed");
        }
    }
}

/// Whether a failed call may be re-run after recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Idempotent: run again once after recovering the session.
    Once,
    /// Not idempotent (creates objects): recover the session for later calls,
    /// but fail this one.
    Never,
}

impl fmt::Debug for Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.selector)
            .field("sessions_free", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Loads the module, finds the token, logs in, and opens the session pool.
    pub async fn open(config: &HsmConfig, pin: Pin) -> Result<Self, HsmError> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(&config, pin))
            .await
            .map_err(|_| HsmError::Worker)?
    }

    /// The blocking body of [`Hsm::open`], for callers outside a runtime.
    pub fn open_blocking(config: &HsmConfig, pin: Pin) -> Result<Self, HsmError> {
        let _gate = read(&MODULE_GATE);
        let stamp = Stamp {
            generation: MODULE_GENERATION.load(Ordering::Acquire),
            epoch: 0,
        };
        let pkcs11 = token::load_module(&config.module)?;
        let (slot, serial) = token::find_token(&pkcs11, &config.token)?;
        let anchor = open_session(&pkcs11, slot, stamp)?;
        if let Err(e) = token::login(&anchor.session, &pin) {
            anchor.retire();
            return Err(e);
        }
        let sessions = config.sessions.get();
        let mut idle = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            match open_session(&pkcs11, slot, stamp) {
                Ok(session) => idle.push(session),
                Err(e) => {
                    idle.into_iter().for_each(TokenSession::retire);
                    anchor.retire();
                    return Err(e);
                }
            }
        }
        tracing::info!(slot = slot.id(), sessions, "HSM token opened and logged in");
        Ok(Self {
            inner: Arc::new(Inner {
                pkcs11,
                selector: config.token.clone(),
                pin,
                slot: Mutex::new(slot),
                epoch: AtomicU64::new(0),
                down: AtomicBool::new(false),
                recovery: Mutex::new(Recovery {
                    anchor: Some(anchor),
                    serial,
                    outage: None,
                }),
                idle: Mutex::new(idle),
                max_idle: sessions,
                keys: RwLock::new(HashMap::new()),
                wallet_sign_calls: AtomicU64::new(0),
            }),
            permits: Arc::new(Semaphore::new(sessions)),
            call_timeout: config.call_timeout,
        })
    }

    /// Generates a secp256k1 key pair inside the token, reads its attributes
    /// back, and caches it. A key that fails the read-back is destroyed.
    ///
    /// The CKA_LABEL is `label_base` followed by `-` and the first 8 hex digits
    /// of the random CKA_ID, so a key orphaned by a crash never blocks a retry.
    /// Not retried on session loss: the caller sees UNAVAILABLE and may retry.
    pub async fn generate_secp256k1(&self, label_base: &str) -> Result<GeneratedKey, HsmError> {
        self.generate(KeyKind::Secp256k1, label_base).await
    }

    /// Generates a key pair of `kind` as [`Hsm::generate_secp256k1`] does,
    /// with the same non-extractable template and read-back.
    pub async fn generate(&self, kind: KeyKind, label_base: &str) -> Result<GeneratedKey, HsmError> {
        let label_base = label_base.to_owned();
        self.execute(Retry::Never, move |inner, session| {
            inner.generate(session, kind, &label_base)
        })
        .await
    }

    /// Destroys every object with this CKA_ID and forgets the cached key.
    /// Destroying a key that is already gone succeeds.
    pub async fn destroy_key(&self, id: &KeyId) -> Result<(), HsmError> {
        let id = id.clone();
        self.execute(Retry::Once, move |inner, session| {
            let objects = session
                .find_objects(&[Attribute::Id(id.as_bytes().to_vec())])
                .map_err(|e| HsmError::from_cryptoki("find key", e))?;
            for object in objects {
                session
                    .destroy_object(object)
                    .map_err(|e| HsmError::from_cryptoki("destroy key", e))?;
            }
            write(&inner.keys).remove(&id);
            Ok(())
        })
        .await
    }

    /// Finds a key pair of `kind` by CKA_ID, checks its attributes, and
    /// caches it.
    pub async fn load_key(&self, kind: KeyKind, id: &KeyId) -> Result<LoadedKey, HsmError> {
        let id = id.clone();
        self.execute(Retry::Once, move |inner, session| {
            inner.load_key(session, kind, &id)
        })
        .await
    }

    /// Signs a 32-byte digest with `CKM_ECDSA` and returns the token's raw
    /// `r || s`. The key must have been generated or loaded first.
    ///
    /// The only caller is the wallet registry's signing path, which verifies
    /// the result before releasing it; digests come from custos's own parse
    /// of a transaction, never from a client.
    pub async fn sign_ecdsa_prehash(&self, id: &KeyId, digest: &SigningDigest) -> Result<Vec<u8>, HsmError> {
        let id = id.clone();
        let digest = *digest.as_bytes();
        self.execute(Retry::Once, move |inner, session| {
            inner.sign(session, &id, KeyKind::Secp256k1, &digest)
        })
        .await
    }

    /// Signs a log message with the audit key: pure CKM_EDDSA over the
    /// message for Ed25519, CKM_ECDSA over its SHA-256 for P-256 (raw
    /// `r || s`). A wallet key is refused, so no log message can ever be
    /// signed by a key that signs transactions.
    pub async fn sign_log_message(
        &self,
        id: &KeyId,
        kind: KeyKind,
        message: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let input = match kind {
            KeyKind::Ed25519 => message.to_vec(),
            KeyKind::P256 => {
                use k256::sha2::{Digest, Sha256};
                Sha256::digest(message).to_vec()
            }
            KeyKind::Secp256k1 => return Err(HsmError::Malformed("a wallet key cannot sign log messages")),
        };
        let id = id.clone();
        self.execute(Retry::Once, move |inner, session| {
            inner.sign(session, &id, kind, &input)
        })
        .await
    }

    /// How many times `C_Sign` was called with a wallet key, successful or
    /// not: what tests use to prove a refused request never reached the
    /// token. (Checkpoint signatures with the log key are not counted.)
    pub fn wallet_sign_calls(&self) -> u64 {
        self.inner.wallet_sign_calls.load(Ordering::Relaxed)
    }

    /// Forgets the private-key handle cached for `id`, so that the next use
    /// resolves it again by CKA_ID. Called when a signature made with it
    /// failed verification.
    pub fn invalidate_handle(&self, id: &KeyId) {
        if let Some(key) = write(&self.inner.keys).get_mut(id) {
            key.private = None;
        }
    }

    /// Runs `op` on a pooled session on the blocking pool. The permit travels
    /// with the blocking task, so a caller that gives up (timeout, cancelled
    /// request) never lets more than `sessions` calls run at once.
    async fn execute<T, F>(&self, retry: Retry, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session) -> Result<T, HsmError> + Send + 'static,
    {
        let work = async {
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|_| HsmError::Worker)?;
            let inner = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                inner.execute_blocking(retry, &op)
            })
            .await
            .map_err(|_| HsmError::Worker)?
        };
        match tokio::time::timeout(self.call_timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                tracing::error!(
                    timeout_ms = self.call_timeout.as_millis() as u64,
                    "HSM call timed out; failing closed"
                );
                Err(HsmError::Unavailable(Box::new(HsmError::Timeout(
                    self.call_timeout,
                ))))
            }
        }
    }
}

impl Inner {
    /// Runs `op`, recovering once from a lost session, login or token.
    ///
    /// While the token is down, `op` is not run until a recovery succeeds;
    /// within the backoff the call fails at once.
    fn execute_blocking<T>(
        &self,
        retry: Retry,
        op: &dyn Fn(&Inner, &Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let recovered_first = self.down.load(Ordering::Acquire);
        if recovered_first {
            self.recover_outage().map_err(unavailable)?;
        }
        let (lost, seen) = match self.run_pooled(op) {
            Ok(value) => return Ok(value),
            Err((e, _)) if !e.is_session_loss() => return Err(e),
            Err(failure) => failure,
        };
        if recovered_first {
            self.mark_down(seen, &lost);
            return Err(unavailable(lost));
        }
        tracing::warn!(error = %lost, "HSM session, login or token lost; recovering");
        self.recover(seen).map_err(unavailable)?;
        if retry == Retry::Never {
            return Err(unavailable(lost));
        }
        match self.run_pooled(op) {
            Ok(value) => Ok(value),
            Err((e, seen)) if e.is_session_loss() => {
                self.mark_down(seen, &e);
                Err(unavailable(e))
            }
            // The session works again; what failed now is a real answer
            // (a missing or mismatched key, say) and is reported as such.
            Err((e, _)) => Err(e),
        }
    }

    fn stamp(&self) -> Stamp {
        Stamp {
            generation: MODULE_GENERATION.load(Ordering::Acquire),
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Runs `op` on a session from the pool, holding the module gate shared.
    /// On error, also returns the stamp of the session used, so that
    /// recovery runs once per failure.
    fn run_pooled<T>(
        &self,
        op: &dyn Fn(&Inner, &Session) -> Result<T, HsmError>,
    ) -> Result<T, (HsmError, Stamp)> {
        let _gate = read(&MODULE_GATE);
        let pooled = self.take_session().map_err(|e| (e, self.stamp()))?;
        let result = op(self, &pooled.session).map_err(|e| self.reclassify(&pooled.session, e));
        let stamp = pooled.stamp;
        match result {
            Ok(value) => {
                self.return_session(pooled);
                Ok(value)
            }
            Err(e) if e.is_session_loss() => {
                pooled.retire();
                Err((e, stamp))
            }
            Err(e) => {
                self.return_session(pooled);
                Err((e, stamp))
            }
        }
    }

    /// An idle session of the current stamp, or a new one. Called under the
    /// module gate.
    fn take_session(&self) -> Result<TokenSession, HsmError> {
        let current = self.stamp();
        loop {
            let Some(pooled) = lock(&self.idle).pop() else {
                break;
            };
            if pooled.stamp == current {
                return Ok(pooled);
            }
            pooled.retire();
        }
        let slot = *lock(&self.slot);
        open_session(&self.pkcs11, slot, current)
    }

    /// Returns a session to the pool, unless it predates the last recovery or
    /// the pool is full (then it is closed; the anchor keeps the login).
    /// Called under the module gate.
    fn return_session(&self, pooled: TokenSession) {
        if pooled.stamp != self.stamp() {
            pooled.retire();
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(pooled);
        } else {
            drop(idle);
            pooled.retire();
        }
    }

    /// Recovers from a failure seen at `seen`, unless another worker already
    /// did, or the token is down and the backoff has not passed.
    fn recover(&self, seen: Stamp) -> Result<(), HsmError> {
        let mut recovery = lock(&self.recovery);
        match &recovery.outage {
            Some(outage) if self.stamp() != seen || !outage.due() => Err(outage.cause.clone()),
            None if self.stamp() != seen => Ok(()),
            _ => self.attempt(&mut recovery),
        }
    }

    /// While the token is down: recovers if the backoff has passed, fails at
    /// once otherwise.
    fn recover_outage(&self) -> Result<(), HsmError> {
        let mut recovery = lock(&self.recovery);
        match &recovery.outage {
            None => Ok(()),
            Some(outage) if !outage.due() => Err(outage.cause.clone()),
            Some(_) => self.attempt(&mut recovery),
        }
    }

    /// One recovery attempt: reopen (find the token, open and log in a new
    /// anchor), and if that fails, re-initialize the module. While the token
    /// is down, only re-initialization is tried.
    fn attempt(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
        let result = if recovery.outage.is_none() {
            self.reopen(recovery).or_else(|e| {
                tracing::warn!(error = %e, "reopening the HSM session failed; re-initializing the PKCS#11 module");
                self.reinitialize(recovery)
            })
        } else {
            self.reinitialize(recovery)
        };
        match result {
            Ok(()) => {
                if let Some(outage) = recovery.outage.take() {
                    tracing::info!(
                        down_ms = outage.since.elapsed().as_millis() as u64,
                        failed_attempts = outage.failures,
                        "HSM token is back; service resumed"
                    );
                }
                self.down.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.record_outage(recovery, &e);
                Err(e)
            }
        }
    }

    /// Records that a call failed again right after a recovery (at `seen`):
    /// the token is down, and the next attempt re-initializes the module.
    fn mark_down(&self, seen: Stamp, error: &HsmError) {
        let mut recovery = lock(&self.recovery);
        if recovery.outage.is_none() && self.stamp() != seen {
            // Another worker recovered since; its sessions may work.
            return;
        }
        self.record_outage(&mut recovery, error);
    }

    fn record_outage(&self, recovery: &mut Recovery, error: &HsmError) {
        let now = Instant::now();
        let outage = recovery.outage.get_or_insert_with(|| Outage {
            since: now,
            failures: 0,
            retry_at: now,
            cause: error.clone(),
        });
        outage.failures = outage.failures.saturating_add(1);
        outage.cause = error.clone();
        let backoff = backoff(outage.failures);
        outage.retry_at = now + backoff;
        self.down.store(true, Ordering::Release);
        if matches!(error, HsmError::LoginRefused(_)) {
            tracing::error!(
                error = %error,
                "the HSM token refused the PIN; custos will not log in again by itself (repeated attempts \
                 could lock the token): fix the PIN and restart custosd"
            );
        } else if outage.failures == 1 {
            tracing::error!(
                error = %error,
                retry_in_ms = backoff.as_millis() as u64,
                "HSM recovery failed; failing closed until the token is back"
            );
        } else {
            tracing::warn!(
                error = %error,
                failed_attempts = outage.failures,
                retry_in_ms = backoff.as_millis() as u64,
                "HSM still unavailable"
            );
        }
    }

    /// Finds the token again and logs in a new anchor, under the module gate.
    fn reopen(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
        let _gate = read(&MODULE_GATE);
        self.log_in_anchor(recovery)
    }

    /// `C_Finalize` and `C_Initialize`, then finds the token and logs in a new
    /// anchor. Holds the module gate exclusively: it waits for every call in
    /// flight, and no call starts until it is done. Everything this adapter
    /// holds is closed first, while the module still knows the handles.
    fn reinitialize(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
        let _gate = write(&MODULE_GATE);
        std::mem::take(&mut *lock(&self.idle))
            .into_iter()
            .for_each(TokenSession::retire);
        if let Some(anchor) = recovery.anchor.take() {
            anchor.retire();
        }
        self.forget_handles();
        match self.pkcs11.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => {
                let e = HsmError::from_cryptoki("finalize module", e);
                tracing::warn!(error = %e, "C_Finalize failed; initializing the module again anyway");
            }
        }
        let generation = MODULE_GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
        token::initialize(&self.pkcs11)?;
        tracing::info!(generation, "PKCS#11 module re-initialized");
        self.log_in_anchor(recovery)
    }

    /// Finds the token, opens and logs in a new anchor, and starts a new
    /// epoch: idle sessions and cached handles from before are discarded.
    /// The new anchor is open before the old one is closed, so the token
    /// never loses its last session. Called under the module gate.
    fn log_in_anchor(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
        let (slot, serial) = token::find_token(&self.pkcs11, &self.selector)?;
        let fresh = open_session(&self.pkcs11, slot, self.stamp())?;
        if let Err(e) = token::login(&fresh.session, &self.pin) {
            fresh.retire();
            return Err(e);
        }
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        *lock(&self.slot) = slot;
        self.forget_handles();
        std::mem::take(&mut *lock(&self.idle))
            .into_iter()
            .for_each(TokenSession::retire);
        let fresh = TokenSession {
            stamp: self.stamp(),
            ..fresh
        };
        if let Some(stale) = recovery.anchor.replace(fresh) {
            stale.retire();
        }
        if serial != recovery.serial {
            tracing::warn!(
                previous = %recovery.serial,
                now = %serial,
                "the HSM token was replaced (its serial number changed); every key is checked again by CKA_ID and public key"
            );
            recovery.serial = serial;
        }
        tracing::info!(slot = slot.id(), epoch, "HSM session recovered and logged in");
        Ok(())
    }

    fn forget_handles(&self) {
        for key in write(&self.keys).values_mut() {
            key.private = None;
        }
    }

    /// A lost login or token does not always say so: a logged-out session
    /// cannot see private objects, and SoftHSMv2 whose token files vanished
    /// finds nothing and reports `CKR_OBJECT_HANDLE_INVALID`. Before a
    /// missing key or a stale handle is reported as such, the session's login
    /// and the token itself are checked; a failure there is the real error,
    /// and one the executor recovers from.
    fn reclassify(&self, session: &Session, error: HsmError) -> HsmError {
        if !(error.is_stale_handle() || matches!(error, HsmError::KeyMissing(_))) {
            return error;
        }
        match session.get_session_info().map(|info| info.session_state()) {
            Ok(SessionState::RoUser | SessionState::RwUser) => {}
            Ok(_) => {
                return HsmError::Pkcs11 {
                    function: "C_GetSessionInfo".into(),
                    rv: RvError::UserNotLoggedIn,
                };
            }
            Err(e) => return HsmError::from_cryptoki("read session state", e),
        }
        let slot = *lock(&self.slot);
        match self.pkcs11.get_token_info(slot) {
            Ok(_) => error,
            Err(e) => HsmError::from_cryptoki("read token info", e),
        }
    }

    fn generate(&self, session: &Session, kind: KeyKind, label_base: &str) -> Result<GeneratedKey, HsmError> {
        let id = session
            .generate_random_vec(KEY_ID_LEN as u32)
            .map_err(|e| HsmError::from_cryptoki("generate key id", e))?;
        if id.len() != KEY_ID_LEN {
            return Err(HsmError::Malformed("C_GenerateRandom output length"));
        }
        let label = &format!("{label_base}-{}", hex::encode(&id[..4]));
        let taken = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| HsmError::from_cryptoki("find key by label", e))?;
        if !taken.is_empty() {
            return Err(HsmError::KeyRefused {
                label: label.to_owned(),
                attribute: "CKA_LABEL",
                actual: "already used on the token".into(),
                required: "unique",
            });
        }
        let (public_template, private_template) = keys::templates(kind, label, &id);
        let (public, private) = session
            .generate_key_pair(&kind.keygen_mechanism(), &public_template, &private_template)
            .map_err(|e| HsmError::from_cryptoki("generate key pair", e))?;
        let checked = keys::read_back(session, label, kind, private)
            .and_then(|attributes| Ok((attributes, keys::read_public_key(session, kind, public)?)));
        let (attributes, public_key) = match checked {
            Ok(ok) => ok,
            Err(refusal) => {
                tracing::error!(%label, error = %refusal, "generated key refused; destroying it");
                for object in [private, public] {
                    if let Err(e) = session.destroy_object(object) {
                        let e = HsmError::from_cryptoki("destroy refused key", e);
                        tracing::error!(%label, error = %e, "could not destroy refused key");
                    }
                }
                return Err(refusal);
            }
        };
        let id = KeyId(id);
        write(&self.keys).insert(
            id.clone(),
            CachedKey {
                kind,
                private: Some((self.stamp(), private)),
                public_key: public_key.clone(),
            },
        );
        Ok(GeneratedKey {
            id,
            label: label.to_owned(),
            public_key,
            attributes,
        })
    }

    fn load_key(&self, session: &Session, kind: KeyKind, id: &KeyId) -> Result<LoadedKey, HsmError> {
        let (private, attributes, public_key) = self.resolve(session, kind, id)?;
        self.cache_checked(id, kind, private, &public_key)?;
        Ok(LoadedKey {
            public_key,
            attributes,
        })
    }

    /// Finds a key pair by CKA_ID and checks it: attributes of the private
    /// key, and the public key's point.
    fn resolve(
        &self,
        session: &Session,
        kind: KeyKind,
        id: &KeyId,
    ) -> Result<(ObjectHandle, KeyAttributes, Vec<u8>), HsmError> {
        let (private, public) = keys::find_pair(session, id.as_bytes())?;
        let attributes = keys::read_back(session, &id.to_string(), kind, private)?;
        let public_key = keys::read_public_key(session, kind, public)?;
        Ok((private, attributes, public_key))
    }

    /// Caches a handle, refusing one whose public key differs from the one
    /// already cached for this id.
    fn cache_checked(
        &self,
        id: &KeyId,
        kind: KeyKind,
        private: ObjectHandle,
        public_key: &[u8],
    ) -> Result<(), HsmError> {
        let stamp = self.stamp();
        let mut keys = write(&self.keys);
        if let Some(known) = keys.get(id)
            && (known.public_key != public_key || known.kind != kind)
        {
            tracing::error!(key_id = %id, "key on token differs from the cached public key; refusing it");
            return Err(HsmError::KeyMismatch(id.to_string()));
        }
        keys.insert(
            id.clone(),
            CachedKey {
                kind,
                private: Some((stamp, private)),
                public_key: public_key.to_vec(),
            },
        );
        Ok(())
    }

    /// Signs `input` with the cached key `id`, which must be of `kind`: a
    /// wallet key is never used for log messages, nor the audit key for
    /// transactions.
    fn sign(&self, session: &Session, id: &KeyId, kind: KeyKind, input: &[u8]) -> Result<Vec<u8>, HsmError> {
        let stamp = self.stamp();
        let cached = read(&self.keys)
            .get(id)
            .map(|k| (k.kind, k.private))
            .ok_or_else(|| HsmError::KeyMissing(id.to_string()))?;
        let handle = match cached {
            (cached_kind, _) if cached_kind != kind => return Err(HsmError::KeyMismatch(id.to_string())),
            (_, Some((resolved, handle))) if resolved == stamp => handle,
            _ => self.re_resolve(session, kind, id)?,
        };
        let count = || {
            if kind == KeyKind::Secp256k1 {
                self.wallet_sign_calls.fetch_add(1, Ordering::Relaxed);
            }
        };
        count();
        match sign_raw(session, kind, handle, input) {
            Err(e) if e.is_stale_handle() => {
                tracing::warn!(key_id = %id, error = %e, "stale key handle; re-resolving by CKA_ID");
                let handle = self.re_resolve(session, kind, id)?;
                count();
                sign_raw(session, kind, handle, input)
            }
            other => other,
        }
    }

    fn re_resolve(&self, session: &Session, kind: KeyKind, id: &KeyId) -> Result<ObjectHandle, HsmError> {
        let (private, _, public_key) = self.resolve(session, kind, id)?;
        self.cache_checked(id, kind, private, &public_key)?;
        Ok(private)
    }
}

fn sign_raw(session: &Session, kind: KeyKind, key: ObjectHandle, input: &[u8]) -> Result<Vec<u8>, HsmError> {
    let _timer = crate::metrics::hsm_sign_timer(kind);
    session
        .sign(&kind.sign_mechanism(), key, input)
        .map_err(|e| HsmError::from_cryptoki("sign", e))
}

/// Opens a read-write session that cryptoki does not close on drop (see
/// [`TokenSession`]).
fn open_session(pkcs11: &Pkcs11, slot: Slot, stamp: Stamp) -> Result<TokenSession, HsmError> {
    pkcs11
        .open_rw_session_no_drop(slot)
        .map(|session| TokenSession { session, stamp })
        .map_err(|e| HsmError::from_cryptoki("open session", e))
}

/// The wait before the next recovery attempt after `failures` failed ones:
/// 250 ms, doubling, at most 2 s.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    BACKOFF_FIRST.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

fn unavailable(cause: HsmError) -> HsmError {
    match cause {
        HsmError::Unavailable(_) => cause,
        cause => HsmError::Unavailable(Box::new(cause)),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _gate = read(&MODULE_GATE);
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(PoisonError::into_inner));
        idle.into_iter().for_each(TokenSession::retire);
        let recovery = self.recovery.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(anchor) = recovery.anchor.take() {
            anchor.retire();
        }
    }
}

// A poisoned lock means a worker panicked mid-call; the guarded data (a
// session list, a slot id, a handle cache, the module gate's unit) stays
// consistent, so keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        let waits: Vec<u64> = (1..=6).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn unavailable_is_never_nested() {
        let once = unavailable(HsmError::Worker);
        let twice = unavailable(once.clone());
        assert!(matches!(twice, HsmError::Unavailable(inner) if matches!(*inner, HsmError::Worker)));
    }
}
