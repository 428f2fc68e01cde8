//! Saying what is wrong: status never shows a stale error beside a live connection, a
//! stream does not wait out a backoff, certificates that cannot work are named as such,
//! a full synthetic-name pool says so, and `tunnel-gateway issue` says what to write.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tunnel_tests::*;

/// Every connection slot of every gateway in an agent's status.
fn slots(status: &Value) -> Vec<Value> {
    status["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["connections"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Sends a line through `addr` and reads it back.
fn echo_once(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping\n");
    Ok(())
}

#[test]
fn a_connection_that_is_up_again_shows_no_error_of_the_one_before() {
    let echo = echo_server("127.0.0.1").to_string();
    let mut tunnel = Tunnel::start(&allow_alice(&[&echo]), &[&echo]).expect("tunnel");
    tunnel.gateway.pin_port().expect("pin port");
    tunnel.gateway.daemon.signal(Signal::SIGKILL);
    wait_for(
        Duration::from_secs(10),
        "every connection in backoff with the reason",
        || {
            let status = tunnel.agent.status().ok()?;
            let slots = slots(&status);
            (!slots.is_empty()
                && slots
                    .iter()
                    .all(|c| c["state"] == "backoff" && c["error"].as_str().is_some()))
            .then_some(())
        },
    )
    .expect("status after the gateway died");

    let gw_dir = tunnel.site.path("gateway");
    tunnel.gateway = Gateway::run(&gw_dir).expect("gateway restarts on the same port");
    wait_for(Duration::from_secs(30), "every connection up again", || {
        let status = tunnel.agent.status().ok()?;
        let slots = slots(&status);
        (!slots.is_empty() && slots.iter().all(|c| c["state"] == "up")).then_some(())
    })
    .expect("reconnect");
    let status = tunnel.agent.status().expect("status");
    for slot in slots(&status) {
        assert!(
            slot["error"].is_null(),
            "a connection that is up shows an error of the one before it: {slot}"
        );
    }
    let text = run_ok(
        std::process::Command::new(bin("tunnel-agent"))
            .args(["status", "--config"])
            .arg(&tunnel.agent.config),
    );
    assert!(
        !text.contains("refused") && !text.contains("error"),
        "status text shows a stale error beside live connections:\n{text}"
    );
    echo_once(tunnel.forward(0)).expect("a stream through the reconnected tunnel");
}

#[test]
fn a_stream_that_arrives_during_a_long_backoff_dials_at_once() {
    let echo = echo_server("127.0.0.1").to_string();
    let mut tunnel = Tunnel::start(&allow_alice(&[&echo]), &[&echo]).expect("tunnel");
    tunnel.gateway.pin_port().expect("pin port");
    tunnel.gateway.daemon.signal(Signal::SIGKILL);
    // Each refused dial doubles the pause; wait until every connection has a long one.
    wait_for(
        Duration::from_secs(40),
        "every connection in a backoff of 5s or more",
        || {
            let status = tunnel.agent.status().ok()?;
            let slots = slots(&status);
            let long = |c: &Value| {
                c["state"] == "backoff" && c["retry_in_secs"].as_f64().is_some_and(|s| s >= 5.0)
            };
            (!slots.is_empty() && slots.iter().all(long)).then_some(())
        },
    )
    .expect("a long backoff");
    let gw_dir = tunnel.site.path("gateway");
    tunnel.gateway = Gateway::run(&gw_dir).expect("gateway restarts on the same port");

    let status = tunnel.agent.status().expect("status");
    let checked = Instant::now();
    let backoff_left = slots(&status)
        .iter()
        .filter_map(|c| c["retry_in_secs"].as_f64())
        .fold(f64::INFINITY, f64::min);
    assert!(
        backoff_left >= 2.0,
        "the gateway took too long to restart for this test to tell ({backoff_left:.1}s of backoff left): {status}"
    );
    let start = Instant::now();
    echo_once(tunnel.forward(0)).expect("a stream after the gateway came back");
    let took = start.elapsed();
    let would_have_waited = Duration::from_secs_f64(backoff_left).saturating_sub(checked.elapsed());
    assert!(
        took + Duration::from_millis(500) < would_have_waited,
        "the stream took {took:?}: it waited out the backoff ({backoff_left:.1}s left) instead of dialling at once"
    );
}

/// A client certificate for `identity` from the CA in `gateway_dir`, valid from
/// `not_before` to `not_after`, written into `<site>/<out>/` with the CA's `ca.pem`,
/// as `tunnel-gateway issue` lays them out.
fn issue_valid(
    site: &Site,
    gateway_dir: &std::path::Path,
    identity: &str,
    out: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> std::path::PathBuf {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let ca_pem = std::fs::read_to_string(gateway_dir.join("ca.pem")).expect("ca.pem");
    let ca_key = std::fs::read_to_string(gateway_dir.join("ca-key.pem")).expect("ca-key.pem");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key).expect("key"))
        .expect("the gateway's CA");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, identity);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let dir = site.path(out);
    std::fs::create_dir_all(&dir).expect("out dir");
    std::fs::write(dir.join(format!("{identity}.pem")), cert.pem()).expect("cert");
    std::fs::write(dir.join(format!("{identity}-key.pem")), key.serialize_pem()).expect("key");
    std::fs::write(dir.join("ca.pem"), ca_pem).expect("ca");
    dir
}

