//! The replay's tests: a history built entry by entry as the engine writes it,
//! then forged one way at a time, each forgery found at its own entry.

use alloy_consensus::TxEip1559;
use alloy_primitives::{Address, TxKind};
use k256::ecdsa::SigningKey;

use super::*;
use crate::chain::ethereum::{EthereumNetwork, UnsignedEthereumTx};
use crate::policy::{Vote, policy_hash};

const SERVICE: &str = "custos-test";
const T0: u64 = 1_800_000_000;
const DAY: u64 = 86_400;
const ETHER: u128 = 1_000_000_000_000_000_000;
const EXCHANGE: &str = "0x3535353535353535353535353535353535353535";
const LATE: &str = "0x5757575757575757575757575757575757575757";
const STRANGER: &str = "0x6868686868686868686868686868686868686868";
/// A wallet public key (the generator point). Nothing here signs with
/// a wallet key: there is no software signer for wallet keys.
const WALLET_KEY: &str = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";

/// People's keys: test-only software keys for approvers, admins and the
/// security officer, and one for someone on no roster.
fn person(who: &str) -> SigningKey {
    let seed = match who {
        "root-1" => 0x11,
        "root-2" => 0x12,
        "root-3" => 0x13,
        "alice" => 0x21,
        "bob" => 0x22,
        "carol" => 0x23,
        "sam" => 0x24,
        _ => 0x66,
    };
    SigningKey::from_slice(&[seed; 32]).unwrap()
}

fn roster_key(who: &str) -> String {
    format!(
        "secp256k1:{}",
        hex::encode(person(who).verifying_key().to_sec1_point(true).as_bytes())
    )
}

fn sign(who: &str, digest: &[u8; 32]) -> Vec<u8> {
    let (sig, _) = person(who).sign_prehash_recoverable(digest);
    sig.normalize_s().to_bytes().to_vec()
}

/// The test policy: small withdrawals to an allowlisted address are
/// signed at once, larger ones need two treasury approvals; 3 ETH an
/// hour, 20 ETH a day. `extra` is added to the allowlist.
fn document(version: u64, extra: &[(&str, u64)]) -> Vec<u8> {
    let mut entries = format!(
        "  {{ address = \"{EXCHANGE}\", added_at = {} }},\n",
        T0 - 10 * DAY
    );
    for (address, added_at) in extra {
        entries.push_str(&format!(
            "  {{ address = \"{address}\", added_at = {added_at} }},\n"
        ));
    }
    format!(
        r#"version = {version}
approval_window_seconds = 86400
allowlist_delay_seconds = 86400

[admins]
quorum = 2
keys = {{ root-1 = "{r1}", root-2 = "{r2}", root-3 = "{r3}" }}
security_officers = ["sam"]

[approvers.alice]
key = "{alice}"
groups = ["treasury"]
[approvers.bob]
key = "{bob}"
groups = ["treasury"]
[approvers.carol]
key = "{carol}"
groups = ["treasury"]
[approvers.sam]
key = "{sam}"
groups = ["security"]

[wallets.hot]
network = "eip155:1"
key_label = "custos-wallet-hot"

[allowlists.exchanges]
entries = [
{entries}]

[[limits]]
wallet = "hot"
asset = "ETH"
per_transaction = "100000000000000000000"
windows = [
  {{ seconds = 3600, amount = "3000000000000000000", count = 5 }},
  {{ seconds = 86400, amount = "20000000000000000000" }},
]

[fee_caps.ethereum]
max_fee_per_gas = "200000000000"
max_total_fee = "20000000000000000"

[[rules]]
name = "auto-small"
wallets = ["hot"]
assets = ["ETH"]
allowlist = "exchanges"
amount_max = "1000000000000000000"
action = "allow"

[[rules]]
name = "large"
allowlist = "exchanges"
amount_max = "100000000000000000000"
action = "require"
quorum = [{{ group = "treasury", min = 2 }}]
"#,
        r1 = roster_key("root-1"),
        r2 = roster_key("root-2"),
        r3 = roster_key("root-3"),
        alice = roster_key("alice"),
        bob = roster_key("bob"),
        carol = roster_key("carol"),
        sam = roster_key("sam"),
    )
    .into_bytes()
}

/// The canonical unsigned EIP-1559 transfer and its intent.
fn transfer(to: &str, wei: u128, nonce: u64) -> (Vec<u8>, crate::chain::Intent) {
    let tx = UnsignedEthereumTx::Eip1559(TxEip1559 {
        chain_id: 1,
        nonce,
        gas_limit: 21_000,
        max_fee_per_gas: 30_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        to: TxKind::Call(to.parse::<Address>().unwrap()),
        value: U256::from(wei),
        access_list: Default::default(),
        input: Default::default(),
    });
    let key = VerifyingKey::from_sec1_bytes(&hex::decode(WALLET_KEY).unwrap()).unwrap();
    let network = EthereumNetwork {
        chain_id: 1,
        tokens: Vec::new(),
    };
    let parsed = ethereum::parse(tx.clone(), &network, crate::address::ethereum_address(&key)).unwrap();
    (ethereum::signing_payload(&tx), parsed.intent().clone())
}

