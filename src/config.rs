//! The `custosd` configuration file: TOML in, validated types out.
//!
//! The file is parsed into `Raw*` structs that reject unknown fields, then
//! converted into [`Config`], whose types make invalid combinations (two token
//! selectors, no PIN source, zero sessions) unrepresentable.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access::{ClientEntry, ClientIdentity, ClientRegistry, Role, Roles};
use crate::checkpoints::{AuditConfig, DEFAULT_CHECKPOINT_ENTRIES, DEFAULT_CHECKPOINT_SECONDS};
use crate::custody::ChainConfig;
use crate::exporter::MetricsConfig;
use crate::guard::LimitsConfig;
use crate::hsm::{DEFAULT_HSM_CALL_TIMEOUT_MS, DEFAULT_SESSIONS, HsmConfig, TokenSelector};
use crate::secret::PinSource;
use crate::store::StoreConfig;
use crate::store::postgres::PgSettings;
use crate::telemetry::LogFormat;
use crate::tls::TlsConfig;
use custos_core::chain::ethereum::{EthereumNetwork, Token};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listener and logging.
    pub server: ServerConfig,
    /// The PKCS#11 token holding wallet keys.
    pub hsm: HsmConfig,
    /// The store: SQLite or PostgreSQL.
    pub store: StoreConfig,
    /// Chain parameters used to derive addresses.
    pub chains: ChainConfig,
    /// This deployment's identity in signed messages.
    pub service_id: String,
    /// The genesis policy and the admin keys pinned for it, if configured.
    pub policy: Option<PolicyConfig>,
    /// The audit log's origin, key and checkpoint cadence.
    pub audit: AuditConfig,
    /// The Prometheus endpoint (`[metrics]`); `None` serves no metrics.
    pub metrics: Option<MetricsConfig>,
    /// The server's certificate and the client CA; `None` only when the
    /// configuration has no `[tls]` section, which custosd serves only with
    /// `--insecure-plaintext` on loopback.
    pub tls: Option<TlsConfig>,
    /// The client identities and their roles.
    pub clients: ClientRegistry,
    /// Request size, deadline, concurrency and rate limits.
    pub limits: LimitsConfig,
}

/// Default `service.id`.
pub const DEFAULT_SERVICE_ID: &str = "custos";

/// The genesis policy: set at initialisation, its admins pinned here.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The genesis policy document.
    pub genesis_file: PathBuf,
    /// SEC1 compressed secp256k1 admin keys the genesis policy must list, exactly.
    pub admin_keys: std::collections::BTreeSet<Vec<u8>>,
}

