//! The byte stream under each HTTP/2 connection, server and bench client alike.
//!
//! h2 (under tonic) keeps a DATA frame of 256 bytes or more out of its write buffer when the
//! stream says it takes vectored writes, and then must write it out before it can buffer the
//! next frame. A KMS response (an Encrypt's ciphertext blob, a data key) is just above that
//! size, so every response took two writes: headers and data, then the trailers, each its
//! own TCP send (strace at concurrency 64: 2 writev per response, 1.95 per request counted
//! with perf). A stream that declines vectored writes makes h2 copy frames under 1 KiB into
//! its buffer instead, so a response, and every response ready at the same moment, goes out
//! in one write (0.1 writes per request in the same measurement). Larger frames are still
//! sent without a copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `T`, but reporting that it takes no vectored writes (see the module documentation).
pub struct Coalesced<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Only `poll_write`: the default `is_write_vectored` (false) is the point of the type.
impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The peer's address (and, over TLS, its certificates) stay visible to requests.
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}
