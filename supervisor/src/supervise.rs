//! The supervisor's life: start the program under the filter, answer its notified
//! system calls, pass signals on, reap it and every descendant that outlives it (the
//! supervisor is their subreaper), and say how the program ended.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::agent::AgentSocket;
use crate::connect::{
    Decision, Destination, Failed, Routes, note_resolver, parse_sockaddr, redirect,
    redirect_resolver,
};
use crate::filter::Rules;
use crate::program::{self, Redirects};
use crate::resolver::Resolver;
use crate::sys::{self, Answer, Notification};

/// What the supervisor needs to know.
#[derive(Debug, Clone)]
pub struct Plan {
    pub routes: Routes,
    pub agent: AgentSocket,
    pub rules: Rules,
    /// Say what happens to each routed connect on stderr (`TUNNEL_DEBUG`).
    pub trace: bool,
    /// Children of ours that are not the program's (an agent started for it): not
    /// waited for.
    pub not_waited_for: Vec<u32>,
    /// Answer the program's own DNS queries (static and Go resolvers) in the resolver
    /// stub: routed names get synthetic addresses.
    pub resolve_names: bool,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

/// The environment variable that tells a nested `tunnel-run` that the program runs
/// under a supervisor already (its value: the supervisor's pid).
pub const SUPERVISED_ENV: &str = "TUNNEL_SUPERVISED";

/// The signals passed on to the program. SIGINT and SIGQUIT are not: the terminal
/// sends them to the whole foreground process group, the program included.
const PASSED_ON: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
];
const SWALLOWED: [Signal; 2] = [Signal::SIGINT, Signal::SIGQUIT];

struct Shared {
    listener: OwnedFd,
    routes: Routes,
    agent: AgentSocket,
    redirects: Redirects,
    /// The resolver stub for programs' own DNS queries; `None` when names are left
    /// to the program.
    resolver: Option<Arc<Resolver>>,
    trace: bool,
}

impl Shared {
    fn name_of(&self, ip: std::net::IpAddr) -> Option<String> {
        self.resolver.as_ref().and_then(|r| r.name_of(ip))
    }

    fn trace(&self, what: std::fmt::Arguments<'_>) {
        if self.trace {
            eprintln!("tunnel-run: supervisor: {what}");
        }
    }
}

/// Checks what the supervisor needs of this machine before anything runs, so that a
/// missing piece is an error naming it, never a program whose connects go direct.
pub fn check_machine() -> Result<()> {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    yama_allows(scope, nix::unistd::geteuid().is_root())
}

/// Whether Yama's ptrace scope lets us take the program's sockets (`pidfd_getfd` asks
/// for ptrace access): scope 1 lets an ancestor, which the supervisor is (its
/// subreaper too); 2 only root; 3 nobody.
fn yama_allows(scope: Option<u32>, root: bool) -> Result<()> {
    match scope {
        Some(3) => bail!(
            "kernel.yama.ptrace_scope is 3: no process may take another's file descriptors (pidfd_getfd), which the supervisor needs; it cannot run on this machine until the scope is lowered (it can only be changed at boot)"
        ),
        Some(2) if !root => bail!(
            "kernel.yama.ptrace_scope is 2: only root may take another process's file descriptors (pidfd_getfd), which the supervisor needs; ask the administrator for scope 1 (sysctl kernel.yama.ptrace_scope=1), or use a [[forward]] port"
        ),
        _ => Ok(()),
    }
}

