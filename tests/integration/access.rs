//! Who may call what, on a real `custosd --dev` over mTLS: the whole
//! authorization matrix (every RPC × every role and every kind of
//! unauthenticated caller), the approver's certificate binding, and the
//! request limits (size, rate, concurrency).

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::support::{self, DevServer};
use crate::withdrawals::{Dev, ETHER};
use custos::proto::{self, approval_service_client::ApprovalServiceClient};
use custos::proto::{WithdrawalState, withdrawal_service_client::WithdrawalServiceClient};
use custos_core::approval::ApprovalMessage;
use custos_core::policy::Vote;

const EXCHANGE: &str = custos::dev::DEV_ALLOWLISTED;

/// The matrix, written out independently of `custos::access::RPC_ACCESS`:
/// each RPC and the callers that may use it. Every other authenticated
/// caller gets PERMISSION_DENIED; every unauthenticated one gets
/// UNAUTHENTICATED, except on `public` RPCs.
const EXPECTED: &[(&str, &[&str])] = &[
    ("custos.v1.WalletService/CreateWallet", &["admin"]),
    (
        "custos.v1.WalletService/GetWallet",
        &["admin", "backend", "alice"],
    ),
    ("custos.v1.WalletService/ListWallets", &["admin", "backend"]),
    ("custos.v1.WithdrawalService/CreateWithdrawal", &["backend"]),
    (
        "custos.v1.WithdrawalService/GetWithdrawal",
        &["backend", "alice", "admin"],
    ),
    (
        "custos.v1.WithdrawalService/ListWithdrawals",
        &["backend", "admin"],
    ),
    (
        "custos.v1.WithdrawalService/WatchWithdrawal",
        &["backend", "admin"],
    ),
    ("custos.v1.WithdrawalService/CancelWithdrawal", &["backend"]),
    ("custos.v1.ApprovalService/ListPendingApprovals", &["alice"]),
    ("custos.v1.ApprovalService/SubmitApproval", &["alice"]),
    ("custos.v1.PolicyService/GetPolicy", &["admin", "alice"]),
    ("custos.v1.PolicyService/ProposePolicy", &["admin"]),
    ("custos.v1.PolicyService/ApprovePolicy", &["admin"]),
    ("custos.v1.PolicyService/Freeze", &["admin"]),
    ("custos.v1.PolicyService/Unfreeze", &["admin"]),
    ("custos.v1.AuditService/GetLogKey", &["auditor"]),
    ("custos.v1.AuditService/GetCheckpoint", &["auditor"]),
    ("custos.v1.AuditService/ListCheckpoints", &["auditor"]),
    ("custos.v1.AuditService/ListEntries", &["auditor"]),
    ("custos.v1.AuditService/GetInclusionProof", &["auditor"]),
    ("custos.v1.AuditService/GetConsistencyProof", &["auditor"]),
    ("grpc.health.v1.Health/Check", &["public"]),
    ("grpc.health.v1.Health/Watch", &["public"]),
    (
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        &["admin", "backend", "alice", "auditor"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        &["admin", "backend", "alice", "auditor"],
    ),
];

/// The callers of the matrix: the four roles, then four kinds of callers
/// that are not authenticated.
const ROLES: [&str; 4] = ["backend", "alice", "auditor", "admin"];
const UNAUTHENTICATED: [&str; 4] = ["no certificate", "unknown CA", "expired", "unregistered"];

/// How a call ended, as the matrix sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Past the guard: the handler answered (success or its own error on
    /// the empty request).
    Allowed,
    PermissionDenied,
    Unauthenticated,
}

fn outcome(result: Result<(), tonic::Status>) -> Outcome {
    match result {
        Ok(()) => Outcome::Allowed,
        Err(s) if s.code() == Code::PermissionDenied && guard_reason(&s) == "PERMISSION_DENIED" => {
            Outcome::PermissionDenied
        }
        Err(s) if s.code() == Code::Unauthenticated => Outcome::Unauthenticated,
        Err(s) => {
            assert!(
                !matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Internal),
                "a transport or server failure is not an authorization outcome: {s:?}"
            );
            Outcome::Allowed
        }
    }
}

