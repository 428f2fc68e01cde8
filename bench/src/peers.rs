//! Established peers of the tunnel, set up on loopback so they can be measured beside it:
//! `ssh -L`, a stunnel pair, a socat relay, and proxychains4 through `ssh -D`.
//!
//! Every path runs in a private temp dir (keys, configs, one log per process) and owns its
//! processes: they are killed (SIGKILL, by PID) and reaped when the path is dropped. Nothing here
//! touches system-wide state except `/run/sshd`, which sshd needs when started as root.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a started process gets to open its listening socket (sshd and ssh included:
/// the ssh client listens only after it has authenticated, possibly across a slow WAN relay).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a one-shot setup tool (ssh-keygen, openssl) may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a dropped path's sshd or socat gets to reap its per-connection children.
const CHILDREN_GRACE: Duration = Duration::from_secs(2);
/// How often the bounded waits look again.
const POLL: Duration = Duration::from_millis(20);
/// How much of a log goes into an error message.
const LOG_TAIL_LINES: usize = 20;

/// Processes of one peer path; killed (SIGKILL) and reaped on drop, and its temp dir removed.
#[derive(Debug)]
pub struct PeerPath {
    /// Where the benchmark client connects (for proxychains: the destination itself).
    pub entry: SocketAddr,
    /// A command prefix the client must run under (empty, or e.g. ["proxychains4", "-q", "-f", "/tmp/x/proxychains.conf"]).
    pub wrapper: Vec<String>,
    /// Held only to be dropped with the path.
    _procs: Procs,
}

pub type Wan<'a> = Option<&'a dyn Fn(SocketAddr) -> anyhow::Result<SocketAddr>>;

