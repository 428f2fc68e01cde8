//! Every decoder of tunnel-proto: no panic on any input, and decode(encode(x)) == x.

use std::net::IpAddr;
use std::path::Path;

use proptest::prelude::*;
use tunnel_proto::config::{AgentConfig, GatewayConfig};
use tunnel_proto::connect::{decode_outcome, encode_outcome};
use tunnel_proto::pattern::{HostPattern, Pattern, Ports};
use tunnel_proto::{ConnectError, Host, Target};

fn name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9_]([a-z0-9_-]{0,10}[a-z0-9_])?", 1..4)
        .prop_map(|l| l.join("."))
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (ip(), 1..=u16::MAX).prop_map(|(ip, port)| Target::Addr {
            host: Host::Ip(ip),
            port
        }),
        (name(), 1..=u16::MAX).prop_map(|(n, port)| Target::Addr {
            host: Host::Name(n),
            port
        }),
        "[a-z_][a-z0-9_]{0,12}".prop_map(Target::Service),
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
    let ports = (1..=u16::MAX, 1..=u16::MAX).prop_map(|(a, b)| Ports {
        first: a.min(b),
        last: a.max(b),
    });
    (host, ports).prop_map(|(host, ports)| Pattern { host, ports })
}

proptest! {
    #[test]
    fn target_round_trips(t in target()) {
        prop_assume!(!matches!(&t, Target::Service(s) if s.bytes().all(|b| b.is_ascii_digit())));
        prop_assert_eq!(Target::parse(&t.to_string()), Ok(t));
    }

    #[test]
    fn target_never_panics(s in "\\PC{0,40}") {
        let _ = Target::parse(&s);
    }

    #[test]
    fn target_never_panics_on_near_misses(s in "[\\[\\]0-9a-f:./*-]{0,40}") {
        let _ = Target::parse(&s);
    }

    #[test]
    fn pattern_round_trips(p in pattern()) {
        prop_assert_eq!(Pattern::parse(&p.to_string()), Ok(p));
    }

    #[test]
    fn pattern_never_panics(s in "\\PC{0,40}", n in "\\PC{0,20}", port in any::<u16>()) {
        if let Ok(p) = Pattern::parse(&s) {
            let _ = p.matches_name(&n, port);
        }
    }

    #[test]
    fn pattern_never_panics_on_near_misses(s in "[\\[\\]0-9a-f:./*-]{0,40}") {
        let _ = Pattern::parse(&s);
    }

    #[test]
    fn outcome_never_panics(status in any::<u16>(), header in proptest::option::of(any::<Vec<u8>>())) {
        let _ = decode_outcome(status, header.as_deref());
    }

    #[test]
    fn outcome_round_trips(i in 0..=ConnectError::ALL.len()) {
        let outcome = ConnectError::ALL.get(i).map_or(Ok(()), |e| Err(*e));
        let (status, header) = encode_outcome(outcome);
        prop_assert_eq!(decode_outcome(status, header.map(str::as_bytes)), outcome);
    }

    #[test]
    fn configs_never_panic(s in "\\PC{0,200}") {
        let _ = AgentConfig::parse(&s, Path::new("agent.toml"));
        let _ = GatewayConfig::parse(&s, Path::new("gateway.toml"));
    }
}

