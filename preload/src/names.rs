//! Name lookups for routed names: the agent hands out a synthetic address, the same for
//! every process of the job; the name itself travels to the gateway at connect time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use parking_lot::Mutex;
use tunnel_proto::ConnectError;
use tunnel_proto::local::{Refusal, Reply, Request};
use tunnel_proto::routes::TableRoute;
use tunnel_proto::target::is_valid_name;

use crate::agent_client::{AgentError, ask};
use crate::state::State;

pub enum Lookup {
    /// Not routed: the real resolver answers.
    Passthrough,
    Synthetic(Ipv4Addr, Ipv6Addr),
    /// Routed, but no answer could be had: fail, never fall back to a real lookup.
    Fail(Failure),
}

/// Why a routed name got no address, in the terms both resolver interfaces report.
#[derive(Clone, Copy)]
pub enum Failure {
    /// The agent did not answer; it may later (`TRY_AGAIN`, `EAI_AGAIN`).
    TryAgain,
    /// Not a host name at all (`HOST_NOT_FOUND`, `EAI_NONAME`).
    NotFound,
    /// An answer that asking again will not change: the synthetic pools are full, the
    /// agent refuses this user, the environment is unusable (`NO_RECOVERY`, `EAI_FAIL`).
    NoRecovery,
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

pub fn lookup(state: &State, name: &str) -> Lookup {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.parse::<IpAddr>().is_ok() || name.is_empty() {
        return Lookup::Passthrough;
    }
    if state.broken.is_some() {
        return Lookup::Fail(Failure::NoRecovery);
    }
    if !state.routes.may_route_name(name) {
        return Lookup::Passthrough;
    }
    if !is_valid_name(name) {
        return Lookup::Fail(Failure::NotFound);
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
            Lookup::Synthetic(v4, v6)
        }
        Ok(Reply::Err { refusal, message }) => {
            // The agent answered, and said why (a full synthetic pool, …).
            state.trace(format_args!(
                "{name}: the agent refused ({refusal}): {message}: lookup fails"
            ));
            Lookup::Fail(match refusal {
                Refusal::Connect(ConnectError::BadRequest) => Failure::NotFound,
                Refusal::PoolFull | Refusal::Forbidden | Refusal::Unsupported => {
                    Failure::NoRecovery
                }
                _ => Failure::TryAgain,
            })
        }
        Ok(other) => {
            state.trace(format_args!(
                "{name}: the agent answered {other:?} to a lookup: lookup fails"
            ));
            Lookup::Fail(Failure::NoRecovery)
        }
        Err(AgentError::Garbled) => {
            state.trace(format_args!(
                "{name}: the agent's answer could not be read: lookup fails"
            ));
            Lookup::Fail(Failure::NoRecovery)
        }
        Err(e @ AgentError::Unreachable(_)) => {
            state.trace(format_args!(
                "{name}: no answer from the agent ({e:?}): lookup fails"
            ));
            Lookup::Fail(Failure::TryAgain)
        }
    }
}

/// The name behind a synthetic address, for getnameinfo.
pub fn name_of(state: &State, ip: IpAddr) -> Option<String> {
    if !state.is_synthetic(ip) {
        return None;
    }
    match ask(&state.agent, &Request::Name { ip }) {
        Ok(Reply::Name { name }) => Some(name),
        _ => None,
    }
}
