//! What an etcd value says: `host:port`, or gRPC-Go's naming JSON.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::discover::target::{check_dns_name, parse_port, split_host_port};
use crate::weight::Weight;

/// What one value registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    /// An endpoint at `host:port`, with a weight.
    Endpoint {
        host: Host,
        port: u16,
        weight: Weight,
    },
    /// gRPC-Go's `{"Op": 1}` (naming.Delete): the key names no endpoint.
    Deleted,
}

/// The host part of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Host {
    Ip(IpAddr),
    /// A DNS name, resolved when the value is read.
    Name(String),
}

impl Registered {
    /// The address to connect to, if no name has to be resolved.
    #[cfg(test)]
    fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Registered::Endpoint {
                host: Host::Ip(ip),
                port,
                ..
            } => Some(SocketAddr::new(*ip, *port)),
            _ => None,
        }
    }
}

/// Reads a value: plain `host:port`, or a JSON object `{"Addr": "host:port", "Metadata":
/// {"weight": 3}}` as gRPC-Go's etcd naming (`go.etcd.io/etcd/client/v3/naming/endpoints`)
/// writes it. Field names match case-insensitively, as Go's `encoding/json` does; other
/// fields are ignored. The error says what is wrong.
pub(crate) fn parse(value: &[u8]) -> Result<Registered, String> {
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_owned())?;
    let text = text.trim();
    if text.starts_with('{') {
        parse_json(text)
    } else if text.is_empty() {
        Err("the value is empty".to_owned())
    } else {
        let (host, port) = parse_address(text)?;
        Ok(Registered::Endpoint {
            host,
            port,
            weight: Weight::ONE,
        })
    }
}

fn parse_json(text: &str) -> Result<Registered, String> {
    let json: Value =
        serde_json::from_str(text).map_err(|error| format!("the value is not JSON: {error}"))?;
    let Value::Object(fields) = json else {
        return Err("the value is not a JSON object".to_owned());
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    };
    match field("Op") {
        None => {}
        Some(op) if op.as_u64() == Some(0) => {}
        Some(op) if op.as_u64() == Some(1) => return Ok(Registered::Deleted),
        Some(op) => return Err(format!("\"Op\" is {op}; 0 (add) or 1 (delete) expected")),
    }
    let addr = match field("Addr") {
        Some(Value::String(addr)) => addr,
        Some(other) => return Err(format!("\"Addr\" is {other}, not a string")),
        None => return Err("the object has no \"Addr\"".to_owned()),
    };
    let (host, port) = parse_address(addr)?;
    let weight = match field("Metadata") {
        Some(Value::Object(metadata)) => match metadata
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("weight"))
        {
            Some((_, weight)) => parse_weight(weight)?,
            None => Weight::ONE,
        },
        _ => Weight::ONE,
    };
    Ok(Registered::Endpoint { host, port, weight })
}

/// `host:port`: an IP address (IPv6 in brackets) or a DNS name, and a port from 1 to 65535.
fn parse_address(addr: &str) -> Result<(Host, u16), String> {
    if let Ok(socket) = addr.parse::<SocketAddr>() {
        if socket.port() == 0 {
            return Err(format!("{addr:?}: port 0 cannot be connected to"));
        }
        return Ok((Host::Ip(socket.ip()), socket.port()));
    }
    let (host, port) = split_host_port(addr);
    let Some(port) = port else {
        return Err(format!("{addr:?} has no port (host:port expected)"));
    };
    let port = parse_port(port).map_err(|problem| format!("{addr:?}: {problem}"))?;
    if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return Err(format!("{addr:?} is not an address"));
    }
    check_dns_name(host).map_err(|problem| format!("{addr:?}: {problem}"))?;
    Ok((Host::Name(host.to_owned()), port))
}

