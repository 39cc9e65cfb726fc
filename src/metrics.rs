//! Prometheus metrics on a port of their own: `GET /metrics`.
//!
//! Two kinds of numbers are exported:
//! - **events**, counted where they happen: decisions by outcome and rule
//!   ([`decided`], after the decision is committed), the latency of every
//!   `C_Sign` ([`hsm_sign_timer`]) and PKCS#11 failures by C function
//!   ([`hsm_error`]);
//! - **state**, read from the store at each scrape, so it is never stale and
//!   survives restarts: pending approvals, approved withdrawals not yet
//!   signed, the freeze, the audit log's size, and the latest checkpoint's
//!   size and age.
//!
//! The event instruments are process-wide (a [`LazyLock`]), not handed
//! through [`crate::server::App`]: they are bumped from deep inside the HSM
//! adapter and the custody engine, whose constructors would otherwise all
//! grow a parameter for a few atomics, and one `custosd` process serves one
//! deployment, so process-wide is per-deployment. State is per store, so a
//! [`Metrics`] is built for each server from its [`Store`].
//!
//! What is exported is chosen to be safe to show anyone who can reach the
//! port: counts, durations, sizes and ages, labelled only with bounded,
//! non-secret values (outcome names, policy rule names and reason codes, C
//! function names). No PIN, key, address, amount or request content appears.
//! Rule names come from the admin-governed policy, so a caller cannot grow
//! the label set.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::hsm::KeyKind;
use crate::lifecycle::State;
use crate::store::audit as log;
use crate::store::governance as gov_store;
use crate::policy::record::DecisionRecord;
use crate::store::withdrawals as wd_store;
use crate::store::{Store, StoreError};

/// The path metrics are served on; every other path is 404.
pub const PATH: &str = "/metrics";
/// The content type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Upper bounds of the `C_Sign` latency buckets, in seconds: 0.1 ms to 1 s.
pub const HSM_SIGN_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Connections served at once; past it, accepting waits for one to end.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyLabels {
    key: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FunctionLabels {
    function: String,
}

type SignHistograms = Family<KeyLabels, Histogram, fn() -> Histogram>;

/// The process-wide event instruments. Cloning an instrument shares it.
#[derive(Debug)]
struct Instruments {
    decisions: Family<DecisionLabels, Counter>,
    hsm_sign: SignHistograms,
    hsm_errors: Family<FunctionLabels, Counter>,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| Instruments {
    decisions: Family::default(),
    hsm_sign: Family::new_with_constructor(sign_histogram),
    hsm_errors: Family::default(),
});

fn sign_histogram() -> Histogram {
    Histogram::new(HSM_SIGN_BUCKETS)
}

/// Counts one committed decision that left a withdrawal in `state`:
/// `outcome` from the state, `rule` the policy rule that decided or, when no
/// rule did (a limit, a cap, the allowlist, a freeze, no policy), the reason
/// code. Call once per `Decision` entry the engine appends to the audit log,
/// after its transaction committed.
pub fn decided(state: State, decision: &DecisionRecord) {
    let rule = decision
        .rule
        .as_deref()
        .or(decision.reason_code.as_deref())
        .unwrap_or("none");
    INSTRUMENTS
        .decisions
        .get_or_create(&DecisionLabels {
            outcome: outcome(state),
            rule: rule.to_owned(),
        })
        .inc();
}

/// The `outcome` label of a decision that left a withdrawal in `state`.
fn outcome(state: State) -> &'static str {
    match state {
        State::PendingApproval => "pending",
        State::Approved => "approved",
        State::Signed => "signed",
        State::Denied => "denied",
        State::Rejected => "rejected",
        State::Expired => "expired",
        State::Cancelled => "cancelled",
    }
}

/// Times one `C_Sign` with a key of `kind`; the duration is recorded when
/// the returned guard drops, whether the call succeeded or not.
pub fn hsm_sign_timer(kind: KeyKind) -> SignTimer {
    SignTimer {
        key: match kind {
            KeyKind::Secp256k1 => "wallet",
            KeyKind::Ed25519 | KeyKind::P256 => "audit_log",
        },
        started: Instant::now(),
    }
}

/// Records a `C_Sign` duration when dropped; see [`hsm_sign_timer`].
#[derive(Debug)]
#[must_use = "the duration is recorded when the timer drops"]
pub struct SignTimer {
    key: &'static str,
    started: Instant,
}