fn guard_reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Calls `path` with an empty request message, whatever its shape:
/// unary, server-streaming or bidirectional.
async fn call(
    channel: Channel,
    path: &str,
    server_streaming: bool,
    client_streaming: bool,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = format!("/{path}").parse().unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let request = tonic::Request::new(());
    match (client_streaming, server_streaming) {
        (false, false) => grpc.unary(request, path, codec).await.map(drop),
        (false, true) => grpc.server_streaming(request, path, codec).await.map(drop),
        (true, _) => grpc
            .streaming(tonic::Request::new(tokio_stream::iter([()])), path, codec)
            .await
            .map(|response| drop(response.into_inner())),
    }
}

/// Every method of every service the server describes, with its streaming shape.
fn served_methods() -> Vec<(String, bool, bool)> {
    let mut methods = Vec::new();
    for set in [
        custos::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push((
                        format!("{}.{}/{}", file.package(), service.name(), method.name()),
                        method.server_streaming(),
                        method.client_streaming(),
                    ));
                }
            }
        }
    }
    for version in ["v1", "v1alpha"] {
        methods.push((
            format!("grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"),
            true,
            true,
        ));
    }
    methods
}

/// A certificate for `identity` signed by a CA custosd has never seen.
fn foreign_certificate(identity: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "custos dev CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The channels of every caller in the matrix.
async fn callers(server: &DevServer) -> BTreeMap<&'static str, Channel> {
    let mut channels = BTreeMap::new();
    for role in ROLES {
        channels.insert(role, server.channel_as(role).await);
    }
    let dev_ca = custos::tls::dev_pki::DevCa::load(&server.data_dir.join("tls")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let admin = format!("{}admin", custos::tls::dev_pki::DEV_IDENTITY_PREFIX);
    // The dev CA's own signature, on an admin identity, but expired.
    let (expired, expired_key) = dev_ca
        .issue_client(
            &admin,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    // The dev CA's signature on an identity no client entry names.
    let (stranger, stranger_key) = dev_ca
        .issue_client(
            "spiffe://custos.dev/stranger",
            now - time::Duration::days(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    // A perfect admin certificate, but from a CA custosd does not trust.
    let (forged, forged_key) = foreign_certificate(&admin);
    let tls = |cert: &str, key: &str| (cert.as_bytes().to_vec(), key.as_bytes().to_vec());
    for (name, identity) in [
        ("no certificate", None),
        ("unknown CA", Some(tls(&forged, &forged_key))),
        ("expired", Some(tls(&expired, &expired_key))),
        ("unregistered", Some(tls(&stranger, &stranger_key))),
    ] {
        let channel = server
            .channel_with(identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))
            .await
            .unwrap_or_else(|e| {
                panic!("{name}: the TLS handshake must succeed so the refusal is a gRPC status: {e}")
            });
        channels.insert(name, channel);
    }
    channels
}

/// Every RPC × every caller gets exactly the outcome the matrix states.
#[test]
fn every_rpc_and_caller_gets_the_outcome_the_matrix_states() {
    let server = DevServer::start();
    support::runtime().block_on(async {
        let methods = served_methods();
        let expected: BTreeMap<&str, &[&str]> = EXPECTED.iter().copied().collect();
        assert_eq!(
            methods
                .iter()
                .map(|(p, ..)| p.as_str())
                .collect::<std::collections::BTreeSet<_>>(),
            expected.keys().copied().collect(),
            "the matrix must list exactly the RPCs the server describes"
        );
        // The table in code says the same as the table here.
        for (path, allowed) in EXPECTED {
            let access = custos::access::rpc_access(&format!("/{path}")).unwrap();
            match access {
                custos::access::Access::Public => assert_eq!(*allowed, &["public"][..], "{path}"),
                custos::access::Access::Roles(roles) => {
                    let names: Vec<&str> = roles
                        .iter()
                        .map(|r| {
                            if r.as_str() == "approver" {
                                "alice"
                            } else {
                                r.as_str()
                            }
                        })
                        .collect();
                    let mut mine = allowed.to_vec();
                    mine.sort_unstable();
                    let mut theirs = names.clone();
                    theirs.sort_unstable();
                    assert_eq!(mine, theirs, "{path}");
                }
            }
        }

        let callers = callers(&server).await;
        let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
        for (path, server_streaming, client_streaming) in &methods {
            let allowed = expected[path.as_str()];
            for (caller, channel) in &callers {
                let want = if allowed.contains(&"public") || allowed.contains(caller) {
                    Outcome::Allowed
                } else if UNAUTHENTICATED.contains(caller) {
                    Outcome::Unauthenticated
                } else {
                    Outcome::PermissionDenied
                };
                let got = outcome(call(channel.clone(), path, *server_streaming, *client_streaming).await);
                assert_eq!(got, want, "{caller} calling {path}");
                *counts.entry(got).or_default() += 1;
            }
        }
        // 25 RPCs × 8 callers. 37 (RPC, role) grants plus 2 public RPCs for
        // all 8 callers are allowed; the 23 other RPCs refuse the 4
        // unauthenticated callers, and the 4 roles 92 − 37 times.
        assert_eq!(counts.values().sum::<usize>(), 25 * 8);
        assert_eq!(counts[&Outcome::Allowed], 37 + 2 * 8, "{counts:?}");
        assert_eq!(counts[&Outcome::Unauthenticated], 23 * 4, "{counts:?}");
        assert_eq!(counts[&Outcome::PermissionDenied], 23 * 4 - 37, "{counts:?}");

        // A method custos does not have is UNIMPLEMENTED to every role (so
        // clients that fall back on it work) and UNAUTHENTICATED to anyone
        // unauthenticated; neither learns anything else.
        for unknown in [
            "custos.v1.WalletService/DropAll",
            "custos.v1.NoSuchService/Get",
            "grpc.reflection.v2.ServerReflection/ServerReflectionInfo",
        ] {
            for (caller, channel) in &callers {
                let err = call(channel.clone(), unknown, false, false).await.unwrap_err();
                let want = if UNAUTHENTICATED.contains(caller) {
                    Code::Unauthenticated
                } else {
                    Code::Unimplemented
                };
                assert_eq!(err.code(), want, "{caller} calling {unknown}: {err:?}");
                if want == Code::Unimplemented {
                    assert_eq!(guard_reason(&err), "UNIMPLEMENTED", "{caller} calling {unknown}");
                }
            }
        }
        assert!(
            server.stderr().contains("permission denied"),
            "denials are logged"
        );
    });
}

/// Approvals are bound to the certificate: alice's client cannot submit
/// bob's vote, even perfectly signed by bob's key; nothing is recorded.
#[test]
fn an_approver_cannot_submit_another_approvers_vote() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let large = dev.create("bound", EXCHANGE, 5 * ETHER, 0, "ops").await.unwrap();
        assert_eq!(large.state(), WithdrawalState::PendingApproval);
        let policy = dev
            .policies()
            .get_policy(proto::GetPolicyRequest { version: 0 })
            .await
            .unwrap()
            .into_inner();
        let message = ApprovalMessage {
            service_id: policy.service_id,
            withdrawal_id: large.name.trim_start_matches("withdrawals/").to_owned(),
            intent_hash: large.intent_hash.clone().try_into().unwrap(),
            policy_hash: hex::decode(&policy.hash).unwrap().try_into().unwrap(),
            vote: Vote::Approve,
            expires_at: custos::clock::unix_now() + 600,
            approver: "bob".into(),
        };
        let bob_key = custos::signer::KeyFile::load(&dev.server.data_dir.join("keys/bob.pem")).unwrap();
        let signature = bob_key.sign_prehash(&message.digest()).unwrap().to_vec();
        let request = proto::SubmitApprovalRequest {
            message: message.encode(),
            signature: signature.clone(),
        };
        let err = ApprovalServiceClient::new(dev.server.channel_as("alice").await)
            .submit_approval(request.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("\"bob\""), "{}", err.message());
        let unchanged = WithdrawalServiceClient::new(dev.server.channel_as("backend").await)
            .get_withdrawal(proto::GetWithdrawalRequest {
                name: large.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            unchanged.votes.is_empty(),
            "a refused vote must not be recorded: {unchanged:?}"
        );
        // Over bob's own channel the same vote counts.
        let accepted = ApprovalServiceClient::new(dev.server.channel_as("bob").await)
            .submit_approval(request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(accepted.votes.len(), 1);
    });
}

/// An oversized request gets RESOURCE_EXHAUSTED naming the limit, and
/// nothing is stored.
#[test]
fn an_oversized_request_is_refused_and_changes_nothing() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let mut client = WithdrawalServiceClient::new(dev.server.channel_as("backend").await);
        let mut request = custos::dev::transfer_request("huge", EXCHANGE, ETHER / 2, 0, "ops");
        request.request_id = "x".repeat(2 * 1024 * 1024);
        let err = client.create_withdrawal(request).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(guard_reason(&err), "MESSAGE_TOO_LARGE");
        assert!(err.message().contains("1048576-byte limit"), "{}", err.message());
        let listed = client
            .list_withdrawals(proto::ListWithdrawalsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.withdrawals.is_empty());
        // Just under the limit is decoded and judged on its content.
        let mut request = custos::dev::transfer_request("ok", EXCHANGE, ETHER / 2, 0, "ops");
        request.initiator = "y".repeat(1000 * 1024);
        let err = client.create_withdrawal(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    });
}

