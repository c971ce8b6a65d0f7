//! Compression format detection by magic bytes, and the matching decompressing reader.

use std::fmt;
use std::io::{self, BufRead, BufReader, Cursor, Read};

/// How an image stream is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Zstd,
    Xz,
    Gzip,
    /// Anything without a known magic: written as is.
    Raw,
}

const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// Enough bytes to recognise every magic above.
pub const MAGIC_LEN: usize = 6;

impl Format {
    /// Recognises the format from the first bytes of a stream (fewer than `MAGIC_LEN` only
    /// if the stream is that short).
    pub fn detect(head: &[u8]) -> Format {
        if head.starts_with(ZSTD_MAGIC) {
            Format::Zstd
        } else if head.starts_with(XZ_MAGIC) {
            Format::Xz
        } else if head.starts_with(GZIP_MAGIC) {
            Format::Gzip
        } else {
            Format::Raw
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Zstd => "zstd",
            Format::Xz => "xz",
            Format::Gzip => "gzip",
            Format::Raw => "raw",
        })
    }
}

/// Reads the first bytes of `source`, detects the format, and returns a reader of the decoded
/// stream (the peeked bytes are put back in front). Concatenated frames/streams/members are
/// all decoded, as `zstd`, `xz` and `gzip` on the command line do.
pub fn decoder<'a, R: Read + Send + 'a>(
    source: R,
) -> io::Result<(Format, Box<dyn Read + Send + 'a>)> {
    buffered_decoder(BufReader::with_capacity(SOURCE_BUFFER, source))
}

/// Compressed bytes a [`decoder`] reads from its source at a time.
const SOURCE_BUFFER: usize = 128 * 1024;

/// Like [`decoder`], for a source that has its own buffer: the decompressors read straight
/// from it, without copying the compressed stream into a buffer of their own.
pub fn buffered_decoder<'a, R: BufRead + Send + 'a>(
    mut source: R,
) -> io::Result<(Format, Box<dyn Read + Send + 'a>)> {
    let mut head = [0u8; MAGIC_LEN];
    let mut filled = 0;
    while filled < MAGIC_LEN {
        match source.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let format = Format::detect(&head[..filled]);
    let whole = Cursor::new(head[..filled].to_vec()).chain(source);
    let reader: Box<dyn Read + Send + 'a> = match format {
        Format::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(whole)?),
        Format::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(whole)),
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(whole)),
        Format::Raw => Box::new(whole),
    };
    Ok((format, reader))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    fn roundtrip(encoded: Vec<u8>, expected: Format) {
        let (format, mut reader) = decoder(&encoded[..]).expect("ok");
        assert_eq!(format, expected);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("ok");
        assert_eq!(out, sample());
    }

    #[test]
    fn decodes_each_format() {
        roundtrip(sample(), Format::Raw);
        roundtrip(
            zstd::encode_all(&sample()[..], 3).expect("ok"),
            Format::Zstd,
        );
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&sample()).expect("ok");
        roundtrip(xz.finish().expect("ok"), Format::Xz);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&sample()).expect("ok");
        roundtrip(gz.finish().expect("ok"), Format::Gzip);
    }

    #[test]
    fn short_streams_are_raw() {
        let (format, mut reader) = decoder(&[0x28u8, 0xb5][..]).expect("ok");
        assert_eq!(format, Format::Raw);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("ok");
        assert_eq!(out, [0x28, 0xb5]);
    }

    #[test]
    fn truncated_zstd_is_an_error() {
        let full = zstd::encode_all(&sample()[..], 3).expect("ok");
        let (_, mut reader) = decoder(&full[..full.len() / 2]).expect("ok");
        let mut out = Vec::new();
        assert!(reader.read_to_end(&mut out).is_err());
    }
}
