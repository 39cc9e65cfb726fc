//! Rolling limit usage, kept in memory so that a decision costs O(log n)
//! whatever the history: per wallet and asset, the counted withdrawals in
//! time order with running totals, loaded once from the store and then
//! updated by the writes that count or uncount a withdrawal.
//!
//! It is only read and changed inside store write closures, which run one at
//! a time, and it mirrors what those closures wrote, committed or not. A
//! change is recorded as the closure's last step, after every fallible
//! write, so a closure that fails changes nothing here. A group commit that
//! fails rolls back writes the cache already holds; the store counts such
//! failures ([`Store::commit_failures`]) before any other writer runs, and a
//! cache built before the count changed is thrown away and reloaded.

use std::collections::{HashMap, VecDeque};

use alloy_primitives::U256;
use rusqlite::Connection;

use super::CustodyError;
use crate::store::Store;
use crate::store::withdrawals as wd_store;
use custos_core::policy::RollingUsage;

/// Counted withdrawals of one wallet and asset, in time order.
#[derive(Debug, Default)]
pub(crate) struct UsageList {
    /// (counted_at, amount, running total including this entry).
    entries: VecDeque<(u64, U256, U256)>,
    /// Entries at or before this time were not loaded (or were dropped).
    horizon: u64,
}

impl UsageList {
    fn total(&self) -> U256 {
        self.entries.back().map_or(U256::ZERO, |e| e.2)
    }

    /// Adds a withdrawal counted at `at`; false if it is out of time order
    /// (a clock that stepped back), when the caller reloads instead.
    fn push(&mut self, at: u64, amount: U256) -> bool {
        if self.entries.back().is_some_and(|last| last.0 > at) {
            return false;
        }
        let total = self.total().saturating_add(amount);
        self.entries.push_back((at, amount, total));
        true
    }

    /// Drops entries no window can reach any more.
    fn prune(&mut self, start: u64) {
        while self.entries.front().is_some_and(|e| e.0 <= start) {
            self.entries.pop_front();
            self.horizon = start;
        }
    }
}

impl RollingUsage for UsageList {
    fn within(&self, now: u64, seconds: u64) -> (U256, u64) {
        let start = now.saturating_sub(seconds);
        let first = self.entries.partition_point(|e| e.0 <= start);
        let Some((_, amount, total_before)) = self.entries.get(first) else {
            return (U256::ZERO, 0);
        };
        let before = total_before.saturating_sub(*amount);
        (
            self.total().saturating_sub(before),
            (self.entries.len() - first) as u64,
        )
    }
}

/// The per-wallet, per-asset lists, valid for one count of failed commits.
#[derive(Debug, Default)]
pub(crate) struct UsageCache {
    built_at: u64,
    lists: HashMap<(String, String), UsageList>,
}

impl UsageCache {
    /// The usage of `wallet` and `asset` covering windows up to `longest`
    /// seconds before `now`, loading it through `conn` (the write
    /// transaction) when it is not cached or does not reach back far enough.
    pub(crate) fn list(
        &mut self,
        store: &Store,
        conn: &Connection,
        wallet: &str,
        asset: &str,
        now: u64,
        longest: u64,
    ) -> Result<&UsageList, CustodyError> {
        if self.built_at != store.commit_failures() {
            self.lists.clear();
            self.built_at = store.commit_failures();
        }
        let start = now.saturating_sub(longest);
        let key = (wallet.to_owned(), asset.to_owned());
        let stale = self.lists.get(&key).is_none_or(|l| l.horizon > start);
        if stale {
            let mut list = UsageList {
                entries: VecDeque::new(),
                horizon: start,
            };
            let mut rows = wd_store::usage(conn, wallet, asset, start)?
                .into_iter()
                .map(|(at, amount)| {
                    custos_core::chain::units::decimal(&amount)
                        .map(|a| (at, a))
                        .map_err(|e| CustodyError::Inconsistent(format!("stored amount {amount:?}: {e}")))
                })
                .collect::<Result<Vec<(u64, U256)>, _>>()?;
            rows.sort_by_key(|(at, _)| *at);
            for (at, amount) in rows {
                list.push(at, amount);
            }
            self.lists.insert(key.clone(), list);
        }
        let list = self.lists.entry(key).or_default();
        // Memory stays bounded by the longest window in use.
        list.prune(start);
        Ok(list)
    }

    /// Records a withdrawal counted at `at`: the write closure's last step.
    pub(crate) fn counted(&mut self, wallet: &str, asset: &str, at: u64, amount: U256) {
        let key = (wallet.to_owned(), asset.to_owned());
        if let Some(list) = self.lists.get_mut(&key)
            && !list.push(at, amount)
        {
            self.lists.remove(&key);
        }
    }

    /// Forgets a wallet and asset whose counted set changed some other way
    /// (a counted withdrawal was cancelled): the next use reloads it.
    pub(crate) fn forget(&mut self, wallet: &str, asset: &str) {
        self.lists.remove(&(wallet.to_owned(), asset.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_core::policy::Usage;

    /// The running totals give exactly what the plain list gives, for every
    /// window and time, including entries stamped after `now`.
    #[test]
    fn running_totals_match_the_plain_sum() {
        let entries: Vec<(u64, U256)> = (0..200u64)
            .map(|i| (1000 + i * 7 + i % 3, U256::from(i * 11 + 1)))
            .collect();
        let mut list = UsageList::default();
        for (at, amount) in &entries {
            assert!(list.push(*at, *amount));
        }
        let plain = Usage {
            entries: entries.clone(),
        };
        for now in (900..2600).step_by(37) {
            for seconds in [0, 1, 10, 100, 500, 5000] {
                assert_eq!(
                    list.within(now, seconds),
                    plain.within(now, seconds),
                    "now {now}, window {seconds}"
                );
            }
        }
        assert!(!list.push(10, U256::from(1)), "out of order is refused");
        list.prune(1500);
        let kept = Usage {
            entries: entries.into_iter().filter(|(at, _)| *at > 1500).collect(),
        };
        assert_eq!(list.within(2000, 400), kept.within(2000, 400));
    }
}
