//! Bitcoin: unsigned PSBTs (BIP-174, version 0) spending the wallet's P2WPKH
//! outputs, parsed with rust-bitcoin into an [`Intent`] and signed over
//! BIP-143 sighashes computed by rust-bitcoin.
//!
//! Every input must carry its `witness_utxo` paying to the wallet's own
//! script, and its `non_witness_utxo` (the previous transaction) whose txid
//! and output must match: a BIP-143 signature commits only to its own input's
//! amount, so without the previous transactions a caller could understate
//! amounts across two PSBTs with the same txid and combine the signatures
//! into a transaction paying a hidden fee (the 2020 segwit fee attack).
//! Inputs request SIGHASH_ALL (or nothing, which means ALL). Outputs to the
//! wallet's script are change; all others are destinations and must be
//! P2PKH, P2SH, P2WPKH, P2WSH or P2TR. The fee is `sum(inputs) -
//! sum(outputs)` and must not be negative. Anything custos does not
//! understand (unknown or proprietary keys, taproot fields, hash preimages,
//! scripts on a P2WPKH input, existing signatures, other output scripts,
//! amounts above 21M BTC, trailing bytes) is refused.

use ::bitcoin::hashes::Hash;
use ::bitcoin::psbt::{Psbt, PsbtSighashType};
use ::bitcoin::sighash::{EcdsaSighashType, SighashCache};
use ::bitcoin::{Address, AddressType, Amount, CompressedPublicKey, ScriptBuf, Transaction, Witness};
use alloy_primitives::U256;

use super::{Asset, Destination, FeeTerms, Intent, Network, RefusalKind, SigningDigest, TxRefusal};
use crate::signature::RecoverableSignature;

/// Decimals of bitcoin's base unit, the satoshi.
pub const BTC_DECIMALS: u8 = 8;

/// Weight units each P2WPKH input adds when signed, at most: witness item
/// count (1), signature push (1 + 71-byte low-S DER + 1 sighash byte), and
/// public key push (1 + 33).
const P2WPKH_WITNESS_WEIGHT_MAX: u64 = 1 + 1 + 72 + 1 + 33;
/// Weight of the segwit marker and flag bytes.
const SEGWIT_MARKER_WEIGHT: u64 = 2;

/// Decodes a PSBT from its binary serialization.
pub fn decode_psbt(bytes: &[u8]) -> Result<Psbt, TxRefusal> {
    let mut rest = bytes;
    let psbt = Psbt::deserialize_from_reader(&mut rest)
        .map_err(|e| TxRefusal::new("psbt", format!("malformed PSBT: {e}")))?;
    if !rest.is_empty() {
        return Err(TxRefusal::new(
            "psbt",
            "malformed PSBT: trailing bytes after the last map",
        ));
    }
    Ok(psbt)
}

/// A PSBT custos understands, with its intent and per-input sighashes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedBitcoinTx {
    tx: Transaction,
    intent: Intent,
    sighashes: Vec<SigningDigest>,
}

impl ParsedBitcoinTx {
    /// The intent derived from the PSBT.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

    /// The BIP-143 sighash of each input, in input order: what the HSM signs.
    pub fn sighashes(&self) -> &[SigningDigest] {
        &self.sighashes
    }

    /// The unsigned transaction.
    pub fn unsigned_tx(&self) -> &Transaction {
        &self.tx
    }
}

/// A finalized, fully signed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBitcoinTx {
    /// Consensus serialization (with witnesses): what `sendrawtransaction` takes.
    pub raw: Vec<u8>,
    /// The txid.
    pub txid: ::bitcoin::Txid,
}

