//! Building the balancers under test, each as one boxed service over the same backends.

use std::time::Duration;

use tower::balance::p2c;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::util::BoxService;
use tower::{BoxError, Layer};
use tower_lb::strategy::Strategy;
use tower_lb::{
    discover,
    weight::{Weight, Weighted},
    BalanceLayer,
};

use crate::sim::{Backend, BackendSpec, Request, SplitMix64};

/// Any balancer under test.
pub(crate) type Balancer = BoxService<Request, (), BoxError>;

/// Builds a balancer over the backends of one run (inside its runtime); the `u64` seeds the
/// balancer's randomness where it can be seeded.
pub(crate) type MakeBalancer = Box<dyn Fn(Vec<(BackendSpec, Backend)>, u64) -> Balancer>;

/// PeakEWMA settings for tower's p2c: linkerd's defaults (initial RTT 30 ms, decay 10 s).
const EWMA_DEFAULT_RTT: Duration = Duration::from_millis(30);
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// A tower-lb balancer with `strategy`; endpoints carry their capacity as weight.
pub(crate) fn ours<St>(strategy: St) -> MakeBalancer
where
    St: Strategy + Clone,
{
    Box::new(move |backends, seed| {
        let endpoints = backends
            .into_iter()
            .enumerate()
            .map(|(i, (spec, backend))| {
                let weight = Weight::new(spec.weight).expect("scenario weights are valid");
                (i, Weighted::new(backend, weight))
            });
        let layer = BalanceLayer::new(strategy.clone())
            .weighted()
            .seed(seed)
            // Discovery runs in a task: let the first request wait for the endpoints.
            .wait_for_endpoints(Duration::from_secs(1))
            .expect("a bounded wait");
        BoxService::new(layer.layer(discover::fixed(endpoints)))
    })
}

/// tower's `p2c::Balance` over pending-request counts (it has no weights).
pub(crate) fn tower_p2c_pending() -> MakeBalancer {
    Box::new(|backends, seed| {
        let discover =
            PendingRequestsDiscover::new(unweighted(backends), CompleteOnResponse::default());
        BoxService::new(p2c::Balance::from_rng(discover, SplitMix64::new(seed)))
    })
}

/// tower's `p2c::Balance` over PeakEWMA latency estimates (it has no weights).
pub(crate) fn tower_p2c_peak_ewma() -> MakeBalancer {
    Box::new(|backends, seed| {
        let discover = PeakEwmaDiscover::new(
            unweighted(backends),
            EWMA_DEFAULT_RTT,
            EWMA_DECAY,
            CompleteOnResponse::default(),
        );
        BoxService::new(p2c::Balance::from_rng(discover, SplitMix64::new(seed)))
    })
}

fn unweighted(backends: Vec<(BackendSpec, Backend)>) -> discover::Fixed<usize, Backend> {
    discover::fixed(backends.into_iter().map(|(_, backend)| backend).enumerate())
}
