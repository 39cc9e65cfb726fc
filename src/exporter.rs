//! The Prometheus exporter: `GET /metrics` on a port of its own.
//!
//! Two kinds of numbers are exported:
//! - **events**, counted where they happen: decisions by outcome and rule
//!   ([`crate::metrics::decided`], after the decision is committed), the latency of every
//!   `C_Sign` ([`crate::metrics::hsm_sign_timer`]) and PKCS#11 failures by C function
//!   ([`crate::metrics::hsm_error`]);
//! - **state**, read from the store at each scrape, so it is never stale and
//!   survives restarts: pending approvals, approved withdrawals not yet
//!   signed, the freeze, the audit log's size, the latest checkpoint's
//!   size and age, and the signing leases of approved withdrawals;
//! - **the store's connection**, from this process's memory: whether the
//!   store answers (`custos_store_up`), and on PostgreSQL the pools and the
//!   presence lock.
//!
//! The event instruments are process-wide and live in [`crate::metrics`];
//! state is per store, so a [`Metrics`] is built for each server from its
//! [`Store`]. The exporter is spawned with the store and a listener
//! ([`spawn`]), not with the server's state.
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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::store::audit as log;
use crate::store::governance as gov_store;
use crate::store::withdrawals as wd_store;
use crate::store::{Store, StoreError};
use custos_core::lifecycle::State;

/// The Prometheus `/metrics` endpoint (served by [`spawn`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address to serve `GET /metrics` on, e.g. `127.0.0.1:9464`.
    pub listen: SocketAddr,
}

/// The path metrics are served on; every other path is 404.
pub const PATH: &str = "/metrics";
/// The content type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections served at once; past it, accepting waits for one to end.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

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
        crate::metrics::register(&mut registry);
        registry.register_collector(Box::new(StoreState { store }));
        Self { registry }
    }

    /// The exposition in OpenMetrics text ([`CONTENT_TYPE_OPENMETRICS`]).
    /// Reads the store: call it off the async runtime. A store that cannot
    /// be read leaves its gauges out and sets `custos_store_up` to 0 (the
    /// reason is logged).
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
    leases: wd_store::LeaseCounts,
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
                leases: wd_store::lease_counts(conn, self.store.instance(), crate::clock::unix_now())?,
            })
        })
    }
}

impl Collector for StoreState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // What this process knows is exported even while the store cannot
        // be read; what the store holds only when it can.
        let state = self
            .read()
            .inspect_err(|e| tracing::warn!(error = %e, "metrics: reading the store failed; exporting without its state"))
            .ok();
        let mut gauge = |name: &str, help: &str, unit: Option<&Unit>, value: i64| {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
            gauge.encode(metric)
        };
        gauge(
            "custos_store_up",
            "1 while the store answers (the health probe and this scrape's reads), else 0; health is NOT_SERVING while it is 0.",
            None,
            i64::from(self.store.reachable() && state.is_some()),
        )?;
        if let Some(state) = &state {
            self.encode_state(state, &mut gauge)?;
        }
        if let Some(pools) = self.store.pool_status() {
            for (pool, usage) in [("write", pools.writer), ("read", pools.reader)] {
                let labels = [("pool", pool)];
                for (name, help, value) in [
                    (
                        "custos_store_pool_max",
                        "Connections the PostgreSQL pool may open.",
                        usage.max,
                    ),
                    (
                        "custos_store_pool_open",
                        "PostgreSQL connections open now.",
                        usage.open,
                    ),
                    (
                        "custos_store_pool_idle",
                        "Open PostgreSQL connections not in use.",
                        usage.idle,
                    ),
                    (
                        "custos_store_pool_waiting",
                        "Callers waiting for a PostgreSQL connection.",
                        usage.waiting,
                    ),
                ] {
                    let gauge = ConstGauge::new(saturate(value as u64));
                    let mut family = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                    gauge.encode(family.encode_family(&labels)?)?;
                }
            }
            let presence = ConstGauge::new(i64::from(pools.presence));
            let metric = encoder.encode_descriptor(
                "custos_store_presence",
                "1 while this instance holds its PostgreSQL presence lock; at 0 other instances may take over its signing leases.",
                None,
                presence.metric_type(),
            )?;
            presence.encode(metric)?;
        }
        if let Some(state) = &state {
            let leases = state.leases;
            for (label, value) in [
                ("held_here", leases.held_here),
                ("held_elsewhere", leases.held_elsewhere),
                ("expired", leases.expired),
                ("unleased", leases.unleased),
            ] {
                let gauge = ConstGauge::new(saturate(value));
                let mut family = encoder.encode_descriptor(
                    "custos_signing_leases",
                    "Approved, unsigned withdrawals by their signing lease: held by this instance, held by another, expired (any sweep takes it) or never leased.",
                    None,
                    gauge.metric_type(),
                )?;
                gauge.encode(family.encode_family(&[("state", label)])?)?;
            }
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

impl StoreState {
    /// The gauges read from the store.
    fn encode_state(
        &self,
        state: &Snapshot,
        gauge: &mut impl FnMut(&str, &str, Option<&Unit>, i64) -> Result<(), std::fmt::Error>,
    ) -> Result<(), std::fmt::Error> {
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
        Ok(())
    }
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A metrics listener bound at startup and served by the server's `run`
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

/// Serves the metrics of `store` on `listener`, unless it was taken
/// already, until the returned guard drops. The server's `run` holds the
/// guard for as long as it serves gRPC.
pub fn spawn(listener: &Listener, store: Arc<Store>) -> Option<Running> {
    let listener = listener.take()?;
    let metrics = Arc::new(Metrics::new(store));
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

    use custos_core::key::KeyKind;
    use custos_core::policy::record::DecisionRecord;

    use super::*;
    use crate::metrics::{HSM_SIGN_BUCKETS, decided, hsm_error, hsm_sign_timer};

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
            "custos_store_up 1",
            "custos_signing_leases{state=\"held_here\"} 0",
            "custos_signing_leases{state=\"unleased\"} 0",
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