/// Runs `command` under the supervisor until it and every descendant that outlives
/// it have ended.
pub fn run(mut command: Command, plan: Plan) -> Result<Exit> {
    check_machine()?;
    let mut blocked = SigSet::empty();
    for s in PASSED_ON.iter().chain(SWALLOWED.iter()) {
        blocked.add(*s);
    }
    // Blocked here, in the main thread before any other of ours starts, so every
    // thread has them blocked and the signal thread alone takes them; the program
    // starts with an empty mask (set between fork and exec).
    blocked.thread_block().context("blocking signals")?;
    let resolver = if plan.resolve_names {
        Some(
            Resolver::start(plan.routes.table.clone(), plan.agent.clone(), plan.trace)
                .context("starting the resolver stub on loopback")?,
        )
    } else {
        None
    };
    nix::sys::prctl::set_child_subreaper(true).context("becoming the program's subreaper")?;

    let (ours, theirs) = nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("making the socket pair the filter's listener comes over")?;
    command.env(SUPERVISED_ENV, std::process::id().to_string());
    sys::install_in_child(&mut command, plan.rules.filter(), theirs);
    let child = command.spawn().map_err(|e| spawn_error(&command, e))?;
    drop(command);
    let main = Pid::from_raw(child.id() as i32);
    let listener = receive_listener(&ours).context("receiving the filter's listener")?;
    drop(ours);

    let shared = Arc::new(Shared {
        listener,
        routes: plan.routes,
        agent: plan.agent,
        redirects: Redirects::default(),
        resolver,
        trace: plan.trace,
    });
    std::thread::Builder::new()
        .name("notifications".into())
        .spawn({
            let shared = shared.clone();
            move || answer_notifications(&shared)
        })
        .context("starting the notification thread")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || pass_signals_on(blocked, main))
        .context("starting the signal thread")?;
    Ok(reap(main, &plan.not_waited_for))
}

fn spawn_error(command: &Command, e: std::io::Error) -> anyhow::Error {
    let program = command.get_program().to_string_lossy().into_owned();
    match e.raw_os_error() {
        Some(libc::EINVAL) => anyhow::anyhow!(
            "this kernel refused the supervisor's seccomp filter (EINVAL): it needs seccomp user notification with SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (Linux 5.19 or newer); run `{program}` with a [[forward]] port instead"
        ),
        Some(libc::EACCES) | Some(libc::EPERM) if e.kind() != std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("cannot run `{program}` under the supervisor: {e}")
        }
        _ => anyhow::anyhow!("cannot run `{program}`: {e}"),
    }
}

fn receive_listener(ours: &OwnedFd) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!(std::os::fd::RawFd);
    let mut iov = [IoSliceMut::new(&mut byte)];
    let message = nix::sys::socket::recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(fd) = fds.first()
        {
            use std::os::fd::FromRawFd;
            #[allow(unsafe_code)]
            // SAFETY: SCM_RIGHTS just installed this descriptor in our table; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    bail!("the program's side sent no listener")
}

/// Passes signals sent to the supervisor on to the program.
fn pass_signals_on(blocked: SigSet, main: Pid) {
    while let Ok(signal) = blocked.wait() {
        if PASSED_ON.contains(&signal) {
            let _ = nix::sys::signal::kill(main, signal);
        }
    }
}

