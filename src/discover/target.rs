//! Where a discovered endpoint is: an address, the name to present to it, and a weight.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::error::ConfigError;
use crate::weight::Weight;

/// Where a discovered endpoint is: the address to connect to, the name to present to it (the
/// HTTP authority and the TLS server name), and its weight.
///
/// Registries that know names yield these: `discover::dns` (feature `dns`) gives each
/// address the name it was found under and, for SRV records, the record's weight.
/// [`connect`](crate::discover::connect) turns them into endpoint services; `http`'s
/// `MakeHttpEndpoint` (feature `http`) connects to [`addr`](Self::addr) and sends
/// [`authority`](Self::authority).
///
/// ```
/// use std::net::SocketAddr;
/// use tower_lb::discover::Target;
/// use tower_lb::weight::Weight;
///
/// let addr: SocketAddr = "10.0.0.7:8080".parse().unwrap();
/// let target = Target::new(addr)
///     .with_authority("api.internal:8080")?
///     .with_weight(Weight::new(3)?);
/// assert_eq!(target.authority(), Some("api.internal:8080"));
/// assert_eq!(target.to_string(), "10.0.0.7:8080 (api.internal:8080, weight 3)");
/// assert!(Target::new(addr).with_authority("not a name").is_err());
/// # Ok::<(), tower_lb::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    addr: SocketAddr,
    authority: Option<Arc<str>>,
    weight: Weight,
}

impl Target {
    /// The endpoint at `addr`, presented by its address, with weight 1.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: None,
            weight: Weight::ONE,
        }
    }

    /// Presents the endpoint as `authority`: a host name or IP address, with an optional port
    /// (`api.internal`, `api.internal:8443`, `[::1]:80`). Anything else is rejected.
    pub fn with_authority(mut self, authority: &str) -> Result<Self, ConfigError> {
        check_authority(authority)?;
        self.authority = Some(Arc::from(authority));
        Ok(self)
    }

    /// Gives the endpoint `weight`.
    pub fn with_weight(mut self, weight: Weight) -> Self {
        self.weight = weight;
        self
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name to present (host, and port if one was given), if the endpoint has one; without
    /// one, present the address.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// The endpoint's weight.
    pub fn weight(&self) -> Weight {
        self.weight
    }

    /// Shares an authority checked once for every address of a name.
    #[cfg(feature = "dns")]
    pub(crate) fn with_checked_authority(mut self, authority: Arc<str>) -> Self {
        self.authority = Some(authority);
        self
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.authority {
            Some(authority) => write!(f, "{} ({authority}, weight {})", self.addr, self.weight),
            None => write!(f, "{} (weight {})", self.addr, self.weight),
        }
    }
}

/// Checks `host[:port]`, where host is a DNS name or an IP address (IPv6 in brackets).
pub(crate) fn check_authority(authority: &str) -> Result<(), ConfigError> {
    let error =
        |problem: String| ConfigError::new("authority", format!("{authority:?}: {problem}"));
    let (host, port) = split_host_port(authority);
    if let Some(port) = port {
        parse_port(port).map_err(error)?;
    }
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => match v6.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => Ok(()),
            _ => Err(error(format!("{v6:?} is not an IPv6 address"))),
        },
        None if host.parse::<IpAddr>().is_ok() => Ok(()),
        None => check_dns_name(host).map_err(error),
    }
}

/// Splits `host:port` at the last colon outside brackets; `port` is `None` without one.
pub(crate) fn split_host_port(s: &str) -> (&str, Option<&str>) {
    match s.rfind(':') {
        Some(colon) if !s[colon..].contains(']') && s[..colon].matches(':').count() == 0 => {
            (&s[..colon], Some(&s[colon + 1..]))
        }
        Some(colon) if s.starts_with('[') && s[..colon].ends_with(']') => {
            (&s[..colon], Some(&s[colon + 1..]))
        }
        _ => (s, None),
    }
}

/// A port to connect to: a number from 1 to 65535.
pub(crate) fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    match port.parse::<u32>() {
        Ok(0) => Err("port 0 cannot be connected to".to_owned()),
        Ok(p) if p <= u32::from(u16::MAX) => Ok(p as u16),
        _ => Err(format!("port {port} is out of range (1 to 65535)")),
    }
}

/// Checks a DNS name as written in configuration: dot-separated labels of ASCII letters,
/// digits, `-` and `_` (used by SRV names), each 1 to 63 bytes, 253 bytes in all, with an
/// optional final dot. Internationalized names are given in their `xn--` form.
pub(crate) fn check_dns_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if bare.len() > 253 {
        return Err(format!(
            "the name is {} bytes long; 253 at most",
            bare.len()
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err("the name has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err(format!("the label {label:?} is longer than 63 bytes"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{bad:?} is not allowed in a host name (letters, digits, '-', '_' and '.'; \
                 give internationalized names in their xn-- form)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("the label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_checked() {
        for good in [
            "api.internal",
            "api.internal:8443",
            "api.internal.",
            "10.0.0.7:80",
            "[::1]:80",
            "[::1]",
            "_grpc._tcp.example",
            "xn--bcher-kva.example",
        ] {
            assert!(check_authority(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("api internal", "not allowed"),
            ("api..internal", "empty label"),
            ("api.internal:0", "port 0"),
            ("api.internal:70000", "out of range"),
            ("api.internal:http", "not a number"),
            ("api.internal:", "not a number"),
            ("[10.0.0.1]:80", "not an IPv6 address"),
            ("-api.internal", "starts or ends with '-'"),
            ("bücher.example", "xn--"),
        ] {
            let err = check_authority(bad).unwrap_err();
            assert_eq!(err.setting(), "authority");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(check_authority(&long)
            .unwrap_err()
            .to_string()
            .contains("63"));
    }

    #[test]
    fn host_and_port_split_at_the_last_colon_outside_brackets() {
        assert_eq!(split_host_port("a.b:80"), ("a.b", Some("80")));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some("80")));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }
}
