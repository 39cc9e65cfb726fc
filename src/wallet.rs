//! The wallet registry: creating wallets (keys generated in the HSM), keeping
//! their verified public keys in memory, and signing digests with them.
//!
//! A wallet's public key is read from the token when it is created and stored.
//! At startup every stored wallet's key is looked up on the token again and
//! must match; a wallet whose key is missing or different stays listed but
//! cannot sign. Every signature is normalised and verified against the stored
//! public key before it leaves this module.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use k256::ecdsa::VerifyingKey;

use crate::clock::unix_now;
use crate::hsm::{Hsm, HsmError, KeyAttributes, KeyId, KeyKind};
use crate::store::{Store, StoreError, WalletRecord};
use custos_core::address;
use custos_core::chain::bitcoin as bitcoin_chain;
use custos_core::chain::{SigningDigest, ethereum};
use custos_core::signature::{self, RecoverableSignature, SignatureError};

/// Longest accepted display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 128;

/// A wallet id (AIP-122 resource id): 1 to 63 characters of `[a-z0-9-]`,
/// starting with a letter and not ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalletId(String);

/// Why a user-supplied value was refused; names the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub &'static str);

impl WalletId {
    /// Parses a wallet id.
    pub fn parse(id: &str) -> Result<Self, InvalidValue> {
        let bytes = id.as_bytes();
        let valid_chars = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        match bytes {
            [] => Err(InvalidValue("must not be empty")),
            _ if bytes.len() > 63 => Err(InvalidValue("must be at most 63 characters")),
            _ if !valid_chars => Err(InvalidValue("may contain only a-z, 0-9 and '-'")),
            [first, ..] if !first.is_ascii_lowercase() => Err(InvalidValue("must start with a letter a-z")),
            [.., b'-'] => Err(InvalidValue("must not end with '-'")),
            _ => Ok(Self(id.to_owned())),
        }
    }

    /// Parses a resource name `wallets/{wallet_id}`.
    pub fn from_resource_name(name: &str) -> Result<Self, InvalidValue> {
        let id = name
            .strip_prefix("wallets/")
            .ok_or(InvalidValue("must have the form wallets/{wallet_id}"))?;
        Self::parse(id)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `wallets/{wallet_id}`.
    pub fn resource_name(&self) -> String {
        format!("wallets/{}", self.0)
    }
}

/// A display name: at most [`MAX_DISPLAY_NAME_CHARS`] characters, no control characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    /// Parses a display name.
    pub fn parse(name: &str) -> Result<Self, InvalidValue> {
        if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
            return Err(InvalidValue("must be at most 128 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(InvalidValue("must not contain control characters"));
        }
        Ok(Self(name.to_owned()))
    }
}

/// A wallet as the service presents it.
#[derive(Debug, Clone)]
pub struct Wallet {
    /// The id.
    pub id: WalletId,
    /// Label for people.
    pub display_name: String,
    /// CKA_LABEL of the key pair.
    pub key_label: String,
    /// CKA_ID of the key pair.
    pub key_id: KeyId,
    /// The public key read from the token.
    pub public_key: VerifyingKey,
    /// Attributes read back at generation.
    pub attributes: KeyAttributes,
    /// Unix seconds.
    pub created_at: i64,
    /// EIP-55 Ethereum address.
    pub ethereum_address: String,
    /// Bech32 P2WPKH address.
    pub bitcoin_address: String,
}

/// A page of wallets.
#[derive(Debug, Clone)]
pub struct WalletPage {
    /// Wallets in creation order.
    pub wallets: Vec<Wallet>,
    /// Cursor for the next page, if there may be more.
    pub next_after: Option<i64>,
}

/// A wallet-registry failure.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// No wallet with this id.
    #[error("wallet {0} not found")]
    NotFound(String),
    /// The id is taken.
    #[error("wallet {0} already exists")]
    AlreadyExists(String),
    /// The wallet's key failed verification at startup; it cannot sign.
    #[error("wallet {0}'s key is not usable: {1}")]
    KeyUnusable(String, String),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HSM's signature was not released.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The transaction does not spend from this wallet.
    #[error("the transaction's sender is not wallet {0}")]
    WrongSender(String),
    /// A blocking task failed.
    #[error("background task failed")]
    Worker,
}

/// The registry of wallets and their verified keys.
#[derive(Debug)]
pub struct Wallets {
    hsm: Hsm,
    store: Arc<Store>,
    bitcoin_network: bitcoin::Network,
    signable: RwLock<HashMap<WalletId, Arc<Wallet>>>,
}

