//! One resolution of one name: the queries, and how their records become targets.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use tower::BoxError;

use super::error::{DnsError, DnsErrorKind};
use crate::discover::Target;
use crate::weight::Weight;

pub(super) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A configured name.
#[derive(Clone, Debug)]
pub(super) enum Query {
    /// A/AAAA records of `host`, each address on `port`.
    Host {
        given: Arc<str>,
        host: Arc<str>,
        port: u16,
    },
    /// An IP address given as a name: one answer, never re-resolved.
    Literal { given: Arc<str>, addr: SocketAddr },
    /// SRV records of `name`; targets are presented as `authority`.
    Srv {
        given: Arc<str>,
        name: Arc<str>,
        authority: Arc<str>,
    },
}

impl Query {
    /// The name as configured.
    pub(super) fn given(&self) -> &Arc<str> {
        match self {
            Query::Host { given, .. } | Query::Literal { given, .. } | Query::Srv { given, .. } => {
                given
            }
        }
    }
}

/// What one lookup found.
#[derive(Clone, Debug)]
pub(super) struct Records<T> {
    pub(super) items: Vec<T>,
    /// The smallest TTL among the records (and the CNAMEs that led to them), in seconds.
    pub(super) ttl: u32,
}

/// One SRV record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SrvRecord {
    pub(super) priority: u16,
    pub(super) weight: u16,
    pub(super) port: u16,
    /// The target host, without its final dot; `"."` (service not available) is `""`.
    pub(super) target: String,
}

/// Why a lookup found nothing.
#[derive(Debug)]
pub(super) enum LookupError {
    NoSuchName,
    NoRecords,
    Failed(BoxError),
}

/// Looks records up. The real one is hickory's resolver with its cache off; the unit tests
/// script one, so the timing rules run on tokio's paused clock.
pub(super) trait Resolve: Send + Sync + 'static {
    /// The A and AAAA records of `host` (as the configured IP strategy asks).
    fn lookup_ip(&self, host: &str) -> BoxFuture<Result<Records<IpAddr>, LookupError>>;
    /// The SRV records of `name`.
    fn lookup_srv(&self, name: &str) -> BoxFuture<Result<Records<SrvRecord>, LookupError>>;
}

