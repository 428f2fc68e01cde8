//! The PROXY protocol, version 2 (HAProxy's): a binary header a published service can
//! read first, to learn the address of the client that connected at the gateway.
//!
//! ```text
//!  \r\n\r\n\0\r\nQUIT\n  0x21 (v2, PROXY)  0x11 (TCP/IPv4) | 0x21 (TCP/IPv6)  length
//!  source address, destination address, source port, destination port
//! ```

use std::net::{IpAddr, SocketAddr};

/// The twelve bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a TCP connection from `source` to `destination`. When only one of
/// them is IPv6, both are written as IPv6 (IPv4 addresses mapped).
pub fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_mixed_headers() {
        let h = v2_header(
            "10.20.1.7:51234".parse().unwrap(),
            "127.0.0.1:5432".parse().unwrap(),
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[10, 20, 1, 7]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(&h[24..28], &[0xc8, 0x22, 0x15, 0x38]);
        assert_eq!(h.len(), 28);
        let mixed = v2_header(
            "[fd00::1]:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert_eq!(&mixed[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(mixed.len(), 16 + 36);
    }
}
