//! Crash consistency under `kill -9` of the real `custosd --dev` process
//! (SoftHSM token, SQLite store, the dev keys): invariants 4 ("log before
//! release") and 5 ("exactly once") of docs/DESIGN.md.
//!
//! One test drives 2,000 withdrawals, a quarter of them through the
//! two-approver quorum, with 12 clients in flight, and SIGKILLs custosd at
//! random moments (at least 50 times; about 70 in practice), restarting it
//! on the same data directory after each kill. The seed is printed; set
//! `CUSTOS_CRASH_SEED` to replay a run (`CUSTOS_CRASH_WITHDRAWALS` and
//! `CUSTOS_CRASH_KILLS` scale it, `CUSTOS_CRASH_KEEP` keeps its directory).
//! The seed fixes the withdrawals, the kill quotas and the delays; where a
//! kill lands inside the server also depends on scheduling.
//!
//! # Where the kills land
//!
//! Each life of the server gets a random quota of acknowledged replies (0 in
//! 15% of lives, else uniform in 1..=2m, where m is the number of client
//! steps over 1.3 times the minimum kill count: 46 by default) and, once the
//! clients have counted that many, a random further delay of 0 to 3 ms, then
//! SIGKILL. With 12 requests in flight, each at its own point of request
//! parsing, decision commit, C_Sign, SIGNED commit and reply, and with the
//! sweeper and checkpoint issuer running beside them, the kill lands
//! wherever each of them happens to be. Quota 0 kills within 3 ms of the
//! restart, while the sweeper re-signs what the last kill left APPROVED.
//!
//! Which phase each interrupted request was in is read from the SQLite file
//! of the dead process (read-only, before the restart; see [`classify`]):
//! nothing committed (killed before or during the decision commit); APPROVED
//! without a signature (killed between the decision commit and the SIGNED
//! commit, which is where C_Sign runs); SIGNED or DENIED with the reply lost
//! (killed after the commit, before the reply arrived); a vote committed with
//! its reply lost. The counts are printed, and the main phases must each
//! have been hit.
//!
//! # What is checked
//!
//! The clients keep a ledger of acknowledged replies only (a listing never
//! counts as an acknowledgement, so unacknowledged requests are retried with
//! their request id after the restart, as a backend would). At each kill,
//! from the dead server's files: every signed transaction a client had
//! received is already a durable `signed` audit entry (log before release),
//! and every acknowledged withdrawal and vote is durable. After every
//! restart (every 10th with the clients stopped, the others while each
//! client retries one interrupted withdrawal, racing the sweeper), and fully
//! at the end:
//! - every acknowledged withdrawal is still listed, with its request id,
//!   intent hash, acknowledged votes, and no state it had left behind;
//! - one request id is one withdrawal: GetWithdrawal, and CreateWithdrawal
//!   retried with the same request id and body, return the same withdrawal
//!   and the same signed bytes (20 random ones after each restart, all 2,000
//!   at the end), and the same request id with another body is refused;
//! - the audit log (AuditService ListEntries) has at most one `signed` entry
//!   per withdrawal, equal to the stored signed transaction, and every signed
//!   transaction a client ever received is that entry, byte for byte;
//! - every signed transaction is the withdrawal's own transfer (recipient,
//!   amount, nonce, chain) signed by the wallet key;
//! - every 10th restart and at the end, `custos audit export` and
//!   `custos audit verify` pass (at the end over the whole log). The run
//!   sets the dev config's checkpoint cadence to 64 entries, so checkpoints
//!   are signed in most lives and kills land in checkpointing too.
//!
//! Limits are exact. The run activates (through the admin quorum) the dev
//! policy with an hourly count cap of 1,950, 50 below the number of
//! withdrawals, so the cap binds; the amount caps (10,000 ETH an hour,
//! 20,000 a day) stay far above the run's total (auto-signed amounts are at
//! most 0.01 ETH, quorum ones 1 to 1.2 ETH: about 560 ETH). At the end
//! exactly 1,950 are SIGNED and 50 DENIED for the count limit; walking the
//! log, every decision's usage equals the client's own running count and sum
//! of counted amounts (from its plans, not the server) and stays within
//! every cap; every auto-signed withdrawal is at most 1 ETH; and a probe
//! withdrawal is denied with exactly the ledger's usage in both windows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_consensus::transaction::SignerRecoverable;
use alloy_consensus::{Transaction, TxEnvelope};
use alloy_eips::eip2718::Decodable2718;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::{self, DevServer};
use custos::proto::{
    self, WithdrawalState, approval_service_client::ApprovalServiceClient,
    audit_service_client::AuditServiceClient, policy_service_client::PolicyServiceClient,
    wallet_service_client::WalletServiceClient, withdrawal_service_client::WithdrawalServiceClient,
};
use custos::signer::KeyFile;
use custos_core::approval::ApprovalMessage;
use custos_core::audit::entry::{Entry, Event};
use custos_core::policy::Vote;

const ETHER: u128 = 1_000_000_000_000_000_000;
/// Clients in flight.
const CONCURRENCY: usize = 12;
/// Withdrawals past the hourly count cap: they must be DENIED.
const OVER_CAP: usize = 50;
/// The policy's amount caps, far above what the run moves (about 550 ETH).
const HOUR_AMOUNT_CAP: u128 = 10_000 * ETHER;
const DAY_AMOUNT_CAP: u128 = 20_000 * ETHER;
/// The auto-sign rule's ceiling in the dev policy.
const AUTO_MAX: u128 = ETHER;
const RULE_AUTO: &str = "auto-small";
const RULE_QUORUM: &str = "large-two-treasury";
const LIMIT_DENIAL: &str = "rolling_count_limit";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// SplitMix64: small, seedable, good enough to place kills and amounts.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// One withdrawal the backend wants: fixed before the run.
#[derive(Debug, Clone)]
struct Plan {
    request_id: String,
    wei: u128,
    /// Unique per withdrawal, so that no two have the same contents.
    nonce: u64,
    quorum: bool,
}

