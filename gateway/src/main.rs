//! `tunnel-gateway`: the far end of the tunnel. It accepts agents over mutually
//! authenticated TLS, checks each CONNECT against its policy, and connects to the
//! destination at its own site.
//!
//! # Layout
//!
//! ```text
//!  agent ══TLS══▶ server (accept loop, admission: handshake caps) ─▶ workers (a runtime
//!                   per core) ─▶ per connection: identity limits, goaway reasons
//!                   ─▶ per stream: policy (allow rules, services, guarded addresses)
//!                   ─▶ outbound connect ─▶ splice
//! ```
//!
//! - `server`: the agent listener, connections and streams; `workers`: where they run.
//! - `admission`: handshake caps and per-identity limits; `goaway`: refusal reasons.
//! - `policy`: who may reach what; `outbound`: connecting to destinations.
//! - `refusals`: refusals counted and summarised in the log.
//! - `authority`: the CA and the certificates it issues (rcgen lives only here).
//! - `setup`: `init` and `issue`; `status`: what `tunnel-gateway status` shows.
#![forbid(unsafe_code)]

mod admission;
mod authority;
mod goaway;
mod outbound;
mod policy;
mod refusals;
mod server;
mod setup;
mod status;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use tunnel_proto::config::GatewayConfig;
use tunnel_transport::plumbing::Shutdown;

use crate::server::Gateway;

/// The gateway of a tunnel: mutual TLS in, policy-checked TCP out.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a CA, the gateway's certificate and a starter gateway.toml in a new directory.
    Init {
        /// Directory for the files [default: $XDG_CONFIG_HOME/tunnel/gateway].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The gateway's name, as agents will address it (goes into its certificate).
        #[arg(long, default_value = "localhost")]
        name: String,
        /// Address and port to listen on.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
        /// Another DNS name or address for the gateway's certificate (repeatable).
        #[arg(long = "san")]
        extra_names: Vec<String>,
    },
    /// Write a client certificate and key for one identity, signed by the gateway's CA.
    Issue {
        /// The identity (the name allow rules use).
        #[arg(long)]
        identity: String,
        /// The gateway directory made by `init` [default: $XDG_CONFIG_HOME/tunnel/gateway].
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// The gateway's config file (to find the CA) instead of --dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write ID.pem, ID-key.pem and ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// Run the gateway in the foreground (SIGTERM: drain, then exit).
    Run {
        /// Config file [default: $TUNNEL_GATEWAY_CONFIG, else $XDG_CONFIG_HOME/tunnel/gateway/gateway.toml].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show a running gateway's agents and streams.
    Status {
        /// Config file of the gateway to ask (it names the control socket).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("TUNNEL_GATEWAY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| setup::default_dir().join("gateway.toml"))
}

fn load_config(path: &Path) -> Result<GatewayConfig> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (make one with `tunnel-gateway init`, or pass --config)",
            path.display()
        )
    })?;
    Ok(GatewayConfig::parse(&text, path)?)
}

fn main() {
    let cli = Cli::parse();
    tunnel_transport::daemon::init_logging();
    if let Err(e) = run(cli) {
        eprintln!("tunnel-gateway: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            dir,
            name,
            listen,
            extra_names,
        } => {
            let dir = dir.unwrap_or_else(setup::default_dir);
            let config = setup::init(&dir, &name, &listen, &extra_names)?;
            println!(
                "wrote the CA, the gateway certificate and {}",
                config.display()
            );
            println!("next: add [[allow]] rules to it, then issue client certificates:");
            println!(
                "  tunnel-gateway issue --dir {} --identity alice --out ./alice",
                dir.display()
            );
            Ok(())
        }
        Command::Issue {
            identity,
            dir,
            config,
            out,
            days,
        } => {
            let path = match (config, dir) {
                (Some(c), _) => c,
                (None, Some(d)) => d.join("gateway.toml"),
                (None, None) => config_path(None),
            };
            let config = load_config(&path)?;
            let files = setup::issue(&config, &identity, &out, days)?;
            print!(
                "{}",
                setup::issue_report(&config, &path, &identity, &files)?
            );
            Ok(())
        }
        Command::Run { config } => {
            let config = load_config(&config_path(config))?;
            let workers = workers::Workers::per_core()?;
            tunnel_transport::daemon::runtime()?.block_on(serve(config, workers))
        }
        Command::Status { config, json } => {
            let config = load_config(&config_path(config))?;
            let reply = tunnel_transport::daemon::runtime()?
                .block_on(tunnel_transport::control::query(&config.control, "status"))?;
            if json {
                println!("{reply}");
            } else {
                print!("{}", status::render(&reply)?);
            }
            Ok(())
        }
    }
}

async fn serve(config: GatewayConfig, workers: workers::Workers) -> Result<()> {
    let tls = tunnel_transport::tls::server_config(&config.ca, &config.cert, &config.key)?;
    let listener = server::bind(config.listen)
        .with_context(|| format!("listening on {} (listen in the config)", config.listen))?;
    let local = listener.local_addr()?;
    let control = tunnel_transport::control::bind(&config.control).await?;
    let drain = config.drain_timeout;
    let gateway = Gateway::new(config, local);
    let summaries = gateway.clone();
    tokio::spawn(async move { summaries.refusals.run().await });

    let (stop, stopping) = Shutdown::new();
    let status_gateway = gateway.clone();
    tokio::spawn(tunnel_transport::control::serve(
        control,
        Arc::new(move |command| (command == "status").then(|| status::json(&status_gateway))),
        stopping.clone(),
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!("listening on {local}");
    tunnel_transport::daemon::notify_ready(&format!("listening on {local}"));
    let server = server::serve(
        gateway.clone(),
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        workers,
        stopping,
    );
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let live = gateway.streams.live_count();
    info!(
        "stopping: no new connections; {live} streams in flight get up to {:.0}s",
        drain.as_secs_f64()
    );
    stop.fire();
    match tokio::time::timeout(drain, &mut server).await {
        Ok(()) => info!("drained; exiting"),
        Err(_) => warn!(
            "drain limit reached with {} streams still open: they are cut",
            gateway.streams.live_count()
        ),
    }
    let _ = std::fs::remove_file(&gateway.config.control);
    Ok(())
}
