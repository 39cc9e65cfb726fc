//! Conversion of `custos.v1.UnsignedTransaction` into [`UnsignedTx`], and of
//! the chain parsers' refusals into violations of the request.
//!
//! Every field path in a violation exists in the request message. A refusal
//! of a field the caller sent as such names it, e.g.
//! `transaction.ethereum.fields.max_fee_per_gas`. A refusal inside an
//! encoded blob (RLP, PSBT) names the blob, and its description starts with
//! the item inside it: `transaction.ethereum.rlp`, `max_fee_per_gas: leading
//! zero`. Each kind of refusal has its own stable reason ([`reason`]).

use super::FieldViolation;
use crate::proto::{self, ethereum_transaction_fields::Type};
use crate::status::reason;
use custos_core::chain::ethereum::{self, EthereumFields, EthereumTxType};
use custos_core::chain::units::{self, address, decimal};
use custos_core::chain::{RefusalKind, TxRefusal, UnsignedTx, bitcoin};

/// The fields of `custos.v1.EthereumTransactionFields`: a refusal of one of
/// these, for a transaction sent as fields, names the field itself.
const ETHEREUM_FIELDS: &[&str] = &[
    "type",
    "chain_id",
    "nonce",
    "gas_limit",
    "gas_price",
    "max_fee_per_gas",
    "max_priority_fee_per_gas",
    "to",
    "value",
    "data",
];

/// How the request carried its transaction: where a refusal points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxSource {
    /// `transaction.ethereum.rlp`.
    EthereumRlp,
    /// `transaction.ethereum.fields`.
    EthereumFields,
    /// `transaction.bitcoin.psbt`.
    BitcoinPsbt,
    /// No transaction, or an empty one.
    Missing,
}

impl TxSource {
    /// Which encoding `transaction` uses.
    pub fn of(transaction: Option<&proto::UnsignedTransaction>) -> Self {
        use proto::ethereum_transaction::Encoding;
        use proto::unsigned_transaction::Kind;
        match transaction.and_then(|t| t.kind.as_ref()) {
            Some(Kind::Ethereum(eth)) => match eth.encoding {
                Some(Encoding::Rlp(_)) => Self::EthereumRlp,
                Some(Encoding::Fields(_)) => Self::EthereumFields,
                None => Self::Missing,
            },
            Some(Kind::Bitcoin(_)) => Self::BitcoinPsbt,
            None => Self::Missing,
        }
    }

    /// A chain parser's refusal as a violation of the request field that
    /// carried the refused item, with the refusal's own reason.
    pub fn violation(self, refusal: TxRefusal) -> FieldViolation {
        let reason = reason_of(refusal.kind);
        let (field, description) = match self {
            Self::EthereumFields if ETHEREUM_FIELDS.contains(&refusal.field.as_str()) => (
                format!("transaction.ethereum.fields.{}", refusal.field),
                refusal.reason,
            ),
            Self::EthereumFields => (
                "transaction.ethereum.fields".to_owned(),
                format!("{}: {}", refusal.field, refusal.reason),
            ),
            Self::EthereumRlp => ("transaction.ethereum.rlp".to_owned(), blob_description(refusal)),
            Self::BitcoinPsbt => ("transaction.bitcoin.psbt".to_owned(), blob_description(refusal)),
            Self::Missing => (
                "transaction".to_owned(),
                format!("{}: {}", refusal.field, refusal.reason),
            ),
        };
        FieldViolation::new(field, description).because(reason)
    }
}

/// A refusal inside an encoded blob: the item, then the rule. The blob's
/// own decoder already names the item in its reason.
fn blob_description(refusal: TxRefusal) -> String {
    if matches!(refusal.field.as_str(), "rlp" | "psbt") {
        refusal.reason
    } else {
        format!("{}: {}", refusal.field, refusal.reason)
    }
}