impl Plan {
    fn request(&self) -> proto::CreateWithdrawalRequest {
        custos::dev::transfer_request(
            &self.request_id,
            custos::dev::DEV_ALLOWLISTED,
            self.wei,
            self.nonce,
            "ops",
        )
    }
}

/// What the clients were told about one withdrawal (acknowledged replies only).
#[derive(Debug, Clone, Default)]
struct Record {
    /// `withdrawals/...`, once a create was acknowledged.
    name: Option<String>,
    intent_hash: Vec<u8>,
    /// Approvers whose vote was acknowledged (or found stored after a crash).
    votes: BTreeSet<String>,
    /// The signed transaction the first time a client received it.
    signed: Option<Vec<u8>>,
    /// The furthest state acknowledged.
    state: Option<WithdrawalState>,
    /// The withdrawal a listing showed for this request id before any
    /// create was acknowledged: the retried create must return it.
    listed_name: Option<String>,
}

impl Record {
    fn is_final(&self) -> bool {
        matches!(
            self.state,
            Some(WithdrawalState::Signed | WithdrawalState::Denied)
        )
    }
}

fn rank(state: WithdrawalState) -> u8 {
    match state {
        WithdrawalState::PendingApproval => 0,
        WithdrawalState::Approved => 1,
        _ => 2,
    }
}

/// The step a request was on when the server died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Create,
    Vote(&'static str),
    /// Waiting for the sweeper to sign an APPROVED withdrawal.
    Poll,
}

/// Everything that outlives one life of the server.
struct Run {
    plans: Vec<Plan>,
    ledger: Mutex<Vec<Record>>,
    queue: Mutex<VecDeque<usize>>,
    wallet_address: String,
    service_id: String,
    policy_hash: [u8; 32],
    alice: KeyFile,
    bob: KeyFile,
    /// Outcomes observed, by phase.
    phases: Mutex<BTreeMap<String, usize>>,
}

impl Run {
    fn note(&self, phase: impl Into<String>) {
        *self.phases.lock().unwrap().entry(phase.into()).or_default() += 1;
    }

    /// Client steps (create, votes) not yet acknowledged.
    fn steps_left(&self) -> usize {
        let ledger = self.ledger.lock().unwrap();
        ledger
            .iter()
            .zip(&self.plans)
            .filter(|(rec, _)| !rec.is_final())
            .map(|(rec, plan)| {
                let total = if plan.quorum { 3 } else { 1 };
                total - usize::from(rec.name.is_some()) - rec.votes.len()
            })
            .sum::<usize>()
            .max(usize::from(!self.queue.lock().unwrap().is_empty()))
    }

    fn key(&self, approver: &str) -> &KeyFile {
        match approver {
            "alice" => &self.alice,
            "bob" => &self.bob,
            other => panic!("no key for {other}"),
        }
    }

    /// Checks a withdrawal the server returned against the plan and the
    /// ledger, and records what it acknowledges. Panics on any contradiction.
    fn absorb(&self, i: usize, w: &proto::Withdrawal, source: &str) {
        let mut ledger = self.ledger.lock().unwrap();
        let rec = &mut ledger[i];
        self.check(i, rec, w, source);
        if rec.signed.is_none() && w.state() == WithdrawalState::Signed {
            rec.signed = w.signed_transaction.as_ref().map(|t| t.raw.clone());
        }
        rec.name = Some(w.name.clone());
        rec.intent_hash = w.intent_hash.clone();
        rec.state = Some(w.state());
        rec.votes = w.votes.iter().map(|v| v.approver.clone()).collect();
    }

    /// Checks a withdrawal a listing showed, without taking it as
    /// acknowledged: the client still retries what it was not told.
    /// `acked` is the ledger's record as it was before the listing was read.
    fn verify_listed(&self, i: usize, acked: &Record, w: &proto::Withdrawal) {
        self.check(i, acked, w, "list after restart");
        let mut ledger = self.ledger.lock().unwrap();
        let rec = &mut ledger[i];
        match rec.listed_name.as_ref().or(rec.name.as_ref()) {
            Some(name) => assert_eq!(name, &w.name, "{}", self.plans[i].request_id),
            None => rec.listed_name = Some(w.name.clone()),
        }
    }

    fn check(&self, i: usize, rec: &Record, w: &proto::Withdrawal, source: &str) {
        let plan = &self.plans[i];
        let context = || format!("{} ({source}): {w:?}\nledger: {rec:?}", plan.request_id);
        assert_eq!(w.request_id, plan.request_id, "{}", context());
        if let Some(name) = rec.name.as_ref().or(rec.listed_name.as_ref()) {
            assert_eq!(
                &w.name,
                name,
                "one request id gave two withdrawals: {}",
                context()
            );
        }
        if rec.name.is_some() {
            assert_eq!(w.intent_hash, rec.intent_hash, "{}", context());
        }
        let state = w.state();
        if let Some(seen) = rec.state {
            assert!(
                rank(state) >= rank(seen) && (rank(seen) < 2 || state == seen),
                "an acknowledged state was lost ({seen:?} became {state:?}): {}",
                context()
            );
        }
        assert!(
            rec.votes.iter().all(|a| w.votes.iter().any(|v| &v.approver == a)),
            "an acknowledged vote was lost: {}",
            context()
        );
        let decision = w.decision.clone().unwrap_or_default();
        match state {
            WithdrawalState::Signed => {
                let raw = &w
                    .signed_transaction
                    .as_ref()
                    .unwrap_or_else(|| panic!("SIGNED without a transaction: {}", context()))
                    .raw;
                match &rec.signed {
                    Some(seen) => assert_eq!(
                        seen,
                        raw,
                        "a signed transaction changed after it was released: {}",
                        context()
                    ),
                    None => self.check_signed_tx(plan, raw),
                }
                let rule = if plan.quorum { RULE_QUORUM } else { RULE_AUTO };
                assert_eq!(decision.rule, rule, "{}", context());
                if plan.quorum {
                    assert_eq!(decision.counted_approvers, ["alice", "bob"], "{}", context());
                }
            }
            WithdrawalState::Denied => {
                assert_eq!(decision.reason_code, LIMIT_DENIAL, "{}", context());
                assert!(w.signed_transaction.is_none(), "{}", context());
            }
            WithdrawalState::PendingApproval | WithdrawalState::Approved => {
                assert!(plan.quorum || state == WithdrawalState::Approved, "{}", context());
                assert!(w.signed_transaction.is_none(), "{}", context());
            }
            other => panic!("unexpected state {other:?}: {}", context()),
        }
    }

