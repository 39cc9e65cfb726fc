//! Decisions as they are recorded: the [`DecisionRecord`] stored with each
//! withdrawal and served to clients, the fixed decisions made without
//! evaluating (frozen, no policy), and the per-window usage written into the
//! decision's audit entry. The engine and the audit replay build them with
//! these same functions, so a replayed decision can be compared field by
//! field with the logged one.

use serde::{Deserialize, Serialize};

use super::{Decision, Outcome, Policy, RollingUsage, Withdrawal};

/// Rolling usage of one limit window, before and after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUsage {
    /// Window length in seconds.
    pub seconds: u64,
    /// Base units counted before, decimal.
    pub amount_before: String,
    /// Withdrawals counted before.
    pub count_before: u64,
    /// Base units counted after, decimal.
    pub amount_after: String,
    /// Withdrawals counted after.
    pub count_after: u64,
}

/// The latest decision on a withdrawal, as stored (JSON in the row).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// The hash of the policy the decision was made under; `None` when no
    /// policy was active. Stored as 64 hex digits, or the empty string for
    /// `None`; anything else is refused when the record is read.
    #[serde(with = "policy_hash_hex")]
    pub policy_hash: Option<[u8; 32]>,
    /// The policy version.
    pub policy_version: u64,
    /// The rule that matched, if one did.
    pub rule: Option<String>,
    /// Stable reason code of a refusal, e.g. `rolling_amount_limit`.
    pub reason_code: Option<String>,
    /// The refusal in words, naming the rule, limit or allowlist.
    pub reason: Option<String>,
    /// Still missing, per group: (group, approvals).
    pub missing_quorum: Vec<(String, u64)>,
    /// Approvers whose approvals counted.
    pub counted_approvers: Vec<String>,
}

/// The decision as stored and served.
pub fn record(decision: &Decision, version: u64) -> DecisionRecord {
    let (reason_code, reason) = match &decision.outcome {
        Outcome::Deny(reason) => (Some(reason.code().to_owned()), Some(reason.to_string())),
        _ => (None, None),
    };
    let missing_quorum = match &decision.outcome {
        Outcome::Pending(missing) => missing.iter().map(|q| (q.group.clone(), q.min as u64)).collect(),
        _ => Vec::new(),
    };
    DecisionRecord {
        policy_hash: Some(decision.policy_hash),
        policy_version: version,
        rule: decision.rule.clone(),
        reason_code,
        reason,
        missing_quorum,
        counted_approvers: decision.counted_approvers.clone(),
    }
}

/// The decision on a withdrawal created while custody is frozen.
pub fn frozen_decision(active: Option<&Policy>) -> DecisionRecord {
    DecisionRecord {
        policy_hash: active.map(|p| p.hash),
        policy_version: active.map_or(0, |p| p.version),
        reason_code: Some("frozen".into()),
        reason: Some(
            "custody is frozen by a security officer; nothing is signed until admins unfreeze".into(),
        ),
        ..DecisionRecord::default()
    }
}

/// The decision on a withdrawal created while no policy is active.
pub fn no_policy_decision() -> DecisionRecord {
    DecisionRecord {
        reason_code: Some("no_policy".into()),
        reason: Some("no policy is active; the default is deny".into()),
        ..DecisionRecord::default()
    }
}

/// Usage of each window of the withdrawal's limit, before and after this
/// decision (after = before plus this withdrawal, if it now counts). The
/// audit replay computes the same from the log.
pub fn window_usage<U: RollingUsage + ?Sized>(
    policy: &Policy,
    w: &Withdrawal<'_>,
    usage: &U,
    now: u64,
    counted: bool,
) -> Vec<WindowUsage> {
    let amount = w.intent.total_amount();
    policy
        .limits
        .iter()
        .filter(|l| l.wallet == w.wallet && l.asset == w.intent.asset.symbol)
        .flat_map(|l| &l.windows)
        .map(|window| {
            let (used, count) = usage.within(now, window.seconds);
            let (after, count_after) = if counted {
                (used.saturating_add(amount), count + 1)
            } else {
                (used, count)
            };
            WindowUsage {
                seconds: window.seconds,
                amount_before: used.to_string(),
                count_before: count,
                amount_after: after.to_string(),
                count_after,
            }
        })
        .collect()
}

impl DecisionRecord {
    /// The policy hash as the stored record and the API write it: 64 hex
    /// digits, or empty when no policy was active.
    pub fn policy_hash_hex(&self) -> String {
        policy_hash_hex::text(&self.policy_hash)
    }

    /// The policy hash as a decision's audit entry carries it: all zeros
    /// when no policy was active.
    pub fn logged_policy_hash(&self) -> [u8; 32] {
        self.policy_hash.unwrap_or([0u8; 32])
    }
}

/// The stored form of [`DecisionRecord::policy_hash`].
mod policy_hash_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    /// 64 hex digits, or the empty string for `None`.
    pub fn text(hash: &Option<[u8; 32]>) -> String {
        hash.map(hex::encode).unwrap_or_default()
    }

    pub fn serialize<S: Serializer>(hash: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        let hash = <[u8; 32]>::try_from(bytes)
            .map_err(|_| serde::de::Error::custom("a policy hash is 32 bytes (64 hex digits)"))?;
        Ok(Some(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored JSON is what it was when the hash was a hex string, and a
    /// hash that does not decode to 32 bytes is refused, not read as zeros.
    #[test]
    fn the_policy_hash_is_stored_as_hex_and_read_strictly() {
        let with = DecisionRecord {
            policy_hash: Some([0xab; 32]),
            ..DecisionRecord::default()
        };
        let json = serde_json::to_string(&with).unwrap();
        assert!(
            json.starts_with(&format!("{{\"policy_hash\":\"{}\"", "ab".repeat(32))),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<DecisionRecord>(&json).unwrap(), with);
        let without = serde_json::to_string(&DecisionRecord::default()).unwrap();
        assert!(without.starts_with("{\"policy_hash\":\"\""), "{without}");
        assert_eq!(
            serde_json::from_str::<DecisionRecord>(&without)
                .unwrap()
                .policy_hash,
            None
        );
        for bad in ["zz", "abab", &"ab".repeat(33)] {
            let json = without.replacen("\"policy_hash\":\"\"", &format!("\"policy_hash\":\"{bad}\""), 1);
            assert!(serde_json::from_str::<DecisionRecord>(&json).is_err(), "{bad}");
        }
    }
}
