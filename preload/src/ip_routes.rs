//! The routes and synthetic blocks, compiled for the one question `connect` asks on
//! every call: does this address and port go through the tunnel? A flat list of
//! masked prefixes per family, in route order (the first match wins), so the answer
//! costs a few instructions per rule and no allocation.

use tunnel_proto::Pattern;
use tunnel_proto::pattern::HostPattern;
use tunnel_proto::routes::RouteTable;

/// Which way a matching address goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A synthetic address: the agent knows the name and the gateway.
    Synthetic,
    /// The route with this index in the table.
    Route(usize),
    /// Refused here: the environment could not be read, so nothing may pass.
    Refuse,
}

#[derive(Debug, Clone, Copy)]
struct Rule<T> {
    network: T,
    mask: T,
    first_port: u16,
    last_port: u16,
    via: Via,
}

#[derive(Debug, Default)]
pub struct IpRoutes {
    v4: Vec<Rule<u32>>,
    v6: Vec<Rule<u128>>,
    /// Bit `b` set: some rule may match an address whose first byte is `b`. Most
    /// connects are to addresses no rule can match; this answers them in a few
    /// instructions, before any rule is read.
    first_byte_v4: [u64; 4],
    first_byte_v6: [u64; 4],
}

/// Sets the bits of the first bytes `first..=last`.
fn mark(bits: &mut [u64; 4], first: u32, last: u32) {
    for b in first..=last.min(255) {
        bits[(b >> 6) as usize] |= 1 << (b & 63);
    }
}

#[inline(always)]
fn may_match(bits: &[u64; 4], first_byte: u32) -> bool {
    (bits[(first_byte >> 6) as usize & 3] >> (first_byte & 63)) & 1 != 0
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl IpRoutes {
    /// Everything refused: for an environment that could not be read.
    pub fn refuse_all() -> IpRoutes {
        let mut routes = IpRoutes::default();
        routes.add(
            &Pattern {
                host: HostPattern::Any,
                ports: tunnel_proto::pattern::Ports::ANY,
            },
            Via::Refuse,
        );
        routes
    }

    /// Synthetic blocks first (they always go to the agent), then the routes in order.
    pub fn compile(synthetic: &[Pattern], table: &RouteTable) -> IpRoutes {
        let mut routes = IpRoutes::default();
        for pattern in synthetic {
            routes.add(pattern, Via::Synthetic);
        }
        for (index, route) in table.routes.iter().enumerate() {
            for pattern in &route.patterns {
                routes.add(pattern, Via::Route(index));
            }
        }
        routes
    }

    fn add(&mut self, pattern: &Pattern, via: Via) {
        let (first_port, last_port) = (pattern.ports.first, pattern.ports.last);
        match &pattern.host {
            HostPattern::Any => {
                mark(&mut self.first_byte_v4, 0, 255);
                mark(&mut self.first_byte_v6, 0, 255);
            }
            HostPattern::Net(ipnet::IpNet::V4(net)) => mark(
                &mut self.first_byte_v4,
                u32::from(net.network()) >> 24,
                u32::from(net.broadcast()) >> 24,
            ),
            HostPattern::Net(ipnet::IpNet::V6(net)) => mark(
                &mut self.first_byte_v6,
                u32::from(net.network().octets()[0]),
                u32::from(net.broadcast().octets()[0]),
            ),
            HostPattern::Name(_) | HostPattern::Subdomains(_) => {}
        }
        match &pattern.host {
            HostPattern::Any => {
                self.v4.push(Rule {
                    network: 0,
                    mask: 0,
                    first_port,
                    last_port,
                    via,
                });
                self.v6.push(Rule {
                    network: 0,
                    mask: 0,
                    first_port,
                    last_port,
                    via,
                });
            }
            HostPattern::Net(ipnet::IpNet::V4(net)) => self.v4.push(Rule {
                network: u32::from(net.network()),
                mask: mask_v4(net.prefix_len()),
                first_port,
                last_port,
                via,
            }),
            HostPattern::Net(ipnet::IpNet::V6(net)) => self.v6.push(Rule {
                network: u128::from(net.network()),
                mask: mask_v6(net.prefix_len()),
                first_port,
                last_port,
                via,
            }),
            // Names are matched when they are looked up, not at connect.
            HostPattern::Name(_) | HostPattern::Subdomains(_) => {}
        }
    }

    /// Where a connection to `ip:port` goes, or `None` for direct.
    #[cfg(test)]
    pub fn lookup(&self, ip: std::net::IpAddr, port: u16) -> Option<Via> {
        match ip {
            std::net::IpAddr::V4(v4) => self.lookup_v4(u32::from(v4), port),
            std::net::IpAddr::V6(v6) => self.lookup_v6(u128::from(v6), port),
        }
    }

    /// As [`IpRoutes::lookup`], for an IPv4 address as a number.
    #[inline(always)]
    pub fn lookup_v4(&self, address: u32, port: u16) -> Option<Via> {
        if !may_match(&self.first_byte_v4, address >> 24) {
            return None;
        }
        find(&self.v4, address, port)
    }

    /// As [`IpRoutes::lookup`], for an IPv6 address as a number (IPv4-mapped ones are
    /// looked up as IPv4).
    #[inline(always)]
    pub fn lookup_v6(&self, address: u128, port: u16) -> Option<Via> {
        const MAPPED: u128 = 0xffff_0000_0000;
        if address >> 32 == MAPPED >> 32 {
            self.lookup_v4(address as u32, port)
        } else if may_match(&self.first_byte_v6, (address >> 120) as u32) {
            find(&self.v6, address, port)
        } else {
            None
        }
    }
}

#[inline(always)]
fn find<T: Copy + PartialEq + std::ops::BitAnd<Output = T>>(
    rules: &[Rule<T>],
    address: T,
    port: u16,
) -> Option<Via> {
    for r in rules {
        if address & r.mask == r.network && r.first_port <= port && port <= r.last_port {
            return Some(r.via);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_route_table() {
        let table = RouteTable::parse("a=10.20.0.0/16:22,[fd00::/8];b=10.0.0.0/8,*.x")
            .unwrap_or_else(|e| panic!("{e}"));
        let synthetic = vec![Pattern::parse("198.18.0.0/15").unwrap_or_else(|e| panic!("{e}"))];
        let routes = IpRoutes::compile(&synthetic, &table);
        let cases = [
            ("10.20.1.1", 22),
            ("10.20.1.1", 23),
            ("10.1.1.1", 80),
            ("11.1.1.1", 80),
            ("fd12::1", 1),
            ("fe80::1", 1),
            ("::ffff:10.1.1.1", 5),
        ];
        for (ip, port) in cases {
            let ip: std::net::IpAddr = ip.parse().unwrap_or_else(|e| panic!("{e}"));
            let expected = table
                .route_ip(ip, port)
                .and_then(|route| table.routes.iter().position(|r| r == route))
                .map(Via::Route);
            assert_eq!(routes.lookup(ip, port), expected, "{ip}:{port}");
        }
        let synthetic_ip: std::net::IpAddr = "198.19.0.7".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(routes.lookup(synthetic_ip, 80), Some(Via::Synthetic));
    }
}
