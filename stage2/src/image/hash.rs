//! A reader that hashes (SHA-256) and counts everything read through it.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Passes reads through unchanged while feeding every byte to SHA-256 and counting them.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes read through this reader so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The SHA-256 of everything read so far and its length.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_counts_what_passes_through() {
        let mut reader = HashingReader::new(&b"abc"[..]);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("ok");
        let (digest, len) = reader.finish();
        assert_eq!(out, b"abc");
        assert_eq!(len, 3);
        assert_eq!(
            hex::encode(digest),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
