//! The demo: every strategy over the same local HTTP backends.
//!
//! `cargo run --release --example demo` starts four HTTP backends on loopback that differ in
//! speed and capacity (a capacity is a number of requests served at once; more queue), sends
//! the same workload through a tower-lb balancer with each strategy in turn, prints a table
//! (share per backend, p50/p99 latency, errors) and writes an SVG chart comparing the
//! strategies.
//!
//! Flags:
//! - `--strategies a,b,...`  which strategies to run (default: all; `--list` names them)
//! - `--requests N`          requests per strategy (default 3000)
//! - `--concurrency N`       concurrent clients (default 48)
//! - `--chart PATH`          where to write the chart (default `target/demo.svg`)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_lb::strategy::{BoxStrategy, LeastTime, PowerOfTwoChoices};
use tower_lb::{
    discover,
    key::key_fn,
    strategy::{ConsistentHash, LeastConnections, Random, RoundRobin, WeightedRoundRobin},
    weight::{Weight, Weighted},
    BalanceLayer,
};

/// A backend: how long a request takes, how many it serves at once, and its weight.
struct BackendSpec {
    name: &'static str,
    service_time: Duration,
    capacity: usize,
}

const BACKENDS: [BackendSpec; 4] = [
    BackendSpec {
        name: "big",
        service_time: Duration::from_millis(4),
        capacity: 16,
    },
    BackendSpec {
        name: "medium",
        service_time: Duration::from_millis(4),
        capacity: 8,
    },
    BackendSpec {
        name: "small",
        service_time: Duration::from_millis(4),
        capacity: 4,
    },
    BackendSpec {
        name: "slow",
        service_time: Duration::from_millis(20),
        capacity: 4,
    },
];

/// The strategies, by name: (name, strategy, description).
fn strategies() -> Vec<(&'static str, BoxStrategy, &'static str)> {
    vec![
        (
            "round-robin",
            BoxStrategy::new(RoundRobin::new()),
            "each in turn",
        ),
        (
            "weighted-rr",
            BoxStrategy::new(WeightedRoundRobin::new()),
            "smooth, by capacity",
        ),
        ("random", BoxStrategy::new(Random::new()), "uniform"),
        (
            "random-weighted",
            BoxStrategy::new(Random::weighted()),
            "by capacity",
        ),
        (
            "least-conn",
            BoxStrategy::new(LeastConnections::new()),
            "fewest in flight",
        ),
        (
            "least-conn-w",
            BoxStrategy::new(LeastConnections::weighted()),
            "fewest in flight per weight",
        ),
        (
            "p2c",
            BoxStrategy::new(PowerOfTwoChoices::new()),
            "2 choices, in-flight",
        ),
        (
            "p2c-peak-ewma",
            BoxStrategy::new(PowerOfTwoChoices::peak_ewma()),
            "2 choices, latency",
        ),
        (
            "least-time",
            BoxStrategy::new(LeastTime::new()),
            "least conn., latency (default)",
        ),
        (
            "maglev",
            BoxStrategy::new(ConsistentHash::maglev()),
            "hash of a user id",
        ),
        (
            "maglev-bounded",
            BoxStrategy::new(
                ConsistentHash::maglev()
                    .bounded_load(1.25)
                    .expect("1.25 is a valid factor"),
            ),
            "hash, bounded loads 1.25",
        ),
    ]
}

struct Args {
    strategies: Option<Vec<String>>,
    requests: usize,
    concurrency: usize,
    chart: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        strategies: None,
        requests: 3000,
        concurrency: 48,
        chart: "target/demo.svg".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--strategies" => {
                args.strategies = Some(value()?.split(',').map(str::to_owned).collect());
            }
            "--requests" => {
                args.requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?
            }
            "--concurrency" => {
                args.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--chart" => args.chart = value()?,
            "--list" => {
                for (name, _, what) in strategies() {
                    println!("{name:<16} {what}");
                }
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown flag {other:?} (see the doc comment at the top of examples/demo.rs)"
                ))
            }
        }
    }
    if args.requests == 0 || args.concurrency == 0 {
        return Err("--requests and --concurrency must be at least 1".into());
    }
    Ok(args)
}

/// Starts one backend on loopback: it serves `capacity` requests at once, each taking
/// `service_time`, and queues the rest.
async fn start_backend(spec: &BackendSpec) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let workers = Arc::new(Semaphore::new(spec.capacity));
    let (name, service_time) = (spec.name, spec.service_time);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let workers = workers.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_: Request<hyper::body::Incoming>| {
                        let workers = workers.clone();
                        async move {
                            let _worker = workers.acquire().await.expect("never closed");
                            tokio::time::sleep(service_time).await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// An endpoint service: sends the request to `addr` over the shared pooled client.
fn endpoint(
    client: &HttpClient,
    addr: SocketAddr,
) -> impl Service<
    Request<Empty<Bytes>>,
    Response = Response<hyper::body::Incoming>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send {
    let client = client.clone();
    tower::service_fn(move |mut request: Request<Empty<Bytes>>| {
        let uri = format!("http://{addr}{}", request.uri().path());
        *request.uri_mut() = uri.parse::<Uri>().expect("a valid uri");
        let response = client.request(request);
        async move { response.await.map_err(BoxError::from) }
    })
}

/// What one strategy's run measured.
struct Outcome {
    name: &'static str,
    shares: BTreeMap<&'static str, u64>,
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
}

impl Outcome {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize]
    }
}

