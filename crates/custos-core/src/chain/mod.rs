//! Chains: turning a chain's unsigned transaction into an [`Intent`] plus the
//! digests the HSM must sign, and turning signatures back into a broadcastable
//! transaction. Each chain uses its ecosystem's own library (alloy for
//! Ethereum, rust-bitcoin for Bitcoin); custos writes no RLP or sighash code.
//!
//! Everything here is pure: no I/O, no HSM. The digests are computed from the
//! same parsed transaction the intent describes, so what approvers see is what
//! gets signed.

pub mod bitcoin;
pub mod ethereum;
pub mod intent;
pub mod units;

pub use intent::{Asset, Destination, FeeTerms, Intent, Network};

/// A digest that custos computed from a transaction it parsed: an Ethereum
/// signing hash or a BIP-143 sighash. It is the only thing the HSM signs.
///
/// Only the chain parsers in this module can create one, so no hash supplied
/// by a caller can reach `C_Sign`: invariant 2 is a property of the types.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SigningDigest([u8; 32]);

impl SigningDigest {
    /// Wraps a digest computed by a chain parser.
    pub(crate) fn computed(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SigningDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningDigest({})", hex::encode(self.0))
    }
}

/// A chain custos signs for, named as the store and the audit log name it.
///
/// ```
/// use custos_core::chain::Chain;
///
/// assert_eq!(Chain::from_name("bitcoin"), Some(Chain::Bitcoin));
/// assert_eq!(Chain::Ethereum.name(), "ethereum");
/// assert_eq!(Chain::from_name("Ethereum"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chain {
    /// Ethereum: the canonical unsigned encoding of an EIP-1559 or legacy
    /// EIP-155 transaction.
    Ethereum,
    /// Bitcoin: a PSBT.
    Bitcoin,
}

impl Chain {
    /// `ethereum` or `bitcoin`.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Ethereum => "ethereum",
            Chain::Bitcoin => "bitcoin",
        }
    }

    /// Parses [`Chain::name`]; any other name is no chain.
    pub fn from_name(name: &str) -> Option<Self> {
        [Chain::Ethereum, Chain::Bitcoin]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

impl std::fmt::Display for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unsigned transaction of a supported chain, decoded but not yet parsed
/// against a wallet.
#[derive(Debug, Clone, PartialEq)]
pub enum UnsignedTx {
    /// Ethereum.
    Ethereum(ethereum::UnsignedEthereumTx),
    /// Bitcoin, as a PSBT.
    Bitcoin(::bitcoin::psbt::Psbt),
}

impl UnsignedTx {
    /// The chain it is for.
    pub fn chain(&self) -> Chain {
        match self {
            UnsignedTx::Ethereum(_) => Chain::Ethereum,
            UnsignedTx::Bitcoin(_) => Chain::Bitcoin,
        }
    }

    /// Decodes the bytes the store and the audit log keep for a
    /// transaction of `chain`: the canonical unsigned Ethereum encoding, or
    /// a PSBT.
    pub fn decode(chain: Chain, bytes: &[u8]) -> Result<Self, TxRefusal> {
        match chain {
            Chain::Ethereum => ethereum::decode_unsigned(bytes).map(UnsignedTx::Ethereum),
            Chain::Bitcoin => bitcoin::decode_psbt(bytes).map(UnsignedTx::Bitcoin),
        }
    }

    /// The bytes the store and the audit log keep: the inverse of
    /// [`UnsignedTx::decode`].
    pub fn canonical_bytes(&self) -> Vec<u8> {
        match self {
            UnsignedTx::Ethereum(tx) => ethereum::signing_payload(tx),
            UnsignedTx::Bitcoin(psbt) => psbt.serialize(),
        }
    }
}

/// Why an unsigned transaction was refused: the field, the rule and its kind.
///
/// `field` is a path into the transaction as the chain defines it, e.g.
/// `data`, `inputs[2].witness_utxo` or `chain_id`. The gRPC edge turns it into
/// a path of the request message it came in (see `custos::api::transaction`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TxRefusal {
    /// Where in the transaction.
    pub field: String,
    /// The rule it broke, in words an operator can act on.
    pub reason: String,
    /// What kind of rule, for a client to branch on.
    pub kind: RefusalKind,
}

/// The kinds of rule a refused transaction can break. Each one has its own
/// stable error reason on the wire (docs/errors.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// It does not decode, or breaks its encoding's own rules.
    Malformed,
    /// It decodes, but is a kind custos does not sign: contract creation,
    /// approve, blob or set-code transactions, taproot fields and the like.
    Unsupported,
    /// Its chain id is not the wallet's network.
    ChainIdMismatch,
    /// A mixed-case address fails its EIP-55 checksum.
    BadAddressChecksum,
    /// An amount or fee is outside what the chain allows, or overflows.
    AmountOutOfRange,
    /// It spends from an address that is not the wallet's.
    WrongSender,
    /// The gas limit is below the transaction's intrinsic cost, so no node
    /// would include it.
    GasBelowIntrinsic,
}

impl TxRefusal {
    /// A malformed `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::of(RefusalKind::Malformed, field, reason)
    }

    /// A refusal of `field` of the given kind.
    pub fn of(kind: RefusalKind, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            kind,
        }
    }

    /// A transaction custos does not sign, refused at `field`.
    pub fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::of(RefusalKind::Unsupported, field, reason)
    }
}
