//! `custosd`: the custos signing server.
//!
//! `custosd --config FILE` serves with a configuration file;
//! `custosd --dev` creates a SoftHSM token, config, store and mTLS
//! certificates on the fly and serves on loopback (see `custos::dev`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use custos::config::Config;
use custos::dev::{self, DevPaths, DevReady};
use custos::server::{self, App};
use custos::telemetry;
use custos::telemetry::LogFormat;

/// The custos signing server.
#[derive(Debug, Parser)]
#[command(name = "custosd", version, about)]
struct Args {
    /// Configuration file (TOML). See hsm-config/custosd.example.toml.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "dev",
        conflicts_with = "dev"
    )]
    config: Option<PathBuf>,
    /// Development mode: fresh SoftHSM token, config, store and dev mTLS
    /// certificates under --data-dir, on loopback only. Never for production.
    #[arg(long)]
    dev: bool,
    /// Dev-mode data directory (default: a new directory under the system temp dir).
    #[arg(long, value_name = "DIR", requires = "dev")]
    data_dir: Option<PathBuf>,
    /// PKCS#11 module for dev mode.
    #[arg(long, value_name = "PATH", requires = "dev", env = "CUSTOS_DEV_PKCS11_MODULE", default_value = dev::DEFAULT_SOFTHSM_MODULE)]
    module: PathBuf,
    /// Dev mode on PostgreSQL instead of a SQLite file: the database URL
    /// (`postgres://user@host:port/db`), written into the dev config on first use.
    #[arg(long, value_name = "URL", requires = "dev", env = "CUSTOS_DEV_STORE_URL")]
    store_url: Option<String>,
    /// The file (mode 0600) holding the --store-url database's password.
    #[arg(
        long,
        value_name = "PATH",
        requires = "store_url",
        env = "CUSTOS_DEV_STORE_PASSWORD_FILE"
    )]
    store_password_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signs the --store-url server's
    /// certificate: the store connects over TLS and verifies it.
    #[arg(
        long,
        value_name = "PATH",
        requires = "store_url",
        env = "CUSTOS_DEV_STORE_CA_FILE"
    )]
    store_ca_file: Option<PathBuf>,
    /// Address to listen on, overriding the config (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve plaintext gRPC with no client authentication: every caller holds
    /// every role. Only on a loopback address; logs a warning. For local
    /// debugging with tools that cannot present a client certificate.
    #[arg(long)]
    insecure_plaintext: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = if args.dev {
        run_dev(&args)
    } else {
        run_config(&args)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "custosd: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_config(args: &Args) -> Result<(), String> {
    let path = args.config.as_ref().ok_or("--config FILE is required")?;
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    config.server.insecure_plaintext = args.insecure_plaintext;
    telemetry::init(config.server.log_format);
    serve(config, None)
}

fn run_dev(args: &Args) -> Result<(), String> {
    let data_dir = match &args.data_dir {
        Some(dir) => std::path::absolute(dir).map_err(|e| format!("--data-dir: {e}"))?,
        None => dev::fresh_data_dir().map_err(|e| e.to_string())?,
    };
    let paths = DevPaths::new(&data_dir);
    // A directory chosen here must be passed on to the re-executed process.
    let extra_args: Vec<std::ffi::OsString> = match args.data_dir {
        Some(_) => Vec::new(),
        None => vec!["--data-dir".into(), data_dir.into_os_string()],
    };
    dev::reexec_with_softhsm_conf(&paths, &args.module, &extra_args).map_err(|e| e.to_string())?;
    telemetry::init(LogFormat::Text);
    let postgres = args
        .store_url
        .as_ref()
        .map(|url| custos::store::postgres::PgSettings {
            url: url.clone(),
            password_file: args.store_password_file.clone(),
            ca_file: args.store_ca_file.clone(),
            read_pool: 8,
        });
    let mut config =
        dev::prepare_on(&paths, &args.module, args.listen, postgres.as_ref()).map_err(|e| e.to_string())?;
    // Dev mode always serves metrics, on a free loopback port unless the config names one.
    config.metrics.get_or_insert(custos::exporter::MetricsConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    });
    config.server.insecure_plaintext = args.insecure_plaintext;
    tracing::warn!(
        "development mode: SoftHSM token with PINs, CA key and client keys on disk; never use in production"
    );
    serve(config, Some((paths, args.module.clone())))
}

fn serve(config: Config, dev: Option<(DevPaths, PathBuf)>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let shutdown = server::shutdown_signal();
        let mut app = match &dev {
            Some((paths, _)) => App::open_with(&config, |wallets| dev::bootstrap(paths, wallets)).await,
            None => App::open(&config).await,
        }
        .map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
        let listen = listener.local_addr().map_err(|e| e.to_string())?;
        if let Some(metrics) = &config.metrics {
            let bound = custos::exporter::Listener::bind(metrics.listen)
                .await
                .map_err(|e| format!("cannot listen for metrics on {}: {e}", metrics.listen))?;
            app.metrics = Some(bound);
        }
        if let Some((paths, module)) = dev {
            let ready = DevReady {
                event: "custosd.dev.ready",
                listen,
                endpoint: if config.server.insecure_plaintext {
                    format!("http://{listen}")
                } else {
                    format!("https://{listen}")
                },
                module,
                token_label: dev::DEV_TOKEN_LABEL,
                log_verifier_key: app.checkpointer.verifier().encode(),
                metrics_endpoint: app.metrics.as_ref().map(|m| m.url()),
                paths,
            };
            let line = serde_json::to_string(&ready).map_err(|e| e.to_string())?;
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{line}")
                .and_then(|()| stdout.flush())
                .map_err(|e| e.to_string())?;
        }
        server::run(listener, app, shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}
