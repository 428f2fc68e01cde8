//! The resolver: `getaddrinfo` and the `gethostbyname` family answer a routed name
//! with its synthetic addresses (built into C structures by [`netdb`]); `getnameinfo`
//! names a synthetic address.

use std::convert::Infallible;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::ptr::null_mut;

use libc::{addrinfo, c_char, c_int, hostent, size_t, sockaddr, socklen_t};

use crate::detour::{Bypass, Detour};
use crate::guard::Guard;
use crate::names::{self, LookupFailure};
use crate::netdb;
use crate::sys;

/// A C string argument as Rust sees it.
///
/// # Safety
/// `text` is null or a NUL-terminated string that outlives `'a`.
unsafe fn c_str<'a>(text: *const c_char) -> Option<&'a CStr> {
    // SAFETY: as the caller vouches.
    (!text.is_null()).then(|| unsafe { CStr::from_ptr(text) })
}

/// A caller's buffer as Rust sees it: bytes that may not be initialised.
///
/// # Safety
/// `buffer` is null or points to `len` writable bytes that outlive `'a` and that
/// nothing else uses meanwhile.
unsafe fn out_buffer<'a>(buffer: *mut c_char, len: usize) -> Option<&'a mut [MaybeUninit<u8>]> {
    // SAFETY: as the caller vouches; MaybeUninit needs no initialised bytes.
    (!buffer.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(buffer.cast(), len) })
}

/// # Safety
/// As for `getaddrinfo(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    // Held through the real call too: the lookups it makes are its own.
    let guard = Guard::enter();
    // SAFETY: hints is null or points to an addrinfo, as getaddrinfo(3) requires.
    let hints_given = unsafe { hints.as_ref() };
    // SAFETY: node is null or a NUL-terminated string, as getaddrinfo(3) requires.
    let name = unsafe { c_str(node) };
    let detour = match (&guard, name) {
        (None, _) => Detour::Bypass(Bypass::Reentrant),
        // A service alone: nothing to look up.
        (_, None) => Detour::Bypass(Bypass::NoName),
        (Some(_), Some(_)) if res.is_null() => Detour::Bypass(Bypass::Unusable),
        (Some(_), Some(name)) => names::addresses_of(name, hints_given.map_or(0, |h| h.ai_flags)),
    };
    let addresses = match detour {
        Detour::Handled(addresses) => addresses,
        Detour::Failed(failure) => return failure.eai_code(),
        // SAFETY: the program's arguments, as it gave them.
        Detour::Bypass(_) => return unsafe { sys::real_getaddrinfo(node, service, hints, res) },
    };
    // SAFETY: service is null or a NUL-terminated string, as getaddrinfo(3) requires.
    let service = unsafe { c_str(service) };
    let list = name.map(|name| netdb::synthetic_list(name, service, hints_given, addresses));
    match list {
        Some(Ok(list)) => {
            // SAFETY: res is a valid out-pointer (checked non-null).
            unsafe { *res = list.into_raw() };
            0
        }
        Some(Err(code)) => code,
        None => libc::EAI_NONAME,
    }
}

type GetnameinfoFn = unsafe extern "C" fn(
    *const sockaddr,
    socklen_t,
    *mut c_char,
    socklen_t,
    *mut c_char,
    socklen_t,
    c_int,
) -> c_int;

/// # Safety
/// As for `getnameinfo(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getnameinfo(
    sa: *const sockaddr,
    salen: socklen_t,
    host: *mut c_char,
    hostlen: socklen_t,
    serv: *mut c_char,
    servlen: socklen_t,
    flags: c_int,
) -> c_int {
    let real = |host, hostlen| {
        call_real!(
            sys::REAL_GETNAMEINFO,
            GetnameinfoFn,
            libc::EAI_SYSTEM,
            sa,
            salen,
            host,
            hostlen,
            serv,
            servlen,
            flags
        )
    };
    // Held through the real calls too, as for getaddrinfo.
    let guard = Guard::enter();
    let detour: Detour<String, Infallible> = match guard {
        None => Detour::Bypass(Bypass::Reentrant),
        Some(_) if host.is_null() || hostlen == 0 => Detour::Bypass(Bypass::Unusable),
        // SAFETY: sa/salen as getnameinfo(3) requires.
        Some(_) => names::name_of(unsafe { sys::from_raw(sa, salen) }, flags),
    };
    let name = match detour {
        Detour::Handled(name) => name,
        Detour::Bypass(_) => return real(host, hostlen),
        Detour::Failed(never) => match never {},
    };
    // SAFETY: host (not null) has hostlen writable bytes, as getnameinfo(3) requires.
    let host_buffer = unsafe { out_buffer(host, hostlen as usize) };
    if host_buffer.is_none_or(|buffer| netdb::write_c_string(&name, buffer).is_err()) {
        return libc::EAI_OVERFLOW;
    }
    if serv.is_null() || servlen == 0 {
        0
    } else {
        real(null_mut(), 0)
    }
}

