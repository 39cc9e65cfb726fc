//! Fixtures and property checks shared by the custos fuzz targets.
//!
//! Each target under `fuzz_targets/` feeds bytes to one custos parser and then
//! checks what that parser promises about the input it accepted: canonical
//! encodings round-trip, refusals name a field, and what a parse yields
//! commits to exactly the input. The checks live here because the
//! `grpc_requests` target reaches the same parsers through the request
//! conversions and runs the same checks there. This library needs only
//! `custos-core`; the server crate comes in with the `server` feature, for
//! `grpc_requests` alone.
//!
//! Every check panics on a broken property; libFuzzer reports the panic as a
//! crash and saves the input.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use alloy_primitives::{Address, TxKind, U256, keccak256};
use bitcoin::hashes::Hash;
use bitcoin::psbt::Psbt;
use bitcoin::{Amount, CompressedPublicKey, ScriptBuf};
use k256::ecdsa::VerifyingKey;
use k256::sha2::{Digest, Sha256};

use custos_core::approval::ApprovalMessage;
use custos_core::chain::bitcoin::{self as btc, ParsedBitcoinTx};
use custos_core::chain::ethereum::{
    self, EthereumFields, EthereumNetwork, EthereumTxType, ParsedEthereumTx, Token, UnsignedEthereumTx,
};
use custos_core::chain::intent::INTENT_DOMAIN;
use custos_core::chain::{Asset, Destination, FeeTerms, Intent, Network, TxRefusal, UnsignedTx};
use custos_core::recompute;
use custos_core::governance::GovernanceMessage;
use custos_core::policy::{
    Action, Approval, Decision, DenyReason, Outcome, Policy, Usage, Vote, Withdrawal, evaluate, policy_hash,
};

/// docs/policy-example.toml: the policy the fixtures run under.
pub const EXAMPLE_POLICY: &[u8] = include_bytes!("../../docs/policy-example.toml");
/// The service id of the examples in docs/approval-format.md.
pub const SERVICE_ID: &str = "custos-dev";
/// The clock of every check: an hour before the docs' vectors expire.
pub const NOW: u64 = 1_800_000_000 - 3600;

/// The secp256k1 generator point, SEC1 compressed: the wallet key of the
/// pure tests (its P2WPKH address is BIP-173's example).
const GENERATOR: &str = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";

/// The example policy, parsed once.
pub fn example_policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| Policy::parse(EXAMPLE_POLICY).expect("docs/policy-example.toml parses"))
}

/// The wallet key: the generator point.
pub fn wallet_key() -> &'static VerifyingKey {
    static KEY: OnceLock<VerifyingKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let sec1 = hex::decode(GENERATOR).expect("constant hex");
        VerifyingKey::from_sec1_bytes(&sec1).expect("the generator is a point")
    })
}

/// The wallet key as rust-bitcoin's type.
pub fn bitcoin_key() -> CompressedPublicKey {
    custos_core::address::bitcoin_public_key(wallet_key())
}

/// The wallet's Ethereum address.
pub fn ethereum_from() -> Address {
    custos_core::address::ethereum_address(wallet_key())
}

/// A refusal names the field and the rule.
pub fn check_refusal(refusal: &TxRefusal) {
    assert!(!refusal.field.is_empty(), "refusal without a field: {refusal:?}");
    assert!(
        !refusal.reason.is_empty(),
        "refusal without a reason: {refusal:?}"
    );
}

/// Checks a decoded or converted unsigned transaction of either chain.
pub fn check_unsigned(tx: &UnsignedTx) {
    match tx {
        UnsignedTx::Ethereum(tx) => check_ethereum(tx),
        UnsignedTx::Bitcoin(psbt) => check_psbt(psbt),
    }
}

