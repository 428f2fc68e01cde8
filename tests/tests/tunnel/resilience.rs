//! Losing the gateway: kill -9 mid-transfer is a reset (never EOF) and the agent comes
//! back by itself; SIGTERM lets a transfer finish; a frozen gateway is noticed by PING.

use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tunnel_tests::*;

/// A server that sends pattern bytes to every connection until the peer goes away.
fn endless_source() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            thread::spawn(move || {
                let _ = send_pattern(&mut s, 3, u64::MAX / 2);
            });
        }
    });
    addr
}

#[test]
fn gateway_killed_mid_transfer_is_a_reset_and_the_agent_reconnects() {
    let source = endless_source();
    let sink = hashing_sink();
    let mut tunnel =
        Tunnel::start(&allow_alice(&[&source, &sink]), &[&source, &sink]).expect("tunnel");
    tunnel.gateway.pin_port().expect("pin port");
    let agent_pid = tunnel.agent.daemon.pid();

    let mut s = connect(tunnel.forward(0), Duration::from_secs(10));
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0usize;
    while got < 16 << 20 {
        got += s.read(&mut buf).expect("download before the kill");
    }
    tunnel.gateway.daemon.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => panic!("the transfer ended with a clean EOF after the gateway died"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(end.kind(), ErrorKind::ConnectionReset, "{end}");
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "reset took {:?}",
        killed.elapsed()
    );
    drop(s);

    let gw_dir = tunnel.site.path("gateway");
    tunnel.gateway = Gateway::run(&gw_dir).expect("gateway restarts on the same port");
    tunnel
        .agent
        .wait_connected(Duration::from_secs(30))
        .expect("the agent reconnects by itself");
    assert_eq!(
        tunnel.agent.daemon.pid(),
        agent_pid,
        "the agent was restarted"
    );

    let mut s = connect(tunnel.forward(1), Duration::from_secs(30));
    let (sent, reply) = paced_upload(&mut s, 32 << 20, Duration::ZERO);
    assert_eq!(reply, hex(&sent), "a new transfer after the restart failed");
}

#[test]
fn sigterm_lets_a_transfer_in_flight_finish() {
    let sink = hashing_sink();
    let mut tunnel = Tunnel::start(&allow_alice(&[&sink]), &[&sink]).expect("tunnel");
    let fwd = tunnel.forward(0);
    let upload = thread::spawn(move || {
        let mut s = connect(fwd, Duration::from_secs(30));
        // About 2 s at this pace: long enough to be cut by a careless shutdown.
        paced_upload(&mut s, 128 << 20, Duration::from_millis(15))
    });
    wait_for(
        Duration::from_secs(20),
        "the upload to be under way",
        || {
            let status = tunnel.gateway.status().ok()?;
            (status["streams"][0]["bytes_to_destination"].as_u64()? > 0).then_some(())
        },
    )
    .expect("upload under way");
    tunnel.gateway.daemon.signal(Signal::SIGTERM);
    tunnel
        .gateway
        .daemon
        .wait_log("draining: GOAWAY sent", Duration::from_secs(5))
        .expect("GOAWAY");

    let (sent, reply) = upload.join().expect("upload");
    assert_eq!(reply, hex(&sent), "the transfer was cut by SIGTERM");
    let code = tunnel
        .gateway
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the gateway exits once drained");
    assert_eq!(code, Some(0));
    assert!(
        tunnel
            .gateway
            .daemon
            .log_text()
            .contains("drained; exiting")
    );
}

#[test]
fn a_frozen_gateway_is_noticed_by_ping_within_seconds() {
    let tunnel = Tunnel::start(&allow_alice(&["127.0.0.1:9"]), &[]).expect("tunnel");
    tunnel.gateway.daemon.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let noticed = wait_for(
        Duration::from_secs(10),
        "the agent to drop the dead connections",
        || (tunnel.agent.connections_up() == 0).then(|| stopped.elapsed()),
    );
    tunnel.gateway.daemon.signal(Signal::SIGCONT);
    let noticed = noticed.expect("PING liveness");
    // ping_interval 1 s + ping_timeout 2 s, as the test agent is configured.
    assert!(noticed < Duration::from_secs(6), "took {noticed:?}");
    assert!(
        tunnel.agent.daemon.log_text().contains("no answer to PING"),
        "{}",
        tunnel.agent.daemon.log_text()
    );
    tunnel
        .agent
        .wait_connected(Duration::from_secs(30))
        .expect("reconnects once the gateway runs again");
}

#[test]
fn while_one_replica_drains_new_streams_go_to_the_other() {
    let sink = hashing_sink();
    let site = Site::new();
    let a = site.init_gateway("gateway-a");
    let creds = site.issue(&a, "alice", "alice");
    // A replica: the same CA, certificate and rules, its own port and control socket.
    let b = site.path("gateway-b");
    std::fs::create_dir_all(&b).expect("replica dir");
    for file in [
        "ca.pem",
        "ca-key.pem",
        "gateway.pem",
        "gateway-key.pem",
        "gateway.toml",
    ] {
        std::fs::copy(a.join(file), b.join(file)).expect("copy");
    }
    let rules = allow_alice(&[&sink]);
    let mut gateways = [
        Gateway::start(&a, &rules).expect("replica a"),
        Gateway::start(&b, &rules).expect("replica b"),
    ];
    let body = format!(
        "[[gateway]]\nname = \"site-b\"\naddress = [\"{}\", \"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
        gateways[0].addr,
        gateways[1].addr,
        creds.join("ca.pem").display(),
        creds.join("alice.pem").display(),
        creds.join("alice-key.pem").display(),
        forward_table(&sink),
    );
    let agent = Agent::start(&site.path("agent"), &body, true).expect("agent");
    wait_for(
        Duration::from_secs(20),
        "a connection to each replica",
        || (agent.connections_up() == 2).then_some(()),
    )
    .expect("both replicas connected");

    let fwd = agent.forwards[0];
    let in_flight = thread::spawn(move || {
        let mut s = connect(fwd, Duration::from_secs(30));
        paced_upload(&mut s, 96 << 20, Duration::from_millis(20))
    });
    let carrying = wait_for(
        Duration::from_secs(20),
        "the replica carrying the upload",
        || {
            gateways.iter().position(|g| {
                g.status()
                    .ok()
                    .and_then(|s| s["streams"][0]["bytes_to_destination"].as_u64())
                    .is_some_and(|n| n > 0)
            })
        },
    )
    .expect("upload under way");
    let draining = &mut gateways[carrying];
    draining.daemon.signal(Signal::SIGTERM);
    draining
        .daemon
        .wait_log("draining: GOAWAY sent", Duration::from_secs(5))
        .expect("GOAWAY");

    for _ in 0..5 {
        let start = Instant::now();
        let mut s = connect(fwd, Duration::from_secs(10));
        let (sent, reply) = paced_upload(&mut s, 1 << 20, Duration::ZERO);
        assert_eq!(reply, hex(&sent), "a new stream failed during the drain");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
    }
    let other = &gateways[1 - carrying];
    let served = other.status().expect("status")["recent"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(served, 5, "the other replica did not carry the new streams");

    let (sent, reply) = in_flight.join().expect("upload");
    assert_eq!(reply, hex(&sent), "the draining replica cut its transfer");
    assert_eq!(
        gateways[carrying]
            .daemon
            .wait_exit(Duration::from_secs(10))
            .expect("exit"),
        Some(0)
    );
}
