//! Crash points for the crash-consistency tests.
//!
//! In debug builds, [`crash_if`] aborts the process (as `kill -9` would, with
//! no unwinding or cleanup) when `CUSTOS_CRASH_AT` names the point. Release
//! builds compile it to nothing, so production binaries carry no trigger.
//! Points: `after-approval-commit` (a quorum-meeting vote is committed,
//! nothing signed yet), `after-sign-before-commit` (the HSM signed, SIGNED is
//! not committed).
//!
//! [`pause_if`] holds a request at a point instead, so that a test can act
//! between two of its steps (`before-sign`: the decision is committed, the
//! HSM not yet asked; `after-sign-before-commit` as above): while
//! `CUSTOS_PAUSE_AT` names the point, it
//! creates `<CUSTOS_PAUSE_FILE>.reached` and waits until `CUSTOS_PAUSE_FILE`
//! is removed. Also debug builds only.

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

/// Holds here while this debug build is told to pause at `point` (see the
/// module docs); returns at once otherwise.
#[inline]
pub async fn pause_if(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("CUSTOS_PAUSE_AT").is_ok_and(|p| p == point) {
        let Some(file) = std::env::var_os("CUSTOS_PAUSE_FILE").map(std::path::PathBuf::from) else {
            return;
        };
        tracing::warn!(point, "CUSTOS_PAUSE_AT: holding until the pause file is removed");
        let mut reached = file.clone().into_os_string();
        reached.push(".reached");
        let _ = std::fs::write(&reached, point);
        while file.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
