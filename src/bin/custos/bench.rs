//! `custos bench`: custos's cost next to the HSM's own, in one run.
//!
//! It starts a real `custosd --dev` on a fresh SoftHSM token and store, and
//! this process is the gRPC load generator. It measures:
//! - raw: `C_Sign` straight through cryptoki on the same token and key, with
//!   as many sessions as custosd's pool (in a child process, since SoftHSM
//!   reads `SOFTHSM2_CONF` once per process);
//! - the auto path: CreateWithdrawal to an allowlisted address, SIGNED in the
//!   reply, at each concurrency level;
//! - the quorum path: create, two approvals signed by the dev approvers'
//!   keys, SIGNED in the reply to the second;
//! - two floors under every withdrawal: a gRPC ping (health `Check` over the
//!   same mTLS connection and guard) and one durable SQLite commit;
//! - CPU per operation of custosd, the raw child and this process, so that
//!   custos's own cost can be set next to the token's.
//!
//! With `--store-url` the store is on PostgreSQL, and with `--instances N`
//! N custosd processes share it (and the token), the load is spread over
//! them round-robin, and custosd's CPU is summed over all of them.
//!
//! The dev policy's hourly count limit would stop a long run, so the bench
//! first activates version 2 of the dev policy with the limits raised, signed
//! by the dev admin key, through the normal governance path.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::{describe, emit};
use custos::clock::unix_now as now;
use custos::hsm::TokenSelector;
use custos::proto::{
    self, WithdrawalState, approval_service_client::ApprovalServiceClient,
    policy_service_client::PolicyServiceClient, wallet_service_client::WalletServiceClient,
    withdrawal_service_client::WithdrawalServiceClient,
};
use custos::secret::{Pin, PinSource};
use custos::signer::KeyFile;
use custos_core::approval::ApprovalMessage;
use custos_core::policy::Vote;

const ETHER: u128 = 1_000_000_000_000_000_000;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds measured per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrency levels of the auto path.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,64")]
    concurrency: Vec<usize>,
    /// Concurrency of the quorum path.
    #[arg(long, default_value_t = 16)]
    quorum_concurrency: usize,
    /// The PKCS#11 module (SoftHSMv2).
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    module: PathBuf,
    /// custosd to run (default: next to this binary).
    #[arg(long)]
    custosd: Option<PathBuf>,
    /// Keep the dev data directory instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Seed the store with about this many prior log entries (signed
    /// withdrawals, three entries each) before measuring, to show how
    /// history affects startup and throughput.
    #[arg(long, default_value_t = 0)]
    prior_entries: u64,
    /// Put the dev server's store on this PostgreSQL database
    /// (`postgres://user@host:port/database`) instead of a SQLite file.
    #[arg(long)]
    store_url: Option<String>,
    /// The file (mode 0600) holding that database's password.
    #[arg(long, requires = "store_url")]
    store_password_file: Option<PathBuf>,
    /// custosd instances sharing the store (and the token), with the load
    /// spread over them; more than one needs --store-url.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// The CA certificate (PEM) that signs that server's certificate: TLS.
    #[arg(long, requires = "store_url")]
    store_ca_file: Option<PathBuf>,
}

impl BenchArgs {
    /// The PostgreSQL settings `--store-url` names, if any.
    fn postgres(&self) -> Option<custos::store::postgres::PgSettings> {
        self.store_url
            .as_ref()
            .map(|url| custos::store::postgres::PgSettings {
                url: url.clone(),
                password_file: self.store_password_file.clone(),
                ca_file: self.store_ca_file.clone(),
                read_pool: 2,
            })
    }
}

/// The hidden child that measures raw `C_Sign` with `SOFTHSM2_CONF` set.
#[derive(Debug, Args)]
pub struct RawSignArgs {
    #[arg(long)]
    module: PathBuf,
    #[arg(long)]
    token_label: String,
    #[arg(long)]
    pin_file: PathBuf,
    #[arg(long)]
    key_label: String,
    #[arg(long)]
    sessions: usize,
    #[arg(long)]
    seconds: u64,
}

