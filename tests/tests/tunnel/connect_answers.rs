//! What a program's `connect` says about the far side: a non-blocking connect through
//! the tunnel fails *as a connect* when the destination refuses, is denied, or cannot
//! be reached (curl exits 7, `nc -z` says closed, python and node get
//! ECONNREFUSED/EACCES), and succeeds only once the destination accepted. A route with
//! `connect = "optimistic"` keeps the one-round-trip open, and a far failure is then a
//! reset on first I/O.

use std::time::Duration;

use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// An echo server on 127.0.0.2 (allowed), a closed port there, and 127.0.0.3 (routed,
/// not allowed), with `agent_toml` giving the routes.
struct Far {
    tunnel: Tunnel,
    echo: std::net::SocketAddr,
    closed: u16,
}

fn far(route_settings: &str) -> Far {
    let echo = echo_server("127.0.0.2");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let routes =
        format!("[[route]]\nto = [\"127.0.0.2/32\", \"127.0.0.3/32\"]\n{route_settings}\n");
    let tunnel = Tunnel::start_with(&allow_alice(&["127.0.0.2/32"]), &routes).expect("tunnel");
    Far {
        tunnel,
        echo,
        closed,
    }
}

#[test]
fn non_blocking_connects_fail_as_connects_with_the_far_sides_errno() {
    require("curl", "curl");
    require("node", "nodejs");
    require("nc", "netcat-openbsd");
    let Far {
        tunnel,
        echo,
        closed,
    } = far("");
    let port = echo.port();

    // python: a timeout makes the socket non-blocking (poll, then SO_ERROR).
    let script = format!(
        r#"
import asyncio, socket
def attempt(addr):
    try:
        s = socket.create_connection(addr, timeout=20)
        s.sendall(b"ping\n")
        return s.recv(5).decode().strip()
    except OSError as e:
        return type(e).__name__
async def open_async(addr):
    try:
        r, w = await asyncio.open_connection(*addr)
        w.write(b"ping\n")
        return (await r.readline()).decode().strip()
    except OSError as e:
        return type(e).__name__
print(attempt(("127.0.0.2", {port})))
print(attempt(("127.0.0.2", {closed})))
print(attempt(("127.0.0.3", {port})))
print(asyncio.run(open_async(("127.0.0.2", {port}))))
print(asyncio.run(open_async(("127.0.0.2", {closed}))))
print(asyncio.run(open_async(("127.0.0.3", {port}))))
"#
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "ping",
            "ConnectionRefusedError",
            "PermissionError",
            "ping",
            "ConnectionRefusedError",
            "PermissionError"
        ],
        "python: {out}"
    );

    // curl connects non-blocking: a refused connect is exit code 7, not 56.
    let (code, _, err) = output_within(
        tunnel
            .run("curl")
            .args(["-sS", &format!("http://127.0.0.2:{closed}/")]),
        LIMIT,
    );
    assert_eq!(code, Some(7), "curl: {err}");

    // "Is the port open?" scripts.
    let nc = |p: u16| {
        output_within(
            tunnel
                .run("nc")
                .args(["-z", "-w", "20", "127.0.0.2", &p.to_string()]),
            LIMIT,
        )
        .0
    };
    assert_eq!(nc(closed), Some(1), "nc -z reported a closed port open");
    assert_eq!(nc(port), Some(0), "nc -z reported an open port closed");

    let node = format!(
        r#"
const net = require('net');
function attempt(port, host) {{
    return new Promise(done => {{
        const s = net.connect({{host, port}}, () => s.write('ping\n'));
        s.on('data', d => {{ done(d.toString().trim()); s.destroy(); }});
        s.on('error', e => done(e.code));
    }});
}}
(async () => {{
    console.log(await attempt({port}, '127.0.0.2'));
    console.log(await attempt({closed}, '127.0.0.2'));
    console.log(await attempt({port}, '127.0.0.3'));
}})();
"#
    );
    let out = stdout_within(tunnel.run("node").args(["-e", &node]), LIMIT);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["ping", "ECONNREFUSED", "EACCES"],
        "node: {out}"
    );
}

