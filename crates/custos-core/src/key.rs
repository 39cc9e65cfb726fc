//! The kinds of key custos holds, named as config, the store and the audit
//! log name them. How a token generates and uses each kind is the HSM
//! adapter's business; this leaf only names them.

/// The kinds of key custos keeps on a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Wallet keys: ECDSA over secp256k1, signing 32-byte digests.
    Secp256k1,
    /// The default audit key: Ed25519 through CKM_EDDSA, signing whole messages.
    Ed25519,
    /// The audit key on tokens without EdDSA: ECDSA P-256 over SHA-256.
    P256,
}

impl KeyKind {
    /// The lowercase name used in config, the store and output.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Secp256k1 => "secp256k1",
            KeyKind::Ed25519 => "ed25519",
            KeyKind::P256 => "p256",
        }
    }

    /// Parses [`KeyKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        [KeyKind::Secp256k1, KeyKind::Ed25519, KeyKind::P256]
            .into_iter()
            .find(|k| k.name() == name)
    }
}
