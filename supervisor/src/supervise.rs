//! The supervisor's life: start the program under the filter, answer its notified
//! system calls, pass signals on, reap it and every descendant that outlives it (the
//! supervisor is their subreaper), and say how the program ended.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::agent::AgentSocket;
use crate::connect::{Decision, Destination, Routes, parse_sockaddr, redirect};
use crate::filter::Rules;
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
    trace: bool,
}

impl Shared {
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
    let root = nix::unistd::geteuid().is_root();
    match scope {
        Some(3) => bail!(
            "kernel.yama.ptrace_scope is 3: no process may take another's file descriptors (pidfd_getfd), which the supervisor needs; it cannot run on this machine until the scope is lowered at boot"
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
    nix::sys::prctl::set_child_subreaper(true).context("becoming the program's subreaper")?;
    let mut blocked = SigSet::empty();
    for s in PASSED_ON.iter().chain(SWALLOWED.iter()) {
        blocked.add(*s);
    }
    // Blocked here, in the main thread before any other starts, so every thread of
    // ours has them blocked and the signal thread alone takes them; the program starts
    // with an empty mask (std's spawn resets it).
    blocked.thread_block().context("blocking signals")?;

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
            _ => answer(shared, &notification, Answer::Continue),
        }
    }
}

fn answer(shared: &Shared, notification: &Notification, answer: Answer) {
    // ENOENT: the caller is gone; nothing to tell.
    let _ = sys::answer(shared.listener.as_fd(), notification.id, answer);
}

/// A `connect`: read its address once; a destination no route selects continues as
/// the program made it, a routed one is redirected on a thread of its own (it waits
/// for the gateway's answer).
fn on_connect(shared: &Arc<Shared>, n: Notification) {
    let length = (n.args[2] as usize).min(128);
    let mut bytes = vec![0u8; length];
    let read = nix::sys::uio::process_vm_readv(
        Pid::from_raw(n.tid),
        &mut [IoSliceMut::new(&mut bytes)],
        &[nix::sys::uio::RemoteIoVec {
            base: n.args[1] as usize,
            len: length,
        }],
    );
    // What we read is the call's only if the call still waits: the thread could have
    // died and its id been reused.
    if !sys::still_waiting(shared.listener.as_fd(), n.id) {
        return;
    }
    let destination = match read {
        Ok(got) if got == length => parse_sockaddr(&bytes),
        // A bad pointer: the kernel's own connect says EFAULT.
        Err(nix::errno::Errno::EFAULT) | Ok(_) => Destination::Malformed,
        Err(e) => {
            eprintln!(
                "tunnel-run: supervisor: cannot read the address of a connect in process {} ({e}): refused",
                n.tid
            );
            return answer(shared, &n, Answer::Fail(libc::ECONNREFUSED));
        }
    };
    let Destination::Internet(destination) = destination else {
        return answer(shared, &n, Answer::Continue);
    };
    let Decision::Tunnel { via, connect } = shared.routes.decide(destination) else {
        return answer(shared, &n, Answer::Continue);
    };
    let worker = shared.clone();
    let started = std::thread::Builder::new()
        .name("connect".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let result = redirect_in_place(&worker, &n, destination, via, connect);
            answer(&worker, &n, result);
        });
    if started.is_err() {
        answer(shared, &n, Answer::Fail(libc::EAGAIN));
    }
}

/// Takes the program's socket and redirects it; what the program's connect returns.
fn redirect_in_place(
    shared: &Shared,
    n: &Notification,
    destination: std::net::SocketAddr,
    via: Option<String>,
    connect: tunnel_proto::routes::ConnectMode,
) -> Answer {
    let socket = match take_socket(shared, n) {
        Ok(socket) => socket,
        Err(answer) => return answer,
    };
    match redirect(&shared.agent, &socket, destination, via, connect) {
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
