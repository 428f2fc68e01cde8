//! A supervised program's `connect`: which destinations the routes select, and for
//! those, the redirect done in the program's place. The program's own socket (taken
//! with `pidfd_getfd`) is registered with the agent as the preload library registers
//! it, connected to the agent's loopback listener by us, and the program's call
//! returns what a direct connect would have: 0, EINPROGRESS, or the far side's errno.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{SockaddrIn, SockaddrIn6, sockopt};
use tunnel_proto::Target;
use tunnel_proto::local::{Reply, Request, VerdictDelivery};
use tunnel_proto::pattern::Pattern;
use tunnel_proto::routes::{ConnectMode, RouteTable};

use crate::agent::AgentSocket;
use crate::program::{self, Redirect, Redirects};
use crate::resolver::Resolver;
use crate::sys::Answer;

/// The destination of a `connect`, as read from the program's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Internet(SocketAddr),
    /// Unix sockets, netlink and the rest: never carried.
    Other,
    /// Too short for its family: the kernel will say EINVAL itself.
    Malformed,
}

/// Reads a `struct sockaddr` of `len` bytes as the kernel would. IPv6 addresses of
/// the old 24-byte length (no scope id) are accepted, as Linux accepts them.
pub fn parse_sockaddr(bytes: &[u8]) -> Destination {
    let Some(family) = bytes.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])) else {
        return Destination::Malformed;
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match i32::from(family) {
        libc::AF_INET => {
            if bytes.len() < 16 {
                return Destination::Malformed;
            }
            let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            Destination::Internet(SocketAddr::V4(SocketAddrV4::new(ip, port(bytes))))
        }
        libc::AF_INET6 => {
            if bytes.len() < 24 {
                return Destination::Malformed;
            }
            let flowinfo = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[8..24]);
            let scope = bytes
                .get(24..28)
                .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            Destination::Internet(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(octets),
                port(bytes),
                flowinfo,
                scope,
            )))
        }
        _ => Destination::Other,
    }
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Direct,
    /// Through the agent: `via` the gateway (`None`: a synthetic address, whose name
    /// and gateway the agent knows).
    Tunnel {
        via: Option<String>,
        connect: ConnectMode,
    },
}

/// The routes, as the preload library reads them from its environment.
#[derive(Debug, Clone)]
pub struct Routes {
    pub table: RouteTable,
    pub synthetic: Vec<Pattern>,
    /// The agent's loopback listeners: connects there are preloaded programs'
    /// redirected connections (one stream each, not two) and are never routed again.
    pub agent_listeners: Vec<SocketAddr>,
}

impl Routes {
    /// Where a connection to `destination` goes. `name_of` gives the name a synthetic
    /// address was handed out for in this job, whose route then decides.
    pub fn decide(
        &self,
        destination: SocketAddr,
        name_of: impl Fn(IpAddr) -> Option<String>,
    ) -> Decision {
        let ip = destination.ip().to_canonical();
        let port = destination.port();
        let canonical = SocketAddr::new(ip, port);
        if self
            .agent_listeners
            .iter()
            .any(|l| SocketAddr::new(l.ip().to_canonical(), l.port()) == canonical)
        {
            return Decision::Direct;
        }
        if self.synthetic.iter().any(|p| p.matches_ip(ip, port)) {
            let route = name_of(ip).and_then(|name| self.table.route_name(&name, port));
            return Decision::Tunnel {
                via: route.map(|r| r.via.clone()),
                connect: route.map(|r| r.connect).unwrap_or_default(),
            };
        }
        match self.table.route_ip(ip, port) {
            Some(route) => Decision::Tunnel {
                via: Some(route.via.clone()),
                connect: route.connect,
            },
            None => Decision::Direct,
        }
    }
}

/// What went wrong with a redirect, for the trace; the program sees only the errno.
#[derive(Debug)]
pub struct Failed {
    pub errno: i32,
    pub why: String,
}

fn failed(errno: i32, why: impl Into<String>) -> Failed {
    Failed {
        errno,
        why: why.into(),
    }
}

