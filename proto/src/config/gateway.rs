//! `gateway.toml`: where the gateway listens, its CA and certificate, who may reach
//! what, and named services.
//!
//! ```toml
//! listen = "0.0.0.0:7443"
//! ca = "ca.pem"
//! ca_key = "ca-key.pem"
//! cert = "gateway.pem"
//! key = "gateway-key.pem"
//!
//! [[allow]]
//! identity = "alice"               # or "*" for every identity the CA vouches for
//! to = ["10.20.0.0/16", "*.site-b.internal:22", "db.site-b.internal:5432", "pg"]
//!
//! [service.pg]                     # clients reach it as "pg"
//! target = "db.site-b.internal:5432"
//!
//! [hosts]                          # names the gateway resolves itself, before DNS
//! "db.site-b.internal" = ["10.20.0.5"]
//! ```
//!
//! A `to` entry that equals the name of a service allows that service; every other
//! entry is a [`Pattern`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Problems, base_dir, parse_toml, resolve, seconds, written_duration};
use crate::pattern::Pattern;
use crate::target::{Target, is_valid_service_name};

#[derive(Debug, Deserialize)]
struct GatewayFile {
    listen: String,
    ca: String,
    ca_key: String,
    cert: String,
    key: String,
    control: Option<String>,
    metrics: Option<String>,
    connect_timeout: Option<f64>,
    drain_timeout: Option<f64>,
    ping_interval: Option<f64>,
    ping_timeout: Option<f64>,
    max_streams_per_connection: Option<i64>,
    handshake_timeout: Option<f64>,
    max_handshakes: Option<i64>,
    max_handshakes_per_source: Option<i64>,
    max_connections_per_identity: Option<i64>,
    max_streams_per_identity: Option<i64>,
    log_summary_interval: Option<f64>,
    cert_ttl: Option<String>,
    recovery_window: Option<String>,
    state_dir: Option<String>,
    #[serde(default)]
    allow: Vec<AllowEntry>,
    #[serde(default)]
    service: BTreeMap<String, ServiceEntry>,
    #[serde(default)]
    hosts: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    publish: BTreeMap<String, PublishEntry>,
    callbacks: Option<CallbacksEntry>,
}