/// Now, to the second (certificates keep whole seconds).
fn now() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// A moment as the agent's messages write it (the agent's own formatting).
fn utc(t: time::OffsetDateTime) -> String {
    tunnel_transport::certs::utc(t.unix_timestamp())
}

/// Runs `tunnel-agent run` with `body` as its config; it must fail at start. Returns
/// what it printed.
fn agent_refuses_to_start(site: &Site, body: &str) -> String {
    let dir = site.path("agent");
    std::fs::create_dir_all(&dir).expect("agent dir");
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("control = \"agent.sock\"\n{body}")).expect("config");
    let (code, stdout, stderr) = output_within(
        std::process::Command::new(bin("tunnel-agent"))
            .args(["run", "--config"])
            .arg(&config),
        Duration::from_secs(10),
    );
    assert_eq!(
        code,
        Some(1),
        "the agent did not stop at start:\n{stdout}\n{stderr}"
    );
    stderr
}

/// The `error` of every connection slot in an agent's status.
fn slot_errors(agent: &Agent) -> Vec<String> {
    agent
        .status()
        .map(|s| {
            slots(&s)
                .iter()
                .filter_map(|c| c["error"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_expired_certificate_stops_the_agent_at_start_and_says_when_it_expired() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let expired = now() - time::Duration::days(30);
    let creds = issue_valid(
        &site,
        &gw_dir,
        "alice",
        "alice",
        expired - time::Duration::days(90),
        expired,
    );
    let addr = "127.0.0.1:9".parse().expect("addr");
    let stderr = agent_refuses_to_start(&site, &gateway_table("site-b", addr, &creds, "alice"));
    let expect = format!(
        "{} expired on {}: ask the gateway's operator for a new one (tunnel-gateway issue)",
        creds.join("alice.pem").display(),
        utc(expired)
    );
    assert!(
        stderr.contains(&expect),
        "the agent does not say `{expect}`:\n{stderr}"
    );
}

#[test]
fn a_certificate_from_another_ca_stops_the_agent_at_start() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let other = site.init_gateway("other");
    let good = site.issue(&gw_dir, "alice", "alice");
    let foreign = site.issue(&other, "alice", "mallory");
    let body = format!(
        "[[gateway]]\nname = \"b\"\naddress = \"127.0.0.1:9\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        good.join("ca.pem").display(),
        foreign.join("alice.pem").display(),
        foreign.join("alice-key.pem").display(),
    );
    let stderr = agent_refuses_to_start(&site, &body);
    let expect = format!(
        "{} was not issued by the CA in {}",
        foreign.join("alice.pem").display(),
        good.join("ca.pem").display()
    );
    assert!(
        stderr.contains(&expect),
        "the agent does not say `{expect}`:\n{stderr}"
    );
}

#[test]
fn a_not_yet_valid_certificate_is_named_in_the_log_and_status() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let from = now() + time::Duration::days(1);
    let creds = issue_valid(
        &site,
        &gw_dir,
        "alice",
        "alice",
        from,
        from + time::Duration::days(1),
    );
    let gateway = Gateway::start(&gw_dir, &allow_alice(&["*"])).expect("gateway");
    let mut agent = Agent::start(
        &site.path("agent"),
        &gateway_table("site-b", gateway.addr, &creds, "alice"),
        false,
    )
    .expect("a certificate that is not valid yet does not stop the agent");
    let expect = format!(
        "{} is not valid until {}",
        creds.join("alice.pem").display(),
        utc(from)
    );
    agent
        .daemon
        .wait_log(&expect, Duration::from_secs(10))
        .expect("the log names the certificate's start");
    let status = agent.status().expect("status");
    let problem = status["gateways"][0]["certificate"]["problem"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains(&expect), "status: {status}");
    // The gateway refuses it too, and the connection says why.
    wait_for(
        Duration::from_secs(10),
        "the connection's error to name the certificate",
        || {
            slot_errors(&agent)
                .iter()
                .any(|e| e.contains("alert certificate_expired") && e.contains(&expect))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", slot_errors(&agent)));
    assert_eq!(agent.connections_up(), 0);
}

#[test]
fn a_ca_file_that_is_not_the_gateways_is_named() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let other = site.init_gateway("other");
    // A certificate and CA that belong together, but to another gateway.
    let elsewhere = site.issue(&other, "alice", "elsewhere");
    let gateway = Gateway::start(&gw_dir, &allow_alice(&["*"])).expect("gateway");
    let agent = Agent::start(
        &site.path("agent"),
        &gateway_table("site-b", gateway.addr, &elsewhere, "alice"),
        false,
    )
    .expect("agent");
    let expect = format!(
        "the gateway's certificate was not issued by the CA in {}: that is not this gateway's CA",
        elsewhere.join("ca.pem").display()
    );
    wait_for(
        Duration::from_secs(10),
        "the connection's error to name the CA file",
        || {
            slot_errors(&agent)
                .iter()
                .any(|e| e.contains(&expect))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", slot_errors(&agent)));
    assert!(
        agent.daemon.log_text().contains(&expect),
        "the log does not name the CA file:\n{}",
        agent.daemon.log_text()
    );
}

#[test]
fn a_certificate_that_expires_while_the_agent_runs_shows_in_the_log_and_status() {
    let echo = echo_server("127.0.0.1").to_string();
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let until = now() + time::Duration::seconds(3);
    let creds = issue_valid(
        &site,
        &gw_dir,
        "alice",
        "alice",
        until - time::Duration::hours(1),
        until,
    );
    let gateway = Gateway::start(&gw_dir, &allow_alice(&[&echo])).expect("gateway");
    let mut agent = Agent::start(
        &site.path("agent"),
        &(gateway_table("site-b", gateway.addr, &creds, "alice") + &forward_table(&echo)),
        true,
    )
    .expect("a certificate valid for a few more seconds starts the agent");
    let status = agent.status().expect("status");
    assert!(
        status["gateways"][0]["certificate"]["problem"].is_null(),
        "{status}"
    );
    echo_once(agent.forwards[0]).expect("a stream before the certificate expires");

    let expect = format!(
        "{} expired on {}",
        creds.join("alice.pem").display(),
        utc(until)
    );
    agent
        .daemon
        .wait_log(&expect, Duration::from_secs(15))
        .expect("the log says the certificate expired");
    let status = agent.status().expect("status");
    let problem = status["gateways"][0]["certificate"]["problem"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains(&expect), "status: {status}");
    let text = run_ok(
        std::process::Command::new(bin("tunnel-agent"))
            .args(["status", "--config"])
            .arg(&agent.config),
    );
    assert!(
        text.contains(&format!("certificate PROBLEM: {expect}")),
        "status text:\n{text}"
    );
}

#[test]
fn a_full_synthetic_name_pool_says_so_in_the_log_status_and_the_programs_debug_output() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let creds = site.issue(&gw_dir, "alice", "alice");
    let gateway = Gateway::start(&gw_dir, &allow_alice(&["*"])).expect("gateway");
    // A /24 holds 254 names.
    let body = format!(
        "synthetic_ipv4 = \"198.18.0.0/24\"\n{}{}",
        gateway_table("site-b", gateway.addr, &creds, "alice"),
        route_table(&["*.site-b.internal"])
    );
    let mut agent = Agent::start(&site.path("agent"), &body, true).expect("agent");
    let script = r#"
import socket
for i in range(300):
    name = f"h{i}.site-b.internal"
    try:
        socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        print(f"{i} {name} failed")
        break
"#;
    let (code, stdout, stderr) = output_within(
        std::process::Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&agent.config)
            .args(["--", "python3", "-c", script])
            .env("TUNNEL_DEBUG", "1"),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "254 h254.site-b.internal failed", "{stderr}");
    let full = "the synthetic address pool is full: all 254 addresses of synthetic_ipv4 = \"198.18.0.0/24\" are handed out, so `h254.site-b.internal` gets none; widen synthetic_ipv4 in agent.toml";
    let said = stderr
        .lines()
        .find(|l| l.contains("h254.site-b.internal:"))
        .unwrap_or_default();
    assert!(
        said.contains(full) && !said.contains("no answer from the agent"),
        "the program's debug output does not say the pool is full: {said:?}\n{stderr}"
    );
    agent
        .daemon
        .wait_log(full, Duration::from_secs(5))
        .expect("the agent's log says the pool is full");
    let status = agent.status().expect("status");
    let names = &status["synthetic_names"];
    assert_eq!(names["used"], 254, "{status}");
    assert_eq!(names["refused"], 1, "{status}");
    assert!(
        names["problem"].as_str().is_some_and(|p| p.contains(full)),
        "{status}"
    );
}

/// `tunnel-gateway issue` for `identity` from the gateway whose config is `config`,
/// into `out`; returns what it printed.
fn issue_printed(config: &std::path::Path, identity: &str, out: &std::path::Path) -> String {
    run_ok(
        std::process::Command::new(bin("tunnel-gateway"))
            .args(["issue", "--identity", identity, "--config"])
            .arg(config)
            .arg("--out")
            .arg(out),
    )
}

/// The `[[gateway]]` table in what `issue` printed, up to the blank line after it.
fn snippet(printed: &str) -> String {
    let start = printed
        .find("[[gateway]]")
        .unwrap_or_else(|| panic!("no [[gateway]] table in:\n{printed}"));
    let table = &printed[start..];
    table[..table.find("\n\n").unwrap_or(table.len())].to_string() + "\n"
}

#[test]
fn the_snippet_that_issue_prints_is_a_working_agent_config_beside_the_files() {
    let echo = echo_server("127.0.0.1").to_string();
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let gateway = Gateway::start(&gw_dir, &allow_alice(&[&echo])).expect("gateway");
    gateway.pin_port().expect("pin port");
    let out = site.path("alice");
    let printed = issue_printed(&gateway.config, "alice", &out);
    let table = snippet(&printed);
    assert!(
        table.contains(&format!("address = \"{}\"", gateway.addr)),
        "the snippet does not give the gateway's address {}:\n{printed}",
        gateway.addr
    );
    assert!(
        printed.contains("Paths to edit: ca, cert and key")
            && printed.contains(&format!(
                "{} is a loopback address",
                gateway.config.display()
            )),
        "issue does not say what to edit:\n{printed}"
    );
    // The files where issue wrote them, and the snippet as agent.toml beside them.
    let agent = Agent::start(&out, &(table + &forward_table(&echo)), true)
        .expect("an agent configured by the snippet connects");
    echo_once(agent.forwards[0]).expect("a stream through the snippet's gateway");

    // Another gateway's certificate into the same directory would leave the wrong
    // ca.pem beside it: refused.
    let other = site.init_gateway("other");
    let (code, _, stderr) = output_within(
        std::process::Command::new(bin("tunnel-gateway"))
            .args(["issue", "--identity", "bob", "--dir"])
            .arg(&other)
            .arg("--out")
            .arg(&out),
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} holds another CA's certificate",
            out.join("ca.pem").display()
        )),
        "{stderr}"
    );
    assert!(!out.join("bob.pem").exists(), "bob.pem was written anyway");
}