fn window(seconds: u64, before: (u128, u64), after: (u128, u64)) -> WindowUsage {
    WindowUsage {
        seconds,
        amount_before: before.0.to_string(),
        count_before: before.1,
        amount_after: after.0.to_string(),
        count_after: after.1,
    }
}

/// Both windows, when everything so far falls in the last hour.
fn usage(before: (u128, u64), after: (u128, u64)) -> Vec<WindowUsage> {
    vec![window(3600, before, after), window(DAY, before, after)]
}

/// A log under construction, as the engine would write it.
struct History {
    entries: Vec<Entry>,
    /// Entries already handed on ([`History::drain`]).
    offset: u64,
    time: u64,
    intents: HashMap<String, [u8; 32]>,
    /// Hash and version of the active policy.
    policy: ([u8; 32], u64),
    epoch: u64,
}

impl History {
    /// A wallet and the genesis policy.
    fn new() -> Self {
        Self::with_genesis(document(1, &[]))
    }

    fn with_genesis(genesis: Vec<u8>) -> Self {
        let mut h = Self {
            entries: Vec::new(),
            offset: 0,
            time: T0,
            intents: HashMap::new(),
            policy: ([0; 32], 0),
            epoch: 0,
        };
        h.push(Event::WalletCreated {
            wallet_id: "hot".into(),
            key_label: "custos-wallet-hot".into(),
            key_id: vec![1; 16],
            public_key: hex::decode(WALLET_KEY).unwrap(),
            attributes: 0b11_0111,
        });
        let hash = policy_hash(&genesis);
        h.push(Event::PolicyProposed {
            hash,
            version: 1,
            document: genesis,
        });
        h.push(Event::PolicyActivated { hash, version: 1 });
        h.policy = (hash, 1);
        h
    }

    fn at(&mut self, time: u64) -> &mut Self {
        self.time = time;
        self
    }

    fn push(&mut self, event: Event) -> u64 {
        let index = self.offset + self.entries.len() as u64;
        self.entries.push(Entry {
            index,
            time: self.time,
            event,
        });
        index
    }

    fn create(&mut self, id: &str, to: &str, wei: u128, nonce: u64, initiator: &str) -> u64 {
        let (unsigned_tx, intent) = transfer(to, wei, nonce);
        self.intents.insert(id.into(), intent.hash());
        self.push(Event::WithdrawalCreated {
            withdrawal_id: id.into(),
            request_id: format!("request-{id}"),
            wallet_id: "hot".into(),
            initiator: initiator.into(),
            chain: "ethereum".into(),
            unsigned_tx,
            intent: intent.canonical_bytes(),
            intent_hash: intent.hash(),
        })
    }

    fn decide(
        &mut self,
        id: &str,
        state: &str,
        rule: &str,
        refusal: (&str, &str),
        counted: &[&str],
        usage: Vec<WindowUsage>,
    ) -> u64 {
        self.push(Event::Decision {
            withdrawal_id: id.into(),
            policy_hash: self.policy.0,
            policy_version: self.policy.1,
            state: state.into(),
            rule: rule.into(),
            reason_code: refusal.0.into(),
            reason: refusal.1.into(),
            counted_approvers: counted.iter().map(|s| (*s).to_owned()).collect(),
            usage,
        })
    }

    /// A vote for `approver`, signed with `signer`'s key.
    fn vote_signed_by(&mut self, id: &str, approver: &str, signer: &str, vote: Vote) -> u64 {
        let m = ApprovalMessage {
            service_id: SERVICE.into(),
            withdrawal_id: id.into(),
            intent_hash: self.intents[id],
            policy_hash: self.policy.0,
            vote,
            expires_at: self.time + 600,
            approver: approver.into(),
        };
        self.push(Event::Vote {
            withdrawal_id: id.into(),
            message: m.encode(),
            signature: sign(signer, &m.digest()),
        })
    }

    fn vote(&mut self, id: &str, approver: &str) -> u64 {
        self.vote_signed_by(id, approver, approver, Vote::Approve)
    }

