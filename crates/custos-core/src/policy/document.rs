//! The policy language: a TOML document, parsed strictly into a [`Policy`].
//!
//! docs/policy.md specifies the language. Admins sign the policy hash, the
//! SHA-256 of the document's exact bytes under a domain separator
//! ([`policy_hash`]). A reformatted document is therefore a different
//! policy, and nobody has to agree on a canonical form of TOML.

use std::collections::{BTreeMap, BTreeSet};

use alloy_primitives::U256;
use k256::ecdsa::VerifyingKey;
use k256::sha2::{Digest, Sha256};
use serde::Deserialize;

/// Domain separator of the policy hash.
pub const POLICY_DOMAIN: &[u8; 16] = b"custos/policy/v1";
/// Longest policy document accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// `SHA-256("custos/policy/v1" || u64be(len) || document)`.
pub fn policy_hash(document: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(POLICY_DOMAIN);
    hasher.update((document.len() as u64).to_be_bytes());
    hasher.update(document);
    hasher.finalize().into()
}

/// Why a policy document was refused. Messages name the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("policy is not valid: {0}")]
    Syntax(String),
    /// Well-formed, but inconsistent or out of range.
    #[error("policy is not valid: {0}")]
    Invalid(String),
}

/// A public key of an approver or admin. Only secp256k1 today; the
/// `algorithm:` prefix in the document leaves room for P-256 and Ed25519.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// SEC1 secp256k1 key; signatures are ECDSA over SHA-256, low-S.
    Secp256k1(VerifyingKey),
}

/// An approver: a key and the groups it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// The approver's own key.
    pub key: PublicKey,
    /// Group names.
    pub groups: BTreeSet<String>,
}

/// A wallet the policy governs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWallet {
    /// CAIP-2 network, e.g. `eip155:1`.
    pub network: String,
    /// CKA_LABEL of the wallet's HSM key.
    pub key_label: String,
}

/// A token registered for a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredAsset {
    /// CAIP-2 network.
    pub network: String,
    /// Ticker.
    pub symbol: String,
    /// EIP-55 contract address.
    pub contract: String,
    /// Decimals.
    pub decimals: u8,
}

/// One allowlisted address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowlistEntry {
    /// The address, as the chain writes it (EIP-55 or bech32).
    pub address: String,
    /// Unix seconds when the entry was added; effective after the delay.
    pub added_at: u64,
}

/// A named allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allowlist {
    /// Entries.
    pub entries: Vec<AllowlistEntry>,
}

/// One rolling window of a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitWindow {
    /// Window length in seconds.
    pub seconds: u64,
    /// Most base units moved within any such window, if capped.
    pub amount: Option<U256>,
    /// Most withdrawals within any such window, if capped.
    pub count: Option<u64>,
}

/// Limits for one wallet and asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletLimit {
    /// Wallet id.
    pub wallet: String,
    /// Asset symbol.
    pub asset: String,
    /// Most base units in one withdrawal, if capped.
    pub per_transaction: Option<U256>,
    /// Rolling windows.
    pub windows: Vec<LimitWindow>,
}

/// Fee caps. A chain without caps has its withdrawals denied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeeCaps {
    /// Ethereum: max fee per gas and total fee, in wei.
    pub ethereum: Option<(u128, U256)>,
    /// Bitcoin: absolute fee in satoshi, and fee rate in sat/vB.
    pub bitcoin: Option<(u64, u64)>,
}

/// `min` approvals from members of `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupQuorum {
    /// Group name.
    pub group: String,
    /// Approvals required.
    pub min: usize,
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sign at once.
    Allow,
    /// Refuse.
    Deny,
    /// Sign once every quorum is met, each by distinct approvers.
    Require(Vec<GroupQuorum>),
}

/// A rule. Every condition that is set must hold for the rule to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Name, reported in decisions.
    pub name: String,
    /// Wallet ids, if restricted.
    pub wallets: Option<BTreeSet<String>>,
    /// Asset symbols, if restricted.
    pub assets: Option<BTreeSet<String>>,
    /// Every destination must be an effective entry of this allowlist.
    pub allowlist: Option<String>,
    /// Smallest total amount, inclusive.
    pub amount_min: Option<U256>,
    /// Largest total amount, inclusive.
    pub amount_max: Option<U256>,
    /// Initiator identities, if restricted.
    pub initiators: Option<BTreeSet<String>>,
    /// What the rule does.
    pub action: Action,
}

