//! Policy governance on the custody engine: genesis at initialisation,
//! proposals, admin co-signing and activation, freeze and unfreeze.
//!
//! - Genesis: the first policy comes from the configuration, and its admin
//!   keys must be exactly the keys pinned in the configuration. On every
//!   later start the stored history is checked again: the genesis admins
//!   against the pins, and each later version against admin-quorum
//!   signatures by its predecessor's admins. A store edited behind custos's
//!   back fails this check and custos refuses to start.
//! - A proposal becomes active once admins of the *active* version reach its
//!   admin quorum with signatures over its hash. Versions only go forward.
//! - Freeze takes one security officer's signature; unfreeze the admin quorum.
//!   Both name the current freeze epoch, so each message works once.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::{Custody, CustodyError, precondition};
use crate::clock::unix_now;
use crate::store::audit as audit_store;
use crate::store::governance::{self as gov_store, PolicyRow};
use custos_core::audit::entry::Event as AuditEvent;
use custos_core::governance::{GovernanceAction, GovernanceMessage, anchor_allowlists};
use custos_core::governance::{PolicySignature, valid_signers};
use custos_core::policy::Policy;
use custos_core::policy::document::PublicKey;

/// An activated policy version, with its allowlist entries anchored in
/// server time (see [`anchor_allowlists`]).
#[derive(Debug, Clone)]
pub struct ActivePolicy {
    /// The parsed policy, allowlist times anchored.
    pub policy: Policy,
    /// The exact document admins signed.
    pub document: Vec<u8>,
    /// Unix seconds.
    pub activated_at: u64,
}

/// The governance state as served.
#[derive(Debug, Clone)]
pub struct GovernanceView {
    /// The policy asked for (the active one by default).
    pub policy: Option<Arc<ActivePolicy>>,
    /// Admin signatures that activated it (none for genesis).
    pub signatures: Vec<PolicySignature>,
    /// The active version.
    pub active_version: Option<u64>,
    /// Whether custody is frozen.
    pub frozen: bool,
    /// The epoch the next freeze or unfreeze must name.
    pub freeze_epoch: u64,
}

/// A proposed policy and how far its approval has come.
#[derive(Debug, Clone)]
pub struct ProposalView {
    /// Policy hash.
    pub hash: [u8; 32],
    /// Declared version.
    pub version: u64,
    /// Admins of the active version whose signatures count.
    pub signers: Vec<String>,
    /// Signatures the active policy requires.
    pub required: usize,
    /// Whether it is now the active policy.
    pub activated: bool,
}

/// The genesis policy and the admin keys it must carry, from the configuration.
#[derive(Debug, Clone)]
pub struct Genesis {
    /// The genesis document, exact bytes.
    pub document: Vec<u8>,
    /// SEC1 compressed admin keys pinned in the configuration.
    pub pinned_admin_keys: BTreeSet<Vec<u8>>,
}

/// Rebuilds an activated version from the store, anchoring allowlists along
/// the activation history.
pub(crate) fn load_version(
    conn: crate::store::sql::Conn<'_>,
    version: u64,
) -> Result<ActivePolicy, CustodyError> {
    let history = gov_store::activated_history(conn)?;
    let mut previous: Option<ActivePolicy> = None;
    for row in history.into_iter().take_while(|r| r.version <= version) {
        previous = Some(anchored(previous.as_ref(), &row)?);
    }
    previous
        .filter(|p| p.policy.version == version)
        .ok_or_else(|| CustodyError::Inconsistent(format!("active policy version {version} is not stored")))
}

fn anchored(previous: Option<&ActivePolicy>, row: &PolicyRow) -> Result<ActivePolicy, CustodyError> {
    let mut policy = Policy::parse(&row.document)
        .map_err(|e| CustodyError::Inconsistent(format!("stored policy version {}: {e}", row.version)))?;
    if policy.hash != row.hash || policy.version != row.version {
        return Err(CustodyError::Inconsistent(format!(
            "stored policy version {} does not hash to the hash its admins signed",
            row.version
        )));
    }
    let activated_at = row.activated_at.unwrap_or(row.proposed_at);
    anchor_allowlists(previous.map(|p| &p.policy), &mut policy, activated_at);
    Ok(ActivePolicy {
        policy,
        document: row.document.clone(),
        activated_at,
    })
}

fn admin_key_set(policy: &Policy) -> BTreeSet<Vec<u8>> {
    policy
        .admins
        .values()
        .map(|PublicKey::Secp256k1(k)| k.to_sec1_bytes().to_vec())
        .collect()
}

