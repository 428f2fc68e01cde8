//! The supervisor's life: start the program under the filter, answer its notified
//! system calls, pass signals on, reap it and every descendant that outlives it (the
//! supervisor is their subreaper), and say how the program ended.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{AddressFamily, SockFlag, SockType};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::agent::AgentSocket;
use crate::connect::{
    Decision, Destination, Failed, Routes, bind_any, note_resolver, parse_sockaddr, redirect,
    redirect_resolver,
};
use crate::filter::Rules;
use crate::program::{self, Redirects, is_datagram, is_internet};
use crate::resolver::Resolver;
use crate::sys::{self, Answer, Notification};
use crate::workers::Workers;

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
    /// Sockets whose redirect was refused, by inode, with the destination and errno: a
    /// connect tried again on one gets the same answer (its source address is
    /// registered already).
    refused: parking_lot::Mutex<std::collections::HashMap<u64, (SocketAddr, i32)>>,
    workers: Arc<Workers>,
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
    let program_name = command.get_program().to_string_lossy().into_owned();
    sys::install_in_child(&mut command, plan.rules.filter(), theirs);
    let child = command.spawn().map_err(|e| spawn_error(&command, e))?;
    drop(command);
    let main = Pid::from_raw(child.id() as i32);
    let main_pidfd = sys::pidfd_open(main.as_raw()).context("opening a pidfd for the program")?;
    let listener = sys::receive_fd(&ours).context("receiving the filter's listener")?;
    drop(ours);
    // Each routed connect in flight holds a few descriptors here; the program keeps
    // the limit it was started with.
    raise_descriptor_limit();
    let job = Arc::new(Job {
        main,
        main_pidfd,
        main_done: AtomicBool::new(false),
        not_waited_for: plan.not_waited_for.clone(),
    });

    let shared = Arc::new(Shared {
        listener,
        routes: plan.routes,
        agent: plan.agent,
        redirects: Redirects::default(),
        refused: Default::default(),
        workers: Workers::new(),
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
        .spawn({
            let job = job.clone();
            move || pass_signals_on(blocked, &job)
        })
        .context("starting the signal thread")?;
    Ok(reap(&job, &program_name))
}

/// The program and what is left of its job.
struct Job {
    main: Pid,
    /// Signals go through it, never to a process that took the number after the
    /// program was reaped.
    main_pidfd: OwnedFd,
    main_done: AtomicBool,
    not_waited_for: Vec<u32>,
}

fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
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

/// Passes signals sent to the supervisor on to the program; once it has ended, one
/// that ends a job (SIGINT, SIGTERM, SIGHUP, SIGQUIT) sends SIGTERM to the processes it
/// left behind, which would otherwise keep tunnel-run waiting, and the next SIGKILL.
fn pass_signals_on(blocked: SigSet, job: &Job) {
    let mut ended_once = false;
    while let Ok(signal) = blocked.wait() {
        if !job.main_done.load(AtomicOrdering::Acquire) {
            if PASSED_ON.contains(&signal) {
                let _ = sys::pidfd_send_signal(job.main_pidfd.as_fd(), signal as i32);
            }
            continue;
        }
        if matches!(
            signal,
            Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGQUIT
        ) {
            // SIGTERM first (a shell starts background jobs with SIGINT ignored), then
            // SIGKILL for whatever is still there at the next one.
            let sent = if ended_once {
                Signal::SIGKILL
            } else {
                Signal::SIGTERM
            };
            ended_once = true;
            let left = left_behind(&job.not_waited_for);
            for pid in &left {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid as i32), sent);
            }
            if !left.is_empty() {
                eprintln!(
                    "tunnel-run: sent {sent} to the {} process(es) left behind{}",
                    left.len(),
                    if sent == Signal::SIGTERM {
                        "; once more sends SIGKILL"
                    } else {
                        ""
                    }
                );
            }
        }
    }
}

