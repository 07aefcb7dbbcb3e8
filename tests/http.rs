//! The `http` feature: in-flight until the body ends, and endpoints by address over real
//! loopback HTTP servers.
#![cfg(feature = "http")]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use common::servers::{serve, Protocol};
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};
use tower_lb::http::{connect, TrackBody};
use tower_lb::{discover, strategy::RoundRobin, BalanceLayer};

type Chunk = Result<Frame<Bytes>, BoxError>;
type Streamed = StreamBody<futures::stream::BoxStream<'static, Chunk>>;

/// An endpoint whose response body streams whatever the test sends into `chunks`.
fn streaming_endpoint(
    chunks: mpsc::UnboundedReceiver<Chunk>,
) -> impl Service<(), Response = Response<Streamed>, Error = Infallible, Future = impl Send> + Clone
{
    let chunks = std::sync::Arc::new(std::sync::Mutex::new(Some(chunks)));
    service_fn(move |_: ()| {
        let receiver = chunks.lock().unwrap().take().expect("one request per test");
        async move {
            let stream = tokio_stream_from(receiver);
            Ok::<_, Infallible>(Response::new(StreamBody::new(stream)))
        }
    })
}

fn tokio_stream_from(
    mut receiver: mpsc::UnboundedReceiver<Chunk>,
) -> futures::stream::BoxStream<'static, Chunk> {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)).boxed()
}

fn data(bytes: &'static str) -> Chunk {
    Ok(Frame::data(Bytes::from_static(bytes.as_bytes())))
}

#[tokio::test(flavor = "current_thread")]
async fn a_streaming_response_counts_as_in_flight_until_its_body_ends() {
    let (tx, rx) = mpsc::unbounded_channel();
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .layer(discover::fixed([("stream", streaming_endpoint(rx))]));
    let mut body = balance.clone().oneshot(()).await.unwrap().into_body();
    assert_eq!(
        balance.stats().in_flight(),
        1,
        "the head arrived; the body has not ended"
    );

    tx.send(data("first")).unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    assert_eq!(balance.stats().in_flight(), 1, "still streaming");

    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(
        balance.stats().in_flight(),
        0,
        "released at the end of the stream"
    );
    assert!(!body.is_tracking());
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_body_releases_its_request() {
    let (tx, rx) = mpsc::unbounded_channel();
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .layer(discover::fixed([("stream", streaming_endpoint(rx))]));
    let response = balance.clone().oneshot(()).await.unwrap();
    tx.send(data("unread")).unwrap();
    assert_eq!(balance.stats().in_flight(), 1);
    drop(response);
    assert_eq!(balance.stats().in_flight(), 0);
    assert_eq!(balance.stats().endpoints[0].failures, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_body_error_releases_and_counts_a_failure() {
    let (tx, rx) = mpsc::unbounded_channel();
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .layer(discover::fixed([("stream", streaming_endpoint(rx))]));
    let mut body = balance.clone().oneshot(()).await.unwrap().into_body();
    tx.send(Err("connection reset".into())).unwrap();
    assert!(body.frame().await.unwrap().is_err());
    let stats = balance.stats();
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(stats.endpoints[0].failures, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn first_data_mode_releases_at_the_first_data_frame() {
    let (tx, rx) = mpsc::unbounded_channel();
    let balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::first_data())
        .layer(discover::fixed([("stream", streaming_endpoint(rx))]));
    let mut body = balance.clone().oneshot(()).await.unwrap().into_body();
    assert_eq!(balance.stats().in_flight(), 1);
    tx.send(data("ttfb")).unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(balance.stats().in_flight(), 0, "released at the first byte");
    tx.send(data("more")).unwrap();
    body.frame().await.unwrap().unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn the_default_releases_at_the_response_head() {
    let (_tx, rx) = mpsc::unbounded_channel();
    let balance = BalanceLayer::new(RoundRobin::new())
        .layer(discover::fixed([("stream", streaming_endpoint(rx))]));
    let _response = balance.clone().oneshot(()).await.unwrap();
    assert_eq!(balance.stats().in_flight(), 0);
}

/// A real HTTP/1.1 server on loopback that answers its name and the request's path and host.
async fn backend(name: &'static str) -> SocketAddr {
    serve(
        Protocol::Http1,
        move |request: Request<Incoming>| async move {
            let host = request
                .headers()
                .get("host")
                .map(|h| h.to_str().unwrap().to_owned());
            let body = format!(
                "{name} {} {}",
                request.uri().path(),
                host.unwrap_or_default()
            );
            Response::new(Full::new(Bytes::from(body)))
        },
    )
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn http_endpoints_send_each_request_to_their_address() {
    let a = backend("a").await;
    let b = backend("b").await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut balance = BalanceLayer::new(RoundRobin::new())
        .track_completion(TrackBody::end_of_stream())
        .layer(connect(client, discover::fixed([(a, a), (b, b)])));
    let mut answers = Vec::new();
    for _ in 0..4 {
        let request = Request::get("/hello").body(Empty::new()).unwrap();
        let response = balance.ready().await.unwrap().call(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        answers.push(String::from_utf8(body.to_vec()).unwrap());
    }
    answers.sort();
    assert_eq!(
        answers,
        vec![
            format!("a /hello {a}"),
            format!("a /hello {a}"),
            format!("b /hello {b}"),
            format!("b /hello {b}"),
        ],
        "requests keep their path and get each endpoint's authority"
    );
    assert_eq!(
        balance.stats().in_flight(),
        0,
        "bodies read to the end released their requests"
    );
    // Over hyper-util's client the balancer is Send + Sync: it fits axum's `State` as it is.
    fn send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}
    send_sync(&balance);
}

#[test]
fn an_endpoint_uri_with_a_path_or_without_a_scheme_is_rejected() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    use tower_lb::http::HttpEndpoint;
    assert!(HttpEndpoint::from_uri(&client, "http://10.0.0.1:80").is_ok());
    let no_scheme = HttpEndpoint::from_uri(&client, "10.0.0.1:80").unwrap_err();
    assert!(no_scheme.to_string().contains("scheme"), "{no_scheme}");
    let path = HttpEndpoint::from_uri(&client, "http://10.0.0.1/api").unwrap_err();
    assert!(
        path.to_string().contains("only scheme and authority"),
        "{path}"
    );
    assert!(HttpEndpoint::from_uri(&client, "ftp://x").is_err());
}
