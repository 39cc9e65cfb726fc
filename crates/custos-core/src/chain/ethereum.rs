//! Ethereum: unsigned EIP-1559 (type 2) and legacy EIP-155 transactions,
//! parsed with alloy into an [`Intent`], signed over alloy's own signing hash.
//!
//! Two shapes are understood: a native ETH transfer (empty calldata) and an
//! ERC-20 `transfer(address,uint256)` to a contract in the wallet's token
//! registry. Everything else is refused with the field and the reason:
//! other calldata (including `approve`), contract creation, access lists,
//! and transaction types 1, 3 and 4. Raw input must be the canonical unsigned
//! encoding: alloy decodes it, and re-encoding must give the same bytes.

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope, TxLegacy};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Address, B256, Bytes, Signature, TxKind, U256};
use alloy_rlp::Decodable;
use alloy_sol_types::{SolCall, sol};

use super::{Asset, Destination, FeeTerms, Intent, Network, RefusalKind, SigningDigest, TxRefusal};
use crate::signature::RecoverableSignature;

sol! {
    /// ERC-20 transfer.
    function transfer(address to, uint256 amount) external returns (bool);
    /// ERC-20 approve: recognised only to be refused by name.
    function approve(address spender, uint256 amount) external returns (bool);
}

/// Decimals of ether's base unit, wei.
pub const ETH_DECIMALS: u8 = 18;

/// A token the wallet may transfer, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// Ticker, e.g. `USDC`.
    pub symbol: String,
    /// The token contract.
    pub contract: Address,
    /// Decimals of the token's base unit.
    pub decimals: u8,
}

/// The Ethereum network a wallet signs for, and its token registry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EthereumNetwork {
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Registered ERC-20 tokens.
    pub tokens: Vec<Token>,
}

impl EthereumNetwork {
    fn token(&self, contract: &Address) -> Option<&Token> {
        self.tokens.iter().find(|t| &t.contract == contract)
    }
}

/// An unsigned transaction of a supported type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnsignedEthereumTx {
    /// Legacy, with an EIP-155 chain id.
    Legacy(TxLegacy),
    /// EIP-1559, type 2.
    Eip1559(TxEip1559),
}

/// Transaction type of the structured form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EthereumTxType {
    /// Legacy with EIP-155 replay protection.
    Legacy,
    /// EIP-1559.
    Eip1559,
}

/// The structured form of an unsigned transaction, as parsed from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthereumFields {
    /// Transaction type.
    pub tx_type: EthereumTxType,
    /// EIP-155 chain id.
    pub chain_id: u64,
    /// Account nonce.
    pub nonce: u64,
    /// Gas limit.
    pub gas_limit: u64,
    /// Legacy gas price, in wei (must be 0 for EIP-1559).
    pub gas_price: u128,
    /// EIP-1559 max fee per gas, in wei (must be 0 for legacy).
    pub max_fee_per_gas: u128,
    /// EIP-1559 max priority fee per gas, in wei (must be 0 for legacy).
    pub max_priority_fee_per_gas: u128,
    /// Recipient; `None` is contract creation (refused by [`parse`]).
    pub to: Option<Address>,
    /// Value, in wei.
    pub value: U256,
    /// Calldata.
    pub data: Vec<u8>,
}

impl TryFrom<EthereumFields> for UnsignedEthereumTx {
    type Error = TxRefusal;

