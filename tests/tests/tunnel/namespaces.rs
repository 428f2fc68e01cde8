//! Three sites in network namespaces (client, gateway, remote): the client has no route
//! to the remote site, so every success here went through the tunnel. Needs root.

use std::process::Command;
use std::time::Duration;

use tunnel_tests::netns::{REMOTE_IP, Topology};
use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);
const NAME: &str = "web.site-b.internal";

/// Everything of one run, dropped in order: programs, then daemons, then namespaces.
struct Sites {
    agent: Agent,
    _gateway: Gateway,
    _web: Daemon,
    site: Site,
    topology: Topology,
}

fn sites() -> Sites {
    let topology = Topology::new(&[NAME]);
    let site = Site::new();
    let www = site.path("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello from the remote site\n").expect("file");
    let mut web = Topology::command(&topology.remote, "python3");
    web.args([
        "-u",
        "-m",
        "http.server",
        "8080",
        "--bind",
        REMOTE_IP,
        "--directory",
    ])
    .arg(&www);
    let mut web = Daemon::spawn("http.server", web, site.path("http.log")).expect("web server");
    web.wait_log(" port ", Duration::from_secs(20))
        .expect("web server up");

    let (gateway, agent) = tunnel_across(&topology, &site, &["10.77.2.0/24", "*.site-b.internal"]);
    Sites {
        agent,
        _gateway: gateway,
        _web: web,
        site,
        topology,
    }
}

impl Sites {
    /// `tunnel-run -- program` in the client namespace.
    fn run(&self, program: &str) -> Command {
        let mut c = Topology::command(&self.topology.client, bin("tunnel-run"));
        c.arg("--config")
            .arg(&self.agent.config)
            .arg("--")
            .arg(program);
        c
    }
}

#[test]
fn unmodified_clients_reach_the_remote_site_by_address_and_by_name() {
    if needs_root("unmodified_clients_reach_the_remote_site_by_address_and_by_name") {
        return;
    }
    for (program, package) in [
        ("curl", "curl"),
        ("node", "nodejs"),
        ("nc", "netcat-openbsd"),
    ] {
        require(program, package);
    }
    let sites = sites();
    let expected = "hello from the remote site\n";

    // Without the tunnel the client site cannot reach the remote site at all.
    let (code, _, _) = output_within(
        Topology::command(&sites.topology.client, "curl").args([
            "-sS",
            "--max-time",
            "3",
            &format!("http://{REMOTE_IP}:8080/hello.txt"),
        ]),
        LIMIT,
    );
    assert_ne!(
        code,
        Some(0),
        "the client site reaches the remote site directly"
    );
    let (code, _, _) = output_within(
        Topology::command(&sites.topology.client, "getent").args(["hosts", NAME]),
        LIMIT,
    );
    assert_ne!(
        code,
        Some(0),
        "the client site can resolve {NAME} by itself"
    );

    for host in [REMOTE_IP, NAME] {
        let url = format!("http://{host}:8080/hello.txt");
        let curl = stdout_within(sites.run("curl").args(["-sS", "--fail", &url]), LIMIT);
        assert_eq!(curl, expected, "curl {url}");
        let python = format!(
            "import urllib.request; print(urllib.request.urlopen('{url}').read().decode(), end='')"
        );
        let py = stdout_within(sites.run("python3").args(["-c", &python]), LIMIT);
        assert_eq!(py, expected, "python urllib {url}");
        let get = format!(
            "require('http').get('{url}', r => {{ let b=''; r.on('data', d => b += d); r.on('end', () => process.stdout.write(b)); }}).on('error', e => {{ console.error(e); process.exit(1); }})"
        );
        assert_eq!(
            stdout_within(sites.run("node").args(["-e", &get]), LIMIT),
            expected,
            "node http.get {url}"
        );
        let fetch = format!(
            "fetch('{url}').then(r => r.text()).then(t => process.stdout.write(t)).catch(e => {{ console.error(e); process.exit(1); }})"
        );
        assert_eq!(
            stdout_within(sites.run("node").args(["-e", &fetch]), LIMIT),
            expected,
            "node fetch {url}"
        );
        let nc = format!(
            "printf 'GET /hello.txt HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -N {host} 8080"
        );
        let reply = stdout_within(sites.run("sh").args(["-c", &nc]), LIMIT);
        assert!(reply.ends_with(expected), "nc {host}: {reply}");
    }
    let status = sites.agent.status().expect("status");
    let destinations: Vec<String> = status["recent"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|e| e["destination"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        destinations.iter().any(|d| d == &format!("{NAME}:8080")),
        "the name did not travel to the gateway: {destinations:?}"
    );
}

#[test]
fn a_job_script_with_tunnel_agent_env_runs_two_clients() {
    if needs_root("a_job_script_with_tunnel_agent_env_runs_two_clients") {
        return;
    }
    require("curl", "curl");
    let sites = sites();
    let script = sites.site.path("job.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/bash
set -euo pipefail
eval "$({agent} env --config {config})"
curl -sS --fail http://{NAME}:8080/hello.txt
python3 -c "import urllib.request; print(urllib.request.urlopen('http://{REMOTE_IP}:8080/hello.txt').read().decode(), end='')"
"#,
            agent = bin("tunnel-agent").display(),
            config = sites.agent.config.display(),
        ),
    )
    .expect("job script");
    let out = stdout_within(
        Topology::command(&sites.topology.client, "bash").arg(&script),
        LIMIT,
    );
    assert_eq!(out, "hello from the remote site\n".repeat(2));
}
