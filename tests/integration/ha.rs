//! Several `custosd` instances on one PostgreSQL database, as an exchange
//! runs them behind a load balancer: every instance is a real `custosd
//! --dev` process on the same SoftHSM token and the same store, and each
//! test spreads its calls over them.
//!
//! What must hold (DESIGN.md invariant 7): a rolling limit is exact whichever
//! instance decides, one request id is one withdrawal whichever instance
//! takes each retry, and one instance at a time signs a withdrawal, with a
//! dead instance's work taken over by the others.
//!
//! These tests need the suite's PostgreSQL (`scripts/test.sh` starts it and
//! sets `CUSTOS_TEST_POSTGRES_URL`).

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::support::{self, DevServer};
use custos::dev::{DEV_ALLOWLISTED, transfer_request};
use custos::proto::withdrawal_service_client::WithdrawalServiceClient;
use custos::proto::{self, WithdrawalState};

const ETHER: u128 = 1_000_000_000_000_000_000;

/// The first instance on `dir`, which sets up the dev token, config and
/// store (on PostgreSQL), with `extra` in its environment.
fn first_instance(dir: &Path, extra: &[(&str, &str)]) -> DevServer {
    let env = support::postgres_store_env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    let server = DevServer::start_in(dir, &all);
    let config = std::fs::read_to_string(dir.join("custosd.toml")).unwrap();
    assert!(
        config.contains("url = \"postgres://"),
        "the dev store is not on PostgreSQL:\n{config}"
    );
    server
}

async fn withdrawals(server: &DevServer) -> WithdrawalServiceClient<Channel> {
    WithdrawalServiceClient::new(server.channel_as("backend").await)
}

