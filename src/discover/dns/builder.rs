//! `DnsBuilder`: the names, the resolver and the timing, checked where they are given.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use super::refresh::Timing;
use super::resolve::{Query, Resolve};
use super::source::Dns;
use crate::discover::target::{check_dns_name, parse_port, split_host_port};
use crate::error::ConfigError;

/// The longest accepted duration for any timing setting: a day.
const LONGEST: Duration = Duration::from_secs(24 * 60 * 60);

/// Builds a [`Dns`] discovery stream: the names to resolve, the DNS servers to ask, and when
/// to ask again. Every setting is checked where it is given.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::discover::dns::DnsBuilder;
///
/// # fn main() -> Result<(), tower_lb::ConfigError> {
/// let dns = DnsBuilder::new()
///     .name("api.internal:8080")?
///     .srv("_grpc._tcp.search.internal")?
///     .nameserver("127.0.0.1:5353".parse().unwrap())
///     .ttl_floor(Duration::from_secs(2))?
///     .build()?;
/// # let _ = dns;
/// assert_eq!(DnsBuilder::new().name("api.internal").unwrap_err().setting(), "dns name");
/// assert!(DnsBuilder::new().name("api.internal:70000").is_err());
/// assert_eq!(DnsBuilder::new().srv("").unwrap_err().setting(), "dns srv name");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DnsBuilder {
    queries: Vec<Query>,
    servers: Servers,
    ip_strategy: LookupIpStrategy,
    timing: Timing,
}

#[derive(Clone, Debug)]
enum Servers {
    System,
    Listed(Vec<SocketAddr>),
    Custom(Box<(ResolverConfig, ResolverOpts)>),
}

impl Default for DnsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DnsBuilder {
    /// No names yet; the system's DNS configuration (`/etc/resolv.conf`); A and AAAA records;
    /// the default timing (see the [module docs](super)).
    pub fn new() -> Self {
        Self {
            queries: Vec::new(),
            servers: Servers::System,
            ip_strategy: LookupIpStrategy::Ipv4AndIpv6,
            timing: Timing::default(),
        }
    }

    /// Resolves `host:port`: every A and AAAA record of `host` is an endpoint on `port`,
    /// presented as `host:port`. An IP address (`10.0.0.7:80`, `[::1]:80`) is taken as is and
    /// never queried. The host is a DNS name (letters, digits, `-`, `_`, dots; a final dot makes
    /// it absolute, without one the resolver's search domains apply); the port is 1 to 65535.
    pub fn name(self, host_port: &str) -> Result<Self, ConfigError> {
        let error =
            |problem: String| ConfigError::new("dns name", format!("{host_port:?}: {problem}"));
        let (host, port) = split_host_port(host_port);
        let port = port.ok_or_else(|| error("needs a port: host:port".to_owned()))?;
        let port = parse_port(port).map_err(error)?;
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let query = match bracketed.unwrap_or(host).parse::<IpAddr>() {
            Ok(ip) => Query::Literal {
                given: host_port.into(),
                addr: SocketAddr::new(ip, port),
            },
            Err(_) if bracketed.is_some() => {
                return Err(error(format!("{host} is not an IPv6 address")));
            }
            Err(_) => {
                check_dns_name(host).map_err(error)?;
                Query::Host {
                    given: Arc::from(authority_of(host_port)),
                    host: host.into(),
                    port,
                }
            }
        };
        self.add(query, "dns name")
    }

    /// Resolves the SRV records of `name` (such as `_http._tcp.api.internal`): the records of
    /// the lowest priority whose targets have addresses give the endpoints, each target's
    /// addresses on the record's port, weighted by the record's weight. They are presented as
    /// `name` without its leading `_service._proto` labels (`api.internal`), with no port.
    pub fn srv(self, name: &str) -> Result<Self, ConfigError> {
        let error =
            |problem: String| ConfigError::new("dns srv name", format!("{name:?}: {problem}"));
        if name.is_empty() {
            return Err(error(
                "empty; give a name such as _http._tcp.api.internal".into(),
            ));
        }
        if split_host_port(name).1.is_some() {
            return Err(error(
                "an SRV name has no port: the records give the ports".into(),
            ));
        }
        if name.parse::<IpAddr>().is_ok() {
            return Err(error("an IP address has no SRV records".into()));
        }
        check_dns_name(name).map_err(error)?;
        let service = srv_service_domain(name);
        if service.is_empty() {
            return Err(error(
                "there is no domain after the _service._proto labels".into(),
            ));
        }
        let query = Query::Srv {
            given: name.into(),
            name: name.into(),
            authority: service.into(),
        };
        self.add(query, "dns srv name")
    }

    fn add(mut self, query: Query, setting: &'static str) -> Result<Self, ConfigError> {
        if self.queries.iter().any(|q| q.given() == query.given()) {
            return Err(ConfigError::new(
                setting,
                format!("{:?} is given twice", query.given()),
            ));
        }
        self.queries.push(query);
        Ok(self)
    }

