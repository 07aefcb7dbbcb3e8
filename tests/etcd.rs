//! `discover::etcd` against a real etcd on loopback (see `etcd/server.rs`): puts and deletes
//! reach a live balancer, leases expire, a restart and a compaction lose nothing, bad values
//! are skipped, and an etcd that is down at start means a bounded `NoEndpoints`.
#![cfg(feature = "etcd")]

#[path = "etcd/server.rs"]
mod etcd_server;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tower::discover::Change;
use tower::{Layer, ServiceExt};
use tower_lb::discover::etcd::{register, watch, EtcdError, EtcdWatch};
use tower_lb::discover::{self, Target};
use tower_lb::strategy::RoundRobin;
use tower_lb::weight::{Weight, Weighted};
use tower_lb::{Balance, BalanceLayer, Error};

use etcd_server::EtcdServer;

/// Every test is bounded: a hang fails the test instead of stalling the suite.
async fn within_limit<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test finished within 60 s")
}

/// An endpoint service that answers with its address.
#[derive(Clone, Debug)]
struct Echo {
    addr: SocketAddr,
}

impl tower::Service<()> for Echo {
    type Response = SocketAddr;
    type Error = Infallible;
    type Future = std::future::Ready<Result<SocketAddr, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        std::future::ready(Ok(self.addr))
    }
}

/// The endpoint for a target, carrying the registered weight.
fn echo(target: Target) -> Weighted<Echo> {
    Weighted::new(
        Echo {
            addr: target.addr(),
        },
        target.weight(),
    )
}

/// The weighted layer unwraps `Weighted`: the balancer holds the `Echo`s.
type EchoBalance = Balance<SocketAddr, Echo, RoundRobin>;

