//! Name lookups for routed names: the agent hands out a synthetic address, the same for
//! every process of the job; the name itself travels to the gateway at connect time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tunnel_proto::local::{Reply, Request};

use crate::agent_client::ask;
use crate::state::State;

pub enum Lookup {
    /// Not routed: the real resolver answers.
    Passthrough,
    Synthetic(Ipv4Addr, Ipv6Addr),
    /// Routed, but no answer could be had: fail, never fall back to a real lookup.
    Fail,
}

pub fn lookup(state: &State, name: &str) -> Lookup {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.parse::<IpAddr>().is_ok() || name.is_empty() {
        return Lookup::Passthrough;
    }
    if state.broken.is_some() {
        return Lookup::Fail;
    }
    if !state.routes.may_route_name(name) {
        return Lookup::Passthrough;
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
            Lookup::Synthetic(v4, v6)
        }
        Ok(Reply::Err { class, .. }) if class == "unrouted" => Lookup::Passthrough,
        _ => {
            state.trace(format_args!(
                "{name}: no answer from the agent: lookup fails"
            ));
            Lookup::Fail
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
