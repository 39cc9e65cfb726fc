//! `custos`: the command-line client for admins, approvers and backends.
//!
//! `main` holds the command tree and shared output helpers; `custody` the
//! withdrawal and approval commands (including the approver's local
//! recomputation of the intent hash); `governance` policy, freeze and
//! unfreeze, signed with the admin's or security officer's own key; `audit`
//! the auditor's key, export and verify commands; `store` the operator's
//! direct work on a store's database.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod audit;
mod bench;
mod custody;
mod governance;
mod raw_bench;
mod store;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use custos::config::parse_bitcoin_network;
use custos::proto::{self, wallet_service_client::WalletServiceClient};
use custos_core::chain::ethereum::{self, EthereumNetwork, Token};
use custos_core::chain::units;
use custos_core::chain::{FeeTerms, Intent, bitcoin as btc};

/// The custos command-line client.
#[derive(Debug, Parser)]
#[command(name = "custos", version, about)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and inspect wallets (admin).
    #[command(subcommand)]
    Wallet(WalletCommand),
    /// Decode an unsigned transaction locally and print its intent and intent
    /// hash, exactly as custos derives them. Needs no server: approvers use it
    /// to check what they are asked to approve.
    #[command(subcommand)]
    Intent(IntentCommand),
    /// Submit and follow withdrawals (backend).
    #[command(subcommand)]
    Withdrawal(custody::WithdrawalCommand),
    /// List withdrawals waiting for approvals (approver).
    Pending,
    /// Approve a withdrawal: fetch it, recompute its intent hash locally from
    /// the transaction, show it, sign the approval with your own key, submit.
    Approve(custody::VoteArgs),
    /// Reject a withdrawal, signed like an approval.
    Reject(custody::VoteArgs),
    /// Approver keys.
    #[command(subcommand)]
    Approver(custody::ApproverCommand),
    /// Show, propose and co-sign policy versions (admin).
    #[command(subcommand)]
    Policy(governance::PolicyCommand),
    /// Freeze all signing at once (one security officer).
    Freeze(governance::FreezeArgs),
    /// Lift a freeze (the admin quorum).
    Unfreeze(governance::UnfreezeArgs),
    /// Read, export and verify the signed audit log (auditor).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Measure custos against the HSM: raw C_Sign, the auto path and the
    /// quorum path, on a fresh `custosd --dev` (docs/performance.md).
    Bench(bench::BenchArgs),
    /// Operate on a store's database directly (operator), e.g. move a
    /// SQLite store to PostgreSQL.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// The raw C_Sign measurement of `bench`, run as its child process.
    #[command(hide = true)]
    BenchRawSign(bench::RawSignArgs),
}

#[derive(Debug, Subcommand)]
enum IntentCommand {
    /// An unsigned Ethereum transaction (EIP-1559 or legacy EIP-155).
    Ethereum {
        /// The canonical unsigned encoding, hex (0x optional).
        #[arg(long)]
        rlp: String,
        /// The wallet's network (EIP-155 chain id).
        #[arg(long)]
        chain_id: u64,
        /// The wallet's address.
        #[arg(long)]
        from: String,
        /// A registered token, as SYMBOL:CONTRACT:DECIMALS (repeatable).
        #[arg(long = "token", value_name = "SYMBOL:CONTRACT:DECIMALS")]
        tokens: Vec<String>,
    },
    /// An unsigned Bitcoin PSBT spending a P2WPKH wallet.
    Bitcoin {
        /// The PSBT, base64 (as Bitcoin Core prints it) or hex.
        #[arg(long)]
        psbt: String,
        /// bitcoin, testnet, signet or regtest.
        #[arg(long)]
        network: String,
        /// The wallet's compressed public key, hex.
        #[arg(long)]
        wallet_public_key: String,
    },
}