mod local_protocol {
    use super::*;
    use tunnel_proto::local::{Refusal, Reply, Request, VerdictDelivery};
    use tunnel_proto::routes::{ConnectMode, RouteTable, TableRoute};

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                ip(),
                any::<u16>(),
                target(),
                proptest::option::of("[a-z][a-z0-9_-]{0,10}[a-z0-9]"),
                prop_oneof![
                    Just(VerdictDelivery::Wait),
                    Just(VerdictDelivery::Later),
                    Just(VerdictDelivery::Never)
                ]
            )
                .prop_map(|(ip, port, target, via, verdict)| Request::Register {
                    source: std::net::SocketAddr::new(ip, port),
                    target,
                    via,
                    verdict
                }),
            (ip(), any::<u16>()).prop_map(|(ip, port)| Request::Verdict {
                source: std::net::SocketAddr::new(ip, port)
            }),
            Just(Request::Status),
            Just(Request::Version),
            name().prop_map(|name| Request::Resolve { name }),
            ip().prop_map(|ip| Request::Name { ip }),
        ]
    }

    fn refusal() -> impl Strategy<Value = Refusal> {
        prop_oneof![
            proptest::sample::select(ConnectError::ALL.to_vec()).prop_map(Refusal::Connect),
            Just(Refusal::Unavailable),
            Just(Refusal::Forbidden),
            Just(Refusal::Busy),
            Just(Refusal::PoolFull),
            Just(Refusal::Unknown),
            Just(Refusal::Unsupported),
            Just(Refusal::Listen(
                tunnel_proto::callback::ListenRefusal::InUse
            )),
        ]
    }

    fn reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            (ip(), any::<u16>(), proptest::option::of(ip())).prop_map(|(ip, p, callback)| {
                Reply::Ok {
                    listener: std::net::SocketAddr::new(ip, p),
                    callback,
                }
            }),
            (ip(), any::<u16>()).prop_map(|(ip, p)| Reply::Listening {
                public: std::net::SocketAddr::new(ip, p)
            }),
            (ip(), ip(), any::<u16>()).prop_map(|(a, b, p)| Reply::Peer {
                far: std::net::SocketAddr::new(a, p),
                public: std::net::SocketAddr::new(b, p),
            }),
            proptest::option::of(refusal()).prop_map(|error| Reply::Verdict { error }),
            (ip(), ip()).prop_map(|(v4, v6)| Reply::Addrs { v4, v6 }),
            name().prop_map(|name| Reply::Name { name }),
            any::<u32>().prop_map(|version| Reply::Version { version }),
            (refusal(), "[ -~]{0,40}").prop_map(|(refusal, message)| Reply::Err {
                refusal,
                message: message.trim_end().to_string()
            }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trips(r in request()) {
            prop_assume!(!matches!(&r, Request::Register { target: Target::Service(s), .. } if s.bytes().all(|b| b.is_ascii_digit())));
            let wire = r.encode();
            prop_assert_eq!(Request::decode(wire.as_bytes()), Ok(Some((r, wire.len()))));
        }

        #[test]
        fn reply_round_trips(r in reply()) {
            let wire = r.encode();
            prop_assert_eq!(Reply::decode(wire.as_bytes()), Ok(Some((r, wire.len()))));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_near_misses(s in "(REGISTER|RESOLVE|NAME|OK|VERDICT|ADDRS|ERR|STATUS|VERSION) [ -~]{0,60}\n") {
            let _ = Request::decode(s.as_bytes());
            let _ = Reply::decode(s.as_bytes());
        }

        #[test]
        fn sock_diag_answers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), sequence in 0u32..3) {
            let query = tunnel_proto::sock_diag::encode_query("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), sequence);
            let _ = tunnel_proto::sock_diag::decode_answer(&bytes, sequence, &query);
        }

        #[test]
        fn routes_never_panic(s in "\\PC{0,80}") {
            let _ = RouteTable::parse(&s);
        }

        #[test]
        fn routes_round_trip(vias in proptest::collection::vec(("[a-z][a-z0-9_]{0,8}", proptest::collection::vec(pattern(), 1..4), any::<bool>()), 0..4)) {
            let routes = vias
                .into_iter()
                .map(|(via, patterns, optimistic)| TableRoute {
                    via,
                    patterns,
                    connect: if optimistic { ConnectMode::Optimistic } else { ConnectMode::Checked },
                })
                .collect();
            let table = RouteTable::new(routes);
            prop_assert_eq!(RouteTable::parse(&table.to_string()), Ok(table));
        }
    }
}
