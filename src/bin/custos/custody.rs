//! Withdrawal and approval commands: submit and follow withdrawals, and vote
//! on them with the approver's own key after recomputing the intent locally.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::Subcommand;

use super::{all_pages, connect, describe, emit, print_intent};
use custos::hsm::TokenSelector;
use custos::proto::{
    self, approval_service_client::ApprovalServiceClient, policy_service_client::PolicyServiceClient,
    wallet_service_client::WalletServiceClient, withdrawal_service_client::WithdrawalServiceClient,
};
use custos::secret::{Pin, PinSource};
use custos::signer::{KeyFile, TokenKey, public_key_string};
use custos_core::approval::ApprovalMessage;
use custos_core::chain::Intent;
use custos_core::policy::{Policy, Vote, policy_hash};
use custos_core::recompute;

/// Withdrawal commands.
#[derive(Debug, Subcommand)]
pub enum WithdrawalCommand {
    /// Submit an unsigned transaction for signing.
    Create {
        /// Idempotency key: retries with the same key return the same withdrawal.
        #[arg(long)]
        request_id: String,
        /// The paying wallet's id.
        #[arg(long)]
        wallet: String,
        /// Who asks for it.
        #[arg(long, default_value = "cli")]
        initiator: String,
        #[command(flatten)]
        transaction: Box<TransactionArgs>,
    },
    /// Show one withdrawal.
    Get {
        /// Withdrawal id (`wd_...`).
        id: String,
    },
    /// List withdrawals.
    List {
        /// Only this state, e.g. PENDING_APPROVAL or SIGNED.
        #[arg(long)]
        state: Option<String>,
    },
    /// Print the withdrawal at each state change until it is final.
    Watch {
        /// Withdrawal id.
        id: String,
    },
    /// Cancel a withdrawal that is not signed yet.
    Cancel {
        /// Withdrawal id.
        id: String,
    },
}

/// The unsigned transaction: canonical Ethereum RLP, a PSBT, or EIP-1559 fields.
#[derive(Debug, clap::Args)]
pub struct TransactionArgs {
    /// The canonical unsigned Ethereum encoding, hex.
    #[arg(long, conflicts_with_all = ["psbt", "to"])]
    rlp: Option<String>,
    /// A Bitcoin PSBT, base64 or hex.
    #[arg(long, conflicts_with = "to")]
    psbt: Option<String>,
    /// EIP-1559 transfer: the recipient.
    #[arg(long, requires = "chain_id")]
    to: Option<String>,
    /// EIP-1559 transfer: value in wei.
    #[arg(long, default_value = "0")]
    value_wei: String,
    /// EIP-1559 transfer: calldata, hex (e.g. an ERC-20 transfer).
    #[arg(long, default_value = "")]
    data: String,
    /// EIP-1559 transfer: the EIP-155 chain id.
    #[arg(long)]
    chain_id: Option<u64>,
    /// EIP-1559 transfer: account nonce.
    #[arg(long, default_value_t = 0)]
    nonce: u64,
    /// EIP-1559 transfer: gas limit.
    #[arg(long, default_value_t = 21_000)]
    gas_limit: u64,
    /// EIP-1559 transfer: max fee per gas, wei.
    #[arg(long, default_value = "30000000000")]
    max_fee_per_gas: String,
    /// EIP-1559 transfer: max priority fee per gas, wei.
    #[arg(long, default_value = "1000000000")]
    max_priority_fee_per_gas: String,
}

impl TransactionArgs {
    fn to_proto(&self) -> Result<proto::UnsignedTransaction, String> {
        use proto::unsigned_transaction::Kind;
        let kind = if let Some(rlp) = &self.rlp {
            let bytes =
                hex::decode(rlp.trim().trim_start_matches("0x")).map_err(|e| format!("--rlp: {e}"))?;
            Kind::Ethereum(proto::EthereumTransaction {
                encoding: Some(proto::ethereum_transaction::Encoding::Rlp(bytes)),
            })
        } else if let Some(psbt) = &self.psbt {
            Kind::Bitcoin(proto::BitcoinTransaction {
                psbt: psbt_bytes(psbt)?,
            })
        } else if let Some(to) = &self.to {
            Kind::Ethereum(proto::EthereumTransaction {
                encoding: Some(proto::ethereum_transaction::Encoding::Fields(
                    proto::EthereumTransactionFields {
                        r#type: proto::ethereum_transaction_fields::Type::Eip1559.into(),
                        chain_id: self.chain_id.unwrap_or_default(),
                        nonce: self.nonce,
                        gas_limit: self.gas_limit,
                        gas_price: String::new(),
                        max_fee_per_gas: self.max_fee_per_gas.clone(),
                        max_priority_fee_per_gas: self.max_priority_fee_per_gas.clone(),
                        to: to.clone(),
                        value: self.value_wei.clone(),
                        data: hex::decode(self.data.trim_start_matches("0x"))
                            .map_err(|e| format!("--data: {e}"))?,
                    },
                )),
            })
        } else {
            return Err("give the transaction: --rlp, --psbt, or --to with --chain-id".into());
        };
        Ok(proto::UnsignedTransaction { kind: Some(kind) })
    }
}

