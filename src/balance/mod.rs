//! The balancer: [`BalanceLayer`], the [`Balance`] service and its [`ResponseFuture`].
//!
//! The parts, each small:
//! - the discovery task (`driver`) owns the [`Discover`](tower::discover::Discover) stream and
//!   the strategy, applies changes to the membership registry and publishes endpoint tables;
//! - the endpoint table (`crate::table`) is what every clone reads, one atomic load per
//!   request;
//! - the [`Balance`] service asks the table's picker for an endpoint, honours readiness, and
//!   wraps the endpoint's response future in a [`ResponseFuture`] that owns the request's
//!   [`InFlightGuard`](crate::InFlightGuard).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use tower_lb::{discover, BalanceLayer, RoundRobin};
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

mod driver;
mod future;
mod handle;
mod layer;
mod local;
mod service;
mod shared;
mod wait;

pub(crate) use shared::Control;

pub use future::ResponseFuture;
pub use handle::{BalanceHandle, Drain};
pub use layer::BalanceLayer;
pub use service::Balance;
