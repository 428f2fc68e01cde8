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
//! - `authority`: the CA and the certificates it issues.
//! - `verifier`: who may finish a handshake, and as what (agent, enrolling, recovering).
//! - `issuing`: enrolment and renewal requests; `state`: tokens, identities, revocations
//!   on disk; `secrets`: random numbers and constant-time comparison.
//! - `grants`: what allowed each live stream, so expiry, revocation and a new policy
//!   can reset it; `reload`: policy and state read again while running.
//! - `setup`: `init` and `issue`; `enrolment`: `token`, `revoke`, `identities`;
//!   `status`: what `tunnel-gateway status` shows.
#![forbid(unsafe_code)]

mod admission;
mod authority;
mod callbacks;
mod discovery;
mod enrolment;
mod goaway;
mod grants;
mod issuing;
mod metrics;
mod outbound;
mod policy;
mod publications;
mod refusals;
mod reload;
mod secrets;
mod server;
mod setup;
mod state;
mod status;
mod verifier;
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
        /// Address and port to listen on; the default listens on every address of
        /// this host (IPv4), port 7443.
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
        /// The gateway directory made by `init` [default: as for `run`].
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// The gateway's config file (to find the CA) instead of --dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write ID.pem, ID-key.pem and ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate stays valid [default: 90].
        #[arg(long, conflicts_with = "ttl")]
        days: Option<u32>,
        /// How long the certificate stays valid, as 30s, 15m, 24h or 7d (instead of --days).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Print a one-time enrolment token for an identity (`tunnel-agent enroll` takes it).
    ///
    /// The token carries this gateway's address, the pin of its CA, a secret and what it
    /// grants. Only a digest of the secret is kept here. Hand it over as you would a
    /// password; it works once, for one key, until it expires.
    Token {
        /// The identity the certificate will carry (the name allow rules use).
        #[arg(long)]
        identity: String,
        /// A group the identity belongs to (`group:NAME` in allow rules); repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How long the token may wait to be used: 30s, 15m, 24h, 7d.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// How long the enrolment may renew its certificate [default: until revoked].
        #[arg(long, value_parser = parse_duration)]
        renew_for: Option<std::time::Duration>,
        /// Where agents reach this gateway, HOST:PORT (repeatable; replicas too)
        /// [default: from gateway.toml's listen and the gateway's certificate].
        #[arg(long = "address")]
        addresses: Vec<String>,
        /// The gateway directory made by `init` [default: as for `run`].
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// The gateway's config file instead of --dir.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Revoke an identity (every certificate it has now) or one certificate: its
    /// connections are closed and its streams reset within a second, and it can no
    /// longer connect or renew. Written to the state directory before this returns.
    Revoke {
        /// Revoke every certificate of this identity issued until now.
        #[arg(long, required_unless_present = "serial", conflicts_with = "serial")]
        identity: Option<String>,
        /// Revoke one certificate, by its serial (hex, as `identities` shows it).
        #[arg(long)]
        serial: Option<String>,
        /// The gateway directory made by `init` [default: as for `run`].
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// The gateway's config file instead of --dir.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List enrolled identities, their certificates and revocations, and unused tokens.
    Identities {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The gateway directory made by `init` [default: as for `run`].
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// The gateway's config file instead of --dir.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the gateway in the foreground (SIGTERM: drain, then exit).
    Run {
        /// Config file [default: $TUNNEL_GATEWAY_CONFIG, else $XDG_CONFIG_HOME/tunnel/gateway/gateway.toml,
        /// else /etc/tunnel/gateway/gateway.toml when that one is missing].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show a running gateway's agents and streams.
    Status {
        /// Config file of the gateway to ask (it names the control socket).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw once a second, with rates per stream and per identity, round trips
        /// and recent failures; q or Ctrl-C quits.
        #[arg(long)]
        watch: bool,
    },
}

/// `--config`, else `--dir`'s gateway.toml, else the default.
fn gateway_config_path(config: Option<PathBuf>, dir: Option<PathBuf>) -> PathBuf {
    match (config, dir) {
        (Some(c), _) => c,
        (None, Some(d)) => d.join("gateway.toml"),
        (None, None) => config_path(None),
    }
}

/// The system gateway's config (the Debian package's, and the systemd unit's).
const SYSTEM_CONFIG: &str = "/etc/tunnel/gateway/gateway.toml";

/// `--config`, else `$TUNNEL_GATEWAY_CONFIG`, else the user's own gateway.toml, else
/// the system gateway's when the user has none.
fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("TUNNEL_GATEWAY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| {
            let own = setup::default_dir().join("gateway.toml");
            if !own.exists() && Path::new(SYSTEM_CONFIG).exists() {
                PathBuf::from(SYSTEM_CONFIG)
            } else {
                own
            }
        })
}

/// The state directory and control socket of the gateway configured in `path`, also
/// when the file has problems elsewhere (said on stderr): revocation must not wait
/// for a typo in the rules to be fixed.
fn state_places(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (give the gateway's --config, or --dir)",
            path.display()
        )
    })?;
    let places = tunnel_proto::config::gateway::state_places(&text, path);
    if let Err(e) = GatewayConfig::parse(&text, path) {
        eprintln!(
            "warning: {e}\n(using state_dir {} and control {} all the same)",
            places.0.display(),
            places.1.display()
        );
    }
    Ok(places)
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

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    tunnel_proto::duration::parse(text).map_err(|e| e.to_string())
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
            println!("{}", setup::listening_on(&listen));
            println!(
                "next: add [[allow]] rules to it, start it, then enrol each agent with a token:"
            );
            println!(
                "  tunnel-gateway token --dir {} --identity alice    # on the agent's machine: tunnel-agent enroll",
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
            ttl,
        } => {
            let path = gateway_config_path(config, dir);
            let config = load_config(&path)?;
            let lifetime = match (ttl, days) {
                (Some(ttl), _) => ttl,
                (None, Some(days)) => std::time::Duration::from_secs(u64::from(days) * 86_400),
                (None, None) => std::time::Duration::from_secs(90 * 86_400),
            };
            let files = setup::issue(&config, &identity, &out, lifetime)?;
            print!(
                "{}",
                setup::issue_report(&config, &path, &identity, &files)?
            );
            Ok(())
        }
        Command::Run { config } => {
            let path = config_path(config);
            let config = load_config(&path)?;
            let workers = workers::Workers::per_core()?;
            tunnel_transport::daemon::runtime()?.block_on(serve(config, path, workers))
        }
        Command::Token {
            identity,
            groups,
            ttl,
            renew_for,
            addresses,
            dir,
            config,
        } => {
            let path = gateway_config_path(config, dir);
            state::become_owner_of(&path)?;
            let config = load_config(&path)?;
            let token = enrolment::token(
                &config, &path, &identity, &groups, ttl, renew_for, &addresses,
            )?;
            tunnel_transport::daemon::print_out(&format!("{}\n", token.text))?;
            eprintln!("{}", token.note);
            Ok(())
        }
        Command::Revoke {
            identity,
            serial,
            dir,
            config,
        } => {
            let path = gateway_config_path(config, dir);
            state::become_owner_of(&path)?;
            let (state_dir, control) = state_places(&path)?;
            let said = enrolment::revoke(&state_dir, identity.as_deref(), serial.as_deref())?;
            let running = tunnel_transport::daemon::runtime()?
                .block_on(tunnel_transport::control::query(&control, "reload"));
            let applied = match running {
                Ok(_) => "the running gateway applied it".to_string(),
                Err(_) => format!(
                    "no gateway answers at {} now; a gateway reads the list when it starts, and a running replica within a second",
                    control.display()
                ),
            };
            tunnel_transport::daemon::print_out(&format!("{said}\n{applied}\n"))?;
            Ok(())
        }
        Command::Identities { json, dir, config } => {
            let path = gateway_config_path(config, dir);
            state::become_owner_of(&path)?;
            let (state_dir, _) = state_places(&path)?;
            tunnel_transport::daemon::print_out(&enrolment::identities(&state_dir, json)?)?;
            Ok(())
        }
        Command::Status {
            config,
            json,
            watch,
        } => {
            let config = load_config(&config_path(config))?;
            let runtime = tunnel_transport::daemon::runtime()?;
            let mut fetch =
                || runtime.block_on(tunnel_transport::control::query(&config.control, "status"));
            if watch {
                return tunnel_transport::watch::run(&mut tunnel_transport::watch::Source {
                    title: "tunnel-gateway status",
                    fetch: &mut fetch,
                    render: &status::render,
                    links: &status::links,
                });
            }
            let reply = fetch()?;
            if json {
                tunnel_transport::daemon::print_out(&format!("{reply}\n"))?;
            } else {
                tunnel_transport::daemon::print_out(&status::render(&reply)?)?;
            }
            Ok(())
        }
    }
}

