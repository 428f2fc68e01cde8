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
