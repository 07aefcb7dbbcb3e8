//! Ready-made endpoint sources: each is a [`tower::discover::Discover`] stream.
//!
//! - [`fixed`]: a list known up front.
//! - [`channel`]: a [`DiscoverHandle`] that inserts and removes endpoints at run time.
//! - [`HealthCheck`](crate::health::HealthCheck) (in [`health`](crate::health)): wraps any of
//!   these (or any other source) and passes on only the endpoints whose probes pass.
//! - [`dns`] (feature `dns`): addresses from DNS names (A/AAAA and SRV), re-resolved as their
//!   TTLs run out.
//! - [`with_layer`]: wraps each endpoint in a layer — a per-endpoint timeout, whose expiry
//!   then counts against the endpoint.
//! - `etcd` (feature `etcd`): the endpoints registered under a service's prefix in etcd,
//!   watched live (gRPC-Go's naming layout), and `etcd::register` for a server's own entry
//!   under a lease. Kubernetes EndpointSlices are in the `tower-lb-kube` crate.
//! - [`connect`] and [`connect_service`]: turn a source of addresses (or [`Target`]s: an
//!   address with a name and a weight) into one of endpoint services — a tonic `Channel` per
//!   address, a hyper client, anything — keeping the keys.
//!
//! Any other `Discover` works too: a balancer accepts any stream of
//! [`Change`](tower::discover::Change)s.
//!
//! ```
//! use std::time::Duration;
//! use tower::service_fn;
//! use tower_lb::discover;
//! use tower_lb::health::{probe_fn, HealthCheckBuilder};
//! use tower_lb::{strategy::RoundRobin, Balance};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_lb::ConfigError> {
//! let replicas = ["a", "b"].map(|name| {
//!     (name, service_fn(move |_: ()| async move { Ok::<_, std::convert::Infallible>(name) }))
//! });
//! // A user probe: here every replica but "b" is healthy.
//! let probe = probe_fn(|name: &&str, _: &_| {
//!     let healthy = *name != "b";
//!     async move { healthy }
//! });
//! let checked = HealthCheckBuilder::new()
//!     .interval(Duration::from_secs(1))
//!     .build(discover::fixed(replicas), probe)?;
//! let health = checked.status();
//! let balance = Balance::new(checked, RoundRobin::new());
//! # tokio::time::sleep(Duration::from_millis(10)).await;
//! assert_eq!(health.healthy(), 1);
//! # let _ = balance;
//! # Ok(())
//! # }
//! ```

mod channel;
mod connect;
#[cfg(feature = "dns")]
pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;
mod fixed;
mod target;

pub use channel::{channel, ChannelDiscover, DiscoverHandle};
pub use connect::{
    connect, connect_service, with_layer, Connect, ConnectService, EachEndpoint, MakeEndpoint,
    MakeError,
};
pub use fixed::{fixed, Fixed};
#[cfg(feature = "http")]
pub(crate) use target::check_authority;
pub use target::Target;
