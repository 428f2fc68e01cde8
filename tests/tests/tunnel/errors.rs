//! Failures arrive faithfully: the program sees a reset (never a clean EOF), promptly,
//! and the agent's log and status, and the gateway's, name the class.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use tunnel_tests::*;

/// Connects through `fwd`, sends a little, and returns how the read ended.
fn read_result(fwd: SocketAddr) -> (std::io::Result<usize>, Duration) {
    let start = Instant::now();
    // A reset can come so fast that the (polled) connect itself reports it.
    let mut s = match std::net::TcpStream::connect_timeout(&fwd, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return (Err(e), start.elapsed()),
        Err(e) => panic!("connect: {e}"),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let _ = s.write_all(b"hello?\n");
    let mut buf = [0u8; 64];
    let result = s.read(&mut buf);
    (result, start.elapsed())
}

fn assert_reset(result: std::io::Result<usize>, took: Duration) {
    match result {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("the program saw a clean EOF: a failure must arrive as a reset"),
        other => panic!("expected a reset, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "the reset took {took:?}");
}

#[test]
fn closed_port_at_the_far_site_is_a_prompt_reset_and_says_refused() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let tunnel = Tunnel::start(&allow_alice(&[&closed]), &[&closed]).expect("tunnel");
    let (result, took) = read_result(tunnel.forward(0));
    assert_reset(result, took);

    wait_for(Duration::from_secs(5), "`refused` in agent status", || {
        tunnel
            .agent
            .recent_outcomes()
            .contains(&"refused".to_string())
            .then_some(())
    })
    .expect("agent status");
    let log = tunnel.agent.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&closed) && l.contains("refused")),
        "agent log does not say refused:\n{log}"
    );
}

#[test]
fn denied_destination_is_never_contacted() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let forbidden = listener.local_addr().expect("addr").to_string();
    let allowed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let tunnel =
        Tunnel::start(&allow_alice(&[&allowed, "10.0.0.0/8", "*"]), &[&forbidden]).expect("tunnel");
    let (result, took) = read_result(tunnel.forward(0));
    assert_reset(result, took);

    wait_for(Duration::from_secs(5), "`denied` in agent status", || {
        tunnel
            .agent
            .recent_outcomes()
            .contains(&"denied".to_string())
            .then_some(())
    })
    .expect("agent status");
    let gw_log = tunnel.gateway.daemon.log_text();
    assert!(
        gw_log
            .lines()
            .any(|l| l.contains("denied") && l.contains(&forbidden)),
        "gateway log does not say denied:\n{gw_log}"
    );
    let gw = tunnel.gateway.status().expect("gateway status");
    assert_eq!(gw["recent"][0]["outcome"], "denied", "{gw}");
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the denied destination saw a connection: {other:?}"),
    }
}

#[test]
fn client_certificate_from_another_ca_is_refused_and_nothing_is_connected() {
    let destination = TcpListener::bind("127.0.0.1:0").expect("bind");
    destination.set_nonblocking(true).expect("nonblocking");
    let target = destination.local_addr().expect("addr").to_string();

    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let good = site.issue(&gw_dir, "alice", "alice");
    let other_ca = site.init_gateway("other");
    let foreign = site.issue(&other_ca, "alice", "mallory");
    let gateway = Gateway::start(&gw_dir, &allow_alice(&[&target])).expect("gateway");

    // Trusts the real gateway, but presents a certificate that another CA signed; its CA
    // file holds both CAs, so that the agent's own check at start lets it through and
    // the gateway is the one that refuses.
    let both = site.path("both-cas.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(good.join("ca.pem")).expect("ca")
            + &std::fs::read_to_string(foreign.join("ca.pem")).expect("other ca"),
    )
    .expect("CA bundle");
    let body = format!(
        "[[gateway]]\nname = \"b\"\naddress = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
        gateway.addr,
        both.display(),
        foreign.join("alice.pem").display(),
        foreign.join("alice-key.pem").display(),
        forward_table(&target)
    );
    let agent = Agent::start(&site.path("agent"), &body, false).expect("agent");
    let mut gateway = gateway;
    gateway
        .daemon
        .wait_log("TLS handshake refused", Duration::from_secs(10))
        .expect("the gateway refuses the handshake");
    assert_eq!(agent.connections_up(), 0);
    // The agent says why, in its log and its status, not as a bare TLS error.
    let why = "the gateway does not know the CA that issued";
    let mut agent = agent;
    agent
        .daemon
        .wait_log(why, Duration::from_secs(10))
        .expect("the agent's log names the foreign CA");
    let status = agent.status().expect("status");
    let errors: Vec<&str> = status["gateways"][0]["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["error"].as_str())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains(why) && e.contains("alice.pem")),
        "status does not name the foreign CA: {status}"
    );
    let (result, _) = read_result(agent.forwards[0]);
    assert!(
        !matches!(result, Ok(n) if n > 0),
        "data came back through a refused tunnel"
    );
    assert!(
        !matches!(result, Ok(0)),
        "a refused tunnel looked like a clean EOF"
    );
    assert_eq!(
        gateway.status().expect("status")["connections"],
        serde_json::json!([])
    );
    match destination.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the destination saw a connection: {other:?}"),
    }
}

/// A client without a certificate finishes the handshake (enrolment needs that), but
/// gets nothing except the enrolment request: any other request is refused, and the
/// connection does not outlive the time one enrolment takes.
#[test]
fn tls_client_without_a_certificate_may_only_enrol() {
    require("curl", "curl");
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let mut gateway = Gateway::start(&gw_dir, &allow_alice(&["*"])).expect("gateway");
    for path in ["/", "/v1/renew"] {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "--http2",
                "--max-time",
                "10",
                "-X",
                "POST",
                "--cacert",
            ])
            .arg(gw_dir.join("ca.pem"))
            .arg(format!("https://localhost:{}{path}", gateway.addr.port()))
            .output()
            .expect("curl");
        assert!(
            !out.status.success(),
            "curl without a client certificate got an answer to {path}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    gateway
        .daemon
        .wait_log(
            "a client without a certificate may only enrol",
            Duration::from_secs(10),
        )
        .expect("the gateway refuses the request");
    assert_eq!(
        gateway.status().expect("status")["connections"],
        serde_json::json!([])
    );
}
