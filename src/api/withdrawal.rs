//! `custos.v1.WithdrawalService` and `custos.v1.ApprovalService`: request
//! conversion and the service implementations over [`Custody`].

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use super::transaction::TxSource;
use super::{FieldViolation, custody_status, paging, reason, status};
use crate::access::Principal;
use crate::custody::{Custody, CustodyError, NewWithdrawal, RequestId, WithdrawalView};
use crate::proto::{
    self, approval_service_server::ApprovalService, withdrawal_service_server::WithdrawalService,
};
use crate::wallet::WalletId;
use custos_core::chain::Chain;
use custos_core::lifecycle::State;
use custos_core::policy::document::is_identifier;

/// Longest approval or governance message accepted, in bytes. Real ones are
/// under 400; anything larger is refused before parsing.
pub const MAX_SIGNED_MESSAGE_BYTES: usize = 512;

impl TryFrom<proto::CreateWithdrawalRequest> for NewWithdrawal {
    type Error = FieldViolation;

    fn try_from(request: proto::CreateWithdrawalRequest) -> Result<Self, FieldViolation> {
        let request_id =
            RequestId::parse(&request.request_id).map_err(|e| FieldViolation::new("request_id", e))?;
        let wallet =
            WalletId::from_resource_name(&request.wallet).map_err(|e| FieldViolation::new("wallet", e.0))?;
        if !is_identifier(&request.initiator) {
            return Err(FieldViolation::new(
                "initiator",
                "must be 1 to 64 characters of [A-Za-z0-9-_.:/]",
            ));
        }
        let transaction = super::transaction::unsigned_tx(request.transaction)?;
        Ok(Self {
            request_id,
            wallet,
            transaction,
            initiator: request.initiator,
        })
    }
}

