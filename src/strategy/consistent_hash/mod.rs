//! Consistent hashing: requests with the same key go to the same endpoint, and a change of
//! membership moves few keys. See [`ConsistentHash`].
//!
//! One concept per file: the ring (`ring`), nginx's placement of ring points (`nginx`),
//! Maglev tables (`maglev`) and bounded loads (`bounded`).

mod bounded;
mod maglev;
mod nginx;
mod ring;

use std::fmt;

use super::{Endpoints, PickContext, Picker, Strategy};
use crate::error::ConfigError;
use crate::key::KeyHasher;

use bounded::BoundedLoad;
use maglev::Maglev;
use ring::Ring;

/// Points per unit of weight on a ring, as nginx and libketama use.
const DEFAULT_POINTS_PER_WEIGHT: u32 = 160;

/// The most points a ring may have per unit of weight; more buys no measurable evenness.
const MAX_POINTS_PER_WEIGHT: u32 = 10_000;

/// Consistent hashing: requests with the same key go to the same endpoint, and a change of
/// membership moves few keys.
///
/// The balancer feeds each request's key (its [`RequestKey`](crate::key::RequestKey), set with
/// [`BalanceLayer::key`](crate::BalanceLayer::key)) into the hasher this strategy chooses and
/// looks the hash up in a table built from the endpoints' identities, off the request path.
/// The strategy is keyed: the balancer picks in `call`, where the request is known, and sends
/// it to the endpoint its key maps to even if that endpoint is not ready yet (see
/// [`Picker::is_keyed`]).
///
/// | table | lookup | keys moved when 1 of N endpoints leaves | shares (100 endpoints, 1M keys) |
/// |---|---|---|---|
/// | [`maglev`](Self::maglev) | O(1): one multiply, one load | a little over 1/N: 1.07/N at 20 endpoints, 1.6/N at 100 | table within 0.2% of even; busiest endpoint 1.02 × the mean |
/// | [`ring`](Self::ring) | O(log n) worst case, O(1) expected (bucketed search) | exactly that endpoint's keys | busiest endpoint 1.17 × the mean with 160 points per weight |
/// | [`ring_nginx`](Self::ring_nginx) | as the ring | as the ring | as nginx's `hash $key consistent` |
///
/// Maglev is the usual choice: it spreads keys evenly and looks up in constant time. The
/// ring moves the fewest keys, and its nginx-compatible form maps keys exactly as nginx does
/// for the same `server` list, so a move from nginx keeps its cache locality.
///
/// # Determinism
///
/// Tables are built from the endpoints' [identities](crate::strategy::Endpoint::identity)
/// (the discovery key's `Debug` form) in sorted order, never from discovery order, with fixed
/// hash functions and no per-process random state. Every process and machine with the same
/// endpoint set (and weights, and seed) maps every key to the same endpoint. Identities
/// should be distinct; endpoints that share one are told apart by discovery order.
///
/// A [`seed`](Self::seed) shared by all clients changes both the key hash and the placement,
/// for deployments that fear clients aiming keys at one endpoint.
///
/// # Requests without a key
///
/// A request whose key function returns `None` gets the configured [`KeyFallback`]: by
/// default it fails with [`Error::MissingKey`](crate::Error::MissingKey) (nothing was
/// chosen); [`KeyFallback::Random`] and [`KeyFallback::RoundRobin`] send it somewhere.
///
/// # Bounded loads
///
/// With [`bounded_load(c)`](Self::bounded_load) (Mirrokni, Thorup and Zadimoghaddam,
/// "Consistent Hashing with Bounded Loads"; HAProxy's `hash-balance-factor`, Envoy's
/// `hash_balance_factor`), no endpoint is given a request that would take its in-flight count
/// above `ceil(c × (total in flight + 1) × weight / total weight)`: for equal weights, `c`
/// times the average. A key whose endpoint is full moves to the next candidate,
/// deterministically: the next distinct endpoint clockwise on the ring, or the owners of the
/// following Maglev slots. Popular keys then spill over instead of overloading one endpoint,
/// at the cost of some locality.
///
/// # Example
///
/// ```
/// use tower_lb::{key::key_fn, strategy::{ConsistentHash, KeyFallback}, BalanceLayer};
///
/// // Requests are user names; each user sticks to one endpoint, no endpoint takes more than
/// // 1.25 times its share of the requests in flight, and anonymous requests go anywhere.
/// let strategy = ConsistentHash::maglev()
///     .bounded_load(1.25)?
///     .fallback(KeyFallback::Random);
/// let layer = BalanceLayer::new(strategy)
///     .key(key_fn(|user: &String| (!user.is_empty()).then(|| user.clone())));
///
/// // Other tables and settings:
/// let ring = ConsistentHash::ring().points_per_weight(200)?.seed(0x5eed)?;
/// let bigger = ConsistentHash::maglev().table_size(131_071)?;
/// let like_nginx = ConsistentHash::ring_nginx();
/// # let _ = (layer, ring, bigger, like_nginx);
/// # Ok::<(), tower_lb::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct ConsistentHash {
    table: TableKind,
    seed: u64,
    load_factor_milli: Option<u64>,
    fallback: KeyFallback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TableKind {
    Ring { points_per_weight: u32 },
    NginxRing,
    Maglev { table_size: u64 },
}

