//! The HSM adapter: the only module that talks PKCS#11.
//!
//! It owns the cryptoki context, one logged-in *anchor* session that is never
//! closed while the adapter lives (closing a token's last session logs the
//! application out; SoftHSM issue #464), a fixed pool of worker sessions, and a
//! cache of key handles and public keys so that no signature pays for a lookup.
//!
//! Every PKCS#11 call runs on tokio's blocking pool, holding one of
//! `sessions` permits until the call returns, and is abandoned (failing
//! closed) after the configured timeout. A call that fails because the
//! session or login was lost (`CKR_SESSION_HANDLE_INVALID`,
//! `CKR_SESSION_CLOSED`, `CKR_USER_NOT_LOGGED_IN`, `CKR_DEVICE_REMOVED`,
//! `CKR_TOKEN_NOT_PRESENT`) is retried once after the token is found again and
//! a new anchor is logged in; if that fails too, the call fails closed with
//! [`HsmError::Unavailable`]. Key generation is never retried automatically,
//! so a lost reply cannot create a second key.
//!
//! Recovery starts a new *epoch*: sessions and key handles from an older
//! epoch are discarded rather than reused. Handles are re-resolved by CKA_ID,
//! and the public key found must equal the one cached for that id, or the key
//! is refused. A private key planted under a wallet's id next to the genuine
//! public key can still be asked to sign once; its signature then fails
//! verification against the wallet's public key and is never released.

mod error;
mod keys;
pub mod personal;
pub mod raw_bench;
mod token;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use cryptoki::context::Pkcs11;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use cryptoki::slot::Slot;
use tokio::sync::Semaphore;

pub use error::HsmError;
pub use keys::{
    ED25519_EC_PARAMS, KEY_ID_LEN, KeyAttributes, KeyKind, P256_EC_PARAMS, SECP256K1_EC_PARAMS,
    check_private_key_attributes, ed25519_from_ec_point, sec1_from_ec_point,
};
pub use token::init_token;

use crate::chain::SigningDigest;
use crate::config::{HsmConfig, TokenSelector};
use crate::secret::Pin;

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
    /// The private key handle and the epoch it was resolved in.
    private: Option<(u64, ObjectHandle)>,
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

struct Inner {
    pkcs11: Pkcs11,
    selector: TokenSelector,
    pin: Pin,
    slot: Mutex<Slot>,
    /// Incremented by every recovery; sessions and handles carry the epoch
    /// they were opened or resolved in.
    epoch: AtomicU64,
    /// The login-holding session. Replaced only after a successor is logged in.
    anchor: Mutex<Option<Session>>,
    idle: Mutex<Vec<PooledSession>>,
    max_idle: usize,
    keys: RwLock<HashMap<KeyId, CachedKey>>,
    /// `C_Sign` calls made with wallet keys, successful or not.
    wallet_sign_calls: AtomicU64,
}

