//! Who may reach what: the gateway's allow rules, checked before any connection is made.
//!
//! Default deny. A request is allowed when one of the caller's rules (its identity's, or
//! `*`) matches the destination: a service by name, an address by CIDR, a name by host
//! pattern, or a name whose resolved address matches a CIDR. Names are resolved here, at
//! the gateway's site. Loopback, link-local (which holds the cloud metadata address
//! 169.254.169.254), unspecified and multicast addresses are refused unless a rule names
//! them by address; a host pattern or `*` never unlocks them, so a name that resolves to
//! 127.0.0.1 cannot reach the gateway's own services. A service's target is the
//! operator's own choice and is not checked again. Names in the config's `[hosts]`
//! resolve from there before DNS; the same rules apply to their addresses.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tunnel_proto::config::{AllowRule, AllowTo, GatewayConfig, Service};
use tunnel_proto::{ConnectError, Host, Pattern, Target};

use crate::refusals::Refusal;

/// Who asks: an identity and the groups the gateway's records give it (from its
/// enrolment; a certificate's own claims are not taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: String,
    pub groups: Vec<String>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.identity)
    }
}

impl Caller {
    fn named_by(&self, rule: &AllowRule) -> bool {
        rule.identity == "*"
            || rule.identity == self.identity
            || rule
                .identity
                .strip_prefix("group:")
                .is_some_and(|group| self.groups.iter().any(|g| g == group))
    }
}

#[derive(Debug, PartialEq)]
pub struct Policy {
    rules: Vec<AllowRule>,
    services: BTreeMap<String, Service>,
    hosts: BTreeMap<String, Vec<IpAddr>>,
    resolve_timeout: Duration,
}