/// Listener and log settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind, e.g. `127.0.0.1:50051`. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Log line format.
    pub log_format: LogFormat,
    /// Serve plaintext gRPC without client authentication. Never read from
    /// the file: only `custosd --insecure-plaintext` sets it, and only a
    /// loopback listener may use it.
    pub insecure_plaintext: bool,
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown field, or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the line and field.
        message: String,
    },
    /// The values parse but do not make a usable configuration.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        raw.try_into()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    hsm: RawHsm,
    store: StoreRaw,
    #[serde(default)]
    bitcoin: RawBitcoin,
    #[serde(default)]
    ethereum: RawEthereum,
    #[serde(default)]
    service: RawService,
    policy: Option<RawPolicyConfig>,
    #[serde(default)]
    audit: RawAudit,
    metrics: Option<RawMetrics>,
    tls: Option<RawTls>,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    identity: String,
    roles: Vec<Role>,
    approver_id: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    max_deadline_ms: Option<u64>,
    max_concurrent_requests: Option<usize>,
    requests_per_second: Option<f64>,
    burst: Option<f64>,
    keepalive_interval_seconds: Option<u64>,
    keepalive_timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    origin: Option<String>,
    key_algorithm: Option<String>,
    checkpoint_every_entries: Option<u64>,
    checkpoint_every_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: SocketAddr,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyConfig {
    genesis_file: PathBuf,
    admin_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEthereum {
    chain_id: u64,
    #[serde(default)]
    tokens: Vec<RawToken>,
}

impl Default for RawEthereum {
    fn default() -> Self {
        Self {
            chain_id: 1,
            tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    symbol: String,
    contract: String,
    decimals: u8,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: SocketAddr,
    #[serde(default)]
    log_format: LogFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: PathBuf,
    token_label: Option<String>,
    token_serial: Option<String>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    sessions: Option<usize>,
    call_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreRaw {
    /// SQLite: the database file.
    path: Option<PathBuf>,
    /// PostgreSQL: `postgres://user@host:port/database`.
    url: Option<String>,
    /// PostgreSQL: the file (mode 0600) holding the password.
    password_file: Option<PathBuf>,
    /// PostgreSQL: the CA (PEM) that signs the server's certificate; TLS.
    ca_file: Option<PathBuf>,
    /// PostgreSQL: connections for reads.
    read_pool: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBitcoin {
    network: String,
}

impl Default for RawBitcoin {
    fn default() -> Self {
        Self {
            network: "bitcoin".into(),
        }
    }
}

/// `[store]`: `path` for SQLite, or `url` (with `password_file`, `ca_file`
/// and `read_pool`) for PostgreSQL; exactly one of the two.
fn store_config(raw: StoreRaw) -> Result<StoreConfig, ConfigError> {
    let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
    match (raw.path, raw.url) {
        (Some(path), None) => {
            if raw.password_file.is_some() || raw.ca_file.is_some() || raw.read_pool.is_some() {
                return invalid(
                    "store.password_file, store.ca_file and store.read_pool apply to store.url (PostgreSQL) only",
                );
            }
            Ok(StoreConfig::Sqlite { path })
        }
        (None, Some(url)) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return invalid("store.url must be a postgres:// URL");
            }
            let read_pool = raw.read_pool.unwrap_or(8);
            if !(1..=256).contains(&read_pool) {
                return invalid("store.read_pool must be between 1 and 256");
            }
            Ok(StoreConfig::Postgres(PgSettings {
                url,
                password_file: raw.password_file,
                ca_file: raw.ca_file,
                read_pool,
            }))
        }
        (Some(_), Some(_)) => invalid("set store.path (SQLite) or store.url (PostgreSQL), not both"),
        (None, None) => invalid("set store.path (SQLite) or store.url (PostgreSQL)"),
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let invalid = |m: &str| ConfigError::Invalid(m.to_owned());
        let token = match (raw.hsm.token_label, raw.hsm.token_serial) {
            (Some(label), None) if !label.is_empty() => TokenSelector::Label(label),
            (None, Some(serial)) if !serial.is_empty() => TokenSelector::Serial(serial),
            (Some(_), Some(_)) => return Err(invalid("hsm: set token_label or token_serial, not both")),
            _ => return Err(invalid("hsm: token_label or token_serial is required")),
        };
        let pin = match (raw.hsm.pin_file, raw.hsm.pin_env) {
            (Some(file), None) => PinSource::File(file),
            (None, Some(var)) if !var.is_empty() => PinSource::Env(var),
            (Some(_), Some(_)) => return Err(invalid("hsm: set pin_file or pin_env, not both")),
            _ => return Err(invalid("hsm: pin_file or pin_env is required")),
        };
        let sessions = NonZeroUsize::new(raw.hsm.sessions.unwrap_or(DEFAULT_SESSIONS))
            .filter(|n| n.get() <= 256)
            .ok_or_else(|| invalid("hsm.sessions must be between 1 and 256"))?;
        let call_timeout_ms = raw.hsm.call_timeout_ms.unwrap_or(DEFAULT_HSM_CALL_TIMEOUT_MS);
        if !(100..=600_000).contains(&call_timeout_ms) {
            return Err(invalid("hsm.call_timeout_ms must be between 100 and 600000"));
        }
        let bitcoin_network = parse_bitcoin_network(&raw.bitcoin.network)?;
        let service_id = raw.service.id.unwrap_or_else(|| DEFAULT_SERVICE_ID.to_owned());
        if !custos_core::policy::document::is_identifier(&service_id) {
            return Err(invalid(
                "service.id must be 1 to 64 characters of [A-Za-z0-9-_.:/]",
            ));
        }
        let policy = raw.policy.map(parse_policy_config).transpose()?;
        let audit = parse_audit(raw.audit, &service_id)?;
        Ok(Config {
            service_id,
            policy,
            audit,
            metrics: raw.metrics.map(|m| MetricsConfig { listen: m.listen }),
            tls: raw.tls.map(|t| TlsConfig {
                cert_file: t.cert_file,
                key_file: t.key_file,
                client_ca_file: t.client_ca_file,
            }),
            clients: parse_clients(raw.clients)?,
            limits: parse_limits(raw.limits)?,
            server: ServerConfig {
                listen: raw.server.listen,
                log_format: raw.server.log_format,
                insecure_plaintext: false,
            },
            hsm: HsmConfig {
                module: raw.hsm.module,
                token,
                pin,
                sessions,
                call_timeout: Duration::from_millis(call_timeout_ms),
            },
            store: store_config(raw.store)?,
            chains: ChainConfig {
                bitcoin_network,
                ethereum: parse_ethereum(raw.ethereum)?,
            },
        })
    }
}

fn parse_clients(raw: Vec<RawClient>) -> Result<ClientRegistry, ConfigError> {
    let mut entries = Vec::with_capacity(raw.len());
    for (index, client) in raw.into_iter().enumerate() {
        let identity = ClientIdentity::parse(&client.identity).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "clients[{index}].identity must be \"uri:<URI SAN>\" or \"dns:<DNS SAN>\""
            ))
        })?;
        if let Some(id) = &client.approver_id
            && !custos_core::policy::document::is_identifier(id)
        {
            return Err(ConfigError::Invalid(format!(
                "clients[{index}].approver_id is not a valid approver id"
            )));
        }
        entries.push(ClientEntry {
            identity,
            roles: Roles::of(&client.roles),
            approver_id: client.approver_id,
        });
    }
    ClientRegistry::new(entries).map_err(|e| ConfigError::Invalid(e.to_string()))
}

