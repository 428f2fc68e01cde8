//! Which socket sent a datagram or made a connection, from the kernel's socket tables
//! (`/proc/self/net/{udp,udp6,tcp,tcp6}`): the resolver stub answers only sockets the
//! supervisor gave it, known by inode, whoever else binds the same port on another
//! address, family or protocol.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One row of a socket table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u64,
}

fn address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut octets = [0u8; 16];
            for (i, word) in octets.chunks_exact_mut(4).enumerate() {
                let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                word.copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The rows of one table's text; lines that do not read are skipped.
pub fn parse(text: &str) -> Vec<Row> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(Row {
                local: address(fields.get(1)?)?,
                remote: address(fields.get(2)?)?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

fn rows(tcp: bool) -> Vec<Row> {
    let names: [&str; 2] = if tcp {
        ["tcp", "tcp6"]
    } else {
        ["udp", "udp6"]
    };
    names
        .iter()
        .filter_map(|n| std::fs::read_to_string(format!("/proc/self/net/{n}")).ok())
        .flat_map(|t| parse(&t))
        .collect()
}

/// The inode of the socket that sent from `from` (UDP) or connected from `from` to
/// `to` (TCP): the one bound to exactly that address, else one bound to the wildcard
/// address on that port.
pub fn sender(from: SocketAddr, to: SocketAddr, tcp: bool) -> Option<u64> {
    use crate::program::canonical;

    let from = canonical(from);
    let rows = rows(tcp);
    let mut wildcard = None;
    for row in rows {
        let local = canonical(row.local);
        if local.port() != from.port() {
            continue;
        }
        if tcp && canonical(row.remote) != canonical(to) {
            continue;
        }
        if local.ip() == from.ip() {
            return Some(row.inode);
        }
        if local.ip().is_unspecified() {
            wildcard = Some(row.inode);
        }
    }
    wildcard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_as_the_kernel_writes_them() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  42: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 123456 2 0000000000000000 0\n";
        let rows = parse(udp);
        assert_eq!(
            rows,
            vec![Row {
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "0.0.0.0:0".parse().unwrap(),
                inode: 123456,
            }]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        assert_eq!(parse(v6)[0].local, "[::1]:53".parse().unwrap());
        assert_eq!(parse("header\ngarbage line\n"), Vec::new());
    }
}