type GethostbynameFn = unsafe extern "C" fn(*const c_char) -> *mut hostent;
type Gethostbyname2Fn = unsafe extern "C" fn(*const c_char, c_int) -> *mut hostent;
type Gethostbyname2RFn = unsafe extern "C" fn(
    *const c_char,
    c_int,
    *mut hostent,
    *mut c_char,
    size_t,
    *mut *mut hostent,
    *mut c_int,
) -> c_int;

/// What the gethostbyname family decides about `name`, with the re-entrancy guard
/// held only while deciding (the real function runs without it).
fn host_lookup(name: Option<&CStr>, family: c_int) -> Detour<IpAddr, LookupFailure> {
    match (Guard::enter(), name) {
        (None, _) => Detour::Bypass(Bypass::Reentrant),
        (_, None) => Detour::Bypass(Bypass::NoName),
        (Some(_guard), Some(name)) => names::host_address(name, family),
    }
}

/// # Safety
/// As for `gethostbyname_r(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // The IPv4 case of gethostbyname2_r, in glibc as here.
    // SAFETY: forwarded as given.
    unsafe { gethostbyname2_r(name, libc::AF_INET, ret, buf, buflen, result, h_errnop) }
}

/// # Safety
/// As for `gethostbyname2_r(3)`.
///
/// The return values are glibc's: 0 for a name that does not exist, EAGAIN for a
/// temporary failure, ERANGE (`h_errno` NETDB_INTERNAL) for a buffer too small.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2_r(
    name: *const c_char,
    family: c_int,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    // SAFETY: name is null or a NUL-terminated string, as gethostbyname2_r(3) requires.
    let text = unsafe { c_str(name) };
    let detour = if ret.is_null() || buf.is_null() {
        Detour::Bypass(Bypass::Unusable)
    } else {
        host_lookup(text, family)
    };
    let report = |rc: c_int, h_errno: c_int, answer: *mut hostent| {
        // SAFETY: both are null or valid out-pointers, as gethostbyname2_r(3) requires.
        unsafe {
            if !h_errnop.is_null() {
                *h_errnop = h_errno;
            }
            if !result.is_null() {
                *result = answer;
            }
        }
        if rc != 0 {
            sys::set_errno(rc);
        }
        rc
    };
    match (detour, text) {
        (Detour::Failed(failure), _) => {
            report(failure.reentrant_code(), failure.h_errno(), null_mut())
        }
        (Detour::Handled(address), Some(text)) => {
            // SAFETY: ret (not null) points to a hostent and buf (not null) has buflen
            // writable bytes, as gethostbyname2_r(3) requires.
            let (entry, buffer) = unsafe { (&mut *ret, out_buffer(buf, buflen)) };
            let filled = buffer.map(|buffer| netdb::fill_hostent(entry, buffer, address, text));
            match filled {
                Some(Ok(())) => report(0, 0, ret),
                _ => report(libc::ERANGE, netdb::NETDB_INTERNAL, null_mut()),
            }
        }
        (Detour::Handled(_), None) | (Detour::Bypass(_), _) => call_real!(
            sys::REAL_GETHOSTBYNAME2_R,
            Gethostbyname2RFn,
            libc::ENOSYS,
            name,
            family,
            ret,
            buf,
            buflen,
            result,
            h_errnop
        ),
    }
}

/// The non-reentrant forms: the answer in this thread's entry, or `None` for the real
/// function.
fn static_host_lookup(name: Option<&CStr>, family: c_int) -> Option<*mut hostent> {
    match host_lookup(name, family) {
        Detour::Bypass(_) => None,
        Detour::Failed(failure) => {
            sys::set_h_errno(failure.h_errno());
            Some(null_mut())
        }
        Detour::Handled(address) => {
            let entry = netdb::thread_hostent(address, name?)?;
            Some(entry.unwrap_or_else(|netdb::TooSmall| {
                sys::set_h_errno(netdb::NO_RECOVERY);
                null_mut()
            }))
        }
    }
}

/// # Safety
/// As for `gethostbyname(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut hostent {
    // SAFETY: name is null or a NUL-terminated string, as gethostbyname(3) requires.
    if let Some(answer) = static_host_lookup(unsafe { c_str(name) }, libc::AF_INET) {
        return answer;
    }
    call_real!(sys::REAL_GETHOSTBYNAME, GethostbynameFn, null_mut(), name)
}

/// # Safety
/// As for `gethostbyname2(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gethostbyname2(name: *const c_char, family: c_int) -> *mut hostent {
    // SAFETY: name is null or a NUL-terminated string, as gethostbyname2(3) requires.
    if let Some(answer) = static_host_lookup(unsafe { c_str(name) }, family) {
        return answer;
    }
    call_real!(
        sys::REAL_GETHOSTBYNAME2,
        Gethostbyname2Fn,
        null_mut(),
        name,
        family
    )
}
