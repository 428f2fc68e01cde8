//! Renewal of a `credential` the agent keeps itself: a fresh key and a new certificate
//! from the gateway at half the certificate's life, over a tunnel connection.
//!
//! ```text
//!            ┌──────── renewed: new key + certificate written, pool dials with them ─┐
//!            ▼                                                                       │
//!   Scheduled (half-life ± 5 %) ──time──▶ POST /v1/renew ─────────────────────────────┤
//!            ▲                               │ failed                                │
//!            │                               ▼                                       │
//!            │                           Retrying (full-jitter back-off) ─────────────┘
//!            │                               │ not_after passes
//!            │                               ▼
//!            └─────────────────────────  Expired (still retrying: the gateway renews an
//!                                         expired certificate within its recovery window)
//! ```
//!
//! Times are the gateway's: every answer carries its clock, and the offset from ours
//! is kept. Waiting is on the monotonic clock, woken at least every [`TICK`]; when the
//! wall clock moved differently (a suspend, a clock step), the wait is computed again.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};
use tunnel_proto::enrolment::{BACKDATE_SECS, RENEW_PATH, RefusalKind, Refused, RenewRequest};
use tunnel_transport::certs::utc;

use crate::certificate::{Certificate, rfc3339};
use crate::credential;
use crate::exchange::{self, Answer};
use crate::pool::Pool;

/// The longest the renewal task sleeps without looking at the clocks.
pub const TICK: Duration = Duration::from_secs(10);
/// Wall and monotonic clocks that moved apart by more than this mean the machine was
/// suspended or its clock was set.
const CLOCK_JUMP_SECS: f64 = 2.0;
/// Renewal comes at this part of the life, give or take [`JITTER`].
const HALF: f64 = 0.5;
const JITTER: f64 = 0.05;
/// Back-off after a failed renewal: from this, doubling, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Time allowed for one renewal, from waiting for a connection to the answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// A certificate's life: from issue (its not_before is backdated by
/// [`BACKDATE_SECS`]) to not_after.
pub fn lifetime_secs(not_before: i64, not_after: i64) -> i64 {
    not_after
        .saturating_sub(not_before.saturating_add(BACKDATE_SECS))
        .max(0)
}

/// When to renew, by the gateway's clock (seconds since 1970): half the life after
/// issue, moved by up to 5 % of the life either way as `jitter` (−1 to 1) says, so that
/// agents enrolled together do not renew together.
pub fn renewal_time(not_before: i64, not_after: i64, jitter: f64) -> f64 {
    let issued = not_before.saturating_add(BACKDATE_SECS) as f64;
    issued + lifetime_secs(not_before, not_after) as f64 * (HALF + JITTER * jitter.clamp(-1.0, 1.0))
}

/// The most a retry waits after `failures` failed renewals in a row, when the
/// certificate has `remaining` seconds left (by the gateway's clock): 1 s doubling, up
/// to 5 min or a quarter of what is left, whichever is less, but at least 1 s. An
/// expired certificate is retried at up to 5 min.
pub fn retry_ceiling(failures: u32, remaining: f64) -> Duration {
    let cap = retry_cap(remaining);
    let doubled = RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(20));
    doubled.min(cap)
}

/// The back-off's cap with `remaining` seconds of life left.
pub fn retry_cap(remaining: f64) -> Duration {
    if remaining <= 0.0 {
        return RETRY_MAX;
    }
    Duration::try_from_secs_f64(remaining / 4.0)
        .unwrap_or(RETRY_MAX)
        .clamp(RETRY_FIRST, RETRY_MAX)
}

/// A retry's pause: full jitter under the ceiling (`random` is 0 to 1), but not so
/// short that a failing gateway is asked in a tight loop.
pub fn retry_pause(failures: u32, remaining: f64, random: f64) -> Duration {
    retry_ceiling(failures, remaining)
        .mul_f64(random.clamp(0.0, 1.0))
        .max(Duration::from_millis(100))
}

