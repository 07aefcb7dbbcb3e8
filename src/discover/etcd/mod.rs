//! Discovery from etcd (feature `etcd`): servers [`register`] themselves under their
//! service's prefix with a lease, and clients [`watch`] the prefix as a discovery stream.
//!
//! The layout is gRPC-Go's etcd naming (`go.etcd.io/etcd/client/v3/naming`), so Go and Rust
//! services share one registry: keys `<service>/<id>` (a registration writes
//! `<service>/<host:port>`), values `{"Addr": "host:port", "Metadata": ...}`. Plain
//! `host:port` values are read too.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_lb::discover::{self, etcd, Target};
//! use tower_lb::strategy::RoundRobin;
//! use tower_lb::weight::{Weight, Weighted};
//! use tower_lb::BalanceLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let client = etcd::etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
//!
//! // A server registers itself, held by a 10 s lease that a task keeps alive.
//! let registration = etcd::register(client.clone(), "echo", "10.0.0.7:50051")?
//!     .weight(Weight::new(2)?)
//!     .start()
//!     .await?;
//!
//! // A client balances over whatever is registered, live. Each target becomes an endpoint
//! // service (in a real program a tonic `Channel` or a hyper client for `target.addr()`),
//! // carrying the registered weight.
//! let endpoints = discover::connect(etcd::watch(client, "echo")?, |target: Target| {
//!     let addr = target.addr();
//!     let service = service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) });
//!     Weighted::new(service, target.weight())
//! });
//! let balance = BalanceLayer::new(RoundRobin::new())
//!     .weighted()
//!     .wait_for_endpoints(Duration::from_secs(2))?
//!     .layer(endpoints);
//! let served_by = balance.oneshot(()).await?;
//! # let _ = served_by;
//!
//! // On shutdown: gone from every watcher at once, not when the lease expires.
//! registration.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Watching
//!
//! [`watch`] lists the prefix and notes etcd's revision, then watches from the next revision
//! (with progress notifications), so nothing that happens in between is missed. It yields
//! `Change::Insert(addr, target)` and `Change::Remove(addr)` keyed by socket address, as DNS
//! discovery does, so consistent hashing places an endpoint the same way whichever source
//! found it.
//!
//! - **Values**: `host:port`, or a JSON object with `Addr` (`host:port`) and optional
//!   `Metadata`; field names match case-insensitively, as Go's `encoding/json` does, and
//!   other fields are ignored. gRPC-Go's old `{"Op": 1}` (delete) means the key names no
//!   endpoint. The port is required.
//! - **Weight**: `Metadata.weight`, a whole number from 1 to 1,000,000 (a [`Weight`]); 1
//!   without one. Build the balancer with `BalanceLayer::weighted()` and wrap each service
//!   in [`Weighted`] with [`Target::weight`], as above. A new weight written to a key
//!   re-inserts its endpoint with it, keeping its counters.
//! - **Host names** are resolved when the value is read (the first address the system
//!   resolver gives) and kept as the target's [`Target::authority`]. They are not re-resolved
//!   until the value is written again: for names whose addresses change, use DNS discovery.
//! - **One address under several keys** is one endpoint, described by the key written last
//!   and removed when no key names it.
//! - **Disconnected** (etcd restarting, a network cut): the watch resumes from the last
//!   revision it saw, so nothing is lost or repeated. If etcd has compacted that history
//!   meanwhile, the watch is cancelled and the prefix is listed again, and only the
//!   difference from the known set is yielded. A revision that went backwards (a restored or
//!   new cluster at the same address) also lists again.
//! - **Malformed values** (and names that do not resolve) are skipped and reported as an
//!   [`EtcdError`], which a balancer logs and counts in its stats (`discovery_errors`); the
//!   key keeps the endpoint it named before, if any, as gRPC-Go's resolver does; the watch
//!   goes on. Malformed keys do not exist for this layout: any key under the prefix is an
//!   entry, and its value says everything.
//!
//! # When etcd is unreachable
//!
//! etcd-client connects lazily, so an unreachable etcd is not an error when the client or the
//! watch is built. The watch starts with an empty set: requests fail with
//! [`Error::NoEndpoints`](crate::Error::NoEndpoints) at once, or after the balancer's bounded
//! [`wait_for_endpoints`](crate::BalanceLayer::wait_for_endpoints); each failed attempt is an
//! [`EtcdError`] in the stream (logged, counted), retried after a backoff. Once etcd answers,
//! the endpoints arrive. An outage later keeps the last known set.
//!
//! The backoff starts at 100 ms and doubles up to 5 s ([`EtcdWatch::backoff`]), each delay
//! drawn from the upper half of its range: etcd outages are mostly restarts and leader
//! elections lasting a few seconds, which a short first delay catches quickly, and the cap
//! keeps a client at most 5 s behind a recovered etcd while it sends it at most one request
//! every few seconds meanwhile. Each request (a list, opening the watch, resolving a name)
//! must answer within 10 s ([`EtcdWatch::request_timeout`]); an open watch is quiet while
//! nothing changes, so a connection that dies silently is noticed by etcd-client's
//! keep-alive (`ConnectOptions::with_keep_alive`), if set.
//!
//! # Registering
//!
//! [`register`] writes `<service>/<addr>` under a lease (TTL 10 s by default,
//! [`Register::ttl`]) and a task renews it every third of the TTL, as etcd's own clients do.
//! If etcd is unreachable the task retries with the same backoff; if the lease was lost (it
//! expired while etcd could not be reached, or was revoked), it grants a new one and writes
//! the entry again. Every failure is logged (`tracing`); the task ends only with the
//! registration. [`Registration::shutdown`] revokes the lease, deleting the entry at once;
//! dropping the registration (or the process dying) stops the renewals, and the entry
//! disappears when the lease expires.
//!
//! [`Weight`]: crate::weight::Weight
//! [`Weighted`]: crate::weight::Weighted
//! [`Target::weight`]: crate::discover::Target::weight
//! [`Target::authority`]: crate::discover::Target::authority

mod backoff;
mod error;
mod keys;
mod register;
mod value;
mod watch;

pub use error::EtcdError;
pub use register::{register, Register, Registration, DEFAULT_TTL};
pub use watch::{
    watch, EtcdWatch, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN, DEFAULT_REQUEST_TIMEOUT,
};

/// The etcd client crate this module is built on, for `Client::connect` and its options.
pub use etcd_client;
