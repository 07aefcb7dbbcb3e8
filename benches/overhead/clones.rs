//! Clone per request: what axum, hyper and tonic do with a service (`svc.clone().oneshot(req)`).
//!
//! For N = 2, 16, 256, 4096 and two endpoint kinds — a no-op `Copy` endpoint, and one that
//! holds four shared `Arc`s (as a hyper-util client handle does, so a copy of it costs four
//! reference-count bumps and four drops) — per request, one task:
//!
//! - `long-lived`: one `Balance` clone used for every request;
//! - `clone/req`: `balance.clone()`, `poll_ready`, `call`, the response, then the clone is
//!   dropped (driven synchronously, like the single-task benchmarks);
//! - `p2c+Buffer clone/req`: tower's p2c (`PendingRequests`) behind a `Buffer`, cloned per
//!   request and awaited with `oneshot` on a current-thread runtime — the way a tower user
//!   shares p2c today.
//!
//! Then the first request on each of 16 long-lived clones after a reweight at N = 4096 (each
//! clone has used every endpoint, so holds 4096 copies): what a table change costs a clone.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::task::noop_waker_ref;
use tower::balance::p2c;
use tower::buffer::Buffer;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{Layer, Service, ServiceExt};
use tower_lb::discover;
use tower_lb::{strategy::RoundRobin, weight::Weight, Balance, BalanceLayer};

use super::{request, Noop};

pub(crate) const ENDPOINTS: [usize; 4] = [2, 16, 256, 4096];
pub(crate) const QUICK_ENDPOINTS: [usize; 2] = [2, 4096];

/// An endpoint holding four shared `Arc`s: a copy bumps four counts, a drop releases them.
#[derive(Clone, Debug)]
pub(crate) struct FourArcs {
    id: u64,
    _pool: Arc<()>,
    _connector: Arc<()>,
    _executor: Arc<()>,
    _config: Arc<()>,
}

impl FourArcs {
    fn new(id: u64) -> Self {
        Self {
            id,
            _pool: Arc::new(()),
            _connector: Arc::new(()),
            _executor: Arc::new(()),
            _config: Arc::new(()),
        }
    }
}

impl Service<u64> for FourArcs {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Noop,
    FourArcs,
}

impl Kind {
    pub(crate) const ALL: [Kind; 2] = [Kind::Noop, Kind::FourArcs];

    fn name(self) -> &'static str {
        match self {
            Kind::Noop => "noop",
            Kind::FourArcs => "4 Arcs",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Way {
    LongLived,
    ClonePerRequest,
    BufferClonePerRequest,
}

impl Way {
    const ALL: [Way; 3] = [
        Way::LongLived,
        Way::ClonePerRequest,
        Way::BufferClonePerRequest,
    ];

    fn name(self) -> &'static str {
        match self {
            Way::LongLived => "long_lived",
            Way::ClonePerRequest => "clone_per_request",
            Way::BufferClonePerRequest => "p2c_buffer_clone_per_request",
        }
    }
}

/// ns/request medians, by (kind, way, n).
#[derive(Default)]
pub(crate) struct Results(
    std::cell::RefCell<std::collections::HashMap<(Kind, Way, usize), Vec<f64>>>,
);

impl Results {
    fn record(&self, key: (Kind, Way, usize), iters: u64, elapsed: Duration) {
        self.0
            .borrow_mut()
            .entry(key)
            .or_default()
            .push(elapsed.as_nanos() as f64 / iters.max(1) as f64);
    }

    fn median(&self, key: (Kind, Way, usize)) -> Option<f64> {
        let all = self.0.borrow();
        let samples = all.get(&key)?;
        let mut measured = samples[samples.len().saturating_sub(super::SAMPLE_SIZE)..].to_vec();
        measured.sort_by(f64::total_cmp);
        Some(measured[measured.len() / 2])
    }
}

fn balance<S>(
    rt: &tokio::runtime::Runtime,
    endpoints: Vec<(usize, S)>,
) -> Balance<usize, S, RoundRobin>
where
    S: Service<u64, Response = u64, Error = Infallible> + Clone + Send + Sync + 'static,
{
    let n = endpoints.len();
    let balance = BalanceLayer::new(RoundRobin::new()).layer(discover::fixed(endpoints));
    let mut turns = 0;
    while balance.stats().endpoints.len() < n && turns < 10_000 {
        rt.block_on(tokio::task::yield_now());
        turns += 1;
    }
    assert_eq!(balance.stats().endpoints.len(), n);
    balance
}

fn endpoints<S>(n: usize, make: impl Fn(u64) -> S) -> Vec<(usize, S)> {
    (0..n).map(|i| (i, make(i as u64))).collect()
}

/// Measures one kind at one N, every way.
fn bench_kind<S>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    results: &Results,
    kind: Kind,
    n: usize,
    make: impl Fn(u64) -> S + Copy,
) where
    S: Service<u64, Response = u64, Error = Infallible, Future = Ready<Result<u64, Infallible>>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let _entered = rt.enter();
    for way in Way::ALL {
        let mut group = c.benchmark_group(format!(
            "clones/{}/{}",
            kind.name().replace(' ', "_"),
            way.name()
        ));
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| match way {
            Way::LongLived => {
                let mut service = balance(rt, endpoints(n, make));
                b.iter_custom(|iters| {
                    let mut cx = Context::from_waker(noop_waker_ref());
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(request(&mut service, &mut cx, black_box(i)));
                    }
                    let elapsed = start.elapsed();
                    results.record((kind, way, n), iters, elapsed);
                    elapsed
                });
            }
            Way::ClonePerRequest => {
                let parent = balance(rt, endpoints(n, make));
                b.iter_custom(|iters| {
                    let mut cx = Context::from_waker(noop_waker_ref());
                    let start = Instant::now();
                    for i in 0..iters {
                        let mut clone = parent.clone();
                        black_box(request(&mut clone, &mut cx, black_box(i)));
                    }
                    let elapsed = start.elapsed();
                    results.record((kind, way, n), iters, elapsed);
                    elapsed
                });
            }
            Way::BufferClonePerRequest => {
                let discover = PendingRequestsDiscover::new::<u64>(
                    discover::fixed(endpoints(n, make)),
                    CompleteOnResponse::default(),
                );
                let buffer = Buffer::new(p2c::Balance::new(discover), 1024);
                b.iter_custom(|iters| {
                    let elapsed = rt.block_on(async {
                        let start = Instant::now();
                        for i in 0..iters {
                            let response = buffer.clone().oneshot(black_box(i)).await;
                            black_box(response.expect("p2c answers"));
                        }
                        start.elapsed()
                    });
                    results.record((kind, way, n), iters, elapsed);
                    elapsed
                });
            }
        });
        group.finish();
    }
}

