//! Unmodified programs through `tunnel-run` and `LD_PRELOAD`, on loopback: destinations
//! on 127.0.0.2 are routed; the agent listens on 127.0.0.1.

use std::process::Command;
use std::time::Duration;

use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A tunnel that routes and allows 127.0.0.2, with an HTTP server there.
fn routed() -> (Tunnel, Daemon, std::net::SocketAddr) {
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    let www = tunnel.site.path("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello through the tunnel\n").expect("file");
    let (server, addr) = http_server("127.0.0.2", &www);
    (tunnel, server, addr)
}

/// A tunnel that routes and allows 127.0.0.2, with an echo server there.
fn routed_echo() -> (Tunnel, std::net::SocketAddr) {
    let echo = echo_server("127.0.0.2");
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    (tunnel, echo)
}

#[test]
fn curl_python_node_and_nc_go_through_tunnel_run() {
    require("curl", "curl");
    require("node", "nodejs");
    require("nc", "netcat-openbsd");
    let (tunnel, _server, web) = routed();
    let url = format!("http://{web}/hello.txt");
    let before = tunnel.streams_seen();

    let out = stdout_within(tunnel.run("curl").args(["-sS", "--fail", &url]), LIMIT);
    assert_eq!(out, "hello through the tunnel\n");
    let py = format!(
        "import urllib.request; print(urllib.request.urlopen('{url}').read().decode(), end='')"
    );
    assert_eq!(
        stdout_within(tunnel.run("python3").args(["-c", &py]), LIMIT),
        out
    );
    let node_get = format!(
        "require('http').get('{url}', r => {{ let b=''; r.on('data', d => b += d); r.on('end', () => process.stdout.write(b)); }}).on('error', e => {{ console.error(e); process.exit(1); }})"
    );
    assert_eq!(
        stdout_within(tunnel.run("node").args(["-e", &node_get]), LIMIT),
        out
    );
    let node_fetch = format!(
        "fetch('{url}').then(r => r.text()).then(t => process.stdout.write(t)).catch(e => {{ console.error(e); process.exit(1); }})"
    );
    assert_eq!(
        stdout_within(tunnel.run("node").args(["-e", &node_fetch]), LIMIT),
        out
    );
    let nc = format!(
        "printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -N {} {}",
        web.ip(),
        web.port()
    );
    let reply = stdout_within(tunnel.run("sh").args(["-c", &nc]), LIMIT);
    assert!(reply.ends_with("hello through the tunnel\n"), "{reply}");

    // Five programs, five streams through the tunnel: none went direct.
    assert_eq!(
        tunnel.streams_seen() - before,
        5,
        "{}",
        tunnel.agent.status().unwrap_or_default()
    );
}

#[test]
fn blocking_connect_gets_the_real_errno_promptly() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let denied = echo_server("127.0.0.3");
    let tunnel = Tunnel::start_routed(
        &allow_alice(&["127.0.0.2/32"]),
        &[],
        &["127.0.0.2/32", "127.0.0.3/32"],
    )
    .expect("tunnel");
    let script = format!(
        r#"
import socket, time
def attempt(addr):
    start = time.monotonic()
    try:
        # No timeout: with one, python makes the socket non-blocking, and a
        # non-blocking connect learns of a remote failure as a reset instead.
        socket.create_connection(addr)
        return "connected", time.monotonic() - start
    except OSError as e:
        return type(e).__name__, time.monotonic() - start
print(*attempt(("127.0.0.2", {closed})))
print(*attempt(("127.0.0.3", {denied_port})))
"#,
        denied_port = denied.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    let lines: Vec<(&str, f64)> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(what, secs)| (what, secs.parse().unwrap_or(f64::MAX)))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0].0, "ConnectionRefusedError", "closed port: {out}");
    // EACCES: the gateway's policy said no (see the README's failure table).
    assert_eq!(lines[1].0, "PermissionError", "denied destination: {out}");
    assert!(lines.iter().all(|(_, secs)| *secs < 5.0), "too slow: {out}");
}

