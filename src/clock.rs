//! The one wall clock custosd reads: Unix seconds. Everything that decides
//! takes the time as an argument (the policy core and the audit replay);
//! only the edges of the service read it here, so there is one meaning of
//! "now" and one place a test or a port would replace it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the system clock is before it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
