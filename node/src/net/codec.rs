//! The fetch protocol's codec (`/mana/fetch/1.0.0`, [`mana_protocol::FETCH_PROTOCOL`]): carries the protocol
//! crate's [`FetchRequest`]/[`FetchResponse`] frames on libp2p request-response streams, one request and one
//! response per stream. A blob is fetched chunk by chunk, so a 50 MB shard is many small requests that run in
//! parallel on several providers, and no read holds more than one chunk.
//!
//! Every read is capped before it is made: a request at [`MAX_REQUEST_FRAME`] bytes, a response at the
//! configured chunk size plus [`RESPONSE_OVERHEAD`]; the frames are then decoded by the protocol crate,
//! which checks the version tag and the chunk's bounds.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response;
use mana_protocol::{FetchRequest, FetchResponse};

/// The protocol id of fetches.
pub const TRANSFER_PROTOCOL: StreamProtocol = StreamProtocol::new(mana_protocol::FETCH_PROTOCOL);

/// The largest request frame read, in bytes (a real one is under 60).
pub const MAX_REQUEST_FRAME: usize = 1024;

/// Bytes of a response frame besides the chunk itself (version, variant, hash, offsets, length prefix).
pub const RESPONSE_OVERHEAD: usize = 1024;

/// The codec, with its cap on chunk size.
#[derive(Debug, Clone)]
pub struct TransferCodec {
    /// Largest chunk accepted in a response.
    pub max_chunk_bytes: u32,
}

impl TransferCodec {
    /// A codec accepting chunks of at most `max_chunk_bytes`.
    pub fn new(max_chunk_bytes: u32) -> Self {
        Self { max_chunk_bytes }
    }
}

fn invalid(why: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Reads a whole frame of at most `cap` bytes; a longer one is an error, and is not read further.
async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, cap: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(cap as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > cap {
        return Err(invalid(format!("frame larger than {cap} bytes")));
    }
    Ok(buf)
}

impl request_response::Codec for TransferCodec {
    type Protocol = StreamProtocol;
    type Request = FetchRequest;
    type Response = FetchResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<FetchRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_capped(io, MAX_REQUEST_FRAME).await?;
        FetchRequest::decode(&buf).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<FetchResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_capped(io, self.max_chunk_bytes as usize + RESPONSE_OVERHEAD).await?;
        let response = FetchResponse::decode(&buf).map_err(invalid)?;
        if let FetchResponse::Chunk { data, .. } = &response {
            if data.0.len() > self.max_chunk_bytes as usize {
                return Err(invalid("fetch chunk larger than the limit"));
            }
        }
        Ok(response)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: FetchRequest) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req.encode().map_err(invalid)?).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: FetchResponse) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res.encode().map_err(invalid)?).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use mana_protocol::{Bytes, ContentHash};
    use request_response::Codec;

    fn roundtrip_response(codec: &mut TransferCodec, res: FetchResponse) -> io::Result<FetchResponse> {
        block_on(async {
            let mut wire = futures::io::Cursor::new(Vec::new());
            TransferCodec::new(u32::MAX).write_response(&TRANSFER_PROTOCOL, &mut wire, res).await?;
            let mut rd = futures::io::Cursor::new(wire.into_inner());
            codec.read_response(&TRANSFER_PROTOCOL, &mut rd).await
        })
    }

    #[test]
    fn request_roundtrip_and_garbage() {
        let mut codec = TransferCodec::new(1024);
        let req = FetchRequest { hash: ContentHash([7; 32]), offset: 1 << 40, max_len: 65536 };
        let got = block_on(async {
            let mut wire = futures::io::Cursor::new(Vec::new());
            codec.clone().write_request(&TRANSFER_PROTOCOL, &mut wire, req.clone()).await?;
            let mut rd = futures::io::Cursor::new(wire.into_inner());
            codec.read_request(&TRANSFER_PROTOCOL, &mut rd).await
        });
        assert_eq!(got.ok(), Some(req));
        for garbage in [vec![], vec![0xff; 10], vec![1u8; MAX_REQUEST_FRAME + 1]] {
            let got = block_on(async {
                let mut rd = futures::io::Cursor::new(garbage);
                codec.read_request(&TRANSFER_PROTOCOL, &mut rd).await
            });
            assert!(got.is_err());
        }
    }

    #[test]
    fn response_roundtrip_and_cap() {
        let mut codec = TransferCodec::new(1024);
        let hash = ContentHash([3; 32]);
        let res = FetchResponse::Chunk { hash, offset: 0, total_size: 5000, data: Bytes(vec![3; 1024]) };
        assert_eq!(roundtrip_response(&mut codec, res.clone()).ok(), Some(res));
        let nf = FetchResponse::NotFound { hash };
        assert_eq!(roundtrip_response(&mut codec, nf.clone()).ok(), Some(nf));
        let too_big = FetchResponse::Chunk { hash, offset: 0, total_size: 5000, data: Bytes(vec![3; 1025]) };
        assert!(roundtrip_response(&mut codec, too_big).is_err(), "a chunk above the cap is refused");
    }
}
