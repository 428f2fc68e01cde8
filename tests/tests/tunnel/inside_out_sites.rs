//! Inside-out between three sites in network namespaces (client, gateway, remote; see
//! `tunnel_tests::netns`): the client site has no route to the remote site and the
//! remote site none to the client, so every success here went through tunnels that
//! were only ever dialled out. Needs root.
//!
//! - Callbacks: curl's active-mode FTP against vsftpd at the remote site, and a python
//!   program that receives 8 concurrent connections back on a port it bound.
//! - PostgreSQL at the client site, published: psql at the gateway's site through the
//!   publication's listen port, and from the remote site's own agent by name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tunnel_tests::netns::{CLIENT_IP, GATEWAY_IP, REMOTE_IP, Topology};
use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);
/// The gateway's address toward the remote site: its callback address.
const GATEWAY_REMOTE_IP: &str = "10.77.2.1";
const FILES: &str = "files.remote.test";
const PORTS: &str = "50000-50100";

/// The gateway in its namespace, listening on every address of it (so that agents at
/// the client and at the remote site both reach it), with `rules` appended.
fn gateway(site: &Site, topology: &Topology, rules: &str) -> (PathBuf, Gateway) {
    let dir = site.path("gateway");
    run_ok(
        Command::new(bin("tunnel-gateway"))
            .args([
                "init",
                "--listen",
                "0.0.0.0:0",
                "--san",
                GATEWAY_IP,
                "--san",
            ])
            .arg(GATEWAY_REMOTE_IP)
            .arg("--dir")
            .arg(&dir),
    );
    let config = dir.join("gateway.toml");
    let mut text = std::fs::read_to_string(&config).expect("gateway.toml");
    text.push_str(rules);
    std::fs::write(&config, text).expect("gateway.toml");
    let gateway = Gateway::run_in(&dir, Some(&topology.gateway)).expect("gateway");
    (dir, gateway)
}

/// An agent for `identity` in namespace `ns`, dialling the gateway at `ip`.
fn agent(
    site: &Site,
    gw_dir: &Path,
    gateway: &Gateway,
    (identity, ns, ip): (&str, &str, &str),
    body: &str,
) -> Agent {
    let creds = site.issue(gw_dir, identity, &format!("{identity}-creds"));
    let at = SocketAddr::new(ip.parse().expect("ip"), gateway.addr.port());
    let table = gateway_table("site-b", at, &creds, identity);
    Agent::start_in(
        &site.path(identity),
        &format!("{table}{body}"),
        true,
        Some(ns),
    )
    .expect("agent")
}

fn callbacks_rules() -> String {
    format!(
        "{}\n[callbacks]\naddress = \"{GATEWAY_REMOTE_IP}\"\nports = \"{PORTS}\"\nfor = [\"alice\"]\n",
        allow_alice(&["10.77.2.0/24", "*.remote.test"])
    )
}

fn callback_agent_body() -> String {
    format!(
        "{}[[callback]]\nvia = \"site-b\"\nports = \"{PORTS}\"\n",
        route_table(&["10.77.2.0/24", "*.remote.test"])
    )
}

/// The gateway with `[callbacks]`, and alice's agent at the client site with
/// `[[callback]]` ports, once its callbacks are accepted.
fn calling_back(site: &Site, topology: &Topology) -> (Gateway, Agent) {
    let (gw_dir, gateway) = gateway(site, topology, &callbacks_rules());
    let alice = agent(
        site,
        &gw_dir,
        &gateway,
        ("alice", &topology.client, GATEWAY_IP),
        &callback_agent_body(),
    );
    wait_callbacks(&alice);
    (gateway, alice)
}

/// `tunnel-run` with `config`, in namespace `ns`.
fn tunnel_run(ns: &str, config: &Path) -> Command {
    let mut c = Topology::command(ns, bin("tunnel-run"));
    c.arg("--config").arg(config).arg("--");
    c
}

