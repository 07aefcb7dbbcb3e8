//! Per-request overhead of `tower_lb::Balance` (DESIGN.md §7; targets from issue 16).
//!
//! Endpoints do nothing: an allocation-free service whose `poll_ready` is always ready and
//! whose future is `std::future::Ready`. A request is `poll_ready` with a no-op waker, `call`
//! and one poll of the response future, all synchronous. The sections:
//!
//! - **every strategy** (`overhead/strategies.rs`), one task, N = 16 and 4096: each strategy
//!   through a real `Balance`, beside the direct call, a ~40-line *reference* — round-robin over
//!   a `Vec` with one atomic in-flight counter per endpoint, released by the response future
//!   (`overhead/reference.rs`) — and tower's `p2c::Balance` (`PendingRequests`, `PeakEwma`),
//!   all timed in turns in the same run. It prints what each adds over the direct call and that
//!   as a multiple of what the reference adds, against the targets; then the build
//!   time of the consistent-hashing tables at N = 4096.
//! - **key hashing** (`overhead/keys.rs`): what hashing a request key costs by its length,
//!   for the stable hash and nginx's CRC-32.
//! - **throughput** (`overhead/threads.rs`): 16 clones on 2 threads, N = 16.
//! - **clone per request** (`overhead/clones.rs`): a new clone per request, as axum, hyper and
//!   tonic use a service, beside the long-lived clone and tower's p2c behind a `Buffer`
//!   cloned per request; and the first request on 16 clones after a reweight. Criterion
//!   reports each; a summary follows.
//!
//! Run with `cargo bench --bench overhead` (a few minutes). Environment:
//! `OVERHEAD_QUICK=1` runs a short pass; `OVERHEAD_N=2,16,256,4096,65536` chooses the N of the
//! strategy table (default 16 and 4096); `OVERHEAD_ONLY=strategies` (or `keys`, `tables`, `threads`,
//! `clones`, comma-separated) runs only those sections. Under `cargo test --benches` everything runs
//! once, briefly, as a smoke test, and no table is printed.
//!
//! Targets are printed beside the figures, never asserted.

use std::convert::Infallible;
use std::fmt;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::Criterion;
use futures::task::noop_waker_ref;
use tower::balance::p2c;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::{Layer, Service};
use tower_lb::discover::{self, Fixed};
use tower_lb::{strategy::RoundRobin, Balance, BalanceLayer};

#[path = "overhead/clones.rs"]
mod clones;
#[path = "overhead/keys.rs"]
mod keys;
#[path = "overhead/reference.rs"]
mod reference;
#[path = "overhead/strategies.rs"]
mod strategies;
#[path = "overhead/threads.rs"]
mod threads;

/// Criterion samples per benchmark (clones).
const SAMPLE_SIZE: usize = 20;

/// An endpoint that does nothing and allocates nothing.
#[derive(Clone, Copy, Debug)]
struct Noop {
    id: u64,
}

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
        ready(Ok(request.wrapping_add(self.id)))
    }
}

fn endpoints(n: usize) -> impl Iterator<Item = (usize, Noop)> {
    (0..n).map(|i| (i, Noop { id: i as u64 }))
}

/// The baseline: the endpoints called in turn, without a balancer.
struct Direct {
    endpoints: Vec<Noop>,
    next: usize,
}

impl Direct {
    fn new(n: usize) -> Self {
        Self {
            endpoints: endpoints(n).map(|(_, e)| e).collect(),
            next: 0,
        }
    }
}

impl Service<u64> for Direct {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.endpoints[self.next].poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: u64) -> Self::Future {
        let future = self.endpoints[self.next].call(request);
        self.next += 1;
        if self.next == self.endpoints.len() {
            self.next = 0;
        }
        future
    }
}

type TowerLb = Balance<usize, Noop, RoundRobin>;
type P2cPending =
    p2c::Balance<PendingRequestsDiscover<Fixed<usize, Noop>, CompleteOnResponse>, u64>;
type P2cPeakEwma = p2c::Balance<PeakEwmaDiscover<Fixed<usize, Noop>, CompleteOnResponse>, u64>;

/// One request, driven synchronously: every endpoint is always ready and every response
/// future is ready at its first poll, so `Pending` anywhere is a bug in the setup.
#[inline(always)]
fn request<S>(service: &mut S, cx: &mut Context<'_>, request: u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    match service.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(error)) => panic!("poll_ready failed: {error:?}"),
        Poll::Pending => panic!("poll_ready is pending with always-ready endpoints"),
    }
    let future = pin!(service.call(request));
    match future.poll(cx) {
        Poll::Ready(Ok(response)) => response,
        Poll::Ready(Err(error)) => panic!("request failed: {error:?}"),
        Poll::Pending => panic!("the response of a no-op endpoint is pending"),
    }
}

