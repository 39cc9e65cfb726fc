//! Secrets held in memory: the HSM user PIN.
//!
//! A [`Pin`] is zeroized on drop, prints as `Pin(<redacted>)`, and is only ever
//! handed to cryptoki as its own zeroizing `AuthPin`. It is read from a file
//! (which must not be readable by group or others) or from an environment variable.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

/// Where the PIN comes from. The variant names the source, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (one line; a trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

/// Why a PIN could not be loaded. Messages name the source, never the PIN.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The PIN file could not be read.
    #[error("cannot read PIN file {path}: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error kind, without file contents.
        reason: std::io::ErrorKind,
    },
    /// The PIN file can be read by group or others.
    #[error("PIN file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The environment variable is unset or not UTF-8.
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    /// The PIN is empty or not valid UTF-8.
    #[error("the PIN from {0} is empty or not UTF-8")]
    Invalid(String),
}

/// An HSM user PIN. Zeroized on drop; `Debug` never shows it.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Loads the PIN from its configured source.
    pub fn load(source: &PinSource) -> Result<Self, SecretError> {
        match source {
            PinSource::File(path) => Self::from_file(path),
            PinSource::Env(var) => {
                let value =
                    Zeroizing::new(std::env::var(var).map_err(|_| SecretError::EnvMissing(var.clone()))?);
                Self::from_text(value, var)
            }
        }
    }

    /// Wraps a PIN that custos generated itself (dev mode).
    pub fn from_generated(value: Zeroizing<String>) -> Self {
        Self(value)
    }

    fn from_file(path: &Path) -> Result<Self, SecretError> {
        let unreadable = |e: std::io::Error| SecretError::Unreadable {
            path: path.to_path_buf(),
            reason: e.kind(),
        };
        let mode = fs::metadata(path).map_err(unreadable)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(unreadable)?);
        let text =
            std::str::from_utf8(&bytes).map_err(|_| SecretError::Invalid(path.display().to_string()))?;
        Self::from_text(Zeroizing::new(text.to_owned()), &path.display().to_string())
    }

    fn from_text(mut value: Zeroizing<String>, source: &str) -> Result<Self, SecretError> {
        let trimmed_len = value.trim_end_matches(['\r', '\n']).len();
        value.truncate(trimmed_len);
        if value.is_empty() {
            return Err(SecretError::Invalid(source.to_owned()));
        }
        Ok(Self(value))
    }

    /// The PIN as cryptoki's own zeroizing secret type, for `C_Login`.
    pub(crate) fn to_auth_pin(&self) -> AuthPin {
        AuthPin::from(self.0.as_str())
    }

    /// The PIN text, for writing a generated PIN to its file in dev mode.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let pin = Pin::from_generated(Zeroizing::new("123456".into()));
        let shown = format!("{pin:?} {:?}", Some(&pin));
        assert!(!shown.contains("123456"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn file_with_open_mode_is_refused_and_error_has_no_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        fs::write(&path, "s3cret-pin\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Pin::load(&PinSource::File(path.clone())).unwrap_err();
        assert!(matches!(err, SecretError::TooOpen { mode: 0o644, .. }));
        assert!(!err.to_string().contains("s3cret"));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let pin = Pin::load(&PinSource::File(path)).unwrap();
        assert_eq!(pin.expose(), "s3cret-pin");
    }

    #[test]
    fn empty_pin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        fs::write(&path, "\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Pin::load(&PinSource::File(path)),
            Err(SecretError::Invalid(_))
        ));
    }
}
