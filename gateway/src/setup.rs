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
use tunnel_transport::certs::{CertInfo, utc};

use crate::authority::Authority;

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
# Identities (see the README, "Identities"); durations as 30s, 15m, 24h, 7d:
# cert_ttl = "24h"           # lifetime of the certificates enrolment and renewal issue
# recovery_window = "7d"     # an expired certificate may still renew this long
# state_dir = "state"        # tokens, enrolled identities, revocations

# Nobody may reach anything until a rule says so. For example:
#
# [[allow]]
# identity = "alice"        # an identity (`tunnel-gateway token --identity`), "group:NAME", or "*"
# to = ["10.20.0.0/16", "*.site-b.internal:22", "db.site-b.internal:5432", "pg"]
#
# [service.pg]              # clients reach it by the name "pg"
# target = "db.site-b.internal:5432"
#
# Inside-out: a service an agent publishes from its own site (its [[publish]])...
#
# [publish.lab-db]
# by = ["alice"]             # identities or group:NAME that may publish it
# reach = ["bob"]            # whose agents may reach it by name
# listen = "0.0.0.0:15432"   # optional: a port at this site...
# from = ["10.20.0.0/16"]    # ...and the sources admitted there
#
# ...and listeners that programs under the tunnel open here (their agent's [[callback]]):
#
# [callbacks]
# address = "203.0.113.7"    # this gateway's address as the far site sees it
# ports = "62000-62100"      # outside net.ipv4.ip_local_port_range, or reserved
# for = ["alice"]
"#
    );
    write_new(&config_path, &config, false)?;
    // Proves the starter file is one we accept.
    GatewayConfig::parse(&config, &config_path)?;
    Ok(config_path)
}

/// What `init` says of the address the gateway will listen on: every address of this
/// host, for an unspecified one, so nobody is surprised by a port open on all of them.
pub fn listening_on(listen: &str) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => format!(
            "it listens on every address of this host, port {} (listen = \"{addr}\"; give --listen ADDRESS:PORT, or edit listen, for one address only)",
            addr.port()
        ),
        _ => format!("it listens on {listen}"),
    }
}

pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// When the certificate stops being valid (seconds since 1970).
    pub not_after: i64,
}

pub fn issue(
    config: &GatewayConfig,
    identity: &str,
    out: &Path,
    lifetime: std::time::Duration,
) -> Result<IssuedFiles> {
    if !is_valid_identity(identity) {
        bail!("--identity `{identity}`: use 1 to 64 letters, digits, . - _ @");
    }
    if lifetime.as_secs() < 5 || lifetime.as_secs() > 3650 * 86_400 {
        bail!("the lifetime (--days or --ttl) must be 5s to 3650d");
    }
    let read = |p: &Path| fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ca = Authority::load(&read(&config.ca)?, &read(&config.ca_key)?).with_context(|| {
        format!(
            "loading the CA from {} and {}",
            config.ca.display(),
            config.ca_key.display()
        )
    })?;
    let issued = ca.issue_client(identity, lifetime)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let not_after = CertInfo::parse_pem(&issued.cert_pem)?.not_after;
    let files = IssuedFiles {
        cert: out.join(format!("{identity}.pem")),
        key: out.join(format!("{identity}-key.pem")),
        ca: out.join("ca.pem"),
        not_after,
    };
    // A ca.pem already there must be this CA's: the agent would trust the wrong one.
    if files.ca.exists() {
        let there = read(&files.ca)?;
        if there.trim() != ca.cert_pem.trim() {
            bail!(
                "{} holds another CA's certificate: give --out a directory of its own for this gateway",
                files.ca.display()
            );
        }
    }
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

/// Where agents should dial this gateway, as far as its config and certificate tell,
/// and what the operator must still do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAddress {
    /// `host:port` for the agent's `address` (`HOST` or `PORT` where unknown).
    pub address: String,
    /// A `server_name` the agent needs, when no name agents dial is in the certificate.
    pub server_name: Option<String>,
    /// What to edit, and why; `None` when the address is complete.
    pub edit: Option<String>,
}

