//! The request path allocates nothing: after warm-up, `poll_ready` + `call` + the response
//! future of a `Balance` over allocation-free endpoints make zero heap allocations.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::Echo;
use tower::Service;
use tower_lb::{discover, Balance, RoundRobin};

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

#[test]
fn zero_allocations_per_request_after_warm_up() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let endpoints = (0..16).map(|id| (id, Echo(id)));
    let mut balance = Balance::new(discover::fixed(endpoints), RoundRobin::new());
    let mut clone = balance.clone();
    let mut cx = Context::from_waker(Waker::noop());

    for _ in 0..100 {
        one_request(&mut balance, &mut cx);
        one_request(&mut clone, &mut cx);
    }

    COUNTING.with(|c| c.set(true));
    let mut seen = [0u32; 16];
    for _ in 0..10_000 {
        seen[one_request(&mut balance, &mut cx)] += 1;
        seen[one_request(&mut clone, &mut cx)] += 1;
    }
    COUNTING.with(|c| c.set(false));

    assert_eq!(
        ALLOCATIONS.with(Cell::get),
        0,
        "allocations on the request path"
    );
    assert!(
        seen.iter().all(|&n| n == 1250),
        "the requests were balanced: {seen:?}"
    );
    assert_eq!(balance.stats().picks(), 20_200);
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
