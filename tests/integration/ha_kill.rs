//! `kill -9` across instances: three real `custosd --dev` processes on one
//! PostgreSQL database and one SoftHSM token, under load from clients that
//! fail over, while random instances are killed and restarted.
//!
//! Twelve clients each send their share of the run's withdrawals (2,000 by
//! default, `CUSTOS_HA_WITHDRAWALS`), each to an instance of their choosing.
//! A call that fails (the instance died under it, or answers UNAVAILABLE)
//! is retried with the same request id on another instance, as a backend
//! behind a load balancer would, until one acknowledges it. Meanwhile a
//! killer SIGKILLs a random instance every 50 to 250 ms of its life and
//! starts it again on the same data directory, at least 100 times
//! (`CUSTOS_HA_KILLS`), and for as long as the clients run. The seed is
//! printed; `CUSTOS_HA_SEED` replays the choices (where a kill lands inside
//! a server also depends on scheduling).
//!
//! The policy's hourly count cap is the run's size less 50, so it binds. At
//! the end, with every instance running again:
//! - nothing acknowledged is lost: every request id, retried on a random
//!   instance, returns the withdrawal first acknowledged, in a final state,
//!   with the signed bytes first acknowledged if it was acknowledged signed;
//! - limits are exact: exactly the cap is signed and the rest are denied
//!   `rolling_count_limit`;
//! - nothing is signed twice: the one log (AuditService ListEntries) holds
//!   one `signed` entry per signed withdrawal and none for another, each
//!   equal to the stored transaction;
//! - `custos audit verify` checks every entry and replays every decision.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::RwLock;
use tonic::transport::Channel;

use crate::crash::Rng;
use crate::support::{self, DevServer};
use custos::dev::{DEV_ALLOWLISTED, transfer_request};
use custos::proto::withdrawal_service_client::WithdrawalServiceClient;
use custos::proto::{self, WithdrawalState};
use custos_core::audit::entry::Event;

const INSTANCES: usize = 3;
const CLIENTS: usize = 12;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

/// What a client was told first about one request id.
#[derive(Debug, Clone)]
struct Ack {
    name: String,
    state: WithdrawalState,
    signed: Option<Vec<u8>>,
}

/// The instances as clients see them: a channel to each one's current life.
type Channels = Arc<RwLock<Vec<Channel>>>;

/// Sends `request` to instances from `first` on until one answers it;
/// failures of a dying or disconnected instance are retried on the next.
async fn acknowledged(
    channels: &Channels,
    first: usize,
    request: &proto::CreateWithdrawalRequest,
    retries: &AtomicUsize,
) -> proto::Withdrawal {
    let deadline = Instant::now() + Duration::from_secs(120);
    for attempt in 0.. {
        let channel = channels.read().await[(first + attempt) % INSTANCES].clone();
        let mut client = WithdrawalServiceClient::new(channel);
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(Duration::from_secs(30));
        match client.create_withdrawal(call).await {
            Ok(w) => return w.into_inner(),
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ),
                    "{}: a failure that is not the instance going away: {status:?}",
                    request.request_id
                );
                assert!(
                    Instant::now() < deadline,
                    "{} unanswered for 120 s",
                    request.request_id
                );
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    unreachable!()
}

fn request(id: usize) -> proto::CreateWithdrawalRequest {
    let nonce = u64::try_from(id).unwrap();
    transfer_request(
        &format!("kill-{id}"),
        DEV_ALLOWLISTED,
        1_000 + u128::from(nonce),
        nonce,
        "ops",
    )
}

