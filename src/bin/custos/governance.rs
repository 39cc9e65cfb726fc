//! Policy, freeze and unfreeze commands. Every change is signed locally with
//! the admin's or security officer's own key over a governance message
//! (docs/approval-format.md); the server checks the signatures, not the caller.

use std::path::PathBuf;

use clap::Subcommand;

use super::custody::SignerArgs;
use super::{connect, describe, emit};
use custos::clock::unix_now as now;
use custos::proto::{self, policy_service_client::PolicyServiceClient};
use custos_core::governance::{GovernanceAction, GovernanceMessage};
use custos_core::policy::{Policy, policy_hash};

/// Policy commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the active policy (or one version) and the freeze state.
    Show {
        /// A version; default the active one.
        #[arg(long)]
        version: Option<u64>,
        /// Print the document itself.
        #[arg(long)]
        document: bool,
    },
    /// Propose a new policy version. It does nothing until admins sign it.
    Propose {
        /// The policy document (TOML, docs/policy.md).
        file: PathBuf,
    },
    /// Sign a proposed policy as an admin and submit the signature. The hash
    /// signed is computed here from the document you review.
    Sign {
        /// The proposed policy document.
        file: PathBuf,
        /// Your admin id in the active policy.
        #[arg(long)]
        admin: String,
        #[command(flatten)]
        signer: SignerArgs,
        /// How long the signature stays valid, in seconds.
        #[arg(long, default_value_t = 86_400)]
        valid_for: u64,
    },
}

/// Freeze.
#[derive(Debug, clap::Args)]
pub struct FreezeArgs {
    /// Your id (a security officer of the active policy).
    #[arg(long)]
    officer: String,
    #[command(flatten)]
    signer: SignerArgs,
}

/// Unfreeze.
#[derive(Debug, clap::Args)]
pub struct UnfreezeArgs {
    /// An admin and their key file, as ID=FILE; repeat up to the admin quorum.
    #[arg(long = "admin", value_name = "ID=FILE", required = true)]
    admins: Vec<String>,
}

async fn state(
    client: &mut PolicyServiceClient<tonic::transport::Channel>,
) -> Result<proto::PolicyState, String> {
    Ok(client
        .get_policy(proto::GetPolicyRequest { version: 0 })
        .await
        .map_err(describe)?
        .into_inner())
}

/// Signs, as `admin`, the activation of `document` as `version` (valid for
/// `valid_for` seconds) with `sign`, and submits it; returns the proposal.
pub(crate) async fn sign_activation(
    client: &mut PolicyServiceClient<tonic::transport::Channel>,
    document: &[u8],
    version: u64,
    admin: String,
    valid_for: u64,
    sign: impl FnOnce(&[u8; 32]) -> Result<[u8; 64], String>,
) -> Result<proto::PolicyProposal, String> {
    let current = state(client).await?;
    let message = GovernanceMessage {
        service_id: current.service_id,
        action: GovernanceAction::ActivatePolicy,
        sequence: version,
        subject: policy_hash(document),
        expires_at: now().saturating_add(valid_for),
        signer: admin,
    };
    let signature = sign(&message.digest())?;
    Ok(client
        .approve_policy(proto::ApprovePolicyRequest {
            approval: Some(proto::SignedMessage {
                message: message.encode(),
                signature: signature.to_vec(),
            }),
        })
        .await
        .map_err(describe)?
        .into_inner())
}

fn show_state(s: &proto::PolicyState, with_document: bool, json: bool) -> Result<(), String> {
    let value = serde_json::json!({
        "version": s.version,
        "hash": s.hash,
        "active_version": s.active_version,
        "frozen": s.frozen,
        "freeze_epoch": s.freeze_epoch,
        "service_id": s.service_id,
        "signatures": s.signatures.len(),
        "document": with_document.then(|| String::from_utf8_lossy(&s.document).into_owned()),
    });
    let mut text = format!(
        "policy version {} ({})\n  active version: {}\n  frozen:         {}\n  freeze epoch:   {}\n  service id:     {}\n  admin signatures: {}\n",
        s.version,
        s.hash,
        s.active_version,
        s.frozen,
        s.freeze_epoch,
        s.service_id,
        s.signatures.len()
    );
    if with_document {
        text.push_str(&String::from_utf8_lossy(&s.document));
    }
    emit(json, &value, &text)
}

