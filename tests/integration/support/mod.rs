//! Fixtures: SoftHSM token directories, the dev server as a subprocess, and
//! child-process isolation for in-process PKCS#11.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos::config::Config;
use custos::secret::Pin;

/// The PKCS#11 module under test: `TEST_PKCS11_MODULE` or Debian's SoftHSM.
pub fn module_path() -> PathBuf {
    std::env::var_os("TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(custos::dev::DEFAULT_SOFTHSM_MODULE))
}

/// Environment variable naming the test a child process should run.
const CHILD_ENV: &str = "CUSTOS_TEST_CHILD";

/// Whether this process is the child run of `test`.
pub fn is_child(test: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|t| t == test)
}

/// Runs the test named `test` (its path inside this binary, e.g.
/// `signing_core::sign_many`) again in a child process with `envs` set, and
/// asserts it passed. The child's output is shown on failure.
pub fn run_child(test: &str, envs: &[(&str, OsString)]) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = Command::new(exe);
    command
        .args([
            test,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, test)
        .envs(envs.iter().map(|(k, v)| (*k, v)));
    let output = output_within(command, CHILD_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "child run of {test} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "child run of {test} did not run the test:\n{stdout}"
    );
    format!("{stdout}\n{stderr}")
}

/// How long a child test process may run before it is killed and failed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `command` to completion with captured output, killing it (and
/// failing the test) if it runs longer than `limit`, so that a hung HSM call
/// can never hang the suite.
pub fn output_within(mut command: Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child process");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf)
            .map(|_| buf)
            .unwrap_or_default()
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut buf)
            .map(|_| buf)
            .unwrap_or_default()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child process ran longer than {limit:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// A SoftHSM configuration and token directory in a temp dir.
pub struct SoftHsmDir {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

impl SoftHsmDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        Self { dir, conf }
    }

    /// Environment for a child process using this token directory.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("SOFTHSM2_CONF", self.conf.clone().into_os_string()),
            ("CUSTOS_TEST_DIR", self.dir.path().as_os_str().to_owned()),
        ]
    }
}

/// In a child process: the test directory passed by the parent.
pub fn child_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CUSTOS_TEST_DIR").expect("CUSTOS_TEST_DIR set by parent"))
}

pub const TEST_TOKEN_LABEL: &str = "custos-test";
pub const TEST_USER_PIN: &str = "user-pin-1234";
pub const TEST_SO_PIN: &str = "so-pin-5678";

pub fn pin(text: &str) -> Pin {
    Pin::from_generated(zeroize::Zeroizing::new(text.to_owned()))
}

/// In a child process: initializes the test token in `dir`'s SoftHSM and
/// returns a config for it, with the store in `dir`.
pub fn init_test_token(dir: &Path) -> Config {
    custos::hsm::init_token(
        &module_path(),
        TEST_TOKEN_LABEL,
        &pin(TEST_SO_PIN),
        &pin(TEST_USER_PIN),
    )
    .expect("initialize test token");
    test_config(dir)
}

/// A config for the test token, writing its PIN file (0600) if missing.
pub fn test_config(dir: &Path) -> Config {
    let pin_file = dir.join("user.pin");
    if !pin_file.exists() {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin_file)
            .unwrap();
        file.write_all(TEST_USER_PIN.as_bytes()).unwrap();
    }
    let mut config = Config::parse(&config_text(
        &module_path(),
        TEST_TOKEN_LABEL,
        &pin_file,
        &dir.join("custos.db"),
    ))
    .unwrap();
    if std::env::var("CUSTOS_TEST_STORE").as_deref() == Ok("postgres") {
        config.store = custos::store::StoreConfig::Postgres(fresh_postgres_database());
    }
    // In-process tests drive the engine, not the transport.
    config.server.insecure_plaintext = true;
    config
}

/// A new, empty database on the test suite's PostgreSQL (`scripts/test.sh`
/// starts it and sets `CUSTOS_TEST_POSTGRES_URL` and
/// `CUSTOS_TEST_POSTGRES_PASSWORD_FILE`).
pub fn fresh_postgres_database() -> custos::store::postgres::PgSettings {
    use std::str::FromStr;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let url = std::env::var("CUSTOS_TEST_POSTGRES_URL")
        .expect("CUSTOS_TEST_POSTGRES_URL (scripts/test.sh sets it)");
    let password_file = std::env::var("CUSTOS_TEST_POSTGRES_PASSWORD_FILE")
        .ok()
        .map(PathBuf::from);
    let name = format!(
        "custos_it_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let mut config = tokio_postgres::Config::from_str(&url).unwrap();
    if let Some(file) = &password_file {
        config.password(std::fs::read(file).unwrap());
    }
    // On a thread of its own: callers may be inside a runtime already.
    let create = name.clone();
    std::thread::spawn(move || {
        let name = create;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            // One statement per call: neither may run in a transaction block.
            for sql in [
                format!("DROP DATABASE IF EXISTS {name}"),
                format!("CREATE DATABASE {name}"),
            ] {
                client.batch_execute(&sql).await.unwrap();
            }
        });
    })
    .join()
    .unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    custos::store::postgres::PgSettings {
        url: format!("{base}/{name}"),
        password_file,
        // With the suite's CA (scripts/pg.sh makes one), over verified TLS.
        ca_file: std::env::var_os("CUSTOS_TEST_POSTGRES_CA_FILE").map(PathBuf::from),
        read_pool: 4,
    }
}

