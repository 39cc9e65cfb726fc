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
//!
//! Other instances on the same database count withdrawals this cache never
//! sees. So the cache is only a copy that the transaction checks: each list
//! remembers the store's usage epoch of its wallet and asset (bumped by
//! every write that counts or uncounts one of their withdrawals, in that
//! write's transaction), and a list whose epoch differs from the one read
//! in the current write transaction is reloaded before it is used. SQLite
//! keeps no epochs (one process owns the file): there the epoch stays 0 and
//! a list is reloaded only when its horizon no longer covers the window.

use std::collections::HashMap;

use alloy_primitives::U256;

use super::CustodyError;
use crate::store::Store;
use crate::store::sql::Conn;
use crate::store::withdrawals as wd_store;
use custos_core::policy::RollingUsage;
use custos_core::policy::usage::UsageLedger;

/// Counted withdrawals of one wallet and asset, as far back as they were
/// loaded.
#[derive(Debug, Default)]
pub(crate) struct UsageList {
    ledger: UsageLedger,
    /// Entries at or before this time were not loaded (or were dropped).
    horizon: u64,
    /// The store's usage epoch this list matches.
    epoch: u64,
}

impl RollingUsage for UsageList {
    fn within(&self, now: u64, seconds: u64) -> (U256, u64) {
        self.ledger.within(now, seconds)
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
        conn: Conn<'_>,
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
        let epoch = wd_store::usage_epoch(conn, wallet, asset)?;
        let stale = self
            .lists
            .get(&key)
            .is_none_or(|l| l.horizon > start || l.epoch != epoch);
        if stale {
            let mut list = UsageList {
                ledger: UsageLedger::default(),
                horizon: start,
                epoch,
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
                list.ledger.add(at, amount);
            }
            self.lists.insert(key.clone(), list);
        }
        let list = self.lists.entry(key).or_default();
        // Memory stays bounded by the longest window in use.
        if list.ledger.prune(start) {
            list.horizon = start;
        }
        Ok(list)
    }

    /// Records a withdrawal counted at `at`: the write closure's last step,
    /// after the store moved the usage epoch in the same transaction (by
    /// [`wd_store::usage_epoch_step`], read from `conn`). A list that was
    /// stale before stays stale (its epoch still differs).
    pub(crate) fn counted(&mut self, conn: Conn<'_>, wallet: &str, asset: &str, at: u64, amount: U256) {
        if let Some(list) = self.lists.get_mut(&(wallet.to_owned(), asset.to_owned())) {
            list.ledger.add(at, amount);
            list.epoch += wd_store::usage_epoch_step(conn);
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

    /// A decision's own count keeps its list: the next decision on the same
    /// wallet and asset reuses it instead of reading the whole window again.
    /// (Here the store holds no counted row, so a reload would read 0.)
    #[test]
    fn a_counted_withdrawal_keeps_the_cached_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("u.db")).unwrap();
        let mut cache = UsageCache::default();
        let total = |cache: &mut UsageCache| {
            store
                .write(|c| {
                    let list = cache.list(&store, c, "hot", "ETH", 2_000, 3_600)?;
                    Ok::<_, CustodyError>(list.within(2_000, 3_600))
                })
                .unwrap()
        };
        assert_eq!(total(&mut cache), (U256::ZERO, 0));
        store
            .write(|c| {
                cache.counted(c, "hot", "ETH", 1_500, U256::from(5));
                Ok::<_, CustodyError>(())
            })
            .unwrap();
        assert_eq!(total(&mut cache), (U256::from(5), 1));
    }
}
