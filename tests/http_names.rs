//! Endpoints that keep their name: `MakeHttpEndpoint` connects to the discovered address but
//! presents the name — `Host` over HTTP/1.1, `:authority` over HTTP/2, the TLS server name and
//! the name the certificate is checked against — against real servers on loopback addresses.
#![cfg(feature = "http")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::{BoxError, Layer, ServiceExt};
use tower_lb::discover::{self, Target};
use tower_lb::http::{ConnectTo, MakeHttpEndpoint};
use tower_lb::{strategy::RoundRobin, BalanceLayer};

/// Any single step longer than this fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

/// What a backend saw of a request.
#[derive(Debug)]
struct Seen {
    local: SocketAddr,
    version: String,
    host: Option<String>,
    authority: Option<String>,
    sni: Option<String>,
}

impl Seen {
    fn parse(body: &str) -> Self {
        let fields: HashMap<&str, &str> = body.lines().filter_map(|l| l.split_once('=')).collect();
        let optional = |name: &str| {
            Some(fields[name])
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Self {
            local: fields["local"].parse().unwrap(),
            version: fields["version"].to_owned(),
            host: optional("host"),
            authority: optional("authority"),
            sni: optional("sni"),
        }
    }
}

/// A server on `ip` (a loopback address) speaking HTTP/1.1 and HTTP/2 (with TLS if `tls` is
/// given, choosing by ALPN; without, by the HTTP/2 preface), answering what it saw.
async fn backend(ip: &str, tls: Option<TlsAcceptor>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let answer = move |sni: Option<String>| {
                    hyper::service::service_fn(move |request: Request<Incoming>| {
                        let header = |name| {
                            request
                                .headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_owned())
                        };
                        let body = format!(
                            "local={local}\nversion={:?}\nhost={}\nauthority={}\nsni={}\n",
                            request.version(),
                            header("host").unwrap_or_default(),
                            request
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .unwrap_or_default(),
                            sni.clone().unwrap_or_default(),
                        );
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    })
                };
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = server
                            .serve_connection(TokioIo::new(stream), answer(None))
                            .await;
                    }
                    Some(tls) => {
                        let Ok(stream) = tls.accept(stream).await else {
                            return;
                        };
                        let sni = stream.get_ref().1.server_name().map(str::to_owned);
                        let _ = server
                            .serve_connection(TokioIo::new(stream), answer(sni))
                            .await;
                    }
                }
            });
        }
    });
    local
}

fn named(addr: SocketAddr, name: &str) -> Target {
    Target::new(addr).with_authority(name).unwrap()
}

/// Sends `GET /` through `endpoint` and parses what the backend saw.
async fn ask<S>(endpoint: S) -> Result<Seen, BoxError>
where
    S: tower::Service<Request<Empty<Bytes>>, Response = Response<Incoming>>,
    S::Error: Into<BoxError>,
{
    let request = Request::get("/").body(Empty::new()).unwrap();
    let response = tokio::time::timeout(STEP, endpoint.oneshot(request))
        .await
        .expect("an answer in time")
        .map_err(Into::into)?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Seen::parse(std::str::from_utf8(&body)?))
}

fn plain() -> MakeHttpEndpoint<Empty<Bytes>> {
    MakeHttpEndpoint::new(Client::builder(TokioExecutor::new()))
}

#[tokio::test]
async fn over_http1_a_named_endpoint_sends_its_name_as_host_and_connects_to_its_address() {
    let addr = backend("127.0.0.2", None).await;
    // The name's port differs from the address's: the connection must follow the address.
    let endpoint = plain().endpoint(&named(addr, "api.test:8080"));
    assert_eq!(endpoint.addr(), Some(addr));
    let seen = ask(endpoint).await.unwrap();
    assert_eq!(seen.local, addr);
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.host.as_deref(), Some("api.test:8080"));

    // Without a name, the address is the authority.
    let seen = ask(plain().endpoint(&Target::new(addr))).await.unwrap();
    assert_eq!(seen.host, Some(addr.to_string()));

    // A fixed authority overrides the target's name.
    let make = plain().authority("front.test").unwrap();
    let seen = ask(make.endpoint(&named(addr, "api.test"))).await.unwrap();
    assert_eq!(seen.host.as_deref(), Some("front.test"));
    assert_eq!(
        plain().authority("bad name").unwrap_err().setting(),
        "authority"
    );
}

