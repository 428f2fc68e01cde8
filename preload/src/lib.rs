//! `libtunnel_preload.so`: the hooks that carry an unmodified program's routed
//! connections to the local agent.
//!
//! Not built yet: this crate compiles to the library's final name and path so that
//! packaging and `tunnel-run` can be laid out around it. With no hooks it changes
//! nothing in the programs it is loaded into, which is also what it must do when
//! `TUNNEL_ROUTES` is absent.
