//! Every strategy through a real `Balance`, beside the reference and tower's p2c, in one run.
//!
//! For each N every contender is built, warmed up, and then timed in turns: each round times
//! `per_round` requests of every contender, one contender after the other, and the figure of a
//! contender is its fastest round (the least disturbed by the rest of the machine; the median
//! is printed beside it). Timing in turns means a busy moment on the machine falls on every
//! contender alike, so the multiples stay meaningful on a shared machine.
//!
//! Endpoints weigh 1–4 (`i % 4 + 1`) so that weighted paths do real work; keyed strategies
//! hash the request (a different 8-byte key per request). The multiple of a strategy is what
//! it adds over the direct call divided by what the reference adds.

use std::fmt;
use std::hint::black_box;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use tower::{Layer, Service};
use tower_lb::key::{key_fn, KeyHasher};
use tower_lb::strategy::{
    ConsistentHash, LeastConnections, LeastTime, PowerOfTwoChoices, Random, RoundRobin, Strategy,
    WeightedRoundRobin,
};
use tower_lb::weight::{Weight, Weighted};
use tower_lb::{discover, BalanceLayer};

use super::reference::{Bare, Reference};
use super::{p2c_peak_ewma, p2c_pending, request, Direct, Noop};

/// The targets: (strategy, most the added cost may be as a multiple of the
/// reference's, the smallest N the target applies to).
const TARGETS: [(&str, f64, usize); 10] = [
    ("round-robin", 1.5, 0),
    ("weighted-rr", 1.5, 0),
    ("random", 1.5, 0),
    ("random-weighted", 1.5, 0),
    ("p2c", 2.5, 0),
    ("least-conn", 4.0, 4096),
    ("p2c-peak-ewma", 6.0, 0),
    ("ring", 6.0, 4096),
    ("ring-nginx", 6.0, 4096),
    ("maglev", 2.0, 0),
];

/// One request stream, timed in rounds.
trait Timed {
    /// Sends `requests` requests (values from `first` on, spread by a multiplication so that
    /// keys differ) and returns how long they took.
    fn run(&mut self, first: u64, requests: u64) -> Duration;
    /// Requests in flight after the run: 0, or the contender leaks.
    fn in_flight(&self) -> u64;
}

struct Subject<S> {
    service: S,
    in_flight: fn(&S) -> u64,
}

