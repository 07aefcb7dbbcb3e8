//! Endpoints from DNS (feature `dns`): the addresses of `host:port` names (A/AAAA records) and
//! of SRV names, re-resolved as their TTLs run out, as a discovery stream keyed by
//! `SocketAddr`.
//!
//! [`DnsBuilder`] takes the names — several can feed one balancer — and builds a [`Dns`]
//! stream of `Change<SocketAddr, Target>`: each [`Target`](crate::discover::Target) is an address with the name it was
//! found under and its weight. [`connect`](crate::discover::connect) turns targets into
//! endpoint services; with the `http` feature, `http::MakeHttpEndpoint` makes endpoints that
//! connect to the address and keep the name (`Host`, `:authority`, TLS server name).
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_lb::discover::{dns::DnsBuilder, dns::LookupIpStrategy};
//! use tower_lb::discover::{self, Target};
//! use tower_lb::{strategy::RoundRobin, BalanceLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // `localhost` is answered without a DNS server (RFC 6761); a real program names its
//! // service, such as `api.internal:8080` or `_http._tcp.api.internal`.
//! let dns = DnsBuilder::new()
//!     .name("localhost:8080")?
//!     .ip_strategy(LookupIpStrategy::Ipv4Only)
//!     .build()?;
//! // One endpoint service per address (here a stand-in; in a real program a hyper or tonic
//! // client, see the README's "Beyond one machine").
//! let endpoints = discover::connect(dns, |target: Target| {
//!     service_fn(move |_: ()| {
//!         let addr = target.addr();
//!         async move { Ok::<_, Infallible>(addr) }
//!     })
//! });
//! let balance = BalanceLayer::new(RoundRobin::new())
//!     // The first requests may come before the first answer: wait for it, bounded.
//!     .wait_for_endpoints(Duration::from_secs(5))?
//!     .layer(endpoints);
//! assert_eq!(balance.oneshot(()).await?, "127.0.0.1:8080".parse()?);
//! # Ok(())
//! # }
//! ```
//!
//! # The rules
//!
//! - **Names.** `host:port` ([`DnsBuilder::name`]): every A and AAAA record of the host is an
//!   endpoint on the port ([`DnsBuilder::ip_strategy`] picks the families), presented as
//!   `host:port`. An IP address given as a name is used as is and never queried. SRV
//!   ([`DnsBuilder::srv`]): see below. An address that several names give is one endpoint; it
//!   takes its name and weight from the first of those names (in the order they were given),
//!   and is removed when none of them gives it any more.
//! - **SRV.** Only the lowest priority is used — the lowest whose targets have addresses:
//!   records whose target is `.` (RFC 2782: not available here), or whose target has no
//!   address, count as absent. Each target's addresses become endpoints on the record's port.
//!   An SRV weight becomes the endpoint's [`Weight`](crate::weight::Weight) (build the balancer with
//!   [`BalanceLayer::weighted`](crate::BalanceLayer::weighted) to use it); weight 0 counts as 1
//!   (RFC 2782 gives weight-0 records a small share, not none), and records that land on the
//!   same address add their weights. If looking a target up fails (not "no such name", which
//!   skips it), the whole resolution fails and the last set is kept. SRV endpoints are
//!   presented as the SRV name without its `_service._proto` labels (`api.internal` for
//!   `_http._tcp.api.internal`), with no port.
//! - **When.** Each name is resolved when the stream is first polled, then again when the
//!   answer's TTL runs out (the smallest TTL of the records used, CNAMEs and SRV targets
//!   included), but never sooner than the **floor, 5 s** by default, nor later than the **cap,
//!   5 min**. The floor keeps TTL 0 (Consul's default) or 1 s answers from turning every client
//!   into a steady load on the DNS server, and 5 s is what CoreDNS gives Kubernetes names, so
//!   changes there are seen as soon as DNS itself shows them. The cap bounds how long a
//!   mistaken long TTL can pin a stale set; one query per name every 5 minutes costs nothing.
//!   (linkerd re-resolves at TTL expiry; gRPC at most every 30 s.) Hickory's cache is off, so
//!   each resolution asks a server; a caching server in between (systemd-resolved, a node
//!   cache) still answers from its own cache until its TTL runs out.
//! - **Failures.** A resolution that fails, times out ([`DnsBuilder::timeout`], 10 s), or
//!   finds no usable records is retried with exponential backoff: 1 s, doubling per failure
//!   in a row, at most 30 s, each wait taken at random between half of it and all of it so
//!   clients that failed together do not retry together ([`DnsBuilder::backoff`]). A good
//!   answer starts the backoff over.
//! - **A failed or empty answer keeps the last set.** Each is yielded as a [`DnsError`]
//!   (the balancer counts it in `Stats::discovery_errors` and logs it) and the name's last
//!   addresses stay. **NXDOMAIN after a success is treated the same way**: a name that
//!   vanishes keeps its last addresses rather than emptying the balancer, because a
//!   transient NXDOMAIN (a zone being reloaded, a registry restarting, a split-horizon
//!   mistake) is far more common than a service deliberately withdrawn by deleting its name,
//!   and emptying the set turns a DNS hiccup into a full outage. Endpoints that really went
//!   away fail their requests and health checks, which take them out; to withdraw a service,
//!   point its name at the new addresses, or stop the balancer.
//! - **Changes.** A new answer yields only the difference to the last one: an `Insert` for a
//!   new address or one whose weight or name changed (the balancer keeps its counters), a
//!   `Remove` for an address no name gives any more. Every change is an `info` tracing event
//!   (`DNS: endpoint added` / `changed` / `removed`); each resolution is a `debug` event.
//! - **Never.** The stream never ends and never panics on an answer. A name that never
//!   resolves leaves the set empty: requests fail with `Error::NoEndpoints`, at once or after
//!   the balancer's bounded [`wait_for_endpoints`](crate::BalanceLayer::wait_for_endpoints).
//!
//! Bad input is rejected where it is given, with a [`ConfigError`](crate::ConfigError) naming
//! the setting (`dns name`, `dns srv name`, `dns ttl_floor`, …): a name without a port or
//! with one out of range, a malformed host name, an empty SRV name, a floor above the cap.

mod builder;
mod error;
mod refresh;
mod resolve;
mod source;

pub use builder::DnsBuilder;
pub use error::{DnsError, DnsErrorKind};
/// hickory-resolver's settings, as [`DnsBuilder`] takes them.
pub use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
pub use source::Dns;
