//! The expert call on the wire (`/mana/expert/1.0.0`): a raw libp2p stream per call, whose body each way is
//! one frame (docs/protocol.md §1): the caller writes its [`ExpertRequest`] and closes its half, the host
//! answers one [`ExpertResponse`] and closes. Each body is read under its cap
//! ([`MAX_REQUEST_BYTES`], [`MAX_RESPONSE_BYTES`]) before anything is decoded.

use std::io;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use mana_protocol::limits::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
use mana_protocol::{ExpertRequest, ExpertResponse, ProtocolError};

use crate::net::{Client, FrameTooLarge, NetError};

/// The expert call protocol, served on raw streams.
pub const EXPERT_STREAM: StreamProtocol = StreamProtocol::new(mana_protocol::EXPERT_PROTOCOL);

/// Why an expert call got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The stream could not be opened (peer unreachable, or it does not serve expert calls).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The stream failed while the request or answer was on it.
    #[error("expert call to {peer}: {source}")]
    Io {
        /// The host.
        peer: PeerId,
        /// What failed.
        source: io::Error,
    },
    /// The frame could not be encoded, or the answer could not be decoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// No answer within the call's time.
    #[error("expert call to {peer}: no answer within {after:?}")]
    Timeout {
        /// The host.
        peer: PeerId,
        /// The call's time limit.
        after: Duration,
    },
}

/// Reads a stream's whole remaining body, refusing (unread past the cap) one longer than `max` bytes.
pub async fn read_body<R: futures::AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    stream.take(max as u64 + 1).read_to_end(&mut body).await?;
    if body.len() > max {
        return Err(FrameTooLarge::into_io(max));
    }
    Ok(body)
}

/// Writes `frame` as the stream's body and closes the writing half.
pub async fn write_body<W: futures::AsyncWrite + Unpin>(
    stream: &mut W,
    frame: &[u8],
) -> io::Result<()> {
    stream.write_all(frame).await?;
    stream.close().await
}

/// Calls an expert on `peer`: one stream, one request, one answer, all within `timeout`.
pub async fn call(
    net: &Client,
    peer: PeerId,
    request: &ExpertRequest,
    timeout: Duration,
) -> Result<ExpertResponse, CallError> {
    let frame = request.encode()?;
    let exchange = async {
        let mut stream = net.open_protocol_stream(peer, EXPERT_STREAM).await?;
        let io = |source| CallError::Io { peer, source };
        write_body(&mut stream, &frame).await.map_err(io)?;
        let body = read_body(&mut stream, MAX_RESPONSE_BYTES)
            .await
            .map_err(io)?;
        Ok::<_, CallError>(ExpertResponse::decode(&body)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout {
            peer,
            after: timeout,
        })?
}

/// Reads one request body from an inbound call (under [`MAX_REQUEST_BYTES`], within `timeout`) and decodes
/// it.
pub async fn read_request<R: futures::AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> Result<ExpertRequest, String> {
    let body = tokio::time::timeout(timeout, read_body(stream, MAX_REQUEST_BYTES))
        .await
        .map_err(|_| format!("no whole request within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    ExpertRequest::decode(&body).map_err(|e| e.to_string())
}
