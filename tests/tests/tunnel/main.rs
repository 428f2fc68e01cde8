//! End-to-end tests: real gateway and agent binaries, real TLS, real clients, loopback.

mod agent_death;
mod callbacks;
mod connect_answers;
mod diagnostics;
mod discovery;
mod errors;
mod forward;
mod go_programs;
mod hostile;
mod identity;
mod inside_out;
mod inside_out_sites;
mod local_leg;
mod metrics;
mod namespaces;
mod package;
mod preload;
mod release;
mod resilience;
mod slurm;
mod supervisor;
mod transfer;
mod watch;
mod wrapper;