/// A parsed, validated policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Version; each accepted version is greater than the last.
    pub version: u64,
    /// [`policy_hash`] of the document.
    pub hash: [u8; 32],
    /// How long an approval request stays open, in seconds.
    pub approval_window_secs: u64,
    /// How long a new allowlist entry waits before it takes effect, in seconds.
    pub allowlist_delay_secs: u64,
    /// Admin signatures needed to activate the next version or to unfreeze.
    pub admin_quorum: usize,
    /// Admin keys by id.
    pub admins: BTreeMap<String, PublicKey>,
    /// Approvers by id.
    pub approvers: BTreeMap<String, Approver>,
    /// Ids that may freeze alone.
    pub security_officers: BTreeSet<String>,
    /// Wallets by id.
    pub wallets: BTreeMap<String, PolicyWallet>,
    /// Registered tokens.
    pub assets: Vec<RegisteredAsset>,
    /// Allowlists by name.
    pub allowlists: BTreeMap<String, Allowlist>,
    /// Limits.
    pub limits: Vec<WalletLimit>,
    /// Fee caps.
    pub fee_caps: FeeCaps,
    /// Rules, first match wins; no match denies.
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u64,
    approval_window_seconds: u64,
    allowlist_delay_seconds: u64,
    admins: RawAdmins,
    #[serde(default)]
    approvers: BTreeMap<String, RawApprover>,
    #[serde(default)]
    wallets: BTreeMap<String, RawWallet>,
    #[serde(default)]
    assets: Vec<RawAsset>,
    #[serde(default)]
    allowlists: BTreeMap<String, RawAllowlist>,
    #[serde(default)]
    limits: Vec<RawLimit>,
    #[serde(default)]
    fee_caps: RawFeeCaps,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmins {
    quorum: usize,
    keys: BTreeMap<String, String>,
    #[serde(default)]
    security_officers: BTreeSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprover {
    key: String,
    groups: BTreeSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWallet {
    network: String,
    key_label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAsset {
    network: String,
    symbol: String,
    contract: String,
    decimals: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowlist {
    entries: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    address: String,
    added_at: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    wallet: String,
    asset: String,
    per_transaction: Option<String>,
    #[serde(default)]
    windows: Vec<RawWindow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    seconds: u64,
    amount: Option<String>,
    count: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFeeCaps {
    ethereum: Option<RawEthFees>,
    bitcoin: Option<RawBtcFees>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEthFees {
    max_fee_per_gas: String,
    max_total_fee: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBtcFees {
    max_fee: u64,
    max_fee_rate: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    wallets: Option<BTreeSet<String>>,
    assets: Option<BTreeSet<String>>,
    allowlist: Option<String>,
    amount_min: Option<String>,
    amount_max: Option<String>,
    initiators: Option<BTreeSet<String>>,
    action: String,
    #[serde(default)]
    quorum: Vec<RawQuorum>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuorum {
    group: String,
    min: usize,
}

impl Policy {
    /// Parses and validates a policy document.
    pub fn parse(document: &[u8]) -> Result<Self, PolicyError> {
        if document.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::Invalid(format!(
                "document exceeds {MAX_POLICY_BYTES} bytes"
            )));
        }
        let text = std::str::from_utf8(document).map_err(|_| PolicyError::Syntax("not UTF-8".into()))?;
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        build(raw, policy_hash(document))
    }

    /// The approver with this id, if on the roster.
    pub fn approver(&self, id: &str) -> Option<&Approver> {
        self.approvers.get(id)
    }
}

fn invalid(message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid(message.into())
}

fn amount(key: &str, text: &str) -> Result<U256, PolicyError> {
    crate::chain::units::decimal(text).map_err(|e| invalid(format!("{key}: {e}")))
}

fn public_key(key: &str, text: &str) -> Result<PublicKey, PolicyError> {
    let hex_key = text
        .strip_prefix("secp256k1:")
        .ok_or_else(|| invalid(format!("{key}: must be \"secp256k1:<hex SEC1 key>\"")))?;
    let bytes = hex::decode(hex_key).map_err(|_| invalid(format!("{key}: not hex")))?;
    if bytes.len() != 33 {
        return Err(invalid(format!("{key}: must be a 33-byte compressed SEC1 key")));
    }
    VerifyingKey::from_sec1_bytes(&bytes)
        .map(PublicKey::Secp256k1)
        .map_err(|_| invalid(format!("{key}: not a point on secp256k1")))
}

/// Whether `id` is a valid roster, group, rule or initiator id: 1 to 64 of
/// `[A-Za-z0-9-_.:/]`.
pub fn is_identifier(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

fn identifier(kind: &str, id: &str) -> Result<(), PolicyError> {
    if is_identifier(id) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{kind} {id:?}: ids are 1 to 64 of [A-Za-z0-9-_.:/]"
        )))
    }
}

fn known_symbol(assets: &[RegisteredAsset], symbol: &str) -> bool {
    matches!(symbol, "ETH" | "BTC") || assets.iter().any(|a| a.symbol == symbol)
}

/// A CAIP-2 chain id of a supported namespace: `eip155:<decimal>` or
/// `bip122:<32 lower-case hex digits>`.
fn caip2(key: &str, text: &str) -> Result<(), PolicyError> {
    let ok = match text.split_once(':') {
        Some(("eip155", id)) => {
            !id.is_empty() && !id.starts_with('0') && id.bytes().all(|b| b.is_ascii_digit())
        }
        Some(("bip122", id)) => id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{key} {text:?} is not a CAIP-2 id (eip155:<chain id> or bip122:<genesis prefix>)"
        )))
    }
}

