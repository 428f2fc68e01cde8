//! End-to-end tests: real gateway and agent binaries, real TLS, real clients, loopback.

mod diagnostics;
mod errors;
mod forward;
mod namespaces;
mod preload;
mod resilience;
mod transfer;
mod wrapper;
