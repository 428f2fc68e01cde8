//! Losing the agent: whatever ends it (SIGKILL, or SIGTERM once the drain time is up),
//! every program connection that had not ended cleanly sees an error, never a clean
//! EOF that would make a truncated download look complete. SIGTERM lets a transfer
//! that finishes within `drain_timeout` finish.

use std::time::Duration;

use nix::sys::signal::Signal;
use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);
const FILE_BYTES: usize = 24 << 20;

/// A tunnel routing 127.0.0.2, where an HTTP server offers `big.bin`; the agent gets
/// `drain` seconds to drain on SIGTERM.
fn download_site(drain: u32) -> (Tunnel, Daemon, std::net::SocketAddr) {
    let settings = format!("drain_timeout = {drain}\n[[route]]\nto = [\"127.0.0.2/32\"]\n");
    let tunnel = Tunnel::start_with(&allow_alice(&["127.0.0.2/32"]), &settings).expect("tunnel");
    let www = tunnel.site.path("www");
    std::fs::create_dir_all(&www).expect("www");
    let mut pattern = Pattern::new(5);
    let mut body = vec![0u8; FILE_BYTES];
    pattern.fill(&mut body);
    std::fs::write(www.join("big.bin"), &body).expect("file");
    let (server, addr) = http_server("127.0.0.2", &www);
    (tunnel, server, addr)
}

/// A reader that counts bytes to the end and says how the end came.
const COUNTING_READER: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
total = 0
try:
    while True:
        data = s.recv(65536)
        if not data:
            print("EOF", total, flush=True)
            break
        total += len(data)
        time.sleep(0.01)
except OSError as e:
    print(type(e).__name__, total, flush=True)
"#;

/// Starts curl (rate-limited) and the counting reader under tunnel-run, both reading
/// `big.bin` slowly, and waits until both are under way.
fn slow_downloads(tunnel: &Tunnel, web: std::net::SocketAddr) -> (Daemon, Daemon) {
    let out = tunnel.site.path("curl-copy.bin");
    let mut curl = tunnel.run("curl");
    curl.args(["-sS", "--limit-rate", "1M", "-o"])
        .arg(&out)
        .arg(format!("http://{web}/big.bin"));
    let curl = Daemon::spawn("curl", curl, tunnel.site.path("curl.log")).expect("curl");
    let mut reader = tunnel.run("python3");
    reader.args([
        "-c",
        COUNTING_READER,
        &web.ip().to_string(),
        &web.port().to_string(),
    ]);
    let reader = Daemon::spawn("reader", reader, tunnel.site.path("reader.log")).expect("reader");
    wait_for(Duration::from_secs(30), "two streams under way", || {
        let status = tunnel.agent.status().ok()?;
        let streams = status["streams"].as_array()?;
        let moving = streams
            .iter()
            .filter(|s| s["bytes_from_destination"].as_u64().unwrap_or(0) > 0)
            .count();
        (moving >= 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tunnel.agent.status().unwrap_or_default()));
    (curl, reader)
}

/// Both downloads must end in an error, never in a short success.
fn assert_both_failed(mut curl: Daemon, mut reader: Daemon, how: &str) {
    let curl_code = curl.wait_exit(LIMIT).expect("curl ends");
    assert!(
        matches!(curl_code, Some(code) if code != 0),
        "{how}: curl exited {curl_code:?} after a cut download: {}",
        curl.log_text()
    );
    reader.wait_exit(LIMIT).expect("reader ends");
    let said = reader.log_text();
    let (end, count) = said.trim().split_once(' ').unwrap_or((said.trim(), "?"));
    assert_ne!(
        end, "EOF",
        "{how}: the reader saw a clean EOF after {count} of {FILE_BYTES} bytes"
    );
    assert_eq!(
        end, "ConnectionResetError",
        "{how}: the reader ended with {said}"
    );
}

#[test]
fn agent_killed_mid_download_is_an_error_never_eof() {
    require("curl", "curl");
    let (mut tunnel, _server, web) = download_site(30);
    let (curl, reader) = slow_downloads(&tunnel, web);
    tunnel.agent.daemon.signal(Signal::SIGKILL);
    assert_both_failed(curl, reader, "SIGKILL");
    tunnel.agent.daemon.kill();
}

#[test]
fn agent_terminated_mid_download_resets_what_the_drain_did_not_finish() {
    require("curl", "curl");
    let (mut tunnel, _server, web) = download_site(1);
    let (curl, reader) = slow_downloads(&tunnel, web);
    tunnel.agent.daemon.signal(Signal::SIGTERM);
    assert_both_failed(curl, reader, "SIGTERM");
    let code = tunnel
        .agent
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the agent exits once the drain time is up");
    assert_eq!(code, Some(0));
    let log = tunnel.agent.daemon.log_text();
    assert!(log.contains("draining: 2 streams"), "{log}");
    assert!(log.contains("streams in flight are reset"), "{log}");
}

#[test]
fn sigterm_lets_a_download_in_flight_finish_within_the_drain_time() {
    require("curl", "curl");
    let (mut tunnel, _server, web) = download_site(30);
    let copy = tunnel.site.path("copy.bin");
    let mut curl = tunnel.run("curl");
    // About 3 s at this rate: cut by a careless shutdown, well inside the drain time.
    curl.args(["-sS", "--fail", "--limit-rate", "8M", "-o"])
        .arg(&copy)
        .arg(format!("http://{web}/big.bin"));
    let mut curl = Daemon::spawn("curl", curl, tunnel.site.path("curl.log")).expect("curl");
    wait_for(Duration::from_secs(30), "the download under way", || {
        let status = tunnel.agent.status().ok()?;
        (status["streams"][0]["bytes_from_destination"].as_u64()? > 0).then_some(())
    })
    .expect("under way");
    tunnel.agent.daemon.signal(Signal::SIGTERM);
    assert_eq!(
        curl.wait_exit(LIMIT).expect("curl ends"),
        Some(0),
        "{}",
        curl.log_text()
    );
    let copied = std::fs::read(&copy).expect("copy");
    let served = std::fs::read(tunnel.site.path("www/big.bin")).expect("served");
    assert!(
        copied == served,
        "the copy differs ({} bytes)",
        copied.len()
    );
    assert_eq!(
        tunnel
            .agent
            .daemon
            .wait_exit(Duration::from_secs(10))
            .expect("exit"),
        Some(0)
    );
    assert!(tunnel.agent.daemon.log_text().contains("drained; exiting"));
}
