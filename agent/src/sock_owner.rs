//! Asks the kernel which local user owns the socket at the other end of an accepted
//! connection (`NETLINK_SOCK_DIAG`; the bytes are `tunnel_proto::sock_diag`).
//!
//! A loopback connection's far end is a socket on this machine; its owner is known to
//! the kernel, whatever the connecting program claims. The kernel answers while the
//! question is being sent, so one blocking send and receive on a socket of our own take
//! a few microseconds and never wait on the network.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use tunnel_proto::sock_diag::{
    DiagError, Owner, QUERY_LEN, decode_answer, decode_listener, encode_query,
};

/// One netlink socket, shared by every listener of the agent.
pub struct SocketOwners {
    netlink: Mutex<OwnedFd>,
    sequence: AtomicU32,
}

impl SocketOwners {
    pub fn open() -> io::Result<SocketOwners> {
        let netlink = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        // The kernel answers at once; a bound on the wait only guards against the
        // impossible.
        setsockopt(&netlink, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
        Ok(SocketOwners {
            netlink: Mutex::new(netlink),
            sequence: AtomicU32::new(1),
        })
    }

    /// The uid that owns the local TCP socket bound at `peer` and connected to `ours`
    /// (the two ends of a connection we accepted); `None` when no local socket has that
    /// address (it closed already, or the connection came from another host).
    pub fn uid_of_peer(&self, peer: SocketAddr, ours: SocketAddr) -> io::Result<Option<u32>> {
        let (peer, ours) = same_family(peer, ours);
        let owner = self.ask(peer, ours, decode_answer)?;
        Ok(match owner {
            Owner::Uid(uid) => Some(uid),
            Owner::NoSuchSocket => None,
        })
    }

    /// The inode of the TCP socket listening at `local` (exactly that port), if any.
    pub fn listener_inode(&self, local: SocketAddr) -> io::Result<Option<u32>> {
        let unspecified = match local {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        self.ask(local, unspecified, decode_listener)
    }

    /// One question about the socket at `local` connected to `remote`, and its answer
    /// read by `decode`.
    fn ask<T>(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        decode: impl Fn(&[u8], u32, &[u8; QUERY_LEN]) -> Result<T, DiagError>,
    ) -> io::Result<T> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let query = encode_query(local, remote, sequence);
        let netlink = self.netlink.lock().unwrap_or_else(PoisonError::into_inner);
        sendto(
            netlink.as_raw_fd(),
            &query,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut answer = [0u8; 512];
        loop {
            let n = recv(netlink.as_raw_fd(), &mut answer, MsgFlags::empty())?;
            match decode(&answer[..n], sequence, &query) {
                Ok(found) => return Ok(found),
                // A late answer to an earlier question that timed out: read on.
                Err(DiagError::OtherSequence { .. }) => continue,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

/// Both addresses in one family: an IPv4 peer of an IPv6 socket is its mapped form.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let mapped = |s: SocketAddr| match s {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    match (a, b) {
        (SocketAddr::V4(_), SocketAddr::V6(_)) => (mapped(a), b),
        (SocketAddr::V6(_), SocketAddr::V4(_)) => (a, mapped(b)),
        _ => (a, b),
    }
}
