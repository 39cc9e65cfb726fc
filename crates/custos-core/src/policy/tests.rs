//! Table-driven tests and properties of the policy core.

use alloy_primitives::U256;
use proptest::prelude::*;

use super::*;
use crate::chain::{Asset, Destination, FeeTerms, Intent, Network};

const ALLOWED: &str = "0x3535353535353535353535353535353535353535";
const FRESH: &str = "0x4646464646464646464646464646464646464646";
const STRANGER: &str = "0x5757575757575757575757575757575757575757";
const DAY: u64 = 86_400;
pub(crate) const NOW: u64 = 1_800_000_000;
const ETHER: u64 = 1_000_000_000_000_000_000;

fn key(seed: u8) -> String {
    let sk = k256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    format!(
        "secp256k1:{}",
        hex::encode(sk.verifying_key().to_sec1_point(true).as_bytes())
    )
}

fn document() -> String {
    format!(
        r#"
version = 3
approval_window_seconds = 86400
allowlist_delay_seconds = 86400

[admins]
quorum = 2
keys = {{ root-1 = "{a1}", root-2 = "{a2}", root-3 = "{a3}" }}
security_officers = ["sam"]

[approvers.alice]
key = "{k1}"
groups = ["treasury"]
[approvers.bob]
key = "{k2}"
groups = ["treasury"]
[approvers.carol]
key = "{k3}"
groups = ["treasury", "security"]
[approvers.sam]
key = "{k4}"
groups = ["security"]

[wallets.hot]
network = "eip155:1"
key_label = "custos-wallet-hot-00000000"

[[assets]]
network = "eip155:1"
symbol = "USDC"
contract = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"
decimals = 6

[allowlists.exchanges]
entries = [
  {{ address = "{ALLOWED}", added_at = {old} }},
  {{ address = "{FRESH}", added_at = {fresh} }},
]

[[limits]]
wallet = "hot"
asset = "ETH"
per_transaction = "{per_tx}"
windows = [
  {{ seconds = 3600, amount = "{hour}", count = 5 }},
  {{ seconds = 86400, amount = "{day}" }},
]

[fee_caps.ethereum]
max_fee_per_gas = "200000000000"
max_total_fee = "20000000000000000"

[[rules]]
name = "auto-small"
wallets = ["hot"]
assets = ["ETH"]
allowlist = "exchanges"
amount_max = "{ether}"
action = "allow"

[[rules]]
name = "blocked-initiator"
initiators = ["mallory"]
action = "deny"

[[rules]]
name = "large"
amount_max = "{per_tx}"
action = "require"
quorum = [{{ group = "treasury", min = 2 }}, {{ group = "security", min = 1 }}]
"#,
        a1 = key(101),
        a2 = key(102),
        a3 = key(103),
        k1 = key(1),
        k2 = key(2),
        k3 = key(3),
        k4 = key(4),
        old = NOW - 30 * DAY,
        fresh = NOW - DAY / 2,
        ether = ETHER,
        per_tx = 100 * ETHER as u128,
        hour = 150 * ETHER as u128,
        day = 400 * ETHER as u128,
    )
}

pub(crate) fn policy() -> Policy {
    Policy::parse(document().as_bytes()).unwrap()
}

fn intent(to: &str, amount: U256) -> Intent {
    Intent {
        network: Network::Ethereum { chain_id: 1 },
        asset: Asset {
            symbol: "ETH".into(),
            contract: None,
            decimals: 18,
        },
        from: "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf".into(),
        destinations: vec![Destination {
            to: to.into(),
            amount,
        }],
        fee: FeeTerms::Ethereum {
            nonce: 1,
            gas_limit: 21_000,
            max_fee_per_gas: 50_000_000_000,
            max_priority_fee_per_gas: 1_000_000_000,
            max_total_fee: U256::from(21_000u64 * 50_000_000_000),
        },
        transaction_id: [9; 32],
    }
}

fn withdrawal<'a>(intent: &'a Intent, initiator: &'a str) -> Withdrawal<'a> {
    Withdrawal {
        id: "w-1",
        wallet: "hot",
        key_label: "custos-wallet-hot-00000000",
        intent,
        intent_hash: intent.hash(),
        initiator,
    }
}

fn approve(p: &Policy, w: &Withdrawal<'_>, who: &str) -> Approval {
    Approval {
        approver: who.into(),
        vote: Vote::Approve,
        withdrawal_id: w.id.into(),
        intent_hash: w.intent_hash,
        policy_hash: p.hash,
        expires_at: NOW + 3600,
    }
}

fn ether(n: u64) -> U256 {
    U256::from(n) * U256::from(ETHER)
}

