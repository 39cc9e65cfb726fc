//! The audit log against the real `custosd --dev`: every event of the
//! withdrawal story is an entry, committed with its state change, and the
//! stored Merkle tree matches the tree recomputed from the entries; if the log
//! cannot be written, nothing is stored or signed and custos recovers on its
//! own once it can.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::support::{self, DevServer};
use custos::proto::{self, WithdrawalState, withdrawal_service_client::WithdrawalServiceClient};
use custos::store::audit::SqlNodes;
use custos::store::sql::Conn;
use custos_core::audit::entry::{Entry, Event};
use custos_core::audit::merkle::{self, MemoryNodes};
use custos_core::audit::replay::{ReplayReport, Replayer};

const EXCHANGE: &str = custos::dev::DEV_ALLOWLISTED;

fn request(request_id: &str, wei: u128, nonce: u64) -> proto::CreateWithdrawalRequest {
    crate::withdrawals::create_request(request_id, EXCHANGE, wei, nonce, "ops")
}

fn entries(db: Conn<'_>) -> Vec<Entry> {
    let size = custos::store::audit::size(db).unwrap();
    custos::store::audit::entries(db, 0, size)
        .unwrap()
        .iter()
        .map(|bytes| Entry::decode(bytes).unwrap())
        .collect()
}

