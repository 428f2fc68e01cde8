//! The C structures the resolver hooks hand back for a routed name: `addrinfo` lists,
//! `hostent` entries and host-name strings. Whatever the program may free is made by
//! libc (the real `getaddrinfo`, `strdup`), so `freeaddrinfo` takes it as any other.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::mem::{MaybeUninit, align_of, size_of};
use std::net::IpAddr;
use std::ptr::{NonNull, null_mut};

use libc::{addrinfo, c_char, c_int, hostent};

use crate::names::Synthetic;
use crate::sys;

// <netdb.h>'s h_errno values, which the libc crate does not define.
pub const NETDB_INTERNAL: c_int = -1;
pub const HOST_NOT_FOUND: c_int = 1;
pub const TRY_AGAIN: c_int = 2;
pub const NO_RECOVERY: c_int = 3;

/// The caller's buffer cannot hold the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooSmall;

/// A list made by the real `getaddrinfo`, freed with `freeaddrinfo` unless it is handed
/// to the program.
pub struct AddrInfoList {
    head: NonNull<addrinfo>,
}

impl AddrInfoList {
    /// What the real `getaddrinfo` answers; `Err` holds its `EAI_*` code.
    pub fn real(
        node: &CStr,
        service: Option<&CStr>,
        hints: &addrinfo,
    ) -> Result<AddrInfoList, c_int> {
        let mut head: *mut addrinfo = null_mut();
        let service = service.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: node and service are NUL-terminated strings (or null), hints is an
        // addrinfo and head a valid out-pointer, as getaddrinfo(3) requires.
        let rc = unsafe { sys::real_getaddrinfo(node.as_ptr(), service, hints, &mut head) };
        match (rc, NonNull::new(head)) {
            (0, Some(head)) => Ok(AddrInfoList { head }),
            (0, None) => Err(libc::EAI_NONAME),
            (code, _) => Err(code),
        }
    }

    /// The nodes, in order.
    #[cfg(test)]
    fn nodes(&self) -> impl Iterator<Item = &addrinfo> {
        // SAFETY: every node of a list getaddrinfo made is a valid addrinfo, owned by
        // this list for as long as it is borrowed.
        let head = unsafe { self.head.as_ref() };
        std::iter::successors(Some(head), |node| {
            // SAFETY: as above, for the next node (null after the last).
            unsafe { node.ai_next.as_ref() }
        })
    }

    /// Puts `other`'s nodes after this list's.
    fn append(&mut self, other: AddrInfoList) {
        let mut last = self.head;
        // SAFETY: walking the nodes of a list this value owns.
        while let Some(next) = NonNull::new(unsafe { last.as_ref() }.ai_next) {
            last = next;
        }
        // SAFETY: `last` is this list's last node, which this value owns; `other`'s
        // nodes join it and are freed with it.
        unsafe { last.as_mut().ai_next = other.into_raw() };
    }

    /// Makes `name` the list's canonical name (`AI_CANONNAME`).
    fn set_canonical_name(&mut self, name: &CStr) {
        // SAFETY: the head is a node getaddrinfo made; its canonname is null or came
        // from malloc, and freeaddrinfo frees what strdup returns in its place.
        unsafe {
            let head = self.head.as_mut();
            libc::free(head.ai_canonname.cast());
            head.ai_canonname = libc::strdup(name.as_ptr());
        }
    }

    /// The list for the program, which frees it with `freeaddrinfo`.
    pub fn into_raw(self) -> *mut addrinfo {
        let head = self.head.as_ptr();
        std::mem::forget(self);
        head
    }
}

impl Drop for AddrInfoList {
    fn drop(&mut self) {
        // SAFETY: a list getaddrinfo made, owned by this value alone.
        unsafe { libc::freeaddrinfo(self.head.as_ptr()) };
    }
}