/// Checks an unsigned Ethereum transaction custos decoded or built: its
/// canonical encoding decodes back to it, its structured form converts back
/// to it, and parsing it for a wallet either refuses with a named field or
/// yields an intent that commits to exactly this transaction. It is parsed
/// twice: with no token registry, and with its `to` registered as a token,
/// so that calldata reaches the ERC-20 decoder.
pub fn check_ethereum(tx: &UnsignedEthereumTx) {
    let payload = ethereum::signing_payload(tx);
    assert_eq!(
        ethereum::decode_unsigned(&payload).as_ref(),
        Ok(tx),
        "the canonical payload does not decode back to the transaction"
    );
    if let Some(fields) = fields_of(tx) {
        assert_eq!(
            UnsignedEthereumTx::try_from(fields).as_ref(),
            Ok(tx),
            "the structured form does not convert back to the transaction"
        );
    }
    let chain_id = recompute::chain_id(tx).unwrap_or(1);
    let registered = to_of(tx).map(|contract| Token {
        symbol: "TOK".into(),
        contract,
        decimals: 6,
    });
    for tokens in [Vec::new(), registered.into_iter().collect()] {
        let network = EthereumNetwork { chain_id, tokens };
        match ethereum::parse(tx.clone(), &network, ethereum_from()) {
            Ok(parsed) => check_parsed_ethereum(&parsed, tx, &payload, &network),
            Err(refusal) => check_refusal(&refusal),
        }
    }
}

fn to_of(tx: &UnsignedEthereumTx) -> Option<Address> {
    let to = match tx {
        UnsignedEthereumTx::Legacy(t) => t.to,
        UnsignedEthereumTx::Eip1559(t) => t.to,
    };
    match to {
        TxKind::Call(address) => Some(address),
        TxKind::Create => None,
    }
}

/// The request's structured form of `tx`, where it has one (legacy needs a
/// chain id; EIP-1559 an empty access list).
fn fields_of(tx: &UnsignedEthereumTx) -> Option<EthereumFields> {
    match tx {
        UnsignedEthereumTx::Legacy(t) => Some(EthereumFields {
            tx_type: EthereumTxType::Legacy,
            chain_id: t.chain_id?,
            nonce: t.nonce,
            gas_limit: t.gas_limit,
            gas_price: t.gas_price,
            max_fee_per_gas: 0,
            max_priority_fee_per_gas: 0,
            to: to_of(tx),
            value: t.value,
            data: t.input.to_vec(),
        }),
        UnsignedEthereumTx::Eip1559(t) => t.access_list.0.is_empty().then(|| EthereumFields {
            tx_type: EthereumTxType::Eip1559,
            chain_id: t.chain_id,
            nonce: t.nonce,
            gas_limit: t.gas_limit,
            gas_price: 0,
            max_fee_per_gas: t.max_fee_per_gas,
            max_priority_fee_per_gas: t.max_priority_fee_per_gas,
            to: to_of(tx),
            value: t.value,
            data: t.input.to_vec(),
        }),
    }
}

fn check_parsed_ethereum(
    parsed: &ParsedEthereumTx,
    tx: &UnsignedEthereumTx,
    payload: &[u8],
    network: &EthereumNetwork,
) {
    assert_eq!(parsed.transaction(), tx);
    // Invariant 2: the digest is computed from the bytes approvers see.
    assert_eq!(
        parsed.signing_hash(),
        keccak256(payload).0,
        "signing hash is not keccak(payload)"
    );
    assert_eq!(parsed.signing_digest().as_bytes(), &parsed.signing_hash());
    let intent = parsed.intent();
    assert_eq!(intent.transaction_id, parsed.signing_hash());
    assert_eq!(
        intent.network,
        Network::Ethereum {
            chain_id: network.chain_id
        }
    );
    assert_eq!(intent.from, ethereum_from().to_checksum(None));
    assert_eq!(
        intent.destinations.len(),
        1,
        "one destination per Ethereum transaction"
    );
    let FeeTerms::Ethereum {
        gas_limit,
        max_fee_per_gas,
        max_priority_fee_per_gas,
        max_total_fee,
        ..
    } = intent.fee
    else {
        panic!("an Ethereum intent with Bitcoin fee terms: {intent:?}")
    };
    assert!(gas_limit > 0);
    assert!(max_priority_fee_per_gas <= max_fee_per_gas);
    assert_eq!(max_total_fee, U256::from(gas_limit) * U256::from(max_fee_per_gas));
    let (value, input) = match tx {
        UnsignedEthereumTx::Legacy(t) => (t.value, &t.input),
        UnsignedEthereumTx::Eip1559(t) => (t.value, &t.input),
    };
    let to = to_of(tx).expect("contract creation is refused");
    if input.is_empty() {
        assert_eq!(intent.asset.symbol, "ETH");
        assert_eq!(intent.asset.contract, None);
        assert_eq!(intent.destinations[0].to, to.to_checksum(None));
        assert_eq!(intent.destinations[0].amount, value);
    } else {
        assert_eq!(value, U256::ZERO, "a token transfer that also moves ether");
        assert_eq!(intent.asset.contract, Some(to.to_checksum(None)));
        assert!(network.tokens.iter().any(|t| t.contract == to));
    }
    check_intent(intent);
}