fn parse_limits(raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
    let defaults = LimitsConfig::default();
    let within = |name: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::Invalid(format!(
                "limits.{name} must be between {} and {}",
                range.start(),
                range.end()
            )))
        }
    };
    let max_request_bytes = within(
        "max_request_bytes",
        raw.max_request_bytes.unwrap_or(defaults.max_request_bytes) as u64,
        1024..=64 * 1024 * 1024,
    )? as usize;
    let max_response_bytes = within(
        "max_response_bytes",
        raw.max_response_bytes.unwrap_or(defaults.max_response_bytes) as u64,
        64 * 1024..=256 * 1024 * 1024,
    )? as usize;
    let deadline_ms = within(
        "max_deadline_ms",
        raw.max_deadline_ms
            .unwrap_or(defaults.max_deadline.as_millis() as u64),
        100..=3_600_000,
    )?;
    let max_concurrent_requests = within(
        "max_concurrent_requests",
        raw.max_concurrent_requests
            .unwrap_or(defaults.max_concurrent_requests) as u64,
        1..=100_000,
    )? as usize;
    let rate = raw.requests_per_second.unwrap_or(defaults.requests_per_second);
    let burst = raw.burst.unwrap_or(defaults.burst);
    if !(rate.is_finite() && (0.01..=1_000_000.0).contains(&rate)) {
        return Err(ConfigError::Invalid(
            "limits.requests_per_second must be between 0.01 and 1000000".into(),
        ));
    }
    if !(burst.is_finite() && (1.0..=10_000_000.0).contains(&burst)) {
        return Err(ConfigError::Invalid(
            "limits.burst must be between 1 and 10000000".into(),
        ));
    }
    let keepalive_interval = within(
        "keepalive_interval_seconds",
        raw.keepalive_interval_seconds
            .unwrap_or(defaults.keepalive_interval.as_secs()),
        1..=3600,
    )?;
    let keepalive_timeout = within(
        "keepalive_timeout_seconds",
        raw.keepalive_timeout_seconds
            .unwrap_or(defaults.keepalive_timeout.as_secs()),
        1..=600,
    )?;
    Ok(LimitsConfig {
        max_request_bytes,
        max_response_bytes,
        max_deadline: Duration::from_millis(deadline_ms),
        max_concurrent_requests,
        requests_per_second: rate,
        burst,
        keepalive_interval: Duration::from_secs(keepalive_interval),
        keepalive_timeout: Duration::from_secs(keepalive_timeout),
    })
}

