//! A strategy that can be replaced at run time.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use super::{BoxPicker, BoxStrategy, Endpoints, Rebuild, Strategy};

/// A strategy that a [`SwapHandle`] can replace while the balancer runs.
///
/// Every balancer built with this strategy (and every clone of those balancers) switches to
/// the new strategy together: the handle makes each balancer publish a new endpoint table
/// whose picker comes from the new strategy, in one step. Endpoint state — in-flight counts,
/// picks, failures, weights, latency estimates — lives with the endpoints, not the strategy,
/// so nothing is lost or reset; requests in flight finish and are counted down as usual.
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
    current: Mutex<Arc<BoxStrategy>>,
    balancers: Mutex<Vec<Rebuild>>,
}

impl Swappable {
    /// Starts with `strategy`.
    pub fn new<S: Strategy>(strategy: S) -> Self {
        Self {
            shared: Arc::new(SwapShared {
                current: Mutex::new(Arc::new(BoxStrategy::new(strategy))),
                balancers: Mutex::new(Vec::new()),
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
    /// Replaces the strategy. Returns the number of live balancers that will switch; each
    /// switches as soon as its discovery task runs, all of its clones at once.
    pub fn swap<S: Strategy>(&self, strategy: S) -> usize {
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(BoxStrategy::new(strategy));
        let mut balancers = self
            .shared
            .balancers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        balancers.retain(Rebuild::request);
        balancers.len()
    }
}

impl Strategy for Swappable {
    type Picker = BoxPicker;

    fn build(&self, endpoints: &Endpoints<'_>) -> Self::Picker {
        let current = Arc::clone(
            &self
                .shared
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        current.build(endpoints)
    }

    fn attach(&self, rebuild: Rebuild) {
        self.shared
            .balancers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rebuild);
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
