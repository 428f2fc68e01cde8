//! The resolver stub of supervised programs. A static or Go program's resolver sends
//! its queries over UDP (or TCP) to the nameserver of /etc/resolv.conf itself; the
//! supervisor sends them here instead. A name the routes select gets the agent's
//! synthetic address (`RESOLVE`, the same mapping every process of the job gets), so
//! that its connect is carried by name and the far site resolves it; any other query
//! goes to the nameserver the program asked, and its answer comes back as it was.
//! Answers reach the program from this stub's address; the supervisor shows them as
//! from the nameserver (`recvfrom`), as resolvers check.
//!
//! Only sockets the supervisor sent here are answered: the stub listens on loopback,
//! where other users' programs could reach it too.
//!
//! The stub lives in `tunnel-run`, beside the routes the program runs with (including
//! `--route`), which the agent may not have.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// Queries answered at once, at most; more are dropped (the resolver asks again).
const MAX_BUSY: usize = 128;
/// DNS-over-TCP connections served at once, at most, and for how long each.
const MAX_TCP: usize = 32;
const TCP_FOR: Duration = Duration::from_secs(15);

pub struct Resolver {
    v4: UdpSocket,
    v6: Option<UdpSocket>,
    /// The same, for DNS over TCP (a truncated answer, `options use-vc`).
    tcp_v4: TcpListener,
    tcp_v6: Option<TcpListener>,
    busy: AtomicUsize,
    tcp_busy: AtomicUsize,
    /// The program sockets the supervisor sent here, by inode, with the nameserver
    /// each asked: only they are answered.
    asked: Mutex<HashMap<u64, SocketAddr>>,
    /// The synthetic addresses handed out, with their names: a connect to one is
    /// routed by the name's route.
    handed_out: Mutex<HashMap<IpAddr, String>>,
    table: RouteTable,
    agent: AgentSocket,
    trace: bool,
}

/// `v4`'s address, or `v6`'s for an IPv6 socket (the IPv4 one in mapped form when
/// there is no ::1).
fn for_family(v4: Option<SocketAddr>, v6: Option<SocketAddr>, ipv6_socket: bool) -> SocketAddr {
    let v4 = v4.unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    match (v6, ipv6_socket) {
        (Some(v6), true) => v6,
        (None, true) => {
            SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), v4.port())
        }
        (_, false) => v4,
    }
}

