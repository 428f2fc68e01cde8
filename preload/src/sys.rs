//! The libc calls the hooks need, wrapped so that the deciding code stays safe: real
//! symbols found with `dlsym(RTLD_NEXT)` and cached, socket options, addresses, errno.

use std::ffi::CStr;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{
    addrinfo, c_char, c_int, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
};

/// A libc function found once with `dlsym(RTLD_NEXT)`.
pub struct RealFn {
    name: &'static CStr,
    address: AtomicUsize,
}

impl RealFn {
    pub const fn new(name: &'static CStr) -> RealFn {
        RealFn {
            name,
            address: AtomicUsize::new(0),
        }
    }

    /// The address of the next definition after ours, or 0 if there is none.
    #[inline(always)]
    pub fn address(&self) -> usize {
        match self.address.load(Ordering::Relaxed) {
            0 => self.find(),
            cached => cached,
        }
    }

    #[cold]
    #[inline(never)]
    fn find(&self) -> usize {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no preconditions.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        self.address.store(found, Ordering::Relaxed);
        found
    }
}

pub static REAL_CONNECT: RealFn = RealFn::new(c"connect");
pub static REAL_GETPEERNAME: RealFn = RealFn::new(c"getpeername");
pub static REAL_GETSOCKOPT: RealFn = RealFn::new(c"getsockopt");
pub static REAL_GETADDRINFO: RealFn = RealFn::new(c"getaddrinfo");
pub static REAL_GETNAMEINFO: RealFn = RealFn::new(c"getnameinfo");
pub static REAL_GETHOSTBYNAME: RealFn = RealFn::new(c"gethostbyname");
pub static REAL_GETHOSTBYNAME2: RealFn = RealFn::new(c"gethostbyname2");
pub static REAL_GETHOSTBYNAME2_R: RealFn = RealFn::new(c"gethostbyname2_r");
pub static REAL_SENDTO: RealFn = RealFn::new(c"sendto");
pub static REAL_SENDMSG: RealFn = RealFn::new(c"sendmsg");
pub static REAL_SENDMMSG: RealFn = RealFn::new(c"sendmmsg");
pub static REAL_BIND: RealFn = RealFn::new(c"bind");
pub static REAL_GETSOCKNAME: RealFn = RealFn::new(c"getsockname");
pub static REAL_ACCEPT: RealFn = RealFn::new(c"accept");
pub static REAL_ACCEPT4: RealFn = RealFn::new(c"accept4");

pub fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's errno.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(value: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = value }
}

unsafe extern "C" {
    /// glibc's thread's `h_errno` (the libc crate does not declare it).
    fn __h_errno_location() -> *mut c_int;
}

/// Sets `h_errno`, where the gethostbyname family reports why it found nothing.
pub fn set_h_errno(value: c_int) {
    // SAFETY: __h_errno_location always returns this thread's h_errno.
    unsafe { *__h_errno_location() = value }
}

type GetaddrinfoFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const addrinfo,
    *mut *mut addrinfo,
) -> c_int;

/// Calls the real `getaddrinfo`; `EAI_SYSTEM` with errno ENOSYS when there is none.
///
/// # Safety
/// As for `getaddrinfo(3)`.
pub unsafe fn real_getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    match REAL_GETADDRINFO.address() {
        0 => {
            set_errno(libc::ENOSYS);
            libc::EAI_SYSTEM
        }
        f => {
            // SAFETY: the symbol is libc's getaddrinfo, whose type this is.
            let f = unsafe { std::mem::transmute::<usize, GetaddrinfoFn>(f) };
            // SAFETY: forwarded from the caller.
            unsafe { f(node, service, hints, res) }
        }
    }
}

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// Calls the real `connect` on a raw address.
///
/// # Safety
/// `addr` must point to `len` readable bytes, as for `connect(2)`.
///
/// Every call here is in tail position, so that a hook that ends with it needs no
/// stack frame of its own on the pass-through path.
#[inline(always)]
pub unsafe fn real_connect_raw(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    match REAL_CONNECT.address.load(Ordering::Relaxed) {
        // SAFETY: forwarded from the caller.
        0 => unsafe { real_connect_first(fd, addr, len) },
        f => {
            // SAFETY: the symbol is libc's connect, whose type this is.
            let f: ConnectFn = unsafe { std::mem::transmute::<usize, ConnectFn>(f) };
            // SAFETY: forwarded from the caller.
            unsafe { f(fd, addr, len) }
        }
    }
}

/// The first call: finds the real connect, then makes the call.
///
/// # Safety
/// As for `connect(2)`.
#[cold]
#[inline(never)]
unsafe fn real_connect_first(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    match REAL_CONNECT.address() {
        0 => no_such_function(),
        f => {
            // SAFETY: the symbol is libc's connect, whose type this is.
            let f: ConnectFn = unsafe { std::mem::transmute::<usize, ConnectFn>(f) };
            // SAFETY: forwarded from the caller.
            unsafe { f(fd, addr, len) }
        }
    }
}

