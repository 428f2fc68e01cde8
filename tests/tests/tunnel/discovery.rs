//! What may I reach, and why did this not go through the tunnel: `tunnel-agent
//! services` and `tunnel-run --explain`, answered by the gateway's own policy.

use std::process::Command;

use tunnel_tests::*;

#[test]
fn services_and_explain_answer_from_the_gateways_policy() {
    let echo = echo_server("127.0.0.1").to_string();
    let port = free_port();
    let rules = format!(
        "{}\n[service.pg]\ntarget = \"{echo}\"\n\n[service.secret]\ntarget = \"{echo}\"\n\n[publish.lab-db]\nby = [\"carol\"]\nreach = [\"alice\"]\n\n[callbacks]\naddress = \"127.0.0.1\"\nports = \"{port}\"\nfor = [\"alice\"]\n",
        allow_alice(&["pg", &echo])
    );
    let agent_toml = route_table(&[&echo, "127.0.0.2:9", "*.site-b.internal"]);
    let tunnel = Tunnel::start_with(&rules, &agent_toml).expect("tunnel");

    let services = run_ok(
        Command::new(bin("tunnel-agent"))
            .args(["services", "--config"])
            .arg(&tunnel.agent.config),
    );
    assert!(services.contains("gateway site-b (as alice)"), "{services}");
    assert!(
        services.contains(&format!("service     pg                   -> {echo}")),
        "{services}"
    );
    assert!(
        !services.contains("secret"),
        "a service alice may not reach: {services}"
    );
    assert!(
        services.contains(&format!("callbacks   ports {port} at 127.0.0.1")),
        "{services}"
    );
    assert!(
        services.contains("publication lab-db") && services.contains("no agent publishes it now"),
        "{services}"
    );

    let explained = run_ok(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .args(["--explain", &echo, "127.0.0.2:9", "10.99.0.1:80", "pg"]),
    );
    let lines: Vec<&str> = explained.lines().collect();
    // Routed and allowed: where the gateway would connect.
    let (ip, port) = echo.split_once(':').expect("ip:port");
    assert_eq!(
        lines[0],
        format!(
            "{echo}: the route {ip}/32:{port} (via site-b, checked) carries it through gateway `site-b`"
        )
    );
    assert!(
        lines[1].contains("the gateway allows it for alice") && lines[1].contains(&echo),
        "{explained}"
    );
    // Routed and refused, with the gateway's reason.
    assert!(
        lines[2].starts_with("127.0.0.2:9: the route 127.0.0.2/32:9 (via site-b"),
        "{explained}"
    );
    assert!(
        lines[3].contains("the gateway refuses it for alice")
            && lines[3].contains("guarded loopback address"),
        "{explained}"
    );
    // No route: direct.
    assert_eq!(
        lines[4],
        "10.99.0.1:80: no route selects it: it goes direct, untouched by the tunnel"
    );
    // A service name no route selects goes direct too (a route by name would carry it).
    assert!(
        lines[5].starts_with("pg: no route selects it"),
        "{explained}"
    );
}
