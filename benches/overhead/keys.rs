//! What hashing a request key costs, by key length, for both of the crate's key hashes, beside
//! the byte-at-a-time FNV-1a that the stable hash replaced (kept here as the yardstick).
//!
//! Keys are hashed one after another, independent of each other, as requests are: the
//! figure is the cost per key a busy balancer sees (the processor overlaps consecutive keys),
//! not the latency of one hash.

use std::hint::black_box;
use std::time::Instant;

use tower_lb::key::KeyHasher;

/// Key lengths: a `u64`, an IPv4 `addr:port`, a user id, a path with a query.
const LENGTHS: [usize; 4] = [8, 16, 32, 96];

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
fn time(rounds: usize, per_round: usize, keys: &[Vec<u8>], hash: impl Fn(&[u8]) -> u64) -> f64 {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for i in 0..per_round {
                black_box(hash(black_box(&keys[i % keys.len()])));
            }
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
                    let keys: Vec<Vec<u8>> = (0..64u64)
                        .map(|k| (0..len as u64).map(|i| (k * 131 + i * 7) as u8).collect())
                        .collect();
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
