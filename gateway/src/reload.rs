//! Changes that reach a running gateway without a restart, and the live streams they
//! concern.
//!
//! ```text
//!  gateway.toml changed / SIGHUP ─▶ parse ─ invalid: error logged, old policy kept
//!                                         └ valid: new policy; every live stream asked
//!                                           again (Policy::still_allows), denied ones reset
//!  state_dir changed / `reload` ──▶ revocations (connections watch them: revoked ones
//!                                   are closed) and enrolled identities' groups
//! ```
//!
//! Files are polled twice a second (a replica learns of another's revocation that
//! way); `tunnel-gateway revoke` also asks the local gateway at once over its control
//! socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{error, info, warn};
use tunnel_proto::config::GatewayConfig;

use crate::policy::Policy;
use crate::server::Gateway;

const POLL: Duration = Duration::from_millis(500);

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Watches `config_path` and the state directory until the process ends; `now` asks for
/// a reload at once.
pub async fn run(gateway: Arc<Gateway>, config_path: PathBuf, now: Arc<Notify>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("SIGHUP cannot reload the policy: {e}");
            None
        }
    };
    let mut config_seen = modified(&config_path);
    let mut state_seen = gateway.state.changed_at();
    loop {
        let mut forced = false;
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = now.notified() => forced = true,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                info!("SIGHUP: reading {} again", config_path.display());
                config_seen = None;
            }
        }
        let config_now = modified(&config_path);
        if config_now != config_seen || forced {
            config_seen = config_now;
            policy(&gateway, &config_path);
        }
        let state_now = gateway.state.changed_at();
        if state_now != state_seen || forced {
            state_seen = state_now;
            state(&gateway);
        }
    }
}

/// Reads the policy again; keeps the old one when the file is not valid.
fn policy(gateway: &Gateway, path: &Path) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            error!("reading {}: {e}; the policy in force stays", path.display());
            return;
        }
    };
    let config = match GatewayConfig::parse(&text, path) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}\nthe policy in force stays until the file is valid");
            return;
        }
    };
    let old = &gateway.config;
    let settings = [
        ("listen", config.listen != old.listen),
        (
            "ca, ca_key",
            config.ca != old.ca || config.ca_key != old.ca_key,
        ),
        (
            "cert, key",
            config.cert != old.cert || config.key != old.key,
        ),
        ("state_dir", config.state_dir != old.state_dir),
        ("control", config.control != old.control),
        ("metrics", config.metrics != old.metrics),
        ("cert_ttl", config.cert_ttl != old.cert_ttl),
        (
            "recovery_window",
            config.recovery_window != old.recovery_window,
        ),
        (
            "timeouts",
            (
                config.connect_timeout,
                config.drain_timeout,
                config.handshake_timeout,
            ) != (
                old.connect_timeout,
                old.drain_timeout,
                old.handshake_timeout,
            ),
        ),
        (
            "ping_interval, ping_timeout",
            (config.ping_interval, config.ping_timeout) != (old.ping_interval, old.ping_timeout),
        ),
        (
            "limits",
            (
                config.max_streams_per_connection,
                config.max_handshakes,
                config.max_handshakes_per_source,
                config.max_connections_per_identity,
                config.max_streams_per_identity,
            ) != (
                old.max_streams_per_connection,
                old.max_handshakes,
                old.max_handshakes_per_source,
                old.max_connections_per_identity,
                old.max_streams_per_identity,
            ),
        ),
        (
            "log_summary_interval",
            config.log_summary_interval != old.log_summary_interval,
        ),
        ("[publish.*]", config.publications != old.publications),
        ("[callbacks]", config.callbacks != old.callbacks),
    ];
    let changed: Vec<&str> = settings
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(keys, _)| *keys)
        .collect();
    if !changed.is_empty() {
        warn!(
            "{}: {} changed; that takes effect at the next start (only [[allow]], [service.*] and [hosts] apply at once)",
            path.display(),
            changed.join("; ")
        );
    }
    let new = Policy::new(&config);
    if *gateway.policy() == new {
        return;
    }
    gateway.set_policy(new);
    let cut = recheck_streams(gateway, "the policy changed");
    info!(
        "{}: new policy in force; {cut} live streams it no longer allows were reset",
        path.display()
    );
}

/// Reads revocations and enrolled identities again.
fn state(gateway: &Gateway) {
    match gateway.state.revocations() {
        Ok(revocations) => {
            gateway.revocations.send_if_modified(|current| {
                let changed = **current != revocations;
                if changed {
                    info!(
                        "revocation list: {} identities, {} certificates",
                        revocations.identities.len(),
                        revocations.serials.len()
                    );
                    *current = Arc::new(revocations);
                }
                changed
            });
        }
        Err(e) => error!("reading the revocation list: {e:#}; the list in force stays"),
    }
    gateway.refresh_identities();
    // Groups may have changed with the identities: ask the policy again.
    recheck_streams(gateway, "the identity's groups changed");
}

/// Asks the policy in force about every live stream and resets those it no longer
/// allows, saying `what` changed; returns how many.
fn recheck_streams(gateway: &Gateway, what: &str) -> usize {
    let policy = gateway.policy();
    gateway.grants.withdraw_where(|grant| {
        policy
            .still_allows(&gateway.caller(&grant.identity), &grant.target, grant.addr)
            .err()
            .map(|why| format!("{what}: {why}"))
    })
}
