//! Transactions signed through the HSM and checked by independent decoders:
//! alloy's own decoding and signer recovery for Ethereum, and Bitcoin Core's
//! script interpreter (libbitcoinconsensus) for Bitcoin.

use alloy_consensus::transaction::SignerRecoverable;
use alloy_consensus::{Transaction as _, TxEnvelope};
use alloy_eips::eip2718::{Decodable2718, Encodable2718};
use alloy_primitives::{Address, U256};
use alloy_sol_types::{SolCall, sol};
use bitcoin::hashes::Hash;
use bitcoin::psbt::{Input, Psbt};
use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, absolute, transaction};
use k256::sha2::{Digest, Sha256};

use crate::support;
use custos::wallet::{DisplayName, WalletId};
use custos_core::chain::ethereum::{
    self, EthereumFields, EthereumNetwork, EthereumTxType, Token, UnsignedEthereumTx,
};
use custos_core::chain::{FeeTerms, bitcoin as btc};
use custos_core::signature::is_low_s;

sol! {
    function transfer(address to, uint256 amount) external returns (bool);
}

/// Deterministic pseudo-random numbers: SHA-256 of a label and a counter.
struct Stream(u64);

impl Stream {
    fn bytes32(&mut self) -> [u8; 32] {
        self.0 += 1;
        Sha256::digest(self.0.to_be_bytes()).into()
    }

    fn below(&mut self, bound: u64) -> u64 {
        u64::from_be_bytes(self.bytes32()[..8].try_into().unwrap()) % bound
    }

    fn u256(&mut self) -> U256 {
        // Spread over the whole range, including values above 2^128.
        let bits = self.below(257) as usize;
        U256::from_be_bytes(self.bytes32()) >> (256 - bits.min(256))
    }

    fn address(&mut self) -> Address {
        Address::from_slice(&self.bytes32()[..20])
    }
}

/// 100 random transfers and ERC-20 transfers, legacy and EIP-1559, signed by
/// the HSM. alloy decodes each signed transaction independently, recovers the
/// wallet's address, and re-encodes it to the same bytes.
#[test]
fn hundred_random_ethereum_transactions_sign_and_recover_to_the_wallet() {
    support::with_app_in_child(
        "transactions::hundred_random_ethereum_transactions_sign_and_recover_to_the_wallet",
        |app, _dir| async move {
            let id = WalletId::parse("eth").unwrap();
            let wallet = app
                .wallets
                .create(id.clone(), DisplayName::default())
                .await
                .unwrap();
            let from: Address = wallet.ethereum_address.parse().unwrap();
            let mut rng = Stream(7);
            let mut seen = [0usize; 4];
            for i in 0..100u64 {
                let chain_id = [1u64, 5, 137, 31337, 11155111][rng.below(5) as usize];
                let token = Token {
                    symbol: "TKN".into(),
                    contract: rng.address(),
                    decimals: 6,
                };
                let network = EthereumNetwork {
                    chain_id,
                    tokens: vec![token.clone()],
                };
                let is_erc20 = i % 2 == 1;
                let tx_type = if i % 4 < 2 {
                    EthereumTxType::Legacy
                } else {
                    EthereumTxType::Eip1559
                };
                seen[(i % 4) as usize] += 1;
                let fee = 1_000_000_000 + u128::from(rng.below(500_000_000_000));
                let recipient = rng.address();
                let amount = rng.u256();
                let fields = EthereumFields {
                    tx_type,
                    chain_id,
                    nonce: rng.below(1 << 40),
                    gas_limit: 21_000 + rng.below(1_000_000),
                    gas_price: if tx_type == EthereumTxType::Legacy { fee } else { 0 },
                    max_fee_per_gas: if tx_type == EthereumTxType::Eip1559 {
                        fee
                    } else {
                        0
                    },
                    max_priority_fee_per_gas: if tx_type == EthereumTxType::Eip1559 {
                        fee / 10
                    } else {
                        0
                    },
                    to: Some(if is_erc20 { token.contract } else { recipient }),
                    value: if is_erc20 { U256::ZERO } else { amount },
                    data: if is_erc20 {
                        transferCall {
                            to: recipient,
                            amount,
                        }
                        .abi_encode()
                    } else {
                        Vec::new()
                    },
                };
                let unsigned = UnsignedEthereumTx::try_from(fields).unwrap();
                let parsed = ethereum::parse(unsigned, &network, from).unwrap();
                let intent = parsed.intent();
                assert_eq!(intent.destinations[0].to, recipient.to_checksum(None));
                assert_eq!(intent.destinations[0].amount, amount);
                assert_eq!(intent.asset.symbol, if is_erc20 { "TKN" } else { "ETH" });

                let signed = app.wallets.sign_ethereum(&id, &parsed).await.unwrap();
                assert_eq!(signed.sender, from);

                // Independent decoding of what would be broadcast.
                let envelope = TxEnvelope::decode_2718_exact(&signed.raw).unwrap();
                assert_eq!(envelope.recover_signer().unwrap(), from, "tx {i}");
                assert_eq!(envelope.chain_id(), Some(chain_id));
                assert_eq!(envelope.encoded_2718(), signed.raw, "round trip");
                assert_eq!(*envelope.tx_hash(), signed.hash);
                assert_eq!(alloy_primitives::keccak256(&signed.raw), signed.hash);
                assert_eq!(envelope.signature_hash().0, parsed.signing_hash());
                assert!(envelope.signature().normalize_s().is_none(), "high-S released");
                assert_eq!(
                    envelope.kind().to().copied(),
                    Some(if is_erc20 { token.contract } else { recipient })
                );
            }
            assert_eq!(seen, [25; 4], "every shape covered");
        },
    );
}

