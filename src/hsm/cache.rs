//! Keys on the token: generating them (with the read-back check), finding
//! them by CKA_ID, and caching their handles and public keys so that no
//! signature pays for a lookup; a handle from an older epoch is resolved
//! again and must keep its public key.

use super::*;

impl Inner {
    pub(super) fn forget_handles(&self) {
        for key in write(&self.keys).values_mut() {
            key.private = None;
        }
    }

    pub(super) fn generate(
        &self,
        session: &Session,
        kind: KeyKind,
        label_base: &str,
    ) -> Result<GeneratedKey, HsmError> {
        let id = session
            .generate_random_vec(KEY_ID_LEN as u32)
            .map_err(|e| HsmError::from_cryptoki("generate key id", e))?;
        if id.len() != KEY_ID_LEN {
            return Err(HsmError::Malformed("C_GenerateRandom output length"));
        }
        let label = &format!("{label_base}-{}", hex::encode(&id[..4]));
        let taken = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| HsmError::from_cryptoki("find key by label", e))?;
        if !taken.is_empty() {
            return Err(HsmError::KeyRefused {
                label: label.to_owned(),
                attribute: "CKA_LABEL",
                actual: "already used on the token".into(),
                required: "unique",
            });
        }
        let (public_template, private_template) = keys::templates(kind, label, &id);
        let (public, private) = session
            .generate_key_pair(&kind.keygen_mechanism(), &public_template, &private_template)
            .map_err(|e| HsmError::from_cryptoki("generate key pair", e))?;
        let checked = keys::read_back(session, label, kind, private)
            .and_then(|attributes| Ok((attributes, keys::read_public_key(session, kind, public)?)));
        let (attributes, public_key) = match checked {
            Ok(ok) => ok,
            Err(refusal) => {
                tracing::error!(%label, error = %refusal, "generated key refused; destroying it");
                for object in [private, public] {
                    if let Err(e) = session.destroy_object(object) {
                        let e = HsmError::from_cryptoki("destroy refused key", e);
                        tracing::error!(%label, error = %e, "could not destroy refused key");
                    }
                }
                return Err(refusal);
            }
        };
        let id = KeyId(id);
        write(&self.keys).insert(
            id.clone(),
            CachedKey {
                kind,
                private: Some((self.stamp(), private)),
                public_key: public_key.clone(),
            },
        );
        Ok(GeneratedKey {
            id,
            label: label.to_owned(),
            public_key,
            attributes,
        })
    }

    pub(super) fn load_key(
        &self,
        session: &Session,
        kind: KeyKind,
        id: &KeyId,
    ) -> Result<LoadedKey, HsmError> {
        let (private, attributes, public_key) = self.resolve(session, kind, id)?;
        self.cache_checked(id, kind, private, &public_key)?;
        Ok(LoadedKey {
            public_key,
            attributes,
        })
    }

    /// Finds a key pair by CKA_ID and checks it: attributes of the private
    /// key, and the public key's point.
    pub(super) fn resolve(
        &self,
        session: &Session,
        kind: KeyKind,
        id: &KeyId,
    ) -> Result<(ObjectHandle, KeyAttributes, Vec<u8>), HsmError> {
        let (private, public) = keys::find_pair(session, id.as_bytes())?;
        let attributes = keys::read_back(session, &id.to_string(), kind, private)?;
        let public_key = keys::read_public_key(session, kind, public)?;
        Ok((private, attributes, public_key))
    }

    /// Caches a handle, refusing one whose public key differs from the one
    /// already cached for this id.
    pub(super) fn cache_checked(
        &self,
        id: &KeyId,
        kind: KeyKind,
        private: ObjectHandle,
        public_key: &[u8],
    ) -> Result<(), HsmError> {
        let stamp = self.stamp();
        let mut keys = write(&self.keys);
        if let Some(known) = keys.get(id)
            && (known.public_key != public_key || known.kind != kind)
        {
            tracing::error!(key_id = %id, "key on token differs from the cached public key; refusing it");
            return Err(HsmError::KeyMismatch(id.to_string()));
        }
        keys.insert(
            id.clone(),
            CachedKey {
                kind,
                private: Some((stamp, private)),
                public_key: public_key.to_vec(),
            },
        );
        Ok(())
    }

    /// Signs `input` with the cached key `id`, which must be of `kind`: a
    /// wallet key is never used for log messages, nor the audit key for
    /// transactions.
    pub(super) fn sign(
        &self,
        session: &Session,
        id: &KeyId,
        kind: KeyKind,
        input: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let stamp = self.stamp();
        let cached = read(&self.keys)
            .get(id)
            .map(|k| (k.kind, k.private))
            .ok_or_else(|| HsmError::KeyMissing(id.to_string()))?;
        let handle = match cached {
            (cached_kind, _) if cached_kind != kind => return Err(HsmError::KeyMismatch(id.to_string())),
            (_, Some((resolved, handle))) if resolved == stamp => handle,
            _ => self.re_resolve(session, kind, id)?,
        };
        let count = || {
            if kind == KeyKind::Secp256k1 {
                self.wallet_sign_calls.fetch_add(1, Ordering::Relaxed);
            }
        };
        count();
        match sign_raw(session, kind, handle, input) {
            Err(e) if e.is_stale_handle() => {
                tracing::warn!(key_id = %id, error = %e, "stale key handle; re-resolving by CKA_ID");
                let handle = self.re_resolve(session, kind, id)?;
                count();
                sign_raw(session, kind, handle, input)
            }
            other => other,
        }
    }

    pub(super) fn re_resolve(
        &self,
        session: &Session,
        kind: KeyKind,
        id: &KeyId,
    ) -> Result<ObjectHandle, HsmError> {
        let (private, _, public_key) = self.resolve(session, kind, id)?;
        self.cache_checked(id, kind, private, &public_key)?;
        Ok(private)
    }
}

#[derive(Debug, Clone)]
pub(super) struct CachedKey {
    pub(super) kind: KeyKind,
    /// The private key handle and when it was resolved.
    pub(super) private: Option<(Stamp, ObjectHandle)>,
    pub(super) public_key: Vec<u8>,
}

pub(super) fn sign_raw(
    session: &Session,
    kind: KeyKind,
    key: ObjectHandle,
    input: &[u8],
) -> Result<Vec<u8>, HsmError> {
    let _timer = crate::metrics::hsm_sign_timer(kind);
    session
        .sign(&kind.sign_mechanism(), key, input)
        .map_err(|e| HsmError::from_cryptoki("sign", e))
}