#[test]
fn document_parses_and_hash_covers_every_byte() {
    let p = policy();
    assert_eq!(p.version, 3);
    assert_eq!(p.rules.len(), 3);
    let mut other = document().into_bytes();
    other.push(b'\n');
    assert_ne!(policy_hash(&other), p.hash);
}

#[test]
fn bad_documents_are_refused_by_key() {
    let cases = [
        (
            document().replace("allowlist_delay_seconds", "allowlist_dealy_seconds"),
            "allowlist_dealy_seconds",
        ),
        (document().replace("min = 2 }", "min = 5 }"), "treasury"),
        (
            document().replace("allowlist = \"exchanges\"", "allowlist = \"nope\""),
            "nope",
        ),
        (
            document().replace("quorum = 2\n", "quorum = 4\n"),
            "admins.quorum",
        ),
        (
            document().replace(&key(1), "secp256k1:02ff"),
            "approvers.alice.key",
        ),
        (
            document().replace("action = \"allow\"", "action = \"permit\""),
            "permit",
        ),
        (
            document().replace("wallets = [\"hot\"]", "wallets = [\"cold\"]"),
            "cold",
        ),
        (
            document().replace(
                "decimals = 6\n",
                "decimals = 6\n\n[[assets]]\nnetwork = \"eip155:1\"\nsymbol = \"USDX\"\ncontract = \"0x1c7d4b196cb0c7b01d743fbc6116a902379c7238\"\ndecimals = 6\n",
            ),
            "repeats a symbol or contract",
        ),
        (document().replace(&key(2), &key(1)), "more than once"),
        (document().replace(&key(101), &key(4)), "more than once"),
        (
            document().replace("assets = [\"ETH\"]", "assets = [\"EHT\"]"),
            "EHT",
        ),
        (document().replace("asset = \"ETH\"", "asset = \"WBTC\""), "WBTC"),
        (
            document().replace(
                "network = \"eip155:1\"\nkey_label",
                "network = \"mainnet\"\nkey_label",
            ),
            "CAIP-2",
        ),
    ];
    for (text, expected) in cases {
        let err = Policy::parse(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains(expected), "expected {expected:?} in {err}");
    }
}

#[test]
fn decisions_table() {
    let p = policy();
    let small = intent(ALLOWED, ether(1));
    let cases: Vec<(&str, Intent, &str, Outcome)> = vec![
        (
            "small to allowlisted address",
            small.clone(),
            "backend",
            Outcome::Allow,
        ),
        (
            "allowlisted too recently: falls to the quorum rule",
            intent(FRESH, ether(1)),
            "backend",
            Outcome::Pending(vec![
                GroupQuorum {
                    group: "treasury".into(),
                    min: 2,
                },
                GroupQuorum {
                    group: "security".into(),
                    min: 1,
                },
            ]),
        ),
        (
            "blocked initiator",
            intent(STRANGER, ether(1)),
            "mallory",
            Outcome::Deny(DenyReason::RuleDenied("blocked-initiator".into())),
        ),
        (
            "over the per-transaction limit",
            intent(STRANGER, ether(101)),
            "backend",
            Outcome::Deny(DenyReason::PerTransaction {
                limit: ether(100),
                amount: ether(101),
            }),
        ),
    ];
    for (name, intent, initiator, expected) in cases {
        let w = withdrawal(&intent, initiator);
        let d = evaluate(&p, &w, &Usage::default(), &[], NOW);
        assert_eq!(d.outcome, expected, "{name}");
        assert_eq!(d.policy_hash, p.hash);
    }
}