#[test]
fn non_blocking_connects_work_and_remote_failures_are_failed_connects() {
    require("node", "nodejs");
    let (tunnel, _server, web) = routed();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let script = format!(
        r#"
import asyncio
async def fetch():
    r, w = await asyncio.open_connection("{ip}", {port})
    w.write(b"GET /hello.txt HTTP/1.0\r\n\r\n")
    body = await r.read()
    return body.split(b"\r\n\r\n", 1)[1].decode()
async def failing():
    try:
        r, w = await asyncio.open_connection("{ip}", {closed})
        w.write(b"hello")
        data = await r.read()
        return "EOF" if data == b"" else "data"
    except ConnectionResetError:
        return "reset"
    except ConnectionRefusedError:
        return "refused"
async def main():
    print(await fetch(), end="")
    print(await failing())
asyncio.run(main())
"#,
        ip = web.ip(),
        port = web.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    assert_eq!(out, "hello through the tunnel\nrefused\n", "python asyncio");

    let node = format!(
        r#"
const net = require('net');
const s = net.connect({{host: '{ip}', port: {closed}}}, () => s.write('hello'));
s.on('data', () => {{ console.log('data'); process.exit(1); }});
s.on('end', () => {{ console.log('EOF'); process.exit(1); }});
s.on('error', e => {{ console.log(e.code); process.exit(0); }});
"#,
        ip = web.ip()
    );
    let out = stdout_within(tunnel.run("node").args(["-e", &node]), LIMIT);
    assert_eq!(
        out.trim(),
        "ECONNREFUSED",
        "node: a refused far port must be a refused connect"
    );
}

#[test]
fn getpeername_shows_the_original_destination() {
    let (tunnel, _server, web) = routed();
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {}))\nprint(s.getpeername()[0], s.getpeername()[1], s.getsockname()[0])",
        web.ip(),
        web.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    // The kernel's peer is the agent on 127.0.0.1; the program sees where it was going.
    assert_eq!(out.trim(), format!("{} {} 127.0.0.1", web.ip(), web.port()));
}

#[test]
fn agent_down_fails_closed_fast_and_leaves_other_traffic_alone() {
    let routed_server = echo_server("127.0.0.2");
    let direct_server = echo_server("127.0.0.4");
    let site = Site::new();
    let library = bin_dir().join("libtunnel_preload.so");
    assert!(library.exists(), "{} is not built", library.display());
    let script = format!(
        r#"
import socket, time, statistics
times = []
for _ in range(21):
    start = time.perf_counter()
    try:
        socket.create_connection(("127.0.0.2", {routed}))
        print("LEAK"); raise SystemExit(1)
    except ConnectionRefusedError:
        times.append(time.perf_counter() - start)
print("median_ms", statistics.median(times) * 1000)
s = socket.create_connection(("127.0.0.4", {direct}))
s.sendall(b"ping"); print("direct", s.recv(4).decode())
"#,
        routed = routed_server.port(),
        direct = direct_server.port()
    );
    let out = stdout_within(
        Command::new("python3")
            .args(["-c", &script])
            .env("LD_PRELOAD", &library)
            .env("TUNNEL_ROUTES", "site-b=127.0.0.2/32")
            .env("TUNNEL_AGENT", site.path("no-agent-here.sock")),
        LIMIT,
    );
    let median: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("median_ms "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        median < 10.0,
        "a routed connect with no agent took {median} ms"
    );
    assert!(out.contains("direct ping"), "{out}");

    // LD_PRELOAD alone (no TUNNEL_ROUTES): the library changes nothing.
    let plain = format!(
        "import socket\ns = socket.create_connection(('127.0.0.2', {}))\ns.sendall(b'pong'); print(s.recv(4).decode(), s.getpeername()[0])",
        routed_server.port()
    );
    let out = stdout_within(
        Command::new("python3")
            .args(["-c", &plain])
            .env("LD_PRELOAD", &library)
            .env_remove("TUNNEL_ROUTES"),
        LIMIT,
    );
    assert_eq!(out.trim(), "pong 127.0.0.2");
}

#[test]
fn many_threads_and_many_processes_without_leaks_or_deadlock() {
    require("curl", "curl");
    let echo = echo_server("127.0.0.2");
    let (tunnel, _server, web) = routed();
    let script = format!(
        r#"
import os, socket, threading
def fds(): return len(os.listdir("/proc/self/fd"))
before = fds()
errors = []
def worker(n):
    for i in range(200):
        try:
            with socket.create_connection(("127.0.0.2", {port}), timeout=30) as s:
                msg = f"{{n}}-{{i}}".encode()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(64)
                    if not chunk: break
                    got += chunk
                if got != msg: errors.append((n, i, got))
        except OSError as e:
            errors.append((n, i, repr(e)))
threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print("errors", len(errors), errors[:3])
print("fds", before, fds())
"#,
        port = echo.port()
    );
    let out = stdout_within(
        tunnel.run("python3").args(["-c", &script]),
        Duration::from_secs(240),
    );
    assert!(out.contains("errors 0 "), "{out}");
    let fds: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("fds "))
        .map(|l| l.split(' ').collect())
        .unwrap_or_default();
    assert_eq!(fds.len(), 2, "{out}");
    assert_eq!(fds[0], fds[1], "file descriptors leaked: {out}");

    let url = format!("http://{web}/hello.txt");
    let loop_script = format!(
        "for i in $(seq 200); do curl -sS --fail --max-time 20 -o /dev/null {url} || {{ echo failed at $i; exit 1; }}; done; echo all done"
    );
    let out = stdout_within(
        tunnel.run("bash").args(["-c", &loop_script]),
        Duration::from_secs(240),
    );
    assert_eq!(out.trim(), "all done");
}

