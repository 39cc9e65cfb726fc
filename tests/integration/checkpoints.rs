//! Signed checkpoints, the AuditService, export and `custos audit verify`,
//! against the real `custosd --dev` and its SoftHSM log key: checkpoints
//! verify under an independent Python implementation of C2SP signed notes;
//! proofs from the server verify against them; every kind of tampering with
//! an export is caught and placed; custosd refuses to sign a tree that
//! contradicts a checkpoint it holds; and a history rewritten and re-signed
//! after its checkpoints were deleted is a fork to anyone holding an older
//! checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;

use crate::support::{self, DevServer};
use crate::withdrawals::{Dev, ETHER, EXCHANGE};
use custos::hsm::KeyKind;
use custos::proto::{self, WithdrawalState, audit_service_client::AuditServiceClient};
use custos_core::audit::merkle;
use custos_core::audit::note::NoteVerifier;
use custos_core::audit::verify::{self, LogVerifier, VerifyReport};
use custos_core::policy::Vote;

fn audit_client(channel: Channel) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(channel)
}

fn verifier_key(server: &DevServer) -> String {
    server.ready["log_verifier_key"].as_str().unwrap().to_owned()
}

async fn log_size(audit: &mut AuditServiceClient<Channel>) -> u64 {
    let mut stream = audit
        .list_entries(proto::ListEntriesRequest { start: 0, end: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    n
}

/// Waits for the cadence (2 s in dev mode) to sign a checkpoint of `size`.
async fn checkpoint_covering(audit: &mut AuditServiceClient<Channel>, size: u64) -> proto::SignedCheckpoint {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = audit
            .get_checkpoint(proto::GetCheckpointRequest { tree_size: 0 })
            .await
        {
            let c = c.into_inner();
            if c.tree_size >= size {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of size {size} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn hashes32(hashes: &[Vec<u8>]) -> Vec<[u8; 32]> {
    hashes.iter().map(|h| h.as_slice().try_into().unwrap()).collect()
}

fn python_verify(key: &str, note: &str) -> Result<serde_json::Value, String> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), note).unwrap();
    let output = Command::new("python3")
        .arg(format!("{}/tests/note_verify.py", env!("CARGO_MANIFEST_DIR")))
        .arg(key)
        .arg(file.path())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(serde_json::from_str(&stdout).unwrap())
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
    }
}

fn cli(server: &DevServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(server.cli_args("auditor"))
        .args(args)
        .output()
        .expect("run custos")
}

/// A small story on the dev server: two auto-signed, one approved by two
/// approvers, one denied.
async fn story(dev: &Dev) {
    for (i, id) in ["a", "b"].iter().enumerate() {
        let w = dev
            .create(id, EXCHANGE, ETHER / 10, i as u64, "ops")
            .await
            .unwrap();
        assert_eq!(w.state(), WithdrawalState::Signed);
    }
    let large = dev.create("large", EXCHANGE, 5 * ETHER, 2, "ops").await.unwrap();
    assert_eq!(large.state(), WithdrawalState::PendingApproval);
    dev.vote(&large, "alice", Vote::Approve).await.unwrap();
    let large = dev.vote(&large, "bob", Vote::Approve).await.unwrap();
    assert_eq!(large.state(), WithdrawalState::Signed);
    let denied = dev
        .create(
            "denied",
            "0x7777777777777777777777777777777777777777",
            ETHER / 10,
            3,
            "ops",
        )
        .await
        .unwrap();
    assert_eq!(denied.state(), WithdrawalState::Denied);
}

/// Checkpoints are signed by the HSM's Ed25519 key, verify under an
/// independent Python implementation of signed notes, and every inclusion and
/// consistency proof the server gives verifies against them. Bad proof
/// requests are refused precisely. A stop signs a last checkpoint covering
/// every entry.
#[test]
fn checkpoints_verify_independently_and_proofs_verify_against_them() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let key = verifier_key(&dev.server);
        let mut audit = audit_client(dev.server.channel_as("auditor").await);

        let log_key = audit
            .get_log_key(proto::GetLogKeyRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(log_key.algorithm, "ed25519");
        assert_eq!(log_key.verifier_key, key);
        let attribute = |name: &str| log_key.attributes.iter().find(|a| a.name == name).unwrap().value;
        assert!(
            attribute("CKA_SENSITIVE") && attribute("CKA_NEVER_EXTRACTABLE") && !attribute("CKA_EXTRACTABLE")
        );

        let first = checkpoint_covering(&mut audit, 1).await;
        story(&dev).await;
        let size = log_size(&mut audit).await;
        let latest = checkpoint_covering(&mut audit, size).await;
        assert!(latest.tree_size > first.tree_size);

        for c in [&first, &latest] {
            let independent = python_verify(&key, &c.note).unwrap();
            assert_eq!(independent["tree_size"], c.tree_size);
            assert_eq!(independent["root_hex"], hex::encode(&c.root_hash));
            assert_eq!(independent["origin"], "custos.local/custos-dev");
        }
        let mut tampered = latest.note.replacen(
            &latest.tree_size.to_string(),
            &(latest.tree_size + 1).to_string(),
            1,
        );
        assert!(
            python_verify(&key, &tampered).is_err(),
            "Python accepted a changed size"
        );
        tampered = latest.note.clone();
        assert!(python_verify("custos.local/custos-dev+00000000+AQ==", &tampered).is_err());

        let verifier = NoteVerifier::parse(&key).unwrap();
        let checkpoint = verifier.open_checkpoint(&latest.note).unwrap();
        let mut entries = audit
            .list_entries(proto::ListEntriesRequest {
                start: 0,
                end: checkpoint.size,
            })
            .await
            .unwrap()
            .into_inner();
        let mut index = 0;
        while let Some(entry) = entries.message().await.unwrap() {
            assert_eq!(entry.index, index);
            let proof = audit
                .get_inclusion_proof(proto::GetInclusionProofRequest {
                    index,
                    tree_size: checkpoint.size,
                })
                .await
                .unwrap()
                .into_inner();
            let hashes = hashes32(&proof.hashes);
            merkle::verify_inclusion(
                &merkle::leaf_hash(&entry.data),
                index,
                checkpoint.size,
                &hashes,
                &checkpoint.root,
            )
            .unwrap();
            index += 1;
        }
        assert_eq!(index, checkpoint.size);
        let old = verifier.open_checkpoint(&first.note).unwrap();
        let proof = audit
            .get_consistency_proof(proto::GetConsistencyProofRequest {
                old_size: old.size,
                new_size: checkpoint.size,
            })
            .await
            .unwrap()
            .into_inner();
        let hashes = hashes32(&proof.hashes);
        merkle::verify_consistency(old.size, checkpoint.size, &old.root, &checkpoint.root, &hashes).unwrap();

        let beyond = audit
            .get_inclusion_proof(proto::GetInclusionProofRequest {
                index: 0,
                tree_size: size + 5,
            })
            .await
            .unwrap_err();
        assert_eq!(beyond.code(), Code::InvalidArgument);
        assert!(beyond.message().contains("tree_size"), "{beyond:?}");
        let outside = audit
            .get_inclusion_proof(proto::GetInclusionProofRequest {
                index: size,
                tree_size: size,
            })
            .await
            .unwrap_err();
        assert_eq!(outside.code(), Code::InvalidArgument);
        let reversed = audit
            .get_consistency_proof(proto::GetConsistencyProofRequest {
                old_size: size,
                new_size: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(reversed.code(), Code::InvalidArgument);
        let missing = audit
            .get_checkpoint(proto::GetCheckpointRequest {
                tree_size: size + 100,
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);

        // One more entry, then stop at once: the last checkpoint covers it.
        dev.create("last", EXCHANGE, ETHER / 10, 4, "ops").await.unwrap();
        let store = dev.server.path("store");
        let mut server = dev.server;
        assert!(server.stop().success());
        let db = rusqlite::Connection::open(store).unwrap();
        let logged = custos::store::audit::size(custos::store::sql::Conn::from(&db)).unwrap();
        let covered = custos::store::audit::checkpoint(custos::store::sql::Conn::from(&db), None)
            .unwrap()
            .unwrap();
        assert_eq!(covered.size, logged, "the shutdown checkpoint covers every entry");
        assert!(python_verify(&key, &covered.note).is_ok());
    });
}

/// On a token without EdDSA an operator picks P-256: the log key is made
/// with the same non-extractable template, its checkpoints are ECDSA signed
/// notes (type 0x02) that the Python verifier accepts, and the store binds
/// the log to that key and origin for life.
#[test]
fn p256_log_key_signs_checkpoints_and_is_bound_to_the_log() {
    let name = "checkpoints::p256_log_key_signs_checkpoints_and_is_bound_to_the_log";
    if !support::is_child(name) {
        let hsm = support::SoftHsmDir::new();
        support::run_child(name, &hsm.env());
        return;
    }
    let dir = support::child_dir();
    let mut config = support::init_test_token(&dir);
    config.audit.key_kind = KeyKind::P256;
    support::runtime().block_on(async {
        let app = custos::server::App::open(&config).await.unwrap();
        let key = app.checkpointer.key().clone();
        assert_eq!(key.kind, KeyKind::P256);
        assert!(key.attributes.never_extractable && !key.attributes.extractable);
        app.wallets
            .create(
                custos::wallet::WalletId::parse("one").unwrap(),
                custos::wallet::DisplayName::default(),
            )
            .await
            .unwrap();
        let checkpoint = app.checkpointer.issue().await.unwrap().unwrap();
        assert_eq!(checkpoint.size, 1);
        let verifier = app.checkpointer.verifier().encode();
        assert!(verifier.starts_with("custos.local/custos+"));
        let independent = python_verify(&verifier, &checkpoint.note).unwrap();
        assert_eq!(independent["root_hex"], hex::encode(checkpoint.root));
        let ed25519_verifier = NoteVerifier::new(&key.origin, KeyKind::Ed25519, &[9u8; 32]);
        assert!(ed25519_verifier.map_or(true, |v| v.open_checkpoint(&checkpoint.note).is_err()));
        drop(app);

        // Same store and token, other algorithm or origin: refused to start.
        for change in [
            |c: &mut custos::config::Config| c.audit.key_kind = KeyKind::Ed25519,
            |c: &mut custos::config::Config| c.audit.origin = "custos.local/elsewhere".into(),
        ] {
            let mut changed = config.clone();
            change(&mut changed);
            let err = custos::server::App::open(&changed).await.unwrap_err();
            assert!(err.to_string().contains("log key"), "{err}");
        }
        let app = custos::server::App::open(&config).await.unwrap();
        assert_eq!(
            app.checkpointer.key().public_key,
            key.public_key,
            "the same key on restart"
        );
        drop(app);

        // Another key planted under the log key's CKA_ID: refused to start.
        {
            let pkcs11 = cryptoki::context::Pkcs11::new(support::module_path()).unwrap();
            pkcs11
                .initialize(cryptoki::context::CInitializeArgs::new(
                    cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
                ))
                .ok();
            let session = pkcs11
                .open_rw_session(support::slot_with_label(&pkcs11, support::TEST_TOKEN_LABEL))
                .unwrap();
            session
                .login(
                    cryptoki::session::UserType::User,
                    Some(&cryptoki::types::AuthPin::new(support::TEST_USER_PIN.into())),
                )
                .unwrap();
            for object in session
                .find_objects(&[cryptoki::object::Attribute::Id(key.key_id.clone())])
                .unwrap()
            {
                session.destroy_object(object).unwrap();
            }
            support::plant_key_pair(&session, &key.key_id, b"planted", false);
        }
        let err = custos::server::App::open(&config).await.unwrap_err();
        assert!(err.to_string().contains("audit log"), "{err}");
    });
}

fn export(server: &DevServer, dir: &Path) {
    let out = cli(server, &["audit", "export", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn verify_dir(key: &str, dir: &Path, previous: Option<&Path>) -> VerifyReport {
    let mut verifier = LogVerifier::new(NoteVerifier::parse(key).unwrap(), Some("custos-dev"));
    verify::read_export(dir, &mut verifier, |_| {}).unwrap();
    if let Some(previous) = previous {
        verifier.check_previous("previous", &std::fs::read_to_string(previous).unwrap());
    }
    verifier.finish()
}

/// The lowest entry any failure or replay finding names.
fn first_entry(report: &VerifyReport) -> Option<u64> {
    report
        .failures
        .iter()
        .filter_map(|f| f.entry)
        .chain(report.replay.findings.iter().map(|f| f.index))
        .min()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("checkpoints")).unwrap();
    for name in ["entries", "leaves"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    for e in std::fs::read_dir(from.join("checkpoints")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join("checkpoints").join(e.file_name())).unwrap();
    }
}

/// Frames of the export's `entries` file: (start offset, end offset).
fn frames(entries: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < entries.len() {
        let len = u32::from_be_bytes(entries[at..at + 4].try_into().unwrap()) as usize;
        out.push((at, at + 4 + len));
        at += 4 + len;
    }
    out
}

fn write_frames(dir: &Path, entries: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for e in entries {
        verify::write_frame(&mut bytes, e);
    }
    std::fs::write(dir.join("entries"), bytes).unwrap();
}

/// An export of a real story verifies, through the library and the CLI (text
/// and JSON). Then every tampering is detected and placed: 1,000 random
/// single-byte flips anywhere in the export, entry deletion, duplication and
/// reordering, truncation, and a checkpoint swapped for another log's.
#[test]
fn export_verifies_and_every_tampering_is_detected_at_its_entry() {
    support::runtime().block_on(async {
        let dev = Dev::start().await;
        let key = verifier_key(&dev.server);
        story(&dev).await;
        let mut audit = audit_client(dev.server.channel_as("auditor").await);
        let size = log_size(&mut audit).await;
        checkpoint_covering(&mut audit, size).await;
        let temp = tempfile::tempdir().unwrap();
        let clean = temp.path().join("clean");
        export(&dev.server, &clean);

        let report = verify_dir(&key, &clean, None);
        assert!(report.ok(), "{report:#?}");
        assert_eq!(report.entries, size);
        assert!(
            report.replay.signatures >= 3 && report.replay.votes >= 2,
            "{report:#?}"
        );
        let out = cli(
            &dev.server,
            &["audit", "verify", "--key", &key, "--dir", clean.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("all {size} entries verified")));
        let live = cli(&dev.server, &["--json", "audit", "verify", "--key", &key]);
        assert!(live.status.success(), "{}", String::from_utf8_lossy(&live.stdout));
        let json: serde_json::Value = serde_json::from_slice(&live.stdout).unwrap();
        assert_eq!(json["entries"], size);

        let entries = std::fs::read(clean.join("entries")).unwrap();
        let leaves = std::fs::read(clean.join("leaves")).unwrap();
        let frames = frames(&entries);
        let notes: Vec<PathBuf> = std::fs::read_dir(clean.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let note_bytes: Vec<Vec<u8>> = notes.iter().map(|p| std::fs::read(p).unwrap()).collect();
        let total = entries.len() + leaves.len() + note_bytes.iter().map(Vec::len).sum::<usize>();

        // 1,000 single-byte flips, positions and masks from a fixed-seed LCG.
        let work = temp.path().join("work");
        let mut state: u64 = 0x5eed_1234_abcd_0001;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut counts = [0usize; 3];
        for flip in 0..1000 {
            let _ = std::fs::remove_dir_all(&work);
            copy_dir(&clean, &work);
            let position = (next() as usize) % total;
            let mask = (next() % 255 + 1) as u8;
            let expected_entry = if position < entries.len() {
                counts[0] += 1;
                let mut bytes = entries.clone();
                bytes[position] ^= mask;
                std::fs::write(work.join("entries"), bytes).unwrap();
                Some(
                    frames
                        .iter()
                        .position(|(s, e)| (*s..*e).contains(&position))
                        .unwrap() as u64,
                )
            } else if position < entries.len() + leaves.len() {
                counts[1] += 1;
                let offset = position - entries.len();
                let mut bytes = leaves.clone();
                bytes[offset] ^= mask;
                std::fs::write(work.join("leaves"), bytes).unwrap();
                Some((offset / 32) as u64)
            } else {
                counts[2] += 1;
                let mut offset = position - entries.len() - leaves.len();
                let which = note_bytes
                    .iter()
                    .position(|n| {
                        if offset < n.len() {
                            true
                        } else {
                            offset -= n.len();
                            false
                        }
                    })
                    .unwrap();
                let mut bytes = note_bytes[which].clone();
                bytes[offset] ^= mask;
                std::fs::write(
                    work.join("checkpoints").join(notes[which].file_name().unwrap()),
                    bytes,
                )
                .unwrap();
                None
            };
            let report = verify_dir(&key, &work, None);
            assert!(
                !report.ok(),
                "flip {flip} at byte {position} (mask {mask:#04x}) went undetected"
            );
            match expected_entry {
                Some(entry) => assert_eq!(
                    first_entry(&report),
                    Some(entry),
                    "flip {flip} at byte {position}: placed wrongly: {:#?}",
                    report.failures
                ),
                None => assert!(
                    report.failures.iter().any(|f| f.code == "checkpoint_signature"),
                    "flip {flip} in a checkpoint: {:#?}",
                    report.failures
                ),
            }
        }
        assert!(
            counts.iter().all(|c| *c > 0),
            "flips covered every file: {counts:?}"
        );

        let originals: Vec<Vec<u8>> = frames.iter().map(|(s, e)| entries[s + 4..*e].to_vec()).collect();
        let middle = originals.len() / 2;
        let edits: Vec<(&str, Vec<Vec<u8>>, u64)> = vec![
            (
                "deletion",
                [&originals[..middle], &originals[middle + 1..]].concat(),
                middle as u64,
            ),
            (
                "duplication",
                [&originals[..=middle], &originals[middle..]].concat(),
                middle as u64 + 1,
            ),
            (
                "reordering",
                {
                    let mut v = originals.clone();
                    v.swap(middle, middle + 1);
                    v
                },
                middle as u64,
            ),
            ("truncation", originals[..middle].to_vec(), middle as u64),
        ];
        for (what, edited, at) in edits {
            let _ = std::fs::remove_dir_all(&work);
            copy_dir(&clean, &work);
            write_frames(&work, &edited);
            let report = verify_dir(&key, &work, None);
            assert!(!report.ok(), "{what} went undetected");
            assert_eq!(first_entry(&report), Some(at), "{what}: {:#?}", report.failures);
            let out = cli(
                &dev.server,
                &["audit", "verify", "--key", &key, "--dir", work.to_str().unwrap()],
            );
            assert!(!out.status.success(), "{what}: the CLI exited 0");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&format!("FAIL entry {at}")),
                "{what}"
            );
        }

        // A checkpoint from another log (another HSM key, same origin name).
        let other = Dev::start().await;
        let mut other_audit = audit_client(other.server.channel_as("auditor").await);
        let foreign = checkpoint_covering(&mut other_audit, 1).await;
        let _ = std::fs::remove_dir_all(&work);
        copy_dir(&clean, &work);
        for note in &notes {
            std::fs::write(
                work.join("checkpoints").join(note.file_name().unwrap()),
                &foreign.note,
            )
            .unwrap();
        }
        let report = verify_dir(&key, &work, None);
        assert!(
            report.failures.iter().any(|f| f.code == "checkpoint_signature"),
            "{:#?}",
            report.failures
        );
        assert!(report.failures.iter().any(|f| f.code == "no_checkpoint"));
    });
}

/// An attacker with write access to the database rewrites the newest entry.
/// custosd refuses to sign a tree that contradicts the checkpoint it holds;
/// once the attacker deletes the checkpoints too, it signs the rewritten tree. The export of the rewritten log
/// verifies on its own (the HSM signed it), but an auditor or witness holding
/// the earlier checkpoint of the same size sees a fork and refuses, from an
/// export or from the live server.
#[test]
fn a_rewritten_history_is_a_fork_to_anyone_holding_an_older_checkpoint() {
    support::runtime().block_on(async {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("dev");
        let server = DevServer::start_in(&data_dir, &[]);
        let key = verifier_key(&server);
        let dev = Dev::on(server).await;
        story(&dev).await;
        let mut audit = audit_client(dev.server.channel_as("auditor").await);
        let size = log_size(&mut audit).await;
        let witnessed = checkpoint_covering(&mut audit, size).await;
        assert_eq!(witnessed.tree_size, size);
        let kept = temp.path().join("witnessed.note");
        std::fs::write(&kept, &witnessed.note).unwrap();
        let store = dev.server.path("store");
        let mut server = dev.server;
        assert!(server.stop().success());

        rewrite_last_entry(&store, size);

        // With the checkpoint still stored, custosd refuses to sign the
        // rewritten tree, even once it has grown.
        let mut server = DevServer::start_in(&data_dir, &[]);
        let dev = Dev::on(server).await;
        dev.create("after-rewrite", EXCHANGE, ETHER / 10, 4, "ops")
            .await
            .unwrap();
        let mut audit = audit_client(dev.server.channel_as("auditor").await);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let latest = audit
            .get_checkpoint(proto::GetCheckpointRequest { tree_size: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            latest.tree_size, size,
            "custosd signed a tree that contradicts its checkpoint"
        );
        assert!(
            dev.server.stderr().contains("contradicts a signed checkpoint"),
            "{}",
            dev.server.stderr()
        );
        server = dev.server;
        assert!(server.stop().success());

        // The attacker deletes the checkpoints too: now custosd signs.
        {
            let db = rusqlite::Connection::open(&store).unwrap();
            db.execute_batch("DROP TRIGGER checkpoints_no_delete; DELETE FROM checkpoints;")
                .unwrap();
        }
        let server = DevServer::start_in(&data_dir, &[]);
        let mut audit = audit_client(server.channel_as("auditor").await);
        let forged = checkpoint_covering(&mut audit, size + 1).await;
        assert!(forged.tree_size > size);
        let dir = temp.path().join("forged");
        export(&server, &dir);
        let alone = verify_dir(&key, &dir, None);
        assert!(
            alone.failures.is_empty(),
            "alone, the rewritten log verifies: {:#?}",
            alone.failures
        );
        let report = verify_dir(&key, &dir, Some(&kept));
        assert!(
            report.failures.iter().any(|f| f.code == "fork"),
            "{:#?}",
            report.failures
        );
        for args in [
            vec![
                "audit",
                "verify",
                "--key",
                &key,
                "--dir",
                dir.to_str().unwrap(),
                "--previous-checkpoint",
                kept.to_str().unwrap(),
            ],
            vec![
                "audit",
                "verify",
                "--key",
                &key,
                "--previous-checkpoint",
                kept.to_str().unwrap(),
            ],
        ] {
            let out = cli(&server, &args);
            assert!(!out.status.success(), "the CLI accepted a fork: {args:?}");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                said.contains("fork") || said.contains("consistency proof"),
                "{said}"
            );
        }
    });
}

/// Rewrites the last of `size` entries (its time moves by a second), as an
/// attacker with write access to the database would: the triggers dropped,
/// the entry and every stored subtree containing it replaced.
fn rewrite_last_entry(store: &Path, size: u64) {
    let db = rusqlite::Connection::open(store).unwrap();
    db.execute_batch("DROP TRIGGER audit_log_no_delete; DROP TRIGGER merkle_nodes_no_delete;")
        .unwrap();
    let last = size - 1;
    let bytes = custos::store::audit::entries(custos::store::sql::Conn::from(&db), last, size)
        .unwrap()
        .remove(0);
    let mut entry = custos_core::audit::entry::Entry::decode(&bytes).unwrap();
    entry.time += 1;
    let tx = db.unchecked_transaction().unwrap();
    tx.execute("DELETE FROM audit_log WHERE idx = ?1", [last as i64])
        .unwrap();
    for level in 0..64u32 {
        let index = last >> level;
        if (index + 1) << level <= size {
            tx.execute(
                "DELETE FROM merkle_nodes WHERE level = ?1 AND idx = ?2",
                [level as i64, index as i64],
            )
            .unwrap();
        }
    }
    custos::store::audit::append(custos::store::sql::Conn::from(&*tx), entry.time, entry.event).unwrap();
    tx.commit().unwrap();
}
