//! Name lookups for routed names: the agent hands out a synthetic address, the same for
//! every process of the job; the name itself travels to the gateway at connect time.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libc::c_int;
use parking_lot::Mutex;
use tunnel_proto::ConnectError;
use tunnel_proto::local::{Refusal, Reply, Request};
use tunnel_proto::routes::TableRoute;
use tunnel_proto::target::is_valid_name;

use crate::agent_client::{AgentError, ask};
use crate::detour::{Bypass, Detour, catching};
use crate::netdb::{HOST_NOT_FOUND, NO_RECOVERY, TRY_AGAIN};
use crate::state::{State, state};

/// The addresses the agent handed out for a routed name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Synthetic {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// Why a routed name got no address, in the terms both resolver interfaces report.
/// Routed names never fall back to a real lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFailure {
    /// The agent did not answer; it may later (`TRY_AGAIN`, `EAI_AGAIN`).
    TryAgain,
    /// Not a host name at all (`HOST_NOT_FOUND`, `EAI_NONAME`).
    NotFound,
    /// An answer that asking again will not change: the synthetic pools are full, the
    /// agent refuses this user, the environment is unusable (`NO_RECOVERY`, `EAI_FAIL`).
    NoRecovery,
}

impl LookupFailure {
    /// The code `getaddrinfo` returns.
    pub fn eai_code(self) -> c_int {
        match self {
            LookupFailure::TryAgain => libc::EAI_AGAIN,
            LookupFailure::NotFound => libc::EAI_NONAME,
            LookupFailure::NoRecovery => libc::EAI_FAIL,
        }
    }

    /// The `h_errno` of the gethostbyname family.
    pub fn h_errno(self) -> c_int {
        match self {
            LookupFailure::TryAgain => TRY_AGAIN,
            LookupFailure::NotFound => HOST_NOT_FOUND,
            LookupFailure::NoRecovery => NO_RECOVERY,
        }
    }

    /// What glibc's `gethostbyname*_r` return: 0 for a name that does not exist,
    /// EAGAIN for a temporary failure, ENOENT otherwise.
    pub fn reentrant_code(self) -> c_int {
        match self {
            LookupFailure::NotFound => 0,
            LookupFailure::TryAgain => libc::EAGAIN,
            LookupFailure::NoRecovery => libc::ENOENT,
        }
    }
}

/// Synthetic addresses this process looked up, with their names, so a connect to one
/// can pick its route by name (routes from `tunnel-run --route` included). Bounded:
/// cleared when full, after which the agent's own routes decide.
static LOOKED_UP: Mutex<BTreeMap<IpAddr, String>> = Mutex::new(BTreeMap::new());
const LOOKED_UP_MAX: usize = 4096;

fn remember(v4: Ipv4Addr, v6: Ipv6Addr, name: &str) {
    let mut map = LOOKED_UP.lock();
    if map.len() >= LOOKED_UP_MAX {
        map.clear();
    }
    map.insert(v4.into(), name.to_string());
    map.insert(v6.into(), name.to_string());
}

/// The route for a connect to a synthetic address, if this process looked it up.
pub fn route_for_synthetic(state: &State, ip: IpAddr, port: u16) -> Option<&TableRoute> {
    let name = LOOKED_UP.lock().get(&ip.to_canonical()).cloned()?;
    state.routes.route_name(&name, port)
}

/// `getaddrinfo` for `name`: the synthetic addresses of a routed name.
pub fn addresses_of(name: &CStr, flags: c_int) -> Detour<Synthetic, LookupFailure> {
    let Some(state) = state() else {
        return Detour::Bypass(Bypass::NoRoutes);
    };
    // AI_NUMERICHOST: only an address literal may answer, so the real function decides
    // (a name fails with EAI_NONAME there, routed or not).
    if flags & libc::AI_NUMERICHOST != 0 {
        return Detour::Bypass(Bypass::NumericOnly);
    }
    let Ok(name) = name.to_str() else {
        return Detour::Bypass(Bypass::Unusable);
    };
    catching(
        || lookup(state, name),
        Detour::Failed(LookupFailure::NoRecovery),
    )
}

/// The gethostbyname family for `name`: the synthetic address of `family` of a
/// routed name.
pub fn host_address(name: &CStr, family: c_int) -> Detour<IpAddr, LookupFailure> {
    let Some(state) = state() else {
        return Detour::Bypass(Bypass::NoRoutes);
    };
    if !(family == libc::AF_INET || family == libc::AF_INET6) {
        return Detour::Bypass(Bypass::NotInternet);
    }
    let Ok(text) = name.to_str() else {
        return Detour::Bypass(Bypass::Unusable);
    };
    catching(
        || lookup(state, text),
        Detour::Failed(LookupFailure::NoRecovery),
    )
    .map(|synthetic| match family {
        libc::AF_INET => IpAddr::V4(synthetic.v4),
        _ => IpAddr::V6(synthetic.v6),
    })
}

