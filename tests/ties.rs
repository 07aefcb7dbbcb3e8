//! Ties are fair: equal endpoints get equal shares under least connections, weighted or not,
//! and under least time (the recommended default),
//! however the balancer is cloned — one long-lived service, a fresh clone per request (as
//! axum, hyper and tonic use a service), or a few long-lived clones taking turns.
//!
//! The backends are simulated in virtual time, event by event: open-loop Poisson arrivals,
//! each backend a FIFO queue in front of its workers, on tokio's paused clock. 100,000
//! requests per run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::oneshot;
use futures::FutureExt;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::strategy::{BoxStrategy, LeastConnections, LeastTime, Strategy};
use tower_lb::{discover, Balance, BalanceLayer};

#[allow(dead_code)]
#[path = "../benches/quality/rng.rs"]
mod rng;
use rng::SplitMix64;

const REQUESTS: usize = 100_000;
/// Mean service time of a request.
const SERVICE_MS: f64 = 10.0;

/// Requests a backend received, with the channel that answers each.
type Inbox = Arc<Mutex<Vec<(usize, oneshot::Sender<()>)>>>;

/// A backend: hands each request to the simulation, which answers it when its time comes.
#[derive(Clone)]
struct Backend {
    id: usize,
    inbox: Inbox,
}

impl Service<()> for Backend {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let (answer, answered) = oneshot::channel();
        self.inbox.lock().unwrap().push((self.id, answer));
        Box::pin(async move { answered.await.map_err(Into::into) })
    }
}

/// How the caller holds the balancer.
#[derive(Clone, Copy, Debug)]
enum Clones {
    /// One service for every request.
    LongLived,
    /// A new clone of the original for every request.
    PerRequest,
    /// Four long-lived clones, used in turn.
    Four,
}

/// A situation to simulate.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    backends: usize,
    workers: usize,
    load: f64,
    /// Exponential service times if true, else every request takes the mean.
    exponential: bool,
}

type Response = tower_lb::ResponseFuture<Backend, ()>;

/// Runs `REQUESTS` requests through a balancer with `strategy`; returns the requests each
/// backend received.
async fn simulate<St>(strategy: St, scenario: Scenario, clones: Clones, seed: u64) -> Vec<u64>
where
    St: Strategy + Clone,
{
    let inbox = Inbox::default();
    let endpoints = (0..scenario.backends).map(|id| {
        let backend = Backend {
            id,
            inbox: Arc::clone(&inbox),
        };
        (id, backend)
    });
    let mut balance: Balance<usize, Backend, St> = BalanceLayer::new(strategy)
        .seed(seed)
        .layer(discover::fixed(endpoints));
    balance.ready().await.unwrap();
    let mut turns: Vec<_> = (0..4).map(|_| balance.clone()).collect();

    let mut rng = SplitMix64::new(seed);
    let rate_per_ms = scenario.load * (scenario.backends * scenario.workers) as f64 / SERVICE_MS;
    // Per backend, when each worker is next free (ms).
    let mut free_at = vec![vec![0.0f64; scenario.workers]; scenario.backends];
    // Completions due, earliest first: (time in µs, request number).
    let mut due: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut open: HashMap<usize, (oneshot::Sender<()>, Pin<Box<Response>>)> = HashMap::new();
    let mut received = vec![0u64; scenario.backends];
    let mut now_ms = 0.0;
    // tokio's paused clock follows the simulation, so that latencies are virtual too.
    let mut clock_us = 0u64;
    let start = tokio::time::Instant::now();
    let answer = |open: &mut HashMap<usize, (oneshot::Sender<()>, Pin<Box<Response>>)>,
                  request: usize| {
        let (sender, mut response) = open.remove(&request).unwrap();
        sender.send(()).unwrap();
        // The answer is there: the response future completes at once and releases its
        // endpoint's in-flight count.
        response.as_mut().now_or_never().unwrap().unwrap();
    };
    for request in 0..REQUESTS {
        now_ms += rng.exponential(1.0 / rate_per_ms);
        let now_us = (now_ms * 1e3) as u64;
        while let Some(&Reverse((at, done))) = due.peek() {
            if at > now_us {
                break;
            }
            due.pop();
            clock_us = advance(start, clock_us, at).await;
            answer(&mut open, done);
        }
        clock_us = advance(start, clock_us, now_us).await;
        let response = match clones {
            Clones::LongLived => balance.ready().await.unwrap().call(()),
            Clones::PerRequest => balance.clone().ready().await.unwrap().call(()),
            Clones::Four => turns[request % 4].ready().await.unwrap().call(()),
        };
        let (backend, sender) = inbox.lock().unwrap().pop().unwrap();
        received[backend] += 1;
        let service = if scenario.exponential {
            rng.exponential(SERVICE_MS)
        } else {
            SERVICE_MS
        };
        let workers = &mut free_at[backend];
        let (worker, free) = workers
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        let done = free.max(now_ms) + service;
        workers[worker] = done;
        due.push(Reverse(((done * 1e3) as u64, request)));
        open.insert(request, (sender, Box::pin(response)));
    }
    while let Some(Reverse((at, done))) = due.pop() {
        clock_us = advance(start, clock_us, at).await;
        answer(&mut open, done);
    }
    assert_eq!(balance.stats().in_flight(), 0);
    assert_eq!(received.iter().sum::<u64>(), REQUESTS as u64);
    received
}

