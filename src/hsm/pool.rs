//! The session pool: a fixed set of worker sessions, one permit each, every
//! PKCS#11 call on tokio's blocking pool with its timeout, and the sessions
//! handed back (or dropped, if they are from an older epoch or generation).

use super::*;

impl Inner {
    /// Runs `op`, recovering once from a lost session, login or token.
    ///
    /// While the token is down, `op` is not run until a recovery succeeds;
    /// within the backoff the call fails at once.
    pub(super) fn execute_blocking<T>(
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

    pub(super) fn stamp(&self) -> Stamp {
        Stamp {
            generation: MODULE_GENERATION.load(Ordering::Acquire),
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Runs `op` on a session from the pool, holding the module gate shared.
    /// On error, also returns the stamp of the session used, so that
    /// recovery runs once per failure.
    pub(super) fn run_pooled<T>(
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
    pub(super) fn take_session(&self) -> Result<TokenSession, HsmError> {
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
    pub(super) fn return_session(&self, pooled: TokenSession) {
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
}

/// A session opened by this adapter, without cryptoki's close-on-drop: it is
/// closed by [`TokenSession::retire`], and only if the module was not
/// re-initialized since it was opened (its handle may by then name another
/// session). Every PKCS#11 call on it happens under [`MODULE_GATE`].
pub(super) struct TokenSession {
    pub(super) session: Session,
    pub(super) stamp: Stamp,
}

impl TokenSession {
    pub(super) fn retire(self) {
        if self.stamp.generation != MODULE_GENERATION.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.session.close() {
            let e = HsmError::from_cryptoki("close session", e);
            tracing::debug!(error = %e, "closing a retired HSM session failed");
        }
    }
}

/// Opens a read-write session that cryptoki does not close on drop (see
/// [`TokenSession`]).
pub(super) fn open_session(pkcs11: &Pkcs11, slot: Slot, stamp: Stamp) -> Result<TokenSession, HsmError> {
    pkcs11
        .open_rw_session_no_drop(slot)
        .map(|session| TokenSession { session, stamp })
        .map_err(|e| HsmError::from_cryptoki("open session", e))
}
