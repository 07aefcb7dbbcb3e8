//! DNS discovery against a real DNS server: dnsmasq on loopback (see `common/dnsmasq.rs`),
//! changed while it runs, stopped and started again; endpoints on loopback addresses
//! (127.0.0.2, 127.0.0.3, …, all local on Linux).
#![cfg(all(feature = "dns", feature = "http"))]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::dnsmasq::Dnsmasq;
use common::servers::{listeners_on_one_port, serve_on, Protocol};
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::{timeout, Instant};
use tower::discover::Change;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_lb::discover::{self, Target};
use tower_lb::discover::{dns::Dns, dns::DnsBuilder, dns::DnsErrorKind};
use tower_lb::http::MakeHttpEndpoint;
use tower_lb::{
    strategy::{RoundRobin, WeightedRoundRobin},
    BalanceLayer, EndpointStatus, Error, Stats,
};

/// Any single wait longer than this fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `check` every 10 ms until it holds (bounded by [`STEP`]); returns how long it took.
/// Real time: what it waits for is a real dnsmasq answering over real sockets.
async fn until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    start.elapsed()
}

/// A `DnsBuilder` asking `server`, with a 1 s floor, quick retries, and a 500 ms timeout (a
/// stopped server is not answered by "connection refused": its queries time out).
fn asking(server: &Dnsmasq) -> DnsBuilder {
    DnsBuilder::new()
        .nameserver(server.addr())
        .ttl_floor(Duration::from_secs(1))
        .unwrap()
        .backoff(Duration::from_millis(100), Duration::from_millis(400))
        .unwrap()
        .timeout(Duration::from_millis(500))
        .unwrap()
}

/// The addresses a balancer can pick now.
fn available<K: Copy + Ord>(stats: &Stats<K>) -> Vec<K> {
    let mut keys: Vec<K> = stats
        .endpoints
        .iter()
        .filter(|e| e.status == EndpointStatus::Active)
        .map(|e| e.key)
        .collect();
    keys.sort();
    keys
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = list.iter().map(|a| a.parse().unwrap()).collect();
    addrs.sort();
    addrs
}

/// An endpoint service that answers the address it was made for.
fn answering(
    target: Target,
) -> tower_lb::weight::Weighted<
    impl Service<(), Response = SocketAddr, Error = Infallible, Future = impl Send> + Clone,
> {
    let addr = target.addr();
    let service = service_fn(move |_: ()| async move { Ok::<_, Infallible>(addr) });
    tower_lb::weight::Weighted::new(service, target.weight())
}

/// HTTP backends on 127.0.0.2, .3, .4 … on one port (A records carry no port), each
/// answering `{local address} {Host}`.
async fn backends(count: u8) -> (u16, Vec<SocketAddr>) {
    let (port, listeners) = listeners_on_one_port(count).await;
    let mut addrs = Vec::new();
    for listener in listeners {
        let local = listener.local_addr().unwrap();
        addrs.push(local);
        serve_on(
            listener,
            Protocol::Http1,
            move |request: Request<Incoming>| {
                let host = request
                    .headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_owned());
                let body = format!("{local} {}", host.unwrap_or_default());
                async move { Response::new(Full::new(Bytes::from(body))) }
            },
        );
    }
    (port, addrs)
}

/// The first changes `dns` yields (errors skipped) until `count` endpoints are in.
async fn first_set(dns: &mut Dns, count: usize) -> Vec<Target> {
    let mut targets = HashMap::new();
    within("the first answer", async {
        while targets.len() < count {
            match dns.next().await.unwrap() {
                Ok(Change::Insert(addr, target)) => {
                    targets.insert(addr, target);
                }
                Ok(Change::Remove(addr)) => {
                    targets.remove(&addr);
                }
                Err(error) => panic!("{error}"),
            }
        }
    })
    .await;
    let mut targets: Vec<Target> = targets.into_values().collect();
    targets.sort_by_key(Target::addr);
    targets
}

#[tokio::test]
async fn the_first_set_is_every_address_of_the_names_presented_by_name() {
    let server = Dnsmasq::start(
        60,
        "127.0.0.2 multi.test\n127.0.0.3 multi.test\n::1 multi.test\n",
        &["--host-record=other.test,127.0.0.9".to_owned()],
    );
    let mut dns = asking(&server)
        .name("multi.test:8080")
        .unwrap()
        .name("other.test:9090")
        .unwrap()
        .build()
        .unwrap();
    let targets = first_set(&mut dns, 4).await;
    let found: Vec<(String, Option<&str>)> = targets
        .iter()
        .map(|t| (t.addr().to_string(), t.authority()))
        .collect();
    assert_eq!(
        found,
        [
            ("127.0.0.2:8080".into(), Some("multi.test:8080")),
            ("127.0.0.3:8080".into(), Some("multi.test:8080")),
            ("127.0.0.9:9090".into(), Some("other.test:9090")),
            ("[::1]:8080".into(), Some("multi.test:8080")),
        ]
    );
}

