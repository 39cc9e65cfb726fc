//! `custosd --dev`: everything a newcomer needs, created on the fly under one
//! directory, like `vault server -dev`.
//!
//! Under the data directory dev mode creates a SoftHSM configuration and token
//! directory, a fresh token with random user and SO PINs (files mode 0600), a
//! `custosd.toml`, and the SQLite store. It also sets up a governed story:
//! three approver keys (alice and bob in `treasury`, carol in `treasury` and
//! `security`) and one admin key, as 0600 key files under `keys/`; a wallet
//! `hot` generated in the token; and a genesis policy (`policy.toml`) that
//! signs small withdrawals to an allowlisted exchange address at once, asks
//! two treasury approvers for larger ones, and denies everything else.
//! Running it again on the same directory reuses all of it.
//!
//! SoftHSM finds its configuration only through the `SOFTHSM2_CONF`
//! environment variable, read when the module initializes. Setting it in a
//! running process is unsound, so dev mode prepares the directory and then
//! re-executes `custosd` with the variable set.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use zeroize::Zeroizing;

use crate::config::{Config, ConfigError};
use crate::hsm::{self, HsmError};
use crate::secret::Pin;
use crate::signer::{KeyFile, SignerError, public_key_string};
use crate::tls::dev_pki::{self, DevPkiError, DevTlsPaths};
use crate::wallet::{DisplayName, WalletError, WalletId, Wallets};

/// Debian's SoftHSMv2 module, the dev-mode default.
pub const DEFAULT_SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The dev token's label.
pub const DEV_TOKEN_LABEL: &str = "custos-dev";
/// The dev listener when none is given.
pub const DEFAULT_DEV_LISTEN: &str = "127.0.0.1:50051";

/// Files dev mode creates under its data directory.
#[derive(Debug, Clone, Serialize)]
pub struct DevPaths {
    /// The data directory.
    pub data_dir: PathBuf,
    /// SoftHSM configuration (pass as `SOFTHSM2_CONF`).
    pub softhsm2_conf: PathBuf,
    /// SoftHSM token directory.
    pub token_dir: PathBuf,
    /// Generated `custosd` configuration.
    pub config: PathBuf,
    /// The user PIN file (0600).
    pub user_pin_file: PathBuf,
    /// The security-officer PIN file (0600).
    pub so_pin_file: PathBuf,
    /// The SQLite store.
    pub store: PathBuf,
    /// The genesis policy.
    pub policy: PathBuf,
    /// Approver key files (0600 PKCS#8 PEM), by approver id.
    pub approver_keys: std::collections::BTreeMap<String, PathBuf>,
    /// The admin key file (also the security officer), id `admin`.
    pub admin_key: PathBuf,
    /// The dev CA, the server certificate and one client certificate per
    /// dev identity (see [`crate::tls::dev_pki`]).
    pub tls: DevTlsPaths,
}

/// Dev approvers and their groups.
pub const DEV_APPROVERS: [(&str, &str); 3] = [
    ("alice", "\"treasury\""),
    ("bob", "\"treasury\""),
    ("carol", "\"treasury\", \"security\""),
];
/// The dev wallet.
pub const DEV_WALLET: &str = "hot";
/// The dev Ethereum network: Sepolia.
pub const DEV_CHAIN_ID: u64 = 11_155_111;
/// An exchange deposit address on the dev allowlist, in force at once.
pub const DEV_ALLOWLISTED: &str = "0x3535353535353535353535353535353535353535";
/// An address added to the dev allowlist at setup: time-locked for a day.
pub const DEV_TIME_LOCKED: &str = "0x4646464646464646464646464646464646464646";

impl DevPaths {
    /// Paths under `data_dir`, which should be absolute.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            softhsm2_conf: data_dir.join("softhsm2.conf"),
            token_dir: data_dir.join("tokens"),
            config: data_dir.join("custosd.toml"),
            user_pin_file: data_dir.join("user.pin"),
            so_pin_file: data_dir.join("so.pin"),
            store: data_dir.join("custos.db"),
            policy: data_dir.join("policy.toml"),
            approver_keys: DEV_APPROVERS
                .iter()
                .map(|(id, _)| ((*id).to_owned(), data_dir.join("keys").join(format!("{id}.pem"))))
                .collect(),
            admin_key: data_dir.join("keys").join("admin.pem"),
            tls: DevTlsPaths::new(&data_dir.join("tls")),
        }
    }
}