/// The stable reason of each kind of refusal.
pub fn reason_of(kind: RefusalKind) -> &'static str {
    match kind {
        RefusalKind::Malformed => reason::MALFORMED_TRANSACTION,
        RefusalKind::Unsupported => reason::UNSUPPORTED_TRANSACTION,
        RefusalKind::ChainIdMismatch => reason::CHAIN_ID_MISMATCH,
        RefusalKind::BadAddressChecksum => reason::BAD_ADDRESS_CHECKSUM,
        RefusalKind::AmountOutOfRange => reason::AMOUNT_OUT_OF_RANGE,
        RefusalKind::WrongSender => reason::WRONG_SENDER,
        RefusalKind::GasBelowIntrinsic => reason::GAS_BELOW_INTRINSIC,
    }
}

/// Converts the request's `transaction` field.
pub fn unsigned_tx(transaction: Option<proto::UnsignedTransaction>) -> Result<UnsignedTx, FieldViolation> {
    let source = TxSource::of(transaction.as_ref());
    let kind = transaction
        .and_then(|t| t.kind)
        .ok_or_else(|| FieldViolation::new("transaction", "is required: set ethereum or bitcoin"))?;
    match kind {
        proto::unsigned_transaction::Kind::Ethereum(eth) => {
            let encoding = eth
                .encoding
                .ok_or_else(|| FieldViolation::new("transaction.ethereum", "is empty: set rlp or fields"))?;
            let tx = match encoding {
                proto::ethereum_transaction::Encoding::Rlp(bytes) => {
                    ethereum::decode_unsigned(&bytes).map_err(|r| source.violation(r))?
                }
                proto::ethereum_transaction::Encoding::Fields(fields) => {
                    let fields = ethereum_fields(fields)?;
                    ethereum::UnsignedEthereumTx::try_from(fields).map_err(|r| source.violation(r))?
                }
            };
            Ok(UnsignedTx::Ethereum(tx))
        }
        proto::unsigned_transaction::Kind::Bitcoin(btc) => {
            let psbt = bitcoin::decode_psbt(&btc.psbt).map_err(|r| source.violation(r))?;
            Ok(UnsignedTx::Bitcoin(psbt))
        }
    }
}

/// A refused decimal amount: out of range if too large, else malformed.
fn amount_violation(field: String, why: &'static str) -> FieldViolation {
    let violation = FieldViolation::new(field, why);
    if why == units::TOO_LARGE {
        violation.because(reason::AMOUNT_OUT_OF_RANGE)
    } else {
        violation
    }
}

fn ethereum_fields(f: proto::EthereumTransactionFields) -> Result<EthereumFields, FieldViolation> {
    let path = |name: &str| format!("transaction.ethereum.fields.{name}");
    let tx_type = match Type::try_from(f.r#type) {
        Ok(Type::Legacy) => EthereumTxType::Legacy,
        Ok(Type::Eip1559) => EthereumTxType::Eip1559,
        _ => {
            return Err(FieldViolation::new(
                path("type"),
                "must be TYPE_LEGACY or TYPE_EIP1559",
            ));
        }
    };
    let wei_u128 = |name: &str, text: &str| -> Result<u128, FieldViolation> {
        let value = decimal(text).map_err(|why| amount_violation(path(name), why))?;
        u128::try_from(value).map_err(|_| {
            FieldViolation::new(path(name), "exceeds 2^128 - 1 wei").because(reason::AMOUNT_OUT_OF_RANGE)
        })
    };
    let to = if f.to.is_empty() {
        None
    } else {
        Some(address(&f.to).map_err(|why| {
            let violation = FieldViolation::new(path("to"), why);
            if why == units::BAD_CHECKSUM {
                violation.because(reason::BAD_ADDRESS_CHECKSUM)
            } else {
                violation
            }
        })?)
    };
    Ok(EthereumFields {
        tx_type,
        chain_id: f.chain_id,
        nonce: f.nonce,
        gas_limit: f.gas_limit,
        gas_price: wei_u128("gas_price", &f.gas_price)?,
        max_fee_per_gas: wei_u128("max_fee_per_gas", &f.max_fee_per_gas)?,
        max_priority_fee_per_gas: wei_u128("max_priority_fee_per_gas", &f.max_priority_fee_per_gas)?,
        to,
        value: decimal(&f.value).map_err(|why| amount_violation(path("value"), why))?,
        data: f.data,
    })
}

