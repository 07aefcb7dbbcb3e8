//! Per-request overhead of `tower_lb::Balance` (DESIGN.md §7).
//!
//! What is measured, per request, with endpoints that do nothing (an allocation-free service
//! whose `poll_ready` is always ready and whose future is `std::future::Ready`):
//!
//! - **single task**, for N = 2, 16, 256, 4096 and 65,536 endpoints, one request at a time
//!   (`poll_ready` with a no-op waker, `call`, one poll of the response future):
//!   - `direct`: the endpoints called without a balancer (rotating over the N copies, so the
//!     baseline touches the same endpoint memory a balancer does);
//!   - `tower_lb_rr`: `tower_lb::Balance` with `RoundRobin` over `discover::fixed`;
//!   - `p2c_pending`: tower's `p2c::Balance` over `PendingRequestsDiscover`;
//!   - `p2c_peak_ewma`: tower's `p2c::Balance` over `PeakEwmaDiscover` (1 ms default RTT,
//!     10 s decay).
//!
//!   Criterion reports each; the summary at the end shows ns/request (median of criterion's
//!   samples), what each balancer adds over `direct`, and tower p2c ÷ tower-lb.
//! - **throughput** with 16 clones on 2 threads, N = 16, each request awaited before the next:
//!   - 16 clones of one `Balance`, 8 per OS thread, used in turn, driven synchronously (the
//!     issue's setup; 2,000,000 requests per thread);
//!   - for reference, 2 independent balancers of 8 clones each (nothing shared across
//!     threads), which shows what sharing one balancer between threads costs;
//!   - the 16 `Balance` clones as 2 tokio tasks on a 2-worker runtime, awaiting each request;
//!   - tower's p2c (`PendingRequests`) behind a `tower::buffer::Buffer`, 8 `Buffer` clones per
//!     task, 2 tasks on the same runtime (200,000 requests per task: it is much slower).
//!
//!   Each worker times itself with `Instant` (first start to last end; on 2 cores a
//!   coordinating thread may not run until the workers finish); each setup runs 7 rounds and
//!   prints the median requests/s and the range.
//!
//! The targets are printed beside the numbers, not asserted: round-robin adds at most
//! 12 ns over the direct call at every N, and 16 clones on 2 threads reach 40 M requests/s.
//!
//! - **clone per request** (`overhead/clones.rs`): a new clone per request, as axum, hyper and
//!   tonic use a service, beside the long-lived clone and tower's p2c behind a `Buffer` cloned
//!   per request, for two endpoint kinds; and the first request on 16 clones after a reweight.
//!
//! Run with `cargo bench --bench overhead` (a few minutes). `OVERHEAD_QUICK=1` runs a short
//! pass (N = 2 and 4096, shorter measurements, fewer requests). Criterion's filters work as
//! usual (`cargo bench --bench overhead -- tower_lb`); the summary shows what ran. Under
//! `cargo test --benches` every benchmark runs once, as a smoke test, and no table is printed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::task::noop_waker_ref;
use tower::balance::p2c;
use tower::buffer::Buffer;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::{Layer, Service, ServiceExt};
use tower_lb::discover::{self, Fixed};
use tower_lb::{strategy::RoundRobin, Balance, BalanceLayer};

#[path = "overhead/clones.rs"]
mod clones;

const ENDPOINTS: [usize; 5] = [2, 16, 256, 4096, 65_536];
const QUICK_ENDPOINTS: [usize; 2] = [2, 4096];
const SAMPLE_SIZE: usize = 20;
/// The target for what round-robin adds over the direct call.
const TARGET_ADDED_NS: f64 = 12.0;
/// The target for 16 clones on 2 threads.
const TARGET_REQUESTS_PER_SEC: f64 = 40e6;
const THREADS: usize = 2;
const CLONES_PER_THREAD: usize = 8;
const THROUGHPUT_ENDPOINTS: usize = 16;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Contender {
    Direct,
    TowerLb,
    P2cPending,
    P2cPeakEwma,
}

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::Direct,
        Contender::TowerLb,
        Contender::P2cPending,
        Contender::P2cPeakEwma,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::TowerLb => "tower_lb_rr",
            Contender::P2cPending => "p2c_pending",
            Contender::P2cPeakEwma => "p2c_peak_ewma",
        }
    }
}

