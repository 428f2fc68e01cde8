//! The route table as it travels in `TUNNEL_ROUTES`, from `tunnel-run` or
//! `tunnel-agent env` to the preload library.
//!
//! ```text
//! TUNNEL_ROUTES = route *( ";" route )
//! route         = gateway [ "+optimistic" ] "=" pattern *( "," pattern )
//! ```
//!
//! e.g. `site-b=10.20.0.0/16,*.site-b.internal;site-c+optimistic=[fd00::/8]:22`.
//! Patterns never contain `;`, `,` or `=`, so no escaping is needed. The first route
//! whose pattern matches a destination decides its gateway and its [`ConnectMode`].

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::pattern::{HostPattern, Pattern, PatternError, Ports};
use crate::target::{Host, Target, is_valid_service_name};

/// Longest `TUNNEL_ROUTES` accepted (an environment variable, not a file).
pub const MAX_LEN: usize = 64 * 1024;

/// The routes, compiled once for the three questions asked of them: which route takes
/// a connection to `ip:port` (the agent, and the preload's connect through the form
/// it compiles from [`RouteTable::address_rules`]), which takes `name:port` (the
/// agent, and the preload for a synthetic address), and may a name be routed at all
/// (the preload's name lookups). Every answer is the first route, in table order,
/// that has a matching pattern.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    routes: Vec<TableRoute>,
    /// The patterns that select addresses (`*` and blocks), in table order.
    by_address: Vec<AddressRule>,
    /// The patterns that select names (`*`, names and `*.domain`), in table order.
    by_name: Vec<NameRule>,
    /// The hosts of the patterns that give a name a synthetic address at lookup time,
    /// with any port: see [`RouteTable::may_route_name`].
    looked_up: Vec<Pattern>,
}

/// A pattern that selects by address, with its route: what a compiled form of the
/// table (the preload's per-connect check) is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRule {
    /// The route's index in [`RouteTable::routes`].
    pub route: usize,
    /// The block selected; `None` for `*`, every address of both families.
    pub net: Option<IpNet>,
    pub ports: Ports,
}

