//! Per-request cost of every strategy through a real `Balance`, against calling the endpoint
//! directly, for N = 2, 16, 256 and 4,096 no-op endpoints (weights 1–4, so weighted paths do
//! real work), plus the build time of the consistent-hashing tables.
//!
//! Run with `cargo bench --bench strategies`. Each figure is the fastest of 9 rounds of a
//! timed loop (the least disturbed by the rest of the machine), in nanoseconds per request:
//! `poll_ready` + `call` + polling the response future, all synchronous.
//!
//! Note: the crate's dev-dependencies enable tokio's `test-util`, which makes
//! `tokio::time::Instant::now()` consult the test clock. PeakEWMA reads that clock twice per
//! request, so its figure here includes that extra cost, which production builds do not pay.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tower::{Layer, Service};
use tower_lb::strategy::{BoxStrategy, PowerOfTwoChoices};
use tower_lb::{
    discover,
    key::key_fn,
    strategy::{ConsistentHash, LeastConnections, Random, RoundRobin, WeightedRoundRobin},
    weight::{Weight, Weighted},
    BalanceLayer,
};

#[derive(Clone, Copy)]
struct Noop(u64);

impl Service<u64> for Noop {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: u64) -> Self::Future {
        ready(Ok(request ^ self.0))
    }
}

#[inline(always)]
fn one<S: Service<u64, Response = u64>>(svc: &mut S, cx: &mut Context<'_>, request: u64) -> u64
where
    S::Error: std::fmt::Debug,
{
    assert!(matches!(svc.poll_ready(cx), Poll::Ready(Ok(()))));
    match pin!(svc.call(request)).poll(cx) {
        Poll::Ready(Ok(response)) => response,
        other => panic!(
            "a no-op endpoint answers at once: {:?}",
            other.map(|r| r.err())
        ),
    }
}

/// The fastest of 9 rounds of `per_round` requests, in ns per request.
fn time<S: Service<u64, Response = u64>>(svc: &mut S, per_round: u64) -> f64
where
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    for i in 0..per_round / 4 {
        black_box(one(svc, &mut cx, i));
    }
    (0..9)
        .map(|_| {
            let start = Instant::now();
            for i in 0..per_round {
                black_box(one(
                    svc,
                    &mut cx,
                    black_box(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                ));
            }
            start.elapsed().as_nanos() as f64 / per_round as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Calls the endpoints in turn, without a balancer.
struct Direct(Vec<Noop>, usize);

impl Service<u64> for Direct {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0[self.1].poll_ready(cx)
    }

    fn call(&mut self, request: u64) -> Self::Future {
        let future = self.0[self.1].call(request);
        self.1 = (self.1 + 1) % self.0.len();
        future
    }
}

fn endpoints(n: usize) -> Vec<(usize, Weighted<Noop>)> {
    (0..n)
        .map(|i| {
            let weight = Weight::new(1 + (i % 4) as u32).expect("1..=4 are weights");
            (i, Weighted::new(Noop(i as u64), weight))
        })
        .collect()
}

fn strategies() -> Vec<(&'static str, BoxStrategy, f64)> {
    vec![
        ("round-robin", BoxStrategy::new(RoundRobin::new()), 12.0),
        (
            "weighted-rr",
            BoxStrategy::new(WeightedRoundRobin::new()),
            12.0,
        ),
        ("random", BoxStrategy::new(Random::new()), 12.0),
        (
            "random-weighted",
            BoxStrategy::new(Random::weighted()),
            12.0,
        ),
        (
            "least-conn",
            BoxStrategy::new(LeastConnections::new()),
            40.0,
        ),
        (
            "least-conn-weighted",
            BoxStrategy::new(LeastConnections::weighted()),
            40.0,
        ),
        ("p2c", BoxStrategy::new(PowerOfTwoChoices::new()), 20.0),
        (
            "p2c-peak-ewma",
            BoxStrategy::new(PowerOfTwoChoices::peak_ewma()),
            60.0,
        ),
        ("maglev", BoxStrategy::new(ConsistentHash::maglev()), 12.0),
        ("ring", BoxStrategy::new(ConsistentHash::ring()), 60.0),
        (
            "ring-nginx",
            BoxStrategy::new(ConsistentHash::ring_nginx()),
            60.0,
        ),
    ]
}

fn main() {
    let quick =
        std::env::var_os("STRATEGIES_QUICK").is_some() || std::env::args().any(|a| a == "--test");
    let ns: &[usize] = if quick {
        &[2, 256]
    } else {
        &[2, 16, 256, 4096]
    };
    let per_round = if quick { 20_000 } else { 400_000 };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();

    println!("ns per request (fastest of 9 rounds of {per_round}); added = over the direct call; `Box<dyn Picker>` dispatch included");
    print!("{:<20}", "strategy");
    for n in ns {
        print!(" {:>16}", format!("N={n} (added)"));
    }
    println!("  target (added)");
    let mut direct = Vec::new();
    print!("{:<20}", "direct");
    for &n in ns {
        let mut svc = Direct((0..n).map(|i| Noop(i as u64)).collect(), 0);
        let t = time(&mut svc, per_round);
        direct.push(t);
        print!(" {:>16}", format!("{t:.1}"));
    }
    println!();
    for (name, strategy, target) in strategies() {
        print!("{name:<20}");
        let mut worst: f64 = 0.0;
        for (i, &n) in ns.iter().enumerate() {
            let mut balance = BalanceLayer::new(strategy.clone())
                .weighted()
                .key(key_fn(|request: &u64| Some(request.to_le_bytes())))
                .layer(discover::fixed(endpoints(n)));
            assert_eq!(
                balance.stats().available(),
                n,
                "every endpoint is in the table"
            );
            let t = time(&mut balance, per_round);
            let added = t - direct[i];
            worst = worst.max(added);
            print!(" {:>16}", format!("{t:.1} ({added:+.1})"));
        }
        let verdict = if worst <= target { "met" } else { "MISSED" };
        println!("  ≤ {target:.0} ns: {verdict}");
    }

    println!("\nbuild time of the consistent-hashing tables (fastest of 5), N = 4096, weights 1–4");
    let names: Vec<String> = (0..4096)
        .map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256))
        .collect();
    let weighted: Vec<(String, u32)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), 1 + (i % 4) as u32))
        .collect();
    for (name, strategy) in [
        ("maglev", ConsistentHash::maglev()),
        ("ring", ConsistentHash::ring()),
        ("ring-nginx", ConsistentHash::ring_nginx()),
    ] {
        let best = (0..if quick { 1 } else { 5 })
            .map(|_| {
                let start = Instant::now();
                black_box(build(&strategy, &weighted));
                start.elapsed()
            })
            .min()
            .unwrap_or(Duration::ZERO);
        println!("  {name:<12} {:>8.2} ms", best.as_secs_f64() * 1e3);
    }
}

/// Builds a balancer (and so `strategy`'s table) over endpoints with these identities and
/// weights; the time includes the balancer's own setup, which is small next to the table.
fn build(strategy: &ConsistentHash, endpoints: &[(String, u32)]) -> usize {
    let list: Vec<_> = endpoints
        .iter()
        .map(|(name, weight)| {
            (
                name.clone(),
                Weighted::new(Noop(0), Weight::new(*weight).expect("weight")),
            )
        })
        .collect();
    let balance = BalanceLayer::new(strategy.clone())
        .weighted()
        .layer(discover::fixed(list));
    balance.stats().available()
}
