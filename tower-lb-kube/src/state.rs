//! What the EndpointSlices of one Service say, and the `Change`s that follow from it.
//!
//! Pure bookkeeping, no I/O: the watcher's events go in, `Insert`/`Remove` come out, so every
//! rule here is unit-tested without a cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::runtime::watcher::Event;
use tower::discover::Change;

use crate::error::Error;

/// Which port of the slices to balance over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PortSelector {
    /// The slice's only port (an error for a slice with several).
    Only,
    /// The port with this name (the Service port's name).
    Named(String),
}

/// What one slice says about one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Condition {
    /// Ready and not terminating: gets traffic.
    Ready,
    /// Terminating but still serving: gets no new requests; those in flight finish.
    Terminating,
    /// Not ready (failing its readiness probe, starting, or terminated).
    NotReady,
}

impl Condition {
    /// Kubernetes: an unset `ready` means ready, an unset `serving` means what `ready` says, an
    /// unset `terminating` means not terminating.
    fn of(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        match (ready, serving, terminating) {
            // `publishNotReadyAddresses` Services report terminating endpoints as ready: a
            // terminating endpoint is drained all the same.
            (true, _, false) => Condition::Ready,
            (_, true, true) => Condition::Terminating,
            _ => Condition::NotReady,
        }
    }
}

/// One slice, reduced to its addresses at the selected port.
type Slice = BTreeMap<SocketAddr, Condition>;

/// The slices of one Service and the endpoints the balancer has been told about.
#[derive(Debug)]
pub(crate) struct SliceSet {
    port: PortSelector,
    /// By slice name.
    slices: HashMap<String, Slice>,
    /// Slices listed since the watcher's last `Init`, until its `InitDone`.
    relisting: Option<HashMap<String, Slice>>,
    /// Addresses inserted into the balancer and not removed since.
    inserted: BTreeSet<SocketAddr>,
}

impl SliceSet {
    pub(crate) fn new(port: PortSelector) -> Self {
        Self {
            port,
            slices: HashMap::new(),
            relisting: None,
            inserted: BTreeSet::new(),
        }
    }

    /// Applies one watcher event; pushes the resulting changes (and any bad input, as
    /// errors) onto `out`.
    pub(crate) fn apply(
        &mut self,
        event: Event<EndpointSlice>,
        out: &mut Vec<Result<Change<SocketAddr, SocketAddr>, Error>>,
    ) {
        match event {
            Event::Init => {
                tracing::debug!("listing EndpointSlices");
                self.relisting = Some(HashMap::new());
            }
            Event::InitApply(slice) => {
                let (name, parsed) = self.parse(&slice, out);
                match &mut self.relisting {
                    Some(relisting) => {
                        relisting.insert(name, parsed);
                    }
                    // The watcher sends `Init` first; without it, take the slice as an update.
                    None => {
                        self.slices.insert(name, parsed);
                        self.diff(out);
                    }
                }
            }
            Event::InitDone => {
                // Slices not listed again are gone: they were deleted while the watch was
                // down. Only the difference from before the relist is emitted.
                if let Some(listed) = self.relisting.take() {
                    self.slices = listed;
                }
                tracing::debug!(slices = self.slices.len(), "EndpointSlices listed");
                self.diff(out);
            }
            Event::Apply(slice) => {
                let (name, parsed) = self.parse(&slice, out);
                self.slices.insert(name, parsed);
                self.diff(out);
            }
            Event::Delete(slice) => {
                self.slices.remove(&slice_name(&slice));
                self.diff(out);
            }
        }
    }

    /// The addresses of `slice` at the selected port, with their conditions. A slice without
    /// that port contributes nothing; an address that is not an IP is skipped. Both are
    /// reported.
    fn parse(
        &self,
        slice: &EndpointSlice,
        out: &mut Vec<Result<Change<SocketAddr, SocketAddr>, Error>>,
    ) -> (String, Slice) {
        let name = slice_name(slice);
        let mut parsed = Slice::new();
        let port = match self.select_port(slice) {
            Ok(port) => port,
            Err(problem) => {
                tracing::warn!(slice = %name, %problem, "EndpointSlice skipped");
                out.push(Err(Error::bad_slice(&name, problem)));
                return (name, parsed);
            }
        };
        for endpoint in &slice.endpoints {
            // Kubernetes: the addresses of one endpoint are fungible; consumers may use the
            // first.
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let Ok(ip) = address.parse::<IpAddr>() else {
                let problem = format!(
                    "address {address:?} is not an IP address (address type {})",
                    slice.address_type
                );
                tracing::warn!(slice = %name, %problem, "endpoint skipped");
                out.push(Err(Error::bad_slice(&name, problem)));
                continue;
            };
            let addr = SocketAddr::new(ip, port);
            let condition = Condition::of(endpoint);
            // An address listed twice in one slice counts as ready if either entry is.
            let entry = parsed.entry(addr).or_insert(condition);
            if condition == Condition::Ready {
                *entry = Condition::Ready;
            }
        }
        (name, parsed)
    }

