//! Request keys for `http::Request`s.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderName, COOKIE, FORWARDED};
use http::Request;
use ipnet::IpNet;

use crate::error::ConfigError;
use crate::key::{KeyHasher, RequestKey};

/// The address of the peer a request came from, as a request extension.
///
/// Servers put it on each request (the proxy example does; axum's `ConnectInfo<SocketAddr>` is
/// read too with the `axum` feature) so [`ClientIp`] can find the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// Keys requests by the client's IP address (its text form, as nginx's `$remote_addr`).
///
/// The client is the connection's peer ([`PeerAddr`], or axum's `ConnectInfo<SocketAddr>`).
/// Forwarding headers (`Forwarded: for=`, then `X-Forwarded-For`) are believed **only** when
/// the peer is a configured trusted proxy: otherwise any client could pick its backend by
/// forging the header. Through trusted proxies, the client is the last address in the chain
/// that is not itself a trusted proxy. A request with no peer address has no key.
///
/// ```
/// use tower_lb::http::ClientIp;
///
/// let key = ClientIp::new().trust_proxies(["10.0.0.0/8", "127.0.0.1/32"]).unwrap();
/// # let _ = key;
/// ```
#[derive(Clone, Debug, Default)]
pub struct ClientIp {
    trusted: Arc<[IpNet]>,
}

impl ClientIp {
    /// The connection's peer address; forwarding headers are ignored.
    pub fn new() -> Self {
        Self::default()
    }

    /// Believes forwarding headers from peers in these networks (CIDR, e.g. `10.0.0.0/8`, or a
    /// bare address). An unparsable network is rejected.
    pub fn trust_proxies<I, S>(self, networks: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let trusted = networks
            .into_iter()
            .map(|net| {
                let net = net.as_ref().trim();
                net.parse::<IpNet>()
                    .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        ConfigError::new(
                            "trusted proxy",
                            format!("{net:?} is not an IP network (like 10.0.0.0/8) or address"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trusted: trusted.into(),
        })
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for `request`, or `None` without a peer address.
    pub fn client_ip<B>(&self, request: &Request<B>) -> Option<IpAddr> {
        let peer = peer_addr(request)?.ip();
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return Some(peer);
        }
        let chain = forwarded_for(request);
        let mut client = peer;
        // Walk from the nearest hop outwards; stop at the first address we cannot vouch for.
        for hop in chain.iter().rev() {
            match hop {
                Some(ip) => {
                    client = *ip;
                    if !self.is_trusted(*ip) {
                        break;
                    }
                }
                // "unknown" or an obfuscated identifier: nothing further can be believed.
                None => break,
            }
        }
        Some(client)
    }
}

impl<B> RequestKey<Request<B>> for ClientIp {
    fn hash_key(&self, request: &Request<B>, hasher: &mut KeyHasher) -> bool {
        match self.client_ip(request) {
            Some(ip) => write!(hasher, "{ip}").is_ok(),
            None => false,
        }
    }
}

fn peer_addr<B>(request: &Request<B>) -> Option<SocketAddr> {
    if let Some(PeerAddr(addr)) = request.extensions().get::<PeerAddr>() {
        return Some(*addr);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0);
    }
    None
}

/// The forwarding chain, client first: `Forwarded: for=` if present, else `X-Forwarded-For`.
/// `None` entries are hops that did not disclose an address.
fn forwarded_for<B>(request: &Request<B>) -> Vec<Option<IpAddr>> {
    let headers = request.headers();
    let forwarded: Vec<Option<IpAddr>> = headers
        .get_all(FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_node(value.trim().trim_matches('"')))
            })
        })
        .collect();
    if !forwarded.is_empty() {
        return forwarded;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|hop| parse_node(hop.trim()))
        .collect()
}

/// An address as forwarding headers write it: `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80`, `::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let inner = node.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

/// Keys requests by the value of a header (the first, if repeated); requests without it have
/// no key.
#[derive(Clone, Debug)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Keys by header `name`; an invalid header name is rejected.
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        let name = HeaderName::try_from(name)
            .map_err(|e| ConfigError::new("header key", format!("{name:?}: {e}")))?;
        Ok(Self { name })
    }
}

impl<B> RequestKey<Request<B>> for HeaderKey {
    fn hash_key(&self, request: &Request<B>, hasher: &mut KeyHasher) -> bool {
        match request.headers().get(&self.name) {
            Some(value) => {
                hasher.write(value.as_bytes());
                true
            }
            None => false,
        }
    }
}

