//! `tunnel-bench [--quick] [--json FILE]`: tunnel measured side by side with direct
//! TCP and its peers, in the same run, on the same machine.
//!
//! # Layout
//!
//! ```text
//!  workload: one destination server (127.0.0.2) and one client program (`client` subcommand)
//!  paths:    direct | tunnel-run | tunnel forward | ssh -L | stunnel | socat | proxychains (ssh -D)
//!            each gives the client an entry address and maybe a command prefix
//!  relay:    delay-and-rate link on each path's wide-area leg (WAN scenarios)
//!  report:   table + JSON: each figure per path, the tunnel's advantage, the budgets
//! ```
#![forbid(unsafe_code)]

mod measure;
mod peers;
mod procs;
mod relay;
mod report;
mod supervised;
mod tunnel;
mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::relay::Link;
use crate::report::{Better, Report};

/// Measures tunnel side by side with direct TCP, ssh -L, an stunnel pair, socat and
/// proxychains (through ssh -D), and its inside-out direction (a published service)
/// beside ssh -R, on loopback and over an emulated wide-area link.
/// Prints a table; --json writes every figure. Peers that are not installed are
/// reported as missing. In the full run each loopback figure is measured in three
/// rounds, the paths in a different order each round, and reported as each path's
/// median round (--json keeps every round).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Shorter runs and one WAN scenario: under two minutes.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Measure only these paths (repeatable): direct, tunnel-run, tunnel forward,
    /// tunnel reverse, ssh -L, ssh -R, stunnel, socat, proxychains.
    #[arg(long, value_name = "PATH")]
    only: Vec<String>,
    #[command(subcommand)]
    command: Option<Internal>,
}

#[derive(Subcommand, Debug)]
enum Internal {
    /// One client measurement (run by the benchmark itself, under each path's wrapper).
    #[command(hide = true)]
    Client {
        op: String,
        addr: SocketAddr,
        arg: f64,
        #[arg(default_value_t = 1)]
        streams: usize,
    },
    /// The destination server alone, on IP (port chosen by the kernel): prints its
    /// address and serves until stdin closes. For profiling one path by hand.
    #[command(hide = true)]
    Serve {
        #[arg(default_value = "127.0.0.1")]
        ip: String,
    },
}

/// How long each measurement runs.
struct Plan {
    bulk_secs: f64,
    rr_count: f64,
    connect_secs: f64,
    wan_secs: f64,
    idle_streams: usize,
    /// Rounds of the loopback figures (each path's figure is its median round).
    loopback_rounds: usize,
    links: Vec<(&'static str, Link)>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let ms = Duration::from_millis;
        let wan_50 = (
            "WAN 50 ms, 500 Mbit/s",
            Link {
                rtt: ms(50),
                bits_per_sec: 500e6,
            },
        );
        let wan_100 = (
            "WAN 100 ms, 1 Gbit/s",
            Link {
                rtt: ms(100),
                bits_per_sec: 1e9,
            },
        );
        if quick {
            Plan {
                bulk_secs: 1.0,
                rr_count: 2000.0,
                connect_secs: 1.0,
                wan_secs: 3.0,
                idle_streams: 2000,
                loopback_rounds: 1,
                links: vec![wan_50],
            }
        } else {
            Plan {
                bulk_secs: 4.0,
                rr_count: 10000.0,
                connect_secs: 3.0,
                wan_secs: 10.0,
                idle_streams: 10_000,
                loopback_rounds: 3,
                links: vec![wan_50, wan_100],
            }
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Internal::Client {
            op,
            addr,
            arg,
            streams,
        }) => workload::client(&op, addr, arg, streams).map(|v| println!("{v}")),
        Some(Internal::Serve { ip }) => workload::serve(&ip).map(|addr| {
            println!("{addr}");
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        }),
        None => run(cli.quick, cli.json.as_deref(), &cli.only),
    };
    if let Err(e) = result {
        eprintln!("tunnel-bench: {e:#}");
        std::process::exit(1);
    }
}

