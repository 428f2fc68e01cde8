//! Forward ports carry real programs: redis-cli to Debian's redis-server, curl to a
//! python http server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tunnel_tests::*;

#[test]
fn redis_cli_reaches_redis_server_through_the_tunnel() {
    require("redis-server", "redis-server");
    require("redis-cli", "redis-tools");
    let site = Site::new();
    let port = free_port();
    let mut redis = Command::new("redis-server");
    redis.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ]);
    redis.arg(site.dir.path());
    let mut redis = Daemon::spawn("redis", redis, site.path("redis.log")).expect("redis");
    redis
        .wait_log("Ready to accept connections", Duration::from_secs(10))
        .expect("redis ready");

    let target = format!("127.0.0.1:{port}");
    let tunnel = Tunnel::start(&allow_alice(&[&target]), &[&target]).expect("tunnel");
    let fwd = tunnel.forward(0);
    let cli = |args: &[&str]| {
        run_ok(
            Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &fwd.port().to_string()])
                .args(args),
        )
    };
    assert_eq!(cli(&["PING"]).trim(), "PONG");
    assert_eq!(
        cli(&["SET", "greeting", "hello through the tunnel"]).trim(),
        "OK"
    );
    assert_eq!(cli(&["GET", "greeting"]).trim(), "hello through the tunnel");
    // A value bigger than any window or frame, both ways.
    let big = "x".repeat(3 * 1024 * 1024);
    let mut set = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &fwd.port().to_string(),
            "-x",
            "SET",
            "big",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli -x");
    {
        use std::io::Write;
        let mut stdin = set.stdin.take().expect("stdin");
        stdin.write_all(big.as_bytes()).expect("write value");
    }
    let out = set.wait_with_output().expect("redis-cli -x");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    assert_eq!(cli(&["STRLEN", "big"]).trim(), big.len().to_string());
    assert_eq!(cli(&["GET", "big"]).trim_end_matches('\n'), big);

    // And the direct server agrees: the tunnel wrote to the real thing.
    let direct =
        run_ok(Command::new("redis-cli").args(["-p", &port.to_string(), "GET", "greeting"]));
    assert_eq!(direct.trim(), "hello through the tunnel");
    let outcomes = tunnel.agent.recent_outcomes();
    assert!(
        !outcomes.is_empty() && outcomes.iter().all(|o| o == "closed"),
        "{outcomes:?}"
    );
}

#[test]
fn curl_fetches_from_python_http_server_through_the_tunnel() {
    require("curl", "curl");
    require("python3", "python3");
    let site = Site::new();
    let www = site.path("www");
    std::fs::create_dir_all(&www).expect("www");
    let mut data = vec![0u8; 5 * 1024 * 1024 + 123];
    Pattern::new(7).fill(&mut data);
    std::fs::write(www.join("data.bin"), &data).expect("data file");

    let mut python = Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&www)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python http.server");
    let mut line = String::new();
    BufReader::new(python.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("python's first line");
    // "Serving HTTP on 127.0.0.1 port 43211 (http://127.0.0.1:43211/) ..."
    let port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _python = Kill(python);

    let rules = format!(
        "{}\n[service.files]\ntarget = \"127.0.0.1:{port}\"\n",
        allow_alice(&["files"])
    );
    let tunnel = Tunnel::start(&rules, &["files"]).expect("tunnel");
    let out = site.path("fetched.bin");
    run_ok(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "30", "-o"])
            .arg(&out)
            .arg(format!("http://{}/data.bin", tunnel.forward(0))),
    );
    let fetched = std::fs::read(&out).expect("fetched file");
    assert_eq!(fetched.len(), data.len());
    assert!(
        fetched == data,
        "the fetched file differs from the served one"
    );
}
