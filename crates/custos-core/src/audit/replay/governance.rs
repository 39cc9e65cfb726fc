//! Replaying governance: policy proposals, admin signatures, activations
//! (an admin quorum of the version active before, versions only forward,
//! allowlists anchored at activation), and freezes and unfreezes.

use super::*;

impl Replayer {
    pub(super) fn policy_proposed(&mut self, index: u64, hash: &[u8; 32], version: u64, document: &[u8]) {
        let policy = match Policy::parse(document) {
            Ok(p) if p.hash != *hash => Err(format!(
                "the document hashes to {}, not to the logged {}",
                hex::encode(p.hash),
                hex::encode(hash)
            )),
            Ok(p) if p.version != version => Err(format!(
                "the document is version {}, the entry says {version}",
                p.version
            )),
            Ok(p) => Ok(p),
            Err(e) => Err(format!("the document does not parse: {e}")),
        };
        let policy = match policy {
            Ok(p) => Some(p),
            Err(detail) => {
                self.flag(index, code::POLICY_INVALID, detail);
                None
            }
        };
        if self.proposals.contains_key(hash) {
            return self.flag(
                index,
                code::POLICY_INVALID,
                format!("policy {} was already proposed", hex::encode(hash)),
            );
        }
        match &self.active {
            Some(active) if version <= active.policy.version => self.flag(
                index,
                code::VERSION_NOT_NEWER,
                format!(
                    "version {version} is not newer than the active version {}",
                    active.policy.version
                ),
            ),
            Some(_) => {}
            // Only the genesis is proposed without an active policy, and it
            // is activated in the same transaction.
            None => {
                self.expect = Some(Expect::Activation { index, hash: *hash });
            }
        }
        self.proposals.insert(
            *hash,
            Proposal {
                version,
                policy,
                approvals: Vec::new(),
            },
        );
    }

    pub(super) fn policy_approved(
        &mut self,
        index: u64,
        time: u64,
        hash: &[u8; 32],
        message: &[u8],
        signature: &[u8],
    ) {
        let parsed = GovernanceMessage::parse(message).ok();
        let service_id = match &parsed {
            Some(m) => self.service_id(&m.service_id),
            None => self.report.service_id.clone().unwrap_or_default(),
        };
        let problem = match (&self.active, self.proposals.get(hash)) {
            (None, _) => Some("no policy was active to govern it".to_owned()),
            (_, None) => Some(format!(
                "policy {} is not a pending proposal: never proposed, already activated, or below the active version",
                hex::encode(hash)
            )),
            (Some(active), Some(proposal)) => GovernanceMessage::verify_signed(
                message,
                signature,
                GovernanceAction::ActivatePolicy,
                &service_id,
                &active.policy,
                time,
            )
            .map_err(|e| format!("{e} (checked against policy version {})", active.policy.version))
            .and_then(|m| {
                if m.subject != *hash {
                    Err(format!("the message signs policy {}", hex::encode(m.subject)))
                } else if proposal.version <= active.policy.version {
                    Err(format!(
                        "version {} is not newer than the active version {}",
                        proposal.version, active.policy.version
                    ))
                } else if m.sequence != proposal.version {
                    Err(format!(
                        "the message names version {}, the proposal is version {}",
                        m.sequence, proposal.version
                    ))
                } else if proposal.approvals.iter().any(|a| a.admin == m.signer) {
                    Err(format!("{} already signed this policy", m.signer))
                } else {
                    Ok(())
                }
            })
            .err(),
        };
        if let Some(problem) = &problem {
            self.flag(index, code::POLICY_APPROVAL_INVALID, problem.clone());
        }
        let Some(proposal) = self.proposals.get_mut(hash) else {
            return;
        };
        proposal.approvals.push(PolicySignature {
            admin: parsed.map(|m| m.signer).unwrap_or_default(),
            message: message.to_vec(),
            signature: signature.to_vec(),
            signed_at: time,
        });
        if let (None, Some(active)) = (problem, &self.active) {
            let signers = valid_signers(
                &active.policy,
                hash,
                proposal.version,
                &proposal.approvals,
                &service_id,
            );
            if signers.len() >= active.policy.admin_quorum {
                self.expect = Some(Expect::Activation { index, hash: *hash });
            }
        }
    }

