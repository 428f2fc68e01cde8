//! `libtunnel_preload.so`: carries an unmodified program's routed connections to the
//! local agent.
//!
//! # Layout
//!
//! ```text
//!  program: connect(fd, D) ──▶ hooks::connect (extern "C", the only unsafe edge)
//!                                 │ guard: re-entrant call? → real connect
//!                                 │ state: no TUNNEL_ROUTES? → real connect
//!                                 ▼
//!                           redirect::decide(D) ── Passthrough ─▶ real connect, errno kept
//!                                 │ Redirect(target, via)
//!                                 ▼
//!          agent_client: REGISTER source → target   (Unix socket, opened per call)
//!          sys: real connect(fd, agent's loopback listener) with the program's flags
//!          blocking: wait for the gateway's VERDICT → 0 or the real errno
//!          non-blocking: EINPROGRESS; getsockopt(SO_ERROR) or connect again asks the
//!          agent for the VERDICT (checked routes; optimistic ones never wait)
//!
//!  sendto / sendmsg / sendmmsg with MSG_FASTOPEN (a connect inside the send):
//!  a routed destination is connected as above first, then the data sent on it.
//!
//!  getaddrinfo / gethostbyname* / getnameinfo ──▶ names: routed names get synthetic
//!  addresses from the agent; getpeername on a redirected socket shows D.
//! ```
//!
//! No threads and no long-lived file descriptors: programs close fds they do not own
//! and fork without exec. A panic never crosses into C and never sends routed traffic
//! direct: it becomes `ECONNREFUSED`. With no `TUNNEL_ROUTES` in the environment the
//! library changes nothing.
#![deny(clippy::undocumented_unsafe_blocks)]

mod agent_client;
#[allow(unsafe_code)] // reads the one pointer connect checks
mod fast_routes;
mod guard;
#[allow(unsafe_code)] // the exported symbols: raw arguments in, C results out
mod hooks;
mod ip_routes;
mod names;
mod redirect;
mod state;
#[allow(unsafe_code)] // libc calls, real symbols, C socket addresses, errno
mod sys;