impl Wallets {
    /// Loads every stored wallet and checks its key on the token.
    pub async fn open(
        hsm: Hsm,
        store: Arc<Store>,
        bitcoin_network: bitcoin::Network,
    ) -> Result<Self, WalletError> {
        let wallets = Self {
            hsm,
            store,
            bitcoin_network,
            signable: RwLock::new(HashMap::new()),
        };
        let mut after = 0;
        loop {
            let page = wallets.page_records(after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for record in page {
                let wallet = wallets.wallet_of(&record)?;
                match wallets.hsm.load_key(KeyKind::Secp256k1, &wallet.key_id).await {
                    Ok(loaded) if sec1_matches(&loaded.public_key, &wallet.public_key) => {
                        wallets.cache(wallet);
                    }
                    Ok(_) => {
                        tracing::error!(wallet = %wallet.id.as_str(), "key on token differs from stored public key; wallet cannot sign")
                    }
                    Err(e) => {
                        tracing::error!(wallet = %wallet.id.as_str(), error = %e, "wallet key not usable; wallet cannot sign")
                    }
                }
            }
        }
        Ok(wallets)
    }

    /// Creates a wallet: a new secp256k1 key pair generated inside the HSM.
    pub async fn create(&self, id: WalletId, display_name: DisplayName) -> Result<Wallet, WalletError> {
        if self.record(&id).await?.is_some() {
            return Err(WalletError::AlreadyExists(id.as_str().to_owned()));
        }
        let generated = self
            .hsm
            .generate_secp256k1(&format!("custos-wallet-{}", id.as_str()))
            .await?;
        let public_key = VerifyingKey::from_sec1_bytes(&generated.public_key)
            .map_err(|_| HsmError::Malformed("secp256k1 public key"))?;
        let record = WalletRecord {
            seq: 0,
            wallet_id: id.as_str().to_owned(),
            display_name: display_name.0,
            key_label: generated.label.clone(),
            key_id: generated.id.as_bytes().to_vec(),
            public_key: public_key.to_sec1_point(true).as_bytes().to_vec(),
            attributes: generated.attributes,
            created_at: i64::try_from(unix_now()).unwrap_or(i64::MAX),
        };
        let store = Arc::clone(&self.store);
        let insert = record.clone();
        let inserted = tokio::task::spawn_blocking(move || store.insert_wallet(&insert))
            .await
            .map_err(|_| WalletError::Worker)?;
        match inserted {
            Ok(seq) => {
                let wallet = self.wallet_of(&WalletRecord { seq, ..record })?;
                self.cache(wallet.clone());
                tracing::info!(wallet = %id.as_str(), key_id = %generated.id, "wallet created");
                Ok(wallet)
            }
            Err(e) => {
                // The key pair is registered nowhere: remove it from the token.
                if let Err(destroy) = self.hsm.destroy_key(&generated.id).await {
                    tracing::warn!(key_id = %generated.id, error = %destroy, "could not destroy unregistered key");
                }
                match e {
                    StoreError::Conflict(_) => Err(WalletError::AlreadyExists(id.as_str().to_owned())),
                    other => Err(other.into()),
                }
            }
        }
    }

    /// One wallet.
    pub async fn get(&self, id: &WalletId) -> Result<Wallet, WalletError> {
        let record = self
            .record(id)
            .await?
            .ok_or_else(|| WalletError::NotFound(id.as_str().to_owned()))?;
        self.wallet_of(&record)
    }

    /// Up to `limit` wallets created after cursor `after` (0 for the start).
    pub async fn list(&self, after: i64, limit: usize) -> Result<WalletPage, WalletError> {
        let records = self.page_records(after, limit).await?;
        let next_after = (records.len() == limit)
            .then(|| records.last().map(|r| r.seq))
            .flatten();
        let wallets = records
            .iter()
            .map(|r| self.wallet_of(r))
            .collect::<Result<_, _>>()?;
        Ok(WalletPage { wallets, next_after })
    }

    /// Signs a digest that custos computed from a transaction it parsed.
    ///
    /// The raw HSM output is normalised to low-S and verified against the
    /// wallet's stored public key before it is returned.
    pub async fn sign_digest(
        &self,
        id: &WalletId,
        digest: SigningDigest,
    ) -> Result<RecoverableSignature, WalletError> {
        let wallet = self.signable(id)?;
        let raw = self.hsm.sign_ecdsa_prehash(&wallet.key_id, &digest).await?;
        match signature::finalize(&raw, digest.as_bytes(), &wallet.public_key) {
            Ok(sig) => Ok(sig),
            Err(e) => {
                // Whatever key produced this, it is not the wallet's: make the
                // next attempt look the key up again instead of reusing it.
                self.hsm.invalidate_handle(&wallet.key_id);
                tracing::error!(wallet = %id.as_str(), error = %e, "HSM signature refused");
                Err(e.into())
            }
        }
    }

    /// Signs a parsed Ethereum transaction with the wallet's key and returns
    /// the broadcastable transaction. The digest is the transaction's own
    /// signing hash; the signature recovers to the wallet (checked by
    /// [`signature::finalize`]).
    pub async fn sign_ethereum(
        &self,
        id: &WalletId,
        parsed: &ethereum::ParsedEthereumTx,
    ) -> Result<ethereum::SignedEthereumTx, WalletError> {
        let wallet = self.signable(id)?;
        if parsed.intent().from != wallet.ethereum_address {
            return Err(WalletError::WrongSender(id.as_str().to_owned()));
        }
        let signature = self.sign_digest(id, parsed.signing_digest()).await?;
        // Ethereum's v carries only the y parity. An r that overflowed the
        // group order (probability about 2^-128) cannot be expressed: refuse.
        if signature.recovery_id().is_x_reduced() {
            return Err(SignatureError::Unrecoverable.into());
        }
        // `finalize` verified the signature under the wallet's own key and
        // took the recovery id from that check, so the sender recovered from
        // the transaction is the wallet's address.
        let sender = address::ethereum_address(&wallet.public_key);
        Ok(ethereum::assemble(parsed, &signature, sender))
    }

    /// Signs every input of a parsed PSBT with the wallet's key and returns
    /// the finalized transaction.
    pub async fn sign_bitcoin(
        &self,
        id: &WalletId,
        parsed: &bitcoin_chain::ParsedBitcoinTx,
    ) -> Result<bitcoin_chain::SignedBitcoinTx, WalletError> {
        let wallet = self.signable(id)?;
        if parsed.intent().from != wallet.bitcoin_address {
            return Err(WalletError::WrongSender(id.as_str().to_owned()));
        }
        let mut signatures = Vec::with_capacity(parsed.sighashes().len());
        for sighash in parsed.sighashes() {
            signatures.push(self.sign_digest(id, *sighash).await?);
        }
        let key = address::bitcoin_public_key(&wallet.public_key);
        bitcoin_chain::assemble(parsed, &signatures, &key).map_err(|_| SignatureError::Malformed(64).into())
    }

    /// Whether a wallet with this id is registered, whatever its key's state.
    /// Blocking (one indexed read).
    pub fn exists(&self, id: &WalletId) -> Result<bool, WalletError> {
        Ok(self.store.wallet(id.as_str())?.is_some())
    }

    /// A wallet whose key was loaded from the token and checked, ready to sign.
    pub fn signable(&self, id: &WalletId) -> Result<Arc<Wallet>, WalletError> {
        self.signable
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| {
                WalletError::KeyUnusable(id.as_str().to_owned(), "not loaded from the token".into())
            })
    }

