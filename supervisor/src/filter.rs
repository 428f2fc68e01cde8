//! The seccomp filter the supervised program runs under, as classic BPF: which system
//! calls stop for the supervisor's answer, which fail at once, and the rest, which run
//! untouched and never leave the kernel.

/// The filter and the flags it is installed with.
#[derive(Debug, Clone)]
pub struct Filter {
    pub instructions: Vec<libc::sock_filter>,
    pub flags: libc::c_ulong,
}

/// What the filter does with the supervised program's system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// `io_uring_setup` fails with ENOSYS (the program falls back to ordinary system
    /// calls): a connect made through io_uring would not pass the filter.
    pub refuse_io_uring: bool,
}

/// x86-64's audit architecture (`AUDIT_ARCH_X86_64`).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// System call numbers at or above this are the x32 ABI's.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const BPF_JSET_K: u16 = 0x45;

/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;

/// The system calls that always stop for the supervisor: `connect` (the routes) and
/// `getpeername` (a redirected socket shows the peer the program asked for).
pub const NOTIFIED: [i64; 2] = [libc::SYS_connect, libc::SYS_getpeername];

/// The system calls that stop only when their argument 4, an address, is given: a
/// `sendto` with a destination (a resolver's query to its nameserver) and a `recvfrom`
/// that asks who sent (the resolver checks its answer came from the nameserver). Plain
/// sends and receives on connected sockets, the data path, never stop.
pub const NOTIFIED_WITH_ADDRESS: [i64; 2] = [libc::SYS_sendto, libc::SYS_recvfrom];

/// `sendmsg` stops only with `MSG_FASTOPEN` in its flags (argument 2): a TCP Fast Open
/// connect inside a send.
const OFFSET_ARG2_LOW: u32 = 16 + 2 * 8;
/// `sendmmsg`'s flags are argument 3.
const OFFSET_ARG3_LOW: u32 = 16 + 3 * 8;

/// Offsets of argument 4's two 32-bit halves in `struct seccomp_data` (little-endian).
const OFFSET_ARG4_LOW: u32 = 16 + 4 * 8;
const OFFSET_ARG4_HIGH: u32 = OFFSET_ARG4_LOW + 4;