#[test]
fn another_user_cannot_register_with_the_agent() {
    if needs_root("another_user_cannot_register_with_the_agent") {
        return;
    }
    require("setpriv", "util-linux");
    let (tunnel, echo) = routed_echo();
    // Open the way to the socket, so that only the agent's own check stands between
    // the other user and a registration.
    use std::os::unix::fs::PermissionsExt;
    let socket = tunnel.site.path("agent/agent.sock");
    let everyone = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    everyone(tunnel.site.dir.path(), 0o755);
    everyone(&tunnel.site.path("agent"), 0o755);
    everyone(&socket, 0o777);
    let library = bin_dir().join("libtunnel_preload.so");
    let mut library_dir = library.parent();
    while let Some(dir) = library_dir {
        let mode = std::fs::metadata(dir)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        everyone(dir, mode | 0o005);
        library_dir = dir.parent();
    }
    let raw = format!(
        r#"
import socket
u = socket.socket(socket.AF_UNIX)
u.connect("{socket}")
u.sendall(b"REGISTER 127.0.0.1:40000 127.0.0.2:{port} site-b nowait\n")
print(u.recv(200).decode().strip())
try:
    socket.create_connection(("127.0.0.2", {port}), timeout=10)
    print("connected")
except OSError as e:
    print(type(e).__name__)
"#,
        socket = socket.display(),
        port = echo.port()
    );
    let before = tunnel.streams_seen();
    let out = stdout_within(
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                &raw,
            ])
            .env("LD_PRELOAD", &library)
            .env("TUNNEL_ROUTES", "site-b=127.0.0.2/32")
            .env("TUNNEL_AGENT", &socket),
        LIMIT,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("ERR forbidden")),
        "{out}"
    );
    assert_eq!(lines.get(1), Some(&"ConnectionRefusedError"), "{out}");
    assert_eq!(
        tunnel.streams_seen(),
        before,
        "another user's connection was carried"
    );
    assert!(
        tunnel
            .agent
            .daemon
            .log_text()
            .contains("refused a request from another user")
    );
}

#[test]
fn a_name_only_the_gateway_knows_through_a_command_line_route() {
    require("curl", "curl");
    let www_site = Site::new();
    let www = www_site.path("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("hello.txt"), "hello by name\n").expect("file");
    let (_server, web) = http_server("127.0.0.2", &www);
    // The gateway knows the name from its [hosts]; nothing on this machine resolves it.
    let rules = format!(
        "{}\n[hosts]\n\"files.site-b.internal\" = [\"127.0.0.2\"]\n",
        allow_alice(&["127.0.0.2/32", "*.site-b.internal"])
    );
    // The running agent has no route for the name: only `--route` names it.
    let tunnel = Tunnel::start_routed(&rules, &[], &["127.0.0.9/32"]).expect("tunnel");
    let url = format!("http://files.site-b.internal:{}/hello.txt", web.port());
    let (code, _, _) = output_within(
        Command::new("curl").args(["-sS", "--max-time", "5", &url]),
        LIMIT,
    );
    assert_ne!(code, Some(0), "this machine resolves the name by itself");
    let out = stdout_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .args([
                "--route",
                "*.site-b.internal=site-b",
                "--",
                "curl",
                "-sS",
                "--fail",
                &url,
            ]),
        LIMIT,
    );
    assert_eq!(out, "hello by name\n");

    // The other lookups a program may use: gethostbyname_r (python's
    // gethostbyname_ex), gethostbyname2 (getent hosts), and getnameinfo back to the name.
    let lookups = r#"
import socket
name, aliases, addresses = socket.gethostbyname_ex("files.site-b.internal")
print(name, addresses[0].startswith("198.1"))
print(socket.getnameinfo((addresses[0], 80), 0)[0])
print(socket.getnameinfo((addresses[0], 80), socket.NI_NUMERICHOST)[0] == addresses[0])
"#;
    let out = stdout_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .args([
                "--route",
                "*.site-b.internal=site-b",
                "--",
                "python3",
                "-c",
                lookups,
            ]),
        LIMIT,
    );
    assert_eq!(
        out,
        "files.site-b.internal True\nfiles.site-b.internal\nTrue\n"
    );
    let getent = stdout_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .args([
                "--route",
                "*.site-b.internal=site-b",
                "--",
                "getent",
                "hosts",
                "files.site-b.internal",
            ]),
        LIMIT,
    );
    assert!(getent.contains("files.site-b.internal"), "{getent}");
    let recent = tunnel.agent.status().expect("status")["recent"].clone();
    assert_eq!(
        recent[0]["destination"],
        format!("files.site-b.internal:{}", web.port()),
        "the name must travel to the gateway: {recent}"
    );
}