/// With `CUSTOS_TEST_STORE=postgres`, the environment that puts a dev
/// server's store on a fresh PostgreSQL database (chosen once per data
/// directory: the dev config keeps it across restarts).
pub fn dev_store_env(data_dir: &Path) -> Vec<(String, String)> {
    if std::env::var("CUSTOS_TEST_STORE").as_deref() != Ok("postgres")
        || data_dir.join("custosd.toml").exists()
    {
        return Vec::new();
    }
    postgres_store_env()
}

/// The environment that puts a new dev data directory's store on a fresh
/// database of the suite's PostgreSQL, whatever `CUSTOS_TEST_STORE` says.
pub fn postgres_store_env() -> Vec<(String, String)> {
    let pg = fresh_postgres_database();
    let mut env = vec![("CUSTOS_DEV_STORE_URL".to_owned(), pg.url)];
    if let Some(file) = pg.password_file {
        env.push((
            "CUSTOS_DEV_STORE_PASSWORD_FILE".to_owned(),
            file.display().to_string(),
        ));
    }
    if let Some(file) = pg.ca_file {
        env.push(("CUSTOS_DEV_STORE_CA_FILE".to_owned(), file.display().to_string()));
    }
    env
}

/// Runs `f` in a write transaction on the store of the dev data directory
/// `data_dir`, SQLite or PostgreSQL as its config names, as someone with
/// write access to the database would; the write's outcome.
pub fn with_dev_store<T: Send + 'static>(
    data_dir: &Path,
    f: impl FnOnce(custos::store::sql::Conn<'_>) -> Result<T, custos::store::StoreError> + Send + 'static,
) -> Result<T, custos::store::StoreError> {
    on_dev_store(data_dir, move |store| store.write(f))
}

/// Runs `f` on a read connection of the dev data directory `data_dir`'s
/// store, SQLite or PostgreSQL as its config names; custosd may be running.
pub fn read_dev_store<T: Send + 'static>(
    data_dir: &Path,
    f: impl FnOnce(custos::store::sql::Conn<'_>) -> Result<T, custos::store::StoreError> + Send + 'static,
) -> T {
    on_dev_store(data_dir, move |store| store.read(f)).unwrap()
}

/// Opens the store the dev data directory `data_dir`'s config names and
/// runs `f` with it, on a thread of its own, since the store blocks.
fn on_dev_store<T: Send + 'static>(
    data_dir: &Path,
    f: impl FnOnce(&custos::store::Store) -> T + Send + 'static,
) -> T {
    let config = Config::load(&data_dir.join("custosd.toml")).unwrap();
    std::thread::spawn(move || f(&custos::store::Store::open_config(&config.store).unwrap()))
        .join()
        .unwrap()
}

/// `sqlite` or `postgres`, whichever speaks to `conn`'s backend: for the few
/// statements whose text differs between them.
pub fn dialect<'a>(conn: custos::store::sql::Conn<'_>, sqlite: &'a str, postgres: &'a str) -> &'a str {
    match conn.backend() {
        custos::store::sql::Backend::Sqlite => sqlite,
        custos::store::sql::Backend::Postgres => postgres,
    }
}

/// A custosd config file's text.
pub fn config_text(module: &Path, token_label: &str, pin_file: &Path, store: &Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[hsm]\nmodule = \"{}\"\ntoken_label = \"{token_label}\"\npin_file = \"{}\"\nsessions = 4\n\n[store]\npath = \"{}\"\n\n[bitcoin]\nnetwork = \"regtest\"\n",
        module.display(),
        pin_file.display(),
        store.display()
    )
}

/// `custosd --dev` running as a subprocess.
pub struct DevServer {
    pub child: Child,
    pub data_dir: PathBuf,
    pub ready: serde_json::Value,
    pub endpoint: String,
    stderr_path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl DevServer {
    /// Starts `custosd --dev` on a fresh data directory.
    pub fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("dev");
        let mut server = Self::start_in(&data_dir, &[]);
        server._temp = Some(temp);
        server
    }

