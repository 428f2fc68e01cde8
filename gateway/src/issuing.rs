//! Certificates over the tunnel's own port: enrolment with a token, and renewal with
//! the current certificate (or, within the recovery window, an expired one).
//!
//! ```text
//!  POST /v1/enrol {token_id, secret, csr} ── State::redeem (token bound to the first key)
//!  POST /v1/renew {csr}                   ── State::renew  (revocation, lineage, period)
//!        │ signed by the CA, for cert_ttl, on the key of the request
//!        ▼
//!  200 Issued {certificate, ca, serial, not_after, gateway_time} │ 4xx Refused {error, message}
//! ```
//!
//! The state's work (a file lock, small files, one signature) runs on the blocking pool.
//! Secrets are never logged; a token presented by a second key is logged as a
//! possible theft.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing::{debug, error, info};
use tunnel_proto::enrolment::{
    EXTEND_CONTEXT, EnrolRequest, ExtendRequest, Issued, MAX_BODY, RefusalKind, Refused,
    RenewRequest,
};
use tunnel_proto::token::Secret;
use tunnel_transport::certs::{CertInfo, unix_now, utc};
use tunnel_transport::messages::{read_body, reply_json};

use crate::authority::request_key_digest;
use crate::refusals::Kind;
use crate::server::{Current, Gateway};
use crate::state::{Denial, Presented};

fn refuse(respond: &mut SendResponse<Bytes>, denial: Denial) {
    let status = match denial.kind {
        RefusalKind::BadRequest => StatusCode::BAD_REQUEST,
        RefusalKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        RefusalKind::UnknownToken => StatusCode::NOT_FOUND,
        RefusalKind::TokenUsed => StatusCode::CONFLICT,
        RefusalKind::TokenExpired | RefusalKind::TooLate => StatusCode::GONE,
        RefusalKind::Revoked | RefusalKind::RenewalEnded | RefusalKind::Superseded => {
            StatusCode::FORBIDDEN
        }
    };
    reply_json(
        respond,
        status,
        &Refused {
            error: denial.kind,
            message: denial.message,
            gateway_time: unix_now(),
        },
    );
}

fn bad(message: impl Into<String>) -> Denial {
    Denial {
        kind: RefusalKind::BadRequest,
        message: message.into(),
    }
}

fn internal(e: &anyhow::Error) -> Denial {
    error!("issuing a certificate failed: {e:#}");
    Denial {
        kind: RefusalKind::Internal,
        message: "the gateway could not issue a certificate (its log says why)".into(),
    }
}

async fn parse<T: serde::de::DeserializeOwned>(recv: RecvStream) -> Result<T, Denial> {
    let bytes = read_body(recv, MAX_BODY)
        .await
        .map_err(|e| bad(format!("{e:#}")))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("not the expected request: {e}")))
}

fn issued(
    gateway: &Gateway,
    identity: &str,
    groups: &[String],
    cert_pem: String,
    serial: String,
    not_after: i64,
) -> Issued {
    Issued {
        certificate: cert_pem,
        ca: gateway.authority.cert_pem.clone(),
        identity: identity.to_string(),
        groups: groups.to_vec(),
        serial,
        not_after,
        gateway_time: unix_now(),
    }
}

/// `POST /v1/enrol` on a connection without a client certificate.
pub async fn enrol(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    recv: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    match redeem(&gateway, peer, recv).await {
        Ok(issued) => reply_json(&mut respond, StatusCode::OK, &issued),
        Err(denial) => refuse(&mut respond, denial),
    }
}