    /// A released transaction is this plan's transfer, signed by the wallet.
    fn check_signed_tx(&self, plan: &Plan, raw: &[u8]) {
        let envelope = TxEnvelope::decode_2718(&mut &raw[..]).expect("signed tx decodes");
        assert_eq!(envelope.nonce(), plan.nonce, "{}", plan.request_id);
        assert_eq!(envelope.value(), alloy_primitives::U256::from(plan.wei));
        assert_eq!(envelope.chain_id(), Some(custos::dev::DEV_CHAIN_ID));
        assert_eq!(
            envelope.to().map(|a| a.to_checksum(None).to_lowercase()),
            Some(custos::dev::DEV_ALLOWLISTED.to_owned())
        );
        assert_eq!(
            envelope.recover_signer().unwrap().to_checksum(None),
            self.wallet_address,
            "{}: signed by another key",
            plan.request_id
        );
    }

    fn approval(&self, rec: &Record, approver: &str) -> proto::SubmitApprovalRequest {
        let m = ApprovalMessage {
            service_id: self.service_id.clone(),
            withdrawal_id: rec
                .name
                .as_ref()
                .unwrap()
                .trim_start_matches("withdrawals/")
                .to_owned(),
            intent_hash: rec.intent_hash.clone().try_into().unwrap(),
            policy_hash: self.policy_hash,
            vote: Vote::Approve,
            expires_at: unix_now() + 600,
            approver: approver.to_owned(),
        };
        let signature = self.key(approver).sign_prehash(&m.digest()).unwrap();
        proto::SubmitApprovalRequest {
            message: m.encode(),
            signature: signature.to_vec(),
        }
    }
}

/// One life of the server, as the clients see it.
struct Life {
    run: Arc<Run>,
    withdrawals: WithdrawalServiceClient<Channel>,
    alice: ApprovalServiceClient<Channel>,
    bob: ApprovalServiceClient<Channel>,
    /// Replies received in this life: the kill quota counts them.
    acks: AtomicUsize,
    /// Set just before SIGKILL: only then is a transport error expected.
    killed: AtomicBool,
    /// Workers still running.
    running: AtomicUsize,
    /// While set, workers finish the withdrawal they took first and wait.
    hold: AtomicBool,
    interrupted: Mutex<Vec<(usize, Step)>>,
}

impl Life {
    async fn open(run: Arc<Run>, server: &DevServer) -> Self {
        Self {
            run,
            withdrawals: WithdrawalServiceClient::new(server.channel_as("backend").await),
            alice: ApprovalServiceClient::new(server.channel_as("alice").await),
            bob: ApprovalServiceClient::new(server.channel_as("bob").await),
            acks: AtomicUsize::new(0),
            killed: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
            interrupted: Mutex::new(Vec::new()),
        }
    }

