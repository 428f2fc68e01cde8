//! A static Go program (`CGO_ENABLED=0`: its own resolver, its own system calls) under
//! `tunnel-run`, in three network namespaces where the client site has no route to the
//! remote site and no resolver: `net/http` by a name only the remote site resolves and
//! by address, byte-exact, its DNS never leaving the client site; 2,000 dials beside 32
//! busy goroutines (SIGURG preemption) without an error. Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tunnel_tests::netns::{REMOTE_IP, Topology};
use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(240);
const NAME: &str = "web.site-b.internal";

const PROGRAM: &str = r#"
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	switch os.Args[1] {
	case "get":
		client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{Proxy: nil}}
		reply, err := client.Get(os.Args[2])
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		body, err := io.ReadAll(reply.Body)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		fmt.Printf("%d %x\n", len(body), sha256.Sum256(body))
	case "dials":
		address := os.Args[2]
		total, _ := strconv.Atoi(os.Args[3])
		spinners, _ := strconv.Atoi(os.Args[4])
		started := time.Now()
		var stop atomic.Bool
		var spin sync.WaitGroup
		for i := 0; i < spinners; i++ {
			spin.Add(1)
			// Busy without a call for longer than Go's 10 ms time slice, so the
			// runtime preempts it with SIGURG; then a pause, so that two cores
			// still serve the agent, the gateway and the dials.
			go func() {
				defer spin.Done()
				x := 0
				for !stop.Load() {
					for j := 0; j < 40000000; j++ {
						x += j
					}
					time.Sleep(600 * time.Millisecond)
				}
				_ = x
			}()
		}
		var failed atomic.Int64
		var first sync.Once
		var work sync.WaitGroup
		jobs := make(chan int)
		for w := 0; w < 16; w++ {
			work.Add(1)
			go func() {
				defer work.Done()
				for range jobs {
					conn, err := net.DialTimeout("tcp", address, 30*time.Second)
					if err != nil {
						failed.Add(1)
						fmt.Fprintln(os.Stderr, "dial:", err)
						continue
					}
					first.Do(func() { fmt.Println("peer", conn.RemoteAddr()) })
					buf := make([]byte, 5)
					if _, err = conn.Write([]byte("ping\n")); err == nil {
						_, err = io.ReadFull(conn, buf)
					}
					if err != nil || string(buf) != "ping\n" {
						failed.Add(1)
						fmt.Fprintln(os.Stderr, "echo:", err)
					}
					conn.Close()
				}
			}()
		}
		for i := 0; i < total; i++ {
			jobs <- i
		}
		close(jobs)
		work.Wait()
		stop.Store(true)
		spin.Wait()
		fmt.Fprintln(os.Stderr, "dials took", time.Since(started))
		fmt.Println("errors", failed.Load())
	}
}
"#;

/// Builds the program with Debian's Go toolchain, statically (no cgo).
fn go_program(site: &Site) -> PathBuf {
    require("go", "golang-go");
    let dir = site.path("go");
    std::fs::create_dir_all(&dir).expect("go dir");
    std::fs::write(dir.join("main.go"), PROGRAM).expect("main.go");
    let program = dir.join("client");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&program)
        .arg("main.go")
        .current_dir(&dir)
        .env("CGO_ENABLED", "0")
        .env("GO111MODULE", "off")
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("HOME", &dir)
        .output()
        .expect("go build");
    assert!(
        out.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = run_ok(Command::new("file").arg(&program));
    assert!(file.contains("statically linked"), "{file}");
    program
}

struct Sites {
    agent: Agent,
    _gateway: Gateway,
    _servers: Vec<Daemon>,
    site: Site,
    topology: Topology,
}

/// A python server in the remote namespace: the web server for `www`, or an echo
/// server on port 7.
fn remote_server(topology: &Topology, site: &Site, name: &str, script: &str) -> Daemon {
    let mut command = Topology::command(&topology.remote, "python3");
    command.args(["-u", "-c", script]);
    let mut daemon =
        Daemon::spawn(name, command, site.path(&format!("{name}.log"))).expect("server");
    daemon
        .wait_log("ready", Duration::from_secs(20))
        .expect("server up");
    daemon
}

fn sites(data: &Path) -> Sites {
    let topology = Topology::new(&[NAME]);
    let site = Site::new();
    let web = remote_server(
        &topology,
        &site,
        "web",
        &format!(
            "import http.server, functools\nh = functools.partial(http.server.SimpleHTTPRequestHandler, directory={:?})\ns = http.server.ThreadingHTTPServer(({REMOTE_IP:?}, 8080), h)\nprint('ready', flush=True)\ns.serve_forever()\n",
            data.display().to_string()
        ),
    );
    let echo = remote_server(
        &topology,
        &site,
        "echo",
        &format!(
            "import socketserver\nclass E(socketserver.StreamRequestHandler):\n    def handle(self):\n        for line in self.rfile:\n            self.wfile.write(line)\nsocketserver.ThreadingTCPServer.allow_reuse_address = True\nsocketserver.ThreadingTCPServer.daemon_threads = True\ns = socketserver.ThreadingTCPServer(({REMOTE_IP:?}, 7007), E)\ns.request_queue_size = 256\nprint('ready', flush=True)\ns.serve_forever()\n"
        ),
    );
    let (gateway, agent) = tunnel_across(&topology, &site, &["10.77.2.0/24", "*.site-b.internal"]);
    Sites {
        agent,
        _gateway: gateway,
        _servers: vec![web, echo],
        site,
        topology,
    }
}