/// Asks the agent for a routed name's synthetic addresses.
fn lookup(state: &State, name: &str) -> Detour<Synthetic, LookupFailure> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.parse::<IpAddr>().is_ok() || name.is_empty() {
        return Detour::Bypass(Bypass::AddressLiteral);
    }
    if state.broken.is_some() {
        return Detour::Failed(LookupFailure::NoRecovery);
    }
    if !state.routes.may_route_name(name) {
        return Detour::Bypass(Bypass::NotRouted);
    }
    if !is_valid_name(name) {
        return Detour::Failed(LookupFailure::NotFound);
    }
    let answer = ask(
        &state.agent,
        &Request::Resolve {
            name: name.to_ascii_lowercase(),
        },
    );
    match answer {
        Ok(Reply::Addrs {
            v4: IpAddr::V4(v4),
            v6: IpAddr::V6(v6),
        }) => {
            state.trace(format_args!("{name} is {v4} / {v6} (synthetic)"));
            remember(v4, v6, name);
            Detour::Handled(Synthetic { v4, v6 })
        }
        Ok(Reply::Err { refusal, message }) => {
            // The agent answered, and said why (a full synthetic pool, …).
            state.trace(format_args!(
                "{name}: the agent refused ({refusal}): {message}: lookup fails"
            ));
            Detour::Failed(match refusal {
                Refusal::Connect(ConnectError::BadRequest) => LookupFailure::NotFound,
                Refusal::PoolFull | Refusal::Forbidden | Refusal::Unsupported => {
                    LookupFailure::NoRecovery
                }
                _ => LookupFailure::TryAgain,
            })
        }
        Ok(other) => {
            state.trace(format_args!(
                "{name}: the agent answered {other:?} to a lookup: lookup fails"
            ));
            Detour::Failed(LookupFailure::NoRecovery)
        }
        Err(AgentError::Garbled) => {
            state.trace(format_args!(
                "{name}: the agent's answer could not be read: lookup fails"
            ));
            Detour::Failed(LookupFailure::NoRecovery)
        }
        Err(e @ AgentError::Unreachable(_)) => {
            state.trace(format_args!(
                "{name}: no answer from the agent ({e:?}): lookup fails"
            ));
            Detour::Failed(LookupFailure::TryAgain)
        }
    }
}

/// `getnameinfo`: the name behind a synthetic address. Anything else, and a
/// synthetic address the agent does not name, is the real function's.
pub fn name_of(address: Option<SocketAddr>, flags: c_int) -> Detour<String, Infallible> {
    let Some(state) = state() else {
        return Detour::Bypass(Bypass::NoRoutes);
    };
    if flags & libc::NI_NUMERICHOST != 0 {
        return Detour::Bypass(Bypass::NumericOnly);
    }
    let Some(address) = address else {
        return Detour::Bypass(Bypass::NotInternet);
    };
    if !state.is_synthetic(address.ip()) {
        return Detour::Bypass(Bypass::NotSynthetic);
    }
    let asked = || match ask(&state.agent, &Request::Name { ip: address.ip() }) {
        Ok(Reply::Name { name }) => Detour::Handled(name),
        _ => Detour::Bypass(Bypass::NotSynthetic),
    };
    catching(asked, Detour::Bypass(Bypass::Panicked))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tunnel_proto::routes::RouteTable;

    use super::*;
    use crate::ip_routes::IpRoutes;

    /// A state whose agent is not there: no name gets an address from it.
    fn state(routes: &str, broken: Option<&str>) -> State {
        let routes = RouteTable::parse(routes).unwrap();
        State {
            ip_routes: IpRoutes::compile(&[], &routes),
            routes,
            agent: PathBuf::from("/nonexistent/agent.sock"),
            synthetic: Vec::new(),
            callbacks: Vec::new(),
            debug: false,
            broken: broken.map(str::to_string),
        }
    }

    #[test]
    fn what_a_lookup_decides_before_asking_the_agent() {
        let state = state("b=*.site-b.internal", None);
        for address in ["10.1.2.3", "10.1.2.3.", "fd00::1", ""] {
            assert_eq!(
                lookup(&state, address),
                Detour::Bypass(Bypass::AddressLiteral),
                "{address:?}"
            );
        }
        assert_eq!(
            lookup(&state, "example.org"),
            Detour::Bypass(Bypass::NotRouted)
        );
        assert_eq!(
            lookup(&state, "bad!name.site-b.internal"),
            Detour::Failed(LookupFailure::NotFound)
        );
        // Routed, and no agent answers: fail, never a real lookup.
        assert_eq!(
            lookup(&state, "db.site-b.internal."),
            Detour::Failed(LookupFailure::TryAgain)
        );
    }

    #[test]
    fn an_unreadable_environment_fails_every_name_but_addresses() {
        let state = state("", Some("TUNNEL_ROUTES: bad"));
        assert_eq!(
            lookup(&state, "example.org"),
            Detour::Failed(LookupFailure::NoRecovery)
        );
        assert_eq!(
            lookup(&state, "10.1.2.3"),
            Detour::Bypass(Bypass::AddressLiteral)
        );
    }

    #[test]
    fn each_resolver_interface_reports_a_failure_its_own_way() {
        let codes = |f: LookupFailure| (f.eai_code(), f.h_errno(), f.reentrant_code());
        assert_eq!(
            codes(LookupFailure::TryAgain),
            (libc::EAI_AGAIN, TRY_AGAIN, libc::EAGAIN)
        );
        assert_eq!(
            codes(LookupFailure::NotFound),
            (libc::EAI_NONAME, HOST_NOT_FOUND, 0)
        );
        assert_eq!(
            codes(LookupFailure::NoRecovery),
            (libc::EAI_FAIL, NO_RECOVERY, libc::ENOENT)
        );
    }
}
