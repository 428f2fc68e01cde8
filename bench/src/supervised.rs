//! What `tunnel-run`'s seccomp supervisor adds to a connect, side by side with the
//! preload library and with no tunnel at all. One small C program, built twice: linked
//! dynamically (the preload sees its connects) and statically (only the supervisor
//! does). Each figure is microseconds per connect, the median of interleaved rounds: an
//! unrouted one (a UDP connect: a system call and no handshake, so what is measured is
//! what the hook or the supervisor adds), a Unix socket's, and a routed TCP connect
//! through the tunnel (agent, gateway, destination, all on loopback).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::{self, installed};
use crate::report::Report;
use crate::tunnel::Tunnel;

const PROGRAM: &str = r#"
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* connects tcp IP PORT N | connects unix PATH N: microseconds per connect + close;
   connects udp IP PORT N: microseconds per connect of one UDP socket (a system call
   with no handshake: what is left is what a hook or the supervisor adds). */
int main(int argc, char **argv) {
    int n = atoi(argv[4 - (strcmp(argv[1], "unix") == 0)]);
    if (!strcmp(argv[1], "udp")) {
        struct sockaddr_in in = {0};
        in.sin_family = AF_INET;
        in.sin_port = htons(atoi(argv[3]));
        inet_pton(AF_INET, argv[2], &in.sin_addr);
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < n; i++) {
            if (connect(fd, (struct sockaddr *)&in, sizeof in) != 0) { perror("connect"); return 1; }
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n);
        return 0;
    }
    struct sockaddr_storage ss = {0};
    socklen_t len;
    int family;
    if (!strcmp(argv[1], "unix")) {
        struct sockaddr_un *u = (struct sockaddr_un *)&ss;
        u->sun_family = AF_UNIX;
        strncpy(u->sun_path, argv[2], sizeof u->sun_path - 1);
        len = sizeof *u;
        family = AF_UNIX;
    } else {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        in->sin_port = htons(atoi(argv[3]));
        inet_pton(AF_INET, argv[2], &in->sin_addr);
        len = sizeof *in;
        family = AF_INET;
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        int fd = socket(family, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&ss, len) != 0) { perror("connect"); return 1; }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n;
    printf("%.2f\n", us);
    return 0;
}
"#;

/// Accepts connections as fast as they come (a listener that falls behind drops SYNs,
/// which cost the client a second's retry) and closes each once its client has, on a
/// second thread: the 4-tuple's TIME_WAIT is then the client's, which the kernel steers
/// new connects around, and the listener keeps no state that a reused port could meet.
fn accept_until_eof(ip: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    let addr = listener.local_addr()?;
    let (accepted, to_close) = std::sync::mpsc::channel::<std::net::TcpStream>();
    std::thread::spawn(move || {
        for mut stream in to_close {
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
        }
    });
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if accepted.send(stream).is_err() {
                return;
            }
        }
    });
    Ok(addr)
}

fn accept_and_close_unix(path: &Path) -> Result<()> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::spawn(move || for _ in listener.incoming() {});
    Ok(())
}

fn build(dir: &Path, static_link: bool) -> Result<PathBuf> {
    let source = dir.join("connects.c");
    std::fs::write(&source, PROGRAM)?;
    let out = dir.join(if static_link {
        "connects-static"
    } else {
        "connects"
    });
    let mut gcc = Command::new("gcc");
    gcc.args(["-O2", "-w", "-o"]).arg(&out).arg(&source);
    if static_link {
        gcc.arg("-static");
    }
    let built = gcc.output()?;
    if !built.status.success() {
        bail!(
            "gcc{}: {}",
            if static_link { " -static" } else { "" },
            String::from_utf8_lossy(&built.stderr)
        );
    }
    Ok(out)
}

