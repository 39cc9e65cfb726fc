//! `custos.v1.PolicyService`: request conversion and the service
//! implementation over [`Custody`]'s governance.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::withdrawal::{signed_message, timestamp};
use super::{FieldViolation, custody_status};
use crate::custody::{Custody, GovernanceView, ProposalView};
use crate::proto::{self, policy_service_server::PolicyService};
use custos_core::policy::document::MAX_POLICY_BYTES;

/// The PolicyService implementation.
#[derive(Debug, Clone)]
pub struct PolicyApi {
    custody: Arc<Custody>,
}

impl PolicyApi {
    /// Serves `custody`.
    pub fn new(custody: Arc<Custody>) -> Self {
        Self { custody }
    }

    fn state(&self, view: &GovernanceView) -> proto::PolicyState {
        let policy = view.policy.as_deref();
        proto::PolicyState {
            version: policy.map_or(0, |p| p.policy.version),
            hash: policy.map(|p| hex::encode(p.policy.hash)).unwrap_or_default(),
            document: policy.map(|p| p.document.clone()).unwrap_or_default(),
            activate_time: policy.and_then(|p| timestamp(p.activated_at)),
            signatures: view
                .signatures
                .iter()
                .map(|s| proto::SignedMessage {
                    message: s.message.clone(),
                    signature: s.signature.clone(),
                })
                .collect(),
            active_version: view.active_version.unwrap_or(0),
            frozen: view.frozen,
            freeze_epoch: view.freeze_epoch,
            service_id: self.custody.service_id().to_owned(),
        }
    }
}

fn proposal(view: ProposalView) -> proto::PolicyProposal {
    proto::PolicyProposal {
        version: view.version,
        hash: hex::encode(view.hash),
        signers: view.signers,
        required: u32::try_from(view.required).unwrap_or(u32::MAX),
        activated: view.activated,
    }
}

fn signed(field: &str, message: Option<proto::SignedMessage>) -> Result<(Vec<u8>, Vec<u8>), FieldViolation> {
    let message = message.ok_or_else(|| FieldViolation::new(field, "is required"))?;
    signed_message(field, message.message, message.signature)
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn get_policy(
        &self,
        request: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::PolicyState>, Status> {
        let version = request.into_inner().version;
        let view = self
            .custody
            .governance((version != 0).then_some(version))
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(self.state(&view)))
    }

    async fn propose_policy(
        &self,
        request: Request<proto::ProposePolicyRequest>,
    ) -> Result<Response<proto::PolicyProposal>, Status> {
        let document = request.into_inner().document;
        if document.is_empty() || document.len() > MAX_POLICY_BYTES {
            return Err(FieldViolation::new("document", "must be 1 byte to 256 KiB").into());
        }
        let view = self
            .custody
            .propose_policy(document)
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(proposal(view)))
    }

    async fn approve_policy(
        &self,
        request: Request<proto::ApprovePolicyRequest>,
    ) -> Result<Response<proto::PolicyProposal>, Status> {
        let (message, signature) = signed("approval", request.into_inner().approval)?;
        let view = self
            .custody
            .approve_policy(message, signature)
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(proposal(view)))
    }

    async fn freeze(
        &self,
        request: Request<proto::FreezeRequest>,
    ) -> Result<Response<proto::PolicyState>, Status> {
        let (message, signature) = signed("freeze", request.into_inner().freeze)?;
        let view = self
            .custody
            .freeze(message, signature)
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(self.state(&view)))
    }

    async fn unfreeze(
        &self,
        request: Request<proto::UnfreezeRequest>,
    ) -> Result<Response<proto::PolicyState>, Status> {
        let signatures = request.into_inner().signatures;
        if signatures.is_empty() || signatures.len() > 64 {
            return Err(FieldViolation::new("signatures", "must hold 1 to 64 signed messages").into());
        }
        let signed = signatures
            .into_iter()
            .enumerate()
            .map(|(i, s)| signed_message(&format!("signatures[{i}]"), s.message, s.signature))
            .collect::<Result<Vec<_>, _>>()?;
        let view = self
            .custody
            .unfreeze(signed)
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(self.state(&view)))
    }
}
