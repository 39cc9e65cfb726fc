//! Approver signature verification against Project Wycheproof's secp256k1
//! ECDSA vectors, vendored under tests/data/wycheproof (see its README).
//!
//! The main function under test is `custos_core::approval::verify_prehash`, the lowest
//! layer that takes (public key, SHA-256 prehash, signature). Every approval
//! reaches it unchanged: `SubmitApproval` hands the message and signature
//! bytes to `ApprovalMessage::verify_submitted`, which calls
//! `ApprovalMessage::verify`, which calls `verify_prehash(&digest, signature,
//! roster_key)`. Governance signatures go through the same function. The
//! P1363 vectors also drive `custos_core::signature::finalize`, the HSM signature
//! post-processing (normalise, verify, recovery id).
//!
//! custos accepts exactly one signature format, 64 bytes of `r || s`, and
//! only low-S. So:
//! - p1363 vectors are fed as they are; "valid" ones with high S must be
//!   refused as high-S, and are counted apart;
//! - Bitcoin vectors are DER. Fed as they are, every one must be refused.
//!   Then each strict-DER one is re-encoded as `r || s` and fed again; one
//!   that is not strict DER cannot be written in custos's format at all.

use std::collections::BTreeSet;

use k256::ecdsa::VerifyingKey;
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::sha2::{Digest, Sha256};
use serde::Deserialize;

use custos_core::approval::{ApprovalError, verify_prehash};
use custos_core::signature::{SignatureError, finalize};

const P1363: &str = include_str!("../data/wycheproof/ecdsa_secp256k1_sha256_p1363_test.json");
const BITCOIN: &str = include_str!("../data/wycheproof/ecdsa_secp256k1_sha256_bitcoin_test.json");

/// floor(n / 2) for the secp256k1 group order n, big-endian. `s` above this
/// is high (BIP-62, EIP-2). Written out here rather than taken from custos,
/// so that the test does not share custos's idea of "high".
const HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x5d,
    0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// What custos did with one file's vectors. Each field is pinned below, so a
/// change in what custos accepts or why it refuses breaks the test.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Vectors iterated; must equal the file's `numberOfTests`.
    vectors: usize,
    /// Labelled "valid", low-S, and accepted.
    accepted: usize,
    /// Labelled "valid" but with high S: refused by design (`HighS`).
    refused_valid_high_s: usize,
    /// Labelled "invalid" and refused, for whichever reason below.
    refused_invalid: usize,
    /// Labelled "acceptable" and refused.
    refused_acceptable: usize,
    /// Of the refused "invalid" ones: not strict DER, or an integer longer
    /// than 32 bytes, so not expressible as the `r || s` custos takes.
    invalid_not_expressible: usize,
    /// Of the refused "invalid" ones: `BadSignatureEncoding` (length, or
    /// `r`/`s` outside [1, n-1]).
    invalid_bad_encoding: usize,
    /// Of the refused "invalid" ones: `HighS`.
    invalid_high_s: usize,
    /// Of the refused "invalid" ones: `InvalidSignature` (did not verify).
    invalid_unverified: usize,
    /// Bitcoin file: vectors whose DER bytes, fed as they are, were refused.
    der_as_is_refused: usize,
}

const P1363_EXPECTED: Tally = Tally {
    vectors: 252,
    accepted: 95,
    refused_valid_high_s: 72,
    refused_invalid: 85,
    refused_acceptable: 0,
    invalid_not_expressible: 0,
    // 18 not 64 bytes, 50 with r or s outside [1, n-1].
    invalid_bad_encoding: 68,
    invalid_high_s: 8,
    invalid_unverified: 9,
    der_as_is_refused: 0,
};

