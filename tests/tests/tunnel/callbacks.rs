//! Callbacks through `listen()`: a program under tunnel-run that binds a port of a
//! `[[callback]]` range gets its listener at the gateway; connections there reach the
//! program's own accept() with the real peer, and its getsockname shows the address
//! the far side reaches.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use tunnel_tests::*;

/// A program that binds `port` on every address, says what getsockname shows, tries a
/// second bind of the same port, then answers `connections` connections with what
/// getpeername says of each.
const LISTENER: &str = r#"
import socket, sys, errno
port, connections = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
s.bind(("0.0.0.0", port))
s.listen(16)
host, got = s.getsockname()
second = socket.socket()
try:
    second.bind(("0.0.0.0", port))
    again = "bound"
except OSError as e:
    again = errno.errorcode.get(e.errno, str(e.errno))
print(f"LISTENING {host} {got} {again}", flush=True)
for _ in range(connections):
    c, peer = s.accept()
    line = c.makefile("rb").readline().decode().strip()
    c.sendall(f"{line} from {peer[0]}:{peer[1]} seen as {c.getpeername()[0]}\n".encode())
    c.close()
print("DONE", flush=True)
"#;

fn callback_rules(address: &str, ports: &str, for_: &str) -> String {
    format!("\n[callbacks]\naddress = \"{address}\"\nports = \"{ports}\"\nfor = [{for_}]\n")
}

fn callback_table(ports: &str) -> String {
    format!("[[callback]]\nvia = \"site-b\"\nports = \"{ports}\"\n")
}

fn agent_for(
    site: &Site,
    gw_dir: &std::path::Path,
    gateway: &Gateway,
    identity: &str,
    body: &str,
) -> Agent {
    let creds = site.issue(gw_dir, identity, &format!("{identity}-creds"));
    let table = gateway_table("site-b", gateway.addr, &creds, identity);
    Agent::start(&site.path(identity), &format!("{table}{body}"), true).expect("agent")
}

/// A python program under tunnel-run with `config`, its stdout read line by line (and
/// its stdin piped); returns it with its first line.
fn program(
    config: &std::path::Path,
    script: &str,
    args: &[&str],
) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = Command::new(bin("tunnel-run"))
        .arg("--config")
        .arg(config)
        .args(["--", "/usr/bin/python3", "-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("tunnel-run");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the program's first line");
    (child, out, line)
}

fn ask(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    conn.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(answer.trim().to_string())
}