/// Polls `server` until withdrawal `name` is in `state`, for up to `limit`.
async fn await_state(
    server: &DevServer,
    name: &str,
    state: WithdrawalState,
    limit: Duration,
) -> proto::Withdrawal {
    let mut client = withdrawals(server).await;
    let deadline = Instant::now() + limit;
    loop {
        let w = client
            .get_withdrawal(proto::GetWithdrawalRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        if w.state() == state {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {:?}, not {state:?}, after {limit:?}",
            w.state()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three instances: 100 concurrent calls with one request id make one
/// withdrawal and get one answer, and 150 concurrent withdrawals against a
/// rolling count cap of 40 sign exactly the 39 the cap has left, whichever
/// instance decides each. Replaying the log offline agrees.
#[test]
fn three_instances_keep_one_request_id_and_one_limit() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("dev");
    let a = first_instance(&dir, &[]);
    let b = DevServer::start_instance(&dir, "b", &[]);
    let c = DevServer::start_instance(&dir, "c", &[]);
    let rt = support::runtime();
    rt.block_on(async {
        // A count cap the run must hit, activated on one instance while the
        // others are already running.
        let dev_policy = std::fs::read_to_string(dir.join("policy.toml")).unwrap();
        let document =
            dev_policy
                .replacen("version = 1", "version = 2", 1)
                .replacen("count = 1000", "count = 40", 1);
        assert_ne!(document, dev_policy);
        support::activate_policy_document(&a, document).await;

        let servers = [&a, &b, &c];
        let mut clients = Vec::new();
        for server in servers {
            clients.push(withdrawals(server).await);
        }

        // One request id, 100 calls at once, spread over the instances.
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let mut client = clients[i % 3].clone();
                tokio::spawn(async move {
                    client
                        .create_withdrawal(transfer_request(
                            "ha-same",
                            DEV_ALLOWLISTED,
                            ETHER / 100,
                            0,
                            "ops",
                        ))
                        .await
                        .map(|r| r.into_inner())
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap().expect("a retry of one request id succeeds"));
        }
        let first = &answers[0];
        assert_eq!(first.state(), WithdrawalState::Signed, "{first:?}");
        for answer in &answers {
            assert_eq!(answer.name, first.name, "one request id made two withdrawals");
            assert_eq!(answer.state(), first.state());
            assert_eq!(answer.signed_transaction, first.signed_transaction);
        }

        // 150 withdrawals at once against the 39 the cap has left.
        let calls: Vec<_> = (0..150u64)
            .map(|i| {
                let mut client = clients[i as usize % 3].clone();
                tokio::spawn(async move {
                    client
                        .create_withdrawal(transfer_request(
                            &format!("ha-{i}"),
                            DEV_ALLOWLISTED,
                            ETHER / 100,
                            i + 1,
                            "ops",
                        ))
                        .await
                        .map(|r| r.into_inner())
                })
            })
            .collect();
        let (mut signed, mut denied) = (0, 0);
        for call in calls {
            let w = call.await.unwrap().expect("create_withdrawal");
            match w.state() {
                WithdrawalState::Signed => signed += 1,
                WithdrawalState::Denied => {
                    let decision = w.decision.as_ref().unwrap();
                    assert_eq!(decision.reason_code, "rolling_count_limit", "{w:?}");
                    denied += 1;
                }
                other => panic!("{} is {other:?}", w.name),
            }
        }
        assert_eq!(
            (signed, denied),
            (39, 111),
            "the cap of 40 did not hold across instances"
        );

        // Every instance lists the same 40 signed withdrawals.
        for client in &mut clients {
            let listed = support::all_withdrawals(client, WithdrawalState::Signed).await;
            assert_eq!(listed.len(), 40);
        }
    });
    // Stopping signs a final checkpoint over everything written.
    let (mut b, mut c) = (b, c);
    assert!(b.stop().success());
    assert!(c.stop().success());
    let report = support::export_and_verify(&a, &temp.path().join("export"));
    assert_eq!(report["replay"]["signatures"].as_u64(), Some(40), "{report}");
    assert_eq!(report["replay"]["withdrawals"].as_u64(), Some(151), "{report}");
}

/// The signing lease: while one instance is between the HSM's signature and
/// its SIGNED commit, the other instance's sweep leaves the withdrawal
/// alone; once that instance is killed (`kill -9`), the other takes the
/// lease over and signs it, once.
#[test]
fn a_signing_lease_keeps_others_off_and_dies_with_its_owner() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("dev");
    let pause = temp.path().join("pause");
    std::fs::write(&pause, b"").unwrap();
    let pause_env = pause.display().to_string();
    let mut a = first_instance(
        &dir,
        &[
            ("CUSTOS_PAUSE_AT", "after-sign-before-commit"),
            ("CUSTOS_PAUSE_FILE", pause_env.as_str()),
        ],
    );
    let b = DevServer::start_instance(&dir, "b", &[]);
    let rt = support::runtime();
    rt.block_on(async {
        let mut on_a = withdrawals(&a).await;
        let held = tokio::spawn(async move {
            on_a.create_withdrawal(transfer_request(
                "lease-1",
                DEV_ALLOWLISTED,
                ETHER / 100,
                0,
                "ops",
            ))
            .await
        });
        let reached = temp.path().join("pause.reached");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reached.exists() {
            assert!(Instant::now() < deadline, "instance a never reached the pause");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A is holding a signature it has not committed. B's sweep runs
        // every second; for three of them it must find the lease held.
        let mut on_b = withdrawals(&b).await;
        let listed = support::all_withdrawals(&mut on_b, WithdrawalState::Approved).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let name = listed[0].name.clone();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let w = on_b
            .get_withdrawal(proto::GetWithdrawalRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            w.state(),
            WithdrawalState::Approved,
            "another instance signed a withdrawal whose lease instance a held"
        );

        // kill -9 A mid-signing: its presence lock goes with its connection,
        // and B signs the withdrawal.
        a.child.kill().unwrap();
        a.child.wait().unwrap();
        assert!(held.await.unwrap().is_err(), "a killed instance answered");
        let signed = await_state(&b, &name, WithdrawalState::Signed, Duration::from_secs(20)).await;
        assert!(signed.signed_transaction.is_some());
    });
    let mut b = b;
    // B's final checkpoint covers the log; a fresh instance serves the export.
    assert!(b.stop().success());
    let c = DevServer::start_instance(&dir, "c", &[]);
    let report = support::export_and_verify(&c, &temp.path().join("export"));
    assert_eq!(report["replay"]["signatures"].as_u64(), Some(1), "{report}");
}

const ADOPT: &str = "ha::instances_started_together_adopt_one_log_key";

/// Instances that start together on an empty database each generate an
/// audit log key in the shared token; one is recorded, and the others
/// destroy theirs and use it: every instance verifies under one key, and
/// the token holds one log key pair.
#[test]
fn instances_started_together_adopt_one_log_key() {
    use std::sync::Arc;

    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    use custos::checkpoints::{Checkpointer, LOG_KEY_LABEL};
    use custos::store::Store;

    if !support::is_child(ADOPT) {
        let hsm_dir = support::SoftHsmDir::new();
        support::run_child(ADOPT, &hsm_dir.env());
        return;
    }
    let dir = support::child_dir();
    let config = support::init_test_token(&dir);
    let pg = support::fresh_postgres_database();
    let stores: Vec<Arc<Store>> = (0..3)
        .map(|_| Arc::new(Store::open_postgres(&pg).unwrap()))
        .collect();
    support::runtime().block_on(async {
        let pin = custos::secret::Pin::load(&config.hsm.pin).unwrap();
        let hsm = custos::hsm::Hsm::open(&config.hsm, pin).await.unwrap();
        let open = |i: usize| Checkpointer::open(hsm.clone(), Arc::clone(&stores[i]), &config.audit);
        let (a, b, c) = tokio::join!(open(0), open(1), open(2));
        let keys: Vec<String> = [a, b, c]
            .into_iter()
            .map(|opened| opened.expect("every instance starts").verifier().encode())
            .collect();
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    });

    let pkcs11 = Pkcs11::new(support::module_path()).unwrap();
    // custosd's own context may still be initialized in this process.
    let _ = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let session = pkcs11
        .open_ro_session(support::slot_with_label(&pkcs11, support::TEST_TOKEN_LABEL))
        .unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new(support::TEST_USER_PIN.into())))
        .unwrap();
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let log_keys = session
            .find_objects(&[Attribute::Class(class)])
            .unwrap()
            .into_iter()
            .filter(|object| {
                session
                    .get_attributes(*object, &[AttributeType::Label])
                    .unwrap()
                    .iter()
                    .any(|a| matches!(a, Attribute::Label(l) if l.starts_with(LOG_KEY_LABEL.as_bytes())))
            })
            .count();
        assert_eq!(log_keys, 1, "log key objects of class {class:?} on the token");
    }
}

