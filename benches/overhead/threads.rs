//! Throughput with 16 clones on 2 threads, N = 16, each request awaited before the next:
//!
//! - 16 clones of one round-robin `Balance`, 8 per OS thread, used in turn, driven
//!   synchronously (the setup);
//! - for reference, 2 independent balancers of 8 clones each (nothing shared across threads),
//!   which shows what sharing one balancer between threads costs;
//! - the 16 `Balance` clones as 2 tokio tasks on a 2-worker runtime, awaiting each request;
//! - tower's p2c (`PendingRequests`) behind a `tower::buffer::Buffer`, 8 `Buffer` clones per
//!   task, 2 tasks on the same runtime (fewer requests: it is much slower).
//!
//! Each worker times itself with `Instant` (first start to last end; on 2 cores a coordinating
//! thread may not run until the workers finish); each setup runs several rounds and prints the
//! median requests/s and the range.

use std::fmt;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::task::Context;
use std::thread;
use std::time::{Duration, Instant};

use futures::task::noop_waker_ref;
use tower::buffer::Buffer;
use tower::{Service, ServiceExt};

use super::{p2c_pending, request, tower_lb, TowerLb};

/// The target for 16 clones on 2 threads.
const TARGET_REQUESTS_PER_SEC: f64 = 40e6;
const THREADS: usize = 2;
const CLONES_PER_THREAD: usize = 8;
const THROUGHPUT_ENDPOINTS: usize = 16;

/// From the first worker's start to the last one's end. Each worker times itself: with 2 cores
/// and 2 busy workers, a coordinating thread may not run again until the work is done.
fn span(spans: impl IntoIterator<Item = (Instant, Instant)>) -> Duration {
    let (starts, ends): (Vec<Instant>, Vec<Instant>) = spans.into_iter().unzip();
    let first = starts.into_iter().min().expect("at least one worker");
    let last = ends.into_iter().max().expect("at least one worker");
    last - first
}

/// The results of one throughput setup, over several rounds.
pub(crate) struct Run {
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

pub(crate) fn throughput(lb_requests: u64, buffer_requests: u64, rounds: usize) -> Vec<Run> {
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

pub(crate) fn print(runs: &[Run]) {
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