impl Drop for SignTimer {
    fn drop(&mut self) {
        INSTRUMENTS
            .hsm_sign
            .get_or_create(&KeyLabels { key: self.key })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Counts a failed PKCS#11 call, labelled with the C function the module
/// named (`C_Sign`), or `binding` when cryptoki failed before reaching it.
pub fn hsm_error(error: &cryptoki::error::Error) {
    let function = match error {
        cryptoki::error::Error::Pkcs11(_, function) => format!("C_{function:?}"),
        _ => "binding".to_owned(),
    };
    INSTRUMENTS
        .hsm_errors
        .get_or_create(&FunctionLabels { function })
        .inc();
}

/// The registry one server exports: the process-wide instruments, and the
/// state of its store read at each scrape.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry over the process-wide instruments and `store`'s state.
    pub fn new(store: Arc<Store>) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "custos_decisions",
            "Decisions committed, one per Decision entry of the audit log, by the state they left the withdrawal in and the policy rule (or, when no rule decided, the reason code) that decided",
            INSTRUMENTS.decisions.clone(),
        );
        registry.register_with_unit(
            "custos_hsm_sign",
            "Duration of each C_Sign call, successful or not, by key: wallet (transactions) or audit_log (checkpoints)",
            Unit::Seconds,
            INSTRUMENTS.hsm_sign.clone(),
        );
        registry.register(
            "custos_hsm_errors",
            "PKCS#11 calls that failed, by the C function that returned the error",
            INSTRUMENTS.hsm_errors.clone(),
        );
        registry.register_collector(Box::new(StoreState { store }));
        Self { registry }
    }

    /// The exposition in OpenMetrics text ([`CONTENT_TYPE_OPENMETRICS`]).
    /// Reads the store: call it off the async runtime. Fails if the store
    /// cannot be read (the reason is logged).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The store's state, read afresh at every scrape.
#[derive(Debug)]
struct StoreState {
    store: Arc<Store>,
}

/// One reading of [`StoreState`].
struct Snapshot {
    pending_approvals: usize,
    approved_unsigned: usize,
    frozen: bool,
    log_entries: u64,
    /// Size and signing time (unix seconds) of the latest checkpoint.
    checkpoint: Option<(u64, u64)>,
}

impl StoreState {
    fn read(&self) -> Result<Snapshot, StoreError> {
        self.store.read(|conn| {
            Ok(Snapshot {
                pending_approvals: wd_store::ids_in_state(conn, State::PendingApproval)?.len(),
                approved_unsigned: wd_store::ids_in_state(conn, State::Approved)?.len(),
                frozen: gov_store::state(conn)?.frozen,
                log_entries: log::size(conn)?,
                checkpoint: log::checkpoint(conn, None)?.map(|c| (c.size, c.signed_at)),
            })
        })
    }
}

impl Collector for StoreState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.read().map_err(|e| {
            tracing::warn!(error = %e, "metrics: reading the store failed; the scrape fails");
            std::fmt::Error
        })?;
        let mut gauge = |name: &str, help: &str, unit: Option<&Unit>, value: i64| {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
            gauge.encode(metric)
        };
        gauge(
            "custos_pending_approvals",
            "Withdrawals waiting for approvals (PENDING_APPROVAL).",
            None,
            saturate(state.pending_approvals as u64),
        )?;
        gauge(
            "custos_approved_unsigned",
            "Withdrawals approved but not yet signed: held by a freeze, or waiting for the HSM.",
            None,
            saturate(state.approved_unsigned as u64),
        )?;
        gauge(
            "custos_frozen",
            "1 while custody is frozen by a security officer, else 0.",
            None,
            i64::from(state.frozen),
        )?;
        gauge(
            "custos_log_entries",
            "Entries in the audit log (its tree size).",
            None,
            saturate(state.log_entries),
        )?;
        gauge(
            "custos_checkpoint_size",
            "Tree size of the latest signed checkpoint (0 before the first).",
            None,
            saturate(state.checkpoint.map_or(0, |(size, _)| size)),
        )?;
        if let Some((_, signed_at)) = state.checkpoint {
            let age = crate::clock::unix_now().saturating_sub(signed_at);
            gauge(
                "custos_checkpoint_age",
                "Seconds since the latest checkpoint was signed. One is signed only when entries are waiting, so compare custos_checkpoint_size with custos_log_entries before alerting on age.",
                Some(&Unit::Seconds),
                saturate(age),
            )?;
        }
        let failures = ConstCounter::new(self.store.commit_failures());
        let metric = encoder.encode_descriptor(
            "custos_store_commit_failures",
            "Store group commits that failed since start; every write in such a group failed.",
            None,
            failures.metric_type(),
        )?;
        failures.encode(metric)
    }
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A metrics listener bound at startup and served by [`crate::server::run`]
/// (through [`spawn`]). Clones share it; the first [`Listener::take`] gets it.
#[derive(Debug, Clone)]
pub struct Listener {
    addr: SocketAddr,
    slot: Arc<Mutex<Option<TcpListener>>>,
}

