//! Synthetic addresses for routed names, so that a name only the far site can resolve
//! still gets an address here.
//!
//! The preload asks for a name that a route selects; the agent hands out the next free
//! address of each pool (IPv4 and IPv6) and remembers the pair, so every process of a
//! job sees the same mapping. A connect to a synthetic address carries the *name* to the
//! gateway, which resolves it at its own site.
//!
//! A full pool is an error the user sees: in the agent's log (the first refusal, then
//! a count at most every [`LOG_EVERY`]), in `status`, and in the answer to the preload,
//! which prints it under `TUNNEL_DEBUG`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;
use tracing::error;

/// Refusals for a full pool are logged at most this often (with a count).
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct FakeDns {
    v4: Ipv4Net,
    v6: Ipv6Net,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<String, u32>,
    names: Vec<String>,
    /// Names refused because the pool was full, in all.
    refused: u64,
    /// The last name refused.
    last_refused: Option<String>,
    /// When a refusal was last logged, and how many came since.
    logged: Option<Instant>,
    unlogged: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the synthetic address pool is full: all {capacity} addresses of synthetic_ipv4 = \"{block}\" are handed out, so `{name}` gets none; widen synthetic_ipv4 in agent.toml (a /16 holds 65534 names) and restart the agent"
)]
pub struct PoolFull {
    pub name: String,
    pub capacity: u64,
    pub block: Ipv4Net,
}

/// The synthetic names part of `tunnel-agent status`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FakeDnsView {
    pub used: usize,
    pub capacity: u64,
    /// Names refused because the pool was full.
    pub refused: u64,
    /// What is wrong, once a name has been refused.
    pub problem: Option<String>,
}

impl FakeDns {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> FakeDns {
        FakeDns {
            v4,
            v6,
            table: Mutex::default(),
        }
    }

    pub fn view(&self) -> FakeDnsView {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        FakeDnsView {
            used: table.names.len(),
            capacity: self.capacity(),
            refused: table.refused,
            problem: table
                .last_refused
                .as_ref()
                .map(|name| self.full(name).to_string()),
        }
    }

    fn full(&self, name: &str) -> PoolFull {
        PoolFull {
            name: name.to_string(),
            capacity: self.capacity(),
            block: self.v4,
        }
    }

    /// How many names fit: the IPv4 pool without its first and last address.
    fn capacity(&self) -> u64 {
        (1u64 << (32 - self.v4.prefix_len())).saturating_sub(2)
    }

    fn addresses(&self, index: u32) -> (Ipv4Addr, Ipv6Addr) {
        let offset = index + 1;
        let v4 = Ipv4Addr::from(u32::from(self.v4.network()).wrapping_add(offset));
        let v6 = Ipv6Addr::from(u128::from(self.v6.network()).wrapping_add(u128::from(offset)));
        (v4, v6)
    }

    /// The synthetic pair for `name`, made on first use.
    pub fn resolve(&self, name: &str) -> Result<(Ipv4Addr, Ipv6Addr), PoolFull> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(index) = table.by_name.get(name) {
            return Ok(self.addresses(*index));
        }
        let index = table.names.len();
        if index as u64 >= self.capacity() {
            let full = self.full(name);
            table.refused += 1;
            table.last_refused = Some(name.to_string());
            table.unlogged += 1;
            if table.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                let more = table.unlogged - 1;
                if more == 0 {
                    error!("{full}");
                } else {
                    error!("{full} ({more} more names refused since the last report)");
                }
                table.logged = Some(Instant::now());
                table.unlogged = 0;
            }
            return Err(full);
        }
        let index = index as u32;
        table.names.push(name.to_string());
        table.by_name.insert(name.to_string(), index);
        Ok(self.addresses(index))
    }

    /// True when `ip` lies in one of the pools (whether or not handed out).
    pub fn is_synthetic(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.contains(&v4),
            IpAddr::V6(v6) => self.v6.contains(&v6),
        }
    }

    /// The name a synthetic address stands for.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        let offset = match ip.to_canonical() {
            IpAddr::V4(v4) if self.v4.contains(&v4) => {
                u64::from(u32::from(v4).wrapping_sub(u32::from(self.v4.network())))
            }
            IpAddr::V6(v6) if self.v6.contains(&v6) => {
                u64::try_from(u128::from(v6).wrapping_sub(u128::from(self.v6.network()))).ok()?
            }
            _ => return None,
        };
        let index = usize::try_from(offset.checked_sub(1)?).ok()?;
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.names.get(index).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_pair_and_back() {
        let dns = FakeDns::new(
            "198.18.0.0/30".parse().unwrap(),
            "fd7e::/64".parse().unwrap(),
        );
        let (a4, a6) = dns.resolve("db.site-b.internal").unwrap();
        assert_eq!(a4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(dns.resolve("db.site-b.internal").ok(), Some((a4, a6)));
        assert_eq!(
            dns.name_of(IpAddr::V4(a4)).as_deref(),
            Some("db.site-b.internal")
        );
        assert_eq!(
            dns.name_of(IpAddr::V6(a6)).as_deref(),
            Some("db.site-b.internal")
        );
        assert!(dns.resolve("other").is_ok());
        let full = dns.resolve("third").expect_err("a /30 holds two names");
        assert_eq!(
            full.to_string(),
            "the synthetic address pool is full: all 2 addresses of synthetic_ipv4 = \"198.18.0.0/30\" are handed out, so `third` gets none; widen synthetic_ipv4 in agent.toml (a /16 holds 65534 names) and restart the agent"
        );
        let view = dns.view();
        assert_eq!((view.used, view.capacity, view.refused), (2, 2, 1));
        assert_eq!(view.problem, Some(full.to_string()));
        assert_eq!(dns.name_of("198.18.0.3".parse().unwrap()), None);
        assert!(!dns.is_synthetic("10.0.0.1".parse().unwrap()));
    }
}
