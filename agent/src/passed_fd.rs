//! A socket a preloaded program passes with its registration (SCM_RIGHTS): proof that
//! the caller holds the socket bound at the source address it names.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use nix::sys::socket::{SockaddrStorage, getpeername, getsockname};

/// A socket a preloaded program handed over; closed when dropped.
#[derive(Debug)]
pub struct PassedFd(RawFd);

impl PassedFd {
    pub fn new(fd: RawFd) -> PassedFd {
        PassedFd(fd)
    }

    /// The socket's own address, as the kernel says.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        ip_address(getsockname(self.0)?)
    }

    /// The address of the socket's peer, as the kernel says.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        ip_address(getpeername(self.0)?)
    }

    /// The socket's inode: what the kernel's socket diagnostics name it by (read from
    /// `/proc/self/fd`, whose link says `socket:[INODE]`).
    pub fn inode(&self) -> io::Result<u32> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", self.0))?;
        link.to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a socket"))
    }
}

fn ip_address(storage: SockaddrStorage) -> io::Result<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Ok(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = storage.as_sockaddr_in6() {
        return Ok(SocketAddr::V6((*v6).into()));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "the passed descriptor is not an IP socket",
    ))
}

impl Drop for PassedFd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}
