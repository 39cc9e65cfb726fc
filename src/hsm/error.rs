//! Errors of the HSM adapter. Each PKCS#11 failure names the C function that failed.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// A failure in the HSM adapter. Messages carry no PIN and no key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded.
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// Module path from the config.
        path: String,
        /// Loader message.
        reason: String,
    },
    /// No initialized token matches the configured label or serial.
    #[error("no initialized token with {selector} (tokens present: {present})")]
    TokenNotFound {
        /// What was looked for, e.g. `label "custos"`.
        selector: String,
        /// Labels of the tokens that are present.
        present: String,
    },
    /// The token refused the user PIN.
    #[error("C_Login refused the user PIN ({0:?}); check the PIN source")]
    LoginRefused(RvError),
    /// A PKCS#11 call failed.
    #[error("{function} failed: {rv:?} ({rv})")]
    Pkcs11 {
        /// The C function, e.g. `C_Sign`.
        function: String,
        /// The return value.
        rv: RvError,
    },
    /// cryptoki failed before reaching the module (conversion, missing symbol).
    #[error("PKCS#11 binding error in {context}: {message}")]
    Binding {
        /// What was being done.
        context: &'static str,
        /// cryptoki's message.
        message: String,
    },
    /// The session, the login or the token was lost, and recovering it failed
    /// (or is backing off after a failure), or the single retry after
    /// recovery failed too: fail closed. Carries the underlying cause.
    #[error("HSM unavailable, failing closed: {0}")]
    Unavailable(Box<HsmError>),
    /// A key's attributes, read back from the token, are not the required ones.
    #[error("key {label:?} refused: {attribute} is {actual}, required {required}")]
    KeyRefused {
        /// CKA_LABEL of the key.
        label: String,
        /// The attribute name, e.g. `CKA_EXTRACTABLE`.
        attribute: &'static str,
        /// What the token reported.
        actual: String,
        /// What custos requires.
        required: &'static str,
    },
    /// The key with this CKA_ID is not on the token.
    #[error("key with CKA_ID {0} not found on the token")]
    KeyMissing(String),
    /// A key found under a known CKA_ID has a different public key than the one registered.
    #[error("key with CKA_ID {0} on the token does not match the registered public key")]
    KeyMismatch(String),
    /// The token returned bytes that are not a valid public key or signature.
    #[error("HSM returned a malformed {0}")]
    Malformed(&'static str),
    /// The blocking worker running a PKCS#11 call panicked or was cancelled.
    #[error("HSM worker task failed")]
    Worker,
    /// A PKCS#11 call (or the wait for a free session) took longer than allowed.
    #[error("HSM call did not complete within {0:?}")]
    Timeout(std::time::Duration),
}

impl HsmError {
    /// Wraps a cryptoki error, naming the C function when the module returned a code.
    pub fn from_cryptoki(context: &'static str, error: CkError) -> Self {
        crate::metrics::hsm_error(&error);
        match error {
            CkError::Pkcs11(rv, function) => HsmError::Pkcs11 {
                function: c_function_name(function),
                rv,
            },
            other => HsmError::Binding {
                context,
                message: other.to_string(),
            },
        }
    }

    /// The PKCS#11 return value, if this error carries one.
    pub fn rv(&self) -> Option<RvError> {
        match self {
            HsmError::Pkcs11 { rv, .. } | HsmError::LoginRefused(rv) => Some(*rv),
            HsmError::Unavailable(inner) => inner.rv(),
            _ => None,
        }
    }

    /// Whether this error means the session, the login or the token is gone,
    /// so that reopening the session, logging in again or re-initializing the
    /// module may succeed. Besides the codes for a lost session or login,
    /// this covers what SoftHSMv2 returns once its token files vanished
    /// (`CKR_GENERAL_ERROR` from `C_GetTokenInfo` and `C_Login`), what a
    /// module re-initialized under us returns (`CKR_CRYPTOKI_NOT_INITIALIZED`,
    /// `CKR_SLOT_ID_INVALID`), and a token that is not found at all.
    pub fn is_session_loss(&self) -> bool {
        if matches!(self, HsmError::Unavailable(_)) {
            return false;
        }
        matches!(self, HsmError::TokenNotFound { .. })
            || matches!(
                self.rv(),
                Some(
                    RvError::SessionHandleInvalid
                        | RvError::SessionClosed
                        | RvError::UserNotLoggedIn
                        | RvError::DeviceRemoved
                        | RvError::DeviceError
                        | RvError::TokenNotPresent
                        | RvError::TokenNotRecognized
                        | RvError::GeneralError
                        | RvError::CryptokiNotInitialized
                        | RvError::SlotIdInvalid
                )
            )
    }

    /// Whether a cached object handle no longer names an object on the token.
    pub(crate) fn is_stale_handle(&self) -> bool {
        matches!(
            self.rv(),
            Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
        )
    }
}

/// `C_Sign` for `Function::Sign`: the name a PKCS#11 reader looks for.
pub(crate) fn c_function_name(function: Function) -> String {
    format!("C_{function:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_c_function() {
        let err = HsmError::from_cryptoki(
            "sign",
            CkError::Pkcs11(RvError::SessionHandleInvalid, Function::Sign),
        );
        let text = err.to_string();
        assert!(text.starts_with("C_Sign failed: SessionHandleInvalid"), "{text}");
        assert!(err.is_session_loss());
        assert!(!HsmError::Unavailable(Box::new(err)).is_session_loss());
    }

    #[test]
    fn only_listed_codes_count_as_session_loss() {
        for (rv, lost) in [
            (RvError::SessionHandleInvalid, true),
            (RvError::SessionClosed, true),
            (RvError::UserNotLoggedIn, true),
            (RvError::DeviceRemoved, true),
            (RvError::TokenNotPresent, true),
            (RvError::DeviceError, true),
            (RvError::GeneralError, true),
            (RvError::CryptokiNotInitialized, true),
            (RvError::SlotIdInvalid, true),
            (RvError::PinIncorrect, false),
            (RvError::KeyHandleInvalid, false),
            (RvError::ObjectHandleInvalid, false),
            (RvError::FunctionFailed, false),
            (RvError::UserAlreadyLoggedIn, false),
        ] {
            let err = HsmError::Pkcs11 {
                function: "C_Sign".into(),
                rv,
            };
            assert_eq!(err.is_session_loss(), lost, "{rv:?}");
        }
        let missing = HsmError::TokenNotFound {
            selector: "label \"custos\"".into(),
            present: "none".into(),
        };
        assert!(missing.is_session_loss());
        assert!(!HsmError::LoginRefused(RvError::PinIncorrect).is_session_loss());
        assert!(!HsmError::KeyMissing("00".into()).is_session_loss());
    }
}