#[derive(Debug, Deserialize)]
struct CallbacksEntry {
    address: String,
    ports: String,
    #[serde(rename = "for")]
    for_: Vec<String>,
    bind: Option<String>,
    max_per_identity: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct PublishEntry {
    by: Vec<String>,
    #[serde(default)]
    reach: Vec<String>,
    listen: Option<String>,
    #[serde(default)]
    from: Vec<String>,
    exclusive: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct AllowEntry {
    identity: String,
    to: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ServiceEntry {
    target: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The control socket (`status`); defaults to `gateway.sock` beside the config.
    pub control: PathBuf,
    /// Where Prometheus scrapes `/metrics`; `None`: no metrics.
    pub metrics: Option<SocketAddr>,
    /// Time allowed for an outbound connect to a destination.
    pub connect_timeout: Duration,
    /// On SIGTERM, streams in flight get this long to finish.
    pub drain_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub max_streams_per_connection: u32,
    /// Time a client has to finish its TLS handshake, counted from the accept.
    pub handshake_timeout: Duration,
    /// Connections waiting for their TLS handshake, in all; more are closed at once.
    pub max_handshakes: u32,
    /// The same, from one source address (IPv4) or /64 (IPv6).
    pub max_handshakes_per_source: u32,
    /// Agent connections one identity may hold at once; more are refused after the
    /// handshake, with the reason in the GOAWAY.
    pub max_connections_per_identity: u32,
    /// Streams one identity may have open at once, over all its connections; more are
    /// refused with the class `over-limit`.
    pub max_streams_per_identity: u32,
    /// Repeated refusals from one peer are logged once, then as one line with a count
    /// per this interval.
    pub log_summary_interval: Duration,
    /// Lifetime of the certificates enrolment and renewal issue.
    pub cert_ttl: Duration,
    /// How long after its certificate expired an agent may still renew it by proving
    /// it holds the enrolled key; later it needs a new token.
    pub recovery_window: Duration,
    /// Tokens, enrolled identities and revocations (shared by replicas of a gateway).
    pub state_dir: PathBuf,
    pub allow: Vec<AllowRule>,
    pub services: BTreeMap<String, Service>,
    /// Names this gateway resolves from its config, before asking DNS (lower case).
    pub hosts: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Names agents may publish here (`[publish.NAME]`), by lower-case name.
    pub publications: BTreeMap<String, PublishRule>,
    /// Listeners agents may open here for their programs (`[callbacks]`).
    pub callbacks: Option<CallbackRule>,
}

/// Where and for whom the gateway opens callback listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct CallbackRule {
    /// The gateway's address as the far site sees it: what programs advertise.
    pub address: std::net::IpAddr,
    /// Where the listeners are bound (default: `address`).
    pub bind: std::net::IpAddr,
    pub ports: crate::callback::PortRange,
    /// Identities or `group:NAME` (or `*`) whose agents may open them.
    pub for_: Vec<String>,
    /// Listeners one identity may hold at once.
    pub max_per_identity: u32,
}

/// Callback listeners one identity may hold at once, unless `max_per_identity` says.
pub const DEFAULT_CALLBACKS_PER_IDENTITY: i64 = 64;

/// Who may publish a name, who may reach it, and where the gateway offers it.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRule {
    /// Identities or `group:NAME` whose agents may publish it.
    pub by: Vec<String>,
    /// Identities or `group:NAME` (or `*`) whose agents may reach it by name.
    pub reach: Vec<String>,
    /// A port at the gateway's site where it is offered.
    pub listen: Option<SocketAddr>,
    /// Source networks admitted at `listen` (none by default).
    pub from: Vec<ipnet::IpNet>,
    /// One publisher at a time; a second is refused with the holder named.
    pub exclusive: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AllowRule {
    /// An identity (a client certificate's common name), `group:NAME` (a group given
    /// at enrolment), or `*`.
    pub identity: String,
    pub to: Vec<AllowTo>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AllowTo {
    Pattern(Pattern),
    Service(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub target: Target,
}

const DEFAULT_MAX_STREAMS: i64 = 10_000;
const DEFAULT_MAX_HANDSHAKES: i64 = 256;
const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: i64 = 32;
const DEFAULT_MAX_CONNECTIONS_PER_IDENTITY: i64 = 128;
const DEFAULT_MAX_STREAMS_PER_IDENTITY: i64 = 4096;
/// The largest value any count in the file may take.
const MAX_COUNT: i64 = 1_000_000;

/// A count from the file, checked: 1 to [`MAX_COUNT`].
fn count(problems: &mut Problems, key: &str, value: Option<i64>, default: i64) -> u32 {
    let v = value.unwrap_or(default);
    if !(1..=MAX_COUNT).contains(&v) {
        problems.add(key, format!("{v} is out of range: give 1 to {MAX_COUNT}"));
        return default.clamp(1, MAX_COUNT) as u32;
    }
    v as u32
}

pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_RECOVERY_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// True for a usable identity: 1 to 64 bytes of letters, digits, `.`, `-`, `_`, `@`.
pub fn is_valid_identity(identity: &str) -> bool {
    (1..=64).contains(&identity.len())
        && identity
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
}

/// Where a gateway keeps its state and its control socket, read from a file that may
/// be invalid (an operator revoking in an emergency must not wait for a typo in the
/// rules to be fixed): `state_dir` and `control` where they can be read, else their
/// defaults.
pub fn state_places(text: &str, file: &Path) -> (PathBuf, PathBuf) {
    let base = base_dir(file);
    let table = toml::from_str::<toml::Table>(text).ok();
    let key = |name: &str| {
        table
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(toml::Value::as_str)
            .map(str::to_string)
    };
    (
        resolve(&base, &key("state_dir").unwrap_or_else(|| "state".into())),
        resolve(
            &base,
            &key("control").unwrap_or_else(|| "gateway.sock".into()),
        ),
    )
}

impl GatewayConfig {
    pub fn parse(text: &str, file: &Path) -> Result<GatewayConfig, ConfigError> {
        let (raw, mut problems) = parse_toml::<GatewayFile>(text, file)?;
        let base = base_dir(file);

        let listen = raw.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
            problems.add(
                "listen",
                format!(
                    "`{}` is not ADDRESS:PORT, e.g. \"0.0.0.0:7443\" or \"[::]:7443\"",
                    raw.listen
                ),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        });

        let mut services = BTreeMap::new();
        for (name, s) in &raw.service {
            let key = format!("service.{name}");
            if !is_valid_service_name(name) {
                problems.add(
                    &key,
                    "a service name is one word of letters, digits, - or _ (no dots)",
                );
            }
            match Target::parse(&s.target) {
                Ok(target @ Target::Addr { .. }) => {
                    services.insert(name.to_ascii_lowercase(), Service { target });
                }
                Ok(Target::Service(_)) | Err(_) => problems.add(
                    format!("{key}.target"),
                    format!(
                        "`{}` is not host:port, e.g. \"db.site-b.internal:5432\"",
                        s.target
                    ),
                ),
            }
        }

        let mut publications = BTreeMap::new();
        for (name, p) in &raw.publish {
            let key = format!("publish.{name}");
            let lower = name.to_ascii_lowercase();
            if !is_valid_service_name(name) {
                problems.add(
                    &key,
                    "a published name is one word of letters, digits, - or _ (no dots)",
                );
            }
            if services.contains_key(&lower) {
                problems.add(
                    &key,
                    format!("`{name}` is also a [service.{name}]: a name is one or the other"),
                );
            }
            let who = |problems: &mut Problems, field: &str, list: &[String]| {
                for w in list {
                    let named = w.strip_prefix("group:").unwrap_or(w);
                    if w != "*" && !is_valid_identity(named) {
                        problems.add(
                            format!("{key}.{field}"),
                            format!("`{w}` is not an identity, group:NAME or \"*\""),
                        );
                    }
                }
            };
            who(&mut problems, "by", &p.by);
            who(&mut problems, "reach", &p.reach);
            if p.by.is_empty() {
                problems.add(
                    format!("{key}.by"),
                    "empty: name the identities that may publish it, e.g. [\"alice\"]",
                );
            }
            let listen = p
                .listen
                .as_ref()
                .and_then(|l| match l.parse::<SocketAddr>() {
                    Ok(addr) => Some(addr),
                    Err(_) => {
                        problems.add(
                            format!("{key}.listen"),
                            format!("`{l}` is not ADDRESS:PORT, e.g. \"0.0.0.0:15432\""),
                        );
                        None
                    }
                });
            let mut from = Vec::new();
            for f in &p.from {
                match f
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| f.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                {
                    Ok(net) => from.push(net),
                    Err(_) => problems.add(
                        format!("{key}.from"),
                        format!("`{f}` is not an address or CIDR, e.g. \"10.20.0.0/16\""),
                    ),
                }
            }
            if listen.is_some() && from.is_empty() {
                problems.add(
                    format!("{key}.from"),
                    "empty: with listen, say which source networks may connect there (e.g. [\"10.20.0.0/16\"]); nobody is admitted otherwise",
                );
            }
            publications.insert(
                lower,
                PublishRule {
                    by: p.by.clone(),
                    reach: p.reach.clone(),
                    listen,
                    from,
                    exclusive: p.exclusive.unwrap_or(false),
                },
            );
        }

        let callbacks = raw.callbacks.as_ref().and_then(|c| {
            let ip = |problems: &mut Problems, field: &str, text: &str| {
                text.trim()
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| {
                        problems.add(
                            format!("callbacks.{field}"),
                            format!("`{text}` is not an IP address, e.g. \"203.0.113.7\""),
                        )
                    })
                    .ok()
            };
            let address = ip(&mut problems, "address", &c.address);
            let bind = match &c.bind {
                Some(b) => ip(&mut problems, "bind", b),
                None => address,
            };
            let ports = crate::callback::PortRange::parse(&c.ports)
                .map_err(|e| problems.add("callbacks.ports", e))
                .ok();
            for w in &c.for_ {
                let named = w.strip_prefix("group:").unwrap_or(w);
                if w != "*" && !is_valid_identity(named) {
                    problems.add(
                        "callbacks.for",
                        format!("`{w}` is not an identity, group:NAME or \"*\""),
                    );
                }
            }
            if c.for_.is_empty() {
                problems.add(
                    "callbacks.for",
                    "empty: name the identities whose programs may listen here, e.g. [\"alice\", \"group:grid\"]",
                );
            }
            let max_per_identity = count(
                &mut problems,
                "callbacks.max_per_identity",
                c.max_per_identity,
                DEFAULT_CALLBACKS_PER_IDENTITY,
            );
            Some(CallbackRule {
                address: address?,
                bind: bind?,
                ports: ports?,
                for_: c.for_.clone(),
                max_per_identity,
            })
        });

        let mut allow = Vec::new();
        for (i, a) in raw.allow.iter().enumerate() {
            let key = format!("allow[{i}]");
            let named = a.identity.strip_prefix("group:").unwrap_or(&a.identity);
            if a.identity != "*" && !is_valid_identity(named) {
                problems.add(
                    format!("{key}.identity"),
                    format!(
                        "`{}` is not an identity: 1 to 64 letters, digits, . - _ @, or group:NAME, or \"*\"",
                        a.identity
                    ),
                );
            }
            if a.to.is_empty() {
                problems.add(
                    format!("{key}.to"),
                    "empty: list what this identity may reach, e.g. [\"10.20.0.0/16\"]",
                );
            }
            let mut to = Vec::new();
            for (j, entry) in a.to.iter().enumerate() {
                let lower = entry.to_ascii_lowercase();
                if services.contains_key(&lower) {
                    to.push(AllowTo::Service(lower));
                    continue;
                }
                match Pattern::parse(entry) {
                    Ok(p) => to.push(AllowTo::Pattern(p)),
                    Err(e) => problems.add(format!("{key}.to[{j}]"), e),
                }
            }
            allow.push(AllowRule {
                identity: a.identity.clone(),
                to,
            });
        }

        let mut hosts = BTreeMap::new();
        for (name, addresses) in &raw.hosts {
            let key = format!("hosts.\"{name}\"");
            let bare = name.strip_suffix('.').unwrap_or(name);
            if !crate::target::is_valid_name(bare) {
                problems.add(&key, "not a host name");
                continue;
            }
            if addresses.is_empty() {
                problems.add(
                    &key,
                    "empty: give one or more addresses, e.g. [\"10.20.0.5\"]",
                );
            }
            let mut ips = Vec::new();
            for a in addresses {
                match a.parse::<std::net::IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => problems.add(&key, format!("`{a}` is not an IP address")),
                }
            }
            hosts.insert(bare.to_ascii_lowercase(), ips);
        }

        let max_handshakes = count(
            &mut problems,
            "max_handshakes",
            raw.max_handshakes,
            DEFAULT_MAX_HANDSHAKES,
        );
        let max_handshakes_per_source = count(
            &mut problems,
            "max_handshakes_per_source",
            raw.max_handshakes_per_source,
            DEFAULT_MAX_HANDSHAKES_PER_SOURCE.min(max_handshakes.into()),
        );
        if max_handshakes_per_source > max_handshakes {
            problems.add(
                "max_handshakes_per_source",
                format!(
                    "{max_handshakes_per_source} is more than max_handshakes ({max_handshakes}), so it would never apply: give at most {max_handshakes}"
                ),
            );
        }

        let metrics = super::socket_address(&mut problems, "metrics", raw.metrics.as_ref());
        let config = GatewayConfig {
            listen,
            metrics,
            ca: resolve(&base, &raw.ca),
            ca_key: resolve(&base, &raw.ca_key),
            cert: resolve(&base, &raw.cert),
            key: resolve(&base, &raw.key),
            control: resolve(&base, raw.control.as_deref().unwrap_or("gateway.sock")),
            connect_timeout: seconds(&mut problems, "connect_timeout", raw.connect_timeout, 10.0),
            drain_timeout: seconds(&mut problems, "drain_timeout", raw.drain_timeout, 30.0),
            ping_interval: seconds(&mut problems, "ping_interval", raw.ping_interval, 5.0),
            ping_timeout: seconds(&mut problems, "ping_timeout", raw.ping_timeout, 5.0),
            max_streams_per_connection: count(
                &mut problems,
                "max_streams_per_connection",
                raw.max_streams_per_connection,
                DEFAULT_MAX_STREAMS,
            ),
            handshake_timeout: seconds(
                &mut problems,
                "handshake_timeout",
                raw.handshake_timeout,
                10.0,
            ),
            max_handshakes,
            max_handshakes_per_source,
            max_connections_per_identity: count(
                &mut problems,
                "max_connections_per_identity",
                raw.max_connections_per_identity,
                DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
            ),
            max_streams_per_identity: count(
                &mut problems,
                "max_streams_per_identity",
                raw.max_streams_per_identity,
                DEFAULT_MAX_STREAMS_PER_IDENTITY,
            ),
            log_summary_interval: seconds(
                &mut problems,
                "log_summary_interval",
                raw.log_summary_interval,
                10.0,
            ),
            cert_ttl: written_duration(
                &mut problems,
                "cert_ttl",
                raw.cert_ttl.as_deref(),
                DEFAULT_CERT_TTL,
                (Duration::from_secs(5), Duration::from_secs(3650 * 86_400)),
            ),
            recovery_window: written_duration(
                &mut problems,
                "recovery_window",
                raw.recovery_window.as_deref(),
                DEFAULT_RECOVERY_WINDOW,
                (Duration::ZERO, Duration::from_secs(365 * 86_400)),
            ),
            state_dir: resolve(&base, raw.state_dir.as_deref().unwrap_or("state")),
            allow,
            services,
            hosts,
            publications,
            callbacks,
        };
        problems.finish(file, config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_patterns() {
        let text = r#"
            listen = "127.0.0.1:0"
            ca = "ca.pem"
            ca_key = "ca-key.pem"
            cert = "gateway.pem"
            key = "gateway-key.pem"
            [[allow]]
            identity = "alice"
            to = ["PG", "10.0.0.0/8:22"]
            [service.pg]
            target = "127.0.0.1:5432"
        "#;
        let c = GatewayConfig::parse(text, Path::new("g/gateway.toml")).unwrap();
        assert_eq!(c.allow[0].to[0], AllowTo::Service("pg".into()));
        assert!(matches!(c.allow[0].to[1], AllowTo::Pattern(_)));
        assert_eq!(c.control, PathBuf::from("g/gateway.sock"));
    }

    #[test]
    fn every_key_of_the_file_is_known_to_the_unknown_key_check() {
        let Some(super::super::keys::Shape::Table(fields)) =
            super::super::keys::Shape::of::<GatewayFile>()
        else {
            panic!("the key check cannot follow GatewayFile: unknown keys would pass unseen");
        };
        let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
        for key in ["listen", "allow", "service", "hosts"] {
            assert!(names.contains(&key), "{key} missing from {names:?}");
        }
    }

    #[test]
    fn load_limits_have_defaults_and_can_be_set() {
        let base =
            "listen = \"127.0.0.1:0\"\nca = \"a\"\nca_key = \"b\"\ncert = \"c\"\nkey = \"d\"\n";
        let c = GatewayConfig::parse(base, Path::new("gateway.toml")).unwrap();
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!((c.max_handshakes, c.max_handshakes_per_source), (256, 32));
        assert_eq!(
            (c.max_connections_per_identity, c.max_streams_per_identity),
            (128, 4096)
        );
        assert_eq!(c.log_summary_interval, Duration::from_secs(10));

        let text = format!(
            "{base}handshake_timeout = 2.5\nmax_handshakes = 8\nmax_connections_per_identity = 3\nmax_streams_per_identity = 5\nlog_summary_interval = 1\n"
        );
        let c = GatewayConfig::parse(&text, Path::new("gateway.toml")).unwrap();
        assert_eq!(c.handshake_timeout, Duration::from_millis(2500));
        // The per-source cap follows a total cap set below its default.
        assert_eq!((c.max_handshakes, c.max_handshakes_per_source), (8, 8));
        assert_eq!(
            (c.max_connections_per_identity, c.max_streams_per_identity),
            (3, 5)
        );
        assert_eq!(c.log_summary_interval, Duration::from_secs(1));
    }
}
