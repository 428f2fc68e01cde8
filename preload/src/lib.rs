//! `libtunnel_preload.so`: carries an unmodified program's routed connections to the
//! local agent.
//!
//! # Layout
//!
//! ```text
//!  program: connect(fd, D) ──▶ hooks/connect.rs (extern "C": raw arguments in, C out)
//!                                 │ fast_routes: no TUNNEL_ROUTES? → real connect
//!                                 │ sys::peek: D's family, address and port
//!                                 ▼
//!          redirect::connect(D) ── Bypass(not routed) ─▶ real connect, errno kept
//!                                 │ a route (ip_routes, compiled from the RouteTable)
//!                                 ▼
//!          agent_client: REGISTER source → target   (Unix socket, opened per call)
//!          sys: real connect(fd, agent's loopback listener) with the program's flags
//!          blocking: wait for the gateway's VERDICT → 0 or the real errno
//!          non-blocking: EINPROGRESS; getsockopt(SO_ERROR) or connect again asks the
//!          agent for the VERDICT (checked routes; optimistic ones never wait)
//!
//!  sendto / sendmsg / sendmmsg with MSG_FASTOPEN (hooks/connect.rs): a connect
//!  inside the send; a routed destination is connected as above first.
//!  getpeername / getsockopt(SO_ERROR) (hooks/socket_state.rs): redirect answers for
//!  the sockets it redirected (the original destination, the far side's answer).
//!  bind / accept / accept4 / getsockname (hooks/listen.rs): callback answers for
//!  listeners that live at the gateway (a `[[callback]]` port: the far peer, the
//!  public address); redirect shows a redirected socket's own address as the
//!  gateway's callback address.
//!  getaddrinfo / gethostbyname* / getnameinfo (hooks/names.rs): names asks the agent
//!  for a routed name's synthetic addresses; netdb builds the addrinfo list or the
//!  hostent the program gets.
//! ```
//!
//! Every hook converts its raw arguments into Rust values and asks one safe function,
//! which answers with one type for all of them, `detour::Detour`: `Handled` (the
//! hook returns the value), `Bypass(reason)` (the real function runs, as if the library
//! were not there), `Failed` (an errno, or the resolver's own code). `unsafe` is
//! allowed only at the C edge: `hooks`, `sys` (libc calls, socket addresses, errno),
//! `netdb` (the C structures) and `fast_routes` (the pointer connect reads); `state`,
//! `redirect`, `callback`, `names`, `ip_routes`, `agent_client`, `guard` and `detour` are safe code.
//!
//! No threads and no long-lived file descriptors: programs close fds they do not own
//! and fork without exec. A panic never crosses into C and never sends routed traffic
//! direct: it becomes `ECONNREFUSED`. With no `TUNNEL_ROUTES` in the environment the
//! library changes nothing.
#![deny(clippy::undocumented_unsafe_blocks)]

mod agent_client;
mod callback;
mod detour;
#[allow(unsafe_code)] // reads the one pointer connect checks
mod fast_routes;
mod guard;
#[allow(unsafe_code)] // the exported symbols: raw arguments in, C results out
mod hooks;
mod ip_routes;
mod names;
#[allow(unsafe_code)] // addrinfo lists and hostent entries for the program
mod netdb;
mod redirect;
mod state;
#[allow(unsafe_code)] // libc calls, real symbols, C socket addresses, errno
mod sys;
