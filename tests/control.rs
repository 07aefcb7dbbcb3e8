//! Runtime control: weights from discovery and from a handle, and live strategy swaps.

mod common;

use common::{settle, Echo, Held};
use tower::{Layer, Service, ServiceExt};
use tower_lb::strategy::{Endpoints, PickContext, Picker, Strategy};
use tower_lb::{
    discover,
    strategy::{RoundRobin, Swappable},
    weight::{Weight, Weighted},
    Balance, BalanceLayer, Error,
};

/// Always the endpoint with the highest weight; enough to observe weights and swaps.
#[derive(Clone, Debug)]
struct Heaviest;

struct HeaviestPicker(Option<usize>);

impl Strategy for Heaviest {
    type Picker = HeaviestPicker;
    fn build(&self, endpoints: &Endpoints<'_>) -> HeaviestPicker {
        HeaviestPicker((0..endpoints.len()).max_by_key(|&i| endpoints.get(i).weight()))
    }
}

impl Picker for HeaviestPicker {
    type Local = ();

    fn pick(&self, _: &Endpoints<'_>, _: &mut PickContext<'_>) -> Option<usize> {
        self.0
    }
}

async fn send<S>(svc: &mut S) -> usize
where
    S: Service<(), Response = usize, Error = tower::BoxError>,
{
    svc.ready().await.unwrap().call(()).await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn weights_come_from_weighted_discovery() {
    let endpoints = [
        (1, Weighted::new(Echo(1), Weight::new(2).unwrap())),
        (2, Weighted::new(Echo(2), Weight::new(9).unwrap())),
    ];
    let mut balance = BalanceLayer::new(Heaviest)
        .weighted()
        .layer(discover::fixed(endpoints));
    assert_eq!(send(&mut balance).await, 2);
    assert_eq!(balance.stats().get(&1).unwrap().weight, 2);
    assert_eq!(balance.stats().get(&2).unwrap().weight, 9);
}

#[tokio::test(flavor = "current_thread")]
async fn weights_can_come_from_a_function_of_the_key() {
    let endpoints = (1..=3).map(|id| (id, Echo(id)));
    let mut balance = BalanceLayer::new(Heaviest)
        .weigh_with(|key: &usize, _: &Echo| Weight::new(*key as u32 * 10).unwrap())
        .layer(discover::fixed(endpoints));
    assert_eq!(send(&mut balance).await, 3);
}

#[tokio::test(flavor = "current_thread")]
async fn a_runtime_reweight_changes_picks_and_keeps_counters() {
    let endpoints = (1..=3).map(|id| (id, Echo(id)));
    let mut balance = Balance::new(discover::fixed(endpoints), Heaviest);
    let first = send(&mut balance).await;
    for _ in 0..4 {
        assert_eq!(send(&mut balance).await, first);
    }
    let other = if first == 1 { 2 } else { 1 };
    let handle = balance.handle();
    handle.set_weight(&other, Weight::new(50).unwrap()).unwrap();
    settle().await;
    assert_eq!(
        send(&mut balance).await,
        other,
        "the picker follows the new weight"
    );
    let stats = handle.stats().unwrap();
    assert_eq!(stats.get(&first).unwrap().picks, 5, "counters are kept");
    assert_eq!(stats.get(&other).unwrap().weight, 50);

    assert_eq!(
        handle.set_weight(&99, Weight::ONE).unwrap_err(),
        Error::UnknownEndpoint
    );
    drop(balance);
    assert_eq!(
        handle.stats().unwrap_err(),
        Error::Closed,
        "the handle does not keep it alive"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_swap_changes_every_clone_at_once_and_keeps_in_flight_counts() {
    let (discover_handle, source) = discover::channel();
    discover_handle.insert(1, Held(1));
    discover_handle.insert(2, Held(2));
    let strategy = Swappable::new(RoundRobin::new());
    let swap = strategy.handle();
    let balance = BalanceLayer::new(strategy).layer(source);
    let handle = balance.handle();
    handle.set_weight(&2, Weight::new(3).unwrap()).unwrap();
    let mut clones: Vec<_> = (0..3).map(|_| balance.clone()).collect();

    // Requests in flight under round-robin.
    let mut held = Vec::new();
    for clone in clones.iter_mut() {
        for _ in 0..2 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let future = clone.ready().await.unwrap().call(rx);
            held.push((tx, tokio::spawn(future)));
        }
    }
    let before = handle.stats().unwrap();
    assert_eq!(before.in_flight(), 6);

    swap.swap(Heaviest);
    settle().await;
    for clone in clones.iter_mut() {
        for _ in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let future = clone.ready().await.unwrap().call(rx);
            tx.send(()).unwrap();
            assert_eq!(
                future.await.unwrap(),
                2,
                "every clone uses the new strategy"
            );
        }
    }
    assert_eq!(
        handle.stats().unwrap().in_flight(),
        6,
        "in-flight counts survive the swap"
    );
    for (tx, task) in held {
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
    let after = handle.stats().unwrap();
    assert_eq!(after.in_flight(), 0);
    assert_eq!(after.picks(), 15);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_swap_reaches_every_balancer_built_from_one_layer() {
    let strategy = Swappable::new(RoundRobin::new());
    let swap = strategy.handle();
    let layer = BalanceLayer::new(strategy)
        .weigh_with(|key: &usize, _: &Echo| Weight::new(*key as u32).unwrap());
    let mut a = layer.layer(discover::fixed([(1, Echo(1)), (2, Echo(2))]));
    let mut b = layer.layer(discover::fixed([(1, Echo(1)), (2, Echo(2))]));
    assert!(
        rotates(&mut a).await && rotates(&mut b).await,
        "round-robin at first"
    );
    swap.swap(Heaviest);
    settle().await;
    for _ in 0..4 {
        assert_eq!(send(&mut a).await, 2, "a switched");
        assert_eq!(send(&mut b).await, 2, "b switched");
    }
    // A balancer that is gone is not in the way of the next swap.
    drop(a);
    settle().await;
    swap.swap(RoundRobin::new());
    settle().await;
    assert!(rotates(&mut b).await, "b switched back");
}

/// Whether two requests in a row go to different endpoints.
async fn rotates<S>(balance: &mut S) -> bool
where
    S: Service<(), Response = usize, Error = tower::BoxError>,
{
    let first = send(balance).await;
    first != send(balance).await
}

/// A keyed strategy: the key's hash modulo the number of endpoints, or no choice without key.
#[derive(Clone, Debug)]
struct Modulo;

struct ModuloPicker;

impl Strategy for Modulo {
    type Picker = ModuloPicker;
    fn build(&self, _: &Endpoints<'_>) -> ModuloPicker {
        ModuloPicker
    }
}

impl Picker for ModuloPicker {
    type Local = ();

    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        cx.key_hash()
            .map(|hash| (hash % endpoints.len() as u64) as usize)
    }

    fn is_keyed(&self) -> bool {
        true
    }

    fn key_hasher(&self) -> tower_lb::key::KeyHasher {
        tower_lb::key::KeyHasher::crc32()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_keyed_strategy_picks_by_the_request_key_and_waits_for_its_endpoint() {
    use common::{Gate, Gated};
    use tower_lb::key::key_fn;

    let gate = Gate::closed();
    // Order endpoints by key so that "endpoint i" is index i in the table.
    let endpoints = vec![
        (0usize, tower::util::BoxCloneSyncService::new(Echo(0))),
        (
            1,
            tower::util::BoxCloneSyncService::new(Gated {
                id: 1,
                gate: gate.clone(),
            }),
        ),
    ];
    let mut balance = BalanceLayer::new(Modulo)
        .key(key_fn(|request: &&'static str| {
            (!request.is_empty()).then_some(*request)
        }))
        .layer(discover::fixed(endpoints));
    let crc = |key: &str| {
        let mut hasher = tower_lb::key::KeyHasher::crc32();
        hasher.write(key.as_bytes());
        hasher.finish()
    };
    let even = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .find(|k| crc(k) % 2 == 0)
        .unwrap();
    let odd = ["a", "b", "c", "d", "e", "f"]
        .into_iter()
        .find(|k| crc(k) % 2 == 1)
        .unwrap();

    let answer = balance.ready().await.unwrap().call(even).await.unwrap();
    assert_eq!(answer, 0);

    // The odd key maps to the pending endpoint: the request waits for it rather than going
    // elsewhere, and is answered once it becomes ready.
    let waiting = tokio::spawn(balance.ready().await.unwrap().call(odd));
    settle().await;
    assert!(!waiting.is_finished(), "the endpoint is not ready yet");
    assert_eq!(balance.stats().get(&1).unwrap().in_flight, 1);
    gate.open();
    assert_eq!(waiting.await.unwrap().unwrap(), 1);

    // No key: the picker makes no choice, and the request fails with a typed error.
    let error = balance.ready().await.unwrap().call("").await.unwrap_err();
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::MissingKey));
    assert_eq!(balance.stats().in_flight(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_seed_makes_clones_reproducible() {
    let run = |seed| async move {
        let endpoints = (0..16).map(|id| (id, Echo(id)));
        let balance = BalanceLayer::new(RoundRobin::new())
            .seed(seed)
            .layer(discover::fixed(endpoints));
        let mut firsts = Vec::new();
        for _ in 0..8 {
            let mut clone = balance.clone();
            firsts.push(send(&mut clone).await);
        }
        firsts
    };
    assert_eq!(run(7).await, run(7).await, "the same seed, the same starts");
    assert_ne!(run(7).await, run(8).await, "another seed, other starts");
}