/// Over-rate calls get RESOURCE_EXHAUSTED with RetryInfo, per identity; a
/// full server refuses with RESOURCE_EXHAUSTED rather than queueing.
#[test]
fn rate_and_concurrency_limits_refuse_with_resource_exhausted() {
    support::runtime().block_on(async {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("dev");
        let mut first = DevServer::start_in(&data_dir, &[]);
        assert!(first.stop().success());
        let config = data_dir.join("custosd.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[limits]\nrequests_per_second = 1\nburst = 3\nmax_concurrent_requests = 1\n");
        std::fs::write(&config, text).unwrap();
        let server = DevServer::start_in(&data_dir, &[]);

        let mut auditor =
            custos::proto::audit_service_client::AuditServiceClient::new(server.channel_as("auditor").await);
        for _ in 0..3 {
            auditor.get_log_key(proto::GetLogKeyRequest {}).await.unwrap();
        }
        let err = auditor.get_log_key(proto::GetLogKeyRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(guard_reason(&err), "RATE_LIMITED");
        let retry = err.get_details_retry_info().expect("RetryInfo detail");
        let delay = retry.retry_delay.expect("retry delay");
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(1),
            "{delay:?}"
        );
        // Another identity has its own budget.
        let mut backend = WithdrawalServiceClient::new(server.channel_as("backend").await);
        backend
            .list_withdrawals(proto::ListWithdrawalsRequest::default())
            .await
            .unwrap();
        // After the delay, the auditor may call again.
        tokio::time::sleep(delay).await;
        auditor.get_log_key(proto::GetLogKeyRequest {}).await.unwrap();

        // Concurrency: three withdrawals at once (within the backend's burst)
        // against a limit of one in flight. Each takes an HSM signature and
        // a durable commit, so they overlap and the server refuses rather
        // than queues; a refused one leaves no trace.
        // Separate connections: on one, HTTP/2's stream limit (set to the
        // same number) would queue the calls in the client instead.
        let mut connections = Vec::new();
        for _ in 0..3 {
            connections.push(WithdrawalServiceClient::new(server.channel_as("backend").await));
        }
        let mut overloaded = Vec::new();
        for round in 0..3 {
            tokio::time::sleep(Duration::from_millis(3100)).await;
            let mut calls = Vec::new();
            for n in 0..3u64 {
                let mut client = connections[n as usize].clone();
                let id = format!("c-{round}-{n}");
                let request =
                    custos::dev::transfer_request(&id, EXCHANGE, ETHER / 100, 10 + round * 3 + n, "ops");
                calls.push(tokio::spawn(async move {
                    (id, client.create_withdrawal(request).await)
                }));
            }
            for c in calls {
                match c.await.unwrap() {
                    (_, Ok(w)) => assert_eq!(w.into_inner().state(), WithdrawalState::Signed),
                    (id, Err(s)) => {
                        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                        assert_eq!(guard_reason(&s), "OVERLOADED", "{s:?}");
                        overloaded.push(id);
                    }
                }
            }
            if !overloaded.is_empty() {
                break;
            }
        }
        assert!(
            !overloaded.is_empty(),
            "three concurrent withdrawals never met the limit of one"
        );
        tokio::time::sleep(Duration::from_millis(3100)).await;
        let listed = backend
            .list_withdrawals(proto::ListWithdrawalsRequest::default())
            .await
            .unwrap()
            .into_inner();
        for id in &overloaded {
            assert!(
                listed.withdrawals.iter().all(|w| &w.request_id != id),
                "refused request {id} was stored"
            );
        }
    });
}