#[test]
fn quorum_counts_only_bound_distinct_non_initiator_approvals() {
    let p = policy();
    let big = intent(STRANGER, ether(50));
    let w = withdrawal(&big, "alice");
    let pending = |approvals: &[Approval]| evaluate(&p, &w, &Usage::default(), approvals, NOW).outcome;

    let good = [
        approve(&p, &w, "bob"),
        approve(&p, &w, "carol"),
        approve(&p, &w, "sam"),
    ];
    assert_eq!(pending(&good), Outcome::Allow);
    assert_eq!(
        evaluate(&p, &w, &Usage::default(), &good, NOW).rule.as_deref(),
        Some("large")
    );

    // The initiator's own approval never counts.
    let with_initiator = [
        approve(&p, &w, "alice"),
        approve(&p, &w, "carol"),
        approve(&p, &w, "sam"),
    ];
    assert!(matches!(pending(&with_initiator), Outcome::Pending(_)));

    // Carol is in both groups but fills only one slot.
    let carol_twice = [approve(&p, &w, "bob"), approve(&p, &w, "carol")];
    assert!(matches!(pending(&carol_twice), Outcome::Pending(_)));

    // Duplicates count once.
    let dup = [
        approve(&p, &w, "bob"),
        approve(&p, &w, "bob"),
        approve(&p, &w, "sam"),
    ];
    assert!(matches!(pending(&dup), Outcome::Pending(_)));

    // Foreign approvals: other withdrawal, intent, policy, expired, not on roster.
    let mut foreign = Vec::new();
    for who in ["bob", "carol", "sam"] {
        let mut a = approve(&p, &w, who);
        a.withdrawal_id = "w-2".into();
        foreign.push(a);
        let mut a = approve(&p, &w, who);
        a.intent_hash[0] ^= 1;
        foreign.push(a);
        let mut a = approve(&p, &w, who);
        a.policy_hash[0] ^= 1;
        foreign.push(a);
        let mut a = approve(&p, &w, who);
        a.expires_at = NOW;
        foreign.push(a);
    }
    foreign.push(approve(&p, &w, "eve"));
    assert_eq!(
        pending(&foreign),
        Outcome::Pending(vec![
            GroupQuorum {
                group: "treasury".into(),
                min: 2
            },
            GroupQuorum {
                group: "security".into(),
                min: 1
            }
        ])
    );

    // A rejection from a required group's member denies, whatever else arrived.
    let mut reject = approve(&p, &w, "sam");
    reject.vote = Vote::Reject;
    let mut with_reject = good.to_vec();
    with_reject.push(reject);
    assert_eq!(
        pending(&with_reject),
        Outcome::Deny(DenyReason::Rejected {
            rule: "large".into(),
            approver: "sam".into()
        })
    );
}

#[test]
fn limits_caps_and_coverage_fail_closed() {
    let p = policy();
    let small = intent(ALLOWED, ether(1));
    let w = withdrawal(&small, "backend");

    let hour_full = Usage {
        entries: vec![(NOW - 10, ether(149) + U256::from(1u8))],
    };
    assert!(matches!(
        evaluate(&p, &w, &hour_full, &[], NOW).outcome,
        Outcome::Deny(DenyReason::WindowAmount { seconds: 3600, .. })
    ));
    let five = Usage {
        entries: (0..5).map(|i| (NOW - 100 - i, U256::from(1u8))).collect(),
    };
    assert!(matches!(
        evaluate(&p, &w, &five, &[], NOW).outcome,
        Outcome::Deny(DenyReason::WindowCount {
            seconds: 3600,
            limit: 5,
            used: 5
        })
    ));
    // A clock that stepped back does not free the window.
    let future = Usage {
        entries: vec![(NOW + 600, ether(149) + U256::from(1u8))],
    };
    assert!(matches!(
        evaluate(&p, &w, &future, &[], NOW).outcome,
        Outcome::Deny(DenyReason::WindowAmount { seconds: 3600, .. })
    ));
    // Outside the window no longer counts.
    let old = Usage {
        entries: vec![(NOW - 3600, ether(149))],
    };
    assert_eq!(evaluate(&p, &w, &old, &[], NOW).outcome, Outcome::Allow);

    let mut pricey = small.clone();
    if let FeeTerms::Ethereum { max_fee_per_gas, .. } = &mut pricey.fee {
        *max_fee_per_gas = 300_000_000_000;
    }
    assert!(matches!(
        evaluate(&p, &withdrawal(&pricey, "backend"), &Usage::default(), &[], NOW).outcome,
        Outcome::Deny(DenyReason::FeeCap {
            cap: "fee_caps.ethereum.max_fee_per_gas",
            ..
        })
    ));

    let mut other_wallet = withdrawal(&small, "backend");
    other_wallet.wallet = "cold";
    assert_eq!(
        evaluate(&p, &other_wallet, &Usage::default(), &[], NOW).outcome,
        Outcome::Deny(DenyReason::UnknownWallet("cold".into()))
    );

    let mut goerli = small.clone();
    goerli.network = Network::Ethereum { chain_id: 5 };
    assert!(matches!(
        evaluate(&p, &withdrawal(&goerli, "backend"), &Usage::default(), &[], NOW).outcome,
        Outcome::Deny(DenyReason::WrongNetwork { .. })
    ));

    let mut token = small.clone();
    token.asset = Asset {
        symbol: "USDT".into(),
        contract: Some("0xdAC17F958D2ee523a2206206994597C13D831ec7".into()),
        decimals: 6,
    };
    assert!(matches!(
        evaluate(&p, &withdrawal(&token, "backend"), &Usage::default(), &[], NOW).outcome,
        Outcome::Deny(DenyReason::UnregisteredAsset(_))
    ));

    // USDC is registered but has no limits: denied rather than unlimited.
    let mut usdc = small.clone();
    usdc.asset = Asset {
        symbol: "USDC".into(),
        contract: Some("0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238".into()),
        decimals: 6,
    };
    assert!(matches!(
        evaluate(&p, &withdrawal(&usdc, "backend"), &Usage::default(), &[], NOW).outcome,
        Outcome::Deny(DenyReason::NoLimit { .. })
    ));

    let no_caps = Policy::parse(
        document()
            .replace("[fee_caps.ethereum]\nmax_fee_per_gas = \"200000000000\"\nmax_total_fee = \"20000000000000000\"\n", "")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        evaluate(&no_caps, &w, &Usage::default(), &[], NOW).outcome,
        Outcome::Deny(DenyReason::NoFeeCap("ethereum"))
    );
}

