//! A person's own key on their own PKCS#11 token, for the `custos` CLI:
//! one short session per operation, no pool.
//!
//! This is not the wallet path. Wallet keys are used only through [`crate::hsm::Hsm`],
//! which signs nothing but digests custos computed from a parsed transaction.
//! A personal key signs the SHA-256 prehash of an approval or governance
//! message that the CLI built and showed its holder.

use std::path::Path;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use k256::ecdsa::VerifyingKey;

use crate::hsm::{HsmError, KeyKind, TokenKeyKind, TokenSelector, keys, tool_session};
use crate::secret::Pin;

fn open(module: &Path, token: &TokenSelector, pin: &Pin) -> Result<Session, HsmError> {
    tool_session(module, token, pin).map(|(_, _, session)| session)
}

fn find(session: &Session, class: ObjectClass, label: &str) -> Result<ObjectHandle, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| HsmError::from_cryptoki("find personal key", e))?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(HsmError::KeyMissing(label.to_owned())),
        _ => Err(HsmError::Malformed("more than one key object with this label")),
    }
}

/// Generates a sensitive, non-extractable secp256k1 key pair labelled `label`.
pub fn generate(
    module: &Path,
    token: &TokenSelector,
    label: &str,
    pin: &Pin,
) -> Result<VerifyingKey, HsmError> {
    let session = open(module, token, pin)?;
    if find(&session, ObjectClass::PRIVATE_KEY, label).is_ok() {
        return Err(HsmError::Malformed(
            "a key with this label already exists on the token",
        ));
    }
    let mut id = vec![0u8; 16];
    getrandom::fill(&mut id).map_err(|_| HsmError::Malformed("no randomness for CKA_ID"))?;
    let kind = KeyKind::Secp256k1;
    let (public_template, private_template) = keys::templates(kind, label, &id);
    let (public, private) = session
        .generate_key_pair(&kind.keygen_mechanism(), &public_template, &private_template)
        .map_err(|e| HsmError::from_cryptoki("generate key pair", e))?;
    keys::read_back(&session, label, kind, private)?;
    let point = keys::read_public_key(&session, kind, public)?;
    VerifyingKey::from_sec1_bytes(&point).map_err(|_| HsmError::Malformed("secp256k1 public key"))
}

/// Signs `prehash` with the key labelled `label`; returns the raw `r || s`
/// and the key's public key.
pub fn sign(
    module: &Path,
    token: &TokenSelector,
    label: &str,
    pin: &Pin,
    prehash: &[u8; 32],
) -> Result<(Vec<u8>, VerifyingKey), HsmError> {
    let session = open(module, token, pin)?;
    let private = find(&session, ObjectClass::PRIVATE_KEY, label)?;
    let public = find(&session, ObjectClass::PUBLIC_KEY, label)?;
    let point = keys::read_public_key(&session, KeyKind::Secp256k1, public)?;
    let key =
        VerifyingKey::from_sec1_bytes(&point).map_err(|_| HsmError::Malformed("secp256k1 public key"))?;
    let signature = session
        .sign(&Mechanism::Ecdsa, private, prehash)
        .map_err(|e| HsmError::from_cryptoki("sign", e))?;
    Ok((signature, key))
}