/// What a route's connect mode costs a program on this link: the time to first byte of
/// an optimistic route (the checked one, the default, is tunnel-run's row), and the
/// longest stall of an event loop that starts 100 non-blocking connects at once.
fn connect_modes(
    bins: &Path,
    ready: &[(&'static str, Result<Ready, String>)],
    link: &str,
    rtt_ms: f64,
    report: &mut Report,
) {
    let Some(tunnel) = ready
        .iter()
        .filter(|(name, _)| *name == "tunnel-run")
        .find_map(|(_, r)| r.as_ref().ok())
        .and_then(|r| r._keep.downcast_ref::<std::rc::Rc<tunnel::Tunnel>>())
    else {
        return;
    };
    let entry = ready
        .iter()
        .find_map(|(name, r)| (*name == "tunnel-run").then_some(r.as_ref().ok()?.entry));
    let Some(entry) = entry else { return };
    let limit = Duration::from_secs(120);
    for (mode, wrapper) in [
        ("checked", tunnel.wrapper(bins)),
        ("optimistic", tunnel.optimistic_wrapper(bins)),
    ] {
        let path = Ready {
            entry,
            wrapper,
            _keep: Box::new(()),
        };
        let figure = |what: &str| format!("{link}: tunnel-run, {mode} route, {what}");
        if mode == "optimistic" {
            match client(&path, "ttfb-nonblocking", 5.0, 1, limit) {
                Ok(v) => {
                    if let Some(ms) = v["p50_ms"].as_f64() {
                        report.tunnel_only.insert(
                            figure("time to first byte, new connection (non-blocking connect)"),
                            (ms / rtt_ms, "RTT".into()),
                        );
                    }
                }
                Err(e) => eprintln!("  {mode} ttfb: {e:#}"),
            }
        }
        match client(&path, "connect-burst", 100.0, 1, limit) {
            Ok(v) => {
                if let Some(ms) = v["longest_stall_ms"].as_f64() {
                    report.tunnel_only.insert(
                        figure("100 non-blocking connects at once: longest event-loop stall"),
                        (ms / rtt_ms, "RTT".into()),
                    );
                }
                if let Some(ms) = v["all_connected_ms"].as_f64() {
                    report.tunnel_only.insert(
                        figure("100 non-blocking connects at once: all answered"),
                        (ms / rtt_ms, "RTT".into()),
                    );
                }
            }
            Err(e) => eprintln!("  {mode} connect burst: {e:#}"),
        }
    }
}

/// A path ready to measure: where the client connects, and under what.
struct Ready {
    entry: SocketAddr,
    wrapper: Vec<String>,
    _keep: Box<dyn std::any::Any>,
}

const PATHS: [&str; 9] = [
    "direct",
    "tunnel-run",
    "tunnel forward",
    "tunnel reverse",
    "ssh -L",
    "ssh -R",
    "stunnel",
    "socat",
    "proxychains",
];

fn bins() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("the benchmark's directory")?
        .to_path_buf();
    for needed in [
        "tunnel-gateway",
        "tunnel-agent",
        "tunnel-run",
        "libtunnel_preload.so",
    ] {
        if !dir.join(needed).exists() {
            bail!(
                "{} is missing beside {}: build with `cargo build --release --workspace`",
                needed,
                exe.display()
            );
        }
    }
    Ok(dir)
}

/// Sets up every path to `destination`, with the relay on its wide-area leg if `link`.
fn paths(
    bins: &Path,
    destination: SocketAddr,
    link: Option<Link>,
    only: &[String],
) -> Vec<(&'static str, Result<Ready, String>)> {
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let wan_fn =
        move |upstream: SocketAddr| relay::start(upstream, link.expect("only called with a link"));
    let wan: peers::Wan = if link.is_some() { Some(&wan_fn) } else { None };
    let peer = |r: Result<peers::PeerPath, peers::PeerError>| -> Result<Ready, String> {
        r.map(|p| Ready {
            entry: p.entry,
            wrapper: p.wrapper.clone(),
            _keep: Box::new(p),
        })
        .map_err(|e| e.to_string())
    };
    let mut out: Vec<(&'static str, Result<Ready, String>)> = Vec::new();
    let direct = match link {
        Some(l) => relay::start(destination, l).map_err(|e| e.to_string()),
        None => Ok(destination),
    };
    out.push((
        "direct",
        direct.map(|entry| Ready {
            entry,
            wrapper: Vec::new(),
            _keep: Box::new(()),
        }),
    ));
    let tunnel = if wanted("tunnel-run") || wanted("tunnel forward") || wanted("tunnel reverse") {
        Some(tunnel::Tunnel::start(bins, destination, link))
    } else {
        None
    };
    match tunnel {
        None => {}
        Some(Ok(t)) => {
            let forward = t.forward;
            let published = t.published;
            let wrapper = t.wrapper(bins);
            let shared = std::rc::Rc::new(t);
            out.push((
                "tunnel-run",
                Ok(Ready {
                    entry: destination,
                    wrapper,
                    _keep: Box::new(shared.clone()),
                }),
            ));
            out.push((
                "tunnel forward",
                Ok(Ready {
                    entry: forward,
                    wrapper: Vec::new(),
                    _keep: Box::new(shared.clone()),
                }),
            ));
            // Inside-out: the client at the gateway's side, the destination published by
            // the agent over its reverse connection.
            out.push((
                "tunnel reverse",
                Ok(Ready {
                    entry: published,
                    wrapper: Vec::new(),
                    _keep: Box::new(shared),
                }),
            ));
        }
        Some(Err(e)) => {
            out.push(("tunnel-run", Err(format!("{e:#}"))));
            out.push(("tunnel forward", Err(format!("{e:#}"))));
            out.push(("tunnel reverse", Err(format!("{e:#}"))));
        }
    }
    if wanted("ssh -L") {
        out.push(("ssh -L", peer(peers::ssh_forward(destination, wan))));
    }
    if wanted("ssh -R") {
        out.push(("ssh -R", peer(peers::ssh_reverse(destination, wan))));
    }
    if wanted("stunnel") {
        out.push(("stunnel", peer(peers::stunnel_pair(destination, wan))));
    }
    if wanted("socat") {
        out.push(("socat", peer(peers::socat_relay(destination, wan))));
    }
    if wanted("proxychains") {
        out.push((
            "proxychains",
            peer(peers::proxychains_ssh(destination, wan)),
        ));
    }
    out
}

/// Keeps the paths named by `--only` (all when it is empty).
fn selected(
    all: Vec<(&'static str, Result<Ready, String>)>,
    only: &[String],
) -> Vec<(&'static str, Result<Ready, String>)> {
    all.into_iter()
        .filter(|(name, _)| only.is_empty() || only.iter().any(|o| o == name))
        .collect()
}

/// Runs the client for one measurement through one path.
fn client(ready: &Ready, op: &str, arg: f64, streams: usize, limit: Duration) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let mut command = match ready.wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    command
        .arg("client")
        .arg(op)
        .arg(ready.entry.to_string())
        .arg(arg.to_string())
        .arg(streams.to_string());
    let out = procs::output_within(&mut command, limit)?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{op}: no result in {out:?}"))
}

type Measure<'a> = (&'a str, &'a str, Better, &'a str, f64, usize, &'a str, f64);

/// Measures each figure on every path, `rounds` times. Each round visits the paths in
/// a rotated order, so that a slow drift of the machine (other work, CPU placement)
/// does not always fall on the same path; each path's figure is its median round.
fn measure_all(
    report: &mut Report,
    paths: &[(&'static str, Result<Ready, String>)],
    measures: &[Measure<'_>],
    rounds: usize,
) {
    for (name, ready) in paths {
        if let Err(why) = ready {
            report
                .missing
                .entry(name.to_string())
                .or_insert_with(|| why.clone());
        }
    }
    let measured: Vec<_> = paths
        .iter()
        .filter_map(|(name, ready)| ready.as_ref().ok().map(|r| (*name, r)))
        .collect();
    for (figure, unit, better, op, arg, streams, field, scale) in measures {
        let mut values: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
        for round in 0..rounds.max(1) {
            for index in 0..measured.len() {
                let (name, ready) = measured[(index + round) % measured.len()];
                let limit = Duration::from_secs_f64(arg.max(1.0) * 4.0 + 60.0);
                let value = client(ready, op, *arg, *streams, limit)
                    .map_err(|e| eprintln!("  {name}: {figure}: {e:#}"))
                    .ok()
                    .and_then(|v| v[*field].as_f64())
                    .map(|v| v * scale);
                values.entry(name.to_string()).or_default().push(value);
            }
        }
        eprintln!("  {figure} ({unit}): {}", progress_line(&values));
        report.add_rounds(figure, unit, *better, values);
    }
}

/// One figure's rounds as a progress line: `direct 23081.6, tunnel-run 5965.2 / 6011.0`
/// (rounds separated by `/`, a failed round as `failed`).
fn progress_line(values: &BTreeMap<String, Vec<Option<f64>>>) -> String {
    values
        .iter()
        .map(|(path, rounds)| {
            let rounds: Vec<String> = rounds
                .iter()
                .map(|v| v.map_or_else(|| "failed".to_string(), |v| format!("{v:.1}")))
                .collect();
            format!("{path} {}", rounds.join(" / "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn run(quick: bool, json: Option<&Path>, only: &[String]) -> Result<()> {
    if let Some(unknown) = only.iter().find(|p| !PATHS.contains(&p.as_str())) {
        bail!("--only `{unknown}`: the paths are {}", PATHS.join(", "));
    }
    let bins = bins()?;
    measure::raise_fd_limit();
    let plan = Plan::new(quick);
    let mut report = Report {
        quick,
        machine: measure::machine(),
        paths: PATHS
            .iter()
            .filter(|p| only.is_empty() || only.iter().any(|o| o == *p))
            .map(|p| p.to_string())
            .collect(),
        ..Report::default()
    };
    let destination = workload::serve("127.0.0.2")?;

    eprintln!("loopback");
    {
        let ready = selected(paths(&bins, destination, None, only), only);
        let b = plan.bulk_secs;
        measure_all(
            &mut report,
            &ready,
            &[
                (
                    "loopback: 1 stream upload",
                    "Mbit/s",
                    Better::Higher,
                    "bulk-up",
                    b,
                    1,
                    "bits_per_sec",
                    1e-6,
                ),
                (
                    "loopback: 1 stream download",
                    "Mbit/s",
                    Better::Higher,
                    "bulk-down",
                    b,
                    1,
                    "bits_per_sec",
                    1e-6,
                ),
                (
                    "loopback: 8 streams download",
                    "Mbit/s",
                    Better::Higher,
                    "bulk-down",
                    b,
                    8,
                    "bits_per_sec",
                    1e-6,
                ),
                (
                    "loopback: round trip p50",
                    "µs",
                    Better::Lower,
                    "rr",
                    plan.rr_count,
                    1,
                    "p50_us",
                    1.0,
                ),
                (
                    "loopback: round trip p99",
                    "µs",
                    Better::Lower,
                    "rr",
                    plan.rr_count,
                    1,
                    "p99_us",
                    1.0,
                ),
                (
                    "loopback: new connections",
                    "per s",
                    Better::Higher,
                    "connect",
                    plan.connect_secs,
                    8,
                    "per_sec",
                    1.0,
                ),
                (
                    "loopback: connect p50",
                    "µs",
                    Better::Lower,
                    "connect",
                    plan.connect_secs,
                    1,
                    "connect_p50_us",
                    1.0,
                ),
                (
                    "loopback: connect p99",
                    "µs",
                    Better::Lower,
                    "connect",
                    plan.connect_secs,
                    1,
                    "connect_p99_us",
                    1.0,
                ),
            ],
            plan.loopback_rounds,
        );
    }

    for (name, link) in &plan.links {
        eprintln!("{name}");
        let ready = selected(paths(&bins, destination, Some(*link), only), only);
        let rate_mbit = link.bits_per_sec / 1e6;
        let rtt_ms = link.rtt.as_secs_f64() * 1000.0;
        let share = format!("{name}: 1 stream download, share of the link");
        let ttfb = format!("{name}: time to first byte, new connection (non-blocking connect)");
        let ttfb_blocking =
            format!("{name}: time to first byte, new connection (blocking connect)");
        measure_all(
            &mut report,
            &ready,
            &[
                (
                    &share,
                    "% of link",
                    Better::Higher,
                    "bulk-down",
                    plan.wan_secs,
                    1,
                    "bits_per_sec",
                    100.0 / link.bits_per_sec,
                ),
                (
                    &ttfb,
                    "RTT",
                    Better::Lower,
                    "ttfb-nonblocking",
                    5.0,
                    1,
                    "p50_ms",
                    1.0 / rtt_ms,
                ),
                (
                    &ttfb_blocking,
                    "RTT",
                    Better::Lower,
                    "ttfb",
                    5.0,
                    1,
                    "p50_ms",
                    1.0 / rtt_ms,
                ),
            ],
            1,
        );
        connect_modes(&bins, &ready, name, rtt_ms, &mut report);
        eprintln!("  (link {rate_mbit} Mbit/s, RTT {rtt_ms} ms)");
    }

    eprintln!("preload and memory");
    measure::preload(&bins, &mut report)?;
    eprintln!("seccomp supervisor");
    supervised::measure(&bins, &mut report, plan.loopback_rounds.max(3))?;
    measure::idle_memory(&bins, plan.idle_streams, &mut report)?;
    measure::budgets(
        &mut report,
        &plan.links.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
    );

    let table = report.table();
    println!("{table}");
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn progress_lines_show_numbers_not_debug_values() {
        let mut values = BTreeMap::new();
        values.insert("direct".to_string(), vec![Some(23081.56)]);
        values.insert("tunnel-run".to_string(), vec![Some(5965.21), None]);
        assert_eq!(
            progress_line(&values),
            "direct 23081.6, tunnel-run 5965.2 / failed"
        );
    }
}
