//! Withdrawals under the governed policy, end to end over gRPC against the
//! real `custosd --dev` (SoftHSM token, SQLite store, dev genesis policy and
//! dev approver keys): immediate signing, quorum approval, denials naming
//! their rule, approval binding, idempotency and limits under concurrency,
//! governance and freeze, and crashes between approval and signing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_consensus::TxEnvelope;
use alloy_consensus::transaction::SignerRecoverable;
use alloy_eips::eip2718::Decodable2718;
use k256::pkcs8::DecodePrivateKey;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::{self, DevServer};
use custos::proto::{
    self, WithdrawalState, approval_service_client::ApprovalServiceClient,
    policy_service_client::PolicyServiceClient, wallet_service_client::WalletServiceClient,
    withdrawal_service_client::WithdrawalServiceClient,
};
use custos::signer::KeyFile;
use custos_core::approval::ApprovalMessage;
use custos_core::audit::entry::Event;
use custos_core::governance::{GovernanceAction, GovernanceMessage};
use custos_core::policy::{Vote, policy_hash};

pub(crate) const EXCHANGE: &str = custos::dev::DEV_ALLOWLISTED;
pub(crate) const ETHER: u128 = 1_000_000_000_000_000_000;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A client of one dev server, with the dev keys and one mTLS channel per
/// dev client identity.
pub(crate) struct Dev {
    pub(crate) server: DevServer,
    backend: Channel,
    admin: Channel,
    approvers: std::collections::BTreeMap<&'static str, Channel>,
}

impl Dev {
    pub(crate) async fn start() -> Self {
        Self::on(DevServer::start()).await
    }

    pub(crate) async fn on(server: DevServer) -> Self {
        let backend = server.channel_as("backend").await;
        let admin = server.channel_as("admin").await;
        let mut approvers = std::collections::BTreeMap::new();
        for who in ["alice", "bob", "carol"] {
            approvers.insert(who, server.channel_as(who).await);
        }
        Self {
            server,
            backend,
            admin,
            approvers,
        }
    }

    fn key(&self, who: &str) -> KeyFile {
        KeyFile::load(&self.server.data_dir.join("keys").join(format!("{who}.pem"))).unwrap()
    }

    fn withdrawals(&self) -> WithdrawalServiceClient<Channel> {
        WithdrawalServiceClient::new(self.backend.clone())
    }

    /// The approval service as approver `who`.
    fn approvals_as(&self, who: &str) -> ApprovalServiceClient<Channel> {
        ApprovalServiceClient::new(self.approvers[who].clone())
    }

    fn approvals(&self) -> ApprovalServiceClient<Channel> {
        self.approvals_as("alice")
    }

    pub(crate) fn policies(&self) -> PolicyServiceClient<Channel> {
        PolicyServiceClient::new(self.admin.clone())
    }

    pub(crate) async fn create(
        &self,
        request_id: &str,
        to: &str,
        wei: u128,
        nonce: u64,
        initiator: &str,
    ) -> Result<proto::Withdrawal, tonic::Status> {
        self.withdrawals()
            .create_withdrawal(create_request(request_id, to, wei, nonce, initiator))
            .await
            .map(|r| r.into_inner())
    }

