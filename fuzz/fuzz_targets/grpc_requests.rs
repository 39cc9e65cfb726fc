//! Every gRPC request type's conversion to domain types.
//!
//! The first byte picks one of the 21 request messages of the services in
//! proto/custos/v1 (modulo 21, in the order of [`REQUESTS`]); the rest is
//! decoded as that message with `prost::Message::decode`, as tonic would. A
//! request that decodes must re-encode to one that decodes to the same
//! message. It then goes through the conversion its service method runs
//! before touching the store or the HSM, and what that conversion yields is
//! checked: a refusal is an INVALID_ARGUMENT naming a field, and an accepted
//! value round-trips or passes the shared checks of its parser (transactions,
//! approval and governance messages, policy documents).
//!
//! Audit requests carry only sizes and indices, checked by the service
//! against the log; here they are run against an in-memory log of
//! [`LOG_SIZE`] leaves, and every proof served must verify.

#![no_main]

use std::fmt::Debug;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use custos_fuzz::{
    check_intent, check_policy, check_refusal, check_signed_message, check_unsigned,
    example_policy, wallet_key,
};

use custos::api::fuzz_api::{CreateWallet, ListWallets, signed_message, state_filter, withdrawal_id};
use custos::api::{FieldViolation, paging};
use custos_core::audit::merkle::{self, MemoryNodes, MerkleError};
use custos_core::recompute;
use custos::custody::NewWithdrawal;
use custos_core::policy::Policy;
use custos_core::policy::document::MAX_POLICY_BYTES;
use custos::proto;
use custos::wallet::WalletId;

/// The request messages, in the order the first input byte picks them.
const REQUESTS: [&str; 21] = [
    "CreateWalletRequest",
    "GetWalletRequest",
    "ListWalletsRequest",
    "CreateWithdrawalRequest",
    "GetWithdrawalRequest",
    "ListWithdrawalsRequest",
    "WatchWithdrawalRequest",
    "CancelWithdrawalRequest",
    "ListPendingApprovalsRequest",
    "SubmitApprovalRequest",
    "GetPolicyRequest",
    "ProposePolicyRequest",
    "ApprovePolicyRequest",
    "FreezeRequest",
    "UnfreezeRequest",
    "GetLogKeyRequest",
    "GetCheckpointRequest",
    "ListCheckpointsRequest",
    "ListEntriesRequest",
    "GetInclusionProofRequest",
    "GetConsistencyProofRequest",
];

/// Leaves of the in-memory log the audit requests run against: not a power
/// of two, so trees of every shape occur.
const LOG_SIZE: u64 = 1037;

type Conversion<M> = fn(M) -> Result<(), FieldViolation>;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match usize::from(selector) % REQUESTS.len() {
        0 => convert::<proto::CreateWalletRequest>(body, create_wallet),
        1 => convert::<proto::GetWalletRequest>(body, |r| wallet_name(&r.name)),
        2 => convert::<proto::ListWalletsRequest>(body, list_wallets),
        3 => convert::<proto::CreateWithdrawalRequest>(body, create_withdrawal),
        4 => convert::<proto::GetWithdrawalRequest>(body, |r| withdrawal_name(&r.name)),
        5 => convert::<proto::ListWithdrawalsRequest>(body, |r| {
            page(r.page_size, &r.page_token)?;
            state_filter(r.state).map(drop)
        }),
        6 => convert::<proto::WatchWithdrawalRequest>(body, |r| withdrawal_name(&r.name)),
        7 => convert::<proto::CancelWithdrawalRequest>(body, |r| withdrawal_name(&r.name)),
        8 => convert::<proto::ListPendingApprovalsRequest>(body, |r| page(r.page_size, &r.page_token)),
        9 => convert::<proto::SubmitApprovalRequest>(body, submit_approval),
        10 => convert::<proto::GetPolicyRequest>(body, |_| Ok(())),
        11 => convert::<proto::ProposePolicyRequest>(body, propose_policy),
        12 => convert::<proto::ApprovePolicyRequest>(body, |r| governance("approval", r.approval)),
        13 => convert::<proto::FreezeRequest>(body, |r| governance("freeze", r.freeze)),
        14 => convert::<proto::UnfreezeRequest>(body, unfreeze),
        15 => convert::<proto::GetLogKeyRequest>(body, |_| Ok(())),
        16 => convert::<proto::GetCheckpointRequest>(body, |_| Ok(())),
        17 => convert::<proto::ListCheckpointsRequest>(body, |_| Ok(())),
        18 => convert::<proto::ListEntriesRequest>(body, |_| Ok(())),
        19 => convert::<proto::GetInclusionProofRequest>(body, inclusion_proof),
        _ => convert::<proto::GetConsistencyProofRequest>(body, consistency_proof),
    }
});

