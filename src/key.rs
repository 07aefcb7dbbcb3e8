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
    #[inline]
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
/// and machine maps a key to the same hash, however the key is split across
/// [`write`](Self::write)s.
#[derive(Clone, Debug)]
pub struct KeyHasher {
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    /// CRC-32 (IEEE), as nginx's `hash ... consistent` computes it.
    Crc32(u32),
    /// The 64-bit stable hash, seeded.
    Stable(Stable),
}

impl KeyHasher {
    /// CRC-32 (IEEE 802.3), the hash nginx applies to `hash $key consistent` keys; `finish`
    /// returns it in the low 32 bits.
    pub fn crc32() -> Self {
        Self {
            kind: Kind::Crc32(!0),
        }
    }

    /// A 64-bit hash starting from `seed`: the key is read eight bytes at a time (little
    /// endian, the last word padded with zeroes), each word folded into the state with a
    /// 64 × 64 → 128-bit multiply, and the length and a splitmix64 finaliser folded in at the
    /// end. Its values are pinned by tests: they change only with a breaking release, since a
    /// change would move keys between endpoints. Deployments that worry about clients aiming
    /// keys at one endpoint pick a secret seed shared by all their clients.
    pub fn stable(seed: u64) -> Self {
        Self {
            kind: Kind::Stable(Stable::new(seed)),
        }
    }

    /// Feeds bytes of the key.
    #[inline(always)]
    pub fn write(&mut self, bytes: &[u8]) {
        match &mut self.kind {
            Kind::Crc32(crc) => *crc = crc32_update(*crc, bytes),
            Kind::Stable(state) => state.write(bytes),
        }
    }

