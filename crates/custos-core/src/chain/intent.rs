//! The intent: what a withdrawal does, derived from the parsed transaction,
//! and its canonical encoding and SHA-256 *intent hash*.
//!
//! The encoding is specified in docs/approval-format.md, with test vectors that
//! `tests/vectors/intent.json` carries and an independent Python
//! implementation checks. Amounts are unsigned integers in base units (wei,
//! satoshi) of up to 256 bits; nothing is ever a float.

use alloy_primitives::U256;
use k256::sha2::{Digest, Sha256};

/// Domain separator that starts every encoded intent.
pub const INTENT_DOMAIN: &[u8; 16] = b"custos/intent/v1";

/// The chain and network a transaction is valid on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// An EVM chain, by EIP-155 chain id.
    Ethereum {
        /// EIP-155 chain id.
        chain_id: u64,
    },
    /// A Bitcoin network.
    Bitcoin(::bitcoin::Network),
}

impl Network {
    /// The CAIP-2 chain id: `eip155:<chain id>`, or `bip122:` followed by the
    /// first 32 hex digits of the network's genesis block hash.
    pub fn caip2(&self) -> String {
        match self {
            Network::Ethereum { chain_id } => format!("eip155:{chain_id}"),
            Network::Bitcoin(network) => {
                let genesis = ::bitcoin::constants::genesis_block(*network)
                    .block_hash()
                    .to_string();
                format!("bip122:{}", &genesis[..32])
            }
        }
    }
}

/// The asset moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// Ticker from configuration (`ETH`, `BTC`, or the registered token's).
    pub symbol: String,
    /// The token contract (EIP-55), or `None` for the chain's native asset.
    pub contract: Option<String>,
    /// Decimals of the base unit, from configuration, never from the caller.
    pub decimals: u8,
}

/// One payment out of the wallet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Recipient address (EIP-55 for Ethereum, the network's encoding for Bitcoin).
    pub to: String,
    /// Amount in the asset's base units.
    pub amount: U256,
}

/// The fee terms the transaction commits to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeeTerms {
    /// Ethereum: the sender pays at most `gas_limit * max_fee_per_gas`.
    Ethereum {
        /// Account nonce.
        nonce: u64,
        /// Gas limit.
        gas_limit: u64,
        /// Max fee per gas (the gas price, for legacy transactions), in wei.
        max_fee_per_gas: u128,
        /// Max priority fee per gas (the gas price, for legacy transactions), in wei.
        max_priority_fee_per_gas: u128,
        /// `gas_limit * max_fee_per_gas`, in wei.
        max_total_fee: U256,
    },
    /// Bitcoin: the fee is exactly `inputs - outputs`.
    Bitcoin {
        /// Sum of outputs paying back to the wallet, in satoshi.
        change: u64,
        /// `sum(inputs) - sum(outputs)`, in satoshi.
        fee: u64,
        /// Upper bound of the signed transaction's virtual size, in vbytes.
        vsize: u64,
    },
}

impl FeeTerms {
    /// The most the transaction can pay in fees, in the native asset's base units.
    pub fn max_total_fee(&self) -> U256 {
        match self {
            FeeTerms::Ethereum { max_total_fee, .. } => *max_total_fee,
            FeeTerms::Bitcoin { fee, .. } => U256::from(*fee),
        }
    }
}

/// What a withdrawal does, derived from the transaction custos parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// Chain and network.
    pub network: Network,
    /// Asset moved to the destinations.
    pub asset: Asset,
    /// The wallet's address.
    pub from: String,
    /// Payments out, in transaction order. Bitcoin change is not a destination.
    pub destinations: Vec<Destination>,
    /// Fee terms.
    pub fee: FeeTerms,
    /// Commitment to the exact transaction: the Ethereum signing hash, or the
    /// Bitcoin txid (which signing does not change), in internal byte order.
    pub transaction_id: [u8; 32],
}

impl Intent {
    /// The canonical encoding (docs/approval-format.md, "Intent encoding").
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(INTENT_DOMAIN);
        put_str(&mut out, &self.network.caip2());
        put_str(&mut out, &self.asset.symbol);
        put_str(&mut out, self.asset.contract.as_deref().unwrap_or(""));
        out.push(self.asset.decimals);
        put_str(&mut out, &self.from);
        // A transaction cannot have 2^32 outputs; saturate rather than panic.
        let count = u32::try_from(self.destinations.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for destination in &self.destinations {
            put_str(&mut out, &destination.to);
            out.extend_from_slice(&destination.amount.to_be_bytes::<32>());
        }
        match &self.fee {
            FeeTerms::Ethereum {
                nonce,
                gas_limit,
                max_fee_per_gas,
                max_priority_fee_per_gas,
                max_total_fee,
            } => {
                out.push(0x01);
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&gas_limit.to_be_bytes());
                out.extend_from_slice(&U256::from(*max_fee_per_gas).to_be_bytes::<32>());
                out.extend_from_slice(&U256::from(*max_priority_fee_per_gas).to_be_bytes::<32>());
                out.extend_from_slice(&max_total_fee.to_be_bytes::<32>());
            }
            FeeTerms::Bitcoin { change, fee, vsize } => {
                out.push(0x02);
                out.extend_from_slice(&U256::from(*change).to_be_bytes::<32>());
                out.extend_from_slice(&U256::from(*fee).to_be_bytes::<32>());
                out.extend_from_slice(&vsize.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.transaction_id);
        out
    }

    /// SHA-256 of [`Intent::canonical_bytes`]: the value approvers sign.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical_bytes()).into()
    }