/// Decodes `body` as `M`, checks it survives re-encoding, and converts it.
fn convert<M: Message + Default + PartialEq + Debug>(body: &[u8], conversion: Conversion<M>) {
    let Ok(request) = M::decode(body) else {
        return;
    };
    let again = M::decode(request.encode_to_vec().as_slice())
        .expect("a decoded request re-encodes to one that decodes");
    assert_eq!(again, request, "the request does not survive re-encoding");
    if let Err(violation) = conversion(request) {
        check_violation(violation);
    }
}

fn create_wallet(request: proto::CreateWalletRequest) -> Result<(), FieldViolation> {
    let asked = request.wallet_id.clone();
    let create = CreateWallet::try_from(request)?;
    assert_eq!(create.id.as_str(), asked);
    assert_eq!(
        WalletId::from_resource_name(&create.id.resource_name()),
        Ok(create.id)
    );
    Ok(())
}

fn wallet_name(name: &str) -> Result<(), FieldViolation> {
    let id = WalletId::from_resource_name(name).map_err(|e| FieldViolation::new("name", e.0))?;
    assert_eq!(id.resource_name(), name);
    Ok(())
}

fn list_wallets(request: proto::ListWalletsRequest) -> Result<(), FieldViolation> {
    let list = ListWallets::try_from(request)?;
    assert!(list.after >= 0 && (1..=1000).contains(&list.limit));
    Ok(())
}

fn page(size: i32, token: &str) -> Result<(), FieldViolation> {
    let (after, limit) = paging(size, token)?;
    assert!(after >= 0 && (1..=1000).contains(&limit));
    assert_eq!(
        after == 0,
        token.is_empty(),
        "page token {token:?} read as cursor {after}"
    );
    Ok(())
}

fn create_withdrawal(request: proto::CreateWithdrawalRequest) -> Result<(), FieldViolation> {
    let (request_id, wallet) = (request.request_id.clone(), request.wallet.clone());
    let new = NewWithdrawal::try_from(request)?;
    assert_eq!(new.request_id.as_str(), request_id);
    assert_eq!(new.wallet.resource_name(), wallet);
    check_unsigned(&new.transaction);
    // What the engine does next: parse for a wallet under the active policy.
    match recompute::parse_under_policy(new.transaction, example_policy(), "hot", wallet_key()) {
        Ok(parsed) => check_intent(parsed.intent()),
        Err(refusal) => check_refusal(&refusal),
    }
    Ok(())
}

fn withdrawal_name(name: &str) -> Result<(), FieldViolation> {
    let id = withdrawal_id(name)?;
    assert_eq!(format!("withdrawals/{id}"), name);
    Ok(())
}

fn submit_approval(request: proto::SubmitApprovalRequest) -> Result<(), FieldViolation> {
    // As ApprovalService::submit_approval names the fields: no prefix.
    let (message, signature) = signed_message("", request.message, request.signature)
        .map_err(|v| FieldViolation::new(v.field.trim_start_matches('.'), v.description))?;
    assert_eq!(signature.len(), 64);
    check_signed_message(&message);
    Ok(())
}

fn propose_policy(request: proto::ProposePolicyRequest) -> Result<(), FieldViolation> {
    // As PolicyService::propose_policy bounds it before the engine parses it.
    let document = request.document;
    if document.is_empty() || document.len() > MAX_POLICY_BYTES {
        return Err(FieldViolation::new("document", "must be 1 byte to 256 KiB"));
    }
    if let Ok(policy) = Policy::parse(&document) {
        check_policy(&document, &policy);
    }
    Ok(())
}