impl Resolver {
    /// Binds the stub on loopback and starts serving it.
    pub fn start(
        table: RouteTable,
        agent: AgentSocket,
        trace: bool,
    ) -> std::io::Result<Arc<Resolver>> {
        let resolver = Arc::new(Resolver {
            v4: UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
            v6: UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).ok(),
            tcp_v4: TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
            tcp_v6: TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).ok(),
            busy: AtomicUsize::new(0),
            tcp_busy: AtomicUsize::new(0),
            asked: Mutex::default(),
            handed_out: Mutex::default(),
            table,
            agent,
            trace,
        });
        for socket in [Some(&resolver.v4), resolver.v6.as_ref()]
            .into_iter()
            .flatten()
        {
            let socket = socket.try_clone()?;
            let serving = resolver.clone();
            std::thread::Builder::new()
                .name("resolver".into())
                .spawn(move || serving.serve(&socket))?;
        }
        for listener in [Some(&resolver.tcp_v4), resolver.tcp_v6.as_ref()]
            .into_iter()
            .flatten()
        {
            let listener = listener.try_clone()?;
            let serving = resolver.clone();
            std::thread::Builder::new()
                .name("resolver-tcp".into())
                .spawn(move || serving.serve_tcp(&listener))?;
        }
        Ok(resolver)
    }

    /// Where a program socket of this family and kind sends what it meant for a
    /// nameserver.
    pub fn stub_for(&self, ipv6_socket: bool, stream: bool) -> SocketAddr {
        if stream {
            for_family(
                self.tcp_v4.local_addr().ok(),
                self.tcp_v6.as_ref().and_then(|l| l.local_addr().ok()),
                ipv6_socket,
            )
        } else {
            for_family(
                self.v4.local_addr().ok(),
                self.v6.as_ref().and_then(|s| s.local_addr().ok()),
                ipv6_socket,
            )
        }
    }

    /// True for the stub's own (UDP) addresses.
    pub fn is_stub(&self, address: SocketAddr) -> bool {
        let address = crate::program::canonical(address);
        [Some(&self.v4), self.v6.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.local_addr().ok())
            .any(|a| a == address)
    }

    /// Notes that the program socket `inode` asked `nameserver`.
    pub fn note(&self, inode: u64, nameserver: SocketAddr) {
        let mut asked = self.asked.lock();
        if asked.len() > 65_536 {
            asked.clear();
        }
        asked.insert(inode, nameserver);
    }

    /// The name a synthetic address was handed out for, in this job.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        self.handed_out.lock().get(&ip.to_canonical()).cloned()
    }

    /// The nameserver the socket at `from` asked, when it is one the supervisor sent
    /// here (to `to`, one of the stub's addresses), known by its inode in the kernel's
    /// socket table: queries from anyone else (another user's program on this machine,
    /// whatever port it binds) are dropped.
    fn asked_by(&self, from: SocketAddr, to: SocketAddr, tcp: bool) -> Option<SocketAddr> {
        if !from.ip().to_canonical().is_loopback() {
            return None;
        }
        let inode = crate::sockets_table::sender(from, to, tcp)?;
        self.asked.lock().get(&inode).copied()
    }

    /// Runs `work` on a thread of its own, unless [`MAX_BUSY`] are busy already.
    fn spawn_bounded(self: &Arc<Self>, work: impl FnOnce(&Resolver) + Send + 'static) {
        if self.busy.fetch_add(1, Ordering::AcqRel) >= MAX_BUSY {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let resolver = self.clone();
        let started = std::thread::Builder::new()
            .name("query".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                work(&resolver);
                resolver.busy.fetch_sub(1, Ordering::AcqRel);
            });
        if started.is_err() {
            self.busy.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn serve(self: &Arc<Self>, socket: &UdpSocket) {
        let mut buffer = vec![0u8; MAX_DATAGRAM];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buffer) else {
                continue;
            };
            let Ok(to) = socket.local_addr() else {
                continue;
            };
            let Some(nameserver) = self.asked_by(from, to, false) else {
                continue;
            };
            let query = buffer[..n].to_vec();
            let Ok(reply_socket) = socket.try_clone() else {
                continue;
            };
            self.spawn_bounded(move |resolver| {
                if let Some(answer) = resolver.answer(&query, nameserver) {
                    let _ = reply_socket.send_to(&answer, from);
                }
            });
        }
    }

    /// DNS over TCP: each message with its two-byte length, as many as the program
    /// sends on the connection.
    fn serve_tcp(self: &Arc<Self>, listener: &TcpListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (Ok(from), Ok(to)) = (stream.peer_addr(), stream.local_addr()) else {
                continue;
            };
            let Some(nameserver) = self.asked_by(from, to, true) else {
                continue;
            };
            if self.tcp_busy.fetch_add(1, Ordering::AcqRel) >= MAX_TCP {
                self.tcp_busy.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let serving = self.clone();
            let started = std::thread::Builder::new()
                .name("query-tcp".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    serving.answer_tcp(stream, nameserver);
                    serving.tcp_busy.fetch_sub(1, Ordering::AcqRel);
                });
            if started.is_err() {
                self.tcp_busy.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Answers the queries of one connection, for at most [`TCP_FOR`].
    fn answer_tcp(&self, mut stream: TcpStream, nameserver: SocketAddr) {
        let until = std::time::Instant::now() + TCP_FOR;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            let mut length = [0u8; 2];
            if stream.read_exact(&mut length).is_err() {
                return;
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
            if stream.read_exact(&mut query).is_err() {
                return;
            }
            let Some(answer) = self.answer(&query, nameserver) else {
                return;
            };
            let Ok(length) = u16::try_from(answer.len()) else {
                return;
            };
            if stream.write_all(&length.to_be_bytes()).is_err()
                || stream.write_all(&answer).is_err()
            {
                return;
            }
        }
    }

    /// The answer for `query` from a program socket that asked `nameserver`.
    fn answer(&self, query: &[u8], nameserver: SocketAddr) -> Option<Vec<u8>> {
        if let Some(question) = dns::read_query(query)
            && self.table.may_route_name(&question.name)
        {
            return Some(self.synthetic(query, &question));
        }

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
            let kind = match question.qtype {
                dns::TYPE_A => "A".to_string(),
                dns::TYPE_AAAA => "AAAA".to_string(),
                other => format!("type {other}"),
            };
            let answered = match (question.qtype, address) {
                (dns::TYPE_A | dns::TYPE_AAAA, Some(a)) => a.to_string(),
                _ => "no address".to_string(),
            };
            eprintln!(
                "tunnel-run: supervisor: {} {kind}: {answered} (routed: a synthetic address)",
                question.name
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