    fn governance(
        &self,
        action: GovernanceAction,
        sequence: u64,
        subject: [u8; 32],
        signer: &str,
    ) -> (Vec<u8>, Vec<u8>) {
        let m = GovernanceMessage {
            service_id: SERVICE.into(),
            action,
            sequence,
            subject,
            expires_at: self.time + 600,
            signer: signer.into(),
        };
        (m.encode(), sign(signer, &m.digest()))
    }

    /// Proposes `document` and logs each signer's approval; the entry
    /// after the last one activates it when `activate` is set. Returns
    /// the index of the last entry.
    fn new_version(&mut self, document: Vec<u8>, signers: &[&str], activate: bool) -> u64 {
        let hash = policy_hash(&document);
        let version = Policy::parse(&document).unwrap().version;
        self.push(Event::PolicyProposed {
            hash,
            version,
            document,
        });
        for signer in signers {
            let (message, signature) =
                self.governance(GovernanceAction::ActivatePolicy, version, hash, signer);
            self.push(Event::PolicyApproved {
                hash,
                message,
                signature,
            });
        }
        if !activate {
            return self.entries.len() as u64 - 1;
        }
        self.policy = (hash, version);
        self.push(Event::PolicyActivated { hash, version })
    }

    fn freeze(&mut self, signer: &str) -> u64 {
        let signature = self.governance(GovernanceAction::Freeze, self.epoch, [0; 32], signer);
        let epoch = self.epoch;
        self.epoch += 1;
        self.push(Event::Frozen {
            epoch,
            signatures: vec![signature],
        })
    }

    fn unfreeze(&mut self, signers: &[&str]) -> u64 {
        let signatures = signers
            .iter()
            .map(|s| self.governance(GovernanceAction::Unfreeze, self.epoch, [0; 32], s))
            .collect();
        let epoch = self.epoch;
        self.epoch += 1;
        self.push(Event::Unfrozen { epoch, signatures })
    }

    /// Hands on the entries so far, keeping the indexes running.
    fn drain(&mut self) -> Vec<Entry> {
        self.offset += self.entries.len() as u64;
        std::mem::take(&mut self.entries)
    }

    fn replay(&self) -> ReplayReport {
        let mut replayer = Replayer::for_service(SERVICE);
        for entry in &self.entries {
            replayer.push(entry);
        }
        replayer.finish()
    }
}

/// The findings as (index, code), for assertions that name both.
fn found(report: &ReplayReport) -> Vec<(u64, &'static str)> {
    report.findings.iter().map(|f| (f.index, f.code)).collect()
}

fn detail(report: &ReplayReport, index: u64, code: &str) -> String {
    report
        .findings
        .iter()
        .find(|f| f.index == index && f.code == code)
        .map(|f| f.detail.clone())
        .unwrap_or_else(|| panic!("no {code} at {index}: {:#?}", report.findings))
}

const NONE: (&str, &str) = ("", "");

/// A history the engine could have written: withdrawals signed at once,
/// after two approvals, denied, cancelled after approval and expired; a
/// new version by admin quorum; a freeze and an unfreeze.
fn clean() -> History {
    let mut h = History::new();
    h.at(T0 + 10).create("wd_small", EXCHANGE, ETHER / 2, 0, "ops");
    h.decide(
        "wd_small",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (ETHER / 2, 1)),
    );

    h.at(T0 + 20).create("wd_large", EXCHANGE, 2 * ETHER, 1, "ops");
    let half = (ETHER / 2, 1);
    h.decide(
        "wd_large",
        "PENDING_APPROVAL",
        "large",
        NONE,
        &[],
        usage(half, half),
    );
    h.at(T0 + 30).vote("wd_large", "alice");
    h.decide(
        "wd_large",
        "PENDING_APPROVAL",
        "large",
        NONE,
        &["alice"],
        usage(half, half),
    );
    h.at(T0 + 40).vote("wd_large", "bob");
    let after = (ETHER / 2 + 2 * ETHER, 2);
    h.decide(
        "wd_large",
        "APPROVED",
        "large",
        NONE,
        &["alice", "bob"],
        usage(half, after),
    );

    h.at(T0 + 50).create("wd_far", STRANGER, ETHER / 10, 2, "ops");
    let reason = format!(
        "destination {STRANGER} is not on allowlist exchanges (rule auto-small); no other rule matched, the default is deny"
    );
    h.decide(
        "wd_far",
        "DENIED",
        "",
        ("not_allowlisted", &reason),
        &[],
        usage(after, after),
    );

    // Approved, then cancelled: it stops counting.
    h.at(T0 + 60).create("wd_cancel", EXCHANGE, ETHER / 4, 3, "ops");
    let with_cancelled = (after.0 + ETHER / 4, 3);
    h.decide(
        "wd_cancel",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage(after, with_cancelled),
    );
    h.at(T0 + 70).push(Event::Closed {
        withdrawal_id: "wd_cancel".into(),
        state: "CANCELLED".into(),
    });

    h.at(T0 + 100)
        .new_version(document(2, &[(LATE, T0 - 5 * DAY)]), &["root-1", "root-2"], true);
    h.at(T0 + 110).create("wd_after", EXCHANGE, ETHER / 5, 4, "ops");
    let cancelled_freed = (after.0 + ETHER / 5, 3);
    h.decide(
        "wd_after",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage(after, cancelled_freed),
    );

    h.at(T0 + 120).freeze("sam");
    h.at(T0 + 130).create("wd_frozen", EXCHANGE, ETHER / 10, 5, "ops");
    h.decide(
        "wd_frozen",
        "DENIED",
        "",
        (
            "frozen",
            "custody is frozen by a security officer; nothing is signed until admins unfreeze",
        ),
        &[],
        Vec::new(),
    );
    h.at(T0 + 140).unfreeze(&["root-1", "root-3"]);

    // An hour on, only wd_after is in the hour's window.
    h.at(T0 + 3700).create("wd_slow", EXCHANGE, 2 * ETHER, 6, "ops");
    let hour = (ETHER / 5, 1);
    let windows = vec![
        window(3600, hour, hour),
        window(DAY, cancelled_freed, cancelled_freed),
    ];
    h.decide("wd_slow", "PENDING_APPROVAL", "large", NONE, &[], windows);
    h.at(T0 + 3700 + DAY).push(Event::Closed {
        withdrawal_id: "wd_slow".into(),
        state: "EXPIRED".into(),
    });
    h
}