/// Reaps children until the program has ended and no descendant of it is left (the
/// ones orphaned are ours, as subreaper); returns how the program ended.
fn reap(main: Pid, not_waited_for: &[u32]) -> Exit {
    let mut exit = None;
    loop {
        let flags = if exit.is_some() {
            Some(WaitPidFlag::WNOHANG)
        } else {
            None
        };
        match waitpid(Pid::from_raw(-1), flags) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => exit = Some(Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == main => {
                exit = Some(Exit::Signal(signal))
            }
            Ok(WaitStatus::StillAlive) => {
                if !descendants_left(not_waited_for) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    exit.unwrap_or(Exit::Code(0))
}

/// True while a child of ours other than `not_waited_for` lives.
fn descendants_left(not_waited_for: &[u32]) -> bool {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !not_waited_for.contains(pid))
        .any(|pid| parent_of(pid) == Some(me))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: read after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn answer_notifications(shared: &Arc<Shared>) {
    loop {
        let notification = match sys::receive(shared.listener.as_fd()) {
            Ok(n) => n,
            // The caller died before we read it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(_) => return,
        };
        match notification.nr {
            libc::SYS_connect => on_connect(shared, notification),
            libc::SYS_sendto => on_sendto(shared, notification),
            libc::SYS_sendmsg => on_sendmsg(shared, notification),
            libc::SYS_recvfrom => on_recvfrom(shared, notification),
            libc::SYS_getpeername => on_getpeername(shared, notification),
            _ => answer(shared, &notification, Answer::Continue),
        }
    }
}

fn answer(shared: &Shared, notification: &Notification, answer: Answer) {
    // ENOENT: the caller is gone; nothing to tell.
    let _ = sys::answer(shared.listener.as_fd(), notification.id, answer);
}

/// Answers `n` with what `work` decides, on a thread of its own: it may wait (for the
/// gateway's verdict, a nameserver, a datagram).
fn in_worker(
    shared: &Arc<Shared>,
    n: Notification,
    work: impl FnOnce(&Shared, &Notification) -> Answer + Send + 'static,
) {
    let worker = shared.clone();
    let started = std::thread::Builder::new()
        .name("notified".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let result = work(&worker, &n);
            answer(&worker, &n, result);
        });
    if started.is_err() {
        answer(shared, &n, Answer::Fail(libc::EAGAIN));
    }
}

/// Reads the `struct sockaddr` of `length` bytes at `address` in the caller, once; the
/// destination is the call's only if the call still waits (the thread could have died
/// and its id been reused). `None`: the call is gone, nothing to answer.
fn destination_of(
    shared: &Shared,
    n: &Notification,
    address: u64,
    length: u64,
) -> Option<Destination> {
    let read = program::read(n.tid, address, (length as usize).min(128));
    if !sys::still_waiting(shared.listener.as_fd(), n.id) {
        return None;
    }
    Some(match read {
        Ok(bytes) => parse_sockaddr(&bytes),
        // A bad pointer: the kernel's own call says EFAULT.
        Err(_) => Destination::Malformed,
    })
}

/// A `connect`: a destination no route selects continues as the program made it; a
/// routed one is redirected; a resolver's UDP socket meant for a nameserver (port 53)
/// goes to the resolver stub.
fn on_connect(shared: &Arc<Shared>, n: Notification) {
    let Some(destination) = destination_of(shared, &n, n.args[1], n.args[2]) else {
        return;
    };
    let Destination::Internet(destination) = destination else {
        return answer(shared, &n, Answer::Continue);
    };
    if destination.port() == 53 && shared.resolver.is_some() {
        return in_worker(shared, n, move |shared, n| {
            let socket = match take_socket(shared, n) {
                Ok(socket) => socket,
                Err(answer) => return answer,
            };
            if is_datagram(&socket)
                && let Some(resolver) = &shared.resolver
            {
                return finish(
                    shared,
                    destination,
                    redirect_resolver(resolver, &shared.redirects, &socket, destination),
                );
            }
            route_stream(shared, &socket, destination)
        });
    }
    let decision = shared.routes.decide(destination, |ip| shared.name_of(ip));
    let Decision::Tunnel { .. } = decision else {
        return answer(shared, &n, Answer::Continue);
    };
    in_worker(shared, n, move |shared, n| match take_socket(shared, n) {
        Ok(socket) => route_stream(shared, &socket, destination),
        Err(answer) => answer,
    })
}

/// A connect of the program's `socket` to `destination`, by the routes.
fn route_stream(shared: &Shared, socket: &OwnedFd, destination: SocketAddr) -> Answer {
    // The same connect again (a call restarted after a signal, a program asking once
    // more): the socket is connected already, to the agent for this destination.
    if shared.redirects.of(socket).is_some_and(|r| {
        !r.resolver && program::canonical(r.shown) == program::canonical(destination)
    }) {
        return Answer::Return(0);
    }
    match shared.routes.decide(destination, |ip| shared.name_of(ip)) {
        Decision::Direct => Answer::Continue,
        Decision::Tunnel { via, connect } => finish(
            shared,
            destination,
            redirect(
                &shared.agent,
                &shared.redirects,
                socket,
                destination,
                via,
                connect,
            ),
        ),
    }
}

fn finish(shared: &Shared, destination: SocketAddr, result: Result<Answer, Failed>) -> Answer {
    match result {
        Ok(answer) => {
            shared.trace(format_args!("{destination}: redirected ({answer:?})"));
            answer
        }
        Err(failed) => {
            shared.trace(format_args!(
                "{destination}: {} (errno {})",
                failed.why, failed.errno
            ));
            Answer::Fail(failed.errno)
        }
    }
}

fn is_datagram(socket: &OwnedFd) -> bool {
    nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::SockType)
        .is_ok_and(|t| t == nix::sys::socket::SockType::Datagram)
}

/// A TCP Fast Open connect inside a send (`MSG_FASTOPEN`) to a routed destination:
/// connected through the agent as by `connect`, then `data` sent on that connection.
fn fast_open(
    shared: &Shared,
    socket: &OwnedFd,
    destination: SocketAddr,
    data: &[u8],
    flags: i32,
) -> Answer {
    match route_stream(shared, socket, destination) {
        Answer::Return(0) | Answer::Fail(libc::EINPROGRESS) => {
            let flags = nix::sys::socket::MsgFlags::from_bits_truncate(flags & !libc::MSG_FASTOPEN);
            match nix::sys::socket::send(socket.as_raw_fd(), data, flags) {
                Ok(sent) => Answer::Return(sent as i64),
                Err(nix::errno::Errno::EAGAIN) => Answer::Fail(libc::EINPROGRESS),
                Err(e) => Answer::Fail(e as i32),
            }
        }
        other => other,
    }
}

/// True when `destination` is one the routes send through the tunnel.
fn is_routed(shared: &Shared, destination: SocketAddr) -> bool {
    matches!(
        shared.routes.decide(destination, |ip| shared.name_of(ip)),
        Decision::Tunnel { .. }
    )
}

/// A `sendmsg` with `MSG_FASTOPEN` (the filter stops no other): a routed destination
/// is connected through the tunnel first, as by `connect`.
fn on_sendmsg(shared: &Arc<Shared>, n: Notification) {
    // struct msghdr: msg_name, msg_namelen, msg_iov, msg_iovlen, ...
    let header = program::read(n.tid, n.args[1], 32);
    let Ok(header) = header else {
        return answer(shared, &n, Answer::Continue);
    };
    let word = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let (name, name_len, iov, iov_len) = (word(0), word(8) & 0xffff_ffff, word(16), word(24));
    let Some(destination) = destination_of(shared, &n, name, name_len) else {
        return;
    };
    let Destination::Internet(destination) = destination else {
        return answer(shared, &n, Answer::Continue);
    };
    if !is_routed(shared, destination) {
        return answer(shared, &n, Answer::Continue);
    }
    in_worker(shared, n, move |shared, n| {
        let socket = match take_socket(shared, n) {
            Ok(socket) => socket,
            Err(answer) => return answer,
        };
        let mut data = Vec::new();
        let Ok(vectors) = program::read(n.tid, iov, (iov_len as usize).min(64) * 16) else {
            return Answer::Fail(libc::EFAULT);
        };
        for vector in vectors.chunks_exact(16) {
            let base = u64::from_ne_bytes(vector[..8].try_into().unwrap_or([0; 8]));
            let len = u64::from_ne_bytes(vector[8..].try_into().unwrap_or([0; 8])) as usize;
            let room = 65_536usize.saturating_sub(data.len());
            match program::read(n.tid, base, len.min(room)) {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(_) => return Answer::Fail(libc::EFAULT),
            }
        }
        fast_open(shared, &socket, destination, &data, n.args[2] as i32)
    });
}

/// A `sendto` with a destination: a query to a nameserver (UDP, port 53) goes to the
/// resolver stub from the program's own socket; a Fast Open connect to a routed
/// destination goes through the tunnel; everything else continues.
fn on_sendto(shared: &Arc<Shared>, n: Notification) {
    let Some(destination) = destination_of(shared, &n, n.args[4], n.args[5]) else {
        return;
    };
    let flags = n.args[3] as i32;
    if flags & libc::MSG_FASTOPEN != 0
        && let Destination::Internet(destination) = destination
        && is_routed(shared, destination)
    {
        return in_worker(shared, n, move |shared, n| {
            let socket = match take_socket(shared, n) {
                Ok(socket) => socket,
                Err(answer) => return answer,
            };
            if is_datagram(&socket) {
                return Answer::Continue;
            }
            match program::read(n.tid, n.args[1], (n.args[2] as usize).min(65_536)) {
                Ok(data) => fast_open(shared, &socket, destination, &data, flags),
                Err(_) => Answer::Fail(libc::EFAULT),
            }
        });
    }
    if shared.resolver.is_none() {
        return answer(shared, &n, Answer::Continue);
    }
    let nameserver = match destination {
        Destination::Internet(d) if d.port() == 53 => d,
        _ => return answer(shared, &n, Answer::Continue),
    };
    in_worker(shared, n, move |shared, n| {
        let Some(resolver) = &shared.resolver else {
            return Answer::Continue;
        };
        let socket = match take_socket(shared, n) {
            Ok(socket) => socket,
            Err(answer) => return answer,
        };
        if !is_datagram(&socket) {
            return Answer::Continue;
        }
        let Ok(query) = program::read(n.tid, n.args[1], (n.args[2] as usize).min(65_535)) else {
            return Answer::Fail(libc::EFAULT);
        };
        let stub = resolver.stub_for(program::is_ipv6(&socket));
        let flags = nix::sys::socket::MsgFlags::from_bits_truncate(n.args[3] as i32);
        let sent = match stub {
            SocketAddr::V4(v4) => nix::sys::socket::sendto(
                socket.as_raw_fd(),
                &query,
                &nix::sys::socket::SockaddrIn::from(v4),
                flags,
            ),
            SocketAddr::V6(v6) => nix::sys::socket::sendto(
                socket.as_raw_fd(),
                &query,
                &nix::sys::socket::SockaddrIn6::from(v6),
                flags,
            ),
        };
        match sent {
            Ok(bytes) => {
                note_resolver(resolver, &shared.redirects, &socket, nameserver, stub);
                shared.trace(format_args!("query to {nameserver}: to the resolver stub"));
                Answer::Return(bytes as i64)
            }
            Err(e) => Answer::Fail(e as i32),
        }
    });
}

/// A `recvfrom` that asks who sent: on a resolver socket we redirected, done here so
/// that an answer from the stub shows as from the nameserver the program asked; on any
/// other socket it continues.
fn on_recvfrom(shared: &Arc<Shared>, n: Notification) {
    let Some(socket) = take_socket_quietly(shared, &n) else {
        return answer(shared, &n, Answer::Continue);
    };
    let Some(redirect) = shared.redirects.of(&socket).filter(|r| r.resolver) else {
        return answer(shared, &n, Answer::Continue);
    };
    in_worker(shared, n, move |shared, n| {
        let mut buffer = vec![0u8; (n.args[2] as usize).min(65_535)];
        let flags = nix::sys::socket::MsgFlags::from_bits_truncate(n.args[3] as i32);
        let received = nix::sys::socket::recvmsg::<nix::sys::socket::SockaddrStorage>(
            socket.as_raw_fd(),
            &mut [std::io::IoSliceMut::new(&mut buffer)],
            None,
            flags,
        )
        .map(|m| (m.bytes, m.address.as_ref().and_then(program::to_std)));
        let (bytes, from) = match received {
            Ok(got) => got,
            Err(e) => return Answer::Fail(e as i32),
        };
        let from = match (from, &shared.resolver) {
            (Some(f), Some(resolver)) if resolver.is_stub(f) => Some(redirect.shown),
            (other, _) => other,
        };
        let copied = bytes.min(buffer.len());
        if program::write(n.tid, n.args[1], &buffer[..copied]).is_err() {
            return Answer::Fail(libc::EFAULT);
        }
        if let Some(from) = from {
            let sockaddr = program::encode_sockaddr(from, program::is_ipv6(&socket));
            if program::write_sockaddr(n.tid, n.args[4], n.args[5], &sockaddr).is_err() {
                return Answer::Fail(libc::EFAULT);
            }
        }
        Answer::Return(bytes as i64)
    });
}

/// `getpeername` of a socket we redirected: the peer the program asked for (Go fills
/// its connections' RemoteAddr from it); any other socket's is the kernel's.
fn on_getpeername(shared: &Arc<Shared>, n: Notification) {
    let Some(socket) = take_socket_quietly(shared, &n) else {
        return answer(shared, &n, Answer::Continue);
    };
    let Some(redirect) = shared.redirects.of(&socket) else {
        return answer(shared, &n, Answer::Continue);
    };
    let sockaddr = program::encode_sockaddr(redirect.shown, program::is_ipv6(&socket));
    let result = match program::write_sockaddr(n.tid, n.args[1], n.args[2], &sockaddr) {
        Ok(()) => Answer::Return(0),
        Err(_) => Answer::Fail(libc::EFAULT),
    };
    answer(shared, &n, result);
}

/// Our duplicate of the socket a notified call is for, or nothing (the call then
/// continues as the program made it).
fn take_socket_quietly(shared: &Shared, n: &Notification) -> Option<OwnedFd> {
    let process = thread_group_of(n.tid)?;
    let pidfd = sys::pidfd_open(process).ok()?;
    if !sys::still_waiting(shared.listener.as_fd(), n.id) {
        return None;
    }
    sys::pidfd_getfd(pidfd.as_fd(), n.args[0] as i32).ok()
}

/// Our duplicate of the socket the notified connect is for.
fn take_socket(shared: &Shared, n: &Notification) -> Result<OwnedFd, Answer> {
    let refused = Answer::Fail(libc::ECONNREFUSED);
    let process = thread_group_of(n.tid).ok_or(refused)?;
    let pidfd = sys::pidfd_open(process).map_err(|_| refused)?;
    // The pidfd is the caller's only if the call still waits (ids are reused).
    if !sys::still_waiting(shared.listener.as_fd(), n.id) {
        return Err(refused);
    }
    sys::pidfd_getfd(pidfd.as_fd(), n.args[0] as i32).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => Answer::Fail(libc::EBADF),
        _ => {
            eprintln!(
                "tunnel-run: supervisor: cannot take the socket of process {process} (pidfd_getfd: {e}); its connect is refused, not sent direct"
            );
            refused
        }
    })
}

/// The process (thread group) a thread belongs to.
fn thread_group_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ptrace_scope_that_forbids_taking_sockets_is_named() {
        for (scope, root) in [
            (None, false),
            (Some(0), false),
            (Some(1), false),
            (Some(2), true),
        ] {
            assert!(yama_allows(scope, root).is_ok(), "{scope:?} {root}");
        }
        for (scope, root) in [(Some(2), false), (Some(3), true), (Some(3), false)] {
            let e = yama_allows(scope, root).expect_err("refused").to_string();
            assert!(e.contains("kernel.yama.ptrace_scope"), "{e}");
            assert!(e.contains("pidfd_getfd"), "{e}");
        }
    }
}
