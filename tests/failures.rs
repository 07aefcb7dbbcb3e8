//! What counts as an endpoint's failure: errors from the endpoint (per-endpoint timeouts
//! included), responses the classifier judges (5xx, gRPC statuses in headers and trailers,
//! judged when a stream ends), requests abandoned after a long wait — and never the caller's
//! own faults.
#![cfg(feature = "http")]

mod common;

use std::convert::Infallible;
use std::future::{pending, ready};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::servers::{serve, Protocol};
use common::settle;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_lb::classify::{CallerError, EndpointError};
use tower_lb::health::OutlierDetection;
use tower_lb::http::{connect, BodyCompletion, CallerBody, TrackBody};
use tower_lb::strategy::RoundRobin;
use tower_lb::{discover, BalanceLayer, EndpointStatus};

type Endpoint = BoxCloneSyncService<(), &'static str, BoxError>;

/// Answers at once, or never.
fn endpoint(hangs: bool) -> Endpoint {
    BoxCloneSyncService::new(tower::service_fn(move |()| async move {
        if hangs {
            pending::<()>().await;
        }
        Ok::<_, BoxError>(if hangs { "hung" } else { "ok" })
    }))
}

fn outlier(failures: u32) -> OutlierDetection {
    OutlierDetection::new()
        .consecutive_failures(failures)
        .base_ejection_time(Duration::from_secs(60))
        .max_ejected_percent(50)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_per_endpoint_timeout_blames_the_hanging_endpoint_and_ejects_it() {
    let endpoints = [("hangs", endpoint(true)), ("ok", endpoint(false))];
    let balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier(2))
        .unwrap()
        .layer(discover::with_layer(
            discover::fixed(endpoints),
            TimeoutLayer::new(Duration::from_millis(100)),
        ));
    let mut failed = 0;
    for _ in 0..20 {
        match balance.clone().oneshot(()).await {
            Ok(answer) => assert_eq!(answer, "ok"),
            Err(error) => {
                let error = error.downcast::<EndpointError>().expect("from an endpoint");
                assert_eq!(
                    error.endpoint(),
                    "\"hangs\"",
                    "the error names the endpoint"
                );
                failed += 1;
            }
        }
        settle().await;
    }
    let stats = balance.stats();
    let hanging = stats.get(&"hangs").unwrap();
    assert_eq!(failed, 2, "two timeouts, then the endpoint is ejected");
    assert_eq!(hanging.failures, 2);
    assert_eq!(hanging.status, EndpointStatus::Ejected);
    assert_eq!(stats.get(&"ok").unwrap().failures, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_outer_timeout_blames_the_endpoint_only_after_the_configured_wait() {
    for (count_after, blamed) in [(None, false), (Some(900), true), (Some(1500), false)] {
        let endpoints = [("hangs", endpoint(true)), ("ok", endpoint(false))];
        let mut layer = BalanceLayer::new(RoundRobin::new())
            .outlier_detection(outlier(2))
            .unwrap();
        if let Some(ms) = count_after {
            layer = layer
                .count_abandoned_after(Duration::from_millis(ms))
                .unwrap();
        }
        let balance = layer.layer(discover::fixed(endpoints));
        // The caller's own timeout, around the balancer.
        let svc = ServiceBuilder::new()
            .timeout(Duration::from_secs(1))
            .service(balance.clone());
        for _ in 0..10 {
            let _ = svc.clone().oneshot(()).await;
            settle().await;
        }
        let hanging = balance.stats().get(&"hangs").unwrap().clone();
        if blamed {
            assert_eq!(hanging.failures, 2, "{count_after:?}: {hanging:?}");
            assert_eq!(hanging.status, EndpointStatus::Ejected);
        } else {
            assert_eq!(hanging.failures, 0, "{count_after:?}: {hanging:?}");
            assert_eq!(hanging.status, EndpointStatus::Active);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_error_the_caller_caused_never_counts() {
    let caller_fault = BoxCloneSyncService::new(tower::service_fn(|()| {
        ready(Err::<&str, BoxError>(Box::new(CallerError::new(
            "the upload broke off",
        ))))
    }));
    let balance = BalanceLayer::new(RoundRobin::new())
        .outlier_detection(outlier(1))
        .unwrap()
        .layer(discover::fixed([("a", caller_fault)]));
    for _ in 0..5 {
        let error = balance.clone().oneshot(()).await.unwrap_err();
        assert!(tower_lb::classify::is_caller_error(&*error));
    }
    let a = balance.stats().get(&"a").unwrap().clone();
    assert_eq!((a.failures, a.status), (0, EndpointStatus::Active));
}

/// An HTTP/1.1 server on loopback that reads each request body to its end and answers 200.
async fn reading_server() -> SocketAddr {
    serve(
        Protocol::Http1,
        |request: http::Request<Incoming>| async move {
            let _ = request.into_body().collect().await;
            http::Response::new(Empty::<Bytes>::new())
        },
    )
    .await
}

type RequestBody = BoxBody<Bytes, BoxError>;

/// A request body that sends some data and then fails, as a client's broken upload does.
fn broken_upload(caller_marked: bool) -> RequestBody {
    let frames = futures::stream::iter([
        Ok(Frame::data(Bytes::from_static(b"partial"))),
        Err(std::io::Error::other("the client went away")),
    ]);
    let body = StreamBody::new(frames);
    if caller_marked {
        BoxBody::new(CallerBody::new(body).map_err(BoxError::from))
    } else {
        BoxBody::new(body.map_err(BoxError::from))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_broken_request_body_is_the_callers_fault_when_marked() {
    let addr = reading_server().await;
    for marked in [true, false] {
        let client = Client::builder(TokioExecutor::new()).build_http::<RequestBody>();
        let balance = BalanceLayer::new(RoundRobin::new())
            .track_completion(TrackBody::end_of_stream())
            .layer(connect(client, discover::fixed([(addr, addr)])));
        for _ in 0..3 {
            let request = http::Request::post("/upload")
                .body(broken_upload(marked))
                .unwrap();
            let error = balance.clone().oneshot(request).await.unwrap_err();
            assert_eq!(
                tower_lb::classify::is_caller_error(&*error),
                marked,
                "{error:?}"
            );
        }
        let failures = balance.stats().get(&addr).unwrap().failures;
        let expected = if marked { 0 } else { 3 };
        assert_eq!(failures, expected, "marked: {marked}");
    }
}

/// An HTTP/2 (h2c) server on loopback answering every request like a gRPC server: headers
/// with `content-type: application/grpc`, then the frames `body` gives.
async fn grpc_like_server(body: Frames, status_in_headers: Option<&'static str>) -> SocketAddr {
    serve(
        Protocol::Http2,
        move |_: http::Request<Incoming>| async move {
            let frames = futures::stream::iter(body().into_iter().map(Ok::<_, Infallible>));
            let mut response = http::Response::builder().header("content-type", "application/grpc");
            if let Some(status) = status_in_headers {
                response = response.header("grpc-status", status);
            }
            response.body(StreamBody::new(frames)).unwrap()
        },
    )
    .await
}

/// What a fake gRPC server sends after its headers.
type Frames = fn() -> Vec<Frame<Bytes>>;

fn trailers(status: &str) -> Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.parse().unwrap());
    Frame::trailers(trailers)
}

fn stream_ending_unavailable() -> Vec<Frame<Bytes>> {
    vec![Frame::data(Bytes::from_static(b"reply")), trailers("14")]
}

fn stream_ending_not_found() -> Vec<Frame<Bytes>> {
    vec![Frame::data(Bytes::from_static(b"reply")), trailers("5")]
}

fn stream_ending_ok() -> Vec<Frame<Bytes>> {
    vec![Frame::data(Bytes::from_static(b"reply")), trailers("0")]
}

fn nothing() -> Vec<Frame<Bytes>> {
    Vec::new()
}

#[tokio::test(flavor = "current_thread")]
async fn grpc_statuses_count_from_headers_and_from_trailers_when_the_stream_ends() {
    let cases: [(Frames, Option<&str>, u64); 5] = [
        (stream_ending_unavailable, None, 1),
        (stream_ending_not_found, None, 0),
        (stream_ending_ok, None, 0),
        // Trailers-only responses: the status is in the headers.
        (nothing, Some("14"), 1),
        (nothing, Some("3"), 0),
    ];
    for (body, in_headers, expected) in cases {
        for until in [
            BodyCompletion::EndOfStream,
            BodyCompletion::FirstData,
            BodyCompletion::Head,
        ] {
            let addr = grpc_like_server(body, in_headers).await;
            let client = Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http::<Empty<Bytes>>();
            let mut balance = BalanceLayer::new(RoundRobin::new())
                .track_completion(TrackBody::until(until))
                .layer(connect(client, discover::fixed([(addr, addr)])));
            let request = http::Request::post("/echo.Echo/ServerStreamingEcho")
                .body(Empty::new())
                .unwrap();
            let response = balance.ready().await.unwrap().call(request).await.unwrap();
            let before_end = balance.stats().get(&addr).unwrap().failures;
            if in_headers.is_none() {
                assert_eq!(
                    before_end, 0,
                    "{until:?}: not judged before the stream ends"
                );
            }
            let collected = response.into_body().collect().await.unwrap();
            let stats = balance.stats();
            let endpoint = stats.get(&addr).unwrap();
            assert_eq!(
                endpoint.failures,
                expected,
                "{until:?}, status {in_headers:?}, trailers {:?}",
                collected.trailers()
            );
            assert_eq!(endpoint.in_flight, 0);
        }
    }
}