    pub(super) fn policy_activated(&mut self, index: u64, time: u64, hash: &[u8; 32], version: u64) {
        self.report.policy_versions += 1;
        let Some(proposal) = self.proposals.remove(hash) else {
            return self.flag(
                index,
                code::ACTIVATION_UNAUTHORIZED,
                format!(
                    "policy {} is not a pending proposal; replay keeps the policy active before it",
                    hex::encode(hash)
                ),
            );
        };
        let Some(mut policy) = proposal.policy else {
            return self.flag(
                index,
                code::ACTIVATION_UNAUTHORIZED,
                format!(
                    "policy {}'s document is invalid; replay keeps the policy active before it",
                    hex::encode(hash)
                ),
            );
        };
        if policy.version != version {
            self.flag(
                index,
                code::POLICY_INVALID,
                format!(
                    "the entry activates version {version}, the document is version {}",
                    policy.version
                ),
            );
        }
        let tainted = match &self.active {
            None => {
                self.report.genesis_policy_hash = Some(*hash);
                false
            }
            Some(previous) => {
                let mut problems = Vec::new();
                if policy.version <= previous.policy.version {
                    problems.push((
                        code::VERSION_NOT_NEWER,
                        format!(
                            "version {} is not newer than the active version {}",
                            policy.version, previous.policy.version
                        ),
                    ));
                }
                let service_id = self.report.service_id.clone().unwrap_or_default();
                let signers = valid_signers(
                    &previous.policy,
                    hash,
                    policy.version,
                    &proposal.approvals,
                    &service_id,
                );
                if signers.len() < previous.policy.admin_quorum {
                    problems.push((
                        code::ACTIVATION_UNAUTHORIZED,
                        format!(
                            "version {} has valid signatures by {} of the {} admins of version {} it needs ({:?})",
                            policy.version,
                            signers.len(),
                            previous.policy.admin_quorum,
                            previous.policy.version,
                            signers
                        ),
                    ));
                }
                anchor_allowlists(Some(&previous.policy), &mut policy, time);
                let tainted = previous.tainted || !problems.is_empty();
                for (code, detail) in problems {
                    self.flag(index, code, detail);
                }
                tainted
            }
        };
        // A proposal at or below the new version can never activate.
        let floor = policy.version;
        self.proposals.retain(|_, p| p.version > floor);
        self.active = Some(Active { policy, tainted });
    }

    pub(super) fn freeze(
        &mut self,
        index: u64,
        time: u64,
        epoch: u64,
        signatures: &[(Vec<u8>, Vec<u8>)],
        freeze: bool,
    ) {
        let (action, verb) = if freeze {
            (GovernanceAction::Freeze, "freeze")
        } else {
            (GovernanceAction::Unfreeze, "unfreeze")
        };
        if let Some(m) = signatures
            .first()
            .and_then(|(m, _)| GovernanceMessage::parse(m).ok())
        {
            self.service_id(&m.service_id);
        }
        let service_id = self.report.service_id.clone().unwrap_or_default();
        let mut problems = Vec::new();
        if self.frozen == freeze {
            problems.push(format!(
                "custody is {}",
                if freeze { "already frozen" } else { "not frozen" }
            ));
        }
        if epoch != self.epoch {
            problems.push(format!(
                "it names epoch {epoch}, the current epoch is {}",
                self.epoch
            ));
        }
        match &self.active {
            None => problems.push("no policy is active".to_owned()),
            Some(active) => {
                let mut signers = BTreeSet::new();
                for (message, signature) in signatures {
                    match GovernanceMessage::verify_signed(
                        message,
                        signature,
                        action,
                        &service_id,
                        &active.policy,
                        time,
                    ) {
                        Err(e) => problems.push(e.to_string()),
                        Ok(m) if m.sequence != self.epoch => problems.push(format!(
                            "{}'s message names epoch {}, the current epoch is {}",
                            m.signer, m.sequence, self.epoch
                        )),
                        Ok(m) => {
                            if !signers.insert(m.signer.clone()) {
                                problems.push(format!("{} signed more than once", m.signer));
                            }
                        }
                    }
                }
                let needed = if freeze { 1 } else { active.policy.admin_quorum };
                if freeze && signatures.len() != 1 {
                    problems.push(format!(
                        "a freeze carries one security officer's signature, not {}",
                        signatures.len()
                    ));
                } else if signers.len() < needed {
                    problems.push(format!(
                        "{} valid signatures of the {needed} policy version {} needs",
                        signers.len(),
                        active.policy.version
                    ));
                }
                if active.tainted {
                    problems.push(format!(
                        "policy version {}, whose roster it was checked against, was not validly activated",
                        active.policy.version
                    ));
                }
            }
        }
        let valid = problems.is_empty();
        if !valid {
            self.flag(
                index,
                code::FREEZE_INVALID,
                format!("the {verb} is not valid: {}", problems.join("; ")),
            );
        }
        self.frozen = freeze;
        self.epoch = epoch.saturating_add(1);
        if valid {
            self.held = freeze;
        }
    }
}
