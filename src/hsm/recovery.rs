//! Losing the token and getting it back: one recovery attempt (reopen,
//! then re-initialize the module under the exclusive gate), the outage state
//! and its backoff, and which errors count as a lost session. The module doc
//! of [`super`] describes the whole behaviour.

use super::*;

impl Inner {
    /// Recovers from a failure seen at `seen`, unless another worker already
    /// did, or the token is down and the backoff has not passed.
    pub(super) fn recover(&self, seen: Stamp) -> Result<(), HsmError> {
        let mut recovery = lock(&self.recovery);
        match &recovery.outage {
            Some(outage) if self.stamp() != seen || !outage.due() => Err(outage.cause.clone()),
            None if self.stamp() != seen => Ok(()),
            _ => self.attempt(&mut recovery),
        }
    }

    /// While the token is down: recovers if the backoff has passed, fails at
    /// once otherwise.
    pub(super) fn recover_outage(&self) -> Result<(), HsmError> {
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
    pub(super) fn attempt(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
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
    pub(super) fn mark_down(&self, seen: Stamp, error: &HsmError) {
        let mut recovery = lock(&self.recovery);
        if recovery.outage.is_none() && self.stamp() != seen {
            // Another worker recovered since; its sessions may work.
            return;
        }
        self.record_outage(&mut recovery, error);
    }

    pub(super) fn record_outage(&self, recovery: &mut Recovery, error: &HsmError) {
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
    pub(super) fn reopen(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
        let _gate = read(&MODULE_GATE);
        self.log_in_anchor(recovery)
    }

    /// `C_Finalize` and `C_Initialize`, then finds the token and logs in a new
    /// anchor. Holds the module gate exclusively: it waits for every call in
    /// flight, and no call starts until it is done. Everything this adapter
    /// holds is closed first, while the module still knows the handles.
    pub(super) fn reinitialize(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
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
    pub(super) fn log_in_anchor(&self, recovery: &mut Recovery) -> Result<(), HsmError> {
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

    /// A lost login or token does not always say so: a logged-out session
    /// cannot see private objects, and SoftHSMv2 whose token files vanished
    /// finds nothing and reports `CKR_OBJECT_HANDLE_INVALID`. Before a
    /// missing key or a stale handle is reported as such, the session's login
    /// and the token itself are checked; a failure there is the real error,
    /// and one the executor recovers from.
    pub(super) fn reclassify(&self, session: &Session, error: HsmError) -> HsmError {
        if !(error.is_stale_handle() || matches!(error, HsmError::KeyMissing(_))) {
            return error;
        }
        match self.check_session(session) {
            Ok(()) => error,
            Err(real) => real,
        }
    }

    /// Whether `session` is logged in and the token answers
    /// `C_GetTokenInfo`: the error is the lost login or token.
    pub(super) fn check_session(&self, session: &Session) -> Result<(), HsmError> {
        match session.get_session_info().map(|info| info.session_state()) {
            Ok(SessionState::RoUser | SessionState::RwUser) => {}
            Ok(_) => {
                return Err(HsmError::Pkcs11 {
                    function: "C_GetSessionInfo".into(),
                    rv: RvError::UserNotLoggedIn,
                });
            }
            Err(e) => return Err(HsmError::from_cryptoki("read session state", e)),
        }
        let slot = *lock(&self.slot);
        self.pkcs11
            .get_token_info(slot)
            .map(|_| ())
            .map_err(|e| HsmError::from_cryptoki("read token info", e))
    }
}

/// Serialises re-initialization of the PKCS#11 module against every other call
/// into it, process-wide (initialization is per process, not per context):
/// `C_Finalize` while another thread is inside the module is undefined
/// behaviour in most modules (SoftHSM frees its state). Every call holds it
/// shared; only [`Inner::reinitialize`] holds it exclusively. Never taken
/// twice by one thread.
pub(super) static MODULE_GATE: RwLock<()> = RwLock::new(());

/// How many times this process re-initialized the module. Sessions and
/// object handles from an older generation name nothing, or something else:
/// handle numbers start again after `C_Initialize`.
pub(super) static MODULE_GENERATION: AtomicU64 = AtomicU64::new(0);

/// First wait after a failed recovery before the next attempt.
pub(super) const BACKOFF_FIRST: Duration = Duration::from_millis(250);

/// Longest wait between recovery attempts while the token is down.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(super) struct Recovery {
    /// The login-holding session. Replaced only after a successor is logged
    /// in; absent only while the token is down after a re-initialization.
    pub(super) anchor: Option<TokenSession>,
    /// Serial number of the token found last, to log a replaced token.
    pub(super) serial: String,
    pub(super) outage: Option<Outage>,
}

/// The token is down: the last recovery attempt failed.
pub(super) struct Outage {
    pub(super) since: Instant,
    pub(super) failures: u32,
    pub(super) retry_at: Instant,
    pub(super) cause: HsmError,
}

impl Outage {
    /// Whether the next recovery attempt may run now. Never after the token
    /// refused the PIN: repeated attempts could lock it.
    pub(super) fn due(&self) -> bool {
        !matches!(self.cause, HsmError::LoginRefused(_)) && Instant::now() >= self.retry_at
    }
}

/// The wait before the next recovery attempt after `failures` failed ones:
/// 250 ms, doubling, at most 2 s.
pub(super) fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    BACKOFF_FIRST.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

pub(super) fn unavailable(cause: HsmError) -> HsmError {
    match cause {
        HsmError::Unavailable(_) => cause,
        cause => HsmError::Unavailable(Box::new(cause)),
    }
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