/// The one JSON line dev mode prints on stdout once it is listening.
#[derive(Debug, Clone, Serialize)]
pub struct DevReady {
    /// Always `custosd.dev.ready`.
    pub event: &'static str,
    /// The bound address.
    pub listen: SocketAddr,
    /// gRPC endpoint URL for clients.
    pub endpoint: String,
    /// The PKCS#11 module in use.
    pub module: PathBuf,
    /// The token label.
    pub token_label: &'static str,
    /// The audit log's note verifier key, for `custos audit verify --key`.
    pub log_verifier_key: String,
    /// The Prometheus endpoint URL, e.g. `http://127.0.0.1:PORT/metrics`
    /// (dev mode always serves one, on a free loopback port).
    pub metrics_endpoint: Option<String>,
    /// Everything created.
    #[serde(flatten)]
    pub paths: DevPaths,
}

/// A dev-mode setup failure.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The PKCS#11 module is not there.
    #[error("PKCS#11 module {0} not found; install SoftHSMv2 (apt-get install softhsm2) or pass --module")]
    ModuleMissing(PathBuf),
    /// Dev mode keeps its PINs and keys on disk, so it listens only on loopback.
    #[error("--dev listens only on loopback; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// The dev certificates could not be created.
    #[error(transparent)]
    Pki(#[from] DevPkiError),
    /// A file could not be written.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The token could not be created.
    #[error("creating the dev token: {0}")]
    Hsm(#[from] HsmError),
    /// A dev key could not be created or read.
    #[error("dev key: {0}")]
    Key(#[from] SignerError),
    /// The generated or existing config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Re-executing custosd failed.
    #[error("cannot re-execute custosd with SOFTHSM2_CONF set: {0}")]
    Exec(std::io::Error),
}

/// Phase one, in the process the user started: creates the directory and the
/// SoftHSM configuration, then re-executes custosd with `SOFTHSM2_CONF`
/// pointing at it. Returns only on failure, or `Ok` if already re-executed.
pub fn reexec_with_softhsm_conf(
    paths: &DevPaths,
    module: &Path,
    extra_args: &[OsString],
) -> Result<(), DevError> {
    if !module.exists() {
        return Err(DevError::ModuleMissing(module.to_path_buf()));
    }
    if std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(paths.softhsm2_conf.as_os_str()) {
        return Ok(());
    }
    create_dir(&paths.data_dir)?;
    create_dir(&paths.token_dir)?;
    if !paths.softhsm2_conf.exists() {
        let conf = format!(
            "# SoftHSMv2 configuration written by custosd --dev.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            paths.token_dir.display()
        );
        write_new(&paths.softhsm2_conf, conf.as_bytes(), 0o644)?;
    }
    let exe = std::env::current_exe().map_err(DevError::Exec)?;
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .args(extra_args)
        .env("SOFTHSM2_CONF", &paths.softhsm2_conf)
        .exec();
    Err(DevError::Exec(error))
}

/// The body of the dev config's `[store]` section.
fn store_section(sqlite: &Path, postgres: Option<&crate::store::postgres::PgSettings>) -> String {
    match postgres {
        None => format!("path = {:?}", sqlite.display().to_string()),
        Some(pg) => {
            let mut section = format!("url = {:?}\nread_pool = {}", pg.url, pg.read_pool);
            if let Some(file) = &pg.password_file {
                section.push_str(&format!("\npassword_file = {:?}", file.display().to_string()));
            }
            if let Some(file) = &pg.ca_file {
                section.push_str(&format!("\nca_file = {:?}", file.display().to_string()));
            }
            section
        }
    }
}

/// Phase two, with `SOFTHSM2_CONF` set: creates the token, PINs and config on
/// first use, and returns the configuration to serve with.
pub fn prepare(paths: &DevPaths, module: &Path, listen: Option<SocketAddr>) -> Result<Config, DevError> {
    prepare_on(paths, module, listen, None)
}

/// [`prepare`], with the store on PostgreSQL instead of the embedded SQLite
/// file when `postgres` is given. The choice is written into the config on
/// first use, so a restart on the same data directory keeps it.
pub fn prepare_on(
    paths: &DevPaths,
    module: &Path,
    listen: Option<SocketAddr>,
    postgres: Option<&crate::store::postgres::PgSettings>,
) -> Result<Config, DevError> {
    if !paths.config.exists() {
        let user_pin = random_pin()?;
        let so_pin = random_pin()?;
        write_new(&paths.user_pin_file, user_pin.expose().as_bytes(), 0o600)?;
        write_new(&paths.so_pin_file, so_pin.expose().as_bytes(), 0o600)?;
        hsm::init_token(module, DEV_TOKEN_LABEL, &so_pin, &user_pin)?;
        create_dir(&paths.data_dir.join("keys"))?;
        for path in paths.approver_keys.values().chain([&paths.admin_key]) {
            KeyFile::generate()?.write_new(path)?;
        }
        let admin = public_key_string(KeyFile::load(&paths.admin_key)?.verifying_key());
        let tls = dev_pki::ensure(&paths.data_dir.join("tls"))?;
        let mut clients = String::new();
        for entry in dev_pki::dev_client_entries() {
            let roles: Vec<String> = entry.roles.iter().map(|r| format!("\"{r}\"")).collect();
            clients.push_str(&format!(
                "[[clients]]\nidentity = \"{}\"\nroles = [{}]\n",
                entry.identity,
                roles.join(", ")
            ));
            if let Some(id) = &entry.approver_id {
                clients.push_str(&format!("approver_id = \"{id}\"\n"));
            }
            clients.push('\n');
        }
        let config = format!(
            "# custosd configuration written by custosd --dev. See hsm-config/custosd.example.toml.\n\
             [server]\n\
             listen = \"{DEFAULT_DEV_LISTEN}\"\n\
             log_format = \"text\"\n\n\
             [hsm]\n\
             module = \"{}\"\n\
             token_label = \"{DEV_TOKEN_LABEL}\"\n\
             pin_file = \"{}\"\n\
             sessions = 4\n\n\
             [store]\n\
             {}\n\n\
             [bitcoin]\n\
             network = \"regtest\"\n\n\
             [ethereum]\n\
             chain_id = {DEV_CHAIN_ID}\n\n\
             [service]\n\
             id = \"custos-dev\"\n\n\
             [policy]\n\
             genesis_file = \"{}\"\n\
             admin_keys = [\"{admin}\"]\n\n\
             [audit]\n\
             origin = \"custos.local/custos-dev\"\n\
             checkpoint_every_seconds = 2\n\n\
             [tls]\n\
             cert_file = \"{}\"\n\
             key_file = \"{}\"\n\
             client_ca_file = \"{}\"\n\n\
             {clients}",
            module.display(),
            paths.user_pin_file.display(),
            store_section(&paths.store, postgres),
            paths.policy.display(),
            tls.server_cert.display(),
            tls.server_key.display(),
            tls.ca_cert.display(),
        );
        write_new(&paths.config, config.as_bytes(), 0o600)?;
    }
    let mut config = Config::load(&paths.config)?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if !config.server.listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(config.server.listen));
    }
    Ok(config)
}

