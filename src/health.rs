//! What `grpc.health.v1` reports, and the probe that keeps it true.
//!
//! The server as a whole (the empty service name) and each custos service
//! are SERVING while the store answers, and NOT_SERVING while it does not:
//! a load balancer then sends calls to another instance, and this one takes
//! them again once the database answers, without a restart. [`monitor`]
//! asks the store every [`PROBE_INTERVAL`] (a trivial read on a connection
//! of the read pool, which also reconnects it); a probe that fails, or takes
//! longer than [`PROBE_TIMEOUT`], counts as down. Each change is logged
//! once, and the probe's last answer is the `custos_store_up` metric.
//!
//! While NOT_SERVING, calls are still served, and each fails closed on its
//! own (UNAVAILABLE, nothing stored or signed): health says where to send
//! traffic, it is not what keeps a call safe.

use std::sync::Arc;
use std::time::Duration;

use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::{ApprovalApi, AuditApi, PolicyApi, WalletApi, WithdrawalApi};
use crate::proto::approval_service_server::ApprovalServiceServer;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::policy_service_server::PolicyServiceServer;
use crate::proto::wallet_service_server::WalletServiceServer;
use crate::proto::withdrawal_service_server::WithdrawalServiceServer;
use crate::store::Store;

/// How often the store is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a probe may take before the store counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Every name health reports on: the server (`""`) and each custos service.
pub const SERVICES: [&str; 6] = [
    "",
    <WalletServiceServer<WalletApi> as NamedService>::NAME,
    <WithdrawalServiceServer<WithdrawalApi> as NamedService>::NAME,
    <ApprovalServiceServer<ApprovalApi> as NamedService>::NAME,
    <PolicyServiceServer<PolicyApi> as NamedService>::NAME,
    <AuditServiceServer<AuditApi> as NamedService>::NAME,
];

/// Sets every name in [`SERVICES`] to `status`.
pub async fn report(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Probes `store` forever, reporting SERVING or NOT_SERVING through
/// `reporter` whenever the answer changes. The caller has reported the
/// starting status (the store answered at startup).
pub async fn monitor(reporter: HealthReporter, store: Arc<Store>) {
    let mut serving = true;
    // A probe stuck past its timeout is waited for, not doubled.
    let mut running: Option<tokio::task::JoinHandle<bool>> = None;
    let mut interval = tokio::time::interval(PROBE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut probe = running.take().unwrap_or_else(|| {
            let store = Arc::clone(&store);
            tokio::task::spawn_blocking(move || match store.probe() {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "store probe failed");
                    false
                }
            })
        });
        let up = match tokio::time::timeout(PROBE_TIMEOUT, &mut probe).await {
            Ok(answer) => answer.unwrap_or(false),
            Err(_) => {
                store.mark_unreachable();
                running = Some(probe);
                false
            }
        };
        if up != serving {
            serving = up;
            if up {
                tracing::info!("the store answers again; health is SERVING");
                report(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!("the store does not answer; health is NOT_SERVING until it does");
                report(&reporter, ServingStatus::NotServing).await;
            }
        }
    }
}
