//! Small HTTP/2 messages both daemons exchange beside the carried bytes: a CONNECT's
//! answer (its outcome class), and JSON bodies (enrolment, renewal, publications),
//! read whole with a cap.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Response, StatusCode};
use serde::Serialize;
use tunnel_proto::ConnectError;
use tunnel_proto::connect::{ERROR_HEADER, encode_outcome};

/// Answers a CONNECT with `outcome` (a failure as its status and class header); on
/// success returns the stream to send the carried bytes on.
pub fn answer_connect(
    respond: &mut SendResponse<Bytes>,
    outcome: Result<(), ConnectError>,
) -> Result<Option<SendStream<Bytes>>> {
    let (status, error) = encode_outcome(outcome);
    let mut response = Response::builder().status(status);
    if let Some(error) = error {
        response = response.header(ERROR_HEADER, error);
    }
    let response = response.body(()).context("building the CONNECT answer")?;
    let end_of_stream = outcome.is_err();
    let send = respond
        .send_response(response, end_of_stream)
        .context("sending the CONNECT answer")?;
    Ok((!end_of_stream).then_some(send))
}

/// Answers a request with `value` as JSON. A peer that went away meanwhile is not an
/// error of ours: nothing is reported.
pub fn reply_json<T: Serialize>(respond: &mut SendResponse<Bytes>, status: StatusCode, value: &T) {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(());
    let Ok(response) = response else { return };
    if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send.send_data(Bytes::from(json), true);
    }
}

/// How long a whole message body may take to arrive: a peer that opens requests and
/// never finishes them holds nothing for longer.
pub const BODY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a body whole within [`BODY_WITHIN`], giving the window back as it goes, and
/// refusing more than `limit` bytes.
pub async fn read_body(mut body: RecvStream, limit: usize) -> Result<Bytes> {
    let read = async {
        let mut out = bytes::BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.context("reading the body")?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if out.len() + chunk.len() > limit {
                bail!("the body is longer than {limit} bytes");
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    };
    tokio::time::timeout(BODY_WITHIN, read)
        .await
        .map_err(|_| anyhow::anyhow!("the body did not arrive whole within {BODY_WITHIN:?}"))?
}