#[test]
fn a_non_blocking_connect_polled_with_connect_again_completes_once() {
    let (tunnel, echo) = routed_echo();
    // The old idiom: call connect until it says EISCONN, then talk.
    let source = format!(
        r#"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {{0}};
    a.sin_family = AF_INET; a.sin_port = htons({port});
    inet_pton(AF_INET, "127.0.0.2", &a.sin_addr);
    int calls = 0;
    for (;;) {{
        calls++;
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0 || errno == EISCONN) break;
        if (errno != EINPROGRESS && errno != EALREADY) {{ perror("connect"); return 1; }}
        if (calls > 10000) {{ fprintf(stderr, "never connected\n"); return 1; }}
        usleep(1000);
    }}
    fcntl(s, F_SETFL, 0);
    write(s, "poll", 4);
    char buf[5] = {{0}};
    if (read(s, buf, 4) != 4) {{ perror("read"); return 1; }}
    printf("%s\n", buf);
    return 0;
}}
"#,
        port = echo.port()
    );
    let program = compile_c(&tunnel.site, "poll", &source, &[]);
    let out = stdout_within(&mut tunnel.run(program.to_str().expect("path")), LIMIT);
    assert_eq!(out.trim(), "poll");
    assert_eq!(tunnel.streams_seen(), 1, "one connection, one stream");
    let status = tunnel.agent.status().expect("status");
    assert_eq!(
        status["registrations_pending"], 0,
        "each poll registered the connection again: {status}"
    );
}

#[test]
fn a_connection_the_preload_did_not_announce_is_dropped() {
    let (tunnel, echo) = routed_echo();
    let status = tunnel.agent.status().expect("status");
    let listener: std::net::SocketAddr = status["loopback_listeners"][0]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no loopback listener in {status}"));
    // Some other program of this machine finds the agent's port and connects.
    // It only reads: a write could take the reset's error first and leave an EOF. The
    // reset may come so soon that connecting itself reports it.
    let read = std::net::TcpStream::connect(listener).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 16];
        std::io::Read::read(&mut s, &mut buf)
    });
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "an unannounced connection must be reset, got {read:?}"
    );
    assert_eq!(tunnel.streams_seen(), 0, "it was carried");
    let _ = echo;
}

#[test]
fn getaddrinfo_honours_the_family_asked_for() {
    let tunnel = Tunnel::start_routed(
        &allow_alice(&["*.site-b.internal"]),
        &[],
        &["*.site-b.internal"],
    )
    .expect("tunnel");
    let script = r#"
import socket
for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNSPEC):
    infos = socket.getaddrinfo("db.site-b.internal", 5432, family, socket.SOCK_STREAM)
    print(sorted({i[0].name for i in infos}), infos[0][4][1])
"#;
    let out = stdout_within(tunnel.run("python3").args(["-c", script]), LIMIT);
    assert_eq!(
        out, "['AF_INET'] 5432\n['AF_INET6'] 5432\n['AF_INET', 'AF_INET6'] 5432\n",
        "{out}"
    );
}

#[test]
fn a_socket_bound_to_any_address_first_is_still_carried() {
    let (tunnel, echo) = routed_echo();
    // As `nc -p PORT` and FTP-style clients do: bind 0.0.0.0:N, then connect.
    let script = format!(
        "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.connect(('127.0.0.2', {}))\ns.sendall(b'bound')\nprint(s.recv(5).decode())",
        echo.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    assert_eq!(out.trim(), "bound");
    assert_eq!(tunnel.streams_seen(), 1);
}

#[test]
fn an_ipv6_address_of_the_old_24_byte_length_is_routed_too() {
    let (tunnel, echo) = routed_echo();
    // An IPv6 socket, the IPv4-mapped address of a routed host, and the RFC 2133 length
    // (no scope id) that Linux still accepts.
    let source = format!(
        r#"
#include <arpa/inet.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {{
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = {{0}};
    a.sin6_family = AF_INET6; a.sin6_port = htons({port});
    inet_pton(AF_INET6, "::ffff:127.0.0.2", &a.sin6_addr);
    if (connect(s, (struct sockaddr *)&a, 24) != 0) {{ perror("connect"); return 1; }}
    write(s, "short", 5);
    char buf[6] = {{0}};
    if (read(s, buf, 5) != 5) {{ perror("read"); return 1; }}
    printf("%s\n", buf);
    return 0;
}}
"#,
        port = echo.port()
    );
    let program = compile_c(&tunnel.site, "short6", &source, &[]);
    let out = stdout_within(&mut tunnel.run(program.to_str().expect("path")), LIMIT);
    assert_eq!(out.trim(), "short");
    assert_eq!(tunnel.streams_seen(), 1, "the connection went direct");
}

