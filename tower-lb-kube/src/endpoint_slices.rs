//! `EndpointSlices`: the discovery stream over one Service's slices.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{Stream, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;
use tokio::time::Sleep;
use tower::discover::Change;

use crate::backoff::ExponentialBackoff;
use crate::error::{ConfigError, Error};
use crate::state::{PortSelector, SliceSet};

/// The first delay after a failed list or watch.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(800);
/// The longest delay between failed lists or watches.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The label Kubernetes puts on every EndpointSlice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type EventStream = Pin<Box<dyn Stream<Item = Result<Event<EndpointSlice>, watcher::Error>> + Send>>;

/// A discovery stream of a Kubernetes Service's endpoints, from its `discovery.k8s.io/v1`
/// EndpointSlices: `Insert(addr, addr)` when an endpoint becomes ready, `Remove(addr)` when it
/// starts terminating, stops being ready or goes away.
///
/// Keys and services are the endpoints' socket addresses (the pod IP and the selected port);
/// `tower_lb::discover::connect` maps them to endpoint services. See the
/// [crate docs](crate) for the rules and the decisions behind them.
///
/// The stream never ends: failures are reported as [`Error`] items, retried after a backoff
/// (see [`EndpointSlices::backoff`]), and the balancer keeps its last endpoint set meanwhile.
pub struct EndpointSlices {
    api: Api<EndpointSlice>,
    service: String,
    /// Built at the first poll, so that settings can still change before.
    events: Option<EventStream>,
    backoff: ExponentialBackoff,
    /// While it runs, the watcher is not polled (kube's watcher retries at its next poll).
    backing_off: Option<Pin<Box<Sleep>>>,
    state: SliceSet,
    ready: VecDeque<Result<Change<SocketAddr, SocketAddr>, Error>>,
}

impl EndpointSlices {
    /// The endpoints of Service `service` in `namespace`, at the slices' only port (see
    /// [`port_name`](Self::port_name) for Services with several).
    ///
    /// Both names must be valid Kubernetes names (a DNS label: at most 63 lowercase letters,
    /// digits and `-`, starting and ending with a letter or digit).
    pub fn new(client: kube::Client, namespace: &str, service: &str) -> Result<Self, ConfigError> {
        check_label("namespace", namespace)?;
        Self::from_api(Api::namespaced(client, namespace), service)
    }

    /// The endpoints of Service `service` as seen through `api` (for example
    /// `Api::default_namespaced(client)`).
    pub fn from_api(api: Api<EndpointSlice>, service: &str) -> Result<Self, ConfigError> {
        check_label("service", service)?;
        Ok(Self {
            api,
            service: service.to_owned(),
            events: None,
            backoff: ExponentialBackoff::new(DEFAULT_BACKOFF_MIN, DEFAULT_BACKOFF_MAX),
            backing_off: None,
            state: SliceSet::new(PortSelector::Only),
            ready: VecDeque::new(),
        })
    }

    /// Balances over the port named `name` (the Service port's name, e.g. `grpc`), resolved
    /// in each slice: slices of one Service may carry it under different numbers.
    pub fn port_name(mut self, name: &str) -> Result<Self, ConfigError> {
        if name.is_empty() || name.len() > 63 {
            return Err(ConfigError::new(
                "port_name",
                format!("{name:?} is not a port name (1 to 63 characters)"),
            ));
        }
        self.state = SliceSet::new(PortSelector::Named(name.to_owned()));
        Ok(self)
    }

    /// The delay after a failed list or watch: `min` at first, doubling up to `max`, each
    /// drawn from the upper half of its range, and back to `min` after a success. The defaults
    /// are kube's and client-go's: [`DEFAULT_BACKOFF_MIN`] (800 ms) up to
    /// [`DEFAULT_BACKOFF_MAX`] (30 s), kind to a struggling API server.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Result<Self, ConfigError> {
        if min.is_zero() {
            return Err(ConfigError::new(
                "backoff",
                "a zero minimum would retry a failing API server in a busy loop",
            ));
        }
        if max < min {
            return Err(ConfigError::new(
                "backoff",
                format!("the maximum {max:?} is below the minimum {min:?}"),
            ));
        }
        self.backoff = ExponentialBackoff::new(min, max);
        Ok(self)
    }

    fn events(&mut self) -> &mut EventStream {
        self.events.get_or_insert_with(|| {
            let selector = format!("{SERVICE_NAME_LABEL}={}", self.service);
            let config = watcher::Config::default().labels(&selector);
            watcher(self.api.clone(), config).boxed()
        })
    }
}