#[test]
fn a_program_listening_on_a_callback_port_is_reached_at_the_gateway() {
    require("python3", "python3");
    let port = free_port();
    let ports = port.to_string();
    let site = Site::new();
    let (gw_dir, gateway) =
        gateway_with(&site, "", &callback_rules("127.0.0.1", &ports, "\"alice\""));
    let alice = agent_for(&site, &gw_dir, &gateway, "alice", &callback_table(&ports));
    wait_callbacks(&alice);

    let (mut program, mut out, mut line) = program(&alice.config, LISTENER, &[&ports, "3"]);
    // getsockname shows the gateway's callback address; the same port again is taken.
    assert_eq!(
        line.trim(),
        format!("LISTENING 127.0.0.1 {port} EADDRINUSE"),
        "{}",
        alice.daemon.log_text()
    );
    let status = gateway.status().expect("gateway status");
    assert_eq!(
        status["callbacks"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );

    let public: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    for i in 0..3 {
        let mut local =
            TcpStream::connect_timeout(&public, Duration::from_secs(5)).expect("connect");
        let me = local.local_addr().expect("local");
        local
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        local
            .write_all(format!("hello {i}\n").as_bytes())
            .expect("send");
        let mut answer = String::new();
        local.read_to_string(&mut answer).expect("answer");
        // accept() and getpeername show the peer that connected at the gateway.
        assert_eq!(
            answer.trim(),
            format!("hello {i} from {} seen as {}", me, me.ip()),
            "{}",
            alice.daemon.log_text()
        );
    }
    line.clear();
    out.read_line(&mut line).expect("DONE");
    assert_eq!(line.trim(), "DONE");
    assert!(program.wait().expect("exit").success());

    // The program is gone: so is the listener at the gateway, within 2 s.
    let gone = Instant::now();
    wait_for(
        Duration::from_secs(2),
        "the gateway's listener to close",
        || ask(public, "anyone?").is_err().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", alice.daemon.log_text()));
    assert!(gone.elapsed() < Duration::from_secs(2));

    // bob is not in [callbacks] for: his program's bind fails, and nothing listens.
    let bob = agent_for(&site, &gw_dir, &gateway, "bob", &callback_table(&ports));
    wait_for(
        Duration::from_secs(15),
        "bob's callbacks to be refused",
        || {
            let status = bob.status().ok()?;
            status["publications"][0]["callbacks_refused"]
                .as_str()
                .map(|_| ())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", bob.daemon.log_text()));
    let tried = run_ok(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&bob.config)
            .args([
                "--",
                "/usr/bin/python3",
                "-c",
                "import socket, sys, errno\ns = socket.socket()\ntry:\n    s.bind(('0.0.0.0', int(sys.argv[1])))\n    print('bound')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n",
                &ports,
            ]),
    );
    assert_ne!(
        tried.trim(),
        "bound",
        "bob's program listened at the gateway"
    );
}

/// The gateway restarts under a listening program: it stops at once (a lease does not
/// hold its drain open), its listener is asked for again, and the far side reaches the
/// program on the same port once the agent is back.
#[test]
fn a_callback_listener_is_back_after_the_gateway_restarts() {
    require("python3", "python3");
    let port = free_port();
    let ports = port.to_string();
    let site = Site::new();
    let (gw_dir, mut gateway) =
        gateway_with(&site, "", &callback_rules("127.0.0.1", &ports, "\"alice\""));
    gateway.pin_port().expect("pin port");
    let alice = agent_for(&site, &gw_dir, &gateway, "alice", &callback_table(&ports));
    wait_callbacks(&alice);
    let (mut program, mut out, mut line) = program(&alice.config, LISTENER, &[&ports, "2"]);
    assert!(line.starts_with("LISTENING 127.0.0.1"), "{line}");
    let public: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    assert!(ask(public, "before").is_ok_and(|a| a.starts_with("before from")));

    // The drain would give streams 30 s; the lease is not one and ends at once.
    gateway.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let code = gateway
        .daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", gateway.daemon.log_text()));
    assert_eq!(code, Some(0), "{}", gateway.daemon.log_text());
    let gateway = Gateway::run(&gw_dir).expect("the gateway again");
    let answer = wait_for(Duration::from_secs(20), "the listener to be back", || {
        ask(public, "after").ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", alice.daemon.log_text()));
    assert!(answer.starts_with("after from"), "{answer}");
    line.clear();
    out.read_line(&mut line).expect("DONE");
    assert_eq!(line.trim(), "DONE");
    assert!(program.wait().expect("exit").success());
    drop(gateway);
}

/// Listens on the callback port, says so, closes the listener when told, says so, and
/// stays.
const CLOSER: &str = r#"
import socket, sys, time
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("LISTENING", flush=True)
sys.stdin.readline()
s.close()
print("CLOSED", flush=True)
time.sleep(20)
"#;

/// Another local user binds the program's loopback port the moment the program closed
/// its listener: connections that arrive at the gateway meanwhile never reach it.
#[test]
fn another_user_who_binds_a_closed_callback_listeners_port_gets_nothing() {
    if needs_root("another_user_who_binds_a_closed_callback_listeners_port_gets_nothing") {
        return;
    }
    require("python3", "python3");
    require("setpriv", "util-linux");
    let port = free_port();
    let ports = port.to_string();
    let site = Site::new();
    let (gw_dir, gateway) =
        gateway_with(&site, "", &callback_rules("127.0.0.1", &ports, "\"alice\""));
    let alice = agent_for(&site, &gw_dir, &gateway, "alice", &callback_table(&ports));
    wait_callbacks(&alice);
    let (mut program, mut out, mut line) = program(&alice.config, CLOSER, &[&ports]);
    // Where the program's socket really is: the agent's status says.
    let loopback = wait_for(Duration::from_secs(5), "the program's listener", || {
        let status = alice.status().ok()?;
        status["callbacks"][0]["program"]
            .as_str()
            .map(str::to_string)
    })
    .expect("program address");
    let loopback_port = loopback.rsplit(':').next().expect("port").to_string();
    let thief = "import socket, sys\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nwhile True:\n    try:\n        s.bind(('127.0.0.1', int(sys.argv[1])))\n        break\n    except OSError:\n        pass\ns.listen(16)\nprint('bound', flush=True)\ns.settimeout(3)\ntry:\n    c, _ = s.accept()\n    c.settimeout(2)\n    print('STOLEN', c.recv(100), flush=True)\nexcept OSError:\n    print('nothing', flush=True)\n";
    let mut thief = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", thief, &loopback_port])
        .stdout(Stdio::piped())
        .spawn()
        .expect("thief");
    let mut thief_out = BufReader::new(thief.stdout.take().expect("stdout"));
    program
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"close\n")
        .expect("tell the program");
    line.clear();
    out.read_line(&mut line).expect("CLOSED");
    let mut said = String::new();
    thief_out.read_line(&mut said).expect("thief bound");
    assert_eq!(said.trim(), "bound");
    let public: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    if let Ok(mut far) = TcpStream::connect_timeout(&public, Duration::from_secs(2)) {
        let _ = far.write_all(b"SECRET-FROM-FAR\n");
        let _ = far.set_read_timeout(Some(Duration::from_secs(3)));
        let mut answer = Vec::new();
        let _ = far.read_to_end(&mut answer);
    }
    said.clear();
    thief_out.read_line(&mut said).expect("thief's verdict");
    assert_eq!(said.trim(), "nothing", "{}", alice.daemon.log_text());
    let _ = thief.wait();
    let _ = program.kill();
    let _ = program.wait();
}

/// A callback address that is not the gateway host's (a NAT's) needs `bind`: the
/// gateway says so at start instead of refusing every program later.
#[test]
fn a_callback_address_the_gateway_cannot_listen_on_is_named_at_start() {
    let site = Site::new();
    let dir = site.init_gateway("gateway");
    let config = dir.join("gateway.toml");
    let mut text = std::fs::read_to_string(&config).expect("gateway.toml");
    text.push_str(&callback_rules("203.0.113.7", "50000-50100", "\"alice\""));
    std::fs::write(&config, text).expect("gateway.toml");
    let (code, _, err) = output_within(
        Command::new(bin("tunnel-gateway"))
            .args(["run", "--config"])
            .arg(&config),
        Duration::from_secs(20),
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("[callbacks] address 203.0.113.7 cannot be listened on here")
            && err.contains("bind = \"0.0.0.0\""),
        "{err}"
    );
}