/// Each step of the story appends its entries in order; indexes are
/// contiguous; the signed transaction in the log is the one the client got;
/// and the root from the stored subtrees equals the root recomputed from the
/// entries alone. No entry carries the PIN.
#[test]
fn every_event_is_logged_and_the_stored_tree_matches_the_entries() {
    support::runtime().block_on(async {
        let server = DevServer::start();
        let mut client = WithdrawalServiceClient::new(server.channel_as("backend").await);
        let small = client
            .create_withdrawal(request("small", 10u128.pow(17), 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(small.state(), WithdrawalState::Signed);

        let log = support::read_dev_store(&server.data_dir, |c| Ok(entries(c)));
        let kinds: Vec<&str> = log
            .iter()
            .map(|e| match &e.event {
                Event::WalletCreated { .. } => "wallet-created",
                Event::PolicyProposed { .. } => "policy-proposed",
                Event::PolicyActivated { .. } => "policy-activated",
                Event::WithdrawalCreated { .. } => "withdrawal-created",
                Event::Decision { .. } => "decision",
                Event::Signed { .. } => "signed",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "wallet-created",
                "policy-proposed",
                "policy-activated",
                "withdrawal-created",
                "decision",
                "signed"
            ]
        );
        for (i, e) in log.iter().enumerate() {
            assert_eq!(e.index, i as u64);
        }
        let Event::Decision {
            state, rule, usage, ..
        } = &log[4].event
        else {
            unreachable!()
        };
        assert_eq!((state.as_str(), rule.as_str()), ("APPROVED", "auto-small"));
        assert_eq!(usage[0].count_before + 1, usage[0].count_after);
        let Event::Signed { signed_tx, .. } = &log[5].event else {
            unreachable!()
        };
        assert_eq!(Some(signed_tx), small.signed_transaction.as_ref().map(|s| &s.raw));

        let size = log.len() as u64;
        let (stored, stored_root, proofs) = support::read_dev_store(&server.data_dir, move |c| {
            let proofs: Vec<_> = (0..size)
                .map(|index| merkle::inclusion_proof(&SqlNodes(c), index, size).unwrap())
                .collect();
            Ok((
                custos::store::audit::entries(c, 0, size)?,
                merkle::root(&SqlNodes(c), size).unwrap(),
                proofs,
            ))
        });
        let mut memory = MemoryNodes::new();
        for bytes in &stored {
            memory.append(merkle::leaf_hash(bytes));
        }
        assert_eq!(stored_root, merkle::root(&memory, size).unwrap());
        for (index, proof) in (0..size).zip(&proofs) {
            let leaf = merkle::leaf_hash(&log[index as usize].encode());
            merkle::verify_inclusion(&leaf, index, size, proof, &stored_root).unwrap();
        }

        let pin = std::fs::read_to_string(server.path("user_pin_file")).unwrap();
        let all: Vec<u8> = stored.concat();
        assert!(
            !all.windows(pin.len()).any(|w| w == pin.as_bytes()),
            "the PIN is in the log"
        );
        for tamper in ["DELETE FROM audit_log", "UPDATE audit_log SET time = 0"] {
            let refused = support::with_dev_store(&server.data_dir, move |c| c.execute(tamper, &[])).is_err();
            assert!(refused, "the log is append-only: {tamper}");
        }
        assert_eq!(
            support::read_dev_store(&server.data_dir, custos::store::audit::size),
            size,
            "nothing was removed"
        );
    });
}

/// With the log unwritable for `signed` entries (a trigger stands in for a
/// full disk or an I/O error on that write), an allowed withdrawal is not
/// released: the client gets UNAVAILABLE and the withdrawal stays APPROVED
/// with no signature stored. With every log write failing, a new request
/// stores nothing at all. Once the log is writable again, the sweep signs the
/// APPROVED withdrawal without a restart.
#[test]
fn nothing_is_signed_or_stored_while_the_log_cannot_be_written() {
    support::runtime().block_on(async {
        let server = DevServer::start();
        let mut client = WithdrawalServiceClient::new(server.channel_as("backend").await);
        let db = rusqlite::Connection::open(server.path("store")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();

        // Kind byte 0x08 (signed) sits after the 15-byte domain and two u64s.
        db.execute_batch(
            "CREATE TRIGGER fail_signed BEFORE INSERT ON audit_log WHEN substr(NEW.entry, 32, 1) = x'08'
             BEGIN SELECT RAISE(ABORT, 'injected log failure'); END;",
        )
        .unwrap();
        let err = client
            .create_withdrawal(request("held", 10u128.pow(17), 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(!err.message().contains("injected"), "internal details stay in the log");
        let (state, signed): (String, Option<Vec<u8>>) = db
            .query_row("SELECT state, signed_tx FROM withdrawals WHERE request_id = 'held'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((state.as_str(), signed), ("APPROVED", None));

        db.execute_batch(
            "CREATE TRIGGER fail_all BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'injected log failure'); END;",
        )
        .unwrap();
        let before: i64 = db.query_row("SELECT COUNT(*) FROM withdrawals", [], |r| r.get(0)).unwrap();
        let err = client
            .create_withdrawal(request("never", 10u128.pow(17), 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        let after: i64 = db.query_row("SELECT COUNT(*) FROM withdrawals", [], |r| r.get(0)).unwrap();
        assert_eq!(before, after, "a withdrawal whose entry failed is not stored");

        db.execute_batch("DROP TRIGGER fail_signed; DROP TRIGGER fail_all;").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let retried = client
                .create_withdrawal(request("held", 10u128.pow(17), 0))
                .await
                .unwrap()
                .into_inner();
            if retried.state() == WithdrawalState::Signed {
                break;
            }
            assert!(Instant::now() < deadline, "not signed after the log recovered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = entries(Conn::from(&db));
        let signed = log.iter().filter(|e| matches!(e.event, Event::Signed { .. })).count();
        assert_eq!(signed, 1, "one signed entry for one signature");
    });
}

/// Indexes from 0 again, after entries were inserted.
fn renumber(log: &mut [Entry]) {
    for (i, e) in log.iter_mut().enumerate() {
        e.index = i as u64;
    }
}

/// Replays one entry at a time, and again with the signature checks done
/// ahead on all cores; both must agree.
fn replay(log: &[Entry]) -> ReplayReport {
    let mut replayer = Replayer::for_service("custos-dev");
    for e in log {
        replayer.push(e);
    }
    let report = replayer.finish();
    let mut batched = Replayer::for_service("custos-dev");
    batched.push_all(log);
    assert_eq!(batched.finish(), report, "push_all and push disagree");
    report
}

fn found(report: &ReplayReport) -> Vec<(u64, &'static str)> {
    report.findings.iter().map(|f| (f.index, f.code)).collect()
}

/// The real log of a governed story replays offline with no findings: a
/// small withdrawal signed at once, a large one signed after alice's and
/// bob's approvals, a freeze with a withdrawal denied under it and an
/// unfreeze, a new policy version by admin signature, and a withdrawal to an
/// address that version backdates into its allowlist, denied because the
/// time-lock runs from the activation. Then forged copies of the log are
/// flagged at the forged entry: a signature copied onto the denied
/// withdrawal, the denied withdrawal's decision turned into an approval, and
/// a signature byte changed.
#[test]
fn the_real_log_replays_clean_and_forgeries_are_flagged_where_they_are() {
    use custos::proto::policy_service_client::PolicyServiceClient;
    use custos_core::audit::replay::code;
    use custos_core::governance::GovernanceAction;
    use custos_core::policy::{Vote, policy_hash};

    const ETHER: u128 = 1_000_000_000_000_000_000;
    const LATE: &str = "0x5757575757575757575757575757575757575757";
    support::runtime().block_on(async {
        let dev = crate::withdrawals::Dev::start().await;
        let genesis = dev.dev_policy();
        let small = dev.create("small", EXCHANGE, ETHER / 10, 0, "ops").await.unwrap();
        assert_eq!(small.state(), WithdrawalState::Signed);
        let large = dev.create("large", EXCHANGE, 5 * ETHER, 1, "ops").await.unwrap();
        assert_eq!(large.state(), WithdrawalState::PendingApproval);
        dev.vote(&large, "alice", Vote::Approve).await.unwrap();
        let large = dev.vote(&large, "bob", Vote::Approve).await.unwrap();
        assert_eq!(large.state(), WithdrawalState::Signed);

        let mut policies: PolicyServiceClient<_> = dev.policies();
        let freeze = dev.governance(GovernanceAction::Freeze, 0, [0; 32], "admin").await;
        policies
            .freeze(proto::FreezeRequest { freeze: Some(freeze) })
            .await
            .unwrap();
        let frozen = dev.create("frozen", EXCHANGE, ETHER / 10, 2, "ops").await.unwrap();
        assert_eq!(frozen.decision.clone().unwrap().reason_code, "frozen");
        let unfreeze = dev.governance(GovernanceAction::Unfreeze, 1, [0; 32], "admin").await;
        policies
            .unfreeze(proto::UnfreezeRequest {
                signatures: vec![unfreeze],
            })
            .await
            .unwrap();
        let thawed = dev.create("thawed", EXCHANGE, ETHER / 10, 3, "ops").await.unwrap();
        assert_eq!(thawed.state(), WithdrawalState::Signed);

        let v2 = genesis.replace("version = 1", "version = 2").replace(
            "entries = [\n",
            &format!("entries = [\n  {{ address = \"{LATE}\", added_at = 1 }},\n"),
        );
        assert!(dev.activate(&v2).await.activated);
        let late = dev.create("late", LATE, ETHER / 10, 4, "ops").await.unwrap();
        assert_eq!(late.state(), WithdrawalState::Denied);
        assert_eq!(late.decision.clone().unwrap().reason_code, "not_allowlisted");

        let log = support::read_dev_store(&dev.server.data_dir, |c| Ok(entries(c)));
        let report = replay(&log);
        assert_eq!(report.findings, [], "{:#?}", report.findings);
        assert_eq!(report.entries, log.len() as u64);
        assert_eq!(
            (
                report.policy_versions,
                report.withdrawals,
                report.decisions,
                report.votes,
                report.signatures
            ),
            (2, 5, 7, 2, 3)
        );
        assert_eq!(report.genesis_policy_hash, Some(policy_hash(genesis.as_bytes())));

        let late_id = late.name.trim_start_matches("withdrawals/");
        let late_decision = log.len() - 1;
        assert!(matches!(&log[late_decision].event, Event::Decision { withdrawal_id, .. } if withdrawal_id == late_id));
        let thawed_signature = log
            .iter()
            .rposition(|e| matches!(e.event, Event::Signed { .. }))
            .unwrap();
        let copied_signature = |onto: &str| {
            let mut e = log[thawed_signature].clone();
            let Event::Signed { withdrawal_id, .. } = &mut e.event else {
                unreachable!()
            };
            *withdrawal_id = onto.to_owned();
            e
        };

        // (a) A signature, copied from another withdrawal, for the one
        // denied while frozen, right after its decision: every later entry
        // moves up by one.
        let frozen_id = frozen.name.trim_start_matches("withdrawals/");
        let frozen_decision = log
            .iter()
            .position(|e| matches!(&e.event, Event::Decision { withdrawal_id, .. } if withdrawal_id == frozen_id))
            .unwrap();
        let mut forged = log.clone();
        forged.insert(frozen_decision + 1, copied_signature(frozen_id));
        renumber(&mut forged);
        let at = frozen_decision as u64 + 1;
        let report = replay(&forged);
        assert_eq!(
            found(&report),
            [(at, code::SIGNATURE_UNAUTHORIZED)],
            "{:#?}",
            report.findings
        );

        // (d) The denied withdrawal approved under the backdated entry before
        // its time-lock ended, then signed.
        let mut forged = log.clone();
        let Event::Decision {
            state,
            rule,
            reason_code,
            reason,
            usage,
            ..
        } = &mut forged[late_decision].event
        else {
            unreachable!()
        };
        *state = "APPROVED".into();
        *rule = "auto-small".into();
        reason_code.clear();
        reason.clear();
        for window in usage.iter_mut() {
            window.count_after += 1;
        }
        forged.push(copied_signature(late_id));
        renumber(&mut forged);
        let report = replay(&forged);
        let at = late_decision as u64;
        assert_eq!(
            found(&report),
            [
                (at, code::DECISION_MISMATCH),
                (at + 1, code::SIGNATURE_UNAUTHORIZED),
                (at + 1, code::SIGNATURE_INVALID),
            ],
            "{:#?}",
            report.findings
        );
        let detail = &report.findings[0].detail;
        assert!(
            detail.contains("not_allowlisted") && detail.contains("time-lock ends at"),
            "{detail}"
        );

        // A changed byte in a real signature.
        let mut forged = log.clone();
        let Event::Signed { signed_tx, .. } = &mut forged[thawed_signature].event else {
            unreachable!()
        };
        let last = signed_tx.len() - 1;
        signed_tx[last] ^= 1;
        let report = replay(&forged);
        assert_eq!(
            found(&report),
            [(thawed_signature as u64, code::SIGNATURE_INVALID)],
            "{:#?}",
            report.findings
        );
    });
}