/// Throughput and latency of one phase.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Phase {
    name: String,
    concurrency: usize,
    completed: u64,
    errors: u64,
    seconds: f64,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// CPU (user + system, all threads) per completed operation, in µs: of
    /// custosd (SoftHSM runs inside it), or of the raw child for raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_cpu_us: Option<f64>,
    /// CPU per completed operation of this process, the load generator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generator_cpu_us: Option<f64>,
}

impl Phase {
    /// This phase with the CPU used since `start` divided among its operations.
    fn with_cpu(mut self, start: &CpuClock) -> Self {
        let done = self.completed.max(1) as f64;
        let now = CpuClock::now(&start.server);
        let per_op = |a: Option<f64>, b: Option<f64>| Some((b? - a?) * 1e6 / done);
        self.server_cpu_us = per_op(start.server_seconds, now.server_seconds);
        self.generator_cpu_us = per_op(start.generator_seconds, now.generator_seconds);
        self
    }
}

/// CPU used so far by the custosd instances (or whichever processes
/// `server` names), summed, and by this process.
struct CpuClock {
    server: Vec<u32>,
    server_seconds: Option<f64>,
    generator_seconds: Option<f64>,
}

impl CpuClock {
    fn now(server: &[u32]) -> Self {
        Self {
            server: server.to_vec(),
            server_seconds: server
                .iter()
                .map(|pid| cpu_seconds(&pid.to_string()))
                .sum::<Option<f64>>()
                .filter(|_| !server.is_empty()),
            generator_seconds: cpu_seconds("self"),
        }
    }
}

/// User + system CPU seconds of every thread of `/proc/<pid>`, alive or
/// exited. `/proc` counts them in USER_HZ, which Linux fixes at 100.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

fn phase(
    name: &str,
    concurrency: usize,
    histogram: &Histogram<u64>,
    errors: u64,
    elapsed: Duration,
) -> Phase {
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1e6;
    let seconds = elapsed.as_secs_f64();
    Phase {
        name: name.to_owned(),
        concurrency,
        completed: histogram.len(),
        errors,
        seconds,
        per_second: histogram.len() as f64 / seconds,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        server_cpu_us: None,
        generator_cpu_us: None,
    }
}

/// An empty latency histogram: nanoseconds, 1 µs to 60 s, 3 significant digits.
fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).map_err(|e| e.to_string())
}

/// The raw child: prints one JSON `Phase`.
pub fn raw_sign(args: RawSignArgs) -> Result<(), String> {
    let pin = Pin::load(&PinSource::File(args.pin_file)).map_err(|e| e.to_string())?;
    let cpu = CpuClock::now(&[std::process::id()]);
    let run = crate::raw_bench::raw_sign(
        &args.module,
        &TokenSelector::Label(args.token_label),
        &pin,
        &args.key_label,
        args.sessions,
        Duration::from_secs(args.seconds),
    )
    .map_err(|e| e.to_string())?;
    let mut h = histogram()?;
    for ns in &run.latencies_ns {
        let _ = h.record(*ns);
    }
    let mut result = phase("raw C_Sign", args.sessions, &h, 0, run.elapsed).with_cpu(&cpu);
    // Here the server is this process: all of its CPU is the token's.
    result.generator_cpu_us = None;
    emit(
        true,
        &serde_json::to_value(&result).map_err(|e| e.to_string())?,
        "",
    )
}

/// custosd --dev as a child, stopped with SIGTERM on drop.
struct Server {
    child: Child,
    ready: serde_json::Value,
    data_dir: PathBuf,
    keep: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl Server {
    fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.ready[key].as_str().unwrap_or_default())
    }
}

fn start_server(args: &BenchArgs, data_dir: PathBuf) -> Result<Server, String> {
    let custosd = match &args.custosd {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("custosd"),
    };
    let mut child = Command::new(&custosd)
        .args(["--dev", "--listen", "127.0.0.1:0", "--module"])
        .arg(&args.module)
        .arg("--data-dir")
        .arg(&data_dir)
        .env("RUST_LOG", "warn")
        .envs(
            args.store_url
                .iter()
                .map(|url| ("CUSTOS_DEV_STORE_URL", url.as_str())),
        )
        .envs(
            args.store_password_file
                .iter()
                .map(|file| ("CUSTOS_DEV_STORE_PASSWORD_FILE", file.as_os_str())),
        )
        .envs(
            args.store_ca_file
                .iter()
                .map(|file| ("CUSTOS_DEV_STORE_CA_FILE", file.as_os_str())),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", custosd.display()))?;
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    let ready: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
        let _ = child.kill();
        format!("custosd --dev did not start (ready line {line:?})")
    })?;
    Ok(Server {
        child,
        ready,
        data_dir,
        keep: args.keep,
    })
}

