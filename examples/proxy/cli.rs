//! The command line: where to listen, the backends and how to balance them, health checks,
//! the admin listener, trusted proxies, timeouts and limits.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tower_lb::discover::dns::DnsBuilder;

use crate::app::{self, defaults, ActiveHealth, Backend, BackendSpec, Config, StrategySpec};
use crate::server::MIN_HEADER_SIZE;

/// The help text.
pub(crate) fn usage() -> String {
    let strategies: Vec<String> = app::STRATEGIES
        .iter()
        .map(|(name, what)| format!("    {name:<28} {what}"))
        .collect();
    let secs = |d: Duration| format!("{}s", d.as_secs());
    format!(
        "usage: proxy [OPTIONS]

Listening:
  --listen ADDR              where to listen (default 127.0.0.1:8080)
  --admin-listen ADDR        where to serve the stats; keep it private (default {admin})
  --admin PATH               the stats' path on the admin listener (default /_lb/stats)

Backends and balancing:
  --backend ADDR[=WEIGHT]    a backend (repeatable): ip:port, or host:port, whose every
                             address is a backend, resolved again as its DNS TTL runs out
                             (WEIGHT applies to each); none: three demo backends on loopback
  --backend-srv NAME         backends from the SRV records of NAME (repeatable), such as
                             _http._tcp.api.internal: ports and weights from the records
  --dns-server ADDR          ask this DNS server (ip:port, repeatable) instead of the
                             system's
  --strategy NAME            how to spread requests (default round-robin):
{strategies}
                             KEY is ip, header:NAME, cookie:NAME or path; requests
                             without it go to each backend in turn
  --bounded-load C           hashing: no backend takes more than C times the average
                             number of requests in flight (C >= 1, e.g. 1.25)
  --health PATH              probe GET PATH on every backend (every 2 s; 2xx/3xx is healthy,
                             3 failures in a row take a backend out, 2 successes bring it
                             back); without it, only failing requests eject a backend
  --trust-proxy CIDR         a proxy or load balancer in front (repeatable, e.g. 10.0.0.0/8):
                             its X-Forwarded-For / Forwarded name the client for hash-ip, and
                             its X-Forwarded-Proto / X-Forwarded-Host are kept

Timeouts (DURATION: 500ms, 30s, 2m; a bare number is seconds):
  --header-timeout D         for a client to send a request head; on HTTP/1.1 also the
                             longest wait for the next request (default {header})
  --idle-timeout D           a connection with no request in progress is closed (default {idle})
  --body-timeout D           the longest pause in a request body: 408 (default {body})
  --connect-timeout D        to open a connection to a backend (default {connect}s)
  --upstream-timeout D       for a backend's response head (504), then between parts of
                             its body (the response is cut); counts against the backend
                             (default {upstream})
  --tunnel-idle-timeout D    a WebSocket tunnel with no traffic either way is closed
                             (default {tunnel})
  --shutdown-timeout D       on SIGTERM/SIGINT, how long requests in progress may take to
                             finish before they are cut (default {shutdown})

Limits and the backend pool:
  --max-header-size SIZE     the largest request head, 431 above it (default {size} KiB,
                             at least 8 KiB; SIZE: bytes, or 16k, 1m)
  --upstream-idle-timeout D  how long an idle connection to a backend is kept (default {pool_idle})
  --upstream-max-idle N      idle connections kept per backend (default {pool_max})",
        admin = DEFAULT_ADMIN_LISTEN,
        strategies = strategies.join("\n"),
        header = secs(defaults::HEADER_TIMEOUT),
        idle = secs(defaults::IDLE_TIMEOUT),
        body = secs(defaults::BODY_TIMEOUT),
        connect = defaults::CONNECT_TIMEOUT.as_secs(),
        upstream = secs(defaults::UPSTREAM_TIMEOUT),
        shutdown = secs(defaults::SHUTDOWN_TIMEOUT),
        tunnel = secs(defaults::TUNNEL_IDLE_TIMEOUT),
        size = defaults::MAX_HEADER_SIZE / 1024,
        pool_idle = secs(defaults::POOL_IDLE_TIMEOUT),
        pool_max = defaults::POOL_MAX_IDLE,
    )
}

/// The admin listener's default address: loopback only.
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";

/// The longest timeout accepted: a day (anything longer is a mistake, and would overflow a
/// deadline somewhere).
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses `500ms`, `30s`, `2m`, `1h` or a bare number of seconds, from 1 ms to a day
/// (`allow_zero`: 0 too).
pub(crate) fn parse_duration(
    flag: &str,
    value: &str,
    allow_zero: bool,
) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{flag} {value:?} is not a duration (like 500ms, 30s, 2m)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "{flag} {value:?}: unknown unit {unit:?} (ms, s, m or h)"
            ))
        }
    };
    // NaN and infinities fail here too.
    if !seconds.is_finite() || seconds > MAX_DURATION.as_secs_f64() {
        return Err(format!("{flag} {value:?} is longer than a day"));
    }
    let duration = Duration::from_secs_f64(seconds);
    if duration < Duration::from_millis(1) && !(allow_zero && duration.is_zero()) {
        return Err(format!("{flag} {value:?} is too short (at least 1ms)"));
    }
    Ok(duration)
}