/// One run: microseconds per connect.
fn run(wrapper: &[String], program: &Path, args: &[String]) -> Result<f64> {
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest);
            c
        }
        None => Command::new(program),
    };
    if !wrapper.is_empty() {
        command.arg(program);
    }
    command.args(args);
    let out = procs::output_within(&mut command, Duration::from_secs(120))?;
    out.trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("{command:?}: no figure in {out:?}"))
}

pub fn measure(bins: &Path, report: &mut Report, rounds: usize) -> Result<()> {
    if !installed("gcc") || !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        report.missing.insert(
            "seccomp supervisor".into(),
            "gcc and a static libc are needed (apt-get install gcc libc6-dev)".into(),
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let dynamic = build(dir.path(), false)?;
    let fixed = build(dir.path(), true)?;
    let routed = accept_until_eof("127.0.0.3")?;
    // Nothing listens there: a UDP connect only sets the socket's peer.
    let unrouted = SocketAddr::from(([127, 0, 0, 4], 9));
    let unix = dir.path().join("u.sock");
    accept_and_close_unix(&unix)?;
    let tunnel = Tunnel::start(bins, routed, None)?;
    let preload = tunnel.wrapper(bins);
    let mut supervised = preload.clone();
    supervised.insert(1, "--seccomp".into());

    let tcp = |a: SocketAddr, n: usize| -> Vec<String> {
        vec![
            "tcp".into(),
            a.ip().to_string(),
            a.port().to_string(),
            n.to_string(),
        ]
    };
    let unix_args = vec![
        "unix".to_string(),
        unix.display().to_string(),
        "1000".to_string(),
    ];
    let none: Vec<String> = Vec::new();
    // (figure, wrapper, program, arguments)
    let udp = vec![
        "udp".to_string(),
        unrouted.ip().to_string(),
        unrouted.port().to_string(),
        "2000".to_string(),
    ];
    let cases: Vec<(&str, &[String], &Path, Vec<String>)> = vec![
        (
            "connect, unrouted (UDP, no handshake): direct",
            &none,
            &dynamic,
            udp.clone(),
        ),
        (
            "connect, unrouted (UDP, no handshake): preload",
            &preload,
            &dynamic,
            udp.clone(),
        ),
        (
            "connect, unrouted (UDP, no handshake): seccomp supervisor",
            &supervised,
            &fixed,
            udp.clone(),
        ),
        (
            "connect, AF_UNIX: direct",
            &none,
            &dynamic,
            unix_args.clone(),
        ),
        (
            "connect, AF_UNIX: preload",
            &preload,
            &dynamic,
            unix_args.clone(),
        ),
        (
            "connect, AF_UNIX: seccomp supervisor",
            &supervised,
            &fixed,
            unix_args.clone(),
        ),
        (
            "connect, routed (through the tunnel): preload",
            &preload,
            &dynamic,
            tcp(routed, 200),
        ),
        (
            "connect, routed (through the tunnel): seccomp supervisor",
            &supervised,
            &fixed,
            tcp(routed, 200),
        ),
    ];
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        // Each round in a rotated order, so that a busy moment does not always fall on
        // the same case.
        for i in 0..cases.len() {
            let k = (i + round) % cases.len();
            let (name, wrapper, program, args) = &cases[k];
            figures[k].push(run(wrapper, program, args).with_context(|| name.to_string())?);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut medians = Vec::new();
    for (k, (name, ..)) in cases.iter().enumerate() {
        let m = median(&mut figures[k]);
        medians.push(m);
        report
            .tunnel_only
            .insert((*name).to_string(), (m, "µs per connect".into()));
    }
    let added = |supervisor: usize, base: usize| medians[supervisor] - medians[base];
    let t = &mut report.tunnel_only;
    t.insert(
        "connect, unrouted: supervisor added over direct".into(),
        (added(2, 0), "µs".into()),
    );
    t.insert(
        "connect, AF_UNIX: supervisor added over direct".into(),
        (added(5, 3), "µs".into()),
    );
    t.insert(
        "connect, routed: supervisor / preload".into(),
        (medians[7] / medians[6], "×".into()),
    );
    Ok(())
}