#[test]
fn a_clean_history_gives_no_findings() {
    let h = clean();
    let report = h.replay();
    assert_eq!(report.findings, [], "{:#?}", report.findings);
    assert_eq!(report.entries, h.entries.len() as u64);
    assert_eq!(
        (
            report.policy_versions,
            report.withdrawals,
            report.decisions,
            report.votes,
            report.signatures
        ),
        (2, 7, 9, 2, 0)
    );
    assert_eq!(report.genesis_policy_hash, Some(policy_hash(&document(1, &[]))));
    assert_eq!(report.service_id.as_deref(), Some(SERVICE));
    // Learning the service id from the first message gives the same.
    let mut learning = Replayer::new();
    for entry in &h.entries {
        learning.push(entry);
    }
    assert_eq!(learning.finish(), report);
}

/// (a) A signature with no decision authorizing it.
#[test]
fn a_signature_without_an_approved_decision_is_flagged() {
    let mut h = History::new();
    h.at(T0 + 10).create("wd_large", EXCHANGE, 2 * ETHER, 0, "ops");
    h.decide(
        "wd_large",
        "PENDING_APPROVAL",
        "large",
        NONE,
        &[],
        usage((0, 0), (0, 0)),
    );
    let pending = h.push(Event::Signed {
        withdrawal_id: "wd_large".into(),
        signed_tx: vec![0x02, 0xf8, 0x01],
        tx_hash: vec![0x33; 32],
    });
    let created = h.create("wd_bare", EXCHANGE, ETHER / 2, 1, "ops");
    let bare = h.push(Event::Signed {
        withdrawal_id: "wd_bare".into(),
        signed_tx: vec![0x02, 0xf8, 0x01],
        tx_hash: vec![0x33; 32],
    });
    let unknown = h.push(Event::Signed {
        withdrawal_id: "wd_nobody".into(),
        signed_tx: vec![0x02],
        tx_hash: vec![0x33; 32],
    });
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (pending, code::SIGNATURE_UNAUTHORIZED),
            (pending, code::SIGNATURE_INVALID),
            (created, code::DECISION_MISSING),
            (bare, code::SIGNATURE_UNAUTHORIZED),
            (bare, code::SIGNATURE_INVALID),
            (unknown, code::SIGNATURE_UNAUTHORIZED),
        ],
        "{:#?}",
        report.findings
    );
    assert!(detail(&report, pending, code::SIGNATURE_UNAUTHORIZED).contains("PENDING_APPROVAL"));
    assert_eq!(report.signatures, 3);
}

