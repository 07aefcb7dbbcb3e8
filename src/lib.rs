//! Client-side load balancing for [Tower](https://docs.rs/tower): one layer that picks an
//! endpoint per request, counts in-flight requests exactly, and is `Clone` without a
//! `Buffer`.
//!
//! # Quickstart
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::timeout::TimeoutLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};
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
//!     // The caller's own deadline, around the balancer.
//!     .timeout(Duration::from_secs(2))
//!     .layer(BalanceLayer::new(RoundRobin::new()))
//!     // Per endpoint, inside it: a timeout that counts against an endpoint that hangs.
//!     .service(discover::with_layer(
//!         discover::fixed(replicas),
//!         TimeoutLayer::new(Duration::from_secs(1)),
//!     ));
//!
//! // `svc` is `Clone`: hand a copy to every task; clones share endpoints and counters.
//! let reply = svc.clone().oneshot("ada".to_string()).await?;
//! assert!(reply.ends_with("greets ada"));
//! # Ok(())
//! # }
//! ```
//!
//! # Strategies
//!
//! All implement [`strategy::Strategy`]; swapping one for another changes no caller code, and
//! [`Swappable`](crate::strategy::Swappable) swaps them on a running balancer.
//!
//! | strategy | picks | where | cost per pick |
//! |---|---|---|---|
//! | [`RoundRobin`](crate::strategy::RoundRobin) | each endpoint in turn | `poll_ready` | O(1) |
//! | [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin) | smooth weighted rotation (3:1:1 → `a b a c a`), exact shares per cycle | `poll_ready` | O(1) (precomputed cycle ≤ 2^18), else O(log n) per clone |
//! | [`LeastTime`](crate::strategy::LeastTime) (**the default**) | fewest in flight per weight, passing over an endpoint whose latency makes it clearly costlier than a random other | `poll_ready` | see its docs |
//! | [`LeastConnections`](crate::strategy::LeastConnections) | fewest in flight (weighted: per copy of the lightest endpoint), ties rotate | `poll_ready` | see its docs |
//! | [`PowerOfTwoChoices`](crate::strategy::PowerOfTwoChoices) | the less loaded of two distinct weighted samples; load = in-flight or PeakEWMA latency × (in-flight + 1) | `poll_ready` | O(1) |
//! | [`ConsistentHash`](crate::strategy::ConsistentHash) | by request key: ring (Ketama, or nginx-compatible), Maglev; optional bounded loads | `call` | O(log n) ring, O(1) Maglev |
//! | [`Random`](crate::strategy::Random) | uniform or weighted (alias table) | `poll_ready` | O(1) |
//!
//! **The recommended default is [`LeastTime`](crate::strategy::LeastTime)**: exact least
//! connections (weighted), except that an endpoint whose latency makes it clearly costlier
//! than another is passed over. In the virtual-time quality benchmark (`cargo bench --bench
//! quality`: equal backends at 70% and 90% load, capacities 3:1:1, one backend 10× slower,
//! heavy-tailed costs, 100 single-worker backends at 90% load, one backend failing fast, one
//! hanging) its p99 and p99.9 are within 2% of the best of tower's p2c (pending requests and
//! PeakEWMA) and exact least connections in the five scenarios where backends are alike
//! (PeakEWMA P2C is 1.8× the best with 100 backends), and below all of them with a slow or a
//! hanging backend (least connections alone is 2.5× the best with the slow one). The
//! exception is a backend that fails fast: 5–7% above tower's p2c, which turns a quarter of
//! the requests into errors during the fault (about 25,000 against our 104) and so unloads
//! the other backends. `BENCHMARKS.md` has every figure;
//! [`LeastTime`](crate::strategy::LeastTime)'s docs explain the choice.
//!
//! # How it works
//!
//! - **Discovery** is any [`tower::discover::Discover`] stream of `Change::Insert(key, svc)`
//!   and `Change::Remove(key)`; [`discover`] has ready-made sources (a fixed list, a runtime
//!   handle, DNS with the `dns` feature, and [`health::HealthCheck`], active health checking
//!   as a discovery adapter), and [`discover::connect`] turns a source of addresses into one
//!   of endpoint services (a tonic `Channel` or hyper client per address), keeping keys. A
//!   background task on the current tokio runtime applies changes as they come, with or
//!   without traffic, and ends when the last clone of the balancer is dropped. `Insert` of a
//!   known key replaces its service and keeps its counters; `Remove` stops new picks at once
//!   while requests in flight finish. A discovery error is logged (`tracing`) and counted in
//!   [`Stats`]; the last set is kept, also when the stream ends.
//! - **Strategies** ([`strategy`]) choose among endpoints through a read-only view; their
//!   pickers are rebuilt off the request path when membership, weights or the strategy change.
//! - **Clones**: [`Balance`] is `Clone + Send + Sync` (for endpoint services that are
//!   `Clone + Send + Sync`), so it sits in axum's `State`, an `Arc` or a
//!   `BoxCloneSyncService`, and `svc.clone().oneshot(req)` per request is the intended use. A
//!   clone costs O(1) whatever the number of endpoints — reference-count bumps and a counter,
//!   no lock, no allocation — and copies an endpoint's service only when it first polls that
//!   endpoint; its first two copies are kept inline. That copy is the endpoint's *spare* when
//!   it has one: a dropped clone whose requests took the usual path (first choice ready, then
//!   called) leaves its copies for the next clones, one per service at most, so a clone per
//!   request takes and leaves one copy rather than cloning and dropping the service each time;
//!   a clone that polled a copy without calling it (pending, a reservation left unused)
//!   leaves none, since that readiness may hold a `Buffer` permit. Services without
//!   drop glue are simply cloned. A long-lived clone keeps its copies across table changes and drops only those of
//!   removed or replaced services. Measured (`cargo bench --bench overhead`, round-robin, one
//!   task, N = 2 … 4096): a new clone per request costs 33–43 ns a request with no-op
//!   endpoints and 45–64 ns with endpoints holding four `Arc`s each, like a hyper-util client
//!   handle (45 ns at N = 2, 61–64 ns at N = 4096), against 14–18 ns on one long-lived clone
//!   and 0.9–1.1 µs for tower's p2c behind a `Buffer` cloned per request.
//! - **Readiness**: an endpoint is only called after it reported ready. Unkeyed strategies
//!   pick in `poll_ready`: the balancer asks the picker (up to three times) for a ready
//!   endpoint, then scans the rest from a random position; a pending endpoint is skipped for a
//!   ready one. Keyed strategies pick in `call`, where the request is known: the chosen
//!   endpoint is polled for readiness there and, if it is not ready at once, the response
//!   future drives a clone of its service to readiness before calling it, so the request still
//!   goes where its key maps. An endpoint whose `poll_ready` fails is counted as a failure and
//!   leaves the rotation until discovery inserts it again.
//! - **In-flight accounting**: each dispatched request holds an [`InFlightGuard`] in its
//!   response future. The count drops exactly once: on response, on error, on cancellation
//!   (the future dropped) or on panic; with [`http::TrackBody`] (feature `http`) it is held
//!   until the response body's first data or its end. Guards refer to the endpoint's state,
//!   not to a table slot, so removals and table rebuilds never misattribute a request.
//! - **Health** ([`health`]): passive outlier ejection, a panic threshold, slow start and
//!   drain in the balancer; active probes (HTTP, TCP, custom) as a discovery adapter.
//! - **No endpoints** is an error, not a hang: [`Error::NoEndpoints`] at once, or after
//!   [`BalanceLayer::wait_for_endpoints`] has waited (bounded) for discovery. Use the wait when
//!   endpoints arrive asynchronously (DNS, health checks) and the first requests may come
//!   before them.
//! - **Failures** — what outlier detection, failure-aware strategies and stats count against
//!   an endpoint — are decided in one place ([`classify`]): errors from the endpoint's service
//!   (a per-endpoint timeout from [`discover::with_layer`] included) but never the caller's own
//!   (its request body failed, it went away); responses as the
//!   [`TrackCompletion`](completion::TrackCompletion) judges them — with the `http` feature,
//!   5xx and the gRPC statuses that say the server failed, from headers or, when a stream
//!   ends, from its trailers; and, if configured, requests abandoned after a long wait.
//! - **Errors** are [`tower::BoxError`]s; the balancer's own errors downcast to [`Error`], and
//!   an endpoint's errors come wrapped in a [`classify::EndpointError`] that names the
//!   endpoint.
//!   Invalid configuration is rejected where it is given, with a [`ConfigError`] naming the
//!   setting.
//! - **Observability**: [`Balance::stats`] / [`BalanceHandle::stats`] (per endpoint: key,
//!   in-flight, picks, failures, weights, status, ejections), `tracing` events at every
//!   membership and health change, and a `metrics` exporter (feature `metrics`).
//!
//! # Features
//!
//! | feature | adds |
//! |---|---|
//! | `http` | [`http`]: request keys (client IP with trusted proxies, header, path, cookie), in-flight until the body ends, 5xx classification, endpoints by address over a pooled hyper-util client or by name pinned to an address (`Host`, `:authority`, SNI kept), HTTP health probes |
//! | `health-http` | the same as `http` |
//! | `axum` | `http::ClientIp` also reads axum's `ConnectInfo<SocketAddr>` |
//! | `dns` | [`discover::dns`]: endpoints from A/AAAA and SRV names, re-resolved by TTL (hickory-resolver) |
//! | `metrics` | `metrics::Exporter`: gauges and counters through the `metrics` facade |
//! | `etcd` | `discover::etcd`: endpoints from an etcd prefix (list, then watch; gRPC-Go's naming format) and registration under a lease; needs Rust 1.88 and `protoc` to build |
//!
//! # Decisions
//!
//! - Endpoint services must be `Clone + Send + Sync`: each clone of the balancer keeps its own
//!   copies of the services it uses, so it can drive their readiness with `&mut` access and no
//!   lock, and copies them from a table every clone shares. hyper-util's client, tonic's
//!   `Channel`, `BoxCloneSyncService` and this crate's HTTP endpoint are. A service that is
//!   only `Send` (`BoxCloneService`, say) can be made `Sync` with `tower::buffer::Buffer`, at
//!   the cost of a channel hop and a worker task per endpoint (about 1 µs a request here); box
//!   `Sync` services as `BoxCloneSyncService` instead.
//! - A request that `poll_ready` reserved on an endpoint that is removed, drained or ejected —
//!   or whose service is replaced — before `call` is sent elsewhere: `call` counts it in flight,
//!   then checks the endpoint, and if it left, picks again from the newest table (an endpoint
//!   ready at once first) and lets the response future ready the one it chose. It never
//!   reaches the endpoint that left.
//! - If the discovery task panics (in a discovery stream, a weigher, a strategy's build), the
//!   balancer fails every request from then on with [`Error::DiscoveryFailed`], which carries
//!   the panic's message (so do [`Stats::discovery_failure`] and a `tracing` error), rather
//!   than serve from a table nobody updates; a clone waiting for endpoints is woken at once.
//! - A clone keeps the table it last used until its next request, and with it the services
//!   and counters of endpoints removed since; stats list such endpoints as removed until no
//!   clone holds them. A balancer that is only ever cloned (axum's `State`) holds no table.
//! - Clones rotate and sample with their own cursor and random generator (seeded differently
//!   per clone, or reproducibly with [`BalanceLayer::seed`]), so threads never contend on a
//!   shared counter; shares stay exact per clone.
//! - An endpoint's in-flight count and its life share one atomic word, so a request costs one
//!   atomic add to dispatch and one atomic subtract to finish, plus one for the pick counter.
//! - Weight 0 is rejected ([`Weight::new`](crate::weight::Weight::new)): to stop traffic to an endpoint, remove or drain
//!   it. Weights are 1 to 1,000,000.
//! - A discovery source drains an endpoint by removing it: `Change::Remove` already takes it
//!   out of new picks while its in-flight requests finish, so sources need no separate drain
//!   signal. [`BalanceHandle::drain`] does the same from outside discovery and also returns a
//!   future that resolves when the last request has finished. Registries map termination
//!   this way: a Kubernetes endpoint that is terminating but still serving
//!   (`tower-lb-kube`), an etcd registration deleted at shutdown.
//! - Consistent hashing places endpoints by their identity (the discovery key's `Debug`
//!   form, e.g. `127.0.0.1:8080`), never by discovery order, so every process agrees.
//! - Latency-aware picking reads a clock once at pick time and once at completion, and only
//!   for strategies that ask for it (and with
//!   [`count_abandoned_after`](BalanceLayer::count_abandoned_after)); a response future
//!   dropped unfinished records its wait, so a hanging endpoint does not look fast. The clock
//!   is the processor's time-stamp counter (the `quanta` crate; calibrated once per process
//!   when the first such balancer is built, which blocks that thread for under a millisecond
//!   usually and 200 ms at most), or tokio's clock for a balancer built while tokio's clock is
//!   paused, so that tests on virtual time measure virtual latencies. A balancer built before
//!   `tokio::time::pause()` keeps the counter.
//! - The panic threshold applies to endpoints the balancer ejected itself; active health
//!   checks remove unhealthy endpoints from discovery.
//! - If the balancer is built outside a tokio runtime, its discovery task starts on the runtime
//!   of the first `poll_ready`; with no runtime then either, `poll_ready` fails with
//!   [`Error::NoRuntime`]. Outlier detection, slow start and bounded waits need tokio's timer.

#![cfg_attr(docsrs, feature(doc_auto_cfg))]
// `endpoint` — the hand-counted endpoint cell and its in-flight guard — and `util::spare` — the
// lock-free place for a spare service copy — are the only modules with `unsafe` code, each
// with loom models beside it; everywhere else it is a compile error.
#![deny(unsafe_code)]

mod balance;
pub mod classify;
pub mod completion;
mod control;
pub mod discover;
#[allow(unsafe_code)]
mod endpoint;
mod error;
pub mod health;
#[cfg(feature = "http")]
pub mod http;
pub mod key;
#[cfg(feature = "metrics")]
pub mod metrics;
mod stats;
pub mod strategy;
mod util;
pub mod weight;

pub use balance::{Balance, BalanceHandle, BalanceLayer, BoxBalance, ResponseFuture};
pub use endpoint::{InFlightGuard, Outcome};
pub use error::{ConfigError, Error};
pub use stats::{EndpointStats, EndpointStatus, Stats};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
