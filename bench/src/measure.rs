//! Figures of the tunnel alone: what the preload costs a program that is not routed,
//! what idle streams cost in memory; and the budgets checked against the rows.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::procs::{self, installed};
use crate::report::Report;
use crate::tunnel::Tunnel;

/// Lets the benchmark and the daemons it starts hold tens of thousands of sockets.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = hard.max(65_536);
        if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

pub fn machine() -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    m.insert("cpu".into(), cpu);
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel".into(), kernel.trim().to_string());
    m
}

/// Runs the pass-through client with or without the preload; returns its ns per call.
fn passthrough_ns(bins: &Path, preload: bool, calls: usize) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut command = Command::new(&exe);
        command.args(["client", "passthrough", "127.0.0.1:9", &calls.to_string()]);
        if preload {
            preload_env(&mut command, bins);
        }
        let out = procs::output_within(&mut command, Duration::from_secs(60))?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        best = best.min(v["ns_per_call"].as_f64().unwrap_or(f64::MAX));
    }
    Ok(best)
}

/// The environment of a preloaded program with routes that do not select 127.0.0.1.
fn preload_env(command: &mut Command, bins: &Path) {
    command
        .env("LD_PRELOAD", bins.join("libtunnel_preload.so"))
        .env("TUNNEL_ROUTES", "site-b=10.255.0.0/16,*.site-b.internal")
        .env("TUNNEL_AGENT", "/nonexistent/agent.sock");
}

/// Instructions of a run of the pass-through client under callgrind.
fn instructions(bins: &Path, preload: bool, calls: usize) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    let mut command = Command::new("valgrind");
    command
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(&exe)
        .args(["client", "passthrough", "127.0.0.1:9", &calls.to_string()]);
    if preload {
        preload_env(&mut command, bins);
    }
    let out = command.output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| {
            l.split_once("Collected : ")
                .map(|(_, n)| n.trim().to_string())
        })
        .and_then(|n| n.parse().ok())
}

/// Mean microseconds to start and finish `/bin/true`.
fn startup_us(bins: &Path, preload: bool, runs: usize) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..runs {
        let mut command = Command::new("/bin/true");
        if preload {
            preload_env(&mut command, bins);
        }
        command.status().context("running /bin/true")?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / runs as f64)
}

pub fn preload(bins: &Path, report: &mut Report) -> Result<()> {
    let calls = 200_000;
    let without = passthrough_ns(bins, false, calls)?;
    let with = passthrough_ns(bins, true, calls)?;
    let t = &mut report.tunnel_only;
    t.insert(
        "pass-through connect, added".into(),
        (with - without, "ns per call".into()),
    );
    if installed("valgrind") {
        let per_call = |preload| -> Option<f64> {
            let small = instructions(bins, preload, 1000)?;
            let large = instructions(bins, preload, 2000)?;
            Some((large - small) / 1000.0)
        };
        if let (Some(plain), Some(hooked)) = (per_call(false), per_call(true)) {
            t.insert(
                "pass-through connect, added (callgrind)".into(),
                (hooked - plain, "instructions per call".into()),
            );
        }
    } else {
        report.missing.insert(
            "callgrind".into(),
            "valgrind is not installed (apt-get install valgrind)".into(),
        );
    }
    // Rounds of both, interleaved, so that a busy moment hits both alike; the median
    // of the per-round differences, so that one busy round does not decide.
    let mut added = Vec::new();
    for _ in 0..15 {
        let plain = startup_us(bins, false, 30)?;
        let hooked = startup_us(bins, true, 30)?;
        added.push(hooked - plain);
    }
    added.sort_by(f64::total_cmp);
    report.tunnel_only.insert(
        "process start-up under the preload, added".into(),
        (added[added.len() / 2], "µs".into()),
    );
    Ok(())
}