/// Redirects the program's socket `socket` (our duplicate of it: an unconnected
/// internet stream socket) to the agent for `destination`: what the program's connect
/// returns.
pub fn redirect(
    agent: &AgentSocket,
    redirects: &Redirects,
    socket: &OwnedFd,
    destination: SocketAddr,
    via: Option<String>,
    connect: ConnectMode,
) -> Result<Answer, Failed> {
    let nonblocking = program::is_nonblocking(socket);
    let source = source_address(socket, destination)?;
    let delivery = match connect {
        ConnectMode::Checked => VerdictDelivery::Wait,
        ConnectMode::Optimistic => VerdictDelivery::Never,
    };
    let target = Target::from(SocketAddr::new(
        destination.ip().to_canonical(),
        destination.port(),
    ));
    let request = Request::Register {
        source,
        target,
        via,
        verdict: delivery,
    };
    let (exchange, reply) = agent.start(&request, Some(socket.as_fd())).map_err(|e| {
        failed(
            libc::ECONNREFUSED,
            format!("agent at {} unreachable ({e})", agent.path.display()),
        )
    })?;
    let listener = match reply {
        Reply::Ok { listener, .. } if listener.ip().to_canonical().is_loopback() => listener,
        Reply::Err { refusal, message } => {
            return Err(failed(refusal.errno(), format!("{refusal} {message}")));
        }
        other => {
            return Err(failed(
                libc::ECONNREFUSED,
                format!("unexpected answer from the agent: {other:?}"),
            ));
        }
    };
    if let Err(local) = connect_locally(socket, listener) {
        disconnect(socket);
        // The agent resets the local leg as soon as the gateway refuses: the verdict,
        // when it is there, says why.
        if delivery == VerdictDelivery::Wait
            && local.errno == libc::ECONNRESET
            && let Ok(Reply::Verdict {
                error: Some(refusal),
            }) = exchange.verdict()
        {
            return Err(failed(refusal.errno(), refusal.to_string()));
        }
        return Err(local);
    }
    if let Some(inode) = program::inode(socket) {
        redirects.insert(
            inode,
            Redirect {
                shown: destination,
                real: listener,
                resolver: false,
            },
        );
    }
    let connected = if nonblocking {
        // A non-blocking connect's answer: in progress; the socket is writable at once
        // and SO_ERROR is 0, as for a connection that has just been made.
        Answer::Fail(libc::EINPROGRESS)
    } else {
        Answer::Return(0)
    };
    if delivery == VerdictDelivery::Never {
        return Ok(connected);
    }
    // Checked: the program's connect returns once the gateway has answered, blocking
    // or not, so a refusal is the connect's own errno and never a socket that looks
    // connected and then resets; the socket is then unconnected again, so that a
    // program that tries again gets a new attempt, not EISCONN.
    let verdict = exchange.verdict();
    if !matches!(verdict, Ok(Reply::Verdict { error: None })) {
        disconnect(socket);
    }
    match verdict {
        Ok(Reply::Verdict { error: None }) => Ok(connected),
        Ok(Reply::Verdict {
            error: Some(refusal),
        }) => Err(failed(refusal.errno(), refusal.to_string())),
        Ok(other) => Err(failed(
            libc::ECONNREFUSED,
            format!("unexpected verdict from the agent: {other:?}"),
        )),
        Err(e) => Err(failed(
            libc::ECONNREFUSED,
            format!("no verdict from the agent ({e})"),
        )),
    }
}

/// The socket's own address, giving it a loopback one first if it has none (the
/// agent matches the connection that arrives by it).
fn source_address(socket: &OwnedFd, destination: SocketAddr) -> Result<SocketAddr, Failed> {
    if let Some(local) = program::local_addr(socket).filter(|a| a.port() != 0) {
        return Ok(local);
    }
    let mut last = libc::EADDRNOTAVAIL;
    for ip in tunnel_proto::local::loopback_sources(destination) {
        match program::bind(socket, SocketAddr::new(*ip, 0)) {
            Ok(()) => {
                return program::local_addr(socket)
                    .ok_or_else(|| failed(libc::EBADF, "no address after bind"));
            }
            Err(e) => last = e as i32,
        }
    }
    Err(failed(last, "cannot bind a loopback source address"))
}

/// A resolver's socket meant for `nameserver`: connected to the stub instead, where
/// the program's queries are answered (UDP: a `connect` sends nothing, and the kernel
/// now takes datagrams from the stub only; TCP: the stub's DNS-over-TCP listener).
pub fn redirect_resolver(
    resolver: &Resolver,
    redirects: &Redirects,
    socket: &OwnedFd,
    nameserver: SocketAddr,
) -> Result<Answer, Failed> {
    let stream = program::is_stream(socket);
    let ipv6 = program::is_ipv6(socket);
    let stub = resolver.stub_for(ipv6, stream);
    // Bound first (as the connect would bind it), so that the stub knows this socket
    // before its first query, or its connection, arrives.
    bind_any(socket, ipv6);
    note_resolver(resolver, redirects, socket, nameserver, stub);
    connect_locally(socket, stub)?;
    Ok(if stream && program::is_nonblocking(socket) {
        Answer::Fail(libc::EINPROGRESS)
    } else {
        Answer::Return(0)
    })
}