/// What kind of guarded address `ip` is, if it is one: such addresses are refused
/// unless a rule names them by address.
pub fn guarded(ip: IpAddr) -> Option<&'static str> {
    const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    // fd00:ec2::254: the IPv6 metadata address of one large cloud.
    const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4 == METADATA_V4 => Some("cloud metadata"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V6(v6) if v6 == METADATA_V6 => Some("cloud metadata"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("loopback"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        _ => None,
    }
}

fn denied(why: String) -> Refusal {
    Refusal::new(ConnectError::Denied, why)
}

impl Policy {
    pub fn new(config: &GatewayConfig) -> Policy {
        Policy {
            rules: config.allow.clone(),
            services: config.services.clone(),
            hosts: config.hosts.clone(),
            resolve_timeout: config.connect_timeout,
        }
    }

    fn patterns<'a>(&'a self, identity: &'a Caller) -> impl Iterator<Item = &'a Pattern> + 'a {
        self.rules_for(identity).flat_map(|r| {
            r.to.iter().filter_map(|t| match t {
                AllowTo::Pattern(p) => Some(p),
                AllowTo::Service(_) => None,
            })
        })
    }

    fn rules_for<'a>(&'a self, identity: &'a Caller) -> impl Iterator<Item = &'a AllowRule> + 'a {
        self.rules.iter().filter(move |r| identity.named_by(r))
    }

    /// The named services `identity` may reach, with where each goes.
    pub fn services_for(&self, identity: &Caller) -> Vec<(String, String)> {
        self.services
            .iter()
            .filter(|(name, _)| {
                self.rules_for(identity).any(|r| {
                    r.to.iter()
                        .any(|t| matches!(t, AllowTo::Service(s) if s == *name))
                })
            })
            .map(|(name, service)| (name.clone(), service.target.to_string()))
            .collect()
    }

    /// Whether a stream already connected to `addr` for `target` is still allowed:
    /// asked of a new policy for every live stream, without resolving anything again.
    pub fn still_allows(
        &self,
        identity: &Caller,
        target: &Target,
        addr: SocketAddr,
    ) -> Result<(), String> {
        match target {
            Target::Service(name) => {
                let listed = self.services.contains_key(name)
                    && self.rules_for(identity).any(|r| {
                        r.to.iter()
                            .any(|t| matches!(t, AllowTo::Service(s) if s == name))
                    });
                if listed {
                    Ok(())
                } else {
                    Err(format!(
                        "no allow rule for {identity} lists the service `{name}` any more"
                    ))
                }
            }
            Target::Addr { host, port } => {
                let by_name = match host {
                    Host::Name(name) => {
                        self.patterns(identity).any(|p| p.matches_name(name, *port))
                    }
                    Host::Ip(_) => false,
                };
                self.admits(identity, addr, by_name).map_err(|_| {
                    format!("no allow rule for {identity} matches {target} ({addr}) any more")
                })
            }
        }
    }

    /// Decides whether `identity` may reach `target`, and if so, where to connect; if
    /// not, says why, in terms the operator can act on.
    pub async fn addresses(
        &self,
        identity: &Caller,
        target: &Target,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        match target {
            Target::Service(name) => {
                let Some(Service {
                    target: Target::Addr { host, port },
                }) = self.services.get(name)
                else {
                    return Err(denied(format!(
                        "there is no service `{name}` ([service.{name}] in the gateway's config)"
                    )));
                };
                let allowed = self.rules_for(identity).any(|r| {
                    r.to.iter()
                        .any(|t| matches!(t, AllowTo::Service(s) if s == name))
                });
                if !allowed {
                    return Err(denied(format!(
                        "no allow rule for {identity} lists the service `{name}`"
                    )));
                }
                self.lookup(host, *port).await
            }
            Target::Addr {
                host: Host::Ip(ip),
                port,
            } => {
                let addr = SocketAddr::new(*ip, *port);
                match self.admits(identity, addr, false) {
                    Ok(()) => Ok(vec![addr]),
                    Err(Some(kind)) => Err(denied(format!(
                        "{addr} is a guarded {kind} address: allow it with an address rule, e.g. \"{addr}\""
                    ))),
                    Err(None) => Err(denied(format!(
                        "no allow rule for {identity} matches {addr}"
                    ))),
                }
            }
            Target::Addr {
                host: host @ Host::Name(name),
                port,
            } => {
                let by_name = self.patterns(identity).any(|p| p.matches_name(name, *port));
                let by_address = self.patterns(identity).any(|p| {
                    p.ports.contains(*port)
                        && matches!(p.host, tunnel_proto::pattern::HostPattern::Net(_))
                });
                if !by_name && !by_address {
                    // Not even looked up: a denied name costs the site no DNS query.
                    return Err(denied(format!(
                        "no allow rule for {identity} matches {name}:{port} (not looked up)"
                    )));
                }
                let resolved = self.lookup(host, *port).await?;
                let mut allowed = Vec::new();
                let mut refused = Vec::new();
                for addr in resolved {
                    match self.admits(identity, addr, by_name) {
                        Ok(()) => allowed.push(addr),
                        Err(why) => refused.push((addr, why)),
                    }
                }
                if !allowed.is_empty() {
                    return Ok(allowed);
                }
                let list: Vec<String> = refused
                    .iter()
                    .map(|(addr, kind)| match kind {
                        Some(kind) => format!("{}, a guarded {kind} address", addr.ip()),
                        None => {
                            format!("{}, which no allow rule for {identity} matches", addr.ip())
                        }
                    })
                    .collect();
                let mut why = format!("{name} resolved to {}", list.join(", and "));
                if let Some((addr, _)) = refused.iter().find(|(_, kind)| kind.is_some()) {
                    let which = if refused.len() == 1 { "it" } else { "one" };
                    why.push_str(&format!(
                        ": allow {which} with an address rule, e.g. \"{addr}\""
                    ));
                }
                Err(denied(why))
            }
        }
    }

    /// Whether `identity` may connect to `addr`: matched by a rule (or already by
    /// name, when `matched_by_name` is true), and named by address if it is a guarded
    /// address. Refused: `Some(kind)` for a guarded address, `None` for no match.
    fn admits(
        &self,
        identity: &Caller,
        addr: SocketAddr,
        matched_by_name: bool,
    ) -> Result<(), Option<&'static str>> {
        let (ip, port) = (addr.ip(), addr.port());
        let mut patterns = self.patterns(identity).filter(|p| p.ports.contains(port));
        if let Some(kind) = guarded(ip) {
            return if patterns.any(|p| p.names_ip(ip)) {
                Ok(())
            } else {
                Err(Some(kind))
            };
        }
        if matched_by_name || patterns.any(|p| p.matches_ip(ip, port)) {
            Ok(())
        } else {
            Err(None)
        }
    }

    async fn lookup(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        match host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
            Host::Name(name) if self.hosts.contains_key(name) => Ok(self
                .hosts
                .get(name)
                .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
                .unwrap_or_default()),
            Host::Name(name) => {
                let lookup = tokio::net::lookup_host((name.as_str(), port));
                match tokio::time::timeout(self.resolve_timeout, lookup).await {
                    Err(_) => Err(Refusal::new(
                        ConnectError::TimedOut,
                        format!(
                            "resolving {name} took longer than connect_timeout ({:.0}s)",
                            self.resolve_timeout.as_secs_f64()
                        ),
                    )),
                    Ok(Err(e)) => Err(Refusal::new(
                        ConnectError::NameNotFound,
                        format!("the gateway's resolver does not know {name} ({e})"),
                    )),
                    Ok(Ok(addrs)) => {
                        let addrs: Vec<SocketAddr> = addrs.collect();
                        if addrs.is_empty() {
                            Err(Refusal::new(
                                ConnectError::NameNotFound,
                                format!("{name} has no address"),
                            ))
                        } else {
                            Ok(addrs)
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(rules: &str) -> Policy {
        let text = format!(
            "listen = \"127.0.0.1:1\"\nca = \"a\"\nca_key = \"b\"\ncert = \"c\"\nkey = \"d\"\n{rules}"
        );
        Policy::new(&GatewayConfig::parse(&text, Path::new("gateway.toml")).unwrap())
    }

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    fn caller(identity: &str) -> Caller {
        Caller {
            identity: identity.into(),
            groups: vec![],
        }
    }

    async fn allowed(
        p: &Policy,
        identity: &str,
        target: &Target,
    ) -> Result<Vec<SocketAddr>, ConnectError> {
        p.addresses(&caller(identity), target)
            .await
            .map_err(|r| r.class)
    }

    async fn why(p: &Policy, identity: &str, target: &str) -> String {
        match p.addresses(&caller(identity), &t(target)).await {
            Ok(addrs) => panic!("{target} was allowed: {addrs:?}"),
            Err(refusal) => refusal.why,
        }
    }

    #[tokio::test]
    async fn a_denial_says_why() {
        let p = policy(
            "[[allow]]\nidentity = \"alice\"\nto = [\"*.site-b.internal\", \"10.0.0.0/8:22\", \"pg\"]\n[service.pg]\ntarget = \"127.0.0.1:5432\"\n[service.other]\ntarget = \"127.0.0.1:1\"\n[hosts]\n\"files.site-b.internal\" = [\"127.0.0.2\"]\n\"two.site-b.internal\" = [\"169.254.169.254\"]\n\"mixed.example.org\" = [\"127.0.0.3\", \"192.0.2.5\"]\n\"ssh.example.org\" = [\"192.0.2.9\"]\n",
        );
        assert_eq!(
            why(&p, "alice", "files.site-b.internal:80").await,
            "files.site-b.internal resolved to 127.0.0.2, a guarded loopback address: allow it with an address rule, e.g. \"127.0.0.2:80\""
        );
        assert_eq!(
            why(&p, "alice", "two.site-b.internal:80").await,
            "two.site-b.internal resolved to 169.254.169.254, a guarded cloud metadata address: allow it with an address rule, e.g. \"169.254.169.254:80\""
        );
        assert_eq!(
            why(&p, "alice", "ssh.example.org:22").await,
            "ssh.example.org resolved to 192.0.2.9, which no allow rule for alice matches"
        );
        assert_eq!(
            why(&p, "alice", "mixed.example.org:22").await,
            "mixed.example.org resolved to 127.0.0.3, a guarded loopback address, and 192.0.2.5, which no allow rule for alice matches: allow one with an address rule, e.g. \"127.0.0.3:22\""
        );
        assert_eq!(
            why(&p, "alice", "[::1]:22").await,
            "[::1]:22 is a guarded loopback address: allow it with an address rule, e.g. \"[::1]:22\""
        );
        assert_eq!(
            why(&p, "alice", "192.0.2.1:22").await,
            "no allow rule for alice matches 192.0.2.1:22"
        );
        assert_eq!(
            why(&p, "alice", "db.example.org:5432").await,
            "no allow rule for alice matches db.example.org:5432 (not looked up)"
        );
        assert_eq!(
            why(&p, "alice", "other").await,
            "no allow rule for alice lists the service `other`"
        );
        assert_eq!(
            why(&p, "alice", "nope").await,
            "there is no service `nope` ([service.nope] in the gateway's config)"
        );
    }

    #[tokio::test]
    async fn default_deny_and_identity() {
        let p = policy("[[allow]]\nidentity = \"alice\"\nto = [\"10.20.0.0/16\"]\n");
        assert!(allowed(&p, "alice", &t("10.20.1.1:22")).await.is_ok());
        assert_eq!(
            allowed(&p, "bob", &t("10.20.1.1:22")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            allowed(&p, "alice", &t("10.21.1.1:22")).await,
            Err(ConnectError::Denied)
        );
    }

    #[tokio::test]
    async fn guarded_addresses_need_a_rule_that_names_them() {
        let p = policy("[[allow]]\nidentity = \"*\"\nto = [\"*\", \"127.0.0.1:6379\"]\n");
        assert_eq!(
            allowed(&p, "x", &t("169.254.169.254:80")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            allowed(&p, "x", &t("127.0.0.1:22")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            allowed(&p, "x", &t("localhost:22")).await,
            Err(ConnectError::Denied)
        );
        assert!(allowed(&p, "x", &t("127.0.0.1:6379")).await.is_ok());
        assert!(
            allowed(&p, "x", &t("[::ffff:127.0.0.1]:6379"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn static_hosts_resolve_before_dns_and_stay_guarded() {
        let p = policy(
            "[[allow]]\nidentity = \"*\"\nto = [\"*.site-b.internal\", \"127.0.0.2/32\"]\n[hosts]\n\"db.site-b.internal\" = [\"127.0.0.2\"]\n\"up.site-b.internal\" = [\"127.0.0.3\"]\n",
        );
        assert_eq!(
            allowed(&p, "x", &t("DB.site-b.internal:5432")).await,
            Ok(vec!["127.0.0.2:5432".parse().unwrap()])
        );
        // Loopback, and no rule names 127.0.0.3: refused despite the name rule.
        assert_eq!(
            allowed(&p, "x", &t("up.site-b.internal:80")).await,
            Err(ConnectError::Denied)
        );
    }

    #[tokio::test]
    async fn services() {
        let p = policy(
            "[[allow]]\nidentity = \"alice\"\nto = [\"pg\"]\n[service.pg]\ntarget = \"127.0.0.1:5432\"\n[service.other]\ntarget = \"127.0.0.1:1\"\n",
        );
        assert_eq!(
            allowed(&p, "alice", &t("pg")).await,
            Ok(vec!["127.0.0.1:5432".parse().unwrap()])
        );
        assert_eq!(
            allowed(&p, "alice", &t("other")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            allowed(&p, "alice", &t("nope")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            allowed(&p, "bob", &t("pg")).await,
            Err(ConnectError::Denied)
        );
    }

    #[tokio::test]
    async fn groups_come_from_the_caller_and_live_streams_are_rechecked() {
        let p = policy(
            "[[allow]]\nidentity = \"group:lab\"\nto = [\"10.20.0.0/16\", \"*.site-b.internal:80\"]\n",
        );
        let member = Caller {
            identity: "alice".into(),
            groups: vec!["lab".into()],
        };
        assert!(p.addresses(&member, &t("10.20.1.1:22")).await.is_ok());
        assert_eq!(
            allowed(&p, "alice", &t("10.20.1.1:22")).await,
            Err(ConnectError::Denied)
        );
        let addr: SocketAddr = "10.20.1.1:22".parse().unwrap();
        assert_eq!(p.still_allows(&member, &t("10.20.1.1:22"), addr), Ok(()));
        assert_eq!(
            p.still_allows(
                &member,
                &t("files.site-b.internal:80"),
                "192.0.2.7:80".parse().unwrap()
            ),
            Ok(())
        );
        let stricter = policy("[[allow]]\nidentity = \"group:lab\"\nto = [\"10.21.0.0/16\"]\n");
        assert!(
            stricter
                .still_allows(&member, &t("10.20.1.1:22"), addr)
                .is_err()
        );
    }
}
