//! Rolling usage with running totals: the one type that both the custody
//! engine (its in-memory usage cache) and the audit replay count limits
//! with, so that a decision and its replay read the same numbers.
//!
//! A [`UsageLedger`] keeps the counted withdrawals of one wallet and asset
//! in time order with cumulative sums, so [`RollingUsage::within`] costs two
//! binary searches whatever the history. The sums are 512 bits wide: any
//! sum of 256-bit amounts that fits in memory is exact, and only the answer
//! saturates at 2^256 - 1, exactly as [`super::Usage`] (the plain list that
//! defines the meaning) saturates its sum.
//!
//! A withdrawal counts from the time it was APPROVED until it is cancelled
//! (SIGNED keeps counting), and a window covers what was counted after
//! `now - seconds`, including anything stamped after `now` (a clock that
//! stepped back). The ledger holds every addition and every removal (a
//! cancellation of an approved withdrawal, at its approval time); what a
//! window holds is their difference.

use std::collections::VecDeque;

use alloy_primitives::{U256, U512};

use super::RollingUsage;

/// Counted withdrawals of one wallet and asset: those added, less those
/// removed (a cancelled withdrawal that had counted).
#[derive(Debug, Clone, Default)]
pub struct UsageLedger {
    added: Totals,
    removed: Totals,
}

impl UsageLedger {
    /// Counts `amount` at time `at`. Times may arrive out of order (a clock
    /// that stepped back); the ledger stays sorted.
    pub fn add(&mut self, at: u64, amount: U256) {
        self.added.insert(at, amount);
    }

    /// Stops counting an `amount` that was added at `at`.
    pub fn remove(&mut self, at: u64, amount: U256) {
        self.removed.insert(at, amount);
    }

    /// Forgets everything stamped at or before `start`, which no window
    /// ending now or later can reach: memory stays bounded by the longest
    /// window in use. True if anything was forgotten.
    pub fn prune(&mut self, start: u64) -> bool {
        let added = self.added.prune(start);
        let removed = self.removed.prune(start);
        added || removed
    }
}

impl RollingUsage for UsageLedger {
    fn within(&self, now: u64, seconds: u64) -> (U256, u64) {
        let start = now.saturating_sub(seconds);
        let (added, n) = self.added.after(start);
        let (removed, m) = self.removed.after(start);
        // Every removal is of an addition at the same time, so neither
        // difference underflows.
        (narrow(added.saturating_sub(removed)), n.saturating_sub(m))
    }
}

/// Times in ascending order with cumulative amounts: `sums[i]` is the total
/// of every entry up to and including `i`, counted from the first entry ever
/// inserted; `floor` is that total for the entries pruned away.
#[derive(Debug, Clone, Default)]
struct Totals {
    times: VecDeque<u64>,
    sums: VecDeque<U512>,
    floor: U512,
}

impl Totals {
    fn insert(&mut self, at: u64, amount: U256) {
        let amount = widen(amount);
        let position = self.times.partition_point(|t| *t <= at);
        let before = self.cumulative_before(position);
        self.times.insert(position, at);
        self.sums.insert(position, before + amount);
        // Only a clock that stepped back inserts before the end.
        for sum in self.sums.range_mut(position + 1..) {
            *sum += amount;
        }
    }

    fn prune(&mut self, start: u64) -> bool {
        let before = self.times.len();
        while self.times.front().is_some_and(|t| *t <= start) {
            self.times.pop_front();
            if let Some(sum) = self.sums.pop_front() {
                self.floor = sum;
            }
        }
        self.times.len() != before
    }

    /// Total and number of entries stamped after `start`.
    fn after(&self, start: u64) -> (U512, u64) {
        let position = self.times.partition_point(|t| *t <= start);
        let total = self.sums.back().copied().unwrap_or(self.floor);
        (
            total - self.cumulative_before(position),
            (self.times.len() - position) as u64,
        )
    }

    /// The cumulative total of the entries before `position`.
    fn cumulative_before(&self, position: usize) -> U512 {
        position.checked_sub(1).map_or(self.floor, |i| self.sums[i])
    }
}