async fn redeem(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    recv: RecvStream,
) -> Result<Issued, Denial> {
    let request: EnrolRequest = parse(recv).await?;
    let secret = Secret::decode(&request.secret)
        .ok_or_else(|| bad("the secret is not 32 bytes of base64url"))?;
    let key = request_key_digest(&request.csr).map_err(|e| bad(format!("{e:#}")))?;
    let worker = gateway.clone();
    let id = request.token_id.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let now = unix_now();
        worker.state.redeem(&id, &secret, &key, now, |token| {
            worker
                .authority
                .sign_request(&token.identity, &request.csr, worker.config.cert_ttl)
        })
    })
    .await
    .map_err(|e| internal(&anyhow!("{e}")))?
    .map_err(|e| internal(&e))?;
    match outcome {
        Ok(redeemed) => {
            let token = &redeemed.token;
            let r = &redeemed.redemption;
            if redeemed.repeated {
                info!(%peer, identity = %token.identity, token = %token.id, "enrolment repeated by the same key (a lost reply): the same certificate {} again", r.serial);
            } else {
                info!(%peer, identity = %token.identity, token = %token.id, "enrolled: certificate {} valid until {}", r.serial, utc(r.not_after));
                gateway.refresh_identities();
            }
            Ok(issued(
                gateway,
                &token.identity,
                &token.groups,
                r.certificate.clone(),
                r.serial.clone(),
                r.not_after,
            ))
        }
        Err(denial) => {
            // The id comes from the client: written escaped, never as raw text.
            let token = format!(
                "{:?}",
                request.token_id.chars().take(64).collect::<String>()
            );
            let detail = match denial.kind {
                RefusalKind::TokenUsed => format!(
                    "possible theft: token {token}, already redeemed, was presented by another key (from {peer}); refused"
                ),
                RefusalKind::UnknownToken => {
                    format!(
                        "enrolment with token {token} refused: unknown token or wrong secret (from {peer})"
                    )
                }
                _ => format!(
                    "enrolment with token {token} refused: {} (from {peer})",
                    denial.message
                ),
            };
            gateway
                .refusals
                .report(&source_of(peer), Kind::Certificate(denial.kind), detail);
            Err(denial)
        }
    }
}

/// How a client without a certificate appears in the log: its address.
fn source_of(peer: SocketAddr) -> String {
    peer.ip().to_string()
}

/// `POST /v1/renew` on a connection authenticated by `presented` (expired within the
/// recovery window when `presented.expired`). On success, every live connection of the
/// identity's lineage lives on to the new certificate's end.
pub async fn renew(
    gateway: Arc<Gateway>,
    (peer, connection): (SocketAddr, u64),
    presented: Presented,
    recv: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    match renewal(&gateway, connection, &presented, recv).await {
        Ok(issued) => {
            info!(%peer, identity = %presented.identity, "renewed: certificate {} replaces {}, valid until {}{}", issued.serial, presented.serial, utc(issued.not_after), if presented.expired { " (recovered an expired certificate)" } else { "" });
            reply_json(&mut respond, StatusCode::OK, &issued);
        }
        Err(denial) => {
            gateway.refusals.report(
                &presented.identity,
                Kind::Certificate(denial.kind),
                format!(
                    "renewal of {} refused: {} (from {peer})",
                    presented.serial, denial.message
                ),
            );
            refuse(&mut respond, denial);
        }
    }
}

async fn renewal(
    gateway: &Arc<Gateway>,
    connection: u64,
    presented: &Presented,
    recv: RecvStream,
) -> Result<Issued, Denial> {
    let request: RenewRequest = parse(recv).await?;
    // Checked before the lock: a request that is not one costs no file access.
    request_key_digest(&request.csr).map_err(|e| bad(format!("{e:#}")))?;
    let worker = gateway.clone();
    let presented = presented.clone();
    let (record, signed) = tokio::task::spawn_blocking(move || {
        worker.state.renew(&presented, unix_now(), |record| {
            worker
                .authority
                .sign_request(&record.identity, &request.csr, worker.config.cert_ttl)
        })
    })
    .await
    .map_err(|e| internal(&anyhow!("{e}")))?
    .map_err(|e| internal(&e))??;
    // Who asked on this connection holds the new key: the connection lives on with it.
    // The agent's other connections move over by proving that (`extend`).
    gateway.vouch(
        connection,
        Current {
            serial: signed.serial.clone(),
            not_before: signed.not_before,
            not_after: signed.not_after,
        },
    );
    Ok(issued(
        gateway,
        &record.identity,
        &record.groups,
        signed.cert_pem,
        signed.serial,
        signed.not_after,
    ))
}