/// (b) Approvals by keys the roster does not list, and what they would
/// have approved.
#[test]
fn an_approval_by_a_key_not_on_the_roster_is_flagged() {
    let mut h = History::new();
    h.at(T0 + 10).create("wd_large", EXCHANGE, 2 * ETHER, 0, "ops");
    let none = usage((0, 0), (0, 0));
    h.decide("wd_large", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
    // Alice's name, mallory's key.
    let as_alice = h.vote_signed_by("wd_large", "alice", "mallory", Vote::Approve);
    h.decide("wd_large", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
    // Mallory under her own name.
    let as_mallory = h.vote_signed_by("wd_large", "mallory", "mallory", Vote::Approve);
    h.decide("wd_large", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
    h.vote("wd_large", "bob");
    // A forged decision counting the forged vote.
    let forged = h.decide(
        "wd_large",
        "APPROVED",
        "large",
        NONE,
        &["alice", "bob"],
        usage((0, 0), (2 * ETHER, 1)),
    );
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (as_alice, code::APPROVAL_UNAUTHORIZED),
            (as_mallory, code::APPROVAL_UNAUTHORIZED),
            (forged, code::DECISION_MISMATCH),
        ],
        "{:#?}",
        report.findings
    );
    assert!(detail(&report, as_alice, code::APPROVAL_UNAUTHORIZED).contains("alice's key"));
    assert!(detail(&report, as_mallory, code::APPROVAL_UNAUTHORIZED).contains("not on the roster"));
    let mismatch = detail(&report, forged, code::DECISION_MISMATCH);
    assert!(
        mismatch.contains("replay decides PENDING_APPROVAL") && mismatch.contains("counting bob,"),
        "{mismatch}"
    );
}

/// (c) A decision that exceeds a rolling limit counted from the log.
#[test]
fn a_decision_over_a_limit_is_flagged() {
    let mut h = History::new();
    let step = 9 * ETHER / 10;
    for n in 0..3u64 {
        let id = format!("wd_{n}");
        h.at(T0 + 10 * n).create(&id, EXCHANGE, step, n, "ops");
        let used = (step * u128::from(n as u32), n);
        h.decide(
            &id,
            "APPROVED",
            "auto-small",
            NONE,
            &[],
            usage(used, (used.0 + step, n + 1)),
        );
    }
    // 2.7 ETH used of 3 ETH an hour: the fourth does not fit, but the
    // log approves it and claims less was used.
    h.at(T0 + 40).create("wd_3", EXCHANGE, step, 3, "ops");
    let over = h.decide(
        "wd_3",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (step, 1)),
    );
    let signed = h.push(Event::Signed {
        withdrawal_id: "wd_3".into(),
        signed_tx: vec![0x02],
        tx_hash: vec![0; 32],
    });
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (over, code::DECISION_MISMATCH),
            (signed, code::SIGNATURE_UNAUTHORIZED),
            (signed, code::SIGNATURE_INVALID),
        ],
        "{:#?}",
        report.findings
    );
    let mismatch = detail(&report, over, code::DECISION_MISMATCH);
    assert!(
        mismatch.contains("DENIED under policy version 1, rolling_amount_limit")
            && mismatch.contains("2700000000000000000 used"),
        "{mismatch}"
    );
    // An hour later the window has room again.
    let mut later = History::new();
    later.entries = h.entries[..h.entries.len() - 3].to_vec();
    later.intents = h.intents.clone();
    later.policy = h.policy;
    // The hour now covers what was counted after T0 + 5: wd_1 and wd_2.
    later.at(T0 + 3605).create("wd_3", EXCHANGE, step, 3, "ops");
    let day = (3 * step, 3);
    later.decide(
        "wd_3",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        vec![
            window(3600, (2 * step, 2), (3 * step, 3)),
            window(DAY, day, (4 * step, 4)),
        ],
    );
    assert_eq!(later.replay().findings, []);
}

/// (d) An allowlist entry used before its time-lock ended: the new
/// version backdates it, but the lock runs from the activation.
#[test]
fn an_allowlist_entry_used_before_its_time_lock_is_flagged() {
    let mut h = History::new();
    let activated_at = T0 + 100;
    h.at(activated_at)
        .new_version(document(2, &[(LATE, T0 - 30 * DAY)]), &["root-1", "root-2"], true);
    h.at(activated_at + 60)
        .create("wd_early", LATE, ETHER / 2, 0, "ops");
    let early = h.decide(
        "wd_early",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (ETHER / 2, 1)),
    );
    let report = h.replay();
    assert_eq!(
        found(&report),
        [(early, code::DECISION_MISMATCH)],
        "{:#?}",
        report.findings
    );
    let mismatch = detail(&report, early, code::DECISION_MISMATCH);
    assert!(
        mismatch.contains("not_allowlisted")
            && mismatch.contains(&format!("time-lock ends at {}", activated_at + DAY)),
        "{mismatch}"
    );

    // Once the lock has run, the same withdrawal is allowed.
    let mut h = History::new();
    h.at(activated_at)
        .new_version(document(2, &[(LATE, T0 - 30 * DAY)]), &["root-1", "root-2"], true);
    h.at(activated_at + DAY)
        .create("wd_later", LATE, ETHER / 2, 0, "ops");
    h.decide(
        "wd_later",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (ETHER / 2, 1)),
    );
    assert_eq!(h.replay().findings, []);
}

