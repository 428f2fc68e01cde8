//! `tunnel-agent`: the near end of the tunnel. It keeps a pool of mutually
//! authenticated HTTP/2 connections to each gateway and carries local connections over
//! them as CONNECT streams.
//!
//! # Layout
//!
//! - `pool`: connections to one gateway (dial, PING, backoff, GOAWAY).
//! - `carry`: one local connection through the tunnel, from accept to close.
//! - `forward`: `[[forward]]` listeners.
//! - `status`: what `tunnel-agent status` shows.
#![forbid(unsafe_code)]

mod carry;
mod forward;
mod pool;
mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tunnel_proto::config::AgentConfig;
use tunnel_transport::streams::{Side, StreamTable};

use crate::forward::ForwardView;
use crate::pool::Pool;

/// The local end of a tunnel: carries your programs' connections to a gateway.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    Run {
        /// Config file [default: $TUNNEL_CONFIG, else $XDG_CONFIG_HOME/tunnel/agent.toml].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show a running agent's gateways, connections and streams.
    Status {
        /// Config file of the agent to ask (it names the control socket).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Everything the agent's tasks share.
pub struct Agent {
    pub config: AgentConfig,
    pub pools: Vec<Arc<Pool>>,
    pub streams: Arc<StreamTable>,
    pub forwards: Vec<ForwardView>,
    pub started: Instant,
}

impl Agent {
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.peer.name == name)
    }
}

fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("TUNNEL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
                .unwrap_or_else(|| PathBuf::from("."))
                .join("tunnel/agent.toml")
        })
}

fn load_config(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (pass --config, or set TUNNEL_CONFIG)",
            path.display()
        )
    })?;
    Ok(AgentConfig::parse(&text, path)?)
}

/// The control socket: from the config, else in the user's runtime directory.
fn control_path(config: &AgentConfig) -> PathBuf {
    config.control.clone().unwrap_or_else(|| {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("tunnel"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/tunnel-{}", nix::unistd::getuid())))
            .join("agent.sock")
    })
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("tunnel-agent: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = load_config(&config_path(config))?;
            runtime()?.block_on(serve(config))
        }
        Command::Status { config, json } => {
            let config = load_config(&config_path(config))?;
            let reply = runtime()?.block_on(tunnel_transport::control::query(
                &control_path(&config),
                "status",
            ))?;
            if json {
                println!("{reply}");
            } else {
                print!("{}", status::render(&reply)?);
            }
            Ok(())
        }
    }
}

async fn serve(config: AgentConfig) -> Result<()> {
    let control = control_path(&config);
    let mut pools = Vec::new();
    for peer in &config.gateways {
        pools.push(Pool::start(peer.clone(), &config)?);
    }
    let bound = forward::bind_all(&config.forwards).await?;
    let control_listener = tunnel_transport::control::bind(&control).await?;
    let agent = Arc::new(Agent {
        forwards: bound.iter().map(|(l, f)| forward::view(l, f)).collect(),
        config,
        pools,
        streams: StreamTable::new(Side::Agent),
        started: Instant::now(),
    });
    for (listener, forward) in bound {
        tokio::spawn(forward::serve(agent.clone(), listener, forward));
    }
    let status_agent = agent.clone();
    tokio::spawn(tunnel_transport::control::serve(
        control_listener,
        Arc::new(move |command| {
            (command == "status").then(|| status::json(&status_agent).to_string())
        }),
    ));
    info!("agent ready; status on {}", control.display());

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!(
        "stopping; {} streams in flight are cut",
        agent.streams.live_count()
    );
    let _ = std::fs::remove_file(&control);
    Ok(())
}
