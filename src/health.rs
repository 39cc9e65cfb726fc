//! What `grpc.health.v1` reports, and the probe that keeps it true.
//!
//! The server as a whole (the empty service name) and each custos service
//! are SERVING while both the store and the HSM token answer, and
//! NOT_SERVING while either does not: a load balancer then sends calls to
//! another instance, and this one takes them again once both answer,
//! without a restart. [`monitor`] asks both every [`PROBE_INTERVAL`]:
//! - the store: a trivial read on a connection of the read pool, which also
//!   reconnects it; a probe that fails, or takes longer than
//!   [`PROBE_TIMEOUT`], counts as down. Its last answer is the
//!   `custos_store_up` metric.
//! - the HSM: [`Hsm::probe`], a logged-in pooled session and
//!   `C_GetTokenInfo`, under the adapter's own call timeout. A lost token is
//!   recovered from by the probe as by any call, so this instance comes
//!   back once the token does, even with no traffic.
//!
//! Each change is logged once (which part went away or came back).
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
use crate::hsm::Hsm;
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

/// Probes `store` and `hsm` forever, reporting SERVING while both answer
/// and NOT_SERVING while either does not, through `reporter`, whenever the
/// answer changes. The caller has reported the starting status (both
/// answered at startup).
pub async fn monitor(reporter: HealthReporter, store: Arc<Store>, hsm: Hsm) {
    let mut serving = Parts {
        store: true,
        hsm: true,
    };
    // A store probe stuck past its timeout is waited for, not doubled.
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
        let store_probe = async {
            match tokio::time::timeout(PROBE_TIMEOUT, &mut probe).await {
                Ok(answer) => answer.unwrap_or(false),
                Err(_) => {
                    store.mark_unreachable();
                    false
                }
            }
        };
        // The HSM adapter times its own calls out (`hsm.call_timeout_ms`).
        let hsm_probe = async {
            match hsm.probe().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "HSM probe failed");
                    false
                }
            }
        };
        let (store_up, hsm_up) = tokio::join!(store_probe, hsm_probe);
        if !store_up && !probe.is_finished() {
            running = Some(probe);
        }
        let now = Parts {
            store: store_up,
            hsm: hsm_up,
        };
        if now == serving {
            continue;
        }
        for (name, was, is) in [
            ("store", serving.store, now.store),
            ("HSM token", serving.hsm, now.hsm),
        ] {
            if was && !is {
                tracing::warn!(
                    part = name,
                    "the {name} does not answer; health is NOT_SERVING until it does"
                );
            } else if !was && is {
                tracing::info!(part = name, "the {name} answers again");
            }
        }
        if now.up() != serving.up() {
            let status = if now.up() {
                tracing::info!("the store and the HSM token answer; health is SERVING");
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            report(&reporter, status).await;
        }
        serving = now;
    }
}

/// What the last probes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts {
    store: bool,
    hsm: bool,
}

impl Parts {
    fn up(self) -> bool {
        self.store && self.hsm
    }
}