    async fn get(&self, w: &proto::Withdrawal) -> proto::Withdrawal {
        self.withdrawals()
            .get_withdrawal(proto::GetWithdrawalRequest { name: w.name.clone() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn policy(&self) -> proto::PolicyState {
        self.policies()
            .get_policy(proto::GetPolicyRequest { version: 0 })
            .await
            .unwrap()
            .into_inner()
    }

    /// An approval message for `w` as a correct approver tool builds it.
    async fn message(&self, w: &proto::Withdrawal, approver: &str, vote: Vote) -> ApprovalMessage {
        let policy = self.policy().await;
        ApprovalMessage {
            service_id: policy.service_id,
            withdrawal_id: w.name.trim_start_matches("withdrawals/").to_owned(),
            intent_hash: w.intent_hash.clone().try_into().unwrap(),
            policy_hash: hex::decode(&policy.hash).unwrap().try_into().unwrap(),
            vote,
            expires_at: now() + 600,
            approver: approver.to_owned(),
        }
    }

    /// Submits over the channel of the approver the message names (alice's
    /// if it names none), so the engine, not the certificate binding, judges
    /// the message and its signature.
    async fn submit(&self, message: Vec<u8>, signature: Vec<u8>) -> Result<proto::Withdrawal, tonic::Status> {
        let approver = ApprovalMessage::parse(&message)
            .ok()
            .map(|m| m.approver)
            .filter(|who| self.approvers.contains_key(who.as_str()))
            .unwrap_or_else(|| "alice".to_owned());
        self.approvals_as(&approver)
            .submit_approval(proto::SubmitApprovalRequest { message, signature })
            .await
            .map(|r| r.into_inner())
    }

    /// Signs `m` with `signer`'s dev key and submits it.
    async fn submit_signed(
        &self,
        m: &ApprovalMessage,
        signer: &str,
    ) -> Result<proto::Withdrawal, tonic::Status> {
        let signature = self.key(signer).sign_prehash(&m.digest()).unwrap();
        self.submit(m.encode(), signature.to_vec()).await
    }

    pub(crate) async fn vote(
        &self,
        w: &proto::Withdrawal,
        approver: &str,
        vote: Vote,
    ) -> Result<proto::Withdrawal, tonic::Status> {
        let m = self.message(w, approver, vote).await;
        self.submit_signed(&m, approver).await
    }

    pub(crate) async fn governance(
        &self,
        action: GovernanceAction,
        sequence: u64,
        subject: [u8; 32],
        signer: &str,
    ) -> proto::SignedMessage {
        let m = GovernanceMessage {
            service_id: self.policy().await.service_id,
            action,
            sequence,
            subject,
            expires_at: now() + 600,
            signer: signer.to_owned(),
        };
        proto::SignedMessage {
            message: m.encode(),
            signature: self.key(signer).sign_prehash(&m.digest()).unwrap().to_vec(),
        }
    }

    /// Freezes custody with the dev security officer's signature over
    /// freeze epoch 0.
    pub(crate) async fn freeze(&self) {
        let freeze = self
            .governance(GovernanceAction::Freeze, 0, [0; 32], "admin")
            .await;
        let frozen = self
            .policies()
            .freeze(proto::FreezeRequest { freeze: Some(freeze) })
            .await
            .unwrap()
            .into_inner();
        assert!(frozen.frozen);
    }

    /// Proposes `document` and signs it with the dev admin key (quorum 1).
    pub(crate) async fn activate(&self, document: &str) -> proto::PolicyProposal {
        let proposal = self
            .policies()
            .propose_policy(proto::ProposePolicyRequest {
                document: document.as_bytes().to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        let approval = self
            .governance(
                GovernanceAction::ActivatePolicy,
                proposal.version,
                policy_hash(document.as_bytes()),
                "admin",
            )
            .await;
        self.policies()
            .approve_policy(proto::ApprovePolicyRequest {
                approval: Some(approval),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub(crate) fn dev_policy(&self) -> String {
        std::fs::read_to_string(self.server.data_dir.join("policy.toml")).unwrap()
    }

    async fn wallet_address(&self) -> String {
        WalletServiceClient::new(self.admin.clone())
            .get_wallet(proto::GetWalletRequest {
                name: "wallets/hot".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .ethereum_address
    }
}

/// A CreateWithdrawal request for an EIP-1559 transfer from the dev wallet.
pub(crate) fn create_request(
    request_id: &str,
    to: &str,
    wei: u128,
    nonce: u64,
    initiator: &str,
) -> proto::CreateWithdrawalRequest {
    custos::dev::transfer_request(request_id, to, wei, nonce, initiator)
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Decodes a SIGNED withdrawal's transaction with alloy and returns its
/// recovered signer.
fn signer_of(w: &proto::Withdrawal) -> String {
    assert_eq!(w.state(), WithdrawalState::Signed, "{w:?}");
    let raw = &w.signed_transaction.as_ref().expect("signed transaction").raw;
    let envelope = TxEnvelope::decode_2718(&mut raw.as_slice()).unwrap();
    envelope.recover_signer().unwrap().to_checksum(None)
}

fn decision(w: &proto::Withdrawal) -> proto::Decision {
    w.decision.clone().unwrap()
}

/// The story: a small allowlisted withdrawal is signed at once; a large one
/// waits for two treasury approvers and is signed; the watch stream follows
/// it; denials name the allowlist, the time-lock and the limit; listing pages
/// and filters.
#[test]
fn small_signed_at_once_large_after_two_approvals_others_denied_with_reasons() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let address = dev.wallet_address().await;

        let small = dev.create("small", EXCHANGE, ETHER / 2, 0, "ops").await.unwrap();
        assert_eq!(decision(&small).rule, "auto-small");
        assert_eq!(signer_of(&small), address);

        let large = dev.create("large", EXCHANGE, 5 * ETHER, 1, "ops").await.unwrap();
        assert_eq!(large.state(), WithdrawalState::PendingApproval);
        assert_eq!(decision(&large).rule, "large-two-treasury");
        assert_eq!(decision(&large).missing_quorum[0].group, "treasury");
        assert_eq!(decision(&large).missing_quorum[0].min, 2);
        assert!(large.signed_transaction.is_none());

        let mut watch = dev
            .withdrawals()
            .watch_withdrawal(proto::WatchWithdrawalRequest {
                name: large.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.state(), WithdrawalState::PendingApproval);

        let after_alice = dev.vote(&large, "alice", Vote::Approve).await.unwrap();
        assert_eq!(after_alice.state(), WithdrawalState::PendingApproval);
        assert_eq!(decision(&after_alice).missing_quorum[0].min, 1);
        let twice = dev.vote(&large, "alice", Vote::Approve).await.unwrap_err();
        assert_eq!(twice.code(), Code::AlreadyExists, "{twice:?}");

        let signed = dev.vote(&large, "bob", Vote::Approve).await.unwrap();
        assert_eq!(signer_of(&signed), address);
        assert_eq!(decision(&signed).counted_approvers, ["alice", "bob"]);

        // The stream saw the vote and the signature, then ended.
        let mut states = Vec::new();
        while let Some(w) = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap()
            .unwrap()
        {
            states.push(w.state());
        }
        assert_eq!(states.last(), Some(&WithdrawalState::Signed), "{states:?}");

        let unknown = dev
            .create(
                "unknown",
                "0x7777777777777777777777777777777777777777",
                ETHER / 10,
                2,
                "ops",
            )
            .await
            .unwrap();
        assert_eq!(unknown.state(), WithdrawalState::Denied);
        assert_eq!(decision(&unknown).reason_code, "not_allowlisted");
        assert!(
            decision(&unknown).reason.contains("allowlist exchanges"),
            "{unknown:?}"
        );

        let locked = dev
            .create("locked", custos::dev::DEV_TIME_LOCKED, ETHER / 10, 3, "ops")
            .await
            .unwrap();
        assert_eq!(locked.state(), WithdrawalState::Denied);
        assert!(
            decision(&locked).reason.contains("time-lock ends at"),
            "{locked:?}"
        );

        let huge = dev.create("huge", EXCHANGE, 101 * ETHER, 4, "ops").await.unwrap();
        assert_eq!(decision(&huge).reason_code, "per_transaction_limit");

        let signed_only = dev
            .withdrawals()
            .list_withdrawals(proto::ListWithdrawalsRequest {
                page_size: 0,
                page_token: String::new(),
                state: WithdrawalState::Signed.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(signed_only.withdrawals.len(), 2);
        let mut names = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = dev
                .withdrawals()
                .list_withdrawals(proto::ListWithdrawalsRequest {
                    page_size: 2,
                    page_token,
                    state: 0,
                })
                .await
                .unwrap()
                .into_inner();
            names.extend(page.withdrawals.into_iter().map(|w| w.name));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        assert_eq!(names.len(), 5);
        assert_eq!(names[0], small.name);

        // Nothing pending remains; cancelling a signed withdrawal is refused.
        let pending = dev
            .approvals()
            .list_pending_approvals(proto::ListPendingApprovalsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(pending.withdrawals.is_empty());
        let cancel = dev
            .withdrawals()
            .cancel_withdrawal(proto::CancelWithdrawalRequest {
                name: small.name.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(cancel.code(), Code::FailedPrecondition);
    });
}

/// Every way an approval can be wrong is refused with a precise error and
/// stores nothing; a REJECT from a required group denies; the initiator
/// cannot vote; an approval built and signed by the independent Python
/// implementation is accepted, and changing any one of its fields is refused.
#[test]
fn approvals_are_bound_to_withdrawal_intent_policy_and_time() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let w1 = dev.create("w1", EXCHANGE, 5 * ETHER, 1, "ops").await.unwrap();
        let w2 = dev.create("w2", EXCHANGE, 6 * ETHER, 2, "ops").await.unwrap();

        let good = dev.message(&w2, "alice", Vote::Approve).await;
        let mut cases: Vec<(&str, ApprovalMessage, &str, Code)> = Vec::new();
        let mut m = good.clone();
        m.intent_hash = w1.intent_hash.clone().try_into().unwrap();
        cases.push(("another intent", m, "alice", Code::InvalidArgument));
        let mut m = good.clone();
        m.withdrawal_id = w1.name.trim_start_matches("withdrawals/").into();
        cases.push(("another withdrawal", m, "alice", Code::InvalidArgument));
        let mut m = good.clone();
        m.policy_hash = [7; 32];
        cases.push(("another policy", m, "alice", Code::FailedPrecondition));
        let mut m = good.clone();
        m.expires_at = now() - 1;
        cases.push(("expired", m, "alice", Code::FailedPrecondition));
        let mut m = good.clone();
        m.service_id = "custos-prod".into();
        cases.push(("another deployment", m, "alice", Code::InvalidArgument));
        cases.push((
            "another approver's key",
            good.clone(),
            "bob",
            Code::InvalidArgument,
        ));
        let mut m = good.clone();
        m.approver = "mallory".into();
        // No client certificate is bound to mallory, so alice's client is
        // refused before the engine even looks up the roster.
        cases.push(("not on the roster", m, "alice", Code::PermissionDenied));
        for (what, m, signer, code) in cases {
            let err = dev.submit_signed(&m, signer).await.unwrap_err();
            assert_eq!(err.code(), code, "{what}: {err:?}");
        }

        // A high-S signature of the right message, and malformed inputs.
        let sig = dev.key("alice").sign_prehash(&good.digest()).unwrap();
        let parsed = k256::ecdsa::Signature::from_slice(&sig).unwrap();
        let (r, s) = parsed.split_scalars();
        let high = k256::ecdsa::Signature::from_scalars(*r, -*s).unwrap();
        let err = dev
            .submit(good.encode(), high.to_bytes().to_vec())
            .await
            .unwrap_err();
        assert!(err.message().contains("high S"), "{err:?}");
        let err = dev.submit(vec![1; 600], sig.to_vec()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.get_details_bad_request().unwrap().field_violations[0].field,
            "message"
        );
        let mut trailing = good.encode();
        trailing.push(0);
        let err = dev.submit(trailing, sig.to_vec()).await.unwrap_err();
        assert!(err.message().contains("malformed"), "{err:?}");
        assert!(
            dev.get(&w2).await.votes.is_empty(),
            "refused approvals store nothing"
        );

        // An approval written by a third party from docs/approval-format.md alone.
        let secret = hex::encode(
            k256::ecdsa::SigningKey::from_pkcs8_pem(
                &std::fs::read_to_string(dev.server.data_dir.join("keys/alice.pem")).unwrap(),
            )
            .unwrap()
            .to_bytes(),
        );
        let python = python_approval(&secret, &good);
        let message = hex::decode(python["message_hex"].as_str().unwrap()).unwrap();
        let signature = hex::decode(python["signature_hex"].as_str().unwrap()).unwrap();
        assert_eq!(message, good.encode(), "Python and Rust encode the same message");
        let field_offsets = field_offsets(&good);
        for (field, offset) in &field_offsets {
            let mut changed = message.clone();
            changed[*offset] ^= 0x01;
            let err = dev.submit(changed, signature.clone()).await.unwrap_err();
            assert_ne!(err.code(), Code::Ok, "changed {field}");
        }
        assert!(dev.get(&w2).await.votes.is_empty());
        let accepted = dev.submit(message.clone(), signature.clone()).await.unwrap();
        assert_eq!(accepted.votes.len(), 1);
        assert_eq!(accepted.votes[0].approver, "alice");
        let replay = dev.submit(message, signature).await.unwrap_err();
        assert_eq!(replay.code(), Code::AlreadyExists);

        // A required group's member rejects: the withdrawal is REJECTED for good.
        let rejected = dev.vote(&w1, "carol", Vote::Reject).await.unwrap();
        assert_eq!(rejected.state(), WithdrawalState::Rejected);
        assert_eq!(decision(&rejected).reason_code, "rejected");
        let late = dev.vote(&w1, "bob", Vote::Approve).await.unwrap_err();
        assert_eq!(late.code(), Code::FailedPrecondition);

        // The initiator may not vote on their own withdrawal.
        let own = dev.create("own", EXCHANGE, 5 * ETHER, 3, "alice").await.unwrap();
        let err = dev.vote(&own, "alice", Vote::Approve).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(dev.get(&own).await.votes.is_empty());
    });
}

/// Byte offsets of one byte inside each field of an encoded approval message.
fn field_offsets(m: &ApprovalMessage) -> Vec<(&'static str, usize)> {
    let domain = custos_core::approval::APPROVAL_DOMAIN.len();
    let service = domain + 2;
    let withdrawal = service + m.service_id.len() + 2;
    let intent = withdrawal + m.withdrawal_id.len();
    let policy = intent + 32;
    let vote = policy + 32;
    let expires = vote + 1;
    let approver = expires + 8 + 2;
    vec![
        ("domain", 0),
        ("service_id", service),
        ("withdrawal_id", withdrawal + 5),
        ("intent_hash", intent),
        ("policy_hash", policy + 31),
        ("vote", vote),
        ("expires_at", expires + 7),
        ("approver", approver),
    ]
}

/// `m` signed with `secret_hex` by the independent Python approver tool.
fn python_approval(secret_hex: &str, m: &ApprovalMessage) -> serde_json::Value {
    crate::formats::python_approval(&[
        secret_hex,
        &m.service_id,
        &m.withdrawal_id,
        &hex::encode(m.intent_hash),
        &hex::encode(m.policy_hash),
        "approve",
        &m.expires_at.to_string(),
        &m.approver,
    ])
}

/// 100 concurrent calls with one request id make one withdrawal and one
/// signature; a different body under that id is ALREADY_EXISTS; 100
/// concurrent withdrawals racing a 10-per-hour limit sign exactly the 9
/// that fit next to the one already counted.
#[test]
fn concurrent_requests_are_exactly_once_and_never_exceed_a_limit() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let mut client = dev.withdrawals();
            tasks.push(tokio::spawn(async move {
                client
                    .create_withdrawal(create_request("same", EXCHANGE, ETHER / 100, 0, "ops"))
                    .await
                    .map(|r| r.into_inner())
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap().unwrap());
        }
        let first = &results[0];
        assert_eq!(first.state(), WithdrawalState::Signed);
        for w in &results {
            assert_eq!(w.name, first.name);
            assert_eq!(w.signed_transaction, first.signed_transaction, "one signature");
        }
        let other_body = dev
            .create("same", EXCHANGE, ETHER / 50, 0, "ops")
            .await
            .unwrap_err();
        assert_eq!(other_body.code(), Code::AlreadyExists);

        // A policy version whose hourly window allows 10 withdrawals (the one
        // above counts too, so 9 remain).
        let tight = dev
            .dev_policy()
            .replace("version = 1", "version = 2")
            .replace("count = 1000", "count = 10");
        assert!(dev.activate(&tight).await.activated);
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let mut client = dev.withdrawals();
            tasks.push(tokio::spawn(async move {
                client
                    .create_withdrawal(create_request(
                        &format!("race-{i}"),
                        EXCHANGE,
                        ETHER / 100,
                        i + 1,
                        "ops",
                    ))
                    .await
                    .map(|r| r.into_inner())
            }));
        }
        let (mut signed, mut denied) = (0, 0);
        for task in tasks {
            let w = task.await.unwrap().unwrap();
            match w.state() {
                WithdrawalState::Signed => signed += 1,
                WithdrawalState::Denied => {
                    assert_eq!(decision(&w).reason_code, "rolling_count_limit", "{w:?}");
                    denied += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((signed, denied), (9, 91));
    });
}

/// Policy versions take effect only with admin signatures and only go
/// forward; a new allowlist entry waits for its delay from activation even
/// if the document backdates it; votes name the active policy; freeze takes
/// one officer, unfreeze the admin quorum, and neither message replays; the
/// history survives a restart, and a store edited behind custos's back is
/// refused at startup.
#[test]
fn governance_policy_versions_and_freeze() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let pending = dev.create("pending", EXCHANGE, 5 * ETHER, 0, "ops").await.unwrap();
        let stale_vote = dev.message(&pending, "alice", Vote::Approve).await;
        dev.submit_signed(&stale_vote, "alice").await.unwrap();

        let newcomer = "0x5555555555555555555555555555555555555555";
        let v2 = dev
            .dev_policy()
            .replace("version = 1", "version = 2")
            .replace("entries = [\n", &format!("entries = [\n  {{ address = \"{newcomer}\", added_at = 1 }},\n"));
        // A roster member who is not an admin cannot activate it.
        dev.policies()
            .propose_policy(proto::ProposePolicyRequest { document: v2.as_bytes().to_vec() })
            .await
            .unwrap();
        let by_alice = dev
            .governance(GovernanceAction::ActivatePolicy, 2, policy_hash(v2.as_bytes()), "alice")
            .await;
        let err = dev
            .policies()
            .approve_policy(proto::ApprovePolicyRequest { approval: Some(by_alice) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(dev.policy().await.version, 1);

        let approval = dev
            .governance(GovernanceAction::ActivatePolicy, 2, policy_hash(v2.as_bytes()), "admin")
            .await;
        let activated = dev
            .policies()
            .approve_policy(proto::ApprovePolicyRequest { approval: Some(approval) })
            .await
            .unwrap()
            .into_inner();
        assert!(activated.activated);
        assert_eq!(activated.signers, ["admin"]);
        assert_eq!(dev.policy().await.version, 2);

        let early = dev.create("newcomer", newcomer, ETHER / 10, 1, "ops").await.unwrap();
        assert_eq!(early.state(), WithdrawalState::Denied);
        assert!(decision(&early).reason.contains("time-lock"), "{early:?}");

        let err = dev.submit_signed(&stale_vote, "alice").await.unwrap_err();
        assert_eq!(reason(&err), "STALE_POLICY", "{err:?}");
        // The vote under version 1 no longer counts, so alice may vote again.
        let revoted = dev.vote(&pending, "alice", Vote::Approve).await.unwrap();
        assert_eq!(revoted.votes.len(), 1);
        assert_eq!(decision(&revoted).counted_approvers, ["alice"]);
        assert_eq!(decision(&revoted).policy_version, 2);
        let err = dev.vote(&pending, "alice", Vote::Approve).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "a counting vote stands");

        let old = dev.dev_policy();
        let err = dev
            .policies()
            .propose_policy(proto::ProposePolicyRequest { document: old.into_bytes() })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "VERSION_NOT_NEWER", "{err:?}");

        // Freeze: an approver who is not an officer cannot; the admin can.
        let by_alice = dev.governance(GovernanceAction::Freeze, 0, [0; 32], "alice").await;
        let err = dev
            .policies()
            .freeze(proto::FreezeRequest { freeze: Some(by_alice) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let freeze = dev.governance(GovernanceAction::Freeze, 0, [0; 32], "admin").await;
        let frozen = dev
            .policies()
            .freeze(proto::FreezeRequest { freeze: Some(freeze.clone()) })
            .await
            .unwrap()
            .into_inner();
        assert!(frozen.frozen);
        let refused = dev.create("while-frozen", EXCHANGE, ETHER / 10, 2, "ops").await.unwrap();
        assert_eq!(decision(&refused).reason_code, "frozen");
        let err = dev.vote(&pending, "alice", Vote::Approve).await.unwrap_err();
        assert_eq!(reason(&err), "FROZEN");

        let unfreeze = dev.governance(GovernanceAction::Unfreeze, 1, [0; 32], "admin").await;
        let thawed = dev
            .policies()
            .unfreeze(proto::UnfreezeRequest { signatures: vec![unfreeze.clone()] })
            .await
            .unwrap()
            .into_inner();
        assert!(!thawed.frozen);
        assert_eq!(thawed.freeze_epoch, 2);
        // Neither message works twice.
        let err = dev
            .policies()
            .freeze(proto::FreezeRequest { freeze: Some(freeze) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let after = dev.create("after-thaw", EXCHANGE, ETHER / 10, 3, "ops").await.unwrap();
        assert_eq!(after.state(), WithdrawalState::Signed);

        // Restart: the history verifies and version 2 is still active.
        let data_dir = dev.server.data_dir.clone();
        let Dev { mut server, .. } = dev;
        assert!(server.stop().success());
        let restarted = DevServer::start_in(&data_dir, &[]);
        let dev = Dev::on(restarted).await;
        assert_eq!(dev.policy().await.version, 2);
        let Dev { mut server, .. } = dev;
        assert!(server.stop().success());

        // Edits of the stored history behind custos's back are refused at startup.
        let start_custosd = || {
            let mut custosd = std::process::Command::new(env!("CARGO_BIN_EXE_custosd"));
            custosd
                .args(["--dev", "--listen", "127.0.0.1:0", "--module"])
                .arg(support::module_path())
                .arg("--data-dir")
                .arg(&data_dir)
                .env_remove("SOFTHSM2_CONF");
            let output = support::output_within(custosd, Duration::from_secs(60));
            assert!(!output.status.success());
            String::from_utf8_lossy(&output.stderr).into_owned()
        };
        // The stored document is edited as text, in either backend's dialect.
        let edit_document = |from: &'static str, to: &'static str| {
            support::with_dev_store(&data_dir, move |c| {
                let sql = support::dialect(
                    c,
                    "UPDATE policies SET document = CAST(replace(CAST(document AS TEXT), ?1, ?2) AS BLOB) WHERE version = 2",
                    "UPDATE policies SET document = convert_to(replace(convert_from(document, 'UTF8'), ?1, ?2), 'UTF8') WHERE version = 2",
                );
                c.execute(sql, &[&from, &to])
            })
            .unwrap()
        };
        assert_eq!(edit_document("count = 1000", "count = 9999"), 1);
        let stderr = start_custosd();
        assert!(stderr.contains("does not hash to the hash its admins signed"), "{stderr}");
        assert_eq!(edit_document("count = 9999", "count = 1000"), 1);
        support::with_dev_store(&data_dir, |c| c.execute("DELETE FROM policy_signatures", &[])).unwrap();
        let stderr = start_custosd();
        assert!(stderr.contains("lacks an admin quorum"), "{stderr}");
    });
}

/// Killing custosd right after the quorum-meeting vote commits (before
/// signing), or right after the HSM signed (before SIGNED commits), loses
/// nothing: after a restart the withdrawal is signed exactly once and counts
/// once against the limits.
#[test]
fn crash_between_approval_and_signing_signs_exactly_once_after_restart() {
    support::runtime().block_on(async {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("dev");
        let dev = Dev::on(DevServer::start_in(
            &data_dir,
            &[("CUSTOS_CRASH_AT", "after-approval-commit")],
        ))
        .await;
        let large = dev.create("large", EXCHANGE, 5 * ETHER, 0, "ops").await.unwrap();
        dev.vote(&large, "alice", Vote::Approve).await.unwrap();
        let crashed = dev.vote(&large, "bob", Vote::Approve).await;
        assert!(crashed.is_err(), "the server aborts before replying");
        let Dev { mut server, .. } = dev;
        let status = server.child.wait().unwrap();
        assert!(!status.success());

        // Startup resumes APPROVED withdrawals: this one is signed, then the
        // crash point aborts before SIGNED is committed. No client connects:
        // the server dies on its own, right after it starts.
        let mut server = DevServer::start_in(&data_dir, &[("CUSTOS_CRASH_AT", "after-sign-before-commit")]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "custosd did not reach the crash point");
            std::thread::sleep(Duration::from_millis(50));
        }

        let dev = Dev::on(DevServer::start_in(&data_dir, &[])).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let signed = loop {
            let w = dev.get(&large).await;
            if w.state() == WithdrawalState::Signed {
                break w;
            }
            assert_eq!(w.state(), WithdrawalState::Approved);
            assert!(Instant::now() < deadline, "not signed after restart");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(signer_of(&signed), dev.wallet_address().await);
        assert_eq!(signed.votes.len(), 2);
        let again = dev.vote(&large, "carol", Vote::Approve).await.unwrap_err();
        assert_eq!(again.code(), Code::FailedPrecondition);

        let (rows, counted, signed_rows): (i64, i64, i64) = support::with_dev_store(&data_dir, |c| {
            c.query_one(
                "SELECT COUNT(*), COUNT(counted_at), COUNT(signed_tx) FROM withdrawals",
                &[],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .unwrap();
        assert_eq!((rows, counted, signed_rows), (1, 1, 1));
    });
}

/// A freeze that lands after an auto withdrawal's decision committed wins,
/// whether it lands before the HSM is asked (no signature is made) or while
/// it signs (the signature is dropped unreleased): the withdrawal stays
/// APPROVED and its log has no signature, until custody is unfrozen and the
/// sweep signs it.
#[test]
fn a_freeze_before_signing_stops_the_hsm_call() {
    freeze_lands_at("before-sign", "custody is frozen; the withdrawal stays APPROVED");
}

#[test]
fn a_freeze_during_signing_holds_the_signature_back() {
    freeze_lands_at(
        "after-sign-before-commit",
        "custody was frozen while signing; the signature was dropped",
    );
}

/// Pauses the auto path at `point`, freezes, lets it go on, and checks the
/// outcome and that the server took the branch that logs `logged`.
fn freeze_lands_at(point: &str, logged: &str) {
    support::runtime().block_on(async {
        let temp = tempfile::tempdir().unwrap();
        let pause = temp.path().join("pause");
        std::fs::write(&pause, "").unwrap();
        let dev = Dev::on(DevServer::start_in(
            &temp.path().join("dev"),
            &[
                ("CUSTOS_PAUSE_AT", point),
                ("CUSTOS_PAUSE_FILE", pause.to_str().unwrap()),
            ],
        ))
        .await;
        let reached = temp.path().join("pause.reached");
        let (created, ()) = tokio::join!(dev.create("signing", EXCHANGE, ETHER / 10, 0, "ops"), async {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !reached.exists() {
                assert!(Instant::now() < deadline, "the request never reached {point}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            dev.freeze().await;
            std::fs::remove_file(&pause).unwrap();
        });
        let created = created.unwrap();
        assert_eq!(created.state(), WithdrawalState::Approved);
        assert!(created.signed_transaction.is_none());
        assert!(
            dev.server.stderr().contains(logged),
            "{point}: no {logged:?} in the log"
        );
        let id = created.name.trim_start_matches("withdrawals/").to_owned();
        let signed_entries = async |dev: &Dev| {
            support::log_entries(&dev.server)
                .await
                .iter()
                .filter(
                    |e| matches!(e.event, Event::Signed { ref withdrawal_id, .. } if *withdrawal_id == id),
                )
                .count()
        };
        assert_eq!(signed_entries(&dev).await, 0);

        let unfreeze = dev
            .governance(GovernanceAction::Unfreeze, 1, [0; 32], "admin")
            .await;
        dev.policies()
            .unfreeze(proto::UnfreezeRequest {
                signatures: vec![unfreeze],
            })
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let w = dev.get(&created).await;
            if w.state() == WithdrawalState::Signed {
                assert_eq!(signer_of(&w), dev.wallet_address().await);
                break;
            }
            assert_eq!(w.state(), WithdrawalState::Approved);
            assert!(Instant::now() < deadline, "not signed after the unfreeze");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(signed_entries(&dev).await, 1);
    });
}

/// An approver's key on their own PKCS#11 token signs approval prehashes that
/// verify under the public key it reports; the key is sensitive and not
/// extractable.
#[test]
fn approver_key_on_a_pkcs11_token_signs_verifiable_approvals() {
    const NAME: &str = "withdrawals::approver_key_on_a_pkcs11_token_signs_verifiable_approvals";
    if !support::is_child(NAME) {
        let hsm = support::SoftHsmDir::new();
        support::run_child(NAME, &hsm.env());
        return;
    }
    let dir = support::child_dir();
    let _config = support::init_test_token(&dir);
    let token = custos::signer::TokenKey {
        module: support::module_path(),
        token: custos::hsm::TokenSelector::Label(support::TEST_TOKEN_LABEL.into()),
        key_label: "alice-approver".into(),
    };
    let pin = support::pin(support::TEST_USER_PIN);
    let public = token.generate(&pin).unwrap();
    assert!(token.generate(&pin).is_err(), "labels are unique");
    let m = ApprovalMessage {
        service_id: "custos-dev".into(),
        withdrawal_id: "wd_0123".into(),
        intent_hash: [1; 32],
        policy_hash: [2; 32],
        vote: Vote::Approve,
        expires_at: now() + 60,
        approver: "alice".into(),
    };
    for _ in 0..20 {
        let (signature, reported) = token.sign_prehash(&pin, &m.digest()).unwrap();
        assert_eq!(reported, public);
        m.verify(&signature, &public).unwrap();
    }
}

/// A pending withdrawal whose approval window ends becomes EXPIRED on its
/// own and takes no more votes; a pending one can be cancelled, after which
/// votes are refused too.
#[test]
fn approval_windows_expire_and_pending_withdrawals_cancel() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let short = dev
            .dev_policy()
            .replace("version = 1", "version = 2")
            .replace("approval_window_seconds = 86400", "approval_window_seconds = 2");
        assert!(dev.activate(&short).await.activated);
        let doomed = dev.create("doomed", EXCHANGE, 5 * ETHER, 0, "ops").await.unwrap();
        assert_eq!(doomed.state(), WithdrawalState::PendingApproval);
        let cancelled = dev
            .create("cancelled", EXCHANGE, 5 * ETHER, 1, "ops")
            .await
            .unwrap();
        let after_cancel = dev
            .withdrawals()
            .cancel_withdrawal(proto::CancelWithdrawalRequest {
                name: cancelled.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(after_cancel.state(), WithdrawalState::Cancelled);
        let err = dev.vote(&cancelled, "alice", Vote::Approve).await.unwrap_err();
        assert_eq!(reason(&err), "NOT_PENDING", "{err:?}");

        let deadline = Instant::now() + Duration::from_secs(15);
        let expired = loop {
            let w = dev.get(&doomed).await;
            if w.state() != WithdrawalState::PendingApproval {
                break w;
            }
            assert!(Instant::now() < deadline, "not expired");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(expired.state(), WithdrawalState::Expired);
        assert_eq!(decision(&expired).reason_code, "expired");
        let err = dev.vote(&doomed, "alice", Vote::Approve).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    });
}

/// `custos approve` recomputes the intent hash from the transaction itself:
/// it signs an honest withdrawal, and refuses (signing nothing) when the
/// server's intent hash does not match the transaction, as a compromised
/// server or store would present it. `custos approver keygen` writes a 0600
/// key file and prints the roster key.
#[test]
fn cli_approve_recomputes_the_intent_and_refuses_a_lying_server() {
    support::runtime().block_on(async {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("dev");
        let dev = Dev::on(DevServer::start_in(&data_dir, &[])).await;
        let honest = dev.create("honest", EXCHANGE, 5 * ETHER, 0, "ops").await.unwrap();
        let tampered = dev
            .create("tampered", EXCHANGE, 6 * ETHER, 1, "ops")
            .await
            .unwrap();
        let Dev { mut server, .. } = dev;
        assert!(server.stop().success());
        let forged = tampered_hash(&tampered);
        let changed = support::with_dev_store(&data_dir, move |c| {
            c.execute(
                "UPDATE withdrawals SET intent_hash = ?1 WHERE request_id = 'tampered'",
                &[&forged],
            )
        })
        .unwrap();
        assert_eq!(changed, 1);
        let dev = Dev::on(DevServer::start_in(&data_dir, &[])).await;

        let approve = |id: &str| {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
            command
                .args(dev.server.cli_args("alice"))
                .args(["--json", "approve"])
                .arg(id.trim_start_matches("withdrawals/"))
                .args(["--approver", "alice", "--yes", "--key"])
                .arg(data_dir.join("keys/alice.pem"));
            support::output_within(command, Duration::from_secs(60))
        };
        let ok = approve(&honest.name);
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        let shown: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
        assert_eq!(shown["state"], "PENDING_APPROVAL");
        assert_eq!(shown["votes"][0]["approver"], "alice");

        let refused = approve(&tampered.name);
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("differs from the server's"), "{stderr}");
        assert!(dev.get(&tampered).await.votes.is_empty());

        let key_file = temp.path().join("new-approver.pem");
        let mut keygen = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
        keygen.args(["approver", "keygen", "--out"]).arg(&key_file);
        let out = support::output_within(keygen, Duration::from_secs(30));
        assert!(out.status.success());
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.starts_with("secp256k1:0"), "{printed}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    });
}

/// A different 32-byte value than the withdrawal's real intent hash.
fn tampered_hash(w: &proto::Withdrawal) -> Vec<u8> {
    w.intent_hash.iter().map(|b| b ^ 0xff).collect()
}

/// With no policy configured or stored, every withdrawal is denied (the
/// default is deny) and nothing is signed; no proposal can be made either,
/// since no admins exist to approve it.
#[test]
fn without_a_policy_every_withdrawal_is_denied() {
    use custos::custody::{CustodyError, NewWithdrawal, RequestId};
    use custos::wallet::{DisplayName, WalletId};
    use custos_core::chain::UnsignedTx;
    use custos_core::chain::ethereum::{EthereumFields, EthereumTxType, UnsignedEthereumTx};
    use custos_core::lifecycle::State;

    support::with_app_in_child(
        "withdrawals::without_a_policy_every_withdrawal_is_denied",
        |app, _dir| async move {
            let id = WalletId::parse("hot").unwrap();
            app.wallets
                .create(id.clone(), DisplayName::default())
                .await
                .unwrap();
            let tx = UnsignedEthereumTx::try_from(EthereumFields {
                tx_type: EthereumTxType::Eip1559,
                chain_id: app.chains.ethereum.chain_id,
                nonce: 0,
                gas_limit: 21_000,
                gas_price: 0,
                max_fee_per_gas: 30_000_000_000,
                max_priority_fee_per_gas: 1_000_000_000,
                to: Some(EXCHANGE.parse().unwrap()),
                value: alloy_primitives::U256::from(1u64),
                data: vec![],
            })
            .unwrap();
            let view = app
                .custody
                .create(NewWithdrawal {
                    request_id: RequestId::parse("r-1").unwrap(),
                    wallet: id,
                    transaction: UnsignedTx::Ethereum(tx),
                    initiator: "ops".into(),
                })
                .await
                .unwrap();
            assert_eq!(view.row.state, State::Denied);
            assert_eq!(view.row.decision.reason_code.as_deref(), Some("no_policy"));
            assert!(view.row.signed_tx.is_none());
            let example = include_bytes!("../../docs/policy-example.toml").to_vec();
            let proposal = app.custody.propose_policy(example).await;
            assert!(
                matches!(
                    proposal,
                    Err(CustodyError::FailedPrecondition {
                        code: "no_policy",
                        ..
                    })
                ),
                "{proposal:?}"
            );
        },
    );
}

/// The CLI's `--json` output as an integrator scripts it: a list is always
/// an array (also of one), a single withdrawal one object, and an Ethereum
/// signed transaction and its hash are `0x` hex, what
/// `eth_sendRawTransaction` and explorers take.
#[test]
fn cli_json_lists_are_arrays_and_ethereum_hex_is_0x() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let signed = dev
            .create("cli-json", EXCHANGE, ETHER / 1000, 0, "ops")
            .await
            .unwrap();
        assert_eq!(signed.state(), WithdrawalState::Signed);
        let tx = signed.signed_transaction.as_ref().unwrap();
        let custos = |args: &[&str]| -> serde_json::Value {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
                .args(dev.server.cli_args("backend"))
                .arg("--json")
                .args(args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            serde_json::from_slice(&output.stdout).unwrap()
        };
        let wallets = custos(&["wallet", "list"]);
        assert_eq!(wallets.as_array().map(Vec::len), Some(1), "{wallets}");
        let wallet = custos(&["wallet", "get", "hot"]);
        assert!(wallet.is_object(), "{wallet}");
        let listed = custos(&["withdrawal", "list"]);
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
        let id = signed.name.trim_start_matches("withdrawals/");
        let one = custos(&["withdrawal", "get", id]);
        assert_eq!(one, listed[0]);
        assert_eq!(
            one["signed_transaction"]["raw"],
            format!("0x{}", hex::encode(&tx.raw))
        );
        assert_eq!(
            one["signed_transaction"]["hash"],
            format!("0x{}", hex::encode(&tx.hash))
        );
    });
}

/// The Ethereum fields of a request built by [`create_request`].
fn fields_of(r: &mut proto::CreateWithdrawalRequest) -> &mut proto::EthereumTransactionFields {
    use proto::ethereum_transaction::Encoding;
    use proto::unsigned_transaction::Kind;
    match r.transaction.as_mut().and_then(|t| t.kind.as_mut()) {
        Some(Kind::Ethereum(proto::EthereumTransaction {
            encoding: Some(Encoding::Fields(f)),
        })) => f,
        _ => unreachable!("create_request sends fields"),
    }
}

/// Whether `path` (`a.b.c`) names a field of message `full_name` in the
/// embedded descriptor set, following message-typed fields.
fn path_exists(set: &prost_types::FileDescriptorSet, full_name: &str, path: &str) -> bool {
    let message = |name: &str| {
        set.file.iter().find_map(|file| {
            file.message_type
                .iter()
                .find(|m| format!(".{}.{}", file.package(), m.name()) == name)
                .cloned()
        })
    };
    let mut current = message(full_name);
    for segment in path.split('.') {
        let Some(m) = current else { return false };
        let Some(field) = m.field.iter().find(|f| f.name() == segment) else {
            return false;
        };
        current = field.type_name.as_deref().and_then(message);
    }
    true
}

/// Every refusal of a CreateWithdrawal names a field that exists in
/// CreateWithdrawalRequest, with a reason specific to the rule and the field
/// again in the ErrorInfo metadata; a refusal inside an encoded blob names
/// the item that failed. None of them stores anything.
#[test]
fn refusals_name_real_request_fields_and_specific_reasons() {
    use prost::Message as _;
    use proto::ethereum_transaction::Encoding;
    use proto::unsigned_transaction::Kind;

    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let with_rlp = |rlp: &str| {
        let mut r = create_request("r", EXCHANGE, 1, 0, "ops");
        r.transaction = Some(proto::UnsignedTransaction {
            kind: Some(Kind::Ethereum(proto::EthereumTransaction {
                encoding: Some(Encoding::Rlp(hex::decode(rlp).unwrap())),
            })),
        });
        r
    };
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let base = || create_request("r", EXCHANGE, ETHER / 100, 0, "ops");
        type Case = (
            &'static str,
            proto::CreateWithdrawalRequest,
            &'static str,
            &'static str,
            &'static str,
        );
        let mut cases: Vec<Case> = Vec::new();
        let mut r = base();
        fields_of(&mut r).chain_id = 5;
        cases.push((
            "chain id",
            r,
            "CHAIN_ID_MISMATCH",
            "transaction.ethereum.fields.chain_id",
            "does not match",
        ));
        let mut r = base();
        fields_of(&mut r).to = "0x9D8A62f656a8d1615C1294fd71e9CFb3E4855A4F".into();
        cases.push((
            "checksum",
            r,
            "BAD_ADDRESS_CHECKSUM",
            "transaction.ethereum.fields.to",
            "EIP-55",
        ));
        let mut r = base();
        fields_of(&mut r).max_fee_per_gas = "340282366920938463463374607431768211456".into();
        cases.push((
            "fee",
            r,
            "AMOUNT_OUT_OF_RANGE",
            "transaction.ethereum.fields.max_fee_per_gas",
            "2^128",
        ));
        let mut r = base();
        fields_of(&mut r).value = "1".repeat(79);
        cases.push((
            "value",
            r,
            "AMOUNT_OUT_OF_RANGE",
            "transaction.ethereum.fields.value",
            "2^256",
        ));
        let mut r = base();
        fields_of(&mut r).to = String::new();
        cases.push((
            "creation",
            r,
            "UNSUPPORTED_TRANSACTION",
            "transaction.ethereum.fields.to",
            "contract creation",
        ));
        let mut r = base();
        fields_of(&mut r).data = vec![0xa9, 0x05, 0x9c, 0xbb];
        cases.push((
            "gas",
            r,
            "GAS_BELOW_INTRINSIC",
            "transaction.ethereum.fields.gas_limit",
            "intrinsic cost of 21064",
        ));
        let mut r = base();
        fields_of(&mut r).data = vec![0xa9, 0x05, 0x9c, 0xbb];
        fields_of(&mut r).gas_limit = 60_000;
        cases.push((
            "token",
            r,
            "UNSUPPORTED_TRANSACTION",
            "transaction.ethereum.fields.data",
            "not a registered token",
        ));
        let mut r = base();
        fields_of(&mut r).r#type = 0;
        cases.push((
            "type",
            r,
            "INVALID_FIELD",
            "transaction.ethereum.fields.type",
            "TYPE_",
        ));
        // EIP-1559 list: chain id, nonce 0, priority fee 1, max fee 5 with a
        // leading zero byte, gas 21000, to, value 0, no data, no access list.
        let items = [
            format!("83{:06x}", custos::dev::DEV_CHAIN_ID),
            "80".into(),
            "01".into(),
            "820005".into(),
            "825208".into(),
            format!("94{}", "35".repeat(20)),
            "80".into(),
            "80".into(),
            "c0".into(),
        ]
        .concat();
        cases.push((
            "rlp item",
            with_rlp(&format!("02{:02x}{items}", 0xc0 + items.len() / 2)),
            "MALFORMED_TRANSACTION",
            "transaction.ethereum.rlp",
            "max_fee_per_gas: leading zero",
        ));
        cases.push((
            "blob",
            with_rlp("03c0"),
            "UNSUPPORTED_TRANSACTION",
            "transaction.ethereum.rlp",
            "EIP-4844",
        ));
        let mut r = base();
        r.transaction = Some(proto::UnsignedTransaction {
            kind: Some(Kind::Bitcoin(proto::BitcoinTransaction {
                psbt: b"nope".to_vec(),
            })),
        });
        cases.push((
            "psbt",
            r,
            "MALFORMED_TRANSACTION",
            "transaction.bitcoin.psbt",
            "malformed PSBT",
        ));
        let mut r = base();
        r.request_id = String::new();
        cases.push(("request id", r, "INVALID_FIELD", "request_id", ""));

        for (what, request, want_reason, want_field, want_text) in cases {
            let err = dev.withdrawals().create_withdrawal(request).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
            let info = err.get_details_error_info().unwrap();
            assert_eq!(info.reason, want_reason, "{what}: {err:?}");
            let violation = &err.get_details_bad_request().unwrap().field_violations[0];
            assert_eq!(violation.field, want_field, "{what}: {err:?}");
            assert_eq!(info.metadata["field"], want_field, "{what}");
            assert!(violation.description.contains(want_text), "{what}: {violation:?}");
            assert!(
                path_exists(&set, ".custos.v1.CreateWithdrawalRequest", &violation.field),
                "{what}: {} is not a field of CreateWithdrawalRequest",
                violation.field
            );
        }
        assert!(!path_exists(
            &set,
            ".custos.v1.CreateWithdrawalRequest",
            "transaction.chain_id"
        ));

        let mut missing = base();
        missing.wallet = "wallets/nope".into();
        let err = dev.withdrawals().create_withdrawal(missing).await.unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::NotFound, "WALLET_NOT_FOUND")
        );

        let stored = support::all_withdrawals(&mut dev.withdrawals(), WithdrawalState::Unspecified).await;
        assert!(stored.is_empty(), "refused requests store nothing: {stored:?}");
    });
}
