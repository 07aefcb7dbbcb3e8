//! tower-lb balancing a generated tonic gRPC client across three gRPC servers.
//!
//! Run it with `cargo run -p tower-lb-grpc-example`. It starts three `Echo` servers on
//! loopback ports, makes 30 unary calls through one `EchoClient` over a round-robin
//! `Balance`, prints how many calls each server got (the balancer's counters and the servers'
//! own), then opens a server-streaming call and prints the in-flight count while the stream
//! is open and after it ends. Last, one server starts answering `UNAVAILABLE`: the balancer
//! counts each such status (an HTTP 200 whose gRPC status says the server failed), ejects the
//! server after three in a row, and the calls move to the other two.
//!
//! With the feature `etcd`, two more modes take their servers from etcd:
//!
//! - `cargo run -p tower-lb-grpc-example --features etcd -- etcd [ETCD_URL]`: three servers
//!   register themselves (`tower-lb-example/echo/<addr>`, with a lease); the client balances
//!   over whatever is registered; one server deregisters and stops, a new one registers, and
//!   the calls follow.
//! - `... -- serve [ETCD_URL] [TTL_SECONDS]`: one server that registers itself and serves
//!   until Ctrl-C, then deregisters. Start a few, then the `etcd` mode's client sees them too.
//!
//! `ETCD_URL` defaults to `http://127.0.0.1:2379`.

use tower::BoxError;
use tower_lb_grpc_example::pb::EchoRequest;
use tower_lb_grpc_example::{balanced_client, start_server};

const UNARY_CALLS: usize = 30;
const STREAMED_REPLIES: u32 = 3;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => fixed_servers().await,
        #[cfg(feature = "etcd")]
        Some("etcd") => registry::demo(args.get(1)).await,
        #[cfg(feature = "etcd")]
        Some("serve") => registry::serve(&args[1..]).await,
        #[cfg(not(feature = "etcd"))]
        Some("etcd" | "serve") => {
            Err("the etcd modes need the feature: cargo run -p tower-lb-grpc-example --features etcd -- etcd".into())
        }
        Some(other) => Err(format!("unknown mode {other:?}: none, `etcd` or `serve`").into()),
    }
}

/// Three servers known up front.
async fn fixed_servers() -> Result<(), BoxError> {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(start_server().await?);
    }
    let addrs: Vec<_> = servers.iter().map(|server| server.addr).collect();
    let (mut client, balance) = balanced_client(&addrs)?;
    println!("tower-lb gRPC example: round-robin over 3 tonic servers");
    for addr in &addrs {
        println!("  server {addr}");
    }

    println!("\n{UNARY_CALLS} unary calls:");
    for i in 0..UNARY_CALLS {
        let request = EchoRequest {
            message: format!("hello {i}"),
            count: 0,
        };
        client.unary_echo(request).await?;
    }
    let stats = balance.stats();
    for server in &servers {
        let picks = stats.get(&server.addr).map_or(0, |e| e.picks);
        let answered = server.calls();
        println!(
            "  {}: {picks} calls picked by the balancer, {answered} answered",
            server.addr
        );
    }
    println!("  in flight after the calls: {}", stats.in_flight());

    println!("\na server-streaming call ({STREAMED_REPLIES} replies):");
    let request = EchoRequest {
        message: "stream".to_owned(),
        count: STREAMED_REPLIES,
    };
    let mut stream = client.server_streaming_echo(request).await?.into_inner();
    while let Some(reply) = stream.message().await? {
        println!(
            "  {:?} from {}; in flight: {}",
            reply.message,
            reply.server,
            balance.stats().in_flight()
        );
    }
    println!("  stream ended; in flight: {}", balance.stats().in_flight());

    let failing = &servers[1];
    failing.fail(true);
    println!(
        "\n{} starts answering UNAVAILABLE; {UNARY_CALLS} more calls:",
        failing.addr
    );
    let mut failed = 0;
    for i in 0..UNARY_CALLS {
        let request = EchoRequest {
            message: format!("again {i}"),
            count: 0,
        };
        if let Err(status) = client.unary_echo(request).await {
            println!("  call {i} failed: {}", status.code());
            failed += 1;
        }
    }
    let stats = balance.stats();
    for server in &servers {
        let endpoint = stats.get(&server.addr).expect("a known server");
        println!(
            "  {}: {:?}, {} failures, {} calls answered in all",
            server.addr,
            endpoint.status,
            endpoint.failures,
            server.calls()
        );
    }
    println!("  {failed} of {UNARY_CALLS} calls failed before the ejection");
    Ok(())
}