impl AddressRule {
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.ports.contains(port) && self.net.is_none_or(|net| net.contains(&ip.to_canonical()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NameRule {
    route: usize,
    pattern: Pattern,
}

/// One route: the destinations it selects and how their connects behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    /// The gateway that carries them.
    pub via: String,
    pub patterns: Vec<Pattern>,
    pub connect: ConnectMode,
}

/// When a program's `connect` learns whether the far side accepted the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectMode {
    /// A connect succeeds only once the gateway reached the destination: a blocking
    /// connect waits for that answer, a non-blocking one reports it through
    /// `getsockopt(SO_ERROR)` (or a repeated `connect`). A refusal is a failed connect
    /// with the matching errno. Costs one round trip to the gateway before the first
    /// byte is sent.
    #[default]
    Checked,
    /// A connect succeeds as soon as the agent has it; the first bytes travel with the
    /// request, and a failure at the far side arrives as a reset on first I/O.
    Optimistic,
}

impl ConnectMode {
    /// The word in `agent.toml` (`connect = "…"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectMode::Checked => "checked",
            ConnectMode::Optimistic => "optimistic",
        }
    }

    pub fn parse(text: &str) -> Option<ConnectMode> {
        [ConnectMode::Checked, ConnectMode::Optimistic]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

/// The suffix of a gateway name that marks an optimistic route in `TUNNEL_ROUTES`.
const OPTIMISTIC_SUFFIX: &str = "+optimistic";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoutesError {
    #[error("TUNNEL_ROUTES is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("TUNNEL_ROUTES: `{0}` is not GATEWAY=PATTERN[,PATTERN…]")]
    BadRoute(String),
    #[error("TUNNEL_ROUTES: `{0}` is not a gateway name")]
    BadGateway(String),
    #[error("TUNNEL_ROUTES: {0}")]
    BadPattern(#[from] PatternError),
}

impl RouteTable {
    pub fn parse(text: &str) -> Result<RouteTable, RoutesError> {
        if text.len() > MAX_LEN {
            return Err(RoutesError::TooLong);
        }
        let mut routes = Vec::new();
        for route in text.split(';').map(str::trim).filter(|r| !r.is_empty()) {
            let (via, patterns) = route
                .split_once('=')
                .ok_or_else(|| RoutesError::BadRoute(route.to_string()))?;
            let (via, connect) = match via.strip_suffix(OPTIMISTIC_SUFFIX) {
                Some(via) => (via, ConnectMode::Optimistic),
                None => (via, ConnectMode::Checked),
            };
            if !is_valid_service_name(via) {
                return Err(RoutesError::BadGateway(via.to_string()));
            }
            let patterns = patterns
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(Pattern::parse)
                .collect::<Result<Vec<_>, _>>()?;
            if patterns.is_empty() {
                return Err(RoutesError::BadRoute(route.to_string()));
            }
            routes.push(TableRoute {
                via: via.to_string(),
                patterns,
                connect,
            });
        }
        Ok(RouteTable::new(routes))
    }

    /// The table of these routes, in this order.
    pub fn new(routes: Vec<TableRoute>) -> RouteTable {
        let mut by_address = Vec::new();
        let mut by_name = Vec::new();
        let mut looked_up = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            for pattern in &route.patterns {
                let net = match &pattern.host {
                    HostPattern::Net(net) => Some(*net),
                    _ => None,
                };
                if matches!(pattern.host, HostPattern::Any | HostPattern::Net(_)) {
                    by_address.push(AddressRule {
                        route: index,
                        net,
                        ports: pattern.ports,
                    });
                }
                if net.is_none() {
                    by_name.push(NameRule {
                        route: index,
                        pattern: pattern.clone(),
                    });
                }
                // A catch-all host limited to some ports (`*:5432`) would give every
                // name, `localhost` included, an address that only those ports can use.
                let catch_all_for_some_ports =
                    pattern.host == HostPattern::Any && pattern.ports != Ports::ANY;
                if net.is_none() && !catch_all_for_some_ports {
                    looked_up.push(Pattern {
                        host: pattern.host.clone(),
                        ports: Ports::ANY,
                    });
                }
            }
        }
        RouteTable {
            routes,
            by_address,
            by_name,
            looked_up,
        }
    }

    /// The routes, in table order.
    pub fn routes(&self) -> &[TableRoute] {
        &self.routes
    }

    /// The route at `index` in [`RouteTable::routes`].
    pub fn route(&self, index: usize) -> Option<&TableRoute> {
        self.routes.get(index)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The patterns that select by address, in table order (the first match decides).
    pub fn address_rules(&self) -> &[AddressRule] {
        &self.by_address
    }

    /// The index of the route for a connection to `ip:port`, if one selects it.
    pub fn route_index_ip(&self, ip: IpAddr, port: u16) -> Option<usize> {
        self.by_address
            .iter()
            .find(|rule| rule.matches(ip, port))
            .map(|rule| rule.route)
    }

    /// The route for a connection to `ip:port`, if one selects it.
    pub fn route_ip(&self, ip: IpAddr, port: u16) -> Option<&TableRoute> {
        self.route_index_ip(ip, port)
            .and_then(|index| self.route(index))
    }

    /// The route for a connection to `name:port`, if one selects it.
    pub fn route_name(&self, name: &str, port: u16) -> Option<&TableRoute> {
        self.by_name
            .iter()
            .find(|rule| rule.pattern.matches_name(name, port))
            .and_then(|rule| self.route(rule.route))
    }

    /// The route for a connection to `target` (a service is never routed by pattern).
    pub fn route_for(&self, target: &Target) -> Option<&TableRoute> {
        match target {
            Target::Addr {
                host: Host::Ip(ip),
                port,
            } => self.route_ip(*ip, *port),
            Target::Addr {
                host: Host::Name(name),
                port,
            } => self.route_name(name, *port),
            Target::Service(_) => None,
        }
    }

    /// True when some route may select `name` on some port: such names get a synthetic
    /// address at lookup time, before the port is known. A catch-all host limited to
    /// some ports (`*:5432`) does not count: it would give every name, `localhost`
    /// included, an address that only those ports can use.
    pub fn may_route_name(&self, name: &str) -> bool {
        self.looked_up
            .iter()
            .any(|pattern| pattern.matches_name(name, 1))
    }
}

impl fmt::Display for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, route) in self.routes.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            f.write_str(&route.via)?;
            if route.connect == ConnectMode::Optimistic {
                f.write_str(OPTIMISTIC_SUFFIX)?;
            }
            f.write_str("=")?;
            for (j, p) in route.patterns.iter().enumerate() {
                if j > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{p}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_route_decides() {
        let t =
            RouteTable::parse("b=10.20.0.0/16,*.site-b.internal; c+optimistic=10.0.0.0/8,db:5432")
                .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        fn via(r: Option<&TableRoute>) -> Option<&str> {
            r.map(|r| r.via.as_str())
        }
        assert_eq!(via(t.route_ip(ip("10.20.1.1"), 80)), Some("b"));
        assert_eq!(via(t.route_ip(ip("10.21.1.1"), 80)), Some("c"));
        assert_eq!(via(t.route_ip(ip("11.0.0.1"), 80)), None);
        assert_eq!(via(t.route_name("x.site-b.internal", 1)), Some("b"));
        assert_eq!(via(t.route_name("db", 5432)), Some("c"));
        assert_eq!(via(t.route_name("db", 80)), None);
        assert_eq!(t.routes()[0].connect, ConnectMode::Checked);
        assert_eq!(t.routes()[1].connect, ConnectMode::Optimistic);
        assert_eq!(t.route_index_ip(ip("10.21.1.1"), 80), Some(1));
        let target = |s: &str| Target::parse(s).unwrap();
        assert_eq!(via(t.route_for(&target("10.20.1.1:80"))), Some("b"));
        assert_eq!(via(t.route_for(&target("db:5432"))), Some("c"));
        assert_eq!(via(t.route_for(&target("db:80"))), None);
        assert_eq!(via(t.route_for(&target("db"))), None);
        assert!(t.may_route_name("db"));
        assert!(!t.may_route_name("example.org"));
        let ports_only = RouteTable::parse("b=*:5432").unwrap();
        assert!(!ports_only.may_route_name("localhost"));
        assert_eq!(RouteTable::parse(&t.to_string()), Ok(t));
        assert!(RouteTable::parse("").is_ok_and(|t| t.is_empty()));
        assert!(RouteTable::parse("b").is_err());
        assert!(RouteTable::parse("b=").is_err());
        assert!(RouteTable::parse("a.b=10.0.0.0/8").is_err());
        assert!(RouteTable::parse("b+eager=10.0.0.0/8").is_err());
    }
}
