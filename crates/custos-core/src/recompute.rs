//! Recomputing a withdrawal's intent without the server: from its stored
//! unsigned transaction, the wallet's public key and a policy. An approver's
//! tool (`custos approve`) and the audit replay both do this instead of
//! trusting the intent the server shows or logged.
//!
//! The wallet's addresses come from its public key, and the network and
//! token registry from the policy, so nothing in the recomputed intent comes
//! from the party being checked.

use ::bitcoin::Network as BitcoinNetwork;
use k256::ecdsa::VerifyingKey;

use crate::chain::bitcoin::{self as bitcoin_chain, ParsedBitcoinTx};
use crate::chain::ethereum::{self, EthereumNetwork, ParsedEthereumTx, Token, UnsignedEthereumTx};
use crate::chain::{Chain, Intent, Network, TxRefusal, UnsignedTx};
use crate::policy::Policy;

/// The Bitcoin networks a CAIP-2 `bip122:` id can name.
pub const BITCOIN_NETWORKS: [BitcoinNetwork; 4] = [
    BitcoinNetwork::Bitcoin,
    BitcoinNetwork::Testnet,
    BitcoinNetwork::Signet,
    BitcoinNetwork::Regtest,
];

/// A transaction parsed for its wallet, of either chain.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedTx {
    /// Ethereum.
    Ethereum(ParsedEthereumTx),
    /// Bitcoin.
    Bitcoin(ParsedBitcoinTx),
}

impl ParsedTx {
    /// The intent derived from the transaction.
    pub fn intent(&self) -> &Intent {
        match self {
            Self::Ethereum(p) => p.intent(),
            Self::Bitcoin(p) => p.intent(),
        }
    }
}

/// Decodes a stored unsigned transaction: `chain` is `ethereum` (the
/// canonical unsigned encoding) or `bitcoin` (a PSBT), as the store and the
/// audit log name them.
pub fn decode(chain: &str, bytes: &[u8]) -> Result<UnsignedTx, TxRefusal> {
    let chain = Chain::from_name(chain)
        .ok_or_else(|| TxRefusal::new("chain", format!("{chain:?} is neither ethereum nor bitcoin")))?;
    UnsignedTx::decode(chain, bytes)
}

/// The network a CAIP-2 id names, if custos supports it.
pub fn network(caip2: &str) -> Option<Network> {
    if let Some(id) = caip2.strip_prefix("eip155:") {
        return id.parse().ok().map(|chain_id| Network::Ethereum { chain_id });
    }
    BITCOIN_NETWORKS
        .into_iter()
        .map(Network::Bitcoin)
        .find(|n| n.caip2() == caip2)
}

/// The EIP-155 chain id an unsigned Ethereum transaction carries.
pub fn chain_id(tx: &UnsignedEthereumTx) -> Option<u64> {
    match tx {
        UnsignedEthereumTx::Legacy(t) => t.chain_id,
        UnsignedEthereumTx::Eip1559(t) => Some(t.chain_id),
    }
}

/// The token registry `policy` sets for the EVM chain `chain_id`.
pub fn ethereum_network(policy: Option<&Policy>, chain_id: u64) -> Result<EthereumNetwork, TxRefusal> {
    let caip2 = Network::Ethereum { chain_id }.caip2();
    let tokens = policy
        .into_iter()
        .flat_map(|p| &p.assets)
        .filter(|a| a.network == caip2)
        .map(|a| {
            Ok(Token {
                symbol: a.symbol.clone(),
                contract: crate::chain::units::address(&a.contract)
                    .map_err(|e| TxRefusal::new("policy.assets.contract", e))?,
                decimals: a.decimals,
            })
        })
        .collect::<Result<_, TxRefusal>>()?;
    Ok(EthereumNetwork { chain_id, tokens })
}

/// Parses `tx` for the wallet with public key `key` on `network`, with the
/// token registry of `policy` (none without a policy).
pub fn parse_on(
    tx: UnsignedTx,
    network: Network,
    policy: Option<&Policy>,
    key: &VerifyingKey,
) -> Result<ParsedTx, TxRefusal> {
    match (tx, network) {
        (UnsignedTx::Ethereum(tx), Network::Ethereum { chain_id }) => {
            let from = crate::address::ethereum_address(key);
            ethereum::parse(tx, &ethereum_network(policy, chain_id)?, from).map(ParsedTx::Ethereum)
        }
        (UnsignedTx::Bitcoin(psbt), Network::Bitcoin(network)) => {
            let key = crate::address::bitcoin_public_key(key);
            bitcoin_chain::parse(psbt, network, &key).map(ParsedTx::Bitcoin)
        }
        (_, network) => Err(TxRefusal::new(
            "transaction",
            format!("is not a transaction for {}", network.caip2()),
        )),
    }
}

/// Parses `tx` for wallet `wallet_id` as `policy` governs it: on the
/// wallet's network in the policy, with the policy's token registry. A
/// wallet the policy does not govern is refused.
pub fn parse_under_policy(
    tx: UnsignedTx,
    policy: &Policy,
    wallet_id: &str,
    key: &VerifyingKey,
) -> Result<ParsedTx, TxRefusal> {
    let caip2 = &policy
        .wallets
        .get(wallet_id)
        .ok_or_else(|| TxRefusal::new("wallet", format!("the policy does not govern wallet {wallet_id}")))?
        .network;
    let network = network(caip2).ok_or_else(|| {
        TxRefusal::new(
            "wallet",
            format!("wallet {wallet_id} is on {caip2}, which custos does not support"),
        )
    })?;
    parse_on(tx, network, Some(policy), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caip2_ids_name_their_networks() {
        assert_eq!(
            network("eip155:11155111"),
            Some(Network::Ethereum { chain_id: 11_155_111 })
        );
        for n in BITCOIN_NETWORKS {
            assert_eq!(network(&Network::Bitcoin(n).caip2()), Some(Network::Bitcoin(n)));
        }
        assert_eq!(network("bip122:00"), None);
        assert_eq!(network("cosmos:hub"), None);
    }
}