/// Parses `withdrawals/{withdrawal_id}`.
pub fn withdrawal_id(name: &str) -> Result<String, FieldViolation> {
    let id = name
        .strip_prefix("withdrawals/")
        .ok_or_else(|| FieldViolation::new("name", "must have the form withdrawals/{withdrawal_id}"))?;
    let valid = id.len() == 35
        && id.starts_with("wd_")
        && id[3..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !valid {
        return Err(FieldViolation::new(
            "name",
            "withdrawal ids are wd_ and 32 lower-case hex digits",
        ));
    }
    Ok(id.to_owned())
}

/// Parses a `WithdrawalState` filter; unspecified means every state.
pub fn state_filter(state: i32) -> Result<Option<State>, FieldViolation> {
    use proto::WithdrawalState as S;
    Ok(match S::try_from(state) {
        Ok(S::Unspecified) => None,
        Ok(S::PendingApproval) => Some(State::PendingApproval),
        Ok(S::Approved) => Some(State::Approved),
        Ok(S::Signed) => Some(State::Signed),
        Ok(S::Denied) => Some(State::Denied),
        Ok(S::Rejected) => Some(State::Rejected),
        Ok(S::Expired) => Some(State::Expired),
        Ok(S::Cancelled) => Some(State::Cancelled),
        Err(_) => return Err(FieldViolation::new("state", "is not a WithdrawalState")),
    })
}

fn state_proto(state: State) -> proto::WithdrawalState {
    use proto::WithdrawalState as S;
    match state {
        State::PendingApproval => S::PendingApproval,
        State::Approved => S::Approved,
        State::Signed => S::Signed,
        State::Denied => S::Denied,
        State::Rejected => S::Rejected,
        State::Expired => S::Expired,
        State::Cancelled => S::Cancelled,
    }
}

/// A signed message and signature from the wire, size-checked.
pub fn signed_message(
    field: &str,
    message: Vec<u8>,
    signature: Vec<u8>,
) -> Result<(Vec<u8>, Vec<u8>), FieldViolation> {
    if message.is_empty() || message.len() > MAX_SIGNED_MESSAGE_BYTES {
        return Err(FieldViolation::new(
            format!("{field}.message"),
            "must be 1 to 512 bytes",
        ));
    }
    if signature.len() != 64 {
        return Err(FieldViolation::new(
            format!("{field}.signature"),
            "must be 64 bytes of r || s",
        ));
    }
    Ok((message, signature))
}

pub(super) fn timestamp(seconds: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: i64::try_from(seconds).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

impl From<&WithdrawalView> for proto::Withdrawal {
    fn from(view: &WithdrawalView) -> Self {
        let row = &view.row;
        let intent = &row.intent;
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let transaction = match row.chain {
            Chain::Ethereum => proto::unsigned_transaction::Kind::Ethereum(proto::EthereumTransaction {
                encoding: Some(proto::ethereum_transaction::Encoding::Rlp(
                    row.unsigned_tx.clone(),
                )),
            }),
            Chain::Bitcoin => proto::unsigned_transaction::Kind::Bitcoin(proto::BitcoinTransaction {
                psbt: row.unsigned_tx.clone(),
            }),
        };
        let max_fee = match intent["fee"]["kind"].as_str() {
            Some("ethereum") => text(&intent["fee"]["max_total_fee"]),
            _ => text(&intent["fee"]["fee"]),
        };
        let decision = &row.decision;
        proto::Withdrawal {
            name: format!("withdrawals/{}", row.withdrawal_id),
            request_id: row.request_id.clone(),
            wallet: format!("wallets/{}", row.wallet_id),
            initiator: row.initiator.clone(),
            state: state_proto(row.state).into(),
            transaction: Some(proto::UnsignedTransaction {
                kind: Some(transaction),
            }),
            intent: Some(proto::Intent {
                network: text(&intent["network"]),
                asset: text(&intent["asset"]["symbol"]),
                asset_contract: text(&intent["asset"]["contract"]),
                decimals: intent["asset"]["decimals"]
                    .as_u64()
                    .and_then(|d| u32::try_from(d).ok())
                    .unwrap_or(0),
                from: text(&intent["from"]),
                destinations: intent["destinations"]
                    .as_array()
                    .map(|all| {
                        all.iter()
                            .map(|d| proto::Destination {
                                to: text(&d["to"]),
                                amount: text(&d["amount"]),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                total_amount: row.amount.clone(),
                max_fee,
                json: row.intent.to_string(),
            }),
            intent_hash: row.intent_hash.to_vec(),
            decision: Some(proto::Decision {
                policy_hash: decision.policy_hash_hex(),
                policy_version: decision.policy_version,
                rule: decision.rule.clone().unwrap_or_default(),
                reason_code: decision.reason_code.clone().unwrap_or_default(),
                reason: decision.reason.clone().unwrap_or_default(),
                missing_quorum: decision
                    .missing_quorum
                    .iter()
                    .map(|(group, min)| proto::QuorumRequirement {
                        group: group.clone(),
                        min: u32::try_from(*min).unwrap_or(u32::MAX),
                    })
                    .collect(),
                counted_approvers: decision.counted_approvers.clone(),
            }),
            votes: view
                .approvals
                .iter()
                .map(|a| proto::Vote {
                    approver: a.approver.clone(),
                    vote: a.vote.clone(),
                    message: a.message.clone(),
                    signature: a.signature.clone(),
                    submit_time: timestamp(a.submitted_at),
                })
                .collect(),
            signed_transaction: row.signed_tx.as_ref().map(|raw| proto::SignedTransaction {
                raw: raw.clone(),
                hash: row.signed_tx_hash.clone().unwrap_or_default(),
            }),
            create_time: timestamp(row.created_at),
            update_time: timestamp(row.updated_at),
            expire_time: timestamp(row.expires_at),
        }
    }
}

/// The WithdrawalService implementation.
#[derive(Debug, Clone)]
pub struct WithdrawalApi {
    custody: Arc<Custody>,
}

impl WithdrawalApi {
    /// Serves `custody`.
    pub fn new(custody: Arc<Custody>) -> Self {
        Self { custody }
    }
}

fn reply(view: Result<WithdrawalView, CustodyError>) -> Result<Response<proto::Withdrawal>, Status> {
    view.map(|v| Response::new((&v).into()))
        .map_err(|e| custody_status(&e))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::Withdrawal, Status>> + Send>>;

#[tonic::async_trait]
impl WithdrawalService for WithdrawalApi {
    async fn create_withdrawal(
        &self,
        request: Request<proto::CreateWithdrawalRequest>,
    ) -> Result<Response<proto::Withdrawal>, Status> {
        let request = request.into_inner();
        let source = TxSource::of(request.transaction.as_ref());
        let new = NewWithdrawal::try_from(request)?;
        match self.custody.create(new).await {
            Err(CustodyError::Transaction(refusal)) => Err(source.violation(refusal).into()),
            outcome => reply(outcome),
        }
    }

    async fn get_withdrawal(
        &self,
        request: Request<proto::GetWithdrawalRequest>,
    ) -> Result<Response<proto::Withdrawal>, Status> {
        let id = withdrawal_id(&request.into_inner().name)?;
        reply(self.custody.get(&id).await)
    }

    async fn list_withdrawals(
        &self,
        request: Request<proto::ListWithdrawalsRequest>,
    ) -> Result<Response<proto::ListWithdrawalsResponse>, Status> {
        let request = request.into_inner();
        let (after, limit) = paging(request.page_size, &request.page_token)?;
        let state = state_filter(request.state)?;
        let page = self
            .custody
            .list(state, after, limit)
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(proto::ListWithdrawalsResponse {
            withdrawals: page.withdrawals.iter().map(proto::Withdrawal::from).collect(),
            next_page_token: page.next_after.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    type WatchWithdrawalStream = WatchStream;

    async fn watch_withdrawal(
        &self,
        request: Request<proto::WatchWithdrawalRequest>,
    ) -> Result<Response<Self::WatchWithdrawalStream>, Status> {
        let id = withdrawal_id(&request.into_inner().name)?;
        // Subscribe before the first read, so no change between them is missed.
        let mut updates = self.custody.subscribe();
        let first = self.custody.get(&id).await.map_err(|e| custody_status(&e))?;
        let custody = Arc::clone(&self.custody);
        let stream = async_stream(move |sender| async move {
            let seen = |v: &WithdrawalView| (v.row.state, v.row.updated_at, v.approvals.len());
            let mut last = seen(&first);
            if sender.send(Ok((&first).into())).await.is_err() || first.row.state.is_terminal() {
                return;
            }
            loop {
                match updates.recv().await {
                    Ok(changed) if changed != id => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
                let view = match custody.get(&id).await {
                    Ok(view) => view,
                    Err(e) => {
                        let _ = sender.send(Err(custody_status(&e))).await;
                        return;
                    }
                };
                if seen(&view) == last {
                    continue;
                }
                last = seen(&view);
                if sender.send(Ok((&view).into())).await.is_err() || view.row.state.is_terminal() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_withdrawal(
        &self,
        request: Request<proto::CancelWithdrawalRequest>,
    ) -> Result<Response<proto::Withdrawal>, Status> {
        let id = withdrawal_id(&request.into_inner().name)?;
        reply(self.custody.cancel(&id).await)
    }
}

/// A stream fed by a task through a bounded channel; the task stops when the
/// client goes away (its sends fail).
fn async_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<proto::Withdrawal, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(sender));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

/// The ApprovalService implementation.
#[derive(Debug, Clone)]
pub struct ApprovalApi {
    custody: Arc<Custody>,
}

impl ApprovalApi {
    /// Serves `custody`.
    pub fn new(custody: Arc<Custody>) -> Self {
        Self { custody }
    }
}

#[tonic::async_trait]
impl ApprovalService for ApprovalApi {
    async fn list_pending_approvals(
        &self,
        request: Request<proto::ListPendingApprovalsRequest>,
    ) -> Result<Response<proto::ListPendingApprovalsResponse>, Status> {
        let request = request.into_inner();
        let (after, limit) = paging(request.page_size, &request.page_token)?;
        let page = self
            .custody
            .list(Some(State::PendingApproval), after, limit)
            .await
            .map_err(|e| custody_status(&e))?;
        let governance = self
            .custody
            .governance(None)
            .await
            .map_err(|e| custody_status(&e))?;
        Ok(Response::new(proto::ListPendingApprovalsResponse {
            withdrawals: page.withdrawals.iter().map(proto::Withdrawal::from).collect(),
            next_page_token: page.next_after.map(|n| n.to_string()).unwrap_or_default(),
            policy_hash: governance
                .policy
                .map(|p| hex::encode(p.policy.hash))
                .unwrap_or_default(),
            service_id: self.custody.service_id().to_owned(),
        }))
    }

    async fn submit_approval(
        &self,
        request: Request<proto::SubmitApprovalRequest>,
    ) -> Result<Response<proto::Withdrawal>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        let (message, signature) = signed_message("", request.message, request.signature)
            .map_err(|v| FieldViolation::new(v.field.trim_start_matches('.'), v.description))?;
        // The certificate binds the approver: an approver's client cannot
        // submit a vote signed with someone else's key, even one it holds.
        // A message that does not parse is refused by the custody engine,
        // with its precise reason.
        if let Ok(parsed) = custos_core::approval::ApprovalMessage::parse(&message) {
            let Some(principal) = principal else {
                return Err(status(
                    Code::Unauthenticated,
                    reason::NOT_AUTHORIZED,
                    "no authenticated caller",
                ));
            };
            if !principal.may_approve_as(&parsed.approver) {
                tracing::warn!(caller = %principal.name(), approver = %parsed.approver, "approval for another approver refused");
                return Err(status(
                    Code::PermissionDenied,
                    reason::NOT_AUTHORIZED,
                    format!(
                        "{} may not submit approvals for approver {:?}",
                        principal.name(),
                        parsed.approver
                    ),
                ));
            }
        }
        reply(self.custody.submit_approval(message, signature).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_names_each_bad_field() {
        let good = || proto::CreateWithdrawalRequest {
            request_id: "req-1".into(),
            wallet: "wallets/hot".into(),
            transaction: None,
            initiator: "backend".into(),
        };
        for (edit, field) in [
            (
                Box::new(|r: &mut proto::CreateWithdrawalRequest| r.request_id = String::new())
                    as Box<dyn Fn(&mut proto::CreateWithdrawalRequest)>,
                "request_id",
            ),
            (Box::new(|r| r.request_id = "a b".into()), "request_id"),
            (Box::new(|r| r.wallet = "hot".into()), "wallet"),
            (Box::new(|r| r.initiator = String::new()), "initiator"),
            (Box::new(|r| r.initiator = "x y".into()), "initiator"),
            (Box::new(|_| {}), "transaction"),
        ] {
            let mut request = good();
            edit(&mut request);
            assert_eq!(NewWithdrawal::try_from(request).unwrap_err().field, field);
        }
    }

    #[test]
    fn withdrawal_names_are_strict() {
        let id = format!("wd_{}", "0a".repeat(16));
        assert_eq!(withdrawal_id(&format!("withdrawals/{id}")).unwrap(), id);
        for bad in [
            "",
            "withdrawals/",
            "wd_00",
            &format!("withdrawals/{}", id.to_uppercase()),
        ] {
            assert!(withdrawal_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signed_messages_are_bounded() {
        assert!(signed_message("x", vec![1; 513], vec![0; 64]).is_err());
        assert!(signed_message("x", vec![1; 10], vec![0; 65]).is_err());
        assert!(signed_message("x", vec![], vec![0; 64]).is_err());
        assert!(signed_message("x", vec![1; 10], vec![0; 64]).is_ok());
    }
}
