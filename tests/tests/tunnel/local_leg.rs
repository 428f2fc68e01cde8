//! The local leg is locked to its user: another local user can neither claim a
//! connection registered by the agent's user (the kernel says whose the connecting
//! socket is), nor use a forward port limited by `allow_users`/`allow_groups`; a socket
//! shared with a `group` is that group's, and a directory the agent did not make keeps
//! its mode. These run other users with `setpriv` and need root.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Runs python3 `script` as user nobody (and its group), with `groups` as its
/// supplementary groups; returns its output.
fn as_nobody(script: &str, groups: &str) -> String {
    require("setpriv", "util-linux");
    let mut command = Command::new("setpriv");
    command.args(["--reuid=nobody", "--regid=nogroup"]);
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        command.arg(format!("--groups={groups}"));
    }
    command.args(["/usr/bin/python3", "-c", script]);
    stdout_within(&mut command, LIMIT)
}

/// Opens `dir` and its parents to everyone, so that only the agent's own checks stand
/// between another user and what is inside.
fn open_to_all(dir: &Path) {
    let mode = std::fs::metadata(dir).expect("stat").permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755)).expect("chmod");
}

/// One request to the agent's socket, as the preload would send it.
fn ask_agent(socket: &Path, request: &str) -> String {
    let mut s = UnixStream::connect(socket).expect("agent socket");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("request");
    let mut reply = [0u8; 256];
    let n = s.read(&mut reply).expect("reply");
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

/// Connects to `to` (from `source` when given), sends a line and prints what came back:
/// `got ping`, `EOF`, or the error's type.
fn ping_script(source: Option<u16>, to: std::net::SocketAddr) -> String {
    let bind = source.map_or(String::new(), |port| {
        format!(
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind((\"127.0.0.1\", {port}))\n"
        )
    });
    format!(
        r#"
import socket
s = socket.socket(socket.AF_INET6 if ":" in "{ip}" else socket.AF_INET)
{bind}s.settimeout(10)
try:
    s.connect(("{ip}", {port}))
    s.sendall(b"ping\n")
    data = s.recv(10)
    print("got " + data.decode().strip() if data else "EOF")
except OSError as e:
    print(type(e).__name__)
"#,
        ip = to.ip(),
        port = to.port()
    )
}

/// Connects from `source` to `listener`, sends a line and prints what came back.
fn claim_script(source: u16, listener: std::net::SocketAddr) -> String {
    ping_script(Some(source), listener)
}

#[test]
fn another_user_cannot_claim_a_registered_connection() {
    if needs_root("another_user_cannot_claim_a_registered_connection") {
        return;
    }
    let echo = echo_server("127.0.0.2");
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    let status = tunnel.agent.status().expect("status");
    let listener: std::net::SocketAddr = status["loopback_listeners"][0]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no loopback listener in {status}"));
    // The agent's own user registers a connection, passing its socket as the preload
    // does, and holds the socket until told to connect it ...
    let socket = tunnel.site.path("agent/agent.sock");
    let owner_script = format!(
        r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
u = socket.socket(socket.AF_UNIX)
u.connect("{agent}")
socket.send_fds(u, [b"REGISTER 127.0.0.1:%d {echo} site-b nowait\n" % port], [s.fileno()])
print(u.recv(200).decode().strip(), flush=True)
print(port, flush=True)
sys.stdin.readline()
s.settimeout(10)
try:
    s.connect(("{ip}", {port}))
    s.sendall(b"ping\n")
    data = s.recv(10)
    print("got " + data.decode().strip() if data else "EOF", flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"#,
        agent = socket.display(),
        ip = listener.ip(),
        port = listener.port()
    );
    let mut owner = std::process::Command::new("python3")
        .args(["-c", &owner_script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("owner");
    let mut lines = std::io::BufReader::new(owner.stdout.take().expect("stdout")).lines();
    let mut next_line = || lines.next().expect("a line").expect("read");
    let reply = next_line();
    assert!(reply.starts_with("OK "), "{reply}");
    let source: u16 = next_line().parse().expect("port");

    // ... and another user connects from that address first.
    let out = as_nobody(&claim_script(source, listener), "");
    assert!(
        !out.starts_with("got"),
        "another user's connection was carried: {out}"
    );
    assert_eq!(
        tunnel.streams_seen(),
        0,
        "another user's connection was carried"
    );
    assert!(
        tunnel
            .agent
            .daemon
            .log_text()
            .contains("a connection from another user's registered address was dropped"),
        "{}",
        tunnel.agent.daemon.log_text()
    );

    // The registration is still there for its owner.
    let mut stdin = owner.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("tell the owner");
    assert_eq!(next_line(), "got ping");
    let _ = owner.wait();
}

#[test]
fn a_registration_without_its_socket_is_refused() {
    let echo = echo_server("127.0.0.2");
    let tunnel = Tunnel::start_routed(&allow_alice(&["127.0.0.2/32"]), &[], &["127.0.0.2/32"])
        .expect("tunnel");
    // Someone names a source address without holding the socket bound there.
    let reply = ask_agent(
        &tunnel.site.path("agent/agent.sock"),
        &format!("REGISTER 127.0.0.1:{} {echo} site-b later\n", free_port()),
    );
    assert!(reply.starts_with("ERR bad-request"), "{reply}");
    assert_eq!(
        tunnel.agent.status().expect("status")["registrations_pending"],
        0
    );
}

/// An agent whose `agent.toml` is `body` (with its own `control`), in `dir`.
fn agent_with(dir: &Path, body: &str) -> Daemon {
    std::fs::create_dir_all(dir).expect("dir");
    let config = dir.join("agent.toml");
    std::fs::write(&config, body).expect("config");
    let mut command = Command::new(bin("tunnel-agent"));
    command.arg("run").arg("--config").arg(&config);
    let mut daemon = Daemon::spawn("agent", command, dir.join("agent.log")).expect("agent");
    daemon
        .wait_log("agent ready", Duration::from_secs(20))
        .expect("agent ready");
    daemon
}

#[test]
fn a_group_shares_the_socket_and_a_shared_directory_keeps_its_mode() {
    if needs_root("a_group_shares_the_socket_and_a_shared_directory_keeps_its_mode") {
        return;
    }
    let site = Site::new();
    open_to_all(site.dir.path());
    let gw_dir = site.init_gateway("gateway");
    let creds = site.issue(&gw_dir, "alice", "alice");
    let gateway = Gateway::start(&gw_dir, "").expect("gateway");
    let users_gid = nix::unistd::Group::from_name("users")
        .ok()
        .flatten()
        .expect("group users")
        .gid
        .as_raw();
    let agent_toml = |control: &Path| {
        format!(
            "control = \"{}\"\ngroup = \"users\"\n{}",
            control.display(),
            gateway_table("site-b", gateway.addr, &creds, "alice")
        )
    };

    // A directory the agent makes for the socket: the group's, 0750; the socket 0660.
    let made = site.path("run/tunnel");
    let _agent = agent_with(&site.path("a1"), &agent_toml(&made.join("agent.sock")));
    let dir = std::fs::metadata(&made).expect("made dir");
    assert_eq!((dir.mode() & 0o7777, dir.gid()), (0o750, users_gid));
    let sock = std::fs::metadata(made.join("agent.sock")).expect("socket");
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, users_gid));
    open_to_all(&site.path("run"));
    let resolve = format!(
        r#"
import socket
u = socket.socket(socket.AF_UNIX)
try:
    u.connect("{}")
    u.sendall(b"RESOLVE db.site-b.internal\n")
    print(u.recv(200).decode().split(" ")[0].strip())
except OSError as e:
    print(type(e).__name__)
"#,
        made.join("agent.sock").display()
    );
    assert_eq!(as_nobody(&resolve, &users_gid.to_string()).trim(), "ADDRS");
    assert_eq!(as_nobody(&resolve, "").trim(), "PermissionError");

    // A shared directory (like /tmp) that was there before is left exactly as it was.
    let shared = site.path("shared");
    std::fs::create_dir_all(&shared).expect("shared");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let _agent2 = agent_with(&site.path("a2"), &agent_toml(&shared.join("agent.sock")));
    let after = std::fs::metadata(&shared).expect("shared dir");
    assert_eq!((after.mode() & 0o7777, after.gid()), (0o1777, 0));
    let sock = std::fs::metadata(shared.join("agent.sock")).expect("socket");
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, users_gid));
}

#[test]
fn a_forward_port_with_allow_users_refuses_everyone_else() {
    if needs_root("a_forward_port_with_allow_users_refuses_everyone_else") {
        return;
    }
    let echo = echo_server("127.0.0.2");
    let forwards = format!(
        "[[forward]]\nlisten = \"127.0.0.1:0\"\nto = \"{echo}\"\nallow_users = [\"root\"]\n\
         [[forward]]\nlisten = \"127.0.0.1:0\"\nto = \"{echo}\"\nallow_groups = [\"root\"]\n\
         [[forward]]\nlisten = \"127.0.0.1:0\"\nto = \"{echo}\"\n"
    );
    let tunnel = Tunnel::start_with(&allow_alice(&["127.0.0.2/32"]), &forwards).expect("tunnel");
    let talk = |port: std::net::SocketAddr| ping_script(None, port);
    for index in 0..2 {
        let port = tunnel.forward(index);
        let out = stdout_within(Command::new("python3").args(["-c", &talk(port)]), LIMIT);
        assert_eq!(
            out.trim(),
            "got ping",
            "forward[{index}] refused its own user"
        );
        let out = as_nobody(&talk(port), "");
        assert!(
            !out.starts_with("got"),
            "forward[{index}] carried another user's connection: {out}"
        );
    }
    // Without allow_users/allow_groups, every local user may use the port (as ssh -L).
    let out = as_nobody(&talk(tunnel.forward(2)), "");
    assert_eq!(out.trim(), "got ping");
    assert!(
        tunnel
            .agent
            .daemon
            .log_text()
            .contains("a user not in allow_users/allow_groups was refused")
    );
}

#[test]
fn a_socket_put_in_the_agents_place_by_another_user_is_never_used() {
    if needs_root("a_socket_put_in_the_agents_place_by_another_user_is_never_used") {
        return;
    }
    require("setpriv", "util-linux");
    let echo = echo_server("127.0.0.2");
    let site = Site::new();
    open_to_all(site.dir.path());
    // Another user makes the directory first (as with /tmp/tunnel-UID) and answers
    // there as if it were the agent, sending programs straight to the destination.
    let squatted = site.path("tunnel-0");
    std::fs::create_dir(&squatted).expect("dir");
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("user nobody");
    std::os::unix::fs::chown(&squatted, Some(nobody.uid.as_raw()), None).expect("chown");
    let socket = squatted.join("agent.sock");
    let fake = format!(
        r#"
import os, socket
s = socket.socket(socket.AF_UNIX)
s.bind("{socket}")
os.chmod("{socket}", 0o777)
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.recv(2048)
        c.sendall(b"OK {echo}\n")
    except OSError:
        pass
    c.close()
"#,
        socket = socket.display()
    );
    let mut command = Command::new("setpriv");
    command.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        "-u",
        "-c",
        &fake,
    ]);
    let mut fake_agent = Daemon::spawn("fake agent", command, site.path("fake.log")).expect("fake");
    fake_agent
        .wait_log("listening", Duration::from_secs(10))
        .expect("fake agent up");

    // A preloaded program refuses to take its orders.
    let program = format!(
        r#"
import socket
try:
    socket.create_connection(("{ip}", {port}), timeout=10)
    print("connected")
except OSError as e:
    print(type(e).__name__)
"#,
        ip = echo.ip(),
        port = echo.port()
    );
    let out = stdout_within(
        Command::new("python3")
            .args(["-c", &program])
            .env("LD_PRELOAD", bin_dir().join("libtunnel_preload.so"))
            .env("TUNNEL_ROUTES", "site-b=127.0.0.2/32")
            .env("TUNNEL_AGENT", &socket),
        LIMIT,
    );
    assert_eq!(
        out.trim(),
        "ConnectionRefusedError",
        "the fake agent was obeyed"
    );

    // tunnel-run says whose socket it is instead of using it.
    let config = agent_toml_at(&site, &socket, |g| g);
    let (code, err) = tunnel_run_true(&config);
    assert_eq!(code, Some(127), "{err}");
    assert!(err.contains("is answered by uid"), "{err}");

    // And an agent refuses to put its socket in a directory someone else owns.
    fake_agent.kill();
    let _ = std::fs::remove_file(&socket);
    let (code, _, err) = output_within(
        Command::new(bin("tunnel-agent"))
            .args(["run", "--config"])
            .arg(&config),
        LIMIT,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not to this daemon's user"), "{err}");
}

#[test]
fn tunnel_run_says_why_the_agent_it_started_failed() {
    let site = Site::new();
    // No agent answers on this socket, and the key the agent needs is missing.
    let config = agent_toml_at(&site, &site.path("nobody-here.sock"), |g| {
        g.replace("alice-key.pem", "missing-key.pem")
    });
    let (code, err) = tunnel_run_true(&config);
    assert_eq!(code, Some(127), "{err}");
    assert!(
        err.contains("missing-key.pem"),
        "the reason is missing: {err}"
    );
}

/// An `agent.toml` in `site` whose socket is `control`, for identity `alice`, routing
/// 127.0.0.2 to a gateway that is never dialled; `edit` may change the text.
fn agent_toml_at(
    site: &Site,
    control: &Path,
    edit: impl Fn(String) -> String,
) -> std::path::PathBuf {
    let gw_dir = site.init_gateway("gateway");
    let creds = site.issue(&gw_dir, "alice", "alice");
    let gateway = gateway_table(
        "site-b",
        "127.0.0.1:9".parse().expect("addr"),
        &creds,
        "alice",
    );
    let config = site.path("agent.toml");
    let text = format!(
        "control = \"{}\"\n{}[[route]]\nto = [\"127.0.0.2/32\"]\n",
        control.display(),
        edit(gateway)
    );
    std::fs::write(&config, text).expect("config");
    config
}

/// `tunnel-run --config CONFIG -- true`: its exit code and stderr.
fn tunnel_run_true(config: &Path) -> (Option<i32>, String) {
    let (code, _, err) = output_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(config)
            .args(["--", "true"]),
        LIMIT,
    );
    (code, err)
}
