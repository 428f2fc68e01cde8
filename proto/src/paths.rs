//! Where things are by default: the agent's config and socket, and the preload library
//! beside the binaries. Pure functions over what the caller read from the environment,
//! so the agent, `tunnel-run` and `tunnel-agent env` agree.

use std::path::{Path, PathBuf};

/// The preload library's file name.
pub const PRELOAD_LIBRARY: &str = "libtunnel_preload.so";

/// The agent config: `--config`, else `$TUNNEL_CONFIG`, else
/// `$XDG_CONFIG_HOME/tunnel/agent.toml` (`~/.config/tunnel/agent.toml`).
pub fn agent_config(
    explicit: Option<PathBuf>,
    tunnel_config: Option<PathBuf>,
    xdg_config_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> PathBuf {
    explicit.or(tunnel_config).unwrap_or_else(|| {
        xdg_config_home
            .or_else(|| home.map(|h| h.join(".config")))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("tunnel/agent.toml")
    })
}

/// The agent's Unix socket: the config's `control`, else
/// `$XDG_RUNTIME_DIR/tunnel/agent.sock`, else `/tmp/tunnel-<uid>/agent.sock`.
pub fn agent_socket(control: Option<&Path>, xdg_runtime_dir: Option<PathBuf>, uid: u32) -> PathBuf {
    control.map(Path::to_path_buf).unwrap_or_else(|| {
        xdg_runtime_dir
            .map(|d| d.join("tunnel"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/tunnel-{uid}")))
            .join("agent.sock")
    })
}

/// Where the preload library may be, for binaries in `bin_dir`, in this order: beside
/// them (a build tree), in `../lib/tunnel` (the Debian package: a private directory, as
/// it is no shared library to link against), or in `../lib` (an install under a prefix).
pub fn preload_candidates(bin_dir: &Path) -> [PathBuf; 3] {
    [
        bin_dir.join(PRELOAD_LIBRARY),
        bin_dir.join("../lib/tunnel").join(PRELOAD_LIBRARY),
        bin_dir.join("../lib").join(PRELOAD_LIBRARY),
    ]
}

/// Quotes `value` for a POSIX shell.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The value of `TUNNEL_SYNTHETIC` for an agent config: its synthetic blocks as
/// patterns.
pub fn synthetic_env(config: &crate::config::AgentConfig) -> String {
    format!("{},[{}]", config.synthetic_ipv4, config.synthetic_ipv6)
}