/// Parses `psbt` for the wallet with public key `wallet_key` on `network`.
pub fn parse(
    psbt: Psbt,
    network: ::bitcoin::Network,
    wallet_key: &CompressedPublicKey,
) -> Result<ParsedBitcoinTx, TxRefusal> {
    check_shape(&psbt)?;
    let tx = psbt.unsigned_tx;
    let wallet_script = ScriptBuf::new_p2wpkh(&wallet_key.wpubkey_hash());
    let from = Address::p2wpkh(wallet_key, network);

    let mut input_total = Amount::ZERO;
    let mut amounts = Vec::with_capacity(tx.input.len());
    for (index, (txin, input)) in tx.input.iter().zip(&psbt.inputs).enumerate() {
        let amount = spent_amount(index, txin, input, &wallet_script, &from)?;
        input_total = input_total.checked_add(amount).ok_or_else(|| {
            TxRefusal::of(
                RefusalKind::AmountOutOfRange,
                format!("inputs[{index}].witness_utxo.amount"),
                "input total overflows",
            )
        })?;
        amounts.push(amount);
    }
    let outputs = paid_outputs(&tx, &psbt.outputs, network, &wallet_script)?;
    let (output_total, change, destinations) = (outputs.total, outputs.change, outputs.destinations);
    let fee = input_total.checked_sub(output_total).ok_or_else(|| {
        TxRefusal::of(
            RefusalKind::AmountOutOfRange,
            "outputs",
            format!("outputs ({output_total}) exceed inputs ({input_total})"),
        )
    })?;

    let sighashes = p2wpkh_sighashes(&tx, &amounts, &wallet_script)?;

    let inputs = tx.input.len() as u64;
    let weight = tx.base_size() as u64 * 4 + SEGWIT_MARKER_WEIGHT + inputs * P2WPKH_WITNESS_WEIGHT_MAX;
    let intent = Intent {
        network: Network::Bitcoin(network),
        asset: Asset {
            symbol: "BTC".into(),
            contract: None,
            decimals: BTC_DECIMALS,
        },
        from: from.to_string(),
        destinations,
        fee: FeeTerms::Bitcoin {
            change: change.to_sat(),
            fee: fee.to_sat(),
            vsize: weight.div_ceil(4),
        },
        transaction_id: tx.compute_txid().to_byte_array(),
    };
    Ok(ParsedBitcoinTx {
        tx,
        intent,
        sighashes,
    })
}

/// The PSBT's global shape: version 0, no unknown or proprietary global
/// keys, one map per input and output, at least one of each.
fn check_shape(psbt: &Psbt) -> Result<(), TxRefusal> {
    if psbt.version != 0 {
        return Err(TxRefusal::unsupported(
            "psbt.version",
            format!("PSBT version {} is not supported; use version 0", psbt.version),
        ));
    }
    if !psbt.unknown.is_empty() || !psbt.proprietary.is_empty() {
        return Err(TxRefusal::unsupported(
            "psbt.global",
            "unknown or proprietary global keys are refused",
        ));
    }
    if psbt.unsigned_tx.input.len() != psbt.inputs.len()
        || psbt.unsigned_tx.output.len() != psbt.outputs.len()
    {
        return Err(TxRefusal::new(
            "psbt",
            "the number of input or output maps does not match the transaction",
        ));
    }
    if psbt.unsigned_tx.input.is_empty() {
        return Err(TxRefusal::new("inputs", "the transaction has no inputs"));
    }
    if psbt.unsigned_tx.output.is_empty() {
        return Err(TxRefusal::new("outputs", "the transaction has no outputs"));
    }
    Ok(())
}