fn no_callback_listeners(gateway: &Gateway) {
    wait_for(
        Duration::from_secs(2),
        "the callback listeners to close",
        || {
            let status = gateway.status().ok()?;
            status["callbacks"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", gateway.status()));
}

/// vsftpd's configuration for anonymous, active-mode-only downloads from `root`.
fn vsftpd_conf(root: &Path, log: &Path) -> String {
    format!(
        "listen=YES\nlisten_ipv6=NO\nlisten_address={REMOTE_IP}\nbackground=NO\n\
         anonymous_enable=YES\nno_anon_password=YES\nanon_root={}\nlocal_enable=NO\n\
         write_enable=NO\npasv_enable=NO\nport_enable=YES\nconnect_from_port_20=YES\n\
         seccomp_sandbox=NO\nisolate=NO\nisolate_network=NO\n\
         secure_chroot_dir=/var/run/vsftpd/empty\nxferlog_enable=YES\n\
         vsftpd_log_file={}\nlog_ftp_protocol=YES\n",
        root.display(),
        log.display()
    )
}

#[test]
fn active_ftp_through_a_callback_listener_is_byte_exact() {
    if needs_root("active_ftp_through_a_callback_listener_is_byte_exact") {
        return;
    }
    require("curl", "curl");
    require("/usr/sbin/vsftpd", "vsftpd");
    let topology = Topology::new(&[FILES]);
    let site = Site::new();
    // The anonymous root: readable by vsftpd's unprivileged user after its chroot.
    let root = site.path("ftp");
    std::fs::create_dir_all(&root).expect("ftp root");
    let mut data = vec![0u8; 3 * 1024 * 1024 + 17];
    Pattern::new(7).fill(&mut data);
    std::fs::write(root.join("data.bin"), &data).expect("data");
    for (path, mode) in [(&root, 0o755), (&root.join("data.bin"), 0o644)] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("mode");
    }
    let conf = site.path("vsftpd.conf");
    std::fs::write(&conf, vsftpd_conf(&root, &site.path("vsftpd.log"))).expect("conf");
    let mut vsftpd = Topology::command(&topology.remote, "/usr/sbin/vsftpd");
    vsftpd.arg(&conf);
    let _vsftpd = Daemon::spawn("vsftpd", vsftpd, site.path("vsftpd.out")).expect("vsftpd");
    wait_for(Duration::from_secs(10), "vsftpd to listen", || {
        let (code, _, _) = output_within(
            Topology::command(&topology.remote, "bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/{REMOTE_IP}/21")]),
            LIMIT,
        );
        (code == Some(0)).then_some(())
    })
    .expect("vsftpd up");

    let (gateway, alice) = calling_back(&site, &topology);

    // Without the tunnel the client site cannot reach the remote site at all.
    let (code, _, _) = output_within(
        Topology::command(&topology.client, "curl").args([
            "-sS",
            "--max-time",
            "3",
            &format!("ftp://{REMOTE_IP}/data.bin"),
        ]),
        LIMIT,
    );
    assert_ne!(
        code,
        Some(0),
        "the client site reaches the remote site directly"
    );

    let out = site.path("data.out");
    let (code, _, err) = output_within(
        tunnel_run(&topology.client, &alice.config)
            .args(["curl", "-sS", "-v", "--max-time", "30", "-P", "-", "-o"])
            .arg(&out)
            .arg(format!("ftp://{FILES}/data.bin")),
        LIMIT,
    );
    assert_eq!(
        code,
        Some(0),
        "curl active FTP failed:\n{err}\nagent:\n{}\ngateway:\n{}\nvsftpd:\n{}",
        alice.daemon.log_text(),
        gateway.daemon.log_text(),
        std::fs::read_to_string(site.path("vsftpd.log")).unwrap_or_default()
    );
    // curl advertised the gateway's callback address, and the server connected back.
    assert!(
        err.contains(&format!("EPRT |1|{GATEWAY_REMOTE_IP}|")),
        "curl did not advertise the callback address:\n{err}"
    );
    let got = std::fs::read(&out).expect("downloaded file");
    assert!(
        got == data,
        "the download differs ({} bytes of {})",
        got.len(),
        data.len()
    );
    no_callback_listeners(&gateway);
}