/// Every process under the preload pays for loading it: the library brings no other
/// shared library along (Rust's unwinder is linked in, not `libgcc_s.so.1`), and a
/// panic caught inside a hook still unwinds (the routed tests exercise that path).
#[test]
fn the_preload_loads_no_other_library() {
    let library = bin("libtunnel_preload.so");
    let maps = stdout_within(
        Command::new("cat")
            .arg("/proc/self/maps")
            .env("LD_PRELOAD", &library),
        LIMIT,
    );
    assert!(maps.contains("libtunnel_preload.so"), "{maps}");
    let baseline = stdout_within(Command::new("cat").arg("/proc/self/maps"), LIMIT);
    let libraries = |maps: &str| -> std::collections::BTreeSet<String> {
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| p.contains(".so") && !p.contains("libtunnel_preload"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        libraries(&maps),
        libraries(&baseline),
        "the preload pulled in other libraries"
    );
}

/// TCP Fast Open connects inside `sendto`/`sendmsg` (MSG_FASTOPEN), with no `connect`
/// call at all: a routed destination must still go through the tunnel, never direct.
#[test]
fn a_fast_open_send_to_a_routed_destination_goes_through_the_tunnel() {
    let (tunnel, echo) = routed_echo();
    let unrouted = echo_server("127.0.0.1");
    let script = format!(
        r#"
import socket, select
to = ('127.0.0.2', {port})
a = socket.socket()
assert a.sendto(b'sendto', socket.MSG_FASTOPEN, to) == 6
b = socket.socket()
assert b.sendmsg([b'send', b'msg'], [], socket.MSG_FASTOPEN, to) == 7
# Non-blocking: the connect is under way (EINPROGRESS, as without a cookie); the
# program sends once the socket is writable.
c = socket.socket()
c.setblocking(False)
try:
    c.sendto(b'nonblocking', socket.MSG_FASTOPEN, to)
except BlockingIOError:
    select.select([], [c], [], 10)
    c.send(b'nonblocking')
c.setblocking(True)
# Not routed: the program's own Fast Open, untouched.
d = socket.socket()
assert d.sendto(b'direct', socket.MSG_FASTOPEN, ('127.0.0.1', {unrouted})) == 6
print(a.recv(6).decode(), b.recv(7).decode(), c.recv(11).decode(), d.recv(6).decode())
"#,
        port = echo.port(),
        unrouted = unrouted.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    assert_eq!(out.trim(), "sendto sendmsg nonblocking direct");
    assert_eq!(
        tunnel.streams_seen(),
        3,
        "a Fast Open connection went direct"
    );
}

/// `sendmmsg` with MSG_FASTOPEN connects on its first message's address, as the
/// kernel does: routed, it goes through the tunnel too.
#[test]
fn a_fast_open_sendmmsg_to_a_routed_destination_goes_through_the_tunnel() {
    let (tunnel, echo) = routed_echo();
    let source = format!(
        r#"
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {{0}};
    a.sin_family = AF_INET; a.sin_port = htons({port});
    inet_pton(AF_INET, "127.0.0.2", &a.sin_addr);
    struct iovec v = {{ .iov_base = "mmsg", .iov_len = 4 }};
    struct mmsghdr m = {{0}};
    m.msg_hdr.msg_name = &a; m.msg_hdr.msg_namelen = sizeof a;
    m.msg_hdr.msg_iov = &v; m.msg_hdr.msg_iovlen = 1;
    if (sendmmsg(s, &m, 1, MSG_FASTOPEN) != 1) {{ perror("sendmmsg"); return 1; }}
    char buf[5] = {{0}};
    if (read(s, buf, 4) != 4) {{ perror("read"); return 1; }}
    printf("%s\n", buf);
    return 0;
}}
"#,
        port = echo.port()
    );
    let program = compile_c(&tunnel.site, "fastopen_mmsg", &source, &[]);
    let out = stdout_within(&mut tunnel.run(program.to_str().expect("path")), LIMIT);
    assert_eq!(out.trim(), "mmsg");
    assert_eq!(tunnel.streams_seen(), 1, "the connection went direct");
}

