//! Every public configuration constructor, fuzzed: any number, any duration up to
//! `Duration::MAX`, any string — no panic where the value is given, a typed error naming the
//! setting for what is rejected, and for what is accepted, a balancer that runs without panic.

mod common;

use std::time::Duration;

use common::Echo;
use proptest::prelude::*;
use tower::{Layer, ServiceExt};
use tower_lb::health::{HealthCheckBuilder, OutlierDetection, SlowStart, TcpProbe};
use tower_lb::strategy::{
    ConsistentHash, LeastConnections, PowerOfTwoChoices, Strategy as LbStrategy,
};
use tower_lb::weight::Weight;
use tower_lb::{discover, key::key_fn, BalanceLayer, ConfigError};

fn duration() -> impl proptest::strategy::Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_secs(24 * 60 * 60)),
        (0u64..100_000).prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn float() -> impl proptest::strategy::Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(1.0),
        -10.0..10.0f64,
        any::<f64>(),
    ]
}

/// A rejected value names a setting and says something.
fn named(error: &ConfigError) -> bool {
    !error.setting().is_empty() && error.to_string().len() > error.setting().len()
}

type Key = tower_lb::key::KeyFn<fn(&()) -> Option<&'static [u8]>>;

/// `layer` with a request key, so keyed strategies run too.
fn keyed<St>(layer: BalanceLayer<St>) -> BalanceLayer<St, tower_lb::key::Keyed<Key>> {
    layer.key(key_fn(key as fn(&()) -> Option<&'static [u8]>))
}

/// Runs a few requests through a balancer built from `layer`, with the clock paused: every
/// one is answered, nothing panics.
fn runs<St: LbStrategy + Clone>(layer: BalanceLayer<St, tower_lb::key::Keyed<Key>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let balance = layer.layer(discover::fixed((0..3).map(|i| (i, Echo(i)))));
        for _ in 0..5 {
            let answer = tokio::time::timeout(Duration::from_secs(60), balance.clone().oneshot(()))
                .await
                .expect("answered")
                .expect("an endpoint answers");
            assert!(answer < 3);
        }
    });
}

/// The setting a rejected value names.
fn setting<T>(result: Result<T, ConfigError>) -> &'static str {
    match result {
        Ok(_) => panic!("accepted"),
        Err(error) => error.setting(),
    }
}

fn key(_: &()) -> Option<&'static [u8]> {
    Some(b"key")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn weights(weight: u32) {
        match Weight::new(weight) {
            Ok(w) => prop_assert_eq!(w.get(), weight),
            Err(error) => prop_assert!(named(&error) && (weight == 0 || weight > 1_000_000)),
        }
    }

    #[test]
    fn balancer_settings(
        wait in duration(),
        share in float(),
        abandon in duration(),
        failures: u32,
        base in duration(),
        max in duration(),
        percent: u8,
        window in duration(),
        aggression in float(),
        min_percent: u8,
        seed: u64,
    ) {
        let mut layer = BalanceLayer::new(PowerOfTwoChoices::peak_ewma()).seed(seed);
        let mut accepted = Vec::new();
        match layer.clone().wait_for_endpoints(wait) {
            Ok(next) => { layer = next; accepted.push("wait_for_endpoints") }
            Err(error) => prop_assert!(named(&error)),
        }
        match layer.clone().panic_threshold(share) {
            Ok(next) => { layer = next; accepted.push("panic_threshold") }
            Err(error) => prop_assert!(named(&error)),
        }
        match layer.clone().count_abandoned_after(abandon) {
            Ok(next) => { layer = next; accepted.push("count_abandoned_after") }
            Err(error) => prop_assert!(named(&error)),
        }
        let outlier = OutlierDetection::new()
            .consecutive_failures(failures)
            .base_ejection_time(base)
            .max_ejection_time(max)
            .max_ejected_percent(percent);
        match layer.clone().outlier_detection(outlier) {
            Ok(next) => { layer = next; accepted.push("outlier_detection") }
            Err(error) => prop_assert!(named(&error)),
        }
        let slow = SlowStart::new(window).aggression(aggression).min_weight_percent(min_percent);
        match layer.clone().slow_start(slow) {
            Ok(next) => { layer = next; accepted.push("slow_start") }
            Err(error) => prop_assert!(named(&error)),
        }
        runs(keyed(layer));
    }

    #[test]
    fn strategy_settings(
        decay in duration(),
        rtt in duration(),
        p2c_penalty in float(),
        lc_penalty: u32,
        lc_window in duration(),
        points: u32,
        table: u64,
        factor in float(),
        seed: u64,
    ) {
        let mut p2c = PowerOfTwoChoices::peak_ewma();
        for result in [
            p2c.clone().decay(decay),
            p2c.clone().default_rtt(rtt),
            p2c.clone().error_penalty(p2c_penalty),
        ] {
            match result {
                Ok(next) => p2c = next,
                Err(error) => prop_assert!(named(&error)),
            }
        }
        runs(keyed(BalanceLayer::new(p2c)));

        let mut lc = LeastConnections::weighted();
        for result in [lc.clone().error_penalty(lc_penalty), lc.clone().error_window(lc_window)] {
            match result {
                Ok(next) => lc = next,
                Err(error) => prop_assert!(named(&error)),
            }
        }
        runs(keyed(BalanceLayer::new(lc)));

        for base in [ConsistentHash::ring(), ConsistentHash::maglev(), ConsistentHash::ring_nginx()] {
            let mut hash = base;
            for result in [
                hash.clone().points_per_weight(points),
                // A table as large as accepted takes long to build; keep the run quick.
                hash.clone().table_size(table % 1_000_000),
                hash.clone().bounded_load(factor),
                hash.clone().seed(seed),
            ] {
                match result {
                    Ok(next) => hash = next,
                    Err(error) => prop_assert!(named(&error)),
                }
            }
            // Accepted, however large, without panicking: the build is what costs.
            let _ = ConsistentHash::maglev().table_size(table);
            runs(keyed(BalanceLayer::new(hash)));
        }
    }

    #[test]
    fn health_check_settings(
        interval in duration(),
        jitter in float(),
        timeout in duration(),
        rise: u32,
        fall: u32,
        probes: usize,
    ) {
        let built = HealthCheckBuilder::new()
            .interval(interval)
            .jitter(jitter)
            .timeout(timeout)
            .rise(rise)
            .fall(fall)
            .max_concurrent_probes(probes)
            .build(discover::fixed([(("127.0.0.1:1").parse::<std::net::SocketAddr>().unwrap(), ())]), TcpProbe::new());
        if let Err(error) = built {
            prop_assert!(named(&error));
        }
    }

    #[cfg(feature = "http")]
    #[test]
    fn http_settings(uri in "(https?|ftp)?(://)?[a-z0-9.\\[\\]:]{0,20}(:[0-9a-z]{0,7})?(/[a-z]{0,3})?", name in "\\PC{0,12}") {
        use http_body_util::Empty;
        use hyper::body::Bytes;
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        use tower_lb::http::{CookieKey, HeaderKey, HttpEndpoint, HttpProbe};

        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        match HttpEndpoint::from_uri(&client, &uri) {
            Ok(_) => {
                // An accepted port is a real one.
                let port = endpoint_port(&uri);
                prop_assert!(port.is_none_or(|p| (1..=65535).contains(&p)), "{} accepted", uri);
            }
            Err(error) => prop_assert!(named(&error)),
        }
        for result in [HeaderKey::new(&name).map(|_| ()), CookieKey::new(&name).map(|_| ())] {
            if let Err(error) = result {
                prop_assert!(named(&error));
            }
        }
        if let Err(error) = HttpProbe::<std::net::SocketAddr, Empty<Bytes>>::new(&client, &name) {
            prop_assert!(named(&error));
        }
    }
}

