//! The command line: `--listen`, `--backend` and `--backend-srv` (repeatable), `--dns-server`,
//! `--strategy`, `--bounded-load`, `--health`, `--admin`.

use std::net::SocketAddr;

use tower_lb::discover::dns::DnsBuilder;

use crate::app::{self, ActiveHealth, Backend, BackendSpec, Config, StrategySpec};

/// The help text.
pub(crate) fn usage() -> String {
    let strategies: Vec<String> = app::STRATEGIES
        .iter()
        .map(|(name, what)| format!("    {name:<28} {what}"))
        .collect();
    format!(
        "usage: proxy [--listen ADDR] [--backend ADDR[=WEIGHT]]... [--backend-srv NAME]...
             [--dns-server ADDR]... [--strategy NAME] [--bounded-load C] [--health PATH]
             [--admin PATH]

  --listen ADDR            where to listen (default 127.0.0.1:8080)
  --backend ADDR[=WEIGHT]  a backend (repeatable): ip:port, or host:port, whose every
                           address is a backend, resolved again as its DNS TTL runs out
                           (WEIGHT applies to each); none: three demo backends on loopback
  --backend-srv NAME       backends from the SRV records of NAME (repeatable), such as
                           _http._tcp.api.internal: ports and weights from the records
  --dns-server ADDR        ask this DNS server (ip:port, repeatable) instead of the
                           system's
  --strategy NAME          how to spread requests (default round-robin):
{}
                           KEY is ip, header:NAME, cookie:NAME or path; requests
                           without it go to each backend in turn
  --bounded-load C         hashing: no backend takes more than C times the average
                           number of requests in flight (C >= 1, e.g. 1.25)
  --health PATH            probe GET PATH on every backend (every 2 s; 2xx/3xx is healthy,
                           3 failures in a row take a backend out, 2 successes bring it
                           back); without it, only failing requests eject a backend
  --admin PATH             where to serve the stats as JSON (default /_lb/stats)",
        strategies.join("\n")
    )
}

/// What the command line asked for.
pub(crate) struct Args {
    pub(crate) listen: SocketAddr,
    pub(crate) config: Config,
}

/// Parses the command line (`--flag value` or `--flag=value`). `Err("")` asks for the help
/// text; any other `Err` says what is wrong.
pub(crate) fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("a socket address");
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
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if let Some(factor) = bounded_load {
        config.strategy = config.strategy.bounded_load(factor)?;
    }
    Ok(Args { listen, config })
}