/// Activates the dev policy with its limits raised so a long run is not denied.
async fn raise_limits(channel: &Channel, server: &Server) -> Result<(), String> {
    let dev_policy = std::fs::read_to_string(server.path("policy")).map_err(|e| e.to_string())?;
    let document = dev_policy
        .replacen("version = 1", "version = 2", 1)
        .replace("count = 1000 ", "count = 1000000000 ")
        .replace("\"150000000000000000000\"", "\"1000000000000000000000000000\"")
        .replace("\"400000000000000000000\"", "\"1000000000000000000000000000\"");
    let mut policies = PolicyServiceClient::new(channel.clone());
    let proposal = policies
        .propose_policy(proto::ProposePolicyRequest {
            document: document.as_bytes().to_vec(),
        })
        .await
        .map_err(describe)?
        .into_inner();
    let admin = KeyFile::load(&server.path("admin_key")).map_err(|e| e.to_string())?;
    let activated = crate::governance::sign_activation(
        &mut policies,
        document.as_bytes(),
        proposal.version,
        "admin".into(),
        600,
        |digest| admin.sign_prehash(digest).map_err(|e| e.to_string()),
    )
    .await?;
    if !activated.activated {
        return Err("the bench policy was not activated".into());
    }
    Ok(())
}

fn create_request(id: String, wei: u128, nonce: u64) -> proto::CreateWithdrawalRequest {
    custos::dev::transfer_request(&id, custos::dev::DEV_ALLOWLISTED, wei, nonce, "bench")
}

/// What one quorum-path approver needs.
struct Approvers {
    service_id: String,
    policy_hash: [u8; 32],
    /// Each approver: id, key file, and a channel to each instance with its
    /// own client certificate.
    keys: Vec<(String, KeyFile, Vec<Channel>)>,
}

/// Runs `concurrency` workers for `duration`; each loop of `one` is one
/// sample. Returns the histogram, the error count and the elapsed time.
async fn drive<F, Fut>(
    concurrency: usize,
    duration: Duration,
    one: F,
) -> Result<(Histogram<u64>, u64, Duration), String>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let one = Arc::new(one);
    let empty = histogram()?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let one = Arc::clone(&one);
        let mut h = empty.clone();
        workers.spawn(async move {
            let mut errors = 0;
            let mut n = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                if one(worker, n).await {
                    let _ = h.record(t.elapsed().as_nanos() as u64);
                } else {
                    errors += 1;
                }
                n += 1;
            }
            (h, errors)
        });
    }
    let mut total = empty;
    let mut errors = 0;
    while let Some(Ok((h, e))) = workers.join_next().await {
        let _ = total.add(&h);
        errors += e;
    }
    Ok((total, errors, started.elapsed()))
}