    fn try_from(f: EthereumFields) -> Result<Self, TxRefusal> {
        let to = f.to.map_or(TxKind::Create, TxKind::Call);
        match f.tx_type {
            EthereumTxType::Legacy => {
                if f.max_fee_per_gas != 0 || f.max_priority_fee_per_gas != 0 {
                    return Err(TxRefusal::new(
                        "max_fee_per_gas",
                        "must be unset for a legacy transaction; use gas_price",
                    ));
                }
                Ok(Self::Legacy(TxLegacy {
                    chain_id: Some(f.chain_id),
                    nonce: f.nonce,
                    gas_price: f.gas_price,
                    gas_limit: f.gas_limit,
                    to,
                    value: f.value,
                    input: Bytes::from(f.data),
                }))
            }
            EthereumTxType::Eip1559 => {
                if f.gas_price != 0 {
                    return Err(TxRefusal::new(
                        "gas_price",
                        "must be unset for an EIP-1559 transaction; use max_fee_per_gas",
                    ));
                }
                Ok(Self::Eip1559(TxEip1559 {
                    chain_id: f.chain_id,
                    nonce: f.nonce,
                    gas_limit: f.gas_limit,
                    max_fee_per_gas: f.max_fee_per_gas,
                    max_priority_fee_per_gas: f.max_priority_fee_per_gas,
                    to,
                    value: f.value,
                    access_list: Default::default(),
                    input: Bytes::from(f.data),
                }))
            }
        }
    }
}

/// Decodes the canonical unsigned encoding: `0x02 || rlp(fields)` for
/// EIP-1559, or the EIP-155 signing payload `rlp([..., chain_id, 0, 0])` for
/// legacy transactions.
///
/// The list is decoded one item at a time, so a refusal names the item that
/// failed: `max_fee_per_gas: leading zero`.
pub fn decode_unsigned(bytes: &[u8]) -> Result<UnsignedEthereumTx, TxRefusal> {
    let refuse = |reason: String| TxRefusal::new("rlp", reason);
    let tx = match bytes.first() {
        None => return Err(refuse("is empty".into())),
        Some(0xc0..=0xff) => UnsignedEthereumTx::Legacy(decode_legacy(bytes)?),
        Some(0x02) => UnsignedEthereumTx::Eip1559(decode_eip1559(&bytes[1..])?),
        Some(0x01) => {
            return Err(TxRefusal::unsupported(
                "rlp",
                "EIP-2930 transactions (type 1) are refused",
            ));
        }
        Some(0x03) => {
            return Err(TxRefusal::unsupported(
                "rlp",
                "EIP-4844 blob transactions (type 3) are refused",
            ));
        }
        Some(0x04) => {
            return Err(TxRefusal::unsupported(
                "rlp",
                "EIP-7702 set-code transactions (type 4) are refused",
            ));
        }
        Some(other) => return Err(refuse(format!("unknown transaction type 0x{other:02x}"))),
    };
    if signing_payload(&tx) != bytes {
        return Err(refuse(
            "is not the canonical unsigned encoding (for legacy: the EIP-155 payload ending in chain_id, 0, 0)"
                .into(),
        ));
    }
    Ok(tx)
}

/// An RLP list's items, decoded in order, each named in its refusal.
struct RlpItems<'a> {
    payload: &'a [u8],
}

impl<'a> RlpItems<'a> {
    /// Opens the one list that must make up all of `bytes`.
    fn open(mut bytes: &'a [u8], what: &str) -> Result<Self, TxRefusal> {
        let header = alloy_rlp::Header::decode(&mut bytes)
            .map_err(|e| TxRefusal::new("rlp", format!("{what}: {e}")))?;
        if !header.list {
            return Err(TxRefusal::new("rlp", format!("{what}: is not an RLP list")));
        }
        if bytes.len() != header.payload_length {
            return Err(TxRefusal::new(
                "rlp",
                format!(
                    "{what}: the list header says {} bytes, {} follow",
                    header.payload_length,
                    bytes.len()
                ),
            ));
        }
        Ok(Self { payload: bytes })
    }

    fn next<T: Decodable>(&mut self, name: &str) -> Result<T, TxRefusal> {
        if self.payload.is_empty() {
            return Err(TxRefusal::new("rlp", format!("{name}: is missing")));
        }
        T::decode(&mut self.payload).map_err(|e| TxRefusal::new("rlp", format!("{name}: {e}")))
    }

    fn close(self) -> Result<(), TxRefusal> {
        if self.payload.is_empty() {
            Ok(())
        } else {
            Err(TxRefusal::new(
                "rlp",
                "has items after the last field of the transaction",
            ))
        }
    }
}

