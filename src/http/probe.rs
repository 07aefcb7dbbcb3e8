//! Probing an endpoint with an HTTP GET over a hyper-util client.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;

use http::header::{HeaderValue, USER_AGENT};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Uri};
use http_body::Body;
use hyper_util::client::legacy::connect::{Connect as HyperConnect, HttpConnector};
use hyper_util::client::legacy::Client;
use tower::BoxError;

use crate::error::ConfigError;
use crate::health::active::probe::{BoxProbeFuture, Probe, ProbeError};

/// Response bytes read to let the connection go back to the pool; a longer body is dropped
/// unread (which closes its connection).
const DRAIN_LIMIT: usize = 64 * 1024;

/// Statuses that count as healthy by default: 2xx and 3xx, as HAProxy's `httpchk`.
const DEFAULT_EXPECTED: RangeInclusive<u16> = 200..=399;

type TargetFn<K> = dyn Fn(&K) -> Result<Uri, ProbeError> + Send + Sync;

/// A probe that sends `GET path` to the endpoint over a hyper-util client and expects a status
/// within a set (2xx–3xx by default).
///
/// The target is `http://{key}{path}` for `SocketAddr` keys ([`HttpProbe::new`]),
/// `http://{address_of(key)}{path}` ([`HttpProbe::with_address`]) or any URI a function of
/// the key returns ([`HttpProbe::with_uri`], e.g. for https with a TLS connector). The path is
/// checked when the probe is built. The client may be the one the endpoints use: probes then
/// share its connection pool. The probe reads up to 64 KiB of the response body so its
/// connection can be reused; the health check's timeout covers the whole exchange.
///
/// `B` is the client's request body type (sent empty: `B::default()`), `C` its connector.
///
/// ```
/// use std::net::SocketAddr;
/// use http_body_util::Empty;
/// use hyper::body::Bytes;
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower_lb::{discover, health::HealthCheck, http::HttpProbe};
///
/// # fn main() -> Result<(), tower_lb::ConfigError> {
/// let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
/// let probe = HttpProbe::new(&client, "/healthz")?.expect_statuses([200..=204])?;
/// let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
/// let checked = HealthCheck::new(discover::fixed([(addr, ())]), probe);
/// # let _ = checked;
/// assert!(HttpProbe::new(&client, "healthz").is_err(), "a path starts with '/'");
/// # Ok(())
/// # }
/// ```
pub struct HttpProbe<K, B, C = HttpConnector> {
    client: Client<C, B>,
    target: Arc<TargetFn<K>>,
    expected: Arc<[RangeInclusive<u16>]>,
}

impl<B, C: Clone> HttpProbe<SocketAddr, B, C> {
    /// Probes `http://{key}{path}`, where the key is the endpoint's address. `path` may have a
    /// query (`/health?full=1`); anything that is not an absolute path is rejected.
    pub fn new(client: &Client<C, B>, path: &str) -> Result<Self, ConfigError> {
        Self::with_address(client, path, |addr: &SocketAddr| *addr)
    }
}

impl<K, B, C: Clone> HttpProbe<K, B, C> {
    /// Probes `http://{address_of(key)}{path}`. `path` is checked as in [`HttpProbe::new`].
    pub fn with_address<A>(
        client: &Client<C, B>,
        path: &str,
        address_of: A,
    ) -> Result<Self, ConfigError>
    where
        A: Fn(&K) -> SocketAddr + Send + Sync + 'static,
    {
        let path = probe_path(path)?;
        Ok(Self::with_target(client, move |key: &K| {
            Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(address_of(key).to_string())
                .path_and_query(path.clone())
                .build()
                .map_err(ProbeError::new)
        }))
    }

    /// Probes the URI `uri_of(key)` (scheme, authority, path and query).
    pub fn with_uri<U>(client: &Client<C, B>, uri_of: U) -> Self
    where
        U: Fn(&K) -> Uri + Send + Sync + 'static,
    {
        Self::with_target(client, move |key: &K| Ok(uri_of(key)))
    }