pub async fn bench(args: BenchArgs, json: bool) -> Result<(), String> {
    if args.store_url.is_some() && args.prior_entries > 0 {
        return Err("--prior-entries seeds a SQLite store; it cannot be combined with --store-url".into());
    }
    if args.instances == 0 || (args.instances > 1 && args.store_url.is_none()) {
        return Err("--instances: 1, or more with --store-url (one SQLite file serves one instance)".into());
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message("starting custosd --dev on a fresh SoftHSM token");
    let data_dir = std::env::temp_dir().join(format!("custos-bench-{}", std::process::id()));
    let mut server = start_server(&args, data_dir.clone())?;
    let mut channel = dev_channel(&server, "backend").await?;
    raise_limits(&dev_channel(&server, "admin").await?, &server).await?;
    let mut startup = None;
    if args.prior_entries > 0 {
        bar.set_message(format!("seeding {} prior log entries", args.prior_entries));
        let seed = WithdrawalServiceClient::new(channel.clone())
            .create_withdrawal(create_request(format!("seed-{}", std::process::id()), 1, 0))
            .await
            .map_err(describe)?
            .into_inner();
        let store_path = server.path("store");
        server.keep = true;
        drop(server);
        seed_history(&store_path, &seed.name, args.prior_entries)?;
        bar.set_message("restarting custosd on the seeded store");
        let started = Instant::now();
        server = start_server(&args, data_dir.clone())?;
        startup = Some(started.elapsed());
        channel = dev_channel(&server, "backend").await?;
    }
    // The other instances on the same data directory: config, token, store.
    let mut others = Vec::new();
    for _ in 1..args.instances {
        bar.set_message(format!(
            "starting instance {} of {}",
            others.len() + 2,
            args.instances
        ));
        let mut other = start_server(&args, data_dir.clone())?;
        other.keep = true; // the first instance removes the directory
        others.push(other);
    }
    let mut channels = vec![channel.clone()];
    for other in &others {
        channels.push(dev_channel(other, "backend").await?);
    }
    let pids: Vec<u32> = std::iter::once(&server)
        .chain(&others)
        .map(|s| s.child.id())
        .collect();
    let wallet = WalletServiceClient::new(channel.clone())
        .get_wallet(proto::GetWalletRequest {
            name: format!("wallets/{}", custos::dev::DEV_WALLET),
        })
        .await
        .map_err(describe)?
        .into_inner();
    let sessions = 4; // custosd --dev's pool (hsm.sessions)
    let duration = Duration::from_secs(args.seconds);

    bar.set_message(format!("raw C_Sign, {sessions} sessions"));
    let raw = measure_raw(&args, &server, &wallet.key_label, sessions)?;

    // The floor under every call: mTLS, HTTP/2, the guard and tonic, with
    // no work behind them.
    bar.set_message("gRPC round trip (health Check)");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let cpu = CpuClock::now(&[server.child.id()]);
    // One second: at ~7,000 calls a second a longer run would spend the
    // backend identity's rate-limit burst (10,000, then 5,000 a second).
    let (h, errors, elapsed) = drive(1, duration.min(Duration::from_secs(1)), move |_, _| {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok()
        }
    })
    .await?;
    let round_trip = phase("gRPC ping", 1, &h, errors, elapsed).with_cpu(&cpu);

    // The floor under each of the two durable commits of a withdrawal: one
    // small transaction through the same `Store`, on the same file system.
    let scratch = match args.postgres() {
        Some(pg) => {
            bar.set_message("durable commit (PostgreSQL)");
            custos::store::StoreConfig::Postgres(pg)
        }
        None => {
            bar.set_message("durable commit (SQLite WAL sync)");
            custos::store::StoreConfig::Sqlite {
                path: data_dir.join("bench-commit.db"),
            }
        }
    };
    let seconds = duration.min(Duration::from_secs(1));
    let commit = tokio::task::spawn_blocking(move || measure_commit(&scratch, seconds))
        .await
        .map_err(|e| e.to_string())??;

    let mut auto = Vec::new();
    let run = std::process::id();
    for &concurrency in &args.concurrency {
        bar.set_message(format!("auto path, concurrency {concurrency}"));
        let clients: Vec<_> = channels
            .iter()
            .cloned()
            .map(WithdrawalServiceClient::new)
            .collect();
        let cpu = CpuClock::now(&pids);
        let (h, errors, elapsed) = drive(concurrency, duration, move |worker, n| {
            let mut client = clients[worker % clients.len()].clone();
            async move {
                let id = format!("auto-{run}-{concurrency}-{worker}-{n}");
                let reply = client.create_withdrawal(create_request(id, 1, n)).await;
                reply.is_ok_and(|r| r.into_inner().state() == WithdrawalState::Signed)
            }
        })
        .await?;
        auto.push(phase("auto", concurrency, &h, errors, elapsed).with_cpu(&cpu));
    }

    bar.set_message(format!("quorum path, concurrency {}", args.quorum_concurrency));
    let policy = PolicyServiceClient::new(dev_channel(&server, "admin").await?)
        .get_policy(proto::GetPolicyRequest { version: 0 })
        .await
        .map_err(describe)?
        .into_inner();
    let keys_dir = server.data_dir.join("keys");
    let mut approver_keys = Vec::new();
    for who in ["alice", "bob"] {
        let key = KeyFile::load(&keys_dir.join(format!("{who}.pem"))).map_err(|e| e.to_string())?;
        let mut approver_channels = vec![dev_channel(&server, who).await?];
        for other in &others {
            approver_channels.push(dev_channel(other, who).await?);
        }
        approver_keys.push((who.to_owned(), key, approver_channels));
    }
    let approvers = Arc::new(Approvers {
        service_id: policy.service_id.clone(),
        policy_hash: hex::decode(&policy.hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or("policy hash")?,
        keys: approver_keys,
    });
    let cpu = CpuClock::now(&pids);
    let (h, errors, elapsed) = drive(args.quorum_concurrency, duration, {
        let channels = channels.clone();
        move |worker, n| {
            let instance = worker % channels.len();
            let channel = channels[instance].clone();
            let approvers = Arc::clone(&approvers);
            async move {
                quorum_once(
                    &channel,
                    &approvers,
                    instance,
                    format!("quorum-{run}-{worker}-{n}"),
                    n,
                )
                .await
                .unwrap_or(false)
            }
        }
    })
    .await?;
    let quorum = phase("quorum", args.quorum_concurrency, &h, errors, elapsed).with_cpu(&cpu);
    let scale = Scale {
        store: if args.store_url.is_some() {
            "postgresql"
        } else {
            "sqlite"
        },
        instances: args.instances,
        prior_entries: args.prior_entries,
        startup_seconds: startup.map(|d| d.as_secs_f64()),
        server_max_rss_mb: max_rss_mb(server.child.id()),
    };
    bar.finish_and_clear();
    // The others first: the first instance removes the data directory.
    drop(others);
    report(&raw, &[round_trip, commit], &auto, &quorum, &scale, json)
}

/// A channel to the bench's dev server as the dev client `name`, over mTLS
/// with the certificate dev mode issued to it.
async fn dev_channel(server: &Server, name: &str) -> Result<Channel, String> {
    let tls = &server.ready["tls"];
    let path = |v: &serde_json::Value| {
        v.as_str()
            .map(std::path::PathBuf::from)
            .ok_or("ready line without tls paths")
    };
    let files = crate::ClientFiles {
        ca: path(&tls["ca_cert"])?,
        cert: path(&tls["clients"][name]["cert"])?,
        key: path(&tls["clients"][name]["key"])?,
    };
    let endpoint = server.ready["endpoint"].as_str().unwrap_or_default();
    crate::connect_to(endpoint, Some(&files)).await
}

/// History and footprint of the measured server.
#[derive(Debug, serde::Serialize)]
struct Scale {
    /// The store's backend.
    store: &'static str,
    /// custosd instances measured together.
    instances: usize,
    prior_entries: u64,
    /// From spawning custosd on the seeded store to its ready line.
    startup_seconds: Option<f64>,
    /// The server's peak resident set (VmHWM) at the end of the run.
    server_max_rss_mb: Option<f64>,
}

fn max_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Appends copies of one real signed withdrawal (its row and its three log
/// entries, under new ids, counted long ago so no limit window sees them)
/// until the log has grown by about `entries`. The copies reuse the real
/// transaction, so a replay of this bench log reports them; the point is the
/// size of the history, not its story.
fn seed_history(store_path: &std::path::Path, withdrawal_name: &str, entries: u64) -> Result<(), String> {
    use custos::store::{Store, StoreError, audit as log, withdrawals as wd};
    use custos_core::audit::entry::{Entry, Event};
    let store = Store::open(store_path).map_err(|e| e.to_string())?;
    let id = withdrawal_name.trim_start_matches("withdrawals/").to_owned();
    let (row, template) = store
        .read(|c| {
            let row = wd::by_id(c, &id)?.ok_or(StoreError::Conflict("seed withdrawal"))?;
            let size = log::size(c)?;
            let events: Vec<Event> = log::entries(c, size.saturating_sub(3), size)?
                .iter()
                .filter_map(|bytes| Entry::decode(bytes).ok().map(|e| e.event))
                .collect();
            Ok::<_, StoreError>((row, events))
        })
        .map_err(|e| e.to_string())?;
    let month_ago = now().saturating_sub(30 * 86_400);
    let copies = entries / 3;
    let mut done = 0;
    while done < copies {
        let batch = (copies - done).min(5_000);
        store
            .write(|c| {
                for i in done..done + batch {
                    let new_id = format!("wd_seed{i:012}");
                    let mut copy = row.clone();
                    copy.withdrawal_id = new_id.clone();
                    copy.request_id = format!("prior-{i}");
                    copy.created_at = month_ago;
                    copy.updated_at = month_ago;
                    copy.counted_at = Some(month_ago);
                    copy.state = custos_core::lifecycle::State::Approved;
                    wd::insert(c, &copy)?;
                    wd::set_signed(
                        c,
                        &new_id,
                        row.signed_tx.as_deref().unwrap_or_default(),
                        row.signed_tx_hash.as_deref().unwrap_or_default(),
                        month_ago,
                    )?;
                    for event in &template {
                        let mut event = event.clone();
                        match &mut event {
                            Event::WithdrawalCreated {
                                withdrawal_id,
                                request_id,
                                ..
                            } => {
                                withdrawal_id.clone_from(&new_id);
                                request_id.clone_from(&copy.request_id);
                            }
                            Event::Decision { withdrawal_id, .. } | Event::Signed { withdrawal_id, .. } => {
                                withdrawal_id.clone_from(&new_id);
                            }
                            _ => {}
                        }
                        log::append(c, month_ago, event)?;
                    }
                }
                Ok::<_, StoreError>(())
            })
            .map_err(|e| e.to_string())?;
        done += batch;
    }
    Ok(())
}

fn measure_raw(args: &BenchArgs, server: &Server, key_label: &str, sessions: usize) -> Result<Phase, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let output = Command::new(exe)
        .args(["bench-raw-sign", "--module"])
        .arg(&args.module)
        .arg("--token-label")
        .arg(
            server.ready["token_label"]
                .as_str()
                .unwrap_or(custos::dev::DEV_TOKEN_LABEL),
        )
        .arg("--pin-file")
        .arg(server.path("user_pin_file"))
        .arg("--key-label")
        .arg(key_label)
        .arg("--sessions")
        .arg(sessions.to_string())
        .arg("--seconds")
        .arg(args.seconds.to_string())
        .env("SOFTHSM2_CONF", server.path("softhsm2_conf"))
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "raw C_Sign run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("raw C_Sign output: {e}"))
}

/// Commits one-row transactions through a [`Store`] for `duration`: what
/// one durable commit costs on this file system (a scratch SQLite file) or
/// this PostgreSQL (a scratch table in the bench's database, dropped after).
fn measure_commit(config: &custos::store::StoreConfig, duration: Duration) -> Result<Phase, String> {
    let store = custos::store::Store::open_config(config).map_err(|e| e.to_string())?;
    store
        .write(|c| c.batch("CREATE TABLE bench_commit (v BIGINT NOT NULL)"))
        .map_err(|e| e.to_string())?;
    let phase = commit_loop(&store, duration);
    store
        .write(|c| c.batch("DROP TABLE bench_commit"))
        .map_err(|e| e.to_string())?;
    phase
}

fn commit_loop(store: &custos::store::Store, duration: Duration) -> Result<Phase, String> {
    let mut h = histogram()?;
    let started = Instant::now();
    let mut n: i64 = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        store
            .write(|c| c.execute("INSERT INTO bench_commit (v) VALUES (?1)", &[&n]))
            .map_err(|e| e.to_string())?;
        let _ = h.record(t.elapsed().as_nanos() as u64);
        n += 1;
    }
    Ok(phase("commit", 1, &h, 0, started.elapsed()))
}