fn decode_eip1559(bytes: &[u8]) -> Result<TxEip1559, TxRefusal> {
    let mut items = RlpItems::open(bytes, "EIP-1559 transaction")?;
    let tx = TxEip1559 {
        chain_id: items.next("chain_id")?,
        nonce: items.next("nonce")?,
        max_priority_fee_per_gas: items.next("max_priority_fee_per_gas")?,
        max_fee_per_gas: items.next("max_fee_per_gas")?,
        gas_limit: items.next("gas_limit")?,
        to: items.next("to")?,
        value: items.next("value")?,
        input: items.next("data")?,
        access_list: items.next("access_list")?,
    };
    items.close()?;
    Ok(tx)
}

fn decode_legacy(bytes: &[u8]) -> Result<TxLegacy, TxRefusal> {
    let mut items = RlpItems::open(bytes, "legacy transaction")?;
    let nonce = items.next("nonce")?;
    let gas_price = items.next("gas_price")?;
    let gas_limit = items.next("gas_limit")?;
    let to = items.next("to")?;
    let value = items.next("value")?;
    let input = items.next("data")?;
    if items.payload.is_empty() {
        return Err(TxRefusal::unsupported(
            "rlp",
            "legacy transactions must carry an EIP-155 chain id (the payload ends in chain_id, 0, 0)",
        ));
    }
    let chain_id: u64 = items.next("chain_id")?;
    for name in ["eip155_r", "eip155_s"] {
        if items.next::<u64>(name)? != 0 {
            return Err(TxRefusal::new(
                "rlp",
                format!("{name}: must be 0 in the EIP-155 signing payload"),
            ));
        }
    }
    items.close()?;
    Ok(TxLegacy {
        chain_id: Some(chain_id),
        nonce,
        gas_price,
        gas_limit,
        to,
        value,
        input,
    })
}

/// The canonical unsigned encoding [`decode_unsigned`] accepts: what custos
/// stores and hands approvers.
pub fn signing_payload(tx: &UnsignedEthereumTx) -> Vec<u8> {
    let mut out = Vec::new();
    match tx {
        UnsignedEthereumTx::Legacy(t) => t.encode_for_signing(&mut out),
        UnsignedEthereumTx::Eip1559(t) => t.encode_for_signing(&mut out),
    }
    out
}

/// A transaction custos understands, with its intent and signing hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEthereumTx {
    tx: UnsignedEthereumTx,
    intent: Intent,
    signing_hash: B256,
}

impl ParsedEthereumTx {
    /// The intent derived from the transaction.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

    /// Keccak-256 of the unsigned payload.
    pub fn signing_hash(&self) -> [u8; 32] {
        self.signing_hash.0
    }

    /// The signing hash as the digest the HSM signs.
    pub fn signing_digest(&self) -> SigningDigest {
        SigningDigest::computed(self.signing_hash.0)
    }

    /// The unsigned transaction.
    pub fn transaction(&self) -> &UnsignedEthereumTx {
        &self.tx
    }
}

/// A signed, broadcastable transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedEthereumTx {
    /// The EIP-2718 encoding (plain RLP for legacy): what `eth_sendRawTransaction` takes.
    pub raw: Vec<u8>,
    /// The transaction hash.
    pub hash: B256,
    /// The sender recovered from the signature: always the wallet's address.
    pub sender: Address,
}

