//! `tunnel-agent`: the near end of the tunnel. It keeps a pool of mutually
//! authenticated HTTP/2 connections to each gateway and carries local connections over
//! them as CONNECT streams.
//!
//! # Layout
//!
//! ```text
//!  preload ──REGISTER + socket──▶ local (Unix socket, SO_PEERCRED, passed_fd)
//!          ──RESOLVE/VERDICT──▶     │ registrations, fake_dns, kept verdicts
//!  program's socket ──connect──▶ redirect (loopback listeners; sock_owner: whose?) ─┐
//!  [[forward]] port ──accept───▶ forward (allow_users: sock_owner) ─────────────────┴▶ carry ─▶ pool ═▶ gateway
//! ```
//!
//! Every listener runs the shared accept loop and stops on the one shutdown handle
//! (`tunnel_transport::plumbing`); on SIGTERM the agent then drains its streams.
//!
//! - `pool`: connections to one gateway (dial, PING, backoff, GOAWAY).
//! - `certificate`: the agent's certificate, checked at start and named when refused.
//! - `renewal`: renews a `credential` at half its life, over the pool's connections.
//! - `enroll`: `tunnel-agent enroll`, from a token to a credential and a `[[gateway]]`;
//!   `pin` (the gateway trusted by the token's CA pin), `credential` (keys, requests,
//!   checks on what is issued), `exchange` (one enrolment or renewal request),
//!   `state` (the state directory, atomic writes), `config_file` (the table added).
//! - `carry`: one local connection through the tunnel, from accept to close.
//! - `forward`: `[[forward]]` listeners.
//! - `redirect`: loopback listeners for preloaded programs, and their registrations.
//! - `local`: the Unix socket (registrations, verdicts, synthetic names, status).
//! - `passed_fd`: a program's socket passed with its registration.
//! - `sock_owner`: which local user owns the far end of an accepted connection.
//! - `fake_dns`: synthetic addresses for routed names.
//! - `status`: what `tunnel-agent status` shows, as one typed view.
#![forbid(unsafe_code)]

