//! Programs LD_PRELOAD cannot see (statically linked ones here) under `tunnel-run`'s
//! seccomp supervisor: routed connects go through the tunnel with the far side's real
//! answer, blocking and not; the rest go direct; descendants that outlive the program
//! stay supervised; io_uring is refused; a preloaded program under the supervisor
//! makes one stream per connection; a nested tunnel-run defers to the outer one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tunnel_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A static C program with one mode per first argument.
const PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

static struct sockaddr_storage last;
static socklen_t last_len;

static int open_to(const char *host, const char *port, int nonblocking, int *rc, int *err) {
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST;
    int e = getaddrinfo(host, port, &hints, &res);
    if (e != 0) { printf("getaddrinfo %s\n", gai_strerror(e)); exit(2); }
    int fd = socket(res->ai_family, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    memcpy(&last, res->ai_addr, res->ai_addrlen);
    last_len = res->ai_addrlen;
    *rc = connect(fd, res->ai_addr, res->ai_addrlen);
    *err = *rc == 0 ? 0 : errno;
    freeaddrinfo(res);
    return fd;
}

static void echo(int fd, const char *word) {
    char buf[64] = {0};
    dprintf(fd, "%s\n", word);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n <= 0) { printf("read failed\n"); exit(3); }
    printf("echo %s", buf);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *mode = argv[1];
    int rc, err;
    if (!strcmp(mode, "connect")) {
        int fd = open_to(argv[2], argv[3], 0, &rc, &err);
        if (rc != 0) { printf("errno %d\n", err); return 0; }
        printf("connected\n");
        echo(fd, "static");
    } else if (!strcmp(mode, "nonblock")) {
        int fd = open_to(argv[2], argv[3], 1, &rc, &err);
        printf("rc %d errno %d\n", rc, err);
        if (rc != 0 && err != EINPROGRESS) return 0;
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        if (poll(&p, 1, 20000) != 1) { printf("poll timed out\n"); return 1; }
        int so = -1; socklen_t len = sizeof so;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &len);
        printf("so_error %d\n", so);
        if (so != 0) return 0;
        /* Asking again, as programs that poll a connect do: connected. */
        int again = connect(fd, (struct sockaddr *)&last, last_len);
        printf("again %s\n", again == 0 || errno == EISCONN ? "connected" : strerror(errno));
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        echo(fd, "nonblocking");
    } else if (!strcmp(mode, "daemon")) {
        if (fork() != 0) return 0;            /* the program ends at once */
        setsid();
        if (fork() != 0) _exit(0);            /* the grandchild is orphaned */
        usleep(500000);
        int fd = open_to(argv[2], argv[3], 0, &rc, &err);
        FILE *out = fopen(argv[4], "w");
        char buf[64] = {0};
        if (rc == 0) {
            dprintf(fd, "daemon\n");
            read(fd, buf, sizeof buf - 1);
        }
        fprintf(out, "rc %d echo %s", rc, buf);
        fclose(out);
    } else if (!strcmp(mode, "uring")) {
        char params[120] = {0};
        long r = syscall(SYS_io_uring_setup, 1, params);
        printf("io_uring_setup %ld errno %d\n", r, r < 0 ? errno : 0);
    } else if (!strcmp(mode, "exit")) {
        return atoi(argv[2]);
    } else if (!strcmp(mode, "signal")) {
        raise(atoi(argv[2]));
    } else if (!strcmp(mode, "fastopen") || !strcmp(mode, "fastopenmsg")) {
        /* A TCP Fast Open connect inside the first send, by sendto or by sendmsg. */
        struct addrinfo hints = {0}, *res;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_NUMERICHOST;
        getaddrinfo(argv[2], argv[3], &hints, &res);
        int fd = socket(res->ai_family, SOCK_STREAM, 0);
        char word[] = "fastopen\n";
        ssize_t sent;
        if (!strcmp(mode, "fastopen")) {
            sent = sendto(fd, word, 9, MSG_FASTOPEN, res->ai_addr, res->ai_addrlen);
        } else {
            struct iovec iov = { word, 9 };
            struct msghdr msg = {0};
            msg.msg_name = res->ai_addr;
            msg.msg_namelen = res->ai_addrlen;
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            sent = sendmsg(fd, &msg, MSG_FASTOPEN);
        }
        if (sent != 9) { printf("sent %zd errno %d\n", sent, errno); return 0; }
        char buf[64] = {0};
        read(fd, buf, sizeof buf - 1);
        printf("echo %s", buf);
        } else if (!strcmp(mode, "biglen")) {
        /* The kernel takes addrlen as an int: the upper half of the register is not
           part of it. */
        int fd = open_to(argv[2], argv[3], 0, &rc, &err);
        close(fd);
        fd = socket(last.ss_family, SOCK_STREAM, 0);
        long r = syscall(SYS_connect, fd, &last, 0x100000000L | last_len);
        if (r != 0) { printf("errno %d\n", errno); return 0; }
        echo(fd, "biglen");
    } else if (!strcmp(mode, "mmsg")) {
        struct addrinfo hints = {0}, *res;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_NUMERICHOST;
        getaddrinfo(argv[2], argv[3], &hints, &res);
        int fd = socket(res->ai_family, SOCK_STREAM, 0);
        struct iovec iov = { "x\n", 2 };
        struct mmsghdr m = {0};
        m.msg_hdr.msg_name = res->ai_addr;
        m.msg_hdr.msg_namelen = res->ai_addrlen;
        m.msg_hdr.msg_iov = &iov;
        m.msg_hdr.msg_iovlen = 1;
        int r = sendmmsg(fd, &m, 1, MSG_FASTOPEN);
        printf("sendmmsg %d errno %d\n", r, r < 0 ? errno : 0);
        } else if (!strcmp(mode, "retry")) {
        /* A refused connect tried again on the same socket: refused again, never
           "already connected". */
        int fd = open_to(argv[2], argv[3], 0, &rc, &err);
        int again = connect(fd, (struct sockaddr *)&last, last_len);
        printf("first %d second %d\n", err, again == 0 ? 0 : errno);
    } else if (!strcmp(mode, "unixrel")) {
        /* A Unix socket by a path relative to the program's own directory. */
        struct sockaddr_un u = {0};
        u.sun_family = AF_UNIX;
        strncpy(u.sun_path, argv[3], sizeof u.sun_path - 1);
        if (chdir(argv[2]) != 0) { printf("chdir %d\n", errno); return 0; }
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        int r = connect(fd, (struct sockaddr *)&u, sizeof u);
        printf("unix %d\n", r == 0 ? 0 : errno);
    } else if (!strcmp(mode, "linger")) {
        /* Leaves a process behind that would sleep for a minute. */
        if (fork() == 0) {
            setsid();
            sleep(60);
            _exit(0);
        }
        return 3;
    } else if (!strcmp(mode, "sleep")) {
        printf("sleeping\n");
        sleep(30);
    }
    return 0;
}
"#;

