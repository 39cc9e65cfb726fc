//! Serving: opening the HSM and store, wiring the gRPC services, health
//! (reported by [`crate::health`]) and reflection onto a listener, and
//! shutting down gracefully.
//!
//! [`App::open`] does everything that can fail at startup, in an order that
//! leaves nothing half-created: the PIN and the HSM first, the store only once
//! the token is logged in. [`run`] is what `custosd` and the tests call.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{ApprovalApi, AuditApi, PolicyApi, WalletApi, WithdrawalApi};
use crate::checkpoints::{self, CheckpointError, Checkpointer};
use crate::config::Config;
use crate::custody::ChainConfig;
use crate::custody::governance::Genesis;
use crate::custody::{Custody, CustodyError};
use crate::guard::Guard;
use crate::hsm::{Hsm, HsmError};
use crate::proto::approval_service_server::ApprovalServiceServer;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::policy_service_server::PolicyServiceServer;
use crate::proto::wallet_service_server::WalletServiceServer;
use crate::proto::withdrawal_service_server::WithdrawalServiceServer;
use crate::secret::{Pin, SecretError};
use crate::store::{Store, StoreError};
use crate::tls::{ServerTls, TlsError};
use crate::wallet::{WalletError, Wallets};

/// Largest response message a client of custos needs to accept, in bytes:
/// the default `limits.max_response_bytes`.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The PIN could not be loaded.
    #[error("HSM PIN: {0}")]
    Pin(#[from] SecretError),
    /// The HSM could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The store could not be opened.
    #[error("store {path}: {source}")]
    Store {
        /// The database file, or its URL without credentials.
        path: String,
        /// The failure.
        source: StoreError,
    },
    /// Wallets could not be loaded.
    #[error("wallets: {0}")]
    Wallets(#[from] WalletError),
    /// The genesis policy file could not be read.
    #[error("policy.genesis_file {path}: {source}")]
    Genesis {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// Preparing the wallets before the policy failed (dev mode).
    #[error("preparing: {0}")]
    Prepare(String),
    /// Custody could not start: the policy history failed verification, or
    /// the store or the wallets failed while it was read. The message names
    /// which.
    #[error("{}", startup_label(.0))]
    Custody(#[from] CustodyError),
    /// A start-up task on the blocking pool failed.
    #[error("start-up: {0} failed")]
    Worker(&'static str),
    /// The audit log key could not be made or loaded.
    #[error("audit log: {0}")]
    Audit(#[from] CheckpointError),
    /// The TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No `[tls]` section and no `--insecure-plaintext`, or plaintext off loopback.
    #[error("{0}")]
    Transport(String),
    /// gRPC reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("gRPC transport: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What failed when custody started: its own policy checks, or the store
/// or wallet registry under them.
fn startup_label(error: &CustodyError) -> String {
    match error {
        CustodyError::Store(e) => format!("store: {e}"),
        CustodyError::Wallet(e) => format!("wallets: {e}"),
        CustodyError::Worker => "custody: a start-up task failed".to_owned(),
        other => format!("policy: {other}"),
    }
}

/// Everything the services need, opened and checked.
#[derive(Debug, Clone)]
pub struct App {
    /// The wallet registry.
    pub wallets: Arc<Wallets>,
    /// The HSM (shared with the registry).
    pub hsm: Hsm,
    /// Chain parameters: the networks and token registry transactions are parsed against.
    pub chains: ChainConfig,
    /// The custody engine: withdrawals, votes, governance.
    pub custody: Arc<Custody>,
    /// The store, for the audit log's reads.
    pub store: Arc<Store>,
    /// The log key and checkpoint issuer.
    pub checkpointer: Arc<Checkpointer>,
    /// mTLS, or `None` for plaintext (`--insecure-plaintext`, loopback only).
    pub tls: Option<Arc<ServerTls>>,
    /// Authorization and request limits in front of every service.
    pub guard: Arc<Guard>,
    /// The limits the guard and the transport enforce.
    pub limits: crate::guard::LimitsConfig,
    /// The Prometheus listener [`run`] serves, if the caller bound one
    /// (`custosd` does for `[metrics]`); see [`crate::metrics`].
    pub metrics: Option<crate::exporter::Listener>,
}

/// The transport `config` asks for: mTLS from `[tls]`, or plaintext when
/// `--insecure-plaintext` was given, which only a loopback listener may use.
fn transport(config: &Config) -> Result<Option<Arc<ServerTls>>, ServerError> {
    if config.server.insecure_plaintext {
        if !config.server.listen.ip().is_loopback() {
            return Err(ServerError::Transport(format!(
                "--insecure-plaintext serves only on loopback; {} is not a loopback address",
                config.server.listen
            )));
        }
        tracing::warn!(
            listen = %config.server.listen,
            "--insecure-plaintext: no TLS and no client authentication; every caller holds every role"
        );
        return Ok(None);
    }
    let tls = config.tls.as_ref().ok_or_else(|| {
        ServerError::Transport(
            "the config has no [tls] section: custosd serves mTLS only (or plaintext on loopback with --insecure-plaintext)"
                .into(),
        )
    })?;
    if config.clients.is_empty() {
        tracing::warn!("no [[clients]] configured: every RPC but health checks will be refused");
    }
    Ok(Some(Arc::new(ServerTls::load(tls, config.clients.clone())?)))
}

/// How often the background task expires ended approval windows and retries
/// signing of APPROVED withdrawals.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl App {
    /// Opens the HSM, then the store, then loads the wallets and the policy.
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        Self::open_with(config, |_| async { Ok(()) }).await
    }

    /// Like [`App::open`], but runs `prepare` on the wallet registry before
    /// the genesis policy is read. Dev mode uses it to create its wallet and
    /// write a genesis policy that names the wallet's HSM key.
    pub async fn open_with<F, Fut>(config: &Config, prepare: F) -> Result<Self, ServerError>
    where
        F: FnOnce(Arc<Wallets>) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let tls = transport(config)?;
        let pin = Pin::load(&config.hsm.pin)?;
        let hsm = Hsm::open(&config.hsm, pin).await?;
        let store_config = config.store.clone();
        let store = tokio::task::spawn_blocking(move || Store::open_config(&store_config))
            .await
            .map_err(|_| ServerError::Worker("opening the store"))?
            .map_err(|source| ServerError::Store {
                path: config.store.describe(),
                source,
            })?;
        let store = Arc::new(store);
        let wallets =
            Arc::new(Wallets::open(hsm.clone(), Arc::clone(&store), config.chains.bitcoin_network).await?);
        prepare(Arc::clone(&wallets))
            .await
            .map_err(ServerError::Prepare)?;
        let checkpointer =
            Arc::new(Checkpointer::open(hsm.clone(), Arc::clone(&store), &config.audit).await?);
        let custody = Custody::new(
            Arc::clone(&store),
            Arc::clone(&wallets),
            config.chains.clone(),
            config.service_id.clone(),
        );
        let genesis = match &config.policy {
            None => None,
            Some(policy) => Some(Genesis {
                document: std::fs::read(&policy.genesis_file).map_err(|source| ServerError::Genesis {
                    path: policy.genesis_file.display().to_string(),
                    source,
                })?,
                pinned_admin_keys: policy.admin_keys.clone(),
            }),
        };
        custody.initialise(genesis).await?;
        Ok(Self {
            wallets,
            hsm,
            chains: config.chains.clone(),
            custody: Arc::new(custody),
            store,
            checkpointer,
            metrics: None,
            tls,
            guard: Guard::new(config.limits.clone()),
            limits: config.limits.clone(),
        })
    }
}

/// Serves custos on `listener` until `shutdown` completes, then drains
/// in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    // The guard refuses oversized messages first, with RESOURCE_EXHAUSTED;
    // tonic's own limits stay as a backstop.
    let (max_request, max_response) = (app.limits.max_request_bytes, app.limits.max_response_bytes);
    let wallet_service = WalletServiceServer::new(WalletApi::new(Arc::clone(&app.wallets)))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(max_response);

    let withdrawal_service = WithdrawalServiceServer::new(WithdrawalApi::new(Arc::clone(&app.custody)))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(max_response);
    let approval_service = ApprovalServiceServer::new(ApprovalApi::new(Arc::clone(&app.custody)))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(max_response);
    let policy_service = PolicyServiceServer::new(PolicyApi::new(Arc::clone(&app.custody)))
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(max_response);

    let audit_service = AuditServiceServer::new(AuditApi::new(
        Arc::clone(&app.store),
        Arc::clone(&app.checkpointer),
    ))
    .max_decoding_message_size(max_request)
    .max_encoding_message_size(max_response);

    // Withdrawals a crash or outage left APPROVED are signed now, and ended
    // approval windows expire, before and while serving.
    let sweeper = tokio::spawn(sweep(Arc::clone(&app.custody)));
    // Metrics on their own port, for as long as this function runs.
    let _metrics = app
        .metrics
        .as_ref()
        .and_then(|l| crate::exporter::spawn(l, Arc::clone(&app.store)));
    let (stop_checkpoints, checkpoints_stopped) = tokio::sync::oneshot::channel::<()>();
    let checkpoint_issuer = tokio::spawn(checkpoints::run(Arc::clone(&app.checkpointer), async {
        let _ = checkpoints_stopped.await;
    }));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    crate::health::report(&health_reporter, tonic_health::ServingStatus::Serving).await;
    let health_monitor = tokio::spawn(crate::health::monitor(
        health_reporter.clone(),
        Arc::clone(&app.store),
        app.hsm.clone(),
    ));

    // Both reflection versions: grpcurl and current clients speak v1, the
    // stock Python `grpcio-reflection` client still only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "custosd serving");
    }
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(app.limits.keepalive_interval))
        .http2_keepalive_timeout(Some(app.limits.keepalive_timeout))
        .max_concurrent_streams(u32::try_from(app.limits.max_concurrent_requests).ok())
        .layer(app.guard.layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(wallet_service)
        .add_service(withdrawal_service)
        .add_service(approval_service)
        .add_service(policy_service)
        .add_service(audit_service)
        .serve_with_incoming_shutdown(crate::tls::incoming(listener, app.tls.clone()), async {
            shutdown.await;
            tracing::info!("shutdown requested; draining in-flight requests");
            health_monitor.abort();
            crate::health::report(&health_reporter, tonic_health::ServingStatus::NotServing).await;
        })
        .await;
    sweeper.abort();
    // Last: a checkpoint covering everything logged before the stop.
    let _ = stop_checkpoints.send(());
    if checkpoint_issuer.await.is_err() {
        tracing::error!("checkpoint issuer failed during shutdown");
    }
    tracing::info!("custosd stopped");
    Ok(result?)
}

/// Expires ended approval windows and signs APPROVED withdrawals, forever.
async fn sweep(custody: Arc<Custody>) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(e) = custody.expire_due().await {
            tracing::warn!(error = %e, "expiring withdrawals failed; will retry");
        }
        if let Err(e) = custody.resume().await {
            tracing::warn!(error = %e, "resuming approved withdrawals failed; will retry");
        }
    }
}

/// Installs SIGTERM and SIGINT handlers now, and returns a future that
/// completes on the first of them.
///
/// Call it before announcing readiness: a signal that arrives between the
/// announcement and the installation would otherwise kill the process
/// without a graceful shutdown. Must be called inside a tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop custosd with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A custody start-up failure is labelled by what failed, not always
    /// "policy".
    #[test]
    fn startup_failures_name_what_failed() {
        let store = ServerError::from(CustodyError::Store(StoreError::Conflict("wallet")));
        assert!(store.to_string().starts_with("store: "), "{store}");
        let wallets = ServerError::from(CustodyError::Wallet(WalletError::Worker));
        assert!(wallets.to_string().starts_with("wallets: "), "{wallets}");
        let policy = ServerError::from(CustodyError::Inconsistent("genesis admins differ".into()));
        assert!(policy.to_string().starts_with("policy: "), "{policy}");
        assert_eq!(
            ServerError::Worker("opening the store").to_string(),
            "start-up: opening the store failed"
        );
    }
}