/// What a [`ConsistentHash`] does with a request that has no key (its key function returned
/// `None`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyFallback {
    /// Choose nothing: the request fails with
    /// [`Error::MissingKey`](crate::Error::MissingKey). The default, so that a missing key
    /// (often a bug in the key function) is seen rather than silently spread.
    #[default]
    Error,
    /// Treat the request as if it had a random key: endpoints are chosen in proportion to
    /// their share of the table (so weights count), and bounded loads apply.
    Random,
    /// Each endpoint in turn, per balancer clone, ignoring weights (like
    /// [`RoundRobin`](crate::strategy::RoundRobin)); with bounded loads, a full endpoint passes the
    /// request to the next one in turn.
    RoundRobin,
}

impl ConsistentHash {
    fn with_table(table: TableKind) -> Self {
        Self {
            table,
            seed: 0,
            load_factor_milli: None,
            fallback: KeyFallback::Error,
        }
    }

    /// A Ketama-style ring: each endpoint owns 160 points per unit of weight on a 64-bit
    /// circle, placed by a hash of its identity; a key goes to the owner of the first point at
    /// or after the key's hash, wrapping. Removing an endpoint moves exactly its keys.
    ///
    /// Keys are hashed with [`KeyHasher::stable`]. A ring never holds more than 4,194,304
    /// points: beyond that (huge weights), each endpoint's points are scaled down in
    /// proportion.
    pub fn ring() -> Self {
        Self::with_table(TableKind::Ring {
            points_per_weight: DEFAULT_POINTS_PER_WEIGHT,
        })
    }

    /// A ring that maps keys exactly as nginx's `hash $key consistent` does for a `server`
    /// list with the same names and weights, so clients moving from nginx keep their cache
    /// locality.
    ///
    /// An endpoint's [identity](super::Endpoint::identity) plays the part of the `server`
    /// address as written in nginx's configuration: a discovery key `127.0.0.1:8081`
    /// (`SocketAddr`'s `Debug` form) matches `server 127.0.0.1:8081;`. Like nginx it uses 160
    /// points per unit of weight, CRC-32 for points and keys ([`KeyHasher::crc32`]) and no
    /// seed. Two departures: nginx's point sort leaves the winner of a (rare) exact hash
    /// collision between two servers to its `qsort`, where this ring gives it to the smaller
    /// identity; and nginx retries a down or failing server on the next point, where the
    /// balancer has already removed unhealthy endpoints from the table.
    pub fn ring_nginx() -> Self {
        Self::with_table(TableKind::NginxRing)
    }

