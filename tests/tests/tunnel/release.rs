//! The release build (`scripts/release`, which `scripts/test` runs first) works on
//! glibc 2.28 (RHEL 8) and newer: no dynamic symbol of the four artifacts asks for a
//! newer glibc, and the artifacts work.

use std::path::PathBuf;
use std::process::Command;

use tunnel_tests::*;

const NEWEST: (u32, u32) = (2, 28);

fn release_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/x86_64-unknown-linux-gnu/release")
}

/// The glibc versions an ELF file's dynamic symbols ask for (`objdump -T`).
fn glibc_versions(file: &std::path::Path) -> Vec<(u32, u32)> {
    let out = run_ok(Command::new("objdump").arg("-T").arg(file));
    let mut versions: Vec<(u32, u32)> = out
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .collect();
    versions.sort_unstable();
    versions.dedup();
    versions
}

#[test]
fn the_release_build_needs_no_glibc_newer_than_2_28_and_works() {
    require("objdump", "binutils");
    let dir = release_dir();
    for artifact in [
        "tunnel-agent",
        "tunnel-gateway",
        "tunnel-run",
        "libtunnel_preload.so",
    ] {
        let path = dir.join(artifact);
        assert!(
            path.exists(),
            "{} is missing: run scripts/release (scripts/test runs it first)",
            path.display()
        );
        let versions = glibc_versions(&path);
        assert!(!versions.is_empty(), "{artifact}: no GLIBC_ versions read");
        let newer: Vec<_> = versions.iter().filter(|v| **v > NEWEST).collect();
        assert!(
            newer.is_empty(),
            "{artifact} needs glibc {newer:?}, newer than {NEWEST:?}"
        );
    }
    // The release tunnel-run and its library carry a program's connection through an
    // agent (this build's agent, the same local protocol).
    let echo = echo_server("127.0.0.1").to_string();
    let tunnel = Tunnel::start_routed(&allow_alice(&[&echo]), &[], &[&echo]).expect("tunnel");
    let (host, port) = echo.split_once(':').expect("ip:port");
    let program = format!(
        "import socket\ns = socket.create_connection(('{host}', {port}), timeout=10)\ns.sendall(b'release\\n')\nprint(s.recv(100).decode().strip())\n"
    );
    let out = run_ok(
        Command::new(dir.join("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .args(["--", "/usr/bin/python3", "-c", &program]),
    );
    assert_eq!(out.trim(), "release");
    assert!(
        tunnel.streams_seen() >= 1,
        "the connection did not go through the agent"
    );
}