impl Resolve for TokioResolver {
    fn lookup_ip(&self, host: &str) -> BoxFuture<Result<Records<IpAddr>, LookupError>> {
        let resolver = self.clone();
        let host = host.to_owned();
        Box::pin(async move {
            let lookup = resolver.lookup_ip(host).await.map_err(lookup_error)?;
            let lookup = lookup.as_lookup();
            let items = lookup
                .record_iter()
                .filter_map(|record| match record.data() {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect();
            Ok(Records {
                items,
                ttl: min_ttl(lookup.record_iter()),
            })
        })
    }

    fn lookup_srv(&self, name: &str) -> BoxFuture<Result<Records<SrvRecord>, LookupError>> {
        let resolver = self.clone();
        let name = name.to_owned();
        Box::pin(async move {
            let lookup = resolver
                .lookup(name, RecordType::SRV)
                .await
                .map_err(lookup_error)?;
            let items = lookup
                .record_iter()
                .filter_map(|record| match record.data() {
                    RData::SRV(srv) => Some(SrvRecord {
                        priority: srv.priority(),
                        weight: srv.weight(),
                        port: srv.port(),
                        target: srv.target().to_ascii().trim_end_matches('.').to_owned(),
                    }),
                    _ => None,
                })
                .collect();
            Ok(Records {
                items,
                ttl: min_ttl(lookup.record_iter()),
            })
        })
    }
}

fn min_ttl<'a>(records: impl Iterator<Item = &'a hickory_resolver::proto::rr::Record>) -> u32 {
    records.map(|r| r.ttl()).min().unwrap_or(0)
}

fn lookup_error(error: hickory_resolver::ResolveError) -> LookupError {
    if error.is_nx_domain() {
        LookupError::NoSuchName
    } else if error.is_no_records_found() {
        LookupError::NoRecords
    } else {
        LookupError::Failed(Box::new(error))
    }
}

/// What a good resolution found: the targets, and how long the answer may be trusted.
#[derive(Clone, Debug)]
pub(super) struct Answer {
    pub(super) targets: Vec<Target>,
    pub(super) ttl: Duration,
}

/// Resolves `query` once.
pub(super) async fn resolve(resolver: &dyn Resolve, query: &Query) -> Result<Answer, DnsError> {
    match query {
        Query::Literal { addr, .. } => Ok(Answer {
            targets: vec![Target::new(*addr)],
            ttl: Duration::MAX,
        }),
        Query::Host { given, host, port } => {
            let records = resolver
                .lookup_ip(host)
                .await
                .map_err(|e| failure(given, e))?;
            let mut ips = records.items;
            ips.sort();
            ips.dedup();
            if ips.is_empty() {
                return Err(DnsError::new(given.clone(), DnsErrorKind::NoRecords, None));
            }
            let targets = ips
                .into_iter()
                .map(|ip| {
                    Target::new(SocketAddr::new(ip, *port)).with_checked_authority(given.clone())
                })
                .collect();
            Ok(Answer {
                targets,
                ttl: Duration::from_secs(records.ttl.into()),
            })
        }
        Query::Srv {
            given,
            name,
            authority,
        } => resolve_srv(resolver, given, name, authority).await,
    }
}

/// SRV: the records of the lowest priority whose targets have addresses, each target's
/// addresses on the record's port, weighted by the record's weight (0 counts as 1; the weights
/// of records that land on one address add up).
async fn resolve_srv(
    resolver: &dyn Resolve,
    given: &Arc<str>,
    name: &str,
    authority: &Arc<str>,
) -> Result<Answer, DnsError> {
    let srv = resolver
        .lookup_srv(name)
        .await
        .map_err(|e| failure(given, e))?;
    let mut ttl = srv.ttl;
    let mut by_priority: BTreeMap<u16, Vec<SrvRecord>> = BTreeMap::new();
    // A target of "." says the service is not available there (RFC 2782).
    for record in srv.items.into_iter().filter(|r| !r.target.is_empty()) {
        by_priority.entry(record.priority).or_default().push(record);
    }
    for (priority, records) in by_priority {
        let mut hosts: Vec<&str> = records.iter().map(|r| r.target.as_str()).collect();
        hosts.sort_unstable();
        hosts.dedup();
        let lookups = hosts.iter().map(|host| resolver.lookup_ip(host));
        let found = futures_util::future::join_all(lookups).await;
        let mut addresses: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
        for (host, result) in hosts.iter().zip(found) {
            match result {
                Ok(records) => {
                    ttl = ttl.min(records.ttl);
                    addresses.insert(host, records.items);
                }
                // A target without addresses is as good as absent.
                Err(LookupError::NoSuchName | LookupError::NoRecords) => {
                    tracing::debug!(name = %given, target = host, priority, "SRV target has no address; skipped");
                }
                Err(LookupError::Failed(error)) => {
                    let error: BoxError = format!("SRV target {host}: {error}").into();
                    return Err(DnsError::new(
                        given.clone(),
                        DnsErrorKind::Failed,
                        Some(error),
                    ));
                }
            }
        }
        let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        for record in &records {
            for ip in addresses.get(record.target.as_str()).into_iter().flatten() {
                let weight = weights
                    .entry(SocketAddr::new(*ip, record.port))
                    .or_default();
                *weight = weight.saturating_add(u32::from(record.weight.max(1)));
            }
        }
        if weights.is_empty() {
            continue;
        }
        let targets = weights
            .into_iter()
            .map(|(addr, weight)| {
                let weight = Weight::new(weight.min(Weight::MAX.get())).unwrap_or(Weight::ONE);
                Target::new(addr)
                    .with_checked_authority(authority.clone())
                    .with_weight(weight)
            })
            .collect();
        return Ok(Answer {
            targets,
            ttl: Duration::from_secs(ttl.into()),
        });
    }
    Err(DnsError::new(given.clone(), DnsErrorKind::NoRecords, None))
}

fn failure(given: &Arc<str>, error: LookupError) -> DnsError {
    match error {
        LookupError::NoSuchName => DnsError::new(given.clone(), DnsErrorKind::NoSuchName, None),
        LookupError::NoRecords => DnsError::new(given.clone(), DnsErrorKind::NoRecords, None),
        LookupError::Failed(error) => {
            DnsError::new(given.clone(), DnsErrorKind::Failed, Some(error))
        }
    }
}

/// A scripted resolver for the unit tests.
#[cfg(test)]
pub(super) mod fake {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// A scripted answer.
    #[derive(Clone, Debug)]
    pub(crate) enum Scripted {
        Ips(Vec<IpAddr>, u32),
        Srv(Vec<SrvRecord>, u32),
        NoSuchName,
        NoRecords,
        Fail,
        /// Never answers.
        Hang,
    }

