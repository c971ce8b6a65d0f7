//! SHA-256 of a file through the writer's own hashing code, as a stage of its own for
//! `tests/bench/stage2-write.sh`:
//!
//! ```text
//! sha256_stream FILE
//! ```
//!
//! Reads FILE in the writer's 1 MiB chunks through [`stage2::image::HashingReader`] and prints
//! `sha256 HEX bytes N seconds S MB/s R sha-ni yes|no` (whether the CPU has the SHA extensions
//! the sha2 crate uses when it finds them at run time).

use std::io::Read;
use std::time::Instant;

use anyhow::{bail, Context};
use stage2::image::HashingReader;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        bail!("usage: sha256_stream FILE");
    };
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let mut reader = HashingReader::new(file);
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    while reader
        .read(&mut buf)
        .with_context(|| format!("reading {path}"))?
        > 0
    {}
    let seconds = started.elapsed().as_secs_f64();
    let (digest, bytes) = reader.finish();
    println!(
        "sha256 {} bytes {bytes} seconds {seconds:.3} MB/s {:.1} sha-ni {}",
        hex::encode(digest),
        bytes as f64 / seconds / 1e6,
        if has_sha_extensions() { "yes" } else { "no" }
    );
    Ok(())
}

fn has_sha_extensions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