/// Parses `tx` for a wallet whose address is `from` on `network`.
pub fn parse(
    tx: UnsignedEthereumTx,
    network: &EthereumNetwork,
    from: Address,
) -> Result<ParsedEthereumTx, TxRefusal> {
    let (chain_id, nonce, gas_limit, max_fee, priority_fee, to, value, input) = match &tx {
        UnsignedEthereumTx::Legacy(t) => {
            let chain_id = t.chain_id.ok_or_else(|| {
                TxRefusal::unsupported("chain_id", "legacy transactions must carry an EIP-155 chain id")
            })?;
            (
                chain_id,
                t.nonce,
                t.gas_limit,
                t.gas_price,
                t.gas_price,
                t.to,
                t.value,
                &t.input,
            )
        }
        UnsignedEthereumTx::Eip1559(t) => {
            if !t.access_list.0.is_empty() {
                return Err(TxRefusal::unsupported(
                    "access_list",
                    "EIP-2930 access lists are refused",
                ));
            }
            if t.max_priority_fee_per_gas > t.max_fee_per_gas {
                return Err(TxRefusal::of(
                    RefusalKind::AmountOutOfRange,
                    "max_priority_fee_per_gas",
                    "exceeds max_fee_per_gas",
                ));
            }
            (
                t.chain_id,
                t.nonce,
                t.gas_limit,
                t.max_fee_per_gas,
                t.max_priority_fee_per_gas,
                t.to,
                t.value,
                &t.input,
            )
        }
    };
    if chain_id != network.chain_id {
        return Err(TxRefusal::of(
            RefusalKind::ChainIdMismatch,
            "chain_id",
            format!(
                "{chain_id} does not match the wallet's network (chain id {})",
                network.chain_id
            ),
        ));
    }
    let TxKind::Call(to) = to else {
        return Err(TxRefusal::unsupported("to", "contract creation is refused"));
    };
    let intrinsic = intrinsic_gas(input);
    if gas_limit < intrinsic {
        return Err(TxRefusal::of(
            RefusalKind::GasBelowIntrinsic,
            "gas_limit",
            format!(
                "{gas_limit} is below the transaction's intrinsic cost of {intrinsic} gas; no node would include it"
            ),
        ));
    }
    let (asset, destination) = if input.is_empty() {
        let asset = Asset {
            symbol: "ETH".into(),
            contract: None,
            decimals: ETH_DECIMALS,
        };
        (
            asset,
            Destination {
                to: to.to_checksum(None),
                amount: value,
            },
        )
    } else {
        erc20_transfer(network, to, value, input)?
    };
    let signing_hash = match &tx {
        UnsignedEthereumTx::Legacy(t) => t.signature_hash(),
        UnsignedEthereumTx::Eip1559(t) => t.signature_hash(),
    };
    let intent = Intent {
        network: Network::Ethereum { chain_id },
        asset,
        from: from.to_checksum(None),
        destinations: vec![destination],
        fee: FeeTerms::Ethereum {
            nonce,
            gas_limit,
            max_fee_per_gas: max_fee,
            max_priority_fee_per_gas: priority_fee,
            max_total_fee: U256::from(gas_limit) * U256::from(max_fee),
        },
        transaction_id: signing_hash.0,
    };
    Ok(ParsedEthereumTx {
        tx,
        intent,
        signing_hash,
    })
}

/// The gas a transaction costs before it runs (the Yellow Paper's
/// `g_transaction` plus calldata): 21000, and 16 per non-zero and 4 per zero
/// byte of data. Contract creation, which would add more, is refused anyway.
pub fn intrinsic_gas(data: &[u8]) -> u64 {
    let nonzero = data.iter().filter(|b| **b != 0).count() as u64;
    let zero = data.len() as u64 - nonzero;
    21_000 + 16 * nonzero + 4 * zero
}

fn erc20_transfer(
    network: &EthereumNetwork,
    contract: Address,
    value: U256,
    input: &Bytes,
) -> Result<(Asset, Destination), TxRefusal> {
    let Some(token) = network.token(&contract) else {
        return Err(TxRefusal::unsupported(
            "data",
            format!(
                "calldata to {}, which is not a registered token contract; only native transfers and ERC-20 transfer to registered tokens are signed",
                contract.to_checksum(None)
            ),
        ));
    };
    let selector = input.get(..4).unwrap_or(input);
    if selector == approveCall::SELECTOR {
        return Err(TxRefusal::unsupported(
            "data",
            "ERC-20 approve is refused; only transfer is signed",
        ));
    }
    if selector != transferCall::SELECTOR {
        return Err(TxRefusal::unsupported(
            "data",
            format!(
                "function selector 0x{} is not ERC-20 transfer (0xa9059cbb)",
                hex::encode(selector)
            ),
        ));
    }
    let call = transferCall::abi_decode_validate(input)
        .ok()
        // Exactly selector + two words: no trailing data, canonical encoding.
        .filter(|call| call.abi_encode() == input.as_ref())
        .ok_or_else(|| TxRefusal::new("data", "malformed ERC-20 transfer arguments"))?;
    if value != U256::ZERO {
        return Err(TxRefusal::of(
            RefusalKind::AmountOutOfRange,
            "value",
            "must be 0 for an ERC-20 transfer",
        ));
    }
    let asset = Asset {
        symbol: token.symbol.clone(),
        contract: Some(token.contract.to_checksum(None)),
        decimals: token.decimals,
    };
    Ok((
        asset,
        Destination {
            to: call.to.to_checksum(None),
            amount: call.amount,
        },
    ))
}