fn widen(amount: U256) -> U512 {
    let mut limbs = [0u64; 8];
    limbs[..4].copy_from_slice(amount.as_limbs());
    U512::from_limbs(limbs)
}

fn narrow(sum: U512) -> U256 {
    let limbs = sum.as_limbs();
    if limbs[4..].iter().any(|l| *l != 0) {
        return U256::MAX;
    }
    let mut low = [0u64; 4];
    low.copy_from_slice(&limbs[..4]);
    U256::from_limbs(low)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::Usage;

    /// The running totals give exactly what the plain list gives, for every
    /// window and time, including entries stamped after `now`.
    #[test]
    fn running_totals_match_the_plain_sum() {
        let entries: Vec<(u64, U256)> = (0..200u64)
            .map(|i| (1000 + i * 7 + i % 3, U256::from(i * 11 + 1)))
            .collect();
        let mut ledger = UsageLedger::default();
        for (at, amount) in &entries {
            ledger.add(*at, *amount);
        }
        let plain = Usage {
            entries: entries.clone(),
        };
        for now in (900..2600).step_by(37) {
            for seconds in [0, 1, 10, 100, 500, 5000] {
                assert_eq!(
                    ledger.within(now, seconds),
                    plain.within(now, seconds),
                    "now {now}, window {seconds}"
                );
            }
        }
        assert!(ledger.prune(1500));
        let kept = Usage {
            entries: entries.into_iter().filter(|(at, _)| *at > 1500).collect(),
        };
        assert_eq!(ledger.within(2000, 400), kept.within(2000, 400));
    }

    #[test]
    fn out_of_order_times_and_removals_match_the_plain_list() {
        let mut ledger = UsageLedger::default();
        let mut usage = Usage::default();
        // Out of order (a clock that stepped back), then a cancellation.
        for (at, amount) in [(100, 5u64), (300, 7), (200, 11), (300, 13), (50, 17)] {
            ledger.add(at, U256::from(amount));
            usage.entries.push((at, U256::from(amount)));
        }
        ledger.remove(200, U256::from(11u64));
        usage.entries.retain(|e| *e != (200, U256::from(11u64)));
        for now in [0, 50, 99, 100, 150, 200, 250, 299, 300, 400] {
            for seconds in [1, 50, 100, 150, 1000] {
                assert_eq!(
                    ledger.within(now, seconds),
                    usage.within(now, seconds),
                    "now {now}, seconds {seconds}"
                );
            }
        }
        let mut big = UsageLedger::default();
        big.add(1, U256::MAX);
        big.add(2, U256::MAX);
        assert_eq!(big.within(2, 10), (U256::MAX, 2));
    }

    proptest! {
        /// Any sequence of additions, removals of earlier additions and
        /// prunes reads like the plain list of what is left, for windows
        /// that start after the last prune.
        #[test]
        fn the_ledger_reads_like_the_plain_list(
            steps in proptest::collection::vec((0u64..400, 1u64..1_000_000, 0u8..10), 1..80),
            now in 0u64..500,
            seconds in 0u64..500,
        ) {
            let mut ledger = UsageLedger::default();
            let mut plain = Usage::default();
            let mut pruned = 0u64;
            for (at, amount, op) in steps {
                match op {
                    0 if !plain.entries.is_empty() => {
                        let (at, amount) = plain.entries.remove(amount as usize % plain.entries.len());
                        ledger.remove(at, amount);
                    }
                    1 => {
                        pruned = pruned.max(at / 2);
                        let _ = ledger.prune(pruned);
                        plain.entries.retain(|(t, _)| *t > pruned);
                    }
                    _ if at > pruned => {
                        ledger.add(at, U256::from(amount));
                        plain.entries.push((at, U256::from(amount)));
                    }
                    _ => {}
                }
            }
            let seconds = seconds.min(now.saturating_sub(pruned));
            prop_assert_eq!(ledger.within(now, seconds), plain.within(now, seconds));
        }
    }
}
