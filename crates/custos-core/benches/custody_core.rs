//! The pure custody core, one operation at a time: a policy decision, an
//! intent and its hash, an approval signature, a signed checkpoint, and the
//! offline replay of a clean audit log, in entries per second.
//!
//! ```sh
//! cargo bench -p custos-core --bench custody_core   # about a minute
//! ```
//!
//! Everything runs in memory, with no HSM and no store. The only keys that
//! sign here are people's keys (approvers), software keys from fixed seeds.
//! No wallet key exists in software: the wallet is named by a public key
//! alone (the secp256k1 generator point), so nothing signs a transaction
//! and the replayed log has no `Signed` entries. Its withdrawals stop at
//! APPROVED, DENIED or CANCELLED.
//!
//! The replayed log is built here from public APIs, as the engine writes
//! it: the genesis policy, the wallet, and withdrawals whose intents are
//! recomputed from their unsigned transactions ([`recompute`]) and whose
//! decisions are what [`evaluate`] returns, recorded as the engine records
//! them. Replay must find nothing in it before it is timed.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use alloy_consensus::TxEip1559;
use alloy_primitives::{Address, TxKind, U256};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use k256::ecdsa::{SigningKey, VerifyingKey};

use custos_core::approval::ApprovalMessage;
use custos_core::audit::entry::{Entry, Event};
use custos_core::audit::note::NoteVerifier;
use custos_core::audit::replay::Replayer;
use custos_core::chain::ethereum::{self, EthereumNetwork, UnsignedEthereumTx};
use custos_core::chain::{Intent, Network};
use custos_core::lifecycle::State;
use custos_core::policy::record::{record, window_usage};
use custos_core::policy::{
    Approval, DenyReason, Outcome, Policy, Usage, Vote, Withdrawal, evaluate, policy_hash,
};
use custos_core::recompute::{self, ParsedTx};

const SERVICE: &str = "custos-bench";
const T0: u64 = 1_800_000_000;
const DAY: u64 = 86_400;
const ETHER: u128 = 1_000_000_000_000_000_000;
const EXCHANGE: &str = "0x3535353535353535353535353535353535353535";
const OTC: &str = "0x4646464646464646464646464646464646464646";
const STRANGER: &str = "0x5757575757575757575757575757575757575757";
const KEY_LABEL: &str = "custos-wallet-hot";
/// The wallet's public key: the secp256k1 generator point. Nothing here
/// signs with a wallet key; there is no software signer for wallet keys.
const WALLET_KEY: &str = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";
/// Entries in the replayed log (rounded up to a whole withdrawal).
const REPLAY_ENTRIES: usize = 10_000;
/// The batch `custos audit verify` hands to `Replayer::push_all`.
const REPLAY_BATCH: usize = 4096;

