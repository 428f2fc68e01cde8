//! Inside-out: services published by agents that only dial out, reached at the
//! gateway's listen port and by name from other agents (the patch panel), with
//! several publishers for one name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tunnel_tests::*;

/// An echo server on 127.0.0.1 that first says `hello from TAG\n`.
fn echo(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("echo");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = conn.write_all(format!("hello from {tag}\n").as_bytes());
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads the greeting line of a connection to a published echo, sends a line and
/// checks it comes back; returns the greeting.
fn talk(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while !greeting.ends_with(b"\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        greeting.push(byte[0]);
    }
    conn.write_all(b"ping\n")?;
    let mut back = [0u8; 5];
    conn.read_exact(&mut back)?;
    assert_eq!(&back, b"ping\n");
    Ok(String::from_utf8_lossy(&greeting).trim().to_string())
}

/// The address a publication's listen port got (it was 127.0.0.1:0 in the config).
fn offered_at(gateway: &mut Gateway, name: &str) -> SocketAddr {
    gateway
        .daemon
        .wait_log(
            &format!("publication `{name}` offered on "),
            Duration::from_secs(10),
        )
        .expect("the listen port")
        .trim()
        .parse()
        .expect("an address")
}

fn publish_table(name: &str, to: SocketAddr) -> String {
    format!("[[publish]]\nname = \"{name}\"\nto = \"{to}\"\n")
}

fn wait_published(agent: &Agent, name: &str) {
    wait_for(
        Duration::from_secs(15),
        "the publication to be held",
        || {
            let status = agent.status().ok()?;
            let held = status["publications"].as_array()?.iter().any(|p| {
                p["published"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|x| x == name))
            });
            held.then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.daemon.log_text()));
}

fn agent_for(site: &Site, gw_dir: &Path, gateway: &Gateway, identity: &str, body: &str) -> Agent {
    let creds = site.issue(gw_dir, identity, &format!("{identity}-creds"));
    let table = gateway_table("site-b", gateway.addr, &creds, identity);
    Agent::start(&site.path(identity), &format!("{table}{body}"), true).expect("agent")
}

const RULES: &str = "\n[publish.echo]\nby = [\"alice\", \"carol\"]\nreach = [\"bob\"]\nlisten = \"127.0.0.1:0\"\nfrom = [\"127.0.0.0/8\"]\n\n[publish.closed]\nby = [\"alice\"]\nlisten = \"127.0.0.1:0\"\nfrom = [\"10.0.0.0/8\"]\n";

#[test]
fn a_published_service_is_reached_at_the_gateway_port_and_by_name_through_the_patch_panel() {
    let service = echo("alice's site");
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let mut gateway = Gateway::start(&gw_dir, RULES).expect("gateway");
    let port = offered_at(&mut gateway, "echo");
    let closed = offered_at(&mut gateway, "closed");
    let alice = agent_for(
        &site,
        &gw_dir,
        &gateway,
        "alice",
        &format!(
            "{}{}",
            publish_table("echo", service),
            publish_table("closed", service)
        ),
    );
    wait_published(&alice, "echo");

    // At the gateway's own site, through its listen port.
    assert_eq!(
        talk(port).expect("through the listen port"),
        "hello from alice's site"
    );
    // Another agent, by name: both sites only dial out.
    let bob = agent_for(&site, &gw_dir, &gateway, "bob", &forward_table("echo"));
    assert_eq!(
        talk(bob.forwards[0]).expect("through the patch panel"),
        "hello from alice's site"
    );

    // Refusals: dave is not in `reach`; a source outside `from` never gets through.
    let dave = agent_for(&site, &gw_dir, &gateway, "dave", &forward_table("echo"));
    assert!(talk(dave.forwards[0]).is_err(), "dave reached echo");
    assert!(talk(closed).is_err(), "a source outside `from` got through");
    // An identity not in `by` cannot publish.
    let eve = agent_for(
        &site,
        &gw_dir,
        &gateway,
        "eve",
        &publish_table("echo", service),
    );
    wait_for(
        Duration::from_secs(10),
        "eve's publication to be refused",
        || {
            let status = eve.status().ok()?;
            let refused = status["publications"][0]["refused"].to_string();
            refused.contains("may not publish").then_some(())
        },
    )
    .expect("eve refused");
    let status = gateway.status().expect("gateway status");
    let publishers = &status["publications"][0]["publishers"];
    assert_eq!(publishers.as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(publishers[0]["identity"], "alice");
    drop((alice, bob, dave, eve));
}

#[test]
fn with_two_publishers_new_connections_go_on_when_one_is_killed() {
    let a = echo("a");
    let b = echo("b");
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let mut gateway = Gateway::start(&gw_dir, RULES).expect("gateway");
    let port = offered_at(&mut gateway, "echo");
    let alice = agent_for(&site, &gw_dir, &gateway, "alice", &publish_table("echo", a));
    let carol = agent_for(&site, &gw_dir, &gateway, "carol", &publish_table("echo", b));
    wait_published(&alice, "echo");
    wait_published(&carol, "echo");
    let mut seen = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0, 0);
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(6) {
        if !killed && started.elapsed() > Duration::from_secs(2) {
            alice.daemon.signal(Signal::SIGKILL);
            killed = true;
        }
        match talk(port) {
            Ok(greeting) => {
                ok += 1;
                seen.insert(greeting);
            }
            Err(_) => failed += 1,
        }
    }
    assert!(seen.len() == 2, "both publishers served: {seen:?}");
    let total = ok + failed;
    assert!(
        failed * 1000 <= total,
        "{failed} of {total} connections failed after a publisher was killed"
    );
    drop(carol);
}