#[cold]
#[inline(never)]
fn no_such_function() -> c_int {
    set_errno(libc::ENOSYS);
    -1
}

/// Calls the real `connect` with a Rust address; returns its result, errno set by it.
pub fn real_connect(fd: c_int, addr: SocketAddr) -> c_int {
    let (storage, len) = to_raw(addr);
    // SAFETY: storage holds len valid bytes of a sockaddr.
    unsafe { real_connect_raw(fd, (&raw const storage).cast(), len) }
}

/// The old `sockaddr_in6` without `sin6_scope_id` (RFC 2133), which Linux still
/// accepts from `connect`: an address of this length must be routed like any other.
const SOCKADDR_IN6_RFC2133: usize = 24;

/// Reads a `sockaddr_in6` of `len` bytes (24 or more); a missing scope id is 0.
///
/// # Safety
/// `addr` must point to `len` readable bytes, `len` ≥ 24.
unsafe fn read_sockaddr_in6(addr: *const sockaddr, len: socklen_t) -> sockaddr_in6 {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sin6: sockaddr_in6 = unsafe { zeroed() };
    let n = (len as usize).min(size_of::<sockaddr_in6>());
    // SAFETY: n bytes are readable at addr (the caller's len) and writable in sin6.
    unsafe {
        std::ptr::copy_nonoverlapping(addr.cast::<u8>(), (&raw mut sin6).cast::<u8>(), n);
    }
    sin6
}

/// An Internet address as numbers, read without building a `SocketAddr`: what
/// `connect` needs to decide.
pub enum Peek {
    V4(u32, u16),
    V6(u128, u16),
    /// An IPv6 address of the RFC 2133 length (24 bytes, no scope id).
    ShortV6,
    Other,
}

/// Reads the family, address and port of a program's socket address.
///
/// # Safety
/// `addr` must be null or point to `len` readable bytes.
#[inline(always)]
pub unsafe fn peek(addr: *const sockaddr, len: socklen_t) -> Peek {
    // One length check covers the family field and a whole sockaddr_in.
    if addr.is_null() || (len as usize) < size_of::<sockaddr_in>() {
        return Peek::Other;
    }
    // SAFETY: at least a sockaddr_in is readable (checked above).
    match c_int::from(unsafe { (*addr).sa_family }) {
        libc::AF_INET => {
            // SAFETY: as above; read_unaligned copes with any alignment.
            let sin = unsafe { addr.cast::<sockaddr_in>().read_unaligned() };
            Peek::V4(
                u32::from_be(sin.sin_addr.s_addr),
                u16::from_be(sin.sin_port),
            )
        }
        libc::AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
            // SAFETY: len covers a sockaddr_in6.
            let sin6 = unsafe { addr.cast::<sockaddr_in6>().read_unaligned() };
            Peek::V6(
                u128::from_be_bytes(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            )
        }
        libc::AF_INET6 if len as usize >= SOCKADDR_IN6_RFC2133 => Peek::ShortV6,
        _ => Peek::Other,
    }
}

/// Reads a socket address given by a program; `None` for anything but a well-formed
/// AF_INET or AF_INET6 address.
///
/// # Safety
/// `addr` must be null or point to `len` readable bytes.
pub unsafe fn from_raw(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above).
    let family = c_int::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET if len as usize >= size_of::<sockaddr_in>() => {
            // SAFETY: len covers a sockaddr_in; read_unaligned copes with any alignment.
            let sin = unsafe { addr.cast::<sockaddr_in>().read_unaligned() };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 if len as usize >= SOCKADDR_IN6_RFC2133 => {
            // SAFETY: len covers the sockaddr_in6 up to its address.
            let sin6 = unsafe { read_sockaddr_in6(addr, len) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A Rust address as a C one.
pub fn to_raw(addr: SocketAddr) -> (sockaddr_storage, socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: all-zero is a valid sockaddr_in.
            let mut sin: sockaddr_in = unsafe { zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut storage).cast::<sockaddr_in>().write(sin) };
            size_of::<sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut sin6: sockaddr_in6 = unsafe { zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<sockaddr_in6>().write(sin6) };
            size_of::<sockaddr_in6>()
        }
    };
    (storage, len as socklen_t)
}

/// Copies `addr` into a caller's buffer the way the kernel does: truncated to
/// `*len`, with `*len` set to the full size.
///
/// # Safety
/// `out` must point to `*len` writable bytes and `len` must be valid.
pub unsafe fn write_raw(addr: SocketAddr, out: *mut sockaddr, len: *mut socklen_t) {
    let (storage, full) = to_raw(addr);
    // SAFETY: the caller vouches for len.
    let room = unsafe { *len } as usize;
    let n = room.min(full as usize);
    // SAFETY: n bytes are readable from storage and writable at out.
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const storage).cast::<u8>(), out.cast::<u8>(), n);
        *len = full;
    }
}