impl Custody {
    /// Sets the genesis policy on a new store, or checks the stored history
    /// on an existing one, and loads every activated version.
    pub async fn initialise(&self, genesis: Option<Genesis>) -> Result<(), CustodyError> {
        let service_id = self.service_id.clone();
        let loaded = self
            .blocking(move |store| {
                store.write(|tx| {
                    let frozen = gov_store::state(tx)?.frozen;
                    let mut history = gov_store::activated_history(tx)?;
                    if history.is_empty() {
                        let Some(genesis) = &genesis else {
                            tracing::warn!("no policy configured or stored: every withdrawal will be denied");
                            return Ok((Vec::new(), frozen));
                        };
                        let policy = Policy::parse(&genesis.document)
                            .map_err(|e| precondition("invalid_genesis", format!("genesis policy: {e}")))?;
                        let now = unix_now();
                        let mut row = PolicyRow {
                            hash: policy.hash,
                            version: policy.version,
                            document: genesis.document.clone(),
                            proposed_at: now,
                            activated_at: None,
                        };
                        gov_store::insert_policy(tx, &row)?;
                        gov_store::activate(tx, &row.hash, row.version, now)?;
                        row.activated_at = Some(now);
                        audit_store::append(tx, now, proposed_event(&row))?;
                        audit_store::append(tx, now, activated_event(&row))?;
                        tracing::info!(version = row.version, hash = %hex::encode(row.hash), "genesis policy activated");
                        history.push(row);
                    }
                    let mut loaded: Vec<ActivePolicy> = Vec::with_capacity(history.len());
                    for row in &history {
                        let policy = anchored(loaded.last(), row)?;
                        match loaded.last() {
                            None => {
                                if let Some(genesis) = &genesis
                                    && admin_key_set(&policy.policy) != genesis.pinned_admin_keys
                                {
                                    return Err(precondition(
                                        "genesis_mismatch",
                                        "the genesis policy's admin keys are not the admin keys pinned in the configuration",
                                    ));
                                }
                            }
                            Some(previous) => {
                                let signatures = gov_store::policy_signatures(tx, &row.hash)?;
                                let signers =
                                    valid_signers(&previous.policy, &row.hash, row.version, &signatures, &service_id);
                                if signers.len() < previous.policy.admin_quorum {
                                    return Err(precondition(
                                        "policy_history_unverified",
                                        format!(
                                            "stored policy version {} lacks an admin quorum of version {} ({} of {})",
                                            row.version,
                                            previous.policy.version,
                                            signers.len(),
                                            previous.policy.admin_quorum
                                        ),
                                    ));
                                }
                            }
                        }
                        loaded.push(policy);
                    }
                    Ok((loaded, frozen))
                })
            })
            .await?;
        let (loaded, frozen) = loaded;
        self.frozen_hint.store(frozen, Ordering::SeqCst);
        let mut cache = self.policies.write().unwrap_or_else(PoisonError::into_inner);
        for policy in loaded {
            cache.insert(policy.policy.version, Arc::new(policy));
        }
        Ok(())
    }

    /// The governance state, with the policy of `version` (default: active).
    pub async fn governance(&self, version: Option<u64>) -> Result<GovernanceView, CustodyError> {
        let this = self.snapshot();
        self.blocking(move |store| {
            store.read(|conn| {
                let state = gov_store::state(conn)?;
                let wanted = version.or(state.active_version);
                let policy = match wanted {
                    None => None,
                    Some(v) => match this.policies.get(&v) {
                        Some(p) => Some(Arc::clone(p)),
                        None => match gov_store::activated(conn, v)? {
                            Some(_) => Some(Arc::new(load_version(conn, v)?)),
                            None => return Err(CustodyError::NotFound(format!("policy version {v}"))),
                        },
                    },
                };
                let signatures = match &policy {
                    Some(p) => gov_store::policy_signatures(conn, &p.policy.hash)?,
                    None => Vec::new(),
                };
                Ok(GovernanceView {
                    policy,
                    signatures,
                    active_version: state.active_version,
                    frozen: state.frozen,
                    freeze_epoch: state.freeze_epoch,
                })
            })
        })
        .await
    }

