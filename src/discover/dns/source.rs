//! The `Dns` discovery stream: every name's answers merged into one endpoint set, yielded as
//! the differences.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use tower::discover::Change;

use super::error::DnsError;
use super::refresh::{refresh, Outcome, Timing};
use super::resolve::{Query, Resolve};
use crate::discover::Target;

/// A discovery stream of the addresses DNS gives for a set of names, keyed by address; built
/// with [`DnsBuilder`](super::DnsBuilder). See the [module docs](super) for the rules.
///
/// It never ends. Each item is a change to the endpoint set, or a [`DnsError`] for a
/// resolution that failed or found nothing (the name's last addresses are kept).
pub struct Dns {
    refreshes: SelectAll<BoxStream<'static, (usize, Outcome)>>,
    names: Box<[Arc<str>]>,
    /// Each name's last good answer.
    answers: Vec<HashMap<SocketAddr, Target>>,
    /// What the consumer was told, per address.
    published: HashMap<SocketAddr, Target>,
    changes: VecDeque<Change<SocketAddr, Target>>,
}

impl Dns {
    pub(super) fn new(queries: Vec<Query>, resolver: Arc<dyn Resolve>, timing: Timing) -> Self {
        let names = queries.iter().map(|q| q.given().clone()).collect();
        let answers = queries.iter().map(|_| HashMap::new()).collect();
        let refreshes = queries
            .into_iter()
            .enumerate()
            .map(|(index, query)| {
                refresh(query, resolver.clone(), timing)
                    .map(move |outcome| (index, outcome))
                    .boxed()
            })
            .collect();
        Self {
            refreshes,
            names,
            answers,
            published: HashMap::new(),
            changes: VecDeque::new(),
        }
    }

    /// The addresses the stream has inserted and not removed, with their targets.
    pub fn endpoints(&self) -> impl Iterator<Item = &Target> {
        self.published.values()
    }

    /// Takes in name `index`'s new answer and queues the changes it makes to the merged set.
    fn apply(&mut self, index: usize, answer: Vec<Target>) {
        let name = &self.names[index];
        let new: HashMap<SocketAddr, Target> = answer.into_iter().map(|t| (t.addr(), t)).collect();
        let old = std::mem::replace(&mut self.answers[index], new);
        let mut removed = Vec::new();
        let touched: BTreeSet<SocketAddr> = old
            .keys()
            .chain(self.answers[index].keys())
            .copied()
            .collect();
        for addr in touched {
            // An address several names give belongs to the first of them that gives it.
            let wanted = self.answers.iter().find_map(|answer| answer.get(&addr));
            match (self.published.get(&addr), wanted) {
                (None, Some(target)) => {
                    tracing::info!(name = %name, %target, "DNS: endpoint added");
                    self.published.insert(addr, target.clone());
                    self.changes.push_back(Change::Insert(addr, target.clone()));
                }
                (Some(was), Some(target)) if was != target => {
                    tracing::info!(name = %name, %target, was = %was, "DNS: endpoint changed");
                    self.published.insert(addr, target.clone());
                    self.changes.push_back(Change::Insert(addr, target.clone()));
                }
                (Some(was), None) => {
                    tracing::info!(name = %name, target = %was, "DNS: endpoint removed");
                    self.published.remove(&addr);
                    removed.push(Change::Remove(addr));
                }
                _ => {}
            }
        }
        // Insertions first, so a set that is replaced is never empty in between.
        self.changes.extend(removed);
    }
}