#[test]
fn policy_history_needs_quorum_and_goes_forward() {
    let mut h = History::new();
    // One admin of two needed, and an activation all the same.
    let short = h.at(T0 + 10).new_version(document(2, &[]), &["root-1"], true);
    // The forged version's own admins then sign the next one.
    h.at(T0 + 20)
        .new_version(document(3, &[]), &["root-1", "root-2"], true);
    // An older version can be neither proposed nor activated.
    let stale = h.at(T0 + 30).new_version(document(2, &[(LATE, 1)]), &[], false);
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (short, code::ACTIVATION_UNAUTHORIZED),
            (stale, code::VERSION_NOT_NEWER)
        ],
        "{:#?}",
        report.findings
    );
    assert_eq!(report.policy_versions, 3);
    // Version 3 verified against version 2's admins, but version 2 was
    // never validly activated: nothing under either authorizes a signature.
    let mut replayer = Replayer::for_service(SERVICE);
    for entry in &h.entries {
        replayer.push(entry);
    }
    assert!(
        replayer
            .active
            .as_ref()
            .is_some_and(|a| a.tainted && a.policy.version == 3)
    );

    // A document that does not hash to its logged hash.
    let mut h = History::new();
    let index = h.push(Event::PolicyProposed {
        hash: [7; 32],
        version: 2,
        document: document(2, &[]),
    });
    let report = h.replay();
    assert_eq!(found(&report), [(index, code::POLICY_INVALID)]);
}

#[test]
fn a_quorum_without_its_activation_and_a_bad_admin_signature_are_flagged() {
    let mut h = History::new();
    h.at(T0 + 10)
        .new_version(document(2, &[]), &["root-1", "root-2"], false);
    let quorum = h.entries.len() as u64 - 1;
    h.create("wd_x", EXCHANGE, ETHER / 2, 0, "ops");
    h.decide(
        "wd_x",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (ETHER / 2, 1)),
    );
    let report = h.replay();
    assert_eq!(found(&report), [(quorum, code::ACTIVATION_MISSING)]);

    let mut h = History::new();
    let doc = document(2, &[]);
    let hash = policy_hash(&doc);
    h.push(Event::PolicyProposed {
        hash,
        version: 2,
        document: doc,
    });
    let (message, _) = h.governance(GovernanceAction::ActivatePolicy, 2, hash, "root-1");
    let bad = h.push(Event::PolicyApproved {
        hash,
        message,
        signature: sign("mallory", &[1; 32]),
    });
    let report = h.replay();
    assert_eq!(found(&report), [(bad, code::POLICY_APPROVAL_INVALID)]);
}

#[test]
fn freezes_need_their_signers_and_decisions_while_frozen_deny() {
    let mut h = History::new();
    // A freeze by an approver who is no security officer.
    let bad_freeze = h.at(T0 + 10).freeze("alice");
    h.create("wd_x", EXCHANGE, ETHER / 2, 0, "ops");
    let approved = h.decide(
        "wd_x",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (ETHER / 2, 1)),
    );
    // One admin where two are needed.
    let bad_unfreeze = h.at(T0 + 20).unfreeze(&["root-1"]);
    let signed = h.push(Event::Signed {
        withdrawal_id: "wd_x".into(),
        signed_tx: vec![0x02],
        tx_hash: vec![0; 32],
    });
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (bad_freeze, code::FREEZE_INVALID),
            (approved, code::DECISION_WHILE_FROZEN),
            (bad_unfreeze, code::FREEZE_INVALID),
            (signed, code::SIGNATURE_UNAUTHORIZED),
            (signed, code::SIGNATURE_INVALID),
        ],
        "{:#?}",
        report.findings
    );
}

#[test]
fn a_logged_intent_that_is_not_the_transactions_is_flagged() {
    let mut h = History::new();
    let (unsigned_tx, _) = transfer(EXCHANGE, 50 * ETHER, 0);
    // The log shows approvers half an ether; the transaction sends fifty.
    let (_, shown) = transfer(EXCHANGE, ETHER / 2, 0);
    h.intents.insert("wd_x".into(), shown.hash());
    let created = h.at(T0 + 10).push(Event::WithdrawalCreated {
        withdrawal_id: "wd_x".into(),
        request_id: "r".into(),
        wallet_id: "hot".into(),
        initiator: "ops".into(),
        chain: "ethereum".into(),
        unsigned_tx,
        intent: shown.canonical_bytes(),
        intent_hash: shown.hash(),
    });
    let decided = h.decide(
        "wd_x",
        "APPROVED",
        "auto-small",
        NONE,
        &[],
        usage((0, 0), (ETHER / 2, 1)),
    );
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (created, code::INTENT_MISMATCH),
            (decided, code::DECISION_MISMATCH)
        ],
        "{:#?}",
        report.findings
    );
    assert!(detail(&report, created, code::INTENT_MISMATCH).contains("50000000000000000000 base units"));
    // Fifty ether does not fit the hour's three.
    assert!(detail(&report, decided, code::DECISION_MISMATCH).contains("replay decides DENIED"));
    assert!(detail(&report, decided, code::DECISION_MISMATCH).contains("rolling_amount_limit"));
}