/// A required signed governance message, as PolicyService reads it.
fn governance(field: &str, message: Option<proto::SignedMessage>) -> Result<(), FieldViolation> {
    let message = message.ok_or_else(|| FieldViolation::new(field, "is required"))?;
    let (message, _) = signed_message(field, message.message, message.signature)?;
    check_signed_message(&message);
    Ok(())
}

fn unfreeze(request: proto::UnfreezeRequest) -> Result<(), FieldViolation> {
    let signatures = request.signatures;
    if signatures.is_empty() || signatures.len() > 64 {
        return Err(FieldViolation::new(
            "signatures",
            "must hold 1 to 64 signed messages",
        ));
    }
    for (i, signed) in signatures.into_iter().enumerate() {
        let (message, _) = signed_message(&format!("signatures[{i}]"), signed.message, signed.signature)?;
        check_signed_message(&message);
    }
    Ok(())
}

/// The in-memory log: leaf `i` is the hash of `i` as 8 big-endian bytes.
fn log() -> &'static MemoryNodes {
    static LOG: OnceLock<MemoryNodes> = OnceLock::new();
    LOG.get_or_init(|| {
        let mut nodes = MemoryNodes::new();
        for i in 0..LOG_SIZE {
            nodes.append(merkle::leaf_hash(&i.to_be_bytes()));
        }
        nodes
    })
}

fn root(size: u64) -> [u8; 32] {
    merkle::root(log(), size).expect("every size up to the log's has a root")
}

fn inclusion_proof(request: proto::GetInclusionProofRequest) -> Result<(), FieldViolation> {
    let proto::GetInclusionProofRequest { index, tree_size } = request;
    let proof = merkle::inclusion_proof(log(), index, tree_size);
    // AuditService refuses sizes beyond the log before asking for a proof;
    // past it, the proof code must still only refuse.
    if tree_size > LOG_SIZE {
        return Err(FieldViolation::new(
            "tree_size",
            format!("exceeds the log size {LOG_SIZE}"),
        ));
    }
    match proof {
        Ok(hashes) => {
            let leaf = merkle::leaf_hash(&index.to_be_bytes());
            merkle::verify_inclusion(&leaf, index, tree_size, &hashes, &root(tree_size))
                .expect("a served inclusion proof verifies");
            Ok(())
        }
        Err(MerkleError::IndexOutOfRange { .. }) if index >= tree_size => {
            Err(FieldViolation::new("index", "is outside the tree"))
        }
        Err(e) => panic!("inclusion proof of {index} in {tree_size}: {e}"),
    }
}

fn consistency_proof(request: proto::GetConsistencyProofRequest) -> Result<(), FieldViolation> {
    let proto::GetConsistencyProofRequest { old_size, new_size } = request;
    let proof = merkle::consistency_proof(log(), old_size, new_size);
    if new_size > LOG_SIZE {
        return Err(FieldViolation::new(
            "new_size",
            format!("exceeds the log size {LOG_SIZE}"),
        ));
    }
    match proof {
        Ok(hashes) => {
            merkle::verify_consistency(old_size, new_size, &root(old_size), &root(new_size), &hashes)
                .expect("a served consistency proof verifies");
            Ok(())
        }
        Err(MerkleError::SizesReversed { .. }) if old_size > new_size => {
            Err(FieldViolation::new("old_size", "is larger than new_size"))
        }
        Err(e) => panic!("consistency proof of {old_size} to {new_size}: {e}"),
    }
}

/// A refused request field becomes INVALID_ARGUMENT naming that field.
pub fn check_violation(violation: FieldViolation) {
    assert!(
        !violation.field.is_empty(),
        "violation without a field: {violation:?}"
    );
    assert!(
        !violation.description.is_empty(),
        "violation without a rule: {violation:?}"
    );
    let field = violation.field.clone();
    let status = tonic::Status::from(violation);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with(&field), "{status:?}");
}