/// `listen` from gateway.toml (`config` names it in messages), and `names`, the DNS
/// names and addresses in gateway.pem, the first being `init --name`.
pub fn agent_address(listen: SocketAddr, names: &[String], config: &Path) -> AgentAddress {
    let port = match listen.port() {
        0 => "PORT".to_string(),
        port => port.to_string(),
    };
    let host_port = |host: &str| match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    // A name agents elsewhere can dial: a DNS name other than localhost, else an
    // address that is not loopback.
    let dns = names
        .iter()
        .find(|n| n.parse::<IpAddr>().is_err() && n.as_str() != "localhost");
    let ip = names
        .iter()
        .filter_map(|n| n.parse::<IpAddr>().ok())
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified());
    let mut edits = Vec::new();
    let mut server_name = None;
    let address = if listen.ip().is_loopback() {
        edits.push(format!(
            "listen = \"{listen}\" in {} is a loopback address, so only agents on this machine reach the gateway; for others, set listen to \"0.0.0.0:{port}\" (or an address of this machine) and restart it",
            config.display()
        ));
        host_port(&listen.ip().to_string())
    } else if let Some(dns) = dns {
        host_port(dns)
    } else if !listen.ip().is_unspecified() {
        host_port(&listen.ip().to_string())
    } else if let Some(ip) = ip {
        host_port(&ip.to_string())
    } else {
        edits.push(format!(
            "the gateway listens on every address ({listen}) and its certificate names no address agents elsewhere can dial ({}): put the host name or address agents reach this machine at in place of HOST; server_name below makes them accept the certificate",
            names.join(", ")
        ));
        server_name = Some("localhost".to_string());
        host_port("HOST")
    };
    if listen.port() == 0 {
        edits.push(format!(
            "listen in {} has port 0, so the gateway picks a new port each time it starts (its log says `listening on ADDRESS:PORT`): put a fixed port in listen, and that port in place of PORT",
            config.display()
        ));
    }
    AgentAddress {
        address,
        server_name,
        edit: (!edits.is_empty()).then(|| edits.join("; ")),
    }
}

/// The `name` an agent gives this gateway: its DNS name made one word, else "gateway".
pub fn agent_name(names: &[String]) -> String {
    let word: String = names
        .iter()
        .find(|n| n.parse::<IpAddr>().is_err() && n.as_str() != "localhost")
        .map(|n| {
            n.chars()
                .map(|c| if c == '.' { '-' } else { c })
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect()
        })
        .unwrap_or_default();
    if tunnel_proto::target::is_valid_service_name(&word) {
        word
    } else {
        "gateway".into()
    }
}