/// People's keys: software keys from fixed seeds for admins and approvers.
fn person(who: &str) -> SigningKey {
    let seed = match who {
        "root-1" => 0x11,
        "root-2" => 0x12,
        "root-3" => 0x13,
        "alice" => 0x21,
        "bob" => 0x22,
        "carol" => 0x23,
        "sam" => 0x24,
        other => panic!("{other} has no key"),
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
    let (signature, _) = person(who).sign_prehash_recoverable(digest);
    signature.normalize_s().to_bytes().to_vec()
}

fn wallet_key() -> VerifyingKey {
    VerifyingKey::from_sec1_bytes(&hex::decode(WALLET_KEY).unwrap()).unwrap()
}

/// A production-shaped genesis policy: small withdrawals to an exchange on
/// the allowlist are signed at once, larger ones need two treasury
/// approvals, anything else is denied; hourly, daily and 30-day limits.
fn document() -> String {
    format!(
        r#"version = 1
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
groups = ["treasury", "security"]
[approvers.sam]
key = "{sam}"
groups = ["security"]

[wallets.hot]
network = "eip155:1"
key_label = "{KEY_LABEL}"

[[assets]]
network = "eip155:1"
symbol = "USDC"
contract = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"
decimals = 6

[allowlists.exchanges]
entries = [
  {{ address = "{EXCHANGE}", added_at = {listed} }},
  {{ address = "{OTC}", added_at = {listed} }},
]

[[limits]]
wallet = "hot"
asset = "ETH"
per_transaction = "100000000000000000000"
windows = [
  {{ seconds = 3600, amount = "20000000000000000000", count = 5 }},
  {{ seconds = 86400, amount = "250000000000000000000" }},
  {{ seconds = 2592000, amount = "10000000000000000000000" }},
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
name = "blocked-initiator"
initiators = ["mallory"]
action = "deny"

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
        listed = T0 - 30 * DAY,
    )
}

/// The canonical unsigned encoding of an EIP-1559 ETH transfer.
fn transfer(to: &str, wei: u128, nonce: u64) -> Vec<u8> {
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
    ethereum::signing_payload(&tx)
}

/// The intent of a stored transaction, recomputed as replay and `custos
/// approve` recompute it: for wallet `hot` as the policy governs it.
fn recomputed(policy: &Policy, unsigned_tx: &[u8]) -> ParsedTx {
    let tx = recompute::decode("ethereum", unsigned_tx).unwrap();
    recompute::parse_under_policy(tx, policy, "hot", &wallet_key()).unwrap()
}

fn withdrawal<'a>(id: &'a str, intent: &'a Intent) -> Withdrawal<'a> {
    Withdrawal {
        id,
        wallet: "hot",
        key_label: KEY_LABEL,
        intent,
        intent_hash: intent.hash(),
        initiator: "ops",
    }
}

fn approval_message(policy: &Policy, w: &Withdrawal<'_>, approver: &str, now: u64) -> ApprovalMessage {
    ApprovalMessage {
        service_id: SERVICE.into(),
        withdrawal_id: w.id.into(),
        intent_hash: w.intent_hash,
        policy_hash: policy.hash,
        vote: Vote::Approve,
        expires_at: now + 600,
        approver: approver.into(),
    }
}

// 1. Policy evaluation.

fn policy_evaluation(c: &mut Criterion) {
    let policy = Policy::parse(document().as_bytes()).unwrap();
    let now = T0 + 30 * DAY;
    // 1,000 counted withdrawals of 0.1 to 1 ETH, spread over the last 30
    // days: the scan `Usage::within` does for each of the three windows.
    let spacing = 30 * DAY / 1_000;
    let usage = Usage {
        entries: (0..1_000u64)
            .map(|i| {
                let at = now - 30 * DAY + 1 + i * spacing;
                (at, U256::from(u128::from(1 + i % 10) * ETHER / 10))
            })
            .collect(),
    };
    assert_eq!(usage.within(now, 30 * DAY).1, 1_000);

    let small = recomputed(&policy, &transfer(EXCHANGE, ETHER / 2, 7));
    let auto = withdrawal("wd_auto", small.intent());
    let large = recomputed(&policy, &transfer(EXCHANGE, 5 * ETHER, 8));
    let quorum = withdrawal("wd_quorum", large.intent());
    let stray = recomputed(&policy, &transfer(STRANGER, ETHER / 2, 9));
    let denied = withdrawal("wd_denied", stray.intent());
    // Two approvals whose signatures verified under the roster, as the
    // engine hands them to the core.
    let approvals: Vec<Approval> = ["alice", "bob"]
        .iter()
        .map(|who| {
            let m = approval_message(&policy, &quorum, who, now);
            let (_, approval) =
                ApprovalMessage::verify_submitted(&m.encode(), &sign(who, &m.digest()), SERVICE, &policy)
                    .unwrap();
            approval
        })
        .collect();

    let d = evaluate(&policy, &auto, &usage, &[], now);
    assert_eq!(
        (d.outcome, d.rule.as_deref()),
        (Outcome::Allow, Some("auto-small"))
    );
    let d = evaluate(&policy, &quorum, &usage, &approvals, now);
    assert_eq!((d.outcome, d.rule.as_deref()), (Outcome::Allow, Some("large")));
    assert_eq!(d.counted_approvers, ["alice", "bob"]);
    let d = evaluate(&policy, &denied, &usage, &[], now);
    assert!(matches!(
        d.outcome,
        Outcome::Deny(DenyReason::NoRuleMatched(Some(_)))
    ));

    let mut group = c.benchmark_group("policy evaluation per decision");
    group.bench_function("auto-allow to allowlisted address, 1k usage entries", |b| {
        b.iter(|| evaluate(&policy, black_box(&auto), black_box(&usage), &[], now))
    });
    group.bench_function("quorum met by 2 approvals, 1k usage entries", |b| {
        b.iter(|| evaluate(&policy, black_box(&quorum), black_box(&usage), &approvals, now))
    });
    group.bench_function("deny, not allowlisted, 1k usage entries", |b| {
        b.iter(|| evaluate(&policy, black_box(&denied), black_box(&usage), &[], now))
    });
    group.finish();
}

// 2. Intent and intent hash.

fn intent_hash(c: &mut Criterion) {
    let raw = transfer(EXCHANGE, 5 * ETHER, 42);
    let network = EthereumNetwork {
        chain_id: 1,
        tokens: Vec::new(),
    };
    let key = wallet_key();
    // What the engine does with an RLP request: decode the canonical
    // encoding, derive the wallet's address, parse for the wallet.
    let parse = |raw: &[u8]| {
        let tx = ethereum::decode_unsigned(raw).unwrap();
        ethereum::parse(tx, &network, custos_core::address::ethereum_address(&key)).unwrap()
    };
    let intent = parse(&raw).intent().clone();
    let policy = Policy::parse(document().as_bytes()).unwrap();
    assert_eq!(recomputed(&policy, &raw).intent(), &intent);
    assert_eq!(intent.network, Network::Ethereum { chain_id: 1 });

    let mut group = c.benchmark_group("intent hash");
    group.bench_function("parse + intent (decode RLP, wallet address, parse)", |b| {
        b.iter(|| parse(black_box(&raw)))
    });
    group.bench_function("canonical bytes", |b| {
        b.iter(|| black_box(&intent).canonical_bytes())
    });
    group.bench_function("hash (canonical bytes + SHA-256)", |b| {
        b.iter(|| black_box(&intent).hash())
    });
    group.finish();
}

// 3. Approval signatures.

fn approval_verification(c: &mut Criterion) {
    let policy = Policy::parse(document().as_bytes()).unwrap();
    let now = T0 + 30 * DAY;
    let parsed = recomputed(&policy, &transfer(EXCHANGE, 5 * ETHER, 8));
    let w = withdrawal("wd_0123456789abcdef0123456789abcdef", parsed.intent());
    let message = approval_message(&policy, &w, "alice", now);
    let encoded = message.encode();
    let signature = sign("alice", &message.digest());
    let key = *person("alice").verifying_key();
    message.verify(&signature, &key).unwrap();
    assert_eq!(ApprovalMessage::parse(&encoded).unwrap(), message);

    let mut group = c.benchmark_group("approval signature verification");
    group.bench_function(
        "ApprovalMessage::verify (canonical check + ECDSA secp256k1)",
        |b| b.iter(|| black_box(&message).verify(black_box(&signature), &key).unwrap()),
    );
    group.bench_function("ApprovalMessage::parse", |b| {
        b.iter(|| ApprovalMessage::parse(black_box(&encoded)).unwrap())
    });
    group.bench_function("verify_submitted (parse + roster + verify)", |b| {
        b.iter(|| {
            ApprovalMessage::verify_submitted(black_box(&encoded), &signature, SERVICE, &policy).unwrap()
        })
    });
    group.finish();
}

/// What custos does to each raw `r || s` the HSM returns before releasing it.
fn hsm_signature_post_processing(c: &mut Criterion) {
    let digest = [0x5a; 32];
    // Any secp256k1 signature exercises the same arithmetic; an approver's
    // key stands in for the HSM's output here.
    let signer = person("alice");
    let key = *signer.verifying_key();
    let (low, _) = signer.sign_prehash_recoverable(&digest);
    let (r, s) = low.split_scalars();
    let high = k256::ecdsa::Signature::from_scalars(*r, -*s.as_ref()).unwrap();
    let mut group = c.benchmark_group("HSM signature post-processing");
    for (name, raw) in [("low-S input", low.to_bytes()), ("high-S input", high.to_bytes())] {
        group.bench_function(
            format!("finalize: normalise, verify, recovery id ({name})"),
            |b| {
                b.iter(|| custos_core::signature::finalize(black_box(raw.as_slice()), &digest, &key).unwrap())
            },
        );
    }
    group.finish();
}

// 4. Checkpoints.

fn checkpoint(c: &mut Criterion) {
    // The published vector of docs/audit-log.md: RFC 8032 test key 1 as the
    // log key of custos.example/log, over the eleven sample entries.
    let vkey = "custos.example/log+8da55de5+AddamAGCsQq31Uv+08lkBzoO4XLz2qYjJa8CGmj3B1Ea";
    let note = "custos.example/log\n11\n1itfjLiv8lx3QmneN4BunifsuO6YF30eGfmBeJJG74A=\n\n\u{2014} custos.example/log jaVd5dmm7vUTPOERDwb4/JYfQVSfkFeCH2dik0MucL+uujngNiXNmqnBpzlQFHCE9YDQcX8aRy+sK99os+oLOoMt1AY=\n";
    let verifier = NoteVerifier::parse(vkey).unwrap();
    let opened = verifier.open_checkpoint(note).unwrap();
    assert_eq!(opened.size, 11);
    assert_eq!(
        hex::encode(opened.root),
        "d62b5f8cb8aff25c774269de37806e9e27ecb8ee98177d1e19f981789246ef80"
    );

    let mut group = c.benchmark_group("checkpoint");
    group.bench_function("open_checkpoint (Ed25519 signed note)", |b| {
        b.iter(|| verifier.open_checkpoint(black_box(note)).unwrap())
    });
    group.bench_function("Checkpoint::text", |b| b.iter(|| black_box(&opened).text()));
    group.finish();
}

// 5. Replay.

/// A log under construction, as the engine writes it.
struct History {
    entries: Vec<Entry>,
    policy: Policy,
    /// Withdrawals counted against the limits of `hot` and ETH.
    usage: Usage,
    time: u64,
}

impl History {
    /// The wallet, and the genesis policy proposed and activated.
    fn new() -> Self {
        let document = document().into_bytes();
        let policy = Policy::parse(&document).unwrap();
        let hash = policy_hash(&document);
        let mut h = Self {
            entries: Vec::new(),
            policy,
            usage: Usage::default(),
            time: T0,
        };
        h.push(Event::WalletCreated {
            wallet_id: "hot".into(),
            key_label: KEY_LABEL.into(),
            key_id: vec![1; 16],
            public_key: hex::decode(WALLET_KEY).unwrap(),
            // Token, private, sensitive, always sensitive, never extractable.
            attributes: 0b11_0111,
        });
        h.push(Event::PolicyProposed {
            hash,
            version: 1,
            document,
        });
        h.push(Event::PolicyActivated { hash, version: 1 });
        h
    }

    fn push(&mut self, event: Event) {
        let index = self.entries.len() as u64;
        self.entries.push(Entry {
            index,
            time: self.time,
            event,
        });
    }

    /// Logs a new withdrawal and the engine's first decision on it.
    fn create(&mut self, n: u64, to: &str, wei: u128) -> (String, ParsedTx, State) {
        let id = format!("wd_{n:032x}");
        let unsigned_tx = transfer(to, wei, n);
        let parsed = recomputed(&self.policy, &unsigned_tx);
        let intent = parsed.intent();
        self.push(Event::WithdrawalCreated {
            withdrawal_id: id.clone(),
            request_id: format!("req-{n}"),
            wallet_id: "hot".into(),
            initiator: "ops".into(),
            chain: "ethereum".into(),
            unsigned_tx,
            intent: intent.canonical_bytes(),
            intent_hash: intent.hash(),
        });
        let state = self.decide(&id, &parsed, &[], true);
        (id, parsed, state)
    }

    /// Logs `approver`'s signed approval and the decision it triggers.
    fn vote(&mut self, id: &str, parsed: &ParsedTx, approver: &str, votes: &mut Vec<Approval>) -> State {
        let w = withdrawal(id, parsed.intent());
        let m = approval_message(&self.policy, &w, approver, self.time);
        self.push(Event::Vote {
            withdrawal_id: id.into(),
            message: m.encode(),
            signature: sign(approver, &m.digest()),
        });
        votes.push(m.to_approval());
        self.decide(id, parsed, votes, false)
    }

    /// The decision `evaluate` reaches now, recorded as the engine records
    /// it, with the same `policy::record` functions.
    fn decide(&mut self, id: &str, parsed: &ParsedTx, votes: &[Approval], first: bool) -> State {
        let now = self.time;
        let w = withdrawal(id, parsed.intent());
        let decision = evaluate(&self.policy, &w, &self.usage, votes, now);
        let state = match (&decision.outcome, first) {
            (Outcome::Allow, _) => State::Approved,
            (Outcome::Pending(_), _) => State::PendingApproval,
            (Outcome::Deny(DenyReason::Rejected { .. }), false) => State::Rejected,
            (Outcome::Deny(_), _) => State::Denied,
        };
        let counted = state == State::Approved;
        let amount = w.intent.total_amount();
        let usage = window_usage(&self.policy, &w, &self.usage, now, counted);
        let stored = record(&decision, self.policy.version);
        self.push(Event::Decision {
            withdrawal_id: id.into(),
            policy_hash: decision.policy_hash,
            policy_version: self.policy.version,
            state: state.name().into(),
            rule: decision.rule.unwrap_or_default(),
            reason_code: stored.reason_code.unwrap_or_default(),
            reason: stored.reason.unwrap_or_default(),
            counted_approvers: decision.counted_approvers,
            usage,
        });
        if counted {
            self.usage.entries.push((now, amount));
        }
        state
    }
}

/// A clean log of about `target` entries. One withdrawal every 20 minutes;
/// of every ten, three are small and signed at once, five are large and
/// approved by two treasury votes, one goes to an address on no allowlist
/// and is denied, and one gets one vote and is then cancelled: 43 entries,
/// of which 21 are decisions and 11 are votes, each a signature check.
fn clean_log(target: usize) -> Vec<Entry> {
    const PAIRS: [(&str, &str); 3] = [("alice", "bob"), ("bob", "carol"), ("carol", "alice")];
    let mut h = History::new();
    let mut n = 0u64;
    while h.entries.len() < target {
        let t = T0 + 1200 * n;
        h.time = t;
        let (first, second) = PAIRS[(n % 3) as usize];
        match n % 10 {
            0..=2 => {
                let to = if n % 2 == 0 { EXCHANGE } else { OTC };
                let (_, _, state) = h.create(n, to, u128::from(n % 7 + 1) * ETHER / 10);
                assert_eq!(state, State::Approved, "withdrawal {n}");
            }
            3..=7 => {
                let (id, parsed, state) = h.create(n, EXCHANGE, u128::from(n % 4 + 2) * ETHER);
                assert_eq!(state, State::PendingApproval, "withdrawal {n}");
                let mut votes = Vec::new();
                h.time = t + 60;
                assert_eq!(h.vote(&id, &parsed, first, &mut votes), State::PendingApproval);
                h.time = t + 120;
                assert_eq!(h.vote(&id, &parsed, second, &mut votes), State::Approved);
            }
            8 => {
                let (_, _, state) = h.create(n, STRANGER, 3 * ETHER / 10);
                assert_eq!(state, State::Denied, "withdrawal {n}");
            }
            _ => {
                let (id, parsed, state) = h.create(n, OTC, 3 * ETHER);
                assert_eq!(state, State::PendingApproval, "withdrawal {n}");
                h.time = t + 60;
                assert_eq!(
                    h.vote(&id, &parsed, first, &mut Vec::new()),
                    State::PendingApproval
                );
                h.time = t + 180;
                h.push(Event::Closed {
                    withdrawal_id: id,
                    state: "CANCELLED".into(),
                });
            }
        }
        n += 1;
    }
    h.entries
}

fn replay_rate(c: &mut Criterion) {
    let entries = clean_log(REPLAY_ENTRIES);
    let votes = entries
        .iter()
        .filter(|e| matches!(e.event, Event::Vote { .. }))
        .count();
    let mut replayer = Replayer::for_service(SERVICE);
    for e in &entries {
        replayer.push(e);
    }
    let report = replayer.finish();
    assert!(
        report.findings.is_empty(),
        "{:#?}",
        &report.findings[..report.findings.len().min(5)]
    );
    assert_eq!(report.entries, entries.len() as u64);
    assert_eq!(report.votes, votes as u64);
    let mut batched = Replayer::for_service(SERVICE);
    for chunk in entries.chunks(REPLAY_BATCH) {
        batched.push_all(chunk);
    }
    assert_eq!(batched.finish(), report);
    eprintln!(
        "replaying a clean log of {} entries: {} withdrawals, {} votes, {} decisions",
        report.entries, report.withdrawals, report.votes, report.decisions
    );

    let mut group = c.benchmark_group("replay rate");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements(entries.len() as u64));
    group.bench_function("Replayer::push, one entry at a time", |b| {
        b.iter(|| {
            let mut replayer = Replayer::for_service(SERVICE);
            for e in &entries {
                replayer.push(e);
            }
            replayer.finish()
        })
    });
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let name = format!("Replayer::push_all, batches of {REPLAY_BATCH} ({cores} cores)");
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut replayer = Replayer::for_service(SERVICE);
            for chunk in entries.chunks(REPLAY_BATCH) {
                replayer.push_all(chunk);
            }
            replayer.finish()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = policy_evaluation, intent_hash, approval_verification, hsm_signature_post_processing, checkpoint, replay_rate
}
criterion_main!(benches);
