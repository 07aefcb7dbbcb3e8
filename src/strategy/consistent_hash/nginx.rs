//! The points nginx's `hash $key consistent` places for each `server`
//! (`ngx_http_upstream_init_chash` in `ngx_http_upstream_hash_module.c`).
//!
//! nginx splits the server's name into a host and a port (the digits after the last `:`;
//! none for `unix:` paths or when anything but digits follows the last `:`), starts a CRC-32
//! over `host`, a NUL byte and `port` (compatible with `Cache::Memcached::Fast`), and then
//! makes `160 × weight` points: each one continues that unfinished CRC with the previous
//! point's hash as four little-endian bytes (zero for the first point) and finishes it. The
//! points are sorted and exact duplicates dropped; a key's CRC-32 goes to the first point at
//! or after it, wrapping to the first point.

use super::ring::{point_counts, KeyBits, Points, Ring};
use super::Endpoints;
use crate::key::crc32_update;

/// nginx's points per unit of weight.
const POINTS_PER_WEIGHT: u32 = 160;

/// The ring nginx builds for these endpoints, their identities standing for server names.
pub(super) fn ring(endpoints: &Endpoints<'_>, by_identity: &[usize]) -> Ring {
    let counts = point_counts(endpoints, POINTS_PER_WEIGHT);
    let mut points = Points::with_capacity(counts.iter().sum::<u64>() as usize);
    for (rank, &index) in by_identity.iter().enumerate() {
        let endpoint = endpoints.get(index);
        let (host, port) = split_server(endpoint.identity());
        let mut base = crc32_update(!0, host);
        base = crc32_update(base, &[0]);
        base = crc32_update(base, port);
        let mut previous = 0u32;
        for _ in 0..counts[index] {
            let hash = !crc32_update(base, &previous.to_le_bytes());
            points.push(hash, rank);
            previous = hash;
        }
    }
    Ring::new(points, by_identity, KeyBits::Low)
}

/// nginx's split of a server name into the host and port it hashes.
fn split_server(name: &str) -> (&[u8], &[u8]) {
    let name = name.as_bytes();
    if name.len() >= 5 && name[..5].eq_ignore_ascii_case(b"unix:") {
        return (&name[5..], &[]);
    }
    for (j, &c) in name.iter().rev().enumerate() {
        if c == b':' {
            let colon = name.len() - j - 1;
            return (&name[..colon], &name[colon + 1..]);
        }
        if !c.is_ascii_digit() {
            break;
        }
    }
    (name, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::test_util::named_endpoints;

    #[test]
    fn server_names_split_like_nginx() {
        let split = |name| {
            let (host, port) = split_server(name);
            (
                std::str::from_utf8(host).unwrap(),
                std::str::from_utf8(port).unwrap(),
            )
        };
        assert_eq!(split("127.0.0.1:8081"), ("127.0.0.1", "8081"));
        assert_eq!(split("[::1]:80"), ("[::1]", "80"));
        assert_eq!(split("backend.local"), ("backend.local", ""));
        assert_eq!(split("host:"), ("host", ""));
        assert_eq!(split("host:8x"), ("host:8x", ""));
        assert_eq!(split("8080"), ("8080", ""));
        assert_eq!(split("UNIX:/run/app.sock"), ("/run/app.sock", ""));
    }

    /// Points computed independently: one CRC-32 over the whole byte string per point, as
    /// `crc32(HOST \0 PORT PREV_HASH)` reads, instead of continuing a saved state.
    #[test]
    fn points_are_crc32_of_host_nul_port_and_the_previous_point() {
        let crc32 = |bytes: &[u8]| !crc32_update(!0, bytes);
        let handles = named_endpoints(&[("10.0.0.1:11211", 2)]);
        let ring = ring(&Endpoints::new(&handles), &[0]);
        let mut expected = Vec::new();
        let mut previous = 0u32;
        for _ in 0..320 {
            let mut bytes = b"10.0.0.1\x0011211".to_vec();
            bytes.extend_from_slice(&previous.to_le_bytes());
            previous = crc32(&bytes);
            expected.push(u64::from(previous));
        }
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(ring.len(), expected.len());
        for (position, &point) in expected.iter().enumerate() {
            assert_eq!(ring.position(point), Some(position));
        }
        // The first point is pinned, so a change of the CRC or of the split shows here.
        assert_eq!(crc32(b"10.0.0.1\x0011211\0\0\0\0"), 0x3c90_307e);
    }
}
