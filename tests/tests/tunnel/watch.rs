//! `status --watch` in a real terminal (tmux): redrawn with rates while a transfer runs,
//! and ended by q or Ctrl-C.

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tunnel_tests::*;

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        require("tmux", "tmux");
        Tmux {
            socket: format!("tunnel-watch-{}-{}", std::process::id(), free_port()),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]).env_remove("TMUX");
        c
    }

    /// Starts `shell` in a detached session `name` of a 160 × 60 terminal.
    fn start(&self, name: &str, shell: &str) {
        run_ok(self.command().args([
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "160",
            "-y",
            "60",
            shell,
        ]));
    }

    fn screen(&self, name: &str) -> String {
        let out = self
            .command()
            .args(["capture-pane", "-p", "-t", name])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, name: &str, keys: &str) {
        run_ok(self.command().args(["send-keys", "-t", name, keys]));
    }

    fn alive(&self, name: &str) -> bool {
        self.command()
            .args(["has-session", "-t", name])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").output();
    }
}

#[test]
fn status_watch_shows_rates_in_tmux_and_quits_on_q_and_ctrl_c() {
    let sink = hashing_sink();
    let tunnel = Tunnel::start(&allow_alice(&[&sink]), &[&sink]).expect("tunnel");
    // A steady upload (about 10 Mbit/s) through the forward port while we watch.
    let running = Arc::new(AtomicBool::new(true));
    let upload = {
        let running = running.clone();
        let mut conn = TcpStream::connect(tunnel.forward(0)).expect("forward");
        std::thread::spawn(move || {
            let chunk = vec![7u8; 64 * 1024];
            while running.load(Ordering::Relaxed) {
                if conn.write_all(&chunk).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let tmux = Tmux::new();
    let agent_watch = format!(
        "{} status --watch --config {}",
        bin("tunnel-agent").display(),
        tunnel.agent.config.display()
    );
    tmux.start("agent", &agent_watch);
    let screen = wait_for(
        Duration::from_secs(15),
        "rates on the agent's watch",
        || {
            let screen = tmux.screen("agent");
            let moving = screen
                .lines()
                .any(|l| l.contains(&sink) && (l.contains("Mbit/s") || l.contains("kbit/s")));
            (screen.contains("tunnel-agent status --watch") && moving).then_some(screen)
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", tmux.screen("agent")));
    assert!(screen.contains("per peer"), "{screen}");
    assert!(screen.contains("round trip"), "{screen}");
    tmux.keys("agent", "q");
    wait_for(Duration::from_secs(5), "the watch to end on q", || {
        (!tmux.alive("agent")).then_some(())
    })
    .expect("q quits");

    let gateway_watch = format!(
        "{} status --watch --config {}",
        bin("tunnel-gateway").display(),
        tunnel.gateway.config.display()
    );
    tmux.start("gateway", &gateway_watch);
    wait_for(Duration::from_secs(15), "the gateway's watch", || {
        let screen = tmux.screen("gateway");
        (screen.contains("tunnel-gateway status --watch") && screen.contains("alice")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", tmux.screen("gateway")));
    tmux.keys("gateway", "C-c");
    wait_for(Duration::from_secs(5), "the watch to end on Ctrl-C", || {
        (!tmux.alive("gateway")).then_some(())
    })
    .expect("Ctrl-C quits");
    running.store(false, Ordering::Relaxed);
    let _ = upload.join();
}