#[cfg(test)]
mod tests {
    use alloy_primitives::U256;

    use super::*;

    fn fields() -> proto::EthereumTransactionFields {
        proto::EthereumTransactionFields {
            r#type: Type::Eip1559 as i32,
            chain_id: 1,
            nonce: 1,
            gas_limit: 21_000,
            gas_price: String::new(),
            max_fee_per_gas: "30000000000".into(),
            max_priority_fee_per_gas: "1000000000".into(),
            to: "0x3535353535353535353535353535353535353535".into(),
            value: "1000000000000000000".into(),
            data: vec![],
        }
    }

    fn convert(f: proto::EthereumTransactionFields) -> Result<UnsignedTx, FieldViolation> {
        unsigned_tx(Some(proto::UnsignedTransaction {
            kind: Some(proto::unsigned_transaction::Kind::Ethereum(
                proto::EthereumTransaction {
                    encoding: Some(proto::ethereum_transaction::Encoding::Fields(f)),
                },
            )),
        }))
    }

    #[test]
    fn fields_convert() {
        let UnsignedTx::Ethereum(ethereum::UnsignedEthereumTx::Eip1559(tx)) = convert(fields()).unwrap()
        else {
            panic!("wrong kind")
        };
        assert_eq!(tx.value, U256::from(10u64).pow(U256::from(18u64)));
        assert_eq!(tx.max_fee_per_gas, 30_000_000_000);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut proto::EthereumTransactionFields)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|f| f.r#type = 0), "transaction.ethereum.fields.type"),
            (
                Box::new(|f| f.value = "1.5".into()),
                "transaction.ethereum.fields.value",
            ),
            (
                Box::new(|f| f.value = "-1".into()),
                "transaction.ethereum.fields.value",
            ),
            (
                Box::new(|f| f.value = "01".into()),
                "transaction.ethereum.fields.value",
            ),
            (
                Box::new(|f| f.value = "1".repeat(79)),
                "transaction.ethereum.fields.value",
            ),
            (
                Box::new(|f| f.max_fee_per_gas = "340282366920938463463374607431768211456".into()),
                "transaction.ethereum.fields.max_fee_per_gas",
            ),
            (
                Box::new(|f| f.to = "3535353535353535353535353535353535353535".into()),
                "transaction.ethereum.fields.to",
            ),
            (
                Box::new(|f| f.to = "0x9D8A62f656a8d1615C1294fd71e9CFb3E4855A4F".into()),
                "transaction.ethereum.fields.to",
            ),
            (
                Box::new(|f| f.gas_price = "1".into()),
                "transaction.ethereum.fields.gas_price",
            ),
        ];
        for (mutate, field) in cases {
            let mut f = fields();
            mutate(&mut f);
            assert_eq!(convert(f).unwrap_err().field, field);
        }
    }

    #[test]
    fn missing_and_malformed_transactions_are_named() {
        assert_eq!(unsigned_tx(None).unwrap_err().field, "transaction");
        let empty_eth = Some(proto::UnsignedTransaction {
            kind: Some(proto::unsigned_transaction::Kind::Ethereum(
                proto::EthereumTransaction { encoding: None },
            )),
        });
        assert_eq!(unsigned_tx(empty_eth).unwrap_err().field, "transaction.ethereum");
        let rlp = Some(proto::UnsignedTransaction {
            kind: Some(proto::unsigned_transaction::Kind::Ethereum(
                proto::EthereumTransaction {
                    encoding: Some(proto::ethereum_transaction::Encoding::Rlp(vec![0x01, 0xc0])),
                },
            )),
        });
        let v = unsigned_tx(rlp).unwrap_err();
        assert_eq!(v.field, "transaction.ethereum.rlp");
        assert!(v.description.contains("EIP-2930"));
        let psbt = Some(proto::UnsignedTransaction {
            kind: Some(proto::unsigned_transaction::Kind::Bitcoin(
                proto::BitcoinTransaction {
                    psbt: b"nope".to_vec(),
                },
            )),
        });
        assert_eq!(unsigned_tx(psbt).unwrap_err().field, "transaction.bitcoin.psbt");
    }
}