/// Reaps children until the program has ended and no descendant of it is left (the
/// ones orphaned are ours, as subreaper); returns how the program ended.
fn reap(job: &Job, program: &str) -> Exit {
    let mut exit = None;
    let mut said = false;
    loop {
        let flags = if exit.is_some() {
            Some(WaitPidFlag::WNOHANG)
        } else {
            None
        };
        match waitpid(Pid::from_raw(-1), flags) {
            Ok(WaitStatus::Exited(pid, code)) if pid == job.main => {
                job.main_done.store(true, AtomicOrdering::Release);
                exit = Some(Exit::Code(code));
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == job.main => {
                job.main_done.store(true, AtomicOrdering::Release);
                exit = Some(Exit::Signal(signal));
            }
            Ok(WaitStatus::StillAlive) => {
                let left = left_behind(&job.not_waited_for);
                if left.is_empty() {
                    break;
                }
                if !said {
                    said = true;
                    let pids: Vec<String> = left.iter().map(u32::to_string).collect();
                    eprintln!(
                        "tunnel-run: `{program}` has ended; waiting for the {} process(es) it left behind (pid {}), which stay supervised until they end (Ctrl-C or SIGTERM sends them SIGTERM)",
                        left.len(),
                        pids.join(", ")
                    );
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

/// Our children other than `not_waited_for`: what the program left behind once it
/// has ended (orphans come to us, the subreaper).
fn left_behind(not_waited_for: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !not_waited_for.contains(pid))
        .filter(|pid| parent_of(*pid) == Some(me))
        .collect()
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
    let started = shared.workers.run(Box::new(move || {
        let result = work(&worker, &n);
        answer(&worker, &n, result);
    }));
    if started.is_err() {
        answer(shared, &n, Answer::Fail(libc::EAGAIN));
    }
}

/// The longest `struct sockaddr` the kernel takes (`sizeof(struct sockaddr_storage)`).
const MAX_SOCKADDR: i32 = 128;

/// Reads the `struct sockaddr` at `address`, of the length the kernel would read (an
/// `int`, at most 128 bytes), once. `Ok(None)`: the call is gone (its thread died and
/// its id may be reused), nothing to answer. `Err`: the call's answer, when the kernel's
/// own call would fail (EINVAL, EFAULT) or the program cannot be read, in which case it
/// is refused: never let through unseen.
fn sockaddr_of(
    shared: &Shared,
    n: &Notification,
    address: u64,
    length: u64,
) -> Result<Option<Vec<u8>>, Answer> {
    let length = length as u32 as i32;
    if !(0..=MAX_SOCKADDR).contains(&length) {
        return Err(Answer::Fail(libc::EINVAL));
    }
    let read = program::read(n.tid, address, length as usize);
    if !sys::still_waiting(shared.listener.as_fd(), n.id) {
        return Ok(None);
    }
    match read {
        Ok(bytes) => Ok(Some(bytes)),
        Err(nix::errno::Errno::EFAULT) => Err(Answer::Fail(libc::EFAULT)),
        Err(e) => {
            unreadable(n.tid, e);
            Err(Answer::Fail(libc::ECONNREFUSED))
        }
    }
}

/// Says once that a process of the job cannot be read (not dumpable: it called
/// prctl(PR_SET_DUMPABLE, 0), or its executable is not readable by this user), so its
/// connects are refused.
fn unreadable(tid: i32, e: nix::errno::Errno) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "tunnel-run: supervisor: cannot read process {tid}'s memory ({e}): it is not dumpable (prctl PR_SET_DUMPABLE 0, or an executable this user may not read), so the supervisor cannot see where it connects; its connects are refused, not sent direct"
        );
    }
}

/// A `connect`, with its address read once: a routed destination is redirected; a
/// resolver's socket meant for a nameserver (port 53) goes to the resolver stub; any
/// other connect is made by us on the program's socket with the address as read, so
/// that the kernel never reads the program's memory again (a thread could change it).
fn on_connect(shared: &Arc<Shared>, n: Notification) {
    let bytes = match sockaddr_of(shared, &n, n.args[1], n.args[2]) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return,
        Err(refusal) => return answer(shared, &n, refusal),
    };
    let destination = match parse_sockaddr(&bytes) {
        Destination::Internet(d) => d,
        Destination::Other | Destination::Malformed => return connect_as_read(shared, n, bytes),
    };
    if destination.port() == 53 && shared.resolver.is_some() {
        return in_worker(shared, n, move |shared, n| {
            let socket = match take_socket(shared, n) {
                Ok(socket) => socket,
                Err(answer) => return answer,
            };
            if let Some(resolver) = &shared.resolver
                && is_internet(&socket)
                && is_datagram_or_stream(&socket)
            {
                return finish(
                    shared,
                    n,
                    destination,
                    redirect_resolver(resolver, &shared.redirects, &socket, destination),
                );
            }
            route_stream(shared, n, &socket, destination, &bytes)
        });
    }
    let decision = shared.routes.decide(destination, |ip| shared.name_of(ip));
    let Decision::Tunnel { .. } = decision else {
        shared.trace(format_args!("pid {}: {destination}: direct", n.tid));
        return connect_as_read(shared, n, bytes);
    };
    in_worker(shared, n, move |shared, n| match take_socket(shared, n) {
        Ok(socket) => route_stream(shared, n, &socket, destination, &bytes),
        Err(answer) => answer,
    })
}

/// The program's connect on an internet socket, made by us with the address as read:
/// a datagram socket's at once (it only sets the peer, and never waits), any other on a
/// worker (it may wait, whatever the socket's flags say by then). A connect on any other
/// kind of socket (a Unix socket's path, netlink) is the kernel's to make, in the
/// program's own context: its credentials, directory and mounts decide, not ours, and no
/// address of another family can be given to such a socket.
fn connect_as_read(shared: &Arc<Shared>, n: Notification, bytes: Vec<u8>) {
    let socket = match take_socket(shared, &n) {
        Ok(socket) => socket,
        Err(refusal) => return answer(shared, &n, refusal),
    };
    if !is_internet(&socket) {
        return answer(shared, &n, Answer::Continue);
    }
    if is_datagram(&socket) {
        return answer(shared, &n, connect_now(&socket, &bytes));
    }
    in_worker(shared, n, move |_, _| connect_now(&socket, &bytes))
}

fn connect_now(socket: &OwnedFd, bytes: &[u8]) -> Answer {
    match sys::connect_raw(socket.as_fd(), bytes) {
        Ok(()) => Answer::Return(0),
        Err(e) => Answer::Fail(e.raw_os_error().unwrap_or(libc::ECONNREFUSED)),
    }
}

/// A connect of the program's `socket` to `destination` (read as `bytes`), by the
/// routes.
fn route_stream(
    shared: &Shared,
    n: &Notification,
    socket: &OwnedFd,
    destination: SocketAddr,
    bytes: &[u8],
) -> Answer {
    if !is_internet(socket) {
        // An address of another family than the socket's: the kernel's EAFNOSUPPORT.
        return Answer::Continue;
    }
    // The same connect again (a call restarted after a signal, a program asking once
    // more): the socket is connected already, to the agent for this destination.
    if shared.redirects.of(socket).is_some_and(|r| {
        !r.resolver && program::canonical(r.shown) == program::canonical(destination)
    }) {
        return Answer::Return(0);
    }
    // A datagram socket (a connect only sets its peer: nothing to carry), or one that is
    // connected already (EISCONN, EALREADY): made by us with the address as read.
    if is_datagram(socket) || program::peer_addr(socket).is_some() {
        return connect_now(socket, bytes);
    }
    let inode = program::inode(socket);
    if let Some(inode) = inode
        && let Some((to, errno)) = shared.refused.lock().get(&inode).copied()
        && to == destination
    {
        return Answer::Fail(errno);
    }
    match shared.routes.decide(destination, |ip| shared.name_of(ip)) {
        Decision::Direct => {
            shared.trace(format_args!("pid {}: {destination}: direct", n.tid));
            connect_now(socket, bytes)
        }
        Decision::Tunnel { via, connect } => {
            let result = redirect(
                &shared.agent,
                &shared.redirects,
                socket,
                destination,
                via,
                connect,
            );
            if let (Err(failed), Some(inode)) = (&result, inode) {
                let mut refused = shared.refused.lock();
                if refused.len() > 65_536 {
                    refused.clear();
                }
                refused.insert(inode, (destination, failed.errno));
            }
            finish(shared, n, destination, result)
        }
    }
}

fn finish(
    shared: &Shared,
    n: &Notification,
    destination: SocketAddr,
    result: Result<Answer, Failed>,
) -> Answer {
    match result {
        Ok(answer) => {
            let how = match answer {
                Answer::Fail(libc::EINPROGRESS) => "through the tunnel (non-blocking: in progress)",
                Answer::Continue => "a datagram socket: not carried, connected as asked",
                _ if destination.port() == 53 => "a resolver's: to the resolver stub",
                _ => "through the tunnel",
            };
            shared.trace(format_args!("pid {}: {destination}: {how}", n.tid));
            answer
        }
        Err(failed) => {
            shared.trace(format_args!(
                "pid {}: {destination}: the connect fails with {} ({})",
                n.tid,
                std::io::Error::from_raw_os_error(failed.errno),
                failed.why
            ));
            Answer::Fail(failed.errno)
        }
    }
}

fn is_datagram_or_stream(socket: &OwnedFd) -> bool {
    program::is_datagram(socket) || program::is_stream(socket)
}

/// A TCP Fast Open connect inside a send (`MSG_FASTOPEN`): to a routed destination,
/// connected through the agent as by `connect`, then `data` sent on that connection;
/// to any other, sent by us with the address as read.
fn fast_open(
    shared: &Shared,
    n: &Notification,
    socket: &OwnedFd,
    bytes: &[u8],
    data: &[u8],
    flags: i32,
) -> Answer {
    let routed = match parse_sockaddr(bytes) {
        Destination::Internet(d) if is_routed(shared, d) => Some(d),
        _ => None,
    };
    let Some(destination) = routed else {
        return match sys::sendto_raw(socket.as_fd(), data, flags, bytes) {
            Ok(sent) => Answer::Return(sent as i64),
            Err(e) => Answer::Fail(e.raw_os_error().unwrap_or(libc::EIO)),
        };
    };
    match route_stream(shared, n, socket, destination, bytes) {
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

/// Reads the data of `iovcnt` iovecs at `iov` (at most 64 KiB, as a Fast Open send
/// carries at most a window's worth in any case).
fn gather(tid: i32, iov: u64, iovcnt: u64) -> Result<Vec<u8>, Answer> {
    let count = iovcnt as usize;
    if count > 1024 {
        return Err(Answer::Fail(libc::EMSGSIZE));
    }
    let vectors = program::read(tid, iov, count * 16).map_err(|_| Answer::Fail(libc::EFAULT))?;
    let mut data = Vec::new();
    for vector in vectors.chunks_exact(16) {
        let base = u64::from_ne_bytes(vector[..8].try_into().unwrap_or([0; 8]));
        let len = u64::from_ne_bytes(vector[8..].try_into().unwrap_or([0; 8])) as usize;
        let room = 65_536usize.saturating_sub(data.len());
        let bytes =
            program::read(tid, base, len.min(room)).map_err(|_| Answer::Fail(libc::EFAULT))?;
        data.extend_from_slice(&bytes);
    }
    Ok(data)
}

/// A `sendmsg` with `MSG_FASTOPEN` (the filter stops no other): made by us, through
/// the tunnel for a routed destination.
fn on_sendmsg(shared: &Arc<Shared>, n: Notification) {
    // struct msghdr: msg_name, msg_namelen, msg_iov, msg_iovlen, ...
    let Ok(header) = program::read(n.tid, n.args[1], 32) else {
        return answer(shared, &n, Answer::Fail(libc::EFAULT));
    };
    let word = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let (name, name_len, iov, iov_len) = (word(0), word(8) & 0xffff_ffff, word(16), word(24));
    if name == 0 {
        // No address: sent by us as it is (the header is read once: a thread cannot
        // put a routed address in it after this look).
        return in_worker(shared, n, move |shared, n| {
            let socket = match take_socket(shared, n) {
                Ok(socket) => socket,
                Err(answer) => return answer,
            };
            if !is_internet(&socket) {
                return Answer::Continue;
            }
            let data = match gather(n.tid, iov, iov_len) {
                Ok(data) => data,
                Err(answer) => return answer,
            };
            let flags = nix::sys::socket::MsgFlags::from_bits_truncate(n.args[2] as i32);
            match nix::sys::socket::send(socket.as_raw_fd(), &data, flags) {
                Ok(sent) => Answer::Return(sent as i64),
                Err(e) => Answer::Fail(e as i32),
            }
        });
    }
    let bytes = match sockaddr_of(shared, &n, name, name_len) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return,
        Err(refusal) => return answer(shared, &n, refusal),
    };
    in_worker(shared, n, move |shared, n| {
        let socket = match take_socket(shared, n) {
            Ok(socket) => socket,
            Err(answer) => return answer,
        };
        match gather(n.tid, iov, iov_len) {
            Ok(data) => fast_open(shared, n, &socket, &bytes, &data, n.args[2] as i32),
            Err(answer) => answer,
        }
    });
}

/// A `sendto` with a destination: a Fast Open connect goes as by `connect` (made by us
/// either way); a query to a nameserver (UDP, port 53) goes to the resolver stub from
/// the program's own socket; other datagrams continue (UDP is not carried).
fn on_sendto(shared: &Arc<Shared>, n: Notification) {
    let bytes = match sockaddr_of(shared, &n, n.args[4], n.args[5]) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return,
        Err(refusal) => return answer(shared, &n, refusal),
    };
    let flags = n.args[3] as i32;
    if flags & libc::MSG_FASTOPEN != 0 {
        return in_worker(shared, n, move |shared, n| {
            let socket = match take_socket(shared, n) {
                Ok(socket) => socket,
                Err(answer) => return answer,
            };
            if !is_internet(&socket) || !is_datagram_or_stream(&socket) {
                return Answer::Continue;
            }
            if is_datagram(&socket) {
                // UDP ignores MSG_FASTOPEN: sent by us with the address as read.
                return match program::read(n.tid, n.args[1], (n.args[2] as usize).min(65_536)) {
                    Ok(data) => match sys::sendto_raw(socket.as_fd(), &data, flags, &bytes) {
                        Ok(sent) => Answer::Return(sent as i64),
                        Err(e) => Answer::Fail(e.raw_os_error().unwrap_or(libc::EIO)),
                    },
                    Err(_) => Answer::Fail(libc::EFAULT),
                };
            }
            match program::read(n.tid, n.args[1], (n.args[2] as usize).min(65_536)) {
                Ok(data) => fast_open(shared, n, &socket, &bytes, &data, flags),
                Err(_) => Answer::Fail(libc::EFAULT),
            }
        });
    }
    let nameserver = match parse_sockaddr(&bytes) {
        Destination::Internet(d) if d.port() == 53 && shared.resolver.is_some() => d,
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
        let ipv6 = program::is_ipv6(&socket);
        let stub = resolver.stub_for(ipv6, false);
        // Bound first (to what the send would bind it to), so that the stub knows which
        // nameserver this socket asked before the query reaches it.
        bind_any(&socket, ipv6);
        note_resolver(resolver, &shared.redirects, &socket, nameserver, stub);
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
                shared.trace(format_args!(
                    "pid {}: DNS query to {nameserver}: answered by the resolver stub",
                    n.tid
                ));
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
    let pidfd = pidfd_of(n.tid)?;
    if !sys::still_waiting(shared.listener.as_fd(), n.id) {
        return None;
    }
    sys::pidfd_getfd(pidfd.as_fd(), n.args[0] as i32).ok()
}

/// Our duplicate of the socket the notified connect is for.
fn take_socket(shared: &Shared, n: &Notification) -> Result<OwnedFd, Answer> {
    let refused = Answer::Fail(libc::ECONNREFUSED);
    let process = n.tid;
    let pidfd = pidfd_of(n.tid).ok_or(refused)?;
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

/// A pidfd for the calling thread: for the thread itself where the kernel has them
/// (PIDFD_THREAD, Linux 6.9), else for its process, found in /proc.
fn pidfd_of(tid: i32) -> Option<OwnedFd> {
    sys::pidfd_open_thread(tid)
        .ok()
        .or_else(|| sys::pidfd_open(thread_group_of(tid)?).ok())
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