/// Attaches a verified signature and encodes the broadcastable transaction.
///
/// `signature` must come from the server's `Wallets::sign_digest` over
/// [`ParsedEthereumTx::signing_digest`], which verified it against the wallet key.
pub fn assemble(
    parsed: &ParsedEthereumTx,
    signature: &RecoverableSignature,
    sender: Address,
) -> SignedEthereumTx {
    let (r, s) = signature.signature().split_bytes();
    let sig = Signature::new(
        U256::from_be_slice(&r),
        U256::from_be_slice(&s),
        signature.recovery_id().is_y_odd(),
    );
    let envelope: TxEnvelope = match &parsed.tx {
        UnsignedEthereumTx::Legacy(t) => t.clone().into_signed(sig).into(),
        UnsignedEthereumTx::Eip1559(t) => t.clone().into_signed(sig).into(),
    };
    SignedEthereumTx {
        raw: envelope.encoded_2718(),
        hash: *envelope.tx_hash(),
        sender,
    }
}

/// A broadcastable transaction of the kinds custos signs, decoded back into
/// its parts: what [`assemble`] wrote, for an auditor to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSignedTx {
    /// The transaction without its signature.
    pub unsigned: UnsignedEthereumTx,
    /// Its signature, as ECDSA scalars.
    pub signature: k256::ecdsa::Signature,
    /// The signature's recovery id (the y parity; custos never writes an
    /// x-reduced id into a transaction).
    pub recovery_id: k256::ecdsa::RecoveryId,
    /// The signing hash the signature is over.
    pub signing_hash: B256,
    /// The transaction hash.
    pub hash: B256,
}

