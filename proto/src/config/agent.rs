//! `agent.toml`: the gateways an agent keeps tunnels to, the routes that send
//! destinations through them, and local forward ports.
//!
//! ```toml
//! control = "/run/user/1000/tunnel/agent.sock"   # optional
//!
//! [[gateway]]
//! name = "site-b"
//! address = "gw.site-b.example.org:7443"     # or a list of replicas sharing the CA:
//!                                            # ["gw1.site-b.example.org:7443", "gw2…:7443"]
//! ca = "ca.pem"
//! cert = "alice.pem"
//! key = "alice-key.pem"
//! # server_name = "gw.site-b.example.org"   # defaults to each address's host
//! # connections = 2                         # pooled HTTP/2 connections
//!
//! [[route]]
//! via = "site-b"
//! to = ["10.20.0.0/16", "*.site-b.internal"]
//! # connect = "checked"                     # or "optimistic" (see routes::ConnectMode)
//!
//! [[forward]]
//! listen = "127.0.0.1:15432"
//! to = "db.site-b.internal:5432"
//! via = "site-b"
//! # allow_users = ["alice"]                 # who may connect (default: every local user)
//! # allow_groups = ["lab"]
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Problems, base_dir, parse_toml, resolve, seconds};
use crate::pattern::Pattern;
use crate::routes::{ConnectMode, TableRoute};
use crate::target::{Host, Target};

#[derive(Debug, Deserialize)]
struct AgentFile {
    control: Option<String>,
    metrics: Option<String>,
    group: Option<String>,
    synthetic_ipv4: Option<String>,
    synthetic_ipv6: Option<String>,
    connect_timeout: Option<f64>,
    ping_interval: Option<f64>,
    ping_timeout: Option<f64>,
    drain_timeout: Option<f64>,
    #[serde(default)]
    gateway: Vec<GatewayEntry>,
    #[serde(default)]
    route: Vec<RouteEntry>,
    #[serde(default)]
    forward: Vec<ForwardEntry>,
    #[serde(default)]
    publish: Vec<PublishEntry>,
    #[serde(default)]
    callback: Vec<CallbackEntry>,
}

#[derive(Debug, Deserialize)]
struct CallbackEntry {
    via: Option<String>,
    ports: String,
}

