//! Who owns a local TCP socket: one `NETLINK_SOCK_DIAG` question and its answer, as
//! bytes (the agent does the I/O).
//!
//! The agent hands a connection on its loopback listener to a registration only if the
//! *connecting* socket belongs to the user that registered it; the kernel's socket
//! diagnostics say whose a socket is, given its exact four-tuple (what `ss -e` shows as
//! `uid:`). A forward port with `allow_users`/`allow_groups` asks the same question.
//!
//! ```text
//! request:  nlmsghdr (16) │ inet_diag_req_v2: family, IPPROTO_TCP, ext, pad, states,
//!                         │   sockid: sport, dport (BE), src[16], dst[16], if, cookie[2]
//! answer:   nlmsghdr (16) │ inet_diag_msg: family, state, timer, retrans, sockid (48),
//!                         │   expires, rqueue, wqueue, uid, inode
//!           or NLMSG_ERROR │ errno (negative), e.g. -ENOENT: no such socket
//! ```
//!
//! "src" is the socket's own address and "dst" its peer, seen from the socket asked about.

use std::net::{IpAddr, SocketAddr};

/// Length of the request built by [`encode_query`].
pub const QUERY_LEN: usize = 16 + 8 + SOCKID_LEN;

const SOCKID_LEN: usize = 48;
const NLMSG_HEADER_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
/// `inet_diag_msg.idiag_uid`, from the start of the message after its header.
const UID_OFFSET: usize = 4 + SOCKID_LEN + 12;
const ENOENT: i32 = 2;

/// What the kernel said about one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The socket exists and belongs to this user id.
    Uid(u32),
    /// No socket has that four-tuple (it closed, or never was local).
    NoSuchSocket,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiagError {
    #[error("socket diagnostics answer is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("socket diagnostics answer has unexpected type {0}")]
    UnexpectedType(u16),
    #[error("answer to another question (sequence {got}, asked {asked})")]
    OtherSequence { got: u32, asked: u32 },
    #[error("the kernel refused the socket diagnostics question (errno {0})")]
    Refused(i32),
}

fn put_ip(out: &mut [u8], ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out[..16].copy_from_slice(&v6.octets()),
    }
}

