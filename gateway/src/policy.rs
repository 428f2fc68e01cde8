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
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tunnel_proto::config::{AllowRule, AllowTo, GatewayConfig, Service};
use tunnel_proto::{ConnectError, Host, Pattern, Target};

#[derive(Debug)]
pub struct Policy {
    rules: Vec<AllowRule>,
    services: BTreeMap<String, Service>,
    hosts: BTreeMap<String, Vec<IpAddr>>,
    resolve_timeout: Duration,
}

/// Addresses refused unless a rule names them by address.
pub fn is_guarded(ip: IpAddr) -> bool {
    // fd00:ec2::254: the IPv6 metadata address of one large cloud.
    const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6 == METADATA_V6
        }
    }
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

    fn patterns<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a Pattern> + 'a {
        self.rules_for(identity).flat_map(|r| {
            r.to.iter().filter_map(|t| match t {
                AllowTo::Pattern(p) => Some(p),
                AllowTo::Service(_) => None,
            })
        })
    }

    fn rules_for<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a AllowRule> + 'a {
        self.rules
            .iter()
            .filter(move |r| r.identity == "*" || r.identity == identity)
    }

    /// Decides whether `identity` may reach `target`, and if so, where to connect.
    pub async fn addresses(
        &self,
        identity: &str,
        target: &Target,
    ) -> Result<Vec<SocketAddr>, ConnectError> {
        match target {
            Target::Service(name) => {
                let allowed = self.rules_for(identity).any(|r| {
                    r.to.iter()
                        .any(|t| matches!(t, AllowTo::Service(s) if s == name))
                });
                let service = self.services.get(name).filter(|_| allowed);
                let Some(Service {
                    target: Target::Addr { host, port },
                }) = service
                else {
                    return Err(ConnectError::Denied);
                };
                self.lookup(host, *port).await
            }
            Target::Addr {
                host: Host::Ip(ip),
                port,
            } => {
                let addr = SocketAddr::new(*ip, *port);
                self.admits(identity, addr, false)
                    .then(|| vec![addr])
                    .ok_or(ConnectError::Denied)
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
                    return Err(ConnectError::Denied);
                }
                let resolved = self.lookup(host, *port).await?;
                let allowed: Vec<SocketAddr> = resolved
                    .into_iter()
                    .filter(|addr| self.admits(identity, *addr, by_name))
                    .collect();
                if allowed.is_empty() {
                    Err(ConnectError::Denied)
                } else {
                    Ok(allowed)
                }
            }
        }
    }

    /// True when `identity` may connect to `addr`: matched by a rule (or already by
    /// name, when `matched` is true), and named by address if it is a guarded address.
    fn admits(&self, identity: &str, addr: SocketAddr, matched_by_name: bool) -> bool {
        let (ip, port) = (addr.ip(), addr.port());
        let mut patterns = self.patterns(identity).filter(|p| p.ports.contains(port));
        if is_guarded(ip) {
            return patterns.any(|p| p.names_ip(ip));
        }
        matched_by_name || patterns.any(|p| p.matches_ip(ip, port))
    }

    async fn lookup(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
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
                    Err(_) => Err(ConnectError::TimedOut),
                    Ok(Err(_)) => Err(ConnectError::NameNotFound),
                    Ok(Ok(addrs)) => {
                        let addrs: Vec<SocketAddr> = addrs.collect();
                        if addrs.is_empty() {
                            Err(ConnectError::NameNotFound)
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
        Policy::new(
            &GatewayConfig::parse(&text, Path::new("gateway.toml"))
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn default_deny_and_identity() {
        let p = policy("[[allow]]\nidentity = \"alice\"\nto = [\"10.20.0.0/16\"]\n");
        assert!(p.addresses("alice", &t("10.20.1.1:22")).await.is_ok());
        assert_eq!(
            p.addresses("bob", &t("10.20.1.1:22")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            p.addresses("alice", &t("10.21.1.1:22")).await,
            Err(ConnectError::Denied)
        );
    }

    #[tokio::test]
    async fn guarded_addresses_need_a_rule_that_names_them() {
        let p = policy("[[allow]]\nidentity = \"*\"\nto = [\"*\", \"127.0.0.1:6379\"]\n");
        assert_eq!(
            p.addresses("x", &t("169.254.169.254:80")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            p.addresses("x", &t("127.0.0.1:22")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            p.addresses("x", &t("localhost:22")).await,
            Err(ConnectError::Denied)
        );
        assert!(p.addresses("x", &t("127.0.0.1:6379")).await.is_ok());
        assert!(
            p.addresses("x", &t("[::ffff:127.0.0.1]:6379"))
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
            p.addresses("x", &t("DB.site-b.internal:5432")).await,
            Ok(vec![
                "127.0.0.2:5432".parse().unwrap_or_else(|e| panic!("{e}"))
            ])
        );
        // Loopback, and no rule names 127.0.0.3: refused despite the name rule.
        assert_eq!(
            p.addresses("x", &t("up.site-b.internal:80")).await,
            Err(ConnectError::Denied)
        );
    }

    #[tokio::test]
    async fn services() {
        let p = policy(
            "[[allow]]\nidentity = \"alice\"\nto = [\"pg\"]\n[service.pg]\ntarget = \"127.0.0.1:5432\"\n[service.other]\ntarget = \"127.0.0.1:1\"\n",
        );
        assert_eq!(
            p.addresses("alice", &t("pg")).await,
            Ok(vec![
                "127.0.0.1:5432".parse().unwrap_or_else(|e| panic!("{e}"))
            ])
        );
        assert_eq!(
            p.addresses("alice", &t("other")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            p.addresses("alice", &t("nope")).await,
            Err(ConnectError::Denied)
        );
        assert_eq!(
            p.addresses("bob", &t("pg")).await,
            Err(ConnectError::Denied)
        );
    }
}