pub(crate) fn bench(c: &mut Criterion, ns: &[usize], results: &Results) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    for &n in ns {
        bench_kind(c, &rt, results, Kind::Noop, n, |id| Noop { id });
        bench_kind(c, &rt, results, Kind::FourArcs, n, FourArcs::new);
    }
}

/// The first request on each of 16 clones (each holding copies of all 4096 endpoints) after a
/// reweight: median and worst over `rounds`, in ns per clone.
pub(crate) fn after_reweight(rounds: usize) -> (f64, f64) {
    const N: usize = 4096;
    const CLONES: usize = 16;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _entered = rt.enter();
    let parent = balance(&rt, endpoints(N, FourArcs::new));
    let handle = parent.handle();
    let mut clones: Vec<_> = (0..CLONES).map(|_| parent.clone()).collect();
    let mut cx = Context::from_waker(noop_waker_ref());
    for clone in &mut clones {
        for i in 0..N as u64 {
            black_box(request(clone, &mut cx, i));
        }
    }
    let mut per_clone = Vec::new();
    for round in 0..rounds {
        let key = round % N;
        let weight = 2 + (round % 5) as u32;
        handle
            .set_weight(&key, Weight::new(weight).expect("a weight"))
            .expect("the balancer is alive");
        // Let the discovery task publish the new table (it sets the weight strategies see).
        let mut turns = 0;
        while handle
            .stats()
            .expect("alive")
            .get(&key)
            .map(|e| e.effective_weight)
            != Some(weight)
            && turns < 10_000
        {
            rt.block_on(tokio::task::yield_now());
            turns += 1;
        }
        for clone in &mut clones {
            let start = Instant::now();
            black_box(request(clone, &mut cx, round as u64));
            per_clone.push(start.elapsed().as_nanos() as f64);
        }
    }
    per_clone.sort_by(f64::total_cmp);
    (
        per_clone[per_clone.len() / 2],
        per_clone[per_clone.len() - 1],
    )
}

pub(crate) fn summary(ns: &[usize], results: &Results, reweight: Option<(f64, f64)>) {
    let cell = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
    println!();
    println!("== clone per request (clone → poll_ready → call → response → drop), ns/request ==");
    println!(
        "{:>6} {:>7} | {:>10} {:>10} {:>14} | {:>12} {:>12}",
        "N", "kind", "long-lived", "clone/req", "≤ 2×LL+40 ns", "p2c+Buffer", "≤ 0.25×p2c"
    );
    for &n in ns {
        for kind in Kind::ALL {
            let long = results.median((kind, Way::LongLived, n));
            let per = results.median((kind, Way::ClonePerRequest, n));
            let buffer = results.median((kind, Way::BufferClonePerRequest, n));
            let verdict = |ok: Option<bool>| match ok {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "—",
            };
            let own = (|| Some(per? <= 2.0 * long? + 40.0))();
            let versus = (|| Some(per? <= 0.25 * buffer?))();
            let ratio = (|| Some(format!("{:.2}x", per? / buffer?)))().unwrap_or_default();
            println!(
                "{n:>6} {:>7} | {:>10} {:>10} {:>14} | {:>12} {:>5} {:>6}",
                kind.name(),
                cell(long),
                cell(per),
                verdict(own),
                cell(buffer),
                ratio,
                verdict(versus),
            );
        }
    }
    println!("  targets (issue): clone per request ≤ 2 × the long-lived clone + 40 ns, and ≤ 0.25 × tower p2c + Buffer cloned per request");
    if let Some((median, worst)) = reweight {
        println!(
            "  first request on each of 16 clones after a reweight, N = 4096 (each holding 4096 copies): median {:.1} µs, worst {:.1} µs",
            median / 1e3,
            worst / 1e3
        );
    }
}
