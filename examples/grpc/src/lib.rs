//! tower-lb balancing a generated tonic gRPC client across gRPC servers.
//!
//! The pieces the program (`src/main.rs`) and its test (`tests/balance.rs`) share:
//!
//! - [`pb`]: the code tonic-prost-build generated from `proto/echo.proto` at build time
//!   (messages, `EchoClient`, `EchoServer`);
//! - [`start_server`]: an `Echo` server on a loopback port, counting the calls it answers;
//! - [`balanced_client`]: one tonic `Channel` per server, balanced round-robin by
//!   `tower_lb::BalanceLayer`, wrapped by the generated `EchoClient`;
//! - with the feature `etcd`: `register_server` (a server registers itself in etcd with a
//!   lease) and `etcd_balanced_client` (the client balances over whatever is registered).
//!
//! Responses are tracked with [`TrackBody::end_of_stream`], so a server-streaming call counts
//! as in flight on its server until the client has read the stream to its end (or dropped it),
//! not only until the response headers arrive — and is judged there: a stream whose trailers
//! say `UNAVAILABLE` is a failure of its server. With outlier detection, a server that keeps
//! failing is ejected and its calls go to the others ([`RunningServer::fail`] makes one fail).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tower::Layer;
use tower_lb::discover;
use tower_lb::health::OutlierDetection;
use tower_lb::http::TrackBody;
use tower_lb::{key::NoKey, strategy::RoundRobin, Balance, BalanceLayer};

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoRequest, EchoResponse};

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::{etcd_balanced_client, register_server, EtcdEchoBalance, SERVICE};

/// The messages, client and server generated from `proto/echo.proto`.
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("echo");
}

/// The balancer: round-robin over one tonic `Channel` per server address, keeping each call
/// in flight until its response body (a gRPC stream) ends.
pub type EchoBalance = Balance<SocketAddr, Channel, RoundRobin, NoKey, TrackBody>;

/// An `Echo` server that tells who it is and counts the calls it answers.
#[derive(Clone, Debug)]
struct Replica {
    name: String,
    calls: Arc<AtomicU64>,
    /// When set, every call fails with `UNAVAILABLE`: a unary one at once, in a trailers-only
    /// response; a streaming one after its first message, in its trailers.
    failing: Arc<AtomicBool>,
}

impl Replica {
    fn answer(&self, message: &str) -> EchoResponse {
        EchoResponse {
            message: message.to_owned(),
            server: self.name.clone(),
        }
    }
}

#[tonic::async_trait]
impl Echo for Replica {
    async fn unary_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("shutting down"));
        }
        Ok(Response::new(self.answer(&request.into_inner().message)))
    }

    type ServerStreamingEchoStream =
        Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send + 'static>>;

    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamingEchoStream>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let request = request.into_inner();
        let mut replies: Vec<_> = (1..=request.count)
            .map(|i| Ok(self.answer(&format!("{} #{i}", request.message))))
            .collect();
        if self.failing.load(Ordering::Relaxed) {
            replies.truncate(1);
            replies.push(Err(Status::unavailable("shutting down mid-stream")));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }
}

/// A running `Echo` server on a loopback port. Dropping it stops the server.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// The calls (unary or streaming) it has answered.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Makes every call fail with `UNAVAILABLE` from now on (or stop failing).
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts an `Echo` server on `127.0.0.1` at a port the OS picks.
pub async fn start_server() -> std::io::Result<RunningServer> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicU64::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let replica = Replica {
        name: addr.to_string(),
        calls: calls.clone(),
        failing: failing.clone(),
    };
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(EchoServer::new(replica))
            .serve_with_incoming(TcpIncoming::from(listener))
            .await;
        if let Err(error) = served {
            eprintln!("server {addr} stopped: {error}");
        }
    });
    Ok(RunningServer {
        addr,
        calls,
        failing,
        task,
    })
}

/// A generated `EchoClient` whose calls `tower_lb` balances round-robin over `servers`, and
/// a clone of the balancer to read its [`stats`](Balance::stats) from.
///
/// Each server gets one lazily connected tonic `Channel` (an HTTP/2 connection, opened at the
/// first call), keyed by its address. A server whose calls fail 3 times in a row (a gRPC status
/// that says the server failed, such as `UNAVAILABLE`) is ejected for 30 s.
pub fn balanced_client(
    servers: &[SocketAddr],
) -> Result<(EchoClient<EchoBalance>, EchoBalance), tonic::transport::Error> {
    let channels = servers
        .iter()
        .map(|&addr| {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
            Ok((addr, channel))
        })
        .collect::<Result<Vec<_>, tonic::transport::Error>>()?;
    let outlier = OutlierDetection::new()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(30))
        .max_ejected_percent(50);
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .outlier_detection(outlier)
        .expect("valid outlier detection settings")
        .layer(discover::fixed(channels));
    Ok((EchoClient::new(balance.clone()), balance))
}