/// Makes a socket unconnected again (a connect to AF_UNSPEC), as after a failed connect.
fn disconnect(socket: &OwnedFd) {
    let _ = crate::sys::connect_raw(std::os::fd::AsFd::as_fd(socket), &[0u8; 16]);
}

/// Binds a socket that has no port yet to the wildcard address of its family, port 0,
/// as a send or connect would.
pub fn bind_any(socket: &OwnedFd, ipv6: bool) {
    if program::local_addr(socket).is_some_and(|a| a.port() != 0) {
        return;
    }
    let any: SocketAddr = if ipv6 {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let _ = program::bind(socket, any);
}

/// Notes a resolver socket of the program that asked `nameserver` and talks to `stub`.
pub fn note_resolver(
    resolver: &Resolver,
    redirects: &Redirects,
    socket: &OwnedFd,
    nameserver: SocketAddr,
    stub: SocketAddr,
) {
    if let Some(inode) = program::inode(socket) {
        resolver.note(inode, nameserver);
        redirects.insert(
            inode,
            Redirect {
                shown: nameserver,
                real: stub,
                resolver: true,
            },
        );
    }
}

/// Connects the program's socket to the agent's listener (or the resolver stub),
/// waiting for a non-blocking one to finish (both are on loopback: at once).
fn connect_locally(socket: &OwnedFd, listener: SocketAddr) -> Result<(), Failed> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let result = match listener {
        SocketAddr::V4(v4) => nix::sys::socket::connect(fd, &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => nix::sys::socket::connect(fd, &SockaddrIn6::from(v6)),
    };
    match result {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EINTR) => {
            let mut poll = [nix::poll::PollFd::new(
                socket.as_fd(),
                nix::poll::PollFlags::POLLOUT,
            )];
            let limit = nix::poll::PollTimeout::try_from(Duration::from_secs(5))
                .unwrap_or(nix::poll::PollTimeout::MAX);
            match nix::poll::poll(&mut poll, limit) {
                Ok(1..) => {}
                _ => {
                    return Err(failed(
                        libc::ETIMEDOUT,
                        "the agent's listener did not answer",
                    ));
                }
            }
            match nix::sys::socket::getsockopt(socket, sockopt::SocketError) {
                Ok(0) => Ok(()),
                Ok(errno) => Err(failed(errno, "connecting to the agent's listener")),
                Err(e) => Err(failed(e as i32, "connecting to the agent's listener")),
            }
        }
        Err(e) => Err(failed(e as i32, "connecting to the agent's listener")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    #[test]
    fn sockaddrs_read_as_the_kernel_reads_them() {
        assert_eq!(
            parse_sockaddr(&v4([10, 20, 0, 1], 443)),
            Destination::Internet("10.20.0.1:443".parse().unwrap())
        );
        assert_eq!(
            parse_sockaddr(&v4([10, 20, 0, 1], 443)[..15]),
            Destination::Malformed
        );
        let mut six = vec![0u8; 24];
        six[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        six[2..4].copy_from_slice(&22u16.to_be_bytes());
        six[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        assert_eq!(
            parse_sockaddr(&six),
            Destination::Internet("[::1]:22".parse().unwrap())
        );
        let mut unix = vec![0u8; 20];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix), Destination::Other);
        assert_eq!(parse_sockaddr(&[1]), Destination::Malformed);
    }

    #[test]
    fn the_agents_listeners_are_never_routed_again() {
        let routes = Routes {
            table: RouteTable::parse("b=127.0.0.0/8,10.20.0.0/16").unwrap(),
            synthetic: vec![Pattern::parse("198.18.0.0/15").unwrap()],
            agent_listeners: vec!["127.0.0.1:4000".parse().unwrap()],
        };
        assert_eq!(
            routes.decide("127.0.0.1:4000".parse().unwrap(), |_| None),
            Decision::Direct
        );
        assert_eq!(
            routes.decide("[::ffff:127.0.0.1]:4000".parse().unwrap(), |_| None),
            Decision::Direct
        );
        assert!(matches!(
            routes.decide("127.0.0.1:4001".parse().unwrap(), |_| None),
            Decision::Tunnel { via: Some(v), .. } if v == "b"
        ));
        assert_eq!(
            routes.decide("198.18.0.7:80".parse().unwrap(), |_| None),
            Decision::Tunnel {
                via: None,
                connect: ConnectMode::default()
            }
        );
        assert_eq!(
            routes.decide("10.21.0.1:80".parse().unwrap(), |_| None),
            Decision::Direct
        );
    }
}