    /// A Maglev table (Eisenbud et al., NSDI 2016): a prime-sized table whose slots are
    /// shared among endpoints in proportion to their weights by the Maglev population
    /// algorithm; a key goes to the endpoint in slot `hash × size / 2⁶⁴`.
    ///
    /// The table has 65,537 slots by default, grown so that it always has at least 100 slots
    /// per endpoint (see [`table_size`](Self::table_size)). Keys are hashed with
    /// [`KeyHasher::stable`].
    pub fn maglev() -> Self {
        Self::with_table(TableKind::Maglev {
            table_size: maglev::DEFAULT_TABLE_SIZE,
        })
    }

    /// Sets how many points a ring gives each endpoint per unit of weight (default 160).
    ///
    /// More points even out the shares (the spread falls like `1/√points`) at the cost of
    /// memory and build time. Rejected: 0, more than 10,000, a Maglev table, and the
    /// nginx-compatible ring (nginx's 160 is part of its mapping).
    pub fn points_per_weight(mut self, points: u32) -> Result<Self, ConfigError> {
        const SETTING: &str = "points_per_weight";
        match &mut self.table {
            TableKind::Ring { points_per_weight } => {
                if points == 0 || points > MAX_POINTS_PER_WEIGHT {
                    return Err(ConfigError::new(
                        SETTING,
                        format!("{points} is not between 1 and {MAX_POINTS_PER_WEIGHT}"),
                    ));
                }
                *points_per_weight = points;
                Ok(self)
            }
            TableKind::NginxRing => Err(ConfigError::new(
                SETTING,
                "the nginx-compatible ring uses nginx's 160 points per weight; \
                 use ConsistentHash::ring() to choose another number",
            )),
            TableKind::Maglev { .. } => Err(ConfigError::new(
                SETTING,
                "applies to rings, not to a Maglev table (see table_size)",
            )),
        }
    }

    /// Sets the smallest number of slots of a Maglev table (default 65,537).
    ///
    /// It must be a prime (the population algorithm needs every probe sequence to visit every
    /// slot) no larger than 5,000,011. Each endpoint's share of the table is within a slot or
    /// two of its weighted share, so the table stays within about 1% of the weights only with
    /// at least 100 slots per endpoint: when the endpoint count needs it, the build uses the
    /// first prime at or above `size × 2^k` for the smallest `k` that gives 100 slots per
    /// endpoint (capped at 5,000,011). That choice depends only on `size` and the endpoint
    /// count, so processes still agree, but crossing such a threshold remaps most keys once:
    /// set `size` to at least 100 × the largest expected endpoint count to rule it out.
    ///
    /// A bigger table also moves fewer keys when membership changes (at 100 endpoints,
    /// 1.6/N with 65,537 slots, 1.15/N with 524,309), at the cost of memory (2 bytes per slot
    /// up to 65,536 endpoints, else 4) and build time (about `size × ln(size)` probes).
    pub fn table_size(mut self, size: u64) -> Result<Self, ConfigError> {
        const SETTING: &str = "table_size";
        match &mut self.table {
            TableKind::Maglev { table_size } => {
                if size > maglev::MAX_TABLE_SIZE {
                    return Err(ConfigError::new(
                        SETTING,
                        format!("{size} is above the maximum of {}", maglev::MAX_TABLE_SIZE),
                    ));
                }
                if !maglev::is_prime(size) {
                    return Err(ConfigError::new(
                        SETTING,
                        format!(
                            "{size} is not a prime; Maglev needs a prime table size (e.g. {})",
                            maglev::next_prime(size.max(2))
                        ),
                    ));
                }
                *table_size = size;
                Ok(self)
            }
            TableKind::Ring { .. } | TableKind::NginxRing => Err(ConfigError::new(
                SETTING,
                "applies to Maglev tables, not to rings (see points_per_weight)",
            )),
        }
    }