#[derive(Debug, Deserialize)]
struct PublishEntry {
    name: String,
    to: String,
    via: Option<String>,
    reach: Option<Vec<String>>,
    proxy_protocol: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct GatewayEntry {
    name: String,
    address: OneOrMany,
    ca: String,
    cert: Option<String>,
    key: Option<String>,
    credential: Option<String>,
    server_name: Option<String>,
    connections: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct RouteEntry {
    via: Option<String>,
    to: Vec<String>,
    connect: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ForwardEntry {
    listen: String,
    to: String,
    via: Option<String>,
    allow_users: Option<Vec<String>>,
    allow_groups: Option<Vec<String>>,
}

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The agent's Unix socket (registrations from the preload, `status`); `None`
    /// means the default place.
    pub control: Option<PathBuf>,
    /// A group whose members may use the agent besides its own user.
    pub group: Option<String>,
    /// Where Prometheus scrapes `/metrics`; `None`: no metrics.
    pub metrics: Option<SocketAddr>,
    /// Synthetic addresses handed out for routed names.
    pub synthetic_ipv4: ipnet::Ipv4Net,
    pub synthetic_ipv6: ipnet::Ipv6Net,
    /// Time allowed for TCP + TLS + HTTP/2 set-up of one tunnel connection.
    pub connect_timeout: Duration,
    /// How often an idle tunnel connection is checked with an HTTP/2 PING.
    pub ping_interval: Duration,
    /// A PING unanswered for this long marks the connection dead.
    pub ping_timeout: Duration,
    /// On SIGTERM, how long streams in flight may go on before they are reset.
    pub drain_timeout: Duration,
    pub gateways: Vec<GatewayPeer>,
    pub routes: Vec<Route>,
    pub forwards: Vec<Forward>,
    pub publications: Vec<Publication>,
    pub callbacks: Vec<CallbackRange>,
}

/// Ports on which a program's listeners live at a gateway instead (`[[callback]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct CallbackRange {
    pub via: String,
    pub ports: crate::callback::PortRange,
}

/// A service reachable from this agent, offered at a gateway (`[[publish]]`): the
/// gateway sends each connection for `name` back over a connection this agent dialled.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub name: String,
    /// Where the agent connects for each inbound stream.
    pub to: Target,
    pub via: String,
    /// Consumers this agent accepts (identities or `group:NAME`, as the gateway names
    /// them); `None`: whoever the gateway's `reach` admits.
    pub reach: Option<Vec<String>>,
    /// Send a PROXY protocol v2 header first, so the service sees the client's address.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayPeer {
    pub name: String,
    /// Where the gateway (or its replicas, which share one CA) listens; the pool's
    /// connections are spread over them.
    pub addresses: Vec<GatewayAddress>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// True when the certificate and key come from one `credential` file, which the
    /// agent renews itself (enrolment writes it); separate `cert` and `key` files are
    /// the site's to replace.
    pub renews: bool,
    /// Size of the connection pool.
    pub connections: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayAddress {
    /// `host:port` as written.
    pub address: String,
    /// The name the gateway's certificate must carry there.
    pub server_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub via: String,
    pub to: Vec<Pattern>,
    pub connect: ConnectMode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub to: Target,
    pub via: String,
    /// Who may use the port, by the local user that owns the connecting socket. `None`:
    /// every local user (as with `ssh -L`).
    pub allow: Option<LocalUsers>,
}

/// Local users named in `allow_users` and `allow_groups`; the agent resolves the names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalUsers {
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

pub const DEFAULT_CONNECTIONS: usize = 2;
/// Benchmarking range (RFC 2544): never used on real networks.
pub const DEFAULT_SYNTHETIC_IPV4: &str = "198.18.0.0/15";
/// A unique-local range for synthetic IPv6 addresses.
pub const DEFAULT_SYNTHETIC_IPV6: &str = "fd7e:7e7e:7e7e::/64";

fn synthetic_net<T>(
    problems: &mut Problems,
    key: &str,
    written: Option<&str>,
    default: &str,
    pick: impl Fn(&ipnet::IpNet) -> Option<T>,
) -> Option<T> {
    let text = written.unwrap_or(default);
    let net = text
        .parse::<ipnet::IpNet>()
        .ok()
        .filter(|n| n.trunc() == *n);
    match net.as_ref().and_then(pick) {
        Some(net) => Some(net),
        None => {
            problems.add(
                key,
                format!(
                    "`{text}` is not a usable block: give a CIDR of the right family with room for names (IPv4 /24 or larger, IPv6 /112 or larger), e.g. \"{default}\""
                ),
            );
            None
        }
    }
}
const MAX_CONNECTIONS: i64 = 64;

/// A local user or group name as `useradd`/`groupadd` accept them (a number is a uid
/// or gid).
fn is_local_account_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.$".contains(&b))
}

