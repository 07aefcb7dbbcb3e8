//! A fake Kubernetes API server on loopback that serves EndpointSlices over the real
//! list/watch protocol, for a real `kube::Client`:
//!
//! - `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...`: a JSON
//!   `EndpointSliceList` with `metadata.resourceVersion`;
//! - the same with `watch=true&resourceVersion=N`: HTTP/1.1 chunked, one JSON watch event per
//!   line (`ADDED` / `MODIFIED` / `DELETED`), first every event after `N`, then live ones;
//!   a resource version older than the kept history gets an `ERROR` event with a `410 Gone`
//!   `Status`, as the real API server sends, and the client must list again.
//!
//! Tests change slices, end watches, expire the history and make requests fail, and read
//! how many lists and watches the client made.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const PATH_PREFIX: &str = "/apis/discovery.k8s.io/v1/namespaces/";

#[derive(Default)]
struct Cluster {
    /// The last resource version handed out.
    revision: u64,
    /// By (namespace, name): the slice as last written, with its resource version.
    slices: BTreeMap<(String, String), Value>,
    /// Every event since `history_from`, for watches that resume: (revision, type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// Watches from a resource version before this one get `410 Gone`.
    history_from: u64,
    /// Open watch streams: their namespace, selector and sender.
    watches: Vec<Watch>,
    /// Requests still to be answered with a 500.
    failures_left: u32,
    lists: u32,
    watch_requests: u32,
}

struct Watch {
    namespace: String,
    selector: Option<(String, String)>,
    events: mpsc::UnboundedSender<Bytes>,
}

/// The fake API server. Dropping it stops it.
pub(crate) struct FakeApiServer {
    pub(crate) addr: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        let cluster = Arc::new(Mutex::new(Cluster {
            history_from: 1,
            ..Cluster::default()
        }));
        let shared = Arc::clone(&cluster);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let cluster = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let cluster = Arc::clone(&cluster);
                        async move { Ok::<_, Infallible>(handle(&cluster, request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            cluster,
            task,
        }
    }

    /// A real kube client for this server (plain HTTP, no credentials).
    pub(crate) fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client")
    }

    /// Creates or replaces a slice (an `ADDED` or `MODIFIED` event).
    pub(crate) fn apply(&self, namespace: &str, mut slice: Value) {
        let mut cluster = self.cluster.lock().unwrap();
        cluster.revision += 1;
        let revision = cluster.revision;
        slice["metadata"]["resourceVersion"] = json!(revision.to_string());
        slice["metadata"]["namespace"] = json!(namespace);
        let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
        let key = (namespace.to_owned(), name);
        let kind = if cluster.slices.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        cluster.slices.insert(key, slice.clone());
        cluster.record(revision, kind, slice);
    }

    /// Deletes a slice (a `DELETED` event).
    pub(crate) fn delete(&self, namespace: &str, name: &str) {
        let mut cluster = self.cluster.lock().unwrap();
        let Some(mut slice) = cluster
            .slices
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            panic!("no slice {namespace}/{name} to delete");
        };
        cluster.revision += 1;
        let revision = cluster.revision;
        slice["metadata"]["resourceVersion"] = json!(revision.to_string());
        cluster.record(revision, "DELETED", slice);
    }

    /// Ends every open watch, as an API server does at its timeout or on restart. The client
    /// resumes from the last resource version it saw.
    pub(crate) fn end_watches(&self) {
        self.cluster.lock().unwrap().watches.clear();
    }

    /// Forgets the event history up to now, as etcd compaction does: a watch that resumes
    /// from an older resource version gets `410 Gone` and has to list again.
    pub(crate) fn expire_history(&self) {
        let mut cluster = self.cluster.lock().unwrap();
        cluster.history.clear();
        cluster.history_from = cluster.revision + 1;
    }

    /// Answers the next `n` requests with `500 Internal Server Error`.
    pub(crate) fn fail_next_requests(&self, n: u32) {
        self.cluster.lock().unwrap().failures_left = n;
    }

    /// Lists and watch requests served so far (failed ones included).
    pub(crate) fn requests(&self) -> (u32, u32) {
        let cluster = self.cluster.lock().unwrap();
        (cluster.lists, cluster.watch_requests)
    }
}

impl Cluster {
    fn record(&mut self, revision: u64, kind: &'static str, object: Value) {
        let line = event_line(kind, &object);
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        self.watches.retain(|watch| {
            !(watch.namespace == namespace && matches(&watch.selector, &object))
                || watch.events.send(line.clone()).is_ok()
        });
        self.history.push((revision, kind, object));
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn matches(selector: &Option<(String, String)>, slice: &Value) -> bool {
    selector
        .as_ref()
        .is_none_or(|(key, value)| slice["metadata"]["labels"][key].as_str() == Some(value))
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn handle(cluster: &Mutex<Cluster>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    let Some(namespace) = path
        .strip_prefix(PATH_PREFIX)
        .and_then(|rest| rest.strip_suffix("/endpointslices"))
        .map(str::to_owned)
    else {
        return full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("no route for {path}")),
        );
    };
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    let selector = query
        .get("labelSelector")
        .and_then(|s| s.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");

    let mut cluster = cluster.lock().unwrap();
    if watch {
        cluster.watch_requests += 1;
    } else {
        cluster.lists += 1;
    }
    if cluster.failures_left > 0 {
        cluster.failures_left -= 1;
        return full(
            StatusCode::INTERNAL_SERVER_ERROR,
            status(500, "InternalError", "the fake API server was told to fail"),
        );
    }

    if !watch {
        let items: Vec<Value> = cluster
            .slices
            .iter()
            .filter(|((ns, _), slice)| *ns == namespace && matches(&selector, slice))
            .map(|(_, slice)| slice.clone())
            .collect();
        return full(
            StatusCode::OK,
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": { "resourceVersion": cluster.revision.to_string() },
                "items": items,
            }),
        );
    }

    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    if from + 1 < cluster.history_from {
        // What the real API server does for an expired resource version: 200, then an
        // ERROR event carrying a 410 Status, then the end of the stream.
        let gone = status(
            410,
            "Expired",
            &format!(
                "too old resource version: {from} ({})",
                cluster.history_from
            ),
        );
        let _ = tx.send(event_line("ERROR", &gone));
        drop(tx);
    } else {
        for (revision, kind, object) in &cluster.history {
            let namespace_matches = object["metadata"]["namespace"].as_str() == Some(&namespace);
            if *revision > from && namespace_matches && matches(&selector, object) {
                let _ = tx.send(event_line(kind, object));
            }
        }
        cluster.watches.push(Watch {
            namespace,
            selector,
            events: tx,
        });
    }
    drop(cluster);
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|line| line.map(|line| Ok::<_, Infallible>(Frame::data(line))))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed())
        .unwrap()
}

/// `application/x-www-form-urlencoded` pairs, enough for the client's query strings.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An EndpointSlice of `service` named `name`, with `ports` (name, number) and `endpoints`
/// (IP, ready, serving, terminating).
pub(crate) fn slice(
    service: &str,
    name: &str,
    ports: &[(&str, u16)],
    endpoints: &[(&str, bool, bool, bool)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(name, port)| json!({
            "name": name, "port": port, "protocol": "TCP",
        })).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(|(ip, ready, serving, terminating)| json!({
            "addresses": [ip],
            "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
        })).collect::<Vec<_>>(),
    })
}
