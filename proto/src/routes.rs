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

use crate::pattern::{HostPattern, Pattern, PatternError};
use crate::target::is_valid_service_name;

/// Longest `TUNNEL_ROUTES` accepted (an environment variable, not a file).
pub const MAX_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    pub routes: Vec<TableRoute>,
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
        Ok(RouteTable { routes })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route for a connection to `ip:port`, if one selects it.
    pub fn route_ip(&self, ip: IpAddr, port: u16) -> Option<&TableRoute> {
        self.routes
            .iter()
            .find(|r| r.patterns.iter().any(|p| p.matches_ip(ip, port)))
    }

    /// The route for a connection to `name:port`, if one selects it.
    pub fn route_name(&self, name: &str, port: u16) -> Option<&TableRoute> {
        self.routes
            .iter()
            .find(|r| r.patterns.iter().any(|p| p.matches_name(name, port)))
    }

    /// True when some route may select `name` on some port: such names get a synthetic
    /// address at lookup time, before the port is known. A catch-all host limited to
    /// some ports (`*:5432`) does not count: it would give every name, `localhost`
    /// included, an address that only those ports can use.
    pub fn may_route_name(&self, name: &str) -> bool {
        self.routes.iter().any(|route| {
            route.patterns.iter().any(|p| {
                let catch_all_for_some_ports =
                    p.host == HostPattern::Any && p.ports != crate::pattern::Ports::ANY;
                let by_name = !matches!(p.host, HostPattern::Net(_)) && !catch_all_for_some_ports;
                by_name
                    && Pattern {
                        host: p.host.clone(),
                        ports: crate::pattern::Ports::ANY,
                    }
                    .matches_name(name, 1)
            })
        })
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
                .unwrap_or_else(|e| panic!("{e}"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
        fn via(r: Option<&TableRoute>) -> Option<&str> {
            r.map(|r| r.via.as_str())
        }
        assert_eq!(via(t.route_ip(ip("10.20.1.1"), 80)), Some("b"));
        assert_eq!(via(t.route_ip(ip("10.21.1.1"), 80)), Some("c"));
        assert_eq!(via(t.route_ip(ip("11.0.0.1"), 80)), None);
        assert_eq!(via(t.route_name("x.site-b.internal", 1)), Some("b"));
        assert_eq!(via(t.route_name("db", 5432)), Some("c"));
        assert_eq!(via(t.route_name("db", 80)), None);
        assert_eq!(t.routes[0].connect, ConnectMode::Checked);
        assert_eq!(t.routes[1].connect, ConnectMode::Optimistic);
        assert!(t.may_route_name("db"));
        assert!(!t.may_route_name("example.org"));
        let ports_only = RouteTable::parse("b=*:5432").unwrap_or_else(|e| panic!("{e}"));
        assert!(!ports_only.may_route_name("localhost"));
        assert_eq!(RouteTable::parse(&t.to_string()), Ok(t));
        assert!(RouteTable::parse("").is_ok_and(|t| t.is_empty()));
        assert!(RouteTable::parse("b").is_err());
        assert!(RouteTable::parse("b=").is_err());
        assert!(RouteTable::parse("a.b=10.0.0.0/8").is_err());
        assert!(RouteTable::parse("b+eager=10.0.0.0/8").is_err());
    }
}