/// The list `getaddrinfo` answers for a routed name: the synthetic addresses the hints
/// ask for (IPv4 for `AF_INET`, IPv6 for `AF_INET6`, else both, IPv4 first), each in
/// the list the real `getaddrinfo` makes for its numeric form, so that services,
/// socket types and memory layout are exactly what `freeaddrinfo` expects. With
/// `AI_CANONNAME` the canonical name is `name` itself. `Err` holds an `EAI_*` code.
pub fn synthetic_list(
    name: &CStr,
    service: Option<&CStr>,
    hints: Option<&addrinfo>,
    addresses: Synthetic,
) -> Result<AddrInfoList, c_int> {
    let mut numeric = match hints {
        Some(hints) => *hints,
        // SAFETY: all-zero is a valid addrinfo (AF_UNSPEC, no flags, null pointers).
        None => unsafe { std::mem::zeroed() },
    };
    let family = numeric.ai_family;
    let want_canonical = numeric.ai_flags & libc::AI_CANONNAME != 0;
    // A synthetic address is usable whatever addresses this host has configured.
    numeric.ai_flags = (numeric.ai_flags | libc::AI_NUMERICHOST) & !libc::AI_ADDRCONFIG;
    let wanted: &[IpAddr] = match family {
        libc::AF_INET => &[IpAddr::V4(addresses.v4)],
        libc::AF_INET6 => &[IpAddr::V6(addresses.v6)],
        _ => &[IpAddr::V4(addresses.v4), IpAddr::V6(addresses.v6)],
    };
    let mut list: Option<AddrInfoList> = None;
    for ip in wanted {
        numeric.ai_family = if ip.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let Ok(text) = CString::new(ip.to_string()) else {
            continue;
        };
        let part = AddrInfoList::real(&text, service, &numeric)?;
        match &mut list {
            Some(list) => list.append(part),
            None => list = Some(part),
        }
    }
    let mut list = list.ok_or(libc::EAI_NONAME)?;
    if want_canonical {
        list.set_canonical_name(name);
    }
    Ok(list)
}

/// Copies `bytes` to the start of `out`.
fn put(out: &mut [MaybeUninit<u8>], bytes: &[u8]) {
    for (slot, byte) in out.iter_mut().zip(bytes) {
        slot.write(*byte);
    }
}

/// Writes `text` and its NUL into `out` (getnameinfo's host buffer).
pub fn write_c_string(text: &str, out: &mut [MaybeUninit<u8>]) -> Result<(), TooSmall> {
    let bytes = text.as_bytes();
    if bytes.len() >= out.len() {
        return Err(TooSmall);
    }
    put(out, bytes);
    out[bytes.len()].write(0);
    Ok(())
}