/// ns/request of every criterion sample, per contender and N. Criterion calls the routine
/// for its warm-up first and then once per sample, so the last `SAMPLE_SIZE` entries are the
/// measurement.
#[derive(Default)]
struct Samples(RefCell<HashMap<(Contender, usize), Vec<f64>>>);

impl Samples {
    fn record(&self, contender: Contender, n: usize, iters: u64, elapsed: Duration) {
        let ns = elapsed.as_nanos() as f64 / iters.max(1) as f64;
        self.0
            .borrow_mut()
            .entry((contender, n))
            .or_default()
            .push(ns);
    }

    /// The median of the measured samples, in ns/request.
    fn median(&self, contender: Contender, n: usize) -> Option<f64> {
        let samples = self.0.borrow();
        let all = samples.get(&(contender, n))?;
        let mut measured = all[all.len().saturating_sub(SAMPLE_SIZE)..].to_vec();
        measured.sort_by(f64::total_cmp);
        Some(measured[measured.len() / 2])
    }
}

/// Benchmarks one contender at one N; `build` runs only if criterion's filter selects it.
fn bench_one<S>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    samples: &Samples,
    contender: Contender,
    n: usize,
    build: impl FnOnce() -> S,
) where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    let mut build = Some(build);
    let mut service = None;
    group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
        let service = service.get_or_insert_with(|| (build.take().expect("built once"))());
        b.iter_custom(|iters| {
            let mut cx = Context::from_waker(noop_waker_ref());
            let start = Instant::now();
            for i in 0..iters {
                black_box(request(service, &mut cx, black_box(i)));
            }
            let elapsed = start.elapsed();
            samples.record(contender, n, iters, elapsed);
            elapsed
        });
    });
}

fn single_task(c: &mut Criterion, rt: &tokio::runtime::Runtime, ns: &[usize], samples: &Samples) {
    // The balancer's discovery task spawns onto the runtime current at construction.
    let _entered = rt.enter();
    for contender in Contender::ALL {
        let mut group = c.benchmark_group(format!("single_task/{}", contender.name()));
        group.throughput(Throughput::Elements(1));
        for &n in ns {
            match contender {
                Contender::Direct => {
                    bench_one(&mut group, samples, contender, n, || Direct::new(n))
                }
                Contender::TowerLb => {
                    bench_one(&mut group, samples, contender, n, || tower_lb(rt, n))
                }
                Contender::P2cPending => {
                    bench_one(&mut group, samples, contender, n, || p2c_pending(n))
                }
                Contender::P2cPeakEwma => {
                    bench_one(&mut group, samples, contender, n, || p2c_peak_ewma(n))
                }
            }
        }
        group.finish();
    }
}

/// From the first worker's start to the last one's end. Each worker times itself: with 2 cores
/// and 2 busy workers, a coordinating thread may not run again until the work is done.
fn span(spans: impl IntoIterator<Item = (Instant, Instant)>) -> Duration {
    let (starts, ends): (Vec<Instant>, Vec<Instant>) = spans.into_iter().unzip();
    let first = starts.into_iter().min().expect("at least one worker");
    let last = ends.into_iter().max().expect("at least one worker");
    last - first
}

/// The results of one throughput setup, over several rounds.
struct Run {
    name: &'static str,
    /// Requests per round, all threads together.
    requests: u64,
    walls: Vec<Duration>,
}

impl Run {
    fn new(
        name: &'static str,
        requests: u64,
        rounds: usize,
        mut round: impl FnMut() -> Duration,
    ) -> Self {
        let walls = (0..rounds).map(|_| round()).collect();
        Self {
            name,
            requests,
            walls,
        }
    }

    /// Requests/s of each round, slowest first.
    fn rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self
            .walls
            .iter()
            .map(|wall| self.requests as f64 / wall.as_secs_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        rates
    }

    fn median(&self) -> f64 {
        let rates = self.rates();
        rates[rates.len() / 2]
    }

    fn print(&self, target: Option<f64>) {
        let rates = self.rates();
        let median = self.median();
        let verdict = match target {
            Some(target) if median >= target => {
                format!("  target ≥ {:.0} M/s: met", target / 1e6)
            }
            Some(target) => format!("  target ≥ {:.0} M/s: MISSED", target / 1e6),
            None => String::new(),
        };
        println!(
            "  {:<46} {:>7.2} M requests/s (median of {}; {:.2}..{:.2}), {:.1} ns/request/thread{verdict}",
            self.name,
            median / 1e6,
            rates.len(),
            rates[0] / 1e6,
            rates[rates.len() - 1] / 1e6,
            1e9 * THREADS as f64 / median,
        );
    }
}

