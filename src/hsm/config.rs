//! The HSM adapter's configuration: which PKCS#11 module and token, where
//! the PIN comes from, the session pool's size and the limit on one call.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::PinSource;

/// Default number of PKCS#11 sessions in the signing pool.
pub const DEFAULT_SESSIONS: usize = 4;

/// Default limit on one HSM call, including the wait for a free session.
pub const DEFAULT_HSM_CALL_TIMEOUT_MS: u64 = 10_000;

/// How to find the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// Match CKA token label (padding ignored).
    Label(String),
    /// Match the token serial number (padding ignored).
    Serial(String),
}

/// PKCS#11 settings.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Which token to use.
    pub token: TokenSelector,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Worker sessions in the pool (one more is held open to keep the login).
    pub sessions: NonZeroUsize,
    /// Limit on one HSM call, including the wait for a free session; past it
    /// the request fails closed with UNAVAILABLE.
    pub call_timeout: Duration,
}