/// Binds the first free port of the range (the gateway says which are taken), tells
/// the server at the remote site where it listens, and answers every connection with
/// the SHA-256 of what it read and the peer accept() named.
const CALLER: &str = r#"
import socket, sys, errno, hashlib, threading
server, first, last, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
control = socket.create_connection((server, 9000), timeout=30)
listener = socket.socket()
tried = []
for port in range(first, last + 1):
    try:
        listener.bind(("0.0.0.0", port))
        break
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        tried.append(port)
listener.listen(count)
host, port = listener.getsockname()
print("skipped", tried, "listening", host, port, flush=True)
control.sendall(f"{host} {port}\n".encode())
peers = []
def answer(conn, peer):
    digest = hashlib.sha256()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        digest.update(chunk)
    conn.sendall(f"{digest.hexdigest()} {peer[0]}\n".encode())
    conn.close()
threads = []
for _ in range(count):
    conn, peer = listener.accept()
    peers.append(peer[0])
    t = threading.Thread(target=answer, args=(conn, peer))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
print("peers", sorted(set(peers)), flush=True)
print(control.makefile().readline().strip(), flush=True)
"#;

/// At the remote site: reads where the caller listens, opens `count` connections there
/// at once, sends each its own bytes, checks each digest, and reports.
const CALLED: &str = r#"
import socket, sys, hashlib, threading
count = int(sys.argv[1])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[2], 9000))
listener.listen(1)
print("ready", flush=True)
control, _ = listener.accept()
host, port = control.makefile().readline().split()
results = [None] * count
def call(i):
    data = (f"connection {i} ".encode() * 40000)[: 200000 + i]
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    answer = s.makefile().readline().split()
    results[i] = answer[0] == hashlib.sha256(data).hexdigest()
threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
for t in threads: t.start()
for t in threads: t.join()
control.sendall(f"called back {sum(1 for r in results if r)} of {count} at {host}\n".encode())
"#;

#[test]
fn a_program_gets_eight_concurrent_connections_back_on_a_port_it_bound() {
    if needs_root("a_program_gets_eight_concurrent_connections_back_on_a_port_it_bound") {
        return;
    }
    require("python3", "python3");
    let topology = Topology::new(&[]);
    let site = Site::new();
    let mut called = Topology::command(&topology.remote, "python3");
    called.args(["-u", "-c", CALLED, "8", REMOTE_IP]);
    let mut called = Daemon::spawn("called", called, site.path("called.log")).expect("server");
    called
        .wait_log("ready", Duration::from_secs(10))
        .expect("server up");
    // The first port of the range is taken at the gateway's site already.
    let mut taken = Topology::command(&topology.gateway, "python3");
    taken.args([
        "-u",
        "-c",
        &format!(
            "import socket, time\ns = socket.socket()\ns.bind(('{GATEWAY_REMOTE_IP}', 50000))\ns.listen()\nprint('taken', flush=True)\ntime.sleep(300)"
        ),
    ]);
    let mut taken = Daemon::spawn("taken", taken, site.path("taken.log")).expect("taker");
    taken
        .wait_log("taken", Duration::from_secs(10))
        .expect("port taken");

    let (gateway, alice) = calling_back(&site, &topology);
    let out = stdout_within(
        tunnel_run(&topology.client, &alice.config)
            .args(["python3", "-c", CALLER, REMOTE_IP, "50000", "50100", "8"]),
        LIMIT,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            &format!("skipped [50000] listening {GATEWAY_REMOTE_IP} 50001"),
            &format!("peers ['{REMOTE_IP}']"),
            &format!("called back 8 of 8 at {GATEWAY_REMOTE_IP}"),
        ],
        "agent:\n{}\ngateway:\n{}",
        alice.daemon.log_text(),
        gateway.daemon.log_text()
    );
    // The program has exited: its listener at the gateway goes.
    no_callback_listeners(&gateway);
    drop(taken);
    drop(called);
}