/// Holds `count` idle streams through the forward port; memory of agent + gateway.
pub fn idle_memory(bins: &Path, count: usize, report: &mut Report) -> Result<()> {
    let holder = crate::workload::serve_idle("127.0.0.3")?;
    let tunnel = Tunnel::start(bins, holder, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = tunnel.rss_kib();
    let exe = std::env::current_exe()?;
    let mut client = Command::new(exe)
        .args([
            "client",
            "idle",
            &tunnel.forward.to_string(),
            &count.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut first = String::new();
    if let Some(out) = client.stdout.take() {
        BufReader::new(out).read_line(&mut first)?;
    }
    let start = Instant::now();
    let mut live = 0;
    while start.elapsed() < Duration::from_secs(120) {
        live = tunnel.live_streams(bins);
        if live >= count {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = tunnel.rss_kib();
    drop(client.stdin.take());
    let _ = client.kill();
    let _ = client.wait();
    let t = &mut report.tunnel_only;
    t.insert("idle streams held".into(), (live as f64, "streams".into()));
    t.insert(
        "agent + gateway memory, idle".into(),
        (before as f64 / 1024.0, "MiB".into()),
    );
    t.insert(
        "agent + gateway memory, with the idle streams".into(),
        (after as f64 / 1024.0, "MiB".into()),
    );
    if live > 0 {
        t.insert(
            "memory per idle stream (agent + gateway)".into(),
            (
                after.saturating_sub(before) as f64 / live as f64,
                "KiB".into(),
            ),
        );
    }
    Ok(())
}

pub fn budgets(report: &mut Report, links: &[&str]) {
    let v = |r: &Report, figure: &str, path: &str| r.value(figure, path);
    // A figure with its unit, or "not measured" alone.
    let fmt = |x: Option<f64>, unit: &str| {
        x.map_or("not measured".to_string(), |x| format!("{x:.2}{unit}"))
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);

    let one = "loopback: 1 stream download";
    let tunnel = v(report, one, "tunnel-run");
    let vs_stunnel = ratio(tunnel, v(report, one, "stunnel"));
    let vs_ssh = ratio(tunnel, v(report, one, "ssh -L"));
    report.budget(
        "one stream on loopback ≥ 1.2× the stunnel pair",
        fmt(vs_stunnel, "×"),
        vs_stunnel.map(|r| r >= 1.2),
    );
    report.budget(
        "one stream on loopback ≥ 1.5× ssh -L",
        fmt(vs_ssh, "×"),
        vs_ssh.map(|r| r >= 1.5),
    );

    let rr = "loopback: round trip p50";
    let direct = v(report, rr, "direct");
    let ours = v(report, rr, "tunnel-run").zip(direct).map(|(t, d)| t - d);
    let theirs = v(report, rr, "stunnel").zip(direct).map(|(s, d)| s - d);
    report.budget(
        "added round-trip latency ≤ half of the stunnel pair's",
        format!("{} vs {}", fmt(ours, " µs"), fmt(theirs, " µs")),
        ours.zip(theirs).map(|(o, t)| o <= t / 2.0),
    );

    let cps = "loopback: new connections";
    for path in ["tunnel-run", "tunnel forward"] {
        let n = v(report, cps, path);
        report.budget(
            &format!("≥ 10,000 new connections per second ({path})"),
            fmt(n, " per s"),
            n.map(|n| n >= 10_000.0),
        );
    }
    for link in links {
        let share = v(
            report,
            &format!("{link}: 1 stream download, share of the link"),
            "tunnel-run",
        );
        report.budget(
            &format!("{link}: one stream ≥ 90% of the link"),
            fmt(share, "%"),
            share.map(|s| s >= 90.0),
        );
        // Judged as programs connect: non-blocking (curl, browsers, event loops). Opening
        // a stream costs no round trip of its own: a forward port and an optimistic
        // route send the first bytes with the CONNECT. A checked route (the default)
        // first learns the far side's answer, one round trip, as a TCP handshake across
        // the link would cost (the relay answers direct's handshake on loopback, so
        // direct's row has none): it is judged against two round trips.
        let ttfb_figure =
            format!("{link}: time to first byte, new connection (non-blocking connect)");
        let forward = v(report, &ttfb_figure, "tunnel forward");
        let optimistic = report
            .tunnel_only
            .get(&format!(
                "{link}: tunnel-run, optimistic route, time to first byte, new connection (non-blocking connect)"
            ))
            .map(|v| v.0);
        for (path, ttfb) in [
            ("tunnel forward", forward),
            ("tunnel-run, optimistic route", optimistic),
        ] {
            report.budget(
                &format!("{link}: time to first byte ≤ 1.2 RTT ({path})"),
                fmt(ttfb, " RTT"),
                ttfb.map(|t| t <= 1.2),
            );
        }
        let checked = v(report, &ttfb_figure, "tunnel-run");
        report.budget(
            &format!("{link}: time to first byte ≤ 2.2 RTT (tunnel-run, checked route)"),
            fmt(checked, " RTT"),
            checked.map(|c| c <= 2.2),
        );
    }
    // Figures of the tunnel alone, each with its ceiling.
    for (goal, figure, unit, ceiling) in [
        (
            "idle streams: agent + gateway ≤ 20 KiB per stream",
            "memory per idle stream (agent + gateway)",
            " KiB",
            20.0,
        ),
        (
            "pass-through connect ≤ 30 added instructions",
            "pass-through connect, added (callgrind)",
            "",
            30.0,
        ),
        (
            "process start-up under the preload ≤ 200 µs added",
            "process start-up under the preload, added",
            " µs",
            200.0,
        ),
    ] {
        let value = report.tunnel_only.get(figure).map(|v| v.0);
        report.budget(goal, fmt(value, unit), value.map(|v| v <= ceiling));
    }
}
