//! Export the balancer's stats through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`).
//!
//! Metrics, each labelled `balancer` (a name you choose) and, per endpoint, `endpoint` (the
//! key's `Debug` form):
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `tower_lb_endpoint_in_flight` | gauge | requests in flight to the endpoint |
//! | `tower_lb_endpoint_picks_total` | counter | requests dispatched to it |
//! | `tower_lb_endpoint_failures_total` | counter | failed requests and readiness checks |
//! | `tower_lb_endpoint_ejections` | gauge | times ejected since its count last started over |
//! | `tower_lb_endpoint_available` | gauge | 1 when it takes new requests, else 0 |
//! | `tower_lb_endpoint_weight` | gauge | its effective weight |
//! | `tower_lb_endpoints` | gauge | endpoints known (listed in stats) |
//! | `tower_lb_endpoints_available` | gauge | endpoints taking new requests |
//! | `tower_lb_panic_mode` | gauge | 1 while in panic mode |
//! | `tower_lb_discovery_errors_total` | counter | errors from the discovery stream |
//!
//! Counters are set to the balancer's own totals (`absolute`), so the export can run at any
//! interval without losing counts.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use tower::service_fn;
//! use tower_lb::{discover, metrics::Exporter, strategy::RoundRobin, Balance};
//!
//! let echo = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
//! let balance = Balance::new(discover::fixed([("a", echo)]), RoundRobin::new());
//! // Every 10 s until the balancer is gone.
//! let task = Exporter::new(balance.handle(), "users-api").every(Duration::from_secs(10)).spawn();
//! # drop(balance);
//! # task.await.unwrap();
//! # }
//! ```

use std::fmt::Debug;
use std::time::Duration;

use metrics::{counter, gauge};
use tokio::task::JoinHandle;

use crate::balance::BalanceHandle;
use crate::stats::{EndpointStatus, Stats};

/// Records one stats snapshot under the label `balancer = name`.
pub fn record<K: Debug>(name: &str, stats: &Stats<K>) {
    let balancer = name.to_owned();
    for endpoint in &stats.endpoints {
        let labels = [
            ("balancer", balancer.clone()),
            ("endpoint", format!("{:?}", endpoint.key)),
        ];
        let available = matches!(
            endpoint.status,
            EndpointStatus::Active | EndpointStatus::SlowStart
        );
        gauge!("tower_lb_endpoint_in_flight", &labels).set(endpoint.in_flight as f64);
        counter!("tower_lb_endpoint_picks_total", &labels).absolute(endpoint.picks);
        counter!("tower_lb_endpoint_failures_total", &labels).absolute(endpoint.failures);
        gauge!("tower_lb_endpoint_ejections", &labels).set(f64::from(endpoint.ejections));
        gauge!("tower_lb_endpoint_available", &labels).set(if available { 1.0 } else { 0.0 });
        gauge!("tower_lb_endpoint_weight", &labels).set(f64::from(endpoint.effective_weight));
    }
    let labels = [("balancer", balancer)];
    gauge!("tower_lb_endpoints", &labels).set(stats.endpoints.len() as f64);
    gauge!("tower_lb_endpoints_available", &labels).set(stats.available() as f64);
    gauge!("tower_lb_panic_mode", &labels).set(if stats.panic_mode { 1.0 } else { 0.0 });
    counter!("tower_lb_discovery_errors_total", &labels).absolute(stats.discovery_errors);
}

/// Records a balancer's stats periodically; see the [module docs](self).
#[derive(Debug)]
pub struct Exporter<K> {
    handle: BalanceHandle<K>,
    name: String,
    every: Duration,
}

impl<K: Debug + Send + 'static> Exporter<K> {
    /// Exports the balancer behind `handle` as `name`, every 10 seconds by default.
    pub fn new(handle: BalanceHandle<K>, name: impl Into<String>) -> Self {
        Self {
            handle,
            name: name.into(),
            every: Duration::from_secs(10),
        }
    }

    /// Sets the interval (at least one millisecond).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every.max(Duration::from_millis(1));
        self
    }

    /// Records once now; returns `false` when the balancer is gone.
    pub fn record_now(&self) -> bool {
        match self.handle.stats() {
            Ok(stats) => {
                record(&self.name, &stats);
                true
            }
            Err(_) => false,
        }
    }

    /// Records now and then at every interval on the current tokio runtime, until the
    /// balancer is gone.
    pub fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(self.every);
            loop {
                ticks.tick().await;
                if !self.record_now() {
                    return;
                }
            }
        })
    }
}