async fn run(
    name: &'static str,
    strategy: BoxStrategy,
    backends: &[(SocketAddr, &'static BackendSpec)],
    client: &HttpClient,
    args: &Args,
) -> Outcome {
    let endpoints: Vec<_> = backends
        .iter()
        .map(|(addr, spec)| {
            let weight = Weight::new(spec.capacity as u32).expect("capacities are valid weights");
            (spec.name, Weighted::new(endpoint(client, *addr), weight))
        })
        .collect();
    // Keyed strategies hash a user id carried in the path; others ignore it.
    let balance = BalanceLayer::new(strategy)
        .weighted()
        .key(key_fn(|request: &Request<Empty<Bytes>>| {
            request
                .uri()
                .path()
                .strip_prefix("/user/")
                .map(str::to_owned)
        }))
        .layer(discover::fixed(endpoints));

    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<_> = (0..args.concurrency)
        .map(|client| {
            let mut balance = balance.clone();
            let tx = tx.clone();
            let (requests, concurrency) = (args.requests, args.concurrency);
            tokio::spawn(async move {
                for n in (client..requests).step_by(concurrency) {
                    let user = n * 7919 % 1000;
                    let request = Request::get(format!("/user/{user}"))
                        .body(Empty::new())
                        .expect("a request");
                    let sent = Instant::now();
                    let outcome = async {
                        let response = balance.ready().await?.call(request).await?;
                        response.into_body().collect().await.map_err(BoxError::from)
                    }
                    .await;
                    let _ = tx.send(outcome.map(|_| sent.elapsed()));
                }
            })
        })
        .collect();
    drop(tx);
    for client in clients {
        client.await.expect("client task");
    }
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(outcome) = rx.recv().await {
        match outcome {
            Ok(latency) => latencies.push(latency),
            Err(_) => errors += 1,
        }
    }
    latencies.sort_unstable();
    let stats = balance.stats();
    assert_eq!(stats.in_flight(), 0, "every request finished");
    let shares = stats.endpoints.iter().map(|e| (e.key, e.picks)).collect();
    Outcome {
        name,
        shares,
        latencies,
        errors,
        elapsed,
    }
}

fn print_table(outcomes: &[Outcome]) {
    print!("{:<16}", "strategy");
    for spec in &BACKENDS {
        print!(" {:>7}", spec.name);
    }
    println!(
        " {:>8} {:>8} {:>7} {:>8}",
        "p50 ms", "p99 ms", "errors", "req/s"
    );
    for outcome in outcomes {
        let total: u64 = outcome.shares.values().sum::<u64>().max(1);
        print!("{:<16}", outcome.name);
        for spec in &BACKENDS {
            let picks = outcome.shares.get(spec.name).copied().unwrap_or(0);
            print!(" {:>6.1}%", 100.0 * picks as f64 / total as f64);
        }
        println!(
            " {:>8.1} {:>8.1} {:>7} {:>8.0}",
            outcome.percentile(0.5).as_secs_f64() * 1e3,
            outcome.percentile(0.99).as_secs_f64() * 1e3,
            outcome.errors,
            outcome.latencies.len() as f64 / outcome.elapsed.as_secs_f64(),
        );
    }
}

/// A bar chart of p50 and p99 per strategy, as SVG.
fn chart(outcomes: &[Outcome]) -> String {
    let (width, row, left) = (760.0, 34.0, 150.0);
    let height = 70.0 + row * outcomes.len() as f64;
    let max = outcomes
        .iter()
        .map(|o| o.percentile(0.99).as_secs_f64() * 1e3)
        .fold(1.0, f64::max);
    let scale = (width - left - 80.0) / max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"16\">tower-lb: latency by strategy (p50 dark, p99 light), ms</text>\n"
    );
    for (i, outcome) in outcomes.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let p50 = outcome.percentile(0.5).as_secs_f64() * 1e3;
        let p99 = outcome.percentile(0.99).as_secs_f64() * 1e3;
        svg += &format!(
            "<text x=\"10\" y=\"{:.0}\">{}</text>\n\
             <rect x=\"{left}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"24\" fill=\"#9ecae1\"/>\n\
             <rect x=\"{left}\" y=\"{:.0}\" width=\"{:.1}\" height=\"12\" fill=\"#3182bd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.0}\">{p50:.1} / {p99:.1}</text>\n",
            y + 17.0,
            outcome.name,
            p99 * scale,
            y + 6.0,
            p50 * scale,
            left + p99 * scale + 6.0,
            y + 17.0,
        );
    }
    svg + "</svg>\n"
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args().map_err(BoxError::from)?;
    let mut chosen = Vec::new();
    let all = strategies();
    match &args.strategies {
        None => chosen.extend(all),
        Some(names) => {
            for name in names {
                let index = all.iter().position(|(n, _, _)| n == name).ok_or_else(|| {
                    let known: Vec<_> = strategies().iter().map(|(n, _, _)| *n).collect();
                    format!("unknown strategy {name:?}; known: {}", known.join(", "))
                })?;
                let (n, s, d) = strategies().swap_remove(index);
                chosen.push((n, s, d));
            }
        }
    }

    let mut backends = Vec::new();
    for spec in &BACKENDS {
        backends.push((start_backend(spec).await, spec));
    }
    println!(
        "tower-lb demo: {} requests from {} concurrent clients per strategy",
        args.requests, args.concurrency
    );
    println!("backends (weight = capacity):");
    for (addr, spec) in &backends {
        println!(
            "  {:<7} {addr}  {:>2} ms per request, {:>2} at once",
            spec.name,
            spec.service_time.as_millis(),
            spec.capacity
        );
    }
    println!();

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut outcomes = Vec::new();
    for (name, strategy, _) in chosen {
        outcomes.push(run(name, strategy, &backends, &client, &args).await);
    }
    print_table(&outcomes);

    if let Some(dir) = std::path::Path::new(&args.chart).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.chart, chart(&outcomes))?;
    println!("\nchart written to {}", args.chart);
    Ok(())
}