fn show_proposal(p: &proto::PolicyProposal, json: bool) -> Result<(), String> {
    let value = serde_json::json!({
        "version": p.version,
        "hash": p.hash,
        "signers": p.signers,
        "required": p.required,
        "activated": p.activated,
    });
    let text = format!(
        "policy version {} ({})\n  admin signatures: {} of {} ({})\n  active:           {}\n",
        p.version,
        p.hash,
        p.signers.len(),
        p.required,
        p.signers.join(", "),
        p.activated
    );
    emit(json, &value, &text)
}

pub async fn policy(command: PolicyCommand, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let mut client = PolicyServiceClient::new(connect(server).await?);
    match command {
        PolicyCommand::Show { version, document } => {
            let s = client
                .get_policy(proto::GetPolicyRequest {
                    version: version.unwrap_or(0),
                })
                .await
                .map_err(describe)?
                .into_inner();
            show_state(&s, document, json)
        }
        PolicyCommand::Propose { file } => {
            let document = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            Policy::parse(&document).map_err(|e| format!("{}: {e}", file.display()))?;
            let p = client
                .propose_policy(proto::ProposePolicyRequest { document })
                .await
                .map_err(describe)?
                .into_inner();
            show_proposal(&p, json)
        }
        PolicyCommand::Sign {
            file,
            admin,
            signer,
            valid_for,
        } => {
            let document = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let policy = Policy::parse(&document).map_err(|e| format!("{}: {e}", file.display()))?;
            let p = sign_activation(
                &mut client,
                &document,
                policy.version,
                admin,
                valid_for,
                |digest| signer.sign(digest),
            )
            .await?;
            show_proposal(&p, json)
        }
    }
}

pub async fn freeze(args: FreezeArgs, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let mut client = PolicyServiceClient::new(connect(server).await?);
    let current = state(&mut client).await?;
    let message = GovernanceMessage {
        service_id: current.service_id,
        action: GovernanceAction::Freeze,
        sequence: current.freeze_epoch,
        subject: [0; 32],
        expires_at: now().saturating_add(600),
        signer: args.officer,
    };
    let signature = args.signer.sign(&message.digest())?;
    let s = client
        .freeze(proto::FreezeRequest {
            freeze: Some(proto::SignedMessage {
                message: message.encode(),
                signature: signature.to_vec(),
            }),
        })
        .await
        .map_err(describe)?
        .into_inner();
    show_state(&s, false, json)
}

pub async fn unfreeze(args: UnfreezeArgs, server: &crate::ServerArgs, json: bool) -> Result<(), String> {
    let mut client = PolicyServiceClient::new(connect(server).await?);
    let current = state(&mut client).await?;
    let mut signatures = Vec::new();
    for pair in &args.admins {
        let (admin, file) = pair
            .split_once('=')
            .ok_or_else(|| format!("--admin {pair:?}: expected ID=FILE"))?;
        let key = custos::signer::KeyFile::load(std::path::Path::new(file)).map_err(|e| e.to_string())?;
        let message = GovernanceMessage {
            service_id: current.service_id.clone(),
            action: GovernanceAction::Unfreeze,
            sequence: current.freeze_epoch,
            subject: [0; 32],
            expires_at: now().saturating_add(600),
            signer: admin.to_owned(),
        };
        let signature = key.sign_prehash(&message.digest()).map_err(|e| e.to_string())?;
        signatures.push(proto::SignedMessage {
            message: message.encode(),
            signature: signature.to_vec(),
        });
    }
    let s = client
        .unfreeze(proto::UnfreezeRequest { signatures })
        .await
        .map_err(describe)?
        .into_inner();
    show_state(&s, false, json)
}
