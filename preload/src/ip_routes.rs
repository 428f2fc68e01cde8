//! The routes and synthetic blocks, compiled for the one question `connect` asks on
//! every call: does this address and port go through the tunnel? A flat list of
//! masked prefixes per family, in route order (the first match wins), so the answer
//! costs a few instructions per rule and no allocation.

use ipnet::IpNet;
use tunnel_proto::Pattern;
use tunnel_proto::pattern::{HostPattern, Ports};
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
        routes.add(None, Ports::ANY, Via::Refuse);
        routes
    }

    /// Synthetic blocks first (they always go to the agent), then the table's address
    /// rules in its order. Name patterns are matched when names are looked up, not here.
    pub fn compile(synthetic: &[Pattern], table: &RouteTable) -> IpRoutes {
        let mut routes = IpRoutes::default();
        for pattern in synthetic {
            match &pattern.host {
                HostPattern::Any => routes.add(None, pattern.ports, Via::Synthetic),
                HostPattern::Net(net) => routes.add(Some(*net), pattern.ports, Via::Synthetic),
                HostPattern::Name(_) | HostPattern::Subdomains(_) => {}
            }
        }
        for rule in table.address_rules() {
            routes.add(rule.net, rule.ports, Via::Route(rule.route));
        }
        routes
    }

    /// Adds a rule for the addresses of `net` (`None`: every address of both families).
    fn add(&mut self, net: Option<IpNet>, ports: Ports, via: Via) {
        let (first_port, last_port) = (ports.first, ports.last);
        match net {
            None => {
                mark(&mut self.first_byte_v4, 0, 255);
                mark(&mut self.first_byte_v6, 0, 255);
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
            Some(IpNet::V4(net)) => {
                mark(
                    &mut self.first_byte_v4,
                    u32::from(net.network()) >> 24,
                    u32::from(net.broadcast()) >> 24,
                );
                self.v4.push(Rule {
                    network: u32::from(net.network()),
                    mask: mask_v4(net.prefix_len()),
                    first_port,
                    last_port,
                    via,
                });
            }
            Some(IpNet::V6(net)) => {
                mark(
                    &mut self.first_byte_v6,
                    u32::from(net.network().octets()[0]),
                    u32::from(net.broadcast().octets()[0]),
                );
                self.v6.push(Rule {
                    network: u128::from(net.network()),
                    mask: mask_v6(net.prefix_len()),
                    first_port,
                    last_port,
                    via,
                });
            }
        }
    }

    /// Where a connection to `ip:port` goes, or `None` for direct.
    #[inline(always)]
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
    use std::net::IpAddr;

    use proptest::prelude::*;
    use tunnel_proto::routes::{ConnectMode, TableRoute};

    use super::*;

    /// The route table's own answer, with the synthetic blocks before it.
    fn expected(synthetic: &[Pattern], table: &RouteTable, ip: IpAddr, port: u16) -> Option<Via> {
        if synthetic.iter().any(|p| p.matches_ip(ip, port)) {
            return Some(Via::Synthetic);
        }
        table.route_index_ip(ip, port).map(Via::Route)
    }

    #[test]
    fn agrees_with_the_route_table() {
        let table = RouteTable::parse("a=10.20.0.0/16:22,[fd00::/8];b=10.0.0.0/8,*.x").unwrap();
        let synthetic = vec![Pattern::parse("198.18.0.0/15").unwrap()];
        let routes = IpRoutes::compile(&synthetic, &table);
        let cases = [
            ("10.20.1.1", 22, Some(Via::Route(0))),
            ("10.20.1.1", 23, Some(Via::Route(1))),
            ("10.1.1.1", 80, Some(Via::Route(1))),
            ("11.1.1.1", 80, None),
            ("fd12::1", 1, Some(Via::Route(0))),
            ("fe80::1", 1, None),
            ("::ffff:10.1.1.1", 5, Some(Via::Route(1))),
            ("198.19.0.7", 80, Some(Via::Synthetic)),
        ];
        for (ip, port, via) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(routes.lookup(ip, port), via, "{ip}:{port}");
            assert_eq!(expected(&synthetic, &table, ip, port), via, "{ip}:{port}");
        }
    }

    /// Addresses from a few blocks, in both families and IPv4-mapped form, so that the
    /// blocks of generated patterns hold them often.
    fn ip() -> impl Strategy<Value = IpAddr> {
        let v4 = (
            prop_oneof![Just(0u8), Just(10), Just(127), Just(198), Just(255)],
            prop_oneof![Just(0u8), Just(18), Just(19), Just(255)],
            any::<u8>(),
        )
            .prop_map(|(a, b, c)| IpAddr::from([a, b, 0, c]));
        let v6 = (
            prop_oneof![Just(0u16), Just(0xfd00), Just(0xfd7e), Just(0xffff)],
            prop_oneof![Just(0u16), Just(1), Just(0xffff)],
            any::<u16>(),
        )
            .prop_map(|(a, b, c)| IpAddr::from([a, b, 0, 0, 0, 0, 0, c]));
        prop_oneof![
            v4.clone(),
            v4.prop_map(|ip| match ip {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                v6 => v6,
            }),
            v6,
        ]
    }

    fn ports() -> impl Strategy<Value = Ports> {
        prop_oneof![
            Just(Ports::ANY),
            (1u16..4, 0u16..2).prop_map(|(first, more)| Ports {
                first,
                last: first + more,
            }),
            Just(Ports {
                first: u16::MAX,
                last: u16::MAX,
            }),
        ]
    }

    fn pattern() -> impl Strategy<Value = Pattern> {
        let host = prop_oneof![
            1 => Just(HostPattern::Any),
            1 => Just(HostPattern::Name("db.x".into())),
            1 => Just(HostPattern::Subdomains("x".into())),
            6 => (ip(), 0u8..=128).prop_map(|(ip, len)| {
                let len = if ip.is_ipv4() { len % 33 } else { len };
                let net = IpNet::new(ip, len).map(|n| n.trunc());
                HostPattern::Net(net.unwrap_or_else(|_| IpNet::from(ip)))
            }),
        ];
        (host, ports()).prop_map(|(host, ports)| Pattern { host, ports })
    }

    fn table() -> impl Strategy<Value = RouteTable> {
        proptest::collection::vec(proptest::collection::vec(pattern(), 1..4), 0..5).prop_map(
            |routes| {
                RouteTable::new(
                    routes
                        .into_iter()
                        .enumerate()
                        .map(|(i, patterns)| TableRoute {
                            via: format!("gw{i}"),
                            patterns,
                            connect: ConnectMode::Checked,
                        })
                        .collect(),
                )
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Connect's compiled form answers as the route table does, for every address
        /// of either family and every port.
        #[test]
        fn compiled_routes_agree_with_the_route_table(
            synthetic in proptest::collection::vec(pattern(), 0..2),
            table in table(),
            queries in proptest::collection::vec((ip(), prop_oneof![1u16..5, Just(u16::MAX), any::<u16>()]), 1..20),
        ) {
            let routes = IpRoutes::compile(&synthetic, &table);
            for (ip, port) in queries {
                prop_assert_eq!(routes.lookup(ip, port), expected(&synthetic, &table, ip, port), "{}:{}", ip, port);
            }
        }

        #[test]
        fn a_broken_environment_refuses_everything(ip in ip(), port in 1..=u16::MAX) {
            prop_assert_eq!(IpRoutes::refuse_all().lookup(ip, port), Some(Via::Refuse));
        }
    }
}
