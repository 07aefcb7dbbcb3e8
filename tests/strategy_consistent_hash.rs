//! Consistent hashing through a real `Balance`: few keys move on membership changes, the
//! mapping depends only on the endpoint set (not discovery order, not the process), bounded
//! loads hold under held requests, and requests without a key get the configured fallback.

mod common;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use common::settle;
use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::{
    discover,
    key::key_fn,
    strategy::{ConsistentHash, KeyFallback},
    BalanceLayer, Error,
};

/// Answers its own name.
#[derive(Clone, Debug)]
struct Named(String);

impl Service<String> for Named {
    type Response = String;
    type Error = Infallible;
    type Future = Ready<Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: String) -> Self::Future {
        ready(Ok(self.0.clone()))
    }
}

fn name(i: usize) -> String {
    format!("backend-{i:02}")
}

fn endpoints(n: usize) -> Vec<(String, Named)> {
    (0..n).map(|i| (name(i), Named(name(i)))).collect()
}

/// The request is its key; an empty request has none.
fn request_key() -> tower_lb::key::KeyFn<impl Fn(&String) -> Option<String> + Clone> {
    key_fn(|request: &String| (!request.is_empty()).then(|| request.clone()))
}

/// The endpoint that answers each of `keys` keys `user-0`, `user-1`…
async fn mapping<S>(balance: &mut S, keys: usize) -> Vec<String>
where
    S: Service<String, Response = String, Error = BoxError>,
{
    let mut answers = Vec::with_capacity(keys);
    for i in 0..keys {
        let answer = balance.ready().await.unwrap().call(format!("user-{i}"));
        answers.push(answer.await.unwrap());
    }
    answers
}

/// The endpoint that answers `key`.
async fn answer<S>(balance: &mut S, key: &str) -> String
where
    S: Service<String, Response = String, Error = BoxError>,
{
    balance
        .ready()
        .await
        .unwrap()
        .call(key.to_string())
        .await
        .unwrap()
}

/// How many keys answer differently.
fn moved(before: &[String], after: &[String]) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

#[tokio::test(flavor = "current_thread")]
async fn membership_changes_move_few_keys() {
    const N: usize = 20;
    const KEYS: usize = 20_000;
    for (strategy, ring) in [
        (ConsistentHash::ring(), true),
        (ConsistentHash::ring_nginx(), true),
        (ConsistentHash::maglev(), false),
    ] {
        let label = format!("{strategy:?}");
        let (handle, source) = discover::channel();
        let mut balance = BalanceLayer::new(strategy).key(request_key()).layer(source);
        for (key, service) in endpoints(N) {
            handle.insert(key, service);
        }
        settle().await;
        let all = mapping(&mut balance, KEYS).await;

        // Removing one endpoint moves its keys; a ring moves nothing else.
        handle.remove(name(7));
        settle().await;
        let fewer = mapping(&mut balance, KEYS).await;
        let removed_keys = all.iter().filter(|e| **e == name(7)).count();
        for (old, new) in all.iter().zip(&fewer) {
            assert_ne!(new, &name(7), "{label}");
            if ring {
                assert!(old == new || old == &name(7), "{label}: {old} -> {new}");
            }
        }
        let moved_on_removal = moved(&all, &fewer);
        assert!(moved_on_removal >= removed_keys);
        if !ring {
            assert!(
                moved_on_removal as f64 <= 1.3 * KEYS as f64 / N as f64,
                "{label}: {moved_on_removal} of {KEYS} keys moved when 1 of {N} endpoints left"
            );
        }

        // Adding one moves about 1/N of the keys, on a ring all to the newcomer.
        handle.insert(name(N), Named(name(N)));
        settle().await;
        let grown = mapping(&mut balance, KEYS).await;
        let moved_on_addition = moved(&fewer, &grown);
        if ring {
            for (old, new) in fewer.iter().zip(&grown) {
                assert!(old == new || new == &name(N), "{label}: {old} -> {new}");
            }
        }
        let share = moved_on_addition as f64 / (KEYS as f64 / N as f64);
        // A ring's shares vary (±20% with 160 points per weight), Maglev's barely.
        let range = if ring { 0.5..1.6 } else { 0.8..1.3 };
        assert!(
            range.contains(&share),
            "{label}: adding 1 endpoint to {} moved {share:.2}/{N} of the keys",
            N - 1
        );
        println!(
            "{label}: removal moved {:.3}/N, addition {share:.3}/N",
            moved_on_removal as f64 * N as f64 / KEYS as f64
        );
    }
}

