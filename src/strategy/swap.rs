//! A strategy that can be replaced at run time.

use std::fmt;
use std::task::{Context, Poll, Waker};

use super::{BoxPicker, BoxStrategy, Endpoints, Strategy};
use crate::util::sync::{lock, Arc, AtomicU64, Mutex, Ordering};

/// A strategy that a [`SwapHandle`] can replace while the balancer runs.
///
/// Every balancer built with this strategy (and every clone of those balancers) switches to
/// the new strategy together: the handle wakes each balancer's discovery task, which
/// publishes a new endpoint table whose picker comes from the new strategy, in one step.
/// Endpoint state — in-flight counts, picks, failures, weights, latency estimates — lives with
/// the endpoints, not the strategy, so nothing is lost or reset; requests in flight finish and
/// are counted down as usual.
///
/// The cost over a fixed strategy is one virtual call per pick. Balancers that never swap
/// should use the strategy type directly.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower::Layer;
/// use tower_lb::strategy::{RoundRobin, Swappable};
/// use tower_lb::BalanceLayer;
///
/// let strategy = Swappable::new(RoundRobin::new());
/// let swap = strategy.handle();
/// let layer = BalanceLayer::new(strategy);
/// // ... later, from anywhere:
/// swap.swap(RoundRobin::new());
/// # let _ = layer;
/// # }
/// ```
#[derive(Clone)]
pub struct Swappable {
    shared: Arc<SwapShared>,
}

/// Replaces the strategy of every balancer built with a [`Swappable`].
#[derive(Clone)]
pub struct SwapHandle {
    shared: Arc<SwapShared>,
}

struct SwapShared {
    current: Mutex<BoxStrategy>,
    /// Counts swaps; a balancer that saw an older count builds from the new strategy.
    swaps: AtomicU64,
    /// The discovery tasks waiting for the next swap.
    waiting: Mutex<Vec<Waker>>,
}

impl Swappable {
    /// Starts with `strategy`.
    pub fn new<S: Strategy>(strategy: S) -> Self {
        Self {
            shared: Arc::new(SwapShared {
                current: Mutex::new(BoxStrategy::new(strategy)),
                swaps: AtomicU64::new(0),
                waiting: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A handle that replaces the strategy.
    pub fn handle(&self) -> SwapHandle {
        SwapHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl SwapHandle {
    /// Replaces the strategy. Every balancer built with it switches as soon as its discovery
    /// task has a turn, all of its clones at once.
    pub fn swap<S: Strategy>(&self, strategy: S) {
        *lock(&self.shared.current) = BoxStrategy::new(strategy);
        self.shared.swaps.fetch_add(1, Ordering::AcqRel);
        // The tasks of balancers that are gone are forgotten here: they never register again.
        let waiting = std::mem::take(&mut *lock(&self.shared.waiting));
        waiting.into_iter().for_each(Waker::wake);
    }
}

impl Strategy for Swappable {
    type Picker = BoxPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> Self::Picker {
        let current = lock(&self.shared.current).clone();
        current.build(endpoints)
    }

    fn poll_change(&self, seen: &mut u64, cx: &mut Context<'_>) -> Poll<()> {
        {
            // Registered on every poll, so that the next swap wakes this task too.
            let mut waiting = lock(&self.shared.waiting);
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        // Looked at after registering, so a swap in between is not missed.
        let now = self.shared.swaps.load(Ordering::Acquire);
        if now == *seen {
            return Poll::Pending;
        }
        *seen = now;
        Poll::Ready(())
    }
}

impl fmt::Debug for Swappable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Swappable").finish_non_exhaustive()
    }
}

impl fmt::Debug for SwapHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapHandle").finish_non_exhaustive()
    }
}