fn build(raw: RawPolicy, hash: [u8; 32]) -> Result<Policy, PolicyError> {
    if raw.version == 0 {
        return Err(invalid("version must be at least 1"));
    }
    if raw.approval_window_seconds == 0 {
        return Err(invalid("approval_window_seconds must be at least 1"));
    }
    let (admins, approvers) = roster(&raw.admins, raw.approvers)?;
    let wallets = wallets(raw.wallets)?;
    let assets = assets(raw.assets)?;
    let allowlists = allowlists(raw.allowlists)?;
    let limits = limits(raw.limits, &wallets, &assets)?;
    let fee_caps = fee_caps(raw.fee_caps)?;
    let rules = rules(raw.rules, &approvers, &wallets, &assets, &allowlists)?;
    Ok(Policy {
        version: raw.version,
        hash,
        approval_window_secs: raw.approval_window_seconds,
        allowlist_delay_secs: raw.allowlist_delay_seconds,
        admin_quorum: raw.admins.quorum,
        admins,
        approvers,
        security_officers: raw.admins.security_officers,
        wallets,
        assets,
        allowlists,
        limits,
        fee_caps,
        rules,
    })
}

/// Admin ids and their keys.
type Admins = BTreeMap<String, PublicKey>;
/// Approver ids and their keys and groups.
type Approvers = BTreeMap<String, Approver>;

/// The admins and approvers: ids and keys, the admin quorum, one key per
/// person, and security officers who are on the roster.
fn roster(
    admins_raw: &RawAdmins,
    approvers_raw: BTreeMap<String, RawApprover>,
) -> Result<(Admins, Approvers), PolicyError> {
    let mut admins = BTreeMap::new();
    for (id, key) in &admins_raw.keys {
        identifier("admin", id)?;
        admins.insert(id.clone(), public_key(&format!("admins.keys.{id}"), key)?);
    }
    if admins_raw.quorum == 0 || admins_raw.quorum > admins.len() {
        return Err(invalid(format!(
            "admins.quorum must be between 1 and the number of admin keys ({})",
            admins.len()
        )));
    }
    let mut approvers = BTreeMap::new();
    for (id, approver) in approvers_raw {
        identifier("approver", &id)?;
        if approver.groups.is_empty() {
            return Err(invalid(format!(
                "approvers.{id}.groups must name at least one group"
            )));
        }
        for group in &approver.groups {
            identifier("group", group)?;
        }
        let key = public_key(&format!("approvers.{id}.key"), &approver.key)?;
        approvers.insert(
            id,
            Approver {
                key,
                groups: approver.groups,
            },
        );
    }
    // One key, one person: a key listed twice would let one holder fill two
    // quorum seats.
    let mut seen_keys = Vec::new();
    for (id, key) in admins.iter().chain(approvers.iter().map(|(id, a)| (id, &a.key))) {
        if seen_keys.contains(&key) {
            return Err(invalid(format!(
                "the key of {id:?} is listed more than once in the roster"
            )));
        }
        seen_keys.push(key);
    }
    for officer in &admins_raw.security_officers {
        if !approvers.contains_key(officer) && !admins.contains_key(officer) {
            return Err(invalid(format!(
                "admins.security_officers: {officer:?} is neither an approver nor an admin"
            )));
        }
    }
    Ok((admins, approvers))
}

