//! `init` and `issue`: the gateway's CA, its own certificate, a starter config, and
//! client certificates.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tunnel_proto::config::GatewayConfig;
use tunnel_proto::config::gateway::is_valid_identity;
use tunnel_transport::certs::Authority;

/// Writes `contents` to a new file, `0600` for keys; refuses to replace a file.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} already exists: remove it, or choose another directory",
                    path.display()
                )
            } else {
                format!("creating {}", path.display())
            }
        })?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

pub fn init(dir: &Path, name: &str, listen: &str, extra_names: &[String]) -> Result<PathBuf> {
    let listen_addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen `{listen}` is not ADDRESS:PORT, e.g. 0.0.0.0:7443"))?;
    let config_path = dir.join("gateway.toml");
    for existing in ["gateway.toml", "ca-key.pem"] {
        if dir.join(existing).exists() {
            bail!(
                "{} already exists: this directory holds a gateway already (use another --dir)",
                dir.join(existing).display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut names = vec![
        name.to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ];
    if !listen_addr.ip().is_unspecified() {
        names.push(listen_addr.ip().to_string());
    }
    names.extend(extra_names.iter().cloned());
    names.dedup();

    let (ca, ca_files) = Authority::generate(name)?;
    let server = ca.issue_server(&names, 397)?;
    write_new(&dir.join("ca.pem"), &ca_files.cert_pem, false)?;
    write_new(&dir.join("ca-key.pem"), &ca_files.key_pem, true)?;
    write_new(&dir.join("gateway.pem"), &server.cert_pem, false)?;
    write_new(&dir.join("gateway-key.pem"), &server.key_pem, true)?;
    let config = format!(
        r#"# tunnel-gateway configuration, written by `tunnel-gateway init`.
# Paths are relative to this file. Durations are in seconds.
listen = "{listen}"
ca = "ca.pem"
ca_key = "ca-key.pem"
cert = "gateway.pem"
key = "gateway-key.pem"
# connect_timeout = 10      # outbound connects to destinations
# drain_timeout = 30        # on SIGTERM, streams in flight get this long to finish
# control = "gateway.sock"  # where `tunnel-gateway status` asks
# Under load (see the README, "Under hostile load"):
# handshake_timeout = 10            # a client's time to finish its TLS handshake
# max_handshakes = 256              # connections waiting for a handshake, in all
# max_handshakes_per_source = 32    # ... from one address (IPv6: one /64)
# max_connections_per_identity = 128
# max_streams_per_identity = 4096
# log_summary_interval = 10         # repeated refusals: one line per peer per interval

# Nobody may reach anything until a rule says so. For example:
#
# [[allow]]
# identity = "alice"        # a client certificate's name (see `tunnel-gateway issue`), or "*"
# to = ["10.20.0.0/16", "*.site-b.internal:22", "db.site-b.internal:5432", "pg"]
#
# [service.pg]              # clients reach it by the name "pg"
# target = "db.site-b.internal:5432"
"#
    );
    write_new(&config_path, &config, false)?;
    // Proves the starter file is one we accept.
    GatewayConfig::parse(&config, &config_path)?;
    Ok(config_path)
}

pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub fn issue(config: &GatewayConfig, identity: &str, out: &Path, days: u32) -> Result<IssuedFiles> {
    if !is_valid_identity(identity) {
        bail!("--identity `{identity}`: use 1 to 64 letters, digits, . - _ @");
    }
    if !(1..=3650).contains(&days) {
        bail!("--days {days}: give 1 to 3650");
    }
    let read = |p: &Path| fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ca = Authority::load(&read(&config.ca)?, &read(&config.ca_key)?).with_context(|| {
        format!(
            "loading the CA from {} and {}",
            config.ca.display(),
            config.ca_key.display()
        )
    })?;
    let issued = ca.issue_client(identity, days)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let files = IssuedFiles {
        cert: out.join(format!("{identity}.pem")),
        key: out.join(format!("{identity}-key.pem")),
        ca: out.join("ca.pem"),
    };
    write_new(&files.cert, &issued.cert_pem, false)?;
    write_new(&files.key, &issued.key_pem, true)?;
    if !files.ca.exists() {
        write_new(&files.ca, &ca.cert_pem, false)?;
    }
    Ok(files)
}

/// Where a gateway's files live when no `--dir` or `--config` is given.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tunnel").join("gateway")
}

/// An address that an agent on this machine can use to reach `listen`.
pub fn reachable(listen: SocketAddr) -> String {
    match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => format!("127.0.0.1:{}", listen.port()),
        IpAddr::V6(v6) if v6.is_unspecified() => format!("[::1]:{}", listen.port()),
        _ => listen.to_string(),
    }
}