    /// Whether `status` is the server dying under a request. Any other error
    /// fails the test: before the kill, nothing may fail.
    fn died(&self, status: &tonic::Status, what: &str) -> bool {
        let transport = status.get_details_error_info().is_none()
            && matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            );
        assert!(
            transport && self.killed.load(Ordering::SeqCst),
            "{what} failed while the server was up, or not as a dying server fails: {status:?}"
        );
        true
    }

    fn ack(&self) {
        self.acks.fetch_add(1, Ordering::SeqCst);
    }

    async fn get(&self, name: &str) -> Result<proto::Withdrawal, tonic::Status> {
        self.withdrawals
            .clone()
            .get_withdrawal(proto::GetWithdrawalRequest {
                name: name.to_owned(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Drives withdrawal `i` to SIGNED or DENIED; `Err` names the step the
    /// server died under.
    async fn drive(&self, i: usize) -> Result<(), Step> {
        let run = &self.run;
        let plan = &run.plans[i];
        if run.ledger.lock().unwrap()[i].name.is_none() {
            match self.withdrawals.clone().create_withdrawal(plan.request()).await {
                Ok(w) => {
                    self.ack();
                    run.absorb(i, &w.into_inner(), "create");
                }
                Err(e) if self.died(&e, "CreateWithdrawal") => return Err(Step::Create),
                Err(_) => unreachable!(),
            }
        }
        loop {
            let rec = run.ledger.lock().unwrap()[i].clone();
            if rec.is_final() {
                return Ok(());
            }
            let name = rec.name.clone().unwrap();
            if rec.state == Some(WithdrawalState::Approved) {
                // Committed APPROVED, not yet signed: the sweeper signs it.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let w = self.get(&name).await;
                    let w = match w {
                        Ok(w) => w,
                        Err(e) if self.died(&e, "GetWithdrawal") => return Err(Step::Poll),
                        Err(_) => unreachable!(),
                    };
                    run.absorb(i, &w, "poll");
                    if w.state() != WithdrawalState::Approved {
                        run.note("after restart: APPROVED withdrawal signed by the sweeper while polled");
                        break;
                    }
                    assert!(Instant::now() < deadline, "{name} stays APPROVED");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            let approver = ["alice", "bob"]
                .into_iter()
                .find(|a| !rec.votes.contains(*a))
                .unwrap_or_else(|| panic!("both votes stored but still pending: {rec:?}"));
            let mut client = if approver == "alice" {
                self.alice.clone()
            } else {
                self.bob.clone()
            };
            match client.submit_approval(run.approval(&rec, approver)).await {
                Ok(w) => {
                    self.ack();
                    run.absorb(i, &w.into_inner(), approver);
                    assert!(run.ledger.lock().unwrap()[i].votes.contains(approver));
                }
                Err(e) if e.code() == Code::AlreadyExists => {
                    // The vote committed before a kill, its reply was lost.
                    let w = match self.get(&name).await {
                        Ok(w) => w,
                        Err(e) if self.died(&e, "GetWithdrawal") => return Err(Step::Vote(approver)),
                        Err(_) => unreachable!(),
                    };
                    assert!(
                        w.votes.iter().any(|v| v.approver == approver),
                        "{approver}'s vote is refused as a duplicate but not stored: {w:?}"
                    );
                    run.absorb(i, &w, "vote retry");
                    run.note(format!("retry: {approver}'s vote already stored (AlreadyExists)"));
                }
                Err(e)
                    if e.code() == Code::FailedPrecondition
                        && e.get_details_error_info()
                            .is_some_and(|d| d.reason == "NOT_PENDING") =>
                {
                    // The deciding vote committed before a kill.
                    let w = match self.get(&name).await {
                        Ok(w) => w,
                        Err(e) if self.died(&e, "GetWithdrawal") => return Err(Step::Vote(approver)),
                        Err(_) => unreachable!(),
                    };
                    assert!(
                        w.votes.iter().any(|v| v.approver == approver),
                        "{approver}'s deciding vote is missing: {w:?}"
                    );
                    run.absorb(i, &w, "vote retry");
                    run.note(format!(
                        "retry: {approver}'s deciding vote already stored (NOT_PENDING), now {:?}",
                        w.state()
                    ));
                }
                Err(e) if self.died(&e, "SubmitApproval") => return Err(Step::Vote(approver)),
                Err(_) => unreachable!(),
            }
        }
    }

    async fn worker(self: Arc<Self>) {
        let mut first = true;
        loop {
            // Past its first withdrawal, a worker waits out a held life.
            while !first && self.hold.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            first = false;
            if self.killed.load(Ordering::SeqCst) {
                break;
            }
            let Some(i) = self.run.queue.lock().unwrap().pop_front() else {
                break;
            };
            if let Err(step) = self.drive(i).await {
                self.run.queue.lock().unwrap().push_front(i);
                self.interrupted.lock().unwrap().push((i, step));
                break;
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The `signed` entries durable in the dead server's audit log, read
/// incrementally from its SQLite file after each kill.
#[derive(Default)]
struct DeadLog {
    next: i64,
    signed: HashMap<String, Vec<u8>>,
}

/// After a kill, before the restart: reads the dead server's SQLite file
/// (read-only, so the restart still finds the crashed files). Log before
/// release, at the moment of death: every signed transaction any client had
/// received is already a durable `signed` entry, and every acknowledged
/// withdrawal and vote is durable. Then notes where each interrupted request
/// was, and returns the withdrawals left APPROVED and the number of
/// checkpoints.
fn classify(
    run: &Run,
    db: &Path,
    interrupted: &[(usize, Step)],
    dead_log: &mut DeadLog,
) -> (HashSet<String>, u64) {
    use rusqlite::{OpenFlags, OptionalExtension};
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn
        .prepare("SELECT idx, entry FROM audit_log WHERE idx >= ?1 ORDER BY idx")
        .unwrap();
    let rows = stmt
        .query_map([dead_log.next], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap();
    for row in rows {
        let (idx, data) = row.unwrap();
        assert_eq!(idx, dead_log.next, "audit log gap in the dead server's store");
        dead_log.next += 1;
        if let Event::Signed {
            withdrawal_id,
            signed_tx,
            ..
        } = Entry::decode(&data).unwrap().event
        {
            let previous = dead_log.signed.insert(withdrawal_id.clone(), signed_tx);
            assert!(previous.is_none(), "{withdrawal_id} signed twice in the log");
        }
    }
    drop(stmt);
    let ledger = run.ledger.lock().unwrap().clone();
    for (rec, plan) in ledger.iter().zip(&run.plans) {
        let Some(name) = &rec.name else { continue };
        let id = name.trim_start_matches("withdrawals/");
        if let Some(raw) = &rec.signed {
            assert_eq!(
                dead_log.signed.get(id),
                Some(raw),
                "{} ({id}): a client held a signed transaction that was not durably logged when custosd died",
                plan.request_id
            );
        }
        let (state, votes): (String, i64) = conn
            .query_row(
                "SELECT state, (SELECT COUNT(*) FROM approvals a WHERE a.withdrawal_id = w.withdrawal_id)
                 FROM withdrawals w WHERE withdrawal_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {id} is not in the dead server's store"));
        assert!(
            votes as usize >= rec.votes.len(),
            "{id}: an acknowledged vote is not durable"
        );
        if rec.is_final() {
            assert_eq!(Some(state.as_str()), rec.state.map(|s| s.as_str_name()), "{id}");
        }
    }
    for &(i, step) in interrupted {
        let plan = &run.plans[i];
        let row: Option<(String, String)> = conn
            .query_row(
                "SELECT withdrawal_id, state FROM withdrawals WHERE request_id = ?1",
                [&plan.request_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .unwrap();
        let kind = if plan.quorum { "quorum" } else { "auto" };
        let phase = match (step, row) {
            (Step::Create, None) => format!("create ({kind}): nothing committed"),
            (Step::Create, Some((_, state))) if state == "APPROVED" => {
                format!("create ({kind}): APPROVED committed, not signed (C_Sign window)")
            }
            (Step::Create, Some((_, state))) => {
                format!("create ({kind}): {state} committed, reply lost")
            }
            (Step::Vote(approver), Some((id, state))) => {
                let stored: bool = conn
                    .query_row(
                        "SELECT COUNT(*) > 0 FROM approvals WHERE withdrawal_id = ?1 AND approver = ?2",
                        [&id, approver],
                        |r| r.get(0),
                    )
                    .unwrap();
                let role = if approver == "alice" { "first" } else { "deciding" };
                match (stored, state.as_str()) {
                    (false, _) => format!("{role} vote: nothing committed"),
                    (true, "APPROVED") => {
                        format!("{role} vote: APPROVED committed, not signed (C_Sign window)")
                    }
                    (true, state) => format!("{role} vote: committed ({state}), reply lost"),
                }
            }
            (Step::Poll, Some((_, state))) => format!("poll of an APPROVED withdrawal: {state}"),
            (step, None) => panic!("{step:?} on {} with no stored withdrawal", plan.request_id),
        };
        run.note(phase);
    }
    let mut stmt = conn
        .prepare("SELECT withdrawal_id FROM withdrawals WHERE state = 'APPROVED'")
        .unwrap();
    let approved = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<HashSet<_>, _>>()
        .unwrap();
    drop(stmt);
    let checkpoints: u64 = conn
        .query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    (approved, checkpoints)
}

/// The audit log as read so far, and what it says per withdrawal.
#[derive(Default)]
struct Log {
    entries: Vec<Vec<u8>>,
    /// withdrawal id -> request id.
    created: HashMap<String, String>,
    /// withdrawal id -> its `signed` entry: index and transaction.
    signed: HashMap<String, (usize, Vec<u8>)>,
}

impl Log {
    /// Reads the entries appended since the last call (all of them when
    /// `full`, checking the prefix read before is unchanged).
    async fn update(&mut self, audit: &mut AuditServiceClient<Channel>, full: bool) {
        let start = if full { 0 } else { self.entries.len() as u64 };
        let mut stream = audit
            .list_entries(proto::ListEntriesRequest { start, end: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut index = start;
        while let Some(e) = stream.message().await.unwrap() {
            assert_eq!(e.index, index);
            if (index as usize) < self.entries.len() {
                assert_eq!(
                    self.entries[index as usize], e.data,
                    "audit entry {index} changed"
                );
            } else {
                self.push(e.data);
            }
            index += 1;
        }
        assert!(index as usize >= self.entries.len(), "the audit log shrank");
    }

    fn push(&mut self, data: Vec<u8>) {
        let entry = Entry::decode(&data).unwrap();
        assert_eq!(entry.index as usize, self.entries.len());
        match entry.event {
            Event::WithdrawalCreated {
                withdrawal_id,
                request_id,
                ..
            } => {
                let previous = self.created.insert(withdrawal_id.clone(), request_id);
                assert!(previous.is_none(), "{withdrawal_id} created twice in the log");
            }
            Event::Signed {
                withdrawal_id,
                signed_tx,
                ..
            } => {
                let index = self.entries.len();
                let previous = self.signed.insert(withdrawal_id.clone(), (index, signed_tx));
                assert!(
                    previous.is_none(),
                    "{withdrawal_id} has two signed entries in the log ({} and {index})",
                    previous.unwrap().0
                );
            }
            _ => {}
        }
        self.entries.push(data);
    }
}

/// The checks after a restart (see the module docs). They hold with the
/// clients running: acknowledgements are taken from a ledger snapshot made
/// before anything is read, and the log is read both before and after the
/// listing. `retries` acknowledged withdrawals (all if None) are created
/// again with the same request id; with clients running (`quiet` false) only
/// final ones, which nothing else changes any more.
async fn check_state(
    run: &Run,
    server: &DevServer,
    log: &mut Log,
    full: bool,
    retries: Option<usize>,
    quiet: bool,
    rng: &mut Rng,
) {
    let mut withdrawals = WithdrawalServiceClient::new(server.channel_as("backend").await);
    let mut audit = AuditServiceClient::new(server.channel_as("auditor").await);
    let by_request: HashMap<&str, usize> = run
        .plans
        .iter()
        .enumerate()
        .map(|(i, p)| (p.request_id.as_str(), i))
        .collect();
    let ledger = run.ledger.lock().unwrap().clone();
    // The log, then the listing, then the log again: a `signed` entry read
    // first must show in the listing, and a SIGNED withdrawal listed must be
    // in the log read after it.
    log.update(&mut audit, full).await;
    let logged_before = log.entries.len();
    let listed = support::all_withdrawals(&mut withdrawals, WithdrawalState::Unspecified).await;
    log.update(&mut audit, false).await;
    let mut seen_requests = HashSet::new();
    let mut listed_signed = HashSet::new();
    for w in &listed {
        assert!(
            seen_requests.insert(w.request_id.clone()),
            "request id {} has two withdrawals",
            w.request_id
        );
        let id = w.name.trim_start_matches("withdrawals/");
        assert_eq!(
            log.created.get(id),
            Some(&w.request_id),
            "{id} not logged as created"
        );
        let logged = log.signed.get(id);
        if w.state() == WithdrawalState::Signed {
            listed_signed.insert(id);
            let raw = &w.signed_transaction.as_ref().unwrap().raw;
            assert_eq!(
                logged.map(|(_, tx)| tx),
                Some(raw),
                "{id}: the stored signed transaction is not the one logged"
            );
        } else if let Some((index, _)) = logged {
            assert!(
                *index >= logged_before,
                "{id} is {:?} but its signed entry {index} was committed before the listing",
                w.state()
            );
        }
        let Some(&i) = by_request.get(w.request_id.as_str()) else {
            continue; // the end-of-run probe
        };
        run.verify_listed(i, &ledger[i], w);
    }
    for (i, rec) in ledger.iter().enumerate() {
        let Some(name) = &rec.name else { continue };
        assert!(
            listed.iter().any(|w| &w.name == name),
            "acknowledged withdrawal {name} ({}) is lost",
            run.plans[i].request_id
        );
        let id = name.trim_start_matches("withdrawals/");
        if let Some(raw) = &rec.signed {
            assert!(
                listed_signed.contains(id),
                "{id} was released signed, now listed otherwise"
            );
            assert_eq!(
                log.signed.get(id).map(|(_, tx)| tx),
                Some(raw),
                "a signature a client received is not the logged one ({id})"
            );
        }
    }
    // GetWithdrawal, and idempotent retries of acknowledged creates.
    let acked: Vec<usize> = (0..ledger.len())
        .filter(|&i| ledger[i].name.is_some() && (quiet || ledger[i].is_final()))
        .collect();
    let sample: Vec<usize> = match retries {
        None => acked,
        Some(n) => (0..n.min(acked.len()))
            .map(|_| acked[rng.below(acked.len() as u64) as usize])
            .collect(),
    };
    for i in sample {
        let name = ledger[i].name.clone().unwrap();
        let got = withdrawals
            .get_withdrawal(proto::GetWithdrawalRequest { name })
            .await
            .unwrap()
            .into_inner();
        run.absorb(i, &got, "get after restart");
        let again = withdrawals
            .create_withdrawal(run.plans[i].request())
            .await
            .unwrap()
            .into_inner();
        run.absorb(i, &again, "idempotent retry");
    }
}

/// Proposes the dev policy with the given caps as version 2 and activates it
/// with the dev admin key (admin quorum 1). Returns its hash.
async fn activate_policy(server: &DevServer, count_cap: usize) -> [u8; 32] {
    let dev_policy = std::fs::read_to_string(server.data_dir.join("policy.toml")).unwrap();
    let mut document = dev_policy.clone();
    for (from, to) in [
        ("version = 1", "version = 2".to_owned()),
        ("count = 1000", format!("count = {count_cap}")),
        (
            "amount = \"150000000000000000000\"",
            format!("amount = \"{HOUR_AMOUNT_CAP}\""),
        ),
        (
            "amount = \"400000000000000000000\"",
            format!("amount = \"{DAY_AMOUNT_CAP}\""),
        ),
        (
            "amount_max = \"1000000000000000000\"",
            format!("amount_max = \"{AUTO_MAX}\""),
        ),
    ] {
        assert!(
            document.contains(from),
            "the dev policy has no {from:?}:\n{dev_policy}"
        );
        document = document.replacen(from, &to, 1);
    }
    support::activate_policy_document(server, document).await
}

/// Waits for a checkpoint covering `size` entries.
async fn await_checkpoint(server: &DevServer, size: u64) {
    let mut audit = AuditServiceClient::new(server.channel_as("auditor").await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = audit
            .get_checkpoint(proto::GetCheckpointRequest { tree_size: 0 })
            .await
            && c.get_ref().tree_size >= size
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of size {size} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Limits are exact: walks every decision in the log with the client's own
/// running usage (amounts from the plans, not from the server).
fn check_limits(run: &Run, log: &Log, count_cap: usize) -> (u64, u128) {
    let amount_of: HashMap<&str, u128> = run.plans.iter().map(|p| (p.request_id.as_str(), p.wei)).collect();
    let (mut count, mut sum) = (0u64, 0u128);
    let mut counted = HashSet::new();
    let mut decisions = 0;
    for data in &log.entries {
        let entry = Entry::decode(data).unwrap();
        let Event::Decision {
            withdrawal_id,
            state,
            rule,
            reason_code,
            usage,
            ..
        } = entry.event
        else {
            continue;
        };
        let request_id = &log.created[&withdrawal_id];
        let Some(&amount) = amount_of.get(request_id.as_str()) else {
            continue; // the probe is checked by the caller
        };
        decisions += 1;
        assert_eq!(usage.len(), 2, "{usage:?}");
        let now_counts = state == "APPROVED";
        for window in &usage {
            let cap = if window.seconds == 3600 {
                HOUR_AMOUNT_CAP
            } else {
                DAY_AMOUNT_CAP
            };
            assert_eq!(
                (window.count_before, window.amount_before.parse::<u128>().unwrap()),
                (count, sum),
                "usage before decision on {withdrawal_id} (entry {}) differs from the ledger's",
                entry.index
            );
            let after = if now_counts {
                (count + 1, sum + amount)
            } else {
                (count, sum)
            };
            assert_eq!(
                (window.count_after, window.amount_after.parse::<u128>().unwrap()),
                after
            );
            assert!(window.amount_after.parse::<u128>().unwrap() <= cap);
            if window.seconds == 3600 {
                assert!(window.count_after as usize <= count_cap, "count cap exceeded");
            }
        }
        if now_counts {
            assert!(
                counted.insert(withdrawal_id.clone()),
                "{withdrawal_id} counted twice"
            );
            if rule == RULE_AUTO {
                assert!(amount <= AUTO_MAX, "auto-signed {amount} wei");
            }
            count += 1;
            sum += amount;
        } else if state == "DENIED" {
            assert_eq!(reason_code, LIMIT_DENIAL);
            assert_eq!(count as usize, count_cap, "denied for the limit below the cap");
        }
    }
    assert!(decisions >= run.plans.len());
    (count, sum)
}

/// The run's directory, kept for inspection when `CUSTOS_CRASH_KEEP` is set.
struct TempDir(Option<tempfile::TempDir>);

impl TempDir {
    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CUSTOS_CRASH_KEEP").is_some() {
            let _ = self.0.take().map(tempfile::TempDir::keep);
        }
    }
}

fn bucket(n: usize) -> &'static str {
    match n {
        0 => "0",
        1..=3 => "1-3",
        4..=7 => "4-7",
        _ => "8+",
    }
}

/// The crash-consistency run (module docs).
#[test]
fn kill_9_at_random_points_loses_nothing_and_signs_exactly_once() {
    let started = Instant::now();
    let seed = env_or(
        "CUSTOS_CRASH_SEED",
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
    );
    let total = env_or("CUSTOS_CRASH_WITHDRAWALS", 2000) as usize;
    let min_kills = env_or("CUSTOS_CRASH_KILLS", 50) as usize;
    assert!(total > OVER_CAP);
    let count_cap = total - OVER_CAP;
    println!("crash test: seed {seed} (CUSTOS_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);

    // A quarter quorum, the rest auto-signed; small amounts for auto (at
    // most 0.01 ETH), just over the 1 ETH auto ceiling for quorum.
    let mut quorum: Vec<bool> = (0..total).map(|i| i < total / 4).collect();
    rng.shuffle(&mut quorum);
    let plans: Vec<Plan> = quorum
        .into_iter()
        .enumerate()
        .map(|(i, quorum)| Plan {
            request_id: format!("crash-{seed:x}-{i}"),
            wei: if quorum {
                AUTO_MAX + 1 + u128::from(rng.below(ETHER as u64 / 5))
            } else {
                1 + u128::from(rng.below(ETHER as u64 / 100))
            },
            nonce: i as u64,
            quorum,
        })
        .collect();
    // Aim a third over the minimum number of kills, whatever the speed of
    // the machine: each life's mean quota is the steps left over the kills
    // left to reach that.
    let target_kills = min_kills + min_kills / 3;

    let temp = tempfile::tempdir().unwrap();
    if std::env::var_os("CUSTOS_CRASH_KEEP").is_some() {
        println!("crash test: keeping {}", temp.path().display());
    }
    let temp = TempDir(Some(temp));
    let data_dir = temp.path().join("dev");
    let rt = support::runtime();
    let mut server = DevServer::start_in(&data_dir, &[]);
    let (policy_hash, service_id, wallet_address) = rt.block_on(async {
        let hash = activate_policy(&server, count_cap).await;
        let policy = PolicyServiceClient::new(server.channel_as("admin").await)
            .get_policy(proto::GetPolicyRequest { version: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((policy.version, policy.hash.clone()), (2, hex::encode(hash)));
        let wallet = WalletServiceClient::new(server.channel_as("backend").await)
            .get_wallet(proto::GetWalletRequest {
                name: format!("wallets/{}", custos::dev::DEV_WALLET),
            })
            .await
            .unwrap()
            .into_inner();
        (hash, policy.service_id, wallet.ethereum_address)
    });
    let log_key = server.ready["log_verifier_key"].clone();
    // Checkpoints every 64 entries (at the issuer's 500 ms tick) rather than
    // every 2 s, so that kills land in checkpoint signing too. Dev mode
    // reuses its configuration file on the next start.
    assert!(server.stop().success());
    let config_path = data_dir.join("custosd.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let cadence = "checkpoint_every_seconds = 2";
    assert!(config.contains(cadence), "{config}");
    std::fs::write(
        &config_path,
        config.replace(
            cadence,
            "checkpoint_every_seconds = 1\ncheckpoint_every_entries = 64",
        ),
    )
    .unwrap();
    let keys = data_dir.join("keys");
    let mut order: Vec<usize> = (0..total).collect();
    rng.shuffle(&mut order);
    let run = Arc::new(Run {
        ledger: Mutex::new(vec![Record::default(); total]),
        queue: Mutex::new(order.into()),
        plans,
        wallet_address,
        service_id,
        policy_hash,
        alice: KeyFile::load(&keys.join("alice.pem")).unwrap(),
        bob: KeyFile::load(&keys.join("bob.pem")).unwrap(),
        phases: Mutex::new(BTreeMap::new()),
    });

    let mut log = Log::default();
    let mut dead_log = DeadLog::default();
    let mut kills = 0usize;
    // Checkpoints in the store at the last kill, and killed lives that
    // signed checkpoints (the issuer was running when the kill came).
    let (mut checkpoints_seen, mut killed_checkpointing) = (0u64, 0usize);
    let mut approved_at_kills: HashSet<String> = HashSet::new();
    let mut verified = 0;
    let mut check_time = Duration::ZERO;
    for life in 0.. {
        server = DevServer::start_in(&data_dir, &[]);
        assert_eq!(
            server.ready["log_verifier_key"], log_key,
            "the log verifier key changed across a restart"
        );
        let steps_left = run.steps_left();
        if steps_left == 0 {
            break; // the checks at the end follow
        }
        let mean_quota = (steps_left / target_kills.saturating_sub(kills).max(1)).max(1) as u64;
        let quota = if rng.below(100) < 15 {
            0
        } else {
            1 + rng.below(2 * mean_quota)
        };
        let delay = Duration::from_micros(rng.below(3000));
        // Every 10th life, and the lives killed at once, check with the
        // clients stopped. The others check while each client retries one
        // withdrawal (first those the kill interrupted, racing the sweeper
        // over what it left APPROVED), then hold until the check is done;
        // their quota counts from there.
        let full = life > 0 && life % 10 == 0;
        let quiet = life > 0 && (full || quota == 0);
        if quiet {
            let checking = Instant::now();
            rt.block_on(check_state(
                &run,
                &server,
                &mut log,
                full,
                Some(20),
                true,
                &mut rng,
            ));
            if full {
                // Wait for a checkpoint covering what this life found.
                rt.block_on(await_checkpoint(&server, log.entries.len() as u64));
                let report = support::export_and_verify(&server, &temp.path().join(format!("export-{life}")));
                assert!(
                    report["entries"].as_u64().unwrap() >= log.entries.len() as u64,
                    "{report}"
                );
                verified += 1;
            }
            check_time += checking.elapsed();
        }
        let current = Arc::new(rt.block_on(Life::open(Arc::clone(&run), &server)));
        current.running.store(CONCURRENCY, Ordering::SeqCst);
        current.hold.store(life > 0 && !quiet, Ordering::SeqCst);
        let workers: Vec<_> = (0..CONCURRENCY)
            .map(|_| rt.spawn(Arc::clone(&current).worker()))
            .collect();
        if life > 0 && !quiet {
            let checking = Instant::now();
            rt.block_on(check_state(
                &run,
                &server,
                &mut log,
                false,
                Some(20),
                false,
                &mut rng,
            ));
            check_time += checking.elapsed();
            current.hold.store(false, Ordering::SeqCst);
        }
        let base = current.acks.load(Ordering::SeqCst) as u64;
        let killed = loop {
            if current.acks.load(Ordering::SeqCst) as u64 >= base + quota {
                std::thread::sleep(delay);
                current.killed.store(true, Ordering::SeqCst);
                server.child.kill().unwrap();
                break true;
            }
            if current.running.load(Ordering::SeqCst) == 0 {
                break false;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        rt.block_on(async {
            for worker in workers {
                match tokio::time::timeout(Duration::from_secs(60), worker).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let log = server.stderr();
                        let tail = &log[log.len().saturating_sub(4000)..];
                        eprintln!("custosd's log ends:\n{tail}");
                        std::panic::resume_unwind(e.into_panic())
                    }
                    Err(_) => panic!("a client hung after the kill"),
                }
            }
        });
        if killed {
            kills += 1;
            let status = server.child.wait().unwrap();
            assert!(!status.success(), "custosd survived SIGKILL: {status}");
            let interrupted = current.interrupted.lock().unwrap().clone();
            run.note(format!(
                "kills interrupting {} requests",
                bucket(interrupted.len())
            ));
            let (approved, checkpoints) =
                classify(&run, &data_dir.join("custos.db"), &interrupted, &mut dead_log);
            run.note(format!(
                "kills leaving {} withdrawals APPROVED, unsigned",
                bucket(approved.len())
            ));
            approved_at_kills.extend(approved);
            if checkpoints > checkpoints_seen {
                killed_checkpointing += 1;
            }
            checkpoints_seen = checkpoints;
        } else {
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "custosd died on its own"
            );
            assert!(server.stop().success(), "custosd failed to stop cleanly");
        }
    }
    let driven = started.elapsed();

    // The end: everything final, and the full checks on a live server.
    let ledger = run.ledger.lock().unwrap().clone();
    assert!(ledger.iter().all(Record::is_final));
    rt.block_on(check_state(&run, &server, &mut log, true, None, true, &mut rng));
    let (count, sum) = check_limits(&run, &log, count_cap);
    let signed: Vec<&Record> = ledger
        .iter()
        .filter(|r| r.state == Some(WithdrawalState::Signed))
        .collect();
    let ledger_sum: u128 = ledger
        .iter()
        .zip(&run.plans)
        .filter(|(r, _)| r.state == Some(WithdrawalState::Signed))
        .map(|(_, p)| p.wei)
        .sum();
    assert_eq!(signed.len(), count_cap, "exactly the count cap is signed");
    assert_eq!((count, sum), (count_cap as u64, ledger_sum));
    for id in &approved_at_kills {
        assert!(log.signed.contains_key(id), "{id}, APPROVED at a kill");
    }
    // The server's own usage, as it decides the next withdrawal: denied, with
    // exactly the ledger's count and sum in both windows.
    let probe_request = custos::dev::transfer_request(
        &format!("crash-{seed:x}-probe"),
        custos::dev::DEV_ALLOWLISTED,
        1,
        total as u64,
        "ops",
    );
    rt.block_on(async {
        let mut withdrawals = WithdrawalServiceClient::new(server.channel_as("backend").await);
        let probe = withdrawals
            .create_withdrawal(probe_request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(probe.state(), WithdrawalState::Denied);
        assert_eq!(probe.decision.as_ref().unwrap().reason_code, LIMIT_DENIAL);
        // Same request id, other contents: refused, not a second withdrawal.
        let mut other = run.plans[0].request();
        other.initiator = "someone-else".into();
        let err = withdrawals.create_withdrawal(other).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        let mut audit = AuditServiceClient::new(server.channel_as("auditor").await);
        log.update(&mut audit, false).await;
        let probe_id = probe.name.trim_start_matches("withdrawals/");
        let usage = log
            .entries
            .iter()
            .rev()
            .find_map(|data| match Entry::decode(data).unwrap().event {
                Event::Decision {
                    withdrawal_id, usage, ..
                } if withdrawal_id == probe_id => Some(usage),
                _ => None,
            })
            .unwrap();
        for window in usage {
            assert_eq!(window.count_before, count_cap as u64, "{window:?}");
            assert_eq!(window.amount_before, ledger_sum.to_string(), "{window:?}");
        }
        await_checkpoint(&server, log.entries.len() as u64).await;
    });
    let report = support::export_and_verify(&server, &temp.path().join("export-final"));
    verified += 1;
    assert_eq!(
        report["entries"].as_u64(),
        Some(log.entries.len() as u64),
        "{report}"
    );
    assert_eq!(
        report["replay"]["signatures"].as_u64(),
        Some(count_cap as u64),
        "{report}"
    );
    assert_eq!(report["replay"]["withdrawals"].as_u64(), Some(total as u64 + 1));
    assert!(server.stop().success());

    let phases = run.phases.lock().unwrap().clone();
    println!(
        "crash test: seed {seed}: {total} withdrawals ({} quorum), {kills} kills, {} signed, {} denied at the count cap, \
         {} audit entries, {verified} exports verified; {:.1} s driving ({:.1} s of it checking), {:.1} s in all",
        run.plans.iter().filter(|p| p.quorum).count(),
        signed.len(),
        total - signed.len(),
        log.entries.len(),
        driven.as_secs_f64(),
        check_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    println!(
        "APPROVED-unsigned at a kill, signed once after restart: {}; killed lives that signed checkpoints: \
         {killed_checkpointing}; checkpoints verified at the end: {}",
        approved_at_kills.len(),
        report["checkpoints_verified"]
    );
    for (phase, n) in &phases {
        println!("  {n:5}  {phase}");
    }
    assert!(kills >= min_kills, "only {kills} kills");
    let seen = |prefix: &str| phases.iter().any(|(p, n)| p.starts_with(prefix) && *n > 0);
    for phase in [
        "create (auto): nothing committed",
        "create (auto): APPROVED committed",
        "create (auto): SIGNED committed",
        "deciding vote: nothing committed",
        "deciding vote: APPROVED committed",
    ] {
        assert!(seen(phase), "no kill landed in {phase:?}: {phases:#?}");
    }
}
