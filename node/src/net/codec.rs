//! The fetch protocol's codec (`/mana/fetch/1.0.0`, [`mana_protocol::FETCH_PROTOCOL`]): carries the protocol
//! crate's [`FetchRequest`]/[`FetchResponse`] frames on libp2p request-response streams, one request and one
//! response per stream. A blob is fetched chunk by chunk, so a 50 MB shard is many small requests that run in
//! parallel on several providers, and no read holds more than one chunk.
//!
//! Every read is capped before it is made: a request at [`MAX_REQUEST_FRAME`] bytes, a response at the
//! configured chunk size plus [`RESPONSE_OVERHEAD`]; the frames are then decoded by the protocol crate,
//! which checks the version tag and the chunk's bounds. Every frame read or written is counted in the
//! swarm's [`TrafficCounters`].

use std::io;
use std::sync::Arc;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response;
use mana_protocol::{FetchRequest, FetchResponse};

use super::error::FrameTooLarge;
use super::traffic::TrafficCounters;

/// The protocol id of fetches.
pub const TRANSFER_PROTOCOL: StreamProtocol = StreamProtocol::new(mana_protocol::FETCH_PROTOCOL);

/// The largest request frame read, in bytes (a real one is under 60).
pub const MAX_REQUEST_FRAME: usize = 1024;

/// Bytes of a response frame besides the chunk itself (version, variant, hash, offsets, length prefix).
pub const RESPONSE_OVERHEAD: usize = 1024;

/// The codec, with its cap on chunk size. request-response clones it for every stream; the clones share
/// the traffic counters.
#[derive(Debug, Clone)]
pub struct TransferCodec {
    /// Largest chunk accepted in a response.
    pub max_chunk_bytes: u32,
    traffic: Arc<TrafficCounters>,
}

impl TransferCodec {
    /// A codec accepting chunks of at most `max_chunk_bytes`, counting frames in `traffic`.
    pub fn new(max_chunk_bytes: u32, traffic: Arc<TrafficCounters>) -> Self {
        Self {
            max_chunk_bytes,
            traffic,
        }
    }
}

fn invalid(why: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// First buffer of a frame read; it doubles as the frame fills it.
const FIRST_READ: usize = 64 * 1024;

/// Reads a whole frame of at most `cap` bytes; a longer one is an error, and is not read further.
///
/// Hand-rolled rather than `read_to_end`: futures' `read_to_end` zeroes the buffer's whole spare capacity
/// again every time the stream returns `Pending`, which for a 4 MiB chunk arriving in 16 KiB yamux frames
/// cost more than the transfer itself. Here each byte of the buffer is zeroed once, as it grows.
async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, cap: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; FIRST_READ.min(cap + 1)];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if filled > cap {
                return Err(FrameTooLarge::into_io(cap));
            }
            buf.resize(buf.len().saturating_mul(2).min(cap + 1), 0);
        }
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    if filled > cap {
        return Err(FrameTooLarge::into_io(cap));
    }
    buf.truncate(filled);
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
        self.traffic.add_fetch_in(buf.len());
        FetchRequest::decode(&buf).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<FetchResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_capped(io, self.max_chunk_bytes as usize + RESPONSE_OVERHEAD).await?;
        self.traffic.add_fetch_in(buf.len());
        let response = FetchResponse::decode(&buf).map_err(invalid)?;
        if let FetchResponse::Chunk { data, .. } = &response {
            if data.0.len() > self.max_chunk_bytes as usize {
                return Err(FrameTooLarge::into_io(self.max_chunk_bytes as usize));
            }
        }
        Ok(response)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: FetchRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = req.encode().map_err(invalid)?;
        io.write_all(&frame).await?;
        self.traffic.add_fetch_out(frame.len());
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: FetchResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = res.encode().map_err(invalid)?;
        io.write_all(&frame).await?;
        self.traffic.add_fetch_out(frame.len());
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use mana_protocol::{Bytes, ContentHash};
    use request_response::Codec;

    fn roundtrip_response(
        codec: &mut TransferCodec,
        res: FetchResponse,
    ) -> io::Result<FetchResponse> {
        block_on(async {
            let mut wire = futures::io::Cursor::new(Vec::new());
            TransferCodec::new(u32::MAX, Arc::default())
                .write_response(&TRANSFER_PROTOCOL, &mut wire, res)
                .await?;
            let mut rd = futures::io::Cursor::new(wire.into_inner());
            codec.read_response(&TRANSFER_PROTOCOL, &mut rd).await
        })
    }

    #[test]
    fn request_roundtrip_and_garbage() {
        let mut codec = TransferCodec::new(1024, Arc::default());
        let req = FetchRequest {
            hash: ContentHash([7; 32]),
            offset: 1 << 40,
            max_len: 65536,
        };
        let got = block_on(async {
            let mut wire = futures::io::Cursor::new(Vec::new());
            codec
                .clone()
                .write_request(&TRANSFER_PROTOCOL, &mut wire, req.clone())
                .await?;
            let mut rd = futures::io::Cursor::new(wire.into_inner());
            codec.read_request(&TRANSFER_PROTOCOL, &mut rd).await
        });
        assert_eq!(got.ok(), Some(req.clone()));
        let frame = req.encode().expect("encodable").len() as u64;
        let traffic = codec.traffic.snapshot();
        assert_eq!(
            (traffic.fetch_out, traffic.fetch_in),
            (frame, frame),
            "one frame each way, counted"
        );
        for garbage in [vec![], vec![0xff; 10], vec![1u8; MAX_REQUEST_FRAME + 1]] {
            let got = block_on(async {
                let mut rd = futures::io::Cursor::new(garbage);
                codec.read_request(&TRANSFER_PROTOCOL, &mut rd).await
            });
            assert!(got.is_err());
        }
    }

    #[test]
    fn read_capped_takes_exactly_the_cap_and_refuses_one_more() {
        for cap in [10, FIRST_READ - 1, FIRST_READ, 3 * FIRST_READ + 5] {
            let read = |len: usize| {
                block_on(read_capped(
                    &mut futures::io::Cursor::new(vec![7u8; len]),
                    cap,
                ))
            };
            assert_eq!(read(cap).expect("a frame of exactly the cap").len(), cap);
            assert_eq!(read(0).expect("an empty frame").len(), 0);
            assert!(read(cap + 1).is_err(), "one byte over the cap of {cap}");
        }
    }

    #[test]
    fn response_roundtrip_and_cap() {
        let mut codec = TransferCodec::new(1024, Arc::default());
        let hash = ContentHash([3; 32]);
        let res = FetchResponse::Chunk {
            hash,
            offset: 0,
            total_size: 5000,
            data: Bytes(vec![3; 1024]),
        };
        assert_eq!(roundtrip_response(&mut codec, res.clone()).ok(), Some(res));
        let nf = FetchResponse::NotFound { hash };
        assert_eq!(roundtrip_response(&mut codec, nf.clone()).ok(), Some(nf));
        let too_big = FetchResponse::Chunk {
            hash,
            offset: 0,
            total_size: 5000,
            data: Bytes(vec![3; 1025]),
        };
        assert!(
            roundtrip_response(&mut codec, too_big).is_err(),
            "a chunk above the cap is refused"
        );
    }
}
