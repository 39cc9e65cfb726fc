//! The decision core: `evaluate(policy, withdrawal, usage, approvals, now)`.
//!
//! Checks run in a fixed order, and the first failure decides:
//! 1. wallet and network;
//! 2. asset registration;
//! 3. fee caps;
//! 4. per-transaction limit;
//! 5. rolling windows;
//! 6. rules, where the first match wins and no match denies.
//!
//! A `require` rule counts only approvals for this withdrawal, this intent
//! hash and this policy hash that have not expired. Each must come from a
//! rostered approver other than the initiator, and each approver counts once.
//! The quorums must be met by distinct people: one approver never fills two
//! slots. A rejection by a member of a required group denies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use alloy_primitives::U256;

use super::document::{Action, GroupQuorum, Policy, Rule};
use crate::chain::{FeeTerms, Intent};

/// The withdrawal being decided.
#[derive(Debug, Clone, Copy)]
pub struct Withdrawal<'a> {
    /// Withdrawal id (approvals name it).
    pub id: &'a str,
    /// Wallet id.
    pub wallet: &'a str,
    /// CKA_LABEL of the wallet's HSM key, which the policy binds.
    pub key_label: &'a str,
    /// The intent parsed from the transaction.
    pub intent: &'a Intent,
    /// The intent's hash.
    pub intent_hash: [u8; 32],
    /// Who submitted it.
    pub initiator: &'a str,
}

/// Withdrawals already counted against the limits of this wallet and asset:
/// (unix seconds, amount in base units), signed or approved ones only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Counted withdrawals, in any order.
    pub entries: Vec<(u64, U256)>,
}

impl Usage {
    /// Amount and count of entries after `now - seconds`. Entries stamped
    /// after `now` (a clock that stepped back) count too, so that a clock
    /// change can never free up a limit.
    pub fn within(&self, now: u64, seconds: u64) -> (U256, u64) {
        let start = now.saturating_sub(seconds);
        self.entries
            .iter()
            .filter(|(at, _)| *at > start)
            .fold((U256::ZERO, 0), |(sum, n), (_, a)| {
                (sum.saturating_add(*a), n + 1)
            })
    }
}

/// Rolling usage as the limit checks read it. [`Usage`], the plain list of
/// counted withdrawals, defines the meaning; the engine's usage cache and the
/// audit replay both count with running totals
/// ([`super::usage::UsageLedger`]), so that a decision costs O(log n) rather
/// than a scan of every counted withdrawal.
pub trait RollingUsage {
    /// Amount and count of counted withdrawals stamped after `now - seconds`,
    /// including any stamped after `now`.
    fn within(&self, now: u64, seconds: u64) -> (U256, u64);
}

impl RollingUsage for Usage {
    fn within(&self, now: u64, seconds: u64) -> (U256, u64) {
        Usage::within(self, now, seconds)
    }
}

/// An approver's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    /// Approve.
    Approve,
    /// Reject.
    Reject,
}

/// An approval whose signature the caller has verified against the
/// approver's rostered key. The fields are those of the signed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Approver id.
    pub approver: String,
    /// The vote.
    pub vote: Vote,
    /// Withdrawal id in the message.
    pub withdrawal_id: String,
    /// Intent hash in the message.
    pub intent_hash: [u8; 32],
    /// Policy hash in the message.
    pub policy_hash: [u8; 32],
    /// Unix seconds after which the approval is void.
    pub expires_at: u64,
}