fn statement(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

impl Rules {
    /// The filter for these rules. Other architectures' and the x32 ABI's system calls
    /// kill the process: their numbers mean other calls, which this filter cannot tell
    /// apart, and a connect through them would pass unseen.
    pub fn filter(self) -> Filter {
        let mut program = vec![
            statement(BPF_LD_W_ABS, OFFSET_ARCH),
            jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            statement(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
            statement(BPF_LD_W_ABS, OFFSET_NR),
            jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
            statement(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        ];
        let on = |program: &mut Vec<libc::sock_filter>, nr: i64, action: u32| {
            program.push(jump(BPF_JEQ_K, nr as u32, 0, 1));
            program.push(statement(BPF_RET_K, action));
        };
        for nr in NOTIFIED {
            on(&mut program, nr, libc::SECCOMP_RET_USER_NOTIF);
        }
        for nr in NOTIFIED_WITH_ADDRESS {
            program.extend([
                jump(BPF_JEQ_K, nr as u32, 0, 6),
                statement(BPF_LD_W_ABS, OFFSET_ARG4_LOW),
                jump(BPF_JEQ_K, 0, 0, 3),
                statement(BPF_LD_W_ABS, OFFSET_ARG4_HIGH),
                jump(BPF_JEQ_K, 0, 0, 1),
                statement(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
                statement(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF),
            ]);
        }
        program.extend([
            jump(BPF_JEQ_K, libc::SYS_sendmsg as u32, 0, 4),
            statement(BPF_LD_W_ABS, OFFSET_ARG2_LOW),
            jump(BPF_JSET_K, libc::MSG_FASTOPEN as u32, 0, 1),
            statement(BPF_RET_K, libc::SECCOMP_RET_USER_NOTIF),
            statement(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        ]);
        // Fast Open connects inside sendmmsg: refused (EOPNOTSUPP), as one call could
        // connect several sockets; programs send the first message with sendmsg.
        program.extend([
            jump(BPF_JEQ_K, libc::SYS_sendmmsg as u32, 0, 4),
            statement(BPF_LD_W_ABS, OFFSET_ARG3_LOW),
            jump(BPF_JSET_K, libc::MSG_FASTOPEN as u32, 0, 1),
            statement(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::EOPNOTSUPP as u32),
            statement(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        ]);
        if self.refuse_io_uring {
            on(
                &mut program,
                libc::SYS_io_uring_setup,
                libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            );
        }
        program.push(statement(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
        Filter {
            instructions: program,
            // A notified call is not interrupted by ordinary signals once the supervisor
            // has read it (Go's SIGURG preemption arrives every ~10 ms): it waits for our
            // answer, and only a fatal signal ends it.
            flags: libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter on one system call, as the kernel would.
    fn run(filter: &Filter, arch: u32, nr: u32) -> u32 {
        run_with(filter, arch, nr, 0)
    }

    fn run_with(filter: &Filter, arch: u32, nr: u32, arg4: u64) -> u32 {
        run_args(filter, arch, nr, 0, arg4)
    }

    fn run_args(filter: &Filter, arch: u32, nr: u32, arg2: u64, arg4: u64) -> u32 {
        let mut pc = 0usize;
        let mut accumulator = 0u32;
        loop {
            let i = filter.instructions[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    accumulator = match i.k {
                        OFFSET_ARCH => arch,
                        OFFSET_NR => nr,
                        OFFSET_ARG2_LOW | OFFSET_ARG3_LOW => arg2 as u32,
                        OFFSET_ARG4_LOW => arg4 as u32,
                        OFFSET_ARG4_HIGH => (arg4 >> 32) as u32,
                        other => panic!("unexpected load at {other}"),
                    };
                    pc += 1;
                }
                BPF_JEQ_K => pc += 1 + usize::from(if accumulator == i.k { i.jt } else { i.jf }),
                BPF_JGE_K => pc += 1 + usize::from(if accumulator >= i.k { i.jt } else { i.jf }),
                BPF_JSET_K => {
                    pc += 1 + usize::from(if accumulator & i.k != 0 { i.jt } else { i.jf })
                }
                BPF_RET_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    #[test]
    fn connect_stops_io_uring_fails_the_rest_runs() {
        let filter = Rules {
            refuse_io_uring: true,
        }
        .filter();
        let x86_64 = AUDIT_ARCH_X86_64;
        assert_eq!(
            run(&filter, x86_64, libc::SYS_connect as u32),
            libc::SECCOMP_RET_USER_NOTIF
        );
        assert_eq!(
            run(&filter, x86_64, libc::SYS_io_uring_setup as u32),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_sendto,
            libc::SYS_socket,
        ] {
            assert_eq!(run(&filter, x86_64, nr as u32), libc::SECCOMP_RET_ALLOW);
        }
        assert_eq!(
            run(&filter, x86_64, libc::SYS_getpeername as u32),
            libc::SECCOMP_RET_USER_NOTIF
        );
        // sendmsg stops only for a Fast Open connect.
        let sendmsg = libc::SYS_sendmsg as u32;
        assert_eq!(
            run_args(&filter, x86_64, sendmsg, 0, 0),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run_args(&filter, x86_64, sendmsg, libc::MSG_NOSIGNAL as u64, 0),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run_args(&filter, x86_64, sendmsg, libc::MSG_FASTOPEN as u64, 0),
            libc::SECCOMP_RET_USER_NOTIF
        );
        let sendmmsg = libc::SYS_sendmmsg as u32;
        assert_eq!(
            run_args(&filter, x86_64, sendmmsg, 0, 0),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run_args(&filter, x86_64, sendmmsg, libc::MSG_FASTOPEN as u64, 0),
            libc::SECCOMP_RET_ERRNO | libc::EOPNOTSUPP as u32
        );
        // sendto and recvfrom stop only with an address, in either half of the pointer.
        for nr in [libc::SYS_sendto, libc::SYS_recvfrom] {
            assert_eq!(
                run_with(&filter, x86_64, nr as u32, 0),
                libc::SECCOMP_RET_ALLOW
            );
            for address in [0x7ffd_1234_5678u64, 0x1000, 0x7fff_0000_0000] {
                assert_eq!(
                    run_with(&filter, x86_64, nr as u32, address),
                    libc::SECCOMP_RET_USER_NOTIF
                );
            }
        }
        // i386's socketcall and the x32 ABI's connect.
        assert_eq!(
            run(&filter, 0x4000_0003, 102),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            run(&filter, x86_64, X32_SYSCALL_BIT | 42),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        let allowed = Rules {
            refuse_io_uring: false,
        }
        .filter();
        assert_eq!(
            run(&allowed, x86_64, libc::SYS_io_uring_setup as u32),
            libc::SECCOMP_RET_ALLOW
        );
    }
}
