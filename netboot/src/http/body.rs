//! Response bodies: nothing, a small buffer, or a file: sent with `sendfile(2)` by the
//! server's fast path ([`super::fast`]), or streamed to hyper in bounded chunks.

use std::io::{self, Seek};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

/// Largest chunk read from a file at once; with hyper's write buffer this bounds the memory one
/// download uses, whatever the file size.
const CHUNK: usize = 64 * 1024;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    File(FileStream),
}

impl Body {
    pub fn text(s: impl Into<String>) -> Self {
        Body::Full(Some(Bytes::from(s.into())))
    }
}

/// `len` bytes of `file` from `offset`. Logs when dropped before the end (client went away, or
/// shutdown aborted it) and calls `on_complete` once the last byte was sent (handed to hyper,
/// or to the kernel by the fast path).
pub struct FileStream {
    /// The file as opened, until hyper reads it through `reader`; the fast path sends from it
    /// by offset and never moves its position.
    file: Option<std::fs::File>,
    /// The file for hyper's path: made (and positioned) on its first read.
    reader: Option<tokio::fs::File>,
    /// Where the next byte comes from.
    offset: u64,
    remaining: u64,
    len: u64,
    buf: Vec<u8>,
    path: String,
    on_complete: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl FileStream {
    pub fn new(file: std::fs::File, offset: u64, len: u64, path: String) -> Self {
        FileStream {
            file: Some(file),
            reader: None,
            offset,
            remaining: len,
            len,
            buf: Vec::new(),
            path,
            on_complete: None,
        }
    }

    pub fn on_complete(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_complete = Some(Box::new(f));
        self
    }

    /// The open file, the offset of the next byte and the bytes left, for `sendfile(2)`; `None`
    /// once hyper has started reading it.
    pub(crate) fn sendfile_source(&self) -> Option<(BorrowedFd<'_>, u64, u64)> {
        let file = self.file.as_ref()?;
        Some((file.as_fd(), self.offset, self.remaining))
    }

    /// `n` more bytes were sent by the fast path.
    pub(crate) fn advance(&mut self, n: u64) {
        let n = n.min(self.remaining);
        self.offset += n;
        self.remaining -= n;
        if self.remaining == 0 {
            if let Some(done) = self.on_complete.take() {
                done();
            }
        }
    }

    /// Bytes not sent yet.
    pub(crate) fn remaining(&self) -> u64 {
        self.remaining
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        if self.remaining > 0 {
            tracing::info!(
                path = %self.path,
                sent = self.len - self.remaining,
                len = self.len,
                "file transfer not completed"
            );
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::File(f) => f.poll_chunk(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::File(f) => SizeHint::with_exact(f.remaining),
        }
    }
}

impl FileStream {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            if let Some(done) = self.on_complete.take() {
                done();
            }
            return Poll::Ready(None);
        }
        let want = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        // The chunk's buffer is handed to hyper as it is (no copy), so none is kept here
        // between chunks: a connection whose client does not read holds one chunk less.
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(want, 0);
        if self.reader.is_none() {
            let Some(mut file) = self.file.take() else {
                return Poll::Ready(Some(Err(io::Error::other("file already closed"))));
            };
            // lseek on a regular file does no I/O: fine on a worker thread.
            if self.offset > 0 {
                if let Err(e) = file.seek(io::SeekFrom::Start(self.offset)) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            self.reader = Some(tokio::fs::File::from_std(file));
        }
        let Some(reader) = self.reader.as_mut() else {
            return Poll::Ready(Some(Err(io::Error::other("file already closed"))));
        };
        let mut read = ReadBuf::new(&mut buf[..want]);
        match Pin::new(reader).poll_read(cx, &mut read) {
            Poll::Pending => {
                self.buf = buf;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    // The file shrank under us: end the connection rather than send a response
                    // shorter than its Content-Length.
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended {} bytes early", self.path, self.remaining),
                    ))));
                }
                self.remaining -= n as u64;
                self.offset += n as u64;
                buf.truncate(n);
                let chunk = Bytes::from(buf);
                if self.remaining == 0 {
                    if let Some(done) = self.on_complete.take() {
                        done();
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }
}