/// A service that reads a PROXY protocol v2 header and says the source it names.
fn proxy_aware() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("service");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut head = [0u8; 16];
                if conn.read_exact(&mut head).is_err() {
                    return;
                }
                let said = if head[..12] != *b"\r\n\r\n\0\r\nQUIT\n" || head[12] != 0x21 {
                    "no PROXY header".to_string()
                } else {
                    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
                    let mut rest = vec![0u8; len];
                    if conn.read_exact(&mut rest).is_err() || head[13] != 0x11 || len < 12 {
                        "a PROXY header that is not TCP over IPv4".to_string()
                    } else {
                        let ip = std::net::Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
                        let port = u16::from_be_bytes([rest[8], rest[9]]);
                        format!("source {ip}:{port}")
                    }
                };
                let _ = conn.write_all(format!("{said}\n").as_bytes());
            });
        }
    });
    addr
}

#[test]
fn with_proxy_protocol_the_service_sees_the_client_address_at_the_gateway() {
    let service = proxy_aware();
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let mut gateway = Gateway::start(&gw_dir, RULES).expect("gateway");
    let port = offered_at(&mut gateway, "echo");
    let alice = agent_for(
        &site,
        &gw_dir,
        &gateway,
        "alice",
        &format!("[[publish]]\nname = \"echo\"\nto = \"{service}\"\nproxy_protocol = true\n"),
    );
    wait_published(&alice, "echo");
    let mut conn =
        std::net::TcpStream::connect_timeout(&port, Duration::from_secs(5)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mine = conn.local_addr().expect("local address");
    let mut said = String::new();
    conn.read_to_string(&mut said)
        .expect("the service's answer");
    assert_eq!(said.trim(), format!("source {mine}"));
}

/// A TCP relay to `target` that can stop carrying anything (a blackholed network:
/// nothing is closed, nothing gets through) and start again.
struct Blackhole {
    addr: SocketAddr,
    holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped when the network comes back: connections from before never carry a byte
    /// again, and are never closed either (a NAT that lost their state).
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Blackhole {
    fn to(target: SocketAddr) -> Blackhole {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay");
        let addr = listener.local_addr().expect("addr");
        let holding = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (hold, generations) = (holding.clone(), generation.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let (hold, generations) = (hold.clone(), generations.clone());
                std::thread::spawn(move || {
                    while hold.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let Ok(server) = std::net::TcpStream::connect(target) else {
                        return;
                    };
                    let born = generations.load(Ordering::SeqCst);
                    // Carries bytes while the network is up and this connection is of its
                    // current generation; otherwise holds them, and the sockets, forever.
                    let dark = {
                        let (hold, generations) = (hold.clone(), generations.clone());
                        move || {
                            hold.load(Ordering::SeqCst)
                                || generations.load(Ordering::SeqCst) != born
                        }
                    };
                    let pump =
                        move |mut from: std::net::TcpStream,
                              mut to: std::net::TcpStream,
                              dark: Box<dyn Fn() -> bool + Send>| {
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 16 * 1024];
                                loop {
                                    while dark() {
                                        std::thread::sleep(Duration::from_millis(50));
                                    }
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => {
                                            if !dark() {
                                                let _ = to.shutdown(std::net::Shutdown::Write);
                                            }
                                            return;
                                        }
                                        Ok(n) => {
                                            if dark() {
                                                continue;
                                            }
                                            if to.write_all(&buf[..n]).is_err() {
                                                return;
                                            }
                                        }
                                    }
                                }
                            })
                        };
                    let (c2, s2) = (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    );
                    // The sockets stay open as long as the relay runs: a lost state never
                    // closes anything.
                    let keep = (client.try_clone(), server.try_clone());
                    pump(client, server, Box::new(dark.clone()));
                    pump(s2, c2, Box::new(dark));
                    std::mem::forget(keep);
                });
            }
        });
        Blackhole {
            addr,
            holding,
            generation,
        }
    }

    /// Dark: nothing gets through. Light again: new connections work, and the ones from
    /// before stay dark for good.
    fn set(&self, dark: bool) {
        if !dark {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.holding
            .store(dark, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_publisher_blackholed_for_thirty_seconds_has_its_publication_back_soon_after_it_reconnects() {
    let service = echo("alice's site");
    let site = Site::new();
    let (gw_dir, mut gateway) = gateway_with(&site, "ping_interval = 1\nping_timeout = 2\n", RULES);
    let port = offered_at(&mut gateway, "echo");
    let network = Blackhole::to(gateway.addr);
    let creds = site.issue(&gw_dir, "alice", "alice-creds");
    let table = gateway_table("site-b", network.addr, &creds, "alice");
    let alice = Agent::start(
        &site.path("alice"),
        &format!("{table}{}", publish_table("echo", service)),
        true,
    )
    .expect("agent");
    wait_published(&alice, "echo");
    assert!(talk(port).is_ok());

    network.set(true);
    std::thread::sleep(Duration::from_secs(30));
    let ups = |agent: &Agent| {
        agent
            .daemon
            .log_text()
            .matches(" up gateway=site-b")
            .count()
    };
    let before = ups(&alice);
    network.set(false);
    wait_for(
        Duration::from_secs(30),
        "the reverse connection to come back",
        || (ups(&alice) > before).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", alice.daemon.log_text()));
    let reconnected = Instant::now();
    wait_for(
        Duration::from_secs(2),
        "the publication back after the reconnect",
        || talk(port).ok(),
    )
    .expect("published again within 2 s of reconnecting");
    assert!(reconnected.elapsed() <= Duration::from_secs(2));
}

/// An exclusive name: a second publisher is refused with the holder named, while the
/// holder itself, reconnecting before the gateway noticed its old connection was gone,
/// takes its publication back at once (never "already in use").
#[test]
fn an_exclusive_name_refuses_a_second_publisher_but_not_its_holder_coming_back() {
    let service = echo("alice's site");
    let site = Site::new();
    let rules = "\n[publish.solo]\nby = [\"alice\", \"carol\"]\nlisten = \"127.0.0.1:0\"\nfrom = [\"127.0.0.0/8\"]\nexclusive = true\n";
    // The gateway is slow to notice a dead connection: the old lease outlives it.
    let (gw_dir, mut gateway) = gateway_with(&site, "ping_interval = 60\nping_timeout = 60", rules);
    let port = offered_at(&mut gateway, "solo");
    let network = Blackhole::to(gateway.addr);
    let creds = site.issue(&gw_dir, "alice", "alice-creds");
    let table = gateway_table("site-b", network.addr, &creds, "alice");
    let alice = Agent::start(
        &site.path("alice"),
        &format!("{table}{}", publish_table("solo", service)),
        true,
    )
    .expect("agent");
    wait_published(&alice, "solo");

    let carol = agent_for(
        &site,
        &gw_dir,
        &gateway,
        "carol",
        &publish_table("solo", service),
    );
    wait_for(Duration::from_secs(10), "carol to be refused", || {
        let refused = carol.status().ok()?["publications"][0]["refused"].to_string();
        refused.contains("held by alice").then_some(())
    })
    .expect("the holder is named");
    drop(carol);

    // Alice's network goes dark long enough for her agent (PING 1 s / 2 s) to give up
    // on the connection, not for the gateway (60 s).
    network.set(true);
    std::thread::sleep(Duration::from_secs(5));
    network.set(false);
    // The agent logs each time the gateway confirms the publication.
    let held = |agent: &Agent| agent.daemon.log_text().matches("published `solo`").count();
    wait_for(
        Duration::from_secs(20),
        "alice to reconnect and hold it again",
        || (held(&alice) >= 2).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", alice.daemon.log_text()));
    wait_for(Duration::from_secs(2), "alice's publication back", || {
        talk(port).ok()
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- alice ---\n{}\n--- gateway ---\n{}",
            alice.daemon.log_text(),
            gateway.daemon.log_text()
        )
    });
    assert!(
        !alice.daemon.log_text().contains("refused to publish"),
        "{}",
        alice.daemon.log_text()
    );
}

/// A publisher's inbound streams count against its identity's stream limit.
#[test]
fn a_publishers_inbound_streams_have_a_limit_of_their_own() {
    let service = echo("alice's site");
    let site = Site::new();
    let rules = format!("{RULES}{}", allow_alice(&[&service.to_string()]));
    let (gw_dir, mut gateway) = gateway_with(&site, "max_streams_per_identity = 2\n", &rules);
    let port = offered_at(&mut gateway, "echo");
    let alice = agent_for(
        &site,
        &gw_dir,
        &gateway,
        "alice",
        &format!(
            "{}{}",
            publish_table("echo", service),
            forward_table(&service.to_string())
        ),
    );
    wait_published(&alice, "echo");
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut conn = std::net::TcpStream::connect(port).expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut greeting = [0u8; 20];
            conn.read_exact(&mut greeting)
                .expect("a stream within the limit");
            conn
        })
        .collect();
    assert!(talk(port).is_err(), "a third stream passed a limit of two");
    // Connections from outside never crowd out alice's own streams.
    assert_eq!(
        talk(alice.forwards[0]).expect("alice's own stream"),
        "hello from alice's site"
    );
    drop(held);
    wait_for(
        Duration::from_secs(5),
        "a stream once the others ended",
        || talk(port).ok(),
    )
    .expect("within the limit again");
    let status = gateway.status().expect("status");
    assert!(
        status["refusals"].to_string().contains("stream-over-limit"),
        "{status}"
    );
}

/// The patch panel for an unmodified program: under tunnel-run with a route for the
/// publication's name, python connects to "echo" by name and talks to the service at
/// the publishing agent's site.
#[test]
fn a_preloaded_program_reaches_a_publication_by_its_name() {
    require("python3", "python3");
    let service = echo("alice's site");
    let site = Site::new();
    let gw_dir = site.init_gateway("gateway");
    let gateway = Gateway::start(&gw_dir, RULES).expect("gateway");
    let alice = agent_for(
        &site,
        &gw_dir,
        &gateway,
        "alice",
        &publish_table("echo", service),
    );
    wait_published(&alice, "echo");
    let bob = agent_for(&site, &gw_dir, &gateway, "bob", "");
    let program = "import socket\ns = socket.create_connection(('echo', 7), timeout=10)\nf = s.makefile('rwb')\nprint(f.readline().decode().strip())\nf.write(b'ping\\n'); f.flush()\nprint(f.readline().decode().strip())\n";
    let out = run_ok(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&bob.config)
            .args([
                "--route",
                "echo=site-b",
                "--",
                "/usr/bin/python3",
                "-c",
                program,
            ]),
    );
    assert_eq!(out.trim(), "hello from alice's site\nping", "{out}");
}