fn static_program(site: &Site) -> PathBuf {
    if !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        panic!("a static libc is needed: apt-get install libc6-dev (scripts/test does, as root)");
    }
    compile_c(site, "static-client", PROGRAM, &["-static", "-O1", "-w"])
}

fn host_port(addr: SocketAddr) -> (String, String) {
    (addr.ip().to_string(), addr.port().to_string())
}

fn run_static(tunnel: &Tunnel, program: &PathBuf, args: &[&str]) -> (Option<i32>, String, String) {
    output_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .arg("--")
            .arg(program)
            .args(args),
        LIMIT,
    )
}

#[test]
fn a_static_programs_routed_connects_get_the_far_sides_real_answers() {
    let echo = echo_server("127.0.0.1");
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let denied = echo_server("127.0.0.3");
    let direct = echo_server("127.0.0.4");
    let (echo_s, closed_s, denied_s) = (echo.to_string(), closed.to_string(), denied.to_string());
    let tunnel = Tunnel::start_routed(
        &allow_alice(&[&echo_s, &closed_s]),
        &[],
        &[&echo_s, &closed_s, &denied_s],
    )
    .expect("tunnel");
    let program = static_program(&tunnel.site);

    // Blocking, routed: through the agent, and the echo comes back.
    let before = tunnel.streams_seen();
    let (host, port) = host_port(echo);
    let (code, out, err) = run_static(&tunnel, &program, &["connect", &host, &port]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "connected\necho static\n", "{err}");
    assert_eq!(
        tunnel.streams_seen(),
        before + 1,
        "not carried by the tunnel"
    );

    // Blocking, routed, far port closed: the far side's ECONNREFUSED; denied by the
    // gateway's policy: EACCES (not a local refusal).
    let (host, port) = host_port(closed);
    let (_, out, err) = run_static(&tunnel, &program, &["connect", &host, &port]);
    assert_eq!(out, format!("errno {}\n", nix::libc::ECONNREFUSED), "{err}");
    let (host, port) = host_port(denied);
    let (_, out, err) = run_static(&tunnel, &program, &["connect", &host, &port]);
    assert_eq!(out, format!("errno {}\n", nix::libc::EACCES), "{err}");

    // Non-blocking, routed: EINPROGRESS, then writable with SO_ERROR 0 and the echo;
    // refused: the connect's own errno, never a socket that looks connected.
    let (host, port) = host_port(echo);
    let (_, out, err) = run_static(&tunnel, &program, &["nonblock", &host, &port]);
    assert_eq!(
        out,
        format!(
            "rc -1 errno {}\nso_error 0\nagain connected\necho nonblocking\n",
            nix::libc::EINPROGRESS
        ),
        "{err}"
    );
    let (host, port) = host_port(closed);
    let (_, out, err) = run_static(&tunnel, &program, &["nonblock", &host, &port]);
    assert_eq!(
        out,
        format!("rc -1 errno {}\n", nix::libc::ECONNREFUSED),
        "{err}"
    );

    // TCP Fast Open sends, by sendto and by sendmsg: through the tunnel too.
    let (host, port) = host_port(echo);
    for mode in ["fastopen", "fastopenmsg"] {
        let before = tunnel.streams_seen();
        let (_, out, err) = run_static(&tunnel, &program, &[mode, &host, &port]);
        assert_eq!(out, "echo fastopen\n", "{mode}: {err}");
        assert_eq!(tunnel.streams_seen(), before + 1, "{mode} went direct");
    }

    // An addrlen with bits above its 32 (the kernel reads an int) is routed as the
    // kernel reads it; Fast Open inside sendmmsg is refused, never sent direct.
    let (host, port) = host_port(echo);
    let before = tunnel.streams_seen();
    let (_, out, err) = run_static(&tunnel, &program, &["biglen", &host, &port]);
    assert_eq!(out, "echo biglen\n", "{err}");
    assert_eq!(tunnel.streams_seen(), before + 2);
    let (_, out, err) = run_static(&tunnel, &program, &["mmsg", &host, &port]);
    assert_eq!(
        out,
        format!("sendmmsg -1 errno {}\n", nix::libc::EOPNOTSUPP),
        "{err}"
    );

    // A script that runs the static program: supervised too (the shell starts it).
    let script = tunnel.site.path("job.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} connect {host} {port}\n",
            program.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let before = tunnel.streams_seen();
    let (code, out, err) = run_static(&tunnel, &script, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "connected\necho static\n", "{err}");
    assert_eq!(
        tunnel.streams_seen(),
        before + 1,
        "the script's static program went direct"
    );

    // Through a launcher (timeout): supervised too.
    let before = tunnel.streams_seen();
    let (code, out, err) = output_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .args(["--", "timeout", "30"])
            .arg(&program)
            .args(["connect", &host, &port]),
        LIMIT,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "connected\necho static\n", "{err}");
    assert_eq!(
        tunnel.streams_seen(),
        before + 1,
        "timeout's static program went direct"
    );

    // A refused connect tried again: refused again (a new attempt), not EISCONN.
    let (host, port) = host_port(closed);
    let (_, out, err) = run_static(&tunnel, &program, &["retry", &host, &port]);
    let refused = nix::libc::ECONNREFUSED;
    assert_eq!(out, format!("first {refused} second {refused}\n"), "{err}");

    // A Unix socket by a relative path: looked up in the program's directory, as the
    // program would, not in tunnel-run's.
    let dir = tunnel.site.path("unix-dir");
    std::fs::create_dir_all(&dir).expect("dir");
    let _listener = std::os::unix::net::UnixListener::bind(dir.join("s")).expect("unix listener");
    let (_, out, err) = run_static(
        &tunnel,
        &program,
        &["unixrel", dir.to_str().expect("path"), "s"],
    );
    assert_eq!(out, "unix 0\n", "{err}");

    // Not routed: direct and untouched.
    let before = tunnel.streams_seen();
    let (host, port) = host_port(direct);
    let (_, out, err) = run_static(&tunnel, &program, &["connect", &host, &port]);
    assert_eq!(out, "connected\necho static\n", "{err}");
    assert_eq!(
        tunnel.streams_seen(),
        before,
        "an unrouted connect went through the tunnel"
    );

    // The program's exit status is tunnel-run's; io_uring is refused, so programs fall
    // back to ordinary system calls the filter sees.
    let (code, _, _) = run_static(&tunnel, &program, &["exit", "7"]);
    assert_eq!(code, Some(7));
    let status = Command::new(bin("tunnel-run"))
        .arg("--config")
        .arg(&tunnel.agent.config)
        .arg("--")
        .arg(&program)
        .args(["signal", "15"])
        .status()
        .expect("tunnel-run");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(15),
        "{status:?}"
    );
    // SIGTERM to tunnel-run reaches the program, which ends of it, as tunnel-run then.
    let mut sleeper = Command::new(bin("tunnel-run"))
        .arg("--config")
        .arg(&tunnel.agent.config)
        .arg("--")
        .arg(&program)
        .arg("sleep")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tunnel-run");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sleeper.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("sleeping");
    assert_eq!(line, "sleeping\n");
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleeper.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = sleeper.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(15),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let (_, out, err) = run_static(&tunnel, &program, &["uring"]);
    assert_eq!(
        out,
        format!("io_uring_setup -1 errno {}\n", nix::libc::ENOSYS),
        "{err}"
    );
}