#[test]
fn votes_bind_to_their_withdrawal_and_close_only_open_withdrawals() {
    let mut h = History::new();
    h.at(T0 + 10).create("wd_a", EXCHANGE, 2 * ETHER, 0, "alice");
    let none = usage((0, 0), (0, 0));
    h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
    let own = h.vote("wd_a", "alice");
    h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &[], none.clone());
    h.vote("wd_a", "bob");
    h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &["bob"], none.clone());
    let twice = h.vote("wd_a", "bob");
    h.decide("wd_a", "PENDING_APPROVAL", "large", NONE, &["bob"], none.clone());
    let early = h.at(T0 + 20).push(Event::Closed {
        withdrawal_id: "wd_a".into(),
        state: "EXPIRED".into(),
    });
    h.push(Event::Closed {
        withdrawal_id: "wd_a".into(),
        state: "CANCELLED".into(),
    });
    let again = h.push(Event::Closed {
        withdrawal_id: "wd_a".into(),
        state: "CANCELLED".into(),
    });
    let late = h.vote("wd_a", "carol");
    let orphan = h.decide("wd_a", "APPROVED", "large", NONE, &["bob", "carol"], none.clone());
    let gap = h.push(Event::Closed {
        withdrawal_id: "wd_a".into(),
        state: "EXPIRED".into(),
    });
    h.entries[gap as usize].index += 1;
    let report = h.replay();
    assert_eq!(
        found(&report),
        [
            (own, code::APPROVAL_UNAUTHORIZED),
            (twice, code::VOTE_REFUSED),
            (early, code::CLOSE_INVALID),
            (again, code::CLOSE_INVALID),
            (late, code::VOTE_REFUSED),
            (orphan, code::ILLEGAL_TRANSITION),
            (gap + 1, code::INDEX_GAP),
            (gap + 1, code::CLOSE_INVALID),
        ],
        "{:#?}",
        report.findings
    );
    assert!(detail(&report, own, code::APPROVAL_UNAUTHORIZED).contains("initiated"));
}

#[test]
fn bytes_that_are_not_an_entry_are_flagged_at_their_place() {
    let h = History::new();
    let mut replayer = Replayer::for_service(SERVICE);
    for entry in &h.entries {
        replayer.push_encoded(&entry.encode()).unwrap();
    }
    assert!(
        replayer
            .push_encoded(b"custos/audit/v1 and then nonsense")
            .is_err()
    );
    let report = replayer.finish();
    assert_eq!(found(&report), [(3, code::MALFORMED_ENTRY)]);
    assert_eq!(report.entries, 4);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["genesis_policy_hash"],
        hex::encode(policy_hash(&document(1, &[])))
    );
    assert_eq!(json["findings"][0]["code"], "malformed_entry");
}

/// A busy log: two of three withdrawals wait for two verified votes, so
/// a third of the entries carry a signature check, about the share of
/// a real log where each approved withdrawal is also signed. Windows of
/// 1 and 2 seconds, and withdrawals 4 seconds apart, keep every
/// decision's usage at zero before; the ledger still grows. Hands the
/// entries on in batches of about `batch`.
fn busy(target: u64, batch: usize, mut sink: impl FnMut(Vec<Entry>)) {
    let genesis = String::from_utf8(document(1, &[]))
        .unwrap()
        .replace("seconds = 3600,", "seconds = 1,")
        .replace("seconds = 86400,", "seconds = 2,");
    let mut h = History::with_genesis(genesis.into_bytes());
    let mut n = 0u64;
    while h.offset + (h.entries.len() as u64) < target {
        let t = T0 + 4 * n;
        let id = format!("wd_{n:08}");
        let win = |amount: u128| vec![window(1, (0, 0), (amount, 1)), window(2, (0, 0), (amount, 1))];
        let none = vec![window(1, (0, 0), (0, 0)), window(2, (0, 0), (0, 0))];
        if n % 3 == 0 {
            h.at(t).create(&id, EXCHANGE, ETHER / 2, n, "ops");
            h.decide(&id, "APPROVED", "auto-small", NONE, &[], win(ETHER / 2));
        } else {
            h.at(t).create(&id, EXCHANGE, 2 * ETHER, n, "ops");
            h.decide(&id, "PENDING_APPROVAL", "large", NONE, &[], none.clone());
            h.at(t + 1).vote(&id, "alice");
            h.decide(&id, "PENDING_APPROVAL", "large", NONE, &["alice"], none);
            h.at(t + 2).vote(&id, "bob");
            h.decide(&id, "APPROVED", "large", NONE, &["alice", "bob"], win(2 * ETHER));
        }
        h.intents.clear();
        if h.entries.len() >= batch {
            sink(h.drain());
        }
        n += 1;
    }
    sink(h.drain());
}

