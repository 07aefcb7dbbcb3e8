//! Request keys for keyed strategies.
//!
//! A keyed strategy (consistent hashing) maps a request to an endpoint by a hash of something
//! in the request: the client's address, a header, the path. The balancer asks its
//! [`RequestKey`] (set with [`BalanceLayer::key`](crate::BalanceLayer::key)) to feed that
//! something into a [`KeyHasher`] that the strategy chose — the strategy, not the key, decides
//! the hash function, so that a ring compatible with nginx can use nginx's CRC-32 while Maglev
//! uses a 64-bit hash — and passes the result to the picker. Unkeyed strategies never call it.
//!
//! Feeding a hasher instead of returning bytes means keys are hashed where they lie in the
//! request, with no allocation per request.

use std::fmt;

/// Feeds a request's key into a [`KeyHasher`].
///
/// Closures work through [`key_fn`]:
///
/// ```
/// use tower_lb::{key::key_fn, strategy::RoundRobin, BalanceLayer};
///
/// // Requests are strings; hash everything before the first '/'.
/// let layer = BalanceLayer::new(RoundRobin::new())
///     .key(key_fn(|request: &String| request.split('/').next().map(str::to_owned)));
/// # let _ = layer;
/// ```
pub trait RequestKey<Req>: Send + Sync + 'static {
    /// Writes the request's key into `hasher` and returns `true`, or returns `false` when the
    /// request carries no key (the strategy then applies its documented fallback).
    fn hash_key(&self, request: &Req, hasher: &mut KeyHasher) -> bool;
}

/// No request key: the default, for strategies that ignore the request.
///
/// It is not a [`RequestKey`]: a balancer whose strategy always picks by key
/// ([`Strategy::KEYED`](crate::strategy::Strategy::KEYED), consistent hashing) and has no key
/// does not compile — the error says to give the `BalanceLayer` a key with `.key(...)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKey;

/// A [`RequestKey`] a balancer keys requests with: what
/// [`BalanceLayer::key`](crate::BalanceLayer::key) makes of the key it is given, and the type
/// a `Balance` names it by (`Balance<K, S, St, Keyed<HeaderKey>>`, say).
#[derive(Clone, Copy, Debug, Default)]
pub struct Keyed<K>(pub K);

/// What a balancer keys requests with: [`Keyed`] (a [`RequestKey`]), or [`NoKey`].
/// Implemented for both; there is nothing to implement yourself.
pub trait MaybeKey<Req>: Send + Sync + 'static {
    /// Whether this is [`NoKey`].
    const NONE: bool;

    /// As [`RequestKey::hash_key`]; `false` for [`NoKey`].
    fn hash_key(&self, request: &Req, hasher: &mut KeyHasher) -> bool;
}

impl<Req, K: RequestKey<Req>> MaybeKey<Req> for Keyed<K> {
    const NONE: bool = false;

    #[inline]
    fn hash_key(&self, request: &Req, hasher: &mut KeyHasher) -> bool {
        self.0.hash_key(request, hasher)
    }
}

impl<Req> MaybeKey<Req> for NoKey {
    const NONE: bool = true;

    #[inline]
    fn hash_key(&self, _: &Req, _: &mut KeyHasher) -> bool {
        false
    }
}

/// A [`RequestKey`] from a closure returning the key's bytes; see [`key_fn`].
#[derive(Clone, Copy)]
pub struct KeyFn<F>(F);

/// A [`RequestKey`] from a closure that returns the request's key (anything that is bytes:
/// `String`, `&'static str`, `Vec<u8>`, `Bytes`…) or `None`.
pub fn key_fn<F>(f: F) -> KeyFn<F> {
    KeyFn(f)
}

impl<Req, F, T> RequestKey<Req> for KeyFn<F>
where
    F: Fn(&Req) -> Option<T> + Send + Sync + 'static,
    T: AsRef<[u8]>,
{
    fn hash_key(&self, request: &Req, hasher: &mut KeyHasher) -> bool {
        match (self.0)(request) {
            Some(key) => {
                hasher.write(key.as_ref());
                true
            }
            None => false,
        }
    }
}

impl<F> fmt::Debug for KeyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFn").finish_non_exhaustive()
    }
}

/// A streaming hash of a request key, of the kind the strategy asked for.
///
/// Both kinds are fixed functions of the key's bytes (and an optional seed), so every process
/// and machine maps a key to the same hash.
#[derive(Clone, Debug)]
pub struct KeyHasher {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    /// CRC-32 (IEEE), as nginx's `hash ... consistent` computes it.
    Crc32(u32),
    /// 64-bit FNV-1a with a final avalanche, seeded.
    Stable(u64),
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl KeyHasher {
    /// CRC-32 (IEEE 802.3), the hash nginx applies to `hash $key consistent` keys; `finish`
    /// returns it in the low 32 bits.
    pub fn crc32() -> Self {
        Self {
            kind: Kind::Crc32(!0),
        }
    }

    /// A 64-bit hash (FNV-1a with a splitmix64 finaliser) starting from `seed`; deployments that
    /// worry about clients aiming keys at one endpoint pick a secret seed shared by all their
    /// clients.
    pub fn stable(seed: u64) -> Self {
        Self {
            kind: Kind::Stable(FNV_OFFSET ^ seed),
        }
    }

    /// Feeds bytes of the key.
    #[inline(always)]
    pub fn write(&mut self, bytes: &[u8]) {
        match &mut self.kind {
            Kind::Crc32(crc) => *crc = crc32_update(*crc, bytes),
            Kind::Stable(state) => {
                for &byte in bytes {
                    *state = (*state ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
                }
            }
        }
    }

    /// The hash of everything written.
    #[inline]
    pub fn finish(&self) -> u64 {
        match self.kind {
            Kind::Crc32(crc) => u64::from(!crc),
            Kind::Stable(state) => mix64(state),
        }
    }
}

impl Default for KeyHasher {
    /// [`KeyHasher::stable`] with seed 0.
    fn default() -> Self {
        Self::stable(0)
    }
}

impl fmt::Write for KeyHasher {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write(s.as_bytes());
        Ok(())
    }
}

/// The splitmix64 finaliser: spreads FNV's weak high bits over the whole word.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Continues a CRC-32 (IEEE, reflected) over `bytes`; start with `!0`, finish with `!crc`.
pub(crate) fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc = CRC32_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        let mut hasher = KeyHasher::crc32();
        hasher.write(b"123456789");
        assert_eq!(hasher.finish(), 0xcbf4_3926);
        // Streaming gives the same answer as one write.
        let mut parts = KeyHasher::crc32();
        parts.write(b"1234");
        parts.write(b"56789");
        assert_eq!(parts.finish(), 0xcbf4_3926);
    }

    #[test]
    fn stable_hash_is_fixed_and_seeded() {
        let hash = |seed, bytes: &[u8]| {
            let mut hasher = KeyHasher::stable(seed);
            hasher.write(bytes);
            hasher.finish()
        };
        assert_eq!(hash(0, b"user-42"), hash(0, b"user-42"));
        assert_ne!(hash(0, b"user-42"), hash(0, b"user-43"));
        assert_ne!(hash(0, b"user-42"), hash(1, b"user-42"));
        // Pinned: a change here would remap every key in every deployment.
        assert_eq!(hash(0, b""), mix64(FNV_OFFSET));
    }
}