#[test]
fn a_connect_polled_with_connect_again_learns_the_refusal() {
    let Far { tunnel, closed, .. } = far("");
    let source = format!(
        r#"
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {{0}};
    a.sin_family = AF_INET; a.sin_port = htons({closed});
    inet_pton(AF_INET, "127.0.0.2", &a.sin_addr);
    for (int calls = 0; calls < 20000; calls++) {{
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0 || errno == EISCONN) {{
            printf("connected\n");
            return 0;
        }}
        if (errno != EINPROGRESS && errno != EALREADY) {{
            printf("%s\n", strerror(errno));
            return 0;
        }}
        usleep(1000);
    }}
    printf("never answered\n");
    return 1;
}}
"#
    );
    let program = compile_c(&tunnel.site, "poll_refused", &source, &[]);
    let out = stdout_within(&mut tunnel.run(program.to_str().expect("path")), LIMIT);
    assert_eq!(out.trim(), "Connection refused");
}

#[test]
fn an_optimistic_route_reports_far_failures_as_resets() {
    require("node", "nodejs");
    let Far {
        tunnel,
        echo,
        closed,
    } = far("connect = \"optimistic\"");
    let script = format!(
        r#"
import asyncio, socket
async def failing():
    try:
        r, w = await asyncio.open_connection("127.0.0.2", {closed})
        w.write(b"hello")
        data = await r.read()
        return "EOF" if data == b"" else "data"
    except ConnectionResetError:
        return "reset"
    except ConnectionRefusedError:
        return "refused"
print(asyncio.run(failing()))
# A blocking connect returns once the agent has the connection.
s = socket.create_connection(("127.0.0.2", {closed}))
try:
    print("EOF" if s.recv(10) == b"" else "data")
except ConnectionResetError:
    print("reset")
s = socket.create_connection(("127.0.0.2", {port}))
s.sendall(b"ping\n")
print(s.recv(5).decode().strip())
"#,
        port = echo.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["reset", "reset", "ping"],
        "python: {out}"
    );
    let node = format!(
        r#"
const net = require('net');
const s = net.connect({{host: '127.0.0.2', port: {closed}}}, () => s.write('hello'));
s.on('data', () => {{ console.log('data'); process.exit(1); }});
s.on('end', () => {{ console.log('EOF'); process.exit(1); }});
s.on('error', e => {{ console.log(e.code); process.exit(0); }});
"#
    );
    let out = stdout_within(tunnel.run("node").args(["-e", &node]), LIMIT);
    assert_eq!(
        out.trim(),
        "ECONNRESET",
        "node: a remote failure is a reset"
    );
}

#[test]
fn a_connect_while_the_gateway_is_down_fails_in_seconds_not_after_connect_timeout() {
    let Far {
        mut tunnel, echo, ..
    } = far("");
    tunnel.gateway.daemon.kill();
    wait_for(Duration::from_secs(20), "every connection down", || {
        (tunnel.agent.connections_up() == 0).then_some(())
    })
    .expect("down");
    // connect_timeout is 10 s: a program must not wait it out when every dial fails.
    let script = format!(
        r#"
import socket, time
start = time.monotonic()
try:
    socket.create_connection(("127.0.0.2", {port}), timeout=30)
    print("connected")
except OSError as e:
    print(type(e).__name__, round(time.monotonic() - start, 1))
"#,
        port = echo.port()
    );
    let out = stdout_within(tunnel.run("python3").args(["-c", &script]), LIMIT);
    let (what, took) = out.trim().split_once(' ').unwrap_or((out.trim(), "?"));
    assert_eq!(what, "ConnectionRefusedError", "{out}");
    let took: f64 = took.parse().unwrap_or(f64::MAX);
    assert!(
        took < 5.0,
        "the connect waited {took} s for a gateway that is down"
    );
}
