//! `tunnel-run` itself and the agent's service manager contract: an agent of its own
//! when none answers, exec semantics, warnings for programs it cannot reach, READY=1.

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// An agent config for `tunnel`'s gateway whose socket no agent listens on.
fn config_without_agent(tunnel: &Tunnel) -> std::path::PathBuf {
    let dir = tunnel.site.path("solo");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "control = \"nobody-listens.sock\"\n{}{}",
            gateway_table("site-b", tunnel.gateway.addr, &tunnel.creds, "alice"),
            route_table(&["127.0.0.2/32"])
        ),
    )
    .expect("agent.toml");
    config
}

#[test]
fn tunnel_run_starts_an_agent_for_the_command_and_stops_it_after() {
    require("curl", "curl");
    let echo = echo_server("127.0.0.2");
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &[]).expect("gateway");
    let config = config_without_agent(&tunnel);
    let script = format!(
        "echo $$; printf ping | python3 -c \"import socket,sys; s=socket.create_connection(('127.0.0.2', {})); s.sendall(b'ping'); print(s.recv(4).decode())\"",
        echo.port()
    );
    let out = stdout_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&config)
            .args(["--", "sh", "-c", &script]),
        LIMIT,
    );
    let mut lines = out.lines();
    let pid = lines.next().unwrap_or_default().trim().to_string();
    assert_eq!(lines.next(), Some("ping"), "{out}");
    // The gateway carried it: the agent tunnel-run started was real.
    let gw = tunnel.gateway.status().expect("gateway status");
    assert!(
        gw["recent"].as_array().is_some_and(|r| !r.is_empty()),
        "nothing went through the gateway: {gw}"
    );
    // Its agent is gone with the command (it removes its own directory as it exits).
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = base.join(format!("tunnel-run-{pid}"));
    wait_for(Duration::from_secs(5), "the agent to stop", || {
        (!scratch.exists()).then_some(())
    })
    .expect("the agent started for the command outlived it");
}

#[test]
fn tunnel_run_execs_so_status_and_signals_are_the_programs() {
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    let status = tunnel
        .run("sh")
        .args(["-c", "exit 7"])
        .status()
        .expect("tunnel-run");
    assert_eq!(status.code(), Some(7));
    let status = tunnel
        .run("sh")
        .args(["-c", "kill -TERM $$"])
        .status()
        .expect("tunnel-run");
    assert_eq!(status.signal(), Some(15), "{status:?}");
    let (code, _, err) = output_within(&mut tunnel.run("/nonexistent/program"), LIMIT);
    assert_eq!(code, Some(127));
    assert!(err.contains("/nonexistent/program"), "{err}");
}

#[test]
fn tunnel_run_supervises_a_static_program_and_warns_only_when_told_not_to() {
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    let program = compile_c(
        &tunnel.site,
        "hello-static",
        "int main(void) { return 0; }\n",
        &["-static"],
    );
    // Supervised (the default for static programs): nothing to warn about.
    let (code, _, err) = output_within(&mut tunnel.run(program.to_str().expect("path")), LIMIT);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("warning"), "{err}");
    // --no-seccomp: its connections would go direct, and tunnel-run says so.
    let (code, _, err) = output_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .arg("--no-seccomp")
            .arg("--")
            .arg(&program),
        LIMIT,
    );
    assert_eq!(code, Some(0));
    assert!(err.contains("statically linked"), "{err}");
    assert!(err.contains("NOT go through the tunnel"), "{err}");
    assert!(err.contains("[[forward]]"), "{err}");
    // A normal dynamic program gets no such warning.
    let (_, _, err) = output_within(tunnel.run("sh").args(["-c", "true"]), LIMIT);
    assert!(!err.contains("statically linked"), "{err}");
}

#[test]
fn the_agent_tells_its_service_manager_when_it_is_ready() {
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &[]).expect("gateway");
    let config = config_without_agent(&tunnel);
    let notify_path = tunnel.site.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut command = Command::new(bin("tunnel-agent"));
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path);
    let agent =
        Daemon::spawn("agent", command, tunnel.site.path("notify-agent.log")).expect("agent");
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 within 20 s ({e}):\n{}", agent.log_text()));
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    // Ready means ready: its socket answers now.
    let status = Command::new(bin("tunnel-agent"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .expect("status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    let prefix = tempfile::tempdir().expect("prefix");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profile = bin_dir()
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let install = Command::new(root.join("scripts/install"))
        .arg("--prefix")
        .arg(prefix.path())
        .arg(format!("--{profile}"))
        .arg("--no-build")
        .output()
        .expect("scripts/install");
    assert!(
        install.status.success(),
        "scripts/install failed: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    let agent_unit = prefix.path().join("lib/systemd/user/tunnel-agent.service");
    let gateway_unit = prefix
        .path()
        .join("lib/systemd/system/tunnel-gateway.service");
    let (code, out, err) = output_within(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&agent_unit)
            .arg(&gateway_unit),
        LIMIT,
    );
    // verify exits 0 even when it warns: an empty report is the pass.
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        format!("{out}{err}").trim(),
        "",
        "systemd-analyze verify complained"
    );
    let units = std::fs::read_to_string(&agent_unit).expect("agent unit");
    assert!(
        units.contains("Type=notify"),
        "the agent's unit must wait for READY=1"
    );
    assert!(!units.contains("@BINDIR@"));

    // The installed layout works: tunnel-run and `tunnel-agent env` find ../lib.
    let config = prefix.path().join("agent.toml");
    std::fs::write(
        &config,
        "[[gateway]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[[route]]\nto = [\"10.0.0.0/8\"]\n",
    )
    .expect("config");
    let env = stdout_within(
        Command::new(prefix.path().join("bin/tunnel-agent"))
            .args(["env", "--config"])
            .arg(&config),
        LIMIT,
    );
    let library = prefix
        .path()
        .join("lib/libtunnel_preload.so")
        .canonicalize()
        .expect("installed library");
    assert!(
        env.contains(&format!("LD_PRELOAD='{}'", library.display())),
        "{env}"
    );
    assert!(env.contains("TUNNEL_ROUTES='b=10.0.0.0/8'"), "{env}");
}

#[test]
fn the_gateway_tells_its_service_manager_when_it_listens() {
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let notify_path = site.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut command = Command::new(bin("tunnel-gateway"));
    command
        .arg("run")
        .arg("--config")
        .arg(gw_dir.join("gateway.toml"))
        .env("NOTIFY_SOCKET", &notify_path);
    let gateway = Daemon::spawn("gateway", command, site.path("gateway.log")).expect("gateway");
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 within 20 s ({e}):\n{}", gateway.log_text()));
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    // Ready means listening: the address it names accepts connections now.
    let address = message
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no listening address in {message}"));
    std::net::TcpStream::connect(address).expect("the gateway accepts once ready");
}

#[test]
fn status_asks_an_agent_by_its_socket_without_a_config() {
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &[]).expect("tunnel");
    let out = Command::new(bin("tunnel-agent"))
        .args(["status", "--json", "--socket"])
        .arg(tunnel.site.path("agent/agent.sock"))
        .env("TUNNEL_CONFIG", "/nonexistent/agent.toml")
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(status["gateways"].is_array(), "{status}");
}