    /// Stores a proposed policy version. It does nothing until admins approve it.
    pub async fn propose_policy(&self, document: Vec<u8>) -> Result<ProposalView, CustodyError> {
        let parsed = Policy::parse(&document).map_err(|e| CustodyError::InvalidArgument {
            field: "document".into(),
            reason: e.to_string(),
        })?;
        let this = self.snapshot();
        self.blocking(move |store| {
            store.write(|tx| {
                let state = gov_store::state(tx)?;
                let active = this.active_policy(tx, state.active_version)?.ok_or_else(|| {
                    precondition(
                        "no_policy",
                        "no active policy: set a genesis policy in the configuration",
                    )
                })?;
                if parsed.version <= active.policy.version {
                    return Err(precondition(
                        "version_not_newer",
                        format!(
                            "policy version {} is not newer than the active version {}",
                            parsed.version, active.policy.version
                        ),
                    ));
                }
                let row = PolicyRow {
                    hash: parsed.hash,
                    version: parsed.version,
                    document,
                    proposed_at: unix_now(),
                    activated_at: None,
                };
                gov_store::insert_policy(tx, &row).map_err(|e| match e {
                    crate::store::StoreError::Conflict(_) => CustodyError::AlreadyExists(format!(
                        "policy {} is already proposed",
                        hex::encode(row.hash)
                    )),
                    other => other.into(),
                })?;
                audit_store::append(tx, row.proposed_at, proposed_event(&row))?;
                tracing::info!(version = row.version, hash = %hex::encode(row.hash), "policy proposed");
                Ok(ProposalView {
                    hash: row.hash,
                    version: row.version,
                    signers: Vec::new(),
                    required: active.policy.admin_quorum,
                    activated: false,
                })
            })
        })
        .await
    }

