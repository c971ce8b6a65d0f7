//! The image writer: composable `Read` adapters (hashing, size limit, format detection and
//! decompression, a resuming HTTP source) and [`write_image`], which streams an image onto a
//! disk so that a partial or corrupt image never boots.
//!
//! ```no_run
//! use stage2::image::{write_image, HttpSource, RetryPolicy, WriteOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = HttpSource::open("http://10.0.0.1/images/node.raw.zst", RetryPolicy::default())?;
//! let options = WriteOptions::new([0u8; 32]);
//! write_image(source, "/dev/vda".as_ref(), &options, |p| eprintln!("{p:?}"))?;
//! # Ok(()) }
//! ```

mod format;
mod hash;
mod http;
mod limit;
mod write;

pub use format::{buffered_decoder, decoder, Format};
pub use hash::HashingReader;
pub use http::{HttpError, HttpSource, RetryPolicy};
pub use limit::{is_size_limit_error, SizeLimitExceeded, SizeLimitReader};
pub use write::{
    wipe_partition_tables, write_image, write_image_to, Progress, WriteError, WriteOptions,
    WriteReport, HEAD_LEN,
};
