//! Weighted round-robin and random strategies through a real `Balance`: weights from
//! discovery and from a handle, readiness and clones (allocations: `tests/alloc.rs`).

mod common;

use std::collections::HashMap;

use common::{settle, weighted, Echo, Gate, Gated};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::{
    discover,
    strategy::{Random, WeightedRoundRobin},
    weight::{Weight, Weighted},
    Balance, BalanceLayer,
};

async fn send<S>(svc: &mut S) -> usize
where
    S: Service<(), Response = usize, Error = BoxError>,
{
    svc.ready().await.unwrap().call(()).await.unwrap()
}

async fn sequence<S>(svc: &mut S, n: usize) -> Vec<usize>
where
    S: Service<(), Response = usize, Error = BoxError>,
{
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        seen.push(send(svc).await);
    }
    seen
}

fn tally(seen: &[usize]) -> HashMap<usize, usize> {
    let mut counts = HashMap::new();
    for &id in seen {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

fn boxed<S>(svc: S) -> BoxCloneSyncService<(), usize, BoxError>
where
    S: Service<(), Response = usize> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(svc.map_err(Into::into))
}

#[tokio::test(flavor = "current_thread")]
async fn weighted_round_robin_interleaves_weights_from_discovery() {
    let mut balance = BalanceLayer::new(WeightedRoundRobin::new())
        .weighted()
        .layer(discover::fixed(weighted(&[3, 1, 1])));
    let seen = sequence(&mut balance, 50).await;
    let letters: String = seen.iter().map(|&i| (b'a' + i as u8) as char).collect();
    assert!(
        "abaca".repeat(11).contains(&letters),
        "a rotation of a b a c a: {letters}"
    );
    assert_eq!(tally(&seen), HashMap::from([(0, 30), (1, 10), (2, 10)]));
}

#[tokio::test(flavor = "current_thread")]
async fn clones_each_get_exact_shares_per_cycle() {
    let balance = BalanceLayer::new(WeightedRoundRobin::new())
        .weighted()
        .layer(discover::fixed(weighted(&[5, 1, 1])));
    for mut clone in (0..4).map(|_| balance.clone()) {
        let seen = sequence(&mut clone, 70).await;
        assert_eq!(tally(&seen), HashMap::from([(0, 50), (1, 10), (2, 10)]));
        // Never five in a row for the heavy endpoint, across cycle boundaries too.
        assert!(
            seen.windows(5).all(|w| w.iter().any(|&i| i != 0)),
            "{seen:?}"
        );
    }
    let stats = balance.stats();
    assert_eq!(stats.get(&0).unwrap().picks, 200);
    assert_eq!(stats.get(&1).unwrap().picks, 40);
}

#[tokio::test(flavor = "current_thread")]
async fn weighted_round_robin_follows_a_runtime_reweight() {
    let endpoints = (0..2).map(|id| (id, Echo(id)));
    let mut balance = Balance::new(discover::fixed(endpoints), WeightedRoundRobin::new());
    let seen = sequence(&mut balance, 20).await;
    assert_eq!(tally(&seen), HashMap::from([(0, 10), (1, 10)]));

    let handle = balance.handle();
    handle.set_weight(&1, Weight::new(3).unwrap()).unwrap();
    settle().await;
    let seen = sequence(&mut balance, 40).await;
    assert_eq!(
        tally(&seen),
        HashMap::from([(0, 10), (1, 30)]),
        "3:1 from the next table on: {seen:?}"
    );
    assert!(
        seen.windows(4).all(|w| w.contains(&0)),
        "smooth, not 1 1 1 0 bursts across cycles: {seen:?}"
    );

    handle.set_weight(&0, Weight::new(6).unwrap()).unwrap();
    settle().await;
    let seen = sequence(&mut balance, 30).await;
    assert_eq!(
        tally(&seen),
        HashMap::from([(0, 20), (1, 10)]),
        "6:3 is 2:1"
    );
    let stats = handle.stats().unwrap();
    assert_eq!(stats.picks(), 90, "counters survive the rebuilds");
}

#[tokio::test(flavor = "current_thread")]
async fn weighted_round_robin_never_calls_a_pending_endpoint() {
    let gate = Gate::closed();
    let gated = Gated {
        id: 0,
        gate: gate.clone(),
    };
    let endpoints = vec![
        (0, Weighted::new(boxed(gated), Weight::new(3).unwrap())),
        (1, Weighted::new(boxed(Echo(1)), Weight::ONE)),
        (2, Weighted::new(boxed(Echo(2)), Weight::ONE)),
    ];
    let mut balance = BalanceLayer::new(WeightedRoundRobin::new())
        .weighted()
        .layer(discover::fixed(endpoints));
    let seen = sequence(&mut balance, 20).await;
    assert!(
        !seen.contains(&0),
        "the pending endpoint is skipped: {seen:?}"
    );

    gate.open();
    let seen = sequence(&mut balance, 50).await;
    assert_eq!(tally(&seen), HashMap::from([(0, 30), (1, 10), (2, 10)]));
}

#[tokio::test(flavor = "current_thread")]
async fn uniform_random_spreads_evenly_whatever_the_weights() {
    let mut balance = BalanceLayer::new(Random::new())
        .weighted()
        .layer(discover::fixed(weighted(&[1, 9, 1, 1])));
    let seen = tally(&sequence(&mut balance, 8_000).await);
    // 2,000 expected each, σ ≈ 39: a 6σ tolerance.
    for id in 0..4 {
        assert!((1_760..=2_240).contains(&seen[&id]), "{seen:?}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn weighted_random_follows_discovery_weights_then_a_reweight() {
    let mut balance = BalanceLayer::new(Random::weighted())
        .weighted()
        .layer(discover::fixed(weighted(&[99, 1])));
    let seen = tally(&sequence(&mut balance, 20_000).await);
    // 200 expected for the light endpoint, σ ≈ 14: a 6σ tolerance.
    let light = seen.get(&1).copied().unwrap_or(0);
    assert!((116..=284).contains(&light), "{seen:?}");

    balance
        .handle()
        .set_weight(&1, Weight::new(297).unwrap())
        .unwrap();
    settle().await;
    let seen = tally(&sequence(&mut balance, 20_000).await);
    // Now 99:297 = 1:3: 15,000 expected, σ ≈ 61.
    assert!((14_630..=15_370).contains(&seen[&1]), "{seen:?}");
}
