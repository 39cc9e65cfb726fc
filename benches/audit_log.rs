//! The audit log at scale: a 1,000,000-entry log in a real SQLite store,
//! then the cost of proofs, roots and one more append against it.
//!
//! ```sh
//! cargo bench --bench audit_log   # builds target/tmp/bench-data/audit-1m.db once (seconds)
//! ```
//!
//! Figures and the machine they ran on are in docs/performance.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};

use custos::store::Store;
use custos::store::audit::{self as log, SqlNodes};
use custos_core::audit::entry::Event;
use custos_core::audit::merkle;

const ENTRIES: u64 = 1_000_000;
const BATCH: u64 = 10_000;

/// A log of `ENTRIES` entries, built once and reused between runs.
fn million_entry_store() -> Store {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit-1m.db");
    let store = Store::open(&path).unwrap();
    let have = store.read(log::size).unwrap();
    if have < ENTRIES {
        let started = Instant::now();
        let mut next = have;
        while next < ENTRIES {
            let end = (next + BATCH).min(ENTRIES);
            store
                .write(|tx| {
                    for i in next..end {
                        let event = Event::Closed {
                            withdrawal_id: format!("wd_{i:012}"),
                            state: "EXPIRED".into(),
                        };
                        log::append(tx, 1_800_000_000 + i, event)?;
                    }
                    Ok::<_, custos::store::StoreError>(())
                })
                .unwrap();
            next = end;
        }
        eprintln!(
            "built a {ENTRIES}-entry log in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    store
}

fn proofs(c: &mut Criterion) {
    let store = million_entry_store();
    let size = ENTRIES;
    let root = store
        .read(|conn| Ok::<_, custos::store::StoreError>(merkle::root(&SqlNodes(conn), size)))
        .unwrap()
        .unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random_below = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };

    let mut group = c.benchmark_group("audit log at 1M entries");
    group.bench_function("root", |b| {
        b.iter(|| {
            store
                .read(|conn| Ok::<_, custos::store::StoreError>(merkle::root(&SqlNodes(conn), size)))
                .unwrap()
                .unwrap()
        })
    });
    group.bench_function("inclusion proof + verify", |b| {
        b.iter(|| {
            let index = random_below(size);
            store
                .read(|conn| {
                    let entry = log::entries(conn, index, index + 1)?.remove(0);
                    let proof = merkle::inclusion_proof(&SqlNodes(conn), index, size)
                        .map_err(|e| e.to_string())
                        .unwrap();
                    merkle::verify_inclusion(&merkle::leaf_hash(&entry), index, size, &proof, &root).unwrap();
                    Ok::<_, custos::store::StoreError>(())
                })
                .unwrap()
        })
    });
    group.bench_function("consistency proof + verify", |b| {
        b.iter(|| {
            let old = 1 + random_below(size - 1);
            store
                .read(|conn| {
                    let old_root = merkle::root(&SqlNodes(conn), old)
                        .map_err(|e| e.to_string())
                        .unwrap();
                    let proof = merkle::consistency_proof(&SqlNodes(conn), old, size)
                        .map_err(|e| e.to_string())
                        .unwrap();
                    merkle::verify_consistency(old, size, &old_root, &root, &proof).unwrap();
                    Ok::<_, custos::store::StoreError>(())
                })
                .unwrap()
        })
    });
    group.bench_function("append one entry (transaction rolled back)", |b| {
        b.iter(|| {
            let result: Result<(), custos::store::StoreError> = store.write(|tx| {
                log::append(
                    tx,
                    1_900_000_000,
                    Event::Closed {
                        withdrawal_id: "wd_bench".into(),
                        state: "CANCELLED".into(),
                    },
                )?;
                // Roll back: the stored log stays at exactly 1M entries.
                Err(custos::store::StoreError::Conflict("bench rollback"))
            });
            assert!(result.is_err());
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = proofs
}
criterion_main!(benches);
