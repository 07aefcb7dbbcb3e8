//! Least connections through a real `Balance`: requests are held open to create in-flight
//! counts, and the balancer must send each new request where the fewest are.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::{
    discover,
    strategy::LeastConnections,
    weight::{Weight, Weighted},
    Balance, BalanceLayer, ResponseFuture,
};

/// A request: the endpoint answers when the sender fires.
type Release = oneshot::Receiver<()>;

/// An endpoint that holds each request until it is released, or one that fails at once.
#[derive(Clone, Debug)]
enum Backend {
    Held(usize),
    FailFast,
}

impl Service<Release> for Backend {
    type Response = usize;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<usize, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, release: Release) -> Self::Future {
        match *self {
            Backend::Held(id) => common::Held(id).call(release),
            Backend::FailFast => Box::pin(async { Err("refused".into()) }),
        }
    }
}

/// A request in flight to an endpoint service `E`: release it to let it answer.
struct Open<E: Service<Release> = Backend> {
    release: oneshot::Sender<()>,
    response: ResponseFuture<E, Release>,
}

impl<E> Open<E>
where
    E: Service<Release, Response = usize>,
    E::Error: Into<BoxError>,
{
    /// Lets the request answer and waits for the answer (the endpoint's id).
    async fn finish(self) -> usize {
        self.release.send(()).unwrap();
        self.response.await.unwrap()
    }
}

async fn open<S, E>(balance: &mut S) -> Open<E>
where
    S: Service<Release, Future = ResponseFuture<E, Release>, Error = BoxError>,
    E: Service<Release>,
{
    let (release, rx) = oneshot::channel();
    let response = balance.ready().await.unwrap().call(rx);
    Open { release, response }
}

fn in_flight<K: std::hash::Hash + Eq + Clone>(stats: &tower_lb::Stats<K>, key: &K) -> u64 {
    stats.get(key).unwrap().in_flight
}

/// A small deterministic generator, so the tests replay the same steps.
struct Steps(u64);