/// Checks an intent's canonical encoding and hash.
pub fn check_intent(intent: &Intent) {
    let bytes = intent.canonical_bytes();
    assert!(bytes.starts_with(INTENT_DOMAIN));
    assert_eq!(
        bytes,
        intent.canonical_bytes(),
        "the canonical encoding is not deterministic"
    );
    assert_eq!(intent.hash(), intent.hash());
    let json = intent.to_json();
    assert_eq!(json["network"].as_str(), Some(intent.network.caip2().as_str()));
}

/// Checks a PSBT custos decoded: it serializes to bytes that decode to the
/// same PSBT, and parsing it for the wallet (the generator key, regtest)
/// either refuses with a named field or yields an intent whose amounts add
/// up.
pub fn check_psbt(psbt: &Psbt) {
    let bytes = psbt.serialize();
    let again = btc::decode_psbt(&bytes).expect("a decoded PSBT serializes to one that decodes");
    assert_eq!(&again, psbt, "the PSBT does not survive serialization");
    match btc::parse(psbt.clone(), bitcoin::Network::Regtest, &bitcoin_key()) {
        Ok(parsed) => check_parsed_bitcoin(&parsed, psbt),
        Err(refusal) => check_refusal(&refusal),
    }
}

fn check_parsed_bitcoin(parsed: &ParsedBitcoinTx, psbt: &Psbt) {
    let tx = parsed.unsigned_tx();
    assert_eq!(tx, &psbt.unsigned_tx);
    assert_eq!(parsed.sighashes().len(), tx.input.len(), "one sighash per input");
    let intent = parsed.intent();
    assert_eq!(intent.network, Network::Bitcoin(bitcoin::Network::Regtest));
    assert_eq!(
        intent.transaction_id,
        tx.compute_txid().to_raw_hash().to_byte_array()
    );
    let from = bitcoin::Address::p2wpkh(&bitcoin_key(), bitcoin::Network::Regtest).to_string();
    assert_eq!(intent.from, from);
    let own = ScriptBuf::new_p2wpkh(&bitcoin_key().wpubkey_hash());
    let inputs: u64 = psbt
        .inputs
        .iter()
        .map(|i| {
            i.witness_utxo
                .as_ref()
                .expect("parse requires witness_utxo")
                .value
                .to_sat()
        })
        .sum();
    let FeeTerms::Bitcoin { change, fee, vsize } = intent.fee else {
        panic!("a Bitcoin intent with Ethereum fee terms: {intent:?}")
    };
    let paid = intent
        .destinations
        .iter()
        .fold(U256::ZERO, |sum, d| sum + d.amount);
    assert_eq!(
        U256::from(inputs),
        paid + U256::from(change) + U256::from(fee),
        "inputs != destinations + change + fee"
    );
    assert!(U256::from(inputs) <= U256::from(Amount::MAX_MONEY.to_sat()) * U256::from(tx.input.len()));
    assert!(
        intent.destinations.iter().all(|d| d.to != from),
        "change listed as a destination"
    );
    let outputs_elsewhere = tx.output.iter().filter(|o| o.script_pubkey != own).count();
    assert_eq!(intent.destinations.len(), outputs_elsewhere);
    assert!(
        vsize >= tx.vsize() as u64,
        "the vsize bound is below the unsigned size"
    );
    check_intent(intent);
}

/// Checks bytes as an approval message and as a governance message: a parse
/// that succeeds re-encodes to exactly the input, and no bytes are both.
pub fn check_signed_message(bytes: &[u8]) {
    let approval = ApprovalMessage::parse(bytes);
    if let Ok(message) = &approval {
        assert_eq!(message.encode(), bytes, "an approval message with two encodings");
        assert_eq!(message.digest(), <[u8; 32]>::from(Sha256::digest(bytes)));
        let counted = message.to_approval();
        assert_eq!(counted.approver, message.approver);
        assert_eq!(counted.withdrawal_id, message.withdrawal_id);
        assert_eq!(counted.intent_hash, message.intent_hash);
    }
    let governance = GovernanceMessage::parse(bytes);
    if let Ok(message) = &governance {
        assert_eq!(message.encode(), bytes, "a governance message with two encodings");
        assert_eq!(message.digest(), <[u8; 32]>::from(Sha256::digest(bytes)));
    }
    assert!(
        approval.is_err() || governance.is_err(),
        "bytes that are both an approval and a governance message"
    );
}

