//! Our own paths: a gateway and an agent with a throwaway CA, the agent's forward port,
//! and `tunnel-run` for the preloaded client. On a WAN scenario the relay sits between
//! agent and gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::relay::{self, Link};
use tunnel_tests::Daemon as Proc;

pub struct Tunnel {
    // Dropped first: the daemons, then their directory.
    pub agent: Proc,
    pub gateway: Proc,
    pub agent_config: PathBuf,
    /// The same agent, with the route marked `connect = "optimistic"`.
    pub optimistic_config: PathBuf,
    pub forward: SocketAddr,
    /// The gateway's port for the agent's publication of the destination: connections
    /// there travel inside-out, over the agent's reverse connection.
    pub published: SocketAddr,
    _dir: tempfile::TempDir,
}

fn run(command: &mut Command) -> Result<()> {
    let out = command.output().with_context(|| format!("{command:?}"))?;
    if !out.status.success() {
        bail!("{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Tunnel {
    pub fn start(bins: &Path, destination: SocketAddr, wan: Option<Link>) -> Result<Tunnel> {
        let dir = tempfile::tempdir()?;
        let gw = dir.path().join("gw");
        let creds = dir.path().join("bench");
        run(Command::new(bins.join("tunnel-gateway"))
            .args(["init", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&gw))?;
        run(Command::new(bins.join("tunnel-gateway"))
            .args(["issue", "--identity", "bench", "--dir"])
            .arg(&gw)
            .arg("--out")
            .arg(&creds))?;
        let config = gw.join("gateway.toml");
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(&format!(
            "\n[[allow]]\nidentity = \"bench\"\nto = [\"{}/32\"]\n\n[publish.bench]\nby = [\"bench\"]\nlisten = \"127.0.0.1:0\"\nfrom = [\"127.0.0.0/8\"]\n",
            destination.ip()
        ));
        std::fs::write(&config, text)?;
        let mut command = Command::new(bins.join("tunnel-gateway"));
        command.arg("run").arg("--config").arg(&config);
        let mut gateway = Proc::spawn("tunnel-gateway", command, dir.path().join("gateway.log"))?;
        let published: SocketAddr = gateway
            .wait_log("publication `bench` offered on ", Duration::from_secs(20))?
            .trim()
            .parse()?;
        let listen: SocketAddr = gateway
            .wait_log("listening on ", Duration::from_secs(20))?
            .trim()
            .parse()?;
        let address = match wan {
            Some(link) => relay::start(listen, link)?,
            None => listen,
        };
        let agent_config = dir.path().join("agent.toml");
        let config_text = |connect: &str| {
            format!(
                "control = \"agent.sock\"\n[[gateway]]\nname = \"site-b\"\naddress = \"{address}\"\nserver_name = \"127.0.0.1\"\nca = \"bench/ca.pem\"\ncert = \"bench/bench.pem\"\nkey = \"bench/bench-key.pem\"\n[[route]]\nto = [\"{}/32\"]\nconnect = \"{connect}\"\n[[forward]]\nlisten = \"127.0.0.1:0\"\nto = \"{destination}\"\n[[publish]]\nname = \"bench\"\nto = \"{destination}\"\n",
                destination.ip()
            )
        };
        std::fs::write(&agent_config, config_text("checked"))?;
        // tunnel-run reads the routes from this file and finds the same agent's socket.
        let optimistic_config = dir.path().join("agent-optimistic.toml");
        std::fs::write(&optimistic_config, config_text("optimistic"))?;
        let mut command = Command::new(bins.join("tunnel-agent"));
        command.arg("run").arg("--config").arg(&agent_config);
        let mut agent = Proc::spawn("tunnel-agent", command, dir.path().join("agent.log"))?;
        let forward: SocketAddr = agent
            .wait_log("forward ", Duration::from_secs(20))?
            .split_whitespace()
            .next()
            .context("forward address in the agent's log")?
            .parse()?;
        agent.wait_log("connected to", Duration::from_secs(20))?;
        agent.wait_log("published `bench`", Duration::from_secs(20))?;
        Ok(Tunnel {
            published,
            agent,
            gateway,
            agent_config,
            optimistic_config,
            forward,
            _dir: dir,
        })
    }

    /// The command prefix that preloads a client.
    pub fn wrapper(&self, bins: &Path) -> Vec<String> {
        Tunnel::wrapper_with(bins, &self.agent_config)
    }

    /// The command prefix that preloads a client whose route is optimistic.
    pub fn optimistic_wrapper(&self, bins: &Path) -> Vec<String> {
        Tunnel::wrapper_with(bins, &self.optimistic_config)
    }

    fn wrapper_with(bins: &Path, config: &Path) -> Vec<String> {
        vec![
            bins.join("tunnel-run").display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--".into(),
        ]
    }

    /// Resident memory of agent and gateway together, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.agent.rss_kib().unwrap_or(0) + self.gateway.rss_kib().unwrap_or(0)
    }

    /// Live streams the gateway carries now.
    pub fn live_streams(&self, bins: &Path) -> usize {
        let config = self
            .agent_config
            .parent()
            .map(|d| d.join("gw/gateway.toml"))
            .unwrap_or_default();
        Command::new(bins.join("tunnel-gateway"))
            .args(["status", "--json", "--config"])
            .arg(config)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["streams"].as_array().map(Vec::len))
            .unwrap_or(0)
    }
}