    /// Bounds each endpoint's load: a request never takes an endpoint's in-flight count above
    /// `ceil(factor × (total in flight + 1) × weight / total weight)`; a key whose endpoint is
    /// full goes to the next candidate (the next distinct endpoint clockwise on a ring, the
    /// endpoints of the following slots of a Maglev table). Typical factors are 1.25 (Envoy,
    /// HAProxy) to 2; 1 forces perfectly even loads at the price of most locality.
    ///
    /// The factor is used to three decimals. Rejected: below 1, above 1,000, not a number.
    ///
    /// # Cost and precision
    ///
    /// Summing every endpoint's in-flight count on each request would cost O(n). Instead a key
    /// whose endpoint has nothing in flight takes it at once (an idle endpoint always has
    /// room): one atomic load. Otherwise the pick uses its balancer clone's estimate of the
    /// total, refreshed as it goes: it re-reads eight endpoints' counts in rotation (all of
    /// them for eight endpoints or fewer) and the count of every candidate it considers, and
    /// adds its own dispatches. While nothing completes the estimate can only run low, which
    /// makes the bound stricter, never looser, so requests from one clone never take an
    /// endpoint above its bound; completions and other clones' requests are seen within
    /// `n / 8` such picks. Clones on different threads may both fill an endpoint's last place
    /// at once, as in Envoy and HAProxy. If no candidate has room (possible only while counts
    /// change under the pick), the least loaded one relative to its weight is chosen.
    pub fn bounded_load(mut self, factor: f64) -> Result<Self, ConfigError> {
        self.load_factor_milli = Some(bounded::factor_milli(factor)?);
        Ok(self)
    }

    /// Sets the seed of the key hash and of the placement of endpoints (default 0). All
    /// clients that must agree on the mapping need the same seed. Rejected for the
    /// nginx-compatible ring, whose hashes have no seed.
    pub fn seed(mut self, seed: u64) -> Result<Self, ConfigError> {
        if self.table == TableKind::NginxRing {
            return Err(ConfigError::new(
                "seed",
                "nginx's consistent hash has no seed; a seeded ring would not match nginx",
            ));
        }
        self.seed = seed;
        Ok(self)
    }

    /// Sets what happens to requests without a key (default: [`KeyFallback::Error`]).
    pub fn fallback(mut self, fallback: KeyFallback) -> Self {
        self.fallback = fallback;
        self
    }
}

/// The picker [`ConsistentHash`] builds: the table for one endpoint set.
pub struct ConsistentHashPicker {
    table: Table,
    hasher: KeyHasher,
    bounded: Option<BoundedLoad>,
    fallback: KeyFallback,
}

enum Table {
    Ring(Ring),
    Maglev(Maglev),
}

impl Strategy for ConsistentHash {
    type Picker = ConsistentHashPicker;

    /// Consistent hashing without a request key would send every request to its fallback, so
    /// a balancer with it and no key is a compile error.
    const KEYED: bool = true;

    fn build(&self, endpoints: &Endpoints<'_>) -> ConsistentHashPicker {
        let by_identity = identity_order(endpoints);
        let (table, hasher) = match self.table {
            TableKind::Ring { points_per_weight } => (
                Table::Ring(Ring::ketama(
                    endpoints,
                    &by_identity,
                    points_per_weight,
                    self.seed,
                )),
                KeyHasher::stable(self.seed),
            ),
            TableKind::NginxRing => (
                Table::Ring(nginx::ring(endpoints, &by_identity)),
                KeyHasher::crc32(),
            ),
            TableKind::Maglev { table_size } => (
                Table::Maglev(Maglev::build(
                    endpoints,
                    &by_identity,
                    table_size,
                    self.seed,
                )),
                KeyHasher::stable(self.seed),
            ),
        };
        ConsistentHashPicker {
            table,
            hasher,
            bounded: self
                .load_factor_milli
                .map(|factor| BoundedLoad::new(endpoints, factor)),
            fallback: self.fallback,
        }
    }
}

