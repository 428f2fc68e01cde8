//! `tunnel-run --explain DEST...`: for each destination, the route that takes it (or
//! that none does: it goes direct), and the gateway's policy answer for this agent's
//! identity, asked through the agent (`EXPLAIN`) without connecting to it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tunnel_proto::config::AgentConfig;
use tunnel_proto::discovery::Answer;
use tunnel_proto::local::Request;
use tunnel_proto::{Host, Target};

/// What one destination is, for the routes: a host with a port, or a bare name (a
/// service, or a name routed on any port).
fn destination(text: &str) -> Result<Target> {
    Target::parse(text).map_err(|e| {
        anyhow::anyhow!("`{text}` is not a destination (host:port, address:port or a name): {e}")
    })
}

/// Prints the explanation of every destination; `agent` finds (or starts) the agent.
pub fn explain(
    config: &AgentConfig,
    destinations: &[String],
    agent: impl Fn() -> Result<PathBuf>,
) -> Result<()> {
    let table = config.route_table();
    let mut socket = None;
    for text in destinations {
        let target = destination(text)?;
        // A bare name is routed as that name on any port.
        let routed = match &target {
            Target::Service(name) => table.route_for(&Target::Addr {
                host: Host::Name(name.clone()),
                port: 1,
            }),
            other => table.route_for(other),
        };
        let Some(route) = routed else {
            println!("{text}: no route selects it: it goes direct, untouched by the tunnel");
            continue;
        };
        // The route's patterns that select this destination.
        let patterns: Vec<String> = route
            .patterns
            .iter()
            .filter(|p| match &target {
                Target::Addr {
                    host: Host::Ip(ip),
                    port,
                } => p.matches_ip(*ip, *port),
                Target::Addr {
                    host: Host::Name(name),
                    port,
                } => p.matches_name(name, *port),
                Target::Service(name) => p.matches_name(name, 1),
            })
            .map(ToString::to_string)
            .collect();
        println!(
            "{text}: the route {} (via {}, {}) carries it through gateway `{}`",
            patterns.join(", "),
            route.via,
            route.connect.as_str(),
            route.via
        );
        let path = match &socket {
            Some(path) => path,
            None => socket.insert(agent()?),
        };
        match ask(path, &route.via, &target) {
            Ok(answer) if answer.allowed => {
                let at = if answer.addresses.is_empty() {
                    String::new()
                } else {
                    format!(" (it would connect to {})", answer.addresses.join(", "))
                };
                println!(
                    "  the gateway allows it for {}: {}{at}",
                    answer.identity, answer.why
                );
            }
            Ok(answer) => println!(
                "  the gateway refuses it for {}: {} ({})",
                answer.identity,
                answer.why,
                answer.class.as_deref().unwrap_or("denied")
            ),
            Err(e) => println!("  the gateway's answer could not be had: {e:#}"),
        }
    }
    Ok(())
}

/// One `EXPLAIN` to the agent at `socket`.
fn ask(socket: &PathBuf, via: &str, target: &Target) -> Result<Answer> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("asking the agent at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = Request::Explain {
        via: via.to_string(),
        target: target.clone(),
    };
    stream.write_all(request.encode().as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if let Ok(answer) = serde_json::from_str::<Answer>(&reply) {
        return Ok(answer);
    }
    let error = serde_json::from_str::<serde_json::Value>(&reply)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(reply);
    anyhow::bail!("{}", error.trim())
}