struct PooledSession {
    epoch: u64,
    session: Session,
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
        let pkcs11 = token::load_module(&config.module)?;
        let slot = token::find_slot(&pkcs11, &config.token)?;
        let anchor = open_session(&pkcs11, slot)?;
        token::login(&anchor, &pin)?;
        let sessions = config.sessions.get();
        let idle = (0..sessions)
            .map(|_| open_session(&pkcs11, slot).map(|session| PooledSession { epoch: 0, session }))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(slot = slot.id(), sessions, "HSM token opened and logged in");
        Ok(Self {
            inner: Arc::new(Inner {
                pkcs11,
                selector: config.token.clone(),
                pin,
                slot: Mutex::new(slot),
                epoch: AtomicU64::new(0),
                anchor: Mutex::new(Some(anchor)),
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
    fn execute_blocking<T>(
        &self,
        retry: Retry,
        op: &dyn Fn(&Inner, &Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let first = self.run_pooled(op);
        let Err((lost, seen_epoch)) = first else {
            return first.map_err(|(e, _)| e);
        };
        if !lost.is_session_loss() {
            return Err(lost);
        }
        tracing::warn!(error = %lost, "HSM session lost; recovering");
        if let Err(e) = self.recover(seen_epoch) {
            tracing::error!(error = %e, "HSM recovery failed; failing closed");
            return Err(HsmError::Unavailable(Box::new(e)));
        }
        if retry == Retry::Never {
            return Err(HsmError::Unavailable(Box::new(lost)));
        }
        match self.run_pooled(op) {
            Ok(value) => Ok(value),
            Err((e, _)) if e.is_session_loss() => {
                tracing::error!(error = %e, "HSM retry failed; failing closed");
                Err(HsmError::Unavailable(Box::new(e)))
            }
            // The session works again; what failed now is a real answer
            // (a missing or mismatched key, say) and is reported as such.
            Err((e, _)) => Err(e),
        }
    }

    /// Runs `op` on a session from the pool. On error, also returns the epoch
    /// of the session used, so that recovery runs once per epoch.
    fn run_pooled<T>(
        &self,
        op: &dyn Fn(&Inner, &Session) -> Result<T, HsmError>,
    ) -> Result<T, (HsmError, u64)> {
        let pooled = self
            .take_session()
            .map_err(|e| (e, self.epoch.load(Ordering::Acquire)))?;
        let result = op(self, &pooled.session).map_err(|e| reclassify_logged_out(&pooled.session, e));
        match result {
            Ok(value) => {
                self.return_session(pooled);
                Ok(value)
            }
            Err(e) if e.is_session_loss() => Err((e, pooled.epoch)),
            Err(e) => {
                let epoch = pooled.epoch;
                self.return_session(pooled);
                Err((e, epoch))
            }
        }
    }

    fn take_session(&self) -> Result<PooledSession, HsmError> {
        if let Some(pooled) = lock(&self.idle).pop() {
            return Ok(pooled);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let slot = *lock(&self.slot);
        Ok(PooledSession {
            epoch,
            session: open_session(&self.pkcs11, slot)?,
        })
    }

    /// Returns a session to the pool, unless it predates the last recovery or
    /// the pool is full (then it is closed; the anchor keeps the login).
    fn return_session(&self, pooled: PooledSession) {
        if pooled.epoch != self.epoch.load(Ordering::Acquire) {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(pooled);
        }
    }

    /// Re-finds the token, opens and logs in a new anchor, then starts a new
    /// epoch: idle sessions and cached handles from before are discarded.
    /// The new anchor is open before anything is closed, so the token never
    /// loses its last session. A failure seen in an epoch that another worker
    /// already recovered from needs no second recovery.
    fn recover(&self, seen_epoch: u64) -> Result<(), HsmError> {
        let mut anchor = lock(&self.anchor);
        if self.epoch.load(Ordering::Acquire) != seen_epoch {
            return Ok(());
        }
        let slot = token::find_slot(&self.pkcs11, &self.selector)?;
        let fresh = open_session(&self.pkcs11, slot)?;
        token::login(&fresh, &self.pin)?;
        *lock(&self.slot) = slot;
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        for key in write(&self.keys).values_mut() {
            key.private = None;
        }
        let stale_idle = std::mem::take(&mut *lock(&self.idle));
        let stale_anchor = anchor.replace(fresh);
        drop(stale_idle);
        drop(stale_anchor);
        tracing::info!(slot = slot.id(), epoch, "HSM session recovered");
        Ok(())
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
                private: Some((self.epoch.load(Ordering::Acquire), private)),
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
        let epoch = self.epoch.load(Ordering::Acquire);
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
                private: Some((epoch, private)),
                public_key: public_key.to_vec(),
            },
        );
        Ok(())
    }

    /// Signs `input` with the cached key `id`, which must be of `kind`: a
    /// wallet key is never used for log messages, nor the audit key for
    /// transactions.
    fn sign(&self, session: &Session, id: &KeyId, kind: KeyKind, input: &[u8]) -> Result<Vec<u8>, HsmError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let cached = read(&self.keys)
            .get(id)
            .map(|k| (k.kind, k.private))
            .ok_or_else(|| HsmError::KeyMissing(id.to_string()))?;
        let handle = match cached {
            (cached_kind, _) if cached_kind != kind => return Err(HsmError::KeyMismatch(id.to_string())),
            (_, Some((resolved_in, handle))) if resolved_in == epoch => handle,
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

/// A logged-out session cannot see private objects, so the token reports a
/// missing or invalid key handle rather than `CKR_USER_NOT_LOGGED_IN`. Such
/// failures are re-labelled as the session loss they are, so that the
/// executor logs in again instead of declaring the key gone.
fn reclassify_logged_out(session: &Session, error: HsmError) -> HsmError {
    if !(error.is_stale_handle() || matches!(error, HsmError::KeyMissing(_))) {
        return error;
    }
    match session.get_session_info().map(|info| info.session_state()) {
        Ok(SessionState::RoUser | SessionState::RwUser) => error,
        Ok(_) => HsmError::Pkcs11 {
            function: "C_GetSessionInfo".into(),
            rv: cryptoki::error::RvError::UserNotLoggedIn,
        },
        Err(e) => HsmError::from_cryptoki("read session state", e),
    }
}

fn sign_raw(session: &Session, kind: KeyKind, key: ObjectHandle, input: &[u8]) -> Result<Vec<u8>, HsmError> {
    session
        .sign(&kind.sign_mechanism(), key, input)
        .map_err(|e| HsmError::from_cryptoki("sign", e))
}

fn open_session(pkcs11: &Pkcs11, slot: Slot) -> Result<Session, HsmError> {
    pkcs11
        .open_rw_session(slot)
        .map_err(|e| HsmError::from_cryptoki("open session", e))
}

// A poisoned lock means a worker panicked mid-call; the guarded data (a
// session list, a slot id, a handle cache) stays consistent, so keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
