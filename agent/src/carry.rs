//! From an accepted local socket to a carried connection: the one path that forward
//! ports (and, later, preloaded programs) share.
//!
//! ```text
//! accepted TcpStream ─▶ pool.open(CONNECT target) ─▶ splice ─┬─ both ends closed: done
//!                         │ (first bytes go out at once)      └─ abort: RST both ways
//!                         └─ answer ≠ 200: reset the socket, log and record the class
//! ```

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, warn};
use tunnel_proto::Target;
use tunnel_proto::connect::{ERROR_HEADER, decode_outcome};
use tunnel_proto::local::Refusal;
use tunnel_transport::splice::{self, Abort};

use crate::Agent;

/// The gateway's answer for a program that waits for its connect's result: `None` for
/// success, else why not.
pub type Verdict = Option<Refusal>;

/// Where a registered connection's verdict goes: the registration's own request (a
/// blocking connect) or the table of kept answers (a non-blocking one). Dropped
/// unanswered, its readers learn that no answer will come.
pub type VerdictSender = watch::Sender<Option<Verdict>>;

fn tell(verdict: &mut Option<VerdictSender>, value: Verdict) {
    if let Some(v) = verdict.take() {
        v.send_replace(Some(value));
    }
}

pub async fn carry(
    agent: Arc<Agent>,
    tcp: TcpStream,
    target: Target,
    via: String,
    mut verdict: Option<VerdictSender>,
) {
    tunnel_transport::tune_carried_tcp(&tcp);
    let entry = agent.streams.register(target.to_string(), via.clone());
    let Some(pool) = agent.pool(&via) else {
        warn!(destination = %target, "no gateway named `{via}`");
        tell(&mut verdict, Some(Refusal::Unavailable));
        splice::reset(tcp);
        entry.finish(&Err(Abort::Unavailable(format!(
            "no gateway named `{via}`"
        ))));
        return;
    };
    let opened = match pool.open(&target).await {
        Ok(opened) => opened,
        Err(e) => {
            warn!(destination = %target, gateway = %via, "{e:#}");
            tell(&mut verdict, Some(Refusal::Unavailable));
            splice::reset(tcp);
            entry.finish(&Err(Abort::Unavailable(format!("{e:#}"))));
            return;
        }
    };
    let response = opened.response;
    let answer = async {
        let answered = async {
            let response = response.await.map_err(Abort::Tunnel)?;
            let header = response.headers().get(ERROR_HEADER).map(|v| v.as_bytes());
            decode_outcome(response.status().as_u16(), header).map_err(Abort::Refused)?;
            Ok(response.into_body())
        }
        .await;
        tell(&mut verdict, answered.as_ref().err().map(Abort::refusal));
        answered
    };
    let result = splice::splice(tcp, opened.send, answer, entry.stats(), &opened.health).await;
    match &result {
        Ok(()) => debug!(destination = %target, gateway = %via, "closed"),
        Err(abort @ Abort::Refused(_)) => {
            warn!(destination = %target, gateway = %via, "{}", abort.class())
        }
        Err(abort) => warn!(destination = %target, gateway = %via, "aborted: {abort}"),
    }
    entry.finish(&result);
}