#[test]
fn a_daemonised_grandchild_stays_supervised_and_tunnel_run_waits_for_it() {
    let echo = echo_server("127.0.0.1");
    let echo_s = echo.to_string();
    let tunnel = Tunnel::start_routed(&allow_alice(&[&echo_s]), &[], &[&echo_s]).expect("tunnel");
    let program = static_program(&tunnel.site);
    let result = tunnel.site.path("daemon.out");
    let (host, port) = host_port(echo);
    let before = tunnel.streams_seen();
    let started = Instant::now();
    let (code, out, err) = run_static(
        &tunnel,
        &program,
        &["daemon", &host, &port, result.to_str().expect("path")],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    // tunnel-run returned only once the grandchild (which waits 0.5 s) was done.
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(&result).expect("the grandchild's result"),
        "rc 0 echo daemon\n"
    );
    assert_eq!(
        tunnel.streams_seen(),
        before + 1,
        "the grandchild's connect was not carried"
    );

    // A process left behind keeps tunnel-run, which says so; SIGTERM then ends it, and
    // tunnel-run exits with the program's status.
    let mut lingering = Command::new(bin("tunnel-run"))
        .arg("--config")
        .arg(&tunnel.agent.config)
        .arg("--")
        .arg(&program)
        .arg("linger")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tunnel-run");
    let mut stderr = std::io::BufReader::new(lingering.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).expect("the note");
    assert!(line.contains("left behind"), "{line}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lingering.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = wait_for(Duration::from_secs(10), "tunnel-run to end", || {
        lingering.try_wait().ok().flatten()
    })
    .expect("tunnel-run ended");
    assert_eq!(status.code(), Some(3), "{status:?}");

    // A background job of a shell ignores SIGINT; Ctrl-C (SIGINT to tunnel-run) still
    // ends it, with SIGTERM.
    let mut job = Command::new(bin("tunnel-run"))
        .arg("--config")
        .arg(&tunnel.agent.config)
        .args(["--", "sh", "-c", "sleep 60 & echo started"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tunnel-run");
    let mut stderr = std::io::BufReader::new(job.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).expect("the note");
    assert!(line.contains("left behind"), "{line}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(job.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("kill");
    let status = wait_for(Duration::from_secs(10), "tunnel-run to end", || {
        job.try_wait().ok().flatten()
    })
    .expect("tunnel-run ended after Ctrl-C");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_preloaded_program_under_the_supervisor_makes_one_stream_per_connection() {
    let echo = echo_server("127.0.0.1");
    let echo_s = echo.to_string();
    // Routes that cover the agent's own loopback listener too.
    let tunnel =
        Tunnel::start_routed(&allow_alice(&[&echo_s]), &[], &["127.0.0.0/8"]).expect("tunnel");
    let script = format!(
        "import socket\nfor i in range(3):\n    s = socket.create_connection(('127.0.0.1', {}), timeout=10)\n    s.sendall(b'py\\n')\n    print(s.recv(100).decode().strip())\n    s.close()\n",
        echo.port()
    );
    let before = tunnel.streams_seen();
    let out = stdout_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .arg("--seccomp")
            .args(["--", "python3", "-c", &script]),
        LIMIT,
    );
    assert_eq!(out, "py\npy\npy\n");
    assert_eq!(tunnel.streams_seen(), before + 3);

    // A tunnel-run inside a supervised program leaves it to the outer supervisor: one
    // stream, as before.
    let program = static_program(&tunnel.site);
    let (host, port) = host_port(echo);
    let before = tunnel.streams_seen();
    let (code, out, err) = output_within(
        Command::new(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .arg("--seccomp")
            .arg("--")
            .arg(bin("tunnel-run"))
            .arg("--config")
            .arg(&tunnel.agent.config)
            .arg("--")
            .arg(&program)
            .args(["connect", &host, &port]),
        LIMIT,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "connected\necho static\n", "{err}");
    assert_eq!(tunnel.streams_seen(), before + 1);
}