#[derive(Debug, Subcommand)]
enum WalletCommand {
    /// Generate a new wallet key inside the HSM and print its addresses.
    Create {
        /// Wallet id: lower-case letters, digits and '-', starting with a letter.
        wallet_id: String,
        /// Display name for people.
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Show one wallet.
    Get {
        /// Wallet id.
        wallet_id: String,
    },
    /// List all wallets.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("tokio runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "custos: error: {message}");
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<(), String> {
    let (server, json) = (&cli.server, cli.json);
    match cli.command {
        Command::Intent(command) => print_intent(&decode_intent(&command)?, json),
        Command::Wallet(command) => wallet(command, server, json).await,
        Command::Withdrawal(command) => custody::withdrawal(command, server, json).await,
        Command::Pending => custody::pending(server, json).await,
        Command::Approve(args) => custody::vote(args, custos_core::policy::Vote::Approve, server, json).await,
        Command::Reject(args) => custody::vote(args, custos_core::policy::Vote::Reject, server, json).await,
        Command::Approver(command) => custody::approver(command, json),
        Command::Policy(command) => governance::policy(command, server, json).await,
        Command::Freeze(args) => governance::freeze(args, server, json).await,
        Command::Unfreeze(args) => governance::unfreeze(args, server, json).await,
        Command::Audit(command) => audit::audit(command, server, json).await,
        Command::Bench(args) => bench::bench(args, json).await,
        Command::Store(command) => store::store(command, json).await,
        Command::BenchRawSign(args) => bench::raw_sign(args),
    }
}

/// Writes `text` (or `value` with `--json`) to stdout.
fn emit(json: bool, value: &serde_json::Value, text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let result = if json {
        writeln!(out, "{value}")
    } else {
        write!(out, "{text}")
    };
    result.map_err(|e| format!("writing output: {e}"))
}

async fn wallet(command: WalletCommand, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let channel = connect(server).await?;
    let mut wallets = WalletServiceClient::new(channel);
    let list = matches!(command, WalletCommand::List);
    let shown: Vec<proto::Wallet> = match command {
        WalletCommand::Create {
            wallet_id,
            display_name,
        } => {
            let request = proto::CreateWalletRequest {
                wallet_id,
                wallet: Some(proto::Wallet {
                    display_name,
                    ..Default::default()
                }),
            };
            vec![
                wallets
                    .create_wallet(request)
                    .await
                    .map_err(describe)?
                    .into_inner(),
            ]
        }
        WalletCommand::Get { wallet_id } => {
            let request = proto::GetWalletRequest {
                name: format!("wallets/{wallet_id}"),
            };
            vec![wallets.get_wallet(request).await.map_err(describe)?.into_inner()]
        }
        WalletCommand::List => {
            all_pages(|page_token| {
                let mut wallets = wallets.clone();
                async move {
                    let page = wallets
                        .list_wallets(proto::ListWalletsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.wallets, page.next_page_token))
                }
            })
            .await?
        }
    };
    // A list prints an array with --json, whatever its length; the other
    // commands print one object.
    print_wallets(&shown, json, list)
}

/// Fetches every page of a List RPC: `page` takes a page token and returns
/// the page's items and the next token, empty after the last page.
pub(crate) async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, String>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await.map_err(describe)?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// How to reach custosd: its endpoint and, for `https://`, this client's
/// mTLS files.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerArgs {
    /// custosd endpoint: `https://` (mTLS) or, for a server started with
    /// --insecure-plaintext, `http://`.
    #[arg(
        long = "server",
        global = true,
        env = "CUSTOS_SERVER",
        default_value = "https://127.0.0.1:50051"
    )]
    endpoint: String,
    /// CA certificate custosd's certificate must chain to (PEM).
    #[arg(long = "tls-ca", global = true, env = "CUSTOS_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM); its SAN is the identity custosd maps to roles.
    #[arg(
        long = "tls-cert",
        global = true,
        env = "CUSTOS_TLS_CERT",
        value_name = "FILE"
    )]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long = "tls-key", global = true, env = "CUSTOS_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

/// A client's mTLS files.
#[derive(Debug, Clone)]
pub(crate) struct ClientFiles {
    /// The CA to trust for the server.
    pub(crate) ca: PathBuf,
    /// The client certificate.
    pub(crate) cert: PathBuf,
    /// The client key.
    pub(crate) key: PathBuf,
}

impl std::fmt::Display for ServerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.endpoint)
    }
}

pub(crate) async fn connect(server: &ServerArgs) -> Result<Channel, String> {
    let files = match (&server.tls_ca, &server.tls_cert, &server.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(ClientFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None) => None,
        _ => return Err("--tls-ca, --tls-cert and --tls-key go together".into()),
    };
    connect_to(&server.endpoint, files.as_ref()).await
}