/// The library reads its environment when it is loaded, before the program can start a
/// thread. Read at the first hooked call instead, a fork from another thread while that
/// read was under way left the child waiting for ever on a read no thread of its own
/// would finish.
#[test]
fn a_fork_during_the_first_routed_connect_never_hangs_the_child() {
    let (tunnel, echo) = routed_echo();
    // A long route list makes reading it take long enough (about half a millisecond)
    // for the forks to land inside it.
    let mut routes = "site-b=127.0.0.2/32".to_string();
    for i in 0..2000 {
        routes.push_str(&format!(",10.{}.{}.0/24", i / 250, i % 250));
    }
    let source = format!(
        r#"
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static atomic_int forking, done;
static pid_t children[20000];
static int count;

static int connect_to(const char *ip, int port) {{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {{0}};
    a.sin_family = AF_INET; a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    return connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? s : -1;
}}

/* Forks until the main thread's connect is done; each child makes one hooked call
   (a connect to a closed port, not routed) and exits. */
static void *forker(void *arg) {{
    (void)arg;
    while ((!atomic_load(&done) || count < 3) && count < 20000) {{
        pid_t pid = fork();
        if (pid == 0) {{ connect_to("127.0.0.1", 1); _exit(0); }}
        if (pid > 0) children[count++] = pid;
        atomic_store(&forking, 1);
    }}
    return NULL;
}}

int main(void) {{
    pthread_t thread;
    pthread_create(&thread, NULL, forker, NULL);
    while (!atomic_load(&forking)) ;
    int s = connect_to("127.0.0.2", {port});
    char buf[5] = {{0}};
    if (s < 0 || write(s, "fork", 4) != 4 || read(s, buf, 4) != 4) {{ perror("routed"); return 1; }}
    atomic_store(&done, 1);
    pthread_join(thread, NULL);
    /* Every child has 10 s in all to exit; one still there then is stuck. */
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int stuck = 0;
    for (int i = 0; i < count; i++) {{
        while (waitpid(children[i], NULL, WNOHANG) == 0) {{
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec > 10) {{
                stuck++;
                kill(children[i], SIGKILL);
                waitpid(children[i], NULL, 0);
                break;
            }}
            usleep(1000);
        }}
    }}
    printf("%s %d children, %d stuck\n", buf, count, stuck);
    return 0;
}}
"#,
        port = echo.port()
    );
    let program = compile_c(&tunnel.site, "fork_race", &source, &["-pthread"]);
    let rounds = 10;
    for round in 0..rounds {
        let out = stdout_within(
            Command::new(&program)
                .env("LD_PRELOAD", bin("libtunnel_preload.so"))
                .env("TUNNEL_ROUTES", &routes)
                .env("TUNNEL_AGENT", tunnel.site.path("agent/agent.sock")),
            LIMIT,
        );
        assert!(
            out.starts_with("fork ") && out.trim_end().ends_with(", 0 stuck"),
            "round {round}: {out}"
        );
    }
    assert_eq!(
        tunnel.streams_seen(),
        rounds,
        "a routed connect went direct"
    );
}

/// A C program that looks `names` up with each of the gethostbyname family and
/// getaddrinfo, and prints for each name how every one of them failed (or `ok`).
fn host_errors_program(site: &Site) -> std::path::PathBuf {
    let source = r#"
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <sys/socket.h>

static const char *herr(int e) {
    switch (e) {
    case 0: return "0";
    case HOST_NOT_FOUND: return "HOST_NOT_FOUND";
    case TRY_AGAIN: return "TRY_AGAIN";
    case NO_RECOVERY: return "NO_RECOVERY";
    case NO_DATA: return "NO_DATA";
    case NETDB_INTERNAL: return "NETDB_INTERNAL";
    default: return "?";
    }
}

static const char *rc_name(int rc) {
    switch (rc) {
    case 0: return "0";
    case EAGAIN: return "EAGAIN";
    case ERANGE: return "ERANGE";
    default: return "other";
    }
}

static const char *gai(int rc) {
    switch (rc) {
    case 0: return "ok";
    case EAI_AGAIN: return "EAI_AGAIN";
    case EAI_NONAME: return "EAI_NONAME";
    case EAI_FAIL: return "EAI_FAIL";
    default: return "?";
    }
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        struct hostent *h, ret, *result;
        char buf[1024];
        int e, rc;
        h_errno = 0;
        h = gethostbyname(name);
        printf("%s: gethostbyname %s", name, h ? "ok" : herr(h_errno));
        h_errno = 0;
        h = gethostbyname2(name, AF_INET6);
        printf(", gethostbyname2 %s", h ? "ok" : herr(h_errno));
        e = 0; result = &ret;
        rc = gethostbyname_r(name, &ret, buf, sizeof buf, &result, &e);
        printf(", gethostbyname_r %s %s", rc_name(rc), result ? "ok" : herr(e));
        e = 0; result = &ret;
        rc = gethostbyname2_r(name, AF_INET6, &ret, buf, sizeof buf, &result, &e);
        printf(", gethostbyname2_r %s %s", rc_name(rc), result ? "ok" : herr(e));
        struct addrinfo *ai = NULL;
        rc = getaddrinfo(name, "80", NULL, &ai);
        printf(", getaddrinfo %s\n", gai(rc));
        if (rc == 0) freeaddrinfo(ai);
    }
    return 0;
}
"#;
    compile_c(site, "host_errors", source, &[])
}

