//! The etcd mode (feature `etcd`): servers register themselves under [`SERVICE`] with a
//! lease, and the client balances over whatever is registered, live.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tower::{BoxError, Layer};
use tower_lb::discover::etcd::{self, Registration};
use tower_lb::discover::{self, Target};
use tower_lb::http::TrackBody;
use tower_lb::key::NoKey;
use tower_lb::strategy::RoundRobin;
use tower_lb::{Balance, BalanceLayer, ConfigError};

use crate::pb::echo_client::EchoClient;
use crate::RunningServer;

/// The service name the example's servers register under: keys
/// `tower-lb-example/echo/<addr>`.
pub const SERVICE: &str = "tower-lb-example/echo";

/// The balancer over the registered servers: a tonic `Channel` per registered address,
/// round-robin, each call in flight until its response stream ends.
pub type EtcdEchoBalance = Balance<SocketAddr, Channel, RoundRobin, NoKey, TrackBody>;

/// A generated `EchoClient` whose calls are balanced over the servers registered in etcd
/// under `service`, and a clone of the balancer to read its stats from.
///
/// Before the first registration arrives, a call waits for one up to 5 s, then fails with
/// `NoEndpoints`.
pub fn etcd_balanced_client(
    etcd: etcd::etcd_client::Client,
    service: &str,
) -> Result<(EchoClient<EtcdEchoBalance>, EtcdEchoBalance), ConfigError> {
    let source = discover::connect(
        etcd::watch(etcd, service)?,
        channel as fn(Target) -> Channel,
    );
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .wait_for_endpoints(Duration::from_secs(5))?
        .layer(source);
    Ok((EchoClient::new(balance.clone()), balance))
}

/// A lazily connected tonic `Channel` to a registered server.
fn channel(target: Target) -> Channel {
    Endpoint::from_shared(format!("http://{}", target.addr()))
        .expect("a socket address makes a valid URI")
        .connect_lazy()
}

/// Registers `server` under `service` with a lease of `ttl`, kept alive until the returned
/// registration is shut down (or dropped: then the entry expires after `ttl`).
pub async fn register_server(
    server: &RunningServer,
    etcd: etcd::etcd_client::Client,
    service: &str,
    ttl: Duration,
) -> Result<Registration, BoxError> {
    let registration = etcd::register(etcd, service, &server.addr.to_string())?
        .ttl(ttl)?
        .start()
        .await?;
    Ok(registration)
}