fn psbt_bytes(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    match hex::decode(text) {
        Ok(bytes) => Ok(bytes),
        Err(_) => text
            .parse::<::bitcoin::psbt::Psbt>()
            .map(|p| p.serialize())
            .map_err(|e| format!("--psbt is neither hex nor a base64 PSBT: {e}")),
    }
}

/// Where the signer's own key is: a key file or a PKCS#11 token.
#[derive(Debug, clap::Args)]
pub struct SignerArgs {
    /// A key file (PKCS#8 PEM, mode 0600), as `custos approver keygen` writes.
    #[arg(long, value_name = "FILE", required_unless_present = "pkcs11_key")]
    key: Option<PathBuf>,
    /// PKCS#11 module of your own token.
    #[arg(long, value_name = "PATH", requires = "pkcs11_key")]
    pkcs11_module: Option<PathBuf>,
    /// Label of your token.
    #[arg(long, value_name = "LABEL", requires = "pkcs11_key")]
    pkcs11_token: Option<String>,
    /// CKA_LABEL of your key on the token.
    #[arg(long, value_name = "LABEL", conflicts_with = "key")]
    pkcs11_key: Option<String>,
    /// File holding your token's user PIN (mode 0600).
    #[arg(long, value_name = "FILE", requires = "pkcs11_key")]
    pin_file: Option<PathBuf>,
}

impl SignerArgs {
    /// Signs a SHA-256 prehash with the configured key.
    pub fn sign(&self, prehash: &[u8; 32]) -> Result<[u8; 64], String> {
        if let Some(path) = &self.key {
            let key = KeyFile::load(path).map_err(|e| e.to_string())?;
            return key.sign_prehash(prehash).map_err(|e| e.to_string());
        }
        let (token, pin) = self.token()?;
        token
            .sign_prehash(&pin, prehash)
            .map(|(sig, _)| sig)
            .map_err(|e| e.to_string())
    }

    fn token(&self) -> Result<(TokenKey, Pin), String> {
        let (Some(module), Some(label), Some(key), Some(pin_file)) = (
            &self.pkcs11_module,
            &self.pkcs11_token,
            &self.pkcs11_key,
            &self.pin_file,
        ) else {
            return Err(
                "a token key needs --pkcs11-module, --pkcs11-token, --pkcs11-key and --pin-file".into(),
            );
        };
        let pin = Pin::load(&PinSource::File(pin_file.clone())).map_err(|e| e.to_string())?;
        Ok((
            TokenKey {
                module: module.clone(),
                token: TokenSelector::Label(label.clone()),
                key_label: key.clone(),
            },
            pin,
        ))
    }
}

/// Approve or reject.
#[derive(Debug, clap::Args)]
pub struct VoteArgs {
    /// Withdrawal id (`wd_...`).
    id: String,
    /// Your approver id on the policy roster.
    #[arg(long)]
    approver: String,
    #[command(flatten)]
    signer: SignerArgs,
    /// Sign without asking for confirmation (the decoded intent is still shown).
    #[arg(long)]
    yes: bool,
    /// How long the signed vote stays valid, in seconds.
    #[arg(long, default_value_t = 3600)]
    valid_for: u64,
}

