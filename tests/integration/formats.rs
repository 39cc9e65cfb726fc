//! Published formats checked against independent implementations.

use std::process::Command;

/// tests/intent_vectors.py, written from docs/approval-format.md alone,
/// reproduces every committed intent vector byte for byte.
#[test]
fn python_implementation_reproduces_intent_vectors() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/tests/intent_vectors.py"))
        .arg(format!("{root}/tests/vectors/intent.json"))
        .output()
        .expect("python3 (scripts/ensure-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");
}

/// Runs tests/approval_sign.py, the independent Python approver tool, with
/// `args` and returns its JSON output.
pub(crate) fn python_approval(args: &[&str]) -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/tests/approval_sign.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// An approval built and signed by tests/approval_sign.py (an independent
/// implementation of docs/approval-format.md, standard-library Python) is
/// accepted; changing any single field, or the signature, is refused.
#[test]
fn approval_signed_by_independent_implementation_is_accepted_and_every_field_binds() {
    use custos_core::approval::{ApprovalError, ApprovalMessage};
    use custos_core::policy::Vote;

    let secret = "0101010101010101010101010101010101010101010101010101010101010101";
    let intent_hash = "11".repeat(32);
    let policy_hash = "22".repeat(32);
    let out = python_approval(&[
        secret,
        "custos-dev",
        "wd_0123456789abcdef",
        &intent_hash,
        &policy_hash,
        "approve",
        "1800000000",
        "alice",
    ]);
    let message_bytes = hex::decode(out["message_hex"].as_str().unwrap()).unwrap();
    let signature = hex::decode(out["signature_hex"].as_str().unwrap()).unwrap();
    let key = k256::ecdsa::VerifyingKey::from_sec1_bytes(
        &hex::decode(out["public_key_hex"].as_str().unwrap()).unwrap(),
    )
    .unwrap();

    let message = ApprovalMessage::parse(&message_bytes).unwrap();
    assert_eq!(message.encode(), message_bytes);
    assert_eq!(hex::encode(message.digest()), out["digest_hex"].as_str().unwrap());
    assert_eq!(message.withdrawal_id, "wd_0123456789abcdef");
    assert_eq!(message.vote, Vote::Approve);
    message.verify(&signature, &key).unwrap();

    // RFC 6979 in Python and in k256 give the same signature: two
    // implementations agree on the digest and on the curve arithmetic.
    let test_key = k256::ecdsa::SigningKey::from_slice(&hex::decode(secret).unwrap()).unwrap();
    let (k256_sig, _) = test_key.sign_prehash_recoverable(&message.digest());
    assert_eq!(k256_sig.normalize_s().to_bytes().to_vec(), signature);

    let mut changed = Vec::new();
    let mut m = message.clone();
    m.service_id = "custos-prod".into();
    changed.push(m);
    let mut m = message.clone();
    m.withdrawal_id = "wd_0123456789abcdeg".into();
    changed.push(m);
    let mut m = message.clone();
    m.intent_hash[0] ^= 1;
    changed.push(m);
    let mut m = message.clone();
    m.policy_hash[31] ^= 1;
    changed.push(m);
    let mut m = message.clone();
    m.vote = Vote::Reject;
    changed.push(m);
    let mut m = message.clone();
    m.expires_at -= 1;
    changed.push(m);
    let mut m = message.clone();
    m.approver = "bob".into();
    changed.push(m);
    for m in changed {
        assert_eq!(
            m.verify(&signature, &key),
            Err(ApprovalError::InvalidSignature),
            "{m:?}"
        );
    }
    for index in [0, 31, 32, 63] {
        let mut bad = signature.clone();
        bad[index] ^= 1;
        assert!(
            message.verify(&bad, &key).is_err(),
            "flipped signature byte {index}"
        );
    }

    // A rejection signed by the same tool parses as a rejection.
    let reject = python_approval(&[
        secret,
        "custos-dev",
        "wd_0123456789abcdef",
        &intent_hash,
        &policy_hash,
        "reject",
        "1800000000",
        "alice",
    ]);
    let reject_message =
        ApprovalMessage::parse(&hex::decode(reject["message_hex"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(reject_message.vote, Vote::Reject);
    reject_message
        .verify(
            &hex::decode(reject["signature_hex"].as_str().unwrap()).unwrap(),
            &key,
        )
        .unwrap();
}

/// `custos intent` decodes a transaction locally, without a server, and
/// prints the intent hash published for it; a refused transaction exits
/// non-zero with the field and the reason.
#[test]
fn cli_intent_reproduces_the_published_vector() {
    let vectors: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/intent.json")).unwrap(),
    )
    .unwrap();
    let expected = &vectors["vectors"][0];
    let args = |rlp: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_custos"));
        command.args([
            "--json",
            "intent",
            "ethereum",
            "--rlp",
            rlp,
            "--chain-id",
            "1",
            "--from",
            "0x9d8A62f656a8d1615C1294fd71e9CFb3E4855A4F",
        ]);
        command.output().unwrap()
    };
    let output =
        args("0xec098504a817c800825208943535353535353535353535353535353535353535880de0b6b3a764000080018080");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["intent_hash"], expected["intent_hash"]);
    assert_eq!(printed["destinations"], expected["intent"]["destinations"]);

    let refused = args("01c0");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("rlp: EIP-2930 transactions (type 1) are refused")
    );
}
