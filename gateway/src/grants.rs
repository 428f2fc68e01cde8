//! The streams the gateway carries now, with what allowed each: so that a revocation,
//! an expiry or a new policy can take the right away from a stream already running.
//!
//! ```text
//!  stream connected ─▶ Grants::enter(connection, caller, target, addr) ─▶ splice_until(cut)
//!  revoke / expiry   ─▶ withdraw_connection(id, why) ─┐
//!  policy reload     ─▶ withdraw_where(denied)  ──────┴▶ cut fires: RST_STREAM to the
//!                                                        agent, RST to the destination
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tunnel_proto::Target;

/// What allowed one live stream.
#[derive(Debug)]
pub struct Grant {
    pub connection: u64,
    pub identity: String,
    pub target: Target,
    pub addr: SocketAddr,
    cut: Option<oneshot::Sender<String>>,
}

#[derive(Debug, Default)]
pub struct Grants {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Grant>>,
}

/// A stream's place among the grants; it leaves when dropped.
#[derive(Debug)]
pub struct Held {
    grants: Arc<Grants>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.grants.lock().remove(&self.id);
    }
}

impl Grants {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Grant>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a stream; the future yields the reason once its grant is withdrawn.
    pub fn enter(
        self: &Arc<Self>,
        connection: u64,
        identity: &str,
        target: &Target,
        addr: SocketAddr,
    ) -> (Held, impl Future<Output = String> + use<>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            id,
            Grant {
                connection,
                identity: identity.to_string(),
                target: target.clone(),
                addr,
                cut: Some(tx),
            },
        );
        let withdrawn = async move {
            match rx.await {
                Ok(why) => why,
                // Left without a withdrawal: never fires.
                Err(_) => std::future::pending().await,
            }
        };
        (
            Held {
                grants: self.clone(),
                id,
            },
            withdrawn,
        )
    }

    /// Withdraws every grant `denied` gives a reason for; returns how many.
    pub fn withdraw_where(&self, mut denied: impl FnMut(&Grant) -> Option<String>) -> usize {
        let mut live = self.lock();
        let mut count = 0;
        for grant in live.values_mut() {
            if grant.cut.is_none() {
                continue;
            }
            if let Some(why) = denied(grant)
                && let Some(cut) = grant.cut.take()
            {
                let _ = cut.send(why);
                count += 1;
            }
        }
        count
    }

    /// Withdraws every stream of one agent connection.
    pub fn withdraw_connection(&self, connection: u64, why: &str) -> usize {
        self.withdraw_where(|g| (g.connection == connection).then(|| why.to_string()))
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_withdrawal_reaches_only_its_streams() {
        let grants = Arc::new(Grants::default());
        let target = Target::parse("10.0.0.1:22").unwrap();
        let addr = "10.0.0.1:22".parse().unwrap();
        let (_a, cut_a) = grants.enter(1, "alice", &target, addr);
        let (_b, cut_b) = grants.enter(2, "bob", &target, addr);
        assert_eq!(grants.withdraw_connection(1, "revoked"), 1);
        assert_eq!(cut_a.await, "revoked");
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), cut_b).await;
        assert!(pending.is_err());
        assert_eq!(grants.count(), 2);
    }
}
