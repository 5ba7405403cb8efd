//! A connection's reads, cut at WebSocket frame boundaries.
//!
//! tungstenite reads into a buffer it keeps for the connection's life and
//! never shrinks. When one read brings the end of one frame and the start
//! of the next, and the next frame's length is then reserved on top of what
//! the buffer holds, the buffer doubles; over a connection's life this
//! happens now and then, so the longer a connection lives the larger its
//! buffer (4 KiB at the start, 16 KiB and more after minutes of mixed
//! traffic), and memory under steady load crept up for as long as the
//! population of connections was aging. This wrapper hands tungstenite the
//! bytes of one frame part at a time (the HTTP upgrade request, a frame
//! header, a frame's payload) and never a byte past the part's end, so
//! tungstenite's buffer holds at most one frame and keeps the size of the
//! largest frame the connection sent. What is read from the socket ahead of
//! that waits here, in a buffer that exists only while it holds something.
//!
//! Writes pass through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read from the socket asks for.
const CHUNK: usize = 4096;

/// Where the byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The HTTP upgrade request; `matched` bytes of "\r\n\r\n" were seen.
    Request { matched: u8 },
    /// A frame header: the first `have` bytes of it in `header`.
    Header { header: [u8; 14], have: u8 },
    /// A frame's payload: `left` bytes to go.
    Payload { left: u64 },
}

/// `inner`, read one frame part at a time (see the module).
#[derive(Debug)]
pub struct FrameReads<S> {
    inner: S,
    /// Read from `inner`, not yet handed on: `ahead[at..]`.
    ahead: Vec<u8>,
    at: usize,
    part: Part,
}

impl<S> FrameReads<S> {
    /// `inner` at the start of a connection (the upgrade request first).
    pub fn new(inner: S) -> Self {
        FrameReads {
            inner,
            ahead: Vec::new(),
            at: 0,
            part: Part::Request { matched: 0 },
        }
    }
}

/// One more byte of the upgrade request: how much of "\r\n\r\n" is matched.
fn request_step(matched: u8, byte: u8) -> u8 {
    let want = if matched.is_multiple_of(2) {
        b'\r'
    } else {
        b'\n'
    };
    if byte == want {
        matched + 1
    } else if byte == b'\r' {
        1
    } else {
        0
    }
}

const NEXT_HEADER: Part = Part::Header {
    header: [0; 14],
    have: 0,
};

impl Part {
    /// How many of `available` bytes belong to this part.
    fn within(self, available: &[u8]) -> usize {
        match self {
            Part::Request { mut matched } => {
                for (n, byte) in available.iter().enumerate() {
                    matched = request_step(matched, *byte);
                    if matched == 4 {
                        return n + 1;
                    }
                }
                available.len()
            }
            Part::Header { header, have } => header_len(&header, have)
                .saturating_sub(usize::from(have))
                .min(available.len()),
            Part::Payload { left } => {
                usize::try_from(left).map_or(available.len(), |left| left.min(available.len()))
            }
        }
    }

    /// Where the stream is after `bytes`, all within this part.
    fn after(self, bytes: &[u8]) -> Part {
        match self {
            Part::Request { mut matched } => {
                for byte in bytes {
                    matched = request_step(matched, *byte);
                }
                if matched == 4 {
                    NEXT_HEADER
                } else {
                    Part::Request { matched }
                }
            }
            Part::Header {
                mut header,
                mut have,
            } => {
                for byte in bytes {
                    if let Some(slot) = header.get_mut(usize::from(have)) {
                        *slot = *byte;
                        have += 1;
                    }
                }
                if usize::from(have) < header_len(&header, have) {
                    Part::Header { header, have }
                } else {
                    match payload_len(&header) {
                        0 => NEXT_HEADER,
                        left => Part::Payload { left },
                    }
                }
            }
            Part::Payload { left } => match left.saturating_sub(bytes.len() as u64) {
                0 => NEXT_HEADER,
                left => Part::Payload { left },
            },
        }
    }
}

/// The length of a frame header whose first `have` bytes are `header`
/// (2 until the second byte is known).
fn header_len(header: &[u8; 14], have: u8) -> usize {
    if have < 2 {
        return 2;
    }
    let extended = match header[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if header[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length a complete frame header states.
fn payload_len(header: &[u8; 14]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes([
            header[2], header[3], header[4], header[5], header[6], header[7], header[8], header[9],
        ]),
        short => u64::from(short),
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at >= this.ahead.len() {
            // Nothing waiting: read a chunk into a buffer that exists for
            // as long as it holds something.
            let mut chunk = vec![0; CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
            chunk.truncate(n);
            this.ahead = chunk;
            this.at = 0;
        }
        let available = this.ahead.get(this.at..).unwrap_or_default();
        let n = this.part.within(available).min(buf.remaining());
        let handed = available.get(..n).unwrap_or_default();
        buf.put_slice(handed);
        this.part = this.part.after(handed);
        this.at += n;
        if this.at >= this.ahead.len() {
            this.ahead = Vec::new();
            this.at = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A small deterministic generator (the test must not depend on luck).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % below
        }
    }

    /// An upgrade request, then frames of lengths around every encoding
    /// boundary, masked and not; returns the bytes and where each part ends.
    fn stream(rng: &mut Lcg) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".to_vec();
        let mut ends = vec![bytes.len()];
        for _ in 0..200 {
            let len = match rng.next(6) {
                0 => 0,
                1 => rng.next(126),
                2 => 126 + rng.next(3),
                3 => 65_535 + rng.next(3),
                _ => rng.next(9000),
            } as usize;
            let masked = rng.next(2) == 1;
            bytes.push(0x82);
            let mask_bit = if masked { 0x80 } else { 0 };
            if len < 126 {
                bytes.push(mask_bit | len as u8);
            } else if len <= 0xffff {
                bytes.push(mask_bit | 126);
                bytes.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                bytes.push(mask_bit | 127);
                bytes.extend_from_slice(&(len as u64).to_be_bytes());
            }
            if masked {
                bytes.extend_from_slice(&[1, 2, 3, 4]);
            }
            ends.push(bytes.len());
            bytes.extend((0..len).map(|i| i as u8));
            if len > 0 {
                ends.push(bytes.len());
            }
        }
        (bytes, ends)
    }

    #[tokio::test]
    async fn every_read_ends_at_or_before_a_part_boundary_and_nothing_is_lost() {
        let mut rng = Lcg(7);
        let (sent, ends) = stream(&mut rng);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = {
            let sent = sent.clone();
            let mut rng = Lcg(11);
            tokio::spawn(async move {
                let mut at = 0;
                while at < sent.len() {
                    let n = (1 + rng.next(10_000) as usize).min(sent.len() - at);
                    client.write_all(&sent[at..at + n]).await.unwrap();
                    at += n;
                }
                client.shutdown().await.unwrap();
            })
        };
        let mut reads = FrameReads::new(server);
        let mut received = Vec::new();
        loop {
            let mut buf = vec![0; 1 + rng.next(20_000) as usize];
            let n = reads.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            let (start, end) = (received.len(), received.len() + n);
            let boundary = ends.iter().find(|&&e| e > start).copied().unwrap();
            assert!(
                end <= boundary,
                "a read from {start} to {end} crosses the part ending at {boundary}"
            );
            received.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        assert_eq!(received, sent);
        assert!(reads.ahead.capacity() == 0, "nothing held once drained");
    }
}