const APPROVERS: [&str; 5] = ["alice", "bob", "carol", "sam", "eve"];

proptest! {
    /// Fewer distinct, valid approvers than the quorum's total never allow,
    /// and foreign or duplicated approvals never change the outcome.
    #[test]
    fn approvals_below_quorum_never_allow(
        picks in proptest::collection::vec((0usize..5, any::<bool>(), 0u8..6), 0..12),
    ) {
        let p = policy();
        let big = intent(STRANGER, ether(50));
        let w = withdrawal(&big, "alice");
        let mut genuine = Vec::new();
        let mut all = Vec::new();
        for (who, dup, corruption) in picks {
            let mut a = approve(&p, &w, APPROVERS[who]);
            match corruption {
                0 => a.withdrawal_id = "w-9".into(),
                1 => a.intent_hash[5] ^= 0x80,
                2 => a.policy_hash[7] ^= 1,
                3 => a.expires_at = NOW - 1,
                _ => genuine.push(a.clone()),
            }
            all.push(a.clone());
            if dup { all.push(a); }
        }
        let only_genuine = evaluate(&p, &w, &Usage::default(), &genuine, NOW);
        let with_noise = evaluate(&p, &w, &Usage::default(), &all, NOW);
        prop_assert_eq!(&only_genuine.outcome, &with_noise.outcome);
        let distinct: std::collections::BTreeSet<&str> = genuine
            .iter()
            .map(|a| a.approver.as_str())
            .filter(|a| *a != "alice" && *a != "eve")
            .collect();
        if distinct.len() < 3 {
            prop_assert_ne!(with_noise.outcome, Outcome::Allow);
        }
    }

    /// Accepting withdrawals one by one, each evaluated against the usage of
    /// those accepted before, never exceeds any rolling window.
    #[test]
    fn rolling_limits_are_never_exceeded(
        steps in proptest::collection::vec((0u64..2_000, 1u64..60), 1..80),
    ) {
        let p = policy();
        let mut usage = Usage::default();
        let mut now = NOW;
        for (gap, amount) in steps {
            now += gap;
            let i = intent(ALLOWED, ether(amount) / U256::from(2u8));
            let w = withdrawal(&i, "backend");
            let d = evaluate(&p, &w, &usage, &[], now);
            if d.outcome == Outcome::Allow {
                usage.entries.push((now, i.total_amount()));
            }
            for (seconds, cap, count_cap) in [(3600, ether(150), Some(5)), (86_400, ether(400), None)] {
                let (used, count) = usage.within(now, seconds);
                prop_assert!(used <= cap);
                if let Some(c) = count_cap { prop_assert!(count <= c); }
            }
        }
    }

    /// An allowlisted address is never matched by an allowlist rule before
    /// its delay has passed.
    #[test]
    fn allowlist_entries_wait_for_their_delay(added_ago in 0u64..(3 * DAY)) {
        let text = document().replace(&format!("added_at = {}", NOW - DAY / 2), &format!("added_at = {}", NOW - added_ago));
        let p = Policy::parse(text.as_bytes()).unwrap();
        let i = intent(FRESH, ether(1));
        let d = evaluate(&p, &withdrawal(&i, "backend"), &Usage::default(), &[], NOW);
        if added_ago < DAY {
            prop_assert_ne!(d.rule.as_deref(), Some("auto-small"));
            prop_assert_ne!(d.outcome, Outcome::Allow);
        } else {
            prop_assert_eq!(d.outcome, Outcome::Allow);
        }
    }
}

/// docs/policy-example.toml is this suite's fixture, and docs/policy.md
/// publishes its policy hash as a test vector.
#[test]
fn published_example_and_hash_vector() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policy-example.toml");
    if std::env::var_os("CUSTOS_WRITE_VECTORS").is_some() {
        std::fs::write(example, document()).unwrap();
    }
    let bytes = std::fs::read(example).unwrap();
    assert_eq!(
        bytes,
        document().as_bytes(),
        "docs/policy-example.toml differs from the fixture"
    );
    let p = Policy::parse(&bytes).unwrap();
    let spec = include_str!("../../../../docs/policy.md");
    let published = format!("`{}`", hex::encode(p.hash));
    assert!(
        spec.contains(&published),
        "docs/policy.md must publish the example's hash {published}"
    );
}