#[test]
fn kill_9_of_random_instances_loses_nothing_and_signs_once() {
    let seed = env_or(
        "CUSTOS_HA_SEED",
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(),
    );
    let total = env_or("CUSTOS_HA_WITHDRAWALS", 2000) as usize;
    let min_kills = env_or("CUSTOS_HA_KILLS", 100) as usize;
    let cap = total - 50;
    println!("ha kill test: seed {seed} (CUSTOS_HA_SEED={seed} replays it)");

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("dev");
    let env = support::postgres_store_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let first = DevServer::start_in(&dir, &env);
    let rt = support::runtime();
    rt.block_on(async {
        let dev_policy = std::fs::read_to_string(dir.join("policy.toml")).unwrap();
        let document = dev_policy.replacen("version = 1", "version = 2", 1).replacen(
            "count = 1000",
            &format!("count = {cap}"),
            1,
        );
        assert_ne!(document, dev_policy);
        support::activate_policy_document(&first, document).await;
    });
    let mut servers: Vec<Option<DevServer>> = vec![Some(first)];
    for i in 1..INSTANCES {
        servers.push(Some(DevServer::start_instance(&dir, &format!("i{i}"), &[])));
    }

    let started = Instant::now();
    let (acks, kills, retries, servers) = rt.block_on(async {
        let mut channels = Vec::new();
        for server in servers.iter().flatten() {
            channels.push(server.channel_as("backend").await);
        }
        let channels: Channels = Arc::new(RwLock::new(channels));
        let retries = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (channels, retries, next) =
                    (Arc::clone(&channels), Arc::clone(&retries), Arc::clone(&next));
                let mut rng = Rng(seed ^ (c as u64 + 1).wrapping_mul(0x51_7cc1_b727_220a));
                tokio::spawn(async move {
                    let mut acks = Vec::new();
                    loop {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        if id >= total {
                            return acks;
                        }
                        let first = rng.below(INSTANCES as u64) as usize;
                        let w = acknowledged(&channels, first, &request(id), &retries).await;
                        acks.push((
                            id,
                            Ack {
                                name: w.name.clone(),
                                state: w.state(),
                                signed: w.signed_transaction.map(|t| t.raw),
                            },
                        ));
                        tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
                    }
                })
            })
            .collect();
        let killer = {
            let (channels, done) = (Arc::clone(&channels), Arc::clone(&done));
            let dir = dir.clone();
            let mut rng = Rng(seed);
            tokio::spawn(async move {
                let mut kills = 0;
                while kills < min_kills || !done.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50 + rng.below(200))).await;
                    let victim = rng.below(INSTANCES as u64) as usize;
                    let mut server = servers[victim].take().unwrap();
                    server.child.kill().unwrap();
                    server.child.wait().unwrap();
                    drop(server);
                    kills += 1;
                    let (dir, name) = (dir.clone(), format!("i{victim}"));
                    let restarted =
                        tokio::task::spawn_blocking(move || DevServer::start_instance(&dir, &name, &[]))
                            .await
                            .unwrap();
                    channels.write().await[victim] = restarted.channel_as("backend").await;
                    servers[victim] = Some(restarted);
                }
                (kills, servers)
            })
        };
        let mut acks: HashMap<usize, Ack> = HashMap::new();
        for client in clients {
            acks.extend(client.await.unwrap());
        }
        done.store(true, Ordering::Relaxed);
        let (kills, servers) = killer.await.unwrap();
        let servers: Vec<DevServer> = servers.into_iter().flatten().collect();
        (acks, kills, retries.load(Ordering::Relaxed), servers)
    });
    println!(
        "ha kill test: {total} withdrawals, {kills} kills, {retries} failed-over calls in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(acks.len(), total);
    assert!(kills >= min_kills);
    assert!(retries > 0, "no call met a kill");
    check_after(servers, temp.path(), &acks, cap, total);
}

/// The checks once the killing stopped, on the instances it left running.
fn check_after(
    mut servers: Vec<DevServer>,
    temp: &Path,
    acks: &HashMap<usize, Ack>,
    cap: usize,
    total: usize,
) {
    assert_eq!(servers.len(), INSTANCES);
    let rt = support::runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for server in &servers {
            clients.push(WithdrawalServiceClient::new(server.channel_as("backend").await));
        }
        // Withdrawals a kill left APPROVED are signed by some instance's sweep.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut signed = Vec::new();
        loop {
            let approved = support::all_withdrawals(&mut clients[0], WithdrawalState::Approved).await;
            if approved.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still APPROVED after 60 s",
                approved.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut denied = 0;
        let mut rng = Rng(total as u64);
        for id in 0..total {
            let ack = &acks[&id];
            let client = &mut clients[rng.below(INSTANCES as u64) as usize];
            let w = client.create_withdrawal(request(id)).await.unwrap().into_inner();
            assert_eq!(w.name, ack.name, "kill-{id} is two withdrawals");
            match w.state() {
                WithdrawalState::Signed => {
                    let raw = w.signed_transaction.unwrap().raw;
                    if let Some(first) = &ack.signed {
                        assert_eq!(&raw, first, "kill-{id} has other signed bytes than it was given");
                    }
                    signed.push((w.name.trim_start_matches("withdrawals/").to_owned(), raw));
                }
                WithdrawalState::Denied => {
                    assert!(ack.signed.is_none());
                    assert_eq!(w.decision.unwrap().reason_code, "rolling_count_limit");
                    denied += 1;
                }
                other => panic!("kill-{id} ended {other:?} (first acknowledged {:?})", ack.state),
            }
        }
        assert_eq!(signed.len(), cap, "the count cap is not exact");
        assert_eq!(denied, total - cap);

        let mut logged: HashMap<String, Vec<u8>> = HashMap::new();
        for e in support::log_entries(&servers[0]).await {
            if let Event::Signed {
                withdrawal_id,
                signed_tx,
                ..
            } = e.event
            {
                let again = logged.insert(withdrawal_id.clone(), signed_tx);
                assert!(again.is_none(), "{withdrawal_id} has two signed entries");
            }
        }
        assert_eq!(logged.len(), signed.len());
        for (id, raw) in &signed {
            assert_eq!(
                logged.get(id),
                Some(raw),
                "{id}'s signed entry is not its transaction"
            );
        }
    });
    // Clean stops sign last checkpoints over everything.
    let last = servers.pop().unwrap();
    for mut server in servers {
        assert!(server.stop().success());
    }
    let report = support::export_and_verify(&last, &temp.join("export"));
    assert_eq!(
        report["replay"]["signatures"].as_u64(),
        Some(cap as u64),
        "{report}"
    );
}
