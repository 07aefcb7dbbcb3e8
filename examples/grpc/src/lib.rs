//! tower-lb balancing a generated tonic gRPC client across gRPC servers.
//!
//! The pieces the program (`src/main.rs`) and its test (`tests/balance.rs`) share:
//!
//! - [`pb`]: the code tonic-prost-build generated from `proto/echo.proto` at build time
//!   (messages, `EchoClient`, `EchoServer`);
//! - [`start_server`]: an `Echo` server on a loopback port, counting the calls it answers;
//! - [`balanced_client`]: one tonic `Channel` per server, balanced round-robin by
//!   `tower_lb::BalanceLayer`, wrapped by the generated `EchoClient`.
//!
//! Responses are tracked with [`TrackBody::end_of_stream`], so a server-streaming call counts
//! as in flight on its server until the client has read the stream to its end (or dropped it),
//! not only until the response headers arrive.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tower::Layer;
use tower_lb::discover;
use tower_lb::http::TrackBody;
use tower_lb::{key::NoKey, strategy::RoundRobin, Balance, BalanceLayer};

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoRequest, EchoResponse};

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
        let replies: Vec<_> = (1..=request.count)
            .map(|i| Ok(self.answer(&format!("{} #{i}", request.message))))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }
}

/// A running `Echo` server on a loopback port. Dropping it stops the server.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// The calls (unary or streaming) it has answered.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
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
    let replica = Replica {
        name: addr.to_string(),
        calls: calls.clone(),
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
    Ok(RunningServer { addr, calls, task })
}

/// A generated `EchoClient` whose calls `tower_lb` balances round-robin over `servers`, and
/// a clone of the balancer to read its [`stats`](Balance::stats) from.
///
/// Each server gets one lazily connected tonic `Channel` (an HTTP/2 connection, opened at the
/// first call), keyed by its address.
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
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .layer(discover::fixed(channels));
    Ok((EchoClient::new(balance.clone()), balance))
}
