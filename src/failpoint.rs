//! Crash points for the crash-consistency tests.
//!
//! In debug builds, [`crash_if`] aborts the process (as `kill -9` would, with
//! no unwinding or cleanup) when `CUSTOS_CRASH_AT` names the point. Release
//! builds compile it to nothing, so production binaries carry no trigger.
//! Points: `after-approval-commit` (a quorum-meeting vote is committed,
//! nothing signed yet), `after-sign-before-commit` (the HSM signed, SIGNED is
//! not committed).

/// Aborts here if this debug build was told to crash at `point`.
#[inline]
pub fn crash_if(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("CUSTOS_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::error!(point, "CUSTOS_CRASH_AT: aborting (test crash point)");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