/// Why a peer could not be measured: the program is missing (name the Debian package), or it failed to start (say how, with the last lines of its log).
#[derive(Debug)]
pub enum PeerError {
    Missing { program: String, package: String },
    Failed(String),
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Missing { program, package } => {
                write!(f, "{program} is not installed (Debian package {package})")
            }
            PeerError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PeerError {}

/// `ssh -N -L entry:destination` to a private sshd on loopback (WAN leg: between ssh and sshd).
pub fn ssh_forward(destination: SocketAddr, wan: Wan<'_>) -> Result<PeerPath, PeerError> {
    let port = free_port()?;
    let procs = ssh_tunnel("peer-ssh-", wan, Forward::Local { port, destination })?;
    Ok(PeerPath {
        entry: loopback(port),
        wrapper: Vec::new(),
        _procs: procs,
    })
}

/// `ssh -N -R port:destination` to a private sshd on loopback: the listening port is at
/// the sshd's side, the destination at the ssh client's, as for a published service
/// (WAN leg: between ssh and sshd).
pub fn ssh_reverse(destination: SocketAddr, wan: Wan<'_>) -> Result<PeerPath, PeerError> {
    let port = free_port()?;
    let procs = ssh_tunnel("peer-ssh-r-", wan, Forward::Remote { port, destination })?;
    Ok(PeerPath {
        entry: loopback(port),
        wrapper: Vec::new(),
        _procs: procs,
    })
}

/// stunnel client (plain in, TLS out) and stunnel server (TLS in, plain to destination) (WAN leg: between the two stunnels).
pub fn stunnel_pair(destination: SocketAddr, wan: Wan<'_>) -> Result<PeerPath, PeerError> {
    // Debian names the binary stunnel4; other builds call it stunnel.
    let stunnel = require("stunnel4", "stunnel4")
        .or_else(|missing| require("stunnel", "stunnel4").map_err(|_| missing))?;
    let openssl = require("openssl", "openssl")?;
    let mut procs = Procs::new("peer-stunnel-")?;

    let cert = procs.file("cert.pem");
    let key = procs.file("key.pem");
    procs.run(
        &openssl,
        "openssl",
        [
            OsStr::new("req"),
            OsStr::new("-x509"),
            OsStr::new("-newkey"),
            OsStr::new("ec"),
            OsStr::new("-pkeyopt"),
            OsStr::new("ec_paramgen_curve:prime256v1"),
            OsStr::new("-nodes"),
            OsStr::new("-days"),
            OsStr::new("2"),
            OsStr::new("-subj"),
            OsStr::new("/CN=localhost"),
            OsStr::new("-keyout"),
            key.as_os_str(),
            OsStr::new("-out"),
            cert.as_os_str(),
        ],
    )?;

    // `foreground` keeps stunnel attached (so its PID is the one we kill) and logging to
    // stderr, which goes to its log file; an empty `pid` writes no pid file; `debug = 3`
    // (errors only) keeps the log small. stunnel leaves Nagle on unless told.
    let server_port = free_port()?;
    let server_conf = procs.write(
        "server.conf",
        &format!(
            "foreground = yes\npid =\ndebug = 3\n\n[srv]\naccept = 127.0.0.1:{server_port}\n\
             connect = {destination}\ncert = {}\nkey = {}\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
            cert.display(),
            key.display(),
        ),
    )?;
    procs.start_listening("stunnel server", &stunnel, [&server_conf], server_port)?;

    let upstream = through_wan(wan, loopback(server_port))?;
    let client_port = free_port()?;
    let client_conf = procs.write(
        "client.conf",
        &format!(
            "foreground = yes\npid =\ndebug = 3\n\n[cli]\nclient = yes\n\
             accept = 127.0.0.1:{client_port}\nconnect = {upstream}\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
        ),
    )?;
    procs.start_listening("stunnel client", &stunnel, [&client_conf], client_port)?;

    Ok(PeerPath {
        entry: loopback(client_port),
        wrapper: Vec::new(),
        _procs: procs,
    })
}

/// socat TCP-LISTEN,fork relay to the destination (WAN leg: between socat and the destination).
pub fn socat_relay(destination: SocketAddr, wan: Wan<'_>) -> Result<PeerPath, PeerError> {
    let socat = require("socat", "socat")?;
    let mut procs = Procs::new("peer-socat-")?;
    let upstream = through_wan(wan, destination)?;
    let port = free_port()?;
    procs.start_listening(
        "socat",
        &socat,
        [
            format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay"),
            format!("TCP:{upstream},nodelay"),
        ],
        port,
    )?;
    Ok(PeerPath {
        entry: loopback(port),
        wrapper: Vec::new(),
        _procs: procs,
    })
}

/// proxychains4 (LD_PRELOAD) through `ssh -D` to the private sshd (WAN leg: between ssh and sshd). entry = destination; wrapper = proxychains4 command prefix.
pub fn proxychains_ssh(destination: SocketAddr, wan: Wan<'_>) -> Result<PeerPath, PeerError> {
    // Checked first so a missing proxychains4 costs no sshd start-up.
    require("proxychains4", "proxychains4")?;
    let port = free_port()?;
    let procs = ssh_tunnel("peer-proxychains-", wan, Forward::Dynamic { port })?;
    let conf = procs.write(
        "proxychains.conf",
        &format!(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n\
             [ProxyList]\nsocks5 127.0.0.1 {port}\n"
        ),
    )?;
    Ok(PeerPath {
        entry: destination,
        wrapper: vec![
            "proxychains4".to_owned(),
            "-q".to_owned(),
            "-f".to_owned(),
            conf.display().to_string(),
        ],
        _procs: procs,
    })
}

/// What the ssh client offers on its local listening port.
enum Forward {
    /// `-L`: a plain port forwarded to `destination`.
    Local { port: u16, destination: SocketAddr },
    /// `-D`: a SOCKS proxy.
    Dynamic { port: u16 },
    /// `-R`: a port at the sshd's side forwarded back to `destination`.
    Remote { port: u16, destination: SocketAddr },
}

/// A private sshd on loopback and an `ssh -N` client logged into it with `forward`; the
/// WAN relay, if any, sits between the two.
fn ssh_tunnel(prefix: &str, wan: Wan<'_>, forward: Forward) -> Result<Procs, PeerError> {
    let sshd = require("sshd", "openssh-server")?;
    let ssh = require("ssh", "openssh-client")?;
    let keygen = require("ssh-keygen", "openssh-client")?;
    let user = current_user()?;
    let root = is_root();
    let mut procs = Procs::new(prefix)?;

    let host_key = procs.file("hostkey");
    let client_key = procs.file("clientkey");
    for key in [&host_key, &client_key] {
        procs.run(
            &keygen,
            "ssh-keygen",
            [
                OsStr::new("-t"),
                OsStr::new("ed25519"),
                OsStr::new("-N"),
                OsStr::new(""),
                OsStr::new("-C"),
                OsStr::new(""),
                OsStr::new("-q"),
                OsStr::new("-f"),
                key.as_os_str(),
            ],
        )?;
    }
    let public = fs::read_to_string(client_key.with_extension("pub"))
        .map_err(|e| failed("reading the client's public key", e))?;
    let authorized_keys = procs.write("authorized_keys", &public)?;

    if root {
        // sshd running as root chroots its pre-auth child into this directory; a container
        // that never started the system sshd does not have it.
        privsep_dir()?;
    }
    // StrictModes off: the temp dir's owner and modes are not sshd's business. UsePAM off:
    // PAM needs root and would apply the system's session policy. `AllowUsers` keeps the
    // key usable only for the account it was made for. LogLevel INFO (not ERROR) so that a
    // refused login ("account is locked", "not allowed because ...") shows in the error we
    // return; it adds only a line or two per connection, and the client connects once.
    let sshd_port = free_port()?;
    let config = procs.write(
        "sshd_config",
        &format!(
            "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             AllowUsers {user}\nAuthenticationMethods publickey\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\nAllowTcpForwarding yes\nPermitTTY no\n\
             X11Forwarding no\nAllowAgentForwarding no\nPrintMotd no\nUseDNS no\n\
             PermitRootLogin prohibit-password\nLogLevel INFO\n",
            host_key.display(),
            authorized_keys.display(),
        ),
    )?;
    // `-D` keeps sshd in the foreground so its PID is ours to kill; `-e` logs to stderr.
    // sshd re-executes itself per connection, which is why it needs its absolute path.
    procs.start_listening(
        "sshd",
        &sshd,
        [
            OsStr::new("-D"),
            OsStr::new("-e"),
            OsStr::new("-f"),
            config.as_os_str(),
        ],
        sshd_port,
    )?;

    let server = through_wan(wan, loopback(sshd_port))?;
    let (flag, spec, port) = match forward {
        Forward::Local { port, destination } => {
            ("-L", format!("127.0.0.1:{port}:{destination}"), port)
        }
        Forward::Dynamic { port } => ("-D", format!("127.0.0.1:{port}"), port),
        Forward::Remote { port, destination } => {
            ("-R", format!("127.0.0.1:{port}:{destination}"), port)
        }
    };
    // No config file, no agent, no known-hosts file: the user's own ssh setup must not
    // change what is measured, nor be changed by it.
    let mut args: Vec<&OsStr> = vec![OsStr::new("-N"), OsStr::new("-F"), OsStr::new("/dev/null")];
    args.extend([OsStr::new("-i"), client_key.as_os_str()]);
    for option in [
        "BatchMode=yes",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "ExitOnForwardFailure=yes",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "ConnectTimeout=10",
        "LogLevel=ERROR",
    ] {
        args.extend([OsStr::new("-o"), OsStr::new(option)]);
    }
    let server_port = server.port().to_string();
    let login = format!("{user}@{}", server.ip());
    args.extend([
        OsStr::new("-p"),
        OsStr::new(&server_port),
        OsStr::new(flag),
        OsStr::new(&spec),
        OsStr::new(&login),
    ]);
    let remote = matches!(forward, Forward::Remote { .. });
    procs.start_until_listening("ssh", &ssh, args, port, remote)?;
    Ok(procs)
}

/// An installed program, with the Debian package to name if it turns out to be missing.
struct Program {
    path: PathBuf,
    name: &'static str,
    package: &'static str,
}

/// Finds `name` on PATH, or in the sbin directories a non-root PATH usually lacks (sshd).
fn require(name: &'static str, package: &'static str) -> Result<Program, PeerError> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|path| Program {
            path,
            name,
            package,
        })
        .ok_or_else(|| PeerError::Missing {
            program: name.to_owned(),
            package: package.to_owned(),
        })
}

