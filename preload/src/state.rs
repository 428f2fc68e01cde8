//! What the environment says, read once, when the library is loaded.
//!
//! - `TUNNEL_ROUTES`: which destinations go through which gateway (absent: the library
//!   changes nothing).
//! - `TUNNEL_AGENT`: the agent's Unix socket.
//! - `TUNNEL_SYNTHETIC`: the agent's synthetic address blocks (default 198.18.0.0/15
//!   and fd7e:7e7e:7e7e::/64).
//! - `TUNNEL_CALLBACKS`: the `[[callback]]` port ranges (a listener there lives at the
//!   gateway; see `callback.rs`).
//! - `TUNNEL_DEBUG`: when set, each decision is written to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use tunnel_proto::Pattern;
use tunnel_proto::config::agent::{DEFAULT_SYNTHETIC_IPV4, DEFAULT_SYNTHETIC_IPV6};
use tunnel_proto::routes::{RouteTable, TableRoute};

use crate::ip_routes::IpRoutes;

pub struct State {
    pub routes: RouteTable,
    /// `routes` and `synthetic` compiled for connect's per-call question.
    pub ip_routes: IpRoutes,
    pub agent: PathBuf,
    pub synthetic: Vec<Pattern>,
    /// Ports whose listeners live at the gateway; empty: binds are never looked at.
    pub callbacks: Vec<tunnel_proto::callback::PortRange>,
    pub debug: bool,
    /// Set when the environment could not be read: every Internet connect is then
    /// refused, because nothing can tell which of them had to be routed.
    pub broken: Option<String>,
}

static STATE: OnceLock<Option<State>> = OnceLock::new();

/// The parsed environment, or `None` for a pure pass-through: one atomic load once
/// [`load`] has run.
#[inline(always)]
pub fn state() -> Option<&'static State> {
    match STATE.get() {
        Some(state) => state.as_ref(),
        None => first_state(),
    }
}

/// The state once it has been read, without reading it: `None` before the first call.
#[inline(always)]
pub fn state_if_read() -> Option<&'static Option<State>> {
    STATE.get()
}

/// Reads the environment when the library is loaded: before the program's `main`, so
/// before any thread of its own. Read lazily instead, a fork from another thread while
/// a first hooked call was reading it would leave the child waiting for ever on a read
/// that no thread of the child finishes. (The real functions are still found at their
/// first call: glibc's fork resets the dynamic loader's lock in the child, and finding
/// all ten here would cost every process more than reading the routes does.)
///
/// A hooked call made before this runs (from another library's constructor) reads the
/// state itself, through [`first_state`]; that is the only lazy read left.
#[ctor::ctor(unsafe)]
fn load() {
    // A panic must not unwind into the dynamic loader; the state is then read at the
    // first hooked call, as a last resort.
    let _ = std::panic::catch_unwind(first_state);
}

/// Reads the state unless it is read already; keeps the program's errno as it was.
#[cold]
#[inline(never)]
pub fn first_state() -> Option<&'static State> {
    let saved = crate::sys::errno();
    let state = STATE.get_or_init(read).as_ref();
    if let Some(state) = state {
        crate::fast_routes::publish(&state.ip_routes);
    }
    crate::sys::set_errno(saved);
    state
}

fn read() -> Option<State> {
    let routes = std::env::var("TUNNEL_ROUTES").ok()?;
    let debug = std::env::var_os("TUNNEL_DEBUG").is_some_and(|v| !v.is_empty() && v != "0");
    crate::agent_client::trust_agent_uid(
        std::env::var("TUNNEL_AGENT_UID")
            .ok()
            .and_then(|uid| uid.trim().parse().ok()),
    );
    let mut broken = None;
    let routes = RouteTable::parse(&routes).unwrap_or_else(|e| {
        broken = Some(e.to_string());
        RouteTable::default()
    });
    let agent = match std::env::var_os("TUNNEL_AGENT") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            broken.get_or_insert_with(|| {
                "TUNNEL_ROUTES is set but TUNNEL_AGENT (the agent's socket) is not".into()
            });
            PathBuf::new()
        }
    };
    let synthetic_text = std::env::var("TUNNEL_SYNTHETIC")
        .unwrap_or_else(|_| format!("{DEFAULT_SYNTHETIC_IPV4},[{DEFAULT_SYNTHETIC_IPV6}]"));
    let synthetic = synthetic_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Pattern::parse)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| {
            broken.get_or_insert_with(|| format!("TUNNEL_SYNTHETIC: {e}"));
            Vec::new()
        });
    let callbacks = std::env::var("TUNNEL_CALLBACKS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(tunnel_proto::callback::PortRange::parse)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| {
            // Binds then go where they always went: nothing is carried that should not be.
            let _ = writeln!(
                std::io::stderr(),
                "libtunnel_preload: TUNNEL_CALLBACKS: {e}; callbacks are off"
            );
            Vec::new()
        });
    if let Some(problem) = &broken {
        // Not eprintln: it panics when stderr is a closed pipe.
        let _ = writeln!(
            std::io::stderr(),
            "libtunnel_preload: {problem}; Internet connections of this program are refused"
        );
    }
    Some(State {
        ip_routes: if broken.is_some() {
            IpRoutes::refuse_all()
        } else {
            IpRoutes::compile(&synthetic, &routes)
        },
        routes,
        agent,
        synthetic,
        callbacks,
        debug,
        broken,
    })
}

impl State {
    pub fn is_synthetic(&self, ip: std::net::IpAddr) -> bool {
        self.synthetic.iter().any(|p| p.matches_ip(ip, 1))
    }

    /// The route for an index from [`IpRoutes`].
    pub fn route(&self, index: usize) -> Option<&TableRoute> {
        self.routes.route(index)
    }

    pub fn trace(&self, message: std::fmt::Arguments<'_>) {
        if self.debug {
            let _ = writeln!(
                std::io::stderr(),
                "libtunnel_preload[{}]: {message}",
                std::process::id()
            );
        }
    }
}
