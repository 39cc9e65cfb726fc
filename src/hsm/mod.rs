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
//!
//! # Files
//!
//! This file holds the public [`Hsm`] and the state it shares; `pool.rs`
//! runs calls on the session pool, `recovery.rs` recovers lost sessions and
//! tokens, `cache.rs` generates, finds and caches keys, `keys.rs` holds the
//! templates and the read-back check, `token.rs` finds and initializes
//! tokens, and `error.rs` maps PKCS#11 errors.

mod cache;
mod config;
mod error;
pub(crate) mod keys;
mod pool;
mod recovery;
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
pub use token::{init_token, tool_session};
use tokio::sync::Semaphore;

use crate::secret::Pin;
use cache::CachedKey;
use custos_core::chain::SigningDigest;
use pool::{TokenSession, open_session};
use recovery::{MODULE_GATE, MODULE_GENERATION, Recovery, unavailable};

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

/// A logged-in PKCS#11 token with a fixed pool of sessions.
///
/// Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    call_timeout: Duration,
}

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

    /// Checks that the token is usable now: a pooled session is logged in
    /// and the token answers `C_GetTokenInfo`. A lost session, login or
    /// token is recovered from as any other call would (so a probe alone
    /// brings the token back once it returns); while the token is down, the
    /// probe fails without touching it until the recovery backoff has
    /// passed. What health reports for the HSM.
    pub async fn probe(&self) -> Result<(), HsmError> {
        self.execute(Retry::Once, |inner, session| inner.check_session(session))
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

impl Inner {}

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
