//! The Prometheus endpoint of `custosd --dev`: decisions counted by outcome
//! and rule exactly once, the HSM latency histogram, and the store's state
//! (pending approvals, log size, checkpoint) read at scrape time, with no
//! secret or request content in the exposition.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::{self, DevServer};
use crate::withdrawals::{ETHER, EXCHANGE, create_request};
use custos::proto::withdrawal_service_client::WithdrawalServiceClient;
use custos::proto::{self, WithdrawalState, audit_service_client::AuditServiceClient};

/// A destination on no allowlist: the dev policy denies it.
const STRANGER: &str = "0x7777777777777777777777777777777777777777";

/// One scrape: every sample, keyed by `name{labels}` as exposed.
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The sum of the samples named `name` whose labels include `labels`
    /// (so a name alone sums a family), or `None` if there is none.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for (series, value) in &self.samples {
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series.as_str(), ""),
            };
            let matches = series_name == name
                && labels.iter().all(|(k, v)| {
                    series_labels
                        .split(',')
                        .any(|pair| pair == format!("{k}=\"{v}\""))
                });
            if matches {
                *found.get_or_insert(0.0) += value;
            }
        }
        found
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{}", self.text))
    }

    /// Like [`Scrape::value`], but 0 for a series not created yet.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }
}

/// `host:port` of the metrics endpoint named in the ready line.
fn metrics_addr(server: &DevServer) -> String {
    let url = server.ready["metrics_endpoint"]
        .as_str()
        .expect("metrics_endpoint in the ready line");
    url.strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("metrics_endpoint {url:?} is not http://HOST:PORT/metrics"))
        .to_owned()
}

/// Sends one HTTP/1.1 request; returns the status line, the headers (lower
/// case) and the body.
fn http(addr: &str, method: &str, path: &str) -> (String, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_ascii_lowercase(), body.to_owned())
}

async fn scrape(addr: &str) -> Scrape {
    let addr = addr.to_owned();
    let (status, headers, text) = tokio::task::spawn_blocking(move || http(&addr, "GET", "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    let samples = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect();
    Scrape { text, samples }
}

#[test]
fn metrics_count_each_decision_once_and_read_state_at_scrape_time() {
    support::runtime().block_on(async {
        let server = DevServer::start();
        let addr = metrics_addr(&server);
        let before = scrape(&addr).await;
        assert_eq!(before.value("custos_pending_approvals", &[]), 0.0);
        assert_eq!(before.value("custos_frozen", &[]), 0.0);

        let mut backend = WithdrawalServiceClient::new(server.channel_as("backend").await);
        let small = create_request("metrics-small", EXCHANGE, ETHER / 2, 0, "ops");
        let signed = backend
            .create_withdrawal(small.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(signed.state(), WithdrawalState::Signed, "{signed:?}");
        // A retry returns the same withdrawal and decides nothing new.
        let retried = backend.create_withdrawal(small).await.unwrap().into_inner();
        assert_eq!(retried.name, signed.name);
        let denied = backend
            .create_withdrawal(create_request("metrics-denied", STRANGER, ETHER / 10, 1, "ops"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(denied.state(), WithdrawalState::Denied, "{denied:?}");
        let pending = backend
            .create_withdrawal(create_request("metrics-pending", EXCHANGE, 5 * ETHER, 2, "ops"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pending.state(), WithdrawalState::PendingApproval, "{pending:?}");

        // The dev cadence (2 s) checkpoints the new entries.
        let deadline = Instant::now() + Duration::from_secs(20);
        let after = loop {
            let s = scrape(&addr).await;
            if s.value("custos_checkpoint_size", &[]) == s.value("custos_log_entries", &[]) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint covered the log:\n{}",
                s.text
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        let moved =
            |name: &str, labels: &[(&str, &str)]| after.count(name, labels) - before.count(name, labels);
        let decisions = "custos_decisions_total";
        assert_eq!(
            moved(decisions, &[("outcome", "approved"), ("rule", "auto-small")]),
            1.0
        );
        assert_eq!(
            moved(decisions, &[("outcome", "denied"), ("rule", "not_allowlisted")]),
            1.0
        );
        assert_eq!(
            moved(
                decisions,
                &[("outcome", "pending"), ("rule", "large-two-treasury")]
            ),
            1.0
        );
        assert_eq!(moved(decisions, &[]), 3.0, "{}", after.text);

        assert_eq!(after.value("custos_pending_approvals", &[]), 1.0);
        assert_eq!(after.value("custos_approved_unsigned", &[]), 0.0);
        assert_eq!(after.value("custos_frozen", &[]), 0.0);
        let wallet_signs = moved("custos_hsm_sign_seconds_count", &[("key", "wallet")]);
        assert!(wallet_signs >= 1.0, "{}", after.text);
        assert!(after.value("custos_hsm_sign_seconds_sum", &[("key", "wallet")]) > 0.0);
        assert!(
            after.value(
                "custos_hsm_sign_seconds_bucket",
                &[("key", "wallet"), ("le", "+Inf")]
            ) >= wallet_signs
        );

        let log_entries = after.value("custos_log_entries", &[]);
        assert!(log_entries > before.value("custos_log_entries", &[]));
        let mut audit = AuditServiceClient::new(server.channel_as("auditor").await);
        let checkpoint = audit
            .get_checkpoint(proto::GetCheckpointRequest { tree_size: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checkpoint.tree_size as f64, log_entries);
        let age = after.value("custos_checkpoint_age_seconds", &[]);
        assert!((0.0..10.0).contains(&age), "checkpoint age {age}");
        assert_eq!(after.value("custos_store_commit_failures_total", &[]), 0.0);

        // Nothing secret and no request content is exposed.
        let pin = std::fs::read_to_string(server.path("user_pin_file")).unwrap();
        for secret in [
            pin.trim(),
            "metrics-small",
            "metrics-denied",
            EXCHANGE.trim_start_matches("0x"),
            STRANGER.trim_start_matches("0x"),
            signed.name.trim_start_matches("withdrawals/"),
        ] {
            assert!(
                !after.text.contains(secret),
                "{secret:?} exposed in\n{}",
                after.text
            );
        }

        // Only GET /metrics.
        let addr2 = addr.clone();
        let (not_found, wrong_method) = tokio::task::spawn_blocking(move || {
            (http(&addr2, "GET", "/").0, http(&addr2, "POST", "/metrics").0)
        })
        .await
        .unwrap();
        assert_eq!(not_found, "HTTP/1.1 404 Not Found");
        assert_eq!(wrong_method, "HTTP/1.1 405 Method Not Allowed");
    });
}