/// Parses a size in bytes: `32768`, `32k`, `1m` (k and m are 1024 and 1024²).
fn parse_size(flag: &str, value: &str) -> Result<usize, String> {
    let lower = value.trim().to_ascii_lowercase();
    let (number, scale) = match lower.strip_suffix(['k', 'm']) {
        Some(number) if lower.ends_with('k') => (number, 1024),
        Some(number) => (number, 1024 * 1024),
        None => (lower.as_str(), 1),
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{flag} {value:?} is not a size (like 32768, 32k, 1m)"))
}

/// Parses a network (`10.0.0.0/8`) or a single address.
fn parse_network(value: &str) -> Result<IpNet, String> {
    let value = value.trim();
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("--trust-proxy {value:?} is not a network (like 10.0.0.0/8) or an address")
        })
}

/// What the command line asked for.
pub(crate) struct Args {
    pub(crate) listen: SocketAddr,
    pub(crate) admin_listen: SocketAddr,
    pub(crate) config: Config,
}

/// Parses the command line (`--flag value` or `--flag=value`). `Err("")` asks for the help
/// text; any other `Err` says what is wrong.
pub(crate) fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("a socket address");
    let mut admin_listen: SocketAddr = DEFAULT_ADMIN_LISTEN.parse().expect("a socket address");
    let mut config = Config::new(Vec::new());
    let mut bounded_load = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let addr = value()?;
                listen = addr
                    .parse()
                    .map_err(|_| format!("--listen {addr:?} is not an ip:port address"))?;
            }
            "--backend" => match Backend::parse(&value()?)? {
                BackendSpec::Addr(backend) => {
                    if config.backends.iter().any(|b| b.addr == backend.addr) {
                        return Err(format!("backend {} is given twice", backend.addr));
                    }
                    config.backends.push(backend);
                }
                BackendSpec::Name(name, weight) => {
                    if config.dns.names.iter().any(|(n, _)| *n == name) {
                        return Err(format!("backend {name} is given twice"));
                    }
                    config.dns.names.push((name, weight));
                }
            },
            "--backend-srv" => {
                let name = value()?;
                DnsBuilder::new()
                    .srv(&name)
                    .map_err(|e| format!("--backend-srv {name:?}: {e}"))?;
                if config.dns.srv.contains(&name) {
                    return Err(format!("--backend-srv {name} is given twice"));
                }
                config.dns.srv.push(name);
            }
            "--dns-server" => {
                let server = value()?;
                let addr = server.parse::<SocketAddr>().map_err(|_| {
                    format!(
                        "--dns-server {server:?} is not an ip:port address (such as 127.0.0.1:53)"
                    )
                })?;
                let resolver = config.dns.resolver.take().unwrap_or_default();
                config.dns.resolver = Some(resolver.nameserver(addr));
            }
            "--strategy" => config.strategy = StrategySpec::parse(&value()?)?,
            "--bounded-load" => {
                let factor = value()?;
                let factor = factor
                    .parse::<f64>()
                    .map_err(|_| format!("--bounded-load {factor:?} is not a number"))?;
                bounded_load = Some(factor);
            }
            "--health" => config.health = Some(ActiveHealth::new(&value()?)),
            "--admin" => {
                let path = value()?;
                app::check_admin_path(&path)?;
                config.admin_path = path;
            }
            "--admin-listen" => {
                let addr = value()?;
                admin_listen = addr
                    .parse()
                    .map_err(|_| format!("--admin-listen {addr:?} is not an ip:port address"))?;
            }
            "--trust-proxy" => config.trusted_proxies.push(parse_network(&value()?)?),
            "--header-timeout" => {
                config.server.header_timeout = parse_duration(&flag, &value()?, false)?;
            }
            "--idle-timeout" => {
                config.server.idle_timeout = parse_duration(&flag, &value()?, false)?;
            }
            "--tunnel-idle-timeout" => {
                config.tunnel_idle_timeout = parse_duration(&flag, &value()?, false)?;
            }
            "--body-timeout" => config.body_timeout = parse_duration(&flag, &value()?, false)?,
            "--connect-timeout" => {
                config.upstream.connect_timeout = parse_duration(&flag, &value()?, false)?;
            }
            "--upstream-timeout" => {
                config.upstream.timeout = parse_duration(&flag, &value()?, false)?;
            }
            "--shutdown-timeout" => {
                config.server.shutdown_timeout = parse_duration(&flag, &value()?, true)?;
            }
            "--upstream-idle-timeout" => {
                config.upstream.pool_idle_timeout = parse_duration(&flag, &value()?, false)?;
            }
            "--upstream-max-idle" => {
                let n = value()?;
                config.upstream.pool_max_idle = n
                    .parse()
                    .map_err(|_| format!("--upstream-max-idle {n:?} is not a whole number"))?;
            }
            "--max-header-size" => {
                let size = parse_size(&flag, &value()?)?;
                if size < MIN_HEADER_SIZE {
                    return Err(format!(
                        "--max-header-size {size} is below the minimum of 8 KiB ({MIN_HEADER_SIZE})"
                    ));
                }
                config.server.max_header_size = size;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if let Some(factor) = bounded_load {
        config.strategy = config.strategy.bounded_load(factor)?;
    }
    if listen == admin_listen && listen.port() != 0 {
        return Err(format!(
            "--listen and --admin-listen are both {listen}: the stats must not be public"
        ));
    }
    Ok(Args {
        listen,
        admin_listen,
        config,
    })
}
