//! Approval-message parsing: bytes as an approval message
//! (`SubmitApproval`) and as a governance message (`ApprovePolicy`,
//! `Freeze`, `Unfreeze`), which share one set of conventions.
//!
//! Properties: parsing never panics; a message that parses re-encodes to
//! exactly the input; no bytes are both kinds (see
//! [`custos_fuzz::check_signed_message`]). Inputs longer than a signature
//! are also split into `message || 64-byte signature` and verified as a
//! submission under the example policy: verification never panics, and one
//! that succeeds is for this service, by a rostered signer, unexpired.

#![no_main]

use libfuzzer_sys::fuzz_target;
use custos_fuzz::{NOW, SERVICE_ID, check_signed_message, example_policy};

use custos_core::approval::ApprovalMessage;
use custos_core::governance::{GovernanceAction, GovernanceMessage};

fuzz_target!(|data: &[u8]| {
    check_signed_message(data);
    let Some(split) = data.len().checked_sub(64) else {
        return;
    };
    let (message, signature) = data.split_at(split);
    let policy = example_policy();
    if let Ok((parsed, approval)) = ApprovalMessage::verify_submitted(message, signature, SERVICE_ID, policy)
    {
        assert_eq!(ApprovalMessage::parse(message).as_ref(), Ok(&parsed));
        assert_eq!(parsed.service_id, SERVICE_ID);
        assert!(
            policy.approver(&parsed.approver).is_some(),
            "verified an approver off the roster"
        );
        assert_eq!(approval, parsed.to_approval());
    }
    for action in [
        GovernanceAction::ActivatePolicy,
        GovernanceAction::Freeze,
        GovernanceAction::Unfreeze,
    ] {
        if let Ok(parsed) =
            GovernanceMessage::verify_signed(message, signature, action, SERVICE_ID, policy, NOW)
        {
            assert_eq!(parsed.action, action);
            assert_eq!(parsed.service_id, SERVICE_ID);
            assert!(parsed.expires_at > NOW, "verified an expired governance message");
            let may_sign = match action {
                GovernanceAction::Freeze => policy.security_officers.contains(&parsed.signer),
                _ => policy.admins.contains_key(&parsed.signer),
            };
            assert!(may_sign, "{} verified for {:?}", action.name(), parsed.signer);
        }
    }
});
