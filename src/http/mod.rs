//! HTTP integration (feature `http`): request keys, in-flight until the body ends, and an
//! endpoint service that sends requests to an address.
//!
//! - [`ClientIp`], [`HeaderKey`], [`PathKey`], [`CookieKey`]: [`RequestKey`](crate::key::RequestKey)s
//!   for consistent hashing of `http::Request`s. The client IP comes from the connection
//!   ([`PeerAddr`], or axum's `ConnectInfo<SocketAddr>` with the `axum` feature); forwarding
//!   headers are believed only from configured trusted proxies.
//! - [`TrackBody`]: keeps a request in flight until its response body's first data or its end
//!   (or an error, or the body being dropped), so streaming responses count while they stream.
//! - [`HttpEndpoint`] and [`connect`]: an endpoint service that points each request at one
//!   address over a shared pooled hyper-util client, and a `Discover` adapter that turns
//!   discovered addresses into such services.
//! - [`HttpProbe`]: an HTTP `GET` probe for active health checks
//!   ([`HealthCheck`](crate::health::HealthCheck)).
//! - [`MakeHttpEndpoint`]: endpoints for addresses found by name (DNS) that keep the name —
//!   `Host` over HTTP/1.1, `:authority` over HTTP/2, the TLS server name — while connecting to
//!   the address ([`ConnectTo`]); use it with [`discover::connect`](crate::discover::connect).
//!
//! ```
//! use std::net::SocketAddr;
//! use http_body_util::Empty;
//! use hyper::body::Bytes;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::Layer;
//! use tower_lb::http::{connect, ClientIp, TrackBody};
//! use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
//! let backends: Vec<SocketAddr> = vec!["127.0.0.1:8081".parse().unwrap()];
//! let endpoints = connect(client, discover::fixed(backends.into_iter().map(|a| (a, a))));
//! let balance = BalanceLayer::new(RoundRobin::new())
//!     .key(ClientIp::new())
//!     .track_completion(TrackBody::end_of_stream())
//!     .layer(endpoints);
//! # let _ = balance;
//! # }
//! ```

mod body;
mod caller;
mod endpoint;
mod failures;
mod key;
mod make;
mod probe;

pub use body::{BodyCompletion, TrackBody, TrackedBody};
pub use caller::CallerBody;
pub use endpoint::HttpEndpoint;
pub use failures::{ServerFailure, ServerFailures, ServerFailuresEos};
pub use key::{ClientIp, CookieKey, HeaderKey, PathKey, PeerAddr};
pub use make::{connect, ConnectTo, MakeHttpEndpoint};
pub use probe::HttpProbe;
/// tower-http's classification traits and classifiers, for [`TrackBody::classify_with`].
pub use tower_http::classify;