/// Moves tokio's paused clock from `from` to `to` (µs since `start`); returns `to`.
async fn advance(start: tokio::time::Instant, from: u64, to: u64) -> u64 {
    if to > from {
        tokio::time::advance(Duration::from_micros(to - from)).await;
    }
    debug_assert!(start.elapsed() >= Duration::from_micros(to));
    to.max(from)
}

/// Every backend's share is within 3% (relative) of the mean share.
fn assert_fair(what: &str, received: &[u64]) {
    let mean = REQUESTS as f64 / received.len() as f64;
    let worst = received
        .iter()
        .map(|&r| (r as f64 / mean - 1.0).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "{what}: farthest from the mean share by {:.2}%: {received:?}",
        worst * 100.0
    );
    assert!(
        worst <= 0.03,
        "{what}: shares {:?} (% of requests); the farthest from the mean is off by {:.1}%",
        received
            .iter()
            .map(|&r| format!("{:.2}", r as f64 * 100.0 / REQUESTS as f64))
            .collect::<Vec<_>>(),
        worst * 100.0
    );
}

/// The strategies under test, boxed so that one loop runs them all.
fn strategies() -> [(&'static str, BoxStrategy); 3] {
    [
        (
            "LeastConnections::new()",
            BoxStrategy::new(LeastConnections::new()),
        ),
        (
            "LeastConnections::weighted()",
            BoxStrategy::new(LeastConnections::weighted()),
        ),
        ("LeastTime::new()", BoxStrategy::new(LeastTime::new())),
    ]
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn five_equal_backends_at_70_percent_share_evenly() {
    // Four workers each, exponential service: per backend 20,000 requests, whose count varies
    // by about 0.7% by chance.
    let scenario = Scenario {
        backends: 5,
        workers: 4,
        load: 0.7,
        exponential: true,
    };
    for (name, strategy) in strategies() {
        for clones in [Clones::LongLived, Clones::PerRequest, Clones::Four] {
            let received = simulate(strategy.clone(), scenario, clones, 11).await;
            assert_fair(&format!("{name}, {clones:?}"), &received);
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_hundred_equal_backends_at_90_percent_share_evenly() {
    // One worker each. Every request takes the same time, so that each backend's count
    // (1,000) is set by the balancer alone: with exponential service times it would vary by
    // about 3% by chance, as much as the bound.
    let scenario = Scenario {
        backends: 100,
        workers: 1,
        load: 0.9,
        exponential: false,
    };
    for (name, strategy) in strategies() {
        for clones in [Clones::LongLived, Clones::PerRequest] {
            let received = simulate(strategy.clone(), scenario, clones, 12).await;
            assert_fair(&format!("{name}, {clones:?}"), &received);
        }
    }
}
