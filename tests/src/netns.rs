//! A three-site topology in network namespaces, for tests that must prove traffic went
//! through the tunnel:
//!
//! ```text
//!   client ns  10.77.1.1 ──veth── 10.77.1.2  gateway ns  10.77.2.1 ──veth── 10.77.2.2  remote ns
//!   (agent, programs)                        (tunnel-gateway)                 (servers)
//! ```
//!
//! The client has no route to 10.77.2.0/24 and no forwarding happens at the gateway, so
//! the only way from client to remote is the tunnel. Names of the remote site are in
//! the gateway's `/etc/netns/<ns>/hosts` only. Every namespace gets a `resolv.conf`
//! pointing at 127.0.0.1, so nothing waits on the host's resolver. Dropping the
//! topology deletes the namespaces and their files; processes started in them must be
//! stopped first (keep the `Topology` after them in a struct, or drop it last).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const CLIENT_IP: &str = "10.77.1.1";
pub const GATEWAY_IP: &str = "10.77.1.2";
pub const REMOTE_IP: &str = "10.77.2.2";

pub struct Topology {
    pub client: String,
    pub gateway: String,
    pub remote: String,
    files: Vec<PathBuf>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all);
}

impl Topology {
    /// Builds the three namespaces; `remote_names` go into the gateway's hosts file as
    /// names of the remote host.
    pub fn new(remote_names: &[&str]) -> Topology {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "tn{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut t = Topology {
            client: format!("{id}c"),
            gateway: format!("{id}g"),
            remote: format!("{id}r"),
            files: Vec::new(),
        };
        for ns in [&t.client, &t.gateway, &t.remote] {
            let dir = PathBuf::from("/etc/netns").join(ns);
            std::fs::create_dir_all(&dir).expect("/etc/netns dir");
            std::fs::write(
                dir.join("resolv.conf"),
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
            )
            .expect("resolv.conf");
            let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
            if *ns == t.gateway {
                for name in remote_names {
                    hosts.push_str(&format!("{REMOTE_IP} {name}\n"));
                }
            }
            std::fs::write(dir.join("hosts"), hosts).expect("hosts");
            t.files.push(dir);
            ip(&["netns", "add", ns]);
            in_ns(ns, &["link", "set", "lo", "up"]);
        }
        let (cg, gc) = (format!("{id}cg"), format!("{id}gc"));
        let (gr, rg) = (format!("{id}gr"), format!("{id}rg"));
        ip(&["link", "add", &cg, "type", "veth", "peer", "name", &gc]);
        ip(&["link", "set", &cg, "netns", &t.client]);
        ip(&["link", "set", &gc, "netns", &t.gateway]);
        ip(&["link", "add", &gr, "type", "veth", "peer", "name", &rg]);
        ip(&["link", "set", &gr, "netns", &t.gateway]);
        ip(&["link", "set", &rg, "netns", &t.remote]);
        in_ns(
            &t.client,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", &cg],
        );
        in_ns(&t.client, &["link", "set", &cg, "up"]);
        in_ns(
            &t.gateway,
            &["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", &gc],
        );
        in_ns(&t.gateway, &["link", "set", &gc, "up"]);
        in_ns(&t.gateway, &["addr", "add", "10.77.2.1/24", "dev", &gr]);
        in_ns(&t.gateway, &["link", "set", &gr, "up"]);
        in_ns(
            &t.remote,
            &["addr", "add", &format!("{REMOTE_IP}/24"), "dev", &rg],
        );
        in_ns(&t.remote, &["link", "set", &rg, "up"]);
        t
    }

    /// A command run inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.gateway, &self.remote] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for dir in &self.files {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