impl AgentConfig {
    /// Parses and validates the text of `file` (named in messages; relative paths are
    /// taken from its directory).
    pub fn parse(text: &str, file: &Path) -> Result<AgentConfig, ConfigError> {
        let (raw, mut problems) = parse_toml::<AgentFile>(text, file)?;
        let base = base_dir(file);

        let mut gateways = Vec::new();
        let mut names = HashSet::new();
        if raw.gateway.is_empty() {
            problems.add(
                "gateway",
                "no [[gateway]] table: enrol with `tunnel-agent enroll`, or add one with name, address, ca, cert and key",
            );
        }
        for (i, g) in raw.gateway.iter().enumerate() {
            let key = format!("gateway[{i}]");
            if !crate::target::is_valid_service_name(&g.name) {
                problems.add(
                    format!("{key}.name"),
                    format!(
                        "`{}` is not a usable name: one word of letters, digits, - or _",
                        g.name
                    ),
                );
            } else if !names.insert(g.name.clone()) {
                problems.add(
                    format!("{key}.name"),
                    format!("`{}` is used by two gateways: names must differ", g.name),
                );
            }
            let written = match &g.address {
                OneOrMany::One(a) => vec![a.clone()],
                OneOrMany::Many(list) => list.clone(),
            };
            if written.is_empty() {
                problems.add(
                    format!("{key}.address"),
                    "empty: give host:port, or a list of them",
                );
            }
            let mut addresses = Vec::new();
            for address in written {
                let host = match Target::parse(&address) {
                    Ok(Target::Addr { host, .. }) => host,
                    _ => {
                        problems.add(
                            format!("{key}.address"),
                            format!(
                                "`{address}` is not host:port (IPv6 as [addr]:port), e.g. \"gw.example.org:7443\""
                            ),
                        );
                        continue;
                    }
                };
                let server_name = match (&g.server_name, host) {
                    (Some(name), _) => name.clone(),
                    (None, Host::Ip(ip)) => ip.to_string(),
                    (None, Host::Name(name)) => name,
                };
                addresses.push(GatewayAddress {
                    address,
                    server_name,
                });
            }
            let connections = g.connections.unwrap_or(DEFAULT_CONNECTIONS as i64);
            if !(1..=MAX_CONNECTIONS).contains(&connections) {
                problems.add(
                    format!("{key}.connections"),
                    format!("{connections} is out of range: give 1 to {MAX_CONNECTIONS}"),
                );
            }
            let (cert, key, renews) = match (&g.credential, &g.cert, &g.key) {
                (Some(c), None, None) => (resolve(&base, c), resolve(&base, c), true),
                (None, Some(cert), Some(key)) => (resolve(&base, cert), resolve(&base, key), false),
                (Some(c), _, _) => {
                    problems.add(
                        format!("{key}.credential"),
                        "give either credential (one file with key and certificate, renewed by the agent) or cert and key, not both",
                    );
                    (resolve(&base, c), resolve(&base, c), true)
                }
                (None, cert, key_file) => {
                    let missing = if cert.is_none() { "cert" } else { "key" };
                    problems.add(
                        format!("{key}.{missing}"),
                        "missing: give cert and key (files from `tunnel-gateway issue`), or credential (written by `tunnel-agent enroll`)",
                    );
                    let path = |p: &Option<String>| resolve(&base, p.as_deref().unwrap_or(""));
                    (path(cert), path(key_file), false)
                }
            };
            gateways.push(GatewayPeer {
                name: g.name.clone(),
                addresses,
                ca: resolve(&base, &g.ca),
                cert,
                key,
                renews,
                connections: connections.clamp(1, MAX_CONNECTIONS) as usize,
            });
        }

        let via = |problems: &mut Problems, key: String, via: &Option<String>| -> String {
            match via {
                Some(v) if names.contains(v) => v.clone(),
                Some(v) => {
                    let known: Vec<&str> = raw.gateway.iter().map(|g| g.name.as_str()).collect();
                    problems.add(
                        key,
                        format!(
                            "no gateway is named `{v}`: use one of [{}]",
                            known.join(", ")
                        ),
                    );
                    v.clone()
                }
                None if raw.gateway.len() == 1 => raw.gateway[0].name.clone(),
                None => {
                    problems.add(
                        key,
                        "missing: with several gateways, say which one with via = \"NAME\"",
                    );
                    String::new()
                }
            }
        };

        let mut routes = Vec::new();
        for (i, r) in raw.route.iter().enumerate() {
            let key = format!("route[{i}]");
            let via = via(&mut problems, format!("{key}.via"), &r.via);
            if r.to.is_empty() {
                problems.add(
                    format!("{key}.to"),
                    "empty: list the destinations, e.g. [\"10.20.0.0/16\", \"*.site-b.internal\"]",
                );
            }
            let mut to = Vec::new();
            for (j, pattern) in r.to.iter().enumerate() {
                match Pattern::parse(pattern) {
                    Ok(p) => to.push(p),
                    Err(e) => problems.add(format!("{key}.to[{j}]"), e),
                }
            }
            let connect = match r.connect.as_deref() {
                None => ConnectMode::default(),
                Some(word) => ConnectMode::parse(word).unwrap_or_else(|| {
                    problems.add(
                        format!("{key}.connect"),
                        format!("`{word}` is not a connect mode: give \"checked\" (the default) or \"optimistic\""),
                    );
                    ConnectMode::default()
                }),
            };
            routes.push(Route { via, to, connect });
        }

        let mut forwards = Vec::new();
        let mut listens = HashSet::new();
        for (i, f) in raw.forward.iter().enumerate() {
            let key = format!("forward[{i}]");
            let via = via(&mut problems, format!("{key}.via"), &f.via);
            let listen = match f.listen.parse::<SocketAddr>() {
                Ok(addr) => {
                    if addr.port() != 0 && !listens.insert(addr) {
                        problems.add(
                            format!("{key}.listen"),
                            format!("{addr} is used by two forwards"),
                        );
                    }
                    Some(addr)
                }
                Err(_) => {
                    problems.add(
                        format!("{key}.listen"),
                        format!(
                            "`{}` is not ADDRESS:PORT, e.g. \"127.0.0.1:15432\"",
                            f.listen
                        ),
                    );
                    None
                }
            };
            let to = match Target::parse(&f.to) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.add(
                        format!("{key}.to"),
                        format!("{e} (a destination host:port, or a service name of the gateway)"),
                    );
                    None
                }
            };
            let allow = match (&f.allow_users, &f.allow_groups) {
                (None, None) => None,
                (users, groups) => {
                    let users = users.clone().unwrap_or_default();
                    let groups = groups.clone().unwrap_or_default();
                    for (field, names) in [("allow_users", &users), ("allow_groups", &groups)] {
                        for name in names.iter().filter(|n| !is_local_account_name(n)) {
                            problems.add(
                                format!("{key}.{field}"),
                                format!("`{name}` is not a user or group name"),
                            );
                        }
                    }
                    if users.is_empty() && groups.is_empty() {
                        problems.add(
                            format!("{key}.allow_users"),
                            "empty lists let nobody in: name users or groups, or remove both keys to let every local user in",
                        );
                    }
                    Some(LocalUsers { users, groups })
                }
            };
            if let (Some(listen), Some(to)) = (listen, to) {
                forwards.push(Forward {
                    listen,
                    to,
                    via,
                    allow,
                });
            }
        }

        let mut publications = Vec::new();
        let mut published = HashSet::new();
        for (i, p) in raw.publish.iter().enumerate() {
            let key = format!("publish[{i}]");
            let via = via(&mut problems, format!("{key}.via"), &p.via);
            if !crate::target::is_valid_service_name(&p.name) {
                problems.add(
                    format!("{key}.name"),
                    format!(
                        "`{}` is not a usable name: one word of letters, digits, - or _",
                        p.name
                    ),
                );
            } else if !published.insert((p.name.to_ascii_lowercase(), via.clone())) {
                problems.add(
                    format!("{key}.name"),
                    format!("`{}` is published twice through `{via}`", p.name),
                );
            }
            let to = match Target::parse(&p.to) {
                Ok(t @ Target::Addr { .. }) => Some(t),
                _ => {
                    problems.add(
                        format!("{key}.to"),
                        format!(
                            "`{}` is not host:port: where the service listens, seen from this agent, e.g. \"127.0.0.1:5432\"",
                            p.to
                        ),
                    );
                    None
                }
            };
            if let Some(reach) = &p.reach {
                for who in reach {
                    let named = who.strip_prefix("group:").unwrap_or(who);
                    if who != "*" && !super::gateway::is_valid_identity(named) {
                        problems.add(
                            format!("{key}.reach"),
                            format!("`{who}` is not an identity, group:NAME or \"*\""),
                        );
                    }
                }
            }
            if let Some(to) = to {
                publications.push(Publication {
                    name: p.name.to_ascii_lowercase(),
                    to,
                    via,
                    reach: p.reach.clone(),
                    proxy_protocol: p.proxy_protocol.unwrap_or(false),
                });
            }
        }

        let mut callbacks: Vec<CallbackRange> = Vec::new();
        for (i, c) in raw.callback.iter().enumerate() {
            let key = format!("callback[{i}]");
            let via = via(&mut problems, format!("{key}.via"), &c.via);
            match crate::callback::PortRange::parse(&c.ports) {
                Ok(ports) => {
                    if let Some(other) =
                        callbacks.iter().find(|o| o.ports.overlap(&ports).is_some())
                    {
                        problems.add(
                            format!("{key}.ports"),
                            format!(
                                "{ports} overlaps {} (through `{}`): a port's listeners live at one gateway",
                                other.ports, other.via
                            ),
                        );
                    }
                    callbacks.push(CallbackRange { via, ports });
                }
                Err(e) => problems.add(format!("{key}.ports"), e),
            }
        }

        let synthetic_ipv4 = synthetic_net(
            &mut problems,
            "synthetic_ipv4",
            raw.synthetic_ipv4.as_deref(),
            DEFAULT_SYNTHETIC_IPV4,
            |n: &ipnet::IpNet| match n {
                ipnet::IpNet::V4(v4) if v4.prefix_len() <= 24 => Some(*v4),
                _ => None,
            },
        );
        let synthetic_ipv6 = synthetic_net(
            &mut problems,
            "synthetic_ipv6",
            raw.synthetic_ipv6.as_deref(),
            DEFAULT_SYNTHETIC_IPV6,
            |n: &ipnet::IpNet| match n {
                ipnet::IpNet::V6(v6) if v6.prefix_len() <= 112 => Some(*v6),
                _ => None,
            },
        );
        if let Some(group) = raw.group.as_ref().filter(|g| !is_local_account_name(g)) {
            problems.add("group", format!("`{group}` is not a group name"));
        }
        let metrics = super::socket_address(&mut problems, "metrics", raw.metrics.as_ref());
        let config = AgentConfig {
            control: raw.control.as_deref().map(|c| resolve(&base, c)),
            metrics,
            group: raw.group.clone(),
            synthetic_ipv4: synthetic_ipv4.unwrap_or_default(),
            synthetic_ipv6: synthetic_ipv6.unwrap_or_default(),
            connect_timeout: seconds(&mut problems, "connect_timeout", raw.connect_timeout, 10.0),
            ping_interval: seconds(&mut problems, "ping_interval", raw.ping_interval, 5.0),
            ping_timeout: seconds(&mut problems, "ping_timeout", raw.ping_timeout, 5.0),
            drain_timeout: seconds(&mut problems, "drain_timeout", raw.drain_timeout, 30.0),
            gateways,
            routes,
            forwards,
            publications,
            callbacks,
        };
        problems.finish(file, config)
    }

    /// The `[[callback]]` port ranges, as the preload reads them (`TUNNEL_CALLBACKS`):
    /// comma-separated, empty when there are none.
    pub fn callback_ports(&self) -> String {
        self.callbacks
            .iter()
            .map(|c| c.ports.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn gateway(&self, name: &str) -> Option<&GatewayPeer> {
        self.gateways.iter().find(|g| g.name == name)
    }

    /// Puts routes given on a command line (`PATTERN=GATEWAY` each) in front of the
    /// file's; the message names the bad argument and the fix.
    pub fn add_command_line_routes(&mut self, routes: &[String]) -> Result<(), String> {
        let mut extra = Vec::new();
        for route in routes {
            let Some((pattern, via)) = route.rsplit_once('=') else {
                return Err(format!(
                    "--route `{route}`: write PATTERN=GATEWAY, e.g. 10.20.0.0/16=site-b"
                ));
            };
            let pattern = Pattern::parse(pattern).map_err(|e| format!("--route `{route}`: {e}"))?;
            if self.gateway(via).is_none() {
                let known: Vec<&str> = self.gateways.iter().map(|g| g.name.as_str()).collect();
                return Err(format!(
                    "--route `{route}`: no gateway named `{via}` in the config (known: {})",
                    known.join(", ")
                ));
            }
            extra.push(Route {
                via: via.to_string(),
                to: vec![pattern],
                connect: ConnectMode::default(),
            });
        }
        extra.append(&mut self.routes);
        self.routes = extra;
        Ok(())
    }

    /// The routes in the form the preload reads (`TUNNEL_ROUTES`).
    pub fn route_table(&self) -> crate::routes::RouteTable {
        crate::routes::RouteTable::new(
            self.routes
                .iter()
                .map(|r| TableRoute {
                    via: r.via.clone(),
                    patterns: r.to.clone(),
                    connect: r.connect,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_with_paths_from_the_file() {
        let text = r#"
            [[gateway]]
            name = "site-b"
            address = "127.0.0.1:7443"
            ca = "ca.pem"
            cert = "/abs/alice.pem"
            key = "alice-key.pem"

            [[route]]
            to = ["10.20.0.0/16", "*.site-b.internal"]

            [[forward]]
            listen = "127.0.0.1:0"
            to = "pg"
        "#;
        let c = AgentConfig::parse(text, Path::new("/etc/tunnel/agent.toml")).unwrap();
        let g = &c.gateways[0];
        assert_eq!(g.ca, PathBuf::from("/etc/tunnel/ca.pem"));
        assert_eq!(g.cert, PathBuf::from("/abs/alice.pem"));
        assert_eq!(g.addresses[0].server_name, "127.0.0.1");
        assert_eq!(g.connections, 2);
        assert_eq!(c.routes[0].via, "site-b");
        assert_eq!(c.forwards[0].to, Target::Service("pg".into()));
    }

    #[test]
    fn every_key_of_the_file_is_known_to_the_unknown_key_check() {
        let Some(super::super::keys::Shape::Table(fields)) =
            super::super::keys::Shape::of::<AgentFile>()
        else {
            panic!("the key check cannot follow AgentFile: unknown keys would pass unseen");
        };
        let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
        for key in ["control", "gateway", "route", "forward"] {
            assert!(names.contains(&key), "{key} missing from {names:?}");
        }
    }
}