    fn select_port(&self, slice: &EndpointSlice) -> Result<u16, String> {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port = match &self.port {
            PortSelector::Named(name) => ports
                .iter()
                .find(|p| p.name.as_deref().unwrap_or_default() == name)
                .ok_or_else(|| format!("no port named {name:?}"))?,
            PortSelector::Only => match ports {
                [port] => port,
                [] => return Err("no ports".to_owned()),
                _ => {
                    return Err(format!(
                        "{} ports; name the one to use with `EndpointSlices::port_name`",
                        ports.len()
                    ))
                }
            },
        };
        match port.port {
            Some(number) => u16::try_from(number)
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("port {number} is out of range")),
            None => {
                Err("the port has no number (\"all ports\" slices are not supported)".to_owned())
            }
        }
    }

    /// Emits `Insert` for every address some slice says is ready and the balancer does not
    /// have, and `Remove` for every address it has that no slice says is ready any more
    /// (terminating, not ready, or gone). An address in several slices counts once.
    fn diff(&mut self, out: &mut Vec<Result<Change<SocketAddr, SocketAddr>, Error>>) {
        let mut conditions: BTreeMap<SocketAddr, Condition> = BTreeMap::new();
        for slice in self.slices.values() {
            for (&addr, &condition) in slice {
                let entry = conditions.entry(addr).or_insert(condition);
                if condition == Condition::Ready
                    || (condition == Condition::Terminating && *entry == Condition::NotReady)
                {
                    *entry = condition;
                }
            }
        }
        let removed: Vec<SocketAddr> = self
            .inserted
            .iter()
            .filter(|addr| conditions.get(addr) != Some(&Condition::Ready))
            .copied()
            .collect();
        for addr in removed {
            self.inserted.remove(&addr);
            match conditions.get(&addr) {
                Some(Condition::Terminating) => {
                    tracing::info!(%addr, "endpoint terminating: drained (no new requests)");
                }
                Some(_) => tracing::info!(%addr, "endpoint not ready: removed"),
                None => tracing::info!(%addr, "endpoint gone: removed"),
            }
            out.push(Ok(Change::Remove(addr)));
        }
        for (&addr, &condition) in &conditions {
            if condition == Condition::Ready && self.inserted.insert(addr) {
                tracing::info!(%addr, "endpoint ready: inserted");
                out.push(Ok(Change::Insert(addr, addr)));
            }
        }
    }
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn endpoint(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Endpoint::default()
        }
    }

    fn ready(ip: &str) -> Endpoint {
        endpoint(ip, Some(true), Some(true), Some(false))
    }

    fn terminating(ip: &str) -> Endpoint {
        endpoint(ip, Some(false), Some(true), Some(true))
    }

    fn slice(name: &str, ports: &[(&str, i32)], endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".to_owned(),
            endpoints,
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|&(name, port)| EndpointPort {
                        name: Some(name.to_owned()),
                        port: Some(port),
                        protocol: Some("TCP".to_owned()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    /// The changes one event produces, written `+addr` / `-addr`, and the number of errors.
    fn step(set: &mut SliceSet, event: Event<EndpointSlice>) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        set.apply(event, &mut out);
        let errors = out.iter().filter(|r| r.is_err()).count();
        let changes = out
            .into_iter()
            .filter_map(Result::ok)
            .map(|change| match change {
                Change::Insert(key, service) => {
                    assert_eq!(key, service, "the service is the address");
                    format!("+{key}")
                }
                Change::Remove(key) => format!("-{key}"),
            })
            .collect();
        (changes, errors)
    }

    fn listed(set: &mut SliceSet, slices: Vec<EndpointSlice>) -> (Vec<String>, usize) {
        let mut changes = Vec::new();
        let mut errors = 0;
        for event in std::iter::once(Event::Init)
            .chain(slices.into_iter().map(Event::InitApply))
            .chain(std::iter::once(Event::InitDone))
        {
            let (c, e) = step(set, event);
            changes.extend(c);
            errors += e;
        }
        (changes, errors)
    }

    #[test]
    fn nothing_is_inserted_before_the_list_is_complete() {
        let mut set = SliceSet::new(PortSelector::Only);
        assert_eq!(step(&mut set, Event::Init), (vec![], 0));
        let a = slice("a", &[("", 80)], vec![ready("10.0.0.1")]);
        assert_eq!(step(&mut set, Event::InitApply(a)), (vec![], 0));
        assert_eq!(
            step(&mut set, Event::InitDone),
            (vec!["+10.0.0.1:80".to_owned()], 0)
        );
    }

    #[test]
    fn ready_endpoints_are_inserted_and_others_are_not() {
        let mut set = SliceSet::new(PortSelector::Only);
        let a = slice(
            "a",
            &[("", 80)],
            vec![
                ready("10.0.0.1"),
                endpoint("10.0.0.2", None, None, None),
                endpoint("10.0.0.3", Some(false), Some(false), Some(false)),
                terminating("10.0.0.4"),
            ],
        );
        let (changes, errors) = listed(&mut set, vec![a]);
        // An endpoint without conditions is ready (Kubernetes' rule for unset `ready`).
        assert_eq!(changes, ["+10.0.0.1:80", "+10.0.0.2:80"]);
        assert_eq!(errors, 0);
    }

    #[test]
    fn a_terminating_endpoint_is_removed_once_and_not_again_when_it_goes() {
        let mut set = SliceSet::new(PortSelector::Only);
        let ports = [("", 80)];
        listed(
            &mut set,
            vec![slice(
                "a",
                &ports,
                vec![ready("10.0.0.1"), ready("10.0.0.2")],
            )],
        );

        let terminating_one = slice(
            "a",
            &ports,
            vec![ready("10.0.0.1"), terminating("10.0.0.2")],
        );
        assert_eq!(
            step(&mut set, Event::Apply(terminating_one)),
            (vec!["-10.0.0.2:80".to_owned()], 0)
        );
        let gone = slice("a", &ports, vec![ready("10.0.0.1")]);
        assert_eq!(step(&mut set, Event::Apply(gone)), (vec![], 0));
    }

    #[test]
    fn publish_not_ready_addresses_still_drains_terminating_endpoints() {
        let mut set = SliceSet::new(PortSelector::Only);
        let ports = [("", 80)];
        listed(&mut set, vec![slice("a", &ports, vec![ready("10.0.0.1")])]);
        let terminating_but_ready = slice(
            "a",
            &ports,
            vec![endpoint("10.0.0.1", Some(true), Some(true), Some(true))],
        );
        assert_eq!(
            step(&mut set, Event::Apply(terminating_but_ready)),
            (vec!["-10.0.0.1:80".to_owned()], 0)
        );
    }

    #[test]
    fn named_ports_are_resolved_per_slice() {
        let mut set = SliceSet::new(PortSelector::Named("grpc".to_owned()));
        let a = slice(
            "a",
            &[("http", 8080), ("grpc", 9090)],
            vec![ready("10.0.0.1")],
        );
        // Another slice of the same Service may carry the port under another number.
        let b = slice("b", &[("grpc", 9191)], vec![ready("10.0.0.2")]);
        let (changes, errors) = listed(&mut set, vec![a, b]);
        assert_eq!(changes, ["+10.0.0.1:9090", "+10.0.0.2:9191"]);
        assert_eq!(errors, 0);
    }

    #[test]
    fn a_slice_without_the_port_contributes_nothing_and_is_reported() {
        let mut set = SliceSet::new(PortSelector::Named("grpc".to_owned()));
        let good = slice("good", &[("grpc", 9090)], vec![ready("10.0.0.1")]);
        let wrong = slice("wrong", &[("http", 8080)], vec![ready("10.0.0.2")]);
        let (changes, errors) = listed(&mut set, vec![good, wrong]);
        assert_eq!(changes, ["+10.0.0.1:9090"]);
        assert_eq!(errors, 1);

        let mut only = SliceSet::new(PortSelector::Only);
        let two_ports = slice(
            "two",
            &[("http", 8080), ("grpc", 9090)],
            vec![ready("10.0.0.3")],
        );
        let (changes, errors) = listed(&mut only, vec![two_ports]);
        assert!(changes.is_empty());
        assert_eq!(errors, 1, "several ports and none named: reported");
    }

    #[test]
    fn bad_addresses_are_skipped_and_reported_and_the_rest_is_used() {
        let mut set = SliceSet::new(PortSelector::Only);
        let mut fqdn = ready("backend.example.com");
        fqdn.addresses.push("10.0.0.9".to_owned());
        let a = slice(
            "a",
            &[("", 80)],
            vec![
                fqdn,
                ready("not an ip"),
                ready("10.0.0.1"),
                Endpoint::default(),
            ],
        );
        let (changes, errors) = listed(&mut set, vec![a]);
        assert_eq!(changes, ["+10.0.0.1:80"]);
        assert_eq!(errors, 2);

        let out_of_range = slice("b", &[("", 70000)], vec![ready("10.0.0.2")]);
        assert_eq!(step(&mut set, Event::Apply(out_of_range)), (vec![], 1));
    }

    #[test]
    fn an_address_in_two_slices_counts_once() {
        let mut set = SliceSet::new(PortSelector::Only);
        let ports = [("", 80)];
        let a = slice("a", &ports, vec![ready("10.0.0.1")]);
        let b = slice("b", &ports, vec![ready("10.0.0.1"), ready("10.0.0.2")]);
        let (changes, _) = listed(&mut set, vec![a, b]);
        assert_eq!(changes, ["+10.0.0.1:80", "+10.0.0.2:80"]);

        // Gone from one slice: still ready in the other, so nothing changes.
        let a = slice("a", &ports, vec![]);
        assert_eq!(step(&mut set, Event::Apply(a.clone())), (vec![], 0));
        // Terminating in one and ready in the other: still ready.
        let a_terminating = slice("a", &ports, vec![terminating("10.0.0.1")]);
        assert_eq!(step(&mut set, Event::Apply(a_terminating)), (vec![], 0));
        // Gone from the last slice that had it ready: removed.
        let b = slice("b", &ports, vec![ready("10.0.0.2")]);
        assert_eq!(
            step(&mut set, Event::Apply(b)),
            (vec!["-10.0.0.1:80".to_owned()], 0)
        );
        assert_eq!(step(&mut set, Event::Delete(a)), (vec![], 0));
    }

    #[test]
    fn deleting_a_slice_removes_its_endpoints() {
        let mut set = SliceSet::new(PortSelector::Only);
        let ports = [("", 80)];
        let a = slice("a", &ports, vec![ready("10.0.0.1")]);
        let b = slice("b", &ports, vec![ready("10.0.0.2")]);
        listed(&mut set, vec![a.clone(), b]);
        assert_eq!(
            step(&mut set, Event::Delete(a)),
            (vec!["-10.0.0.1:80".to_owned()], 0)
        );
    }

    #[test]
    fn a_relist_emits_only_the_difference_and_evicts_slices_not_listed_again() {
        let mut set = SliceSet::new(PortSelector::Only);
        let ports = [("", 80)];
        let a = slice("a", &ports, vec![ready("10.0.0.1"), ready("10.0.0.2")]);
        let b = slice("b", &ports, vec![ready("10.0.0.3")]);
        listed(&mut set, vec![a, b]);

        // While the watch was down: slice b was deleted, .2 left a, .4 joined a, c appeared.
        let a = slice("a", &ports, vec![ready("10.0.0.1"), ready("10.0.0.4")]);
        let c = slice("c", &ports, vec![ready("10.0.0.5")]);
        let (changes, errors) = listed(&mut set, vec![a, c]);
        assert_eq!(
            changes,
            [
                "-10.0.0.2:80",
                "-10.0.0.3:80",
                "+10.0.0.4:80",
                "+10.0.0.5:80"
            ]
        );
        assert_eq!(errors, 0);
    }

    #[test]
    fn ipv6_addresses_are_supported() {
        let mut set = SliceSet::new(PortSelector::Only);
        let mut a = slice("a", &[("", 80)], vec![ready("fd00::1")]);
        a.address_type = "IPv6".to_owned();
        let (changes, _) = listed(&mut set, vec![a]);
        assert_eq!(changes, ["+[fd00::1]:80"]);
    }
}
