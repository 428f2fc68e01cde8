//! Support for the end-to-end tests: a throwaway site with a real gateway and a real
//! agent, started from the built binaries, on loopback ports the kernel picks.
//!
//! ```text
//! Site (temp dir) ── Gateway: init + issue + allow rules, `tunnel-gateway run`
//!                 └─ Agent: agent.toml with forward ports, `tunnel-agent run`
//! ```
//!
//! Every process is killed when its handle drops, so a failing test leaves nothing
//! behind. Waits are bounded; a timeout fails the test with the daemon's log.
#![forbid(unsafe_code)]

pub mod netns;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// The directory holding the workspace's built binaries (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/ directory");
    dir.to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first (the README's test command does)",
        path.display()
    );
    path
}

/// Fails the test when a program the tests need is missing, naming the package.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not installed: apt-get install {package} (scripts/test does, run as root)"
    );
}

/// Polls `check` until it returns `Some`, or fails after `limit` with `what`.
pub fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `program`, run inside network namespace `ns` when given.
pub fn in_namespace(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => netns::Topology::command(ns, program),
        None => Command::new(program),
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Result<Daemon> {
        let file = fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        let id = self.child.as_ref().map_or(0, Child::id);
        nix::unistd::Pid::from_raw(id as i32)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`; returns the rest of that line. A
    /// process that exits first fails the wait at once, with its log.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let log = self.log.clone();
        let name = self.name.clone();
        let child = &mut self.child;
        let find = || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.split_once(needle).map(|(_, rest)| rest.to_string()))
        };
        let found = wait_for(limit, needle, || {
            if let Some(rest) = find() {
                return Some(Ok(rest));
            }
            match child.as_mut().map(Child::try_wait) {
                // Read once more: the line may have come just before the exit.
                Some(Ok(Some(status))) => {
                    Some(find().ok_or_else(|| anyhow!("{name} exited ({status})")))
                }
                _ => None,
            }
        })
        .and_then(|found| found);
        found.map_err(|e| {
            anyhow!(
                "{}: {e}\n--- {} log ---\n{}",
                self.name,
                self.name,
                self.log_text()
            )
        })
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), signal);
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<i32>> {
        let child = self.child.as_mut().context("already reaped")?;
        let status = wait_for(limit, "process exit", || child.try_wait().ok().flatten())?;
        self.child = None;
        Ok(status.code())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A site: a temp dir with a gateway CA, client identities and configs.
pub struct Site {
    pub dir: tempfile::TempDir,
}

impl Site {
    pub fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tunnel-gateway init` in `<site>/<name>`, listening on a port the kernel picks.
    pub fn init_gateway(&self, name: &str) -> PathBuf {
        self.init_gateway_on(name, "127.0.0.1")
    }

    /// `tunnel-gateway init` listening on `ip`, port chosen by the kernel.
    pub fn init_gateway_on(&self, name: &str, ip: &str) -> PathBuf {
        let dir = self.path(name);
        run_ok(
            Command::new(bin("tunnel-gateway"))
                .args(["init", "--listen", &format!("{ip}:0"), "--dir"])
                .arg(&dir),
        );
        dir
    }

    /// `tunnel-gateway issue` for `identity`, into `<site>/<out>`.
    pub fn issue(&self, gateway_dir: &Path, identity: &str, out: &str) -> PathBuf {
        let out = self.path(out);
        run_ok(
            Command::new(bin("tunnel-gateway"))
                .args(["issue", "--identity", identity, "--dir"])
                .arg(gateway_dir)
                .arg("--out")
                .arg(&out),
        );
        out
    }
}

impl Default for Site {
    fn default() -> Self {
        Site::new()
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("running a command");
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tunnel-gateway init` in `<site>/gateway`, `settings` put among its top-level keys
/// and `rules` (tables) appended, then started.
pub fn gateway_with(site: &Site, settings: &str, rules: &str) -> (PathBuf, Gateway) {
    let dir = site.init_gateway("gateway");
    let config = dir.join("gateway.toml");
    let text = fs::read_to_string(&config).expect("gateway.toml");
    fs::write(&config, format!("{settings}\n{text}")).expect("write gateway.toml");
    let gateway = Gateway::start(&dir, rules).expect("gateway");
    (dir, gateway)
}

/// A running gateway.
pub struct Gateway {
    pub daemon: Daemon,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl Gateway {
    /// Appends `rules` (TOML) to the gateway's config and starts it.
    pub fn start(dir: &Path, rules: &str) -> Result<Gateway> {
        let config = dir.join("gateway.toml");
        let mut text = fs::read_to_string(&config)?;
        text.push_str(rules);
        fs::write(&config, text)?;
        Gateway::run(dir)
    }

    /// Starts the gateway with the config as it is.
    pub fn run(dir: &Path) -> Result<Gateway> {
        Gateway::run_in(dir, None)
    }

    /// Starts the gateway, inside network namespace `ns` if given.
    pub fn run_in(dir: &Path, ns: Option<&str>) -> Result<Gateway> {
        let config = dir.join("gateway.toml");
        let mut command = in_namespace(ns, bin("tunnel-gateway"));
        command.arg("run").arg("--config").arg(&config);
        command.env("RUST_LOG", "info,tunnel_gateway=debug");
        let mut daemon = Daemon::spawn("gateway", command, dir.join("gateway.log"))?;
        let addr = daemon
            .wait_log("listening on ", Duration::from_secs(20))?
            .trim()
            .parse()?;
        Ok(Gateway {
            daemon,
            config,
            addr,
        })
    }

    /// Makes the config listen on the port this run got, so a restart comes back there.
    pub fn pin_port(&self) -> Result<()> {
        let text = fs::read_to_string(&self.config)?;
        let pinned = text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", self.addr),
        );
        fs::write(&self.config, pinned)?;
        Ok(())
    }

    pub fn status(&self) -> Result<Value> {
        let out = Command::new(bin("tunnel-gateway"))
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()?;
        if !out.status.success() {
            bail!("gateway status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// A running agent.
pub struct Agent {
    pub daemon: Daemon,
    pub config: PathBuf,
    /// The bound address of each `[[forward]]`, in config order.
    pub forwards: Vec<SocketAddr>,
}

/// The `[[gateway]]` table for an identity issued into `creds`.
pub fn gateway_table(name: &str, addr: SocketAddr, creds: &Path, identity: &str) -> String {
    format!(
        "[[gateway]]\nname = \"{name}\"\naddress = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        creds.join("ca.pem").display(),
        creds.join(format!("{identity}.pem")).display(),
        creds.join(format!("{identity}-key.pem")).display(),
    )
}

/// A `[[forward]]` table from a port the kernel picks to `to`.
pub fn forward_table(to: &str) -> String {
    format!("[[forward]]\nlisten = \"127.0.0.1:0\"\nto = \"{to}\"\n")
}

impl Agent {
    /// Writes `<dir>/agent.toml` from `body` and starts the agent; waits until every
    /// forward port is bound and, if `wait_connected`, a tunnel connection is up.
    pub fn start(dir: &Path, body: &str, wait_connected: bool) -> Result<Agent> {
        Agent::start_in(dir, body, wait_connected, None)
    }

    /// Starts the agent, inside network namespace `ns` if given.
    pub fn start_in(
        dir: &Path,
        body: &str,
        wait_connected: bool,
        ns: Option<&str>,
    ) -> Result<Agent> {
        fs::create_dir_all(dir)?;
        let config = dir.join("agent.toml");
        fs::write(
            &config,
            format!("control = \"agent.sock\"\nping_interval = 1\nping_timeout = 2\n{body}"),
        )?;
        let mut command = in_namespace(ns, bin("tunnel-agent"));
        command.arg("run").arg("--config").arg(&config);
        command.env("RUST_LOG", "info,tunnel_agent=debug");
        let mut daemon = Daemon::spawn("agent", command, dir.join("agent.log"))?;
        daemon.wait_log("agent ready", Duration::from_secs(20))?;
        let mut agent = Agent {
            daemon,
            config,
            forwards: Vec::new(),
        };
        let status = agent.status()?;
        agent.forwards = status["forwards"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(|f| f["listen"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if wait_connected {
            agent.wait_connected(Duration::from_secs(20))?;
        }
        Ok(agent)
    }

    pub fn status(&self) -> Result<Value> {
        let out = Command::new(bin("tunnel-agent"))
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()?;
        if !out.status.success() {
            bail!("agent status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The number of tunnel connections in state `up`.
    pub fn connections_up(&self) -> usize {
        self.status()
            .ok()
            .and_then(|s| {
                s["gateways"].as_array().map(|gs| {
                    gs.iter()
                        .flat_map(|g| g["connections"].as_array().cloned().unwrap_or_default())
                        .filter(|c| c["state"] == "up")
                        .count()
                })
            })
            .unwrap_or(0)
    }

    pub fn wait_connected(&self, limit: Duration) -> Result<()> {
        wait_for(limit, "a tunnel connection to be up", || {
            (self.connections_up() > 0).then_some(())
        })
        .map_err(|e| anyhow!("{e}\n--- agent log ---\n{}", self.daemon.log_text()))
    }

    /// The outcomes of recently ended streams, oldest first.
    pub fn recent_outcomes(&self) -> Vec<String> {
        self.status()
            .ok()
            .and_then(|s| {
                s["recent"].as_array().map(|r| {
                    r.iter()
                        .filter_map(|e| e["outcome"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

/// A loopback port that was free a moment ago, for servers that cannot report the
/// port they bound (redis-server). Prefer port 0 wherever the server can.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A byte stream that both ends can regenerate: xorshift64* over a seed.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `total` pattern bytes to `w`; returns their SHA-256.
pub fn send_pattern(w: &mut impl Write, seed: u64, total: u64) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hash.finalize().into())
}

/// Reads `r` to EOF; returns the byte count and SHA-256. A reset is an error, never
/// an early EOF.
pub fn drain_hash(r: &mut impl Read) -> std::io::Result<(u64, [u8; 32])> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Connects with a deadline on every read and write, so no test hangs.
pub fn connect(addr: SocketAddr, io_timeout: Duration) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(io_timeout)).expect("read timeout");
    s.set_write_timeout(Some(io_timeout))
        .expect("write timeout");
    s
}

/// A whole set-up on loopback: one gateway with `rules`, one agent (identity `alice`)
/// with a forward port to each of `forwards`.
pub struct Tunnel {
    // Dropped last: the daemons above it die before their files go.
    pub agent: Agent,
    pub gateway: Gateway,
    pub site: Site,
    pub creds: PathBuf,
}

impl Tunnel {
    pub fn start(rules: &str, forwards: &[&str]) -> Result<Tunnel> {
        Tunnel::start_routed(rules, forwards, &[])
    }

    /// Like [`Tunnel::start`], with a `[[route]]` to the gateway for `routes`.
    pub fn start_routed(rules: &str, forwards: &[&str], routes: &[&str]) -> Result<Tunnel> {
        let mut extra = String::new();
        for to in forwards {
            extra.push_str(&forward_table(to));
        }
        if !routes.is_empty() {
            extra.push_str(&route_table(routes));
        }
        Tunnel::start_with(rules, &extra)
    }

    /// A gateway with `rules` and an agent whose `agent.toml` is its `[[gateway]]`
    /// table followed by `agent_toml` (routes, forwards, settings).
    pub fn start_with(rules: &str, agent_toml: &str) -> Result<Tunnel> {
        let site = Site::new();
        let gw_dir = site.init_gateway("gateway");
        let creds = site.issue(&gw_dir, "alice", "alice");
        let gateway = Gateway::start(&gw_dir, rules)?;
        // Top-level keys first: TOML puts anything after a table header inside it.
        let (settings, tables) = match agent_toml.find("[[") {
            Some(at) => agent_toml.split_at(at),
            None => (agent_toml, ""),
        };
        let body = format!(
            "{settings}\n{}{tables}",
            gateway_table("site-b", gateway.addr, &creds, "alice")
        );
        let agent = Agent::start(&site.path("agent"), &body, true)?;
        Ok(Tunnel {
            agent,
            gateway,
            site,
            creds,
        })
    }

    pub fn forward(&self, index: usize) -> SocketAddr {
        self.agent.forwards[index]
    }

    /// `tunnel-run --config <agent.toml> -- program`: the real wrapper, using this
    /// tunnel's running agent.
    pub fn run(&self, program: &str) -> Command {
        let mut command = Command::new(bin("tunnel-run"));
        command
            .arg("--config")
            .arg(&self.agent.config)
            .arg("--")
            .arg(program);
        command
    }

    /// The live and recent streams the agent has seen, counted.
    pub fn streams_seen(&self) -> usize {
        self.agent
            .status()
            .map(|s| {
                s["recent"].as_array().map_or(0, Vec::len)
                    + s["streams"].as_array().map_or(0, Vec::len)
            })
            .unwrap_or(0)
    }
}

/// A `[[route]]` table sending `to` through the only gateway.
pub fn route_table(to: &[&str]) -> String {
    let list: Vec<String> = to.iter().map(|t| format!("\"{t}\"")).collect();
    format!("[[route]]\nto = [{}]\n", list.join(", "))
}

/// Runs a command to completion within `limit`; returns (exit code, stdout, stderr).
pub fn output_within(command: &mut Command, limit: Duration) -> (Option<i32>, String, String) {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) => (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        _ => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(id as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{command:?} did not finish within {limit:?}");
        }
    }
}

/// Runs a command that must succeed within `limit`; returns its stdout.
pub fn stdout_within(command: &mut Command, limit: Duration) -> String {
    let (code, out, err) = output_within(command, limit);
    assert_eq!(code, Some(0), "{command:?} failed:\n{out}\n{err}");
    out
}

/// An HTTP server (python's http.server) on `ip`, port chosen by the kernel; serves `dir`.
pub fn http_server(ip: &str, dir: &Path) -> (Daemon, SocketAddr) {
    let mut command = Command::new("python3");
    command
        .args(["-u", "-m", "http.server", "0", "--bind", ip, "--directory"])
        .arg(dir);
    let mut daemon =
        Daemon::spawn("http.server", command, dir.join("../http.log")).expect("python http.server");
    let rest = daemon
        .wait_log(" port ", Duration::from_secs(20))
        .expect("http.server started");
    let port: u16 = rest
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("http.server port");
    (daemon, SocketAddr::new(ip.parse().expect("ip"), port))
}

/// A TCP server on `ip` that answers every line with the same line, one thread per
/// connection, until the test ends.
pub fn echo_server(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind echo server");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Says loudly that a test needs root and did not run its checks.
pub fn needs_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "\n*** {test}: NOT RUN: needs root (network namespaces / other users); CI runs it as root ***\n"
    );
    true
}

/// An allow rule for `alice`.
pub fn allow_alice(to: &[&str]) -> String {
    let list: Vec<String> = to.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "\n[[allow]]\nidentity = \"alice\"\nto = [{}]\n",
        list.join(", ")
    )
}

/// A server that reads to EOF and answers with the SHA-256 of what it read.
pub fn hashing_sink() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                if let Ok((_, hash)) = drain_hash(&mut s) {
                    let _ = s.write_all(hex(&hash).as_bytes());
                }
            });
        }
    });
    addr
}

/// Sends `total` bytes in 1 MiB steps with a pause between them, half-closes, and
/// returns (what was sent, the sink's reply).
pub fn paced_upload(s: &mut TcpStream, total: u64, pause: Duration) -> ([u8; 32], String) {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut pattern = Pattern::new(9);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..total / buf.len() as u64 {
        pattern.fill(&mut buf);
        s.write_all(&buf).expect("upload");
        hash.update(&buf);
        std::thread::sleep(pause);
    }
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    (hash.finalize().into(), reply)
}

/// Compiles the C program `source` with gcc (and `flags`) into the site's directory.
pub fn compile_c(site: &Site, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    require("gcc", "gcc");
    let c = site.path(&format!("{name}.c"));
    fs::write(&c, source).expect("C source");
    let program = site.path(name);
    let built = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&program)
        .arg(&c)
        .output()
        .expect("gcc");
    assert!(
        built.status.success(),
        "gcc {flags:?} failed (is libc6-dev installed?): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    program
}

/// Waits until the agent's reverse connection carries callbacks (its gateway accepted
/// them).
pub fn wait_callbacks(agent: &Agent) {
    wait_for(Duration::from_secs(15), "callbacks to be accepted", || {
        let status = agent.status().ok()?;
        status["publications"]
            .as_array()?
            .iter()
            .any(|p| p["callbacks"].is_string())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.daemon.log_text()));
}

/// A gateway in `topology`'s gateway namespace and an agent in its client namespace
/// (as `alice`, the gateway named `site-b`), with `to` allowed at the gateway and routed
/// by the agent.
pub fn tunnel_across(topology: &netns::Topology, site: &Site, to: &[&str]) -> (Gateway, Agent) {
    let gw_dir = site.init_gateway_on("gateway", netns::GATEWAY_IP);
    let creds = site.issue(&gw_dir, "alice", "alice");
    let config = gw_dir.join("gateway.toml");
    let mut text = fs::read_to_string(&config).expect("gateway.toml");
    text.push_str(&allow_alice(to));
    fs::write(&config, text).expect("gateway.toml");
    let gateway = Gateway::run_in(&gw_dir, Some(&topology.gateway)).expect("gateway");
    let body = format!(
        "{}{}",
        gateway_table("site-b", gateway.addr, &creds, "alice"),
        route_table(to)
    );
    let agent =
        Agent::start_in(&site.path("agent"), &body, true, Some(&topology.client)).expect("agent");
    (gateway, agent)
}