/// `custos store migrate` moves a single-node SQLite store to PostgreSQL:
/// the copy has the SQLite log's signed root, a custosd on it signs on from
/// there, and `custos audit verify` checks every entry and checkpoint, old
/// and new, as one log. A second migrate into the now full database is
/// refused and changes nothing.
#[test]
fn a_sqlite_store_moves_to_postgres_with_its_log() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("dev");
    let rt = support::runtime();
    let mut sqlite = DevServer::start_in(&dir, &[]);
    let config = std::fs::read_to_string(dir.join("custosd.toml")).unwrap();
    let store_line = config
        .lines()
        .find(|l| l.starts_with("path = ") && l.ends_with(".db\""))
        .unwrap_or_else(|| panic!("the dev store is not SQLite:\n{config}"))
        .to_owned();
    let db: std::path::PathBuf = store_line["path = ".len()..].trim_matches('"').into();
    rt.block_on(async {
        let mut client = withdrawals(&sqlite).await;
        for i in 0..5 {
            sign_one(&mut client, &format!("mig-{i}"), ETHER / 100).await;
        }
    });
    // A clean stop signs a last checkpoint over the whole log.
    assert!(sqlite.stop().success());

    let pg = support::fresh_postgres_database();
    let migrate = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
        command
            .args(["--json", "store", "migrate", "--from"])
            .arg(&db)
            .args(["--to", &pg.url]);
        if let Some(file) = &pg.password_file {
            command.arg("--to-password-file").arg(file);
        }
        support::output_within(command, Duration::from_secs(120))
    };
    let out = migrate();
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let size = report["log_size"].as_u64().unwrap();
    let root = report["root"].as_str().unwrap().to_owned();
    assert_eq!(report["tables"]["withdrawals"], 5, "{report}");
    assert_eq!(report["checkpoint_size"].as_u64(), Some(size), "{report}");

    let again = migrate();
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("migrate needs an empty database"), "{stderr}");

    // The same data directory, now on PostgreSQL.
    let mut store = format!("url = {:?}", pg.url);
    if let Some(file) = &pg.password_file {
        store.push_str(&format!("\npassword_file = {:?}", file.display().to_string()));
    }
    std::fs::write(dir.join("custosd.toml"), config.replace(&store_line, &store)).unwrap();
    let server = DevServer::start_instance(&dir, "pg", &[]);
    let custos = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
        command.args(server.cli_args("auditor")).args(args);
        let out = support::output_within(command, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let copied = custos(&["--json", "audit", "checkpoint", "--size", &size.to_string()]);
    assert_eq!(copied["root_hash"], root.as_str(), "{copied}");
    rt.block_on(async {
        let mut client = withdrawals(&server).await;
        sign_one(&mut client, "mig-after", ETHER / 100).await;
        // A retry of a request id made on SQLite gets the SQLite answer.
        sign_one(&mut client, "mig-0", ETHER / 100).await;
        let signed = support::all_withdrawals(&mut client, WithdrawalState::Signed).await;
        assert_eq!(signed.len(), 6);
    });
    // The dev server signs a checkpoint every 2 s; wait for one over the new
    // entries, so the export covers them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while custos(&["--json", "audit", "checkpoint"])["tree_size"].as_u64() <= Some(size) {
        assert!(Instant::now() < deadline, "no checkpoint after the migrated log");
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = support::export_and_verify(&server, &temp.path().join("export"));
    assert!(report["entries"].as_u64().unwrap() > size, "{report}");
    assert_eq!(report["replay"]["signatures"], 6, "{report}");
}

