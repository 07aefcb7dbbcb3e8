//! `PowerOfTwoChoices` allocates nothing per request, in either load mode, with or without
//! weights: after warm-up, `poll_ready` + `call` + the response future make zero heap
//! allocations (the same check as `alloc.rs`, for this strategy).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::Echo;
use tower::{Layer, Service};
use tower_lb::{discover, Balance, BalanceLayer, PowerOfTwoChoices, Weight, Weighted};

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

fn one_request<S: Service<(), Response = usize>>(svc: &mut S, cx: &mut Context<'_>) -> usize
where
    S::Error: std::fmt::Debug,
{
    assert!(matches!(svc.poll_ready(cx), Poll::Ready(Ok(()))));
    let future = pin!(svc.call(()));
    match future.poll(cx) {
        Poll::Ready(Ok(id)) => id,
        other => panic!(
            "the endpoint answers at once: {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
}

/// Warms `svc` up, then counts the allocations of 10 000 requests.
fn allocations<S: Service<(), Response = usize>>(mut svc: S) -> u64
where
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100 {
        one_request(&mut svc, &mut cx);
    }
    ALLOCATIONS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    for _ in 0..10_000 {
        one_request(&mut svc, &mut cx);
    }
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn zero_allocations_per_request() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    for strategy in [PowerOfTwoChoices::new(), PowerOfTwoChoices::peak_ewma()] {
        let endpoints = (0..16).map(|id| (id, Echo(id)));
        let balance = Balance::new(discover::fixed(endpoints), strategy.clone());
        assert_eq!(allocations(balance), 0, "{strategy:?}");

        let weighted = (0..16).map(|id| {
            let weight = Weight::new(1 + id as u32 % 5).unwrap();
            (id, Weighted::new(Echo(id), weight))
        });
        let balance = BalanceLayer::new(strategy.clone())
            .weighted()
            .layer(discover::fixed(weighted));
        assert_eq!(allocations(balance), 0, "{strategy:?}, weighted");
    }
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the test above against a counter that never counts.
    COUNTING.with(|c| c.set(true));
    let boxed = std::hint::black_box(Box::new(1u64));
    COUNTING.with(|c| c.set(false));
    drop(boxed);
    assert!(ALLOCATIONS.with(Cell::get) >= 1);
}
