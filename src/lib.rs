//! Client-side load balancing for [Tower](https://docs.rs/tower): one layer that picks an
//! endpoint per request, counts in-flight requests exactly, and is `Clone` without a
//! `Buffer`.
//!
//! # Quickstart
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_lb::{discover, BalanceLayer, RoundRobin};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // Three endpoint services (in a real program: hyper or tonic clients, one per replica).
//! let replicas = (0..3).map(|i| {
//!     let replica = service_fn(move |name: String| async move {
//!         Ok::<_, Infallible>(format!("replica {i} greets {name}"))
//!     });
//!     (i, replica)
//! });
//!
//! let svc = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(2))
//!     .layer(BalanceLayer::new(RoundRobin::new()))
//!     .service(discover::fixed(replicas));
//!
//! // `svc` is `Clone`: hand a copy to every task; clones share endpoints and counters.
//! let reply = svc.clone().oneshot("ada".to_string()).await?;
//! assert!(reply.ends_with("greets ada"));
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! - **Discovery** is any [`tower::discover::Discover`] stream of `Change::Insert(key, svc)`
//!   and `Change::Remove(key)`; [`discover`] has ready-made sources. A background task on the
//!   current tokio runtime applies changes as they come, with or without traffic, and ends
//!   when the last clone of the balancer is dropped. `Insert` of a known key replaces its
//!   service and keeps its counters; `Remove` stops new picks at once while requests in flight
//!   finish. A discovery error is logged (`tracing`) and counted in [`Stats`]; the last set is
//!   kept, also when the stream ends.
//! - **Strategies** ([`strategy`]) choose among endpoints through a read-only view; they are
//!   rebuilt off the request path when membership changes.
//! - **Readiness**: an endpoint is only called after it reported ready. A pending endpoint is
//!   skipped for a ready one. An endpoint whose `poll_ready` fails is counted as a failure and
//!   leaves the rotation until discovery inserts it again.
//! - **In-flight accounting**: each dispatched request holds an [`InFlightGuard`] in its
//!   response future. The count drops exactly once: on response, on error, on cancellation
//!   (the future dropped) or on panic. Guards refer to the endpoint's state, not to a table
//!   slot, so removals and table rebuilds never misattribute a request.
//! - **No endpoints** is an error, not a hang: [`Error::NoEndpoints`] at once, or after
//!   [`BalanceLayer::wait_for_endpoints`] has waited (bounded) for discovery. Use the wait when
//!   endpoints arrive asynchronously (DNS, health checks) and the first requests may come
//!   before them.
//! - **Errors** are [`tower::BoxError`]s; the balancer's own errors downcast to [`Error`].
//!
//! # Decisions
//!
//! - Endpoint services must be `Clone`: each clone of the balancer keeps its own copies, so it
//!   can drive their readiness with `&mut` access and no lock. hyper and tonic clients are
//!   cheap to clone; wrap anything else in `tower::buffer::Buffer`.
//! - Clones rotate and sample with their own cursor and random generator (seeded differently
//!   per clone), so threads never contend on a shared counter; shares stay equal over time.
//! - An endpoint's in-flight count and its life share one atomic word, so a request costs one
//!   atomic add to dispatch and one atomic subtract to finish, plus one for the pick counter.
//! - If the balancer is built outside a tokio runtime, its discovery task starts on the runtime
//!   of the first `poll_ready`; with no runtime then either, `poll_ready` fails with
//!   [`Error::NoRuntime`].

#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod balance;
pub mod completion;
pub mod discover;
mod endpoint;
mod error;
pub mod health;
#[cfg(feature = "http")]
pub mod http;
mod key;
#[cfg(feature = "metrics")]
pub mod metrics;
mod rng;
mod stats;
pub mod strategy;
mod sync;
mod table;
pub mod weight;

pub use balance::{Balance, BalanceHandle, BalanceLayer, Drain, ResponseFuture};
pub use completion::{CompleteOnResponse, TrackCompletion};
pub use endpoint::InFlightGuard;
pub use error::{ConfigError, Error};
pub use key::{key_fn, KeyFn, KeyHasher, NoKey, RequestKey};
pub use stats::{EndpointStats, EndpointStatus, Stats};
pub use strategy::{
    ConsistentHash, KeyFallback, PowerOfTwoChoices, Random, RoundRobin, Swappable,
    WeightedRoundRobin,
};
pub use weight::{Weight, Weighted};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