/// A routed name that gets no address fails the way the resolver would say it: the
/// gethostbyname family sets `h_errno` (and the `_r` forms their `h_errnop`), and
/// getaddrinfo returns the matching code. Programs tell "try again" from "no such host".
#[test]
fn routed_names_that_get_no_address_set_h_errno() {
    let site = Site::new();
    let program = host_errors_program(&site);
    // No agent: a temporary failure. Not a host name at all: not found, without asking.
    let out = stdout_within(
        Command::new(&program)
            .args(["db.site-b.internal", "bad!name.site-b.internal"])
            .env("LD_PRELOAD", bin("libtunnel_preload.so"))
            .env("TUNNEL_ROUTES", "site-b=*.site-b.internal")
            .env("TUNNEL_AGENT", site.path("no-agent-here.sock")),
        LIMIT,
    );
    assert_eq!(
        out,
        "db.site-b.internal: gethostbyname TRY_AGAIN, gethostbyname2 TRY_AGAIN, \
         gethostbyname_r EAGAIN TRY_AGAIN, gethostbyname2_r EAGAIN TRY_AGAIN, \
         getaddrinfo EAI_AGAIN\n\
         bad!name.site-b.internal: gethostbyname HOST_NOT_FOUND, gethostbyname2 \
         HOST_NOT_FOUND, gethostbyname_r 0 HOST_NOT_FOUND, gethostbyname2_r 0 \
         HOST_NOT_FOUND, getaddrinfo EAI_NONAME\n"
    );

    // The agent's synthetic pool full: asking again will not help.
    let gw_dir = site.init_gateway("gateway");
    let creds = site.issue(&gw_dir, "alice", "alice");
    let _gateway = Gateway::start(&gw_dir, &allow_alice(&["*.site-b.internal"])).expect("gateway");
    let body = format!(
        "synthetic_ipv4 = \"198.18.0.0/24\"\n{}{}",
        gateway_table("site-b", _gateway.addr, &creds, "alice"),
        route_table(&["*.site-b.internal"])
    );
    let agent = Agent::start(&site.path("agent"), &body, true).expect("agent");
    let fill =
        "import socket\nfor i in range(254): socket.getaddrinfo(f'n{i}.site-b.internal', 80)";
    let run = |program: &str| {
        let mut command = Command::new(bin("tunnel-run"));
        command
            .arg("--config")
            .arg(&agent.config)
            .arg("--")
            .arg(program);
        command
    };
    stdout_within(run("python3").args(["-c", fill]), LIMIT);
    let out = stdout_within(
        run(program.to_str().expect("path")).args(["n0.site-b.internal", "full.site-b.internal"]),
        LIMIT,
    );
    assert_eq!(
        out,
        "n0.site-b.internal: gethostbyname ok, gethostbyname2 ok, gethostbyname_r 0 ok, \
         gethostbyname2_r 0 ok, getaddrinfo ok\n\
         full.site-b.internal: gethostbyname NO_RECOVERY, gethostbyname2 NO_RECOVERY, \
         gethostbyname_r other NO_RECOVERY, gethostbyname2_r other NO_RECOVERY, \
         getaddrinfo EAI_FAIL\n"
    );
}

/// `AI_NUMERICHOST` asks for an address literal only: a routed name fails with
/// EAI_NONAME, as glibc's own getaddrinfo says, instead of getting a synthetic address.
#[test]
fn getaddrinfo_with_ai_numerichost_gives_a_routed_name_no_address() {
    let tunnel = Tunnel::start_routed(
        &allow_alice(&["*.site-b.internal"]),
        &[],
        &["*.site-b.internal"],
    )
    .expect("tunnel");
    let script = r#"
import socket
for host in ("db.site-b.internal", "127.0.0.2"):
    try:
        infos = socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        print(host, infos[0][4][0])
    except socket.gaierror as e:
        print(host, "EAI_NONAME" if e.errno == socket.EAI_NONAME else e)
print("db.site-b.internal", socket.getaddrinfo("db.site-b.internal", 80, socket.AF_INET)[0][4][0].startswith("198.18."))
"#;
    let out = stdout_within(tunnel.run("python3").args(["-c", script]), LIMIT);
    assert_eq!(
        out,
        "db.site-b.internal EAI_NONAME\n127.0.0.2 127.0.0.2\ndb.site-b.internal True\n"
    );
}