impl Sites {
    fn run(&self, program: &Path) -> Command {
        let mut c = Topology::command(&self.topology.client, bin("tunnel-run"));
        c.arg("--config")
            .arg(&self.agent.config)
            .arg("--")
            .arg(program);
        c
    }
}

#[test]
fn a_static_go_program_reaches_the_remote_site_by_name_and_by_address() {
    if needs_root("a_static_go_program_reaches_the_remote_site_by_name_and_by_address") {
        return;
    }
    let data_dir = tempfile::tempdir().expect("data");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(data_dir.path().join("data.bin"), &data).expect("data");
    let want = {
        use sha2::Digest;
        format!("{} {}\n", data.len(), hex(&sha2::Sha256::digest(&data)))
    };
    let sites = sites(data_dir.path());
    let program = go_program(&sites.site);

    // The client site's nameserver (resolv.conf: 127.0.0.1) records every query it
    // gets: a routed name must never reach it.
    let mut listener = Topology::command(&sites.topology.client, "python3");
    listener.args([
        "-u",
        "-c",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', 53))\nprint('ready', flush=True)\nwhile True:\n    data, peer = s.recvfrom(4096)\n    print('query', data, flush=True)\n",
    ]);
    let mut nameserver =
        Daemon::spawn("nameserver", listener, sites.site.path("ns.log")).expect("nameserver");
    nameserver
        .wait_log("ready", Duration::from_secs(20))
        .expect("nameserver up");

    for host in [NAME, REMOTE_IP] {
        let url = format!("http://{host}:8080/data.bin");
        let (code, out, err) = output_within(sites.run(&program).args(["get", &url]), LIMIT);
        assert_eq!(code, Some(0), "{url}: {out}{err}");
        assert_eq!(out, want, "{url}: {err}");
    }
    let queries = nameserver.log_text();
    assert!(
        !queries.contains("site-b"),
        "the routed name's query reached the client site's nameserver:\n{queries}"
    );
    let streams = sites.agent.status().expect("status");
    let recent = streams["recent"].as_array().expect("recent");
    assert!(
        recent
            .iter()
            .any(|s| s["destination"].as_str() == Some(&format!("{NAME}:8080"))),
        "no stream to {NAME}:8080 by name: {recent:?}"
    );
}

#[test]
fn a_go_program_with_busy_goroutines_dials_2000_times_without_an_error() {
    if needs_root("a_go_program_with_busy_goroutines_dials_2000_times_without_an_error") {
        return;
    }
    let data_dir = tempfile::tempdir().expect("data");
    let sites = sites(data_dir.path());
    let program = go_program(&sites.site);
    let address = format!("{REMOTE_IP}:7007");
    let (code, out, err) = output_within(
        sites.run(&program).args(["dials", &address, "2000", "32"]),
        LIMIT,
    );
    eprintln!("{err}");
    assert_eq!(code, Some(0), "{out}{err}");
    // Go's RemoteAddr comes from getpeername: the address asked for, not the agent's.
    assert!(out.contains(&format!("peer {address}\n")), "{out}");
    assert!(out.ends_with("errors 0\n"), "{out}\n{err}");
}

/// The static C program again, with musl (after `compile_c` wrote its source).
fn musl_program(site: &Site) -> PathBuf {
    require("musl-gcc", "musl-tools");
    let musl = site.path("by-name-musl");
    run_ok(
        Command::new("musl-gcc")
            .args(["-static", "-O1", "-w", "-o"])
            .arg(&musl)
            .arg(site.path("by-name.c")),
    );
    musl
}

/// A static C program whose glibc resolver asks the nameserver itself.
const STATIC_BY_NAME: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
        int e = getaddrinfo(argv[1], strcmp(argv[2], "resolve") ? argv[2] : "80", &hints, &res);
    if (e != 0) { printf("getaddrinfo: %s\n", gai_strerror(e)); return 1; }
    if (!strcmp(argv[2], "resolve")) {
        char text[64];
        inet_ntop(AF_INET, &((struct sockaddr_in *)res->ai_addr)->sin_addr, text, sizeof text);
        printf("%s\n", text);
        return 0;
    }
    int fd = socket(res->ai_family, SOCK_STREAM, 0);
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) { printf("errno %d\n", errno); return 0; }
    dprintf(fd, "GET /data.bin HTTP/1.0\r\nHost: %s\r\n\r\n", argv[1]);
    char line[64] = {0};
    read(fd, line, 15);
    printf("%s\n", line);
    return 0;
}
"#;