/// True when the wall clock and the monotonic clock moved apart by more than
/// [`CLOCK_JUMP_SECS`] over the same wait.
pub fn clock_jumped(wall_elapsed: f64, monotonic_elapsed: Duration) -> bool {
    (wall_elapsed - monotonic_elapsed.as_secs_f64()).abs() > CLOCK_JUMP_SECS
}

/// A refusal that no retry will cure: only a new enrolment will.
fn needs_new_token(kind: RefusalKind) -> bool {
    matches!(
        kind,
        RefusalKind::TooLate
            | RefusalKind::Revoked
            | RefusalKind::RenewalEnded
            | RefusalKind::Superseded
    )
}

/// Where renewal stands.
///
/// ```text
///   Scheduled ──failed──▶ Retrying ──renewed──▶ Scheduled
///       │                    │
///       └──── not_after ─────┴──▶ Expired ──renewed──▶ Scheduled
/// ```
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// The next renewal is due at `at` (seconds since 1970, this machine's clock).
    Scheduled { at: f64 },
    /// The last `failures` attempts failed; the next is at `at`.
    Retrying {
        at: f64,
        failures: u32,
        error: String,
    },
    /// The certificate expired; attempts go on, the next at `at`.
    Expired { at: f64, error: Option<String> },
}

/// The name of a renewal state, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateName {
    Scheduled,
    Retrying,
    Expired,
    /// Separate `cert` and `key` files: the site replaces them, the agent does not.
    NotRenewed,
}

/// The renewal part of `tunnel-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewalView {
    pub state: StateName,
    /// RFC 3339.
    pub next_at: Option<String>,
    pub last_error: Option<String>,
    /// How far the gateway's clock is ahead of ours (seconds; negative: behind).
    pub clock_offset_secs: Option<f64>,
}

impl RenewalView {
    pub fn not_renewed() -> RenewalView {
        RenewalView {
            state: StateName::NotRenewed,
            next_at: None,
            last_error: None,
            clock_offset_secs: None,
        }
    }
}

/// Renewal of one gateway's credential.
pub struct Renewal {
    pool: Arc<Pool>,
    state: Mutex<State>,
    /// The gateway's clock minus ours, from its last answer.
    clock_offset: Mutex<f64>,
}

/// Why one renewal did not happen.
enum Failure {
    Refused(Refused),
    Failed(anyhow::Error),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Refused(refused) => {
                let kind = serde_json::to_value(refused.error)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let mut text = format!(
                    "the gateway refused renewal: {} ({kind})",
                    refused.message.trim()
                );
                if needs_new_token(refused.error) {
                    text.push_str(
                        "; a new token is needed: ask the gateway's operator for one and enrol again with `tunnel-agent enroll`",
                    );
                }
                text
            }
            Failure::Failed(e) => format!("{e:#}"),
        }
    }
}

impl Renewal {
    /// Starts renewing the credential of `pool`'s gateway.
    pub fn start(pool: Arc<Pool>) -> Arc<Renewal> {
        let renewal = Arc::new(Renewal {
            pool,
            state: Mutex::new(State::Scheduled { at: 0.0 }),
            clock_offset: Mutex::new(0.0),
        });
        tokio::spawn(renewal.clone().run());
        renewal
    }

    pub fn gateway(&self) -> &str {
        &self.pool.peer.name
    }