/// Why a withdrawal was denied: names the rule, limit, cap or allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The wallet is not governed by this policy.
    UnknownWallet(String),
    /// The wallet's HSM key is not the one the policy binds.
    WalletKeyMismatch {
        /// Wallet.
        wallet: String,
        /// The label the policy names.
        policy_label: String,
    },
    /// The transaction's network is not the wallet's.
    WrongNetwork {
        /// The wallet's network.
        wallet: String,
        /// The transaction's.
        transaction: String,
    },
    /// The token is not in the policy's asset registry.
    UnregisteredAsset(String),
    /// No fee caps for this chain: fail closed.
    NoFeeCap(&'static str),
    /// A fee cap was exceeded.
    FeeCap {
        /// Which cap, e.g. `fee_caps.ethereum.max_total_fee`.
        cap: &'static str,
        /// The cap.
        limit: U256,
        /// What the transaction commits to.
        actual: U256,
    },
    /// No limits for this wallet and asset: fail closed.
    NoLimit {
        /// Wallet.
        wallet: String,
        /// Asset.
        asset: String,
    },
    /// Over the per-transaction maximum.
    PerTransaction {
        /// The cap.
        limit: U256,
        /// The amount.
        amount: U256,
    },
    /// A rolling amount window would be exceeded.
    WindowAmount {
        /// Window length.
        seconds: u64,
        /// The cap.
        limit: U256,
        /// Already used in the window.
        used: U256,
        /// This withdrawal.
        amount: U256,
    },
    /// A rolling count window would be exceeded.
    WindowCount {
        /// Window length.
        seconds: u64,
        /// The cap.
        limit: u64,
        /// Already used.
        used: u64,
    },
    /// No rule matched: the default is deny. If a rule failed only on its
    /// allowlist, the first destination it refused is named.
    NoRuleMatched(Option<AllowlistMiss>),
    /// A `deny` rule matched.
    RuleDenied(String),
    /// A member of a required group rejected.
    Rejected {
        /// The rule.
        rule: String,
        /// Who rejected.
        approver: String,
    },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownWallet(w) => write!(f, "wallet {w} is not governed by the policy"),
            Self::WalletKeyMismatch { wallet, policy_label } => write!(
                f,
                "wallet {wallet}'s HSM key is not {policy_label}, the key the policy binds"
            ),
            Self::WrongNetwork { wallet, transaction } => {
                write!(f, "transaction is for {transaction}, the wallet is on {wallet}")
            }
            Self::UnregisteredAsset(a) => write!(f, "asset {a} is not in the policy's asset registry"),
            Self::NoFeeCap(chain) => write!(f, "the policy sets no fee caps for {chain}"),
            Self::FeeCap { cap, limit, actual } => {
                write!(f, "fee cap {cap} is {limit}, the transaction allows {actual}")
            }
            Self::NoLimit { wallet, asset } => {
                write!(f, "the policy sets no limits for {asset} on wallet {wallet}")
            }
            Self::PerTransaction { limit, amount } => {
                write!(f, "per-transaction limit {limit} is below the amount {amount}")
            }
            Self::WindowAmount {
                seconds,
                limit,
                used,
                amount,
            } => write!(
                f,
                "rolling limit of {limit} per {seconds} s: {used} used, {amount} requested"
            ),
            Self::WindowCount { seconds, limit, used } => {
                write!(
                    f,
                    "rolling limit of {limit} withdrawals per {seconds} s: {used} used"
                )
            }
            Self::NoRuleMatched(None) => write!(f, "no rule matched; the default is deny"),
            Self::NoRuleMatched(Some(miss)) => match miss.effective_at {
                None => write!(
                    f,
                    "destination {} is not on allowlist {} (rule {}); no other rule matched, the default is deny",
                    miss.address, miss.allowlist, miss.rule
                ),
                Some(at) => write!(
                    f,
                    "destination {} is on allowlist {} (rule {}) but its time-lock ends at {at}; no other rule matched, the default is deny",
                    miss.address, miss.allowlist, miss.rule
                ),
            },
            Self::RuleDenied(rule) => write!(f, "rule {rule} denies"),
            Self::Rejected { rule, approver } => write!(f, "rule {rule}: {approver} rejected"),
        }
    }
}

/// A destination an allowlist rule refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowlistMiss {
    /// The rule whose other conditions all held.
    pub rule: String,
    /// Its allowlist.
    pub allowlist: String,
    /// The refused destination.
    pub address: String,
    /// When the entry takes effect, if it is listed but still time-locked.
    pub effective_at: Option<u64>,
}

