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
/// that the far site can connect back (active FTP, GridFTP data channels).
///
/// Statically linked and Go programs make their own system calls, which LD_PRELOAD
/// cannot see: tunnel-run supervises those, scripts, shells and launchers (env, timeout,
/// nice, nohup, xargs, make, srun, mpirun and the like, which may start them), and any
/// program with --seccomp, with seccomp user notification. Another dynamically linked
/// program named directly is only preloaded: give --seccomp when it starts static or Go
/// programs itself (a Python job runner, say). Their connects stop until tunnel-run has
/// looked: a routed one is connected through the agent by tunnel-run itself and
/// returns the far side's answer; any other is made by tunnel-run as the program asked,
/// with the address it read. tunnel-run stays until the program and every process it
/// left behind have ended (Ctrl-C or SIGTERM then ends those), passes on SIGTERM,
/// SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM, and exits as the program did.
///
/// Under the supervisor the program runs with no_new_privs: setuid and setcap
/// programs it starts (sudo, su, ping on some systems, newgrp) get no privileges from
/// their bits. io_uring is refused (io_uring_setup fails with ENOSYS and programs fall
/// back to ordinary system calls), since a connect made through it would pass
/// unseen; --allow-io-uring permits it. A tunnel-run inside a supervised program
/// leaves it to the outer supervisor.
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
    /// Supervise the program with seccomp even if LD_PRELOAD could reach it (the
    /// default for statically linked and Go programs, scripts, shells and launchers).
    #[arg(long, conflicts_with = "no_seccomp")]
    seccomp: bool,
    /// Never supervise: statically linked and Go programs then connect directly,
    /// outside the tunnel (tunnel-run warns).
    #[arg(long)]
    no_seccomp: bool,
    /// Let a supervised program use io_uring (its connects through io_uring would not
    /// go through the tunnel).
    #[arg(long)]
    allow_io_uring: bool,
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
                "{} is not beside {}, in ../lib or in ../lib/tunnel: reinstall tunnel",
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
    let agent = || -> Result<(PathBuf, Option<u32>)> {
        if agent_answers(&socket)? {
            Ok((socket.clone(), None))
        } else {
            start_agent(&bin_dir, &config_path, &args.route)
        }
    };
    if !args.explain.is_empty() {
        explain::explain(&config, &args.explain, || agent().map(|(s, _)| s))?;
        std::process::exit(0);
    }

    let kind = executable_kind(&args.command[0]);
    let supervised = match supervision(&args, &args.command[0], kind) {
        Supervision::Supervise => true,
        Supervision::Outer => {
            eprintln!(
                "tunnel-run: note: already under tunnel-run's supervisor (pid {}): its routes, not this one's, carry {}'s connects",
                std::env::var(tunnel_supervisor::SUPERVISED_ENV).unwrap_or_default(),
                args.command[0]
            );
            false
        }
        Supervision::Preload => {
            warn_if_unpreloadable(&args.command[0], kind);
            false
        }
    };
    if supervised {
        tunnel_supervisor::check_machine()?;
    }
    let (socket, started) = agent()?;

    let preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", library.display()),
        _ => library.display().to_string(),
    };
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("TUNNEL_ROUTES", config.route_table().to_string())
        .env("TUNNEL_AGENT", &socket)
        .env("TUNNEL_SYNTHETIC", paths::synthetic_env(&config))
        .env("TUNNEL_CALLBACKS", config.callback_ports());
    if supervised {
        let plan = supervision_plan(&config, &socket, &args, started)?;
        tunnel_supervisor::run(command, plan)?.propagate();
    }
    let error = command.exec();
    bail!("cannot run `{}`: {error}", args.command[0])
}

fn debug() -> bool {
    std::env::var_os("TUNNEL_DEBUG").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Who carries the program's connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Supervision {
    /// The preload library (dynamically linked programs).
    Preload,
    /// This tunnel-run's seccomp supervisor.
    Supervise,
    /// The supervisor of an outer tunnel-run, which this process runs under already.
    Outer,
}

/// Shells and launchers, which start whatever they are given, static and Go programs
/// included: supervised, so that those are carried too.
const LAUNCHERS: [&str; 28] = [
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox", "env", "timeout",
    "nice", "ionice", "nohup", "setsid", "stdbuf", "time", "xargs", "taskset", "chrt", "flock",
    "numactl", "parallel", "make", "srun", "mpirun", "mpiexec",
];

fn supervision(args: &Args, program: &str, kind: Option<Executable>) -> Supervision {
    if args.no_seccomp {
        return Supervision::Preload;
    }
    let shell = std::path::Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| LAUNCHERS.contains(&n));
    // Static and Go programs, scripts (and executables this user may not read), shells
    // and launchers: everything but another dynamically linked program named directly.
    let wanted = args.seccomp
        || shell
        || matches!(
            kind,
            Some(Executable::Static) | Some(Executable::Go) | Some(Executable::Other)
        );
    if wanted && under_supervisor() {
        Supervision::Outer
    } else if wanted {
        Supervision::Supervise
    } else {
        Supervision::Preload
    }
}

/// True when this process runs under an outer tunnel-run's supervisor: its variable
/// is set and a seccomp filter is on this process (a variable alone, exported by hand,
/// is not enough).
fn under_supervisor() -> bool {
    if std::env::var_os(tunnel_supervisor::SUPERVISED_ENV).is_none() {
        return false;
    }
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.strip_prefix("Seccomp:").is_some_and(|v| v.trim() == "2"))
    })
}

fn supervision_plan(
    config: &AgentConfig,
    socket: &Path,
    args: &Args,
    started: Option<u32>,
) -> Result<tunnel_supervisor::Plan> {
    let agent = tunnel_supervisor::agent_socket(socket);
    let agent_listeners = agent.loopback_listeners().with_context(|| {
        format!(
            "asking the agent at {} for its loopback listeners",
            socket.display()
        )
    })?;
    let synthetic = paths::synthetic_env(config)
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(tunnel_proto::pattern::Pattern::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the synthetic address blocks: {e}"))?;
    Ok(tunnel_supervisor::Plan {
        routes: tunnel_supervisor::Routes {
            table: config.route_table(),
            synthetic,
            agent_listeners,
        },
        agent,
        rules: tunnel_supervisor::Rules {
            refuse_io_uring: !args.allow_io_uring,
        },
        trace: debug(),
        not_waited_for: started.into_iter().collect(),
        resolve_names: true,
    })
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
fn start_agent(bin_dir: &Path, config: &Path, routes: &[String]) -> Result<(PathBuf, Option<u32>)> {
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
            return Ok((socket, Some(child.id())));
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

/// The program's executable, found as exec would find it, read for its kind.
fn executable_kind(program: &str) -> Option<Executable> {
    let path = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    let path = path?;
    if !path.exists() {
        return None;
    }
    // An executable this user may not read (mode 0711) could be anything: Other.
    Some(std::fs::read(&path).map_or(Executable::Other, |bytes| elf::classify(&bytes)))
}

/// Says so when LD_PRELOAD cannot reach a program that is not supervised (--no-seccomp).
fn warn_if_unpreloadable(program: &str, kind: Option<Executable>) {
    let why = match kind {
        Some(Executable::Static) => "is statically linked",
        Some(Executable::Go) => "is a Go program (it makes its own system calls)",
        _ => return,
    };
    eprintln!(
        "tunnel-run: warning: {program} {why} and --no-seccomp was given, so its connections \
         will NOT go through the tunnel. Leave out --no-seccomp, or give it a [[forward]] \
         port in agent.toml (listen = \"127.0.0.1:PORT\", to = \"HOST:PORT\")."
    );
}