/// 16 tower-lb clones on 2 OS threads, 8 each, used in turn, driven synchronously.
///
/// With `shared`, all 16 are clones of one balancer (the setup). Without, each thread
/// has its own balancer: nothing is shared across threads, which shows what sharing costs.
fn tower_lb_threads(rt: &tokio::runtime::Runtime, per_thread: u64, shared: bool) -> Duration {
    let balancers: Vec<TowerLb> = {
        let _entered = rt.enter();
        let mut balancers = vec![tower_lb(rt, THROUGHPUT_ENDPOINTS)];
        while balancers.len() < THREADS {
            let next = if shared {
                balancers[0].clone()
            } else {
                tower_lb(rt, THROUGHPUT_ENDPOINTS)
            };
            balancers.push(next);
        }
        balancers
    };
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = balancers
        .iter()
        .map(|balance| {
            let mut clones: Vec<TowerLb> =
                (0..CLONES_PER_THREAD).map(|_| balance.clone()).collect();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut cx = Context::from_waker(noop_waker_ref());
                // Each clone's first request copies the endpoint table; keep that out of the run.
                for clone in &mut clones {
                    black_box(request(clone, &mut cx, 0));
                }
                barrier.wait();
                let start = Instant::now();
                for i in 0..per_thread {
                    let clone = &mut clones[i as usize % CLONES_PER_THREAD];
                    black_box(request(clone, &mut cx, black_box(i)));
                }
                (start, Instant::now())
            })
        })
        .collect();
    let wall = span(
        threads
            .into_iter()
            .map(|t| t.join().expect("a benchmark thread panicked")),
    );
    let expected = THREADS as u64 * (per_thread + CLONES_PER_THREAD as u64);
    let picks: u64 = if shared {
        balancers[0].stats().picks()
    } else {
        balancers.iter().map(|b| b.stats().picks()).sum()
    };
    assert_eq!(picks, expected, "every request was dispatched once");
    assert!(balancers.iter().all(|b| b.stats().in_flight() == 0));
    wall
}