/// Decodes a signed EIP-1559 or legacy transaction (EIP-2718 envelope), with
/// no trailing bytes. The one decoder of signed Ethereum transactions; the
/// audit replay uses it both to recover keys ahead in parallel and to check
/// each `signed` entry.
pub fn decode_signed(bytes: &[u8]) -> Result<DecodedSignedTx, String> {
    use alloy_eips::eip2718::Decodable2718;

    let mut rest = bytes;
    let envelope = TxEnvelope::decode_2718(&mut rest)
        .map_err(|e| format!("the signed transaction does not decode: {e}"))?;
    if !rest.is_empty() {
        return Err("the signed transaction has trailing bytes".into());
    }
    let (unsigned, sig, signing_hash, hash) = match &envelope {
        TxEnvelope::Legacy(s) => (
            UnsignedEthereumTx::Legacy(s.tx().clone()),
            s.signature(),
            s.tx().signature_hash(),
            *s.hash(),
        ),
        TxEnvelope::Eip1559(s) => (
            UnsignedEthereumTx::Eip1559(s.tx().clone()),
            s.signature(),
            s.tx().signature_hash(),
            *s.hash(),
        ),
        _ => return Err("the signed transaction is of a type custos never signs".into()),
    };
    let signature =
        k256::ecdsa::Signature::from_scalars(sig.r().to_be_bytes::<32>(), sig.s().to_be_bytes::<32>())
            .map_err(|_| "the signature's r or s is out of range".to_owned())?;
    Ok(DecodedSignedTx {
        unsigned,
        signature,
        recovery_id: k256::ecdsa::RecoveryId::new(sig.v(), false),
        signing_hash,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const EIP155_SIGNING_DATA: &str =
        "ec098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a764000080018080";
    const EIP155_SIGNING_HASH: &str = "daf5a779ae972f972197303d7b574746c7ef83eadac0f2791ad23db92e4c8e53";
    const EIP155_SIGNED: &str = "f86c098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a76400008025a028ef61340bd939bc2195fe537567866003e1a15d3c71ff63e1590620aa636276a067cbe9d8997f761aecb703304b3800ccf555c9f3dc64214b297fb1966a3b6d83";
    const EIP155_FROM: &str = "0x9d8A62f656a8d1615C1294fd71e9CFb3E4855A4F";
    const USDC: &str = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238";

    fn mainnet() -> EthereumNetwork {
        EthereumNetwork {
            chain_id: 1,
            tokens: vec![Token {
                symbol: "USDC".into(),
                contract: USDC.parse().unwrap(),
                decimals: 6,
            }],
        }
    }

    fn from() -> Address {
        EIP155_FROM.parse().unwrap()
    }

    fn fields() -> EthereumFields {
        EthereumFields {
            tx_type: EthereumTxType::Eip1559,
            chain_id: 1,
            nonce: 0,
            gas_limit: 60_000,
            gas_price: 0,
            max_fee_per_gas: 30_000_000_000,
            max_priority_fee_per_gas: 1_000_000_000,
            to: Some(USDC.parse().unwrap()),
            value: U256::ZERO,
            data: transferCall {
                to: "0x3535353535353535353535353535353535353535".parse().unwrap(),
                amount: U256::from(2_500_000u64),
            }
            .abi_encode(),
        }
    }

    fn refusal(f: EthereumFields) -> TxRefusal {
        let tx = UnsignedEthereumTx::try_from(f).and_then(|tx| parse(tx, &mainnet(), from()));
        tx.unwrap_err()
    }

    /// The example from EIP-155 itself: signing payload, signing hash, and the
    /// signed transaction for the published key's published signature.
    #[test]
    fn eip155_example() {
        let tx = decode_unsigned(&hex::decode(EIP155_SIGNING_DATA).unwrap()).unwrap();
        let parsed = parse(tx, &mainnet(), from()).unwrap();
        assert_eq!(hex::encode(parsed.signing_hash()), EIP155_SIGNING_HASH);
        let intent = parsed.intent();
        assert_eq!(intent.asset.symbol, "ETH");
        assert_eq!(
            intent.destinations[0].to,
            "0x3535353535353535353535353535353535353535"
        );
        assert_eq!(
            intent.destinations[0].amount,
            U256::from(1_000_000_000_000_000_000u64)
        );
        assert_eq!(intent.fee.max_total_fee(), U256::from(21_000u64 * 20_000_000_000));

        // The EIP's published r and s, run through custos's own post-processing.
        let signed = hex::decode(EIP155_SIGNED).unwrap();
        let rs = [
            &signed[signed.len() - 65..signed.len() - 33],
            &signed[signed.len() - 32..],
        ]
        .concat();
        let key = k256::ecdsa::SigningKey::from_slice(&[0x46; 32]).unwrap();
        let sig = crate::signature::finalize(&rs, &parsed.signing_hash(), key.verifying_key()).unwrap();
        let out = assemble(&parsed, &sig, from());
        assert_eq!(hex::encode(&out.raw), EIP155_SIGNED);
        assert_eq!(out.hash, alloy_primitives::keccak256(&out.raw));
    }

    #[test]
    fn erc20_transfer_to_registered_token_is_understood() {
        let tx = UnsignedEthereumTx::try_from(fields()).unwrap();
        let parsed = parse(tx, &mainnet(), from()).unwrap();
        let intent = parsed.intent();
        assert_eq!(intent.asset.symbol, "USDC");
        assert_eq!(intent.asset.decimals, 6);
        assert_eq!(intent.asset.contract.as_deref(), Some(USDC));
        assert_eq!(intent.destinations[0].amount, U256::from(2_500_000u64));
        assert_eq!(intent.fee.max_total_fee(), U256::from(60_000u64 * 30_000_000_000));
        // Raw form round-trips to the same parse.
        let raw = signing_payload(parsed.transaction());
        assert_eq!(raw[0], 0x02);
        assert_eq!(
            parse(decode_unsigned(&raw).unwrap(), &mainnet(), from()).unwrap(),
            parsed
        );
    }

    #[test]
    fn refusals_name_field_and_reason() {
        let mut f = fields();
        f.to = Some("0x3535353535353535353535353535353535353535".parse().unwrap());
        let r = refusal(f);
        assert_eq!(r.field, "data");
        assert!(r.reason.contains("not a registered token contract"), "{r}");

        let mut f = fields();
        f.data = approveCall {
            spender: "0x3535353535353535353535353535353535353535".parse().unwrap(),
            amount: U256::MAX,
        }
        .abi_encode();
        let r = refusal(f);
        assert_eq!(
            (r.field.as_str(), r.reason.contains("approve")),
            ("data", true),
            "{r}"
        );

        let mut f = fields();
        f.data = vec![0xde, 0xad, 0xbe, 0xef];
        assert!(refusal(f).reason.contains("0xdeadbeef"));

        let mut f = fields();
        f.data.push(0);
        assert_eq!(refusal(f).reason, "malformed ERC-20 transfer arguments");

        let mut f = fields();
        f.data[4] = 1; // dirty upper bytes of the address word
        assert_eq!(refusal(f).reason, "malformed ERC-20 transfer arguments");

        let mut f = fields();
        f.value = U256::from(1u8);
        assert_eq!(refusal(f).field, "value");

        let mut f = fields();
        f.to = None;
        let r = refusal(f);
        assert_eq!(
            (r.field.as_str(), r.reason.as_str()),
            ("to", "contract creation is refused")
        );

        let mut f = fields();
        f.chain_id = 5;
        let r = refusal(f);
        assert_eq!(r.field, "chain_id");
        assert!(r.reason.contains("does not match"), "{r}");

        let mut f = fields();
        f.max_priority_fee_per_gas = f.max_fee_per_gas + 1;
        assert_eq!(refusal(f).field, "max_priority_fee_per_gas");

        let mut f = fields();
        f.gas_limit = 0;
        assert_eq!(refusal(f).field, "gas_limit");
    }

    /// The ERC-20 transfer's calldata is 68 bytes: 21000 gas cannot carry it.
    #[test]
    fn a_gas_limit_below_the_intrinsic_cost_is_refused() {
        let data = fields().data;
        let nonzero = data.iter().filter(|b| **b != 0).count() as u64;
        let intrinsic = 21_000 + 16 * nonzero + 4 * (68 - nonzero);
        assert_eq!(intrinsic_gas(&data), intrinsic);
        assert_eq!(intrinsic_gas(&[]), 21_000);
        let mut f = fields();
        f.gas_limit = 21_000;
        let r = refusal(f);
        assert_eq!(
            (r.field.as_str(), r.kind),
            ("gas_limit", RefusalKind::GasBelowIntrinsic)
        );
        assert!(
            r.reason.contains(&format!("intrinsic cost of {intrinsic} gas")),
            "{r}"
        );
        let mut f = fields();
        f.gas_limit = intrinsic;
        UnsignedEthereumTx::try_from(f)
            .and_then(|tx| parse(tx, &mainnet(), from()))
            .unwrap();
    }

    #[test]
    fn raw_encodings_that_are_refused() {
        let cases: &[(&str, &str)] = &[
            ("", "is empty"),
            ("01c0", "EIP-2930"),
            ("03c0", "EIP-4844"),
            ("04c0", "EIP-7702"),
            ("05c0", "unknown transaction type 0x05"),
            ("02", "EIP-1559 transaction: input too short"),
            (&EIP155_SIGNING_DATA[..40], "legacy transaction: input too short"),
            ("ffffffff", "legacy transaction:"),
            // A list whose items stop after the chain id.
            ("02c101", "nonce: is missing"),
            // A string, not a list.
            ("0280", "is not an RLP list"),
        ];
        for (hex_input, expected) in cases {
            let err = decode_unsigned(&hex::decode(hex_input).unwrap()).unwrap_err();
            assert_eq!(err.field, "rlp");
            assert!(err.reason.contains(expected), "{hex_input}: {err}");
        }
        // Trailing bytes.
        let mut trailing = hex::decode(EIP155_SIGNING_DATA).unwrap();
        trailing.push(0x80);
        assert!(
            decode_unsigned(&trailing)
                .unwrap_err()
                .reason
                .contains("the list header says")
        );
        // EIP-155 sentinels must be zero: ..., chain_id 1, r = 1, s = 0.
        let nonzero = hex::decode(EIP155_SIGNING_DATA.replace("018080", "010180")).unwrap();
        assert_eq!(
            decode_unsigned(&nonzero).unwrap_err().reason,
            "eip155_r: must be 0 in the EIP-155 signing payload"
        );
        // A signed transaction is not an unsigned one.
        assert!(decode_unsigned(&hex::decode(EIP155_SIGNED).unwrap()).is_err());
    }

    /// Each item of the list is decoded on its own, so a refusal names it.
    #[test]
    fn rlp_refusals_name_the_item() {
        let to = format!("94{}", "35".repeat(20));
        // chain_id, nonce, priority fee, max fee, gas limit, to, value, data, access list.
        let items = |max_fee: &str| format!("0101{}{max_fee}825208{to}8080c0", "01");
        let list = |items: String| format!("02{:02x}{items}", 0xc0 + items.len() / 2);
        let good = hex::decode(list(items("05"))).unwrap();
        decode_unsigned(&good).unwrap();
        let cases = [
            ("820001", "max_fee_per_gas: leading zero"),
            ("8105", "max_fee_per_gas: non-canonical single byte"),
            ("c0", "max_fee_per_gas: unexpected list"),
        ];
        for (max_fee, expected) in cases {
            let err = decode_unsigned(&hex::decode(list(items(max_fee))).unwrap()).unwrap_err();
            assert_eq!((err.field.as_str(), err.reason.as_str()), ("rlp", expected));
            assert_eq!(err.kind, RefusalKind::Malformed);
        }
        let extra = hex::decode(list(format!("{}80", items("05")))).unwrap();
        assert!(
            decode_unsigned(&extra)
                .unwrap_err()
                .reason
                .contains("after the last field")
        );
    }

    #[test]
    fn legacy_without_chain_id_and_access_lists_are_refused() {
        let mut legacy = TxLegacy {
            chain_id: None,
            nonce: 1,
            gas_price: 1,
            gas_limit: 21_000,
            to: TxKind::Call(Address::ZERO),
            value: U256::from(1u8),
            input: Bytes::new(),
        };
        let r = parse(UnsignedEthereumTx::Legacy(legacy.clone()), &mainnet(), from()).unwrap_err();
        assert_eq!(r.field, "chain_id");
        legacy.chain_id = Some(1);
        parse(UnsignedEthereumTx::Legacy(legacy), &mainnet(), from()).unwrap();

        let UnsignedEthereumTx::Eip1559(mut tx) = UnsignedEthereumTx::try_from(fields()).unwrap() else {
            unreachable!()
        };
        tx.access_list = alloy_eips::eip2930::AccessList(vec![Default::default()]);
        let r = parse(UnsignedEthereumTx::Eip1559(tx), &mainnet(), from()).unwrap_err();
        assert_eq!(r.field, "access_list");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_unsigned(&bytes).map(|tx| parse(tx, &mainnet(), from()));
        }

        #[test]
        fn arbitrary_typed_payloads_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let bytes = [&[0x02u8][..], &body].concat();
            let _ = decode_unsigned(&bytes).map(|tx| parse(tx, &mainnet(), from()));
        }
    }
}
