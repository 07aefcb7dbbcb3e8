//! The balancer: [`BalanceLayer`], the [`Balance`] service and its [`ResponseFuture`].
//!
//! The parts, each small:
//! - the discovery task ([`control`](crate::control)) owns the
//!   [`Discover`](tower::discover::Discover) stream and the strategy, applies changes to the
//!   membership and publishes endpoint tables;
//! - [`Balance`] (`service.rs`) is the `Service`: it asks the newest table's picker for an
//!   endpoint, honours readiness, and wraps the endpoint's response future in a
//!   [`ResponseFuture`] (`future.rs`) that owns the request's
//!   [`InFlightGuard`](crate::InFlightGuard);
//! - each clone's own state — its table, its copies of endpoint services, its picking state
//!   and what `poll_ready` reserved — is in `local.rs`; the bounded wait for endpoints in
//!   `wait.rs`; [`BalanceLayer`] and construction in `layer.rs`; [`BalanceHandle`] in
//!   `handle.rs`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};
//!
//! let backends = (0..3).map(|i| {
//!     (i, service_fn(move |req: u32| async move { Ok::<_, std::convert::Infallible>(req + i) }))
//! });
//! let mut balance = BalanceLayer::new(RoundRobin::new()).layer(discover::fixed(backends));
//! let mut sum = 0;
//! for _ in 0..3 {
//!     sum += balance.ready().await?.call(100).await?;
//! }
//! assert_eq!(sum, 303, "one clone rotates over all three backends");
//! # Ok(())
//! # }
//! ```

mod future;
mod handle;
mod layer;
mod local;
mod service;
mod wait;

use std::time::Duration;

use crate::strategy::Strategy;
use crate::util::sync::{AtomicU64, CachePadded};

pub use future::ResponseFuture;
pub use handle::BalanceHandle;
pub use layer::BalanceLayer;
pub use service::{Balance, BoxBalance};

/// What the clones of one balancer share beyond what the discovery task keeps: the request
/// key, the bounded wait, and the clone counter that spreads clones' rotations.
pub(crate) struct Front<Kx> {
    pub(crate) key: Kx,
    /// How long `poll_ready` waits for discovery to produce an endpoint before failing with
    /// `NoEndpoints`; `None` fails at once.
    pub(crate) wait_for_endpoints: Option<Duration>,
    /// A request abandoned after this long counts as its endpoint's failure.
    pub(crate) abandon_after_ns: Option<u64>,
    /// What the balancer's requests are timed with.
    pub(crate) clock: crate::endpoint::clock::Clock,
    /// Clones made so far, to seed each one's generator differently and to start its
    /// rotation one step after the previous clone's. Bumped by every clone, so kept off the
    /// cache lines every request reads.
    pub(crate) clones: CachePadded<AtomicU64>,
    /// Where the first clone's rotation starts: random per balancer (or from the seed).
    pub(crate) rotation_base: u64,
    /// Mixed with the clone number to seed each clone's generator.
    pub(crate) seed_base: u64,
}

/// The state shared by a balancer's clones and its discovery task.
pub(crate) type Shared<K, S, St, Kx> =
    crate::control::Shared<K, S, <St as Strategy>::Picker, Front<Kx>>;