mod callbacks;
mod carry;
mod certificate;
mod config_file;
mod credential;
mod discovery;
mod enroll;
mod exchange;
mod fake_dns;
mod forward;
mod local;
mod metrics;
mod passed_fd;
mod pin;
mod pool;
mod publish;
mod redirect;
mod renewal;
mod rewind;
mod sock_owner;
mod state;
mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tunnel_proto::config::AgentConfig;
use tunnel_proto::paths;
use tunnel_transport::plumbing::Shutdown;
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
        /// The agent's Unix socket, instead of the config's `control`.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Exit when this process ends (how `tunnel-run` scopes an agent to one command).
        #[arg(long, value_name = "PID")]
        exit_with: Option<i32>,
        /// Another route, PATTERN=GATEWAY, tried before the config's.
        #[arg(long, value_name = "PATTERN=GATEWAY")]
        route: Vec<String>,
        /// A directory of this agent's own (socket, log) to remove when it exits.
        #[arg(long, hide = true)]
        scratch_dir: Option<PathBuf>,
    },
    /// Print `export` lines that make a job script's programs use the tunnel:
    /// eval "$(tunnel-agent env)"
    Env {
        /// Config file [default: $TUNNEL_CONFIG, else $XDG_CONFIG_HOME/tunnel/agent.toml].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Enrol with a gateway using a token from its operator: makes a key here, gets a
    /// certificate for it, and adds the gateway to the config.
    ///
    /// The token is read from --token-file, else from $TUNNEL_ENROLL_TOKEN, else from
    /// stdin; never from an argument, where other users could read it.
    Enroll {
        /// Config file to add the gateway to (made if missing) [default: $TUNNEL_CONFIG,
        /// else $XDG_CONFIG_HOME/tunnel/agent.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// The name the gateway gets in the config [default: the name in the token].
        #[arg(long, value_name = "GATEWAY")]
        name: Option<String>,
        /// Read the token from this file.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// List, per gateway, the named services and publications this agent's identity
    /// may reach, as each gateway's policy says (asks the running agent).
    Services {
        /// Config file of the agent to ask (it names the control socket).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Ask the agent on this socket (one started with `run --socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Show a running agent's gateways, connections and streams.
    Status {
        /// Config file of the agent to ask (it names the control socket); without one
        /// and with no config at the default place, the socket's default place is asked.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw once a second, with rates per stream and per gateway, round trips
        /// and recent failures; q or Ctrl-C quits.
        #[arg(long)]
        watch: bool,
        /// Ask the agent on this socket (one started with `run --socket`); no config
        /// is read then.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// Everything the agent's tasks share.
pub struct Agent {
    pub config: AgentConfig,
    /// The config's routes, compiled once for the registrations.
    pub routes: tunnel_proto::routes::RouteTable,
    pub fake_dns: fake_dns::FakeDns,
    pub registrations: redirect::Registrations,
    /// The loopback listeners that redirected sockets connect to (IPv4, IPv6).
    pub listener_addresses: (std::net::SocketAddr, Option<std::net::SocketAddr>),
    pub pools: Vec<Arc<Pool>>,
    /// One for each gateway whose `credential` the agent renews.
    pub renewals: Vec<Arc<renewal::Renewal>>,
    /// One for each gateway that this agent publishes services at.
    pub publishers: Vec<Arc<publish::Publisher>>,
    /// Callback listeners held at gateways for programs here.
    pub callbacks: Arc<callbacks::Callbacks>,
    pub streams: Arc<StreamTable>,
    pub forwards: Vec<ForwardView>,
    /// Says which local user owns the socket at the far end of an accepted connection.
    pub socket_owners: Arc<sock_owner::SocketOwners>,
    pub started: Instant,
}

impl Agent {
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.peer.name == name)
    }
}

fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    let var = |name| std::env::var_os(name).map(PathBuf::from);
    paths::agent_config(
        explicit,
        var("TUNNEL_CONFIG"),
        var("XDG_CONFIG_HOME"),
        var("HOME"),
    )
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

/// The agent's Unix socket: from the config, else in the user's runtime directory.
/// The socket of the running agent that `status` or `services` asks: `--socket`, else
/// the config's; with no config file anywhere, the socket's default place (an agent
/// started with the defaults), rather than a failure on the missing file.
fn asked_socket(config: Option<PathBuf>, socket: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    let path = config_path(config.clone());
    if config.is_none() && std::env::var_os("TUNNEL_CONFIG").is_none() && !path.exists() {
        return Ok(paths::agent_socket(
            None,
            std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
            nix::unistd::getuid().as_raw(),
        ));
    }
    Ok(socket_path(&load_config(&path)?))
}

fn socket_path(config: &AgentConfig) -> PathBuf {
    paths::agent_socket(
        config.control.as_deref(),
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        nix::unistd::getuid().as_raw(),
    )
}

fn main() {
    let cli = Cli::parse();
    tunnel_transport::daemon::init_logging();
    if let Err(e) = run(cli) {
        eprintln!("tunnel-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            socket,
            exit_with,
            route,
            scratch_dir,
        } => {
            let mut config = load_config(&config_path(config))?;
            config
                .add_command_line_routes(&route)
                .map_err(anyhow::Error::msg)?;
            // Only a directory made by tunnel-run for this agent's socket is removed.
            let scratch_dir = scratch_dir.filter(|dir| {
                let named = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("tunnel-run-"))
                    .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
                named && socket.as_deref().and_then(Path::parent) == Some(dir.as_path())
            });
            if socket.is_some() {
                config.control = socket;
            }
            let served = tunnel_transport::daemon::runtime()?.block_on(serve(config, exit_with));
            // After a failure the directory stays: tunnel-run reads the log in it to say
            // why, then removes it.
            if let Some(dir) = scratch_dir.filter(|_| served.is_ok()) {
                let _ = std::fs::remove_dir_all(dir);
            }
            served
        }
        Command::Enroll {
            config,
            name,
            token_file,
        } => enroll::run(enroll::Options {
            config: config_path(config),
            name,
            token_file,
        }),
        Command::Env { config } => {
            let path = config_path(config);
            let config = load_config(&path)?;
            tunnel_transport::daemon::print_out(&env_lines(&config)?)?;
            Ok(())
        }
        Command::Services {
            config,
            json,
            socket,
        } => {
            let socket = asked_socket(config, socket)?;
            let reply =
                tunnel_transport::daemon::runtime()?.block_on(tunnel_transport::control::query(
                    &socket,
                    tunnel_proto::local::Request::Services.encode().trim_end(),
                ))?;
            if json {
                tunnel_transport::daemon::print_out(&format!("{reply}\n"))?;
            } else {
                tunnel_transport::daemon::print_out(&status::render_services(&reply)?)?;
            }
            Ok(())
        }
        Command::Status {
            config,
            json,
            watch,
            socket,
        } => {
            let socket = asked_socket(config, socket)?;
            let runtime = tunnel_transport::daemon::runtime()?;
            let request = tunnel_proto::local::Request::Status.encode();
            let mut fetch = || {
                runtime.block_on(tunnel_transport::control::query(
                    &socket,
                    request.trim_end(),
                ))
            };
            if watch {
                return tunnel_transport::watch::run(&mut tunnel_transport::watch::Source {
                    title: "tunnel-agent status",
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

/// The `export` lines of `tunnel-agent env`.
fn env_lines(config: &AgentConfig) -> Result<String> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let bin_dir = exe.parent().context("this executable's directory")?;
    let library = paths::preload_candidates(bin_dir)
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{} is not installed beside {}, in ../lib or in ../lib/tunnel",
                paths::PRELOAD_LIBRARY,
                exe.display()
            )
        })?;
    let library = library.canonicalize().unwrap_or(library);
    let q = |s: &str| paths::shell_quote(s);
    Ok(format!(
        "export TUNNEL_AGENT={}\nexport TUNNEL_ROUTES={}\nexport TUNNEL_SYNTHETIC={}\nexport TUNNEL_CALLBACKS={}\nexport LD_PRELOAD={}\"${{LD_PRELOAD:+:$LD_PRELOAD}}\"\n",
        q(&std::path::absolute(socket_path(config))?.to_string_lossy()),
        q(&config.route_table().to_string()),
        q(&paths::synthetic_env(config)),
        q(&config.callback_ports()),
        q(&library.to_string_lossy()),
    ))
}

/// Returns when process `pid` has ended.
async fn process_ended(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    while nix::sys::signal::kill(pid, None).is_ok() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn serve(config: AgentConfig, exit_with: Option<i32>) -> Result<()> {
    let socket = socket_path(&config);
    let mut pools = Vec::new();
    for peer in &config.gateways {
        pools.push(Pool::start(peer.clone(), &config)?);
    }
    let bound = forward::bind_all(&config.forwards).await?;
    let mut allowed = Vec::new();
    for (i, (_, f)) in bound.iter().enumerate() {
        let key = format!("forward[{i}]");
        allowed.push(match &f.allow {
            Some(names) => Some(forward::AllowedUsers::resolve(names, &key)?),
            None => None,
        });
    }
    let listeners = redirect::Listeners::bind().await?;
    let access = local::Access::new(config.group.as_deref())?;
    let local_listener = tunnel_transport::control::bind_shared(&socket, access.group()).await?;
    let socket_inode = tunnel_transport::control::socket_inode(&socket);
    let socket_owners = sock_owner::SocketOwners::open()
        .context("opening a NETLINK_SOCK_DIAG socket (to tell whose a local connection is)")?;
    let drain_timeout = config.drain_timeout;
    let renewals = pools
        .iter()
        .filter(|pool| pool.peer.renews)
        .map(|pool| renewal::Renewal::start(pool.clone()))
        .collect();
    let streams = StreamTable::new(Side::Agent);
    let socket_owners = Arc::new(socket_owners);
    let callbacks = Arc::new(callbacks::Callbacks::new(socket_owners.clone()));
    let publishers = pools
        .iter()
        .filter_map(|pool| {
            let mine: Vec<_> = config
                .publications
                .iter()
                .filter(|p| p.via == pool.peer.name)
                .cloned()
                .collect();
            let calls_back = config.callbacks.iter().any(|c| c.via == pool.peer.name);
            (!mine.is_empty() || calls_back).then(|| {
                publish::Publisher::start(
                    pool.clone(),
                    mine,
                    callbacks.clone(),
                    streams.clone(),
                    &config,
                )
            })
        })
        .collect();
    let agent = Arc::new(Agent {
        forwards: bound.iter().map(|(l, f)| forward::view(l, f)).collect(),
        fake_dns: fake_dns::FakeDns::new(config.synthetic_ipv4, config.synthetic_ipv6),
        registrations: redirect::Registrations::default(),
        listener_addresses: listeners.addresses(),
        routes: config.route_table(),
        config,
        pools,
        renewals,
        publishers,
        callbacks,
        streams,
        socket_owners,
        started: Instant::now(),
    });
    // Everything that accepts new work stops (and closes its listener) when the agent
    // is asked to stop; the streams in flight go on until the drain ends.
    let (stop_accepting, accepting) = Shutdown::new();
    let mut acceptors = Vec::new();
    for ((listener, forward), allowed) in bound.into_iter().zip(allowed) {
        acceptors.push(tokio::spawn(forward::serve(
            agent.clone(),
            listener,
            forward,
            allowed,
            accepting.clone(),
        )));
    }
    if let Some(address) = agent.config.metrics {
        let listener = tunnel_transport::metrics::bind(address).await?;
        let for_metrics = agent.clone();
        acceptors.push(tokio::spawn(tunnel_transport::metrics::serve(
            listener,
            std::sync::Arc::new(move || metrics::render(&for_metrics)),
            accepting.clone(),
        )));
    }
    acceptors.push(tokio::spawn(redirect::serve(
        agent.clone(),
        listeners.v4,
        accepting.clone(),
    )));
    if let Some(v6) = listeners.v6 {
        acceptors.push(tokio::spawn(redirect::serve(
            agent.clone(),
            v6,
            accepting.clone(),
        )));
    }
    acceptors.push(tokio::spawn(local::serve(
        agent.clone(),
        local_listener,
        access,
        accepting,
    )));
    info!("agent ready; socket {}", socket.display());
    tunnel_transport::daemon::notify_ready("agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let parent_gone = async {
        match exit_with {
            Some(pid) => process_ended(pid).await,
            None => std::future::pending().await,
        }
    };
    let drain = tokio::select! {
        _ = term.recv() => true,
        _ = int.recv() => true,
        _ = parent_gone => {
            info!("the command it served has ended");
            false
        }
    };
    stop_accepting.fire();
    for acceptor in acceptors {
        let _ = acceptor.await;
    }
    tunnel_transport::control::remove_if_ours(&socket, socket_inode);
    if drain && agent.streams.live_count() > 0 {
        info!(
            "draining: {} streams in flight may finish within {:.0} s; no new ones are taken",
            agent.streams.live_count(),
            drain_timeout.as_secs_f64()
        );
        let drained = tokio::time::timeout(drain_timeout, async {
            while agent.streams.live_count() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        if drained.is_ok() {
            info!("drained; exiting");
            return Ok(());
        }
    }
    // What is still open is reset as the process ends (each program socket carries
    // SO_LINGER 0 until its download side has closed cleanly), never closed as if done.
    info!(
        "stopping; {} streams in flight are reset",
        agent.streams.live_count()
    );
    Ok(())
}