    /// Answers each name with its script (the last entry repeats) and records every query with
    /// the (tokio) time it was made.
    #[derive(Default)]
    pub(crate) struct FakeResolver {
        scripts: Mutex<HashMap<String, Vec<Scripted>>>,
        pub(crate) queries: Mutex<Vec<(String, tokio::time::Instant)>>,
    }

    impl FakeResolver {
        pub(crate) fn script(&self, name: &str, answers: Vec<Scripted>) {
            self.scripts
                .lock()
                .unwrap()
                .insert(name.to_owned(), answers);
        }

        /// When `name` was queried, relative to `start`.
        pub(crate) fn times(&self, name: &str, start: tokio::time::Instant) -> Vec<Duration> {
            let queries = self.queries.lock().unwrap();
            let times = queries.iter().filter(|(n, _)| n == name);
            times.map(|(_, at)| *at - start).collect()
        }

        fn next(&self, name: &str) -> Scripted {
            self.queries
                .lock()
                .unwrap()
                .push((name.to_owned(), tokio::time::Instant::now()));
            let mut scripts = self.scripts.lock().unwrap();
            let script = scripts.get_mut(name);
            match script {
                Some(script) if script.len() > 1 => script.remove(0),
                Some(script) if script.len() == 1 => script[0].clone(),
                _ => Scripted::NoSuchName,
            }
        }
    }

    fn answer<T>(
        scripted: Scripted,
        pick: fn(Scripted) -> Option<Records<T>>,
    ) -> BoxFuture<Result<Records<T>, LookupError>>
    where
        T: Send + 'static,
    {
        match scripted {
            Scripted::NoSuchName => Box::pin(async { Err(LookupError::NoSuchName) }),
            Scripted::NoRecords => Box::pin(async { Err(LookupError::NoRecords) }),
            Scripted::Fail => Box::pin(async { Err(LookupError::Failed("SERVFAIL".into())) }),
            Scripted::Hang => Box::pin(std::future::pending()),
            other => {
                let records = pick(other).ok_or(LookupError::NoRecords);
                Box::pin(async move { records })
            }
        }
    }

    impl Resolve for FakeResolver {
        fn lookup_ip(&self, host: &str) -> BoxFuture<Result<Records<IpAddr>, LookupError>> {
            answer(self.next(host), |s| match s {
                Scripted::Ips(items, ttl) => Some(Records { items, ttl }),
                _ => None,
            })
        }

        fn lookup_srv(&self, name: &str) -> BoxFuture<Result<Records<SrvRecord>, LookupError>> {
            answer(self.next(name), |s| match s {
                Scripted::Srv(items, ttl) => Some(Records { items, ttl }),
                _ => None,
            })
        }
    }

    /// The query for `name:80`.
    pub(crate) fn host(name: &str) -> Query {
        Query::Host {
            given: format!("{name}:80").into(),
            host: name.into(),
            port: 80,
        }
    }

    pub(crate) fn ips(ips: &[&str], ttl: u32) -> Scripted {
        Scripted::Ips(ips.iter().map(|ip| ip.parse().unwrap()).collect(), ttl)
    }

    pub(crate) fn srv(priority: u16, weight: u16, port: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port,
            target: target.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn srv_query() -> Query {
        Query::Srv {
            given: "_http._tcp.api.test".into(),
            name: "_http._tcp.api.test".into(),
            authority: "api.test".into(),
        }
    }

    fn weights(answer: &Answer) -> Vec<(String, u32)> {
        answer
            .targets
            .iter()
            .map(|t| (t.addr().to_string(), t.weight().get()))
            .collect()
    }

    #[tokio::test]
    async fn host_names_give_every_address_on_the_port_with_the_name() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "api.test",
            vec![ips(
                &["10.0.0.2", "10.0.0.1", "2001:db8::1", "10.0.0.1"],
                30,
            )],
        );
        let query = Query::Host {
            given: "api.test:8080".into(),
            host: "api.test".into(),
            port: 8080,
        };
        let answer = resolve(&*fake, &query).await.unwrap();
        assert_eq!(answer.ttl, Duration::from_secs(30));
        let addrs: Vec<String> = answer
            .targets
            .iter()
            .map(|t| t.addr().to_string())
            .collect();
        assert_eq!(
            addrs,
            ["10.0.0.1:8080", "10.0.0.2:8080", "[2001:db8::1]:8080"]
        );
        assert!(answer
            .targets
            .iter()
            .all(|t| t.authority() == Some("api.test:8080") && t.weight() == Weight::ONE));
    }

