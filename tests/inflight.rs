//! Property: whatever happens to requests (completion, error, cancellation, panic) and to
//! endpoints (removal, re-insertion, reweighting) across clones on a multi-threaded runtime —
//! three long-lived clones and a new clone for every request of a fourth stream, made, used
//! once and dropped across table changes — once every request has finished or been dropped
//! every in-flight count is zero, and the picks equal the requests dispatched; once the
//! balancer is dropped, so is every copy of every endpoint service (spares included).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use proptest::prelude::*;
use tower::{BoxError, Service, ServiceExt};
use tower_lb::{discover, strategy::RoundRobin, Balance, Error};

/// What the endpoint does with a request.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Complete,
    Fail,
    /// The response future is dropped before it completes.
    Cancel,
    /// The endpoint's future panics while polled.
    Panic,
}

/// Calls on this stream use a new clone of the balancer each.
const FRESH: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// A request on stream `clone`: one of three long-lived clones, or [`FRESH`].
    Call {
        clone: usize,
        fate: Fate,
    },
    Remove(u8),
    Insert(u8),
    /// Publishes a new table without changing membership.
    Reweight(u8, u32),
}

fn op() -> impl Strategy<Value = Op> {
    let fate = prop_oneof![
        Just(Fate::Complete),
        Just(Fate::Fail),
        Just(Fate::Cancel),
        Just(Fate::Panic)
    ];
    prop_oneof![
        8 => (0..=FRESH, fate).prop_map(|(clone, fate)| Op::Call { clone, fate }),
        1 => (0..4u8).prop_map(Op::Remove),
        1 => (0..4u8).prop_map(Op::Insert),
        1 => (0..4u8, 1..4u32).prop_map(|(key, weight)| Op::Reweight(key, weight)),
    ]
}

/// An endpoint that does to each request what the request says, after yielding once so
/// requests overlap. It counts its live copies: clones made per request leave theirs behind
/// as spares for the next, and every copy must still be dropped exactly once.
struct Obedient {
    live: Arc<AtomicI64>,
}

impl Obedient {
    fn new(live: &Arc<AtomicI64>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Self {
            live: Arc::clone(live),
        }
    }
}

impl Clone for Obedient {
    fn clone(&self) -> Self {
        Self::new(&self.live)
    }
}

impl Drop for Obedient {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<Fate> for Obedient {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, fate: Fate) -> Self::Future {
        Box::pin(async move {
            tokio::task::yield_now().await;
            match fate {
                Fate::Complete => Ok(()),
                Fate::Fail => Err("endpoint error".into()),
                Fate::Cancel => std::future::pending().await,
                Fate::Panic => std::panic::panic_any(ExpectedPanic),
            }
        })
    }
}

struct ExpectedPanic;

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    panicked: AtomicU64,
    /// Requests the balancer refused at `call`: every endpoint they could go to left after
    /// `poll_ready` reserved one. Never dispatched, so not picks.
    refused: AtomicU64,
}

impl Tally {
    fn total(&self) -> u64 {
        [
            &self.completed,
            &self.failed,
            &self.cancelled,
            &self.panicked,
        ]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        // Endpoint panics are part of the property; keep them off the test output.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<ExpectedPanic>() {
                default_hook(info);
            }
        }));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    })
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let live = Arc::new(AtomicI64::new(0));
    let (handle, source) = discover::channel();
    for key in 0..2u8 {
        handle.insert(key, Obedient::new(&live));
    }
    let balance = Balance::new(source, RoundRobin::new());
    let tally = Arc::new(Tally::default());

    // Three long-lived clones and a stream of fresh ones, each stream driven by its own task
    // from its own queue.
    let mut queues = Vec::new();
    let mut drivers = Vec::new();
    for stream in 0..=FRESH {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Fate>();
        let parent = balance.clone();
        let mut long_lived = balance.clone();
        let tally = tally.clone();
        queues.push(tx);
        drivers.push(tokio::spawn(async move {
            let mut requests = Vec::new();
            while let Some(fate) = rx.recv().await {
                let mut fresh;
                let clone = if stream == FRESH {
                    fresh = parent.clone();
                    &mut fresh
                } else {
                    &mut long_lived
                };
                match ServiceExt::<Fate>::ready(clone).await {
                    Ok(_) => {}
                    Err(error) => {
                        assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
                        continue;
                    }
                }
                let mut response = Box::pin(clone.call(fate));
                // Endpoints always yield before answering, so a response that is ready at
                // once was refused by the balancer (never dispatched): tell it apart now, before
                // a `Cancel` could abort it unpolled.
                if let Poll::Ready(result) = futures::poll!(&mut response) {
                    let error = result.expect_err("endpoints yield before answering");
                    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
                    tally.refused.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let tally = tally.clone();
                let task = tokio::spawn(response);
                requests.push((fate, task, tally));
            }
            for (fate, task, tally) in requests {
                if let Fate::Cancel = fate {
                    task.abort();
                }
                match task.await {
                    Ok(Ok(())) => tally.completed.fetch_add(1, Ordering::SeqCst),
                    Ok(Err(error))
                        if error.downcast_ref::<Error>() == Some(&Error::NoEndpoints) =>
                    {
                        tally.refused.fetch_add(1, Ordering::SeqCst)
                    }
                    Ok(Err(_)) => tally.failed.fetch_add(1, Ordering::SeqCst),
                    Err(e) if e.is_panic() => tally.panicked.fetch_add(1, Ordering::SeqCst),
                    Err(_) => tally.cancelled.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }

    for op in ops {
        match op {
            Op::Call { clone, fate } => {
                queues[clone].send(fate).unwrap();
            }
            Op::Remove(key) => {
                handle.remove(key);
            }
            Op::Insert(key) => {
                handle.insert(key, Obedient::new(&live));
            }
            Op::Reweight(key, weight) => {
                let _ = balance
                    .handle()
                    .set_weight(&key, tower_lb::weight::Weight::new(weight).unwrap());
            }
        }
        if let Op::Remove(_) | Op::Insert(_) | Op::Reweight(..) = op {
            tokio::task::yield_now().await;
        }
    }
    drop(queues);
    for driver in drivers {
        driver.await.unwrap();
    }

    let stats = balance.stats();
    for endpoint in &stats.endpoints {
        prop_assert_eq!(endpoint.in_flight, 0, "{:?}", endpoint);
    }
    prop_assert_eq!(stats.picks(), tally.total());
    prop_assert_eq!(
        stats.endpoints.iter().map(|e| e.failures).sum::<u64>() + stats.removed_failures,
        tally.failed.load(Ordering::SeqCst),
    );

    // The discovery task ends with the last clone and drops the tables, and with them the
    // services and their spare copies.
    drop((balance, handle));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while live.load(Ordering::SeqCst) != 0 && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    prop_assert!(
        live.load(Ordering::SeqCst) == 0,
        "{} service copies outlived the balancer",
        live.load(Ordering::SeqCst)
    );
    Ok(())
}

fn cases() -> u32 {
    std::env::var("TOWER_LB_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn in_flight_counts_return_to_zero_and_picks_match_dispatches(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        runtime().block_on(run(ops))?;
    }
}