    fn with_target<T>(client: &Client<C, B>, target: T) -> Self
    where
        T: Fn(&K) -> Result<Uri, ProbeError> + Send + Sync + 'static,
    {
        Self {
            client: client.clone(),
            target: Arc::new(target),
            expected: Arc::from([DEFAULT_EXPECTED]),
        }
    }
}

impl<K, B, C> HttpProbe<K, B, C> {
    /// Replaces the healthy statuses with `ranges` (one status is `200..=200`). Each range
    /// must be non-empty and within `100..=999`, and there must be at least one.
    pub fn expect_statuses<R>(mut self, ranges: R) -> Result<Self, ConfigError>
    where
        R: IntoIterator<Item = RangeInclusive<u16>>,
    {
        let ranges: Vec<_> = ranges.into_iter().collect();
        if ranges.is_empty() {
            return Err(ConfigError::new(
                "expected statuses",
                "no status would count as healthy; give at least one range",
            ));
        }
        if let Some(bad) = ranges
            .iter()
            .find(|r| r.is_empty() || *r.start() < 100 || *r.end() > 999)
        {
            return Err(ConfigError::new(
                "expected statuses",
                format!("{bad:?} is not a non-empty range of HTTP statuses (100..=999)"),
            ));
        }
        self.expected = ranges.into();
        Ok(self)
    }
}

fn probe_path(path: &str) -> Result<PathAndQuery, ConfigError> {
    if !path.starts_with('/') {
        return Err(ConfigError::new(
            "probe path",
            format!("{path:?} must be an absolute path starting with '/'"),
        ));
    }
    let parsed: PathAndQuery = path
        .parse()
        .map_err(|e| ConfigError::new("probe path", format!("{path:?}: {e}")))?;
    // The parser stops at a fragment; a fragment is never sent, so it is a mistake here.
    if parsed.as_str() != path {
        return Err(ConfigError::new(
            "probe path",
            format!("{path:?} is not a plain path and query"),
        ));
    }
    Ok(parsed)
}

impl<K, B, C, S> Probe<K, S> for HttpProbe<K, B, C>
where
    C: HyperConnect + Clone + Send + Sync + 'static,
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Future = BoxProbeFuture;

    fn probe(&mut self, key: &K, _: &S) -> BoxProbeFuture {
        let uri = match (self.target)(key) {
            Ok(uri) => uri,
            Err(error) => return Box::pin(std::future::ready(Err(error))),
        };
        let mut request = Request::new(B::default());
        *request.uri_mut() = uri;
        request.headers_mut().insert(
            USER_AGENT,
            HeaderValue::from_static(concat!(
                "tower-lb/",
                env!("CARGO_PKG_VERSION"),
                " health-check"
            )),
        );
        let response = self.client.request(request);
        let expected = self.expected.clone();
        Box::pin(async move {
            let response = response.await.map_err(ProbeError::new)?;
            let status = response.status().as_u16();
            drain(response.into_body()).await;
            if expected.iter().any(|range| range.contains(&status)) {
                Ok(())
            } else {
                Err(ProbeError::unexpected_status(status))
            }
        })
    }
}

/// Reads a short body to its end so hyper can reuse the connection; the status has already
/// decided the probe, so a body error only means the connection is not reused.
async fn drain<Bd: Body + Unpin>(mut body: Bd) {
    let mut read = 0;
    while read <= DRAIN_LIMIT {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += hyper::body::Buf::remaining(data);
                }
            }
            Some(Err(_)) | None => return,
        }
    }
}

impl<K, B, C: Clone> Clone for HttpProbe<K, B, C> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            target: self.target.clone(),
            expected: self.expected.clone(),
        }
    }
}

impl<K, B, C> fmt::Debug for HttpProbe<K, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProbe")
            .field("expected_statuses", &self.expected)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(probe_path("/healthz").unwrap().as_str(), "/healthz");
        assert_eq!(
            probe_path("/health?full=1").unwrap().as_str(),
            "/health?full=1"
        );
        for bad in [
            "healthz",
            "",
            "http://host/healthz",
            "/a b",
            "/x#frag",
            "/\n",
        ] {
            let error = probe_path(bad).unwrap_err();
            assert_eq!(error.setting(), "probe path", "{bad:?}");
        }
    }
}