    #[tokio::test]
    async fn srv_uses_the_lowest_priority_and_maps_weights() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "_http._tcp.api.test",
            vec![Scripted::Srv(
                vec![
                    srv(10, 3, 8001, "a.api.test"),
                    srv(10, 0, 8002, "b.api.test"),
                    srv(20, 50, 8003, "backup.api.test"),
                ],
                60,
            )],
        );
        fake.script("a.api.test", vec![ips(&["10.0.0.1"], 20)]);
        fake.script("b.api.test", vec![ips(&["10.0.0.2"], 90)]);
        fake.script("backup.api.test", vec![ips(&["10.0.0.3"], 5)]);
        let answer = resolve(&*fake, &srv_query()).await.unwrap();
        assert_eq!(
            weights(&answer),
            [("10.0.0.1:8001".into(), 3), ("10.0.0.2:8002".into(), 1)],
            "priority 20 is not used; weight 0 counts as 1"
        );
        assert_eq!(
            answer.ttl,
            Duration::from_secs(20),
            "the smallest TTL of the records used"
        );
        assert!(answer
            .targets
            .iter()
            .all(|t| t.authority() == Some("api.test")));
        assert!(fake
            .times("backup.api.test", tokio::time::Instant::now())
            .is_empty());
    }

    #[tokio::test]
    async fn srv_skips_targets_without_addresses_and_adds_up_records_on_one_address() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "_http._tcp.api.test",
            vec![Scripted::Srv(
                vec![
                    srv(1, 5, 80, ""),
                    srv(1, 5, 80, "gone.api.test"),
                    srv(2, 2, 80, "a.api.test"),
                    srv(2, 3, 80, "also-a.api.test"),
                ],
                60,
            )],
        );
        fake.script("gone.api.test", vec![Scripted::NoSuchName]);
        fake.script("a.api.test", vec![ips(&["10.0.0.1"], 60)]);
        fake.script("also-a.api.test", vec![ips(&["10.0.0.1"], 60)]);
        let answer = resolve(&*fake, &srv_query()).await.unwrap();
        assert_eq!(
            weights(&answer),
            [("10.0.0.1:80".into(), 5)],
            "priority 1 has no usable target, so priority 2 is used; its two records add up"
        );
    }

    #[tokio::test]
    async fn a_failing_srv_target_fails_the_resolution_and_no_usable_target_is_no_records() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "_http._tcp.api.test",
            vec![Scripted::Srv(
                vec![srv(1, 1, 80, "a.api.test"), srv(1, 1, 80, "b.api.test")],
                60,
            )],
        );
        fake.script("a.api.test", vec![ips(&["10.0.0.1"], 60)]);
        fake.script("b.api.test", vec![Scripted::Fail]);
        let error = resolve(&*fake, &srv_query()).await.unwrap_err();
        assert_eq!(error.kind(), DnsErrorKind::Failed);
        assert!(
            error
                .to_string()
                .contains("SRV target b.api.test: SERVFAIL"),
            "{error}"
        );

        fake.script("b.api.test", vec![Scripted::NoRecords]);
        fake.script("a.api.test", vec![Scripted::NoRecords]);
        let error = resolve(&*fake, &srv_query()).await.unwrap_err();
        assert_eq!(error.kind(), DnsErrorKind::NoRecords);

        fake.script(
            "_http._tcp.api.test",
            vec![Scripted::Srv(vec![srv(1, 1, 80, "")], 60)],
        );
        let error = resolve(&*fake, &srv_query()).await.unwrap_err();
        assert_eq!(
            error.kind(),
            DnsErrorKind::NoRecords,
            "'.' means not available"
        );
    }
}