    fn cache(&self, wallet: Wallet) {
        self.signable
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(wallet.id.clone(), Arc::new(wallet));
    }

    async fn record(&self, id: &WalletId) -> Result<Option<WalletRecord>, WalletError> {
        let store = Arc::clone(&self.store);
        let id = id.as_str().to_owned();
        Ok(tokio::task::spawn_blocking(move || store.wallet(&id))
            .await
            .map_err(|_| WalletError::Worker)??)
    }

    async fn page_records(&self, after: i64, limit: usize) -> Result<Vec<WalletRecord>, WalletError> {
        let store = Arc::clone(&self.store);
        Ok(
            tokio::task::spawn_blocking(move || store.wallets_after(after, limit))
                .await
                .map_err(|_| WalletError::Worker)??,
        )
    }

    fn wallet_of(&self, record: &WalletRecord) -> Result<Wallet, WalletError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            table: "wallets",
            reason: format!("{}: {reason}", record.wallet_id),
        };
        let id = WalletId::parse(&record.wallet_id).map_err(|e| corrupt(e.0))?;
        let public_key =
            VerifyingKey::from_sec1_bytes(&record.public_key).map_err(|_| corrupt("public key"))?;
        Ok(Wallet {
            ethereum_address: address::ethereum_address_checksummed(&public_key),
            bitcoin_address: address::bitcoin_p2wpkh_address(&public_key, self.bitcoin_network).to_string(),
            id,
            display_name: record.display_name.clone(),
            key_label: record.key_label.clone(),
            key_id: KeyId::from_bytes(record.key_id.clone()),
            public_key,
            attributes: record.attributes,
            created_at: record.created_at,
        })
    }
}

fn sec1_matches(token_point: &[u8], stored: &VerifyingKey) -> bool {
    VerifyingKey::from_sec1_bytes(token_point).is_ok_and(|k| &k == stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wallet_ids_follow_aip_122() {
        for ok in ["a", "hot-1", "treasury-cold-2026", &"a".repeat(63)] {
            assert!(WalletId::parse(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("1abc", "start with a letter"),
            ("Hot", "a-z"),
            ("hot_1", "a-z"),
            ("hot-", "end with"),
            (&"a".repeat(64) as &str, "63"),
        ] {
            let err = WalletId::parse(bad).unwrap_err();
            assert!(err.0.contains(why), "{bad}: {}", err.0);
        }
        assert_eq!(
            WalletId::from_resource_name("wallets/hot").unwrap().as_str(),
            "hot"
        );
        assert!(WalletId::from_resource_name("hot").is_err());
        assert!(WalletId::from_resource_name("wallets/hot/x").is_err());
    }

    #[test]
    fn display_names_are_bounded() {
        assert!(DisplayName::parse(&"x".repeat(128)).is_ok());
        assert!(DisplayName::parse(&"x".repeat(129)).is_err());
        assert!(DisplayName::parse("a\nb").is_err());
    }
}
