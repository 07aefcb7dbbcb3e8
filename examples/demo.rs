//! The demo: round-robin over three embedded local backends of different speeds.
//!
//! Run it with `cargo run --release --example demo`. It starts three backends in-process
//! (fast, medium and slow), sends 3,000 requests from 32 concurrent tasks through clones of
//! one `Balance`, samples the live in-flight counts while the load runs, and prints each
//! backend's share, the latency percentiles and the final counters (all in-flight counts back
//! at zero).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_lb::{discover, BalanceLayer, RoundRobin};

const REQUESTS: usize = 3_000;
const CONCURRENCY: usize = 32;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let backends = [("fast", 1u64), ("medium", 3), ("slow", 9)].map(|(name, millis)| {
        let backend = service_fn(move |_request: u64| async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok::<_, Infallible>(name)
        });
        (name, backend)
    });
    let balance = BalanceLayer::new(RoundRobin::new()).layer(discover::fixed(backends));

    println!("tower-lb demo: round-robin over 3 local backends (1 ms, 3 ms, 9 ms)");
    println!("{REQUESTS} requests from {CONCURRENCY} concurrent tasks\n");

    let started = Instant::now();
    let (latencies_tx, mut latencies_rx) = tokio::sync::mpsc::unbounded_channel();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let mut balance = balance.clone();
            let latencies = latencies_tx.clone();
            tokio::spawn(async move {
                for request in (worker..REQUESTS).step_by(CONCURRENCY) {
                    let sent = Instant::now();
                    balance.ready().await?.call(request as u64).await?;
                    let _ = latencies.send(sent.elapsed());
                }
                Ok::<_, BoxError>(())
            })
        })
        .collect();
    drop(latencies_tx);

    // Watch the live in-flight counts while the load runs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let live = balance.stats();
    println!("in flight after 100 ms (all clones together):");
    for endpoint in &live.endpoints {
        println!("  {:<7} {:>3}", endpoint.key, endpoint.in_flight);
    }

    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed();
    let mut latencies = Vec::with_capacity(REQUESTS);
    while let Some(latency) = latencies_rx.recv().await {
        latencies.push(latency);
    }
    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];

    let stats = balance.stats();
    println!("\nbackend   share   picks  in-flight  failures");
    for endpoint in &stats.endpoints {
        println!(
            "{:<7} {:>6.1}% {:>7} {:>10} {:>9}",
            endpoint.key,
            100.0 * endpoint.picks as f64 / stats.picks() as f64,
            endpoint.picks,
            endpoint.in_flight,
            endpoint.failures,
        );
    }
    println!(
        "\n{} requests in {:.2} s ({:.0} req/s); latency p50 {:.1} ms, p99 {:.1} ms",
        stats.picks(),
        elapsed.as_secs_f64(),
        stats.picks() as f64 / elapsed.as_secs_f64(),
        percentile(0.50).as_secs_f64() * 1e3,
        percentile(0.99).as_secs_f64() * 1e3,
    );
    assert_eq!(
        stats.in_flight(),
        0,
        "every request finished, every count is back at zero"
    );
    Ok(())
}