#[test]
fn static_glibc_and_musl_programs_resolve_a_routed_name_and_get_the_real_errno() {
    if needs_root("static_glibc_and_musl_programs_resolve_a_routed_name_and_get_the_real_errno") {
        return;
    }
    let data_dir = tempfile::tempdir().expect("data");
    std::fs::write(data_dir.path().join("data.bin"), "data\n").expect("data");
    let sites = sites(data_dir.path());
    let glibc = compile_c(
        &sites.site,
        "by-name",
        STATIC_BY_NAME,
        &["-static", "-O1", "-w"],
    );
    // musl's resolver sends with sendto on an unconnected socket and takes an answer
    // only from the nameserver's own address (recvfrom).
    let musl = musl_program(&sites.site);
    for program in [&glibc, &musl] {
        let (code, out, err) = output_within(sites.run(program).args([NAME, "8080"]), LIMIT);
        assert_eq!(code, Some(0), "{}: {out}{err}", program.display());
        assert_eq!(out, "HTTP/1.0 200 OK\n", "{}: {err}", program.display());
        // A closed port at the far site: the far side's ECONNREFUSED, by name.
        let (code, out, err) = output_within(sites.run(program).args([NAME, "9"]), LIMIT);
        assert_eq!(code, Some(0), "{out}{err}");
        assert_eq!(
            out,
            format!("errno {}\n", nix::libc::ECONNREFUSED),
            "{}: {err}",
            program.display()
        );
    }
}

/// A nameserver for the client site (its resolv.conf's 127.0.0.1): `plain.example` is
/// 192.0.2.7, every other name does not exist; each query is logged.
const CLIENT_NAMESERVER: &str = r"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('127.0.0.1', 53))
print('ready', flush=True)
while True:
    q, peer = s.recvfrom(4096)
    print('query', q, flush=True)
    i = 12
    while i < len(q) and q[i] != 0:
        i += q[i] + 1
    end = i + 5
    qtype = struct.unpack('>H', q[i + 1:i + 3])[0]
    if q[12:i].lower() == b'\x05plain\x07example' and qtype == 1:
        r = q[:2] + b'\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00' + q[12:end]
        r += b'\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04' + bytes([192, 0, 2, 7])
    elif q[12:i].lower() == b'\x05plain\x07example':
        r = q[:2] + b'\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00' + q[12:end]
    else:
        r = q[:2] + b'\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00' + q[12:end]
    s.sendto(r, peer)
";

#[test]
fn unrouted_names_resolve_through_the_stub_over_udp_and_tcp() {
    if needs_root("unrouted_names_resolve_through_the_stub_over_udp_and_tcp") {
        return;
    }
    let data_dir = tempfile::tempdir().expect("data");
    std::fs::write(data_dir.path().join("data.bin"), "data\n").expect("data");
    let sites = sites(data_dir.path());
    let mut nameserver = Topology::command(&sites.topology.client, "python3");
    nameserver.args(["-u", "-c", CLIENT_NAMESERVER]);
    let mut nameserver =
        Daemon::spawn("nameserver", nameserver, sites.site.path("ns.log")).expect("nameserver");
    nameserver
        .wait_log("ready", Duration::from_secs(20))
        .expect("nameserver up");
    let glibc = compile_c(
        &sites.site,
        "by-name",
        STATIC_BY_NAME,
        &["-static", "-O1", "-w"],
    );
    let musl = musl_program(&sites.site);
    // An unrouted name goes on to the client site's nameserver and comes back: musl
    // sends from an unbound socket with sendto; glibc told to use TCP (use-vc) reaches
    // the stub's TCP listener.
    for (program, options) in [(&musl, ""), (&glibc, ""), (&glibc, "use-vc")] {
        let (code, out, err) = output_within(
            sites
                .run(program)
                .env("RES_OPTIONS", options)
                .args(["plain.example", "resolve"]),
            LIMIT,
        );
        assert_eq!(code, Some(0), "{} {options}: {out}{err}", program.display());
        assert_eq!(out, "192.0.2.7\n", "{} {options}: {err}", program.display());
    }
    // A routed name over TCP: answered by the stub, never asked of the nameserver.
    let (code, out, err) = output_within(
        sites
            .run(&glibc)
            .env("RES_OPTIONS", "use-vc")
            .args([NAME, "8080"]),
        LIMIT,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "HTTP/1.0 200 OK\n", "{err}");
    let log = nameserver.log_text();
    assert!(log.contains("plain"), "{log}");
    assert!(
        !log.contains("site-b"),
        "a routed name reached the nameserver:\n{log}"
    );
}