/// The processes of one path and the temp dir holding their keys, configs and logs.
#[derive(Debug)]
struct Procs {
    dir: tempfile::TempDir,
    /// In start order; killed in reverse so clients go before the servers they use
    /// (an sshd connection child then sees EOF and exits instead of lingering).
    running: Vec<Running>,
}

#[derive(Debug)]
struct Running {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Running {
    /// Waits (bounded) until the process listens on 127.0.0.1:`port`; if it exits or
    /// never does, says so.
    /// Waits until the process listens on 127.0.0.1:`port`; with `owned_elsewhere`, until
    /// any process does (`ssh -R`: the port is sshd's, not the client's).
    fn await_listener(&mut self, port: u16, owned_elsewhere: bool) -> Result<(), String> {
        let name = self.name;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(format!(
                        "{name} exited ({status}) before listening on 127.0.0.1:{port}"
                    ));
                }
                Err(e) => return Err(format!("waiting for {name}: {e}")),
                Ok(None) => {}
            }
            let owner = (!owned_elsewhere).then(|| self.child.id());
            match listens(owner, port) {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(false) => {
                    return Err(format!(
                        "{name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:?}"
                    ));
                }
                Err(e) => return Err(format!("checking whether {name} listens: {e}")),
            }
        }
    }
}

