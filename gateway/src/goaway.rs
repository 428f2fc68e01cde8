//! Refusing an authenticated connection with a reason its agent can log.
//!
//! HTTP/2 carries the reason in the debug data of a GOAWAY frame, but h2's server
//! cannot attach debug data to the GOAWAY it sends. The refusal needs no HTTP/2 state
//! anyway, so it is written here by hand: the server's preface (an empty SETTINGS
//! frame) and the GOAWAY, then a TLS close. The agent's HTTP/2 client reports it as
//! `connection error received: detected excessive load generating behavior
//! (b"identity alice has reached max_connections_per_identity …")`.

use std::time::Duration;

use h2::Reason;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;

/// The longest reason sent; HTTP/2 frames may always be 16 KiB.
const MAX_REASON: usize = 1024;

fn frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let length = payload.len() as u32;
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(0); // flags
    out.extend_from_slice(&0u32.to_be_bytes()); // stream 0: the connection
    out.extend_from_slice(payload);
}

/// The server preface and a GOAWAY with `reason` and `text` as its debug data (cut to
/// [`MAX_REASON`] bytes). No stream was processed: the last stream id is 0.
pub fn frames(reason: Reason, text: &str) -> Vec<u8> {
    let mut text = text.as_bytes();
    text = &text[..text.len().min(MAX_REASON)];
    let mut goaway = Vec::with_capacity(8 + text.len());
    goaway.extend_from_slice(&0u32.to_be_bytes());
    goaway.extend_from_slice(&u32::from(reason).to_be_bytes());
    goaway.extend_from_slice(text);
    let mut out = Vec::with_capacity(2 * 9 + goaway.len());
    frame(SETTINGS, &[], &mut out);
    frame(GOAWAY, &goaway, &mut out);
    out
}

/// Sends the refusal and closes, then reads what the client still sends until it
/// closes too or `linger` passes: closing with its preface unread would answer with a
/// TCP reset, which can overtake the GOAWAY and lose the reason.
pub async fn refuse<S>(mut stream: S, reason: Reason, text: &str, linger: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let close = async {
        stream.write_all(&frames(reason, text)).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(linger, close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_h2_client_reports_the_reason() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let refusal = tokio::spawn(refuse(
            server,
            Reason::ENHANCE_YOUR_CALM,
            "identity alice has reached max_connections_per_identity (2 connections open)",
            Duration::from_secs(5),
        ));
        let (_send, conn) = h2::client::handshake(client)
            .await
            .unwrap_or_else(|e| panic!("handshake: {e}"));
        let error = match conn.await {
            Err(e) => e,
            Ok(()) => panic!("the connection ended without an error"),
        };
        assert!(error.is_go_away() && error.is_remote(), "{error:?}");
        assert_eq!(error.reason(), Some(Reason::ENHANCE_YOUR_CALM));
        assert!(
            error.to_string().contains(
                "identity alice has reached max_connections_per_identity (2 connections open)"
            ),
            "{error}"
        );
        refusal.await.unwrap();
    }

    #[test]
    fn long_reasons_are_cut() {
        let out = frames(Reason::REFUSED_STREAM, &"x".repeat(5000));
        assert_eq!(out.len(), 9 + 9 + 8 + MAX_REASON);
        // GOAWAY length field: 8 + MAX_REASON.
        assert_eq!(&out[9..12], &((8 + MAX_REASON) as u32).to_be_bytes()[1..]);
    }
}
