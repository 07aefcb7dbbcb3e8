//! HTTP servers on loopback for the integration tests.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Which HTTP a server speaks.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    Http1,
    /// HTTP/2 without TLS (h2c), as gRPC servers on loopback speak it.
    Http2,
}

/// Serves `answer` on a new loopback port, a task per connection, for as long as the runtime
/// runs; returns the address.
pub async fn serve<F, Fut, B>(protocol: Protocol, answer: F) -> SocketAddr
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_on(listener, protocol, answer);
    addr
}

/// [`serve`] on a listener the caller bound.
pub fn serve_on<F, Fut, B>(listener: TcpListener, protocol: Protocol, answer: F)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = answer(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let io = TokioIo::new(stream);
                let _ = match protocol {
                    Protocol::Http1 => http1::Builder::new().serve_connection(io, service).await,
                    Protocol::Http2 => {
                        http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    }
                };
            });
        }
    });
}

/// Listeners on 127.0.0.2, 127.0.0.3, … all on one port (A records carry no port).
pub async fn listeners_on_one_port(count: u8) -> (u16, Vec<TcpListener>) {
    'retry: for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 1..count {
            match TcpListener::bind((format!("127.0.0.{}", 2 + i).as_str(), port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'retry,
            }
        }
        return (port, listeners);
    }
    panic!(
        "no port free on 127.0.0.2 to 127.0.0.{} in 100 tries",
        1 + count
    );
}