#[tokio::test]
async fn addresses_added_and_removed_while_requests_flow_are_seen_within_the_floor_and_a_second() {
    let (port, up) = backends(3).await;
    let server = Dnsmasq::start(1, "127.0.0.2 live.test\n127.0.0.3 live.test\n", &[]);
    let name = format!("live.test:{port}");
    let dns = asking(&server).name(&name).unwrap().build().unwrap();
    let make = MakeHttpEndpoint::<Empty<Bytes>>::new(Client::builder(TokioExecutor::new()));
    let balance = BalanceLayer::new(RoundRobin::new())
        .weighted()
        .wait_for_endpoints(STEP)
        .unwrap()
        .layer(discover::connect(dns, make));

    // Requests flow all along, and every one must succeed and carry the name.
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<std::sync::Mutex<HashMap<SocketAddr, u64>>> = Arc::default();
    let traffic = tokio::spawn({
        let (balance, stop, answered, name) = (
            balance.clone(),
            stop.clone(),
            answered.clone(),
            name.clone(),
        );
        async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 100_000 {
                let request = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
                let response = timeout(STEP, balance.clone().oneshot(request)).await??;
                let body = response.into_body().collect().await?.to_bytes();
                let body = String::from_utf8(body.to_vec())?;
                let (local, host) = body.split_once(' ').ok_or("an answer")?;
                if host != name {
                    return Err::<u64, BoxError>(format!("Host was {host:?}").into());
                }
                *answered.lock().unwrap().entry(local.parse()?).or_default() += 1;
                sent += 1;
                // Paces the load on real sockets and a real dnsmasq (real time, bounded above).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(sent)
        }
    });
    until("both first backends answering", || {
        answered.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(available(&balance.stats()), up[..2]);

    server.set_hosts("127.0.0.3 live.test\n127.0.0.4 live.test\n");
    let changed = until("the new set", || available(&balance.stats()) == up[1..]).await;
    let counts_then = answered.lock().unwrap().clone();
    until("the new backend answering", || {
        answered.lock().unwrap().contains_key(&up[2])
    })
    .await;
    // Fifty more answers after the change, so the removed backend had its chances to get one.
    let total = |counts: &HashMap<SocketAddr, u64>| counts.values().sum::<u64>();
    let total_then = total(&answered.lock().unwrap());
    until("fifty more answers", || {
        total(&answered.lock().unwrap()) >= total_then + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let sent = within("the traffic to stop", traffic)
        .await
        .unwrap()
        .unwrap();

    assert!(
        changed <= Duration::from_secs(2),
        "Insert and Remove within the 1 s floor + 1 s: took {changed:?}"
    );
    let answered = answered.lock().unwrap().clone();
    assert_eq!(
        answered[&up[0]], counts_then[&up[0]],
        "the removed backend got nothing more"
    );
    assert_eq!(
        answered.values().sum::<u64>(),
        sent,
        "every request succeeded"
    );
    println!("change seen after {changed:?}; {sent} requests, none failed");
}

#[tokio::test]
async fn srv_weights_become_shares_through_a_real_balance() {
    let flags = [
        "--srv-host=_http._tcp.web.test,a.web.test,8001,10,1",
        "--srv-host=_http._tcp.web.test,b.web.test,8002,10,3",
        "--srv-host=_http._tcp.web.test,backup.web.test,8003,20,100",
        "--host-record=a.web.test,127.0.0.2",
        "--host-record=b.web.test,127.0.0.3",
        "--host-record=backup.web.test,127.0.0.4",
    ]
    .map(str::to_owned);
    let server = Dnsmasq::start(60, "", &flags);
    let dns = asking(&server)
        .srv("_http._tcp.web.test")
        .unwrap()
        .build()
        .unwrap();
    let mut balance = BalanceLayer::new(WeightedRoundRobin::new())
        .weighted()
        .wait_for_endpoints(STEP)
        .unwrap()
        .layer(discover::connect(dns, answering));

    let mut answered: HashMap<SocketAddr, u32> = HashMap::new();
    for _ in 0..400 {
        let addr = within("an answer", async { balance.ready().await?.call(()).await })
            .await
            .unwrap();
        *answered.entry(addr).or_default() += 1;
    }
    let [a, b]: [SocketAddr; 2] = [
        "127.0.0.2:8001".parse().unwrap(),
        "127.0.0.3:8002".parse().unwrap(),
    ];
    assert_eq!((answered[&a], answered[&b]), (100, 300), "weights 1:3");
    assert_eq!(answered.len(), 2, "priority 20 is not used: {answered:?}");
    let stats = balance.stats();
    assert_eq!(
        (stats.get(&a).unwrap().weight, stats.get(&b).unwrap().weight),
        (1, 3)
    );
}

#[tokio::test]
async fn a_stopped_server_keeps_the_last_set_and_a_restarted_one_brings_changes_again() {
    let mut server = Dnsmasq::start(1, "127.0.0.2 api.test\n", &[]);
    let dns = asking(&server)
        .name("api.test:80")
        .unwrap()
        .build()
        .unwrap();
    let balance = BalanceLayer::new(RoundRobin::new())
        .weighted()
        .wait_for_endpoints(STEP)
        .unwrap()
        .layer(discover::connect(dns, answering));
    let first: SocketAddr = "127.0.0.2:80".parse().unwrap();
    assert_eq!(
        within("a first answer", balance.clone().oneshot(()))
            .await
            .unwrap(),
        first
    );

    server.stop();
    let errors_before = balance.stats().discovery_errors;
    until("failed resolutions", || {
        balance.stats().discovery_errors >= errors_before + 3
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            balance.clone().oneshot(()).await.unwrap(),
            first,
            "the last set is kept"
        );
    }
    assert_eq!(available(&balance.stats()), [first]);

    server.write_hosts("127.0.0.3 api.test\n");
    server.restart();
    let back = until("the change, once the server is back", || {
        available(&balance.stats()) == addrs(&["127.0.0.3:80"])
    })
    .await;
    assert_eq!(
        balance.clone().oneshot(()).await.unwrap(),
        "127.0.0.3:80".parse().unwrap()
    );
    // A retry is due within 400 ms (plus one timed-out query of 500 ms under way).
    assert!(back <= Duration::from_millis(1500), "took {back:?}");
}

#[tokio::test]
async fn a_long_ttl_is_not_queried_again_early() {
    let server = Dnsmasq::start(3600, "127.0.0.2 long.test\n127.0.0.3 short.test\n", &[]);
    let long = DnsBuilder::new()
        .nameserver(server.addr())
        .name("long.test:80")
        .unwrap()
        .build()
        .unwrap();
    // The same TTL, capped at 300 ms: re-queried several times in the same window, which
    // shows the queries are counted.
    let short = DnsBuilder::new()
        .nameserver(server.addr())
        .name("short.test:80")
        .unwrap()
        .ttl_floor(Duration::from_millis(100))
        .unwrap()
        .ttl_cap(Duration::from_millis(300))
        .unwrap()
        .build()
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    for mut dns in [long, short] {
        let count = count.clone();
        tokio::spawn(async move {
            while let Some(Ok(_)) = dns.next().await {
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    until("both answered", || count.load(Ordering::Relaxed) == 2).await;
    // Real time: the queries go to a real dnsmasq, and a paused clock would run the resolver's
    // timeouts ahead of its answers (the TTL arithmetic itself is tested on a paused clock in
    // `discover::dns::refresh`).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.queries("A", "long.test"), 1);
    assert_eq!(server.queries("AAAA", "long.test"), 1);
    let short = server.queries("A", "short.test");
    assert!(
        short >= 5,
        "the capped name was queried {short} times in 2 s"
    );
}

#[tokio::test]
async fn a_name_that_never_resolves_gives_no_endpoints_within_the_wait() {
    let server = Dnsmasq::start(60, "", &[]);
    let dns = asking(&server)
        .name("missing.test:80")
        .unwrap()
        .build()
        .unwrap();
    let balance = BalanceLayer::new(RoundRobin::new())
        .weighted()
        .wait_for_endpoints(Duration::from_millis(500))
        .unwrap()
        .layer(discover::connect(dns, answering));
    let start = Instant::now();
    let error = within("the bounded wait", balance.clone().oneshot(()))
        .await
        .unwrap_err();
    assert_eq!(error.downcast_ref::<Error>(), Some(&Error::NoEndpoints));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(balance.stats().discovery_errors >= 1);

    let mut direct = asking(&server)
        .name("missing.test:80")
        .unwrap()
        .build()
        .unwrap();
    let error = within("an error", direct.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), DnsErrorKind::NoSuchName);
    assert!(
        error
            .to_string()
            .contains("\"missing.test:80\": no such name"),
        "{error}"
    );
}
