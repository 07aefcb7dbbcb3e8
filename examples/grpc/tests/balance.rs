//! The generated tonic client over a tower-lb `Balance`, against three real gRPC servers on
//! loopback: round-robin shares, and a server stream counted in flight until it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tower_lb_grpc_example::pb::EchoRequest;
use tower_lb_grpc_example::{balanced_client, start_server, EchoBalance, RunningServer};

/// Every test is bounded: a hung call fails the test instead of stalling the suite.
async fn within_limit<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the test finished within 30 s")
}

async fn three_servers() -> Vec<RunningServer> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(start_server().await.expect("a loopback port"));
    }
    servers
}

fn request(message: &str, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        count,
    }
}

fn in_flight_at(balance: &EchoBalance, addr: SocketAddr) -> u64 {
    balance
        .stats()
        .get(&addr)
        .expect("a known server")
        .in_flight
}

#[tokio::test]
async fn unary_calls_are_shared_round_robin_across_the_servers() {
    within_limit(async {
        const CALLS: u64 = 30;
        let servers = three_servers().await;
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let (mut client, balance) = balanced_client(&addrs).unwrap();

        for i in 0..CALLS {
            let reply = client
                .unary_echo(request(&format!("call {i}"), 0))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.message, format!("call {i}"));
        }

        let stats = balance.stats();
        for server in &servers {
            let endpoint = stats.get(&server.addr).expect("a known server");
            assert_eq!(endpoint.picks, CALLS / 3, "picks of {}", server.addr);
            assert_eq!(
                server.calls(),
                CALLS / 3,
                "calls answered by {}",
                server.addr
            );
            assert_eq!(endpoint.failures, 0);
        }
        assert_eq!(stats.in_flight(), 0, "every unary call has finished");
    })
    .await;
}

#[tokio::test]
async fn a_server_stream_is_in_flight_until_it_is_read_to_its_end() {
    within_limit(async {
        const REPLIES: u32 = 3;
        let servers = three_servers().await;
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let (mut client, balance) = balanced_client(&addrs).unwrap();

        let mut stream = client
            .server_streaming_echo(request("stream", REPLIES))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            balance.stats().in_flight(),
            1,
            "the headers arrived, the stream is open"
        );

        let mut serving = None;
        for i in 1..=REPLIES {
            let reply = stream.message().await.unwrap().expect("another reply");
            assert_eq!(reply.message, format!("stream #{i}"));
            let addr: SocketAddr = reply.server.parse().unwrap();
            assert_eq!(
                *serving.get_or_insert(addr),
                addr,
                "one server streams it all"
            );
            assert_eq!(
                in_flight_at(&balance, addr),
                1,
                "reply {i} of {REPLIES} read: the stream has not ended"
            );
            assert_eq!(balance.stats().in_flight(), 1, "no other server is busy");
        }

        assert!(stream.message().await.unwrap().is_none(), "the stream ends");
        assert_eq!(
            balance.stats().in_flight(),
            0,
            "released at the end of the stream"
        );
        let stats = balance.stats();
        assert_eq!(stats.picks(), 1);
        assert_eq!(stats.get(&serving.unwrap()).unwrap().failures, 0);
    })
    .await;
}

#[tokio::test]
async fn a_server_stream_dropped_unread_releases_its_call() {
    within_limit(async {
        let servers = three_servers().await;
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let (mut client, balance) = balanced_client(&addrs).unwrap();

        let mut stream = client
            .server_streaming_echo(request("stream", 3))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("a first reply");
        assert_eq!(balance.stats().in_flight(), 1);

        drop(stream);
        assert_eq!(
            balance.stats().in_flight(),
            0,
            "dropping the stream ends the call"
        );
    })
    .await;
}

#[tokio::test]
async fn a_server_that_starts_answering_unavailable_is_ejected_and_its_calls_move() {
    within_limit(async {
        let servers = three_servers().await;
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let (mut client, balance) = balanced_client(&addrs).unwrap();
        for i in 0..6 {
            client
                .unary_echo(request(&format!("warm {i}"), 0))
                .await
                .unwrap();
        }

        let failing = &servers[1];
        failing.fail(true);
        let before = failing.calls();
        let mut failed = 0;
        for i in 0..60 {
            match client.unary_echo(request(&format!("call {i}"), 0)).await {
                Ok(reply) => assert_ne!(reply.into_inner().server, failing.addr.to_string()),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable);
                    failed += 1;
                }
            }
        }

        let stats = balance.stats();
        let endpoint = stats.get(&failing.addr).unwrap();
        assert_eq!(
            endpoint.status,
            tower_lb::EndpointStatus::Ejected,
            "three UNAVAILABLE in a row eject it: {endpoint:?}"
        );
        assert_eq!(failed, 3, "only the calls before the ejection failed");
        assert_eq!(failing.calls() - before, 3, "nothing reached it after that");
        assert_eq!(
            endpoint.failures, 3,
            "each UNAVAILABLE counted, though HTTP said 200"
        );
        for healthy in [&servers[0], &servers[2]] {
            assert_eq!(stats.get(&healthy.addr).unwrap().failures, 0);
        }
    })
    .await;
}

#[tokio::test]
async fn a_stream_that_ends_with_a_failing_status_counts_when_it_ends() {
    within_limit(async {
        let server = start_server().await.unwrap();
        let (mut client, balance) = balanced_client(&[server.addr]).unwrap();
        server.fail(true);

        let mut stream = client
            .server_streaming_echo(request("stream", 3))
            .await
            .expect("the stream starts: its headers say nothing of the outcome")
            .into_inner();
        stream.message().await.unwrap().expect("a first reply");
        assert_eq!(
            balance.stats().get(&server.addr).unwrap().failures,
            0,
            "not judged before the stream ends"
        );
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let endpoint = balance.stats().get(&server.addr).unwrap().clone();
        assert_eq!(endpoint.failures, 1, "the trailers' UNAVAILABLE counted");
        assert_eq!(endpoint.in_flight, 0);
    })
    .await;
}

/// The balancer over tonic `Channel`s, and the generated client over it, are `Send + Sync`:
/// they fit an axum `State`, an `Arc` or a `BoxCloneSyncService` as they are.
#[test]
fn the_balanced_client_is_send_and_sync() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<EchoBalance>();
    send_sync::<tower_lb_grpc_example::pb::echo_client::EchoClient<EchoBalance>>();
}