fn parse_audit(raw: RawAudit, service_id: &str) -> Result<AuditConfig, ConfigError> {
    let invalid = |m: &str| ConfigError::Invalid(m.to_owned());
    let origin = raw.origin.unwrap_or_else(|| format!("custos.local/{service_id}"));
    if origin.is_empty()
        || origin.len() > 255
        || origin
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '+')
    {
        return Err(invalid(
            "audit.origin must be 1 to 255 characters without spaces or '+'",
        ));
    }
    let key_kind = match raw.key_algorithm.as_deref().unwrap_or("ed25519") {
        "ed25519" => custos_core::key::KeyKind::Ed25519,
        "p256" => custos_core::key::KeyKind::P256,
        _ => return Err(invalid("audit.key_algorithm must be \"ed25519\" or \"p256\"")),
    };
    let checkpoint_every_entries = raw.checkpoint_every_entries.unwrap_or(DEFAULT_CHECKPOINT_ENTRIES);
    if !(1..=1_000_000).contains(&checkpoint_every_entries) {
        return Err(invalid(
            "audit.checkpoint_every_entries must be between 1 and 1000000",
        ));
    }
    let seconds = raw.checkpoint_every_seconds.unwrap_or(DEFAULT_CHECKPOINT_SECONDS);
    if !(1..=86_400).contains(&seconds) {
        return Err(invalid(
            "audit.checkpoint_every_seconds must be between 1 and 86400",
        ));
    }
    Ok(AuditConfig {
        origin,
        key_kind,
        checkpoint_every_entries,
        checkpoint_every: Duration::from_secs(seconds),
    })
}

fn parse_policy_config(raw: RawPolicyConfig) -> Result<PolicyConfig, ConfigError> {
    let mut admin_keys = std::collections::BTreeSet::new();
    for (index, key) in raw.admin_keys.iter().enumerate() {
        let sec1 = key
            .strip_prefix("secp256k1:")
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() == 33 && k256::ecdsa::VerifyingKey::from_sec1_bytes(b).is_ok())
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "policy.admin_keys[{index}] must be \"secp256k1:<33-byte compressed key, hex>\""
                ))
            })?;
        if !admin_keys.insert(sec1) {
            return Err(ConfigError::Invalid(format!(
                "policy.admin_keys[{index}] is listed twice"
            )));
        }
    }
    if admin_keys.is_empty() {
        return Err(ConfigError::Invalid(
            "policy.admin_keys must pin at least one key".into(),
        ));
    }
    Ok(PolicyConfig {
        genesis_file: raw.genesis_file,
        admin_keys,
    })
}

fn parse_ethereum(raw: RawEthereum) -> Result<EthereumNetwork, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    if raw.chain_id == 0 {
        return Err(invalid("ethereum.chain_id must not be 0".into()));
    }
    let mut tokens: Vec<Token> = Vec::with_capacity(raw.tokens.len());
    for (index, token) in raw.tokens.into_iter().enumerate() {
        let contract = alloy_primitives::Address::parse_checksummed(&token.contract, None).map_err(|_| {
            invalid(format!(
                "ethereum.tokens[{index}].contract {:?} is not an EIP-55 checksummed address",
                token.contract
            ))
        })?;
        let symbol_ok = !token.symbol.is_empty()
            && token.symbol.len() <= 16
            && token
                .symbol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.');
        if !symbol_ok {
            return Err(invalid(format!(
                "ethereum.tokens[{index}].symbol must be 1 to 16 ASCII letters, digits or '.'"
            )));
        }
        if token.decimals > 36 {
            return Err(invalid(format!(
                "ethereum.tokens[{index}].decimals must be at most 36"
            )));
        }
        if tokens
            .iter()
            .any(|t| t.contract == contract || t.symbol == token.symbol)
        {
            return Err(invalid(format!(
                "ethereum.tokens[{index}] repeats a contract or symbol"
            )));
        }
        tokens.push(Token {
            symbol: token.symbol,
            contract,
            decimals: token.decimals,
        });
    }
    Ok(EthereumNetwork {
        chain_id: raw.chain_id,
        tokens,
    })
}