impl Stream for EndpointSlices {
    type Item = Result<Change<SocketAddr, SocketAddr>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(item) = this.ready.pop_front() {
                return Poll::Ready(Some(item));
            }
            if let Some(sleep) = &mut this.backing_off {
                std::task::ready!(sleep.as_mut().poll(cx));
                this.backing_off = None;
            }
            match this.events().as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    // The watcher announces every list attempt with `Init`: only a complete
                    // list or a watch event is progress (kube's own `StreamBackoff` resets on
                    // any event, so failing lists would never back off further than `min`).
                    if !matches!(event, Event::Init | Event::InitApply(_)) {
                        this.backoff.reset();
                    }
                    let mut out = Vec::new();
                    this.state.apply(event, &mut out);
                    this.ready.extend(out);
                }
                Poll::Ready(Some(Err(error))) => {
                    let delay = this.backoff.next_delay();
                    tracing::warn!(
                        service = %this.service,
                        %error,
                        ?delay,
                        "EndpointSlice watch failed; retrying after a backoff"
                    );
                    this.backing_off = Some(Box::pin(tokio::time::sleep(delay)));
                    return Poll::Ready(Some(Err(Error::Watch(error))));
                }
                // The watcher retries forever and the backoff never gives up, so this does not
                // happen; if it did, a new watcher starts with a list.
                Poll::Ready(None) => this.events = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl fmt::Debug for EndpointSlices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointSlices")
            .field("service", &self.service)
            .field("backoff", &self.backoff)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Kubernetes names of Services and namespaces are DNS labels (RFC 1123).
fn check_label(setting: &'static str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::new(
            setting,
            format!(
                "{name:?} is not a Kubernetes name (1 to 63 lowercase letters, digits and '-', \
                 starting and ending with a letter or digit)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use k8s_openapi::api::discovery::v1::EndpointPort;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use tokio::time::Instant;

    use super::*;

    /// A source whose watcher is replaced by `events`; records when each event is taken.
    fn scripted(
        events: Vec<Result<Event<EndpointSlice>, watcher::Error>>,
    ) -> (EndpointSlices, Arc<Mutex<Vec<Instant>>>) {
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                .unwrap();
        let mut source = EndpointSlices::new(client, "default", "echo")
            .unwrap()
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .unwrap();
        let taken = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&taken);
        source.events = Some(
            futures_util::stream::iter(events)
                .chain(futures_util::stream::pending())
                .inspect(move |_| record.lock().unwrap().push(Instant::now()))
                .boxed(),
        );
        (source, taken)
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_and_a_complete_list_resets_the_backoff() {
        let failure = || Err(watcher::Error::NoResourceVersion);
        let slice = EndpointSlice {
            address_type: "IPv4".to_owned(),
            endpoints: Vec::new(),
            metadata: ObjectMeta::default(),
            ports: Some(vec![EndpointPort {
                port: Some(80),
                ..EndpointPort::default()
            }]),
        };
        let (mut source, taken) = scripted(vec![
            // Failed lists: the watcher says `Init` before each attempt.
            Ok(Event::Init),
            failure(),
            Ok(Event::Init),
            failure(),
            Ok(Event::Init),
            failure(),
            Ok(Event::Init),
            Ok(Event::InitApply(slice)),
            Ok(Event::InitDone),
            failure(),
            Ok(Event::Init),
        ]);
        let start = Instant::now();
        for _ in 0..4 {
            assert!(matches!(source.next().await, Some(Err(Error::Watch(_)))));
        }
        // Nothing follows the last `Init`: the stream is pending.
        let more = tokio::time::timeout(Duration::from_secs(60), source.next()).await;
        assert!(more.is_err(), "no change: the slice has no endpoints");

        let taken = taken.lock().unwrap();
        let at: Vec<Duration> = taken.iter().map(|t| *t - start).collect();
        assert_eq!(at.len(), 11, "every scripted event was taken: {at:?}");
        let gap = |i: usize| at[i] - at[i - 1];
        // After each failure the watcher is left alone for the delay: 100 ms, then 100..200,
        // then 200..400 (upper halves of a doubling range).
        assert_eq!(gap(2), Duration::from_millis(100));
        assert!((100..=200).contains(&gap(4).as_millis()), "{:?}", gap(4));
        assert!((200..=400).contains(&gap(6).as_millis()), "{:?}", gap(6));
        // `Init` alone is no progress; the complete list (`InitDone`) is, so the next failure
        // waits the minimum again.
        assert_eq!(gap(10), Duration::from_millis(100));
        for i in [1, 3, 5, 7, 8, 9] {
            assert_eq!(
                gap(i),
                Duration::ZERO,
                "no delay without a failure before event {i}"
            );
        }
    }

    #[test]
    fn names_are_dns_labels() {
        for good in ["echo", "echo-v2", "a", "0abc", &"a".repeat(63)] {
            assert!(check_label("service", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Echo",
            "echo_v2",
            "-echo",
            "echo-",
            "echo.v2",
            &"a".repeat(64),
        ] {
            let err = check_label("service", bad).unwrap_err();
            assert_eq!(err.setting(), "service", "{bad}");
        }
    }
}