/// Approver key commands.
#[derive(Debug, Subcommand)]
pub enum ApproverCommand {
    /// Generate an approver (or admin) key: a new 0600 key file, or a key on
    /// your PKCS#11 token. Prints the public key for the policy roster.
    Keygen {
        /// Write a new key file here (never overwritten).
        #[arg(long, value_name = "FILE", required_unless_present = "pkcs11_key")]
        out: Option<PathBuf>,
        /// PKCS#11 module of your own token.
        #[arg(long, value_name = "PATH", requires = "pkcs11_key")]
        pkcs11_module: Option<PathBuf>,
        /// Label of your token.
        #[arg(long, value_name = "LABEL", requires = "pkcs11_key")]
        pkcs11_token: Option<String>,
        /// CKA_LABEL for the new key.
        #[arg(long, value_name = "LABEL", conflicts_with = "out")]
        pkcs11_key: Option<String>,
        /// File holding your token's user PIN (mode 0600).
        #[arg(long, value_name = "FILE", requires = "pkcs11_key")]
        pin_file: Option<PathBuf>,
    },
    /// Print the public key of a key file.
    Pubkey {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

pub fn approver(command: ApproverCommand, json: bool) -> Result<(), String> {
    let public = match command {
        ApproverCommand::Keygen { out: Some(path), .. } => {
            let key = KeyFile::generate().map_err(|e| e.to_string())?;
            key.write_new(&path).map_err(|e| e.to_string())?;
            public_key_string(key.verifying_key())
        }
        ApproverCommand::Keygen {
            pkcs11_module,
            pkcs11_token,
            pkcs11_key,
            pin_file,
            ..
        } => {
            let signer = SignerArgs {
                key: None,
                pkcs11_module,
                pkcs11_token,
                pkcs11_key,
                pin_file,
            };
            let (token, pin) = signer.token()?;
            public_key_string(&token.generate(&pin).map_err(|e| e.to_string())?)
        }
        ApproverCommand::Pubkey { key } => {
            public_key_string(KeyFile::load(&key).map_err(|e| e.to_string())?.verifying_key())
        }
    };
    emit(
        json,
        &serde_json::json!({ "public_key": public }),
        &format!("{public}\n"),
    )
}

fn name(id: &str) -> String {
    if id.starts_with("withdrawals/") {
        id.to_owned()
    } else {
        format!("withdrawals/{id}")
    }
}

pub async fn withdrawal(
    command: WithdrawalCommand,
    server: &crate::ServerArgs,
    json: bool,
) -> Result<(), String> {
    let mut client = WithdrawalServiceClient::new(connect(server).await?);
    match command {
        WithdrawalCommand::Create {
            request_id,
            wallet,
            initiator,
            transaction,
        } => {
            let request = proto::CreateWithdrawalRequest {
                request_id,
                wallet: format!("wallets/{wallet}"),
                transaction: Some(transaction.to_proto()?),
                initiator,
            };
            let w = client
                .create_withdrawal(request)
                .await
                .map_err(describe)?
                .into_inner();
            show(&w, json)
        }
        WithdrawalCommand::Get { id } => {
            let w = client
                .get_withdrawal(proto::GetWithdrawalRequest { name: name(&id) })
                .await
                .map_err(describe)?
                .into_inner();
            show(&w, json)
        }
        WithdrawalCommand::List { state } => {
            let state = match state {
                None => proto::WithdrawalState::Unspecified,
                Some(s) => proto::WithdrawalState::from_str_name(&s.to_ascii_uppercase())
                    .ok_or_else(|| format!("--state {s:?} is not a withdrawal state"))?,
            };
            let state: i32 = state.into();
            let all = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let page = client
                        .list_withdrawals(proto::ListWithdrawalsRequest {
                            page_size: 1000,
                            page_token,
                            state,
                        })
                        .await?
                        .into_inner();
                    Ok((page.withdrawals, page.next_page_token))
                }
            })
            .await?;
            show_list(&all, json)
        }
        WithdrawalCommand::Watch { id } => {
            let mut stream = client
                .watch_withdrawal(proto::WatchWithdrawalRequest { name: name(&id) })
                .await
                .map_err(describe)?
                .into_inner();
            while let Some(w) = stream.message().await.map_err(describe)? {
                show(&w, json)?;
            }
            Ok(())
        }
        WithdrawalCommand::Cancel { id } => {
            let w = client
                .cancel_withdrawal(proto::CancelWithdrawalRequest { name: name(&id) })
                .await
                .map_err(describe)?
                .into_inner();
            show(&w, json)
        }
    }
}

pub async fn pending(server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let client = ApprovalServiceClient::new(connect(server).await?);
    let all = all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_pending_approvals(proto::ListPendingApprovalsRequest {
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.withdrawals, page.next_page_token))
        }
    })
    .await?;
    show_list(&all, json)
}