    /// Asks the DNS server at `addr` (over UDP, and TCP for long answers) instead of the
    /// system's; call it again to add more servers, tried in turn. Search domains are not used.
    pub fn nameserver(mut self, addr: SocketAddr) -> Self {
        match &mut self.servers {
            Servers::Listed(servers) => servers.push(addr),
            _ => self.servers = Servers::Listed(vec![addr]),
        }
        self
    }

    /// Uses hickory's `config` and `options` (servers, search domains, DNS over TLS…) instead
    /// of the system's. Whatever they say, the cache is off (every resolution asks a server)
    /// and the IP strategy is this builder's.
    pub fn resolver_config(mut self, config: ResolverConfig, options: ResolverOpts) -> Self {
        self.servers = Servers::Custom(Box::new((config, options)));
        self
    }

    /// Which address records of a `host:port` name to use: both A and AAAA (the default),
    /// only one family, or one family and the other only if the first has none.
    pub fn ip_strategy(mut self, strategy: LookupIpStrategy) -> Self {
        self.ip_strategy = strategy;
        self
    }

    /// The shortest wait before a name is resolved again, whatever its TTL (default 5 s).
    /// From 1 ms to a day, and not above the cap.
    pub fn ttl_floor(mut self, floor: Duration) -> Result<Self, ConfigError> {
        check_duration("dns ttl_floor", floor)?;
        if floor > self.timing.ttl_cap {
            return Err(ConfigError::new(
                "dns ttl_floor",
                format!(
                    "{floor:?} is above the TTL cap of {:?}",
                    self.timing.ttl_cap
                ),
            ));
        }
        self.timing.ttl_floor = floor;
        Ok(self)
    }

    /// The longest wait before a name is resolved again, whatever its TTL (default 5 min).
    /// From 1 ms to a day, and not below the floor.
    pub fn ttl_cap(mut self, cap: Duration) -> Result<Self, ConfigError> {
        check_duration("dns ttl_cap", cap)?;
        if cap < self.timing.ttl_floor {
            return Err(ConfigError::new(
                "dns ttl_cap",
                format!(
                    "{cap:?} is below the TTL floor of {:?}",
                    self.timing.ttl_floor
                ),
            ));
        }
        self.timing.ttl_cap = cap;
        Ok(self)
    }

    /// After a failed or empty resolution, wait `initial`, doubling per failure in a row up to
    /// `max`, each wait taken at random between half of it and all of it (defaults: 1 s, 30 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Result<Self, ConfigError> {
        check_duration("dns backoff", initial)?;
        check_duration("dns backoff", max)?;
        if max < initial {
            return Err(ConfigError::new(
                "dns backoff",
                format!("the maximum {max:?} is below the initial {initial:?}"),
            ));
        }
        self.timing.backoff_initial = initial;
        self.timing.backoff_max = max;
        Ok(self)
    }

    /// How long one resolution (with an SRV name's target lookups) may take before it counts
    /// as failed (default 10 s). From 1 ms to a day.
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        check_duration("dns timeout", timeout)?;
        self.timing.timeout = timeout;
        Ok(self)
    }

    /// The discovery stream. Fails if no name was given, or if the system's DNS configuration
    /// cannot be read. Resolution starts when the stream is first polled (by the balancer's
    /// background task, on its tokio runtime).
    pub fn build(self) -> Result<Dns, ConfigError> {
        if self.queries.is_empty() {
            return Err(ConfigError::new(
                "dns names",
                "no name to resolve: give one with name() or srv()",
            ));
        }
        let resolver = self.resolver()?;
        Ok(Dns::new(self.queries, resolver, self.timing))
    }

    fn resolver(&self) -> Result<Arc<dyn Resolve>, ConfigError> {
        let (config, mut options) = match &self.servers {
            Servers::System => hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                ConfigError::new(
                    "dns resolver",
                    format!("cannot read the system's DNS configuration: {e}"),
                )
            })?,
            Servers::Listed(servers) => {
                let servers: Vec<NameServerConfig> = servers
                    .iter()
                    .flat_map(|addr| {
                        [Protocol::Udp, Protocol::Tcp]
                            .map(|protocol| NameServerConfig::new(*addr, protocol))
                    })
                    .collect();
                let config =
                    ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::from(servers));
                (config, ResolverOpts::default())
            }
            Servers::Custom(custom) => (custom.0.clone(), custom.1.clone()),
        };
        // Every resolution asks a server: the TTL rules here decide when, not a cache.
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        options.ip_strategy = self.ip_strategy;
        let resolver =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(options)
                .build();
        Ok(Arc::new(resolver))
    }
}

impl fmt::Debug for DnsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.queries.iter().map(|q| &**q.given()).collect();
        f.debug_struct("DnsBuilder")
            .field("names", &names)
            .field("servers", &self.servers)
            .field("ip_strategy", &self.ip_strategy)
            .field("timing", &self.timing)
            .finish()
    }
}

fn check_duration(setting: &'static str, duration: Duration) -> Result<(), ConfigError> {
    if duration < Duration::from_millis(1) {
        return Err(ConfigError::new(
            setting,
            format!("{duration:?} is below 1 ms"),
        ));
    }
    if duration > LONGEST {
        return Err(ConfigError::new(
            setting,
            format!("{duration:?} is longer than a day"),
        ));
    }
    Ok(())
}