/// The etcd modes.
#[cfg(feature = "etcd")]
mod registry {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use tower::BoxError;
    use tower_lb::discover::etcd::etcd_client::Client;
    use tower_lb::discover::etcd::Registration;
    use tower_lb::EndpointStatus;
    use tower_lb_grpc_example::pb::echo_client::EchoClient;
    use tower_lb_grpc_example::pb::EchoRequest;
    use tower_lb_grpc_example::{
        etcd_balanced_client, register_server, start_server, EtcdEchoBalance, RunningServer,
        SERVICE,
    };

    const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";
    const CALLS: usize = 30;

    /// Three registered servers; one leaves, another joins.
    pub(crate) async fn demo(url: Option<&String>) -> Result<(), BoxError> {
        let url = url.map_or(DEFAULT_ETCD, String::as_str);
        let etcd = Client::connect([url], None).await?;
        let ttl = Duration::from_secs(10);
        println!("tower-lb gRPC example, etcd mode: servers register under {SERVICE}/ at {url}");

        let mut servers = Vec::new();
        for _ in 0..3 {
            let server = start_server().await?;
            let registration = register_server(&server, etcd.clone(), SERVICE, ttl).await?;
            println!(
                "  server {} registered as {}",
                server.addr,
                registration.key()
            );
            servers.push((server, registration));
        }
        let (mut client, balance) = etcd_balanced_client(etcd.clone(), SERVICE)?;
        wait_for(&balance, &servers).await?;
        calls(&mut client, "over the 3 registered servers").await?;

        let (leaving, registration) = servers.remove(0);
        println!(
            "\nserver {} shuts down: it deregisters first, then stops",
            leaving.addr
        );
        registration.shutdown().await?;
        wait_for(&balance, &servers).await?;
        drop(leaving);
        calls(&mut client, "after it left").await?;

        let joining = start_server().await?;
        let registration = register_server(&joining, etcd, SERVICE, ttl).await?;
        println!("\nserver {} starts and registers", joining.addr);
        servers.push((joining, registration));
        wait_for(&balance, &servers).await?;
        calls(&mut client, "after a new one joined").await?;

        for (_, registration) in servers {
            registration.shutdown().await?;
        }
        Ok(())
    }

    /// One registered server, until Ctrl-C.
    pub(crate) async fn serve(args: &[String]) -> Result<(), BoxError> {
        let url = args.first().map_or(DEFAULT_ETCD, String::as_str);
        let ttl = match args.get(1) {
            Some(seconds) => seconds
                .parse()
                .map_err(|_| format!("TTL_SECONDS: {seconds:?} is not a number"))?,
            None => 10,
        };
        let etcd = Client::connect([url], None).await?;
        let server = start_server().await?;
        let registration =
            register_server(&server, etcd, SERVICE, Duration::from_secs(ttl)).await?;
        println!(
            "serving {} registered as {} (lease {ttl} s); Ctrl-C deregisters and stops",
            server.addr,
            registration.key()
        );
        tokio::signal::ctrl_c().await?;
        registration.shutdown().await?;
        println!("deregistered {}", server.addr);
        Ok(())
    }

    /// Waits (at most 5 s) until the balancer picks from exactly `servers`.
    async fn wait_for(
        balance: &EtcdEchoBalance,
        servers: &[(RunningServer, Registration)],
    ) -> Result<(), BoxError> {
        let addrs: BTreeSet<SocketAddr> = servers.iter().map(|(server, _)| server.addr).collect();
        let started = Instant::now();
        loop {
            let active: BTreeSet<SocketAddr> = balance
                .stats()
                .endpoints
                .iter()
                .filter(|e| e.status == EndpointStatus::Active)
                .map(|e| e.key)
                .collect();
            if active == addrs {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(5) {
                return Err(
                    format!("the balancer has {active:?}, not {addrs:?}, after 5 s").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn calls(client: &mut EchoClient<EtcdEchoBalance>, what: &str) -> Result<(), BoxError> {
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..CALLS {
            let request = EchoRequest {
                message: format!("hello {i}"),
                count: 0,
            };
            let reply = client.unary_echo(request).await?.into_inner();
            *answered.entry(reply.server).or_default() += 1;
        }
        println!("{CALLS} unary calls {what}:");
        for (server, calls) in answered {
            println!("  {server}: {calls}");
        }
        Ok(())
    }
}