impl Steps {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[tokio::test(flavor = "current_thread")]
async fn each_request_goes_to_an_endpoint_with_the_fewest_in_flight() {
    // Four endpoints are compared directly; forty go through the load index.
    for n in [4usize, 40] {
        let endpoints = (0..n).map(|id| (id, Backend::Held(id)));
        let mut balance = Balance::new(discover::fixed(endpoints), LeastConnections::new());
        let mut steps = Steps(0x9e37_79b9_7f4a_7c15);
        let mut open_requests: Vec<Open> = Vec::new();
        for step in 0..20 * n {
            // Mostly open requests, sometimes finish a random one, so counts go both ways.
            if step % 3 == 2 && !open_requests.is_empty() {
                let request = open_requests.swap_remove(steps.below(open_requests.len()));
                request.finish().await;
                continue;
            }
            let before = balance.stats();
            let least = (0..n).map(|id| in_flight(&before, &id)).min().unwrap();
            open_requests.push(open(&mut balance).await);
            let after = balance.stats();
            let chosen = (0..n)
                .find(|id| in_flight(&after, id) > in_flight(&before, id))
                .expect("the request is in flight somewhere");
            assert_eq!(
                in_flight(&before, &chosen),
                least,
                "n = {n}, step {step}: went to {chosen}"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn ties_spread_over_every_endpoint() {
    for n in [4usize, 40] {
        let endpoints = (0..n).map(|id| (id, Backend::Held(id)));
        let mut balance = Balance::new(discover::fixed(endpoints), LeastConnections::new());
        let mut chosen = HashMap::new();
        // One request at a time: every endpoint is idle at every pick.
        for _ in 0..5 * n {
            let id = open(&mut balance).await.finish().await;
            *chosen.entry(id).or_insert(0) += 1;
        }
        assert_eq!(chosen.len(), n, "every tied endpoint is chosen");
        assert!(
            chosen.values().all(|&count| count == 5),
            "ties rotate evenly: {chosen:?}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn weighted_shares_follow_the_weights_under_steady_concurrency() {
    let endpoints = [
        (
            "big",
            Weighted::new(Backend::Held(0), Weight::new(3).unwrap()),
        ),
        ("small", Weighted::new(Backend::Held(1), Weight::ONE)),
    ];
    let mut balance = BalanceLayer::new(LeastConnections::weighted())
        .weighted()
        .layer(discover::fixed(endpoints));
    let mut steps = Steps(42);
    let mut open_requests = Vec::new();
    for _ in 0..40 {
        open_requests.push(open(&mut balance).await);
    }
    let stats = balance.stats();
    // (30 + 1) / 3 is about (10 + 1) / 1.
    assert_eq!(
        (in_flight(&stats, &"big"), in_flight(&stats, &"small")),
        (30, 10)
    );

    // Steady concurrency: one of the 40 finishes at random, a new one takes its place.
    let mut finished = [0u32; 2];
    for _ in 0..2000 {
        let request = open_requests.swap_remove(steps.below(open_requests.len()));
        finished[request.finish().await] += 1;
        open_requests.push(open(&mut balance).await);
        let stats = balance.stats();
        let big = in_flight(&stats, &"big");
        assert!(
            (29..=31).contains(&big),
            "in flight stays near 3:1, big has {big}"
        );
    }
    let ratio = f64::from(finished[0]) / f64::from(finished[1]);
    assert!(
        (2.6..=3.4).contains(&ratio),
        "requests served 3:1, got {finished:?}"
    );
}

/// Four endpoints hold their requests; `fail_fast` answers every request with an error at
/// once. Keeps 20 requests open on the healthy endpoints, replacing one at random per step,
/// and returns the share of all picks that went to `fail_fast`.
async fn fail_fast_share(strategy: LeastConnections) -> f64 {
    let endpoints = (0..5).map(|id| {
        let backend = if id == 4 {
            Backend::FailFast
        } else {
            Backend::Held(id)
        };
        (id, backend)
    });
    let mut balance = Balance::new(discover::fixed(endpoints), strategy);
    let mut steps = Steps(7);
    let mut open_requests: Vec<Open> = Vec::new();
    for _ in 0..500 {
        if open_requests.len() == 20 {
            let request = open_requests.swap_remove(steps.below(open_requests.len()));
            request.finish().await;
        }
        // Send until a healthy endpoint holds the request (a few tries at most).
        for _ in 0..5 {
            let request = open(&mut balance).await;
            let stats = balance.stats();
            if in_flight(&stats, &4) == 1 {
                assert!(request.response.await.is_err(), "fail_fast fails");
            } else {
                open_requests.push(request);
                break;
            }
        }
    }
    let stats = balance.stats();
    stats.get(&4).unwrap().picks as f64 / stats.picks() as f64
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_fail_fast_endpoint_gets_no_more_than_its_share() {
    let share = fail_fast_share(LeastConnections::new()).await;
    assert!(
        share <= 0.2,
        "fail-fast share with the default penalty: {share}"
    );
    let share = fail_fast_share(LeastConnections::new().error_penalty(0).unwrap()).await;
    assert!(
        share > 0.5,
        "without the penalty the fail-fast endpoint is a black hole: {share}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_configuration_is_rejected() {
    let err = LeastConnections::new()
        .error_window(std::time::Duration::ZERO)
        .unwrap_err();
    assert_eq!(err.setting(), "error_window");
}

/// Clones on several threads open and finish requests concurrently; once all is quiet, every
/// count is zero and the next picks follow the counts exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_racing_on_several_threads_leave_an_exact_index() {
    let n = 40;
    let endpoints = (0..n).map(|id| (id, Backend::Held(id)));
    let balance = Balance::new(discover::fixed(endpoints), LeastConnections::new());
    let mut tasks = Vec::new();
    for seed in 1..=4u64 {
        let mut clone = balance.clone();
        tasks.push(tokio::spawn(async move {
            let mut steps = Steps(seed * 0x2545_f491_4f6c_dd1d);
            let mut open_requests = Vec::new();
            for _ in 0..3000 {
                if open_requests.len() < 30 && steps.below(2) == 0 {
                    open_requests.push(open(&mut clone).await);
                } else if !open_requests.is_empty() {
                    let request: Open = open_requests.swap_remove(steps.below(open_requests.len()));
                    request.finish().await;
                }
            }
            for request in open_requests {
                request.finish().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = balance.stats();
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(
        stats.picks(),
        stats.endpoints.iter().map(|e| e.picks).sum::<u64>()
    );

    // Quiet now: hold two everywhere but at endpoint 17, which must get the next two.
    let mut balance = balance;
    let mut held = Vec::new();
    for _ in 0..2 * n - 2 {
        held.push(open(&mut balance).await);
    }
    let stats = balance.stats();
    let short: Vec<usize> = (0..n).filter(|id| in_flight(&stats, id) < 2).collect();
    for _ in 0..short.len() {
        held.push(open(&mut balance).await);
    }
    let stats = balance.stats();
    assert!((0..n).all(|id| in_flight(&stats, &id) == 2), "{stats:?}");
}

#[derive(Clone, Debug)]
enum Op {
    Open,
    /// Answer the request at this position.
    Finish(proptest::sample::Index),
    /// Drop the request's sender: the endpoint answers with an error.
    Fail(proptest::sample::Index),
    /// Drop the response future unfinished.
    Cancel(proptest::sample::Index),
    Remove(u8),
    Insert(u8),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => Just(Op::Open),
        3 => any::<proptest::sample::Index>().prop_map(Op::Finish),
        1 => any::<proptest::sample::Index>().prop_map(Op::Fail),
        1 => any::<proptest::sample::Index>().prop_map(Op::Cancel),
        1 => (0..12u8).prop_map(Op::Remove),
        1 => (0..12u8).prop_map(Op::Insert),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

    /// Endpoints that report their load (more than four, so the index is used) keep exact
    /// counts through answers, errors, cancellations, removals and re-insertions: once every
    /// request is over, every count is zero and every dispatch was counted once.
    #[test]
    fn reporting_endpoints_keep_exact_counts(ops in proptest::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async move {
            let (handle, source) = discover::channel();
            for key in 0..12u8 {
                handle.insert(key, Backend::Held(key.into()));
            }
            let mut balance = Balance::new(source, LeastConnections::new());
            let mut open_requests: Vec<Open> = Vec::new();
            let mut dispatched = 0u64;
            for op in ops {
                match op {
                    Op::Open => {
                        let mut cx = Context::from_waker(std::task::Waker::noop());
                        if Service::<Release>::poll_ready(&mut balance, &mut cx).is_ready() {
                            let (release, rx) = oneshot::channel();
                            let response = balance.call(rx);
                            open_requests.push(Open { release, response });
                            dispatched += 1;
                        }
                    }
                    Op::Finish(at) | Op::Fail(at) | Op::Cancel(at) if !open_requests.is_empty() => {
                        let request = open_requests.swap_remove(at.index(open_requests.len()));
                        match op {
                            Op::Finish(_) => { let _ = request.finish().await; }
                            Op::Fail(_) => {
                                drop(request.release);
                                assert!(request.response.await.is_err());
                            }
                            _ => drop(request),
                        }
                    }
                    Op::Remove(key) => { handle.remove(key); }
                    Op::Insert(key) => { handle.insert(key, Backend::Held(key.into())); }
                    _ => {}
                }
                common::settle().await;
            }
            drop(open_requests);
            // Move the balancer to the newest table, so only the registry holds removed
            // endpoints: idle ones are then forgotten (their references are all back).
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = Service::<Release>::poll_ready(&mut balance, &mut cx);
            common::settle().await;
            let stats = balance.stats();
            assert_eq!(stats.in_flight(), 0, "{stats:?}");
            assert_eq!(stats.picks(), dispatched);
            assert!(
                stats.endpoints.iter().all(|e| e.status != tower_lb::EndpointStatus::Removed),
                "a removed endpoint is still referenced: {stats:?}"
            );
        });
    }
}
