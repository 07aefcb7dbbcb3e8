//! Balancing quality in virtual time: latency percentiles, per-backend shares and errors of
//! every balancer over the same simulated backends and the same request streams.
//!
//! ```text
//! cargo bench --bench quality                    # all scenarios (a couple of minutes)
//! QUALITY_QUICK=1 cargo bench --bench quality    # a smoke run (seconds)
//! cargo bench --bench quality -- hang fail       # only scenarios whose name contains a word
//! ```
//!
//! - Backends are servers with `k` workers (a FIFO semaphore) and exponential service times;
//!   see `quality/sim.rs` for the scenarios.
//! - Arrivals are open-loop Poisson, generated once per scenario and seed, and replayed
//!   unchanged through every balancer; each request is dispatched at its arrival time and its
//!   response awaited in a task of its own, latency measured from the arrival, on tokio's
//!   paused clock. Dispatch (`ready` + `call`) happens in the arrival loop rather than in the
//!   task because tower's p2c `Balance` is not `Clone`; every balancer takes the same path.
//! - Latency percentiles pool all seeds; they rank responses and timeouts (at the time the
//!   client waited); fast errors are counted in `errors` only.
//! - Tables go to stdout and to `QUALITY_OUT`, else `$CARGO_TARGET_DIR/quality.md`, else
//!   `target/quality.md`.
//!
//! Settings: `QUALITY_QUICK=1`, `QUALITY_REQUESTS` (per run), `QUALITY_SEEDS` (how many),
//! `QUALITY_DEFAULT` (the balancer checked against the issue's targets).

// The parts live in `benches/quality/`, one job each.
#[path = "quality/balancers.rs"]
mod balancers;
#[path = "quality/report.rs"]
mod report;
#[path = "quality/rng.rs"]
mod rng;
#[path = "quality/sim.rs"]
mod sim;

use std::path::PathBuf;
use std::time::Instant;

use balancers::{ours, tower_p2c_peak_ewma, tower_p2c_pending, MakeBalancer};
use report::{Summary, Targets};
use sim::Scenario;

/// The balancers under test. Adding one is one line.
fn contenders() -> Vec<(&'static str, MakeBalancer)> {
    vec![
        ("round-robin", ours(tower_lb::strategy::RoundRobin::new())),
        // ---- Strategies landing from their own branches: uncomment when merged. ----
        (
            "weighted-rr",
            ours(tower_lb::strategy::WeightedRoundRobin::new()),
        ),
        (
            "least-conn",
            ours(tower_lb::strategy::LeastConnections::new()),
        ),
        (
            "least-conn-weighted",
            ours(tower_lb::strategy::LeastConnections::weighted()),
        ),
        ("least-time", ours(tower_lb::strategy::LeastTime::new())),
        ("p2c", ours(tower_lb::strategy::PowerOfTwoChoices::new())),
        (
            "p2c-peak-ewma",
            ours(tower_lb::strategy::PowerOfTwoChoices::peak_ewma()),
        ),
        ("random", ours(tower_lb::strategy::Random::new())),
        (
            "random-weighted",
            ours(tower_lb::strategy::Random::weighted()),
        ),
        // ---- tower's own balancer, for reference (no weights). ----
        ("tower-p2c-pending", tower_p2c_pending()),
        ("tower-p2c-peak-ewma", tower_p2c_peak_ewma()),
    ]
}

/// The best of these sets the p99 bar for the recommended default (those present are used).
const REFERENCES: &[&str] = &[
    "tower-p2c-pending",
    "tower-p2c-peak-ewma",
    "least-conn",
    "least-conn-weighted",
];
/// The recommended default checked against the targets, unless `QUALITY_DEFAULT` says.
const DEFAULT: &str = "least-time";
/// Whose fail-fast errors the default must cut to a tenth or less.
const BASELINE: &str = "round-robin";

/// How much to simulate.
struct Scale {
    requests: usize,
    seeds: u64,
}

impl Scale {
    fn from_env() -> Self {
        let quick = std::env::var_os("QUALITY_QUICK").is_some_and(|v| v != "0");
        let (requests, seeds) = if quick { (4_000, 1) } else { (40_000, 5) };
        Self {
            requests: env_number("QUALITY_REQUESTS").unwrap_or(requests as u64) as usize,
            seeds: env_number("QUALITY_SEEDS").unwrap_or(seeds).max(1),
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// Runs every contender over every seed of `scenario`.
fn run_scenario(
    scenario: &Scenario,
    contenders: &[(&'static str, MakeBalancer)],
    scale: &Scale,
) -> Vec<Summary> {
    let streams: Vec<_> = (1..=scale.seeds)
        .map(|seed| (seed, scenario.requests(seed, scale.requests)))
        .collect();
    contenders
        .iter()
        .map(|(name, make)| {
            let started = Instant::now();
            let runs: Vec<_> = streams
                .iter()
                .map(|(seed, requests)| sim::run(scenario, requests, make, *seed))
                .collect();
            Summary::new(name, &runs, started.elapsed())
        })
        .collect()
}

fn output_path() -> PathBuf {
    if let Some(path) = std::env::var_os("QUALITY_OUT") {
        return path.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    PathBuf::from(target).join("quality.md")
}

fn main() {
    let started = Instant::now();
    let scale = Scale::from_env();
    // `cargo bench` passes `--bench`; other arguments filter scenarios by name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scenarios: Vec<Scenario> = sim::scenarios()
        .into_iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f.as_str())))
        .collect();
    if scenarios.is_empty() {
        eprintln!("no scenario matches {filters:?}");
        return;
    }
    let default = std::env::var("QUALITY_DEFAULT").unwrap_or_else(|_| DEFAULT.to_string());
    let targets = Targets {
        default: &default,
        references: REFERENCES,
        baseline: BASELINE,
    };
    let contenders = contenders();

    let mut markdown = format!(
        "# Balancing quality (virtual time)\n\n\
         {} requests per run, {} seed(s); backends of 4 workers with exponential service \
         (mean 10 ms); open-loop Poisson arrivals. Latency percentiles pool the seeds and rank \
         responses and timeouts; fast errors count in `errors` only. tower's p2c has no \
         weights. Every balancer is seeded per run (tower-lb with `BalanceLayer::seed`), so \
         runs replay identically.\n\n",
        scale.requests, scale.seeds
    );
    let mut all = Vec::new();
    for (i, scenario) in scenarios.into_iter().enumerate() {
        let results = run_scenario(&scenario, &contenders, &scale);
        let table = report::scenario_table(i + 1, &scenario, &results);
        println!("{table}");
        markdown.push_str(&table);
        markdown.push('\n');
        all.push((scenario, results));
    }
    let sections: [String; 3] = [
        report::p99_summary(&all, &targets),
        report::error_summary(&all),
        report::target_check(&all, &targets),
    ];
    for section in sections {
        println!("{section}");
        markdown.push_str(&section);
        markdown.push('\n');
    }

    println!("{}", report::timing(&all));
    let path = output_path();
    match std::fs::write(&path, &markdown) {
        Ok(()) => println!("tables written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
    println!("real time: {:.1} s", started.elapsed().as_secs_f64());
}