/// The socket's type (SOCK_STREAM, …), or `None` if `fd` is not a socket.
pub fn socket_type(fd: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: value and len are valid for getsockopt's out-parameters.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

pub fn is_nonblocking(fd: c_int) -> bool {
    // SAFETY: F_GETFL takes no pointer.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// The socket's local address (the real getsockname: the hook may show another).
pub fn local_addr(fd: c_int) -> Option<SocketAddr> {
    type GetsocknameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    let f = REAL_GETSOCKNAME.address();
    if f == 0 {
        return None;
    }
    // SAFETY: libc's getsockname has this type.
    let f: GetsocknameFn = unsafe { std::mem::transmute::<usize, GetsocknameFn>(f) };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_storage>() as socklen_t;
    // SAFETY: storage/len are valid out-parameters.
    let rc = unsafe { f(fd, (&raw mut storage).cast(), &mut len) };
    // SAFETY: the kernel wrote len bytes of an address.
    (rc == 0)
        .then(|| unsafe { from_raw((&raw const storage).cast(), len) })
        .flatten()
}

/// The socket's peer as the kernel sees it (the real getpeername).
pub fn real_peer_addr(fd: c_int) -> Option<SocketAddr> {
    type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    let f = REAL_GETPEERNAME.address();
    if f == 0 {
        return None;
    }
    // SAFETY: libc's getpeername has this type.
    let f: GetpeernameFn = unsafe { std::mem::transmute::<usize, GetpeernameFn>(f) };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<sockaddr_storage>() as socklen_t;
    // SAFETY: storage/len are valid out-parameters.
    let rc = unsafe { f(fd, (&raw mut storage).cast(), &mut len) };
    // SAFETY: the kernel wrote len bytes of an address.
    (rc == 0)
        .then(|| unsafe { from_raw((&raw const storage).cast(), len) })
        .flatten()
}

/// Writes `bytes` on the Unix socket `unix` with `passed` attached (SCM_RIGHTS): the
/// agent receives its own reference to the program's socket.
pub fn send_with_fd(unix: c_int, bytes: &[u8], passed: c_int) -> std::io::Result<()> {
    // Room for one descriptor, aligned as CMSG_SPACE requires.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<c_int>() as u32) } as usize;
    if space > size_of::<[u64; 4]>() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points to `space` writable, aligned bytes, so the first
    // header and its data fit (CMSG_FIRSTHDR is non-null for a non-zero length).
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&raw const msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<c_int>() as u32) as usize;
        libc::CMSG_DATA(header)
            .cast::<c_int>()
            .write_unaligned(passed);
    }
    let mut sent = 0usize;
    while sent == 0 {
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(unix, &raw const msg, libc::MSG_NOSIGNAL) };
        match n {
            n if n >= 0 => sent = n as usize,
            _ if errno() == libc::EINTR => continue,
            _ => return Err(std::io::Error::from_raw_os_error(errno())),
        }
    }
    if sent < bytes.len() {
        // The rest goes without the descriptor, which travelled with the first byte.
        let mut rest = &bytes[sent..];
        while !rest.is_empty() {
            // SAFETY: rest is a valid buffer.
            let n =
                unsafe { libc::send(unix, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            match n {
                n if n > 0 => rest = &rest[n as usize..],
                _ if errno() == libc::EINTR => continue,
                _ => return Err(std::io::Error::from_raw_os_error(errno())),
            }
        }
    }
    Ok(())
}

/// The uid of the process at the other end of a Unix socket (SO_PEERCRED).
pub fn peer_uid(fd: c_int) -> Option<u32> {
    // SAFETY: all-zero is a valid ucred.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as socklen_t;
    // SAFETY: cred and len are valid out-parameters of this size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The socket's inode: which socket an fd number names, even after the number is reused.
pub fn inode(fd: c_int) -> Option<u64> {
    // SAFETY: all-zero is a valid stat.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: st is a valid out-parameter.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    (rc == 0).then_some(st.st_ino)
}

/// Binds `fd` to `addr` (the real bind: the hook may do otherwise); returns the errno
/// on failure.
pub fn bind(fd: c_int, addr: SocketAddr) -> Result<(), c_int> {
    type BindFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
    let f = REAL_BIND.address();
    if f == 0 {
        return Err(libc::ENOSYS);
    }
    // SAFETY: libc's bind has this type.
    let f: BindFn = unsafe { std::mem::transmute::<usize, BindFn>(f) };
    let (storage, len) = to_raw(addr);
    // SAFETY: storage holds len valid bytes.
    let rc = unsafe { f(fd, (&raw const storage).cast(), len) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}
