//! A small run of the quality benchmark's simulation (`benches/quality.rs`): it keeps the
//! harness honest (faults happen, timeouts fire, shares are counted) and checks the
//! behaviour the benchmark exists to show, at a scale that takes well under a second.

#![allow(dead_code)]

#[path = "../benches/quality/balancers.rs"]
mod balancers;
#[path = "../benches/quality/report.rs"]
mod report;
#[path = "../benches/quality/rng.rs"]
mod rng;
#[path = "../benches/quality/sim.rs"]
mod sim;

use std::time::Duration;

use balancers::{ours, tower_p2c_peak_ewma, tower_p2c_pending, MakeBalancer};
use report::Summary;
use sim::Scenario;

const REQUESTS: usize = 3_000;
const SEED: u64 = 7;

fn scenario(name: &str) -> Scenario {
    sim::scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("a scenario of the benchmark")
}

fn simulate(scenario: &Scenario, name: &'static str, make: &MakeBalancer) -> Summary {
    simulate_n(scenario, name, make, REQUESTS)
}

fn simulate_n(scenario: &Scenario, name: &'static str, make: &MakeBalancer, n: usize) -> Summary {
    let requests = scenario.requests(SEED, n);
    let run = sim::run(scenario, &requests, make, SEED);
    assert_eq!(run.outcomes.len(), n, "every request has an outcome");
    Summary::new(name, &[run], Duration::ZERO)
}

#[test]
fn peak_ewma_steers_away_from_a_slow_backend_that_round_robin_overloads() {
    let slow = scenario("one-10x-slow");
    let rr = simulate(
        &slow,
        "round-robin",
        &ours(tower_lb::strategy::RoundRobin::new()),
    );
    let ewma = simulate(&slow, "tower-p2c-peak-ewma", &tower_p2c_peak_ewma());

    assert!((rr.shares[0] - 0.2).abs() < 0.01, "{:?}", rr.shares);
    assert!(
        ewma.shares[0] < rr.shares[0] / 2.0,
        "PeakEWMA gives the slow backend {:?}, round-robin {:?}",
        ewma.shares,
        rr.shares
    );
    // Round-robin overloads the slow backend: its queue, and so its p99, keeps growing.
    assert!(ewma.p99 * 5 < rr.p99, "{:?} vs {:?}", ewma.p99, rr.p99);
    assert_eq!(rr.errors + ewma.errors, 0);
}

#[test]
fn a_hanging_backend_costs_round_robin_a_fifth_of_the_middle_third() {
    let hang = scenario("hang");
    let rr = simulate(
        &hang,
        "round-robin",
        &ours(tower_lb::strategy::RoundRobin::new()),
    );
    let pending = simulate(&hang, "tower-p2c-pending", &tower_p2c_pending());

    // One backend of five hangs for a third of the run: about 1/15 of requests time out,
    // each after the client's 1 s timeout.
    let share = rr.errors as f64 / REQUESTS as f64;
    assert!(
        (0.05..0.085).contains(&share),
        "round-robin timed out {share}"
    );
    assert!(rr.p99 >= Duration::from_secs(1), "{:?}", rr.p99);
    // Pending-request counts grow on the hanging backend, so p2c soon avoids it.
    assert!(
        pending.errors * 4 < rr.errors,
        "{} vs {}",
        pending.errors,
        rr.errors
    );
}

#[test]
fn a_failing_backend_answers_errors_only_in_the_middle_third() {
    let fail = scenario("fail-fast");
    let rr = simulate(
        &fail,
        "round-robin",
        &ours(tower_lb::strategy::RoundRobin::new()),
    );
    let share = rr.errors as f64 / REQUESTS as f64;
    assert!((0.05..0.085).contains(&share), "round-robin failed {share}");
    // Errors are fast: they do not reach the latency percentiles.
    assert!(rr.p999 < Duration::from_millis(500), "{:?}", rr.p999);
}

/// `n` requests of `scenario` through least connections, then through least time.
fn least_conn_and_least_time(scenario: &Scenario, n: usize) -> (Summary, Summary) {
    let lc = simulate_n(
        scenario,
        "least-conn",
        &ours(tower_lb::strategy::LeastConnections::new()),
        n,
    );
    let lt = simulate_n(
        scenario,
        "least-time",
        &ours(tower_lb::strategy::LeastTime::new()),
        n,
    );
    (lc, lt)
}

#[test]
fn least_time_passes_over_a_slow_backend_that_least_connections_keeps_using() {
    // Long enough that the slow backend's share is a few hundred requests, not a handful.
    let (slow, n) = (scenario("one-10x-slow"), 15_000);
    let (lc, lt) = least_conn_and_least_time(&slow, n);
    // Least connections sends the slow backend a request whenever it is the least loaded;
    // least time holds it against the others' latency.
    assert!(
        lt.shares[0] * 2.0 < lc.shares[0],
        "least time gives the slow backend {:?}, least connections {:?}",
        lt.shares,
        lc.shares
    );
    assert!(lt.p99 * 2 < lc.p99, "{:?} vs {:?}", lt.p99, lc.p99);
}

#[test]
fn least_time_passes_over_a_hanging_backend() {
    // Long enough (11 s of virtual time) for the hang to outlast the client's 1 s timeout.
    let (hang, n) = (scenario("hang"), 15_000);
    let (lc, lt) = least_conn_and_least_time(&hang, n);
    // Timed-out requests leave least connections' count, so it keeps trying the hanging
    // backend; least time takes the wait as the backend's latency.
    assert!(lt.errors * 2 < lc.errors, "{} vs {}", lt.errors, lc.errors);
}