impl Picker for ConsistentHashPicker {
    type Local = ();

    #[inline(always)]
    fn pick(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        let hash = match cx.key_hash() {
            Some(hash) => hash,
            None => match self.fallback {
                KeyFallback::Error => return None,
                KeyFallback::Random => cx.random(),
                KeyFallback::RoundRobin => return self.round_robin(endpoints, cx),
            },
        };
        match (&self.table, &self.bounded) {
            (Table::Maglev(table), None) => table.get(hash),
            (Table::Ring(ring), None) => ring.get(hash),
            (table, Some(bounded)) => Self::pick_bounded(table, bounded, endpoints, hash),
        }
    }

    fn is_keyed(&self) -> bool {
        true
    }

    fn key_hasher(&self) -> KeyHasher {
        self.hasher.clone()
    }
}

impl ConsistentHashPicker {
    /// A pick with bounded loads: the key's endpoint unless it is full, else the next one
    /// along the table that is not. Out of line, so that unbounded picks stay small.
    #[inline(never)]
    fn pick_bounded(
        table: &Table,
        bounded: &BoundedLoad,
        endpoints: &Endpoints<'_>,
        hash: u64,
    ) -> Option<usize> {
        match table {
            Table::Maglev(table) => {
                let slot = table.slot(hash)?;
                bounded.choose(endpoints, table.slots_from(slot))
            }
            Table::Ring(ring) => {
                let position = ring.position(hash)?;
                bounded.choose(endpoints, ring.clockwise_from(position))
            }
        }
    }

    /// [`KeyFallback::RoundRobin`]: the clone's cursor, then the following endpoints when
    /// loads are bounded.
    fn round_robin(&self, endpoints: &Endpoints<'_>, cx: &mut PickContext<'_>) -> Option<usize> {
        let n = endpoints.len();
        let cursor = cx.cursor();
        *cursor = cursor.wrapping_add(1);
        let start = (*cursor % n as u64) as usize;
        match &self.bounded {
            None => Some(start),
            Some(bounded) => bounded.choose(endpoints, (0..n).map(|k| (start + k) % n)),
        }
    }
}

impl fmt::Debug for ConsistentHashPicker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("ConsistentHashPicker");
        match &self.table {
            Table::Ring(ring) => s.field("ring_points", &ring.len()),
            Table::Maglev(table) => s.field("maglev_slots", &table.len()),
        };
        s.field("bounded_load", &self.bounded.is_some())
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// Endpoint indices sorted by identity (then by index, for identities that are not unique),
/// so that tables do not depend on discovery order.
fn identity_order(endpoints: &Endpoints<'_>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..endpoints.len()).collect();
    order.sort_by(|&a, &b| {
        endpoints
            .get(a)
            .identity()
            .cmp(endpoints.get(b).identity())
            .then(a.cmp(&b))
    });
    order
}

