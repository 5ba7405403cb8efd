//! A connection's write buffer that exists only while a burst is written.
//!
//! The writer feeds a burst of frames (queued responses, every answer a
//! commit settled, a page of the mailbox) and flushes once, so the burst
//! should reach the socket in a few large writes, not one per frame.
//! tungstenite can collect them itself, but its buffer keeps the capacity
//! of the largest burst it ever held for the rest of the connection: under
//! steady traffic every connection that once drained a backlog held ~20 KB
//! more than an idle one, and as churn replaced the connections that never
//! had, the soak's memory crept up for as long as it ran. So tungstenite
//! keeps only a small buffer ([`crate::connection::websocket_config`]) and
//! hands its frames on to this one, which collects up to its limit, writes
//! when full, and gives its memory back on every flush: between bursts a
//! connection holds no burst buffer (tungstenite's own still keeps room for
//! the largest single frame it was given).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with writes collected per burst (see the module).
#[derive(Debug)]
pub struct Burst<S> {
    inner: S,
    buffer: Vec<u8>,
    /// How much of `buffer` reached `inner` already.
    written: usize,
    limit: usize,
}

impl<S> Burst<S> {
    /// Collects writes of less than `limit` bytes, up to `limit` at a time.
    pub fn new(inner: S, limit: usize) -> Self {
        Burst {
            inner,
            buffer: Vec::new(),
            written: 0,
            limit,
        }
    }

    /// Bytes of memory the buffer holds now.
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        self.buffer.capacity()
    }
}

impl<S: AsyncWrite + Unpin> Burst<S> {
    /// Writes out what was collected; keeps the allocation for the rest
    /// of the burst.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buffer.len() {
            let rest = self.buffer.get(self.written..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buffer.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Burst<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Burst<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.buffer.is_empty() && this.buffer.len() + data.len() > this.limit {
            ready!(this.poll_write_out(cx))?;
        }
        if data.len() >= this.limit {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        // Grown as the burst needs (a burst of one small frame, the common
        // case, allocates that much, not the whole limit).
        this.buffer.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx))?;
        // The burst is over: give the memory back until the next one.
        this.buffer = Vec::new();
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx))?;
        this.buffer = Vec::new();
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink that records each write it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_few_writes_and_its_memory_is_given_back() {
        let mut burst = Burst::new(Writes::default(), 100);
        for n in 0..10u8 {
            burst.write_all(&[n; 30]).await.unwrap();
        }
        // Three frames fit in 100 bytes: written as the fourth comes.
        assert_eq!(
            burst.inner.0.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![90, 90, 90]
        );
        assert!(burst.buffer_capacity() >= 30, "held while the burst lasts");
        burst.flush().await.unwrap();
        assert_eq!(
            burst.inner.0.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![90, 90, 90, 30]
        );
        assert_eq!(burst.buffer_capacity(), 0, "and given back after it");
        let bytes: Vec<u8> = burst.inner.0.concat();
        let expected: Vec<u8> = (0..10u8).flat_map(|n| [n; 30]).collect();
        assert_eq!(bytes, expected, "in order, nothing lost");
    }

    #[tokio::test]
    async fn a_large_write_goes_straight_through_after_what_was_collected() {
        let mut burst = Burst::new(Writes::default(), 100);
        burst.write_all(&[1; 10]).await.unwrap();
        burst.write_all(&[2; 500]).await.unwrap();
        assert_eq!(
            burst.inner.0.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 500]
        );
        burst.flush().await.unwrap();
        assert_eq!(burst.inner.0.len(), 2, "nothing left to write");
        assert_eq!(burst.buffer_capacity(), 0);
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_at_once_is_written_later() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut burst = Burst::new(client, 1000);
        let sent: Vec<u8> = (0..=255u8).cycle().take(900).collect();
        let writing = async {
            burst.write_all(&sent).await.unwrap();
            burst.flush().await.unwrap();
            burst.shutdown().await.unwrap();
        };
        let mut received = Vec::new();
        let reading = tokio::io::AsyncReadExt::read_to_end(&mut server, &mut received);
        let (_, read) = tokio::join!(writing, reading);
        read.unwrap();
        assert_eq!(received, sent);
    }
}