/// `tasks` tokio tasks on a 2-worker runtime, each using 8 clones of `service` in turn and
/// awaiting every request.
fn tokio_tasks<S>(mt: &tokio::runtime::Runtime, service: S, per_task: u64) -> Duration
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug + Send,
{
    mt.block_on(async move {
        let barrier = Arc::new(tokio::sync::Barrier::new(THREADS));
        let tasks: Vec<_> = (0..THREADS)
            .map(|_| {
                let mut clones: Vec<S> = (0..CLONES_PER_THREAD).map(|_| service.clone()).collect();
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    for clone in &mut clones {
                        black_box(
                            clone
                                .ready()
                                .await
                                .expect("ready")
                                .call(0)
                                .await
                                .expect("call"),
                        );
                    }
                    barrier.wait().await;
                    let start = Instant::now();
                    for i in 0..per_task {
                        let clone = &mut clones[i as usize % CLONES_PER_THREAD];
                        let response = clone.ready().await.expect("ready").call(black_box(i)).await;
                        black_box(response.expect("call"));
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        let mut spans = Vec::with_capacity(THREADS);
        for task in tasks {
            spans.push(task.await.expect("a benchmark task panicked"));
        }
        span(spans)
    })
}

fn throughput(lb_requests: u64, buffer_requests: u64, rounds: usize) -> Vec<Run> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .expect("a runtime");
    let total = |per_thread: u64| THREADS as u64 * per_thread;

    let threads = Run::new(
        "tower-lb RR, 16 clones, 2 OS threads",
        total(lb_requests),
        rounds,
        || tower_lb_threads(&rt, lb_requests, true),
    );
    let unshared = Run::new(
        "(ref.) tower-lb RR, 2 balancers × 8 clones",
        total(lb_requests),
        rounds,
        || tower_lb_threads(&rt, lb_requests, false),
    );

    let balance = {
        let _entered = mt.enter();
        tower_lb(&rt, THROUGHPUT_ENDPOINTS)
    };
    let tasks = Run::new(
        "tower-lb RR, 16 clones, 2 tokio tasks",
        total(lb_requests),
        rounds,
        || tokio_tasks(&mt, balance.clone(), lb_requests),
    );

    let buffer = {
        let _entered = mt.enter();
        Buffer::new(p2c_pending(THROUGHPUT_ENDPOINTS), 1024)
    };
    let buffered = Run::new(
        "tower p2c pending + Buffer, 16 clones, 2 tasks",
        total(buffer_requests),
        rounds,
        || tokio_tasks(&mt, buffer.clone(), buffer_requests),
    );
    vec![threads, unshared, tasks, buffered]
}

fn summary(ns: &[usize], samples: &Samples, runs: &[Run]) {
    let cell = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
    println!();
    println!(
        "== per-request overhead, single task (ns/request, median of {SAMPLE_SIZE} samples) =="
    );
    println!(
        "{:>7} {:>8} {:>8} {:>8} {:>8} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>11}",
        "N",
        "direct",
        "lb-rr",
        "p2c-pend",
        "p2c-ewma",
        "+lb-rr",
        "+p2c-pend",
        "+p2c-ewma",
        "pend/lb",
        "ewma/lb",
        "+lb ≤ 12ns"
    );
    for &n in ns {
        let [direct, lb, pending, ewma] = Contender::ALL.map(|c| samples.median(c, n));
        let added = |v: Option<f64>| Some(v? - direct?);
        let ratio = |v: Option<f64>| Some(format!("{:.1}x", v? / lb?));
        let verdict = match added(lb) {
            Some(added) if added <= TARGET_ADDED_NS => "met",
            Some(_) => "MISSED",
            None => "—",
        };
        println!(
            "{n:>7} {:>8} {:>8} {:>8} {:>8} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {verdict:>11}",
            cell(direct),
            cell(lb),
            cell(pending),
            cell(ewma),
            cell(added(lb)),
            cell(added(pending)),
            cell(added(ewma)),
            ratio(pending).unwrap_or_else(|| "—".to_string()),
            ratio(ewma).unwrap_or_else(|| "—".to_string()),
        );
    }
    println!(
        "  +X: ns added over direct; pend/lb, ewma/lb: tower p2c ns/request ÷ tower-lb ns/request"
    );
    println!("  target (issue): round-robin adds at most {TARGET_ADDED_NS} ns over the direct call at every N");
    println!();
    println!("== throughput, N = {THROUGHPUT_ENDPOINTS}, {THREADS} threads × {CLONES_PER_THREAD} clones ==");
    for (i, run) in runs.iter().enumerate() {
        run.print((i == 0).then_some(TARGET_REQUESTS_PER_SEC));
    }
    if let [lb, .., buffered] = runs {
        println!(
            "  tower-lb (OS threads) ÷ tower p2c + Buffer: {:.1}x",
            lb.median() / buffered.median()
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) criterion runs each
    // benchmark once and we only smoke-test the rest.
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let quick = std::env::var_os("OVERHEAD_QUICK").is_some_and(|v| v != "0");
    let ns: &[usize] = if quick { &QUICK_ENDPOINTS } else { &ENDPOINTS };
    let (measurement, warm_up) = if quick {
        (Duration::from_millis(500), Duration::from_millis(200))
    } else {
        (Duration::from_millis(1500), Duration::from_millis(500))
    };
    let (lb_requests, buffer_requests, rounds) = match (measuring, quick) {
        (false, _) => (1_000, 1_000, 1),
        (true, true) => (200_000, 20_000, 3),
        (true, false) => (2_000_000, 200_000, 7),
    };

    let mut criterion = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .measurement_time(measurement)
        .warm_up_time(warm_up)
        .without_plots()
        .configure_from_args();
    let samples = Samples::default();
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        single_task(&mut criterion, &rt, ns, &samples);
    }
    let clone_ns: &[usize] = if quick {
        &clones::QUICK_ENDPOINTS
    } else {
        &clones::ENDPOINTS
    };
    let clone_results = clones::Results::default();
    clones::bench(&mut criterion, clone_ns, &clone_results);
    criterion.final_summary();
    let reweight = clones::after_reweight(if measuring { 20 } else { 1 });

    let runs = throughput(lb_requests, buffer_requests, rounds);
    if measuring {
        summary(ns, &samples, &runs);
        clones::summary(clone_ns, &clone_results, Some(reweight));
    }
}