/// One quorum withdrawal: create, alice approves, bob approves; true when
/// the second approval's reply is SIGNED.
async fn quorum_once(
    channel: &Channel,
    approvers: &Approvers,
    instance: usize,
    id: String,
    nonce: u64,
) -> Result<bool, tonic::Status> {
    let created = WithdrawalServiceClient::new(channel.clone())
        .create_withdrawal(create_request(id, 2 * ETHER, nonce))
        .await?
        .into_inner();
    let mut last = created.state();
    for (who, key, approver_channels) in &approvers.keys {
        let approver_channel = &approver_channels[instance];
        let message = ApprovalMessage {
            service_id: approvers.service_id.clone(),
            withdrawal_id: created.name.trim_start_matches("withdrawals/").to_owned(),
            intent_hash: created.intent_hash.clone().try_into().unwrap_or_default(),
            policy_hash: approvers.policy_hash,
            vote: Vote::Approve,
            expires_at: now() + 600,
            approver: who.clone(),
        };
        let Ok(signature) = key.sign_prehash(&message.digest()) else {
            return Ok(false);
        };
        last = ApprovalServiceClient::new(approver_channel.clone())
            .submit_approval(proto::SubmitApprovalRequest {
                message: message.encode(),
                signature: signature.to_vec(),
            })
            .await?
            .into_inner()
            .state();
    }
    Ok(last == WithdrawalState::Signed)
}

