//! Why a network operation failed, as types a caller can match: every variant keeps libp2p's own error as
//! its source (`#[source]` chains, nothing turned into strings), and [`NetError::kind`] sorts them into the
//! few cases a caller acts on differently (retry later, ask another peer, give up).

use std::io;

use libp2p::request_response::OutboundFailure;
use libp2p::swarm::DialError;
use libp2p::{Multiaddr, PeerId, TransportError, gossipsub, kad};

use super::behaviour::BuildError;

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The event loop has stopped.
    #[error("the network event loop has stopped")]
    Closed,
    /// A dial could not be started (bad address, limits, no address for the peer).
    #[error("dial failed")]
    Dial(#[from] DialError),
    /// Subscription refused.
    #[error("subscribe failed")]
    Subscribe(#[from] gossipsub::SubscriptionError),
    /// Publish refused (often: no peer subscribed to the topic yet).
    #[error("publish failed")]
    Publish(#[from] gossipsub::PublishError),
    /// A DHT provider announcement failed (the local record store refused it).
    #[error("provide failed")]
    Provide(#[from] kad::store::Error),
    /// A transfer request failed. After a timeout the peer may or may not have served it.
    #[error("transfer request to {peer} failed")]
    Request {
        /// The peer asked.
        peer: PeerId,
        /// libp2p's reason: timeout, connection closed, unsupported protocol, dial failure or i/o (a frame
        /// over its cap is an i/o error of kind `InvalidData` wrapping a [`FrameTooLarge`]).
        #[source]
        source: OutboundFailure,
    },
    /// The peer does not speak the bulk stream protocol (it may still serve `/mana/fetch/1.0.0`).
    #[error("{peer} does not support {protocol}")]
    StreamUnsupported {
        /// The peer asked.
        peer: PeerId,
        /// The protocol it lacks.
        protocol: libp2p::StreamProtocol,
    },
    /// No blob lane to this peer (it has none, refused, or could not be reached directly); a bulk stream
    /// serves instead.
    #[error("no blob lane to {peer}: {why}")]
    LaneUnavailable {
        /// The peer asked.
        peer: PeerId,
        /// Why.
        why: String,
    },
    /// A bulk stream could not be opened, or failed while in use.
    #[error("bulk stream with {peer} failed")]
    Stream {
        /// The peer at the other end.
        peer: PeerId,
        /// What went wrong on the stream.
        #[source]
        source: io::Error,
    },
    /// Inbound bulk streams are already being accepted by another caller.
    #[error("bulk streams are already accepted elsewhere")]
    AlreadyAccepting,
    /// A listen address could not be bound.
    #[error("listen on {addr} failed")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// The transport's reason.
        #[source]
        source: TransportError<io::Error>,
    },
    /// A listen address is not free for this process alone (checked before the swarm binds it).
    #[error("cannot listen on {addr}: {reason}")]
    ListenUnavailable {
        /// The address.
        addr: Multiaddr,
        /// What it means for the operator.
        reason: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The swarm did not start listening in time.
    #[error("the swarm is not listening on any address")]
    NotListening,
    /// The swarm could not be built.
    #[error("the swarm could not be built")]
    Build(#[from] BuildError),
}

/// A frame longer than the reader's cap: the reader stopped before reading it further. Carried inside the
/// `InvalidData` [`io::Error`] of the codec or stream that refused it, so [`NetError::kind`] finds it.
#[derive(Debug, thiserror::Error)]
#[error("frame larger than {cap} bytes")]
pub struct FrameTooLarge {
    /// The cap that was exceeded.
    pub cap: usize,
}

impl FrameTooLarge {
    /// The i/o error a reader returns for it.
    pub fn into_io(cap: usize) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, FrameTooLarge { cap })
    }
}

/// The cases a caller handles differently, whatever libp2p call produced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The peer did not answer in time (it may still have acted on the request).
    Timeout,
    /// The peer refused: it does not speak the protocol, or a limit turned us away.
    Refused,
    /// The connection closed (or was reset) under the request.
    ConnectionClosed,
    /// The peer could not be reached at all.
    Unreachable,
    /// The peer sent a frame over its cap.
    TooLarge,
    /// The peer sent bytes that do not decode.
    Malformed,
    /// Our own network layer has stopped.
    Stopped,
    /// Anything else (local configuration, publish/subscribe, DHT store).
    Other,
}

impl NetError {
    /// Which case this is, for a caller deciding what to do next.
    pub fn kind(&self) -> FailureKind {
        match self {
            NetError::Closed => FailureKind::Stopped,
            NetError::Dial(_) => FailureKind::Unreachable,
            NetError::Request { source, .. } => match source {
                OutboundFailure::Timeout => FailureKind::Timeout,
                OutboundFailure::ConnectionClosed => FailureKind::ConnectionClosed,
                OutboundFailure::UnsupportedProtocols => FailureKind::Refused,
                OutboundFailure::DialFailure => FailureKind::Unreachable,
                OutboundFailure::Io(e) => io_kind(e),
            },
            NetError::StreamUnsupported { .. } => FailureKind::Refused,
            NetError::Stream { source, .. } => io_kind(source),
            _ => FailureKind::Other,
        }
    }
}

/// An error and its sources on one line, `outer: cause: cause`, leaving out a cause whose words the line
/// already holds (many errors quote their source) and any that says nothing: how a failure is shown to an
/// operator, in a log line or as the CLI's last word.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        let text = text.trim();
        if !text.is_empty() && !line.contains(text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(text);
        }
        next = e.source();
    }
    line
}

/// Sorts an i/o error from a stream or codec into a [`FailureKind`].
pub fn io_kind(e: &io::Error) -> FailureKind {
    if e.get_ref().is_some_and(|inner| inner.is::<FrameTooLarge>()) {
        return FailureKind::TooLarge;
    }
    match e.kind() {
        io::ErrorKind::TimedOut => FailureKind::Timeout,
        io::ErrorKind::InvalidData => FailureKind::Malformed,
        io::ErrorKind::ConnectionRefused | io::ErrorKind::PermissionDenied => FailureKind::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::NotConnected => FailureKind::ConnectionClosed,
        _ => FailureKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_typed_sources() {
        let peer = PeerId::random();
        let req = |source| NetError::Request { peer, source };
        assert_eq!(req(OutboundFailure::Timeout).kind(), FailureKind::Timeout);
        assert_eq!(
            req(OutboundFailure::ConnectionClosed).kind(),
            FailureKind::ConnectionClosed
        );
        assert_eq!(
            req(OutboundFailure::UnsupportedProtocols).kind(),
            FailureKind::Refused
        );
        assert_eq!(
            req(OutboundFailure::Io(FrameTooLarge::into_io(10))).kind(),
            FailureKind::TooLarge
        );
        let garbled = io::Error::new(io::ErrorKind::InvalidData, "bad frame");
        assert_eq!(
            req(OutboundFailure::Io(garbled)).kind(),
            FailureKind::Malformed
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            NetError::Stream {
                peer,
                source: reset
            }
            .kind(),
            FailureKind::ConnectionClosed
        );
        assert_eq!(NetError::Closed.kind(), FailureKind::Stopped);
        // The chain keeps libp2p's error as the source.
        let err = req(OutboundFailure::Timeout);
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(source, Some(OutboundFailure::Timeout.to_string()));
    }
}