const BITCOIN_EXPECTED: Tally = Tally {
    vectors: 463,
    accepted: 162,
    refused_valid_high_s: 0,
    refused_invalid: 301,
    refused_acceptable: 0,
    // BER, negative or oversized integers, wrong tags, truncations, ...
    invalid_not_expressible: 232,
    invalid_bad_encoding: 50,
    invalid_high_s: 4,
    invalid_unverified: 15,
    der_as_is_refused: 463,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TestFile {
    number_of_tests: usize,
    test_groups: Vec<TestGroup>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TestGroup {
    #[serde(rename = "type")]
    kind: String,
    public_key: GroupKey,
    sha: String,
    tests: Vec<Vector>,
}

#[derive(Deserialize)]
struct GroupKey {
    curve: String,
    uncompressed: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Vector {
    tc_id: u32,
    comment: String,
    flags: Vec<String>,
    msg: String,
    sig: String,
    result: Label,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Label {
    Valid,
    Invalid,
    Acceptable,
}

#[test]
fn p1363_vectors() {
    let (tally, mismatches) = run(P1363, "EcdsaP1363Verify", Format::P1363);
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(tally, P1363_EXPECTED);
}

#[test]
fn bitcoin_vectors() {
    let (tally, mismatches) = run(BITCOIN, "EcdsaBitcoinVerify", Format::Der);
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(tally, BITCOIN_EXPECTED);
}

/// The HSM signature post-processing (`custos_core::signature::finalize`) over
/// the same P1363 vectors, with the wallet key in the key's place. It
/// normalises `s` before verifying, so every "valid" vector, low- or high-S,
/// must come out as a low-S signature that k256 verifies and that recovers
/// to the key with the recovery id found; every "invalid" one is refused.
#[test]
fn p1363_vectors_through_hsm_post_processing() {
    let file: TestFile = serde_json::from_str(P1363).unwrap();
    let (mut accepted, mut refused) = (0, 0);
    for group in &file.test_groups {
        let key = roster_key(&group.public_key.uncompressed);
        for vector in &group.tests {
            let prehash: [u8; 32] = Sha256::digest(hex::decode(&vector.msg).unwrap()).into();
            let raw = hex::decode(&vector.sig).unwrap();
            let context = format!("tcId {} ({})", vector.tc_id, vector.comment);
            match (vector.result, finalize(&raw, &prehash, &key)) {
                (Label::Valid, Ok(done)) => {
                    key.verify_prehash(&prehash, done.signature())
                        .unwrap_or_else(|e| panic!("{context}: released signature does not verify: {e}"));
                    let recovered =
                        VerifyingKey::recover_from_prehash(&prehash, done.signature(), done.recovery_id())
                            .unwrap_or_else(|e| panic!("{context}: recovery failed: {e}"));
                    assert_eq!(recovered, key, "{context}: wrong recovery id");
                    accepted += 1;
                }
                (Label::Invalid, Err(_)) => refused += 1,
                (label, outcome) => panic!("{context}: {label:?} vector gave {outcome:?}"),
            }
        }
    }
    // 95 low-S and 72 high-S valid vectors; all 85 invalid ones.
    assert_eq!((accepted, refused), (167, 85));
}

/// Upstream Wycheproof added this vector to the Bitcoin file (tcId 464)
/// after the version vendored here: r = p - n + 1 with x(kG) = 1. An
/// implementation that compares x(R) with r + n without reducing mod p
/// would accept it.
#[test]
fn r_plus_n_past_p_is_refused() {
    let key = roster_key(
        "042ff2a886e60b814963cf60db62cc4d0510efca3220833013e1f97891b655f9c6\
         aa6df83c7e059539e4342f82067d80502f31bdb81cdfaf56a348b8201ad0b092",
    );
    let der = hex::decode("30160211014551231950b75fc4402da1722fc9baef020101").unwrap();
    let raw = der_to_raw(&der).expect("strict DER with 17- and 1-byte integers");
    let prehash: [u8; 32] = Sha256::digest(b"").into();
    assert_eq!(
        verify_prehash(&prehash, &raw, &key),
        Err(ApprovalError::InvalidSignature)
    );
    assert!(verify_prehash(&prehash, &der, &key).is_err());
    assert_eq!(
        finalize(&raw, &prehash, &key).map(|_| ()),
        Err(SignatureError::VerificationFailed)
    );
}

/// How a file writes its signatures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `r || s`, custos's own format: fed as is.
    P1363,
    /// DER: fed as is (must be refused), then re-encoded as `r || s`.
    Der,
}

/// Feeds every vector of `json` to `verify_prehash` and returns the tally
/// and one line per vector that custos handled unexpectedly.
fn run(json: &str, group_type: &str, format: Format) -> (Tally, Vec<String>) {
    let file: TestFile = serde_json::from_str(json).unwrap();
    let mut tally = Tally::default();
    let mut mismatches = Vec::new();
    let mut ids = BTreeSet::new();
    for group in &file.test_groups {
        assert_eq!(group.kind, group_type);
        assert_eq!(group.public_key.curve, "secp256k1");
        assert_eq!(group.sha, "SHA-256");
        let key = roster_key(&group.public_key.uncompressed);
        for vector in &group.tests {
            assert!(ids.insert(vector.tc_id), "duplicate tcId {}", vector.tc_id);
            tally.vectors += 1;
            let prehash: [u8; 32] = Sha256::digest(hex::decode(&vector.msg).unwrap()).into();
            let sig = hex::decode(&vector.sig).unwrap();
            let context = format!(
                "tcId {} ({}, {:?}, {:?})",
                vector.tc_id, vector.comment, vector.flags, vector.result
            );
            let raw = match format {
                Format::P1363 => Some(sig),
                Format::Der => {
                    match verify_prehash(&prehash, &sig, &key) {
                        Ok(()) => mismatches.push(format!("{context}: DER bytes accepted as is")),
                        Err(_) => tally.der_as_is_refused += 1,
                    }
                    der_to_raw(&sig).map(|raw| raw.to_vec())
                }
            };
            let Some(raw) = raw else {
                match vector.result {
                    Label::Invalid => {
                        tally.refused_invalid += 1;
                        tally.invalid_not_expressible += 1;
                    }
                    _ => mismatches.push(format!("{context}: not expressible as r || s")),
                }
                continue;
            };
            let outcome = verify_prehash(&prehash, &raw, &key);
            // Bitcoin's own malleability vector is `s` negated: custos must
            // refuse it for being high-S, not merely for some other reason.
            let malleated = vector
                .flags
                .iter()
                .any(|flag| flag == "SignatureMalleabilityBitcoin");
            if malleated && outcome != Err(ApprovalError::HighS) {
                mismatches.push(format!("{context}: malleated signature not refused as high-S"));
            }
            match (vector.result, outcome) {
                (Label::Valid, Ok(())) if !is_high_s(&raw) => tally.accepted += 1,
                (Label::Valid, Err(ApprovalError::HighS)) if is_high_s(&raw) => {
                    tally.refused_valid_high_s += 1;
                }
                (Label::Invalid, Err(error)) => {
                    tally.refused_invalid += 1;
                    match error {
                        ApprovalError::BadSignatureEncoding(_) => tally.invalid_bad_encoding += 1,
                        ApprovalError::HighS => tally.invalid_high_s += 1,
                        ApprovalError::InvalidSignature => tally.invalid_unverified += 1,
                        other => mismatches.push(format!("{context}: refused for {other:?}")),
                    }
                }
                (Label::Acceptable, Err(_)) => tally.refused_acceptable += 1,
                (_, outcome) => mismatches.push(format!("{context}: custos returned {outcome:?}")),
            }
        }
    }
    assert_eq!(tally.vectors, file.number_of_tests, "numberOfTests");
    (tally, mismatches)
}

/// The group's key as the policy roster would hold it: roster keys are
/// 33-byte compressed SEC1, so the uncompressed point is compressed here
/// (by hand, not by k256) and parsed the way the roster parses it.
fn roster_key(uncompressed: &str) -> VerifyingKey {
    let point = hex::decode(uncompressed).unwrap();
    assert_eq!((point.len(), point[0]), (65, 0x04), "uncompressed SEC1");
    let mut compressed = [0u8; 33];
    compressed[0] = 0x02 | (point[64] & 1);
    compressed[1..].copy_from_slice(&point[1..33]);
    let key = VerifyingKey::from_sec1_bytes(&compressed).unwrap();
    assert_eq!(key, VerifyingKey::from_sec1_bytes(&point).unwrap());
    key
}

/// Whether a 64-byte `r || s` has `s > n/2`.
fn is_high_s(raw: &[u8]) -> bool {
    raw.len() == 64 && raw[32..] > HALF_ORDER[..]
}

/// Strict DER `SEQUENCE { INTEGER r, INTEGER s }` (the BIP-66 rules) to
/// 64-byte `r || s`. `None` if the bytes are not strict DER or an integer
/// does not fit in 32 bytes. Range checks on r and s are left to custos.
fn der_to_raw(der: &[u8]) -> Option<[u8; 64]> {
    let [0x30, len, body @ ..] = der else {
        return None;
    };
    // Short-form length only: a SEQUENCE of two 33-byte integers is 70 bytes.
    if *len >= 0x80 || usize::from(*len) != body.len() {
        return None;
    }
    let (r, rest) = der_unsigned(body)?;
    let (s, rest) = der_unsigned(rest)?;
    if !rest.is_empty() {
        return None;
    }
    let mut raw = [0u8; 64];
    raw[32 - r.len()..32].copy_from_slice(r);
    raw[64 - s.len()..].copy_from_slice(s);
    Some(raw)
}

/// One strict DER INTEGER that is not negative: its magnitude (without the
/// sign byte), at most 32 bytes, and the bytes after it.
fn der_unsigned(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let [0x02, len, rest @ ..] = input else {
        return None;
    };
    let len = usize::from(*len);
    if len == 0 || len >= 0x80 || rest.len() < len {
        return None;
    }
    let (int, rest) = rest.split_at(len);
    let negative = int[0] & 0x80 != 0;
    // A leading zero is allowed only to keep the next byte's top bit from
    // reading as a sign.
    let padded = int.len() > 1 && int[0] == 0 && int[1] & 0x80 == 0;
    if negative || padded {
        return None;
    }
    let magnitude = if int.len() > 1 && int[0] == 0 {
        &int[1..]
    } else {
        int
    };
    (magnitude.len() <= 32).then_some((magnitude, rest))
}
