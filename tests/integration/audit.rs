//! The audit log against the real `custosd --dev`: every event of the
//! withdrawal story is an entry, committed with its state change, and the
//! stored Merkle tree matches the tree recomputed from the entries; if the log
//! cannot be written, nothing is stored or signed and custos recovers on its
//! own once it can.

use std::time::{Duration, Instant};

use tonic::Code;

use custos::audit::entry::{Entry, Event};
use custos::audit::merkle::{self, MemoryNodes};
use custos::proto::{self, WithdrawalState, withdrawal_service_client::WithdrawalServiceClient};
use custos::store::audit::SqlNodes;

use crate::support::{self, DevServer};

const EXCHANGE: &str = custos::dev::DEV_ALLOWLISTED;

fn request(request_id: &str, wei: u128, nonce: u64) -> proto::CreateWithdrawalRequest {
    crate::withdrawals::create_request(request_id, EXCHANGE, wei, nonce, "ops")
}

fn entries(db: &rusqlite::Connection) -> Vec<Entry> {
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
        let mut client = WithdrawalServiceClient::new(server.channel().await);
        let small = client
            .create_withdrawal(request("small", 10u128.pow(17), 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(small.state(), WithdrawalState::Signed);

        let db = rusqlite::Connection::open(server.path("store")).unwrap();
        let log = entries(&db);
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

        let mut memory = MemoryNodes::new();
        for bytes in custos::store::audit::entries(&db, 0, log.len() as u64).unwrap() {
            memory.append(merkle::leaf_hash(&bytes));
        }
        let size = log.len() as u64;
        let stored_root = merkle::root(&SqlNodes(&db), size).unwrap();
        assert_eq!(stored_root, merkle::root(&memory, size).unwrap());
        for index in 0..size {
            let proof = merkle::inclusion_proof(&SqlNodes(&db), index, size).unwrap();
            let leaf = merkle::leaf_hash(&log[index as usize].encode());
            merkle::verify_inclusion(&leaf, index, size, &proof, &stored_root).unwrap();
        }

        let pin = std::fs::read_to_string(server.path("user_pin_file")).unwrap();
        let all: Vec<u8> = custos::store::audit::entries(&db, 0, size).unwrap().concat();
        assert!(
            !all.windows(pin.len()).any(|w| w == pin.as_bytes()),
            "the PIN is in the log"
        );
        assert!(
            db.execute("DELETE FROM audit_log", []).is_err(),
            "the log is append-only"
        );
        assert!(
            db.execute("UPDATE audit_log SET time = 0", []).is_err(),
            "the log is append-only"
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
        let mut client = WithdrawalServiceClient::new(server.channel().await);
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
        let log = entries(&db);
        let signed = log.iter().filter(|e| matches!(e.event, Event::Signed { .. })).count();
        assert_eq!(signed, 1, "one signed entry for one signature");
    });
}