/// A just-enough FTP server (python) on `ip`: logs every command, and for RETR connects
/// to the address the client's EPRT or PORT gave and sends `hello\n`.
fn ftp_server(site: &Site, ip: &str) -> (Daemon, std::net::SocketAddr) {
    let script = r#"
import socket, sys, threading
listener = socket.socket()
listener.bind((sys.argv[1], 0))
listener.listen(8)
print("port", listener.getsockname()[1], flush=True)
def serve(control):
    f = control.makefile("rwb", buffering=0)
    def say(line): f.write(line.encode() + b"\r\n")
    say("220 ready")
    data_to = None
    for line in f:
        line = line.decode().strip()
        print(line, flush=True)
        command, _, argument = line.partition(" ")
        command = command.upper()
        if command == "USER": say("331 password")
        elif command == "PASS": say("230 in")
        elif command == "PWD": say('257 "/"')
        elif command == "TYPE": say("200 type")
        elif command == "SIZE": say("213 6")
        elif command == "EPRT":
            _, _, host, port, _ = argument.split(argument[0])
            data_to = (host, int(port)); say("200 eprt")
        elif command == "PORT":
            n = argument.split(",")
            data_to = (".".join(n[:4]), int(n[4]) * 256 + int(n[5])); say("200 port")
        elif command == "RETR":
            say("150 sending")
            with socket.create_connection(data_to, timeout=10) as data:
                data.sendall(b"hello\n")
            say("226 sent")
        elif command == "QUIT":
            say("221 bye"); return
        else: say("502 no")
while True:
    control, _ = listener.accept()
    threading.Thread(target=serve, args=(control,), daemon=True).start()
"#;
    let path = site.path(&format!("ftp-{ip}.py"));
    std::fs::write(&path, script).expect("ftp server script");
    let mut command = Command::new("python3");
    command.arg("-u").arg(&path).arg(ip);
    let mut daemon =
        Daemon::spawn("ftp", command, site.path(&format!("ftp-{ip}.log"))).expect("ftp server");
    let port: u16 = daemon
        .wait_log("port ", Duration::from_secs(20))
        .expect("ftp server started")
        .trim()
        .parse()
        .expect("ftp port");
    (
        daemon,
        std::net::SocketAddr::new(ip.parse().expect("ip"), port),
    )
}

/// Active FTP (`curl -P -`) advertises the control connection's own address
/// (`getsockname`). Through the tunnel that address has the form a direct connection's
/// has: an IPv4-mapped one on an IPv6 socket to an IPv4-mapped destination, not `::1`
/// (which an IPv4 server cannot reach); and the transfer works.
#[test]
fn active_ftp_advertises_the_address_a_direct_connection_would() {
    require("curl", "curl");
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    let (routed, routed_addr) = ftp_server(&tunnel.site, "127.0.0.2");
    let (direct, direct_addr) = ftp_server(&tunnel.site, "127.0.0.4");
    let eprt = |server: &Daemon| -> Vec<String> {
        server
            .log_text()
            .lines()
            .filter_map(|l| l.strip_prefix("EPRT "))
            // |family|address|port|: the port differs from run to run.
            .map(|a| a.rsplitn(3, '|').nth(2).unwrap_or(a).to_string())
            .collect()
    };
    for host in ["{ip}", "[::ffff:{ip}]"] {
        let url = |addr: std::net::SocketAddr| {
            format!(
                "ftp://{}:{}/file",
                host.replace("{ip}", &addr.ip().to_string()),
                addr.port()
            )
        };
        let out = stdout_within(
            Command::new("curl").args(["-sS", "-g", "-P", "-", &url(direct_addr)]),
            LIMIT,
        );
        assert_eq!(out, "hello\n", "direct");
        let out = stdout_within(
            tunnel
                .run("curl")
                .args(["-sS", "-g", "-P", "-", &url(routed_addr)]),
            LIMIT,
        );
        assert_eq!(out, "hello\n", "through the tunnel");
    }
    assert_eq!(eprt(&direct), ["|1|127.0.0.1", "|2|::ffff:127.0.0.1"]);
    assert_eq!(eprt(&routed), eprt(&direct));
    assert_eq!(tunnel.streams_seen(), 2, "a control connection went direct");
}
