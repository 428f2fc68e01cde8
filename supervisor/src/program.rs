//! The supervised program's memory and sockets, seen from the supervisor: reading an
//! argument once, writing a result as the kernel would, and which of its sockets we
//! redirected (by inode, as a descriptor number is reused after close).

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;
use parking_lot::Mutex;

/// Reads `len` bytes at `address` in the thread `tid`'s process.
pub fn read(tid: i32, address: u64, len: usize) -> nix::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    if len == 0 {
        return Ok(bytes);
    }
    let got = process_vm_readv(
        Pid::from_raw(tid),
        &mut [IoSliceMut::new(&mut bytes)],
        &[RemoteIoVec {
            base: address as usize,
            len,
        }],
    )?;
    if got != len {
        return Err(nix::errno::Errno::EFAULT);
    }
    Ok(bytes)
}

/// Writes `bytes` at `address` in the thread `tid`'s process.
pub fn write(tid: i32, address: u64, bytes: &[u8]) -> nix::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let put = process_vm_writev(
        Pid::from_raw(tid),
        &[IoSlice::new(bytes)],
        &[RemoteIoVec {
            base: address as usize,
            len: bytes.len(),
        }],
    )?;
    if put != bytes.len() {
        return Err(nix::errno::Errno::EFAULT);
    }
    Ok(())
}

/// `address` as a `struct sockaddr` of the socket's family: an IPv4 address shown on
/// an IPv6 socket in its mapped form.
pub fn encode_sockaddr(address: SocketAddr, ipv6_socket: bool) -> Vec<u8> {
    let address = match address {
        SocketAddr::V4(v4) if ipv6_socket => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    };
    match address {
        SocketAddr::V4(v4) => {
            let mut b = vec![0u8; 16];
            b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&v4.port().to_be_bytes());
            b[4..8].copy_from_slice(&v4.ip().octets());
            b
        }
        SocketAddr::V6(v6) => {
            let mut b = vec![0u8; 28];
            b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&v6.port().to_be_bytes());
            b[4..8].copy_from_slice(&v6.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&v6.ip().octets());
            b[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
            b
        }
    }
}

/// Gives the program an address as `getpeername` and `recvfrom` do: at most as many
/// bytes as its `*length` says, then the whole length in `*length`.
pub fn write_sockaddr(tid: i32, address: u64, length: u64, sockaddr: &[u8]) -> nix::Result<()> {
    let room = read(tid, length, 4)?;
    let room = u32::from_ne_bytes([room[0], room[1], room[2], room[3]]) as usize;
    write(tid, address, &sockaddr[..room.min(sockaddr.len())])?;
    write(tid, length, &(sockaddr.len() as u32).to_ne_bytes())
}

/// Binds `socket` to `address`.
pub fn bind(socket: &OwnedFd, address: SocketAddr) -> nix::Result<()> {
    let fd = socket.as_raw_fd();
    match address {
        SocketAddr::V4(v4) => nix::sys::socket::bind(fd, &nix::sys::socket::SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => nix::sys::socket::bind(fd, &nix::sys::socket::SockaddrIn6::from(v6)),
    }
}

/// True for an IPv4 or IPv6 socket.
pub fn is_internet(socket: &OwnedFd) -> bool {
    local_addr(socket).is_some()
}

pub fn socket_type(socket: &OwnedFd) -> Option<nix::sys::socket::SockType> {
    nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::SockType).ok()
}

pub fn is_datagram(socket: &OwnedFd) -> bool {
    socket_type(socket) == Some(nix::sys::socket::SockType::Datagram)
}

pub fn is_stream(socket: &OwnedFd) -> bool {
    socket_type(socket) == Some(nix::sys::socket::SockType::Stream)
}

/// The socket's O_NONBLOCK (shared by every descriptor of it, ours too).
pub fn is_nonblocking(socket: &OwnedFd) -> bool {
    nix::fcntl::fcntl(socket, nix::fcntl::FcntlArg::F_GETFL)
        .is_ok_and(|flags| flags & libc::O_NONBLOCK != 0)
}

pub fn inode(socket: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(socket).ok().map(|s| s.st_ino)
}

pub fn is_ipv6(socket: &OwnedFd) -> bool {
    nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(socket.as_raw_fd())
        .is_ok_and(|s| s.as_sockaddr_in6().is_some())
}

pub fn local_addr(socket: &OwnedFd) -> Option<SocketAddr> {
    let storage: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getsockname(socket.as_raw_fd()).ok()?;
    to_std(&storage)
}

pub fn peer_addr(socket: &OwnedFd) -> Option<SocketAddr> {
    let storage: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getpeername(socket.as_raw_fd()).ok()?;
    to_std(&storage)
}

pub fn to_std(storage: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// The same address, IPv4-mapped IPv6 read as IPv4.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// A socket we connected somewhere else than the program asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// What the program asked for, and sees as the peer.
    pub shown: SocketAddr,
    /// Where the socket really goes (the agent's listener, the resolver stub).
    pub real: SocketAddr,
    /// A resolver's socket: answers from `real` are shown as from `shown`.
    pub resolver: bool,
}

/// Redirected sockets by inode. Bounded: the oldest are forgotten first (their
/// `getpeername` then shows the real peer).
#[derive(Debug, Default)]
pub struct Redirects {
    table: Mutex<(HashMap<u64, Redirect>, VecDeque<u64>)>,
}

const REMEMBERED: usize = 65_536;

impl Redirects {
    pub fn insert(&self, inode: u64, redirect: Redirect) {
        let mut guard = self.table.lock();
        let (map, order) = &mut *guard;
        if map.insert(inode, redirect).is_none() {
            order.push_back(inode);
        }
        while order.len() > REMEMBERED {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// The redirect of `socket`, while it still goes where we sent it (an inode of a
    /// closed socket can be reused by a new one).
    pub fn of(&self, socket: &OwnedFd) -> Option<Redirect> {
        let inode = inode(socket)?;
        let redirect = self.table.lock().0.get(&inode).copied()?;
        let peer = peer_addr(socket).map(canonical);
        let still = redirect.resolver || peer == Some(canonical(redirect.real));
        still.then_some(redirect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_are_written_in_the_sockets_family() {
        let v4: SocketAddr = "10.0.0.53:53".parse().unwrap();
        let b = encode_sockaddr(v4, false);
        assert_eq!(b.len(), 16);
        assert_eq!(&b[2..8], &[0, 53, 10, 0, 0, 53]);
        let mapped = encode_sockaddr(v4, true);
        assert_eq!(mapped.len(), 28);
        assert_eq!(&mapped[8..24], &v4_mapped([10, 0, 0, 53]));
    }

    fn v4_mapped(ip: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets()
    }
}