/// Runs inside the server's `App::open_with` on first start: creates the
/// dev wallet in the token and writes the genesis policy naming its key.
pub async fn bootstrap(paths: &DevPaths, wallets: Arc<Wallets>) -> Result<(), String> {
    if paths.policy.exists() {
        return Ok(());
    }
    let id = WalletId::parse(DEV_WALLET).map_err(|e| e.to_string())?;
    let wallet = match wallets.get(&id).await {
        Ok(wallet) => wallet,
        Err(WalletError::NotFound(_)) => wallets
            .create(
                id,
                DisplayName::parse("Dev hot wallet").map_err(|e| e.to_string())?,
            )
            .await
            .map_err(|e| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    };
    let key = |path: &Path| -> Result<String, String> {
        Ok(public_key_string(
            KeyFile::load(path).map_err(|e| e.to_string())?.verifying_key(),
        ))
    };
    let mut approvers = String::new();
    for (id, groups) in DEV_APPROVERS {
        approvers.push_str(&format!(
            "[approvers.{id}]\nkey = \"{}\"\ngroups = [{groups}]\n\n",
            key(&paths.approver_keys[id])?
        ));
    }
    let now = crate::clock::unix_now();
    let day = 86_400;
    let policy = format!(
        "# Genesis policy written by custosd --dev. See docs/policy.md.\n\
         version = 1\n\
         approval_window_seconds = {day}\n\
         allowlist_delay_seconds = {day}\n\n\
         [admins]\n\
         quorum = 1\n\
         keys = {{ admin = \"{admin}\" }}\n\
         security_officers = [\"admin\"]\n\n\
         {approvers}\
         [wallets.{DEV_WALLET}]\n\
         network = \"eip155:{DEV_CHAIN_ID}\"\n\
         key_label = \"{label}\"\n\n\
         [allowlists.exchanges]\n\
         entries = [\n  {{ address = \"{DEV_ALLOWLISTED}\", added_at = {listed} }},\n  {{ address = \"{DEV_TIME_LOCKED}\", added_at = {now} }},\n]\n\n\
         [[limits]]\n\
         wallet = \"{DEV_WALLET}\"\n\
         asset = \"ETH\"\n\
         per_transaction = \"100000000000000000000\"\n\
         windows = [\n  {{ seconds = 3600, amount = \"150000000000000000000\", count = 1000 }},\n  {{ seconds = {day}, amount = \"400000000000000000000\" }},\n]\n\n\
         [fee_caps.ethereum]\n\
         max_fee_per_gas = \"500000000000\"\n\
         max_total_fee = \"50000000000000000\"\n\n\
         [[rules]]\n\
         name = \"auto-small\"\n\
         wallets = [\"{DEV_WALLET}\"]\n\
         assets = [\"ETH\"]\n\
         allowlist = \"exchanges\"\n\
         amount_max = \"1000000000000000000\"\n\
         action = \"allow\"\n\n\
         [[rules]]\n\
         name = \"large-two-treasury\"\n\
         wallets = [\"{DEV_WALLET}\"]\n\
         allowlist = \"exchanges\"\n\
         action = \"require\"\n\
         quorum = [{{ group = \"treasury\", min = 2 }}]\n",
        admin = key(&paths.admin_key)?,
        label = wallet.key_label,
        listed = now.saturating_sub(2 * day),
    );
    write_new(&paths.policy, policy.as_bytes(), 0o644).map_err(|e| e.to_string())
}

/// A CreateWithdrawal request for an EIP-1559 ETH transfer of `wei` from the
/// dev wallet on the dev chain, as the bench and the tests send it.
pub fn transfer_request(
    request_id: &str,
    to: &str,
    wei: u128,
    nonce: u64,
    initiator: &str,
) -> crate::proto::CreateWithdrawalRequest {
    use crate::proto::{self, ethereum_transaction_fields::Type};
    proto::CreateWithdrawalRequest {
        request_id: request_id.into(),
        wallet: format!("wallets/{DEV_WALLET}"),
        initiator: initiator.into(),
        transaction: Some(proto::UnsignedTransaction {
            kind: Some(proto::unsigned_transaction::Kind::Ethereum(
                proto::EthereumTransaction {
                    encoding: Some(proto::ethereum_transaction::Encoding::Fields(
                        proto::EthereumTransactionFields {
                            r#type: Type::Eip1559.into(),
                            chain_id: DEV_CHAIN_ID,
                            nonce,
                            gas_limit: 21_000,
                            gas_price: String::new(),
                            max_fee_per_gas: "30000000000".into(),
                            max_priority_fee_per_gas: "1000000000".into(),
                            to: to.into(),
                            value: wei.to_string(),
                            data: vec![],
                        },
                    )),
                },
            )),
        }),
    }
}

/// A fresh data directory under the system temp dir, for `--dev` without `--data-dir`.
pub fn fresh_data_dir() -> Result<PathBuf, DevError> {
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| DevError::Io {
        path: std::env::temp_dir(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(std::env::temp_dir().join(format!("custos-dev-{}", hex::encode(suffix))))
}

fn random_pin() -> Result<Pin, DevError> {
    let mut bytes = Zeroizing::new([0u8; 12]);
    getrandom::fill(&mut bytes[..]).map_err(|e| DevError::Io {
        path: PathBuf::from("<random>"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Pin::from_generated(Zeroizing::new(hex::encode(&bytes[..]))))
}

fn create_dir(path: &Path) -> Result<(), DevError> {
    fs::create_dir_all(path).map_err(|source| DevError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), DevError> {
    let io = |source| DevError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}
