//! The kernel's edge: installing the filter in the child between fork and exec, the
//! seccomp notification ioctls, and taking a program's file descriptor with
//! `pidfd_getfd`. Every `unsafe` of the supervisor is here; the rest is safe code.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::filter::Filter;

/// One system call the filter handed to us, stopped until we answer it.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    /// Names this call in the answer; valid until answered or the caller dies.
    pub id: u64,
    /// The calling thread (its id in our pid namespace).
    pub tid: i32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// What the stopped call does once answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The kernel runs the call as the program made it.
    Continue,
    /// The call returns this value (what we did in its place).
    Return(i64),
    /// The call fails with this errno.
    Fail(i32),
}

/// Makes `command`'s child, after fork and before exec, forbid itself new privileges,
/// install `filter` with a notification listener, and send the listener over
/// `channel` (one end of a socket pair). Only system calls run there: no allocation,
/// no lock, as after a fork in a threaded process nothing else is safe. A kernel that
/// refuses the filter makes `spawn` fail with its errno.
pub fn install_in_child(command: &mut Command, filter: Filter, channel: OwnedFd) {
    let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | filter.flags;
    let instructions = filter.instructions;
    // SAFETY: the closure runs in the forked child before exec. It only makes system
    // calls (sigprocmask, prctl, seccomp, sendmsg, close) on memory that was allocated before the
    // fork (`instructions`, the channel) or lives on its own stack; it allocates
    // nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: instructions.len() as u16,
                filter: instructions.as_ptr() as *mut libc::sock_filter,
            };
            // The program starts with no signal blocked: the supervisor blocks the ones
            // it passes on, and a mask is inherited across fork and exec.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &program as *const libc::sock_fprog,
            );
            if listener < 0 {
                return Err(io::Error::last_os_error());
            }
            let sent = send_fd_raw(channel.as_raw_fd(), listener as RawFd);
            libc::close(listener as RawFd);
            if sent < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `sendmsg` of one byte with `fd` as SCM_RIGHTS, built on the stack (the child's
/// side of [`install_in_child`]).
///
/// # Safety
/// Only system calls on the stack's memory; callable between fork and exec.
unsafe fn send_fd_raw(channel: RawFd, fd: RawFd) -> isize {
    // Room for one cmsghdr with one int, aligned for cmsghdr.
    let mut space = [0u64; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: every pointer names a local of this frame, alive for the call; the
    // control buffer is larger than CMSG_SPACE(sizeof(int)) and aligned as u64.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return -1;
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(channel, &msg, 0)
    }
}

/// Waits for the next notification. `ENOENT`: the caller died before we read it.
pub fn receive(listener: BorrowedFd<'_>) -> io::Result<Notification> {
    // SAFETY: seccomp_notif is plain data; the kernel wants it zeroed.
    let mut raw: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `raw` is a live, writable seccomp_notif of the size the request names.
        let rc = unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV as _,
                &mut raw as *mut libc::seccomp_notif,
            )
        };
        if rc == 0 {
            return Ok(Notification {
                id: raw.id,
                tid: raw.pid as i32,
                nr: i64::from(raw.data.nr),
                args: raw.data.args,
            });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

/// Answers notification `id`. `ENOENT`: the caller is gone (killed, or the call was
/// interrupted before we read it).
pub fn answer(listener: BorrowedFd<'_>, id: u64, answer: Answer) -> io::Result<()> {
    let (val, error, flags) = match answer {
        Answer::Continue => (0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Answer::Return(value) => (value, 0, 0),
        Answer::Fail(errno) => (0, -errno, 0),
    };
    let mut response = libc::seccomp_notif_resp {
        id,
        val,
        error,
        flags,
    };
    // SAFETY: `response` is a live seccomp_notif_resp, the size the request names.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &mut response as *mut libc::seccomp_notif_resp,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True while notification `id` still waits for its answer: what we read of the
/// caller before this was read from the process that made the call.
pub fn still_waiting(listener: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    // SAFETY: the request reads one u64, which `id` is.
    unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &mut id as *mut u64,
        ) == 0
    }
}

/// A pidfd for process `pid`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned(fd)
}

/// A pidfd for thread `tid` (PIDFD_THREAD, Linux 6.9 and newer).
pub fn pidfd_open_thread(tid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, libc::O_EXCL) };
    owned(fd)
}

/// A duplicate of file descriptor `fd` of the process behind `pidfd`, in this process.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: a system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    owned(fd)
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Ends this process the way the program ended: by `signal`, with its default action
/// (a core dump too, for the signals that make one), else with 128 + its number.
pub fn die_of(signal: nix::sys::signal::Signal) -> ! {
    use nix::sys::signal::{SigHandler, SigSet};
    // SAFETY: SIG_DFL installs no handler of ours; nothing runs on the signal.
    let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(signal);
    let _ = set.thread_unblock();
    let _ = nix::sys::signal::raise(signal);
    std::process::exit(128 + signal as i32)
}

/// `connect` of `socket` to the `struct sockaddr` in `address`, as the program passed
/// it (any family): the kernel reads our copy, which the program cannot change.
pub fn connect_raw(socket: BorrowedFd<'_>, address: &[u8]) -> io::Result<()> {
    // SAFETY: `address` is a live buffer of exactly the length given; the kernel only
    // reads it during the call.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            address.as_ptr().cast::<libc::sockaddr>(),
            address.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to the process behind `pidfd` (never to a process that took its
/// number after it was reaped).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a system call with integer arguments and a null siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `sendto` of `data` on `socket` to the `struct sockaddr` in `address`, as read from
/// the program (a Fast Open connect made with our copy of the address).
pub fn sendto_raw(
    socket: BorrowedFd<'_>,
    data: &[u8],
    flags: i32,
    address: &[u8],
) -> io::Result<usize> {
    // SAFETY: both buffers are live for the call and given with their lengths.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags,
            address.as_ptr().cast::<libc::sockaddr>(),
            address.len() as libc::socklen_t,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Receives one descriptor passed as SCM_RIGHTS on `channel` (the filter's listener,
/// from the child).
pub fn receive_fd(channel: &OwnedFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!(RawFd);
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let message = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(fd) = fds.first()
        {
            // SAFETY: SCM_RIGHTS just installed this descriptor in our table, and
            // nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the program's side sent no listener",
    ))
}