/// Connects to `endpoint`, with mTLS when it is `https://`.
pub(crate) async fn connect_to(endpoint: &str, tls: Option<&ClientFiles>) -> Result<Channel, String> {
    let mut builder = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| format!("invalid --server {endpoint:?}: {e}"))?;
    if endpoint.starts_with("https://") {
        let files = tls.ok_or(
            "an https:// server needs --tls-ca, --tls-cert and --tls-key (or CUSTOS_TLS_CA, CUSTOS_TLS_CERT, CUSTOS_TLS_KEY); custosd --dev writes them under <data-dir>/tls/",
        )?;
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map(zeroize::Zeroizing::new)
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        let config = custos::tls::client_tls(&read(&files.ca)?, &read(&files.cert)?, &read(&files.key)?);
        builder = builder
            .tls_config(config)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    builder
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

/// The status message plus its stable reason and any field violations.
pub(crate) fn describe(status: tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(info) = status.get_details_error_info() {
        text.push_str(&format!(" [{}]", info.reason));
    }
    if let Some(bad) = status.get_details_bad_request() {
        for v in bad.field_violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    text
}

fn print_wallets(wallets: &[proto::Wallet], json: bool, list: bool) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let result = if json {
        let mut values: Vec<serde_json::Value> = wallets.iter().map(wallet_json).collect();
        let value = match (list, values.pop()) {
            (false, Some(one)) if values.is_empty() => one,
            (false, _) => return Err("internal: expected exactly one wallet".into()),
            (true, last) => {
                values.extend(last);
                serde_json::Value::Array(values)
            }
        };
        writeln!(out, "{value}")
    } else {
        wallets.iter().try_for_each(|w| {
            let attrs = w.key_attributes.unwrap_or_default();
            writeln!(
                out,
                "{}\n  display name:      {}\n  HSM key label:     {}\n  public key:        {}\n  Ethereum address:  {}\n  Bitcoin address:   {}\n  key attributes:    sensitive={} extractable={} always_sensitive={} never_extractable={}",
                w.name,
                w.display_name,
                w.key_label,
                hex::encode(&w.public_key),
                w.ethereum_address,
                w.bitcoin_address,
                attrs.sensitive,
                attrs.extractable,
                attrs.always_sensitive,
                attrs.never_extractable,
            )
        })
    };
    result.map_err(|e| format!("writing output: {e}"))
}

fn wallet_json(w: &proto::Wallet) -> serde_json::Value {
    let attrs = w.key_attributes.unwrap_or_default();
    serde_json::json!({
        "name": w.name,
        "display_name": w.display_name,
        "key_label": w.key_label,
        "public_key": hex::encode(&w.public_key),
        "ethereum_address": w.ethereum_address,
        "bitcoin_address": w.bitcoin_address,
        "key_attributes": {
            "token": attrs.token,
            "private": attrs.private,
            "sensitive": attrs.sensitive,
            "extractable": attrs.extractable,
            "always_sensitive": attrs.always_sensitive,
            "never_extractable": attrs.never_extractable,
        },
        "create_time": w.create_time.map(|t| t.seconds),
    })
}

fn decode_intent(command: &IntentCommand) -> Result<Intent, String> {
    match command {
        IntentCommand::Ethereum {
            rlp,
            chain_id,
            from,
            tokens,
        } => {
            let bytes =
                hex::decode(rlp.trim().trim_start_matches("0x")).map_err(|e| format!("--rlp: {e}"))?;
            let from = units::address(from).map_err(|e| format!("--from {e}"))?;
            let tokens = tokens.iter().map(|t| token(t)).collect::<Result<Vec<_>, _>>()?;
            let network = EthereumNetwork {
                chain_id: *chain_id,
                tokens,
            };
            let tx = ethereum::decode_unsigned(&bytes).map_err(|e| e.to_string())?;
            Ok(ethereum::parse(tx, &network, from)
                .map_err(|e| e.to_string())?
                .intent()
                .clone())
        }
        IntentCommand::Bitcoin {
            psbt,
            network,
            wallet_public_key,
        } => {
            let network = parse_bitcoin_network(network).map_err(|e| e.to_string())?;
            let key: ::bitcoin::CompressedPublicKey = wallet_public_key
                .parse()
                .map_err(|e| format!("--wallet-public-key: {e}"))?;
            let text = psbt.trim();
            let parsed = match hex::decode(text) {
                Ok(bytes) => btc::decode_psbt(&bytes).map_err(|e| e.to_string())?,
                Err(_) => text
                    .parse::<::bitcoin::psbt::Psbt>()
                    .map_err(|e| format!("--psbt is neither hex nor a base64 PSBT: {e}"))?,
            };
            Ok(btc::parse(parsed, network, &key)
                .map_err(|e| e.to_string())?
                .intent()
                .clone())
        }
    }
}

pub(crate) fn token(text: &str) -> Result<Token, String> {
    let mut parts = text.splitn(3, ':');
    let (Some(symbol), Some(contract), Some(decimals)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("--token {text:?}: expected SYMBOL:CONTRACT:DECIMALS"));
    };
    Ok(Token {
        symbol: symbol.to_owned(),
        contract: units::address(contract).map_err(|e| format!("--token contract {e}"))?,
        decimals: decimals
            .parse()
            .map_err(|_| format!("--token {text:?}: decimals must be 0-255"))?,
    })
}

pub(crate) fn print_intent(intent: &Intent, json: bool) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let hash = hex::encode(intent.hash());
    let result = if json {
        let mut value = intent.to_json();
        value["intent_hash"] = serde_json::Value::String(hash);
        writeln!(out, "{value}")
    } else {
        let mut text = format!(
            "network:      {}\nasset:        {}{}\nfrom:         {}\n",
            intent.network.caip2(),
            intent.asset.symbol,
            intent
                .asset
                .contract
                .as_ref()
                .map(|c| format!(" ({c}, {} decimals)", intent.asset.decimals))
                .unwrap_or_default(),
            intent.from,
        );
        for d in &intent.destinations {
            text.push_str(&format!("pay:          {} base units to {}\n", d.amount, d.to));
        }
        match &intent.fee {
            FeeTerms::Ethereum { nonce, gas_limit, max_fee_per_gas, max_total_fee, .. } => text.push_str(&format!(
                "fee:          at most {max_total_fee} wei ({gas_limit} gas x {max_fee_per_gas} wei), nonce {nonce}\n"
            )),
            FeeTerms::Bitcoin { change, fee, vsize } => text.push_str(&format!(
                "fee:          {fee} sat (at most {vsize} vbytes); change back to the wallet: {change} sat\n"
            )),
        }
        text.push_str(&format!("intent hash:  {hash}\n"));
        write!(out, "{text}")
    };
    result.map_err(|e| format!("writing output: {e}"))
}