/// The wallets the policy governs, each on a CAIP-2 network.
fn wallets(raw: BTreeMap<String, RawWallet>) -> Result<BTreeMap<String, PolicyWallet>, PolicyError> {
    let mut wallets = BTreeMap::new();
    for (id, wallet) in raw {
        identifier("wallet", &id)?;
        caip2(&format!("wallets.{id}.network"), &wallet.network)?;
        wallets.insert(
            id,
            PolicyWallet {
                network: wallet.network,
                key_label: wallet.key_label,
            },
        );
    }
    Ok(wallets)
}

/// The registered tokens: one entry per symbol and contract on a network.
fn assets(raw: Vec<RawAsset>) -> Result<Vec<RegisteredAsset>, PolicyError> {
    let mut assets: Vec<RegisteredAsset> = Vec::new();
    for (index, asset) in raw.into_iter().enumerate() {
        identifier("asset", &asset.symbol)?;
        caip2(&format!("assets[{index}].network"), &asset.network)?;
        if matches!(asset.symbol.as_str(), "ETH" | "BTC") {
            return Err(invalid(format!(
                "assets[{index}]: ETH and BTC are native and need no entry"
            )));
        }
        if assets.iter().any(|a| {
            // One contract in two spellings (checksummed, lower case) is one asset.
            a.network == asset.network
                && (a.symbol == asset.symbol || a.contract.eq_ignore_ascii_case(&asset.contract))
        }) {
            return Err(invalid(format!(
                "assets[{index}] repeats a symbol or contract on {}",
                asset.network
            )));
        }
        crate::chain::units::address(&asset.contract)
            .map_err(|e| invalid(format!("assets[{index}].contract {e}")))?;
        assets.push(RegisteredAsset {
            network: asset.network,
            symbol: asset.symbol,
            contract: asset.contract,
            decimals: asset.decimals,
        });
    }
    Ok(assets)
}

/// The named allowlists, with the times their entries were added.
fn allowlists(raw: BTreeMap<String, RawAllowlist>) -> Result<BTreeMap<String, Allowlist>, PolicyError> {
    let mut allowlists = BTreeMap::new();
    for (name, list) in raw {
        identifier("allowlist", &name)?;
        let entries = list
            .entries
            .into_iter()
            .map(|e| AllowlistEntry {
                address: e.address,
                added_at: e.added_at,
            })
            .collect();
        allowlists.insert(name, Allowlist { entries });
    }
    Ok(allowlists)
}

/// Per-transaction and rolling limits, each for a wallet and asset of this
/// policy, once.
fn limits(
    raw: Vec<RawLimit>,
    wallets: &BTreeMap<String, PolicyWallet>,
    assets: &[RegisteredAsset],
) -> Result<Vec<WalletLimit>, PolicyError> {
    let mut limits: Vec<WalletLimit> = Vec::new();
    for (index, limit) in raw.into_iter().enumerate() {
        let key = format!("limits[{index}]");
        if !wallets.contains_key(&limit.wallet) {
            return Err(invalid(format!(
                "{key}.wallet {:?} is not a wallet of this policy",
                limit.wallet
            )));
        }
        if !known_symbol(assets, &limit.asset) {
            return Err(invalid(format!(
                "{key}.asset {:?} is neither ETH, BTC nor a registered asset",
                limit.asset
            )));
        }
        if limits
            .iter()
            .any(|l| l.wallet == limit.wallet && l.asset == limit.asset)
        {
            return Err(invalid(format!(
                "{key} repeats wallet {} and asset {}",
                limit.wallet, limit.asset
            )));
        }
        let mut windows = Vec::new();
        for (w, window) in limit.windows.into_iter().enumerate() {
            if window.seconds == 0 || (window.amount.is_none() && window.count.is_none()) {
                return Err(invalid(format!(
                    "{key}.windows[{w}] needs seconds > 0 and an amount or a count"
                )));
            }
            windows.push(LimitWindow {
                seconds: window.seconds,
                amount: window
                    .amount
                    .as_deref()
                    .map(|a| amount(&format!("{key}.windows[{w}].amount"), a))
                    .transpose()?,
                count: window.count,
            });
        }
        limits.push(WalletLimit {
            wallet: limit.wallet,
            asset: limit.asset,
            per_transaction: limit
                .per_transaction
                .as_deref()
                .map(|a| amount(&format!("{key}.per_transaction"), a))
                .transpose()?,
            windows,
        });
    }
    Ok(limits)
}

