//! `tunnel-run [--config FILE] [--route PATTERN=GATEWAY]... -- CMD [ARGS...]`
//!
//! Runs CMD with `libtunnel_preload.so`, so the connections the routes select go
//! through the tunnel and everything else goes direct. Finds the library beside this
//! executable (or in `../lib`), makes sure an agent answers (starting one for the
//! lifetime of CMD if none does), then execs CMD: its exit status and signals are its
//! own.
#![forbid(unsafe_code)]

mod elf;
mod explain;

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tunnel_proto::config::AgentConfig;
use tunnel_proto::paths;

use crate::elf::Executable;

/// Run a program so that the connections your routes select go through the tunnel.
///
/// Routes come from agent.toml ([[route]]) and from --route. An agent already running
/// on the config's socket is used; otherwise one is started for the lifetime of the
/// command. With [[callback]] ports in agent.toml, a listener the program opens on one
/// of them (or on the gateway's callback address with port 0) lives at the gateway, so
/// that the far site can connect back (active FTP, GridFTP data channels). Statically
/// linked and Go programs cannot be preloaded: use a [[forward]] port for those.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Agent config file [default: $TUNNEL_CONFIG, else $XDG_CONFIG_HOME/tunnel/agent.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Another route, PATTERN=GATEWAY (e.g. '10.20.0.0/16=site-b'); tried before the config's.
    #[arg(long, value_name = "PATTERN=GATEWAY")]
    route: Vec<String>,
    /// Say for each destination (host:port, address:port, or a service name) which
    /// route takes it and through which gateway, and that gateway's policy answer for
    /// your identity (asked without connecting to the destination), or that it goes
    /// direct; then exit. No program is run.
    #[arg(long, value_name = "DEST", num_args = 1..)]
    explain: Vec<String>,
    /// The program and its arguments.
    #[arg(last = true, required_unless_present = "explain", value_name = "CMD")]
    command: Vec<String>,
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("tunnel-run: {e:#}");
            std::process::exit(127);
        }
    }
}

enum Never {}

fn run(args: Args) -> Result<Never> {
    let var = |name| std::env::var_os(name).map(PathBuf::from);
    let config_path = paths::agent_config(
        args.config.clone(),
        var("TUNNEL_CONFIG"),
        var("XDG_CONFIG_HOME"),
        var("HOME"),
    );
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "reading the agent config {} (write one, see the README, or pass --config)",
            config_path.display()
        )
    })?;
    let mut config = AgentConfig::parse(&text, &config_path)?;
    config
        .add_command_line_routes(&args.route)
        .map_err(anyhow::Error::msg)?;
    if config.routes.is_empty() && config.callbacks.is_empty() && args.explain.is_empty() {
        eprintln!(
            "tunnel-run: warning: {} has no [[route]] or [[callback]] and no --route was given: nothing will go through the tunnel",
            config_path.display()
        );
    }

    let exe = std::env::current_exe().context("finding tunnel-run's own path")?;
    let bin_dir = exe
        .parent()
        .context("tunnel-run's directory")?
        .to_path_buf();
    let library = paths::preload_candidates(&bin_dir)
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{} is not beside {} or in ../lib: reinstall tunnel",
                paths::PRELOAD_LIBRARY,
                exe.display()
            )
        })?;
    let library = library.canonicalize().unwrap_or(library);

    let socket = std::path::absolute(paths::agent_socket(
        config.control.as_deref(),
        var("XDG_RUNTIME_DIR"),
        nix::unistd::getuid().as_raw(),
    ))?;
    let agent = || -> Result<PathBuf> {
        if agent_answers(&socket)? {
            Ok(socket.clone())
        } else {
            start_agent(&bin_dir, &config_path, &args.route)
        }
    };
    if !args.explain.is_empty() {
        explain::explain(&config, &args.explain, agent)?;
        std::process::exit(0);
    }

    warn_if_unpreloadable(&args.command[0]);
    let socket = agent()?;

    let preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", library.display()),
        _ => library.display().to_string(),
    };
    let error = Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("TUNNEL_ROUTES", config.route_table().to_string())
        .env("TUNNEL_AGENT", &socket)
        .env("TUNNEL_SYNTHETIC", paths::synthetic_env(&config))
        .env("TUNNEL_CALLBACKS", config.callback_ports())
        .exec();
    bail!("cannot run `{}`: {error}", args.command[0])
}

/// True when an agent answers on `socket`; an error when something answers there that
/// is not this user's agent (another user's socket put in its place).
fn agent_answers(socket: &Path) -> Result<bool> {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return Ok(false);
    };
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .ok();
    let me = nix::unistd::geteuid().as_raw();
    let shared = std::env::var("TUNNEL_AGENT_UID")
        .ok()
        .and_then(|u| u.trim().parse::<u32>().ok());
    match peer {
        Some(uid) if uid == me || uid == 0 || Some(uid) == shared => {}
        Some(uid) => bail!(
            "{} is answered by uid {uid}, not by your agent: someone else's socket is in its place. Remove it (or, for an agent shared with your group, set TUNNEL_AGENT_UID={uid})",
            socket.display()
        ),
        None => return Ok(false),
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut byte = [0u8; 1];
    let asked = tunnel_proto::local::Request::Version.encode();
    Ok(stream.write_all(asked.as_bytes()).is_ok() && matches!(stream.read(&mut byte), Ok(1)))
}

/// Starts an agent for the lifetime of this process (which becomes the command), on a
/// socket of its own; returns that socket.
fn start_agent(bin_dir: &Path, config: &Path, routes: &[String]) -> Result<PathBuf> {
    let agent = bin_dir.join("tunnel-agent");
    let pid = std::process::id();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // A directory of our own, made now and private: one that is already there may be
    // someone else's (a guessed pid), so it is never reused.
    let scratch = base.join(format!("tunnel-run-{pid}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .with_context(|| {
            format!(
                "creating {} (if it exists, another process made it: remove it)",
                scratch.display()
            )
        })?;
    let socket = scratch.join("agent.sock");
    let log_path = scratch.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = Command::new(&agent);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(&socket)
        .arg("--exit-with")
        .arg(pid.to_string())
        .arg("--scratch-dir")
        .arg(&scratch)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for route in routes {
        command.arg("--route").arg(route);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if agent_answers(&socket)? {
            return Ok(socket);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&scratch);
            bail!("the agent it started exited ({status}):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    bail!(
        "the agent it started did not answer within 10 s (log: {})",
        log_path.display()
    )
}

/// Says so when LD_PRELOAD cannot reach the program.
fn warn_if_unpreloadable(program: &str) {
    let path = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) else {
        return;
    };
    let why = match elf::classify(&bytes) {
        Executable::Static => "is statically linked",
        Executable::Go => "is a Go program (it makes its own system calls)",
        Executable::Dynamic | Executable::Other => return,
    };
    eprintln!(
        "tunnel-run: warning: {} {why}, so LD_PRELOAD cannot see its connections and they \
         will NOT go through the tunnel. Give it a [[forward]] port in agent.toml \
         (listen = \"127.0.0.1:PORT\", to = \"HOST:PORT\") and point it there instead.",
        path.map_or_else(|| program.to_string(), |p| p.display().to_string())
    );
}