/// Parses a Bitcoin network name as used in config and on the command line.
pub fn parse_bitcoin_network(name: &str) -> Result<bitcoin::Network, ConfigError> {
    match name {
        "bitcoin" | "mainnet" => Ok(bitcoin::Network::Bitcoin),
        "testnet" => Ok(bitcoin::Network::Testnet),
        "signet" => Ok(bitcoin::Network::Signet),
        "regtest" => Ok(bitcoin::Network::Regtest),
        other => Err(ConfigError::Invalid(format!(
            "bitcoin.network {other:?} is not one of bitcoin, testnet, signet, regtest"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        [server]
        listen = "127.0.0.1:0"
        log_format = "json"

        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "custos"
        pin_file = "/etc/custos/pin"
        sessions = 2

        [store]
        path = "/var/lib/custos/custos.db"

        [bitcoin]
        network = "regtest"

        [ethereum]
        chain_id = 11155111

        [[ethereum.tokens]]
        symbol = "USDC"
        contract = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"
        decimals = 6
    "#;

    #[test]
    fn valid_config_parses() {
        let config = Config::parse(VALID).unwrap();
        assert_eq!(config.hsm.token, TokenSelector::Label("custos".into()));
        assert_eq!(config.hsm.sessions.get(), 2);
        assert_eq!(config.server.log_format, LogFormat::Json);
        assert_eq!(config.chains.bitcoin_network, bitcoin::Network::Regtest);
        assert_eq!(config.chains.ethereum.chain_id, 11155111);
        assert_eq!(config.chains.ethereum.tokens[0].decimals, 6);
    }

    #[test]
    fn metrics_section_is_optional_and_strict() {
        assert_eq!(Config::parse(VALID).unwrap().metrics, None);
        let with = format!("{VALID}\n[metrics]\nlisten = \"127.0.0.1:9464\"\n");
        let listen = Config::parse(&with).unwrap().metrics.unwrap().listen;
        assert_eq!(listen, "127.0.0.1:9464".parse().unwrap());
        let typo = format!("{VALID}\n[metrics]\nlisten = \"127.0.0.1:9464\"\npath = \"/m\"\n");
        assert!(Config::parse(&typo).unwrap_err().to_string().contains("path"));
    }

    #[test]
    fn token_registry_is_strict() {
        let lower = VALID.replace(
            "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238",
            "0x1c7d4b196cb0c7b01d743fbc6116a902379c7238",
        );
        assert!(Config::parse(&lower).unwrap_err().to_string().contains("EIP-55"));
        let twice = format!(
            "{VALID}\n[[ethereum.tokens]]\nsymbol = \"USDC2\"\ncontract = \"0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238\"\ndecimals = 6\n"
        );
        assert!(Config::parse(&twice).unwrap_err().to_string().contains("repeats"));
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let text = VALID.replace("sessions = 2", "sessions = 2\nsesions = 3");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("sesions"), "{err}");
    }

    #[test]
    fn ambiguous_or_missing_selectors_are_refused() {
        let both = VALID.replace(
            "token_label = \"custos\"",
            "token_label = \"a\"\ntoken_serial = \"b\"",
        );
        assert!(Config::parse(&both).unwrap_err().to_string().contains("not both"));
        let no_pin = VALID.replace("pin_file = \"/etc/custos/pin\"", "");
        assert!(
            Config::parse(&no_pin)
                .unwrap_err()
                .to_string()
                .contains("pin_file or pin_env")
        );
        let zero = VALID.replace("sessions = 2", "sessions = 0");
        assert!(Config::parse(&zero).unwrap_err().to_string().contains("sessions"));
        let net = VALID.replace("\"regtest\"", "\"dogecoin\"");
        assert!(Config::parse(&net).unwrap_err().to_string().contains("dogecoin"));
    }

    #[test]
    fn clients_and_limits_are_validated() {
        let with = |extra: &str| Config::parse(&format!("{VALID}\n{extra}"));
        let config = with(
            "[[clients]]\nidentity = \"uri:spiffe://x/alice\"\nroles = [\"approver\"]\napprover_id = \"alice\"\n\
             [limits]\nrequests_per_second = 2.5\nburst = 5\n",
        )
        .unwrap();
        assert_eq!(config.clients.len(), 1);
        assert_eq!(config.limits.requests_per_second, 2.5);
        assert_eq!(
            config.limits.max_request_bytes,
            LimitsConfig::default().max_request_bytes
        );
        for (extra, expected) in [
            (
                "[[clients]]\nidentity = \"spiffe://x\"\nroles = [\"admin\"]\n",
                "clients[0].identity",
            ),
            (
                "[[clients]]\nidentity = \"dns:a\"\nroles = [\"root\"]\n",
                "unknown variant",
            ),
            (
                "[[clients]]\nidentity = \"dns:a\"\nroles = [\"approver\"]\n",
                "approver_id is required",
            ),
            ("[[clients]]\nidentity = \"dns:a\"\nroles = []\n", "has no roles"),
            ("[limits]\nmax_request_bytes = 10\n", "limits.max_request_bytes"),
            (
                "[limits]\nrequests_per_second = 0\n",
                "limits.requests_per_second",
            ),
            ("[limits]\nmax_deadline_ms = 0\n", "limits.max_deadline_ms"),
            ("[limits]\nmax_concurent_requests = 5\n", "unknown field"),
            ("[tls]\ncert_file = \"/a\"\nkey_file = \"/b\"\n", "client_ca_file"),
        ] {
            let err = with(extra).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
    }

    /// `[store]` takes a SQLite path or a PostgreSQL URL, exactly one, and
    /// refuses a password in the URL's place of a password file.
    #[test]
    fn store_section_names_one_backend() {
        let with_store = |store: &str| VALID.replace("path = \"/var/lib/custos/custos.db\"", store);
        let config = Config::parse(&with_store(
            "url = \"postgres://custos@db.internal:5432/custos\"\npassword_file = \"/etc/custos/db-password\"\nca_file = \"/etc/custos/db-ca.pem\"\nread_pool = 4",
        ))
        .unwrap();
        match &config.store {
            StoreConfig::Postgres(pg) => {
                assert_eq!(pg.url, "postgres://custos@db.internal:5432/custos");
                assert_eq!(pg.read_pool, 4);
                assert_eq!(
                    pg.password_file.as_deref(),
                    Some(Path::new("/etc/custos/db-password"))
                );
                assert_eq!(pg.ca_file.as_deref(), Some(Path::new("/etc/custos/db-ca.pem")));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(config.store.describe(), "postgres://…@db.internal:5432/custos");
        for (store, expected) in [
            ("", "set store.path (SQLite) or store.url (PostgreSQL)"),
            ("path = \"/a\"\nurl = \"postgres://h/d\"", "not both"),
            ("url = \"mysql://h/d\"", "postgres:// URL"),
            ("url = \"postgres://h/d\"\nread_pool = 0", "read_pool"),
            ("path = \"/a\"\nread_pool = 2", "apply to store.url"),
            ("path = \"/a\"\nca_file = \"/ca.pem\"", "apply to store.url"),
        ] {
            let error = Config::parse(&with_store(store)).unwrap_err().to_string();
            assert!(error.contains(expected), "{store}: {error}");
        }
        // A password in the URL never reaches a message.
        let secret = StoreConfig::Postgres(PgSettings {
            url: "postgres://custos:hunter2@db/custos".into(),
            password_file: None,
            ca_file: None,
            read_pool: 1,
        });
        assert!(!secret.describe().contains("hunter2"));
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn shipped_examples_parse() {
        let example = Config::parse(include_str!("../hsm-config/custosd.example.toml")).unwrap();
        assert!(example.tls.is_some());
        assert_eq!(example.clients.len(), 4);
        let rest = "[server]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"/tmp/c.db\"\n";
        for vendor in [
            include_str!("../hsm-config/thales-luna.toml"),
            include_str!("../hsm-config/entrust-nshield.toml"),
            include_str!("../hsm-config/aws-cloudhsm.toml"),
            include_str!("../hsm-config/yubihsm2.toml"),
        ] {
            let config = Config::parse(&format!("{rest}{vendor}")).unwrap();
            assert!(config.hsm.module.is_absolute());
        }
    }
}