/// Checks input `index` (a P2WPKH spend of the wallet, its amount proven by
/// the previous transaction, SIGHASH_ALL, unsigned, nothing unknown) and
/// returns the amount it spends.
fn spent_amount(
    index: usize,
    txin: &::bitcoin::TxIn,
    input: &::bitcoin::psbt::Input,
    wallet_script: &ScriptBuf,
    from: &Address,
) -> Result<Amount, TxRefusal> {
    let field = |name: &str| format!("inputs[{index}].{name}");
    let utxo = input.witness_utxo.as_ref().ok_or_else(|| {
        TxRefusal::new(
            field("witness_utxo"),
            "is missing; every input needs its witness_utxo",
        )
    })?;
    if utxo.script_pubkey != *wallet_script {
        return Err(TxRefusal::of(
            RefusalKind::WrongSender,
            field("witness_utxo.script_pubkey"),
            format!("does not pay to this wallet's P2WPKH script ({from})"),
        ));
    }
    let previous = input.non_witness_utxo.as_ref().ok_or_else(|| {
        TxRefusal::new(
            field("non_witness_utxo"),
            "is missing; every input needs its previous transaction so that its amount is proven",
        )
    })?;
    let proven = previous.compute_txid() == txin.previous_output.txid
        && usize::try_from(txin.previous_output.vout)
            .ok()
            .and_then(|vout| previous.output.get(vout))
            == Some(utxo);
    if !proven {
        return Err(TxRefusal::new(
            field("non_witness_utxo"),
            "does not match the outpoint and witness_utxo",
        ));
    }
    if utxo.value > Amount::MAX_MONEY {
        return Err(TxRefusal::of(
            RefusalKind::AmountOutOfRange,
            field("witness_utxo.amount"),
            "exceeds 21,000,000 BTC",
        ));
    }
    let taproot_or_preimages = input.tap_key_sig.is_some()
        || !input.tap_script_sigs.is_empty()
        || !input.tap_scripts.is_empty()
        || !input.tap_key_origins.is_empty()
        || input.tap_internal_key.is_some()
        || input.tap_merkle_root.is_some()
        || !input.ripemd160_preimages.is_empty()
        || !input.sha256_preimages.is_empty()
        || !input.hash160_preimages.is_empty()
        || !input.hash256_preimages.is_empty();
    if taproot_or_preimages {
        return Err(TxRefusal::unsupported(
            field("taproot"),
            "taproot fields and hash preimages are refused on a P2WPKH input",
        ));
    }
    match input.sighash_type {
        None => {}
        Some(t) if t == PsbtSighashType::from(EcdsaSighashType::All) => {}
        Some(t) => {
            return Err(TxRefusal::unsupported(
                field("sighash_type"),
                format!("{t} is refused; only SIGHASH_ALL is signed"),
            ));
        }
    }
    if input.redeem_script.is_some() || input.witness_script.is_some() {
        return Err(TxRefusal::unsupported(
            field("redeem_script"),
            "a P2WPKH input carries no redeem or witness script",
        ));
    }
    if !input.partial_sigs.is_empty()
        || input.final_script_sig.is_some()
        || input.final_script_witness.is_some()
    {
        return Err(TxRefusal::unsupported(
            field("partial_sigs"),
            "the input is already (partially) signed",
        ));
    }
    if !input.unknown.is_empty() || !input.proprietary.is_empty() {
        return Err(TxRefusal::unsupported(
            field("unknown"),
            "unknown or proprietary input keys are refused",
        ));
    }
    Ok(utxo.value)
}

/// What the outputs pay: the total, the change back to the wallet, and every
/// other output as a destination address.
struct PaidOutputs {
    total: Amount,
    change: Amount,
    destinations: Vec<Destination>,
}

/// Checks every output (no taproot fields or unknown keys, at most 21M BTC,
/// a standard address script) and sums what they pay.
fn paid_outputs(
    tx: &Transaction,
    outputs: &[::bitcoin::psbt::Output],
    network: ::bitcoin::Network,
    wallet_script: &ScriptBuf,
) -> Result<PaidOutputs, TxRefusal> {
    let mut output_total = Amount::ZERO;
    let mut change = Amount::ZERO;
    let mut destinations = Vec::new();
    for (index, (txout, output)) in tx.output.iter().zip(outputs).enumerate() {
        if output.tap_internal_key.is_some()
            || output.tap_tree.is_some()
            || !output.tap_key_origins.is_empty()
        {
            return Err(TxRefusal::unsupported(
                format!("outputs[{index}].taproot"),
                "taproot output fields are refused",
            ));
        }
        if txout.value > Amount::MAX_MONEY {
            return Err(TxRefusal::of(
                RefusalKind::AmountOutOfRange,
                format!("outputs[{index}].amount"),
                "exceeds 21,000,000 BTC",
            ));
        }
        if !output.unknown.is_empty() || !output.proprietary.is_empty() {
            return Err(TxRefusal::unsupported(
                format!("outputs[{index}].unknown"),
                "unknown or proprietary output keys are refused",
            ));
        }
        output_total = output_total.checked_add(txout.value).ok_or_else(|| {
            TxRefusal::of(
                RefusalKind::AmountOutOfRange,
                format!("outputs[{index}].amount"),
                "output total overflows",
            )
        })?;
        if txout.script_pubkey == *wallet_script {
            change += txout.value;
            continue;
        }
        let to = Address::from_script(&txout.script_pubkey, network)
            .ok()
            .filter(|a| {
                matches!(
                    a.address_type(),
                    Some(
                        AddressType::P2pkh
                            | AddressType::P2sh
                            | AddressType::P2wpkh
                            | AddressType::P2wsh
                            | AddressType::P2tr
                    )
                )
            })
            .ok_or_else(|| {
                TxRefusal::unsupported(
                    format!("outputs[{index}].script_pubkey"),
                    "is not a P2PKH, P2SH, P2WPKH, P2WSH or P2TR address script",
                )
            })?;
        destinations.push(Destination {
            to: to.to_string(),
            amount: U256::from(txout.value.to_sat()),
        });
    }
    Ok(PaidOutputs {
        total: output_total,
        change,
        destinations,
    })
}

