//! Checkpoints and the signed notes that carry them, as specified by C2SP
//! tlog-checkpoint and signed-note (docs/audit-log.md, with vectors).
//!
//! ```text
//! <origin>\n<tree size>\n<base64 root hash>\n      the checkpoint (note text)
//! \n
//! — <key name> base64(key ID || signature)\n        one line per signature
//! ```
//!
//! The log key signs with Ed25519 (signature type 0x01, the default) or, on
//! HSMs without EdDSA, ECDSA P-256 over SHA-256 (type 0x02, DER signatures,
//! key ID from the SPKI encoding, as transparency-dev/witness does). This
//! module only verifies; signing happens in the HSM
//! (the server's `Hsm::sign_log_message`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k256::sha2::{Digest, Sha256};

use crate::key::KeyKind;

/// Signature type byte of Ed25519 note signatures.
pub const TYPE_ED25519: u8 = 0x01;
/// Signature type byte of ECDSA note signatures.
pub const TYPE_ECDSA: u8 = 0x02;

/// Why a checkpoint or note is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// Not a well-formed note or checkpoint.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// A note, a checkpoint or a verifier key.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// No signature line from the pinned key.
    #[error("the note has no signature by {0}")]
    NotSigned(String),
    /// A signature line from the pinned key does not verify.
    #[error("the signature by {0} does not verify")]
    BadSignature(String),
}

fn malformed(what: &'static str, reason: &'static str) -> NoteError {
    NoteError::Malformed { what, reason }
}

/// A checkpoint: the log's origin, size and root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line, which is also the key name.
    pub origin: String,
    /// Number of entries.
    pub size: u64,
    /// RFC 6962 root hash of those entries.
    pub root: [u8; 32],
}

