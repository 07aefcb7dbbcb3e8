//! What hashing a request key costs, by key length, for both of the crate's key hashes, beside
//! the byte-at-a-time FNV-1a that the stable hash replaced (kept here as the yardstick).
//!
//! Each key is chosen by the previous key's hash, so the figure is the latency of one hash
//! (what a pick waits for), not the throughput of many overlapped.

use std::hint::black_box;
use std::time::Instant;

use tower_lb::key::KeyHasher;

/// Key lengths: a `u64`, an IPv4 `addr:port`, a session id, a path with a query.
const LENGTHS: [usize; 4] = [8, 13, 32, 96];

/// Distinct keys of each length, hashed in turn (a power of two: the turn is a mask, not a
/// division, which would cost more than a short key's hash).
const KEYS: usize = 64;

/// The stable hash before this crate's first release: FNV-1a, one multiply per byte, and the
/// same splitmix64 finaliser.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        state = (state ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    state = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    state = (state ^ (state >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    state ^ (state >> 31)
}

/// A key hash under test.
type Hash = fn(&[u8]) -> u64;

/// The fastest of `rounds` rounds of `per_round` keys, in ns per key.
fn time(rounds: usize, per_round: usize, keys: &[Vec<u8>; KEYS], hash: Hash) -> f64 {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let mut last = 0;
            for _ in 0..per_round {
                // The next key depends on this hash, as a pick depends on its key's hash.
                last = hash(black_box(&keys[last as usize & (KEYS - 1)]));
            }
            black_box(last);
            start.elapsed().as_secs_f64() * 1e9 / per_round as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Measures and, when `print`, prints the table.
pub(crate) fn measure(rounds: usize, per_round: usize, print: bool) {
    let hashers: [(&str, Hash); 3] = [
        ("stable (KeyHasher::stable)", |key| {
            let mut hasher = KeyHasher::stable(0);
            hasher.write(key);
            hasher.finish()
        }),
        ("crc32 (KeyHasher::crc32, nginx)", |key| {
            let mut hasher = KeyHasher::crc32();
            hasher.write(key);
            hasher.finish()
        }),
        ("(FNV-1a, the stable hash before)", fnv1a),
    ];
    let rows: Vec<(&str, Vec<f64>)> = hashers
        .iter()
        .map(|&(name, hash)| {
            let figures = LENGTHS
                .iter()
                .map(|&len| {
                    let keys: [Vec<u8>; KEYS] = std::array::from_fn(|k| {
                        (0..len).map(|i| (k * 131 + i * 7) as u8).collect()
                    });
                    time(rounds, per_round, &keys, hash)
                })
                .collect();
            (name, figures)
        })
        .collect();
    if !print {
        return;
    }
    println!(
        "\n== hashing a request key, ns per key (fastest of {rounds} rounds of {per_round}) =="
    );
    print!("  {:<34}", "bytes");
    for len in LENGTHS {
        print!("{len:>8}");
    }
    println!();
    for (name, figures) in rows {
        print!("  {name:<34}");
        for ns in figures {
            print!("{ns:>8.1}");
        }
        println!();
    }
}