async fn serve(
    config: GatewayConfig,
    config_path: PathBuf,
    workers: workers::Workers,
) -> Result<()> {
    let listener = server::bind(config.listen)
        .with_context(|| format!("listening on {} (listen in the config)", config.listen))?;
    let local = listener.local_addr()?;
    let drain = config.drain_timeout;
    let gateway = Gateway::new(config, local)?;
    let tls = verifier::server_config(
        &gateway.config.ca,
        &gateway.config.cert,
        &gateway.config.key,
        gateway.revocations.subscribe(),
        gateway.config.recovery_window,
    )?;
    let control = tunnel_transport::control::bind(&gateway.config.control).await?;
    let control_inode = tunnel_transport::control::socket_inode(&gateway.config.control);
    let summaries = gateway.clone();
    tokio::spawn(async move { summaries.refusals.run().await });
    let reload_now = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(reload::run(
        gateway.clone(),
        config_path,
        reload_now.clone(),
    ));

    if let Some(rule) = &gateway.config.callbacks {
        callbacks::check_bind(rule)?;
        if let Some(warning) = callbacks::ephemeral_overlap(rule.ports) {
            warn!("{warning}");
        }
        info!(
            "callback listeners on {} ports {} for {}",
            rule.address,
            rule.ports,
            rule.for_.join(", ")
        );
    }
    let (stop, stopping) = Shutdown::new();
    for (name, listener) in publications::bind_listeners(&gateway).await? {
        tokio::spawn(publications::serve_listener(
            gateway.clone(),
            name,
            listener,
            stopping.clone(),
        ));
    }
    if let Some(address) = gateway.config.metrics {
        let listener = tunnel_transport::metrics::bind(address).await?;
        let for_metrics = gateway.clone();
        tokio::spawn(tunnel_transport::metrics::serve(
            listener,
            Arc::new(move || metrics::render(&for_metrics)),
            stopping.clone(),
        ));
    }
    let status_gateway = gateway.clone();
    tokio::spawn(tunnel_transport::control::serve(
        control,
        Arc::new(move |command| match command {
            "status" => Some(status::json(&status_gateway)),
            "reload" => {
                reload_now.notify_one();
                Some("reloading".into())
            }
            _ => None,
        }),
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
    gateway.callbacks.close_all();
    match tokio::time::timeout(drain, &mut server).await {
        Ok(()) => info!("drained; exiting"),
        Err(_) => warn!(
            "drain limit reached with {} streams still open: they are cut",
            gateway.streams.live_count()
        ),
    }
    tunnel_transport::control::remove_if_ours(&gateway.config.control, control_inode);
    Ok(())
}
