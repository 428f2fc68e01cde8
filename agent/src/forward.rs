//! `[[forward]]` ports: a local listener whose every connection is carried to one fixed
//! destination, for programs that cannot be preloaded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};
use tunnel_proto::config::Forward;

use crate::Agent;
use crate::carry::carry;

#[derive(Debug, Clone, Serialize)]
pub struct ForwardView {
    /// The address actually bound (a configured port 0 shows the port chosen).
    pub listen: String,
    pub to: String,
    pub via: String,
}

/// Binds every forward port before any is served, so a bad one stops start-up.
pub async fn bind_all(forwards: &[Forward]) -> Result<Vec<(TcpListener, Forward)>> {
    let mut bound = Vec::new();
    for (i, f) in forwards.iter().enumerate() {
        let listener = TcpListener::bind(f.listen).await.with_context(|| {
            format!(
                "forward[{i}]: cannot listen on {} (in use? change listen)",
                f.listen
            )
        })?;
        bound.push((listener, f.clone()));
    }
    Ok(bound)
}

pub fn view(listener: &TcpListener, forward: &Forward) -> ForwardView {
    ForwardView {
        listen: listener.local_addr().map_or_else(
            |_| forward.listen.to_string(),
            |a: SocketAddr| a.to_string(),
        ),
        to: forward.to.to_string(),
        via: forward.via.clone(),
    }
}

pub async fn serve(agent: Arc<Agent>, listener: TcpListener, forward: Forward) {
    info!(
        "forward {} -> {} via {}",
        listener
            .local_addr()
            .map_or_else(|_| forward.listen.to_string(), |a| a.to_string()),
        forward.to,
        forward.via
    );
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(carry(
                    agent.clone(),
                    tcp,
                    forward.to.clone(),
                    forward.via.clone(),
                    None,
                ));
            }
            Err(e) => {
                warn!("forward {}: accept failed: {e}", forward.listen);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
