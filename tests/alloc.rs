//! The request path allocates nothing: after warm-up, `poll_ready` + `call` + the response
//! future of a `Balance` over allocation-free endpoints make zero heap allocations, for every
//! strategy (and both paths of those that have two).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::{weighted, Echo};
use tower::{Layer, Service};
use tower_lb::strategy::{PowerOfTwoChoices, Strategy};
use tower_lb::{
    discover,
    key::key_fn,
    strategy::{ConsistentHash, LeastConnections, Random, RoundRobin, WeightedRoundRobin},
    Balance, BalanceLayer,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only counts calls on the measuring thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn one_request<S: Service<u64, Response = usize>>(
    svc: &mut S,
    cx: &mut Context<'_>,
    n: u64,
) -> usize
where
    S::Error: Debug,
{
    assert!(matches!(svc.poll_ready(cx), Poll::Ready(Ok(()))));
    let future = pin!(svc.call(n));
    match future.poll(cx) {
        Poll::Ready(Ok(id)) => id,
        other => panic!(
            "the endpoint answers at once: {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
}

/// Warms `svc` up (which may allocate clone-private state once), then counts the
/// allocations of 10,000 requests.
fn allocations<S: Service<u64, Response = usize>>(svc: &mut S) -> u64
where
    S::Error: Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    for n in 0..100 {
        one_request(svc, &mut cx, n);
    }
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    for n in 0..10_000 {
        one_request(svc, &mut cx, n);
    }
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

/// The allocations of 10,000 requests through a weighted balancer with `strategy`, keyed by
/// the request number for keyed strategies.
fn through<St: Strategy + Clone>(strategy: St, weights: &[u32]) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let mut balance = BalanceLayer::new(strategy)
        .weighted()
        .key(key_fn(|n: &u64| Some(n.to_le_bytes())))
        .layer(discover::fixed(weighted(weights)));
    allocations(&mut balance)
}

#[test]
fn round_robin_and_its_clones_allocate_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let endpoints = (0..16).map(|id| (id, Echo(id)));
    let mut balance = Balance::new(discover::fixed(endpoints), RoundRobin::new());
    let mut clone = balance.clone();
    assert_eq!(allocations(&mut balance), 0);
    assert_eq!(allocations(&mut clone), 0);
    assert_eq!(balance.stats().picks(), 20_200);
}

#[test]
fn weighted_round_robin_allocates_nothing_on_either_path() {
    // A cycle of 5 (precomputed) and one of ~3·10^6 picks (scheduled per clone).
    assert_eq!(through(WeightedRoundRobin::new(), &[3, 1, 1]), 0);
    assert_eq!(
        through(WeightedRoundRobin::new(), &[1_000_000, 999_999, 999_998]),
        0
    );
}

#[test]
fn random_allocates_nothing() {
    assert_eq!(through(Random::new(), &[1, 2, 3]), 0);
    assert_eq!(through(Random::weighted(), &[1, 2, 3]), 0);
}

#[test]
fn least_connections_allocates_nothing_by_scan_or_index() {
    for n in [3, 40] {
        let weights: Vec<u32> = (0..n).map(|id| 1 + id % 2).collect();
        assert_eq!(through(LeastConnections::new(), &weights), 0, "n = {n}");
        assert_eq!(
            through(LeastConnections::weighted(), &weights),
            0,
            "weighted, n = {n}"
        );
    }
}

#[test]
fn power_of_two_choices_allocates_nothing() {
    let weights: Vec<u32> = (0..16).map(|id| 1 + id % 5).collect();
    for strategy in [PowerOfTwoChoices::new(), PowerOfTwoChoices::peak_ewma()] {
        assert_eq!(through(strategy.clone(), &[1; 16]), 0, "{strategy:?}");
        assert_eq!(
            through(strategy.clone(), &weights),
            0,
            "{strategy:?}, weighted"
        );
    }
}

#[test]
fn consistent_hashing_allocates_nothing() {
    assert_eq!(through(ConsistentHash::maglev(), &[1, 2, 3, 4]), 0);
    assert_eq!(through(ConsistentHash::ring(), &[1, 2, 3, 4]), 0);
    assert_eq!(
        through(
            ConsistentHash::maglev().bounded_load(1.25).unwrap(),
            &[1, 2, 3, 4]
        ),
        0
    );
}

/// The allocations of 2,000 requests each on a new clone of a weighted balancer with
/// `strategy` over `n` endpoints (clone, `poll_ready`, `call`, response, drop), after the
/// balancer served 100 requests.
fn fresh_clones<St: Strategy + Clone>(strategy: St, n: usize) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let weights: Vec<u32> = (0..n as u32).map(|i| 1 + i % 3).collect();
    let balance = BalanceLayer::new(strategy)
        .weighted()
        .key(key_fn(|n: &u64| Some(n.to_le_bytes())))
        .layer(discover::fixed(weighted(&weights)));
    let mut cx = Context::from_waker(Waker::noop());
    let mut warm = balance.clone();
    for n in 0..100 {
        one_request(&mut warm, &mut cx, n);
    }
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    for n in 0..2_000 {
        let mut fresh = balance.clone();
        one_request(&mut fresh, &mut cx, n);
    }
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn a_new_clone_per_request_allocates_nothing_whatever_the_number_of_endpoints() {
    for n in [16, 4096] {
        assert_eq!(
            fresh_clones(RoundRobin::new(), n),
            0,
            "round-robin, n = {n}"
        );
        assert_eq!(fresh_clones(Random::weighted(), n), 0, "random, n = {n}");
        assert_eq!(
            fresh_clones(LeastConnections::weighted(), n),
            0,
            "least-connections, n = {n}"
        );
        assert_eq!(
            fresh_clones(PowerOfTwoChoices::peak_ewma(), n),
            0,
            "P2C, n = {n}"
        );
        assert_eq!(
            fresh_clones(ConsistentHash::maglev(), n),
            0,
            "Maglev, n = {n}"
        );
        assert_eq!(
            fresh_clones(ConsistentHash::ring().bounded_load(1.25).unwrap(), n),
            0,
            "bounded ring, n = {n}"
        );
    }
    // Weighted round-robin, precomputed (16 endpoints) and strided (a cycle of ~3·10^6).
    assert_eq!(fresh_clones(WeightedRoundRobin::new(), 16), 0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let balance = BalanceLayer::new(WeightedRoundRobin::new())
        .weighted()
        .layer(discover::fixed(weighted(&[1_000_000, 999_999, 999_998])));
    let mut cx = Context::from_waker(Waker::noop());
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    for n in 0..2_000 {
        one_request(&mut balance.clone(), &mut cx, n);
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(
        ALLOCATIONS.with(Cell::get),
        0,
        "strided weighted round-robin"
    );
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the tests above against a counter that never counts.
    COUNTING.with(|c| c.set(true));
    let boxed = std::hint::black_box(Box::new(1u64));
    COUNTING.with(|c| c.set(false));
    drop(boxed);
    assert!(ALLOCATIONS.with(Cell::get) >= 1);
}
