//! A socket a preloaded program passes with its registration (SCM_RIGHTS): proof that
//! the caller holds the socket bound at the source address it names.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use nix::sys::socket::{SockaddrStorage, getsockname};

/// A socket a preloaded program handed over; closed when dropped.
#[derive(Debug)]
pub struct PassedFd(RawFd);

impl PassedFd {
    pub fn new(fd: RawFd) -> PassedFd {
        PassedFd(fd)
    }

    /// The socket's own address, as the kernel says.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let storage: SockaddrStorage = getsockname(self.0)?;
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
}

impl Drop for PassedFd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}