impl<S> Timed for Subject<S>
where
    S: Service<u64, Response = u64>,
    S::Error: fmt::Debug,
{
    fn run(&mut self, first: u64, requests: u64) -> Duration {
        let mut cx = Context::from_waker(Waker::noop());
        let start = Instant::now();
        for i in first..first + requests {
            let value = black_box(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            black_box(request(&mut self.service, &mut cx, value));
        }
        start.elapsed()
    }

    fn in_flight(&self) -> u64 {
        (self.in_flight)(&self.service)
    }
}

struct Contender {
    name: &'static str,
    subject: Box<dyn Timed>,
    /// ns/request of each round.
    rounds: Vec<f64>,
}

impl Contender {
    fn new<S>(name: &'static str, service: S, in_flight: fn(&S) -> u64) -> Self
    where
        S: Service<u64, Response = u64> + 'static,
        S::Error: fmt::Debug,
    {
        Self {
            name,
            subject: Box::new(Subject { service, in_flight }),
            rounds: Vec::new(),
        }
    }

    fn fastest(&self) -> f64 {
        self.rounds.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn median(&self) -> f64 {
        let mut sorted = self.rounds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
}

/// The direct call, after hashing the request's key as the keyed strategies' balancers do
/// (the stable hash of its 8 bytes): what the hash alone costs.
struct Hashed(Direct);

impl Service<u64> for Hashed {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = <Direct as Service<u64>>::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: u64) -> Self::Future {
        let mut hasher = KeyHasher::stable(0);
        hasher.write(&request.to_le_bytes());
        self.0.call(black_box(hasher.finish()))
    }
}

/// `n` endpoints weighing 1–4 (`i % 4 + 1`), or all 1 with `equal`.
fn weighted_endpoints(n: usize, equal: bool) -> impl Iterator<Item = (usize, Weighted<Noop>)> {
    (0..n).map(move |i| {
        let weight = if equal { 1 } else { 1 + (i % 4) as u32 };
        let weight = Weight::new(weight).expect("1..=4 are weights");
        (i, Weighted::new(Noop { id: i as u64 }, weight))
    })
}

/// A balancer with `strategy` over `n` endpoints weighing 1–4, keyed by the request.
fn balanced<St: Strategy + Clone>(name: &'static str, strategy: St, n: usize) -> Contender {
    balanced_over(name, strategy, n, false)
}

/// [`balanced`], over endpoints of equal weights when `equal`.
fn balanced_over<St: Strategy + Clone>(
    name: &'static str,
    strategy: St,
    n: usize,
    equal: bool,
) -> Contender {
    let balance = BalanceLayer::new(strategy)
        .weighted()
        .key(key_fn(|request: &u64| Some(request.to_le_bytes())))
        .layer(discover::fixed(weighted_endpoints(n, equal)));
    assert_eq!(
        balance.stats().available(),
        n,
        "every endpoint is in the table"
    );
    Contender::new(name, balance, |b| b.stats().in_flight())
}

/// Whether `OVERHEAD_STRATEGIES` (say `ring,maglev`) asks for this contender; the direct call
/// and the reference always run.
fn wanted(name: &str) -> bool {
    ["direct", "reference"].contains(&name)
        || std::env::var("OVERHEAD_STRATEGIES").map_or(true, |only| {
            only.split(',').any(|wanted| wanted.trim() == name)
        })
}

/// Every contender, in the order of the table.
const CONTENDERS: [&str; 20] = [
    "direct",
    "reference",
    "(bare reference)",
    "(direct + key hash)",
    "round-robin",
    "weighted-rr",
    "random",
    "random-weighted",
    "p2c",
    "least-conn",
    "least-conn-weighted",
    "p2c-peak-ewma",
    "least-time",
    "least-time-equal-w",
    "ring",
    "ring-nginx",
    "maglev",
    "maglev-1601",
    "tower-p2c-pending",
    "tower-p2c-peak-ewma",
];

fn contender(name: &'static str, n: usize) -> Contender {
    let noops = || (0..n).map(|i| Noop { id: i as u64 }).collect();
    match name {
        "direct" => Contender::new(name, Direct::new(n), |_| 0),
        "reference" => Contender::new(name, Reference::<Noop>::new(noops()), Reference::in_flight),
        "(bare reference)" => Contender::new(name, Bare::leaked(noops()), Bare::in_flight),
        "(direct + key hash)" => Contender::new(name, Hashed(Direct::new(n)), |_| 0),
        "round-robin" => balanced(name, RoundRobin::new(), n),
        "weighted-rr" => balanced(name, WeightedRoundRobin::new(), n),
        "random" => balanced(name, Random::new(), n),
        "random-weighted" => balanced(name, Random::weighted(), n),
        "p2c" => balanced(name, PowerOfTwoChoices::new(), n),
        "least-conn" => balanced(name, LeastConnections::new(), n),
        "least-conn-weighted" => balanced(name, LeastConnections::weighted(), n),
        "p2c-peak-ewma" => balanced(name, PowerOfTwoChoices::peak_ewma(), n),
        "least-time" => balanced(name, LeastTime::new(), n),
        "least-time-equal-w" => balanced_over(name, LeastTime::new(), n, true),
        "ring" => balanced(name, ConsistentHash::ring(), n),
        "ring-nginx" => balanced(name, ConsistentHash::ring_nginx(), n),
        "maglev" => balanced(name, ConsistentHash::maglev(), n),
        // 100 slots per endpoint at N = 16 (grown to 409,861 at N = 4096): what a table sized
        // to the endpoints costs, against the default 65,537.
        "maglev-1601" => balanced(
            name,
            ConsistentHash::maglev()
                .table_size(1601)
                .expect("1601 is a prime"),
            n,
        ),
        "tower-p2c-pending" => Contender::new(name, p2c_pending(n), |_| 0),
        "tower-p2c-peak-ewma" => Contender::new(name, p2c_peak_ewma(n), |_| 0),
        _ => unreachable!("{name} is not a contender"),
    }
}

/// The figures of one N: (name, fastest, median) per contender.
pub(crate) struct Figures {
    n: usize,
    rows: Vec<(&'static str, f64, f64)>,
}

/// Builds every contender for each N, times them in turns, and returns the figures.
pub(crate) fn measure(ns: &[usize], rounds: usize, per_round: u64) -> Vec<Figures> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // The balancers' discovery tasks spawn onto the runtime current at construction.
    let _entered = runtime.enter();
    let mut figures = Vec::new();
    for &n in ns {
        let mut contenders: Vec<Contender> = CONTENDERS
            .into_iter()
            .filter(|name| wanted(name))
            .map(|name| contender(name, n))
            .collect();
        // Warm up: copies of services, per-clone state, caches, branch predictors.
        for contender in &mut contenders {
            contender.subject.run(0, per_round);
        }
        for round in 0..rounds {
            for contender in &mut contenders {
                let first = (round as u64 + 1) * per_round;
                let took = contender.subject.run(first, per_round);
                contender
                    .rounds
                    .push(took.as_nanos() as f64 / per_round as f64);
            }
        }
        for contender in &contenders {
            assert_eq!(
                contender.subject.in_flight(),
                0,
                "{}: requests left in flight",
                contender.name
            );
        }
        figures.push(Figures {
            n,
            rows: contenders
                .iter()
                .map(|c| (c.name, c.fastest(), c.median()))
                .collect(),
        });
    }
    figures
}

pub(crate) fn print(figures: &[Figures], rounds: usize, per_round: u64) {
    println!();
    println!(
        "== every strategy against the reference, one task (ns/request: fastest of {rounds} rounds of {per_round}, median in parentheses) =="
    );
    for figures in figures {
        let get = |name: &str| {
            figures
                .rows
                .iter()
                .find(|row| row.0 == name)
                .map(|row| row.1)
        };
        let (Some(direct), Some(reference)) = (get("direct"), get("reference")) else {
            continue;
        };
        let floor = reference - direct;
        println!();
        println!(
            "N = {}: direct {direct:.1} ns, reference {reference:.1} ns (adds {floor:.1} ns)",
            figures.n
        );
        println!(
            "  {:<20} {:>16} {:>9} {:>9} {:>8}  verdict",
            "contender", "ns/request", "added", "multiple", "target"
        );
        for &(name, fastest, median) in &figures.rows {
            if name == "direct" {
                continue;
            }
            let added = fastest - direct;
            let multiple = added / floor;
            let target = TARGETS
                .iter()
                .find(|(target, _, from)| *target == name && figures.n >= *from)
                .map(|&(_, most, _)| most);
            let (target_cell, verdict) = match target {
                Some(most) if multiple <= most => (format!("≤ {most}×"), "met"),
                Some(most) => (format!("≤ {most}×"), "MISSED"),
                None => (String::new(), ""),
            };
            println!(
                "  {name:<20} {:>16} {added:>9.1} {:>9} {target_cell:>8}  {verdict}",
                format!("{fastest:.1} ({median:.1})"),
                format!("{multiple:.2}×"),
            );
        }
    }
    println!();
    println!("  added: ns over the direct call; multiple: added ÷ the reference's added");
    println!("  reference: round-robin over a Vec with one atomic in-flight counter per endpoint, released by the response future");
}

/// The build time of the consistent-hashing tables at N = 4096 with weights 1–4: the fastest
/// of `rounds` builds of a balancer (whose setup is small next to the table).
pub(crate) fn table_builds(rounds: usize) {
    const N: usize = 4096;
    println!();
    println!("== build time of the consistent-hashing tables (fastest of {rounds}), N = {N}, weights 1–4 ==");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _entered = runtime.enter();
    for (name, strategy) in [
        ("maglev", ConsistentHash::maglev()),
        ("ring", ConsistentHash::ring()),
        ("ring-nginx", ConsistentHash::ring_nginx()),
    ] {
        let fastest = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                let endpoints = (0..N).map(|i| {
                    let weight = Weight::new(1 + (i % 4) as u32).expect("a weight");
                    let name = format!("10.0.{}.{}:8080", i / 256, i % 256);
                    (name, Weighted::new(Noop { id: 0 }, weight))
                });
                let balance = BalanceLayer::new(strategy.clone())
                    .weighted()
                    .layer(discover::fixed(endpoints));
                assert_eq!(balance.stats().available(), N);
                start.elapsed()
            })
            .min()
            .unwrap_or(Duration::ZERO);
        println!("  {name:<12} {:>8.2} ms", fastest.as_secs_f64() * 1e3);
    }
}
