//! `[[forward]]` ports: a local listener whose every connection is carried to one fixed
//! destination, for programs that cannot be preloaded.
//!
//! Without `allow_users`/`allow_groups` every local user may use a port (as with
//! `ssh -L`). With them, the kernel says whose the connecting socket is (sock_diag) and
//! anyone else's connection is reset before anything is carried.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::unistd::{Gid, Group, Uid, User};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};
use tunnel_proto::config::{Forward, LocalUsers};

use crate::Agent;
use crate::carry::carry;
use tunnel_transport::plumbing::{Shutdown, accept_until};

/// The users a forward port admits, resolved from the names in the config.
#[derive(Debug, Clone, Default)]
pub struct AllowedUsers {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl AllowedUsers {
    /// Resolves user and group names (or numeric ids); `key` names the config entry.
    pub fn resolve(names: &LocalUsers, key: &str) -> Result<AllowedUsers> {
        let mut allowed = AllowedUsers::default();
        for user in &names.users {
            let uid = match user.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => User::from_name(user)
                    .with_context(|| format!("{key}.allow_users: looking up `{user}`"))?
                    .with_context(|| {
                        format!("{key}.allow_users: no user `{user}` on this machine")
                    })?
                    .uid
                    .as_raw(),
            };
            allowed.uids.push(uid);
        }
        for group in &names.groups {
            let gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(group)
                    .with_context(|| format!("{key}.allow_groups: looking up `{group}`"))?
                    .with_context(|| {
                        format!("{key}.allow_groups: no group `{group}` on this machine")
                    })?
                    .gid
                    .as_raw(),
            };
            allowed.gids.push(gid);
        }
        Ok(allowed)
    }

    /// True when `uid` is named, or a member (primary or supplementary) of a named group.
    pub fn admits(&self, uid: u32) -> bool {
        if self.uids.contains(&uid) {
            return true;
        }
        if self.gids.is_empty() {
            return false;
        }
        let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
            return false;
        };
        if self.gids.contains(&user.gid.as_raw()) {
            return true;
        }
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .unwrap_or_default()
            .iter()
            .any(|g: &Gid| self.gids.contains(&g.as_raw()))
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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

pub async fn serve(
    agent: Arc<Agent>,
    listener: TcpListener,
    forward: Forward,
    allowed: Option<AllowedUsers>,
    shutdown: Shutdown,
) {
    let bound = listener
        .local_addr()
        .map_or_else(|_| forward.listen.to_string(), |a| a.to_string());
    info!("forward {bound} -> {} via {}", forward.to, forward.via);
    let what = format!("forward {bound}");
    accept_until(
        &what,
        shutdown,
        || listener.accept(),
        |(tcp, peer)| {
            if let Some(allowed) = &allowed {
                let owner = tcp
                    .local_addr()
                    .and_then(|ours| agent.socket_owners.uid_of_peer(peer, ours));
                let admitted = matches!(owner, Ok(Some(uid)) if allowed.admits(uid));
                if !admitted {
                    warn!(
                        %peer,
                        owner = ?owner.ok().flatten(),
                        "{what}: a user not in allow_users/allow_groups was refused"
                    );
                    tunnel_transport::splice::reset(tcp);
                    return;
                }
            }
            tokio::spawn(carry(
                agent.clone(),
                tcp,
                forward.to.clone(),
                forward.via.clone(),
                None,
            ));
        },
    )
    .await;
}