/// The placement hash of an endpoint's identity.
fn identity_hash(seed: u64, identity: &str) -> u64 {
    let mut hasher = KeyHasher::stable(seed);
    hasher.write(identity.as_bytes());
    hasher.finish()
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by this module's unit tests.

    use super::*;
    use crate::endpoint::EndpointHandle;
    use crate::strategy::LocalState;

    /// Endpoints named `name-0`, `name-1`…, weight 1.
    pub(crate) fn named(prefix: &str, n: usize) -> Vec<EndpointHandle> {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        let pairs: Vec<(&str, u32)> = names.iter().map(|name| (name.as_str(), 1)).collect();
        crate::strategy::test_util::named_endpoints(&pairs)
    }

    /// The key hash the picker's hasher gives `key`.
    pub(crate) fn hash_of(picker: &ConsistentHashPicker, key: &[u8]) -> u64 {
        let mut hasher = picker.key_hasher();
        hasher.write(key);
        hasher.finish()
    }

    /// One pick with `key_hash`, with a fresh clone-local state.
    pub(crate) fn pick_hash(
        picker: &ConsistentHashPicker,
        handles: &[EndpointHandle],
        key_hash: Option<u64>,
        local: &mut LocalState,
    ) -> Option<usize> {
        let mut unit = ();
        let mut cx = PickContext::new(local, &mut unit);
        cx.key_hash = key_hash;
        picker.pick(&Endpoints::new(handles), &mut cx)
    }

    /// The identity each of `keys` maps to.
    pub(crate) fn mapping(
        strategy: &ConsistentHash,
        handles: &[EndpointHandle],
        keys: impl Iterator<Item = String>,
    ) -> Vec<String> {
        let picker = strategy.build(&Endpoints::new(handles));
        let mut local = LocalState::new();
        keys.map(|key| {
            let hash = hash_of(&picker, key.as_bytes());
            let index = pick_hash(&picker, handles, Some(hash), &mut local).expect("a choice");
            handles[index].identity().to_owned()
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::strategy::test_util::named_endpoints;
    use crate::strategy::LocalState;

    fn keys(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("key-{i}"))
    }

    fn all_kinds() -> [ConsistentHash; 3] {
        [
            ConsistentHash::ring(),
            ConsistentHash::ring_nginx(),
            ConsistentHash::maglev(),
        ]
    }

    #[test]
    fn the_mapping_does_not_depend_on_discovery_order() {
        let forward = named("backend", 50);
        let mut backward = named("backend", 50);
        backward.reverse();
        for strategy in all_kinds() {
            let strategy = strategy.bounded_load(1.25).unwrap();
            assert_eq!(
                mapping(&strategy, &forward, keys(5_000)),
                mapping(&strategy, &backward, keys(5_000)),
                "{strategy:?}"
            );
        }
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_keys_on_a_ring() {
        for strategy in [ConsistentHash::ring(), ConsistentHash::ring_nginx()] {
            let all = named("node", 20);
            let before = mapping(&strategy, &all, keys(20_000));
            let mut fewer = named("node", 20);
            fewer.remove(7);
            let after = mapping(&strategy, &fewer, keys(20_000));
            for (old, new) in before.iter().zip(&after) {
                if old != "node-7" {
                    assert_eq!(
                        old, new,
                        "{strategy:?}: a key of a remaining endpoint moved"
                    );
                } else {
                    assert_ne!(new, "node-7");
                }
            }
        }
    }

    #[test]
    fn a_seed_changes_the_mapping_and_the_hasher() {
        let handles = named("node", 10);
        let plain = mapping(&ConsistentHash::maglev(), &handles, keys(1_000));
        let seeded = mapping(
            &ConsistentHash::maglev().seed(42).unwrap(),
            &handles,
            keys(1_000),
        );
        let same = plain.iter().zip(&seeded).filter(|(a, b)| a == b).count();
        assert!(same < 200, "{same} of 1000 keys kept their endpoint");
    }

    #[test]
    fn the_nginx_ring_hashes_keys_with_crc32() {
        let handles = named("node", 3);
        let nginx = ConsistentHash::ring_nginx().build(&Endpoints::new(&handles));
        assert_eq!(hash_of(&nginx, b"123456789"), 0xcbf4_3926);
        let maglev = ConsistentHash::maglev().build(&Endpoints::new(&handles));
        assert_ne!(hash_of(&maglev, b"123456789"), 0xcbf4_3926);
        assert!(maglev.is_keyed() && nginx.is_keyed());
    }

    #[test]
    fn a_request_without_a_key_gets_the_fallback() {
        let handles = named("node", 4);
        let mut local = LocalState::new();
        for kind in all_kinds() {
            let picker = kind.clone().build(&Endpoints::new(&handles));
            assert_eq!(pick_hash(&picker, &handles, None, &mut local), None);

            let picker = kind
                .clone()
                .fallback(KeyFallback::RoundRobin)
                .build(&Endpoints::new(&handles));
            let turns: Vec<usize> = (0..8)
                .map(|_| pick_hash(&picker, &handles, None, &mut local).unwrap())
                .collect();
            for pair in turns.windows(2) {
                assert_eq!(pair[1], (pair[0] + 1) % 4, "{turns:?}");
            }

            let picker = kind
                .fallback(KeyFallback::Random)
                .build(&Endpoints::new(&handles));
            let mut seen = [0usize; 4];
            for _ in 0..4_000 {
                seen[pick_hash(&picker, &handles, None, &mut local).unwrap()] += 1;
            }
            assert!(seen.iter().all(|&count| count > 700), "{seen:?}");
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let handles = named_endpoints(&[("a", 1), ("b", 3)]);
        for kind in all_kinds() {
            let picker = kind.build(&Endpoints::new(&handles));
            let mut local = LocalState::new();
            let mut counts = [0usize; 2];
            for key in keys(40_000) {
                let hash = hash_of(&picker, key.as_bytes());
                counts[pick_hash(&picker, &handles, Some(hash), &mut local).unwrap()] += 1;
            }
            let share = counts[1] as f64 / 40_000.0;
            assert!((0.70..0.80).contains(&share), "{picker:?}: {counts:?}");
        }
    }

    #[test]
    fn invalid_configuration_is_rejected_with_its_reason() {
        let message = |result: Result<ConsistentHash, ConfigError>| result.unwrap_err().to_string();
        assert!(message(ConsistentHash::maglev().table_size(65_536)).contains("not a prime"));
        assert!(message(ConsistentHash::maglev().table_size(0)).contains("not a prime"));
        assert!(message(ConsistentHash::maglev().table_size(5_000_101)).contains("maximum"));
        assert!(message(ConsistentHash::ring().table_size(65_537)).contains("Maglev"));
        assert!(message(ConsistentHash::ring().points_per_weight(0)).contains("between 1"));
        assert!(message(ConsistentHash::ring().points_per_weight(10_001)).contains("between 1"));
        assert!(message(ConsistentHash::maglev().points_per_weight(100)).contains("rings"));
        assert!(message(ConsistentHash::ring_nginx().points_per_weight(100)).contains("160"));
        assert!(message(ConsistentHash::ring_nginx().seed(1)).contains("no seed"));
        assert!(message(ConsistentHash::maglev().bounded_load(0.99)).contains("at least 1"));
        assert!(message(ConsistentHash::maglev().bounded_load(f64::NAN)).contains("number"));
        assert!(message(ConsistentHash::maglev().bounded_load(1e9)).contains("1000"));
        let error = ConsistentHash::ring().bounded_load(0.5).unwrap_err();
        assert_eq!(error.setting(), "bounded_load");

        assert!(ConsistentHash::maglev().table_size(5_000_011).is_ok());
        assert!(ConsistentHash::maglev().table_size(101).is_ok());
        assert!(ConsistentHash::ring().points_per_weight(1).is_ok());
        assert!(ConsistentHash::maglev().bounded_load(1.0).is_ok());
    }

    #[test]
    fn an_empty_set_builds_and_a_single_endpoint_takes_everything() {
        for kind in all_kinds() {
            let picker = kind.clone().build(&Endpoints::new(&[]));
            assert!(picker.is_keyed());
            let handles = named("only", 1);
            let picker = kind
                .bounded_load(1.0)
                .unwrap()
                .build(&Endpoints::new(&handles));
            let mut local = LocalState::new();
            for hash in [0, 1, u64::MAX, 0xdead_beef] {
                assert_eq!(
                    pick_hash(&picker, &handles, Some(hash), &mut local),
                    Some(0)
                );
            }
        }
    }
}