/// Checks a policy document custos accepted: its hash is the document's, and
/// deciding withdrawals under it keeps the decision core's promises.
///
/// For each wallet the policy governs (up to four), two native transfers and,
/// where the policy registers a token on that network, a token transfer are
/// parsed under the policy and evaluated without approvals and with every
/// rostered approver approving.
pub fn check_policy(document: &[u8], policy: &Policy) {
    assert_eq!(policy.hash, policy_hash(document));
    assert!(policy.version >= 1);
    assert!((1..=policy.admins.len()).contains(&policy.admin_quorum));
    for (id, wallet) in policy.wallets.iter().take(4) {
        let Some(network) = recompute::network(&wallet.network) else {
            // An `eip155:` id beyond u64: accepted by the policy, refused by
            // every parse (fail closed).
            continue;
        };
        for intent in sample_intents(policy, id, network) {
            assert_eq!(
                intent.network.caip2(),
                wallet.network,
                "CAIP-2 does not round-trip"
            );
            check_decisions(policy, id, &wallet.key_label, &intent);
        }
    }
}

/// Intents a wallet on `network` could produce under `policy`, paying the
/// first allowlisted address valid on that network (or a fixed one).
fn sample_intents(policy: &Policy, wallet_id: &str, network: Network) -> Vec<Intent> {
    let mut listed = policy
        .allowlists
        .values()
        .flat_map(|list| &list.entries)
        .map(|entry| entry.address.as_str());
    match network {
        Network::Ethereum { chain_id } => {
            let to = listed
                .filter_map(|a| custos_core::chain::units::address(a).ok())
                .next()
                .unwrap_or(Address::repeat_byte(0x35));
            let caip2 = network.caip2();
            let token = policy
                .assets
                .iter()
                .find(|a| a.network == caip2)
                .and_then(|a| custos_core::chain::units::address(&a.contract).ok());
            // 0.1 and 10 ether: small and large enough for different rules.
            let mut txs: Vec<UnsignedEthereumTx> = [17u64, 19]
                .into_iter()
                .map(|e| eip1559(chain_id, to, U256::from(10u64).pow(U256::from(e)), Vec::new()))
                .collect();
            if let Some(contract) = token {
                txs.push(eip1559(
                    chain_id,
                    contract,
                    U256::ZERO,
                    transfer_call(to, U256::from(5_000_000u64)),
                ));
            }
            txs.into_iter()
                .map(|tx| {
                    let parsed = recompute::parse_under_policy(
                        UnsignedTx::Ethereum(tx),
                        policy,
                        wallet_id,
                        wallet_key(),
                    )
                    .expect("a plain transfer on the wallet's own network parses");
                    parsed.intent().clone()
                })
                .collect()
        }
        Network::Bitcoin(chain) => {
            let from = bitcoin::Address::p2wpkh(&bitcoin_key(), chain).to_string();
            let to = listed
                .find(|a| {
                    a.parse::<bitcoin::Address<_>>()
                        .is_ok_and(|a| a.is_valid_for_network(chain))
                })
                .map(str::to_owned)
                .unwrap_or_else(|| from.clone());
            vec![Intent {
                network,
                asset: Asset {
                    symbol: "BTC".into(),
                    contract: None,
                    decimals: btc::BTC_DECIMALS,
                },
                from,
                destinations: vec![Destination {
                    to,
                    amount: U256::from(40_000u64),
                }],
                fee: FeeTerms::Bitcoin {
                    change: 9_000,
                    fee: 1_000,
                    vsize: 141,
                },
                transaction_id: [7; 32],
            }]
        }
    }
}

fn eip1559(chain_id: u64, to: Address, value: U256, data: Vec<u8>) -> UnsignedEthereumTx {
    let fields = EthereumFields {
        tx_type: EthereumTxType::Eip1559,
        chain_id,
        nonce: 7,
        gas_limit: 65_000,
        gas_price: 0,
        max_fee_per_gas: 30_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        to: Some(to),
        value,
        data,
    };
    UnsignedEthereumTx::try_from(fields).expect("an EIP-1559 transaction without gas_price converts")
}