/// The BIP-143 sighash of every input, in input order.
fn p2wpkh_sighashes(
    tx: &Transaction,
    amounts: &[Amount],
    wallet_script: &ScriptBuf,
) -> Result<Vec<SigningDigest>, TxRefusal> {
    let mut cache = SighashCache::new(tx);
    amounts
        .iter()
        .enumerate()
        .map(|(index, amount)| {
            p2wpkh_sighash_all(&mut cache, index, wallet_script, *amount).map(SigningDigest::computed)
        })
        .collect()
}

/// The BIP-143 SIGHASH_ALL digest of a P2WPKH input, computed by rust-bitcoin.
pub fn p2wpkh_sighash_all(
    cache: &mut SighashCache<&Transaction>,
    index: usize,
    script_pubkey: &::bitcoin::Script,
    amount: Amount,
) -> Result<[u8; 32], TxRefusal> {
    cache
        .p2wpkh_signature_hash(index, script_pubkey, amount, EcdsaSighashType::All)
        .map(|sighash| sighash.to_byte_array())
        .map_err(|e| {
            TxRefusal::new(
                format!("inputs[{index}]"),
                format!("cannot compute the BIP-143 sighash: {e}"),
            )
        })
}

/// Attaches one verified signature per input and returns the final transaction.
///
/// `signatures[i]` must come from the server's `Wallets::sign_digest` over
/// `sighashes()[i]`, which verified it against the wallet key.
pub fn assemble(
    parsed: &ParsedBitcoinTx,
    signatures: &[RecoverableSignature],
    wallet_key: &CompressedPublicKey,
) -> Result<SignedBitcoinTx, TxRefusal> {
    if signatures.len() != parsed.tx.input.len() {
        return Err(TxRefusal::new("inputs", "one signature per input is required"));
    }
    let mut tx = parsed.tx.clone();
    for (txin, signature) in tx.input.iter_mut().zip(signatures) {
        let compact = ::bitcoin::secp256k1::ecdsa::Signature::from_compact(&signature.signature().to_bytes())
            .map_err(|_| TxRefusal::new("signature", "not a valid compact signature"))?;
        let sig = ::bitcoin::ecdsa::Signature {
            signature: compact,
            sighash_type: EcdsaSighashType::All,
        };
        txin.witness = Witness::p2wpkh(&sig, &wallet_key.0);
    }
    Ok(SignedBitcoinTx {
        raw: ::bitcoin::consensus::encode::serialize(&tx),
        txid: tx.compute_txid(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use ::bitcoin::psbt::Input;
    use ::bitcoin::{OutPoint, Sequence, TxIn, TxOut, absolute, transaction};
    use proptest::prelude::*;

    use super::*;

    /// The generator point, as a wallet key for pure tests.
    pub(crate) fn wallet_key() -> CompressedPublicKey {
        "0279BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798"
            .parse()
            .unwrap()
    }

    fn other_script() -> ScriptBuf {
        let other: CompressedPublicKey = "025476c2e83188368da1ff3e292e7acafcdb3566bb0ad253f62fc70f07aeee6357"
            .parse()
            .unwrap();
        ScriptBuf::new_p2wpkh(&other.wpubkey_hash())
    }

    fn own_script() -> ScriptBuf {
        ScriptBuf::new_p2wpkh(&wallet_key().wpubkey_hash())
    }

    /// A PSBT spending `inputs` (satoshi) of `key`'s P2WPKH outputs, paying
    /// `outputs` (script, satoshi).
    pub(crate) fn psbt(key: &CompressedPublicKey, inputs: &[u64], outputs: &[(ScriptBuf, u64)]) -> Psbt {
        let script = ScriptBuf::new_p2wpkh(&key.wpubkey_hash());
        // One previous transaction per input, paying the input's amount to
        // the wallet at output `i`, so that the outpoint and amount are proven.
        let previous: Vec<Transaction> = inputs
            .iter()
            .enumerate()
            .map(|(i, sat)| Transaction {
                version: transaction::Version::TWO,
                lock_time: absolute::LockTime::from_consensus(i as u32),
                input: vec![],
                output: (0..=i)
                    .map(|j| TxOut {
                        value: Amount::from_sat(if j == i { *sat } else { 1 }),
                        script_pubkey: script.clone(),
                    })
                    .collect(),
            })
            .collect();
        let tx = Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: previous
                .iter()
                .enumerate()
                .map(|(i, prev)| TxIn {
                    previous_output: OutPoint {
                        txid: prev.compute_txid(),
                        vout: i as u32,
                    },
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    ..Default::default()
                })
                .collect(),
            output: outputs
                .iter()
                .map(|(script_pubkey, sat)| TxOut {
                    value: Amount::from_sat(*sat),
                    script_pubkey: script_pubkey.clone(),
                })
                .collect(),
        };
        let mut psbt = Psbt::from_unsigned_tx(tx).unwrap();
        for (i, input) in psbt.inputs.iter_mut().enumerate() {
            *input = Input {
                witness_utxo: Some(previous[i].output[i].clone()),
                non_witness_utxo: Some(previous[i].clone()),
                ..Default::default()
            };
        }
        psbt
    }

    fn refuse(psbt: Psbt) -> TxRefusal {
        decode_psbt(&psbt.serialize())
            .and_then(|p| parse(p, ::bitcoin::Network::Regtest, &wallet_key()))
            .unwrap_err()
    }

    /// BIP-143's native P2WPKH example: the sighash of input 1.
    #[test]
    fn bip143_native_p2wpkh_example() {
        let tx: Transaction = ::bitcoin::consensus::encode::deserialize(&hex::decode(
            "0100000002fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f0000000000eeffffffef51e1b804cc89d182d279655c3aa89e815b1b309fe287d9b2b55d57b90ec68a0100000000ffffffff02202cb206000000001976a9148280b37df378db99f66f85c95a783a76ac7a6d5988ac9093510d000000001976a9143bde42dbee7e4dbe6a21b2d50ce2f0167faa815988ac11000000",
        ).unwrap()).unwrap();
        let script = ScriptBuf::from_hex("00141d0f172a0ecb48aee1be1f2687d2963ae33f71a1").unwrap();
        let mut cache = SighashCache::new(&tx);
        let sighash = p2wpkh_sighash_all(&mut cache, 1, &script, Amount::from_sat(600_000_000)).unwrap();
        assert_eq!(
            hex::encode(sighash),
            "c37af31116d1b27caf68aae9e3ac82f1477929014d5b917657d0eb49478cb670"
        );
    }

    #[test]
    fn intent_has_destinations_change_and_fee() {
        let p = psbt(
            &wallet_key(),
            &[50_000, 70_000],
            &[(other_script(), 100_000), (own_script(), 19_000)],
        );
        let parsed = parse(p, ::bitcoin::Network::Regtest, &wallet_key()).unwrap();
        let intent = parsed.intent();
        assert_eq!(intent.from, "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080");
        assert_eq!(intent.destinations.len(), 1);
        assert_eq!(intent.destinations[0].amount, U256::from(100_000u64));
        let FeeTerms::Bitcoin { change, fee, vsize } = intent.fee else {
            panic!("not bitcoin fee terms")
        };
        assert_eq!((change, fee), (19_000, 1_000));
        // 2 P2WPKH inputs, 2 P2WPKH outputs: about 208.5 vbytes signed, at most.
        assert!((205..=210).contains(&vsize), "{vsize}");
        assert_eq!(parsed.sighashes().len(), 2);
        assert_eq!(
            intent.transaction_id,
            parsed.unsigned_tx().compute_txid().to_byte_array()
        );
    }

    #[test]
    fn refusals_name_field_and_reason() {
        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.inputs[0].witness_utxo.as_mut().unwrap().script_pubkey = other_script();
        let r = refuse(p);
        assert_eq!(r.field, "inputs[0].witness_utxo.script_pubkey");
        assert!(r.reason.contains("does not pay to this wallet"), "{r}");

        let mut p = psbt(&wallet_key(), &[50_000, 1], &[(other_script(), 40_000)]);
        p.inputs[1].witness_utxo = None;
        assert_eq!(refuse(p).field, "inputs[1].witness_utxo");

        let p = psbt(
            &wallet_key(),
            &[50_000],
            &[(other_script(), 40_000), (own_script(), 10_001)],
        );
        let r = refuse(p);
        assert_eq!(r.field, "outputs");
        assert!(r.reason.contains("exceed inputs"), "{r}");

        for sighash in [
            EcdsaSighashType::None,
            EcdsaSighashType::Single,
            EcdsaSighashType::AllPlusAnyoneCanPay,
        ] {
            let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
            p.inputs[0].sighash_type = Some(sighash.into());
            let r = refuse(p);
            assert_eq!(r.field, "inputs[0].sighash_type");
            assert!(r.reason.contains("only SIGHASH_ALL"), "{r}");
        }
        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.inputs[0].sighash_type = Some(EcdsaSighashType::All.into());
        parse(p, ::bitcoin::Network::Regtest, &wallet_key()).unwrap();

        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.unsigned_tx.output[0].script_pubkey = ScriptBuf::new_op_return([1u8, 2, 3]);
        assert_eq!(refuse(p).field, "outputs[0].script_pubkey");

        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.inputs[0].witness_script = Some(own_script());
        assert_eq!(refuse(p).field, "inputs[0].redeem_script");
    }

    #[test]
    fn previous_transactions_are_required_and_must_match() {
        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.inputs[0].non_witness_utxo = None;
        let r = refuse(p);
        assert_eq!(r.field, "inputs[0].non_witness_utxo");
        assert!(r.reason.contains("is missing"), "{r}");

        // Understating the amount in witness_utxo is caught by the previous transaction.
        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.inputs[0].witness_utxo.as_mut().unwrap().value = Amount::from_sat(45_000);
        assert_eq!(refuse(p).field, "inputs[0].non_witness_utxo");

        // A previous transaction other than the one the outpoint names.
        let mut p = psbt(&wallet_key(), &[50_000, 60_000], &[(other_script(), 40_000)]);
        p.inputs[0].non_witness_utxo = p.inputs[1].non_witness_utxo.clone();
        assert_eq!(refuse(p).field, "inputs[0].non_witness_utxo");
    }

    #[test]
    fn taproot_fields_odd_outputs_and_trailing_bytes_are_refused() {
        let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
        p.inputs[0]
            .sha256_preimages
            .insert(::bitcoin::hashes::sha256::Hash::hash(b"x"), b"x".to_vec());
        assert_eq!(refuse(p).field, "inputs[0].taproot");

        // Pay-to-anchor and future witness versions are spendable by anyone
        // or unknown: not destinations custos signs for.
        for script in [
            "51024e73",
            "5220000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        ] {
            let mut p = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]);
            p.unsigned_tx.output[0].script_pubkey = ScriptBuf::from_hex(script).unwrap();
            let r = refuse(p);
            assert_eq!(r.field, "outputs[0].script_pubkey", "{script}");
        }

        let mut bytes = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]).serialize();
        bytes.push(0);
        assert!(decode_psbt(&bytes).unwrap_err().reason.contains("trailing"));
    }

    #[test]
    fn garbage_and_truncated_psbts_are_refused() {
        let good = psbt(&wallet_key(), &[50_000], &[(other_script(), 40_000)]).serialize();
        for bytes in [&b""[..], b"garbage", &good[..good.len() / 2], &good[..5]] {
            let r = decode_psbt(bytes).unwrap_err();
            assert_eq!(r.field, "psbt");
            assert!(r.reason.starts_with("malformed PSBT"), "{r}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode_psbt(&bytes).map(|p| parse(p, ::bitcoin::Network::Regtest, &wallet_key()));
        }

        #[test]
        fn mutated_psbts_never_panic(index in 0usize..400, byte in any::<u8>()) {
            let mut bytes = psbt(&wallet_key(), &[50_000, 60_000], &[(other_script(), 40_000)]).serialize();
            let i = index % bytes.len();
            bytes[i] = byte;
            let _ = decode_psbt(&bytes).map(|p| parse(p, ::bitcoin::Network::Regtest, &wallet_key()));
        }
    }
}