    /// Records an admin's signature over a proposed policy and activates it
    /// once the active policy's admin quorum is met.
    pub async fn approve_policy(
        &self,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<ProposalView, CustodyError> {
        let parsed = GovernanceMessage::parse(&message)?;
        let this = self.snapshot();
        let (view, activated) = self
            .blocking(move |store| {
                store.write(|tx| {
                    let state = gov_store::state(tx)?;
                    let active = this
                        .active_policy(tx, state.active_version)?
                        .ok_or_else(|| precondition("no_policy", "no active policy"))?;
                    let now = unix_now();
                    let verified = GovernanceMessage::verify_signed(
                        &message,
                        &signature,
                        GovernanceAction::ActivatePolicy,
                        &this.service_id,
                        &active.policy,
                        now,
                    )?;
                    let row = gov_store::policy(tx, &parsed.subject)?.ok_or_else(|| {
                        CustodyError::NotFound(format!("proposed policy {}", hex::encode(parsed.subject)))
                    })?;
                    if row.activated_at.is_some() || row.version <= active.policy.version {
                        return Err(precondition(
                            "version_not_newer",
                            format!(
                                "policy version {} is not newer than the active version {}",
                                row.version, active.policy.version
                            ),
                        ));
                    }
                    if verified.sequence != row.version {
                        return Err(custos_core::governance::GovernanceError::WrongSequence {
                            what: "policy version",
                            found: verified.sequence,
                            expected: row.version,
                        }
                        .into());
                    }
                    gov_store::insert_policy_signature(
                        tx,
                        &row.hash,
                        &PolicySignature {
                            admin: verified.signer.clone(),
                            message: message.clone(),
                            signature: signature.clone(),
                            signed_at: now,
                        },
                    )
                    .map_err(|e| match e {
                        crate::store::StoreError::Conflict(_) => CustodyError::AlreadyExists(format!(
                            "{} already signed policy {}",
                            verified.signer,
                            hex::encode(row.hash)
                        )),
                        other => other.into(),
                    })?;
                    audit_store::append(
                        tx,
                        now,
                        AuditEvent::PolicyApproved {
                            hash: row.hash,
                            message: message.clone(),
                            signature: signature.clone(),
                        },
                    )?;
                    let signatures = gov_store::policy_signatures(tx, &row.hash)?;
                    let signers = valid_signers(
                        &active.policy,
                        &row.hash,
                        row.version,
                        &signatures,
                        &this.service_id,
                    );
                    let required = active.policy.admin_quorum;
                    let activated = if signers.len() >= required {
                        gov_store::activate(tx, &row.hash, row.version, now)?;
                        audit_store::append(tx, now, activated_event(&row))?;
                        let activated_row = PolicyRow {
                            activated_at: Some(now),
                            ..row.clone()
                        };
                        Some(anchored(Some(&active), &activated_row)?)
                    } else {
                        None
                    };
                    Ok((
                        ProposalView {
                            hash: row.hash,
                            version: row.version,
                            signers,
                            required,
                            activated: activated.is_some(),
                        },
                        activated,
                    ))
                })
            })
            .await?;
        if let Some(policy) = activated {
            tracing::info!(version = view.version, hash = %hex::encode(view.hash), "policy activated");
            self.policies
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(policy.policy.version, Arc::new(policy));
        }
        Ok(view)
    }

    /// Freezes custody on one security officer's signature: nothing is signed
    /// and new withdrawals are denied until admins unfreeze.
    pub async fn freeze(&self, message: Vec<u8>, signature: Vec<u8>) -> Result<GovernanceView, CustodyError> {
        let this = self.snapshot();
        self.blocking(move |store| {
            store.write(|tx| {
                let state = gov_store::state(tx)?;
                if state.frozen {
                    return Err(precondition("already_frozen", "custody is already frozen"));
                }
                let active = this
                    .active_policy(tx, state.active_version)?
                    .ok_or_else(|| precondition("no_policy", "no active policy"))?;
                let now = unix_now();
                let m = GovernanceMessage::verify_signed(
                    &message,
                    &signature,
                    GovernanceAction::Freeze,
                    &this.service_id,
                    &active.policy,
                    now,
                )?;
                check_epoch(&m, state.freeze_epoch)?;
                let record = serde_json::json!([{
                    "signer": m.signer,
                    "message": hex::encode(&message),
                    "signature": hex::encode(&signature),
                }]);
                gov_store::set_frozen(tx, true, state.freeze_epoch, &record.to_string(), now)?;
                audit_store::append(
                    tx,
                    now,
                    AuditEvent::Frozen {
                        epoch: state.freeze_epoch,
                        signatures: vec![(message.clone(), signature.clone())],
                    },
                )?;
                tracing::warn!(officer = %m.signer, "custody frozen");
                Ok(())
            })
        })
        .await?;
        self.frozen_hint.store(true, Ordering::SeqCst);
        self.governance(None).await
    }

    /// Lifts a freeze on the admin quorum's signatures, all given at once,
    /// then signs the withdrawals the freeze held.
    pub async fn unfreeze(&self, signed: Vec<(Vec<u8>, Vec<u8>)>) -> Result<GovernanceView, CustodyError> {
        let this = self.snapshot();
        self.blocking(move |store| {
            store.write(|tx| {
                let state = gov_store::state(tx)?;
                if !state.frozen {
                    return Err(precondition("not_frozen", "custody is not frozen"));
                }
                let active = this
                    .active_policy(tx, state.active_version)?
                    .ok_or_else(|| precondition("no_policy", "no active policy"))?;
                let now = unix_now();
                let mut signers = BTreeSet::new();
                let mut record = Vec::new();
                for (message, signature) in &signed {
                    let m = GovernanceMessage::verify_signed(
                        message,
                        signature,
                        GovernanceAction::Unfreeze,
                        &this.service_id,
                        &active.policy,
                        now,
                    )?;
                    check_epoch(&m, state.freeze_epoch)?;
                    if !signers.insert(m.signer.clone()) {
                        return Err(CustodyError::InvalidArgument {
                            field: "signatures".into(),
                            reason: format!("{} signed more than once", m.signer),
                        });
                    }
                    record.push(serde_json::json!({
                        "signer": m.signer,
                        "message": hex::encode(message),
                        "signature": hex::encode(signature),
                    }));
                }
                if signers.len() < active.policy.admin_quorum {
                    return Err(CustodyError::PermissionDenied(format!(
                        "unfreezing needs {} admin signatures; {} given",
                        active.policy.admin_quorum,
                        signers.len()
                    )));
                }
                gov_store::set_frozen(
                    tx,
                    false,
                    state.freeze_epoch,
                    &serde_json::Value::from(record).to_string(),
                    now,
                )?;
                audit_store::append(
                    tx,
                    now,
                    AuditEvent::Unfrozen {
                        epoch: state.freeze_epoch,
                        signatures: signed.clone(),
                    },
                )?;
                tracing::warn!(admins = ?signers, "custody unfrozen");
                Ok(())
            })
        })
        .await?;
        self.frozen_hint.store(false, Ordering::SeqCst);
        self.resume().await?;
        self.governance(None).await
    }
}

fn proposed_event(row: &PolicyRow) -> AuditEvent {
    AuditEvent::PolicyProposed {
        hash: row.hash,
        version: row.version,
        document: row.document.clone(),
    }
}

fn activated_event(row: &PolicyRow) -> AuditEvent {
    AuditEvent::PolicyActivated {
        hash: row.hash,
        version: row.version,
    }
}

fn check_epoch(m: &GovernanceMessage, epoch: u64) -> Result<(), CustodyError> {
    if m.sequence != epoch {
        return Err(custos_core::governance::GovernanceError::WrongSequence {
            what: "freeze epoch",
            found: m.sequence,
            expected: epoch,
        }
        .into());
    }
    Ok(())
}