/// A fixed permutation of `0..n` (an LCG's order), so that the test is repeatable.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed;
    for i in (1..n).rev() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    order
}

#[tokio::test(flavor = "current_thread")]
async fn discovery_order_does_not_change_the_mapping() {
    for (strategy, keys) in [
        (ConsistentHash::maglev(), 100_000),
        (ConsistentHash::ring(), 20_000),
        (ConsistentHash::ring_nginx(), 20_000),
    ] {
        let label = format!("{strategy:?}");
        let layer = BalanceLayer::new(strategy).key(request_key());
        assert_ne!(shuffled(30, 1), shuffled(30, 2));
        let mut answers = Vec::new();
        for seed in [1, 2] {
            let list = endpoints(30);
            let list: Vec<_> = shuffled(30, seed)
                .into_iter()
                .map(|i| list[i].clone())
                .collect();
            let mut balance = layer.clone().layer(discover::fixed(list));
            answers.push(mapping(&mut balance, keys).await);
        }
        assert_eq!(moved(&answers[0], &answers[1]), 0, "{label}");
    }
}

/// Set in the child process of [`another_process_maps_every_key_alike`].
const CHILD: &str = "TOWER_LB_HASH_DIGEST_CHILD";

/// A digest of where 10,000 keys go, for Maglev, the ring and the nginx ring, over 30
/// endpoints discovered in the order `seed` gives.
async fn digests(seed: u64) -> [u64; 3] {
    let mut digests = [0; 3];
    for (digest, strategy) in digests.iter_mut().zip([
        ConsistentHash::maglev(),
        ConsistentHash::ring(),
        ConsistentHash::ring_nginx(),
    ]) {
        let list = endpoints(30);
        let list: Vec<_> = shuffled(30, seed)
            .into_iter()
            .map(|i| list[i].clone())
            .collect();
        let mut balance = BalanceLayer::new(strategy)
            .key(request_key())
            .layer(discover::fixed(list));
        // FNV-1a over the answers, independent of the crate's own hashing.
        *digest = 0xcbf2_9ce4_8422_2325;
        for answer in mapping(&mut balance, 10_000).await {
            for byte in answer.bytes().chain([0]) {
                *digest = (*digest ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    digests
}

/// Not a test on its own: run by [`another_process_maps_every_key_alike`] in a child
/// process, it prints the digests.
#[tokio::test(flavor = "current_thread")]
async fn digest_child() {
    if std::env::var_os(CHILD).is_some() {
        let [maglev, ring, nginx] = digests(7).await;
        println!("digests={maglev:016x},{ring:016x},{nginx:016x}");
    }
}

/// Determinism across processes and machines, shown twice: another process (with its own
/// random state, e.g. `HashMap` seeds) discovering the endpoints in another order computes
/// the same mapping; and the mapping equals digests pinned when this test was written, so a
/// change of hash, placement or table algorithm (which would remap every key of every
/// deployment on upgrade) fails here.
#[tokio::test(flavor = "current_thread")]
async fn another_process_maps_every_key_alike() {
    let here = digests(3).await;
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["digest_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("the test binary runs again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.split_once("digests=").map(|(_, digests)| digests))
        .unwrap_or_else(|| panic!("the child printed no digests: {stdout}"));
    let there: Vec<u64> = line
        .split(',')
        .map(|d| u64::from_str_radix(d, 16).unwrap())
        .collect();
    assert_eq!(there, here, "another process maps keys differently");
    assert_eq!(
        here,
        [GOLDEN_MAGLEV, GOLDEN_RING, GOLDEN_NGINX],
        "the mapping changed: {here:016x?}"
    );
}

// Computed once, by this test, when the tables were written; Maglev's and the ring's again
// when the stable key hash went from a byte at a time (FNV-1a) to a word at a time, before
// the first release. The nginx ring's CRC-32 is unchanged.
const GOLDEN_MAGLEV: u64 = 0x2815_df47_b7a5_dc4c;
const GOLDEN_RING: u64 = 0x45af_308b_c2cf_83db;
const GOLDEN_NGINX: u64 = 0x6cca_9953_1f06_0d91;

/// Answers its index once the request's receiver fires.
#[derive(Clone, Debug)]
struct Held(usize);

type HeldRequest = (String, oneshot::Receiver<()>);

impl Service<HeldRequest> for Held {
    type Response = usize;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (_, release): HeldRequest) -> Self::Future {
        let id = self.0;
        Box::pin(async move {
            release.await.map_err(|_| "released without answer")?;
            Ok(id)
        })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn bounded_loads_hold_with_requests_in_flight_from_several_clones() {
    const N: usize = 8;
    const FACTOR: f64 = 1.25;
    for strategy in [ConsistentHash::maglev(), ConsistentHash::ring()] {
        let strategy = strategy.bounded_load(FACTOR).unwrap();
        let label = format!("{strategy:?}");
        let balance = BalanceLayer::new(strategy)
            .key(key_fn(|(key, _): &HeldRequest| Some(key.clone())))
            .layer(discover::fixed((0..N).map(|i| (i, Held(i)))));
        let mut clones: Vec<_> = (0..4).map(|_| balance.clone()).collect();
        let mut releases = Vec::new();
        let mut responses = Vec::new();
        let mut completed = 0;
        for i in 0..400usize {
            // Three requests in four share one hot key.
            let key = if i % 4 == 0 {
                format!("user-{i}")
            } else {
                "hot".to_owned()
            };
            let (release, held) = oneshot::channel();
            let clone = &mut clones[i % 4];
            let response = clone.ready().await.unwrap().call((key, held));
            responses.push(tokio::spawn(response));
            releases.push(release);
            let stats = balance.stats();
            let total = stats.in_flight();
            assert_eq!(total, i as u64 + 1 - completed);
            let cap = (FACTOR * total as f64 / N as f64 - 1e-9).ceil() as u64;
            for endpoint in &stats.endpoints {
                assert!(
                    endpoint.in_flight <= cap,
                    "{label}: endpoint {} has {} in flight, above the cap {cap} at {total}",
                    endpoint.key,
                    endpoint.in_flight
                );
            }
            // Now and then a request completes, so counts also go down.
            if i % 7 == 6 {
                let _ = releases.remove(0).send(());
                responses.remove(0).await.unwrap().unwrap();
                completed += 1;
            }
        }
        for release in releases {
            let _ = release.send(());
        }
        for response in responses {
            response.await.unwrap().unwrap();
        }
        assert_eq!(balance.stats().in_flight(), 0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_without_a_key_gets_the_configured_fallback() {
    for strategy in [ConsistentHash::maglev(), ConsistentHash::ring_nginx()] {
        // The default: a typed error, nothing dispatched.
        let mut balance = BalanceLayer::new(strategy.clone())
            .key(request_key())
            .layer(discover::fixed(endpoints(4)));
        let error = balance
            .ready()
            .await
            .unwrap()
            .call(String::new())
            .await
            .unwrap_err();
        assert_eq!(error.downcast_ref::<Error>(), Some(&Error::MissingKey));
        assert_eq!(balance.stats().picks(), 0);

        // Round-robin: each endpoint in turn.
        let mut balance = BalanceLayer::new(strategy.clone().fallback(KeyFallback::RoundRobin))
            .key(request_key())
            .layer(discover::fixed(endpoints(4)));
        let mut turns = Vec::new();
        for _ in 0..8 {
            turns.push(
                balance
                    .ready()
                    .await
                    .unwrap()
                    .call(String::new())
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(turns[..4], turns[4..], "{turns:?}");
        let mut distinct = turns[..4].to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "{turns:?}");

        // Random: spread over every endpoint.
        let mut balance = BalanceLayer::new(strategy.fallback(KeyFallback::Random))
            .key(request_key())
            .layer(discover::fixed(endpoints(4)));
        for _ in 0..400 {
            balance
                .ready()
                .await
                .unwrap()
                .call(String::new())
                .await
                .unwrap();
        }
        let stats = balance.stats();
        assert!(stats.endpoints.iter().all(|e| e.picks > 50), "{stats:?}");
    }
}

/// Drains the endpoint of `user-7`, then every endpoint, through `handle`: `balance` stays
/// ready and sends the key elsewhere, then fails readiness with the typed error. The drains
/// set the endpoints' flags at once, before a new table is published, so the clone still
/// lists them: a keyed `poll_ready` first looks at the endpoint the clone used last, and must
/// look on past it.
async fn keyed_readiness_follows_drains<S>(
    balance: &mut S,
    handle: &tower_lb::BalanceHandle<String>,
) where
    S: Service<String, Response = String, Error = BoxError>,
{
    let home = answer(balance, "user-7").await;
    let _drain = handle.drain(&home).unwrap();
    assert_ne!(answer(balance, "user-7").await, home);
    let _drains: Vec<_> = (0..3).filter_map(|i| handle.drain(&name(i)).ok()).collect();
    let Err(error) = balance.ready().await else {
        panic!("ready with every endpoint drained");
    };
    assert_eq!(
        error.downcast_ref::<Error>(),
        Some(&Error::NoEndpoints),
        "{error}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn keyed_readiness_follows_the_endpoints_not_the_last_one_used() {
    for strategy in [ConsistentHash::maglev(), ConsistentHash::ring()] {
        let mut balance = BalanceLayer::new(strategy)
            .key(request_key())
            .layer(discover::fixed(endpoints(3)));
        let handle = balance.handle();
        keyed_readiness_follows_drains(&mut balance, &handle).await;
    }
}

/// The same through a strategy that is keyed only at run time (a `Swappable` swapped to
/// Maglev), whose keyed readiness takes another (out-of-line) path.
#[tokio::test(flavor = "current_thread")]
async fn keyed_readiness_also_holds_when_the_strategy_is_swapped_in() {
    let swappable = tower_lb::strategy::Swappable::new(tower_lb::strategy::RoundRobin::new());
    let swap = swappable.handle();
    let mut balance = BalanceLayer::new(swappable)
        .key(request_key())
        .layer(discover::fixed(endpoints(3)));
    let handle = balance.handle();
    balance.ready().await.unwrap();
    swap.swap(ConsistentHash::maglev());
    settle().await;
    let home = answer(&mut balance, "user-7").await;
    for _ in 0..5 {
        let again = answer(&mut balance, "user-7").await;
        assert_eq!(again, home, "keyed now: the key keeps its endpoint");
    }
    keyed_readiness_follows_drains(&mut balance, &handle).await;
}

#[test]
fn invalid_configuration_is_rejected_with_a_reason() {
    let error = ConsistentHash::maglev().table_size(100_000).unwrap_err();
    assert_eq!(error.setting(), "table_size");
    assert!(error.to_string().contains("not a prime"), "{error}");
    let error = ConsistentHash::maglev().bounded_load(0.8).unwrap_err();
    assert!(error.to_string().contains("at least 1"), "{error}");
    let error = ConsistentHash::ring().points_per_weight(0).unwrap_err();
    assert_eq!(error.setting(), "points_per_weight");
    let error = ConsistentHash::ring_nginx().seed(42).unwrap_err();
    assert!(error.to_string().contains("nginx"), "{error}");
    let error = ConsistentHash::ring().table_size(65_537).unwrap_err();
    assert!(error.to_string().contains("Maglev"), "{error}");
}