impl DenyReason {
    /// A stable code for clients and the store, e.g. `rolling_amount_limit`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownWallet(_) => "unknown_wallet",
            Self::WalletKeyMismatch { .. } => "wallet_key_mismatch",
            Self::WrongNetwork { .. } => "wrong_network",
            Self::UnregisteredAsset(_) => "unregistered_asset",
            Self::NoFeeCap(_) => "no_fee_cap",
            Self::FeeCap { .. } => "fee_cap",
            Self::NoLimit { .. } => "no_limit",
            Self::PerTransaction { .. } => "per_transaction_limit",
            Self::WindowAmount { .. } => "rolling_amount_limit",
            Self::WindowCount { .. } => "rolling_count_limit",
            Self::NoRuleMatched(Some(_)) => "not_allowlisted",
            Self::NoRuleMatched(None) => "no_rule_matched",
            Self::RuleDenied(_) => "rule_denied",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Sign now.
    Allow,
    /// Refuse, with the reason.
    Deny(DenyReason),
    /// Wait for approvals: the quorum still missing, per group.
    Pending(Vec<GroupQuorum>),
}

/// A decision and what it was made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow, deny or pending.
    pub outcome: Outcome,
    /// The rule that matched, if one did.
    pub rule: Option<String>,
    /// Hash of the policy applied.
    pub policy_hash: [u8; 32],
    /// Approvers whose approvals counted.
    pub counted_approvers: Vec<String>,
}

/// Decides one withdrawal. Pure: the same inputs always give the same decision.
pub fn evaluate<U: RollingUsage + ?Sized>(
    policy: &Policy,
    w: &Withdrawal<'_>,
    usage: &U,
    approvals: &[Approval],
    now: u64,
) -> Decision {
    let decide = |outcome: Outcome, rule: Option<&Rule>, counted: Vec<String>| Decision {
        outcome,
        rule: rule.map(|r| r.name.clone()),
        policy_hash: policy.hash,
        counted_approvers: counted,
    };
    match check_limits(policy, w, usage, now) {
        Err(reason) => decide(Outcome::Deny(reason), None, vec![]),
        Ok(()) => match policy.rules.iter().find(|rule| matches(policy, rule, w, now)) {
            None => decide(
                Outcome::Deny(DenyReason::NoRuleMatched(allowlist_miss(policy, w, now))),
                None,
                vec![],
            ),
            Some(rule) => match &rule.action {
                Action::Allow => decide(Outcome::Allow, Some(rule), vec![]),
                Action::Deny => decide(
                    Outcome::Deny(DenyReason::RuleDenied(rule.name.clone())),
                    Some(rule),
                    vec![],
                ),
                Action::Require(quorum) => {
                    let (outcome, counted) = tally(policy, rule, quorum, w, approvals, now);
                    decide(outcome, Some(rule), counted)
                }
            },
        },
    }
}

fn check_limits<U: RollingUsage + ?Sized>(
    policy: &Policy,
    w: &Withdrawal<'_>,
    usage: &U,
    now: u64,
) -> Result<(), DenyReason> {
    let intent = w.intent;
    let wallet = policy
        .wallets
        .get(w.wallet)
        .ok_or_else(|| DenyReason::UnknownWallet(w.wallet.to_owned()))?;
    if wallet.key_label != w.key_label {
        return Err(DenyReason::WalletKeyMismatch {
            wallet: w.wallet.to_owned(),
            policy_label: wallet.key_label.clone(),
        });
    }
    let network = intent.network.caip2();
    if wallet.network != network {
        return Err(DenyReason::WrongNetwork {
            wallet: wallet.network.clone(),
            transaction: network,
        });
    }
    if let Some(contract) = &intent.asset.contract {
        let registered = policy.assets.iter().any(|a| {
            a.network == network
                && a.contract.eq_ignore_ascii_case(contract)
                && a.symbol == intent.asset.symbol
                && a.decimals == intent.asset.decimals
        });
        if !registered {
            return Err(DenyReason::UnregisteredAsset(format!(
                "{} ({contract})",
                intent.asset.symbol
            )));
        }
    }
    check_fees(policy, &intent.fee)?;
    let limit = policy
        .limits
        .iter()
        .find(|l| l.wallet == w.wallet && l.asset == intent.asset.symbol)
        .ok_or_else(|| DenyReason::NoLimit {
            wallet: w.wallet.to_owned(),
            asset: intent.asset.symbol.clone(),
        })?;
    let amount = intent.total_amount();
    if let Some(max) = limit.per_transaction
        && amount > max
    {
        return Err(DenyReason::PerTransaction { limit: max, amount });
    }
    for window in &limit.windows {
        let (used, count) = usage.within(now, window.seconds);
        if let Some(max) = window.amount
            && used.saturating_add(amount) > max
        {
            return Err(DenyReason::WindowAmount {
                seconds: window.seconds,
                limit: max,
                used,
                amount,
            });
        }
        if let Some(max) = window.count
            && count + 1 > max
        {
            return Err(DenyReason::WindowCount {
                seconds: window.seconds,
                limit: max,
                used: count,
            });
        }
    }
    Ok(())
}