/// The question "who owns the TCP socket bound at `local` and connected to `remote`?".
/// Both addresses must be of one family (an IPv4-mapped IPv6 address counts as IPv6).
pub fn encode_query(local: SocketAddr, remote: SocketAddr, sequence: u32) -> [u8; QUERY_LEN] {
    let mut q = [0u8; QUERY_LEN];
    q[0..4].copy_from_slice(&(QUERY_LEN as u32).to_ne_bytes());
    q[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    q[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    q[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // q[12..16]: port id 0, the kernel.
    q[16] = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    q[17] = IPPROTO_TCP;
    // q[18] extensions: none; q[19] padding.
    q[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every TCP state
    let id = &mut q[24..];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    put_ip(&mut id[4..20], local.ip());
    put_ip(&mut id[20..36], remote.ip());
    // id[36..40]: any interface. The cookie: INET_DIAG_NOCOOKIE, "look it up by address".
    id[40..48].copy_from_slice(&[0xff; 8]);
    q
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

/// TCP states whose uid says nothing about a program: a listener (the kernel's exact
/// lookup falls back to one that covers the address, even for a peer on another host),
/// a time-wait or request mini-socket (uid 0), a closed socket.
const NOT_A_CONNECTING_SOCKET: [u8; 4] = [
    6,  // TIME_WAIT
    7,  // CLOSE
    10, // LISTEN
    12, // NEW_SYN_RECV
];

/// One socket the kernel described: the fields of `inet_diag_msg` asked about.
struct Described {
    state: u8,
    /// Source and destination port, in network order, as the query carries them.
    ports: [u8; 4],
    uid: u32,
    inode: u32,
}

/// Reads one answer numbered `sequence`: `None` for "no such socket" (ENOENT), the
/// socket's description otherwise.
fn read_answer(buf: &[u8], sequence: u32) -> Result<Option<Described>, DiagError> {
    let truncated = || DiagError::Truncated(buf.len());
    let length = u32_at(buf, 0).ok_or_else(truncated)? as usize;
    if length < NLMSG_HEADER_LEN || length > buf.len() {
        return Err(truncated());
    }
    let kind = u16_at(buf, 4).ok_or_else(truncated)?;
    let got = u32_at(buf, 8).ok_or_else(truncated)?;
    if got != sequence {
        return Err(DiagError::OtherSequence {
            got,
            asked: sequence,
        });
    }
    let body = &buf[NLMSG_HEADER_LEN..length];
    match kind {
        NLMSG_ERROR => {
            let errno = u32_at(body, 0).ok_or_else(truncated)? as i32;
            match errno.checked_neg() {
                Some(ENOENT) => Ok(None),
                Some(e) => Err(DiagError::Refused(e)),
                None => Err(DiagError::Refused(errno)),
            }
        }
        SOCK_DIAG_BY_FAMILY => {
            let ports = body.get(4..8).ok_or_else(truncated)?;
            Ok(Some(Described {
                state: *body.get(1).ok_or_else(truncated)?,
                ports: ports.try_into().map_err(|_| truncated())?,
                uid: u32_at(body, UID_OFFSET).ok_or_else(truncated)?,
                inode: u32_at(body, UID_OFFSET + 4).ok_or_else(truncated)?,
            }))
        }
        other => Err(DiagError::UnexpectedType(other)),
    }
}

/// Reads the kernel's answer to `query` (from [`encode_query`]), numbered `sequence`.
/// Only a socket with exactly the ports asked about, in a state a connecting socket
/// has, names an owner; anything else is [`Owner::NoSuchSocket`].
pub fn decode_answer(
    buf: &[u8],
    sequence: u32,
    query: &[u8; QUERY_LEN],
) -> Result<Owner, DiagError> {
    Ok(match read_answer(buf, sequence)? {
        Some(socket)
            if !NOT_A_CONNECTING_SOCKET.contains(&socket.state)
                && socket.ports == query[24..28] =>
        {
            Owner::Uid(socket.uid)
        }
        _ => Owner::NoSuchSocket,
    })
}

/// TCP state of a listening socket.
const LISTEN: u8 = 10;

/// Reads the kernel's answer to a question about a *listener*: `query` from
/// [`encode_query`] with the listener's address as `local` and an unspecified `remote`
/// (`0.0.0.0:0`), which the kernel's lookup answers with the listener on that port.
/// `Some(inode)` for a listening socket on exactly the asked port, else `None`.
pub fn decode_listener(
    buf: &[u8],
    sequence: u32,
    query: &[u8; QUERY_LEN],
) -> Result<Option<u32>, DiagError> {
    Ok(read_answer(buf, sequence)?
        .filter(|socket| socket.state == LISTEN && socket.ports[..2] == query[24..26])
        .map(|socket| socket.inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(kind: u16, sequence: u32, body: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(&0u16.to_ne_bytes());
        a.extend_from_slice(&sequence.to_ne_bytes());
        a.extend_from_slice(&0u32.to_ne_bytes());
        a.extend_from_slice(body);
        a
    }

    #[test]
    fn query_carries_the_four_tuple_in_network_order() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "127.0.0.2:7".parse().unwrap();
        let q = encode_query(local, remote, 9);
        assert_eq!(u32_at(&q, 0), Some(QUERY_LEN as u32));
        assert_eq!(q[16], AF_INET);
        assert_eq!(&q[24..26], &40000u16.to_be_bytes());
        assert_eq!(&q[26..28], &7u16.to_be_bytes());
        assert_eq!(&q[28..32], &[127, 0, 0, 1]);
        assert_eq!(&q[44..48], &[127, 0, 0, 2]);
        let v6 = encode_query("[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap(), 1);
        assert_eq!(v6[16], AF_INET6);
    }

    #[test]
    fn answers_decode_and_garbage_is_an_error() {
        let q = encode_query(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:7".parse().unwrap(),
            5,
        );
        let mut body = vec![0u8; 72];
        body[1] = 1; // ESTABLISHED
        body[4..8].copy_from_slice(&q[24..28]);
        body[UID_OFFSET..UID_OFFSET + 4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(
            decode_answer(&answer(SOCK_DIAG_BY_FAMILY, 5, &body), 5, &q),
            Ok(Owner::Uid(1000))
        );
        let enoent = (-2i32).to_ne_bytes();
        assert_eq!(
            decode_answer(&answer(NLMSG_ERROR, 5, &enoent), 5, &q),
            Ok(Owner::NoSuchSocket)
        );
        assert!(decode_answer(&answer(NLMSG_ERROR, 5, &(-1i32).to_ne_bytes()), 5, &q).is_err());
        assert!(decode_answer(&answer(SOCK_DIAG_BY_FAMILY, 4, &body), 5, &q).is_err());
        assert!(decode_answer(&answer(SOCK_DIAG_BY_FAMILY, 5, &body[..10]), 5, &q).is_err());
        assert!(decode_answer(&[1, 2, 3], 5, &q).is_err());
        let mut lying = answer(SOCK_DIAG_BY_FAMILY, 5, &body);
        lying[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(decode_answer(&lying, 5, &q).is_err());
        // The kernel's fallback to a listener that covers the address (a peer on
        // another host that picked the listener's port as its own) names nobody.
        let mut listener = body.clone();
        listener[1] = 10;
        listener[6..8].copy_from_slice(&[0, 0]);
        assert_eq!(
            decode_answer(&answer(SOCK_DIAG_BY_FAMILY, 5, &listener), 5, &q),
            Ok(Owner::NoSuchSocket)
        );
        let mut with_inode = listener.clone();
        with_inode[UID_OFFSET + 4..UID_OFFSET + 8].copy_from_slice(&77u32.to_ne_bytes());
        assert_eq!(
            decode_listener(&answer(SOCK_DIAG_BY_FAMILY, 5, &with_inode), 5, &q),
            Ok(Some(77))
        );
        assert_eq!(
            decode_listener(&answer(SOCK_DIAG_BY_FAMILY, 5, &body), 5, &q),
            Ok(None)
        );
        assert_eq!(
            decode_listener(&answer(NLMSG_ERROR, 5, &enoent), 5, &q),
            Ok(None)
        );
        assert!(decode_listener(&answer(SOCK_DIAG_BY_FAMILY, 5, &body[..10]), 5, &q).is_err());
        let mut time_wait = body.clone();
        time_wait[1] = 6;
        assert_eq!(
            decode_answer(&answer(SOCK_DIAG_BY_FAMILY, 5, &time_wait), 5, &q),
            Ok(Owner::NoSuchSocket)
        );
    }
}