fn balance_over(source: EtcdWatch) -> EchoBalance {
    BalanceLayer::new(RoundRobin::new())
        .weighted()
        .layer(discover::connect(
            source,
            echo as fn(Target) -> Weighted<Echo>,
        ))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Waits until `done` holds of the balancer's stats, at most `limit`; returns how long it
/// took.
async fn until(
    balance: &EchoBalance,
    limit: Duration,
    what: &str,
    done: impl Fn(&tower_lb::Stats<SocketAddr>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if done(&balance.stats()) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; stats: {:?}",
            balance.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn weight_of(stats: &tower_lb::Stats<SocketAddr>, key: &str) -> Option<u32> {
    stats.get(&addr(key)).map(|e| e.weight)
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn puts_and_deletes_reach_a_live_balance_within_a_second() {
    within_limit(async {
        let server = EtcdServer::start().await;
        let mut client = server.client().await;
        let balance = balance_over(watch(client.clone(), "echo").unwrap());

        client.put("echo/a", "127.0.0.1:7001", None).await.unwrap();
        until(&balance, SECOND, "a plain host:port", |s| {
            weight_of(s, "127.0.0.1:7001") == Some(1)
        })
        .await;

        // gRPC-Go's naming JSON, with a weight in the metadata.
        client
            .put(
                "echo/b",
                r#"{"Addr":"127.0.0.1:7002","Metadata":{"weight":3}}"#,
                None,
            )
            .await
            .unwrap();
        until(&balance, SECOND, "a weighted JSON value", |s| {
            weight_of(s, "127.0.0.1:7002") == Some(3)
        })
        .await;
        assert_eq!(
            balance.clone().oneshot(()).await.unwrap().port() / 1000,
            7,
            "it serves"
        );

        // A new weight for a known key: re-inserted with it, counters kept.
        let picks_before = balance.stats().get(&addr("127.0.0.1:7001")).unwrap().picks;
        client
            .put(
                "echo/a",
                r#"{"Addr":"127.0.0.1:7001","Metadata":{"weight":5}}"#,
                None,
            )
            .await
            .unwrap();
        until(&balance, SECOND, "a reweighted key", |s| {
            weight_of(s, "127.0.0.1:7001") == Some(5)
        })
        .await;
        assert_eq!(
            balance.stats().get(&addr("127.0.0.1:7001")).unwrap().picks,
            picks_before
        );

        client.delete("echo/a", None).await.unwrap();
        until(&balance, SECOND, "a deleted key", |s| {
            s.get(&addr("127.0.0.1:7001")).is_none()
        })
        .await;

        // Keys outside the prefix (`echo/` — not `echo2/`) are not endpoints.
        client.put("echo2/x", "127.0.0.1:7009", None).await.unwrap();
        client.put("echo/c", "127.0.0.1:7003", None).await.unwrap();
        until(&balance, SECOND, "the key after", |s| {
            s.get(&addr("127.0.0.1:7003")).is_some()
        })
        .await;
        let stats = balance.stats();
        assert!(stats.get(&addr("127.0.0.1:7009")).is_none());
        assert_eq!(stats.endpoints.len(), 2);
        assert_eq!(stats.discovery_errors, 0);
    })
    .await;
}

#[tokio::test]
async fn a_registered_server_that_dies_disappears_when_its_lease_expires() {
    within_limit(async {
        let server = EtcdServer::start().await;
        let client = server.client().await;
        let balance = balance_over(watch(client.clone(), "echo").unwrap());
        let ttl = Duration::from_secs(2);

        let registration = register(client.clone(), "echo", "127.0.0.1:7101")
            .unwrap()
            .ttl(ttl)
            .unwrap()
            .weight(Weight::new(2).unwrap())
            .start()
            .await
            .unwrap();
        assert_eq!(registration.key(), "echo/127.0.0.1:7101");
        until(&balance, SECOND, "registered", |s| {
            weight_of(s, "127.0.0.1:7101") == Some(2)
        })
        .await;

        // Kept alive past its TTL.
        tokio::time::sleep(ttl + ttl / 2).await;
        assert!(
            balance.stats().get(&addr("127.0.0.1:7101")).is_some(),
            "renewed"
        );

        // The process dies: no more renewals, no deregistration.
        drop(registration);
        let gone = until(&balance, ttl + 2 * SECOND, "expired", |s| {
            s.get(&addr("127.0.0.1:7101")).is_none()
        })
        .await;
        assert!(gone > ttl / 4, "gone by expiry, not at once: {gone:?}");
    })
    .await;
}

#[tokio::test]
async fn shutdown_deregisters_at_once() {
    within_limit(async {
        let server = EtcdServer::start().await;
        let client = server.client().await;
        let balance = balance_over(watch(client.clone(), "echo").unwrap());
        let registration = register(client.clone(), "echo", "127.0.0.1:7201")
            .unwrap()
            .start()
            .await
            .unwrap();
        until(&balance, SECOND, "registered", |s| {
            s.get(&addr("127.0.0.1:7201")).is_some()
        })
        .await;

        registration.shutdown().await.unwrap();
        // Well before the default 10 s lease would expire.
        until(&balance, SECOND, "deregistered", |s| {
            s.get(&addr("127.0.0.1:7201")).is_none()
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_lost_lease_is_granted_again_and_the_entry_written_again() {
    within_limit(async {
        let server = EtcdServer::start().await;
        let mut client = server.client().await;
        let balance = balance_over(watch(client.clone(), "echo").unwrap());
        let registration = register(client.clone(), "echo", "127.0.0.1:7301")
            .unwrap()
            .ttl(Duration::from_secs(3))
            .unwrap()
            .start()
            .await
            .unwrap();
        until(&balance, SECOND, "registered", |s| {
            s.get(&addr("127.0.0.1:7301")).is_some()
        })
        .await;

        // Someone revokes the lease (or it expired while etcd was unreachable): the entry goes.
        let lease = registration.lease_id();
        client.lease_revoke(lease).await.unwrap();
        until(&balance, SECOND, "revoked", |s| {
            s.get(&addr("127.0.0.1:7301")).is_none()
        })
        .await;

        // The next renewal finds the lease gone and registers again under a new one.
        until(&balance, 4 * SECOND, "registered again", |s| {
            s.get(&addr("127.0.0.1:7301")).is_some()
        })
        .await;
        assert_ne!(registration.lease_id(), lease);
        registration.shutdown().await.unwrap();
    })
    .await;
}

type Item = Result<Change<SocketAddr, Target>, EtcdError>;

/// The next `n` changes from the stream as `+addr/weight` or `-addr`, and the errors before
/// them.
async fn changes(
    stream: &mut (impl Stream<Item = Item> + Unpin),
    n: usize,
) -> (Vec<String>, Vec<EtcdError>) {
    let mut changes = Vec::new();
    let mut errors = Vec::new();
    while changes.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("a change within 15 s")
            .expect("the stream never ends");
        match item {
            Ok(Change::Insert(key, target)) => {
                assert_eq!(key, target.addr());
                changes.push(format!("+{key}/{}", target.weight()));
            }
            Ok(Change::Remove(key)) => changes.push(format!("-{key}")),
            Err(error) => errors.push(error),
        }
    }
    (changes, errors)
}

/// Writes a fresh key and checks that its insert is the very next item: nothing else was
/// pending.
async fn assert_nothing_pending(
    client: &mut etcd_client::Client,
    stream: &mut (impl Stream<Item = Item> + Unpin),
) {
    client
        .put("echo/sentinel", "127.0.0.1:7999", None)
        .await
        .unwrap();
    let (changes, errors) = changes(stream, 1).await;
    assert_eq!(changes, ["+127.0.0.1:7999/1"], "no change was pending");
    assert!(errors.is_empty(), "{errors:?}");
    client.delete("echo/sentinel", None).await.unwrap();
    assert_eq!(self::changes(stream, 1).await.0, ["-127.0.0.1:7999"]);
}

#[tokio::test]
async fn after_an_etcd_restart_the_watch_resumes_with_nothing_lost() {
    within_limit(async {
        let mut server = EtcdServer::start().await;
        let mut client = server.client().await;
        client.put("echo/a", "127.0.0.1:7401", None).await.unwrap();
        client.put("echo/b", "127.0.0.1:7402", None).await.unwrap();
        let mut stream = watch(client.clone(), "echo")
            .unwrap()
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .unwrap();
        assert_eq!(
            changes(&mut stream, 2).await.0,
            ["+127.0.0.1:7401/1", "+127.0.0.1:7402/1"]
        );
        assert_nothing_pending(&mut client, &mut stream).await;

        server.kill();
        // The watch fails...
        let failure = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            failure.is_err(),
            "the lost connection is reported: {failure:?}"
        );
        // ...and while the watcher is away (it is not polled), etcd comes back and changes.
        server.run().await;
        client.delete("echo/a", None).await.unwrap();
        client.put("echo/c", "127.0.0.1:7403", None).await.unwrap();

        let (resumed, errors) = changes(&mut stream, 2).await;
        assert_eq!(
            resumed,
            ["-127.0.0.1:7401", "+127.0.0.1:7403/1"],
            "errors meanwhile: {errors:?}"
        );
        // 7402 was never re-announced, nor anything else.
        assert_nothing_pending(&mut client, &mut stream).await;
    })
    .await;
}

#[tokio::test]
async fn a_compaction_forces_a_relist_that_yields_only_the_difference() {
    within_limit(async {
        let mut server = EtcdServer::start().await;
        let mut client = server.client().await;
        for (key, port) in [("a", 7501), ("b", 7502), ("c", 7503)] {
            client
                .put(format!("echo/{key}"), format!("127.0.0.1:{port}"), None)
                .await
                .unwrap();
        }
        let mut stream = watch(client.clone(), "echo")
            .unwrap()
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .unwrap();
        assert_eq!(changes(&mut stream, 3).await.0.len(), 3);
        assert_nothing_pending(&mut client, &mut stream).await;

        // While the watcher is cut off: a is deleted, b reweighted, d added, e added and
        // removed again; then etcd compacts the history the watch would resume from.
        server.kill();
        let failure = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert!(failure.is_err());
        server.run().await;
        client.delete("echo/a", None).await.unwrap();
        client
            .put(
                "echo/b",
                r#"{"Addr":"127.0.0.1:7502","Metadata":{"weight":4}}"#,
                None,
            )
            .await
            .unwrap();
        client.put("echo/d", "127.0.0.1:7504", None).await.unwrap();
        client.put("echo/e", "127.0.0.1:7505", None).await.unwrap();
        client.delete("echo/e", None).await.unwrap();
        let revision = client
            .get("echo/", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        client.compact(revision, None).await.unwrap();

        let (relisted, _errors) = changes(&mut stream, 3).await;
        assert_eq!(
            relisted,
            ["-127.0.0.1:7501", "+127.0.0.1:7502/4", "+127.0.0.1:7504/1"]
        );
        // c was in both lists: nothing for it; e came and went: nothing.
        assert_nothing_pending(&mut client, &mut stream).await;
    })
    .await;
}

#[tokio::test]
async fn malformed_values_are_skipped_counted_and_the_watch_goes_on() {
    within_limit(async {
        let server = EtcdServer::start().await;
        let mut client = server.client().await;
        let balance = balance_over(watch(client.clone(), "echo").unwrap());
        client
            .put(
                "echo/a",
                r#"{"Addr":"127.0.0.1:7601","Metadata":{"weight":2}}"#,
                None,
            )
            .await
            .unwrap();
        until(&balance, SECOND, "a", |s| {
            weight_of(s, "127.0.0.1:7601") == Some(2)
        })
        .await;

        client.put("echo/no-port", "127.0.0.1", None).await.unwrap();
        client
            .put("echo/not-json", "{\"Addr\": ", None)
            .await
            .unwrap();
        client
            .put(
                "echo/zero-weight",
                r#"{"Addr":"127.0.0.1:7602","Metadata":{"weight":0}}"#,
                None,
            )
            .await
            .unwrap();
        client
            .put("echo/binary", vec![0xff, 0xfe, 0x00], None)
            .await
            .unwrap();
        // A known key overwritten with garbage keeps its endpoint.
        client.put("echo/a", "garbage", None).await.unwrap();
        client.put("echo/b", "127.0.0.1:7603", None).await.unwrap();

        until(&balance, SECOND, "b, after the bad values", |s| {
            s.get(&addr("127.0.0.1:7603")).is_some()
        })
        .await;
        let stats = balance.stats();
        assert_eq!(stats.discovery_errors, 5, "each bad value is counted");
        assert_eq!(
            weight_of(&stats, "127.0.0.1:7601"),
            Some(2),
            "a kept its endpoint"
        );
        assert_eq!(stats.endpoints.len(), 2);
        assert_eq!(
            balance.clone().oneshot(()).await.unwrap().ip(),
            addr("127.0.0.1:1").ip()
        );
    })
    .await;
}

#[tokio::test]
async fn host_names_are_resolved_and_kept_as_the_authority() {
    within_limit(async {
        let server = EtcdServer::start().await;
        let mut client = server.client().await;
        client
            .put("echo/named", "localhost:7701", None)
            .await
            .unwrap();
        let mut stream = watch(client.clone(), "echo").unwrap();
        let item = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap()
            .unwrap();
        let Ok(Change::Insert(key, target)) = item else {
            panic!("an insert: {item:?}");
        };
        assert!(key.ip().is_loopback() && key.port() == 7701, "{key}");
        assert_eq!(target.authority(), Some("localhost:7701"));

        client
            .put("echo/nowhere", "no-such-host.invalid:80", None)
            .await
            .unwrap();
        let item = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(item, Err(EtcdError::Unresolved { .. })),
            "{item:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_etcd_down_at_start_means_no_endpoints_within_the_wait_then_endpoints_arrive() {
    within_limit(async {
        let mut server = EtcdServer::reserve();
        let client = server.client().await;
        let source = watch(client, "echo")
            .unwrap()
            .backoff(Duration::from_millis(50), Duration::from_millis(400))
            .unwrap();
        let balance = BalanceLayer::new(RoundRobin::new())
            .weighted()
            .wait_for_endpoints(Duration::from_millis(300))
            .unwrap()
            .layer(discover::connect(
                source,
                echo as fn(Target) -> Weighted<Echo>,
            ));

        let started = Instant::now();
        let err = balance.clone().oneshot(()).await.unwrap_err();
        assert_eq!(err.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
        assert!(
            started.elapsed() < 5 * SECOND,
            "bounded: {:?}",
            started.elapsed()
        );
        assert!(
            balance.stats().discovery_errors >= 1,
            "the failures are counted"
        );

        server.run().await;
        server
            .client()
            .await
            .put("echo/a", "127.0.0.1:7801", None)
            .await
            .unwrap();
        until(&balance, 3 * SECOND, "etcd came up", |s| {
            s.get(&addr("127.0.0.1:7801")).is_some()
        })
        .await;
        assert_eq!(
            balance.clone().oneshot(()).await.unwrap(),
            addr("127.0.0.1:7801")
        );
    })
    .await;
}

#[tokio::test]
async fn bad_settings_are_rejected_where_they_are_given() {
    // etcd-client connects lazily: no server is needed to build these.
    let client = etcd_client::Client::connect(["http://127.0.0.1:1"], None)
        .await
        .unwrap();
    let setting =
        |result: Result<_, tower_lb::ConfigError>| result.map(drop).unwrap_err().setting();
    assert_eq!(setting(watch(client.clone(), "").map(drop)), "service");
    assert_eq!(setting(watch(client.clone(), "/").map(drop)), "service");
    assert_eq!(
        setting(
            watch(client.clone(), "echo")
                .unwrap()
                .backoff(Duration::ZERO, SECOND)
                .map(drop)
        ),
        "backoff"
    );
    assert_eq!(
        setting(
            watch(client.clone(), "echo")
                .unwrap()
                .backoff(SECOND, Duration::from_millis(1))
                .map(drop)
        ),
        "backoff"
    );
    assert_eq!(
        setting(
            watch(client.clone(), "echo")
                .unwrap()
                .request_timeout(Duration::ZERO)
                .map(drop)
        ),
        "request_timeout"
    );
    assert_eq!(
        setting(register(client.clone(), "", "127.0.0.1:80").map(drop)),
        "service"
    );
    for addr in [
        "127.0.0.1",
        "127.0.0.1:0",
        "not a host:80",
        "{\"Addr\":\"127.0.0.1:80\"}",
        "",
    ] {
        assert_eq!(
            setting(register(client.clone(), "echo", addr).map(drop)),
            "addr",
            "{addr:?}"
        );
    }
    let registration = || register(client.clone(), "echo", "127.0.0.1:80").unwrap();
    assert_eq!(setting(registration().ttl(Duration::ZERO).map(drop)), "ttl");
    assert_eq!(
        setting(registration().ttl(Duration::from_millis(1500)).map(drop)),
        "ttl"
    );
    assert_eq!(registration().key(), "echo/127.0.0.1:80");
    // A trailing slash on the service is the same service.
    assert_eq!(
        register(client.clone(), "echo/", "127.0.0.1:80")
            .unwrap()
            .key(),
        "echo/127.0.0.1:80"
    );
}