/// Creates an auto-path withdrawal of `amount` wei under `request_id` and
/// checks that it is signed (a retry returns the stored one).
async fn sign_one(
    client: &mut WithdrawalServiceClient<Channel>,
    request_id: &str,
    amount: u128,
) -> proto::Withdrawal {
    let w = client
        .create_withdrawal(transfer_request(request_id, DEV_ALLOWLISTED, amount, 0, "ops"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.state(), WithdrawalState::Signed, "{w:?}");
    w
}

/// A PostgreSQL cluster of the test's own (scripts/pg.sh), which it may stop
/// and start without disturbing the suite's other tests; stopped on drop.
struct PrivateCluster {
    dir: std::path::PathBuf,
    url: String,
}

impl PrivateCluster {
    fn start(dir: &Path) -> Self {
        let out = Self::pg_sh("start", dir);
        Self {
            dir: dir.to_path_buf(),
            url: String::from_utf8(out).unwrap().trim().to_owned(),
        }
    }

    fn pg_sh(action: &str, dir: &Path) -> Vec<u8> {
        let mut command = std::process::Command::new("bash");
        command
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh"))
            .arg(action)
            .arg(dir);
        let out = support::output_within(command, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "pg.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The environment that puts a new dev data directory on this cluster.
    fn dev_env(&self) -> Vec<(String, String)> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        vec![
            ("CUSTOS_DEV_STORE_URL".into(), self.url.clone()),
            ("CUSTOS_DEV_STORE_PASSWORD_FILE".into(), file("password")),
            ("CUSTOS_DEV_STORE_CA_FILE".into(), file("ca.pem")),
        ]
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// PostgreSQL stopped and started again under load from two instances:
/// while it is down, health says NOT_SERVING and every call fails closed
/// with UNAVAILABLE; once it is back, health says SERVING with no restart
/// of custosd, every request id retried gets one signed withdrawal, and the
/// log verifies with one signature per withdrawal.
#[test]
fn a_postgres_restart_under_load_fails_closed_and_service_recovers() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let temp = tempfile::tempdir().unwrap();
    let cluster = PrivateCluster::start(&temp.path().join("pg"));
    let env = cluster.dev_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dir = temp.path().join("dev");
    let a = DevServer::start_in(&dir, &env);
    let b = DevServer::start_instance(&dir, "b", &[]);
    let rt = support::runtime();
    let outcomes = rt.block_on(async {
        let clients = [withdrawals(&a).await, withdrawals(&b).await];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let loaders: Vec<_> = (0..4)
            .map(|t| {
                let mut client = clients[t % 2].clone();
                let stop = std::sync::Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let request_id = format!("restart-{t}-{n}");
                        n += 1;
                        let answer = client
                            .create_withdrawal(transfer_request(
                                &request_id,
                                DEV_ALLOWLISTED,
                                1_000,
                                0,
                                "ops",
                            ))
                            .await;
                        let outcome = match answer {
                            Ok(w) => {
                                let w = w.into_inner();
                                assert_eq!(w.state(), WithdrawalState::Signed, "{w:?}");
                                Ok(w.signed_transaction)
                            }
                            Err(status) => {
                                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                                // Not a busy loop while the database is away.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                Err(status.message().to_owned())
                            }
                        };
                        outcomes.push((request_id, outcome));
                    }
                    outcomes
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Stops or starts the cluster, then waits for both instances' health.
        let flip = |action: &'static str, want: ServingStatus| {
            let dir = cluster.dir.clone();
            let servers = [&a, &b];
            async move {
                tokio::task::spawn_blocking(move || PrivateCluster::pg_sh(action, &dir))
                    .await
                    .unwrap();
                for server in servers {
                    support::await_health(server, want, Duration::from_secs(15)).await;
                }
            }
        };
        flip("stop", ServingStatus::NotServing).await;
        // Down: a call now fails closed, on either instance.
        for mut client in clients.clone() {
            let status = client
                .create_withdrawal(transfer_request("restart-down", DEV_ALLOWLISTED, 1_000, 0, "ops"))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        flip("start", ServingStatus::Serving).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for loader in loaders {
            outcomes.extend(loader.await.unwrap());
        }
        // Every request id once more, now that the database is back: one
        // signed withdrawal each, the same one a success already returned.
        let mut client = clients[1].clone();
        for (request_id, outcome) in &outcomes {
            let w = sign_one(&mut client, request_id, 1_000).await;
            if let Ok(signed) = outcome {
                assert_eq!(&w.signed_transaction, signed, "{request_id} signed twice");
            }
        }
        let down = sign_one(&mut client, "restart-down", 1_000).await;
        assert!(down.signed_transaction.is_some());
        let signed = support::all_withdrawals(&mut client, WithdrawalState::Signed).await;
        assert_eq!(signed.len(), outcomes.len() + 1);
        outcomes
    });
    let failed = outcomes.iter().filter(|(_, o)| o.is_err()).count();
    assert!(failed > 0, "no call met the outage");
    assert!(failed < outcomes.len(), "no call succeeded");
    eprintln!(
        "{} calls, {failed} failed closed during the outage",
        outcomes.len()
    );
    // A clean stop signs a last checkpoint over everything, which the
    // export then covers.
    let mut b = b;
    assert!(b.stop().success());
    let report = support::export_and_verify(&a, &temp.path().join("export"));
    assert_eq!(
        report["replay"]["signatures"].as_u64(),
        Some(outcomes.len() as u64 + 1),
        "{report}"
    );
}

/// A freeze committed on one instance while all three sign under load: no
/// `signed` entry follows the `frozen` entry in the one log, every instance
/// denies new withdrawals as frozen, and the replay is clean.
#[test]
fn a_freeze_on_one_instance_stops_signing_on_all() {
    use custos_core::audit::entry::Event;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("dev");
    let a = first_instance(&dir, &[]);
    let mut b = DevServer::start_instance(&dir, "b", &[]);
    let mut c = DevServer::start_instance(&dir, "c", &[]);
    let rt = support::runtime();
    let a = rt.block_on(async {
        let a = crate::withdrawals::Dev::on(a).await;
        let clients = [
            withdrawals(&a.server).await,
            withdrawals(&b).await,
            withdrawals(&c).await,
        ];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let loaders: Vec<_> = (0..6)
            .map(|t| {
                let mut client = clients[t % 3].clone();
                let stop = std::sync::Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut states = Vec::new();
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let w = client
                            .create_withdrawal(transfer_request(
                                &format!("freeze-{t}-{n}"),
                                DEV_ALLOWLISTED,
                                1_000,
                                0,
                                "ops",
                            ))
                            .await
                            .unwrap()
                            .into_inner();
                        n += 1;
                        states.push((
                            t % 3,
                            w.state(),
                            w.decision.map(|d| d.reason_code).unwrap_or_default(),
                        ));
                    }
                    states
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.freeze().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut states = Vec::new();
        for loader in loaders {
            states.extend(loader.await.unwrap());
        }
        for instance in 0..3 {
            let mine = || states.iter().filter(move |(i, _, _)| *i == instance);
            assert!(
                mine().any(|(_, s, _)| *s == WithdrawalState::Signed),
                "instance {instance} signed nothing before the freeze"
            );
            assert!(
                mine().any(|(_, s, reason)| *s == WithdrawalState::Denied && reason == "frozen"),
                "instance {instance} denied nothing as frozen: {:?}",
                mine().next_back()
            );
        }
        a
    });
    // Clean stops sign last checkpoints over everything.
    assert!(b.stop().success());
    assert!(c.stop().success());
    rt.block_on(async {
        let mut frozen_at = None;
        let mut signed_after = Vec::new();
        for e in support::log_entries(&a.server).await {
            match e.event {
                Event::Frozen { .. } => frozen_at = Some(e.index),
                Event::Signed { withdrawal_id, .. } if frozen_at.is_some() => {
                    signed_after.push(withdrawal_id)
                }
                _ => {}
            }
        }
        assert!(frozen_at.is_some(), "no frozen entry");
        assert!(
            signed_after.is_empty(),
            "signed after the freeze: {signed_after:?}"
        );
    });
    let report = support::export_and_verify(&a.server, &temp.path().join("export"));
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
}