impl Checkpoint {
    /// The note text: origin, size and base64 root, each ending in a newline.
    pub fn text(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, BASE64.encode(self.root))
    }

    /// Parses a note text. Extension lines after the root are ignored, as
    /// tlog-checkpoint requires; the signature covers them all the same.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let what = "checkpoint";
        let body = text
            .strip_suffix('\n')
            .ok_or(malformed(what, "does not end in a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(malformed(what, "empty origin"))?;
        let size = lines.next().ok_or(malformed(what, "no tree size"))?;
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return Err(malformed(what, "tree size is not a decimal number"));
        }
        let size = size
            .parse()
            .map_err(|_| malformed(what, "tree size out of range"))?;
        let root = lines.next().ok_or(malformed(what, "no root hash"))?;
        let root = BASE64
            .decode(root)
            .ok()
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or(malformed(what, "root hash is not base64 of 32 bytes"))?;
        if lines.any(str::is_empty) {
            return Err(malformed(what, "empty extension line"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// A note key's public half, as an auditor pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    /// Key name: the log's origin.
    pub name: String,
    /// Ed25519 or P-256.
    pub kind: KeyKind,
    /// The 4-byte key ID.
    pub key_id: [u8; 4],
    /// Ed25519: the 32-byte key; P-256: the SPKI DER encoding.
    pub key: Vec<u8>,
}

impl NoteVerifier {
    /// The verifier for a log key as the HSM reports it: 32 bytes for
    /// Ed25519, a SEC1 point for P-256.
    pub fn new(name: &str, kind: KeyKind, public_key: &[u8]) -> Result<Self, NoteError> {
        let what = "verifier key";
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
            return Err(malformed(what, "key name is empty or has a space or '+'"));
        }
        let (key, key_id) = match kind {
            KeyKind::Ed25519 => {
                let key = ed25519_dalek::VerifyingKey::try_from(public_key)
                    .map_err(|_| malformed(what, "not an Ed25519 public key"))?
                    .to_bytes()
                    .to_vec();
                let mut hasher = Sha256::new();
                hasher.update(name.as_bytes());
                hasher.update([b'\n', TYPE_ED25519]);
                hasher.update(&key);
                (key, first_four(&hasher.finalize()))
            }
            KeyKind::P256 => {
                use p256::pkcs8::EncodePublicKey as _;
                let spki = p256::PublicKey::from_sec1_bytes(public_key)
                    .map_err(|_| malformed(what, "not a P-256 public key"))?
                    .to_public_key_der()
                    .map_err(|_| malformed(what, "P-256 key has no SPKI encoding"))?
                    .as_bytes()
                    .to_vec();
                let key_id = first_four(&Sha256::digest(&spki));
                (spki, key_id)
            }
            KeyKind::Secp256k1 => return Err(malformed(what, "secp256k1 keys do not sign notes")),
        };
        Ok(Self {
            name: name.to_owned(),
            kind,
            key_id,
            key,
        })
    }

    fn type_byte(&self) -> u8 {
        match self.kind {
            KeyKind::P256 => TYPE_ECDSA,
            _ => TYPE_ED25519,
        }
    }

    /// The verifier key string: `name+hex(key ID)+base64(type || key)`, the
    /// form Go's `golang.org/x/mod/sumdb/note` and the witness tools read.
    pub fn encode(&self) -> String {
        let mut typed = vec![self.type_byte()];
        typed.extend_from_slice(&self.key);
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(self.key_id),
            BASE64.encode(typed)
        )
    }

    /// Parses [`NoteVerifier::encode`]'s output; the key ID must match the key.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let what = "verifier key";
        // Names have no '+', base64 may: split from the left.
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed(what, "expected name+keyid+key"));
        };
        let typed = BASE64
            .decode(key)
            .map_err(|_| malformed(what, "key is not base64"))?;
        let verifier = match typed.split_first() {
            Some((&TYPE_ED25519, key)) => Self::new(name, KeyKind::Ed25519, key)?,
            Some((&TYPE_ECDSA, spki)) => {
                use p256::pkcs8::DecodePublicKey as _;
                let key = p256::PublicKey::from_public_key_der(spki)
                    .map_err(|_| malformed(what, "not a P-256 SPKI key"))?;
                Self::new(name, KeyKind::P256, key.to_sec1_bytes().as_ref())?
            }
            _ => return Err(malformed(what, "unknown signature type")),
        };
        if hex::encode(verifier.key_id) != id {
            return Err(malformed(what, "key ID does not match the key"));
        }
        Ok(verifier)
    }

    /// Whether `signature` (without the key ID) signs `text` under this key.
    pub fn verifies(&self, text: &[u8], signature: &[u8]) -> bool {
        match self.kind {
            KeyKind::Ed25519 => {
                let Ok(key) = ed25519_dalek::VerifyingKey::try_from(self.key.as_slice()) else {
                    return false;
                };
                let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
                    return false;
                };
                key.verify_strict(text, &signature).is_ok()
            }
            KeyKind::P256 => {
                use p256::ecdsa::signature::Verifier as _;
                use p256::pkcs8::DecodePublicKey as _;
                let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_der(&self.key) else {
                    return false;
                };
                let Ok(signature) = p256::ecdsa::Signature::from_der(signature) else {
                    return false;
                };
                key.verify(text, &signature).is_ok()
            }
            KeyKind::Secp256k1 => false,
        }
    }

    /// The note signature in its on-the-wire form for this key: Ed25519's 64
    /// bytes as they are, ECDSA's raw `r || s` from PKCS#11 as DER.
    pub fn wire_signature(&self, raw: &[u8]) -> Result<Vec<u8>, NoteError> {
        match self.kind {
            KeyKind::P256 => Ok(p256::ecdsa::Signature::from_slice(raw)
                .map_err(|_| malformed("signature", "not a P-256 r || s"))?
                .to_der()
                .as_bytes()
                .to_vec()),
            _ => Ok(raw.to_vec()),
        }
    }

    /// A whole signed note: `text`, a blank line, and this key's signature line.
    pub fn signed_note(&self, text: &str, wire_signature: &[u8]) -> String {
        let mut signature = self.key_id.to_vec();
        signature.extend_from_slice(wire_signature);
        format!("{text}\n\u{2014} {} {}\n", self.name, BASE64.encode(signature))
    }

    /// Opens a signed note: returns its text when a signature line by this
    /// key verifies. Signatures by other keys are ignored; a failing one by
    /// this key refuses the note, as signed-note says clients should.
    pub fn open<'n>(&self, note: &'n str) -> Result<&'n str, NoteError> {
        let what = "note";
        if note.bytes().any(|b| b < 0x20 && b != b'\n') {
            return Err(malformed(what, "control character"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or(malformed(what, "no blank line before the signatures"))?;
        let (text, signatures) = (&note[..=split], &note[split + 2..]);
        let signatures = signatures
            .strip_suffix('\n')
            .ok_or(malformed(what, "does not end in a newline"))?;
        let mut verified = false;
        for line in signatures.split('\n') {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or(malformed(what, "signature line does not start with an em dash"))?;
            let (name, signature) = rest
                .split_once(' ')
                .ok_or(malformed(what, "signature line has no key name"))?;
            let signature = BASE64
                .decode(signature)
                .map_err(|_| malformed(what, "signature is not base64"))?;
            if signature.len() < 5 {
                return Err(malformed(what, "signature shorter than a key ID"));
            }
            if name != self.name || signature[..4] != self.key_id {
                continue;
            }
            if !self.verifies(text.as_bytes(), &signature[4..]) {
                return Err(NoteError::BadSignature(self.name.clone()));
            }
            verified = true;
        }
        if verified {
            Ok(text)
        } else {
            Err(NoteError::NotSigned(self.name.clone()))
        }
    }

    /// Opens a signed checkpoint, which must name this key's log as origin.
    pub fn open_checkpoint(&self, note: &str) -> Result<Checkpoint, NoteError> {
        let checkpoint = Checkpoint::parse(self.open(note)?)?;
        if checkpoint.origin != self.name {
            return Err(malformed("checkpoint", "origin is not the pinned log's"));
        }
        Ok(checkpoint)
    }
}

fn first_four(hash: &[u8]) -> [u8; 4] {
    [hash[0], hash[1], hash[2], hash[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8032 test 1's public key; only verification is exercised here (the
    // log key's signing lives in the HSM and is tested against SoftHSM).
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn verifier() -> NoteVerifier {
        NoteVerifier::new(
            "custos.example/log",
            KeyKind::Ed25519,
            &hex::decode(RFC8032_PUBLIC).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn checkpoint_text_round_trips_and_is_strict() {
        let checkpoint = Checkpoint {
            origin: "custos.example/log".into(),
            size: 7,
            root: [0xAB; 32],
        };
        let text = checkpoint.text();
        assert_eq!(
            text,
            "custos.example/log\n7\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n"
        );
        assert_eq!(Checkpoint::parse(&text).unwrap(), checkpoint);
        assert_eq!(Checkpoint::parse(&format!("{text}ext\n")).unwrap(), checkpoint);
        for bad in [
            "custos.example/log\n07\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n",
            "custos.example/log\n-7\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n",
            "custos.example/log\n7\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=",
            "custos.example/log\n7\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urqw==\n",
            "\n7\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n",
            "custos.example/log\n7\n",
        ] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ed25519_key_id_follows_signed_note() {
        let v = verifier();
        let mut hasher = Sha256::new();
        hasher.update(b"custos.example/log\n\x01");
        hasher.update(hex::decode(RFC8032_PUBLIC).unwrap());
        assert_eq!(v.key_id, hasher.finalize()[..4]);
        let encoded = v.encode();
        assert!(encoded.starts_with(&format!("custos.example/log+{}+Addam", hex::encode(v.key_id))));
        assert_eq!(NoteVerifier::parse(&encoded).unwrap(), v);
        let wrong_id = encoded.replacen(&hex::encode(v.key_id), "00000000", 1);
        assert!(NoteVerifier::parse(&wrong_id).is_err());
    }

    #[test]
    fn ed25519_verification_matches_rfc8032_test_1() {
        let signature = hex::decode(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        )
        .unwrap();
        let v = verifier();
        assert!(v.verifies(b"", &signature));
        assert!(!v.verifies(b"x", &signature));
        let mut flipped = signature.clone();
        flipped[10] ^= 1;
        assert!(!v.verifies(b"", &flipped));
    }

    /// The vectors in docs/audit-log.md: RFC 8032 test key 1 as the log key of
    /// `custos.example/log`, signing the checkpoint of the eleven sample
    /// entries. (The signature was made by an independent implementation;
    /// custos itself only verifies.)
    #[test]
    fn published_checkpoint_vectors() {
        let v = verifier();
        let vkey = "custos.example/log+8da55de5+AddamAGCsQq31Uv+08lkBzoO4XLz2qYjJa8CGmj3B1Ea";
        assert_eq!(v.encode(), vkey);
        let note = "custos.example/log\n11\n1itfjLiv8lx3QmneN4BunifsuO6YF30eGfmBeJJG74A=\n\n\u{2014} custos.example/log jaVd5dmm7vUTPOERDwb4/JYfQVSfkFeCH2dik0MucL+uujngNiXNmqnBpzlQFHCE9YDQcX8aRy+sK99os+oLOoMt1AY=\n";
        let checkpoint = NoteVerifier::parse(vkey).unwrap().open_checkpoint(note).unwrap();
        assert_eq!(checkpoint.size, 11);
        assert_eq!(
            hex::encode(checkpoint.root),
            "d62b5f8cb8aff25c774269de37806e9e27ecb8ee98177d1e19f981789246ef80"
        );
        let spec: String = include_str!("../../../../docs/audit-log.md")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        for value in [
            vkey,
            "jaVd5dmm7vUTPOERDwb4/JYfQVSfkFeCH2dik0MucL+uujngNiXNmqnBpzlQFHCE9YDQcX8aRy+sK99os+oLOoMt1AY=",
            "1itfjLiv8lx3QmneN4BunifsuO6YF30eGfmBeJJG74A=",
        ] {
            assert!(spec.contains(value), "docs/audit-log.md lacks {value}");
        }
    }

    #[test]
    fn note_without_the_pinned_key_or_with_a_bad_signature_is_refused() {
        let v = verifier();
        let text = "custos.example/log\n1\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n";
        let unsigned_by_us = format!(
            "{text}\n\u{2014} someone.else AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
        );
        assert!(matches!(v.open(&unsigned_by_us), Err(NoteError::NotSigned(_))));
        let forged = v.signed_note(text, &[0u8; 64]);
        assert!(matches!(v.open(&forged), Err(NoteError::BadSignature(_))));
        assert!(v.open("no blank line\n").is_err());
        assert!(v.open(&format!("{text}\n\u{2014} x\n")).is_err());
    }
}