impl Procs {
    fn new(prefix: &str) -> Result<Self, PeerError> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(|e| failed("creating a temp dir", e))?;
        Ok(Procs {
            dir,
            running: Vec::new(),
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) -> Result<PathBuf, PeerError> {
        let path = self.file(name);
        fs::write(&path, contents)
            .map_err(|e| failed(&format!("writing {}", path.display()), e))?;
        Ok(path)
    }

    /// Starts `program` with its stdout and stderr in `<name>.log` in the temp dir.
    fn spawn<I, S>(
        &self,
        program: &Program,
        name: &str,
        args: I,
    ) -> Result<(Child, PathBuf), PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log = self.file(&format!("{}.log", name.replace(' ', "-")));
        let out =
            File::create(&log).map_err(|e| failed(&format!("creating {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| failed("duplicating a log file handle", e))?;
        let child = Command::new(&program.path)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => PeerError::Missing {
                    program: program.name.to_owned(),
                    package: program.package.to_owned(),
                },
                _ => failed(&format!("starting {}", program.path.display()), e),
            })?;
        Ok((child, log))
    }

    /// Runs a setup tool to completion; fails if it fails or overruns [`TOOL_TIMEOUT`].
    fn run<I, S>(&self, program: &Program, name: &str, args: I) -> Result<(), PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut child, log) = self.spawn(program, name, args)?;
        let deadline = Instant::now() + TOOL_TIMEOUT;
        let why = loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => break format!("{name} failed ({status})"),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => break format!("{name} did not finish within {TOOL_TIMEOUT:?}"),
                Err(e) => break format!("waiting for {name}: {e}"),
            }
        };
        // A no-op if it has exited: std does not signal a child it has already reaped.
        let _ = child.kill();
        let _ = child.wait();
        Err(PeerError::Failed(format!("{why}{}", tail(&log))))
    }

    /// Starts a long-running process and waits (bounded) until it listens on
    /// 127.0.0.1:`port`. On failure, the error carries the tails of this path's logs.
    fn start_listening<I, S>(
        &mut self,
        name: &'static str,
        program: &Program,
        args: I,
        port: u16,
    ) -> Result<(), PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.start_until_listening(name, program, args, port, false)
    }

    /// As [`Procs::start_listening`]; with `owned_elsewhere`, the listener may be any
    /// process's (an `ssh -R` port is opened by the sshd it logged into).
    fn start_until_listening<I, S>(
        &mut self,
        name: &'static str,
        program: &Program,
        args: I,
        port: u16,
        owned_elsewhere: bool,
    ) -> Result<(), PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (child, log) = self.spawn(program, name, args)?;
        let mut started = Running { name, child, log };
        let outcome = started.await_listener(port, owned_elsewhere);
        // Kept for killing (on drop) whether or not it came up.
        self.running.push(started);
        outcome.map_err(|why| PeerError::Failed(format!("{why}{}", self.logs())))
    }

    /// The tails of every non-empty log of this path: when the ssh client fails to log in,
    /// the reason is usually in sshd's log, not in its own.
    fn logs(&self) -> String {
        self.running
            .iter()
            .rev()
            .map(|r| (r.name, tail(&r.log)))
            .filter(|(_, text)| !text.is_empty())
            .map(|(name, text)| format!("\n--- {name} log:{text}"))
            .collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for running in self.running.iter_mut().rev() {
            // sshd and socat fork a child per connection. Once the processes started after
            // them are gone, those children see their peer hang up and exit; give them a
            // moment so the parent reaps them, instead of leaving them orphaned (and, under
            // an init that does not reap, as zombies).
            let deadline = Instant::now() + CHILDREN_GRACE;
            while has_children(running.child.id()) && Instant::now() < deadline {
                thread::sleep(POLL);
            }
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// Whether a process has children (live or not yet reaped). False if /proc cannot tell.
fn has_children(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        fs::read_to_string(task.path().join("children")).is_ok_and(|list| !list.trim().is_empty())
    })
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port`.
///
/// Read from /proc rather than probed with a connection: a probe through a forwarder
/// (ssh -L, socat, stunnel) would reach the destination server as a stray client. The
/// socket's owner is checked too, so another program that grabbed the port in the
/// moment between [`free_port`] and our process binding it is not mistaken for ours.
fn listens(pid: Option<u32>, port: u16) -> io::Result<bool> {
    const LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    // The kernel lists listening sockets before all others (it walks the listening hash,
    // then the established one) and renders the table as it is read, so stop at the first
    // other state: behind it can be tens of thousands of TIME_WAIT sockets left by earlier
    // measurements, costly to render and parse on every poll.
    for line in BufReader::new(File::open("/proc/net/tcp")?).lines().skip(1) {
        let line = line?;
        // sl local_address rem_address st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
        let mut fields = line.split_whitespace();
        let (Some(local), Some(state), Some(inode)) = (fields.nth(1), fields.nth(1), fields.nth(5))
        else {
            continue;
        };
        if state != LISTEN {
            break;
        }
        let Some((ip, local_port)) = local.split_once(':') else {
            continue;
        };
        // The kernel prints the network-order address as a native integer.
        let ip = u32::from_str_radix(ip, 16).map(|ip| Ipv4Addr::from(ip.to_ne_bytes()));
        if ip == Ok(Ipv4Addr::LOCALHOST) && u16::from_str_radix(local_port, 16) == Ok(port) {
            inodes.push(format!("socket:[{inode}]"));
        }
    }
    if inodes.is_empty() {
        return Ok(false);
    }
    let Some(pid) = pid else {
        return Ok(true);
    };
    let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(fds) => fds,
        // Not allowed to look (hardened /proc): the listener is there, trust it is ours.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(true),
        Err(e) => return Err(e),
    };
    let owned = fds.filter_map(Result::ok).any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == inode.as_str())
        })
    });
    Ok(owned)
}

/// A port that is free on loopback right now (the OS picks it; we release it for the
/// process that is about to bind it).
fn free_port() -> Result<u16, PeerError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("finding a free loopback port", e))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Where to connect to reach `upstream`: through a new WAN relay if one is wanted.
fn through_wan(wan: Wan<'_>, upstream: SocketAddr) -> Result<SocketAddr, PeerError> {
    match wan {
        Some(start_relay) => start_relay(upstream).map_err(|e| {
            PeerError::Failed(format!("starting the WAN relay towards {upstream}: {e:#}"))
        }),
        None => Ok(upstream),
    }
}

/// The account ssh logs into: sshd run by a non-root user can only log that same user in,
/// and sshd run as root must not log in anyone else. `id -un` names the effective user;
/// $USER is only the fallback, as it can be stale (e.g. after `su` or `sudo -E`).
fn current_user() -> Result<String, PeerError> {
    let from_id = Command::new("id")
        .arg("-un")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty());
    from_id
        .or_else(|| std::env::var("USER").ok().filter(|name| !name.is_empty()))
        .ok_or_else(|| {
            PeerError::Failed(
                "cannot tell the current user name (`id -un` failed and $USER is unset)".to_owned(),
            )
        })
}

/// Whether we run as root: /proc/self belongs to the effective user (no unsafe libc call).
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Creates sshd's privilege-separation directory if it is missing.
fn privsep_dir() -> Result<(), PeerError> {
    let dir = Path::new("/run/sshd");
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| {
            failed(
                "creating /run/sshd (sshd's privilege-separation directory)",
                e,
            )
        })
}

fn failed(what: &str, e: io::Error) -> PeerError {
    PeerError::Failed(format!("{what}: {e}"))
}

/// The last lines of a log, as a suffix for an error message (empty if the log is).
fn tail(log: &Path) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let last = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    if last.is_empty() {
        String::new()
    } else {
        format!("\n{}", last.join("\n"))
    }
}