impl Stream for Dns {
    type Item = Result<Change<SocketAddr, Target>, DnsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.changes.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match self.refreshes.poll_next_unpin(cx) {
                Poll::Ready(Some((index, Outcome::Answer(answer, next)))) => {
                    tracing::debug!(
                        name = %self.names[index],
                        addresses = answer.targets.len(),
                        next_in = ?next,
                        "DNS: resolved"
                    );
                    self.apply(index, answer.targets);
                }
                Poll::Ready(Some((index, Outcome::Failed(error, retry_in)))) => {
                    let kept = self.answers[index].len();
                    let error = error.with_retry(kept, retry_in);
                    tracing::debug!(%error, "DNS: resolution failed");
                    return Poll::Ready(Some(Err(error)));
                }
                // Every name's refresh runs forever.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl fmt::Debug for Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dns")
            .field("names", &self.names)
            .field("endpoints", &self.published.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::timeout;

    use super::super::resolve::fake::*;
    use super::*;

    /// The changes and errors `dns` yields within `wait` of paused time, as text.
    async fn next_items(dns: &mut Dns, wait: Duration) -> Vec<String> {
        let mut items = Vec::new();
        let _ = timeout(wait, async {
            while let Some(item) = dns.next().await {
                items.push(match item {
                    Ok(Change::Insert(addr, target)) => format!("+{addr} w{}", target.weight()),
                    Ok(Change::Remove(addr)) => format!("-{addr}"),
                    Err(error) => format!("error {:?} kept {}", error.kind(), error.kept()),
                });
            }
        })
        .await;
        items
    }

    fn timing() -> Timing {
        Timing {
            ttl_floor: Duration::from_secs(1),
            ..Timing::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_answer_yields_only_the_difference() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "api.test",
            vec![
                ips(&["10.0.0.1", "10.0.0.2"], 10),
                ips(&["10.0.0.1", "10.0.0.2"], 10),
                ips(&["10.0.0.2", "10.0.0.3"], 10),
            ],
        );
        let mut dns = Dns::new(vec![host("api.test")], fake.clone(), timing());
        let first = next_items(&mut dns, Duration::from_secs(5)).await;
        assert_eq!(first, ["+10.0.0.1:80 w1", "+10.0.0.2:80 w1"]);
        let same = next_items(&mut dns, Duration::from_secs(10)).await;
        assert!(
            same.is_empty(),
            "an unchanged answer changes nothing: {same:?}"
        );
        let changed = next_items(&mut dns, Duration::from_secs(10)).await;
        assert_eq!(changed, ["+10.0.0.3:80 w1", "-10.0.0.1:80"]);
        let mut endpoints: Vec<String> = dns.endpoints().map(|t| t.addr().to_string()).collect();
        endpoints.sort();
        assert_eq!(endpoints, ["10.0.0.2:80", "10.0.0.3:80"]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_empty_answers_keep_the_last_set_and_are_reported() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "api.test",
            vec![
                ips(&["10.0.0.1"], 10),
                Scripted::Fail,
                Scripted::NoSuchName,
                Scripted::NoRecords,
                ips(&["10.0.0.2"], 10),
            ],
        );
        let mut dns = Dns::new(vec![host("api.test")], fake.clone(), timing());
        let items = next_items(&mut dns, Duration::from_secs(30)).await;
        assert_eq!(
            items,
            [
                "+10.0.0.1:80 w1",
                "error Failed kept 1",
                "error NoSuchName kept 1",
                "error NoRecords kept 1",
                "+10.0.0.2:80 w1",
                "-10.0.0.1:80",
            ],
            "a replaced set is never empty: the insertion comes first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_two_names_give_stays_until_neither_does() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "a.test",
            vec![ips(&["10.0.0.1"], 10), ips(&[], 10), ips(&["10.0.0.9"], 10)],
        );
        fake.script(
            "b.test",
            vec![
                ips(&["10.0.0.1"], 10),
                ips(&["10.0.0.1"], 10),
                ips(&["10.0.0.8"], 10),
            ],
        );
        let mut dns = Dns::new(vec![host("a.test"), host("b.test")], fake.clone(), timing());
        let first = next_items(&mut dns, Duration::from_secs(5)).await;
        assert_eq!(first, ["+10.0.0.1:80 w1"], "one endpoint for one address");
        let owner = dns
            .endpoints()
            .next()
            .unwrap()
            .authority()
            .map(str::to_owned);
        assert_eq!(
            owner.as_deref(),
            Some("a.test:80"),
            "the first name that gives it"
        );

        // a.test answers nothing (kept, reported), then only 10.0.0.9; b.test still gives
        // 10.0.0.1, which so passes to b.test (its name changes: an Insert).
        let second = next_items(&mut dns, Duration::from_secs(10)).await;
        assert_eq!(
            second,
            [
                "error NoRecords kept 1",
                "+10.0.0.1:80 w1",
                "+10.0.0.9:80 w1"
            ]
        );
        let owner = dns
            .endpoints()
            .find(|t| t.addr().to_string() == "10.0.0.1:80")
            .and_then(|t| t.authority().map(str::to_owned));
        assert_eq!(owner.as_deref(), Some("b.test:80"));

        // Now b.test drops it too: removed.
        let third = next_items(&mut dns, Duration::from_secs(60)).await;
        assert_eq!(third, ["+10.0.0.8:80 w1", "-10.0.0.1:80"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_weight_is_a_change() {
        let fake = Arc::new(FakeResolver::default());
        fake.script(
            "_http._tcp.api.test",
            vec![
                Scripted::Srv(vec![srv(1, 1, 80, "a.api.test")], 10),
                Scripted::Srv(vec![srv(1, 7, 80, "a.api.test")], 10),
            ],
        );
        fake.script("a.api.test", vec![ips(&["10.0.0.1"], 60)]);
        let query = Query::Srv {
            given: "_http._tcp.api.test".into(),
            name: "_http._tcp.api.test".into(),
            authority: "api.test".into(),
        };
        let mut dns = Dns::new(vec![query], fake.clone(), timing());
        let items = next_items(&mut dns, Duration::from_secs(15)).await;
        assert_eq!(items, ["+10.0.0.1:80 w1", "+10.0.0.1:80 w7"]);
    }
}
