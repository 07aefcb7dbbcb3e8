//! Local HTTP backends for comparisons: `cargo run --release --example backends -- PORT[:DELAY_MS] ...`
//!
//! Starts one HTTP/1.1 server on 127.0.0.1 per argument; each answers every request with a
//! short body naming its port, after `DELAY_MS` milliseconds (default 0). It runs until
//! Ctrl-C. `benches/e2e/compare.sh` uses it to put nginx and the proxy example in front of the
//! same backends.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let specs: Vec<String> = std::env::args().skip(1).collect();
    if specs.is_empty() {
        return Err("usage: backends PORT[:DELAY_MS] ...".into());
    }
    for spec in specs {
        let (port, delay) = match spec.split_once(':') {
            Some((port, delay)) => (port.parse::<u16>()?, delay.parse::<u64>()?),
            None => (spec.parse::<u16>()?, 0),
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let body = Bytes::from(format!("backend {port}\n"));
        let delay = Duration::from_millis(delay);
        println!(
            "backend on 127.0.0.1:{port}, {} ms per request",
            delay.as_millis()
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_| {
                        let body = body.clone();
                        async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