impl Listener {
    /// Binds `addr`; port 0 picks a free port.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            addr: listener.local_addr()?,
            slot: Arc::new(Mutex::new(Some(listener))),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to scrape, e.g. `http://127.0.0.1:9464/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    /// The listener, unless it was taken already.
    pub fn take(&self) -> Option<TcpListener> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Serves the metrics of `app` on its metrics listener, if it has one, until
/// the returned guard drops. [`crate::server::run`] holds the guard for as
/// long as it serves gRPC.
pub fn spawn(app: &crate::server::App) -> Option<Running> {
    let listener = app.metrics.as_ref()?.take()?;
    let metrics = Arc::new(Metrics::new(Arc::clone(&app.store)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, metrics, async {
        // A dropped sender resolves this too: that is the stop signal.
        let _ = stopped.await;
    }));
    Some(Running { _stop: stop })
}

/// Keeps the metrics server of [`spawn`] running; dropping it stops it.
#[derive(Debug)]
pub struct Running {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Answers `GET /metrics` on `listener` until `shutdown` completes, then
/// closes every connection. Other paths get 404, other methods 405.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics serving on http://{addr}{PATH}");
    }
    // Dropped on return, which aborts connections still open (an idle
    // keep-alive from a scraper, say).
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = connections.join_next() => continue,
            }
        }
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: back off, do not spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        connections.spawn(async move {
            let service = service_fn(move |request| respond(Arc::clone(&metrics), request));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
    tracing::info!("metrics stopped");
}

async fn respond(metrics: Arc<Metrics>, request: Request<Incoming>) -> Result<Response<String>, Infallible> {
    if request.uri().path() != PATH {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        ));
    }
    if request.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Ok(response);
    }
    let encoded = tokio::task::spawn_blocking(move || metrics.encode()).await;
    Ok(match encoded {
        Ok(Ok(text)) => {
            let mut response = Response::new(text);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS));
            response
        }
        _ => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics unavailable; see the custosd log\n",
        ),
    })
}

fn plain(status: StatusCode, body: &'static str) -> Response<String> {
    let mut response = Response::new(body.to_owned());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("custos.db")).unwrap();
        (dir, Arc::new(store))
    }

    /// Sends one HTTP/1.1 request and returns the status line and the body.
    fn request(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    #[test]
    fn an_empty_store_exports_zeroes_and_no_checkpoint_age() {
        let (_dir, store) = store();
        let text = Metrics::new(store).encode().unwrap();
        for line in [
            "custos_pending_approvals 0",
            "custos_approved_unsigned 0",
            "custos_frozen 0",
            "custos_log_entries 0",
            "custos_checkpoint_size 0",
            "custos_store_commit_failures_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("custos_checkpoint_age_seconds "), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn events_are_labelled_with_bounded_names() {
        let (_dir, store) = store();
        drop(hsm_sign_timer(KeyKind::Secp256k1));
        hsm_error(&cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::DeviceRemoved,
            cryptoki::context::Function::Sign,
        ));
        decided(
            State::Denied,
            &DecisionRecord {
                reason_code: Some("frozen".into()),
                ..DecisionRecord::default()
            },
        );
        decided(
            State::PendingApproval,
            &DecisionRecord {
                rule: Some("large-two-treasury".into()),
                ..DecisionRecord::default()
            },
        );
        decided(
            State::Rejected,
            &DecisionRecord {
                rule: Some("large-two-treasury".into()),
                reason_code: Some("rejected".into()),
                ..DecisionRecord::default()
            },
        );
        let text = Metrics::new(store).encode().unwrap();
        for series in [
            "custos_decisions_total{outcome=\"denied\",rule=\"frozen\"}",
            "custos_decisions_total{outcome=\"pending\",rule=\"large-two-treasury\"}",
            "custos_decisions_total{outcome=\"rejected\",rule=\"large-two-treasury\"}",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(series)),
                "{series} missing from\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("custos_hsm_sign_seconds_count{key=\"wallet\"}")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("custos_hsm_errors_total{function=\"C_Sign\"}")),
            "{text}"
        );
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("custos_hsm_sign_seconds_bucket{") && l.contains("key=\"wallet\""))
            .count();
        assert_eq!(buckets, HSM_SIGN_BUCKETS.len() + 1, "{text}");
    }

    #[test]
    fn serves_get_metrics_only() {
        let (_dir, store) = store();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve(listener, Arc::new(Metrics::new(store)), async {
                let _ = stopped.await;
            }));
            addr
        });
        let (status, body) = request(addr, "GET", "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("custos_log_entries 0"), "{body}");
        assert_eq!(request(addr, "GET", "/").0, "HTTP/1.1 404 Not Found");
        assert_eq!(request(addr, "GET", "/metrics/x").0, "HTTP/1.1 404 Not Found");
        assert_eq!(
            request(addr, "POST", "/metrics").0,
            "HTTP/1.1 405 Method Not Allowed"
        );
        drop(stop);
        runtime.block_on(async {
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the metrics server still accepts after shutdown");
        });
    }
}
