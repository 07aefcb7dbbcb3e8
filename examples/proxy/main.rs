//! A reverse proxy on axum and hyper-util, balancing with tower-lb.
//!
//! ```text
//! cargo run --example proxy --features http,dns
//! cargo run --example proxy --features http,dns -- \
//!     --listen 127.0.0.1:8080 --backend 127.0.0.1:8081=3 --backend 127.0.0.1:8082 \
//!     --strategy round-robin --admin /_lb/stats
//! cargo run --example proxy --features http,dns -- \
//!     --backend api.internal:8080 --backend-srv _http._tcp.search.internal
//! ```
//!
//! With no `--backend` it starts three demo backends on loopback (fast, medium, slow) and
//! prints curl lines to try. A `--backend host:port` is resolved by DNS (every address is a
//! backend) and resolved again as its TTL runs out; `--backend-srv` takes backends from SRV
//! records.
//!
//! - Bodies stream both ways: hyper's `Incoming` bodies pass through, never held whole, and a
//!   response counts as in flight until its body has streamed.
//! - Hop-by-hop headers are dropped both ways; `X-Forwarded-For` and `Forwarded` get the
//!   client appended to what earlier proxies wrote.
//! - A backend that cannot be reached answers 502; one that fails 5 requests in a row
//!   (unreachable, or answering 5xx) is ejected for a while (passive outlier detection).
//!   `--health /healthz` adds active health checks that take failing backends out of rotation.
//! - With no backend available the proxy answers 503.
//! - `GET /_lb/stats` shows the balancer's counters (and health checks) as JSON.
//! - Ctrl-C stops accepting connections and lets requests in progress finish.
//! - It does not retry (a request may not be safe to send twice) and does not proxy protocol
//!   upgrades such as WebSocket (`Upgrade` is a hop-by-hop header).

mod app;
mod cli;

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use app::Backend;
use cli::{parse_args, usage, Args};

/// Starts three demo backends on loopback that answer after different delays.
async fn start_demo_backends() -> std::io::Result<Vec<Backend>> {
    let mut backends = Vec::new();
    for (name, delay) in [("fast", 1), ("medium", 10), ("slow", 50)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let answer = move |request: axum::extract::Request| async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, Infallible>(format!(
                "{name} backend ({addr}, {delay} ms) got {} {}\n",
                request.method(),
                request.uri()
            ))
        };
        let service = tower::service_fn(answer);
        tokio::spawn(async move {
            let _ = axum::serve(listener, axum::Router::new().fallback_service(service)).await;
        });
        backends.push(Backend {
            addr,
            weight: tower_lb::weight::Weight::ONE,
        });
    }
    Ok(backends)
}

#[tokio::main]
async fn main() -> ExitCode {
    let Args { listen, mut config } = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) if problem.is_empty() => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("error: {problem}\n(proxy --help lists the options)");
            return ExitCode::from(2);
        }
    };
    if config.backends.is_empty() && config.dns.is_empty() {
        match start_demo_backends().await {
            Ok(backends) => config.backends = backends,
            Err(error) => {
                eprintln!("error: cannot start the demo backends: {error}");
                return ExitCode::FAILURE;
            }
        }
        println!("no --backend given: started three demo backends (1 ms, 10 ms, 50 ms)");
    }
    let app = match app::build_app(&config) {
        Ok(app) => app,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };

    println!(
        "tower-lb proxy on http://{listen} ({} over {} backends{})",
        config.strategy.name(),
        config.backends.len(),
        if config.dns.is_empty() {
            ""
        } else {
            " and DNS names"
        }
    );
    for backend in &config.backends {
        println!("  backend {} (weight {})", backend.addr, backend.weight);
    }
    for (name, weight) in &config.dns.names {
        println!("  backends: every address of {name} (weight {weight}), kept up to date by DNS");
    }
    for name in &config.dns.srv {
        println!("  backends: the SRV records of {name}, kept up to date by DNS");
    }
    match &config.health {
        Some(health) => println!(
            "  active health checks: GET {} on each backend",
            health.path
        ),
        None => println!("  passive health only: a backend that keeps failing is ejected"),
    }
    println!("try:");
    println!("  curl -s http://{listen}/hello");
    println!("  for i in $(seq 9); do curl -s http://{listen}/; done");
    println!("  curl -s http://{listen}{}", config.admin_path);
    println!("Ctrl-C stops it (requests in progress finish).");

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: finishing requests in progress");
    };
    if let Err(error) = app::serve(listener, app, shutdown).await {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
