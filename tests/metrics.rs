//! The `metrics` exporter records the balancer's counters under the documented names.
#![cfg(feature = "metrics")]

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{service_fn, ServiceExt};
use tower_lb::metrics::Exporter;
use tower_lb::{discover, strategy::RoundRobin, Balance};

#[test]
fn exported_values_match_the_stats() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let echo = service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
            let balance = Balance::new(
                discover::fixed([("a", echo), ("b", echo)]),
                RoundRobin::new(),
            );
            for _ in 0..5 {
                balance.clone().oneshot(()).await.unwrap();
            }
            let exporter = Exporter::new(balance.handle(), "test");
            assert!(exporter.record_now());
            drop(balance);
            assert!(!exporter.record_now(), "a gone balancer stops the export");
        });
    });
    let snapshot = snapshotter.snapshot().into_hashmap();
    let value = |name: &str, endpoint: Option<&str>| {
        snapshot
            .iter()
            .find(|(key, _)| {
                key.key().name() == name
                    && endpoint.is_none_or(|e| {
                        key.key()
                            .labels()
                            .any(|l| l.key() == "endpoint" && l.value() == e)
                    })
            })
            .map(|(_, (_, _, value))| value)
    };
    let picks = |e| match value("tower_lb_endpoint_picks_total", Some(e)) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{other:?}"),
    };
    assert_eq!(picks("\"a\"") + picks("\"b\""), 5);
    assert!(
        matches!(value("tower_lb_endpoints_available", None), Some(DebugValue::Gauge(g)) if g.into_inner() == 2.0)
    );
    assert!(
        matches!(value("tower_lb_endpoint_in_flight", Some("\"a\"")), Some(DebugValue::Gauge(g)) if g.into_inner() == 0.0)
    );
}