fn check_fees(policy: &Policy, fee: &FeeTerms) -> Result<(), DenyReason> {
    match fee {
        FeeTerms::Ethereum {
            max_fee_per_gas,
            max_total_fee,
            ..
        } => {
            let (cap_per_gas, cap_total) =
                policy.fee_caps.ethereum.ok_or(DenyReason::NoFeeCap("ethereum"))?;
            if *max_fee_per_gas > cap_per_gas {
                return Err(DenyReason::FeeCap {
                    cap: "fee_caps.ethereum.max_fee_per_gas",
                    limit: U256::from(cap_per_gas),
                    actual: U256::from(*max_fee_per_gas),
                });
            }
            if *max_total_fee > cap_total {
                return Err(DenyReason::FeeCap {
                    cap: "fee_caps.ethereum.max_total_fee",
                    limit: cap_total,
                    actual: *max_total_fee,
                });
            }
        }
        FeeTerms::Bitcoin { fee, vsize, .. } => {
            let (cap_fee, cap_rate) = policy.fee_caps.bitcoin.ok_or(DenyReason::NoFeeCap("bitcoin"))?;
            if *fee > cap_fee {
                return Err(DenyReason::FeeCap {
                    cap: "fee_caps.bitcoin.max_fee",
                    limit: U256::from(cap_fee),
                    actual: U256::from(*fee),
                });
            }
            // fee / vsize > cap, without division: fee > cap * vsize.
            if u128::from(*fee) > u128::from(cap_rate) * u128::from((*vsize).max(1)) {
                return Err(DenyReason::FeeCap {
                    cap: "fee_caps.bitcoin.max_fee_rate",
                    limit: U256::from(cap_rate),
                    actual: U256::from(fee.div_ceil((*vsize).max(1))),
                });
            }
        }
    }
    Ok(())
}

/// The first allowlist rule that would have matched but for a destination,
/// and that destination: what a denial should name.
fn allowlist_miss(policy: &Policy, w: &Withdrawal<'_>, now: u64) -> Option<AllowlistMiss> {
    policy.rules.iter().find_map(|rule| {
        let name = rule.allowlist.as_ref()?;
        let without_list = Rule {
            allowlist: None,
            ..rule.clone()
        };
        if !matches(policy, &without_list, w, now) {
            return None;
        }
        let list = policy.allowlists.get(name)?;
        w.intent.destinations.iter().find_map(|d| {
            let entry = list.entries.iter().find(|e| e.address == d.to);
            let effective_at = entry.map(|e| e.added_at.saturating_add(policy.allowlist_delay_secs));
            if effective_at.is_some_and(|at| at <= now) {
                return None;
            }
            Some(AllowlistMiss {
                rule: rule.name.clone(),
                allowlist: name.clone(),
                address: d.to.clone(),
                effective_at,
            })
        })
    })
}

fn matches(policy: &Policy, rule: &Rule, w: &Withdrawal<'_>, now: u64) -> bool {
    let intent = w.intent;
    let amount = intent.total_amount();
    rule.wallets.as_ref().is_none_or(|set| set.contains(w.wallet))
        && rule
            .assets
            .as_ref()
            .is_none_or(|set| set.contains(&intent.asset.symbol))
        && rule
            .initiators
            .as_ref()
            .is_none_or(|set| set.contains(w.initiator))
        && rule.amount_min.is_none_or(|min| amount >= min)
        && rule.amount_max.is_none_or(|max| amount <= max)
        && rule.allowlist.as_ref().is_none_or(|name| {
            let Some(list) = policy.allowlists.get(name) else {
                return false;
            };
            !intent.destinations.is_empty()
                && intent.destinations.iter().all(|d| {
                    list.entries.iter().any(|e| {
                        e.address == d.to && e.added_at.saturating_add(policy.allowlist_delay_secs) <= now
                    })
                })
        })
}

