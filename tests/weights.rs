//! Weights hold under every weighted strategy: with weights 99:1 over two equally fast
//! endpoints the heavy one gets 99% ± 1% of 100,000 requests, whether the endpoints answer
//! at once (in real time: their measured latencies are microseconds of scheduling noise) or
//! after 10 ms (tokio's paused clock), one request at a time or 8 at a time.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tower::{Layer, Service, ServiceExt};
use tower_lb::strategy::{LeastConnections, LeastTime, PowerOfTwoChoices, Random, Strategy};
use tower_lb::{
    discover,
    weight::{Weight, Weighted},
    BalanceLayer,
};

use common::Backend;

const REQUESTS: usize = 100_000;

/// Every weighted strategy, by name.
fn weighted_strategies() -> Vec<(&'static str, Box<dyn Run>)> {
    vec![
        ("LeastTime::new()", Box::new(LeastTime::new())),
        (
            "PowerOfTwoChoices::peak_ewma()",
            Box::new(PowerOfTwoChoices::peak_ewma()),
        ),
        (
            "PowerOfTwoChoices::new()",
            Box::new(PowerOfTwoChoices::new()),
        ),
        (
            "LeastConnections::weighted()",
            Box::new(LeastConnections::weighted()),
        ),
        ("Random::weighted()", Box::new(Random::weighted())),
    ]
}

/// A strategy behind a box, so the tests can loop over strategies of different types.
trait Run {
    /// Sends `REQUESTS` requests, `concurrency` at a time, to endpoints of weights 99 and 1
    /// answering after `latency`; returns the heavy endpoint's share.
    fn heavy_share(
        &self,
        latency: Duration,
        concurrency: usize,
    ) -> Pin<Box<dyn Future<Output = f64> + '_>>;
}

impl<St> Run for St
where
    St: Strategy + Clone + Send + Sync + 'static,
    St::Picker: Send + Sync,
{
    fn heavy_share(
        &self,
        latency: Duration,
        concurrency: usize,
    ) -> Pin<Box<dyn Future<Output = f64> + '_>> {
        Box::pin(async move {
            let endpoints = [(0, 99), (1, 1)].map(|(id, weight)| {
                let backend = Backend::answers(id, latency);
                (id, Weighted::new(backend, Weight::new(weight).unwrap()))
            });
            let mut balance = BalanceLayer::new(self.clone())
                .weighted()
                .seed(7)
                .layer(discover::fixed(endpoints));
            let mut open: FuturesUnordered<tower_lb::ResponseFuture<Backend, ()>> =
                FuturesUnordered::new();
            let mut answers = [0usize; 2];
            for _ in 0..REQUESTS {
                if open.len() == concurrency {
                    let id: usize = open.next().await.unwrap().unwrap();
                    answers[id] += 1;
                }
                open.push(balance.ready().await.unwrap().call(()));
            }
            while let Some(answer) = open.next().await {
                answers[answer.unwrap()] += 1;
            }
            assert_eq!(answers.iter().sum::<usize>(), REQUESTS);
            answers[0] as f64 / REQUESTS as f64
        })
    }
}

fn check(strategy: &str, latency: Duration, concurrency: usize, share: f64) {
    assert!(
        (0.98..=1.0).contains(&share),
        "{strategy}, latency {latency:?}, {concurrency} in flight: the heavy endpoint got \
         {:.2}%, not 99% ± 1%",
        share * 100.0
    );
}

/// Endpoints that answer at once, timed by the real clock: the latency a PeakEWMA estimate
/// sees is scheduling noise, and a heavy endpoint sees more of it (it answers more often).
#[tokio::test(flavor = "current_thread")]
async fn weights_hold_over_endpoints_that_answer_at_once() {
    for (name, strategy) in weighted_strategies() {
        for concurrency in [1, 8] {
            let share = strategy.heavy_share(Duration::ZERO, concurrency).await;
            check(name, Duration::ZERO, concurrency, share);
        }
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn weights_hold_over_endpoints_that_answer_in_10_ms() {
    let latency = Duration::from_millis(10);
    for (name, strategy) in weighted_strategies() {
        for concurrency in [1, 8] {
            let share = strategy.heavy_share(latency, concurrency).await;
            check(name, latency, concurrency, share);
        }
    }
}
