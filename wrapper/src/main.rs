//! `tunnel-run [--config FILE] [--route PATTERN=GATEWAY]... -- CMD [ARGS...]`
//!
//! Interception is not built yet; until it is, this tool says so and points to the
//! `[[forward]]` ports of `tunnel-agent`, which carry any program today.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// Run a program so that the connections your routes select go through the tunnel.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Agent config file (default: $TUNNEL_CONFIG, else $XDG_CONFIG_HOME/tunnel/agent.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Extra route, PATTERN=GATEWAY.
    #[arg(long)]
    route: Vec<String>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "tunnel-run cannot intercept `{}` yet: transparent interception is not built. \
         Use a [[forward]] port in agent.toml and point the program at it.",
        args.command.first().map(String::as_str).unwrap_or_default()
    )
}