fn parse_weight(weight: &Value) -> Result<Weight, String> {
    let number = weight
        .as_u64()
        .or_else(|| {
            weight
                .as_f64()
                .filter(|w| w.fract() == 0.0 && *w >= 0.0 && *w <= f64::from(u32::MAX))
                .map(|w| w as u64)
        })
        .ok_or_else(|| format!("the weight {weight} is not a whole number"))?;
    let number = u32::try_from(number).map_err(|_| format!("the weight {number} is too large"))?;
    Weight::new(number).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(value: &str) -> (Option<SocketAddr>, u32) {
        let registered = parse(value.as_bytes()).unwrap_or_else(|e| panic!("{value}: {e}"));
        let weight = match &registered {
            Registered::Endpoint { weight, .. } => weight.get(),
            Registered::Deleted => panic!("{value}: deleted"),
        };
        (registered.socket_addr(), weight)
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn plain_addresses() {
        assert_eq!(endpoint("10.0.0.7:8080"), (addr("10.0.0.7:8080"), 1));
        assert_eq!(endpoint(" [::1]:50051\n"), (addr("[::1]:50051"), 1));
        assert_eq!(
            parse(b"echo-1.internal:50051"),
            Ok(Registered::Endpoint {
                host: Host::Name("echo-1.internal".to_owned()),
                port: 50051,
                weight: Weight::ONE,
            })
        );
    }

    #[test]
    fn grpc_go_naming_json() {
        // What go.etcd.io/etcd/client/v3/naming/endpoints writes.
        assert_eq!(
            endpoint(r#"{"Addr":"10.0.0.7:50051","Metadata":null}"#),
            (addr("10.0.0.7:50051"), 1)
        );
        // The older grpc naming.Update, with an Op; other fields are ignored.
        assert_eq!(
            endpoint(r#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":{"zone":"b"},"Extra":true}"#),
            (addr("10.0.0.7:50051"), 1)
        );
        assert_eq!(
            parse(br#"{"Op":1,"Addr":"10.0.0.7:50051"}"#),
            Ok(Registered::Deleted)
        );
        // Go matches field names case-insensitively.
        assert_eq!(
            endpoint(r#"{"addr":"10.0.0.7:1","metadata":{"Weight":3}}"#),
            (addr("10.0.0.7:1"), 3)
        );
    }

    #[test]
    fn weights_come_from_the_metadata() {
        assert_eq!(
            endpoint(r#"{"Addr":"10.0.0.7:1","Metadata":{"weight":5}}"#).1,
            5
        );
        assert_eq!(
            endpoint(r#"{"Addr":"10.0.0.7:1","Metadata":{"weight":5.0}}"#).1,
            5
        );
        assert_eq!(
            endpoint(r#"{"Addr":"10.0.0.7:1","Metadata":"opaque"}"#).1,
            1
        );
    }

    #[test]
    fn malformed_values_say_what_is_wrong() {
        for (value, why) in [
            (&b""[..], "empty"),
            (b"\xff\xfe", "UTF-8"),
            (b"10.0.0.7", "no port"),
            (b"10.0.0.7:0", "port 0"),
            (b"10.0.0.7:70000", "out of range"),
            (b"host name:80", "not allowed"),
            (b"[10.0.0.1]:80", "not an address"),
            (b"{not json", "not JSON"),
            (b"[1, 2]", "no port"),
            (b"{\"Addr\": 7}", "not a string"),
            (b"{\"Metadata\": {}}", "no \"Addr\""),
            (b"{\"Op\": 2, \"Addr\": \"10.0.0.7:1\"}", "\"Op\" is 2"),
            (
                b"{\"Addr\":\"10.0.0.7:1\",\"Metadata\":{\"weight\":0}}",
                "0 is not a weight",
            ),
            (
                b"{\"Addr\":\"10.0.0.7:1\",\"Metadata\":{\"weight\":-1}}",
                "not a whole number",
            ),
            (
                b"{\"Addr\":\"10.0.0.7:1\",\"Metadata\":{\"weight\":1.5}}",
                "not a whole number",
            ),
            (
                b"{\"Addr\":\"10.0.0.7:1\",\"Metadata\":{\"weight\":\"3\"}}",
                "not a whole number",
            ),
            (
                b"{\"Addr\":\"10.0.0.7:1\",\"Metadata\":{\"weight\":5000000}}",
                "above the maximum",
            ),
            (
                b"{\"Addr\":\"10.0.0.7:1\",\"Metadata\":{\"weight\":99999999999}}",
                "too large",
            ),
        ] {
            let err = parse(value).expect_err(&String::from_utf8_lossy(value));
            assert!(
                err.contains(why),
                "{:?}: {err}",
                String::from_utf8_lossy(value)
            );
        }
    }
}
