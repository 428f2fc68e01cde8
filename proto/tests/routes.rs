//! The compiled route table answers every question as its routes read one by one:
//! the first route, in table order, with a pattern that matches.

use std::net::IpAddr;

use proptest::prelude::*;
use tunnel_proto::pattern::{HostPattern, Pattern, Ports};
use tunnel_proto::routes::{ConnectMode, RouteTable, TableRoute};
use tunnel_proto::{Host, Target};

/// A few labels, so that names in patterns and names asked about often meet.
fn name() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof!["db", "site-b", "internal", "x"], 1..4)
        .prop_map(|labels| labels.join("."))
}

/// A name as a program may ask for it: any case, perhaps with a trailing dot.
fn asked_name() -> impl Strategy<Value = String> {
    (name(), any::<bool>(), any::<bool>()).prop_map(|(name, upper, dot)| {
        let name = if upper {
            name.to_ascii_uppercase()
        } else {
            name
        };
        if dot { format!("{name}.") } else { name }
    })
}

/// Addresses from a few blocks (and IPv4-mapped forms), so that blocks match often.
fn ip() -> impl Strategy<Value = IpAddr> {
    let v4 = (
        prop_oneof![Just(10u8), Just(11), Just(198)],
        0u8..4,
        any::<u8>(),
    )
        .prop_map(|(a, b, c)| IpAddr::from([a, b, 0, c]));
    prop_oneof![
        v4.clone(),
        v4.prop_map(|ip| match ip {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        }),
        (
            prop_oneof![Just(0xfd00u16), Just(0xfe80)],
            0u16..4,
            any::<u16>()
        )
            .prop_map(|(a, b, c)| IpAddr::from([a, b, 0, 0, 0, 0, 0, c])),
    ]
}

fn ports() -> impl Strategy<Value = Ports> {
    prop_oneof![
        Just(Ports::ANY),
        (20u16..25, 0u16..3).prop_map(|(first, more)| Ports {
            first,
            last: first + more
        }),
    ]
}

fn pattern() -> impl Strategy<Value = Pattern> {
    let host = prop_oneof![
        Just(HostPattern::Any),
        name().prop_map(HostPattern::Subdomains),
        name().prop_map(HostPattern::Name),
        (ip(), 0u8..=128).prop_map(|(ip, len)| {
            let len = if ip.is_ipv4() { len % 33 } else { len };
            let net = ipnet::IpNet::new(ip, len).map(|n| n.trunc());
            HostPattern::Net(net.unwrap_or_else(|_| ipnet::IpNet::from(ip)))
        }),
    ];
    (host, ports()).prop_map(|(host, ports)| Pattern { host, ports })
}

fn table() -> impl Strategy<Value = RouteTable> {
    proptest::collection::vec(proptest::collection::vec(pattern(), 1..4), 0..5).prop_map(|routes| {
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
    })
}

/// The first route with a pattern that `matches`, read one by one.
fn first(table: &RouteTable, matches: impl Fn(&Pattern) -> bool) -> Option<usize> {
    table
        .routes()
        .iter()
        .position(|route| route.patterns.iter().any(&matches))
}

proptest! {
    #[test]
    fn addresses_take_the_first_matching_route(table in table(), ip in ip(), port in 19u16..27) {
        let expected = first(&table, |p| p.matches_ip(ip, port));
        prop_assert_eq!(table.route_index_ip(ip, port), expected);
        prop_assert_eq!(table.route_ip(ip, port), expected.map(|i| &table.routes()[i]));
        let target = Target::Addr { host: Host::Ip(ip), port };
        prop_assert_eq!(table.route_for(&target), expected.map(|i| &table.routes()[i]));
    }

    #[test]
    fn names_take_the_first_matching_route(table in table(), name in asked_name(), port in 19u16..27) {
        let expected = first(&table, |p| p.matches_name(&name, port)).map(|i| &table.routes()[i]);
        prop_assert_eq!(table.route_name(&name, port), expected);
        let target = Target::Addr { host: Host::Name(name.clone()), port };
        prop_assert_eq!(table.route_for(&target), expected);
    }

    /// A name is looked up through the agent when some pattern other than a block or a
    /// port-limited `*` matches it on some port.
    #[test]
    fn names_routed_at_lookup(table in table(), name in asked_name()) {
        let expected = table.routes().iter().flat_map(|r| &r.patterns).any(|p| {
            let by_name = match p.host {
                HostPattern::Net(_) => false,
                HostPattern::Any => p.ports == Ports::ANY,
                HostPattern::Name(_) | HostPattern::Subdomains(_) => true,
            };
            by_name && p.matches_name(&name, p.ports.first)
        });
        prop_assert_eq!(table.may_route_name(&name), expected);
    }

    /// The table reads back from its text as the same compiled table.
    #[test]
    fn compiled_tables_round_trip(table in table()) {
        prop_assert_eq!(RouteTable::parse(&table.to_string()), Ok(table));
    }
}

#[test]
fn services_take_no_route() {
    let table = RouteTable::parse("b=*").unwrap();
    assert!(table.route_for(&Target::Service("pg".into())).is_none());
    assert_eq!(
        table.route_for(&Target::parse("db:5432").unwrap()),
        table.routes().first()
    );
}