/// `host:port` without a final dot on the host, as an authority.
fn authority_of(host_port: &str) -> String {
    match split_host_port(host_port) {
        (host, Some(port)) => format!("{}:{port}", host.trim_end_matches('.')),
        (host, None) => host.trim_end_matches('.').to_owned(),
    }
}

/// `_http._tcp.api.internal.` → `api.internal`: the leading underscore labels dropped.
fn srv_service_domain(name: &str) -> &str {
    let mut rest = name.trim_end_matches('.');
    while let Some(label) = rest.strip_prefix('_') {
        rest = label.split_once('.').map_or("", |(_, tail)| tail);
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(result: Result<DnsBuilder, ConfigError>) -> ConfigError {
        result.expect_err("rejected")
    }

    #[test]
    fn bad_names_are_rejected_with_the_setting_and_the_reason() {
        let b = DnsBuilder::new;
        for (given, why) in [
            ("api.internal", "needs a port"),
            ("api.internal:", "not a number"),
            ("api.internal:http", "not a number"),
            ("api.internal:0", "port 0"),
            ("api.internal:65536", "out of range (1 to 65535)"),
            ("api internal:80", "not allowed"),
            (":80", "empty"),
            ("[fe80::zz]:80", "not an IPv6 address"),
            ("a..b:80", "empty label"),
        ] {
            let error = rejected(b().name(given));
            assert_eq!(error.setting(), "dns name", "{given}");
            assert!(error.to_string().contains(why), "{given}: {error}");
        }
        for (given, why) in [
            ("", "empty"),
            ("_http._tcp.api:80", "no port"),
            ("10.0.0.1", "no SRV records"),
            ("_http._tcp", "no domain"),
            ("_http._tcp.bad name", "not allowed"),
        ] {
            let error = rejected(b().srv(given));
            assert_eq!(error.setting(), "dns srv name", "{given}");
            assert!(error.to_string().contains(why), "{given}: {error}");
        }
        let twice = rejected(b().name("a.test:80").unwrap().name("a.test:80"));
        assert!(twice.to_string().contains("given twice"), "{twice}");
        assert_eq!(b().build().unwrap_err().setting(), "dns names");
    }

    #[test]
    fn bad_timings_are_rejected_with_the_setting_and_the_reason() {
        let b = DnsBuilder::new;
        let second = Duration::from_secs(1);
        for (error, setting, why) in [
            (
                rejected(b().ttl_floor(Duration::ZERO)),
                "dns ttl_floor",
                "below 1 ms",
            ),
            (
                rejected(b().ttl_floor(Duration::from_secs(301))),
                "dns ttl_floor",
                "above the TTL cap",
            ),
            (
                rejected(b().ttl_cap(second)),
                "dns ttl_cap",
                "below the TTL floor",
            ),
            (
                rejected(b().ttl_cap(LONGEST * 2)),
                "dns ttl_cap",
                "longer than a day",
            ),
            (
                rejected(b().backoff(second * 2, second)),
                "dns backoff",
                "below the initial",
            ),
            (
                rejected(b().backoff(Duration::ZERO, second)),
                "dns backoff",
                "below 1 ms",
            ),
            (
                rejected(b().timeout(Duration::MAX)),
                "dns timeout",
                "longer than a day",
            ),
        ] {
            assert_eq!(error.setting(), setting);
            assert!(error.to_string().contains(why), "{error}");
        }
        let timing = b()
            .ttl_floor(second)
            .unwrap()
            .ttl_cap(second * 2)
            .unwrap()
            .timing;
        assert_eq!((timing.ttl_floor, timing.ttl_cap), (second, second * 2));
    }

    #[test]
    fn names_are_presented_as_given_and_srv_names_by_their_service_domain() {
        let builder = DnsBuilder::new()
            .name("api.test.:8080")
            .unwrap()
            .name("[::1]:80")
            .unwrap()
            .srv("_http._tcp.web.test.")
            .unwrap();
        let given: Vec<&str> = builder.queries.iter().map(|q| &**q.given()).collect();
        assert_eq!(given, ["api.test:8080", "[::1]:80", "_http._tcp.web.test."]);
        assert!(matches!(&builder.queries[1], Query::Literal { addr, .. } if addr.port() == 80));
        assert!(
            matches!(&builder.queries[2], Query::Srv { authority, .. } if &**authority == "web.test")
        );
        assert_eq!(
            srv_service_domain("web.service.consul"),
            "web.service.consul"
        );
    }

    #[test]
    fn listed_servers_or_a_hickory_configuration_build_without_a_runtime() {
        let named = || DnsBuilder::new().name("api.test:80").unwrap();
        let listed = named()
            .nameserver("127.0.0.1:53".parse().unwrap())
            .nameserver("127.0.0.1:5353".parse().unwrap());
        assert!(matches!(&listed.servers, Servers::Listed(s) if s.len() == 2));
        assert!(listed.build().is_ok());
        let custom = named().resolver_config(ResolverConfig::default(), ResolverOpts::default());
        assert!(custom.build().is_ok());
    }
}