/// Keys requests by their path (without the query). Every request has one.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathKey;

impl<B> RequestKey<Request<B>> for PathKey {
    fn hash_key(&self, request: &Request<B>, hasher: &mut KeyHasher) -> bool {
        hasher.write(request.uri().path().as_bytes());
        true
    }
}

/// Keys requests by the value of a cookie (session affinity); requests without it have no key.
#[derive(Clone, Debug)]
pub struct CookieKey {
    name: Arc<str>,
}

impl CookieKey {
    /// Keys by cookie `name`; an empty name or one with `=`, `;`, or whitespace is rejected.
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        if name.is_empty()
            || name
                .chars()
                .any(|c| c == '=' || c == ';' || c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                "cookie key",
                format!("{name:?} is not a cookie name"),
            ));
        }
        Ok(Self { name: name.into() })
    }
}

impl<B> RequestKey<Request<B>> for CookieKey {
    fn hash_key(&self, request: &Request<B>, hasher: &mut KeyHasher) -> bool {
        let value = request
            .headers()
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                (name == &*self.name).then_some(value)
            });
        match value {
            Some(value) => {
                hasher.write(value.as_bytes());
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/a/b?q=1");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(()).unwrap();
        request
            .extensions_mut()
            .insert(PeerAddr(peer.parse().unwrap()));
        request
    }

    #[test]
    fn without_trusted_proxies_a_forged_forwarding_header_is_ignored() {
        let key = ClientIp::new();
        let forged = request("203.0.113.9:5555", &[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(key.client_ip(&forged), Some("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn through_trusted_proxies_the_last_untrusted_hop_is_the_client() {
        let key = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
        // The client claims 1.1.1.1, but the first proxy saw 198.51.100.7.
        let chained = request(
            "10.0.0.2:80",
            &[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.0.0.5")],
        );
        assert_eq!(
            key.client_ip(&chained),
            Some("198.51.100.7".parse().unwrap())
        );
        // A direct, untrusted peer is the client even if it sends the header.
        let direct = request("198.51.100.8:80", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(
            key.client_ip(&direct),
            Some("198.51.100.8".parse().unwrap())
        );
    }

    #[test]
    fn forwarded_header_is_preferred_and_parsed() {
        let key = ClientIp::new().trust_proxies(["127.0.0.1"]).unwrap();
        let request = request(
            "127.0.0.1:80",
            &[
                (
                    "forwarded",
                    "for=\"[2001:db8::1]:4711\";proto=https, for=127.0.0.1",
                ),
                ("x-forwarded-for", "9.9.9.9"),
            ],
        );
        assert_eq!(
            key.client_ip(&request),
            Some("2001:db8::1".parse().unwrap())
        );
    }

    #[test]
    fn bad_configuration_is_rejected_with_the_reason() {
        let error = ClientIp::new().trust_proxies(["10.0.0.0/33"]).unwrap_err();
        assert!(error.to_string().contains("not an IP network"), "{error}");
        assert!(HeaderKey::new("bad header").is_err());
        assert!(CookieKey::new("a=b").is_err());
    }

    #[test]
    fn header_path_and_cookie_keys_read_their_part() {
        let hash = |key: &dyn RequestKey<Request<()>>, request: &Request<()>| {
            let mut hasher = KeyHasher::default();
            key.hash_key(request, &mut hasher).then(|| hasher.finish())
        };
        let plain = |bytes: &str| {
            let mut hasher = KeyHasher::default();
            hasher.write(bytes.as_bytes());
            Some(hasher.finish())
        };
        let r = request(
            "1.2.3.4:1",
            &[("x-user", "ada"), ("cookie", "theme=dark; session=s3cr3t")],
        );
        assert_eq!(hash(&HeaderKey::new("x-user").unwrap(), &r), plain("ada"));
        assert_eq!(hash(&HeaderKey::new("x-none").unwrap(), &r), None);
        assert_eq!(hash(&PathKey, &r), plain("/a/b"));
        assert_eq!(
            hash(&CookieKey::new("session").unwrap(), &r),
            plain("s3cr3t")
        );
        assert_eq!(hash(&CookieKey::new("missing").unwrap(), &r), None);
        assert_eq!(hash(&ClientIp::new(), &r), plain("1.2.3.4"));
    }
}