fn p2wpkh(seed: u8) -> ScriptBuf {
    let key = k256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    let compressed =
        bitcoin::CompressedPublicKey::from_slice(key.verifying_key().to_sec1_point(true).as_bytes()).unwrap();
    ScriptBuf::new_p2wpkh(&compressed.wpubkey_hash())
}

/// PSBTs with 1 to 5 inputs and change, signed by the HSM. Every input is
/// verified by Bitcoin Core's own script interpreter.
#[test]
fn bitcoin_psbts_with_one_to_five_inputs_pass_bitcoin_core_verification() {
    support::with_app_in_child(
        "transactions::bitcoin_psbts_with_one_to_five_inputs_pass_bitcoin_core_verification",
        |app, _dir| async move {
            let id = WalletId::parse("btc").unwrap();
            let wallet = app
                .wallets
                .create(id.clone(), DisplayName::default())
                .await
                .unwrap();
            let key = custos_core::address::bitcoin_public_key(&wallet.public_key);
            let own = ScriptBuf::new_p2wpkh(&key.wpubkey_hash());
            let mut rng = Stream(11);
            for inputs in 1..=5usize {
                for round in 0..3 {
                    let amounts: Vec<u64> = (0..inputs).map(|_| 10_000 + rng.below(5_000_000)).collect();
                    let total: u64 = amounts.iter().sum();
                    let fee = 500 + rng.below(2_000);
                    let pay = (total - fee) / 2;
                    let mut outputs = vec![TxOut {
                        value: Amount::from_sat(pay),
                        script_pubkey: p2wpkh(round + 1),
                    }];
                    if round == 2 {
                        // A second destination and no change at all.
                        outputs.push(TxOut {
                            value: Amount::from_sat(total - fee - pay),
                            script_pubkey: p2wpkh(9),
                        });
                    } else {
                        outputs.push(TxOut {
                            value: Amount::from_sat(total - fee - pay),
                            script_pubkey: own.clone(),
                        });
                    }
                    // Each input spends output `vout` of its own previous
                    // transaction, which the PSBT carries to prove the amount.
                    let previous: Vec<(Transaction, u32)> = amounts
                        .iter()
                        .map(|amount| {
                            let vout = rng.below(4) as u32;
                            let prev = Transaction {
                                version: transaction::Version::TWO,
                                lock_time: absolute::LockTime::from_consensus(rng.below(500_000) as u32),
                                input: vec![],
                                output: (0..=vout)
                                    .map(|j| TxOut {
                                        value: Amount::from_sat(if j == vout { *amount } else { 546 }),
                                        script_pubkey: if j == vout { own.clone() } else { p2wpkh(42) },
                                    })
                                    .collect(),
                            };
                            (prev, vout)
                        })
                        .collect();
                    let tx = Transaction {
                        version: transaction::Version::TWO,
                        lock_time: absolute::LockTime::ZERO,
                        input: previous
                            .iter()
                            .map(|(prev, vout)| TxIn {
                                previous_output: OutPoint {
                                    txid: prev.compute_txid(),
                                    vout: *vout,
                                },
                                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                                ..Default::default()
                            })
                            .collect(),
                        output: outputs,
                    };
                    let mut psbt = Psbt::from_unsigned_tx(tx).unwrap();
                    for (input, (prev, vout)) in psbt.inputs.iter_mut().zip(&previous) {
                        *input = Input {
                            witness_utxo: Some(prev.output[*vout as usize].clone()),
                            non_witness_utxo: Some(prev.clone()),
                            ..Default::default()
                        };
                    }
                    let bytes = psbt.serialize();
                    let parsed =
                        btc::parse(btc::decode_psbt(&bytes).unwrap(), bitcoin::Network::Regtest, &key)
                            .unwrap();
                    let FeeTerms::Bitcoin { fee: parsed_fee, .. } = parsed.intent().fee else {
                        panic!("not bitcoin")
                    };
                    assert_eq!(parsed_fee, fee);
                    assert_eq!(parsed.intent().destinations.len(), if round == 2 { 2 } else { 1 });

                    let signed = app.wallets.sign_bitcoin(&id, &parsed).await.unwrap();
                    assert_eq!(signed.txid.to_byte_array(), parsed.intent().transaction_id);
                    let decoded: Transaction = bitcoin::consensus::encode::deserialize(&signed.raw).unwrap();
                    assert_eq!(decoded.compute_txid(), signed.txid);
                    for (index, amount) in amounts.iter().enumerate() {
                        bitcoinconsensus::verify(own.as_bytes(), *amount, &signed.raw, None, index)
                            .unwrap_or_else(|e| panic!("{inputs} inputs, input {index}: {e:?}"));
                        let witness_sig = decoded.input[index].witness.nth(0).unwrap();
                        let sig = bitcoin::ecdsa::Signature::from_slice(witness_sig).unwrap();
                        let low =
                            k256::ecdsa::Signature::from_slice(&sig.signature.serialize_compact()).unwrap();
                        assert!(is_low_s(&low));
                    }
                    // Bitcoin Core rejects the same signature under a wrong amount.
                    assert!(
                        bitcoinconsensus::verify(own.as_bytes(), amounts[0] + 1, &signed.raw, None, 0)
                            .is_err()
                    );
                }
            }
        },
    );
}