/// The fee caps per chain.
fn fee_caps(raw: RawFeeCaps) -> Result<FeeCaps, PolicyError> {
    Ok(FeeCaps {
        ethereum: raw
            .ethereum
            .map(|f| -> Result<_, PolicyError> {
                let per_gas = amount("fee_caps.ethereum.max_fee_per_gas", &f.max_fee_per_gas)?;
                let per_gas = u128::try_from(per_gas)
                    .map_err(|_| invalid("fee_caps.ethereum.max_fee_per_gas exceeds 2^128"))?;
                Ok((
                    per_gas,
                    amount("fee_caps.ethereum.max_total_fee", &f.max_total_fee)?,
                ))
            })
            .transpose()?,
        bitcoin: raw.bitcoin.map(|f| (f.max_fee, f.max_fee_rate)),
    })
}

/// The rules, in order: each names only wallets, assets, allowlists and
/// groups the policy defines, and a quorum only with action `require`.
fn rules(
    raw: Vec<RawRule>,
    approvers: &BTreeMap<String, Approver>,
    wallets: &BTreeMap<String, PolicyWallet>,
    assets: &[RegisteredAsset],
    allowlists: &BTreeMap<String, Allowlist>,
) -> Result<Vec<Rule>, PolicyError> {
    let groups: BTreeSet<&String> = approvers.values().flat_map(|a| &a.groups).collect();
    let mut rules: Vec<Rule> = Vec::new();
    for (index, rule) in raw.into_iter().enumerate() {
        let key = format!("rules[{index}]");
        identifier("rule", &rule.name)?;
        if rules.iter().any(|r| r.name == rule.name) {
            return Err(invalid(format!("{key}.name {:?} is used twice", rule.name)));
        }
        if let Some(unknown) = rule.wallets.iter().flatten().find(|w| !wallets.contains_key(*w)) {
            return Err(invalid(format!(
                "{key}.wallets: {unknown:?} is not a wallet of this policy"
            )));
        }
        if let Some(unknown) = rule.assets.iter().flatten().find(|a| !known_symbol(assets, a)) {
            return Err(invalid(format!(
                "{key}.assets: {unknown:?} is neither ETH, BTC nor a registered asset"
            )));
        }
        if let Some(list) = &rule.allowlist
            && !allowlists.contains_key(list)
        {
            return Err(invalid(format!("{key}.allowlist {list:?} is not defined")));
        }
        let action = match (rule.action.as_str(), rule.quorum.is_empty()) {
            ("allow", true) => Action::Allow,
            ("deny", true) => Action::Deny,
            ("require", false) => {
                let mut quorum = Vec::new();
                for q in rule.quorum {
                    let members = approvers.values().filter(|a| a.groups.contains(&q.group)).count();
                    if !groups.contains(&q.group) || q.min == 0 || q.min > members {
                        return Err(invalid(format!(
                            "{key}.quorum: group {:?} needs 1 <= min <= its {members} members",
                            q.group
                        )));
                    }
                    quorum.push(GroupQuorum {
                        group: q.group,
                        min: q.min,
                    });
                }
                Action::Require(quorum)
            }
            ("require", true) => return Err(invalid(format!("{key}: action \"require\" needs a quorum"))),
            ("allow" | "deny", false) => {
                return Err(invalid(format!("{key}: only action \"require\" takes a quorum")));
            }
            (other, _) => {
                return Err(invalid(format!(
                    "{key}.action {other:?} is not allow, deny or require"
                )));
            }
        };
        let amount_min = rule
            .amount_min
            .as_deref()
            .map(|a| amount(&format!("{key}.amount_min"), a))
            .transpose()?;
        let amount_max = rule
            .amount_max
            .as_deref()
            .map(|a| amount(&format!("{key}.amount_max"), a))
            .transpose()?;
        if let (Some(min), Some(max)) = (amount_min, amount_max)
            && min > max
        {
            return Err(invalid(format!("{key}: amount_min exceeds amount_max")));
        }
        rules.push(Rule {
            name: rule.name,
            wallets: rule.wallets,
            assets: rule.assets,
            allowlist: rule.allowlist,
            amount_min,
            amount_max,
            initiators: rule.initiators,
            action,
        });
    }
    Ok(rules)
}