#[test]
fn issue_for_a_gateway_on_every_address_gives_its_name_or_asks_for_the_host() {
    let site = Site::new();
    let named = site.path("named");
    run_ok(
        std::process::Command::new(bin("tunnel-gateway"))
            .args([
                "init",
                "--name",
                "gw.site-b.example.org",
                "--listen",
                "0.0.0.0:7443",
                "--dir",
            ])
            .arg(&named),
    );
    let printed = issue_printed(&named.join("gateway.toml"), "alice", &site.path("a"));
    let table = snippet(&printed);
    assert!(
        table.contains("name = \"gw-site-b-example-org\"")
            && table.contains("address = \"gw.site-b.example.org:7443\"\n"),
        "{printed}"
    );
    assert!(!printed.contains("EDIT"), "nothing to edit:\n{printed}");

    let anonymous = site.path("anonymous");
    run_ok(
        std::process::Command::new(bin("tunnel-gateway"))
            .args(["init", "--listen", "[::]:7443", "--dir"])
            .arg(&anonymous),
    );
    let printed = issue_printed(&anonymous.join("gateway.toml"), "alice", &site.path("b"));
    let table = snippet(&printed);
    assert!(
        table.contains("address = \"HOST:7443\"    # EDIT")
            && table.contains("server_name = \"localhost\""),
        "{printed}"
    );
    assert!(
        printed.contains("listens on every address ([::]:7443)"),
        "{printed}"
    );
}

