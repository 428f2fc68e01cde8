//! Prometheus metrics: Debian's prometheus scrapes both daemons during a transfer, and
//! a query through its HTTP API returns the bytes moved.

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use tunnel_tests::*;

/// Asks prometheus at `web` for `query`; the first result's value.
fn query(web: u16, query: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-G"])
        .arg(format!("http://127.0.0.1:{web}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={query}"))
        .output()
        .ok()?;
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

#[test]
fn prometheus_scrapes_both_daemons_and_counts_the_bytes_moved() {
    require("prometheus", "prometheus");
    require("curl", "curl");
    let sink = hashing_sink();
    let site = Site::new();
    let (agent_metrics, gateway_metrics, web) = (free_port(), free_port(), free_port());
    let gw_dir = site.init_gateway("gateway");
    let config = gw_dir.join("gateway.toml");
    let text = std::fs::read_to_string(&config).expect("gateway.toml");
    std::fs::write(
        &config,
        format!("metrics = \"127.0.0.1:{gateway_metrics}\"\n{text}"),
    )
    .expect("gateway.toml");
    let gateway = Gateway::start(&gw_dir, &allow_alice(&[&sink])).expect("gateway");
    let creds = site.issue(&gw_dir, "alice", "alice");
    let agent = Agent::start(
        &site.path("agent"),
        &format!(
            "metrics = \"127.0.0.1:{agent_metrics}\"\n{}{}",
            gateway_table("site-b", gateway.addr, &creds, "alice"),
            forward_table(&sink)
        ),
        true,
    )
    .expect("agent");

    // Both pages answer in the text format.
    let page = run_ok(
        Command::new("curl").args(["-sS", &format!("http://127.0.0.1:{agent_metrics}/metrics")]),
    );
    assert!(
        page.contains("# TYPE tunnel_agent_stream_bytes_total counter")
            && page.contains("tunnel_agent_connections{gateway=\"site-b\",state=\"up\"} 2"),
        "{page}"
    );

    let prometheus_dir = site.path("prometheus");
    std::fs::create_dir_all(&prometheus_dir).expect("dir");
    let prometheus_config = prometheus_dir.join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['127.0.0.1:{agent_metrics}']\n  - job_name: gateway\n    static_configs:\n      - targets: ['127.0.0.1:{gateway_metrics}']\n"
        ),
    )
    .expect("prometheus.yml");
    let mut command = Command::new("prometheus");
    command
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prometheus_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"));
    let mut prometheus =
        Daemon::spawn("prometheus", command, site.path("prometheus.log")).expect("prometheus");
    prometheus
        .wait_log(
            "Server is ready to receive web requests",
            Duration::from_secs(60),
        )
        .expect("prometheus up");

    // A transfer through the tunnel.
    const TOTAL: u64 = 8 << 20;
    let mut conn = connect(agent.forwards[0], Duration::from_secs(30));
    let sent = send_pattern(&mut conn, 3, TOTAL).expect("upload");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("sink's digest");
    assert_eq!(reply, hex(&sent));

    for (daemon, metric) in [
        ("agent", "tunnel_agent_stream_bytes_total"),
        ("gateway", "tunnel_gateway_stream_bytes_total"),
    ] {
        let promql = format!("sum({metric}{{direction=\"to_destination\"}})");
        let seen = wait_for(
            Duration::from_secs(30),
            "prometheus to have scraped the bytes",
            || query(web, &promql).filter(|bytes| *bytes >= TOTAL as f64),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{daemon}: {e}: {:?}\n{}",
                query(web, &promql),
                prometheus.log_text()
            )
        });
        assert!(seen >= TOTAL as f64, "{daemon}: {seen}");
    }
    let closed = query(
        web,
        "sum(tunnel_gateway_streams_ended_total{outcome=\"closed\"})",
    );
    assert!(closed.is_some_and(|n| n >= 1.0), "{closed:?}");
}
