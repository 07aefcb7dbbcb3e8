//! The etcd mode against a real etcd on loopback: servers run as separate processes (the
//! example's `serve` mode) that register themselves; the client balances over whatever is
//! registered; a killed server's traffic moves to the others once its lease expires, and a
//! server stopped with Ctrl-C deregisters at once.
#![cfg(feature = "etcd")]

// The root crate's etcd harness; this test does not restart etcd.
#[allow(dead_code)]
#[path = "../../../tests/etcd/server.rs"]
mod etcd_server;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tower_lb::EndpointStatus;
use tower_lb_grpc_example::pb::echo_client::EchoClient;
use tower_lb_grpc_example::pb::EchoRequest;
use tower_lb_grpc_example::{etcd_balanced_client, EtcdEchoBalance, SERVICE};

use etcd_server::EtcdServer;

/// Every test is bounded: a hang fails the test instead of stalling the suite.
async fn within_limit<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test finished within 60 s")
}

/// A `serve` process: one registered server. Killed on drop.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    async fn start(etcd: &EtcdServer, ttl_seconds: u64) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tower-lb-grpc-example"))
            .args(["serve", &etcd.endpoint(), &ttl_seconds.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the example binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // "serving 127.0.0.1:PORT registered as ..."
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the server says where it serves");
        let addr = line
            .split_whitespace()
            .nth(1)
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("an address in {line:?}"));
        // Keep reading its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    /// SIGKILL: it cannot deregister.
    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Ctrl-C (SIGINT): it deregisters, then exits.
    async fn interrupt(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("it exits after Ctrl-C")
            .unwrap();
        assert!(status.success(), "it exits cleanly: {status}");
    }
}

/// Waits until the balancer picks from exactly `addrs` (a removed endpoint stays in the
/// stats, as `Removed`, until no clone can still reach it), at most `limit`; returns how long
/// it took.
async fn until_endpoints(
    balance: &EtcdEchoBalance,
    addrs: &[SocketAddr],
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let mut expected = addrs.to_vec();
    expected.sort();
    loop {
        let mut keys: Vec<SocketAddr> = balance
            .stats()
            .endpoints
            .iter()
            .filter(|e| e.status != EndpointStatus::Removed)
            .map(|e| e.key)
            .collect();
        keys.sort();
        if keys == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "endpoints {keys:?}, not {expected:?}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` unary calls; which server answered how many.
async fn calls(client: &mut EchoClient<EtcdEchoBalance>, n: usize) -> BTreeMap<SocketAddr, usize> {
    let mut answered = BTreeMap::new();
    for i in 0..n {
        let request = EchoRequest {
            message: format!("call {i}"),
            count: 0,
        };
        let reply = client
            .unary_echo(request)
            .await
            .expect("the call succeeds")
            .into_inner();
        *answered.entry(reply.server.parse().unwrap()).or_insert(0) += 1;
    }
    answered
}

#[tokio::test]
async fn a_killed_servers_traffic_moves_to_the_others_and_a_stopped_one_deregisters() {
    within_limit(async {
        let etcd = EtcdServer::start().await;
        let (mut client, balance) = etcd_balanced_client(etcd.client().await, SERVICE).unwrap();
        let crashing = ServerProcess::start(&etcd, 2).await;
        let stopping = ServerProcess::start(&etcd, 30).await;
        let staying = ServerProcess::start(&etcd, 30).await;
        let (a, b, c) = (crashing.addr, stopping.addr, staying.addr);
        until_endpoints(&balance, &[a, b, c], Duration::from_secs(5)).await;
        assert_eq!(
            calls(&mut client, 30).await,
            BTreeMap::from([(a, 10), (b, 10), (c, 10)])
        );

        // Killed: it stops answering at once, and its entry goes when its 2 s lease expires.
        crashing.kill().await;
        let expired = until_endpoints(&balance, &[b, c], Duration::from_secs(6)).await;
        assert!(
            expired > Duration::from_millis(500),
            "removed by the lease's expiry: {expired:?}"
        );
        assert_eq!(
            calls(&mut client, 30).await,
            BTreeMap::from([(b, 15), (c, 15)])
        );

        // Stopped with Ctrl-C: it deregisters, long before its 30 s lease would expire.
        stopping.interrupt().await;
        until_endpoints(&balance, &[c], Duration::from_secs(2)).await;
        assert_eq!(calls(&mut client, 10).await, BTreeMap::from([(c, 10)]));
        assert_eq!(balance.stats().in_flight(), 0);
    })
    .await;
}