    /// Starts `custosd --dev` on `data_dir` (created or reused).
    pub fn start_in(data_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Self::start_logging_to(data_dir, data_dir.with_extension("stderr.log"), extra_env)
    }

    /// Starts another instance of the dev server whose data directory
    /// `data_dir` already is (its config, token and store are shared):
    /// instance `name` of several on one store. Its log goes to a file of
    /// its own.
    pub fn start_instance(data_dir: &Path, name: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_logging_to(
            data_dir,
            data_dir.with_extension(format!("{name}.stderr.log")),
            extra_env,
        )
    }

    fn start_logging_to(data_dir: &Path, stderr_path: PathBuf, extra_env: &[(&str, &str)]) -> Self {
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_custosd"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--module"])
            .arg(module_path())
            .arg("--data-dir")
            .arg(data_dir)
            .envs(extra_env.iter().copied())
            .envs(dev_store_env(data_dir))
            .env_remove("SOFTHSM2_CONF")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn custosd --dev");
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("custosd --dev printed no ready line within 60 s");
            });
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!(
                "custosd --dev did not print its ready line ({e}): {line:?}\nstderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            )
        });
        let endpoint = ready["endpoint"].as_str().unwrap().to_owned();
        Self {
            child,
            data_dir: data_dir.to_path_buf(),
            ready,
            endpoint,
            stderr_path,
            _temp: None,
        }
    }

    /// A path from the ready line, e.g. `"softhsm2_conf"`.
    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.ready[key].as_str().unwrap())
    }

    /// What the server logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A channel authenticated as the dev client `identity`: one of
    /// `backend`, `admin`, `auditor`, or an approver id (`alice`, `bob`,
    /// `carol`), each with its own dev client certificate.
    pub async fn channel_as(&self, identity: &str) -> tonic::transport::Channel {
        let (cert, key) = self.client_files(identity);
        self.channel_with(Some((
            &std::fs::read(cert).unwrap(),
            &std::fs::read(key).unwrap(),
        )))
        .await
        .expect("connect to custosd")
    }

    /// A TLS channel presenting `identity` (certificate and key PEM), or no
    /// client certificate at all.
    pub async fn channel_with(
        &self,
        identity: Option<(&[u8], &[u8])>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        let ca = std::fs::read(self.tls_path(&["ca_cert"])).unwrap();
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        if let Some((cert, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        tonic::transport::Endpoint::from_shared(self.endpoint.clone())
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    /// The dev client `identity`'s certificate and key files.
    pub fn client_files(&self, identity: &str) -> (PathBuf, PathBuf) {
        (
            self.tls_path(&["clients", identity, "cert"]),
            self.tls_path(&["clients", identity, "key"]),
        )
    }

    /// A path under the ready line's `tls` object.
    pub fn tls_path(&self, keys: &[&str]) -> PathBuf {
        let mut value = &self.ready["tls"];
        for key in keys {
            value = &value[*key];
        }
        PathBuf::from(
            value
                .as_str()
                .unwrap_or_else(|| panic!("ready line has no tls.{}", keys.join("."))),
        )
    }

    /// `custos` CLI arguments that reach this server as the dev client
    /// `identity` (see [`DevServer::channel_as`]).
    pub fn cli_args(&self, identity: &str) -> Vec<OsString> {
        let (cert, key) = self.client_files(identity);
        vec![
            "--server".into(),
            self.endpoint.clone().into(),
            "--tls-ca".into(),
            self.tls_path(&["ca_cert"]).into(),
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
        ]
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM, then wait up to 10 s for the process to exit.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "custosd did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tokio runtime for a synchronous test body.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a test body in a child process of this binary, on a fresh SoftHSM
/// token, with the library's `App` opened on it. `name` is the test's path
/// in this binary; the parent process only spawns the child and checks it.
pub fn with_app_in_child<F, Fut>(name: &str, body: F)
where
    F: FnOnce(custos::server::App, PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !is_child(name) {
        let hsm_dir = SoftHsmDir::new();
        run_child(name, &hsm_dir.env());
        return;
    }
    let dir = child_dir();
    let config = init_test_token(&dir);
    runtime().block_on(async {
        let app = custos::server::App::open(&config).await.unwrap();
        body(app, dir).await;
    });
}

/// The slot holding the initialized token with this label.
pub fn slot_with_label(pkcs11: &cryptoki::context::Pkcs11, label: &str) -> cryptoki::slot::Slot {
    pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label() == label)
        .unwrap_or_else(|| panic!("no token labelled {label}"))
}

/// Generates a secp256k1 key pair on the token behind custos's back, as an
/// attacker or careless operator could. `weak` makes the private key
/// exportable and not sensitive.
pub fn plant_key_pair(session: &cryptoki::session::Session, id: &[u8], label: &[u8], weak: bool) {
    use cryptoki::object::Attribute;
    let common = [
        Attribute::Token(true),
        Attribute::Id(id.to_vec()),
        Attribute::Label(label.to_vec()),
    ];
    let mut public = common.to_vec();
    public.push(Attribute::EcParams(custos::hsm::SECP256K1_EC_PARAMS.to_vec()));
    let mut private = common.to_vec();
    private.extend([
        Attribute::Private(true),
        Attribute::Sensitive(!weak),
        Attribute::Extractable(weak),
        Attribute::Derive(false),
        Attribute::Sign(true),
    ]);
    session
        .generate_key_pair(&cryptoki::mechanism::Mechanism::EccKeyPairGen, &public, &private)
        .unwrap();
}

/// Every withdrawal in `state` (all states for `Unspecified`), following
/// ListWithdrawals' pages to the end.
pub async fn all_withdrawals(
    client: &mut custos::proto::withdrawal_service_client::WithdrawalServiceClient<tonic::transport::Channel>,
    state: custos::proto::WithdrawalState,
) -> Vec<custos::proto::Withdrawal> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_withdrawals(custos::proto::ListWithdrawalsRequest {
                page_size: 1000,
                page_token,
                state: state.into(),
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.withdrawals);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Proposes the policy `document` and activates it with the dev admin key
/// (the dev policy's admin quorum is 1). Returns its hash.
pub async fn activate_policy_document(server: &DevServer, document: String) -> [u8; 32] {
    use custos::proto::{self, policy_service_client::PolicyServiceClient};
    use custos::signer::KeyFile;
    use custos_core::governance::{GovernanceAction, GovernanceMessage};
    use custos_core::policy::policy_hash;
    let mut policies = PolicyServiceClient::new(server.channel_as("admin").await);
    let proposal = policies
        .propose_policy(proto::ProposePolicyRequest {
            document: document.clone().into_bytes(),
        })
        .await
        .unwrap()
        .into_inner();
    let service_id = policies
        .get_policy(proto::GetPolicyRequest { version: 0 })
        .await
        .unwrap()
        .into_inner()
        .service_id;
    let hash = policy_hash(document.as_bytes());
    let m = GovernanceMessage {
        service_id,
        action: GovernanceAction::ActivatePolicy,
        sequence: proposal.version,
        subject: hash,
        expires_at: custos::clock::unix_now() + 600,
        signer: "admin".into(),
    };
    let admin = KeyFile::load(&server.data_dir.join("keys/admin.pem")).unwrap();
    let activated = policies
        .approve_policy(proto::ApprovePolicyRequest {
            approval: Some(proto::SignedMessage {
                message: m.encode(),
                signature: admin.sign_prehash(&m.digest()).unwrap().to_vec(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(activated.activated, "{activated:?}");
    hash
}

/// `custos audit export`, then `custos audit verify` on the export; returns
/// the verify report (JSON). Fails the test unless both succeed.
pub fn export_and_verify(server: &DevServer, dir: &Path) -> serde_json::Value {
    let custos = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
        command.args(server.cli_args("auditor"));
        command
    };
    let mut export = custos();
    export.args(["audit", "export", "--out"]).arg(dir);
    let out = output_within(export, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "custos audit export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = server.ready["log_verifier_key"].as_str().unwrap();
    let mut verify = custos();
    verify
        .args(["--json", "audit", "verify", "--key", key, "--dir"])
        .arg(dir);
    let out = output_within(verify, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "custos audit verify failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("CUSTOS_CRASH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `grpc.health.v1.Health/Check` reports for `service` over `channel`.
pub async fn health_status(
    channel: &tonic::transport::Channel,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Polls health on `server` until the server and every custos service
/// report `want`; fails the test if they do not within `within`.
pub async fn await_health(
    server: &DevServer,
    want: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) {
    let channel = server.channel_as("auditor").await;
    let deadline = Instant::now() + within;
    loop {
        let mut all = true;
        for service in custos::health::SERVICES {
            all &= health_status(&channel, service).await == want;
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health is not {want:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every entry of `server`'s audit log, read over AuditService ListEntries
/// (whichever backend the store is on) and decoded.
pub async fn log_entries(server: &DevServer) -> Vec<custos_core::audit::entry::Entry> {
    use custos::proto::audit_service_client::AuditServiceClient;
    let mut audit = AuditServiceClient::new(server.channel_as("auditor").await);
    let mut stream = audit
        .list_entries(custos::proto::ListEntriesRequest { start: 0, end: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        let entry = custos_core::audit::entry::Entry::decode(&e.data).unwrap();
        assert_eq!(entry.index, e.index);
        entries.push(entry);
    }
    entries
}