/// Builds tower-lb's round-robin balancer over `n` endpoints, on the current runtime, and
/// makes sure every endpoint is in its table. `rt` drives the discovery task if construction
/// did not take in the whole list.
fn tower_lb(rt: &tokio::runtime::Runtime, n: usize) -> TowerLb {
    let balance = BalanceLayer::new(RoundRobin::new()).layer(discover::fixed(endpoints(n)));
    let primed = balance.stats().endpoints.len();
    let mut turns = 0;
    while balance.stats().endpoints.len() < n && turns < 10_000 {
        rt.block_on(tokio::task::yield_now());
        turns += 1;
    }
    if primed != n {
        println!(
            "note: tower-lb N={n}: {primed} endpoints in the table right after construction, \
             {} after {turns} turns of the discovery task",
            balance.stats().endpoints.len()
        );
    }
    assert_eq!(
        balance.stats().endpoints.len(),
        n,
        "tower-lb has every endpoint"
    );
    balance
}

/// Drives a tower p2c balancer's discovery until it is ready with all `n` endpoints.
fn p2c_ready<S>(mut balance: p2c::Balance<S, u64>, n: usize) -> p2c::Balance<S, u64>
where
    p2c::Balance<S, u64>: Service<u64>,
    <p2c::Balance<S, u64> as Service<u64>>::Error: fmt::Debug,
    S: tower::discover::Discover,
    S::Key: std::hash::Hash,
    S::Service: Service<u64>,
    <S::Service as Service<u64>>::Error: Into<tower::BoxError>,
{
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut polls = 0;
    loop {
        match balance.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => break,
            Poll::Ready(Err(error)) => panic!("p2c failed to get ready: {error:?}"),
            Poll::Pending => {
                polls += 1;
                assert!(polls < 1_000_000, "p2c never became ready");
            }
        }
    }
    assert_eq!(balance.len(), n, "tower p2c has every endpoint");
    balance
}

fn p2c_pending(n: usize) -> P2cPending {
    let discover = PendingRequestsDiscover::new::<u64>(
        discover::fixed(endpoints(n)),
        CompleteOnResponse::default(),
    );
    p2c_ready(p2c::Balance::new(discover), n)
}

fn p2c_peak_ewma(n: usize) -> P2cPeakEwma {
    let discover = PeakEwmaDiscover::new::<u64>(
        discover::fixed(endpoints(n)),
        Duration::from_millis(1),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    p2c_ready(p2c::Balance::new(discover), n)
}

/// Which sections run: all, or those named in `OVERHEAD_ONLY`.
fn wanted(section: &str) -> bool {
    std::env::var("OVERHEAD_ONLY").map_or(true, |only| only.split(',').any(|s| s.trim() == section))
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) every part runs
    // once, briefly, as a smoke test.
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let quick = std::env::var_os("OVERHEAD_QUICK").is_some_and(|v| v != "0");
    let ns: Vec<usize> = std::env::var("OVERHEAD_N").map_or_else(
        |_| vec![16, 4096],
        |list| {
            list.split(',')
                .map(|n| n.trim().parse().expect("OVERHEAD_N: numbers"))
                .collect()
        },
    );

    if wanted("strategies") {
        let (rounds, per_round) = match (measuring, quick) {
            (false, _) => (1, 1_000),
            (true, true) => (5, 50_000),
            (true, false) => (21, 200_000),
        };
        let figures = strategies::measure(&ns, rounds, per_round);
        if measuring {
            strategies::print(&figures, rounds, per_round);
        }
    }

    if wanted("keys") {
        let (rounds, per_round) = if measuring {
            (11, 1_000_000)
        } else {
            (1, 1_000)
        };
        keys::measure(rounds, per_round, measuring);
    }

    if wanted("tables") {
        strategies::table_builds(if measuring { 5 } else { 1 });
    }

    if wanted("threads") {
        let (lb_requests, buffer_requests, rounds) = match (measuring, quick) {
            (false, _) => (1_000, 1_000, 1),
            (true, true) => (200_000, 20_000, 3),
            (true, false) => (2_000_000, 200_000, 7),
        };
        let runs = threads::throughput(lb_requests, buffer_requests, rounds);
        if measuring {
            threads::print(&runs);
        }
    }

    if wanted("clones") {
        let (measurement, warm_up) = if quick {
            (Duration::from_millis(500), Duration::from_millis(200))
        } else {
            (Duration::from_millis(1500), Duration::from_millis(500))
        };
        let mut criterion = Criterion::default()
            .sample_size(SAMPLE_SIZE)
            .measurement_time(measurement)
            .warm_up_time(warm_up)
            .without_plots()
            .configure_from_args();
        let clone_ns: &[usize] = if quick {
            &clones::QUICK_ENDPOINTS
        } else {
            &clones::ENDPOINTS
        };
        let results = clones::Results::default();
        clones::bench(&mut criterion, clone_ns, &results);
        criterion.final_summary();
        let reweight = clones::after_reweight(if measuring { 20 } else { 1 });
        if measuring {
            clones::summary(clone_ns, &results, Some(reweight));
        }
    }
}