/// The port written after the host in `uri`, if any, as a number.
#[cfg(feature = "http")]
fn endpoint_port(uri: &str) -> Option<u32> {
    let rest = uri.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    if authority.ends_with(']') {
        return None;
    }
    let (_, port) = authority.rsplit_once(':')?;
    port.parse().ok()
}

#[test]
fn the_values_the_issue_named_are_rejected() {
    let layer = BalanceLayer::new(PowerOfTwoChoices::peak_ewma());
    assert_eq!(
        setting(
            layer
                .clone()
                .outlier_detection(OutlierDetection::new().base_ejection_time(Duration::MAX))
        ),
        "base_ejection_time"
    );
    assert_eq!(
        setting(
            layer
                .clone()
                .outlier_detection(OutlierDetection::new().max_ejection_time(Duration::MAX))
        ),
        "max_ejection_time"
    );
    assert_eq!(
        setting(LeastConnections::new().error_penalty(u32::MAX)),
        "error_penalty"
    );
    let probe =
        || discover::fixed([(("127.0.0.1:1").parse::<std::net::SocketAddr>().unwrap(), ())]);
    assert_eq!(
        setting(
            HealthCheckBuilder::new()
                .rise(u32::MAX)
                .build(probe(), TcpProbe::new())
        ),
        "rise"
    );
    assert_eq!(
        setting(
            HealthCheckBuilder::new()
                .fall(u32::MAX)
                .build(probe(), TcpProbe::new())
        ),
        "fall"
    );
    assert_eq!(
        setting(
            HealthCheckBuilder::new()
                .max_concurrent_probes(usize::MAX)
                .build(probe(), TcpProbe::new())
        ),
        "max_concurrent_probes"
    );
    #[cfg(feature = "http")]
    {
        use http_body_util::Empty;
        use hyper::body::Bytes;
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        use tower_lb::http::HttpEndpoint;
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        for uri in [
            "http://127.0.0.1:99999",
            "http://127.0.0.1:65536",
            "http://host:notaport",
            "http://host:0",
        ] {
            assert_eq!(
                setting(HttpEndpoint::from_uri(&client, uri)),
                "endpoint uri",
                "{uri}"
            );
        }
        assert!(HttpEndpoint::from_uri(&client, "http://[::1]:8080").is_ok());
        assert!(HttpEndpoint::from_uri(&client, "http://[::1]").is_ok());
        assert!(HttpEndpoint::from_uri(&client, "https://api.internal").is_ok());
    }
    // A zero wait is allowed and means "fail at once", as documented.
    let zero = BalanceLayer::new(PowerOfTwoChoices::new())
        .wait_for_endpoints(Duration::ZERO)
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (_handle, source) = discover::channel::<u32, Echo>();
        let error = zero.layer(source).oneshot(()).await.unwrap_err();
        assert_eq!(
            error.downcast_ref::<tower_lb::Error>(),
            Some(&tower_lb::Error::NoEndpoints)
        );
    });
    let _ = key_fn(key);
}