/// A PostgreSQL server for the client site: initdb as `postgres` in a directory of its
/// own, then postgres on 127.0.0.1:5432 inside `ns`.
struct Postgres {
    _daemon: Daemon,
    dir: PathBuf,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bin(program: &str) -> PathBuf {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .filter_map(Result::ok)
                .map(|v| v.path().join("bin").join(program))
                .find(|p| p.exists())
        });
    found.unwrap_or_else(|| panic!("{program} not found: apt-get install postgresql"))
}

fn postgres(ns: &str) -> Postgres {
    let dir = std::env::temp_dir().join(format!("tunnel-pg-{}-{}", std::process::id(), ns));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pg dir");
    run_ok(Command::new("chown").arg("postgres:postgres").arg(&dir));
    let data = dir.join("data");
    run_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(postgres_bin("initdb"))
            .args(["--auth=trust", "-U", "postgres", "-D"])
            .arg(&data),
    );
    let mut server = Topology::command(ns, "runuser");
    server
        .args(["-u", "postgres", "--"])
        .arg(postgres_bin("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "port=5432", "-c"])
        .arg(format!("unix_socket_directories={}", dir.display()));
    let mut daemon = Daemon::spawn("postgres", server, dir.join("postgres.log")).expect("postgres");
    daemon
        .wait_log(
            "database system is ready to accept connections",
            Duration::from_secs(30),
        )
        .expect("postgres up");
    Postgres {
        _daemon: daemon,
        dir,
    }
}

const QUERY: &str = "select 'hello from lab-db at ' || host(inet_server_addr())";

#[test]
fn postgres_published_from_a_site_that_only_dials_out_is_reached_by_psql_twice() {
    if needs_root("postgres_published_from_a_site_that_only_dials_out_is_reached_by_psql_twice") {
        return;
    }
    require("psql", "postgresql-client");
    let topology = Topology::new(&[]);
    let site = Site::new();
    let _postgres = postgres(&topology.client);
    let rules = "\n[publish.lab-db]\nby = [\"alice\"]\nreach = [\"bob\"]\nlisten = \"0.0.0.0:15432\"\nfrom = [\"127.0.0.0/8\"]\n";
    let (gw_dir, gateway) = gateway(&site, &topology, rules);
    // alice publishes the database of the client site, which nothing can dial into.
    let alice = agent(
        &site,
        &gw_dir,
        &gateway,
        ("alice", &topology.client, GATEWAY_IP),
        "[[publish]]\nname = \"lab-db\"\nto = \"127.0.0.1:5432\"\n",
    );
    wait_for(Duration::from_secs(15), "lab-db to be published", || {
        let status = gateway.status().ok()?;
        status["publications"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "lab-db")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", alice.daemon.log_text()));
    let expected = "hello from lab-db at 127.0.0.1";

    // At the gateway's site, through the publication's listen port.
    let at_gateway = stdout_within(
        Topology::command(&topology.gateway, "psql").args([
            "host=127.0.0.1 port=15432 user=postgres dbname=postgres connect_timeout=10",
            "-tAc",
            QUERY,
        ]),
        LIMIT,
    );
    assert_eq!(at_gateway.trim(), expected);

    // From the remote site's own agent, by name, under tunnel-run: both ends dial out.
    let bob = agent(
        &site,
        &gw_dir,
        &gateway,
        ("bob", &topology.remote, GATEWAY_REMOTE_IP),
        "",
    );
    let by_name = stdout_within(
        Topology::command(&topology.remote, bin("tunnel-run"))
            .arg("--config")
            .arg(&bob.config)
            .args(["--route", "lab-db=site-b", "--", "psql"])
            .args([
                "host=lab-db port=5432 user=postgres dbname=postgres connect_timeout=10",
                "-tAc",
                QUERY,
            ]),
        LIMIT,
    );
    assert_eq!(by_name.trim(), expected);
    // Neither site could have dialled the other.
    let (code, _, _) = output_within(
        Topology::command(&topology.remote, "psql").args([
            &format!("host={CLIENT_IP} port=5432 user=postgres dbname=postgres connect_timeout=3"),
            "-tAc",
            "select 1",
        ]),
        LIMIT,
    );
    assert_ne!(
        code,
        Some(0),
        "the remote site reached the client's database directly"
    );
}