/// `tunnel-agent status` with no config anywhere asks the agent at the socket's
/// default place ($XDG_RUNTIME_DIR/tunnel/agent.sock), instead of failing on the
/// missing file.
#[test]
fn status_without_a_config_asks_the_socket_at_its_default_place() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let gateway = Gateway::start(&gw_dir, "").expect("gateway");
    let creds = site.issue(&gw_dir, "alice", "alice-creds");
    let runtime = site.path("runtime");
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("mode");
    let config = site.path("agent.toml");
    std::fs::write(
        &config,
        gateway_table("site-b", gateway.addr, &creds, "alice"),
    )
    .expect("agent.toml");
    let mut command = std::process::Command::new(bin("tunnel-agent"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("XDG_RUNTIME_DIR", &runtime);
    let mut agent = Daemon::spawn("agent", command, site.path("agent.log")).expect("agent");
    agent
        .wait_log("agent ready", Duration::from_secs(20))
        .expect("agent up");
    let empty = site.path("no-config-here");
    std::fs::create_dir_all(&empty).expect("dir");
    let out = run_ok(
        std::process::Command::new(bin("tunnel-agent"))
            .arg("status")
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_CONFIG_HOME", &empty)
            .env("HOME", &empty)
            .env_remove("TUNNEL_CONFIG"),
    );
    assert!(out.contains("site-b"), "{out}");
}
