//! Sans-I/O pieces that every part of tunnel shares.
//!
//! # Layout
//!
//! ```text
//!  agent.toml ─┐                              ┌─ gateway.toml
//!   config::agent        target::Target        config::gateway
//!   (routes, forwards)   "host:port" | "svc"   (allow rules, services)
//!         │                    │                      │
//!         └── pattern::Pattern ┴── connect::Outcome ──┘
//!             (CIDR / glob + ports)  (CONNECT answer ↔ failure class ↔ errno)
//!                 │
//!         routes::RouteTable: the routes compiled once (TUNNEL_ROUTES ↔ text); the
//!         one place that says which route takes ip:port or name:port, for the
//!         agent and the preload alike
//! ```
//!
//! No async runtime, no I/O, no `unsafe`: every decoder here is a pure function over
//! a string or byte slice, returns a typed error on bad input, and never panics.
#![forbid(unsafe_code)]

pub mod callback;
pub mod config;
pub mod connect;
pub mod discovery;
pub mod dns;
pub mod duration;
pub mod enrolment;
pub mod local;
pub mod paths;
pub mod pattern;
pub mod proxy_protocol;
pub mod reverse;
pub mod routes;
pub mod sock_diag;
pub mod target;
pub mod token;

pub use connect::{ConnectError, Outcome};
pub use pattern::Pattern;
pub use target::{Host, Target};
