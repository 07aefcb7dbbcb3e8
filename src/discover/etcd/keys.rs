//! The registered keys under a prefix, and the changes that bring a balancer in line with
//! them. Pure bookkeeping: the watch feeds it puts, deletes and whole lists.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use tower::discover::Change;

use crate::discover::Target;

/// What one key registers, and the revision it was written at.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) revision: i64,
    pub(crate) target: Target,
}

#[derive(Debug, Default)]
pub(crate) struct Keys {
    entries: HashMap<Vec<u8>, Entry>,
    /// What the balancer has been told, by address.
    published: BTreeMap<SocketAddr, Target>,
}

impl Keys {
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, entry: Entry) {
        self.entries.insert(key, entry);
    }

    pub(crate) fn delete(&mut self, key: &[u8]) {
        self.entries.remove(key);
    }

    /// Replaces every entry with a fresh list's.
    pub(crate) fn replace(&mut self, entries: HashMap<Vec<u8>, Entry>) {
        self.entries = entries;
    }

    /// The changes since the last call: `Remove` for addresses no key names any more, then
    /// `Insert` for new addresses and for those whose target (weight, name) changed, in
    /// address order.
    ///
    /// Several keys may name one address (two registrations of one server): it is one
    /// endpoint, removed only when no key names it, described by the key written last.
    pub(crate) fn changes(&mut self) -> Vec<Change<SocketAddr, Target>> {
        let mut current: BTreeMap<SocketAddr, &Entry> = BTreeMap::new();
        for entry in self.entries.values() {
            let latest = current.entry(entry.target.addr()).or_insert(entry);
            if entry.revision > latest.revision {
                *latest = entry;
            }
        }
        let mut changes = Vec::new();
        self.published.retain(|addr, _| {
            let keep = current.contains_key(addr);
            if !keep {
                changes.push(Change::Remove(*addr));
            }
            keep
        });
        for (addr, entry) in current {
            if self.published.get(&addr) != Some(&entry.target) {
                self.published.insert(addr, entry.target.clone());
                changes.push(Change::Insert(addr, entry.target.clone()));
            }
        }
        changes
    }

    /// Endpoints the balancer has been told about.
    pub(crate) fn published(&self) -> usize {
        self.published.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weight::Weight;

    fn entry(revision: i64, addr: &str, weight: u32) -> Entry {
        Entry {
            revision,
            target: Target::new(addr.parse().unwrap()).with_weight(Weight::new(weight).unwrap()),
        }
    }

    fn show(changes: Vec<Change<SocketAddr, Target>>) -> Vec<String> {
        changes
            .into_iter()
            .map(|change| match change {
                Change::Insert(addr, target) => {
                    assert_eq!(addr, target.addr());
                    format!("+{addr}/{}", target.weight())
                }
                Change::Remove(addr) => format!("-{addr}"),
            })
            .collect()
    }

    #[test]
    fn puts_and_deletes_become_inserts_and_removes_once() {
        let mut keys = Keys::default();
        keys.put(b"svc/a".to_vec(), entry(1, "10.0.0.1:80", 1));
        keys.put(b"svc/b".to_vec(), entry(2, "10.0.0.2:80", 1));
        assert_eq!(show(keys.changes()), ["+10.0.0.1:80/1", "+10.0.0.2:80/1"]);
        assert!(keys.changes().is_empty(), "nothing changed since");

        keys.put(b"svc/a".to_vec(), entry(3, "10.0.0.1:80", 4));
        assert_eq!(
            show(keys.changes()),
            ["+10.0.0.1:80/4"],
            "a new weight replaces"
        );
        keys.put(b"svc/a".to_vec(), entry(4, "10.0.0.1:80", 4));
        assert!(
            keys.changes().is_empty(),
            "an identical rewrite changes nothing"
        );

        keys.delete(b"svc/b");
        assert_eq!(show(keys.changes()), ["-10.0.0.2:80"]);
        assert_eq!(keys.published(), 1);
    }

    #[test]
    fn a_key_that_moves_to_another_address_removes_the_old_one() {
        let mut keys = Keys::default();
        keys.put(b"svc/a".to_vec(), entry(1, "10.0.0.1:80", 1));
        keys.changes();
        keys.put(b"svc/a".to_vec(), entry(2, "10.0.0.9:80", 1));
        assert_eq!(show(keys.changes()), ["-10.0.0.1:80", "+10.0.0.9:80/1"]);
    }

    #[test]
    fn two_keys_for_one_address_are_one_endpoint_described_by_the_latest() {
        let mut keys = Keys::default();
        keys.put(b"svc/old".to_vec(), entry(1, "10.0.0.1:80", 1));
        keys.put(b"svc/new".to_vec(), entry(2, "10.0.0.1:80", 2));
        assert_eq!(show(keys.changes()), ["+10.0.0.1:80/2"]);
        keys.delete(b"svc/new");
        assert_eq!(
            show(keys.changes()),
            ["+10.0.0.1:80/1"],
            "the other key still names it"
        );
        keys.delete(b"svc/old");
        assert_eq!(show(keys.changes()), ["-10.0.0.1:80"]);
    }

    #[test]
    fn a_relist_yields_only_the_difference() {
        let mut keys = Keys::default();
        keys.put(b"svc/a".to_vec(), entry(1, "10.0.0.1:80", 1));
        keys.put(b"svc/b".to_vec(), entry(2, "10.0.0.2:80", 1));
        keys.put(b"svc/c".to_vec(), entry(3, "10.0.0.3:80", 1));
        keys.changes();

        let mut listed = HashMap::new();
        listed.insert(b"svc/a".to_vec(), entry(1, "10.0.0.1:80", 1));
        listed.insert(b"svc/c".to_vec(), entry(7, "10.0.0.3:80", 2));
        listed.insert(b"svc/d".to_vec(), entry(8, "10.0.0.4:80", 1));
        keys.replace(listed);
        assert_eq!(
            show(keys.changes()),
            ["-10.0.0.2:80", "+10.0.0.3:80/2", "+10.0.0.4:80/1"]
        );
    }
}
