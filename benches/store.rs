//! The durable state's in-memory side: what the store thread does for one access `set` with a
//! large table, and what a shard pays to look an entry up in it.
//!
//! * `store/set_and_publish/<N>`: [`StoreState::apply`] of a `set` replacing one entry of a
//!   table of N stored entries (N owners, one entry each), then the clone of the access table
//!   the store publishes to every shard after the commit (the commit itself, an `fsync`, is
//!   measured by `scripts/access-bench`). The table is a persistent map, so the clone shares
//!   all but the changed owner: the figure should not grow with N.
//! * `store/select/<N>`: [`AccessTable::allows`] for `core:data` of one owner among N, as the
//!   relay does for a recipient whose decision is not cached yet.
//!
//! Run: `cargo bench --bench store`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use apex_proto::apex::access::{AccessTable, Action, ActorPattern};
use apex_proto::apex::addr::Endpoint;
use apex_proto::apex::timestamp::Timestamp;
use apex_proto::store::{AccessChange, AccessLimits, AccessWritten, Outcome, StoreOp, StoreState};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn owner(i: usize) -> Endpoint {
    Endpoint::parse(&format!("owner{i}@example.com")).unwrap()
}

/// A state with `n` stored entries, one per owner: `*@example.com` may send it data.
fn state_with(n: usize) -> StoreState {
    let mut state = StoreState::new(
        AccessTable::new(),
        AccessLimits {
            max_entries: n + 1,
            ..AccessLimits::default()
        },
    );
    let actor = ActorPattern::parse("*@example.com").unwrap();
    for i in 0..n {
        let op = StoreOp::SetAccess(AccessChange {
            owner: owner(i),
            actor: actor.clone(),
            actions: Some(vec![Action::CORE_DATA]),
            expect: None,
        });
        let (outcome, _) = state.apply(op, Timestamp::from_unix_millis(1));
        assert!(matches!(outcome, Outcome::Access(Ok(_))));
    }
    state
}

fn bench_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    for n in [1_000, 100_000] {
        let mut state = state_with(n);
        let actor = ActorPattern::parse("*@example.com").unwrap();
        let target = owner(n / 2);
        let mut last = state
            .access()
            .entry(&target, &actor)
            .and_then(|e| e.last_update.clone())
            .unwrap();
        let mut clock = 1_000;
        group.bench_function(BenchmarkId::new("set_and_publish", n), |b| {
            b.iter(|| {
                clock += 1;
                let op = StoreOp::SetAccess(AccessChange {
                    owner: target.clone(),
                    actor: actor.clone(),
                    actions: Some(vec![Action::CORE_DATA]),
                    expect: Some(Timestamp::parse(&last).unwrap()),
                });
                let (outcome, mutation) = state.apply(op, Timestamp::from_unix_millis(clock));
                let Outcome::Access(Ok(AccessWritten::Written(entry))) = outcome else {
                    panic!("not replaced: {outcome:?}");
                };
                last = entry.last_update.unwrap();
                black_box(mutation);
                Arc::new(state.access().clone())
            })
        });
        let table = state.access().clone();
        let fred = Endpoint::parse("fred@example.com").unwrap();
        group.bench_function(BenchmarkId::new("select", n), |b| {
            b.iter(|| black_box(table.allows(black_box(&target), &fred, "core:data")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