    /// The intent as JSON, in the field layout of tests/vectors/intent.json
    /// (amounts as decimal strings, hashes as hex).
    pub fn to_json(&self) -> serde_json::Value {
        let fee = match &self.fee {
            FeeTerms::Ethereum {
                nonce,
                gas_limit,
                max_fee_per_gas,
                max_priority_fee_per_gas,
                max_total_fee,
            } => serde_json::json!({
                "kind": "ethereum",
                "nonce": nonce,
                "gas_limit": gas_limit,
                "max_fee_per_gas": max_fee_per_gas.to_string(),
                "max_priority_fee_per_gas": max_priority_fee_per_gas.to_string(),
                "max_total_fee": max_total_fee.to_string(),
            }),
            FeeTerms::Bitcoin { change, fee, vsize } => serde_json::json!({
                "kind": "bitcoin",
                "change": change.to_string(),
                "fee": fee.to_string(),
                "vsize": vsize,
            }),
        };
        serde_json::json!({
            "network": self.network.caip2(),
            "asset": {
                "symbol": self.asset.symbol,
                "contract": self.asset.contract.clone().unwrap_or_default(),
                "decimals": self.asset.decimals,
            },
            "from": self.from,
            "destinations": self
                .destinations
                .iter()
                .map(|d| serde_json::json!({"to": d.to, "amount": d.amount.to_string()}))
                .collect::<Vec<_>>(),
            "fee": fee,
            "transaction_id": hex::encode(self.transaction_id),
        })
    }

    /// Total amount to destinations, in base units (saturating at 2^256-1,
    /// which no real transaction reaches).
    pub fn total_amount(&self) -> U256 {
        self.destinations
            .iter()
            .fold(U256::ZERO, |sum, d| sum.saturating_add(d.amount))
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    // Every string here is an address, a symbol or a CAIP-2 id: far below 4 GiB.
    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caip2_ids_match_the_registry() {
        assert_eq!(Network::Ethereum { chain_id: 1 }.caip2(), "eip155:1");
        assert_eq!(
            Network::Bitcoin(::bitcoin::Network::Bitcoin).caip2(),
            "bip122:000000000019d6689c085ae165831e93"
        );
        assert_eq!(
            Network::Bitcoin(::bitcoin::Network::Testnet).caip2(),
            "bip122:000000000933ea01ad0ee984209779ba"
        );
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = Intent {
            network: Network::Ethereum { chain_id: 1 },
            asset: Asset {
                symbol: "ETH".into(),
                contract: None,
                decimals: 18,
            },
            from: "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf".into(),
            destinations: vec![Destination {
                to: "0x3535353535353535353535353535353535353535".into(),
                amount: U256::from(10u64).pow(U256::from(18u64)),
            }],
            fee: FeeTerms::Ethereum {
                nonce: 9,
                gas_limit: 21_000,
                max_fee_per_gas: 20_000_000_000,
                max_priority_fee_per_gas: 20_000_000_000,
                max_total_fee: U256::from(21_000u64 * 20_000_000_000),
            },
            transaction_id: [7; 32],
        };
        let h = base.hash();
        let mut variants = Vec::new();
        let mut v = base.clone();
        v.network = Network::Ethereum { chain_id: 5 };
        variants.push(v);
        let mut v = base.clone();
        v.asset.symbol = "WETH".into();
        variants.push(v);
        let mut v = base.clone();
        v.asset.contract = Some("0x00".into());
        variants.push(v);
        let mut v = base.clone();
        v.asset.decimals = 6;
        variants.push(v);
        let mut v = base.clone();
        v.from = "0x00".into();
        variants.push(v);
        let mut v = base.clone();
        v.destinations[0].amount += U256::from(1u8);
        variants.push(v);
        let mut v = base.clone();
        v.destinations[0].to = "0x3535353535353535353535353535353535353536".into();
        variants.push(v);
        let mut v = base.clone();
        v.destinations.push(v.destinations[0].clone());
        variants.push(v);
        let mut v = base.clone();
        if let FeeTerms::Ethereum { nonce, .. } = &mut v.fee {
            *nonce += 1;
        }
        variants.push(v);
        let mut v = base.clone();
        v.transaction_id[31] ^= 1;
        variants.push(v);
        for variant in variants {
            assert_ne!(variant.hash(), h, "{variant:?}");
        }
    }

    #[test]
    fn strings_are_length_prefixed_so_boundaries_cannot_shift() {
        let mut a = Intent {
            network: Network::Bitcoin(::bitcoin::Network::Regtest),
            asset: Asset {
                symbol: "BTC".into(),
                contract: None,
                decimals: 8,
            },
            from: "ab".into(),
            destinations: vec![],
            fee: FeeTerms::Bitcoin {
                change: 0,
                fee: 0,
                vsize: 0,
            },
            transaction_id: [0; 32],
        };
        let mut b = a.clone();
        a.asset.symbol = "BTCa".into();
        a.from = "b".into();
        b.asset.symbol = "BTC".into();
        b.from = "ab".into();
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
    }
}

/// The published test vectors (tests/vectors/intent.json): the intents of
/// real parsed transactions, their canonical encodings and intent hashes.
#[cfg(test)]
mod vectors {
    use alloy_primitives::Address;
    use serde_json::{Value, json};