fn report(
    raw: &Phase,
    floors: &[Phase; 2],
    auto: &[Phase],
    quorum: &Phase,
    scale: &Scale,
    json: bool,
) -> Result<(), String> {
    let best = auto.iter().map(|p| p.per_second).fold(0.0, f64::max);
    let best_phase = auto.iter().find(|p| p.per_second == best);
    let at_one = auto.iter().find(|p| p.concurrency == 1);
    // custos's own CPU per withdrawal: custosd's, less the token's signature
    // (SoftHSM runs inside custosd), at the best concurrency.
    let own_cpu_us = best_phase
        .and_then(|p| Some(p.server_cpu_us? - raw.server_cpu_us?))
        .filter(|us| *us > 0.0);
    let ratios = serde_json::json!({
        "auto_over_raw": best / raw.per_second,
        "quorum_over_raw": quorum.per_second / raw.per_second,
        "added_p50_ms_at_concurrency_1": at_one.map(|p| p.p50_ms - raw.p50_ms),
        "custos_cpu_us_per_auto_withdrawal": own_cpu_us,
        "custos_cpu_over_token_cpu": own_cpu_us.zip(raw.server_cpu_us).map(|(own, token)| own / token),
    });
    let value = serde_json::json!({
        "raw": raw,
        "round_trip": floors[0],
        "durable_commit": floors[1],
        "auto": auto,
        "quorum": quorum,
        "ratios": ratios,
        "scale": scale,
    });
    let cpu = |us: Option<f64>| us.map_or("-".to_owned(), |us| format!("{us:.0}"));
    let mut text = format!(
        "{:<12} {:>5} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}\n",
        "path",
        "conc",
        "done",
        "errors",
        "per sec",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "srv cpu us",
        "gen cpu us"
    );
    for p in std::iter::once(raw)
        .chain(floors)
        .chain(auto)
        .chain(std::iter::once(quorum))
    {
        text.push_str(&format!(
            "{:<12} {:>5} {:>9} {:>7} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>10} {:>10}\n",
            p.name,
            p.concurrency,
            p.completed,
            p.errors,
            p.per_second,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            cpu(p.server_cpu_us),
            cpu(p.generator_cpu_us),
        ));
    }
    text.push_str(&format!(
        "\nauto/raw (best concurrency): {:.2}   quorum/raw: {:.2}   auto p50 - raw p50 at concurrency 1: {}\n",
        best / raw.per_second,
        quorum.per_second / raw.per_second,
        at_one.map_or("n/a".to_owned(), |p| format!("{:.3} ms", p.p50_ms - raw.p50_ms)),
    ));
    if let (Some(own), Some(token), Some(best)) = (own_cpu_us, raw.server_cpu_us, best_phase) {
        text.push_str(&format!(
            "CPU per auto withdrawal at concurrency {}: custos {own:.0} us beyond the token's {token:.0} us ({:.2}x), load generator {}\n",
            best.concurrency,
            own / token,
            cpu(best.generator_cpu_us),
        ));
    }
    text.push_str(&format!(
        "store: {} ({} instance{})   prior log entries: {}   startup: {}   custosd max RSS: {}\n",
        scale.store,
        scale.instances,
        if scale.instances == 1 { "" } else { "s" },
        scale.prior_entries,
        scale
            .startup_seconds
            .map_or("n/a".to_owned(), |s| format!("{s:.2} s")),
        scale
            .server_max_rss_mb
            .map_or("n/a".to_owned(), |m| format!("{m:.0} MB")),
    ));
    emit(json, &value, &text)
}
