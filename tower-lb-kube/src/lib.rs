//! Kubernetes EndpointSlices as a [tower-lb](https://docs.rs/tower-lb) discovery source: the
//! ready endpoints of a Service are balanced over, terminating ones are drained.
//!
//! [`EndpointSlices`] watches the `discovery.k8s.io/v1` EndpointSlices of one Service (those
//! labelled `kubernetes.io/service-name=<service>`) with kube's
//! [`watcher`](kube::runtime::watcher()), and is a `tower::discover::Discover` stream of
//! `Insert(addr, addr)` / `Remove(addr)` keyed by the endpoints' socket addresses;
//! `tower_lb::discover::connect` turns the addresses into endpoint services. Keys are
//! `SocketAddr`s, as DNS discovery's are, so consistent hashing places an endpoint the same
//! way whichever of the two found it.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use tower::{service_fn, ServiceExt};
//! use tower_lb::strategy::RoundRobin;
//! use tower_lb::{discover, Balance};
//! use tower_lb_kube::EndpointSlices;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // In a pod: the service account's credentials; elsewhere: the kubeconfig. Talking to a
//! // real API server needs a TLS feature of kube (its default `rustls-tls`).
//! let client = kube::Client::try_default().await?;
//! let endpoints = EndpointSlices::new(client, "default", "echo")?.port_name("grpc")?;
//! // One endpoint service per address: in a real program a tonic `Channel` or a hyper client
//! // pointed at it; here a stand-in that answers with its address.
//! let source = discover::connect(endpoints, |addr: SocketAddr| {
//!     service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) })
//! });
//! let balance = Balance::new(source, RoundRobin::new());
//! let served_by = balance.oneshot(()).await?;
//! # let _ = served_by;
//! # Ok(())
//! # }
//! ```
//!
//! # How slices become changes
//!
//! - **Ready** endpoints (condition `ready`, and not `terminating`) are inserted. Kubernetes
//!   leaves `ready` unset when it does not know; unset means ready, as the API documents.
//! - **Terminating** endpoints are **drained, not cut**: the stream emits `Remove`, and a
//!   tower-lb balancer treats a removal as a drain. It stops picking the endpoint at once and
//!   lets the requests already in flight to it finish (the endpoint shows as `Removed` in its
//!   stats until the last one has). A terminating pod keeps serving during its grace period,
//!   so its in-flight requests complete; no new ones are sent to it. The same holds for
//!   Services with `publishNotReadyAddresses`, whose terminating endpoints are still marked
//!   ready: terminating wins. Endpoints that stop being ready for another reason (a failing
//!   readiness probe) are removed the same way.
//! - **Gone**: an endpoint no longer in any slice is removed (if it was not already).
//! - **Ports**: with [`EndpointSlices::port_name`], the named port is looked up in each slice
//!   (slices of one Service may map it to different numbers); without it, each slice must
//!   carry exactly one port. A slice without the port contributes no endpoints and is reported
//!   as an [`Error::BadSlice`].
//! - **Addresses**: an endpoint's first address is used (Kubernetes: its addresses are
//!   fungible). An address that is not an IP (an `FQDN` slice) is skipped and reported.
//! - **One address, several slices**: while the EndpointSlice controller moves endpoints
//!   between slices, an address can be listed in two. It is one endpoint, inserted once, ready
//!   while any slice says it is ready, and removed only when none does.
//! - **Relists**: nothing is inserted before the first complete list. After a dropped watch
//!   that cannot resume (`410 Gone`: the resource version expired), the watcher lists again;
//!   slices not in the new list are evicted when it completes (`InitDone`), and only the
//!   difference from before is emitted.
//!
//! # Failures
//!
//! The stream never ends and never panics on what the API server sends. A failed list or
//! watch is an [`Error::Watch`] item (a balancer logs it, counts it in its stats'
//! `discovery_errors` and keeps its last endpoint set), then retried after a backoff:
//! 800 ms doubling up to 30 s by default (kube's and client-go's values, kind to a struggling
//! API server; see [`EndpointSlices::backoff`]). An API server that is unreachable at start
//! means an empty endpoint set: requests fail with tower-lb's `NoEndpoints` at once, or after
//! the balancer's bounded `wait_for_endpoints`.
//!
//! # Features and permissions
//!
//! This crate uses kube with its `client` and `runtime` features and no TLS stack of its own:
//! a program that talks to a real cluster depends on kube with a TLS feature (its default,
//! `rustls-tls`, does) and cargo unifies the two. As a library, it leaves the Kubernetes API
//! version to the program, which enables one `k8s-openapi` version feature (for example
//! `v1_33`, the oldest this k8s-openapi supports; EndpointSlices are the same in all). The service account needs `list` and `watch`
//! on `endpointslices` in the `discovery.k8s.io` API group, in the Service's namespace.

mod backoff;
mod endpoint_slices;
mod error;
mod state;

pub use endpoint_slices::{EndpointSlices, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN};
pub use error::{ConfigError, Error};