/// What a renewal needs to know of the certificate that now vouches for a connection
/// (its handshake's, or its lineage's latest).
pub fn presented(identity: &str, current: &Current) -> Presented {
    Presented {
        identity: identity.to_string(),
        serial: current.serial.clone(),
        not_before: current.not_before,
        expired: unix_now() > current.not_after,
    }
}

/// `POST /v1/extend`: the connection moves onto a newer certificate of its identity,
/// if the request's signature over this connection's TLS exporter value is made with
/// that certificate's key (see [`tunnel_proto::enrolment::ExtendRequest`]).
pub async fn extend(
    gateway: Arc<Gateway>,
    (peer, connection): (SocketAddr, u64),
    identity: String,
    exporter: Option<[u8; 32]>,
    recv: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    match extension(&gateway, connection, &identity, exporter, recv).await {
        Ok(current) => {
            debug!(%peer, %identity, serial = %current.serial, "connection moved onto a renewed certificate");
            gateway.vouch(connection, current);
            reply_json(&mut respond, StatusCode::OK, &serde_json::json!({}));
        }
        Err(denial) => {
            gateway.refusals.report(
                &identity,
                Kind::Certificate(denial.kind),
                format!("extension refused: {} (from {peer})", denial.message),
            );
            refuse(&mut respond, denial);
        }
    }
}

async fn extension(
    gateway: &Arc<Gateway>,
    connection: u64,
    identity: &str,
    exporter: Option<[u8; 32]>,
    recv: RecvStream,
) -> Result<Current, Denial> {
    let request: ExtendRequest = parse(recv).await?;
    let exporter = exporter.ok_or_else(|| bad("this connection has no TLS exporter value"))?;
    let der = CertificateDer::from_pem_slice(request.certificate.as_bytes())
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    let info = CertInfo::parse(&der).map_err(|e| bad(format!("{e:#}")))?;
    if info.common_name() != Some(identity) {
        return Err(bad("the certificate is of another identity"));
    }
    let verdict = tunnel_transport::tls::verify_client_chain(
        &gateway.config.ca,
        std::slice::from_ref(&der),
        rustls::pki_types::UnixTime::now(),
    )
    .map_err(|e| internal(&e))?;
    if let Err(e) = verdict {
        return Err(bad(format!(
            "the certificate is not one of ours, or not valid now: {e}"
        )));
    }
    if let Some(why) = gateway
        .state
        .revocations()
        .map_err(|e| internal(&e))?
        .verdict(identity, &info.serial, info.not_before)
    {
        return Err(Denial {
            kind: RefusalKind::Revoked,
            message: why,
        });
    }
    let signature = data_encoding::BASE64URL_NOPAD
        .decode(request.signature.as_bytes())
        .map_err(|_| bad("the signature is not base64url"))?;
    let current = gateway.current_of(connection);
    let later = match &current {
        Some(current) => gateway
            .state
            .is_later_in_lineage(identity, &info.serial, &current.serial)
            .map_err(|e| internal(&e))?,
        None => false,
    };
    if !later {
        return Err(bad(
            "the certificate is not a later one of this connection's lineage",
        ));
    }
    let mut signed = EXTEND_CONTEXT.to_vec();
    signed.extend_from_slice(&exporter);
    if !signature_holds(&der, &signed, &signature) {
        return Err(bad(
            "the signature does not hold for this connection and certificate",
        ));
    }
    Ok(Current {
        serial: info.serial,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

/// Whether `signature` over `message` was made with the key of certificate `der`
/// (ECDSA P-256 or P-384 with SHA-2, or Ed25519: what agents' keys are).
fn signature_holds(der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, UnparsedPublicKey,
        VerificationAlgorithm,
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let spki = cert.public_key();
    let key = spki.subject_public_key.data.as_ref();
    let candidates: [&dyn VerificationAlgorithm; 3] =
        [&ECDSA_P256_SHA256_ASN1, &ECDSA_P384_SHA384_ASN1, &ED25519];
    candidates.iter().any(|alg| {
        UnparsedPublicKey::new(*alg, key)
            .verify(message, signature)
            .is_ok()
    })
}