/// Fetches the withdrawal, its wallet and the active policy; recomputes the
/// intent from the transaction with the policy's own network and asset
/// registry; refuses if the server's intent hash differs; shows the intent;
/// signs the vote with the approver's key; submits it.
pub async fn vote(args: VoteArgs, vote: Vote, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let channel = connect(server).await?;
    let withdrawal = WithdrawalServiceClient::new(channel.clone())
        .get_withdrawal(proto::GetWithdrawalRequest { name: name(&args.id) })
        .await
        .map_err(describe)?
        .into_inner();
    let wallet = WalletServiceClient::new(channel.clone())
        .get_wallet(proto::GetWalletRequest {
            name: withdrawal.wallet.clone(),
        })
        .await
        .map_err(describe)?
        .into_inner();
    let policy_state = PolicyServiceClient::new(channel.clone())
        .get_policy(proto::GetPolicyRequest { version: 0 })
        .await
        .map_err(describe)?
        .into_inner();
    let hash = policy_hash(&policy_state.document);
    if hex::encode(hash) != policy_state.hash {
        return Err(
            "refusing: the policy document the server sent does not hash to the policy hash it named".into(),
        );
    }
    let policy = Policy::parse(&policy_state.document).map_err(|e| format!("the active policy: {e}"))?;
    let intent = recompute_intent(&withdrawal, &wallet, &policy)?;
    let local_hash = intent.hash();
    if local_hash.as_slice() != withdrawal.intent_hash.as_slice() {
        return Err(format!(
            "refusing: the intent hash recomputed here ({}) differs from the server's ({}); do not approve",
            hex::encode(local_hash),
            hex::encode(&withdrawal.intent_hash)
        ));
    }
    let verb = match vote {
        Vote::Approve => "approve",
        Vote::Reject => "reject",
    };
    if !json {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "{} ({}), requested by {}, decoded here from its transaction:",
            withdrawal.name, withdrawal.wallet, withdrawal.initiator
        );
        drop(err);
        print_intent(&intent, false)?;
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "policy:       version {} ({})\nThe intent hash matches the server's.",
            policy.version, policy_state.hash
        );
    }
    if !args.yes {
        confirm(verb)?;
    }
    let now = custos::clock::unix_now();
    let window_end = withdrawal
        .expire_time
        .map_or(u64::MAX, |t| u64::try_from(t.seconds).unwrap_or(0));
    let message = ApprovalMessage {
        service_id: policy_state.service_id.clone(),
        withdrawal_id: withdrawal.name.trim_start_matches("withdrawals/").to_owned(),
        intent_hash: local_hash,
        policy_hash: hash,
        vote,
        expires_at: now.saturating_add(args.valid_for).min(window_end),
        approver: args.approver.clone(),
    };
    let signature = args.signer.sign(&message.digest())?;
    let result = ApprovalServiceClient::new(channel)
        .submit_approval(proto::SubmitApprovalRequest {
            message: message.encode(),
            signature: signature.to_vec(),
        })
        .await
        .map_err(describe)?
        .into_inner();
    show(&result, json)
}

fn confirm(verb: &str) -> Result<(), String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(format!("not a terminal: pass --yes to {verb} without a prompt"));
    }
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "Type '{verb}' to sign your vote: ");
    let _ = err.flush();
    let mut line = String::new();
    stdin.lock().read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() == verb {
        Ok(())
    } else {
        Err("not confirmed; nothing was signed".into())
    }
}

/// The intent of a withdrawal's transaction, derived here: the wallet's
/// address from its public key, the network and token registry from the
/// policy the vote will name ([`custos_core::recompute`]).
fn recompute_intent(
    w: &proto::Withdrawal,
    wallet: &proto::Wallet,
    policy: &Policy,
) -> Result<Intent, String> {
    let wallet_id = w.wallet.trim_start_matches("wallets/");
    let public = k256::ecdsa::VerifyingKey::from_sec1_bytes(&wallet.public_key)
        .map_err(|_| "the wallet's public key is malformed".to_owned())?;
    use proto::unsigned_transaction::Kind;
    let kind = w
        .transaction
        .as_ref()
        .and_then(|t| t.kind.as_ref())
        .ok_or("the withdrawal carries no transaction")?;
    let (chain, bytes) = match kind {
        Kind::Ethereum(eth) => {
            let Some(proto::ethereum_transaction::Encoding::Rlp(rlp)) = &eth.encoding else {
                return Err("the withdrawal's Ethereum transaction is not in its canonical encoding".into());
            };
            ("ethereum", rlp)
        }
        Kind::Bitcoin(btc_tx) => ("bitcoin", &btc_tx.psbt),
    };
    let tx = recompute::decode(chain, bytes).map_err(|e| e.to_string())?;
    Ok(recompute::parse_under_policy(tx, policy, wallet_id, &public)
        .map_err(|e| e.to_string())?
        .intent()
        .clone())
}

/// A signed transaction in the forms its chain's tools use.
///
/// - Ethereum (`eip155:`): raw bytes and hash as `0x`-prefixed hex, what
///   `eth_sendRawTransaction` takes and explorers show.
/// - Bitcoin (`bip122:`): raw bytes as bare hex (`sendrawtransaction`), and
///   the txid in display order, the reverse of the internal byte order the
///   proto carries, which is what bitcoind and explorers print.
struct SignedForms {
    raw: String,
    hash: String,
    hash_label: &'static str,
    /// The JSON key of the hash.
    hash_key: &'static str,
}