fn tally(
    policy: &Policy,
    rule: &Rule,
    quorum: &[GroupQuorum],
    w: &Withdrawal<'_>,
    approvals: &[Approval],
    now: u64,
) -> (Outcome, Vec<String>) {
    // One vote per rostered approver; a reject anywhere wins over approves.
    let mut votes: BTreeMap<&str, Vote> = BTreeMap::new();
    for a in approvals {
        let bound = a.withdrawal_id == w.id
            && a.intent_hash == w.intent_hash
            && a.policy_hash == policy.hash
            && a.expires_at > now;
        if !bound || a.approver == w.initiator || policy.approver(&a.approver).is_none() {
            continue;
        }
        let vote = votes.entry(a.approver.as_str()).or_insert(a.vote);
        if a.vote == Vote::Reject {
            *vote = Vote::Reject;
        }
    }
    let required: BTreeSet<&str> = quorum.iter().map(|q| q.group.as_str()).collect();
    for (approver, vote) in &votes {
        let in_required = policy
            .approver(approver)
            .is_some_and(|a| a.groups.iter().any(|g| required.contains(g.as_str())));
        if *vote == Vote::Reject && in_required {
            let reason = DenyReason::Rejected {
                rule: rule.name.clone(),
                approver: (*approver).to_owned(),
            };
            return (Outcome::Deny(reason), vec![]);
        }
    }
    let approvers: Vec<&str> = votes
        .iter()
        .filter(|(_, v)| **v == Vote::Approve)
        .map(|(a, _)| *a)
        .collect();
    let filled = assign(policy, quorum, &approvers);
    let missing: Vec<GroupQuorum> = quorum
        .iter()
        .zip(&filled)
        .filter(|(q, n)| **n < q.min)
        .map(|(q, n)| GroupQuorum {
            group: q.group.clone(),
            min: q.min - n,
        })
        .collect();
    let counted = approvers.iter().map(|a| (*a).to_owned()).collect();
    if missing.is_empty() {
        (Outcome::Allow, counted)
    } else {
        (Outcome::Pending(missing), counted)
    }
}

/// Assigns approvers to quorum slots so that no approver fills two slots
/// (maximum bipartite matching by augmenting paths). Returns the number of
/// slots filled per quorum entry.
fn assign(policy: &Policy, quorum: &[GroupQuorum], approvers: &[&str]) -> Vec<usize> {
    let slots: Vec<usize> = quorum
        .iter()
        .enumerate()
        .flat_map(|(i, q)| std::iter::repeat_n(i, q.min))
        .collect();
    let eligible = |approver: &str, slot: usize| {
        policy
            .approver(approver)
            .is_some_and(|a| a.groups.contains(&quorum[slots[slot]].group))
    };
    let mut slot_owner: Vec<Option<usize>> = vec![None; slots.len()];
    fn augment(
        a: usize,
        approvers: &[&str],
        seen: &mut [bool],
        slot_owner: &mut [Option<usize>],
        eligible: &dyn Fn(&str, usize) -> bool,
    ) -> bool {
        for slot in 0..slot_owner.len() {
            if seen[slot] || !eligible(approvers[a], slot) {
                continue;
            }
            seen[slot] = true;
            let free = match slot_owner[slot] {
                None => true,
                Some(other) => augment(other, approvers, seen, slot_owner, eligible),
            };
            if free {
                slot_owner[slot] = Some(a);
                return true;
            }
        }
        false
    }
    for a in 0..approvers.len() {
        let mut seen = vec![false; slots.len()];
        augment(a, approvers, &mut seen, &mut slot_owner, &eligible);
    }
    let mut filled = vec![0; quorum.len()];
    for (slot, owner) in slot_owner.iter().enumerate() {
        if owner.is_some() {
            filled[slots[slot]] += 1;
        }
    }
    filled
}
