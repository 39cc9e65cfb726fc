//! `custos`: the command-line client for admins (and, in later releases,
//! approvers and auditors).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

use custos::proto::{self, wallet_service_client::WalletServiceClient};

/// The custos command-line client.
#[derive(Debug, Parser)]
#[command(name = "custos", version, about)]
struct Cli {
    /// custosd endpoint.
    #[arg(
        long,
        global = true,
        env = "CUSTOS_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
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
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
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
    let channel = connect(&cli.server).await?;
    let mut wallets = WalletServiceClient::new(channel);
    let shown: Vec<proto::Wallet> = match cli.command {
        Command::Wallet(WalletCommand::Create {
            wallet_id,
            display_name,
        }) => {
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
        Command::Wallet(WalletCommand::Get { wallet_id }) => {
            let request = proto::GetWalletRequest {
                name: format!("wallets/{wallet_id}"),
            };
            vec![wallets.get_wallet(request).await.map_err(describe)?.into_inner()]
        }
        Command::Wallet(WalletCommand::List) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = wallets
                    .list_wallets(proto::ListWalletsRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await
                    .map_err(describe)?
                    .into_inner();
                all.extend(page.wallets);
                if page.next_page_token.is_empty() {
                    break all;
                }
                page_token = page.next_page_token;
            }
        }
    };
    print_wallets(&shown, cli.json)
}

async fn connect(server: &str) -> Result<Channel, String> {
    Endpoint::from_shared(server.to_owned())
        .map_err(|e| format!("invalid --server {server:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))
}

/// The status message plus its stable reason and any field violations.
fn describe(status: tonic::Status) -> String {
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

fn print_wallets(wallets: &[proto::Wallet], json: bool) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let result = if json {
        let values: Vec<serde_json::Value> = wallets.iter().map(wallet_json).collect();
        let value = match values.as_slice() {
            [one] => one.clone(),
            _ => serde_json::Value::Array(values),
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