#[tokio::test]
async fn over_http2_the_name_is_the_authority() {
    let addr = backend("127.0.0.2", None).await;
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(true);
    let make = MakeHttpEndpoint::<Empty<Bytes>>::new(builder);
    let seen = ask(make.endpoint(&named(addr, "api.test:8080")))
        .await
        .unwrap();
    assert_eq!(seen.local, addr);
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.authority.as_deref(), Some("api.test:8080"));
    assert_eq!(seen.host, None, "HTTP/2 carries the name in :authority");
}

#[tokio::test]
async fn endpoints_that_share_a_name_never_share_connections() {
    let a = backend("127.0.0.2", None).await;
    let b = backend("127.0.0.3", None).await;
    let targets = [a, b].map(|addr| (addr, named(addr, "api.test")));
    let balance = BalanceLayer::new(RoundRobin::new())
        .weighted()
        .layer(discover::connect(discover::fixed(targets), plain()));

    let mut answered: HashMap<SocketAddr, u64> = HashMap::new();
    for _ in 0..20 {
        let seen = ask(balance.clone()).await.unwrap();
        assert_eq!(seen.host.as_deref(), Some("api.test"));
        *answered.entry(seen.local).or_default() += 1;
    }
    // Every request reached the backend the balancer picked for it.
    let stats = balance.stats();
    for addr in [a, b] {
        assert_eq!(answered[&addr], stats.get(&addr).unwrap().picks, "{addr}");
    }
    assert_eq!(answered.values().sum::<u64>(), 20);
}

fn ca() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let pem = include_bytes!("tls/ca.pem");
    roots
        .add(CertificateDer::from_pem_slice(pem).unwrap())
        .unwrap();
    roots
}

/// A TLS server for `api.test` offering HTTP/2 and HTTP/1.1 by ALPN.
fn tls_server() -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = CertificateDer::from_pem_slice(include_bytes!("tls/api.test.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_slice(include_bytes!("tls/api.test.key")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

/// `https://` endpoints that trust the test CA and offer `alpn`.
fn https(
    alpn: &[&[u8]],
) -> MakeHttpEndpoint<
    Empty<Bytes>,
    impl Layer<ConnectTo, Service = HttpsConnector<ConnectTo>> + Clone,
> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let config = Arc::new(config);
    plain().https(tower::layer::layer_fn(move |tcp: ConnectTo| {
        HttpsConnector::from((tcp, config.clone()))
    }))
}

#[tokio::test]
async fn with_tls_the_name_is_the_server_name_and_the_certificate_is_checked_against_it() {
    let addr = backend("127.0.0.2", Some(tls_server())).await;
    for (alpn, version) in [(&b"http/1.1"[..], "HTTP/1.1"), (&b"h2"[..], "HTTP/2.0")] {
        let make = https(&[alpn]);
        let seen = ask(make.endpoint(&named(addr, "api.test"))).await.unwrap();
        assert_eq!(seen.local, addr);
        assert_eq!(seen.version, version);
        assert_eq!(seen.sni.as_deref(), Some("api.test"), "{version}");
        let name = seen.host.or(seen.authority);
        assert_eq!(name.as_deref(), Some("api.test"), "{version}");

        // The certificate names api.test only: presented as another name, or by its
        // address, the endpoint is refused.
        for wrong in [named(addr, "other.test"), Target::new(addr)] {
            let error = ask(make.endpoint(&wrong)).await.unwrap_err();
            let mut chain = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                chain.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            assert!(chain.contains("certificate"), "{wrong}: {chain}");
        }
    }
}
