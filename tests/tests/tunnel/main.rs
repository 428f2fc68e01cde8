//! End-to-end tests: real gateway and agent binaries, real TLS, real clients, loopback.

mod errors;
mod forward;
mod hostile;
mod namespaces;
mod preload;
mod resilience;
mod transfer;
mod wrapper;
