//! One enrolment or renewal exchange with the gateway, over an HTTP/2 connection that is
//! already up: a JSON `POST`, its answer read whole (at most [`MAX_BODY`] bytes), and
//! the gateway's clock compared with ours.
//!
//! ```text
//!  request(authority, path) ─▶ send (body, end of stream) ─▶ answer: status + body
//!  interpret: 200 ─▶ Issued │ 4xx/5xx with JSON ─▶ Refused │ anything else ─▶ error
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use h2::SendStream;
use h2::client::ResponseFuture;
use http::{Method, Request, StatusCode, Uri, header};
use tunnel_proto::enrolment::{Issued, MAX_BODY, Refused};

/// A clock offset larger than this is reported.
pub const NOTABLE_OFFSET_SECS: f64 = 30.0;

/// What the gateway answered.
#[derive(Debug)]
pub enum Answer {
    Issued(Issued),
    Refused(Refused),
}

impl Answer {
    pub fn gateway_time(&self) -> i64 {
        match self {
            Answer::Issued(issued) => issued.gateway_time,
            Answer::Refused(refused) => refused.gateway_time,
        }
    }
}

/// The `POST` of an enrolment or renewal to the gateway known as `authority` (its name
/// or address, as its certificate carries it).
pub fn request(authority: &str, path: &str) -> Result<Request<()>> {
    let authority = match authority.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]"),
        Err(_) => authority.to_string(),
    };
    let uri = Uri::builder()
        .scheme("https")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .with_context(|| format!("`{authority}` cannot name the gateway in a request"))?;
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(())
        .context("building the request")
}

/// Sends `body` on a request just opened and reads the whole answer.
pub async fn answer(
    response: ResponseFuture,
    mut send: SendStream<Bytes>,
    body: Bytes,
) -> Result<(StatusCode, Bytes)> {
    send.reserve_capacity(body.len());
    send.send_data(body, true)
        .context("sending the request body")?;
    let response = response.await.context("waiting for the gateway's answer")?;
    let status = response.status();
    let read = tunnel_transport::messages::read_body(response.into_body(), MAX_BODY)
        .await
        .context("reading the gateway's answer")?;
    Ok((status, read))
}

/// Reads an answer: a certificate, or the gateway's reasons for refusing one.
pub fn interpret(status: StatusCode, body: &[u8]) -> Result<Answer> {
    let shown = || {
        let text = String::from_utf8_lossy(body);
        let text: String = text.chars().take(200).collect();
        format!("HTTP {status}: {}", text.trim())
    };
    if status == StatusCode::OK {
        return serde_json::from_slice(body).map(Answer::Issued).map_err(|e| {
            anyhow!(
                "the gateway's answer is not a certificate this agent can read ({e}; {}): the agent and the gateway may be of different versions",
                shown()
            )
        });
    }
    match serde_json::from_slice::<Refused>(body) {
        Ok(refused) if status.is_client_error() || status.is_server_error() => {
            Ok(Answer::Refused(refused))
        }
        _ if status == StatusCode::NOT_FOUND => Err(anyhow!(
            "the gateway does not offer enrolment or renewal ({}): it may be of an older version",
            shown()
        )),
        _ => Err(anyhow!(
            "the gateway answered what this agent cannot read ({})",
            shown()
        )),
    }
}

/// Now by the wall clock, in seconds since 1970 (with fractions).
pub fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How far the gateway's clock is ahead of ours (negative: behind), from its answer's
/// time and the moments our request left and its answer came.
pub fn clock_offset(gateway_time: i64, sent: f64, received: f64) -> f64 {
    // The gateway's clock has whole seconds: the half second is its expected part.
    gateway_time as f64 + 0.5 - (sent + received) / 2.0
}

/// The clock offset in words, when it is large enough to matter.
pub fn describe_offset(offset: f64) -> Option<String> {
    if offset.abs() <= NOTABLE_OFFSET_SECS {
        return None;
    }
    let secs = offset.abs().round();
    Some(if offset > 0.0 {
        format!("this machine's clock is {secs:.0} s behind the gateway's")
    } else {
        format!("this machine's clock is {secs:.0} s ahead of the gateway's")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_measured_from_the_midpoint_and_worded_by_direction() {
        // Sent at 100.0, answered at 102.0: the gateway said 131 (131.5 on average).
        let offset = clock_offset(131, 100.0, 102.0);
        assert!((offset - 30.5).abs() < 1e-9, "{offset}");
        assert_eq!(
            describe_offset(offset).as_deref(),
            Some("this machine's clock is 31 s behind the gateway's")
        );
        assert_eq!(
            describe_offset(-120.0).as_deref(),
            Some("this machine's clock is 120 s ahead of the gateway's")
        );
        assert_eq!(describe_offset(29.0), None);
    }

    #[test]
    fn answers_are_certificates_refusals_or_errors() {
        let refused = br#"{"error":"token-used","message":"used by another key","gateway_time":5}"#;
        match interpret(StatusCode::FORBIDDEN, refused).unwrap() {
            Answer::Refused(r) => {
                assert_eq!(r.error, tunnel_proto::enrolment::RefusalKind::TokenUsed);
                assert_eq!(r.gateway_time, 5);
            }
            other => panic!("{other:?}"),
        }
        let error = interpret(StatusCode::NOT_FOUND, b"no such path").unwrap_err();
        assert!(error.to_string().contains("older version"), "{error}");
        let error = interpret(StatusCode::OK, b"{}").unwrap_err();
        assert!(error.to_string().contains("different versions"), "{error}");
    }

    #[test]
    fn an_ipv6_gateway_is_bracketed_in_the_request() {
        let request = request("fd00::1", "/v1/renew").unwrap();
        assert_eq!(request.uri().to_string(), "https://[fd00::1]/v1/renew");
        assert_eq!(request.method(), Method::POST);
    }
}