/// ABI-encoded `transfer(to, amount)`.
fn transfer_call(to: Address, amount: U256) -> Vec<u8> {
    let mut data = vec![0xa9, 0x05, 0x9c, 0xbb];
    data.extend_from_slice(&[0; 12]);
    data.extend_from_slice(to.as_slice());
    data.extend_from_slice(&amount.to_be_bytes::<32>());
    data
}

fn check_decisions(policy: &Policy, wallet: &str, key_label: &str, intent: &Intent) {
    check_intent(intent);
    let initiator = "backend";
    let w = Withdrawal {
        id: "wd_00112233445566778899aabbccddeeff",
        wallet,
        key_label,
        intent,
        intent_hash: intent.hash(),
        initiator,
    };
    let approvals: Vec<Approval> = policy
        .approvers
        .keys()
        .map(|approver| Approval {
            approver: approver.clone(),
            vote: Vote::Approve,
            withdrawal_id: w.id.to_owned(),
            intent_hash: w.intent_hash,
            policy_hash: policy.hash,
            expires_at: NOW + 600,
        })
        .collect();
    let usage = Usage {
        entries: vec![(NOW - 60, U256::from(1u64)), (NOW - 7200, U256::from(2u64))],
    };
    let alone = evaluate(policy, &w, &usage, &[], NOW);
    assert_eq!(
        alone,
        evaluate(policy, &w, &usage, &[], NOW),
        "evaluate is not deterministic"
    );
    let approved = evaluate(policy, &w, &usage, &approvals, NOW);
    for decision in [&alone, &approved] {
        check_decision(policy, decision, initiator);
    }
    assert!(
        alone.counted_approvers.is_empty(),
        "approvals counted that nobody gave"
    );
    if let Outcome::Allow = alone.outcome {
        let rule = matched_rule(policy, &alone);
        assert_eq!(
            rule.action,
            Action::Allow,
            "a require rule allowed without approvals"
        );
    }
    if let Outcome::Deny(reason) = &alone.outcome
        && alone.rule.is_none()
        && !matches!(reason, DenyReason::NoRuleMatched(_))
    {
        // Wallet, asset, fee and limit checks come before any rule: no
        // approval can lift them.
        assert_eq!(approved.outcome, alone.outcome, "approvals lifted a limit");
    }
    // Approvals only ever move a require rule, never which rule matches.
    assert_eq!(approved.rule, alone.rule);
}

fn matched_rule<'p>(policy: &'p Policy, decision: &Decision) -> &'p custos_core::policy::Rule {
    let name = decision.rule.as_ref().expect("a decision by a rule names it");
    policy
        .rules
        .iter()
        .find(|r| &r.name == name)
        .expect("the named rule is in the policy")
}

fn check_decision(policy: &Policy, decision: &Decision, initiator: &str) {
    assert_eq!(decision.policy_hash, policy.hash);
    let counted: BTreeSet<&str> = decision.counted_approvers.iter().map(String::as_str).collect();
    assert_eq!(
        counted.len(),
        decision.counted_approvers.len(),
        "an approver counted twice"
    );
    assert!(
        !counted.contains(initiator),
        "the initiator's own approval counted"
    );
    assert!(
        counted.iter().all(|a| policy.approver(a).is_some()),
        "an approver off the roster counted"
    );
    match &decision.outcome {
        Outcome::Allow => {
            let rule = matched_rule(policy, decision);
            if let Action::Require(quorum) = &rule.action {
                let seats: usize = quorum.iter().map(|q| q.min).sum();
                assert!(
                    seats <= counted.len(),
                    "a quorum met by fewer people than its seats"
                );
                for q in quorum {
                    let members = counted
                        .iter()
                        .filter(|a| policy.approver(a).is_some_and(|x| x.groups.contains(&q.group)))
                        .count();
                    assert!(members >= q.min, "group {} allowed below its quorum", q.group);
                }
            }
        }
        Outcome::Pending(missing) => {
            let rule = matched_rule(policy, decision);
            assert!(
                matches!(rule.action, Action::Require(_)),
                "pending under a non-require rule"
            );
            assert!(!missing.is_empty() && missing.iter().all(|q| q.min > 0));
        }
        Outcome::Deny(_) => {}
    }
}