    /// The hash of everything written.
    #[inline]
    pub fn finish(&self) -> u64 {
        match &self.kind {
            Kind::Crc32(crc) => u64::from(!crc),
            Kind::Stable(state) => state.finish(),
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

/// The state of [`KeyHasher::stable`]: a word at a time, so a key costs one multiply per eight
/// bytes (FNV-1a, which this replaced, cost one per byte).
#[derive(Clone, Debug)]
struct Stable {
    acc: u64,
    /// Bytes not yet folded in (fewer than eight), little endian from bit 0.
    tail: u64,
    tail_len: u32,
    /// Bytes written in all.
    len: u64,
}

/// The multipliers: the fractional digits of π (as in many hashes), odd and dense in bits.
const STABLE_SEED: u64 = 0x243f_6a88_85a3_08d3;
const STABLE_WORD: u64 = 0x1319_8a2e_0370_7345;
const STABLE_END: u64 = 0xa409_3822_299f_31d1;

impl Stable {
    fn new(seed: u64) -> Self {
        Self {
            acc: fold(seed ^ STABLE_SEED, STABLE_WORD),
            tail: 0,
            tail_len: 0,
            len: 0,
        }
    }

    #[inline(always)]
    fn absorb(&mut self, word: u64) {
        self.acc = fold(self.acc ^ word, STABLE_WORD);
    }

    #[inline(always)]
    fn write(&mut self, mut bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        if self.tail_len > 0 {
            let take = bytes.len().min(8 - self.tail_len as usize);
            self.tail |= le_word(&bytes[..take]) << (8 * self.tail_len);
            self.tail_len += take as u32;
            bytes = &bytes[take..];
            if self.tail_len < 8 {
                return;
            }
            let word = self.tail;
            self.absorb(word);
            self.tail = 0;
            self.tail_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let word: [u8; 8] = word.try_into().expect("chunks of 8");
            self.absorb(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        self.tail = le_word(rest);
        self.tail_len = rest.len() as u32;
    }

    #[inline]
    fn finish(&self) -> u64 {
        mix64(fold(self.acc ^ self.tail, STABLE_END ^ self.len))
    }
}

/// Up to eight bytes as a little-endian word, zero-padded: two overlapping loads, or three
/// bytes, rather than a copy of variable length.
#[inline(always)]
fn le_word(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    debug_assert!(n <= 8);
    if n >= 4 {
        let low = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let high = u32::from_le_bytes([bytes[n - 4], bytes[n - 3], bytes[n - 2], bytes[n - 1]]);
        // The two loads overlap when n < 8; the bytes they share sit at the same places.
        u64::from(low) | u64::from(high) << (8 * (n - 4))
    } else if n > 0 {
        u64::from(bytes[0])
            | u64::from(bytes[n / 2]) << (8 * (n / 2))
            | u64::from(bytes[n - 1]) << (8 * (n - 1))
    } else {
        0
    }
}

/// The 128-bit product of `a` and `b`, its halves xored: every bit of the result depends on
/// every bit of both.
#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The splitmix64 finaliser.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// CRC-32 (IEEE, reflected) tables for slicing by 8: `CRC32_TABLES[0]` is the classic
/// byte-at-a-time table, `CRC32_TABLES[k][b]` the CRC of byte `b` followed by `k` zero bytes.
const CRC32_TABLES: [[u32; 256]; 8] = {
    let mut tables = [[0u32; 256]; 8];
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
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let previous = tables[k - 1][i];
            tables[k][i] = (previous >> 8) ^ tables[0][(previous & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
};

/// Continues a CRC-32 (IEEE, reflected) over `bytes`; start with `!0`, finish with `!crc`.
/// Eight bytes at a time (eight independent table reads instead of a chain of eight), then
/// four, then the rest byte by byte.
pub(crate) fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let low = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) ^ crc;
        let high = u32::from_le_bytes([word[4], word[5], word[6], word[7]]);
        crc = crc32_four(low, 4) ^ crc32_four(high, 0);
    }
    let mut rest = words.remainder();
    if let Some((word, tail)) = rest.split_first_chunk::<4>() {
        crc = crc32_four(u32::from_le_bytes(*word) ^ crc, 0);
        rest = tail;
    }
    for &byte in rest {
        crc = CRC32_TABLES[0][((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The CRC contribution of four bytes (`word`, little endian) followed by `zeros` zero bytes:
/// one read from each of four tables.
#[inline(always)]
fn crc32_four(word: u32, zeros: usize) -> u32 {
    let t = &CRC32_TABLES;
    t[zeros + 3][(word & 0xff) as usize]
        ^ t[zeros + 2][((word >> 8) & 0xff) as usize]
        ^ t[zeros + 1][((word >> 16) & 0xff) as usize]
        ^ t[zeros][(word >> 24) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stable(seed: u64, bytes: &[u8]) -> u64 {
        let mut hasher = KeyHasher::stable(seed);
        hasher.write(bytes);
        hasher.finish()
    }

    fn crc32(bytes: &[u8]) -> u64 {
        let mut hasher = KeyHasher::crc32();
        hasher.write(bytes);
        hasher.finish()
    }

    /// Deterministic test bytes.
    fn bytes(len: usize, salt: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (mix64(i ^ salt.rotate_left(17)) >> 56) as u8)
            .collect()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    #[test]
    fn crc32_by_eight_bytes_matches_a_byte_at_a_time() {
        let by_byte = |bytes: &[u8]| {
            let mut crc = !0u32;
            for &byte in bytes {
                crc = CRC32_TABLES[0][((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
            }
            u64::from(!crc)
        };
        for len in 0..70 {
            let key = bytes(len, len as u64);
            assert_eq!(crc32(&key), by_byte(&key), "{len} bytes");
        }
    }

    #[test]
    fn both_hashes_ignore_how_the_key_is_split() {
        for len in 0..40 {
            let key = bytes(len, 7);
            for kind in [KeyHasher::crc32(), KeyHasher::stable(3)] {
                let mut whole = kind.clone();
                whole.write(&key);
                for a in 0..=len {
                    for b in a..=len {
                        let mut parts = kind.clone();
                        parts.write(&key[..a]);
                        parts.write(&key[a..b]);
                        parts.write(&key[b..]);
                        assert_eq!(parts.finish(), whole.finish(), "{len} bytes at {a}, {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn stable_hash_is_fixed_and_seeded() {
        assert_ne!(stable(0, b"user-42"), stable(0, b"user-43"));
        assert_ne!(stable(0, b"user-42"), stable(1, b"user-42"));
        // Trailing zero bytes and lengths are told apart.
        assert_ne!(stable(0, b"ab"), stable(0, b"ab\0"));
        assert_ne!(stable(0, &[0; 8]), stable(0, &[0; 16]));
        assert_ne!(stable(0, b""), stable(0, &[0]));
        // Pinned: a change here would remap every key in every deployment.
        assert_eq!(stable(0, b""), PINNED[0]);
        assert_eq!(stable(0, b"user-42"), PINNED[1]);
        assert_eq!(stable(0, b"10.0.0.1:8080"), PINNED[2]);
        assert_eq!(stable(0, &42u64.to_le_bytes()), PINNED[3]);
        assert_eq!(stable(0x5eed, b"/api/v1/users/42/orders?page=7"), PINNED[4]);
    }

    /// Computed from [`KeyHasher::stable`]'s description by a separate implementation, in
    /// Python (so other languages can reproduce the mapping):
    ///
    /// ```text
    /// M = 2**64 - 1
    /// fold = lambda a, b: (a * b & M) ^ (a * b >> 64)
    /// def mix64(z):
    ///     z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9 & M
    ///     z = (z ^ z >> 27) * 0x94d049bb133111eb & M
    ///     return z ^ z >> 31
    /// def stable(seed, key):
    ///     acc = fold(seed ^ 0x243f6a8885a308d3, 0x13198a2e03707345)
    ///     full = len(key) // 8 * 8
    ///     for i in range(0, full, 8):
    ///         acc = fold(acc ^ int.from_bytes(key[i:i + 8], "little"), 0x13198a2e03707345)
    ///     tail = int.from_bytes(key[full:], "little")
    ///     return mix64(fold(acc ^ tail, 0xa4093822299f31d1 ^ len(key)))
    /// ```
    const PINNED: [u64; 5] = [
        0x7a76_9e7e_09a1_0716,
        0x2915_212f_8848_c715,
        0x9710_1c57_282f_2be3,
        0xeb24_40e9_bf23_ef93,
        0x364f_fbea_5c90_b9b2,
    ];

    /// Chi-square of `hashes` bucketed by `bucket` into `n` buckets, against uniform.
    fn chi_square(hashes: &[u64], n: usize, bucket: impl Fn(u64) -> usize) -> f64 {
        let mut counts = vec![0u64; n];
        for &hash in hashes {
            counts[bucket(hash)] += 1;
        }
        let expected = hashes.len() as f64 / n as f64;
        counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn stable_hash_spreads_similar_keys_evenly() {
        let keys: [Box<dyn Fn(u64) -> Vec<u8>>; 3] = [
            Box::new(|i| i.to_le_bytes().to_vec()),
            Box::new(|i| format!("user-{i}").into_bytes()),
            Box::new(|i| {
                format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255).into_bytes()
            }),
        ];
        for key in &keys {
            let hashes: Vec<u64> = (0..65_536).map(|i| stable(0, &key(i))).collect();
            // 63 degrees of freedom: 110 is beyond the 99.99th percentile.
            let high = chi_square(&hashes, 64, |h| (h >> 58) as usize);
            let low = chi_square(&hashes, 64, |h| (h & 63) as usize);
            let scaled = chi_square(&hashes, 64, |h| crate::util::rng::split(h, 64).0);
            assert!(
                high < 110.0 && low < 110.0 && scaled < 110.0,
                "{high} {low} {scaled}"
            );
        }
    }

    #[test]
    fn stable_hash_avalanches() {
        // Flipping any input bit flips each output bit about half the time.
        for len in [1usize, 8, 13, 24] {
            let mut flips = [0u32; 64];
            let mut trials = 0u32;
            for salt in 0..400 {
                let key = bytes(len, salt);
                let base = stable(0, &key);
                for bit in 0..len * 8 {
                    let mut flipped = key.clone();
                    flipped[bit / 8] ^= 1 << (bit % 8);
                    let diff = base ^ stable(0, &flipped);
                    for (out, count) in flips.iter_mut().enumerate() {
                        *count += (diff >> out & 1) as u32;
                    }
                    trials += 1;
                }
            }
            for (out, &count) in flips.iter().enumerate() {
                let share = f64::from(count) / f64::from(trials);
                assert!(
                    (0.45..0.55).contains(&share),
                    "{len} bytes, bit {out}: {share}"
                );
            }
        }
    }
}
