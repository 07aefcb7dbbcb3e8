//! A reverse proxy on axum and hyper-util, balancing with tower-lb.
//!
//! ```text
//! cargo run --example proxy --features http,dns
//! cargo run --release --example proxy --features http,dns -- \
//!     --listen 0.0.0.0:8080 --backend 10.0.0.7:8081=3 --backend 10.0.0.8:8081 \
//!     --strategy least-connections --health /healthz --admin-listen 127.0.0.1:9901
//! cargo run --example proxy --features http,dns -- \
//!     --backend api.internal:8080 --backend-srv _http._tcp.search.internal
//! ```
//!
//! With no `--backend` it starts three demo backends on loopback (fast, medium, slow) and
//! prints curl lines to try. A `--backend host:port` is resolved by DNS (every address is a
//! backend) and resolved again as its TTL runs out; `--backend-srv` takes backends from SRV
//! records. `proxy --help` lists every flag with its default; the README describes them.
//!
//! - HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) from clients; HTTP/1.1 to backends over
//!   a bounded pool of kept-alive connections.
//! - Bodies stream both ways, never held whole; a response counts as in flight until its body
//!   has streamed. Trailers pass both ways when the client sends `TE: trailers`.
//! - `Host` is checked (400 when missing, repeated or invalid on HTTP/1.1) and kept; HTTP/2's
//!   `:authority` becomes `Host`; an absolute-form target's authority wins. Hop-by-hop headers
//!   are dropped; `X-Forwarded-For` and `Forwarded` get the client appended;
//!   `X-Forwarded-Proto` and `X-Forwarded-Host` are set (kept only from `--trust-proxy` peers).
//! - WebSocket (any HTTP/1.1 `Upgrade`) is tunnelled to the backend the balancer picks, and
//!   counts as in flight there until the tunnel closes. CONNECT is answered 405.
//! - Timeouts: request head, idle connection, request body pauses, backend connect, backend
//!   response (504, counted against the backend).
//! - A backend that refuses the connection: the request goes to another pick, once. One that
//!   fails 5 requests in a row (or answers 5xx) is ejected for a while; `--health PATH` adds
//!   active health checks. No backend available: 503. Error bodies are generic; the details
//!   are logged (`RUST_LOG`, default `info`).
//! - A client whose request body is malformed, cut short or too slow gets 400 or 408 (or its
//!   connection closed), and the backend is not blamed.
//! - Stats as JSON on a separate admin listener (loopback by default), never on the public one.
//! - SIGTERM or SIGINT (Ctrl-C): stop accepting, finish what is in progress within
//!   `--shutdown-timeout`, then cut the rest; a second signal cuts at once.

mod app;
mod body;
mod cli;
mod forward;
mod server;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use app::Backend;

// A proxy allocates and frees a few small buffers per request (headers, futures, bodies);
// mimalloc's thread-local free lists make that cheaper than the system allocator's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
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

/// Resolves at the first SIGTERM or SIGINT.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Args {
        listen,
        admin_listen,
        mut config,
    } = match parse_args(std::env::args().skip(1)) {
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
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| format!("cannot listen on {addr}: {error}"))
    };
    let (public, admin) = match tokio::try_join!(bind(listen), bind(admin_listen)) {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let (Ok(listen), Ok(admin_listen)) = (public.local_addr(), admin.local_addr()) else {
        eprintln!("error: the listeners have no address");
        return ExitCode::FAILURE;
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
    println!("  stats on http://{admin_listen}{}", config.admin_path);
    println!("try:");
    println!("  curl -s http://{listen}/hello");
    println!("  for i in $(seq 9); do curl -s http://{listen}/; done");
    println!("  curl -s http://{admin_listen}{}", config.admin_path);
    println!(
        "SIGTERM or Ctrl-C stops it (requests in progress get {:?} to finish).",
        config.server.shutdown_timeout
    );

    let lifecycle = app.lifecycle();
    let shutdown = async move {
        signal().await;
        tracing::info!("shutting down: finishing requests in progress");
        // A second signal cuts what is still in progress.
        tokio::spawn(async move {
            signal().await;
            tracing::warn!("second signal: stopping now");
            lifecycle.stop();
        });
    };
    app::serve(app, public, admin, shutdown).await;
    ExitCode::SUCCESS
}