    fn offset(&self) -> f64 {
        *self
            .clock_offset
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The one way the state changes.
    fn set(&self, state: State) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    fn state(&self) -> State {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn view(&self) -> RenewalView {
        let moment = |at: f64| Some(rfc3339(at.round() as i64));
        let (state, next_at, last_error) = match self.state() {
            State::Scheduled { at } => (StateName::Scheduled, moment(at), None),
            State::Retrying { at, error, .. } => (StateName::Retrying, moment(at), Some(error)),
            State::Expired { at, error } => (StateName::Expired, moment(at), error),
        };
        RenewalView {
            state,
            next_at,
            last_error,
            clock_offset_secs: Some(self.offset()),
        }
    }

    /// Seconds `certificate` has left by the gateway's clock.
    fn remaining(&self, certificate: &Certificate) -> f64 {
        certificate.not_after() as f64 - (exchange::wall_now() + self.offset())
    }

    /// Logs, once per certificate, that it expired, and says so in the state.
    fn note_expiry(&self, certificate: &Certificate, reported: &mut Option<String>) {
        if self.remaining(certificate) >= 0.0 {
            return;
        }
        if reported.as_deref() != Some(certificate.serial()) {
            error!(
                gateway = %self.gateway(),
                "the credential for gateway {} expired at {}; trying to recover it by renewal",
                self.gateway(),
                utc(certificate.not_after())
            );
            *reported = Some(certificate.serial().to_string());
        }
        let next = match self.state() {
            State::Expired { .. } => return,
            State::Scheduled { at } => State::Expired { at, error: None },
            State::Retrying { at, error, .. } => State::Expired {
                at,
                error: Some(error),
            },
        };
        self.set(next);
    }

    async fn run(self: Arc<Self>) {
        let mut failures = 0u32;
        let mut last_error: Option<String> = None;
        let mut pause: Option<Duration> = None;
        let mut reported = None;
        let mut last_refused_for_good = false;
        loop {
            let certificate = self.pool.certificate();
            let at = match pause {
                Some(pause) => exchange::wall_now() + pause.as_secs_f64(),
                None => {
                    let jitter = fastrand::f64() * 2.0 - 1.0;
                    renewal_time(certificate.not_before(), certificate.not_after(), jitter)
                        - self.offset()
                }
            };
            self.set(match &last_error {
                None => State::Scheduled { at },
                Some(error) => State::Retrying {
                    at,
                    failures,
                    error: error.clone(),
                },
            });
            self.note_expiry(&certificate, &mut reported);
            // After a failure for want of a connection, a connection coming up is the
            // moment to try again, not the end of the back-off.
            let early = pause.is_some() && !last_refused_for_good;
            self.sleep_until(at, &certificate, &mut reported, early)
                .await;

            let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, self.renew(&certificate))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::Failed(anyhow!(
                        "no answer within {:.0}s",
                        ATTEMPT_TIMEOUT.as_secs_f64()
                    )))
                });
            match attempt {
                Ok(renewed) => {
                    info!(
                        gateway = %self.gateway(),
                        "renewed the certificate for gateway {}: serial {}, valid until {}",
                        self.gateway(),
                        renewed.serial(),
                        utc(renewed.not_after())
                    );
                    failures = 0;
                    last_error = None;
                    pause = None;
                    last_refused_for_good = false;
                }
                Err(failure) => {
                    failures = failures.saturating_add(1);
                    let remaining = self.remaining(&certificate);
                    let terminal =
                        matches!(&failure, Failure::Refused(r) if needs_new_token(r.error));
                    let next = if terminal {
                        retry_cap(remaining)
                    } else {
                        retry_pause(failures, remaining, fastrand::f64())
                    };
                    let reason = failure.describe();
                    let line = format!(
                        "renewing the certificate for gateway {} failed (attempt {failures}): {reason}; next attempt in {:.0} s",
                        self.gateway(),
                        next.as_secs_f64().ceil()
                    );
                    if terminal {
                        error!(gateway = %self.gateway(), "{line}");
                    } else {
                        warn!(gateway = %self.gateway(), "{line}");
                    }
                    last_error = Some(reason);
                    pause = Some(next);
                    last_refused_for_good = terminal;
                }
            }
        }
    }

    /// Sleeps until `at` by the wall clock (seconds since 1970), measured on the
    /// monotonic clock, looking every [`TICK`] whether the certificate expired or the
    /// wall clock jumped (then the wait is computed again).
    async fn sleep_until(
        &self,
        at: f64,
        certificate: &Certificate,
        reported: &mut Option<String>,
        early: bool,
    ) {
        let mut connections = self.pool.connections_made();
        connections.borrow_and_update();
        loop {
            let wall_start = exchange::wall_now();
            let start = Instant::now();
            let left = at - wall_start;
            if left.is_nan() || left <= 0.0 {
                return;
            }
            // At most a year at a time: a far deadline is looked at again then.
            let year = Duration::from_secs(365 * 86_400);
            let deadline = start + Duration::try_from_secs_f64(left).unwrap_or(year).min(year);
            loop {
                let wake = deadline.min(Instant::now() + TICK);
                tokio::select! {
                    () = tokio::time::sleep_until(wake.into()) => {}
                    Ok(()) = connections.changed(), if early => return,
                }
                if self.picked_up_a_replaced_credential(certificate) {
                    return;
                }
                self.note_expiry(certificate, reported);
                if clock_jumped(exchange::wall_now() - wall_start, start.elapsed()) {
                    break;
                }
                if Instant::now() >= deadline {
                    return;
                }
            }
        }
    }

    /// Uses the credential file's contents when something else replaced it (a new
    /// enrolment while the agent runs); true when it did.
    fn picked_up_a_replaced_credential(&self, current: &Certificate) -> bool {
        let peer = &self.pool.peer;
        let Ok(on_disk) = Certificate::load(&peer.ca, &peer.cert, peer.renews) else {
            return false;
        };
        if on_disk.serial() == current.serial() {
            return false;
        }
        let Ok(tls) = tunnel_transport::tls::client_config(&peer.ca, &peer.cert, &peer.key) else {
            return false;
        };
        info!(
            gateway = %self.gateway(),
            "{} was replaced (a new enrolment?): using certificate {} of `{}`, valid until {}",
            peer.cert.display(),
            on_disk.serial(),
            on_disk.identity().unwrap_or("?"),
            utc(on_disk.not_after())
        );
        self.pool.use_credential(tls, Arc::new(on_disk));
        true
    }

    /// One renewal: a fresh key, its certificate from the gateway, checked, written
    /// (atomically: a crash leaves the old pair or the new one) and put to use.
    async fn renew(&self, current: &Certificate) -> Result<Arc<Certificate>, Failure> {
        let failed = Failure::Failed;
        let peer = &self.pool.peer;
        let key = credential::fresh_key().map_err(failed)?;
        let identity = current.identity().unwrap_or(&peer.name).to_string();
        let csr = credential::request(&key, &identity).map_err(failed)?;
        let body = serde_json::to_vec(&RenewRequest { csr })
            .context("encoding the renewal request")
            .map_err(failed)?;
        let sent = exchange::wall_now();
        let (status, answer) = self
            .pool
            .exchange(RENEW_PATH, Bytes::from(body))
            .await
            .map_err(failed)?;
        let received = exchange::wall_now();
        let answer = exchange::interpret(status, &answer).map_err(failed)?;
        *self
            .clock_offset
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            exchange::clock_offset(answer.gateway_time(), sent, received);
        let issued = match answer {
            Answer::Issued(issued) => issued,
            Answer::Refused(refused) => return Err(Failure::Refused(refused)),
        };
        let written = || -> Result<_> {
            let ca = tunnel_transport::tls::load_certs(&peer.ca)?;
            credential::check_issued(&issued.certificate, &key, &ca)
                .context("the certificate the gateway issued (the old one stays in use)")?;
            let text = credential::pem(&key, &issued.certificate);
            crate::state::write_atomically(&peer.cert, text.as_bytes(), 0o600)?;
            let tls = tunnel_transport::tls::client_config(&peer.ca, &peer.cert, &peer.key)?;
            let certificate = Arc::new(Certificate::load(&peer.ca, &peer.cert, peer.renews)?);
            Ok((tls, certificate))
        };
        let (tls, renewed) = written().map_err(failed)?;
        // The connections that are up were made with the old certificate: move them onto
        // the new one (so that their streams outlive it) before streams that wait for a
        // valid credential are let go, or one could go to a connection the gateway still
        // holds to the old, expired one.
        let moved = self.pool.extend_all(&issued.certificate, &key).await;
        debug!(gateway = %self.gateway(), moved, "connections moved onto the renewed certificate");
        self.pool.use_credential(tls, renewed.clone());
        Ok(renewed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUED: i64 = 1_767_441_600;

    #[test]
    fn renewal_comes_at_half_life_give_or_take_five_percent() {
        // A day's certificate, backdated by a minute.
        let not_before = ISSUED - BACKDATE_SECS;
        let not_after = ISSUED + 86_400;
        assert_eq!(lifetime_secs(not_before, not_after), 86_400);
        assert_eq!(
            renewal_time(not_before, not_after, 0.0),
            (ISSUED + 43_200) as f64
        );
        assert_eq!(
            renewal_time(not_before, not_after, -1.0),
            (ISSUED + 43_200 - 4_320) as f64
        );
        assert_eq!(
            renewal_time(not_before, not_after, 1.0),
            (ISSUED + 43_200 + 4_320) as f64
        );
        // Jitter beyond the bounds is held to them.
        assert_eq!(
            renewal_time(not_before, not_after, 7.0),
            renewal_time(not_before, not_after, 1.0)
        );
        for _ in 0..1000 {
            let t = renewal_time(not_before, not_after, fastrand::f64() * 2.0 - 1.0);
            assert!(
                (ISSUED as f64 + 0.45 * 86_400.0..=ISSUED as f64 + 0.55 * 86_400.0).contains(&t)
            );
        }
        // A certificate that ends before it starts has no life to halve.
        assert_eq!(lifetime_secs(ISSUED, ISSUED - 10), 0);
    }

    #[test]
    fn the_back_off_doubles_up_to_five_minutes_or_a_quarter_of_what_is_left() {
        let day = 86_400.0;
        assert_eq!(retry_ceiling(1, day), Duration::from_secs(1));
        assert_eq!(retry_ceiling(2, day), Duration::from_secs(2));
        assert_eq!(retry_ceiling(5, day), Duration::from_secs(16));
        assert_eq!(retry_ceiling(12, day), Duration::from_secs(300));
        assert_eq!(retry_ceiling(u32::MAX, day), Duration::from_secs(300));
        // Forty seconds left: at most ten seconds between attempts.
        assert_eq!(retry_ceiling(12, 40.0), Duration::from_secs(10));
        // Two seconds left: still a second, never less.
        assert_eq!(retry_ceiling(12, 2.0), Duration::from_secs(1));
        // Expired: attempts go on, at up to five minutes.
        assert_eq!(retry_ceiling(12, -5.0), Duration::from_secs(300));
        assert_eq!(retry_cap(-1.0), Duration::from_secs(300));
        // Full jitter under the ceiling, with a floor.
        assert_eq!(retry_pause(5, day, 0.5), Duration::from_secs(8));
        assert_eq!(retry_pause(5, day, 0.0), Duration::from_millis(100));
        for _ in 0..1000 {
            let pause = retry_pause(9, day, fastrand::f64());
            assert!(pause <= Duration::from_secs(256), "{pause:?}");
        }
    }

    #[test]
    fn the_gateway_clock_moves_the_schedule() {
        // The gateway's clock is 100 s ahead: renew 100 s earlier by ours.
        let not_before = ISSUED - BACKDATE_SECS;
        let not_after = ISSUED + 3600;
        let offset = exchange::clock_offset(ISSUED + 100, ISSUED as f64, ISSUED as f64 + 1.0);
        assert!((offset - 100.0).abs() < 1e-9, "{offset}");
        let local = renewal_time(not_before, not_after, 0.0) - offset;
        assert_eq!(local, (ISSUED + 1800) as f64 - 100.0);
    }

    #[test]
    fn a_suspend_or_a_clock_step_is_noticed() {
        assert!(!clock_jumped(10.0, Duration::from_secs(10)));
        assert!(!clock_jumped(11.9, Duration::from_secs(10)));
        assert!(clock_jumped(3600.0, Duration::from_secs(10)));
        assert!(clock_jumped(-50.0, Duration::from_secs(10)));
    }

    #[test]
    fn refusals_that_need_a_new_token_say_so() {
        let refused = |error| {
            Failure::Refused(Refused {
                error,
                message: "enrolment of alice ended".into(),
                gateway_time: ISSUED,
            })
        };
        assert_eq!(
            refused(RefusalKind::RenewalEnded).describe(),
            "the gateway refused renewal: enrolment of alice ended (renewal-ended); a new token is needed: ask the gateway's operator for one and enrol again with `tunnel-agent enroll`"
        );
        assert_eq!(
            refused(RefusalKind::Internal).describe(),
            "the gateway refused renewal: enrolment of alice ended (internal)"
        );
        for kind in [
            RefusalKind::TooLate,
            RefusalKind::Revoked,
            RefusalKind::RenewalEnded,
        ] {
            assert!(needs_new_token(kind));
        }
    }

    /// A gateway on 127.0.0.1 that requires a client certificate from its CA and
    /// renews it on `POST /v1/renew` for an hour.
    mod gateway {
        use std::sync::Arc;

        use bytes::Bytes;
        use rcgen::{
            CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, Issuer, KeyPair,
        };
        use rustls_pki_types::PrivateKeyDer;
        use time::OffsetDateTime;
        use tokio::net::TcpListener;
        use tokio_rustls::TlsAcceptor;
        use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
        use tunnel_proto::enrolment::{Issued, RENEW_PATH, RenewRequest};
        use tunnel_transport::certs::unix_now;

        use crate::credential::{self, tests::test_ca};

        pub struct Gateway {
            pub address: String,
            pub ca_pem: String,
            pub ca: Arc<Issuer<'static, KeyPair>>,
        }

        /// A client certificate for `key` valid from two hours ago until `secs` from now.
        pub fn client(ca: &Issuer<'static, KeyPair>, key: &KeyPair, secs: i64) -> String {
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "alice");
            params.distinguished_name = dn;
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(2);
            params.not_after = now + time::Duration::seconds(secs);
            params.signed_by(key, ca).unwrap().pem()
        }

        pub async fn start() -> Gateway {
            let (ca_pem, ca) = test_ca("tunnel CA renewal");
            let ca = Arc::new(ca);
            let ca_der = credential::certificates(&ca_pem).unwrap().remove(0);
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["gw.test".to_string()]).unwrap();
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let leaf = params.signed_by(&key, &ca).unwrap().der().clone();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = RootCertStore::empty();
            roots.add(ca_der.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider.clone(),
            )
            .build()
            .unwrap();
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![leaf, ca_der],
                    PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap().to_string();
            let signer = ca.clone();
            let ca_text = ca_pem.clone();
            tokio::spawn(async move {
                let acceptor = TlsAcceptor::from(Arc::new(config));
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let signer = signer.clone();
                    let ca_text = ca_text.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let Ok(mut connection) = h2::server::handshake(tls).await else {
                            return;
                        };
                        while let Some(Ok((request, mut respond))) = connection.accept().await {
                            assert_eq!(request.uri().path(), RENEW_PATH);
                            let mut body = request.into_body();
                            let mut read = Vec::new();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                read.extend_from_slice(&chunk);
                            }
                            let renew: RenewRequest = serde_json::from_slice(&read).unwrap();
                            let mut csr =
                                CertificateSigningRequestParams::from_pem(&renew.csr).unwrap();
                            csr.params.extended_key_usages =
                                vec![ExtendedKeyUsagePurpose::ClientAuth];
                            let now = OffsetDateTime::now_utc();
                            csr.params.not_before = now - time::Duration::seconds(60);
                            csr.params.not_after = now + time::Duration::hours(1);
                            let cert = csr.signed_by(&*signer).unwrap();
                            let issued = Issued {
                                certificate: cert.pem(),
                                ca: ca_text.clone(),
                                identity: "alice".into(),
                                groups: vec![],
                                serial: "01".into(),
                                not_after: unix_now() + 3600,
                                gateway_time: unix_now(),
                            };
                            let response = http::Response::builder().status(200).body(()).unwrap();
                            let mut send = respond.send_response(response, false).unwrap();
                            send.send_data(Bytes::from(serde_json::to_vec(&issued).unwrap()), true)
                                .unwrap();
                        }
                    });
                }
            });
            Gateway {
                address,
                ca_pem,
                ca,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_credential_past_half_life_is_renewed_in_place_and_used() {
        let gateway = gateway::start().await;
        let dir = std::env::temp_dir().join(format!(
            "tunnel-agent-renewal-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        crate::state::private_dir(&dir).unwrap();
        let key = credential::fresh_key().unwrap();
        // An hour and a half of life, 20 s of it left: past half-life.
        let old = gateway::client(&gateway.ca, &key, 20);
        std::fs::write(dir.join("ca.pem"), &gateway.ca_pem).unwrap();
        std::fs::write(dir.join("credential.pem"), credential::pem(&key, &old)).unwrap();
        let text = format!(
            "[[gateway]]\nname = \"t\"\naddress = \"{}\"\nca = \"ca.pem\"\ncredential = \"credential.pem\"\nserver_name = \"gw.test\"\nconnections = 1\n",
            gateway.address
        );
        let config =
            tunnel_proto::config::AgentConfig::parse(&text, &dir.join("agent.toml")).unwrap();
        let pool = Pool::start(config.gateways[0].clone(), &config).unwrap();
        let old_serial = pool.certificate().serial().to_string();
        let renewal = Renewal::start(pool.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        while pool.certificate().serial() == old_serial {
            assert!(
                Instant::now() < deadline,
                "not renewed: {:?}",
                renewal.view()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let renewed = pool.certificate();
        assert!(renewed.not_after() > tunnel_transport::certs::unix_now() + 3000);
        let written = std::fs::read_to_string(dir.join("credential.pem")).unwrap();
        assert!(
            !written.contains(old.trim()),
            "the old certificate is still in the file"
        );
        let view = renewal.view();
        assert_eq!(view.state, StateName::Scheduled, "{view:?}");
        assert!(view.last_error.is_none(), "{view:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_credential_does_not_stop_the_agent_and_renewal_keeps_trying() {
        let gateway = gateway::start().await;
        let dir = std::env::temp_dir().join(format!(
            "tunnel-agent-expired-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        crate::state::private_dir(&dir).unwrap();
        let key = credential::fresh_key().unwrap();
        let old = gateway::client(&gateway.ca, &key, -30);
        std::fs::write(dir.join("ca.pem"), &gateway.ca_pem).unwrap();
        std::fs::write(dir.join("credential.pem"), credential::pem(&key, &old)).unwrap();
        let text = format!(
            "connect_timeout = 1\n[[gateway]]\nname = \"t\"\naddress = \"{}\"\nca = \"ca.pem\"\ncredential = \"credential.pem\"\nserver_name = \"gw.test\"\nconnections = 1\n",
            gateway.address
        );
        let config =
            tunnel_proto::config::AgentConfig::parse(&text, &dir.join("agent.toml")).unwrap();
        let pool = Pool::start(config.gateways[0].clone(), &config).unwrap();
        let problem = pool.certificate().view().problem.unwrap_or_default();
        assert!(
            problem.contains("the agent keeps trying to renew it"),
            "{problem}"
        );
        // This gateway has no recovery window: it refuses the expired certificate.
        let renewal = Renewal::start(pool.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let view = renewal.view();
            if view.state == StateName::Expired && view.last_error.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "{view:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
