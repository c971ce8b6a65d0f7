//! A reader that refuses to deliver more than a given number of bytes.

use std::io::{self, Read};

/// Fails with [`io::ErrorKind::InvalidData`] as soon as the inner reader yields more than
/// `limit` bytes, so an oversized (or endless) stream is stopped before it is written past the
/// end of the target, instead of being silently cut like [`Read::take`] would.
pub struct SizeLimitReader<R> {
    inner: R,
    limit: u64,
    bytes: u64,
}

impl<R: Read> SizeLimitReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            limit,
            bytes: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// The error [`SizeLimitReader`] returns; recognisable with [`is_size_limit_error`].
#[derive(Debug, thiserror::Error)]
#[error("stream is longer than the limit of {limit} bytes")]
pub struct SizeLimitExceeded {
    pub limit: u64,
}

/// Whether `error` (possibly wrapped by a decompressor) came from a [`SizeLimitReader`].
pub fn is_size_limit_error(error: &io::Error) -> Option<u64> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<SizeLimitExceeded>())
        .map(|e| e.limit)
}

impl<R: Read> Read for SizeLimitReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Ask for one byte more than allowed so that a stream of exactly `limit` bytes passes
        // and anything longer is seen.
        let allowed = self.limit.saturating_sub(self.bytes).saturating_add(1);
        let want = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.bytes += n as u64;
        if self.bytes > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                SizeLimitExceeded { limit: self.limit },
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_limit_passes() {
        let mut out = Vec::new();
        SizeLimitReader::new(&[7u8; 10][..], 10)
            .read_to_end(&mut out)
            .expect("ok");
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn one_byte_more_fails_with_a_recognisable_error() {
        let mut out = Vec::new();
        let err = SizeLimitReader::new(&[7u8; 11][..], 10)
            .read_to_end(&mut out)
            .expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(is_size_limit_error(&err), Some(10));
        assert!(out.len() <= 10);
    }
}
