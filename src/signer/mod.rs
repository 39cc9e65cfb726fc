//! Keys that belong to people: an approver's or admin's own key, which signs
//! approval and governance messages on their side (the `custos` CLI), never
//! inside the server and never a transaction.
//!
//! Two holders are supported:
//! - a key file: PKCS#8 PEM, created with mode 0600 and refused if group or
//!   others can read it; the key is held in k256's zeroizing `SigningKey`
//!   behind a redacted `Debug`;
//! - a key on the person's own PKCS#11 token (a smartcard, YubiKey or HSM
//!   slot), found by token and key label, used through `CKM_ECDSA`.
//!
//! Either way the output is a 64-byte low-S `r || s` over a SHA-256 prehash,
//! checked against the public key before it is returned. The PKCS#11 side
//! is in `token.rs`.

mod token;

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use k256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use zeroize::Zeroizing;

use crate::hsm::HsmError;
use crate::hsm::TokenSelector;
use crate::secret::Pin;
use custos_core::approval::verify_prehash;

/// Why a personal key could not be created, loaded or used. Messages name
/// files and tokens, never key material.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The key file could not be read or written.
    #[error("key file {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error kind.
        reason: std::io::ErrorKind,
    },
    /// The key file can be read by group or others.
    #[error("key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a PKCS#8 PEM secp256k1 key.
    #[error("key file {0} is not a PKCS#8 PEM secp256k1 private key")]
    Malformed(PathBuf),
    /// The token failed.
    #[error("token: {0}")]
    Token(#[from] HsmError),
    /// The signature did not verify under the key (a faulty token).
    #[error("the signature produced does not verify under the signer's public key")]
    Unverified,
}

/// A person's key held in a file.
pub struct KeyFile {
    key: SigningKey,
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyFile({}, <private key redacted>)",
            public_key_string(self.key.verifying_key())
        )
    }
}

impl KeyFile {
    /// Generates a new key from the operating system's randomness.
    pub fn generate() -> Result<Self, SignerError> {
        loop {
            let mut seed = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut seed[..]).map_err(|_| SignerError::Io {
                path: PathBuf::from("<random>"),
                reason: std::io::ErrorKind::Other,
            })?;
            // Fails only for zero or values at or above the group order (~2^-128).
            if let Ok(key) = SigningKey::from_slice(&seed[..]) {
                return Ok(Self { key });
            }
        }
    }

    /// Writes the key to a new file with mode 0600; never overwrites.
    pub fn write_new(&self, path: &Path) -> Result<(), SignerError> {
        let io = |e: std::io::Error| SignerError::Io {
            path: path.to_path_buf(),
            reason: e.kind(),
        };
        let pem = self
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| SignerError::Malformed(path.to_path_buf()))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(pem.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Loads a key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<Self, SignerError> {
        let io = |e: std::io::Error| SignerError::Io {
            path: path.to_path_buf(),
            reason: e.kind(),
        };
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SignerError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let pem = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| SignerError::Malformed(path.to_path_buf()))?;
        Ok(Self { key })
    }

    /// The public key.
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs a SHA-256 prehash: 64-byte low-S `r || s`.
    pub fn sign_prehash(&self, prehash: &[u8; 32]) -> Result<[u8; 64], SignerError> {
        let (signature, _) = self.key.sign_prehash_recoverable(prehash);
        checked(signature.normalize_s(), prehash, self.verifying_key())
    }
}

/// A person's key on their own PKCS#11 token.
#[derive(Debug, Clone)]
pub struct TokenKey {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token.
    pub token: TokenSelector,
    /// CKA_LABEL of the private and public key objects.
    pub key_label: String,
}

impl TokenKey {
    /// Generates a non-extractable secp256k1 key pair on the token under
    /// `key_label` and returns its public key.
    pub fn generate(&self, pin: &Pin) -> Result<VerifyingKey, SignerError> {
        Ok(token::generate(&self.module, &self.token, &self.key_label, pin)?)
    }

    /// Signs a SHA-256 prehash on the token: 64-byte low-S `r || s`,
    /// verified against the token's public key.
    pub fn sign_prehash(
        &self,
        pin: &Pin,
        prehash: &[u8; 32],
    ) -> Result<([u8; 64], VerifyingKey), SignerError> {
        let (raw, public) = token::sign(&self.module, &self.token, &self.key_label, pin, prehash)?;
        let signature = Signature::from_slice(&raw).map_err(|_| SignerError::Unverified)?;
        let signature = signature.normalize_s();
        Ok((checked(signature, prehash, &public)?, public))
    }
}

fn checked(signature: Signature, prehash: &[u8; 32], key: &VerifyingKey) -> Result<[u8; 64], SignerError> {
    let bytes: [u8; 64] = signature.to_bytes().into();
    verify_prehash(prehash, &bytes, key).map_err(|_| SignerError::Unverified)?;
    Ok(bytes)
}

/// A public key as the policy document writes it: `secp256k1:<hex SEC1 compressed>`.
pub fn public_key_string(key: &VerifyingKey) -> String {
    format!("secp256k1:{}", hex::encode(key.to_sec1_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.pem");
        let key = KeyFile::generate().unwrap();
        key.write_new(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(key.write_new(&path).is_err(), "never overwrites");
        let loaded = KeyFile::load(&path).unwrap();
        assert_eq!(loaded.verifying_key(), key.verifying_key());
        let signature = loaded.sign_prehash(&[9; 32]).unwrap();
        verify_prehash(&[9; 32], &signature, key.verifying_key()).unwrap();

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(KeyFile::load(&path), Err(SignerError::TooOpen { .. })));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = KeyFile::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"));
        let secret = hex::encode(key.key.to_bytes());
        assert!(!shown.contains(&secret));
    }
}