    use super::*;
    use crate::chain::bitcoin::tests::{psbt, wallet_key};
    use crate::chain::{bitcoin as btc, ethereum};

    const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/vectors/intent.json");

    fn eip155_example() -> Intent {
        let raw = hex::decode(
            "ec098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a764000080018080",
        )
        .unwrap();
        let from: Address = "0x9d8A62f656a8d1615C1294fd71e9CFb3E4855A4F".parse().unwrap();
        let network = ethereum::EthereumNetwork {
            chain_id: 1,
            tokens: vec![],
        };
        ethereum::parse(ethereum::decode_unsigned(&raw).unwrap(), &network, from)
            .unwrap()
            .intent()
            .clone()
    }

    fn erc20_max_amount() -> Intent {
        let usdc: Address = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238".parse().unwrap();
        let network = ethereum::EthereumNetwork {
            chain_id: 11155111,
            tokens: vec![ethereum::Token {
                symbol: "USDC".into(),
                contract: usdc,
                decimals: 6,
            }],
        };
        let mut data =
            hex::decode("a9059cbb0000000000000000000000003535353535353535353535353535353535353535").unwrap();
        data.extend([0xff; 32]);
        let fields = ethereum::EthereumFields {
            tx_type: ethereum::EthereumTxType::Eip1559,
            chain_id: 11155111,
            nonce: 42,
            gas_limit: 65_000,
            gas_price: 0,
            max_fee_per_gas: 30_000_000_000,
            max_priority_fee_per_gas: 1_500_000_000,
            to: Some(usdc),
            value: U256::ZERO,
            data,
        };
        let from: Address = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf".parse().unwrap();
        let tx = ethereum::UnsignedEthereumTx::try_from(fields).unwrap();
        ethereum::parse(tx, &network, from).unwrap().intent().clone()
    }

    fn bitcoin_with_change() -> Intent {
        let other: ::bitcoin::CompressedPublicKey =
            "025476c2e83188368da1ff3e292e7acafcdb3566bb0ad253f62fc70f07aeee6357"
                .parse()
                .unwrap();
        let pay = ::bitcoin::ScriptBuf::new_p2wpkh(&other.wpubkey_hash());
        let own = ::bitcoin::ScriptBuf::new_p2wpkh(&wallet_key().wpubkey_hash());
        let p = psbt(&wallet_key(), &[50_000, 70_000], &[(pay, 100_000), (own, 19_000)]);
        btc::parse(p, ::bitcoin::Network::Regtest, &wallet_key())
            .unwrap()
            .intent()
            .clone()
    }

    fn to_json(name: &str, intent: &Intent) -> Value {
        json!({
            "name": name,
            "intent": intent.to_json(),
            "canonical_hex": hex::encode(intent.canonical_bytes()),
            "intent_hash": hex::encode(intent.hash()),
        })
    }

    fn computed() -> Value {
        json!({
            "format": "custos intent v1; see docs/approval-format.md",
            "vectors": [
                to_json("ethereum-native-eip155-example", &eip155_example()),
                to_json("ethereum-erc20-max-amount", &erc20_max_amount()),
                to_json("bitcoin-regtest-with-change", &bitcoin_with_change()),
            ]
        })
    }

    /// The committed vectors equal what the code computes today. Set
    /// CUSTOS_WRITE_VECTORS=1 to rewrite them after a deliberate format change
    /// (which must also bump the domain separator).
    #[test]
    fn committed_vectors_match() {
        let computed = computed();
        if std::env::var_os("CUSTOS_WRITE_VECTORS").is_some() {
            std::fs::write(PATH, serde_json::to_string_pretty(&computed).unwrap() + "\n").unwrap();
        }
        let committed: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
        assert_eq!(committed, computed);
        assert_eq!(committed["vectors"].as_array().unwrap().len(), 3);
        let spec = include_str!("../../../../docs/approval-format.md");
        for vector in committed["vectors"].as_array().unwrap() {
            for key in ["canonical_hex", "intent_hash"] {
                let value = vector[key].as_str().unwrap();
                assert!(
                    spec.contains(value),
                    "docs/approval-format.md lacks {key} of {}",
                    vector["name"]
                );
            }
        }
    }
}