/// Checking signatures ahead on other cores changes nothing but the time.
#[test]
fn push_all_gives_the_same_report_as_push() {
    let mut entries = Vec::new();
    busy(600, 600, |batch| entries.extend(batch));
    // Forgeries among them: a vote by a key not on the roster, a
    // signature for a pending withdrawal, a vote for nobody.
    // (A vote mid-log: the first batch starts before the genesis policy,
    // with no roster to check anything ahead against, and a short last
    // batch is not worth other threads.)
    let forged_vote = (entries.len() / 2..)
        .find(|i| matches!(entries[*i].event, Event::Vote { .. }))
        .unwrap();
    let Event::Vote { signature, .. } = &mut entries[forged_vote].event else {
        unreachable!()
    };
    *signature = sign("mallory", &[5; 32]);
    let pending = entries
        .iter()
        .position(|e| matches!(&e.event, Event::Decision { state, .. } if state == "PENDING_APPROVAL"))
        .unwrap();
    let Event::Decision { withdrawal_id, .. } = &entries[pending].event else {
        unreachable!()
    };
    let (unsigned, _) = transfer(EXCHANGE, ETHER, 1);
    let garbage = Event::Signed {
        withdrawal_id: withdrawal_id.clone(),
        signed_tx: unsigned,
        tx_hash: vec![0; 32],
    };
    entries.insert(
        pending + 1,
        Entry {
            index: 0,
            time: T0,
            event: garbage,
        },
    );
    for (i, e) in entries.iter_mut().enumerate() {
        e.index = i as u64;
    }
    let mut one_by_one = Replayer::for_service(SERVICE);
    for e in &entries {
        one_by_one.push(e);
    }
    let one_by_one = one_by_one.finish();
    assert!(one_by_one.findings.len() >= 3, "{:#?}", one_by_one.findings);
    for batch in [7, 100, 128] {
        let mut batched = Replayer::for_service(SERVICE);
        for chunk in entries.chunks(batch) {
            batched.push_all(chunk);
        }
        assert_eq!(batched.finish(), one_by_one, "batches of {batch}");
    }
}

/// Scale: a million-entry log (a third auto-signed, two thirds approved
/// by two votes) goes through the whole offline verifier (strict
/// decoding, the tree, the replay with every vote signature checked) with
/// no finding. Run by hand for docs/performance.md:
/// `cargo test --release --lib audit::replay::tests::verifies_a_million_entries -- --ignored --nocapture`.
#[test]
#[ignore = "a scale run, minutes in debug builds"]
fn verifies_a_million_entries() {
    use crate::audit::note::NoteVerifier;
    use crate::audit::verify::LogVerifier;
    let target: u64 = std::env::var("REPLAY_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // Only verification happens here; no checkpoint is signed, so the
    // verifier reports `no_checkpoint` and nothing else.
    let rfc8032_test_1 =
        hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a").unwrap();
    let key = NoteVerifier::new(
        "custos.example/log",
        crate::key::KeyKind::Ed25519,
        &rfc8032_test_1,
    )
    .unwrap();
    let mut verifier = LogVerifier::new(key, Some(SERVICE));
    let mut verifying = std::time::Duration::ZERO;
    busy(target, 4096, |batch| {
        let encoded: Vec<Vec<u8>> = batch.iter().map(Entry::encode).collect();
        let start = std::time::Instant::now();
        for bytes in &encoded {
            verifier.push_entry(bytes, None);
        }
        verifying += start.elapsed();
    });
    let start = std::time::Instant::now();
    let report = verifier.finish();
    verifying += start.elapsed();
    let codes: Vec<&str> = report.failures.iter().map(|f| f.code).collect();
    assert_eq!(codes, ["no_checkpoint"]);
    assert!(report.entries >= target, "{} entries", report.entries);
    assert_eq!(report.replay.findings, []);
    eprintln!(
        "verified {} entries ({} withdrawals, {} votes) on {} cores in {:.2?}",
        report.entries,
        report.replay.withdrawals,
        report.replay.votes,
        std::thread::available_parallelism().map_or(1, usize::from),
        verifying
    );
}
