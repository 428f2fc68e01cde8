//! The seccomp supervisor of `tunnel-run`: carries the routed connections of programs
//! that LD_PRELOAD cannot see (statically linked and Go programs, which make their own
//! system calls) through the agent, exactly as the preload library carries a dynamic
//! program's.
//!
//! ```text
//! tunnel-run ── fork ── child: no_new_privs, seccomp filter (connect → notify), exec
//!     │                         program ── connect(fd, dest) ── stops ──┐
//!     ◀──────────── listener fd (SCM_RIGHTS) ───────────────────────────┘
//!     │ read dest from the program's memory (once), still waiting?
//!     │ not routed / not internet ─▶ CONTINUE (the kernel runs it as made)
//!     │ routed ─▶ pidfd_getfd(fd) ─▶ REGISTER with the agent (socket passed)
//!     │           connect it to the agent's listener, wait for the verdict
//!     └─────────▶ answer: 0 | EINPROGRESS | the far side's errno
//! ```
//!
//! One concern per module: `filter` (the BPF program), `sys` (the kernel's edge, all
//! the `unsafe`), `agent` (the local protocol), `connect` (routing and the redirect),
//! `supervise` (the process's life: spawn, notifications, signals, reaping).

mod agent;
mod connect;
mod filter;
mod program;
mod resolver;
mod sockets_table;
mod supervise;
mod sys;
mod workers;

pub use agent::{AgentSocket, agent_socket};
pub use connect::Routes;
pub use filter::Rules;
pub use supervise::{Exit, Plan, SUPERVISED_ENV, check_machine, run};

impl Exit {
    /// Ends this process as the program ended.
    pub fn propagate(self) -> ! {
        match self {
            Exit::Code(code) => std::process::exit(code),
            Exit::Signal(signal) => sys::die_of(signal),
        }
    }
}
