//! tower-lb balancing a generated tonic gRPC client across three gRPC servers.
//!
//! Run it with `cargo run -p tower-lb-grpc-example`. It starts three `Echo` servers on
//! loopback ports, makes 30 unary calls through one `EchoClient` over a round-robin
//! `Balance`, prints how many calls each server got (the balancer's counters and the servers'
//! own), then opens a server-streaming call and prints the in-flight count while the stream
//! is open and after it ends. Last, one server starts answering `UNAVAILABLE`: the balancer
//! counts each such status (an HTTP 200 whose gRPC status says the server failed), ejects the
//! server after three in a row, and the calls move to the other two.

use tower::BoxError;
use tower_lb_grpc_example::pb::EchoRequest;
use tower_lb_grpc_example::{balanced_client, start_server};

const UNARY_CALLS: usize = 30;
const STREAMED_REPLIES: u32 = 3;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
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