/// Fills `entry` for `address` and `name`, its data laid out in `buffer` as glibc lays
/// it: the aliases (none), the address list (one), the address, the name.
pub fn fill_hostent(
    entry: &mut hostent,
    buffer: &mut [MaybeUninit<u8>],
    address: IpAddr,
    name: &CStr,
) -> Result<(), TooSmall> {
    let pointer = size_of::<*mut c_char>();
    let start = buffer.as_ptr().align_offset(align_of::<*mut c_char>());
    let mut octets = [0u8; 16];
    let length = match address {
        IpAddr::V4(v4) => {
            octets[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            octets = v6.octets();
            16
        }
    };
    let octets = &octets[..length];
    let name = name.to_bytes_with_nul();
    let aliases_at = start;
    let list_at = aliases_at + pointer;
    let address_at = list_at + 2 * pointer;
    let name_at = address_at + length;
    if start == usize::MAX || name_at + name.len() > buffer.len() {
        return Err(TooSmall);
    }
    put(&mut buffer[address_at..], octets);
    put(&mut buffer[name_at..], name);
    let base = buffer.as_mut_ptr().cast::<u8>();
    let address_ptr = base.wrapping_add(address_at).cast::<c_char>();
    let aliases = base.wrapping_add(aliases_at).cast::<*mut c_char>();
    let list = base.wrapping_add(list_at).cast::<*mut c_char>();
    // SAFETY: the three pointer slots lie inside `buffer` (checked above, before the
    // address) and are aligned for a pointer (`start` is, and each step is one pointer).
    unsafe {
        aliases.write(null_mut());
        list.write(address_ptr);
        list.add(1).write(null_mut());
    }
    entry.h_name = base.wrapping_add(name_at).cast();
    entry.h_aliases = aliases;
    entry.h_addrtype = if address.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    entry.h_length = length as c_int;
    entry.h_addr_list = list;
    Ok(())
}

/// Per-thread storage for the non-reentrant forms (glibc keeps one per process).
struct HostStorage {
    entry: hostent,
    buffer: [MaybeUninit<u8>; 1024],
}

thread_local! {
    static HOST_STORAGE: RefCell<Option<Box<HostStorage>>> = const { RefCell::new(None) };
}

/// Fills this thread's entry for `gethostbyname` and `gethostbyname2`; valid until the
/// thread's next call. `None` when the thread is being torn down.
pub fn thread_hostent(address: IpAddr, name: &CStr) -> Option<Result<*mut hostent, TooSmall>> {
    HOST_STORAGE
        .try_with(|cell| {
            let mut slot = cell.borrow_mut();
            let storage = slot.get_or_insert_with(|| {
                Box::new(HostStorage {
                    // SAFETY: all-zero is a valid hostent (null pointers).
                    entry: unsafe { std::mem::zeroed() },
                    buffer: [MaybeUninit::uninit(); 1024],
                })
            });
            let HostStorage { entry, buffer } = &mut **storage;
            fill_hostent(entry, buffer, address, name)?;
            Ok(std::ptr::from_mut(entry))
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    fn zeroed_hostent() -> hostent {
        // SAFETY: all-zero is a valid hostent (null pointers).
        unsafe { std::mem::zeroed() }
    }

    /// What a C program reads from the entry.
    fn read_back(entry: &hostent) -> (String, c_int, Vec<u8>) {
        // SAFETY: the entry was filled by fill_hostent, whose buffer is still alive:
        // a NUL-terminated name, a null-terminated alias list (empty) and an address
        // list of one address of h_length bytes.
        unsafe {
            assert!((*entry.h_aliases).is_null());
            assert!((*entry.h_addr_list.add(1)).is_null());
            let address = std::slice::from_raw_parts(
                (*entry.h_addr_list).cast::<u8>(),
                entry.h_length as usize,
            );
            (
                CStr::from_ptr(entry.h_name).to_string_lossy().into_owned(),
                entry.h_addrtype,
                address.to_vec(),
            )
        }
    }

    #[test]
    fn hostent_holds_the_name_and_one_address() {
        let name = c"db.site-b.internal";
        for (address, family) in [
            (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7)), libc::AF_INET),
            (
                IpAddr::V6("fd7e:7e7e:7e7e::7".parse().unwrap()),
                libc::AF_INET6,
            ),
        ] {
            // Every start alignment: the pointer slots are aligned all the same.
            for offset in 0..8 {
                let mut buffer = [MaybeUninit::new(0xa5u8); 128];
                let mut entry = zeroed_hostent();
                fill_hostent(&mut entry, &mut buffer[offset..], address, name).unwrap();
                let expected = match address {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                assert_eq!(
                    read_back(&entry),
                    ("db.site-b.internal".to_string(), family, expected)
                );
                assert_eq!(entry.h_aliases.align_offset(align_of::<*mut c_char>()), 0);
            }
        }
    }

    #[test]
    fn hostent_needs_room_for_all_of_it() {
        let name = c"db";
        let address = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let mut buffer = [MaybeUninit::new(0xa5u8); 64];
        // An aligned start, so that the size needed is exact.
        let start = buffer.as_ptr().align_offset(align_of::<*mut c_char>());
        let needed = 3 * size_of::<*mut c_char>() + 16 + 3;
        let buffer = &mut buffer[start..];
        for len in 0..needed {
            let mut entry = zeroed_hostent();
            assert_eq!(
                fill_hostent(&mut entry, &mut buffer[..len], address, name),
                Err(TooSmall),
                "{len} bytes"
            );
            assert!(entry.h_name.is_null(), "nothing written with {len} bytes");
        }
        let mut entry = zeroed_hostent();
        assert_eq!(
            fill_hostent(&mut entry, &mut buffer[..needed], address, name),
            Ok(())
        );
        assert_eq!(read_back(&entry).0, "db");
    }

    #[test]
    fn host_names_fit_with_their_nul() {
        let mut buffer = [MaybeUninit::new(0xa5u8); 8];
        assert_eq!(write_c_string("1234567", &mut buffer), Ok(()));
        // SAFETY: write_c_string initialised the eight bytes.
        let written: Vec<u8> = buffer.iter().map(|b| unsafe { b.assume_init() }).collect();
        assert_eq!(written, b"1234567\0");
        assert_eq!(write_c_string("12345678", &mut buffer), Err(TooSmall));
        assert_eq!(write_c_string("", &mut []), Err(TooSmall));
    }

    #[test]
    fn the_thread_entry_is_filled_again_for_each_answer() {
        let first = thread_hostent(Ipv4Addr::new(198, 18, 0, 1).into(), c"a").unwrap();
        let second = thread_hostent(Ipv4Addr::new(198, 18, 0, 2).into(), c"b").unwrap();
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first, second);
        // SAFETY: the thread's entry, filled by the last call.
        let entry = unsafe { &*second };
        assert_eq!(
            read_back(entry),
            ("b".into(), libc::AF_INET, vec![198, 18, 0, 2])
        );
        let long = CString::new("x".repeat(1024)).unwrap();
        assert_eq!(
            thread_hostent(Ipv4Addr::LOCALHOST.into(), &long),
            Some(Err(TooSmall))
        );
    }

    const SYNTHETIC: Synthetic = Synthetic {
        v4: Ipv4Addr::new(198, 18, 0, 5),
        v6: Ipv6Addr::new(0xfd7e, 0x7e7e, 0x7e7e, 0, 0, 0, 0, 5),
    };

    fn hints(family: c_int, flags: c_int) -> addrinfo {
        // SAFETY: all-zero is a valid addrinfo.
        let mut hints: addrinfo = unsafe { std::mem::zeroed() };
        hints.ai_family = family;
        hints.ai_flags = flags;
        hints.ai_socktype = libc::SOCK_STREAM;
        hints
    }

    /// The addresses of a list, in order.
    fn addresses(list: &AddrInfoList) -> Vec<SocketAddr> {
        list.nodes()
            // SAFETY: getaddrinfo's ai_addr holds ai_addrlen bytes of an address.
            .filter_map(|node| unsafe { sys::from_raw(node.ai_addr, node.ai_addrlen) })
            .collect()
    }

    #[test]
    fn both_addresses_ipv4_first_unless_a_family_is_asked_for() {
        let port = Some(c"5432");
        let name = c"db.site-b.internal";
        let v4 = SocketAddr::new(SYNTHETIC.v4.into(), 5432);
        let v6 = SocketAddr::new(SYNTHETIC.v6.into(), 5432);
        let any = synthetic_list(name, port, Some(&hints(libc::AF_UNSPEC, 0)), SYNTHETIC).unwrap();
        assert_eq!(addresses(&any), [v4, v6]);
        let only_v4 =
            synthetic_list(name, port, Some(&hints(libc::AF_INET, 0)), SYNTHETIC).unwrap();
        assert_eq!(addresses(&only_v4), [v4]);
        let only_v6 =
            synthetic_list(name, port, Some(&hints(libc::AF_INET6, 0)), SYNTHETIC).unwrap();
        assert_eq!(addresses(&only_v6), [v6]);
        // No hints: every socket type, as the real getaddrinfo answers.
        let all = synthetic_list(name, None, None, SYNTHETIC).unwrap();
        assert!(all.nodes().count() > 2);
        assert!(all.nodes().all(|node| node.ai_canonname.is_null()));
    }

    #[test]
    fn the_canonical_name_is_the_routed_name() {
        let hints = hints(libc::AF_UNSPEC, libc::AI_CANONNAME | libc::AI_ADDRCONFIG);
        let list = synthetic_list(c"db.site-b.internal", None, Some(&hints), SYNTHETIC).unwrap();
        let head = list.nodes().next().unwrap();
        // SAFETY: set by set_canonical_name, a NUL-terminated string from strdup.
        let canonical = unsafe { CStr::from_ptr(head.ai_canonname) };
        assert_eq!(canonical, c"db.site-b.internal");
        // The program frees the list as any other.
        // SAFETY: a list for the program, freed once.
        unsafe { libc::freeaddrinfo(list.into_raw()) };
    }

    #[test]
    fn a_bad_service_fails_as_the_real_function_says() {
        let result = synthetic_list(
            c"db",
            Some(c"no-such-service-anywhere"),
            Some(&hints(libc::AF_UNSPEC, 0)),
            SYNTHETIC,
        );
        assert_eq!(result.err(), Some(libc::EAI_SERVICE));
    }
}