impl SignedForms {
    fn of(network: &str, signed: &proto::SignedTransaction) -> Self {
        if network.starts_with("bip122:") {
            let mut display = signed.hash.clone();
            display.reverse();
            Self {
                raw: hex::encode(&signed.raw),
                hash: hex::encode(display),
                hash_label: "txid",
                hash_key: "txid",
            }
        } else {
            Self {
                raw: format!("0x{}", hex::encode(&signed.raw)),
                hash: format!("0x{}", hex::encode(&signed.hash)),
                hash_label: "tx hash",
                hash_key: "hash",
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        object.insert("raw".into(), self.raw.clone().into());
        object.insert(self.hash_key.into(), self.hash.clone().into());
        serde_json::Value::Object(object)
    }
}

fn withdrawal_json(w: &proto::Withdrawal) -> serde_json::Value {
    let decision = w.decision.clone().unwrap_or_default();
    let intent = w.intent.clone().unwrap_or_default();
    serde_json::json!({
        "name": w.name,
        "request_id": w.request_id,
        "wallet": w.wallet,
        "initiator": w.initiator,
        "state": w.state().as_str_name(),
        "intent": serde_json::from_str::<serde_json::Value>(&intent.json).unwrap_or_default(),
        "intent_hash": hex::encode(&w.intent_hash),
        "decision": {
            "policy_hash": decision.policy_hash,
            "policy_version": decision.policy_version,
            "rule": decision.rule,
            "reason_code": decision.reason_code,
            "reason": decision.reason,
            "missing_quorum": decision.missing_quorum.iter().map(|q| serde_json::json!({"group": q.group, "min": q.min})).collect::<Vec<_>>(),
            "counted_approvers": decision.counted_approvers,
        },
        "votes": w.votes.iter().map(|v| serde_json::json!({"approver": v.approver, "vote": v.vote})).collect::<Vec<_>>(),
        "signed_transaction": w.signed_transaction.as_ref().map(|s| SignedForms::of(&intent.network, s).json()),
        "expire_time": w.expire_time.map(|t| t.seconds),
    })
}

/// Prints one withdrawal: with `--json`, one object.
fn show(withdrawal: &proto::Withdrawal, json: bool) -> Result<(), String> {
    print(
        std::slice::from_ref(withdrawal),
        json,
        &withdrawal_json(withdrawal),
    )
}

/// Prints the result of a list: with `--json`, always an array, of none,
/// one or many.
fn show_list(withdrawals: &[proto::Withdrawal], json: bool) -> Result<(), String> {
    let value = serde_json::Value::Array(withdrawals.iter().map(withdrawal_json).collect());
    print(withdrawals, json, &value)
}

fn print(withdrawals: &[proto::Withdrawal], json: bool, value: &serde_json::Value) -> Result<(), String> {
    let mut text = String::new();
    for w in withdrawals {
        let decision = w.decision.clone().unwrap_or_default();
        let intent = w.intent.clone().unwrap_or_default();
        text.push_str(&format!("{}  {}\n", w.name, w.state().as_str_name()));
        text.push_str(&format!(
            "  wallet:     {} (initiator {})\n",
            w.wallet, w.initiator
        ));
        for d in &intent.destinations {
            text.push_str(&format!(
                "  pay:        {} {} base units to {}\n",
                intent.asset, d.amount, d.to
            ));
        }
        text.push_str(&format!("  intent:     {}\n", hex::encode(&w.intent_hash)));
        text.push_str(&format!(
            "  policy:     version {} {}\n",
            decision.policy_version, decision.policy_hash
        ));
        if !decision.rule.is_empty() {
            text.push_str(&format!("  rule:       {}\n", decision.rule));
        }
        if !decision.reason.is_empty() {
            text.push_str(&format!(
                "  reason:     {} [{}]\n",
                decision.reason, decision.reason_code
            ));
        }
        for q in &decision.missing_quorum {
            text.push_str(&format!("  waiting:    {} more from {}\n", q.min, q.group));
        }
        for v in &w.votes {
            text.push_str(&format!("  vote:       {} {}\n", v.approver, v.vote));
        }
        if let Some(signed) = &w.signed_transaction {
            let forms = SignedForms::of(&intent.network, signed);
            text.push_str(&format!(
                "  {:<11} {}\n  signed tx:  {}\n",
                format!("{}:", forms.hash_label),
                forms.hash,
                forms.raw
            ));
        }
    }
    emit(json, value, &text)
}
