//! Metrics events: the process-wide instruments that the HSM adapter and
//! the custody engine bump where things happen. This module imports nothing
//! of the crate, so any module may call it without a cycle; the Prometheus
//! endpoint that exports these and the store's state is
//! the `exporter` module, which depends on this one.
//!
//! Events counted: decisions by outcome and rule ([`decided`], after the
//! decision is committed), the latency of every `C_Sign`
//! ([`hsm_sign_timer`]) and PKCS#11 failures by C function ([`hsm_error`]).
//!
//! The instruments are process-wide (a [`LazyLock`]), not handed through
//! the server's state: they are bumped from deep inside the HSM adapter and
//! the custody engine, whose constructors would otherwise all grow a
//! parameter for a few atomics, and one `custosd` process serves one
//! deployment, so process-wide is per-deployment.
//!
//! Labels are bounded and non-secret: outcome names, policy rule names and
//! reason codes, C function names. Rule names come from the admin-governed
//! policy, so a caller cannot grow the label set.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use custos_core::key::KeyKind;
use custos_core::lifecycle::State;
use custos_core::policy::record::DecisionRecord;

/// Upper bounds of the `C_Sign` latency buckets, in seconds: 0.1 ms to 1 s.
pub const HSM_SIGN_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Registers the process-wide event instruments in `registry`. Each
/// exporter's registry shares the same instruments.
pub fn register(registry: &mut Registry) {
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
}

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
