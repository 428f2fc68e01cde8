//! The resolver stub of supervised programs. A static or Go program's resolver sends
//! its queries over UDP to the nameserver of /etc/resolv.conf itself; the supervisor
//! sends them here instead. A name the routes select gets the agent's synthetic
//! address (`RESOLVE`, the same mapping every process of the job gets), so that its
//! connect is carried by name and the far site resolves it; any other query goes to
//! the nameserver the program asked, and its answer comes back as it was. Answers
//! reach the program from this stub's address; the supervisor shows them as from the
//! nameserver (`recvfrom`), as resolvers check.
//!
//! The stub lives in `tunnel-run`, beside the routes the program runs with (including
//! `--route`), which the agent may not have.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tunnel_proto::dns;
use tunnel_proto::local::{Reply, Request};
use tunnel_proto::routes::RouteTable;

use crate::agent::AgentSocket;

/// How long a forwarded query may wait for the nameserver.
const FORWARD_WITHIN: Duration = Duration::from_secs(5);
/// Largest datagram taken (EDNS answers can exceed 512 bytes).
const MAX_DATAGRAM: usize = 65_535;

pub struct Resolver {
    v4: UdpSocket,
    v6: Option<UdpSocket>,
    /// For each program socket that asked (by its address), the nameserver it asked.
    asked: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// The synthetic addresses handed out, with their names: a connect to one is
    /// routed by the name's route.
    handed_out: Mutex<HashMap<IpAddr, String>>,
    table: RouteTable,
    agent: AgentSocket,
    trace: bool,
}

impl Resolver {
    /// Binds the stub on loopback and starts serving it.
    pub fn start(
        table: RouteTable,
        agent: AgentSocket,
        trace: bool,
    ) -> std::io::Result<Arc<Resolver>> {
        let v4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let v6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).ok();
        let resolver = Arc::new(Resolver {
            v4,
            v6,
            asked: Mutex::default(),
            handed_out: Mutex::default(),
            table,
            agent,
            trace,
        });
        let sockets: Vec<UdpSocket> = [Some(&resolver.v4), resolver.v6.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.try_clone().ok())
            .collect();
        for socket in sockets {
            let serving = resolver.clone();
            std::thread::Builder::new()
                .name("resolver".into())
                .spawn(move || serving.serve(&socket))?;
        }
        Ok(resolver)
    }

    /// Where a program socket of this family sends what it meant for a nameserver.
    pub fn stub_for(&self, ipv6_socket: bool) -> SocketAddr {
        let v4 = self
            .v4
            .local_addr()
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        match (&self.v6, ipv6_socket) {
            (Some(v6), true) => v6.local_addr().unwrap_or(v4),
            // An IPv6 socket without ::1: the IPv4 stub in mapped form.
            (None, true) => {
                SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), v4.port())
            }
            (_, false) => v4,
        }
    }

    /// True for the stub's own addresses.
    pub fn is_stub(&self, address: SocketAddr) -> bool {
        let address = crate::program::canonical(address);
        [Some(&self.v4), self.v6.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.local_addr().ok())
            .any(|a| a == address)
    }

    /// Notes that the program socket at `program` asked `nameserver`.
    pub fn note(&self, program: SocketAddr, nameserver: SocketAddr) {
        let mut asked = self.asked.lock();
        if asked.len() > 65_536 {
            asked.clear();
        }
        asked.insert(crate::program::canonical(program), nameserver);
    }

    /// The name a synthetic address was handed out for, in this job.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        self.handed_out.lock().get(&ip.to_canonical()).cloned()
    }

    fn serve(self: &Arc<Self>, socket: &UdpSocket) {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buffer) else {
                continue;
            };
            let query = buffer[..n].to_vec();
            let Ok(reply_socket) = socket.try_clone() else {
                continue;
            };
            let resolver = self.clone();
            let _ = std::thread::Builder::new()
                .name("query".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    if let Some(answer) = resolver.answer(&query, from) {
                        let _ = reply_socket.send_to(&answer, from);
                    }
                });
        }
    }

    /// The answer for `query` from the program socket at `from`.
    fn answer(&self, query: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        if let Some(question) = dns::read_query(query)
            && self.table.may_route_name(&question.name)
        {
            return Some(self.synthetic(query, &question));
        }
        let nameserver = *self.asked.lock().get(&crate::program::canonical(from))?;
        self.forward(query, nameserver)
    }

    /// A routed name's answer: its synthetic address of the type asked.
    fn synthetic(&self, query: &[u8], question: &dns::Question) -> Vec<u8> {
        let request = Request::Resolve {
            name: question.name.clone(),
        };
        let address = match self.agent.start(&request, None) {
            Ok((_, Reply::Addrs { v4, v6 })) => {
                let mut handed = self.handed_out.lock();
                handed.insert(v4.to_canonical(), question.name.clone());
                handed.insert(v6, question.name.clone());
                match question.qtype {
                    dns::TYPE_AAAA => Some(v6),
                    _ => Some(v4),
                }
            }
            other => {
                if self.trace {
                    let why = match other {
                        Ok((_, reply)) => format!("{reply:?}"),
                        Err(e) => e.to_string(),
                    };
                    eprintln!(
                        "tunnel-run: supervisor: no synthetic address for {} ({why})",
                        question.name
                    );
                }
                None
            }
        };
        if self.trace {
            eprintln!(
                "tunnel-run: supervisor: {} (type {}) -> {address:?}",
                question.name, question.qtype
            );
        }
        dns::answer(query, question, address)
    }

    /// Sends `query` to `nameserver` and returns its answer.
    fn forward(&self, query: &[u8], nameserver: SocketAddr) -> Option<Vec<u8>> {
        let any: SocketAddr = match nameserver {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(any).ok()?;
        socket.connect(nameserver).ok()?;
        socket.set_read_timeout(Some(FORWARD_WITHIN)).ok()?;
        socket.send(query).ok()?;
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let n = socket.recv(&mut buffer).ok()?;
        buffer.truncate(n);
        Some(buffer)
    }
}