/// What `tunnel-gateway issue` prints: the files, where they go, and the `[[gateway]]`
/// table for the agent, with what (if anything) must still be edited.
pub fn issue_report(
    config: &GatewayConfig,
    config_path: &Path,
    identity: &str,
    files: &IssuedFiles,
) -> Result<String> {
    let gateway_cert = tunnel_transport::tls::load_certs(&config.cert)?;
    let names = gateway_cert
        .first()
        .map(|der| CertInfo::parse(der))
        .transpose()
        .with_context(|| format!("reading {}", config.cert.display()))?
        .map(|info| info.names)
        .unwrap_or_default();
    let address = agent_address(config.listen, &names, config_path);
    let file_name = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let (ca, cert, key) = (
        file_name(&files.ca),
        file_name(&files.cert),
        file_name(&files.key),
    );
    let mut out = format!(
        "wrote {}, {} and {} (`{identity}`, valid until {})\n\n",
        files.cert.display(),
        files.key.display(),
        files.ca.display(),
        utc(files.not_after)
    );
    out.push_str(&format!(
        "Hand these three files to the user of `{identity}` ({key} is secret; the CA's key stays here).\n\
         On the agent's machine, put them in the directory of agent.toml (by default\n\
         ~/.config/tunnel/) and add this table to agent.toml:\n\n"
    ));
    out.push_str("[[gateway]]\n");
    out.push_str(&format!(
        "name = \"{}\"    # any one word: [[route]] and [[forward]] name it in `via`\n",
        agent_name(&names)
    ));
    match &address.edit {
        Some(_) => out.push_str(&format!(
            "address = \"{}\"    # EDIT: see below\n",
            address.address
        )),
        None => out.push_str(&format!("address = \"{}\"\n", address.address)),
    }
    if let Some(server_name) = &address.server_name {
        out.push_str(&format!(
            "server_name = \"{server_name}\"    # a name in this gateway's certificate\n"
        ));
    }
    out.push_str(&format!(
        "ca = \"{ca}\"    # paths are taken from agent.toml's directory\ncert = \"{cert}\"\nkey = \"{key}\"\n\n"
    ));
    out.push_str(
        "Paths to edit: ca, cert and key, if the three files go anywhere but beside agent.toml.\n",
    );
    if let Some(edit) = &address.edit {
        out.push_str(&format!("Address to edit: {edit}.\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_says_when_it_listens_on_every_address() {
        assert!(
            listening_on("0.0.0.0:7443")
                .starts_with("it listens on every address of this host, port 7443")
        );
        assert!(listening_on("[::]:7443").contains("every address"));
        assert_eq!(listening_on("10.0.0.1:7443"), "it listens on 10.0.0.1:7443");
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    fn address(listen: &str, list: &[&str]) -> AgentAddress {
        agent_address(
            listen.parse().expect("listen"),
            &names(list),
            Path::new("/etc/tunnel/gateway/gateway.toml"),
        )
    }

    #[test]
    fn a_wildcard_listen_takes_the_gateways_dns_name() {
        let a = address(
            "0.0.0.0:7443",
            &["gw.site-b.example.org", "localhost", "127.0.0.1", "::1"],
        );
        assert_eq!(a.address, "gw.site-b.example.org:7443");
        assert_eq!((a.server_name, a.edit), (None, None));
    }

    #[test]
    fn a_wildcard_listen_without_a_usable_name_asks_for_the_host() {
        let a = address("[::]:7443", &["localhost", "127.0.0.1", "::1"]);
        assert_eq!(a.address, "HOST:7443");
        assert_eq!(a.server_name.as_deref(), Some("localhost"));
        let edit = a.edit.expect("an edit");
        assert!(
            edit.contains("listens on every address ([::]:7443)") && edit.contains("HOST"),
            "{edit}"
        );
    }

    #[test]
    fn a_wildcard_listen_takes_an_address_the_certificate_names() {
        let a = address("0.0.0.0:7443", &["localhost", "127.0.0.1", "10.1.2.3"]);
        assert_eq!(a.address, "10.1.2.3:7443");
        assert_eq!(a.edit, None);
    }

    #[test]
    fn a_specific_listen_address_is_used_and_ipv6_is_bracketed() {
        let a = address("[fd00::5]:7443", &["localhost", "fd00::5"]);
        assert_eq!(a.address, "[fd00::5]:7443");
        assert_eq!(a.edit, None);
    }

    #[test]
    fn loopback_and_port_zero_say_what_to_change_in_gateway_toml() {
        let a = address("127.0.0.1:0", &["localhost", "127.0.0.1"]);
        assert_eq!(a.address, "127.0.0.1:PORT");
        let edit = a.edit.expect("an edit");
        assert!(
            edit.contains("/etc/tunnel/gateway/gateway.toml is a loopback address")
                && edit.contains("has port 0"),
            "{edit}"
        );
    }

    #[test]
    fn the_agents_name_for_the_gateway_is_one_word() {
        assert_eq!(
            agent_name(&names(&["gw.site-b.example.org", "localhost"])),
            "gw-site-b-example-org"
        );
        assert_eq!(agent_name(&names(&["localhost", "127.0.0.1"])), "gateway");
        assert_eq!(agent_name(&names(&["site-b"])), "site-b");
    }
}
